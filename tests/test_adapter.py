"""`LlamaInferenceAdapter`, the one API over every family (the published design, issue 4).

Tiny random checkpoints of each family (tests/hf_to_gguf.py), written as GGUF and loaded
once per module. transformers' greedy generation on the same checkpoint is the reference
for token ids; the host-stepped prefill/decode loop is checked against `generate`'s
on-device loop; seeded sampling against itself. The error cases each check their class,
their message, and that the adapter that refused a call still generates what it did.

Compilation dominates the runtime, so every generation here uses one of a few shapes:
prompts of at most 16 tokens (one prompt bucket), max_tokens 5, batch 1, and two sampler
specs (greedy; temperature with top-k, whose k and temperature are array values).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import jax_adapter
from hf_to_gguf import tiny_hf_model, write_gguf
from jaxllama.engine import steps as engine_steps
from jaxllama.errors import InvalidRequestError
from jaxllama.models import (
    AdapterError,
    AdapterForwardConfig,
    DecodeState,
    ForwardPassFailed,
    InvalidModelType,
    LlamaInferenceAdapter,
    ModelNotLoaded,
    ModelRegistry,
    ModelType,
    UnsupportedOperation,
    load_gguf,
)

PROMPT = [1, 2, 3]  # the design's prompt
N_NEW = 5
# On the qwen2 checkpoint of seed 1 the greedy continuation of PROMPT has no EOS in its
# first N_NEW tokens (checked against transformers below), and that of EOS_PROMPT emits
# EOS (id 2) as its second token.
QWEN_SEED = 1
EOS_PROMPT = [67, 174, 152]
OTHER_PROMPTS = [[5, 17, 42, 99, 7], [250, 3, 3, 3, 3, 3, 3, 9], list(range(40, 56))]


def sampled(seed: int, **kwargs) -> AdapterForwardConfig:
    """The one sampling config shape used here: temperature and top-k on."""
    return AdapterForwardConfig(temperature=kwargs.pop("temperature", 0.9), top_k=kwargs.pop("top_k", 50),
                                seed=seed, **kwargs)


@dataclasses.dataclass
class Tiny:
    hf: torch.nn.Module
    path: object
    adapter: LlamaInferenceAdapter

    def reload(self, **kwargs) -> LlamaInferenceAdapter:
        """A second, independent copy of the model on the device."""
        return LlamaInferenceAdapter.from_model(load_gguf(self.path, dtype=jnp.float32, progress=False), **kwargs)


def _build(tmp_path_factory, arch, **overrides) -> Tiny:
    hf = tiny_hf_model(arch, **overrides)
    path = write_gguf(hf, tmp_path_factory.mktemp(arch) / f"{arch}.gguf")
    adapter = LlamaInferenceAdapter.from_gguf(path, dtype=jnp.float32, progress=False)
    return Tiny(hf, path, adapter)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls are slower with two threads on two busy cores
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Tiny:
    return _build(tmp_path_factory, "qwen2", seed=QWEN_SEED)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory) -> Tiny:
    # Phi-3 with a sliding window (Phi-3-mini's is 2047), shorter than any cache here.
    return _build(tmp_path_factory, "phi3", sliding_window=8)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Tiny:
    return _build(tmp_path_factory, "llama")


def hf_greedy(hf, prompt, n=N_NEW) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0].tolist()


def cut_after_eos(ids, prompt_len, eos) -> list[int]:
    for i in range(prompt_len, len(ids)):
        if ids[i] in eos:
            return ids[: i + 1]
    return ids


@pytest.fixture(scope="module")
def baseline(qwen) -> list[int]:
    """Greedy generate(PROMPT, 5) on the qwen adapter: transformers' 8 ids, no EOS."""
    ref = hf_greedy(qwen.hf, PROMPT)
    assert not set(ref[3:]) & set(qwen.adapter.eos_ids()), "the case must have no EOS"
    out = qwen.adapter.generate(PROMPT, N_NEW)
    assert out == ref
    return out


def host_loop(adapter, prompt, n, config=None) -> list[int]:
    """prompt + up to n tokens by prefill and decode, stopping after an EOS."""
    config = config or AdapterForwardConfig()
    ids, state = adapter.prefill(prompt, config)
    assert ids[:-1] == prompt and isinstance(state, DecodeState)
    eos = set(adapter.eos_ids())
    out = list(ids)
    while len(out) - len(prompt) < n and out[-1] not in eos:
        token, state = adapter.decode(out[-1], state, config.for_decode(state))
        assert isinstance(token, int)
        out.append(token)
    return out


