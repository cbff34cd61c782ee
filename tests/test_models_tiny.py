"""Every family on tiny random checkpoints built with transformers, written as GGUF the
way llama.cpp's converter writes them, loaded by jaxllama and compared with transformers.

Two references per architecture: the original transformers model (so Llama 3 rope
scaling and Phi-3 LongRoPE are checked too), and transformers loading the same GGUF
through its own reader (so a convention error on the writing side cannot cancel one on
the reading side). transformers' GGUF reader drops rope scaling for `llama3` and
`phi3_longrope` (see test_hf_to_gguf.py); for those two the GGUF-side comparison is made
at length 1, where rotation is the identity.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_to_gguf import ARCHS, tiny_hf_model, write_gguf
from jaxllama.models import AdapterForwardConfig, LlamaInferenceAdapter, ModelType, load_gguf
from jaxllama.models.transformer import KVCache, decode_step, is_stacked, prefill, stack_layers

SCALING_DROPPED_BY_HF_GGUF = {"llama3", "phi3_longrope"}
EXPECTED_TYPE = {"qwen2": ModelType.Qwen2_5, "qwen2_tied": ModelType.Qwen2_5, "phi3": ModelType.Phi3,
                 "phi3_longrope": ModelType.Phi3, "llama": ModelType.Llama3, "llama3": ModelType.Llama3}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Tiny matmuls are far slower with two threads on two busy cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory):
    arch = request.param
    hf = tiny_hf_model(arch)
    path = write_gguf(hf, tmp_path_factory.mktemp(arch) / f"{arch}.gguf")
    hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return arch, hf, hf_gguf, path, load_gguf(path, dtype=jnp.float32, progress=False)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _our_logits(model, ids):
    cache = KVCache.for_params(model.params, model.config, 1, 128)
    logits, _ = prefill(model.params, jnp.asarray([ids]), cache, jnp.asarray([len(ids)]),
                        config=model.config, all_logits=True)
    return np.asarray(logits[0])


def test_logits_match_transformers(case):
    arch, hf, hf_gguf, _, model = case
    assert model.model_type == EXPECTED_TYPE[arch]
    rng = np.random.default_rng(1)
    # Length 80 passes the LongRoPE model's original context (64): its long factors apply.
    for length in (1, 7, 33, 80):
        ids = rng.integers(3, model.config.vocab_size, length).tolist()
        ours = _our_logits(model, ids)
        ref = _hf_logits(hf, ids)
        assert _rel_l2(ours, ref) < 1e-4, (arch, length, _rel_l2(ours, ref))
        if arch not in SCALING_DROPPED_BY_HF_GGUF or length == 1:
            ref_gguf = _hf_logits(hf_gguf, ids)
            assert _rel_l2(ours, ref_gguf) < 1e-4, (arch, length)


def test_greedy_continuation_matches_transformers(case):
    arch, hf, _, path, model = case
    adapter = LlamaInferenceAdapter.from_model(model)
    prompt = [5, 17, 42, 99, 7, 250]
    n = 24
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0].tolist()
    ours = adapter.generate(prompt, n)
    # The tiny vocabulary's EOS (2) may come first; compare up to our stop.
    assert ours == ref[: len(ours)]
    assert len(ours) == len(ref) or ours[-1] in adapter.eos_ids()


def test_prefill_then_decode_equals_one_prefill(case):
    arch, _, _, _, model = case
    if arch == "phi3_longrope":
        pytest.skip("LongRoPE switches factors by call length, as transformers does: by design "
                    "a split call differs once it crosses the original context")
    rng = np.random.default_rng(2)
    ids = rng.integers(3, model.config.vocab_size, 20).tolist()
    full = _our_logits(model, ids)
    cache = KVCache.for_params(model.params, model.config, 1, 128)
    split = 12
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, :split] = ids[:split]
    logits, cache = prefill(model.params, jnp.asarray(tokens), cache, jnp.asarray([split]),
                            config=model.config)
    np.testing.assert_allclose(np.asarray(logits[0]), full[split - 1], rtol=1e-4, atol=1e-4)
    for pos in range(split, len(ids)):
        logits, cache = decode_step(model.params, jnp.asarray([ids[pos]]), cache, config=model.config)
        np.testing.assert_allclose(np.asarray(logits[0]), full[pos], rtol=1e-4, atol=1e-4)


def test_stacked_layers_match_transformers(case):
    """The lax.scan over stacked layers (packed scoring's path): logits against the
    original transformers model, and the cache it returns is the unrolled forward's, so
    a decode step can continue from it."""
    arch, hf, _, _, model = case
    stacked = stack_layers(model.params)
    assert is_stacked(stacked) and stacked.layers.wq.shape[0] == model.config.num_layers
    rng = np.random.default_rng(4)
    for length in (7, 80):
        ids = rng.integers(3, model.config.vocab_size, length).tolist()
        outs = []
        for params in (stacked, model.params):
            cache = KVCache.for_params(model.params, model.config, 1, 128)
            outs.append(prefill(params, jnp.asarray([ids]), cache, jnp.asarray([length]),
                                config=model.config, all_logits=True))
        (logits, cache), (_, ref_cache) = outs
        assert _rel_l2(np.asarray(logits[0]), _hf_logits(hf, ids)) < 1e-4, (arch, length)
        for got, want in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        assert int(cache.lengths[0]) == length
    nxt, _ = decode_step(model.params, jnp.asarray([ids[0]]), cache, config=model.config)
    want, _ = decode_step(model.params, jnp.asarray([ids[0]]), ref_cache, config=model.config)
    np.testing.assert_allclose(np.asarray(nxt), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_quantized_files_match_requantized_reference(tmp_path, qtype):
    """F16/Q8_0 storage: equal to transformers on weights passed through gguf's own quantizer."""
    hf = tiny_hf_model("qwen2")
    path = write_gguf(hf, tmp_path / "q.gguf", qtype=qtype)
    hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    model = load_gguf(path, dtype=jnp.float32, progress=False)
    ids = list(range(3, 40))
    assert _rel_l2(_our_logits(model, ids), _hf_logits(hf_gguf, ids)) < 1e-4


def test_design_generate_length_and_model_info(case):
    """The design's tests: model type per family, and generate([1, 2, 3], 5) gives 8 ids
    when no EOS comes first (and stops right after an EOS when one does)."""
    arch, hf, _, _, model = case
    adapter = LlamaInferenceAdapter.from_model(model)
    assert adapter.model_type() == EXPECTED_TYPE[arch]
    assert adapter.vocab_size() == 300 and adapter.hidden_dim() == 64 and adapter.num_layers() == 2
    with torch.no_grad():
        ref = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0].tolist()
    new = ref[3:]
    stops = [i for i, t in enumerate(new) if t in adapter.eos_ids()]
    expected = ref if not stops else ref[: 3 + stops[0] + 1]
    out = adapter.generate([1, 2, 3], 5, AdapterForwardConfig(seq_len=3))
    assert out == expected
    if not stops:
        assert len(out) == 8


