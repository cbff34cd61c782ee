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
        return _kernel.quant_matmul_reference(x, w)
    x2 = x.reshape(rows, in_)
    if impl == "pallas" and not backend.kernel_compiles(
        "quant_matmul", _kernel.quant_matmul, (x2, w), {},
        shape_class=f"{w.kind} weights, {x.dtype.name} x", twin="quant_matmul_reference",
    ):
        return _kernel.quant_matmul_reference(x, w)
    y = _kernel.quant_matmul(x2, w, interpret=impl == "pallas_interpret")
    return y.reshape(*x.shape[:-1], out)
