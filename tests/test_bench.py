"""`jaxllama bench`, random full-shape weights and the persistent compilation cache.

The random params are checked against what the GGUF loader builds for the same config
(the independent reference for the tree); the benchmark is run once as a user would,
in-process, with the persistent cache on (it prints what it measured), and a second
process must then load its compilations from that cache instead of compiling again.
The three tests on that run are marked slow: about 60 s together on a 2-core CPU, most
of it compiling SmolLM2's 30 unrolled layers for two batch sizes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggufmake import write_tiny_gguf
from jaxllama import cli, compilation_cache
from jaxllama.bench import BACKEND_COMPILE_EVENT, CompileLog, verify_compile_event
from jaxllama.models import LlamaInferenceAdapter, load_gguf
from jaxllama.models.random_weights import random_model, random_params, weight_bytes

ROOT = Path(__file__).resolve().parent.parent
BENCH_ARGS = ["bench", "--preset", "smollm2-135m", "--random-weights", "--batch", "1", "2",
              "--prompt-len", "32", "--decode-tokens", "8", "--repeats", "2"]
NUMBER = r"([\d,]+(?:\.\d+)?)"


def _num(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no match for {pattern!r} in:\n{text}"
    return float(match.group(1).replace(",", ""))


# ------------------------------------------------------------------ random weights
@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", True), ("phi3", False)])
def test_random_params_have_the_loaders_tree(tmp_path, arch, tied):
    """Same pytree structure, leaf shapes and dtypes as a GGUF file of that config loads to
    (Phi-3's fused qkv and gate/up split, Qwen's biases, tied and untied output)."""
    loaded = load_gguf(write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tied=tied),
                       dtype=jnp.float32, progress=False)
    params = random_params(loaded.config, jnp.float32, seed=1)
    # bfloat16: the same tree in bfloat16 (shapes only; eval_shape computes nothing)
    abstract = jax.eval_shape(lambda: random_params(loaded.config, jnp.bfloat16, seed=1))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(loaded.params)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(loaded.params)
    for got, half, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(abstract),
                               jax.tree_util.tree_leaves(loaded.params)):
        chex.assert_shape([got, half], want.shape)
        chex.assert_type(got, want.dtype)
        assert half.dtype == jnp.bfloat16
        assert bool(jnp.all(jnp.isfinite(got)))
    assert sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) == weight_bytes(loaded.config, jnp.float32)
    np.testing.assert_array_equal(np.asarray(params.layers[0].attn_norm), 1.0)
    # Projections have variance 1/fan_in; distinct layers hold distinct draws.
    wq = np.asarray(params.layers[1].wq)
    assert abs(wq.std() * np.sqrt(wq.shape[1]) - 1) < 0.1
    assert not np.array_equal(wq, np.asarray(params.layers[0].wq))


def test_random_model_runs_through_the_adapter(tmp_path):
    """Token ids in and out with no tokenizer file; no EOS, so generation runs its full length
    and the logits stay finite at the real scale of the init."""
    config = load_gguf(write_tiny_gguf(tmp_path / "q.gguf", "qwen2"), progress=False).config
    model = random_model(config, jnp.float32, seed=3)
    adapter = LlamaInferenceAdapter.from_model(model)
    out = adapter.generate([[1, 2, 3], [4, 5, 6, 7]], 6)
    assert [len(r) for r in out] == [9, 10]
    assert adapter.eos_ids() == ()
    scores = adapter.score([[1, 2, 3, 4, 5]])[0]
    assert np.all(np.isfinite(scores)) and np.all(scores < 0)
    assert random_params(config, jnp.float32, 3).layers[0].wk.tolist() == model.params.layers[0].wk.tolist()


def test_compile_event_is_the_one_jax_records():
    with CompileLog() as log:
        assert verify_compile_event(log)
    assert log.compiles and BACKEND_COMPILE_EVENT.startswith("/jax/core/compile/")


# ------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One `jaxllama bench` run in this process, with the persistent cache on a fresh dir."""
    cache = tmp_path_factory.mktemp("jax_cache")
    import contextlib
    import io

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            code = cli.main(BENCH_ARGS + ["--compilation-cache", str(cache)])
    finally:
        compilation_cache.disable()
    out = buf.getvalue()
    print(out)
    assert code == 0
    return out, cache


