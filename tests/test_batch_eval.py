"""Batching, streaming, scoring, perplexity and unloading on the real files, against
transformers where there is a reference and against single-prompt runs for batches."""

from __future__ import annotations

import argparse
import collections
import itertools
import json

import jax
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import hf_reference, jax_adapter
from jaxllama.errors import ModelNotLoaded
from jaxllama.models import AdapterForwardConfig, LlamaInferenceAdapter

pytestmark = pytest.mark.slow
SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"


def _long_text() -> str:
    """A few thousand tokens of ordinary English prose from the standard library's docs."""
    docs = [m.__doc__ for m in (argparse, collections, itertools, json)]
    return "\n\n".join(d.strip() for d in docs)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(3, 49000), min_size=1, max_size=40), min_size=2, max_size=4))
def test_batch_rows_equal_single_prompts(prompts):
    """Greedy batch invariance: each row of a batch equals that prompt generated alone."""
    adapter = jax_adapter(SMOL)
    alone = [adapter.generate(p, 12) for p in prompts]
    together = adapter.generate(prompts, 12, AdapterForwardConfig(batch_size=len(prompts)))
    assert together == alone


def test_batch_rows_stop_at_their_own_eos():
    adapter = jax_adapter(SMOL)
    chat = adapter.prompt_ids([{"role": "user", "content": "Say hi."}])  # replies briefly, then EOS
    plain = adapter.encode("Count: one, two, three, four,")
    out = adapter.generate([chat, plain], 48, AdapterForwardConfig(batch_size=2))
    assert out[0][-1] in adapter.eos_ids() and len(out[0]) - len(chat) < 48
    assert len(out[1]) - len(plain) == 48
    assert out == [adapter.generate(chat, 48), adapter.generate(plain, 48)]
    texts = adapter.generate_text(["Say hi.", "Count: one, two,"], 8, AdapterForwardConfig(batch_size=2))
    assert texts == [adapter.generate_text("Say hi.", 8), adapter.generate_text("Count: one, two,", 8)]


@pytest.mark.parametrize("config", [AdapterForwardConfig(),
                                    AdapterForwardConfig(temperature=0.9, seed=11, top_p=0.95)])
def test_stream_equals_generate(config):
    adapter = jax_adapter(SMOL)
    prompt = adapter.prompt_ids([{"role": "user", "content": "Tell me about the moon."}])
    streamed = list(adapter.stream(prompt, 24, config))
    assert prompt + streamed == adapter.generate(prompt, 24, config)


def test_stream_text_is_whole_characters():
    adapter = jax_adapter(SMOL)
    pieces = list(adapter.stream_text("Emoji and accents: 🎉 café 日本語 ", 24))
    for piece in pieces:
        piece.encode("utf-8")  # a lone surrogate or split character would raise
        assert "\ufffd" not in piece
    prompt = adapter.encode("Emoji and accents: 🎉 café 日本語 ")
    assert "".join(pieces) == adapter.decode_text(adapter.generate(prompt, 24)[len(prompt):])


@pytest.mark.parametrize("name", [SMOL, QWEN])
def test_score_equals_transformers_logprobs(name):
    hf, tok = hf_reference(name)
    adapter = jax_adapter(name)
    texts = ["The quick brown fox jumps over the lazy dog.",
             "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
             "Short one."]
    seqs = [tok(t)["input_ids"] for t in texts]
    ours = adapter.score(seqs)
    for ids, lp in zip(seqs, ours):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0]
        ref = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
        assert lp.shape == (len(ids) - 1,)
        np.testing.assert_allclose(lp, ref, atol=1e-3, rtol=1e-3)


def test_loglikelihood_form():
    adapter = jax_adapter(SMOL)
    lp_paris, greedy_paris = adapter.loglikelihood("The capital of France is", " Paris")
    lp_london, greedy_london = adapter.loglikelihood("The capital of France is", " London")
    ctx, cont = adapter.encode("The capital of France is"), adapter.encode(" Paris", add_special_tokens=False)
    assert lp_paris == pytest.approx(float(adapter.score([ctx + cont])[0][-len(cont):].sum()), abs=1e-5)
    assert greedy_paris and not greedy_london and lp_paris > lp_london


def test_perplexity_matches_transformers_sliding_window():
    """transformers' perplexity guide: windows of `context` moved by `stride`, each token
    scored once (labels before the new part masked with -100)."""
    hf, tok = hf_reference(SMOL)
    adapter = jax_adapter(SMOL)
    ids = tok(_long_text())["input_ids"]
    assert len(ids) > 2000
    context, stride = 256, 128
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == len(ids):
            break
    ref = float(np.exp(nll_sum / n_tokens))
    ours, counted = adapter.perplexity(ids, context=context, stride=stride)
    print(f"perplexity over {counted} tokens: jaxllama {ours:.4f}, transformers {ref:.4f}")
    assert counted == n_tokens
    assert abs(ours - ref) / ref < 0.005


def test_unload_frees_and_others_keep_working():
    keep = jax_adapter(SMOL)
    before = keep.generate([1, 2, 3], 4)
    other = LlamaInferenceAdapter.from_gguf(SMOL, progress=False)
    leaves = jax.tree_util.tree_leaves(other.model.params)
    assert other.vram_usage() > 0
    stats = other.model.params.embed.devices().pop().memory_stats()
    unloaded = other.unload()
    assert leaves and all(leaf.is_deleted() for leaf in leaves)
    assert unloaded.vram_usage() == 0 and other.vram_usage() == 0
    if stats is not None and "bytes_in_use" in stats:  # backends that report memory (GPU)
        after = keep.model.params.embed.devices().pop().memory_stats()["bytes_in_use"]
        assert after < stats["bytes_in_use"]
    for adapter in (unloaded, other):
        with pytest.raises(ModelNotLoaded, match="Model not loaded"):
            adapter.generate([1, 2, 3], 4)
    assert keep.generate([1, 2, 3], 4) == before
