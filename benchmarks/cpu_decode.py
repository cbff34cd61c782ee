"""Prefill and decode speed on the CPU: jaxllama next to transformers and llama.cpp on
the same GGUF.

For each packaged model, both libraries get the same token ids (a `--prompt-tokens`
long prompt, 128 by default, cut from a fixed code-and-prose text with jaxllama's
tokenizer) and generate greedily, at batch 1, in the same process, one after the other.

Method (the same for both libraries, so the figures compare like with like):
- first call: the first prefill and the first `generate` in the process, timed apart;
  for jaxllama they include tracing and XLA compilation ("compile" below is the first
  call minus the steady-state call).
- prefill tokens/s: prompt tokens / median seconds of one prompt pass, after warm-up.
  jaxllama: `adapter.prefill(ids)` (jitted forward over the prompt, last-position
  logits, first-token sampling, the KV cache; the prompt bucket is exactly 128, so no
  padding). transformers: `model(ids, logits_to_keep=1)` under `torch.no_grad()`, which
  is what its `generate` runs for the prompt.
- decode tokens/s: (N - 1) / (median t(generate N new tokens) - median t(generate 1)).
  Both `generate` calls run the same prefill, so the difference is the N - 1 decode
  steps alone (the first new token comes out of prefill). jaxllama: `adapter.generate`
  (its decode loop runs on the device, `lax.while_loop`); transformers:
  `model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`.
- a diagnostic, jaxllama only: the host-stepped path, `adapter.decode` once per token
  (the same jitted step the device loop runs, with a host round trip per token), to
  tell the model's own per-token cost from the device loop's.

Both must produce N tokens: jaxllama stops at EOS, so the tokens generated are counted
and printed for both, and the two greedy continuations are compared token by token.
torch runs with `torch.set_num_threads(os.cpu_count())` (`--torch-threads` to change it);
XLA's CPU backend uses every core by default.

llama.cpp (`llama-cpp-python`, imported as `llama_cpp`) runs too when it is importable:
from this environment, or from another one's site-packages given with `--llamacpp-site`
(appended to sys.path, so this environment's numpy wins). It runs in a child process
of its own, so that XLA's thread pool does not share its cores. It gets the same ids: prefill
= `Llama.eval(prompt)` after `reset()`, decode = N - 1 rounds of `sample(temp=0)` +
`eval([token])` (greedy), 2 threads unless `--llamacpp-threads`. Building it from source
takes 15-20 minutes here, so CI never needs it:

    python -m venv /work/llamacpp-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" MAKEFLAGS=-j2 /work/llamacpp-venv/bin/pip install \
        --no-cache-dir llama-cpp-python==0.3.36
    python -m benchmarks.cpu_decode --skip-transformers --weights f32 int8 native \
        --llamacpp-site /work/llamacpp-venv/lib/python3.11/site-packages

    python -m benchmarks.cpu_decode                         # both models, 64 new tokens
    python -m benchmarks.cpu_decode --model smollm2-135m-instruct --new-tokens 32
    python -m benchmarks.cpu_decode --skip-transformers --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.load import machine_info
from jaxllama import hub
from jaxllama.models import LlamaInferenceAdapter

MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")

# Plain text (no chat template): a code file being written, whose greedy continuation
# runs on for well over 64 tokens on both models without an end-of-text token (checked
# at run time: the generated counts are printed).
PROMPT_TEXT = '''"""Utilities for reading and summarising CSV sales reports.

