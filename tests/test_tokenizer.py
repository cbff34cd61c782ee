"""The GGUF tokenizer against independent references.

- The two packaged files (SmolLM2: gpt2/smollm, Qwen2.5-Coder: gpt2/qwen2) against the tokenizer
  transformers builds from the same GGUF (`AutoTokenizer.from_pretrained(..., gguf_file=...)`).
- A SentencePiece ("llama") vocabulary, for which no real file is at hand: a tiny sentencepiece BPE
  model trained here, written as a Phi-3-style GGUF, checked against transformers' tokenizer for
  that GGUF and against sentencepiece itself.
- A Llama-3-style ("llama-bpe") byte-level vocabulary trained here, against transformers.

One known difference, kept on purpose: for `tokenizer.ggml.pre == "smollm"` transformers' GGUF
loader uses plain GPT-2 splitting, while SmolLM2's own tokenizer.json (and llama.cpp) split every
digit off first. They disagree on a whitespace run before a digit ("a  1": transformers gives
"a" "Ġ" "Ġ" "1", the model's tokenizer "a" "ĠĠ" "1"). jaxllama follows the model's tokenizer, so
for SmolLM2 the reference is transformers' tokenizer with that pre-tokenizer restored;
`test_smollm2_transformers_gguf_differs_only_before_digits` pins down the difference.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from jaxllama.errors import TokenizerError
from jaxllama.gguf.reader import read_gguf
from jaxllama.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces",
    "trailing spaces   ",
    "many     inner      spaces",
    "Les élèves étudient à l'école. Ça va? Über naïve façade",
    "e\u0301 (decomposed accent) vs é",
    "emoji 🙂👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "東京は日本の首都です。北京是中国的首都。",
    "한국어 텍스트와 Русский текст и العربية",
    "tab\tseparated\tvalues",
    "line one\nline two\n\nafter blank\r\nwindows line\r\n",
    "\n\n\n",
    "digits 1234567890123456789 and 3.14159, 1,000,000 and 2024-06-01",
    "a  1",
    "x   42\n  7",
    "def reverse(s: str) -> str:\n    return s[::-1]  # slice\n\nprint(reverse('abc'))\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "don't I'll we've they're she's it'd YOU'RE I'M",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<tool_call>{\"name\": \"f\"}</tool_call>",
    "",
    " ",
    "\u00a0non-breaking\u2003em-space\u3000ideographic",
]
# Texts that hold a special token's text, so decode(encode(t)) keeps it but skip_special drops it.
SPECIAL_MARKERS = ("<|", "<tool_call>", "</tool_call>")


def gguf_metadata(path: Path) -> dict:
    """The GGUF key/values as plain Python values, as `Tokenizer.from_metadata` takes them.

    Read with the library's reader (tests/test_reader.py checks its metadata equals
    GGUFReader's), which skips GGUFReader's ~20 s of vocabulary parsing on the Qwen file."""
    return read_gguf(path).metadata


@dataclasses.dataclass
class Case:
    name: str
    ours: Tokenizer
    hf: object  # the transformers tokenizer for the same GGUF
    reference: tokenizers.Tokenizer  # the ids jaxllama must produce (see module docstring)

    def reference_ids(self, text: str) -> list[int]:
        return self.reference.encode(text, add_special_tokens=True).ids


def _load_real(name: str, path: Path) -> Case:
    start = time.perf_counter()
    ours = Tokenizer.from_metadata(gguf_metadata(path))
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    reference = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    if ours.pre == "smollm":
        # SmolLM2's own tokenizer.json: individual digits, then GPT-2 byte-level splitting.
        reference.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
            [
                tokenizers.pre_tokenizers.Digits(individual_digits=True),
                tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    print(f"\n{name}: metadata + both tokenizers loaded in {time.perf_counter() - start:.1f} s")
    return Case(name, ours, hf, reference)


@pytest.fixture(scope="module")
def smollm2_case(smollm2_path) -> Case:
    return _load_real("smollm2", smollm2_path)


@pytest.fixture(scope="module")
def qwen_case(qwen_path) -> Case:
    return _load_real("qwen", qwen_path)


@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=pytest.mark.slow) for name in ("smollm2", "qwen")],
)
def real(request) -> Case:
    return request.getfixturevalue(f"{request.param}_case")


# -- the two real files ------------------------------------------------------------------------


def test_real_file_properties(real):
    tok = real.ours
    if real.name == "smollm2":
        assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pre) == (49152, 1, 2, "smollm")
        # <|im_end|> (the file's eos), then <|endoftext|> by its text.
        assert tok.eos_ids == (2, 0)
    else:
        assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (151936, 151643, 151645)
        assert tok.pre == "qwen2"
        assert tok.eos_ids == (151645, 151643)  # <|im_end|>, <|endoftext|>
    assert tok.add_bos is False and tok.add_eos is False  # both files say add_bos_token = false
    assert tok.vocab_size == len(real.hf)
    for token_id in tok.eos_ids:
        assert real.hf.convert_ids_to_tokens(token_id) == tok.id_to_token(token_id)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(real, text):
    ids = real.ours.encode(text)
    assert ids == real.reference_ids(text)
    assert real.ours.encode(text, add_special_tokens=False) == ids  # neither file adds BOS
    if real.name == "qwen":
        assert ids == real.hf(text).input_ids  # transformers' own GGUF tokenizer, unchanged


def test_special_tokens_in_text_are_single_ids(real):
    tok = real.ours
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == start and ids[-1] == end
    assert ids == real.hf("<|im_start|>user\nhi<|im_end|>").input_ids


@pytest.mark.slow
def test_smollm2_transformers_gguf_differs_only_before_digits(smollm2_case):
    tok, hf = smollm2_case.ours, smollm2_case.hf
    pieces = [tok.id_to_token(i) for i in tok.encode("a  1")]
    assert pieces == ["a", "ĠĠ", "1"]  # as SmolLM2's tokenizer.json and llama.cpp split it
    assert hf.convert_ids_to_tokens(hf("a  1").input_ids) == ["a", "Ġ", "Ġ", "1"]
    differ = [t for t in TEXTS if tok.encode(t) != hf(t).input_ids]
    # Every difference is a whitespace run of two or more right before a digit.
    assert differ and all(re.search(r"\s\s\d", t) for t in differ), differ


@pytest.mark.parametrize("text", [t for t in TEXTS if not any(m in t for m in SPECIAL_MARKERS)])
def test_decode_round_trips_and_matches_transformers(real, text):
    tok = real.ours
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for skip in (False, True):
        theirs = real.hf.decode(ids, skip_special_tokens=skip)
        assert tok.decode(ids, skip_special_tokens=skip) == theirs


@pytest.mark.parametrize("text", [t for t in TEXTS if any(m in t for m in SPECIAL_MARKERS)])
def test_decode_of_special_tokens_matches_transformers(real, text):
    ids = real.ours.encode(text)
    assert real.ours.decode(ids) == text
    for skip in (False, True):
        assert real.ours.decode(ids, skip_special_tokens=skip) == real.hf.decode(
            ids, skip_special_tokens=skip
        )


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=40))
def test_random_unicode_matches_transformers(real, text):
    tok = real.ours
    ids = tok.encode(text)
    assert ids == real.reference_ids(text)
    assert tok.decode(ids) == real.hf.decode(ids)
    if _vocabulary_spells_every_byte(tok, text):
        assert tok.decode(ids) == text


_BYTE_LEVEL = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _vocabulary_spells_every_byte(tok: Tokenizer, text: str) -> bool:
    """Whether every byte of `text` has a token. SmolLM2's vocabulary lacks a few (0x04, 0xF1,
    ...); the BPE drops such characters, as transformers and llama.cpp do too."""
    if not text:
        return True
    ((spelled, _),) = _BYTE_LEVEL.pre_tokenize_str(text)  # bytes as GPT-2's stand-in characters
    return all(tok.token_to_id(c) is not None for c in spelled)


CONVERSATIONS = {
    "system+user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Write a Python function that reverses a string."},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi! 👋"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "What is 2 + 2?\nAnswer briefly."},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks, and 3 × 3?"},
    ],
}


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(real, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    ours = real.ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = real.hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert real.ours.encode(ours) == real.reference_ids(ours)


def test_stream_decoder_holds_split_characters(real):
    tok = real.ours
    text = "Emoji 🙂👍🏽 and 東京 and 한국어, then ascii. 🇫🇷!"
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # At least one emoji is split over byte tokens, so some pushes return nothing.
    assert len(ids) > len([p for p in pieces if p])


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_stream_decoder_concatenates_to_decode_for_random_ids(real, data):
    tok = real.ours
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    # Mix in byte tokens (the pieces of a split character), which random ids rarely hit.
    ids += tok.encode(data.draw(st.text(max_size=8)))
    skip = data.draw(st.booleans())
    stream = tok.stream_decoder(skip_special_tokens=skip)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


# -- a SentencePiece ("llama") vocabulary, written as llama.cpp writes Phi-3 ----------------------

SP_CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello world! Don't stop; it's late and we're here.
Tokenizers split text into pieces: sentencepiece learns them from data, bytes cover the rest.
Les élèves étudient à l'école. Ça va très bien, merci. Über den Wolken, die Freiheit.
東京は日本の首都です。北京是中国的首都。 Numbers like 3.14159 and 1,000,000 appear.
def main():
    return [x * 2 for x in range(10)]  # a comprehension
The model reads the prompt, then writes the answer one token at a time until the end token.
"""
# Added after the sentencepiece pieces, as Phi-3's added_tokens are after its 32000 pieces: text,
# type. <|placeholder1|> is USER_DEFINED to cover that type (matched whole, not special).
PHI3_ADDED = [
    ("<|endoftext|>", gguf.TokenType.CONTROL),
    ("<|assistant|>", gguf.TokenType.CONTROL),
    ("<|placeholder1|>", gguf.TokenType.USER_DEFINED),
    ("<|system|>", gguf.TokenType.CONTROL),
    ("<|end|>", gguf.TokenType.CONTROL),
    ("<|user|>", gguf.TokenType.CONTROL),
]
PHI3_PADDING = 3  # "[PADn]" UNUSED entries that round the vocabulary up, as in Phi-3
PHI3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)
SP_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces",
    "trailing  ",
    "inner    spaces and\ttabs\nand\n\nnewlines\r\n",
    "Les élèves, ça va? naïve",
    "東京は日本の首都です。 unseen: 大阪",
    "emoji 🙂👍🏽 falls back to bytes",
    "digits 12345678901234567890",
    "don't we'll THEY'RE",
    "def f(x):\n    return x * 2\n",
    "",
    " ",
    "\u00a0nbsp",
]
SP_SPECIAL_TEXTS = [
    "<|user|>\nHello<|end|>\n<|assistant|>\n",
    "before<|endoftext|>after",
    "a <|placeholder1|> b",
    "<s>literal bos and </s> and <unk>",
    "[PAD0] is not special",
]


