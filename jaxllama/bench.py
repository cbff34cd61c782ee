"""`jaxllama bench`: how close decode comes to the device's memory bandwidth.

One run prints, for a GGUF file or a preset at full shape with random weights:
- the device and the JAX version;
- the device's copy bandwidth, measured here: a jitted elementwise pass (`x + 1` over a
  large uint32 buffer, donated), bytes read + written / seconds, best of several;
- the compile time of prefill + the decode loop (batch 1: first call minus a steady call,
  and the backend-compile seconds inside it);
- time to first token: `adapter.prefill` of one `--prompt-len` prompt after warm-up;
- per batch size: decode tokens/s and ms per step from the adapter's on-device loop,
  ((median t(generate N) - median t(generate 1)) / (N - 1), the same prefill in both, so
  the difference is N - 1 decode steps); the bytes a step reads (the weights a step uses,
  plus the KV cache filled so far, its mean over the timed steps) and the fraction of the
  copy bandwidth those bytes per step time make;
- the XLA compilations of a session of varied prompt lengths through `adapter.generate`,
  counted with a `jax.monitoring` listener on the backend-compile event;
- with `--compare-xla`, the same for `attention_impl="xla"` beside the adapter's default.
The prompts are random token ids and the model's end-of-generation ids are dropped (a
placeholder tokenizer), so every row decodes exactly the tokens asked for.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama import compilation_cache, hub
from jaxllama.bench_args import add_bench_arguments
from jaxllama.errors import InvalidRequestError
from jaxllama.models import LlamaInferenceAdapter, LoadedModel, families, params_spec
from jaxllama.models.config import ModelConfig
from jaxllama.models.random_weights import random_model, synthetic_tokenizer_metadata
from jaxllama.models.weights import (
    default_dtype,
    free_device_memory,
    load_gguf,
    quantize_params,
    resolve_weights,
)

# The event jax.monitoring records for every XLA backend compilation, with the jitted
# function's name (jax/_src/dispatch.py BACKEND_COMPILE_EVENT, seen in jax 0.10.2; it fires
# for persistent-cache hits too, with the retrieval time).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

GPU_DEFAULTS = dict(batch=(1, 8, 32, 128), prompt_len=512, decode_tokens=128)
CPU_DEFAULTS = dict(batch=(1, 4), prompt_len=128, decode_tokens=32)
SESSION_SIZE = 6  # prompt lengths in the compile-count session
SESSION_SHORTEST = 5
TTFT_REPEATS = 5
BANDWIDTH_REPEATS = 6
# Copy-bandwidth buffer: an eighth of free device memory within these bounds (large
# enough that launch overhead is noise on an H100, small enough to fit beside a model).
BANDWIDTH_MIN_BYTES = 64 << 20
BANDWIDTH_MAX_BYTES = 2 << 30
CPU_BANDWIDTH_BYTES = 256 << 20


# ------------------------------------------------------------------ compilation counting
class CompileLog:
    """Backend compilations (function name, seconds) and persistent-cache hits/misses seen
    while registered (a context manager). `hit_names` lists the functions whose executable
    came from the persistent cache (JAX records the hit event inside the compile's timed
    span, so the hit belongs to the next compile event)."""

    def __init__(self):
        self.compiles: list[tuple[str, float]] = []
        self.hit_names: list[str] = []
        self.cache_hits = 0
        self.cache_misses = 0
        self._pending_hit = False

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            name = str(kwargs.get("fun_name", "?"))
            self.compiles.append((name, float(duration)))
            if self._pending_hit:
                self.hit_names.append(name)
                self._pending_hit = False

    def _on_event(self, event: str, **kwargs) -> None:
        if event == compilation_cache.CACHE_HIT_EVENT:
            self.cache_hits += 1
            self._pending_hit = True
        elif event == compilation_cache.CACHE_MISS_EVENT:
            self.cache_misses += 1

    def __enter__(self) -> "CompileLog":
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in (("unregister_event_duration_listener", self._on_duration),
                         ("unregister_event_listener", self._on_event)):
            unregister = getattr(jax.monitoring, name, None)
            if unregister is not None:
                try:
                    unregister(fn)
                except (AssertionError, ValueError):
                    pass

    def mark(self) -> int:
        return len(self.compiles)

    def since(self, mark: int) -> list[tuple[str, float]]:
        return self.compiles[mark:]


def verify_compile_event(log: CompileLog) -> bool:
    """Whether compiling a fresh function records BACKEND_COMPILE_EVENT in `log`."""
    mark = log.mark()
    salt = time.perf_counter_ns() % 997  # a new constant: a new program, never a cache hit
    jax.jit(lambda x: x * 3 + salt)(jnp.arange(5, dtype=jnp.int32)).block_until_ready()
    return log.mark() > mark


def count_names(names: list[str]) -> str:
    """'jit(a) x2, jit(b) x1', most frequent first; 'none' for an empty list."""
    by_name: dict[str, int] = {}
    for name in names:
        by_name[name] = by_name.get(name, 0) + 1
    return ", ".join(f"{n} x{c}" for n, c in sorted(by_name.items(), key=lambda kv: -kv[1])) or "none"


def summarize_compiles(compiles: list[tuple[str, float]]) -> str:
    return (f"{len(compiles)} compilations ({count_names([n for n, _ in compiles])}), "
            f"{sum(s for _, s in compiles):.2f} s")


# ------------------------------------------------------------------ bandwidth
def copy_bandwidth(nbytes: int | None = None, repeats: int = BANDWIDTH_REPEATS) -> tuple[float, int]:
    """(bytes/s, buffer bytes): a jitted `x + 1` over a uint32 buffer of about `nbytes`
    (default: sized to the device), counting bytes read + written, best of `repeats`."""
    if nbytes is None:
        nbytes = _bandwidth_bytes()
    n = max(1, nbytes // 4)
    bump = jax.jit(lambda x: x + jnp.uint32(1), donate_argnums=0)
    x = bump(jnp.zeros((n,), jnp.uint32)).block_until_ready()  # compile and touch the pages
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        x = bump(x)
        x.block_until_ready()
        best = min(best, time.perf_counter() - start)
    x.delete()
    return 2 * n * 4 / best, n * 4


def _bandwidth_bytes() -> int:
    if jax.default_backend() == "cpu":
        return CPU_BANDWIDTH_BYTES
    free = free_device_memory()
    if free is None:
        return BANDWIDTH_MAX_BYTES // 2
    return int(min(BANDWIDTH_MAX_BYTES, max(BANDWIDTH_MIN_BYTES, free // 8)))


# ------------------------------------------------------------------ model
def preset_config(name: str) -> ModelConfig:
    return families.preset(name)


def _random(config, dtype, mode, args) -> LoadedModel:
    model = random_model(config, dtype, args.seed)
    if mode is None:
        return model
    params = quantize_params(model.params, mode)
    kept = {id(x) for x in jax.tree_util.tree_leaves(params)}  # norms are shared
    for leaf in jax.tree_util.tree_leaves(model.params):
        if id(leaf) not in kept:
            leaf.delete()
    return dataclasses.replace(model, params=params, weights=mode)


def load_model(args, dtype, weights: str | None = None) -> tuple[LoadedModel, str]:
    """The model to run and a one-line description of where its weights came from.
    `weights` as `load_gguf` takes it (None: dense at `dtype`)."""
    dtype, mode = resolve_weights(weights, dtype)
    if args.preset is not None:
        return (_random(preset_config(args.preset), dtype, mode, args),
                f"preset {args.preset}, random weights (seed {args.seed})")
    path = hub.resolve(args.model or hub.DEFAULT_MODEL)
    if args.random_weights:
        from jaxllama.gguf.reader import read_gguf
        from jaxllama.models.config import config_from_gguf

        config = config_from_gguf(read_gguf(path))
        return (_random(config, dtype, mode, args),
                f"{path.name}'s shape, random weights (seed {args.seed})")
    model = load_gguf(path, dtype=dtype, weights=mode, progress=False)
    # Token ids in, token ids out: a placeholder tokenizer without end-of-generation ids,
    # so that no row stops early and every timed step is a full batch.
    model = dataclasses.replace(model, metadata=synthetic_tokenizer_metadata(model.config.vocab_size))
    return model, f"{path} (its own weights)"


def decode_weight_bytes(model: LoadedModel) -> int:
    """Bytes of weights one decode step reads: every layer, the final norm and the output
    projection (the embedding when tied). An untied embedding table is only gathered
    (B rows), so it is not counted."""
    p = model.params
    layers = sum(x.nbytes for x in jax.tree_util.tree_leaves(p.layers))
    return layers + sum(x.nbytes for name in params_spec.decode_fields(model.config)
                        for x in jax.tree_util.tree_leaves(getattr(p, name)))


def kv_bytes_per_token(config: ModelConfig, dtype) -> int:
    """K and V of one token in every layer."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize


