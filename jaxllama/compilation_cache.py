"""JAX's persistent compilation cache behind one call.

A model's prefill and decode loop take seconds to compile (tens of seconds for the
unrolled 30-layer SmolLM2 on a 2-core CPU); with the cache on, a second process loads the
executables from disk instead. JAX's defaults write only compilations that took at least
1 s, and its own environment variable (`JAX_COMPILATION_CACHE_DIR`) keeps that threshold;
`enable` lowers both thresholds to zero, so the small eager-op and CPU compilations that a
generation also needs are cached too.

The `jaxllama` command line turns it on with `--compilation-cache DIR` (before the
subcommand, or on `jaxllama bench`) or with the environment variable
`JAXLLAMA_COMPILATION_CACHE`, for every subcommand.

The cache is trusted code: do not point it at a directory others can write to.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_VAR = "JAXLLAMA_COMPILATION_CACHE"

# jax.monitoring events of the cache (jax/_src/compiler.py, compilation_cache.py).
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"


def enable(path: str | os.PathLike) -> Path:
    """Cache every compilation of this process under `path` (created if missing) and read
    earlier ones from it. Returns the absolute path. Takes effect for compilations after
    the call, also when an earlier compilation already initialised JAX's cache state."""
    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # -1: no minimum entry size, and no filesystem-dependent override of it.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _reset()
    return path


def disable() -> None:
    """Stop reading and writing the persistent cache (for tests that enabled it)."""
    jax.config.update("jax_compilation_cache_dir", None)
    _reset()


def directory() -> Path | None:
    """The cache directory in use, or None."""
    value = jax.config.jax_compilation_cache_dir
    return Path(value) if value else None


def enable_from_env() -> Path | None:
    """`enable($JAXLLAMA_COMPILATION_CACHE)` when the variable is set and not empty."""
    value = os.environ.get(ENV_VAR, "").strip()
    return enable(value) if value else None


def _reset() -> None:
    # JAX decides once per process, at the first compilation, whether the cache is used;
    # resetting makes it decide again with the new settings.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
