"""Incremental decoder of the wire's length-prefixed msgpack frames.

Every frame is a 4-byte big-endian length and a msgpack body
``[type, request_id, op, payload]``, ``[type, request_id, op, payload, deadline]`` or
``[type, request_id, op, payload, deadline, trace]``.
:class:`FrameDecoder` is fed the bytes of a stream as they arrive and yields one
:class:`Frame` per complete body; :mod:`hypercache.net.protocol` re-exports both.
"""

from collections.abc import Iterator
from typing import Any, NamedTuple

#: Size of the length prefix of every frame.
HEADER_SIZE: int
#: Largest frame type (``MsgType.ERROR``).
MAX_MSG_TYPE: int
#: Deepest nesting of arrays and maps in a body (64; the body's own array is level 1).
MAX_DEPTH: int
#: Decode budget of a body of ``n`` bytes: ``BUDGET_PER_BYTE * n + BUDGET_BASE``
#: (12 and 8 MiB) estimated bytes of the Python objects it decodes to.
BUDGET_PER_BYTE: int
BUDGET_BASE: int

class Frame(NamedTuple):
    """A decoded frame body.

    ``deadline`` is the optional fifth element of a request: the wall-clock time, in
    ms since the epoch and on the *receiver's* clock, after which the sender no
    longer waits for the answer (a server does not start a request past it); 0 when
    the frame carries none. ``trace`` is the optional sixth element: a map of the W3C
    ``traceparent`` (and ``tracestate``) of the sender's span, or None.
    """

    type: int
    request_id: int
    op: int
    payload: Any
    deadline: int = 0
    trace: dict[str, str] | None = None

class FrameDecoder:
    """Incremental decoder: :meth:`feed` it bytes, then iterate to get :class:`Frame`\\ s.

    ::

        decoder.feed(data)
        for frame in decoder:
            ...

    Iteration stops when the buffer holds no complete frame; whatever is left stays
    buffered for the next :meth:`feed`. A consumer may stop iterating at any point
    (flow control): the frames not yet taken stay buffered too.

    :param max_frame: largest accepted body (default 64 MiB). A length header above
        it raises :class:`~hypercache.errors.FrameTooLargeError` as soon as its 4
        bytes have arrived, without waiting for the body: nothing beyond the read
        that carried the header is ever buffered. The attribute may be changed
        between frames (servers raise it once the handshake is done).

    A body that is not valid msgpack, or not ``[type, request_id, op, payload]`` (or
    ``[..., deadline]``) with ``type`` a ``MsgType``, ``request_id``, ``op`` and
    ``deadline`` non-negative integers (not bools), raises
    :class:`~hypercache.errors.ProtocolError`. After any error the stream is out of
    sync: the decoder must be discarded (and the connection closed).
    A body refused by msgpack or by the pre-scan below stays buffered: every later
    ``next`` raises again, and nothing after it is ever decoded.

    **Pre-scan and decode budget.** Before msgpack builds anything, a C pass over the
    body's msgpack structure (type bytes and lengths only; bin and str contents are
    skipped) refuses, with :class:`~hypercache.errors.ProtocolError`:

    * any msgpack ext type (the protocol uses none), and the reserved byte ``0xc1``;
    * arrays and maps nested deeper than :data:`MAX_DEPTH` (64);
    * a value that runs past the end of the body, or leaves trailing bytes;
    * a body whose decoded objects would take more than
      ``BUDGET_PER_BYTE * size + BUDGET_BASE`` bytes (12 per body byte + 8 MiB).

    The estimate prices each object at what CPython (3.11, 64-bit) allocates for
    it, rounded up: a list 64 bytes + 8 a slot (slots in pairs), a dict 64 + 32
    once it holds a key + 128 a key, an int outside -5..256 32 bytes (48 from
    ``2**60``), a float 32, ``bytes`` of 2 or more 48 + n, a ``str`` of n >= 2
    UTF-8 bytes 80 + 5n; ``nil``, booleans, the cached ints and the shorter bytes
    and strs cost nothing beyond their slot. So a body within its budget takes at
    most about 12 times its size, plus 8 MiB, in memory, where 8 MiB of empty
    arrays used to take 73 times (588 MiB). Every payload of the protocol fits:
    the densest one with no bound on its length, a ``KEYS`` answer, is priced 9x
    its size for 8-byte keys and under 12x for keys of 2 bytes or more; and no
    body under 73 KiB can be refused for its shape (a HELLO included), whatever
    it holds.

    Map keys in payloads must be ``str`` or ``bytes`` (msgpack's
    ``strict_map_key``); arrays decode as lists, msgpack ``bin`` as ``bytes`` and
    ``str`` as ``str``.
    """

    max_frame: int

    def __init__(self, max_frame: int = ...) -> None: ...
    @property
    def buffered(self) -> int:
        """Number of bytes received but not yet decoded."""

    @property
    def incomplete(self) -> int:
        """Body length that the next frame's header declares; -1 before its 4 header
        bytes have arrived (servers use it to bound how long a frame may take)."""

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (copied: the caller may reuse ``data``).

        :raises FrameTooLargeError: the next frame's header announces more than
            ``max_frame`` bytes.
        """

    def __iter__(self) -> Iterator[Frame]: ...
    def __next__(self) -> Frame: ...
