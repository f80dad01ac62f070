"""In-process transport: the TCP protocol classes over an in-memory pipe, for unit tests.

Servers register in an :class:`InprocNetwork` under their address string and
clients connect by that string. Nothing touches a socket or a selector, yet every
frame is encoded and decoded exactly as over TCP (same :class:`ServerProtocol` and
:class:`ClientConnection`), so payloads must be serialisable, limits apply, the
handshake runs, requests are multiplexed and answers may come out of order.

Failure simulation: :meth:`InprocServer.close` makes pending requests fail and new
connects fail with :class:`NodeUnavailableError` (start it again to simulate a
restart); :meth:`InprocServer.drop_connections` resets every connection while the
server keeps accepting new ones.

Not simulated: TCP fragmentation, latency, a peer half-closing its side.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from hypercache.errors import NodeUnavailableError
from hypercache.net.connection import ClientConnection
from hypercache.net.protocol import Limits, prepare_hello
from hypercache.net.server import ServerBase
from hypercache.net.transport import (
    DEFAULT_CONNECT_TIMEOUT,
    Handler,
    ServerOptions,
)
from hypercache.units import format_hostport, parse_hostport

__all__ = ["NETWORK", "InprocNetwork", "InprocServer", "connect"]

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class _PipeEnd(asyncio.Transport):
    """One end of an in-memory byte pipe, behaving like a TCP transport.

    What one end writes lands in the other end's inbox and is delivered to that
    end's protocol on a later loop iteration (never re-entrantly), in one
    ``data_received`` per iteration. The bytes still in the peer's inbox are this
    end's "write buffer": above the high mark the writer's protocol gets
    ``pause_writing``, and ``resume_writing`` once delivery brings them under the
    low mark. Delivery waits while the reader has paused reading.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.Protocol,
        sockname: tuple[str, int],
        peername: tuple[str, int],
    ) -> None:
        super().__init__({"sockname": sockname, "peername": peername})
        self._loop = loop
        self._protocol = protocol
        self._peer: _PipeEnd | None = None
        self._inbox: deque[bytes] = deque()
        self._inbox_size = 0
        self._reading_paused = False
        self._scheduled = False
        self._eof = False  # the peer closed: deliver what is left, then close
        self._closing = False  # close() or abort() called: no more writes
        self._gone = False  # connection_lost delivered
        self._writing_paused = False
        self._high = _HIGH_WATER
        self._low = _LOW_WATER

    # -- asyncio.BaseTransport / ReadTransport

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = cast(asyncio.Protocol, protocol)

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False
        self._schedule()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.call_soon(self._shutdown, False)

    # -- asyncio.WriteTransport

    def get_write_buffer_size(self) -> int:
        return self._peer._inbox_size if self._peer is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = _HIGH_WATER if high is None else high
        self._low = self._high // 4 if low is None else low

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        peer = self._peer
        if peer is None or peer._gone or peer._closing:
            return  # the other side is gone: the bytes vanish, as on a dead socket
        peer._enqueue(bytes(data))
        if not self._writing_paused and peer._inbox_size > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def abort(self) -> None:
        self._closing = True
        self._loop.call_soon(self._shutdown, True)

    # -- internals

    def _enqueue(self, data: bytes) -> None:
        self._inbox.append(data)
        self._inbox_size += len(data)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._reading_paused and not self._gone:
            self._scheduled = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        if self._gone or self._reading_paused:
            return
        inbox = self._inbox
        if inbox:
            data = inbox.popleft() if len(inbox) == 1 else b"".join(inbox)
            inbox.clear()
            self._inbox_size = 0
            writer = self._peer
            if writer is not None and writer._writing_paused and not writer._gone:
                writer._writing_paused = False
                writer._protocol.resume_writing()
            if not self._closing:
                self._protocol.data_received(data)
        if self._eof and not self._inbox and not self._gone and not self._reading_paused:
            self._protocol.eof_received()
            self._closing = True  # no half-closed connections here
            self._shutdown(False)

    def _shutdown(self, reset: bool) -> None:
        if self._gone:
            return
        self._gone = True
        self._closing = True
        self._inbox.clear()
        self._inbox_size = 0
        peer = self._peer
        if peer is not None:
            peer._peer_closed(reset)
        self._protocol.connection_lost(None)

    def _peer_closed(self, reset: bool) -> None:
        if self._gone:
            return
        if reset:
            self._closing = True
            self._inbox.clear()
            self._inbox_size = 0
            self._loop.call_soon(self._reset)
        else:
            self._eof = True
            self._schedule()

    def _reset(self) -> None:
        if not self._gone:
            self._gone = True
            self._protocol.connection_lost(ConnectionResetError("connection reset by peer"))


