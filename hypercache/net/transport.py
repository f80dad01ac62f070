"""What every transport provides, and what the node layer provides to it.

A *transport* moves frames (:mod:`hypercache.net.protocol`) between a client-side
:class:`Connection` and a :class:`Server`, which hands each request to a
:class:`Handler`. Implementations: :mod:`hypercache.net.tcp` (production),
:mod:`hypercache.net.inproc` (unit tests of the node logic, no sockets) and
:mod:`hypercache.net.blocking` (the sync client's connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final, Protocol

from hypercache.errors import ConfigError
from hypercache.net.auth import PeerAuthenticator
from hypercache.net.busypoll import check_window
from hypercache.net.protocol import Limits

if TYPE_CHECKING:
    import ssl as _ssl

    from hypercache.net.security import TokenSet
from hypercache.units import check_int, check_seconds

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "NOT_SYNC",
    "Connection",
    "ConnectionLimits",
    "Handler",
    "Later",
    "NetStats",
    "Outcome",
    "PeerInfo",
    "Server",
    "ServerOptions",
    "SyncHandler",
    "Transport",
]

#: Default deadline of ``connect`` (connection and handshake together), in seconds.
DEFAULT_CONNECT_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What a server knows about the peer of one connection, from its HELLO.

    :ivar remote: transport-level address of the peer (``"host:port"``).
    :ivar node_id: the peer's node id, ``None`` for a client.
    :ivar address: the address the peer advertises (where it listens), if any.
    :ivar info: the ``info`` map of the peer's HELLO.
    :ivar authenticated: the peer proved the cluster secret (see
        :mod:`hypercache.net.auth`); False for clients, and for peers of an open
        cluster (taken on their word, from loopback only).
    :ivar scopes: what a client's token lets it do (see :mod:`hypercache.net.security`);
        None when the server checks no tokens, and for peers.
    :ivar principal: the name of the client's token, if any.
    :ivar features: the optional features the peer's HELLO lists (a client that
        lists :data:`~hypercache.net.protocol.FEATURE_COMPRESSION` reads compressed
        values); none from a peer of a version without them.
    """

    remote: str
    version: int
    cluster: str
    node_id: str | None
    address: str | None
    info: dict[str, Any]
    authenticated: bool = False
    scopes: frozenset[str] | None = None
    principal: str | None = None
    features: frozenset[str] = frozenset()

    @property
    def is_node(self) -> bool:
        """True when the peer is a cluster node, not a client: it named a node id and
        the server accepted the claim (a proof of the cluster secret, or loopback in
        an open cluster); only such connections may send peer operations."""
        return self.node_id is not None


