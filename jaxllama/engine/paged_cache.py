"""The paged KV cache on the device: per-layer page pools and pure functions over them.

Einsum letters as in `jaxllama.pallas.paged_attention`: B slots, T new tokens per slot,
K kv heads, H head dim, P pages in the pool, L tokens per page, M pages per slot.

A pool is (K, P, L, H) per layer (kv head major; `jaxllama.pallas.paged_attention`
says why). Which pages a slot owns is the engine's block table, (B, M) int32: slot b's
position s is row ``s % L`` of page ``block_table[b, s // L]``; an entry < 0 marks a
page not allocated. The table and the lengths live in the engine state, not here, so
that one pool serves every slot and a slot's table is rewritten without touching the
pool. Every index below is a traced array: writing any slot at any position reuses
one compiled program per (B, T) shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxllama.errors import InvalidRequestError, library_errors
from jaxllama.models.config import ModelConfig
from jaxllama.pallas.paged_attention import gather_pages

Array = jax.Array

# Marks a block-table entry with no page behind it (writes to it are dropped).
NO_PAGE = -1


@struct.dataclass
class PagedKVCache:
    """Per-layer key and value page pools, (K, P, L, H) each."""

    k: tuple[Array, ...]
    v: tuple[Array, ...]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @classmethod
    def create(cls, config: ModelConfig, num_pages: int, page_size: int,
               dtype=jnp.float32) -> "PagedKVCache":
        """Zeroed pools of `num_pages` pages of `page_size` tokens for every layer."""
        if num_pages < 1 or page_size < 1:
            raise InvalidRequestError(
                f"PagedKVCache: num_pages={num_pages} and page_size={page_size}; "
                f"expected both >= 1"
            )
        shape = (config.num_kv_heads, num_pages, page_size, config.head_dim)
        zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731
        return cls(
            k=tuple(zeros() for _ in range(config.num_layers)),
            v=tuple(zeros() for _ in range(config.num_layers)),
        )

    def write(self, layer: int, k_new: Array, v_new: Array, block_table: Array,
              start: Array, num_new: Array) -> "PagedKVCache":
        """The cache with layer `layer`'s new keys and values written; see
        `write_pages` for the arguments (k_new, v_new (B, T, K, H))."""
        k = list(self.k)
        v = list(self.v)
        k[layer] = write_pages(k[layer], k_new, block_table, start, num_new)
        v[layer] = write_pages(v[layer], v_new, block_table, start, num_new)
        return PagedKVCache(k=tuple(k), v=tuple(v))


def page_rows(block_table: Array, start: Array, num_new: Array, seq_new: int,
              page_size: int, num_pages: int) -> Array:
    """Flat pool rows (page * L + offset) of positions start[b] + t, (B, T) int32.

    A position that is padding (t >= num_new[b]), negative, past the table's M * L
    positions, or whose table entry is not a page in [0, P), gets P * L: one past the
    last row, so a scatter with mode="drop" skips it and never lands on a real page.
    """
    max_pages = block_table.shape[1]
    t = jnp.arange(seq_new, dtype=jnp.int32)[None, :]
    pos = start.astype(jnp.int32)[:, None] + t  # (B, T)
    logical = jnp.floor_divide(pos, page_size)
    page = jnp.take_along_axis(
        block_table.astype(jnp.int32), jnp.clip(logical, 0, max_pages - 1), axis=1
    )
    ok = (
        (t < num_new.astype(jnp.int32)[:, None])
        & (pos >= 0)
        & (logical < max_pages)
        & (page >= 0)
        & (page < num_pages)
    )
    return jnp.where(ok, page * page_size + jnp.remainder(pos, page_size), num_pages * page_size)


@library_errors
def write_pages(pages: Array, new: Array, block_table: Array, start: Array,
                num_new: Array) -> Array:
    """Write a chunk of new keys (or values) into one layer's pool.

    Args:
      pages: (K, P, L, H) the pool.
      new: (B, T, K, H), slot b's token t goes to position start[b] + t (the layout
        the k/v projections produce, before any transpose).
      block_table: (B, M) int32, the slots' pages (NO_PAGE where none).
      start: (B,) int32, the position of new[b, 0] (usually the slot's length).
      num_new: (B,) int32, how many of the T tokens are real; the rest (padding of a
        bucketed chunk, or a whole inactive slot with num_new 0) are not written.

    Returns:
      The pool with those rows replaced, in the pool's dtype. Positions with no page
      behind them are dropped. Two slots must not write the same page row (a shared
      prefix page is full and only read); which write wins there is unspecified.
    """
    num_kv_heads, num_pages, page_size, head_dim = pages.shape
    batch, seq_new = new.shape[:2]
    if new.shape[2:] != (num_kv_heads, head_dim):
        raise InvalidRequestError(
            f"write_pages: new has shape {new.shape}; expected (B, T, {num_kv_heads}, "
            f"{head_dim}) for pages {pages.shape}"
        )
    if jnp.shape(block_table)[:1] != (batch,) or jnp.ndim(block_table) != 2:
        raise InvalidRequestError(
            f"write_pages: block_table has shape {jnp.shape(block_table)}; expected ({batch}, M)"
        )
    for name, x in (("start", start), ("num_new", num_new)):
        if jnp.shape(x) != (batch,):
            raise InvalidRequestError(f"write_pages: {name} has shape {jnp.shape(x)}; expected ({batch},)")
    rows = page_rows(block_table, start, num_new, seq_new, page_size, num_pages).reshape(-1)
    flat = pages.reshape(num_kv_heads, num_pages * page_size, head_dim)
    values = jnp.swapaxes(new.reshape(batch * seq_new, num_kv_heads, head_dim), 0, 1)
    flat = flat.at[:, rows].set(values.astype(pages.dtype), mode="drop")
    return flat.reshape(pages.shape)


@library_errors
def gather(pages: Array, block_table: Array) -> Array:
    """Slot-major dense view (B, K, M * L, H) of a (K, P, L, H) pool through the block
    table (entries clamped into [0, P); positions past a slot's length hold whatever
    their page holds)."""
    return gather_pages(pages, block_table)
