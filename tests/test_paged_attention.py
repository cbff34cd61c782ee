"""Paged attention: the Pallas kernel (interpret mode) against its XLA gather twin, the
twin against the model's dense attention on the same keys laid out densely, and the
paged cache's write path against a NumPy model of the cache.

Layouts are built here with NumPy, not with the code under test: each slot's dense
keys (B, K, S, H) are dealt onto a random permutation of the pool's pages, the first
pages of two slots are one shared physical page set (a common prompt prefix), every
pool row no slot may read is NaN (unreferenced pages, and the rows of a slot's last
page past its length), and block-table entries past a slot's pages hold junk
(NO_PAGE, an out-of-range index, another slot's page). A kernel that reads or weighs
a row it must not see gives NaN or a wrong value. The Pallas interpreter also starts
outputs as NaN (tests/test_pallas_attention.py checks that), so an unwritten output
shows.

Cases cover G = 1, 3, 7, head dims 64, 96, 128, bf16 and float32, page sizes that
are not multiples of the 16-key tile (5, 7, 12: the per-row gather path) and one that
is (32: the contiguous-slice path), lengths 0, 1, a page boundary and in-between, and
a causal chunk of T = 5 queries with padding; each distinct shape costs a few seconds
of interpreter compile, so not the full cross product. A hypothesis test then draws
random layouts (lengths, shared prefix, permutation, query offsets) at two fixed
shapes, so the kernel compiles once per shape and each example costs milliseconds.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from jaxllama.engine.paged_cache import NO_PAGE, PagedKVCache, gather, write_pages
from jaxllama.errors import InvalidRequestError
from jaxllama.models.config import ModelConfig
from jaxllama.models.transformer import xla_attention
from jaxllama.pallas.decode_attention import decode_attention_reference
from jaxllama.pallas.flash_attention import MASK_VALUE, online_softmax_update
from jaxllama.pallas.paged_attention import paged_attention, paged_attention_reference

# Interpret-mode tiles: 16, the smallest the GPU lowering takes, so the key loop and
# the splits have several steps at these sizes.
BLOCK_Q = 16
BLOCK_K = 16

TOLERANCE = {
    jnp.float32: dict(atol=2e-5, rtol=2e-5),
    # The kernel rounds softmax weights to bf16 for P @ V and the output to bf16;
    # the dense XLA attention rounds its probabilities to bf16 too.
    jnp.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: type
    kv_heads: int
    group: int
    head_dim: int
    page_size: int  # L
    max_pages: int  # M, the block table's width
    spare_pages: int  # pool pages no slot owns (poisoned)
    num_splits: int
    lengths: tuple[int, ...]
    # Slots (a, b) whose first `shared` pages are the same physical pages.
    shared: tuple[int, int, int] | None = None
    seq_q: int = 1  # T
    # Query offsets for seq_q > 1 (None: lengths - T, the default of the functions).
    q_offset: tuple[int, ...] | None = None
    # Pool size, if fixed (the rest beyond the owned pages are spare): keeps one
    # shape across random layouts.
    pool_pages: int | None = None


CASES = {
    # 5-token pages (45 keys = 9 pages), 3 splits of 3 tiles; lengths full, 1, within a
    # page, 0, a page boundary that is not a tile boundary (30). Slots 0 and 2 share
    # their first 3 pages (15 keys, below both lengths).
    "f32-G1-H64-L5": Case(jnp.float32, 3, 1, 64, 5, 9, 4, 3, (45, 1, 19, 0, 30), (0, 2, 3)),
    # 12-token pages; slots 0 and 1 share one page.
    "bf16-G3-H96-L12": Case(jnp.bfloat16, 2, 3, 96, 12, 4, 3, 2, (48, 13, 25), (0, 1, 1)),
    # 32-token pages: a 16-key tile is one contiguous slice of a page; the tail of a
    # slot's last page past its length is NaN and must be masked. More splits asked
    # for than there are tiles in short slots.
    "f32-G7-H128-L32": Case(jnp.float32, 1, 7, 128, 32, 2, 2, 4, (64, 33, 7), (0, 1, 1)),
    # A causal chunk of 5 queries (35 rows: three 16-row tiles), the Qwen2.5-0.5B head
    # shape: (q_offset, length) = a chunk after 20 cached keys, a fresh prompt of 3
    # real tokens in a bucket of 5 (2 padding queries), a chunk after 9 keys.
    "bf16-G7-H64-L7-chunk": Case(
        jnp.bfloat16, 2, 7, 64, 7, 4, 3, 2, (25, 3, 14), (0, 2, 1), seq_q=5, q_offset=(20, 0, 9)
    ),
}


def _random(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)


@dataclasses.dataclass
class Layout:
    q: jax.Array  # (B, N, H) or (B, T, N, H)
    k_dense: jax.Array  # (B, K, S, H), finite everywhere
    v_dense: jax.Array
    k_pages: jax.Array  # (K, P, L, H), NaN in every row no slot may read
    v_pages: jax.Array
    block_table: jax.Array  # (B, M) int32, junk past each slot's pages
    lengths: jax.Array  # (B,) int32
    q_offset: jax.Array | None  # (B,) int32


def make_layout(name: str, case: Case, rng: np.random.Generator | None = None) -> Layout:
    """The case's layout, random from `rng` (default: seeded by the case's name)."""
    rng = rng or np.random.default_rng(zlib.crc32(name.encode()))
    batch, page, width = len(case.lengths), case.page_size, case.max_pages
    seq_k = width * page
    lengths = np.array(case.lengths, np.int32)
    assert lengths.max() <= seq_k
    kv_shape = (batch, case.kv_heads, seq_k, case.head_dim)
    k_dense = rng.standard_normal(kv_shape, dtype=np.float32)
    v_dense = rng.standard_normal(kv_shape, dtype=np.float32)
    owned = -(-lengths // page)  # pages each slot uses
    shared_with = {}
    if case.shared is not None:
        a, b, n = case.shared
        assert n * page <= min(lengths[a], lengths[b])
        k_dense[b, :, : n * page] = k_dense[a, :, : n * page]
        v_dense[b, :, : n * page] = v_dense[a, :, : n * page]
        shared_with = {b: (a, n)}
    # Round-trip through the dtype so the dense and paged views hold the same values.
    k_dense = np.asarray(jnp.asarray(k_dense, case.dtype).astype(jnp.float32))
    v_dense = np.asarray(jnp.asarray(v_dense, case.dtype).astype(jnp.float32))

    num_shared = case.shared[2] if case.shared else 0
    num_pages = int(owned.sum()) - num_shared + case.spare_pages
    spare = case.spare_pages
    if case.pool_pages is not None:
        spare += case.pool_pages - num_pages
        num_pages = case.pool_pages
    free = list(rng.permutation(num_pages))
    table = np.full((batch, width), NO_PAGE, np.int32)
    k_pool = np.full((case.kv_heads, num_pages, page, case.head_dim), np.nan, np.float32)
    v_pool = np.full_like(k_pool, np.nan)
    for b in range(batch):
        for p in range(owned[b]):
            if b in shared_with and p < shared_with[b][1]:
                table[b, p] = table[shared_with[b][0], p]
                continue
            table[b, p] = phys = free.pop()
            rows = min(page, lengths[b] - p * page)
            k_pool[:, phys, :rows] = k_dense[b, :, p * page : p * page + rows]
            v_pool[:, phys, :rows] = v_dense[b, :, p * page : p * page + rows]
        # Junk past the slot's pages: none, out of range, a page another slot owns.
        junk = rng.choice([NO_PAGE, num_pages + 3, int(table[0, 0]) if owned[0] else 0],
                          size=width - owned[b])
        table[b, owned[b]:] = junk
    assert len(free) == spare

    num_heads = case.kv_heads * case.group
    q_shape = (batch, num_heads, case.head_dim) if case.seq_q == 1 else (
        batch, case.seq_q, num_heads, case.head_dim)
    return Layout(
        q=_random(rng, q_shape, case.dtype),
        k_dense=jnp.asarray(k_dense, case.dtype),
        v_dense=jnp.asarray(v_dense, case.dtype),
        k_pages=jnp.asarray(k_pool, case.dtype),
        v_pages=jnp.asarray(v_pool, case.dtype),
        block_table=jnp.asarray(table),
        lengths=jnp.asarray(lengths),
        q_offset=None if case.q_offset is None else jnp.asarray(np.array(case.q_offset, np.int32)),
    )


def _as64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _assert_close(what, got, want, dtype):
    got, want = _as64(got), _as64(want)
    assert not np.isnan(got).any(), f"{what}: NaN in the output (unwritten or poisoned read)"
    np.testing.assert_allclose(got, want, err_msg=what, **TOLERANCE[dtype])


def _twin(layout: Layout, sm_scale: float, sliding_window: int | None = None):
    return jax.jit(paged_attention_reference, static_argnames=("sm_scale", "sliding_window"))(
        layout.q, layout.k_pages, layout.v_pages, layout.block_table, layout.lengths,
        layout.q_offset, sm_scale=sm_scale, sliding_window=sliding_window,
    )


def _dense_attention(layout: Layout, sm_scale: float,
                     sliding_window: int | None = None) -> jax.Array:
    """The model's XLA attention on the dense (B, K, S, H) keys, (B, T, N, H)."""
    q4 = layout.q if layout.q.ndim == 4 else layout.q[:, None]
    seq_q = q4.shape[1]
    offset = layout.lengths - seq_q if layout.q_offset is None else layout.q_offset
    positions = offset[:, None] + jnp.arange(seq_q, dtype=jnp.int32)[None, :]
    # In float32: the bf16 values are exact in it, and this CPU's XLA has no
    # bf16 x bf16 -> f32 dot ("Unsupported element type for DotThunk").
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return jax.jit(xla_attention, static_argnames=("sm_scale", "sliding_window"))(
        f32(q4), f32(layout.k_dense), f32(layout.v_dense), positions, layout.lengths,
        sm_scale=sm_scale, sliding_window=sliding_window)


