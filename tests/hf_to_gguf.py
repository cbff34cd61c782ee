"""Tiny random transformers checkpoints, written as GGUF the way llama.cpp's converter writes them.

Tests use this to get GGUF files of every architecture jaxllama supports without a hub download:

    model = tiny_hf_model("phi3_longrope")            # a seeded, float32 transformers model
    path = write_gguf(model, tmp_path / "phi3.gguf")  # the GGUF llama.cpp's converter would write

`model` is then the logits reference for whatever reads `path`.

The conventions follow `convert_hf_to_gguf.py` (ggml-org/llama.cpp: `TextModel.set_gguf_parameters`,
`LlamaModel`, `Qwen2Model`, `Phi3MiniModel`, `ModelBase.prepare_tensors`); each one is noted where it is
applied. The code is our own: nothing here imports or copies the converter.

Per architecture (`general.architecture`, then the `{arch}.*` keys and tensor names written):

- ``llama`` (arches "llama", "llama3"): block_count, context_length, embedding_length,
  feed_forward_length, attention.head_count, attention.head_count_kv, rope.freq_base,
  attention.layer_norm_rms_epsilon, attention.key_length, attention.value_length, vocab_size,
  rope.dimension_count. Rows of attn_q / attn_k are permuted so that GGML's "NORM" rope (adjacent
  pairs) equals transformers' half-split rope. Llama 3 rope scaling is the `rope_freqs.weight` tensor
  (one divisor per frequency) and no `llama.rope.scaling.*` key, as the converter does.
- ``qwen2`` (arches "qwen2", "qwen2_tied"): block_count, context_length, embedding_length,
  feed_forward_length, attention.head_count, attention.head_count_kv, rope.freq_base,
  attention.layer_norm_rms_epsilon -- no rope.dimension_count (the converter writes none for qwen2,
  and neither does the real Qwen2.5 file). attn_q/attn_k/attn_v carry `.bias`; no permutation.
- ``phi3`` (arches "phi3", "phi3_longrope"): context_length, rope.scaling.original_context_length,
  embedding_length, feed_forward_length, block_count, attention.head_count, attention.head_count_kv,
  attention.layer_norm_rms_epsilon, rope.dimension_count, rope.freq_base, attention.sliding_window
  (0 when the config has none); with longrope also rope.scaling.attn_factor and the tensors
  `rope_factors_long.weight` / `rope_factors_short.weight`. Q, K, V stay fused in `attn_qkv`, and
  gate+up in `ffn_up` (gate rows first); there is no `ffn_gate`.

Every file also has general.type, general.name, general.file_type, general.quantization_version and a
tokenizer section (see `write_gguf`). `output.weight` is absent when the embeddings are tied.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import transformers

__all__ = [
    "ARCHS",
    "CHATML_TEMPLATE",
    "GGUF_ARCH",
    "GPT2_SPECIAL_TOKENS",
    "LLAMA_SPECIAL_TOKENS",
    "tiny_hf_model",
    "write_gguf",
    "llama3_rope_factors",
    "permute_for_ggml_rope",
]

# Test architecture name -> `general.architecture` of the file written for it.
GGUF_ARCH = {
    "qwen2": "qwen2",
    "qwen2_tied": "qwen2",
    "phi3": "phi3",
    "phi3_longrope": "phi3",
    "llama": "llama",
    "llama3": "llama",
}
ARCHS = tuple(GGUF_ARCH)

# The shape shared by every tiny model. The vocabulary is just big enough for either tokenizer
# layout (3 specials + 256 byte tokens + a few dozen merges) and deliberately not a round number.
_TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    # Both tokenizer layouts below put BOS at 1 and EOS at 2, so the config agrees with either.
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)

# Token ids 0..2 of the two tokenizer layouts `write_gguf` can write.
GPT2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

# Text the tiny BPE vocabularies are learned from: English and a little code, so that common
# words become single tokens and tokenizer tests see real merges at work.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs
into the woods. There is a reason the story is told: the fox is quick and the dog is not.
def reverse_string(text):
    return text[::-1]
for index in range(10):
    print(index, reverse_string("hello world"))
"""