@pytest.mark.slow
def test_bench_prints_every_figure(bench_run):
    out, _ = bench_run
    assert f"device: {jax.default_backend()}" in out and f"jax {jax.__version__}" in out
    assert f"compile event: {BACKEND_COMPILE_EVENT} (verified: fires)" in out
    bandwidth = _num(rf"copy bandwidth: {NUMBER} GB/s", out)
    assert 0.1 < bandwidth < 100_000
    assert _num(rf"compile of prefill \+ decode loop .*?: {NUMBER} s", out) > 0
    assert 0 < _num(rf"time to first token .*?: {NUMBER} ms", out) < 60_000
    weights = _num(rf"decode reads per step: weights {NUMBER} GB", out)
    assert weights == pytest.approx(weight_bytes_smollm2() / 1e9, rel=1e-3)  # tied: no embed twice
    for b in (1, 2):
        line = re.search(rf"\] batch {b}: .*", out).group(0)
        tps = _num(rf"batch {b}: {NUMBER} tokens/s", line)
        ms = _num(rf"{NUMBER} ms/token", line)
        assert tps > 0 and ms > 0 and tps == pytest.approx(b * 1e3 / ms, rel=0.01)
        step_bytes = _num(rf"bytes read per step {NUMBER} GB", line)
        kv = _num(rf"KV cache filled so far {NUMBER} GB", line)
        assert step_bytes == pytest.approx(weights + kv, abs=2e-4)
        assert kv > 0
        fraction = _num(rf"= {NUMBER} of the copy bandwidth", line)
        assert 0 < fraction < 3  # a CPU's caches can lift it past 1, not by more
        assert fraction == pytest.approx(step_bytes / (ms / 1e3) / bandwidth, rel=0.05, abs=1e-3)
    assert "| path | batch | tokens/s | ms/token | GB/step | of copy BW |" in out
    assert "it is not run twice" not in out  # --compare-xla was not asked for


def weight_bytes_smollm2() -> int:
    from jaxllama.models.llama import Llama3Config

    return weight_bytes(Llama3Config.smollm2_135m(), jnp.float32)


def _bucket(n: int, minimum: int) -> int:
    """The adapter's documented rule: a power of two, at least `minimum`."""
    return max(minimum, 1 << (n - 1).bit_length())


@pytest.mark.slow
def test_varied_prompt_lengths_compile_at_most_once_per_bucket(bench_run):
    out, _ = bench_run
    match = re.search(r"compile session: prompt lengths ([\d ]+) \((\d+) new tokens.*?: (\d+) compilations", out)
    lengths = [int(x) for x in match.group(1).split()]
    new, compiles = int(match.group(2)), int(match.group(3))
    assert len(lengths) == 6
    prompt_buckets = {_bucket(n, 16) for n in lengths}
    cache_buckets = {_bucket(n + new, 256) for n in lengths}
    # prefill per prompt bucket, the decode loop per cache bucket, at most
    assert compiles <= len(prompt_buckets) + len(cache_buckets), out


@pytest.mark.slow
def test_second_process_reads_the_compilation_cache(bench_run):
    """The cache is written by the first run and hit by a second process, enabled this
    time by the environment variable that every subcommand honours."""
    _, cache = bench_run
    entries = list(cache.iterdir())
    assert entries, "the first run wrote nothing to the cache"
    env = dict(os.environ, JAXLLAMA_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllama", *BENCH_ARGS[:4], "--batch", "1", "--prompt-len", "32",
         "--decode-tokens", "8", "--repeats", "1", "--session-lengths", "32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    print(proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == 0
    assert f"persistent compilation cache: {cache}" in proc.stdout
    assert _num(r"persistent compilation cache: (\d+) hits", proc.stdout) >= 2
    # The model's two big programs come from the disk, not the compiler. (Small eager ops
    # that this pytest process had compiled before the first run may still miss.)
    hit_line = re.search(r"; hits: (.*)", proc.stdout).group(1)
    assert "prefill_rows" in hit_line and re.search(r"jit[_(]decode\b", hit_line), hit_line


def test_global_option_and_env_var_enable_the_cache(tmp_path, monkeypatch, capsys):
    try:
        assert cli.main(["--compilation-cache", str(tmp_path / "a"), "pull", "--list"]) == 0
        assert compilation_cache.directory() == (tmp_path / "a").resolve()
        monkeypatch.setenv("JAXLLAMA_COMPILATION_CACHE", str(tmp_path / "b"))
        assert cli.main(["pull", "--list"]) == 0
        assert compilation_cache.directory() == (tmp_path / "b").resolve()
        assert cli.main(["--compilation-cache", str(tmp_path / "c"), "pull", "--list"]) == 0
        assert compilation_cache.directory() == (tmp_path / "c").resolve()  # the option wins
    finally:
        compilation_cache.disable()
    assert compilation_cache.directory() is None
    capsys.readouterr()


def test_preset_without_random_weights_is_refused(capsys):
    assert cli.main(["bench", "--preset", "smollm2-135m"]) == 1
    assert "add --random-weights" in capsys.readouterr().err
