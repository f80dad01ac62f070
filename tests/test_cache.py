"""HyperCache: the public API, per-policy eviction, TTLs, byte budgets, keys and re-entrancy.

Single-threaded and deterministic: every TTL test injects ``timer``; no test sleeps.
"""

from __future__ import annotations

import gc
import inspect
import math
import sys
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import pytest

from hypercache.cache import POLICIES, HyperCache
from hypercache.errors import ConfigError, HyperCacheError

ALL_POLICIES = sorted(POLICIES)


class Clock:
    """An injectable monotonic clock, in seconds; starts far from zero."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(capacity: int | None = None, **kwargs: Any) -> HyperCache[Any, Any]:
    return HyperCache(capacity, **kwargs)


def fill(cache: HyperCache[Any, Any], keys: list[Hashable]) -> None:
    for k in keys:
        cache.set(k, f"v-{k}")


def survivors(cache: HyperCache[Any, Any], keys: list[Hashable]) -> set[Hashable]:
    # Uses ``in``, which is not a use for any policy.
    return {k for k in keys if k in cache}


class CollidingKey:
    """Equal when ``v`` is equal; the hash is chosen by the test."""

    def __init__(self, v: int, h: int = 7) -> None:
        self.v = v
        self.h = h

    def __hash__(self) -> int:
        return self.h

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CollidingKey) and other.v == self.v

    def __repr__(self) -> str:
        return f"CollidingKey({self.v}, h={self.h})"


# --------------------------------------------------------------------------- basics


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_basic_api(policy: str) -> None:
    c = make(10, policy=policy)
    assert len(c) == 0
    assert c.get("a") is None
    assert c.get("a", 5) == 5
    c.set("a", 1)
    c["b"] = 2
    assert c.get("a") == 1
    assert c["b"] == 2
    assert "a" in c and "zz" not in c
    with pytest.raises(KeyError):
        c["zz"]
    assert len(c) == 2
    assert sorted(c.keys()) == ["a", "b"]
    assert sorted(c) == ["a", "b"]
    assert sorted(c.items()) == [("a", 1), ("b", 2)]
    assert c.delete("a") is True
    assert c.delete("a") is False
    del c["b"]
    with pytest.raises(KeyError):
        del c["b"]
    assert len(c) == 0
    assert c.policy_name == policy
    assert c.capacity == 10
    assert c.max_bytes is None
    assert f"policy={policy!r}" in repr(c)


def test_get_and_set_by_position_by_keyword_and_unbound() -> None:
    # get() and set() have positional entry points in front of the general
    # argument parsing: every way of calling them must behave alike.
    c = make(10, timer=Clock())
    c.set("a", 1)
    c.set("b", 2, 5)
    c.set("c", 3, None)
    c.set(key="d", value=4)
    c.set("e", 5, ttl=5)
    HyperCache.set(c, "f", 6)
    assert [c.get(k) for k in "abcdef"] == [1, 2, 3, 4, 5, 6]
    assert c.get("zz", "dflt") == "dflt"
    assert c.get("zz", default="kw") == "kw"
    assert c.get(key="a") == 1
    assert HyperCache.get(c, "b") == 2 and HyperCache.get(c, "zz", 0) == 0
    assert c.ttl("b") == 5 and c.ttl("e") == 5 and c.ttl("c") is None
    calls: list[Callable[[], Any]] = [
        lambda: c.get(),  # type: ignore[call-overload]
        lambda: c.get("a", 1, 2),  # type: ignore[call-overload]
        lambda: c.get("a", dflt=1),  # type: ignore[call-overload]
        lambda: c.set("a"),  # type: ignore[call-arg]
        lambda: c.set("a", 1, 2, 3),  # type: ignore[call-arg]
        lambda: c.set("a", 1, sec=2),  # type: ignore[call-arg]
        lambda: HyperCache.get(object(), "a"),  # type: ignore[call-overload]
        lambda: HyperCache.set(object(), "a", 1),  # type: ignore[arg-type]
        lambda: c.set([], 1),
        lambda: c.get({}),
    ]
    for call in calls:
        with pytest.raises(TypeError):
            call()
    with pytest.raises(ConfigError):
        c.set("a", 1, -1)
    assert c.get("a") == 1 and len(c) == 6
    assert c.get.__doc__ and "default" in c.get.__doc__
    assert c.set.__doc__ and "ttl" in c.set.__doc__
    assert str(inspect.signature(c.get)) == "(key, default=None)"
    assert str(inspect.signature(c.set)) == "(key, value, ttl=None)"


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_stats_counters(policy: str) -> None:
    c = make(2, policy=policy)
    c.set("a", b"xx")
    c.set("b", b"yyy")
    assert c.get("a") == b"xx"
    assert c.get("missing") is None
    with pytest.raises(KeyError):
        c["missing"]
    c.delete("b")
    c.delete("b")
    st = c.stats()
    assert (st.hits, st.misses, st.sets, st.deletes) == (1, 2, 2, 1)
    assert (st.size, st.bytes, st.evictions, st.expirations) == (1, 2, 0, 0)
    c.set("c", b"z")
    c.set("d", b"z")
    st = c.stats()
    assert st.evictions == 1
    assert st.size == len(c) == 2


def test_hit_ratio() -> None:
    c = make()
    assert c.stats().hit_ratio == 0.0
    c.set("a", 1)
    c.get("a")
    c.get("b")
    c.get("c")
    assert c.stats().hit_ratio == pytest.approx(1 / 3)
    c.get("a")
    assert c.stats().hit_ratio == pytest.approx(1 / 2)
    assert isinstance(c.stats().hit_ratio, float)


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_contains_is_not_a_use_nor_a_hit(policy: str) -> None:
    c = make(3, policy=policy)
    fill(c, ["a", "b", "c"])
    before = c.stats()
    for _ in range(5):
        assert "a" in c
        assert "nope" not in c
    after = c.stats()
    assert (after.hits, after.misses) == (before.hits, before.misses)
    if policy in ("lru", "fifo", "lfu", "clock"):
        # "a" is the first victim for all four; ``in`` must not have saved it.
        c.set("d", "v-d")
        assert "a" not in c
        assert survivors(c, ["b", "c", "d"]) == {"b", "c", "d"}


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu", "clock"])
def test_ttl_and_iteration_are_not_uses(policy: str) -> None:
    clock = Clock()
    c = make(3, policy=policy, timer=clock)
    c.set("a", 1, ttl=100)
    c.set("b", 2)
    c.set("c", 3)
    assert c.ttl("a") == 100.0
    assert sorted(c.keys()) == ["a", "b", "c"]
    assert sorted(c.items()) == [("a", 1), ("b", 2), ("c", 3)]
    list(iter(c))
    assert c.stats().hits == 0
    c.set("d", 4)
    assert "a" not in c


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_overwrite_updates_value_and_bytes(policy: str) -> None:
    c = make(4, policy=policy)
    c.set("k", b"1234")
    assert c.stats().bytes == 4
    c.set("k", b"123456789")
    assert c.get("k") == b"123456789"
    assert c.stats().bytes == 9
    c.set("k", b"")
    assert c.get("k") == b""
    assert c.stats().bytes == 0
    assert len(c) == 1
    assert c.stats().sets == 3


# --------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("policy", ALL_POLICIES)
@pytest.mark.parametrize("capacity", [1, 2, 7, 64])
def test_item_bound_never_exceeded(policy: str, capacity: int) -> None:
    c = make(capacity, policy=policy)
    n = 20 * capacity + 50
    for i in range(n):
        c.set(i, i)
        assert len(c) <= capacity
        # Re-reading a mix of keys feeds the frequency policies.
        c.get(i // 2)
        c.get(i % 5)
    assert len(c) == capacity
    st = c.stats()
    assert st.evictions == n - capacity
    assert st.size == capacity
    for k in c:
        assert c.get(k) == k


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_byte_bound_never_exceeded(policy: str) -> None:
    c = make(max_bytes=100, policy=policy)
    sizes = [(i * 37) % 41 + 1 for i in range(2000)]
    for i, n in enumerate(sizes):
        c.set(i, bytes(n))
        st = c.stats()
        assert st.bytes <= 100
        assert st.bytes == sum(len(v) for _, v in c.items())
        c.get(i // 3)
    st = c.stats()
    assert st.evictions == len(sizes) - len(c)
    assert st.size == len(c) > 0


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_both_bounds(policy: str) -> None:
    c = make(5, max_bytes=20, policy=policy)
    for i in range(300):
        c.set(i, bytes(i % 9))
        assert len(c) <= 5
        assert c.stats().bytes <= 20


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_large_value_evicts_many_by_bytes(policy: str) -> None:
    c = make(max_bytes=100, policy=policy)
    for i in range(50):
        c.set(i, b"xx")
    assert c.stats().bytes == 100
    c.set("big", bytes(99))
    # Only the big value fits next to at most one of the small ones; whether
    # the policy admits it is its business, the budget is not.
    st = c.stats()
    assert st.bytes <= 100
    assert st.evictions >= 49
    if policy != "tinylfu":  # W-TinyLFU may reject the newcomer instead
        assert c.get("big") == bytes(99)


# --------------------------------------------------------------------------- policies


def test_lru_exact_order_reads_reorder() -> None:
    c = make(3, policy="lru")
    fill(c, ["a", "b", "c"])
    assert c.get("a") == "v-a"  # order, least recent first: b, c, a
    c.set("d", 1)
    assert survivors(c, list("abcd")) == {"a", "c", "d"}
    c["c"]  # a, d, c
    c.set("e", 1)
    assert survivors(c, list("acde")) == {"c", "d", "e"}
    c.get_many(["d"])  # c, e, d
    c.set("f", 1)
    assert survivors(c, list("cdef")) == {"d", "e", "f"}
    c.set("e", 2)  # an overwrite is a use: d, f, e
    c.set("g", 1)
    assert survivors(c, list("defg")) == {"e", "f", "g"}
    assert c.stats().evictions == 4


def test_fifo_exact_order_reads_do_not_reorder() -> None:
    c = make(3, policy="fifo")
    fill(c, ["a", "b", "c"])
    for _ in range(3):
        assert c.get("a") == "v-a"
    c.set("a", "new")  # neither reads nor overwrites reorder
    c.set("d", 1)
    assert survivors(c, list("abcd")) == {"b", "c", "d"}
    c.get("b")
    c.set("e", 1)
    assert survivors(c, list("bcde")) == {"c", "d", "e"}
    c.set("f", 1)
    c.set("g", 1)
    assert survivors(c, list("cdefg")) == {"e", "f", "g"}
    assert c.stats().evictions == 4


def test_fifo_reinsert_after_delete_goes_to_the_back() -> None:
    c = make(3, policy="fifo")
    fill(c, ["a", "b", "c"])
    c.delete("a")
    c.set("a", 1)  # a new entry: newest
    c.set("d", 1)
    assert survivors(c, list("abcd")) == {"a", "c", "d"}


def test_lfu_evicts_least_frequent() -> None:
    c = make(3, policy="lfu")
    fill(c, ["a", "b", "c"])
    c.get("a")
    c.get("a")
    c.get("b")
    c.set("d", 1)  # c has the fewest uses
    assert survivors(c, list("abcd")) == {"a", "b", "d"}
    # Under a byte budget an overwrite that grows a value evicts without a
    # newcomer: b (2 uses) goes before a (3 uses) and d (2 uses, more recent).
    c = make(max_bytes=4, policy="lfu")
    for k in "abcd":
        c.set(k, b"x")
    for k in "aabd":
        c.get(k)
    c.set("c", b"xx")  # c: 2 uses, 5 bytes: the least frequent, least recent goes
    assert survivors(c, list("abcd")) == {"a", "c", "d"}
    assert c.stats().evictions == 1


def test_lfu_lru_among_equals() -> None:
    c = make(4, policy="lfu")
    fill(c, ["a", "b", "c", "d"])
    c.get("a")
    c.get("b")
    c.set("e", 1)  # c and d at one use: c, least recent, goes
    assert survivors(c, list("abcde")) == {"a", "b", "d", "e"}
    c = make(max_bytes=3, policy="lfu")
    for k in "abc":
        c.set(k, b"x")
    c.get("b")
    c.get("a")
    c.get("c")  # all at two uses, b least recent
    c.set("a", b"xx")  # a: three uses, 4 bytes
    assert survivors(c, list("abc")) == {"a", "c"}


def test_lfu_overwrite_counts_as_use() -> None:
    c = make(2, policy="lfu")
    fill(c, ["a", "b"])
    c.set("a", "again")
    c.set("c", 1)
    assert survivors(c, list("abc")) == {"a", "c"}


def test_clock_second_chance() -> None:
    c = make(3, policy="clock")
    fill(c, ["a", "b", "c"])
    c.get("a")  # a referenced: the hand skips it once
    c.set("d", 1)
    assert survivors(c, list("abcd")) == {"a", "c", "d"}
    c.set("e", 1)  # c is unreferenced and oldest
    assert survivors(c, list("acde")) == {"a", "d", "e"}
    c.get("a")
    c.get("d")
    c.set("f", 1)  # a and d get a second chance, e (unreferenced) goes
    assert survivors(c, list("adef")) == {"a", "d", "f"}


def test_clock_is_not_lru() -> None:
    # a, b, c; hit b; d evicts a; hit c. LRU would now evict b (least recent);
    # the hand sees b then c referenced, clears both, and takes d.
    clock = make(3, policy="clock")
    lru = make(3, policy="lru")
    for c in (clock, lru):
        fill(c, ["a", "b", "c"])
        c.get("b")
        c.set("d", 1)
        c.get("c")
        c.set("e", 1)
    assert survivors(clock, list("abcde")) == {"b", "c", "e"}
    assert survivors(lru, list("abcde")) == {"c", "d", "e"}


# W-TinyLFU's admission filter may reject a newcomer by design; every other
# policy must keep what a write just stored at least until the next write.
NON_ADMISSION = [p for p in ALL_POLICIES if p != "tinylfu"]


@pytest.mark.parametrize("policy", NON_ADMISSION)
def test_new_key_survives_its_own_insertion(policy: str) -> None:
    # Every resident has been read: the newcomer is the least used entry, but
    # the victim must be chosen among the entries that were there before it.
    c = make(3, policy=policy)
    fill(c, ["a", "b", "c"])
    for _ in range(3):
        for k in "abc":
            c.get(k)
    stored = 0
    for i in range(20):
        c.set(i, i)
        stored += c.get(i) == i
        assert len(c) == 3
    assert stored == 20, f"{20 - stored} of 20 new keys were evicted by their own set()"


@pytest.mark.parametrize("policy", NON_ADMISSION)
def test_new_value_of_max_bytes_survives_its_own_insertion(policy: str) -> None:
    c = make(max_bytes=8, policy=policy)
    c.set("a", b"123")
    c.set("b", b"1")
    c.get("a")
    c.get("b")
    c.set("big", b"12345678")
    assert c.get("big") == b"12345678"
    assert len(c) == 1


@pytest.mark.parametrize("policy", NON_ADMISSION)
def test_overwrite_never_evicts_the_entry_written(policy: str) -> None:
    # Growing the oldest entry past the byte budget evicts others, not it.
    c = make(max_bytes=8, policy=policy)
    c.set("k", b"123")
    c.set("o", b"1")
    c.set("k", b"12345678")
    assert c.get("k") == b"12345678"
    assert "o" not in c
    assert c.stats().bytes == 8


def _hot_set_under_scan(policy: str) -> tuple[int, int]:
    # Int keys: their hashes, hence the frequency sketch, are the same every run.
    cap, hot, rounds, scan = 100, 50, 30, 200
    c = make(cap, policy=policy)
    for k in range(hot):
        c.set(k, k)
    for _ in range(3):
        for k in range(hot):
            c.get(k)
    base = c.stats().hits
    nxt = 10**6
    for _ in range(rounds):
        for _ in range(scan):
            nxt += 1
            if c.get(nxt) is None:
                c.set(nxt, nxt)
        for k in range(hot):
            if c.get(k) is None:
                c.set(k, k)
    return c.stats().hits - base, rounds * hot


@pytest.mark.parametrize("policy", ["arc", "tinylfu", "lfu"])
def test_scan_resistance(policy: str) -> None:
    lru_hits, possible = _hot_set_under_scan("lru")
    hits, _ = _hot_set_under_scan(policy)
    assert lru_hits < possible // 10  # the scan flushes LRU every round
    assert hits >= possible * 9 // 10


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_delete_and_reinsert_under_bound(policy: str) -> None:
    c = make(4, policy=policy)
    for r in range(50):
        for i in range(6):
            c.set((r % 3, i), i)
            if i % 2:
                c.delete((r % 3, i - 1))
            c.get((r % 3, i))
        assert len(c) <= 4
    for k, v in c.items():
        assert k[1] == v


# --------------------------------------------------------------------------- TTL


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_ttl_expiry_never_returned(policy: str) -> None:
    clock = Clock()
    c = make(10, policy=policy, timer=clock)
    c.set("a", 1, ttl=5)
    c.set("b", 2)
    clock.advance(4.999)
    assert c.get("a") == 1
    clock.advance(0.001)  # exactly at the deadline: gone
    assert c.get("a") is None
    assert "a" not in c
    with pytest.raises(KeyError):
        c["a"]
    assert c.get_many(["a", "b"]) == {"b": 2}
    assert c.keys() == ["b"]
    assert c.items() == [("b", 2)]
    assert c.delete("a") is False
    assert c.stats().expirations == 1
    assert len(c) == 1


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_expired_not_visible_to_any_reader(policy: str) -> None:
    clock = Clock()
    c = make(10, policy=policy, timer=clock)
    for k in range(5):
        c.set(k, k, ttl=1)
    c.set("live", 1)
    clock.advance(2)
    # Iteration and ``in`` before any read drops them.
    assert c.keys() == ["live"]
    assert list(c) == ["live"]
    assert c.items() == [("live", 1)]
    assert all(k not in c for k in range(5))
    with pytest.raises(KeyError):
        c.ttl(0)
    assert c.expire(1, 100) is False


def test_read_never_extends_ttl() -> None:
    clock = Clock()
    c = make(timer=clock)
    c.set("a", 1, ttl=10)
    for _ in range(9):
        clock.advance(1)
        assert c.get("a") == 1
        assert c["a"] == 1
        assert c.get_many(["a"]) == {"a": 1}
    assert c.ttl("a") == 1.0
    clock.advance(1)
    assert c.get("a") is None


def test_ttl_values() -> None:
    clock = Clock()
    c = make(timer=clock)
    c.set("a", 1, ttl=10)
    c.set("b", 2)
    c.set("inf", 3, ttl=math.inf)
    assert c.ttl("a") == 10.0
    clock.advance(2.5)
    assert c.ttl("a") == 7.5
    assert c.ttl("b") is None
    assert c.ttl("inf") is None
    with pytest.raises(KeyError):
        c.ttl("missing")
    c.set("a", 1, ttl=3)  # an overwrite sets a new TTL from now
    assert c.ttl("a") == 3.0
    c.set("a", 1)  # and without one, none (no default)
    assert c.ttl("a") is None


def test_default_ttl_and_per_set_ttl() -> None:
    clock = Clock()
    c = make(timer=clock, default_ttl=10)
    c.set("d", 1)
    c.set("short", 2, ttl=2)
    c.set("long", 3, ttl=60)
    c["item"] = 4
    c.set_many({"m1": 5}, ttl=1)
    c.set_many([("m2", 6)])
    assert c.ttl("d") == 10.0
    assert c.ttl("item") == 10.0
    assert c.ttl("short") == 2.0
    assert c.ttl("long") == 60.0
    assert c.ttl("m1") == 1.0
    assert c.ttl("m2") == 10.0
    clock.advance(2)
    assert sorted(c.keys()) == ["d", "item", "long", "m2"]
    clock.advance(8)
    assert c.keys() == ["long"]


def test_expire_sets_new_ttl_or_removes_it() -> None:
    clock = Clock()
    c = make(timer=clock)
    c.set("a", 1)
    assert c.expire("a", 5) is True
    assert c.ttl("a") == 5.0
    clock.advance(3)
    assert c.expire("a", 5) is True  # from now, not from the write
    assert c.ttl("a") == 5.0
    assert c.expire("a", None) is True
    assert c.ttl("a") is None
    clock.advance(1000)
    assert c.get("a") == 1
    assert c.expire("a", 1) is True
    assert c.expire("a", math.inf) is True
    assert c.ttl("a") is None
    clock.advance(1000)
    assert c.get("a") == 1
    assert c.expire("missing", 5) is False
    assert c.expire("missing", None) is False
    assert "missing" not in c
    c.set("b", 2, ttl=1)
    clock.advance(1)
    assert c.expire("b", 100) is False  # expired is absent
    assert "b" not in c
    with pytest.raises(ConfigError) as ei:
        c.expire("a", -1)
    assert ei.value.field == "ttl"
    assert c.ttl("a") is None


def test_expire_shortens() -> None:
    clock = Clock()
    c = make(timer=clock)
    c.set("a", 1, ttl=100)
    c.expire("a", 1)
    clock.advance(1)
    assert "a" not in c


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_writes_reclaim_expired_without_reading_them(policy: str) -> None:
    clock = Clock()
    c = make(policy=policy, timer=clock)
    for k in range(5):
        c.set(("short", k), k, ttl=1)
    for k in range(5):
        c.set(("long", k), k, ttl=1000)
    assert len(c) == 10
    clock.advance(2)
    assert len(c) == 10  # nothing reads them...
    c.set("w", 1)  # ...but a write reclaims them
    assert c.stats().expirations == 5
    assert len(c) == 6
    assert c.stats().size == 6
    assert c.stats().misses == 0


def test_sweep_reclaims_all_expired() -> None:
    clock = Clock()
    c = make(timer=clock)
    assert c.sweep() == 0
    for k in range(1000):
        c.set(k, k, ttl=1 + (k % 2))
    c.set("forever", 1)
    clock.advance(1)
    assert c.sweep() == 500
    assert len(c) == 501
    clock.advance(1)
    assert c.sweep() == 500
    assert c.sweep() == 0
    assert c.keys() == ["forever"]
    st = c.stats()
    assert (st.expirations, st.size, st.bytes) == (1000, 1, sys.getsizeof(1))


def test_write_sweep_is_o_expired_not_o_size() -> None:
    # 100k live long-TTL entries and a few expired ones: one write reclaims the
    # expired ones (the expiry heap has them on top) and touches nothing else.
    clock = Clock()
    c = make(timer=clock)
    n = 100_000
    for k in range(n):
        c.set(k, None, ttl=10_000)
    for k in range(5):
        c.set(("short", k), None, ttl=1)
    clock.advance(5)
    assert len(c) == n + 5
    c.set("w", None)
    st = c.stats()
    assert st.expirations == 5
    assert st.evictions == 0
    assert len(c) == n + 1
    assert all(("short", k) not in c for k in range(5))
    assert c.get(0, "miss") is None and c.get(n - 1, "miss") is None


def test_expired_entry_reclaimed_before_a_live_one_is_evicted() -> None:
    # A full cache that holds an expired entry has room: a write must reclaim
    # the dead entry, not evict a live one.
    clock = Clock()
    c = make(2, policy="lru", timer=clock)
    c.set("live", 1)
    c.set("dying", 2, ttl=1)
    clock.advance(2)
    c.set("new", 3)
    assert c.get("live") == 1, "a live entry was evicted while an expired one took its place"
    assert c.get("new") == 3
    st = c.stats()
    assert (st.evictions, st.expirations) == (0, 1)


def test_fifo_write_over_expired_key_is_a_new_entry() -> None:
    # An expired key is absent; writing it again makes it the newest entry, not
    # an overwrite that keeps the dead entry's place at the front of the queue.
    clock = Clock()
    c = make(2, policy="fifo", timer=clock)
    c.set("a", 1, ttl=1)
    c.set("b", 2)
    clock.advance(2)
    c.set("a", 3)
    c.set("c", 4)
    assert c.get("a") == 3
    assert c.get("b") is None
    assert c.stats().expirations == 1


def test_expired_entries_hidden_at_clock_zero() -> None:
    # The clock may read any value, 0 included: an entry whose deadline has
    # passed must not appear in keys()/items() just because now == 0.
    clock = Clock(start=-10.0)
    c = make(timer=clock)
    c.set("x", 1, ttl=5)
    clock.now = 0.0
    assert c.keys() == []
    assert c.items() == []


def test_ttl_reads_the_entry_it_looked_up() -> None:
    # ttl() finds the slot, then calls the (Python) timer, then reads
    # expiry[slot] without re-checking ``mutations``: whatever ran meanwhile
    # (another thread, here the timer itself) can put another key's TTL there.
    calls = [0]
    trip = [-1]
    cache: HyperCache[str, int]

    def timer() -> float:
        calls[0] += 1
        if calls[0] == trip[0]:
            cache.delete("a")
            cache.set("b", 1, ttl=500)  # reuses a's slot
        return 0.0

    cache = HyperCache(timer=timer)
    cache.set("a", 1, ttl=5)
    trip[0] = calls[0] + 2  # 1: _live's clock read, 2: ttl()'s own
    try:
        left = cache.ttl("a")
    except KeyError:
        return
    assert left is not None and left <= 5, f"ttl('a') returned b's TTL: {left}"


def test_ttl_is_kept_when_the_expiry_lands_on_zero() -> None:
    # expiry 0 means "no TTL": a write at clock -1.0 with ttl=1 computes an
    # absolute expiry of exactly 0 and the entry silently never expires.
    now = [-1.0]
    c: HyperCache[str, int] = HyperCache(timer=lambda: now[0])
    c.set("a", 1, ttl=1)
    assert c.ttl("a") is not None
    now[0] = 100.0
    assert "a" not in c


# --------------------------------------------------------------------------- bytes


def test_custom_sizeof() -> None:
    seen: list[Any] = []

    def sizeof(v: Any) -> int:
        seen.append(v)
        return int(v["n"])

    c = make(max_bytes=10, sizeof=sizeof)
    c.set("a", {"n": 4})
    c.set("b", {"n": 6})
    assert c.stats().bytes == 10
    assert len(seen) == 2
    c.set("c", {"n": 1})  # a (least recent) goes
    assert survivors(c, ["a", "b", "c"]) == {"b", "c"}
    assert c.stats().bytes == 7
    assert c.stats().evictions == 1


def test_sizeof_error_leaves_cache_unchanged() -> None:
    def sizeof(v: Any) -> int:
        if v == "bad":
            raise RuntimeError("boom")
        if v == "neg":
            return -1
        return 1

    c = make(max_bytes=10, sizeof=sizeof)
    c.set("k", "good")
    with pytest.raises(RuntimeError):
        c.set("k", "bad")
    with pytest.raises(ValueError):
        c.set("k", "neg")
    assert c.get("k") == "good"
    assert c.stats().bytes == 1
    assert c.stats().sets == 1


@pytest.mark.parametrize(
    "value",
    [b"abc", "héllo wörld", "", bytearray(b"abcd"), b"x" * 1000],
    ids=["bytes", "str", "empty", "bytearray", "kbytes"],
)
def test_default_sizeof_is_len_for_bytes_and_str(value: Any) -> None:
    c = make()
    c.set("k", value)
    assert c.stats().bytes == len(value)


@pytest.mark.parametrize(
    "value",
    [10**30, 1.5, (1, 2, 3), object(), list(range(1000)), {i: i for i in range(100)}],
    ids=["int", "float", "tuple", "object", "list", "dict"],
)
def test_default_sizeof_is_shallow_getsizeof(value: Any) -> None:
    # Documented: "what sys.getsizeof reports, without the GC header and
    # without following references" -- that is, ``value.__sizeof__()``.
    c = make()
    c.set("k", value)
    assert c.stats().bytes == value.__sizeof__()


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_value_larger_than_max_bytes(policy: str) -> None:
    c = make(max_bytes=8, policy=policy)
    c.set("k", b"old")
    c.set("other", b"o")
    with pytest.raises(ValueError, match="max_bytes"):
        c.set("k", b"123456789")
    with pytest.raises(ValueError):
        c.set("new", b"123456789")
    assert c.get("k") == b"old"
    assert "new" not in c
    st = c.stats()
    assert (st.bytes, st.size, st.sets, st.evictions) == (4, 2, 2, 0)
    c.set("k2", b"12345678")  # exactly the budget fits
    assert c.stats().bytes <= 8


def test_eviction_by_bytes_lru_order() -> None:
    c = make(max_bytes=10, policy="lru")
    c.set("a", b"aaa")
    c.set("b", b"bbb")
    c.set("c", b"ccc")
    c.get("a")
    c.set("d", b"dddd")  # 13 bytes: b goes (least recent), 10 left
    assert survivors(c, list("abcd")) == {"a", "c", "d"}
    c.set("c", b"cccccc")  # a use, and 13 bytes again: a (least recent) goes
    assert survivors(c, list("acd")) == {"c", "d"}
    assert c.stats().bytes == 10
    assert c.stats().evictions == 2


@pytest.mark.parametrize("value", [int, dict, HyperCache, type("Local", (), {})])
def test_default_sizeof_accepts_classes_as_values(value: type) -> None:
    # shallow_size calls value.__sizeof__(), which for a class is the unbound
    # method of its instances: TypeError "unbound method ... needs an argument".
    # sys.getsizeof (type(value).__sizeof__(value)) works for any object.
    c: HyperCache[str, Any] = HyperCache()
    c["k"] = value
    assert c["k"] is value
    sizeof: Any = type(value).__sizeof__  # mypy sees object's, which takes no argument
    assert c.stats().bytes == sizeof(value)


def test_default_sizeof_follows_a_patched_dunder_sizeof() -> None:
    # The one-type cache (_plain_type) is never invalidated: once a class was
    # seen with object.__sizeof__, a later __sizeof__ is ignored, so a value
    # sys.getsizeof calls 1 MB slips under a 1000-byte budget.
    class Blob:
        pass

    c: HyperCache[str, Any] = HyperCache(max_bytes=1000)
    c["a"] = Blob()
    Blob.__sizeof__ = lambda self: 10**6  # type: ignore[method-assign]
    assert sys.getsizeof(Blob()) > 1000
    with pytest.raises(ValueError):
        c["b"] = Blob()


def test_user_sizeof_returning_a_float_is_rejected() -> None:
    # _measure converts with <uint64_t>n, which truncates floats (0.5 -> 0), so
    # a byte budget is bypassed; the __sizeof__ path raises TypeError for the
    # same value.
    c: HyperCache[int, int] = HyperCache(max_bytes=1, sizeof=lambda v: 0.5)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError):
        c[1] = 1


def test_byte_bound_holds_with_huge_sizes() -> None:
    # _over_after computes nbytes + size in uint64: 2**63 + 2**63 wraps to 0,
    # so the second entry is admitted without evicting the first.
    c: HyperCache[str, int] = HyperCache(max_bytes=2**64 - 1, sizeof=lambda v: 2**63)
    c["a"] = 1
    c["b"] = 2
    assert len(c) == 1, f"both held, stats().bytes wrapped to {c.stats().bytes}"
    assert "b" in c


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_sizes_past_32_bits_are_kept_whole(policy: str) -> None:
    # A slot's size lives in 32 bits of its record; 2**32 - 1 and up go to a
    # side array. Every path that reads a size back (overwrite, delete,
    # eviction, expiry, the byte bound) must see the full value.
    sizes = {"small": 7, "edge": 2**32 - 2, "marker": 2**32 - 1, "big": 2**32 + 5, "huge": 2**60}
    c: HyperCache[str, str] = HyperCache(
        capacity=1000, max_bytes=2**62, policy=policy, sizeof=lambda v: sizes[v]
    )
    for name in sizes:
        c[f"k-{name}"] = name
    assert c.stats().bytes == sum(sizes.values())
    c["k-big"] = "small"  # overwrite: big -> small
    c["k-small"] = "huge"  # small -> huge
    expect = sum(sizes.values()) - sizes["big"] + sizes["small"] - sizes["small"] + sizes["huge"]
    assert c.stats().bytes == expect
    assert c.delete("k-huge") and c.delete("k-small")
    assert c.stats().bytes == expect - 2 * sizes["huge"]
    # Grow the slot arrays past their first size with the side array in use.
    for i in range(100):
        c[f"n{i}"] = "marker"
    assert c.stats().bytes == expect - 2 * sizes["huge"] + 100 * sizes["marker"]
    for k in list(c):
        c.delete(k)
    assert c.stats().bytes == 0 and len(c) == 0
    # The byte bound with sizes past 32 bits: the second entry evicts the first.
    b: HyperCache[str, str] = HyperCache(max_bytes=2**33, policy=policy, sizeof=lambda v: sizes[v])
    b["a"] = "big"
    b["b"] = "big"
    assert len(b) == 1 and b.stats().bytes == sizes["big"]


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_any_hashable_key(policy: str) -> None:
    c = make(100, policy=policy)
    keys: list[Hashable] = [
        None,
        0,
        -1,
        2**100,
        "",
        "s",
        b"b",
        (),
        (1, (2, "x")),
        frozenset({1, 2}),
        3.25,
        CollidingKey(1),
        CollidingKey(2),
        Ellipsis,
    ]
    for i, k in enumerate(keys):
        c.set(k, i)
    for i, k in enumerate(keys):
        assert c.get(k) == i, k
    assert c.get(CollidingKey(2)) == keys.index(CollidingKey(2))
    assert c.get((1, (2, "x"))) == 8
    assert c.delete(None) is True
    assert None not in c
    assert len(c) == len(keys) - 1


def test_equal_keys_of_different_identity() -> None:
    c = make()
    a = "".join(["ab", "cd" * 20])
    b = "".join(["abcd", "cd" * 19])
    assert a == b and a is not b
    c.set(a, 1)
    assert c.get(b) == 1
    c.set(b, 2)
    assert len(c) == 1 and c.get(a) == 2
    # 1, 1.0 and True are one key, as in a dict; the first key object stays.
    c.set(1, "int")
    assert c.get(1.0) == "int"
    assert c.get(True) == "int"
    c.set(True, "bool")
    c.set(1.0, "float")
    assert c.get(1) == "float"
    ones = [k for k in c.keys() if k == 1]  # noqa: SIM118 -- keys() is under test
    assert len(ones) == 1
    assert type(ones[0]) is int
    assert c.delete(1.0) is True
    assert 1 not in c and True not in c
    # Tuples built separately.
    c.set((1, "x", (2,)), "t")
    assert c.get(tuple([1, "x", (2,)])) == "t"
    # NaN: identity, like dict.
    nan = float("nan")
    c.set(nan, "nan")
    assert c.get(nan) == "nan"
    assert c.get(float("nan")) is None


def test_many_colliding_keys() -> None:
    c = make()
    keys = [CollidingKey(i, h=12345) for i in range(300)]
    for k in keys:
        c.set(k, k.v)
    for k in keys:
        assert c.get(CollidingKey(k.v, h=12345)) == k.v
    for k in keys[::2]:
        assert c.delete(CollidingKey(k.v, h=12345)) is True
    for k in keys:
        assert c.get(k) == (None if k.v % 2 == 0 else k.v)
    assert len(c) == 150


def test_keys_whose_hashes_fold_to_the_same_32_bits() -> None:
    # The core keeps 32 bits of the hash (high half xor low half).
    c = make()
    hashes = [0, (1 << 32) | 1, (5 << 32) | 5, (0xABC << 32) | 0xABC, -1 - (1 << 40)]
    keys = [CollidingKey(i, h=h) for i, h in enumerate(hashes)]
    for k in keys:
        c.set(k, k.v)
    for k in keys:
        assert c.get(CollidingKey(k.v, h=k.h)) == k.v
    c.delete(keys[1])
    assert [c.get(k) for k in keys] == [0, None, 2, 3, 4]


# Keys equal to the stored one but another object: the probe compares exact str,
# bytes and int in C and every other pair through __eq__ (cachecore's hc_fast_eq).


def rebuilt(key: Any) -> Any:
    """An equal key that is a new object (never the one passed in)."""
    if isinstance(key, str):
        out: Any = "".join(list(key)) if len(key) > 1 else (key + "x")[:-1]
    elif isinstance(key, bytes):
        out = b"".join(key[i : i + 1] for i in range(len(key))) if len(key) > 1 else bytes(key)
    else:
        out = int(str(key))
    assert out == key and type(out) is type(key)
    if out is key:  # CPython shares the empty and one-character objects
        pytest.skip(f"{key!r} cannot be rebuilt as another object")
    return out


BUILT_KEYS: list[Hashable] = [
    "user:42",
    "k",
    "a" * 300,
    "caf\u00e9",  # 1-byte kind, not ASCII
    "\u043a\u043b\u044e\u0447:7",  # 2-byte kind
    "\U0001f511 key",  # 4-byte kind
    b"user:42",
    b"x" * 100,
    10**6 + 7,
    -(10**6) - 7,
    2**100 + 1,
    -(2**100) - 1,
    2**30,  # the first two-digit int
]


@pytest.mark.parametrize("key", BUILT_KEYS, ids=repr)
@pytest.mark.parametrize("policy", ["lru", "tinylfu"])
def test_equal_key_of_another_object_finds_the_entry(key: Hashable, policy: str) -> None:
    c = make(10, policy=policy)
    c.set(key, "first")
    probe = rebuilt(key)
    assert probe is not key
    assert c.get(probe) == "first"
    assert c[rebuilt(key)] == "first"
    assert rebuilt(key) in c
    assert c.get_many([rebuilt(key)]) == {key: "first"}
    c.set(rebuilt(key), "second")  # an overwrite: one entry, the first key object kept
    assert len(c) == 1
    assert c.keys()[0] is key
    assert c.get(key) == "second"
    assert c.expire(rebuilt(key), 10) is True
    assert c.delete(rebuilt(key)) is True
    assert len(c) == 0
    assert c.get(rebuilt(key)) is None
    stats = c.stats()
    assert (stats.hits, stats.misses) == (4, 1)


def test_equal_length_strings_that_differ_miss() -> None:
    c = make()
    stored = ["key:1000", "key:1001", "caf\u00e9", "caf\u00e8", "\u043a\u043b", "\U0001f511a"]
    for k in stored:
        c.set(k, k)
    for probe in ["key:1002", "key:2000", "cafe\u0301", "caf\u00ea", "\u043a\u043c", "\U0001f511b"]:
        assert c.get(probe) is None, probe
    # Same length and code units in another kind: "\xe9" (1 byte) vs "\u0119" (2 bytes).
    c.set("\u0119", 1)
    assert c.get("\xe9") is None
    for k in stored:
        assert c.get(rebuilt(k)) == k


def _fold(h: int) -> int:
    u = h & (2**64 - 1)
    return (u ^ (u >> 32)) & 0xFFFFFFFF


@pytest.mark.parametrize("kind", [str, bytes])
def test_strings_whose_hashes_fold_to_the_same_32_bits(kind: type) -> None:
    # The table keeps 32 bits of the hash: two different strings that share them
    # (found by the birthday bound among ~2^17 strings of one length) reach the
    # same candidate, and the probe must tell them apart (str by its full hash,
    # bytes by its contents).
    seen: dict[int, Any] = {}
    pair: tuple[Any, Any] | None = None
    for i in range(10**7, 10**7 + 2_000_000):
        s = f"k{i}" if kind is str else b"k%d" % i
        other = seen.setdefault(_fold(hash(s)), s)
        if other is not s:
            pair = (other, s)
            break
    assert pair is not None
    a, b = pair
    assert a != b and len(a) == len(b) and _fold(hash(a)) == _fold(hash(b))
    c = make()
    c.set(a, "a")
    assert c.get(b) is None
    c.set(b, "b")
    assert (c.get(rebuilt(a)), c.get(rebuilt(b))) == ("a", "b")
    assert c.delete(rebuilt(a)) is True
    assert (c.get(rebuilt(a)), c.get(rebuilt(b))) == (None, "b")


def test_ints_whose_hashes_fold_to_the_same_32_bits() -> None:
    c = make()
    ints = [0, (5 << 32) | 5, (7 << 32) | 7, -((9 << 32) | 9) - 0, 2**61 - 1 + 5, 5]
    assert len({_fold(hash(i)) for i in ints[:3]}) == 1
    for i in ints:
        c.set(i, i)
    for i in ints:
        assert c.get(int(str(i))) == i  # a new object, but for the small ints 0 and 5
    assert len(c) == len(ints)


class FoldedStr(str):
    """Case-insensitive: equal to any str with the same lower case, exact str included."""

    def __hash__(self) -> int:
        return hash(self.lower())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.lower() == other.lower()


class NeverEqualStr(str):
    """Equal to nothing, not even an equal copy of itself (identity still finds it)."""

    calls = 0

    __hash__ = str.__hash__

    def __eq__(self, other: object) -> bool:
        NeverEqualStr.calls += 1
        return False


def test_str_subclass_with_its_own_eq_is_compared_by_it() -> None:
    c = make()
    c.set(FoldedStr("User:42"), "folded")
    # An exact str probe meets a subclass under the same hash: the subclass's
    # __eq__ decides, not the code units.
    assert c.get("user:42") == "folded"
    c.set("user:42", "overwrite")
    assert len(c) == 1 and c.get(FoldedStr("uSeR:42")) == "overwrite"
    # Exact str stored, subclass probe.
    c.clear()
    c.set("session:7", 1)
    assert c.get(FoldedStr("SESSION:7")) == 1

    never = NeverEqualStr("k")
    c.set(never, "n")
    NeverEqualStr.calls = 0
    assert c.get(NeverEqualStr("k")) is None  # same type, same text: not equal
    assert c.get("k") is None  # exact str against it: its __eq__ (reflected) says no
    assert NeverEqualStr.calls >= 2
    assert c.get(never) == "n"  # the object itself: identity


def test_bytes_and_int_subclasses_and_mixed_types() -> None:
    class Bytes(bytes):
        pass

    class Int(int):
        def __eq__(self, other: object) -> bool:
            return False

        __hash__ = int.__hash__

    c = make()
    c.set(b"abc", "bytes")
    assert c.get(Bytes(b"abc")) == "bytes"  # bytes' own comparison, through the slow path
    c.set(10**6, "int")
    assert c.get(Int(10**6)) is None
    assert c.get(float(10**6)) == "int"  # 1000000 == 1000000.0, as in a dict
    c.set(1, "one")
    assert c.get(True) == "one"


def test_str_and_other_key_with_the_same_hash() -> None:
    # An exact str and a key of another type share the whole hash: both stay
    # distinct entries, found by their own kind of comparison.
    # An int hashes to itself below 2**61 - 1 (but -1): find a str whose hash is one.
    text = next(t for n in range(1000) if abs(hash(t := f"shared:{n}")) < 2**61 - 2)
    s = rebuilt(text)
    i = hash(s)
    assert hash(i) == hash(s)
    other = CollidingKey(1, h=hash(s))
    c = make()
    for k, v in [(s, "str"), (i, "int"), (other, "colliding"), (s.encode(), "bytes")]:
        c.set(k, v)
    assert c.get(rebuilt(text)) == "str"
    assert c.get(rebuilt(i)) == "int"
    assert c.get(CollidingKey(1, h=hash(s))) == "colliding"
    assert c.get(text.encode()) == "bytes"
    assert c.delete(rebuilt(text)) is True
    assert c.get(rebuilt(i)) == "int" and c.get(CollidingKey(1, h=hash(s))) == "colliding"
    assert len(c) == 3


@pytest.mark.parametrize("mutation", ["clear", "delete_stored", "fill"])
def test_str_subclass_eq_mutating_the_cache_against_an_exact_str(mutation: str) -> None:
    # The reflected __eq__ of a str subclass probe runs first against an exact str
    # stored under the same hash; it changes the table, the probe starts again.
    armed: list[HyperCache[Any, Any]] = []

    class Meddler(str):
        __hash__ = str.__hash__

        def __eq__(self, other: object) -> bool:
            if armed:
                cache = armed.pop()
                if mutation == "clear":
                    cache.clear()
                elif mutation == "delete_stored":
                    cache.delete(str(self))
                else:
                    for n in range(200):
                        cache.set(("filler", n), n)
            return str.__eq__(self, other)

    c = make(64)
    c.set("key:1", 1)
    c.set("key:2", 2)
    armed.append(c)
    got = c.get(Meddler("key:1"))
    assert not armed
    expected = 1 if mutation == "fill" and "key:1" in c else None
    assert got == expected
    keys = c.keys()
    assert len(keys) == len(set(map(id, keys))) == len(c) == c.stats().size <= 64
    # A write takes the same path: the probe starts again and stores a new entry.
    c.set("key:2", 2)
    armed.append(c)
    c.set(Meddler("key:2"), "again")
    assert not armed
    assert c.get("key:2") == "again"
    assert len(c) <= 64 and [k for k in c if k == "key:2"] == ["key:2"]


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_unhashable_key_raises_and_changes_nothing(policy: str) -> None:
    c = make(3, policy=policy, max_bytes=100)
    fill(c, ["a", "b"])
    before = c.stats()
    calls: list[Callable[[], Any]] = [
        lambda: c.get([1]),
        lambda: c[[1]],
        lambda: c.set([1], 1),
        lambda: c.__setitem__({}, 1),
        lambda: [1] in c,
        lambda: c.delete([1]),
        lambda: c.__delitem__([1]),
        lambda: c.ttl([1]),
        lambda: c.expire([1], 1),
        lambda: c.get_many([[1]]),
        lambda: c.set_many([([1], 1)]),
        lambda: c.delete_many([[1]]),
        lambda: c.get_or_set([1], lambda: 1),
    ]
    for call in calls:
        with pytest.raises(TypeError):
            call()
    assert c.stats() == before
    assert sorted(c.items()) == [("a", "v-a"), ("b", "v-b")]


def test_key_eq_raising_propagates_and_changes_nothing() -> None:
    class Bad(CollidingKey):
        armed = False
        __hash__ = CollidingKey.__hash__

        def __eq__(self, other: object) -> bool:
            if Bad.armed:
                raise RuntimeError("eq")
            return super().__eq__(other)

    c = make()
    c.set(Bad(1), 1)
    Bad.armed = True
    try:
        for call in (
            lambda: c.get(Bad(1)),
            lambda: c.set(Bad(1), 2),
            lambda: c.delete(Bad(1)),
        ):
            with pytest.raises(RuntimeError):
                call()
    finally:
        Bad.armed = False
    assert c.get(Bad(1)) == 1
    assert len(c) == 1


MUTATIONS = ["fill", "clear", "delete_other", "delete_self", "overwrite_self", "sweep"]


@pytest.mark.parametrize("policy", ALL_POLICIES)
@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("capacity", [None, 4, 64])
def test_key_eq_mutating_the_cache(policy: str, mutation: str, capacity: int | None) -> None:
    armed: list[HyperCache[Any, Any]] = []

    class Meddler(CollidingKey):
        __hash__ = CollidingKey.__hash__

        def __eq__(self, other: object) -> bool:
            if armed:
                c = armed.pop()
                if mutation == "fill":
                    for i in range(100):
                        c.set(("filler", i), i)
                elif mutation == "clear":
                    c.clear()
                elif mutation == "delete_other":
                    c.delete(Meddler(0))
                elif mutation == "delete_self":
                    c.delete(Meddler(self.v))
                elif mutation == "overwrite_self":
                    c.set(Meddler(self.v), "from-eq")
                else:
                    c.sweep()
            return super().__eq__(other)

    clock = Clock()
    c = make(capacity, policy=policy, timer=clock)
    for i in range(5):
        c.set(Meddler(i), i, ttl=1 if i == 4 else None)
    clock.advance(2)
    ops: list[Callable[[], Any]] = [
        lambda: c.set(Meddler(3), 33),
        lambda: c.get(Meddler(2)),
        lambda: Meddler(1) in c,
        lambda: c.delete(Meddler(2)),
        lambda: c.expire(Meddler(3), 10),
        lambda: c.get_many([Meddler(1), Meddler(3)]),
        lambda: c.set(Meddler(9), 9),
    ]
    for op in ops:
        armed.append(c)
        op()
        armed.clear()
        keys = c.keys()
        assert len(keys) == len(set(map(id, keys))) == len(c) == c.stats().size
        if capacity:
            assert len(c) <= capacity
        for k, v in c.items():
            if isinstance(k, Meddler):
                assert v in (k.v, 33, "from-eq", 9) or (k.v == 3 and v == 33)
            else:
                assert v == k[1]
    assert Meddler(4) not in c  # expired all along
    if mutation not in ("clear",) and capacity != 4:
        assert c.get(Meddler(9)) == 9


class Reenter:
    """A value whose finalizer writes to, reads from and deletes from the cache."""

    drops = 0

    def __init__(self, cache: HyperCache[Any, Any], depth: int) -> None:
        self.cache = cache
        self.depth = depth

    def __del__(self) -> None:
        Reenter.drops += 1
        c = self.cache
        if self.depth < 30:
            c.set(("re", self.depth), Reenter(c, self.depth + 1))
            c.get(("re", self.depth - 1))
            c.delete(("re", self.depth - 2))
            c.set_many({("re-many", self.depth): self.depth})


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_value_del_reentering_on_evict_overwrite_delete(policy: str) -> None:
    clock = Clock()
    c = make(5, policy=policy, max_bytes=10_000, timer=clock)
    for i in range(20):
        c.set(i, Reenter(c, 0))  # evictions drop Reenter values
        c.set(i, Reenter(c, 0))  # so do overwrites
    for i in range(20):
        c.delete(i)
    for i in range(5):
        c.set(("ttl", i), Reenter(c, 0), ttl=1)
    clock.advance(2)
    c.set("w", 1)  # expiry drops them
    c.sweep()
    for _ in range(3):
        assert len(c) <= 5
        keys = c.keys()
        assert len(keys) == len(set(keys)) == len(c) == c.stats().size
        for k in keys:
            assert k in c
        c.clear()
    # Break the cycles the values form with the cache.
    while len(c):
        c.clear()
    assert Reenter.drops > 0


# --------------------------------------------------------------------------- gc, growth


def test_value_referring_to_the_cache_is_collected() -> None:
    class Node:
        pass

    c = make(10)
    node = Node()
    node.cache = c  # type: ignore[attr-defined]
    c.set("n", node)
    c.set("self", c)
    ref = weakref.ref(node)
    del c, node
    gc.collect()
    assert ref() is None


def test_cache_in_a_cycle_dies() -> None:
    class Node:
        pass

    c = make(10)
    node = Node()
    node.cache = c  # type: ignore[attr-defined]
    c.set("n", node)
    ref = weakref.ref(c)  # HyperCache must support weak references
    del c, node
    gc.collect()
    assert ref() is None


def test_growth_delete_all_reinsert() -> None:
    c = make()
    n = 200_000
    for k in range(n):
        c[k] = k
    assert len(c) == n
    assert c.get(0) == 0 and c.get(n - 1) == n - 1 and c.get(n) is None
    for k in range(0, n, 2):
        c.delete(k)
    assert len(c) == n // 2
    for k in range(1, n, 2):
        assert c.delete(k) is True
    assert len(c) == 0
    assert c.keys() == []
    assert c.stats().bytes == 0
    for k in range(n):
        c[str(k)] = k
    assert len(c) == n
    for k in range(0, n, 997):
        assert c[str(k)] == k
        assert k not in c
    assert c.stats().deletes == n


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_clear_then_reuse(policy: str) -> None:
    clock = Clock()
    c = make(8, policy=policy, timer=clock)
    for k in range(20):
        c.set(k, k, ttl=5 if k % 2 else None)
        c.get(k // 2)
    before = c.stats()
    c.clear()
    st = c.stats()
    assert (st.size, st.bytes) == (0, 0)
    assert (st.hits, st.sets, st.evictions) == (before.hits, before.sets, before.evictions)
    assert len(c) == 0 and c.keys() == [] and c.get(1) is None
    assert c.sweep() == 0
    for k in range(20):
        c.set(k, -k, ttl=1 if k % 3 == 0 else None)
        assert len(c) <= 8
    clock.advance(2)
    for k, v in c.items():
        assert v == -k and k % 3 != 0
    c.sweep()
    assert len(c) == len(c.items())
    c.clear()
    c.clear()
    c.set("x", 1)
    assert c.items() == [("x", 1)]


# --------------------------------------------------------------------------- bulk


def test_get_many_set_many_delete_many() -> None:
    clock = Clock()
    c = make(timer=clock)
    c.set_many({"a": 1, "b": 2})
    c.set_many([("c", 3), ("d", 4)], ttl=1)
    c.set_many(iter([("e", 5)]))
    c.set_many({})
    assert c.get_many(["a", "c", "zz", "e"]) == {"a": 1, "c": 3, "e": 5}
    assert c.get_many([]) == {}
    assert c.get_many(k for k in "ab") == {"a": 1, "b": 2}
    st = c.stats()
    assert (st.hits, st.misses, st.sets) == (5, 1, 5)
    clock.advance(1)
    assert c.get_many(["c", "d", "a"]) == {"a": 1}
    assert c.delete_many(["a", "a", "zz", "c"]) == 1
    assert c.delete_many(iter(["b"])) == 1
    assert sorted(c.keys()) == ["e"]
    assert c.stats().deletes == 2


def test_set_many_is_atomic_per_key_not_as_a_whole() -> None:
    c = make(max_bytes=4)
    with pytest.raises(ValueError):
        c.set_many([("a", b"12"), ("b", b"12345"), ("c", b"1")])
    assert c.items() == [("a", b"12")]


def test_iteration_yields_live_keys_only() -> None:
    clock = Clock()
    c = make(5, timer=clock)
    for k in range(10):
        c.set(k, k, ttl=1 if k % 2 else None)
    clock.advance(1)
    assert sorted(c) == [k for k in range(5, 10) if k % 2 == 0]
    # Iterating over a snapshot: mutation during iteration is allowed.
    for k in c:
        c.delete(k)
        c.set(("new", k), 1)
    assert all(isinstance(k, tuple) for k in c)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": -1}, "capacity"),
        ({"capacity": 1.5}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"capacity": "10"}, "capacity"),
        ({"capacity": 2**32}, "capacity"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_bytes": -5}, "max_bytes"),
        ({"max_bytes": 1.0}, "max_bytes"),
        ({"max_bytes": 2**64}, "max_bytes"),
        ({"policy": "mru"}, "policy"),
        ({"policy": None}, "policy"),
        ({"default_ttl": -1}, "default_ttl"),
        ({"default_ttl": 0}, "default_ttl"),
        ({"default_ttl": math.nan}, "default_ttl"),
        ({"default_ttl": "1"}, "default_ttl"),
        ({"sizeof": 3}, "sizeof"),
        ({"timer": "now"}, "timer"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], field: str) -> None:
    capacity = kwargs.pop("capacity", None)
    with pytest.raises(ConfigError) as ei:
        HyperCache(capacity, **kwargs)
    assert ei.value.field == field
    assert isinstance(ei.value, ValueError)
    assert isinstance(ei.value, HyperCacheError)


def test_policy_name_is_case_insensitive() -> None:
    assert HyperCache(3, policy="TinyLFU").policy_name == "tinylfu"


@pytest.mark.parametrize("ttl", [-1, -0.5, math.nan, -math.inf])
def test_bad_ttl_on_set(ttl: float) -> None:
    c = make()
    c.set("k", 1)
    with pytest.raises(ConfigError) as ei:
        c.set("k", 2, ttl=ttl)
    assert ei.value.field == "ttl"
    with pytest.raises(ConfigError):
        c.set_many({"k": 3}, ttl=ttl)
    with pytest.raises(ConfigError):
        c.get_or_set("new", lambda: 3, ttl=ttl)
    assert c.get("k") == 1
    assert "new" not in c
    assert c.stats().sets == 1


def test_memoize_bad_arguments() -> None:
    c = make()
    with pytest.raises(ConfigError) as ei:
        c.memoize(ttl=-1)
    assert ei.value.field == "ttl"
    with pytest.raises(ConfigError) as ei:
        c.memoize(key=5)  # type: ignore[arg-type]
    assert ei.value.field == "key"


# --------------------------------------------------------------------------- get_or_set


def test_get_or_set_basic() -> None:
    clock = Clock()
    c = make(timer=clock)
    calls = 0

    def factory() -> str:
        nonlocal calls
        calls += 1
        return f"v{calls}"

    assert c.get_or_set("k", factory) == "v1"
    assert c.get_or_set("k", factory) == "v1"
    assert calls == 1
    assert c.get_or_set("t", factory, ttl=2) == "v2"
    assert c.ttl("t") == 2.0
    clock.advance(2)
    assert c.get_or_set("t", factory, ttl=2) == "v3"
    c.set("none", None)
    assert c.get_or_set("none", factory) is None  # a stored None is a hit
    assert calls == 3


def test_get_or_set_counts_one_lookup() -> None:
    c = make()
    c.get_or_set("k", lambda: 1)
    c.get_or_set("k", lambda: 2)
    st = c.stats()
    assert (st.hits, st.misses, st.sets) == (1, 1, 1)


def test_get_or_set_exception_not_cached() -> None:
    c = make()

    def boom() -> int:
        raise KeyError("nope")

    with pytest.raises(KeyError):
        c.get_or_set("k", boom)
    assert "k" not in c
    assert c.get_or_set("k", lambda: 7) == 7


# --------------------------------------------------------------- key comparison


def test_stored_key_outlives_its_own_eq_that_removes_it() -> None:
    # The probe compares stored == probe: stored.__eq__ runs first and, when it
    # returns NotImplemented, probe.__eq__(stored) runs next. A stored __eq__ that
    # deletes its key from the cache must not free the key before that second
    # call (dict holds the stored key over the comparison for the same reason).
    events: list[str] = []
    cache: HyperCache[Any, Any] = HyperCache()

    class Stored:
        def __hash__(self) -> int:
            return 99

        def __eq__(self, other: object) -> bool:
            if isinstance(other, Probe):
                cache.delete(self)  # found by identity: no __eq__ call
                return NotImplemented
            return other is self

    class Probe:
        def __hash__(self) -> int:
            return 99

        def __eq__(self, other: object) -> bool:
            events.append(f"probe.__eq__({type(other).__name__})")
            return False

    stored = Stored()
    weakref.finalize(stored, events.append, "stored freed")
    cache.set(stored, 1)
    del stored
    assert cache.get(Probe()) is None
    assert events == ["probe.__eq__(Stored)", "stored freed"]
    assert len(cache) == 0
