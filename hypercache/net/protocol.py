"""The hypercache wire protocol: framing, message types, operations, limits, handshake.

Every frame is a 4-byte big-endian unsigned length followed by that many bytes of
msgpack body, and every body is a 4-, 5- or 6-element array::

    [type: MsgType, request_id: uint, op: Op, payload: any]
    [type: MsgType, request_id: uint, op: Op, payload: any, deadline: uint]
    [type: MsgType, request_id: uint, op: Op, payload: any, deadline: uint, trace: map]

A request's ``deadline`` is the wall-clock time (ms since the epoch, on the
*receiver's* clock, which the sender learns from the HELLO answer's ``clock_ms``)
past which the sender no longer waits for the answer: a server never starts a
request after its deadline, so a write its client gave up on is never carried out
later, over a newer one. A request's ``trace`` is the W3C trace context of the
sender's span (``{"traceparent": ..., "tracestate": ...}``), sent only to a server
whose HELLO answer lists the ``trace`` feature (:data:`FEATURE_TRACE`).

This module is pure (no I/O). The transports (:mod:`hypercache.net.tcp`,
:mod:`hypercache.net.inproc`, :mod:`hypercache.net.blocking`) feed received bytes
to a :class:`FrameDecoder` and send what a :class:`FrameEncoder` produces.
``docs/protocol.md`` is the full specification.
"""

from __future__ import annotations

import hmac
import math
import struct
import threading
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import msgpack

from hypercache._core.framing import HEADER_SIZE, Frame, FrameDecoder
from hypercache._core.hlc import wall_clock_ms
from hypercache.errors import (
    ConfigError,
    FrameTooLargeError,
    HandshakeError,
    KeyTooLargeError,
    ProtocolError,
    ServerError,
    ValueTooLargeError,
    error_to_wire,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_KEY",
    "DEFAULT_MAX_VALUE",
    "ERROR",
    "FEATURES",
    "FEATURE_COMPRESSION",
    "FEATURE_SET_VERSION",
    "FEATURE_TRACE",
    "FRAME_OVERHEAD",
    "HEADER_SIZE",
    "HELLO_MAX_FRAME",
    "MAX_PUT_MANY",
    "MAX_REQUEST_ID",
    "PROTOCOL_VERSION",
    "PUSH_ID",
    "REQUEST",
    "RESPONSE",
    "Frame",
    "FrameDecoder",
    "FrameEncoder",
    "Limits",
    "MsgType",
    "Op",
    "clock_offset_ms",
    "encode_error",
    "encode_request",
    "encode_response",
    "make_hello",
    "next_request_id",
    "prepare_hello",
    "request_deadline",
    "validate_hello",
    "validate_hello_answer",
]

#: Version spoken by this build. Peers must speak exactly this version (see the
#: versioning policy in ``docs/protocol.md``).
PROTOCOL_VERSION: Final = 1

#: Optional features a server lists in its HELLO answer (``features``): a peer uses
#: one only when the server listed it, so both sides of a version without it still
#: interoperate. ``trace``: requests may carry a sixth element, the trace context.
FEATURE_TRACE: Final = "trace"
#: ``zstd``: values may be stored in the compressed form of
#: :mod:`hypercache.net.compression` (first byte ``0xC1``). A client lists it in its
#: own HELLO when it reads that form; a server answering a client that does not
#: decompresses the values it answers. A client compresses what it writes only to
#: servers that list it (an older node does neither).
FEATURE_COMPRESSION: Final = "zstd"
#: ``set_version``: a client that lists it in its HELLO gets ``SET`` answered as
#: ``[true, ts]``, the timestamp of the version the node stamped (so that a client
#: that also stamps its own writes, ``W_PUT``, moves its clock past it: its next write
#: is newer). Others get ``true``. Only clients list it (not in :data:`FEATURES`,
#: what a server lists): a server of the previous version answers ``true``.
FEATURE_SET_VERSION: Final = "set_version"
FEATURES: Final = (FEATURE_TRACE, FEATURE_COMPRESSION)


_KiB: Final = 1024
_MiB: Final = 1024 * 1024