def test_batch_of_a_chunked_prompt_and_short_ones_equals_transformers(qwen):
    """A batch prefills its rows together, a chunk of each a call: a 600-token prompt
    (three chunks: 88, 256, 256 tokens) beside prompts of one chunk, each row's greedy
    tokens equal transformers' for that prompt alone."""
    a = qwen.adapter
    rng = np.random.default_rng(8)
    prompts = [rng.integers(3, a.vocab_size(), 600).tolist(), OTHER_PROMPTS[0], PROMPT]
    out = a.generate(prompts, 6, AdapterForwardConfig(batch_size=3))
    eos = set(a.eos_ids())
    for prompt, got in zip(prompts, out):
        assert got == cut_after_eos(hf_greedy(qwen.hf, prompt, 6), len(prompt), eos)


def test_decode_grows_the_cache_past_its_first_size(qwen):
    """prefill sizes the state for the prompt (256 tokens, 16 pages a row); decoding
    past that grows it (the pool's pages appended) without disturbing what is cached:
    300 host-stepped tokens of a batch of two equal transformers' greedy ones."""
    a, n = qwen.adapter, 300
    prompts = [PROMPT, OTHER_PROMPTS[1]]
    config = AdapterForwardConfig(batch_size=2)
    ids, state = a.prefill(prompts, config)
    first_size = state.spec.max_tokens_per_slot
    out = [list(r) for r in ids]
    for _ in range(n - 1):
        tokens, state = a.decode([[r[-1]] for r in out], state, config.for_decode(state))
        for r, t in zip(out, tokens):
            r.append(t)
    assert first_size == 256 and state.spec.max_tokens_per_slot == 512, "the cache never grew"
    assert state.cache_len == len(prompts[1]) + n - 1
    for prompt, got in zip(prompts, out):
        assert got == hf_greedy(qwen.hf, prompt, n)


# --------------------------------------------------------------------------------------
# model information
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,expected", [("qwen", ModelType.Qwen2_5), ("phi3", ModelType.Phi3),
                                             ("llama", ModelType.Llama3)])
