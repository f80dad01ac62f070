"""The one error tree of hypercache.

Every error derives from :class:`HyperCacheError` and also from the builtin that
describes it best, so callers may catch either: a bad configuration value is a
:class:`ConfigError` *and* a :class:`ValueError`; a dead node is a
:class:`NodeUnavailableError` *and* a :class:`ConnectionError`. Below the root, the
tree says whose fault it is:

* :class:`UsageError` (a ``ValueError``): the caller's mistake, raised before
  anything is sent or stored: a bad argument or setting (:class:`ConfigError`), a
  key or value over its limit (:class:`KeyTooLargeError`,
  :class:`ValueTooLargeError`), an entry larger than the whole cache
  (:class:`EntryTooLargeError`);
* :class:`ProtocolError` (a ``ValueError``): a peer broke the wire protocol (a
  malformed or oversized frame, a refused handshake, a version from the future);
* the rest is what happened out there: a node unreachable
  (:class:`NodeUnavailableError`), no answer in time (:class:`RequestTimeoutError`),
  too few replicas (:class:`QuorumError`), an operation not allowed
  (:class:`PermissionDeniedError`), a node's own failure (:class:`ServerError`).

Errors raised by a remote node keep their type across the wire: each class that
can travel has a stable integer ``code``, registered once with :func:`_wire` (which
refuses a code taken twice), and :func:`error_from_wire` rebuilds it on the other
side. ``docs/protocol.md`` lists the codes.
"""

from __future__ import annotations

from typing import Any, TypeVar

_BY_CODE: dict[int, type[HyperCacheError]] = {}

_E = TypeVar("_E", bound="type[HyperCacheError]")


def _wire(cls: _E) -> _E:
    """Register ``cls`` under its ``code`` for :func:`error_from_wire`."""
    taken = _BY_CODE.get(cls.code)
    if taken is not None:
        raise AssertionError(f"wire code {cls.code} of {cls.__name__} taken by {taken.__name__}")
    _BY_CODE[cls.code] = cls
    return cls


class HyperCacheError(Exception):
    """Root of every error raised by hypercache."""

    #: Wire code of this error type; 0 is "unclassified server error".
    code: int = 0


_wire(HyperCacheError)


# ------------------------------------------------------------- the caller's mistakes


class UsageError(HyperCacheError, ValueError):
    """The caller's mistake: refused before anything was sent or stored."""

    code = 14


@_wire
class ConfigError(UsageError):
    """A configuration value or an API argument is invalid.

    ``field`` names the offending argument or configuration field.
    """

    code = 1

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.message))


@_wire
class KeyTooLargeError(UsageError):
    """A key exceeds the configured maximum key size."""

    code = 8


@_wire
class ValueTooLargeError(UsageError):
    """A value exceeds the configured maximum value size."""

    code = 9


@_wire
class EntryTooLargeError(UsageError):
    """A value is larger than the embedded cache's whole byte budget (``max_bytes``)."""

    code = 11


_wire(UsageError)


# ------------------------------------------------------------- protocol breaches


@_wire
class ProtocolError(HyperCacheError, ValueError):
    """A peer sent a frame that breaks the wire protocol (malformed, oversized, ...)."""

    code = 2


@_wire
class FrameTooLargeError(ProtocolError):
    """A frame exceeds the configured size limit."""

    code = 3


@_wire
class HandshakeError(ProtocolError):
    """The peer speaks another protocol version, belongs to another cluster, or was
    refused (authentication, a connection cap)."""

    code = 4


@_wire
class ClockSkewError(ProtocolError):
    """A version (hybrid logical timestamp) is further ahead of this node's wall clock
    than ``max_clock_skew`` allows: the sender's clock is wrong, or the version is
    forged. Nothing of the request was applied."""

    code = 12


class UndecodableValueError(HyperCacheError, ValueError):
    """A stored value that this client's serializer cannot decode: it was written
    raw, or by a client with another serializer. Raised by the client (never sent).

    :ivar key: the key asked for, as given.
    """

    def __init__(self, key: object, size: int, serializer: object, cause: BaseException) -> None:
        name = type(serializer).__name__
        super().__init__(
            f"the value of key {key!r} ({size} bytes) cannot be decoded by {name}: "
            f"{type(cause).__name__}: {str(cause).rstrip('.')}. It was written raw or with another "
            "serializer; read it with serializer=RawSerializer() (CLI: --raw)"
        )
        self.key = key


# ------------------------------------------------------------- what happened out there


@_wire
class NodeUnavailableError(HyperCacheError, ConnectionError):
    """A node could not be reached, or the connection to it was lost."""

    code = 5


@_wire
class RequestTimeoutError(HyperCacheError, TimeoutError):
    """A request did not complete within its deadline."""

    code = 6


class NoAnswerError(RequestTimeoutError):
    """No answer came from the node within the request's deadline: raised by this
    side's connection (the node may be paused, overloaded or cut off). A node that
    *answers* with a timeout (one of its own requests ran out of time) raises plain
    :class:`RequestTimeoutError`: it is alive. Travels as ``RequestTimeoutError``."""


@_wire
class QuorumError(HyperCacheError):
    """Fewer replicas acknowledged an operation than its consistency level requires."""

    code = 7

    def __init__(self, acks: int, required: int, message: str | None = None) -> None:
        super().__init__(
            message or f"quorum not reached: {acks} of {required} required replicas answered"
        )
        self.acks = acks
        self.required = required

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.acks, self.required, str(self)))


@_wire
class PermissionDeniedError(HyperCacheError, PermissionError):
    """The connection may not send this operation (for instance a client sending an
    operation reserved to authenticated cluster peers)."""

    code = 13


@_wire
class NotReadyError(HyperCacheError):
    """The node owns the key's partition but has not received it yet (it joined or
    restarted, and the partition is still streaming to it): ask another owner. It
    is not a miss, and counts as no answer towards a quorum."""

    code = 15


@_wire
class WrongOwnerError(HyperCacheError):
    """The node does not own the key's partition in its current table: the asker's
    table is stale (refresh it, then retry once)."""

    code = 16


@_wire
class ServerError(HyperCacheError):
    """A node failed to carry out a request for a reason of its own."""

    code = 10


def error_to_wire(exc: BaseException) -> list[Any]:
    """Encode an exception as ``[code, message, details]`` for an error frame."""
    if isinstance(exc, QuorumError):
        return [exc.code, str(exc), [exc.acks, exc.required]]
    if isinstance(exc, ConfigError):
        return [exc.code, exc.message, [exc.field]]
    if isinstance(exc, HyperCacheError):
        return [exc.code, str(exc), []]
    return [ServerError.code, f"{type(exc).__name__}: {exc}", []]


def error_from_wire(payload: Any) -> HyperCacheError:
    """Rebuild the exception that :func:`error_to_wire` encoded; unknown codes give ServerError."""
    try:
        code, message, details = payload
        cls = _BY_CODE.get(int(code), ServerError)
        if cls is QuorumError:
            return QuorumError(int(details[0]), int(details[1]), str(message))
        if cls is ConfigError:
            return ConfigError(str(details[0]), str(message))
        return cls(str(message))
    except (TypeError, ValueError, IndexError):
        return ProtocolError(f"malformed error payload: {payload!r}")
