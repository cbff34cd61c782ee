"""The Pallas attention kernels, run in interpret mode on the CPU, against their XLA
twins and against an independent float64 NumPy reference.

Poisoning, and why it is honest here: the Pallas interpreter (`interpret=True`) starts
every output buffer as NaN and pads any out-of-range block with NaN
(`test_interpreter_poisons_unwritten_outputs` checks that this jax still does), so an
output element the kernel never writes, or a value read from past an array, shows up
as NaN. On top of that the tests fill every cache slot at or past kv_lengths with NaN,
so a kernel that reads or weighs a slot it must not see fails too.

Shapes are small and never multiples of the 16-wide tiles; the cases are chosen to
cover G = 1, 4, 7, head dims 64, 96, 128, bf16 and float32, query offsets > 0, and
kv lengths of 0, 1 and in-between, without the full cross product (each distinct
shape costs a few seconds of interpreter compile).
"""

from __future__ import annotations

import dataclasses
import time
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jaxllama.pallas.decode_attention import decode_attention, decode_attention_reference
from jaxllama.pallas.flash_attention import (
    flash_attention,
    flash_attention_reference,
    head_dim_chunks,
)

# Interpret-mode tiles: small so the grid and the key loop have several steps at these
# sizes, and 16 because that is the smallest tile the GPU lowering takes.
BLOCK_Q = 16
BLOCK_K = 16

