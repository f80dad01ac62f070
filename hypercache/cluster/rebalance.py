"""Rebalancing: partitions stream to their new owners when the ring changes, and leave
their old owners only once the new owners hold them.

Every node runs one :class:`Rebalancer`. The pieces, in the order a ring change
meets them (``docs/cluster.md``, "Rebalancing", has the rules with the settings):

**Ownership diff.** :func:`ownership_diff` compares the owner table of the old ring
with the new one's (per partition the owner list, primary first) for one node: the
partitions it *gained* (with the old owners to pull each one from, primary first),
the ones it *lost* (with their new owners), and for every partition whose owner set
changed whether the primary changed or only a replica (``replica_only``), and which
old owners left it (``departed``: the *pending owners* below). Pure.

**Readiness.** :class:`PartitionStates` says which partitions this node *holds* whole
(received them, or had them from the start) and which it owns. A founder (started
without seeds) holds everything; a node started with seeds (it joins, or restarts
empty) holds nothing, so every partition it owns is *not ready* until streamed:
``R_GET`` for its keys raises :class:`~hypercache.errors.NotReadyError` (not a miss:
the coordinator or client asks another owner). Writes are accepted while not ready
(newer-wins makes the streamed older copies lose). While such a node has met no
other member it is *isolated*: it coordinates nothing (``NotReadyError``), so that
it acknowledges no write that its cluster would never see.

**Streaming.** After a ring change, once the member set has been quiet for
``settle`` seconds (at most ``MAX_SETTLE`` after the first change: a joining node
learns the members one by one), every owned partition that is not ready is queued
and pulled, ``rebalance_concurrency`` at a time, with ``STREAM [partition, cursor,
max_keys, max_bytes]`` from a source: the old owners first (primary first), then the
other owners of the new table, then other pending owners, each only while the
membership thinks it up. A source answers only a partition it holds
(``NotReadyError`` when it owns it but has not received it, ``WrongOwnerError``
when it neither owns nor holds it). Every entry is applied through the replica's
``put(path="rebalance")``: newer-wins (a write that landed during the transfer is
never overwritten by the older streamed copy) and the clock's horizon (a version
too far ahead is refused and counted in ``versions_refused{path="rebalance"}``).
Versions, expiries and tombstones travel as they are; expired entries do not. The
cursor is a key hash (:meth:`~hypercache._core.vstore.VersionedStore.stream`), the
same on every replica, so a transfer cut short resumes where it stopped, from any
source.

**Caps.** ``rebalance_batch_keys`` and ``rebalance_batch_bytes`` per batch (the
source also caps them: ``MAX_PUT_MANY`` entries, half a frame), at most
``rebalance_concurrency`` partitions at once, and a token bucket of
``rebalance_rate`` bytes per second (burst: one batch) shared by every transfer of
the node: a batch that leaves the bucket in debt waits it out (a *throttle event*).

**Retries.** A transfer that failed with every source goes to a retry queue
(bounded: the partition count, at least :data:`RETRY_QUEUE_MAX`; a partition waits
in it once at most, so a whole cluster started at once, where every transfer fails
"not held" until :data:`NO_HOLDER_ATTEMPTS`, retries them all rather than dropping
most of them until the re-plan) with a backoff doubling from
:data:`BACKOFF_MIN` to :data:`BACKOFF_MAX`, resuming at its cursor, with whichever
source is up then. After ``max_attempts`` failures, or when the retry queue is
full, the partition is *dropped* from the queue (counted) and stays not ready until
the next ring change, a peer coming back up, or the periodic re-plan
(:data:`REPLAN_INTERVAL`). A partition with no live source at all becomes ready at
once: there is nothing to get (its other owners are down or there are none); so
does one that every live source answered "not held" :data:`NO_HOLDER_ATTEMPTS`
times in a row (a whole cluster restarted empty).

**Pending owners.** For ``removal_grace`` after a ring change, the old owners that
left a partition stay its *pending owners*: the coordinator also sends them the
partition's writes and deletes (best effort, not counted towards the quorum), and a
read that meets a not-ready owner may ask one of them instead. ``TOPOLOGY`` lists
them (``"pending"``) for clients.

**Removal.** A node keeps the data of a partition it lost: it stays a source while
the new owners stream it. ``removal_grace`` after the loss it asks the new owners
``HOLDS [p, ...]`` (answer ``[bool, ...]``: ready there?) and drops the partition
only when every one of them says yes, asking again later otherwise. A write that
lands later in a partition this node does not own (a coordinator with an older
table) is found by a periodic scan and goes the same way.

**Restart.** A node restarted empty is started with seeds: it pulls every partition
it owns from its co-owners as soon as it has met them. The co-owners push nothing
(a pull already covers it, and a push would double the traffic):
:meth:`Rebalancer.on_peer_restart` only retries at once the transfers that were
waiting for a source.

**Verify.** A partition is streamed from one source, which may have missed a write
that its co-owners took (the write's hint for it still queued elsewhere): the new
owner would then lack it until anti-entropy. So once every owned partition is held,
the partitions streamed in that rebalance are compared at once with each of their
other owners (``verify``: the anti-entropy's Merkle sync of those partitions alone,
both ways), and what differs is repaired; ``/dist/rebalance`` says ``verifying``
meanwhile (``partitions_verified``, ``keys_verified_repaired``).

**Leave.** A node that leaves is out of its own ring first, so this node's
partitions have new owners in its table; :meth:`Rebalancer.push_out` then pushes
every partition it holds to the owners that gained it (``R_PUT_MANY`` in mode 0,
newer-wins on the receiver), and :meth:`Rebalancer.hand_over` waits until the
owners of everything this node holds, in the table without it, confirm they hold
it. The gainers also pull the partition from its remaining owners as after any ring
change (they no longer reach the leaver, out of their rings): the push carries
what only the leaver had, the writes it took that a co-owner missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hypercache._core.ring import Ring
from hypercache._core.vstore import VersionedStore
from hypercache.cluster.config import RebalanceSettings
from hypercache.cluster.metrics import LatencyHistogram
from hypercache.errors import (
    HyperCacheError,
    NotReadyError,
    ProtocolError,
    WrongOwnerError,
)
from hypercache.net.protocol import MAX_PUT_MANY, Limits, Op
from hypercache.observe import tracing

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "MAX_ATTEMPTS",
    "MAX_SETTLE",
    "NO_HOLDER_ATTEMPTS",
    "REPLAN_INTERVAL",
    "RETRY_QUEUE_MAX",
    "SETTLE",
    "OwnershipDiff",
    "PartitionStates",
    "RebalanceStats",
    "Rebalancer",
    "TokenBucket",
    "answer_holds",
    "answer_stream",
    "owner_table",
    "ownership_diff",
]

_log = logging.getLogger("hypercache.rebalance")

_STREAM: Final = int(Op.STREAM)
_HOLDS: Final = int(Op.HOLDS)
_R_PUT_MANY: Final = int(Op.R_PUT_MANY)
#: ``R_PUT_MANY`` mode of a leave's push: applied newer-wins, as replayed hints are.
_PUSH_MODE: Final = 0

#: Quiet time of the member set before a ring change is acted on, seconds.
SETTLE: Final = 0.05
#: Longest wait for the member set to settle after the first change, seconds.
MAX_SETTLE: Final = 1.0
#: Backoff of a failed transfer: doubles from MIN up to MAX seconds.
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 10.0
#: Failed attempts after which a transfer is dropped (until the next re-plan).
MAX_ATTEMPTS: Final = 8
#: Attempts in a row in which every live source answered "not held" (not ready,
#: wrong owner) after which the partition counts as having no source.
NO_HOLDER_ATTEMPTS: Final = 4
#: Transfers waiting for a retry, at most (or the partition count, when larger); one
#: more is dropped (counted).
RETRY_QUEUE_MAX: Final = 1024
#: Period of the re-plan (queues the owned partitions still not ready), seconds.
REPLAN_INTERVAL: Final = 10.0
#: Period of the loop (settling, retries due, pending owners expiring), seconds.
TICK: Final = 0.1
#: Period of the removal check (HOLDS for the partitions past their grace), seconds.
REMOVAL_INTERVAL: Final = 1.0
#: Delay before asking again for a partition whose new owners did not all confirm.
RECHECK: Final = 2.0
#: Seconds between two rounds of HOLDS in :meth:`Rebalancer.hand_over`.
HAND_OVER_POLL: Final = 0.2

#: Partition transfer duration buckets, seconds.
DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: An owner table: per partition the owner ids, primary first (``owner_table(ring)``).
OwnerTable = Sequence[Sequence[str]]


# ------------------------------------------------------------------ ownership diff


def owner_table(ring: Ring) -> list[list[str]]:
    """The owner table of ``ring``: row ``p`` is partition ``p``'s owner ids, primary first."""
    nodes = ring.nodes
    return [[nodes[i] for i in row] for row in ring.table()]


