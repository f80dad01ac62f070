"""Incremental decoder of the wire's length-prefixed msgpack frames; see framing.pyi.

The hot half of :mod:`hypercache.net.protocol`: every message a node or a client
receives goes through ``feed`` and ``__next__``. Received bytes are appended to one
``bytearray``; frames are read at an offset into it, and the consumed front is
dropped once per batch (when the iteration stops), not once per frame.
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint32_t

from collections import namedtuple

import msgpack

from hypercache.errors import FrameTooLargeError, ProtocolError

#: Size of the length prefix of every frame (4 bytes, big-endian).
HEADER_SIZE = 4
#: Largest frame type (``MsgType.ERROR``): REQUEST 0, RESPONSE 1, ERROR 2.
MAX_MSG_TYPE = 2

Frame = namedtuple("Frame", ("type", "request_id", "op", "payload", "deadline"), defaults=(0,))
Frame.__doc__ = "A decoded frame body (``deadline`` 0 when the frame carries none)."

cdef Py_ssize_t _HEADER = 4
cdef long _MAX_MSG_TYPE = 2
# Bodies up to this size are copied out (small); bigger ones are decoded through a
# memoryview, so that a multi-megabyte value is not copied once more.
cdef Py_ssize_t _COPY_MAX = 64 * 1024

cdef object _unpackb = msgpack.unpackb
cdef object _tuple_new = tuple.__new__
cdef object _Frame = Frame


cdef inline Py_ssize_t _read_size(const unsigned char* p) noexcept:
    return <Py_ssize_t>(
        (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]
    )


@cython.final
cdef class FrameDecoder:
    """Feed it bytes, iterate it for frames; see framing.pyi."""

    cdef bytearray _buf
    cdef Py_ssize_t _pos  # start of the bytes not decoded yet
    cdef public Py_ssize_t max_frame

    def __cinit__(self, Py_ssize_t max_frame=64 * 1024 * 1024):
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self):
        """Number of bytes received but not yet decoded."""
        return PyByteArray_GET_SIZE(self._buf) - self._pos

    @property
    def incomplete(self):
        """Body length of the next frame, from its header; -1 before the 4 header
        bytes are in."""
        cdef Py_ssize_t avail = PyByteArray_GET_SIZE(self._buf) - self._pos
        if avail < _HEADER:
            return -1
        return _read_size(<const unsigned char*>PyByteArray_AS_STRING(self._buf) + self._pos)

    def feed(self, data):
        """Append received bytes (copied); check the next frame's length header."""
        cdef bytearray buf = self._buf
        cdef Py_ssize_t size
        if self._pos and self._pos == PyByteArray_GET_SIZE(buf):
            del buf[:]  # all consumed: start over at the front
            self._pos = 0
        buf += data
        if PyByteArray_GET_SIZE(buf) - self._pos >= _HEADER:
            size = _read_size(<const unsigned char*>PyByteArray_AS_STRING(buf) + self._pos)
            if size > self.max_frame:
                raise FrameTooLargeError(
                    f"frame of {size} bytes exceeds max_frame={self.max_frame}"
                )

    def __iter__(self):
        return self

    def __next__(self):
        cdef bytearray buf = self._buf
        cdef Py_ssize_t pos = self._pos
        cdef Py_ssize_t avail = PyByteArray_GET_SIZE(buf) - pos
        cdef const unsigned char* p
        cdef Py_ssize_t size
        cdef object body
        cdef object view
        if avail < _HEADER:
            self._compact()
            raise StopIteration
        p = <const unsigned char*>PyByteArray_AS_STRING(buf) + pos
        size = _read_size(p)
        if size > self.max_frame:
            raise FrameTooLargeError(f"frame of {size} bytes exceeds max_frame={self.max_frame}")
        if avail < _HEADER + size:
            self._compact()
            raise StopIteration
        try:
            if size <= _COPY_MAX:
                body = _unpackb(PyBytes_FromStringAndSize(<const char*>p + _HEADER, size))
            else:
                view = memoryview(buf)[pos + _HEADER:pos + _HEADER + size]
                try:
                    body = _unpackb(view)
                finally:
                    view.release()
        except Exception as exc:
            raise ProtocolError(f"undecodable frame body: {exc}") from None
        self._pos = pos + _HEADER + size
        if type(body) is not list:
            raise ProtocolError("frame body must be a 4- or 5-element array")
        n = len(<list>body)
        if n == 4:
            (<list>body).append(0)
        elif n == 5:
            # The optional deadline: wall-clock ms (the receiver's clock) after which
            # the sender no longer waits for the answer; 0 = none.
            deadline = (<list>body)[4]
            if type(deadline) is not int or deadline < 0:
                raise ProtocolError(f"malformed frame deadline {deadline!r}")
        else:
            raise ProtocolError("frame body must be a 4- or 5-element array")
        msg_type = (<list>body)[0]
        request_id = (<list>body)[1]
        op = (<list>body)[2]
        if (
            type(msg_type) is not int
            or not 0 <= msg_type <= _MAX_MSG_TYPE
            or type(request_id) is not int
            or request_id < 0
            or type(op) is not int
            or op < 0
        ):
            raise ProtocolError(
                f"malformed frame header fields: type={msg_type!r} "
                f"request_id={request_id!r} op={op!r}"
            )
        return _tuple_new(_Frame, body)

    cdef void _compact(self):
        # Drop the consumed front once per batch of frames. (Deleting from the front
        # of a bytearray only moves its start in CPython: no copy.)
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
