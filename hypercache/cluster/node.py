"""A cluster node: server, store, clock, ring, membership, coordinator, management HTTP.

:class:`Node` is what ``hypercache-node`` runs, and what an asyncio application can
embed::

    node = Node(config)
    await node.start()
    ...
    await node.stop()

It is the :class:`~hypercache.net.transport.SyncHandler` of its data-plane server:
every operation is handled inline by :meth:`Node.handle_sync` (no task per request;
client operations answer through a :class:`~hypercache.net.transport.Later`). Client
operations (``GET``, ``SET``, ``DELETE``, ``TOPOLOGY``, ``PING``) are coordinated by
:class:`~hypercache.cluster.coordinator.Coordinator`; replica operations (``R_GET``,
``R_PUT``, ``R_PUT_MANY``) from peer coordinators and the handoff loops are served
from the local store, and so are the anti-entropy requests (``MERKLE``, ``KEYS``,
``PULL``) of :mod:`hypercache.cluster.antientropy`. ``docs/cluster.md`` lists the
payloads.

Background loops, each stopped by :meth:`Node.stop`: membership (seeds,
heartbeats), expiry sweep (expired entries and tombstones), anti-entropy, hint
replay (:mod:`hypercache.cluster.handoff`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from hypercache._core.hints import HintBuffer
from hypercache._core.hlc import HLC, node_tag, wall_clock_ms
from hypercache._core.ring import DEFAULT_VNODES, Ring
from hypercache._core.vstore import VersionedStore
from hypercache.cluster import antientropy
from hypercache.cluster.antientropy import AntiEntropy
from hypercache.cluster.config import DistConfig
from hypercache.cluster.coordinator import Coordinator
from hypercache.cluster.cpulatency import CpuLatencyRequest
from hypercache.cluster.handoff import Handoff
from hypercache.cluster.membership import Membership
from hypercache.cluster.metrics import NodeMetrics, counter, gauge
from hypercache.errors import NodeUnavailableError, PermissionDeniedError, ProtocolError
from hypercache.net.auth import PeerAuthenticator
from hypercache.net.busypoll import BusyPoller, poller
from hypercache.net.protocol import Limits, Op
from hypercache.net.tcp import TCP
from hypercache.net.transport import Later, PeerInfo, Server, ServerOptions, Transport

__all__ = ["Node"]

_log = logging.getLogger("hypercache.node")

_PING: Final = int(Op.PING)
_GET: Final = int(Op.GET)
_SET: Final = int(Op.SET)
_DELETE: Final = int(Op.DELETE)
_TOPOLOGY: Final = int(Op.TOPOLOGY)
_R_GET: Final = int(Op.R_GET)
_R_PUT: Final = int(Op.R_PUT)
_R_PUT_MANY: Final = int(Op.R_PUT_MANY)
_R_DEL: Final = int(Op.R_DEL)
_MERKLE: Final = int(Op.MERKLE)
_KEYS: Final = int(Op.KEYS)
_PULL: Final = int(Op.PULL)

#: Operations only cluster peers may send (hint replays, repair pushes, a delete's
#: replica half, anti-entropy). ``R_GET`` and ``R_PUT`` stay open to clients, which
#: read from owners and push read repairs; every version they carry is checked
#: against the clock's horizon like any other.
_PEER_OPS: Final = frozenset({_R_PUT_MANY, _R_DEL, _MERKLE, _KEYS, _PULL})

# Period and batch of the expiry sweep.
_SWEEP_INTERVAL: Final = 1.0
_SWEEP_BUDGET: Final = 10_000


class Node:
    """One node of a hypercache cluster.

    :param config: the node's settings (see :class:`~hypercache.cluster.config.DistConfig`).
    :param transport: how to listen and reach peers; TCP by default, an
        :class:`~hypercache.net.inproc.InprocNetwork` in unit tests.
    :param http: start the management HTTP server on ``config.http`` (when set).

    After :meth:`start`, :attr:`address` is the bound data address and
    :attr:`http_address` the bound management address (``None`` when off); with
    port 0 in ``bind`` a derived node id is derived again from the real port.
    """

    def __init__(
        self, config: DistConfig, *, transport: Transport | None = None, http: bool = True
    ) -> None:
        self.config = config
        self.transport: Transport = transport if transport is not None else TCP
        self.limits = Limits(
            max_frame=config.max_frame, max_key=config.max_key, max_value=config.max_value
        )
        self.store = VersionedStore(
            config.partitions,
            max_bytes=config.max_memory,
            max_items=config.max_items,
            tombstone_ttl_ms=int(config.tombstone_ttl * 1000),
        )
        self._wall_ms: Callable[[], int] = wall_clock_ms
        #: makes and checks the proofs of the cluster secret in peer handshakes
        self.peer_auth = PeerAuthenticator(config.cluster_secret)
        #: peer operations refused to client connections
        self.peer_ops_refused = 0
        self._want_http = http and config.http is not None
        self._sweeper: asyncio.Task[None] | None = None
        #: entries reclaimed by the expiry loop: (expired, tombstones purged)
        self.swept = [0, 0]
        self._server: Server | None = None
        self._http: Any = None
        self._started_at = 0.0
        self._state = "new"
        self.http_address: str | None = None
        self.epoch = 0
        self.ring: Ring = Ring([config.node_id], **self._ring_args())
        self._topology: dict[str, Any] | None = None
        # Filled in by start(), once the real address (and so the node id) is known.
        self.clock: HLC = self._new_clock()
        self.metrics = NodeMetrics(config.node_id)
        self.membership: Membership | None = None
        self.coordinator: Coordinator | None = None
        self.antientropy: AntiEntropy | None = None
        self.handoff: Handoff | None = None
        self._leads: tuple[int, dict[str, list[int]]] = (-1, {})
        # This loop's busy polling, when the node has a window (counted in /stats).
        self._poller: BusyPoller | None = None
        limit = config.cpu_latency_limit
        #: the CPU wake-up latency limit held while running, if one is configured
        self.cpu_latency: CpuLatencyRequest | None = (
            None if limit is None else CpuLatencyRequest(round(limit * 1e6))
        )

    # ------------------------------------------------------------------ identity

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def address(self) -> str:
        """The data-plane address (the bound one once started)."""
        return self.config.bind

    @property
    def state(self) -> str:
        """``new``, ``running``, ``stopping`` or ``stopped``."""
        return self._state

    def _server_options(self, config: DistConfig) -> ServerOptions:
        return ServerOptions(
            cluster=config.cluster_name,
            node_id=config.node_id,
            auth=config.auth_token,
            peer_auth=self.peer_auth,
            limits=self.limits,
            busy_poll=config.busy_poll,
            max_connections=config.max_connections,
            max_connections_per_source=config.max_connections_per_source,
            max_pending_handshakes=config.max_pending_handshakes,
            handshake_timeout=config.handshake_timeout,
            frame_timeout=config.frame_timeout,
            idle_timeout=config.idle_timeout,
            max_output_buffer=config.max_output_buffer,
        )

    def _new_clock(self) -> HLC:
        config = self.config
        return HLC(node_tag(config.node_id), max_skew_ms=round(config.max_clock_skew * 1000))

    def _ring_args(self) -> dict[str, int]:
        c = self.config
        return {
            "vnodes": c.vnodes or DEFAULT_VNODES,
            "partitions": c.partitions,
            "replication": c.replication,
        }

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen, join the cluster through the seeds, start the management HTTP server.

        :raises OSError: an address cannot be bound.
        """
        if self._state != "new":
            raise RuntimeError(f"node already {self._state}")
        config = self.config
        options = self._server_options(config)
        server = self.transport.create_server(self, config.bind, options)
        await server.start()
        # No await from here to the end of the membership set-up: no HELLO can be
        # handled before the node knows its final id and address.
        self._server = server
        if server.address != config.bind:
            self.config = config = config.with_bind(server.address)
            if config.node_id != options.node_id:
                # The server reads its options per connection, so new ones see this.
                vars(server)["options"] = self._server_options(config)
        self.clock = self._new_clock()
        self.metrics = NodeMetrics(config.node_id)
        self.metrics.add_source(self._collect)
        self.ring = Ring([config.node_id], **self._ring_args())
        self.epoch = 1
        self.membership = Membership(
            config,
            self.transport,
            node_id=config.node_id,
            address=server.address,
            limits=self.limits,
            on_change=self._on_members,
            peer_auth=self.peer_auth,
        )
        self.coordinator = Coordinator(
            node_id=config.node_id,
            config=config,
            store=self.store,
            clock=self.clock,
            membership=self.membership,
            owners=self._owners,
            metrics=self.metrics,
            limits=self.limits,
            wall_ms=self._wall_ms,
        )
        coordinator = self.coordinator
        membership = self.membership
        self.antientropy = AntiEntropy(
            store=self.store,
            limits=self.limits,
            apply=functools.partial(coordinator.replica_put, path="antientropy"),
            peers=lambda: dict(membership.peers),
            leads=self.leads,
            interval=config.anti_entropy_interval,
            max_interval=config.anti_entropy_max_interval,
            timeout=config.request_timeout,
        )
        self.metrics.add_source(self.antientropy.collect)
        self.handoff = Handoff(
            buffer=HintBuffer(
                max_per_node=config.hint_max_per_node,
                max_total=config.hint_max_total,
                max_bytes=config.hint_max_bytes,
                ttl_ms=int(config.hint_ttl * 1000),
            ),
            peers=lambda: dict(membership.peers),
            batch=config.hint_replay_batch,
            batch_bytes=config.max_frame // 2,
            timeout=config.request_timeout,
        )
        coordinator.hints = self.handoff
        self.metrics.add_source(self.handoff.collect)
        membership.liveness_listeners.append(self._on_liveness)
        self._started_at = time.monotonic()
        self._state = "running"
        if self.cpu_latency is not None:
            self.cpu_latency.acquire()
        if config.busy_poll:
            self._poller = poller(asyncio.get_running_loop())
        self.membership.start()
        self.antientropy.start()
        self.handoff.start()
        self._sweeper = asyncio.get_running_loop().create_task(
            self._sweep_loop(), name="hypercache-expiry"
        )
        if self._want_http:
            from hypercache.cluster.http import start_http

            try:
                self._http, self.http_address = await start_http(self)
            except BaseException:
                await self.stop()
                raise
            if self.http_address != config.http:
                self.config = config = dataclasses.replace(config, http=self.http_address)
        _log.info(
            "node %s listening on %s (http %s), seeds %s",
            config.node_id,
            server.address,
            self.http_address or "off",
            ",".join(config.seeds) or "none",
        )

    async def stop(self) -> None:
        """Stop every loop, close every connection and both servers. Idempotent."""
        if self._state in ("stopping", "stopped", "new"):
            self._state = "stopped" if self._state == "new" else self._state
            return
        self._state = "stopping"
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self.antientropy is not None:
            await self.antientropy.stop()
        if self.handoff is not None:
            await self.handoff.stop()
        if self._http is not None:
            runner, self._http = self._http, None
            await runner.cleanup()
        # Stop serving first (handlers still running are cancelled), then what the
        # handlers used: background replica requests, then the peer connections.
        if self._server is not None:
            await self._server.close()
        if self.coordinator is not None:
            await self.coordinator.stop()
        if self.membership is not None:
            await self.membership.stop()
        if self.cpu_latency is not None:
            self.cpu_latency.release()
        self._state = "stopped"
        _log.info("node %s stopped", self.node_id)

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def wall_ms(self) -> Callable[[], int]:
        """The node's wall clock (ms) of expiries: the expiry loop sweeps at it and the
        coordinator sets and checks TTLs at it. Tests set it to move time forward
        instead of sleeping through a TTL."""
        return self._wall_ms

    @wall_ms.setter
    def wall_ms(self, clock: Callable[[], int]) -> None:
        self._wall_ms = clock
        if self.coordinator is not None:
            self.coordinator.wall_ms = clock

    @property
    def server(self) -> Server:
        if self._server is None:
            raise RuntimeError("node not started")
        return self._server

    async def _sweep_loop(self) -> None:
        # Expired entries are reclaimed when touched; this reclaims the untouched
        # ones, in bounded batches so one pass never stalls the loop.
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            expired, purged = self.store.sweep(self.wall_ms(), _SWEEP_BUDGET)
            self.swept[0] += expired
            self.swept[1] += purged

    # ---------------------------------------------------------------------- ring

    def _owners(self, key: bytes) -> list[str]:
        owners: list[str] = self.ring.owners(key)
        return owners

    def _on_members(self, members: list[tuple[str, str]]) -> None:
        self.ring = Ring([nid for nid, _ in members], **self._ring_args())
        self.epoch += 1
        self._topology = None
        _log.info("ring rebuilt for %d members (epoch %d)", len(members), self.epoch)

    def _on_liveness(self, node_id: str, up: bool) -> None:
        # A peer back up may have missed writes: replay its hints and compare with it.
        if up and self._state == "running":
            if self.handoff is not None:
                self.handoff.wake(node_id)
            if self.antientropy is not None:
                self.antientropy.wake()

    def leads(self, peer_id: str) -> list[int]:
        """Partitions this node syncs with ``peer_id`` by anti-entropy: those both
        own where this node comes first in the owner list (so each pair of owners
        of a partition is synced by one of the two). Cached per ring."""
        epoch, table = self._leads
        if epoch != self.epoch:
            ring = self.ring
            me = self.node_id
            table = {}
            for p in range(int(ring.partitions)):
                owners: list[str] = ring.partition_owners(p)
                if me in owners:
                    for other in owners[owners.index(me) + 1 :]:
                        table.setdefault(other, []).append(p)
            self._leads = (self.epoch, table)
        return table.get(peer_id, [])

    def members(self) -> list[list[str]]:
        """``[[node_id, address], ...]`` sorted by id, this node included."""
        if self.membership is None:
            return [[self.node_id, self.address]]
        return self.membership.member_list()

    def topology(self) -> dict[str, Any]:
        """The ``TOPOLOGY`` answer: what a client needs to route to owners itself."""
        topo = self._topology
        if topo is None:
            ring = self.ring
            topo = self._topology = {
                "epoch": self.epoch,
                "partitions": int(ring.partitions),
                "replication": int(ring.replication),
                "nodes": self.members(),
                "table": ring.table(),
                # Clients coordinate reads themselves; they need the default level.
                "read_consistency": self.config.read_consistency.value,
            }
        return topo

    # ------------------------------------------------------------------- handler

    def hello_info(self, peer_hello: dict[str, Any]) -> dict[str, Any]:
        """HELLO answer ``info``: our id, address and members; learn from node peers
        (the server only hands us a ``node_id`` for a connection it accepted as a peer)."""
        membership = self.membership
        if membership is None:
            return {"node_id": self.node_id, "address": self.address, "members": []}
        if peer_hello.get("node_id") is not None:
            membership.learn_from_hello(peer_hello)
        return membership.hello_info()

    async def handle(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        """Carry out one request (see the module docstring for the operations)."""
        result = self.handle_sync(conn_info, op, payload)
        if type(result) is Later:
            return await self._await_later(result)
        return result

    async def _await_later(self, later: Later) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if not fut.done():
                if error is None:
                    fut.set_result(value)
                else:
                    fut.set_exception(error)

        later.bind(settle)
        return await fut

    def handle_sync(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        """Carry out one request inline: the answer, or a :class:`Later` for client
        operations, which wait on other owners. Every handler here is synchronous
        (the store is in memory), so no request needs a task."""
        coord = self.coordinator
        if coord is None or self._state != "running":
            raise NodeUnavailableError(f"{self.node_id}: node is {self._state}")
        # Most frequent first: replica traffic, then client operations.
        if op == _R_PUT:
            return coord.handle_r_put(payload)
        if op == _R_GET:
            return coord.handle_r_get(payload)
        if op == _GET:
            key, consistency = _fields(payload, 2, "GET", "[key, consistency]")
            return coord.start_get(key, consistency)
        if op == _SET:
            key, value, ttl_ms, consistency = _fields(
                payload, 4, "SET", "[key, value, ttl_ms, consistency]"
            )
            return coord.start_set(key, value, ttl_ms, consistency)
        if op == _DELETE:
            key, consistency = _fields(payload, 2, "DELETE", "[key, consistency]")
            return coord.start_delete(key, consistency)
        if op in _PEER_OPS and not conn_info.is_node:
            self.peer_ops_refused += 1
            raise PermissionDeniedError(
                f"op {Op(op).name} is for cluster peers; this connection is a client"
            )
        if op == _R_DEL:
            return coord.handle_r_del(payload)
        if op == _R_PUT_MANY:
            return coord.handle_r_put_many(payload)
        if op == _MERKLE:
            return antientropy.handle_merkle(self.store, payload)
        if op == _KEYS:
            return antientropy.handle_keys(self.store, payload)
        if op == _PULL:
            return antientropy.handle_pull(self.store, self.limits, payload)
        if op == _PING:
            if conn_info.node_id is not None and self.membership is not None:
                self.membership.observe_ping(conn_info.node_id, payload)
            return "pong"
        if op == _TOPOLOGY:
            return self.topology()
        raise ProtocolError(f"unsupported operation {op}")

    # ------------------------------------------------------------------- metrics

    def hint_stats(self) -> dict[str, Any]:
        """What ``GET /dist/hints`` shows (``queued``: hints waiting now)."""
        body: dict[str, Any] = {"node_id": self.node_id}
        if self.handoff is not None:
            body.update(self.handoff.as_dict())
        else:
            body["queued"] = 0
        return body

    def key_count(self) -> int:
        """Live entries in the local store (tombstones excluded)."""
        return len(self.store)

    def stats(self) -> dict[str, Any]:
        """What ``GET /stats`` shows."""
        store = self.store
        membership = self.membership
        return {
            "node_id": self.node_id,
            "state": self._state,
            "address": self.address,
            "http": self.http_address,
            "uptime_s": round(time.monotonic() - self._started_at, 3) if self._started_at else 0,
            "keys": self.key_count(),
            "store": {
                "keys": self.key_count(),
                "bytes": int(store.bytes),
                "max_bytes": int(store.max_bytes),
                "tombstones": int(store.tombstones),
                "evictions": int(store.evictions),
                "expirations": int(store.expirations),
                "tombstones_purged": int(store.tombstones_purged),
            },
            "members": len(self.members()),
            "members_up": membership.up_count() if membership is not None else 1,
            "epoch": self.epoch,
            "clock": {
                "last_ts": int(self.clock.last),
                "drift_ms": int(self.clock.drift_ms),
                "max_skew_ms": int(self.clock.max_skew_ms),
            },
            "peer_auth": {
                "secret": self.peer_auth.enabled,
                "refused": self.peer_auth.refused,
                "replays": self.peer_auth.replays,
                "peer_ops_refused": self.peer_ops_refused,
            },
            "net": self._server.stats.as_dict() if self._server is not None else {},
            "dist": self.metrics.stats.as_dict(),
            "antientropy": self.antientropy.stats.as_dict() if self.antientropy else {},
            "background": self.coordinator.background if self.coordinator else 0,
            "busy_poll": self._busy_poll_stats(),
            "cpu_latency_limit": self._cpu_latency_stats(),
        }

    def _busy_poll_stats(self) -> dict[str, Any] | None:
        p = self._poller
        if p is None:
            return None
        return {
            "window_us": round(self.config.busy_poll * 1e6, 3),
            "windows": p.windows,
            "polling_s": round(p.spin_ns / 1e9, 6),
        }

    def _cpu_latency_stats(self) -> dict[str, Any] | None:
        request = self.cpu_latency
        if request is None:
            return None
        return {"limit_us": request.limit_us, "held": request.held, "error": request.error}

    def _collect(self) -> Iterator[Any]:
        store = self.store
        yield gauge("hypercache_keys", "Live entries in the local store", self.key_count())
        yield gauge("hypercache_bytes", "Bytes charged to the local store", int(store.bytes))
        yield gauge("hypercache_max_bytes", "Byte budget of the store (0 = none)", store.max_bytes)
        yield gauge("hypercache_tombstones", "Tombstones held", int(store.tombstones))
        yield counter("hypercache_evictions", "Entries evicted by the budget", store.evictions)
        yield counter("hypercache_expirations", "Entries expired by TTL", store.expirations)
        yield counter("hypercache_tombstones_purged", "Tombstones purged", store.tombstones_purged)
        membership = self.membership
        if membership is not None:
            yield gauge("hypercache_dist_members", "Members known", len(membership.members))
            yield gauge("hypercache_dist_members_up", "Members up", membership.up_count())
            yield counter(
                "hypercache_dist_heartbeat_failures",
                "Heartbeats that failed",
                membership.heartbeats_failed,
            )
            yield counter(
                "hypercache_dist_liveness_changes",
                "Times a peer was marked down or back up",
                membership.liveness_changes,
            )
            yield counter(
                "hypercache_dist_heartbeat_stalls",
                "Heartbeat rounds over failure_timeout late (this node stalled); no peer "
                "is marked down on them",
                membership.stalls,
            )
        yield gauge("hypercache_dist_ring_epoch", "Ring rebuilds seen", self.epoch)
        yield gauge(
            "hypercache_dist_clock_drift_seconds",
            "How far the hybrid logical clock runs ahead of the wall clock",
            self.clock.drift_ms / 1000,
        )
        yield counter(
            "hypercache_dist_peer_handshakes_refused",
            "HELLOs naming a node id refused: no, wrong, stale or replayed proof of the "
            "cluster secret, or (open cluster) not from loopback",
            self.peer_auth.refused,
        )
        yield counter(
            "hypercache_dist_peer_ops_refused",
            "Peer operations (replica, hint, anti-entropy) refused to client connections",
            self.peer_ops_refused,
        )
        if membership is not None:
            yield gauge(
                "hypercache_dist_member_candidates",
                "Claimed members waiting for a handshake to confirm them",
                len(membership.candidates),
            )
            yield counter(
                "hypercache_dist_member_candidates_dropped",
                "Member claims dropped: too many waiting (MAX_CANDIDATES)",
                membership.candidates_dropped,
            )
        if self._poller is not None:
            yield counter(
                "hypercache_busy_poll_windows",
                "Times the event loop was kept awake after a socket write",
                self._poller.windows,
            )
            yield counter(
                "hypercache_busy_poll_seconds",
                "Seconds the event loop polled instead of sleeping",
                self._poller.spin_ns / 1e9,
            )
        if self.cpu_latency is not None:
            yield gauge(
                "hypercache_cpu_latency_limit_held",
                "1 while the configured CPU wake-up latency limit is held, else 0",
                int(self.cpu_latency.held),
            )
        if self.coordinator is not None:
            yield gauge(
                "hypercache_dist_background_requests",
                "Replica requests and repairs still running",
                self.coordinator.background,
            )
        if self._server is not None:
            net = self._server.stats
            for name in (
                "frames_in",
                "frames_out",
                "bytes_in",
                "bytes_out",
                "protocol_errors",
                "handshake_failures",
                "connections_accepted",
                "connections_rejected",
                # Caps and backpressure that bite: reading paused at the in-flight
                # cap, writing paused by a full socket buffer, request deadlines.
                "inflight_pauses",
                "write_pauses",
                "timeouts",
                # Connection caps and deadlines (see ServerOptions).
                "expired",
                "rejected_source",
                "rejected_pending",
                "rejected_clients",
                "frame_timeouts",
                "idle_closes",
                "output_limit_closes",
            ):
                yield counter(f"hypercache_net_{name}", f"Server {name}", getattr(net, name))
            yield gauge("hypercache_net_connections_open", "Open connections", net.connections_open)
            yield gauge("hypercache_net_in_flight", "Requests being handled", net.in_flight)


if TYPE_CHECKING:  # Node implements the server's handler interface, fast path included
    from hypercache.net.transport import SyncHandler

    _handler: SyncHandler = Node.__new__(Node)


def _fields(payload: Any, n: int, op: str, shape: str) -> list[Any]:
    if type(payload) is not list or len(payload) != n:
        raise ProtocolError(f"{op} payload must be {shape}")
    return payload
