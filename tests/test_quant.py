"""Quantized weights: GGUF conversion against `gguf.quants.dequantize` (the oracle), the
error bound of requantization, and `qlinear` (XLA and the Pallas kernel in interpret
mode) against float64 numpy and against the dequantize-then-multiply twin.

Random data is fresh each run; the seed is printed (replay with JAXLLAMA_TEST_SEED).
Kernel shapes are small: the Pallas interpreter costs about a second per compilation.
"""

from __future__ import annotations

import os

import chex
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from test_dequant import random_blocks, random_weights

from jaxllama.errors import GGUFError, InvalidRequestError, UnsupportedTensorTypeError
from jaxllama.pallas.quant_matmul import quant_matmul, quant_matmul_reference
from jaxllama.quant import PALLAS_MAX_ROWS, QuantizedWeight, from_gguf_blocks, qlinear, quantize

GGUF_QUANTIZABLE = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)  # gguf.quants.quantize
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)


@pytest.fixture
def rng():
    seed = int(os.environ.get("JAXLLAMA_TEST_SEED", np.random.SeedSequence().entropy % 2**63))
    print(f"JAXLLAMA_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def gguf_tensor(
    rng, qtype: QT, out: int, blocks_per_row: int, source: str
) -> tuple[np.ndarray, tuple]:
    """Raw bytes of an (out, in) tensor as GGUFReader maps them, and its logical shape.
    source "weights": gguf.quants.quantize of random floats; "bytes": every bit pattern
    of every field, with finite f16 scales."""
    block = GGML_QUANT_SIZES[qtype][0]
    shape = (out, blocks_per_row * block)
    if source == "weights":
        return gguf.quants.quantize(random_weights(rng, shape), qtype), shape
    return random_blocks(rng, qtype, shape), shape


def block_bound(w: QuantizedWeight) -> np.ndarray:
    """Half of each element's block scale, as an (out, in) array."""
    scales = np.abs(np.asarray(w.scales, np.float32))
    return np.repeat(scales, w.block, axis=1)[:, : w.shape[1]] / 2


# --------------------------------------------------------------------------------------
# GGUF blocks kept exactly.

EXACT_CASES = [
    (QT.Q8_0, "int8", "weights"), (QT.Q8_0, "int8", "bytes"),
    (QT.Q4_0, "int4", "weights"), (QT.Q4_0, "int4", "bytes"),
    (QT.Q4_1, "int4", "weights"), (QT.Q4_1, "int4", "bytes"),
    (QT.Q4_K, "int4", "bytes"),
]  # fmt: skip


@pytest.mark.parametrize("mode_is_kind", [False, True], ids=["native", "explicit"])
@pytest.mark.parametrize(
    ("qtype", "kind", "source"), EXACT_CASES, ids=lambda p: getattr(p, "name", p)
)
def test_exact_types_equal_the_gguf_decoder(qtype, kind, source, mode_is_kind, rng):
    raw, shape = gguf_tensor(rng, qtype, 5, 3 if qtype == QT.Q4_K else 7, source)
    w = from_gguf_blocks(raw, qtype, shape, kind if mode_is_kind else "native")
    assert w.kind == kind and w.shape == shape
    w.check()
    got = np.asarray(w.dequantize(jnp.float32))
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype))


def test_q8_0_keeps_codes_and_float16_scales_bit_for_bit(rng):
    raw, shape = gguf_tensor(rng, QT.Q8_0, 4, 6, "bytes")
    w = from_gguf_blocks(raw, QT.Q8_0, shape, "int8")
    blocks = raw.reshape(-1, 34)
    np.testing.assert_array_equal(np.asarray(w.q).reshape(-1, 32), blocks[:, 2:].view(np.int8))
    np.testing.assert_array_equal(
        np.asarray(w.scales).view(np.uint16).reshape(-1), blocks[:, :2].copy().view(np.uint16)[:, 0]
    )
    assert w.mins is None and w.scales.dtype == jnp.float16


