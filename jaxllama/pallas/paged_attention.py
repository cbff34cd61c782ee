"""Paged attention over a pool of KV pages (Pallas), with its plain-JAX twin.

Einsum letters: B slots (the decode batch), T query tokens per slot, N query heads,
K kv heads, G = N // K, H head dim, P pages in the pool, L tokens per page (page size),
M pages per slot (the block table's width), S = M * L key positions of a slot.

Layouts
-------
* k_pages, v_pages: (K, P, L, H), one pool per layer. Kv head major, because one
  program owns one kv head: page p of head h is then one contiguous (L, H) block, and
  the kernel's ref for a kv head is the whole head pool, (P * L, H) rows, contiguous,
  so a row of a page is found as ``page * L + offset`` with one gather (or one
  contiguous slice, see below). It is also the (B, K, S, H) dense cache's order with
  (B, S) replaced by (P, L), and the order of JAX's bundled GPU paged kernel.
* block_table: (B, M) int32; slot b's key position s lives in page
  ``block_table[b, s // L]`` at row ``s % L``. Entries from ``ceil(lengths[b] / L)``
  on are never read (they may hold anything: -1, another slot's page, a stale index).
  A page may appear in several slots' tables (a shared prompt prefix).
* lengths: (B,) int32, slot b's keys are positions [0, lengths[b]), lengths[b] <= S.
* q: (B, N, H) for one decode step, or (B, T, N, H) for a chunk of T queries.
  q_offset: (B,) int32, the position of q[b, 0]; None means ``lengths - T``, i.e. the
  queries are the last T keys just written (for T = 1: the decode step's token).
  Query t of slot b attends key s iff ``s <= q_offset[b] + t`` and ``s < lengths[b]``;
  a query with no such key gives 0. With a padded chunk (bucket T, n real tokens
  written at [start, start + n)) pass q_offset = start and lengths = start + n: the
  padding queries then see the same keys as the last real one and are dropped by the
  caller.

How the kernel works
--------------------
* Grid (split, row block, kv head, slot). GQA without repeating K/V: a program's
  matmul rows are (query, head-in-group) pairs ``r = t * G + g`` of one kv head,
  gathered straight out of q's (B, T * N, H) layout as in `flash_attention`; a decode
  step is a single tile of G rows (padded to 16), so each K/V tile is read once for
  all G heads.
* Only pages below the length: the key blocks of [0, min(lengths, last query + 1))
  are dealt out to the splits at run time (flash-decoding, as in `decode_attention`),
  and no page past that bound, nor its block-table entry, is touched. Each split
  writes (max, sum, unnormalized accumulator) in float32; XLA combines them.
* Reading a key block through the block table: when L is a multiple of the key block,
  a block lies inside one page (one holding a visible key) and is one contiguous
  (block_k, H) slice at ``block_table[page] * L + offset``; its rows past the bound
  are read and masked. Otherwise (e.g. 16-token pages under a 64-key tile) every key
  row is gathered by its own page and offset, H contiguous elements a row, and rows
  past the bound are clamped onto the last visible key. Table entries are clamped
  into [0, P) so that even a corrupt table cannot make the kernel read outside the
  pool (the Triton lowering does not bounds-check ``ref[...]``).
* Blocks that every row sees in full run unmasked; the rest mask by length and by the
  causal rule. Unlike `flash_attention`, a split of a causal chunk can hold rows that
  see none of its keys, so the masked update zeroes their weights explicitly (a row
  whose logits are all masked would otherwise weigh every key equally): the shared
  `flash_attention.online_softmax_update` with ``zero_masked=True``.
* Head dims go in power-of-two column chunks (96 = 64 + 32), as in `flash_attention`.

Lowering: Triton, for the reasons given in `jaxllama.pallas.flash_attention`;
``interpret=True`` runs the same kernel on the CPU (how the tests check it).
``python -m benchmarks.paged_attention --triton-check`` compiles the default
configurations for sm_90a without a GPU (all fit, no spills; benchmarks/RESULTS.md);
the kernel has not yet been run or timed on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllama.errors import InvalidRequestError, library_errors
from jaxllama.pallas.flash_attention import (
    LOG2E,
    MASK_VALUE,
    check_head_dim,
    fit_block,
    head_dim_chunks,
    online_softmax_update,
    triton_compiler_params,
)
from jaxllama.pallas.reference import attention_mask

# 64 keys per tile for 2-byte inputs: a K and a V tile are 16 KiB each at H = 128, as
# in `decode_attention`; with 16- or 64-token pages a tile is then one contiguous slice
# of a page or a whole number of pages.
DEFAULT_BLOCK_K = 64
# float32: 32 keys keep the bytes per tile of the bf16 tile (`decode_attention` saw
# ptxas spill at 64 float32 keys, H = 128).
F32_BLOCK_K = 32
# 64 rows of (query, head) pairs: a decode step (G <= 16 heads a kv head) fits one
# 16-row tile whatever this is; a chunk of T queries takes T * G / 64 row blocks, and a
# 64 x 64 float32 logits tile is 32 registers a thread at 4 warps.
DEFAULT_BLOCK_Q = 64
# 8 splits: the engine's decode batch is many slots (16 slots x 2 kv heads x 8 splits
# is 256 programs, about two per SM of an H100), so fewer splits than
# `decode_attention`'s 16 (tuned for B = 8) already fill the GPU.
DEFAULT_NUM_SPLITS = 8
# Decode does little math per byte: 4 warps and 2 stages, as `decode_attention`.
NUM_WARPS = 4
NUM_STAGES = 2


def _paged_kernel(
    len_ref,  # () int32: lengths[b]
    q_offset_ref,  # () int32: q_offset[b]
    table_ref,  # (M,) int32: block_table[b]
    q_ref,  # (T * N, H): q[b] with (t, n) flattened
    k_ref,  # (P * L, H): the pool of this kv head, pages end to end
    v_ref,  # (P * L, H)
    acc_ref,  # (block_q, H) float32: this split's unnormalized output
    m_ref,  # (block_q,) float32: running max of the logits, log2 domain
    l_ref,  # (block_q,) float32: sum of exp2(logit - max)
    *,
    sm_scale: float,
    block_q: int,
    block_k: int,
    num_splits: int,
    seq_q: int,
    num_heads: int,
    group: int,
    page_size: int,
    chunks: tuple[tuple[int, int], ...],
):
    split = pl.program_id(0)
    row_block = pl.program_id(1)
    kv_head = pl.program_id(2)
    max_pages = table_ref.shape[0]
    num_pages = k_ref.shape[0] // page_size
    kv_len = jnp.clip(len_ref[()], 0, max_pages * page_size)
    q_offset = q_offset_ref[()]

    num_rows = seq_q * group
    first_row = row_block * block_q
    rows = jnp.minimum(first_row + lax.iota(jnp.int32, block_q), num_rows - 1)
    t = lax.div(rows, group)
    q_rows = t * num_heads + kv_head * group + lax.rem(rows, group)
    q_pos = q_offset + t
    first_pos = q_offset + lax.div(first_row, group)
    last_pos = q_offset + lax.div(jnp.minimum(first_row + block_q, num_rows) - 1, group)

    # Keys any row of the tile sees: [0, hi); keys every row sees: [0, lo).
    hi = jnp.maximum(jnp.minimum(last_pos + 1, kv_len), 0)
    lo = jnp.maximum(jnp.minimum(first_pos + 1, kv_len), 0)
    num_blocks = lax.div(hi + block_k - 1, block_k)
    per_split = lax.div(num_blocks + num_splits - 1, num_splits)
    j_lo = split * per_split
    j_hi = jnp.maximum(jnp.minimum(j_lo + per_split, num_blocks), j_lo)
    j_mid = jnp.minimum(jnp.maximum(lax.div(lo, block_k), j_lo), j_hi)

    qs = [q_ref[q_rows, pl.ds(c0, cw)] for c0, cw in chunks]
    scale = sm_scale * LOG2E

    def physical_page(logical):
        return jnp.clip(table_ref[logical], 0, num_pages - 1)

    def load(j):
        """Key block j of K and V as column chunks, and its key positions."""
        k_pos = j * block_k + lax.iota(jnp.int32, block_k)
        if page_size % block_k == 0:
            # The block lies inside one page (the one holding position j * block_k,
            # which is < hi): one contiguous slice. Rows past hi are masked.
            start = j * block_k
            row0 = physical_page(lax.div(start, page_size)) * page_size + lax.rem(start, page_size)
            idx = pl.ds(pl.multiple_of(row0, block_k), block_k)
        else:
            # Clamp onto the last visible key: never a page at or past the length.
            pos = jnp.minimum(k_pos, hi - 1)
            idx = physical_page(lax.div(pos, page_size)) * page_size + lax.rem(pos, page_size)
        ks = [k_ref[idx, pl.ds(c0, cw)] for c0, cw in chunks]
        vs = [v_ref[idx, pl.ds(c0, cw)] for c0, cw in chunks]
        return k_pos, ks, vs

    def step(j, carry, masked: bool):
        k_pos, ks, vs = load(j)
        if not masked:
            return online_softmax_update(carry, qs, ks, vs, scale)
        key_ok = k_pos < kv_len
        valid = key_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        # A row may see no key of a masked block here (see the module doc): its masked
        # weights must be 0, not exp2(MASK_VALUE - MASK_VALUE) = 1.
        return online_softmax_update(carry, qs, ks, vs, scale, valid, key_ok,
                                     zero_masked=True)

    carry = (
        tuple(jnp.zeros((block_q, cw), jnp.float32) for _, cw in chunks),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
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


def _check_args(where, q, k_pages, v_pages, block_table, lengths, q_offset) -> None:
    if q.ndim not in (3, 4) or k_pages.ndim != 4:
        raise InvalidRequestError(
            f"{where}: expected q (B, N, H) or (B, T, N, H) and k_pages, v_pages "
            f"(K, P, L, H); got q {q.shape}, k_pages {k_pages.shape}"
        )
    b, n, h = q.shape[0], q.shape[-2], q.shape[-1]
    if k_pages.shape != v_pages.shape or k_pages.shape[3] != h:
        raise InvalidRequestError(
            f"{where}: k_pages {k_pages.shape} and v_pages {v_pages.shape} must both be "
            f"(K, P, L, H) with H={h} from q {q.shape}; expected equal shapes ending in {h}"
        )
    if n % k_pages.shape[0]:
        raise InvalidRequestError(
            f"{where}: {n} query heads is not a multiple of {k_pages.shape[0]} kv heads; "
            f"expected q's heads N = G * K for the K kv heads of k_pages {k_pages.shape}"
        )
    if jnp.ndim(block_table) != 2 or jnp.shape(block_table)[0] != b:
        raise InvalidRequestError(
            f"{where}: block_table has shape {jnp.shape(block_table)}; expected ({b}, M)"
        )
    for name, x in (("lengths", lengths), ("q_offset", q_offset)):
        if x is not None and jnp.shape(x) != (b,):
            raise InvalidRequestError(f"{where}: {name} has shape {jnp.shape(x)}; expected ({b},)")
    for name, x in (("block_table", block_table), ("lengths", lengths), ("q_offset", q_offset)):
        if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise InvalidRequestError(f"{where}: {name} has dtype {jnp.result_type(x)}; expected int32")


def _queries(q, lengths, q_offset):
    """q as (B, T, N, H), and q_offset as (B,) int32 (default: the last T keys)."""
    q4 = q[:, None] if q.ndim == 3 else q
    if q_offset is None:
        q_offset = lengths.astype(jnp.int32) - q4.shape[1]
    return q4, q_offset.astype(jnp.int32)


@library_errors
@functools.partial(
    jax.jit,
    static_argnames=[
        "sm_scale", "block_q", "block_k", "num_splits", "num_warps", "num_stages", "interpret",
    ],
)
def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_table: jax.Array,
    lengths: jax.Array,
    q_offset: jax.Array | None = None,
    *,
    sm_scale: float,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int | None = None,
    num_splits: int = DEFAULT_NUM_SPLITS,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    interpret: bool = False,
) -> jax.Array:
    """Attention of each slot's queries against its keys in the page pool.

    Args:
      q: (B, N, H) one query per slot, or (B, T, N, H); bfloat16 or float32.
      k_pages, v_pages: (K, P, L, H) the pools, N a multiple of K; q's dtype.
      block_table: (B, M) int32, slot b's position s is in page block_table[b, s // L].
      lengths: (B,) int32, slot b has keys [0, lengths[b]), lengths[b] <= M * L.
      q_offset: (B,) int32, the position of q[b, 0]; None: lengths - T.
      sm_scale: the logit scale, usually H ** -0.5.
      block_q: rows (query, head-in-group pairs) per tile, a power of two >= 16.
      block_k: keys per tile, a power of two >= 16; None: DEFAULT_BLOCK_K, or
        F32_BLOCK_K for float32 inputs.
      num_splits: programs that share one slot's keys (split-K).
      num_warps, num_stages: Triton launch params.
      interpret: run the kernel in the Pallas interpreter (CPU tests).

    Block table, lengths and q_offset are run-time values: changing them (inserting,
    growing or finishing a slot) does not recompile.

    Returns:
      q's shape and dtype; query t of slot b attends positions s <= q_offset[b] + t with
      s < lengths[b]; a query with no such position gives 0.
    """
    _check_args("paged_attention", q, k_pages, v_pages, block_table, lengths, q_offset)
    q4, q_offset = _queries(q, lengths, q_offset)
    batch, seq_q, num_heads, head_dim = q4.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    max_pages = block_table.shape[1]
    group = num_heads // num_kv_heads
    check_head_dim(head_dim, interpret, "paged_attention")
    if block_k is None:
        block_k = F32_BLOCK_K if q.dtype.itemsize >= 4 else DEFAULT_BLOCK_K
    block_k = fit_block(block_k, max_pages * page_size)
    block_q = fit_block(block_q, seq_q * group)
    num_row_blocks = pl.cdiv(seq_q * group, block_q)
    num_splits = max(1, min(num_splits, pl.cdiv(max_pages * page_size, block_k)))

    kernel = functools.partial(
        _paged_kernel,
        sm_scale=sm_scale,
        block_q=block_q,
        block_k=block_k,
        num_splits=num_splits,
        seq_q=seq_q,
        num_heads=num_heads,
        group=group,
        page_size=page_size,
        chunks=head_dim_chunks(head_dim),
    )
    rows_padded = num_row_blocks * block_q
    partial_shape = (batch, num_kv_heads, num_splits, rows_padded)
    scalar = pl.BlockSpec((None,), lambda p, i, h, b: (b,))
    pool = pl.BlockSpec((None, num_pages * page_size, head_dim), lambda p, i, h, b: (h, 0, 0))
    acc, m, l = pl.pallas_call(
        kernel,
        # Splits first (CUDA's fastest launch axis): the programs of one (slot, kv
        # head) run side by side.
        grid=(num_splits, num_row_blocks, num_kv_heads, batch),
        in_specs=[
            scalar,
            scalar,
            pl.BlockSpec((None, max_pages), lambda p, i, h, b: (b, 0)),
            pl.BlockSpec((None, seq_q * num_heads, head_dim), lambda p, i, h, b: (b, 0, 0)),
            pool,
            pool,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_q, head_dim), lambda p, i, h, b: (b, h, p, i, 0)),
            pl.BlockSpec((None, None, None, block_q), lambda p, i, h, b: (b, h, p, i)),
            pl.BlockSpec((None, None, None, block_q), lambda p, i, h, b: (b, h, p, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="paged_attention",
    )(
        lengths.astype(jnp.int32),
        q_offset,
        block_table.astype(jnp.int32),
        q4.reshape(batch, seq_q * num_heads, head_dim),
        k_pages.reshape(num_kv_heads, num_pages * page_size, head_dim),
        v_pages.reshape(num_kv_heads, num_pages * page_size, head_dim),
    )

    # Combine the splits (B, K, splits, rows[, H]) -> (B, K, rows[, H]).
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - m_all)  # 0 for empty splits unless all are empty; then l = 0
    l_all = jnp.sum(w * l, axis=2)
    acc_all = jnp.sum(w[..., None] * acc, axis=2)
    out = acc_all * jnp.where(l_all > 0, 1.0 / l_all, 0.0)[..., None]
    out = out[:, :, : seq_q * group].reshape(batch, num_kv_heads, seq_q, group, head_dim)
    out = jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(q4.shape).astype(q.dtype)
    return out if q.ndim == 4 else out[:, 0]


def _gather_head_major(pages: jax.Array, block_table: jax.Array) -> jax.Array:
    """(K, B, M * L, H): slot b's position s of kv head h at [h, b, s]. One row gather
    from the flat (K, P * L, H) pool straight into the head-major order the twin's
    einsums read, so no transpose follows it (gathering pages slot-major and then
    transposing was measured slower). The figures, against dense attention on the same
    keys, are in benchmarks/RESULTS.md, section "Paged attention"
    (`python -m benchmarks.paged_attention`)."""
    num_kv_heads, num_pages, page_size, head_dim = pages.shape
    batch, max_pages = block_table.shape
    table = jnp.clip(block_table.astype(jnp.int32), 0, num_pages - 1)
    rows = table[:, :, None] * page_size + jnp.arange(page_size, dtype=jnp.int32)
    flat = pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
    return flat[:, rows.reshape(batch, max_pages * page_size)]


@library_errors
def gather_pages(pages: jax.Array, block_table: jax.Array) -> jax.Array:
    """A slot-major dense view of a (K, P, L, H) pool: (B, K, M * L, H), slot b's
    position s at [b, :, s]. Table entries are clamped into [0, P); positions past a
    slot's length hold whatever their page holds."""
    return jnp.swapaxes(_gather_head_major(pages, block_table), 0, 1)


