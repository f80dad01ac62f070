"""Two tiers: a local :class:`~hypercache.HyperCache` (L1) in front of any backend (L2).

:class:`TieredCache` (blocking) and :class:`AsyncTieredCache` (asyncio) read through
(an L1 miss reads L2 and fills L1) and write through (a write goes to L2, then L1).

**Freshness.** An L1 entry never outlives the L2 entry it copies: its TTL is the L2
entry's remaining TTL (read in the same round trip as the value), capped by
``local_ttl``. When the backend can notify (Redis: client-side tracking; memory),
every write to the namespace by any process drops the key from L1 within the push's
latency (``docs/backends.md`` has the measured bound); a value read from L2 while an
invalidation arrived is not kept. When the notification link is lost, L1 is flushed
and bypassed (every read goes to L2) until the link is back, and flushed again then:
it is never trusted blind. A backend that cannot notify (the hypercache cluster)
bounds staleness by ``local_ttl`` alone (1 s unless given).

**Stampedes.** :meth:`TieredCache.get_or_set` and :meth:`TieredCache.memoize`
compute a missing value once per key across every process sharing L2: threads (or
tasks) of a process share one computation, and processes share a *lease*, a key
``<namespace>\\0lease:<key>`` added with ``SET NX PX lease_ttl`` (:meth:`Backend.add
<hypercache.backends.Backend.add>`). The holder computes, stores and releases it;
the others poll L2 every ``lease_poll`` seconds until the value or the lease's end
(a holder that died stops holding it after ``lease_ttl``).

**Errors.** L2 down raises its :data:`~hypercache.backends.BACKEND_DOWN` error
(every backend call has a timeout); with ``on_backend_error="serve_local"`` a read
answers from L1 instead when L1 holds the key (counted in ``stats().served_local``),
and ``get_or_set`` computes without caching. Writes always raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar, cast

from hypercache.backends import (
    BACKEND_DOWN,
    MISSING,
    AsyncBackend,
    Backend,
    CompressionArg,
    open,
    open_async,
)
from hypercache.backends.base import Entry, Invalidation, _Missing, encode_key
from hypercache.cache import HyperCache, _check_ttl
from hypercache.errors import ConfigError, EntryTooLargeError

__all__ = ["AsyncTieredCache", "TieredCache", "TieredCollector", "TieredStats"]

F = TypeVar("F", bound=Callable[..., Any])

#: L1's size when no ``local`` cache is given.
DEFAULT_LOCAL_ITEMS: Final = 10_000
#: L1's TTL cap when the backend cannot notify and no ``local_ttl`` is given.
DEFAULT_UNWATCHED_TTL: Final = 1.0

_NEGATIVE: Final = object()  # an L1 entry saying "absent in L2"
_LEASE: Final = b"\x00lease:"


@dataclass(frozen=True, slots=True)
class TieredStats:
    """Counters of a tiered cache at one moment."""

    #: reads answered by L1 (negative entries included)
    l1_hits: int
    #: reads L1 could not answer (then asked of L2)
    l1_misses: int
    #: L2 reads that found the key
    l2_hits: int
    #: L2 reads that did not
    l2_misses: int
    #: keys dropped from L1 by notifications of writes
    invalidations: int
    #: times L1 was flushed because the notification link was lost, made, or the store flushed
    flushes: int
    #: backend calls that failed with a BACKEND_DOWN error
    backend_errors: int
    #: reads answered from L1 because L2 was down (``on_backend_error="serve_local"``)
    served_local: int
    #: values computed by this process's ``get_or_set`` / ``memoize``
    computed: int
    #: times this process waited for another's lease
    lease_waits: int
    #: L1 entries now
    local_size: int

    @property
    def hits(self) -> int:
        return self.l1_hits + self.l2_hits

    @property
    def misses(self) -> int:
        return self.l2_misses

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _call_key(func: Callable[..., Any], key: Callable[..., Any] | None) -> Callable[..., str]:
    name = f"{func.__module__}.{func.__qualname__}"

    def cache_key(*args: Any, **kwargs: Any) -> str:
        if key is not None:
            return f"{name}:{key(*args, **kwargs)}"
        if kwargs:
            return f"{name}:{args!r}:{sorted(kwargs.items())!r}"
        return f"{name}:{args!r}"

    return cache_key


class _Tiers:
    """State and logic both faces share: L1, counters, freshness, notifications."""

    def __init__(
        self,
        local: HyperCache[bytes, Any] | None,
        local_ttl: float | None,
        negative_ttl: float | None,
        on_backend_error: str,
        lease_ttl: float,
        lease_poll: float,
    ) -> None:
        if local is not None and not isinstance(local, HyperCache):
            raise ConfigError("local", f"must be a HyperCache or None, got {local!r}")
        _check_ttl("local_ttl", local_ttl)
        _check_ttl("negative_ttl", negative_ttl)
        _check_ttl("lease_ttl", lease_ttl)
        _check_ttl("lease_poll", lease_poll)
        if on_backend_error not in ("raise", "serve_local"):
            raise ConfigError(
                "on_backend_error", f"must be 'raise' or 'serve_local', got {on_backend_error!r}"
            )
        self.local: HyperCache[bytes, Any] = (
            local if local is not None else HyperCache(DEFAULT_LOCAL_ITEMS)
        )
        self.local_ttl = local_ttl
        self.negative_ttl = negative_ttl
        self.serve_local = on_backend_error == "serve_local"
        self.lease_ttl = lease_ttl
        self.lease_poll = lease_poll
        self._trusted = True
        self._epoch = 0
        self._watch: Invalidation | None = None
        self._l2_hits = self._l2_misses = self._invalidations = self._flushes = 0
        self._errors = self._served_local = self._computed = self._lease_waits = 0
        self._flights: dict[bytes, asyncio.Future[Any] | _Flight] = {}
        self._flights_lock = threading.Lock()

    def _start_watch(self, watch: Callable[..., Invalidation | None] | None) -> None:
        """Listen to the backend's write notifications (``watch``; ``None``: the
        caller asked for none); without any, L1 entries live ``local_ttl`` at most
        (:data:`DEFAULT_UNWATCHED_TTL` when unset)."""
        self._trusted = False  # until the link says it is up
        handle = None if watch is None else watch(self._notified)
        if handle is None:
            self._trusted = True
            if self.local_ttl is None:
                self.local_ttl = DEFAULT_UNWATCHED_TTL
        self._watch = handle

    def _notified(self, keys: list[bytes] | None, connected: bool) -> None:
        # The epoch moves first: a fill racing with this sees it and drops itself.
        self._epoch += 1
        if keys is None:
            if connected or not self.serve_local:
                self.local.clear()
                self._flushes += 1
            self._trusted = connected
        else:
            self._invalidations += self.local.delete_many(keys)

    @property
    def watching(self) -> bool:
        """Whether write notifications are flowing now (False for a backend without)."""
        return self._watch is not None and self._watch.connected

    def _l1_ttl(self, left: float | None) -> float | None:
        cap = self.local_ttl
        if left is None:
            return cap
        return left if cap is None or left < cap else cap

    def _fill(self, k: bytes, value: Any, left: float | None, epoch: int) -> None:
        if not self._trusted:
            return
        ttl = self._l1_ttl(left)
        if ttl is not None and ttl <= 0:
            return
        try:
            self.local.set(k, value, ttl)
        except EntryTooLargeError:
            return
        if self._epoch != epoch:
            self.local.delete(k)

    def _missing(self, k: bytes, epoch: int) -> None:
        self._l2_misses += 1
        if self.negative_ttl is not None:
            self._fill(k, _NEGATIVE, self.negative_ttl, epoch)

    def _down(self, k: bytes, exc: BaseException) -> Any:
        """What a read answers when L2 is down: L1's entry (serve_local), else raise."""
        self._errors += 1
        if self.serve_local:
            value = self.local._peek(k, MISSING)
            if value is not MISSING:
                self._served_local += 1
                return value
        raise exc

    def collector(self, name: str = "default") -> TieredCollector:
        """A Prometheus collector of :meth:`stats` (``hypercache_tiered_*`` families,
        labelled ``cache=name``), for a registry of the application's own::

            prometheus_client.REGISTRY.register(cache.collector("profiles"))
        """
        return TieredCollector(self, name)

    def stats(self) -> TieredStats:
        """Counters of both tiers now (L1's are the local cache's own)."""
        s = self.local.stats()
        return TieredStats(
            l1_hits=s.hits,
            l1_misses=s.misses,
            l2_hits=self._l2_hits,
            l2_misses=self._l2_misses,
            invalidations=self._invalidations,
            flushes=self._flushes,
            backend_errors=self._errors,
            served_local=self._served_local,
            computed=self._computed,
            lease_waits=self._lease_waits,
            local_size=s.size,
        )


