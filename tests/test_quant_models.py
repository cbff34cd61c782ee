"""Whole models with quantized weights (`weights="native" | "int8" | "int4"`).

- tiny Qwen2 / Phi-3 / Llama 3 written as Q4_0 and Q8_0 GGUF files: "native" keeps those
  blocks exactly, so its logits equal the float32 path's (every tensor dequantized by
  jaxllama.gguf.dequant, itself tested against gguf.quants.dequantize) up to float32
  rounding, and its greedy tokens are identical;
- tiny F32 files under "int8" / "int4": equal to the float32 model whose matmul weights
  are replaced by quantize(w).dequantize(), i.e. the loader quantizes exactly the right
  rows of fused tensors, the embedding lookup and the output projection;
- the fused Pallas matmul (interpret mode) inside the model gives the XLA path's tokens;
- the real SmolLM2 and Qwen files, teacher-forced over tests/data/llamacpp/text.txt:
  next-token top-1 agreement with the float32 path >= 98% for "native" and "int8", mean
  KL printed (llama.cpp agreement is in tests/test_llamacpp_reference.py);
- vram_usage shows the saving; bad options are clear errors that leave loaded models working.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REAL_MODELS, jax_adapter
from hf_to_gguf import tiny_hf_model, write_gguf
from jaxllama.errors import InvalidRequestError
from jaxllama.models import LlamaInferenceAdapter, load_gguf
from jaxllama.quant import QuantizedWeight, quantize
from test_llamacpp_reference import all_logprobs, load_reference

ARCHS = ["qwen2", "phi3", "llama3"]
MATMULS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def _rows(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=n).tolist() for n in (9, 14)]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


def _file(tmp_path_factory, arch: str, qtype: str):
    return write_gguf(tiny_hf_model(arch), tmp_path_factory.mktemp(f"{arch}_{qtype}") / "m.gguf",
                      qtype=qtype)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_native_equals_the_float32_path_of_the_same_file(arch, qtype, tmp_path_factory):
    path = _file(tmp_path_factory, arch, qtype)
    dense = LlamaInferenceAdapter.from_gguf(str(path), weights="f32", progress=False)
    native = LlamaInferenceAdapter.from_gguf(str(path), weights="native", progress=False)
    layer = native.model.params.layers[0]
    kind = "int4" if qtype == "Q4_0" else "int8"
    assert all(getattr(layer, f).kind == kind for f in MATMULS)
    assert isinstance(native.model.params.embed, QuantizedWeight)
    rows = _rows(native.vocab_size())
    for got, want in zip(native.score(rows), dense.score(rows)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert native.generate(rows, 8) == dense.generate(rows, 8)


def _requantized_reference(dense, kind: str):
    """The float32 model with every matmul weight replaced by quantize(w, k).dequantize()
    (the embedding and output projection at int8 under "int4", as the loader documents)."""
    def rq(w, k):
        return quantize(w, k).dequantize(jnp.float32)

    p = dense.model.params
    table = "int8" if kind == "int4" else kind
    layers = tuple(layer.replace(**{f: rq(getattr(layer, f), kind) for f in MATMULS}) for layer in p.layers)
    params = p.replace(embed=rq(p.embed, table), layers=layers,
                       output=None if p.output is None else rq(p.output, table))
    return LlamaInferenceAdapter.from_model(dataclasses.replace(dense.model, params=params))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_requantized_model_equals_dense_model_of_the_dequantized_weights(arch, kind, tmp_path_factory):
    path = _file(tmp_path_factory, arch, "F32")
    dense = LlamaInferenceAdapter.from_gguf(str(path), weights="f32", progress=False)
    quant = LlamaInferenceAdapter.from_gguf(str(path), weights=kind, progress=False)
    ref = _requantized_reference(dense, kind)
    assert quant.model.params.layers[0].w_up.kind == kind
    assert quant.model.params.embed.kind == ("int8" if kind == "int4" else kind)
    rows = _rows(quant.vocab_size(), seed=1)
    for got, want in zip(quant.score(rows), ref.score(rows)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert quant.generate(rows, 8) == ref.generate(rows, 8)
    # ... and really quantized: it is not the float32 model.
    assert any(np.any(a != b) for a, b in zip(quant.score(rows), dense.score(rows)))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_pallas_matmul_in_the_model_gives_the_xla_tokens(kind, tmp_path_factory):
    path = _file(tmp_path_factory, "phi3", "F32")
    xla = LlamaInferenceAdapter.from_gguf(str(path), weights=kind, progress=False)
    kernel = LlamaInferenceAdapter.from_model(xla.model, attention_impl="pallas_interpret")
    rows = _rows(xla.vocab_size(), seed=2)
    assert kernel.generate(rows, 6) == xla.generate(rows, 6)


def test_bad_weight_options_are_clear_and_leave_models_working(tmp_path_factory):
    path = _file(tmp_path_factory, "llama3", "Q8_0")
    loaded = LlamaInferenceAdapter.from_gguf(str(path), weights="int8", progress=False)
    with pytest.raises(InvalidRequestError, match="weights='int3' is not supported; expected one of "
                                                  "f32, bf16, f16, int8, int4, native"):
        load_gguf(path, weights="int3", progress=False)
    with pytest.raises(InvalidRequestError, match="bfloat16 weights, but dtype=float32"):
        load_gguf(path, weights="bf16", dtype=jnp.float32, progress=False)
    rows = _rows(loaded.vocab_size())
    assert len(loaded.generate(rows, 4)[0]) == len(rows[0]) + 4
    assert "Weights: int8 (compute float32)" in loaded.info()


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["native", "int8"])  # int4's figures: benchmarks/RESULTS.md
@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_files_teacher_forced_against_float32(name, weights):
    ids = load_reference(name)["token_ids"]  # a few hundred tokens of text.txt
    base = all_logprobs(jax_adapter(name, "float32").model, ids)
    quant = jax_adapter(name, "float32", weights)
    logp = all_logprobs(quant.model, ids)
    agree = (logp.argmax(-1) == base.argmax(-1)).mean()
    kl = (np.exp(base.astype(np.float64)) * (base - logp)).sum(-1)
    saving = quant.vram_usage() / (jax_adapter(name, "float32").vram_usage() / 2)
    print(f"\n{name} [{weights}] vs float32 over {len(ids)} positions: top-1 agreement "
          f"{agree:.4f}, KL(f32 || {weights}) mean {kl.mean():.2e} max {kl.max():.2e} nats; "
          f"vram {quant.vram_usage() / 2**20:.1f} MiB = {saving:.3f} of bf16")
    assert agree >= 0.98
    assert kl.mean() < 5e-3


def test_vram_usage_shows_the_saving(qwen_path):
    """Qwen2.5-0.5B at int8 takes about half the bytes of bf16 weights."""
    int8 = jax_adapter("qwen2.5-coder-0.5b-instruct", "float32", "int8")
    bf16 = sum(np.prod(x.shape) * 2 for x in jax.tree_util.tree_leaves(
        jax_adapter("qwen2.5-coder-0.5b-instruct", "float32").model.params))
    assert 0.45 < int8.vram_usage() / bf16 < 0.56
