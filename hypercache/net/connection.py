"""The client side of the wire: :class:`ClientConnection`, one multiplexed
connection to a node, and :func:`handshake`, which every transport runs on a new one.

One connection carries many requests at once. Answers are matched to requests by
request id with one future or callback per request (no task per request). Each
request carries its deadline on the server's clock (see ``docs/protocol.md`` §2),
and fails here with :class:`~hypercache.errors.NoAnswerError` when it passes.
``request`` waits while the transport's write buffer is above its high mark.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Final

from hypercache._core.hlc import wall_clock_ms
from hypercache.errors import (
    NoAnswerError,
    NodeUnavailableError,
    ProtocolError,
    RequestTimeoutError,
    error_from_wire,
)
from hypercache.net.framed import FramedProtocol
from hypercache.net.protocol import (
    FEATURE_TRACE,
    REQUEST,
    RESPONSE,
    Limits,
    Op,
    clock_offset_ms,
    next_request_id,
    request_deadline,
    validate_hello_answer,
)
from hypercache.net.transport import Outcome
from hypercache.observe.tracing import current_carrier

__all__ = ["ClientConnection"]

_log = logging.getLogger("hypercache.net")

_HELLO: Final = int(Op.HELLO)
# Request deadlines are rounded up to ticks of 1/_TICKS_PER_SECOND s.
_TICKS_PER_SECOND: Final = 200
_NO_DEADLINE: Final = math.inf
# How long a client's close() lets buffered writes drain before aborting.
_CLIENT_CLOSE_GRACE: Final = 5.0


class _Expired(RequestTimeoutError):
    """Set on a wait for room in the write buffer when its deadline passes (rewritten
    with details). A request's own deadline sets the final RequestTimeoutError."""


class ClientConnection(FramedProtocol):
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
        # Whether the server takes a request's trace context (HELLO answer features).
        self._trace_ok = False
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
            for msg_type, request_id, _, payload, _, _ in decoder:
                stats.frames_in += 1
                if msg_type == REQUEST:
                    raise ProtocolError("the server sent a REQUEST frame")
                fut = pending.pop(request_id, None)
                if fut is not None:
                    if fut.done():
                        stats.late_responses += 1  # cancelled meanwhile
                    elif msg_type == RESPONSE:
                        fut.set_result(payload)
                    else:
                        fut.set_exception(error_from_wire(payload))
                    continue
                callback = callbacks.pop(request_id, None)
                if callback is None:
                    stats.late_responses += 1  # timed out or cancelled meanwhile
                elif msg_type == RESPONSE:
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

    async def request(
        self, op: int, payload: Any, timeout: float, trace: dict[str, str] | None = None
    ) -> Any:
        """Send one request and return the answer's payload.

        ``trace`` is the trace context to send (default: the current span's, if any;
        sent only to a server that takes it).

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
        request_id = self._encode_and_send(op, payload, timeout, trace)
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

    def send_callback(
        self,
        op: int,
        payload: Any,
        timeout: float,
        callback: Outcome,
        trace: dict[str, str] | None = None,
    ) -> None:
        """Send one request now, without a task nor a future (``trace`` as for
        :meth:`request`).

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
            task = self._loop.create_task(self._request_then(op, payload, timeout, callback, trace))
            self._waiting.add(task)
            task.add_done_callback(self._waiting.discard)
            return
        request_id = self._encode_and_send(op, payload, timeout, trace)
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

    def _encode_and_send(
        self, op: int, payload: Any, timeout: float, trace: dict[str, str] | None = None
    ) -> int:
        """Encode and queue one request, arm its deadline; return its request id.

        The caller registers the request's future or callback under that id before
        the loop runs again.
        """
        request_id = self._next_id
        self._next_id = next_request_id(request_id)
        offset = self._clock_offset
        deadline = 0 if offset is None else request_deadline(offset, timeout)
        if self._trace_ok:
            if trace is None:
                trace = current_carrier()
        else:
            trace = None
        self._send(self._encoder.encode_body(REQUEST, request_id, op, payload, deadline, trace))
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

    async def _request_then(
        self,
        op: int,
        payload: Any,
        timeout: float,
        callback: Outcome,
        trace: dict[str, str] | None = None,
    ) -> None:
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
            request_id = self._encode_and_send(op, payload, max(deadline - loop.time(), 0.0), trace)
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

    async def handshake(self, payload: dict[str, Any], timeout: float) -> None:
        """Send the HELLO (prepared by :func:`~hypercache.net.protocol.prepare_hello`) and
        check the answer; every transport calls it once on a new connection.

        :raises NodeUnavailableError: no answer within ``timeout`` (the connection is
            aborted).
        :raises HandshakeError: the server refused, or answered for another cluster.
        """
        try:
            answer = await self.request(_HELLO, payload, timeout)
            self.peer_hello = validate_hello_answer(answer, cluster=payload["cluster"])
            self._clock_offset = clock_offset_ms(self.peer_hello, wall_clock_ms())
            self._trace_ok = FEATURE_TRACE in self.peer_hello["features"]
        except BaseException as exc:
            self.abort()
            if not isinstance(exc, asyncio.CancelledError):
                await asyncio.shield(self._lost)
            if isinstance(exc, RequestTimeoutError):
                raise NodeUnavailableError(
                    f"{self.address}: no HELLO answer within {timeout}s"
                ) from None
            raise
