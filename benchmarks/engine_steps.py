"""The engine's decode step against the adapter's static batch, on SmolLM2-135M (float32).

B requests with random prompts of --prompt tokens are prefilled into the engine's slots
(chunks of --chunk), then decoded --new tokens each with `jaxllama.engine.steps.decode`
(--steps per dispatch, greedy, no stop ids); beside it, `adapter.generate` of the same
B prompts as one static batch (its on-device loop). Both are timed after a warm-up run
that compiles them; the figures are output tokens per second of the decode phase (the
engine) and of the whole call (the adapter, prefill included, as a user sees it).

    python -m benchmarks.engine_steps --slots 8 --prompt 64 --new 64 --steps 8
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama import hub
from jaxllama.engine import steps
from jaxllama.engine.spec import EngineSpec, EngineState, SlotRequest
from jaxllama.models import LlamaInferenceAdapter


def run_engine(adapter, spec, prompts, new):
    params = adapter.model.params
    state = EngineState.create(spec, params.dtype)
    per_slot = math.ceil((len(prompts[0]) + new) / spec.page_size)
    for slot, prompt in enumerate(prompts):
        row = np.full((spec.max_pages_per_slot,), -1, np.int32)
        row[:per_slot] = np.arange(slot * per_slot, (slot + 1) * per_slot)
        state = steps.set_pages(state, np.int32(slot), row)
        for c0 in range(0, len(prompt), spec.chunk_size):
            chunk = prompt[c0: c0 + spec.chunk_size]
            tokens = np.zeros((spec.bucket(len(chunk)),), np.int32)
            tokens[: len(chunk)] = chunk
            state, logits = steps.prefill_chunk(params, state, np.int32(slot), tokens,
                                                np.int32(c0), np.int32(len(chunk)), spec)
        request = SlotRequest.create(spec, max_tokens=new)
        state, _, _ = steps.insert(state, np.int32(slot), logits, request, spec)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    count = 0
    for _ in range(math.ceil((new - 1) / spec.decode_steps)):
        state, tokens, valid, _ = steps.decode(params, state, spec)
        count += int(np.asarray(valid).sum())
    return count, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args()

    adapter = LlamaInferenceAdapter.from_gguf(hub.pull("smollm2-135m-instruct"),
                                              dtype=jnp.float32, progress=False)
    per_slot = math.ceil((args.prompt + args.new) / args.page_size)
    spec = EngineSpec(config=adapter.config, num_slots=args.slots, page_size=args.page_size,
                      num_pages=args.slots * per_slot, max_pages_per_slot=per_slot,
                      prefill_buckets=(args.chunk,), decode_steps=args.steps, max_stop_ids=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, adapter.vocab_size(), args.prompt).tolist()
               for _ in range(args.slots)]
    print(f"jax {jax.__version__} {jax.default_backend()}; SmolLM2-135M float32; "
          f"B={args.slots} prompt={args.prompt} new={args.new} N={args.steps} "
          f"page={args.page_size}")
    for label in ("warm-up", "timed"):
        count, dt = run_engine(adapter, spec, prompts, args.new)
        print(f"engine decode ({label}): {count} tokens in {dt:.2f} s = {count / dt:.1f} tok/s")
    # No EOS (min_p etc. off, greedy): the adapter stops at EOS, so count what it made.
    for label in ("warm-up", "timed"):
        t0 = time.perf_counter()
        out = adapter.generate(prompts, args.new)
        dt = time.perf_counter() - t0
        count = sum(len(o) - args.prompt for o in out)
        print(f"adapter.generate static batch ({label}, prefill included): {count} tokens in "
              f"{dt:.2f} s = {count / dt:.1f} tok/s")


if __name__ == "__main__":
    main()
