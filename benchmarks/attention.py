"""Attention speed and accuracy: our Pallas kernels against cuDNN and XLA.

Prefill (causal, q_offset 0, full cache): B=4, T=S=4096, N=K=16, bf16, H = 64, 96, 128;
ours (`flash_attention`), cuDNN and XLA (`jax.nn.dot_product_attention` with
implementation="cudnn" / "xla"), and our XLA twin. TFLOP/s counts 4*B*N*T*S*H/2
(the causal half of QK^T and PV).

Decode (one token per row, full cache): B=8, S=4096, N=14, K=2, bf16, H = 64, 96, 128;
ours (`decode_attention`) and our XLA twin. GB/s counts the K and V bytes read,
2*B*K*S*H*2.

Every output is compared with the float32 twin on the same (bf16) inputs, at
"highest" matmul precision: max|out - ref| / max|ref|.

Also timed, as in-run anchors: JAX's bundled Pallas-Triton `mha` and decode `gqa`
(GPU.md measured them at 340 TFLOP/s and 351 GB/s on an H100); their K/V are
(B, S, K, H), transposed before timing.

Timing: one call to compile, two to warm up, then `--repeats` runs of `--iters` calls
(5x as many for decode) each, blocked on the last; the median per-call time is
reported.

    python -m benchmarks.attention                      # on the GPU
    python -m benchmarks.attention --interpret --small  # CPU smoke run, tiny shapes
    python -m benchmarks.attention --triton-check       # no GPU needed, see below

`--triton-check` is what can be checked without a GPU: it lowers both kernels for
"cuda" on any machine (Pallas then builds Triton IR for sm_90), compiles that IR with
the `triton` package (pip install triton; the GPU image has 3.6) and its `ptxas -v`,
and prints shared memory, registers and spills per dtype and head dim. It reaches
into a private jax module to capture the IR, so it may need updating with jax.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama.pallas.decode_attention import decode_attention, decode_attention_reference
from jaxllama.pallas.flash_attention import flash_attention, flash_attention_reference

try:  # JAX's bundled Pallas-Triton kernels, for comparison only (deprecated in newer jax)
    from jax.experimental.pallas.ops.gpu import attention as _jax_mha
    from jax.experimental.pallas.ops.gpu import decode_attention as _jax_decode

    _jax_gpu_ops = (_jax_mha, _jax_decode)
except ImportError:  # pragma: no cover
    _jax_gpu_ops = None


@dataclasses.dataclass
class Row:
    kind: str  # "prefill" or "decode"
    head_dim: int
    impl: str
    seconds: float | None = None
    rate: float | None = None  # TFLOP/s (prefill) or GB/s (decode)
    rel_err: float | None = None
    note: str = ""


def time_call(fn: Callable, *args, iters: int, repeats: int) -> tuple[float, jax.Array]:
    """Median seconds per call of fn(*args), and its output."""
    out = jax.block_until_ready(fn(*args))  # compile
    for _ in range(2):
        out = jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples), out


def rel_err(out: jax.Array, ref: jax.Array) -> float:
    out = np.asarray(out.astype(jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    if np.isnan(out).any():
        return float("nan")
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _f32_reference(fn: Callable, batch: int, *args, sm_scale: float) -> jax.Array:
    """The float32 twin on f32 copies of the inputs, one batch row at a time (the
    prefill logits of a whole batch are 4 GiB in float32)."""
    ref = jax.jit(functools.partial(fn, sm_scale=sm_scale))
    rows = []
    with jax.default_matmul_precision("highest"):
        for b in range(batch):
            row = [a[b : b + 1].astype(jnp.float32 if a.dtype != jnp.int32 else a.dtype)
                   for a in args]
            rows.append(np.asarray(ref(*row)))
    return np.concatenate(rows)


def bench_prefill(head_dim: int, args) -> list[Row]:
    b, t, n, kh = (1, 64, 2, 2) if args.small else (4, 4096, 16, 16)
    s = t
    key = jax.random.split(jax.random.key(head_dim), 3)
    dtype = jnp.bfloat16
    q = jax.random.normal(key[0], (b, t, n, head_dim), dtype)
    k = jax.random.normal(key[1], (b, kh, s, head_dim), dtype)
    v = jax.random.normal(key[2], (b, kh, s, head_dim), dtype)
    q_offset = jnp.zeros((b,), jnp.int32)
    kv_lengths = jnp.full((b,), s, jnp.int32)
    sm_scale = head_dim**-0.5
    flops = 4 * b * n * t * s * head_dim / 2
    ref = _f32_reference(flash_attention_reference, b, q, k, v, q_offset, kv_lengths,
                         sm_scale=sm_scale)

    # jax.nn.dot_product_attention takes K/V as (B, S, K, H).
    k_bskh, v_bskh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

    def nn_attention(impl):
        return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=sm_scale, is_causal=True, implementation=impl))

    candidates = [
        ("pallas", jax.jit(functools.partial(
            flash_attention, sm_scale=sm_scale, interpret=args.interpret)),
         (q, k, v, q_offset, kv_lengths)),
        ("cudnn", nn_attention("cudnn"), (q, k_bskh, v_bskh)),
        ("xla", nn_attention("xla"), (q, k_bskh, v_bskh)),
        ("xla-twin", jax.jit(functools.partial(flash_attention_reference, sm_scale=sm_scale)),
         (q, k, v, q_offset, kv_lengths)),
    ]
    if _jax_gpu_ops is not None:  # an in-run anchor: JAX's own Triton kernel (N == K here)
        candidates.append(("jax-mha", jax.jit(lambda q, k, v: _jax_gpu_ops[0].mha(
            q, k, v, None, sm_scale=sm_scale, causal=True, interpret=args.interpret)),
            (q, k_bskh, v_bskh)))
    rows = []
    for name, fn, fn_args in candidates:
        row = Row("prefill", head_dim, name)
        if name == "cudnn" and jax.default_backend() != "gpu":
            row.note = "needs a GPU"
        else:
            try:
                row.seconds, out = time_call(fn, *fn_args, iters=args.iters,
                                             repeats=args.repeats)
                row.rate = flops / row.seconds / 1e12
                row.rel_err = rel_err(out, ref)
            except Exception as e:  # one failing implementation must not end the run
                row.note = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def bench_decode(head_dim: int, args) -> list[Row]:
    b, s, n, kh = (2, 64, 14, 2) if args.small else (8, 4096, 14, 2)
    key = jax.random.split(jax.random.key(100 + head_dim), 3)
    dtype = jnp.bfloat16
    q = jax.random.normal(key[0], (b, n, head_dim), dtype)
    k = jax.random.normal(key[1], (b, kh, s, head_dim), dtype)
    v = jax.random.normal(key[2], (b, kh, s, head_dim), dtype)
    kv_lengths = jnp.full((b,), s, jnp.int32)
    sm_scale = head_dim**-0.5
    nbytes = 2 * b * kh * s * head_dim * jnp.dtype(dtype).itemsize
    ref = _f32_reference(decode_attention_reference, b, q, k, v, kv_lengths,
                         sm_scale=sm_scale)
    plain = (q, k, v, kv_lengths)
    candidates = [
        ("pallas", jax.jit(functools.partial(
            decode_attention, sm_scale=sm_scale, interpret=args.interpret)), plain),
        ("xla-twin", jax.jit(functools.partial(decode_attention_reference, sm_scale=sm_scale)),
         plain),
    ]
    if _jax_gpu_ops is not None:  # an in-run anchor: JAX's own Triton decode kernel
        candidates.append(("jax-gqa", jax.jit(lambda q, k, v, lens: _jax_gpu_ops[1].gqa(
            q, k, v, kv_seq_len=lens, sm_scale=sm_scale, k_splits=min(16, s // 16),
            interpret=args.interpret)),
            (q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), kv_lengths)))
    rows = []
    for name, fn, fn_args in candidates:
        row = Row("decode", head_dim, name)
        try:
            row.seconds, out = time_call(fn, *fn_args, iters=args.iters * 5,
                                         repeats=args.repeats)
            row.rate = nbytes / row.seconds / 1e9
            row.rel_err = rel_err(out, ref)
        except Exception as e:
            row.note = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def _format(row: Row) -> str:
    unit = "TFLOP/s" if row.kind == "prefill" else "GB/s"
    time_ms = f"{row.seconds * 1e3:9.3f}" if row.seconds is not None else f"{'-':>9}"
    rate = f"{row.rate:9.4g}" if row.rate is not None else f"{'-':>9}"
    err = f"{row.rel_err:9.2e}" if row.rel_err is not None else f"{'-':>9}"
    return f"{row.kind:8} {row.head_dim:4} {row.impl:9} {time_ms} {rate} {unit:8} {err}  {row.note}"


def triton_check() -> int:
    """Compile the default configurations for sm_90a via Triton; 0 if all fit."""
    from benchmarks.triton_check import sm90_compiler, triton_version
    from jaxllama.pallas import decode_attention as dec
    from jaxllama.pallas import flash_attention as fa

    print(f"triton {triton_version()}, target sm_90a")
    failures = 0
    b, t, s, n, kh = 2, 100, 300, 14, 2
    with sm90_compiler() as compile_kernel:
        for dtype in (jnp.bfloat16, jnp.float32):
            for head_dim in (64, 96, 128):
                kv = jax.ShapeDtypeStruct((b, kh, s, head_dim), dtype)
                lens = jax.ShapeDtypeStruct((b,), jnp.int32)
                cases = [
                    ("flash", fa.flash_attention, fa.NUM_WARPS, fa.NUM_STAGES,
                     (jax.ShapeDtypeStruct((b, t, n, head_dim), dtype), kv, kv, lens, lens)),
                    ("decode", dec.decode_attention, dec.NUM_WARPS, dec.NUM_STAGES,
                     (jax.ShapeDtypeStruct((b, n, head_dim), dtype), kv, kv, lens)),
                ]
                for name, fn, warps, stages, shapes in cases:
                    report = compile_kernel(fn, shapes, warps, stages)
                    failures += not report.ok
                    status = "ok  " if report.ok else "FAIL"
                    print(f"{status} {name:6} {jnp.dtype(dtype).name:8} H={head_dim:3} "
                          f"{report.describe()}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--interpret", action="store_true",
                        help="run the Pallas kernels in the interpreter (CPU)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--iters", type=int, default=None, help="calls per timing run")
    parser.add_argument("--repeats", type=int, default=None, help="timing runs")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--triton-check", action="store_true",
                        help="compile the kernels for sm_90a with Triton (no GPU needed)")
    args = parser.parse_args(argv)
    if args.triton_check:
        return triton_check()
    if args.iters is None:
        args.iters = 2 if args.small else 20
    if args.repeats is None:
        args.repeats = 2 if args.small else 5

    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {device.platform}: {device.device_kind}; "
          f"python {sys.version.split()[0]}; interpret={args.interpret} small={args.small}")
    header = (f"{'kind':8} {'H':>4} {'impl':9} {'ms':>9} {'rate':>9} {'unit':8} "
              f"{'rel_err':>9}  note")
    print(header, flush=True)
    rows: list[Row] = []
    for head_dim in args.head_dims:
        if not args.skip_prefill:
            rows += bench_prefill(head_dim, args)
    for head_dim in args.head_dims:
        if not args.skip_decode:
            rows += bench_decode(head_dim, args)

    shapes = ("prefill B=1 T=S=64 N=K=2; decode B=2 S=64 N=14 K=2" if args.small else
              "prefill B=4 T=S=4096 N=K=16 causal; decode B=8 S=4096 N=14 K=2 full cache")
    print(f"\nSummary ({shapes}; bf16; rel_err = max|out-ref|/max|ref| vs the float32 twin)")
    print(header)
    for row in rows:
        print(_format(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
