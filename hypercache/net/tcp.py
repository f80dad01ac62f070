"""TCP transport: ``asyncio.Protocol`` classes on whatever loop runs (uvloop in production).

One connection carries many requests at once. The client matches answers to
requests by request id with one future or callback per request (no task per
request). The server answers a request inline, from the read that brought it, when
its handler has a synchronous fast path for it (``handle_sync``, possibly answering
later through a :class:`~hypercache.net.transport.Later`), and otherwise runs it in a
task of its own; answers go out in order of completion.

Writes are coalesced. Frames produced while a read is handled (a ``data_received``
of any connection of the loop: answers, requests sent to other nodes by callbacks
run from it) are flushed when that read is done, so a burst costs one syscall per
connection and no extra loop iteration. Frames written from elsewhere (tasks, timer
or future callbacks) wait for one ``call_soon`` flush per connection and iteration.

Flow control, server side: a connection stops reading while its transport asks us
to stop writing (the peer does not read its answers) or while ``max_inflight``
requests are being handled; frames already received stay in the decoder and are
taken once the pressure is gone. Client side: ``request`` waits while the
transport's write buffer is above its high mark.

The protocol classes do not touch sockets themselves, so :mod:`hypercache.net.inproc`
runs the very same classes over an in-memory transport pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from hypercache._core.hlc import wall_clock_ms
from hypercache.errors import (
    FrameTooLargeError,
    HandshakeError,
    HyperCacheError,
    NoAnswerError,
    NodeUnavailableError,
    ProtocolError,
    RequestTimeoutError,
    ServerError,
    error_from_wire,
)
from hypercache.net.busypoll import check_window, poller
from hypercache.net.protocol import (
    HELLO_MAX_FRAME,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameEncoder,
    Limits,
    MsgType,
    Op,
    clock_offset_ms,
    frame_header,
    prepare_hello,
    request_deadline,
    validate_hello,
    validate_hello_answer,
)
from hypercache.net.transport import (
    DEFAULT_CONNECT_TIMEOUT,
    NOT_SYNC,
    Handler,
    Later,
    NetStats,
    Outcome,
    PeerInfo,
    ServerOptions,
    format_address,
    parse_address,
)

__all__ = [
    "TCP",
    "ClientConnection",
    "ServerBase",
    "ServerProtocol",
    "TcpServer",
    "TcpTransport",
    "connect",
    "start_server",
]

_log = logging.getLogger("hypercache.net")

_REQUEST: Final = int(MsgType.REQUEST)
_RESPONSE: Final = int(MsgType.RESPONSE)
_ERROR: Final = int(MsgType.ERROR)
_HELLO: Final = int(Op.HELLO)

# Request ids wrap here so that they always encode as msgpack uint32 or smaller.
_MAX_REQUEST_ID: Final = 0xFFFFFFFF
# A body at least this big is written on its own rather than copied into the batch.
_LARGE_WRITE: Final = 256 * 1024
# Request deadlines are rounded up to ticks of 1/_TICKS_PER_SECOND s.
_TICKS_PER_SECOND: Final = 200
_NO_DEADLINE: Final = math.inf
# How long a client's close() lets buffered writes drain before aborting.
_CLIENT_CLOSE_GRACE: Final = 5.0
# Period of a server's check of slow and idle connections, seconds.
_SWEEP_INTERVAL: Final = 1.0
# The slowest a frame may arrive past frame_timeout: one second per MiB.
_FRAME_RATE: Final = 1024 * 1024
# How a server counts a connection (ServerProtocol.kind).
_HANDSHAKING: Final = 0
_CLIENT: Final = 1
_PEER: Final = 2


class _Expired(RequestTimeoutError):
    """Set on a wait for room in the write buffer when its deadline passes (rewritten
    with details). A request's own deadline sets the final RequestTimeoutError."""


class _ReadScope:
    """Per event loop: how deep we are in ``data_received`` calls, and which
    connections queued frames meanwhile (flushed when the outermost one returns)."""

    __slots__ = ("depth", "dirty")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list[_FramedProtocol] = []

    def leave(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.dirty:
            # A flush may not add to the list (depth is 0 now: later frames schedule
            # their own flush), so one pass empties it.
            dirty, self.dirty = self.dirty, []
            for proto in dirty:
                proto._flush()


_scopes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _ReadScope] = (
    weakref.WeakKeyDictionary()
)


def _scope(loop: asyncio.AbstractEventLoop) -> _ReadScope:
    scope = _scopes.get(loop)
    if scope is None:
        scope = _scopes[loop] = _ReadScope()
    return scope


def _count(counts: dict[str, int], key: str, delta: int) -> None:
    left = counts.get(key, 0) + delta
    if left:
        counts[key] = left
    else:
        del counts[key]


def _remote_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def _remote_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_address(str(peer[0]), int(peer[1]))
    return str(peer)


