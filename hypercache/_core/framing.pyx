"""Incremental decoder of the wire's length-prefixed msgpack frames; see framing.pyi.

The hot half of :mod:`hypercache.net.protocol`: every message a node or a client
receives goes through ``feed`` and ``__next__``. Received bytes are appended to one
``bytearray``; frames are read at an offset into it, and the consumed front is
dropped once per batch (when the iteration stops), not once per frame.

Before msgpack sees a body, ``_scan`` walks its msgpack structure in C, building
nothing, and prices the objects it would decode to (see "Decode budget" below).
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int8_t, uint32_t

from collections import namedtuple

import msgpack

from hypercache.errors import FrameTooLargeError, ProtocolError

#: Size of the length prefix of every frame (4 bytes, big-endian).
HEADER_SIZE = 4
#: Largest frame type (``MsgType.ERROR``): REQUEST 0, RESPONSE 1, ERROR 2.
MAX_MSG_TYPE = 2
#: Deepest nesting of arrays and maps in a body (the body's own array is level 1).
MAX_DEPTH = 64
#: A body of ``n`` bytes may decode to at most ``BUDGET_PER_BYTE * n + BUDGET_BASE``
#: bytes of Python objects, as the pre-scan estimates them.
BUDGET_PER_BYTE = 12
BUDGET_BASE = 8 * 1024 * 1024

Frame = namedtuple(
    "Frame", ("type", "request_id", "op", "payload", "deadline", "trace"), defaults=(0, None)
)
Frame.__doc__ = (
    "A decoded frame body (``deadline`` 0 and ``trace`` None when the frame carries none)."
)

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


# ---------------------------------------------------------------------------
# Decode budget
#
# Why a budget. msgpack spends one byte on an empty array; CPython spends 64 on
# the list it becomes and 8 on its slot in the parent. 8 MiB of ``[]`` grew a
# node's RSS by 588 MiB (73x), chains of one-key maps by 771 MiB (96x), so one
# 64 MiB frame could cost 4.7-6 GB, sent by any peer past the handshake.
# Per-container limits (msgpack's max_array_len and friends) cannot bound that:
# the cost is the total number of objects, and nesting spreads them over as many
# containers as it likes. So the scan prices each object the body would decode
# to, in estimated bytes, and the body is refused when the total is over
# BUDGET_PER_BYTE * size + BUDGET_BASE. It runs before msgpack: a refused body
# costs one pass over its bytes (~1.4 ns a value) and allocates nothing.
#
# Prices (CPython 3.11, 64-bit, pymalloc's 16-byte size classes; checked with
# tracemalloc, and with RSS on 8 MiB bodies of each shape). A list is 64 bytes
# plus 8 a slot, slots allocated in pairs. A dict is 64; its first table 128 for
# str keys, 160 for others; past that ~60 a key at the worst point of its growth,
# plus the interned copy of each new str key: priced 64 + 32 + 128 a key, high,
# because no payload of the protocol is a large map. An int outside CPython's
# cached -5..256 is 32 bytes, 48 from 2**60 on (uint64 digests); a float 32.
# bytes of n >= 2 are 33 + n rounded up: 48 + n (0 and 1 byte are shared
# objects). A str of n UTF-8 bytes is at most 80 + 5n: one character past U+FFFF
# makes the whole string 4 bytes a character, and CPython's decoder first builds
# it 1 byte a character (8 MiB of such text peaked at 5x its size); "" and
# one-byte strs are shared. nil, booleans and cached ints cost only their slot.
# Where a price is not exact it errs high: bodies filled up to their budget with
# each costly shape measured 91-103 MiB of RSS for a 104 MiB budget.
#
# Why 12 per byte, not 8. The densest payload of the protocol with no bound on
# its length is a KEYS answer: rows [key, ts, origin], 216 + len(key) bytes of
# objects for 17 + len(key) bytes of wire (ts a 9-byte uint64, origin a 5-byte
# uint32 hash). That is 11.5x for 2-byte keys, 10.5x for 4, 9x for 8, 7x for 16
# (RSS: 10.9x, 10.3x, 8.6x, 7.0x). A replica catching up gets KEYS answers that
# list whole partitions, megabytes of them for a store of a few million keys, and
# refusing one would stop anti-entropy with that peer for good. Hint replays
# (R_PUT_MANY; hint_replay_batch has no upper bound) are rows of six fields, up
# to 11.4x. 8 per byte would refuse KEYS answers of keys shorter than 12 bytes;
# 12 admits every key of 2 bytes or more (there are only 65536 keys of 2 bytes,
# and the base covers them). A body filled up to its budget costs ~12x its size.
#
# Why BUDGET_BASE is 8 MiB. A small frame must never be refused for its shape:
# the costliest bytes are chains of one-key maps, priced 224 for 2 bytes, so any
# body up to 8 MiB / 112 = 73 KiB passes, every HELLO included (at most 64 KiB
# before the handshake, where the budget never binds, and the worst case stays
# what it was, 64 KiB x 96). And TOPOLOGY answers are dense but bounded by the
# partition count: rows of small ints at ~26x their size; 65536 partitions at
# replication 1 are priced 5.8 MB for 131 KB of wire, which 12x alone does not
# cover.
#
# Why it looks like this. The scan runs on every frame received: it reads only
# type bytes and length fields (bin and str payloads are jumped over: a 32 MiB
# value costs one header), keeps the open containers' remaining counts in a
# fixed array of MAX_DEPTH (no allocation, no recursion), and is noexcept and
# nogil, so it compiles to plain C: ~13 ns for a small R_GET, ~23 for an R_PUT,
# ~2 ns a value in dense batches (R_PUT_MANY of 512 tiny entries: +11%). A
# 256-entry table of formats instead of the if-chain measured slower.
# ---------------------------------------------------------------------------

cdef enum:
    _DEPTH = 64
    _PER_BYTE = 12
    _BASE = 8 * 1024 * 1024
    # prices, in bytes (see above)
    _P_LIST = 64
    _P_SLOT = 8
    _P_DICT = 64
    _P_TABLE = 32
    _P_ENTRY = 128
    _P_INT = 32
    _P_BIGINT = 48
    _P_FLOAT = 32
    _P_BYTES = 48
    _P_STR = 80
    _P_STR_BYTE = 5

# What stopped a scan.
cdef enum:
    _SCAN_OK = 0
    _SCAN_TRUNCATED = 1
    _SCAN_TRAILING = 2
    _SCAN_EXT = 3
    _SCAN_RESERVED = 4
    _SCAN_DEEP = 5


cdef struct _Scan:
    Py_ssize_t cost     # estimated bytes of the objects decoded
    Py_ssize_t objects  # values decoded, map keys included
    Py_ssize_t at       # offset of the byte where an error was found


cdef inline uint32_t _be16(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | <uint32_t>p[1]


cdef inline uint32_t _be32(const unsigned char* p) noexcept nogil:
    return (
        (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]
    )


cdef int _scan(const unsigned char* p, Py_ssize_t n, _Scan* out) noexcept nogil:
    """Walk the one msgpack value that ``p[:n]`` must hold; fill ``out``, return a
    _SCAN_* code. Reads nothing past ``p[n - 1]`` whatever the bytes say."""
    # left[d]: values still to read in the container open at depth d, once the
    # one at depth d + 1 is done; todo: values still to read at the current depth.
    cdef Py_ssize_t left[_DEPTH]
    cdef Py_ssize_t todo = 1
    cdef int depth = 0
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t cost = 0
    cdef Py_ssize_t objects = 0
    cdef Py_ssize_t count = 0   # items of an array, pairs of a map
    cdef Py_ssize_t length = 0  # bytes of a bin or str
    cdef Py_ssize_t room        # bytes left, from the type byte on
    cdef unsigned char b
    cdef int code = _SCAN_OK
    while True:
        if todo == 0:
            if depth == 0:
                # Fixed-size scalars move pos without a check: past n means the
                # last one was cut short.
                if pos > n:
                    code = _SCAN_TRUNCATED
                elif pos < n:
                    code = _SCAN_TRAILING
                break
            depth -= 1
            todo = left[depth]
            continue
        todo -= 1
        if pos >= n:
            code = _SCAN_TRUNCATED
            break
        b = p[pos]
        objects += 1
        if b <= 0x7F:  # positive fixint: a cached int
            pos += 1
            continue
        if b >= 0xE0:  # negative fixint: -5..-1 are cached
            if b < 0xFB:
                cost += _P_INT
            pos += 1
            continue
        if b <= 0x8F:  # fixmap
            count = b & 0x0F
            pos += 1
        elif b <= 0x9F:  # fixarray
            count = b & 0x0F
            pos += 1
        elif b <= 0xBF:  # fixstr
            length = b & 0x1F
            pos += 1
        else:
            room = n - pos
            if b == 0xC0 or b == 0xC2 or b == 0xC3:  # nil, false, true
                pos += 1
                continue
            elif b == 0xC1:
                code = _SCAN_RESERVED
                break
            elif b == 0xC4 or b == 0xD9:  # bin 8, str 8
                if room < 2:
                    code = _SCAN_TRUNCATED
                    break
                length = p[pos + 1]
                pos += 2
            elif b == 0xC5 or b == 0xDA:  # bin 16, str 16
                if room < 3:
                    code = _SCAN_TRUNCATED
                    break
                length = _be16(p + pos + 1)
                pos += 3
            elif b == 0xC6 or b == 0xDB:  # bin 32, str 32
                if room < 5:
                    code = _SCAN_TRUNCATED
                    break
                length = _be32(p + pos + 1)
                pos += 5
            elif b == 0xCA:  # float 32
                cost += _P_FLOAT
                pos += 5
                continue
            elif b == 0xCB:  # float 64
                cost += _P_FLOAT
                pos += 9
                continue
            elif b == 0xCC:  # uint 8: a cached int
                pos += 2
                continue
            elif b == 0xCD or b == 0xD1:  # uint 16, int 16
                cost += _P_INT
                pos += 3
                continue
            elif b == 0xCE or b == 0xD2:  # uint 32, int 32
                cost += _P_INT
                pos += 5
                continue
            elif b == 0xCF:  # uint 64: three 30-bit digits from 2**60 on
                if room < 9:
                    code = _SCAN_TRUNCATED
                    break
                cost += _P_BIGINT if p[pos + 1] >= 0x10 else _P_INT
                pos += 9
                continue
            elif b == 0xD0:  # int 8: -5..-1 are cached
                if room < 2:
                    code = _SCAN_TRUNCATED
                    break
                if <int8_t>p[pos + 1] < -5:
                    cost += _P_INT
                pos += 2
                continue
            elif b == 0xD3:  # int 64
                cost += _P_BIGINT
                pos += 9
                continue
            elif b == 0xDC:  # array 16
                if room < 3:
                    code = _SCAN_TRUNCATED
                    break
                count = _be16(p + pos + 1)
                pos += 3
            elif b == 0xDD:  # array 32
                if room < 5:
                    code = _SCAN_TRUNCATED
                    break
                count = _be32(p + pos + 1)
                pos += 5
            elif b == 0xDE:  # map 16
                if room < 3:
                    code = _SCAN_TRUNCATED
                    break
                count = _be16(p + pos + 1)
                pos += 3
            elif b == 0xDF:  # map 32
                if room < 5:
                    code = _SCAN_TRUNCATED
                    break
                count = _be32(p + pos + 1)
                pos += 5
            else:  # 0xC7-0xC9 ext 8/16/32, 0xD4-0xD8 fixext
                code = _SCAN_EXT
                break
        # Here b is a bin, a str, an array or a map, pos is past its header.
        if b <= 0x8F or b == 0xDE or b == 0xDF:  # map
            if depth == _DEPTH:
                code = _SCAN_DEEP
                break
            if count > (n - pos) >> 1:  # a key and a value take 2 bytes at least
                code = _SCAN_TRUNCATED
                break
            cost += _P_DICT + _P_ENTRY * count
            if count:
                cost += _P_TABLE
                left[depth] = todo
                depth += 1
                todo = 2 * count
        elif b <= 0x9F or b == 0xDC or b == 0xDD:  # array
            if depth == _DEPTH:
                code = _SCAN_DEEP
                break
            if count > n - pos:  # an item takes a byte at least
                code = _SCAN_TRUNCATED
                break
            cost += _P_LIST + _P_SLOT * (count + (count & 1))
            if count:
                left[depth] = todo
                depth += 1
                todo = count
        else:  # bin or str: skipped, never read
            if length > n - pos:
                code = _SCAN_TRUNCATED
                break
            if length > 1:
                if b == 0xC4 or b == 0xC5 or b == 0xC6:
                    cost += _P_BYTES + length
                else:
                    cost += _P_STR + _P_STR_BYTE * length
            pos += length
    out.cost = cost
    out.objects = objects
    out.at = pos
    return code


cdef object _scan_error(int code, const _Scan* scan, Py_ssize_t size):
    # Cold path: only for a body the scan refused.
    cdef Py_ssize_t budget = _PER_BYTE * size + _BASE
    if code == _SCAN_TRUNCATED:
        why = "ends inside a msgpack value"
    elif code == _SCAN_TRAILING:
        why = f"has trailing bytes after its msgpack value (at offset {scan.at})"
    elif code == _SCAN_EXT:
        why = f"holds a msgpack ext type at offset {scan.at} (the protocol uses none)"
    elif code == _SCAN_RESERVED:
        why = f"holds the reserved msgpack byte 0xc1 at offset {scan.at}"
    elif code == _SCAN_DEEP:
        why = f"nests arrays and maps deeper than {_DEPTH} (at offset {scan.at})"
    else:
        return ProtocolError(
            f"frame of {size} bytes would decode to {scan.objects} objects of about "
            f"{scan.cost} bytes, over the budget of {budget} bytes "
            f"({_PER_BYTE} a body byte + {_BASE >> 20} MiB)"
        )
    return ProtocolError(f"undecodable frame body of {size} bytes: it {why}")


_HTTP_METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN")


def _too_large(bytes header, Py_ssize_t size, Py_ssize_t max_frame):
    """The error for a length header over ``max_frame``; a header that is text says
    what it looks like (the usual cause: the other end speaks HTTP)."""
    text = header.decode("latin-1")
    if header == b"HTTP":
        return FrameTooLargeError(
            "the other end answered in HTTP ('HTTP/...'), not the hypercache protocol: "
            "this looks like a node's management HTTP port (--http); connect to its "
            "data port (--bind)"
        )
    if header in _HTTP_METHODS:
        return FrameTooLargeError(
            f"the other end sent an HTTP request ({text.strip()!r} ...), not the hypercache "
            "protocol: this is a node's data port (--bind); HTTP is served on its "
            "management port (--http)"
        )
    if all(32 <= c < 127 for c in header):
        return FrameTooLargeError(
            f"frame of {size} bytes exceeds max_frame={max_frame}; its length header is "
            f"the text {text!r}: the other end does not speak the hypercache protocol"
        )
    return FrameTooLargeError(f"frame of {size} bytes exceeds max_frame={max_frame}")


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
                raise _too_large(
                    PyByteArray_AS_STRING(buf)[self._pos:self._pos + _HEADER], size,
                    self.max_frame,
                )

    def __iter__(self):
        return self

    def __next__(self):
        cdef bytearray buf = self._buf
        cdef Py_ssize_t pos = self._pos
        cdef Py_ssize_t avail = PyByteArray_GET_SIZE(buf) - pos
        cdef const unsigned char* p
        cdef Py_ssize_t size
        cdef _Scan scan
        cdef int code
        cdef object body
        cdef object view
        if avail < _HEADER:
            self._compact()
            raise StopIteration
        p = <const unsigned char*>PyByteArray_AS_STRING(buf) + pos
        size = _read_size(p)
        if size > self.max_frame:
            raise _too_large((<const char*>p)[:_HEADER], size, self.max_frame)
        if avail < _HEADER + size:
            self._compact()
            raise StopIteration
        # A refused body stays buffered, like one msgpack cannot decode: the stream is
        # out of sync either way, and the decoder is to be discarded.
        code = _scan(p + _HEADER, size, &scan)
        if code != _SCAN_OK or scan.cost > _PER_BYTE * size + _BASE:
            raise _scan_error(code, &scan, size)
        try:
            if size <= _COPY_MAX:
                body = _unpackb(PyBytes_FromStringAndSize(<const char*>p + _HEADER, size))
            else:
                view = memoryview(buf)[pos + _HEADER:pos + _HEADER + size]
                try:
                    # The scan has refused ext types already; msgpack's own refusal
                    # costs ~8 ns a call (keyword parsing), nothing at this size.
                    body = _unpackb(view, max_ext_len=0)
                finally:
                    view.release()
        except Exception as exc:
            raise ProtocolError(f"undecodable frame body: {exc}") from None
        self._pos = pos + _HEADER + size
        if type(body) is not list:
            raise ProtocolError("frame body must be a 4-, 5- or 6-element array")
        n = len(<list>body)
        if n == 4:
            (<list>body).append(0)
            (<list>body).append(None)
        elif n == 5 or n == 6:
            # The optional deadline: wall-clock ms (the receiver's clock) after which
            # the sender no longer waits for the answer; 0 = none.
            deadline = (<list>body)[4]
            if type(deadline) is not int or deadline < 0:
                raise ProtocolError(f"malformed frame deadline {deadline!r}")
            if n == 5:
                (<list>body).append(None)
            else:
                # The optional trace context: a map of W3C traceparent/tracestate
                # (hypercache.observe.tracing reads it; a malformed one is ignored).
                trace = (<list>body)[5]
                if trace is not None and type(trace) is not dict:
                    raise ProtocolError(f"malformed frame trace context {trace!r:.100}")
        else:
            raise ProtocolError("frame body must be a 4-, 5- or 6-element array")
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
