"""Batch evaluation: score a small multiple-choice set with log-likelihoods and print accuracy.

Each choice is scored as log p(" " + choice | question prompt) with `adapter.score`, which
runs jitted over padded batches; the highest-scoring choice is the model's answer (the
way evaluation harnesses score multiple choice).

    python examples/batch_evaluation.py [--model NAME_OR_PATH] [--data FILE.jsonl]
"""

import argparse
import json
from pathlib import Path

import numpy as np

from jaxllama.models import LlamaInferenceAdapter

DATA = Path(__file__).with_name("data") / "multiple_choice.jsonl"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    args = parser.parse_args(argv)

    adapter = LlamaInferenceAdapter.from_gguf(args.model, progress=False)
    items = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    items = items[: args.limit]

    sequences, spans = [], []  # every (question, choice) pair, scored in one batched call
    for item in items:
        context = adapter.encode(f"Question: {item['question']}\nAnswer:")
        for choice in item["choices"]:
            continuation = adapter.encode(" " + choice, add_special_tokens=False)
            sequences.append(context + continuation)
            spans.append(len(continuation))
    logprobs = adapter.score(sequences)

    correct, k = 0, 0
    for item in items:
        totals = []
        for _ in item["choices"]:
            totals.append(float(np.sum(logprobs[k][-spans[k]:])))
            k += 1
        pick = int(np.argmax(totals))
        correct += pick == item["answer"]
        print(f"{item['question']:45s} -> {item['choices'][pick]:8s} "
              f"({'right' if pick == item['answer'] else 'wrong'})")
    print(f"accuracy {correct}/{len(items)} = {correct / len(items):.2f}")


if __name__ == "__main__":
    main()
