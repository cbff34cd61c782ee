"""Only the library's errors leave public calls (a property test over the public API).

Every public method of the adapter, `AdapterForwardConfig`, `ModelRegistry`, the
tokenizer and its stream decoder, the sampling parameters, `qlinear` and the kernels'
public functions, called with arguments drawn from a wide space (ints negative and
huge, NaN and infinite floats, strings, bytes, None, wrong containers, empty and ragged
lists, out-of-range token ids, consumed or foreign decoding states), either returns or
raises a `JaxLlamaError`. After each example the adapter still generates what it did
before.

Kept fast: one tiny random model (tests/hf_to_gguf.py), valid prompts of at most 16
tokens (one prompt bucket) and max_tokens <= 3 (one cache bucket), valid configs from a
few sampler specs, so the valid draws reuse a handful of compilations.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hf_to_gguf import tiny_hf_model, write_gguf
from jaxllama.errors import JaxLlamaError
from jaxllama.models import AdapterForwardConfig, DecodeState, LlamaInferenceAdapter, ModelRegistry
from jaxllama.pallas.decode_attention import decode_attention, decode_attention_reference
from jaxllama.pallas.flash_attention import flash_attention, flash_attention_reference
from jaxllama.pallas.quant_matmul import quant_matmul, quant_matmul_reference
from jaxllama.quant import qlinear, quantize
from jaxllama.sampling import SamplingParams, spec_for

PROMPT = [5, 17, 42]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ the argument space
ints = st.one_of(st.integers(-3, 20), st.integers(min_value=-(2**70), max_value=2**70),
                 st.sampled_from([0, 1, -1, 2**31, 2**63, -(2**63)]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, 0.5, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e300]))
scalars = st.one_of(ints, floats, st.booleans(), st.none(), st.text(max_size=5), st.binary(max_size=5),
                    st.just(object()), st.just(np.int64(3)), st.just(np.float32(0.5)))


def token_ids(vocab: int):
    """Valid ids mostly, with out-of-range and non-integer ones mixed in."""
    good = st.integers(0, vocab - 1)
    return st.one_of(good, good, good, st.integers(-5, -1), st.integers(vocab, vocab + 5), scalars)


def id_rows(vocab: int):
    row = st.lists(token_ids(vocab), min_size=0, max_size=16)
    valid_row = st.lists(st.integers(0, vocab - 1), min_size=2, max_size=16)
    valid_batch = st.lists(valid_row, min_size=1, max_size=2)  # ragged rows are valid
    return st.one_of(
        valid_row, valid_batch, valid_row, valid_batch,  # about half the draws are valid
        row,
        st.lists(row, min_size=0, max_size=2),  # batches, ragged and empty included
        scalars,
        st.lists(scalars, max_size=3),
        st.builds(lambda n: np.arange(n, dtype=np.int32), st.integers(0, 16)),
        st.builds(lambda n: np.full((2, n), 0.5), st.integers(0, 4)),
        st.dictionaries(st.text(max_size=3), scalars, max_size=2),
    )


anything = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=3), scalars,
                                                                             max_size=2))
max_tokens = st.one_of(st.integers(1, 3), st.integers(1, 3), scalars)
FIELDS = [f.name for f in AdapterForwardConfig.__dataclass_fields__.values()]
VALID_CONFIGS = [None, AdapterForwardConfig(), AdapterForwardConfig(temperature=0.9, top_k=5, seed=3)]


def configs():
    """A valid config, or the default with one field set to anything, or a non-config."""
    one_field = st.builds(lambda f, v: (f, v), st.sampled_from(FIELDS), scalars)
    return st.one_of(st.sampled_from(VALID_CONFIGS), one_field.map(_config_or_value), anything)


def _config_or_value(field_value):
    field, value = field_value
    try:
        return AdapterForwardConfig(**{field: value})
    except JaxLlamaError:
        return field_value


def returns_or_library_error(call):
    """Run `call` (draining an iterator it returns); return its result, or None when it
    raised a JaxLlamaError. Any other exception fails the test."""
    try:
        result = call()
        if hasattr(result, "__next__"):
            result = list(result)
        return result
    except JaxLlamaError:
        return None


# ------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = write_gguf(tiny_hf_model("qwen2"), tmp_path_factory.mktemp("api") / "qwen2.gguf")
    return LlamaInferenceAdapter.from_gguf(path, dtype=jnp.float32, progress=False)


@pytest.fixture(scope="module")
def other(adapter):
    """A second adapter over the same model (its states are foreign to `adapter`)."""
    return LlamaInferenceAdapter.from_model(adapter.model)


@pytest.fixture(scope="module")
def baseline(adapter):
    return adapter.generate(PROMPT, 3)


def _still_works(adapter, baseline):
    assert adapter.generate(PROMPT, 3) == baseline


# ------------------------------------------------------------------ the adapter
@SETTINGS
@given(data=st.data())
def test_generation_calls(adapter, baseline, data):
    vocab = adapter.vocab_size()
    ids = data.draw(id_rows(vocab), "ids")
    n = data.draw(max_tokens, "max_tokens")
    config = data.draw(configs(), "config")
    method = data.draw(st.sampled_from(["generate", "prefill", "stream", "score", "score_top"]),
                       "method")
    call = {
        "generate": lambda: adapter.generate(ids, n, config),
        "prefill": lambda: adapter.prefill(ids, config),
        "stream": lambda: adapter.stream(ids, n, config),
        "score": lambda: adapter.score(ids, batch_size=data.draw(st.one_of(st.integers(1, 3), scalars))),
        "score_top": lambda: adapter.score_top(ids, data.draw(st.one_of(st.integers(-1, 3), ints,
                                                                        scalars), "top")),
    }[method]
    result = returns_or_library_error(call)
    event(f"{method}: {'refused' if result is None else 'returned'}")
    if method == "generate" and result is not None:
        rows = result if isinstance(result[0], list) else [result]
        assert all(0 <= t < vocab for r in rows for t in r)
    _still_works(adapter, baseline)


@SETTINGS
@given(data=st.data())
def test_decode_calls(adapter, other, baseline, data):
    vocab = adapter.vocab_size()
    kind = data.draw(st.sampled_from(["fresh", "consumed", "foreign", "batch2", "anything"]), "state")
    state = None
    if kind in ("fresh", "consumed", "batch2"):
        prompt = [PROMPT, PROMPT] if kind == "batch2" else PROMPT
        _, state = adapter.prefill(prompt)
        if kind == "consumed":
            adapter.decode([1, 1] if kind == "batch2" else 1, state)
    elif kind == "foreign":
        _, state = other.prefill(PROMPT)
    else:
        state = data.draw(anything, "state value")
    token = data.draw(id_rows(vocab), "input_id")
    config = data.draw(st.one_of(st.none(), configs(),
                                 st.just("for_decode")), "config")
    if config == "for_decode" and isinstance(state, DecodeState):
        config = returns_or_library_error(lambda: AdapterForwardConfig(is_prefill=False).for_decode(state))
    result = returns_or_library_error(lambda: adapter.decode(token, state, config))
    event(f"decode with a {kind} state: {'refused' if result is None else 'returned'}")
    _still_works(adapter, baseline)


@SETTINGS
@given(data=st.data())
def test_text_calls(adapter, baseline, data):
    text = data.draw(st.one_of(st.text(max_size=12), st.binary(max_size=12), anything), "text")
    messages = data.draw(st.one_of(
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                        "content": st.text(max_size=8)}), min_size=0, max_size=2),
        st.lists(st.dictionaries(st.text(max_size=4), anything, max_size=2), max_size=2),
        anything), "messages")
    ids = data.draw(id_rows(adapter.vocab_size()), "ids")
    n = data.draw(max_tokens, "max_tokens")
    method = data.draw(st.sampled_from(["encode", "decode_text", "apply_chat_template", "prompt_ids",
                                        "generate_text", "stream_text", "loglikelihood", "perplexity"]))
    call = {
        "encode": lambda: adapter.encode(text, add_special_tokens=data.draw(anything)),
        "decode_text": lambda: adapter.decode_text(ids, skip_special_tokens=data.draw(anything)),
        "apply_chat_template": lambda: adapter.apply_chat_template(messages, data.draw(anything)),
        "prompt_ids": lambda: adapter.prompt_ids(data.draw(st.sampled_from([text, messages]))),
        "generate_text": lambda: adapter.generate_text(data.draw(st.sampled_from([text, messages])), n),
        "stream_text": lambda: adapter.stream_text(data.draw(st.sampled_from([text, messages])), n),
        "loglikelihood": lambda: adapter.loglikelihood(data.draw(st.sampled_from([text, ids])),
                                                       data.draw(st.sampled_from([text, ids]))),
        "perplexity": lambda: adapter.perplexity(ids, context=data.draw(st.one_of(st.none(), ints, scalars)),
                                                 stride=data.draw(st.one_of(st.none(), ints, scalars))),
    }[method]
    event(f"{method}: {'refused' if returns_or_library_error(call) is None else 'returned'}")
    _still_works(adapter, baseline)


@SETTINGS
@given(data=st.data())
def test_information_and_registry(adapter, baseline, data):
    registry = ModelRegistry()
    name = data.draw(anything, "name")
    value = data.draw(st.one_of(st.just(adapter), anything), "adapter")
    for call in (lambda: registry.register(name, value), lambda: registry.get(name),
                 lambda: registry[name], lambda: registry.list_models(),
                 lambda: registry.unregister(name)):
        returns_or_library_error(call)
    # unload(name) only for a name that is not our adapter's (it would free the model).
    returns_or_library_error(lambda: registry.unload(name))
    for method in ("info", "vocab_size", "hidden_dim", "num_layers", "vram_usage", "eos_ids", "model_type",
                   "is_loaded"):
        assert returns_or_library_error(getattr(adapter, method)) is not None
    returns_or_library_error(lambda: LlamaInferenceAdapter.from_model(data.draw(anything)))
    returns_or_library_error(lambda: LlamaInferenceAdapter(model=data.draw(anything)))
    returns_or_library_error(lambda: LlamaInferenceAdapter.from_model(
        adapter.model, attention_impl=data.draw(anything), matmul_impl=data.draw(anything)))
    returns_or_library_error(lambda: LlamaInferenceAdapter.from_gguf(data.draw(anything), progress=False))
    _still_works(adapter, baseline)


# ------------------------------------------------------------------ configs, sampling, tokenizer
@SETTINGS
@given(fields=st.dictionaries(st.sampled_from(FIELDS), scalars, max_size=4))
def test_config_and_sampling(fields):
    config = returns_or_library_error(lambda: AdapterForwardConfig(**fields))
    if config is not None:
        returns_or_library_error(config.validate)
        returns_or_library_error(config.sampler)
        returns_or_library_error(lambda: config.for_decode(fields.get("seed")))
    values = [fields.get(k, d) for k, d in (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0),
                                             ("min_p", 0.0), ("repetition_penalty", 1.0))]
    returns_or_library_error(lambda: SamplingParams.create(*values))
    returns_or_library_error(lambda: spec_for(*values))


@SETTINGS
@given(data=st.data())
def test_tokenizer(adapter, data):
    tok = adapter.tokenizer
    value = data.draw(st.one_of(st.text(max_size=8), id_rows(adapter.vocab_size()), anything))
    flag = data.draw(anything)
    for call in (lambda: tok.encode(value, add_special_tokens=flag),
                 lambda: tok.decode(value, skip_special_tokens=flag),
                 lambda: tok.id_to_token(value), lambda: tok.token_to_id(value),
                 lambda: tok.apply_chat_template(value, add_generation_prompt=flag)):
        returns_or_library_error(call)
    decoder = tok.stream_decoder(skip_special_tokens=bool(flag) if isinstance(flag, bool) else False)
    for piece in data.draw(st.lists(token_ids(adapter.vocab_size()), max_size=4)):
        returns_or_library_error(lambda: decoder.push(piece))
    returns_or_library_error(decoder.flush)


# ------------------------------------------------------------------ qlinear and the kernels
def _arrays(shapes, dtype=jnp.float32):
    return st.sampled_from(shapes).map(lambda s: jnp.ones(s, dtype))


@SETTINGS
@given(data=st.data())
def test_qlinear_and_quant_matmul(data):
    w = quantize(np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32), "int8")
    x = data.draw(st.one_of(_arrays([(2, 64), (64,), (2, 63), (0, 64), ()]), anything,
                            st.just(jnp.ones((2, 64), jnp.int32))), "x")
    weight = data.draw(st.one_of(st.just(w), _arrays([(16, 64), (16,)]), anything), "w")
    impl = data.draw(st.one_of(st.sampled_from(["xla", "pallas_interpret", "pallas", "cudnn"]), anything))
    returns_or_library_error(lambda: qlinear(x, weight, impl=impl))
    for kernel in (quant_matmul, quant_matmul_reference):
        returns_or_library_error(lambda: kernel(x, weight, interpret=True))


@SETTINGS
@given(data=st.data())
def test_attention_kernels(data):
    q4 = data.draw(st.one_of(_arrays([(1, 3, 4, 16), (1, 3, 3, 16), (2, 3, 4, 16), (1, 3, 4)]), anything))
    k4 = data.draw(st.one_of(_arrays([(1, 2, 20, 16), (1, 2, 20, 8), (1, 2, 20)]), anything))
    lengths = data.draw(st.one_of(st.sampled_from([jnp.asarray([5]), jnp.asarray([5, 6]), jnp.asarray(3)]),
                                  anything))
    # A few scales only: each distinct static value is another interpreter compilation.
    scale = data.draw(st.sampled_from([0.25, 0.25, math.nan, math.inf, -1.0, "x", None, [0.25], b""]))
    for call in (
        lambda: flash_attention(q4, k4, k4, lengths, lengths, sm_scale=scale, interpret=True),
        lambda: flash_attention_reference(q4, k4, k4, lengths, lengths, sm_scale=scale),
        lambda: decode_attention(q4[:, 0] if hasattr(q4, "ndim") and q4.ndim == 4 else q4, k4, k4, lengths,
                                 sm_scale=scale, interpret=True),
        lambda: decode_attention_reference(q4, k4, k4, lengths, sm_scale=scale),
        lambda: flash_attention(q4, k4, k4, lengths, lengths, sm_scale=0.25, interpret=False),
    ):
        returns_or_library_error(call)
