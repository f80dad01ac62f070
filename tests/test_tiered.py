"""TieredCache and AsyncTieredCache over the in-process backend and test doubles:
read-through, write-through, L1 TTLs bounded by L2's, invalidation (and the race
of a fill with an invalidation), the lost-link flush, negative caching,
serve_local, compute-once, memoize (sync and async), stats."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

import hypercache
from hypercache import HyperCache
from hypercache.backends import MISSING, Backend, Invalidation, InvalidationCallback, MemoryBackend
from hypercache.backends.base import Entry, _Missing
from hypercache.errors import ConfigError, NodeUnavailableError
from hypercache.tiered import DEFAULT_UNWATCHED_TTL, AsyncTieredCache, TieredCache


class Flaky(Backend):
    """A backend over a MemoryBackend that can be switched down, that counts its
    reads, and whose notifications the test sends by hand."""

    def __init__(self, *, watchable: bool = True) -> None:
        super().__init__()
        self.inner = MemoryBackend()
        self.down = False
        self.reads = 0
        self.watchable = watchable
        self.callbacks: list[InvalidationCallback] = []
        self.up = True
        self.during_read: Any = None  # called inside get_entry, before it answers

    def _check(self) -> None:
        if self.down:
            raise NodeUnavailableError("flaky: down")

    def get_entry(self, key: str | bytes) -> Entry | _Missing:
        self._check()
        self.reads += 1
        entry = self.inner.get_entry(key)
        if self.during_read is not None:
            self.during_read()
        return entry

    def set(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        self._check()
        self.inner.set(key, value, ttl)

    def add(self, key: str | bytes, value: Any, ttl: float | None = None) -> bool:
        self._check()
        return self.inner.add(key, value, ttl)

    def delete(self, key: str | bytes) -> bool:
        self._check()
        return self.inner.delete(key)

    def delete_if(self, key: str | bytes, value: Any) -> bool:
        self._check()
        return self.inner.delete_if(key, value)

    def get_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        self._check()
        return self.inner.get_many(keys)

    def set_many(self, mapping: Mapping[str | bytes, Any], ttl: float | None = None) -> None:
        self._check()
        self.inner.set_many(mapping, ttl)

    def ttl(self, key: str | bytes) -> float | None:
        self._check()
        return self.inner.ttl(key)

    def clear(self) -> int:
        self._check()
        return self.inner.clear()

    def watch(self, callback: InvalidationCallback) -> Invalidation | None:
        if not self.watchable:
            return None
        self.callbacks.append(callback)
        outer = self

        class Handle(Invalidation):
            @property
            def connected(self) -> bool:
                return outer.up

            def close(self) -> None:
                outer.callbacks.remove(callback)

        callback(None, True)
        return Handle()

    def notify(self, keys: list[bytes] | None, connected: bool = True) -> None:
        self.up = connected
        for callback in self.callbacks:
            callback(keys, connected)


def test_a_miss_reads_through_and_fills_l1() -> None:
    backend = Flaky()
    backend.inner.set("k", {"v": 1}, ttl=60)
    cache = TieredCache(backend)
    assert cache.get("k") == {"v": 1}
    assert cache.get("k") == {"v": 1}
    assert cache["k"] == {"v": 1}
    assert backend.reads == 1
    s = cache.stats()
    assert (s.l1_hits, s.l1_misses, s.l2_hits, s.l2_misses) == (2, 1, 1, 0)
    assert s.hits == 3 and s.local_size == 1
    assert cache.get("absent", "d") == "d"
    assert cache.stats().l2_misses == 1
    with pytest.raises(KeyError):
        cache["absent"]


def test_a_write_goes_to_both_tiers() -> None:
    backend = Flaky()
    cache = TieredCache(backend)
    cache.set("k", [1, 2], ttl=60)
    cache["j"] = "x"
    assert backend.inner.get("k") == [1, 2] and backend.inner.get("j") == "x"
    assert cache.get("k") == [1, 2]
    assert backend.reads == 0  # served by L1
    assert cache.delete("k") is True
    assert "k" not in cache
    assert backend.inner.get_entry("k") is MISSING
    cache.set_many({"a": 1, "b": 2})
    assert cache.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}
    assert backend.reads == 2  # "k" (after its delete) and "c"
    with pytest.raises(KeyError):
        del cache["nope"]
    assert cache.clear() == 3
    assert len(cache.local) == 0 and backend.inner.get_many(["a", "b", "j"]) == {}


def test_l1_never_keeps_an_entry_longer_than_l2_has_left() -> None:
    backend = Flaky()
    local: HyperCache[bytes, Any] = HyperCache(100)
    cache = TieredCache(backend, local=local)
    backend.inner.set("short", 1, ttl=0.5)
    backend.inner.set("forever", 1)
    cache.get("short")
    cache.get("forever")
    l1, l2 = local.ttl(b"short"), backend.inner.ttl("short")
    assert l1 is not None and l2 is not None and l1 <= l2 + 0.005
    assert local.ttl(b"forever") is None
    capped = TieredCache(backend, local_ttl=0.2)
    capped.get("forever")
    capped.get("short")
    for key in (b"forever", b"short"):
        left = capped.local.ttl(key)
        assert left is not None and left <= 0.2
    # The L2 entry expires: so does L1's copy, by then.
    end = time.monotonic() + 5
    while backend.inner.get_entry("short") is not MISSING:
        assert time.monotonic() < end
        time.sleep(0.02)
    assert b"short" not in local


def test_a_write_elsewhere_drops_the_key_from_every_l1() -> None:
    shared = MemoryBackend()
    a, b = TieredCache(shared), TieredCache(shared)
    shared.set("k", "old")
    assert a.get("k") == "old" and b.get("k") == "old"
    b.set("k", "new")
    assert a.get("k") == "new"
    shared.delete("k")
    assert a.get("k") is None and b.get("k") is None
    assert a.stats().invalidations >= 1


def test_a_value_read_while_an_invalidation_arrives_is_not_kept() -> None:
    """The race: L2 answers the old value, the write's notification lands before
    the fill; the fill must not survive it."""
    backend = Flaky()
    backend.inner.set("k", "old")
    cache = TieredCache(backend)

    def write_meanwhile() -> None:
        backend.during_read = None
        backend.inner.set("k", "new")
        backend.notify([b"k"])

    backend.during_read = write_meanwhile
    assert cache.get("k") == "old"  # what L2 said at the time
    assert b"k" not in cache.local
    assert cache.get("k") == "new"


def test_a_lost_link_flushes_l1_and_bypasses_it_until_the_link_is_back() -> None:
    backend = Flaky()
    backend.inner.set("k", "old")
    cache = TieredCache(backend)
    cache.get("k")
    assert b"k" in cache.local and cache.watching
    backend.notify(None, connected=False)
    assert len(cache.local) == 0 and not cache.watching
    backend.inner.set("k", "new")  # unseen: no notification
    reads = backend.reads
    assert cache.get("k") == "new"
    assert cache.get("k") == "new"
    assert backend.reads == reads + 2  # L1 is not used while the link is down
    assert len(cache.local) == 0
    backend.notify(None, connected=True)
    cache.get("k")
    cache.get("k")
    assert backend.reads == reads + 3
    assert cache.stats().flushes >= 3  # the first link, the loss, the return


def test_negative_entries_are_kept_only_when_asked() -> None:
    backend = Flaky()
    plain = TieredCache(backend)
    plain.get("nope")
    plain.get("nope")
    assert backend.reads == 2
    neg = TieredCache(backend, negative_ttl=30)
    assert neg.get("nope", 1) == 1
    assert neg.get("nope", 2) == 2
    assert "nope" not in neg
    assert backend.reads == 3
    backend.inner.set("nope", "now")
    backend.notify([b"nope"])  # a notification drops the negative entry
    assert neg.get("nope") == "now"


def test_l2_down_raises_or_serves_local_when_asked() -> None:
    backend = Flaky()
    backend.inner.set("k", 1)
    strict = TieredCache(backend)
    lenient = TieredCache(backend, on_backend_error="serve_local")
    strict.get("k")
    lenient.get("k")
    backend.notify(None, connected=False)  # the link goes with the store
    backend.down = True
    with pytest.raises(NodeUnavailableError):
        strict.get("k")
    assert lenient.get("k") == 1  # kept across the loss: serve_local opts in
    assert lenient.get_many(["k"]) == {"k": 1}
    with pytest.raises(NodeUnavailableError):
        lenient.get("never-read")
    with pytest.raises(NodeUnavailableError):
        lenient.set("k", 2)
    assert lenient.get_or_set("computed", lambda: 5) == 5
    s = lenient.stats()
    assert s.served_local == 2 and s.backend_errors >= 3
    assert strict.stats().backend_errors == 1
    # The count in a Prometheus registry of the application's own.
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(lenient.collector("profiles"))
    text = generate_latest(registry).decode()
    assert 'hypercache_tiered_served_local_total{cache="profiles"} 2.0' in text
    assert 'hypercache_tiered_backend_errors_total{cache="profiles"}' in text


def test_without_notifications_l1_entries_are_capped_by_local_ttl() -> None:
    backend = Flaky(watchable=False)
    cache = TieredCache(backend)
    assert cache.local_ttl == DEFAULT_UNWATCHED_TTL and not cache.watching
    cache.set("k", 1)
    left = cache.local.ttl(b"k")
    assert left is not None and left <= DEFAULT_UNWATCHED_TTL
    unwatched = TieredCache(MemoryBackend(), invalidate=False, local_ttl=5)
    unwatched.set("k", 1)
    assert unwatched.local.ttl(b"k") == pytest.approx(5, abs=0.01)


def test_get_or_set_computes_once_for_all_threads() -> None:
    cache = TieredCache(MemoryBackend())
    calls = 0
    gate = threading.Event()

    def factory() -> int:
        nonlocal calls
        calls += 1
        gate.wait(5)
        return 42

    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_set("k", factory, ttl=60)))
        for _ in range(20)
    ]
    for t in threads:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join()
    assert results == [42] * 20 and calls == 1
    assert cache.backend.get("k") == 42
    assert cache.backend.get_entry(b"\x00lease:k") is MISSING  # released


def test_a_lease_held_elsewhere_is_waited_for() -> None:
    shared = MemoryBackend()
    shared.add(b"\x00lease:k", "someone", ttl=30)
    cache = TieredCache(shared, lease_poll=0.005)
    threading.Timer(0.1, lambda: shared.set("k", "theirs")).start()
    assert cache.get_or_set("k", lambda: "mine") == "theirs"
    assert cache.stats().lease_waits == 1 and cache.stats().computed == 0


def test_a_lease_whose_holder_died_expires() -> None:
    shared = MemoryBackend()
    shared.add(b"\x00lease:k", "dead", ttl=0.1)
    cache = TieredCache(shared, lease_poll=0.005)
    assert cache.get_or_set("k", lambda: "mine") == "mine"
    assert cache.stats().computed == 1


def test_factory_errors_are_not_cached_and_release_the_lease() -> None:
    cache = TieredCache(MemoryBackend())

    def boom() -> int:
        raise ValueError("no")

    with pytest.raises(ValueError):
        cache.get_or_set("k", boom)
    assert cache.backend.get_entry(b"\x00lease:k") is MISSING
    assert cache.get_or_set("k", lambda: 1) == 1


def test_memoize_plain_and_async_functions() -> None:
    cache = TieredCache(MemoryBackend())
    calls: list[Any] = []

    @cache.memoize(ttl=60)
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    @cache.memoize(key=lambda x, **_: f"user{x}")
    async def load(x: int, *, extra: str = "") -> str:
        calls.append(("load", x))
        await asyncio.sleep(0.01)
        return f"u{x}{extra}"

    assert square(3) == 9 and square(3) == 9 and square(4) == 16
    assert calls == [3, 4]
    assert square.cache_key(3).endswith("square:(3,)")  # type: ignore[attr-defined]
    assert square.invalidate(3) is True  # type: ignore[attr-defined]
    assert square(3) == 9 and calls[-1] == 3

    async def main() -> list[str]:
        return await asyncio.gather(*(load(1) for _ in range(10)), load(2, extra="!"))

    assert asyncio.run(main()) == ["u1"] * 10 + ["u2!"]
    assert calls.count(("load", 1)) == 1
    assert asyncio.run(main()) == ["u1"] * 10 + ["u2!"]
    assert calls.count(("load", 1)) == 1 and calls.count(("load", 2)) == 1


def test_the_async_face() -> None:
    async def main() -> None:
        cache = AsyncTieredCache("memory://?namespace=a:")
        try:
            await cache.set("k", {"v": 1}, ttl=30)
            assert await cache.get("k") == {"v": 1}
            await cache.set_many({"a": 1, "b": 2})
            assert await cache.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}
            left = await cache.ttl("k")
            assert left is not None and 0 < left <= 30
            assert await cache.delete("a") is True
            assert await cache.get("a") is None
            n = 0

            async def compute() -> int:
                nonlocal n
                n += 1
                await asyncio.sleep(0.01)
                return 7

            got = await asyncio.gather(*(cache.get_or_set("g", compute) for _ in range(10)))
            assert got == [7] * 10 and n == 1

            @cache.memoize()
            async def double(x: int) -> int:
                return 2 * x

            assert await double(4) == 8
            assert await double.invalidate(4) is True  # type: ignore[attr-defined]
            with pytest.raises(TypeError):
                cache.memoize()(lambda: 1)
            assert await cache.clear() >= 3
            assert cache.stats().l1_hits >= 1
        finally:
            await cache.close()

    asyncio.run(main())


def test_bad_settings_name_their_field() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"local": {}}, "local"),
        ({"local_ttl": 0}, "local_ttl"),
        ({"negative_ttl": -1}, "negative_ttl"),
        ({"on_backend_error": "ignore"}, "on_backend_error"),
        ({"lease_ttl": 0}, "lease_ttl"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ConfigError) as info:
            TieredCache("memory://", **kwargs)
        assert info.value.field == field
    with pytest.raises(ConfigError) as info:
        TieredCache(object())  # type: ignore[arg-type]
    assert info.value.field == "backend"
    assert hypercache.TieredCache is TieredCache


def test_a_value_stored_just_before_the_lease_was_won_is_not_computed_again() -> None:
    """Another process stored the value and released its lease between this one's
    look and its lease: the value is read again under the lease, not recomputed."""
    backend = Flaky()
    cache = TieredCache(backend)
    looks = 0

    def theirs_lands() -> None:
        nonlocal looks
        looks += 1
        if looks == 2:  # after get()'s look and _compute's first look
            backend.inner.set("k", "theirs")

    backend.during_read = theirs_lands
    assert cache.get_or_set("k", lambda: "mine") == "theirs"
    assert cache.stats().computed == 0
