"""A cluster node: server, store, clock, ring, membership, coordinator, management HTTP.

:class:`Node` is what ``hypercache-node`` runs, and what an asyncio application can
embed::

    node = Node(config)
    await node.start()
    ...
    await node.stop()

It is the :class:`~hypercache.net.transport.SyncHandler` of its data-plane server:
every operation is handled inline by :meth:`Node.handle_sync` (no task per request;
client operations answer through a :class:`~hypercache.net.transport.Later`),
through a table from op to handler. Client operations (``GET``, ``SET``,
``DELETE``, ``TTL``, ``EXPIRE``) are coordinated by
:class:`~hypercache.cluster.coordinator.Coordinator`; ``SCAN`` (a page of this
node's keys) and ``FLUSH`` (drop them all) concern this node alone; what peers
ask of this node's store (``R_GET``, ``R_PUT``, ``R_DEL``, ``R_PUT_MANY``,
``MERKLE``, ``KEYS``, ``PULL``, ``STREAM``, ``HOLDS``) is answered by its
:class:`~hypercache.cluster.replica.Replica`. ``docs/cluster.md`` lists the payloads.

Lifecycle: what a node runs exists only while it runs. :meth:`start` binds the
server (so that a node bound to port 0 knows its address, hence its id, before
anything else is built), then builds every collaborator at once, in one
:class:`_Running` object; the accessors (:attr:`coordinator`, :attr:`membership`,
...) raise before that. Background loops, each stopped by :meth:`stop`:
membership (seeds, SWIM probes), expiry sweep (expired entries and tombstones),
anti-entropy, hint replay (:mod:`hypercache.cluster.handoff`), rebalancing
(:mod:`hypercache.cluster.rebalance`: every ring change is handed to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from hypercache._core.hints import HintBuffer
from hypercache._core.hlc import HLC, node_tag
from hypercache._core.ring import DEFAULT_VNODES, Ring
from hypercache._core.vstore import VersionedStore
from hypercache.cluster.antientropy import AntiEntropy
from hypercache.cluster.config import DistConfig
from hypercache.cluster.coordinator import Coordinator
from hypercache.cluster.cpulatency import CpuLatencyRequest
from hypercache.cluster.direct import DirectWrites
from hypercache.cluster.handoff import Handoff
from hypercache.cluster.membership import Membership
from hypercache.cluster.metrics import NodeMetrics, faults_families
from hypercache.cluster.rebalance import PartitionStates, Rebalancer
from hypercache.cluster.replica import Replica
from hypercache.cluster.security import NodeSecurity
from hypercache.cluster.watch import Sink, Watchers
from hypercache.errors import NodeUnavailableError, PermissionDeniedError, ProtocolError
from hypercache.net.auth import PeerAuthenticator
from hypercache.net.busypoll import BusyPoller, poller
from hypercache.net.compression import ValueCodec
from hypercache.net.faults import FaultInjector, FaultyTransport
from hypercache.net.protocol import FEATURE_COMPRESSION, FEATURE_SET_VERSION, Op
from hypercache.net.tcp import TCP
from hypercache.net.transport import Later, PeerInfo, Server, ServerOptions, Transport
from hypercache.replication import WallClock, wall_ms

__all__ = ["ListenError", "Node"]

_log = logging.getLogger("hypercache.node")

_PING: Final = int(Op.PING)
_GET: Final = int(Op.GET)
_R_GET: Final = int(Op.R_GET)
_FEATURE_COMPRESSION: Final = FEATURE_COMPRESSION
_FEATURE_SET_VERSION: Final = FEATURE_SET_VERSION
_SET: Final = int(Op.SET)

# Period and batch of the expiry sweep.
_SWEEP_INTERVAL: Final = 1.0
_SWEEP_BUDGET: Final = 10_000

#: A handler of the op table: the payload in, the answer (or a Later) out.
_OpHandler = Callable[[Any], Any]


class ListenError(OSError):
    """The node cannot listen on one of its addresses.

    :ivar setting: which address: ``"bind"`` (data) or ``"http"`` (management).
    :ivar address: the address asked for.
    """

    def __init__(self, setting: str, address: str, cause: OSError) -> None:
        # (asyncio's own text repeats the address as a tuple)
        reason = os.strerror(cause.errno).lower() if cause.errno else str(cause)
        super().__init__(cause.errno, f"cannot listen on {address} ({setting}): {reason}")
        self.setting = setting
        self.address = address


@dataclass(eq=False)
class _Running:
    """What a started node runs: built at once by :meth:`Node.start`."""

    server: Server
    clock: HLC
    membership: Membership
    replica: Replica
    coordinator: Coordinator
    antientropy: AntiEntropy
    handoff: Handoff
    rebalancer: Rebalancer
    #: op -> (handler, only cluster peers may send it)
    ops: dict[int, tuple[_OpHandler, bool]]
    #: op -> handler, for a client's connection: the ops open to clients, with the
    #: handlers that count a client's own read as such (route "direct")
    client_ops: dict[int, _OpHandler]
    #: the same, for a client that does not read compressed values (its HELLO does
    #: not list FEATURE_COMPRESSION): the ops that answer values decode them first
    plain_client_ops: dict[int, _OpHandler]
    poller: BusyPoller | None = None
    #: the handoff's hint buffer (FLUSH clears it)
    hint_buffer: HintBuffer | None = None
    sweeper: asyncio.Task[None] | None = None
    http: Any = None  # the aiohttp runner of the management HTTP
    #: the connections watching this node's writes (WATCH)
    watchers: Watchers | None = None


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
        #: TLS contexts, client tokens and their checks (docs/security.md)
        self.security = NodeSecurity(config.security)
        if transport is None:
            transport = self.security.transport() or TCP
        self.transport: Transport = transport
        if config.fault_injection and not isinstance(self.transport, FaultyTransport):
            self.transport = FaultyTransport(self.transport)
        #: the fault rules of this node's peer messages (``--fault-injection``, or a
        #: FaultyTransport given); None: no faults can be injected
        self.faults: FaultInjector | None = (
            self.transport.injector if isinstance(self.transport, FaultyTransport) else None
        )
        self.limits = config.limits
        self.store = VersionedStore(
            config.partitions,
            max_bytes=config.max_memory,
            max_items=config.max_items,
            tombstone_ttl_ms=int(config.tombstone_ttl * 1000),
        )
        self._wall: WallClock = wall_ms
        #: counters and latency histograms (a registry of this node's own)
        self.metrics = NodeMetrics(config.node_id)
        #: makes and checks the proofs of the cluster secret in peer handshakes
        self.peer_auth = PeerAuthenticator(config.cluster_secret)
        #: peer operations refused to client connections
        self.peer_ops_refused = 0
        #: entries reclaimed by the expiry loop: (expired, tombstones purged)
        self.swept = [0, 0]
        self.http_address: str | None = None
        #: ring rebuilds seen (the ring follows the member set)
        self.epoch = 0
        self.ring: Ring = Ring([config.node_id], **self._ring_args())
        self._want_http = http and config.http is not None
        self._run: _Running | None = None
        self._started_at = 0.0
        self._state = "new"
        self._topology: dict[str, Any] | None = None
        #: the leave under way or done (:meth:`leave`), and the end of :meth:`stop`
        self._leaving: asyncio.Task[dict[str, Any]] | None = None
        self._stopper: asyncio.Future[None] | None = None  # leave_and_stop's
        self._stopped = asyncio.Event()
        self._leads: tuple[int, dict[str, list[int]]] = (-1, {})
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

    @property
    def started_at(self) -> float:
        """``time.monotonic()`` when the node started; 0 before."""
        return self._started_at

    @property
    def wall_ms(self) -> WallClock:
        """The node's wall clock (ms), what expiries are judged by everywhere in it.

        Tests move it forward (``node.wall_ms = lambda: wall_ms() + 61_000``) instead
        of sleeping through a TTL; every collaborator reads the one set here.
        """
        return self._wall

    @wall_ms.setter
    def wall_ms(self, clock: WallClock) -> None:
        self._wall = clock
        run = self._run
        if run is not None:
            run.replica.wall = run.coordinator.wall = run.antientropy.wall = clock

    # -------------------------------------------------------- running collaborators

    def _running(self) -> _Running:
        run = self._run
        if run is None:
            raise RuntimeError(f"node {self.node_id} not started")
        return run

    @property
    def is_started(self) -> bool:
        """Whether :meth:`start` built the collaborators (still true once stopped)."""
        return self._run is not None

    @property
    def server(self) -> Server:
        return self._running().server

    @property
    def clock(self) -> HLC:
        return self._running().clock

    @property
    def membership(self) -> Membership:
        return self._running().membership

    @property
    def replica(self) -> Replica:
        return self._running().replica

    @property
    def coordinator(self) -> Coordinator:
        return self._running().coordinator

    @property
    def antientropy(self) -> AntiEntropy:
        return self._running().antientropy

    @property
    def handoff(self) -> Handoff:
        return self._running().handoff

    @property
    def rebalancer(self) -> Rebalancer:
        return self._running().rebalancer

    @property
    def poller(self) -> BusyPoller | None:
        """This loop's busy poller, when the node has a window (counted in ``/stats``)."""
        return self._running().poller

    # ----------------------------------------------------------------- lifecycle

    def _server_options(self, config: DistConfig) -> ServerOptions:
        caps = config.connections
        return ServerOptions(
            cluster=config.cluster_name,
            node_id=config.node_id,
            auth=config.auth_token,
            peer_auth=self.peer_auth,
            limits=self.limits,
            busy_poll=config.busy_poll,
            tokens=self.security.tokens,
            ssl=self.security.server_ssl,
            **{f.name: getattr(caps, f.name) for f in dataclasses.fields(caps)},
        )

    def _ring_args(self) -> dict[str, int]:
        placement = self.config.placement
        return {
            "vnodes": placement.vnodes or DEFAULT_VNODES,
            "partitions": placement.partitions,
            "replication": placement.replication,
        }

    async def start(self) -> None:
        """Listen, join the cluster through the seeds, start the management HTTP server.

        :raises ListenError: an address cannot be bound (an ``OSError``).
        """
        if self._state != "new":
            raise RuntimeError(f"node already {self._state}")
        config = self.config
        server = self.transport.create_server(self, config.bind, self._server_options(config))
        try:
            await server.start()
        except OSError as exc:
            raise ListenError("bind", config.bind, exc) from exc
        # No await from here to the end of the set-up: no HELLO can be handled
        # before the node knows its final id and address.
        if server.address != config.bind:
            self.config = config = config.with_bind(server.address)
            # The server reads its options per connection, so new ones see this.
            server.options = self._server_options(config)
        self._run = run = self._build(server)
        self.ring = Ring([config.node_id], **self._ring_args())
        self.epoch = 1
        self._started_at = time.monotonic()
        self._state = "running"
        if self.cpu_latency is not None:
            self.cpu_latency.acquire()
        run.rebalancer.start(self.ring)
        run.membership.start()
        run.antientropy.start()
        run.handoff.start()
        run.sweeper = asyncio.get_running_loop().create_task(
            self._sweep_loop(), name="hypercache-expiry"
        )
        http = config.http_address
        if self._want_http and http is not None:
            from hypercache.cluster.http import start_http
            from hypercache.cluster.status import NodeStatus

            try:
                run.http, self.http_address = await start_http(
                    NodeStatus(self), *http, faults=self.faults, **self.security.http_options()
                )
            except BaseException as exc:
                await self.stop()
                if isinstance(exc, OSError):
                    raise ListenError("http", config.http or "", exc) from exc
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

    def _build(self, server: Server) -> _Running:
        """Every collaborator of a running node, wired to each other."""
        from hypercache.cluster.status import NodeStatus

        config = self.config
        clock = HLC(node_tag(config.node_id), max_skew_ms=round(config.max_clock_skew * 1000))
        metrics = self.metrics
        metrics.node_id = config.node_id
        membership = Membership(
            config,
            self.transport,
            node_id=config.node_id,
            address=config.advertised,
            limits=self.limits,
            on_change=self._on_members,
            peer_auth=self.peer_auth,
        )
        # -- rebalancing: a node started with seeds (joining, or restarted empty)
        # holds no partition until it has streamed it; a founder holds them all.
        joining = any(seed != config.advertised for seed in config.seeds)
        states = PartitionStates(config.partitions, held=not joining)
        replica = Replica(
            store=self.store,
            clock=clock,
            limits=self.limits,
            stats=metrics.stats,
            wall=self._wall,
            direct_latency=metrics.direct_latency.observe,
            states=states,
        )
        watchers = replica.watchers = Watchers(
            max_watchers=config.watch_max_watchers,
            max_prefixes=config.watch_max_prefixes,
            max_pending_bytes=config.watch_max_pending_bytes,
            max_key=self.limits.max_key,
        )
        rebalancer = Rebalancer(
            node_id=config.node_id,
            store=self.store,
            states=states,
            apply=replica.put_stream,
            peers=lambda: dict(membership.peers),
            settings=config.rebalance,
            limits=self.limits,
            timeout=config.request_timeout,
            joining=joining,
            on_change=self._pending_changed,
            # (the anti-entropy is built below; verifying starts only once running)
            verify=lambda parts: antientropy.sync_now(parts),
        )
        # -- end rebalancing
        coordinator = Coordinator(
            node_id=config.node_id,
            config=config,
            replica=replica,
            clock=clock,
            membership=membership,
            owners=self._owners,
            metrics=metrics,
            limits=self.limits,
        )
        antientropy = AntiEntropy(
            store=self.store,
            limits=self.limits,
            apply=functools.partial(replica.put, path="antientropy"),
            peers=lambda: dict(membership.peers),
            leads=self.leads,
            interval=config.antientropy.anti_entropy_interval,
            max_interval=config.antientropy.anti_entropy_max_interval,
            timeout=config.request_timeout,
            wall=self._wall,
        )
        hints = config.hints
        hint_buffer = HintBuffer(
            max_per_node=hints.hint_max_per_node,
            max_total=hints.hint_max_total,
            max_bytes=hints.hint_max_bytes,
            ttl_ms=int(hints.hint_ttl * 1000),
        )
        handoff = Handoff(
            buffer=hint_buffer,
            peers=lambda: dict(membership.peers),
            batch=hints.hint_replay_batch,
            batch_bytes=config.max_frame // 2,
            timeout=config.request_timeout,
        )
        coordinator.hints = handoff
        coordinator.moves = rebalancer
        membership.liveness_listeners.append(self._on_liveness)
        membership.restart_listeners.append(self._on_restart)
        run = _Running(
            server=server,
            clock=clock,
            membership=membership,
            replica=replica,
            coordinator=coordinator,
            antientropy=antientropy,
            handoff=handoff,
            rebalancer=rebalancer,
            ops=(ops := self._op_table(replica, coordinator, membership)),
            client_ops=(client_ops := self.security.restrict(self._client_table(ops, replica))),
            plain_client_ops=_plain_values(client_ops, ValueCodec(None, self.limits.max_value)),
            poller=poller(asyncio.get_running_loop()) if config.busy_poll else None,
            hint_buffer=hint_buffer,
            watchers=watchers,
        )
        metrics.add_source(NodeStatus(self).collect)
        metrics.add_source(watchers.collect)
        metrics.add_source(antientropy.collect)
        metrics.add_source(handoff.collect)
        metrics.add_source(rebalancer.collect)
        faults = self.faults
        if faults is not None:
            faults.local = frozenset((config.node_id, config.advertised))
        metrics.add_source(lambda: faults_families(None if faults is None else faults.injected))
        metrics.add_source(self.security.collect)
        return run

    @staticmethod
    def _client_table(
        ops: dict[int, tuple[_OpHandler, bool]], replica: Replica
    ) -> dict[int, _OpHandler]:  # (W_PUT and W_HINT are open to clients as they are)
        """The handlers a client's connection may reach: every op not for peers only;
        a client's ``R_GET`` (its own read of an owner) counted as a direct read."""
        table = {op: handler for op, (handler, peers_only) in ops.items() if not peers_only}
        table[int(Op.R_GET)] = replica.r_get_direct
        handle_add = table[int(Op.ADD)]

        def add(payload: Any) -> Any:
            # Only a peer's ADD is taken as forwarded (a client's carries 4 fields).
            _fields(payload, 4, "ADD", "[key, value, ttl_ms, consistency]")
            return handle_add(payload)

        table[int(Op.ADD)] = add
        return table

    def _op_table(
        self, replica: Replica, coordinator: Coordinator, membership: Membership
    ) -> dict[int, tuple[_OpHandler, bool]]:
        """What :meth:`handle_sync` dispatches to, and whether only peers may send it.

        ``R_GET`` and ``R_PUT`` stay open to clients, which read from owners and push
        read repairs (every version they carry is checked against the clock's
        horizon like any other); hint replays, repair pushes, a delete's replica
        half and anti-entropy are for peers only.
        """

        def get(payload: Any) -> Later:
            key, consistency = _fields(payload, 2, "GET", "[key, consistency]")
            return coordinator.start_get(key, consistency)

        def set_(payload: Any) -> Later:
            key, value, ttl_ms, consistency = _fields(
                payload, 4, "SET", "[key, value, ttl_ms, consistency]"
            )
            return coordinator.start_set(key, value, ttl_ms, consistency)

        def add(payload: Any) -> Later:
            # A peer forwards a client's ADD to the key's first live owner with a
            # fifth field (true): carried out there, not forwarded again.
            forwarded = type(payload) is list and len(payload) == 5 and payload[4] is True
            key, value, ttl_ms, consistency = _fields(
                payload[:4] if forwarded else payload, 4, "ADD", "[key, value, ttl_ms, consistency]"
            )
            return coordinator.start_add(key, value, ttl_ms, consistency, forwarded)

        def delete(payload: Any) -> Later:
            key, consistency = _fields(payload, 2, "DELETE", "[key, consistency]")
            return coordinator.start_delete(key, consistency)

        def ttl(payload: Any) -> Later:
            key, consistency = _fields(payload, 2, "TTL", "[key, consistency]")
            return coordinator.start_ttl(key, consistency)

        def expire(payload: Any) -> Later:
            key, ttl_ms, consistency = _fields(payload, 3, "EXPIRE", "[key, ttl_ms, consistency]")
            return coordinator.start_expire(key, ttl_ms, consistency)

        direct = DirectWrites(
            node_id=self.config.node_id,
            replica=replica,
            owners=self._owners,
            coordinator=coordinator,
            membership=membership,
            max_skew_ms=round(self.config.max_clock_skew * 1000),
        )

        def flush(payload: Any) -> int:
            if payload is not None and payload != []:
                raise ProtocolError("FLUSH payload must be []")
            return self.flush()

        def leave(payload: Any) -> dict[str, Any]:
            if payload is not None and payload != []:
                raise ProtocolError("LEAVE payload must be []")
            return self.leave_and_stop()

        def remove(payload: Any) -> dict[str, Any]:
            (node_id,) = _fields(payload, 1, "REMOVE", "[node_id]")
            if type(node_id) is not str:
                raise ProtocolError("REMOVE payload must be [node_id: str]")
            return self.remove_member(node_id)

        return {
            # TTL and EXPIRE are coordinated; SCAN and FLUSH concern this node alone
            int(Op.TTL): (ttl, False),
            int(Op.EXPIRE): (expire, False),
            int(Op.SCAN): (replica.scan, False),
            int(Op.FLUSH): (flush, False),
            # an operator's: this node leaves (and stops); a dead member is removed
            int(Op.LEAVE): (leave, False),
            int(Op.REMOVE): (remove, False),
            int(Op.R_PUT): (replica.r_put, False),
            int(Op.R_GET): (replica.r_get, False),
            int(Op.GET): (get, False),
            int(Op.SET): (set_, False),
            # one-hop client writes: a client-stamped version straight to an owner
            int(Op.W_PUT): (direct.w_put, False),
            int(Op.W_HINT): (direct.w_hint, False),
            int(Op.ADD): (add, False),
            int(Op.DELETE): (delete, False),
            int(Op.TOPOLOGY): (lambda _payload: self.topology(), False),
            int(Op.R_DEL): (replica.r_del, True),
            int(Op.R_PUT_MANY): (replica.r_put_many, True),
            int(Op.MERKLE): (replica.merkle, True),
            int(Op.KEYS): (replica.keys, True),
            int(Op.PULL): (replica.pull, True),
            # Membership (SWIM): indirect probes and push-pull of the member table.
            int(Op.PING_REQ): (membership.on_ping_req, True),
            int(Op.MEMBERS): (membership.on_members, True),
            int(Op.STREAM): (replica.stream, True),
            int(Op.HOLDS): (replica.holds, True),
        }

    @property
    def leaving(self) -> bool:
        """Whether the node left or is leaving the cluster (:meth:`leave`)."""
        return self._leaving is not None

    def leave(self) -> asyncio.Future[dict[str, Any]]:
        """Leave the cluster gracefully; the node goes on serving until :meth:`stop`.

        In order: ``left`` is announced (out of this node's ring at once, gossiped
        until a few peers took it), every partition this node holds is pushed to the
        owners that gained it, then the node waits until the owners of everything it
        holds, in the table without it, confirm they hold it. ``leave_timeout``
        bounds the whole (each step gets what the previous ones left of it).
        Idempotent: every call waits for the same leave. Answers the report:
        ``{"peers_told", "pushed", "handed_over", "seconds"}`` (``handed_over``
        false when the timeout passed first, or no other member is left).
        """
        if self._leaving is None:
            self._leaving = asyncio.get_running_loop().create_task(
                self._leave(), name="hypercache-leave"
            )
        return asyncio.shield(self._leaving)

    async def _leave(self) -> dict[str, Any]:
        run = self._running()
        start = time.monotonic()
        deadline = start + self.config.leave_timeout
        old_table = run.rebalancer.table
        told = await run.membership.leave()
        pushed, handed_over = 0, False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                pushed = await run.rebalancer.push_out(old_table, run.replica.wall)
        left = deadline - time.monotonic()
        if left > 0:
            handed_over = await run.rebalancer.hand_over(left)
        report = {
            "peers_told": told,
            "pushed": pushed,
            "handed_over": handed_over,
            "seconds": round(time.monotonic() - start, 3),
        }
        log = _log.info if handed_over or not told else _log.warning
        log("left the cluster: %s", report)
        return report

    def leave_and_stop(self) -> dict[str, Any]:
        """Start leaving the cluster, then stop once the leave is done (``LEAVE``,
        ``POST /cluster/leave``); answer at once what was started. The node serves
        meanwhile; :meth:`wait_stopped` returns when it has stopped."""
        if self._stopper is None:
            _log.info("asked to leave the cluster")
            # (kept: the loop holds only a weak reference to a task)
            self._stopper = asyncio.ensure_future(self.stop(leave=True))
            self._stopper.add_done_callback(_log_failure)
        return {
            "node_id": self.node_id,
            "leaving": True,
            "leave_timeout": self.config.leave_timeout,
        }

    def remove_member(self, node_id: str) -> dict[str, Any]:
        """Take the dead (or suspect) member ``node_id`` out of the ring, on every
        node (gossiped); answer ``{"node_id", "removed", "version"}`` (``removed``
        false when it was removed already).

        :raises ConfigError: (field ``node``) not a member, or neither dead nor suspect.
        """
        membership = self._running().membership
        removed = membership.remove(node_id)
        return {"node_id": node_id, "removed": removed, "version": membership.version}

    async def wait_stopped(self) -> None:
        """Wait until :meth:`stop` has finished (however it was called)."""
        await self._stopped.wait()

    async def stop(self, *, leave: bool = False) -> None:
        """Stop every loop, close every connection and both servers. Idempotent.

        :param leave: leave the cluster first (:meth:`leave`, bounded by
            ``leave_timeout``), so that the data this node holds reaches its new
            owners before it goes.
        """
        if leave and self._state == "running":
            await self.leave()
        if self._state in ("stopping", "stopped", "new"):
            self._state = "stopped" if self._state == "new" else self._state
            if self._state == "stopped":
                self._stopped.set()
            return
        self._state = "stopping"
        run = self._running()
        leaving = self._leaving
        if leaving is not None and not leaving.done():
            leaving.cancel()  # stopped before its hand-over was done
            with contextlib.suppress(asyncio.CancelledError):
                await leaving
        if run.sweeper is not None:
            run.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run.sweeper
            run.sweeper = None
        await run.rebalancer.stop()
        await run.antientropy.stop()
        await run.handoff.stop()
        if run.http is not None:
            runner, run.http = run.http, None
            await runner.cleanup()
        # Stop serving first (handlers still running are cancelled), then what the
        # handlers used: background replica requests, then the peer connections.
        await run.server.close()
        await run.coordinator.stop()
        await run.membership.stop()
        if self.cpu_latency is not None:
            self.cpu_latency.release()
        self._state = "stopped"
        self._stopped.set()
        _log.info("node %s stopped", self.node_id)

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _sweep_loop(self) -> None:
        # Expired entries are reclaimed when touched; this reclaims the untouched
        # ones, in bounded batches so one pass never stalls the loop.
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            expired, purged = self.store.sweep(self._wall(), _SWEEP_BUDGET)
            self.swept[0] += expired
            self.swept[1] += purged

    # ---------------------------------------------------------------------- ring

    def _owners(self, key: bytes) -> list[str]:
        owners: list[str] = self.ring.owners(key)
        return owners

    def _on_members(self, members: list[tuple[str, str]]) -> None:
        # The ring follows the membership's ring members (alive, suspect, dead); a
        # node that left keeps routing through the others (or alone, itself).
        ids = [nid for nid, _ in members] or [self.node_id]
        old = self.ring
        gone = set(old.nodes) - set(ids)
        self.ring = Ring(ids, **self._ring_args())
        self.epoch += 1
        self._topology = None
        run = self._run
        if run is not None:
            # A member that left or was removed gets no more hints: drop its queue.
            for node_id in gone:
                if not run.membership.hintable(node_id):
                    run.handoff.forget(node_id)
            run.rebalancer.on_ring(old, self.ring)  # partitions follow the new ring
        _log.info("ring rebuilt for %d members (epoch %d)", len(ids), self.epoch)

    def _on_liveness(self, node_id: str, up: bool) -> None:
        # A peer back up may have missed writes: replay its hints and compare with it.
        run = self._run
        if up and run is not None and self._state == "running":
            run.handoff.wake(node_id)
            run.antientropy.wake()
            # rebalancing: it may have restarted empty (it pulls by itself), and our
            # transfers waiting for a source can go on
            run.rebalancer.on_peer_restart(node_id)

    def _on_restart(self, node_id: str) -> None:
        # A peer in a new life (it may have come back empty before anyone saw it
        # down): the same as a peer back up.
        self._on_liveness(node_id, True)

    def _pending_changed(self) -> None:
        # The topology answer lists the pending owners (rebalancing).
        self._topology = None

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
        run = self._run
        if run is None:
            return [[self.node_id, self.address]]
        return run.membership.member_list()

    def topology(self) -> dict[str, Any]:
        """The ``TOPOLOGY`` answer: what a client needs to route to owners itself.

        ``pending`` maps each partition being handed over to its previous owners
        (indexes into ``nodes``), which get its writes too until the hand-over ends.
        """
        topo = self._topology
        if topo is None:
            ring = self.ring
            nodes = self.members()
            run = self._run
            pending = (
                [] if run is None else run.rebalancer.pending_indexes([nid for nid, _ in nodes])
            )
            topo = self._topology = {
                "epoch": self.epoch,
                "version": 0,
                "partitions": int(ring.partitions),
                "replication": int(ring.replication),
                "nodes": nodes,
                "table": ring.table(),
                "pending": pending,
                # Clients coordinate reads themselves; they need the default level.
                "read_consistency": self.config.read_consistency.value,
                # So that a client can refuse a value the nodes would (optional key).
                "max_value": self.limits.max_value,
                # Clients that write the owners themselves need the default level.
                "write_consistency": self.config.write_consistency.value,
            }
        run = self._run
        if run is not None:
            # The membership version moves on changes of state too, not only when
            # the ring is rebuilt: what clients compare to know their table stale.
            topo["version"] = run.membership.version
        return topo

    # ------------------------------------------------------------------- handler

    def hello_info(self, peer_hello: dict[str, Any]) -> dict[str, Any]:
        """HELLO answer ``info``: our id, address and members; learn from node peers
        (the server only hands us a ``node_id`` for a connection it accepted as a peer)."""
        run = self._run
        if run is None:
            return {"node_id": self.node_id, "address": self.address, "members": []}
        if peer_hello.get("node_id") is not None:
            run.membership.learn_from_hello(peer_hello)
        return run.membership.hello_info()

    async def handle(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        """Carry out one request (see the module docstring for the operations)."""
        result = self.handle_sync(conn_info, op, payload)
        if type(result) is Later:
            return await result.wait()
        return result

    def handle_sync(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        """Carry out one request inline: the answer, or a :class:`Later` for client
        operations, which wait on other owners. Every handler here is synchronous
        (the store is in memory), so no request needs a task."""
        run = self._run
        if run is None or self._state != "running":
            raise NodeUnavailableError(f"{self.node_id}: node is {self._state}")
        if conn_info.is_node:
            entry = run.ops.get(op)
            if entry is not None:
                return entry[0](payload)
        else:
            if conn_info.scopes is not None:  # a token's client (docs/security.md)
                self.security.check_op(conn_info, op)
            # A client of the previous version reads values as it wrote them.
            table = (
                run.client_ops
                if _FEATURE_COMPRESSION in conn_info.features
                else run.plain_client_ops
            )
            handler = table.get(op)
            if handler is not None:
                if op == _SET and _FEATURE_SET_VERSION in conn_info.features:
                    # the SET that answers [true, ts] (the set_version feature)
                    key, value, ttl_ms, consistency = _fields(
                        payload, 4, "SET", "[key, value, ttl_ms, consistency]"
                    )
                    return run.coordinator.start_set(
                        key, value, ttl_ms, consistency, versioned=True
                    )
                return handler(payload)
            if op in run.ops:
                self.peer_ops_refused += 1
                raise PermissionDeniedError(
                    f"op {Op(op).name} is for cluster peers; this connection is a client"
                )
        if op == _PING:
            # A client's ping answers "pong"; a peer's carries SWIM gossip.
            return run.membership.on_ping(conn_info.node_id, payload)
        raise ProtocolError(f"unsupported operation {op}")

    def watch(self, conn_info: PeerInfo, payload: Any, sink: Sink) -> Any:
        """``WATCH`` (the server hands us the connection, to push notifications on;
        :mod:`hypercache.cluster.watch`). Scope ``read`` for a token's client."""
        run = self._run
        if run is None or self._state != "running" or run.watchers is None:
            raise NodeUnavailableError(f"{self.node_id}: node is {self._state}")
        if conn_info.scopes is not None:
            self.security.check_op(conn_info, int(Op.WATCH))
        return run.watchers.watch(sink, payload)

    def flush(self) -> int:
        """``FLUSH``: drop every entry this node holds, tombstones included, and the
        hints it queued for other nodes (replayed, they would bring flushed writes
        back); return how many live data entries were dropped (counted in
        ``hypercache_flushes_total`` and ``hypercache_flushed_entries_total``).

        Only this node: a cluster is flushed node by node (``Client.flush``), and a
        node that missed it gives its entries back to the others by anti-entropy."""
        run = self._running()
        store = self.store
        store.sweep(self._wall())  # what expired is not counted as dropped
        dropped = len(store)
        store.clear()
        if run.watchers is not None:
            run.watchers.flushed()
        if run.hint_buffer is not None:
            run.hint_buffer.clear()
        stats = self.metrics.stats
        stats.flushes += 1
        stats.flushed_entries += dropped
        _log.warning("node %s flushed: %d entries dropped", self.node_id, dropped)
        return dropped

    def key_count(self) -> int:
        """Live entries in the local store (tombstones excluded)."""
        return len(self.store)

    def stats(self) -> dict[str, Any]:
        """What ``GET /stats`` shows (:meth:`hypercache.cluster.status.NodeStatus.stats`)."""
        from hypercache.cluster.status import NodeStatus

        return NodeStatus(self).stats()


if TYPE_CHECKING:  # Node implements the server's handler interface, fast path included
    from hypercache.net.transport import SyncHandler

    _handler: SyncHandler = Node.__new__(Node)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("leaving the cluster failed", exc_info=task.exception())


def _plain_values(table: dict[int, _OpHandler], codec: ValueCodec) -> dict[int, _OpHandler]:
    """``table`` for a client that does not read compressed values (its HELLO does not
    list :data:`~hypercache.net.protocol.FEATURE_COMPRESSION`): the ops that answer a
    value (``GET``'s ``[found, value]``, ``R_GET``'s entry) answer it decoded, as the
    client wrote it, bounded by ``max_value`` (a decompression bomb is refused with
    :class:`~hypercache.errors.ValueTooLargeError`). Peers get the stored bytes as
    they are. An op added later that answers values must be wrapped here too."""
    decode = codec.decode
    plain = dict(table)

    def entry(raw: Any) -> Any:
        if type(raw) is list and raw and type(raw[0]) is bytes and raw[0][:1] == b"\xc1":
            return [decode(raw[0]), *raw[1:]]
        return raw

    def found(answer: Any) -> Any:
        if type(answer) is list and len(answer) == 2 and type(answer[1]) is bytes:
            value = answer[1]
            if value[:1] == b"\xc1":
                return [answer[0], decode(value)]
        return answer

    def mapped(handler: _OpHandler, fix: Callable[[Any], Any]) -> _OpHandler:
        def plain_handler(payload: Any) -> Any:
            result = handler(payload)
            if type(result) is not Later:
                return fix(result)
            out = Later()

            def settle(value: Any, error: BaseException | None) -> None:
                if error is not None:
                    out.reject(error)
                    return
                try:
                    fixed = fix(value)
                except Exception as exc:
                    out.reject(exc)
                    return
                out.resolve(fixed)

            result.bind(settle)
            return out

        return plain_handler

    for op, fix in ((_GET, found), (_R_GET, entry)):
        handler = plain.get(op)
        if handler is not None:
            plain[op] = mapped(handler, fix)
    return plain


def _fields(payload: Any, n: int, op: str, shape: str) -> list[Any]:
    if type(payload) is not list or len(payload) != n:
        raise ProtocolError(f"{op} payload must be {shape}")
    return payload
