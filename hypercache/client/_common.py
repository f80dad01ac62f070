"""What the sync and async clients share: options, payloads, answers, counters.

The two clients differ only in how they wait (blocking sockets or asyncio); every
decision that does not wait lives here, written once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal

from hypercache.client.serializer import Serializer, resolve_serializer
from hypercache.client.topology import Router, Topology
from hypercache.consistency import Consistency
from hypercache.errors import (
    ConfigError,
    NodeUnavailableError,
    ProtocolError,
)
from hypercache.net.protocol import Limits, Op, make_hello
from hypercache.replication import (
    Entry,
    QuorumRound,
    entry_from_wire,
    is_live,
    plan_repair,
    wall_ms,
)
from hypercache.units import parse_hostport

__all__ = [
    "BATCH",
    "MAX_PENDING_REPAIRS",
    "PROBE_BACKOFF",
    "PROBE_TIMEOUT",
    "RETRY_AFTER_TIMEOUT",
    "ClientOptions",
    "ClientStats",
    "Entry",
    "OwnerRead",
    "Route",
    "decode_get",
    "entry_from_wire",
    "is_live",
    "parse_seeds",
    "probe_delays",
    "ttl_to_ms",
    "unreachable",
    "wall_ms",
    "wire_consistency",
]

Route = Literal["owner", "any"]

#: Requests sent in one pipelined batch (sync) or gathered at once (async) by
#: ``get_many``/``set_many``: bounds the buffers of a huge batch.
BATCH: Final = 1024
#: Read-repair pushes a client keeps in flight at most; beyond, a push is dropped
#: (counted in ``stats.read_repairs_dropped``) and anti-entropy repairs the owner later.
MAX_PENDING_REPAIRS: Final = 1024
#: Deadline of one probe ``PING`` of a node set aside (at most the client's ``timeout``).
PROBE_TIMEOUT: Final = 0.5
#: Pause after a node's first failed probe; it doubles after each failure, up to
#: ``retry_down_after``.
PROBE_BACKOFF: Final = 0.05
#: Operations that may be sent to another node after one timed out in the same call:
#: those that change nothing. A ``SET`` or ``DELETE`` that timed out may still be
#: applied by its node (when it wakes up, with a version stamped then), so sending it
#: elsewhere too could apply the write twice, the older one last: it is raised.
RETRY_AFTER_TIMEOUT: Final = frozenset({int(Op.GET), int(Op.R_GET), int(Op.PING), int(Op.TOPOLOGY)})


def probe_delays(cap: float) -> Iterator[float]:
    """Pauses between the probes of one node set aside: :data:`PROBE_BACKOFF`, doubling
    up to ``cap`` (``retry_down_after``), then ``cap`` for ever. A paused node costs a
    probe at most every ``cap + PROBE_TIMEOUT`` seconds, a dead one a refused
    connection every ``cap`` seconds."""
    delay = min(PROBE_BACKOFF, cap)
    while True:
        yield delay
        delay = min(delay * 2, cap)


def parse_seeds(seeds: str | Sequence[str]) -> tuple[str, ...]:
    """Return the seed addresses of ``"h:p,h:p"`` or a sequence of ``"h:p"``, deduplicated.

    :raises ConfigError: no seed, or a malformed address (field ``seeds``).
    """
    items = seeds.split(",") if isinstance(seeds, str) else list(seeds)
    out: dict[str, None] = {}
    for item in items:
        if not isinstance(item, str):
            raise ConfigError("seeds", f"addresses must be strings, got {item!r}")
        text = item.strip()
        if not text:
            continue
        try:
            parse_hostport(text)
        except ConfigError as exc:
            raise ConfigError("seeds", exc.message) from None
        out[text] = None
    if not out:
        raise ConfigError("seeds", "at least one 'host:port' is required")
    return tuple(out)


def wire_consistency(value: Consistency | str | None, fallback: str | None) -> str | None:
    """The consistency to send: ``value`` parsed, or ``fallback`` (the client default)."""
    if value is None:
        return fallback
    return Consistency.parse(value).value


def ttl_to_ms(ttl: float | None) -> int | None:
    """Seconds to whole milliseconds, rounded up so that a tiny TTL never means "no TTL".

    :raises TypeError: ``ttl`` is not a number.
    :raises ConfigError: ``ttl`` is not positive and finite (field ``ttl``).
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"ttl must be a number of seconds or None, not {type(ttl).__name__}")
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ConfigError("ttl", f"must be a positive finite number of seconds, got {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


def decode_get(answer: Any) -> tuple[bool, Any]:
    """Split a GET answer ``[found, value]``.

    :raises ProtocolError: the answer has another shape.
    """
    if type(answer) is not list or len(answer) != 2 or type(answer[0]) is not bool:
        raise ProtocolError(f"malformed GET answer: {answer!r:.200}")
    found, value = answer
    if found and not isinstance(value, bytes):
        raise ProtocolError(f"GET answer value must be bytes, got {type(value).__name__}")
    return found, value


class OwnerRead(QuorumRound):
    """One client-coordinated read of a key (``route="owner"``): which owners to ask,
    the answers, and the outcome. Pure bookkeeping, shared by both clients; they do
    the asking.

    A :class:`~hypercache.replication.QuorumRound` that asks only what it needs: the
    first ``required`` owners (in the router's order: table order, owners set aside
    last) are asked at once; each owner that fails (unreachable, timed out, an error
    answer, a malformed answer) is replaced at once by the next owner not asked yet
    (a read changes nothing, so asking another owner after a timeout is safe). The
    read succeeds at ``required`` answers and fails once every owner asked has
    answered or failed with fewer.

    :param key: the wire key.
    :param owners: the owners, in the order to ask them.
    :param required: answers needed (``Consistency.required(len(owners))``).
    """

    __slots__ = ("key",)

    def __init__(self, key: bytes, owners: tuple[str, ...], required: int) -> None:
        super().__init__(owners, required, ask_all=False)
        self.key = key

    def start(self) -> list[str]:
        """The owners to ask first (``required`` of them, or all if fewer)."""
        return list(super().start())

    def ok(self, owner: str, raw: Any) -> str | None:  # type: ignore[override]
        """Record ``owner``'s answer; return an owner to ask instead if it is malformed."""
        try:
            entry = entry_from_wire(raw)
        except ProtocolError as exc:
            return self.failed(owner, exc)
        super().ok(owner, entry)
        return None

    @property
    def answers(self) -> dict[str, Entry | None]:
        """owner -> its entry (``None``: it holds nothing)."""
        return self.results

    @property
    def done(self) -> bool:
        """Whether the read is over: quorum reached, or nothing left to wait for (every
        owner asked has answered or failed and none is left to ask; like a node, the
        client waits for the requests out so that ``acks`` is exact)."""
        return self.decided

    def outcome(self) -> tuple[Entry | None, list[tuple[str, Entry]]]:
        """The newest entry among the answers and the repairs to push
        (:func:`~hypercache.replication.plan_repair`: the newest version wins,
        tombstones and entries expired in flight included; the caller serves a miss
        through :func:`~hypercache.replication.is_live`).

        :raises QuorumError: fewer than ``required`` owners answered.
        """
        error = self.error()
        if error is not None:
            raise error
        return plan_repair(self.results, wall_ms())


def unreachable(what: str, errors: Mapping[str, BaseException]) -> NodeUnavailableError:
    """The error raised when no node could take a request."""
    if not errors:
        return NodeUnavailableError(f"{what}: no node to send to")
    parts = []
    for address, exc in errors.items():
        text = str(exc)
        parts.append(text if text.startswith(address) else f"{address}: {text}")
    detail = "; ".join(parts)
    return NodeUnavailableError(f"{what}: no node reachable ({detail})")


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientOptions:
    """Validated settings shared by :class:`~hypercache.client.Client` and
    :class:`~hypercache.client.AsyncClient` (see their docstrings for each field)."""

    seeds: tuple[str, ...]
    cluster_name: str = "hypercache"
    auth_token: str | None = None
    timeout: float = 2.0
    connect_timeout: float = 1.0
    consistency: str | None = None
    serializer: Serializer = field(default_factory=lambda: resolve_serializer(None))
    route: Route = "owner"
    limits: Limits = field(default_factory=Limits)
    topology_refresh: float = 30.0
    #: longest pause between two probes of a node set aside (s)
    retry_down_after: float = 1.0

    def __post_init__(self) -> None:
        if type(self.cluster_name) is not str or not self.cluster_name:
            raise ConfigError("cluster_name", "must be a non-empty string")
        if self.auth_token is not None and type(self.auth_token) is not str:
            raise ConfigError("auth_token", "must be a string or None")
        for name in ("timeout", "connect_timeout", "topology_refresh", "retry_down_after"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (value > 0 and math.isfinite(value))
            ):
                raise ConfigError(name, f"must be a positive number of seconds, got {value!r}")
        if self.route not in ("owner", "any"):
            raise ConfigError("route", f"expected 'owner' or 'any', got {self.route!r}")
        if not isinstance(self.limits, Limits):
            raise ConfigError("limits", f"must be a Limits, got {type(self.limits).__name__}")

    @classmethod
    def build(
        cls,
        seeds: str | Sequence[str],
        *,
        cluster_name: str,
        auth_token: str | None,
        timeout: float,
        connect_timeout: float,
        consistency: Consistency | str | None,
        serializer: Serializer | None,
        route: str,
        limits: Limits | None,
        topology_refresh: float,
    ) -> ClientOptions:
        """Validate the constructor arguments of a client."""
        level = None if consistency is None else Consistency.parse(consistency).value
        if route not in ("owner", "any"):
            raise ConfigError("route", f"expected 'owner' or 'any', got {route!r}")
        return cls(
            seeds=parse_seeds(seeds),
            cluster_name=cluster_name,
            auth_token=auth_token,
            timeout=timeout,
            connect_timeout=connect_timeout,
            consistency=level,
            serializer=resolve_serializer(serializer),
            route="owner" if route == "owner" else "any",
            limits=Limits() if limits is None else limits,
            topology_refresh=topology_refresh,
        )

    def hello(self) -> dict[str, Any]:
        """The HELLO payload of a client connection."""
        return make_hello(self.cluster_name, auth=self.auth_token)


@dataclass(slots=True)
class ClientStats:
    """Counters of one client (they only grow).

    :ivar requests: operations sent (a ``get_many`` of n keys counts n).
    :ivar failovers: times an operation moved on to another node after one failed.
    :ivar nodes_marked_down: times a node in use was set aside because it could not
        be reached (connection refused or failed, or lost).
    :ivar nodes_suspected: times a node in use was set aside because a request to it
        got no answer within ``timeout``.
    :ivar nodes_recovered: times a node set aside answered again (a probe's ``PING``
        or another request) and was used again.
    :ivar probes: ``PING`` probes sent to nodes set aside (connecting included).
    :ivar probes_failed: probes that got no answer (timed out, refused, failed).
    :ivar topology_refreshes: partition tables fetched.
    :ivar topology_errors: table fetches that failed.
    :ivar connections_opened: connections made to nodes.
    :ivar owner_reads: reads the client coordinated itself (``R_GET`` to the owners).
    :ivar read_repairs: ``R_PUT`` pushes of the newest version to a stale owner,
        sent by the client after a read whose owners disagreed.
    :ivar read_repairs_dropped: pushes not sent because ``max_pending_repairs`` were
        in flight already.
    """

    requests: int = 0
    failovers: int = 0
    nodes_marked_down: int = 0
    nodes_suspected: int = 0
    nodes_recovered: int = 0
    probes: int = 0
    probes_failed: int = 0
    topology_refreshes: int = 0
    topology_errors: int = 0
    connections_opened: int = 0
    owner_reads: int = 0
    read_repairs: int = 0
    read_repairs_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ClientBase:
    """What :class:`~hypercache.Client` and :class:`~hypercache.AsyncClient` share:
    the constructor, validated options, the router and the counters, and what
    happens to a node that fails.

    **Node health.** A node is *set aside* when a request to it timed out locally
    (no answer within ``timeout``: the node is paused, overloaded or cut off; an
    error answer that happens to be a timeout proves it alive and does not count)
    or when it could not be reached (refused or failed connection, connection
    lost). Both are one mechanism: the router puts the node last in every order,
    so that no operation is sent to it while another candidate is left (reads ask
    the other owners, writes go to the next owner, which coordinates), and the
    client probes it in the background (:meth:`_start_probe`: one probe per node
    at a time, a ``PING`` with a deadline of ``min(timeout, PROBE_TIMEOUT)``,
    repeated after :func:`probe_delays`). The first answer from the node, to a
    probe or to any request, brings it back. Setting aside never fails a request
    by itself: when every candidate is aside, they are still tried, last.

    Each subclass sets up its own connections in :meth:`_init_transport` and runs
    its probes in :meth:`_start_probe`."""

    #: read-repair pushes in flight at most (see ``MAX_PENDING_REPAIRS``)
    max_pending_repairs: int = MAX_PENDING_REPAIRS

    def __init__(
        self,
        seeds: str | Sequence[str] = "127.0.0.1:7400",
        *,
        cluster_name: str = "hypercache",
        auth_token: str | None = None,
        timeout: float = 2.0,
        connect_timeout: float = 1.0,
        consistency: Consistency | str | None = None,
        serializer: Serializer | None = None,
        route: str = "owner",
        limits: Limits | None = None,
        topology_refresh: float = 30.0,
    ) -> None:
        options = ClientOptions.build(
            seeds,
            cluster_name=cluster_name,
            auth_token=auth_token,
            timeout=timeout,
            connect_timeout=connect_timeout,
            consistency=consistency,
            serializer=serializer,
            route=route,
            limits=limits,
            topology_refresh=topology_refresh,
        )
        self.options = options
        #: counters of this client
        self.stats = ClientStats()
        self._router = Router(
            options.seeds, route=options.route, topology_refresh=options.topology_refresh
        )
        self._hello = options.hello()
        self._limits = options.limits
        self._timeout = options.timeout
        self._default = options.consistency
        self._dumps = options.serializer.dumps
        self._loads = options.serializer.loads
        self._closed = False
        self._init_transport()

    def _init_transport(self) -> None:
        raise NotImplementedError

    def _start_probe(self, address: str) -> None:
        """Probe ``address``, set aside, in the background until it answers (or the
        client closes); no-op when a probe of it is running already."""
        raise NotImplementedError

    @property
    def _probe_timeout(self) -> float:
        return min(self._timeout, PROBE_TIMEOUT)

    def _node_down(self, address: str) -> None:
        """``address`` could not be reached: set it aside and probe it."""
        if self._router.mark_down(address, time.monotonic()):
            self.stats.nodes_marked_down += 1
            self._start_probe(address)

    def _suspect(self, address: str) -> None:
        """A request to ``address`` got no answer in time: set it aside and probe it."""
        if self._router.mark_down(address, time.monotonic()):
            self.stats.nodes_suspected += 1
            self._start_probe(address)

    def _recovered(self, address: str) -> None:
        """``address`` answered: use it again if it was set aside."""
        if self._router.mark_up(address):
            self.stats.nodes_recovered += 1

    def _topology_fetched(self, address: str, topology: Topology) -> Topology:
        """Adopt a table fetched from ``address``."""
        self._router.set_topology(topology, time.monotonic())
        self._recovered(address)
        self.stats.topology_refreshes += 1
        return topology

    def _topology_unavailable(self, errors: Mapping[str, BaseException]) -> BaseException:
        """Record a refresh that no seed answered; the error to raise for it."""
        self.stats.topology_errors += 1
        self._router.refresh_failed(time.monotonic())
        if all(isinstance(exc, NodeUnavailableError) for exc in errors.values()):
            return unreachable("TOPOLOGY", errors)
        return next(exc for exc in errors.values() if not isinstance(exc, NodeUnavailableError))
