"""Blocking connections to one node, shared by threads: :class:`ConnectionPool`.

The sync :class:`~hypercache.Client` keeps one pool per node. The pool lives in the
client layer, not beside :class:`~hypercache.net.blocking.BlockingConnection` in
``net``: a connection is the wire protocol over one socket, the pool is the
client's policy over many of them (how many, how long a thread waits for one, what
a forked child may reuse) and counts into the client's :class:`~hypercache.client.ClientStats`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final, Protocol

from hypercache.errors import ConfigError, NodeUnavailableError, RequestTimeoutError
from hypercache.net.blocking import BlockingConnection
from hypercache.net.protocol import Limits

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_IDLE",
    "BlockingConnect",
    "ConnectionPool",
    "PoolCounters",
    "PoolStats",
    "after_fork",
]

#: Connections open at most per pool (per node, for a ``Client``).
DEFAULT_MAX_CONNECTIONS: Final = 64
#: Idle connections kept per pool.
DEFAULT_MAX_IDLE: Final = 8


class BlockingConnect(Protocol):
    """Opens and handshakes one blocking connection to a node, as
    :class:`~hypercache.net.blocking.BlockingConnection` itself does (the default):
    the sync client's equivalent of a transport (see ``Client(connection_factory=)``).

    :raises NodeUnavailableError: cannot connect, or no handshake within ``timeout``.
    :raises HandshakeError: the node refused the HELLO.
    """

    def __call__(
        self, address: str, hello: dict[str, Any], limits: Limits, timeout: float
    ) -> BlockingConnection: ...


class PoolCounters(Protocol):
    """Where a pool counts the times its cap bit (a :class:`PoolStats`, or the
    :class:`~hypercache.client.ClientStats` of the client that owns the pool)."""

    pool_waits: int
    pool_timeouts: int


@dataclass(slots=True)
class PoolStats:
    """Counters of a pool (they only grow).

    :ivar pool_waits: times a thread found ``max_connections`` in use and waited.
    :ivar pool_timeouts: waits that ran out (the acquire raised).
    """

    pool_waits: int = 0
    pool_timeouts: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ForkSafe(Protocol):
    """Something that notices it is used in a child process (see :func:`after_fork`)."""

    #: the process it belongs to
    _pid: int

    def _reset_in_child(self) -> None:
        """Drop what belongs to the parent process (connections, locks, threads).
        Called under the fork lock: it must not check the pid itself."""
        ...


# Serialises the resets of pools (and clients) in a child process, so that two of its
# threads do not both reset one (re-entrant: a client resets its pools). Held only
# during a reset, and made anew in each child (a fork while another thread resets
# would leave the child's copy held for ever).
_fork_lock = threading.RLock()


def _new_fork_lock() -> None:
    global _fork_lock
    _fork_lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_new_fork_lock)


def after_fork(owner: ForkSafe) -> None:
    """``owner`` was found used by another process than its own (``owner._pid !=
    os.getpid()``, checked by the caller on its hot path): reset it, once, and make it
    this process's."""
    with _fork_lock:
        pid = os.getpid()
        if owner._pid != pid:  # else another thread of this child did it
            owner._reset_in_child()
            owner._pid = pid


