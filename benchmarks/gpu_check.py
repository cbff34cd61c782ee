"""One prepared GPU check: correctness first, then one compact table of figures.

    python -m benchmarks.gpu_check                       # on the GPU (one H200: < 8 min)
    python -m benchmarks.gpu_check --interpret --small   # CPU: tiny shapes, kernels interpreted (CI)

Sections, in this order (each guarded: a failure prints an error row and the rest still
runs; once `--time-budget` seconds have passed, the remaining sections print "skipped"):

1. kernels: each Pallas kernel against its plain-JAX twin on fresh random inputs
   (`quant_matmul` int8/int4 at 1, 8 and 32 rows; `decode_attention`; `flash_attention`),
   max |out - twin| / max |twin|.
2. model: the real SmolLM2 file (`--small`: a tiny random Llama) prefilled and decoded
   greedily with Pallas attention + matmuls against the plain-XLA path: max logit
   difference and whether the greedy tokens are equal.
3. quantized: the same file with int8 and int4 weights against dense float32 weights:
   top-1 agreement of teacher-forced logits.
4. copy bandwidth (`jaxllama.bench.copy_bandwidth`).
5. attention: prefill TFLOP/s and decode GB/s of ours beside cuDNN and XLA
   (`benchmarks.attention`, one head dim per section to stay short).
6. TTFT: one 512-token prompt, batch 1, Qwen2.5-0.5B shape, bf16, Pallas and XLA.
7. decode: tokens/s at batch 1 / 8 / 32 for the Qwen2.5-0.5B and Phi-3-mini shapes with
   random weights, bf16 / int8 / int4, the default (Pallas) path beside plain XLA (XLA
   attention and XLA matmuls); the on-device loop from an empty cache, step time =
   (t(N steps) - t(1 step)) / (N - 1); compile time = first call - steady call.
8. engine: its throughput, once `jaxllama.engine` exists (a row says so until then).

Targets from ../shared/GPU.md are printed beside the figures they concern.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Issue 20 / GPU.md targets (one H100/H200), shown beside the figures.
TARGETS = {
    ("qwen2.5-0.5b", "bf16", 1): 2000, ("qwen2.5-0.5b", "int8", 1): 3000,
    ("phi3-mini-4k", "bf16", 1): 330, ("phi3-mini-4k", "int8", 1): 550,
    ("phi3-mini-4k", "int4", 1): 900,
}
PREFILL_ATTENTION_TARGET = 520  # TFLOP/s
DECODE_ATTENTION_TARGET = 2000  # GB/s
DEFAULT_TIME_BUDGET_S = 450  # leaves room under 8 minutes for start-up and the table


@dataclasses.dataclass
class Row:
    section: str
    item: str
    figure: str = ""
    ref: str = ""  # what it is compared with / the target
    status: str = "ok"  # ok | FAIL | error | skipped


class Check:
    """Collects rows; runs sections under the time budget, each guarded."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.rows: list[Row] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  [{self.elapsed():6.1f} s] {row.section:9} {row.item:44} {row.figure:>22}  "
              f"{row.ref:28} {row.status}", flush=True)
        return row

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def section(self, name: str, fn: Callable[[], None]) -> None:
        if self.over_budget():
            self.add(Row(name, "(section)", status=f"skipped: --time-budget {self.budget_s:.0f} s spent"))
            return
        print(f"== {name}", flush=True)
        try:
            fn()
        except Exception as exc:  # one failing section must not end the run
            traceback.print_exc(limit=3)
            self.add(Row(name, "(section)", status=f"error: {type(exc).__name__}: "
                                                   f"{str(exc).splitlines()[0][:100] if str(exc) else ''}"))

    def guarded(self, section: str, item: str, fn: Callable[[], Row | None]) -> None:
        """One row's work; an exception becomes an error row."""
        if self.over_budget():
            self.add(Row(section, item, status="skipped: time budget"))
            return
        try:
            row = fn()
            if row is not None:
                self.add(row)
        except Exception as exc:
            self.add(Row(section, item, status=f"error: {type(exc).__name__}: "
                                               f"{str(exc).splitlines()[0][:100] if str(exc) else ''}"))


def rel_err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def _verdict(err: float, tol: float) -> str:
    return "ok" if err <= tol else "FAIL"


