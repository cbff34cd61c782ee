"""The engine's pure jitted steps over `EngineState`, and the model forward over the
paged KV cache they share.

* `set_pages(state, slot, pages)`: write one slot's block-table row (admission, growth).
* `prefill_chunk(params, state, slot, tokens, start, num_valid, spec)`: run a chunk of
  one request's prompt, writing its keys and values into the slot's pages; returns the
  logits at the chunk's last real token.
* `prefill_rows(params, state, tokens, start, num_valid, spec)`: a chunk for every slot
  at once (each its own prompt and position), as one call.
* `insert(state, slot, logits, request, spec)`: sample the first token from the
  prompt's last logits and start decoding the slot with the request's settings.
* `decode(params, state, spec)`: N decode steps for every decoding slot in one
  dispatch; returns (N, B) tokens and whether each is real.
* `release(state, slot)`: free a slot (finished or cancelled).

Every slot index, length, block table and setting is a traced array: one compilation
per step (per prefill bucket for `prefill_chunk`) serves every schedule. The state is
donated to every step, so its page pools are updated in place.

Sampling follows `jaxllama.sampling` row by row, with per-slot values instead of the
static `SamplerSpec`: a filter whose value is "off" (top_k 0, top_p 1, min_p 0) leaves
the logits exactly as the adapter's sampler does when that filter is not compiled in,
and step t of a request draws with ``fold_in(PRNGKey(seed), t)`` (the first token at
insert is step 0), so a request's tokens equal `LlamaInferenceAdapter.generate` of its
prompt alone with the same settings. The repetition penalty reads a (B, V) table of
each slot's seen tokens (prompt and output), as the adapter's sampler does.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxllama import backend
from jaxllama.engine.paged_cache import NO_PAGE, PagedKVCache
from jaxllama.engine.spec import EngineSpec, EngineState, SlotRequest
from jaxllama.errors import EngineSpecError
from jaxllama.sampling import apply_repetition_penalty
from jaxllama.models.transformer import KVCache, Params, decoder_layers, output_logits, rope_tables
from jaxllama.models.transformer import forward as transformer_forward
from jaxllama.pallas.paged_attention import (gather_pages, paged_attention,
                                             paged_attention_reference)

Array = jax.Array


# ----- the model over the paged cache ---------------------------------------------------


def _paged_attention(spec: EngineSpec, q, k_pages, v_pages, block_table, kv_lengths, q_offset,
                     sm_scale):
    args = (q, k_pages, v_pages, block_table, kv_lengths, q_offset)

    def twin():
        return paged_attention_reference(*args, sm_scale=sm_scale,
                                         sliding_window=spec.config.sliding_window)

    if spec.attention_impl == "xla":
        return twin()
    interpret = spec.attention_impl == "pallas_interpret"
    config = spec.config
    # The compiled kernel is probed first (the interpreter lowers on every backend): one
    # that does not compile here runs its twin, with one warning (the backend policy's
    # fallback, as for the model's other kernels).
    if not interpret and not backend.kernel_compiles(
            "paged_attention", paged_attention, args, dict(sm_scale=sm_scale),
            shape_class=(f"{q.dtype.name}, {config.num_heads} heads on {config.num_kv_heads} "
                         f"kv heads of dim {config.head_dim}"),
            twin="paged_attention_reference"):
        return twin()
    return paged_attention(*args, sm_scale=sm_scale, interpret=interpret)


def paged_forward(params: Params, tokens: Array, cache: PagedKVCache, block_table: Array,
                  start: Array, num_new: Array, *, spec: EngineSpec,
                  rope_end: Array | None = None) -> tuple[Array, PagedKVCache]:
    """Run `tokens` (B, T) at positions start[b] + t through the model, writing their keys
    and values through `block_table` (B, M) into the pools; row b's first num_new[b]
    tokens are real (the rest, and whole rows with num_new 0, write nothing). Query t of
    row b attends the row's positions [0, start[b] + t] (the pages already written plus
    this chunk, causal). Returns float32 logits (B, V) at each row's last real token
    (undefined for a row with num_new 0) and the new cache.

    The layers are `transformer.decoder_layers`, the ones `transformer.forward` runs,
    with the dense (B, K, S, H) cache replaced by the page pools in the `attend` step.
    `rope_end` (B,): the furthest position LongRoPE chooses its factors by (default
    each row's last real position; a prompt's chunks pass the prompt's end).
    """
    config = spec.config
    t = tokens.shape[1]
    mm = spec.policy.matmul  # the one backend policy
    start = start.astype(jnp.int32)
    num_new = num_new.astype(jnp.int32)
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    cos, sin = rope_tables(config, positions, start + num_new - 1 if rope_end is None
                           else rope_end.astype(jnp.int32))
    sm_scale = 1.0 / float(np.sqrt(config.head_dim))
    kv_lengths = start + num_new

    x = params.embed_rows(tokens)

    def attend(i, q, k, v):
        nonlocal cache
        cache = cache.write(i, k, v, block_table, start, num_new)
        return _paged_attention(spec, q, cache.k[i], cache.v[i], block_table, kv_lengths, start,
                                sm_scale)

    x = decoder_layers(params, x, cos, sin, attend, config=config, mm=mm)
    last = jnp.clip(num_new - 1, 0, t - 1)
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return output_logits(params, x, config=config, mm=mm), cache


# ----- per-slot sampling ----------------------------------------------------------------


def _filter_row(logits: Array, temperature, top_k, top_p, min_p, *, sort: bool = True) -> Array:
    """`jaxllama.sampling.filter_logits` for one row (V,), each filter switched by its
    value rather than statically; an "off" filter changes nothing. sort=False leaves
    out top-k and top-p (the sort over the vocabulary they need), which changes nothing
    for a row where both are off."""
    vocab = logits.shape[-1]
    logits = logits / temperature
    if sort:
        sorted_desc = -jnp.sort(-logits)
        use_k = top_k > 0
        kth = sorted_desc[jnp.clip(top_k, 1, vocab) - 1]
        logits = jnp.where(use_k & (logits < kth), -jnp.inf, logits)
        # By value, as sampling.filter_logits: ties with the k-th survive and top-p weighs them.
        sorted_desc = jnp.where(use_k & (sorted_desc < kth), -jnp.inf, sorted_desc)
        probs = jax.nn.softmax(sorted_desc)
        before = jnp.cumsum(probs) - probs
        keep = (before < top_p).at[0].set(True)
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf))
        logits = jnp.where((top_p < 1.0) & (logits < threshold), -jnp.inf, logits)
    probs = jax.nn.softmax(logits)
    limit = min_p * jnp.max(probs)
    return jnp.where((min_p > 0.0) & (probs < limit), -jnp.inf, logits)


def sample_rows(logits: Array, keys: Array, steps: Array, temperature: Array, top_k: Array,
                top_p: Array, min_p: Array, repetition_penalty: Array, seen: Array) -> Array:
    """Next token per row (B,) int32 from logits (B, V): the repetition penalty over the
    row's seen tokens (B, V) first, then argmax where temperature is 0, else a draw with
    key ``fold_in(keys[b], steps[b])`` from the filtered logits (`jaxllama.sampling`'s
    order).

    The work a batch needs is picked at run time, for the whole batch: a batch of greedy
    rows only takes the argmax, and one whose sampled rows all have top-k and top-p off
    skips the sort over the vocabulary. (Inside `vmap` a per-row choice would run every
    branch for every row; the sort alone cost more than the model's step at 32 slots
    on the CPU.) Each branch computes exactly what the full rule computes for the rows
    it serves, so the tokens do not depend on which other rows share the batch.
    """
    logits = jax.vmap(apply_repetition_penalty)(logits.astype(jnp.float32), seen,
                                                repetition_penalty)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    greedy = temperature <= 0.0

    def draw(sort: bool) -> Array:
        def one(row, key, step, temp, k, p, mp):
            filtered = _filter_row(row, temp, k, p, mp, sort=sort)
            return jax.random.categorical(jax.random.fold_in(key, step), filtered).astype(jnp.int32)

        drawn = jax.vmap(one)(logits, keys, steps, jnp.where(greedy, 1.0, temperature), top_k,
                              top_p, min_p)
        return jnp.where(greedy, greedy_tokens, drawn)

    needs_sort = jnp.any(~greedy & ((top_k > 0) | (top_p < 1.0)))
    sampled = lambda: jax.lax.cond(needs_sort, lambda: draw(True), lambda: draw(False))  # noqa: E731
    return jax.lax.cond(jnp.all(greedy), lambda: greedy_tokens, sampled)


@struct.dataclass
class TokenLogprobs:
    """Log-probabilities of the model's distribution (log-softmax of the raw logits,
    before the penalty, temperature and filters: what OpenAI's and vLLM's `logprobs`
    report) for sampled tokens. Leading axes as the tokens they go with; K is
    spec.top_logprobs."""

    logprob: Array  # (...,) float32, of the sampled token
    top_ids: Array  # (..., K) int32, best first
    top_logprobs: Array  # (..., K) float32


def token_logprobs(logits: Array, tokens: Array, k: int) -> TokenLogprobs:
    """logits (B, V), tokens (B,) -> TokenLogprobs with leading axis B."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    if k:
        top, ids = jax.lax.top_k(logp, k)
    else:
        top = jnp.zeros(logp.shape[:-1] + (0,), jnp.float32)
        ids = jnp.zeros(logp.shape[:-1] + (0,), jnp.int32)
    return TokenLogprobs(logprob=chosen, top_ids=ids.astype(jnp.int32), top_logprobs=top)


