"""`LlamaInferenceAdapter`: the one API over every family, after the published design.

The adapter is a frozen dataclass holding a loaded model; it picks the model's functions
from `MODEL_FUNCTIONS`, a table keyed by `ModelType`, so calling code never asks which
family it drives. Being immutable, decoding state is explicit: `prefill` returns the
prompt plus the first sampled token and a `DecodeState` (an engine state: the paged KV
cache, each row's sampling settings, seed and step) that `decode` takes and returns. One
adapter may be shared between threads: every call works on its own state.

`prefill`, `decode`, `generate` and `stream` run the serving engine's jitted steps
(`jaxllama.engine.steps`: prefill_chunk, insert, decode) over an engine state of their
own, one decode slot per row: the adapter and `jaxllama.engine.Engine` share one decode
implementation, so a request's tokens are the same through either. Scoring runs the
model's forward over whole sequences (`jaxllama.generation`).

Which attention and quantized matmul run is decided once, when the adapter is made, by
`jaxllama.backend.choose` (the adapter's `policy`); a request that cannot run here is an
InvalidRequestError then, not at the first call. Public methods return or raise a
`jaxllama.errors.JaxLlamaError`.

Shapes are bucketed so that varied requests reuse compilations: prompt chunks are padded
to a power of two (16 to 256 tokens; longer prompts run in 256-token chunks), rows to a
power of two of slots, and caches to a power of two of tokens (at least 256, capped at
the context length), held in 16-token pages.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxllama import backend, generation, hub
from jaxllama.backend import BackendPolicy
from jaxllama.engine import steps
from jaxllama.engine.spec import EngineSpec, EngineState, SlotRequest
from jaxllama.errors import (
    AdapterError,
    JaxLlamaError,
    ForwardPassFailed,
    InvalidModelType,
    InvalidRequestError,
    ModelNotLoaded,
    UnsupportedOperation,
)
from jaxllama.models import transformer
from jaxllama.models.config import ModelConfig, ModelType
from jaxllama.models.transformer import KVCache
from jaxllama.models.weights import LoadedModel, default_weights, load_gguf
from jaxllama.sampling import SamplingParams, spec_for
from jaxllama.sharding import ShardingPlan
from jaxllama.sharding import to_host as _host

__all__ = [
    "AdapterError", "AdapterForwardConfig", "DecodeState", "ForwardPassFailed", "InvalidModelType",
    "LlamaInferenceAdapter", "ModelNotLoaded", "ModelRegistry", "ModelType", "UnsupportedOperation",
]

MIN_PROMPT_BUCKET = 16
# Smallest cache: decode reads every slot, but below a few hundred slots the step costs the
# same on a CPU and one size serves most short requests without another compilation.
MIN_CACHE_BUCKET = 256
# Packed scoring: rows are at least this wide (short requests share rows; below this a
# CPU step costs about the same), and one call holds at most this many tokens (its
# logits are tokens x vocab float32: 2048 x 49152 is 400 MB).
MIN_PACK_WIDTH = 256
PACK_TOKENS_PER_CALL = 2048
# Packed scoring's default on a CPU (scan_layers None) runs the layers as a lax.scan,
# which compiles ~3 s faster than the 30 unrolled SmolLM2 layers but scores ~10% slower
# (benchmarks/RESULTS.md, "Evaluation from a cold start"). Past this many padded row
# tokens (~40 s of scoring on the 2-core CPU, when the scan's extra ~10% has cost about
# what compiling the unrolled program costs) the adapter switches to the unrolled one:
# a long evaluation then runs at the unrolled speed, a short one never compiles it.
SCAN_ROW_TOKENS = 16384
# Decoding through the engine's steps: tokens per page, the prompt chunk lengths (the
# last is the chunk a long prompt is run in), and `generate`'s decode steps per dispatch.
PAGE_SIZE = 16
PREFILL_BUCKETS = (16, 32, 64, 128, 256)
DECODE_STEPS = 8
# max_tokens of a slot `prefill` starts: no limit (the caller stops decoding).
NO_LIMIT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class ModelFunctions:
    forward: Callable  # transformer.forward signature


@dataclasses.dataclass(frozen=True)
class _OnMesh:
    """A family's forward with a sharding plan bound: hashable by value, so it is one
    static argument of the jitted steps (a functools.partial would recompile each call)."""

    forward: Callable
    plan: ShardingPlan

    def __call__(self, *args, **kwargs):
        return self.forward(*args, shard=self.plan, **kwargs)


# The table the adapter dispatches on. Every family runs the one transformer today; a
# family with its own block would register its own forward here.
MODEL_FUNCTIONS: dict[ModelType, ModelFunctions] = {
    model_type: ModelFunctions(forward=transformer.forward) for model_type in ModelType
}


@dataclasses.dataclass(frozen=True)
class AdapterForwardConfig:
    """Per-call settings, with the design's fields plus the usual sampling filters.

    `seq_len`, `cache_len` and `batch_size` are checked against the call when given
    (`seq_len`: the longest prompt; `cache_len`: the tokens already in the state's
    cache, for `decode`). `temperature == 0` is greedy; `seed` makes sampling repeatable.
    `top_k = 0`, `top_p = 1`, `min_p = 0` and `repetition_penalty = 1` are off.
    """

    is_prefill: bool = True
    batch_size: int = 1
    seq_len: int | None = None
    cache_len: int | None = None
    temperature: float = 0.0
    seed: int = 0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        def bad(field, value, expected):
            raise InvalidRequestError(f"AdapterForwardConfig.{field} is {value!r}, expected {expected}")

        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad("batch_size", self.batch_size, "an integer >= 1")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            bad("temperature", self.temperature, "a finite number >= 0 (0 is greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0 (0 is off)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", self.top_p, "a number in (0, 1] (1 is off)")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1):
            bad("min_p", self.min_p, "a number in [0, 1) (0 is off)")
        if not (isinstance(self.repetition_penalty, (int, float))
                and math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            bad("repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 is off)")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            bad("seed", self.seed, "an integer in [0, 2**32)")

    def for_decode(self, state: "DecodeState") -> "AdapterForwardConfig":
        """The config for the next `decode` on `state` (is_prefill False, cache_len set)."""
        if not isinstance(state, DecodeState):
            raise InvalidRequestError(f"for_decode takes a DecodeState from prefill, got {type(state).__name__}")
        return dataclasses.replace(self, is_prefill=False, seq_len=1, cache_len=state.cache_len)

    def sampler(self):
        """(SamplerSpec, SamplingParams) for these settings; InvalidRequestError if invalid."""
        self.validate()
        spec = spec_for(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)
        params = SamplingParams.create(
            temperature=self.temperature if self.temperature > 0 else 1.0, top_k=self.top_k,
            top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
        )
        return spec, params


@struct.dataclass
class DecodeState:
    """What `decode` needs to continue: the engine state the prompt was run into (one
    decode slot per row, its pages, its sampling settings, seed and step count) and the
    engine description it was made for (static)."""

    engine: EngineState
    spec: EngineSpec = struct.field(pytree_node=False)
    rows: int = struct.field(pytree_node=False)  # the caller's rows: slots [0, rows)
    owner: int = struct.field(pytree_node=False)

    @property
    def cache_len(self) -> int:
        """Tokens in the cache (the longest row's, for a batch)."""
        self.check_live()
        return int(np.max(_host(self.engine.lengths)[: self.rows]))

    def check_live(self) -> None:
        if self.engine.lengths.is_deleted():
            raise InvalidRequestError(
                "this DecodeState was consumed by an earlier decode (its cache was donated); "
                "pass the state that decode returned"
            )

    @property
    def batch_size(self) -> int:
        return self.rows


def _as_text(text) -> str:
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(f"text is not valid UTF-8: {exc}") from None
    if not isinstance(text, str):
        raise InvalidRequestError(f"expected text (str), got {type(text).__name__}")
    return text


def _text_batch(prompt) -> tuple[list, bool]:
    """A prompt string, a conversation (list of message dicts), or a list of either."""
    if isinstance(prompt, (str, bytes)):
        return [prompt], False
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        return [list(prompt)], False
    if isinstance(prompt, (list, tuple)) and prompt:
        return list(prompt), True
    raise InvalidRequestError("expected a prompt string, a conversation, or a non-empty list of them")


@functools.partial(jax.jit, donate_argnames=("engine",))
def _feed(engine: EngineState, tokens, temperature, top_k, top_p, min_p,
          repetition_penalty) -> EngineState:
    """The state with the first len(tokens) slots' next input set to `tokens` and their
    sampling settings to these (what `decode` takes from its caller)."""
    rows = slice(0, tokens.shape[0])

    def set_rows(value, new):
        return value.at[rows].set(jnp.asarray(new, value.dtype))

    return engine.replace(
        last_token=set_rows(engine.last_token, tokens),
        temperature=set_rows(engine.temperature, temperature),
        top_k=set_rows(engine.top_k, top_k), top_p=set_rows(engine.top_p, top_p),
        min_p=set_rows(engine.min_p, min_p),
        repetition_penalty=set_rows(engine.repetition_penalty, repetition_penalty))


def _engine_attention(policy: BackendPolicy) -> str:
    """The engine's attention for the adapter's policy: the same name, except cuDNN
    (which has no paged form: its generation runs XLA's paged attention; scoring keeps
    cuDNN)."""
    return "xla" if policy.attention == "cudnn" else policy.attention


def _page_layout(spec: EngineSpec) -> np.ndarray:
    """The block table of a per-call engine state: slot b's page m is m * slots + b."""
    m = np.arange(spec.max_pages_per_slot, dtype=np.int32)[None, :]
    return m * spec.num_slots + np.arange(spec.num_slots, dtype=np.int32)[:, None]


def _bucket(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    n = int(n)
    return max(minimum, 1 << max(0, n - 1).bit_length())


_uids = itertools.count(1)


@dataclasses.dataclass(frozen=True, eq=False)
class LlamaInferenceAdapter:
    """Unified inference over Qwen2.5, Phi-3 and Llama-family models (see module doc)."""

    model: LoadedModel | None = dataclasses.field(repr=False)  # its arrays are not printed
    # The requested implementations; None: the default of `jaxllama.backend.choose`
    # (the Pallas kernels on a GPU without a mesh, XLA elsewhere).
    attention_impl: str | None = None
    matmul_impl: str | None = None
    uid: int = dataclasses.field(default_factory=lambda: next(_uids))
    # What runs, decided once here from the backend, the mesh and the request above.
    policy: BackendPolicy | None = dataclasses.field(init=False, default=None)
    # Packed scoring (`score`, `loglikelihood_batch`) over the layers as one `lax.scan`
    # (a copy of the layer weights stacked once, on first use, kept with the adapter):
    # its program compiles in a fraction of the unrolled one's time. None: on a CPU
    # without a mesh (where that compile is most of a one-off evaluation's time), when
    # every layer has one structure, for the first SCAN_ROW_TOKENS row tokens (then
    # unrolled, the copy dropped); True / False: always (when possible) / never.
    scan_layers: bool | None = None

    def __post_init__(self):
        """Refuses (InvalidRequestError) an implementation that cannot run here."""
        if self.model is not None and not isinstance(self.model, LoadedModel):
            raise InvalidRequestError(
                f"model must be a LoadedModel (see load_gguf), got {type(self.model).__name__}"
            )
        sharded = self.model is not None and self.model.plan is not None
        object.__setattr__(self, "policy", backend.choose(self.attention_impl, self.matmul_impl,
                                                          sharded=sharded))
        if self.scan_layers not in (None, True, False):
            raise InvalidRequestError(f"scan_layers is {self.scan_layers!r}, expected None, True or False")

    # ----- construction (the design's new_qwen / new_phi3 / Into<LlamaInferenceAdapter>)
    @classmethod
    def from_model(cls, model: LoadedModel, *, mesh=None, **kwargs) -> "LlamaInferenceAdapter":
        """Wrap a loaded model; with `mesh`, its params are first moved onto the mesh (a
        model loaded with `load_gguf(..., mesh=)` is already there)."""
        if not isinstance(model, LoadedModel):
            raise InvalidRequestError(
                f"from_model takes a LoadedModel (see load_gguf), got {type(model).__name__}"
            )
        if model.model_type not in MODEL_FUNCTIONS:
            raise InvalidModelType(model.model_type, "no model functions are registered for it")
        if mesh is not None and (model.plan is None or model.plan.mesh != mesh):
            plan = ShardingPlan(mesh, model.config)
            model = dataclasses.replace(model, params=plan.place(model.params), plan=plan)
        return cls(model=model, **kwargs)

    @classmethod
    def _new_family(cls, model: LoadedModel, expected: ModelType, **kwargs):
        if model.model_type != expected:
            raise InvalidModelType(model.model_type, f"expected a {expected.name} model")
        return cls.from_model(model, **kwargs)

    @classmethod
    def new_qwen(cls, model: LoadedModel, **kwargs) -> "LlamaInferenceAdapter":
        return cls._new_family(model, ModelType.Qwen2_5, **kwargs)

    @classmethod
    def new_phi3(cls, model: LoadedModel, **kwargs) -> "LlamaInferenceAdapter":
        return cls._new_family(model, ModelType.Phi3, **kwargs)

    @classmethod
    def new_llama3(cls, model: LoadedModel, **kwargs) -> "LlamaInferenceAdapter":
        return cls._new_family(model, ModelType.Llama3, **kwargs)

    @classmethod
    def from_gguf(cls, path_or_name: str | os.PathLike, *, config: ModelConfig | None = None,
                  dtype: Any = None, weights: str | None = None, progress: bool = False,
                  mesh=None, **kwargs) -> "LlamaInferenceAdapter":
        """Load a GGUF path or a packaged model name (see `jaxllama.hub`), any family.

        `weights` picks how the matmul weights are held: "f32" | "bf16" | "f16" dense, or
        "int8" | "int4" | "native" quantized on the device, multiplied by a kernel that
        dequantizes in registers (see `jaxllama.models.weights.load_gguf`).

        With `mesh` (`jaxllama.sharding.make_mesh(model=..., data=...)`), the weights are
        streamed onto the mesh's devices, tensor-parallel over its `model` axis, and
        batches are split over its `data` axis (see `jaxllama.sharding`).

        `progress=True` shows a loading bar on stderr (the command line's choice; a
        library call is quiet by default).
        """
        if not isinstance(path_or_name, (str, os.PathLike)):
            raise InvalidRequestError(
                f"from_gguf takes a path or a packaged model name, got {type(path_or_name).__name__}"
            )
        path = hub.resolve(path_or_name)
        weights = default_weights(dtype) if weights is None else weights  # int8 on the CPU
        return cls.from_model(load_gguf(path, config, dtype=dtype, weights=weights,
                                        progress=progress, mesh=mesh), **kwargs)

    # ----- model information
    def is_loaded(self) -> bool:
        return self.model is not None and not self.model.params.final_norm.is_deleted()

    def _loaded(self) -> LoadedModel:
        if not self.is_loaded():
            raise ModelNotLoaded("this adapter's model was unloaded" if self.model else "")
        return self.model

    @property
    def config(self) -> ModelConfig:
        return self._loaded().config

    def model_type(self) -> ModelType:
        return self._loaded().model_type

    def vocab_size(self) -> int:
        return self.config.vocab_size

    def hidden_dim(self) -> int:
        return self.config.hidden_dim

    def num_layers(self) -> int:
        return self.config.num_layers

    def vram_usage(self) -> int:
        """Bytes the model's arrays hold on the device (0 once unloaded).

        On a mesh, the bytes on the most loaded device (its shards plus replicated arrays).
        """
        if not self.is_loaded():
            return 0
        if self.model.plan is not None:
            return self.model.plan.bytes_per_device(self.model.params)
        stacked = self.__dict__.get("_stacked_params")  # packed scoring's copy, once made
        extra = 0 if stacked is None else sum(
            leaf.nbytes for leaf in jax.tree_util.tree_leaves(stacked.layers))
        return self.model.nbytes() + extra

    def eos_ids(self) -> tuple[int, ...]:
        return self.tokenizer.eos_ids

    def info(self) -> str:
        """The design's model-information block."""
        return (
            f"Model type: {self.model_type().name}\nVocab size: {self.vocab_size()}\n"
            f"Hidden dim: {self.hidden_dim()}\nLayers: {self.num_layers()}\n"
            f"VRAM: {self.vram_usage() / 2**20:.1f} MB\nWeights: {self._weights_label()}"
        )

    def _weights_label(self) -> str:
        model = self._loaded()
        dense = jnp.dtype(model.dtype).name
        return dense if model.weights == "dense" else f"{model.weights} (compute {dense})"

    @functools.cached_property
    def tokenizer(self):
        from jaxllama.tokenizer import Tokenizer

        return Tokenizer.from_metadata(self._loaded().metadata)

    def _impl(self) -> BackendPolicy:
        """The policy, passed to the jitted steps as their static `attention_impl`."""
        return self.policy

    def _fn(self) -> Callable:
        forward = MODEL_FUNCTIONS[self.model_type()].forward
        plan = self._loaded().plan
        return forward if plan is None else _OnMesh(forward, plan)

    def _put(self, x) -> jax.Array:
        """A batch-major input array, split over the mesh's data axis when there is one."""
        plan = self._loaded().plan
        return jnp.asarray(x) if plan is None else plan.put_batch(np.asarray(x))

    def _scoring_params(self, tokens: int):
        """The params packed scoring runs on for a call of `tokens` padded row tokens:
        stacked layers (see `scan_layers`), made once, or the model's own. By default
        (scan_layers None) a CPU adapter scans for its first `SCAN_ROW_TOKENS` row tokens,
        then drops the stacked copy and runs the unrolled layers."""
        model = self._loaded()
        scan = self.scan_layers
        if scan is None:
            scan = model.plan is None and self.policy.backend == "cpu"
            done = self.__dict__.get("_scanned_tokens", 0)
            if scan and done >= SCAN_ROW_TOKENS:
                # Dropped, not deleted: a call still running may hold it.
                self.__dict__.pop("_stacked_params", None)
                scan = False
            self.__dict__["_scanned_tokens"] = done + tokens
        if not scan or model.plan is not None or not transformer.can_stack(model.params):
            return model.params
        return self._stacked_params

    @functools.cached_property
    def _stacked_params(self):
        return self._run(transformer.stack_layers, self._loaded().params)

    def _new_cache(self, batch_size: int, size: int) -> KVCache:
        model = self._loaded()
        return KVCache.for_params(model.params, model.config, batch_size, size, shard=model.plan)

    # ----- input checking
    def _as_batch(self, input_ids, what: str) -> tuple[list[list[int]], bool]:
        """Normalize ids to a list of rows; returns (rows, was_batched)."""
        if isinstance(input_ids, (np.ndarray, jax.Array)):
            input_ids = np.asarray(input_ids).tolist()
        if isinstance(input_ids, (int, np.integer)):
            rows, batched = [[int(input_ids)]], False
        elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)) and input_ids and all(
            isinstance(r, Sequence) and not isinstance(r, (str, bytes)) for r in input_ids
        ):
            rows, batched = [list(r) for r in input_ids], True
        elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
            rows, batched = [list(input_ids)], False
        else:
            raise InvalidRequestError(f"{what} must be a list of token ids, got {type(input_ids).__name__}")
        vocab = self.vocab_size()
        for i, row in enumerate(rows):
            if not row:
                raise InvalidRequestError(f"{what}: row {i} is empty; at least one token is needed")
            for tok in row:
                if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)):
                    raise InvalidRequestError(f"{what}: {tok!r} is not a token id (an int)")
                if not 0 <= tok < vocab:
                    raise InvalidRequestError(
                        f"{what}: token id {tok} is out of range; expected 0 <= id < vocab size {vocab}"
                    )
        return [[int(t) for t in r] for r in rows], batched

    def _id_row(self, ids, what: str) -> list[int]:
        """One row of token ids (checked as `_as_batch` checks them)."""
        rows, batched = self._as_batch(ids, what)
        if batched and len(rows) != 1:
            raise InvalidRequestError(f"{what} must be one list of token ids, got {len(rows)} rows")
        return rows[0]

    def _check_config(self, config: AdapterForwardConfig | None, rows, *, prefill: bool,
                      state: DecodeState | None = None) -> AdapterForwardConfig:
        config = config or AdapterForwardConfig(batch_size=len(rows))
        if not isinstance(config, AdapterForwardConfig):
            raise InvalidRequestError(f"config must be an AdapterForwardConfig, got {type(config).__name__}")
        config.validate()
        if config.batch_size != len(rows):
            raise InvalidRequestError(
                f"AdapterForwardConfig.batch_size is {config.batch_size} but the input has "
                f"{len(rows)} row(s)"
            )
        if prefill:
            longest = max(len(r) for r in rows)
            if config.seq_len is not None and config.seq_len != longest:
                raise InvalidRequestError(
                    f"AdapterForwardConfig.seq_len is {config.seq_len} but the prompt has {longest} tokens"
                )
            if config.cache_len not in (None, 0):
                raise InvalidRequestError(
                    f"AdapterForwardConfig.cache_len is {config.cache_len} but prefill starts "
                    "from an empty cache (0)"
                )
        else:
            if config.is_prefill:
                raise InvalidRequestError(
                    "AdapterForwardConfig.is_prefill is True but decode was called; use "
                    "config.for_decode(state)"
                )
            if config.seq_len not in (None, 1):
                raise InvalidRequestError(
                    f"AdapterForwardConfig.seq_len is {config.seq_len} but decode feeds 1 token per row"
                )
            if config.cache_len is not None and config.cache_len != state.cache_len:
                raise InvalidRequestError(
                    f"AdapterForwardConfig.cache_len is {config.cache_len} but the state's cache "
                    f"holds {state.cache_len} tokens"
                )
        return config

    @staticmethod
    def _check_max_tokens(max_tokens) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens is {max_tokens!r}, expected an integer >= 1")

    def _cache_size(self, tokens: int) -> int:
        return min(_bucket(tokens, MIN_CACHE_BUCKET), self.config.context_length)

    def _check_room(self, longest_prompt: int, max_tokens: int) -> None:
        ctx = self.config.context_length
        if longest_prompt + max_tokens > ctx:
            raise InvalidRequestError(
                f"prompt ({longest_prompt} tokens) + max_tokens ({max_tokens}) = "
                f"{longest_prompt + max_tokens} exceeds the model's context length {ctx}"
            )

    def _run(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except JaxLlamaError:
            raise
        except (jax.errors.JaxRuntimeError, RuntimeError, MemoryError, ValueError, TypeError) as exc:
            # A ValueError or TypeError here is not the caller's input (that was checked
            # before): JAX refusing a shape or a dtype while tracing.
            if not self.is_loaded():
                raise ModelNotLoaded("this adapter's model was unloaded") from exc
            raise ForwardPassFailed(f"{type(exc).__name__}: {exc}") from exc

    # ----- the design's prefill / decode / generate, through the engine's steps
    #
    # One decode implementation: every call below runs `jaxllama.engine.steps` (the
    # serving engine's prefill_chunk / insert / decode) over an engine state of its own,
    # one decode slot per row. Slot b's logical page m is pool page m * slots + b, so the
    # pool grows by appending pages (`_grow`) and a row never waits for one.

    def _spec(self, rows: int, tokens: int, decode_steps: int) -> EngineSpec:
        """The engine description for `rows` rows of up to `tokens` tokens each: slots
        and pages bucketed (powers of two) so that varied calls share compilations."""
        cfg = self._loaded().config
        slots = _bucket(rows, 1)
        pages = -(-self._cache_size(tokens) // PAGE_SIZE)
        buckets = tuple(b for b in PREFILL_BUCKETS if b <= max(pages * PAGE_SIZE, PREFILL_BUCKETS[0]))
        return EngineSpec(config=cfg, num_slots=slots, page_size=PAGE_SIZE,
                          num_pages=slots * pages, max_pages_per_slot=pages,
                          prefill_buckets=buckets, attention_impl=_engine_attention(self.policy),
                          decode_steps=decode_steps,
                          max_stop_ids=max(4, len(self.eos_ids())),
                          matmul_impl=self.policy.matmul)

    def _new_state(self, spec: EngineSpec) -> EngineState:
        model = self._loaded()
        state = EngineState.create(spec, model.params.dtype, model.plan)
        return state.replace(block_table=self._put_whole(_page_layout(spec)))

    def _put_whole(self, x) -> jax.Array:
        """A host array replicated over the mesh, when there is one."""
        plan = self._loaded().plan
        return jnp.asarray(x) if plan is None else jax.device_put(x, plan.replicated())

    def _start(self, rows, config: AdapterForwardConfig, spec: EngineSpec, *,
               max_tokens: int, stop_ids) -> tuple[list[int], EngineState]:
        """Run each row's prompt into its slot (in chunks) and sample its first token."""
        model = self._loaded()
        state = self._new_state(spec)
        # Only `decode` reads decode_steps: one prefill program serves every caller.
        spec = dataclasses.replace(spec, decode_steps=DECODE_STEPS)
        # Every row's chunks in rounds, all rows in one call a round: row b's r-th chunk
        # (the engine's chunking, `chunk_len`) at its position, or nothing once done.
        starts = [0] * len(rows)
        last = [None] * len(rows)  # the logits (B, V) of the round of each row's last chunk
        b_slots = spec.num_slots
        while any(s < len(r) for s, r in zip(starts, rows)):
            chunk_lens = [spec.chunk_len(s, len(r)) if s < len(r) else 0
                          for s, r in zip(starts, rows)]
            shapes = [spec.prefill_shape(s, k) for s, k in zip(starts, chunk_lens) if k]
            length = max(t for t, _ in shapes)
            window = max(w for _, w in shapes)
            tokens = np.zeros((b_slots, length), np.int32)
            start = np.zeros((b_slots,), np.int32)
            valid = np.zeros((b_slots,), np.int32)
            rope_end = np.zeros((b_slots,), np.int32)
            for b, (row, k) in enumerate(zip(rows, chunk_lens)):
                tokens[b, :k] = row[starts[b]:starts[b] + k]
                start[b], valid[b], rope_end[b] = starts[b], k, len(row) - 1
            state, logits = self._run(steps.prefill_rows, model.params, state, tokens, start,
                                      valid, spec, window, rope_end=rope_end)
            for b, k in enumerate(chunk_lens):
                if k:
                    starts[b] += k
                    if starts[b] == len(rows[b]):
                        last[b] = logits
        first = []
        for b, row in enumerate(rows):
            request = SlotRequest.create(
                spec, max_tokens=max_tokens, stop_ids=stop_ids, temperature=config.temperature,
                top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
                repetition_penalty=config.repetition_penalty, seed=config.seed, prompt_ids=row)
            state, token, _ = self._run(steps.insert, state, np.int32(b), last[b][b], request, spec)
            first.append(token)
        return [int(t) for t in _host(jnp.stack(first))], state

    def _decode_window(self, spec: EngineSpec, longest: int) -> int:
        """The narrowest window holding every position the next dispatch can write, for
        rows of at most `longest` tokens in the cache."""
        positions = min(longest + spec.decode_steps, spec.max_tokens_per_slot)
        return spec.window(-(-positions // spec.page_size))

    def prefill(self, input_ids, config: AdapterForwardConfig | None = None):
        """Run the prompt; return (prompt + first sampled token, DecodeState).

        For a batch (a list of lists) the ids are a list of rows. The cache starts at the
        bucket that holds the prompt and grows (doubling, up to the context length) when full.
        """
        rows, batched = self._as_batch(input_ids, "input_ids")
        config = self._check_config(config, rows, prefill=True)
        longest = max(len(r) for r in rows)
        self._check_room(longest, 1)
        spec = self._spec(len(rows), longest + 1, decode_steps=1)
        # No stop ids and no limit: the caller decides when to stop.
        first, engine = self._start(rows, config, spec, max_tokens=NO_LIMIT, stop_ids=())
        state = DecodeState(engine=engine, spec=spec, rows=len(rows), owner=self.uid)
        out = [r + [first[i]] for i, r in enumerate(rows)]
        return (out if batched else out[0]), state

    def decode(self, input_id, state: DecodeState, config: AdapterForwardConfig | None = None):
        """Feed one token per row; return (next token(s), new state). The old state is consumed.

        The token fed need not be the one sampled (it is what the cache records); the
        sampling settings are this call's config's, the seed and step count the state's.
        """
        rows, batched = self._as_batch(input_id, "input_id")
        if any(len(r) != 1 for r in rows):
            raise InvalidRequestError("decode takes exactly one token per row")
        if not isinstance(state, DecodeState):
            raise InvalidRequestError(f"state must be a DecodeState from prefill, got {type(state).__name__}")
        if state.owner != self.uid:
            raise InvalidRequestError("this DecodeState was made by another adapter; decode it with that adapter")
        state.check_live()
        self._loaded()
        if config is None:
            config = AdapterForwardConfig(is_prefill=False, batch_size=len(rows))
        config = self._check_config(config, rows, prefill=False, state=state)
        if state.batch_size != len(rows):
            raise InvalidRequestError(
                f"input_id has {len(rows)} row(s) but the state holds {state.batch_size}"
            )
        cache_len = state.cache_len
        if cache_len + 1 > self.config.context_length:
            raise InvalidRequestError(
                f"the cache holds {cache_len} tokens; one more exceeds the model's context "
                f"length {self.config.context_length}"
            )
        if cache_len >= state.spec.max_tokens_per_slot:
            state = self._grow(state)
        spec, n = state.spec, state.rows
        engine = self._run(_feed, state.engine, np.asarray([r[0] for r in rows], np.int32),
                           np.float32(config.temperature), np.int32(config.top_k),
                           np.float32(config.top_p), np.float32(config.min_p),
                           np.float32(config.repetition_penalty))
        engine, tokens, valid, _ = self._run(steps.decode, self._loaded().params, engine, spec,
                                             self._decode_window(spec, cache_len))
        tokens, valid = _host(tokens)[0, :n], _host(valid)[0, :n]
        if not valid.all():  # every row has a page and no stop: cannot happen
            raise ForwardPassFailed(f"decode advanced {int(valid.sum())} of {n} rows")
        out = tokens.tolist()
        return (out if batched else out[0]), state.replace(engine=engine)

    def _grow(self, state: DecodeState) -> DecodeState:
        """The state with twice the pages per slot (at most the context length): the
        pool's pages are appended, so every page written keeps its index."""
        old = state.spec
        spec = self._spec(old.num_slots, min(2 * old.max_tokens_per_slot, self.config.context_length),
                          old.decode_steps)
        fresh = self._new_state(spec)
        engine = state.engine
        cache = fresh.cache.replace(
            k=tuple(new.at[:, : old.num_pages].set(k) for new, k in zip(fresh.cache.k, engine.cache.k)),
            v=tuple(new.at[:, : old.num_pages].set(v) for new, v in zip(fresh.cache.v, engine.cache.v)))
        return state.replace(spec=spec, engine=engine.replace(cache=cache,
                                                              block_table=fresh.block_table))

    def generate(self, input_ids, max_tokens: int, config: AdapterForwardConfig | None = None):
        """Prompt + up to `max_tokens` generated ids, stopping after the model's EOS.

        A batch (list of lists) gives a list of rows, each with its own length and stop.
        The decode runs `DECODE_STEPS` steps per dispatch on the device.
        """
        rows, batched = self._as_batch(input_ids, "input_ids")
        self._check_max_tokens(max_tokens)
        config = self._check_config(config, rows, prefill=True)
        out = [r + g for r, g in zip(rows, self._generate_rows(rows, max_tokens, config))]
        return out if batched else out[0]

    def _generate_rows(self, rows, max_tokens, config) -> list[list[int]]:
        """Every row's generated ids (`_steps`, collected)."""
        generated = [[] for _ in rows]
        for b, token in self._steps(rows, max_tokens, config, DECODE_STEPS):
            generated[b].append(token)
        return generated

    def _steps(self, rows, max_tokens: int, config, decode_steps: int) -> Iterator[tuple[int, int]]:
        """(row, token) for every token generated, in order, until each row has
        max_tokens or has emitted an EOS (which it keeps): the slots' own stop rule,
        read back from the state after each dispatch."""
        longest = max(len(r) for r in rows)
        self._check_room(longest, max_tokens)
        spec = self._spec(len(rows), longest + max_tokens, decode_steps)
        first, engine = self._start(rows, config, spec, max_tokens=max_tokens,
                                    stop_ids=self.eos_ids())
        for b, token in enumerate(first):
            yield b, token
        n, params = len(rows), self._loaded().params
        finished, lengths = _host(engine.finished)[:n], _host(engine.lengths)[:n]
        while not finished.all():
            engine, tokens, valid, _ = self._run(steps.decode, params, engine, spec,
                                                 self._decode_window(spec, int(lengths[~finished].max())))
            tokens, valid = _host(tokens), _host(valid)
            finished, lengths = _host(engine.finished)[:n], _host(engine.lengths)[:n]
            if not valid.any():  # every running row has its pages: cannot happen
                raise ForwardPassFailed("a decode dispatch advanced no row")
            for step in range(tokens.shape[0]):
                for b in range(n):
                    if valid[step, b]:
                        yield b, int(tokens[step, b])

    # ----- streaming
    def stream(self, input_ids, max_tokens: int, config: AdapterForwardConfig | None = None) -> Iterator[int]:
        """Yield each generated token of one prompt as it is produced.

        The same engine steps and randomness as `generate`, one decode step per
        dispatch: the tokens equal `generate`'s for the same config and seed.
        """
        rows, _ = self._as_batch(input_ids, "input_ids")
        if len(rows) != 1:
            raise UnsupportedOperation(self.model_type(), "stream takes one prompt; use generate for a batch")
        self._check_max_tokens(max_tokens)
        config = self._check_config(config, rows, prefill=True)
        self._check_room(len(rows[0]), max_tokens)
        return (token for _, token in self._steps(rows, max_tokens, config, decode_steps=1))

    # ----- text in, text out
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(_as_text(text), add_special_tokens=add_special_tokens)

    def decode_text(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the GGUF's own `tokenizer.chat_template` (as transformers does)."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, prompt) -> list[int]:
        """Token ids of a plain text prompt (with the file's BOS rule) or of a conversation
        (a list of {"role", "content"} messages, rendered with the chat template)."""
        if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            if not prompt:
                raise InvalidRequestError("the conversation has no messages")
            text = self.apply_chat_template(list(prompt), add_generation_prompt=True)
            # The rendered template already holds any BOS text it wants.
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.encode(_as_text(prompt))

    def generate_text(self, prompt, max_tokens: int, config: AdapterForwardConfig | None = None):
        """Generated text (special tokens dropped) for a prompt string or a conversation;
        a list of those is a batch and gives a list of texts."""
        prompts, batched = _text_batch(prompt)
        rows = [self.prompt_ids(p) for p in prompts]
        if config is None:
            config = AdapterForwardConfig(batch_size=len(rows))
        out = self.generate(rows, max_tokens, config)
        texts = [self.decode_text(o[len(r):]) for o, r in zip(out, rows)]
        return texts if batched else texts[0]

    def stream_text(self, prompt, max_tokens: int, config: AdapterForwardConfig | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated; each piece is whole UTF-8 characters
        (a character split over tokens is held back until complete)."""
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        for token in self.stream(self.prompt_ids(prompt), max_tokens, config):
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    # ----- batch evaluation
    def score(self, token_sequences, *, batch_size: int = 8, packed: bool = True) -> list[np.ndarray]:
        """Per-token log-probabilities: for each sequence of n ids, an array of n-1 float32
        values, log p(ids[i] | ids[:i]) for i = 1..n-1.

        Packed (the default): many sequences share each fixed-width row (see
        `generation.score_packed`), `batch_size` rows per call at most.
        `packed=False`: one sequence per row, `batch_size` rows per call, each padded to
        a power of two (the earlier path, kept for comparison).
        """
        if not packed:
            logprobs, _ = self._score(token_sequences, batch_size)
            return logprobs
        rows, _ = self._as_batch(token_sequences, "token_sequences")
        self._check_batch_size(batch_size)
        ctx_len = self._loaded().config.context_length
        for r in rows:
            if len(r) < 2:
                raise InvalidRequestError("score needs sequences of at least 2 tokens")
            if len(r) > ctx_len:
                raise InvalidRequestError(f"a sequence of {len(r)} tokens exceeds the context length {ctx_len}")
        out = self._score_packed([(r[:1], r[1:]) for r in rows], batch_size, share_context=False)
        return [lp for lp, _ in out]

    @staticmethod
    def _check_batch_size(batch_size) -> None:
        if batch_size is None:
            return
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InvalidRequestError(f"batch_size is {batch_size!r}, expected an integer >= 1 or None")

    def pack_width(self, longest: int) -> int:
        """The row width packed scoring uses when its longest unit has `longest` tokens."""
        return min(max(MIN_PACK_WIDTH, _bucket(longest)), self.config.context_length)

    def _score_packed(self, requests, batch_size, *, share_context: bool):
        """[(context ids, continuation ids)] (checked) -> [(logprobs (len(cont),) float32,
        greedy (len(cont),) bool)], by packed rows."""
        model = self._loaded()
        cfg = model.config
        # Sharing a context needs slot distance == position distance (a sliding window
        # counts slots) and one rope scale per request (LongRoPE picks it per sequence).
        share_context = share_context and cfg.sliding_window is None and cfg.rope_long_factors is None
        longest = max(len(c) + len(x) - 1 for c, x in requests)
        width = self.pack_width(longest)
        rows = generation.pack_requests(requests, width, share_context=share_context)
        params = self._scoring_params(len(rows) * width)
        per_call = max(1, PACK_TOKENS_PER_CALL // width)
        if batch_size is not None:
            per_call = min(per_call, int(batch_size))
        out = [None] * len(requests)
        for start in range(0, len(rows), per_call):
            chunk = rows[start:start + per_call]
            need = max(sum(len(requests[i][1]) for _, members in row for i in members) for row in chunk)
            arrays = generation.packed_arrays(requests, chunk, width, _bucket(len(chunk), 1),
                                              preds=_bucket(need))
            lp, gr = self._run(
                generation.score_packed, params, self._put(arrays.tokens),
                self._new_cache(arrays.tokens.shape[0], width), self._put(arrays.rope_positions),
                self._put(arrays.segment_ids), self._put(arrays.branch_ids),
                self._put(arrays.pred_index), self._put(arrays.targets),
                model_fn=self._fn(), config=cfg, attention_impl=self._impl(),
            )
            lp, gr = _host(lp), _host(gr)
            for i, (r, a, b) in arrays.spans.items():
                out[i] = (lp[r, a:b], gr[r, a:b])
        return out

    def score_top(self, token_sequences, top: int, *, batch_size: int = 8):
        """`score` with the `top` most likely tokens at each position (what an OpenAI
        server's `echo` + `logprobs` returns for the prompt): for each sequence of n ids,
        (logprobs (n-1,) float32, top_ids (n-1, top) int32, top_logprobs (n-1, top)
        float32), best first, all log-softmax of the raw logits."""
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or not (
                1 <= top <= self.config.vocab_size):
            raise InvalidRequestError(f"top is {top!r}, expected an integer in [1, "
                                      f"{self.config.vocab_size}]")
        return self._score(token_sequences, batch_size, top=int(top))

    def _score(self, token_sequences, batch_size, top: int = 0):
        rows, _ = self._as_batch(token_sequences, "token_sequences")
        model = self._loaded()
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InvalidRequestError(f"batch_size is {batch_size!r}, expected an integer >= 1")
        batch_size = min(int(batch_size), _bucket(len(rows), 1))
        for r in rows:
            if len(r) < 2:
                raise InvalidRequestError("score needs sequences of at least 2 tokens")
            if len(r) > model.config.context_length:
                raise InvalidRequestError(
                    f"a sequence of {len(r)} tokens exceeds the context length {model.config.context_length}"
                )
        logprobs, greedy = [None] * len(rows), [None] * len(rows)
        tops = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            t = min(_bucket(max(len(rows[i]) for i in idx)), model.config.context_length)
            tokens = np.zeros((batch_size, t), np.int32)
            lengths = np.ones((batch_size,), np.int32)
            for j, i in enumerate(idx):
                tokens[j, : len(rows[i])] = rows[i]
                lengths[j] = len(rows[i])
            cache = self._new_cache(batch_size, t)
            if top:
                lp, top_ids, top_lp = self._run(
                    generation.score_tokens_top, model.params, self._put(tokens), cache,
                    self._put(lengths), model_fn=self._fn(), config=model.config,
                    attention_impl=self._impl(), top=top,
                )
                lp, top_ids, top_lp = _host(lp), _host(top_ids), _host(top_lp)
                for j, i in enumerate(idx):
                    n = len(rows[i])
                    tops[i] = (lp[j, : n - 1], top_ids[j, : n - 1], top_lp[j, : n - 1])
                continue
            lp, gr = self._run(
                generation.score_tokens, model.params, self._put(tokens), cache, self._put(lengths),
                model_fn=self._fn(), config=model.config, attention_impl=self._impl(),
            )
            lp, gr = _host(lp), _host(gr)
            for j, i in enumerate(idx):
                n = len(rows[i])
                logprobs[i], greedy[i] = lp[j, : n - 1], gr[j, : n - 1]
        if top:
            return tops
        return logprobs, greedy

    def loglikelihood(self, context, continuation) -> tuple[float, bool]:
        """(log p(continuation | context), whether greedy decoding would produce it), the
        form evaluation harnesses use. Strings are tokenized (the context with the file's
        BOS rule, the continuation without); lists are taken as ids."""
        ctx = self.encode(context) if isinstance(context, (str, bytes)) else self._id_row(context, "context")
        cont = (self.encode(continuation, add_special_tokens=False)
                if isinstance(continuation, (str, bytes)) else self._id_row(continuation, "continuation"))
        return self.loglikelihood_batch([(ctx, cont)])[0]

    def loglikelihood_batch(self, pairs, *, batch_size: int | None = None,
                            share_context: bool = True) -> list[tuple[float, bool]]:
        """`loglikelihood` for many (context, continuation) pairs (strings or id lists),
        scored packed: [(log p, is_greedy)] in the order given. `batch_size` caps the rows
        per call (None: as many as fit `PACK_TOKENS_PER_CALL`). With `share_context`,
        pairs with the same context ids feed it once (each continuation attends to it
        and to itself only), which changes nothing but the cost."""
        self._check_batch_size(batch_size)
        if not isinstance(pairs, Sequence) or isinstance(pairs, (str, bytes)) or not pairs:
            raise InvalidRequestError("loglikelihood_batch takes a non-empty list of (context, continuation) pairs")
        requests = []
        ctx_len = self.config.context_length
        for k, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidRequestError(f"pair {k} is not a (context, continuation) pair")
            context, continuation = pair
            try:
                ctx = (self.encode(context) if isinstance(context, (str, bytes))
                       else self._id_row(context, "context"))
                cont = (self.encode(continuation, add_special_tokens=False)
                        if isinstance(continuation, (str, bytes)) else self._id_row(continuation, "continuation"))
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"pair {k}: {exc}") from None
            if not ctx or not cont:
                raise InvalidRequestError(f"pair {k}: loglikelihood needs a non-empty context and continuation")
            if len(ctx) + len(cont) > ctx_len + 1:
                raise InvalidRequestError(
                    f"pair {k}: context ({len(ctx)} tokens) + continuation ({len(cont)}) - 1 exceeds "
                    f"the context length {ctx_len}; truncate the context from the left"
                )
            requests.append((ctx, cont))
        out = self._score_packed(requests, batch_size, share_context=share_context)
        return [(float(lp.sum()), bool(gr.all())) for lp, gr in out]

    def perplexity(self, ids: Sequence[int], *, context: int | None = None, stride: int | None = None,
                   progress: bool = False) -> tuple[float, int]:
        """Sliding-window perplexity over `ids`: windows of `context` tokens moved by
        `stride`; each token is scored once, with the window that first reaches it (as in
        transformers' perplexity guide). Returns (perplexity, tokens scored)."""
        from tqdm.auto import tqdm

        ids = self._id_row(ids, "ids")
        for name, value in (("context", context), ("stride", stride)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise InvalidRequestError(f"{name} is {value!r}, expected an integer or None")
        context = context or min(self.config.context_length, 1024)
        stride = stride or context
        if not 2 <= context <= self.config.context_length:
            raise InvalidRequestError(
                f"context is {context}, expected 2 <= context <= the context length "
                f"{self.config.context_length}"
            )
        if not 0 < stride <= context:
            raise InvalidRequestError(f"stride is {stride}, expected 0 < stride <= context ({context})")
        if len(ids) < 2:
            raise InvalidRequestError("perplexity needs at least 2 tokens")
        nll, counted, prev_end = 0.0, 0, 0
        # The windows up to the first that reaches the end, so a progress bar ends full.
        starts = [0]
        while starts[-1] + context < len(ids):
            starts.append(starts[-1] + stride)
        for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
            end = min(begin + context, len(ids))
            window = ids[begin:end]
            first_target = max(prev_end, begin + 1)  # absolute index of the first token scored
            if end > first_target:
                lp = self.score([window], batch_size=1)[0]  # lp[j] scores window[j + 1]
                nll -= float(lp[first_target - begin - 1:].sum())
                counted += end - first_target
            prev_end = end
        return math.exp(nll / counted), counted

    # ----- lifecycle
    def unload(self) -> "LlamaInferenceAdapter":
        """Free the model's device memory; this adapter and the returned one then raise
        ModelNotLoaded, and report 0 bytes."""
        if self.model is not None:
            stacked = self.__dict__.pop("_stacked_params", None)
            for leaf in jax.tree_util.tree_leaves((self.model.params, stacked)):
                if not leaf.is_deleted():
                    leaf.delete()
        return dataclasses.replace(self, model=None)


def _check_name(name) -> None:
    if not isinstance(name, str):
        raise InvalidRequestError(f"a registered model's name is a str, got {type(name).__name__}")


class ModelRegistry:
    """Several named adapters loaded at once (thread-safe), by str name."""

    def __init__(self):
        self._adapters: dict[str, LlamaInferenceAdapter] = {}
        self._lock = threading.Lock()

    def register(self, name: str, adapter: LlamaInferenceAdapter) -> None:
        _check_name(name)
        if not isinstance(adapter, LlamaInferenceAdapter):
            raise InvalidRequestError(f"register takes a LlamaInferenceAdapter, got {type(adapter).__name__}")
        with self._lock:
            self._adapters[name] = adapter

    def get(self, name: str) -> LlamaInferenceAdapter | None:
        _check_name(name)
        with self._lock:
            return self._adapters.get(name)

    def __getitem__(self, name: str) -> LlamaInferenceAdapter:
        adapter = self.get(name)
        if adapter is None:
            raise InvalidRequestError(
                f"no model named {name!r} is registered; registered: {', '.join(self.list_models()) or 'none'}"
            )
        return adapter

    def list_models(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def unregister(self, name: str) -> LlamaInferenceAdapter | None:
        _check_name(name)
        with self._lock:
            return self._adapters.pop(name, None)

    def unload(self, name: str) -> None:
        """Unregister `name` and free its device memory."""
        adapter = self.unregister(name)
        if adapter is None:
            raise InvalidRequestError(f"no model named {name!r} is registered")
        adapter.unload()
