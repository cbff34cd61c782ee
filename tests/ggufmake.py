"""Small GGUF files for tests, written with the `gguf` package's own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import gguf

ARCH_SHAPES = {
    # arch: (vocab, hidden, layers, heads, kv heads, ffn)
    # (every input dim a multiple of 32, so any block type can store the weights)
    "llama": (64, 64, 2, 4, 2, 96),
    "qwen2": (64, 64, 2, 4, 2, 96),
    "phi3": (64, 64, 2, 4, 4, 96),
}


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    *,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    seed: int = 0,
    tied: bool = True,
    extra_metadata: dict | None = None,
    skip_tensors: tuple[str, ...] = (),
) -> Path:
    """A random model of `arch` with llama.cpp's tensor names and metadata keys.

    Weights are random (this file is for reader/loader tests, not numerics); the
    tokenizer section is a minimal byte-level vocabulary.
    """
    vocab, d, n_layers, heads, kv_heads, ffn = ARCH_SHAPES[arch]
    hd = d // heads
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)

    def add(name, shape):
        if name in skip_tensors:
            return
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if len(shape) == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, x)
        else:
            try:
                q = gguf.quants.quantize(x, qtype)
            except NotImplementedError:  # types gguf cannot quantize: random bytes
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                q = rng.integers(0, 256, byte_shape, dtype=np.uint8)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    add("token_embd.weight", (vocab, d))
    for i in range(n_layers):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", (d,))
        if arch == "phi3":
            add(b + "attn_qkv.weight", (heads * hd + 2 * kv_heads * hd, d))
            add(b + "ffn_up.weight", (2 * ffn, d))
        else:
            add(b + "attn_q.weight", (heads * hd, d))
            add(b + "attn_k.weight", (kv_heads * hd, d))
            add(b + "attn_v.weight", (kv_heads * hd, d))
            add(b + "ffn_gate.weight", (ffn, d))
            add(b + "ffn_up.weight", (ffn, d))
        if arch == "qwen2":
            add(b + "attn_q.bias", (heads * hd,))
            add(b + "attn_k.bias", (kv_heads * hd,))
            add(b + "attn_v.bias", (kv_heads * hd,))
        add(b + "attn_output.weight", (d, heads * hd))
        add(b + "ffn_norm.weight", (d,))
        add(b + "ffn_down.weight", (d, ffn))
    add("output_norm.weight", (d,))
    if not tied:
        add("output.weight", (vocab, d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
