"""Device-memory refusals, cleanup after a failed load, and determinism across processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from hf_to_gguf import tiny_hf_model, write_gguf
from jaxllama.errors import DeviceMemoryError, GGUFError
from jaxllama.gguf import dequant
from jaxllama.models import AdapterForwardConfig, LlamaInferenceAdapter, load_gguf
from jaxllama.models import weights

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_gguf(tiny_hf_model("qwen2"), tmp_path_factory.mktemp("faults") / "tiny.gguf")


def test_model_too_big_for_free_memory_is_refused_and_a_smaller_one_loads(tiny_path, smollm2_path, monkeypatch):
    tiny_bytes = load_gguf(tiny_path, progress=False).nbytes()
    monkeypatch.setattr(weights, "free_device_memory", lambda device=None: 4 * tiny_bytes)
    with pytest.raises(DeviceMemoryError, match=r"the weights need 513 MiB on cpu:0 but only \d+ MiB is free"):
        load_gguf(smollm2_path, progress=False)
    model = load_gguf(tiny_path, progress=False)  # the process goes on with a smaller model
    assert LlamaInferenceAdapter.from_model(model).generate([5, 6, 7], 3)[:3] == [5, 6, 7]


def test_failed_load_leaves_no_arrays_behind(tiny_path, monkeypatch):
    made = []
    real = dequant.dequantize

    def flaky(raw, qtype, shape, dtype=jnp.float32, *, name="<tensor>"):
        if len(made) == 7:
            raise GGUFError(f"tensor {name}: simulated failure")
        made.append(real(raw, qtype, shape, dtype, name=name))
        return made[-1]

    monkeypatch.setattr(dequant, "dequantize", flaky)
    with pytest.raises(GGUFError, match="simulated failure"):
        load_gguf(tiny_path, progress=False)
    assert len(made) == 7 and all(a.is_deleted() for a in made)


_CHILD = """
import json, sys
from jaxllama.models import AdapterForwardConfig, LlamaInferenceAdapter
a = LlamaInferenceAdapter.from_gguf(sys.argv[1], progress=False)
cfg = AdapterForwardConfig(temperature=1.0, seed=1234, top_p=0.95)
print(json.dumps(a.generate([5, 17, 42, 99], 12, cfg)))
"""


def test_sampling_is_deterministic_across_processes(tiny_path):
    adapter = LlamaInferenceAdapter.from_gguf(tiny_path, progress=False)
    config = AdapterForwardConfig(temperature=1.0, seed=1234, top_p=0.95)
    here = adapter.generate([5, 17, 42, 99], 12, config)
    child = subprocess.run([sys.executable, "-c", _CHILD, str(tiny_path)], capture_output=True,
                           text=True, check=True, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert json.loads(child.stdout.strip().splitlines()[-1]) == here
    # and in a batch with other prompts, the row is the same
    batch = adapter.generate([[5, 17, 42, 99], [9, 9, 9]], 12, AdapterForwardConfig(
        batch_size=2, temperature=1.0, seed=1234, top_p=0.95))
    assert batch[0] == here