Each report has one row per order with the columns: order_id, date, region, product,
quantity and unit_price. The functions below load a report, clean it, and compute
totals per region and per product, so that the monthly summary can be written out
as a small table.
"""

import csv
from collections import defaultdict
from dataclasses import dataclass
from datetime import date


@dataclass
class Order:
    order_id: int
    day: date
    region: str
    product: str
    quantity: int
    unit_price: float

    @property
    def total(self) -> float:
        return self.quantity * self.unit_price


def load_orders(path):
    """Read the CSV file at `path` and return a list of Order objects."""
    orders = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
'''


@dataclasses.dataclass
class Result:
    model: str
    impl: str
    dtype: str
    prompt_tokens: int
    new_tokens: int
    generated: int | None = None
    first_prefill_s: float | None = None
    prefill_s: float | None = None
    first_generate_s: float | None = None
    generate_s: float | None = None
    generate1_s: float | None = None
    step_s: float | None = None  # jaxllama host-stepped adapter.decode, per token
    stepped_equal: bool | None = None  # host-stepped tokens == generate's
    tokens: list[int] | None = None
    loadavg: tuple[float, float, float] | None = None

    @property
    def prefill_tps(self):
        return self.prompt_tokens / self.prefill_s if self.prefill_s else None

    @property
    def decode_s_per_token(self):
        if self.generate_s is None or self.generate1_s is None or self.new_tokens < 2:
            return None
        return (self.generate_s - self.generate1_s) / (self.new_tokens - 1)

    @property
    def decode_tps(self):
        d = self.decode_s_per_token
        return 1.0 / d if d and d > 0 else None


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def median_time(fn, repeats):
    samples = []
    out = None
    for _ in range(repeats):
        out, s = timed(fn)
        samples.append(s)
    return out, statistics.median(samples)


def prompt_ids(adapter, n: int) -> list[int]:
    ids = adapter.tokenizer.encode(PROMPT_TEXT)
    if len(ids) < n:
        raise SystemExit(f"the prompt text has only {len(ids)} tokens; --prompt-tokens {n} is too many")
    return ids[:n]


def bench_jax(name, path, dtype, n_prompt, n_new, repeats, weights=None) -> tuple[Result, list[int], tuple]:
    adapter = LlamaInferenceAdapter.from_gguf(path, dtype=None if weights else dtype,
                                              weights=weights, progress=False)
    jax.block_until_ready(adapter.model.params)
    ids = prompt_ids(adapter, n_prompt)
    res = Result(name, "jaxllama", weights or str(jnp.dtype(dtype)), len(ids), n_new)

    def run_prefill():
        out, state = adapter.prefill(ids)  # returns host ids: already synchronised
        return out

    _, res.first_prefill_s = timed(run_prefill)
    _, res.prefill_s = median_time(run_prefill, repeats)

    out, res.first_generate_s = timed(lambda: adapter.generate(ids, n_new))
    timed(lambda: adapter.generate(ids, 1))  # compile the 1-token loop
    out, res.generate_s = median_time(lambda: adapter.generate(ids, n_new), repeats)
    _, res.generate1_s = median_time(lambda: adapter.generate(ids, 1), repeats)
    res.tokens = out[len(ids):]
    res.generated = len(res.tokens)

    # Diagnostic: the host-stepped path, one jitted decode step per `adapter.decode` call
    # (the same step function the device loop runs, plus a host round trip per token).
    out, state = adapter.prefill(ids)
    tok, state = adapter.decode(out[-1], state)  # compile the step
    per_run = []
    for _ in range(repeats):
        out, state = adapter.prefill(ids)
        stepped = [out[-1]]
        start = time.perf_counter()
        for _ in range(n_new - 1):
            tok, state = adapter.decode(stepped[-1], state)  # returns a host int: synchronised
            stepped.append(tok)
        per_run.append((time.perf_counter() - start) / (n_new - 1))
    res.step_s = statistics.median(per_run)
    res.stepped_equal = stepped[: res.generated] == res.tokens
    res.loadavg = os.getloadavg()
    eos = adapter.eos_ids()
    adapter.unload()
    return res, ids, eos


def bench_hf(name, path, dtype, ids, n_new, repeats, eos_ids) -> Result:
    import torch
    import transformers

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch_dtype
    ).eval()
    res = Result(name, "transformers", dtype, len(ids), n_new)
    x = torch.tensor([ids])

    def run_prefill():
        with torch.no_grad():
            return model(x, use_cache=True, logits_to_keep=1).logits

    _, res.first_prefill_s = timed(run_prefill)
    _, res.prefill_s = median_time(run_prefill, repeats)

    def gen(n):
        with torch.no_grad():
            # min_new_tokens = max_new_tokens: exactly n tokens, whatever EOS would do.
            return model.generate(x, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                  eos_token_id=list(eos_ids), pad_token_id=eos_ids[0],
                                  temperature=None, top_p=None, top_k=None)

    out, res.first_generate_s = timed(lambda: gen(n_new))
    out, res.generate_s = median_time(lambda: gen(n_new), repeats)
    _, res.generate1_s = median_time(lambda: gen(1), repeats)
    res.tokens = out[0, len(ids):].tolist()
    res.generated = len(res.tokens)
    res.loadavg = os.getloadavg()
    del model
    gc.collect()
    return res


LLAMACPP_CHILD = r"""
import json, os, statistics, sys, time
sys.path.append(sys.argv[1]) if sys.argv[1] else None
import llama_cpp
path, threads, n_new, repeats = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ids = json.loads(sys.stdin.read())
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                      n_ctx=1 << (len(ids) + n_new).bit_length(), n_batch=512, verbose=False)
def prefill():
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - start
first = prefill()
pre = statistics.median(prefill() for _ in range(repeats))
runs = []
for _ in range(repeats):
    prefill()
    tokens = [int(llm.sample(temp=0.0))]
    start = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([tokens[-1]])
        tokens.append(int(llm.sample(temp=0.0)))
    runs.append(time.perf_counter() - start)
