"""Text to token ids and back, from the tokenizer a GGUF file describes in its metadata.

A GGUF carries no `tokenizer.json`; llama.cpp's converter writes the vocabulary and the facts
needed to rebuild it under `tokenizer.*` keys. `Tokenizer.from_metadata` rebuilds it with the
`tokenizers` library:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE from `tokens` and `merges`, split first by the
  regexes llama.cpp uses for `tokenizer.ggml.pre` (see `BPE_PRE_TOKENIZERS`).
- `tokenizer.ggml.model == "llama"`: SentencePiece-style BPE (Llama 2, Phi-3) from `tokens`,
  `scores` and `token_type`: merges are recovered from the scores, unknown characters fall back
  to `<0xXX>` byte tokens, spaces become "▁", and a "▁" is prepended to each run of text
  (`tokenizer.ggml.add_space_prefix`, default true) as llama.cpp and SentencePiece do.

Tokens typed CONTROL (and UNKNOWN) are matched whole in the text and count as special (dropped by
`skip_special_tokens`); USER_DEFINED ones are matched whole but are ordinary text, as in
transformers and llama.cpp.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import numpy as np
import jinja2.ext
import jinja2.sandbox
from gguf import TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from jaxllama.errors import TokenizerError

SUPPORTED_MODELS = ("gpt2", "llama")

# The splitting regexes of llama.cpp's `llm_tokenizer_bpe` (src/llama-vocab.cpp), written in the
# form of the models' own tokenizer.json where llama.cpp spells them differently only to work
# around std::regex (e.g. `(?i:'s|...)` there becomes `'[sS]|...`).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SINGLE_DIGITS = r"\p{N}"


@dataclasses.dataclass(frozen=True)
class BPEPreTokenizer:
    """How llama.cpp treats one `tokenizer.ggml.pre` value of a byte-level BPE vocabulary.

    splits: regexes applied in turn, each cutting the pieces the previous one left (isolated).
    add_bos: llama.cpp's default for `add_bos` when the file has no `tokenizer.ggml.add_bos_token`.
    ignore_merges: a pre-token that is itself in the vocabulary is emitted whole (Llama 3).
    """

    splits: tuple[str, ...]
    add_bos: bool = False
    ignore_merges: bool = False


_GPT2 = BPEPreTokenizer((_GPT2_SPLIT,))
_LLAMA3 = BPEPreTokenizer((_LLAMA3_SPLIT,), add_bos=True, ignore_merges=True)
_QWEN2 = BPEPreTokenizer((_QWEN2_SPLIT,))
# SmolLM's own tokenizer.json splits every digit off (`Digits(individual_digits=True)`) before the
# GPT-2 regex; llama.cpp does the same for "smollm" and the StarCoder-derived vocabularies.
_DIGITS_THEN_GPT2 = BPEPreTokenizer((_SINGLE_DIGITS, _GPT2_SPLIT))

BPE_PRE_TOKENIZERS: dict[str, BPEPreTokenizer] = {
    # No `tokenizer.ggml.pre`, or "default": plain GPT-2 splitting, which is what the HF tokenizer
    # of such a vocabulary does (llama.cpp uses a home-made "default" regex here instead).
    "default": _GPT2,
    "gpt-2": _GPT2,
    "phi-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "dbrx": BPEPreTokenizer((_LLAMA3_SPLIT,)),
    "smaug-bpe": BPEPreTokenizer((_LLAMA3_SPLIT,)),
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "megrez": _QWEN2,
    "stablelm2": _QWEN2,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
}

# Token texts llama.cpp treats as end of generation whatever the file's eos id says
# (`special_eog_ids` in src/llama-vocab.cpp): chat turn ends and end-of-text markers.
_END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "<end_of_utterance>",
    }
)
# Id keys that name an end-of-generation token, after `tokenizer.ggml.eos_token_id`. llama.cpp also
# stops at the FIM padding / repo / file separators, which end a fill-in-the-middle completion.
_END_OF_GENERATION_KEYS = (
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.fim_pad_token_id",
    "tokenizer.ggml.fim_rep_token_id",
    "tokenizer.ggml.fim_sep_token_id",
)

_SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """A GGUF file's tokenizer and chat template. Build it with `Tokenizer.from_metadata`.

    vocab_size: number of entries in `tokenizer.ggml.tokens`; every id is below it.
    bos_id / eos_id / unk_id / pad_id: the file's special ids (None where it names none).
    eos_ids: every id that ends generation, `eos_id` first (see `from_metadata`).
    add_bos / add_eos: whether `encode(..., add_special_tokens=True)` adds them.
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eos_ids: tuple[int, ...]
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    model: str
    pre: str | None
    chat_template: str | None = dataclasses.field(repr=False)
    _backend: _Backend = dataclasses.field(repr=False)
    _tokens: tuple[str, ...] = dataclasses.field(repr=False)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer from GGUF key/values given as plain Python values.

        `metadata` is what `{k: f.contents() for k, f in GGUFReader(path).fields.items()}` gives:
        strings as `str`, arrays as lists.

        Defaults where the file is silent follow llama.cpp: `add_bos` is true for "llama"
        (SentencePiece) vocabularies and for the Llama-3 pre-tokenizers, false otherwise;
        `add_space_prefix` is true for "llama". `eos_ids` holds `tokenizer.ggml.eos_token_id`,
        then the eot / eom / FIM pad, repo and file-separator ids if the file names them, then every
        token whose text is a known end-of-turn marker (`<|im_end|>`, `<|endoftext|>`, `<|end|>`,
        `<|eot_id|>`, ...), as llama.cpp's end-of-generation set does.

        Raises TokenizerError for an unsupported `tokenizer.ggml.model` or `tokenizer.ggml.pre`,
        a missing required key, or a special id outside the vocabulary.
        """
        model = metadata.get("tokenizer.ggml.model")
        if model not in SUPPORTED_MODELS:
            found = f"tokenizer.ggml.model {model!r}" if model else "no tokenizer.ggml.model key"
            raise TokenizerError(
                f"cannot build a tokenizer from {found}; supported: {', '.join(SUPPORTED_MODELS)}"
            )
        tokens = list(_required(metadata, "tokenizer.ggml.tokens", model))
        if not tokens:
            raise TokenizerError("tokenizer.ggml.tokens is empty")
        token_types = [int(t) for t in metadata.get("tokenizer.ggml.token_type") or ()]
        if token_types and len(token_types) != len(tokens):
            raise TokenizerError(
                f"tokenizer.ggml.token_type has {len(token_types)} entries, "
                f"tokenizer.ggml.tokens has {len(tokens)}"
            )
        if not token_types:  # llama.cpp reads every token as NORMAL then
            token_types = [TokenType.NORMAL] * len(tokens)
        tokens = _unique_texts(tokens)

        special = {
            name: _optional_id(metadata, f"tokenizer.ggml.{name}_token_id", len(tokens))
            for name in ("bos", "eos", "unknown", "padding")
        }
        pre: str | None = None
        if model == "gpt2":
            pre = metadata.get("tokenizer.ggml.pre")
            pre_tokenizer = BPE_PRE_TOKENIZERS.get("default" if pre is None else pre)
            if pre_tokenizer is None:
                raise TokenizerError(
                    f"tokenizer.ggml.pre {pre!r} is not supported for a gpt2 (byte-level BPE) "
                    f"vocabulary; supported: {', '.join(sorted(BPE_PRE_TOKENIZERS))}"
                )
            merges = _required(metadata, "tokenizer.ggml.merges", model)
            backend = _byte_level_bpe(tokens, merges, pre_tokenizer)
            default_add_bos = pre_tokenizer.add_bos
        else:
            scores = [float(s) for s in _required(metadata, "tokenizer.ggml.scores", model)]
            if len(scores) != len(tokens):
                raise TokenizerError(
                    f"tokenizer.ggml.scores has {len(scores)} entries, "
                    f"tokenizer.ggml.tokens has {len(tokens)}"
                )
            # llama.cpp's defaults for a SentencePiece vocabulary without these keys.
            for name, default in (("bos", 1), ("eos", 2), ("unknown", 0)):
                if f"tokenizer.ggml.{name}_token_id" not in metadata and default < len(tokens):
                    special[name] = default
            add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            unk = special["unknown"]
            backend = _sentencepiece_bpe(
                tokens, scores, token_types, None if unk is None else tokens[unk], add_space_prefix
            )
            default_add_bos = True
        _add_special_tokens(backend, tokens, token_types)

        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
            if flag and special[name] is None:
                raise TokenizerError(
                    f"tokenizer.ggml.add_{name}_token is set but the file has no "
                    f"tokenizer.ggml.{name}_token_id"
                )

        eos_ids: list[int] = [] if special["eos"] is None else [special["eos"]]
        for key in _END_OF_GENERATION_KEYS:
            token_id = _optional_id(metadata, key, len(tokens))
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(token_id)
        for token_id, text in enumerate(tokens):
            if text in _END_OF_GENERATION_TEXTS and token_id not in eos_ids:
                eos_ids.append(token_id)

        return cls(
            vocab_size=len(tokens),
            bos_id=special["bos"],
            eos_id=special["eos"],
            eos_ids=tuple(eos_ids),
            unk_id=special["unknown"],
            pad_id=special["padding"],
            add_bos=add_bos,
            add_eos=add_eos,
            model=model,
            pre=pre,
            chat_template=metadata.get("tokenizer.chat_template"),
            _backend=backend,
            _tokens=tuple(tokens),
        )

    # -- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text`; special-token texts in it (e.g. `<|im_start|>`) become their ids.

        With `add_special_tokens`, BOS is put first if `add_bos` and EOS last if `add_eos`. Text
        from a chat template that writes `bos_token` itself wants `add_special_tokens=False`, or
        it starts with two BOS (llama.cpp warns about that; transformers does the same).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of `ids`. Bytes that do not form complete UTF-8 characters become U+FFFD.

        `skip_special_tokens` drops CONTROL tokens (BOS, EOS, `<|im_end|>`, ...). No clean-up of
        spaces is done, so `decode(encode(t, add_special_tokens=False)) == t`.
        """
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TokenizerError(f"decode takes a sequence of token ids, got {type(ids).__name__}")
        checked = [self._check_id(token_id) for token_id in ids]
        return self._backend.decode(checked, skip_special_tokens=bool(skip_special_tokens))

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        """A decoder fed one id at a time that only ever returns whole characters."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def _check_id(self, token_id) -> int:
        """`token_id` as an int, or TokenizerError: not an integer, or outside the vocabulary."""
        if not _is_integer(token_id):
            raise TokenizerError(f"{token_id!r} is not a token id (an int); expected an int in "
                                 f"[0, {self.vocab_size})")
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary (vocab_size {self.vocab_size})"
            )
        return int(token_id)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of `token_id`, as the file spells it (e.g. "Ġthe", "▁the")."""
        return self._tokens[self._check_id(token_id)]

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry spelled as in the file, or None."""
        if not isinstance(token, str):
            raise TokenizerError(f"token_to_id takes a str, got {type(token).__name__}")
        return self._backend.token_to_id(token)

    # -- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, **template_vars: Any
    ) -> str:
        """Render `tokenizer.chat_template` for `messages` as transformers does.

        The template sees `messages`, `add_generation_prompt`, `tools` and `documents` (None
        unless given), `bos_token`, `eos_token`, `unk_token`, `pad_token` (those the file names)
        and any other `template_vars`. Raises TokenizerError if the file has no template, or the
        template rejects the messages (its `raise_exception`) or does not parse.
        """
        if not self.chat_template:
            raise TokenizerError("this GGUF has no tokenizer.chat_template to render")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
            raise TokenizerError(
                f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                f"{type(messages).__name__}"
                + ("" if not isinstance(messages, (list, tuple)) else " holding "
                   + ", ".join(sorted({type(m).__name__ for m in messages})))
            )
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id}
        names |= {"unk_token": self.unk_id, "pad_token": self.pad_id}
        variables = {"tools": None, "documents": None}
        variables |= {name: self._tokens[i] for name, i in names.items() if i is not None}
        try:
            template = _compile_template(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **(variables | template_vars),
            )
        except jinja2.TemplateError as err:
            raise TokenizerError(f"chat template: {err}") from err
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
            # The template is the file's code run on the caller's messages: a message it
            # cannot render (content not a string, a missing key) is bad input.
            raise TokenizerError(
                f"chat template: cannot render these messages: {type(err).__name__}: {err}"
            ) from err


class StreamDecoder:
    """Turns ids arriving one at a time into text, holding back a character split over tokens.

    `push(id)` returns the new text (possibly ""), always whole characters; `flush()` returns what
    is still held, with U+FFFD for bytes that never completed. The concatenation of everything
    returned equals `tokenizer.decode(ids)`. Each push decodes only the ids since the last whole
    piece of text, so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        # ids[_context:_emitted] were already returned; they are decoded again as context so
        # position-dependent decoding (SentencePiece's leading-space strip) cancels out.
        self._context = 0
        self._emitted = 0

    def _pending(self) -> tuple[str, str]:
        window = self._ids[self._context :]
        seen = self._tokenizer.decode(
            window[: self._emitted - self._context], skip_special_tokens=self._skip
        )
        return seen, self._tokenizer.decode(window, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        token_id = self._tokenizer._check_id(token_id)  # before it joins the stream
        self._ids.append(token_id)
        seen, text = self._pending()
        if text.endswith("\ufffd") or not text.startswith(seen) or len(text) == len(seen):
            return ""
        self._context, self._emitted = self._emitted, len(self._ids)
        return text[len(seen) :]

    def flush(self) -> str:
        seen, text = self._pending()
        new = text[len(seen) :] if text.startswith(seen) else text
        if new:  # pushing may go on after a flush; the context then stays as after a push
            self._context, self._emitted = self._emitted, len(self._ids)
        return new


def _is_integer(x) -> bool:
    """An int, a NumPy integer, or a 0-d integer array (a JAX scalar); not a bool."""
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, np.integer)):
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and np.ndim(x) == 0 and np.issubdtype(dtype, np.integer)