def _train_sentencepiece(add_dummy_prefix: bool) -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS.splitlines() * 8),
        model_writer=model,
        vocab_size=420,
        model_type="bpe",
        # Llama 2 / Phi-3 settings: raw text (no NFKC), bytes for unknown characters, digits
        # never merged, runs of "▁" allowed as pieces.
        normalization_rule_name="identity",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _write_phi3_gguf(path: Path, sp: spm.SentencePieceProcessor, add_space_prefix=None) -> Path:
    """A GGUF with the tokenizer keys llama.cpp's converter writes for Phi-3
    (`Phi3MiniModel.set_vocab`) and a minimal phi3 model description transformers needs."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(
            gguf.TokenType.UNKNOWN if sp.is_unknown(i)
            else gguf.TokenType.CONTROL if sp.is_control(i)
            else gguf.TokenType.UNUSED if sp.is_unused(i)
            else gguf.TokenType.BYTE if sp.is_byte(i)
            else gguf.TokenType.NORMAL
        )
    for text, kind in PHI3_ADDED:  # added tokens: score -1000 (llama.cpp's value)
        tokens.append(text)
        scores.append(-1000.0)
        types.append(kind)
    for _ in range(PHI3_PADDING):  # padding: "[PAD<id>]", score -10000, UNUSED
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-10000.0)
        types.append(gguf.TokenType.UNUSED)

    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    endoftext = tokens.index("<|endoftext|>")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(endoftext)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(endoftext)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(PHI3_TEMPLATE)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclasses.dataclass
class SPCase:
    sp: spm.SentencePieceProcessor
    metadata: dict
    ours: Tokenizer
    hf: object


@pytest.fixture(scope="module")
def spm_case(tmp_path_factory) -> SPCase:
    sp = _train_sentencepiece(add_dummy_prefix=True)
    path = _write_phi3_gguf(tmp_path_factory.mktemp("spm") / "tiny-phi3.gguf", sp)
    metadata = gguf_metadata(path)
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return SPCase(sp, metadata, Tokenizer.from_metadata(metadata), hf)


def test_spm_properties(spm_case):
    tok = spm_case.ours
    n = spm_case.sp.get_piece_size()
    assert (tok.model, tok.vocab_size, tok.bos_id, tok.unk_id) == ("llama", n + 9, 1, 0)
    assert tok.add_bos is True and tok.add_eos is False
    # The file's eos (<|endoftext|>), then <|end|>, Phi-3's end of turn, by its text.
    assert tok.eos_ids == (n, n + 4)
    assert tok.id_to_token(n + 4) == "<|end|>"


@pytest.mark.parametrize("text", SP_TEXTS + SP_SPECIAL_TEXTS)
def test_spm_encode_and_decode_match_transformers(spm_case, text):
    tok, hf = spm_case.ours, spm_case.hf
    ids = tok.encode(text)
    assert ids == hf(text).input_ids
    assert ids[0] == tok.bos_id
    without = hf(text, add_special_tokens=False).input_ids
    assert tok.encode(text, add_special_tokens=False) == without
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", SP_TEXTS)
def test_spm_matches_sentencepiece(spm_case, text):
    tok, sp = spm_case.ours, spm_case.sp
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_spm_special_tokens_get_a_space_prefix_after_them(spm_case):
    # llama.cpp (and transformers) put "▁" before each run of text that follows a special token.
    tok = spm_case.ours
    ids = tok.encode("<|user|>\nHi", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids[:3]] == ["<|user|>", "▁", "<0x0A>"]


_SP_ALPHABET = st.characters(exclude_categories=("Cs",), exclude_characters="\u2581")


@settings(max_examples=60, deadline=None)
@given(text=st.text(_SP_ALPHABET, max_size=40))
def test_spm_random_unicode_matches_references(spm_case, text):
    # "▁" is left out: SentencePiece reads it as a space, so it cannot round-trip.
    tok = spm_case.ours
    ids = tok.encode(text)
    assert ids == spm_case.hf(text).input_ids
    assert ids[1:] == spm_case.sp.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == spm_case.hf.decode(ids)


def test_spm_without_space_prefix_matches_sentencepiece(tmp_path):
    # transformers ignores tokenizer.ggml.add_space_prefix, so sentencepiece is the reference.
    sp = _train_sentencepiece(add_dummy_prefix=False)
    path = _write_phi3_gguf(tmp_path / "no-prefix.gguf", sp, add_space_prefix=False)
    tok = Tokenizer.from_metadata(gguf_metadata(path))
    for text in SP_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids) == text


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_spm_chat_template_matches_transformers(spm_case, conversation):
    messages = CONVERSATIONS[conversation]
    ours = spm_case.ours.apply_chat_template(messages)
    theirs = spm_case.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert ours.startswith("<s><|system|>" if conversation == "system+user" else "<s><|user|>")


def test_spm_stream_decoder(spm_case):
    tok = spm_case.ours
    text = "  東京 🙂 and 👍🏽 done"  # emoji are byte-fallback tokens in this vocabulary
    for ids in (tok.encode(text), tok.encode(text, add_special_tokens=False)):
        for skip in (False, True):
            stream = tok.stream_decoder(skip_special_tokens=skip)
            pieces = [stream.push(i) for i in ids] + [stream.flush()]
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
            assert all("\ufffd" not in p for p in pieces)
            assert "" in pieces[:-1]  # the emoji bytes were held back


def test_spm_defaults_follow_llama_cpp(spm_case):
    metadata = dict(spm_case.metadata)
    for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id"):
        del metadata[key]
    tok = Tokenizer.from_metadata(metadata)
    assert tok.add_bos is True and tok.bos_id == 1  # llama.cpp's SentencePiece defaults
    assert tok.encode("Hi")[0] == 1


# -- a Llama-3-style byte-level vocabulary ("llama-bpe") ----------------------------------------

LLAMA3_CORPUS = SP_CORPUS + "I'M SURE THEY'LL SAY IT'S FINE. 123456789 9876543210 007\n" * 3


@pytest.fixture(scope="module")
def llama3_case(tmp_path_factory):
    """A byte-level BPE trained here, written as llama.cpp writes a Llama 3 vocabulary."""
    trained = tokenizers.Tokenizer(tokenizers.models.BPE())
    trained.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(LLAMA3_CORPUS.splitlines(), trainer)
    model = json.loads(trained.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(specials)
    tokens += specials

    path = tmp_path_factory.mktemp("llama3") / "tiny-llama3.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_rope_freq_base(500000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    writer.add_eos_token_id(tokens.index("<|end_of_text|>"))
    # No add_bos_token key: llama.cpp's default for llama-bpe is to add BOS.
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata = gguf_metadata(path)
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return Tokenizer.from_metadata(metadata), hf, tokens


def test_llama_bpe_matches_transformers(llama3_case):
    tok, hf, tokens = llama3_case
    assert tok.add_bos is True and tok.pre == "llama-bpe"
    names = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")
    bos, eos, eot, eom = (tokens.index(t) for t in names)
    assert (tok.bos_id, tok.eos_ids) == (bos, (eos, eot, eom))
    # Not "<|endoftext|>": transformers' GPT-2 class adds it as a special token of its own (id 592,
    # past this vocabulary) when the vocabulary lacks it.
    texts = [t for t in TEXTS if "<|endoftext|>" not in t]
    for text in texts + ["I'M SURE THEY'LL 1234567 x", "<|begin_of_text|>hi<|eot_id|>"]:
        ids = tok.encode(text)
        # transformers adds no BOS for this file (it reads only the explicit key); llama.cpp does.
        assert ids[0] == bos
        assert ids[1:] == hf(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids[1:]) == hf.decode(ids[1:])


# -- errors --------------------------------------------------------------------------------------


def _tiny_metadata(**overrides) -> dict:
    tokens = ["a", "b", "ab", "<s>", "</s>"]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1, 1, 1, 3, 3],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 3,
        "tokenizer.ggml.eos_token_id": 4,
    }
    metadata.update(overrides)
    return {k: v for k, v in metadata.items() if v is not None}


def test_tiny_byte_level_vocabulary():
    tok = Tokenizer.from_metadata(_tiny_metadata())
    assert tok.encode("abab<s>") == [2, 2, 3]
    assert tok.decode([2, 3, 0]) == "ab<s>a"
    assert tok.decode([2, 3, 0], skip_special_tokens=True) == "aba"
    assert tok.eos_ids == (4,) and tok.add_bos is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tokenizer.ggml.model": "bert"}, r"'bert'.*supported: gpt2, llama"),
        ({"tokenizer.ggml.model": None}, r"no tokenizer.ggml.model.*supported: gpt2, llama"),
        ({"tokenizer.ggml.tokens": None}, r"tokenizer.ggml.tokens, which is missing"),
        ({"tokenizer.ggml.merges": None}, r"tokenizer.ggml.merges, which is missing"),
        ({"tokenizer.ggml.model": "llama"}, r"tokenizer.ggml.scores, which is missing"),
        ({"tokenizer.ggml.pre": "made-up"}, r"'made-up' is not supported.*llama-bpe.*smollm"),
        ({"tokenizer.ggml.eos_token_id": 9}, r"eos_token_id = 9 is outside.*vocab_size 5"),
        ({"tokenizer.ggml.token_type": [1, 1]}, r"token_type has 2 entries"),
        (
            {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": None},
            r"add_bos_token is set but the file has no tokenizer.ggml.bos_token_id",
        ),
    ],
)
def test_bad_metadata_raises(overrides, message):
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_metadata(_tiny_metadata(**overrides))


def test_decode_rejects_ids_outside_the_vocabulary():
    tok = Tokenizer.from_metadata(_tiny_metadata())
    for bad in (5, -1, 10**6):
        with pytest.raises(TokenizerError, match=rf"token id {bad} .*vocab_size 5"):
            tok.decode([0, bad])
    with pytest.raises(TokenizerError, match="token id 7"):
        tok.stream_decoder().push(7)


def test_chat_template_errors():
    tok = Tokenizer.from_metadata(_tiny_metadata())
    with pytest.raises(TokenizerError, match="no tokenizer.chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok = Tokenizer.from_metadata(_tiny_metadata(**{"tokenizer.chat_template": PHI3_TEMPLATE}))
    with pytest.raises(TokenizerError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "{}"}])
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<s><|user|>\nhi<|end|>\n<|assistant|>\n"


def test_chat_template_globals_and_sandbox():
    template = (
        "{{ messages | tojson }}|{{ strftime_now('%Y') }}|{{ eos_token }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}!{% endfor %}"
    )
    tok = Tokenizer.from_metadata(_tiny_metadata(**{"tokenizer.chat_template": template}))
    messages = [{"role": "user", "content": "é<>"}, {"role": "user", "content": ""}]
    out = tok.apply_chat_template(messages)
    assert out.startswith('[{"role": "user", "content": "é<>"}, ')
    assert out.endswith(f"|{time.strftime('%Y')}|</s>!")
    evil = "{{ messages.__class__.__mro__ }}"
    tok = Tokenizer.from_metadata(_tiny_metadata(**{"tokenizer.chat_template": evil}))
    with pytest.raises(TokenizerError):
        tok.apply_chat_template([])
