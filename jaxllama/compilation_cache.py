"""JAX's persistent compilation cache behind one call, and a watch on compilations.

A model's prefill and decode steps take seconds to compile (tens of seconds for the
unrolled 30-layer SmolLM2 on a 2-core CPU); with the cache on, a second process loads the
executables from disk instead. JAX's defaults write only compilations that took at least
1 s, and its own environment variable (`JAX_COMPILATION_CACHE_DIR`) keeps that threshold;
`enable` lowers both thresholds to zero, so the small eager-op and CPU compilations that a
generation also needs are cached too.

The `jaxllama` command line turns the cache on by default, in `default_directory()`
(`$JAXLLAMA_CACHE/xla-cache`, i.e. `~/.cache/jaxllama/xla-cache`). `--compilation-cache
DIR|off` (before the subcommand, or on `jaxllama bench`) or the environment variable
`JAXLLAMA_COMPILATION_CACHE=DIR|off` moves it or turns it off; the option wins over the
variable. A stale entry (another JAX or XLA version) is never looked up, since the version
is part of the key; an entry that cannot be read (truncated, corrupt) is skipped with a
warning and compiled afresh (JAX's `_cache_read`/`_cache_write` turn read and write errors
into warnings; `jax_raise_persistent_cache_errors` stays off). The directory can be
deleted at any time.

The cache is trusted code: do not point it at a directory others can write to.

This module imports JAX only inside its functions, so `setting` can run in the command
line's argument checks without importing JAX.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Callable

from jaxllama import hub

ENV_VAR = "JAXLLAMA_COMPILATION_CACHE"
OFF = "off"
DEFAULT_SUBDIR = "xla-cache"

# jax.monitoring events (jax/_src/compiler.py, compilation_cache.py, dispatch.py; jax 0.10).
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"  # recorded before the compile
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
# Wraps the cache lookup and, on a miss, the XLA compile; fires for cache hits too.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def default_directory() -> Path:
    """`$JAXLLAMA_CACHE/xla-cache` (default `~/.cache/jaxllama/xla-cache`)."""
    return hub.cache_dir() / DEFAULT_SUBDIR


def setting(option: str | None = None) -> Path | None:
    """The cache directory the command line uses: `option` (`--compilation-cache`) if
    given, else `$JAXLLAMA_COMPILATION_CACHE` if set and not empty, else
    `default_directory()`; None when the chosen value is "off" (any case). JAX-free."""
    value = option if option is not None else os.environ.get(ENV_VAR, "")
    value = value.strip()
    if not value:
        return default_directory()
    if value.lower() == OFF:
        return None
    return Path(value).expanduser()


def enable(path: str | os.PathLike) -> Path:
    """Cache every compilation of this process under `path` (created if missing) and read
    earlier ones from it. Returns the absolute path. Takes effect for compilations after
    the call, also when an earlier compilation already initialised JAX's cache state.
    Raises OSError when the directory cannot be created."""
    import jax

    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # -1: no minimum entry size, and no filesystem-dependent override of it.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _reset()
    return path


def enable_or_warn(path: str | os.PathLike) -> Path | None:
    """`enable(path)`, or a warning and no cache when the directory cannot be made or
    written (a read-only home, a file in the way): a run never fails for its cache."""
    try:
        path = enable(path)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return path
    except OSError as exc:
        disable()
        warnings.warn(f"compilation cache {path} is not usable ({exc}); "
                      "running without it", RuntimeWarning, stacklevel=2)
        return None


def disable() -> None:
    """Stop reading and writing the persistent cache (for tests that enabled it)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", None)
    _reset()


def directory() -> Path | None:
    """The cache directory in use, or None."""
    import jax

    value = jax.config.jax_compilation_cache_dir
    return Path(value) if value and jax.config.jax_enable_compilation_cache else None


def enable_from_env() -> Path | None:
    """Enable the cache `setting()` picks from `$JAXLLAMA_COMPILATION_CACHE` alone (None
    when unset or empty, or "off")."""
    if not os.environ.get(ENV_VAR, "").strip():
        return None
    path = setting()
    return enable(path) if path is not None else None


def _reset() -> None:
    # JAX decides once per process, at the first compilation, whether the cache is used;
    # resetting makes it decide again with the new settings.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()


class CompileWatch:
    """Counts the XLA compilations of this process and says when one is about to start.

    `compilations` counts programs compiled by XLA (not those read from the persistent
    cache, counted in `cache_hits`); `seconds` sums the time spent getting programs
    ready: tracing, lowering, and compiling or reading the cache. `on_compile_start`, when
    set, is called (in the compiling thread) just before a compilation: at the cache miss
    when the persistent cache is on, after lowering when it is off.

    One watch per process: `CompileWatch.get()` registers its listeners with
    `jax.monitoring` the first time (JAX has no stable way to remove them).
    """

    _instance: "CompileWatch | None" = None
    _lock = threading.Lock()

    def __init__(self):
        self.compilations = 0
        self.cache_hits = 0
        self.seconds = 0.0
        self.names: list[str] = []
        self.on_compile_start: Callable[[], None] | None = None
        self._hit_pending = False

    @classmethod
    def get(cls) -> "CompileWatch":
        with cls._lock:
            if cls._instance is None:
                import jax

                watch = cls()
                jax.monitoring.register_event_listener(watch._on_event)
                jax.monitoring.register_event_duration_secs_listener(watch._on_duration)
                cls._instance = watch
            return cls._instance

    def notice_unreadable_entries(self) -> None:
        """Also call `on_compile_start` when an entry that could not be read (corrupt,
        truncated) is compiled afresh: JAX records no miss event then, only its
        "PERSISTENT COMPILATION CACHE MISS" debug log line before the compile. A filter on
        that logger sees the line and drops the debug records this lets through, so
        nothing new is printed. For programs (the command line); idempotent."""
        logger = logging.getLogger(_COMPILER_LOGGER)
        if any(isinstance(f, _MissLogFilter) for f in logger.filters):
            return
        logger.addFilter(_MissLogFilter(self, logger.getEffectiveLevel()))
        logger.setLevel(logging.DEBUG)

    def snapshot(self) -> tuple[int, int, float]:
        """(compilations, cache hits, seconds) so far; subtract two to get a span's."""
        return self.compilations, self.cache_hits, self.seconds

    def _starting(self) -> None:
        if self.on_compile_start is not None:
            self.on_compile_start()

    def _on_event(self, event: str, **kwargs) -> None:
        if event == CACHE_MISS_EVENT:
            self._starting()
        elif event == CACHE_HIT_EVENT:
            self.cache_hits += 1
            self._hit_pending = True  # the hit belongs to the enclosing compile event

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event in (TRACE_EVENT, LOWERING_EVENT):
            self.seconds += duration
            if event == LOWERING_EVENT and directory() is None:
                self._starting()
        elif event == BACKEND_COMPILE_EVENT:
            self.seconds += duration
            if self._hit_pending:
                self._hit_pending = False
            else:
                self.compilations += 1
                self.names.append(str(kwargs.get("fun_name", "?")))


_COMPILER_LOGGER = "jax._src.compiler"  # jax/_src/compiler.py log_persistent_cache_miss


class _MissLogFilter(logging.Filter):
    def __init__(self, watch: CompileWatch, floor: int):
        super().__init__()
        self.watch, self.floor = watch, floor

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("PERSISTENT COMPILATION CACHE MISS"):
            self.watch._starting()
        return record.levelno >= self.floor
