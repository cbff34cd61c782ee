"""Quantized weights: storage, GGUF conversion and the matmul.

    from jaxllama.quant import QuantizedWeight, from_gguf_blocks, quantize, qlinear

`formats` holds the `QuantizedWeight` pytree (int8 / int4 codes with per-32 scales),
`from_gguf_blocks` (GGUF tensor bytes -> QuantizedWeight) and `quantize` (dense floats
-> QuantizedWeight); `matmul.qlinear` multiplies by one, through XLA or the Pallas kernel
in `jaxllama.pallas.quant_matmul`.

The kernel module imports `formats`; `matmul` imports the kernel. So `qlinear` and
`PALLAS_MAX_ROWS` load on first use (PEP 562): importing the kernel first then finds
`formats` whole and `matmul` not yet started, with no import-order rule to keep.
"""

from typing import TYPE_CHECKING

from jaxllama.quant.formats import (
    BLOCK,
    BYTES_PER_WEIGHT,
    EXACT_TYPES,
    QuantizedWeight,
    from_gguf_blocks,
    kind_for,
    quantize,
)

if TYPE_CHECKING:
    from jaxllama.quant.matmul import PALLAS_MAX_ROWS, qlinear  # noqa: F401

__all__ = ["BLOCK", "BYTES_PER_WEIGHT", "EXACT_TYPES", "PALLAS_MAX_ROWS", "QuantizedWeight", "from_gguf_blocks",
           "kind_for", "qlinear", "quantize"]


def __getattr__(name: str):
    if name in ("PALLAS_MAX_ROWS", "qlinear"):
        from jaxllama.quant import matmul

        value = getattr(matmul, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
