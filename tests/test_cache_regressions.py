"""Regressions of the embedded cache: each test pins a bug found in review and fixed.

Deadlock tests run the call in a daemon thread and give it a short join: a hang
fails the test without hanging the suite.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from typing import Any

import pytest

from hypercache import HyperCache

HANG = 1.5  # seconds a call may take before we call it a deadlock


def _runs_to_completion(fn: Any) -> tuple[bool, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # reported to the test
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG)
    return not t.is_alive(), out


# --------------------------------------------------------------- default sizeof


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


def test_memoized_class_factory_works() -> None:
    c: HyperCache[Any, Any] = HyperCache(16)

    @c.memoize()
    def make(name: str) -> type:
        return type(name, (), {})

    assert make("A") is make("A")


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


# ------------------------------------------------------------------ user sizeof


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


# ------------------------------------------------------------------------- TTL


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


# ----------------------------------------------------------------- single flight


def test_get_or_set_factory_reentering_same_key_does_not_deadlock() -> None:
    # The leader waits on its own flight: threading.Event.wait() forever.
    # Expected: a clear error (or the nested call computing), never a hang.
    c: HyperCache[str, int] = HyperCache(16)

    def factory() -> int:
        return c.get_or_set("k", lambda: 1) + 1

    finished, _ = _runs_to_completion(lambda: c.get_or_set("k", factory))
    assert finished, "get_or_set deadlocked on a re-entrant call for its own key"


def test_async_memoize_reentering_same_args_does_not_deadlock() -> None:
    c: HyperCache[Any, Any] = HyperCache(16)
    depth = [0]

    @c.memoize()
    async def f(x: int) -> int:
        depth[0] += 1
        if depth[0] == 1:
            return await f(x) + 1
        return x

    finished, _ = _runs_to_completion(lambda: asyncio.run(asyncio.wait_for(f(1), 30)))
    assert finished, "async memoize awaited its own future"


def test_memoize_result_too_large_to_cache_is_still_returned() -> None:
    # memoize/get_or_set store the result with set(), which raises ValueError
    # for a value over max_bytes: the decorated function then fails for
    # arguments it computed fine, and the result is thrown away.
    c: HyperCache[Any, Any] = HyperCache(max_bytes=10)

    @c.memoize()
    def payload(n: int) -> bytes:
        return b"x" * n

    assert payload(100) == b"x" * 100
    assert c.get_or_set("big", lambda: b"y" * 100) == b"y" * 100


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