@dataclass(frozen=True, slots=True)
class OwnershipDiff:
    """What a ring change means for one node (see :func:`ownership_diff`)."""

    node_id: str
    #: partition -> the old owners to pull it from (every old owner but this node,
    #: primary first), for each partition this node owns now and did not before
    gained: dict[int, tuple[str, ...]]
    #: partition -> its new owners (primary first), for each partition this node
    #: owned and no longer does
    lost: dict[int, tuple[str, ...]]
    #: partition -> the old owners that are no longer owners (the pending owners),
    #: for every partition (not only this node's) that some old owner left
    departed: dict[int, tuple[str, ...]]
    #: partitions whose owner set changed
    changed: frozenset[int]
    #: of ``changed``, those whose primary changed too
    primary_changed: frozenset[int]
    #: of ``changed``, those that kept their primary (only a replica changed)
    replica_only: frozenset[int]
    #: partitions whose owner set stayed and whose primary moved to another of its
    #: owners (no data moves)
    reordered: frozenset[int]

    def summary(self) -> dict[str, int]:
        """Counts, for reports."""
        return {
            "gained": len(self.gained),
            "lost": len(self.lost),
            "changed": len(self.changed),
            "primary_changed": len(self.primary_changed),
            "replica_only": len(self.replica_only),
            "reordered": len(self.reordered),
        }


def ownership_diff(old_table: OwnerTable, new_table: OwnerTable, node_id: str) -> OwnershipDiff:
    """Compare two owner tables (as :func:`owner_table` gives them) for ``node_id``.

    :raises ValueError: the tables have different partition counts.
    """
    if len(old_table) != len(new_table):
        raise ValueError(
            f"owner tables of {len(old_table)} and {len(new_table)} partitions differ in size"
        )
    gained: dict[int, tuple[str, ...]] = {}
    lost: dict[int, tuple[str, ...]] = {}
    departed: dict[int, tuple[str, ...]] = {}
    changed: list[int] = []
    primary: list[int] = []
    reordered: list[int] = []
    for p, (old, new) in enumerate(zip(old_table, new_table, strict=True)):
        if list(old) == list(new):
            continue
        old_set, new_set = set(old), set(new)
        if old_set == new_set:
            reordered.append(p)
            continue
        changed.append(p)
        if not old or not new or old[0] != new[0]:
            primary.append(p)
        gone = tuple(o for o in old if o not in new_set)
        if gone:
            departed[p] = gone
        if node_id in new_set and node_id not in old_set:
            gained[p] = tuple(o for o in old if o != node_id)
        elif node_id in old_set and node_id not in new_set:
            lost[p] = tuple(new)
    changed_set = frozenset(changed)
    primary_set = frozenset(primary)
    return OwnershipDiff(
        node_id=node_id,
        gained=gained,
        lost=lost,
        departed=departed,
        changed=changed_set,
        primary_changed=primary_set,
        replica_only=changed_set - primary_set,
        reordered=frozenset(reordered),
    )


# ------------------------------------------------------------------ readiness


