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
of all answers with ``R_PUT`` to each owner that answered with an older one or none.
Each push counts in ``read_repairs``; at most ``MAX_PENDING_REPAIRS`` are in flight, and
a push beyond that is dropped (``read_repairs_dropped``: anti-entropy repairs later).

Hinted handoff: when an owner misses a write or a delete (it is down, the request
timed out, failed or was refused), the coordinator hands the entry to its
:class:`HintSink` (the node's hint buffer) for that owner, and the handoff loop
replays it when the owner is back (:mod:`hypercache.cluster.handoff`). Queuing a
hint never blocks: a full buffer drops it and counts the drop. ``R_PUT_MANY``
carries replayed hints and anti-entropy pushes to a replica.

Cost: the coordinator runs no task per operation nor per replica request. A client
operation arrives through :meth:`Node.handle_sync` (inline, from the read that
brought it) and gets a :class:`~hypercache.net.transport.Later`; replica requests go
out with :meth:`~hypercache.net.tcp.ClientConnection.send_callback` and their answers
feed the :class:`_Round` from the read that brings them; the round answers the
``Later`` at quorum, from that same read. A QUORUM set thus costs the coordinator one
loop iteration per network hop. (A peer not connected yet, and ``DELETE``'s two
round trips per owner, go through a task.) The async :meth:`Coordinator.get`,
:meth:`~Coordinator.set` and :meth:`~Coordinator.delete` wrap the same code.

``DELETE`` answers whether the key existed: each owner's current entry is read
(``R_GET``) before the tombstone goes to it (``R_PUT``), and the answer is whether the
newest of the entries read from acknowledging owners was a live value. That is two
round trips per owner, the price of a precise answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeAlias

from hypercache.cluster.antientropy import admits_repair
from hypercache.cluster.config import DistConfig
from hypercache.cluster.membership import Membership, Peer
from hypercache.cluster.metrics import DistStats, NodeMetrics
from hypercache.consistency import Consistency
from hypercache.errors import (
    ClockSkewError,
    ConfigError,
    HyperCacheError,
    NodeUnavailableError,
    ProtocolError,
    QuorumError,
)
from hypercache.net.protocol import (
    MAX_PUT_MANY,
    Entry,
    Limits,
    Op,
    entry_from_wire,
    entry_is_live,
    entry_older,
)
from hypercache.net.transport import Later

__all__ = [
    "MAX_PUT_MANY",
    "Coordinator",
    "Entry",
    "HintSink",
    "LocalStore",
    "entry_is_live",
    "newest",
]

_log = logging.getLogger("hypercache.coordinator")

# LocalStore has a ``bytes`` counter, which shadows the builtin in its body.
_Bytes: TypeAlias = bytes

_R_GET: Final = int(Op.R_GET)
_R_PUT: Final = int(Op.R_PUT)
_R_DEL: Final = int(Op.R_DEL)
# The hybrid logical clock refuses to move past this (it keeps room to tick).
_MAX_REMOTE_TS: Final = 2**63 - 2
#: Read-repair pushes a coordinator keeps in flight at most; beyond, a push is dropped
#: (counted in ``read_repairs_dropped``) and anti-entropy repairs the owner later.
MAX_PENDING_REPAIRS: Final = 1024

_ONE: Final = Consistency.ONE
#: wire spelling -> level; anything else goes through Consistency.parse (which
#: accepts other letter cases and blanks, and raises the validation error).
_LEVELS: Final = {level.value: level for level in Consistency}

#: ``R_PUT_MANY`` modes: hints replayed (applied like writes) and anti-entropy
#: pushes (subject to the capacity rule, see :mod:`hypercache.cluster.antientropy`).
PUT_MANY_HINTS: Final = 0
PUT_MANY_REPAIR: Final = 1


class LocalStore(Protocol):
    """What the coordinator needs of the node's versioned store."""

    def apply(
        self,
        key: _Bytes,
        value: _Bytes,
        ts: int,
        origin: int,
        expire_at_ms: int,
        tombstone: bool,
        now_ms: int,
    ) -> bool: ...

    def get(self, key: _Bytes, now_ms: int) -> tuple[_Bytes, int, int, int, bool] | None: ...

    def peek(self, key: _Bytes, now_ms: int) -> tuple[_Bytes, int, int, int, bool] | None: ...

    @property
    def max_bytes(self) -> int: ...

    @property
    def bytes(self) -> int: ...


class HintSink(Protocol):
    """Where the coordinator leaves the writes an owner missed (never blocks)."""

    def hint(
        self,
        target: str,
        key: bytes,
        value: bytes,
        ts: int,
        origin: int,
        expire_at: int,
        tombstone: bool,
    ) -> None: ...


class Clock(Protocol):
    """What the coordinator needs of the hybrid logical clock."""

    @property
    def tag(self) -> int: ...

    def now(self) -> int: ...

    def update(self, remote_ts: int) -> int: ...

    def admits(self, remote_ts: object) -> bool: ...

    def check(self, remote_ts: int) -> None: ...


def wall_ms() -> int:
    """Wall-clock milliseconds since the epoch (the unit of expiries)."""
    return time.time_ns() // 1_000_000


def newest(entries: list[Entry | None]) -> Entry | None:
    """The entry with the highest version ``(ts, origin)``; ``None`` if all are None."""
    best: Entry | None = None
    for entry in entries:
        if entry is not None and (best is None or (entry[1], entry[2]) > (best[1], best[2])):
            best = entry
    return best


def _get_answer(entry: Entry | None, now_ms: int) -> list[Any]:
    """The ``GET`` answer for the newest entry found."""
    if entry_is_live(entry, now_ms):
        assert entry is not None
        return [True, entry[0]]
    return [False, None]


class _Round:
    """Acks of one operation: decided at quorum, or once all have answered short of it.

    Replica answers arrive through :meth:`ok` / :meth:`fail`, from the local path
    synchronously or from request callbacks. ``results`` keeps the answer of every
    owner that acknowledged (for reads: its entry), in arrival order. The hook given
    to :meth:`arm` (once every request is out) runs once, when the round is decided;
    ``on_complete`` runs once every owner has answered or failed (read repair hooks
    there), after the decision hook when both fall on the same answer.
    """

    __slots__ = (
        "acks",
        "failed",
        "n",
        "on_complete",
        "on_decided",
        "outstanding",
        "reasons",
        "required",
        "results",
    )

    def __init__(self, n: int, required: int) -> None:
        self.n = n
        self.required = required
        self.acks = 0
        self.failed = 0
        self.outstanding = n
        self.results: dict[str, Any] = {}
        self.reasons: list[str] = []
        self.on_decided: Callable[[_Round], None] | None = None
        self.on_complete: Callable[[_Round], None] | None = None

    @property
    def decided(self) -> bool:
        # Success is decided at the quorum-th ack. Failure waits for every owner
        # (each bounded by the request timeout) so that QuorumError reports every
        # ack that did land: the caller learns how far a failed write got.
        return self.acks >= self.required or self.outstanding == 0

    def ok(self, owner: str, result: Any) -> None:
        self.acks += 1
        self.results[owner] = result
        self._step()

    def fail(self, owner: str, reason: str) -> None:
        self.failed += 1
        self.reasons.append(f"{owner}: {reason}")
        self._step()

    def _step(self) -> None:
        self.outstanding -= 1
        hook = self.on_decided
        if hook is not None and (self.acks >= self.required or self.outstanding == 0):
            self.on_decided = None
            hook(self)
        if self.outstanding == 0 and self.on_complete is not None:
            hook, self.on_complete = self.on_complete, None
            hook(self)

    def arm(self, hook: Callable[[_Round], None]) -> None:
        """Run ``hook(self)`` once decided (now, if it already is)."""
        if self.decided:
            hook(self)
        else:
            self.on_decided = hook

    def error(self) -> QuorumError | None:
        """``None`` when the quorum was reached, else the :class:`QuorumError` to raise."""
        if self.acks >= self.required:
            return None
        why = "; ".join(self.reasons[:4])
        return QuorumError(
            self.acks,
            self.required,
            f"quorum not reached: {self.acks} of {self.required} required acks "
            f"from {self.n} owners ({why})",
        )


class Coordinator:
    """Runs client operations against the owners of each key.

    :param config: the node's configuration (defaults, timeouts).
    :param store: the local versioned store.
    :param clock: the node's hybrid logical clock.
    :param membership: peers and their liveness.
    :param owners: ``key -> [node_id, ...]`` from the current ring.
    :param metrics: counters and latency histograms.
    :param wall_ms: the wall clock (ms) that expiries are computed and checked at.
    """

    def __init__(
        self,
        *,
        node_id: str,
        config: DistConfig,
        store: LocalStore,
        clock: Clock,
        membership: Membership,
        owners: Callable[[bytes], list[str]],
        metrics: NodeMetrics,
        limits: Limits,
        wall_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.store = store
        self.clock = clock
        self.membership = membership
        self.owners = owners
        self.metrics = metrics
        self.stats: DistStats = metrics.stats
        self.limits = limits
        #: the node's wall clock (ms) of expiries (tests move it instead of sleeping)
        self.wall_ms = wall_ms
        self.timeout = config.request_timeout
        self._tag = clock.tag
        self._background: set[asyncio.Task[Any]] = set()
        self._in_flight = 0  # replica requests sent with a callback, not answered yet
        self._repairs_pending = 0  # read-repair pushes in flight
        self._stopping = False
        # The running loop, taken once (asyncio.get_running_loop() costs a getpid()
        # system call per call on CPython 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._latency = {op: metrics.latency[op].observe for op in ("get", "set", "delete")}
        #: receives the writes owners missed; None: no hinted handoff
        self.hints: HintSink | None = None

    # ------------------------------------------------------------------ replica

    def replica_get(self, key: bytes) -> Entry | None:
        """This node's entry for ``key`` (tombstones included), or ``None``."""
        got = self.store.get(key, self.wall_ms())
        if got is None:
            return None
        value, ts, origin, expire_at, tombstone = got
        return (value, ts, origin, expire_at, bool(tombstone))

    def replica_put(
        self,
        key: bytes,
        value: bytes,
        ts: int,
        origin: int,
        expire_at: int,
        tombstone: bool,
        path: str = "r_put",
    ) -> bool:
        """Apply one version locally when it is newer than what is held.

        The clock moves past ``ts`` first, so any later write by this node is newer.

        :param path: what brought the version (a label of ``versions_refused``).
        :raises ClockSkewError: ``ts`` is past the clock's horizon (more than
            ``max_clock_skew`` ahead); nothing is applied and the refusal is counted.
        """
        try:
            self.clock.update(ts)
        except ClockSkewError:
            self.stats.versions_refused[path] += 1
            raise
        applied = self.store.apply(key, value, ts, origin, expire_at, tombstone, self.wall_ms())
        if not applied:
            self.stats.version_conflicts += 1
        return applied

    def handle_r_get(self, payload: Any) -> list[Any] | None:
        """``R_GET [key]`` from a peer coordinator."""
        if type(payload) is not list or len(payload) != 1:
            raise ProtocolError("R_GET payload must be [key]")
        self.stats.replica_gets += 1
        entry = self.replica_get(self.limits.check_key(payload[0]))
        return None if entry is None else list(entry)

    def handle_r_put(self, payload: Any) -> bool:
        """``R_PUT [key, value, ts, origin, expire_at_ms, tombstone]`` from a peer (or a
        client's read repair).

        :raises ClockSkewError: ``ts`` is more than ``max_clock_skew`` ahead.
        """
        key, value, ts, origin, expire_at, tombstone = self._check_r_put(payload)
        self.stats.replica_puts += 1
        applied = self.replica_put(key, value, ts, origin, expire_at, tombstone)
        if applied:
            self.stats.replica_puts_applied += 1
        return applied

    def handle_r_del(self, payload: Any) -> list[Any] | None:
        """``R_DEL [key, b"", ts, origin, 0, true]`` from a peer coordinator: apply the
        tombstone (newer wins, as ``R_PUT``) and answer what was held before it, as
        ``R_GET`` would have, so a delete learns ``existed`` in one round trip."""
        key, value, ts, origin, expire_at, tombstone = self._check_r_put(payload)
        if not tombstone:
            raise ProtocolError("R_DEL carries a tombstone")
        self.stats.replica_gets += 1
        self.stats.replica_puts += 1
        before = self.replica_get(key)
        if self.replica_put(key, value, ts, origin, expire_at, tombstone, "r_del"):
            self.stats.replica_puts_applied += 1
        return None if before is None else list(before)

    def handle_r_put_many(self, payload: Any) -> int:
        """``R_PUT_MANY [[entry, ...], mode]``, each entry as ``R_PUT``'s payload.

        Mode 0 (replayed hints) applies every entry newer-wins; mode 1 (anti-entropy
        push) also refuses a missing data entry while the store is above its
        high-water mark (the capacity rule). Answers how many entries were applied.
        The whole batch is checked before any entry is applied.
        """
        if type(payload) is not list or len(payload) != 2 or type(payload[0]) is not list:
            raise ProtocolError("R_PUT_MANY payload must be [[entry, ...], mode]")
        entries, mode = payload
        if mode not in (PUT_MANY_HINTS, PUT_MANY_REPAIR) or type(mode) is not int:
            raise ProtocolError(f"R_PUT_MANY mode must be 0 or 1, got {mode!r}")
        if len(entries) > MAX_PUT_MANY:
            # Bounds the work of one request (~1 us an entry): senders batch below it.
            raise ProtocolError(
                f"R_PUT_MANY carries {len(entries)} entries, at most {MAX_PUT_MANY}"
            )
        checked = [self._check_r_put(e) for e in entries]
        stats = self.stats
        stats.replica_puts += len(checked)
        now = self.wall_ms()
        applied = 0
        store = self.store
        admits = self.clock.admits
        path = "hints" if mode == PUT_MANY_HINTS else "repair_push"
        for key, value, ts, origin, expire_at, tombstone in checked:
            # A version past the horizon is skipped, not a reason to refuse the
            # batch: the sender would send the same batch again and again.
            if not admits(ts):
                stats.versions_refused[path] += 1
                continue
            if mode == PUT_MANY_REPAIR and not admits_repair(
                store, key, len(key) + len(value), tombstone, now
            ):
                stats.version_conflicts += 1
                continue
            if self.replica_put(key, value, ts, origin, expire_at, tombstone, path):
                applied += 1
        stats.replica_puts_applied += applied
        return applied

    def _check_r_put(self, payload: Any) -> tuple[bytes, bytes, int, int, int, bool]:
        if type(payload) is not list or len(payload) != 6:
            raise ProtocolError("R_PUT payload must be [key, value, ts, origin, expire_at, tomb]")
        key, value, ts, origin, expire_at, tombstone = payload
        key = self.limits.check_key(key)
        value = bytes(self.limits.check_value(value))
        # The bounds are what the store and the clock accept: a value past them
        # must be refused here, as a protocol error, before anything is applied.
        if (
            type(ts) is not int
            or not 0 <= ts < _MAX_REMOTE_TS
            or type(origin) is not int
            or not 0 <= origin < 2**32
            or type(expire_at) is not int
            or not 0 <= expire_at < 2**63
            or type(tombstone) is not bool
        ):
            raise ProtocolError(
                "R_PUT version fields must be ts: int in [0, 2**63-2), origin: uint32, "
                "expire_at: int in [0, 2**63), tombstone: bool"
            )
        return key, value, ts, origin, expire_at, tombstone

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

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self._get_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _wait(self, later: Later) -> Any:
        """Await the answer of a :class:`Later` (the async API over the sync one)."""
        fut: asyncio.Future[Any] = self._get_loop().create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if fut.done():
                return
            if error is None:
                fut.set_result(value)
            else:
                fut.set_exception(error)

        later.bind(settle)
        return await fut

    def _remote(
        self,
        rnd: _Round,
        owner: str,
        op: int,
        payload: Any,
        kind: str,
        hint: list[Any] | None = None,
    ) -> None:
        """Send one replica request in the background; its outcome goes to ``rnd``.

        With ``hint`` (an ``R_PUT`` payload), a failure queues it as a hint for ``owner``.
        """
        peer = self.membership.peers.get(owner)
        if peer is None or not peer.up:
            self.stats.replica_failures += 1
            rnd.fail(owner, "down")
            if hint is not None:
                self._hint(owner, hint)
            return
        self.stats.forwards[kind] += 1
        conn = peer.conn
        if conn is None or conn.closed:
            # Not connected (yet, or any more): Peer.request connects, in a task.
            self._track(rnd, owner, peer.request(op, payload, self.timeout), hint)
            return
        # The fast path: no task, no future; the answer is handled from the read
        # that brings it. What Peer.request does around conn.request (liveness) is
        # done in _answered.
        self._in_flight += 1

        def answered(value: Any, error: BaseException | None) -> None:
            self._answered(rnd, owner, peer, hint, value, error)

        try:
            conn.send_callback(op, payload, self.timeout, answered)
        except HyperCacheError as exc:
            answered(None, exc)

    def _answered(
        self,
        rnd: _Round,
        owner: str,
        peer: Peer,
        hint: list[Any] | None,
        value: Any,
        error: BaseException | None,
    ) -> None:
        self._in_flight -= 1
        if error is None:
            peer.last_ok = time.monotonic()
            if not peer.up:
                peer.mark_ok()
            rnd.ok(owner, value)
            return
        if isinstance(error, NodeUnavailableError) and not self._stopping:
            peer.mark_down(str(error))  # (not for connections closed by our own stop)
        self._replica_failed(rnd, owner, error, hint)

    def _replica_failed(
        self, rnd: _Round, owner: str, exc: BaseException, hint: list[Any] | None
    ) -> None:
        self.stats.replica_failures += 1
        rnd.fail(owner, str(exc) or type(exc).__name__)
        # A request the replica could never accept (malformed, too large) is
        # not worth a hint; anything else (down, timeout, refused) is.
        if hint is not None and not isinstance(exc, ProtocolError | ConfigError):
            self._hint(owner, hint)

    def _track(self, rnd: _Round, owner: str, coro: Any, hint: list[Any] | None = None) -> None:
        task = self._spawn(coro)
        task.add_done_callback(lambda t: self._collect(rnd, owner, t, hint))

    def _collect(
        self, rnd: _Round, owner: str, task: asyncio.Task[Any], hint: list[Any] | None
    ) -> None:
        if task.cancelled():
            rnd.fail(owner, "cancelled")
            return
        exc = task.exception()
        if exc is not None:
            self._replica_failed(rnd, owner, exc, hint)
            return
        rnd.ok(owner, task.result())

    def _hint(self, owner: str, payload: list[Any]) -> None:
        sink = self.hints
        if sink is not None and not self._stopping:
            key, value, ts, origin, expire_at, tombstone = payload
            sink.hint(owner, key, value, ts, origin, expire_at, tombstone)

    def _failed(self, op: str, exc: BaseException) -> None:
        stats = self.stats
        key = (op, type(exc).__name__)
        stats.errors[key] = stats.errors.get(key, 0) + 1
        if isinstance(exc, QuorumError):
            stats.quorum_failures[op] += 1

    # --------------------------------------------------------------------- GET

    async def get(self, key: bytes, consistency: Any = None) -> list[Any]:
        """Client ``GET``: ``[found, value]`` from the newest version among the acks."""
        result: list[Any] = await self._wait(self.start_get(key, consistency))
        return result

    def start_get(self, key: bytes, consistency: Any = None) -> Later:
        """Start a client ``GET``; the :class:`Later` gets what :meth:`get` returns.

        :raises HyperCacheError: the request is invalid (the ``Later`` is not returned).
        """
        start = time.perf_counter()
        stats = self.stats
        stats.requests["get"] += 1
        later = Later()
        try:
            key = self.limits.check_key(key)
            level = self._level(consistency, self.config.read_consistency)
            owners = self.owners(key)
            n = len(owners)
            node_id = self.node_id
            if level is _ONE and node_id in owners:
                # The local replica answers at once; asking others would only add load.
                stats.read_attempts += 1
                stats.read_acks += 1
                entry = self.replica_get(key)
                self._latency["get"](time.perf_counter() - start)
                later.resolve(_get_answer(entry, self.wall_ms()))
                return later
            rnd = _Round(n, level.required(n))
            if level is not _ONE:
                rnd.on_complete = lambda r: self._repair(key, r)
            payload = [key]
            for owner in owners:
                stats.read_attempts += 1
                if owner == node_id:
                    rnd.ok(owner, self.replica_get(key))
                else:
                    self._remote(rnd, owner, _R_GET, payload, "r_get")
        except HyperCacheError as exc:
            self._failed("get", exc)
            self._latency["get"](time.perf_counter() - start)
            raise
        rnd.arm(lambda r: self._get_decided(r, later, start))
        return later

    def _get_decided(self, rnd: _Round, later: Later, start: float) -> None:
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
        later.resolve(_get_answer(best, self.wall_ms()))

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

    def _repair(self, key: bytes, rnd: _Round) -> None:
        """Push the newest version seen to every owner that answered with an older one."""
        if self._stopping:
            return
        try:
            results = {owner: self._answer_entry(owner, raw) for owner, raw in rnd.results.items()}
        except ProtocolError as exc:
            _log.warning("read repair of %r skipped: %s", key, exc)
            return
        best = newest(list(results.values()))
        if best is None:
            return
        value, ts, origin, expire_at, tombstone = best
        stats = self.stats
        for owner, entry in results.items():
            if not entry_older(entry, best):
                continue
            if owner == self.node_id:
                stats.read_repairs += 1
                self.replica_put(key, value, ts, origin, expire_at, tombstone)
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
            self._spawn(self._push(peer.request(_R_PUT, [key, *best], self.timeout), owner))

    async def _push(self, request: Any, owner: str) -> None:
        try:
            await request
        except HyperCacheError as exc:
            self.stats.replica_failures += 1
            _log.debug("read repair push to %s failed: %s", owner, exc)
        finally:
            self._repairs_pending -= 1

    # --------------------------------------------------------------------- SET

    async def set(
        self, key: bytes, value: Any, ttl_ms: Any = None, consistency: Any = None
    ) -> bool:
        """Client ``SET``: stamp a version and write it to the owners."""
        result: bool = await self._wait(self.start_set(key, value, ttl_ms, consistency))
        return result

    def start_set(
        self, key: bytes, value: Any, ttl_ms: Any = None, consistency: Any = None
    ) -> Later:
        """Start a client ``SET``; the :class:`Later` gets ``True`` at its consistency level.

        :raises HyperCacheError: the request is invalid (the ``Later`` is not returned).
        """
        start = time.perf_counter()
        stats = self.stats
        stats.requests["set"] += 1
        later = Later()
        try:
            key = self.limits.check_key(key)
            value = bytes(self.limits.check_value(value))
            if ttl_ms is not None and (type(ttl_ms) is not int or ttl_ms <= 0 or ttl_ms > 2**62):
                raise ConfigError("ttl_ms", f"must be a positive integer or nil, got {ttl_ms!r}")
            level = self._level(consistency, self.config.write_consistency)
            expire_at = 0 if ttl_ms is None else self.wall_ms() + ttl_ms
            owners = self.owners(key)
            n = len(owners)
            ts = self.clock.now()
            origin = self._tag
            rnd = _Round(n, level.required(n))
            payload = [key, value, ts, origin, expire_at, False]
            node_id = self.node_id
            for owner in owners:
                stats.write_attempts += 1
                if owner == node_id:
                    self.replica_put(key, value, ts, origin, expire_at, False)
                    rnd.ok(owner, True)
                else:
                    self._remote(rnd, owner, _R_PUT, payload, "r_put", hint=payload)
        except HyperCacheError as exc:
            self._failed("set", exc)
            self._latency["set"](time.perf_counter() - start)
            raise
        rnd.arm(lambda r: self._set_decided(r, later, start))
        return later

    def _set_decided(self, rnd: _Round, later: Later, start: float) -> None:
        error = rnd.error()
        if error is not None:
            self._settle_failed("set", later, start, error)
            return
        self.stats.write_acks += rnd.acks
        # Acks arriving after the quorum are counted when they land.
        rnd.on_complete = self._late_write_acks(rnd.acks) if rnd.outstanding else None
        self._latency["set"](time.perf_counter() - start)
        later.resolve(True)

    def _late_write_acks(self, counted: int) -> Callable[[_Round], None]:
        def done(rnd: _Round) -> None:
            self.stats.write_acks += rnd.acks - counted

        return done

    # ------------------------------------------------------------------ DELETE

    async def delete(self, key: bytes, consistency: Any = None) -> bool:
        """Client ``DELETE``: write a tombstone; answer whether a live value was seen."""
        result: bool = await self._wait(self.start_delete(key, consistency))
        return result

    def start_delete(self, key: bytes, consistency: Any = None) -> Later:
        """Start a client ``DELETE``; the :class:`Later` gets what :meth:`delete` returns.

        :raises HyperCacheError: the request is invalid (the ``Later`` is not returned).
        """
        start = time.perf_counter()
        stats = self.stats
        stats.requests["delete"] += 1
        later = Later()
        try:
            key = self.limits.check_key(key)
            level = self._level(consistency, self.config.write_consistency)
            owners = self.owners(key)
            n = len(owners)
            ts = self.clock.now()
            origin = self._tag
            rnd = _Round(n, level.required(n))
            tomb = [key, b"", ts, origin, 0, True]
            for owner in owners:
                stats.write_attempts += 1
                if owner == self.node_id:
                    before = self.replica_get(key)
                    self.replica_put(key, b"", ts, origin, 0, True)
                    rnd.ok(owner, before)
                else:
                    # One round trip: R_DEL writes the tombstone and answers what
                    # the owner held before it.
                    self._remote(rnd, owner, _R_DEL, tomb, "r_del", hint=tomb)
        except HyperCacheError as exc:
            self._failed("delete", exc)
            self._latency["delete"](time.perf_counter() - start)
            raise
        rnd.arm(lambda r: self._delete_decided(r, later, start))
        return later

    def _delete_decided(self, rnd: _Round, later: Later, start: float) -> None:
        try:
            error = rnd.error()
            if error is not None:
                raise error
            self.stats.write_acks += rnd.acks
            now = self.wall_ms()
            best = newest([self._answer_entry(owner, raw) for owner, raw in rnd.results.items()])
            if best is not None:
                # Past every version received, as on every other path: a retried
                # delete must be newer than what this one found.
                self.clock.update(best[1])
            existed = entry_is_live(best, now)
        except Exception as exc:
            self._settle_failed("delete", later, start, exc)
            return
        self._latency["delete"](time.perf_counter() - start)
        later.resolve(existed)

    # --------------------------------------------------------------- lifecycle

    @property
    def background(self) -> int:
        """Replica requests and repairs still running."""
        return len(self._background) + self._in_flight

    async def stop(self) -> None:
        """Cancel what still runs in the background and wait for it.

        Replica requests sent with a callback are not waited for: they end at
        their deadline or when the node closes its peer connections.
        """
        self._stopping = True
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
