"""An lm-evaluation-harness backend, registered as `jaxllama` (the `[eval]` extra).

    jaxllama eval --model jaxllama --model_args pretrained=smollm2-135m-instruct \\
        --tasks hellaswag --batch_size auto           # lm-eval's own flags, unchanged

    import lm_eval, jaxllama.evaluation                # importing registers the backend
    lm_eval.simple_evaluate(model="jaxllama", model_args="pretrained=...", tasks=[...])

lm-eval 0.4.x finds backends only in its own registry (it reads no entry points), so the
backend registers itself when this module is imported; `jaxllama eval` imports it and
hands the rest of the command line to lm-eval's CLI.

The three request types:
- `loglikelihood`: tokenized exactly as lm-eval's `hf` backend does (its `TemplateLM`
  base: trailing spaces of the context move to the continuation, the pair is encoded
  whole and split at the context's length, an empty context becomes the prefix token;
  `tok_encode` adds the file's BOS unless the text already starts with it), truncated
  from the left to `max_length + 1` tokens as `hf` does, then scored packed
  (`LlamaInferenceAdapter.loglikelihood_batch`): many requests per fixed-width row, and
  the choices of one question share their context's tokens.
- `loglikelihood_rolling`: the disjoint rolling windows of the `hf` backend
  (`lm_eval.utils.get_rolling_token_windows` with context_len 1, `make_disjoint_window`),
  each scored as a loglikelihood request, summed per document.
- `generate_until`: through the engine (`jaxllama.engine.scheduler.Engine`), every
  request of one generation-kwargs group in flight at once over `batch_size` slots;
  a request is cancelled as soon as its decoded text holds a stop string, and the text
  is cut at the first one (lm-eval's `postprocess_generated_text`). Greedy unless
  `do_sample` / `temperature > 0` (then seeded per request: `seed + index`).

model_args: pretrained (a packaged name or a GGUF path), weights (f32 | bf16 | f16 |
int8 | int4 | native), dtype (float32 | bfloat16 | float16 | auto), batch_size (packed
rows per scoring call and engine slots; "auto": as many rows as fit 2048 tokens, 8
slots), max_length (default: the model's context length), max_gen_toks (default 256),
add_bos_token and prefix_token_id (as the `hf` backend's), seed (0), share_context
(true).
"""

from __future__ import annotations

import time
from typing import Any

import lm_eval.models  # noqa: F401  (the registry's built-in backends first; see below)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from jaxllama.errors import InvalidRequestError
from jaxllama.models import LlamaInferenceAdapter

# lm_eval.api.registry.get_model imports lm_eval.models (which registers the built-in
# backends) only when the registry is empty: registering ours into an empty registry
# would hide "hf" & co., hence the import above.

# Requests handed to one loglikelihood_batch call: enough to fill many rows, few enough
# that the progress bar moves.
_CHUNK = 512
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16", "auto": None}


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise InvalidRequestError(f"model_args {name}={value!r}: expected true or false")


def _as_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequestError(f"model_args {name}={value!r}: expected an integer >= {minimum}")
    return value


