"""Value compression of the clients: :mod:`hypercache.net.compression` (the codec
lives in the wire layer, where a node also decodes values for a client that does
not read compressed ones). Re-exported here, where the clients' options are."""

from hypercache.net.compression import (
    DEFAULT_COMPRESSION,
    DEFAULT_LEVEL,
    DEFAULT_MIN_SIZE,
    MARK,
    CompressedSerializer,
    Compression,
    ValueCodec,
    parse_compression,
    resolve_compression,
)

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
