"""The host-side page allocator: reference counts, the LRU prefix cache, and no leaks.

The stateful hypothesis test runs random schedules of requests (prompts drawn from a
few shared prefixes, so pages are reused) arriving, being refused when the pool is
short, and finishing, against a model of what each page holds: a page served from the
prefix cache must hold exactly the tokens of the prompt that reuses it, every page's
refcount must equal the number of live requests holding it, and once every request
has finished no page is in use.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxllama.engine.pages import (
    PageAllocator,
    PageAllocatorError,
    PagePoolExhausted,
    page_key,
    prefix_keys,
)

PAGE = 4


def test_prefix_reuse_refcounts_and_lru_eviction():
    alloc = PageAllocator(6, PAGE)
    system = list(range(100, 108))  # two full pages
    a = alloc.match_prefix(system + [1, 2])
    assert a == []
    a = alloc.allocate(3)
    for page, key in zip(a, prefix_keys(system + [1, 2], PAGE)):
        assert alloc.register(page, key)
    # A second request with the same system prompt shares its two pages while the
    # first one still runs.
    b = alloc.match_prefix(system + [3])
    assert b == a[:2]
    assert [alloc.refcount(p) for p in a] == [2, 2, 1]
    assert (alloc.queries_tokens, alloc.hit_tokens) == (19, 8)
    b += alloc.allocate(1)
    alloc.free(a)
    assert (alloc.num_used, alloc.num_cached, alloc.num_free) == (3, 0, 3)
    alloc.free(b)
    alloc.check()
    # Both shared pages are cached now; the unregistered partial pages are free.
    assert (alloc.num_used, alloc.num_cached, alloc.num_free) == (0, 2, 4)
    # Running short evicts the cached pages, the end of the prefix first.
    fresh = alloc.allocate(5)
    assert fresh[-1] == a[1] and alloc.num_cached == 1
    assert alloc.match_prefix(system) == [a[0]]  # the first page is still there
    alloc.free(fresh + [a[0]])
    alloc.check()


def test_allocate_is_all_or_nothing():
    alloc = PageAllocator(3, PAGE)
    held = alloc.allocate(2)
    with pytest.raises(PagePoolExhausted, match="3 pages asked for, 1 available"):
        alloc.allocate(3)
    assert alloc.num_free == 1
    alloc.free(held)
    assert alloc.num_free == 3


def test_prefix_caching_off_keeps_nothing():
    alloc = PageAllocator(4, PAGE, prefix_caching=False)
    pages = alloc.allocate(2)
    assert not alloc.register(pages[0], page_key(None, [1, 2, 3, 4]))
    alloc.free(pages)
    assert alloc.match_prefix([1, 2, 3, 4, 5]) == []
    assert (alloc.num_free, alloc.num_cached) == (4, 0)


def test_register_first_copy_wins_and_misuse_is_refused():
    alloc = PageAllocator(4, PAGE)
    key = page_key(None, [7, 7, 7, 7])
    p, q = alloc.allocate(2)
    assert alloc.register(p, key)
    assert not alloc.register(q, key)  # computed twice: the first copy stays cached
    alloc.free([q])
    assert alloc.num_free == 3  # q was never cached
    with pytest.raises(PageAllocatorError, match="released 1 time"):
        alloc.free([q])
    with pytest.raises(PageAllocatorError, match="not in use"):
        alloc.register(q, page_key(None, [1, 1, 1, 1]))
    with pytest.raises(PageAllocatorError, match=r"page 9 is not in \[0, 4\)"):
        alloc.free([9])
    with pytest.raises(PageAllocatorError, match="is free"):
        alloc.share(q)
    alloc.free([p])
    alloc.check()


def test_keys_name_the_whole_prefix():
    a = prefix_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], PAGE)
    b = prefix_keys([0, 2, 3, 4, 5, 6, 7, 8], PAGE)
    assert len(a) == 2 and len(b) == 2
    assert a[1] != b[1]  # same second page, different first page
    assert a == prefix_keys([1, 2, 3, 4, 5, 6, 7, 8], PAGE)


PREFIXES = [list(range(10, 22)), list(range(10, 18)) + [99, 98], [5, 5, 5, 5, 6]]


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.alloc = PageAllocator(12, PAGE)
        self.live: dict[int, list[int]] = {}
        self.content: dict[int, tuple[int, ...]] = {}  # what each page holds
        self.next_id = 0

    @rule(prefix=st.sampled_from(PREFIXES),
          suffix=st.lists(st.integers(0, 3), min_size=1, max_size=6),
          room=st.integers(0, 6),
          caching=st.booleans())
    def arrive(self, prefix, suffix, room, caching):
        alloc = self.alloc
        alloc.prefix_caching = caching
        prompt = prefix + suffix
        before = (alloc.num_free, alloc.num_cached, alloc.num_used)
        matched = alloc.match_prefix(prompt[:-1])
        for i, page in enumerate(matched):  # a hit must hold exactly these tokens
            assert self.content[page] == tuple(prompt[i * PAGE : (i + 1) * PAGE])
        need = -(-(len(prompt) + room) // PAGE) - len(matched)
        if need > alloc.num_available:
            with pytest.raises(PagePoolExhausted):
                alloc.allocate(need)
            alloc.free(matched)
            assert (alloc.num_free, alloc.num_cached, alloc.num_used)[2] == before[2]
            return
        fresh = alloc.allocate(need)
        for page in fresh:
            assert page not in {p for ps in self.live.values() for p in ps}
        pages = matched + fresh
        for i in range(len(matched), len(pages)):  # "prefill" writes the new pages
            self.content[pages[i]] = tuple(prompt[i * PAGE : (i + 1) * PAGE])
        for page, key in zip(pages, prefix_keys(prompt, PAGE)):
            alloc.register(page, key)
        self.live[self.next_id] = pages
        self.next_id += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.alloc.free(self.live.pop(rid))

    @rule()
    def clear_cache(self):
        self.alloc.clear_cache()

    @invariant()
    def bookkeeping(self):
        self.alloc.check()
        held = [p for ps in self.live.values() for p in ps]
        for page in range(self.alloc.num_pages):
            assert self.alloc.refcount(page) == held.count(page)
        assert self.alloc.num_used == len(set(held))

    def teardown(self):
        for pages in self.live.values():
            self.alloc.free(pages)
        self.alloc.check()
        assert self.alloc.num_used == 0
        assert self.alloc.num_free + self.alloc.num_cached == self.alloc.num_pages


AllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                              deadline=None)
test_allocator_never_leaks = AllocatorMachine.TestCase