def test_int4_packing_is_element_i_low_and_i_plus_16_high():
    # One block whose codes are known: min 0, max 15, so scale 1 and code = value.
    codes = np.array([(7 * i + 3) % 16 for i in range(32)], np.float32)
    codes[0], codes[1] = 0.0, 15.0
    w = quantize(codes[None, :], "int4")
    expected = codes[:16].astype(np.uint8) | (codes[16:].astype(np.uint8) << 4)
    np.testing.assert_array_equal(np.asarray(w.q)[0], expected)
    np.testing.assert_array_equal(np.asarray(w.scales), [[1.0]])
    np.testing.assert_array_equal(np.asarray(w.mins), [[0.0]])


# --------------------------------------------------------------------------------------
# Requantized types: within half a block scale of the oracle's values.

REQUANT_CASES = [
    (QT.Q5_0, "native", "int8"), (QT.Q5_1, "native", "int8"), (QT.Q2_K, "native", "int8"),
    (QT.Q3_K, "native", "int8"), (QT.Q5_K, "native", "int8"), (QT.Q6_K, "native", "int8"),
    (QT.Q4_0, "int8", "int8"), (QT.Q4_K, "int8", "int8"), (QT.Q6_K, "int4", "int4"),
    (QT.Q8_0, "int4", "int4"), (QT.Q5_1, "int4", "int4"),
    (QT.F32, "int8", "int8"), (QT.F16, "int8", "int8"), (QT.BF16, "int8", "int8"),
    (QT.F32, "int4", "int4"), (QT.BF16, "int4", "int4"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("qtype", "mode", "kind"), REQUANT_CASES, ids=lambda p: getattr(p, "name", p)
)
def test_requantized_types_are_within_half_a_scale(qtype, mode, kind, rng):
    if qtype in FLOAT_TYPES:
        # 70 and 45 columns: neither a multiple of 32, so the padding is exercised.
        shape = (3, 70) if kind == "int8" else (4, 45)
        raw = gguf.quants.quantize(random_weights(rng, shape), qtype)
    else:
        source = "weights" if qtype in GGUF_QUANTIZABLE else "bytes"
        raw, shape = gguf_tensor(
            rng, qtype, 3, 2 if GGML_QUANT_SIZES[qtype][0] == 256 else 5, source
        )
    ref = gguf.quants.dequantize(raw, qtype).astype(np.float32)
    w = from_gguf_blocks(raw, qtype, shape, mode)
    assert w.kind == kind and w.shape == shape
    w.check()
    got = np.asarray(w.dequantize(jnp.float32))
    err = np.abs(got - ref)
    # int4's code * scale + min rounds once more, in float32.
    slack = 0.0 if kind == "int8" else 4 * np.finfo(np.float32).eps * (np.abs(ref) + block_bound(w))
    assert np.all(err <= block_bound(w) + slack), f"worst excess {np.max(err - block_bound(w))}"
    # ... and not vacuously: the scales are those of the data (absmax / 127, range / 15).
    blocks = np.pad(ref, ((0, 0), (0, w.in_padded - shape[1])), constant_values=np.nan)
    blocks = blocks.reshape(shape[0], -1, 32)
    if kind == "int8":
        ideal = np.nanmax(np.abs(blocks), axis=-1) / 127
    else:
        ideal = (np.nanmax(blocks, axis=-1) - np.nanmin(blocks, axis=-1)) / 15
    np.testing.assert_allclose(np.asarray(w.scales, np.float32), ideal, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_native_mode_leaves_float_types_dense(qtype, rng):
    raw = gguf.quants.quantize(random_weights(rng, (2, 40)), qtype)
    assert from_gguf_blocks(raw, qtype, (2, 40), "native") is None


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantize_zero_constant_and_tiny_blocks(kind, rng):
    w = np.zeros((4, 64), np.float32)
    w[1] = 0.75  # constant blocks: int4 keeps them exactly (scale 0, min 0.75)
    w[2] = rng.standard_normal(64) * 1e-6  # float16 scales are subnormal here (int8)
    w[3, :32] = -3.0
    q = quantize(w, kind).check()
    got = np.asarray(q.dequantize())
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[0], 0.0)
    assert np.all(np.abs(got - w) <= block_bound(q) * (1 + 1e-6) + 1e-12)
    if kind == "int4":
        np.testing.assert_array_equal(got[1], w[1])


# --------------------------------------------------------------------------------------
# qlinear and the kernel.


def assert_close_to_twin(got, want, x, w: QuantizedWeight):
    """Equal up to the order of float32 sums: |got - want| <= 2 K eps32 (|x| @ |w|^T)."""
    dense = np.abs(np.asarray(w.dequantize(x.dtype), np.float64))
    scale = np.abs(np.asarray(x, np.float64)) @ dense.T
    bound = 2 * w.in_padded * np.finfo(np.float32).eps * scale + 1e-30
    excess = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)) - bound
    assert np.all(excess <= 0), f"worst excess {excess.max()} over the bound"


