"""Replay a workload against the engine in process and print what a serving benchmark
prints (issue 17's speed targets), beside the adapter's own paths in the same run.

Scenarios (--scenario, default all):

* ``throughput``: --requests requests (random prompts of --prompt-len A:B tokens, --new
  C:D new tokens each) arriving together, or as a Poisson process with --rate requests
  per second. Beside it, in the same run: the same requests one after another with
  `adapter.generate` (``sequential``), and all of them as one static `adapter.generate`
  batch run for the longest output (``static batch``; each request's tokens past its
  own output length are not counted, since a caller would throw them away).
* ``prefix``: --prefix-requests requests sharing a --prefix-len token system prompt
  (each with its own 32-token question, 16 new tokens), each arriving after the one
  before has finished: the first computes the prefix, the others should find it in
  the prefix cache. Prints every request's time to first token, and the median TTFT of
  the requests after the first as a fraction of the first's.
* ``long``: 8 streams (64-token prompts, --long-new new tokens) decode; once each has
  its first token, a --long-prompt token prompt arrives. Prints each stream's largest
  gap between token deliveries against its median gap. The engine emits the N tokens
  of one decode dispatch together, so a "gap" is the time between two deliveries, as
  vLLM's serving benchmark measures inter-token latency between streamed chunks.
* ``compile``: 100 requests of random lengths (prompts 1 to the chunk size times 3,
  outputs 1-40) through a fresh engine: the number of XLA compilations before and
  during the session (the session should compile nothing after warmup).

Every scenario warms its engine up first (compilation reported separately), then times
one run. Greedy decoding; the model's EOS ends a request early (as it does for the
adapter), and throughput counts the tokens actually produced.

    python -m benchmarks.engine_serve                                     # all, SmolLM2 float32
    python -m benchmarks.engine_serve --scenario throughput --requests 32 --slots 32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.workload import token_range
from jaxllama import hub
from jaxllama.bench import CompileLog
from jaxllama.engine.scheduler import Engine
from jaxllama.models import LlamaInferenceAdapter

# Random prompt ids are drawn above the special tokens of the packaged models.
FIRST_ID = 100



def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    a = np.asarray(values) * 1e3
    return (f"mean {a.mean():7.1f} ms  p50 {np.percentile(a, 50):7.1f} ms  "
            f"p99 {np.percentile(a, 99):7.1f} ms")


class _Peak:
    """Polls engine.metrics() in a thread and keeps the largest slots / pages in use."""

    def __init__(self, engine: Engine, every: float = 0.05):
        self.engine, self.every = engine, every
        self.slots = self.pages = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            m = self.engine.metrics()
            self.slots = max(self.slots, m.slots_used)
            self.pages = max(self.pages, m.pages_used)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _engine(adapter, args, *, max_context: int, num_slots: int) -> Engine:
    return Engine.from_adapter(adapter, num_slots=num_slots, max_context=max_context,
                               page_size=args.page_size, prefill_chunk=args.prefill_chunk,
                               decode_steps=args.decode_steps,
                               prefill_budget=args.prefill_budget)


def _warm(engine: Engine, log: CompileLog) -> None:
    mark = log.mark()
    t0 = time.perf_counter()
    engine.warmup()
    took = log.since(mark)
    print(f"  engine warmup: {time.perf_counter() - t0:.1f} s, {len(took)} compilations "
          f"({sum(d for _, d in took):.1f} s compiling)")


def _report(label: str, outs, wall: float, engine: Engine | None = None, peak=None) -> float:
    produced = sum(len(o.tokens) for o in outs)
    print(f"  {label}: {len(outs)} requests, {produced} output tokens in {wall:.2f} s: "
          f"{len(outs) / wall:.2f} req/s, {produced / wall:.1f} output tok/s")
    print(f"    TTFT  {_stats([o.ttft for o in outs])}")
    gaps = [g for o in outs for g in o.inter_token_times if g > 0]
    tpot = [(o.e2e - o.ttft) / (len(o.tokens) - 1) for o in outs if len(o.tokens) > 1]
    print(f"    TPOT  {_stats(tpot)}")
    print(f"    ITL (gaps between deliveries)  {_stats(gaps)}")
    if engine is not None:
        m = engine.metrics()
        rate = m.prefix_hit_tokens / m.prefix_query_tokens if m.prefix_query_tokens else 0.0
        print(f"    prefix cache: {m.prefix_hit_tokens} of {m.prefix_query_tokens} prompt tokens "
              f"hit ({rate:.0%}); peak slots used {peak.slots}/{m.slots_total}, "
              f"peak pages used {peak.pages}/{m.pages_total}")
    return produced / wall


def _run_engine(engine: Engine, prompts, news, arrivals) -> tuple[list, float, _Peak]:
    with _Peak(engine) as peak:
        t0 = time.perf_counter()
        handles = []
        for prompt, new, at in zip(prompts, news, arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            handles.append(engine.submit(prompt, new))
        outs = [h.result(timeout=3600) for h in handles]
        wall = time.perf_counter() - t0
    return outs, wall, peak


def throughput(adapter, args, log: CompileLog, rng) -> None:
    n = args.requests
    prompts = [rng.integers(FIRST_ID, adapter.vocab_size(), rng.integers(*args.prompt_len,
                                                                          endpoint=True)).tolist()
               for _ in range(n)]
    news = [int(rng.integers(*args.new, endpoint=True)) for _ in range(n)]
    if args.rate:
        arrivals = np.cumsum(rng.exponential(1 / args.rate, n)).tolist()
    else:
        arrivals = [0.0] * n
    print(f"throughput: {n} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]}, "
          f"new {args.new[0]}-{args.new[1]}, "
          f"{'Poisson %.2f req/s' % args.rate if args.rate else 'arriving together'}; "
          f"{args.slots} slots")
    max_context = args.prompt_len[1] + args.new[1]
    engine = _engine(adapter, args, max_context=max_context, num_slots=args.slots)
    with engine:
        _warm(engine, log)
        mark = log.mark()
        outs, wall, peak = _run_engine(engine, prompts, news, arrivals)
        engine_rate = _report("engine", outs, wall, engine, peak)
        print(f"    compilations during the run: {len(log.since(mark))}")
    expected = [adapter.generate([p], k)[0][len(p):] for p, k in
                zip(prompts[:2], news[:2])]  # also compiles the adapter for two buckets
    if [o.tokens for o in outs[:2]] != expected:
        print("  WARNING: the engine's first two outputs differ from adapter.generate")

    # Sequential: each request alone through adapter.generate (compiled per prompt
    # bucket: a first pass over one request of each bucket compiles them untimed).
    buckets = {}
    for p, k in zip(prompts, news):
        buckets.setdefault(1 << max(len(p) - 1, 1).bit_length(), (p, k))
    for p, k in buckets.values():
        adapter.generate([p], k)
    todo = list(zip(prompts, news))[: args.sequential or n]
    t0 = time.perf_counter()
    produced = sum(len(adapter.generate([p], k)[0]) - len(p) for p, k in todo)
    seq_wall = time.perf_counter() - t0
    seq_rate = produced / seq_wall
    print(f"  sequential adapter.generate: {len(todo)} requests, {produced} tokens in "
          f"{seq_wall:.2f} s: {seq_rate:.1f} output tok/s")

    # Static batch: all prompts in one adapter.generate call, run for the longest output.
    longest = max(news)
    adapter.generate(prompts, longest)  # compile
    t0 = time.perf_counter()
    rows = adapter.generate(prompts, longest)
    static_wall = time.perf_counter() - t0
    useful = sum(min(len(r) - len(p), k) for r, p, k in zip(rows, prompts, news))
    static_rate = useful / static_wall
    print(f"  static adapter.generate batch of {n}: {useful} useful tokens (of "
          f"{sum(len(r) - len(p) for r, p in zip(rows, prompts))}) in {static_wall:.2f} s: "
          f"{static_rate:.1f} output tok/s")
    print(f"  RATIOS: engine / sequential = {engine_rate / seq_rate:.2f}x (target >= 3), "
          f"engine / static batch = {engine_rate / static_rate:.2f}x (target >= 1)")


def prefix(adapter, args, log: CompileLog, rng) -> None:
    shared = rng.integers(FIRST_ID, adapter.vocab_size(), args.prefix_len).tolist()
    k = args.prefix_requests
    print(f"prefix: {k} requests sharing a {args.prefix_len}-token prefix (+32 own tokens, "
          f"16 new), one after another; {args.slots} slots")
    engine = _engine(adapter, args, max_context=args.prefix_len + 64, num_slots=args.slots)
    with engine:
        _warm(engine, log)
        outs = []
        for _ in range(k):
            own = rng.integers(FIRST_ID, adapter.vocab_size(), 32).tolist()
            outs.append(engine.submit(shared + own, 16).result(timeout=3600))
        for i, o in enumerate(outs):
            print(f"    request {i}: TTFT {o.ttft * 1e3:8.1f} ms, {o.cached_tokens} prompt "
                  f"tokens from the cache")
        first, rest = outs[0].ttft, statistics.median(o.ttft for o in outs[1:])
        m = engine.metrics()
        print(f"  first TTFT {first * 1e3:.1f} ms, median of the rest {rest * 1e3:.1f} ms: "
              f"RATIO {rest / first:.3f} (target <= 0.2); prefix cache "
              f"{m.prefix_hit_tokens}/{m.prefix_query_tokens} tokens hit")


def long_prompt(adapter, args, log: CompileLog, rng) -> None:
    streams = 8
    print(f"long: {streams} streams (64-token prompts, {args.long_new} new) and a "
          f"{args.long_prompt}-token prompt arriving once all have their first token; "
          f"chunk {args.prefill_chunk}, N={args.decode_steps}")
    engine = _engine(adapter, args, max_context=max(args.long_prompt + 16, 64 + args.long_new),
                     num_slots=streams + 1)
    with engine:
        _warm(engine, log)
        handles = [engine.submit(rng.integers(FIRST_ID, adapter.vocab_size(), 64).tolist(),
                                 args.long_new, stop_ids=()) for _ in range(streams)]
        deadline = time.monotonic() + 600
        while any(not h.tokens for h in handles) and time.monotonic() < deadline:
            time.sleep(0.01)
        long_handle = engine.submit(
            rng.integers(FIRST_ID, adapter.vocab_size(), args.long_prompt).tolist(), 8)
        outs = [h.result(timeout=3600) for h in handles]
        long_out = long_handle.result(timeout=3600)
    worst = 0.0
    for i, o in enumerate(outs):
        gaps = [g for g in o.inter_token_times if g > 0]
        ratio = max(gaps) / statistics.median(gaps)
        worst = max(worst, ratio)
        print(f"    stream {i}: {len(o.tokens)} tokens, {len(gaps)} deliveries, median gap "
              f"{statistics.median(gaps) * 1e3:.0f} ms, largest {max(gaps) * 1e3:.0f} ms "
              f"({ratio:.2f}x)")
    print(f"  long prompt TTFT {long_out.ttft:.2f} s; worst stream RATIO largest/median gap "
          f"{worst:.2f} (target <= 3)")


def compile_session(adapter, args, log: CompileLog, rng) -> None:
    top = 3 * args.prefill_chunk
    print(f"compile: 100 requests (prompts 1-{top}, outputs 1-40) through a fresh engine")
    engine = _engine(adapter, args, max_context=top + 40, num_slots=args.slots)
    spec = engine.spec
    with engine:
        _warm(engine, log)
        mark = log.mark()
        handles = [engine.submit(rng.integers(FIRST_ID, adapter.vocab_size(),
                                              rng.integers(1, top, endpoint=True)).tolist(),
                                 int(rng.integers(1, 40, endpoint=True)))
                   for _ in range(100)]
        for h in handles:
            h.result(timeout=3600)
        during = log.since(mark)
    print(f"  prefill buckets {spec.prefill_buckets}, windows {spec.windows}: "
          f"{len(during)} compilations during the 100 requests")


SCENARIOS = {"throughput": throughput, "prefix": prefix, "long": long_prompt,
             "compile": compile_session}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--scenario", default="all", choices=("all", *SCENARIOS))
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=token_range, default=(64, 512))
    ap.add_argument("--new", type=token_range, default=(64, 128))
    ap.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: together)")
    ap.add_argument("--sequential", type=int, default=0,
                    help="time only the first K requests one after another (0: all)")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--prefill-budget", type=int, default=None,
                    help="prompt tokens per scheduler iteration (default: the engine's)")
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--prefix-requests", type=int, default=16)
    ap.add_argument("--long-prompt", type=int, default=2048)
    ap.add_argument("--long-new", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    path = args.model if args.model.endswith(".gguf") else hub.pull(args.model)
    t0 = time.perf_counter()
    adapter = LlamaInferenceAdapter.from_gguf(path, dtype=getattr(jnp, args.dtype), progress=False)
    print(f"jaxllama engine benchmark: jax {jax.__version__} ({jax.default_backend()}), "
          f"Python {platform.python_version()}, {args.model} {args.dtype}, "
          f"loaded in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(args.seed)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    with CompileLog() as log:
        for name in names:
            SCENARIOS[name](adapter, args, log, rng)


if __name__ == "__main__":
    main()
