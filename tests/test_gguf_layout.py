"""The GGUF layout rules of llama.cpp's `gguf_init_from_file` (ggml/src/gguf.cpp), one
defect at a time, and files laid out at other alignments than the default.

Each defect is a valid tiny model (tests/ggufmake.py, as the fuzz tests build theirs)
broken in exactly one place; the reader, the loader and the streamed per-device (mesh)
loader all refuse it with a `GGUFError` naming what was wrong. Files laid out correctly at
alignment 1, 64 and 256 read the same tensors as gguf-py's `GGUFReader` and load the same
weights, generating the same greedy tokens, as the default (32) layout.

`PYTHONPATH=. python tests/test_gguf_layout.py` prints, for each defect, whether GGUFReader
accepts it (benchmarks/RESULTS.md, "GGUF layout validation").
"""

from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.errors import GGUFError
from jaxllama.gguf.reader import MAX_NAME, read_gguf
from jaxllama.models import LlamaInferenceAdapter, load_gguf

from ggufmake import DEFECTS, EXTRA_TENSOR, EXTRA_TENSOR_ELEMENTS, write_tiny_gguf

# Where the tiny llama's tensors sit: token_embd.weight (64 x 64 float32) at 0, the
# 20-byte extra tensor at 16384, and blk.0.attn_norm.weight where the padding puts it.
EMBED_BYTES = 64 * 64 * 4
EXTRA_BYTES = EXTRA_TENSOR_ELEMENTS * 4
AFTER_EXTRA = {a: EMBED_BYTES + -(-EXTRA_BYTES // a) * a for a in (1, 32, 64, 256)}
MERGES = ("<t 1>",)  # any line: the adapter's tokenizer needs the key, not a real merge
PROMPTS = [[3, 7, 11, 13], [5, 9]]
N_NEW = 12


def _offset_message(name, found, expected, alignment=32):
    return (rf"tensor {name}: data offset {found}, expected {expected} "
            rf"\(running sum of padded tensor sizes, alignment {alignment}\)")


# defect: the message's pattern. The numbers are the layout worked out by hand above.
EXPECTED = {
    "offsets_unpadded": _offset_message("blk.0.attn_norm.weight", AFTER_EXTRA[1], AFTER_EXTRA[32]),
    "packed_unpadded": _offset_message("blk.0.attn_norm.weight", AFTER_EXTRA[1], AFTER_EXTRA[32]),
    "alignment_int32": "general.alignment is 32, expected a power of two stored as UINT32, "
                       "found type INT32",
    "alignment_bool": "general.alignment is True, expected a power of two stored as UINT32, "
                      "found type BOOL",
    "empty_key": r"metadata key #1 is empty, expected a non-empty name",
    "duplicate_key": r"metadata key tokenizer.ggml.bos_token_id appears twice "
                     r"\(entries #\d+ and #\d+\), expected once",
    "duplicate_tensor_name": "tensor blk.0.attn_norm.weight appears twice in the tensor table",
    "long_tensor_name": r"tensor x{48}\.long_name.weigh: name is 64 bytes, expected at most 63 "
                        r"\(GGML_MAX_NAME 64, with the terminator\)",
    "empty_tensor_name": r"name of tensor #1 is empty, expected a non-empty name",
    "overlap": _offset_message("blk.0.attn_norm.weight", EMBED_BYTES + 4, AFTER_EXTRA[32]),
    "gap": _offset_message(EXTRA_TENSOR, EMBED_BYTES + 32, EMBED_BYTES),
}


def test_every_defect_has_a_case():
    assert EXPECTED.keys() == DEFECTS.keys()


def _refused(path: Path, pattern: str) -> None:
    with pytest.raises(GGUFError, match=pattern):
        read_gguf(path)
    with pytest.raises(GGUFError, match=pattern):
        load_gguf(path, progress=False)


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_defect_is_refused(tmp_path, defect):
    path = write_tiny_gguf(tmp_path / f"{defect}.gguf", defect=defect)
    _refused(path, EXPECTED[defect])


def test_unpadded_offsets_would_load_shifted_weights(tmp_path):
    """The issue's silent corruption: GGUFReader takes the unpadded offsets at their word
    and maps shifted bytes, so the refusal is what stands between the file and wrong
    weights (the same file with correct offsets is the reference)."""
    bad = write_tiny_gguf(tmp_path / "bad.gguf", defect="offsets_unpadded")
    good = write_tiny_gguf(tmp_path / "good.gguf", alignment=32, extra_tensor=EXTRA_TENSOR)
    shifted = {t.name: t.data for t in gguf.GGUFReader(bad).tensors}
    right = read_gguf(good).tensors
    assert np.array_equal(shifted["token_embd.weight"], right["token_embd.weight"].data)
    norm = "blk.0.attn_norm.weight"
    assert not np.array_equal(shifted[norm], right[norm].data)


@pytest.mark.parametrize("alignment", [64, 256])
def test_unpadded_offsets_refused_at_other_alignments(tmp_path, alignment):
    path = write_tiny_gguf(tmp_path / "bad.gguf", alignment=alignment, defect="offsets_unpadded")
    _refused(path, _offset_message("blk.0.attn_norm.weight", AFTER_EXTRA[1], AFTER_EXTRA[alignment],
                                   alignment))


def test_name_of_63_bytes_is_the_longest_accepted(tmp_path):
    name = "y" * (MAX_NAME - 1)
    f = read_gguf(write_tiny_gguf(tmp_path / "ok.gguf", extra_tensor=name))
    assert f.tensors[name].data.tolist() == list(range(1, EXTRA_TENSOR_ELEMENTS + 1))


def test_name_with_nul_is_refused(tmp_path):
    # ggml keeps names as C strings: llama.cpp would take this tensor as "odd".
    path = write_tiny_gguf(tmp_path / "nul.gguf", extra_tensor="odd\0.weight")
    _refused(path, r"tensor 'odd\\x00.weight': name contains a NUL byte, expected none")


def _one_tensor_file(dims: tuple[int, ...], payload: int = 0) -> bytes:
    """No metadata and one F32 tensor named t of ggml dims `dims`, then `payload` bytes."""
    entry = (struct.pack("<Q", 1) + b"t" + struct.pack("<I", len(dims))
             + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", 0, 0))
    return b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + entry + bytes(payload)


def test_element_count_past_int64_is_refused(tmp_path):
    p = tmp_path / "huge.gguf"
    p.write_bytes(_one_tensor_file((1 << 20,) * 4))
    _refused(p, rf"tensor t of shape \({', '.join(['1048576'] * 4)}\) has {1 << 80} elements, "
                rf"expected at most {(1 << 63) - 1} \(INT64_MAX\)")


def test_data_section_start_past_the_end_is_refused(tmp_path):
    # The table ends at byte 57; its data section would start at 64.
    p = tmp_path / "short.gguf"
    p.write_bytes(_one_tensor_file((1,), payload=3))
    _refused(p, r"truncated or corrupt: the tensor data starts at offset 64 \(the tensor table's "
                r"end 57 padded to alignment 32\), but the file has 60 bytes")
    p.write_bytes(_one_tensor_file((1,), payload=7 + 4))
    assert read_gguf(p).tensors["t"].data.tolist() == [0.0]


# ---------------------------------------------------------------- other alignments


@pytest.fixture(scope="module")
def default_layout(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("default") / "m.gguf", extra_tensor=EXTRA_TENSOR,
                           merges=MERGES)
    adapter = LlamaInferenceAdapter.from_gguf(path, dtype=jnp.float32, progress=False)
    return path, adapter, adapter.generate(PROMPTS, N_NEW)


@pytest.mark.parametrize("alignment", [1, 64, 256])
def test_custom_alignment_loads_the_same_model(tmp_path, default_layout, alignment):
    ref_path, ref, ref_tokens = default_layout
    path = write_tiny_gguf(tmp_path / f"a{alignment}.gguf", extra_tensor=EXTRA_TENSOR,
                           alignment=alignment, merges=MERGES)
    f = read_gguf(path)
    assert f.alignment == alignment and f.metadata["general.alignment"] == alignment
    # Laid out differently from the default: the tensor after the odd one moved.
    rel = {n: t.offset - f.data_offset for n, t in f.tensors.items()}
    assert rel["blk.0.attn_norm.weight"] == AFTER_EXTRA[alignment] != AFTER_EXTRA[32]
    # The same tensors, at the same places, as gguf-py's reader finds them.
    for t in gguf.GGUFReader(path).tensors:
        assert f.tensors[t.name].offset == t.data_offset
        np.testing.assert_array_equal(f.tensors[t.name].data, t.data)

    adapter = LlamaInferenceAdapter.from_gguf(path, dtype=jnp.float32, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(adapter.model.params),
                    jax.tree_util.tree_leaves(ref.model.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = adapter.generate(PROMPTS, N_NEW)
    assert tokens == ref_tokens
    assert all(len(row) == len(p) + N_NEW for row, p in zip(tokens, PROMPTS))  # no early EOS


# ---------------------------------------------------------------- the mesh path

needs_devices = pytest.mark.skipif(
    len(jax.devices()) < 2, reason="needs 2 devices (tests/conftest.py sets 8 CPU devices)")


def _two_device_mesh():
    from jaxllama.sharding import make_mesh

    return make_mesh(model=2, data=1, devices=jax.devices()[:2])  # tensor-parallel over 2


@needs_devices
@pytest.mark.parametrize("defect", ["offsets_unpadded", "packed_unpadded", "alignment_bool",
                                    "overlap"])
def test_mesh_loading_refuses_the_same_layouts(tmp_path, defect):
    path = write_tiny_gguf(tmp_path / f"{defect}.gguf", defect=defect)
    with pytest.raises(GGUFError, match=EXPECTED[defect]):
        load_gguf(path, dtype=jnp.float32, progress=False, mesh=_two_device_mesh())


@needs_devices
def test_mesh_loading_of_a_custom_alignment(tmp_path, default_layout):
    _, ref, _ = default_layout
    path = write_tiny_gguf(tmp_path / "a256.gguf", extra_tensor=EXTRA_TENSOR, alignment=256)
    model = load_gguf(path, dtype=jnp.float32, progress=False, mesh=_two_device_mesh())
    for a, b in zip(jax.tree_util.tree_leaves(model.params),
                    jax.tree_util.tree_leaves(ref.model.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- against GGUFReader


def defect_files(tmp: Path) -> dict[str, Path]:
    """Every defect above as a file: ggufmake's DEFECTS and the hand-built ones."""
    files = {d: write_tiny_gguf(tmp / f"{d}.gguf", defect=d) for d in DEFECTS}
    files["nul_in_tensor_name"] = write_tiny_gguf(tmp / "nul.gguf", extra_tensor="odd\0.weight")
    for name, data in (("elements_past_int64", _one_tensor_file((1 << 20,) * 4)),
                       ("data_start_past_end", _one_tensor_file((1,), payload=3))):
        files[name] = tmp / f"{name}.gguf"
        files[name].write_bytes(data)
    return files


def verdicts(read) -> dict[str, str]:
    """For each defect file, what `read(path)` does: 'accepts' or the error it raises."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in defect_files(Path(tmp)).items():
            try:
                read(path)
                out[name] = "accepts"
            except Exception as exc:  # GGUFReader raises ValueError, KeyError, ...
                out[name] = f"refuses: {type(exc).__name__}: {str(exc).replace(str(path), '<file>')}"
    return out


if __name__ == "__main__":
    import importlib.metadata

    print(f"gguf {importlib.metadata.version('gguf')}, numpy {np.__version__}, "
          f"Python {sys.version.split()[0]}")
    ours = verdicts(read_gguf)
    for name, verdict in verdicts(gguf.GGUFReader).items():
        print(f"{name:22} GGUFReader {verdict}\n{'':22} read_gguf  {ours[name]}")