#: Default limit of a frame body (the length prefix excluded).
DEFAULT_MAX_FRAME: Final = 64 * _MiB
#: Default limit of a key.
DEFAULT_MAX_KEY: Final = 64 * _KiB
#: Default limit of a value.
DEFAULT_MAX_VALUE: Final = 32 * _MiB
#: Frame limit that applies until the handshake completes: an unauthenticated peer
#: cannot make a server buffer more than this.
HELLO_MAX_FRAME: Final = 64 * _KiB
#: Room a frame needs around the largest key and value: the msgpack envelope of the
#: largest single-entry frame (an ``R_PUT`` with its version and deadline is 49
#: bytes besides its key and value), with room for the optional fields to come.
FRAME_OVERHEAD: Final = 256

_MAX_U32: Final = 0xFFFFFFFF

#: Entries one ``R_PUT_MANY`` may carry; a receiver refuses more (it bounds the work
#: of one request, about a microsecond an entry). Hint replay batches and
#: anti-entropy pushes stay below it.
MAX_PUT_MANY: Final = 4096


class MsgType(IntEnum):
    """First element of a frame body."""

    REQUEST = 0
    RESPONSE = 1
    ERROR = 2


class Op(IntEnum):
    """Operations carried by the protocol; the node layer implements them.

    Numbers are stable and never reused. Gaps leave room to group related
    operations: 0-9 client face, 10-19 replication, 20-29 anti-entropy and
    rebalancing, 30-39 membership.
    """

    HELLO = 0
    PING = 1
    GET = 2
    SET = 3
    DELETE = 4
    TOPOLOGY = 5
    #: the time left of a key's entry (coordinated like GET)
    TTL = 6
    #: give a live key a new TTL (coordinated like SET, by the key's primary)
    EXPIRE = 7
    #: one page of the keys this node holds (a client's ``keys``/``scan``)
    SCAN = 8
    #: drop every entry this node holds (a client's ``flush``, node by node)
    FLUSH = 9
    R_GET = 10
    R_PUT = 11
    R_PUT_MANY = 12
    R_DEL = 13
    #: a client-stamped write sent by the client straight to each owner of the key
    #: (the one-hop write path, ``docs/design.md``, "Client-stamped writes")
    W_PUT = 14
    #: a client's write for an owner it could not reach, handed to an owner that
    #: took it, to keep as a hint (hinted handoff) for that owner
    W_HINT = 15
    MERKLE = 20
    KEYS = 21
    PULL = 22
    #: rebalancing: one batch of a partition's entries, from a cursor
    STREAM = 23
    #: rebalancing: whether this node holds (has received) each of some partitions
    HOLDS = 24
    #: membership: probe a member on the asker's behalf (SWIM's indirect probe)
    PING_REQ = 30
    #: membership: exchange the whole member table (push-pull)
    MEMBERS = 31
    #: membership: this node leaves the cluster (hands its data over), then stops
    LEAVE = 32
    #: membership: take a dead member out of the ring (``[node_id]``)
    REMOVE = 33
    #: notifications: tell this connection of the writes this node applies to keys
    #: under some prefixes; the node then pushes frames with request id
    #: :data:`PUSH_ID` (``docs/protocol.md``, "Write notifications")
    WATCH = 50
    #: a conditional write: store the value only if the key is absent or expired
    #: (checked and applied by the key's first live owner, then replicated)
    ADD = 51


#: ``MsgType`` values as plain ints, for the hot paths that compare them.
REQUEST: Final = 0
RESPONSE: Final = 1
ERROR: Final = 2

#: The request id of a frame a server sends unasked (a ``WATCH`` push): clients
#: count their ids from 1, so no answer ever carries it.
PUSH_ID: Final = 0

#: Request ids wrap after this, so that they always encode as msgpack uint32 or smaller.
MAX_REQUEST_ID: Final = 0xFFFFFFFF


