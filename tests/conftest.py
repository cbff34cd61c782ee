"""Shared fixtures: the two packaged real models, fetched once into the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run on the CPU in float32 unless a test says otherwise; keep XLA from
# grabbing every core's worth of threads for tiny ops is not needed here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight virtual CPU devices, for the sharding tests' meshes (test_sharding.py); every
# other test runs on the first of them, as on one device.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from jaxllama import compilation_cache, hub  # noqa: E402

# The suite's persistent compilation cache (JAX's own, see jaxllama.compilation_cache):
# most of the suite's time is XLA compiling 24-30-layer unrolled models, and the same
# programs come back in every run. It lives outside the clone so that CI's runs on one
# machine share it; JAXLLAMA_TEST_XLA_CACHE moves it, "off" turns it off. A stale entry
# is never used (JAX keys entries by the program, the compile options and the jax
# version); a corrupt one is skipped by JAX with a warning.
_SUITE_XLA_CACHE = os.environ.get(
    "JAXLLAMA_TEST_XLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxllama-test-xla"))
if _SUITE_XLA_CACHE.strip().lower() in ("", "off", "0", "none"):
    _SUITE_XLA_CACHE = None
# The command line keeps compiled programs in ~/.cache/jaxllama/xla-cache by default; the
# tests that call it in-process or spawn it use the suite's cache instead (or none), so
# they neither fill the user's cache nor miss the suite's. Tests of the cache itself
# point it at a tmp dir.
os.environ.setdefault("JAXLLAMA_COMPILATION_CACHE", _SUITE_XLA_CACHE or "off")


def _enable_suite_cache() -> None:
    if _SUITE_XLA_CACHE is not None:
        compilation_cache.enable(_SUITE_XLA_CACHE)
        import jax

        # Bounded on disk: least recently used entries go first past 8 GiB.
        jax.config.update("jax_compilation_cache_max_size", 8 * 2**30)


_enable_suite_cache()


@pytest.fixture(autouse=True)
def _restore_suite_cache():
    """Tests that point the cache elsewhere (the CLI's and bench's own cache tests) get
    the suite's cache back afterwards."""
    yield
    if _SUITE_XLA_CACHE is not None and compilation_cache.directory() != Path(
            _SUITE_XLA_CACHE).expanduser().resolve():
        _enable_suite_cache()


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
