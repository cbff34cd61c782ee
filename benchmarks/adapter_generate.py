"""`adapter.generate` decode and prefill speed at a few batch sizes, for comparing two
trees of the library side by side (run it once per tree, one after the other).

For each batch size, random prompts of --prompt-len tokens: the median of --repeats
`generate(rows, --new)` calls and of --repeats `generate(rows, 1)` calls after a
warm-up of each. Decode tok/s is (tokens generated - batch) / (t_new - t_1): the
prefill and the first token are in both and cancel. The model's EOS ends a row early,
as it does for a caller, and the token count says how many came.

    python -m benchmarks.adapter_generate                          # this tree, f32
    PYTHONPATH=/path/to/other/tree python -m benchmarks.adapter_generate --weights int8
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--weights", default="f32", help="f32 | bf16 | int8 | int4 | native")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import jaxllama
    from jaxllama.models import AdapterForwardConfig, LlamaInferenceAdapter

    adapter = LlamaInferenceAdapter.from_gguf(args.model, weights=args.weights)
    print(f"jaxllama from {jaxllama.__file__}; jax {jax.__version__} "
          f"({jax.default_backend()}); {args.model} {args.weights}", flush=True)
    rng = np.random.default_rng(0)
    vocab = adapter.vocab_size()
    for batch in args.batches:
        rows = [rng.integers(10, vocab, args.prompt_len).tolist() for _ in range(batch)]
        config = AdapterForwardConfig(batch_size=batch)
        out = adapter.generate(rows, args.new, config)  # warm-up (compiles)
        adapter.generate(rows, 1, config)
        t_new = _median_seconds(lambda: adapter.generate(rows, args.new, config), args.repeats)
        t_1 = _median_seconds(lambda: adapter.generate(rows, 1, config), args.repeats)
        tokens = sum(len(o) - args.prompt_len for o in out)
        print(f"batch {batch}: generate({args.new}) {t_new:.3f} s, generate(1) {t_1:.3f} s, "
              f"{tokens} tokens, decode {(tokens - batch) / (t_new - t_1):.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
