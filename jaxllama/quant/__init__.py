"""Quantized weights: storage and GGUF conversion.

    from jaxllama.quant import QuantizedWeight, from_gguf_blocks, quantize

`formats` holds the `QuantizedWeight` pytree (int8 / int4 codes with per-32 scales),
`from_gguf_blocks` (GGUF tensor bytes -> QuantizedWeight) and `quantize` (dense floats
-> QuantizedWeight).
"""

from jaxllama.quant.formats import QuantizedWeight, from_gguf_blocks, quantize

__all__ = ["QuantizedWeight", "from_gguf_blocks", "quantize"]