print(json.dumps({"version": llama_cpp.__version__, "first_prefill_s": first, "prefill_s": pre,
                  "steps_s": statistics.median(runs), "tokens": tokens,
                  "loadavg": os.getloadavg()}))
"""


def llama_cpp_available(site: str | None) -> str | None:
    """llama_cpp's version if a child process can import it (with `site`, another
    venv's site-packages, appended to its sys.path), else None."""
    if site and not os.path.isdir(site):
        raise SystemExit(f"--llamacpp-site {site}: no such directory")
    code = (f"import sys; sys.path.append({site!r}); " if site else "") + \
        "import llama_cpp; print(llama_cpp.__version__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def bench_llamacpp(site, name, path, ids, n_new, repeats, threads) -> Result:
    """llama.cpp on the same file and ids, in a child process of its own (so that no
    XLA thread pool shares its cores): prefill = eval(prompt) after reset; decode =
    greedy sample + eval of one token, N - 1 times (its per-token cost, as jaxllama's)."""
    res = subprocess.run(
        [sys.executable, "-c", LLAMACPP_CHILD, site or "", str(path), str(threads), str(n_new),
         str(repeats)], input=json.dumps(list(ids)), capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"llama.cpp child failed:\n{res.stderr[-3000:]}")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    r = Result(name, "llama.cpp", "gguf", len(ids), n_new)
    r.first_prefill_s, r.prefill_s = got["first_prefill_s"], got["prefill_s"]
    # Expressed as generate(N) - generate(1) = the N - 1 decode steps, as for the others.
    r.first_generate_s, r.generate1_s, r.generate_s = 0.0, 0.0, got["steps_s"]
    r.tokens = got["tokens"]
    r.generated = len(r.tokens)
    r.loadavg = tuple(got["loadavg"])
    return r


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def print_result(r: Result) -> None:
    print(f"   {r.impl:<12} first prefill {r.first_prefill_s:.2f} s, steady {r.prefill_s:.3f} s "
          f"-> {r.prefill_tps:.1f} prompt tokens/s")
    print(f"   {'':<12} first generate({r.new_tokens}) {r.first_generate_s:.2f} s; steady "
          f"generate({r.new_tokens}) {r.generate_s:.2f} s, generate(1) {r.generate1_s:.3f} s "
          f"-> decode {_f(r.decode_tps, '.1f')} tokens/s ({r.generated} tokens generated)")
    if r.step_s is not None:
        print(f"   {'':<12} host-stepped adapter.decode: {r.step_s * 1e3:.1f} ms/token "
              f"({1 / r.step_s:.1f} tokens/s; tokens {'equal to' if r.stepped_equal else 'DIFFER from'} "
              f"generate's); in the device loop: "
              f"{_f(r.decode_s_per_token and r.decode_s_per_token * 1e3, '.1f')} ms/token")
    print(f"   {'':<12} load average now {r.loadavg[0]:.2f}/{r.loadavg[1]:.2f}/{r.loadavg[2]:.2f}")


