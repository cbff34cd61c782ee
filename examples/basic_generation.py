"""Basic generation: load a packaged model, ask a question, print the reply.

    python examples/basic_generation.py [--model NAME_OR_PATH] [--max-tokens N]
"""

import argparse

from jaxllama.models import AdapterForwardConfig, LlamaInferenceAdapter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    adapter = LlamaInferenceAdapter.from_gguf(args.model)
    conversation = [{"role": "user", "content": "What is the capital of France?"}]

    # Greedy: the same reply every time.
    print("greedy :", adapter.generate_text(conversation, args.max_tokens))

    # Sampled: temperature and nucleus filtering, repeatable through the seed.
    config = AdapterForwardConfig(temperature=0.7, top_p=0.9, seed=42)
    print("sampled:", adapter.generate_text(conversation, args.max_tokens, config))

    # Streaming: pieces of text as they are produced.
    print("stream :", end=" ", flush=True)
    for piece in adapter.stream_text("The three primary colours are", args.max_tokens):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
