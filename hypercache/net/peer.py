"""One managed connection to one address: opened lazily, shared, reopened with back-off.

Whoever talks to a node over and over (a node to each of its peers, the asyncio
client to each node) keeps one :class:`PeerConnection` per address:

* the connection is opened on first use, and one attempt is shared by everyone who
  needs it meanwhile;
* after a failed attempt the address *backs off* (from ``backoff_min`` doubling to
  ``backoff_max``): requests fail at once with
  :class:`~hypercache.errors.NodeUnavailableError` meanwhile, instead of piling up
  behind attempts that time out;
* :meth:`send_callback` is the fast path: over an open connection the request goes
  out at once with a callback, no task, no future; when not connected (yet, or any
  more) it connects in a task and then sends, and the callback gets the outcome
  either way;
* every outcome is reported to the owner's hooks: ``on_answer`` when the peer
  answered (any answer, errors included: it is alive), ``on_lost`` when it could
  not be reached or the connection broke (not for connections this side closed);
  a request that got no answer in time reports nothing (silence is for a failure
  detector to judge by how long it lasts).

The owner decides what "dialing" means (which HELLO, which checks of the answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from hypercache.errors import HyperCacheError, NoAnswerError, NodeUnavailableError
from hypercache.net.transport import Connection, Outcome

__all__ = ["PeerConnection"]

_BACKOFF_MIN: Final = 0.05


def _nothing(*_args: Any) -> None:
    """The default hook."""


class PeerConnection:
    """The connection to one address (see the module docstring).

    :param address: ``"host:port"``.
    :param dial: opens and handshakes a connection to ``address`` (raises
        :class:`~hypercache.errors.HyperCacheError` or ``OSError`` when it cannot).
    :param backoff_max: longest pause between two attempts after failures, seconds;
        0 = none (an owner with its own way of setting a failed address aside).
    :param on_answer: called after every answer (the peer is alive).
    :param on_lost: called with the error when the peer could not be reached or the
        connection broke.
    :param on_connected: called with each new connection.
    """

    __slots__ = (
        "_backoff",
        "_backoff_max",
        "_closed",
        "_connecting",
        "_dial",
        "_retry_at",
        "_tasks",
        "address",
        "conn",
        "on_answer",
        "on_connected",
        "on_lost",
    )

    def __init__(
        self,
        address: str,
        dial: Callable[[str], Awaitable[Connection]],
        *,
        backoff_max: float = 1.0,
        on_answer: Callable[[], None] = _nothing,
        on_lost: Callable[[BaseException], None] = _nothing,
        on_connected: Callable[[Connection], None] = _nothing,
    ) -> None:
        self.address = address
        self._dial = dial
        self._backoff_max = backoff_max
        self.on_answer = on_answer
        self.on_lost = on_lost
        self.on_connected = on_connected
        #: the open connection, if any
        self.conn: Connection | None = None
        self._connecting: asyncio.Task[Connection] | None = None
        self._retry_at = 0.0
        self._backoff = min(_BACKOFF_MIN, backoff_max)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def connected(self) -> bool:
        conn = self.conn
        return conn is not None and not conn.closed

    @property
    def pending(self) -> int:
        """Requests waiting for a connection to be sent on."""
        return len(self._tasks)

    async def connection(self) -> Connection:
        """The open connection, connecting (once, shared) if needed.

        :raises NodeUnavailableError: cannot connect, or backing off after a failure.
        :raises HyperCacheError: what the dial raised (e.g. ``HandshakeError``).
        """
        conn = self.conn
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise NodeUnavailableError(f"{self.address}: closed")
        task = self._connecting
        if task is None:
            if time.monotonic() < self._retry_at:
                raise NodeUnavailableError(f"{self.address}: down, backing off")
            task = self._connecting = asyncio.get_running_loop().create_task(self._connect())
        return await asyncio.shield(task)

    async def _connect(self) -> Connection:
        try:
            conn = await self._dial(self.address)
        except (HyperCacheError, OSError) as exc:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self._backoff_max)
            # An error of ours (a refused handshake: HandshakeError) stays what it
            # is, so that the caller can tell "wrong cluster" from "not there".
            error = (
                exc
                if isinstance(exc, HyperCacheError)
                else NodeUnavailableError(f"{self.address}: {exc}")
            )
            self.on_lost(error)
            raise error from None
        finally:
            self._connecting = None
        self._backoff = min(_BACKOFF_MIN, self._backoff_max)
        self._retry_at = 0.0
        old, self.conn = self.conn, conn
        if old is not None and old is not conn:
            self._track(old.close())
        self.on_connected(conn)
        return conn

    async def request(
        self, op: int, payload: Any, timeout: float, trace: dict[str, str] | None = None
    ) -> Any:
        """Send one request (connecting if needed) and return the answer.

        :raises NodeUnavailableError: cannot connect, or the connection broke.
        :raises HyperCacheError: the error the peer answered with.
        """
        conn = self.conn
        if conn is None or conn.closed:
            conn = await self.connection()
        try:
            result = await conn.request(op, payload, timeout, trace)
        except HyperCacheError as exc:
            self._settle(exc)
            raise
        self.on_answer()
        return result

    def send_callback(
        self,
        op: int,
        payload: Any,
        timeout: float,
        callback: Outcome,
        trace: dict[str, str] | None = None,
    ) -> None:
        """Send one request; ``callback(answer, error)`` gets its outcome, exactly once.
        ``trace``: the trace context to send (default: the current span's, if any).

        Over an open connection: at once, no task (the callback runs from the read
        that brings the answer). Otherwise: connect in a task, then send.
        """
        conn = self.conn
        if conn is None or conn.closed:
            self._track(self._connect_then(op, payload, timeout, callback, trace))
            return

        def answered(value: Any, error: BaseException | None) -> None:
            self._settle(error)
            callback(value, error)

        try:
            conn.send_callback(op, payload, timeout, answered, trace)
        except HyperCacheError as exc:
            answered(None, exc)

    async def _connect_then(
        self,
        op: int,
        payload: Any,
        timeout: float,
        callback: Outcome,
        trace: dict[str, str] | None = None,
    ) -> None:
        try:
            value = await self.request(op, payload, timeout, trace)
        except asyncio.CancelledError:
            callback(None, NodeUnavailableError(f"{self.address}: request cancelled"))
            raise
        except HyperCacheError as exc:
            callback(None, exc)
            return
        callback(value, None)

    def _settle(self, error: BaseException | None) -> None:
        # An answer, even an error, says the peer is alive; a lost connection says it
        # is not; silence (no answer in time) says nothing by itself: the failure
        # detector judges it by how long it lasts.
        if error is None:
            self.on_answer()
        elif isinstance(error, NodeUnavailableError):
            self._lost(error)
        elif not isinstance(error, NoAnswerError):
            self.on_answer()

    def _lost(self, error: BaseException) -> None:
        if not self._closed:  # (not for connections closed by our own close())
            self.on_lost(error)

    def _track(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close the connection and cancel what waits for one; idempotent."""
        self._closed = True
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for pending in list(self._tasks):
            pending.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()