# (leading dims of x, out, in, kind, dtype): out not a multiple of the kernel's 32-column
# tile; in not a multiple of 32 (70, 45), of 64 (96) or of 256 (288). M = 40 is past
# PALLAS_MAX_ROWS (XLA runs). Each kernel case is one interpreter compilation (~1-2 s),
# so every kind meets every dtype at two M's rather than at all of them.
F32, BF16 = jnp.float32, jnp.bfloat16
MATMUL_CASES = [
    ((1,), 50, 70, "int8", F32), ((1,), 50, 70, "int4", BF16),
    ((3,), 33, 288, "int4", F32), ((3,), 33, 288, "int8", BF16),
    ((16,), 40, 96, "int8", F32), ((16,), 40, 96, "int4", BF16),
    ((2, 3), 24, 45, "int4", F32), ((2, 3), 24, 45, "int8", BF16),
    ((40,), 20, 40, "int8", F32), ((40,), 20, 40, "int4", BF16),
    ((40,), 20, 40, "int4", F32), ((40,), 20, 40, "int8", BF16),
]  # fmt: skip


@pytest.mark.parametrize(
    ("lead", "out", "in_", "kind", "dtype"),
    MATMUL_CASES,
    ids=lambda p: getattr(p, "__name__", str(p)),
)
def test_qlinear_matches_float64_and_the_kernel_matches_the_twin(lead, out, in_, kind, dtype, rng):
    w = quantize(random_weights(rng, (out, in_)), kind)
    x = jnp.asarray(rng.standard_normal((*lead, in_)), dtype)
    want = quant_matmul_reference(x, w)
    xla = qlinear(x, w, impl="xla")
    chex.assert_shape(xla, (*lead, out))
    chex.assert_type(xla, jnp.float32)
    # The XLA path against numpy in float64 on the same dequantized weights.
    dense64 = np.asarray(w.dequantize(dtype), np.float64)
    assert_close_to_twin(xla, np.asarray(x, np.float64) @ dense64.T, x, w)
    got = qlinear(x, w, impl="pallas_interpret")
    chex.assert_shape(got, (*lead, out))
    chex.assert_type(got, jnp.float32)
    assert_close_to_twin(got, want, x, w)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_kernel_split_k_and_small_tiles(kind, rng):
    # 320 padded columns in 32-wide steps: 10 steps over 3 splits (4, 4, 2); 16-column
    # tiles over 50 outputs (the last one clamped).
    w = quantize(random_weights(rng, (50, 300)), kind)
    x = jnp.asarray(rng.standard_normal((5, 300)), jnp.bfloat16)
    got = quant_matmul(x, w, block_n=16, block_k=32, num_splits=3, interpret=True)
    assert_close_to_twin(got, quant_matmul_reference(x, w), x, w)


def test_exact_gguf_weights_through_the_kernel(rng):
    raw, shape = gguf_tensor(rng, QT.Q4_K, 20, 1, "bytes")
    w = from_gguf_blocks(raw, QT.Q4_K, shape, "native")
    x = jnp.asarray(rng.standard_normal((2, shape[1])), jnp.float32)
    got = qlinear(x, w, impl="pallas_interpret")
    ref = np.asarray(x, np.float64) @ gguf.quants.dequantize(raw, QT.Q4_K).astype(np.float64).T
    assert_close_to_twin(got, ref, x, w)


