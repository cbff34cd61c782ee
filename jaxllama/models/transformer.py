"""The one Llama-family decoder, as pure functions over a params pytree and a KV cache.

RMSNorm -> attention (rotary, grouped-query, optional q/k/v bias) -> residual ->
RMSNorm -> SwiGLU -> residual, repeated; final norm; output projection (tied or not).
The families only set switches in `ModelConfig` and map their GGUF names onto `Params`.

Einsum letters: B batch, T query length, S key/cache length, N query heads, K kv heads,
G query heads per kv head, H head dim, D model dim, F ffn dim, V vocab.

Layouts: projection weights are kept as GGUF/PyTorch store them, (out, in), so loading
never transposes; `linear` contracts the `in` axis. Any projection, the embedding table
and the output projection may instead be a `jaxllama.quant.QuantizedWeight` (int8/int4
codes with per-32 scales): `linear` then calls `qlinear`, which dequantizes in the
matmul (XLA or the Pallas kernel, as the `jaxllama.backend.BackendPolicy` says), and
the embedding lookup dequantizes only the rows it gathers. Attention is
`jaxllama.pallas.reference.xla_attention` (the mask rule the kernels are tested
against) or the kernel the policy names; a kernel that does not compile on this device
falls back to it. Norms and biases stay dense; their dtype is
the compute dtype (`Params.dtype`). The KV cache is (B, K, S, H) per
layer, so one kv head's keys are contiguous for the decode kernel. Layers are a tuple,
unrolled in Python, so no step copies a slice of stacked layer weights (a `lax.scan`
layout decoded slower on both a GPU and the CPU: benchmarks/RESULTS.md). `forward` also
takes stacked layers (`stack_layers`) and then runs them as one `lax.scan`
(`decoder_layers_scan`): its program holds one layer, so it compiles in a fraction of
the time, which is what a one-off scoring pass on a CPU needs (the adapter's packed
scoring; see "Evaluation from a cold start" in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
from typing import Literal, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxllama import backend
from jaxllama.backend import BackendPolicy
from jaxllama.errors import InvalidRequestError, UnsupportedOperation
from jaxllama.models.config import ROPE_INTERLEAVED, ModelConfig
from jaxllama.pallas.decode_attention import decode_attention
from jaxllama.pallas.flash_attention import flash_attention
from jaxllama.pallas.reference import attention_mask, xla_attention
from jaxllama.quant import QuantizedWeight, qlinear

Array = jax.Array
AttentionImpl = Literal["xla", "pallas", "pallas_interpret", "cudnn"]
# What the model functions' `attention_impl` takes: the adapter's BackendPolicy, or an
# attention name from which `jaxllama.backend.choose` derives the rest.
Impl = Union[BackendPolicy, AttentionImpl]


@struct.dataclass
class LayerParams:
    attn_norm: Array  # (D,)
    wq: Array  # (N*H, D)
    wk: Array  # (K*H, D)
    wv: Array  # (K*H, D)
    wo: Array  # (D, N*H)
    ffn_norm: Array  # (D,)
    w_gate: Array  # (F, D)
    w_up: Array  # (F, D)
    w_down: Array  # (D, F)
    bq: Array | None = None  # (N*H,)
    bk: Array | None = None  # (K*H,)
    bv: Array | None = None  # (K*H,)


@struct.dataclass
class Params:
    embed: Array  # (V, D)
    layers: tuple[LayerParams, ...] | LayerParams  # a tuple; stacked: see stack_layers
    final_norm: Array  # (D,)
    output: Array | None = None  # (V, D); None when tied to `embed`

    @property
    def output_weight(self) -> Array | QuantizedWeight:
        return self.embed if self.output is None else self.output

    @property
    def dtype(self):
        """The compute dtype: that of the dense weights (norms are never quantized)."""
        return self.final_norm.dtype

    def embed_rows(self, tokens: Array) -> Array:
        """The embedding rows of `tokens`, float32."""
        if isinstance(self.embed, QuantizedWeight):
            return self.embed.take_rows(tokens, jnp.float32)
        return jnp.take(self.embed, tokens, axis=0).astype(jnp.float32)


@struct.dataclass
class KVCache:
    """Per-layer keys and values, (B, K, S, H) each, and the filled length of each row."""

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    lengths: Array  # (B,) int32

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @classmethod
    def create(cls, config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731
        return cls(
            k=tuple(zeros() for _ in range(config.num_layers)),
            v=tuple(zeros() for _ in range(config.num_layers)),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    @classmethod
    def for_params(cls, params: "Params", config: ModelConfig, batch_size: int, max_len: int,
                   shard=None) -> "KVCache":
        """A cache in the dtype of `params`; with `shard` (a ShardingPlan), made directly
        in its shards on the plan's mesh."""
        if shard is None:
            return cls.create(config, batch_size, max_len, params.dtype)
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        dtype = params.dtype
        return cls(
            k=tuple(shard.zeros_cache(shape, dtype) for _ in range(config.num_layers)),
            v=tuple(shard.zeros_cache(shape, dtype) for _ in range(config.num_layers)),
            lengths=shard.put_batch(np.zeros((batch_size,), np.int32)),
        )

    def grow(self, new_len: int) -> "KVCache":
        """The same cache with room for `new_len` slots (zero padding along S)."""
        pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, new_len - a.shape[2]), (0, 0)))  # noqa: E731
        return KVCache(k=tuple(map(pad, self.k)), v=tuple(map(pad, self.v)), lengths=self.lengths)


