"""Batch evaluation as a researcher writes it: load the params once, `jax.jit` one pure
scoring function over (params, tokens, lengths) with a batch axis, run it over a dataset.

No adapter in the loop: only the public modules (`jaxllama.hub` to find the file,
`jaxllama.models.load_gguf` for the config and the params pytree, `jaxllama.tokenizer`
for ids, `jaxllama.models.transformer.forward` for the model). Each multiple-choice item
is one batch: its choices are the rows, all padded to one width, so one compiled program
serves the whole dataset.

    python examples/pure_function_eval.py [--model NAME_OR_PATH] [--data DIR] [--limit N]
"""

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama import hub
from jaxllama.models import load_gguf
from jaxllama.models import transformer
from jaxllama.tokenizer import Tokenizer

DATA = Path(__file__).with_name("data")
WIDTH = 64  # every row is padded to this many tokens: one shape, one compilation


@functools.partial(jax.jit, static_argnames=("config",))
def continuation_logprob(params, tokens, lengths, cont_lengths, *, config):
    """tokens (B, T) int32 padded rows of context + continuation, lengths (B,) their real
    lengths, cont_lengths (B,) the continuation's share -> (B,) float32 sum of
    log p(continuation tokens | everything before them)."""
    b, t = tokens.shape
    cache = transformer.KVCache.create(config, b, t, params.dtype)
    logits, _ = transformer.forward(params, tokens, cache, lengths, config=config, all_logits=True)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # position i predicts tokens[:, i + 1]
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    i = jnp.arange(t - 1)[None, :]
    scored = (i >= (lengths - cont_lengths - 1)[:, None]) & (i < (lengths - 1)[:, None])
    return jnp.sum(jnp.where(scored, picked, 0.0), axis=-1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DATA, help="a folder of *.jsonl multiple-choice files")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items per file")
    args = parser.parse_args(argv)

    model = load_gguf(hub.resolve(args.model), dtype=jnp.float32)  # the params, loaded once
    tok = Tokenizer.from_metadata(model.metadata)
    for path in sorted(args.data.glob("*.jsonl")):
        items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][: args.limit]
        correct = 0
        for item in items:
            context = tok.encode(f"Question: {item['question']}\nAnswer:", add_special_tokens=True)
            conts = [tok.encode(" " + c, add_special_tokens=False) for c in item["choices"]]
            tokens = np.zeros((len(conts), WIDTH), np.int32)
            for row, cont in enumerate(conts):
                ids = (context + cont)[:WIDTH]
                tokens[row, : len(ids)] = ids
            lengths = np.array([min(len(context) + len(c), WIDTH) for c in conts], np.int32)
            scores = continuation_logprob(model.params, tokens, lengths,
                                          np.array([len(c) for c in conts], np.int32), config=model.config)
            correct += int(np.argmax(np.asarray(scores))) == item["answer"]
        print(f"{path.name}: accuracy {correct}/{len(items)} = {correct / max(1, len(items)):.2f}")


if __name__ == "__main__":
    main()