# |kernel - reference| <= ATOL + RTOL * |reference|. bf16: the kernel rounds the softmax
# weights to bf16 for the P @ V matmul, and the output is rounded to bf16 (2^-8).
TOLERANCE = {
    jnp.float32: dict(atol=2e-5, rtol=2e-5),
    jnp.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _random(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)


def _poison_cache(x: jax.Array, kv_lengths: np.ndarray) -> jax.Array:
    """NaN in every slot s >= kv_lengths[b] of a (B, K, S, H) cache."""
    slots = np.arange(x.shape[2])
    dead = slots[None, :] >= kv_lengths[:, None]  # (B, S)
    return jnp.where(dead[:, None, :, None], jnp.nan, x).astype(x.dtype)


def _as64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def numpy_attention(q, k, v, q_offset, kv_lengths, sm_scale) -> np.ndarray:
    """Float64 attention written from the definition, one (row, head, query) at a time
    over exactly the slots it may see. q (B, T, N, H); k, v (B, K, S, H)."""
    q, k, v = _as64(q), _as64(k), _as64(v)
    batch, seq_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    out = np.zeros((batch, seq_q, num_heads, head_dim))
    for b in range(batch):
        for n in range(num_heads):
            for t in range(seq_q):
                visible = min(int(q_offset[b]) + t + 1, int(kv_lengths[b]))
                if visible <= 0:
                    continue  # no key: the output is defined as 0
                keys = k[b, n // group, :visible]
                logits = keys @ q[b, t, n] * sm_scale
                w = np.exp(logits - logits.max())
                out[b, t, n] = w @ v[b, n // group, :visible] / w.sum()
    return out


def _assert_close(name, got, want, dtype):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert not np.isnan(got).any(), f"{name}: NaN in the output (unwritten or poisoned)"
    np.testing.assert_allclose(got, want, err_msg=name, **TOLERANCE[dtype])


def test_interpreter_poisons_unwritten_outputs():
    """The premise of the poisoning: an output element no program writes stays NaN."""

    def write_first_half(x_ref, o_ref):
        o_ref[pl.ds(0, 4)] = x_ref[pl.ds(0, 4)]

    out = pl.pallas_call(
        write_first_half,
        out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
        interpret=True,
    )(jnp.ones((8,), jnp.float32))
    assert not np.isnan(np.asarray(out[:4])).any()
    assert np.isnan(np.asarray(out[4:])).all()


def test_head_dim_chunks_are_powers_of_two():
    assert head_dim_chunks(64) == ((0, 64),)
    assert head_dim_chunks(96) == ((0, 64), (64, 32))
    assert head_dim_chunks(128) == ((0, 128),)


@dataclasses.dataclass(frozen=True)
class PrefillCase:
    dtype: type
    kv_heads: int
    group: int
    head_dim: int
    seq_q: int  # T: the prompt chunk
    seq_k: int  # S: cache slots
    # (q_offset, kv_length) per batch row.
    rows: tuple[tuple[int, int], ...]


PREFILL_CASES = {
    # Every G, every head dim and both dtypes appear, not every combination. Rows:
    # a fresh prompt, a chunk after cached tokens, a padded bucket (its last 4
    # queries are padding and see up to kv_length only), a cache of one token.
    # Tiles' first queries at slot 14 and 30 (their diagonals end one slot short of a
    # key block's end), and one whose last query is at 32 (the first slot of a block).
    "f32-G1-H64": PrefillCase(
        jnp.float32, 2, 1, 64, 21, 45, ((0, 21), (17, 38), (7, 24), (0, 1), (14, 35))
    ),
    "bf16-G4-H96": PrefillCase(jnp.bfloat16, 2, 4, 96, 9, 37, ((0, 9), (27, 36), (3, 1))),
    # T * G = 14 rows, less than one tile; a full cache (the last slot, 28, is read
    # through the clamped tail block); an empty cache gives zeros.
    "f32-G7-H128": PrefillCase(jnp.float32, 1, 7, 128, 2, 29, ((27, 29), (0, 2), (9, 0))),
    # The Qwen2.5-0.5B shape: 14 heads on 2 kv heads, head dim 64, bf16.
    "bf16-G7-H64": PrefillCase(jnp.bfloat16, 2, 7, 64, 6, 70, ((50, 56), (1, 7), (0, 1))),
}


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_flash_attention(name):
    case = PREFILL_CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    batch = len(case.rows)
    num_heads = case.kv_heads * case.group
    q_offset = np.array([r[0] for r in case.rows], np.int32)
    kv_lengths = np.array([r[1] for r in case.rows], np.int32)
    q = _random(rng, (batch, case.seq_q, num_heads, case.head_dim), case.dtype)
    kv_shape = (batch, case.kv_heads, case.seq_k, case.head_dim)
    k = _poison_cache(_random(rng, kv_shape, case.dtype), kv_lengths)
    v = _poison_cache(_random(rng, kv_shape, case.dtype), kv_lengths)
    sm_scale = case.head_dim**-0.5
    args = (q, k, v, jnp.asarray(q_offset), jnp.asarray(kv_lengths))

    start = time.perf_counter()
    got = flash_attention(
        *args, sm_scale=sm_scale, block_q=BLOCK_Q, block_k=BLOCK_K, interpret=True
    )
    got.block_until_ready()
    seconds = time.perf_counter() - start
    twin = jax.jit(flash_attention_reference, static_argnames="sm_scale")(
        *args, sm_scale=sm_scale
    )
    want = numpy_attention(q, k, v, q_offset, kv_lengths, sm_scale)

    chex.assert_shape(got, q.shape)
    chex.assert_type([got, twin], case.dtype)
    _assert_close(f"{name} twin vs float64", twin, want, case.dtype)
    _assert_close(f"{name} kernel vs float64", got, want, case.dtype)
    _assert_close(f"{name} kernel vs twin", got, _as64(twin), case.dtype)
    print(f"{name}: interpret-mode flash_attention {seconds:.1f} s (with compile)")


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    dtype: type
    kv_heads: int
    group: int
    head_dim: int
    seq_k: int
    num_splits: int
    kv_lengths: tuple[int, ...]


DECODE_CASES = {
    # Lengths: full cache, 1, mid-block, 0, a block boundary; 45 slots is not a
    # multiple of 16, and 3 splits of 3 blocks leave some splits empty for short rows.
    "f32-G1-H64": DecodeCase(jnp.float32, 3, 1, 64, 45, 3, (45, 1, 19, 0, 32)),
    "bf16-G7-H96": DecodeCase(jnp.bfloat16, 2, 7, 96, 40, 2, (1, 40, 23)),
    "f32-G4-H128": DecodeCase(jnp.float32, 2, 4, 128, 53, 4, (17, 53, 2)),
    # The Qwen2.5-0.5B shape, with more splits asked for than there are blocks.
    "bf16-G7-H64-many-splits": DecodeCase(jnp.bfloat16, 2, 7, 64, 20, 16, (20, 5)),
}


def _decode_inputs(name, case):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    batch = len(case.kv_lengths)
    kv_lengths = np.array(case.kv_lengths, np.int32)
    q = _random(rng, (batch, case.kv_heads * case.group, case.head_dim), case.dtype)
    kv_shape = (batch, case.kv_heads, case.seq_k, case.head_dim)
    k = _poison_cache(_random(rng, kv_shape, case.dtype), kv_lengths)
    v = _poison_cache(_random(rng, kv_shape, case.dtype), kv_lengths)
    return q, k, v, kv_lengths


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_attention(name):
    case = DECODE_CASES[name]
    q, k, v, kv_lengths = _decode_inputs(name, case)
    sm_scale = case.head_dim**-0.5
    kw = dict(sm_scale=sm_scale, block_k=BLOCK_K, num_splits=case.num_splits, interpret=True)

    start = time.perf_counter()
    got = decode_attention(q, k, v, jnp.asarray(kv_lengths), **kw)
    got.block_until_ready()
    seconds = time.perf_counter() - start
    twin = jax.jit(decode_attention_reference, static_argnames="sm_scale")(
        q, k, v, jnp.asarray(kv_lengths), sm_scale=sm_scale
    )
    # Decode is prefill with T = 1 at the slot kv_length - 1.
    want = numpy_attention(q[:, None], k, v, kv_lengths - 1, kv_lengths, sm_scale)[:, 0]

    chex.assert_shape(got, q.shape)
    chex.assert_type([got, twin], case.dtype)
    _assert_close(f"{name} twin vs float64", twin, want, case.dtype)
    _assert_close(f"{name} kernel vs float64", got, want, case.dtype)
    _assert_close(f"{name} kernel vs twin", got, _as64(twin), case.dtype)
    print(f"{name}: interpret-mode decode_attention {seconds:.1f} s (with compile)")


def test_decode_lengths_do_not_recompile():
    """kv_lengths is read at run time: growing the cache reuses the compiled kernel."""
    name = "bf16-G7-H96"
    case = DECODE_CASES[name]
    q, k, v, kv_lengths = _decode_inputs(name, case)
    kw = dict(sm_scale=case.head_dim**-0.5, block_k=BLOCK_K, num_splits=case.num_splits,
              interpret=True)
    decode_attention(q, k, v, jnp.asarray(kv_lengths), **kw).block_until_ready()
    compiled = decode_attention._cache_size()
    shorter = np.maximum(kv_lengths - 1, 0)
    got = decode_attention(q, k, v, jnp.asarray(shorter), **kw)
    assert decode_attention._cache_size() == compiled
    want = numpy_attention(q[:, None], k, v, shorter - 1, shorter, kw["sm_scale"])[:, 0]
    _assert_close("shorter lengths", got, want, case.dtype)


def test_one_mask_rule():
    """The model runs the attention the kernels' twins are: one function, one mask,
    and that mask is the definition (sliding window included), checked slot by slot."""
    from jaxllama.models import transformer
    from jaxllama.pallas import reference

    assert transformer.xla_attention is reference.xla_attention
    rng = np.random.default_rng(7)
    positions = rng.integers(-2, 12, (3, 5)).astype(np.int32)
    lengths = np.array([0, 7, 12], np.int32)
    for window in (None, 1, 4):
        got = np.asarray(reference.attention_mask(jnp.asarray(positions), jnp.asarray(lengths), 12, window))
        for b, t, s in np.ndindex(3, 5, 12):
            p = positions[b, t]
            want = s <= p and s < lengths[b] and (window is None or s > p - window)
            assert got[b, t, s] == want, (b, t, s, window)


def test_model_attention_with_a_window_against_float64():
    """xla_attention with a sliding window, against the float64 definition restricted
    to the window (the kernels have no window; the model's XLA path does)."""
    rng = np.random.default_rng(3)
    q = _random(rng, (2, 5, 4, 64), jnp.float32)
    k = _random(rng, (2, 2, 19, 64), jnp.float32)
    v = _random(rng, (2, 2, 19, 64), jnp.float32)
    q_offset = np.array([0, 11], np.int32)
    lengths = np.array([5, 16], np.int32)
    positions = q_offset[:, None] + np.arange(5)[None, :]
    window = 3
    from jaxllama.pallas.reference import xla_attention

    got = xla_attention(q, _poison_cache(k, lengths), _poison_cache(v, lengths), jnp.asarray(positions),
                        jnp.asarray(lengths), sm_scale=0.125, sliding_window=window)
    q64, k64, v64 = _as64(q), _as64(k), _as64(v)
    want = np.zeros(q.shape)
    for b, t, n in np.ndindex(2, 5, 4):
        p = positions[b, t]
        lo, hi = max(0, p - window + 1), min(p + 1, lengths[b])
        logits = k64[b, n // 2, lo:hi] @ q64[b, t, n] * 0.125
        w = np.exp(logits - logits.max())
        want[b, t, n] = w @ v64[b, n // 2, lo:hi] / w.sum()
    _assert_close("windowed xla_attention", got, want, jnp.float32)
