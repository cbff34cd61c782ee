"""Tokens per second per model, in the design's style (steady state, after compiling).

    python examples/benchmark.py [--max-tokens N] [--models NAME ...]

For the full measurements (prefill, decode, transformers beside us) see benchmarks/.
"""

import argparse
import time

from jaxllama.models import LlamaInferenceAdapter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--models", nargs="+",
                        default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
    args = parser.parse_args(argv)

    prompt_text = "Write a short story about a robot learning to paint."
    for name in args.models:
        adapter = LlamaInferenceAdapter.from_gguf(name, progress=False)
        prompt = adapter.prompt_ids([{"role": "user", "content": prompt_text}])
        start = time.perf_counter()
        adapter.generate(prompt, args.max_tokens)  # compiles
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        out = adapter.generate(prompt, args.max_tokens)
        elapsed = time.perf_counter() - start
        n = len(out) - len(prompt)
        print(f"{adapter.model_type().name:8s} {name:30s} {n:4d} tokens in {elapsed:6.2f} s = "
              f"{n / elapsed:7.1f} tokens/s (first call {compile_s:.1f} s)")
        adapter.unload()


if __name__ == "__main__":
    main()
