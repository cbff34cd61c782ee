"""Load time on the CPU: from a GGUF path to params on the device, next to transformers.

For each packaged model (SmolLM2-135M Q4_1 and Qwen2.5-Coder-0.5B) this measures, in a
fresh Python process per model (so one model's compiled kernels never help the other):

- header parse: `jaxllama.gguf.reader.read_gguf(path)` against `gguf.GGUFReader(path)`
  (median of `--repeats` opens, at most 2 for GGUFReader, which takes seconds; both map
  the file and build per-tensor views).
- jaxllama load: `load_gguf(path, progress=False)` then `jax.block_until_ready(params)`,
  float32. The first load in the process includes tracing and compiling one dequant
  kernel per (block type, shape); the second reuses them. Both are reported; the first
  model's arrays are freed before the second load.
- transformers load: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
  dtype=torch.float32)`, once, in the same process, after jaxllama's loads (torch and
  transformers are imported before the clock starts).

The file is read from the OS page cache in every case (it is read once before anything
is timed), so these are not cold-disk figures; the raw read time is printed alongside.
Import times of jax and of torch+transformers are printed but not counted.

    python -m benchmarks.load                             # both models
    python -m benchmarks.load --model qwen2.5-coder-0.5b-instruct
    python -m benchmarks.load --skip-transformers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
QWEN_TARGET_S = 10.0


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = int(line.split()[1]) / 2**20
                    break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_gib": mem_gib, "python": platform.python_version()}


def versions(with_torch: bool) -> dict:
    import jax

    out = {"jax": jax.__version__, "jaxlib": getattr(__import__("jaxlib"), "__version__", "?")}
    if with_torch:
        import torch
        import transformers

        out |= {"torch": torch.__version__, "transformers": transformers.__version__}
    return out


def _median_time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(name: str, *, skip_transformers: bool, repeats: int) -> dict:
    """All figures for one model, in this process (meant to be a fresh one)."""
    res: dict = {"model": name, "loadavg_start": os.getloadavg()}

    start = time.perf_counter()
    import jax

    import jaxllama.models
    from jaxllama import hub
    from jaxllama.gguf.reader import read_gguf

    res["import_jax_s"] = time.perf_counter() - start
    import gguf

    path = hub.pull(name, progress=False)
    res["file"] = str(path)
    res["file_mb"] = path.stat().st_size / 1e6

    # Bring the file into the page cache (and time a plain sequential read of it).
    def read_all():
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass

    read_all()
    res["read_file_s"] = _median_time(read_all, repeats)

    res["header_jaxllama_s"] = _median_time(lambda: read_gguf(path), repeats)
    # GGUFReader takes seconds per open (it walks the tokenizer arrays item by item).
    res["header_gguf_s"] = _median_time(lambda: gguf.GGUFReader(path), min(repeats, 2))

    def load():
        start = time.perf_counter()
        model = jaxllama.models.load_gguf(path, progress=False)
        jax.block_until_ready(model.params)
        return model, time.perf_counter() - start

    model, res["jax_load_first_s"] = load()
    res["jax_param_mb"] = model.nbytes() / 1e6
    for leaf in jax.tree_util.tree_leaves(model.params):
        leaf.delete()
    del model
    model, res["jax_load_second_s"] = load()
    for leaf in jax.tree_util.tree_leaves(model.params):
        leaf.delete()
    del model

    if not skip_transformers:
        start = time.perf_counter()
        import torch
        import transformers

        res["import_torch_s"] = time.perf_counter() - start
        start = time.perf_counter()
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        res["hf_load_s"] = time.perf_counter() - start
        res["hf_param_mb"] = sum(p.numel() * p.element_size() for p in hf.parameters()) / 1e6
        del hf
    res["loadavg_end"] = os.getloadavg()
    res["versions"] = versions(not skip_transformers)
    return res


def run_child(name: str, args) -> dict:
    """Measure one model in a fresh interpreter; its progress goes to our stderr."""
    cmd = [sys.executable, "-m", "benchmarks.load", "--child", "--model", name,
           "--repeats", str(args.repeats)]
    if args.skip_transformers:
        cmd.append("--skip-transformers")
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_model(r: dict) -> None:
    la = lambda v: "/".join(f"{x:.2f}" for x in v)  # noqa: E731
    print(f"\n== {r['model']}  ({r['file_mb']:.1f} MB file, {r['jax_param_mb']:.0f} MB float32 params)")
    print(f"   load average (1/5/15 min): start {la(r['loadavg_start'])}, end {la(r['loadavg_end'])}")
    print(f"   import jax+jaxllama {r['import_jax_s']:.2f} s"
          + (f", import torch+transformers {r['import_torch_s']:.2f} s" if "import_torch_s" in r else "")
          + " (not counted below)")
    print(f"   sequential read of the file (page cache): {r['read_file_s']:.3f} s")
    print(f"   header parse: jaxllama read_gguf {r['header_jaxllama_s'] * 1e3:.1f} ms, "
          f"gguf.GGUFReader {r['header_gguf_s'] * 1e3:.1f} ms")
    print(f"   jaxllama load_gguf + block_until_ready: first {r['jax_load_first_s']:.2f} s "
          f"(includes dequant-kernel compilation), second {r['jax_load_second_s']:.2f} s")
    if "hf_load_s" in r:
        print(f"   transformers from_pretrained(gguf_file=..., float32): {r['hf_load_s']:.2f} s")


def print_table(results: list[dict], info: dict) -> None:
    v = results[0]["versions"]
    print("\nMachine: {cpus} CPUs ({cpu}), {mem:.1f} GiB RAM, Python {py}".format(
        cpus=info["cpus"], cpu=info["cpu"], mem=info["mem_gib"] or 0, py=info["python"]))
    print("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    header = (f"{'model':<28} {'hdr ours ms':>11} {'hdr gguf ms':>11} {'jax 1st s':>9} "
              f"{'jax 2nd s':>9} {'hf s':>7} {'hf/jax1':>7} {'load avg':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        hf = r.get("hf_load_s")
        ratio = None if hf is None else hf / r["jax_load_first_s"]
        print(f"{r['model']:<28} {r['header_jaxllama_s'] * 1e3:>11.1f} {r['header_gguf_s'] * 1e3:>11.1f} "
              f"{r['jax_load_first_s']:>9.2f} {r['jax_load_second_s']:>9.2f} {_fmt(hf):>7} "
              f"{_fmt(ratio, '.1f'):>7} {r['loadavg_end'][0]:>8.2f}")
    for r in results:
        if r["model"].startswith("qwen"):
            ok = r["jax_load_first_s"] < QWEN_TARGET_S
            print(f"Qwen target: first load under {QWEN_TARGET_S:.0f} s: "
                  f"{'met' if ok else 'NOT met'} ({r['jax_load_first_s']:.2f} s)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", choices=MODELS,
                   help="packaged model to time (repeatable; default: both)")
    p.add_argument("--skip-transformers", action="store_true", help="do not time transformers' load")
    p.add_argument("--repeats", type=int, default=3,
                   help="repeats (median) for the header-parse timings; GGUFReader gets at most 2")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = args.model or list(MODELS)
    if args.child:  # one model, this process; the last stdout line is the JSON result
        print(json.dumps(measure(names[0], skip_transformers=args.skip_transformers,
                                 repeats=args.repeats)))
        return
    info = machine_info()
    results = []
    for name in names:
        print(f"timing {name} in a fresh process ...", file=sys.stderr, flush=True)
        results.append(run_child(name, args))
        print_model(results[-1])
    print_table(results, info)


if __name__ == "__main__":
    main()
