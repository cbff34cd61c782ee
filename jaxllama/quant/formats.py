"""Quantized weights on the device: the `QuantizedWeight` leaf, GGUF block conversion,
and quantization of dense float weights.

A `QuantizedWeight` stands for a dense weight ``w`` of logical shape (out, in) in the
PyTorch/GGUF layout (the forward computes ``x @ w.T``). The in axis is cut into blocks
of ``block = 32`` elements, each with its own scale (and min, for int4); ``in`` is padded
with zero columns up to ``in_padded``, a multiple of 32.

Layouts (``nb = in_padded // 32``)
---------------------------------
int8 (symmetric): ``value = q * scale``
  q       int8    (out, in_padded); padding columns hold code 0.
  scales  float16 (out, nb)
  mins    None
  float16 scales because Q8_0 stores its scale as float16, so Q8_0 maps on exactly,
  and they cost 2 bytes per 32 weights (1.0625 bytes a weight) where float32 would
  cost 4 (1.125): 6% more bytes for every bandwidth-bound decode step.

int4 (asymmetric): ``value = code * scale + min``, code in [0, 15]
  q       uint8   (out, in_padded // 2), two codes a byte.
  scales  float32 (out, nb)
  mins    float32 (out, nb)
  Packing, the one of GGML's Q4_0/Q4_1: in each block of 32 elements, byte i (0..15)
  holds element i in its low nibble and element i + 16 in its high nibble. So a tile
  splits into two contiguous (rows, 16k) halves with one AND and one shift (no
  interleaving in registers): ``q & 15`` are the first 16 elements of every block,
  ``q >> 4`` the last 16. The kernel multiplies each half by the matching columns of x.
  float32 scales and mins because Q4_K's per-32 scale ``d * sc`` (f16 times a 6-bit
  integer) needs up to 17 significant bits, more than float16 or bfloat16 hold, and
  Q4_0's min ``-8 d`` overflows float16 for |d| > 8188; in float32 both are exact, so
  Q4_0, Q4_1 and Q4_K decode bit for bit as GGML's own decoders do. The price is 0.75
  bytes a weight instead of 0.625 with float16.

GGUF types map onto these layouts as follows (``from_gguf_blocks``):

  ======================  =========================  ==========================  ===========
  GGUF type               mode "native"              mode "int8"                 mode "int4"
  ======================  =========================  ==========================  ===========
  Q8_0                    int8, exact                int8, exact                 int4 (requantized)
  Q4_0, Q4_1, Q4_K        int4, exact                int8 (requantized)          int4, exact
  Q5_0, Q5_1, Q2_K,       int8 (requantized)         int8 (requantized)          int4 (requantized)
  Q3_K, Q5_K, Q6_K
  F32, F16, BF16          None (caller keeps dense)  int8 (requantized)          int4 (requantized)
  ======================  =========================  ==========================  ===========

"Exact" means the values equal `gguf.quants.dequantize` of the same bytes: Q8_0 keeps
its codes and f16 scale; Q4_0 (``d (c - 8)``) becomes scale ``d``, min ``-8 d``; Q4_1
(``d c + m``) scale ``d``, min ``m``; Q4_K (``d sc c - dmin m`` per 32-element
sub-block) scale ``d sc``, min ``-dmin m``. Every product there is exact in float32, so
``code * scale + min`` rounds once, as GGML's float32 decoders do.

"Requantized": the tensor is decoded to float32 by `jaxllama.gguf.dequant.dequantize`
and quantized again by `quantize`: int8 per-32 symmetric absmax, int4 per-32 min/max;
the error of each element is at most half its block's (stored) scale.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from jax import lax

from jaxllama.errors import GGUFError, InvalidRequestError, UnsupportedTensorTypeError
from jaxllama.gguf.dequant import SUPPORTED_TYPES, f16_at, k_scale_min, le_uint
from jaxllama.gguf.dequant import dequantize as dequantize_gguf

QT = GGMLQuantizationType
Kind = Literal["int8", "int4"]
Mode = Literal["int8", "int4", "native"]

KINDS: tuple[str, ...] = ("int8", "int4")
MODES: tuple[str, ...] = ("int8", "int4", "native")
BLOCK = 32  # elements per scale (and min); GGML's QK4_0 / QK8_0 and Q4_K's sub-block
INT8_SCALE_DTYPE = jnp.float16  # see "Layouts" above
INT4_SCALE_DTYPE = jnp.float32
INT8_MAX = 127  # symmetric codes in [-127, 127], as GGML's Q8_0 (never -128)
INT4_MAX = 15

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
# GGUF types kept bit for bit, per target kind.
EXACT_TYPES: dict[str, tuple[GGMLQuantizationType, ...]] = {
    "int8": (QT.Q8_0,),
    "int4": (QT.Q4_0, QT.Q4_1, QT.Q4_K),
}


@struct.dataclass
class QuantizedWeight:
    """A dense (out, in) weight held as per-32-block integer codes; a pytree.

    Children (arrays): ``q``, ``scales``, ``mins`` (None for int8). Static (part of the
    tree structure, so a jitted function recompiles per kind/shape): ``kind``
    ("int8" or "int4"), ``shape`` (out, in), ``block`` (32). The layouts are in the
    module docstring. Build one with `quantize` or `from_gguf_blocks`; ``check()``
    verifies a hand-made one.
    """

    q: jax.Array
    scales: jax.Array
    mins: jax.Array | None
    kind: str = struct.field(pytree_node=False)
    shape: tuple[int, int] = struct.field(pytree_node=False)
    block: int = struct.field(pytree_node=False, default=BLOCK)

    @property
    def in_padded(self) -> int:
        """The in dim rounded up to a multiple of ``block``: columns of the codes."""
        return _round_up(self.shape[1], self.block)

    @property
    def nbytes(self) -> int:
        """Bytes held on the device by q, scales and mins."""
        leaves = (self.q, self.scales, self.mins)
        return sum(
            math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves if a is not None
        )

    def check(self) -> QuantizedWeight:
        """Raise InvalidRequestError unless the fields follow the layout; return self."""
        out, in_ = self.shape
        nb = self.in_padded // self.block
        expected = {
            "int8": {
                "q": ((out, nb * self.block), jnp.int8),
                "scales": ((out, nb), INT8_SCALE_DTYPE),
            },
            "int4": {
                "q": ((out, nb * self.block // 2), jnp.uint8),
                "scales": ((out, nb), INT4_SCALE_DTYPE),
                "mins": ((out, nb), INT4_SCALE_DTYPE),
            },
        }.get(self.kind)
        if expected is None:
            raise InvalidRequestError(
                f"QuantizedWeight: kind {self.kind!r}; expected one of {KINDS}"
            )
        if self.block != BLOCK:
            raise InvalidRequestError(f"QuantizedWeight: block {self.block}; expected {BLOCK}")
        if self.kind == "int8" and self.mins is not None:
            raise InvalidRequestError("QuantizedWeight: int8 is symmetric; mins must be None")
        for field, (shape, dtype) in expected.items():
            a = getattr(self, field)
            if a is None or tuple(a.shape) != shape or a.dtype != dtype:
                got = None if a is None else f"{a.dtype}{list(a.shape)}"
                raise InvalidRequestError(
                    f"QuantizedWeight {self.kind} of shape {self.shape}: {field} is {got}; "
                    f"expected {jnp.dtype(dtype).name}{list(shape)}"
                )
        return self

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The dense (out, in) weight in ``dtype``: computed in float32, then cast."""
        return _dequantize(self).astype(dtype)

    def slice_columns(self, start: int, stop: int) -> QuantizedWeight:
        """Input columns [start, stop) as a QuantizedWeight; both on block boundaries
        (or `stop` the in dim)."""
        if start % self.block or (stop % self.block and stop != self.shape[1]):
            raise InvalidRequestError(
                f"QuantizedWeight.slice_columns({start}, {stop}): expected multiples of {self.block}"
            )
        b0, b1 = start // self.block, -(-stop // self.block)
        per = self.block if self.kind == "int8" else self.block // 2  # code columns per block
        return QuantizedWeight(
            q=self.q[:, b0 * per: b1 * per], scales=self.scales[:, b0:b1],
            mins=None if self.mins is None else self.mins[:, b0:b1],
            kind=self.kind, shape=(self.shape[0], stop - start), block=self.block,
        )

    def take_rows(self, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
        """Rows ``ids`` (int array of any shape) of the dense weight, (*ids.shape, in):
        an embedding lookup that dequantizes only the rows it gathers."""
        flat = jnp.reshape(ids, (-1,))
        part = QuantizedWeight(
            q=self.q[flat], scales=self.scales[flat],
            mins=None if self.mins is None else self.mins[flat],
            kind=self.kind, shape=(flat.shape[0], self.shape[1]), block=self.block,
        )
        return _dequantize(part).astype(dtype).reshape(*jnp.shape(ids), self.shape[1])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _dequantize(w: QuantizedWeight) -> jax.Array:
    out, in_ = w.shape
    nb = w.in_padded // w.block
    if w.kind == "int8":
        codes = w.q.astype(jnp.float32).reshape(out, nb, w.block)
        values = codes * w.scales.astype(jnp.float32)[..., None]
    else:
        packed = w.q.reshape(out, nb, w.block // 2)
        codes = jnp.concatenate([packed & 0xF, packed >> 4], axis=-1).astype(jnp.float32)
        values = codes * w.scales[..., None] + w.mins[..., None]
    return values.reshape(out, nb * w.block)[:, :in_]


# --------------------------------------------------------------------------------------
# Dense floats -> QuantizedWeight.


def _check_kind(kind: str, where: str) -> None:
    if kind not in KINDS:
        raise InvalidRequestError(
            f"{where}: kind {kind!r} is not supported; expected one of {KINDS}"
        )


def _round_up_to_f16_precision(x: jax.Array) -> jax.Array:
    """Non-negative float32 x rounded up to 11 significant bits (float16's), keeping
    float32's range. A 4-bit code times such a scale is exact in float32, so ``code *
    scale + min`` rounds once whether or not a backend fuses it into a multiply-add:
    the kernel and the XLA twin then see the very same weights."""
    mask = jnp.uint32((1 << 13) - 1)  # the 13 low bits of float32's 23-bit mantissa
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type((bits + mask) & ~mask, jnp.float32)


@functools.partial(jax.jit, static_argnames=("kind",))
def _quantize_blocks(w: jax.Array, *, kind: str):
    """(out, in) float -> (q, scales, mins, biggest scale before any float16 rounding)."""
    out, in_ = w.shape
    in_padded = _round_up(in_, BLOCK)
    w = w.astype(jnp.float32)
    valid = jnp.arange(in_padded) < in_
    w = jnp.pad(w, ((0, 0), (0, in_padded - in_))).reshape(out, -1, BLOCK)
    valid = valid.reshape(-1, BLOCK)
    if kind == "int8":
        ideal = jnp.max(jnp.abs(w), axis=-1) / INT8_MAX
        scale = ideal.astype(INT8_SCALE_DTYPE)
        # Never round the scale down: a smaller scale would push |w| / scale past 127
        # and the clip would then break the error bound |err| <= scale / 2. (Matters
        # only for subnormal float16 scales, i.e. blocks whose |w| < 8e-3.)
        scale = jnp.where(scale.astype(jnp.float32) < ideal, jnp.nextafter(scale, jnp.inf), scale)
        s32 = scale.astype(jnp.float32)[..., None]
        q = jnp.where(s32 > 0, jnp.round(w / jnp.where(s32 > 0, s32, 1.0)), 0.0)
        q = jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8)
        return q.reshape(out, in_padded), scale, None, jnp.max(ideal, initial=0.0)
    # int4: min/max of the real elements; the padding columns get code 0.
    if in_padded == in_:
        lo, hi = jnp.min(w, axis=-1), jnp.max(w, axis=-1)
    else:
        lo = jnp.min(jnp.where(valid, w, jnp.inf), axis=-1)
        hi = jnp.max(jnp.where(valid, w, -jnp.inf), axis=-1)
    scale = _round_up_to_f16_precision((hi - lo) / INT4_MAX)
    # A multiply by the reciprocal, not a divide: twice as fast on the CPU, and moves
    # the rounding boundary by a few float32 ulps at most.
    inverse = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
    codes = jnp.clip(jnp.round((w - lo[..., None]) * inverse[..., None]), 0, INT4_MAX)
    if in_padded != in_:
        codes = jnp.where(valid, codes, 0.0)
    codes = codes.astype(jnp.uint8)
    q = codes[..., :16] | (codes[..., 16:] << 4)
    return q.reshape(out, in_padded // 2), scale, lo, jnp.max(scale, initial=0.0)


def quantize(w, kind: Kind, *, name: str = "<tensor>") -> QuantizedWeight:
    """Quantize a dense float (out, in) weight, per block of 32 along in.

    int8: symmetric, scale = absmax / 127 rounded to float16 (upwards where rounding
    would lose range), code = round-to-nearest(w / scale); |error| <= scale / 2.
    int4: asymmetric, min = block min, scale = (max - min) / 15 rounded up to 11
    significant bits (see `_round_up_to_f16_precision`), code = round((w - min) /
    scale); |error| <= scale / 2 up to the float32 rounding of code * scale + min.

    Raises InvalidRequestError, naming the tensor, for an unknown kind, a weight that is
    not a 2-D float array, one holding inf or NaN, or (int8) a block whose scale
    overflows float16 (|w| > 8.3e6).
    """
    _check_kind(kind, f"quantize {name}")
    if jnp.ndim(w) != 2 or not jnp.issubdtype(jnp.result_type(w), jnp.floating):
        raise InvalidRequestError(
            f"quantize {name}: expected a 2-D float (out, in) weight; got "
            f"{jnp.result_type(w)}{list(jnp.shape(w))}"
        )
    shape = tuple(int(d) for d in jnp.shape(w))
    q, scales, mins, biggest = _quantize_blocks(jnp.asarray(w), kind=kind)
    biggest = float(biggest)  # one device-to-host sync per tensor
    if not np.isfinite(biggest):
        raise InvalidRequestError(f"quantize {name}: the weight holds inf or NaN")
    limit = float(jnp.finfo(INT8_SCALE_DTYPE).max)
    if kind == "int8" and biggest > limit:
        raise InvalidRequestError(
            f"quantize {name}: values up to {biggest * INT8_MAX:.4g} do not fit int8 with "
            f"float16 scales (|w| <= {INT8_MAX * limit:.4g})"
        )
    return QuantizedWeight(q=q, scales=scales, mins=mins, kind=kind, shape=shape)


# --------------------------------------------------------------------------------------
# GGUF blocks kept exactly. Each takes (n_blocks, type_size) uint8 and returns
# (q per block, scales per block, mins per block or None), GGML's layouts as in
# jaxllama.gguf.dequant (ggml-common.h block_q8_0, block_q4_0, block_q4_1, block_q4_K).


def _exact_q8_0(b):
    q = lax.bitcast_convert_type(b[:, 2:34], jnp.int8)
    d = lax.bitcast_convert_type(le_uint(b, 0, 2), jnp.float16)  # kept in float16
    return q, d[:, None], None


def _exact_q4_0(b):
    # Q4_0's qs[16] is already this module's int4 packing (element i low, i + 16 high).
    d = f16_at(b, 0)
    return b[:, 2:18], d, -8.0 * d


def _exact_q4_1(b):
    return b[:, 4:20], f16_at(b, 0), f16_at(b, 2)


def _exact_q4_k(b):
    # block_q4_K: d, dmin (f16), scales[12], qs[128]; each 32 bytes of qs hold sub-block
    # 2j in their low nibbles and 2j + 1 in their high ones. Repack every sub-block
    # into 16 bytes, element i low and element i + 16 high.
    n = b.shape[0]
    scale, mins = k_scale_min(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 2, 16)
    first, second = qs[:, :, 0], qs[:, :, 1]  # elements 0-15 / 16-31 of both sub-blocks
    even = (first & 0xF) | ((second & 0xF) << 4)
    odd = (first >> 4) | (second & 0xF0)
    q = jnp.stack([even, odd], axis=2).reshape(n, 8 * 16)
    return q, f16_at(b, 0) * scale.astype(jnp.float32), -(f16_at(b, 2) * mins.astype(jnp.float32))


_EXACT = {QT.Q8_0: _exact_q8_0, QT.Q4_0: _exact_q4_0, QT.Q4_1: _exact_q4_1, QT.Q4_K: _exact_q4_k}


@functools.partial(jax.jit, static_argnames=("qtype", "out"))
def _convert_exact(blocks, *, qtype, out):
    q, scales, mins = _EXACT[qtype](blocks)
    return (
        q.reshape(out, -1),
        scales.reshape(out, -1),
        None if mins is None else mins.reshape(out, -1),
    )


def _raw_blocks(raw, qtype: GGMLQuantizationType, shape: tuple[int, int], name: str) -> np.ndarray:
    """`raw` as (n_blocks, type_size) uint8, after the checks `dequantize` makes."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    out, in_ = shape
    if in_ % block_size:
        raise GGUFError(
            f"tensor {name}: row length {in_} is not a multiple of the {qtype.name} "
            f"block size {block_size}"
        )
    expected = out * in_ // block_size * type_size
    raw = np.asarray(raw)
    if raw.nbytes != expected:
        raise GGUFError(
            f"tensor {name}: {qtype.name} data of shape {shape} needs {expected} bytes, "
            f"got {raw.nbytes} bytes"
        )
    return np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(-1, type_size)


def kind_for(qtype: GGMLQuantizationType, mode: Mode) -> str | None:
    """The kind ("int8"/"int4") `from_gguf_blocks` makes of a `qtype` tensor in `mode`,
    or None where it keeps the tensor dense (a float type in mode "native")."""
    if mode == "native":
        if qtype in FLOAT_TYPES:
            return None
        return "int4" if qtype in EXACT_TYPES["int4"] else "int8"
    return mode


BYTES_PER_WEIGHT = {"int8": 1 + 2 / BLOCK, "int4": 0.5 + 8 / BLOCK}  # codes + scales (+ mins)


def from_gguf_blocks(
    raw: np.ndarray,
    qtype: GGMLQuantizationType,
    shape: tuple[int, int],
    mode: Mode = "native",
    *,
    name: str = "<tensor>",
    device: jax.Device | None = None,
) -> QuantizedWeight | None:
    """One GGUF tensor as a QuantizedWeight on `device` (default: the default device),
    or None.

    Args:
      raw: the tensor's bytes as stored (what `gguf.GGUFReader` or
        `jaxllama.gguf.reader` maps: uint8 rows of blocks, or float32/float16 arrays
        for F32/F16); ``out`` rows of ``in`` elements.
      qtype: its GGML type.
      shape: the logical (out, in), i.e. GGUF's ``ne`` reversed.
      mode: "native", "int8" or "int4"; which types are kept exactly and which
        requantized is the table in the module docstring.
      name: the tensor's name, for error messages.

    Returns:
      The QuantizedWeight, or None for a float type (F32, F16, BF16) in mode "native":
      the caller keeps that tensor dense.

    Raises:
      InvalidRequestError: unknown mode, or a shape that is not (out, in).
      UnsupportedTensorTypeError: a GGML type outside jaxllama.gguf.dequant's list.
      GGUFError: a byte count that does not match ``shape`` and ``qtype``, or a row
        length that is not a whole number of blocks.
    """
    if mode not in MODES:
        raise InvalidRequestError(
            f"tensor {name}: mode {mode!r} is not supported; expected one of {MODES}"
        )
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        pass
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise UnsupportedTensorTypeError(
            f"tensor {name}: type {getattr(qtype, 'name', qtype)} is not supported; "
            f"supported: {supported}"
        )
    if len(shape) != 2 or any(int(d) <= 0 for d in shape):
        raise InvalidRequestError(
            f"tensor {name}: shape {tuple(shape)} is not a 2-D (out, in) weight shape"
        )
    shape = (int(shape[0]), int(shape[1]))
    kind = kind_for(qtype, mode)
    if kind is None:
        return None
    if qtype in EXACT_TYPES[kind]:
        blocks = jax.device_put(_raw_blocks(raw, qtype, shape, name), device, may_alias=False)
        q, scales, mins = _convert_exact(blocks, qtype=qtype, out=shape[0])
        return QuantizedWeight(q=q, scales=scales, mins=mins, kind=kind, shape=shape)
    dense = dequantize_gguf(raw, qtype, shape, jnp.float32, name=name, device=device)
    return quantize(dense, kind, name=name)