def _mark_seen(seen: Array, tokens: Array, rows_on: Array) -> Array:
    """seen (B, V) with seen[b, tokens[b]] set where rows_on[b]."""
    rows = jnp.arange(seen.shape[0])
    return seen.at[rows, tokens].max(rows_on)


def _is_stop(tokens: Array, stop_ids: Array) -> Array:
    """(B,) bool: tokens[b] is one of slot b's stop ids (B, E)."""
    return jnp.any(tokens[:, None] == stop_ids, axis=-1)


# ----- the steps ------------------------------------------------------------------------


@functools.partial(jax.jit, donate_argnames=("state",))
def set_pages(state: EngineState, slot: Array, pages: Array) -> EngineState:
    """The state with slot `slot`'s block-table row set to `pages` (M,) int32
    (NO_PAGE where none); the host calls it when it admits a request and when the
    request's pages grow."""
    return state.replace(block_table=state.block_table.at[slot].set(pages.astype(jnp.int32)))


def _window_table(block_table: Array, spec: EngineSpec, window: int | None, what: str) -> Array:
    """The first `window` pages of every slot's table (None: all of them)."""
    if window is None:
        return block_table
    if window not in spec.windows:
        # Each width is its own compiled program: only spec.windows are allowed.
        raise EngineSpecError(
            f"{what}: window is {window!r}; expected None or one of EngineSpec.windows "
            f"{spec.windows} (spec.window(pages) picks one)")
    return block_table[:, :window]


