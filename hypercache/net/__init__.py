"""Networking of hypercache: the wire protocol and its transports.

- :mod:`~hypercache.net.protocol`: framing, message types, operations, limits, handshake.
- :mod:`~hypercache.net.transport`: the interfaces (Handler, Server, Connection, Transport).
- :mod:`~hypercache.net.framed`: the framed asyncio protocol both ends share (coalesced
  writes, counters, busy polling).
- :mod:`~hypercache.net.server`: the server side (handshake, dispatch, caps).
- :mod:`~hypercache.net.connection`: the client side (one multiplexed connection).
- :mod:`~hypercache.net.auth`: peer authentication (proofs of the cluster secret).
- :mod:`~hypercache.net.tcp`: TCP on asyncio/uvloop (``TCP``, ``connect``, ``TcpServer``).
- :mod:`~hypercache.net.inproc`: the same over in-memory pipes, for tests.
- :mod:`~hypercache.net.blocking`: a blocking-socket connection for the sync client.

The wire format is specified in ``docs/protocol.md``.
"""

from hypercache.net.blocking import BlockingConnection
from hypercache.net.connection import ClientConnection
from hypercache.net.inproc import InprocNetwork, InprocServer
from hypercache.net.protocol import (
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_KEY,
    DEFAULT_MAX_VALUE,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameEncoder,
    Limits,
    MsgType,
    Op,
    encode_error,
    encode_request,
    encode_response,
    make_hello,
)
from hypercache.net.tcp import TCP, TcpServer, TcpTransport, connect
from hypercache.net.transport import (
    DEFAULT_CONNECT_TIMEOUT,
    Connection,
    Handler,
    NetStats,
    PeerInfo,
    Server,
    ServerOptions,
    Transport,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_KEY",
    "DEFAULT_MAX_VALUE",
    "PROTOCOL_VERSION",
    "TCP",
    "BlockingConnection",
    "ClientConnection",
    "Connection",
    "Frame",
    "FrameDecoder",
    "FrameEncoder",
    "Handler",
    "InprocNetwork",
    "InprocServer",
    "Limits",
    "MsgType",
    "NetStats",
    "Op",
    "PeerInfo",
    "Server",
    "ServerOptions",
    "TcpServer",
    "TcpTransport",
    "Transport",
    "connect",
    "encode_error",
    "encode_request",
    "encode_response",
    "make_hello",
]