def _no_poke(window_ns: int) -> None:
    """What a connection without a busy-poll window calls: nothing."""


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):  # a platform without TCP_NODELAY
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _FramedProtocol(asyncio.Protocol):
    """What both ends share: decoder, encoder, coalesced writes, counters."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        self._loop = loop
        self._scope = _scope(loop)
        self._limits = limits
        self._decoder = FrameDecoder(limits.max_frame)
        self._encoder = FrameEncoder(limits.max_frame)
        self._transport: asyncio.Transport | None = None
        # Frames waiting for the end of the current read or loop iteration. The
        # bytearray is handed to transport.write() and replaced, never mutated after:
        # a transport may keep a reference to it (uvloop does) instead of copying.
        self._wbuf = bytearray()
        self._flush_scheduled = False  # a call_soon(_flush) is pending
        self._dirty = False  # in the read scope's list
        self._write_paused = False
        self._closing = False
        self._lost: asyncio.Future[None] = loop.create_future()
        # Busy polling after writes (hypercache.net.busypoll): the window asked for,
        # and the one in force in ns (0 unless the transport is a kernel socket).
        self._busy_poll = 0.0
        self._busy_ns = 0
        self._poke: Callable[[int], None] = _no_poke  # the loop poller's, once armed
        #: counters of this connection
        self.stats = NetStats()

    @property
    def busy_poll(self) -> float:
        """Seconds the loop stays awake after this connection writes; 0 = off.

        Only a connection over a kernel socket polls: over the in-process transport
        the setting is kept and does nothing.

        :raises ValueError: not a number of seconds in 0..``MAX_BUSY_POLL``.
        """
        return self._busy_poll

    @busy_poll.setter
    def busy_poll(self, seconds: float) -> None:
        try:
            self._busy_poll = check_window(seconds)
        except ValueError as exc:
            raise ValueError(f"busy_poll {exc}") from None
        self._arm_busy_poll()

    def _arm_busy_poll(self) -> None:
        transport = self._transport
        on_socket = transport is not None and transport.get_extra_info("socket") is not None
        self._busy_ns = round(self._busy_poll * 1e9) if on_socket else 0
        if self._busy_ns:
            self._poke = poller(self._loop).poke

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements the interface without subclassing
        # asyncio.Transport, so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)
        _set_nodelay(transport)
        if self._busy_poll:
            self._arm_busy_poll()

    def pause_writing(self) -> None:
        self._write_paused = True
        self.stats.write_pauses += 1

    def resume_writing(self) -> None:
        self._write_paused = False

    # -- writing

    def _send(self, body: bytes) -> None:
        """Queue one frame (body without header) for the end of this read or iteration."""
        self.stats.frames_out += 1
        size = len(body)
        buf = self._wbuf
        buf += frame_header(size)
        if size >= _LARGE_WRITE:
            # Don't copy a big body into the batch: write what is queued (ending
            # with this frame's header), then the body itself.
            self._flush()
            self._write(body)
            return
        buf += body
        if len(buf) >= _LARGE_WRITE:
            # Many answers of one read: hand them to the transport now, so that a
            # peer that does not read pauses our reading (pause_writing) before the
            # rest of its requests are answered into memory.
            self._flush()
            return
        scope = self._scope
        if scope.depth:
            if not self._dirty:
                self._dirty = True
                scope.dirty.append(self)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        # Called by the read scope, by call_soon, or directly (close, large body);
        # a flush that finds the buffer empty (done by another of them) is a no-op.
        self._flush_scheduled = False
        self._dirty = False
        buf = self._wbuf
        if buf:
            self._wbuf = bytearray()
            self._write(buf)

    def _write(self, data: bytes | bytearray) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the peer is gone: nobody to answer
        stats = self.stats
        stats.bytes_out += len(data)
        stats.writes += 1
        transport.write(data)
        if self._busy_ns:
            # An answer, or the peer's next request, is due soon: don't sleep.
            self._poke(self._busy_ns)

    def abort(self) -> None:
        """Drop the connection at once, without flushing."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


# ============================================================================ server


