"""The serving engine (issue 17): many requests at once over a fixed batch of decode
slots, a paged KV cache, automatic prefix caching and chunked prefill.

The package will hold the engine description and its pure jitted steps (prefill a
chunk, insert into a slot, decode N steps), the host-side scheduler, and the metrics.
What is here so far:

* `jaxllama.engine.paged_cache`: the per-layer K/V page pools (a pytree) and the pure
  functions that write a chunk of new keys and values through a block table and
  gather a slot's pages back into a dense view.
* `jaxllama.engine.pages`: the host-side page allocator, with reference counts and an
  LRU of unreferenced pages kept for prefix caching.

Attention over the pools is `jaxllama.pallas.paged_attention` (the Pallas kernel and
its XLA gather twin).
"""
