"""A load generator for any OpenAI-compatible server (`jaxllama serve`, llama.cpp's
`llama-server`, vLLM): streaming /v1/completions requests, reported the way vLLM's
serving benchmark reports them (request throughput, output tokens/s, TTFT, TPOT and ITL
mean / median / p99 in ms).

    python -m benchmarks.serve --url http://127.0.0.1:8000 --num-requests 32 \\
        --concurrency 32 --prompt-len 128:512 --max-tokens 128
    python -m benchmarks.serve --spawn --serve-args "--model smollm2-135m-instruct --slots 32"

Prompts are random token ids (--prompts ids, the default: exact lengths; --vocab-size
bounds them) or random words (--prompts text, about one token a word). Every request
asks for exactly --max-tokens tokens (`ignore_eos`, vLLM's and llama.cpp's field; pass
--no-ignore-eos for servers that refuse it), greedy unless --temperature. Token counts
come from each stream's final `usage` (stream_options.include_usage), else from the
number of chunks that carried text.

Definitions (vLLM's benchmark_serving): TTFT = first chunk's arrival - request start;
TPOT = (latency - TTFT) / (output tokens - 1) per request; ITL = every gap between two
chunks of one stream; throughput = totals / the benchmark's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

from benchmarks.workload import token_range

WORDS = ("time person year way day thing man world life hand part child eye woman place "
         "work week case point government company number group problem fact").split()


@dataclasses.dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str = ""


def make_prompts(args, rng: random.Random) -> list:
    lo, hi = args.prompt_len
    prompts = []
    for _ in range(args.num_requests):
        n = rng.randint(lo, hi)
        if args.prompts == "ids":
            prompts.append([rng.randrange(args.min_token_id, args.vocab_size) for _ in range(n)])
        else:
            prompts.append(" ".join(rng.choice(WORDS) for _ in range(n)))
    return prompts


async def one(client: httpx.AsyncClient, args, prompt, seed: int) -> Result:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    times: list[float] = []
    usage = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    times.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return Result(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    out = usage["completion_tokens"] if usage else len(times)
    if not times:  # tokens that decode to no text (special tokens) still count
        if not out:
            return Result(False, error="nothing came back")
        times = [end]
    return Result(True, prompt_tokens=usage["prompt_tokens"] if usage else 0,
                  output_tokens=out, ttft=times[0] - start, latency=end - start,
                  itl=list(np.diff(times)))


async def run(args) -> dict:
    rng = random.Random(args.seed)
    prompts = make_prompts(args, rng)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=args.timeout) as client:
        if args.model is None:
            args.model = (await client.get("/v1/models")).json()["data"][0]["id"]
        if args.warmup:
            await one(client, args, prompts[0], 0)
        sem = asyncio.Semaphore(args.concurrency)

        async def limited(i, prompt):
            async with sem:
                return await one(client, args, prompt, i)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i, p) for i, p in enumerate(prompts)))
        duration = time.perf_counter() - start
    return summarize(results, duration, args)


def _ms(values) -> dict:
    if not len(values):
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    a = np.asarray(values) * 1000
    return {"mean": float(a.mean()), "median": float(np.median(a)),
            "p99": float(np.percentile(a, 99))}


def summarize(results: list[Result], duration: float, args) -> dict:
    ok = [r for r in results if r.ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "url": args.url, "model": args.model, "num_requests": args.num_requests,
        "concurrency": args.concurrency, "prompt_len": list(args.prompt_len),
        "max_tokens": args.max_tokens, "successful": len(ok),
        "errors": [r.error for r in results if not r.ok][:5],
        "duration_s": duration, "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens, "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _ms([r.ttft for r in ok]), "tpot_ms": _ms(tpot),
        "itl_ms": _ms([x for r in ok for x in r.itl]),
        "loadavg": os.getloadavg(),
    }


def report(s: dict) -> str:
    lines = [
        "============ Serving Benchmark Result ============",
        f"{'Server:':<40}{s['url']} ({s['model']})",
        f"{'Successful requests:':<40}{s['successful']} of {s['num_requests']}",
        f"{'Concurrency:':<40}{s['concurrency']}",
        f"{'Benchmark duration (s):':<40}{s['duration_s']:.2f}",
        f"{'Total input tokens:':<40}{s['total_input_tokens']}",
        f"{'Total generated tokens:':<40}{s['total_output_tokens']}",
        f"{'Request throughput (req/s):':<40}{s['request_throughput']:.2f}",
        f"{'Output token throughput (tok/s):':<40}{s['output_throughput']:.2f}",
        f"{'Total token throughput (tok/s):':<40}{s['total_token_throughput']:.2f}",
    ]
    for key, title in (("ttft_ms", "Time to First Token"),
                       ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency")):
        name = key.split("_")[0].upper()
        lines.append(f"{'-' * 15}{title}{'-' * 15}")
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            lines.append(f"{label + ' ' + name + ' (ms):':<40}{s[key][stat]:.2f}")
    lines.append(f"{'Load average (1, 5, 15 min):':<40}"
                 + ", ".join(f"{x:.2f}" for x in s["loadavg"]))
    if s["errors"]:
        lines.append("Errors (first 5): " + "; ".join(s["errors"]))
    lines.append("=" * 50)
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, name: str,
                 log_tail=lambda: "") -> None:
    """Poll `url`/health until 200; SystemExit if `proc` exits first or `timeout` s pass
    (the process is then terminated). `log_tail()` is appended to either message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode} before it was healthy"
                             f"{log_tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"{name} not healthy after {timeout} s{log_tail()}")


def spawn(args) -> subprocess.Popen:
    port = _free_port()
    args.url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "jaxllama", "serve", "--port", str(port),
           *shlex.split(args.serve_args)]
    print("spawning: " + shlex.join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd)
    wait_healthy(proc, args.url, args.spawn_timeout, "jaxllama serve")
    return proc


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="the server's base URL (http://HOST:PORT)")
    p.add_argument("--spawn", action="store_true", help="start `jaxllama serve` itself")
    p.add_argument("--serve-args", default="", help="arguments for the spawned server")
    p.add_argument("--spawn-timeout", type=float, default=600)
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prompt-len", type=token_range, default=(128, 512), help="LOW:HIGH tokens")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompts", choices=["ids", "text"], default="ids")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="random ids are drawn below this (default 32000)")
    p.add_argument("--min-token-id", type=int, default=100,
                   help="and at or above this (skips most special tokens)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the one request sent before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if not args.spawn and not args.url:
        p.error("give --url, or --spawn")
    if args.url:
        args.url = args.url.rstrip("/").removesuffix("/v1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    proc = spawn(args) if args.spawn else None
    try:
        summary = asyncio.run(run(args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(report(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if summary["successful"] == args.num_requests else 1


if __name__ == "__main__":
    sys.exit(main())