class ServerBase:
    """Bookkeeping shared by the TCP and in-process servers: connections and counters."""

    address: str

    def __init__(self, handler: Handler, options: ServerOptions) -> None:
        self.handler = handler
        self.options = options
        self._conns: set[ServerProtocol] = set()
        self._totals = NetStats()  # closed connections + server-level counters
        self._closing = True  # until start()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Connection caps (see ServerOptions): handshakes under way and handshaken
        # clients, in all and per remote host. Peers are counted apart, and a
        # handshake is not a client yet: on one host, clients that fill their cap
        # never keep a peer (a restarted node) from getting back in.
        self._handshaking = 0
        self._clients = 0
        self._peers = 0
        self._host_handshaking: dict[str, int] = {}
        self._host_clients: dict[str, int] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def stats(self) -> NetStats:
        """A snapshot of the counters of all connections, live and closed."""
        total = NetStats()
        total.add(self._totals)
        for conn in self._conns:
            total.add(conn.stats)
            total.in_flight += conn.in_flight
        total.connections_open = len(self._conns)
        return total

    @property
    def connections_open(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        """Start accepting connections (each transport's server implements it)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop accepting, close every connection and wait for them."""
        raise NotImplementedError

    def _new_protocol(self) -> ServerProtocol:
        assert self._loop is not None
        return ServerProtocol(self, self._loop)

    @property
    def peers_open(self) -> int:
        """Open connections of authenticated (or, in an open cluster, loopback) peers."""
        return self._peers

    def _accept(self, conn: ServerProtocol) -> str | None:
        """Take a new connection in as handshaking; the reason to refuse it, if any."""
        options = self.options
        totals = self._totals
        host = conn.host
        why = None
        if self._closing:
            why = "server closing"
        elif self._handshaking >= options.max_pending_handshakes:
            totals.rejected_pending += 1
            why = f"{self._handshaking} handshakes under way (max_pending_handshakes)"
        elif self._host_handshaking.get(host, 0) >= options.max_connections_per_source:
            totals.rejected_source += 1
            why = f"{host} has {self._host_handshaking[host]} handshakes under way"
        if why is not None:
            totals.connections_rejected += 1
            return why
        self._conns.add(conn)
        self._handshaking += 1
        _count(self._host_handshaking, host, 1)
        totals.connections_accepted += 1
        if self._sweeper is None and self._loop is not None:
            self._sweeper = self._loop.call_later(_SWEEP_INTERVAL, self._sweep)
        return None

    def _admit(self, conn: ServerProtocol, *, peer: bool) -> str | None:
        """A connection's HELLO passed: count it as a client or a peer from now on.
        Return the reason to refuse it instead (too many clients)."""
        host = conn.host
        if not peer:
            totals = self._totals
            why = None
            if self._clients >= self.options.max_connections:
                why = f"{self._clients} client connections open (max_connections)"
            elif self._host_clients.get(host, 0) >= self.options.max_connections_per_source:
                totals.rejected_source += 1
                why = f"{host} has {self._host_clients[host]} (max_connections_per_source)"
            if why is not None:
                totals.rejected_clients += 1
                totals.connections_rejected += 1
                return why
        self._handshaking -= 1
        _count(self._host_handshaking, host, -1)
        if peer:
            self._peers += 1
            conn.kind = _PEER
        else:
            self._clients += 1
            _count(self._host_clients, host, 1)
            conn.kind = _CLIENT
        return None

    def _release(self, conn: ServerProtocol) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
            self._totals.add(conn.stats)
            kind = conn.kind
            if kind == _PEER:
                self._peers -= 1
            elif kind == _CLIENT:
                self._clients -= 1
                _count(self._host_clients, conn.host, -1)
            else:
                self._handshaking -= 1
                _count(self._host_handshaking, conn.host, -1)

    def _sweep(self) -> None:
        # Once a second: the slow and the idle connections (see ServerProtocol.check).
        # One timer per server, rather than per connection or per read: a read costs
        # nothing extra, a connection one check a second.
        self._sweeper = None
        if self._closing or not self._conns or self._loop is None:
            return
        now = self._loop.time()
        for conn in list(self._conns):
            conn.check(now)
        self._sweeper = self._loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def _stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _close_connections(self) -> None:
        self._stop_sweeping()
        conns = list(self._conns)
        if not conns:
            return
        for conn in conns:
            conn.close()
        grace = self.options.close_grace
        tasks = [task for conn in conns for task in conn._tasks.values()]
        lost = [conn._lost for conn in conns]
        _, pending = await asyncio.wait([*lost, *tasks], timeout=grace)
        if pending:
            for conn in conns:
                if not conn._lost.done():
                    conn.abort()
            stuck = [t for t in tasks if not t.done()]
            if stuck:
                _log.warning("%d request handlers ignored cancellation on close", len(stuck))
            await asyncio.wait([f for f in lost if not f.done()] or lost)


class ServerProtocol(_FramedProtocol):
    """Server side of one connection: handshake, dispatch, answers, flow control."""

    def __init__(self, server: ServerBase, loop: asyncio.AbstractEventLoop) -> None:
        options = server.options
        super().__init__(loop, options.limits)
        self._server = server
        self._handler = server.handler
        self._options = options
        self._max_inflight = options.max_inflight
        self._resume_at = options.max_inflight // 2
        self._busy_poll = options.busy_poll
        # An unauthenticated peer gets a small frame limit until its HELLO passes.
        self._decoder.max_frame = min(HELLO_MAX_FRAME, options.limits.max_frame)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        # The handler's synchronous fast path, if it has one (see SyncHandler).
        self._sync: Callable[[PeerInfo, int, Any], Any] | None = getattr(
            server.handler, "handle_sync", None
        )
        # Ids of requests handled inline whose answer comes later (a Later).
        self._later: set[int] = set()
        self._reading_paused = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.remote = "?"
        #: the remote host (what the per-source cap counts)
        self.host = "?"
        #: handshaking, client or peer (how the server counts the connection)
        self.kind = _HANDSHAKING
        #: what the peer said in its HELLO; None until the handshake is done.
        self.peer: PeerInfo | None = None
        # What check() saw last time: frames received then, and since when the
        # connection has been idle or in the middle of one frame.
        self._seen_frames = -1
        self._quiet_since = 0.0
        self._partial_frames = -1
        self._partial_since = 0.0

    @property
    def in_flight(self) -> int:
        """Requests received and not answered yet."""
        return len(self._tasks) + len(self._later)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.remote = _remote_name(transport)
        self.host = _remote_host(transport)
        why = self._server._accept(self)
        if why is not None:
            _log.warning("refusing connection from %s: %s", self.remote, why)
            self.abort()
            return
        self._handshake_timer = self._loop.call_later(
            self._options.handshake_timeout, self._on_handshake_timeout
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        for task in self._tasks.values():
            task.cancel()
        self._later.clear()  # their answers will find the transport closed
        self._server._release(self)
        if not self._lost.done():
            self._lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_in += len(data)
        try:
            self._decoder.feed(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._process()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._update_flow()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._update_flow()

    # -- closing

    def close(self) -> None:
        """Flush what is queued, close, and cancel the handlers still running."""
        if self._closing:
            return
        self._closing = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        for task in self._tasks.values():
            task.cancel()
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def check(self, now: float) -> None:
        """Close the connection if it is too slow or idle (the server calls this once
        a second): a frame begun more than ``frame_timeout`` (+1 s per MiB of its
        length) ago and still incomplete; a client that sent nothing for
        ``idle_timeout`` with nothing in flight."""
        if self._closing or self.peer is None:
            return  # the handshake has a deadline of its own
        frames = self.stats.frames_in
        decoder = self._decoder
        if decoder.buffered and not self._reading_paused:
            # What is buffered while reading goes on is an incomplete frame.
            if self._partial_frames != frames:
                self._partial_frames = frames
                self._partial_since = now
            else:
                size = max(decoder.incomplete, 0)
                limit = self._options.frame_timeout + size / _FRAME_RATE
                if now - self._partial_since > limit:
                    self.stats.frame_timeouts += 1
                    _log.warning(
                        "closing connection from %s: a frame of %d bytes took more than %.0f s",
                        self.remote,
                        size,
                        limit,
                    )
                    self.close()
                    return
        else:
            self._partial_frames = -1
        idle = self._options.idle_timeout
        if idle is None or self.kind != _CLIENT:
            return
        if frames != self._seen_frames or self.in_flight:
            self._seen_frames = frames
            self._quiet_since = now
        elif now - self._quiet_since > idle:
            self.stats.idle_closes += 1
            _log.info("closing connection from %s: idle for %.0f s", self.remote, idle)
            self.close()

    def _write(self, data: bytes | bytearray) -> None:
        super()._write(data)
        transport = self._transport
        if (
            transport is not None
            and transport.get_write_buffer_size() > self._options.max_output_buffer
            and not self._closing
        ):
            # The peer does not read its answers: reading stopped long ago (at the
            # transport's high-water mark), but requests already in flight kept
            # adding answers. Drop the connection, and with it their memory.
            self.stats.output_limit_closes += 1
            _log.warning(
                "closing connection from %s: %d bytes of answers unread (max_output_buffer)",
                self.remote,
                transport.get_write_buffer_size(),
            )
            self.abort()

    def _protocol_error(self, exc: ProtocolError) -> None:
        self.stats.protocol_errors += 1
        _log.warning("closing connection from %s: %s", self.remote, exc)
        self.close()

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self.peer is None and not self._closing:
            self.stats.handshake_failures += 1
            _log.warning("closing connection from %s: no HELLO in time", self.remote)
            self.close()

    # -- reading

    def _process(self) -> None:
        """Take frames from the decoder until it is empty or we must stop reading.

        Answers given meanwhile (inline handling) go out in one write at the end.
        """
        stats = self.stats
        scope = self._scope
        scope.depth += 1
        try:
            for msg_type, request_id, op, payload, deadline in self._decoder:
                stats.frames_in += 1
                if self.peer is None:
                    self._on_hello(msg_type, request_id, op, payload)
                else:
                    self._dispatch(msg_type, request_id, op, payload, deadline)
                if self._reading_paused or self._closing:
                    break
        except ProtocolError as exc:
            self._protocol_error(exc)
        finally:
            scope.leave()

    def _update_flow(self) -> None:
        """Pause reading under pressure; resume (with hysteresis) once it is gone."""
        transport = self._transport
        if self._closing or transport is None:
            return
        in_flight = len(self._tasks) + len(self._later)
        if self._reading_paused:
            if not self._write_paused and in_flight <= self._resume_at:
                self._reading_paused = False
                transport.resume_reading()
                self._process()  # frames received before the pause
        elif self._write_paused or in_flight >= self._max_inflight:
            self._reading_paused = True
            transport.pause_reading()
            if not self._write_paused:
                self.stats.inflight_pauses += 1

    def _on_hello(self, msg_type: int, request_id: int, op: int, payload: Any) -> None:
        if msg_type != _REQUEST or op != _HELLO:
            self.stats.handshake_failures += 1
            raise ProtocolError("the first frame must be a HELLO request")
        options = self._options
        encoder = self._encoder
        try:
            hello = validate_hello(payload, cluster=options.cluster, auth=options.auth)
            node_id = hello["node_id"]
            proof = None
            if node_id is not None:
                # A claim to be a peer: believed only with a proof of the cluster
                # secret (or, in an open cluster, from loopback).
                proof = options.peer_auth.check_hello(
                    options.cluster,
                    node_id,
                    hello["address"],
                    payload.get("proof"),
                    remote_host=self.host,
                    server_node_id=options.node_id,
                )
            why = self._server._admit(self, peer=node_id is not None)
            if why is not None:
                raise HandshakeError(f"too many connections: {why}")
            hello["authenticated"] = proof is not None
            info = self._handler.hello_info(hello)
            if type(info) is not dict:
                raise ServerError(f"hello_info returned {type(info).__name__}, not a dict")
            answer = {
                "version": PROTOCOL_VERSION,
                "cluster": options.cluster,
                "node_id": options.node_id,
                "info": info,
                # The peer's requests then carry deadlines on this clock.
                "clock_ms": wall_clock_ms(),
            }
            if proof is not None:
                answer["proof"] = proof
            body = encoder.encode_body(_RESPONSE, request_id, _HELLO, answer)
        except Exception as exc:
            self.stats.handshake_failures += 1
            if isinstance(exc, HyperCacheError):
                _log.warning("refusing HELLO from %s: %s", self.remote, exc)
            else:
                _log.error("hello_info failed for %s", self.remote, exc_info=exc)
            self._send(encoder.encode_error_body(request_id, _HELLO, exc))
            self.close()
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.peer = PeerInfo(
            remote=self.remote,
            version=hello["version"],
            cluster=hello["cluster"],
            node_id=hello["node_id"],
            address=hello["address"],
            info=hello["info"],
            authenticated=proof is not None,
        )
        self._decoder.max_frame = options.limits.max_frame
        self._send(body)

    def _dispatch(
        self, msg_type: int, request_id: int, op: int, payload: Any, deadline: int
    ) -> None:
        if msg_type != _REQUEST:
            raise ProtocolError(f"a client sent a {MsgType(msg_type).name} frame")
        tasks = self._tasks
        later = self._later
        if op == _HELLO or request_id in tasks or request_id in later:
            why = "HELLO after the handshake" if op == _HELLO else "request id already in flight"
            self._send(self._encoder.encode_error_body(request_id, op, ProtocolError(why)))
            return
        if deadline and deadline < wall_clock_ms():
            # Its sender gave up on it (this node was paused, or the request queued
            # too long): carrying it out now, a write above all, could overwrite
            # what the sender wrote since through another node.
            self.stats.expired += 1
            late = RequestTimeoutError(f"op {op} arrived after its deadline; not carried out")
            self._send(self._encoder.encode_error_body(request_id, op, late))
            return
        peer = self.peer
        assert peer is not None
        sync = self._sync
        if sync is not None:
            try:
                result = sync(peer, op, payload)
            except Exception as exc:
                self._answer(request_id, op, None, exc)
                return
            if result is not NOT_SYNC:
                if type(result) is Later:
                    later.add(request_id)
                    result.bind(lambda value, exc: self._answer_later(request_id, op, value, exc))
                    if request_id in later and len(tasks) + len(later) >= self._max_inflight:
                        self._update_flow()
                else:
                    self._answer(request_id, op, result, None)
                return
        tasks[request_id] = self._loop.create_task(self._run(peer, request_id, op, payload))
        if len(tasks) + len(later) >= self._max_inflight:
            self._update_flow()

    def _answer(self, request_id: int, op: int, result: Any, exc: BaseException | None) -> None:
        """Queue the answer to one request: ``result``, or the error ``exc``."""
        encoder = self._encoder
        if exc is not None:
            if not isinstance(exc, HyperCacheError):
                _log.error("handler failed on op %s from %s", op, self.remote, exc_info=exc)
            body = encoder.encode_error_body(request_id, op, exc)
        else:
            try:
                body = encoder.encode_body(_RESPONSE, request_id, op, result)
            except FrameTooLargeError as error:
                body = encoder.encode_error_body(request_id, op, error)
            except ProtocolError as error:
                wrapped = ServerError(f"response to op {op} cannot be encoded: {error}")
                body = encoder.encode_error_body(request_id, op, wrapped)
        self._send(body)

    def _answer_later(
        self, request_id: int, op: int, result: Any, exc: BaseException | None
    ) -> None:
        later = self._later
        if request_id not in later:
            return  # the connection is gone
        later.discard(request_id)
        self._answer(request_id, op, result, exc)
        if self._reading_paused:
            self._update_flow()

    async def _run(self, peer: PeerInfo, request_id: int, op: int, payload: Any) -> None:
        result: Any = None
        error: Exception | None = None
        try:
            result = await self._handler.handle(peer, op, payload)
        except Exception as exc:
            error = exc
        finally:
            del self._tasks[request_id]
        self._answer(request_id, op, result, error)
        if self._reading_paused:
            self._update_flow()


class TcpServer(ServerBase):
    """A TCP server for ``handler`` on ``address`` (``"host:port"``, port 0 picks one).

    After :meth:`start`, :attr:`address` holds the bound port. Use an IP address
    as host with port 0 (a name resolving to several addresses would bind each to
    a different port).
    """

    def __init__(self, handler: Handler, address: str, options: ServerOptions) -> None:
        super().__init__(handler, options)
        self._host, self._port = parse_address(address)
        self.address = address
        self._listener: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("server already started")
        loop = self._loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._new_protocol,
            self._host,
            self._port,
            backlog=self.options.backlog,
            reuse_address=True,
        )
        self._closing = False
        port = self._listener.sockets[0].getsockname()[1]
        self.address = format_address(self._host, port)

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


# ============================================================================ client


class ClientConnection(_FramedProtocol):
    """Client side of one multiplexed connection; made by :func:`connect`.

    Many coroutines may call :meth:`request` concurrently; each waits on its own
    future, resolved when the answer with its request id arrives. Code running in
    callbacks sends with :meth:`send` (a future) or :meth:`send_callback` (a callback
    run from the read that brings the answer: no task, no extra loop iteration).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, address: str, limits: Limits) -> None:
        super().__init__(loop, limits)
        #: the address this connection was made to
        self.address = address
        #: the server's HELLO answer (``version``, ``cluster``, ``node_id``, ``info``)
        self.peer_hello: dict[str, Any] = {}
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._callbacks: dict[int, Outcome] = {}
        self._next_id = 1
        self._drain_waiters: list[asyncio.Future[None]] = []
        # tick -> (request id, op, timeout) of the requests due then
        self._deadlines: dict[int, list[tuple[int, int, float]]] = {}
        # send()/send_callback() calls waiting for room in the write buffer
        self._waiting: set[asyncio.Task[Any]] = set()
        self._lost_reason = "connection closed"
        # ms from our wall clock to the server's (protocol.clock_offset_ms), known
        # after the handshake; requests carry a deadline on the server's clock.
        self._clock_offset: int | None = None

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def pending(self) -> int:
        """Requests waiting for an answer, each counted once (a ``send_callback``
        still waiting for room in the write buffer included)."""
        return len(self._pending) + len(self._callbacks) + len(self._waiting)

    # -- asyncio.Protocol

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if exc is not None:
            self._lost_reason = f"connection lost: {exc}"
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(NodeUnavailableError(f"{self.address}: {self._lost_reason}"))
        callbacks, self._callbacks = self._callbacks, {}
        if callbacks:
            scope = self._scope
            scope.depth += 1
            try:
                for callback in callbacks.values():
                    error = NodeUnavailableError(f"{self.address}: {self._lost_reason}")
                    self._deliver(callback, None, error)
            finally:
                scope.leave()
        self._wake_writers()
        if not self._lost.done():
            self._lost.set_result(None)

    def eof_received(self) -> bool | None:
        self._lost_reason = "connection closed by the server"
        return None

    def data_received(self, data: bytes) -> None:
        stats = self.stats
        stats.bytes_in += len(data)
        pending = self._pending
        callbacks = self._callbacks
        # Frames that callbacks write (answers, requests to other nodes) go out in
        # one write per connection once this read is handled.
        scope = self._scope
        scope.depth += 1
        try:
            decoder = self._decoder
            decoder.feed(data)
            for msg_type, request_id, _, payload, _ in decoder:
                stats.frames_in += 1
                if msg_type == _REQUEST:
                    raise ProtocolError("the server sent a REQUEST frame")
                fut = pending.pop(request_id, None)
                if fut is not None:
                    if fut.done():
                        stats.late_responses += 1  # cancelled meanwhile
                    elif msg_type == _RESPONSE:
                        fut.set_result(payload)
                    else:
                        fut.set_exception(error_from_wire(payload))
                    continue
                callback = callbacks.pop(request_id, None)
                if callback is None:
                    stats.late_responses += 1  # timed out or cancelled meanwhile
                elif msg_type == _RESPONSE:
                    self._deliver(callback, payload, None)
                else:
                    self._deliver(callback, None, error_from_wire(payload))
        except ProtocolError as exc:
            stats.protocol_errors += 1
            _log.warning("closing connection to %s: %s", self.address, exc)
            self._lost_reason = f"protocol error: {exc}"
            self._start_close()
        finally:
            scope.leave()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._wake_writers()

    # -- API

    async def request(self, op: int, payload: Any, timeout: float) -> Any:
        """Send one request and return the answer's payload.

        ``timeout`` is in seconds (``math.inf`` for none); it is honoured with a
        granularity of 5 ms (never early).

        :raises HyperCacheError: the error the server answered with.
        :raises RequestTimeoutError: no answer within ``timeout`` seconds; the
            connection stays usable and a late answer is dropped.
        :raises NodeUnavailableError: the connection is closed or was lost.
        :raises ProtocolError: ``payload`` cannot be encoded (nothing is sent).
        :raises FrameTooLargeError: the request is over ``max_frame`` (nothing is sent).
        """
        if self._closing:
            raise NodeUnavailableError(f"{self.address}: {self._lost_reason}")
        if self._write_paused:
            loop = self._loop
            deadline = loop.time() + timeout
            await self._wait_writable(op, timeout)
            timeout = max(deadline - loop.time(), 0.0)
        request_id = self._encode_and_send(op, payload, timeout)
        fut = self._pending[request_id] = self._loop.create_future()
        try:
            return await fut
        finally:
            self._pending.pop(request_id, None)

    def send(self, op: int, payload: Any, timeout: float) -> asyncio.Future[Any]:
        """Send one request now, without a task; the future gets the answer.

        The future fails as :meth:`request` would raise; cancelling it drops the
        answer. While the write buffer is above its high mark the request waits for
        room in a task (the future returned is then that task).

        :raises NodeUnavailableError: the connection is closed.
        :raises ProtocolError: ``payload`` cannot be encoded (nothing is sent).
        :raises FrameTooLargeError: the request is over ``max_frame`` (nothing is sent).
        """
        if self._closing:
            raise NodeUnavailableError(f"{self.address}: {self._lost_reason}")
        if self._write_paused:
            return self._loop.create_task(self.request(op, payload, timeout))
        request_id = self._encode_and_send(op, payload, timeout)
        fut = self._pending[request_id] = self._loop.create_future()
        return fut

    def send_callback(self, op: int, payload: Any, timeout: float, callback: Outcome) -> None:
        """Send one request now, without a task nor a future.

        ``callback(answer, error)`` runs exactly once: ``error`` is None on success,
        else what :meth:`request` would raise. It runs from the read that brings the
        answer (frames it writes go out at the end of that read), from the deadline
        timer, or when the connection is lost; it must not block, and what it raises
        is logged and dropped. While the write buffer is above its high mark the
        request waits for room in a task, and its errors all go to ``callback``.

        :raises NodeUnavailableError: the connection is closed (``callback`` not called).
        :raises ProtocolError: ``payload`` cannot be encoded (nothing is sent).
        :raises FrameTooLargeError: the request is over ``max_frame`` (nothing is sent).
        """
        if self._closing:
            raise NodeUnavailableError(f"{self.address}: {self._lost_reason}")
        if self._write_paused:
            task = self._loop.create_task(self._request_then(op, payload, timeout, callback))
            self._waiting.add(task)
            task.add_done_callback(self._waiting.discard)
            return
        request_id = self._encode_and_send(op, payload, timeout)
        self._callbacks[request_id] = callback

    async def close(self) -> None:
        """Close the connection and wait until it is closed.

        Requests still pending fail with :class:`NodeUnavailableError`.
        """
        if self._transport is None:
            self._closing = True
            return
        self._start_close()
        lost = self._lost
        if not lost.done():
            try:
                async with asyncio.timeout(_CLIENT_CLOSE_GRACE):
                    await asyncio.shield(lost)
            except TimeoutError:
                self.abort()
                await asyncio.shield(lost)

    # -- internals

    def _start_close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def _encode_and_send(self, op: int, payload: Any, timeout: float) -> int:
        """Encode and queue one request, arm its deadline; return its request id.

        The caller registers the request's future or callback under that id before
        the loop runs again.
        """
        request_id = self._next_id
        self._next_id = request_id + 1 if request_id < _MAX_REQUEST_ID else 1
        offset = self._clock_offset
        deadline = 0 if offset is None else request_deadline(offset, timeout)
        self._send(self._encoder.encode_body(_REQUEST, request_id, op, payload, deadline))
        if timeout != _NO_DEADLINE:
            # Arm the deadline in its tick bucket (see _expire_tick).
            loop = self._loop
            tick = int((loop.time() + timeout) * _TICKS_PER_SECOND) + 1
            bucket = self._deadlines.get(tick)
            if bucket is None:
                self._deadlines[tick] = [(request_id, op, timeout)]
                loop.call_at(tick / _TICKS_PER_SECOND, self._expire_tick, tick)
            else:
                bucket.append((request_id, op, timeout))
        return request_id

    @staticmethod
    def _deliver(callback: Outcome, value: Any, error: BaseException | None) -> None:
        try:
            callback(value, error)
        except Exception:
            _log.exception("request callback failed")

    async def _request_then(self, op: int, payload: Any, timeout: float, callback: Outcome) -> None:
        # Waits for room in the write buffer, then sends like send_callback: from
        # then on the request counts in ``_callbacks``, so it leaves ``_waiting``
        # (``pending`` counts each request once).
        task = asyncio.current_task()
        try:
            loop = self._loop
            deadline = loop.time() + timeout
            if self._write_paused:  # room may have come back before this task ran
                await self._wait_writable(op, timeout)
            if self._closing:
                raise NodeUnavailableError(f"{self.address}: {self._lost_reason}")
            request_id = self._encode_and_send(op, payload, max(deadline - loop.time(), 0.0))
        except asyncio.CancelledError:
            error = NodeUnavailableError(f"{self.address}: request cancelled")
            self._deliver(callback, None, error)
            raise
        except Exception as exc:
            self._deliver(callback, None, exc)
            return
        if task is not None:
            self._waiting.discard(task)
        self._callbacks[request_id] = callback

    def _expire_tick(self, tick: int) -> None:
        # Deadlines are kept per tick rather than one timer per request: arming and
        # cancelling a loop timer costs about as much as the rest of a request, while
        # appending an id to the tick's list is nearly free. A request that completed
        # meanwhile is simply no longer pending. Timeouts fire up to one tick late,
        # never early.
        due = self._deadlines.pop(tick, ())
        if not due:
            return
        pending = self._pending
        callbacks = self._callbacks
        stats = self.stats
        scope = self._scope
        scope.depth += 1
        try:
            for request_id, op, timeout in due:
                fut = pending.pop(request_id, None)
                if fut is not None:
                    if not fut.done():
                        stats.timeouts += 1
                        fut.set_exception(self._timeout_error(op, timeout))
                    continue
                callback = callbacks.pop(request_id, None)
                if callback is not None:
                    stats.timeouts += 1
                    self._deliver(callback, None, self._timeout_error(op, timeout))
        finally:
            scope.leave()

    def _timeout_error(self, op: int, timeout: float) -> NoAnswerError:
        return NoAnswerError(f"{self.address}: op {op} got no answer within {timeout}s")

    async def _wait_writable(self, op: int, timeout: float) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(fut)
        timer = None
        if timeout != _NO_DEADLINE:
            timer = self._loop.call_later(timeout, self._expire_waiter, fut)
        try:
            await fut
        except _Expired:
            raise NoAnswerError(
                f"{self.address}: op {op} could not be sent within {timeout}s"
            ) from None
        finally:
            if timer is not None:
                timer.cancel()
            if fut in self._drain_waiters:
                self._drain_waiters.remove(fut)
        if self._closing:
            raise NodeUnavailableError(f"{self.address}: {self._lost_reason}")

    def _expire_waiter(self, fut: asyncio.Future[None]) -> None:
        if not fut.done():
            self.stats.timeouts += 1
            fut.set_exception(_Expired())

    def _wake_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _handshake(self, payload: dict[str, Any], timeout: float) -> None:
        """Send the HELLO (prepared by :func:`prepare_hello`) and check the answer."""
        try:
            answer = await self.request(_HELLO, payload, timeout)
            self.peer_hello = validate_hello_answer(answer, cluster=payload["cluster"])
            self._clock_offset = clock_offset_ms(self.peer_hello, wall_clock_ms())
        except BaseException as exc:
            self.abort()
            if not isinstance(exc, asyncio.CancelledError):
                await asyncio.shield(self._lost)
            if isinstance(exc, RequestTimeoutError):
                raise NodeUnavailableError(
                    f"{self.address}: no HELLO answer within {timeout}s"
                ) from None
            raise


async def connect(
    address: str,
    hello: dict[str, Any],
    limits: Limits | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> ClientConnection:
    """Connect to ``address`` (``"host:port"``) over TCP and handshake with ``hello``.

    ``hello`` is the HELLO payload (see :func:`~hypercache.net.protocol.make_hello`);
    ``version`` is filled in when missing. ``timeout`` covers connecting and the
    handshake.

    :raises NodeUnavailableError: cannot connect, or no HELLO answer within ``timeout``.
    :raises HandshakeError: the server refused the HELLO, or answered for another
        cluster or protocol version.
    """
    host, port = parse_address(address)
    payload = prepare_hello(hello)
    loop = asyncio.get_running_loop()
    conn = ClientConnection(loop, address, limits if limits is not None else Limits())
    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: conn, host, port)
    except TimeoutError:
        raise NodeUnavailableError(f"{address}: connect timed out after {timeout}s") from None
    except OSError as exc:
        raise NodeUnavailableError(f"{address}: cannot connect: {exc}") from None
    await conn._handshake(payload, max(deadline - loop.time(), 0.001))
    return conn


class TcpTransport:
    """The TCP :class:`~hypercache.net.transport.Transport`."""

    def create_server(self, handler: Handler, address: str, options: ServerOptions) -> TcpServer:
        return TcpServer(handler, address, options)

    async def connect(
        self,
        address: str,
        hello: dict[str, Any],
        limits: Limits | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> ClientConnection:
        return await connect(address, hello, limits, timeout)


#: The TCP transport.
TCP: Final = TcpTransport()

if TYPE_CHECKING:  # the classes above implement the interfaces of transport.py
    from hypercache.net.transport import Connection, Server, Transport

    _transport: Transport = TCP
    _server: Server = TcpServer.__new__(TcpServer)
    _connection: Connection = ClientConnection.__new__(ClientConnection)
