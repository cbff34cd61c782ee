"""The engine's scheduler against `adapter.generate` of each prompt alone: whatever
arrives with it, in any order, with cancellations, prefix caching on or off; and its
bookkeeping (no page or slot leaked, closing ends every request).

Every wait is bounded (result(timeout=...)), so a scheduler bug fails, never hangs."""

from __future__ import annotations

import asyncio
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hf_to_gguf import tiny_hf_model, write_gguf
from jaxllama.engine import steps
from jaxllama.engine.scheduler import Engine
from jaxllama.errors import EngineClosed, InvalidRequestError, QueueFull
from jaxllama.models import AdapterForwardConfig, LlamaInferenceAdapter, load_gguf

WAIT = 120  # seconds: the most any request may take here

SETTINGS = [
    dict(),
    dict(temperature=0.9, seed=7),
    dict(temperature=1.1, top_k=20, seed=123),
    dict(repetition_penalty=5.0),
    dict(temperature=0.8, top_p=0.9, min_p=0.05, seed=3),
]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = write_gguf(tiny_hf_model("llama"), tmp_path_factory.mktemp("sched") / "m.gguf")
    return LlamaInferenceAdapter.from_model(load_gguf(path, dtype=jnp.float32, progress=False))


def _engine(adapter, **options) -> Engine:
    fields = dict(num_slots=3, max_context=64, page_size=4, prefill_chunk=8, decode_steps=4)
    fields.update(options)
    return Engine.from_adapter(adapter, **fields)


_refs: dict = {}


def _reference(adapter, prompt, max_tokens, s):
    key = (tuple(prompt), max_tokens, tuple(sorted(s.items())))
    if key not in _refs:
        _refs[key] = adapter.generate(prompt, max_tokens, AdapterForwardConfig(**s))[len(prompt):]
    return _refs[key]


def _wait_running(handle):
    """Until the request has its first token (bounded)."""
    for _ in range(WAIT * 20):
        if handle.tokens or handle.done:
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"request {handle.request_id} produced nothing in {WAIT} s")


def _check_idle(engine):
    m = engine.metrics()
    assert m.requests_running == 0 and m.requests_waiting == 0 and m.slots_used == 0
    assert m.pages_used == 0 and m.pages_free + m.pages_cached == m.pages_total
    engine._alloc.check()


def test_many_requests_equal_generate_alone(adapter):
    rng = np.random.default_rng(0)
    shared = list(range(3, 15))  # a 12-token prefix (3 pages) shared by some prompts
    prompts = []
    for i in range(9):
        tail = rng.integers(3, adapter.config.vocab_size, int(rng.integers(1, 14))).tolist()
        prompts.append(shared + tail if i % 2 else tail)
    requests = [(p, int(rng.integers(1, 12)), SETTINGS[i % len(SETTINGS)])
                for i, p in enumerate(prompts)]
    refs = [_reference(adapter, *r) for r in requests]
    # Chunks of 32 (buckets 16, 32): the rest of a prompt after its cached prefix runs
    # padded to resume_bucket (16), a prompt's first chunk to its bucket.
    with _engine(adapter, prefill_chunk=32) as engine:
        assert engine.spec.resume_bucket == 16 < engine.spec.chunk_size
        handles = [engine.submit(p, m, **s) for p, m, s in requests]
        outs = [h.result(timeout=WAIT) for h in handles]
        for out, ref, req in zip(outs, refs, requests):
            assert out.tokens == ref, req
            stop = out.tokens[-1] in adapter.eos_ids()
            assert out.finish_reason == ("stop" if stop else "length")
            assert out.ttft is not None and len(out.inter_token_times) == len(out.tokens) - 1
        # Later prompts with the shared prefix were served pages from the cache.
        assert sum(o.cached_tokens for o in outs) >= 8
        m = engine.metrics()
        assert m.prefix_hit_tokens == sum(o.cached_tokens for o in outs)
        assert m.requests_finished == len(requests)
        assert m.generation_tokens_total == sum(len(o.tokens) for o in outs)
        _check_idle(engine)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_schedules(adapter, data):
    """Random prompts (some sharing prefixes), lengths, settings, arrival gaps and
    cancellations, with prefix caching on or off: every request not cancelled equals
    its reference, a cancelled one's tokens are a prefix of it, nothing leaks."""
    caching = data.draw(st.booleans(), label="prefix_caching")
    budget = data.draw(st.sampled_from([None, 1, 8, 20]), label="prefill_budget")
    n = data.draw(st.integers(2, 7), label="requests")
    base = list(range(3, 11))
    requests, cancel = [], []
    for _ in range(n):
        share = data.draw(st.integers(0, len(base)))
        tail = data.draw(st.lists(st.integers(3, adapter.config.vocab_size - 1),
                                  min_size=1, max_size=12))
        requests.append((base[:share] + tail, data.draw(st.integers(1, 10)),
                         data.draw(st.sampled_from(SETTINGS))))
        cancel.append(data.draw(st.booleans()) and data.draw(st.booleans()))
    with _engine(adapter, prefix_caching=caching, prefill_budget=budget) as engine:
        handles = []
        for (p, m, s), c in zip(requests, cancel):
            handles.append(engine.submit(p, m, **s))
            if c:
                handles[-1].cancel()
        for h, req, c in zip(handles, requests, cancel):
            out = h.result(timeout=WAIT)
            ref = _reference(adapter, *req)
            if out.finish_reason == "cancelled":
                assert c and out.tokens == ref[: len(out.tokens)]
            else:
                assert out.tokens == ref, req
        if not caching:
            assert engine.metrics().prefix_hit_tokens == 0
        _check_idle(engine)


