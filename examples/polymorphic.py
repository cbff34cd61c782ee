"""One function, any family: calling code never asks which model it drives.

    python examples/polymorphic.py [--max-tokens N]
"""

import argparse

from jaxllama.models import LlamaInferenceAdapter


def summarize(adapter: LlamaInferenceAdapter, text: str, max_tokens: int) -> str:
    """Works the same for Qwen2.5, Phi-3 and Llama-family adapters."""
    messages = [{"role": "user", "content": f"Summarize in one sentence: {text}"}]
    return adapter.generate_text(messages, max_tokens)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args(argv)

    text = ("JAX is a Python library for accelerator-oriented array computation and program "
            "transformation, designed for high-performance numerical computing.")
    for name in ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"):
        adapter = LlamaInferenceAdapter.from_gguf(name, progress=False)
        print(f"{adapter.model_type().name:8s} {summarize(adapter, text, args.max_tokens)!r}")
        adapter.unload()


if __name__ == "__main__":
    main()
