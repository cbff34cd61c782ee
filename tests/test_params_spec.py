"""The params description: plans of the published layouts, byte estimates against the
arrays a load makes, and a fourth family that is only a page of data.

The fourth family ("toyfam") renames every tensor, fuses gate and up in the other order
(up first) and stores no biases; its file is written here by hand from known arrays, so
the loaded params are checked against those arrays, and its generation against the same
weights written as a Qwen2 file (a family whose numerics test_models_tiny checks against
transformers).
"""

from __future__ import annotations

import dataclasses

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.errors import InvalidModelType, InvalidRequestError
from jaxllama.models import LlamaInferenceAdapter, load_gguf, params_spec
from jaxllama.models.config import ROPE_HALF, ModelConfig, ModelType, check_config_matches
from jaxllama.models.families import FAMILIES, family_for, preset, register_family, unregister_family
from jaxllama.models.family import Family
from jaxllama.models.random_weights import synthetic_tokenizer_metadata
from jaxllama.models.weights import _estimate_bytes, check_tensors, read_gguf
from tests.ggufmake import write_tiny_gguf

VOCAB, D, LAYERS, HEADS, KV_HEADS, FFN = 64, 64, 2, 4, 2, 96
HD = D // HEADS
Q, KV = HEADS * HD, KV_HEADS * HD

TOY = Family(
    arch="toyfam", model_type=ModelType.Qwen2_5, rope_style=ROPE_HALF,
    tensor_names={
        "embed": "tok.weight", "final_norm": "norm.weight", "output": "lm_head.weight",
        "attn_norm": "layers.{i}.ln1.weight", "wq": "layers.{i}.q.weight",
        "wk": "layers.{i}.k.weight", "wv": "layers.{i}.v.weight", "wo": "layers.{i}.o.weight",
        "ffn_norm": "layers.{i}.ln2.weight", "w_down": "layers.{i}.down.weight",
        "bq": "layers.{i}.q.bias",
    },
    fused={"layers.{i}.up_gate.weight": ("w_up", "w_gate")},
)


def _config(arch: str, **changes) -> ModelConfig:
    fields = dict(arch=arch, vocab_size=VOCAB, hidden_dim=D, num_layers=LAYERS, num_heads=HEADS,
                  num_kv_heads=KV_HEADS, head_dim=HD, ffn_dim=FFN, rms_eps=1e-5,
                  context_length=128, rope_theta=10000.0)
    return ModelConfig(**{**fields, **changes})


@pytest.fixture
def toy_family():
    register_family(TOY, presets={"toyfam-tiny": lambda: _config("toyfam")})
    yield TOY
    unregister_family(TOY.arch)


# ------------------------------------------------------------------ plans
def test_phi3_plan_splits_the_fused_tensors_by_rows():
    """llama.cpp's Phi-3 layout: attn_qkv holds Q, K, V rows in that order; ffn_up holds
    the gate rows, then the up rows (MODELS.md)."""
    config = _config("phi3")
    plan = params_spec.tensor_plan(family_for("phi3"), config)
    layer = plan.layers[1]
    assert layer["wq"] == params_spec.TensorSource("blk.1.attn_qkv.weight", (0, Q))
    assert layer["wk"] == params_spec.TensorSource("blk.1.attn_qkv.weight", (Q, Q + KV))
    assert layer["wv"] == params_spec.TensorSource("blk.1.attn_qkv.weight", (Q + KV, Q + 2 * KV))
    assert layer["w_gate"] == params_spec.TensorSource("blk.1.ffn_up.weight", (0, FFN))
    assert layer["w_up"] == params_spec.TensorSource("blk.1.ffn_up.weight", (FFN, 2 * FFN))
    assert plan.shapes["blk.1.attn_qkv.weight"] == (Q + 2 * KV, D)
    assert plan.shapes["blk.1.ffn_up.weight"] == (2 * FFN, D)
    assert "blk.0.ffn_gate.weight" not in plan.shapes and "output.weight" in plan.shapes
    tied = params_spec.tensor_plan(family_for("phi3"), config.replace(tied_output=True))
    assert "output" not in tied.top and "output.weight" not in tied.shapes


def test_qwen_plan_has_biases_only_when_the_config_says(tmp_path):
    with_bias = params_spec.tensor_plan(family_for("qwen2"), _config("qwen2", qkv_bias=True))
    assert with_bias.layers[0]["bk"] == params_spec.TensorSource("blk.0.attn_k.bias")
    assert with_bias.shapes["blk.0.attn_k.bias"] == (KV,)
    without = params_spec.tensor_plan(family_for("qwen2"), _config("qwen2"))
    assert "bk" not in without.layers[0]
    # every tensor the writer of llama.cpp-style test files writes, and nothing else
    assert set(with_bias.shapes) == set(read_gguf(write_tiny_gguf(
        tmp_path / "q.gguf", "qwen2", tied=False)).tensors)


def test_sharding_partition_follows_the_logical_axes():
    config = _config("llama")  # 4 heads, 2 KV heads, ffn 96, vocab 64
    assert params_spec.partition("wq", config, 4) == 0
    assert params_spec.partition("wo", config, 4) == 1
    assert params_spec.partition("wk", config, 4) is None  # 2 KV heads do not split 4 ways
    assert params_spec.partition("wk", config, 2) == 0
    assert params_spec.partition("w_down", config, 4) == 1
    assert params_spec.partition("embed", config, 4) == 0
    assert params_spec.partition("attn_norm", config, 4) is None
    assert params_spec.partition("w_gate", config, 5) is None  # 96 is not a multiple of 5


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False), ("phi3", False)])
@pytest.mark.parametrize("weights", [None, "int8", "int4"])
def test_byte_estimate_equals_the_loaded_arrays(tmp_path, arch, tied, weights):
    """`_estimate_bytes` (derived from the spec) against the bytes of the arrays a load makes."""
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tied=tied)
    model = load_gguf(path, dtype=jnp.float32, weights=weights, progress=False)
    gguf_file = read_gguf(path)
    plan = check_tensors(gguf_file, model.config)
    assert _estimate_bytes(gguf_file, plan, model.config, jnp.dtype(jnp.float32), weights) == model.nbytes()
    if weights is None:
        assert params_spec.weight_bytes(model.config, 4) == model.nbytes()