# --------------------------------------------------------------------------- 1. kernels
def check_kernels(c: Check, args) -> None:
    from jaxllama.pallas.decode_attention import decode_attention, decode_attention_reference
    from jaxllama.pallas.flash_attention import flash_attention, flash_attention_reference
    from jaxllama.pallas.quant_matmul import quant_matmul, quant_matmul_reference
    from jaxllama.quant import quantize

    rng = np.random.default_rng(0)
    out_dim, in_dim = (72, 200) if args.small else (4864, 896)
    for kind in ("int8", "int4"):
        w = quantize(jnp.asarray(rng.standard_normal((out_dim, in_dim)) * 0.05, jnp.float32), kind)
        for rows in (1, 8) if args.small else (1, 8, 32):
            def one(kind=kind, w=w, rows=rows):
                x = jnp.asarray(rng.standard_normal((rows, in_dim)), jnp.bfloat16)
                got = quant_matmul(x, w, interpret=args.interpret)
                err = rel_err(got, quant_matmul_reference(x, w))
                return Row("kernels", f"quant_matmul {kind} {rows}x{in_dim} @ {out_dim}",
                           f"rel err {err:.2e}", "twin, tol 1e-2", _verdict(err, 1e-2))
            c.guarded("kernels", f"quant_matmul {kind} rows {rows}", one)

    for head_dim in (64, 96, 128):
        def dec(head_dim=head_dim):
            b, s, n, kh = (2, 80, 4, 2) if args.small else (8, 1000, 14, 2)
            k1, k2, k3 = jax.random.split(jax.random.key(head_dim), 3)
            q = jax.random.normal(k1, (b, n, head_dim), jnp.bfloat16)
            k = jax.random.normal(k2, (b, kh, s, head_dim), jnp.bfloat16)
            v = jax.random.normal(k3, (b, kh, s, head_dim), jnp.bfloat16)
            lens = jnp.asarray([s, s // 3 + 1][:b] + [s] * (b - 2), jnp.int32)
            scale = head_dim ** -0.5
            got = decode_attention(q, k, v, lens, sm_scale=scale, interpret=args.interpret)
            err = rel_err(got, decode_attention_reference(q, k, v, lens, sm_scale=scale))
            return Row("kernels", f"decode_attention H={head_dim} S={s} (ragged)",
                       f"rel err {err:.2e}", "twin, tol 2e-2", _verdict(err, 2e-2))
        c.guarded("kernels", f"decode_attention H={head_dim}", dec)

        def pre(head_dim=head_dim):
            b, t, s, n, kh = (1, 40, 160, 4, 2) if args.small else (2, 500, 700, 14, 2)
            k1, k2, k3 = jax.random.split(jax.random.key(1000 + head_dim), 3)
            q = jax.random.normal(k1, (b, t, n, head_dim), jnp.bfloat16)
            k = jax.random.normal(k2, (b, kh, s, head_dim), jnp.bfloat16)
            v = jax.random.normal(k3, (b, kh, s, head_dim), jnp.bfloat16)
            offset = jnp.full((b,), s - t, jnp.int32)
            lens = jnp.full((b,), s, jnp.int32)
            scale = head_dim ** -0.5
            got = flash_attention(q, k, v, offset, lens, sm_scale=scale, interpret=args.interpret)
            err = rel_err(got, flash_attention_reference(q, k, v, offset, lens, sm_scale=scale))
            return Row("kernels", f"flash_attention H={head_dim} T={t} S={s}",
                       f"rel err {err:.2e}", "twin, tol 2e-2", _verdict(err, 2e-2))
        c.guarded("kernels", f"flash_attention H={head_dim}", pre)


# --------------------------------------------------------------- 2./3. the real model
def _tiny_model(dtype):
    from jaxllama.models.llama import Llama3Config
    from jaxllama.models.random_weights import random_model

    cfg = dataclasses.replace(Llama3Config.smollm2_135m(), num_layers=2, hidden_dim=128,
                              ffn_dim=256, num_heads=4, num_kv_heads=2, head_dim=32,
                              vocab_size=512)
    return random_model(cfg, dtype, 0)


def _model_adapter(args, weights: str, impl: str | None):
    """An adapter of the check's model; impl "xla" means XLA for both attention and the
    quantized matmuls (the plain-XLA reference)."""
    from jaxllama.models import LlamaInferenceAdapter
    from jaxllama.models.weights import quantize_params

    matmul = "xla" if impl == "xla" else None
    if args.small:
        model = _tiny_model(jnp.float32 if weights in ("f32", "int8", "int4") else jnp.bfloat16)
        if weights in ("int8", "int4"):
            model = dataclasses.replace(model, params=quantize_params(model.params, weights),
                                        weights=weights)
        return LlamaInferenceAdapter.from_model(model, attention_impl=impl, matmul_impl=matmul)
    return LlamaInferenceAdapter.from_gguf(args.model, weights=weights, progress=False,
                                           attention_impl=impl, matmul_impl=matmul)


def _prompt(adapter, n: int) -> list[int]:
    rng = np.random.default_rng(7)
    return rng.integers(3, adapter.vocab_size(), n).tolist()


def check_model(c: Check, args) -> None:
    pallas = "pallas_interpret" if args.interpret else "pallas"
    n_prompt, n_new = (12, 6) if args.small else (64, 32)
    for weights in ("bf16", "native") if not args.small else ("bf16", "int8"):
        def one(weights=weights):
            fast = _model_adapter(args, weights, pallas)
            ids = _prompt(fast, n_prompt)
            slow = _model_adapter(args, weights, "xla")
            lp_x = slow.score([ids])[0]
            toks_x = slow.generate(ids, n_new)[n_prompt:]
            lp_p = fast.score([ids])[0]
            toks_p = fast.generate(ids, n_new)[n_prompt:]
            diff = float(np.max(np.abs(lp_p - lp_x)))
            same = toks_p == toks_x
            return Row("model", f"{'tiny' if args.small else 'SmolLM2'} {weights}: pallas vs xla",
                       f"dlogp {diff:.3f}, tokens {'equal' if same else 'DIFFER'}",
                       f"{n_prompt} ids + {n_new} greedy", "ok" if same and diff < 0.5 else "FAIL")
        c.guarded("model", f"pallas vs xla {weights}", one)


def check_quantized(c: Check, args) -> None:
    # The dense model's own greedy continuation, teacher-forced through each storage:
    # over those positions "argmax == next token" is top-1 agreement with dense.
    n_prompt, n_new = (12, 12) if args.small else (64, 64)
    impl = "pallas_interpret" if args.interpret else None
    dense = _model_adapter(args, "f32", impl)
    ids = dense.generate(_prompt(dense, n_prompt), n_new)
    ref = dense.score([ids])[0]
    # Real SmolLM2: int8 and int4 (embedding kept int8) agreed on >= 0.8 of greedy steps
    # on the CPU; a tiny random model is far more sensitive (its logits are nearly flat).
    floor = 0.5 if args.small else 0.75
    for weights in ("int8", "int4"):
        def one(weights=weights):
            q = _model_adapter(args, weights, impl)
            lp, hits = q._score([ids], 1)
            agree = float(np.mean(hits[0][n_prompt - 1:]))
            diff = float(np.mean(np.abs(lp[0] - ref)))
            return Row("quantized", f"{weights} vs f32 ({len(ids)} ids, teacher-forced)",
                       f"top-1 agreement {agree:.2f}", f"mean |dlogp| {diff:.3f}",
                       "ok" if agree >= floor else "FAIL")
        c.guarded("quantized", weights, one)


# ------------------------------------------------------------------ 4./5. bandwidth, attention
def check_bandwidth(c: Check, args) -> float:
    from jaxllama.bench import copy_bandwidth

    bw, nbytes = copy_bandwidth(nbytes=(8 << 20) if args.small else None)
    c.add(Row("bandwidth", f"copy x + 1 over {nbytes / 2**20:.0f} MiB", f"{bw / 1e9:,.1f} GB/s",
              "H100 measured 3,010 GB/s"))
    return bw


def check_attention(c: Check, args) -> None:
    from benchmarks import attention

    a = argparse.Namespace(small=args.small, interpret=args.interpret,
                           iters=2 if args.small else 10, repeats=2 if args.small else 3)
    for head_dim in (64,) if args.small else (64, 128):
        def pre(head_dim=head_dim):
            for r in attention.bench_prefill(head_dim, a):
                c.add(Row("attention", f"prefill H={head_dim} {r.impl}",
                          "-" if r.rate is None else f"{r.rate:,.1f} TFLOP/s",
                          f"target {PREFILL_ATTENTION_TARGET}" if r.impl == "pallas" else "",
                          "ok" if r.rate is not None else (r.note or "error")[:60]))
        c.guarded("attention", f"prefill H={head_dim}", pre)

        def dec(head_dim=head_dim):
            for r in attention.bench_decode(head_dim, a):
                c.add(Row("attention", f"decode H={head_dim} {r.impl}",
                          "-" if r.rate is None else f"{r.rate:,.1f} GB/s",
                          f"target {DECODE_ATTENTION_TARGET}" if r.impl == "pallas" else "",
                          "ok" if r.rate is not None else (r.note or "error")[:60]))
        c.guarded("attention", f"decode H={head_dim}", dec)


# ------------------------------------------------------------ 6./7. TTFT and decode
def _shape_config(name: str, small: bool):
    from jaxllama.bench import preset_config

    cfg = preset_config(name)
    if small:
        heads = 4
        cfg = dataclasses.replace(cfg, num_layers=2, hidden_dim=heads * 32, num_heads=heads,
                                  num_kv_heads=2 if cfg.num_kv_heads < cfg.num_heads else heads,
                                  head_dim=32, ffn_dim=192, vocab_size=512, context_length=1024)
    return cfg


def _random_models(name: str, small: bool, storages):
    from jaxllama.models.random_weights import random_model
    from jaxllama.models.weights import quantize_params

    cfg = _shape_config(name, small)
    dense = random_model(cfg, jnp.bfloat16, 0)
    out = {}
    for s in storages:
        if s == "bf16":
            out[s] = dense
        else:
            out[s] = dataclasses.replace(dense, params=quantize_params(dense.params, s), weights=s)
    return out


def _policy(attention_impl: str, plain: bool):
    """The model functions' static `attention_impl`: the attention name, or for the
    "plain XLA" rows a policy whose quantized matmuls are XLA's (dequantize, then dot)."""
    from jaxllama import backend

    return backend.choose(attention_impl, "xla") if plain else attention_impl


def decode_rate(model, batch: int, n_steps: int, attention_impl: str, plain: bool,
                repeats: int) -> tuple[float, float]:
    """(seconds per decode step, compile seconds) of an on-device loop of the model's
    dense decode step (greedy) from an empty cache, batch rows, one token per row per
    step: the kernels' decode speed, apart from any engine."""
    from jaxllama.models.adapter import MODEL_FUNCTIONS
    from jaxllama.models.transformer import KVCache

    cfg, params = model.config, model.params
    slots = max(256, 1 << n_steps.bit_length())
    first = jnp.asarray(np.random.default_rng(batch).integers(0, cfg.vocab_size, batch), jnp.int32)
    fn = MODEL_FUNCTIONS[model.model_type].forward
    impl = _policy(attention_impl, plain)

    @functools.partial(jax.jit, donate_argnames=("cache",))
    def loop(params, token, cache, steps):
        def body(_, carry):
            token, cache = carry
            logits, cache = fn(params, token[:, None], cache, jnp.ones_like(token), config=cfg,
                               attention_impl=impl)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, steps, body, (token, cache))

    def run(steps):
        cache = KVCache.for_params(params, cfg, batch, slots)
        return jax.block_until_ready(loop(params, first, cache, jnp.int32(steps)))

    def timed(steps):
        start = time.perf_counter()
        run(steps)
        return time.perf_counter() - start

    t_first = timed(n_steps)
    t_n = statistics.median(timed(n_steps) for _ in range(repeats))
    t_1 = statistics.median(timed(1) for _ in range(repeats))
    return (t_n - t_1) / (n_steps - 1), max(0.0, t_first - t_n)


def check_ttft(c: Check, args) -> None:
    from jaxllama.models import LlamaInferenceAdapter

    models = _random_models("qwen2.5-0.5b", args.small, ("bf16",))
    prompt_len = 64 if args.small else 512
    pallas = "pallas_interpret" if args.interpret else "pallas"
    for impl in (pallas, "xla"):
        def one(impl=impl):
            adapter = LlamaInferenceAdapter.from_model(models["bf16"], attention_impl=impl)
            ids = np.random.default_rng(1).integers(0, adapter.vocab_size(), prompt_len).tolist()
            start = time.perf_counter()
            adapter.prefill(ids)
            first = time.perf_counter() - start
            samples = []
            for _ in range(2 if args.small else 5):
                start = time.perf_counter()
                adapter.prefill(ids)  # returns host ids: synchronised
                samples.append(time.perf_counter() - start)
            ttft = statistics.median(samples)
            return Row("ttft", f"qwen2.5-0.5b bf16 {prompt_len}-token prompt, {impl}",
                       f"{ttft * 1e3:,.2f} ms", f"compile {first - ttft:.1f} s")
        c.guarded("ttft", impl, one)


def check_decode(c: Check, args) -> None:
    pallas = "pallas_interpret" if args.interpret else "pallas"
    n_steps = 8 if args.small else 64
    repeats = 1 if args.small else 3
    batches = (1, 8, 32) if not args.small else (1,)
    for name in ("qwen2.5-0.5b", "phi3-mini-4k"):
        if c.over_budget():
            c.add(Row("decode", name, status="skipped: time budget"))
            continue
        models = _random_models(name, args.small, ("bf16", "int8", "int4"))
        try:
            for batch in batches:
                for storage, model in models.items():
                    for label, attention, plain in ((pallas, pallas, False), ("xla", "xla", True)):
                        def one(model=model, batch=batch, attention=attention, plain=plain,
                                label=label, storage=storage):
                            step, compile_s = decode_rate(model, batch, n_steps, attention, plain, repeats)
                            target = TARGETS.get((name, storage, batch)) if label != "xla" else None
                            tps = batch / step if step > 0 else float("nan")
                            return Row("decode", f"{name} {storage} b{batch} {label}",
                                       f"{tps:,.0f} tok/s", f"compile {compile_s:.1f} s"
                                       + (f"; target {target}" if target else ""),
                                       "ok" if step > 0 else "noise")
                        c.guarded("decode", f"{name} {storage} b{batch} {label}", one)
        finally:
            for model in models.values():
                for leaf in jax.tree_util.tree_leaves(model.params):
                    if not leaf.is_deleted():
                        leaf.delete()


def check_engine(c: Check, args) -> None:
    try:
        import jaxllama.engine  # noqa: F401
    except ImportError:
        c.add(Row("engine", "jaxllama.engine", "-", "", "absent: not measured yet"))
        return
    c.add(Row("engine", "jaxllama.engine", "-", "", "present, not measured: add its section here"))


# --------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes and models (CPU smoke run)")
    p.add_argument("--interpret", action="store_true", help="Pallas kernels in the interpreter (CPU)")
    p.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET_S,
                   help=f"seconds after which remaining sections are skipped (default {DEFAULT_TIME_BUDGET_S})")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="GGUF path or packaged name for the model sections (not with --small)")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["kernels", "model", "quantized", "bandwidth", "attention", "ttft",
                            "decode", "engine"])
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.interpret:
        p.error("no GPU backend: pass --interpret (and --small) to run on the CPU")

    dev = jax.devices()[0]
    print(f"gpu_check: {dev.platform} {getattr(dev, 'device_kind', '')}, jax {jax.__version__}, "
          f"python {sys.version.split()[0]}; small={args.small} interpret={args.interpret} "
          f"time budget {args.time_budget:.0f} s", flush=True)
    c = Check(args.time_budget)
    sections = [
        ("kernels", lambda: check_kernels(c, args)),
        ("model", lambda: check_model(c, args)),
        ("quantized", lambda: check_quantized(c, args)),
        ("bandwidth", lambda: check_bandwidth(c, args)),
        ("attention", lambda: check_attention(c, args)),
        ("ttft", lambda: check_ttft(c, args)),
        ("decode", lambda: check_decode(c, args)),
        ("engine", lambda: check_engine(c, args)),
    ]
    for name, fn in sections:
        if name not in args.skip:
            c.section(name, fn)

    print(f"\nSummary ({dev.platform} {getattr(dev, 'device_kind', '')}, jax {jax.__version__}; "
          f"{c.elapsed():.0f} s)")
    print("| section | item | figure | beside | status |")
    print("| --- | --- | --- | --- | --- |")
    for r in c.rows:
        print(f"| {r.section} | {r.item} | {r.figure} | {r.ref} | {r.status} |")
    failed = [r for r in c.rows if r.status == "FAIL"]
    errors = [r for r in c.rows if r.status.startswith("error")]
    print(f"{len(c.rows)} rows: {len(failed)} FAIL, {len(errors)} error, "
          f"{sum(r.status.startswith('skipped') for r in c.rows)} skipped")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
