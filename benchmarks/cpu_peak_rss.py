"""Peak resident memory of one `generate` per weight storage, each in a fresh process.

For each `--weights` option, a child process loads the packaged model with it, runs one
`generate` (the first 128 tokens of cpu_decode's prompt, 64 new tokens, greedy) and
reports `resource.getrusage(RUSAGE_SELF).ru_maxrss`, the high-water mark of the whole
process (load included), beside `vram_usage()`. Issue 20's target: int8 at most 0.6x
float32 on the Qwen file.

    python -m benchmarks.cpu_peak_rss                       # Qwen, f32 int8 native int4
    python -m benchmarks.cpu_peak_rss --model smollm2-135m-instruct --weights f32 int8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
from jaxllama.models import LlamaInferenceAdapter
from benchmarks.cpu_decode import prompt_ids
name, weights, n_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
adapter = LlamaInferenceAdapter.from_gguf(name, weights=weights, progress=False)
ids = prompt_ids(adapter, 128)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
out = adapter.generate(ids, n_new)
print(json.dumps({"weights": weights, "vram_mib": adapter.vram_usage() / 2**20,
                  "peak_after_load_mib": loaded / 1024,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "generated": len(out) - len(ids), "first_generate_s": time.perf_counter() - start}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--weights", nargs="+", default=["f32", "int8", "native", "int4"])
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    rows = []
    for w in args.weights:
        res = subprocess.run([sys.executable, "-c", CHILD, args.model, w, str(args.new_tokens)],
                             capture_output=True, text=True)
        if res.returncode:
            print(f"{w}: child failed:\n{res.stderr[-2000:]}")
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["peak_mib"] for r in rows if r["weights"] == "f32"), None)
    print(f"\n{args.model}: one generate (128-token prompt, {args.new_tokens} new tokens), peak RSS per process")
    print("| weights | vram_usage MiB | peak RSS after load MiB | peak RSS MiB | vs f32 |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['peak_mib'] / base:.2f}x" if base else "-"
        print(f"| {r['weights']} | {r['vram_mib']:.0f} | {r['peak_after_load_mib']:.0f} | {r['peak_mib']:.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
