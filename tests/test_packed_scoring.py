"""Packed scoring (`generation.score_packed` via `adapter.score` / `loglikelihood_batch`)
against the one-sequence-per-row path (`score(..., packed=False)`, the plain causal mask)
on a tiny random float32 model, and the segment rule of `attention_mask` against a
brute-force statement of it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxllama import generation
from jaxllama.errors import InvalidRequestError
from jaxllama.models import LlamaInferenceAdapter
from jaxllama.models import transformer
from jaxllama.models.config import ROPE_INTERLEAVED, ModelConfig
from jaxllama.models.random_weights import random_model
from jaxllama.pallas.reference import attention_mask
from jaxllama.quant import quantize

VOCAB = 96
CONFIG = ModelConfig(arch="llama", vocab_size=VOCAB, hidden_dim=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, ffn_dim=128, rms_eps=1e-5, context_length=512,
                     rope_theta=10000.0, rope_style=ROPE_INTERLEAVED)
SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_ADAPTER = []
MATMULS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def adapter() -> LlamaInferenceAdapter:
    if not _ADAPTER:
        _ADAPTER.append(LlamaInferenceAdapter.from_model(random_model(CONFIG, jnp.float32, seed=3)))
    return _ADAPTER[0]


ids = st.integers(0, VOCAB - 1)


@SETTINGS
@given(st.lists(st.lists(ids, min_size=2, max_size=70), min_size=1, max_size=24))
def test_packed_score_equals_one_sequence_per_row(seqs):
    a = adapter()
    packed = a.score(seqs)
    alone = a.score(seqs, packed=False)
    for p, u, s in zip(packed, alone, seqs):
        assert p.shape == (len(s) - 1,)
        np.testing.assert_allclose(p, u, atol=1e-5, rtol=0)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 4), st.lists(ids, min_size=1, max_size=6)), min_size=1, max_size=16),
       st.lists(st.lists(ids, min_size=1, max_size=30), min_size=5, max_size=5))
def test_shared_contexts_equal_separate_requests(choices, contexts):
    """Multiple-choice shape: several continuations of one context, scored with the
    context fed once (branches), equal each pair scored on its own."""
    a = adapter()
    pairs = [(contexts[c], cont) for c, cont in choices]
    shared = a.loglikelihood_batch(pairs)
    for (ctx, cont), (lp, greedy) in zip(pairs, shared):
        ref = a.score([ctx + cont], packed=False)[0][-len(cont):]
        assert lp == pytest.approx(float(ref.sum()), abs=1e-5)
    # is_greedy against the argmax of a plain forward pass
    unshared = a.loglikelihood_batch(pairs, share_context=False)
    assert [g for _, g in shared] == [g for _, g in unshared]


@SETTINGS
@given(st.lists(st.lists(ids, min_size=2, max_size=20), min_size=2, max_size=8), st.data())
def test_segments_never_see_each_other(seqs, data):
    """Changing every other request's tokens in the same rows changes nothing of one
    request's scores (and the rows do hold several requests)."""
    a = adapter()
    requests = [(s[:1], s[1:]) for s in seqs]
    rows = generation.pack_requests(requests, 256, share_context=False)
    assert len(rows) == 1  # all of them in one row
    target = data.draw(st.integers(0, len(seqs) - 1))
    other = [(r if i == target else ([(t + 1) % VOCAB for t in r[0]], [(t + 7) % VOCAB for t in r[1]]))
             for i, r in enumerate(requests)]

    def run(reqs):
        arr = generation.packed_arrays(reqs, rows, 256, 1)
        lp, _ = generation.score_packed(
            a.model.params, jnp.asarray(arr.tokens), a._new_cache(1, 256), jnp.asarray(arr.rope_positions),
            jnp.asarray(arr.segment_ids), jnp.asarray(arr.branch_ids), jnp.asarray(arr.pred_index),
            jnp.asarray(arr.targets), model_fn=a._fn(), config=CONFIG, attention_impl=a._impl())
        r, s, e = arr.spans[target]
        return np.asarray(lp)[r, s:e]

    np.testing.assert_array_equal(run(requests), run(other))


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 12), st.data())
def test_attention_mask_segment_rule(b, s, data):
    seg = np.array(data.draw(st.lists(st.lists(st.integers(0, 2), min_size=s, max_size=s), min_size=b, max_size=b)))
    br = np.array(data.draw(st.lists(st.lists(st.integers(0, 2), min_size=s, max_size=s), min_size=b, max_size=b)))
    qpos = np.array(data.draw(st.lists(st.lists(st.integers(0, s - 1), min_size=3, max_size=3),
                                       min_size=b, max_size=b)))
    lengths = np.array(data.draw(st.lists(st.integers(0, s), min_size=b, max_size=b)))
    got = np.asarray(attention_mask(jnp.asarray(qpos), jnp.asarray(lengths), s, None, jnp.asarray(seg),
                                    jnp.asarray(br)))
    for i in range(b):
        for t in range(3):
            q = qpos[i, t]
            for k in range(s):
                want = (k <= q and k < lengths[i] and seg[i, k] == seg[i, q]
                        and (br[i, k] == 0 or br[i, k] == br[i, q]))
                assert got[i, t, k] == want
    plain = np.asarray(attention_mask(jnp.asarray(qpos), jnp.asarray(lengths), s))
    assert np.array_equal(plain, np.asarray(attention_mask(jnp.asarray(qpos), jnp.asarray(lengths), s, None,
                                                           jnp.zeros((b, s), jnp.int32))))


