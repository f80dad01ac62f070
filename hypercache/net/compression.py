"""Value compression: how a client shrinks large values before they leave it.

Compression happens once, in the client that writes: nodes store, replicate, hint,
stream and sync the compressed bytes as they store any value (so
``hypercache_bytes`` charges what is stored), and every client decompresses after
reading, whatever its own ``compression`` setting. The codec is zstandard (see
``docs/design.md`` for why). The backends (:mod:`hypercache.backends`) and the
tiered cache use the same codec on the bytes they store.

Negotiated in the handshake (:data:`~hypercache.net.protocol.FEATURE_COMPRESSION`,
``docs/protocol.md``): a client lists that it reads this form in its HELLO, and
compresses only once the nodes' answers list it too (a :class:`ValueCodec` made with
``negotiate=True`` writes raw until :meth:`ValueCodec.learn` saw a node that does,
and for good once it saw one that does not). A node answering a client that did not
list it decodes the values it answers (:meth:`ValueCodec.decode`, bounded by
``max_value``), so a client of the previous version reads them as it wrote them.

The stored form is told apart by its first byte, ``0xC1``: the one byte msgpack
never writes (and pickle starts with ``0x80``), so no value of the built-in
serializers begins with it::

    anything but 0xC1 ...          a raw value, as the serializer produced it
    0xC1 0x00 <value>              a raw value that itself begins with 0xC1 (escaped)
    0xC1 0x01 <size: u32 BE> <zstd frame>    compressed; size = the raw length

A value under ``min_size``, or one that would not shrink, is kept raw: a value is
never expanded (but for the two escape bytes of the rare raw value that begins
with ``0xC1``). Reading a compressed value checks its declared size, and the size
the frame announces, against ``max_value`` before anything is decompressed, and
decompresses at most that much: a decompression bomb is refused with
:class:`~hypercache.errors.ValueTooLargeError` in bounded memory.
"""

from __future__ import annotations

import io
import struct
import threading
from dataclasses import dataclass
from typing import Any, Final

import zstandard

from hypercache.errors import ConfigError, ProtocolError, ValueTooLargeError
from hypercache.net.protocol import FEATURE_COMPRESSION

__all__ = [
    "DEFAULT_COMPRESSION",
    "DEFAULT_LEVEL",
    "DEFAULT_MIN_SIZE",
    "MARK",
    "CompressedSerializer",
    "Compression",
    "ValueCodec",
    "parse_compression",
    "resolve_compression",
]

#: First byte of every value that is not stored as is (msgpack's never-used byte).
MARK: Final = 0xC1
_RAW: Final = b"\xc1\x00"
_ZSTD: Final = b"\xc1\x01"
_HEADER: Final = 6
_size = struct.Struct(">I")

#: Values from this size up are compressed (bytes, after serialisation). Below it
#: zstd saves little and costs more than the bytes it saves (bench/bench_compression.py).
DEFAULT_MIN_SIZE: Final = 1024
#: zstd level 1, its fastest: on JSON-like values it stores as little as level 3 (a
#: tenth) at about 60 % of its time (bench/observe_report.py measures 1 against 3).
DEFAULT_LEVEL: Final = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class Compression:
    """How a client compresses the values it writes.

    :param level: zstd level, 1 (fastest) to 22 (smallest). Default 1.
    :param min_size: values (serialised) shorter than this are stored raw. Default 1024.
    """

    level: int = DEFAULT_LEVEL
    min_size: int = DEFAULT_MIN_SIZE

    def __post_init__(self) -> None:
        if type(self.level) is not int or not 1 <= self.level <= 22:
            raise ConfigError("compression", f"level must be 1..22, got {self.level!r}")
        if type(self.min_size) is not int or self.min_size < 0:
            raise ConfigError(
                "compression", f"min_size must be a non-negative int, got {self.min_size!r}"
            )


#: What a client uses when given no ``compression``.
DEFAULT_COMPRESSION: Final = Compression()


def resolve_compression(value: Compression | str | bool | None) -> Compression | None:
    """``Client(compression=...)``: a :class:`Compression`; ``"zstd"`` or ``True`` for the
    defaults; ``None``, ``False`` or ``"off"`` for none (values are still read back
    decompressed).

    :raises ConfigError: anything else (field ``compression``).
    """
    if isinstance(value, Compression):
        return value
    if value is True or value == "zstd":
        return DEFAULT_COMPRESSION
    if value is None or value is False or value == "off":
        return None
    raise ConfigError("compression", f"expected a Compression, 'zstd' or 'off', got {value!r}")


def parse_compression(text: str) -> Compression | None:
    """A URL's or a flag's ``compression`` option: ``off`` (none), ``zstd`` (the
    defaults) or ``zstd:<level>``; ``min_size`` stays the default.

    :raises ConfigError: anything else (field ``compression``).
    """
    name, sep, level = text.strip().lower().partition(":")
    if not sep:
        return resolve_compression(name)
    if name == "zstd" and level.isdigit():
        return Compression(level=int(level))
    raise ConfigError("compression", f"expected 'off', 'zstd' or 'zstd:<level>', got {text!r}")