class PartitionStates:
    """Which partitions this node *holds* whole, and which it owns in its table.

    A held partition may be read and streamed to others. One that is not held is
    refused to readers (``R_GET``) and to nodes pulling it (``STREAM``): with
    :class:`~hypercache.errors.NotReadyError` when this node owns it (it is still
    streaming here: ask another owner), with
    :class:`~hypercache.errors.WrongOwnerError` when it does not (the asker's table
    is stale, or names this node as a previous owner that never held it): never
    with a miss that is not one. The replica side reads :attr:`missing` on every
    ``R_GET`` and looks further only when it is not 0.

    :param partitions: the partition count.
    :param held: whether every partition starts held (a founder) or none (a node
        that joins or restarts empty).
    """

    __slots__ = ("held", "missing", "owned", "partitions", "unready")

    def __init__(self, partitions: int, *, held: bool) -> None:
        self.partitions = partitions
        #: 1 for each partition held
        self.held = bytearray([1 if held else 0]) * partitions
        #: 1 for each partition owned in the current table
        self.owned = bytearray(partitions)
        #: owned partitions not held (not ready)
        self.unready = 0
        #: partitions not held
        self.missing = 0 if held else partitions

    def set_owned(self, partitions: Iterable[int]) -> None:
        """The partitions owned in the new table."""
        owned = bytearray(self.partitions)
        for p in partitions:
            owned[p] = 1
        self.owned = owned
        self.unready = sum(1 for o, h in zip(owned, self.held, strict=True) if o and not h)

    def is_ready(self, p: int) -> bool:
        """Whether partition ``p`` is held (received whole, or held from the start)."""
        return bool(self.held[p])

    def hold(self, p: int) -> None:
        """Partition ``p`` is held now (streamed, or nothing to stream)."""
        if not self.held[p]:
            self.held[p] = 1
            self.missing -= 1
            if self.owned[p]:
                self.unready -= 1

    def release(self, p: int) -> None:
        """Partition ``p`` is no longer held (its data was dropped)."""
        if self.held[p]:
            self.held[p] = 0
            self.missing += 1
            if self.owned[p]:
                self.unready += 1

    def check(self, p: int) -> None:
        """Whether ``p`` may be read or streamed from here.

        :raises NotReadyError: ``p`` is owned and not held yet.
        :raises WrongOwnerError: ``p`` is neither owned nor held.
        """
        if not self.held[p]:
            if self.owned[p]:
                raise NotReadyError(
                    f"partition {p} is still streaming to this node; ask another owner"
                )
            raise WrongOwnerError(f"partition {p} is neither owned nor held by this node")


