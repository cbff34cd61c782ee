"""The host side of the engine: a scheduler thread that serves many requests at once
over the pure steps of `jaxllama.engine.steps`.

    engine = Engine.from_adapter(adapter, num_slots=8)
    with engine:                                   # start() ... close()
        handle = engine.submit(prompt_ids, max_tokens=64, temperature=0.7, seed=1)
        for token in handle:                        # or `async for`, or a callback
            ...
        handle.result().finish_reason               # "stop", "length" or "cancelled"

One loop iteration, on the scheduler thread (the only one that touches the engine
state and the page allocator):

1. take new requests and cancellations from the inbox;
2. free the slot and pages of every cancelled request;
3. admit waiting requests (first come, first served) into free slots: reuse the
   prompt's leading pages already in the prefix cache, allocate pages for the rest of
   the prompt, and reserve (not allocate) the pages its output can grow into, so that
   growth never waits on another request and no request is ever preempted;
4. run prompt chunks (each at most `EngineSpec.chunk_size` tokens), oldest prefilling
   request first: while slots were decoding when the iteration began, until the next
   chunk would pass `prefill_budget` prompt tokens times the number of requests
   waiting for their prompt per decoding slot (at least one chunk runs); while none
   were, every pending chunk (no stream waits on them). A request whose prompt is done
   is inserted (its first token sampled) and its full prompt pages offered to the
   prefix cache;
5. allocate the pages every decoding slot needs for the next N positions;
6. one `decode` dispatch of N steps for the decoding slots (run at the narrowest of
   `EngineSpec.decode_widths` that holds them); its tokens go to their requests,
   and a request that ended (a stop id or max_tokens, decided on the host by the same
   rule as on the device) frees its slot and pages.

So a long prompt arriving while streams decode delays them by at most one budget (one
chunk by default) per N tokens. A burst of requests is prefilled in a few iterations
instead: when nothing decodes nobody waits on a prompt, and while its first members
decode the budget grows with the requests still waiting per decoding stream. Run one
chunk at a time between decode dispatches instead, and the first requests of a
32-request burst finish before the last start (a CPU pays a dispatch by its width, not
by the streams it carries): 0.72x the sequential throughput, measured.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllama import backend
from jaxllama.engine import steps
from jaxllama.engine.pages import PageAllocator, prefix_keys
from jaxllama.engine.paged_cache import NO_PAGE
from jaxllama.engine.spec import EngineSpec, EngineState, SlotRequest
from jaxllama.errors import EngineClosed, InvalidRequestError, QueueFull

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """A finished request. Times in seconds (monotonic clock differences)."""

    request_id: int
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str
    cached_tokens: int
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    queue_time: float | None
    ttft: float | None
    inter_token_times: list[float]
    e2e: float


@dataclasses.dataclass(frozen=True)
class EngineMetrics:
    """A snapshot of the engine's counters (`Engine.metrics()`)."""

    requests_running: int
    requests_waiting: int
    requests_finished: int
    slots_total: int
    slots_used: int
    pages_total: int
    pages_used: int
    pages_cached: int
    pages_free: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    prompt_tokens_total: int
    generation_tokens_total: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class RequestHandle:
    """One submitted request: iterate it (sync or async) for its token ids as they
    come, `cancel()` it, or wait for its `result()`. Made by `Engine.submit`."""

    def __init__(self, engine: "Engine", request_id: int, prompt: list[int], max_tokens: int,
                 slot_request: SlotRequest, stop_ids: frozenset[int], logprobs: int,
                 callback: Callable | None):
        self._engine = engine
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_len = len(prompt)
        self.max_tokens = max_tokens
        self._slot_request = slot_request
        self._stop_ids = stop_ids
        self._num_top = logprobs
        self._callback = callback
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.tokens: list[int] = []
        self.logprobs: list[float] | None = [] if logprobs else None
        self.top_logprobs: list[list[tuple[int, float]]] | None = [] if logprobs else None
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self.submitted = time.monotonic()
        self.admitted: float | None = None
        self._times: list[float] = []
        self._ended: float | None = None

    # -- consumer side ---------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._ended is not None

    def cancel(self) -> None:
        """Stop the request (idempotent): its slot and pages are freed within one
        scheduler iteration; its iterators end, finish_reason "cancelled"."""
        if not self.done:
            self._cancel.set()
            self._engine._poke()

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                while i >= len(self.tokens) and not self.done:
                    self._cond.wait()
                if i < len(self.tokens):
                    token = self.tokens[i]
                elif self._error is not None:
                    raise self._error
                else:
                    return
            i += 1
            yield token

    async def __aiter__(self):
        i = 0
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if i < len(self.tokens):
                    token = self.tokens[i]
                    future = None
                elif self.done:
                    if self._error is not None:
                        raise self._error
                    return
                else:
                    future = loop.create_future()
                    self._waiters.append((loop, future))
            if future is not None:
                await future
                continue
            i += 1
            yield token

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Wait for the end (TimeoutError past `timeout` seconds); raises the error that
        ended the request, if one did (EngineClosed)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.request_id} still running after {timeout} s")
            if self._error is not None:
                raise self._error
        times = [self.submitted] + self._times
        return RequestOutput(
            request_id=self.request_id, prompt_tokens=self.prompt_len, tokens=list(self.tokens),
            finish_reason=self.finish_reason, cached_tokens=self.cached_tokens,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            top_logprobs=None if self.top_logprobs is None else list(self.top_logprobs),
            queue_time=None if self.admitted is None else self.admitted - self.submitted,
            ttft=self._times[0] - self.submitted if self._times else None,
            inter_token_times=list(np.diff(times[1:]).tolist()),
            e2e=self._ended - self.submitted,
        )

    # -- scheduler side --------------------------------------------------------------

    def _wake(self) -> None:
        """Under self._cond: wake sync and async consumers."""
        self._cond.notify_all()
        for loop, future in self._waiters:
            loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_result(None))
        self._waiters.clear()

    def _push(self, token: int, logprob: float | None, top, now: float) -> None:
        with self._cond:
            self.tokens.append(token)
            self._times.append(now)
            if self.logprobs is not None:
                self.logprobs.append(logprob)
                self.top_logprobs.append(top)
            self._wake()
        if self._callback is not None:
            self._callback(self, token)

    def _finish(self, reason: str | None, error: BaseException | None = None) -> None:
        with self._cond:
            if self.done:
                return
            self.finish_reason = reason
            self._error = error
            self._ended = time.monotonic()
            self._wake()
        if self._callback is not None:
            self._callback(self, None)

    def _finished_by(self, token: int) -> str | None:
        """The device's rule (steps.decode / insert), on the host."""
        if token in self._stop_ids:
            return FINISH_STOP
        if len(self.tokens) >= self.max_tokens:
            return FINISH_LENGTH
        return None


