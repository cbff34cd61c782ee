"""Causal flash attention for prefill (Pallas), with its plain-JAX twin.

Einsum letters: B batch, T query length, S cache slots, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.

Layouts: q (B, T, N, H); the KV cache k, v (B, K, S, H). Positions are absolute cache
slots: query t of row b sits at slot ``q_offset[b] + t`` and attends key slot s iff
``s <= q_offset[b] + t`` and ``s < kv_lengths[b]``. A query with no such key gives 0.

How the kernel works
--------------------
* GQA without repeating K/V: one program owns one (batch row, kv head) and a tile of
  ``block_q`` *rows*, where a row is one (query position, head-in-group) pair, row
  ``r = t * G + g``. The G heads that share a kv head are folded into the matmul's M
  dimension, so each K/V tile is loaded once for all of them. The rows are gathered
  straight out of q's natural (B, T, N, H) layout (row index ``t * N + k * G + g``),
  so there is no transpose of q or of the output in XLA.
* Online softmax in float32 in the base-2 domain (``exp2``; the scale carries
  ``log2(e)``), the P @ V matmul in the input dtype with float32 accumulation.
* The key loop is bounded at run time by the causal diagonal of the tile's last row
  and by ``kv_lengths``; blocks past either bound are never visited. Blocks that every
  row of the tile may see in full run without any masking; only the diagonal/tail
  blocks pay for the masks.
* Sizes that are not multiples of the blocks: no padding copies. Row indices past the
  end are clamped onto the last row (duplicate rows compute and store identical
  values), and key indices past S are clamped onto slot S - 1 and masked, because
  they are >= kv_lengths. So every load and store stays in bounds, which matters:
  the Triton lowering does not bounds-check ``ref[...]`` accesses.
* Head dim: Triton tensors must have power-of-two sizes, so H is split into
  power-of-two column chunks (96 = 64 + 32) that are loaded, multiplied and stored
  separately; no padding of the cache to 128.

Lowering (chosen on purpose)
----------------------------
The kernel is written with plain ref indexing (``x_ref[idx, pl.ds(...)]``,
``pl.program_id``, ``BlockSpec`` grids), so ``interpret=True`` runs it on the CPU (that
is how the tests check it). On the GPU it is lowered through **Triton**, selected by
passing Triton ``CompilerParams``:
  - Triton is the lowering that takes this style of kernel: gathers with computed
    row indices, dynamic ``fori_loop`` bounds, ``dot`` of register tiles. Mosaic GPU
    (the default since jax 0.9) has its own rules for block shapes and memory spaces;
    GPU.md records a plain-indexing kernel failing there with Mosaic GPU params.
  - jax 0.10.2 and 0.11.2 both export ``jax.experimental.pallas.triton.CompilerParams``
    (older jax called it ``TritonCompilerParams``; both names are looked up). jax 0.11
    deprecates the Triton backend and warns, but runs it (GPU.md, measured on an H100).
  - If neither name exists (a future jax without Triton) the call goes out with no
    params and Pallas picks its default lowering; the XLA twin below stays the
    fallback for every caller.
Without a GPU, ``python -m benchmarks.attention --triton-check`` lowers both kernels
for sm_90, compiles them with the ``triton`` package and reports shared memory,
registers and spills (all default configurations pass with jax 0.10.2 + Triton 3.6).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllama.errors import InvalidRequestError, library_errors
from jaxllama.pallas.reference import prefill_positions, xla_attention

try:  # The Triton lowering's params; see "Lowering" in the module docstring.
    from jax.experimental.pallas import triton as _pl_triton
except ImportError:  # pragma: no cover - depends on the installed jax
    _pl_triton = None
_TRITON_PARAMS = getattr(_pl_triton, "CompilerParams", None) or getattr(
    _pl_triton, "TritonCompilerParams", None
)

LOG2E = math.log2(math.e)
# A finite "minus infinity": exp2(MASK_VALUE - m) is exactly 0 for any real m, and
# MASK_VALUE - MASK_VALUE is 0, not the NaN that -inf - -inf would give.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Triton's tl.dot needs every matmul dimension >= 16; tiles are never made smaller.
MIN_BLOCK = 16

# Tiles, checked by compiling the kernel for sm_90a with Triton 3.6 (the GPU image's)
# at H = 64, 96, 128 and reading `ptxas -v`: no register spills, shared memory within
# the H100's 227 KiB. Not yet timed on a GPU.
# 128 rows (query positions x heads of a group) by 128 keys for 2-byte inputs: the
# tile of JAX's bundled Triton `mha` (340 TFLOP/s on an H100 at H=128, GPU.md).
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128
# float32 tiles are twice the bytes: 128 keys need 320 KiB of shared memory at H=128,
# 64 keys still spill registers; 32 keys use 128 KiB and spill nothing.
F32_BLOCK_K = 32
# 8 warps at every head dim: with 4, the 128x128 float32 logits tile alone is 128
# registers a thread, and ptxas spilled even at H=64.
NUM_WARPS = 8
# Two-stage software pipelining of the K/V loads, as in JAX's `mha`; a 128x128 bf16
# K and V tile per stage is 64 KiB of shared memory at H=128.
NUM_STAGES = 2


def triton_compiler_params(num_warps: int, num_stages: int):
    """Triton CompilerParams for this jax, or None where jax has no Triton lowering."""
    if _TRITON_PARAMS is None:
        return None
    return _TRITON_PARAMS(num_warps=num_warps, num_stages=num_stages)


def head_dim_chunks(head_dim: int) -> tuple[tuple[int, int], ...]:
    """(start, width) column chunks of power-of-two widths covering ``head_dim``,
    widest first: 128 -> ((0, 128),), 96 -> ((0, 64), (64, 32))."""
    chunks, start = [], 0
    for bit in reversed(range(head_dim.bit_length())):
        width = 1 << bit
        if head_dim & width:
            chunks.append((start, width))
            start += width
    return tuple(chunks)


def fit_block(block: int, size: int) -> int:
    """The tile to use along an axis of ``size``: ``block``, or the smallest power of
    two >= size (and >= MIN_BLOCK) where that is smaller, to waste less on tiny axes."""
    return min(block, max(MIN_BLOCK, pl.next_power_of_2(size)))


def check_head_dim(head_dim: int, interpret: bool, where: str) -> None:
    if not interpret and head_dim % MIN_BLOCK:
        raise InvalidRequestError(
            f"{where}: head dim {head_dim} is not supported on the GPU; expected a "
            f"multiple of {MIN_BLOCK} (Triton matmul tiles), e.g. 64, 96 or 128"
        )


def _dot_nt(a, b):
    """a (M, C) . b (N, C)^T -> (M, N) float32."""
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def _dot_nn(a, b):
    """a (M, C) . b (C, N) -> (M, N) float32."""
    return lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )


def load_kv_block(k_ref, v_ref, j, block_k: int, seq_k: int, chunks, masked: bool):
    """Key block j of K and V as column chunks: (k_pos or None, ks, vs).

    A masked block may run past the cache (only the last one does): its slots are
    clamped onto S - 1 to keep the loads in bounds, and the caller masks them by k_pos.
    """
    start = j * block_k
    if masked:
        k_pos = start + lax.iota(jnp.int32, block_k)
        k_idx = jnp.minimum(k_pos, seq_k - 1)
        return (k_pos, [k_ref[k_idx, pl.ds(c0, cw)] for c0, cw in chunks],
                [v_ref[k_idx, pl.ds(c0, cw)] for c0, cw in chunks])
    start = pl.multiple_of(start, block_k)
    return (None, [k_ref[pl.ds(start, block_k), pl.ds(c0, cw)] for c0, cw in chunks],
            [v_ref[pl.ds(start, block_k), pl.ds(c0, cw)] for c0, cw in chunks])


def online_softmax_update(carry, qs, ks, vs, scale, valid=None, key_ok=None, *,
                          zero_masked: bool = False):
    """One key block of the online softmax, in the log2 domain.

    carry = (accs, m, l) per row; valid (rows, block_k) masks logits; key_ok (block_k,)
    marks slots below kv_len, whose V rows alone may enter the sum (slots past it may
    hold anything, NaN included, and 0 * NaN is NaN). Masked logits give exactly 0 when
    each row's max is a real logit, which holds for every block `flash_attention`
    visits. zero_masked=True (with `valid`) also sets the masked weights to 0, for
    callers that visit blocks where a row sees no key (`paged_attention`'s splits): such
    a row's max is MASK_VALUE, its masked weights would be exp2(0) = 1, and with them
    zeroed it keeps its carry unchanged.
    """
    accs, m_prev, l_prev = carry
    s = _dot_nt(qs[0], ks[0])
    for qc, kc in zip(qs[1:], ks[1:]):
        s = s + _dot_nt(qc, kc)
    s = s * scale  # (rows, block_k)
    if valid is not None:
        s = jnp.where(valid, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])
    if zero_masked and valid is not None:
        p = jnp.where(valid, p, 0.0)
    if key_ok is not None:
        vs = [jnp.where(key_ok[:, None], vc, 0) for vc in vs]
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    p = p.astype(vs[0].dtype)
    accs = tuple(alpha[:, None] * acc + _dot_nn(p, vc) for acc, vc in zip(accs, vs))
    return accs, m_next, l_next


def _flash_kernel(
    q_offset_ref,  # () int32, this row's q_offset
    kv_len_ref,  # () int32, this row's kv_lengths
    q_ref,  # (T * N, H): q[b] with (t, n) flattened
    k_ref,  # (S, H): k[b, kv_head]
    v_ref,  # (S, H)
    o_ref,  # (T * N, H)
    *,
    sm_scale: float,
    block_q: int,
    block_k: int,
    num_row_blocks: int,
    seq_q: int,
    num_heads: int,
    group: int,
    chunks: tuple[tuple[int, int], ...],
):
    # Row blocks run last-first: the tiles nearest the end of the prompt have the
    # most keys to visit, so starting them first evens out the tail of the grid.
    row_block = num_row_blocks - 1 - pl.program_id(0)
    kv_head = pl.program_id(1)
    num_rows = seq_q * group
    seq_k = k_ref.shape[0]

    first_row = row_block * block_q
    rows = jnp.minimum(first_row + lax.iota(jnp.int32, block_q), num_rows - 1)
    t = lax.div(rows, group)
    q_rows = t * num_heads + kv_head * group + lax.rem(rows, group)

    q_offset = q_offset_ref[()]
    kv_len = jnp.clip(kv_len_ref[()], 0, seq_k)
    q_pos = q_offset + t  # (block_q,) absolute slot of each row's query
    first_pos = q_offset + lax.div(first_row, group)
    last_pos = q_offset + lax.div(jnp.minimum(first_row + block_q, num_rows) - 1, group)

    # Keys any row may see: s < min(last_pos + 1, kv_len). Keys every row sees:
    # s < min(first_pos + 1, kv_len); whole blocks of those need no mask.
    hi = jnp.maximum(jnp.minimum(last_pos + 1, kv_len), 0)
    lo = jnp.maximum(jnp.minimum(first_pos + 1, kv_len), 0)
    num_blocks = lax.div(hi + block_k - 1, block_k)
    num_full = jnp.minimum(lax.div(lo, block_k), num_blocks)

    qs = [q_ref[q_rows, pl.ds(c0, cw)] for c0, cw in chunks]
    scale = sm_scale * LOG2E

    def step(j, carry, masked: bool):
        k_pos, ks, vs = load_kv_block(k_ref, v_ref, j, block_k, seq_k, chunks, masked)
        if not masked:
            return online_softmax_update(carry, qs, ks, vs, scale)
        key_ok = k_pos < kv_len
        # Every row sees slot 0 once kv_len >= 1, so each row's max is a real logit.
        valid = key_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        return online_softmax_update(carry, qs, ks, vs, scale, valid, key_ok)

    carry = (
        tuple(jnp.zeros((block_q, cw), jnp.float32) for _, cw in chunks),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(
        num_full, num_blocks, functools.partial(step, masked=True), carry
    )
    accs, _, l_final = carry
    inv_l = jnp.where(l_final > 0, 1.0 / l_final, 0.0)[:, None]
    for (c0, cw), acc in zip(chunks, accs):
        o_ref[q_rows, pl.ds(c0, cw)] = (acc * inv_l).astype(o_ref.dtype)


def _check_args(q, k, v, q_offset, kv_lengths) -> None:
    if q.ndim != 4 or k.ndim != 4:
        raise InvalidRequestError(
            f"flash_attention: expected q (B, T, N, H) and k, v (B, K, S, H); got "
            f"q {q.shape}, k {k.shape}"
        )
    b, _, n, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise InvalidRequestError(
            f"flash_attention: k {k.shape} and v {v.shape} must both be (B, K, S, H) "
            f"with B={b}, H={h} from q {q.shape}"
        )
    if n % k.shape[1]:
        raise InvalidRequestError(
            f"flash_attention: {n} query heads is not a multiple of {k.shape[1]} kv heads"
        )
    for name, x in (("q_offset", q_offset), ("kv_lengths", kv_lengths)):
        if jnp.shape(x) != (b,):
            raise InvalidRequestError(
                f"flash_attention: {name} has shape {jnp.shape(x)}; expected ({b},)"
            )


@library_errors
@functools.partial(
    jax.jit,
    static_argnames=["sm_scale", "block_q", "block_k", "num_warps", "num_stages", "interpret"],
)
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_offset: jax.Array,
    kv_lengths: jax.Array,
    *,
    sm_scale: float,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of a prompt chunk against the KV cache.

    Args:
      q: (B, T, N, H) queries, bfloat16 or float32.
      k, v: (B, K, S, H) the cache, N a multiple of K; same dtype as q.
      q_offset: (B,) int32, the cache slot of q[b, 0].
      kv_lengths: (B,) int32, the number of valid slots of row b (<= S).
      sm_scale: the logit scale, usually H ** -0.5.
      block_q: rows per tile; a row is a (query, head of the kv head's group) pair,
        so a tile covers block_q // G query positions. A power of two >= 16 on GPU.
      block_k: keys per tile, a power of two >= 16 on GPU; None: DEFAULT_BLOCK_K, or
        F32_BLOCK_K for float32 inputs.
      num_warps, num_stages: Triton launch params (default: see module constants).
      interpret: run the kernel in the Pallas interpreter (CPU tests).

    Returns:
      (B, T, N, H) in q.dtype; query t of row b attends slots
      s <= q_offset[b] + t with s < kv_lengths[b]; a query with no such slot gives 0.
    """
    _check_args(q, k, v, q_offset, kv_lengths)
    batch, seq_q, num_heads, head_dim = q.shape
    _, num_kv_heads, seq_k, _ = k.shape
    group = num_heads // num_kv_heads
    check_head_dim(head_dim, interpret, "flash_attention")
    if block_k is None:
        block_k = F32_BLOCK_K if q.dtype.itemsize >= 4 else DEFAULT_BLOCK_K
    block_q = fit_block(block_q, seq_q * group)
    block_k = fit_block(block_k, seq_k)
    num_row_blocks = pl.cdiv(seq_q * group, block_q)

    kernel = functools.partial(
        _flash_kernel,
        sm_scale=sm_scale,
        block_q=block_q,
        block_k=block_k,
        num_row_blocks=num_row_blocks,
        seq_q=seq_q,
        num_heads=num_heads,
        group=group,
        chunks=head_dim_chunks(head_dim),
    )
    # Grid axis 0 is CUDA's fastest launch axis: the row blocks of one (b, kv head)
    # run side by side and share its K/V tiles in L2.
    grid = (num_row_blocks, num_kv_heads, batch)
    scalar = pl.BlockSpec((None,), lambda i, h, b: (b,))
    q_spec = pl.BlockSpec((None, seq_q * num_heads, head_dim), lambda i, h, b: (b, 0, 0))
    kv_spec = pl.BlockSpec((None, None, seq_k, head_dim), lambda i, h, b: (b, h, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[scalar, scalar, q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct((batch, seq_q * num_heads, head_dim), q.dtype),
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="flash_attention",
    )(
        q_offset.astype(jnp.int32),
        kv_lengths.astype(jnp.int32),
        q.reshape(batch, seq_q * num_heads, head_dim),
        k,
        v,
    )
    return out.reshape(q.shape)


@library_errors
def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_offset: jax.Array,
    kv_lengths: jax.Array,
    *,
    sm_scale: float,
    **unused_block_args,
) -> jax.Array:
    """The XLA twin of `flash_attention`: the model's own XLA attention
    (`jaxllama.pallas.reference.xla_attention`) on the same arguments, so the same mask
    rule; (B, T, N, H) in q.dtype. Slots at or past kv_lengths never reach the output,
    even if they hold NaN."""
    del unused_block_args
    _check_args(q, k, v, q_offset, kv_lengths)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    positions = prefill_positions(q_offset, q.shape[1])
    return xla_attention(q, k, v, positions, jnp.asarray(kv_lengths, jnp.int32), sm_scale=sm_scale)
