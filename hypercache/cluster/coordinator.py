"""Coordination of client operations: quorum fan-out, versions, read repair.

Whichever node receives a client ``GET``, ``SET`` or ``DELETE`` coordinates it:

1. the ring names the key's owners (``n`` of them, ``n = min(replication, members)``);
2. the request goes to every owner at once: the local replica (when this node is an
   owner) is read or written directly, the others get ``R_GET`` / ``R_PUT`` over their
   peer connection. Owners the failure detector marks down are not asked: they count
   as missing acks at once, so a dead owner costs no waiting;
3. the operation returns as soon as ``Consistency.required(n)`` owners acknowledged.
   Owners that answer later still complete in the background (a write still lands on
   every live owner). When every owner has answered or failed short of the quorum it
   fails with :class:`~hypercache.errors.QuorumError` carrying the acks that did land
   (each replica request is bounded by ``request_timeout``, and down owners fail at
   once, so this is quick when owners are dead rather than slow).

Versions: a write or a delete is stamped once, by the coordinator, with its hybrid
logical clock: ``(ts, origin)``. Every replica applies an entry only when its version
is newer than what it holds (equal is a no-op), so replays, late deliveries, repairs
and concurrent writers all converge on the same newest version everywhere. A replica
advances its clock past every version it receives. TTLs travel as an absolute expiry
in wall-clock milliseconds (0 = none). A delete writes a tombstone.

Read repair: a QUORUM or ALL read waits for its quorum, returns the newest version it
saw, and, once every asked owner has answered (or failed), pushes the newest version
to the owners :func:`~hypercache.replication.plan_repair` names (an older version or
none). Each push counts in ``read_repairs``; at most ``MAX_PENDING_REPAIRS`` are in
flight, and a push beyond that is dropped (``read_repairs_dropped``: anti-entropy
repairs later). Every answer is checked against the clock's horizon first.

Hinted handoff: when an owner misses a write or a delete (it is down, the request
timed out, failed or was refused), the coordinator hands the entry to the node's
:class:`~hypercache.cluster.handoff.Handoff` for that owner, which replays it when
the owner is back; never for a member that left or was removed
(:meth:`~hypercache.cluster.membership.Membership.hintable`). Queuing a hint never
blocks: a full buffer drops it and counts the drop.

Cost: the coordinator runs no task per operation nor per replica request. A client
operation arrives through :meth:`Node.handle_sync` (inline, from the read that
brought it) and gets a :class:`~hypercache.net.transport.Later`; replica requests go
out with the peer's :meth:`~hypercache.net.peer.PeerConnection.send_callback` and
their answers feed the operation's :class:`~hypercache.replication.QuorumRound`
from the read that brings them; the round answers the ``Later`` at quorum, from
that same read. A QUORUM set thus costs the coordinator one loop iteration per
network hop (a peer not connected yet is dialed in a task first). The async
:meth:`Coordinator.get`, :meth:`~Coordinator.set` and :meth:`~Coordinator.delete`
await the same ``Later``.

``TTL`` reads like ``GET`` and answers the expiry of the newest live version;
``EXPIRE`` reads like ``GET`` then writes the value it found back with the new
expiry through the ``SET`` path (a new version: last writer wins against a
concurrent ``SET``; see ``docs/cluster.md``).

``DELETE`` answers whether the key existed: each remote owner gets ``R_DEL``, which
writes the tombstone and answers what the owner held before it (one round trip),
and the answer is whether the newest of the entries held by acknowledging owners
was a live value.

Moving partitions (:mod:`hypercache.cluster.rebalance`): while the rebalancer is
*active* (partitions are changing hands, or this node is not ready), each operation
looks at its key's partition. A write or a delete also goes to the partition's
*pending owners* (old owners that left it less than ``removal_grace`` ago), best
effort: those copies count towards no quorum, are not hinted, and at most
``MAX_PENDING_COPIES`` are in flight (``pending_copies_dropped`` beyond). A read
that meets an owner not ready (:class:`~hypercache.errors.NotReadyError`, this
node's own replica included) asks a pending owner in its place, whose answer counts
like the owner's (``not_ready_substitutions``); without one it is a failed owner,
never a miss. A node that is joining and has met no member yet coordinates nothing
(``NotReadyError``). Otherwise the hot path reads one flag.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from hypercache.cluster.config import DistConfig
from hypercache.cluster.handoff import Handoff
from hypercache.cluster.membership import Membership
from hypercache.cluster.metrics import CLIENT_OPS, DistStats, NodeMetrics
from hypercache.cluster.replica import PUT_MANY_COPY, PUT_MANY_READ_REPAIR, Replica
from hypercache.consistency import Consistency
from hypercache.errors import (
    ConfigError,
    HyperCacheError,
    NodeUnavailableError,
    NotReadyError,
    ProtocolError,
    QuorumError,
    RequestTimeoutError,
    UsageError,
)
from hypercache.net.protocol import MAX_PUT_MANY, Limits, Op
from hypercache.net.transport import Later
from hypercache.observe import tracing
from hypercache.observe.tracing import OpTrace
from hypercache.replication import Entry, QuorumRound, entry_from_wire, is_live, newest, plan_repair

__all__ = ["MAX_PENDING_COPIES", "MAX_PENDING_REPAIRS", "Coordinator", "Moves"]

_log = logging.getLogger("hypercache.coordinator")

_R_GET: Final = int(Op.R_GET)
_R_PUT: Final = int(Op.R_PUT)
_R_DEL: Final = int(Op.R_DEL)
_R_PUT_MANY: Final = int(Op.R_PUT_MANY)
_ADD: Final = int(Op.ADD)
#: Read-repair pushes a coordinator keeps in flight at most; beyond, a push is dropped
#: (counted in ``read_repairs_dropped``) and anti-entropy repairs the owner later.
MAX_PENDING_REPAIRS: Final = 1024
#: Copies of writes to pending (previous) owners kept in flight at most; beyond, one
#: is not sent (counted in ``pending_copies_dropped``).
MAX_PENDING_COPIES: Final = 1024

_ONE: Final = Consistency.ONE
#: wire spelling -> level; anything else goes through Consistency.parse (which
#: accepts other letter cases and blanks, and raises the validation error).
_LEVELS: Final = {level.value: level for level in Consistency}


class Clock(Protocol):
    """What the coordinator needs of the hybrid logical clock."""

    @property
    def tag(self) -> int: ...

    def now(self) -> int: ...

    def update(self, remote_ts: int) -> int: ...

    def admits(self, remote_ts: object) -> bool: ...


class Moves(Protocol):
    """What the coordinator asks of the rebalancer
    (:class:`~hypercache.cluster.rebalance.Rebalancer`) while partitions move."""

    #: whether anything moves (the only thing the hot path reads otherwise)
    active: bool

    def check_serving(self) -> None:
        """:raises NotReadyError: this node may not coordinate yet."""
        ...

    def is_ready(self, p: int) -> bool:
        """Whether this node holds partition ``p``."""
        ...

    def previous_owners(self, p: int) -> list[str]:
        """Partition ``p``'s pending owners (this node may be one)."""
        ...


