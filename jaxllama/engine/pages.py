"""The host side of the paged KV cache: which pages are free, in use, or cached.

Pure Python, no JAX: the scheduler calls it between device steps and writes the
resulting block tables into the engine state.

Every page is in exactly one of three states:

* free: holds nothing anyone may reuse;
* in use: referenced by one or more requests (``refcount > 0``); a full page whose
  tokens are known may also be registered in the prefix cache while in use, so that a
  request arriving now can share it;
* cached: unreferenced but registered, kept for a later request with the same prefix,
  and evicted least recently used first when free pages run out.

Prefix caching follows vLLM's automatic prefix caching: a full page is keyed by a hash
of (its parent page's key, its token ids), so a key names the whole prefix up to the
end of that page, and a request reuses every leading page whose key is present. Keys
are SHA-256 digests (a collision would silently serve another prompt's keys and
values; Python's 64-bit ``hash`` is too short for that).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

# Defined in jaxllama.errors with the library's other errors; importable from here.
from jaxllama.errors import PageAllocatorError, PagePoolExhausted

PageKey = bytes


def page_key(parent: PageKey | None, tokens: Sequence[int]) -> PageKey:
    """The prefix-cache key of a full page: SHA-256 of its parent's key and its token
    ids (as little-endian int64)."""
    digest = hashlib.sha256(parent or b"root")
    digest.update(np.asarray(tokens, dtype="<i8").tobytes())
    return digest.digest()


def prefix_keys(tokens: Sequence[int], page_size: int,
                root: PageKey | None = None) -> list[PageKey]:
    """The keys of the full pages of `tokens`, in order (a partial last page has none).
    `root` starts the chain elsewhere: pages whose keys and values were computed
    differently for the same tokens (LongRoPE's long factors) get keys of their own."""
    keys: list[PageKey] = []
    parent = root
    for start in range(0, len(tokens) - page_size + 1, page_size):
        parent = page_key(parent, tokens[start : start + page_size])
        keys.append(parent)
    return keys


class PageAllocator:
    """Reference-counted pages with an LRU prefix cache.

    Args:
      num_pages: pages in the pool (page ids 0 .. num_pages - 1).
      page_size: tokens per page.
      prefix_caching: False: `match_prefix` finds nothing and `register` keeps
        nothing, so a page returns to the free list as soon as it is unreferenced.
    """

    def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise PageAllocatorError(
                f"PageAllocator: num_pages={num_pages}, page_size={page_size}; "
                f"expected both >= 1"
            )
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self._free: collections.deque[int] = collections.deque(range(num_pages))
        self._refcount = [0] * num_pages
        self._key: list[PageKey | None] = [None] * num_pages
        self._by_key: dict[PageKey, int] = {}
        # Unreferenced registered pages, least recently used first.
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.queries_tokens = 0  # tokens looked up in the prefix cache
        self.hit_tokens = 0  # of those, tokens served from it

    # -- counts ----------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Pages that hold nothing reusable."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Unreferenced pages kept for prefix reuse (evictable)."""
        return len(self._lru)

    @property
    def num_used(self) -> int:
        """Pages referenced by at least one request."""
        return self.num_pages - self.num_free - self.num_cached

    @property
    def num_available(self) -> int:
        """Pages `allocate` can hand out now (free, then evicted from the cache)."""
        return self.num_free + self.num_cached

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    # -- operations ------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """`n` fresh pages, each with refcount 1: free pages first, then cached pages
        evicted least recently used first. All or nothing: raises PagePoolExhausted,
        changing nothing, if fewer than `n` are available."""
        if n < 0:
            raise PageAllocatorError(f"allocate: n={n}; expected >= 0")
        if n > self.num_available:
            raise PagePoolExhausted(
                f"allocate: {n} pages asked for, {self.num_available} available "
                f"({self.num_free} free + {self.num_cached} cached) of {self.num_pages}"
            )
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._lru.popitem(last=False)
                del self._by_key[self._key[page]]
                self._key[page] = None
            self._refcount[page] = 1
            pages.append(page)
        return pages

    def match_prefix(self, tokens: Sequence[int], root: PageKey | None = None) -> list[int]:
        """The cached pages holding the longest run of leading full pages of `tokens`,
        each now referenced once more (free them with the request's other pages).
        ``len(result) * page_size`` tokens need no prefill. Pass the prompt without
        its last token when that token's logits are needed (a prompt made only of
        cached pages would otherwise have nothing left to run)."""
        self.queries_tokens += len(tokens)
        if not self.prefix_caching:
            return []
        pages = []
        for key in prefix_keys(tokens, self.page_size, root):
            page = self._by_key.get(key)
            if page is None:
                break
            pages.append(page)
        for page in pages:
            self.share(page)
        self.hit_tokens += len(pages) * self.page_size
        return pages

    def share(self, page: int) -> None:
        """One more reference to an in-use or cached page."""
        self._check_page(page)
        if self._refcount[page] == 0:
            if page not in self._lru:
                raise PageAllocatorError(f"share: page {page} is free; only in-use or "
                                         f"cached pages can be shared")
            del self._lru[page]
        self._refcount[page] += 1

    def register(self, page: int, key: PageKey) -> bool:
        """Offer an in-use, now full page to the prefix cache under `key` (see
        `prefix_keys`). False, and nothing changes, if caching is off, the page is
        already registered, or another page holds that key (two requests computed the
        same prefix at once: the first one's page stays the cached copy)."""
        self._check_page(page)
        if self._refcount[page] == 0:
            raise PageAllocatorError(f"register: page {page} is not in use")
        if not self.prefix_caching or self._key[page] is not None or key in self._by_key:
            return False
        self._key[page] = key
        self._by_key[key] = page
        return True

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page. An unreferenced registered page becomes
        cached, any other free. Pass a request's pages in prefix order: they are
        released last first, so the end of a cached prefix is evicted before its
        start (which more prompts share), as vLLM does."""
        pages = list(pages)
        for page in pages:
            self._check_page(page)
        counts = collections.Counter(pages)
        for page, n in counts.items():
            if self._refcount[page] < n:
                raise PageAllocatorError(
                    f"free: page {page} released {n} time(s) but has "
                    f"{self._refcount[page]} reference(s)"
                )
        for page in reversed(pages):
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                if self._key[page] is not None:
                    self._lru[page] = None
                else:
                    self._free.append(page)

    def clear_cache(self) -> None:
        """Forget every cached (unreferenced) page; in-use pages keep their keys."""
        while self._lru:
            page, _ = self._lru.popitem(last=False)
            del self._by_key[self._key[page]]
            self._key[page] = None
            self._free.append(page)

    def _check_page(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise PageAllocatorError(f"page {page} is not in [0, {self.num_pages})")

    def check(self) -> None:
        """Assert the bookkeeping invariants (tests call this after every operation)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        cached = set(self._lru)
        for page in range(self.num_pages):
            states = (page in free, page in cached, self._refcount[page] > 0)
            assert sum(states) == 1, f"page {page}: free/cached/in use = {states}"
            if page in free:
                assert self._key[page] is None, f"free page {page} has a key"
            if page in cached:
                assert self._key[page] is not None, f"cached page {page} has no key"
        assert {self._by_key[k]: k for k in self._by_key} == {
            p: k for p, k in enumerate(self._key) if k is not None
        }, "key map and page keys disagree"