def test_first_fit_decreasing_and_bucketed_programs():
    """Rows are filled first-fit by decreasing length; every request lands exactly once."""
    reqs = [([1] * n, [2]) for n in (200, 120, 100, 60, 50, 30)]
    rows = generation.pack_requests(reqs, 256, share_context=False)
    lengths = [[len(c) for c, _ in row] for row in rows]
    assert lengths == [[200, 50], [120, 100, 30], [60]]
    arr = generation.packed_arrays(reqs, rows, 256, 4)
    assert sorted(arr.spans) == list(range(len(reqs)))
    assert arr.tokens.shape == (4, 256) and (arr.segment_ids[3] == 0).all()


def test_bad_pairs_are_refused():
    a = adapter()
    with pytest.raises(InvalidRequestError, match="pair 1"):
        a.loglikelihood_batch([([1, 2], [3]), ([1], [])])
    with pytest.raises(InvalidRequestError, match="exceeds the context length 512"):
        a.loglikelihood_batch([([1] * 500, [2] * 20)])
    with pytest.raises(InvalidRequestError, match="batch_size"):
        a.loglikelihood_batch([([1], [2])], batch_size=0)


def _with_layers(model, layers):
    return dataclasses.replace(model, params=model.params.replace(layers=tuple(layers)))


@pytest.mark.parametrize("kind", [None, "int8"])
def test_scan_over_stacked_layers_equals_the_unrolled_layers(kind):
    """Packed scoring over the layers as one lax.scan (stacked weights) gives the unrolled
    layers' scores, dense and int8-quantized, and the stacked copy is counted (and freed
    by unload)."""
    model = random_model(CONFIG, jnp.float32, seed=4)  # its own: unloaded at the end
    if kind:
        model = _with_layers(model, (layer.replace(**{f: quantize(getattr(layer, f), kind) for f in MATMULS})
                                     for layer in model.params.layers))
    scan = LlamaInferenceAdapter.from_model(model, scan_layers=True)
    unrolled = LlamaInferenceAdapter.from_model(model, scan_layers=False)
    rng = np.random.default_rng(5)
    pairs = [(rng.integers(0, VOCAB, int(rng.integers(1, 40))).tolist(),
              rng.integers(0, VOCAB, int(rng.integers(1, 6))).tolist()) for _ in range(12)]
    pairs += [(pairs[0][0], [int(t)]) for t in rng.integers(0, VOCAB, 3)]  # a shared context
    before = scan.vram_usage()
    got, want = scan.loglikelihood_batch(pairs), unrolled.loglikelihood_batch(pairs)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got, want):
        assert lp == pytest.approx(ref_lp, abs=1e-5)
        assert greedy == ref_greedy
    assert transformer.is_stacked(scan._stacked_params) and "_stacked_params" not in unrolled.__dict__
    layer_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(model.params.layers))
    assert scan.vram_usage() == before + layer_bytes == unrolled.vram_usage() + layer_bytes
    gone = scan.unload()
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(scan.__dict__.get("_stacked_params")))
    assert gone.vram_usage() == 0


def test_layers_of_different_structure_are_not_stacked():
    """One int8 layer among dense ones: stack_layers refuses them (saying why), and the
    adapter scores them unrolled instead."""
    model = adapter().model
    first = model.params.layers[0]
    mixed = _with_layers(model, (first.replace(w_up=quantize(first.w_up, "int8")), *model.params.layers[1:]))
    assert not transformer.can_stack(mixed.params)
    with pytest.raises(InvalidRequestError, match="one structure"):
        transformer.stack_layers(mixed.params)
    a = LlamaInferenceAdapter.from_model(mixed, scan_layers=True)
    lp, _ = a.loglikelihood_batch([([1, 2, 3], [4, 5])])[0]
    ref = LlamaInferenceAdapter.from_model(mixed, scan_layers=False).score([[1, 2, 3, 4, 5]], packed=False)[0]
    assert lp == pytest.approx(float(ref[-2:].sum()), abs=1e-5)
    assert "_stacked_params" not in a.__dict__
    with pytest.raises(InvalidRequestError, match="scan_layers"):
        LlamaInferenceAdapter.from_model(model, scan_layers="yes")


def test_default_scans_first_then_unrolls(monkeypatch):
    """scan_layers None on the CPU: the stacked copy serves the first SCAN_ROW_TOKENS row
    tokens, then is dropped and the unrolled layers give the same scores."""
    from jaxllama.models import adapter as adapter_module

    monkeypatch.setattr(adapter_module, "SCAN_ROW_TOKENS", 256)  # one 256-wide row
    a = LlamaInferenceAdapter.from_model(adapter().model)
    pairs = [([1, 2, 3], [4, 5]), ([6, 7], [8])]
    first = a.loglikelihood_batch(pairs)
    assert "_stacked_params" in a.__dict__
    second = a.loglikelihood_batch(pairs)
    assert "_stacked_params" not in a.__dict__
    for (lp, g), (lp2, g2) in zip(first, second):
        assert lp == pytest.approx(lp2, abs=1e-5) and g == g2
