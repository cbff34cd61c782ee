"""Evaluation speed: the multiple-choice task through the `jaxllama` lm-eval backend vs
lm-eval's own `hf` backend on the same GGUF file, and packed scoring vs one sequence
per row on the same requests.

    python -m benchmarks.eval_speed [--runs 3] [--skip-hf]

End to end: each backend runs in a fresh process (jaxllama with the persistent
compilation cache off, so compilation is counted; then twice more with a fresh cache
directory, the second process reading what the first wrote, as a second `jaxllama eval`
does with its default cache): load the model, then
`lm_eval.simple_evaluate` over examples/eval_tasks' jaxllama_mc (20 questions, 80
loglikelihood requests) twice. Printed: load, first run (compilation included),
compile (first run minus the warm one), warm run, and end to end (load + first run);
then the first run's XLA compilations (count, seconds, the longest three; the warm run
should compile none).
jaxllama is float32 dense (as hf; the CPU default) and also with weights="int8".

Packed scoring: the 80 requests, tokenized as the backend does, scored by
`adapter.score(..., packed=False)` (one context+continuation per row, rows padded to a
power of two, 8 rows a call: the path before packing) and by
`adapter.loglikelihood_batch` packed, with and without shared contexts. Tokens/s counts
each request's context + continuation tokens; median of --runs warm runs after one
compiling run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
TASK = "jaxllama_mc"


def _one(backend: str, weights: str, cache: str = "off") -> dict:
    """In this (fresh) process: load, then run the task twice; seconds of each. `cache`:
    a persistent compilation cache directory for jaxllama (as `jaxllama eval` keeps one
    by default), or "off"."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if backend == "jaxllama" and cache != "off":
        from jaxllama import compilation_cache

        compilation_cache.enable(cache)

    os.chdir(ROOT)
    tm = TaskManager(include_path=str(ROOT / "examples" / "eval_tasks"))
    t0 = time.perf_counter()
    if backend == "hf":
        import torch
        from lm_eval.models.huggingface import HFLM

        from jaxllama import hub

        torch.set_num_threads(2)
        path = hub.pull(MODEL)
        lm = HFLM(pretrained=str(path.parent), gguf_file=path.name, dtype="float32", batch_size=8,
                  device="cpu")
    else:
        from jaxllama.evaluation import JaxLlamaLM

        if weights == "f32":
            lm = JaxLlamaLM(pretrained=MODEL, dtype="float32", batch_size="auto")
        else:
            lm = JaxLlamaLM(pretrained=MODEL, weights="int8", batch_size="auto")
    load = time.perf_counter() - t0
    from jaxllama.bench import CompileLog

    runs, accs = [], []
    with CompileLog() as log:  # XLA compilations (jaxllama's; hf compiles none)
        for _ in range(2):
            t0 = time.perf_counter()
            res = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tm, bootstrap_iters=0,
                                          verbosity="ERROR")
            runs.append(time.perf_counter() - t0)
            accs.append(res["results"][TASK]["acc,none"])
            if len(runs) == 1:
                first = list(log.compiles)
    top = sorted(first, key=lambda c: -c[1])[:3]
    return dict(load=load, first=runs[0], warm=runs[1], acc=accs[0], compiles=len(first),
                compile_s=sum(s for _, s in first), later_compiles=len(log.compiles) - len(first),
                top=", ".join(f"{name} {s:.2f} s" for name, s in top))


def end_to_end(label: str, backend: str, weights: str, cache: str = "off") -> dict:
    env = dict(os.environ, JAXLLAMA_COMPILATION_CACHE="off", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.eval_speed", "--one", backend, weights, cache],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["total"] = r["load"] + r["first"]
    print(f"{label:28s} load {r['load']:6.1f} s  first run {r['first']:6.1f} s  "
          f"(compile ~{r['first'] - r['warm']:5.1f} s)  warm run {r['warm']:6.1f} s  "
          f"end to end {r['total']:6.1f} s  acc {r['acc']:.2f}  load avg {os.getloadavg()[0]:.1f}",
          flush=True)
    if r["compiles"] or r["later_compiles"]:
        print(f"{'':28s} first run: {r['compiles']} XLA compilations, {r['compile_s']:.2f} s "
              f"(longest: {r['top']}); warm run: {r['later_compiles']}", flush=True)
    return r


def packed_vs_rows(runs: int) -> None:
    import lm_eval  # noqa: F401
    from lm_eval.tasks import TaskManager

    from jaxllama.evaluation import JaxLlamaLM

    os.chdir(ROOT)
    tm = TaskManager(include_path=str(ROOT / "examples" / "eval_tasks"))
    lm = JaxLlamaLM(pretrained=MODEL, dtype="float32")
    task = tm.load_task_or_group([TASK])[TASK]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    pairs = []
    for inst in task.instances:
        ctx, cont = inst.args
        pairs.append(lm._truncate(*lm._encode_pair(ctx, cont)))
    adapter = lm.adapter
    tokens = sum(len(c) + len(x) for c, x in pairs)

    def timed(fn) -> float:
        fn()  # compiles
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rows = timed(lambda: adapter.score([c + x for c, x in pairs], packed=False, batch_size=8))
    packed = timed(lambda: adapter.loglikelihood_batch(pairs, share_context=False))
    shared = timed(lambda: adapter.loglikelihood_batch(pairs))
    print(f"{len(pairs)} requests, {tokens} tokens; load avg {os.getloadavg()[0]:.1f}")
    for label, s in (("one sequence per row", rows), ("packed", packed), ("packed, shared contexts", shared)):
        print(f"  {label:24s} {s * 1000:8.1f} ms  {tokens / s:8.0f} tokens/s  x{rows / s:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("BACKEND", "WEIGHTS", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_one(*args.one)))
        return
    print(f"# end to end, {TASK} (80 requests), fresh process each", flush=True)
    ours = end_to_end("jaxllama float32", "jaxllama", "f32")
    ours_q = end_to_end("jaxllama int8 weights", "jaxllama", "int8")
    with tempfile.TemporaryDirectory() as cache:  # a later process, as `jaxllama eval` runs
        end_to_end("jaxllama float32, fill cache", "jaxllama", "f32", cache)
        cached = end_to_end("jaxllama float32, cache warm", "jaxllama", "f32", cache)
    if not args.skip_hf:
        hf = end_to_end("hf float32", "hf", "f32")
        print(f"end to end: hf / jaxllama float32 = x{hf['total'] / ours['total']:.2f}, "
              f"hf / jaxllama int8 = x{hf['total'] / ours_q['total']:.2f}; warm runs x"
              f"{hf['warm'] / ours['warm']:.2f} / x{hf['warm'] / ours_q['warm']:.2f}; "
              f"hf / jaxllama float32 with the compilation cache warm = x{hf['total'] / cached['total']:.2f}")
    print("# packed scoring vs one sequence per row (float32, warm)", flush=True)
    packed_vs_rows(args.runs)


if __name__ == "__main__":
    main()
