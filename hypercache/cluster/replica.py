"""The replica side of a node: everything a peer asks of this node's store.

A coordinator (this node's or a peer's) reads and writes an owner's copy with
``R_GET``, ``R_PUT``, ``R_DEL``; hinted handoff and anti-entropy push batches with
``R_PUT_MANY``; anti-entropy compares with ``MERKLE``, ``KEYS`` and ``PULL``
(:mod:`hypercache.cluster.merkle` computes those answers); rebalancing streams
partitions with ``STREAM`` and asks ``HOLDS`` (:mod:`hypercache.cluster.rebalance`).
``R_GET`` answers only for partitions this node holds: one it owns and is still
streaming to it gets :class:`~hypercache.errors.NotReadyError`, one it neither owns
nor holds :class:`~hypercache.errors.WrongOwnerError` (never a false miss); writes
are taken for any partition. Clients list the keys this node holds, a page at a
time, with ``SCAN`` (:meth:`Replica.scan`). :class:`Replica` checks
each payload, applies newer-wins, and is the one place where a received version
meets this node's clock: every version it applies moves the clock past it, and one
past the clock's horizon (``max_clock_skew`` ahead) is refused and counted
(``versions_refused``) on whatever path brought it.

Capacity rule (``docs/cluster.md``): while the store is above its *high-water
mark* (:data:`HIGH_WATER` of ``max_memory``), a repair copy (an anti-entropy push
or pull) adds no missing data entry, it only updates keys held and applies
tombstones; and the store itself refuses a copy not newer than a version it
evicted while it remembers that eviction. So eviction and repair never fight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from hypercache._core.vstore import STREAM_ENTRY_OVERHEAD, VersionedStore
from hypercache.cluster import merkle
from hypercache.cluster.metrics import DistStats
from hypercache.cluster.rebalance import PartitionStates, answer_holds, answer_stream
from hypercache.cluster.watch import Watchers
from hypercache.errors import ClockSkewError, ConfigError, ProtocolError
from hypercache.net.protocol import MAX_PUT_MANY, Limits
from hypercache.replication import Entry, KeyedEntry, WallClock, wall_ms

__all__ = [
    "HIGH_WATER",
    "MAX_SCAN",
    "PUT_MANY_COPY",
    "PUT_MANY_HINTS",
    "PUT_MANY_READ_REPAIR",
    "PUT_MANY_REPAIR",
    "SCAN_BUDGET",
    "SCAN_MAX_BYTES",
    "Replica",
    "admits_repair",
    "evicted_covers",
]

#: Fraction of ``max_memory`` above which repair adds no missing data entry.
HIGH_WATER: Final = 0.9

#: ``R_PUT_MANY`` modes: hints replayed (applied like writes) and anti-entropy
#: pushes (subject to the capacity rule).
PUT_MANY_HINTS: Final = 0
PUT_MANY_REPAIR: Final = 1
#: ... and read repairs a coordinator batched for this owner (applied like ``R_PUT``).
PUT_MANY_READ_REPAIR: Final = 2
#: ... and copies of a client's one-hop write that an owner sends on to the other
#: owners of its ring, or a moving partition's previous owners: applied like
#: ``R_PUT``, but only for a partition this node owns or still holds (a copy that
#: arrives after the partition was handed over and dropped is not kept).
PUT_MANY_COPY: Final = 3
_PUT_MANY_PATHS: Final = {
    PUT_MANY_HINTS: "hints",
    PUT_MANY_REPAIR: "repair_push",
    PUT_MANY_READ_REPAIR: "r_put",
    PUT_MANY_COPY: "client",
}

#: Keys one ``SCAN`` answer lists at most (a larger ``limit`` is capped to it).
MAX_SCAN: Final = 1000
#: Key bytes one ``SCAN`` answer carries at most (always at least one key; also at
#: most half the node's ``max_frame``).
SCAN_MAX_BYTES: Final = 1 << 20
#: Entries one ``SCAN`` request looks at, at most: past it the page ends at the next
#: partition boundary, however few keys it holds (a prefix that matches little must
#: not hold the event loop for a pass over the whole store).
SCAN_BUDGET: Final = 50_000
# A SCAN cursor: the partition (4 bytes, big-endian), then nothing (start of the
# partition) or _AFTER and the last key returned from it.
_AFTER: Final = b"\x00"

# The hybrid logical clock refuses to move past this (it keeps room to tick).
_MAX_REMOTE_TS: Final = 2**63 - 2


class _Clock(Protocol):
    def update(self, remote_ts: int) -> int: ...

    def admits(self, remote_ts: object) -> bool: ...


def admits_repair(
    store: VersionedStore, key: bytes, size: int, tombstone: bool, now_ms: int
) -> bool:
    """Whether a repair copy (anti-entropy) of ``key`` may be added to ``store``.

    Tombstones and keys already held are always admitted (the store still applies
    newer-wins); a missing data entry is not admitted while the store is above its
    high-water mark, nor when its version is covered by a remembered eviction (the
    store would refuse it anyway; checked by the caller with the version).
    """
    if tombstone or not store.max_bytes:
        return True
    if store.peek(key, now_ms) is not None:
        return True
    return store.bytes + size <= store.max_bytes * HIGH_WATER


def evicted_covers(store: VersionedStore, key: bytes, ts: int, origin: int) -> bool:
    """Whether the store remembers evicting ``key`` at a version not older than this one."""
    ev = store.recently_evicted(key)
    return ev is not None and (ts, origin) <= ev


def _ignore(_seconds: float) -> None:
    """The default latency observer."""


class Replica:
    """Answers what peers ask of this node's store (see the module docstring).

    :param store: the node's versioned store.
    :param clock: the node's hybrid logical clock (moved past what is applied; its
        horizon refuses versions too far ahead).
    :param limits: key and value size limits.
    :param stats: the node's counters.
    :param wall: wall-clock ms, what expiries are judged by (injectable).
    :param direct_latency: observes the seconds each client's own read took.
    :param states: which partitions this node holds and owns (rebalancing); ``None``:
        every partition is held (a store that never moves).
    """

    def __init__(
        self,
        *,
        store: VersionedStore,
        clock: _Clock,
        limits: Limits,
        stats: DistStats,
        wall: WallClock = wall_ms,
        direct_latency: Callable[[float], None] = _ignore,
        states: PartitionStates | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.limits = limits
        self.stats = stats
        self.wall = wall
        self.direct_latency = direct_latency
        self.states = states if states is not None else PartitionStates(store.partitions, held=True)
        #: the connections told of each version applied (``WATCH``); None: none
        self.watchers: Watchers | None = None

    # ------------------------------------------------------------ local access

    def get(self, key: bytes) -> Entry | None:
        """This node's entry for ``key`` (tombstones included), or ``None``."""
        got = self.store.get(key, self.wall())
        if got is None:
            return None
        value, ts, origin, expire_at, tombstone = got
        return (value, ts, origin, expire_at, bool(tombstone))

    def put(
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
        applied = self.store.apply(key, value, ts, origin, expire_at, tombstone, self.wall())
        if not applied:
            self.stats.version_conflicts += 1
        else:
            # Every path that applies a version comes through here: the watchers
            # hear of all of them (coordinated, replica, hints, repair, rebalance).
            watchers = self.watchers
            if watchers is not None and watchers.active:
                watchers.changed(key)
        return applied

    # ------------------------------------------------------------ peer requests

    def r_get(self, payload: Any) -> list[Any] | None:
        """``R_GET [key]`` from a peer (a read it coordinates).

        :raises NotReadyError: the key's partition is owned here and still streaming
            to this node (ask another owner: this is not a miss).
        :raises WrongOwnerError: the key's partition is neither owned nor held here
            (it was handed over, or never came): the asker's table is stale.
        """
        self.stats.replica_gets += 1
        return self._read(payload)

    def r_get_direct(self, payload: Any) -> list[Any] | None:
        """``R_GET [key]`` from a client reading the key's owners itself: a read this
        node answers for a client, counted and timed as one (route ``direct``). The
        same errors as :meth:`r_get`."""
        start = time.perf_counter()
        self.stats.direct_gets += 1
        try:
            return self._read(payload)
        finally:
            self.direct_latency(time.perf_counter() - start)

    def _read(self, payload: Any) -> list[Any] | None:
        if type(payload) is not list or len(payload) != 1:
            raise ProtocolError("R_GET payload must be [key]")
        key = self.limits.check_key(payload[0])
        states = self.states
        if states.missing:
            states.check(self.store.partition_of(key))
        entry = self.get(key)
        return None if entry is None else list(entry)

    def r_put(self, payload: Any) -> bool:
        """``R_PUT [key, value, ts, origin, expire_at_ms, tombstone]`` from a peer (or a
        client's read repair).

        :raises ClockSkewError: ``ts`` is more than ``max_clock_skew`` ahead.
        """
        key, value, ts, origin, expire_at, tombstone = self.check_entry(payload)
        self.stats.replica_puts += 1
        applied = self.put(key, value, ts, origin, expire_at, tombstone)
        if applied:
            self.stats.replica_puts_applied += 1
        return applied

    def w_put(self, entry: KeyedEntry) -> bool:
        """A client-stamped write (``W_PUT``) of a key this node owns, checked by the
        caller (:meth:`check_entry`, the owner list): applied through :meth:`put` like
        every other version (newer wins, the WATCH hook), on path ``client`` (a
        version past the clock's horizon is refused there and counted).

        :raises ClockSkewError: ``ts`` is more than ``max_clock_skew`` ahead.
        """
        key, value, ts, origin, expire_at, tombstone = entry
        self.stats.direct_puts += 1
        applied = self.put(key, value, ts, origin, expire_at, tombstone, "client")
        if applied:
            self.stats.direct_puts_applied += 1
        return applied

    def r_del(self, payload: Any) -> list[Any] | None:
        """``R_DEL [key, b"", ts, origin, 0, true]``: apply the tombstone (newer wins, as
        ``R_PUT``) and answer what was held before it, as ``R_GET`` would have, so a
        delete learns ``existed`` in one round trip."""
        key, value, ts, origin, expire_at, tombstone = self.check_entry(payload)
        if not tombstone:
            raise ProtocolError("R_DEL carries a tombstone")
        self.stats.replica_gets += 1
        self.stats.replica_puts += 1
        before = self.get(key)
        if self.put(key, value, ts, origin, expire_at, tombstone, "r_del"):
            self.stats.replica_puts_applied += 1
        return None if before is None else list(before)

    def r_put_many(self, payload: Any) -> int:
        """``R_PUT_MANY [[entry, ...], mode]``, each entry as ``R_PUT``'s payload.

        Mode 0 (replayed hints) and mode 2 (read repairs a coordinator batched for
        this owner) apply every entry newer-wins; mode 1 (anti-entropy push) also
        refuses a missing data entry while the store is above its high-water mark
        (the capacity rule). Answers how many entries were applied.
        The whole batch is checked before any entry is applied.
        """
        if type(payload) is not list or len(payload) != 2 or type(payload[0]) is not list:
            raise ProtocolError("R_PUT_MANY payload must be [[entry, ...], mode]")
        entries, mode = payload
        if type(mode) is not int or mode not in _PUT_MANY_PATHS:
            raise ProtocolError(f"R_PUT_MANY mode must be 0, 1, 2 or 3, got {mode!r}")
        if len(entries) > MAX_PUT_MANY:
            # Bounds the work of one request (~1 us an entry): senders batch below it.
            raise ProtocolError(
                f"R_PUT_MANY carries {len(entries)} entries, at most {MAX_PUT_MANY}"
            )
        checked = [self.check_entry(e) for e in entries]
        stats = self.stats
        stats.replica_puts += len(checked)
        now = self.wall()
        applied = 0
        store = self.store
        admits = self.clock.admits
        path = _PUT_MANY_PATHS[mode]
        states = self.states
        for key, value, ts, origin, expire_at, tombstone in checked:
            if mode == PUT_MANY_COPY and states.missing:
                p = store.partition_of(key)
                if not states.owned[p] and not states.held[p]:
                    continue  # handed over and dropped here: not ours to keep
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
            if self.put(key, value, ts, origin, expire_at, tombstone, path):
                applied += 1
        stats.replica_puts_applied += applied
        return applied

    def merkle(self, payload: Any) -> list[Any]:
        """``MERKLE [level, items]`` (:func:`hypercache.cluster.merkle.answer_merkle`)."""
        return merkle.answer_merkle(self.store, payload, self.wall())

    def keys(self, payload: Any) -> list[Any]:
        """``KEYS [[p, b, terms], ...]`` (:func:`hypercache.cluster.merkle.answer_keys`)."""
        return merkle.answer_keys(self.store, payload, self.wall())

    def pull(self, payload: Any) -> list[Any]:
        """``PULL [key, ...]`` (:func:`hypercache.cluster.merkle.answer_pull`)."""
        return merkle.answer_pull(self.store, self.limits, payload, self.wall())

    def put_stream(self, p: int, entries: list[Any]) -> tuple[int, int]:
        """Apply one ``STREAM`` batch of partition ``p`` (rebalancing): every entry is
        checked first (as :meth:`check_entry` would, and that it belongs to ``p``),
        then each goes through :meth:`put` with ``path="rebalance"``: newer-wins, the
        clock's horizon (a version too far ahead is skipped and counted). Return
        ``(applied, bytes)``, bytes counted as the source counts its batch (key +
        value + ``STREAM_ENTRY_OVERHEAD`` each).

        :raises ProtocolError: an entry is malformed or of another partition (nothing
            of the batch is applied).
        """
        max_key, max_value = self.limits.max_key, self.limits.max_value
        partition_of = self.store.partition_of
        size = 0
        for raw in entries:
            # check_entry inlined: this runs for every key a node receives.
            if type(raw) is not list or len(raw) != 6:
                raise ProtocolError(
                    "STREAM entry must be [key, value, ts, origin, expire_at, tomb]"
                )
            key, value, ts, origin, expire_at, tombstone = raw
            if (
                type(key) is not bytes
                or len(key) > max_key
                or type(value) is not bytes
                or len(value) > max_value
                or type(ts) is not int
                or not 0 <= ts < _MAX_REMOTE_TS
                or type(origin) is not int
                or not 0 <= origin < 2**32
                or type(expire_at) is not int
                or not 0 <= expire_at < 2**63
                or type(tombstone) is not bool
            ):
                raise ProtocolError(f"malformed STREAM entry: {raw!r:.200}")
            if partition_of(key) != p:
                raise ProtocolError(f"STREAM batch of partition {p} holds another's key")
            size += len(key) + len(value) + STREAM_ENTRY_OVERHEAD
        put = self.put
        applied = 0
        for key, value, ts, origin, expire_at, tombstone in entries:
            try:
                applied += put(key, value, ts, origin, expire_at, tombstone, "rebalance")
            except ClockSkewError:  # counted by put; the rest of the batch goes on
                continue
        return applied, size

    def stream(self, payload: Any) -> list[Any]:
        """``STREAM [partition, cursor, max_keys, max_bytes]``
        (:func:`hypercache.cluster.rebalance.answer_stream`)."""
        answer = answer_stream(self.store, self.states, self.limits, payload, self.wall())
        self.stats.streams_served += 1
        self.stats.stream_entries_served += len(answer[0])
        return answer

    def holds(self, payload: Any) -> list[bool]:
        """``HOLDS [p, ...]`` (:func:`hypercache.cluster.rebalance.answer_holds`)."""
        return answer_holds(self.states, payload)

    def scan(self, payload: Any) -> list[Any]:
        """``SCAN [cursor, limit]`` or ``[cursor, limit, prefix]``: one page of the keys
        of the live entries this node holds (no tombstones, nothing expired), as
        ``[[key, ...], next_cursor]``; ``next_cursor`` nil on the last page.

        Keys come in (partition, key bytes) order and the cursor is the position
        after the last key returned, so a key held from the first page to the last
        is listed exactly once; one written or dropped meanwhile may or may not be.
        A page holds at most ``min(limit, MAX_SCAN)`` keys and
        :data:`SCAN_MAX_BYTES` of them, and looks at :data:`SCAN_BUDGET` entries
        (rounded up to whole partitions): it may be short, even empty, with a
        cursor still to follow. Cost: each page sorts the keys of the partitions it
        visits.

        :raises ConfigError: ``limit`` is not a positive integer, or ``cursor`` is
            not one this node's ``SCAN`` gives (field ``limit`` / ``cursor``).
        :raises ProtocolError: another shape, or a ``prefix`` that is not bin.
        """
        if type(payload) is not list or len(payload) not in (2, 3):
            raise ProtocolError("SCAN payload must be [cursor, limit] or [cursor, limit, prefix]")
        cursor, limit = payload[0], payload[1]
        prefix = None if len(payload) == 2 or payload[2] is None else payload[2]
        if type(limit) is not int or limit < 1:
            raise ConfigError("limit", f"must be a positive integer, got {limit!r}")
        limit = min(limit, MAX_SCAN)
        if prefix is not None:
            prefix = self.limits.check_key(prefix)
        store = self.store
        partitions = int(store.partitions)
        p, after = self._scan_position(cursor, partitions)
        max_bytes = min(SCAN_MAX_BYTES, self.limits.max_frame // 2)
        now = self.wall()
        keys: list[bytes] = []
        size = examined = 0
        while p < partitions:
            entries = store.entries(p)
            examined += len(entries)
            rows = sorted(
                key
                for key, _value, _ts, _origin, expire_at, tombstone in entries
                if not tombstone
                and (expire_at == 0 or expire_at > now)
                and (prefix is None or key.startswith(prefix))
                and (after is None or key > after)
            )
            last = None
            for key in rows:
                cost = len(key) + 8  # with its msgpack header, roughly
                if len(keys) >= limit or (keys and size + cost > max_bytes):
                    return [keys, _scan_cursor(p, last)]
                keys.append(key)
                size += cost
                last = key
            p += 1
            after = None
            if p < partitions and (len(keys) >= limit or examined >= SCAN_BUDGET):
                return [keys, _scan_cursor(p, None)]
        return [keys, None]

    @staticmethod
    def _scan_position(cursor: Any, partitions: int) -> tuple[int, bytes | None]:
        if cursor is None:
            return 0, None
        if (
            type(cursor) is bytes
            and (len(cursor) == 4 or cursor[4:5] == _AFTER)
            and int.from_bytes(cursor[:4], "big") < partitions
        ):
            return int.from_bytes(cursor[:4], "big"), (cursor[5:] if len(cursor) > 4 else None)
        raise ConfigError("cursor", f"not a SCAN cursor of this node: {cursor!r:.80}")

    def check_entry(self, payload: Any) -> KeyedEntry:
        """An ``R_PUT``-shaped entry, checked: key and value within limits, version
        fields within what the store and the clock accept.

        :raises ProtocolError: anything else (nothing of the request is applied).
        """
        if type(payload) is not list or len(payload) != 6:
            raise ProtocolError("R_PUT payload must be [key, value, ts, origin, expire_at, tomb]")
        key, value, ts, origin, expire_at, tombstone = payload
        key = self.limits.check_key(key)
        value = bytes(self.limits.check_value(value))
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


def _scan_cursor(partition: int, last: bytes | None) -> bytes:
    """The ``SCAN`` cursor of the position after ``last`` in ``partition`` (its start
    when ``last`` is None)."""
    head = partition.to_bytes(4, "big")
    return head if last is None else head + _AFTER + last
