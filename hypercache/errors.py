"""The one error tree of hypercache.

Every error derives from :class:`HyperCacheError` and also from the builtin that
describes it best, so callers may catch either: a bad configuration value is a
:class:`ConfigError` *and* a :class:`ValueError`; a dead node is a
:class:`NodeUnavailableError` *and* a :class:`ConnectionError`.

Errors raised by a remote node keep their type across the wire: each class that
can travel has a stable integer ``code`` (see ``docs/protocol.md``) and
:func:`error_from_code` rebuilds it on the other side.
"""

from __future__ import annotations

from typing import Any


class HyperCacheError(Exception):
    """Root of every error raised by hypercache."""

    #: Wire code of this error type; 0 is "unclassified server error".
    code: int = 0


class ConfigError(HyperCacheError, ValueError):
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


class ProtocolError(HyperCacheError, ValueError):
    """A peer sent a frame that breaks the wire protocol (malformed, oversized, ...)."""

    code = 2


class FrameTooLargeError(ProtocolError):
    """A frame, key or value exceeds the configured size limit."""

    code = 3


class HandshakeError(ProtocolError):
    """The peer speaks another protocol version or belongs to another cluster."""

    code = 4


class NodeUnavailableError(HyperCacheError, ConnectionError):
    """A node could not be reached, or the connection to it was lost."""

    code = 5


class RequestTimeoutError(HyperCacheError, TimeoutError):
    """A request did not complete within its deadline."""

    code = 6


class NoAnswerError(RequestTimeoutError):
    """No answer came from the node within the request's deadline: raised by this
    side's connection (the node may be paused, overloaded or cut off). A node that
    *answers* with a timeout (one of its own requests ran out of time) raises plain
    :class:`RequestTimeoutError`: it is alive. Travels as ``RequestTimeoutError``."""


class QuorumError(HyperCacheError):
    """Fewer replicas acknowledged an operation than its consistency level requires."""

    code = 7

    def __init__(self, acks: int, required: int, message: str | None = None) -> None:
        super().__init__(message or f"quorum not reached: {acks} of {required} required acks")
        self.acks = acks
        self.required = required

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.acks, self.required, str(self)))


class ClockSkewError(ProtocolError):
    """A version (hybrid logical timestamp) is further ahead of this node's wall clock
    than ``max_clock_skew`` allows: the sender's clock is wrong, or the version is
    forged. Nothing of the request was applied."""

    code = 12


class PermissionDeniedError(HyperCacheError, PermissionError):
    """The connection may not send this operation (for instance a client sending an
    operation reserved to authenticated cluster peers)."""

    code = 13


class KeyTooLargeError(FrameTooLargeError):
    """A key exceeds the configured maximum key size."""

    code = 8


class ValueTooLargeError(FrameTooLargeError):
    """A value exceeds the configured maximum value size."""

    code = 9


class EntryTooLargeError(HyperCacheError, ValueError):
    """A value is larger than the embedded cache's whole byte budget (``max_bytes``)."""

    code = 11


class ServerError(HyperCacheError):
    """A node failed to carry out a request for a reason of its own."""

    code = 10


_BY_CODE: dict[int, type[HyperCacheError]] = {
    cls.code: cls
    for cls in (
        HyperCacheError,
        ConfigError,
        ProtocolError,
        FrameTooLargeError,
        HandshakeError,
        ClockSkewError,
        PermissionDeniedError,
        NodeUnavailableError,
        RequestTimeoutError,
        QuorumError,
        KeyTooLargeError,
        ValueTooLargeError,
        EntryTooLargeError,
        ServerError,
    )
}


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