def linear(x: Array, w: Array | QuantizedWeight, b: Array | None = None, *, impl: str = "xla") -> Array:
    """x (..., in) times w (out, in) -> (..., out), accumulated in float32. A quantized
    `w` goes through `qlinear(..., impl=impl)`."""
    if isinstance(w, QuantizedWeight):
        y = qlinear(x, w, impl=impl)
    else:
        y = jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_tables(config: ModelConfig, positions: Array, row_max_position: Array) -> tuple[Array, Array]:
    """cos and sin, (B, T, H/2) float32, for absolute `positions` (B, T).

    LongRoPE (Phi-3) picks the long factors for a row whose furthest position in this call
    is beyond the original context, as transformers does per forward call.
    `row_max_position` is (B,), or (B, T) for a packed row (each token's own sequence's
    furthest position).
    """
    base = config.inv_freq()
    pos = positions.astype(jnp.float32)[..., None]
    if config.rope_long_factors is None:
        angles = pos * jnp.asarray(base, jnp.float32)
        scale = 1.0
    else:
        short = jnp.asarray(base / np.asarray(config.rope_short_factors), jnp.float32)
        long_ = jnp.asarray(base / np.asarray(config.rope_long_factors), jnp.float32)
        use_long = row_max_position + 1 > config.rope_original_context
        use_long = use_long[:, None, None] if use_long.ndim == 1 else use_long[:, :, None]
        angles = pos * jnp.where(use_long, long_, short)
        scale = config.rope_attn_factor
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: Array, cos: Array, sin: Array, style: str) -> Array:
    """Rotate x (B, T, heads, H) by the angles of cos/sin (B, T, H/2)."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if style == ROPE_INTERLEAVED:
        pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(x.shape)
    else:
        x0, x1 = jnp.split(x, 2, axis=-1)
        out = jnp.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.astype(dtype)


def _write_cache(cache: Array, new: Array, positions: Array) -> Array:
    """Scatter new (B, K, T, H) into cache (B, K, S, H) at slots positions (B, T).

    Slots past the end of the cache are dropped, never clamped onto valid entries.
    """

    def one_row(c, n, p):
        return c.at[:, p].set(n.astype(c.dtype), mode="drop")

    return jax.vmap(one_row)(cache, new, positions)


def _attention(
    policy: BackendPolicy, q, k, v, cache_lengths, num_new, positions, config: ModelConfig,
    sm_scale: float, segment_ids=None, branch_ids=None,
):
    """The attention `policy` names; a Pallas kernel or cuDNN call that does not compile
    here falls back to `xla_attention` (see `jaxllama.backend.kernel_compiles`). Packed
    rows (segment ids given) always run `xla_attention`: the kernels have no segment
    masks."""
    impl = policy.attention
    kv_lengths = cache_lengths + num_new

    def xla():
        return xla_attention(q, k, v, positions, kv_lengths, sm_scale=sm_scale,
                             sliding_window=config.sliding_window, finite_values=True,
                             segment_ids=segment_ids, branch_ids=branch_ids)

    if impl == "xla" or segment_ids is not None:
        return xla()
    if config.sliding_window is not None and config.sliding_window < k.shape[2]:
        raise UnsupportedOperation(
            config.model_type,
            f"attention_impl={impl!r} has no sliding window; use 'xla' for caches longer than "
            f"the window ({config.sliding_window})",
        )
    shape_class = (f"{q.dtype.name}, {config.num_heads} heads on {config.num_kv_heads} kv "
                   f"heads of dim {config.head_dim}")
    if impl == "cudnn":
        args = (q, k, v, positions, kv_lengths)
        if backend.kernel_compiles("cudnn attention", _cudnn_attention, args, dict(sm_scale=sm_scale),
                                   shape_class=shape_class, twin="xla_attention"):
            return _cudnn_attention(*args, sm_scale=sm_scale)
        return xla()
    if impl not in ("pallas", "pallas_interpret"):
        backend.check("attention", impl, what="attention_impl")  # raises for an unknown name
    interpret = impl == "pallas_interpret"
    if q.shape[1] == 1:
        args, kernel, name = (q[:, 0], k, v, kv_lengths), decode_attention, "decode_attention"
        twin = "decode_attention_reference"
    else:
        args, kernel, name = (q, k, v, cache_lengths, kv_lengths), flash_attention, "flash_attention"
        twin = "flash_attention_reference"
    # The real kernels are probed first; the interpreter lowers on every backend.
    if not interpret and not backend.kernel_compiles(
        name, kernel, args, dict(sm_scale=sm_scale), shape_class=shape_class, twin=twin
    ):
        return xla()
    out = kernel(*args, sm_scale=sm_scale, interpret=interpret)
    return out[:, None] if q.shape[1] == 1 else out


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def _cudnn_attention(q, k, v, positions, kv_lengths, *, sm_scale):
    """jax.nn.dot_product_attention as a comparison point (GPU only), with the mask of
    `attention_mask`."""
    kk = jnp.swapaxes(k, 1, 2)  # (B, S, K, H)
    vv = jnp.swapaxes(v, 1, 2)
    mask = attention_mask(positions, kv_lengths, k.shape[2])
    return jax.nn.dot_product_attention(
        q, kk, vv, mask=mask[:, None], scale=sm_scale, implementation="cudnn"
    )


def decoder_block(layer: LayerParams, x: Array, cos: Array, sin: Array, attend, *,
                  config: ModelConfig, mm: str, dtype) -> Array:
    """One layer over the float32 residual stream x (B, T, D): `attend(q, k, v)` gets the
    rotated queries (B, T, N, H) and new keys and values (B, T, K, H) and returns the
    attention output (B, T, N, H). Each block's input is cast to `dtype` (the weights')
    after its norm; the residual stays float32. Returns x."""
    b, t = x.shape[:2]
    h = rms_norm(x, layer.attn_norm, config.rms_eps).astype(dtype)
    q = linear(h, layer.wq, layer.bq, impl=mm).reshape(b, t, config.num_heads, config.head_dim)
    k = linear(h, layer.wk, layer.bk, impl=mm).reshape(b, t, config.num_kv_heads, config.head_dim)
    v = linear(h, layer.wv, layer.bv, impl=mm).reshape(b, t, config.num_kv_heads, config.head_dim)
    q = apply_rope(q, cos, sin, config.rope_style)
    k = apply_rope(k, cos, sin, config.rope_style)
    attn = attend(q, k, v)
    x = x + linear(attn.reshape(b, t, config.q_dim), layer.wo, impl=mm).astype(jnp.float32)
    h = rms_norm(x, layer.ffn_norm, config.rms_eps).astype(dtype)
    gate = linear(h, layer.w_gate, impl=mm)
    up = linear(h, layer.w_up, impl=mm)
    return x + linear(jax.nn.silu(gate) * up, layer.w_down, impl=mm).astype(jnp.float32)


def decoder_layers(params: Params, x: Array, cos: Array, sin: Array, attend, *,
                   config: ModelConfig, mm: str) -> Array:
    """The layer stack over the float32 residual stream x (B, T, D), rotary tables for the
    T positions. `attend(i, q, k, v)` gets layer i's rotated queries (B, T, N, H) and new
    keys and values (B, T, K, H), stores the keys and values wherever its caller keeps its
    cache (dense or paged), and returns the attention output (B, T, N, H). The residual
    stream stays in float32 whatever the weights' dtype; each block's input is cast to
    the weights' dtype after its norm (bf16 drifts far less this way). Returns x.
    `params.layers` is the tuple of layers (unrolled); for stacked layers see
    `decoder_layers_scan`."""
    if is_stacked(params):
        raise InvalidRequestError("decoder_layers takes a tuple of layers; stacked layers "
                                  "(stack_layers) go through decoder_layers_scan")
    for i, layer in enumerate(params.layers):
        x = decoder_block(layer, x, cos, sin, functools.partial(attend, i), config=config, mm=mm,
                          dtype=params.dtype)
    return x


def decoder_layers_scan(params: Params, x: Array, cos: Array, sin: Array, attend, state, *,
                        config: ModelConfig, mm: str):
    """`decoder_layers` as one `lax.scan` over stacked layers (see `stack_layers`): the
    program holds one layer, not `num_layers` copies, so it compiles in a fraction of
    the time. `attend(i, q, k, v, state)` (i a traced int32) returns (the attention
    output, the new state); `state` is any pytree the layers thread through (the
    stacked caches). Returns (x, state)."""
    if not is_stacked(params):
        raise InvalidRequestError("decoder_layers_scan takes stacked layers (stack_layers), "
                                  "got a tuple of layers")
    dtype = params.dtype
    num_layers = jax.tree_util.tree_leaves(params.layers)[0].shape[0]

    def body(carry, xs):
        x, state = carry
        layer, i = xs
        box = []

        def attend_i(q, k, v):
            out, new_state = attend(i, q, k, v, state)
            box.append(new_state)
            return out

        x = decoder_block(layer, x, cos, sin, attend_i, config=config, mm=mm, dtype=dtype)
        return (x, box[0]), None

    (x, state), _ = jax.lax.scan(body, (x, state), (params.layers, jnp.arange(num_layers, dtype=jnp.int32)))
    return x, state


def is_stacked(params: Params) -> bool:
    """Whether `params.layers` is one LayerParams with a leading layer axis (from
    `stack_layers`) rather than a tuple of layers."""
    return isinstance(params.layers, LayerParams)


def can_stack(params: Params) -> bool:
    """Whether every layer has the same pytree structure and leaf shapes and dtypes (the
    same quantization kinds, biases or not), so that `stack_layers` applies."""
    if is_stacked(params):
        return True
    layers = params.layers
    if not layers:
        return False
    first = jax.tree_util.tree_structure(layers[0])
    sig = lambda layer: [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(layer)]  # noqa: E731
    want = sig(layers[0])
    return all(jax.tree_util.tree_structure(l) == first and sig(l) == want for l in layers[1:])


@jax.jit
def _stack(layers):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)


def stack_layers(params: Params) -> Params:
    """The same params with `layers` one LayerParams whose leaves have a leading
    (num_layers,) axis, for `forward`'s `lax.scan` path (one compiled layer instead of
    num_layers). A copy of the layer weights: the caller keeps both only as long as it
    needs both. Raises InvalidRequestError when the layers differ in structure (see
    `can_stack`)."""
    if is_stacked(params):
        return params
    if not can_stack(params):
        raise InvalidRequestError("stack_layers needs layers of one structure (the same "
                                  "quantization kinds, shapes, dtypes and biases); these differ")
    return params.replace(layers=_stack(params.layers))


def output_logits(params: Params, x: Array, *, config: ModelConfig, mm: str) -> Array:
    """The final norm and the output projection (tied or not): x (..., D) float32 ->
    (..., V) float32 logits."""
    x = rms_norm(x, params.final_norm, config.rms_eps).astype(params.dtype)
    w_out = params.output_weight
    if isinstance(w_out, QuantizedWeight):
        return qlinear(x, w_out, impl=mm)
    return jnp.einsum("...d,vd->...v", x, w_out, preferred_element_type=jnp.float32)


def forward(
    params: Params,
    tokens: Array,
    cache: KVCache,
    num_new: Array,
    *,
    config: ModelConfig,
    attention_impl: Impl = "xla",
    attend_len: int | None = None,
    all_logits: bool = False,
    shard=None,
    rope_positions: Array | None = None,
    segment_ids: Array | None = None,
    branch_ids: Array | None = None,
    logits_at: Array | None = None,
) -> tuple[Array, KVCache]:
    """Run `tokens` (B, T) through the model, appending them to `cache`.

    Row b's first num_new[b] tokens are real; the rest are padding whose keys land past
    the row's new length (masked, then overwritten). `attend_len` (static) bounds the
    cache slots attention reads; the caller guarantees lengths + num_new <= attend_len.
    Returns float32 logits, (B, V) at each row's last real token, or (B, T, V) with
    `all_logits`, and the cache with lengths advanced by num_new. `attention_impl`
    (static) is the adapter's `jaxllama.backend.BackendPolicy`, or an attention name
    that `jaxllama.backend.choose` turns into one (an impossible name raises
    InvalidRequestError). `shard` (static), a
    `jaxllama.sharding.ShardingPlan`, pins the new cache to the plan's layout when the
    arrays live on a mesh.

    Packed rows (`jaxllama.generation.score_packed`): `rope_positions` (B, T) int gives
    each token's position within its own sequence (default: its cache slot);
    `segment_ids` / `branch_ids` (B, S) int, the per-slot ids of
    `jaxllama.pallas.reference.attention_mask`, keep the sequences from seeing each
    other; `logits_at` (B, P) int picks the token indices whose logits are returned,
    (B, P, V) (instead of the last real token's or all of them).
    """
    t = tokens.shape[1]
    policy = backend.as_policy(attention_impl, shard)
    mm = policy.matmul
    num_new = num_new.astype(jnp.int32)
    start = cache.lengths
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if rope_positions is None:
        cos, sin = rope_tables(config, positions, start + num_new - 1)
    else:
        rope_positions = rope_positions.astype(jnp.int32)
        row_max = jnp.max(rope_positions, axis=1)
        if config.rope_long_factors is not None and segment_ids is not None:
            # LongRoPE decides per sequence: each token gets its own segment's furthest position.
            own = jnp.take_along_axis(segment_ids, positions, axis=1)  # (B, T)
            same = own[:, :, None] == own[:, None, :]
            row_max = jnp.max(jnp.where(same, rope_positions[:, None, :], 0), axis=-1)
        cos, sin = rope_tables(config, rope_positions, row_max)
    sm_scale = 1.0 / float(np.sqrt(config.head_dim))
    s_read = cache.max_len if attend_len is None else min(attend_len, cache.max_len)

    x = params.embed_rows(tokens)

    def attention(k_cache, v_cache, q):
        return _attention(
            policy, q, k_cache[:, :, :s_read], v_cache[:, :, :s_read], start, num_new,
            positions, config, sm_scale,
            None if segment_ids is None else segment_ids[:, :s_read],
            None if branch_ids is None else branch_ids[:, :s_read],
        )

    if is_stacked(params):
        if shard is not None:
            raise InvalidRequestError("stacked layers (stack_layers) do not run on a mesh; "
                                      "pass the params with their tuple of layers")

        def attend_scan(i, q, k, v, state):
            k_all, v_all = state  # (L, B, K, S, H)
            k_cache = _write_cache(k_all[i], jnp.swapaxes(k, 1, 2), positions)
            v_cache = _write_cache(v_all[i], jnp.swapaxes(v, 1, 2), positions)
            state = (k_all.at[i].set(k_cache), v_all.at[i].set(v_cache))
            return attention(k_cache, v_cache, q), state

        x, (k_all, v_all) = decoder_layers_scan(params, x, cos, sin, attend_scan,
                                                (jnp.stack(cache.k), jnp.stack(cache.v)),
                                                config=config, mm=mm)
        new_k, new_v = list(k_all), list(v_all)
        return _logits_and_cache(params, x, new_k, new_v, start + num_new, num_new, t,
                                 config=config, mm=mm, all_logits=all_logits, logits_at=logits_at)

    new_k, new_v = [], []

    def attend(i, q, k, v):
        k_cache = _write_cache(cache.k[i], jnp.swapaxes(k, 1, 2), positions)
        v_cache = _write_cache(cache.v[i], jnp.swapaxes(v, 1, 2), positions)
        if shard is not None:
            k_cache, v_cache = shard.constrain_cache(k_cache), shard.constrain_cache(v_cache)
        new_k.append(k_cache)
        new_v.append(v_cache)
        return attention(k_cache, v_cache, q)

    x = decoder_layers(params, x, cos, sin, attend, config=config, mm=mm)
    return _logits_and_cache(params, x, new_k, new_v, start + num_new, num_new, t,
                             config=config, mm=mm, all_logits=all_logits, logits_at=logits_at)


def _logits_and_cache(params, x, new_k, new_v, lengths, num_new, t, *, config, mm, all_logits,
                      logits_at):
    """`forward`'s end: the logits it returns (see there) and the new cache."""
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, :, None], axis=1)
    elif not all_logits:
        last = jnp.clip(num_new - 1, 0, t - 1)
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    logits = output_logits(params, x, config=config, mm=mm)
    return logits, KVCache(k=tuple(new_k), v=tuple(new_v), lengths=lengths)


@functools.partial(
    jax.jit,
    static_argnames=("config", "attention_impl", "attend_len", "all_logits", "shard"),
    donate_argnames=("cache",),
)
def prefill(params, tokens, cache, num_new, *, config, attention_impl="xla", attend_len=None,
            all_logits=False, shard=None):
    """Jitted `forward` over a padded prompt chunk; the cache is donated."""
    return forward(params, tokens, cache, num_new, config=config, attention_impl=attention_impl,
                   attend_len=attend_len, all_logits=all_logits, shard=shard)


@functools.partial(jax.jit, static_argnames=("config", "attention_impl", "shard"),
                   donate_argnames=("cache",))
def decode_step(params, token, cache, active=None, *, config, attention_impl="xla", shard=None):
    """One token per row, token (B,) -> logits (B, V). Rows with active False do not advance."""
    num_new = jnp.ones_like(token, jnp.int32) if active is None else active.astype(jnp.int32)
    return forward(params, token[:, None], cache, num_new, config=config,
                   attention_impl=attention_impl, shard=shard)