@functools.partial(jax.jit, static_argnames=("spec", "window"), donate_argnames=("state",))
def prefill_chunk(params: Params, state: EngineState, slot: Array, tokens: Array, start: Array,
                  num_valid: Array, spec: EngineSpec, window: int | None = None,
                  rope_end: Array | None = None) -> tuple[EngineState, Array]:
    """Run a chunk of one request's prompt in slot `slot` (not decoding).

    tokens (T,) int32, T one of spec.prefill_buckets, its first `num_valid` real; they
    are the prompt's positions [start, start + num_valid) and are written through the
    slot's block-table row (the host has set pages for them). Positions below `start`
    must already be in the slot's pages (earlier chunks, or shared prefix pages).
    Returns the state with the slot's length start + num_valid, and the float32 logits
    (V,) at the chunk's last real token (pass the last chunk's to `insert`).
    `window` (one of spec.windows, or None for all M) is how many of the slot's pages
    attention reads: it must hold positions [0, start + num_valid). A T that is not a
    bucket, or a window not in spec.windows, is refused (EngineSpecError) when the call
    is traced. `rope_end` (() int32, traced): the prompt's last position, which LongRoPE
    picks its factors by, so that a prompt run in chunks is rotated as one call over the
    whole prompt would be (default: this chunk's last position; other models ignore it).
    """
    if jnp.ndim(tokens) != 1 or jnp.shape(tokens)[0] not in spec.prefill_buckets:
        # Each length is its own compiled program: only the buckets are allowed, so a
        # session compiles at most len(prefill_buckets) prefill programs.
        raise EngineSpecError(
            f"prefill_chunk: tokens has shape {jnp.shape(tokens)}; expected (T,) with T one "
            f"of EngineSpec.prefill_buckets {spec.prefill_buckets} (pad the chunk to "
            f"spec.bucket(n) tokens and pass num_valid=n)"
        )
    table = _window_table(state.block_table[slot][None], spec, window, "prefill_chunk")
    start = jnp.asarray(start, jnp.int32)
    num_valid = jnp.asarray(num_valid, jnp.int32)
    logits, cache = paged_forward(params, tokens[None].astype(jnp.int32), state.cache, table,
                                  start[None], num_valid[None], spec=spec,
                                  rope_end=None if rope_end is None
                                  else jnp.asarray(rope_end, jnp.int32)[None])
    state = state.replace(cache=cache, lengths=state.lengths.at[slot].set(start + num_valid))
    return state, logits[0]