def test_prefill_budget_bounds_prompt_tokens_between_decode_dispatches(adapter, monkeypatch):
    """While a slot decodes, the scheduler runs whole prompt chunks between two decode
    dispatches, oldest request first, until the next would pass prefill_budget (the
    first always runs), times the requests waiting per decoding slot; while none
    decodes, every pending chunk. A 40-token prompt
    (chunk 8, budget 20) arriving once a stream decodes runs 8 + 8 (another 8 would
    make 24), 8 + 8, 8, a decode dispatch after each; a burst arriving at an idle
    engine is prefilled in one go (4 + 8 + 8 + 8 + 8 + 8 before the first dispatch)."""
    calls = []
    real_prefill, real_decode = steps.prefill_chunk, steps.decode

    def prefill(*args, **kwargs):
        calls.append(int(args[5]))  # num_valid
        return real_prefill(*args, **kwargs)

    def decode(*args, **kwargs):
        calls.append("decode")
        return real_decode(*args, **kwargs)

    long_prompt = list(range(3, 43))
    arrived = []

    def on_token(handle, token):  # on the scheduler thread: the stream is decoding now
        if not arrived:
            arrived.append(engine.submit(long_prompt, 2, stop_ids=()))

    engine = _engine(adapter, prefill_budget=20)
    engine.warmup()  # before start: on this thread, not recorded below
    monkeypatch.setattr(steps, "prefill_chunk", prefill)
    monkeypatch.setattr(steps, "decode", decode)
    with engine:
        stream = engine.submit([5, 6, 7], 40, stop_ids=(), callback=on_token)
        _wait_running(stream)
        for _ in range(WAIT * 20):
            if arrived:
                break
            threading.Event().wait(0.05)
        assert arrived[0].result(timeout=WAIT).finish_reason == "length"
        stream.cancel()
        stream.result(timeout=WAIT)
    assert calls[:10] == [3, "decode", 8, 8, "decode", 8, 8, "decode", 8, "decode"]
    assert set(calls[10:]) == {"decode"}

    calls.clear()
    engine = _engine(adapter, prefill_budget=20)
    burst = [engine.submit([9, 10, 11, 12], 3, stop_ids=()),
             engine.submit(long_prompt, 3, stop_ids=())]
    with engine:  # both are in the inbox when the first iteration runs
        assert [h.result(timeout=WAIT).finish_reason for h in burst] == ["length", "length"]
    assert calls[:7] == [4, 8, 8, 8, 8, 8, "decode"]
    with pytest.raises(InvalidRequestError, match="prefill_budget"):
        _engine(adapter, prefill_budget=0)