def default_session_lengths(prompt_len: int) -> list[int]:
    """SESSION_SIZE lengths from SESSION_SHORTEST to prompt_len, geometrically spaced
    (for 512: 5, 13, 32, 81, 202, 512)."""
    lo, hi = SESSION_SHORTEST, max(SESSION_SHORTEST + 1, prompt_len)
    out = [round(lo * (hi / lo) ** (i / (SESSION_SIZE - 1))) for i in range(SESSION_SIZE)]
    return sorted(set(out))


# ------------------------------------------------------------------ timing
def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    return _median_times([fn], repeats)[0]


def _median_times(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median wall seconds of each of `fns`, called in turn `repeats` times."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, samples):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in samples]


@dataclasses.dataclass
class BatchResult:
    batch: int
    step_s: float | None = None
    weight_bytes: int = 0
    kv_bytes: int = 0
    fraction: float | None = None
    skipped: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        return self.batch / self.step_s if self.step_s else None


@dataclasses.dataclass
class ImplResult:
    impl: str
    compile_s: float = 0.0
    backend_compile_s: float = 0.0
    compile_count: int = 0
    ttft_s: float | None = None
    stepped_s: float | None = None  # batch 1, host-stepped adapter.decode, per token
    batches: list[BatchResult] = dataclasses.field(default_factory=list)
    session_compiles: list[tuple[str, float]] = dataclasses.field(default_factory=list)


def _rows(rng: np.random.Generator, vocab: int, batch: int, length: int) -> list[list[int]]:
    return rng.integers(0, vocab, (batch, length)).tolist()


def cache_slots(config: ModelConfig, tokens: int) -> int:
    """Slots per row of the KV cache the adapter allocates for `tokens` (its documented
    rule: a power of two, at least 256, at most the context length)."""
    return min(max(256, 1 << (tokens - 1).bit_length()), config.context_length)


def _fits(model: LoadedModel, batch: int, prompt_len: int, decode_tokens: int) -> str | None:
    """None, or why `batch` rows would not fit the device's free memory (estimate: the
    KV cache at its bucketed size, twice, and prefill's float32 scores and FFN activations)."""
    free = free_device_memory()
    if free is None:
        return None
    c, dtype = model.config, model.dtype
    kv = batch * cache_slots(c, prompt_len + decode_tokens) * kv_bytes_per_token(c, dtype)
    t = max(16, 1 << (prompt_len - 1).bit_length())
    activations = 4 * batch * t * (c.num_heads * t + 3 * c.ffn_dim + c.vocab_size // max(1, t))
    need = 2 * kv + activations
    if need > 0.9 * free:
        return f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


def bench_impl(model: LoadedModel, impl: str | None, label: str, args, log: CompileLog,
               out: Callable[[str], None]) -> ImplResult:
    """Every figure for one attention implementation (None: the adapter's default)."""
    adapter = LlamaInferenceAdapter.from_model(model, attention_impl=impl)
    result = ImplResult(impl=label)
    cfg = model.config
    rng = np.random.default_rng(args.seed)
    p, n = args.prompt_len, args.decode_tokens
    tag = f"[{label}]"

    # compile: the first batch-1 generate compiles prefill and the decode loop.
    rows1 = _rows(rng, cfg.vocab_size, 1, p)
    mark = log.mark()
    start = time.perf_counter()
    adapter.generate(rows1, n)
    first = time.perf_counter() - start
    compiles = log.since(mark)
    steady = _median_time(lambda: adapter.generate(rows1, n), 1)
    result.compile_s = max(0.0, first - steady)
    result.backend_compile_s = sum(s for _, s in compiles)
    result.compile_count = len(compiles)
    out(f"{tag} compile of prefill + decode loop (batch 1, {p}-token prompt): {result.compile_s:.2f} s "
        f"(first call {first:.2f} s - steady {steady:.2f} s); backend: {summarize_compiles(compiles)}")

    # time to first token: prefill of one prompt (its first sampled token comes back to the host).
    adapter.prefill(rows1[0])
    result.ttft_s = _median_time(lambda: adapter.prefill(rows1[0]), TTFT_REPEATS)
    out(f"{tag} time to first token ({p}-token prompt, batch 1, after warm-up): "
        f"{result.ttft_s * 1e3:.2f} ms (median of {TTFT_REPEATS})")

    weights = decode_weight_bytes(model)
    for b in args.batch:
        br = BatchResult(batch=b, weight_bytes=weights)
        result.batches.append(br)
        why = _fits(model, b, p, n)
        if why:
            br.skipped = why
            out(f"{tag} batch {b}: skipped ({why})")
            continue
        if b == 1:
            rows = rows1  # compiled and warmed above
        else:
            rows = _rows(rng, cfg.vocab_size, b, p)
            adapter.generate(rows, n)  # warm-up: compiles this batch size
        adapter.generate(rows, 1)
        # Interleaved, so that drift in the machine's load falls on both.
        t_n, t_1 = _median_times([lambda: adapter.generate(rows, n), lambda: adapter.generate(rows, 1)],
                                 args.repeats)
        br.step_s = (t_n - t_1) / (n - 1)
        # During timed step j (1..n-1) the cache holds p + j tokens per row.
        br.kv_bytes = int(b * (p + n / 2) * kv_bytes_per_token(cfg, model.dtype))
        if br.step_s <= 0:
            out(f"{tag} batch {b}: generate({n}) took {t_n:.4f} s, generate(1) {t_1:.4f} s: the "
                "difference is noise; raise --decode-tokens")
            br.step_s = None
            continue
        br.fraction = (br.weight_bytes + br.kv_bytes) / br.step_s / args.bandwidth
        out(f"{tag} batch {b}: {br.tokens_per_s:,.1f} tokens/s, {br.step_s * 1e3:.3f} ms/token "
            f"(per step; one token per row); bytes read per step {_gb(br.weight_bytes + br.kv_bytes)} "
            f"(weights {_gb(br.weight_bytes)} + KV cache filled so far {_gb(br.kv_bytes)}, mean over "
            f"the steps) = {br.fraction:.3f} of the copy bandwidth")
        if b == 1:
            result.stepped_s = stepped_seconds(adapter, rows1[0], n, args.repeats)
            out(f"{tag} batch 1 host-stepped (adapter.decode per token, as stream/chat run): "
                f"{1 / result.stepped_s:,.1f} tokens/s, {result.stepped_s * 1e3:.3f} ms/token; "
                f"device loop above: {br.step_s * 1e3:.3f} ms/token")

    # compile count: a session of varied prompt lengths, after the runs above.
    lengths = args.session_lengths
    if not lengths:
        out(f"{tag} compile session: skipped (--session-lengths given no lengths)")
        return result
    mark = log.mark()
    start = time.perf_counter()
    for length in lengths:
        adapter.generate(_rows(rng, cfg.vocab_size, 1, length), n)
    elapsed = time.perf_counter() - start
    result.session_compiles = log.since(mark)
    out(f"{tag} compile session: prompt lengths {' '.join(map(str, lengths))} ({n} new tokens each, "
        f"batch 1) in {elapsed:.2f} s: {summarize_compiles(result.session_compiles)}")
    return result


def stepped_seconds(adapter: LlamaInferenceAdapter, prompt: list[int], n: int, repeats: int) -> float:
    """Median seconds per token of the host-stepped path: prefill, then n - 1 calls of
    `adapter.decode` (each returns a host int, so each is synchronised), as `stream` runs."""
    out, state = adapter.prefill(prompt)
    _, state = adapter.decode(out[-1], state)  # compile the step
    samples = []
    for _ in range(repeats):
        out, state = adapter.prefill(prompt)
        token = out[-1]
        start = time.perf_counter()
        for _ in range(n - 1):
            token, state = adapter.decode(token, state)
        samples.append((time.perf_counter() - start) / (n - 1))
    return statistics.median(samples)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.4f} GB"


def device_line() -> str:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    extra = f", {os.cpu_count()} CPU cores" if dev.platform == "cpu" else ""
    return (f"device: {dev.platform} ({kind}{extra}), {jax.device_count()} device(s); "
            f"jax {jax.__version__}, jaxlib {_jaxlib_version()}; Python {sys.version.split()[0]}")


def _jaxlib_version() -> str:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return "?"


def _parse_dtype(name: str | None):
    if name is None:
        return jnp.dtype(default_dtype())
    return jnp.dtype({"bf16": jnp.bfloat16, "f32": jnp.float32}.get(name, name))


def _fill_defaults(args) -> str:
    if args.preset is not None and not args.random_weights:
        raise InvalidRequestError(
            f"--preset {args.preset} has no weights file; add --random-weights (or pass "
            "--model PATH for a real file)"
        )
    on_gpu = jax.default_backend() != "cpu"
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    used = []
    for key in ("batch", "prompt_len", "decode_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, list(defaults[key]) if key == "batch" else defaults[key])
            used.append(key.replace("_", "-"))
    if args.session_lengths is None:
        args.session_lengths = default_session_lengths(args.prompt_len)
    if args.repeats < 1:
        raise InvalidRequestError(f"--repeats is {args.repeats}, expected at least 1")
    if args.decode_tokens < 2:
        raise InvalidRequestError(f"--decode-tokens is {args.decode_tokens}, expected at least 2")
    if args.prompt_len < 1 or not args.batch or any(b < 1 for b in args.batch) \
            or any(s < 1 for s in args.session_lengths):
        raise InvalidRequestError("--prompt-len, --batch and --session-lengths must be positive")
    return (f"defaults for {'GPU' if on_gpu else 'CPU'}: " + ", ".join(used)) if used else "all given"


def run(args, out: Callable[[str], None] = print) -> int:
    """Run the benchmark for parsed `jaxllama bench` arguments; print with `out`."""
    if args.compilation_cache:
        compilation_cache.enable(args.compilation_cache)
    with CompileLog() as log:
        return _run(args, log, out)


def _run(args, log: CompileLog, out) -> int:
    note = _fill_defaults(args)
    out("jaxllama bench")
    out(device_line())
    fired = verify_compile_event(log)
    out(f"compile event: {BACKEND_COMPILE_EVENT} ({'verified: fires' if fired else 'NOT seen: counts below are 0'})")
    cache_dir = compilation_cache.directory()
    out(f"persistent compilation cache: {cache_dir if cache_dir else 'off'}")
    dtype = None if args.dtype is None else _parse_dtype(args.dtype)

    bw, buf = copy_bandwidth()
    args.bandwidth = bw
    out(f"copy bandwidth: {bw / 1e9:,.1f} GB/s (bytes read + written by a jitted x + 1 over a "
        f"{buf / 2**20:.0f} MiB uint32 buffer, best of {BANDWIDTH_REPEATS})")

    from jaxllama.backend import choose

    tuned = choose().attention  # what the adapter runs for None
    out(f"attention: default path = {tuned!r} (jaxllama.backend.choose: 'pallas' on a GPU, 'xla' elsewhere "
        "and on a mesh)")
    impls = [(None, f"default:{tuned}")]
    if args.compare_xla:
        if tuned == "xla":
            out("--compare-xla: the default path is already 'xla' on this backend; it is not run twice")
        else:
            impls.append(("xla", "xla"))
    results = []
    for weights in args.weights or [None]:
        start = time.perf_counter()
        model, source = load_model(args, dtype, weights)
        jax.block_until_ready(model.params)
        c = model.config
        stored = (jnp.dtype(model.dtype).name if model.weights == "dense"
                  else f"{model.weights} weights, compute {jnp.dtype(model.dtype).name}")
        out(f"model: {source}; {c.arch}, {c.num_layers} layers, hidden {c.hidden_dim}, heads {c.num_heads}/"
            f"{c.num_kv_heads} kv, vocab {c.vocab_size}; {stored}, weights "
            f"{_gb(model.nbytes())} (made/loaded in {time.perf_counter() - start:.1f} s)")
        out(f"decode reads per step: weights {_gb(decode_weight_bytes(model))} (layers, final norm, "
            f"output projection{' = tied embedding' if c.tied_output else ''}) + KV cache "
            f"{kv_bytes_per_token(c, model.dtype) / 1e3:.1f} kB per cached token per row")
        if not results:
            out(f"settings: batch {' '.join(map(str, args.batch))}, prompt {args.prompt_len} tokens, "
                f"{args.decode_tokens} decode tokens, {args.repeats} repeats ({note})")
            slots = cache_slots(c, args.prompt_len + args.decode_tokens)
            out(f"KV cache: {slots} slots per row allocated; 'bytes read per step' counts the filled "
                f"slots only (an attention that reads all {slots} slots, masked, reads more)")
        prefix = "" if weights is None else f"{weights} "
        results += [bench_impl(model, impl, prefix + label, args, log, out) for impl, label in impls]
        for leaf in jax.tree_util.tree_leaves(model.params):
            leaf.delete()

    if cache_dir:
        out(f"persistent compilation cache: {log.cache_hits} hits, {log.cache_misses} misses this run "
            f"({cache_dir}); hits: {count_names(log.hit_names)}")
    out(f"all compilations this run: {summarize_compiles(log.compiles)}")
    out("")
    for line in summary_table(results, args):
        out(line)
    return 0


def summary_table(results: list[ImplResult], args) -> list[str]:
    head = ("| path | batch | tokens/s | ms/token | GB/step | of copy BW | TTFT ms | compile s "
            "| session compiles |")
    lines = [f"summary (copy bandwidth {args.bandwidth / 1e9:,.1f} GB/s; prompt {args.prompt_len}, "
             f"{args.decode_tokens} decode tokens)", head, "| " + " | ".join(["---"] * 9) + " |"]
    for r in results:
        for i, b in enumerate(r.batches):
            first = i == 0
            cells = [
                r.impl, str(b.batch),
                f"{b.tokens_per_s:,.1f}" if b.step_s else (b.skipped and "skipped" or "-"),
                f"{b.step_s * 1e3:.3f}" if b.step_s else "-",
                f"{(b.weight_bytes + b.kv_bytes) / 1e9:.4f}" if b.step_s else "-",
                f"{b.fraction:.3f}" if b.fraction is not None else "-",
                f"{r.ttft_s * 1e3:.2f}" if first and r.ttft_s is not None else "",
                f"{r.compile_s:.2f}" if first else "",
                str(len(r.session_compiles)) if first else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    stepped = [f"{r.impl} {1 / r.stepped_s:,.1f} tokens/s ({r.stepped_s * 1e3:.3f} ms/token)"
               for r in results if r.stepped_s]
    if stepped:
        lines.append("batch 1 host-stepped (adapter.decode per token): " + "; ".join(stepped))
    return lines


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.decode`: the same options as `jaxllama bench`."""
    import argparse

    from jaxllama.errors import JaxLlamaError

    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except JaxLlamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