@pytest.mark.parametrize("name", list(CASES))
def test_paged_kernel_matches_twin(name):
    case = CASES[name]
    layout = make_layout(name, case)
    sm_scale = case.head_dim**-0.5
    got = paged_attention(
        layout.q, layout.k_pages, layout.v_pages, layout.block_table, layout.lengths,
        layout.q_offset, sm_scale=sm_scale, block_q=BLOCK_Q, block_k=BLOCK_K,
        num_splits=case.num_splits, interpret=True,
    )
    twin = _twin(layout, sm_scale)
    chex.assert_shape(got, layout.q.shape)
    chex.assert_type([got, twin], case.dtype)
    _assert_close(f"{name}: kernel vs twin", got, twin, case.dtype)
    # A slot of length 0 has no key: its output is defined as zeros.
    for b in np.flatnonzero(np.asarray(layout.lengths) == 0):
        assert not np.asarray(got[b], np.float32).any()


@pytest.mark.parametrize("name", list(CASES) + ["f32-G3-H64-L6-default-offset"])
def test_twin_matches_dense_attention(name):
    """The independent check: the gather twin on the paged (poisoned) pool equals the
    model's dense attention on the same keys laid out densely."""
    case = CASES.get(name) or Case(
        jnp.float32, 2, 3, 64, 6, 5, 2, 1, (30, 7, 12), (0, 2, 1), seq_q=3
    )
    layout = make_layout(name, case)
    sm_scale = case.head_dim**-0.5
    twin = _twin(layout, sm_scale)
    dense = _dense_attention(layout, sm_scale)
    if case.seq_q == 1:
        dense = dense[:, 0]
        # And the decode kernel's own twin, on the same dense keys.
        _assert_close(
            f"{name}: twin vs decode_attention_reference", twin,
            jax.jit(decode_attention_reference, static_argnames="sm_scale")(
                layout.q, layout.k_dense, layout.v_dense, layout.lengths, sm_scale=sm_scale),
            case.dtype,
        )
    _assert_close(f"{name}: twin vs dense xla_attention", twin, dense, case.dtype)