@library_errors
def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_table: jax.Array,
    lengths: jax.Array,
    q_offset: jax.Array | None = None,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    **unused_block_args,
) -> jax.Array:
    """The XLA twin of `paged_attention`: same arguments and masking, float32 math, q's
    shape and dtype. Each slot's pages are gathered through its block table into a
    dense (K, B, S, H) view first (the CPU path). Positions at or past lengths never
    reach the output, even if they hold NaN; a query with no visible key gives 0.
    `sliding_window` W (this twin only; the kernel has none): a query at position p also
    sees only positions > p - W, the rule of `reference.attention_mask`."""
    del unused_block_args
    _check_args("paged_attention_reference", q, k_pages, v_pages, block_table, lengths, q_offset)
    q4, q_offset = _queries(q, lengths, q_offset)
    batch, seq_q, num_heads, head_dim = q4.shape
    num_kv_heads = k_pages.shape[0]
    group = num_heads // num_kv_heads
    k = _gather_head_major(k_pages, block_table).astype(jnp.float32)
    v = _gather_head_major(v_pages, block_table).astype(jnp.float32)
    seq_k = k.shape[2]

    # A kv head's G query heads and T queries are one (G * T)-row operand, so both dots
    # are plain batched matmuls over (B, K); the (B, K, G, T) layout with G and T as
    # separate free dimensions ran ~4.5x slower on XLA:CPU (256 queries over 2,048
    # keys: 106 -> 23 ms a layer; benchmarks/RESULTS.md, "Paged attention twin").
    rows = group * seq_q
    qg = q4.astype(jnp.float32).reshape(batch, seq_q, num_kv_heads, group, head_dim)
    qg = jnp.transpose(qg, (0, 2, 3, 1, 4)).reshape(batch, num_kv_heads, rows, head_dim)
    logits = jnp.einsum("BKQH,KBSH->BKQS", qg, k) * sm_scale
    q_pos = q_offset[:, None] + jnp.arange(seq_q)[None, :]  # (B, T)
    slots = jnp.arange(seq_k)
    key_ok = slots[None, :] < lengths[:, None]  # (B, S)
    valid = attention_mask(q_pos, lengths, seq_k, sliding_window)  # (B, T, S): the one rule
    valid = jnp.broadcast_to(valid[:, None, None], (batch, num_kv_heads, group, seq_q, seq_k))
    valid = valid.reshape(batch, num_kv_heads, rows, seq_k)
    logits = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # queries with no valid key: keep exp() NaN-free
    p = jnp.where(valid, jnp.exp(logits - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)  # (B, K, Q, 1)
    v = jnp.where(key_ok[None, :, :, None], v, 0.0)
    o = jnp.einsum("BKQS,KBSH->BKQH", p, v)
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    o = jnp.transpose(o.reshape(batch, num_kv_heads, group, seq_q, head_dim), (0, 3, 1, 2, 4))
    return o.reshape(q.shape).astype(q.dtype)
