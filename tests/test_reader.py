"""The GGUF reader against gguf.GGUFReader, the config read from metadata, and bad files."""

from __future__ import annotations

import os
import struct

import gguf
import numpy as np
import pytest

from jaxllama.errors import ConfigMismatchError, GGUFError, InvalidModelType, JaxLlamaError
from jaxllama.gguf.reader import read_gguf
from jaxllama.models import load_gguf
from jaxllama.models.config import ModelType, config_from_gguf
from jaxllama.models.llama import Llama3Config, Llama3WeightLoader
from jaxllama.models.phi3 import Phi3WeightLoader
from jaxllama.models.qwen import QwenConfig, QwenWeightLoader

from ggufmake import write_tiny_gguf


def _assert_same_as_ggufreader(path):
    ours = read_gguf(path)
    ref = gguf.GGUFReader(path)
    ref_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == ref_meta.keys()
    for key, value in ref_meta.items():
        got = ours.metadata[key]
        if isinstance(value, float):
            assert got == pytest.approx(value, rel=1e-7), key
        else:
            assert got == value, key
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == t.tensor_type
        assert mine.shape == tuple(reversed(t.shape.tolist()))
        assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape
        assert mine.offset == t.data_offset
        # Compare a slice of the bytes: the same memory, so this is cheap.
        np.testing.assert_array_equal(mine.data.reshape(-1)[:4096], t.data.reshape(-1)[:4096])