# -- building the backend ---------------------------------------------------------------------


def _required(metadata: Mapping[str, Any], key: str, model: str) -> Any:
    if key not in metadata:
        raise TokenizerError(f"a {model!r} tokenizer needs the GGUF key {key}, which is missing")
    return metadata[key]


def _optional_id(metadata: Mapping[str, Any], key: str, vocab_size: int) -> int | None:
    if key not in metadata:
        return None
    token_id = int(metadata[key])
    if not 0 <= token_id < vocab_size:
        raise TokenizerError(
            f"{key} = {token_id} is outside the vocabulary (vocab_size {vocab_size})"
        )
    return token_id


def _unique_texts(tokens: list[str]) -> list[str]:
    """The token texts with empty and repeated ones renamed, so text -> id is one-to-one.

    llama.cpp renames an empty token to "[EMPTY_<id>]" too; a repeat (which llama.cpp lets shadow
    the earlier id) gets "[DUPLICATE_<id>]", so every id keeps a vocabulary entry of its own.
    """
    seen: set[str] = set()
    out = []
    for token_id, text in enumerate(tokens):
        text = str(text)
        if not text:
            text = f"[EMPTY_{token_id}]"
        elif text in seen:
            text = f"[DUPLICATE_{token_id}]"
        seen.add(text)
        out.append(text)
    return out


