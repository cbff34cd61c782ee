"""Quantized weights: storage, GGUF conversion and the matmul.

    from jaxllama.quant import QuantizedWeight, from_gguf_blocks, quantize, qlinear

`formats` holds the `QuantizedWeight` pytree (int8 / int4 codes with per-32 scales),
`from_gguf_blocks` (GGUF tensor bytes -> QuantizedWeight) and `quantize` (dense floats
-> QuantizedWeight); `matmul.qlinear` multiplies by one, through XLA or the Pallas kernel
in `jaxllama.pallas.quant_matmul`.
"""

from jaxllama.quant.formats import (
    BLOCK,
    BYTES_PER_WEIGHT,
    EXACT_TYPES,
    QuantizedWeight,
    from_gguf_blocks,
    kind_for,
    quantize,
)
from jaxllama.quant.matmul import PALLAS_MAX_ROWS, qlinear

__all__ = ["BLOCK", "BYTES_PER_WEIGHT", "EXACT_TYPES", "PALLAS_MAX_ROWS", "QuantizedWeight", "from_gguf_blocks",
           "kind_for", "qlinear", "quantize"]
