"""What the transport tests share: a server and a connection as context managers.
Their fixtures (``run``, ``transport``) live in ``conftest.py``; their waits poll with
:func:`hypercache.cluster.local.until`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from hypercache.net import (
    ClientConnection,
    Limits,
    Op,
    ServerOptions,
    Transport,
    encode_request,
    make_hello,
)
from hypercache.net.server import ServerBase

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]

#: Every async test body runs on both event loops, as uvloop's own suite does.
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
CLUSTER = "test-cluster"
HELLO_FRAME = encode_request(1, Op.HELLO, make_hello(CLUSTER))


async def spin(iterations: int = 50) -> None:
    """Let the loop run a number of iterations (no wall-clock wait)."""
    for _ in range(iterations):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def serving(transport: Transport, handler: Any, **options: Any) -> AsyncIterator[ServerBase]:
    """A started server on a free loopback port, closed on the way out."""
    server = transport.create_server(
        handler, "127.0.0.1:0", ServerOptions(cluster=CLUSTER, node_id="server-1", **options)
    )
    await server.start()
    assert isinstance(server, ServerBase)
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def connected(
    transport: Transport, server_address: str, limits: Limits | None = None, **hello: Any
) -> AsyncIterator[ClientConnection]:
    """A handshaken client connection, closed on the way out."""
    conn = await transport.connect(server_address, make_hello(CLUSTER, **hello), limits, timeout=5)
    assert isinstance(conn, ClientConnection)
    try:
        yield conn
    finally:
        await conn.close()
