"""The embedded cache: :class:`HyperCache`.

Everything on the hot path (``get``, ``set``, ``delete``, ``[]``, ``in``,
eviction, expiry) is inherited from the compiled
:class:`hypercache._core.cachecore.CacheCore`; this module validates arguments
and adds what waits or coordinates: :meth:`HyperCache.get_or_set` and
:meth:`HyperCache.memoize`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from hypercache._core.arc import ARCPolicy
from hypercache._core.cachecore import CacheCore, CacheStats
from hypercache._core.lfu import LFUPolicy
from hypercache._core.policy import ClockPolicy, FIFOPolicy, LRUPolicy, Policy
from hypercache._core.tinylfu import TinyLFUPolicy
from hypercache.errors import ConfigError, EntryTooLargeError

if TYPE_CHECKING:
    import asyncio

__all__ = ["POLICIES", "CacheStats", "HyperCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: Eviction policies by name.
POLICIES: Final[dict[str, type[Policy]]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "fifo": FIFOPolicy,
    "clock": ClockPolicy,
    "arc": ARCPolicy,
    "tinylfu": TinyLFUPolicy,
}

_MISSING: Final = object()

#: Slots are 32-bit numbers with a few values reserved.
MAX_CAPACITY: Final = 2**32 - 17


class _Flight:
    """One computation in progress, shared by every caller that wants its result."""

    __slots__ = ("done", "error", "owner", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        #: the thread computing it: waiting on it from there would never end
        self.owner = threading.get_ident()

    def wait(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


#: An ``async def`` computation in progress: its future and the task computing it.
_AsyncFlight = tuple["asyncio.Future[Any]", "asyncio.Task[Any] | None"]


def _check_bound(name: str, value: object, most: int) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be a positive integer or None, got {value!r}")
    if not 1 <= value <= most:
        raise ConfigError(name, f"must be between 1 and {most}, got {value!r}")
    return value


def _check_ttl(name: str, value: object) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, f"must be a number of seconds or None, got {value!r}")
    if math.isnan(value) or value <= 0:
        raise ConfigError(name, f"must be a positive number of seconds, got {value!r}")
    return float(value)


class HyperCache(CacheCore[K, V]):
    """An in-process cache bounded in items and/or bytes, with TTLs and eviction.

    :param capacity: the most entries it holds, or None for no item bound.
    :param max_bytes: the byte budget, measured by ``sizeof``, or None.
        Both None means unbounded.
    :param policy: eviction policy: ``"lru"`` (least recently used), ``"lfu"``
        (least frequently used, LRU among equals), ``"fifo"``, ``"clock"``
        (second chance), ``"arc"`` (adaptive replacement) or ``"tinylfu"``
        (W-TinyLFU: admission by frequency; the best hit ratio on skewed loads).
    :param default_ttl: seconds an entry lives when ``set`` gives no ``ttl``;
        None means entries do not expire.
    :param sizeof: a function giving a value's size in bytes. The default is
        ``len()`` for bytes, bytearray and str, and otherwise
        ``value.__sizeof__()``: the object's own footprint (what
        ``sys.getsizeof`` reports without the GC header), not what it
        references. Common types are measured in C without a call.
    :param timer: a monotonic clock in seconds, for tests. The default reads
        the kernel's coarse monotonic clock from C (1-4 ms resolution).

    Every read (``get``, ``[]``, ``get_many``, ``get_or_set``) counts as a use
    for the policy; ``in``, ``ttl()`` and iteration do not.

    TTLs are absolute from the write: a read never extends one. Expired
    entries are never returned; they are dropped when read, and each write
    reclaims a few from the front of an expiry heap, so they go without being
    read and without a thread. :meth:`sweep` reclaims every one now.

    Thread safety: every single-key method is atomic (the compiled core holds
    the GIL from lookup to update and releases dropped references only once
    the table is consistent again), so threads mixing any operations never see
    a torn state. ``get_many``, ``set_many`` and ``delete_many`` are atomic per
    key, not as a whole. ``get_or_set`` and ``memoize`` run the factory once
    for all concurrent callers of the same key.
    """

    __slots__ = ("__weakref__", "_flights", "_flights_lock")

    def __init__(
        self,
        capacity: int | None = None,
        *,
        max_bytes: int | None = None,
        policy: str = "lru",
        default_ttl: float | None = None,
        sizeof: Callable[[Any], int] | None = None,
        timer: Callable[[], float] | None = None,
    ) -> None:
        items = _check_bound("capacity", capacity, MAX_CAPACITY)
        nbytes = _check_bound("max_bytes", max_bytes, 2**64 - 1)
        if not isinstance(policy, str) or policy.lower() not in POLICIES:
            raise ConfigError(
                "policy", f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}"
            )
        ttl = _check_ttl("default_ttl", default_ttl)
        if sizeof is not None and not callable(sizeof):
            raise ConfigError("sizeof", f"must be callable or None, got {sizeof!r}")
        if timer is not None and not callable(timer):
            raise ConfigError("timer", f"must be callable or None, got {timer!r}")
        self._configure(POLICIES[policy.lower()](items), items, nbytes, ttl, sizeof, timer)
        self._flights: dict[Any, _Flight] = {}
        self._flights_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"HyperCache(capacity={self.capacity}, max_bytes={self.max_bytes}, "
            f"policy={self.policy_name!r}, size={len(self)})"
        )

    # ----------------------------------------------------------- single flight

    def get_or_set(self, key: K, factory: Callable[[], V], ttl: float | None = None) -> V:
        """The value under ``key``; if absent, ``factory()``'s result, stored with ``ttl``.

        Concurrent callers (threads) for the same missing key run ``factory``
        once and all receive its result, or its exception (which is not cached).
        """
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return cast(V, value)
        return cast(V, self._single_flight(key, factory, ttl))

    def _single_flight(self, key: Any, factory: Callable[[], Any], ttl: float | None) -> Any:
        with self._flights_lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            if flight.owner == threading.get_ident():
                raise RuntimeError(
                    f"re-entrant computation of key {key!r}: its factory asks for it"
                )
            return flight.wait()
        try:
            # A caller that finished just before we registered may have stored
            # it; look without counting a second lookup.
            value = self._peek(key, _MISSING)
            if value is _MISSING:
                value = factory()
                self._store_result(key, value, ttl)
            flight.result = value
            return value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._flights_lock:
                del self._flights[key]
            flight.done.set()

    def _store_result(self, key: Any, value: Any, ttl: float | None) -> None:
        # A computed value too large for the whole byte budget is still the
        # caller's answer: it is returned, just not cached.
        with contextlib.suppress(EntryTooLargeError):
            self.set(key, value, ttl)

    def memoize(
        self, ttl: float | None = None, key: Callable[..., Hashable] | None = None
    ) -> Callable[[F], F]:
        """Decorate a function (plain or ``async def``) to cache its results here.

        The cache key is ``(function, key(*args, **kwargs))`` with ``key`` given,
        else ``(function, args, sorted kwargs)``: arguments must be hashable.
        Concurrent callers (threads) or awaiters (tasks) with the same
        arguments share one computation; exceptions are not cached. The
        wrapper has ``cache_key(*args, **kwargs)`` and
        ``invalidate(*args, **kwargs) -> bool``. On a method, ``self`` is one of the
        arguments: call them on the class, ``Repo.load.invalidate(repo, 3)``
        (``repo.load.invalidate(3)`` builds a key without ``repo`` and matches
        nothing).
        """
        _check_ttl("ttl", ttl)
        if key is not None and not callable(key):
            raise ConfigError("key", f"must be callable or None, got {key!r}")
        # Memoized entries are keyed by call, not by K: use the table untyped.
        table: Any = self

        def decorate(func: F) -> F:
            def cache_key(*args: Any, **kwargs: Any) -> Hashable:
                if key is not None:
                    return (func, key(*args, **kwargs))
                if kwargs:
                    return (func, args, tuple(sorted(kwargs.items())))
                return (func, args)

            wrapper: Any
            if inspect.iscoroutinefunction(func):
                async_flights: dict[Hashable, _AsyncFlight] = {}

                @functools.wraps(func)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    k = cache_key(*args, **kwargs)
                    value = table.get(k, _MISSING)
                    if value is not _MISSING:
                        return value
                    return await self._async_single_flight(
                        async_flights, k, lambda: func(*args, **kwargs), ttl
                    )

                wrapper = async_wrapper
            else:

                @functools.wraps(func)
                def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                    k = cache_key(*args, **kwargs)
                    value = table.get(k, _MISSING)
                    if value is not _MISSING:
                        return value
                    return self._single_flight(k, lambda: func(*args, **kwargs), ttl)

                wrapper = sync_wrapper

            wrapper.cache_key = cache_key
            wrapper.invalidate = lambda *a, **kw: table.delete(cache_key(*a, **kw))
            return cast(F, wrapper)

        return decorate

    async def _async_single_flight(
        self,
        flights: dict[Hashable, _AsyncFlight],
        key: Hashable,
        start: Callable[[], Awaitable[Any]],
        ttl: float | None,
    ) -> Any:
        import asyncio  # loaded already (this runs in a coroutine); kept off import time

        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        while True:
            flight = flights.get(key)
            # A future belongs to one loop; awaiters on another loop compute alone.
            if flight is None or flight[0].get_loop() is not loop:
                break
            pending, owner = flight
            if owner is me:
                raise RuntimeError(f"re-entrant computation of {key!r}: it awaits itself")
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and not (task is not None and task.cancelling()):
                    continue  # the leader was cancelled, not us: take over
                raise
        future: asyncio.Future[Any] = loop.create_future()
        flights[key] = (future, me)
        table: Any = self
        try:
            # The caller has counted its miss; look again without counting.
            value = table._peek(key, _MISSING)
            if value is _MISSING:
                value = await start()
                self._store_result(key, value, ttl)
            future.set_result(value)
            return value
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            # Mark it retrieved: the awaiters (if any) re-raise it themselves.
            future.exception()
            raise
        finally:
            flight = flights.get(key)
            if flight is not None and flight[0] is future:
                del flights[key]