def test_decode_splits_by_window_and_outputs_still_equal_generate(adapter, monkeypatch):
    """A long request beside short streams: on the XLA path an iteration decodes the
    slots of narrower windows first, as their own dispatch, then the long one's window
    (`Engine._decode_groups`), when that costs at most half of one dispatch; with a
    weights pass priced at 0 pages it always does here. Every output still equals
    adapter.generate of its prompt alone, and a weights pass priced above the dense
    dispatch never splits."""
    dispatches, groupings = [], []
    real_decode, real_groups = steps.decode, Engine._decode_groups

    def decode(params, state, spec, window=None, rows=None):
        dispatches.append(window)
        return real_decode(params, state, spec, window, rows)

    def groups(self, decoding):
        out = real_groups(self, decoding)
        groupings.append([sorted(len(r.pages) for r in g) for g in out])
        return out

    long_prompt = list(range(3, 43))  # 40 tokens: 10 pages of 4, window 16
    # The streams stay within 8 pages (32 tokens) and outlast the long prompt's prefill.
    requests = [([9, 10], 24, {}), ([5, 6, 7], 24, dict(temperature=0.9, seed=7)),
                (long_prompt, 6, {})]
    refs = [_reference(adapter, *r) for r in requests]  # before the spy: generate decodes too
    monkeypatch.setattr(steps, "decode", decode)
    monkeypatch.setattr(Engine, "_decode_groups", groups)
    assert all(len(r) == 24 for r in refs[:2]), "a stream ends early: pick other prompts"
    for weight_pages, split in ((0.0, True), (1e9, False)):
        dispatches.clear()
        groupings.clear()
        # The engine thread holds at the first stream's first token that comes while
        # the second has one too, until the long request is submitted: the long prompt
        # then always joins while both streams decode, however slow this machine is.
        both, submitted, streams = threading.Event(), threading.Event(), []

        def hold(handle, token, streams=streams, both=both, submitted=submitted):
            if token is not None and not both.is_set() and streams[1].tokens:
                both.set()
                assert submitted.wait(WAIT)

        with _engine(adapter, prefill_chunk=32) as engine:  # the long prompt in 2 chunks
            assert engine.spec.windows == (8, 16) and engine._weight_pages > 0
            engine._weight_pages = weight_pages
            (p0, m0, s0), (p1, m1, s1) = requests[:2]
            streams.append(engine.submit(p0, m0, callback=hold, **s0))
            streams.append(engine.submit(p1, m1, **s1))
            assert both.wait(WAIT), "the two streams never decoded together"
            long = engine.submit(*requests[2][:2])
            submitted.set()
            outs = [h.result(timeout=WAIT) for h in streams + [long]]
            assert [o.tokens for o in outs] == refs
            _check_idle(engine)
        # One dispatch per group, in order; split: the streams' pages (window 8), then
        # the long request's (window 16).
        assert len(dispatches) == sum(len(g) for g in groupings)
        two = [g for g in groupings if len(g) == 2]
        assert bool(two) == split, groupings
        assert all(max(n) <= 8 < min(w) for n, w in two) and 16 in dispatches


def test_stream_iterators_and_callback(adapter):
    prompt, m = [5, 9, 17, 33], 10
    ref = _reference(adapter, prompt, m, {})
    seen = []
    with _engine(adapter) as engine:
        h = engine.submit(prompt, m, callback=lambda handle, tok: seen.append(tok))
        got = []
        box = threading.Thread(target=lambda: got.extend(h))
        box.start()
        box.join(WAIT)
        assert got == ref and seen == ref + [None]

        async def consume():
            h2 = engine.submit(prompt, m)
            return [t async for t in h2]

        assert asyncio.run(asyncio.wait_for(consume(), WAIT)) == ref


def test_cancel_frees_slot_at_once_and_others_continue(adapter):
    with _engine(adapter, num_slots=2) as engine:
        long = engine.submit([7] * 5, 50)
        _wait_running(long)
        other = engine.submit([8, 9, 10], 6)
        long.cancel()
        out = long.result(timeout=WAIT)
        assert out.finish_reason == "cancelled" and len(out.tokens) < 50
        assert other.result(timeout=WAIT).tokens == _reference(adapter, [8, 9, 10], 6, {})
        _check_idle(engine)


def test_refusals_and_close(adapter):
    engine = _engine(adapter, max_waiting=1, num_slots=1)
    with pytest.raises(InvalidRequestError, match="expected at most 64"):
        engine.submit([3] * 60, 10)  # 70 tokens never fit max_context 64
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.submit([adapter.config.vocab_size], 4)
    with pytest.raises(InvalidRequestError, match="temperature"):
        engine.submit([3, 4], 4, temperature=-1.0)
    with pytest.raises(InvalidRequestError, match="logprobs"):
        engine.submit([3, 4], 4, logprobs=2)  # this engine has top_logprobs 0
    # Not started: requests wait; one more than max_waiting is refused.
    first = engine.submit([3, 4], 30)
    with pytest.raises(QueueFull, match="max_waiting=1"):
        engine.submit([3, 4], 4)
    engine.start()
    _wait_running(first)
    engine.close()
    with pytest.raises(EngineClosed):
        first.result(timeout=WAIT)
    with pytest.raises(EngineClosed):
        engine.submit([3, 4], 4)