# A ChatML template, the kind Qwen and SmolLM2 files carry; written only when asked for.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------


def _config(arch: str, overrides: dict[str, Any]) -> transformers.PretrainedConfig:
    kwargs: dict[str, Any] = dict(_TINY)
    if arch in ("qwen2", "qwen2_tied"):
        # Qwen2.5's rope base and epsilon; its q/k/v biases are built into the Qwen2 classes.
        kwargs.update(max_position_embeddings=4096, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
        kwargs["tie_word_embeddings"] = arch == "qwen2_tied"
        kwargs.update(overrides)
        return transformers.Qwen2Config(**kwargs)

    if arch in ("phi3", "phi3_longrope"):
        # Phi-3 is plain multi-head attention: as many KV heads as query heads.
        kwargs.update(
            num_key_value_heads=kwargs["num_attention_heads"],
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            rope_theta=10_000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            sliding_window=None,
        )
        if arch == "phi3_longrope":
            # The 128k variants: a context past the pretraining one, and per-frequency divisors for
            # short (<= original) and long sequences. Kept tiny so tests reach the long regime.
            kwargs.update(max_position_embeddings=256, original_max_position_embeddings=64)
        kwargs.update(overrides)
        if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if arch == "phi3_longrope" and "rope_scaling" not in overrides:
            head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
            gen = torch.Generator().manual_seed(1234)
            n = head_dim // 2
            # Shaped like the real ones: short factors close to 1, long ones growing with wavelength.
            short = 1.0 + 0.5 * torch.rand(n, generator=gen)
            long = torch.linspace(1.0, 12.0, n) * (1.0 + 0.2 * torch.rand(n, generator=gen))
            kwargs["rope_scaling"] = {
                "type": "longrope",
                "short_factor": [round(float(x), 4) for x in short],
                "long_factor": [round(float(x), 4) for x in long],
                "original_max_position_embeddings": kwargs["original_max_position_embeddings"],
            }
        return transformers.Phi3Config(**kwargs)

    if arch in ("llama", "llama3"):
        if arch == "llama":
            # SmolLM2's rope base and epsilon, untied here (the llama3 model covers tying).
            kwargs.update(
                max_position_embeddings=8192, rope_theta=100_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False
            )
        else:
            # Llama 3.2-1B: rope base 500000, "llama3" scaling of an 8192 context, tied embeddings.
            # With head_dim 16 and this base, the 8 frequencies fall in all three llama3 bands
            # (4 kept, 1 interpolated, 3 divided by `factor`), so every branch is exercised.
            kwargs.update(
                max_position_embeddings=131072,
                rope_theta=500_000.0,
                rms_norm_eps=1e-5,
                tie_word_embeddings=True,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 32.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
            )
        kwargs.update(overrides)
        return transformers.LlamaConfig(**kwargs)

    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {', '.join(ARCHS)}")


@torch.no_grad()
def tiny_hf_model(arch: str, *, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A tiny random float32 transformers causal LM of `arch`, in eval mode.

    `arch` is one of `ARCHS`. Default shape: 2 layers, hidden 64, 4 heads of dim 16, 2 KV heads
    (Phi-3: 4, i.e. plain multi-head), FFN 128, vocab 300; BOS 1, EOS 2. "qwen2_tied" and "llama3"
    (like Llama 3.2-1B) tie the output to the embeddings; the others do not. `overrides` are config
    keyword arguments (e.g. ``hidden_size=192, num_attention_heads=2`` for Phi-3's head_dim 96).

    Weights are drawn from `seed` at scales that keep activations O(1) and logits spread out (std
    about 1 to 2), unlike the default 0.02 init whose logits are almost uniform: embeddings
    N(0, 0.25^2), linear weights N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2), biases N(0, 0.5^2).
    """
    config = _config(arch, overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # tied parameters are listed once
        if name.endswith("norm.weight"):
            values = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
        elif name.endswith(".bias"):
            values = 0.5 * torch.randn(param.shape, generator=gen)
        elif "embed_tokens" in name:
            values = 0.25 * torch.randn(param.shape, generator=gen)
        elif param.ndim == 2:
            values = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1])
        else:
            raise ValueError(f"tiny_hf_model: no init rule for parameter {name} of shape {tuple(param.shape)}")
        param.copy_(values)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Tensor conventions
# --------------------------------------------------------------------------------------------------


def permute_for_ggml_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q or k projection (or its bias) from half-split to interleaved rope.

    transformers rotates dims (i, i + d/2) of each head together; GGML's "NORM" rope, which llama.cpp
    uses for `llama`, rotates (2i, 2i + 1). Within every head of `n_head` (the KV head count for k),
    output row 2i takes input row i and row 2i + 1 takes row i + d/2 -- llama.cpp's `LlamaModel.permute`.
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """The `rope_freqs.weight` values for Llama 3 rope scaling: one divisor per rotary frequency.

    llama.cpp divides each frequency theta_i = base^(-2i/d) by this factor: 1 for wavelengths shorter
    than original_context / high_freq_factor, `factor` for those longer than
    original_context / low_freq_factor, and a smooth blend in between (the converter's
    `LlamaModel.generate_extra_tensors`, float32 like it).

    GGUF quirk: the converter reads `original_max_position_embeddings` from the top level of
    config.json, where Llama 3 configs do not have it, so it always uses its default 8192. Every real
    Llama 3.x has 8192 in `rope_scaling` anyway; we read it from the rope parameters (what
    transformers uses), which gives the converter's output for all of them and stays right otherwise.
    """
    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    factors = []
    for freq in freqs.astype(np.float32):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# transformers parameter name (without `.weight` / `.bias`) -> GGUF tensor name, per layer `{i}`.
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv",  # Phi-3: Q, K, V rows in that order, kept fused
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3: gate rows then up rows, kept fused
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _gguf_tensor_name(hf_name: str) -> str:
    stem, _, suffix = hf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    if (m := _LAYER_RE.fullmatch(stem)) and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{suffix}"
    raise ValueError(
        f"tensor {hf_name}: no GGUF name for it; expected one of {sorted(_GLOBAL_NAMES)} or "
        f"model.layers.N.{{{', '.join(sorted(_LAYER_NAMES))}}}"
    )


_QTYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}


def _storage(
    name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(bytes or values to write, their type), by the converter's `prepare_tensors` rules."""
    # 1-D tensors, norms and anything that is not a `.weight` (biases) always stay F32.
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        # A row length that is not a multiple of the block size: the converter falls back to F16.
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def _byte_alphabet() -> tuple[dict[int, str], list[str]]:
    """GPT-2's printable spelling of the 256 bytes: (byte -> character, the 256 characters in GPT-2's
    vocabulary order, where `!` is token 0).

    Printable Latin-1 bytes spell themselves; the other 68 (controls, space, ...) are shifted to
    U+0100 onwards in byte order, which is why a space shows up as `Ġ` in merges.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in spelling]
    spelling.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return spelling, [spelling[b] for b in printable + shifted]


def _learn_bpe(words: list[list[str]], max_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on `words` (each a list of symbols): the most frequent adjacent pair is merged
    first, ties broken by the pair's spelling so the result is deterministic."""
    words = [list(w) for w in words]
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs = Counter(pair for w in words for pair in zip(w, w[1:]))
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i : i + 2] = [w[i] + w[i + 1]]
                i += 1
    return merges


def _gpt2_vocab(vocab_size: int) -> dict[str, Any]:
    """A byte-level BPE vocabulary: 3 control tokens, the 256 byte tokens, then merged tokens."""
    spell, alphabet = _byte_alphabet()
    # GPT-2 style pieces: a word with its leading space, digits, punctuation runs, whitespace.
    chunks = re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", _CORPUS)
    words = [[spell[b] for b in chunk.encode("utf-8")] for chunk in chunks]
    n_fixed = len(GPT2_SPECIAL_TOKENS) + 256
    if vocab_size < n_fixed:
        raise ValueError(f"vocab_size {vocab_size} is too small for a gpt2 vocabulary; need at least {n_fixed}")
    merges = _learn_bpe(words, vocab_size - n_fixed)
    tokens = [*GPT2_SPECIAL_TOKENS, *alphabet, *(a + b for a, b in merges)]
    types = [gguf.TokenType.CONTROL] * len(GPT2_SPECIAL_TOKENS) + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    # Like the converter, ids the tokenizer does not use are filled as unused `[PAD{id}]` tokens.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    return dict(tokens=tokens, types=types, merges=[f"{a} {b}" for a, b in merges], scores=None)


def _llama_vocab(vocab_size: int) -> dict[str, Any]:
    """A SentencePiece-BPE style vocabulary: <unk> <s> </s>, the 256 `<0xNN>` byte-fallback tokens,
    merged pieces (scores 0, -1, -2, ... in merge order), then the single characters.

    Learned from the corpus's lower-case words only, which keeps the alphabet small enough to leave
    room for merges in a tiny vocabulary; anything else (capitals, digits, punctuation) is spelled
    with the byte tokens, as SentencePiece's byte fallback does.
    """
    words = [["▁", *w] for w in re.findall(r"[a-z]+", _CORPUS.lower())]
    chars = sorted({c for w in words for c in w})
    n_fixed = len(LLAMA_SPECIAL_TOKENS) + 256
    if vocab_size < n_fixed + len(chars):
        raise ValueError(
            f"vocab_size {vocab_size} is too small for a llama vocabulary; need at least {n_fixed + len(chars)}"
        )
    merges = _learn_bpe(words, vocab_size - n_fixed - len(chars))
    pieces = [a + b for a, b in merges]
    tokens = [*LLAMA_SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256)), *pieces, *chars]
    scores = [0.0] * n_fixed + [-float(i) for i in range(len(pieces))]
    scores += [-float(len(pieces) + i) for i in range(len(chars))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (len(pieces) + len(chars))
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-10000.0)
        types.append(gguf.TokenType.UNUSED)
    return dict(tokens=tokens, types=types, merges=None, scores=scores)