@functools.partial(jax.jit, static_argnames=("spec", "window"), donate_argnames=("state",))
def prefill_rows(params: Params, state: EngineState, tokens: Array, start: Array,
                 num_valid: Array, spec: EngineSpec, window: int | None = None,
                 rope_end: Array | None = None) -> tuple[EngineState, Array]:
    """`prefill_chunk` for every slot at once: slot b runs tokens[b] (B, T), its first
    num_valid[b] real, at positions [start[b], start[b] + num_valid[b]); a slot with
    num_valid 0 is left as it is (nothing written, its length kept). The prompts of a
    batch share the program's matmuls, as one (B * T)-row call, instead of B calls of T
    rows. Returns the state and the float32 logits (B, V) at each slot's last real
    token (undefined where num_valid is 0). T and `window` as `prefill_chunk`'s (a T
    that is not a bucket or a window not in spec.windows is refused when traced);
    `rope_end` (B,) as `prefill_chunk`'s, per slot."""
    if (jnp.ndim(tokens) != 2 or jnp.shape(tokens)[0] != spec.num_slots
            or jnp.shape(tokens)[1] not in spec.prefill_buckets):
        raise EngineSpecError(
            f"prefill_rows: tokens has shape {jnp.shape(tokens)}; expected (B, T) with B = "
            f"EngineSpec.num_slots ({spec.num_slots}) and T one of "
            f"EngineSpec.prefill_buckets {spec.prefill_buckets}"
        )
    table = _window_table(state.block_table, spec, window, "prefill_rows")
    start = jnp.asarray(start, jnp.int32)
    num_valid = jnp.asarray(num_valid, jnp.int32)
    logits, cache = paged_forward(params, tokens.astype(jnp.int32), state.cache, table, start,
                                  num_valid, spec=spec,
                                  rope_end=None if rope_end is None
                                  else jnp.asarray(rope_end, jnp.int32))
    lengths = jnp.where(num_valid > 0, start + num_valid, state.lengths)
    return state.replace(cache=cache, lengths=lengths), logits


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def insert(state: EngineState, slot: Array, logits: Array, request: SlotRequest,
           spec: EngineSpec) -> tuple[EngineState, Array, TokenLogprobs]:
    """Start decoding a prefilled slot: sample its first token (step 0) from the
    prompt's last logits (V,) with the request's settings, and store the settings.

    Returns the state, the first token (() int32) and its log-probabilities (leading
    shape ()). The slot is finished at once if that token is a stop id or max_tokens
    is 1 (it then idles until `release`).
    """
    key = jax.random.PRNGKey(request.seed)
    token = sample_rows(
        logits[None], key[None], jnp.zeros((1,), jnp.int32), request.temperature[None],
        request.top_k[None], request.top_p[None], request.min_p[None],
        request.repetition_penalty[None], request.seen[None],
    )[0]
    logprobs = jax.tree.map(lambda a: a[0], token_logprobs(logits[None], token[None],
                                                           spec.top_logprobs))
    seen = request.seen.at[token].set(True)
    done = jnp.any(token == request.stop_ids) | (request.max_tokens <= 1)
    s = slot
    state = state.replace(
        last_token=state.last_token.at[s].set(token),
        active=state.active.at[s].set(True),
        finished=state.finished.at[s].set(done),
        generated=state.generated.at[s].set(1),
        max_tokens=state.max_tokens.at[s].set(request.max_tokens),
        stop_ids=state.stop_ids.at[s].set(request.stop_ids),
        keys=state.keys.at[s].set(key),
        temperature=state.temperature.at[s].set(request.temperature),
        top_k=state.top_k.at[s].set(request.top_k),
        top_p=state.top_p.at[s].set(request.top_p),
        min_p=state.min_p.at[s].set(request.min_p),
        repetition_penalty=state.repetition_penalty.at[s].set(request.repetition_penalty),
        seen=state.seen.at[s].set(seen),
    )
    return state, token, logprobs