def _uses_kernel(x, w, impl) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(lambda x: qlinear(x, w, impl=impl))(x))


def test_kernel_runs_only_for_few_rows(rng):
    w = quantize(random_weights(rng, (24, 64)), "int8")
    for rows, expected in ((1, True), (PALLAS_MAX_ROWS, True), (PALLAS_MAX_ROWS + 1, False)):
        x = jnp.zeros((rows, 64), jnp.bfloat16)
        assert _uses_kernel(x, w, "pallas_interpret") is expected, rows
        assert not _uses_kernel(x, w, "xla")
    assert not _uses_kernel(jnp.zeros((0, 64)), w, "pallas_interpret")  # no rows: XLA


def test_quantized_weight_is_a_pytree_through_jit(rng):
    w8 = quantize(random_weights(rng, (24, 64)), "int8")
    w4 = quantize(random_weights(rng, (24, 64)), "int4")
    assert len(jax.tree.leaves(w8)) == 2 and len(jax.tree.leaves(w4)) == 3
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    for w in (w8, w4):
        eager = qlinear(x, w)
        jitted = jax.jit(qlinear, static_argnames="impl")(x, w)
        np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)


def test_dense_weight_is_a_plain_matmul(rng):
    w = random_weights(rng, (10, 33))
    x = rng.standard_normal((2, 33)).astype(np.float32)
    got = qlinear(jnp.asarray(x), jnp.asarray(w), impl="pallas_interpret")
    np.testing.assert_allclose(np.asarray(got), x @ w.T, rtol=1e-5, atol=1e-5 * np.abs(w).max())


# --------------------------------------------------------------------------------------
# Sizes.


def test_nbytes_int8_is_about_half_of_bf16_and_int4_about_a_fifth_more_than_a_quarter(rng):
    out, in_ = 896, 4864  # Qwen2.5-0.5B's ffn_down
    w = rng.standard_normal((out, in_), np.float32)
    bf16_bytes = out * in_ * 2
    w8, w4 = quantize(w, "int8"), quantize(w, "int4")
    for q in (w8, w4):
        assert q.nbytes == sum(leaf.nbytes for leaf in jax.tree.leaves(q))
    assert w8.nbytes == out * in_ + out * in_ // 32 * 2  # codes + float16 scales
    assert w4.nbytes == out * in_ // 2 + out * in_ // 32 * 8  # codes + float32 scales, mins
    assert 0.5 < w8.nbytes / bf16_bytes < 0.55
    assert 0.35 < w4.nbytes / bf16_bytes < 0.4


# --------------------------------------------------------------------------------------
# Bad input.


def test_unknown_mode_and_kind_are_refused(rng):
    raw, shape = gguf_tensor(rng, QT.Q8_0, 2, 1, "weights")
    with pytest.raises(InvalidRequestError, match=r"tensor blk\.0\.attn_q\.weight: mode 'int3'"):
        from_gguf_blocks(raw, QT.Q8_0, shape, "int3", name="blk.0.attn_q.weight")
    with pytest.raises(InvalidRequestError, match="kind 'int2'"):
        quantize(np.ones((2, 32), np.float32), "int2")


@pytest.mark.parametrize(
    ("qtype", "mode"), [(QT.Q8_0, "native"), (QT.Q4_K, "int4"), (QT.Q6_K, "native")]
)
def test_byte_count_that_does_not_match_the_shape(qtype, mode, rng):
    raw, shape = gguf_tensor(rng, qtype, 3, 2, "bytes")
    expected = raw.nbytes
    with pytest.raises(GGUFError) as info:
        from_gguf_blocks(raw.reshape(-1)[:-1], qtype, shape, mode, name="blk.7.ffn_up.weight")
    message = str(info.value)
    assert "blk.7.ffn_up.weight" in message
    assert f"needs {expected} bytes" in message and f"got {expected - 1} bytes" in message
    with pytest.raises(GGUFError, match="needs"):
        from_gguf_blocks(raw, qtype, (shape[0] + 1, shape[1]), mode)


