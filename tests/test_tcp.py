"""Tests of the asyncio transports: TCP on 127.0.0.1, and in-process.

Every async test body runs on asyncio's default loop and on uvloop (the ``run``
fixture), and most of them on both transports (the ``transport`` fixture): the
in-process transport must behave like TCP. Waits poll a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from net_helpers import (
    CLUSTER,
    HELLO_FRAME,
    LOOPS,
    Runner,
    connected,
    serving,
    spin,
)

from hypercache._core.hlc import wall_clock_ms
from hypercache.cluster.local import until
from hypercache.errors import (
    FrameTooLargeError,
    HandshakeError,
    NoAnswerError,
    NodeUnavailableError,
    ProtocolError,
    QuorumError,
    RequestTimeoutError,
    ServerError,
)
from hypercache.net import (
    TCP,
    Frame,
    FrameDecoder,
    InprocNetwork,
    Limits,
    Op,
    PeerInfo,
    ServerOptions,
    TcpServer,
    Transport,
    encode_request,
    make_hello,
)
from hypercache.net.server import ServerBase

payloads = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.binary(max_size=2000),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=30,
)

# Ops as the test handler interprets them.
ECHO = Op.GET  # answer the payload
SHUFFLE = Op.SET  # yield to the loop payload[1] times, then answer payload[0]
FAIL = Op.DELETE  # raise the error named by the payload
BLOCK = Op.TOPOLOGY  # wait for the handler's gate
WHOAMI = Op.KEYS  # answer what the server knows of the peer
BIG = Op.PULL  # answer payload bytes


class ScriptedHandler:
    """A handler whose ops exercise the transport."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = 0  # BLOCK requests that started
        self.cancelled = 0  # BLOCK requests cancelled by a close
        self.completed: list[int] = []  # SHUFFLE completion order
        self.hellos: list[dict[str, Any]] = []

    def hello_info(self, peer_hello: dict[str, Any]) -> dict[str, Any]:
        self.hellos.append(peer_hello)
        if peer_hello["info"].get("reject"):
            raise HandshakeError("this server does not like you")
        if peer_hello["info"].get("crash"):
            raise RuntimeError("bug in hello_info")
        return {"members": [["server-1", "somewhere:1"]], "seen": len(self.hellos)}

    async def handle(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        if op == Op.PING:
            return "pong"
        if op == ECHO:
            return payload
        if op == SHUFFLE:
            value, yields = payload
            for _ in range(yields):
                await asyncio.sleep(0)
            self.completed.append(value)
            return value
        if op == FAIL:
            if payload == "quorum":
                raise QuorumError(1, 2)
            if payload == "unencodable":
                return object()
            raise RuntimeError("handler bug")
        if op == BLOCK:
            self.entered += 1
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            return "released"
        if op == WHOAMI:
            return {
                "remote": conn_info.remote,
                "node_id": conn_info.node_id,
                "address": conn_info.address,
                "info": conn_info.info,
                "is_node": conn_info.is_node,
            }
        if op == BIG:
            return b"x" * payload
        raise ProtocolError(f"unknown op {op}")


# ============================================================================ round trips


@pytest.mark.parametrize("kind", ["tcp", "inproc"])
@pytest.mark.parametrize("loop_name", list(LOOPS))
def test_payload_round_trips(loop_name: str, kind: str) -> None:
    transport: Transport = TCP if kind == "tcp" else InprocNetwork()
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        handler = runner.run(_make_handler())
        stack = contextlib.AsyncExitStack()
        server = runner.run(stack.enter_async_context(serving(transport, handler)))
        conn = runner.run(stack.enter_async_context(connected(transport, server.address)))
        try:

            @settings(max_examples=40, deadline=None)
            @given(payload=payloads)
            def check(payload: Any) -> None:
                assert runner.run(conn.request(ECHO, payload, 5)) == payload

            check()
        finally:
            runner.run(stack.aclose())


async def _make_handler() -> ScriptedHandler:
    return ScriptedHandler()


def test_every_message_type(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            assert await conn.request(Op.PING, None, 5) == "pong"  # REQUEST -> RESPONSE
            with pytest.raises(QuorumError) as info:  # REQUEST -> ERROR, typed
                await conn.request(FAIL, "quorum", 5)
            assert (info.value.acks, info.value.required) == (1, 2)
            with pytest.raises(ServerError, match="RuntimeError: handler bug"):
                await conn.request(FAIL, "bug", 5)
            with pytest.raises(ServerError, match="cannot be encoded"):
                await conn.request(FAIL, "unencodable", 5)
            with pytest.raises(ProtocolError, match="unknown op"):
                await conn.request(99, None, 5)
            with pytest.raises(ProtocolError, match="HELLO after the handshake"):
                await conn.request(Op.HELLO, make_hello(CLUSTER), 5)
            # the connection survived all of it
            assert await conn.request(ECHO, {"k": b"v"}, 5) == {"k": b"v"}
            stats = conn.stats
        assert stats.frames_out == stats.frames_in == 8  # HELLO + 7 requests
        total = server.stats
        assert total.frames_in == total.frames_out == 8
        assert total.bytes_in == stats.bytes_out and total.bytes_out == stats.bytes_in
        assert total.protocol_errors == 0 and total.connections_accepted == 1

    run(main())


def test_handshake_exchanges_info(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        async with serving(transport, handler) as server:
            async with connected(
                transport, server.address, node_id="n2", address="10.0.0.2:7000", info={"z": 1}
            ) as conn:
                hello = dict(conn.peer_hello)
                assert hello.pop("features") == frozenset({"trace", "zstd"})
                assert abs(hello.pop("clock_ms") - wall_clock_ms()) < 60_000
                assert hello == {
                    "version": 1,
                    "cluster": CLUSTER,
                    "node_id": "server-1",
                    "info": {"members": [["server-1", "somewhere:1"]], "seen": 1},
                }
                me = await conn.request(WHOAMI, None, 5)
                assert me["node_id"] == "n2" and me["is_node"] is True
                assert me["address"] == "10.0.0.2:7000" and me["info"] == {"z": 1}
                assert me["remote"].rpartition(":")[2].isdigit()
            assert handler.hellos[0]["node_id"] == "n2"
            assert "auth" not in handler.hellos[0]
            async with connected(transport, server.address) as client:
                me = await client.request(WHOAMI, None, 5)
                assert me["node_id"] is None and me["is_node"] is False

    run(main())


@pytest.mark.parametrize(
    ("hello", "match"),
    [
        ({"version": 99}, "version"),
        ({"cluster": "other-cluster"}, "cluster"),
        ({"auth": "wrong"}, "authentication"),
        ({"auth": None}, "authentication"),
        ({"info": {"reject": True}}, "does not like you"),
    ],
)
def test_handshake_mismatch_rejected(
    run: Runner[None], transport: Transport, hello: dict[str, Any], match: str
) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        async with serving(transport, handler, auth="s3cret") as server:
            payload = {**make_hello(CLUSTER, auth="s3cret"), **hello}
            with pytest.raises(HandshakeError, match=match):
                await transport.connect(server.address, payload, timeout=5)
            await until(lambda: server.connections_open == 0)
            assert server.stats.handshake_failures == 1
            # the right token gets in
            async with connected(transport, server.address, auth="s3cret") as conn:
                assert await conn.request(Op.PING, None, 5) == "pong"

    run(main())


def test_hello_info_crash_is_a_server_error(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        async with serving(transport, ScriptedHandler()) as server:
            with pytest.raises(ServerError, match="bug in hello_info"):
                await transport.connect(
                    server.address, make_hello(CLUSTER, info={"crash": True}), timeout=5
                )

    run(main())


# ============================================================================ multiplexing


def test_pipelining_1000_requests_out_of_order(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        rng = random.Random(42)
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            requests = [(i, rng.randrange(20)) for i in range(1000)]
            results = await asyncio.gather(*(conn.request(SHUFFLE, r, 10) for r in requests))
            assert results == list(range(1000))
            assert handler.completed != sorted(handler.completed)  # answered out of order
            assert sorted(handler.completed) == list(range(1000))
            client_stats = conn.stats
        server_stats = server.stats
        assert server_stats.frames_in == server_stats.frames_out == 1001
        # writes were coalesced on both sides
        assert client_stats.writes < 50
        assert server_stats.writes < 500
        assert server_stats.in_flight == 0

    run(main())


def test_request_timeout_keeps_connection_usable(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            with pytest.raises(NoAnswerError, match=r"no answer within 0\.05s"):
                await conn.request(BLOCK, None, 0.05)
            assert conn.stats.timeouts == 1
            assert await conn.request(Op.PING, None, math.inf) == "pong"  # no deadline
            handler.gate.set()  # the late answer arrives and is dropped
            await until(lambda: conn.stats.late_responses == 1)
            assert await conn.request(ECHO, 1, 5) == 1
            assert conn.pending == 0

    run(main())


def test_requests_carry_a_deadline_and_a_late_one_is_not_started(
    run: Runner[None], transport: Transport
) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            # The HELLO answer told the client the server's clock: requests carry a
            # deadline on it, which the server checks before starting them.
            offset = conn._clock_offset
            assert offset is not None and abs(offset) < 60_000
            assert await conn.request(SHUFFLE, [7, 0], 5) == 7
            # As if the request had waited 10 s in a paused server's socket buffer:
            conn._clock_offset = offset - 10_000
            with pytest.raises(RequestTimeoutError, match="after its deadline") as late:
                await conn.request(SHUFFLE, [8, 0], 5)
            # The node answered (it is alive): not a NoAnswerError.
            assert type(late.value) is RequestTimeoutError
            assert handler.completed == [7]  # the late one never ran
            assert server.stats.expired == 1
            # No deadline (an infinite timeout) is never late.
            assert await conn.request(SHUFFLE, [9, 0], math.inf) == 9
            assert handler.completed == [7, 9]

    run(main())


def test_cancelled_request_answer_is_dropped(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            task = asyncio.ensure_future(conn.request(BLOCK, None, 5))
            await until(lambda: handler.entered == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            handler.gate.set()
            await until(lambda: conn.stats.late_responses == 1)
            assert await conn.request(Op.PING, None, 5) == "pong"

    run(main())


def test_server_close_fails_pending_requests(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        server = transport.create_server(handler, "127.0.0.1:0", ServerOptions(cluster=CLUSTER))
        await server.start()
        conn = await transport.connect(server.address, make_hello(CLUSTER), timeout=5)
        try:
            tasks = [asyncio.ensure_future(conn.request(BLOCK, None, 10)) for _ in range(3)]
            await until(lambda: handler.entered == 3)
            await server.close()
            for task in tasks:
                with pytest.raises(NodeUnavailableError):
                    await task
            assert handler.cancelled == 3  # close() cancelled and awaited the handlers
            await until(lambda: conn.closed)
            with pytest.raises(NodeUnavailableError):
                await conn.request(Op.PING, None, 5)
            with pytest.raises(NodeUnavailableError):
                await transport.connect(server.address, make_hello(CLUSTER), timeout=5)
            assert server.stats.connections_open == 0
        finally:
            await conn.close()
            await server.close()

    run(main())


def test_client_close_fails_pending_requests(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        async with serving(transport, handler) as server:
            conn = await transport.connect(server.address, make_hello(CLUSTER), timeout=5)
            task = asyncio.ensure_future(conn.request(BLOCK, None, 10))
            await until(lambda: handler.entered == 1)
            await conn.close()
            assert conn.closed
            with pytest.raises(NodeUnavailableError):
                await task
            with pytest.raises(NodeUnavailableError):
                await conn.request(Op.PING, None, 5)
            await conn.close()  # idempotent
            await until(lambda: server.connections_open == 0)
            await until(lambda: handler.cancelled == 1)

    run(main())


def test_connect_to_nothing_is_node_unavailable(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        with socket.socket() as sock:  # a port that nothing listens on
            sock.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(NodeUnavailableError):
            await transport.connect(address, make_hello(CLUSTER), timeout=5)

    run(main())


# ============================================================================ limits


def test_oversized_request_is_refused_locally(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        limits = Limits(max_frame=1000, max_key=10, max_value=100)
        async with (
            serving(transport, ScriptedHandler()) as server,
            connected(transport, server.address, limits=limits) as conn,
        ):
            with pytest.raises(FrameTooLargeError):
                await conn.request(ECHO, b"x" * 2000, 5)
            with pytest.raises(ProtocolError):
                await conn.request(ECHO, {1, 2}, 5)
            assert conn.stats.frames_out == 1  # only the HELLO went out
            assert await conn.request(ECHO, b"x" * 500, 5) == b"x" * 500
            # an answer over the client's limit closes the connection
            with pytest.raises(NodeUnavailableError, match="protocol error"):
                await conn.request(BIG, 2000, 5)
            assert conn.stats.protocol_errors == 1

    run(main())


def test_oversized_response_becomes_an_error(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        limits = Limits(max_frame=1000, max_key=10, max_value=100)
        async with (
            serving(transport, ScriptedHandler(), limits=limits) as server,
            connected(transport, server.address) as conn,
        ):
            with pytest.raises(FrameTooLargeError):
                await conn.request(BIG, 2000, 5)
            assert await conn.request(Op.PING, None, 5) == "pong"

    run(main())


# ============================================================================ flow control


def test_inflight_cap_pauses_reading(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        async with (
            serving(transport, handler, max_inflight=4) as server,
            connected(transport, server.address) as conn,
        ):
            tasks = [asyncio.ensure_future(conn.request(BLOCK, None, 10)) for _ in range(10)]
            await until(lambda: handler.entered == 4)
            await spin()
            assert handler.entered == 4  # the other 6 wait unread
            stats = server.stats
            assert stats.inflight_pauses == 1 and stats.in_flight == 4
            handler.gate.set()
            assert await asyncio.gather(*tasks) == ["released"] * 10
            assert handler.entered == 10

    run(main())


def test_server_stops_reading_when_client_does_not_read(
    run: Runner[None], transport: Transport
) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            assert conn._transport is not None
            conn._transport.pause_reading()  # a client that stops reading its answers
            tasks = [asyncio.ensure_future(conn.request(BIG, 1 << 20, 30)) for _ in range(40)]
            await until(lambda: server.stats.write_pauses >= 1)
            conn._transport.resume_reading()
            assert await asyncio.gather(*tasks) == [b"x" * (1 << 20)] * 40

    run(main())


def test_client_waits_while_server_does_not_read(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        async with (
            serving(transport, handler, max_inflight=1) as server,
            connected(transport, server.address) as conn,
        ):
            blocked = asyncio.ensure_future(conn.request(BLOCK, None, 30))
            await until(lambda: handler.entered == 1)  # the server stops reading now
            value = b"v" * (1 << 20)
            tasks = [asyncio.ensure_future(conn.request(ECHO, value, 30)) for _ in range(40)]
            await until(lambda: conn.stats.write_pauses >= 1)
            handler.gate.set()
            assert await blocked == "released"
            assert await asyncio.gather(*tasks) == [value] * 40

    run(main())


def test_write_pause_wait_times_out(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        async with (
            serving(transport, handler, max_inflight=1) as server,
            connected(transport, server.address) as conn,
        ):
            blocked = asyncio.ensure_future(conn.request(BLOCK, None, 30))
            await until(lambda: handler.entered == 1)
            value = b"v" * (1 << 20)
            tasks = [asyncio.ensure_future(conn.request(ECHO, value, 30)) for _ in range(40)]
            await until(lambda: conn.stats.write_pauses >= 1)
            with pytest.raises(RequestTimeoutError, match="could not be sent"):
                await conn.request(Op.PING, None, 0.05)
            handler.gate.set()
            await blocked
            await asyncio.gather(*tasks)

    run(main())


# ============================================================================ in-process only


def test_inproc_restart_and_drop(run: Runner[None]) -> None:
    async def main() -> None:
        net = InprocNetwork()
        handler = ScriptedHandler()
        server = net.create_server(handler, "node-a:7000", ServerOptions(cluster=CLUSTER))
        await server.start()
        assert net.server("node-a:7000") is server
        second = net.create_server(handler, "node-a:7000", ServerOptions(cluster=CLUSTER))
        with pytest.raises(OSError):
            await second.start()
        conn = await net.connect("node-a:7000", make_hello(CLUSTER))
        task = asyncio.ensure_future(conn.request(BLOCK, None, 10))
        await until(lambda: handler.entered == 1)
        server.drop_connections()  # a network blip: reset, the server keeps listening
        with pytest.raises(NodeUnavailableError, match="reset"):
            await task
        conn = await net.connect("node-a:7000", make_hello(CLUSTER))
        assert await conn.request(Op.PING, None, 5) == "pong"
        await server.close()
        assert net.server("node-a:7000") is None
        with pytest.raises(NodeUnavailableError):
            await net.connect("node-a:7000", make_hello(CLUSTER))
        await server.start()  # restart at the same address
        conn2 = await net.connect("node-a:7000", make_hello(CLUSTER))
        assert await conn2.request(Op.PING, None, 5) == "pong"
        await conn2.close()
        await server.close()
        assert conn.closed

    run(main())


def test_inproc_requires_the_same_loop() -> None:
    net = InprocNetwork()

    async def start() -> ServerBase:
        server = net.create_server(ScriptedHandler(), "n:1", ServerOptions(cluster=CLUSTER))
        await server.start()
        assert isinstance(server, ServerBase)
        return server

    with asyncio.Runner() as first:
        server = first.run(start())
        with asyncio.Runner() as second, pytest.raises(RuntimeError, match="another event loop"):
            second.run(net.connect("n:1", make_hello(CLUSTER)))
        first.run(server.close())


# ============================================================================ TCP only


async def raw_connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def raw_close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    header = await reader.readexactly(4)
    body = await reader.readexactly(struct.unpack(">I", header)[0])
    decoder = FrameDecoder()
    decoder.feed(header + body)
    return next(decoder)


async def assert_closed_by_peer(reader: asyncio.StreamReader) -> None:
    async with asyncio.timeout(5):
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""


@pytest.mark.parametrize("after_hello", [False, True])
@pytest.mark.parametrize(
    "bad",
    [
        struct.pack(">I", 100 << 20),  # a 100 MiB header, no body
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # another protocol
        b"\x00\x00\x00\x03\xc1\xc1\xc1",  # not msgpack
        struct.pack(">I", 4) + b"\x93\x00\x01\x01",  # a 3-element body
    ],
)
def test_bad_bytes_close_only_that_connection(
    run: Runner[None], bad: bytes, after_hello: bool
) -> None:
    async def main() -> None:
        async with (
            serving(TCP, ScriptedHandler()) as server,
            connected(TCP, server.address) as good,
        ):
            reader, writer = await raw_connect(server.address)
            try:
                if after_hello:
                    writer.write(HELLO_FRAME)
                    assert (await read_frame(reader)).payload["cluster"] == CLUSTER
                writer.write(bad)
                await assert_closed_by_peer(reader)
            finally:
                await raw_close(writer)
            assert server.stats.protocol_errors == 1
            # the other client carries on
            results = await asyncio.gather(*(good.request(ECHO, i, 5) for i in range(100)))
            assert results == list(range(100))
            await until(lambda: server.connections_open == 1)

    run(main())


def test_hello_frame_limit_applies_before_handshake(run: Runner[None]) -> None:
    async def main() -> None:
        async with serving(TCP, ScriptedHandler()) as server:
            reader, writer = await raw_connect(server.address)
            try:
                writer.write(struct.pack(">I", 1 << 20))  # 1 MiB: fine later, not now
                await assert_closed_by_peer(reader)
            finally:
                await raw_close(writer)
            assert server.stats.protocol_errors == 1

    run(main())


def test_first_frame_must_be_hello(run: Runner[None]) -> None:
    async def main() -> None:
        async with serving(TCP, ScriptedHandler()) as server:
            reader, writer = await raw_connect(server.address)
            try:
                writer.write(encode_request(1, Op.PING, None))
                await assert_closed_by_peer(reader)  # closed without an answer
            finally:
                await raw_close(writer)
            stats = server.stats
            assert stats.protocol_errors == 1 and stats.handshake_failures == 1

    run(main())


def test_handshake_timeout(run: Runner[None]) -> None:
    async def main() -> None:
        async with serving(TCP, ScriptedHandler(), handshake_timeout=0.05) as server:
            reader, writer = await raw_connect(server.address)
            try:
                await assert_closed_by_peer(reader)
            finally:
                await raw_close(writer)
            assert server.stats.handshake_failures == 1

    run(main())


def test_duplicate_request_id_is_refused(run: Runner[None]) -> None:
    async def main() -> None:
        handler = ScriptedHandler()
        async with serving(TCP, handler) as server:
            reader, writer = await raw_connect(server.address)
            try:
                writer.write(HELLO_FRAME)
                await read_frame(reader)
                writer.write(encode_request(5, BLOCK, None) + encode_request(5, Op.PING, None))
                frame = await read_frame(reader)
                assert (frame.type, frame.request_id) == (2, 5)
                assert "already in flight" in frame.payload[1]
                handler.gate.set()
                frame = await read_frame(reader)
                assert (frame.type, frame.request_id, frame.payload) == (1, 5, "released")
            finally:
                await raw_close(writer)

    run(main())


def test_max_connections(run: Runner[None]) -> None:
    async def main() -> None:
        async with (
            serving(TCP, ScriptedHandler(), max_connections=1) as server,
            connected(TCP, server.address) as conn,
        ):
            # A second client is refused at its HELLO, with the reason.
            with pytest.raises(HandshakeError, match="max_connections"):
                await TCP.connect(server.address, make_hello(CLUSTER), timeout=5)
            assert server.stats.connections_rejected == 1
            assert server.stats.rejected_clients == 1
            assert await conn.request(Op.PING, None, 5) == "pong"
            # A peer does not count against the clients' cap: it always gets in.
            hello = make_hello(CLUSTER, node_id="peer-1", address="127.0.0.1:9")
            peer = await TCP.connect(server.address, hello, timeout=5)
            try:
                assert await peer.request(Op.PING, None, 5) == "pong"
                assert server.peers_open == 1
            finally:
                await peer.close()

    run(main())


@pytest.fixture
def fast_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers check their slow and idle connections every 20 ms instead of 1 s."""
    monkeypatch.setattr("hypercache.net.server._SWEEP_INTERVAL", 0.02)


@pytest.mark.usefixtures("fast_sweep")
def test_a_frame_that_never_completes_is_timed_out(run: Runner[None]) -> None:
    async def main() -> None:
        async with serving(TCP, ScriptedHandler(), frame_timeout=0.1) as server:
            reader, writer = await raw_connect(server.address)
            try:
                writer.write(HELLO_FRAME)
                await read_frame(reader)
                # Slowloris: a header announcing 100 bytes, and then only a trickle.
                writer.write(struct.pack(">I", 100) + b"\x94")
                await assert_closed_by_peer(reader)
            finally:
                await raw_close(writer)
            assert server.stats.frame_timeouts == 1

    run(main())


@pytest.mark.usefixtures("fast_sweep")
def test_idle_clients_are_closed_and_peers_are_not(run: Runner[None]) -> None:
    async def main() -> None:
        async with (
            serving(TCP, ScriptedHandler(), idle_timeout=0.1) as server,
            connected(TCP, server.address, node_id="peer-1", address="127.0.0.1:9") as peer,
            connected(TCP, server.address) as idle,
        ):
            await until(lambda: idle.closed, timeout=5)
            assert server.stats.idle_closes == 1
            assert not peer.closed
            assert await peer.request(Op.PING, None, 5) == "pong"

    run(main())


def test_connections_per_source_and_pending_handshakes_are_capped(run: Runner[None]) -> None:
    async def main() -> None:
        async with serving(
            TCP, ScriptedHandler(), max_connections_per_source=2, max_pending_handshakes=1
        ) as server:
            # One connection that never says HELLO holds the only handshake slot.
            _reader, writer = await raw_connect(server.address)
            try:
                await until(lambda: server.connections_open == 1)
                with pytest.raises(NodeUnavailableError):
                    await TCP.connect(server.address, make_hello(CLUSTER), timeout=2)
                assert server.stats.rejected_pending == 1
            finally:
                await raw_close(writer)
            await until(lambda: server.connections_open == 0)
            async with connected(TCP, server.address), connected(TCP, server.address):
                # Two clients from 127.0.0.1: a third is refused at its HELLO...
                with pytest.raises(HandshakeError, match="max_connections_per_source"):
                    await TCP.connect(server.address, make_hello(CLUSTER), timeout=2)
                assert server.stats.rejected_source == 1
                # ... but a peer from the same host still gets in: clients never keep
                # a peer (a restarted node) out.
                hello = make_hello(CLUSTER, node_id="peer-1", address="127.0.0.1:9")
                peer = await TCP.connect(server.address, hello, timeout=2)
                assert await peer.request(Op.PING, None, 5) == "pong"
                await peer.close()

    run(main())


def test_a_client_that_does_not_read_its_answers_is_dropped(run: Runner[None]) -> None:
    async def main() -> None:
        limit = 4 << 20
        async with serving(TCP, ScriptedHandler(), max_output_buffer=limit) as server:
            reader, writer = await raw_connect(server.address)
            try:
                writer.write(HELLO_FRAME)
                await read_frame(reader)
                # 64 answers of 1 MiB asked for at once, and never read.
                writer.write(b"".join(encode_request(i, BIG, 1 << 20) for i in range(1, 65)))
                await until(lambda: server.stats.output_limit_closes == 1, timeout=10)
            finally:
                await raw_close(writer)
            await until(lambda: server.connections_open == 0)

    run(main())


def test_tcp_nodelay_on_both_sides(run: Runner[None]) -> None:
    async def main() -> None:
        async with (
            serving(TCP, ScriptedHandler()) as server,
            connected(TCP, server.address) as conn,
        ):
            assert conn._transport is not None
            sockets = [conn._transport.get_extra_info("socket")]
            sockets += [
                c._transport.get_extra_info("socket") for c in server._conns if c._transport
            ]
            assert len(sockets) == 2
            for sock in sockets:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    run(main())


def test_server_address_and_counters(run: Runner[None]) -> None:
    async def main() -> None:
        server = TcpServer(ScriptedHandler(), "127.0.0.1:0", ServerOptions(cluster=CLUSTER))
        assert server.address == "127.0.0.1:0"
        await server.start()
        try:
            assert server.address != "127.0.0.1:0"
            for _ in range(3):
                async with connected(TCP, server.address) as conn:
                    await conn.request(Op.PING, None, 5)
                    assert server.stats.connections_open == 1
            await until(lambda: server.connections_open == 0)
            stats = server.stats
            assert stats.connections_accepted == 3
            assert stats.frames_in == stats.frames_out == 6
        finally:
            await server.close()
        await server.close()  # idempotent

    run(main())