# zstd contexts, one per thread (they are not thread-safe): making one costs more
# than compressing 4 KiB with it (a compression context of level 3 is ~1 MiB).
_contexts = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    made: dict[int, zstandard.ZstdCompressor] | None = getattr(_contexts, "c", None)
    if made is None:
        made = _contexts.c = {}
    cctx = made.get(level)
    if cctx is None:
        cctx = made[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_contexts, "d", None)
    if dctx is None:
        dctx = _contexts.d = zstandard.ZstdDecompressor()
    return dctx


class ValueCodec:
    """Encodes the bytes a client writes and decodes those it reads (see the module
    docstring). Thread-safe: the zstd contexts are per thread.

    :param compression: how to compress; None writes raw (reading decodes anyway).
    :param max_value: the largest value a compressed one may decode to.
    :param negotiate: compress only once :meth:`learn` saw a server that reads
        compressed values, and never after it saw one that does not (a client
        of a cluster); False compresses at once (a store of this process's own).
    """

    __slots__ = ("_active", "_refused", "compression", "max_value")

    def __init__(
        self, compression: Compression | None, max_value: int, *, negotiate: bool = False
    ) -> None:
        self.compression = compression
        self.max_value = max_value
        self._refused = False
        # What encode uses: the setting, once negotiated.
        self._active = None if negotiate else compression

    def pending(self, stored: bytes) -> bool:
        """Whether ``stored`` (what :meth:`encode` made) is raw only because no
        server said yet that it takes compressed values: the caller may reach one
        first and encode again, so that its first write is compressed too."""
        comp = self.compression
        return (
            self._active is None
            and comp is not None
            and not self._refused
            and len(stored) >= comp.min_size
            and len(stored) > 0
        )

    @property
    def active(self) -> Compression | None:
        """How values are compressed now (None: written raw)."""
        return self._active

    def learn(self, features: frozenset[str] | set[str] | tuple[str, ...]) -> None:
        """A server answered a handshake listing ``features``: compress from now on
        if it reads compressed values and none before it did not; stop for good if
        it does not (a node of a version without compression is in the cluster: its
        older clients could not read what this one wrote through it)."""
        if FEATURE_COMPRESSION in features:
            if not self._refused:
                self._active = self.compression
        else:
            self._refused = True
            self._active = None

    def encode(self, data: bytes) -> bytes:
        """The stored form of ``data`` (the serializer's output)."""
        comp = self._active
        if comp is not None and len(data) >= comp.min_size and data:
            packed = _compressor(comp.level).compress(data)
            if len(packed) + _HEADER < len(data):
                return _ZSTD + _size.pack(len(data)) + packed
        if data[:1] == b"\xc1":
            return _RAW + data
        return data

    def decode(self, data: bytes) -> bytes:
        """The serializer's bytes back from a stored value.

        :raises ValueTooLargeError: the value would decompress past ``max_value``.
        :raises ProtocolError: a value marked compressed that is not a valid frame.
        """
        if data[:1] != b"\xc1":
            return data
        tag = data[:2]
        if tag == _RAW:
            return data[2:]
        if tag != _ZSTD or len(data) < _HEADER:
            raise ProtocolError(f"value of {len(data)} bytes has an unknown encoding {tag!r}")
        (size,) = _size.unpack_from(data, 2)
        limit = self.max_value
        if size > limit:
            raise ValueTooLargeError(
                f"compressed value declares {size} bytes, over max_value={limit}"
            )
        frame = memoryview(data)[_HEADER:]
        try:
            announced = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"compressed value is not a zstd frame: {exc}") from None
        if announced > limit:
            raise ValueTooLargeError(
                f"compressed value's frame announces {announced} bytes, over max_value={limit}"
            )
        if announced >= 0 and announced != size:
            raise ProtocolError(
                f"compressed value's frame holds {announced} bytes, declared {size}"
            )
        try:
            if announced == size:  # what encode writes: one call, ``size`` bytes made
                out = _decompressor().decompress(frame)
            else:
                # A frame that does not say: at most one byte more than declared,
                # enough to tell a lie, never a bomb.
                reader = _decompressor().stream_reader(io.BytesIO(frame))
                out = reader.read(size + 1)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"compressed value does not decompress: {exc}") from None
        if len(out) != size:
            if len(out) > size:
                raise ValueTooLargeError(
                    f"compressed value decompresses past its declared {size} bytes"
                )
            raise ProtocolError(f"compressed value holds {len(out)} bytes, declared {size}")
        return out


class CompressedSerializer:
    """A serializer whose bytes go through a :class:`ValueCodec`: what the backends
    (:mod:`hypercache.backends`) store, so that a value written to Redis or to the
    memory backend is compressed from ``min_size`` up, as a client's is. Reads
    decode every stored form (raw ones too: data written with compression off).

    :param inner: the serializer of the values (msgpack, pickle, ...).
    :param compression: how to compress (None: write raw, still read compressed).
    :param max_value: the largest size a stored value may decompress to.
    """

    __slots__ = ("codec", "inner")

    def __init__(self, inner: Any, compression: Compression | None, max_value: int) -> None:
        self.inner = inner
        self.codec = ValueCodec(compression, max_value)

    def dumps(self, obj: Any) -> bytes:
        data: bytes = self.inner.dumps(obj)
        return self.codec.encode(data)

    def loads(self, data: bytes) -> Any:
        return self.inner.loads(self.codec.decode(data))

    def __repr__(self) -> str:
        return f"CompressedSerializer({self.inner!r}, {self.codec.compression!r})"
