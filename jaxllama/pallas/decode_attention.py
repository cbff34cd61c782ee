"""Split-K decode attention over the KV cache (Pallas), with its plain-JAX twin.

Einsum letters: B batch, S cache slots, N query heads, K kv heads, G = N // K,
H head dim, P splits.

One query token per batch row: q (B, N, H) against the cache k, v (B, K, S, H); row b
attends slots s < kv_lengths[b]. The lengths are read inside the kernel at run time,
so one compiled kernel serves the whole life of a cache.

How the kernel works
--------------------
* GQA: one program owns one (batch row, kv head, split) and all G query heads of that
  kv head, as the M rows of its matmuls (padded to a power of two >= 16 by repeating
  the last head; those rows are dropped). Each K/V tile is read once for G heads.
* Split-K over the *valid* part of the cache: the blocks of [0, kv_lengths[b]) are
  dealt out to ``num_splits`` programs at run time, so the work stays spread over all
  splits whether the cache holds 100 tokens or 4,000, and blocks past the length are
  never loaded. Each split writes its partial (max, sum, unnormalized accumulator) in
  float32; a few XLA ops combine them (flash-decoding).
* Only the one block that straddles kv_lengths is masked; its slots past S are clamped
  onto S - 1 (masked all the same), so no access leaves the arrays: the Triton
  lowering does not bounds-check ``ref[...]``. Head dims go in power-of-two column
  chunks (96 = 64 + 32), as in `flash_attention`.

Lowering: Triton, for the reasons given in `jaxllama.pallas.flash_attention` (plain
ref indexing with gathers and run-time loop bounds; Triton ``CompilerParams`` exist
under that name in jax 0.10 and 0.11, 0.11 warns that the backend is deprecated; the
Mosaic GPU lowering was seen to reject such kernels). ``interpret=True`` runs the same
kernel on the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllama.errors import InvalidRequestError, library_errors
from jaxllama.pallas.reference import xla_attention
from jaxllama.pallas.flash_attention import (
    LOG2E,
    MASK_VALUE,
    load_kv_block,
    online_softmax_update,
    MIN_BLOCK,
    check_head_dim,
    fit_block,
    head_dim_chunks,
    triton_compiler_params,
)

# 64 keys per tile: a K and a V tile are 16 KiB each at H=128 bf16, so two pipeline
# stages fit easily, and a split of a 4k cache is still several tiles long.
DEFAULT_BLOCK_K = 64
# float32: 32 keys keep the same bytes per tile; at 64, ptxas spilled at H=128 (both
# checked by compiling for sm_90a with Triton 3.6; not yet timed on a GPU).
F32_BLOCK_K = 32
# 16 splits: at B*K = 16 (the B=8, K=2 benchmark) that is 256 programs, about two per
# SM of an H100 (132 SMs), enough loads in flight for a bandwidth-bound kernel; the
# float32 partials then cost ~6% of the K/V bytes at G=7, H=64 (written, read back).
DEFAULT_NUM_SPLITS = 16
# Decode does little math per byte: 4 warps, as JAX's bundled decode kernel uses.
NUM_WARPS = 4
NUM_STAGES = 2


def _decode_kernel(
    kv_len_ref,  # () int32, this row's kv_lengths
    q_ref,  # (N, H): q[b]
    k_ref,  # (S, H): k[b, kv_head]
    v_ref,  # (S, H)
    acc_ref,  # (Gp, H) float32: this split's unnormalized output
    m_ref,  # (Gp,) float32: running max of the logits, log2 domain
    l_ref,  # (Gp,) float32: sum of exp2(logit - max)
    *,
    sm_scale: float,
    block_k: int,
    num_splits: int,
    group: int,
    rows: int,
    chunks: tuple[tuple[int, int], ...],
):
    split = pl.program_id(0)
    kv_head = pl.program_id(1)
    seq_k = k_ref.shape[0]
    kv_len = jnp.clip(kv_len_ref[()], 0, seq_k)

    heads = kv_head * group + jnp.minimum(lax.iota(jnp.int32, rows), group - 1)
    qs = [q_ref[heads, pl.ds(c0, cw)] for c0, cw in chunks]
    scale = sm_scale * LOG2E

    # Deal the blocks of [0, kv_len) out to the splits: this one takes [j_lo, j_hi);
    # the blocks before j_mid are full, at most the one after is cut by kv_len.
    num_blocks = lax.div(kv_len + block_k - 1, block_k)
    per_split = lax.div(num_blocks + num_splits - 1, num_splits)
    j_lo = split * per_split
    j_hi = jnp.maximum(jnp.minimum(j_lo + per_split, num_blocks), j_lo)
    j_mid = jnp.minimum(jnp.maximum(lax.div(kv_len, block_k), j_lo), j_hi)

    def step(j, carry, masked: bool):
        k_pos, ks, vs = load_kv_block(k_ref, v_ref, j, block_k, seq_k, chunks, masked)
        if not masked:
            return online_softmax_update(carry, qs, ks, vs, scale)
        # Every block a split visits holds at least one slot < kv_len.
        key_ok = k_pos < kv_len
        return online_softmax_update(carry, qs, ks, vs, scale, key_ok[None, :], key_ok)

    carry = (
        tuple(jnp.zeros((rows, cw), jnp.float32) for _, cw in chunks),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    carry = lax.fori_loop(j_lo, j_mid, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(j_mid, j_hi, functools.partial(step, masked=True), carry)
    accs, m_final, l_final = carry
    # Written even by a split with no blocks (m = MASK_VALUE, l = 0, acc = 0), which
    # then weighs nothing in the combine.
    for (c0, cw), acc in zip(chunks, accs):
        acc_ref[:, pl.ds(c0, cw)] = acc
    m_ref[...] = m_final
    l_ref[...] = l_final


def _check_args(q, k, v, kv_lengths) -> None:
    if q.ndim != 3 or k.ndim != 4:
        raise InvalidRequestError(
            f"decode_attention: expected q (B, N, H) and k, v (B, K, S, H); got "
            f"q {q.shape}, k {k.shape}"
        )
    b, n, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise InvalidRequestError(
            f"decode_attention: k {k.shape} and v {v.shape} must both be (B, K, S, H) "
            f"with B={b}, H={h} from q {q.shape}"
        )
    if n % k.shape[1]:
        raise InvalidRequestError(
            f"decode_attention: {n} query heads is not a multiple of {k.shape[1]} kv heads"
        )
    if jnp.shape(kv_lengths) != (b,):
        raise InvalidRequestError(
            f"decode_attention: kv_lengths has shape {jnp.shape(kv_lengths)}; expected ({b},)"
        )


@library_errors
@functools.partial(
    jax.jit,
    static_argnames=["sm_scale", "block_k", "num_splits", "num_warps", "num_stages", "interpret"],
)
def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_lengths: jax.Array,
    *,
    sm_scale: float,
    block_k: int | None = None,
    num_splits: int = DEFAULT_NUM_SPLITS,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    interpret: bool = False,
) -> jax.Array:
    """Attention of one new token per row against the KV cache.

    Args:
      q: (B, N, H) queries, bfloat16 or float32.
      k, v: (B, K, S, H) the cache, N a multiple of K; same dtype as q.
      kv_lengths: (B,) int32, row b attends slots s < kv_lengths[b] (<= S). A run-time
        value: changing it does not recompile.
      sm_scale: the logit scale, usually H ** -0.5.
      block_k: keys per tile, a power of two >= 16 on GPU; None: DEFAULT_BLOCK_K, or
        F32_BLOCK_K for float32 inputs.
      num_splits: programs that share one row's cache (split-K).
      num_warps, num_stages: Triton launch params.
      interpret: run the kernel in the Pallas interpreter (CPU tests).

    Returns:
      (B, N, H) in q.dtype; a row with kv_lengths 0 gives zeros.
    """
    _check_args(q, k, v, kv_lengths)
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, seq_k, _ = k.shape
    group = num_heads // num_kv_heads
    check_head_dim(head_dim, interpret, "decode_attention")
    if block_k is None:
        block_k = F32_BLOCK_K if q.dtype.itemsize >= 4 else DEFAULT_BLOCK_K
    block_k = fit_block(block_k, seq_k)
    num_splits = max(1, min(num_splits, pl.cdiv(seq_k, block_k)))
    rows = max(MIN_BLOCK, pl.next_power_of_2(group))

    kernel = functools.partial(
        _decode_kernel,
        sm_scale=sm_scale,
        block_k=block_k,
        num_splits=num_splits,
        group=group,
        rows=rows,
        chunks=head_dim_chunks(head_dim),
    )
    partial_shape = (batch, num_kv_heads, num_splits, rows)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(num_splits, num_kv_heads, batch),
        in_specs=[
            pl.BlockSpec((None,), lambda p, h, b: (b,)),
            pl.BlockSpec((None, num_heads, head_dim), lambda p, h, b: (b, 0, 0)),
            pl.BlockSpec((None, None, seq_k, head_dim), lambda p, h, b: (b, h, 0, 0)),
            pl.BlockSpec((None, None, seq_k, head_dim), lambda p, h, b: (b, h, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda p, h, b: (b, h, p, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda p, h, b: (b, h, p, 0)),
            pl.BlockSpec((None, None, None, rows), lambda p, h, b: (b, h, p, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="decode_attention",
    )(kv_lengths.astype(jnp.int32), q, k, v)

    # Combine the splits (B, K, P, Gp[, H]) -> (B, K, Gp[, H]).
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - m_all)  # 0 for empty splits unless all are empty; then l = 0
    l_all = jnp.sum(w * l, axis=2)
    acc_all = jnp.sum(w[..., None] * acc, axis=2)
    out = acc_all * jnp.where(l_all > 0, 1.0 / l_all, 0.0)[..., None]
    return out[:, :, :group].reshape(q.shape).astype(q.dtype)


@library_errors
def decode_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_lengths: jax.Array,
    *,
    sm_scale: float,
    **unused,
) -> jax.Array:
    """The XLA twin of `decode_attention`: the model's own XLA attention
    (`jaxllama.pallas.reference.xla_attention`) with the query at slot kv_lengths - 1,
    so the same mask rule; (B, N, H) in q.dtype. Slots at or past kv_lengths never
    reach the output, even if they hold NaN; a row with kv_lengths 0 gives zeros."""
    del unused
    _check_args(q, k, v, kv_lengths)
    kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    return xla_attention(q[:, None], k, v, kv_lengths[:, None] - 1, kv_lengths, sm_scale=sm_scale)[:, 0]