class ConnectionPool:
    """Blocking connections to one node, shared by threads; a connection serves one
    thread at a time, from :meth:`acquire` to :meth:`release`::

        pool = ConnectionPool(address, lambda a: BlockingConnection(a, make_hello("c")))
        conn = pool.acquire(timeout=2.0)
        try:
            conn.request(Op.PING, None)
        finally:
            pool.release(conn)

    :param address: the node's ``"host:port"``, given to ``connect``.
    :param connect: opens one new connection to ``address``; called without the
        pool's lock held, so threads connect at the same time.
    :param max_connections: connections open at most: in use, idle or being opened.
        A thread that finds as many in use waits for one to be released or to close,
        for at most :meth:`acquire`'s ``timeout`` (counted in ``stats.pool_waits``);
        a wait that runs out raises :class:`~hypercache.errors.RequestTimeoutError`
        (counted in ``stats.pool_timeouts``).
    :param max_idle: idle connections kept; one released while as many are idle
        (and no thread waits) is closed.
    :param stats: where to count (a :class:`PoolStats` of its own by default).
    :raises ConfigError: ``max_connections`` is not a positive integer, or
        ``max_idle`` not a non-negative one.

    **Fork safety.** A pool remembers the process that made it, and every call
    compares ``os.getpid()`` with it. In a child process (after ``os.fork()``), the
    first call forgets every connection of the parent: their sockets are shared
    with the parent, and a child writing on one would mix its frames with the
    parent's on the same stream and read the parent's answers. The child closes its
    copies of those sockets (closing a copied descriptor leaves the parent's socket
    open: the parent goes on using its connections) and opens its own as needed; a
    connection acquired before the fork and released in the child is closed, not
    kept. Its locks are made anew too (a lock another thread held at the fork stays
    held in the child). Nothing changes in the parent.
    """

    __slots__ = (
        "_closed",
        "_cond",
        "_connect",
        "_idle",
        "_in_use",
        "_lock",
        "_open",
        "_pid",
        "_waiters",
        "address",
        "max_connections",
        "max_idle",
        "stats",
    )

    def __init__(
        self,
        address: str,
        connect: Callable[[str], BlockingConnection],
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_idle: int = DEFAULT_MAX_IDLE,
        stats: PoolCounters | None = None,
    ) -> None:
        if type(max_connections) is not int or max_connections < 1:
            raise ConfigError(
                "max_connections", f"must be a positive integer, got {max_connections!r}"
            )
        if type(max_idle) is not int or max_idle < 0:
            raise ConfigError("max_idle", f"must be a non-negative integer, got {max_idle!r}")
        self.address = address
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.stats: PoolCounters = PoolStats() if stats is None else stats
        self._connect = connect
        self._closed = False
        self._pid = os.getpid()
        self._new_state()

    def _new_state(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._idle: list[BlockingConnection] = []
        self._in_use: set[BlockingConnection] = set()
        self._open = 0  # in use + idle + being opened
        self._waiters = 0

    # ------------------------------------------------------------------ state

    @property
    def size(self) -> int:
        """Connections open now: in use, idle or being opened."""
        return self._open

    @property
    def idle(self) -> int:
        """Idle connections now."""
        return len(self._idle)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return (
            f"ConnectionPool({self.address!r}, size={self._open}, idle={len(self._idle)}, "
            f"max_connections={self.max_connections})"
        )

    # ------------------------------------------------------------------ API

    def acquire(self, timeout: float | None = None) -> BlockingConnection:
        """A connection for this thread alone until :meth:`release`: an idle one,
        else a new one while fewer than ``max_connections`` are open, else the first
        one released within ``timeout`` seconds (``None``: no limit).

        :raises RequestTimeoutError: ``max_connections`` stayed in use for ``timeout``.
        :raises NodeUnavailableError: the pool is closed, or connecting failed.

        and whatever ``connect`` raises (e.g. :class:`~hypercache.errors.HandshakeError`).
        """
        if self._pid != os.getpid():
            after_fork(self)
        return self._acquire(timeout)

    def _acquire(self, timeout: float | None) -> BlockingConnection:
        """:meth:`acquire` without the pid check: for an owner that checks it (a
        ``Client`` checks at each operation and resets its pools in a child)."""
        with self._lock:
            idle = self._idle
            if idle and not self._closed:  # the common case
                conn = idle.pop()
                self._in_use.add(conn)
                return conn
            taken = self._take(timeout)
            if taken is not None:
                return taken
        try:
            conn = self._connect(self.address)
        except BaseException:
            self._forget()
            raise
        with self._lock:
            if not self._closed:
                self._in_use.add(conn)
                return conn
        self._forget()  # closed while connecting
        conn.close()
        raise self._closed_error()

    def release(self, conn: BlockingConnection) -> None:
        """Give back a connection from :meth:`acquire`. It is kept for the next
        thread, unless it is closed (broken), the pool is closed, or ``max_idle`` are
        idle already and no thread waits: then it is closed. A connection acquired
        before a fork (see "Fork safety") or from another pool is closed."""
        if self._pid != os.getpid():
            after_fork(self)
        self._release(conn)

    def _release(self, conn: BlockingConnection) -> None:
        """:meth:`release` without the pid check (see :meth:`_acquire`)."""
        with self._lock:
            if conn not in self._in_use:
                if conn in self._idle:
                    return  # released twice
            else:
                self._in_use.remove(conn)
                if (
                    not conn.closed
                    and not self._closed
                    and (self._waiters or len(self._idle) < self.max_idle)
                ):
                    self._idle.append(conn)
                    if self._waiters:
                        self._cond.notify()
                    return
                self._open -= 1
                if self._waiters:
                    self._cond.notify()  # room for a new connection
        conn.close()

    def close(self) -> None:
        """Close the idle connections now and those in use when released; then
        :meth:`acquire` raises :class:`~hypercache.errors.NodeUnavailableError`
        (threads waiting for a connection too). Idempotent."""
        if self._pid != os.getpid():
            after_fork(self)
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    # ------------------------------------------------------------------ internals

    def _take(self, timeout: float | None) -> BlockingConnection | None:
        """Under the lock: an idle connection (taken), or ``None`` when the caller may
        open one (its place is counted); at ``max_connections``, wait for either."""
        deadline: float | None = None
        while True:
            if self._closed:
                raise self._closed_error()
            if self._idle:
                conn = self._idle.pop()
                self._in_use.add(conn)
                return conn
            if self._open < self.max_connections:
                self._open += 1  # the caller's, while it connects
                return None
            if deadline is None:  # the cap bites: wait, within the caller's deadline
                self.stats.pool_waits += 1
                deadline = math.inf if timeout is None else time.monotonic() + timeout
            left = deadline - time.monotonic()
            if left <= 0:
                self.stats.pool_timeouts += 1
                raise RequestTimeoutError(
                    f"{self.address}: no connection free within {timeout}s: all "
                    f"{self.max_connections} in use (the pool's max_connections; "
                    "max_connections_per_node of a Client)"
                )
            self._waiters += 1
            try:
                self._cond.wait(None if left == math.inf else left)
            finally:
                self._waiters -= 1

    def _forget(self) -> None:
        """A connection being opened will not be: its place is free."""
        with self._lock:
            self._open -= 1
            if self._waiters:
                self._cond.notify()

    def _closed_error(self) -> NodeUnavailableError:
        return NodeUnavailableError(f"{self.address}: the connection pool is closed")

    def _reset_in_child(self) -> None:
        """See "Fork safety": forget the parent's connections and locks."""
        inherited = [*self._idle, *self._in_use]
        self._new_state()
        for conn in inherited:
            conn.close()  # this process's copy of the socket; the parent's stays open
