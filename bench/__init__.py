"""Benchmarks of the embedded cache against its peers; ``python -m bench.report`` runs them.

This module is the one place that knows how to drive each cache under comparison:
an :class:`Impl` builds a cache of a given capacity and hands out its bound ``get``
and ``set`` callables, so every benchmark loop has the same shape for every cache::

    get = impl.getter(cache)       # hoisted out of the timed loop
    for k in batch:
        get(k)

Peers are imported lazily (inside :meth:`Impl.make`) so that a missing one skips its
benchmarks instead of breaking the run, and so that a memory measurement can import
everything before it takes its "before" reading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["HYPERCACHE_POLICIES", "IMPLS", "MISSING", "Impl", "hypercache_impl", "impl"]

#: Sentinel default for ``get(key, MISSING)`` in the hit-ratio loop.
MISSING: Any = object()

#: Every eviction policy HyperCache names in its API.
HYPERCACHE_POLICIES = ("lru", "lfu", "fifo", "clock", "arc", "tinylfu")


@dataclass(frozen=True, kw_only=True)
class Impl:
    """How to build and drive one cache under test.

    :param name: label in the report, e.g. ``"HyperCache(lru)"``.
    :param make: ``capacity -> cache``.
    :param get: ``cache -> bound get(key)``: the read the speed loops call.
    :param set: ``cache -> bound set(key, value)``: the write the speed loops call.
    :param lookup: ``cache -> (key -> bool)``: hit or miss, for the hit-ratio loop.
    :param note: how the cache is configured, printed in the report.
    :param peer: ``True`` for third-party caches (the "fastest peer" pool of the
        targets); ``False`` for HyperCache itself and the ``dict`` baseline.
    :param close: ``cache -> None``, called when a benchmark is done with the cache.
    """

    name: str
    make: Callable[[int], Any]
    get: Callable[[Any], Callable[..., Any]]
    set: Callable[[Any], Callable[[Any, Any], Any]]
    lookup: Callable[[Any], Callable[[Any], bool]]
    note: str
    peer: bool = True
    close: Callable[[Any], None] = lambda cache: None


def _getitem_lookup(cache: Any) -> Callable[[Any], bool]:
    get = cache.get
    return lambda k: get(k, MISSING) is not MISSING


# -- HyperCache -------------------------------------------------------------------------


def hypercache_impl(policy: str) -> Impl:
    def make(capacity: int) -> Any:
        from hypercache import HyperCache  # the public import; ImportError skips

        return HyperCache(capacity, policy=policy)

    return Impl(
        name=f"HyperCache({policy})",
        make=make,
        get=lambda c: c.get,
        set=lambda c: c.set,
        lookup=_getitem_lookup,
        note=f'HyperCache(capacity, policy="{policy}"); get(k) / set(k, v)',
        peer=False,
    )


# -- peers --------------------------------------------------------------------------------


def _make_dict(capacity: int) -> Any:
    return {}


def _make_cachetools_lru(capacity: int) -> Any:
    import cachetools

    return cachetools.LRUCache(capacity)


def _make_cachetools_lfu(capacity: int) -> Any:
    import cachetools

    return cachetools.LFUCache(capacity)


def _make_cachebox_lru(capacity: int) -> Any:
    import cachebox

    return cachebox.LRUCache(capacity)


def _make_lru_dict(capacity: int) -> Any:
    import lru

    return lru.LRU(capacity)


def _make_theine(capacity: int) -> Any:
    import theine

    # theine 2.x: Cache(size, nolock=False); W-TinyLFU is its only policy. nolock=True
    # is its documented single-thread mode and its fastest configuration; every loop
    # here is single-threaded.
    return theine.Cache(capacity, nolock=True)


def _close_theine(cache: Any) -> None:
    # Each theine.Cache has a maintenance task, run every second on theine's own
    # thread, that keeps the cache alive until closed: close it, or every cache a
    # benchmark ever built keeps taking the GIL while later benchmarks are timed.
    cache.close()


def _theine_lookup(cache: Any) -> Callable[[Any], bool]:
    get = cache.get
    return lambda k: get(k)[1]


IMPLS: dict[str, Impl] = {
    i.name: i
    for i in (
        hypercache_impl("lru"),
        hypercache_impl("tinylfu"),
        Impl(
            name="dict",
            make=_make_dict,
            get=lambda c: c.get,
            set=lambda c: c.__setitem__,
            lookup=_getitem_lookup,
            note="plain dict, unbounded; d.get(k) / d.__setitem__(k, v)",
            peer=False,
        ),
        Impl(
            name="cachetools.LRUCache",
            make=_make_cachetools_lru,
            get=lambda c: c.get,
            set=lambda c: c.__setitem__,
            lookup=_getitem_lookup,
            note="LRUCache(capacity); get(k) / __setitem__(k, v)",
        ),
        Impl(
            name="cachetools.LFUCache",
            make=_make_cachetools_lfu,
            get=lambda c: c.get,
            set=lambda c: c.__setitem__,
            lookup=_getitem_lookup,
            note="LFUCache(capacity); hit ratio only",
        ),
        Impl(
            name="cachebox.LRUCache",
            make=_make_cachebox_lru,
            get=lambda c: c.get,
            # insert() is cachebox's faster write (no slot-wrapper hop).
            set=lambda c: c.insert,
            lookup=_getitem_lookup,
            note="LRUCache(capacity); get(k) / insert(k, v)",
        ),
        Impl(
            name="lru_dict.LRU",
            make=_make_lru_dict,
            get=lambda c: c.get,
            set=lambda c: c.__setitem__,
            lookup=_getitem_lookup,
            note="LRU(capacity); get(k) / __setitem__(k, v)",
        ),
        Impl(
            name="theine.Cache",
            make=_make_theine,
            get=lambda c: c.get,
            set=lambda c: c.set,
            lookup=_theine_lookup,
            close=_close_theine,
            note="Cache(capacity, nolock=True) (W-TinyLFU); get(k) -> (v, ok) / set(k, v)",
        ),
    )
}


def impl(name: str) -> Impl:
    """The :class:`Impl` called ``name``; HyperCache policies beyond the two in
    :data:`IMPLS` are built on demand (``"HyperCache(arc)"``)."""
    try:
        return IMPLS[name]
    except KeyError:
        if name.startswith("HyperCache(") and name.endswith(")"):
            return hypercache_impl(name[len("HyperCache(") : -1])
        raise
