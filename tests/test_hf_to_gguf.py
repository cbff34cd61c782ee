"""The tiny-checkpoint GGUF writer against its references: transformers' own GGUF loader (logits,
config, weights, tokenizer), transformers' rope functions (Llama 3 and LongRoPE factors), gguf-py's
tensor-name map (the converter's), and `gguf.quants` (F16 / Q8_0 storage).

What transformers' GGUF loader (5.24, the legacy path for llama / qwen2 / phi3) drops, checked
explicitly below rather than worked around silently:

- llama3: it reads no rope scaling at all. `rope_freqs.weight` maps to no parameter and is skipped,
  and no `llama.rope.scaling.*` key is parsed, so the reloaded model uses plain rope with
  `rope.freq_base`. Logits agree at sequence length 1 (position 0 is not rotated) and differ after.
- phi3 longrope: likewise. `rope_factors_long/short.weight` are skipped, and
  `phi3.rope.scaling.attn_factor` / `phi3.rope.scaling.original_context_length` are not parsed (the
  reloaded config keeps Phi3Config's default original_max_position_embeddings=4096). The reloaded
  model uses plain rope and no attention factor: logits agree at length 1 only.

For those two the tests also (a) check the written factors against transformers' rope functions for
the original config, and (b) put the original model's rotary embedding into the reloaded model and
compare logits at every length, which checks all the weights the loader did read.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hf_to_gguf import (
    CHATML_TEMPLATE,
    GGUF_ARCH,
    GPT2_SPECIAL_TOKENS,
    LLAMA_SPECIAL_TOKENS,
    permute_for_ggml_rope,
    tiny_hf_model,
    write_gguf,
)

# case id -> (tiny arch, config overrides)
CASES = {
    "qwen2": ("qwen2", {}),
    "qwen2_tied": ("qwen2_tied", {}),
    "phi3": ("phi3", {}),
    "phi3_longrope": ("phi3_longrope", {}),
    "llama": ("llama", {}),
    "llama3": ("llama3", {}),
    # Phi-3-mini's real head size, with 2 heads to stay tiny.
    "phi3_head_dim_96": ("phi3", dict(hidden_size=192, num_attention_heads=2)),
}
# Rope scaling transformers' GGUF loader does not read back (see the module docstring).
ROPE_DROPPED = {"llama3", "phi3_longrope"}

HEADER_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
GENERAL_KEYS = {
    "general.architecture", "general.type", "general.name", "general.file_type", "general.quantization_version",
}
# The `{arch}.*` keys llama.cpp's converter writes, per architecture.
ARCH_KEYS = {
    "llama": {
        "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.key_length",
        "attention.value_length", "vocab_size", "rope.dimension_count",
    },
    "qwen2": {
        "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon",
    },
    "phi3": {
        "context_length", "rope.scaling.original_context_length", "embedding_length", "feed_forward_length",
        "block_count", "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
        "rope.dimension_count", "rope.freq_base", "attention.sliding_window",
    },
}
TOKENIZER_KEYS = {
    "gpt2": {
        "model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id",
        "add_bos_token",
    },
    "llama": {
        "model", "pre", "tokens", "scores", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id",
        "padding_token_id", "add_bos_token", "add_eos_token",
    },
}


@dataclass
class Written:
    case: str
    arch: str
    model: transformers.PreTrainedModel
    reader: gguf.GGUFReader
    reloaded: transformers.PreTrainedModel

    @property
    def config(self):
        return self.model.config

    def value(self, key: str):
        return self.reader.fields[key].contents()

    def tensor(self, name: str) -> np.ndarray:
        (t,) = [t for t in self.reader.tensors if t.name == name]
        return np.asarray(t.data)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These models are tiny: with several threads, each matmul waits on thread wake-ups (tens of ms on
    a busy 2-core machine, against tens of microseconds on one). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reload(folder, filename: str) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def written(request, tmp_path_factory) -> Written:
    arch, overrides = CASES[request.param]
    model = tiny_hf_model(arch, **overrides)
    folder = tmp_path_factory.mktemp(request.param)
    path = write_gguf(model, folder / f"{request.param}.gguf")
    return Written(request.param, arch, model, gguf.GGUFReader(path), _reload(folder, path.name))


def _token_batches(vocab_size: int, lengths) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab_size, (2, n), generator=gen) for n in lengths]


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def _lengths(w: Written):
    lengths = [1, 7, 33]
    if w.arch == "phi3_longrope":
        # past original_max_position_embeddings (64), where transformers switches to the long factors
        lengths.append(w.config.rope_parameters["original_max_position_embeddings"] + 16)
    return lengths


def test_logits_match_transformers(written):
    w = written
    batches = _token_batches(w.config.vocab_size, _lengths(w))
    reloaded = w.reloaded
    if w.case in ROPE_DROPPED:
        # transformers' GGUF loader reads no rope scaling for llama / phi3 files.
        assert w.reloaded.config.rope_parameters["rope_type"] == "default", (
            "transformers now reads this rope scaling from GGUF: compare logits directly and update the docstring"
        )
        # Position 0 is not rotated (and a single key makes the attention factor moot): equal there...
        torch.testing.assert_close(_logits(w.reloaded, batches[0]), _logits(w.model, batches[0]), rtol=1e-5, atol=1e-5)
        # ...and different beyond, so the scaling in the tiny config is not a no-op.
        for ids in batches[1:]:
            assert not torch.allclose(_logits(w.reloaded, ids), _logits(w.model, ids), rtol=1e-3, atol=1e-3)
        # With the original rope restored, every weight the loader read must give the same logits.
        reloaded = copy.deepcopy(w.reloaded)
        reloaded.model.rotary_emb = copy.deepcopy(w.model.model.rotary_emb)
    for ids in batches:
        torch.testing.assert_close(_logits(reloaded, ids), _logits(w.model, ids), rtol=1e-5, atol=1e-5)
    # Not degenerate: logits spread out, and the argmax moves with the input.
    logits = _logits(w.model, batches[2])
    assert logits.std() > 0.5
    assert len(torch.unique(logits.argmax(-1))) > 5


def test_weights_round_trip(written):
    w = written
    original, reloaded = w.model.state_dict(), w.reloaded.state_dict()
    assert set(reloaded) == set(original)
    for name, value in original.items():
        assert torch.equal(reloaded[name], value), name


def test_reloaded_config(written):
    """What transformers rebuilds from the metadata alone."""
    w = written
    c, r = w.config, w.reloaded.config
    assert r.model_type == c.model_type
    for attr in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    ):
        assert getattr(r, attr) == getattr(c, attr), attr
    assert r.rope_parameters["rope_theta"] == c.rope_parameters["rope_theta"]
    assert r.rms_norm_eps == pytest.approx(c.rms_norm_eps, rel=1e-6)  # stored as float32
    if w.arch == "phi3_longrope":
        # phi3.rope.scaling.original_context_length is not read back: Phi3Config's default stays.
        assert r.original_max_position_embeddings == 4096 != c.original_max_position_embeddings


def test_metadata(written):
    w = written
    c, gguf_arch = w.config, GGUF_ARCH[w.arch]
    arch_keys = set(ARCH_KEYS[gguf_arch])
    if w.arch == "phi3_longrope":
        arch_keys.add("rope.scaling.attn_factor")
    expected = (
        HEADER_KEYS
        | GENERAL_KEYS
        | {f"{gguf_arch}.{k}" for k in arch_keys}
        | {f"tokenizer.ggml.{k}" for k in TOKENIZER_KEYS["gpt2"]}
    )
    assert set(w.reader.fields) == expected

    head_dim = c.hidden_size // c.num_attention_heads
    assert w.value("general.architecture") == gguf_arch
    assert w.value("general.type") == "model"
    assert w.value("general.file_type") == gguf.LlamaFileType.ALL_F32
    assert w.value("general.quantization_version") == gguf.GGML_QUANT_VERSION
    values = {
        "block_count": c.num_hidden_layers,
        "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size,
        "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": c.num_key_value_heads,
        "rope.freq_base": c.rope_parameters["rope_theta"],
        "attention.layer_norm_rms_epsilon": pytest.approx(c.rms_norm_eps, rel=1e-6),
    }
    if gguf_arch == "llama":
        values.update({
            "vocab_size": c.vocab_size,
            "rope.dimension_count": head_dim,
            "attention.key_length": head_dim,
            "attention.value_length": head_dim,
        })
    if gguf_arch == "phi3":
        values.update({
            "rope.dimension_count": head_dim,
            "rope.scaling.original_context_length": c.original_max_position_embeddings,
            "attention.sliding_window": 0,
        })
    for key, value in values.items():
        assert w.value(f"{gguf_arch}.{key}") == value, key
    # The converter's value types: counts are uint32, float hyperparameters float32.
    types = {k: w.reader.fields[f"{gguf_arch}.{k}"].types for k in arch_keys}
    for key, t in types.items():
        float_key = key in ("rope.freq_base", "attention.layer_norm_rms_epsilon", "rope.scaling.attn_factor")
        assert t == [gguf.GGUFValueType.FLOAT32 if float_key else gguf.GGUFValueType.UINT32], key

    tokens = w.value("tokenizer.ggml.tokens")
    assert len(tokens) == c.vocab_size == len(w.value("tokenizer.ggml.token_type"))
    assert w.value("tokenizer.ggml.model") == "gpt2"
    assert tuple(tokens[:3]) == GPT2_SPECIAL_TOKENS
    assert (w.value("tokenizer.ggml.bos_token_id"), w.value("tokenizer.ggml.eos_token_id")) == (1, 2)


def _expected_tensors(w: Written) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape (rows, cols), from the config alone."""
    c = w.config
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    hd = d // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    names = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not c.tie_word_embeddings:
        names["output.weight"] = (v, d)
    if w.arch == "llama3":
        names["rope_freqs.weight"] = (hd // 2,)
    if w.arch == "phi3_longrope":
        names["rope_factors_long.weight"] = names["rope_factors_short.weight"] = (hd // 2,)
    for i in range(c.num_hidden_layers):
        layer = {"attn_norm.weight": (d,), "ffn_norm.weight": (d,), "attn_output.weight": (d, q)}
        layer["ffn_down.weight"] = (d, f)
        if w.arch.startswith("phi3"):
            layer.update({"attn_qkv.weight": (q + 2 * kv, d), "ffn_up.weight": (2 * f, d)})
        else:
            layer.update({"attn_q.weight": (q, d), "attn_k.weight": (kv, d), "attn_v.weight": (kv, d)})
            layer.update({"ffn_gate.weight": (f, d), "ffn_up.weight": (f, d)})
        if w.arch.startswith("qwen2"):
            layer.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
        names.update({f"blk.{i}.{k}": s for k, s in layer.items()})
    return names


def test_tensor_names_shapes_and_types(written):
    w = written
    found = {t.name: t for t in w.reader.tensors}
    expected = _expected_tensors(w)
    assert set(found) == set(expected)
    for name, shape in expected.items():
        t = found[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert tuple(int(n) for n in t.shape) == tuple(reversed(shape)), name  # GGML lists dims reversed
        assert w.tensor(name).shape == shape, name


def test_names_agree_with_gguf_py_tensor_map(written):
    """Our name table against gguf-py's TensorNameMap, which is what the converter uses."""
    w = written
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == GGUF_ARCH[w.arch])
    name_map = gguf.get_tensor_name_map(arch, w.config.num_hidden_layers)
    written_names = {t.name for t in w.reader.tensors}
    for hf_name in w.model.state_dict():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = f"{name_map.get_name(stem)}.{suffix}"
        assert gguf_name in written_names or (hf_name == "lm_head.weight" and w.config.tie_word_embeddings), hf_name


def test_tensor_values(written):
    w = written
    sd = {k: v.numpy() for k, v in w.model.state_dict().items()}
    c = w.config
    hd = c.hidden_size // c.num_attention_heads
    np.testing.assert_array_equal(w.tensor("token_embd.weight"), sd["model.embed_tokens.weight"])
    if not c.tie_word_embeddings:
        np.testing.assert_array_equal(w.tensor("output.weight"), sd["lm_head.weight"])
    layer = "model.layers.1."
    if w.arch.startswith("phi3"):
        # Fused as transformers has them: Q, K, V rows; gate rows before up rows.
        np.testing.assert_array_equal(w.tensor("blk.1.attn_qkv.weight"), sd[layer + "self_attn.qkv_proj.weight"])
        np.testing.assert_array_equal(w.tensor("blk.1.ffn_up.weight"), sd[layer + "mlp.gate_up_proj.weight"])
        return
    np.testing.assert_array_equal(w.tensor("blk.1.attn_v.weight"), sd[layer + "self_attn.v_proj.weight"])
    for proj, heads in (("q", c.num_attention_heads), ("k", c.num_key_value_heads)):
        hf = sd[f"{layer}self_attn.{proj}_proj.weight"].reshape(heads, hd, -1)
        stored = w.tensor(f"blk.1.attn_{proj}.weight").reshape(heads, hd, -1)
        if w.arch.startswith("llama"):
            # Interleaved pairs: stored row 2i is transformers' row i, row 2i+1 is row i + hd/2.
            np.testing.assert_array_equal(stored[:, 0::2], hf[:, : hd // 2])
            np.testing.assert_array_equal(stored[:, 1::2], hf[:, hd // 2 :])
        else:
            np.testing.assert_array_equal(stored, hf)  # qwen2: half-split rope, no permutation
    if w.arch.startswith("qwen2"):
        for proj in "qkv":
            bias = sd[f"{layer}self_attn.{proj}_proj.bias"]
            assert np.all(bias != 0)
            np.testing.assert_array_equal(w.tensor(f"blk.1.attn_{proj}.bias"), bias)


def test_permute_for_ggml_rope_is_a_row_permutation():
    x = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    y = permute_for_ggml_rope(x, n_head=2)
    assert sorted(y[:, 0].tolist()) == sorted(x[:, 0].tolist())
    # head 1, pair 3: rows 8 + 6 and 8 + 7 come from rows 8 + 3 and 8 + 4 + 3
    np.testing.assert_array_equal(y[14], x[11])
    np.testing.assert_array_equal(y[15], x[15])


def _default_inv_freq(config) -> torch.Tensor:
    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    return 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def test_llama3_rope_freqs_match_transformers(tmp_path):
    model = tiny_hf_model("llama3")
    reader = gguf.GGUFReader(write_gguf(model, tmp_path / "llama3.gguf"))
    (t,) = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    factors = torch.from_numpy(np.array(t.data))
    # llama.cpp divides each frequency by its factor; transformers computes the scaled frequencies.
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    torch.testing.assert_close(_default_inv_freq(model.config) / factors, scaled, rtol=1e-6, atol=0)
    # The tiny config reaches all three bands: kept, interpolated and divided by `factor`.
    factor = model.config.rope_parameters["factor"]
    assert (factors == 1).any() and (factors == factor).any() and ((factors > 1) & (factors < factor)).any()
    assert not any(k.startswith("llama.rope.scaling") for k in reader.fields)


def test_phi3_longrope_factors_match_transformers(tmp_path):
    model = tiny_hf_model("phi3_longrope")
    c = model.config
    reader = gguf.GGUFReader(write_gguf(model, tmp_path / "phi3.gguf"))
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    rope = c.rope_parameters
    torch.testing.assert_close(tensors["rope_factors_long.weight"], torch.tensor(rope["long_factor"]))
    torch.testing.assert_close(tensors["rope_factors_short.weight"], torch.tensor(rope["short_factor"]))
    original = rope["original_max_position_embeddings"]
    short, attn_factor = ROPE_INIT_FUNCTIONS["longrope"](c, "cpu", seq_len=original)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](c, "cpu", seq_len=original + 1)
    base = _default_inv_freq(c)
    torch.testing.assert_close(base / tensors["rope_factors_short.weight"], short, rtol=1e-6, atol=0)
    torch.testing.assert_close(base / tensors["rope_factors_long.weight"], long, rtol=1e-6, atol=0)
    assert reader.fields["phi3.rope.scaling.attn_factor"].contents() == pytest.approx(attn_factor, rel=1e-6)
    assert attn_factor == pytest.approx(math.sqrt(1 + math.log(256 / 64) / math.log(64)))
    assert reader.fields["phi3.rope.scaling.original_context_length"].contents() == original


# (architecture, tokenizer kind): byte-level BPE as in Qwen2.5 / SmolLM2 / Llama 3, SentencePiece as
# in Phi-3 (transformers builds phi3's with its own normalizer) and Llama 2.
@pytest.mark.parametrize("arch,kind", [("qwen2", "gpt2"), ("llama", "gpt2"), ("phi3", "llama"), ("llama", "llama")])
def test_tokenizer_loads_in_transformers(tmp_path, arch, kind):
    model = tiny_hf_model(arch)
    template = CHATML_TEMPLATE if kind == "gpt2" else None
    path = write_gguf(model, tmp_path / "tok.gguf", tokenizer=kind, chat_template=template)
    reader = gguf.GGUFReader(path)
    keys = {k for k in reader.fields if k.startswith("tokenizer.")}
    expected = {f"tokenizer.ggml.{k}" for k in TOKENIZER_KEYS[kind]}
    assert keys == expected | ({"tokenizer.chat_template"} if template else set())
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == model.config.vocab_size

    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert len(tok) == model.config.vocab_size
    specials = GPT2_SPECIAL_TOKENS if kind == "gpt2" else LLAMA_SPECIAL_TOKENS
    assert (tok.bos_token, tok.eos_token) == specials[1:]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)

    text = "the fox is quick and the dog is there; def reverse_string(text): return text[::-1]  Ünïcode ✓"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert max(ids) < model.config.vocab_size
    # The merges are used: common words come out as well under one token per character.
    common = "the dog is there"
    assert len(tok.encode(common, add_special_tokens=False)) <= 0.6 * len(common)
    if kind == "gpt2":
        assert tok.encode("<|im_end|>", add_special_tokens=False) == [2]  # control tokens stay whole
        chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        tokens = reader.fields["tokenizer.ggml.tokens"].contents()
        assert tokens[3 : 3 + 256] == list(bytes_to_unicode().values())  # GPT-2's byte order
    else:
        assert tok("hi").input_ids[0] == 1  # add_bos_token


def _fake_quantized(model, qtype: gguf.GGMLQuantizationType):
    """`model` with each 2-D weight except norms replaced by its `qtype` round trip (F16 where the rows
    do not fit Q8_0 blocks), computed with gguf.quants independently of the file."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim != 2:
                continue
            data = p.numpy()
            t = qtype if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else gguf.GGMLQuantizationType.F16
            p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, t), t).reshape(data.shape)))
    return ref


@pytest.mark.parametrize(
    "arch,qtype,overrides",
    [
        ("qwen2", "Q8_0", {}),
        ("llama3", "F16", {}),
        ("phi3", "Q8_0", {}),
        # hidden 48: attn_qkv / token_embd rows of 48 do not fit 32-blocks and fall back to F16
        ("phi3", "Q8_0", dict(hidden_size=48)),
    ],
)
def test_quantized_files(tmp_path, arch, qtype, overrides):
    model = tiny_hf_model(arch, **overrides)
    path = write_gguf(model, tmp_path / "q.gguf", qtype=qtype)
    reader = gguf.GGUFReader(path)
    want = gguf.GGMLQuantizationType[qtype]
    assert reader.fields["general.file_type"].contents() == {"F16": 1, "Q8_0": 7}[qtype]
    for t in reader.tensors:
        rows_fit = int(t.shape[0]) % gguf.GGML_QUANT_SIZES[want][0] == 0
        if len(t.shape) == 1 or t.name.endswith("_norm.weight") or t.name.endswith(".bias"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        else:
            assert t.tensor_type == (want if rows_fit else gguf.GGMLQuantizationType.F16), t.name
    if overrides:
        assert {t.tensor_type for t in reader.tensors} >= {want, gguf.GGMLQuantizationType.F16}

    reloaded = _reload(tmp_path, path.name)
    if arch in ROPE_DROPPED:
        reloaded.model.rotary_emb = copy.deepcopy(model.model.rotary_emb)
    reference = _fake_quantized(model, want)
    for ids in _token_batches(model.config.vocab_size, [1, 9, 24]):
        torch.testing.assert_close(_logits(reloaded, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)
