"""On-device dequantization against `gguf.quants.dequantize`, the numpy oracle.

Every supported block type is checked on fresh random data (the seed is printed, so a
failure can be replayed with JAXLLAMA_TEST_SEED=<seed>), on shapes whose block counts are
not powers of two, through the same arrays `gguf.GGUFReader` hands out, and (slow) on
every tensor of the two real files.
"""

from __future__ import annotations

import os
import time

import chex
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from jaxllama.errors import GGUFError, InvalidRequestError, UnsupportedTensorTypeError
from jaxllama.gguf.dequant import SUPPORTED_TYPES, dequantize
from jaxllama.gguf.reader import read_gguf

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
# Types gguf.quants can quantize (the K-quants it only dequantizes).
QUANTIZABLE = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)
# Byte offsets of the f16 scale fields in each block (ggml-common.h: block_q4_0 ...).
# Random bytes there could be inf/NaN; the tests put finite scales in them instead.
F16_FIELDS = {
    QT.Q4_0: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0,),
    QT.Q5_1: (0, 2),
    QT.Q8_0: (0,),
    QT.Q2_K: (80, 82),
    QT.Q3_K: (108,),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
}
# Shapes in blocks along the last axis: 1-D, several rows, 3-D; block counts chosen not
# to be powers of two. Few and shared by the tests: every (type, shape, dtype) is one jit
# compilation, and those dominate this file's runtime.
BLOCK_SHAPES = ((7,), (3, 5), (2, 3, 3))


