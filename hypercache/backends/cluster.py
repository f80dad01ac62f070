"""The hypercache cluster behind the backend interface: a
:class:`~hypercache.Client` (sync) or :class:`~hypercache.AsyncClient`.

Values are serialised by the client's own serializer (the backend's
``serializer`` is the client's), so a value written through the backend reads back
through the client and the CLI. Every call has the client's ``timeout``.

Write notifications: :meth:`HypercacheBackend.watch` opens a ``WATCH`` link to
every node (:class:`~hypercache.backends.watch.ClusterWatch`) for this namespace,
so a :class:`~hypercache.tiered.TieredCache` in front drops what another process
overwrites or deletes; a link that breaks (or a node's queue that overflows) makes
it flush and distrust its local tier until every link is up again.

:meth:`~HypercacheBackend.add` is the cluster's ``ADD``: the key's first live owner
checks and writes with nothing in between, so of concurrent adds one wins (the
lease of the stampede protection); a failover of that owner may let a second one
win (``docs/backends.md``).
"""

from __future__ import annotations

import contextlib
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
)
from hypercache.backends.watch import ClusterWatch
from hypercache.client import AsyncClient, Client
from hypercache.net.blocking import BlockingConnection

__all__ = ["AsyncHypercacheBackend", "HypercacheBackend"]

# ``keys`` asks the nodes for a glob: escape the namespace's own glob characters.
_GLOB = str.maketrans({"*": "[*]", "?": "[?]", "[": "[[]"})


def _pattern(namespace: bytes) -> bytes:
    return namespace.decode("latin-1").translate(_GLOB).encode("latin-1") + b"*"


def _watch(
    backend: HypercacheBackend | AsyncHypercacheBackend,
    client: Client | AsyncClient,
    callback: InvalidationCallback,
) -> ClusterWatch:
    """A :class:`ClusterWatch` of ``backend``'s namespace, over connections made as
    ``client`` makes its own (same HELLO, token, TLS and limits)."""
    options = client.options
    strip = len(backend.namespace)

    def dial(address: str) -> BlockingConnection:
        conn = BlockingConnection(
            address,
            client._hello,
            client._limits,
            options.connect_timeout,
            ssl=options.ssl,
        )
        conn.timeout = options.timeout
        return conn

    def on_keys(keys: list[bytes] | None, connected: bool) -> None:
        callback(None if keys is None else [k[strip:] for k in keys], connected)

    return ClusterWatch(options.seeds, dial, backend.namespace, on_keys)


def _by_wire(
    backend: Backend | AsyncBackend, keys: Iterable[str | bytes]
) -> dict[bytes, list[str | bytes]]:
    """Each full wire key with the keys given for it ("k" and b"k" are one)."""
    out: dict[bytes, list[str | bytes]] = {}
    for key in keys:
        out.setdefault(backend._k(key), []).append(key)
    return out


class HypercacheBackend(Backend):
    """A backend over a :class:`~hypercache.Client` (which it closes on :meth:`close`)."""

    scheme = "hypercache"

    def __init__(self, client: Client, *, namespace: str | bytes = "") -> None:
        super().__init__(namespace=namespace, serializer=client.options.serializer)
        self.client = client
        self._watches: list[ClusterWatch] = []

    def get_entry(self, key: str | bytes) -> Entry | _Missing:
        k = self._k(key)
        value: Any = self.client.get(k, MISSING)
        if isinstance(value, _Missing):
            return MISSING
        try:
            left = self.client.ttl(k)
        except KeyError:  # deleted or expired between the two reads
            return MISSING
        return value, left

    def get(self, key: str | bytes, default: Any = None) -> Any:
        return self.client.get(self._k(key), default)

    def set(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        self.client.set(self._k(key), value, ttl)

    def add(self, key: str | bytes, value: Any, ttl: float | None = None) -> bool:
        return self.client.add(self._k(key), value, ttl)

    def delete(self, key: str | bytes) -> bool:
        return self.client.delete(self._k(key))

    def delete_if(self, key: str | bytes, value: Any) -> bool:
        k = self._k(key)
        if self.client.get(k, MISSING) != value:
            return False
        return self.client.delete(k)

    def get_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        given = _by_wire(self, keys)
        found = self.client.get_many(list(given))
        return {key: v for k, v in found.items() for key in given[k]}  # type: ignore[index]

    def set_many(self, mapping: Mapping[str | bytes, Any], ttl: float | None = None) -> None:
        self.client.set_many({self._k(k): v for k, v in mapping.items()}, ttl)

    def ttl(self, key: str | bytes) -> float | None:
        try:
            return self.client.ttl(self._k(key))
        except KeyError:
            raise KeyError(key) from None

    def clear(self) -> int:
        return sum(self.client.delete(k) for k in self.client.keys(_pattern(self.namespace)))

    def ping(self) -> None:
        self.client.ping()

    def watch(self, callback: InvalidationCallback) -> Invalidation:
        """``WATCH`` links to every node, for this namespace (module docstring)."""
        w = _watch(self, self.client, callback)
        self._watches.append(w)
        return w

    def close(self) -> None:
        for w in self._watches:
            w.close()
        self._watches.clear()
        self.client.close()


class AsyncHypercacheBackend(AsyncBackend):
    """A backend over an :class:`~hypercache.AsyncClient` (closed on :meth:`close`)."""

    scheme = "hypercache"

    def __init__(self, client: AsyncClient, *, namespace: str | bytes = "") -> None:
        super().__init__(namespace=namespace, serializer=client.options.serializer)
        self.client = client
        self._watches: list[ClusterWatch] = []

    async def get_entry(self, key: str | bytes) -> Entry | _Missing:
        k = self._k(key)
        value: Any = await self.client.get(k, MISSING)
        if isinstance(value, _Missing):
            return MISSING
        try:
            left = await self.client.ttl(k)
        except KeyError:
            return MISSING
        return value, left

    async def get(self, key: str | bytes, default: Any = None) -> Any:
        return await self.client.get(self._k(key), default)

    async def set(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        await self.client.set(self._k(key), value, ttl)

    async def add(self, key: str | bytes, value: Any, ttl: float | None = None) -> bool:
        return await self.client.add(self._k(key), value, ttl)

    async def delete(self, key: str | bytes) -> bool:
        return await self.client.delete(self._k(key))

    async def delete_if(self, key: str | bytes, value: Any) -> bool:
        k = self._k(key)
        if await self.client.get(k, MISSING) != value:
            return False
        return await self.client.delete(k)

    async def get_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        given = _by_wire(self, keys)
        found = await self.client.get_many(list(given))
        return {key: v for k, v in found.items() for key in given[k]}  # type: ignore[index]

    async def set_many(self, mapping: Mapping[str | bytes, Any], ttl: float | None = None) -> None:
        await self.client.set_many({self._k(k): v for k, v in mapping.items()}, ttl)

    async def ttl(self, key: str | bytes) -> float | None:
        try:
            return await self.client.ttl(self._k(key))
        except KeyError:
            raise KeyError(key) from None

    async def clear(self) -> int:
        n = 0
        for k in await self.client.keys(_pattern(self.namespace)):
            n += await self.client.delete(k)
        return n

    async def ping(self) -> None:
        await self.client.ping()

    def watch(self, callback: InvalidationCallback) -> Invalidation:
        """As :meth:`HypercacheBackend.watch` (the links run on threads)."""
        w = _watch(self, self.client, callback)
        self._watches.append(w)
        return w

    async def close(self) -> None:
        for w in self._watches:
            w.close()
        self._watches.clear()
        with contextlib.suppress(Exception):
            await self.client.close()