def test_logprobs_and_warmup(adapter):
    prompt = [4, 8, 15, 16, 23, 42]
    with _engine(adapter, top_logprobs=3) as engine:
        engine.warmup()
        out = engine.submit(prompt, 7, logprobs=2, temperature=0.7, seed=11).result(timeout=WAIT)
    ref = adapter.score([prompt + out.tokens])[0][len(prompt) - 1:]
    np.testing.assert_allclose(out.logprobs, ref, atol=1e-4)
    assert all(len(top) == 2 and top[0][1] >= top[1][1] for top in out.top_logprobs)


def test_session_compiles_nothing_after_warmup(adapter):
    """100 requests of varied prompt and output lengths (first chunks of every bucket,
    long prompts in several chunks, prefix-cache hits that start mid-prompt) compile no
    program after `warmup`: every shape a schedule can meet is in
    spec.prefill_shapes() and spec.decode_widths x spec.windows, whatever the number
    of requests."""
    from jaxllama.bench import CompileLog

    rng = np.random.default_rng(5)
    shared = list(range(3, 23))  # 20 tokens: 5 full pages a later prompt can reuse
    with CompileLog() as log, _engine(adapter, num_slots=4, max_context=96,
                                      prefill_chunk=32) as engine:
        mark = log.mark()
        engine.warmup()
        spec = engine.spec
        warm = len(log.since(mark))
        decodes = len(spec.decode_widths) * len(spec.windows)
        bound = len(spec.prefill_shapes()) + decodes + 3  # + set_pages, insert, release
        print(f"warmup compiled {warm} programs (bound {bound}): prefill {spec.prefill_shapes()}, "
              f"decode widths {spec.decode_widths} x windows {spec.windows}")
        assert len(spec.windows) > 1 and len(spec.decode_widths) > 1 and warm <= bound + 4
        mark = log.mark()
        handles = []
        for i in range(100):
            n = int(rng.integers(1, 70))
            prompt = rng.integers(3, adapter.config.vocab_size, n).tolist()
            if i % 3 == 0:
                prompt = shared + prompt[:50]
            handles.append(engine.submit(prompt, int(rng.integers(1, 96 - len(prompt) + 1))))
        outs = [h.result(timeout=WAIT) for h in handles]
        during = log.since(mark)
        print(f"100 requests: {sum(len(o.tokens) for o in outs)} tokens, "
              f"{sum(o.cached_tokens for o in outs)} prompt tokens from the cache, "
              f"{len(during)} compilations")
        assert sum(o.cached_tokens for o in outs) > 0
        assert during == []
        _check_idle(engine)


@pytest.mark.slow
def test_real_smollm2_requests_equal_generate_alone():
    """SmolLM2-135M (the packaged file, float32): four chat requests arriving together,
    greedy and seeded, two sharing the chat template's system prefix, one cancelled
    request among them; each output equals adapter.generate of its prompt alone."""
    from conftest import jax_adapter

    adapter = jax_adapter("smollm2-135m-instruct")
    questions = ["Name three primary colors.", "What is 12 times 7?",
                 "Write a haiku about rain.", "Say hello in French."]
    prompts = [adapter.prompt_ids([{"role": "user", "content": q}]) for q in questions]
    settings_ = [dict(), dict(temperature=0.8, top_p=0.9, seed=11), dict(),
                 dict(temperature=0.7, top_k=40, seed=5, repetition_penalty=1.1)]
    refs = [adapter.generate(p, 20, AdapterForwardConfig(**s))[len(p):]
            for p, s in zip(prompts, settings_)]
    with Engine.from_adapter(adapter, num_slots=3, max_context=256, prefill_chunk=64,
                             decode_steps=4) as engine:
        engine.warmup()
        doomed = engine.submit(prompts[0] + prompts[1], 60)
        handles = [engine.submit(p, 20, **s) for p, s in zip(prompts, settings_)]
        _wait_running(doomed)
        doomed.cancel()
        outs = [h.result(timeout=WAIT) for h in handles]
        assert doomed.result(timeout=WAIT).finish_reason == "cancelled"
        assert [o.tokens for o in outs] == refs
        assert any(o.cached_tokens > 0 for o in outs)  # the template's shared system prompt
        _check_idle(engine)


def _hf_greedy(hf, prompt, max_tokens) -> list[int]:
    """transformers' greedy continuation of `prompt` (no EOS stop)."""
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0].tolist()[len(prompt):]