class Handler(Protocol):
    """The upper layer's side of a server (implemented by the node)."""

    async def handle(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        """Carry out one request and return the response payload.

        Raise :class:`~hypercache.errors.HyperCacheError` subclasses for typed
        errors; any other exception reaches the peer as ``ServerError``. Requests
        of one connection run concurrently and may complete in any order.
        """
        ...

    def hello_info(self, peer_hello: dict[str, Any]) -> dict[str, Any]:
        """Return the ``info`` map of the HELLO answer to a peer.

        ``peer_hello`` is the peer's validated HELLO (``version``, ``cluster``,
        ``node_id``, ``address``, ``info``; the auth token is left out). Raise
        :class:`~hypercache.errors.HandshakeError` to refuse the peer.
        """
        ...


class _NotSync:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_SYNC"


#: What :meth:`SyncHandler.handle_sync` returns for a request it leaves to ``handle``.
NOT_SYNC: Final = _NotSync()

#: ``callback(value, error)``: how a :class:`Later` or :meth:`Connection.send_callback`
#: delivers an outcome (``error`` is None on success).
Outcome = Callable[[Any, BaseException | None], None]


class Later:
    """An answer that a synchronous handler gives later, without a task.

    :meth:`SyncHandler.handle_sync` returns one for a request that waits on other
    nodes (a coordinated ``GET``/``SET``); the handler calls :meth:`resolve` or
    :meth:`reject` exactly once, from any callback, and the server sends the answer
    then. The server binds its callback right after ``handle_sync`` returns; an answer
    given before that is kept until then. Only the first answer counts.
    """

    __slots__ = ("_callback", "_done", "_error", "_value")

    def __init__(self) -> None:
        self._callback: Outcome | None = None
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done

    def resolve(self, value: Any) -> None:
        if self._done:
            return
        self._done = True
        callback = self._callback
        if callback is None:
            self._value = value
        else:
            self._callback = None
            callback(value, None)

    def reject(self, error: BaseException) -> None:
        if self._done:
            return
        self._done = True
        callback = self._callback
        if callback is None:
            self._error = error
        else:
            self._callback = None
            callback(None, error)

    async def wait(self) -> Any:
        """Await the answer (the asyncio face of a handler's synchronous path).

        :raises BaseException: the error the answer was rejected with.
        """
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if not fut.done():
                if error is None:
                    fut.set_result(value)
                else:
                    fut.set_exception(error)

        self.bind(settle)
        return await fut

    def bind(self, callback: Outcome) -> None:
        """Call ``callback(value, error)`` with the answer (at once if already given)."""
        if self._done:
            value, error = self._value, self._error
            self._value = self._error = None
            callback(value, error)
        else:
            self._callback = callback


class SyncHandler(Handler, Protocol):
    """A handler with a synchronous fast path, tried before :meth:`Handler.handle`.

    A server whose handler has ``handle_sync`` calls it inline, from the read that
    brought the request, without a task: it answers at once (same iteration as the
    read, in the same write as the other answers of that read) with the value it
    returns, the error it raises, or later through the :class:`Later` it returns. A
    request it returns :data:`NOT_SYNC` for goes to ``handle`` in a task of its own.
    Requests answered through a :class:`Later` count as in flight (``max_inflight``).
    ``handle_sync`` must not block: it runs on the event loop, between reads.
    """

    def handle_sync(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        """Answer a request now, or return a :class:`Later`, or :data:`NOT_SYNC`."""
        ...


@dataclass(slots=True)
class NetStats:
    """Counters of a connection or (aggregated) of a server, read by the metrics layer.

    All counters only grow, except ``connections_open`` and ``in_flight`` (gauges).
    """

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    #: transport writes: fewer than ``frames_out`` when writes are coalesced.
    writes: int = 0
    #: malformed or oversized frames (each closes its connection).
    protocol_errors: int = 0
    handshake_failures: int = 0
    #: times a server connection stopped reading because ``max_inflight`` was reached.
    inflight_pauses: int = 0
    #: times the transport asked us to stop writing (its buffer passed the high mark).
    write_pauses: int = 0
    #: requests that ran out of time (client side).
    timeouts: int = 0
    #: responses that arrived after their request timed out or was cancelled.
    late_responses: int = 0
    #: requests refused unstarted because their deadline had passed (server side).
    expired: int = 0
    #: requests being handled now (server side).
    in_flight: int = 0
    connections_open: int = 0
    connections_accepted: int = 0
    #: connections refused on accept or at their HELLO: a cap below was reached, or
    #: the server was closing.
    connections_rejected: int = 0
    #: ... of which: ``max_connections_per_source`` was reached for the remote host,
    rejected_source: int = 0
    #: ... ``max_pending_handshakes`` was reached,
    rejected_pending: int = 0
    #: ... ``max_connections`` (handshaken clients) was reached.
    rejected_clients: int = 0
    #: connections closed: a frame begun did not complete within ``frame_timeout``.
    frame_timeouts: int = 0
    #: client connections closed after ``idle_timeout`` without a request.
    idle_closes: int = 0
    #: connections closed: their unread answers passed ``max_output_buffer``.
    output_limit_closes: int = 0
    #: connections closed without a HELLO within ``handshake_timeout``.
    handshake_timeouts: int = 0
    #: connections closed: a frame before the HELLO passed ``HELLO_MAX_FRAME``.
    prehello_oversize: int = 0

    def add(self, other: NetStats) -> None:
        """Add every counter of ``other`` into this one."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionLimits:
    """The caps and deadlines a server puts on its connections (each counted in
    :class:`NetStats` when it bites); a node takes them from its configuration.

    :param max_inflight: requests handled concurrently per connection; at the cap the
        server stops reading that connection until half of them have completed.
    :param max_connections: handshaken client connections; a client HELLO beyond it
        is refused. Peers do not count: a restarted peer always gets back in.
    :param max_connections_per_source: from one remote host, handshakes under way
        (more are closed on accept) and, counted apart, handshaken clients (a client
        HELLO beyond is refused).
    :param max_pending_handshakes: connections that have not completed their HELLO;
        more are closed on accept.
    :param handshake_timeout: seconds a new connection has to complete its HELLO.
    :param frame_timeout: seconds a frame may take to arrive once it has begun, plus
        one second per MiB of its length; a connection that sends slower is closed.
    :param idle_timeout: seconds a client connection may send nothing (with nothing
        in flight) before it is closed; None = never. Peers are exempt.
    :param max_output_buffer: bytes of answers queued for a peer that does not read
        them; past it the connection is closed. (Reading stops long before, at the
        transport's high-water mark: this bounds what requests already in flight add.)
    :param close_grace: seconds ``close()`` lets connections flush before aborting them.
    :param backlog: listen backlog (TCP).
    """

    max_inflight: int = 1024
    max_connections: int = 10_000
    max_connections_per_source: int = 1024
    max_pending_handshakes: int = 256
    handshake_timeout: float = 10.0
    frame_timeout: float = 10.0
    idle_timeout: float | None = None
    max_output_buffer: int = 64 * 1024 * 1024
    close_grace: float = 5.0
    backlog: int = 1024

    def __post_init__(self) -> None:
        for name in (
            "max_inflight",
            "max_connections",
            "max_connections_per_source",
            "max_pending_handshakes",
            "max_output_buffer",
            "backlog",
        ):
            check_int(name, getattr(self, name), low=1)
        for name in ("handshake_timeout", "frame_timeout", "close_grace"):
            object.__setattr__(self, name, check_seconds(name, getattr(self, name)))
        if self.idle_timeout is not None:
            object.__setattr__(
                self, "idle_timeout", check_seconds("idle_timeout", self.idle_timeout)
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerOptions(ConnectionLimits):
    """Settings of a server, shared by all transports: who it is, how it checks
    HELLOs, its size limits, and (inherited) :class:`ConnectionLimits`.

    :param cluster: cluster name; HELLOs naming another cluster are refused.
    :param node_id: this node's id, sent in HELLO answers.
    :param auth: shared secret; when set, client HELLOs must carry it in ``auth``.
    :param peer_auth: checks the proofs of HELLOs that name a node id (see
        :mod:`hypercache.net.auth`); by default an open cluster's (loopback peers).
    :param limits: size limits (frames received above ``max_frame`` close the connection).
    :param busy_poll: seconds the loop stays awake after a connection writes (see
        :mod:`hypercache.net.busypoll`); 0 = off. Over kernel sockets only.
    :param tokens: when set, client HELLOs must carry one of these bearer tokens in
        ``auth`` (``auth`` is then not checked), and each client op is checked
        against its scopes (see :mod:`hypercache.net.security`).
    :param ssl: TLS context of the listening socket (TCP only); None = plaintext.
    """

    cluster: str
    node_id: str | None = None
    auth: str | None = None
    peer_auth: PeerAuthenticator = field(default_factory=lambda: PeerAuthenticator(None))
    limits: Limits = field(default_factory=Limits)
    busy_poll: float = 0.0
    tokens: TokenSet | None = None
    ssl: _ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if type(self.cluster) is not str or not self.cluster:
            raise ConfigError("cluster", "must be a non-empty string")
        try:
            check_window(self.busy_poll)
        except ValueError as exc:
            raise ConfigError("busy_poll", str(exc)) from None
        ConnectionLimits.__post_init__(self)


class Connection(Protocol):
    """Client side of one multiplexed connection (implemented per transport)."""

    #: the server's validated HELLO answer (``version``, ``cluster``, ``node_id``, ``info``).
    peer_hello: dict[str, Any]
    #: the address this connection was made to.
    address: str
    stats: NetStats
    #: seconds the loop stays awake after this connection writes; 0 = off (see
    #: :mod:`hypercache.net.busypoll`).
    busy_poll: float

    async def request(
        self, op: int, payload: Any, timeout: float, trace: dict[str, str] | None = None
    ) -> Any:
        """Send one request and return the response payload (``trace``: the trace
        context to carry; default the current span's).

        :raises HyperCacheError: the remote error, rebuilt by ``error_from_wire``.
        :raises RequestTimeoutError: no answer within ``timeout`` seconds (the
            connection stays usable; a late answer is dropped).
        :raises NodeUnavailableError: the connection is closed or lost.
        :raises ProtocolError: the payload cannot be encoded.
        :raises FrameTooLargeError: the request exceeds ``max_frame`` (not sent).
        """
        ...

    def send_callback(
        self,
        op: int,
        payload: Any,
        timeout: float,
        callback: Outcome,
        trace: dict[str, str] | None = None,
    ) -> None:
        """Send one request without a task; ``callback(answer, error)`` gets its outcome.

        The callback runs exactly once, from the loop (possibly from inside the read
        that brought the answer, so it must not block): ``error`` is None on success,
        else what :meth:`request` would raise. While the write buffer is full the
        request waits for room like :meth:`request` does (in a task).

        :raises NodeUnavailableError: the connection is closed (nothing is sent).
        :raises ProtocolError: the payload cannot be encoded (nothing is sent).
        :raises FrameTooLargeError: the request exceeds ``max_frame`` (not sent).
        """
        ...

    def send(self, op: int, payload: Any, timeout: float) -> asyncio.Future[Any]:
        """Send one request without a task; the returned future gets its outcome.

        Same errors as :meth:`send_callback`, raised here or set on the future.
        """
        ...

    async def close(self) -> None:
        """Close the connection; pending requests fail with NodeUnavailableError."""
        ...

    @property
    def closed(self) -> bool: ...

    @property
    def pending(self) -> int:
        """Requests sent (or waiting to be) that have no outcome yet."""
        ...


class Server(Protocol):
    """A listening server (implemented per transport)."""

    #: where the server listens (``"host:port"``; the real port once started).
    address: str
    #: its settings; read per connection, so new ones apply to the next connections
    #: (a node bound to port 0 renames itself once it knows the port).
    options: ServerOptions

    @property
    def stats(self) -> NetStats:
        """Counters of all connections, live and closed, plus connection gauges."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Stop listening, close every connection and wait for them (and their handlers)."""
        ...


class Transport(Protocol):
    """A factory of servers and connections, so the node layer can pick one."""

    def create_server(self, handler: Handler, address: str, options: ServerOptions) -> Server:
        """Return an unstarted server for ``handler`` bound to ``address``."""
        ...

    async def connect(
        self,
        address: str,
        hello: dict[str, Any],
        limits: Limits | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> Connection:
        """Connect and handshake.

        :raises NodeUnavailableError: cannot connect, or no handshake within ``timeout``.
        :raises HandshakeError: the server refused the HELLO (or answered for another
            cluster or version).
        """
        ...