def compare_tokens(a: Result, b: Result) -> str:
    n = min(len(a.tokens), len(b.tokens))
    for i in range(n):
        if a.tokens[i] != b.tokens[i]:
            return f"greedy continuations differ from token {i} on"
    if len(a.tokens) != len(b.tokens):
        return f"equal over the first {n} tokens; lengths {len(a.tokens)} and {len(b.tokens)}"
    return f"greedy continuations identical ({n} tokens)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", choices=MODELS,
                   help="packaged model (repeatable; default: both)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights/activations dtype, for both libraries (default float32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (median)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--weights", nargs="+", default=None,
                   help="jaxllama weight storages to run, e.g. f32 int8 native int4 (default: "
                        "dense at --dtype)")
    p.add_argument("--llamacpp-site", default=None,
                   help="site-packages of a venv holding llama-cpp-python (appended to sys.path)")
    p.add_argument("--llamacpp-threads", type=int, default=2)
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads for transformers (default: the CPU count)")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed is measured over N - 1 steps)")

    threads = args.torch_threads
    if not args.skip_transformers:
        import torch

        torch.set_num_threads(threads)
    info = machine_info()
    print(f"loadavg at start: {os.getloadavg()}; torch.set_num_threads({threads})"
          + (" (transformers skipped)" if args.skip_transformers else ""))
    print(f"prompt: first {args.prompt_tokens} tokens of a fixed Python-module text; "
          f"{args.new_tokens} new tokens, greedy, batch 1, {args.dtype}; {args.repeats} repeats (median)")

    llama_cpp = None if args.skip_llamacpp else llama_cpp_available(args.llamacpp_site)
    print("llama.cpp: " + (f"llama_cpp {llama_cpp} ({args.llamacpp_site or 'this environment'}), "
                           f"{args.llamacpp_threads} threads, in a child process" if llama_cpp
                           else "not importable (skipped)"))
    results: list[Result] = []
    notes: list[str] = []
    for name in args.model or MODELS:
        path = hub.pull(name, progress=False)
        print(f"\n== {name}", flush=True)
        mine = []
        for weights in args.weights or [None]:
            r, ids, eos = bench_jax(name, path, args.dtype, args.prompt_tokens, args.new_tokens,
                                    args.repeats, weights)
            results.append(r)
            mine.append(r)
            print_result(r)
            if r.generated != args.new_tokens:
                notes.append(f"{name}: jaxllama stopped at EOS after {r.generated} of {args.new_tokens} "
                             "tokens; its decode figure then covers fewer steps")
            gc.collect()
        r = mine[0]
        if llama_cpp is not None:
            ref = bench_llamacpp(args.llamacpp_site, name, path, ids, args.new_tokens, args.repeats,
                                 args.llamacpp_threads)
            results.append(ref)
            print_result(ref)
            for m in mine:
                notes.append(f"{name}: jaxllama {m.dtype} / llama.cpp: prefill "
                             f"{m.prefill_tps / ref.prefill_tps:.2f}x, decode (device loop) "
                             f"{_f(m.decode_tps and m.decode_tps / ref.decode_tps, '.2f')}x, decode "
                             f"(stepped) {_f(m.step_s and 1 / m.step_s / ref.decode_tps, '.2f')}x; "
                             f"{compare_tokens(m, ref)}")
        if not args.skip_transformers:
            h = bench_hf(name, path, args.dtype, ids, args.new_tokens, args.repeats, eos)
            results.append(h)
            print_result(h)
            notes.append(f"{name}: {compare_tokens(r, h)}")
        gc.collect()

    v = {"jax": jax.__version__}
    if llama_cpp is not None:
        v["llama-cpp-python"] = llama_cpp
    if not args.skip_transformers:
        import torch
        import transformers

        v |= {"torch": torch.__version__, "transformers": transformers.__version__}
    print(f"\nMachine: {info['cpus']} CPUs ({info['cpu']}), {info['mem_gib']:.1f} GiB RAM, "
          f"Python {info['python']}; " + ", ".join(f"{k} {val}" for k, val in v.items()))
    print("Method: prefill = median time of one prompt pass; decode = (N-1) / "
          "(t(generate N) - t(generate 1)); compile = (first - steady) prefill + (first - steady) "
          "generate; stepped = jaxllama's host-stepped adapter.decode, one call per token.")
    for n in notes:
        print("Note: " + n)
    header = (f"{'model':<28} {'impl':<12} {'weights':<8} {'compile s':>9} {'prefill tok/s':>13} "
              f"{'decode tok/s':>12} {'stepped tok/s':>13} {'generated':>9} {'load':>5}")
    print(header)
    print("-" * len(header))
    for r in results:
        compile_s = None
        if r.impl == "jaxllama":
            compile_s = (r.first_prefill_s - r.prefill_s) + (r.first_generate_s - r.generate_s)
        print(f"{r.model:<28} {r.impl:<12} {r.dtype:<8} {_f(compile_s, '.2f'):>9} "
              f"{_f(r.prefill_tps, '.1f'):>13} {_f(r.decode_tps, '.1f'):>12} "
              f"{_f(r.step_s and 1 / r.step_s, '.1f'):>13} {r.generated:>9} {r.loadavg[0]:>5.2f}")


if __name__ == "__main__":
    sys.exit(main())
