"""The anti-entropy loop: replicas compare digests and exchange only what differs.

Every node runs one :class:`AntiEntropy` loop. A *round* visits each live peer that
shares partitions with this node and syncs the partitions of that pair which this
node *leads* (it comes before the peer in the partition's owner list, so each pair
of owners of a partition is synced by exactly one of them). The exchange (MERKLE
groups, then partitions, KEYS of the sub-buckets that differ, PULL and R_PUT_MANY
of the entries) and why it has this shape are in :mod:`hypercache.cluster.merkle`;
the peer answers through its :class:`~hypercache.cluster.replica.Replica`.

Absence never deletes: a key missing on one side is copied to it, never removed
from the other; only tombstones delete. Both sides sweep expired entries before
comparing, entries whose absolute expiry has passed are never listed, pulled or
pushed (compared with the wall clock), so an entry expired on one replica and not
yet swept on another is never brought back.

Capacity rule (``docs/cluster.md``, :mod:`hypercache.cluster.replica`): a node never
takes back a copy of a key that is not newer than the version it evicted for memory
while it remembers that eviction, and while its store is above the high-water mark
anti-entropy only updates keys it holds and applies tombstones. A partition whose
last exchange with a peer ended with every difference refused or skipped is
*settled* for that pair: it is not descended into again until one of the two
digests changes, and a round that applied nothing counts as clean. So an evicted
key is neither pulled back in a loop nor keeps the interval at its base.

Adaptive interval: the loop sleeps ``anti_entropy_interval`` after start. A round
that applied something runs again at once with the interval reset to the base; a
round cut short by its work bounds (``max_partitions``, ``max_keys``) runs again
after the base interval, continuing where it stopped; a clean round doubles the
interval up to ``anti_entropy_max_interval``. A peer coming back up resets the
interval to its base (the next round comes at most one base interval later; hinted
handoff gets the first go at what that peer missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, Protocol

import msgpack
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hypercache._core.vstore import VersionedStore
from hypercache.cluster.merkle import (
    BATCH_BYTES,
    BATCH_KEYS,
    BLOCK,
    GROUP,
    KEYS_BYTES,
    MASK32,
    SUB_BATCH,
    SWEEP_BUDGET,
    KeyRow,
    bits,
    block_digests,
    bucket_terms,
    check_list,
    check_pair,
    group_digest,
    parse_key_row,
)
from hypercache.cluster.metrics import LatencyHistogram
from hypercache.cluster.replica import admits_repair, evicted_covers
from hypercache.errors import ClockSkewError, HyperCacheError, ProtocolError
from hypercache.net.protocol import Limits, Op
from hypercache.observe import tracing
from hypercache.replication import WallClock, wall_ms

__all__ = ["AntiEntropy", "AntiEntropyStats"]

_log = logging.getLogger("hypercache.antientropy")

_MERKLE: Final = int(Op.MERKLE)
_KEYS: Final = int(Op.KEYS)
_PULL: Final = int(Op.PULL)
_R_PUT_MANY: Final = int(Op.R_PUT_MANY)

_packb = msgpack.Packer(use_bin_type=True, datetime=False, autoreset=True).pack

#: Round duration buckets, seconds.
ROUND_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AntiEntropyStats:
    """Counters of the anti-entropy loop; every attribute but ``interval`` only grows."""

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "errors",
        "interval",
        "keys_pulled",
        "keys_pushed",
        "keys_settled",
        "last_round_s",
        "partitions_compared",
        "partitions_differing",
        "rounds",
        "rounds_with_differences",
    )

    def __init__(self, interval: float) -> None:
        self.rounds = 0
        self.rounds_with_differences = 0
        self.partitions_compared = 0
        self.partitions_differing = 0
        self.keys_pulled = 0
        self.keys_pushed = 0
        self.keys_settled = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.errors = 0
        self.interval = interval
        self.last_round_s = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class _Peer(Protocol):
    node_id: str
    up: bool

    async def request(self, op: int, payload: Any, timeout: float) -> Any: ...


class _PeerSync:
    """What one sync with one peer found and did."""

    __slots__ = ("applied", "truncated")

    def __init__(self) -> None:
        self.applied = 0
        self.truncated = False


class AntiEntropy:
    """The anti-entropy loop of one node (see the module docstring).

    :param store: the node's versioned store.
    :param apply: applies one entry locally newer-wins (moving the clock), returns
        whether it was applied: ``apply(key, value, ts, origin, expire_at, tomb)``;
        raises :class:`~hypercache.errors.ClockSkewError` for a version too far
        ahead (that entry is then skipped).
    :param peers: ``() -> {node_id: peer}`` of the current peers.
    :param leads: ``(peer_id) -> [partition, ...]`` this node syncs with that peer.
    :param max_partitions: differing partitions descended into per peer per round.
    :param max_keys: entries pulled plus pushed per peer per round.
    :param wall: wall-clock ms, what expiries are judged by (the node's clock).
    """

    def __init__(
        self,
        *,
        store: VersionedStore,
        limits: Limits,
        apply: Callable[[bytes, bytes, int, int, int, bool], bool],
        peers: Callable[[], dict[str, _Peer]],
        leads: Callable[[str], list[int]],
        interval: float,
        max_interval: float,
        timeout: float,
        max_partitions: int = 512,
        max_keys: int = 20_000,
        wall: WallClock = wall_ms,
    ) -> None:
        self.store = store
        self.wall = wall
        self.limits = limits
        self._apply = apply
        self._peers = peers
        self._leads = leads
        self.base_interval = interval
        self.max_interval = max_interval
        self.timeout = timeout
        self.max_partitions = max_partitions
        self.max_keys = max_keys
        self.stats = AntiEntropyStats(interval)
        self.duration = LatencyHistogram(ROUND_BUCKETS)
        #: (peer, partition) -> (our digest, their digest) of a settled partition
        self._settled: dict[tuple[str, int], tuple[int, int]] = {}
        #: (peer) -> where the next round starts in the lead list
        self._cursor: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._budget = max_keys
        self._run_now = False

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name="hypercache-antientropy"
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self, *, now: bool = False) -> None:
        """Reset the interval to its base; with ``now``, run a round at once.

        A peer that comes back up resets the interval (hinted handoff gets the first
        go at what it missed; the next round, one base interval later, repairs the
        rest)."""
        self.stats.interval = self.base_interval
        self._run_now = self._run_now or now
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._run_now = False
            loop = asyncio.get_running_loop()
            due = loop.time() + self.stats.interval
            while not self._run_now and loop.time() < due:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due - loop.time()):
                        await self._wake.wait()
                if self._wake.is_set():
                    # Woken: the interval may have been reset to a shorter one.
                    self._wake.clear()
                    due = min(due, loop.time() + self.stats.interval)
            while True:
                try:
                    applied, truncated = await self.run_round()
                except Exception:  # a bug must not kill the loop; it is logged
                    _log.exception("anti-entropy round failed")
                    self.stats.errors += 1
                    applied, truncated = 0, False
                if applied:
                    # Again at once (a short breath so a write-heavy cluster, whose
                    # in-flight writes look like differences, is not synced nonstop).
                    self.stats.interval = self.base_interval
                    await asyncio.sleep(min(self.base_interval / 20, 0.5))
                    continue
                if truncated:
                    self.stats.interval = self.base_interval
                else:
                    self.stats.interval = min(self.stats.interval * 2, self.max_interval)
                break

    # -------------------------------------------------------------------- round

    async def run_round(self) -> tuple[int, bool]:
        """Sync with every live peer once; return ``(entries applied, truncated)``."""
        async with self._lock:
            start = time.perf_counter()
            self.store.sweep(self.wall(), SWEEP_BUDGET)
            applied = 0
            truncated = False
            for peer_id, peer in sorted(self._peers().items()):
                if not peer.up:
                    continue
                parts = self._leads(peer_id)
                if not parts:
                    continue
                # One span per round with a peer; its requests (MERKLE, KEYS, PULL)
                # carry it, and each range pulled has a MerklePull child.
                with tracing.span(
                    "MerkleSync", {tracing.ATTR_PEER: peer_id, tracing.ATTR_COUNT: len(parts)}
                ) as span:
                    try:
                        done = await self._sync(peer, parts)
                    except (HyperCacheError, OSError) as exc:
                        tracing.failed(span, exc)
                        self.stats.errors += 1
                        _log.info(
                            "anti-entropy with %s stopped: %s",
                            peer_id,
                            exc,
                            extra={"op": "merkle_sync", "peer": peer_id, "error": str(exc)},
                        )
                        continue
                    tracing.annotate(span, tracing.ATTR_APPLIED, done.applied)
                applied += done.applied
                truncated = truncated or done.truncated
            elapsed = time.perf_counter() - start
            self.stats.rounds += 1
            self.stats.last_round_s = elapsed
            if applied:
                self.stats.rounds_with_differences += 1
            self.duration.observe(elapsed)
            return applied, truncated

    async def sync_now(self, parts_by_peer: Mapping[str, list[int]]) -> int:
        """Compare the given partitions with the given peers at once, outside the
        rounds, and repair what differs (both ways, as a round does); return the
        entries applied here. A rebalance verifies what it streamed with it."""
        async with self._lock:
            peers = self._peers()
            applied = 0
            for peer_id, parts in sorted(parts_by_peer.items()):
                peer = peers.get(peer_id)
                if peer is None or not peer.up or not parts:
                    continue
                try:
                    done = await self._sync(peer, sorted(parts))
                except (HyperCacheError, OSError) as exc:
                    self.stats.errors += 1
                    _log.info("verifying partitions with %s stopped: %s", peer_id, exc)
                    continue
                applied += done.applied
            return applied

    async def _call(self, peer: _Peer, op: int, payload: Any) -> Any:
        self.stats.bytes_sent += len(_packb(payload))
        answer = await peer.request(op, payload, self.timeout)
        self.stats.bytes_received += len(_packb(answer))
        return answer

    async def _sync(self, peer: _Peer, parts: list[int]) -> _PeerSync:
        store = self.store
        pid = peer.node_id
        done = _PeerSync()
        # Rotate so a round cut short continues where the last one stopped.
        start = self._cursor.get(pid, 0) % len(parts)
        order = parts[start:] + parts[:start]
        self.stats.partitions_compared += len(order)

        # Level 0: group digests.
        groups: dict[int, list[int]] = {}
        for p in sorted(order):
            groups.setdefault(p // GROUP, []).append(p)
        request = []
        for g, ps in groups.items():
            mask = 0
            for p in ps:
                mask |= 1 << (p - g * GROUP)
            request.append([g, mask, group_digest([store.digest(p) for p in ps])])
        answer = await self._call(peer, _MERKLE, [0, request])
        theirs: dict[int, int] = {}
        for item in check_list(answer, "MERKLE answer"):
            g, digests = check_pair(item, "MERKLE group")
            members = groups.get(g)
            if members is None or type(digests) is not list or len(digests) != len(members):
                raise ProtocolError("MERKLE answer does not match the request")
            theirs.update(zip(members, digests, strict=True))
        rank = {p: i for i, p in enumerate(order)}
        differing = []
        for p in sorted(theirs, key=rank.__getitem__):
            mine, their = store.digest(p), theirs[p]
            if mine == their:
                self._settled.pop((pid, p), None)
            elif self._settled.get((pid, p)) != (mine, their):
                differing.append(p)
        for p in set(order) - theirs.keys():
            self._settled.pop((pid, p), None)
        self.stats.partitions_differing += len(differing)
        if len(differing) > self.max_partitions:
            done.truncated = True
            differing = differing[: self.max_partitions]
        if not differing:
            return done

        self._budget = self.max_keys
        last = differing[-1]
        for i in range(0, len(differing), SUB_BATCH):
            chunk = differing[i : i + SUB_BATCH]
            stopped_at = await self._sync_partitions(peer, chunk, theirs, done)
            if stopped_at is not None:
                done.truncated = True
                last = stopped_at
                break
        if done.truncated:
            # Next round starts with the first partition not synced.
            self._cursor[pid] = (start + order.index(last)) % len(parts)
        return done

    async def _sync_partitions(
        self, peer: _Peer, parts: list[int], theirs: dict[int, int], done: _PeerSync
    ) -> int | None:
        """Descend into ``parts``, adding what was applied to ``done``; return the
        partition where the round's key budget ran out, or None."""
        store = self.store
        pid = peer.node_id
        subs = {p: store.sub_digests(p) for p in parts}
        request = [[p, int(store.partition_len(p)), block_digests(subs[p])] for p in parts]
        answer = await self._call(peer, _MERKLE, [1, request])
        now = self.wall()
        # Per partition: the peer's differing rows and the keys of ours it lacks.
        remote: dict[int, list[KeyRow]] = {}
        lacking: dict[int, list[bytes]] = {}
        asks: list[list[Any]] = []
        for item in check_list(answer, "MERKLE answer"):
            if type(item) is not list or len(item) not in (3, 4) or item[0] not in subs:
                raise ProtocolError("MERKLE level-1 answer must be [partition, kind, ...]")
            p, kind = item[0], item[1]
            if kind == 1 and len(item) == 3:
                rows = remote[p] = [
                    parse_key_row(row) for row in check_list(item[2], "MERKLE listing")
                ]
                listed = {row[0] for row in rows}
                lacking[p] = [k for k, _, _ in store.keys(p) if k not in listed]
                continue
            if len(item) != 4:
                raise ProtocolError("malformed MERKLE level-1 answer")
            mask, packed = item[2], item[3]
            mine = subs[p]
            width = min(BLOCK, len(mine))
            blocks = list(bits(mask)) if type(mask) is int and mask >= 0 else None
            if (
                kind != 0
                or blocks is None
                or (blocks and blocks[-1] >= len(mine) // width)
                or type(packed) is not bytes
                or len(packed) != 4 * width * len(blocks)
            ):
                raise ProtocolError("malformed MERKLE level-1 answer")
            peer_subs = struct.unpack(f"<{len(packed) // 4}I", packed)
            remote[p] = []
            lacking[p] = []
            j = 0
            for i in blocks:
                for b in range(i * width, (i + 1) * width):
                    if mine[b] & MASK32 != peer_subs[j]:
                        asks.append([p, b, bucket_terms(store, p, b, now)])
                    j += 1
        await self._keys(peer, asks, remote, lacking)

        now = self.wall()
        pulls: list[tuple[bytes, int]] = []
        pushes: list[tuple[list[Any], int]] = []
        synced: list[int] = []
        settled_keys = 0
        stopped_at: int | None = None
        for p in parts:
            if p not in remote:
                continue  # equal after all (the block digests agree)
            p_pulls: list[bytes] = []
            p_pushes: list[list[Any]] = []
            seen: set[bytes] = set()
            for key, ts, origin, expire_at, tomb in remote[p]:
                seen.add(key)
                if expire_at and expire_at <= now:
                    continue
                got = store.peek(key, now)
                if got is None or (ts, origin) > (got[1], got[2]):
                    if got is None and (
                        evicted_covers(store, key, ts, origin)
                        or not admits_repair(store, key, len(key) + 256, tomb, now)
                    ):
                        settled_keys += 1
                        continue
                    p_pulls.append(key)
                elif (ts, origin) < (got[1], got[2]):
                    p_pushes.append([key, *got])
            for key in lacking[p]:
                if key in seen:
                    continue
                got = store.peek(key, now)
                if got is not None:
                    p_pushes.append([key, *got])
            work = len(p_pulls) + len(p_pushes)
            if work > self._budget and self._budget < self.max_keys:
                stopped_at = p  # the first partition of a round always goes through
                break
            self._budget -= work
            synced.append(p)
            pulls += [(key, p) for key in p_pulls]
            pushes += [(entry, p) for entry in p_pushes]

        applied_in: set[int] = set()
        pulled, refused = await self._pull(peer, pulls, applied_in)
        pushed, not_taken = await self._push(peer, pushes, applied_in)
        self.stats.keys_settled += settled_keys + refused + not_taken
        done.applied += pulled + pushed
        for p in synced:
            if p in applied_in:
                self._settled.pop((pid, p), None)
            else:
                # Everything left differs for good reasons (refused, expired, a
                # 32-bit collision): do not descend again until a digest changes.
                self._settled[(pid, p)] = (store.digest(p), theirs[p])
        return stopped_at

    async def _keys(
        self,
        peer: _Peer,
        asks: list[list[Any]],
        remote: dict[int, list[KeyRow]],
        lacking: dict[int, list[bytes]],
    ) -> None:
        """``KEYS`` for ``asks`` (``[p, b, bucket_terms]``): add the peer's differing
        rows to ``remote[p]`` and the keys of ours it lacks to ``lacking[p]``."""
        # Requests stay within the frame limit whatever it is configured to.
        budget = min(KEYS_BYTES, self.limits.max_frame // 2)
        i = 0
        while i < len(asks):
            j = i
            size = 0
            while j < len(asks) and (j == i or size + 8 * len(asks[j][2]) <= budget):
                size += 8 * len(asks[j][2])
                j += 1
            batch = asks[i:j]
            request = [
                [p, b, struct.pack(f"<{len(terms)}Q", *(t for t, _, _ in terms))]
                for p, b, terms in batch
            ]
            answer = check_list(await self._call(peer, _KEYS, request), "KEYS answer")
            if len(answer) != len(batch):
                raise ProtocolError("KEYS answer does not match the request")
            for (p, _b, terms), item in zip(batch, answer, strict=True):
                if type(item) is not list or len(item) != 2:
                    raise ProtocolError("KEYS answer item must be [rows, missing]")
                rows, missing = (
                    check_list(item[0], "KEYS rows"),
                    check_list(item[1], "KEYS missing"),
                )
                remote[p].extend(parse_key_row(row) for row in rows)
                for m in missing:
                    if type(m) is not int or not 0 <= m < len(terms):
                        raise ProtocolError("KEYS missing position out of range")
                    lacking[p].append(terms[m][1])
            i = j

    async def _pull(
        self, peer: _Peer, keys: list[tuple[bytes, int]], applied_in: set[int]
    ) -> tuple[int, int]:
        """PULL ``(key, partition)`` and apply; add the partitions where something
        was applied to ``applied_in``; return ``(applied, refused)``."""
        applied = refused = 0
        i = 0
        while i < len(keys):
            chunk = keys[i : i + BATCH_KEYS]
            with tracing.span(
                "MerklePull",
                {
                    tracing.ATTR_PEER: peer.node_id,
                    tracing.ATTR_COUNT: len(chunk),
                    tracing.ATTR_PARTITION: chunk[0][1],
                },
            ):
                answer = await self._call(peer, _PULL, [k for k, _ in chunk])
            rows = check_list(answer, "PULL answer")
            where = {key: (n, p) for n, (key, p) in enumerate(chunk)}
            # The answer keeps the request's order, skips keys the peer no longer
            # holds and may stop early (byte budget): go on after its last key.
            consumed = len(chunk)
            now = self.wall()
            for row in rows:
                if type(row) is not list or len(row) != 6:
                    raise ProtocolError("malformed PULL entry")
                key, value, ts, origin, expire_at, tomb = row
                key = self.limits.check_key(key)
                value = bytes(self.limits.check_value(value))
                at = where.get(key)
                if at is None:
                    raise ProtocolError("PULL answer holds a key not asked for")
                consumed, p = at[0] + 1, at[1]
                if expire_at and expire_at <= now:
                    continue
                if not admits_repair(self.store, key, len(key) + len(value), tomb, now):
                    refused += 1
                    continue
                try:
                    took = self._apply(key, value, ts, origin, expire_at, tomb)
                except ClockSkewError:  # counted by apply; the rest of the batch goes on
                    took = False
                if took:
                    applied += 1
                    applied_in.add(p)
                else:
                    refused += 1
            i += consumed
        self.stats.keys_pulled += applied
        return applied, refused

    async def _push(
        self, peer: _Peer, entries: list[tuple[list[Any], int]], applied_in: set[int]
    ) -> tuple[int, int]:
        """Push ``(entry, partition)`` with ``R_PUT_MANY`` mode 1; a batch that the
        peer took any of marks all its partitions in ``applied_in`` (the answer is a
        count). Return ``(applied, not taken)``."""
        applied = 0
        sent = 0
        # One entry always fits a frame (key and value limits leave room); a batch
        # stays within half of it, as handle_pull's answers do.
        budget = min(BATCH_BYTES, self.limits.max_frame // 2)
        i = 0
        while i < len(entries):
            size = 0
            j = i
            while j < len(entries) and j - i < BATCH_KEYS:
                size += len(entries[j][0][0]) + len(entries[j][0][1]) + 32
                if j > i and size > budget:
                    break
                j += 1
            batch = entries[i:j]
            answer = await self._call(peer, _R_PUT_MANY, [[e for e, _ in batch], 1])
            if type(answer) is not int:
                raise ProtocolError("R_PUT_MANY answer must be an int")
            if answer:
                applied_in.update(p for _, p in batch)
            applied += answer
            sent += len(batch)
            i = j
        self.stats.keys_pushed += applied
        return applied, sent - applied

    # ------------------------------------------------------------------ metrics

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        for name, doc, value in (
            ("rounds", "Anti-entropy rounds run.", s.rounds),
            (
                "rounds_with_differences",
                "Anti-entropy rounds that applied something.",
                s.rounds_with_differences,
            ),
            ("partitions_compared", "Partitions compared with a peer.", s.partitions_compared),
            ("partitions_differing", "Partitions found different.", s.partitions_differing),
            ("keys_pulled", "Entries pulled from peers and applied.", s.keys_pulled),
            ("keys_pushed", "Entries pushed to peers and applied there.", s.keys_pushed),
            (
                "keys_settled",
                "Differences left alone (evicted, above high-water, expired, refused).",
                s.keys_settled,
            ),
            ("sent_bytes", "Payload bytes sent by anti-entropy.", s.bytes_sent),
            ("received_bytes", "Payload bytes received by anti-entropy.", s.bytes_received),
            ("errors", "Anti-entropy exchanges that failed.", s.errors),
        ):
            yield CounterMetricFamily(f"hypercache_dist_antientropy_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "hypercache_dist_antientropy_interval_seconds",
            "Current anti-entropy interval.",
            value=s.interval,
        )
        yield self.duration.family(
            "hypercache_dist_antientropy_round_duration_seconds",
            "Duration of anti-entropy rounds.",
        )
