"""Paged decode attention: the XLA gather twin against dense attention, and (on a GPU)
the Pallas kernel; plus a Triton compile check that needs no GPU.

Decode, one token per slot, at the SmolLM2-135M head shape (N=9, K=3, H=64) and the
Qwen2.5-0.5B one (N=14, K=2, H=64); every slot's keys fill --context positions in
--page-size pages dealt onto a random permutation of the pool. Timed:

* dense: `decode_attention_reference` on the same keys in a (B, K, S, H) cache (what
  the adapter runs today on the CPU);
* paged-twin: `paged_attention_reference` (gather the slots' pages, then the same
  math): the cost of the page indirection on the XLA path;
* paged-pallas (GPU only, or with --interpret at --small sizes): the kernel.

Every output is compared with the dense one: max|out - dense| / max|dense|. The
candidates take turns (one timing run of --iters calls each per round, --repeats
rounds); the median and the fastest run are printed, GB/s from the median, counting
the K and V bytes below the lengths.

    python -m benchmarks.paged_attention                  # CPU: twin vs dense
    python -m benchmarks.paged_attention --small --interpret
    python -m benchmarks.paged_attention --triton-check   # no GPU needed

`--triton-check` lowers the kernel for "cuda" (Pallas builds Triton IR for sm_90),
compiles it with the `triton` package (pip install triton==3.6.0, the GPU image's)
and its `ptxas -v`, and prints shared memory, registers and spills, for bf16 and
float32, H = 64, 96, 128, a 16-token page (contiguous tiles) and a 12-token one
(gathered rows), T = 1 and a chunk of 8 queries. Like `benchmarks.attention`, it
reaches into a private jax module to capture the IR.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.pallas import paged_attention as pa
from jaxllama.pallas.decode_attention import decode_attention_reference

SHAPES = {"smollm2": (9, 3, 64), "qwen2.5-0.5b": (14, 2, 64)}


def time_calls(fns: dict, *, iters: int, repeats: int) -> dict:
    """Per name, (median, min) seconds per call of fn(*args) and its output. The
    candidates take turns, one timing run each per round, so that load from other
    processes on a shared machine falls on all of them alike."""
    outs = {name: jax.block_until_ready(fn(*a)) for name, (fn, a) in fns.items()}  # compile
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, a) in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                out = fn(*a)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: (statistics.median(t), min(t), outs[name]) for name, t in samples.items()}


def layout(rng, batch, kv_heads, head_dim, context, page_size, dtype):
    """Dense (B, K, S, H) keys/values and the same values in a permuted page pool."""
    width = -(-context // page_size)
    seq = width * page_size
    k = rng.standard_normal((batch, kv_heads, seq, head_dim), dtype=np.float32)
    v = rng.standard_normal((batch, kv_heads, seq, head_dim), dtype=np.float32)
    table = rng.permutation(batch * width).reshape(batch, width).astype(np.int32)
    pool_shape = (kv_heads, batch * width, page_size, head_dim)
    k_pool, v_pool = np.empty(pool_shape, np.float32), np.empty(pool_shape, np.float32)
    for b in range(batch):
        for p in range(width):
            k_pool[:, table[b, p]] = k[b, :, p * page_size : (p + 1) * page_size]
            v_pool[:, table[b, p]] = v[b, :, p * page_size : (p + 1) * page_size]
    as_dtype = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return as_dtype(k), as_dtype(v), as_dtype(k_pool), as_dtype(v_pool), jnp.asarray(table)


def bench(args) -> None:
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {device.platform}: {device.device_kind}; "
          f"python {sys.version.split()[0]}; interpret={args.interpret} small={args.small}")
    dtype = jnp.dtype(args.dtype)
    batch, context = (4, 40) if args.small else (args.batch, args.context)
    on_gpu = device.platform == "gpu"
    print(f"decode, B={batch} slots, {context} keys each, page {args.page_size}, {dtype.name}")
    print(f"{'shape':13} {'impl':13} {'ms':>9} {'min ms':>9} {'GB/s':>8} {'rel_err':>9}")
    rng = np.random.default_rng(0)
    for name in args.shapes:
        n, kh, hd = SHAPES[name]
        k, v, k_pool, v_pool, table = layout(rng, batch, kh, hd, context, args.page_size, dtype)
        q = jnp.asarray(rng.standard_normal((batch, n, hd), dtype=np.float32), dtype)
        lengths = jnp.full((batch,), context, jnp.int32)
        sm_scale = hd**-0.5
        kv_bytes = 2 * batch * kh * context * hd * dtype.itemsize
        fns = {"dense": (jax.jit(functools.partial(decode_attention_reference, sm_scale=sm_scale)),
                         (q, k, v, lengths)),
               "paged-twin": (jax.jit(functools.partial(pa.paged_attention_reference,
                                                        sm_scale=sm_scale)),
                              (q, k_pool, v_pool, table, lengths))}
        if on_gpu or args.interpret:
            fns["paged-pallas"] = (jax.jit(functools.partial(
                pa.paged_attention, sm_scale=sm_scale, interpret=args.interpret)),
                (q, k_pool, v_pool, table, lengths))
        results = time_calls(fns, iters=args.iters, repeats=args.repeats)
        ref = np.asarray(results["dense"][2], np.float64)
        for impl, (median, best, out) in results.items():
            err = np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max()
            print(f"{name:13} {impl:13} {median * 1e3:9.3f} {best * 1e3:9.3f} "
                  f"{kv_bytes / median / 1e9:8.2f} {err:9.2e}", flush=True)


def triton_check() -> int:
    """Compile the default configurations for sm_90a via Triton; 0 if all fit."""
    from benchmarks.triton_check import sm90_compiler, triton_version

    print(f"triton {triton_version()}, jax {jax.__version__}, target sm_90a")
    failures = 0
    b, n, kh, pages, width = 16, 14, 2, 64, 16
    with sm90_compiler() as compile_kernel:
        for dtype in (jnp.bfloat16, jnp.float32):
            for head_dim in (64, 96, 128):
                for page_size in (16, 12):
                    for seq_q in (1, 8):
                        pool = jax.ShapeDtypeStruct((kh, pages, page_size, head_dim), dtype)
                        q_shape = (b, n, head_dim) if seq_q == 1 else (b, seq_q, n, head_dim)
                        shapes = (jax.ShapeDtypeStruct(q_shape, dtype), pool, pool,
                                  jax.ShapeDtypeStruct((b, width), jnp.int32),
                                  jax.ShapeDtypeStruct((b,), jnp.int32))
                        report = compile_kernel(pa.paged_attention, shapes, pa.NUM_WARPS,
                                                pa.NUM_STAGES)
                        failures += not report.ok
                        print(f"{'ok  ' if report.ok else 'FAIL'} {jnp.dtype(dtype).name:8} "
                              f"H={head_dim:3} L={page_size:2} T={seq_q} {report.describe()}",
                              flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--interpret", action="store_true",
                        help="also run the Pallas kernel in the interpreter (CPU)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=32, help="decode slots")
    parser.add_argument("--context", type=int, default=512, help="keys per slot")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=20, help="calls per timing run")
    parser.add_argument("--repeats", type=int, default=9, help="timing runs (rounds)")
    parser.add_argument("--triton-check", action="store_true",
                        help="compile the kernel for sm_90a with Triton (no GPU needed)")
    args = parser.parse_args(argv)
    if args.triton_check:
        return triton_check()
    if args.small:
        args.iters, args.repeats = min(args.iters, 2), min(args.repeats, 2)
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
