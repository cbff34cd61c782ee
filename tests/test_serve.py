"""`jaxllama serve` through the official `openai` client, lm-evaluation-harness and raw
HTTP, against independent references: `adapter.generate` (greedy and seeded), `adapter.
score` / `adapter.loglikelihood` (log-probabilities), the tokenizer (usage counts).

Each server is started by the test module on a free 127.0.0.1 port in a thread
(tests/serve_util.py) and stopped by it; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from conftest import jax_adapter
from hf_to_gguf import CHATML_TEMPLATE, tiny_hf_model, write_gguf
from jaxllama.engine.scheduler import Engine
from jaxllama.models import AdapterForwardConfig, LlamaInferenceAdapter, load_gguf
from jaxllama.serve import create_app
from serve_util import free_socket, running_server, wait_healthy

WAIT = 120  # seconds: the most one request may take here
SMOL = "smollm2-135m-instruct"
TINY = "tiny-qwen2"


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmRSS"))) * 1024


# ------------------------------------------------------------------ the tiny model server
@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_gguf(tiny_hf_model("qwen2"), tmp_path_factory.mktemp("serve") / "tiny.gguf",
                      chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_path):
    return LlamaInferenceAdapter.from_model(load_gguf(tiny_path, dtype=jnp.float32,
                                                      progress=False))


@pytest.fixture(scope="module")
def tiny_engine(tiny_adapter):
    engine = Engine.from_adapter(tiny_adapter, num_slots=4, max_context=128, page_size=8,
                                 prefill_chunk=32, decode_steps=4, top_logprobs=5,
                                 max_waiting=256)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tiny_server(tiny_adapter, tiny_engine):
    app = create_app(tiny_adapter, tiny_engine, model_name=TINY, max_body_bytes=2**20,
                     close_engine=False)
    with running_server(app) as url:
        yield url


def _good(url, **headers):
    """A good request works (after a refused one)."""
    r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=WAIT,
                   json={"model": TINY, "prompt": "The fox", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["finish_reason"]


def _bad(status, param=None, code=None):
    return status, param, code


LONG = "The quick brown fox jumps over the lazy dog. " * 20  # beyond the 128-token context

BAD_REQUESTS = {
    "malformed_json": ("/v1/completions", b'{"prompt": "x", "max_tokens": ', _bad(400, None, "invalid_json")),
    "not_an_object": ("/v1/completions", b'[1, 2]', _bad(400)),
    "prompt_wrong_type": ("/v1/completions", {"prompt": 12.5}, _bad(400, "prompt")),
    "prompt_missing": ("/v1/completions", {"max_tokens": 3}, _bad(400, "prompt")),
    "max_tokens_string": ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, _bad(400, "max_tokens")),
    "max_tokens_zero": ("/v1/completions", {"prompt": "x", "max_tokens": 0}, _bad(400, "max_tokens")),
    "max_tokens_negative": ("/v1/completions", {"prompt": "x", "max_tokens": -5}, _bad(400, "max_tokens")),
    "max_tokens_beyond_context": ("/v1/completions", {"prompt": "x", "max_tokens": 500},
                                  _bad(400, "max_tokens", "context_length_exceeded")),
    "max_completion_tokens_beyond_context": (
        "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                 "max_completion_tokens": 500},
        _bad(400, "max_completion_tokens", "context_length_exceeded")),
    "prompt_beyond_context": ("/v1/completions", {"prompt": LONG, "max_tokens": 1},
                              _bad(400, "prompt", "context_length_exceeded")),
    "temperature_nan": ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', _bad(400, "temperature")),
    "temperature_string": ("/v1/completions", {"prompt": "x", "temperature": "hot"}, _bad(400, "temperature")),
    "top_p_zero": ("/v1/completions", {"prompt": "x", "top_p": 0}, _bad(400, "top_p")),
    "n_zero": ("/v1/completions", {"prompt": "x", "n": 0}, _bad(400, "n")),
    "stop_wrong_type": ("/v1/completions", {"prompt": "x", "stop": [1]}, _bad(400, "stop")),
    "unknown_model": ("/v1/completions", {"model": "gpt-5", "prompt": "x"}, _bad(404, "model", "model_not_found")),
    "ids_out_of_range": ("/v1/completions", {"prompt": [5, 300, 7]}, _bad(400, "prompt")),
    "ids_negative": ("/v1/completions", {"prompt": [[5, -1]]}, _bad(400, "prompt")),
    "logprobs_too_many": ("/v1/completions", {"prompt": "x", "logprobs": 9}, _bad(400, "logprobs")),
    "stream_options_without_stream": ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}},
                                      _bad(400, "stream_options")),
    "empty_messages": ("/v1/chat/completions", {"messages": []}, _bad(400, "messages")),
    "messages_wrong_type": ("/v1/chat/completions", {"messages": "hi"}, _bad(400, "messages")),
    "message_bad_role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]},
                         _bad(400, "messages[0].role")),
    "top_logprobs_without_logprobs": ("/v1/chat/completions",
                                      {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
                                      _bad(400, "top_logprobs")),
    "presence_penalty": ("/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1.0},
                         _bad(400, "presence_penalty")),
    "detokenize_bad_ids": ("/detokenize", {"tokens": [1, 99999]}, _bad(400, "tokens")),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request(tiny_server, case):
    route, body, (status, param, code) = BAD_REQUESTS[case]
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{tiny_server}{route}", headers={"content-type": "application/json"},
                   timeout=WAIT, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    _good(tiny_server)


def test_body_over_limit_is_413(tiny_server):
    big = json.dumps({"prompt": "x" * (10 * 2**20)}).encode()  # 10 MB
    r = httpx.post(f"{tiny_server}/v1/completions", content=big, timeout=WAIT,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == "request_too_large"
    _good(tiny_server)


def test_unknown_fields_ignored_and_extras(tiny_server, tiny_adapter):
    r = httpx.post(f"{tiny_server}/v1/completions", timeout=WAIT, json={
        "prompt": "The fox", "max_tokens": 4, "temperature": 0, "user": "x", "whatever": [1]})
    assert r.status_code == 200, r.text
    ids = tiny_adapter.encode("The fox")
    ref = tiny_adapter.generate(ids, 4)[len(ids):]
    assert r.json()["choices"][0]["text"] == tiny_adapter.decode_text(ref)
    models = httpx.get(f"{tiny_server}/v1/models", timeout=WAIT).json()
    assert [m["id"] for m in models["data"]] == [TINY]
    tok = httpx.post(f"{tiny_server}/tokenize", json={"prompt": "The fox"}, timeout=WAIT).json()
    assert tok["tokens"] == ids and tok["count"] == len(ids)
    detok = httpx.post(f"{tiny_server}/detokenize", json={"tokens": ids}, timeout=WAIT).json()
    assert detok["prompt"] == "The fox"
    info = httpx.get(f"{tiny_server}/tokenizer_info", timeout=WAIT).json()
    assert info["eos_token"] == tiny_adapter.tokenizer.id_to_token(tiny_adapter.eos_ids()[0])


def test_api_key(tiny_adapter, tiny_engine):
    app = create_app(tiny_adapter, tiny_engine, model_name=TINY, api_key="sekret",
                     warmup=False, close_engine=False)
    with running_server(app) as url:
        assert httpx.get(f"{url}/health", timeout=WAIT).status_code == 200  # no key needed
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            for method, route in (("POST", "/v1/completions"), ("GET", "/v1/models"),
                                  ("GET", "/metrics"), ("POST", "/tokenize")):
                r = httpx.request(method, f"{url}{route}", headers=headers, timeout=WAIT,
                                  json={"prompt": "x"})
                assert r.status_code == 401, (headers, route, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
        _good(url, Authorization="Bearer sekret")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0,
                               timeout=WAIT)
        assert client.completions.create(model=TINY, prompt="a", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_health_503_until_warmed(tiny_adapter):
    engine = Engine.from_adapter(tiny_adapter, num_slots=1, max_context=64, page_size=8,
                                 prefill_chunk=16, decode_steps=2)
    warm, gate = engine.warmup, threading.Event()

    def held_warmup():  # the warmup waits for the test's word
        assert gate.wait(WAIT)
        warm()

    engine.warmup = held_warmup
    app = create_app(tiny_adapter, engine, model_name=TINY)
    with running_server(app, healthy=False) as url:
        r = httpx.get(f"{url}/health", timeout=WAIT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        gate.set()
        wait_healthy(url, timeout=WAIT)
        _good(url)


def test_queue_full_is_429(tiny_adapter):
    engine = Engine.from_adapter(tiny_adapter, num_slots=1, max_context=64, page_size=8,
                                 prefill_chunk=16, decode_steps=2, max_waiting=0)
    app = create_app(tiny_adapter, engine, model_name=TINY, warmup=False)
    with running_server(app) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2},
                       timeout=WAIT)
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_load_with_cancellations(tiny_server, tiny_adapter):
    """200 requests, 32 at a time, a quarter dropped by the client at a random point:
    every other one finishes once, nothing stays held, memory returns to its level."""
    rng = random.Random(0)
    vocab = tiny_adapter.config.vocab_size
    plans = [dict(prompt=[rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))],
                  max_tokens=rng.randrange(1, 24), stream=rng.random() < 0.5,
                  cancel=rng.random() < 0.25, after=rng.randrange(0, 4), seed=i)
             for i in range(200)]

    async def one(client, sem, i, plan):
        body = {"model": TINY, "prompt": plan["prompt"], "max_tokens": plan["max_tokens"],
                "temperature": 0.8, "seed": plan["seed"], "stream": plan["stream"],
                "user": f"r{i}"}
        async with sem:
            if plan["stream"]:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    n, finish, ids = 0, None, set()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        ids.add(chunk["id"])
                        finish = chunk["choices"][0]["finish_reason"] or finish
                        n += 1
                        if plan["cancel"] and n > plan["after"]:
                            return i, "cancelled", None  # leaving the block closes it
                    assert len(ids) == 1
                    return i, finish, ids.pop()
            if plan["cancel"]:
                try:
                    await client.post("/v1/completions", json=body,
                                      timeout=0.005 + 0.01 * plan["after"])
                except httpx.TimeoutException:
                    return i, "cancelled", None
                return i, "finished-before-cancel", None
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["usage"]["completion_tokens"] <= plan["max_tokens"]
            return i, out["choices"][0]["finish_reason"], out["id"]

    async def run(plans):
        sem = asyncio.Semaphore(32)
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=tiny_server, timeout=WAIT, limits=limits) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, sem, i, p) for i, p in enumerate(plans))), 300)

    asyncio.run(run(plans[:40]))  # warm: every path once, compilations done
    warm = _rss()
    start = time.monotonic()
    results = asyncio.run(run(plans))
    elapsed = time.monotonic() - start
    assert sorted(i for i, *_ in results) == list(range(200))  # none lost or duplicated
    finished = [(f, rid) for _, f, rid in results if f not in ("cancelled",
                                                               "finished-before-cancel")]
    assert all(f in ("stop", "length") for f, _ in finished), finished
    ids = [rid for _, rid in finished]
    assert len(set(ids)) == len(ids)
    cancelled = sum(1 for _, f, _ in results if f == "cancelled")
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{tiny_server}/metrics", timeout=WAIT).text
        idle = (_metric(text, "jaxllama_slots_used"), _metric(text, "jaxllama_kv_pages_used"),
                _metric(text, "jaxllama_requests_waiting"),
                _metric(text, "jaxllama_requests_running"))
        if idle == (0, 0, 0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle == (0, 0, 0, 0), idle
    assert httpx.get(f"{tiny_server}/health", timeout=WAIT).status_code == 200
    after = _rss()
    print(f"\nload: 200 requests (concurrency 32, {cancelled} cancelled by the client) in "
          f"{elapsed:.1f} s; RSS warmed {warm / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB "
          f"({(after - warm) / warm:+.1%}); cached pages "
          f"{_metric(text, 'jaxllama_kv_pages_cached'):.0f}")
    assert cancelled >= 20
    assert after <= warm * 1.10
    _good(tiny_server)


def _serve_env() -> dict:
    """This environment, with the repository on PYTHONPATH (for `python -m jaxllama`)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def test_sigterm_exits_zero_within_grace(tiny_path):
    """`jaxllama serve` in a subprocess, one long stream running, SIGTERM: the stream is
    cut at the grace period's end and the process exits 0 soon after."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    grace = 2.0
    env = _serve_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxllama", "serve", "--model", str(tiny_path), "--port",
         str(port), "--slots", "2", "--max-context", "4096", "--prefill-chunk", "64",
         "--decode-steps", "1", "--grace-period", str(grace), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout=240)
        with httpx.stream("POST", f"{url}/v1/completions", timeout=WAIT, json={
                # greedy from "sun", this model repeats one token without an EOS for
                # thousands of tokens (checked with adapter.generate), so it outlasts the
                # grace period
                # (one token a dispatch: slow enough that 4000 outlast the grace period)
                "prompt": "sun", "max_tokens": 4000, "temperature": 0,
                "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = []
            try:
                rest.extend(line for line in lines if line.startswith("data: "))
            except httpx.HTTPError:  # cut at the grace period's end
                pass
        cut = time.monotonic() - sent
        code = proc.wait(timeout=grace + 30)
        took = time.monotonic() - sent
        out = proc.stdout.read()
        print(f"\nSIGTERM: exit {code} after {took:.1f} s (grace {grace} s); the stream got "
              f"{len(rest)} more events and ended after {cut:.1f} s")
        assert code == 0, out[-3000:]
        assert took < grace + 20
        # It went on during the grace period, not cut at SIGTERM. (Half the period: on a
        # loaded 2-core machine the cut was once seen at 2.2 s of 3 s; alone, 3.2 s.)
        assert cut >= grace / 2 and len(rest) > 20
        # And was cut, not finished: either the connection ends, or (when the engine
        # closes first) the stream ends with finish_reason "abort" and [DONE].
        reasons = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest
                   if line != "data: [DONE]" and json.loads(line[6:]).get("choices")]
        assert not {"stop", "length"} & set(reasons), reasons[-3:]
        assert "data: [DONE]" not in rest or "abort" in reasons
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (tests/conftest.py "
                    "sets --xla_force_host_platform_device_count=8 when XLA_FLAGS is unset)")
def test_serve_mesh_splits_the_model_and_answers_as_one_device(tiny_path, tiny_adapter):
    """`jaxllama serve --mesh 2` on 8 virtual CPU devices: it says so on start, and a
    greedy and a seeded completion equal the single-device adapter.generate. `--mesh`
    beyond the devices is refused before loading, naming the flag and the count."""
    bad = subprocess.run(
        [sys.executable, "-m", "jaxllama", "serve", "--model", str(tiny_path), "--mesh", "16"],
        env=_serve_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--mesh 16 needs 16 devices" in bad.stderr, bad.stderr
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxllama", "serve", "--model", str(tiny_path), "--port",
         str(port), "--slots", "2", "--max-context", "128", "--prefill-chunk", "32",
         "--mesh", "2", "--log-level", "warning"],
        env=_serve_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout=240)
        ids = [5, 17, 33, 60, 101]
        for config in (dict(temperature=0), dict(temperature=0.9, seed=11)):
            ref = _reference(tiny_adapter, ids, 12, **config)
            r = httpx.post(f"{url}/v1/completions", timeout=WAIT, json={
                "model": str(tiny_path), "prompt": ids, "max_tokens": 12, **config})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == tiny_adapter.decode_text(ref), config
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    out = proc.stdout.read()
    assert "over 2 devices" in out, out[-2000:]


# ------------------------------------------------------------------ the real SmolLM2
@pytest.fixture(scope="module")
def smol():
    return jax_adapter(SMOL)


@pytest.fixture(scope="module")
def smol_server(smol):
    engine = Engine.from_adapter(smol, num_slots=4, max_context=1024, prefill_chunk=256,
                                 decode_steps=8, top_logprobs=5, max_waiting=64)
    app = create_app(smol, engine, model_name=SMOL)
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=f"{smol_server}/v1", api_key="none", max_retries=0,
                         timeout=WAIT)


@pytest.fixture(scope="module")
def aclient(smol_server):
    return openai.AsyncOpenAI(base_url=f"{smol_server}/v1", api_key="none", max_retries=0,
                              timeout=WAIT)


PROMPT = "The three primary colors are"
MESSAGES = [{"role": "user", "content": "Name two planets of the solar system."}]


def _reference(adapter, ids, max_tokens, **config):
    out = adapter.generate(ids, max_tokens, AdapterForwardConfig(**config) if config else None)
    return out[len(ids):]


def _finish(adapter, ref, max_tokens):
    return "stop" if ref and ref[-1] in adapter.eos_ids() else "length"


@pytest.mark.slow
def test_completion_greedy_equals_generate(smol, client):
    ids = smol.encode(PROMPT)
    ref = _reference(smol, ids, 24)
    text = smol.decode_text(ref)
    out = client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == _finish(smol, ref, 24)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(ref)
    assert out.usage.total_tokens == len(ids) + len(ref)
    stream = client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=24,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(ref)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0
    # token ids as the prompt
    out = client.completions.create(model=SMOL, prompt=ids, max_tokens=24, temperature=0)
    assert out.choices[0].text == text


@pytest.mark.slow
def test_chat_greedy_equals_generate_sync_and_async(smol, client, aclient):
    ids = smol.prompt_ids(MESSAGES)
    ref = _reference(smol, ids, 32)
    text = smol.decode_text(ref)
    out = client.chat.completions.create(model=SMOL, messages=MESSAGES, max_tokens=32,
                                         temperature=0)
    assert out.choices[0].message.content == text
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == _finish(smol, ref, 32)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(ref)

    async def both():
        plain = await aclient.chat.completions.create(
            model=SMOL, messages=MESSAGES, max_completion_tokens=32, temperature=0)
        stream = await aclient.chat.completions.create(
            model=SMOL, messages=MESSAGES, max_tokens=32, temperature=0, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        return plain, chunks

    plain, chunks = asyncio.run(both())
    assert plain.choices[0].message.content == text
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == _finish(smol, ref, 32)
    assert chunks[-1].usage.completion_tokens == len(ref)
    # the prompt's pages were cached by the first request of this prompt
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.slow
def test_n3_seeded_reproducible_and_equal_generate(smol, client):
    ids = smol.encode(PROMPT)
    kw = dict(model=SMOL, prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.95,
              seed=1234, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1
    refs = [smol.decode_text(_reference(smol, ids, 12, temperature=0.9, top_p=0.95,
                                        seed=1234 + i)) for i in range(3)]
    assert texts == refs  # choice i samples with seed + i
    assert a.usage.prompt_tokens == len(ids)


@pytest.mark.slow
def test_stop_cuts_before_the_stop_string(smol, client):
    ids = smol.prompt_ids(MESSAGES)
    text = smol.decode_text(_reference(smol, ids, 32))
    cut = len(text) // 2
    stop = text[cut: cut + 4]  # a piece from the middle, likely across a token boundary
    expected = text[: text.index(stop)]
    out = client.chat.completions.create(model=SMOL, messages=MESSAGES, max_tokens=32,
                                         temperature=0, stop=[stop, "never-seen-here"])
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=SMOL, messages=MESSAGES, max_tokens=32,
                                                 temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    plain = smol.decode_text(_reference(smol, smol.encode(PROMPT), 24))
    stop = plain[5:8]
    out = client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=24, temperature=0,
                                    stop=stop)
    assert out.choices[0].text == plain[: plain.index(stop)]


@pytest.mark.slow
def test_logprobs_equal_score(smol, client):
    ids = smol.encode(PROMPT)
    ref = _reference(smol, ids, 10)
    scores = smol.score([ids + ref])[0][len(ids) - 1:]
    out = client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=10, temperature=0,
                                    logprobs=3)
    lp = out.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, scores, atol=1e-4)
    assert [smol.tokenizer.decode([t]) for t in ref] == lp.tokens
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert max(top.values()) == pytest.approx(value, abs=1e-6)  # greedy: the best
    chat_ids = smol.prompt_ids(MESSAGES)
    chat_ref = _reference(smol, chat_ids, 10)
    chat_scores = smol.score([chat_ids + chat_ref])[0][len(chat_ids) - 1:]
    out = client.chat.completions.create(model=SMOL, messages=MESSAGES, max_tokens=10,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    np.testing.assert_allclose([c.logprob for c in content], chat_scores, atol=1e-4)
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


@pytest.mark.slow
def test_echo_logprobs_legacy_shape(smol, client):
    ids = smol.encode(PROMPT)
    out = client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=3, temperature=0,
                                    logprobs=2, echo=True)
    choice = out.choices[0]
    ref = _reference(smol, ids, 3)
    assert choice.text == PROMPT + smol.decode_text(ref)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + len(ref)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    scores = smol.score([ids + ref])[0]
    np.testing.assert_allclose(lp.token_logprobs[1:], scores, atol=1e-4)
    offsets = lp.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for i in range(len(ids)):  # each prompt token's text starts at its offset
        assert choice.text[offsets[i]:].startswith(smol.tokenizer.decode([ids[i]]))
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 2 <= len(top) <= 3 and max(top.values()) >= value - 1e-6
    # scoring only: max_tokens 0 with echo
    only = client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=0, echo=True,
                                     logprobs=1, temperature=0)
    assert only.choices[0].text == PROMPT and only.usage.completion_tokens == 0
    np.testing.assert_allclose(only.choices[0].logprobs.token_logprobs[1:],
                               smol.score([ids])[0], atol=1e-4)


@pytest.mark.slow
def test_lm_eval_local_completions_loglikelihoods(smol, smol_server, tmp_path):
    """lm-evaluation-harness's `local-completions` (remote tokenizer: the server's
    /tokenizer_info, /tokenize, /detokenize) scores a small multiple-choice task with the
    log-likelihoods of the in-process adapter."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    rows = [
        {"q": "The color of the clear sky is", "choices": ["blue", "green", "red"], "gold": 0},
        {"q": "Two plus two equals", "choices": ["three", "four", "five"], "gold": 1},
        {"q": "The capital of France is", "choices": ["Berlin", "Madrid", "Paris"], "gold": 2},
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text(
        "task: jaxllama_serve_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\n"
        "target_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n")
    results = evaluator.simple_evaluate(
        model="local-completions",
        model_args=f"model={SMOL},base_url={smol_server}/v1/completions,"
                   "tokenizer_backend=remote,num_concurrent=1,max_retries=1,"
                   "tokenized_requests=True",
        tasks=["jaxllama_serve_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True, apply_chat_template=False)
    samples = results["samples"]["jaxllama_serve_mc"]
    assert len(samples) == len(rows)
    checked = 0
    for sample in samples:
        doc = sample["doc"]
        for (ctx, cont), resp in zip([a["arguments"] for a in sample["arguments"]]
                                     if isinstance(sample["arguments"][0], dict)
                                     else sample["arguments"], sample["resps"]):
            served = float(resp[0][0])
            # lm-eval splits the pair as whole - context (its _encode_pair)
            whole = smol.encode(ctx + cont, add_special_tokens=False)
            ctx_ids = smol.encode(ctx, add_special_tokens=False)
            ref, _ = smol.loglikelihood(ctx_ids, whole[len(ctx_ids):])
            assert served == pytest.approx(ref, abs=1e-4), (doc["q"], cont)
            checked += 1
    assert checked == sum(len(r["choices"]) for r in rows)
    print(f"\nlm-eval local-completions: {checked} loglikelihoods equal the adapter's; acc "
          f"{results['results']['jaxllama_serve_mc']['acc,none']:.3f}")


# ------------------------------------------------------------------ the stop matcher alone
from hypothesis import given, settings, strategies as st  # noqa: E402

from jaxllama.serve.stops import StopMatcher  # noqa: E402

_ALPHABET = "ab\n "


@settings(max_examples=300, deadline=None)
@given(text=st.text(_ALPHABET, max_size=40),
       stops=st.lists(st.text(_ALPHABET, min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=10))
def test_stop_matcher_against_str_find(text, stops, cuts):
    """Fed `text` in arbitrary pieces, the matcher returns exactly the text before the
    stop string completed first, whatever the split (the reference: the whole text
    scanned by end position with str.endswith)."""
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    matcher = StopMatcher(stops)
    out, hit = "", None
    for piece in pieces:
        safe, hit = matcher.push(piece)
        out += safe
        if hit is not None:
            break
    if hit is None:
        out += matcher.flush()
    expected, found = text, False
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            expected, found = text[: end - max(len(s) for s in ending)], True
            break
    assert out == expected
    assert (hit is not None) == found
