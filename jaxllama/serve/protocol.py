"""The OpenAI request fields `jaxllama serve` takes, checked into plain values, and the
error JSON it answers with.

Every check raises `ServeRequestError` naming the field (`param`) and what was expected;
the app turns it into OpenAI's error body

    {"error": {"message": ..., "type": "invalid_request_error", "param": FIELD, "code": ...}}

with its status (400 unless said). Fields this module does not know are ignored, as
OpenAI ignores them. Fields OpenAI defines that the engine cannot honour
(`presence_penalty`, `frequency_penalty`, `logit_bias`, `best_of`, `suffix`, `tools`, a
`response_format` other than text) are refused when set to anything but their neutral
value, rather than silently dropped. Beyond OpenAI's fields: `top_k`, `min_p`,
`repetition_penalty` and `ignore_eos` (vLLM's and llama.cpp's names).

Nothing here imports FastAPI or JAX.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxllama.errors import ServeRequestError

SEED_LIMIT = 2**32  # the engine's seeds are uint32
MAX_STOPS = 4  # as OpenAI
CHAT_MAX_TOP_LOGPROBS = 20  # OpenAI's bounds of top_logprobs (chat) and logprobs (completions)
COMPLETION_MAX_LOGPROBS = 5
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MESSAGE_ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a request is checked against (one served model)."""

    model_name: str
    max_context: int  # prompt + output tokens of one request (the engine's)
    vocab_size: int
    max_top_logprobs: int  # the engine's top_logprobs (0: no logprobs at all)
    max_n: int = 16  # choices per prompt
    max_choices: int = 64  # prompts x n in one request


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    seed: int | None  # None: a fresh random seed per choice


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A checked /v1/completions or /v1/chat/completions request.

    prompts: completions: each a str or a list of token ids (checked in range);
      chat: one entry, the message list (roles and text checked, `developer` written as
      `system`). max_tokens None: up to the context's end (chat's default).
    logprobs: completions: the `logprobs` count (0 = the sampled token's only) or None;
      chat: `top_logprobs` (0 when absent) if `logprobs` is true, else None.
    """

    chat: bool
    prompts: list
    max_tokens: int | None
    n: int
    sampling: Sampling
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever comes
    max_tokens_field: str = "max_tokens"  # the name the request used (for errors)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(param: str, message: str, code: str | None = None) -> ServeRequestError:
    return ServeRequestError(f"{param}: {message}", param=param, code=code)


def _present(body: dict, name: str) -> bool:
    return body.get(name) is not None


def _integer(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"{value!r:.60} is not an integer")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        expected = (f"an integer >= {lo}" if hi is None else f"an integer <= {hi}"
                    if lo is None else f"an integer in [{lo}, {hi}]")
        raise _bad(name, f"{value} is out of range; expected {expected}")
    return value


def _number(body: dict, name: str, default: float, *, lo: float, hi: float,
            lo_open: bool = False, hi_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, f"{value!r:.60} is not a number")
    value = float(value)
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (
        value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise _bad(name, f"{value!r} is out of range; expected a finite number in {interval}")
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"{value!r:.60} is not a boolean")
    return value


def check_model(body: dict, limits: Limits) -> None:
    """`model` absent (the served one) or the served model's name; anything else 404."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise _bad("model", f"{model!r:.60} is not a string")
    if model != limits.model_name:
        raise ServeRequestError(
            f"The model `{model}` does not exist; this server serves `{limits.model_name}`",
            param="model", status=404, code="model_not_found")


def _unsupported(body: dict, chat: bool) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and value != 0:
            _number(body, name, 0.0, lo=-2.0, hi=2.0)  # a wrong type says so first
            raise _bad(name, "is not supported (only 0); use repetition_penalty")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "is not supported")
    if not chat:
        if body.get("suffix"):
            raise _bad("suffix", "is not supported")
        best_of = body.get("best_of")
        if best_of is not None and best_of != body.get("n", 1):
            raise _bad("best_of", "is not supported (only equal to n)")
    else:
        if body.get("tools"):
            raise _bad("tools", "tool calling is not supported")
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise _bad("response_format", "only {\"type\": \"text\"} is supported")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", f"{stop!r:.60} is not a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise _bad("stop", f"{len(stops)} stop strings; at most {MAX_STOPS}")
    if any(s == "" for s in stops):
        raise _bad("stop", "an empty stop string would stop before the first token")
    return list(stops)


def _ids(value: list, vocab: int, param: str) -> list[int]:
    if not value:
        raise _bad(param, "an empty list of token ids")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int):
            raise _bad(param, f"{t!r:.40} is not a token id (an integer)")
        if not 0 <= t < vocab:
            raise _bad(param, f"token id {t} is outside the vocabulary [0, {vocab})")
    return list(value)


def _prompts(body: dict, limits: Limits) -> list:
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt", "is required")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise _bad("prompt", f"{prompt!r:.60} is not a string, a list of token ids, or a "
                             "non-empty list of either")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [_ids(prompt, limits.vocab_size, "prompt")]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, list):
            out.append(_ids(p, limits.vocab_size, "prompt"))
        else:
            raise _bad("prompt", f"an entry {p!r:.40} is neither a string nor a list of token "
                                 "ids")
    return out