@pytest.mark.slow
def test_real_files_match_ggufreader(smollm2_path, qwen_path):
    for path in (smollm2_path, qwen_path):
        _assert_same_as_ggufreader(path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_tiny_files_match_ggufreader_and_round_trip_config(tmp_path, arch):
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tied=(arch != "qwen2"))
    _assert_same_as_ggufreader(path)
    config = config_from_gguf(read_gguf(path))
    vocab, d, layers, heads, kv, ffn = (64, 64, 2, 4, 4 if arch == "phi3" else 2, 96)
    assert (config.arch, config.vocab_size, config.hidden_dim, config.num_layers) == (arch, vocab, d, layers)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.ffn_dim) == (heads, kv, d // heads, ffn)
    assert config.rope_theta == 10000.0 and config.rms_eps == pytest.approx(1e-5)
    assert config.context_length == 128
    assert config.qkv_bias == (arch == "qwen2")
    assert config.tied_output == (arch != "qwen2")
    assert config.rope_style == ("interleaved" if arch == "llama" else "half")
    assert config.model_type == ModelType.from_architecture(arch)
    hash(config)  # usable as a static jit argument


def test_real_configs_equal_presets(smollm2_path, qwen_path):
    smol = config_from_gguf(read_gguf(smollm2_path))
    assert smol == Llama3Config.smollm2_135m().replace(rms_eps=smol.rms_eps)
    qwen = config_from_gguf(read_gguf(qwen_path))
    # The Coder file stores a separate output.weight although the 0.5B checkpoint is tied.
    assert qwen == QwenConfig.qwen2_5_0_5b().replace(tied_output=False, rms_eps=qwen.rms_eps)


def test_family_loader_checks_config(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama")
    good = config_from_gguf(read_gguf(path))
    model = Llama3WeightLoader.load_to_vram(path, good, progress=False)
    assert model.config == good
    with pytest.raises(ConfigMismatchError, match=r"hidden_dim is 64 in the file but 128"):
        Llama3WeightLoader.load_to_vram(path, good.replace(hidden_dim=128, head_dim=32), progress=False)
    with pytest.raises(ConfigMismatchError, match=r"num_kv_heads is 2 in the file but 4"):
        Llama3WeightLoader.load_to_vram(path, good.replace(num_kv_heads=4), progress=False)
    with pytest.raises(InvalidModelType, match="Invalid model type: Llama3"):
        QwenWeightLoader.load_to_vram(path, progress=False)
    with pytest.raises(InvalidModelType, match="Invalid model type: Qwen2_5"):
        Phi3WeightLoader.load_to_vram(path, QwenConfig.qwen2_5_0_5b(), progress=False)


# ---------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "t.gguf", "llama")
    return path.read_bytes()


def _write(tmp_path, data: bytes, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _expect(path, pattern, exc=GGUFError):
    with pytest.raises(exc, match=pattern):
        load_gguf(path, progress=False)


def test_missing_directory_empty(tmp_path):
    _expect(tmp_path / "nope.gguf", "no such file")
    _expect(tmp_path, "is a directory")
    _expect(_write(tmp_path, b""), "file is empty")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable(tmp_path, tiny_bytes):
    p = _write(tmp_path, tiny_bytes)
    p.chmod(0)
    _expect(p, "cannot be")


def test_unreadable_as_root_too(tmp_path, tiny_bytes, monkeypatch):
    """Root reads any file, so simulate the operating system's refusal."""
    import jaxllama.gguf.reader as reader

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(reader.np, "memmap", refuse)
    _expect(_write(tmp_path, tiny_bytes), r"cannot be read \(Permission denied\)")


def test_wrong_magic_and_versions(tmp_path, tiny_bytes):
    _expect(_write(tmp_path, b"GGML" + tiny_bytes[4:]), r"magic is b'GGML', expected b'GGUF'")
    for version in (1, 4):
        data = tiny_bytes[:4] + struct.pack("<I", version) + tiny_bytes[8:]
        _expect(_write(tmp_path, data), f"GGUF version {version} is not supported; supported: 2, 3")


def test_truncated_everywhere(tmp_path, tiny_bytes):
    f = read_gguf(_write(tmp_path, tiny_bytes, "ok.gguf"))
    cuts = [5, 20, 60, 200, f.data_offset - 10, f.data_offset + 10, len(tiny_bytes) - 1]
    for cut in cuts:
        _expect(_write(tmp_path, tiny_bytes[:cut]), r"truncated|extends past the end")


def test_absurd_counts_are_refused_before_allocating(tmp_path, tiny_bytes):
    # tensor count, kv count, and the first key's string length set to 2**60.
    for offset in (8, 16, 24):
        data = bytearray(tiny_bytes)
        data[offset : offset + 8] = struct.pack("<Q", 1 << 60)
        _expect(_write(tmp_path, bytes(data)), "truncated or corrupt")


def test_tensor_offset_past_end(tmp_path, tiny_bytes):
    f = read_gguf(_write(tmp_path, tiny_bytes, "ok.gguf"))
    # The last tensor's offset is the last 8 bytes of the tensor table (before padding).
    last = max(f.tensors.values(), key=lambda t: t.offset)
    table_end = tiny_bytes.rfind(struct.pack("<Q", last.offset - f.data_offset), 0, f.data_offset)
    data = bytearray(tiny_bytes)
    data[table_end : table_end + 8] = struct.pack("<Q", len(tiny_bytes))
    _expect(_write(tmp_path, bytes(data)), f"tensor {last.name} .* extends past the end")


def test_duplicate_tensor_name(tmp_path, tiny_bytes):
    data = tiny_bytes.replace(b"blk.1.attn_q.weight", b"blk.0.attn_q.weight", 1)
    _expect(_write(tmp_path, data), "tensor blk.0.attn_q.weight appears twice")


def test_missing_tensor_unknown_arch_bad_type(tmp_path):
    p = write_tiny_gguf(tmp_path / "a.gguf", "llama", skip_tensors=("blk.1.ffn_down.weight",))
    _expect(p, "required tensor blk.1.ffn_down.weight is missing")
    p = write_tiny_gguf(tmp_path / "b.gguf", "llama")
    data = p.read_bytes().replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00mamba", 1)
    _expect(_write(tmp_path, data), "Invalid model type: mamba", InvalidModelType)
    p = write_tiny_gguf(tmp_path / "c.gguf", "llama", qtype=gguf.GGMLQuantizationType.IQ4_NL)
    _expect(p, r"tensor token_embd.weight: type IQ4_NL is not supported; supported: F32, F16")


def test_every_error_is_ours(tmp_path, tiny_bytes):
    """A sweep of single-byte corruptions of the header: only the library's errors."""
    f = read_gguf(_write(tmp_path, tiny_bytes, "ok.gguf"))
    rng = np.random.default_rng(0)
    for pos in rng.integers(0, f.data_offset, 60):
        data = bytearray(tiny_bytes)
        data[pos] ^= 0xFF
        try:
            load_gguf(_write(tmp_path, bytes(data)), progress=False)
        except JaxLlamaError:
            pass
