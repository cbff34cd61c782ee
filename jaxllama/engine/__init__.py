"""The serving engine (issue 17): many requests at once over a fixed batch of decode
slots, a paged KV cache, automatic prefix caching and chunked prefill.

What is here:

* `jaxllama.engine.scheduler`: `Engine`, the host-side scheduler thread that admits
  requests into slots, interleaves prompt chunks with decode dispatches, streams each
  request's tokens (iterator, async iterator, callback), cancels, and keeps metrics.
* `jaxllama.engine.spec`: `EngineSpec`, the frozen, hashable engine description (the
  one static argument of the steps), with `check_fits` (whether a request can ever
  run); `SlotRequest`, one request's checked settings; and `EngineState`, the pytree
  of device arrays the steps read and write.
* `jaxllama.engine.steps`: the pure jitted steps over the state: `set_pages`,
  `prefill_chunk` (one prompt chunk, padded to a prefill bucket), `insert` (sample
  the first token and start a slot), `decode` (N steps for every slot in one
  dispatch) and `release`; and `paged_forward`, the model over the paged cache.
* `jaxllama.engine.paged_cache`: the per-layer K/V page pools (a pytree) and the pure
  functions that write a chunk of new keys and values through a block table and
  gather a slot's pages back into a dense view.
* `jaxllama.engine.pages`: the host-side page allocator, with reference counts and an
  LRU of unreferenced pages kept for prefix caching.

Attention over the pools is `jaxllama.pallas.paged_attention` (the Pallas kernel and
its XLA gather twin).
"""
