"""A connection over a plain blocking socket, for the sync :class:`hypercache.Client`.

Same wire protocol, handshake and error mapping as :mod:`hypercache.net.connection`, no
event loop. :meth:`BlockingConnection.pipeline` sends a batch of requests in one
``sendall`` and collects the answers by request id; :func:`pipeline_all` does that
on several connections at once (every batch sent, then one ``poll`` over their
sockets), so that one thread can wait for several nodes in parallel.

**Not thread-safe**: one thread at a time may use a connection (hold one per
thread, or a lock around it).
"""

from __future__ import annotations

import math
import select
import socket
import time
from collections.abc import Callable, Iterable
from ssl import SSLContext, SSLSocket, SSLWantReadError
from typing import Any, Final

from hypercache._core.hlc import wall_clock_ms
from hypercache.errors import (
    HyperCacheError,
    NoAnswerError,
    NodeUnavailableError,
    ProtocolError,
    RequestTimeoutError,
    error_from_wire,
)
from hypercache.net.protocol import (
    FEATURE_TRACE,
    PUSH_ID,
    REQUEST,
    RESPONSE,
    FrameDecoder,
    FrameEncoder,
    Limits,
    Op,
    clock_offset_ms,
    frame_header,
    next_request_id,
    prepare_hello,
    request_deadline,
    validate_hello_answer,
)
from hypercache.net.transport import DEFAULT_CONNECT_TIMEOUT, NetStats
from hypercache.observe.tracing import current_carrier
from hypercache.units import parse_hostport

__all__ = ["UNANSWERED", "BlockingConnection", "pipeline_all"]

_RECV_SIZE: Final = 256 * 1024
_MISSING: Final = object()
#: What :func:`pipeline_all` returns for a request it stopped waiting for (``need``).
UNANSWERED: Final = _MISSING


class _Batch:
    """The requests of one send on one connection, and their answers as they come."""

    __slots__ = ("deadline", "missing", "ops", "results", "slots", "timeout")

    def __init__(
        self, ops: list[int], slots: dict[int, int], timeout: float, deadline: float
    ) -> None:
        self.ops = ops
        self.slots = slots  # request id -> index in ops/results, until answered
        self.timeout = timeout
        self.deadline = deadline
        self.results: list[Any] = [_MISSING] * len(ops)
        self.missing = len(ops)