# ------------------------------------------------------------------ a fourth family
def _arrays(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    top = {"embed": r(VOCAB, D), "final_norm": 1 + r(D), "output": r(VOCAB, D)}
    layers = [dict(attn_norm=1 + r(D), wq=r(Q, D), wk=r(KV, D), wv=r(KV, D), wo=r(D, Q),
                   ffn_norm=1 + r(D), w_gate=r(FFN, D), w_up=r(FFN, D), w_down=r(D, FFN))
              for _ in range(LAYERS)]
    return {"top": top, "layers": layers}


def _write(path, arch: str, tensors: dict[str, np.ndarray]):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, x in tensors.items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _toy_file(path, a):
    t = {"tok.weight": a["top"]["embed"], "norm.weight": a["top"]["final_norm"],
         "lm_head.weight": a["top"]["output"]}
    for i, L in enumerate(a["layers"]):
        p = f"layers.{i}."
        t.update({p + "ln1.weight": L["attn_norm"], p + "q.weight": L["wq"], p + "k.weight": L["wk"],
                  p + "v.weight": L["wv"], p + "o.weight": L["wo"], p + "ln2.weight": L["ffn_norm"],
                  p + "up_gate.weight": np.concatenate([L["w_up"], L["w_gate"]]),
                  p + "down.weight": L["w_down"]})
    return _write(path, "toyfam", t)


def _qwen_file(path, a):
    t = {"token_embd.weight": a["top"]["embed"], "output_norm.weight": a["top"]["final_norm"],
         "output.weight": a["top"]["output"]}
    for i, L in enumerate(a["layers"]):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": L["attn_norm"], p + "attn_q.weight": L["wq"],
                  p + "attn_k.weight": L["wk"], p + "attn_v.weight": L["wv"],
                  p + "attn_output.weight": L["wo"], p + "ffn_norm.weight": L["ffn_norm"],
                  p + "ffn_gate.weight": L["w_gate"], p + "ffn_up.weight": L["w_up"],
                  p + "ffn_down.weight": L["w_down"]})
    return _write(path, "qwen2", t)


def test_a_fourth_family_is_one_page_of_data(tmp_path, toy_family):
    a = _arrays()
    toy = load_gguf(_toy_file(tmp_path / "toy.gguf", a), dtype=jnp.float32, progress=False)
    c = toy.config
    assert (c.arch, c.rope_style, c.qkv_bias, c.tied_output) == ("toyfam", ROPE_HALF, False, False)
    assert toy.model_type == ModelType.Qwen2_5
    for name, want in a["top"].items():
        np.testing.assert_array_equal(np.asarray(getattr(toy.params, name)), want, err_msg=name)
    for i, layer in enumerate(a["layers"]):
        for name, want in layer.items():
            np.testing.assert_array_equal(np.asarray(getattr(toy.params.layers[i], name)), want,
                                          err_msg=f"layer {i} {name}")
    assert toy.params.layers[0].bq is None

    # The same weights as a Qwen2 file generate the same tokens through the adapter.
    qwen = load_gguf(_qwen_file(tmp_path / "qwen.gguf", a), dtype=jnp.float32, progress=False)
    prompt = [[3, 14, 15, 9, 26]]

    def adapter(model):  # token ids only, no end-of-generation id
        meta = synthetic_tokenizer_metadata(VOCAB)
        return LlamaInferenceAdapter.from_model(dataclasses.replace(model, metadata=meta))

    want = adapter(qwen).generate(prompt, 6)
    assert len(want[0]) == 11
    assert adapter(toy).generate(prompt, 6) == want

    # Its preset, and quantized loading, come from the same data.
    check_config_matches(preset("toyfam-tiny"), c, "the toyfam-tiny preset")  # raises on a difference
    q = load_gguf(tmp_path / "toy.gguf", dtype=jnp.float32, weights="int8", progress=False)
    assert q.params.layers[1].w_gate.kind == "int8"
    np.testing.assert_allclose(np.asarray(q.params.layers[1].w_gate.dequantize(jnp.float32)),
                               a["layers"][1]["w_gate"], atol=np.abs(a["layers"][1]["w_gate"]).max() / 127)


def test_a_family_names_only_real_fields_and_registers_once(toy_family):
    with pytest.raises(InvalidRequestError, match="'w_gat' is not a params field"):
        Family(arch="bad", model_type=ModelType.Llama3, rope_style=ROPE_HALF,
               tensor_names={"w_gat": "x.weight"})
    with pytest.raises(InvalidRequestError, match="already registered"):
        register_family(TOY)
    with pytest.raises(InvalidRequestError, match="cannot be removed"):
        unregister_family("llama")
    assert set(FAMILIES) >= {"qwen2", "phi3", "llama", "toyfam"}


def test_an_unregistered_architecture_is_the_library_error(tmp_path):
    assert "toyfam" not in FAMILIES
    with pytest.raises(InvalidModelType, match="GGUF architecture 'toyfam' is not supported"):
        load_gguf(_toy_file(tmp_path / "toy.gguf", _arrays()), progress=False)
