"""The backend interface: what :class:`~hypercache.tiered.TieredCache` (and any caller)
needs of a store, sync (:class:`Backend`) and asyncio (:class:`AsyncBackend`).

A backend maps keys to values with optional TTLs, in a *namespace*: a prefix put in
front of every key it sends, so that several applications (or tests) share one store
without seeing each other's keys, and :meth:`Backend.clear` drops one namespace only.

Keys are ``str`` (sent as UTF-8) or ``bytes``; ``"k"`` and ``b"k"`` name one entry.
Values go through a :class:`~hypercache.client.serializer.Serializer` (msgpack by
default, the cluster client's): every backend stores bytes, so a value reads back the
same from any backend, and from any process or language sharing the store.

Every call has a deadline: a backend that cannot answer in time raises
:class:`~hypercache.errors.RequestTimeoutError`, one that cannot be reached
:class:`~hypercache.errors.NodeUnavailableError` (:data:`BACKEND_DOWN` holds both,
for ``except BACKEND_DOWN``); it never hangs. A store's own refusal of a command
raises :class:`~hypercache.errors.ServerError`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from hypercache.client.serializer import Serializer, resolve_serializer
from hypercache.errors import NodeUnavailableError, RequestTimeoutError

__all__ = [
    "BACKEND_DOWN",
    "MISSING",
    "AsyncBackend",
    "Backend",
    "Entry",
    "Invalidation",
    "encode_key",
]


#: The errors that mean "the store cannot answer now" (down, cut off, too slow).
BACKEND_DOWN: Final = (NodeUnavailableError, RequestTimeoutError)


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


#: What :meth:`Backend.get_entry` gives for an absent key.
MISSING: Final = _Missing()

#: ``(value, ttl)``: a present entry and the seconds it has left (``None``: no expiry).
Entry = tuple[Any, float | None]

#: Called as ``callback(keys, connected)``: ``keys`` the keys (namespace stripped)
#: some writer changed, or ``None`` for "anything may have changed" (a flush, the
#: notification link was lost, or it was made again); ``connected`` whether
#: notifications are flowing after this call (false: trust nothing held).
InvalidationCallback = Callable[[list[bytes] | None, bool], None]


def encode_key(key: object) -> bytes:
    """The bytes of ``key`` (``str`` as UTF-8, ``bytes`` as is).

    :raises TypeError: ``key`` is neither ``str`` nor ``bytes``.
    """
    if type(key) is str:
        return key.encode()
    if type(key) is bytes:
        return key
    if isinstance(key, str):
        return str(key).encode()
    if isinstance(key, bytes):
        return bytes(key)
    raise TypeError(f"key must be str or bytes, not {type(key).__name__}")


def check_ttl(ttl: object) -> float | None:
    """``ttl`` checked: ``None`` or a positive finite number of seconds."""
    from hypercache.client._common import ttl_to_ms

    ttl_to_ms(ttl)  # type: ignore[arg-type]
    return ttl  # type: ignore[return-value]


class Invalidation(abc.ABC):
    """A running subscription to another writer's changes (see :meth:`Backend.watch`).

    While :attr:`connected` is false, the subscriber must not trust what it holds:
    changes may be going unseen. Each (re)connection and each loss calls the callback
    with ``(None, connected)``.
    """

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether notifications are flowing now."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop listening (idempotent); the callback is not called again."""


class _Common:
    """What sync and async backends share: the namespace and the serializer."""

    #: the URL scheme that :func:`hypercache.open` maps to this backend
    scheme: str = ""
    #: whether :meth:`Backend.watch` callbacks of a write have all run when the write
    #: returns (in-process stores): a tier in front may then keep its own write
    #: without waiting for (and being dropped by) its echo
    notifies_synchronously: bool = False

    def __init__(
        self, *, namespace: str | bytes = "", serializer: Serializer | None = None
    ) -> None:
        self.namespace: bytes = encode_key(namespace)
        self.serializer: Serializer = resolve_serializer(serializer)

    def _k(self, key: object) -> bytes:
        return self.namespace + encode_key(key)

    def _strip(self, full: bytes) -> bytes:
        return full[len(self.namespace) :]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(namespace={self.namespace!r})"