class InprocServer(ServerBase):
    """A server reachable by in-process connections at :attr:`address`.

    ``address`` is ``"host:port"`` like over TCP; port 0 gets a unique free port
    of the network on :meth:`start`.
    """

    def __init__(
        self, handler: Handler, address: str, options: ServerOptions, network: InprocNetwork
    ) -> None:
        super().__init__(handler, options)
        self._host, self._port = parse_hostport(address)
        self.address = address
        self._network = network

    async def start(self) -> None:
        if not self._closing:
            raise RuntimeError("server already started")
        self._loop = asyncio.get_running_loop()
        port = self._port or self._network._free_port(self._host)
        self.address = format_hostport(self._host, port)
        self._network._register(self)
        self._closing = False

    async def close(self) -> None:
        if self._network._servers.get(self.address) is self:
            del self._network._servers[self.address]
        self._closing = True
        await self._close_connections()

    def drop_connections(self) -> None:
        """Reset every open connection (a network blip); new connections are accepted."""
        for conn in list(self._conns):
            conn.abort()

    def _open(self, client: ClientConnection, client_port: int) -> None:
        loop = self._loop
        assert loop is not None
        here = parse_hostport(self.address)
        there = ("inproc", client_port)
        server_proto = self._new_protocol()
        client_end = _PipeEnd(loop, client, there, here)
        server_end = _PipeEnd(loop, server_proto, here, there)
        client_end._peer = server_end
        server_end._peer = client_end
        server_proto.connection_made(server_end)
        client.connection_made(client_end)


class InprocNetwork:
    """A namespace of in-process servers; an :class:`~hypercache.net.transport.Transport`.

    Tests should make one network each, so that nothing leaks between them.
    """

    def __init__(self) -> None:
        self._servers: dict[str, InprocServer] = {}
        self._ports = itertools.count(1)
        self._client_ports = itertools.count(1)

    def create_server(self, handler: Handler, address: str, options: ServerOptions) -> InprocServer:
        return InprocServer(handler, address, options, self)

    def server(self, address: str) -> InprocServer | None:
        """The running server at ``address``, if any."""
        return self._servers.get(address)

    async def connect(
        self,
        address: str,
        hello: dict[str, Any],
        limits: Limits | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> ClientConnection:
        """Connect to the server at ``address`` and handshake (as :func:`tcp.connect`).

        :raises NodeUnavailableError: no server runs at ``address``.
        :raises HandshakeError: the server refused the HELLO.
        """
        parse_hostport(address)
        payload = prepare_hello(hello)
        server = self._servers.get(address)
        if server is None:
            raise NodeUnavailableError(f"{address}: connection refused (no in-process server)")
        loop = asyncio.get_running_loop()
        if server._loop is not loop:
            raise RuntimeError(f"{address}: the in-process server runs on another event loop")
        conn = ClientConnection(loop, address, limits if limits is not None else Limits())
        server._open(conn, next(self._client_ports))
        await conn.handshake(payload, timeout)
        return conn

    def _free_port(self, host: str) -> int:
        while True:
            port = next(self._ports)
            if format_hostport(host, port) not in self._servers:
                return port

    def _register(self, server: InprocServer) -> None:
        if server.address in self._servers:
            raise OSError(errno.EADDRINUSE, f"address already in use: {server.address}")
        self._servers[server.address] = server


#: The default network (prefer a network per test).
NETWORK = InprocNetwork()

if TYPE_CHECKING:  # the classes above implement the interfaces of transport.py
    from hypercache.net.transport import Server, Transport

    _transport: Transport = NETWORK
    _server: Server = InprocServer.__new__(InprocServer)


async def connect(
    address: str,
    hello: dict[str, Any],
    limits: Limits | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> ClientConnection:
    """Connect through the default :data:`NETWORK`."""
    return await NETWORK.connect(address, hello, limits, timeout)