def answer_stream(
    store: VersionedStore, states: PartitionStates, limits: Limits, payload: Any, now_ms: int
) -> list[Any]:
    """``STREAM [partition, cursor, max_keys, max_bytes]`` ->
    ``[[[key, value, ts, origin, expire_at_ms, tombstone], ...], next_cursor | nil]``.

    The batch is capped at ``MAX_PUT_MANY`` entries and half a frame whatever asked.

    :raises ProtocolError: a malformed payload.
    :raises NotReadyError: the partition is owned here but not received yet.
    :raises WrongOwnerError: the partition is neither owned nor held here.
    """
    if type(payload) is not list or len(payload) != 4:
        raise ProtocolError("STREAM payload must be [partition, cursor, max_keys, max_bytes]")
    p, cursor, max_keys, max_bytes = payload
    if (
        type(p) is not int
        or not 0 <= p < store.partitions
        or (cursor is not None and type(cursor) is not int)
        or type(max_keys) is not int
        or max_keys < 1
        or type(max_bytes) is not int
        or max_bytes < 1
    ):
        raise ProtocolError(
            "STREAM payload must be [partition: int in range, cursor: uint64 | nil, "
            "max_keys: int >= 1, max_bytes: int >= 1]"
        )
    states.check(p)
    try:
        entries, nxt = store.stream(
            p, cursor, min(max_keys, MAX_PUT_MANY), min(max_bytes, limits.max_frame // 2), now_ms
        )
    except ValueError as exc:
        raise ProtocolError(f"STREAM: {exc}") from None
    return [entries, nxt]


def answer_holds(states: PartitionStates, payload: Any) -> list[bool]:
    """``HOLDS [p, ...]`` -> ``[bool, ...]``: whether this node holds each partition.

    :raises ProtocolError: not a list of partition numbers (at most one per partition).
    """
    if type(payload) is not list or len(payload) > states.partitions:
        raise ProtocolError(f"HOLDS payload must be a list of at most {states.partitions} ints")
    held = states.held
    out: list[bool] = []
    for p in payload:
        if type(p) is not int or not 0 <= p < states.partitions:
            raise ProtocolError(f"HOLDS: {p!r} is not a partition number")
        out.append(bool(held[p]))
    return out


# ------------------------------------------------------------------ rate limit


class TokenBucket:
    """A byte rate shared by every transfer of a node.

    Transfers :meth:`spend` what they received; the bucket refills at ``rate``
    bytes per second up to ``burst``; a spend that leaves it in debt sleeps until
    the debt is paid (a *throttle event*). Concurrent spenders queue up behind the
    debt, so over any span the bytes spent stay within ``burst + rate * span``.
    ``rate`` 0 means no limit.
    """

    __slots__ = ("_last", "burst", "clock", "rate", "sleep", "throttled", "throttled_s", "tokens")

    def __init__(
        self,
        rate: int,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self.clock = clock
        self.sleep = sleep
        self.tokens = self.burst
        self._last = clock()
        #: spends that had to wait, and how long they waited in all
        self.throttled = 0
        self.throttled_s = 0.0

    async def spend(self, n: int) -> None:
        """Take ``n`` bytes; wait while the bucket is in debt."""
        if self.rate <= 0:
            return
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
        self.tokens -= n
        if self.tokens < 0:
            wait = -self.tokens / self.rate
            self.throttled += 1
            self.throttled_s += wait
            await self.sleep(wait)


# ------------------------------------------------------------------ the rebalancer


class _Peer(Protocol):
    up: bool

    async def request(self, op: int, payload: Any, timeout: float) -> Any: ...


#: Applies one ``STREAM`` batch of a partition (``Replica.put_stream``): checks every
#: entry (ProtocolError for a malformed one, or one of another partition), applies
#: each through ``Replica.put(..., path="rebalance")``, returns ``(applied, bytes)``.
ApplyBatch = Callable[[int, list[Any]], tuple[int, int]]
#: Compares (and repairs) partitions with peers: ``{peer id: [partition, ...]}`` ->
#: entries repaired (``AntiEntropy.sync_now``).
Verify = Callable[[Mapping[str, list[int]]], Awaitable[int]]


class RebalanceStats:
    """Counters of the rebalancer; every attribute only grows."""

    __slots__ = (
        "bytes",
        "drops",
        "errors",
        "failures",
        "holds_asked",
        "holds_refused",
        "keys_applied",
        "keys_moved",
        "keys_pushed",
        "keys_removed",
        "keys_verified_repaired",
        "partitions_moved",
        "partitions_no_source",
        "partitions_pushed",
        "partitions_removed",
        "partitions_verified",
        "push_failures",
        "retries",
        "ring_changes",
    )

    def __init__(self) -> None:
        #: partitions streamed whole to this node
        self.partitions_moved = 0
        #: entries received by streaming, and of those applied (newer than held)
        self.keys_moved = 0
        self.keys_applied = 0
        #: bytes received by streaming (keys, values, STREAM_ENTRY_OVERHEAD each)
        self.bytes = 0
        #: partitions made ready with nothing streamed: no live source held them
        self.partitions_no_source = 0
        #: transfers that failed with every source tried (transport or remote errors)
        self.failures = 0
        #: transfers queued for a retry
        self.retries = 0
        #: transfers given up: too many attempts, or the retry queue was full
        self.drops = 0
        #: partitions dropped here after their new owners confirmed, and their entries
        self.partitions_removed = 0
        self.keys_removed = 0
        #: leaving: partitions pushed whole to an owner that gained them, their
        #: entries (once per receiver), and pushes cut short by a failed request
        self.partitions_pushed = 0
        self.keys_pushed = 0
        self.push_failures = 0
        #: streamed partitions compared with their other owners once held, and the
        #: entries those comparisons repaired
        self.partitions_verified = 0
        self.keys_verified_repaired = 0
        #: HOLDS requests sent, and partitions not confirmed by every new owner
        self.holds_asked = 0
        self.holds_refused = 0
        #: ring changes seen
        self.ring_changes = 0
        #: loop iterations that failed on a bug (logged)
        self.errors = 0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class _Outcome:
    """What one attempt at a transfer came to."""

    __slots__ = ("error", "holders_missing")

    def __init__(self) -> None:
        #: every live source answered that it does not hold the partition
        self.holders_missing = True
        self.error: BaseException | str | None = None


def _parse_stream(answer: Any, cursor: int | None) -> tuple[list[Any], int | None]:
    if type(answer) is not list or len(answer) != 2 or type(answer[0]) is not list:
        raise ProtocolError("STREAM answer must be [[entry, ...], next_cursor | nil]")
    entries, nxt = answer
    if nxt is not None and (type(nxt) is not int or (cursor is not None and nxt <= cursor)):
        raise ProtocolError("STREAM answer's next cursor does not move forward")
    return entries, nxt


class Rebalancer:
    """The rebalancing of one node (see the module docstring).

    :param node_id: this node's id.
    :param store: the node's versioned store.
    :param states: what this node holds and owns (shared with the replica side).
    :param apply: checks and applies one ``STREAM`` batch newer-wins
        (:meth:`~hypercache.cluster.replica.Replica.put_stream`), returns
        ``(applied, bytes)``; raises :class:`~hypercache.errors.ProtocolError` for a
        malformed batch.
    :param peers: ``() -> {node_id: peer}`` of the current peers.
    :param settings: batch sizes, concurrency, rate and removal grace.
    :param limits: the frame limit (batches stay within half a frame).
    :param timeout: deadline of one request to a peer.
    :param joining: the node started with seeds (it holds nothing at first).
    :param on_change: called when the pending owners change (the node's topology
        answer caches them).
    :param clock: monotonic seconds (injectable, with ``sleep``, for tests).
    :param settle: quiet time of the member set before acting on a ring change.
    """

    def __init__(
        self,
        *,
        node_id: str,
        store: VersionedStore,
        states: PartitionStates,
        apply: ApplyBatch,
        peers: Callable[[], Mapping[str, _Peer]],
        settings: RebalanceSettings,
        limits: Limits,
        timeout: float,
        joining: bool,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        settle: float = SETTLE,
        max_attempts: int = MAX_ATTEMPTS,
        retry_queue_max: int | None = None,
        verify: Verify | None = None,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.states = states
        self._apply = apply
        self._peers = peers
        self.settings = settings
        self.limits = limits
        self.timeout = timeout
        self.joining = joining
        self._on_change = on_change
        self.clock = clock
        self.sleep = sleep
        self.settle = settle
        self.max_attempts = max_attempts
        self._verify = verify
        #: partitions streamed in the rebalance under way (verified once it is done)
        self._streamed: set[int] = set()
        self._verifying: asyncio.Task[None] | None = None
        self.retry_queue_max = (
            max(RETRY_QUEUE_MAX, states.partitions) if retry_queue_max is None else retry_queue_max
        )
        self.batch_keys = min(settings.rebalance_batch_keys, MAX_PUT_MANY)
        self.batch_bytes = min(settings.rebalance_batch_bytes, limits.max_frame // 2)
        self.bucket = TokenBucket(
            settings.rebalance_rate, self.batch_bytes, clock=clock, sleep=sleep
        )
        self.stats = RebalanceStats()
        self.duration = LatencyHistogram(DURATION_BUCKETS)
        #: the current ring and its owner table
        self.ring: Ring | None = None
        self._table: list[list[str]] = []
        #: what the last ring change meant for this node
        self.last_diff: OwnershipDiff | None = None
        #: partition -> {old owner that left it: until (monotonic)}
        self._previous: dict[int, dict[str, float]] = {}
        self._previous_next = float("inf")  # earliest "until" in _previous
        #: partition -> old owners to pull it from (from the diffs), until it is held
        self._sources: dict[int, tuple[str, ...]] = {}
        #: partition held but not owned -> not dropped before (monotonic)
        self._removal: dict[int, float] = {}
        self._queue: deque[int] = deque()
        self._queued: set[int] = set()
        self._retry: list[tuple[float, int]] = []  # heap of (due, partition)
        self._retrying: set[int] = set()
        self._attempts: dict[int, int] = {}
        self._no_holder: dict[int, int] = {}
        #: partition -> where its transfer resumes
        self._cursors: dict[int, int | None] = {}
        self._running: dict[int, asyncio.Task[None]] = {}
        self._changed_at: float | None = None  # last ring change not acted on yet
        self._first_change: float | None = None
        self._next_replan = 0.0
        self._next_removal = 0.0
        self._removing: asyncio.Task[int] | None = None
        #: when the current rebalance started (first partition queued), and how long
        #: the last one took until every owned partition was held
        self._rebalance_started: float | None = None
        self.last_rebalance_s: float | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        #: whether the coordinator must look at partitions (something moves, or this
        #: node is not ready or isolated): the one flag its hot path reads
        self.active = False

    # ---------------------------------------------------------------- lifecycle

    def start(self, ring: Ring) -> None:
        """Start the loop with the node's first ring (itself alone)."""
        self._set_ring(ring)
        self._refresh_active()
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name="hypercache-rebalance"
        )

    async def stop(self) -> None:
        """Stop the loop, every transfer and the removal check."""
        self._stopping = True
        tasks = [t for t in (self._task, self._removing, self._verifying) if t is not None]
        tasks += self._running.values()
        self._task = self._removing = self._verifying = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._running.clear()

    # ------------------------------------------------------------------ views

    @property
    def isolated(self) -> bool:
        """A joining node that has met no other member yet (it coordinates nothing)."""
        return self.joining and (self.ring is None or len(self.ring) < 2)

    @property
    def ready(self) -> bool:
        """Whether this node holds every partition it owns (and is not isolated)."""
        return not self.isolated and self.states.unready == 0

    def is_ready(self, p: int) -> bool:
        """Whether partition ``p`` is held here (streamed, or held from the start)."""
        return self.states.is_ready(p)

    def check_serving(self) -> None:
        """:raises NotReadyError: this node is isolated (joining, no member met yet)."""
        if self.isolated:
            raise NotReadyError(
                f"{self.node_id} is joining and has not reached any member yet; ask another node"
            )

    def previous_owners(self, p: int) -> list[str]:
        """The pending owners of partition ``p``: old owners that left it less than
        ``removal_grace`` ago (this node may be one)."""
        slot = self._previous.get(p)
        return [] if slot is None else list(slot)

    def pending(self) -> dict[int, list[str]]:
        """Partition -> its pending owners, for every partition that has some."""
        return {p: list(slot) for p, slot in self._previous.items()}

    def pending_indexes(self, nodes: Sequence[str]) -> list[list[Any]]:
        """:meth:`pending` as ``[[partition, [index, ...]], ...]`` (ascending), the
        indexes into ``nodes`` (the topology's node list); owners not in it are left
        out. (Pairs, not a map: the wire takes only string map keys.)"""
        index = {nid: i for i, nid in enumerate(nodes)}
        out: list[list[Any]] = []
        for p in sorted(self._previous):
            row = [index[o] for o in self._previous[p] if o in index]
            if row:
                out.append([p, row])
        return out

    @property
    def queue_depth(self) -> int:
        """Transfers waiting: queued, or waiting for a retry."""
        return len(self._queue) + len(self._retry)

    def _refresh_active(self) -> None:
        self.active = bool(self._previous) or self.states.unready > 0 or self.isolated

    # --------------------------------------------------------------- ring changes

    @property
    def table(self) -> OwnerTable:
        """The current owner table (replaced, never changed, on a ring change)."""
        return self._table

    def _set_ring(self, ring: Ring) -> list[list[str]]:
        table = owner_table(ring)
        self.ring, self._table = ring, table
        me = self.node_id
        self.states.set_owned(p for p, row in enumerate(table) if me in row)
        return table

    def on_ring(self, old: Ring, new: Ring) -> OwnershipDiff:
        """The ring changed from ``old`` to ``new`` (synchronous, from the membership
        callback): ownership and pending owners now, streaming once settled."""
        now = self.clock()
        old_table = self._table if self.ring is old and self._table else owner_table(old)
        new_table = self._set_ring(new)
        diff = ownership_diff(old_table, new_table, self.node_id)
        self.last_diff = diff
        self.stats.ring_changes += 1
        until = now + self.settings.removal_grace
        for p, gone in diff.departed.items():
            slot = self._previous.setdefault(p, {})
            for owner in gone:
                slot[owner] = until
            self._previous_next = min(self._previous_next, until)
        # An owner that came back into a partition is no longer pending there.
        for p in [p for p in self._previous if p in diff.changed]:
            slot = self._previous[p]
            for owner in new_table[p]:
                slot.pop(owner, None)
            if not slot:
                del self._previous[p]
        for p, sources in diff.gained.items():
            known = self._sources.get(p, ())
            self._sources[p] = known + tuple(s for s in sources if s not in known)
        for p in diff.lost:
            self._removal.setdefault(p, until)
        owned = self.states.owned
        for p in [p for p in self._removal if owned[p]]:
            del self._removal[p]
        self._changed_at = now
        if self._first_change is None:
            self._first_change = now
        self._refresh_active()
        if diff.departed and self._on_change is not None:
            self._on_change()
        self._wake.set()
        if diff.changed:
            _log.info(
                "ring change: %d partitions changed, this node gained %d and lost %d",
                len(diff.changed),
                len(diff.gained),
                len(diff.lost),
            )
        return diff

    def on_peer_restart(self, node_id: str) -> None:
        """A peer came back (up again, or a new incarnation). It pulls what it owns
        by itself, so nothing is pushed; transfers of ours waiting for a source are
        retried at once, and partitions dropped from the queue are queued again."""
        if self._stopping:
            return
        retry = [p for _, p in self._retry]
        self._retry.clear()
        self._retrying.clear()
        for p in retry:
            self._attempts.pop(p, None)
            self._enqueue(p)
        self._next_replan = 0.0
        self._wake.set()

    # ------------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        while True:
            try:
                self.step()
            except Exception:  # a bug must not kill the loop; it is logged
                _log.exception("rebalance step failed")
                self.stats.errors += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._wake.wait()
            self._wake.clear()

    def step(self) -> None:
        """One pass of the loop: act on a settled ring change, queue due retries,
        start transfers up to the concurrency, expire pending owners, start the
        removal check when due. Synchronous (transfers and the check run in tasks)."""
        now = self.clock()
        if self._changed_at is not None and not self.isolated:
            first = self._first_change if self._first_change is not None else now
            if now - self._changed_at >= self.settle or now - first >= MAX_SETTLE:
                self._changed_at = self._first_change = None
                self._attempts.clear()
                self._no_holder.clear()
                self.plan()
        if now >= self._next_replan and self._changed_at is None and not self.isolated:
            self.plan()
        while self._retry and self._retry[0][0] <= now:
            _, p = heapq.heappop(self._retry)
            self._retrying.discard(p)
            self._enqueue(p)
        self._start_transfers()
        if now >= self._previous_next:
            self._expire_previous(now)
        if now >= self._next_removal and self._removing is None and not self._stopping:
            self._next_removal = now + REMOVAL_INTERVAL
            self._scan_strays(now)
            if any(t <= now for t in self._removal.values()):
                self._removing = asyncio.get_running_loop().create_task(
                    self.removal_round(), name="hypercache-rebalance-removal"
                )
                self._removing.add_done_callback(self._removal_done)

    def plan(self) -> int:
        """Queue every owned partition that is not held and not queued, retrying
        nor streaming already; return how many were queued."""
        self._next_replan = self.clock() + REPLAN_INTERVAL
        owned, held = self.states.owned, self.states.held
        busy = self._queued | self._retrying | self._running.keys()
        queued = 0
        for p in range(self.states.partitions):
            if owned[p] and not held[p] and p not in busy:
                self._enqueue(p)
                queued += 1
        if queued and self._rebalance_started is None:
            self._rebalance_started = self.clock()
        return queued

    def _enqueue(self, p: int) -> None:
        if p not in self._queued and p not in self._running:
            self._queue.append(p)
            self._queued.add(p)

    def _wants(self, p: int) -> bool:
        return bool(self.states.owned[p]) and not self.states.held[p] and not self._stopping

    def _start_transfers(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue and len(self._running) < self.settings.rebalance_concurrency:
            p = self._queue.popleft()
            self._queued.discard(p)
            if not self._wants(p):
                continue
            task = loop.create_task(self._transfer(p), name=f"hypercache-rebalance-{p}")
            self._running[p] = task
            task.add_done_callback(functools.partial(self._transfer_done, p))

    def _transfer_done(self, p: int, task: asyncio.Task[None]) -> None:
        if self._running.get(p) is task:
            del self._running[p]
        if not task.cancelled() and task.exception() is not None:
            self.stats.errors += 1
            _log.error("transfer of partition %d failed", p, exc_info=task.exception())
        if not self._stopping:
            self._start_transfers()
            self._wake.set()

    # --------------------------------------------------------------- transfers

    def sources(self, p: int) -> list[str]:
        """Where partition ``p`` is pulled from, in order, live ones only: the old
        owners (primary first), the other owners of the table, the pending owners."""
        me = self.node_id
        order: list[str] = []
        row = self._table[p] if self._table else []
        for nid in (*self._sources.get(p, ()), *row, *self._previous.get(p, {})):
            if nid != me and nid not in order:
                order.append(nid)
        peers = self._peers()
        return [nid for nid in order if (peer := peers.get(nid)) is not None and peer.up]

    async def _transfer(self, p: int) -> None:
        start = self.clock()
        sources = self.sources(p)
        if not sources:
            self._held(p, start, streamed=False)
            return
        outcome = _Outcome()
        peers = self._peers()
        for source in sources:
            peer = peers.get(source)
            if peer is None or not peer.up:
                continue
            try:
                if await self._pull(p, peer, source):
                    self._held(p, start, streamed=True)
                return  # held, or no longer wanted
            except (NotReadyError, WrongOwnerError) as exc:
                outcome.error = f"{source}: {exc}"
            except (HyperCacheError, OSError) as exc:
                outcome.holders_missing = False
                outcome.error = f"{source}: {exc}"
                _log.info("streaming partition %d from %s failed: %s", p, source, exc)
        self._failed(p, outcome)

    async def _pull(self, p: int, peer: _Peer, source: str = "") -> bool:
        """Stream partition ``p`` from ``peer`` (node ``source``) from its cursor to
        the end; False when it stopped because the partition is no longer wanted."""
        apply = self._apply
        stats = self.stats
        cursor = self._cursors.get(p)
        while True:
            if not self._wants(p):
                return False
            # One span per batch streamed; the STREAM request carries it.
            attributes = {tracing.ATTR_PARTITION: p, tracing.ATTR_PEER: source}
            with tracing.span("Rebalance", attributes) as span:
                answer = await peer.request(
                    _STREAM, [p, cursor, self.batch_keys, self.batch_bytes], self.timeout
                )
                entries, nxt = _parse_stream(answer, cursor)
                applied, size = apply(p, entries)
                tracing.annotate(span, tracing.ATTR_COUNT, len(entries))
                tracing.annotate(span, tracing.ATTR_APPLIED, applied)
            stats.keys_moved += len(entries)
            stats.keys_applied += applied
            stats.bytes += size
            self._cursors[p] = cursor = nxt
            await self.bucket.spend(size)
            if nxt is None:
                return True

    def _held(self, p: int, start: float, *, streamed: bool) -> None:
        if not self._wants(p):
            return
        self.states.hold(p)
        self._cursors.pop(p, None)
        self._sources.pop(p, None)
        self._attempts.pop(p, None)
        self._no_holder.pop(p, None)
        if streamed:
            self.stats.partitions_moved += 1
            self.duration.observe(self.clock() - start)
            self._streamed.add(p)
        else:
            self.stats.partitions_no_source += 1
        if self.states.unready == 0:
            self._refresh_active()
            self._start_verify()
            if self._rebalance_started is not None:
                self.last_rebalance_s = self.clock() - self._rebalance_started
                self._rebalance_started = None
                _log.info(
                    "every owned partition is held (%.2f s, %d partitions streamed so far)",
                    self.last_rebalance_s,
                    self.stats.partitions_moved,
                )

    @property
    def verifying(self) -> bool:
        """Whether streamed partitions are being compared with their other owners."""
        return self._verifying is not None and not self._verifying.done()

    def _start_verify(self) -> None:
        if self._verify is None or not self._streamed or self._stopping:
            return
        parts, me = sorted(self._streamed), self.node_id
        self._streamed.clear()
        by_peer: dict[str, list[int]] = {}
        for p in parts:
            for owner in self._table[p]:
                if owner != me:
                    by_peer.setdefault(owner, []).append(p)
        if not by_peer:
            return
        previous = self._verifying
        self._verifying = asyncio.get_running_loop().create_task(
            self._verify_after(previous, by_peer, len(parts)), name="hypercache-rebalance-verify"
        )

    async def _verify_after(
        self, previous: asyncio.Task[None] | None, by_peer: dict[str, list[int]], count: int
    ) -> None:
        if previous is not None:
            with contextlib.suppress(BaseException):
                await previous
        assert self._verify is not None
        try:
            repaired = await self._verify(by_peer)
        except Exception:  # logged; anti-entropy's rounds repair later
            _log.exception("verifying streamed partitions failed")
            self.stats.errors += 1
            return
        self.stats.partitions_verified += count
        self.stats.keys_verified_repaired += repaired
        if repaired:
            _log.info("verified %d streamed partitions: %d entries repaired", count, repaired)

    def _failed(self, p: int, outcome: _Outcome) -> None:
        if not self._wants(p):
            return
        now = self.clock()
        if outcome.holders_missing:
            misses = self._no_holder[p] = self._no_holder.get(p, 0) + 1
            if misses >= NO_HOLDER_ATTEMPTS:
                _log.info("partition %d: no live source holds it; ready with nothing", p)
                self._held(p, now, streamed=False)
                return
        else:
            self._no_holder.pop(p, None)
            self.stats.failures += 1
        attempts = self._attempts[p] = self._attempts.get(p, 0) + 1
        if attempts >= self.max_attempts or len(self._retry) >= self.retry_queue_max:
            self.stats.drops += 1
            self._attempts.pop(p, None)
            _log.warning(
                "partition %d: transfer dropped after %d attempts (%s); it stays not ready "
                "until the next re-plan",
                p,
                attempts,
                outcome.error,
            )
            return
        delay = min(BACKOFF_MIN * 2 ** (attempts - 1), BACKOFF_MAX)
        heapq.heappush(self._retry, (now + delay, p))
        self._retrying.add(p)
        self.stats.retries += 1

    # ----------------------------------------------------------------- hand-over

    def _expire_previous(self, now: float) -> None:
        nxt = float("inf")
        changed = False
        for p in list(self._previous):
            slot = self._previous[p]
            for owner in [o for o, until in slot.items() if until <= now]:
                del slot[owner]
                changed = True
            if slot:
                nxt = min(nxt, *slot.values())
            else:
                del self._previous[p]
        self._previous_next = nxt
        if changed:
            self._refresh_active()
            if self._on_change is not None:
                self._on_change()

    def _scan_strays(self, now: float) -> None:
        """Partitions this node does not own but holds or has entries in (a write from
        a coordinator with an older table) go to removal, after the grace."""
        owned, held = self.states.owned, self.states.held
        partition_len = self.store.partition_len
        until = now + self.settings.removal_grace
        removal = self._removal
        for p in range(self.states.partitions):
            if not owned[p] and p not in removal and (held[p] or partition_len(p)):
                removal[p] = until

    def _removal_done(self, task: asyncio.Task[int]) -> None:
        self._removing = None
        if not task.cancelled() and task.exception() is not None:
            self.stats.errors += 1
            _log.error("removal check failed", exc_info=task.exception())

    async def _holds(self, target: str, parts: list[int]) -> dict[int, bool]:
        """``HOLDS`` of ``target`` for ``parts``; ``{}`` when it cannot answer."""
        peer = self._peers().get(target)
        if peer is None or not peer.up:
            return {}
        self.stats.holds_asked += 1
        try:
            answer = await peer.request(_HOLDS, parts, self.timeout)
        except (HyperCacheError, OSError) as exc:
            _log.info("HOLDS to %s failed: %s", target, exc)
            return {}
        if type(answer) is not list or len(answer) != len(parts):
            _log.warning("malformed HOLDS answer from %s", target)
            return {}
        return {p: a is True for p, a in zip(parts, answer, strict=True)}

    async def _confirmed(self, parts: Iterable[int], table: OwnerTable) -> set[int]:
        """The partitions of ``parts`` whose every owner in ``table`` (but this node)
        confirms it holds them."""
        me = self.node_id
        asks: dict[str, list[int]] = {}
        targets: dict[int, list[str]] = {}
        for p in parts:
            row = [o for o in table[p] if o != me]
            if row:
                targets[p] = row
                for owner in row:
                    asks.setdefault(owner, []).append(p)
        names = list(asks)
        answers = dict(
            zip(names, await asyncio.gather(*(self._holds(n, asks[n]) for n in names)), strict=True)
        )
        return {p for p, row in targets.items() if all(answers[o].get(p) for o in row)}

    async def removal_round(self) -> int:
        """Drop each partition past its removal grace whose new owners all confirm
        they hold it; the others are asked again :data:`RECHECK` seconds later.
        Return how many partitions were dropped."""
        now = self.clock()
        owned = self.states.owned
        due = []
        for p, until in list(self._removal.items()):
            if owned[p]:
                del self._removal[p]
            elif until <= now:
                due.append(p)
        if not due:
            return 0
        confirmed = await self._confirmed(due, self._table)
        dropped = 0
        later = self.clock() + RECHECK
        for p in due:
            if p not in self._removal or self.states.owned[p]:
                continue  # owned again meanwhile
            if p in confirmed:
                n = self.store.drop_partition(p)
                self.states.release(p)
                del self._removal[p]
                self._cursors.pop(p, None)
                self.stats.partitions_removed += 1
                self.stats.keys_removed += n
                dropped += 1
            else:
                self._removal[p] = later
                self.stats.holds_refused += 1
        if dropped:
            _log.info("dropped %d partitions that their new owners hold", dropped)
        return dropped

    async def push_out(self, old_table: OwnerTable, now_ms: Callable[[], int]) -> int:
        """Push every partition this node holds data of to the owners that gained it
        from ``old_table`` to the current table (a leave: this node is out of the
        current ring), ``rebalance_concurrency`` partitions at a time, in batches
        capped and rate-limited like streaming. A failed request ends that
        partition's push to that owner (counted; it pulls the partition from its
        co-owners anyway). Return how many (partition, owner) pushes completed."""
        table = self._table
        me = self.node_id
        partition_len = self.store.partition_len
        work = [
            (p, owner)
            for p in range(self.states.partitions)
            if partition_len(p)
            for owner in table[p]
            if owner != me and owner not in old_table[p]
        ]
        gate = asyncio.Semaphore(self.settings.rebalance_concurrency)

        async def push(p: int, owner: str) -> bool:
            async with gate:
                return await self._push(p, owner, now_ms)

        done = await asyncio.gather(*(push(p, owner) for p, owner in work))
        _log.info("pushed %d of %d partition copies to their new owners", sum(done), len(work))
        return sum(done)

    async def _push(self, p: int, owner: str, now_ms: Callable[[], int]) -> bool:
        peer = self._peers().get(owner)
        if peer is None or not peer.up:
            self.stats.push_failures += 1
            return False
        stream, stats = self.store.stream, self.stats
        cursor: int | None = None
        while True:
            entries, cursor = stream(p, cursor, self.batch_keys, self.batch_bytes, now_ms())
            if entries:
                try:
                    await peer.request(_R_PUT_MANY, [entries, _PUSH_MODE], self.timeout)
                except (HyperCacheError, OSError) as exc:
                    _log.info("pushing partition %d to %s failed: %s", p, owner, exc)
                    stats.push_failures += 1
                    return False
                stats.keys_pushed += len(entries)
                await self.bucket.spend(sum(len(e[0]) + len(e[1]) for e in entries))
            if cursor is None:
                stats.partitions_pushed += 1
                return True

    async def hand_over(self, timeout: float, ring: Ring | None = None) -> bool:
        """Wait until the owners of everything this node holds, in ``ring`` (by
        default the current ring without this node), confirm with ``HOLDS`` that they
        hold it. Drops nothing. Return whether they all did within ``timeout``
        seconds (False at once when no other member is left to hold anything)."""
        if ring is None:
            current = self.ring
            others = [] if current is None else [n for n in current.nodes if n != self.node_id]
            if not others or current is None:
                return False
            ring = Ring(
                others,
                vnodes=int(current.vnodes),
                partitions=int(current.partitions),
                replication=int(current.replication),
            )
        table = owner_table(ring)
        deadline = self.clock() + timeout
        held, partition_len = self.states.held, self.store.partition_len
        while True:
            parts = [p for p in range(self.states.partitions) if held[p] or partition_len(p)]
            confirmed = await self._confirmed(parts, table)
            if all(p in confirmed for p in parts):
                return True
            left = deadline - self.clock()
            if left <= 0:
                return False
            await self.sleep(min(HAND_OVER_POLL, left))

    # ------------------------------------------------------------------ reports

    def report(self) -> dict[str, Any]:
        """The ``/dist/rebalance`` body."""
        s = self.settings
        diff = self.last_diff
        return {
            "node_id": self.node_id,
            "ready": self.ready,
            "joining": self.joining,
            "isolated": self.isolated,
            "not_ready": self.states.unready,
            "queued": len(self._queue),
            "retrying": len(self._retry),
            "queue_depth": self.queue_depth,
            "in_flight": sorted(self._running),
            "pending_partitions": len(self._previous),
            "removal_pending": len(self._removal),
            "verifying": self.verifying,
            "last_rebalance_s": self.last_rebalance_s,
            "last_diff": None if diff is None else diff.summary(),
            "throttle_events": self.bucket.throttled,
            "throttled_s": round(self.bucket.throttled_s, 6),
            "settings": {
                "rebalance_batch_keys": s.rebalance_batch_keys,
                "rebalance_batch_bytes": s.rebalance_batch_bytes,
                "rebalance_concurrency": s.rebalance_concurrency,
                "rebalance_rate": s.rebalance_rate,
                "removal_grace": s.removal_grace,
            },
            **self.stats.as_dict(),
        }

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        for name, doc, value in (
            ("partitions_moved", "Partitions streamed whole to this node.", s.partitions_moved),
            ("keys_moved", "Entries received by partition streaming.", s.keys_moved),
            ("keys_applied", "Streamed entries applied (newer than held).", s.keys_applied),
            ("bytes", "Bytes received by partition streaming.", s.bytes),
            (
                "partitions_no_source",
                "Partitions made ready with nothing streamed: no live source held them.",
                s.partitions_no_source,
            ),
            ("failures", "Partition transfers that failed with every source.", s.failures),
            ("retries", "Partition transfers queued for a retry.", s.retries),
            (
                "drops",
                "Partition transfers given up (attempts exhausted, retry queue full).",
                s.drops,
            ),
            (
                "throttle_events",
                "Streamed batches that waited for the rate limit.",
                self.bucket.throttled,
            ),
            (
                "throttle_seconds",
                "Seconds transfers waited for the rate limit.",
                self.bucket.throttled_s,
            ),
            (
                "partitions_removed",
                "Partitions dropped here once their new owners confirmed holding them.",
                s.partitions_removed,
            ),
            ("keys_removed", "Entries dropped with those partitions.", s.keys_removed),
            (
                "partitions_pushed",
                "Partitions pushed whole to an owner that gained them (leaving).",
                s.partitions_pushed,
            ),
            ("keys_pushed", "Entries pushed to new owners (leaving).", s.keys_pushed),
            (
                "push_failures",
                "Pushes to a new owner cut short by a failed request (leaving).",
                s.push_failures,
            ),
            (
                "partitions_verified",
                "Streamed partitions compared with their other owners once held.",
                s.partitions_verified,
            ),
            (
                "keys_verified_repaired",
                "Entries repaired by comparing streamed partitions with their other owners.",
                s.keys_verified_repaired,
            ),
            ("holds_asked", "HOLDS requests sent.", s.holds_asked),
            (
                "holds_refused",
                "Partition removals put off: a new owner did not confirm.",
                s.holds_refused,
            ),
            ("ring_changes", "Ring changes seen.", s.ring_changes),
        ):
            yield CounterMetricFamily(f"hypercache_dist_rebalance_{name}", doc, value=value)
        for name, doc, gauge in (
            ("queue_depth", "Partition transfers queued or waiting for a retry.", self.queue_depth),
            ("in_flight", "Partition transfers running.", len(self._running)),
            ("not_ready", "Owned partitions not received yet.", self.states.unready),
            (
                "pending_partitions",
                "Partitions whose old owners still get their writes.",
                len(self._previous),
            ),
            (
                "removal_pending",
                "Partitions held here, not owned, waiting to be dropped.",
                len(self._removal),
            ),
        ):
            yield GaugeMetricFamily(f"hypercache_dist_rebalance_{name}", doc, value=gauge)
        yield self.duration.family(
            "hypercache_dist_rebalance_partition_duration_seconds",
            "Duration of partition transfers to this node (first request to ready).",
        )