def test_model_info_per_family(request, family, expected):
    tiny = request.getfixturevalue(family)
    a = tiny.adapter
    cfg = tiny.hf.config
    assert a.model_type() == expected
    assert (a.vocab_size(), a.hidden_dim(), a.num_layers()) == (
        cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (300, 64, 2)
    info = a.info()
    assert f"Model type: {expected.name}" in info and "Vocab size: 300" in info and "Layers: 2" in info
    # The family constructors accept their own family and refuse the others.
    ctor = {ModelType.Qwen2_5: LlamaInferenceAdapter.new_qwen, ModelType.Phi3: LlamaInferenceAdapter.new_phi3,
            ModelType.Llama3: LlamaInferenceAdapter.new_llama3}
    for kind, make in ctor.items():
        if kind == expected:
            assert make(a.model).model_type() == expected
        else:
            with pytest.raises(InvalidModelType) as exc:
                make(a.model)
            assert str(exc.value).startswith(f"Invalid model type: {expected.name}")
            assert kind.name in str(exc.value)  # what was expected
            assert isinstance(exc.value, AdapterError)


def test_invalid_model_type_new_phi3_on_qwen(qwen):
    with pytest.raises(InvalidModelType, match=r"^Invalid model type: Qwen2_5 \(expected a Phi3 model\)$"):
        LlamaInferenceAdapter.new_phi3(qwen.adapter.model)
    assert LlamaInferenceAdapter.new_qwen(qwen.adapter.model).model_type() == ModelType.Qwen2_5


@pytest.mark.parametrize("family", ["qwen", "phi3", "llama"])
def test_vram_usage_is_the_bytes_of_the_params(request, family):
    """float32 params: 4 bytes per parameter of the transformers model (tied weights
    once), the sum of the arrays' nbytes; 0 after unload (on a second copy)."""
    tiny = request.getfixturevalue(family)
    leaves = jax.tree_util.tree_leaves(tiny.adapter.model.params)
    n_params = sum(p.numel() for p in tiny.hf.parameters())
    assert tiny.adapter.vram_usage() == sum(x.nbytes for x in leaves) == 4 * n_params > 0
    if family == "qwen":
        copy = tiny.reload()
        assert copy.vram_usage() == tiny.adapter.vram_usage()
        copy_leaves = jax.tree_util.tree_leaves(copy.model.params)
        gone = copy.unload()
        assert copy.vram_usage() == 0 and gone.vram_usage() == 0
        assert all(x.is_deleted() for x in copy_leaves)  # the buffers are really freed
        assert tiny.adapter.vram_usage() == 4 * n_params  # the first copy is untouched
        bf16 = LlamaInferenceAdapter.from_gguf(tiny.path, dtype=jnp.bfloat16, progress=False)
        assert bf16.vram_usage() == 2 * n_params
        bf16.unload()


# --------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------


def test_generate_design_case_has_8_ids(baseline):
    assert len(baseline) == 8 and baseline[:3] == PROMPT


def test_generate_stops_after_gguf_eos(qwen):
    a = qwen.adapter
    gguf_eos = int(a.model.metadata["tokenizer.ggml.eos_token_id"])
    assert gguf_eos in a.eos_ids()
    ref = cut_after_eos(hf_greedy(qwen.hf, EOS_PROMPT), len(EOS_PROMPT), a.eos_ids())
    assert len(ref) < len(EOS_PROMPT) + N_NEW and ref[-1] == gguf_eos  # the case does stop
    assert a.generate(EOS_PROMPT, N_NEW) == ref
    assert host_loop(a, EOS_PROMPT, N_NEW) == ref


def test_greedy_matches_transformers_on_more_prompts(qwen):
    for prompt in OTHER_PROMPTS:
        ref = cut_after_eos(hf_greedy(qwen.hf, prompt), len(prompt), qwen.adapter.eos_ids())
        assert qwen.adapter.generate(prompt, N_NEW) == ref, prompt


def test_prefill_decode_loop_equals_generate_greedy(qwen, baseline):
    assert host_loop(qwen.adapter, PROMPT, N_NEW) == baseline
    for prompt in OTHER_PROMPTS[:2]:
        assert host_loop(qwen.adapter, prompt, N_NEW) == qwen.adapter.generate(prompt, N_NEW)


def test_prefill_decode_loop_equals_generate_sampled(qwen):
    a = qwen.adapter
    for seed in (0, 1, 2):
        for prompt in (PROMPT, OTHER_PROMPTS[0]):
            config = sampled(seed)
            assert host_loop(a, prompt, N_NEW, config) == a.generate(prompt, N_NEW, config), (seed, prompt)


def test_batch_rows_equal_their_single_runs(qwen):
    """A batch row's tokens depend on its prompt and seed only: not on its position, its
    batchmates, or their lengths and stops (one shape: batch 3, sampled)."""
    a = qwen.adapter
    prompts = [PROMPT, OTHER_PROMPTS[0], OTHER_PROMPTS[2]]
    for seed in (0, 1):
        config = sampled(seed, batch_size=3)
        single = [a.generate(p, N_NEW, sampled(seed)) for p in prompts]
        assert a.generate(prompts, N_NEW, config) == single
        assert a.generate(prompts[::-1], N_NEW, config) == single[::-1]


def test_seeded_sampling_is_reproducible_and_seeds_differ(qwen, baseline):
    a = qwen.adapter
    runs = {seed: a.generate(PROMPT, N_NEW, sampled(seed)) for seed in range(4)}
    for seed, out in runs.items():
        assert a.generate(PROMPT, N_NEW, sampled(seed)) == out
    # Four seeds, four different continuations (each of 5 tokens drawn from a top-50 set).
    assert len({tuple(o) for o in runs.values()}) == 4
    assert any(o != baseline for o in runs.values())


def test_top_k_1_is_greedy(qwen, baseline):
    a = qwen.adapter
    for seed in (0, 5):
        assert a.generate(PROMPT, N_NEW, sampled(seed, top_k=1, temperature=1.3)) == baseline
    assert a.generate(OTHER_PROMPTS[0], N_NEW, sampled(3, top_k=1)) == a.generate(OTHER_PROMPTS[0], N_NEW)


def test_numpy_int_max_tokens_is_accepted(qwen, baseline):
    assert qwen.adapter.generate(PROMPT, np.int64(N_NEW)) == baseline


# --------------------------------------------------------------------------------------
# the design's errors
# --------------------------------------------------------------------------------------


def test_model_not_loaded_after_unload(qwen, baseline):
    copy = qwen.reload()
    ids, state = copy.prefill(PROMPT)
    unloaded = copy.unload()
    assert not copy.is_loaded() and not unloaded.is_loaded()
    calls = [
        lambda a: a.generate(PROMPT, N_NEW),
        lambda a: a.prefill(PROMPT),
        lambda a: a.model_type(),
        lambda a: a.vocab_size(),
        lambda a: a.info(),
    ]
    for adapter in (copy, unloaded):
        for call in calls:
            with pytest.raises(ModelNotLoaded, match=r"^Model not loaded"):
                call(adapter)
    with pytest.raises(ModelNotLoaded, match=r"^Model not loaded$"):  # the design's exact message
        unloaded.generate(PROMPT, N_NEW)
    with pytest.raises(ModelNotLoaded):
        copy.decode(ids[-1], state)
    assert qwen.adapter.generate(PROMPT, N_NEW) == baseline


def test_unsupported_operation_pallas_with_sliding_window(phi3):
    """The Pallas kernels have no sliding window: with a cache longer than the window the
    adapter says so instead of attending outside it."""
    a = dataclasses.replace(phi3.adapter, attention_impl="pallas_interpret")
    for call in (lambda: a.generate(PROMPT, N_NEW), lambda: a.prefill(PROMPT)):
        with pytest.raises(UnsupportedOperation) as exc:
            call()
        msg = str(exc.value)
        assert msg.startswith("Unsupported operation for model type: Phi3"), msg
        assert "sliding window" in msg and "'xla'" in msg
        assert isinstance(exc.value, AdapterError)


def test_unsupported_operation_names_qwen(qwen, baseline):
    """The same refusal for a Qwen2.5 config with a window names Qwen2_5."""
    model = qwen.adapter.model
    windowed = dataclasses.replace(model, config=dataclasses.replace(model.config, sliding_window=4))
    a = LlamaInferenceAdapter.from_model(windowed, attention_impl="pallas_interpret")
    with pytest.raises(UnsupportedOperation, match=r"^Unsupported operation for model type: Qwen2_5"):
        a.generate(PROMPT, N_NEW)
    assert qwen.adapter.generate(PROMPT, N_NEW) == baseline


@pytest.mark.parametrize("target,call", [("prefill_rows", "generate"), ("insert", "generate"),
                                         ("decode", "generate"), ("decode", "decode"),
                                         ("prefill_rows", "stream")])
def test_forward_pass_failed_wraps_runtime_errors(qwen, baseline, monkeypatch, target, call):
    """A runtime error in any engine step the adapter runs is a ForwardPassFailed, and
    the adapter still works after it."""
    def boom(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1.00GiB")

    a = qwen.adapter
    ids, state = a.prefill(PROMPT)  # before the patch
    monkeypatch.setattr(engine_steps, target, boom)
    call = {"generate": lambda: a.generate(PROMPT, N_NEW),
            "stream": lambda: list(a.stream(PROMPT, N_NEW)),
            "decode": lambda: a.decode(ids[-1], state)}[call]
    with pytest.raises(ForwardPassFailed) as exc:
        call()
    assert str(exc.value) == ("Forward pass failed: JaxRuntimeError: RESOURCE_EXHAUSTED: "
                              "Out of memory allocating 1.00GiB")
    assert isinstance(exc.value.__cause__, jax.errors.JaxRuntimeError)
    monkeypatch.undo()
    assert a.generate(PROMPT, N_NEW) == baseline


# --------------------------------------------------------------------------------------
# AdapterForwardConfig validation and input checking
# --------------------------------------------------------------------------------------

BAD_FIELDS = [
    ("batch_size", 0), ("batch_size", 2),
    ("seq_len", 4), ("seq_len", 2),
    ("cache_len", 5),
    ("temperature", -0.5), ("temperature", math.nan), ("temperature", math.inf),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", math.nan),
    ("top_k", -1), ("top_k", 2.5),
    ("min_p", -0.1), ("min_p", 1.0), ("min_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.2), ("repetition_penalty", math.nan),
    ("seed", -1), ("seed", 2**32),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v}" for f, v in BAD_FIELDS])
def test_config_field_disagreement_names_the_field(qwen, baseline, field, value):
    a = qwen.adapter
    config = dataclasses.replace(AdapterForwardConfig(), **{field: value})
    for call in (lambda: a.generate(PROMPT, N_NEW, config), lambda: a.prefill(PROMPT, config)):
        with pytest.raises(InvalidRequestError, match=rf"AdapterForwardConfig\.{field} is "):
            call()
    assert a.generate(PROMPT, N_NEW) == baseline


def test_config_matching_the_call_is_accepted(qwen, baseline):
    full = AdapterForwardConfig(is_prefill=True, batch_size=1, seq_len=3, cache_len=0, temperature=0.0, seed=42)
    assert qwen.adapter.generate(PROMPT, N_NEW, full) == baseline


def test_decode_config_checks(qwen, baseline):
    a = qwen.adapter
    ids, state = a.prefill(PROMPT)
    good = AdapterForwardConfig().for_decode(state)
    assert (good.is_prefill, good.seq_len, good.cache_len) == (False, 1, len(PROMPT))
    bad = {
        "is_prefill": AdapterForwardConfig(),  # a prefill config passed to decode
        "cache_len": dataclasses.replace(good, cache_len=len(PROMPT) + 1),
        "seq_len": dataclasses.replace(good, seq_len=2),
        "batch_size": dataclasses.replace(good, batch_size=2),
        "temperature": dataclasses.replace(good, temperature=-1.0),
    }
    for field, config in bad.items():
        with pytest.raises(InvalidRequestError, match=rf"AdapterForwardConfig\.{field} is "):
            a.decode(ids[-1], state, config)
    # Refusals leave the state usable: the loop continues exactly as generate's.
    out = list(ids)
    while len(out) < len(baseline):
        token, state = a.decode(out[-1], state, AdapterForwardConfig().for_decode(state))
        out.append(token)
    assert out == baseline


def test_state_from_another_adapter_is_refused(qwen, baseline):
    a = qwen.adapter
    twin = LlamaInferenceAdapter.from_model(a.model)  # same weights, another adapter
    ids, state = a.prefill(PROMPT)
    with pytest.raises(InvalidRequestError, match="another adapter"):
        twin.decode(ids[-1], state)
    with pytest.raises(InvalidRequestError, match="DecodeState"):
        a.decode(ids[-1], {"cache": None})
    token, _ = a.decode(ids[-1], state)
    assert token == baseline[len(PROMPT) + 1]


def test_consumed_state_is_refused(qwen):
    a = qwen.adapter
    ids, state = a.prefill(PROMPT)
    a.decode(ids[-1], state)
    with pytest.raises(InvalidRequestError, match="consumed"):
        a.decode(ids[-1], state)


def test_bad_requests_raise_invalid_request(qwen, baseline):
    a = qwen.adapter
    ctx = a.config.context_length
    cases = {
        "token id out of range": lambda: a.generate([1, 300, 3], N_NEW),
        "negative token id": lambda: a.generate([1, -1, 3], N_NEW),
        "float token": lambda: a.generate([1, 2.0, 3], N_NEW),
        "bool token": lambda: a.generate([True, 2], N_NEW),
        "string prompt": lambda: a.generate("hello", N_NEW),
        "empty prompt": lambda: a.generate([], N_NEW),
        "empty row": lambda: a.generate([[]], N_NEW),
        "max_tokens 0": lambda: a.generate(PROMPT, 0),
        "max_tokens -3": lambda: a.generate(PROMPT, -3),
        "max_tokens float": lambda: a.generate(PROMPT, 5.0),
        "beyond context": lambda: a.generate([5] * (ctx - 4), N_NEW),
        "prefill out of range": lambda: a.prefill([1, 2, 300]),
        "prefill empty": lambda: a.prefill([]),
        "prefill beyond context": lambda: a.prefill([5] * ctx),
        "decode out of range": lambda: a.decode(300, None),
        "decode negative": lambda: a.decode(-1, None),
        "decode two tokens": lambda: a.decode([4, 5], None),
    }
    for name, call in cases.items():
        with pytest.raises(InvalidRequestError) as exc:
            call()
        assert isinstance(exc.value, AdapterError), name
    with pytest.raises(InvalidRequestError, match="out of range; expected 0 <= id < vocab size 300"):
        a.generate([1, 300, 3], N_NEW)
    with pytest.raises(InvalidRequestError, match=rf"exceeds the model's context length {ctx}"):
        a.generate([5] * (ctx - 4), N_NEW)
    # Exactly at the context length is allowed (checked without running it).
    a._check_room(ctx - N_NEW, N_NEW)
    assert a.generate(PROMPT, N_NEW) == baseline


def test_prompt_forms_agree(qwen, baseline):
    a = qwen.adapter
    assert a.generate(np.asarray(PROMPT, np.int64), N_NEW) == baseline
    assert a.generate([np.int32(t) for t in PROMPT], N_NEW) == baseline
    assert a.generate(jnp.asarray(PROMPT), N_NEW) == baseline


# --------------------------------------------------------------------------------------
# several models, several threads
# --------------------------------------------------------------------------------------


def test_registry_two_models_at_once(qwen, llama, baseline):
    llama_ref = cut_after_eos(hf_greedy(llama.hf, PROMPT), len(PROMPT), llama.adapter.eos_ids())
    qwen_copy = qwen.reload()
    reg = ModelRegistry()
    reg.register("qwen", qwen_copy)
    reg.register("llama", llama.adapter)
    assert reg.list_models() == ["llama", "qwen"]
    assert reg.get("phi3") is None
    with pytest.raises(InvalidRequestError, match="no model named 'phi3'"):
        reg["phi3"]
    with pytest.raises(InvalidRequestError):
        reg.register("x", object())
    # Switch back and forth: each gives its own model's tokens.
    for name in ("qwen", "llama", "qwen", "llama"):
        expected = baseline if name == "qwen" else llama_ref
        assert reg.get(name).generate(PROMPT, N_NEW) == expected, name
    assert reg.get("qwen").model_type() == ModelType.Qwen2_5
    assert reg["llama"].model_type() == ModelType.Llama3
    # Unloading one frees it and leaves the other working.
    held = reg.get("qwen").vram_usage()
    assert held > 0
    reg.unload("qwen")
    assert reg.get("qwen") is None and reg.list_models() == ["llama"]
    assert qwen_copy.vram_usage() == 0
    with pytest.raises(ModelNotLoaded):
        qwen_copy.generate(PROMPT, N_NEW)
    assert reg.get("llama").generate(PROMPT, N_NEW) == llama_ref
    assert qwen.adapter.generate(PROMPT, N_NEW) == baseline  # a separate copy: untouched
    with pytest.raises(InvalidRequestError):
        reg.unload("qwen")
    assert reg.unregister("llama") is llama.adapter and reg.list_models() == []
    assert llama.adapter.is_loaded()  # unregister does not free


def test_threads_sharing_one_adapter_match_sequential(qwen):
    a = qwen.adapter
    jobs = [(prompt, config) for prompt in (PROMPT, OTHER_PROMPTS[0], EOS_PROMPT, OTHER_PROMPTS[1])
            for config in (AdapterForwardConfig(), sampled(11))]
    run = lambda job: a.generate(job[0], N_NEW, job[1])  # noqa: E731
    sequential = [run(job) for job in jobs]
    for _ in range(2):
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            assert list(pool.map(run, jobs)) == sequential

    def loop(job):
        return host_loop(a, job[0], N_NEW, job[1])

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(loop, jobs)) == sequential


# --------------------------------------------------------------------------------------
# the real SmolLM2 file
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_seeded_sampling_and_loop_equal_generate():
    a = jax_adapter("smollm2-135m-instruct")
    prompt = a.tokenizer.encode("The capital of France is")
    n = 16
    config = AdapterForwardConfig(temperature=0.8, top_p=0.95, seed=1234)
    start = time.perf_counter()
    first = a.generate(prompt, n, config)
    again = a.generate(prompt, n, config)
    other = a.generate(prompt, n, dataclasses.replace(config, seed=4321))
    loop = host_loop(a, prompt, n, config)
    print(f"smollm2: {time.perf_counter() - start:.1f} s; sampled {a.tokenizer.decode(first[len(prompt):])!r}")
    assert first == again
    assert len(first) == len(prompt) + n or first[-1] in a.eos_ids()
    assert other != first
    assert loop == first
