"""The engine's description (static) and its state (a pytree of device arrays).

`EngineSpec` is frozen and hashable: the one static argument of the jitted steps in
`jaxllama.engine.steps`. Everything that changes per request (which slot, its pages,
its length, its sampling settings, seed and stop ids) lives in `EngineState` as
arrays, so admitting, finishing or cancelling a request never recompiles.

Letters as in `jaxllama.engine.paged_cache`: B decode slots, M pages per slot, L tokens
per page, P pages in the pool, V vocab, E stop ids per slot.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxllama import backend
from jaxllama.engine.paged_cache import NO_PAGE, PagedKVCache
# EngineSpecError is defined in jaxllama.errors with the library's other errors.
from jaxllama.errors import EngineSpecError, InvalidRequestError, UnsupportedOperation
from jaxllama.models.config import ModelConfig

Array = jax.Array

ATTENTION_IMPLS = ("xla", "pallas", "pallas_interpret")
# Marks an unused entry of a slot's stop ids (no token id is negative).
NO_STOP = -1
# OpenAI's limit on top_logprobs (and vLLM's default max_logprobs).
MAX_TOP_LOGPROBS = 20
# The narrowest block-table window (pages) a step reads; wider windows double from here
# up to max_pages_per_slot. Attention reads every position of its window, so a window
# sized to the longest running request (not to max_pages_per_slot) keeps short requests
# cheap; doubling bounds the compiled programs to about log2(max_pages_per_slot).
MIN_WINDOW_PAGES = 8


def _narrowest(sizes: tuple[int, ...], n: int, what: str) -> int:
    """The first of ascending `sizes` that is >= n (EngineSpecError "n {what}" if none)."""
    for size in sizes:
        if size >= n:
            return size
    raise EngineSpecError(f"{n} {what}")


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Shapes and switches of one engine (static; see module doc).

    Attributes:
      config: the model.
      num_slots: B, requests decoded together.
      page_size: L, tokens per page.
      num_pages: P, pages in each layer's pool.
      max_pages_per_slot: M, the block table's width; a request holds at most M * L
        tokens (prompt + generated).
      prefill_buckets: the chunk lengths `prefill_chunk` is compiled for, ascending; the
        last is the prefill chunk size (a prompt is run in chunks of that many tokens,
        after its remainder, padded to the smallest bucket that holds it: `chunk_len`).
      attention_impl: "xla" (prefill through the gather twin; decode over a dense copy
        of each slot's window, gathered once per dispatch) or "pallas" /
        "pallas_interpret" (the paged Pallas kernel, compiled or interpreted).
      decode_steps: N, decode steps per `decode` dispatch.
      max_stop_ids: E, stop token ids a slot can hold (EOS included).
      top_logprobs: K, the most top log-probabilities a request can ask for; `insert`
        and `decode` return the K best tokens' log-probabilities of every step (0: none,
        only the sampled token's log-probability).
      matmul_impl: the quantized matmul (`jaxllama.backend.MATMUL_IMPLS`); None: the
        backend policy's default for attention_impl. An adapter passes its own policy's.
    """

    config: ModelConfig
    num_slots: int
    page_size: int
    num_pages: int
    max_pages_per_slot: int
    prefill_buckets: tuple[int, ...] = (16, 64, 256)
    attention_impl: str = "xla"
    decode_steps: int = 8
    max_stop_ids: int = 4
    top_logprobs: int = 0
    matmul_impl: str | None = None

    def __post_init__(self):
        def bad(field, value, expected):
            raise EngineSpecError(f"EngineSpec.{field} is {value!r}; expected {expected}")

        for field in ("num_slots", "page_size", "num_pages", "max_pages_per_slot",
                      "decode_steps", "max_stop_ids"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(field, value, "an integer >= 1")
        if (isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int)
                or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            bad("top_logprobs", self.top_logprobs, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        buckets = self.prefill_buckets
        if (not isinstance(buckets, tuple) or not buckets
                or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets)
                or list(buckets) != sorted(set(buckets))):
            bad("prefill_buckets", buckets, "a non-empty tuple of ascending integers >= 1")
        if self.attention_impl not in ATTENTION_IMPLS:
            bad("attention_impl", self.attention_impl, f"one of {', '.join(ATTENTION_IMPLS)}")
        try:
            # The one backend policy: a compiled Pallas kernel needs a GPU. Refused here,
            # not at the first prefill_chunk (whose error would not say what can run).
            backend.check("attention", self.attention_impl, what="EngineSpec.attention_impl")
            if self.matmul_impl is not None:
                backend.check("matmul", self.matmul_impl, what="EngineSpec.matmul_impl")
        except InvalidRequestError as exc:
            raise EngineSpecError(str(exc)) from None
        config = self.config
        if not isinstance(config, ModelConfig):
            bad("config", type(config).__name__, "a ModelConfig")
        if (config.sliding_window is not None and config.sliding_window < self.max_tokens_per_slot
                and self.attention_impl != "xla"):
            # The XLA path masks by the window (the paged twin and transformer.forward
            # both take it from the config); the Pallas paged kernel has none
            # (transformer.py refuses the same for its dense kernels).
            raise UnsupportedOperation(
                config.model_type,
                f"the Pallas paged attention has no sliding window; max_pages_per_slot * "
                f"page_size = {self.max_tokens_per_slot} exceeds the window "
                f"({config.sliding_window}); use attention_impl 'xla', or a max_context "
                f"within the window",
            )

    @property
    def policy(self) -> backend.BackendPolicy:
        """The implementations the steps run (the one backend policy's choice)."""
        return backend.choose(self.attention_impl, self.matmul_impl)

    def prefix_root(self, prompt_len: int) -> bytes | None:
        """The prefix-cache chain root of a prompt of `prompt_len` tokens
        (`pages.prefix_keys`). LongRoPE (Phi-3 128k) picks its factors by a call's
        furthest position (transformers' rule, `transformer.rope_tables`), and every
        chunk of a prompt is given the prompt's end (`prefill_chunk`'s `rope_end`), so
        a prompt past the original context has all its keys under the long factors:
        its pages are keyed apart from the same tokens' pages of a shorter prompt."""
        config = self.config
        if config.rope_long_factors is not None and prompt_len > config.rope_original_context:
            return b"longrope-long-factors"
        return None

    @property
    def chunk_size(self) -> int:
        """The longest prefill chunk (the last bucket)."""
        return self.prefill_buckets[-1]

    @property
    def max_tokens_per_slot(self) -> int:
        return self.max_pages_per_slot * self.page_size

    @property
    def windows(self) -> tuple[int, ...]:
        """The block-table widths (pages) the steps are compiled for, ascending: powers
        of two from MIN_WINDOW_PAGES, and max_pages_per_slot (always the last)."""
        out, w = [], MIN_WINDOW_PAGES
        while w < self.max_pages_per_slot:
            out.append(w)
            w *= 2
        return tuple(out) + (self.max_pages_per_slot,)

    @property
    def decode_widths(self) -> tuple[int, ...]:
        """The slot counts `decode` is compiled for, ascending: num_slots, and its half
        and quarter (rounded up) when those are smaller. A dispatch runs the narrowest
        that holds every decoding slot, so a few streams on many slots cost a quarter
        or half of the batch, not all of it; three widths bound the programs."""
        b = self.num_slots
        return tuple(sorted({b, -(-b // 2), -(-b // 4)}))

    def decode_width(self, num_decoding: int) -> int:
        """The narrowest of decode_widths that holds `num_decoding` slots."""
        return _narrowest(self.decode_widths, num_decoding,
                          f"decoding slots exceed num_slots ({self.num_slots})")

    def window(self, pages: int) -> int:
        """The narrowest window that holds `pages` pages of every slot it serves."""
        return _narrowest(self.windows, pages,
                          f"pages exceed max_pages_per_slot ({self.max_pages_per_slot})")

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse a request that can never run in this engine: its prompt plus
        max_tokens must fit in one slot (max_pages_per_slot * page_size tokens), in the
        whole page pool (num_pages * page_size), and in the model's context. A slot
        whose next position has no page waits for the host to grow it, so a request
        admitted past these limits would idle its slot for ever; the scheduler calls
        this before admitting one.

        Raises:
          InvalidRequestError: naming the sizes and the limit exceeded.
        """
        for name, value in (("prompt_len", prompt_len), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidRequestError(f"{name} is {value!r}; expected an integer >= 1")
        total = int(prompt_len) + int(max_tokens)
        limits = (
            (self.max_tokens_per_slot, "a slot holds (EngineSpec.max_pages_per_slot * page_size "
             f"= {self.max_pages_per_slot} * {self.page_size})"),
            (self.num_pages * self.page_size, "the whole page pool holds (EngineSpec.num_pages "
             f"* page_size = {self.num_pages} * {self.page_size})"),
            (self.config.context_length, "the model's context length is"),
        )
        for limit, what in limits:
            if total > limit:
                raise InvalidRequestError(
                    f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} "
                    f"tokens, but {what} {limit} tokens; expected at most {limit}"
                )

    def bucket(self, num_tokens: int) -> int:
        """The chunk length a chunk of `num_tokens` real tokens is padded to."""
        if not 1 <= num_tokens <= self.chunk_size:
            raise EngineSpecError(
                f"a prefill chunk of {num_tokens} tokens; expected 1 to {self.chunk_size} "
                f"(the largest of prefill_buckets)"
            )
        return next(b for b in self.prefill_buckets if b >= num_tokens)

    @property
    def resume_bucket(self) -> int:
        """The chunk length a short chunk at a position past 0 (the rest of a prompt
        after a prefix-cache hit) is padded to when it fits: the smallest bucket that
        holds a quarter of the chunk. A prompt that shares all but a few tokens with a
        cached one then computes a quarter of a chunk, not a whole one, at the cost of
        one more program per window."""
        return self.bucket(-(-self.chunk_size // 4))

    def chunk_len(self, start: int, prompt_len: int) -> int:
        """How many prompt tokens the chunk at position `start` of a `prompt_len`-token
        prompt runs: the remainder of the tokens left ((prompt_len - start) %
        chunk_size) first, then whole chunks. Every chunk after a prompt's first (from
        0, or from the end of its cached prefix) is then exactly chunk_size tokens and
        none is padding."""
        if not 0 <= start < prompt_len:
            raise EngineSpecError(f"a chunk at position {start} of a {prompt_len}-token prompt")
        return (prompt_len - start) % self.chunk_size or self.chunk_size

    def prefill_shape(self, start: int, num_tokens: int) -> tuple[int, int]:
        """(chunk length, window) of the prefill chunk of `num_tokens` tokens at position
        `start`: one of `prefill_shapes()`, so no schedule compiles more. A chunk at 0
        is padded to its bucket and reads the window that bucket needs; a chunk past 0
        (a long prompt's later chunks, or the rest after a prefix-cache hit) is padded
        to resume_bucket when it fits, else to the whole chunk, and reads the narrowest
        window that holds it and the positions before it. (Every bucket at every window
        would be len(buckets) * len(windows) programs.)"""
        bucket = self.bucket(num_tokens)  # range check
        if start == 0:
            return bucket, self._pages_window(bucket)
        length = self.resume_bucket if num_tokens <= self.resume_bucket else self.chunk_size
        return length, self._pages_window(max(start + num_tokens, length))

    def _pages_window(self, positions: int) -> int:
        """The window for positions [0, positions), at most the whole table."""
        return self.window(min(math.ceil(positions / self.page_size), self.max_pages_per_slot))

    def prefill_shapes(self) -> tuple[tuple[int, int], ...]:
        """Every (chunk length, window) `prefill_shape` can return, sorted."""
        shapes = {(b, self._pages_window(b)) for b in self.prefill_buckets}
        for length in {self.resume_bucket, self.chunk_size}:
            narrowest = self._pages_window(length)
            shapes |= {(length, w) for w in self.windows if w >= narrowest}
        return tuple(sorted(shapes))


@struct.dataclass
class SlotRequest:
    """One request's settings as `insert` takes them (arrays, so none recompiles).

    temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and repetition_penalty 1 are
    off, as in `jaxllama.sampling`. `stop_ids` (E,) int32 holds EOS and any stop ids,
    padded with NO_STOP; the stop token is emitted and counted, as `adapter.generate`
    does. `seen` (V,) bool marks the prompt's tokens, which the repetition penalty
    counts as seen (transformers' rule, as the adapter).
    """

    temperature: Array  # () float32
    top_k: Array  # () int32
    top_p: Array  # () float32
    min_p: Array  # () float32
    repetition_penalty: Array  # () float32
    seed: Array  # () uint32
    max_tokens: Array  # () int32, tokens to generate, the first (sampled at insert) included
    stop_ids: Array  # (E,) int32
    seen: Array  # (V,) bool

    @classmethod
    def create(cls, spec: EngineSpec, *, max_tokens: int, stop_ids=(),
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int = 0,
               prompt_len: int | None = None, prompt_ids=None) -> "SlotRequest":
        """A request's settings as arrays, checked first.

        The sampling settings follow the adapter's rules (`AdapterForwardConfig.validate`
        checks them, so the two cannot drift): temperature finite and >= 0, top_k an
        integer >= 0, top_p in (0, 1], min_p in [0, 1), repetition_penalty finite and
        > 0, seed an integer in [0, 2**32). With `prompt_len`,
        `spec.check_fits(prompt_len, max_tokens)` runs too. `prompt_ids` (the prompt's
        token ids) is needed when repetition_penalty is not 1: they count as seen.

        Raises:
          InvalidRequestError: a setting out of range, or (with prompt_len) a request
            that can never fit in a slot.
          EngineSpecError: more stop ids than spec.max_stop_ids, or a bad max_tokens.
        """
        from jaxllama.models.adapter import AdapterForwardConfig  # heavy; only here

        stop_ids = tuple(stop_ids)
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0
               for t in stop_ids):
            raise InvalidRequestError(
                f"SlotRequest: stop_ids {stop_ids!r}; expected token ids (integers >= 0)"
            )
        stop_ids = tuple(int(t) for t in stop_ids)
        if len(stop_ids) > spec.max_stop_ids:
            raise EngineSpecError(
                f"{len(stop_ids)} stop ids {stop_ids}; this engine holds at most "
                f"EngineSpec.max_stop_ids = {spec.max_stop_ids}"
            )
        if (isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer))
                or max_tokens < 1):
            raise EngineSpecError(f"max_tokens is {max_tokens!r}; expected an integer >= 1")
        try:
            AdapterForwardConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                 min_p=min_p, repetition_penalty=repetition_penalty,
                                 seed=seed).validate()
        except InvalidRequestError as exc:
            raise InvalidRequestError(
                str(exc).replace("AdapterForwardConfig.", "SlotRequest.", 1)
            ) from None
        if prompt_len is not None:
            spec.check_fits(prompt_len, max_tokens)
        vocab = spec.config.vocab_size
        seen = np.zeros((vocab,), bool)
        if prompt_ids is not None:
            ids = np.asarray(prompt_ids, np.int64).reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise InvalidRequestError(
                    f"SlotRequest: prompt_ids hold ids outside [0, {vocab}) (the vocabulary)"
                )
            seen[ids] = True
        elif repetition_penalty != 1.0:
            raise InvalidRequestError(
                "SlotRequest: repetition_penalty is set but prompt_ids is not; expected the "
                "prompt's token ids (the penalty counts them as seen)"
            )
        stops = np.full((spec.max_stop_ids,), NO_STOP, np.int32)
        stops[: len(stop_ids)] = stop_ids
        return cls(
            temperature=np.float32(temperature), top_k=np.int32(top_k), top_p=np.float32(top_p),
            min_p=np.float32(min_p), repetition_penalty=np.float32(repetition_penalty),
            seed=np.uint32(seed), max_tokens=np.int32(max_tokens), stop_ids=stops, seen=seen,
        )


@struct.dataclass
class EngineState:
    """Everything the jitted steps read and write, one row per decode slot.

    A slot is free (active False), prefilling (active False, pages and length being
    written by `prefill_chunk`), decoding (active, not finished) or finished (active and
    finished: it idles until `release`). `lengths[b]` counts the tokens whose keys and
    values are in the slot's pages; `last_token[b]` is the latest sampled token, not
    yet in the cache (the next decode step feeds it).
    """

    cache: PagedKVCache
    block_table: Array  # (B, M) int32, NO_PAGE where none
    lengths: Array  # (B,) int32
    last_token: Array  # (B,) int32
    active: Array  # (B,) bool
    finished: Array  # (B,) bool
    generated: Array  # (B,) int32, tokens sampled so far (the step index of the next)
    max_tokens: Array  # (B,) int32
    stop_ids: Array  # (B, E) int32
    keys: Array  # (B, 2) uint32, PRNGKey(seed) of each slot
    temperature: Array  # (B,) float32
    top_k: Array  # (B,) int32
    top_p: Array  # (B,) float32
    min_p: Array  # (B,) float32
    repetition_penalty: Array  # (B,) float32
    seen: Array  # (B, V) bool, tokens of the prompt and output (for the repetition penalty)

    @classmethod
    def create(cls, spec: EngineSpec, dtype=jnp.float32, plan=None) -> "EngineState":
        """An engine with every slot free and every page zero; pools in `dtype` (that of
        the params, `Params.dtype`). With `plan` (a `jaxllama.sharding.ShardingPlan`, that
        of the params), made directly in its shards on the plan's mesh: the page pools
        split by KV heads as the dense cache is (`ShardingPlan.pool_sharding`), every
        per-slot array replicated; the jitted steps then run partitioned by XLA."""
        if plan is None:
            return cls._zeros(spec, dtype)
        shapes = jax.eval_shape(lambda: cls._zeros(spec, dtype))
        pool, whole = plan.pool_sharding(), plan.replicated()
        shardings = jax.tree.map(lambda _: whole, shapes).replace(cache=PagedKVCache(
            k=tuple(pool for _ in shapes.cache.k), v=tuple(pool for _ in shapes.cache.v)))
        return jax.jit(lambda: cls._zeros(spec, dtype), out_shardings=shardings)()

    @classmethod
    def _zeros(cls, spec: EngineSpec, dtype) -> "EngineState":
        b = spec.num_slots
        return cls(
            cache=PagedKVCache.create(spec.config, spec.num_pages, spec.page_size, dtype),
            block_table=jnp.full((b, spec.max_pages_per_slot), NO_PAGE, jnp.int32),
            lengths=jnp.zeros((b,), jnp.int32),
            last_token=jnp.zeros((b,), jnp.int32),
            active=jnp.zeros((b,), bool),
            finished=jnp.zeros((b,), bool),
            generated=jnp.zeros((b,), jnp.int32),
            max_tokens=jnp.zeros((b,), jnp.int32),
            stop_ids=jnp.full((b, spec.max_stop_ids), NO_STOP, jnp.int32),
            keys=jnp.zeros((b, 2), jnp.uint32),
            temperature=jnp.zeros((b,), jnp.float32),
            top_k=jnp.zeros((b,), jnp.int32),
            top_p=jnp.ones((b,), jnp.float32),
            min_p=jnp.zeros((b,), jnp.float32),
            repetition_penalty=jnp.ones((b,), jnp.float32),
            seen=jnp.zeros((b, spec.config.vocab_size), bool),
        )

