"""Tests of the inline (synchronous) request path of the transports.

Covers ``SyncHandler.handle_sync`` (values, typed errors, ``NOT_SYNC``, ``Later``),
``max_inflight`` with requests pending as ``Later``\\ s, the client's ``send()`` and
``send_callback()``, and write coalescing: frames produced while a read is handled
go out in one write at the end of that read.

Every async test body runs on asyncio's default loop and on uvloop (the ``run``
fixture), and most of them on TCP and on the in-process transport (the ``transport``
fixture). Some tests drive the protocol classes over a recording fake transport, to
observe exactly when frames are written. Waits poll a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
from net_helpers import (
    CLUSTER,
    HELLO_FRAME,
    Runner,
    connected,
    serving,
    spin,
)

from hypercache.cluster.local import until
from hypercache.errors import (
    ConfigError,
    KeyTooLargeError,
    NodeUnavailableError,
    ProtocolError,
    QuorumError,
    RequestTimeoutError,
    ServerError,
)
from hypercache.net import (
    ClientConnection,
    Frame,
    FrameDecoder,
    Limits,
    MsgType,
    Op,
    PeerInfo,
    ServerOptions,
    Transport,
    encode_request,
    encode_response,
    make_hello,
)
from hypercache.net.server import ServerBase, ServerProtocol
from hypercache.net.transport import NOT_SYNC, Later

# Ops as the test handler interprets them.
SYNC = Op.GET  # handle_sync answers the payload at once
FAIL_SYNC = Op.DELETE  # handle_sync raises the error named by the payload
ASYNC = Op.SET  # handle_sync returns NOT_SYNC; handle answers ["async", payload]
HOLD = Op.TOPOLOGY  # a Later kept in handler.held, answered by the test
TIMED = Op.KEYS  # [delay, outcome]: a Later answered by loop.call_later(delay, ...)
EARLY = Op.PULL  # a Later answered (twice) before handle_sync returns it
FORWARD = Op.R_GET  # [op, payload]: a Later answered by the backend's answer to it
RELEASE = Op.R_PUT  # resolve every held Later with its payload * 10, answer how many


def make_error(name: str) -> Exception:
    if name == "quorum":
        return QuorumError(1, 2)
    if name == "config":
        return ConfigError("ttl", "must be positive")
    if name == "key":
        return KeyTooLargeError("key of 300 bytes")
    if name == "unavailable":
        return NodeUnavailableError("node-9 is stopping")
    return RuntimeError(f"{name} bug")


class SyncScriptedHandler:
    """A handler with a synchronous fast path whose ops exercise the transport."""

    def __init__(self) -> None:
        self.sync_calls = 0
        self.async_calls = 0
        self.held: list[tuple[Any, Later]] = []  # HOLD requests: (payload, Later)
        self.backend: ClientConnection | None = None  # where FORWARD sends to

    def hello_info(self, peer_hello: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def handle(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        self.async_calls += 1
        await asyncio.sleep(0)  # a real task: answered on a later iteration
        if op == ASYNC:
            return ["async", payload]
        raise ProtocolError(f"unknown op {op}")

    def handle_sync(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        self.sync_calls += 1
        if op == SYNC:
            return payload
        if op == FAIL_SYNC:
            raise make_error(payload)
        if op == HOLD:
            later = Later()
            self.held.append((payload, later))
            return later
        if op == TIMED:
            delay, outcome = payload
            later = Later()
            loop = asyncio.get_running_loop()
            if isinstance(outcome, str) and outcome.startswith("fail:"):
                loop.call_later(delay, later.reject, make_error(outcome[5:]))
            else:
                loop.call_later(delay, later.resolve, outcome)
            return later
        if op == EARLY:
            later = Later()
            later.resolve(payload)
            later.resolve("second answer")  # only the first counts
            later.reject(RuntimeError("late error"))
            return later
        if op == FORWARD:
            backend = self.backend
            assert backend is not None
            later = Later()

            def answered(value: Any, error: BaseException | None) -> None:
                if error is None:
                    later.resolve(["forwarded", value])
                else:
                    later.reject(error)

            backend.send_callback(payload[0], payload[1], 5, answered)
            return later
        if op == RELEASE:
            held, self.held = self.held, []
            for value, later in held:
                later.resolve(value * 10)
            return len(held)
        return NOT_SYNC


class Outcomes:
    """A ``send_callback`` callback that records every ``(value, error)`` it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, BaseException | None]] = []

    def __call__(self, value: Any, error: BaseException | None) -> None:
        self.calls.append((value, error))


