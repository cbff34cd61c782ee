"""Small GGUF files for tests, written with the `gguf` package's own writer.

`write_tiny_gguf` writes a valid file by default; `alignment=` lays its data out at a
chosen alignment (as llama.cpp and GGUFWriter do), `extra_tensor=` adds a small tensor the
loaders ignore whose 20 bytes make the later tensors' padding matter, and `defect=` breaks
the file in exactly one place (see DEFECTS), the rest staying valid.
"""

from __future__ import annotations

import struct
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

ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
# The extra tensor: 5 float32 (20 bytes), so at alignment 32 the next tensor starts 12
# bytes of padding later than a table packed at alignment 1 says.
EXTRA_TENSOR_ELEMENTS = 5
EXTRA_TENSOR = "odd_size.weight"  # the default name (no loader looks for it)

# defect: what is wrong with the file (everything else is as a valid file has it).
DEFECTS = {
    "offsets_unpadded": "data laid out at the alignment, but the table's offsets are running "
                        "sums of the unpadded sizes (as if the alignment were 1)",
    "packed_unpadded": "data and offsets packed at alignment 1, while general.alignment says "
                       "the alignment given (default 32)",
    "alignment_int32": "general.alignment stored as INT32 (data laid out at its value)",
    "alignment_bool": "general.alignment stored as BOOL true (data laid out at 32)",
    "empty_key": "a metadata key of length 0",
    "duplicate_key": "tokenizer.ggml.eos_token_id renamed tokenizer.ggml.bos_token_id",
    "duplicate_tensor_name": "blk.1.attn_norm.weight renamed blk.0.attn_norm.weight",
    "long_tensor_name": "the extra tensor named with 64 bytes (GGML_MAX_NAME counts the NUL)",
    "empty_tensor_name": "the extra tensor named with 0 bytes",
    "overlap": "the third tensor's offset 4 bytes into the second tensor's data",
    "gap": "the second tensor's offset one alignment past where the running sum puts it",
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
    alignment: int | None = None,
    extra_tensor: str | None = None,
    defect: str | None = None,
    merges: tuple[str, ...] = (),
) -> Path:
    """A random model of `arch` with llama.cpp's tensor names and metadata keys.

    Weights are random (this file is for reader/loader tests, not numerics); the
    tokenizer section is a minimal byte-level vocabulary. With `alignment`, the file
    stores general.alignment (UINT32) and its tensor data is laid out at it (else the
    default 32, with no key). With `extra_tensor`, a tensor of that name and
    EXTRA_TENSOR_ELEMENTS float32 follows token_embd.weight. `defect` is one of DEFECTS.
    `merges` are written as tokenizer.ggml.merges (GGUFWriter drops an empty list, and
    the adapter's tokenizer, like llama.cpp's, needs the key).
    The same `seed` gives the same weights whatever the alignment or defect.
    """
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"defect {defect!r}; expected one of {', '.join(DEFECTS)}")
    if defect == "long_tensor_name":
        extra_tensor = "x" * 48 + ".long_name.weigh"  # 64 bytes
    elif defect == "empty_tensor_name":
        extra_tensor = ""
    elif defect in ("offsets_unpadded", "packed_unpadded", "overlap", "gap"):
        extra_tensor = EXTRA_TENSOR if extra_tensor is None else extra_tensor
    declared = DEFAULT_ALIGNMENT if alignment is None else alignment
    vocab, d, n_layers, heads, kv_heads, ffn = ARCH_SHAPES[arch]
    hd = d // heads
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    if defect == "packed_unpadded":
        w.add_custom_alignment(1)  # patched to `declared` once written
    elif defect == "alignment_int32":
        w.data_alignment = declared
        w.add_int32(ALIGNMENT_KEY, declared)
    elif defect == "alignment_bool":
        w.add_bool(ALIGNMENT_KEY, True)
    elif alignment is not None or defect == "offsets_unpadded":
        w.add_custom_alignment(declared)
    if defect == "empty_key":
        w.add_uint32("", 1)
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
    w.add_token_merges(list(merges))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)

    written: list[tuple[str, int]] = []  # (name, bytes) in table order

    def add(name, shape):
        if name in skip_tensors:
            return
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if len(shape) == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, x)
            written.append((name, x.nbytes))
        else:
            try:
                q = gguf.quants.quantize(x, qtype)
            except NotImplementedError:  # types gguf cannot quantize: random bytes
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                q = rng.integers(0, 256, byte_shape, dtype=np.uint8)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
            written.append((name, q.nbytes))

    add("token_embd.weight", (vocab, d))
    if extra_tensor is not None:
        x = np.arange(1, EXTRA_TENSOR_ELEMENTS + 1, dtype=np.float32)
        w.add_tensor(extra_tensor, x)
        written.append((extra_tensor, x.nbytes))
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
    if defect is not None:
        path.write_bytes(_break(path.read_bytes(), defect, declared, written))
    return path


def _kv_head(key: str, vtype: gguf.GGUFValueType) -> bytes:
    return struct.pack("<Q", len(key.encode())) + key.encode() + struct.pack("<I", vtype)


def offset_fields(data: bytes, names: list[str]) -> list[int]:
    """Byte positions of the offset fields of tensors `names` (all of them, in table
    order), found by their names in the table."""
    positions, at = [], 0
    for name in names:
        raw = name.encode()
        at = data.index(struct.pack("<Q", len(raw)) + raw, at) + 8 + len(raw)
        (n_dims,) = struct.unpack_from("<I", data, at)
        at += 4 + 8 * n_dims + 4
        positions.append(at)
        at += 8
    return positions


def _break(data: bytes, defect: str, alignment: int, written: list[tuple[str, int]]) -> bytes:
    """`data` (written with the layout `defect` needs) with the defect put in."""
    d = bytearray(data)
    names = [name for name, _ in written]
    fields = offset_fields(data, names)

    def offset(i):
        return struct.unpack_from("<Q", d, fields[i])[0]

    def set_offset(i, value):
        struct.pack_into("<Q", d, fields[i], value)

    if defect == "offsets_unpadded":
        running = 0
        for i, (_, nbytes) in enumerate(written):
            set_offset(i, running)
            running += nbytes
    elif defect == "packed_unpadded":
        head = _kv_head(ALIGNMENT_KEY, gguf.GGUFValueType.UINT32) + struct.pack("<I", 1)
        at = d.index(head) + len(head) - 4
        struct.pack_into("<I", d, at, alignment)
    elif defect == "duplicate_key":
        eos, bos = b"tokenizer.ggml.eos_token_id", b"tokenizer.ggml.bos_token_id"
        d = bytearray(data.replace(eos, bos, 1))
    elif defect == "duplicate_tensor_name":
        d = bytearray(data.replace(b"blk.1.attn_norm.weight", b"blk.0.attn_norm.weight", 1))
    elif defect == "overlap":
        set_offset(2, offset(1) + 4)
    elif defect == "gap":
        set_offset(1, offset(1) + alignment)
    return bytes(d)
