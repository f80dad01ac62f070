"""Incremental decoder of the wire's length-prefixed msgpack frames.

Every frame is a 4-byte big-endian length and a msgpack body
``[type, request_id, op, payload]`` or ``[type, request_id, op, payload, deadline]``.
:class:`FrameDecoder` is fed the bytes of a stream as they arrive and yields one
:class:`Frame` per complete body; :mod:`hypercache.net.protocol` re-exports both.
"""

from collections.abc import Iterator
from typing import Any, NamedTuple

#: Size of the length prefix of every frame.
HEADER_SIZE: int
#: Largest frame type (``MsgType.ERROR``).
MAX_MSG_TYPE: int

class Frame(NamedTuple):
    """A decoded frame body.

    ``deadline`` is the optional fifth element of a request: the wall-clock time, in
    ms since the epoch and on the *receiver's* clock, after which the sender no
    longer waits for the answer (a server does not start a request past it); 0 when
    the frame carries none.
    """

    type: int
    request_id: int
    op: int
    payload: Any
    deadline: int = 0

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