@pytest.mark.parametrize("arch", ["qwen2_tied", "llama3", "phi3_hd96"])
def test_pallas_attention_gives_the_xla_path_tokens(arch, tmp_path):
    """The Pallas kernels (interpret mode on the CPU) plugged into the model: same logits
    within float32 rounding and the same greedy tokens as plain XLA attention."""
    if arch == "phi3_hd96":  # Phi-3's real head dim
        hf = tiny_hf_model("phi3", hidden_size=192, num_attention_heads=2, num_key_value_heads=2)
    else:
        hf = tiny_hf_model(arch)
    model = load_gguf(write_gguf(hf, tmp_path / "m.gguf"), dtype=jnp.float32, progress=False)
    xla = LlamaInferenceAdapter.from_model(model, attention_impl="xla")
    pallas = LlamaInferenceAdapter.from_model(model, attention_impl="pallas_interpret")
    ids = [5, 17, 42, 99, 7, 250, 3, 8, 9, 11, 12, 13, 14, 15, 16, 20, 21]  # 17: two blocks of 16
    cache = KVCache.for_params(model.params, model.config, 1, 64)
    ref, _ = prefill(model.params, jnp.asarray([ids]), cache, jnp.asarray([len(ids)]),
                     config=model.config, all_logits=True)
    cache = KVCache.for_params(model.params, model.config, 1, 64)
    got, _ = prefill(model.params, jnp.asarray([ids]), cache, jnp.asarray([len(ids)]),
                     config=model.config, all_logits=True, attention_impl="pallas_interpret")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    assert pallas.generate(ids, 12) == xla.generate(ids, 12)
