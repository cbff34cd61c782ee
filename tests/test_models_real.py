"""The real SmolLM2-135M and Qwen2.5-Coder-0.5B files against transformers on the same GGUF."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REAL_MODELS, hf_reference, jax_adapter
from jaxllama.models.transformer import KVCache, decode_step, prefill

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a village by the sea, there lived",
]


def _ids(name, text):
    _, tok = hf_reference(name)
    return tok(text)["input_ids"]


def _all_logits(model, ids, t_pad=64, cache_len=64):
    tokens = np.zeros((1, t_pad), np.int32)
    tokens[0, : len(ids)] = ids
    cache = KVCache.for_params(model.params, model.config, 1, cache_len)
    logits, _ = prefill(model.params, jnp.asarray(tokens), cache, jnp.asarray([len(ids)]),
                        config=model.config, all_logits=True)
    return np.asarray(logits[0, : len(ids)])


@pytest.mark.parametrize("name", REAL_MODELS)
def test_last_logits_match_transformers(name):
    hf, _ = hf_reference(name)
    model = jax_adapter(name).model
    for text in PROMPTS:
        ids = _ids(name, text)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        ours = _all_logits(model, ids)
        for pos in (len(ids) - 1, len(ids) // 2):
            err = np.linalg.norm(ours[pos] - ref[pos]) / np.linalg.norm(ref[pos])
            print(f"{name} {text[:20]!r} pos {pos}: relative L2 {err:.2e}")
            assert err < 1e-3


@pytest.mark.parametrize("name", REAL_MODELS)
def test_greedy_32_tokens_match_transformers(name):
    hf, _ = hf_reference(name)
    adapter = jax_adapter(name)
    for text in PROMPTS[:2]:
        ids = _ids(name, text)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                              eos_token_id=list(adapter.eos_ids()), pad_token_id=0)[0].tolist()
        ours = adapter.generate(ids, 32)
        assert ours == ref
        assert len(ours) - len(ids) >= 32 or ours[-1] in adapter.eos_ids()


@pytest.mark.parametrize("name", REAL_MODELS)
def test_bfloat16_agrees_with_float32(name):
    f32 = jax_adapter(name)
    bf16 = jax_adapter(name, "bfloat16")
    assert bf16.model.params.embed.dtype == jnp.bfloat16
    for text in PROMPTS[:1]:  # (two prompts measured in RESULTS; one keeps suite time)
        ids = _ids(name, text)
        a = _all_logits(f32.model, ids)[-1]
        b = _all_logits(bf16.model, ids)[-1]
        err = np.linalg.norm(a - b) / np.linalg.norm(a)
        print(f"{name} bf16 vs f32 relative L2 {err:.3e}")
        assert err < 5e-2
        assert bf16.generate(ids, 16) == f32.generate(ids, 16)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_prefill_then_decode_equals_one_prefill(data):
    """Cache consistency: a prompt split into prefill + N decode steps gives the logits of
    one prefill of the whole sequence, on the real SmolLM2 file."""
    model = jax_adapter("smollm2-135m-instruct").model
    length = data.draw(st.integers(2, 40), label="length")
    split = data.draw(st.integers(1, length - 1), label="split")
    ids = data.draw(st.lists(st.integers(0, model.config.vocab_size - 1), min_size=length,
                             max_size=length), label="ids")
    full = _all_logits(model, ids)
    tokens = np.zeros((1, 64), np.int32)
    tokens[0, :split] = ids[:split]
    cache = KVCache.for_params(model.params, model.config, 1, 64)
    logits, cache = prefill(model.params, jnp.asarray(tokens), cache, jnp.asarray([split]),
                            config=model.config)
    _assert_close(np.asarray(logits[0]), full[split - 1])
    for pos in range(split, length):
        logits, cache = decode_step(model.params, jnp.asarray([ids[pos]]), cache, config=model.config)
        _assert_close(np.asarray(logits[0]), full[pos])


def _assert_close(got, want):
    """float32 agreement of two logit vectors computed with different matmul shapes
    (a 64-row prefill against 1-row decode steps sum in different orders over 30 layers;
    seen: 2.3e-5 relative for the prompt [0, 0]). A cache or position bug is 1e-2 or more."""
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    assert np.max(np.abs(got - want)) < 2e-3 * max(1.0, np.max(np.abs(want)) / 10)