#: The counters of :class:`TieredStats` a collector exports, with their HELP.
_COUNTERS: Final = (
    ("l1_hits", "Reads answered by the local tier."),
    ("l1_misses", "Reads the local tier could not answer."),
    ("l2_hits", "Backend reads that found the key."),
    ("l2_misses", "Backend reads that did not find the key."),
    ("invalidations", "Local entries dropped by notifications of writes."),
    ("flushes", "Times the local tier was flushed (notification link lost, made, overflowed)."),
    ("backend_errors", "Backend calls that failed because the backend was down or slow."),
    ("served_local", "Reads answered from the local tier while the backend was down."),
    ("computed", "Values computed by get_or_set and memoize in this process."),
    ("lease_waits", "Times this process waited for another's lease."),
)


class TieredCollector:
    """A Prometheus collector of one tiered cache (see :meth:`TieredCache.collector`):
    its counters as ``hypercache_tiered_<name>_total``, and the gauges
    ``hypercache_tiered_local_size`` and ``hypercache_tiered_watching``."""

    def __init__(self, cache: _Tiers, name: str) -> None:
        self._cache = cache
        self._name = name

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._cache.stats()
        label = [self._name]
        for field, doc in _COUNTERS:
            fam = CounterMetricFamily(f"hypercache_tiered_{field}", doc, labels=["cache"])
            fam.add_metric(label, getattr(s, field))
            yield fam
        size = GaugeMetricFamily(
            "hypercache_tiered_local_size", "Entries in the local tier.", labels=["cache"]
        )
        size.add_metric(label, s.local_size)
        yield size
        watching = GaugeMetricFamily(
            "hypercache_tiered_watching",
            "1 while write notifications flow from the backend, else 0.",
            labels=["cache"],
        )
        watching.add_metric(label, 1.0 if self._cache.watching else 0.0)
        yield watching


