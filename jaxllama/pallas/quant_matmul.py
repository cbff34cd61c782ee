"""x @ w.T for a few rows of x against a quantized weight (Pallas), with its plain-JAX twin.

Letters: M rows of x (decode: batch rows), Mp rows padded, K the in dim (padded to a
multiple of 32), N the out dim; bn, bk the tile sizes along N and K.

x (M, in) in bfloat16, float16 or float32 times a `QuantizedWeight` w of logical
shape (N, in) (int8 or int4, layouts in `jaxllama.quant.formats`) -> (M, N) float32.

How the kernel works
--------------------
* Made for decode, where M is a handful of rows and the time is the weight bytes:
  each weight byte is read once, as int8 or packed int4 codes plus one scale (and
  min) per 32 elements, and dequantized in registers; the dense weight never exists
  in memory. x is padded to Mp = max(16, next power of two of M) rows, the smallest M
  Triton's ``dot`` takes, and to K columns (zeros; x is small).
* Grid (N tiles, K splits). Program (n, s) owns the output columns of tile n (bn
  rows of w) and the s-th share of the K steps; it loops over its steps: load a (bn,
  bk) code tile and its (bn, bk/32) scales, scale every 32-element group in float32,
  round to x's dtype (the twin rounds the same way), and accumulate ``x_tile @
  w_tile.T`` in float32. Each split writes its (Mp, bn) partial sum; XLA adds the
  splits. Splitting K keeps enough programs in flight when N / bn alone is small
  (TARGET_PROGRAMS), but is capped so the float32 partials stay under 1/8 of the
  weight bytes (PARTIAL_BYTES_FRACTION): at M = 1 a partial is 64 bytes per output
  column and split, so a 896-wide K is never split and an 8192-wide one is.
* int4: two codes per byte, element i of a 32-block in the low nibble and i + 16 in
  the high one. ``q & 15`` and ``q >> 4`` are two (bn, bk/2) tiles whose columns are
  the first and second halves of every block; x is permuted once in XLA into the
  matching two halves (xlo, xhi), so the kernel does two dots and no interleaving.
* N not a multiple of bn: the rows of the last tile past N are clamped onto row N - 1
  (so every load stays in bounds: the Triton lowering does not bounds-check
  ``ref[...]``) and the extra output columns are dropped. K needs no masking: bk is
  the largest power of two (<= the default) that divides the padded K, at least 32.

Lowering: Triton, selected by passing Triton ``CompilerParams``, for the reasons given in
`jaxllama.pallas.flash_attention` (plain ref indexing with row gathers and run-time
loop bounds; jax 0.10 and 0.11 both export the params, 0.11 warns that the Triton
backend is deprecated; Mosaic GPU was seen to reject kernels in this style).
``interpret=True`` runs the same kernel on the CPU. Block sizes below are reasoned, not
yet timed on a GPU. Compiled for sm_90a with Triton 3.6 (this module's lowering under
jax 0.10.2, then ``ptxas -v``, as ``benchmarks/attention.py --triton-check`` does for
attention): int8 and int4, bf16 and float32 x, M = 1 and 32, at (4864, 896) and (896,
4864) all fit without register spills, 7-25 KiB of shared memory, 52-210 registers a
thread (the most: int4, bf16, M = 32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllama.errors import InvalidRequestError, library_errors
from jaxllama.pallas.flash_attention import MIN_BLOCK, triton_compiler_params
from jaxllama.quant.formats import BLOCK, QuantizedWeight

# 32 output columns per program: a (32, 256) int8 tile is 8 KiB and its bf16 copy
# 16 KiB (32 registers a thread at 4 warps for each 8 KiB), and N = 896 (Qwen2.5-0.5B)
# still gives 28 programs before any K split.
DEFAULT_BLOCK_N = 32
# K per step for 2-byte x: 256 is 8 scale groups, and 256 B of int8 per weight row
# per step (two full 128-byte lines). Halved for float32 x, whose tiles are twice the
# bytes, as the attention kernels do.
DEFAULT_BLOCK_K = 256
F32_BLOCK_K = 128
# Split K until the grid holds about this many programs: two per SM of an H100 (132).
TARGET_PROGRAMS = 264
# ... but keep the float32 partial sums under 1/8 of the weight bytes read.
PARTIAL_BYTES_FRACTION = 8
# Little math per byte: 4 warps and 2 stages, as decode_attention.
NUM_WARPS = 4
NUM_STAGES = 2


def _dot_nt(a, b):
    """a (M, C) . b (N, C)^T -> (M, N) float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _scaled(codes, scales, mins, group: int, dtype):
    """codes (bn, g * group) times the per-group scales (bn, g) [+ mins], in dtype."""
    bn, width = codes.shape
    g = width // group
    values = codes.astype(jnp.float32).reshape(bn, g, group) * scales[:, :, None]
    if mins is not None:
        values = values + mins[:, :, None]
    return values.reshape(bn, width).astype(dtype)


