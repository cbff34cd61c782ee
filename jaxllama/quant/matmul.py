"""`qlinear`: x @ w.T for a dense or quantized weight, by XLA or by the Pallas kernel.

Which path runs (all decided at trace time, from shapes and the ``impl`` argument):

* ``w`` a dense (out, in) array: one XLA einsum, whatever ``impl`` says.
* ``impl="xla"``: w dequantized to x's dtype, then an XLA einsum with float32
  accumulation (`jaxllama.pallas.quant_matmul.quant_matmul_reference`). What prefill
  and large batches use: the weight is read once for many rows, so the dequantize pass
  is amortized and XLA's GEMM does the math.
* ``impl="pallas"`` (GPU) or ``"pallas_interpret"`` (the same kernel in the Pallas
  interpreter, for CPU tests): the fused kernel
  `jaxllama.pallas.quant_matmul.quant_matmul` when x has 1 <= M <= PALLAS_MAX_ROWS
  rows (M = the product of x's leading dims); otherwise the XLA path above.

On the CPU backend the XLA path never writes the whole dense weight (`cpu_qlinear`):
XLA's CPU emitter turns a one-row ``x @ dequant(w).T`` into a single loop fusion that
reads the int8 codes and scales where they lie, and for more rows (or int4 codes) the
weight is dequantized and multiplied in row chunks of about `CPU_CHUNK_BYTES`, inside a
`lax.map`, so at most one chunk is ever dense. Both forms also keep XLA from hoisting a
loop-invariant dequantize out of the on-device decode loop, which held a dense float
copy of every weight for the whole `generate` (benchmarks/RESULTS.md, "CPU decode").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxllama import backend
from jaxllama.errors import InvalidRequestError

from jaxllama.pallas import quant_matmul as _kernel
from jaxllama.quant.formats import QuantizedWeight

IMPLS: tuple[str, ...] = backend.MATMUL_IMPLS
# The kernel holds all of x's rows in one tile (no grid axis over M): an (Mp, 32)
# float32 accumulator and an (Mp, bk) x tile per program; at Mp = 32 its int4 / bf16
# variant already takes 210 registers a thread (ptxas, sm_90a, no spills). More rows
# would want an M axis in the grid; until then XLA takes them, at the cost of writing
# and re-reading a dense copy of the weight on each call (XLA does not fuse the
# conversion into the GEMM, GPU.md). 32 also covers batch-32 decode, the largest batch
# GPU.md measured. Not yet timed on a GPU.
PALLAS_MAX_ROWS = 32
# Dense bytes of one dequantized row chunk on the CPU: about 2 MiB stays in the L2/L3
# cache between its dequantize and its GEMM. Measured at 4864 x 896 on the 2-core EPYC
# (benchmarks/RESULTS.md, "CPU decode"): 2 MiB chunks beat both 512 KiB chunks and the
# whole matrix at 2-128 rows, and are within noise of float32 at batch 1.
CPU_CHUNK_BYTES = 2 << 20
# Up to this many rows, int8 codes are multiplied one row of x at a time, each product
# one loop fusion over the codes (2-4x faster than float32 at 1-4 rows, measured as
# above); int4 codes are not (their nibble unpacking vectorizes badly inside the fused
# dot, 2-4 ms per 4864 x 896 matrix against 0.2-0.3 for int8) and always go by chunks.
CPU_MATVEC_MAX_ROWS = 4
# At most this many columns of the codes per fused matvec: XLA's CPU backend fuses a
# matvec's producers (the dequantize) into it only while the vector is under 16 KiB
# (4096 float32; `kFusionThresholdBytes` in its instruction fusion). A longer row,
# such as Qwen2.5-0.5B's 4864-wide FFN down projection, was made dense (transposed)
# and then multiplied: 5.2 ms against 0.22 for float32 (RESULTS.md, "Qwen int8").
# So the contraction is split into column parts of whole blocks, one fused matvec each.
CPU_MATVEC_MAX_COLS = 2048


def qlinear(x: jax.Array, w: QuantizedWeight | jax.Array, *, impl: str = "xla") -> jax.Array:
    """x (..., in) @ w.T -> (..., out) float32, accumulated in float32.

    Args:
      x: (..., in) bfloat16, float16 or float32.
      w: a QuantizedWeight of logical shape (out, in), or a dense (out, in) array.
      impl: "xla", "pallas" (needs a GPU backend) or "pallas_interpret"
        (`jaxllama.backend.check` says what is possible here); which path runs for
        which shapes is in the module docstring. A "pallas" kernel that does not
        compile on this device runs as its XLA twin, with one KernelFallbackWarning.

    Returns:
      (..., out) float32; the caller casts. Equal, up to the order of the float32
      sums, to ``x @ w.dequantize(x.dtype).T``.

    Raises:
      InvalidRequestError: unknown impl, "pallas" without a GPU, or an x whose last
        dim is not w's in dim.
    """
    impl = backend.check("matmul", impl, what="qlinear: impl")
    if not isinstance(w, QuantizedWeight) and not (hasattr(w, "shape") and len(w.shape) == 2):
        raise InvalidRequestError(
            f"qlinear: w is {type(w).__name__}; expected a QuantizedWeight or a dense (out, in) array"
        )
    if not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise InvalidRequestError(
            f"qlinear: x is {getattr(x, 'dtype', type(x).__name__)}; expected a float array (..., in)"
        )
    out, in_ = w.shape
    if jnp.ndim(x) < 1 or x.shape[-1] != in_:
        raise InvalidRequestError(
            f"qlinear: x has shape {jnp.shape(x)}; expected (..., {in_}) for a weight of "
            f"shape {tuple(w.shape)}"
        )
    if not isinstance(w, QuantizedWeight):
        return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32)
    rows = math.prod(x.shape[:-1])
    if impl == "xla" or not 1 <= rows <= PALLAS_MAX_ROWS:
        if jax.default_backend() == "cpu":
            return cpu_qlinear(x, w)
        return _kernel.quant_matmul_reference(x, w)
    x2 = x.reshape(rows, in_)
    if impl == "pallas" and not backend.kernel_compiles(
        "quant_matmul", _kernel.quant_matmul, (x2, w), {},
        shape_class=f"{w.kind} weights, {x.dtype.name} x", twin="quant_matmul_reference",
    ):
        return _kernel.quant_matmul_reference(x, w)
    y = _kernel.quant_matmul(x2, w, interpret=impl == "pallas_interpret")
    return y.reshape(*x.shape[:-1], out)


# --------------------------------------------------------------------------------------
# The CPU form of the XLA path.

_NIBBLE_SHIFTS = (0, 4)  # int4: the low nibble holds elements 0-15 of a block, the high 16-31


def _dense_rows(q, scales, mins, kind: str, dtype, keep) -> jax.Array:
    """Rows of codes (r, code columns) with their per-block scales (and mins) -> the
    dense (r, in_padded) weight in ``dtype``, computed in float32. Written elementwise
    over (r, blocks, [2,] 16 or 32), with no concatenate: XLA fuses it into a consumer dot.
    `keep` is a boolean that is always true but computed from this call's activations
    (see `cpu_qlinear`).
    """
    r, nb = scales.shape
    q, scales = jnp.where(keep, q, 0), jnp.where(keep, scales, 0)
    mins = None if mins is None else jnp.where(keep, mins, 0)
    if kind == "int8":
        codes = q.reshape(r, nb, 32).astype(jnp.float32)
        values = codes * scales.astype(jnp.float32)[..., None]
    else:
        packed = q.reshape(r, nb, 1, 16)
        shifts = jnp.asarray(_NIBBLE_SHIFTS, jnp.uint8)[:, None]
        codes = ((packed >> shifts) & 0xF).astype(jnp.float32)  # (r, nb, 2, 16)
        values = codes * scales[:, :, None, None] + mins[:, :, None, None]
    return values.reshape(r, -1).astype(dtype).astype(jnp.float32)


@jax.jit  # one program, called eagerly or inside a jit: the same sums either way
def cpu_qlinear(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """`qlinear`'s XLA path on the CPU: x (..., in) @ w.T -> (..., out) float32, with
    the weight dequantized to x's dtype (as the twin, `quant_matmul_reference`) but
    never held dense as a whole.

    Up to `CPU_MATVEC_MAX_ROWS` rows of x times int8 codes: ``x[r] @ dequant(w).T`` per
    row, which XLA's CPU backend emits as one loop fusion over the codes (the lead in
    ../shared/leads/, checked on the whole decode step by tests/test_hlo.py); rows
    longer than `CPU_MATVEC_MAX_COLS` as a sum of such matvecs over column parts.
    Otherwise: `lax.map` over chunks of at most `CPU_CHUNK_BYTES` dense bytes and half
    of w's rows (plus one static remainder chunk), each dequantized and multiplied by
    all of x's rows.
    """
    out, in_ = w.shape
    lead = x.shape[:-1]
    rows = math.prod(lead)
    xf = x.reshape(rows, in_).astype(jnp.float32)
    if w.in_padded != in_:  # zero columns of x meet the padding codes
        xf = jnp.pad(xf, ((0, 0), (0, w.in_padded - in_)))
    leaves = (w.q, w.scales, w.mins)
    # Always true, but computed from x's bits, so XLA cannot fold it: selecting the
    # codes and scales by it ties the dequantize to this call's activations, and XLA
    # can no longer hoist the conversion of the (loop-invariant) codes out of the
    # on-device decode loop. Hoisted, it kept a dense float32 copy of every weight for
    # the whole `generate` (3.1 GB of 3.15 for Qwen in float32; RESULTS.md).
    if rows:
        bits = jax.lax.bitcast_convert_type(xf[0, 0], jnp.uint32)
        keep = (bits | 1) != 0
    else:
        keep = jnp.bool_(True)

    def product(start: int | jax.Array, size: int) -> jax.Array:
        part = [None if a is None else jax.lax.dynamic_slice_in_dim(a, start, size) for a in leaves]
        return xf @ _dense_rows(*part, w.kind, x.dtype, keep).T  # (rows, size)

    if 1 <= rows <= CPU_MATVEC_MAX_ROWS and w.kind == "int8":
        # x made a buffer of its own before the fused matvec: XLA otherwise pulls x's
        # producer into the loop over the codes and recomputes it per output row (a
        # final RMSNorm's reduction, once per vocab row, made Qwen's decode 20x slower).
        # A conditional on the always-true `keep` is a boundary no fusion crosses.
        # `keep` comes out of it too, a scalar buffer: computed inside the fusion, it was
        # recomputed for every code. (The never-taken branch returns ``~k``: were both
        # branches to return k, XLA would forward it past the conditional and fuse it again.)
        xf, keep = jax.lax.cond(keep, lambda v, k: (v, k), lambda v, k: (jnp.zeros_like(v), ~k), xf, keep)
        nb = w.scales.shape[1]
        parts = -(-w.in_padded // CPU_MATVEC_MAX_COLS)
        bounds = [nb * p // parts for p in range(parts + 1)]  # block columns of each part

        def matvec(r: int, b0: int, b1: int) -> jax.Array:
            c0, c1 = b0 * w.block, b1 * w.block
            dense = _dense_rows(w.q[:, c0:c1], w.scales[:, b0:b1], None, w.kind, x.dtype, keep)
            # A barrier after each product: else XLA fuses its consumer (a bias add, the
            # sum of the parts) into the dot as an output fusion, which takes no
            # producers, and the dequantized weight is written dense again.
            return jax.lax.optimization_barrier(xf[r:r + 1, c0:c1] @ dense.T)

        rows_out = [sum(matvec(r, b0, b1) for b0, b1 in zip(bounds, bounds[1:])) for r in range(rows)]
        y = jnp.concatenate(rows_out, axis=0) if rows != 1 else rows_out[0]
    else:
        # At least two chunks, so that no dense temporary has the whole weight's shape.
        chunk = max(1, min(-(-out // 2), CPU_CHUNK_BYTES // (4 * w.in_padded)))
        n = out // chunk
        y = jax.lax.map(lambda i: product(i * chunk, chunk), jnp.arange(n))  # (n, rows, chunk)
        y = jnp.moveaxis(y, 0, 1).reshape(rows, n * chunk)
        if n * chunk < out:
            y = jnp.concatenate([y, product(n * chunk, out - n * chunk)], axis=1)
    return y.reshape(*lead, out)
