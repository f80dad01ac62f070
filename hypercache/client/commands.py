"""The protocol's operations as both clients send them, written once.

A :class:`Command` is an op, whether it may be sent to another node after a timeout,
and the function that checks and shapes its answer; the clients send it and apply
``read`` to what comes back (``GET`` -> :func:`decode_get`, ``DELETE`` -> ``bool``,
``PING`` -> :func:`check_pong`, ``TOPOLOGY`` -> ``Topology.from_wire``, ``TTL`` ->
:func:`decode_ttl`, ``SCAN`` -> :func:`decode_scan`, ``FLUSH`` -> :func:`decode_flush`). What each
one sends is built by :class:`~hypercache.client._common.ClientBase` from the
caller's arguments (``_set_request`` and its siblings) or here
(:func:`get_payload`); ``PING`` and ``TOPOLOGY`` send no payload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from hypercache.client.topology import Topology
from hypercache.consistency import Consistency
from hypercache.errors import ProtocolError
from hypercache.net.protocol import Op

__all__ = [
    "ADD",
    "DELETE",
    "EXPIRE",
    "FLUSH",
    "GET",
    "LEAVE",
    "MISS",
    "PING",
    "REMOVE",
    "R_GET",
    "R_PUT",
    "SCAN",
    "SET",
    "TOPOLOGY",
    "TTL",
    "Command",
    "Found",
    "Level",
    "check_pong",
    "decode_add",
    "decode_expire",
    "decode_flush",
    "decode_get",
    "decode_membership",
    "decode_scan",
    "decode_ttl",
    "get_payload",
]

T_co = TypeVar("T_co", covariant=True)

#: What the operations take as ``consistency=``: a :class:`~hypercache.Consistency`,
#: its name in any case (``"quorum"``), or ``None`` for the client's default.
Level = Consistency | str | None
#: What a read found: ``(True, value bytes)`` or :data:`MISS`.
Found = tuple[bool, Any]
#: A read that found nothing (absent, expired or deleted).
MISS: Final[Found] = (False, None)


def decode_get(answer: Any) -> Found:
    """Split a GET answer ``[found, value]``.

    :raises ProtocolError: the answer has another shape.
    """
    if type(answer) is not list or len(answer) != 2 or type(answer[0]) is not bool:
        raise ProtocolError(f"malformed GET answer: {answer!r:.200}")
    found, value = answer
    if found and not isinstance(value, bytes):
        raise ProtocolError(f"GET answer value must be bytes, got {type(value).__name__}")
    return found, value


def decode_set(answer: Any) -> int | None:
    """A ``SET`` answer: ``true``, or ``[true, ts]`` (the ``set_version`` feature):
    the timestamp of the version the node stamped, else None."""
    if type(answer) is list and len(answer) == 2 and type(answer[1]) is int:
        ts: int = answer[1]
        return ts
    return None


def decode_ttl(answer: Any) -> tuple[bool, int]:
    """Split a TTL answer ``[found, expire_at_ms]`` (0: no expiry).

    :raises ProtocolError: the answer has another shape.
    """
    if (
        type(answer) is not list
        or len(answer) != 2
        or type(answer[0]) is not bool
        or type(answer[1]) is not int
        or answer[1] < 0
    ):
        raise ProtocolError(f"malformed TTL answer: {answer!r:.200}")
    return answer[0], answer[1]


def decode_expire(answer: Any) -> bool:
    """An EXPIRE answer: whether the key was live (and got its new TTL).

    :raises ProtocolError: it is not a bool.
    """
    if type(answer) is not bool:
        raise ProtocolError(f"malformed EXPIRE answer: {answer!r:.100}")
    return answer


def decode_scan(answer: Any) -> tuple[list[bytes], bytes | None]:
    """Split a SCAN answer ``[[key, ...], next_cursor | nil]``.

    :raises ProtocolError: the answer has another shape.
    """
    if (
        type(answer) is not list
        or len(answer) != 2
        or type(answer[0]) is not list
        or not (answer[1] is None or type(answer[1]) is bytes)
        or not all(type(k) is bytes for k in answer[0])
    ):
        raise ProtocolError(f"malformed SCAN answer: {answer!r:.200}")
    return answer[0], answer[1]


def decode_flush(answer: Any) -> int:
    """A FLUSH answer: how many entries the node dropped.

    :raises ProtocolError: it is not a natural number.
    """
    if type(answer) is not int or answer < 0:
        raise ProtocolError(f"malformed FLUSH answer: {answer!r:.100}")
    return answer


def decode_add(answer: Any) -> bool:
    """An ADD answer: whether the value was stored (the key held no live value).

    :raises ProtocolError: it is not a bool.
    """
    if type(answer) is not bool:
        raise ProtocolError(f"malformed ADD answer: {answer!r:.100}")
    return answer


def decode_membership(answer: Any) -> dict[str, Any]:
    """A LEAVE or REMOVE answer: a map with a ``node_id``.

    :raises ProtocolError: it has another shape.
    """
    if type(answer) is not dict or type(answer.get("node_id")) is not str:
        raise ProtocolError(f"malformed answer: {answer!r:.100}")
    return answer


def check_pong(answer: Any) -> None:
    """Check a PING answer.

    :raises ProtocolError: it is not ``"pong"``.
    """
    if answer != "pong":
        raise ProtocolError(f"unexpected PING answer: {answer!r:.100}")


def get_payload(key: bytes, level: str | None) -> list[Any]:
    """The payload of ``GET`` (a read through a node, which coordinates it)."""
    return [key, level]


def _ignore(answer: Any) -> None:
    return None


def _as_is(answer: Any) -> Any:
    return answer


@dataclass(frozen=True, slots=True)
class Command(Generic[T_co]):
    """One operation of the protocol as both clients send it.

    :ivar op: the wire op.
    :ivar retry_after_timeout: whether a request that timed out may be sent to
        another node in the same call: only if it changes nothing. A ``SET`` or
        ``DELETE`` that timed out may still be applied by its node (when it wakes
        up, with a version stamped then), so sending it elsewhere too could apply
        the write twice, the older one last: it is raised instead.
    :ivar read: checks the answer's shape and returns what the caller gets
        (raises :class:`~hypercache.errors.ProtocolError` on a malformed answer).
    """

    op: int
    retry_after_timeout: bool
    read: Callable[[Any], T_co]

    @property
    def name(self) -> str:
        return Op(self.op).name


GET: Final = Command(int(Op.GET), True, decode_get)
SET: Final = Command(int(Op.SET), False, decode_set)
DELETE: Final = Command(int(Op.DELETE), False, bool)
PING: Final = Command(int(Op.PING), True, check_pong)
TOPOLOGY: Final = Command(int(Op.TOPOLOGY), True, Topology.from_wire)
#: replica read; :meth:`OwnerRead.ok` checks the entry
R_GET: Final = Command(int(Op.R_GET), True, _as_is)
#: read-repair push
R_PUT: Final = Command(int(Op.R_PUT), False, _as_is)
#: ``[key, consistency]`` -> ``[found, expire_at_ms]``; a read: retried elsewhere
TTL: Final = Command(int(Op.TTL), True, decode_ttl)
#: ``[key, ttl_ms, consistency]`` -> whether the key was live; a write
EXPIRE: Final = Command(int(Op.EXPIRE), False, decode_expire)
#: ``[cursor, limit, prefix]`` -> one page of one node's keys (sent to that node)
SCAN: Final = Command(int(Op.SCAN), True, decode_scan)
#: ``[key, value, ttl_ms, consistency]`` -> whether it was stored (absent before); a write
ADD: Final = Command(int(Op.ADD), False, decode_add)
#: ``[]`` -> entries dropped by that node (sent to each node)
FLUSH: Final = Command(int(Op.FLUSH), False, decode_flush)
#: ``[]`` -> ``{"node_id", "leaving", "leave_timeout"}``: that node leaves, then stops
LEAVE: Final = Command(int(Op.LEAVE), False, decode_membership)
#: ``[node_id]`` -> ``{"node_id", "removed", "version"}`` (any node; gossiped)
REMOVE: Final = Command(int(Op.REMOVE), True, decode_membership)
