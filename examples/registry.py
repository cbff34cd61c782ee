"""Several models loaded at once in a ModelRegistry, switched between by name, and unloaded.

    python examples/registry.py [--max-tokens N]
"""

import argparse

from jaxllama.models import LlamaInferenceAdapter, ModelRegistry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    registry = ModelRegistry()
    registry.register("small", LlamaInferenceAdapter.from_gguf("smollm2-135m-instruct", progress=False))
    registry.register("coder", LlamaInferenceAdapter.from_gguf("qwen2.5-coder-0.5b-instruct", progress=False))
    print("loaded:", registry.list_models())

    question = [{"role": "user", "content": "Write a one-line Python hello world."}]
    for name in registry.list_models():
        adapter = registry.get(name)
        print(f"[{name} / {adapter.model_type().name}]", adapter.generate_text(question, args.max_tokens))

    print("unknown name gives", registry.get("missing"))
    registry.unload("coder")  # frees its device memory; "small" keeps working
    print("after unload:", registry.list_models())
    print("[small]", registry.get("small").generate_text(question, args.max_tokens))


if __name__ == "__main__":
    main()