@register_model("jaxllama")
class JaxLlamaLM(TemplateLM):
    """lm-eval's `LM` over a `LlamaInferenceAdapter` (see the module doc)."""

    def __init__(self, pretrained: str = "smollm2-135m-instruct", weights: str | None = None,
                 dtype: str | None = None, batch_size: int | str | None = "auto",
                 max_batch_size: int | None = None, device: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 seed: int = 0, share_context: bool = True, adapter: LlamaInferenceAdapter | None = None,
                 **unknown: Any):
        super().__init__()
        if unknown:
            raise InvalidRequestError(
                f"jaxllama backend: unknown model_args {', '.join(sorted(unknown))}; accepted: "
                "pretrained, weights, dtype, batch_size, max_length, max_gen_toks, add_bos_token, "
                "prefix_token_id, seed, share_context"
            )
        if isinstance(dtype, str):
            if dtype.lower() not in _DTYPES:
                raise InvalidRequestError(
                    f"model_args dtype={dtype!r}: expected one of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype.lower()]
        if batch_size in (None, "auto") or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            self._rows = None  # as many packed rows as fit the scoring budget
        else:
            self._rows = _as_int("batch_size", batch_size)
        self._slots = self._rows or 8
        t0 = time.perf_counter()
        self.adapter = adapter if adapter is not None else LlamaInferenceAdapter.from_gguf(
            pretrained, dtype=dtype, weights=weights, progress=False)
        self.load_seconds = time.perf_counter() - t0
        self.pretrained = pretrained
        tok = self.adapter.tokenizer
        self._max_length = (self.adapter.config.context_length if max_length is None
                            else _as_int("max_length", max_length, 2))
        self._max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self.add_bos_token = None if add_bos_token is None else _as_bool("add_bos_token", add_bos_token)
        self._prefix = None if prefix_token_id is None else _as_int("prefix_token_id", prefix_token_id, 0)
        self._seed = _as_int("seed", seed, 0)
        self._share = _as_bool("share_context", share_context)
        if tok.eos_id is None and tok.bos_id is None and self._prefix is None:
            raise InvalidRequestError(
                "the model's tokenizer names neither an EOS nor a BOS token; pass prefix_token_id")
        self._bos_text = (None if tok.bos_id is None
                          else self.adapter.decode_text([tok.bos_id], skip_special_tokens=False))
        self._engine = None

    # ----- what lm-eval asks of a backend
    @property
    def eot_token_id(self) -> int:
        tok = self.adapter.tokenizer
        return tok.eos_id if tok.eos_id is not None else tok.bos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context becomes: BOS, else EOS (as the `hf` backend)."""
        if self._prefix is not None:
            return self._prefix
        tok = self.adapter.tokenizer
        return tok.bos_id if tok.bos_id is not None else tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.pretrained).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """As the `hf` backend: None means the file's BOS rule (or add_bos_token when
        given), except that a text already starting with the BOS text gets no second one."""
        if add_special_tokens is None:
            add = True if self.add_bos_token is None else self.add_bos_token
            if self._bos_text and string.startswith(self._bos_text):
                add = False
        else:
            add = add_special_tokens
        ids = self.adapter.encode(string, add_special_tokens=add)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.adapter.decode_text(tokens, skip_special_tokens=skip_special_tokens)

    def _truncate(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """The `hf` backend's left truncation: the model sees the last max_length tokens
        of context + continuation (less the last), and scores the continuation's."""
        whole = (context + continuation)[-(self._max_length + 1):]
        n = min(len(continuation), len(whole) - 1)
        return whole[:-n], whole[-n:]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [(cache key or None, context ids, continuation ids)]."""
        pairs = [self._truncate(list(ctx), list(cont)) for _, ctx, cont in requests]
        # Same contexts next to each other (they share rows), longest first within.
        order = sorted(range(len(pairs)), key=lambda i: (-len(pairs[i][0]), pairs[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="jaxllama loglikelihood") as bar:
            for start in range(0, len(order), _CHUNK):
                idx = order[start:start + _CHUNK]
                got = self.adapter.loglikelihood_batch([pairs[i] for i in idx], batch_size=self._rows,
                                                       share_context=self._share)
                for i, answer in zip(idx, got):
                    out[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(idx))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, scores):
            totals[k] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----- generation
    def _engine_for(self):
        if self._engine is None:
            from jaxllama.engine.scheduler import Engine

            self._engine = Engine.from_adapter(self.adapter, num_slots=self._slots,
                                               max_context=min(self._max_length, 4096)).start()
        return self._engine

    def close(self) -> None:
        """Stop the generation engine, if one was started."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    def _context_ids(self, context: str, max_ctx: int) -> list[int]:
        # The hf backend's tok_batch_encode: no BOS when the text starts with it, else
        # add_bos_token when given, else the tokenizer's own rule.
        add = True if self.add_bos_token is None else self.add_bos_token
        if self._bos_text and context.startswith(self._bos_text):
            add = False
        ids = self.adapter.encode(context, add_special_tokens=add)
        return ids[-max_ctx:]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        engine = None
        with tqdm(total=len(requests), disable=disable_tqdm, desc="jaxllama generate_until") as bar:
            for members in groups.values():
                kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self._max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_gen = int(kwargs.pop("max_gen_toks"))
                sample = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if sample else 0.0
                top_k = int(kwargs.pop("top_k", 0) or 0)
                top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
                max_ctx = min(self._max_length, 4096) - max_gen
                if max_ctx < 1:
                    raise InvalidRequestError(
                        f"max_gen_toks {max_gen} leaves no room for a prompt in max_length "
                        f"{min(self._max_length, 4096)}")
                engine = engine or self._engine_for()
                handles = [(i, engine.submit(self._context_ids(requests[i].args[0], max_ctx), max_gen,
                                             temperature=temperature, top_k=top_k if sample else 0,
                                             top_p=top_p if sample else 1.0, seed=self._seed + i))
                           for i in members]
                for i, h in handles:
                    tokens = []
                    for tok in h:
                        tokens.append(tok)
                        if any(u and u in self.tok_decode(tokens) for u in until):
                            h.cancel()
                            break
                    text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(1)
        return out