class RecordingTransport(asyncio.Transport):
    """A transport that keeps what is written, for driving protocols by hand."""

    def __init__(self) -> None:
        super().__init__({"peername": ("10.0.0.9", 4242)})
        self.writes: list[bytes] = []
        self.reading = True
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0  # written at once

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading


def decode(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    decoder.feed(data)
    frames = list(decoder)
    assert decoder.buffered == 0
    return frames


@contextlib.contextmanager
def server_protocol(
    handler: SyncScriptedHandler, **options: Any
) -> Iterator[tuple[ServerProtocol, RecordingTransport]]:
    """A server connection over a recording transport (to call from a running loop)."""
    server = ServerBase(handler, ServerOptions(cluster=CLUSTER, node_id="server-1", **options))
    server._loop = asyncio.get_running_loop()
    server._closing = False
    proto = server._new_protocol()
    fake = RecordingTransport()
    proto.connection_made(fake)
    try:
        yield proto, fake
    finally:
        proto.connection_lost(None)


@contextlib.contextmanager
def client_protocol() -> Iterator[tuple[ClientConnection, RecordingTransport]]:
    """A client connection over a recording transport (to call from a running loop)."""
    conn = ClientConnection(asyncio.get_running_loop(), "backend:7000", Limits())
    fake = RecordingTransport()
    conn.connection_made(fake)
    try:
        yield conn, fake
    finally:
        conn.connection_lost(None)


# ============================================================================ handle_sync


def test_inline_answers_and_typed_errors(
    run: Runner[None], transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            assert await conn.request(SYNC, {"k": [1, b"v"]}, 5) == {"k": [1, b"v"]}
            assert await conn.request(SYNC, None, 5) is None  # None is an answer
            with pytest.raises(QuorumError) as quorum:
                await conn.request(FAIL_SYNC, "quorum", 5)
            assert (quorum.value.acks, quorum.value.required) == (1, 2)
            with pytest.raises(ConfigError) as config:
                await conn.request(FAIL_SYNC, "config", 5)
            assert config.value.field == "ttl"
            with pytest.raises(KeyTooLargeError, match="key of 300 bytes"):
                await conn.request(FAIL_SYNC, "key", 5)
            with pytest.raises(NodeUnavailableError, match="node-9 is stopping"):
                await conn.request(FAIL_SYNC, "unavailable", 5)
            with (
                caplog.at_level(logging.ERROR, logger="hypercache.net"),
                pytest.raises(ServerError, match="RuntimeError: sync bug"),
            ):
                await conn.request(FAIL_SYNC, "sync", 5)
            assert "handler failed on op" in caplog.text  # an untyped error is logged
            # the connection survived all of it, and nothing went through a task
            assert await conn.request(SYNC, 7, 5) == 7
            assert handler.sync_calls == 8 and handler.async_calls == 0
            assert conn.pending == 0
            stats = server.stats
            assert stats.in_flight == 0 and stats.protocol_errors == 0
            assert stats.frames_in == stats.frames_out == 9  # HELLO + 8 requests

    run(main())


def test_not_sync_falls_back_to_handle(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            assert await conn.request(ASYNC, b"p", 5) == ["async", b"p"]
            assert (handler.sync_calls, handler.async_calls) == (1, 1)
            with pytest.raises(ProtocolError, match="unknown op 99"):  # typed, from handle
                await conn.request(99, None, 5)
            assert (handler.sync_calls, handler.async_calls) == (2, 2)
            # sync and async answers interleave on one connection
            results = await asyncio.gather(
                *(conn.request(ASYNC if i % 2 else SYNC, i, 5) for i in range(20))
            )
            assert results == [["async", i] if i % 2 else i for i in range(20)]
            assert (handler.sync_calls, handler.async_calls) == (22, 12)

    run(main())


# ============================================================================ Later


def test_later_answered_from_a_callback(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            assert await conn.request(TIMED, [0.01, {"v": 1}], 5) == {"v": 1}
            assert await conn.request(EARLY, "first", 5) == "first"  # answered before bind
            # a held Later counts as in flight until answered
            fut = conn.send(HOLD, 4, 5)
            await until(lambda: len(handler.held) == 1)
            await spin()
            assert not fut.done()
            assert server.stats.in_flight == 1
            value, later = handler.held[0]
            assert not later.done
            later.resolve(value * 10)
            assert later.done
            later.resolve("ignored")  # only the first answer counts
            later.reject(RuntimeError("ignored"))
            assert await fut == 40
            await spin()
            assert conn.stats.late_responses == 0  # one answer only
            assert server.stats.in_flight == 0
            assert handler.async_calls == 0

    run(main())


def test_later_failed_with_an_error(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            with pytest.raises(QuorumError) as info:
                await conn.request(TIMED, [0.01, "fail:quorum"], 5)
            assert (info.value.acks, info.value.required) == (1, 2)
            with pytest.raises(ConfigError, match="ttl"):
                await conn.request(TIMED, [0, "fail:config"], 5)
            with pytest.raises(ServerError, match="RuntimeError: later bug"):
                await conn.request(TIMED, [0, "fail:later"], 5)
            # rejected by the test, then a later resolve is ignored
            fut = conn.send(HOLD, 1, 5)
            await until(lambda: len(handler.held) == 1)
            later = handler.held[0][1]
            later.reject(NodeUnavailableError("owner down"))
            later.resolve("ignored")
            with pytest.raises(NodeUnavailableError, match="owner down"):
                await fut
            assert not conn.closed  # a typed error, not a lost connection
            assert await conn.request(SYNC, "still fine", 5) == "still fine"
            assert server.stats.in_flight == 0

    run(main())


def test_inflight_cap_counts_laters(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        async with (
            serving(transport, handler, max_inflight=4) as server,
            connected(transport, server.address) as conn,
        ):
            futs = [conn.send(HOLD, i, 10) for i in range(10)]
            await until(lambda: len(handler.held) == 4)
            await spin()
            assert len(handler.held) == 4  # the other 6 wait unread
            stats = server.stats
            assert stats.inflight_pauses == 1 and stats.in_flight == 4

            def answer(count: int) -> None:
                for _ in range(count):
                    value, later = handler.held.pop(0)
                    later.resolve(value * 10)

            answer(1)  # 3 in flight: above the resume mark (2), still paused
            await until(lambda: futs[0].done())
            await spin()
            assert len(handler.held) == 3
            assert server.stats.in_flight == 3
            answer(1)  # 2 in flight: reading resumes and takes 2 more, up to the cap
            await until(lambda: len(handler.held) == 4)
            await spin()
            assert len(handler.held) == 4
            stats = server.stats
            assert stats.inflight_pauses == 2 and stats.in_flight == 4
            assert [value for value, _ in handler.held] == [2, 3, 4, 5]
            while handler.held or not all(f.done() for f in futs):
                await until(lambda: bool(handler.held) or all(f.done() for f in futs))
                answer(len(handler.held))
            assert [await f for f in futs] == [i * 10 for i in range(10)]
            # reading goes on once they are done
            assert await conn.request(SYNC, "after", 5) == "after"
            assert server.stats.in_flight == 0

    run(main())


def test_later_released_from_another_connection(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        async with (
            serving(transport, handler, max_inflight=2) as server,
            connected(transport, server.address) as holder,
            connected(transport, server.address) as releaser,
        ):
            futs = [holder.send(HOLD, i, 10) for i in range(6)]
            await until(lambda: len(handler.held) == 2)
            await spin()
            assert len(handler.held) == 2 and server.stats.inflight_pauses == 1
            released = 0
            # Each RELEASE answers the held Laters from inside the other connection's
            # read: the holder resumes reading from there and takes the next two.
            while not all(f.done() for f in futs):
                await until(lambda: bool(handler.held) or all(f.done() for f in futs))
                released += await releaser.request(RELEASE, None, 5)
            assert released == 6
            assert [await f for f in futs] == [i * 10 for i in range(6)]
            assert server.stats.inflight_pauses >= 2
            assert await holder.request(SYNC, 1, 5) == 1

    run(main())


# ============================================================================ send / send_callback


def test_send_future_results_errors_and_timeout(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            ok = conn.send(SYNC, "a", 5)
            slow = conn.send(ASYNC, "b", 5)
            failed = conn.send(FAIL_SYNC, "quorum", 5)
            assert isinstance(ok, asyncio.Future) and not ok.done()  # no answer yet
            assert conn.pending == 3
            assert await ok == "a"
            assert await slow == ["async", "b"]
            with pytest.raises(QuorumError):
                await failed
            assert conn.pending == 0
            # a deadline
            timed_out = conn.send(HOLD, 1, 0.05)
            with pytest.raises(RequestTimeoutError, match=r"no answer within 0\.05s"):
                await timed_out
            assert conn.stats.timeouts == 1 and conn.pending == 0
            assert not conn.closed
            assert await conn.send(SYNC, "usable", 5) == "usable"
            assert len(handler.held) == 1
            handler.held[0][1].resolve("late")  # the late answer is dropped
            await until(lambda: conn.stats.late_responses == 1)
            # no deadline
            forever = conn.send(HOLD, 2, math.inf)
            await until(lambda: len(handler.held) == 2)
            handler.held[1][1].resolve("eventually")
            assert await forever == "eventually"
            # payloads that cannot go out raise at once
            with pytest.raises(ProtocolError):
                conn.send(SYNC, {1, 2}, 5)
            assert conn.pending == 0
            assert await conn.send(SYNC, "end", 5) == "end"

    run(main())


def test_send_callback_results_errors_and_timeout(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            ok, later_ok, failed, untyped = Outcomes(), Outcomes(), Outcomes(), Outcomes()
            conn.send_callback(SYNC, "a", 5, ok)
            conn.send_callback(TIMED, [0.01, "b"], 5, later_ok)
            conn.send_callback(FAIL_SYNC, "quorum", 5, failed)
            conn.send_callback(FAIL_SYNC, "cb", 5, untyped)
            assert conn.pending == 4 and not ok.calls  # nothing runs before the answer
            await until(lambda: all(o.calls for o in (ok, later_ok, failed, untyped)))
            assert ok.calls == [("a", None)]
            assert later_ok.calls == [("b", None)]
            [(value, error)] = failed.calls
            assert value is None and isinstance(error, QuorumError) and error.required == 2
            [(value, error)] = untyped.calls
            assert isinstance(error, ServerError) and "RuntimeError: cb bug" in str(error)
            assert conn.pending == 0
            # a deadline: the callback gets RequestTimeoutError once, the late answer
            # is dropped and the connection stays usable
            timed_out = Outcomes()
            conn.send_callback(HOLD, 1, 0.05, timed_out)
            await until(lambda: bool(timed_out.calls))
            [(value, error)] = timed_out.calls
            assert value is None and isinstance(error, RequestTimeoutError)
            assert conn.stats.timeouts == 1 and conn.pending == 0
            assert await conn.request(SYNC, "usable", 5) == "usable"
            handler.held[0][1].resolve("late")
            await until(lambda: conn.stats.late_responses == 1)
            assert len(timed_out.calls) == 1
            with pytest.raises(ProtocolError):
                conn.send_callback(SYNC, {1, 2}, 5, Outcomes())
            assert conn.pending == 0

    run(main())


def test_callback_that_raises_is_logged_and_dropped(
    run: Runner[None], transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with (
            serving(transport, SyncScriptedHandler()) as server,
            connected(transport, server.address) as conn,
        ):
            calls: list[Any] = []

            def broken(value: Any, error: BaseException | None) -> None:
                calls.append(value)
                raise RuntimeError("callback bug")

            after = Outcomes()
            with caplog.at_level(logging.ERROR, logger="hypercache.net"):
                conn.send_callback(SYNC, 1, 5, broken)
                conn.send_callback(SYNC, 2, 5, after)  # answered in the same read
                await until(lambda: bool(after.calls))
            assert calls == [1] and after.calls == [(2, None)]
            assert "request callback failed" in caplog.text
            assert not conn.closed
            assert await conn.request(SYNC, 3, 5) == 3

    run(main())


def test_server_close_fails_pending_sends(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        server = transport.create_server(handler, "127.0.0.1:0", ServerOptions(cluster=CLUSTER))
        await server.start()
        conn = await transport.connect(server.address, make_hello(CLUSTER), timeout=5)
        assert isinstance(conn, ClientConnection)
        try:
            futs = [conn.send(HOLD, i, 10) for i in range(3)]
            outcomes = [Outcomes() for _ in range(3)]
            for i, outcome in enumerate(outcomes):
                conn.send_callback(HOLD, 10 + i, 10, outcome)
            await until(lambda: len(handler.held) == 6)
            assert server.stats.in_flight == 6
            await server.close()
            for fut in futs:
                with pytest.raises(NodeUnavailableError):
                    await fut
            await until(lambda: all(o.calls for o in outcomes))
            for outcome in outcomes:
                [(value, error)] = outcome.calls
                assert value is None and isinstance(error, NodeUnavailableError)
            assert conn.closed and conn.pending == 0
            # answers given after the close go nowhere
            for _, later in handler.held:
                later.resolve("too late")
            await spin()
            with pytest.raises(NodeUnavailableError):
                conn.send(SYNC, 1, 5)
            never = Outcomes()
            with pytest.raises(NodeUnavailableError):
                conn.send_callback(SYNC, 1, 5, never)
            await spin()
            assert not never.calls  # the callback is not called when send raises
            assert all(len(o.calls) == 1 for o in outcomes)
        finally:
            await conn.close()
            await server.close()

    run(main())


def test_client_close_fails_pending_callbacks(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        async with serving(transport, handler) as server:
            conn = await transport.connect(server.address, make_hello(CLUSTER), timeout=5)
            assert isinstance(conn, ClientConnection)
            outcome = Outcomes()
            conn.send_callback(HOLD, 1, 10, outcome)
            fut = conn.send(HOLD, 2, 10)
            await until(lambda: len(handler.held) == 2)
            await conn.close()
            [(value, error)] = outcome.calls
            assert value is None and isinstance(error, NodeUnavailableError)
            with pytest.raises(NodeUnavailableError):
                await fut
            await until(lambda: server.connections_open == 0)
            assert server.stats.in_flight == 0  # the server forgot the Laters
            for _, later in handler.held:
                later.resolve("nobody listens")
            await spin()
            assert len(outcome.calls) == 1

    run(main())


def test_forwarding_through_send_callback(run: Runner[None], transport: Transport) -> None:
    """The coordinator's pattern: a Later answered from a callback of another request."""

    async def main() -> None:
        front, back = SyncScriptedHandler(), SyncScriptedHandler()
        async with (
            serving(transport, back) as back_server,
            connected(transport, back_server.address) as to_back,
            serving(transport, front) as front_server,
            connected(transport, front_server.address) as conn,
        ):
            front.backend = to_back
            assert await conn.request(FORWARD, [SYNC, "v"], 5) == ["forwarded", "v"]
            assert await conn.request(FORWARD, [ASYNC, "w"], 5) == ["forwarded", ["async", "w"]]
            with pytest.raises(QuorumError):
                await conn.request(FORWARD, [FAIL_SYNC, "quorum"], 5)
            results = await asyncio.gather(
                *(conn.request(FORWARD, [SYNC, i], 5) for i in range(50))
            )
            assert results == [["forwarded", i] for i in range(50)]
            assert front.async_calls == 0 and back.async_calls == 1
            assert front_server.stats.in_flight == 0 and to_back.pending == 0

    run(main())


# ============================================================================ coalescing


def test_pipelined_inline_answers_are_coalesced(run: Runner[None], transport: Transport) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        async with (
            serving(transport, handler) as server,
            connected(transport, server.address) as conn,
        ):
            assert await conn.request(SYNC, "warm-up", 5) == "warm-up"
            client_before, server_before = conn.stats, server.stats
            client_writes, client_frames = client_before.writes, client_before.frames_out
            server_writes, server_frames = server_before.writes, server_before.frames_out
            futs = [conn.send(SYNC, i, 5) for i in range(200)]
            assert [await f for f in futs] == list(range(200))
            client, total = conn.stats, server.stats
            assert client.frames_out - client_frames == 200
            assert client.writes - client_writes == 1  # one write from the client
            assert total.frames_out - server_frames == 200
            writes = total.writes - server_writes
            # one write per read that brought requests, not one per answer
            assert 1 <= writes <= 20, writes
            assert handler.async_calls == 0

    run(main())


def test_inline_answers_go_out_in_one_write_at_the_end_of_the_read(run: Runner[None]) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        with server_protocol(handler) as (proto, fake):
            requests = b"".join(encode_request(i, SYNC, i) for i in range(2, 202))
            blob = HELLO_FRAME + requests + encode_request(202, ASYNC, "x")
            proto.data_received(blob)
            # before the loop runs again: one write with the HELLO answer and all 200
            # inline answers; the NOT_SYNC request is in a task
            assert len(fake.writes) == 1
            frames = decode(fake.writes[0])
            assert [f.request_id for f in frames] == list(range(1, 202))
            assert [f.payload for f in frames[1:]] == list(range(2, 202))
            assert all(f.type == MsgType.RESPONSE for f in frames)
            assert proto.in_flight == 1
            await until(lambda: len(fake.writes) == 2)
            [frame] = decode(fake.writes[1])
            assert (frame.request_id, frame.payload) == (202, ["async", "x"])
            assert proto.stats.writes == 2 and proto.stats.frames_out == 202
            # a typed error answered inline goes out at the end of its read too
            proto.data_received(encode_request(300, FAIL_SYNC, "quorum"))
            assert len(fake.writes) == 3
            [frame] = decode(fake.writes[2])
            assert frame.type == MsgType.ERROR and frame.request_id == 300
            assert frame.payload[0] == QuorumError.code

    run(main())


def test_inline_later_pauses_reading_over_a_recording_transport(run: Runner[None]) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        with server_protocol(handler, max_inflight=2) as (proto, fake):
            blob = HELLO_FRAME + b"".join(encode_request(i, HOLD, i) for i in range(2, 7))
            proto.data_received(blob)
            assert not fake.reading and proto.stats.inflight_pauses == 1
            assert [value for value, _ in handler.held] == [2, 3]
            assert proto.in_flight == 2
            handler.held[0][1].resolve("two")  # 1 in flight: the resume mark
            # reading resumed at once and took the frames already buffered
            assert [value for value, _ in handler.held] == [2, 3, 4]
            handler.held[1][1].resolve("three")
            assert [value for value, _ in handler.held] == [2, 3, 4, 5]
            assert not fake.reading and proto.stats.inflight_pauses == 3
            for _, later in handler.held[2:4]:
                later.resolve("rest")  # 4: takes 6, at the cap again; 5: reading again
            assert [value for value, _ in handler.held] == [2, 3, 4, 5, 6]
            assert fake.reading and proto.stats.inflight_pauses == 4
            assert proto.in_flight == 1
            handler.held[4][1].resolve("rest")
            assert fake.reading and proto.in_flight == 0
            # the answers given outside a read go out together on the next iteration
            assert len(fake.writes) == 1
            await until(lambda: len(fake.writes) == 2)
            answers = decode(fake.writes[1])
            assert [(f.request_id, f.payload) for f in answers] == [
                (2, "two"),
                (3, "three"),
                (4, "rest"),
                (5, "rest"),
                (6, "rest"),
            ]

    run(main())


def test_callback_answers_flush_at_the_end_of_the_client_read(run: Runner[None]) -> None:
    """A Later answered from the read that brings a backend's answer goes out when
    that read ends, without another loop iteration (the coordinator's quorum path)."""

    async def main() -> None:
        handler = SyncScriptedHandler()
        with (
            client_protocol() as (backend, backend_wire),
            server_protocol(handler) as (proto, client_wire),
        ):
            handler.backend = backend
            blob = HELLO_FRAME + b"".join(encode_request(i, FORWARD, [SYNC, i]) for i in (2, 3))
            proto.data_received(blob)
            # the server's read wrote the HELLO answer, and the requests its handler
            # sent to the backend, each connection in one write
            assert len(client_wire.writes) == 1
            assert len(backend_wire.writes) == 1
            sent = decode(backend_wire.writes[0])
            assert [(f.op, f.payload) for f in sent] == [(SYNC, 2), (SYNC, 3)]
            assert proto.in_flight == 2 and backend.pending == 2
            # the backend answers both in one read: both answers go out in one write
            answers = b"".join(encode_response(f.request_id, f.op, f.payload) for f in sent)
            backend.data_received(answers)
            assert len(client_wire.writes) == 2
            frames = decode(client_wire.writes[1])
            assert [(f.request_id, f.payload) for f in frames] == [
                (2, ["forwarded", 2]),
                (3, ["forwarded", 3]),
            ]
            assert proto.in_flight == 0 and backend.pending == 0

    run(main())


def test_requests_sent_from_a_callback_flush_at_the_end_of_the_read(run: Runner[None]) -> None:
    async def main() -> None:
        with client_protocol() as (conn, wire):
            second = Outcomes()

            def first(value: Any, error: BaseException | None) -> None:
                assert error is None
                conn.send_callback(SYNC, value + 1, math.inf, second)  # a fan-out

            conn.send_callback(SYNC, 1, math.inf, first)
            assert not wire.writes  # outside a read: flushed on the next iteration
            await until(lambda: len(wire.writes) == 1)
            [request] = decode(wire.writes[0])
            conn.data_received(encode_response(request.request_id, SYNC, 1))
            assert len(wire.writes) == 2  # written when the read ended
            [follow_up] = decode(wire.writes[1])
            assert (follow_up.op, follow_up.payload) == (SYNC, 2)
            conn.data_received(encode_response(follow_up.request_id, SYNC, "done"))
            assert second.calls == [("done", None)]
            assert conn.pending == 0

    run(main())


# ============================================================================ write pressure


def test_send_waiting_for_room_gets_its_answer(run: Runner[None], transport: Transport) -> None:
    """send()/send_callback() while the client's write buffer is full wait in a task."""

    async def main() -> None:
        handler = SyncScriptedHandler()
        async with (
            serving(transport, handler, max_inflight=1) as server,
            connected(transport, server.address) as conn,
        ):
            first = conn.send(HOLD, 1, 30)  # the server stops reading now
            await until(lambda: len(handler.held) == 1)
            value = b"v" * (1 << 20)
            echoes = [conn.send(SYNC, value, 30) for _ in range(40)]
            await until(lambda: conn.stats.write_pauses >= 1)
            assert conn._write_paused
            outcome = Outcomes()
            conn.send_callback(HOLD, 2, 30, outcome)  # waits for room in a task
            waiting = conn.send(SYNC, "w", 30)  # likewise
            handler.held[0][1].resolve("first")
            assert await first == "first"
            assert [await f for f in echoes] == [value] * 40
            # HOLD 2 is held (the server stops reading again), "w" is sent, unread
            await until(lambda: len(handler.held) == 2)
            await spin()
            assert handler.held[1][0] == 2
            assert not outcome.calls and not waiting.done()
            handler.held[1][1].resolve("second")
            assert await waiting == "w"
            await until(lambda: bool(outcome.calls))
            assert outcome.calls == [("second", None)]
            await until(lambda: conn.pending == 0)
            assert server.stats.in_flight == 0

    run(main())


def test_pending_counts_a_callback_that_waited_for_room_once(run: Runner[None]) -> None:
    """``pending`` is the number of requests waiting for an answer: a send_callback()
    that had to wait for room must not count twice once it has been sent."""

    async def main() -> None:
        with client_protocol() as (conn, wire):
            conn.pause_writing()  # the transport's buffer is above its high mark
            outcome = Outcomes()
            conn.send_callback(SYNC, "x", math.inf, outcome)
            await spin()
            assert not wire.writes and conn.pending == 1
            conn.resume_writing()
            await until(lambda: len(wire.writes) == 1)
            [request] = decode(wire.writes[0])
            assert not outcome.calls
            # one request sent, no answer yet
            assert conn.pending == 1, (
                f"pending={conn.pending}: _pending={len(conn._pending)} "
                f"_callbacks={len(conn._callbacks)} _waiting={len(conn._waiting)}"
            )
            conn.data_received(encode_response(request.request_id, SYNC, "answer"))
            await until(lambda: bool(outcome.calls))
            assert outcome.calls == [("answer", None)]
            await until(lambda: conn.pending == 0)

    run(main())


def test_inline_answers_before_a_protocol_error_are_written(run: Runner[None]) -> None:
    async def main() -> None:
        handler = SyncScriptedHandler()
        with server_protocol(handler) as (proto, fake):
            garbage = b"\x00\x00\x00\x03\xc1\xc1\xc1"  # not msgpack
            proto.data_received(HELLO_FRAME + encode_request(2, SYNC, "ok") + garbage)
            assert fake.closing and proto.stats.protocol_errors == 1
            frames = [f for data in fake.writes for f in decode(data)]
            assert [(f.request_id, f.payload) for f in frames[1:]] == [(2, "ok")]

    run(main())