def _has_page(block_table: Array, lengths: Array, page_size: int) -> Array:
    """(B,) bool: the slot's next position (its length) has a page in `block_table`
    (B, M') to be written to."""
    logical = lengths // page_size
    max_pages = block_table.shape[1]
    page = jnp.take_along_axis(block_table, jnp.clip(logical, 0, max_pages - 1)[:, None],
                               axis=1)[:, 0]
    return (logical < max_pages) & (page != NO_PAGE)


def _runs(state: EngineState, table: Array, spec: EngineSpec) -> Array:
    """(B,) bool: the slots a decode step advances (decoding, with a page for their next
    position within `table`)."""
    return state.active & ~state.finished & _has_page(table, state.lengths, spec.page_size)


def _decode_dense(params: Params, state: EngineState, table: Array, spec: EngineSpec, step_out):
    """The decode scan of `decode` on the XLA path, over a dense copy of the window.

    Each layer's pages in `table` (B, M') are gathered once into a dense (B, K, M' * L, H)
    `KVCache`, the N steps run `transformer.forward` over it (the adapter's decode
    forward, `transformer.decode_step`), and the N steps' new keys and values are then
    written back into the pages. Gathering in every step instead (what the paged
    attention twin does) copied the whole window once per step, about half of a
    32-slot step on the CPU (benchmarks/RESULTS.md); here it is copied once per dispatch.
    The running slots, the tokens and the state are those of the per-step scan: only
    where the keys and values are read from differs.
    """
    config = spec.config
    policy = spec.policy
    start = state.lengths
    dense = KVCache(k=tuple(gather_pages(k, table) for k in state.cache.k),
                    v=tuple(gather_pages(v, table) for v in state.cache.v),
                    lengths=start)

    def step(carry, _):
        state, dense = carry
        runs = _runs(state, table, spec)
        logits, dense = transformer_forward(
            params, state.last_token[:, None], dense.replace(lengths=state.lengths),
            runs.astype(jnp.int32), config=config, attention_impl=policy)
        state, out = step_out(state, runs, logits, state.cache)
        return (state, dense), out

    (state, dense), outs = jax.lax.scan(step, (state, dense), None, length=spec.decode_steps)
    # Positions start[b] + n, n < written[b], are the dispatch's new entries of slot b.
    written = state.lengths - start
    positions = start[:, None] + jnp.arange(spec.decode_steps, dtype=jnp.int32)[None, :]
    positions = jnp.clip(positions, 0, dense.max_len - 1)

    def new_entries(x):  # (B, K, S, H) -> (B, N, K, H) at `positions`
        picked = jnp.take_along_axis(x, positions[:, None, :, None], axis=2)
        return jnp.swapaxes(picked, 1, 2)

    cache = state.cache
    for i in range(config.num_layers):
        cache = cache.write(i, new_entries(dense.k[i]), new_entries(dense.v[i]), table, start,
                            written)
    return state.replace(cache=cache), outs


# The per-slot fields of EngineState (everything but the page pools).
_SLOT_FIELDS = tuple(f.name for f in dataclasses.fields(EngineState) if f.name != "cache")


