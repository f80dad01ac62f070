"""The server side of the wire: :class:`ServerBase` (connections, caps, counters)
and :class:`ServerProtocol` (one connection: handshake, dispatch, answers, flow
control), shared by every transport's server.

A request is answered inline, from the read that brought it, when the handler has a
synchronous fast path for it (``handle_sync``, possibly answering later through a
:class:`~hypercache.net.transport.Later`), and otherwise runs in a task of its own;
answers go out in order of completion.

Flow control: a connection stops reading while its transport asks us to stop
writing (the peer does not read its answers) or while ``max_inflight`` requests are
being handled; frames already received stay in the decoder and are taken once the
pressure is gone. The caps on connections (handshakes under way, clients, per
source host, slow frames, idle clients, unread answers) are described in
:class:`~hypercache.net.transport.ServerOptions`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

from hypercache._core.hlc import wall_clock_ms
from hypercache.errors import (
    FrameTooLargeError,
    HandshakeError,
    HyperCacheError,
    ProtocolError,
    RequestTimeoutError,
    ServerError,
)
from hypercache.net.framed import FramedProtocol, remote_host, remote_name
from hypercache.net.protocol import (
    FEATURES,
    HELLO_MAX_FRAME,
    PROTOCOL_VERSION,
    PUSH_ID,
    REQUEST,
    RESPONSE,
    MsgType,
    Op,
    validate_hello,
)
from hypercache.net.transport import NOT_SYNC, Handler, Later, NetStats, PeerInfo, ServerOptions
from hypercache.observe.tracing import serve, serve_async

__all__ = ["ServerBase", "ServerProtocol"]

_log = logging.getLogger("hypercache.net")

_HELLO: Final = int(Op.HELLO)
_WATCH: Final = int(Op.WATCH)
#: Traced requests: a replica's ops get a ReplicaApply span around their handler
#: (named by ``hypercache.op``); the others run in the received context (the
#: coordinated ones get their span from the coordinator: Set, Get, ...).
_OP_NAMES: Final = {int(op): op.name for op in Op}
_REPLICA_OPS: Final = frozenset(
    int(op)
    for op in (
        Op.R_GET,
        Op.R_PUT,
        Op.R_PUT_MANY,
        Op.R_DEL,
        Op.W_PUT,
        Op.W_HINT,
        Op.MERKLE,
        Op.KEYS,
        Op.PULL,
        Op.STREAM,
        Op.HOLDS,
    )
)
# Period of a server's check of slow and idle connections, seconds.
_SWEEP_INTERVAL: Final = 1.0
# The slowest a frame may arrive past frame_timeout: one second per MiB.
_FRAME_RATE: Final = 1024 * 1024
# How a server counts a connection (ServerProtocol.kind).
_HANDSHAKING: Final = 0
_CLIENT: Final = 1
_PEER: Final = 2


def _count(counts: dict[str, int], key: str, delta: int) -> None:
    left = counts.get(key, 0) + delta
    if left:
        counts[key] = left
    else:
        del counts[key]


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


class ServerProtocol(FramedProtocol):
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
        # The handler's WATCH entry, if it has one: it is handed this connection,
        # to push notifications on (see push()).
        self._watch: Callable[[PeerInfo, Any, ServerProtocol], Any] | None = getattr(
            server.handler, "watch", None
        )
        #: called once when the connection is gone (a watch registry forgets it)
        self.on_lost: list[Callable[[], None]] = []
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
        self.remote = remote_name(transport)
        self.host = remote_host(transport)
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
        callbacks, self.on_lost = self.on_lost, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _log.exception("a connection-lost callback failed")
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

    # -- pushes (WATCH)

    def push(self, op: int, payload: Any) -> None:
        """Queue a frame the peer did not ask for: ``[RESPONSE, PUSH_ID, op, payload]``
        (a notification of a watched connection), sent with this iteration's answers."""
        if self._closing:
            return
        self._send(self._encoder.encode_body(RESPONSE, PUSH_ID, op, payload))

    @property
    def pending_bytes(self) -> int:
        """Bytes queued for the peer and not yet handed to the kernel."""
        transport = self._transport
        queued = 0 if transport is None else transport.get_write_buffer_size()
        return queued + len(self._wbuf)

    @property
    def closing(self) -> bool:
        return self._closing

    def _protocol_error(self, exc: ProtocolError) -> None:
        self.stats.protocol_errors += 1
        if self.peer is None and isinstance(exc, FrameTooLargeError):
            self.stats.prehello_oversize += 1  # over HELLO_MAX_FRAME before the HELLO
        _log.warning("closing connection from %s: %s", self.remote, exc)
        self.close()

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self.peer is None and not self._closing:
            self.stats.handshake_failures += 1
            self.stats.handshake_timeouts += 1
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
            for msg_type, request_id, op, payload, deadline, trace in self._decoder:
                stats.frames_in += 1
                if self.peer is None:
                    self._on_hello(msg_type, request_id, op, payload)
                else:
                    self._dispatch(msg_type, request_id, op, payload, deadline, trace)
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
        if msg_type != REQUEST or op != _HELLO:
            self.stats.handshake_failures += 1
            raise ProtocolError("the first frame must be a HELLO request")
        options = self._options
        encoder = self._encoder
        try:
            tokens = options.tokens
            hello = validate_hello(
                payload, cluster=options.cluster, auth=options.auth if tokens is None else None
            )
            node_id = hello["node_id"]
            proof = None
            token = None
            if node_id is None and tokens is not None:
                # A client, on a node that checks tokens: its token says what it may do.
                token = tokens.check(payload.get("auth"))
            elif node_id is not None:
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
                # Optional features: a peer's requests may carry the trace context;
                # values may be compressed (docs/protocol.md, "Features").
                "features": list(FEATURES),
            }
            if proof is not None:
                answer["proof"] = proof
            body = encoder.encode_body(RESPONSE, request_id, _HELLO, answer)
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
            scopes=None if token is None else token.scopes,
            principal=None if token is None else token.name,
            features=hello["features"],
        )
        self._decoder.max_frame = options.limits.max_frame
        self._send(body)

    def _dispatch(
        self,
        msg_type: int,
        request_id: int,
        op: int,
        payload: Any,
        deadline: int,
        trace: dict[str, str] | None = None,
    ) -> None:
        if msg_type != REQUEST:
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
        if op == _WATCH and self._watch is not None:
            try:
                result = self._watch(peer, payload, self)
            except Exception as exc:
                self._answer(request_id, op, None, exc)
                return
            self._answer(request_id, op, result, None)
            return
        sync = self._sync
        if sync is not None:
            try:
                if trace is None:
                    result = sync(peer, op, payload)
                else:  # inside the sender's trace (a span of its own for a replica's op)
                    name = _OP_NAMES.get(op, "")
                    result = serve(name, op in _REPLICA_OPS, trace, sync, peer, op, payload)
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
        tasks[request_id] = self._loop.create_task(self._run(peer, request_id, op, payload, trace))
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
                body = encoder.encode_body(RESPONSE, request_id, op, result)
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

    async def _run(
        self,
        peer: PeerInfo,
        request_id: int,
        op: int,
        payload: Any,
        trace: dict[str, str] | None = None,
    ) -> None:
        result: Any = None
        error: Exception | None = None
        try:
            if trace is None:
                result = await self._handler.handle(peer, op, payload)
            else:  # in the sender's trace, as a request handled inline is
                name = _OP_NAMES.get(op, "")
                replica = op in _REPLICA_OPS
                handle = self._handler.handle
                result = await serve_async(name, replica, trace, handle, peer, op, payload)
        except Exception as exc:
            error = exc
        finally:
            del self._tasks[request_id]
        self._answer(request_id, op, result, error)
        if self._reading_paused:
            self._update_flow()