# A pre-tokenizer name per architecture, for byte-level vocabularies: what the real files state
# (Qwen2.5: "qwen2"; Llama 3: "llama-bpe"; Phi-4, a phi3 file with a GPT-2 tokenizer: "gpt-2").
_DEFAULT_PRE = {"qwen2": "qwen2", "llama": "llama-bpe", "phi3": "gpt-2"}


def _add_tokenizer(
    writer: gguf.GGUFWriter, kind: str, vocab_size: int, pre: str | None, chat_template: str | None
) -> None:
    if kind == "gpt2":
        vocab = _gpt2_vocab(vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or _DEFAULT_PRE[writer.arch])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        writer.add_bos_token_id(1)  # <|im_start|>, as in SmolLM2
        writer.add_eos_token_id(2)  # <|im_end|>
        writer.add_pad_token_id(0)  # <|endoftext|>
        writer.add_add_bos_token(False)
    elif kind == "llama":
        vocab = _llama_vocab(vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(vocab["tokens"])
        writer.add_token_scores(vocab["scores"])
        writer.add_token_types(vocab["types"])
        writer.add_bos_token_id(1)  # <s>
        writer.add_eos_token_id(2)  # </s>
        writer.add_unk_token_id(0)  # <unk>
        writer.add_pad_token_id(0)  # <unk>, as Llama 2 fine-tunes commonly pad
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
    else:
        raise ValueError(f"tokenizer {kind!r} is not supported; expected 'gpt2' or 'llama'")
    if chat_template is not None:
        writer.add_chat_template(chat_template)


# --------------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------------


def _arch_of(config: transformers.PretrainedConfig) -> str:
    arch = {"llama": "llama", "qwen2": "qwen2", "phi3": "phi3"}.get(config.model_type)
    if arch is None:
        raise ValueError(f"model_type {config.model_type!r} is not supported; expected llama, qwen2 or phi3")
    return arch


def _rope_parameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """The rope settings, wherever this transformers version keeps them (v5: `rope_parameters`,
    holding `rope_theta`; v4: `rope_scaling` beside a top-level `rope_theta`)."""
    rope = dict(hparams.get("rope_parameters") or hparams.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hparams.get("rope_theta", 10_000.0))
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    rope.setdefault("rope_type", "default")
    return rope


def write_gguf(
    model: transformers.PreTrainedModel,
    path: str | os.PathLike[str],
    *,
    tokenizer: str = "gpt2",
    qtype: str = "F32",
    tokenizer_pre: str | None = None,
    chat_template: str | None = None,
    name: str | None = None,
) -> Path:
    """Write `model` (llama, qwen2 or phi3) to the GGUF file `path` as llama.cpp's converter would.

    Metadata: see the module docstring. Tensors: every parameter of `model.state_dict()` under its
    GGUF name, in the file's row-major layout (GGML lists the dimensions reversed), with the llama
    q/k row permutation, plus the extra rope tensors (llama3: `rope_freqs.weight`; phi3 longrope:
    `rope_factors_long/short.weight`). `output.weight` is skipped when the embeddings are tied.

    `qtype` ("F32", "F16", "Q8_0", "Q4_0" or "Q4_1") is the file type: it applies to 2-D `.weight` tensors except
    norms; 1-D tensors, norms and biases stay F32, and a quantized tensor whose rows are not a multiple
    of 32 falls back to F16, all as in the converter.

    `tokenizer` "gpt2": byte-level BPE (tokenizer.ggml.model "gpt2", pre-tokenizer `tokenizer_pre` or
    the architecture's usual one): ids 0-2 `<|endoftext|>` `<|im_start|>` `<|im_end|>` (control),
    then the 256 byte tokens in GPT-2 order, then merged tokens with their merges; BOS 1, EOS 2,
    PAD 0, add_bos_token false. "llama": SentencePiece-BPE (model "llama", pre "default"): `<unk>`
    `<s>` `</s>`, `<0x00>`..`<0xFF>`, scored pieces; BOS 1, EOS 2, UNK 0, PAD 0, add_bos_token true. Either
    is padded with unused `[PADn]` tokens to exactly the model's vocab_size.

    Returns the path written.
    """
    config = model.config
    hparams = config.to_dict()  # what the converter reads (config.json through AutoConfig)
    arch = _arch_of(config)
    if qtype not in _QTYPES:
        raise ValueError(f"qtype {qtype!r} is not supported; expected one of {', '.join(_QTYPES)}")
    tensor_qtype, file_type = _QTYPES[qtype]

    n_embd = hparams["hidden_size"]
    n_head = hparams["num_attention_heads"]
    n_head_kv = hparams.get("num_key_value_heads") or n_head
    head_dim = hparams.get("head_dim") or n_embd // n_head
    rope = _rope_parameters(hparams)
    rope_type = str(rope["rope_type"]).lower()
    vocab_size = hparams["vocab_size"]

    path = Path(path)
    writer = gguf.GGUFWriter(path, arch)  # writes general.architecture
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or f"tiny random {arch}")

    # ---- hyperparameters
    if arch == "phi3":
        # `Phi3MiniModel.set_gguf_parameters`, which replaces the generic one entirely.
        rope_dims = int(hparams.get("partial_rotary_factor", 1.0) * n_embd) // n_head
        original_ctx = hparams["original_max_position_embeddings"]
        writer.add_context_length(hparams["max_position_embeddings"])
        writer.add_rope_scaling_orig_ctx_len(original_ctx)
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(hparams["intermediate_size"])
        writer.add_block_count(hparams["num_hidden_layers"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
        writer.add_rope_dimension_count(rope_dims)
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_file_type(file_type)
        writer.add_sliding_window(hparams.get("sliding_window") or 0)  # 0 tells Phi-3 from Phi-4
    else:
        # `TextModel.set_gguf_parameters`, in its order.
        writer.add_block_count(hparams["num_hidden_layers"])
        writer.add_context_length(hparams["max_position_embeddings"])
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(hparams["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        if rope_type not in ("default", "llama3"):
            # linear/yarn/... would add rope.scaling.* keys; no tiny model here uses them.
            raise ValueError(f"rope type {rope_type!r} is not supported by write_gguf for {arch}")
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
        if hparams.get("head_dim") is not None:  # LlamaConfig has one, Qwen2Config does not
            writer.add_key_length(hparams["head_dim"])
            writer.add_value_length(hparams["head_dim"])
        writer.add_file_type(file_type)
        if arch == "llama":
            # `LlamaModel.set_gguf_parameters` adds these two.
            writer.add_vocab_size(vocab_size)
            writer.add_rope_dimension_count(head_dim)

    # ---- tensors: the generated rope tensors first, then the checkpoint's, as the converter does
    tensors: list[tuple[str, np.ndarray]] = []
    if arch == "llama" and rope_type == "llama3":
        tensors.append(("rope_freqs.weight", llama3_rope_factors(rope, head_dim)))
    if arch == "phi3" and rope_type != "default":
        if rope_type not in ("longrope", "su"):
            raise ValueError(f"phi3 rope type {rope_type!r} is not supported by write_gguf; expected longrope")
        # `Phi3MiniModel.generate_extra_tensors`: the attention factor from the context ratio, and
        # the two factor lists as tensors of rope_dims / 2.
        scale = hparams["max_position_embeddings"] / original_ctx
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(original_ctx)) if scale > 1.0 else 1.0
        writer.add_rope_scaling_attn_factors(attn_factor)
        long_factors, short_factors = rope["long_factor"], rope["short_factor"]
        if not len(long_factors) == len(short_factors) == rope_dims // 2:
            raise ValueError(
                f"longrope factors: expected {rope_dims // 2} long and short factors, "
                f"got {len(long_factors)} and {len(short_factors)}"
            )
        tensors.append(("rope_factors_long.weight", np.asarray(long_factors, dtype=np.float32)))
        tensors.append(("rope_factors_short.weight", np.asarray(short_factors, dtype=np.float32)))

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, value in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if tied and hf_name == "lm_head.weight":
            continue  # the HF checkpoint of a tied model has no lm_head, so neither does the GGUF
        data = value.detach().to(torch.float32).cpu().numpy()
        gguf_name = _gguf_tensor_name(hf_name)
        if arch == "llama":
            if ".attn_q." in gguf_name:
                data = permute_for_ggml_rope(data, n_head)
            elif ".attn_k." in gguf_name:
                data = permute_for_ggml_rope(data, n_head_kv)
        tensors.append((gguf_name, data))

    for gguf_name, data in tensors:
        stored, stored_type = _storage(gguf_name, np.ascontiguousarray(data), tensor_qtype)
        writer.add_tensor(gguf_name, stored, raw_dtype=stored_type)

    # ---- tokenizer, then the quantization version last, as the converter orders them
    _add_tokenizer(writer, tokenizer, vocab_size, tokenizer_pre, chat_template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
