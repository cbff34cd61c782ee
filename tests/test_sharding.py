"""Tensor- and data-parallel runs on 8 virtual CPU devices (conftest sets
--xla_force_host_platform_device_count=8) equal the single-device path: logits within
float32 rounding of the split reductions, greedy tokens identical.

The tiny models have 8 query heads, 4 KV heads, FFN 128 and vocabulary 320, so the
(1, 8) mesh splits heads, FFN and vocabulary but replicates the KV heads (4 < 8) and
(2, 4) splits everything; the real SmolLM2 (9 heads, 3 KV heads) replicates attention
and splits FFN and vocabulary, as the rule in jaxllama/sharding.py says.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import jax_adapter
from hf_to_gguf import tiny_hf_model, write_gguf
from jaxllama.engine import steps
from jaxllama.errors import InvalidRequestError
from jaxllama.gguf import dequant
from jaxllama.models import AdapterForwardConfig, LlamaInferenceAdapter, load_gguf
from jaxllama.models.llama import Llama3Config
from jaxllama.sharding import ShardingPlan, make_mesh, memory_plan

MESHES = [(1, 8), (2, 4), (8, 1)]
TINY = dict(num_attention_heads=8, num_key_value_heads=4, vocab_size=320)

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8,
    reason="needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8 "
    "(tests/conftest.py sets it when XLA_FLAGS is unset)",
)


def _laid_out(arr, *spec) -> bool:
    """Whether `arr` is laid out as PartitionSpec(*spec) on its mesh (trailing Nones or not)."""
    want = jax.sharding.NamedSharding(arr.sharding.mesh, P(*spec))
    return arr.sharding.is_equivalent_to(want, arr.ndim)


def _rows(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=int(rng.integers(5, 12))).tolist() for _ in range(batch)]


@pytest.fixture(scope="module", params=["qwen2", "phi3", "llama3"])
def tiny(request, tmp_path_factory):
    arch = request.param
    path = write_gguf(tiny_hf_model(arch, **TINY), tmp_path_factory.mktemp(arch) / f"{arch}.gguf")
    single = LlamaInferenceAdapter.from_gguf(str(path), dtype=jnp.float32, progress=False)
    return arch, path, single


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"mesh{s[0]}x{s[1]}")
def test_tiny_models_match_single_device(tiny, mesh_shape):
    arch, path, single = tiny
    data, model = mesh_shape
    mesh = make_mesh(model=model, data=data)
    sharded = LlamaInferenceAdapter.from_gguf(str(path), dtype=jnp.float32, progress=False, mesh=mesh)
    rows = _rows(max(2, data), single.vocab_size())

    for got, want in zip(sharded.score(rows), single.score(rows)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    assert sharded.generate(rows, 10) == single.generate(rows, 10)

    layer = sharded.model.params.layers[0]
    assert _laid_out(layer.wq, "model")  # 8 heads split on any model axis
    assert _laid_out(layer.w_down, None, "model")
    assert _laid_out(sharded.model.params.embed, "model")
    kv_split = 4 % model == 0
    assert _laid_out(layer.wk, "model") if kv_split else _laid_out(layer.wk)
    # Each device holds only its part of a split weight.
    assert {s.data.shape for s in layer.w_gate.addressable_shards} == {(128 // model, 64)}
    assert len(layer.w_gate.addressable_shards) == 8
    # vram_usage is the most loaded device's bytes: a split model holds less per device.
    # (Against the single model's weights: its vram_usage also counts the stacked layer
    # copy that packed scoring made on the CPU above; a mesh never makes one.)
    whole = single.model.nbytes()
    if model > 1:
        assert whole / model < sharded.vram_usage() < whole
    else:
        assert sharded.vram_usage() == whole


def test_decode_keeps_the_cache_layout_and_compiles_once(tiny):
    """Step by step from the host: the page pools come back on the plan's layout (split
    by KV heads over the model axis), so every decode after the first reuses one
    compilation, and tokens equal the single device's."""
    arch, path, single = tiny
    mesh = make_mesh(model=4, data=2)
    sharded = LlamaInferenceAdapter.from_gguf(str(path), dtype=jnp.float32, progress=False, mesh=mesh)
    rows = _rows(2, single.vocab_size(), seed=1)
    config = AdapterForwardConfig(batch_size=2)
    out_s, state_s = sharded.prefill(rows, config)
    out_1, state_1 = single.prefill(rows, config)
    assert out_s == out_1
    assert _laid_out(state_s.engine.cache.k[0], "model")
    tok_s, tok_1 = [r[-1] for r in out_s], [r[-1] for r in out_1]
    sizes = []
    for _ in range(6):
        tok_s, state_s = sharded.decode([[t] for t in tok_s], state_s, config.for_decode(state_s))
        tok_1, state_1 = single.decode([[t] for t in tok_1], state_1, config.for_decode(state_1))
        assert tok_s == tok_1
        assert _laid_out(state_s.engine.cache.k[0], "model")
        sizes.append(steps.decode._cache_size())
    assert sizes[-1] == sizes[1], "decode recompiled after its first sharded step"