@pytest.fixture
def rng():
    seed = int(os.environ.get("JAXLLAMA_TEST_SEED", np.random.SeedSequence().entropy % 2**63))
    print(f"JAXLLAMA_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def logical_shape(blocks: tuple[int, ...], qtype: QT) -> tuple[int, ...]:
    block_size = GGML_QUANT_SIZES[qtype][0]
    # Float types have 1-element "blocks"; give their rows a realistic length.
    per_block = block_size if block_size > 1 else 37
    return (*blocks[:-1], blocks[-1] * per_block)


def random_f16(rng, n: int) -> np.ndarray:
    """Finite f16 scales across the whole range used in practice, subnormals and 0 too."""
    magnitude = np.exp2(rng.uniform(-20.0, 2.0, n))
    values = rng.choice([-1.0, 1.0], n) * magnitude
    values[rng.random(n) < 0.05] = 0.0
    return values.astype(np.float16)


def random_blocks(rng, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    """Uniformly random block bytes (every bit pattern of every field) with finite scales,
    in the byte layout GGUFReader gives: (*shape[:-1], bytes per row)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        blocks[:, offset : offset + 2] = random_f16(rng, n_blocks).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*shape[:-1], -1)


def random_weights(rng, shape: tuple[int, ...]) -> np.ndarray:
    scale = np.exp2(rng.uniform(-8, 4))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def assert_matches_reference(out: jax.Array, raw: np.ndarray, qtype: QT, label: str = ""):
    ref = gguf.quants.dequantize(raw, qtype)
    chex.assert_shape(out, ref.shape)
    chex.assert_type(out, jnp.float32)
    out = np.asarray(out)
    if qtype in FLOAT_TYPES:
        np.testing.assert_array_equal(out, ref, err_msg=label)
    else:
        # Only float32 rounding may differ (e.g. a fused multiply-add for d * q + m).
        atol = 1e-6 * float(np.max(np.abs(ref), initial=0.0))
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=atol, err_msg=label)


def test_supported_types_as_specified():
    assert SUPPORTED_TYPES == (
        QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
        QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
    )  # fmt: skip


@pytest.mark.parametrize("blocks", BLOCK_SHAPES, ids=str)
@pytest.mark.parametrize("qtype", FLOAT_TYPES + QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_weights_match_reference(qtype, blocks, rng):
    shape = logical_shape(blocks, qtype)
    raw = gguf.quants.quantize(random_weights(rng, shape), qtype)
    out = dequantize(raw, qtype, shape)
    assert_matches_reference(out, raw, qtype)


@pytest.mark.parametrize("blocks", BLOCK_SHAPES, ids=str)
@pytest.mark.parametrize("qtype", tuple(F16_FIELDS), ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype, blocks, rng):
    shape = logical_shape(blocks, qtype)
    raw = random_blocks(rng, qtype, shape)
    assert_matches_reference(dequantize(raw, qtype, shape), raw, qtype)


def test_float_special_values_are_bit_exact():
    f16 = np.array([0.0, -0.0, 6e-8, -6.1e-5, 65504.0, -np.inf, np.inf, 1 / 3], np.float16)
    f32 = np.array([0.0, -0.0, 1e-40, -1.2e-38, 3.4e38, -np.inf, np.inf, 1 / 3], np.float32)
    bf16 = gguf.quants.quantize(f32, QT.BF16)
    for raw, qtype in ((f16, QT.F16), (f32, QT.F32), (bf16, QT.BF16)):
        out = np.asarray(dequantize(raw, qtype, (8,)))
        ref = gguf.quants.dequantize(raw, qtype)
        np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32), err_msg=qtype.name)


@pytest.mark.parametrize(
    ("qtype", "dtype"),
    [(t, jnp.bfloat16) for t in SUPPORTED_TYPES]
    + [(t, jnp.float16) for t in (QT.F32, QT.BF16, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q6_K)],
    ids=lambda p: getattr(p, "name", getattr(p, "__name__", None)),
)
def test_narrow_dtypes_are_the_float32_result_cast(qtype, dtype, rng):
    shape = logical_shape((3, 5), qtype)
    if qtype in FLOAT_TYPES:
        raw = gguf.quants.quantize(random_weights(rng, shape), qtype)
    else:
        raw = random_blocks(rng, qtype, shape)
    wide = dequantize(raw, qtype, shape)
    narrow = dequantize(raw, qtype, shape, dtype)
    chex.assert_type(narrow, dtype)
    chex.assert_shape(narrow, shape)
    np.testing.assert_array_equal(np.asarray(narrow), np.asarray(wide.astype(dtype)))


def test_result_is_on_the_default_device():
    out = dequantize(np.zeros((2, 34), np.uint8), QT.Q8_0, (2, 32))
    assert out.devices() == {jax.devices()[0]}


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_tensors_as_the_reader_presents_them(qtype, rng, tmp_path):
    """Written with GGUFWriter and mapped back by GGUFReader: F32/F16 come back as
    float arrays, BF16 and the block types as uint8 rows of bytes."""
    shape = logical_shape((3, 5), qtype)
    if qtype in FLOAT_TYPES or qtype in QUANTIZABLE:
        data = gguf.quants.quantize(random_weights(rng, shape), qtype)
    else:
        data = random_blocks(rng, qtype, shape)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    if qtype in (QT.F32, QT.F16):
        writer.add_tensor("blk.0.w", data)
    else:
        writer.add_tensor("blk.0.w", data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(path).tensors
    assert tensor.tensor_type == qtype
    read_shape = tuple(reversed(tensor.shape.tolist()))
    assert read_shape == shape
    out = dequantize(tensor.data, tensor.tensor_type, read_shape, name=tensor.name)
    assert_matches_reference(out, tensor.data, qtype)
    np.testing.assert_array_equal(np.asarray(out), gguf.quants.dequantize(data, qtype))


@pytest.mark.parametrize(
    "qtype", [QT.IQ2_XS, QT.IQ4_NL, QT.TQ1_0, QT.TQ2_0, QT.MXFP4, QT.Q8_1, QT.Q8_K, QT.I8],
    ids=lambda t: t.name,
)
def test_unsupported_type_names_tensor_and_type(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros((2, type_size), np.uint8)
    with pytest.raises(UnsupportedTensorTypeError) as info:
        dequantize(raw, qtype, (2, block_size), name="blk.3.attn_q.weight")
    message = str(info.value)
    assert message.startswith(f"tensor blk.3.attn_q.weight: type {qtype.name} is not supported;")
    assert "supported: F32, F16, BF16, Q4_0" in message
    assert isinstance(info.value, GGUFError)


@pytest.mark.parametrize("delta", [-1, 1, 34])
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.F16], ids=lambda t: t.name)
def test_wrong_byte_size_names_tensor_and_sizes(qtype, delta):
    shape = logical_shape((2, 3), qtype)
    expected = int(np.prod(shape)) // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1]
    raw = np.zeros(expected + delta, np.uint8)
    with pytest.raises(GGUFError) as info:
        dequantize(raw, qtype, shape, name="blk.7.ffn_up.weight")
    message = str(info.value)
    assert "blk.7.ffn_up.weight" in message
    assert f"needs {expected} bytes" in message and f"got {expected + delta} bytes" in message
    assert not isinstance(info.value, UnsupportedTensorTypeError)


def test_integer_output_dtype_is_refused():
    with pytest.raises(InvalidRequestError, match="output.weight"):
        dequantize(np.zeros(34, np.uint8), QT.Q8_0, (32,), jnp.int8, name="output.weight")


def test_row_not_a_whole_number_of_blocks():
    with pytest.raises(GGUFError, match=r"tensor token_embd\.weight: row length 48 .* 32"):
        dequantize(np.zeros(68, np.uint8), QT.Q8_0, (1, 48), name="token_embd.weight")


# --------------------------------------------------------------------------------------
# Real files.

# Rows compared per tensor with more rows than this; the numpy oracle is the slow part.
MAX_ROWS_CHECKED = 256


def check_real_file(path, expected_types: dict[str, int]) -> None:
    # The library's reader, not GGUFReader: it maps the same arrays (tests/test_reader.py
    # checks that) without GGUFReader's ~20 s of vocabulary parsing on the Qwen file.
    started = time.perf_counter()
    gguf_file = read_gguf(path)
    read_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    dequant_s = 0.0
    seen: dict[str, int] = {}
    for tensor in gguf_file.tensors.values():
        t0 = time.perf_counter()
        out = dequantize(tensor.data, tensor.qtype, tensor.shape, name=tensor.name)
        out.block_until_ready()
        dequant_s += time.perf_counter() - t0
        seen[tensor.qtype.name] = seen.get(tensor.qtype.name, 0) + 1
        raw, got = tensor.data, np.asarray(out)
        if len(tensor.shape) > 1 and tensor.shape[0] > MAX_ROWS_CHECKED:
            # Both ends plus random rows in between.
            n_rows = tensor.shape[0]
            middle = rng.choice(np.arange(1, n_rows - 1), MAX_ROWS_CHECKED - 2, replace=False)
            rows = np.sort(np.concatenate([[0, n_rows - 1], middle]))
            raw, got = raw[rows], got[rows]
        ref = gguf.quants.dequantize(np.asarray(raw), tensor.qtype)
        chex.assert_shape(got, ref.shape)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12, err_msg=tensor.name)
    assert seen == expected_types
    print(
        f"\n{path.name}: {len(gguf_file.tensors)} tensors {seen}; header {read_s:.2f} s, "
        f"dequantize all to float32 {dequant_s:.2f} s"
    )


@pytest.mark.slow
def test_every_tensor_of_smollm2(smollm2_path):
    check_real_file(smollm2_path, {"F32": 61, "Q4_1": 210, "Q8_0": 1})


@pytest.mark.slow
def test_every_tensor_of_qwen(qwen_path):
    check_real_file(
        qwen_path, {"F32": 121, "Q5_0": 133, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12}
    )
