"""Tests of the blocking connection against a real TCP server run in a thread.

The server thread runs asyncio's default loop or uvloop (parametrized); the test
thread speaks to it over a blocking socket. Waits poll a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from hypercache._core.hlc import wall_clock_ms
from hypercache.cluster.local import wait_for
from hypercache.errors import (
    ConfigError,
    FrameTooLargeError,
    HandshakeError,
    NodeUnavailableError,
    ProtocolError,
    QuorumError,
    RequestTimeoutError,
    ServerError,
)
from hypercache.net import (
    BlockingConnection,
    FrameDecoder,
    FrameEncoder,
    Limits,
    Op,
    PeerInfo,
    ServerOptions,
    TcpServer,
    make_hello,
)
from hypercache.net.blocking import pipeline_all

CLUSTER = "blocking-test"
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
ECHO, SHUFFLE, FAIL, BLOCK = Op.GET, Op.SET, Op.DELETE, Op.TOPOLOGY


class Handler:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = 0
        self.completed: list[int] = []

    def hello_info(self, peer_hello: dict[str, Any]) -> dict[str, Any]:
        return {"hello": "from server"}

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
                raise QuorumError(2, 3)
            raise RuntimeError("boom")
        if op == BLOCK:
            self.entered += 1
            await self.gate.wait()
            return "released"
        raise ProtocolError(f"unknown op {op}")


class ServerThread:
    """A TcpServer on its own event loop in a thread."""

    def __init__(self, loop_name: str, **options: Any) -> None:
        self.loop_name = loop_name
        self.options = ServerOptions(cluster=CLUSTER, node_id="srv", **options)
        self.handler = Handler()
        self.address = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: TcpServer | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="server", daemon=True)
        self._error: BaseException | None = None

    def _main(self) -> None:
        try:
            with asyncio.Runner(loop_factory=LOOPS[self.loop_name]) as runner:
                runner.run(self._serve())
        except BaseException as exc:  # reported by stop()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.server = TcpServer(self.handler, "127.0.0.1:0", self.options)
        await self.server.start()
        self.address = self.server.address
        self._ready.set()
        await self._stop.wait()
        await self.server.close()

    def start(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "server thread did not start"
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Callable[[], Any]) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn)

    def close_server(self) -> None:
        """Close the server (not the thread), waiting until it is closed."""
        assert self.loop is not None and self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "server thread did not stop"
        if self._error is not None:
            raise self._error


@pytest.fixture(params=list(LOOPS))
def server(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    thread = ServerThread(request.param).start()
    try:
        yield thread
    finally:
        thread.stop()


@contextlib.contextmanager
def connection(address: str, timeout: float = 5.0, **hello: Any) -> Iterator[BlockingConnection]:
    limits = hello.pop("limits", None)
    conn = BlockingConnection(address, make_hello(CLUSTER, **hello), limits, timeout)
    try:
        yield conn
    finally:
        conn.close()


# ============================================================================ requests


def test_request_round_trips_and_errors(server: ServerThread) -> None:
    with connection(server.address) as conn:
        hello = dict(conn.peer_hello)
        assert hello.pop("features") == frozenset({"trace", "zstd"})
        assert abs(hello.pop("clock_ms") - wall_clock_ms()) < 60_000
        assert hello == {
            "version": 1,
            "cluster": CLUSTER,
            "node_id": "srv",
            "info": {"hello": "from server"},
        }
        assert conn.request(Op.PING, None) == "pong"
        payload = {"key": b"k", "value": b"\x00\xff" * 1000, "n": [1, 2.5, None, True]}
        assert conn.request(ECHO, payload) == payload
        with pytest.raises(QuorumError) as info:
            conn.request(FAIL, "quorum")
        assert (info.value.acks, info.value.required) == (2, 3)
        with pytest.raises(ServerError, match="RuntimeError: boom"):
            conn.request(FAIL, "other")
        with pytest.raises(ProtocolError, match="unknown op"):
            conn.request(99, None)
        assert conn.request(Op.PING, None, timeout=1) == "pong"
        assert conn.stats.frames_out == conn.stats.frames_in == 7


def test_requests_carry_a_deadline_and_a_late_one_is_not_started(server: ServerThread) -> None:
    with connection(server.address) as conn:
        offset = conn._clock_offset
        assert offset is not None and abs(offset) < 60_000
        assert conn.request(SHUFFLE, [1, 0], 5) == 1
        conn._clock_offset = offset - 10_000  # as if it had waited 10 s in a paused server
        with pytest.raises(RequestTimeoutError, match="after its deadline"):
            conn.request(SHUFFLE, [2, 0], 5)
        assert conn.pipeline([(SHUFFLE, [3, 0])], 5)[0].__class__ is RequestTimeoutError
        assert server.handler.completed == [1]
        assert server.server is not None and server.server.stats.expired == 2


@pytest.mark.parametrize(
    ("hello", "match"),
    [
        ({"cluster": "another"}, "cluster"),
        ({"version": 2}, "version"),
        ({"auth": "nope"}, "authentication"),
    ],
)
def test_handshake_mismatch(hello: dict[str, Any], match: str) -> None:
    thread = ServerThread("asyncio", auth="token").start()
    try:
        with pytest.raises(HandshakeError, match=match):
            BlockingConnection(thread.address, {**make_hello(CLUSTER, auth="token"), **hello})
        with connection(thread.address, auth="token") as conn:
            assert conn.request(Op.PING, None) == "pong"
    finally:
        thread.stop()


def test_hello_must_name_a_cluster(server: ServerThread) -> None:
    with pytest.raises(ConfigError):
        BlockingConnection(server.address, {"node_id": None})


def test_connect_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(NodeUnavailableError):
        BlockingConnection(address, make_hello(CLUSTER), timeout=2)


def test_oversized_or_unencodable_request_is_not_sent(server: ServerThread) -> None:
    limits = Limits(max_frame=1000, max_key=10, max_value=100)
    with connection(server.address, limits=limits) as conn:
        with pytest.raises(FrameTooLargeError):
            conn.request(ECHO, b"x" * 2000)
        with pytest.raises(ProtocolError):
            conn.pipeline([(Op.PING, None), (ECHO, object())])
        assert conn.stats.frames_out == 1  # the HELLO only
        assert conn.request(ECHO, b"x" * 900) == b"x" * 900


# ============================================================================ pipelining


def test_pipeline_1000_out_of_order(server: ServerThread) -> None:
    rng = random.Random(7)
    with connection(server.address) as conn:
        requests = [(SHUFFLE, [i, rng.randrange(20)]) for i in range(1000)]
        writes_before = conn.stats.writes
        assert conn.pipeline(requests) == list(range(1000))
        assert conn.stats.writes == writes_before + 1  # one sendall for the batch
        completed = server.handler.completed
        assert completed != sorted(completed) and sorted(completed) == list(range(1000))


def test_pipeline_mixes_results_and_errors(server: ServerThread) -> None:
    with connection(server.address) as conn:
        results = conn.pipeline(
            [(Op.PING, None), (FAIL, "quorum"), (ECHO, b"v"), (FAIL, "x"), (77, None)]
        )
        assert results[0] == "pong" and results[2] == b"v"
        assert isinstance(results[1], QuorumError)
        assert isinstance(results[3], ServerError)
        assert isinstance(results[4], ProtocolError)
        assert conn.pipeline([]) == []
        assert conn.request(Op.PING, None) == "pong"


# ============================================================================ timeouts, failures


def test_timeout_keeps_connection_usable(server: ServerThread) -> None:
    with connection(server.address) as conn:
        with pytest.raises(RequestTimeoutError):
            conn.request(BLOCK, None, timeout=0.05)
        assert conn.stats.timeouts == 1
        assert conn.request(Op.PING, None) == "pong"
        server.call(server.handler.gate.set)  # the late answer is skipped
        wait_for(lambda: conn.request(Op.PING, None) == "pong" and conn.stats.late_responses > 0)
        assert conn.stats.late_responses == 1


def test_pipeline_partial_timeout(server: ServerThread) -> None:
    with connection(server.address) as conn:
        results = conn.pipeline([(Op.PING, None), (BLOCK, None), (ECHO, 3)], timeout=0.1)
        assert results[0] == "pong" and results[2] == 3
        assert isinstance(results[1], RequestTimeoutError)
        assert not conn.closed
        assert conn.request(ECHO, 4) == 4


def test_server_close_fails_pending_request(server: ServerThread) -> None:
    with connection(server.address) as conn, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(conn.pipeline, [(Op.PING, None), (BLOCK, None)], 10)
        wait_for(lambda: server.handler.entered == 1)
        server.close_server()
        result = pending.result(10)
        assert result[0] == "pong"
        assert isinstance(result[1], NodeUnavailableError)
        assert conn.closed
        with pytest.raises(NodeUnavailableError):
            conn.request(Op.PING, None)
    with pytest.raises(NodeUnavailableError):
        BlockingConnection(server.address, make_hello(CLUSTER), timeout=2)


def test_close_is_idempotent_and_context_manager_closes(server: ServerThread) -> None:
    with BlockingConnection(server.address, make_hello(CLUSTER)) as conn:
        assert not conn.closed
    assert conn.closed
    conn.close()
    with pytest.raises(NodeUnavailableError):
        conn.request(Op.PING, None)


# ============================================================================ misbehaving servers


class RawServer:
    """A listening socket whose accepted connection is driven by ``script``."""

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._script = script
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            self._script(conn)

    def close(self) -> None:
        self._thread.join(10)
        self.listener.close()


def read_frame(sock: socket.socket) -> Any:
    decoder = FrameDecoder()
    while True:
        for frame in decoder:
            return frame
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        decoder.feed(data)


HELLO_ANSWER = {"version": 1, "cluster": CLUSTER, "node_id": "raw", "info": {}}


def test_garbage_from_server_closes_the_connection() -> None:
    def script(sock: socket.socket) -> None:
        hello = read_frame(sock)
        sock.sendall(FrameEncoder().encode_response(hello.request_id, Op.HELLO, HELLO_ANSWER))
        read_frame(sock)
        sock.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        with contextlib.suppress(OSError):
            sock.recv(1)  # wait for the client to hang up

    raw = RawServer(script)
    try:
        with connection(raw.address) as conn:
            with pytest.raises(NodeUnavailableError, match="protocol error"):
                conn.request(Op.PING, None)
            assert conn.closed and conn.stats.protocol_errors == 1
    finally:
        raw.close()


def test_no_hello_answer_is_node_unavailable() -> None:
    def script(sock: socket.socket) -> None:
        read_frame(sock)
        with contextlib.suppress(OSError):
            sock.recv(1)  # never answer; wait for the client to give up

    raw = RawServer(script)
    try:
        with pytest.raises(NodeUnavailableError, match="no HELLO answer"):
            BlockingConnection(raw.address, make_hello(CLUSTER), timeout=0.1)
    finally:
        raw.close()


def test_server_hangs_up_mid_request() -> None:
    def script(sock: socket.socket) -> None:
        hello = read_frame(sock)
        sock.sendall(FrameEncoder().encode_response(hello.request_id, Op.HELLO, HELLO_ANSWER))
        read_frame(sock)

    raw = RawServer(script)
    try:
        with connection(raw.address) as conn:
            with pytest.raises(NodeUnavailableError, match="closed by the server"):
                conn.request(Op.PING, None)
            assert conn.closed
    finally:
        raw.close()


# ======================================================================= pipeline_all


@pytest.fixture
def two_servers() -> Iterator[tuple[ServerThread, ServerThread]]:
    first, second = ServerThread("uvloop").start(), ServerThread("uvloop").start()
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def test_pipeline_all_sends_every_group_before_waiting(
    two_servers: tuple[ServerThread, ServerThread],
) -> None:
    # Each server's BLOCK request is released only once BOTH servers hold theirs: a
    # caller that waited for one group's answers before sending the next would see
    # both time out.
    a, b = two_servers

    def release_when_both_entered() -> None:
        wait_for(lambda: a.handler.entered == 1 and b.handler.entered == 1)
        a.call(a.handler.gate.set)
        b.call(b.handler.gate.set)

    with (
        connection(a.address) as ca,
        connection(b.address) as cb,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        watcher = pool.submit(release_when_both_entered)
        results = pipeline_all(
            [(ca, [(BLOCK, None), (ECHO, "a")]), (cb, [(ECHO, "b"), (BLOCK, None)])], 5.0
        )
        watcher.result(5)
        assert results == [["released", "a"], ["b", "released"]]
        assert ca.stats.frames_in == cb.stats.frames_in == 3  # HELLO + two answers


def test_pipeline_all_times_out_one_group_and_answers_the_other(
    two_servers: tuple[ServerThread, ServerThread],
) -> None:
    a, b = two_servers
    with connection(a.address) as ca, connection(b.address) as cb:
        slow, fast = pipeline_all([(ca, [(BLOCK, None)]), (cb, [(ECHO, 1), (FAIL, "x")])], 0.1)
        assert len(slow) == 1 and isinstance(slow[0], RequestTimeoutError)
        assert fast[0] == 1 and isinstance(fast[1], ServerError)
        assert ca.stats.timeouts == 1 and cb.stats.timeouts == 0
        assert not ca.closed and ca.request(ECHO, 2) == 2  # still usable


def test_pipeline_all_a_lost_connection_fails_only_its_group(server: ServerThread) -> None:
    def script(sock: socket.socket) -> None:
        hello = read_frame(sock)
        sock.sendall(FrameEncoder().encode_response(hello.request_id, Op.HELLO, HELLO_ANSWER))
        read_frame(sock)  # then hang up without answering

    raw = RawServer(script)
    try:
        with connection(raw.address) as lost, connection(server.address) as ok:
            dead, alive = pipeline_all([(lost, [(Op.PING, None)]), (ok, [(ECHO, 7)])])
            assert isinstance(dead[0], NodeUnavailableError) and lost.closed
            assert alive == [7] and not ok.closed
            with pytest.raises(NodeUnavailableError):  # a closed connection refuses
                pipeline_all([(lost, [(Op.PING, None)])])
    finally:
        raw.close()


def test_pipeline_all_of_nothing(server: ServerThread) -> None:
    assert pipeline_all([]) == []
    with connection(server.address) as conn:
        assert pipeline_all([(conn, [])]) == [[]]
        assert conn.request(ECHO, 1) == 1
