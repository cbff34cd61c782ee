"""Time to first token of the README's first command, cold and warm compilation cache.

    python -m benchmarks.first_token [--runs 3] [--max-tokens 24] [--cache-dir DIR]

Runs `python -m jaxllama generate --chat --prompt "Write a Python function that reverses
a string."` as a user would (a fresh process each time, the model already in the
model cache), with JAXLLAMA_COMPILATION_CACHE pointing at a fresh directory (or
--cache-dir), and prints for each run the seconds from starting the process to the first
byte of the reply on stdout, to the end, and the command's own --stats line (load,
compile time, compilations, programs read from the cache). Run 1 fills the cache; the
later runs read it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a Python function that reverses a string."


def timed_run(cache: Path, max_tokens: int) -> tuple[float, float, str]:
    env = dict(os.environ, JAXLLAMA_COMPILATION_CACHE=str(cache))
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxllama", "generate", "--chat", "--prompt", PROMPT,
         "--max-tokens", str(max_tokens), "--stats"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = proc.stdout.read(1)
    first_s = time.perf_counter() - start
    _, err = proc.communicate(timeout=900)
    total_s = time.perf_counter() - start
    if proc.returncode != 0 or not first:
        raise SystemExit(f"run failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    stats = next((line for line in err.decode().splitlines() if "tokens/s" in line), "")
    return first_s, total_s, stats.removeprefix("jaxllama: ")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="compilation cache directory (default: a fresh temporary one)")
    args = p.parse_args(argv)
    import jax

    print(f"python {sys.version.split()[0]}, jax {jax.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="jaxllama-xla-") as tmp:
        cache = args.cache_dir or Path(tmp)
        print(f"compilation cache: {cache}")
        for i in range(args.runs):
            first_s, total_s, stats = timed_run(cache, args.max_tokens)
            kind = "cold" if i == 0 and args.cache_dir is None else "warm"
            print(f"run {i + 1} ({kind}): first token {first_s:.2f} s after start, done "
                  f"{total_s:.2f} s | {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