class Coordinator:
    """Runs client operations against the owners of each key.

    :param config: the node's configuration (defaults, timeouts).
    :param replica: this node's replica side (its own copy of the keys it owns).
    :param clock: the node's hybrid logical clock.
    :param membership: peers and their liveness.
    :param owners: ``key -> [node_id, ...]`` from the current ring.
    :param metrics: counters and latency histograms.
    """

    def __init__(
        self,
        *,
        node_id: str,
        config: DistConfig,
        replica: Replica,
        clock: Clock,
        membership: Membership,
        owners: Callable[[bytes], list[str]],
        metrics: NodeMetrics,
        limits: Limits,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.replica = replica
        self.wall = replica.wall
        self.clock = clock
        self.membership = membership
        self.owners = owners
        self.metrics = metrics
        self.stats: DistStats = metrics.stats
        self.limits = limits
        self.timeout = config.request_timeout
        self._tag = clock.tag
        self._in_flight = 0  # replica requests sent with a callback, not answered yet
        self._repairs_pending = 0  # read-repair pushes in flight
        # owner -> read-repair entries for it, sent together at the end of this
        # event-loop iteration (one R_PUT_MANY per owner, see _repair)
        self._repair_batches: dict[str, list[list[Any]]] = {}
        self._stopping = False
        # The running loop, taken once (asyncio.get_running_loop() costs a getpid()
        # system call per call on CPython 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._latency = {op: metrics.latency[op].observe for op in CLIENT_OPS}
        #: receives the writes owners missed; None: no hinted handoff
        self.hints: Handoff | None = None
        #: the partitions on the move; None: nothing ever moves
        self.moves: Moves | None = None
        self._partition_of = replica.store.partition_of
        self._copies_pending = 0  # copies to pending owners in flight

    # ----------------------------------------------------------------- helpers

    def _level(self, raw: Any, default: Consistency) -> Consistency:
        if raw is None:
            return default
        level = _LEVELS.get(raw) if type(raw) is str else None
        if level is not None:
            return level
        if isinstance(raw, str | Consistency):
            return Consistency.parse(raw, field="consistency")
        raise ConfigError("consistency", f"expected 'one', 'quorum', 'all' or nil, got {raw!r}")

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _remote(
        self,
        rnd: QuorumRound,
        owner: str,
        op: int,
        payload: Any,
        kind: str,
        hint: list[Any] | None = None,
        trace: OpTrace | None = None,
    ) -> None:
        """Send one replica request in the background; its outcome goes to ``rnd``.

        With ``hint`` (an ``R_PUT`` payload), a failure queues it as a hint for ``owner``.
        With ``trace``, the request has its ``ReplicaRequest`` span and carries it.
        """
        peer = self.membership.peers.get(owner)
        if peer is None or not peer.up:
            self.stats.replica_failures += 1
            rnd.failed(owner, "down")
            if trace is not None:
                trace.local(owner, kind, "down")
            if hint is not None:
                self._hint(owner, hint)
            return
        self.stats.forwards[kind] += 1
        # No task, no future when connected: the answer is handled from the read that
        # brings it (the peer's connection keeps its liveness up to date).
        self._in_flight += 1
        call = None if trace is None else trace.replica(owner, kind)
        carrier = None if call is None else call.carrier
        timeout = self.timeout
        if op == _R_PUT:
            # Retry policy (docs/design.md, "Retries"): a replica write gets half the
            # deadline, and when it gets no answer in that time (or loses its
            # connection) it is sent once more, with what is left of the deadline.
            # An R_PUT is idempotent (the same version applied twice is a no-op), so
            # a retry after a lost answer does no harm. No timer is armed for it: the
            # connection's own deadline of the first attempt starts the second.
            half = timeout / 2
            deadline = self._get_loop().time() + timeout

            def retried(value: Any, error: BaseException | None) -> None:
                self._in_flight -= 1
                if call is not None:
                    call.done(error)
                if error is None:
                    rnd.ok(owner, value)
                else:
                    self._replica_failed(rnd, owner, error, hint)

            def first(value: Any, error: BaseException | None) -> None:
                if isinstance(error, RequestTimeoutError | NodeUnavailableError) and not (
                    self._stopping
                ):
                    left = deadline - self._get_loop().time()
                    if left > 0:
                        self.stats.replica_retries += 1
                        peer.send_callback(op, payload, left, retried, carrier)
                        return
                retried(value, error)

            peer.send_callback(op, payload, half, first, carrier)
            return

        def answered(value: Any, error: BaseException | None) -> None:
            self._in_flight -= 1
            if call is not None:
                call.done(error)
            if error is None:
                rnd.ok(owner, value)
            elif op == _R_GET and rnd.spares and isinstance(error, NotReadyError):
                self.stats.replica_failures += 1
                self._substitute(rnd, owner, error, payload, trace)
            else:
                self._replica_failed(rnd, owner, error, hint)

        peer.send_callback(op, payload, timeout, answered, carrier)

    def _substitute(
        self,
        rnd: QuorumRound,
        owner: str,
        why: NotReadyError,
        payload: Any,
        trace: OpTrace | None = None,
    ) -> None:
        """``owner`` is not ready for a read: ask the round's next spare (a pending
        owner) in its place (under the read's ``trace``: this runs from the answer's
        callback, outside the request's context)."""
        spare = rnd.replace(owner, why)
        if spare is None:
            return
        self.stats.not_ready_substitutions += 1
        self.stats.read_attempts += 1
        if spare != self.node_id:
            self._remote(rnd, spare, _R_GET, payload, "r_get", trace=trace)
            return
        moves = self.moves
        key: bytes = payload[0]
        if moves is not None and not moves.is_ready(self._partition_of(key)):
            self._substitute(rnd, spare, NotReadyError("not held here either"), payload, trace)
        else:
            if trace is not None:
                trace.local(spare, "r_get")
            rnd.ok(spare, self.replica.get(key))

    def copy_on(self, owners: list[str], entry: list[Any]) -> None:
        """Send the owner's copy of a client's one-hop write (``W_PUT``) to ``owners``
        (the other owners of this node's ring, a moving partition's previous owners),
        best effort as :meth:`_copy`, as ``R_PUT_MANY`` mode 3: a node that neither
        owns nor holds the partition any more does not keep it."""
        payload = [[entry], PUT_MANY_COPY]
        for owner in owners:
            self._send_copy(owner, _R_PUT_MANY, payload)

    def _copy(self, owners: list[str], op: int, payload: list[Any]) -> None:
        """Send a write or a delete to a moving partition's pending owners too, best
        effort (no quorum, no hint)."""
        stats = self.stats
        for owner in owners:
            if owner == self.node_id:
                key, value, ts, origin, expire_at, tombstone = payload
                stats.pending_copies += 1
                try:
                    self.replica.put(key, value, ts, origin, expire_at, tombstone)
                except HyperCacheError:
                    stats.pending_copy_failures += 1
                continue
            self._send_copy(owner, op, payload)

    def _send_copy(self, owner: str, op: int, payload: list[Any]) -> None:
        """One best-effort copy to the peer ``owner``: counted, not sent when it is
        down or when :data:`MAX_PENDING_COPIES` are in flight (counted as dropped)."""
        stats = self.stats
        peer = self.membership.peers.get(owner)
        if peer is None or not peer.up:
            stats.pending_copy_failures += 1
            return
        if self._copies_pending >= MAX_PENDING_COPIES:
            stats.pending_copies_dropped += 1
            return
        stats.pending_copies += 1
        self._copies_pending += 1
        peer.send_callback(op, payload, self.timeout, self._copied)

    def _copied(self, _value: Any, error: BaseException | None) -> None:
        self._copies_pending -= 1
        if error is not None:
            self.stats.pending_copy_failures += 1

    def _replica_failed(
        self, rnd: QuorumRound, owner: str, exc: BaseException, hint: list[Any] | None
    ) -> None:
        self.stats.replica_failures += 1
        rnd.failed(owner, str(exc) or type(exc).__name__)
        # A request the replica could never accept (malformed, too large) is
        # not worth a hint; anything else (down, timeout, refused) is.
        if hint is not None and not isinstance(exc, ProtocolError | UsageError):
            self._hint(owner, hint)

    def _hint(self, owner: str, payload: list[Any]) -> None:
        sink = self.hints
        # No hint for a member that left or was removed (out of the ring: a write
        # that raced its departure has new owners, which the rebalancer fills).
        if sink is not None and not self._stopping and self.membership.hintable(owner):
            key, value, ts, origin, expire_at, tombstone = payload
            sink.hint(owner, key, value, ts, origin, expire_at, tombstone)

    def _pending_owners(self, key: bytes, owners: list[str]) -> list[str]:
        """The pending owners of ``key``'s partition that are not owners (a write
        goes to them too); raises NotReadyError when this node may not coordinate."""
        moves = self.moves
        assert moves is not None
        moves.check_serving()
        return [o for o in moves.previous_owners(self._partition_of(key)) if o not in owners]

    def _failed(self, op: str, exc: BaseException) -> None:
        stats = self.stats
        key = (op, type(exc).__name__)
        stats.errors[key] = stats.errors.get(key, 0) + 1
        if isinstance(exc, QuorumError):
            stats.quorum_failures[op] += 1

    # --------------------------------------------------------------------- GET

    async def get(self, key: bytes, consistency: Any = None) -> list[Any]:
        """Client ``GET``: ``[found, value]`` from the newest version among the acks."""
        result: list[Any] = await self.start_get(key, consistency).wait()
        return result

    def start_get(self, key: bytes, consistency: Any = None) -> Later:
        """Start a client ``GET``; the :class:`Later` gets what :meth:`get` returns.

        :raises HyperCacheError: the request is invalid (the ``Later`` is not returned).
        """
        start = time.perf_counter()
        stats = self.stats
        stats.requests["get"] += 1
        later = Later()
        trace: OpTrace | None = None
        try:
            key = self.limits.check_key(key)
            level = self._level(consistency, self.config.read_consistency)
            owners = self.owners(key)
            n = len(owners)
            node_id = self.node_id
            local_ready = True
            spares: list[str] = []
            moves = self.moves
            if moves is not None and moves.active:
                moves.check_serving()
                p = self._partition_of(key)
                local_ready = moves.is_ready(p)
                spares = [o for o in moves.previous_owners(p) if o not in owners]
            if level is _ONE and node_id in owners and local_ready:
                # The local replica answers at once; asking others would only add load.
                stats.read_attempts += 1
                stats.read_acks += 1
                entry = self.replica.get(key)
                self._latency["get"](time.perf_counter() - start)
                later.resolve(self._get_answer(entry))
                return later
            rnd = QuorumRound(owners, level.required(n), spares=spares, level=level.value)
            if tracing.tracer is not None:
                trace = tracing.begin("Get", key, level.value, n)
            if level is not _ONE:
                rnd.on_complete = lambda r: self._repair(key, r, trace)
            payload = [key]
            for owner in rnd.start():
                stats.read_attempts += 1
                if owner != node_id:
                    self._remote(rnd, owner, _R_GET, payload, "r_get", trace=trace)
                elif local_ready:
                    if trace is not None:
                        trace.local(owner, "r_get")
                    rnd.ok(owner, self.replica.get(key))
                else:
                    stats.replica_failures += 1
                    self._substitute(rnd, owner, NotReadyError("not ready here"), payload, trace)
        except HyperCacheError as exc:
            if trace is not None:
                trace.decided(0, exc)
            self._failed("get", exc)
            self._latency["get"](time.perf_counter() - start)
            raise
        rnd.arm(lambda r: self._get_decided(r, later, start, trace))
        return later

    def _get_decided(
        self, rnd: QuorumRound, later: Later, start: float, trace: OpTrace | None = None
    ) -> None:
        if trace is not None:
            trace.decided(rnd.acks, rnd.error())
        try:
            error = rnd.error()
            if error is not None:
                raise error
            self.stats.read_acks += rnd.acks
            best = newest([self._answer_entry(owner, raw) for owner, raw in rnd.results.items()])
            if best is not None:
                self.clock.update(best[1])
        except Exception as exc:
            self._settle_failed("get", later, start, exc)
            return
        self._latency["get"](time.perf_counter() - start)
        later.resolve(self._get_answer(best))

    def _get_answer(self, entry: Entry | None) -> list[Any]:
        """The ``GET`` answer for the newest entry found."""
        if is_live(entry, self.wall()):
            assert entry is not None
            return [True, entry[0]]
        return [False, None]

    def _answer_entry(self, owner: str, raw: Any) -> Entry | None:
        """The entry an owner answered (the local one as is), checked like a write:
        a version past the clock's horizon counts as no answer (a forged or skewed
        version must neither win the read, nor be repaired onto other owners, nor
        move this node's clock).

        :raises ProtocolError: a remote answer of another shape.
        """
        if owner == self.node_id:
            entry: Entry | None = raw
            return entry
        entry = entry_from_wire(raw)
        if entry is not None and not self.clock.admits(entry[1]):
            self.stats.versions_refused["read"] += 1
            return None
        return entry

    def _settle_failed(self, op: str, later: Later, start: float, exc: Exception) -> None:
        if isinstance(exc, HyperCacheError):
            self._failed(op, exc)
        self._latency[op](time.perf_counter() - start)
        later.reject(exc)

    def _repair(self, key: bytes, rnd: QuorumRound, trace: OpTrace | None = None) -> None:
        """Push the newest version seen to every owner that answered with an older one
        (with ``trace``, each push has a ``ReadRepair`` span under the read's)."""
        if self._stopping:
            return
        try:
            results = {owner: self._answer_entry(owner, raw) for owner, raw in rnd.results.items()}
        except ProtocolError as exc:
            _log.warning("read repair of %r skipped: %s", key, exc)
            return
        best, stale = plan_repair(results, self.wall())
        if best is None:
            return
        value, ts, origin, expire_at, tombstone = best
        stats = self.stats
        for owner, _ in stale:
            if owner == self.node_id:
                stats.read_repairs += 1
                if self.replica.put(key, value, ts, origin, expire_at, tombstone):
                    stats.read_repairs_applied += 1
                continue
            peer = self.membership.peers.get(owner)
            if peer is None or not peer.up:
                continue
            if self._repairs_pending >= MAX_PENDING_REPAIRS:
                stats.read_repairs_dropped += 1
                continue
            stats.read_repairs += 1
            stats.forwards["r_put"] += 1
            self._repairs_pending += 1
            if trace is not None:  # a traced read: its push has a span of its own
                call = trace.repair(owner)
                carrier = None if call is None else call.carrier
                peer.send_callback(
                    _R_PUT, [key, *best], self.timeout, self._pushed(owner, 1, call), carrier
                )
                continue
            # Batched per owner: the repairs of every read that completes in this
            # event-loop iteration go to each owner as one R_PUT_MANY (mode 2,
            # applied like R_PUT), not one R_PUT per key.
            batches = self._repair_batches
            if not batches:
                self._get_loop().call_soon(self._flush_repairs)
            batch = batches.setdefault(owner, [])
            batch.append([key, *best])
            if len(batch) >= MAX_PUT_MANY:
                self._send_repairs(owner, batches.pop(owner))

    def _flush_repairs(self) -> None:
        """Send the read repairs batched in this event-loop iteration, per owner."""
        batches, self._repair_batches = self._repair_batches, {}
        for owner, entries in batches.items():
            self._send_repairs(owner, entries)

    def _send_repairs(self, owner: str, entries: list[list[Any]]) -> None:
        peer = self.membership.peers.get(owner)
        if peer is None or not peer.up or self._stopping:
            self._repairs_pending -= len(entries)
            return
        done = self._pushed(owner, len(entries))
        if len(entries) == 1:
            peer.send_callback(_R_PUT, entries[0], self.timeout, done)
        else:
            payload = [entries, PUT_MANY_READ_REPAIR]
            peer.send_callback(_R_PUT_MANY, payload, self.timeout, done)

    def _pushed(
        self, owner: str, n: int = 1, call: tracing.ReplicaCall | None = None
    ) -> Callable[[Any, BaseException | None], None]:
        def done(value: Any, error: BaseException | None) -> None:
            self._repairs_pending -= n
            if call is not None:
                call.done(error)
            if error is not None:
                self.stats.replica_failures += 1
                _log.debug("read repair push of %d to %s failed: %s", n, owner, error)
            elif type(value) is int or type(value) is bool:
                # R_PUT answers whether it applied, R_PUT_MANY how many it did
                self.stats.read_repairs_applied += int(value)

        return done

    # --------------------------------------------------------------------- SET

    async def set(
        self, key: bytes, value: Any, ttl_ms: Any = None, consistency: Any = None
    ) -> bool:
        """Client ``SET``: stamp a version and write it to the owners."""
        result: bool = await self.start_set(key, value, ttl_ms, consistency).wait()
        return result

    def start_set(
        self,
        key: bytes,
        value: Any,
        ttl_ms: Any = None,
        consistency: Any = None,
        versioned: bool = False,
    ) -> Later:
        """Start a client ``SET``; the :class:`Later` gets ``True`` at its consistency
        level (``[True, ts]`` when ``versioned``: the version's timestamp, for a client
        that lists the ``set_version`` feature).

        :raises HyperCacheError: the request is invalid (the ``Later`` is not returned).
        """
        start = time.perf_counter()
        stats = self.stats
        stats.requests["set"] += 1
        later = Later()
        trace: OpTrace | None = None
        try:
            key = self.limits.check_key(key)
            value = bytes(self.limits.check_value(value))
            if ttl_ms is not None and (type(ttl_ms) is not int or ttl_ms <= 0 or ttl_ms > 2**62):
                raise ConfigError("ttl_ms", f"must be a positive integer or nil, got {ttl_ms!r}")
            level = self._level(consistency, self.config.write_consistency)
            expire_at = 0 if ttl_ms is None else self.wall() + ttl_ms
            owners = self.owners(key)
            n = len(owners)
            moves = self.moves
            pending = self._pending_owners(key, owners) if moves and moves.active else []
            ts = self.clock.now()
            origin = self._tag
            rnd = QuorumRound(owners, level.required(n), level=level.value)
            payload = [key, value, ts, origin, expire_at, False]
            node_id = self.node_id
            if tracing.tracer is not None:
                trace = tracing.begin("Set", key, level.value, n)
            for owner in rnd.start():
                stats.write_attempts += 1
                if owner == node_id:
                    if trace is not None:
                        trace.local(owner, "r_put")
                    self.replica.put(key, value, ts, origin, expire_at, False)
                    rnd.ok(owner, True)
                else:
                    self._remote(rnd, owner, _R_PUT, payload, "r_put", hint=payload, trace=trace)
            if pending:
                self._copy(pending, _R_PUT, payload)
        except HyperCacheError as exc:
            if trace is not None:
                trace.decided(0, exc)
            self._failed("set", exc)
            self._latency["set"](time.perf_counter() - start)
            raise
        answer: Any = [True, ts] if versioned else True
        rnd.arm(lambda r: self._set_decided(r, later, start, trace, answer))
        return later

    def _set_decided(
        self,
        rnd: QuorumRound,
        later: Later,
        start: float,
        trace: OpTrace | None = None,
        answer: Any = True,
    ) -> None:
        error = rnd.error()
        if trace is not None:
            trace.decided(rnd.acks, error)
        if error is not None:
            self._settle_failed("set", later, start, error)
            return
        self.stats.write_acks += rnd.acks
        # Acks arriving after the quorum are counted when they land.
        rnd.on_complete = self._late_write_acks(rnd.acks) if rnd.outstanding else None
        self._latency["set"](time.perf_counter() - start)
        later.resolve(answer)

    def _late_write_acks(self, counted: int) -> Callable[[QuorumRound], None]:
        def done(rnd: QuorumRound) -> None:
            self.stats.write_acks += rnd.acks - counted

        return done

    # --------------------------------------------------------------------- ADD

    def start_add(
        self,
        key: bytes,
        value: Any,
        ttl_ms: Any = None,
        consistency: Any = None,
        forwarded: bool = False,
    ) -> Later:
        """Start a client ``ADD``: store ``value`` only if ``key`` holds no live value;
        the :class:`Later` gets whether it was stored.

        The check and the write are made by one node, the key's first live owner
        (this node forwards the request to it when it is another), with no wait
        between reading its own copy and applying the new version there; the version
        is then replicated at ``consistency`` as a ``SET``'s. Two ``ADD`` s of one key
        that reach that owner are thus ordered, and one of them wins. A request that
        was forwarded once (``forwarded``) is carried out where it lands.

        :raises HyperCacheError: the request is invalid (the ``Later`` is not returned).
        """
        key = self.limits.check_key(key)
        if not forwarded:
            node_id = self.node_id
            peers = self.membership.peers
            first = None
            for owner in self.owners(key):
                if owner == node_id:
                    break
                peer = peers.get(owner)
                if peer is not None and peer.up:
                    first = peer
                    break
            if first is not None:
                self.stats.forwards["add"] += 1
                later = Later()

                def relayed(answer: Any, error: BaseException | None) -> None:
                    if error is not None:
                        later.reject(error)
                    else:
                        later.resolve(answer is True)

                first.send_callback(
                    _ADD, [key, value, ttl_ms, consistency, True], self.timeout, relayed
                )
                return later
        if is_live(self.replica.get(key), self.wall()):
            later = Later()
            later.resolve(False)
            return later
        # No await between the check above and the local apply that start_set makes
        # before it returns: nothing else runs on this node in between.
        inner = self.start_set(key, value, ttl_ms, consistency)
        later = Later()
        inner.bind(lambda _v, error: later.resolve(True) if error is None else later.reject(error))
        return later

    # ------------------------------------------------------------------ DELETE

    async def delete(self, key: bytes, consistency: Any = None) -> bool:
        """Client ``DELETE``: write a tombstone; answer whether a live value was seen."""
        result: bool = await self.start_delete(key, consistency).wait()
        return result

    def start_delete(self, key: bytes, consistency: Any = None) -> Later:
        """Start a client ``DELETE``; the :class:`Later` gets what :meth:`delete` returns.

        :raises HyperCacheError: the request is invalid (the ``Later`` is not returned).
        """
        start = time.perf_counter()
        stats = self.stats
        stats.requests["delete"] += 1
        later = Later()
        trace: OpTrace | None = None
        try:
            key = self.limits.check_key(key)
            level = self._level(consistency, self.config.write_consistency)
            owners = self.owners(key)
            n = len(owners)
            moves = self.moves
            pending = self._pending_owners(key, owners) if moves and moves.active else []
            ts = self.clock.now()
            origin = self._tag
            rnd = QuorumRound(owners, level.required(n), level=level.value)
            tomb = [key, b"", ts, origin, 0, True]
            if tracing.tracer is not None:
                trace = tracing.begin("Delete", key, level.value, n)
            for owner in rnd.start():
                stats.write_attempts += 1
                if owner == self.node_id:
                    if trace is not None:
                        trace.local(owner, "r_del")
                    before = self.replica.get(key)
                    self.replica.put(key, b"", ts, origin, 0, True)
                    rnd.ok(owner, before)
                else:
                    # One round trip: R_DEL writes the tombstone and answers what
                    # the owner held before it.
                    self._remote(rnd, owner, _R_DEL, tomb, "r_del", hint=tomb, trace=trace)
            if pending:
                self._copy(pending, _R_DEL, tomb)
        except HyperCacheError as exc:
            if trace is not None:
                trace.decided(0, exc)
            self._failed("delete", exc)
            self._latency["delete"](time.perf_counter() - start)
            raise
        rnd.arm(lambda r: self._delete_decided(r, later, start, trace))
        return later

    def _delete_decided(
        self, rnd: QuorumRound, later: Later, start: float, trace: OpTrace | None = None
    ) -> None:
        if trace is not None:
            trace.decided(rnd.acks, rnd.error())
        try:
            error = rnd.error()
            if error is not None:
                raise error
            self.stats.write_acks += rnd.acks
            now = self.wall()
            best = newest([self._answer_entry(owner, raw) for owner, raw in rnd.results.items()])
            if best is not None:
                # Past every version received, as on every other path: a retried
                # delete must be newer than what this one found.
                self.clock.update(best[1])
            existed = is_live(best, now)
        except Exception as exc:
            self._settle_failed("delete", later, start, exc)
            return
        self._latency["delete"](time.perf_counter() - start)
        later.resolve(existed)

    # -------------------------------------------------------------- TTL, EXPIRE

    def _read_round(self, key: bytes, level: Consistency) -> QuorumRound:
        """Read ``key`` from its owners at ``level`` as ``GET`` does (a ONE read on a
        node that owns the key asks its own replica alone; QUORUM and ALL reads
        repair the owners that answered with an older version): the round, whose
        answers may still be coming in."""
        stats = self.stats
        owners = self.owners(key)
        node_id = self.node_id
        if level is _ONE and node_id in owners:
            owners = [node_id]
        rnd = QuorumRound(owners, level.required(len(owners)), level=level.value)
        if level is not _ONE:
            rnd.on_complete = lambda r: self._repair(key, r)
        payload = [key]
        for owner in rnd.start():
            stats.read_attempts += 1
            if owner == node_id:
                rnd.ok(owner, self.replica.get(key))
            else:
                self._remote(rnd, owner, _R_GET, payload, "r_get")
        return rnd

    def _read_outcome(self, rnd: QuorumRound) -> Entry | None:
        """The newest entry of a decided :meth:`_read_round` (tombstones included);
        the clock moves past it.

        :raises QuorumError: too few owners answered.
        :raises ProtocolError: an owner answered something else than an entry.
        """
        error = rnd.error()
        if error is not None:
            raise error
        self.stats.read_acks += rnd.acks
        best = newest([self._answer_entry(owner, raw) for owner, raw in rnd.results.items()])
        if best is not None:
            self.clock.update(best[1])
        return best

    async def ttl(self, key: bytes, consistency: Any = None) -> list[Any]:
        """Client ``TTL``: ``[found, expire_at_ms]`` (see :meth:`start_ttl`)."""
        result: list[Any] = await self.start_ttl(key, consistency).wait()
        return result

    def start_ttl(self, key: bytes, consistency: Any = None) -> Later:
        """Start a client ``TTL``: the :class:`Later` gets ``[found, expire_at_ms]`` of
        the newest version among the owners' answers, read as ``GET`` reads (same
        level default, same read repair): ``expire_at_ms`` is the absolute expiry in
        wall-clock ms, 0 for none; ``[False, 0]`` when the newest version is absent,
        a tombstone or expired.

        :raises HyperCacheError: the request is invalid (the ``Later`` is not returned).
        """
        start = time.perf_counter()
        self.stats.requests["ttl"] += 1
        later = Later()
        try:
            key = self.limits.check_key(key)
            rnd = self._read_round(key, self._level(consistency, self.config.read_consistency))
        except HyperCacheError as exc:
            self._failed("ttl", exc)
            self._latency["ttl"](time.perf_counter() - start)
            raise
        rnd.arm(lambda r: self._ttl_decided(r, later, start))
        return later

    def _ttl_decided(self, rnd: QuorumRound, later: Later, start: float) -> None:
        try:
            best = self._read_outcome(rnd)
        except Exception as exc:
            self._settle_failed("ttl", later, start, exc)
            return
        self._latency["ttl"](time.perf_counter() - start)
        if is_live(best, self.wall()):
            assert best is not None
            later.resolve([True, best[3]])
        else:
            later.resolve([False, 0])

    async def expire(self, key: bytes, ttl_ms: Any, consistency: Any = None) -> bool:
        """Client ``EXPIRE``: whether the key was live (see :meth:`start_expire`)."""
        result: bool = await self.start_expire(key, ttl_ms, consistency).wait()
        return result

    def start_expire(self, key: bytes, ttl_ms: Any, consistency: Any = None) -> Later:
        """Start a client ``EXPIRE``: give a live key a new TTL (``ttl_ms``; nil: none).

        A read then a write, both at ``consistency`` (default: the write level):
        the newest version among the owners' answers is read as ``GET`` reads it;
        if it is live, its value is written back through :meth:`start_set` with the
        new expiry, as a new version stamped now (so it also counts as a ``set``).
        The :class:`Later` gets ``True`` once that write reached its level,
        ``False`` (nothing written) when the key is absent, deleted or expired.

        Not atomic: a ``SET`` or ``DELETE`` of the key stamped between the read and
        the write loses to it (the old value comes back with the new expiry); one
        stamped after wins. Last writer wins, as everywhere.

        :raises HyperCacheError: the request is invalid (the ``Later`` is not returned).
        """
        start = time.perf_counter()
        self.stats.requests["expire"] += 1
        later = Later()
        try:
            key = self.limits.check_key(key)
            if ttl_ms is not None and (type(ttl_ms) is not int or ttl_ms <= 0 or ttl_ms > 2**62):
                raise ConfigError("ttl_ms", f"must be a positive integer or nil, got {ttl_ms!r}")
            level = self._level(consistency, self.config.write_consistency)
            rnd = self._read_round(key, level)
        except HyperCacheError as exc:
            self._failed("expire", exc)
            self._latency["expire"](time.perf_counter() - start)
            raise
        # The write back starts from the read's callback, where the current context
        # is the loop's: it runs in the request's (its Set joins the caller's trace).
        in_request = tracing.in_context()
        if in_request is None:
            rnd.arm(lambda r: self._expire_read(r, key, ttl_ms, level, later, start))
        else:
            rnd.arm(lambda r: in_request(self._expire_read, r, key, ttl_ms, level, later, start))
        return later

    def _expire_read(
        self,
        rnd: QuorumRound,
        key: bytes,
        ttl_ms: int | None,
        level: Consistency,
        later: Later,
        start: float,
    ) -> None:
        try:
            best = self._read_outcome(rnd)
            if not is_live(best, self.wall()):
                self._latency["expire"](time.perf_counter() - start)
                later.resolve(False)
                return
            assert best is not None
            # The clock is past the version read: the write back is newer than it.
            written = self.start_set(key, best[0], ttl_ms, level.value)
        except Exception as exc:
            self._settle_failed("expire", later, start, exc)
            return

        def done(_value: Any, error: BaseException | None) -> None:
            if error is None:
                self._latency["expire"](time.perf_counter() - start)
                later.resolve(True)
            elif isinstance(error, Exception):
                self._settle_failed("expire", later, start, error)
            else:
                later.reject(error)

        written.bind(done)

    # --------------------------------------------------------------- lifecycle

    @property
    def background(self) -> int:
        """Replica requests, repair pushes and copies to pending owners still running."""
        return self._in_flight + self._repairs_pending + self._copies_pending

    async def stop(self) -> None:
        """Stop queuing hints and pushing repairs.

        Replica requests and pushes already sent are not waited for: they end at
        their deadline or when the node closes its peer connections.
        """
        self._stopping = True