def test_unsupported_type_and_shape(rng):
    with pytest.raises(UnsupportedTensorTypeError, match="IQ2_XS is not supported"):
        from_gguf_blocks(np.zeros(66, np.uint8), QT.IQ2_XS, (1, 256), "int8", name="w")
    with pytest.raises(InvalidRequestError, match=r"shape \(2, 3, 32\)"):
        from_gguf_blocks(np.zeros(6 * 34, np.uint8), QT.Q8_0, (2, 3, 32), "int8")
    with pytest.raises(GGUFError, match="row length 48 is not a multiple"):
        from_gguf_blocks(np.zeros(68, np.uint8), QT.Q4_0, (2, 48), "int4")


def test_quantize_refuses_what_it_cannot_hold():
    with pytest.raises(InvalidRequestError, match="inf or NaN"):
        quantize(np.array([[1.0, np.nan] + [0.0] * 30], np.float32), "int4", name="w")
    with pytest.raises(InvalidRequestError, match="float16 scales"):
        quantize(np.full((1, 32), 1e7, np.float32), "int8")
    with pytest.raises(InvalidRequestError, match="2-D float"):
        quantize(np.ones((2, 3, 32), np.float32), "int8")


def test_qlinear_refuses_bad_calls(rng):
    w = quantize(random_weights(rng, (8, 40)), "int8")
    with pytest.raises(
        InvalidRequestError, match=r"x has shape \(2, 41\); expected \(\.\.\., 40\)"
    ):
        qlinear(jnp.zeros((2, 41)), w)
    with pytest.raises(InvalidRequestError, match="impl 'cuda'"):
        qlinear(jnp.zeros((2, 40)), w, impl="cuda")
    if jax.default_backend() != "gpu":
        with pytest.raises(InvalidRequestError, match="needs a GPU"):
            qlinear(jnp.zeros((2, 40)), w, impl="pallas")
    bad = QuantizedWeight(
        q=w.q, scales=w.scales.astype(jnp.float32), mins=None, kind="int8", shape=w.shape
    )
    with pytest.raises(InvalidRequestError, match="scales is float32"):
        quant_matmul(jnp.zeros((2, 40)), bad, interpret=True)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 4, 5, 33])
def test_cpu_chunks_and_row_matvecs_match_float64(kind, rows, rng, monkeypatch):
    """The CPU path's two forms (per-row fused matvec for int8 up to 4 rows; chunks of
    w's rows otherwise), with chunks of 7 rows over 50 outputs: 7 full chunks and a
    remainder of 1, and an in dim (70) that is padded."""
    from jaxllama.quant import matmul

    w = quantize(random_weights(rng, (50, 70)), kind)
    monkeypatch.setattr(matmul, "CPU_CHUNK_BYTES", 4 * w.in_padded * 7)
    x = jnp.asarray(rng.standard_normal((rows, 70)), jnp.float32)
    got = jax.jit(matmul.cpu_qlinear)(x, w)
    chex.assert_shape(got, (rows, 50))
    dense64 = np.asarray(w.dequantize(jnp.float32), np.float64)
    assert_close_to_twin(got, np.asarray(x, np.float64) @ dense64.T, x, w)


@pytest.mark.parametrize("rows", [1, 3])
def test_cpu_matvec_split_over_columns_matches_float64(rows, rng):
    """int8 rows longer than `CPU_MATVEC_MAX_COLS`: the fused matvec is split into
    column parts of whole blocks and summed. 4150 columns are padded to 130 blocks,
    cut into parts of 43, 43 and 44 blocks."""
    from jaxllama.quant import matmul

    assert matmul.CPU_MATVEC_MAX_COLS < 4150 <= 3 * matmul.CPU_MATVEC_MAX_COLS
    w = quantize(random_weights(rng, (40, 4150)), "int8")
    x = jnp.asarray(rng.standard_normal((rows, 4150)), jnp.float32)
    got = jax.jit(matmul.cpu_qlinear)(x, w)
    chex.assert_shape(got, (rows, 40))
    dense64 = np.asarray(w.dequantize(jnp.float32), np.float64)
    assert_close_to_twin(got, np.asarray(x, np.float64) @ dense64.T, x, w)