class Backend(_Common, abc.ABC):
    """A blocking store of keys and values with TTLs, in a namespace.

    Subclasses implement the abstract methods; the rest have defaults built on them.
    """

    @abc.abstractmethod
    def get_entry(self, key: str | bytes) -> Entry | _Missing:
        """``(value, seconds left or None)`` for a present key, else :data:`MISSING`."""

    def get_entries(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Entry]:
        """:meth:`get_entry` of each key, present ones only (keyed as given)."""
        out: dict[str | bytes, Entry] = {}
        for key in keys:
            entry = self.get_entry(key)
            if entry is not MISSING:
                out[key] = entry  # type: ignore[assignment]
        return out

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when it is absent or expired."""
        entry = self.get_entry(key)
        return default if entry is MISSING else entry[0]  # type: ignore[index]

    @abc.abstractmethod
    def set(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (``None``: no expiry)."""

    @abc.abstractmethod
    def add(self, key: str | bytes, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent; return whether it was stored.

        Atomic on Redis (``SET NX``) and in memory; on the hypercache cluster the
        key's first live owner checks and writes (``ADD``): one of concurrent adds
        wins while that owner stands (``docs/backends.md`` on failovers).
        """

    @abc.abstractmethod
    def delete(self, key: str | bytes) -> bool:
        """Delete ``key``; return whether it was present."""

    @abc.abstractmethod
    def delete_if(self, key: str | bytes, value: Any) -> bool:
        """Delete ``key`` only if it holds ``value`` (a lease's token); atomic where
        :meth:`add` is."""

    @abc.abstractmethod
    def get_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        """``{key: value}`` of the present keys among ``keys`` (keyed as given)."""

    @abc.abstractmethod
    def set_many(self, mapping: Mapping[str | bytes, Any], ttl: float | None = None) -> None:
        """Store every item of ``mapping`` with the same ``ttl``."""

    @abc.abstractmethod
    def ttl(self, key: str | bytes) -> float | None:
        """Seconds ``key`` has left, ``None`` if it never expires.

        :raises KeyError: ``key`` is absent.
        """

    @abc.abstractmethod
    def clear(self) -> int:
        """Delete every key of this backend's namespace; return how many."""

    def ping(self) -> None:
        """Raise one of :data:`BACKEND_DOWN` unless the store answers."""
        self.get_entry(b"\x00ping")

    def watch(self, callback: InvalidationCallback) -> Invalidation | None:
        """Call ``callback`` with the keys of this namespace that *any* writer changes
        (this process included), from a thread of the backend; ``None`` when the
        backend cannot notify (then a tier in front must bound staleness by TTL)."""
        return None

    def close(self) -> None:
        """Release connections (idempotent)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncBackend(_Common, abc.ABC):
    """The asyncio twin of :class:`Backend`: the same methods, awaited."""

    @abc.abstractmethod
    async def get_entry(self, key: str | bytes) -> Entry | _Missing:
        """As :meth:`Backend.get_entry`."""

    async def get_entries(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Entry]:
        """As :meth:`Backend.get_entries`."""
        out: dict[str | bytes, Entry] = {}
        for key in keys:
            entry = await self.get_entry(key)
            if entry is not MISSING:
                out[key] = entry  # type: ignore[assignment]
        return out

    async def get(self, key: str | bytes, default: Any = None) -> Any:
        """As :meth:`Backend.get`."""
        entry = await self.get_entry(key)
        return default if entry is MISSING else entry[0]  # type: ignore[index]

    @abc.abstractmethod
    async def set(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        """As :meth:`Backend.set`."""

    @abc.abstractmethod
    async def add(self, key: str | bytes, value: Any, ttl: float | None = None) -> bool:
        """As :meth:`Backend.add`."""

    @abc.abstractmethod
    async def delete(self, key: str | bytes) -> bool:
        """As :meth:`Backend.delete`."""

    @abc.abstractmethod
    async def delete_if(self, key: str | bytes, value: Any) -> bool:
        """As :meth:`Backend.delete_if`."""

    @abc.abstractmethod
    async def get_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        """As :meth:`Backend.get_many`."""

    @abc.abstractmethod
    async def set_many(self, mapping: Mapping[str | bytes, Any], ttl: float | None = None) -> None:
        """As :meth:`Backend.set_many`."""

    @abc.abstractmethod
    async def ttl(self, key: str | bytes) -> float | None:
        """As :meth:`Backend.ttl`."""

    @abc.abstractmethod
    async def clear(self) -> int:
        """As :meth:`Backend.clear`."""

    async def ping(self) -> None:
        """As :meth:`Backend.ping`."""
        await self.get_entry(b"\x00ping")

    def watch(self, callback: InvalidationCallback) -> Invalidation | None:
        """As :meth:`Backend.watch` (the callback runs on a thread, not the loop)."""
        return None

    async def close(self) -> None:
        """As :meth:`Backend.close`."""

    async def __aenter__(self) -> AsyncBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
