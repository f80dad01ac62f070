"""The in-process backend: a :class:`~hypercache.HyperCache` behind the backend interface.

For tests and single-process services that want the backend API (or a
:class:`~hypercache.tiered.TieredCache`) without a server. Values are serialised as
on every other backend, so code that runs on it runs on Redis unchanged (tuples come
back as lists with msgpack). Writers are all in this process, so :meth:`watch`
is exact: every write calls the watchers before it returns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from hypercache.backends.base import (
    MISSING,
    AsyncBackend,
    Backend,
    Entry,
    Invalidation,
    InvalidationCallback,
    _Missing,
    check_ttl,
)
from hypercache.cache import HyperCache
from hypercache.client.serializer import Serializer

__all__ = ["AsyncMemoryBackend", "MemoryBackend"]


class _Watch(Invalidation):
    def __init__(self, owner: MemoryBackend, callback: InvalidationCallback) -> None:
        self._owner = owner
        self.callback = callback
        self._open = True

    @property
    def connected(self) -> bool:
        return self._open

    def close(self) -> None:
        if self._open:
            self._open = False
            self._owner._unwatch(self)


class MemoryBackend(Backend):
    """A backend over an in-process :class:`~hypercache.HyperCache` of bytes.

    :param store: the table to use (share one between backends to share entries);
        by default a new one bounded by ``max_items`` / ``max_bytes`` with ``policy``.
    :param namespace: prefix of every key (see :mod:`hypercache.backends.base`).
    :param serializer: how values become bytes (msgpack by default).
    """

    scheme = "memory"
    notifies_synchronously = True

    def __init__(
        self,
        store: HyperCache[bytes, bytes] | None = None,
        *,
        max_items: int | None = None,
        max_bytes: int | None = None,
        policy: str = "lru",
        namespace: str | bytes = "",
        serializer: Serializer | None = None,
    ) -> None:
        super().__init__(namespace=namespace, serializer=serializer)
        self.store: HyperCache[bytes, bytes] = (
            store
            if store is not None
            else HyperCache(max_items, max_bytes=max_bytes, policy=policy)
        )
        self._lock = threading.Lock()  # makes add / delete_if atomic
        self._watches: list[_Watch] = []

    # ------------------------------------------------------------ notifications

    def watch(self, callback: InvalidationCallback) -> Invalidation:
        w = _Watch(self, callback)
        with self._lock:
            self._watches = [*self._watches, w]
        callback(None, True)
        return w

    def _unwatch(self, w: _Watch) -> None:
        with self._lock:
            self._watches = [x for x in self._watches if x is not w]

    def _changed(self, keys: list[bytes] | None) -> None:
        for w in self._watches:
            w.callback(keys, True)

    # ------------------------------------------------------------ operations

    def get_entry(self, key: str | bytes) -> Entry | _Missing:
        k = self._k(key)
        data = self.store.get(k, MISSING)
        if data is MISSING:
            return MISSING
        try:
            left = self.store.ttl(k)
        except KeyError:  # expired between the two looks
            return MISSING
        return self.serializer.loads(data), left  # type: ignore[arg-type]

    def set(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        check_ttl(ttl)
        k = self._k(key)
        self.store.set(k, self.serializer.dumps(value), ttl)
        self._changed([self._strip(k)])

    def add(self, key: str | bytes, value: Any, ttl: float | None = None) -> bool:
        check_ttl(ttl)
        k = self._k(key)
        data = self.serializer.dumps(value)
        with self._lock:
            if k in self.store:
                return False
            self.store.set(k, data, ttl)
        self._changed([self._strip(k)])
        return True

    def delete(self, key: str | bytes) -> bool:
        k = self._k(key)
        found = self.store.delete(k)
        if found:
            self._changed([self._strip(k)])
        return found

    def delete_if(self, key: str | bytes, value: Any) -> bool:
        k = self._k(key)
        data = self.serializer.dumps(value)
        with self._lock:
            if self.store._peek(k, None) != data:
                return False
            self.store.delete(k)
        self._changed([self._strip(k)])
        return True

    def get_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        out: dict[str | bytes, Any] = {}
        loads = self.serializer.loads
        for key in keys:
            data = self.store.get(self._k(key), MISSING)
            if data is not MISSING:
                out[key] = loads(data)  # type: ignore[arg-type]
        return out

    def set_many(self, mapping: Mapping[str | bytes, Any], ttl: float | None = None) -> None:
        check_ttl(ttl)
        dumps = self.serializer.dumps
        encoded = {self._k(k): dumps(v) for k, v in mapping.items()}
        self.store.set_many(encoded, ttl)
        self._changed([self._strip(k) for k in encoded])

    def ttl(self, key: str | bytes) -> float | None:
        return self.store.ttl(self._k(key))

    def clear(self) -> int:
        ns = self.namespace
        if not ns:
            n = len(self.store)
            self.store.clear()
        else:
            n = self.store.delete_many([k for k in self.store if k.startswith(ns)])
        self._changed(None)
        return n

    def __repr__(self) -> str:
        return f"MemoryBackend(namespace={self.namespace!r}, size={len(self.store)})"


class AsyncMemoryBackend(AsyncBackend):
    """The asyncio face of a :class:`MemoryBackend` (same parameters; nothing awaits)."""

    scheme = "memory"
    notifies_synchronously = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sync = MemoryBackend(*args, **kwargs)
        super().__init__(namespace=self.sync.namespace, serializer=self.sync.serializer)

    async def get_entry(self, key: str | bytes) -> Entry | _Missing:
        return self.sync.get_entry(key)

    async def set(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        self.sync.set(key, value, ttl)

    async def add(self, key: str | bytes, value: Any, ttl: float | None = None) -> bool:
        return self.sync.add(key, value, ttl)

    async def delete(self, key: str | bytes) -> bool:
        return self.sync.delete(key)

    async def delete_if(self, key: str | bytes, value: Any) -> bool:
        return self.sync.delete_if(key, value)

    async def get_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        return self.sync.get_many(keys)

    async def set_many(self, mapping: Mapping[str | bytes, Any], ttl: float | None = None) -> None:
        self.sync.set_many(mapping, ttl)

    async def ttl(self, key: str | bytes) -> float | None:
        return self.sync.ttl(key)

    async def clear(self) -> int:
        return self.sync.clear()

    def watch(self, callback: InvalidationCallback) -> Invalidation:
        return self.sync.watch(callback)