def _kernel(*refs, kind: str, block_n: int, block_k: int, per_split: int, n_steps: int, n_out: int):
    if kind == "int8":
        x_ref, q_ref, s_ref, o_ref = refs
        x_dtype = x_ref.dtype
    else:
        xlo_ref, xhi_ref, q_ref, s_ref, m_ref, o_ref = refs
        x_dtype = xlo_ref.dtype
    tile = pl.program_id(0)
    split = pl.program_id(1)
    rows = jnp.minimum(tile * block_n + lax.iota(jnp.int32, block_n), n_out - 1)
    groups = block_k // BLOCK  # scale columns per step

    def step(j, acc):
        scales = s_ref[rows, pl.ds(j * groups, groups)].astype(jnp.float32)
        if kind == "int8":
            codes = q_ref[rows, pl.ds(j * block_k, block_k)]
            w = _scaled(codes, scales, None, BLOCK, x_dtype)
            return acc + _dot_nt(x_ref[:, pl.ds(j * block_k, block_k)], w)
        half = block_k // 2
        packed = q_ref[rows, pl.ds(j * half, half)]
        mins = m_ref[rows, pl.ds(j * groups, groups)]
        w_lo = _scaled(packed & 0xF, scales, mins, BLOCK // 2, x_dtype)
        w_hi = _scaled(packed >> 4, scales, mins, BLOCK // 2, x_dtype)
        acc = acc + _dot_nt(xlo_ref[:, pl.ds(j * half, half)], w_lo)
        return acc + _dot_nt(xhi_ref[:, pl.ds(j * half, half)], w_hi)

    j_lo = split * per_split
    j_hi = jnp.minimum(j_lo + per_split, n_steps)
    acc = jnp.zeros(o_ref.shape, jnp.float32)
    o_ref[...] = lax.fori_loop(j_lo, j_hi, step, acc)


def _check_args(x, w) -> None:
    if not isinstance(w, QuantizedWeight):
        raise InvalidRequestError(
            f"quant_matmul: w is a {type(w).__name__}; expected a QuantizedWeight"
        )
    w.check()
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise InvalidRequestError(
            f"quant_matmul: x has shape {x.shape}; expected (M, {w.shape[1]}) for a weight "
            f"of shape {w.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InvalidRequestError(f"quant_matmul: x is {x.dtype}; expected a float dtype")


def _largest_pow2_divisor(n: int, cap: int) -> int:
    block = cap
    while n % block:
        block //= 2
    return block


@library_errors
@functools.partial(
    jax.jit,
    static_argnames=["block_n", "block_k", "num_splits", "num_warps", "num_stages", "interpret"],
)
def quant_matmul(
    x: jax.Array,
    w: QuantizedWeight,
    *,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    interpret: bool = False,
) -> jax.Array:
    """x @ w.T with the weight dequantized tile by tile in registers.

    Args:
      x: (M, in) bfloat16, float16 or float32. Any M works; the kernel is meant for a
        few rows (`jaxllama.quant.matmul.qlinear` sends it M <= PALLAS_MAX_ROWS).
      w: an int8 or int4 QuantizedWeight of shape (N, in).
      block_n: output columns per program, a power of two >= 16 (shrunk for small N).
      block_k: K per loop step, a power of two >= 32; None: the largest power of two
        <= DEFAULT_BLOCK_K (F32_BLOCK_K for float32 x) that divides the padded K.
        It must divide the padded K.
      num_splits: programs sharing one tile's K; None: chosen as in the module
        docstring. Rounded so that no split is empty.
      num_warps, num_stages: Triton launch params.
      interpret: run the kernel in the Pallas interpreter (CPU tests).

    Returns:
      (M, N) float32: ``x @ w.dequantize(x.dtype).T`` accumulated in float32.
    """
    _check_args(x, w)
    m, _ = x.shape
    n_out, k = w.shape[0], w.in_padded
    if block_k is None:
        block_k = _largest_pow2_divisor(
            k, F32_BLOCK_K if x.dtype.itemsize >= 4 else DEFAULT_BLOCK_K
        )
    if block_k < BLOCK or block_k & (block_k - 1) or k % block_k:
        raise InvalidRequestError(
            f"quant_matmul: block_k {block_k} must be a power of two >= {BLOCK} dividing the "
            f"padded in dim {k}"
        )
    if block_n < MIN_BLOCK or block_n & (block_n - 1):
        raise InvalidRequestError(
            f"quant_matmul: block_n {block_n} must be a power of two >= {MIN_BLOCK}"
        )
    block_n = max(MIN_BLOCK, min(block_n, pl.next_power_of_2(n_out)))
    rows = max(MIN_BLOCK, pl.next_power_of_2(m))
    n_tiles = pl.cdiv(n_out, block_n)
    n_steps = k // block_k
    if num_splits is None:
        weight_row_bytes = k if w.kind == "int8" else k // 2
        by_bytes = weight_row_bytes // (PARTIAL_BYTES_FRACTION * rows * 4)
        num_splits = min(pl.cdiv(TARGET_PROGRAMS, n_tiles), by_bytes)
    per_split = pl.cdiv(n_steps, max(1, min(num_splits, n_steps)))
    num_splits = pl.cdiv(n_steps, per_split)

    x = jnp.pad(x, ((0, rows - m), (0, k - x.shape[1])))
    if w.kind == "int8":
        x_args = (x,)
    else:
        halves = x.reshape(rows, k // BLOCK, 2, BLOCK // 2)
        x_args = (halves[:, :, 0].reshape(rows, k // 2), halves[:, :, 1].reshape(rows, k // 2))
    w_args = (w.q, w.scales) + ((w.mins,) if w.kind == "int4" else ())
    operands = x_args + w_args

    def whole(a):
        return pl.BlockSpec(a.shape, lambda n, s: (0, 0))

    kernel = functools.partial(
        _kernel,
        kind=w.kind,
        block_n=block_n,
        block_k=block_k,
        per_split=per_split,
        n_steps=n_steps,
        n_out=n_out,
    )
    partials = pl.pallas_call(
        kernel,
        grid=(n_tiles, num_splits),
        in_specs=[whole(a) for a in operands],
        out_specs=pl.BlockSpec((None, rows, block_n), lambda n, s: (s, 0, n)),
        out_shape=jax.ShapeDtypeStruct((num_splits, rows, n_tiles * block_n), jnp.float32),
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"quant_matmul_{w.kind}",
    )(*operands)
    return jnp.sum(partials, axis=0)[:m, :n_out]


@library_errors
def quant_matmul_reference(x: jax.Array, w: QuantizedWeight, **unused) -> jax.Array:
    """The XLA twin of `quant_matmul`: w dequantized to x's dtype, then x @ w.T
    accumulated in float32. Takes x (..., in), returns (..., N) float32."""
    del unused
    if not isinstance(w, QuantizedWeight):
        raise InvalidRequestError(f"quant_matmul_reference: w is {type(w).__name__}; expected a QuantizedWeight")
    if not hasattr(x, "shape") or jnp.ndim(x) < 1 or x.shape[-1] != w.shape[1] \
            or not jnp.issubdtype(x.dtype, jnp.floating):
        raise InvalidRequestError(
            f"quant_matmul_reference: x is {getattr(x, 'dtype', type(x).__name__)} of shape "
            f"{jnp.shape(x) if hasattr(x, 'shape') else '?'}; expected a float array (..., {w.shape[1]})"
        )
    dense = w.dequantize(x.dtype)
    return jnp.einsum("...i,oi->...o", x, dense, preferred_element_type=jnp.float32)