def next_request_id(request_id: int) -> int:
    """The id after ``request_id``: counting up from 1, wrapping after ``MAX_REQUEST_ID``."""
    return request_id + 1 if request_id < MAX_REQUEST_ID else 1


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Size limits of the protocol, in bytes.

    :param max_frame: largest frame body a peer may send or receive (default 64 MiB);
        checked on the length header, before the body is buffered.
    :param max_key: largest key (default 64 KiB), see :meth:`check_key`.
    :param max_value: largest value (default 32 MiB), see :meth:`check_value`.

    ``max_key + max_value + FRAME_OVERHEAD`` must not exceed ``max_frame``, so that
    the largest key/value pair fits in one frame with its envelope.
    """

    max_frame: int = DEFAULT_MAX_FRAME
    max_key: int = DEFAULT_MAX_KEY
    max_value: int = DEFAULT_MAX_VALUE

    def __post_init__(self) -> None:
        for name in ("max_frame", "max_key", "max_value"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if self.max_frame > _MAX_U32:
            raise ConfigError("max_frame", f"must fit the 4-byte length header (<= {_MAX_U32})")
        if self.max_key + self.max_value + FRAME_OVERHEAD > self.max_frame:
            raise ConfigError(
                "max_frame",
                f"must hold the largest key and value plus {FRAME_OVERHEAD} bytes of "
                f"envelope: max_key + max_value + {FRAME_OVERHEAD} = "
                f"{self.max_key + self.max_value + FRAME_OVERHEAD} > max_frame = "
                f"{self.max_frame}",
            )

    def check_key(self, key: object) -> bytes:
        """Return ``key`` if it is ``bytes`` within ``max_key``.

        :raises ProtocolError: the key is not ``bytes``.
        :raises KeyTooLargeError: the key is longer than ``max_key``.
        """
        if type(key) is not bytes:
            raise ProtocolError(f"key must be bytes, not {type(key).__name__}")
        if len(key) > self.max_key:
            raise KeyTooLargeError(f"key of {len(key)} bytes exceeds max_key={self.max_key}")
        return key

    def check_value(self, value: object) -> bytes | bytearray | memoryview:
        """Return ``value`` if it is bytes-like within ``max_value``.

        :raises ProtocolError: the value is not bytes-like.
        :raises ValueTooLargeError: the value is longer than ``max_value``.
        """
        if type(value) is bytes or type(value) is bytearray:
            size = len(value)
        elif isinstance(value, memoryview):
            size = value.nbytes
        elif isinstance(value, bytes | bytearray):
            size = len(value)
        else:
            raise ProtocolError(f"value must be bytes, not {type(value).__name__}")
        if size > self.max_value:
            raise ValueTooLargeError(f"value of {size} bytes exceeds max_value={self.max_value}")
        return value


# --------------------------------------------------------------------------- framing

# Decoding (FrameDecoder, Frame) is compiled, in hypercache/_core/framing.pyx: every
# message received goes through it. Encoding is one msgpack Packer call.

_pack_header = struct.Struct(">I").pack


class FrameEncoder:
    """Encodes frames with one reusable msgpack ``Packer``; keep one per connection.

    Not thread-safe (the packer has an internal buffer).

    :param max_frame: largest body this side agrees to send; a larger one raises
        :class:`~hypercache.errors.FrameTooLargeError` and nothing is produced.
    """

    __slots__ = ("_pack", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        # autoreset: pack() returns the bytes and empties the buffer (also on error).
        self._pack = msgpack.Packer(use_bin_type=True, datetime=False, autoreset=True).pack

    def encode_body(
        self,
        msg_type: int,
        request_id: int,
        op: int,
        payload: Any,
        deadline: int = 0,
        trace: dict[str, str] | None = None,
    ) -> bytes:
        """Return the msgpack body of a frame, without its length header.

        :param deadline: for a request, the wall-clock ms (on the receiver's clock)
            after which the sender no longer waits for the answer; 0 = none (the
            frame then has the 4 elements of every frame before deadlines existed).
        :param trace: for a request, the W3C ``traceparent``/``tracestate`` map of the
            sender's span (the sixth element; only to a peer that lists the
            :data:`FEATURE_TRACE` feature); None = none.
        :raises ProtocolError: the payload cannot be encoded by msgpack.
        :raises FrameTooLargeError: the body is larger than ``max_frame``.
        """
        try:
            if trace is not None:
                body: bytes = self._pack([msg_type, request_id, op, payload, deadline, trace])
            elif deadline:
                body = self._pack([msg_type, request_id, op, payload, deadline])
            else:
                body = self._pack([msg_type, request_id, op, payload])
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"payload of op {op} cannot be encoded: {exc}") from None
        if len(body) > self.max_frame:
            raise FrameTooLargeError(
                f"frame of {len(body)} bytes exceeds max_frame={self.max_frame}"
            )
        return body

    def encode_error_body(self, request_id: int, op: int, exc: BaseException) -> bytes:
        """Return the body of an ERROR frame carrying :func:`error_to_wire` of ``exc``.

        Never fails: an error whose message cannot be encoded (or is too large) is
        sent as a ``ServerError`` naming its type.
        """
        try:
            return self.encode_body(ERROR, request_id, op, error_to_wire(exc))
        except ProtocolError:
            message = f"{type(exc).__name__} (its message could not be encoded)"
            return self.encode_body(ERROR, request_id, op, [ServerError.code, message, []])

    def encode_request(self, request_id: int, op: int, payload: Any) -> bytes:
        """Return a complete REQUEST frame (length header included)."""
        body = self.encode_body(REQUEST, request_id, op, payload)
        return _pack_header(len(body)) + body

    def encode_response(self, request_id: int, op: int, payload: Any) -> bytes:
        """Return a complete RESPONSE frame (length header included)."""
        body = self.encode_body(RESPONSE, request_id, op, payload)
        return _pack_header(len(body)) + body

    def encode_error(self, request_id: int, op: int, exc: BaseException) -> bytes:
        """Return a complete ERROR frame (length header included) for ``exc``."""
        body = self.encode_error_body(request_id, op, exc)
        return _pack_header(len(body)) + body


#: Length header of a body of ``n`` bytes.
frame_header = _pack_header

_local = threading.local()


def _encoder(limits: Limits | None) -> FrameEncoder:
    if limits is not None:
        return FrameEncoder(limits.max_frame)
    enc: FrameEncoder | None = getattr(_local, "encoder", None)
    if enc is None:
        enc = _local.encoder = FrameEncoder()
    return enc


def encode_request(
    request_id: int, op: int, payload: Any, *, limits: Limits | None = None
) -> bytes:
    """Encode a REQUEST frame. Connections use their own :class:`FrameEncoder`."""
    return _encoder(limits).encode_request(request_id, op, payload)


def encode_response(
    request_id: int, op: int, payload: Any, *, limits: Limits | None = None
) -> bytes:
    """Encode a RESPONSE frame. Connections use their own :class:`FrameEncoder`."""
    return _encoder(limits).encode_response(request_id, op, payload)


def encode_error(
    request_id: int, op: int, exc: BaseException, *, limits: Limits | None = None
) -> bytes:
    """Encode an ERROR frame for ``exc``. Connections use their own :class:`FrameEncoder`."""
    return _encoder(limits).encode_error(request_id, op, exc)


# --------------------------------------------------------------------------- handshake


def make_hello(
    cluster: str,
    *,
    node_id: str | None = None,
    address: str | None = None,
    auth: str | None = None,
    info: dict[str, Any] | None = None,
    proof: dict[str, Any] | None = None,
    features: tuple[str, ...] | list[str] | None = None,
) -> dict[str, Any]:
    """Build the payload of a HELLO request (``node_id=None`` for clients; a node
    adds the ``proof`` of the cluster secret, see :mod:`hypercache.net.auth`; a
    client lists the optional ``features`` it takes in answers, such as
    :data:`FEATURE_COMPRESSION`)."""
    hello: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "cluster": cluster,
        "node_id": node_id,
        "address": address,
        "auth": auth,
        "info": {} if info is None else info,
    }
    if proof is not None:
        hello["proof"] = proof
    if features:
        hello["features"] = list(features)
    return hello


def prepare_hello(hello: dict[str, Any]) -> dict[str, Any]:
    """Copy a HELLO payload given to ``connect``, filling in ``version``.

    :raises ConfigError: ``hello`` does not name the cluster (field ``hello``).
    """
    payload = dict(hello)
    payload.setdefault("version", PROTOCOL_VERSION)
    cluster = payload.get("cluster")
    if type(cluster) is not str or not cluster:
        raise ConfigError("hello", f"'cluster' must be a non-empty string, got {cluster!r}")
    return payload


def _optional_str(payload: dict[Any, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is not None and type(value) is not str:
        raise HandshakeError(f"HELLO field {key!r} must be a string or nil, got {value!r}")
    return value


def _check_version_cluster(payload: Any, cluster: str, what: str) -> dict[Any, Any]:
    if type(payload) is not dict:
        raise HandshakeError(f"{what} payload must be a map, got {type(payload).__name__}")
    version = payload.get("version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"protocol version mismatch: peer speaks {version!r}, "
            f"this side speaks {PROTOCOL_VERSION}"
        )
    peer_cluster = payload.get("cluster")
    if peer_cluster != cluster:
        raise HandshakeError(f"cluster mismatch: peer is in {peer_cluster!r}, expected {cluster!r}")
    info = payload.get("info", {})
    if info is None:
        info = {}
    if type(info) is not dict:
        raise HandshakeError(f"{what} field 'info' must be a map")
    return info


def validate_hello(payload: Any, *, cluster: str, auth: str | None) -> dict[str, Any]:
    """Check a HELLO request on the server side and return it normalised.

    The result has the keys ``version``, ``cluster``, ``node_id``, ``address``,
    ``info`` and ``features`` (a frozenset of the optional features the peer takes;
    none from a peer that lists none); the auth token is checked (in constant time,
    when ``auth`` is set) and left out.

    :raises HandshakeError: version or cluster mismatch, bad auth token, malformed payload.
    """
    info = _check_version_cluster(payload, cluster, "HELLO")
    node_id = _optional_str(payload, "node_id")
    address = _optional_str(payload, "address")
    token = _optional_str(payload, "auth")
    if auth is not None and (
        token is None or not hmac.compare_digest(token.encode(), auth.encode())
    ):
        raise HandshakeError("authentication failed: bad or missing auth token")
    return {
        "version": PROTOCOL_VERSION,
        "cluster": cluster,
        "node_id": node_id,
        "address": address,
        "info": info,
        "features": _features(payload.get("features"), "HELLO"),
    }


def validate_hello_answer(payload: Any, *, cluster: str) -> dict[str, Any]:
    """Check the server's answer to HELLO on the client side; return it normalised.

    The result has ``version``, ``cluster``, ``node_id``, ``info``, ``clock_ms``
    (the server's wall clock when it answered, or None from a server that does not
    send it) and ``features`` (a frozenset of the optional features it lists).

    :raises HandshakeError: version or cluster mismatch, malformed payload.
    """
    info = _check_version_cluster(payload, cluster, "HELLO answer")
    clock_ms = payload.get("clock_ms")
    if clock_ms is not None and (type(clock_ms) is not int or clock_ms <= 0):
        raise HandshakeError("HELLO answer field 'clock_ms' must be a positive int or nil")
    answer = {
        "version": PROTOCOL_VERSION,
        "cluster": cluster,
        "node_id": _optional_str(payload, "node_id"),
        "info": info,
        "clock_ms": clock_ms,
        "features": _features(payload.get("features"), "HELLO answer"),
    }
    proof = payload.get("proof")
    if proof is not None:
        if type(proof) is not dict:
            raise HandshakeError("HELLO answer field 'proof' must be a map or nil")
        answer["proof"] = proof
    return answer


def _features(raw: Any, what: str) -> frozenset[str]:
    """The features a HELLO or its answer lists (none from a peer that lists none)."""
    if raw is None:
        return frozenset()
    if type(raw) is not list or len(raw) > 64 or not all(type(f) is str for f in raw):
        raise HandshakeError(f"{what} field 'features' must be a list of strings or nil")
    return frozenset(raw)


def clock_offset_ms(hello_answer: dict[str, Any], received_ms: int) -> int | None:
    """How many ms to add to this side's wall clock to name a time on the server's.

    ``received_ms`` is this side's wall clock when the HELLO answer arrived. The
    server read its clock (``clock_ms``) at some moment between our send and that
    arrival, so ``clock_ms - received_ms`` never exceeds the true offset: deadlines
    computed with it reach the server early rather than late. ``None`` when the
    server did not send its clock (then no deadline is sent).
    """
    server_ms = hello_answer.get("clock_ms")
    if server_ms is None:
        return None
    offset: int = server_ms - received_ms
    return offset


def request_deadline(offset_ms: int | None, timeout: float) -> int:
    """The ``deadline`` of a request sent now with ``timeout`` seconds, on the server's
    clock (see :func:`clock_offset_ms`); 0 (none) without an offset or a finite timeout.

    One millisecond is taken off for the truncation of both clocks to whole ms, so
    that the server never starts a request after its sender gave up on it.
    """
    if offset_ms is None or timeout == math.inf:
        return 0
    return max(1, wall_clock_ms() + offset_ms + int(timeout * 1000) - 1)
