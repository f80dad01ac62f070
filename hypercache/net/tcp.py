"""TCP transport: the framed protocol classes over the loop's sockets (uvloop in
production). What is TCP here is small: binding, dialing, TCP_NODELAY; everything
else is in :mod:`hypercache.net.server` and :mod:`hypercache.net.connection`.
"""

from __future__ import annotations

import asyncio
from ssl import SSLContext, SSLError
from typing import TYPE_CHECKING, Any, Final

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

__all__ = ["TCP", "TcpServer", "TcpTransport", "connect", "start_server"]


class TcpServer(ServerBase):
    """A TCP server for ``handler`` on ``address`` (``"host:port"``, port 0 picks one).

    After :meth:`start`, :attr:`address` holds the bound port. Use an IP address
    as host with port 0 (a name resolving to several addresses would bind each to
    a different port).
    """

    def __init__(self, handler: Handler, address: str, options: ServerOptions) -> None:
        super().__init__(handler, options)
        self._host, self._port = parse_hostport(address)
        self.address = address
        self._listener: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("server already started")
        loop = self._loop = asyncio.get_running_loop()
        options = self.options
        tls: dict[str, Any] = {}
        if options.ssl is not None:
            # A TLS handshake not done within handshake_timeout closes the connection
            # (a plaintext client sends no ClientHello: refused the same way).
            tls = {"ssl": options.ssl, "ssl_handshake_timeout": options.handshake_timeout}
        self._listener = await loop.create_server(
            self._new_protocol,
            self._host,
            self._port,
            backlog=options.backlog,
            reuse_address=True,
            **tls,
        )
        self._closing = False
        port = self._listener.sockets[0].getsockname()[1]
        self.address = format_hostport(self._host, port)

    async def close(self) -> None:
        self._closing = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        await self._close_connections()
        if listener is not None:
            await listener.wait_closed()


async def start_server(handler: Handler, address: str, options: ServerOptions) -> TcpServer:
    """Create and start a :class:`TcpServer`."""
    server = TcpServer(handler, address, options)
    await server.start()
    return server


async def connect(
    address: str,
    hello: dict[str, Any],
    limits: Limits | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    *,
    ssl: SSLContext | None = None,
) -> ClientConnection:
    """Connect to ``address`` (``"host:port"``) over TCP and handshake with ``hello``.

    ``hello`` is the HELLO payload (see :func:`~hypercache.net.protocol.make_hello`);
    ``version`` is filled in when missing. ``timeout`` covers connecting (the TLS
    handshake too, with ``ssl``) and the HELLO.

    :raises NodeUnavailableError: cannot connect, or no HELLO answer within ``timeout``.
    :raises HandshakeError: the server refused the HELLO, or answered for another
        cluster or protocol version.
    """
    host, port = parse_hostport(address)
    payload = prepare_hello(hello)
    loop = asyncio.get_running_loop()
    conn = ClientConnection(loop, address, limits if limits is not None else Limits())
    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout(timeout):
            if ssl is None:
                await loop.create_connection(lambda: conn, host, port)
            else:
                await loop.create_connection(
                    lambda: conn, host, port, ssl=ssl, server_hostname=host.strip("[]")
                )
    except TimeoutError:
        raise NodeUnavailableError(f"{address}: connect timed out after {timeout}s") from None
    except SSLError as exc:
        raise NodeUnavailableError(f"{address}: TLS handshake failed: {exc}") from None
    except OSError as exc:
        raise NodeUnavailableError(f"{address}: cannot connect: {exc}") from None
    await conn.handshake(payload, max(deadline - loop.time(), 0.001))
    return conn


class TcpTransport:
    """The TCP :class:`~hypercache.net.transport.Transport`.

    :param ssl: TLS context of its dials (a client context); None = plaintext.
        Servers take theirs from :class:`~hypercache.net.transport.ServerOptions`.
    """

    def __init__(self, ssl: SSLContext | None = None) -> None:
        self.ssl = ssl

    def create_server(self, handler: Handler, address: str, options: ServerOptions) -> TcpServer:
        return TcpServer(handler, address, options)

    async def connect(
        self,
        address: str,
        hello: dict[str, Any],
        limits: Limits | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> ClientConnection:
        return await connect(address, hello, limits, timeout, ssl=self.ssl)


#: The TCP transport.
TCP: Final = TcpTransport()

if TYPE_CHECKING:  # the classes above implement the interfaces of transport.py
    from hypercache.net.transport import Connection, Server, Transport

    _transport: Transport = TCP
    _server: Server = TcpServer.__new__(TcpServer)
    _connection: Connection = ClientConnection.__new__(ClientConnection)
