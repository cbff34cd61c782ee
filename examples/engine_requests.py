"""Serve several requests at once with the engine: continuous batching over decode
slots, a paged KV cache and prefix caching, in process.

Four chat requests are submitted together; one streams its text as it comes, one is
cancelled, and each finished request says how many of its prompt tokens came from the
prefix cache (the chat template's system prompt is shared by all four).

    python examples/engine_requests.py [--model NAME_OR_PATH] [--max-tokens N]
"""

import argparse

from jaxllama.engine.scheduler import Engine
from jaxllama.models import LlamaInferenceAdapter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    adapter = LlamaInferenceAdapter.from_gguf(args.model, progress=False)
    questions = ["What is the capital of France?", "Name three primary colours.",
                 "What is 12 times 7?", "Write a very long story about a dragon."]
    prompts = [adapter.prompt_ids([{"role": "user", "content": q}]) for q in questions]

    # Small sizes keep the CPU compile short: 4 slots, requests of at most 256 tokens.
    with Engine.from_adapter(adapter, num_slots=4, max_context=256, prefill_chunk=64) as engine:
        engine.warmup()  # compiles every step once, so no request waits for it
        handles = [engine.submit(p, args.max_tokens) for p in prompts[:3]]
        story = engine.submit(prompts[3], 200, temperature=0.8, seed=1)

        # Stream the first reply as its tokens arrive (a sync iterator; `async for`
        # works too, and submit(callback=...) calls back on the engine's thread).
        decoder = adapter.tokenizer.stream_decoder(skip_special_tokens=True)
        print("streamed:", end=" ", flush=True)
        for token in handles[0]:
            print(decoder.push(token), end="", flush=True)
        print(decoder.flush())

        story.cancel()  # its slot and pages are free within one scheduler iteration
        for question, handle in zip(questions, handles + [story]):
            out = handle.result(timeout=600)
            print(f"{question!r}: {out.finish_reason}, {len(out.tokens)} tokens, "
                  f"{out.cached_tokens} prompt tokens from the prefix cache")
            print("   ", adapter.decode_text(out.tokens).strip()[:80])

        # Greedy engine output is adapter.generate's, token for token.
        alone = adapter.generate(prompts[1], args.max_tokens)[len(prompts[1]):]
        assert handles[1].result().tokens == alone
        print("engine == adapter.generate for a greedy request")
        print("metrics:", engine.metrics().as_dict())


if __name__ == "__main__":
    main()