@dataclasses.dataclass
class _Running:
    """A request in a slot (scheduler thread only)."""

    handle: RequestHandle
    slot: int
    pages: list[int]  # prefix order: shared prefix pages, then its own
    budget: int  # pages it may hold in all (prompt + max_tokens)
    prefilled: int  # prompt tokens whose keys are in the pages
    decoding: bool = False

    @property
    def reserved(self) -> int:
        return self.budget - len(self.pages)


class Engine:
    """Serves many requests at once (see the module doc). Build with `from_adapter`.

    Args:
      params: the model's params pytree (the adapter's `model.params`).
      spec: the engine description.
      eos_ids: the default stop ids of a request.
      prefix_caching: reuse full prompt pages across requests (vLLM's automatic prefix
        caching); False computes every prompt afresh.
      max_waiting: the most requests waiting for a slot; `submit` raises QueueFull past
        it. None: unbounded.
      prefill_budget: the prompt tokens one scheduler iteration may run before its
        decode dispatch, per request waiting for its prompt per decoding slot, while
        slots are decoding (whole chunks; at least one chunk runs). None:
        spec.chunk_size (one chunk).
    """

    def __init__(self, params, spec: EngineSpec, *, eos_ids: Sequence[int] = (),
                 prefix_caching: bool = True, max_waiting: int | None = None,
                 prefill_budget: int | None = None, plan=None):
        """`plan`: the `jaxllama.sharding.ShardingPlan` the params are placed by, if they
        are on a mesh (`from_adapter` passes the adapter's); the engine state is then
        made on the same mesh."""
        if prefill_budget is None:
            prefill_budget = spec.chunk_size
        if (isinstance(prefill_budget, bool) or not isinstance(prefill_budget, int)
                or prefill_budget < 1):
            raise InvalidRequestError(f"prefill_budget is {prefill_budget!r}; expected None or "
                                      f"an integer >= 1 (prompt tokens per iteration)")
        self.prefill_budget = prefill_budget
        if max_waiting is not None and (isinstance(max_waiting, bool)
                                        or not isinstance(max_waiting, int) or max_waiting < 0):
            raise InvalidRequestError(f"max_waiting is {max_waiting!r}; expected None or an "
                                      f"integer >= 0")
        self.params = params
        self.spec = spec
        self.eos_ids = tuple(int(t) for t in eos_ids)
        self.max_waiting = max_waiting
        self._alloc = PageAllocator(spec.num_pages, spec.page_size, prefix_caching=prefix_caching)
        if plan is not None:  # the one backend policy: which kernels run on a mesh
            backend.check("attention", spec.attention_impl, what="Engine attention",
                          sharded=True)
        self.plan = plan
        self._state = EngineState.create(spec, params.dtype, plan)
        # One pass over the weights in page-rows (one page of K and V in every layer):
        # what a decode dispatch costs beyond its attention (`_decode_groups`).
        config = spec.config
        page_bytes = (config.num_layers * 2 * config.num_kv_heads * spec.page_size
                      * config.head_dim * self._state.cache.k[0].dtype.itemsize)
        self._weight_pages = sum(getattr(x, "nbytes", 0)
                                 for x in jax.tree.leaves(params)) / page_bytes
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the counters below and _closed
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._num_waiting = 0
        self._running: dict[int, _Running] = {}  # slot -> request
        self._next_id = 0
        self._finished = 0
        self._prompt_total = 0
        self._generated_total = 0
        self._closed = False
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_adapter(cls, adapter, *, num_slots: int = 8, max_context: int | None = None,
                     page_size: int = 16, num_pages: int | None = None,
                     prefill_chunk: int = 256, decode_steps: int = 8,
                     prefix_caching: bool = True, max_waiting: int | None = None,
                     top_logprobs: int = 0, attention: str = "xla",
                     prefill_budget: int | None = None) -> "Engine":
        """An engine over a loaded adapter's params. max_context (prompt + output tokens
        of one request) defaults to min(the model's context, 4096); num_pages to enough
        for every slot at max_context; the prefill buckets are the powers of 2 from 16
        up to prefill_chunk, and prefill_chunk itself (a prompt's first chunk is padded
        to its bucket: finer buckets waste fewer tokens and compile a few more programs)."""
        config = adapter.config
        if max_context is None:
            max_context = min(config.context_length, 4096)
        for name, value in (("max_context", max_context), ("page_size", page_size),
                            ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} is {value!r}; expected an integer >= 1")
        max_pages = math.ceil(max_context / page_size)
        if num_pages is None:
            num_pages = num_slots * max_pages if isinstance(num_slots, int) else 1
        buckets = sorted({b for b in (16, 32, 64, 128, 256, 512, 1024) if b < prefill_chunk}
                         | {prefill_chunk})
        eos = adapter.eos_ids()
        spec = EngineSpec(config=config, num_slots=num_slots, page_size=page_size,
                          num_pages=num_pages, max_pages_per_slot=max_pages,
                          prefill_buckets=tuple(buckets), attention_impl=attention,
                          decode_steps=decode_steps, max_stop_ids=max(4, len(eos) + 4),
                          top_logprobs=top_logprobs, matmul_impl=adapter.policy.matmul)
        return cls(adapter.model.params, spec, eos_ids=eos, prefix_caching=prefix_caching,
                   max_waiting=max_waiting, prefill_budget=prefill_budget,
                   plan=adapter.model.plan)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> "Engine":
        """Start the scheduler thread (once)."""
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed; make a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="jaxllama-engine",
                                                daemon=True)
                self._thread.start()
        return self

    def close(self, timeout: float | None = 30.0) -> None:
        """End every request (EngineClosed to its consumers) and stop the thread."""
        with self._lock:
            self._closed = True
        self._poke()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._fail_all(EngineClosed("the engine was closed before the request finished"))

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def warmup(self) -> None:
        """Compile every step program (each prefill bucket, insert, decode, set_pages,
        release) so that no request waits for a compilation. Runs on the scheduler
        thread if it is started; blocks until done."""
        if self._thread is None:
            self._warmup()
            return
        done = threading.Event()
        self._inbox.put(("warmup", done))
        while not done.wait(0.1):
            if self._failure is not None or not self._thread.is_alive():
                raise EngineClosed("the engine stopped during warmup") from self._failure

    # -- requests --------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], max_tokens: int, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
               repetition_penalty: float = 1.0, seed: int = 0,
               stop_ids: Sequence[int] | None = None, logprobs: int = 0,
               callback: Callable | None = None) -> RequestHandle:
        """Queue a request; see the module doc. Settings as `adapter.generate`'s
        (`AdapterForwardConfig`). stop_ids None: the model's EOS ids. logprobs k >= 1:
        each token's log-probability and the k best (k <= spec.top_logprobs).

        Raises:
          InvalidRequestError: a bad value, or a request that can never fit (prompt +
            max_tokens beyond a slot, the page pool, or the model's context).
          QueueFull: max_waiting requests are waiting already.
          EngineClosed: the engine is closed (or stopped on an error).
        """
        prompt = _token_ids(prompt_ids, self.spec.config.vocab_size)
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not (
                0 <= logprobs <= self.spec.top_logprobs):
            raise InvalidRequestError(
                f"logprobs is {logprobs!r}; expected an integer in [0, "
                f"{self.spec.top_logprobs}] (this engine's top_logprobs)"
            )
        stops = self.eos_ids if stop_ids is None else tuple(stop_ids)
        request = SlotRequest.create(
            self.spec, max_tokens=max_tokens, stop_ids=stops, temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
            seed=seed, prompt_len=len(prompt), prompt_ids=prompt,
        )
        with self._lock:
            if self._closed or self._failure is not None:
                raise EngineClosed("the engine is closed" if self._failure is None else
                                   f"the engine stopped on an error: {self._failure!r}")
            if self.max_waiting is not None and self._num_waiting >= self.max_waiting:
                raise QueueFull(f"{self._num_waiting} requests are waiting, the most this "
                                f"engine queues (max_waiting={self.max_waiting})")
            handle = RequestHandle(self, self._next_id, prompt, int(max_tokens), request,
                                   frozenset(int(t) for t in stops), logprobs, callback)
            self._next_id += 1
            self._num_waiting += 1
        self._inbox.put(("submit", handle))
        return handle

    def metrics(self) -> EngineMetrics:
        with self._lock:
            running = len(self._running)
            alloc = self._alloc
            return EngineMetrics(
                requests_running=running, requests_waiting=self._num_waiting,
                requests_finished=self._finished, slots_total=self.spec.num_slots,
                slots_used=running, pages_total=alloc.num_pages, pages_used=alloc.num_used,
                pages_cached=alloc.num_cached, pages_free=alloc.num_free,
                prefix_query_tokens=alloc.queries_tokens, prefix_hit_tokens=alloc.hit_tokens,
                prompt_tokens_total=self._prompt_total,
                generation_tokens_total=self._generated_total,
            )

    # -- the scheduler thread ------------------------------------------------------

    def _poke(self) -> None:
        self._inbox.put(("poke", None))

    def _loop(self) -> None:
        try:
            while True:
                busy = bool(self._running)
                try:
                    item = self._inbox.get(timeout=None if not busy and not self._waiting else 0)
                except queue.Empty:
                    item = None
                while item is not None:
                    self._take(item)
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        item = None
                with self._lock:
                    if self._closed:
                        return
                self._cancel_marked()
                self._admit()
                self._prefill()
                self._decode()
        except BaseException as exc:  # noqa: BLE001 - every request must hear of it
            with self._lock:
                self._failure = exc
            self._fail_all(EngineClosed(f"the engine stopped on an error: {exc!r}"))

    def _take(self, item) -> None:
        kind, value = item
        if kind == "submit":
            self._waiting.append(value)
        elif kind == "warmup":
            self._warmup()
            value.set()

    def _fail_all(self, error: BaseException) -> None:
        handles = [r.handle for r in self._running.values()] + list(self._waiting)
        while True:  # submitted but not yet taken from the inbox
            try:
                kind, value = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                handles.append(value)
            elif kind == "warmup":
                value.set()
        for handle in handles:
            handle._finish(None, error)

    def _end(self, run: _Running, reason: str) -> None:
        self._state = steps.release(self._state, np.int32(run.slot))
        with self._lock:
            self._alloc.free(run.pages)
            del self._running[run.slot]
            self._finished += 1
        run.handle._finish(reason)

    def _cancel_marked(self) -> None:
        for run in list(self._running.values()):
            if run.handle._cancel.is_set():
                self._end(run, FINISH_CANCELLED)
        kept = collections.deque()
        for handle in self._waiting:
            if handle._cancel.is_set():
                with self._lock:
                    self._num_waiting -= 1
                    self._finished += 1
                handle._finish(FINISH_CANCELLED)
            else:
                kept.append(handle)
        self._waiting = kept

    def _reserved(self) -> int:
        return sum(run.reserved for run in self._running.values())

    def _admit(self) -> None:
        spec, alloc = self.spec, self._alloc
        while self._waiting:
            free = [s for s in range(spec.num_slots) if s not in self._running]
            if not free:
                return
            handle = self._waiting[0]
            prompt = handle.prompt
            budget = math.ceil((len(prompt) + handle.max_tokens) / spec.page_size)
            with self._lock:
                # The last prompt token is always run (its logits give the first token).
                shared = alloc.match_prefix(prompt[:-1], spec.prefix_root(len(prompt)))
                own_prompt = math.ceil(len(prompt) / spec.page_size) - len(shared)
                if alloc.num_available - self._reserved() < budget - len(shared):
                    alloc.free(shared)  # not now: it waits for pages (first come, first served)
                    return
                pages = shared + alloc.allocate(own_prompt)
                self._num_waiting -= 1
                self._prompt_total += len(prompt)
            self._waiting.popleft()
            slot = free[0]
            handle.admitted = time.monotonic()
            handle.cached_tokens = len(shared) * spec.page_size
            run = _Running(handle, slot, pages, budget, prefilled=handle.cached_tokens)
            self._running[slot] = run
            self._set_pages(run)

    def _set_pages(self, run: _Running) -> None:
        row = np.full((self.spec.max_pages_per_slot,), NO_PAGE, np.int32)
        row[: len(run.pages)] = run.pages
        self._state = steps.set_pages(self._state, np.int32(run.slot), row)

    def _prefill(self) -> None:
        """Prompt chunks of the prefilling requests, oldest first. While slots decode,
        they run while they fit in prefill_budget times the number of requests waiting
        for their prompt per decoding slot (rounded up; the first chunk always runs);
        while none decodes, all of them."""
        decoding = sum(run.decoding for run in self._running.values())
        waiting = len(self._running) - decoding
        budget = self.prefill_budget * -(-waiting // decoding) if decoding else None
        spent = 0
        while True:
            pending = [r for r in self._running.values()
                       if not r.decoding and not r.handle._cancel.is_set()]
            if not pending:
                return
            run = min(pending, key=lambda r: r.handle.request_id)
            size = self.spec.chunk_len(run.prefilled, run.handle.prompt_len)
            if budget is not None and spent and spent + size > budget:
                return
            self._prefill_chunk(run)
            spent += size

    def _prefill_chunk(self, run: _Running) -> None:
        """The next chunk of `run`'s prompt; insert it when its prompt is done."""
        spec = self.spec
        prompt = run.handle.prompt
        start = run.prefilled
        chunk = prompt[start: start + spec.chunk_len(start, len(prompt))]
        length, window = spec.prefill_shape(start, len(chunk))
        tokens = np.zeros((length,), np.int32)
        tokens[: len(chunk)] = chunk
        self._state, logits = steps.prefill_chunk(
            self.params, self._state, np.int32(run.slot), tokens, np.int32(start),
            np.int32(len(chunk)), spec, window, np.int32(len(prompt) - 1))
        run.prefilled = start + len(chunk)
        if run.prefilled < len(prompt):
            return
        self._state, first, logprobs = steps.insert(
            self._state, np.int32(run.slot), logits, run.handle._slot_request, spec)
        run.decoding = True
        with self._lock:
            for page, key in zip(run.pages, prefix_keys(prompt, spec.page_size,
                                                        spec.prefix_root(len(prompt)))):
                if self._alloc.refcount(page) > 0:
                    self._alloc.register(page, key)
        token, logprobs = jax.device_get((first, logprobs))
        self._emit(run, int(token), logprobs, (), time.monotonic())

    def _emit(self, run: _Running, token: int, logprobs, index, now: float) -> bool:
        """Hand one token to its request; end the request if it finished. True if so.
        `now` is when the dispatch that made it returned: the tokens of one dispatch
        arrive together, and their times say so (a gap of 0 between them)."""
        handle = run.handle
        if handle._num_top:
            top = list(zip(np.asarray(logprobs.top_ids)[index][: handle._num_top].tolist(),
                           np.asarray(logprobs.top_logprobs)[index][: handle._num_top].tolist()))
            handle._push(token, float(np.asarray(logprobs.logprob)[index]), top, now)
        else:
            handle._push(token, None, None, now)
        with self._lock:
            self._generated_total += 1
        reason = handle._finished_by(token)
        if reason is not None:
            self._end(run, reason)
            return True
        return False

    def _decode(self) -> None:
        spec = self.spec
        decoding = [r for r in self._running.values() if r.decoding]
        if not decoding:
            return
        for run in decoding:
            in_cache = run.handle.prompt_len + len(run.handle.tokens) - 1
            need = min(math.ceil((in_cache + spec.decode_steps) / spec.page_size), run.budget,
                       spec.max_pages_per_slot)
            if need > len(run.pages):
                with self._lock:
                    run.pages += self._alloc.allocate(need - len(run.pages))
                self._set_pages(run)
        for group in self._decode_groups(decoding):
            window = spec.window(max(len(run.pages) for run in group))
            rows = self._rows(group)
            self._state, tokens, valid, logprobs = steps.decode(self.params, self._state, spec,
                                                                window, rows)
            tokens, valid, logprobs = jax.device_get((tokens, valid, logprobs))
            now = time.monotonic()
            for slot in rows.tolist():
                # Every decoding slot among the rows (a padding row may be one of another
                # group: it advances here as far as this window holds its positions).
                run = self._running.get(slot)
                if run is None or not run.decoding:
                    continue
                for n in range(spec.decode_steps):
                    if valid[n, slot] and self._emit(run, int(tokens[n, slot]), logprobs,
                                                     (n, slot), now):
                        break

    def _decode_groups(self, decoding: list[_Running]) -> list[list[_Running]]:
        """The decode dispatches of one iteration, in order: all decoding slots in one,
        or (XLA path) two when that lets most slots skip a long request's window.

        The XLA decode reads every row's whole window (a dense copy of it), so one
        request at a wide window makes every slot of the dispatch pay for it. Costing
        a dispatch as its width * window (page-rows read) plus one pass over the weights
        (`_weight_pages`, the weights' bytes in page-rows), the slots whose window is
        narrower than the widest run first as their own dispatch when that costs at most
        half of the one dispatch: their tokens then arrive at their own pace, and the
        wide slots run after them (one more weights pass, paid by the wide ones)."""
        spec = self.spec

        def cost(group):
            return (spec.decode_width(len(group))
                    * spec.window(max(len(run.pages) for run in group)) + self._weight_pages)

        if spec.attention_impl != "xla":
            return [decoding]  # the paged kernel reads each slot's own pages only
        widest = spec.window(max(len(run.pages) for run in decoding))
        narrow = [r for r in decoding if spec.window(len(r.pages)) < widest]
        if not narrow or 2 * cost(narrow) > cost(decoding):
            return [decoding]
        return [narrow, [r for r in decoding if spec.window(len(r.pages)) == widest]]

    def _rows(self, group: list[_Running]) -> np.ndarray:
        """The slots a decode dispatch runs: the group's, then slots that are not
        decoding (they stay as they are), then other decoding slots, up to the narrowest
        of spec.decode_widths that holds the group."""
        width = self.spec.decode_width(len(group))
        chosen = [run.slot for run in group]
        taken = set(chosen)
        others = sorted((s for s in range(self.spec.num_slots) if s not in taken),
                        key=lambda s: s in self._running and self._running[s].decoding)
        return np.asarray(chosen + others[: width - len(chosen)], np.int32)

    def _warmup(self) -> None:
        """Run every program a request can meet once, on scratch pages (freed after),
        outside any request: decode at every width and window, and prefill at every
        `spec.prefill_shapes()`."""
        spec = self.spec
        slot = next(s for s in range(spec.num_slots) if s not in self._running)
        n = min(math.ceil(spec.chunk_size / spec.page_size) + 1, spec.max_pages_per_slot)
        with self._lock:
            pages = self._alloc.allocate(min(n, self._alloc.num_available - self._reserved()))
        row = np.full((spec.max_pages_per_slot,), NO_PAGE, np.int32)
        row[: len(pages)] = pages
        state = steps.set_pages(self._state, np.int32(slot), row)
        logits = None
        for bucket, window in spec.prefill_shapes():
            # One real token at position 0: any window holds it.
            state, logits = steps.prefill_chunk(self.params, state, np.int32(slot),
                                                np.zeros((bucket,), np.int32), np.int32(0),
                                                np.int32(1), spec, window, np.int32(0))
        request = SlotRequest.create(spec, max_tokens=1)
        state, _, _ = steps.insert(state, np.int32(slot), logits, request, spec)
        # Decode with every slot marked inactive, so that no row runs (requests that
        # are running, if any, do not advance); then their marks are put back.
        active = state.active
        state = state.replace(active=jnp.zeros_like(active))
        for width in spec.decode_widths:
            rows = np.arange(width, dtype=np.int32)
            for window in spec.windows:
                state, *_ = steps.decode(self.params, state, spec, window, rows)
        state = state.replace(active=active)
        self._state = steps.release(state, np.int32(slot))
        jax.block_until_ready(self._state)
        with self._lock:
            self._alloc.free(pages)


def _token_ids(prompt_ids, vocab: int) -> list[int]:
    try:
        ids = [int(t) for t in prompt_ids]
        ok = all(not isinstance(t, bool) and float(t) == int(t) for t in prompt_ids)
    except (TypeError, ValueError):
        ok = False
    if not ok or not ids:
        raise InvalidRequestError(f"prompt_ids is {prompt_ids!r:.80}; expected a non-empty "
                                  f"sequence of token ids (integers)")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"prompt_ids holds {bad[0]}, outside the vocabulary "
                                  f"[0, {vocab})")
    return ids


__all__ = ["Engine", "EngineMetrics", "RequestHandle", "RequestOutput"]
