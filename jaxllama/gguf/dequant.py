"""On-device dequantization of GGUF tensors, one vectorized decoder per GGML block type.

`dequantize(raw, qtype, shape)` takes a tensor's bytes exactly as `gguf.GGUFReader` maps
them, copies them to the device once as a flat `(n_blocks, type_size)` uint8 array and
decodes every block at once in a jitted function: bit fields come out with broadcast
shifts and masks, f16 scales with `lax.bitcast_convert_type`, all arithmetic is float32
and the result is cast to the requested dtype at the end.

Block layouts follow ggml-common.h (`block_q4_0` ... `block_q6_K`) and the reference
decoders `dequantize_row_*` in ggml-quants.c; the numpy mirror in `gguf.quants` is the
oracle in the tests. Every multi-byte field is little-endian. A packed field of k bytes
holding 8/w values of w bits per byte stores element i*k + j in bits [i*w, (i+1)*w) of
byte j: all the low fields first, then the next ones. `_fields` produces that order.

One compilation per (block type, tensor shape, dtype): a model has a handful of distinct
weight shapes, so loading the real Qwen file compiles 10 small kernels (~0.1 s each on a
2-core CPU). Padding block counts to bucket sizes would save none of them there (its
shapes fall in distinct buckets anyway) and would cost padded copies. On the CPU the
kernels run close to the cost of just writing the float32 output.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from jax import lax

from jaxllama.errors import GGUFError, InvalidRequestError, UnsupportedTensorTypeError

QT = GGMLQuantizationType
QK_K = 256  # elements in a K-quant super-block

# --------------------------------------------------------------------------------------
# Byte-level helpers. `b` is always a (n_blocks, type_size) uint8 array. `le_uint`,
# `f16_at` and `k_scale_min` are public: `jaxllama.quant.formats` reads GGUF blocks with
# them too (jit-traceable, any backend).


def le_uint(b: jax.Array, offset: int, nbytes: int) -> jax.Array:
    """Bytes `offset:offset+nbytes` of every block as one little-endian unsigned int."""
    dtype = {2: jnp.uint16, 4: jnp.uint32}[nbytes]
    out = b[:, offset].astype(dtype)
    for i in range(1, nbytes):
        out = out | (b[:, offset + i].astype(dtype) << (8 * i))
    return out


def f16_at(b: jax.Array, offset: int) -> jax.Array:
    """The f16 at `offset` of every block, as float32 of shape (n_blocks, 1)."""
    half = lax.bitcast_convert_type(le_uint(b, offset, 2), jnp.float16)
    return half.astype(jnp.float32)[:, None]


def _fields(x: jax.Array, width: int) -> jax.Array:
    """Split each byte of `x` (..., k) into its 8 // width bit fields, lowest first.

    Returns (..., 8 // width, k): field j of byte i lands at [..., j, i], so flattening
    the last two axes gives GGML's element order (all low fields, then the next ones).
    """
    shifts = jnp.arange(0, 8, width, dtype=jnp.uint8)[:, None]
    return (x[..., None, :] >> shifts) & jnp.uint8((1 << width) - 1)


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


# --------------------------------------------------------------------------------------
# Decoders: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32.


def _decode_f32(b):
    return lax.bitcast_convert_type(le_uint(b, 0, 4), jnp.float32)[:, None]


def _decode_f16(b):
    return f16_at(b, 0)


def _decode_bf16(b):
    # bf16 is the top half of an f32.
    bits = le_uint(b, 0, 2).astype(jnp.uint32) << 16
    return lax.bitcast_convert_type(bits, jnp.float32)[:, None]


def _decode_q4_0(b):
    # block_q4_0: d (f16), qs[16]; x = d * (q - 8), q in [0, 15].
    q = _fields(b[:, 2:18], 4).reshape(-1, 32)
    return f16_at(b, 0) * (_f32(q) - 8.0)


def _decode_q4_1(b):
    # block_q4_1: d, m (f16), qs[16]; x = d * q + m.
    q = _fields(b[:, 4:20], 4).reshape(-1, 32)
    return f16_at(b, 0) * _f32(q) + f16_at(b, 2)


def _q5_high_bits(qh: jax.Array) -> jax.Array:
    # qh is a little-endian uint32 whose bit j is the fifth bit of element j.
    bits = (qh[:, :, None] >> jnp.arange(8, dtype=jnp.uint8)) & jnp.uint8(1)
    return bits.reshape(-1, 32)


def _decode_q5_0(b):
    # block_q5_0: d (f16), qh[4], qs[16]; x = d * (q - 16), q in [0, 31].
    q = _fields(b[:, 6:22], 4).reshape(-1, 32) | (_q5_high_bits(b[:, 2:6]) << 4)
    return f16_at(b, 0) * (_f32(q) - 16.0)


def _decode_q5_1(b):
    # block_q5_1: d, m (f16), qh[4], qs[16]; x = d * q + m.
    q = _fields(b[:, 8:24], 4).reshape(-1, 32) | (_q5_high_bits(b[:, 4:8]) << 4)
    return f16_at(b, 0) * _f32(q) + f16_at(b, 2)


def _decode_q8_0(b):
    # block_q8_0: d (f16), qs[32] (int8); x = d * q.
    q = lax.bitcast_convert_type(b[:, 2:34], jnp.int8)
    return f16_at(b, 0) * _f32(q)


def _decode_q2_k(b):
    # block_q2_K: scales[16], qs[64], d, dmin (f16). Sixteen sub-blocks of 16; byte i of
    # scales holds sub-block i's scale (low nibble) and min (high nibble).
    # x = (d * scale) * q - (dmin * min), q in [0, 3]; each 32 bytes of qs hold 128
    # elements as four 2-bit planes.
    n = b.shape[0]
    scales = b[:, 0:16]
    dl = f16_at(b, 80) * _f32(scales & 0xF)
    ml = f16_at(b, 82) * _f32(scales >> 4)
    q = _fields(b[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    return (dl[..., None] * _f32(q) - ml[..., None]).reshape(n, QK_K)


def _decode_q3_k(b):
    # block_q3_K: hmask[32], qs[64], scales[12], d (f16). Sixteen sub-blocks of 16 with
    # signed 6-bit scales: low 4 bits in the nibbles of bytes 0-7 (sub-blocks 0-7 low
    # nibbles, 8-15 high), high 2 bits in the 2-bit fields of bytes 8-11.
    # q = low 2 bits from qs minus 4 where the hmask bit is *clear*.
    n = b.shape[0]
    lo = _fields(b[:, 96:104], 4).reshape(n, 16)
    hi = _fields(b[:, 104:108], 2).reshape(n, 16)
    dl = f16_at(b, 108) * (_f32(lo | (hi << 4)) - 32.0)
    low = _fields(b[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    high = _fields(b[:, 0:32], 1).reshape(n, 16, 16)
    q = _f32(low) - 4.0 * _f32(high ^ 1)
    return (dl[..., None] * q).reshape(n, QK_K)


def k_scale_min(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unpack the 12-byte 6-bit scales/mins of Q4_K and Q5_K into two (n, 8) arrays.

    Sub-blocks 0-3 keep their scale and min in the low 6 bits of bytes 0-3 and 4-7;
    sub-blocks 4-7 take their low 4 bits from the nibbles of bytes 8-11 and their top
    2 bits from the spare top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    sc, mn, lo = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = jnp.concatenate([sc & 63, (lo & 0xF) | ((sc >> 2) & 0x30)], axis=-1)
    mins = jnp.concatenate([mn & 63, (lo >> 4) | ((mn >> 2) & 0x30)], axis=-1)
    return scale, mins


def _decode_q4_k(b):
    # block_q4_K: d, dmin (f16), scales[12], qs[128]. Eight sub-blocks of 32; each 32
    # bytes of qs hold two sub-blocks (low nibbles, then high). x = d*sc*q - dmin*m.
    n = b.shape[0]
    scale, mins = k_scale_min(b[:, 4:16])
    dl = f16_at(b, 0) * _f32(scale)
    ml = f16_at(b, 2) * _f32(mins)
    q = _fields(b[:, 16:144].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    return (dl[..., None] * _f32(q) - ml[..., None]).reshape(n, QK_K)


def _decode_q5_k(b):
    # block_q5_K: d, dmin (f16), scales[12], qh[32], qs[128]: Q4_K plus a fifth bit,
    # bit s of qh[j] belonging to element j of sub-block s.
    n = b.shape[0]
    scale, mins = k_scale_min(b[:, 4:16])
    dl = f16_at(b, 0) * _f32(scale)
    ml = f16_at(b, 2) * _f32(mins)
    low = _fields(b[:, 48:176].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    high = _fields(b[:, 16:48], 1)
    q = low | (high << 4)
    return (dl[..., None] * _f32(q) - ml[..., None]).reshape(n, QK_K)


def _decode_q6_k(b):
    # block_q6_K: ql[128], qh[64], scales[16] (int8), d (f16). Each half of 128 elements
    # takes its low nibbles from 64 bytes of ql (low then high nibbles) and its top 2
    # bits from the four 2-bit planes of 32 bytes of qh. x = d * scale * (q - 32).
    n = b.shape[0]
    low = _fields(b[:, 0:128].reshape(n, 2, 64), 4).reshape(n, 16, 16)
    high = _fields(b[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    scales = lax.bitcast_convert_type(b[:, 192:208], jnp.int8)
    dl = f16_at(b, 208) * _f32(scales)
    q = _f32(low | (high << 4)) - 32.0
    return (dl[..., None] * q).reshape(n, QK_K)


_DECODERS: dict[GGMLQuantizationType, Callable[[jax.Array], jax.Array]] = {
    QT.F32: _decode_f32,
    QT.F16: _decode_f16,
    QT.BF16: _decode_bf16,
    QT.Q4_0: _decode_q4_0,
    QT.Q4_1: _decode_q4_1,
    QT.Q5_0: _decode_q5_0,
    QT.Q5_1: _decode_q5_1,
    QT.Q8_0: _decode_q8_0,
    QT.Q2_K: _decode_q2_k,
    QT.Q3_K: _decode_q3_k,
    QT.Q4_K: _decode_q4_k,
    QT.Q5_K: _decode_q5_k,
    QT.Q6_K: _decode_q6_k,
}

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(_DECODERS)


@functools.partial(jax.jit, static_argnames=("qtype", "shape", "dtype"))
def _dequantize_blocks(blocks, *, qtype, shape, dtype):
    return _DECODERS[qtype](blocks).astype(dtype).reshape(shape)


def _type_name(qtype: object) -> str:
    return getattr(qtype, "name", str(qtype))


def dequantize(
    raw: np.ndarray,
    qtype: GGMLQuantizationType,
    shape: tuple[int, ...],
    dtype=jnp.float32,
    *,
    name: str = "<tensor>",
    device: jax.Device | None = None,
) -> jax.Array:
    """Decode one GGUF tensor into a `shape` array of `dtype` on `device` (default: the
    default device); the decode kernel runs on that device.

    `raw` is the tensor's data as `gguf.GGUFReader` maps it: uint8 block bytes for the
    quantized types and BF16, float32 / float16 arrays for F32 / F16 (any array whose
    bytes are the tensor's bytes works). `shape` is the numpy-order logical shape (GGML
    `ne` reversed). Values are computed in float32, then cast to `dtype`.

    Raises UnsupportedTensorTypeError for a type outside SUPPORTED_TYPES and GGUFError
    when the byte size of `raw` does not match `shape` and `qtype`; both name the tensor.
    """
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        pass
    if qtype not in _DECODERS:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise UnsupportedTensorTypeError(
            f"tensor {name}: type {_type_name(qtype)} is not supported; supported: {supported}"
        )
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise InvalidRequestError(
            f"tensor {name}: dequantize to {dtype} requested; expected a float dtype "
            "(float32, bfloat16 or float16)"
        )
    shape = tuple(int(d) for d in shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if (not shape and block_size > 1) or any(d < 0 for d in shape):
        raise GGUFError(f"tensor {name}: shape {shape} is not a valid {qtype.name} shape")
    if shape and shape[-1] % block_size != 0:
        raise GGUFError(
            f"tensor {name}: row length {shape[-1]} is not a multiple of the "
            f"{qtype.name} block size {block_size}"
        )
    n_blocks = math.prod(shape) // block_size
    expected = n_blocks * type_size
    raw = np.asarray(raw)
    if raw.nbytes != expected:
        raise GGUFError(
            f"tensor {name}: {qtype.name} data of shape {shape} needs {expected} bytes, "
            f"got {raw.nbytes} bytes"
        )
    if raw.dtype.byteorder == ">":  # F32/F16 of a big-endian file; blocks are LE bytes
        raw = raw.astype(raw.dtype.newbyteorder("<"))
    # A view, not a copy, of the C-contiguous memory map the reader gives.
    blocks = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(n_blocks, type_size)
    # Copy, never alias: on the CPU backend a zero-copy buffer over the memory map makes
    # the decode kernel take its page faults, which measured 2-3x slower for the real
    # files than one sequential copy; it would also pin the file's mapping.
    device_blocks = jax.device_put(blocks, device, may_alias=False)
    return _dequantize_blocks(device_blocks, qtype=qtype, shape=shape, dtype=dtype)