def _byte_level_bpe(tokens: list[str], merges: Sequence[str], pre: BPEPreTokenizer) -> _Backend:
    """GPT-2 style BPE: the vocabulary spells bytes with printable stand-ins ("Ġ" is a space)."""
    vocab = {text: token_id for token_id, text in enumerate(tokens)}
    pairs = []
    for merge in merges:
        # The two halves are separated by the first space after the first character (a half may
        # not be empty; llama.cpp splits the same way).
        cut = merge.find(" ", 1)
        left, right = merge[:cut], merge[cut + 1 :]
        # `tokenizers` refuses a merge naming a token outside the vocabulary; llama.cpp could
        # never apply one either, so such a line is dropped.
        if cut > 0 and left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
    backend = _Backend(
        models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges, fuse_unk=False)
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: list[str],
    scores: list[float],
    token_types: list[int],
    unk_token: str | None,
    add_space_prefix: bool,
) -> _Backend:
    """SentencePiece BPE as llama.cpp runs it, in `tokenizers` terms.

    SentencePiece merges, at each step, the adjacent pair whose concatenation is the
    highest-scoring piece. Listing every split (left, right) of every normal piece, best score
    first, gives a BPE merge table that makes the same choices.
    """
    vocab = {text: token_id for token_id, text in enumerate(tokens)}
    normal = {text for text, kind in zip(tokens, token_types) if kind == TokenType.NORMAL}
    ranked = []
    for token_id, (text, kind) in enumerate(zip(tokens, token_types)):
        if kind != TokenType.NORMAL:
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    backend = _Backend(
        models.BPE(
            vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True
        )
    )
    # Whitespace is escaped as "▁" and, with add_space_prefix, one is put before each run of text
    # between special tokens: llama.cpp prefixes " " to the first fragment and to every fragment
    # that follows a special token (`is_prev_special` in llama_vocab::impl::tokenize).
    steps = [normalizers.Prepend(_SPM_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPM_SPACE)])
    backend.pre_tokenizer = None
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # the prefixed space is not part of the text
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_special_tokens(backend: _Backend, tokens: list[str], token_types: list[int]) -> None:
    """Match CONTROL / UNKNOWN tokens (as special) and USER_DEFINED ones (as text) whole.

    Their texts are already vocabulary entries, so the backend keeps the file's ids for them.
    """
    special = [
        AddedToken(text, special=True, normalized=False)
        for text, kind in zip(tokens, token_types)
        if kind in (TokenType.CONTROL, TokenType.UNKNOWN)
    ]
    user = [
        AddedToken(text, special=False, normalized=False)
        for text, kind in zip(tokens, token_types)
        if kind == TokenType.USER_DEFINED
    ]
    backend.add_special_tokens(special)
    backend.add_tokens(user)


# -- chat templates ---------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own `tojson` escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_TEMPLATE_CACHE: dict[str, jinja2.Template] = {}


def _compile_template(source: str) -> jinja2.Template:
    """The template compiled in the environment transformers renders chat templates in.

    Templates come from model files, so they are untrusted: the sandbox refuses attribute access
    to Python internals and the environment is immutable.
    """
    template = _TEMPLATE_CACHE.get(source)
    if template is None:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        template = _TEMPLATE_CACHE[source] = env.from_string(source)
    return template