def test_sliding_window_model_equals_transformers_and_generate(tmp_path):
    """A Phi-3 with an 8-token sliding window (Phi-3-mini's is 2,047) served with a
    context far past it: prompts and outputs cross the window, so the prefill chunks
    (the paged twin) and the decode (transformer.forward over the dense window) must
    both mask by it. Greedy outputs equal transformers' generate; greedy and seeded
    outputs equal adapter.generate of each prompt alone; nothing leaks."""
    hf = tiny_hf_model("phi3", sliding_window=8)
    a = LlamaInferenceAdapter.from_model(load_gguf(write_gguf(hf, tmp_path / "phi3.gguf"),
                                                   dtype=jnp.float32, progress=False))
    assert a.config.sliding_window == 8
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, a.config.vocab_size, n).tolist() for n in (5, 13, 21, 30)]
    requests = [(p, 14, SETTINGS[i % 2]) for i, p in enumerate(prompts)]
    hf_greedy = [_hf_greedy(hf, p, m) for p, m, s in requests if not s]
    refs = [_reference(a, *r) for r in requests]
    greedy = [r for r, (_, _, s) in zip(refs, requests) if not s]
    # adapter.generate stops at EOS; transformers was told not to.
    assert all(h[:len(g)] == g for h, g in zip(hf_greedy, greedy))
    assert [len(g) for g in greedy] == [14, 14], "pick prompts that do not end early"
    with _engine(a, max_context=64, page_size=4, prefill_chunk=8) as engine:
        handles = [engine.submit(p, m, **s) for p, m, s in requests]
        assert [h.result(timeout=WAIT).tokens for h in handles] == refs
        _check_idle(engine)
    # Without the window the outputs differ: the test sees the mask.
    plain = LlamaInferenceAdapter.from_model(load_gguf(
        write_gguf(tiny_hf_model("phi3"), tmp_path / "plain.gguf"), dtype=jnp.float32,
        progress=False))
    assert plain.config.sliding_window is None
    assert plain.generate(prompts[2], 14)[len(prompts[2]):] != greedy[1]


def test_longrope_model_equals_transformers_and_generate(tmp_path):
    """A Phi-3 with LongRoPE (original context 64 here; Phi-3 128k's is 4,096): its
    factors follow a call's furthest position, as in transformers. The engine gives
    every chunk of a prompt the prompt's end, so a 75-token prompt run in 16-token
    chunks is rotated as one call would rotate it; a 30-token prompt decodes past 64;
    the long prompt's cached pages serve a longer prompt (long factors both) but not a
    short prompt with the same first tokens (short factors). Every output equals
    adapter.generate of its prompt alone; greedy equals transformers' generate except
    past the crossing of a decode that crosses the original context, where
    transformers' Phi-3 recomputes its whole cache under the long factors and the
    adapter (so the engine) keeps the keys it has (the divergence is asserted, so a
    change of either side shows here)."""
    hf = tiny_hf_model("phi3_longrope")
    a = LlamaInferenceAdapter.from_model(load_gguf(write_gguf(hf, tmp_path / "lr.gguf"),
                                                   dtype=jnp.float32, progress=False))
    assert a.config.rope_long_factors is not None and a.config.rope_original_context == 64
    rng = np.random.default_rng(5)
    vocab = a.config.vocab_size
    long_prompt = rng.integers(3, vocab, 75).tolist()
    crossing = (rng.integers(3, vocab, 30).tolist(), 40, {})  # 30 + 40 > 64
    long = (long_prompt, 8, {})
    longer = (long_prompt[:72] + rng.integers(3, vocab, 9).tolist(), 6,
              dict(temperature=0.9, seed=2))  # 81 tokens: reuses the long pages
    short = (long_prompt[:16] + rng.integers(3, vocab, 5).tolist(), 6, {})  # 21: must not
    requests = [crossing, long, longer, short]
    refs = [_reference(a, *r) for r in requests]
    cross = 64 - len(crossing[0])  # the first token sampled from a call reaching 65
    for (p, m, s), ref in zip(requests, refs):
        if not s:
            want = _hf_greedy(hf, p, m)
            if p is crossing[0]:
                assert want[:cross] == ref[:cross] and want[cross:] != ref[cross:]
            else:
                assert want[:len(ref)] == ref
    assert len(refs[0]) == 40, "the crossing prompt must not end early"
    with _engine(a, max_context=128, page_size=4, prefill_chunk=16) as engine:
        first = [engine.submit(p, m, **s) for p, m, s in requests[:2]]
        outs = [h.result(timeout=WAIT) for h in first]
        then = [engine.submit(p, m, **s) for p, m, s in requests[2:]]
        outs += [h.result(timeout=WAIT) for h in then]
        assert [o.tokens for o in outs] == refs
        assert outs[2].cached_tokens == 72 and outs[3].cached_tokens == 0
        _check_idle(engine)