class _Flight:
    __slots__ = ("done", "error", "owner", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.owner = threading.get_ident()


def _check_compression(backend: object, compression: CompressionArg) -> None:
    if compression is not ... and not isinstance(backend, str):
        raise ConfigError(
            "compression", "applies to a backend opened from a URL; give the backend its own"
        )


class TieredCache(_Tiers):
    """A local :class:`~hypercache.HyperCache` (L1) in front of a backend (L2).

    ::

        cache = TieredCache("redis://127.0.0.1:6379/0?namespace=app:")
        cache.set("user:1", {"name": "Ada"}, ttl=60)
        cache.get("user:1")          # from L1 now, from Redis after an L1 miss

        @cache.memoize(ttl=30)
        def profile(uid: int) -> dict: ...

    :param backend: a :class:`~hypercache.backends.Backend`, or a URL for
        :func:`hypercache.open` (the cache then owns and closes it).
    :param compression: how the backend opened from a URL compresses what it
        stores (instead of the URL's ``compression`` option: a
        :class:`~hypercache.client.compression.Compression`, ``"zstd"``,
        ``"off"``); a backend given as an object has its own.
    :param local: L1 (any policy, any bounds); by default an LRU of 10,000 items.
    :param local_ttl: the longest an entry stays in L1 (None: as long as in L2,
        when the backend notifies; 1 s when it cannot).
    :param negative_ttl: keep "absent in L2" in L1 for that long (None: never).
    :param on_backend_error: ``"raise"`` (default) or ``"serve_local"``.
    :param invalidate: listen to the backend's write notifications (default True).
    :param lease_ttl: seconds a stampede lease is held at most.
    :param lease_poll: seconds between two looks of a process waiting for a lease.

    Keys are ``str`` or ``bytes`` (``"k"`` and ``b"k"`` are one entry). L1 holds
    the values as given to :meth:`set` (or decoded from L2), so a tuple written
    here reads back as a tuple from L1 and as a list (msgpack) from L2.
    """

    def __init__(
        self,
        backend: Backend | str,
        *,
        local: HyperCache[bytes, Any] | None = None,
        local_ttl: float | None = None,
        negative_ttl: float | None = None,
        on_backend_error: Literal["raise", "serve_local"] = "raise",
        invalidate: bool = True,
        lease_ttl: float = 10.0,
        lease_poll: float = 0.005,
        compression: CompressionArg = ...,
    ) -> None:
        super().__init__(local, local_ttl, negative_ttl, on_backend_error, lease_ttl, lease_poll)
        self._owned = isinstance(backend, str)
        _check_compression(backend, compression)
        self.backend: Backend = (
            open(backend, compression=compression) if isinstance(backend, str) else backend
        )
        if not isinstance(self.backend, Backend):
            raise ConfigError("backend", f"must be a Backend or a URL, got {backend!r}")
        self._async_flights: dict[bytes, asyncio.Future[Any]] = {}
        self._start_watch(self.backend.watch if invalidate else None)

    def __repr__(self) -> str:
        return f"TieredCache({self.backend!r}, local={self.local!r})"

    def close(self) -> None:
        """Stop listening to notifications; close the backend if it was opened here."""
        if self._watch is not None:
            self._watch.close()
        if self._owned:
            self.backend.close()

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- reads

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The value of ``key`` (L1, else L2), or ``default``."""
        k = encode_key(key)
        if self._trusted:
            value = self.local.get(k, MISSING)
            if value is not MISSING:
                return default if value is _NEGATIVE else value
        value = self._read(k)
        return default if value is MISSING or value is _NEGATIVE else value

    def _read(self, k: bytes) -> Any:
        epoch = self._epoch
        try:
            entry = self.backend.get_entry(k)
        except BACKEND_DOWN as exc:
            return self._down(k, exc)
        if entry is MISSING:
            self._missing(k, epoch)
            return MISSING
        value, left = cast(Entry, entry)
        self._l2_hits += 1
        self._fill(k, value, left, epoch)
        return value

    def __getitem__(self, key: str | bytes) -> Any:
        value = self.get(key, MISSING)
        if value is MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return self.get(cast(Any, key), MISSING) is not MISSING

    def get_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        """``{key: value}`` of the present keys; L1 first, the rest in one L2 call."""
        out: dict[str | bytes, Any] = {}
        wanted: dict[bytes, list[str | bytes]] = {}
        for key in keys:
            k = encode_key(key)
            value = self.local.get(k, MISSING) if self._trusted else MISSING
            if value is MISSING:
                wanted.setdefault(k, []).append(key)
            elif value is not _NEGATIVE:
                out[key] = value
        if not wanted:
            return out
        epoch = self._epoch
        try:
            found = self.backend.get_entries(list(wanted))
        except BACKEND_DOWN as exc:
            self._errors += 1
            if not self.serve_local:
                raise
            for k, given in wanted.items():
                value = self.local._peek(k, MISSING)
                if value is MISSING:
                    raise exc from None
                self._served_local += 1
                if value is not _NEGATIVE:
                    out.update(dict.fromkeys(given, value))
            return out
        for k, given in wanted.items():
            entry = found.get(k)
            if entry is None:
                self._missing(k, epoch)
                continue
            self._l2_hits += 1
            self._fill(k, entry[0], entry[1], epoch)
            out.update(dict.fromkeys(given, entry[0]))
        return out

    def ttl(self, key: str | bytes) -> float | None:
        """L2's remaining TTL of ``key`` (None: never expires). :raises KeyError: absent."""
        return self.backend.ttl(key)

    # ---------------------------------------------------------------- writes

    def set(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        """Store in L2, then in L1 (capped by ``local_ttl``)."""
        k = encode_key(key)
        epoch = self._epoch
        self.backend.set(k, value, ttl)
        if self.backend.notifies_synchronously:
            epoch = self._epoch  # our write's own notifications are done: not a race
        self._fill(k, value, ttl, epoch)

    def __setitem__(self, key: str | bytes, value: Any) -> None:
        self.set(key, value)

    def set_many(self, mapping: Mapping[str | bytes, Any], ttl: float | None = None) -> None:
        """Store every item in L2 (one call), then in L1."""
        epoch = self._epoch
        self.backend.set_many(mapping, ttl)
        if self.backend.notifies_synchronously:
            epoch = self._epoch
        for key, value in mapping.items():
            self._fill(encode_key(key), value, ttl, epoch)

    def delete(self, key: str | bytes) -> bool:
        """Delete from L2 and L1; return whether L2 held it."""
        k = encode_key(key)
        try:
            return self.backend.delete(k)
        finally:
            self.local.delete(k)

    def __delitem__(self, key: str | bytes) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def clear(self) -> int:
        """Drop the namespace in L2 and everything in L1; return L2's count."""
        try:
            return self.backend.clear()
        finally:
            self.local.clear()

    # ---------------------------------------------------------------- compute once

    def get_or_set(
        self, key: str | bytes, factory: Callable[[], Any], ttl: float | None = None
    ) -> Any:
        """The value of ``key``; if absent, ``factory()``'s, stored with ``ttl``,
        computed once across the threads of this process and the processes sharing
        L2 (see the module docstring). Exceptions of ``factory`` are not cached."""
        try:
            value = self.get(key, MISSING)
        except BACKEND_DOWN:
            if not self.serve_local:
                raise
            self._computed += 1
            return factory()
        if value is not MISSING:
            return value
        k = encode_key(key)
        with self._flights_lock:
            flight = self._flights.get(k)
            leader = flight is None
            if flight is None:
                flight = self._flights[k] = _Flight()
        assert isinstance(flight, _Flight)
        if not leader:
            if flight.owner == threading.get_ident():
                raise RuntimeError(f"re-entrant computation of key {key!r}")
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result
        try:
            flight.result = self._compute(k, factory, ttl)
            return flight.result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._flights_lock:
                del self._flights[k]
            flight.done.set()

    def _compute(self, k: bytes, factory: Callable[[], Any], ttl: float | None) -> Any:
        lease = _LEASE + k
        token = os.urandom(12).hex()
        waited = False
        while True:
            epoch = self._epoch
            try:
                entry = self.backend.get_entry(k)
                if entry is MISSING:
                    got = self.backend.add(lease, token, self.lease_ttl)
            except BACKEND_DOWN as exc:
                try:
                    return self._down(k, exc)
                except BACKEND_DOWN:
                    if not self.serve_local:
                        raise
                self._computed += 1
                return factory()
            if entry is not MISSING:
                value, left = cast(Entry, entry)
                self._l2_hits += 1
                self._fill(k, value, left, epoch)
                return value
            if got:
                break
            if not waited:
                waited = True
                self._lease_waits += 1
            time.sleep(self.lease_poll)
        try:
            # The holder before us may have stored it and let go between our look and
            # our lease: look again, now that nobody else can be computing it.
            epoch = self._epoch
            entry = self.backend.get_entry(k)
            if entry is not MISSING:
                value, left = cast(Entry, entry)
                self._fill(k, value, left, epoch)
                return value
            self._computed += 1
            value = factory()
            self.set(k, value, ttl)
            return value
        finally:
            with contextlib.suppress(*BACKEND_DOWN):  # it expires by itself
                self.backend.delete_if(lease, token)

    def memoize(
        self, ttl: float | None = None, key: Callable[..., Hashable] | None = None
    ) -> Callable[[F], F]:
        """Decorate a function (plain or ``async def``) to cache its results in both
        tiers, computed once per key across processes (as :meth:`get_or_set`).

        The key is ``"<module>.<qualname>:<repr(args)>"`` (and the sorted kwargs),
        or ``"<module>.<qualname>:<key(*args, **kwargs)>"``: arguments whose ``repr``
        is stable across processes (numbers, strings, tuples of them), or a ``key``.
        The wrapper has ``cache_key(*args, **kwargs)`` and ``invalidate(...)``. An
        ``async def`` function is awaited on the caller's loop; L2 calls run in a
        worker thread (``asyncio.to_thread``), so they never block the loop.
        """
        _check_ttl("ttl", ttl)
        if key is not None and not callable(key):
            raise ConfigError("key", f"must be callable or None, got {key!r}")

        def decorate(func: F) -> F:
            cache_key = _call_key(func, key)
            wrapper: Any
            if inspect.iscoroutinefunction(func):
                engine = _AsyncEngine(self, _Threaded(self.backend), self._async_flights)

                @functools.wraps(func)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    k = cache_key(*args, **kwargs)
                    return await engine.get_or_set(k, lambda: func(*args, **kwargs), ttl)

                wrapper = async_wrapper
            else:

                @functools.wraps(func)
                def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                    k = cache_key(*args, **kwargs)
                    return self.get_or_set(k, lambda: func(*args, **kwargs), ttl)

                wrapper = sync_wrapper
            wrapper.cache_key = cache_key
            wrapper.invalidate = lambda *a, **kw: self.delete(cache_key(*a, **kw))
            return cast(F, wrapper)

        return decorate


class _Threaded:
    """A sync backend's calls, run in a worker thread for a coroutine."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.notifies_synchronously = backend.notifies_synchronously

    async def get_entry(self, key: bytes) -> Entry | _Missing:
        return await asyncio.to_thread(self.backend.get_entry, key)

    async def add(self, key: bytes, value: Any, ttl: float | None) -> bool:
        return await asyncio.to_thread(self.backend.add, key, value, ttl)

    async def set(self, key: bytes, value: Any, ttl: float | None) -> None:
        await asyncio.to_thread(self.backend.set, key, value, ttl)

    async def delete_if(self, key: bytes, value: Any) -> bool:
        return await asyncio.to_thread(self.backend.delete_if, key, value)


class _AsyncEngine:
    """Read-through and compute-once over an async backend, for both faces."""

    def __init__(
        self,
        tiers: _Tiers,
        backend: AsyncBackend | _Threaded,
        flights: dict[bytes, asyncio.Future[Any]],
    ) -> None:
        self.t = tiers
        self.backend = backend
        self.flights = flights

    async def read(self, k: bytes) -> Any:
        t = self.t
        epoch = t._epoch
        try:
            entry = await self.backend.get_entry(k)
        except BACKEND_DOWN as exc:
            return t._down(k, exc)
        if entry is MISSING:
            t._missing(k, epoch)
            return MISSING
        value, left = cast(Entry, entry)
        t._l2_hits += 1
        t._fill(k, value, left, epoch)
        return value

    async def get(self, key: str | bytes, default: Any) -> Any:
        k = encode_key(key)
        if self.t._trusted:
            value = self.t.local.get(k, MISSING)
            if value is not MISSING:
                return default if value is _NEGATIVE else value
        value = await self.read(k)
        return default if value is MISSING or value is _NEGATIVE else value

    async def get_or_set(
        self, key: str | bytes, factory: Callable[[], Awaitable[Any]], ttl: float | None
    ) -> Any:
        try:
            value = await self.get(key, MISSING)
        except BACKEND_DOWN:
            if not self.t.serve_local:
                raise
            self.t._computed += 1
            return await factory()
        if value is not MISSING:
            return value
        k = encode_key(key)
        loop = asyncio.get_running_loop()
        while True:
            pending = self.flights.get(k)
            if pending is None or pending.get_loop() is not loop:
                break
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and not (task is not None and task.cancelling()):
                    continue  # the leader was cancelled, not us: take over
                raise
        future: asyncio.Future[Any] = loop.create_future()
        self.flights[k] = future
        try:
            value = await self._compute(k, factory, ttl)
            future.set_result(value)
            return value
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            if self.flights.get(k) is future:
                del self.flights[k]

    async def _compute(
        self, k: bytes, factory: Callable[[], Awaitable[Any]], ttl: float | None
    ) -> Any:
        t = self.t
        lease = _LEASE + k
        token = os.urandom(12).hex()
        waited = False
        while True:
            epoch = t._epoch
            try:
                entry = await self.backend.get_entry(k)
                if entry is MISSING:
                    got = await self.backend.add(lease, token, t.lease_ttl)
            except BACKEND_DOWN as exc:
                try:
                    return t._down(k, exc)
                except BACKEND_DOWN:
                    if not t.serve_local:
                        raise
                t._computed += 1
                return await factory()
            if entry is not MISSING:
                value, left = cast(Entry, entry)
                t._l2_hits += 1
                t._fill(k, value, left, epoch)
                return value
            if got:
                break
            if not waited:
                waited = True
                t._lease_waits += 1
            await asyncio.sleep(t.lease_poll)
        try:
            epoch = t._epoch  # as in TieredCache._compute: look again under the lease
            entry = await self.backend.get_entry(k)
            if entry is not MISSING:
                value, left = cast(Entry, entry)
                t._fill(k, value, left, epoch)
                return value
            t._computed += 1
            value = await factory()
            epoch = t._epoch
            await self.backend.set(k, value, ttl)
            if self.backend.notifies_synchronously:
                epoch = t._epoch
            t._fill(k, value, ttl, epoch)
            return value
        finally:
            with contextlib.suppress(*BACKEND_DOWN):
                await self.backend.delete_if(lease, token)


class AsyncTieredCache(_Tiers):
    """The asyncio face of :class:`TieredCache`: same parameters, with an
    :class:`~hypercache.backends.AsyncBackend` (or a URL for
    :func:`hypercache.open_async`); reads and writes are awaited. L1 hits do not
    await anything. Use it on one event loop."""

    def __init__(
        self,
        backend: AsyncBackend | str,
        *,
        local: HyperCache[bytes, Any] | None = None,
        local_ttl: float | None = None,
        negative_ttl: float | None = None,
        on_backend_error: Literal["raise", "serve_local"] = "raise",
        invalidate: bool = True,
        lease_ttl: float = 10.0,
        lease_poll: float = 0.005,
        compression: CompressionArg = ...,
    ) -> None:
        super().__init__(local, local_ttl, negative_ttl, on_backend_error, lease_ttl, lease_poll)
        self._owned = isinstance(backend, str)
        _check_compression(backend, compression)
        self.backend: AsyncBackend = (
            open_async(backend, compression=compression) if isinstance(backend, str) else backend
        )
        if not isinstance(self.backend, AsyncBackend):
            raise ConfigError("backend", f"must be an AsyncBackend or a URL, got {backend!r}")
        self._engine = _AsyncEngine(self, self.backend, {})
        self._start_watch(self.backend.watch if invalidate else None)

    def __repr__(self) -> str:
        return f"AsyncTieredCache({self.backend!r}, local={self.local!r})"

    async def close(self) -> None:
        """As :meth:`TieredCache.close`."""
        if self._watch is not None:
            self._watch.close()
        if self._owned:
            await self.backend.close()

    async def __aenter__(self) -> AsyncTieredCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def get(self, key: str | bytes, default: Any = None) -> Any:
        """As :meth:`TieredCache.get`."""
        return await self._engine.get(key, default)

    async def get_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        """As :meth:`TieredCache.get_many`."""
        out: dict[str | bytes, Any] = {}
        wanted: dict[bytes, list[str | bytes]] = {}
        for key in keys:
            k = encode_key(key)
            value = self.local.get(k, MISSING) if self._trusted else MISSING
            if value is MISSING:
                wanted.setdefault(k, []).append(key)
            elif value is not _NEGATIVE:
                out[key] = value
        if not wanted:
            return out
        epoch = self._epoch
        try:
            found = await self.backend.get_entries(list(wanted))
        except BACKEND_DOWN:
            self._errors += 1
            raise
        for k, given in wanted.items():
            entry = found.get(k)
            if entry is None:
                self._missing(k, epoch)
                continue
            self._l2_hits += 1
            self._fill(k, entry[0], entry[1], epoch)
            out.update(dict.fromkeys(given, entry[0]))
        return out

    async def ttl(self, key: str | bytes) -> float | None:
        """As :meth:`TieredCache.ttl`."""
        return await self.backend.ttl(key)

    async def set(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        """As :meth:`TieredCache.set`."""
        k = encode_key(key)
        epoch = self._epoch
        await self.backend.set(k, value, ttl)
        if self.backend.notifies_synchronously:
            epoch = self._epoch
        self._fill(k, value, ttl, epoch)

    async def set_many(self, mapping: Mapping[str | bytes, Any], ttl: float | None = None) -> None:
        """As :meth:`TieredCache.set_many`."""
        epoch = self._epoch
        await self.backend.set_many(mapping, ttl)
        if self.backend.notifies_synchronously:
            epoch = self._epoch
        for key, value in mapping.items():
            self._fill(encode_key(key), value, ttl, epoch)

    async def delete(self, key: str | bytes) -> bool:
        """As :meth:`TieredCache.delete`."""
        k = encode_key(key)
        try:
            return await self.backend.delete(k)
        finally:
            self.local.delete(k)

    async def clear(self) -> int:
        """As :meth:`TieredCache.clear`."""
        try:
            return await self.backend.clear()
        finally:
            self.local.clear()

    async def get_or_set(
        self, key: str | bytes, factory: Callable[[], Awaitable[Any]], ttl: float | None = None
    ) -> Any:
        """As :meth:`TieredCache.get_or_set`, with an ``async`` factory (a function
        returning an awaitable)."""
        return await self._engine.get_or_set(key, factory, ttl)

    def memoize(
        self, ttl: float | None = None, key: Callable[..., Hashable] | None = None
    ) -> Callable[[F], F]:
        """As :meth:`TieredCache.memoize`, for ``async def`` functions only.

        :raises TypeError: the function is not a coroutine function.
        """
        _check_ttl("ttl", ttl)
        if key is not None and not callable(key):
            raise ConfigError("key", f"must be callable or None, got {key!r}")

        def decorate(func: F) -> F:
            if not inspect.iscoroutinefunction(func):
                raise TypeError(
                    "AsyncTieredCache.memoize decorates async def functions; "
                    "use TieredCache for plain ones"
                )
            cache_key = _call_key(func, key)

            @functools.wraps(func)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                k = cache_key(*args, **kwargs)
                return await self._engine.get_or_set(k, lambda: func(*args, **kwargs), ttl)

            w: Any = wrapper
            w.cache_key = cache_key

            async def invalidate(*a: Any, **kw: Any) -> bool:
                return await self.delete(cache_key(*a, **kw))

            w.invalidate = invalidate
            return cast(F, w)

        return decorate
