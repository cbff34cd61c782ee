"""The design's explicit loop: prefill once, then decode token by token with a state.

The adapter is immutable, so the KV cache lives in the DecodeState that prefill returns
and each decode call consumes and returns.

    python examples/prefill_decode_loop.py [--model NAME_OR_PATH] [--max-tokens N]
"""

import argparse

from jaxllama.models import AdapterForwardConfig, LlamaInferenceAdapter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    adapter = LlamaInferenceAdapter.from_gguf(args.model, progress=False)
    prompt = adapter.prompt_ids([{"role": "user", "content": "Name three prime numbers."}])
    config = AdapterForwardConfig(seq_len=len(prompt))

    ids, state = adapter.prefill(prompt, config)  # prompt + the first generated token
    eos = set(adapter.eos_ids())
    while len(ids) - len(prompt) < args.max_tokens and ids[-1] not in eos:
        # cache_len grows with each step; for_decode fills it in and checks it.
        token, state = adapter.decode(ids[-1], state, config.for_decode(state))
        ids.append(token)

    print(f"cache holds {state.cache_len} tokens")
    print(adapter.decode_text(ids[len(prompt):]))
    # The loop gives exactly what generate gives.
    assert ids == adapter.generate(prompt, args.max_tokens, config)


if __name__ == "__main__":
    main()