def _content(content: Any, i: int) -> str:
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad(param, "only text parts ({\"type\": \"text\", \"text\": ...}) are "
                                  "supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(param, f"{content!r:.60} is not a string or a list of text parts")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "is required")
    if not isinstance(messages, list):
        raise _bad("messages", f"{messages!r:.60} is not a list of messages")
    if not messages:
        raise _bad("messages", "is empty; expected at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"{m!r:.60} is not an object")
        role = m.get("role")
        if role not in MESSAGE_ROLES:
            raise _bad(f"messages[{i}].role", f"{role!r:.40} is not one of "
                                              + ", ".join(MESSAGE_ROLES))
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        # OpenAI's newer name of the system role; chat templates know "system".
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(content, i)})
    return out


def parse_generation(body: Any, limits: Limits, *, chat: bool) -> GenerationRequest:
    """Check a /v1/chat/completions (`chat`) or /v1/completions body; see the module doc."""
    if not isinstance(body, dict):
        raise ServeRequestError("the request body must be a JSON object", param=None)
    check_model(body, limits)
    _unsupported(body, chat)
    prompts = [_messages(body)] if chat else _prompts(body, limits)
    echo = False if chat else _boolean(body, "echo", False)
    name = "max_tokens"
    if chat:
        if _present(body, "max_completion_tokens"):
            name = "max_completion_tokens"
        max_tokens = _integer(body, name, None, lo=1)
    else:
        lo = 0 if echo else 1  # max_tokens 0 with echo: score the prompt, generate nothing
        max_tokens = _integer(body, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS, lo=lo)
    n = _integer(body, "n", 1, lo=1, hi=limits.max_n)
    if n * len(prompts) > limits.max_choices:
        raise _bad("n", f"{len(prompts)} prompts x n {n} = {n * len(prompts)} choices; at "
                        f"most {limits.max_choices} in one request")
    sampling = Sampling(
        temperature=_number(body, "temperature", 1.0, lo=0.0, hi=2.0),
        top_p=_number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
        top_k=max(0, _integer(body, "top_k", 0, lo=-1)),  # -1 (vLLM) and 0: off
        min_p=_number(body, "min_p", 0.0, lo=0.0, hi=1.0, hi_open=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, lo=0.0, hi=math.inf,
                                   lo_open=True, hi_open=True),
        seed=_integer(body, "seed", None, lo=0, hi=SEED_LIMIT - 1),
    )
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", "is only allowed when stream is true")
        if not isinstance(options, dict):
            raise _bad("stream_options", f"{options!r:.60} is not an object")
        include_usage = _boolean(options, "include_usage", False)
    if chat:
        want = _boolean(body, "logprobs", False)
        top = _integer(body, "top_logprobs", None, lo=0, hi=CHAT_MAX_TOP_LOGPROBS)
        if top is not None and not want:
            raise _bad("top_logprobs", "needs logprobs: true")
        logprobs = (top or 0) if want else None
        field = "top_logprobs"
    else:
        logprobs = _integer(body, "logprobs", None, lo=0, hi=COMPLETION_MAX_LOGPROBS)
        field = "logprobs"
    if logprobs is not None and max(logprobs, 1) > limits.max_top_logprobs:
        raise _bad(field, f"{logprobs} is more than this server returns "
                          f"(--max-top-logprobs {limits.max_top_logprobs})")
    return GenerationRequest(chat=chat, prompts=prompts, max_tokens=max_tokens, n=n,
                             sampling=sampling, stop=_stop(body), stream=stream,
                             include_usage=include_usage, logprobs=logprobs, echo=echo,
                             ignore_eos=_boolean(body, "ignore_eos", False),
                             max_tokens_field=name)


def check_room(prompt_len: int, max_tokens: int | None, limits: Limits, *, chat: bool,
               field: str = "max_tokens") -> int:
    """The max_tokens to ask the engine for (None: the rest of the context), or a 400
    naming the prompt (too long alone) or max_tokens (too many for what is left)."""
    ctx = limits.max_context
    what = "messages" if chat else "prompt"
    if prompt_len >= ctx:
        raise ServeRequestError(
            f"{what}: {prompt_len} tokens leave no room to generate in this server's context "
            f"of {ctx} tokens (prompt + output)", param=what, code="context_length_exceeded")
    if max_tokens is None:
        return ctx - prompt_len
    if prompt_len + max_tokens > ctx:
        name = field
        raise ServeRequestError(
            f"{name}: prompt ({prompt_len} tokens) + {name} ({max_tokens}) = "
            f"{prompt_len + max_tokens} exceeds this server's context of {ctx} tokens; "
            f"expected at most {ctx - prompt_len}", param=name, code="context_length_exceeded")
    return max_tokens


def parse_tokenize(body: Any, limits: Limits) -> dict:
    """/tokenize (vLLM's shape): {"prompt": str, "add_special_tokens": bool = true} or
    {"messages": [...], "add_generation_prompt": bool = true}."""
    if not isinstance(body, dict):
        raise ServeRequestError("the request body must be a JSON object")
    check_model(body, limits)
    if body.get("messages") is not None:
        return {"messages": _messages(body),
                "add_generation_prompt": _boolean(body, "add_generation_prompt", True)}
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise _bad("prompt", f"{prompt!r:.60} is not a string (or give messages)")
    return {"prompt": prompt, "add_special_tokens": _boolean(body, "add_special_tokens", True)}


def parse_detokenize(body: Any, limits: Limits) -> list[int]:
    if not isinstance(body, dict):
        raise ServeRequestError("the request body must be a JSON object")
    check_model(body, limits)
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise _bad("tokens", f"{tokens!r:.60} is not a list of token ids")
    return _ids(tokens, limits.vocab_size, "tokens") if tokens else []