@functools.partial(jax.jit, static_argnames=("spec", "window"), donate_argnames=("state",))
def decode(params: Params, state: EngineState, spec: EngineSpec, window: int | None = None,
           rows: Array | None = None) -> tuple[EngineState, Array, Array, TokenLogprobs]:
    """spec.decode_steps decode steps for every decoding slot, in one dispatch.

    Each step feeds every running slot's last token, writes its key and value at the
    slot's length, and samples the next token with the slot's settings and step key. A
    slot stops running at a stop id or at max_tokens (finished), and waits (neither
    finished nor advancing) while its next position has no page: the host grows its
    pages before the next dispatch. Returns the state, tokens (N, B) int32, valid
    (N, B) bool (token [n, b] is slot b's next output iff valid[n, b]) and the tokens'
    log-probabilities (leading shape (N, B)).

    `window` (one of spec.windows, or None for all M) is how many pages of each slot's
    table attention reads; a slot whose next position lies past it waits as if it had
    no page. The host passes the narrowest window that holds every decoding slot's
    pages for the N steps, so the cost of a step follows the longest running request,
    not max_pages_per_slot.

    `rows` (W,) int32, distinct slot indices with W one of spec.decode_widths (None:
    all B slots): only those slots are run, W at a time, so a step costs W slots, not
    B. Every decoding slot must be among them (a slot left out does not advance); the
    others may be any slots that are not decoding, which they leave unchanged. Outputs
    keep the (N, B) layout (invalid outside `rows`).
    """
    batch = spec.num_slots
    if rows is None:
        rows = jnp.arange(batch, dtype=jnp.int32)
    elif jnp.ndim(rows) != 1 or jnp.shape(rows)[0] not in spec.decode_widths:
        raise EngineSpecError(
            f"decode: rows has shape {jnp.shape(rows)}; expected (W,) with W one of "
            f"EngineSpec.decode_widths {spec.decode_widths} (spec.decode_width(n) picks one)")
    rows = jnp.asarray(rows, jnp.int32)
    whole = state
    state = state.replace(**{f: getattr(whole, f)[rows] for f in _SLOT_FIELDS})
    table = _window_table(state.block_table, spec, window, "decode")

    def step_out(state: EngineState, runs: Array, logits: Array, cache: PagedKVCache):
        """Sample from one step's logits and advance the running slots."""
        nxt = sample_rows(logits, state.keys, state.generated, state.temperature, state.top_k,
                          state.top_p, state.min_p, state.repetition_penalty, state.seen)
        logprobs = token_logprobs(logits, nxt, spec.top_logprobs)
        generated = state.generated + runs.astype(jnp.int32)
        done = runs & (_is_stop(nxt, state.stop_ids) | (generated >= state.max_tokens))
        state = state.replace(
            cache=cache,
            lengths=state.lengths + runs.astype(jnp.int32),
            last_token=jnp.where(runs, nxt, state.last_token),
            generated=generated,
            finished=state.finished | done,
            seen=_mark_seen(state.seen, nxt, runs),
        )
        return state, (jnp.where(runs, nxt, 0), runs, logprobs)

    def step(state: EngineState, _):
        runs = _runs(state, table, spec)
        logits, cache = paged_forward(params, state.last_token[:, None], state.cache,
                                      table, state.lengths, runs.astype(jnp.int32),
                                      spec=spec)
        return step_out(state, runs, logits, cache)

    if spec.attention_impl == "xla":
        state, (tokens, valid, logprobs) = _decode_dense(params, state, table, spec, step_out)
    else:
        state, (tokens, valid, logprobs) = jax.lax.scan(step, state, None,
                                                        length=spec.decode_steps)
    # Back into the (B, ...) state; the block table is the host's and is not changed here.
    merged = {f: getattr(whole, f).at[rows].set(getattr(state, f))
              for f in _SLOT_FIELDS if f != "block_table"}
    state = whole.replace(cache=state.cache, **merged)

    def spread(x):  # (N, W, ...) -> (N, B, ...), zeros outside rows
        return jnp.zeros((x.shape[0], batch) + x.shape[2:], x.dtype).at[:, rows].set(x)

    return state, spread(tokens), spread(valid), jax.tree.map(spread, logprobs)


@functools.partial(jax.jit, donate_argnames=("state",))
def release(state: EngineState, slot: Array) -> EngineState:
    """Free slot `slot` (finished or cancelled): inactive, length 0, no pages. The
    pages themselves are the host allocator's to free; the pools are not touched."""
    s = slot
    return state.replace(
        block_table=state.block_table.at[s].set(NO_PAGE),
        lengths=state.lengths.at[s].set(0),
        active=state.active.at[s].set(False),
        finished=state.finished.at[s].set(False),
        generated=state.generated.at[s].set(0),
        seen=state.seen.at[s].set(False),
    )


__all__ = [
    "EngineSpec", "EngineState", "SlotRequest", "decode", "insert", "paged_forward",
    "TokenLogprobs", "prefill_chunk", "prefill_rows", "release", "sample_rows", "set_pages", "token_logprobs",
]