@pytest.mark.parametrize("window", [1, 5, 16])
@pytest.mark.parametrize("name", ["f32-G3-H64-L6-default-offset"] + list(CASES)[:3])
def test_twin_sliding_window_matches_dense_attention(name, window):
    """The engine's XLA path with a sliding window (Phi-3's): the gather twin masks as
    the dense xla_attention does (itself checked against the float64 definition in
    test_pallas_attention.py), and a window narrower than the keys changes the result."""
    case = CASES.get(name) or Case(
        jnp.float32, 2, 3, 64, 6, 5, 2, 1, (30, 7, 12), (0, 2, 1), seq_q=3
    )
    layout = make_layout(name, case)
    sm_scale = case.head_dim**-0.5
    twin = _twin(layout, sm_scale, window)
    dense = _dense_attention(layout, sm_scale, window)
    _assert_close(f"{name}, window {window}: twin vs dense xla_attention", twin,
                  dense[:, 0] if case.seq_q == 1 else dense, case.dtype)
    if window < int(np.max(np.asarray(layout.lengths))) - 1:
        assert not np.allclose(_as64(twin), _as64(_twin(layout, sm_scale)))


def test_paged_kernel_layout_changes_do_not_recompile():
    """Block table, lengths and offsets are read at run time: a new page layout and
    new lengths reuse the compiled kernel, and its output follows them."""
    name = "bf16-G3-H96-L12"
    case = CASES[name]
    layout = make_layout(name, case)
    kw = dict(sm_scale=case.head_dim**-0.5, block_q=BLOCK_Q, block_k=BLOCK_K,
              num_splits=case.num_splits, interpret=True)
    args = (layout.q, layout.k_pages, layout.v_pages)
    paged_attention(*args, layout.block_table, layout.lengths, **kw).block_until_ready()
    compiled = paged_attention._cache_size()
    # Slot 1 now reads slot 0's pages (same shape: the pool is unchanged), and every
    # slot is one token shorter.
    table = layout.block_table.at[1].set(layout.block_table[0])
    lengths = jnp.maximum(layout.lengths.at[1].set(layout.lengths[0]) - 1, 0)
    q = layout.q.at[1].set(layout.q[0])
    got = paged_attention(q, *args[1:], table, lengths, **kw)
    assert paged_attention._cache_size() == compiled
    moved = dataclasses.replace(layout, q=q, block_table=table, lengths=lengths)
    _assert_close("new layout", got, _twin(moved, kw["sm_scale"]), case.dtype)
    _assert_close("slot 1 reads slot 0's keys", got[1], got[0], case.dtype)