def test_loading_streams_each_shard(tiny, monkeypatch):
    """No device decodes a whole split tensor: every dequantize call of a split field
    covers one device's part only."""
    arch, path, _ = tiny
    calls = []
    real = dequant.dequantize

    def spy(raw, qtype, shape, dtype=jnp.float32, **kwargs):
        calls.append((kwargs.get("name"), tuple(shape), kwargs.get("device")))
        return real(raw, qtype, shape, dtype, **kwargs)

    monkeypatch.setattr(dequant, "dequantize", spy)
    load_gguf(path, dtype=jnp.float32, progress=False, mesh=make_mesh(model=8, data=1))
    down = [c for c in calls if c[0] == "blk.0.ffn_down.weight"]
    assert len(down) == 8 and {c[1] for c in down} == {(64, 128 // 8)}
    assert len({c[2] for c in down}) == 8, "each shard is decoded on its own device"
    embd = [c for c in calls if c[0] == "token_embd.weight"]
    assert {c[1] for c in embd} == {(320 // 8, 64)}


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"mesh{s[0]}x{s[1]}")
def test_real_smollm2_matches_single_device(smollm2_path, mesh_shape):
    data, model = mesh_shape
    single = jax_adapter("smollm2-135m-instruct")
    sharded = LlamaInferenceAdapter.from_gguf(smollm2_path, dtype=jnp.float32, progress=False,
                                              mesh=make_mesh(model=model, data=data))
    prompts = ["The capital of France is", "def fibonacci(n):"]
    rows = [single.encode(p) for p in prompts] * (max(2, data) // 2)
    (got, greedy), (want, greedy_1) = sharded._score(rows, 8), single._score(rows, 8)
    for a, b, ga, gb in zip(got, want, greedy, greedy_1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(ga, gb)  # teacher-forced greedy tokens
    # Free-running greedy decoding compiles the whole loop (~25 s a mesh here): once, on
    # the mesh that splits both axes; the tiny models run it on all three.
    if mesh_shape == (2, 4):
        assert sharded.generate(rows, 12) == single.generate(rows, 12)
    ffn = sharded.model.params.layers[0].w_up
    assert _laid_out(ffn, "model") and ffn.addressable_shards[0].data.shape[0] == 1536 // model


def test_mesh_errors_are_clear():
    with pytest.raises(InvalidRequestError, match="needs 6 devices"):
        make_mesh(model=3, data=2)
    with pytest.raises(InvalidRequestError, match="does not divide"):
        make_mesh(model=3)
    bad = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("x", "y"))
    with pytest.raises(InvalidRequestError, match="expected axes named"):
        ShardingPlan(bad, Llama3Config.smollm2_135m())


def test_memory_plan_for_llama3_70b_matches_the_readme():
    """The README's table is this function's output (70.6e9 parameters)."""
    cfg = Llama3Config.llama3_70b()
    plan = memory_plan(cfg, devices=8, weight_bytes=2, batch=8, context=8192)
    assert 70.0e9 < plan["params"] < 71.0e9
    assert plan["weights_gib"] == pytest.approx(plan["params"] * 2 / 8 / 2**30)
    # 80 layers x 8 KV heads x 128 x 2 (K and V) x 2 bytes x 8 x 8192 tokens, split 8 ways.
    assert plan["cache_gib"] == pytest.approx(80 * 8 * 128 * 2 * 2 * 8 * 8192 / 8 / 2**30)


def test_two_processes_with_jax_distributed(tmp_path):
    """Across hosts: two processes joined by jax.distributed (gloo collectives on the CPU),
    2 devices each, one (data=2, model=2) mesh over all 4. Every process gets the whole
    result (equal to its own single-device run) and decodes only its own devices' shards."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    path = write_gguf(tiny_hf_model("llama3", **TINY), tmp_path / "llama3.gguf")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("multihost_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), "2", str(port), str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert (r["devices"], r["local"]) == (4, 2)
        assert r["max_logprob_diff"] < 2e-5 and r["tokens_equal"], r
        # The w_down columns split 2 ways; each process decodes its 2 local devices' shards
        # (one per data replica it holds), each on its own device, never the whole tensor.
        assert len(r["decoded"]) == 2 and all(shape == [64, 64] and mine for shape, mine in r["decoded"]), r


def test_quantized_weights_on_a_mesh(tiny):
    """Quantized weights shard like dense ones (codes, scales and mins together, whole
    32-blocks per device) and give the single-device quantized results. (int8 for Qwen2,
    int4, which has mins, for Phi-3's fused tensors and Llama 3.)"""
    arch, path, _ = tiny
    weights = "int8" if arch == "qwen2" else "int4"
    single = LlamaInferenceAdapter.from_gguf(str(path), weights=weights, progress=False)
    sharded = LlamaInferenceAdapter.from_gguf(str(path), weights=weights, progress=False,
                                              mesh=make_mesh(model=4, data=2))
    rows = _rows(2, single.vocab_size(), seed=3)
    for got, want in zip(sharded.score(rows), single.score(rows)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    assert sharded.generate(rows, 6) == single.generate(rows, 6)
    layer = sharded.model.params.layers[0]
    assert _laid_out(layer.wq.q, "model") and _laid_out(layer.wq.scales, "model")
    # w_down's in axis (FFN 128) gives each of 4 devices one whole block... of 32: split.
    assert _laid_out(layer.w_down.q, None, "model")
    assert {s.data.shape for s in layer.w_down.scales.addressable_shards} == {(64, 1)}
    assert sharded.vram_usage() < single.vram_usage()


@pytest.mark.parametrize("mesh_shape", [(1, 4), (2, 4)], ids=lambda s: f"mesh{s[0]}x{s[1]}")
def test_engine_on_a_mesh_equals_single_device_generate(tmp_path, mesh_shape, monkeypatch):
    """The serving engine over a sharded adapter (what `jaxllama serve --mesh` runs):
    its state is made on the adapter's mesh, the page pools split by KV heads where the
    model axis divides them (4 KV heads over 4), and every request's tokens equal the
    single-device adapter.generate of its prompt alone, greedy and seeded."""
    from jaxllama.engine.scheduler import Engine

    path = write_gguf(tiny_hf_model("qwen2", **TINY), tmp_path / "qwen2.gguf")
    single = LlamaInferenceAdapter.from_gguf(str(path), dtype=jnp.float32, progress=False)
    data, model = mesh_shape
    mesh = make_mesh(model=model, data=data, devices=jax.devices()[:data * model])
    sharded = LlamaInferenceAdapter.from_gguf(str(path), dtype=jnp.float32, progress=False,
                                              mesh=mesh)
    settings = [dict(), dict(temperature=0.9, seed=5), dict(temperature=0.7, top_k=20, seed=9)]
    requests = [(row, 6 + 3 * i, settings[i % 3])
                for i, row in enumerate(_rows(5, single.vocab_size(), seed=3))]
    refs = [single.generate(p, m, AdapterForwardConfig(**s))[len(p):] for p, m, s in requests]
    with Engine.from_adapter(sharded, num_slots=3, max_context=64, page_size=4,
                             prefill_chunk=8, decode_steps=4) as engine:
        pool = engine._state.cache.k[0]
        assert pool.sharding.mesh == mesh and _laid_out(pool, "model")
        assert _laid_out(engine._state.block_table)
        handles = [engine.submit(p, m, **s) for p, m, s in requests]
        assert [h.result(timeout=300).tokens for h in handles] == refs
        m = engine.metrics()
        assert m.slots_used == 0 and m.pages_used == 0
        assert engine._state.cache.k[0].sharding.mesh == mesh  # the steps kept the layout
    # The backend policy's rule: the compiled Pallas kernel cannot run on a mesh (the
    # GPU branch, taken on this CPU by replacing the platform the policy reads).
    from jaxllama import backend

    monkeypatch.setattr(backend, "platform", lambda: "gpu")
    with pytest.raises(InvalidRequestError, match="on a mesh"):
        Engine.from_adapter(sharded, num_slots=2, max_context=32, page_size=4,
                            prefill_chunk=8, attention="pallas")
