"""Shared fixtures: the two packaged real models, fetched once into the cache."""

from __future__ import annotations

import os

import pytest

# Tests run on the CPU in float32 unless a test says otherwise; keep XLA from
# grabbing every core's worth of threads for tiny ops is not needed here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight virtual CPU devices, for the sharding tests' meshes (test_sharding.py); every
# other test runs on the first of them, as on one device.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The command line keeps compiled programs in ~/.cache/jaxllama/xla-cache by default; the
# tests that call it in-process or spawn it must not fill the user's cache or turn cache
# hits on for the rest of the session. Tests of the cache point it at a tmp dir.
os.environ.setdefault("JAXLLAMA_COMPILATION_CACHE", "off")

from jaxllama import hub  # noqa: E402


# Resident memory above which compiled executables are dropped after a test file.
_CLEAR_CACHES_ABOVE = 11 * 2**30


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmRSS"))) * 1024


@pytest.fixture(scope="module", autouse=True)
def _bound_memory_after_each_file():
    """Keep the session's memory bounded. JAX keeps every compiled executable for the
    whole session; hundreds of compilations of 24-30-layer unrolled models took the
    suite's resident memory to 21 GB of this 24 GB machine. After a file, if the process
    holds more than 11 GiB, drop them; later files recompile what they need. (The cached
    real models and references alone hold about 7 GiB after test_batch_eval; clearing
    after every file cost the suite about 160 s.) Quantized model variants (seconds to
    load, used by one or two files) are always dropped; the float models and
    transformers references cached by `jax_adapter`/`hf_reference` stay."""
    yield
    import gc

    import jax

    _LAZY.drop(lambda key: key[0] == "jax" and key[3] is not None)
    gc.collect()
    if _rss() > _CLEAR_CACHES_ABOVE:
        jax.clear_caches()
        gc.collect()
    log = os.environ.get("JAXLLAMA_TEST_MEMLOG")
    if log:
        live = sum(x.nbytes for x in jax.live_arrays())
        with open(log, "a") as f:
            f.write(f"{os.getpid()} rss {_rss() / 2**30:.2f} GiB live arrays {live / 2**30:.2f} GiB\n")


@pytest.fixture(scope="session")
def smollm2_path():
    return hub.pull("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_path():
    return hub.pull("qwen2.5-coder-0.5b-instruct")


REAL_MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")


class _Lazy:
    """Session cache of expensive objects (real models and their transformers references)."""

    def __init__(self):
        self._items = {}

    def get(self, key, make):
        if key not in self._items:
            self._items[key] = make()
        return self._items[key]

    def drop(self, which) -> None:
        for key in [k for k in self._items if which(k)]:
            del self._items[key]


_LAZY = _Lazy()


def hf_reference(name):
    """transformers' float32 model and tokenizer for a packaged GGUF model (cached)."""

    def make():
        import torch
        import transformers

        path = hub.pull(name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return model, tok

    return _LAZY.get(("hf", name), make)


def jax_adapter(name, dtype="float32", weights=None):
    """A jaxllama adapter for a packaged model (cached per dtype and weights mode)."""

    def make():
        from jaxllama.models import LlamaInferenceAdapter

        return LlamaInferenceAdapter.from_gguf(name, dtype=dtype, weights=weights, progress=False)

    return _LAZY.get(("jax", name, dtype, weights), make)