# Fixed shapes (one compile each), random layouts: 5-token pages (the gather path),
# 6 pages a slot, G = 3; T = 1 (decode) and T = 3 (a causal chunk).
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq_q=st.sampled_from([1, 3]),
    lengths=st.lists(st.integers(0, 30), min_size=3, max_size=3),
    shared=st.integers(0, 6),
    offsets=st.lists(st.integers(-2, 30), min_size=3, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_layouts_kernel_twin_dense_agree(seq_q, lengths, shared, offsets, seed):
    """Property: on any page layout (lengths, a shared prefix of slots 0 and 1,
    permuted pages, query offsets), kernel == twin == dense attention."""
    shared = min(shared, lengths[0] // 5, lengths[1] // 5)
    case = Case(jnp.float32, 2, 3, 64, 5, 6, 2, 2, tuple(lengths),
                (0, 1, shared) if shared else None, seq_q=seq_q,
                q_offset=tuple(offsets) if seq_q > 1 else None, pool_pages=20)
    layout = make_layout("random", case, np.random.default_rng(seed))
    sm_scale = case.head_dim**-0.5
    got = paged_attention(
        layout.q, layout.k_pages, layout.v_pages, layout.block_table, layout.lengths,
        layout.q_offset, sm_scale=sm_scale, block_q=BLOCK_Q, block_k=BLOCK_K,
        num_splits=case.num_splits, interpret=True,
    )
    twin = _twin(layout, sm_scale)
    dense = _dense_attention(layout, sm_scale)
    _assert_close("kernel vs twin", got, twin, case.dtype)
    _assert_close("twin vs dense", twin, dense if seq_q > 1 else dense[:, 0], case.dtype)


def test_paged_attention_rejects_bad_shapes():
    q = jnp.zeros((2, 4, 64))
    pages = jnp.zeros((2, 3, 8, 64))
    table, lengths = jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="block_table has shape"):
        paged_attention_reference(q, pages, pages, table[:1], lengths, sm_scale=1.0)
    with pytest.raises(ValueError, match="not a multiple of 2 kv heads"):
        paged_attention_reference(q[:, :3], pages, pages, table, lengths, sm_scale=1.0)
    with pytest.raises(ValueError, match=r"must both be \(K, P, L, H\)"):
        paged_attention(q, pages, pages[..., :32], table, lengths, sm_scale=1.0, interpret=True)


# The write path ---------------------------------------------------------------------

# Two layers, 2 kv heads of 8 dims: the write path does not care about model sizes.
TINY = ModelConfig(
    arch="llama", vocab_size=32, hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, ffn_dim=64, rms_eps=1e-5, context_length=64, rope_theta=10000.0,
)


@functools.partial(jax.jit, static_argnames="layer", donate_argnames="cache")
def _write_layer(cache, k_new, v_new, block_table, start, num_new, *, layer):
    return cache.write(layer, k_new, v_new, block_table, start, num_new)


def test_write_chunks_then_gather_equals_dense_cache():
    """Chunks of varying real lengths (padding, empty slots, a chunk running past the
    table) written through a permuted block table, then gathered, equal a dense cache
    filled position by position; rows no write targets keep their value; attention
    over the pages equals the model's dense attention; nothing recompiles."""
    rng = np.random.default_rng(7)
    batch, page, width, spare, chunk = 3, 4, 5, 2, 6
    kh, hd = TINY.num_kv_heads, TINY.head_dim
    seq_k, num_pages = width * page, batch * width + spare
    cache = PagedKVCache.create(TINY, num_pages, page, jnp.float32)
    chex.assert_shape(cache.k + cache.v, (kh, num_pages, page, hd))
    assert (cache.num_pages, cache.page_size) == (num_pages, page)
    poison = lambda: jnp.full(cache.k[1].shape, jnp.nan)  # noqa: E731 (one buffer each: donated)
    cache = cache.replace(k=(cache.k[0], poison()), v=(cache.v[0], poison()))
    table = rng.permutation(num_pages)[: batch * width].reshape(batch, width).astype(np.int32)

    dense_k = np.full((batch, kh, seq_k, hd), np.nan, np.float32)
    dense_v = np.full_like(dense_k, np.nan)
    lengths = np.zeros(batch, np.int32)
    # num_new per slot per round: padding (3 of 6), an idle slot (0), a full chunk,
    # and a last round whose chunks run past the slot's 20 positions (dropped).
    rounds = [(3, 0, 6), (6, 1, 5), (0, 6, 6), (6, 6, 6), (6, 4, 0)]
    for num_new in rounds:
        num_new = np.array(num_new, np.int32)
        k_new = rng.standard_normal((batch, chunk, kh, hd), dtype=np.float32)
        v_new = rng.standard_normal((batch, chunk, kh, hd), dtype=np.float32)
        cache = _write_layer(cache, jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(table),
                             jnp.asarray(lengths), jnp.asarray(num_new), layer=1)
        for b in range(batch):
            for t in range(num_new[b]):
                if lengths[b] + t < seq_k:
                    dense_k[b, :, lengths[b] + t] = k_new[b, t]
                    dense_v[b, :, lengths[b] + t] = v_new[b, t]
        lengths = np.minimum(lengths + num_new, seq_k)
    assert _write_layer._cache_size() == 1
    assert tuple(lengths) == (20, 17, 20)

    assert not np.asarray(cache.k[0]).any() and not np.asarray(cache.v[0]).any()
    for got, want in ((jax.jit(gather)(cache.k[1], jnp.asarray(table)), dense_k),
                      (jax.jit(gather)(cache.v[1], jnp.asarray(table)), dense_v)):
        np.testing.assert_array_equal(np.asarray(got), want)  # NaN where never written
    unowned = np.setdiff1d(np.arange(num_pages), table)
    assert np.isnan(np.asarray(cache.k[1])[:, unowned]).all()

    q = jnp.asarray(rng.standard_normal((batch, TINY.num_heads, hd), dtype=np.float32))
    paged = jax.jit(paged_attention_reference, static_argnames="sm_scale")(
        q, cache.k[1], cache.v[1], jnp.asarray(table), jnp.asarray(lengths), sm_scale=hd**-0.5)
    dense = jax.jit(xla_attention, static_argnames="sm_scale")(
        q[:, None], jnp.asarray(np.nan_to_num(dense_k)), jnp.asarray(np.nan_to_num(dense_v)),
        jnp.asarray(lengths - 1)[:, None], jnp.asarray(lengths), sm_scale=hd**-0.5)[:, 0]
    _assert_close("paged vs dense after writes", paged, dense, jnp.float32)


# One compiled write for every example: shapes are fixed, only values vary.
_H_BATCH, _H_CHUNK, _H_PAGE, _H_WIDTH, _H_POOL, _H_KV, _H_DIM = 2, 4, 3, 4, 8, 2, 4
_write_pages = jax.jit(write_pages)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    perm=st.permutations(range(_H_POOL)),
    allocated=st.lists(st.integers(0, _H_WIDTH), min_size=_H_BATCH, max_size=_H_BATCH),
    rounds=st.lists(
        st.lists(st.integers(0, _H_CHUNK), min_size=_H_BATCH, max_size=_H_BATCH),
        min_size=1, max_size=5,
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_write_pages_touches_exactly_the_real_tokens(perm, allocated, rounds, seed):
    """Property: after any schedule of chunk writes, the pool equals a row-by-row
    model: every real token sits at (table[pos // L], pos % L) when that page is
    allocated, and every other row (padding, unallocated pages, positions past the
    table) is untouched."""
    rng = np.random.default_rng(seed)
    table = np.full((_H_BATCH, _H_WIDTH), NO_PAGE, np.int32)
    pages = iter(perm)
    for b, n in enumerate(allocated):
        for p in range(min(n, _H_POOL // _H_BATCH)):
            table[b, p] = next(pages)
    pool = rng.standard_normal((_H_KV, _H_POOL, _H_PAGE, _H_DIM), dtype=np.float32)
    want = pool.copy()
    got = jnp.asarray(pool)
    lengths = np.zeros(_H_BATCH, np.int32)
    for num_new in rounds:
        num_new = np.array(num_new, np.int32)
        new = rng.standard_normal((_H_BATCH, _H_CHUNK, _H_KV, _H_DIM), dtype=np.float32)
        got = _write_pages(got, jnp.asarray(new), jnp.asarray(table), jnp.asarray(lengths),
                           jnp.asarray(num_new))
        for b in range(_H_BATCH):
            for t in range(num_new[b]):
                pos = lengths[b] + t
                if pos < _H_WIDTH * _H_PAGE and table[b, pos // _H_PAGE] != NO_PAGE:
                    want[:, table[b, pos // _H_PAGE], pos % _H_PAGE] = new[b, t]
        lengths += num_new
    np.testing.assert_array_equal(np.asarray(got), want)


def test_write_pages_rejects_bad_shapes():
    pool = jnp.zeros((2, 4, 3, 8))
    table, zeros = jnp.zeros((1, 2), jnp.int32), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match=r"expected \(B, T, 2, 8\)"):
        write_pages(pool, jnp.zeros((1, 2, 3, 8)), table, zeros, zeros)
    with pytest.raises(ValueError, match="num_new has shape"):
        write_pages(pool, jnp.zeros((1, 2, 2, 8)), table, zeros, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="num_pages=0"):
        PagedKVCache.create(TINY, 0, 16)


def test_prefix_shared_pages_end_to_end():
    """Allocator, write path and attention together: request B reuses request A's
    cached system-prompt pages and writes only its own tokens; attention over B's
    block table equals dense attention over B's keys computed from scratch, and A's
    is unchanged by B's writes."""
    from jaxllama.engine.pages import PageAllocator, prefix_keys

    page, kh, hd, heads = 4, TINY.num_kv_heads, TINY.head_dim, TINY.num_heads
    width = 4  # pages a slot's table holds

    def kv_of(tokens):
        """Keys/values (T, K, H) a model would compute: position t's depend on the
        whole prefix tokens[: t + 1] (so only an equal prefix may be shared)."""
        out = []
        for t in range(len(tokens)):
            rng = np.random.default_rng(zlib.crc32(str(tokens[: t + 1]).encode()))
            out.append(rng.standard_normal((2, kh, hd), dtype=np.float32))
        out = np.stack(out)  # (T, 2, K, H)
        return out[:, 0], out[:, 1]

    alloc = PageAllocator(10, page)
    cache = PagedKVCache.create(TINY, alloc.num_pages, page)
    system = [11, 12, 13, 14, 15, 16, 17, 18]
    tables, lengths = {}, {}
    for name, prompt in (("a", system + [1, 2, 3]), ("b", system + [4, 5])):
        pages = alloc.match_prefix(prompt[:-1])
        cached = len(pages) * page
        pages += alloc.allocate(-(-len(prompt) // page) - len(pages))
        for p, key in zip(pages, prefix_keys(prompt, page)):
            alloc.register(p, key)
        table = np.full((1, width), NO_PAGE, np.int32)
        table[0, : len(pages)] = pages
        k, v = kv_of(prompt)
        new = len(prompt) - cached
        pad = lambda x: np.pad(x[cached:], ((0, 12 - new), (0, 0), (0, 0)))[None]  # noqa: E731
        for layer in range(TINY.num_layers):
            cache = _write_layer(cache, jnp.asarray(pad(k)), jnp.asarray(pad(v)),
                                 jnp.asarray(table), jnp.array([cached]), jnp.array([new]),
                                 layer=layer)
        tables[name], lengths[name] = table, len(prompt)
        if name == "b":
            assert cached == len(system)  # the system prompt's two pages were reused
            assert list(table[0, :2]) == list(tables["a"][0, :2])

    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, heads, hd), dtype=np.float32))
    for name, prompt in (("a", system + [1, 2, 3]), ("b", system + [4, 5])):
        k, v = kv_of(prompt)
        dense = jax.jit(xla_attention, static_argnames="sm_scale")(
            q[:, None], jnp.asarray(np.swapaxes(k, 0, 1))[None],
            jnp.asarray(np.swapaxes(v, 0, 1))[None], jnp.array([[len(prompt) - 1]]),
            jnp.array([len(prompt)]), sm_scale=hd**-0.5)[:, 0]
        for layer in range(TINY.num_layers):
            paged = jax.jit(paged_attention_reference, static_argnames="sm_scale")(
                q, cache.k[layer], cache.v[layer], jnp.asarray(tables[name]),
                jnp.array([lengths[name]]), sm_scale=hd**-0.5)
            _assert_close(f"request {name}, layer {layer}", paged, dense, jnp.float32)


def test_bad_arguments_raise_the_library_error():
    """Every refusal of the paged attention and the write path is an InvalidRequestError
    (a JaxLlamaError, still a ValueError), saying what was expected."""
    q = jnp.zeros((2, 4, 64))
    pages = jnp.zeros((2, 3, 8, 64))
    table, lengths = jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,), jnp.int32)
    calls = [
        lambda: paged_attention_reference(q, pages, pages, table[:1], lengths, sm_scale=1.0),
        lambda: paged_attention_reference(q[:, :3], pages, pages, table, lengths, sm_scale=1.0),
        lambda: paged_attention_reference(q, pages, pages, table, lengths[:1], sm_scale=1.0),
        lambda: paged_attention_reference(q, pages, pages, table.astype(jnp.float32), lengths,
                                          sm_scale=1.0),
        lambda: paged_attention_reference(q[0], pages, pages, table, lengths, sm_scale=1.0),
        lambda: paged_attention(q, pages, pages[..., :32], table, lengths, sm_scale=1.0,
                                interpret=True),
    ]
    pool = jnp.zeros((2, 4, 3, 8))
    table1, zeros = jnp.zeros((1, 2), jnp.int32), jnp.zeros((1,), jnp.int32)
    calls += [
        lambda: write_pages(pool, jnp.zeros((1, 2, 3, 8)), table1, zeros, zeros),
        lambda: write_pages(pool, jnp.zeros((1, 2, 2, 8)), table1[0], zeros, zeros),
        lambda: write_pages(pool, jnp.zeros((1, 2, 2, 8)), table1, zeros, jnp.zeros((2,))),
        lambda: PagedKVCache.create(TINY, 0, 16),
        lambda: PagedKVCache.create(TINY, 4, 0),
    ]
    for call in calls:
        with pytest.raises(InvalidRequestError, match="expected"):
            call()
    # Not arrays at all: the wrapped TypeError/AttributeError, named by the function.
    for call in (
        lambda: paged_attention_reference("q", pages, pages, table, lengths, sm_scale=1.0),
        lambda: paged_attention(q, None, pages, table, lengths, sm_scale=1.0, interpret=True),
        lambda: write_pages(pool, [1, 2], table1, zeros, zeros),
        lambda: gather(pool, "table"),
    ):
        with pytest.raises(InvalidRequestError, match="bad arguments"):
            call()


def _softmax_block(zero_masked: bool):
    """One fully masked key block for row 0 (row 1 sees key 0), from the empty carry."""
    rows, block_k, width = 2, 16, 16
    rng = np.random.default_rng(0)
    qs = [jnp.asarray(rng.normal(size=(rows, width)), jnp.float32)]
    ks = [jnp.asarray(rng.normal(size=(block_k, width)), jnp.float32)]
    vs = [jnp.asarray(rng.normal(size=(block_k, width)), jnp.float32)]
    carry = ((jnp.zeros((rows, width), jnp.float32),), jnp.full((rows,), MASK_VALUE),
             jnp.zeros((rows,), jnp.float32))
    key_ok = jnp.arange(block_k) < 1
    valid = jnp.stack([jnp.zeros((block_k,), bool), key_ok])
    (acc,), m, l = online_softmax_update(carry, qs, ks, vs, 0.5, valid, key_ok,
                                         zero_masked=zero_masked)
    return np.asarray(acc), np.asarray(m), np.asarray(l), np.asarray(vs[0])


def test_shared_softmax_update_zero_masked_keeps_a_blind_rows_carry():
    """The flag the paged kernel passes to flash_attention's online softmax: a row that
    sees no key of the block keeps its empty carry (l = 0, acc = 0); the default, which
    flash_attention relies on, is unchanged: such a row weighs its masked keys 1 each."""
    acc, m, l, v = _softmax_block(zero_masked=True)
    assert l[0] == 0.0 and not acc[0].any() and m[0] == MASK_VALUE
    # Row 1 sees key 0 alone: weight exp2(0) = 1 on V row 0.
    np.testing.assert_allclose(l[1], 1.0)
    np.testing.assert_allclose(acc[1], v[0], rtol=1e-6)
    acc_d, _, l_d, _ = _softmax_block(zero_masked=False)
    assert l_d[0] == 16.0  # all 16 masked keys weigh exp2(0) = 1 in the sum
    np.testing.assert_allclose(acc_d[0], v[0], rtol=1e-6)  # key_ok zeroes V rows 1..
    np.testing.assert_array_equal(acc_d[1], acc[1])