class BlockingConnection:
    """A blocking connection to a node: connect, handshake, then requests.

    :param address: ``"host:port"`` of the node.
    :param hello: HELLO payload (see :func:`~hypercache.net.protocol.make_hello`);
        ``version`` is filled in when missing.
    :param limits: size limits; requests over ``max_frame`` are refused locally.
    :param timeout: deadline of connecting plus handshaking, and the default
        deadline of requests, in seconds.

    :raises NodeUnavailableError: cannot connect, or no handshake within ``timeout``.
    :raises HandshakeError: the server refused the HELLO.

    Not thread-safe. Usable as a context manager (closes on exit).
    """

    def __init__(
        self,
        address: str,
        hello: dict[str, Any],
        limits: Limits | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        *,
        ssl: SSLContext | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.limits = limits if limits is not None else Limits()
        #: the server's HELLO answer (``version``, ``cluster``, ``node_id``, ``info``)
        self.peer_hello: dict[str, Any] = {}
        # Whether the server takes a request's trace context (HELLO answer features).
        self._trace_ok = False
        self.stats = NetStats()
        self._decoder = FrameDecoder(self.limits.max_frame)
        self._encoder = FrameEncoder(self.limits.max_frame)
        self._rbuf = bytearray(_RECV_SIZE)
        self._next_id = 1
        self._lost_reason = "connection closed"
        # ms from our wall clock to the server's, once the handshake told it:
        # requests then carry a deadline on the server's clock.
        self._clock_offset: int | None = None
        #: called with ``(op, payload)`` for each frame the server pushes unasked
        #: (request id ``PUSH_ID``: a ``WATCH`` notification); None: skipped
        self.on_push: Callable[[int, Any], None] | None = None
        host, port = parse_hostport(address)
        payload = prepare_hello(hello)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:  # TimeoutError included
            raise NodeUnavailableError(f"{address}: cannot connect: {exc}") from None
        if ssl is not None:
            try:
                sock = ssl.wrap_socket(sock, server_hostname=host.strip("[]"))
            except OSError as exc:  # SSLError and timeouts included
                sock.close()
                raise NodeUnavailableError(f"{address}: TLS handshake failed: {exc}") from None
        self._sock: socket.socket | None = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            answer = self.request(Op.HELLO, payload, timeout)
            self.peer_hello = validate_hello_answer(answer, cluster=payload["cluster"])
            self._clock_offset = clock_offset_ms(self.peer_hello, wall_clock_ms())
            self._trace_ok = FEATURE_TRACE in self.peer_hello["features"]
        except RequestTimeoutError:
            self.close()
            raise NodeUnavailableError(f"{address}: no HELLO answer within {timeout}s") from None
        except BaseException:
            self.close()
            raise

    # -- API

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        """Close the socket (idempotent)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> BlockingConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, op: int, payload: Any, timeout: float | None = None) -> Any:
        """Send one request and return the answer's payload.

        :raises HyperCacheError: the error the server answered with.
        :raises RequestTimeoutError: no answer in time; the connection stays
            usable and the late answer is skipped when it arrives.
        :raises NodeUnavailableError: the connection is closed or was lost.
        :raises ProtocolError: ``payload`` cannot be encoded (nothing is sent).
        :raises FrameTooLargeError: the request is over ``max_frame`` (nothing is sent).
        """
        result = self._exchange(((op, payload),), timeout)[0]
        if isinstance(result, HyperCacheError):
            raise result
        return result

    def pipeline(
        self, requests: Iterable[tuple[int, Any]], timeout: float | None = None
    ) -> list[Any]:
        """Send all ``(op, payload)`` requests at once; return their answers in order.

        Each item of the result is the answer's payload, or the exception for that
        request: the server's error, :class:`RequestTimeoutError` when the answer
        did not come within ``timeout`` (the whole batch's deadline), or
        :class:`NodeUnavailableError` when the connection broke meanwhile (it is
        then closed; the requests may or may not have been carried out).

        :raises NodeUnavailableError: the connection was already closed.
        :raises ProtocolError, FrameTooLargeError: a request cannot be encoded;
            nothing is sent.
        """
        return self._exchange(requests, timeout)

    def read_pushes(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for frames the server pushes (handed to
        :attr:`on_push`; late answers are skipped); return whether any bytes came.

        :raises NodeUnavailableError: the connection is closed or was lost (it is
            then closed).
        """
        sock = self._sock
        if sock is None:
            raise NodeUnavailableError(f"{self.address}: {self._lost_reason}")
        idle = _Batch([], {}, timeout, 0.0)
        view = memoryview(self._rbuf)
        try:
            sock.settimeout(timeout)
            try:
                n = sock.recv_into(view)
            except (TimeoutError, BlockingIOError, SSLWantReadError):
                return False
            except OSError as exc:
                self._lost(f"connection lost: {exc}")
                raise NodeUnavailableError(f"{self.address}: {self._lost_reason}") from None
            if not n:
                self._lost("connection closed by the server")
                raise NodeUnavailableError(f"{self.address}: {self._lost_reason}")
            self.stats.bytes_in += n
            self._decoder.feed(view[:n])
            self._take(idle)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            self._lost(f"protocol error: {exc}")
            raise NodeUnavailableError(f"{self.address}: {self._lost_reason}") from None
        finally:
            view.release()
        return True

    # -- internals

    def _exchange(self, requests: Iterable[tuple[int, Any]], timeout: float | None) -> list[Any]:
        batch = self._begin(requests, timeout)
        while not self._pump(batch, block=True):
            pass
        return batch.results

    def _begin(self, requests: Iterable[tuple[int, Any]], timeout: float | None) -> _Batch:
        """Encode and send ``requests``; the :class:`_Batch` that collects their answers.

        :raises NodeUnavailableError: the connection is already closed.
        :raises ProtocolError, FrameTooLargeError: a request cannot be encoded;
            nothing is sent.
        """
        sock = self._sock
        if sock is None:
            raise NodeUnavailableError(f"{self.address}: {self._lost_reason}")
        if timeout is None:
            timeout = self.timeout
        encoder = self._encoder
        out = bytearray()
        slots: dict[int, int] = {}
        ops: list[int] = []
        request_id = self._next_id
        deadline = request_deadline(self._clock_offset, timeout)
        # The caller's current span (a client operation's), to a server that takes it.
        trace = current_carrier() if self._trace_ok else None
        for op, payload in requests:
            body = encoder.encode_body(REQUEST, request_id, op, payload, deadline, trace)
            out += frame_header(len(body))
            out += body
            slots[request_id] = len(ops)
            ops.append(op)
            request_id = next_request_id(request_id)
        self._next_id = request_id
        batch = _Batch(ops, slots, timeout, time.monotonic() + timeout)
        if not ops:
            return batch
        try:
            sock.settimeout(timeout)
            sock.sendall(out)
        except OSError as exc:
            # Part of the batch may be on the wire: the stream is unusable.
            self._lost(f"send failed: {exc}")
            self._end(batch, self._unavailable)
            return batch
        stats = self.stats
        stats.frames_out += len(ops)
        stats.bytes_out += len(out)
        stats.writes += 1
        return batch

    def _pump(self, batch: _Batch, *, block: bool) -> bool:
        """Read once (waiting until the batch's deadline when ``block``, else taking only
        what has arrived) and take the answers it brings; return whether ``batch`` is
        complete: every answer in, or the rest failed (timed out, or the connection
        lost, which closes it)."""
        stats = self.stats
        view = memoryview(self._rbuf)
        try:
            if self._take(batch):
                return True
            sock = self._sock
            if sock is None:  # closed meanwhile (by close() from this thread)
                self._end(batch, self._unavailable)
                return True
            left = batch.deadline - time.monotonic()
            if left <= 0:
                stats.timeouts += batch.missing
                self._end(batch, self._timed_out(batch.timeout))
                return True
            sock.settimeout(left if block else 0.0)
            try:
                n = sock.recv_into(view)
            except (TimeoutError, BlockingIOError, SSLWantReadError):
                return False  # the deadline check above turns it into timeouts
            except OSError as exc:
                self._lost(f"connection lost: {exc}")
                self._end(batch, self._unavailable)
                return True
            if not n:
                self._lost("connection closed by the server")
                self._end(batch, self._unavailable)
                return True
            stats.bytes_in += n
            self._decoder.feed(view[:n])
            return self._take(batch)
        except ProtocolError as exc:
            stats.protocol_errors += 1
            self._lost(f"protocol error: {exc}")
            self._end(batch, self._unavailable)
            return True
        finally:
            view.release()

    def _take(self, batch: _Batch) -> bool:
        """Move the answers decoded so far into ``batch``; return whether it is complete.

        :raises ProtocolError: the server sent a malformed frame or a request.
        """
        stats = self.stats
        slots, results = batch.slots, batch.results
        for msg_type, rid, op, payload, _, _ in self._decoder:
            stats.frames_in += 1
            if msg_type == REQUEST:
                raise ProtocolError("the server sent a REQUEST frame")
            if rid == PUSH_ID and self.on_push is not None and msg_type == RESPONSE:
                self.on_push(op, payload)
                continue
            slot = slots.pop(rid, None)
            if slot is None:
                stats.late_responses += 1  # answer to a request that timed out
                continue
            results[slot] = payload if msg_type == RESPONSE else error_from_wire(payload)
            batch.missing -= 1
        return batch.missing == 0

    def _lost(self, reason: str) -> None:
        self._lost_reason = reason
        self.close()
        self._decoder = FrameDecoder(self.limits.max_frame)

    def _unavailable(self, op: int) -> HyperCacheError:
        return NodeUnavailableError(f"{self.address}: {self._lost_reason}")

    def _timed_out(self, timeout: float) -> Callable[[int], HyperCacheError]:
        def make(op: int) -> HyperCacheError:
            return NoAnswerError(f"{self.address}: op {op} got no answer within {timeout}s")

        return make

    @staticmethod
    def _end(batch: _Batch, make: Callable[[int], HyperCacheError]) -> None:
        """Fail every request of ``batch`` still without an answer."""
        results, ops = batch.results, batch.ops
        for i, value in enumerate(results):
            if value is _MISSING:
                results[i] = make(ops[i])
        batch.missing = 0


def pipeline_all(
    groups: list[tuple[BlockingConnection, list[tuple[int, Any]]]],
    timeout: float | None = None,
    need: int | None = None,
) -> list[list[Any]]:
    """Send each group of ``(op, payload)`` requests on its connection, all before
    waiting for any answer, then collect the answers of all of them from this thread.

    The result has one list per group, as :meth:`BlockingConnection.pipeline` returns
    it (answers, or the exception of each request). ``timeout`` (default: each
    connection's own) is every group's deadline from now. Each connection must be
    a different one and not used by another thread meanwhile.

    With ``need``, it stops waiting once ``need`` groups are complete with no error
    among their answers (a write at its consistency level): the requests still
    unanswered are :data:`UNANSWERED` in the result, and their answers, when they
    come, are skipped as late ones by the next exchange on their connection.

    :raises NodeUnavailableError: a connection was already closed.
    :raises ProtocolError, FrameTooLargeError: a request cannot be encoded. Nothing
        of its group is sent; groups sent before it are answered later, and those
        answers skipped as late ones by the next exchange on their connection.
    """
    batches = [conn._begin(requests, timeout) for conn, requests in groups]
    waiting: dict[int, tuple[BlockingConnection, _Batch]] = {}
    complete = 0
    for (conn, _), batch in zip(groups, batches, strict=True):
        sock = conn._sock
        if batch.missing and sock is not None:
            waiting[sock.fileno()] = (conn, batch)
        elif _clean(batch):
            complete += 1
    while waiting and (need is None or complete < need):
        # Sleep until a socket has something or the earliest deadline passes; a
        # batch past its deadline is ended by its own _pump. A TLS socket may hold
        # decrypted bytes that poll() cannot see: those are read first.
        ready = [fd for fd, (conn, _) in waiting.items() if _tls_pending(conn._sock)]
        if not ready:
            left = min(batch.deadline for _, batch in waiting.values()) - time.monotonic()
            ready = _readable(list(waiting), max(left, 0.0)) or list(waiting)
        for fd in ready:
            conn, batch = waiting[fd]
            if conn._pump(batch, block=False):
                del waiting[fd]
                if _clean(batch):
                    complete += 1
    return [batch.results for batch in batches]


def _clean(batch: _Batch) -> bool:
    """Whether every answer of the complete ``batch`` is one (no error, none missing)."""
    return not batch.missing and not any(isinstance(r, BaseException) for r in batch.results)


def _tls_pending(sock: socket.socket | None) -> bool:
    return isinstance(sock, SSLSocket) and sock.pending() > 0


def _readable(fds: list[int], timeout: float) -> list[int]:
    """The fds of ``fds`` readable within ``timeout`` seconds (empty: none in time)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        return [fd for fd, _ in poller.poll(math.ceil(timeout * 1000))]
    ready, _, _ = select.select(fds, [], [], timeout)  # pragma: no cover - no poll()
    return ready
