"""Serializers: how the clients turn Python values into the bytes a node stores.

Nodes store values as opaque bytes. The clients serialise every value on the way
in and deserialise it on the way out with a :class:`Serializer`; keys are never
serialised (see :mod:`hypercache.client.keys`).

=======================  ==========================================================
:class:`MsgpackSerializer`  the default: compact, fast, safe on untrusted data,
                         readable from any language. ``None``, bools, ints, floats,
                         ``str``, ``bytes``, lists and dicts. Tuples come back as
                         lists.
:class:`PickleSerializer`   any picklable Python object. **Only** for a cluster that
                         no untrusted party can write to: unpickling runs code.
:class:`JsonSerializer`     JSON text (UTF-8): readable by anything; ``None``, bools,
                         numbers, ``str``, lists and dicts with ``str`` keys.
:class:`RawSerializer`      bytes in, bytes out, nothing added: for values that are
                         already encoded, or to share keys with non-Python clients.
=======================  ==========================================================

Any object with ``dumps(obj) -> bytes`` and ``loads(data) -> object`` methods can be
passed as ``serializer=`` to :class:`~hypercache.client.Client`.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Final, Protocol, runtime_checkable

import msgpack

__all__ = [
    "DEFAULT_SERIALIZER",
    "JsonSerializer",
    "MsgpackSerializer",
    "PickleSerializer",
    "RawSerializer",
    "Serializer",
]


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes and back. Implementations must be thread-safe."""

    def dumps(self, obj: Any) -> bytes:
        """Encode ``obj``; raise :class:`TypeError` when it cannot be encoded."""
        ...

    def loads(self, data: bytes) -> Any:
        """Decode what :meth:`dumps` produced."""
        ...


class MsgpackSerializer:
    """msgpack with ``bin`` for bytes and ``str`` for text (``use_bin_type=True``, ``raw=False``).

    Map keys may be any hashable msgpack value (``strict_map_key=False``), so
    ``{1: "a"}`` round-trips. Tuples decode as lists; other types raise
    :class:`TypeError` on :meth:`dumps`.
    """

    __slots__ = ()

    def dumps(self, obj: Any) -> bytes:
        try:
            data: bytes = msgpack.packb(obj, use_bin_type=True, datetime=False)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"cannot serialise {type(obj).__name__} with msgpack: {exc}") from None
        return data

    def loads(self, data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)

    def __repr__(self) -> str:
        return "MsgpackSerializer()"


class PickleSerializer:
    """:mod:`pickle` with the highest protocol (or ``protocol``).

    .. warning:: :meth:`loads` can run arbitrary code. Use it only on a cluster whose
       every writer you trust.
    """

    __slots__ = ("protocol",)

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        self.protocol = protocol

    def dumps(self, obj: Any) -> bytes:
        try:
            return pickle.dumps(obj, protocol=self.protocol)
        except (pickle.PicklingError, AttributeError) as exc:
            raise TypeError(f"cannot pickle {type(obj).__name__}: {exc}") from None

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)

    def __repr__(self) -> str:
        return f"PickleSerializer(protocol={self.protocol})"


class JsonSerializer:
    """:mod:`json`, compact separators, UTF-8 (``ensure_ascii=False``). Tuples come
    back as lists; bytes and other types raise :class:`TypeError` on :meth:`dumps`."""

    __slots__ = ()

    def dumps(self, obj: Any) -> bytes:
        try:
            return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"cannot serialise {type(obj).__name__} as JSON: {exc}") from None

    def loads(self, data: bytes) -> Any:
        return json.loads(data)

    def __repr__(self) -> str:
        return "JsonSerializer()"


class RawSerializer:
    """Values are bytes and stay bytes: ``dumps`` accepts bytes-like objects only."""

    __slots__ = ()

    def dumps(self, obj: Any) -> bytes:
        if type(obj) is bytes:
            return obj
        if isinstance(obj, bytes | bytearray | memoryview):
            return bytes(obj)
        raise TypeError(f"RawSerializer stores bytes-like values only, not {type(obj).__name__}")

    def loads(self, data: bytes) -> Any:
        return bytes(data) if type(data) is not bytes else data

    def __repr__(self) -> str:
        return "RawSerializer()"


#: The serializer used when none is given.
DEFAULT_SERIALIZER: Final[Serializer] = MsgpackSerializer()


#: Serializers by the names URLs and settings use.
SERIALIZERS: Final[dict[str, type[Serializer]]] = {
    "msgpack": MsgpackSerializer,
    "pickle": PickleSerializer,
    "json": JsonSerializer,
    "raw": RawSerializer,
}


def resolve_serializer(serializer: Serializer | None) -> Serializer:
    """Return ``serializer``, or the default one for ``None``.

    :raises TypeError: ``serializer`` lacks ``dumps`` or ``loads``.
    """
    if serializer is None:
        return DEFAULT_SERIALIZER
    if not callable(getattr(serializer, "dumps", None)) or not callable(
        getattr(serializer, "loads", None)
    ):
        raise TypeError(
            f"serializer must have dumps() and loads() methods, got {type(serializer).__name__}"
        )
    return serializer
