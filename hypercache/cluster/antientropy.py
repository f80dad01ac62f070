"""Merkle anti-entropy: replicas compare digests and exchange only what differs.

Every node runs one :class:`AntiEntropy` loop. A *round* visits each live peer that
shares partitions with this node and syncs the partitions of that pair which this
node *leads* (it comes before the peer in the partition's owner list, so each pair
of owners of a partition is synced by exactly one of them). One peer sync is:

1. ``MERKLE [0, [[group, mask, group_digest], ...]]``: partitions are grouped by 16
   (``group = p >> 4``, ``mask`` = the bits of the partitions included). The
   group digest is ``xxh3_64`` of the included partition digests in ascending
   order. The peer answers ``[[group, [digest, ...]], ...]`` for the groups whose
   digest differs on its side (its own digests of the masked partitions). A clean
   round therefore costs ~20 bytes per 16 partitions.
2. ``MERKLE [1, [[p, entries, tops], ...]]`` for the partitions whose digests
   differ. The 64 sub-buckets of a partition form 8 *blocks* of 8; ``tops`` is the
   asker's 8 block digests (wrapping sum of the block's sub-digests, low 32 bits,
   packed as 8 little-endian uint32). The peer answers ``[p, 0, mask, subs]``:
   ``mask`` has bit ``i`` set for each block whose digest differs on its side and
   ``subs`` is its 8 sub-digests of each such block (low 32 bits, packed, blocks in
   ascending order). A partition with at most :data:`SMALL_PARTITION` entries on
   both sides is answered ``[p, 1, [key_row, ...]]`` instead: its whole listing.
3. ``KEYS [[p, b, terms], ...]`` for the sub-buckets that differ: ``terms`` is the
   asker's digest terms of its unexpired entries of that sub-bucket (``entry_hash``,
   packed as little-endian uint64). The peer answers, item by item,
   ``[[key_row, ...], [i, ...]]``: its unexpired entries of the sub-bucket whose
   term is not among ``terms`` (the entries that differ), and the positions in
   ``terms`` it holds no entry for (the asker's entries that differ). A
   ``key_row`` is ``[key, ts, origin]``, or ``[key, ts, origin, tombstone,
   expire_at_ms]`` for a tombstone or an entry that expires.
4. Entries the peer has newer (or that we lack) are fetched with ``PULL [key, ...]``
   (answer ``[[key, value, ts, origin, expire_at_ms, tombstone], ...]``, possibly
   cut short by a byte budget) and applied newer-wins; entries we have newer (or
   the peer lacks) are sent with ``R_PUT_MANY [entries, 1]`` (mode 1: repair).
   Both are batched over all the partitions of one step-2 request.

Why this shape (measured with ``python -m bench.convergence_report``: two replicas
of 1,000,000 keys, 1 % divergent, 100-byte values; every partition then differs in
2-3 entries): the bytes go to the descent, not to the data. Sending a differing
partition's 64 sub-digests as msgpack uint64 costs ~580 bytes, listing a differing
sub-bucket's ~4 entries ~120 bytes, the repaired entry itself ~130. The block level
cuts the first to ~120 bytes, the terms cut the second to ~35 (equal entries are
recognised by their 8-byte term instead of being listed) and the data moves in one
request per step-2 batch instead of one per partition.

The 32-bit block and sub-digests can hide a difference (probability ``2**-32`` per
differing block or sub-bucket): the partition's 64-bit digest still differs, so it
is descended into again, finds nothing, and is *settled* (below) until one of the
two digests changes - a collision delays that repair to the next write in the
partition; it never loses data nor repairs wrongly. Terms are full 64-bit, like
the digests they add up to.

Absence never deletes: a key missing on one side is copied to it, never removed
from the other; only tombstones delete. Both sides sweep expired entries before
comparing, entries whose absolute expiry has passed are never listed, pulled or
pushed (compared with the wall clock), so an entry expired on one replica and not
yet swept on another is never brought back.

Capacity rule (``docs/cluster.md``): a node never takes back through anti-entropy
(or read repair) a copy of a key that is not newer than the version it evicted for
memory while it remembers that eviction (the store refuses it), and while its store
is above the *high-water mark* (90 % of ``max_memory``) anti-entropy only updates
keys it holds and applies tombstones: it adds no missing data entry. A partition
whose last exchange with a peer ended with every difference refused or skipped is
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
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol, TypeAlias

import msgpack
from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from xxhash import xxh3_64_intdigest

from hypercache._core.vstore import entry_hash
from hypercache.errors import ClockSkewError, HyperCacheError, ProtocolError
from hypercache.net.protocol import Limits, Op

__all__ = [
    "BLOCK",
    "GROUP",
    "HIGH_WATER",
    "AEStore",
    "AntiEntropy",
    "AntiEntropyStats",
    "admits_repair",
    "block_digests",
    "bucket_terms",
    "handle_keys",
    "handle_merkle",
    "handle_pull",
    "list_keys",
]

_log = logging.getLogger("hypercache.antientropy")

# Store protocols have a ``bytes`` counter, which shadows the builtin in their body.
_Bytes: TypeAlias = bytes
#: A parsed ``key_row``: ``(key, ts, origin, tombstone, expire_at_ms)``.
_KeyRow: TypeAlias = tuple[bytes, int, int, bool, int]

_MERKLE: Final = int(Op.MERKLE)
_KEYS: Final = int(Op.KEYS)
_PULL: Final = int(Op.PULL)
_R_PUT_MANY: Final = int(Op.R_PUT_MANY)

#: Partitions per group digest (the width of the mask).
GROUP: Final = 16
#: A differing partition with at most this many entries on both sides is listed
#: whole (~25 bytes a key) instead of through its sub-bucket digests (~9 bytes each).
SMALL_PARTITION: Final = 16
#: Fraction of ``max_memory`` above which repair adds no missing data entry.
HIGH_WATER: Final = 0.9
#: Expired entries reclaimed before a comparison, at most.
SWEEP_BUDGET: Final = 100_000
#: Payload budget of one PULL answer and of one R_PUT_MANY push, in bytes.
BATCH_BYTES: Final = 4 * 1024 * 1024
#: Keys per PULL request and entries per R_PUT_MANY push, at most.
BATCH_KEYS: Final = 512
#: Partitions per MERKLE level-1 request (and per batch of pulls and pushes).
SUB_BATCH: Final = 64
#: Sub-buckets per block of the MERKLE level-1 descent.
BLOCK: Final = 8
#: Term bytes per KEYS request, at most (a request always carries one sub-bucket).
KEYS_BYTES: Final = 1024 * 1024
_M32: Final = 0xFFFFFFFF

_packb = msgpack.Packer(use_bin_type=True, datetime=False, autoreset=True).pack

#: Round duration buckets, seconds.
ROUND_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class CapacityView(Protocol):
    """What the capacity rule reads of a store."""

    @property
    def max_bytes(self) -> int: ...
    @property
    def bytes(self) -> int: ...

    def peek(self, key: _Bytes, now_ms: int) -> tuple[_Bytes, int, int, int, bool] | None: ...


class AEStore(Protocol):
    """What anti-entropy needs of :class:`~hypercache._core.vstore.VersionedStore`."""

    @property
    def partitions(self) -> int: ...
    @property
    def sub_buckets(self) -> int: ...
    @property
    def max_bytes(self) -> int: ...
    @property
    def bytes(self) -> int: ...

    def partition_of(self, key: _Bytes) -> int: ...
    def partition_len(self, p: int) -> int: ...
    def digest(self, p: int) -> int: ...
    def sub_digests(self, p: int) -> list[int]: ...
    def sub_bucket_keys(self, p: int, b: int) -> list[tuple[_Bytes, int, int]]: ...
    def keys(self, p: int) -> list[tuple[_Bytes, int, int]]: ...
    def peek(self, key: _Bytes, now_ms: int) -> tuple[_Bytes, int, int, int, bool] | None: ...
    def sweep(self, now_ms: int, budget: int = 0) -> tuple[int, int]: ...
    def recently_evicted(self, key: _Bytes) -> tuple[int, int] | None: ...


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def group_digest(digests: list[int]) -> int:
    """Digest of a group: ``xxh3_64`` of its partition digests (uint64 LE, in order)."""
    return int(xxh3_64_intdigest(struct.pack(f"<{len(digests)}Q", *digests)))


def _mask_parts(g: int, mask: int, partitions: int) -> list[int]:
    base = g * GROUP
    out = []
    while mask:
        low = mask & -mask
        p = base + low.bit_length() - 1
        if p >= partitions:
            raise ProtocolError(f"partition {p} out of range")
        out.append(p)
        mask ^= low
    return out


def admits_repair(store: CapacityView, key: bytes, size: int, tombstone: bool, now_ms: int) -> bool:
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


def _evicted_covers(store: AEStore, key: bytes, ts: int, origin: int) -> bool:
    ev = store.recently_evicted(key)
    return ev is not None and (ts, origin) <= ev


def block_digests(subs: list[int]) -> bytes:
    """The block digests of a partition's sub-digests (blocks of :data:`BLOCK`, or
    of all of them when fewer): wrapping sums, low 32 bits, packed as little-endian
    uint32."""
    width = min(BLOCK, len(subs))
    return struct.pack(
        f"<{len(subs) // width}I",
        *(sum(subs[i : i + width]) & _M32 for i in range(0, len(subs), width)),
    )


def _pack_subs(subs: list[int], mask: int) -> bytes:
    width = min(BLOCK, len(subs))
    picked = [subs[b] & _M32 for i in _bits(mask) for b in range(i * width, (i + 1) * width)]
    return struct.pack(f"<{len(picked)}I", *picked)


def _bits(mask: int) -> Iterator[int]:
    i = 0
    while mask:
        if mask & 1:
            yield i
        mask >>= 1
        i += 1


def _row(key: bytes, ts: int, origin: int, tomb: bool, expire_at: int) -> list[Any]:
    """A ``key_row``: the two trailing fields only when not ``(False, 0)``."""
    if tomb or expire_at:
        return [key, ts, origin, tomb, expire_at]
    return [key, ts, origin]


def bucket_terms(
    store: AEStore, p: int, b: int, now_ms: int
) -> list[tuple[int, bytes, tuple[_Bytes, int, int, int, bool]]]:
    """``(term, key, entry)`` of the unexpired entries of sub-bucket ``b`` of ``p``
    (an expired entry met is reclaimed); ``term`` is the entry's digest term."""
    out = []
    peek = store.peek
    for key, _ts, _origin in store.sub_bucket_keys(p, b):
        got = peek(key, now_ms)
        if got is not None:
            term = entry_hash(xxh3_64_intdigest(key), got[1], got[2], got[4])
            out.append((term, key, got))
    return out


# ------------------------------------------------------------------- responder side


def handle_merkle(store: AEStore, payload: Any) -> list[Any]:
    """``MERKLE [level, items]`` from a peer (see the module docstring)."""
    if type(payload) is not list or len(payload) != 2 or type(payload[1]) is not list:
        raise ProtocolError("MERKLE payload must be [level, items]")
    level, items = payload
    parts = store.partitions
    out: list[Any] = []
    if level == 0:
        # Work bounds (an asker may send any frame): one item per group at most,
        # each at most GROUP partitions, so a request costs what one full
        # comparison costs (~1 ms for 4096 partitions), never more.
        groups = -(-parts // GROUP)
        if len(items) > groups:
            raise ProtocolError(f"MERKLE level 0 carries {len(items)} groups, at most {groups}")
        store.sweep(wall_ms(), SWEEP_BUDGET)
        for item in items:
            if (
                type(item) is not list
                or len(item) != 3
                or not all(type(x) is int and x >= 0 for x in item)
                or item[1] >> GROUP
            ):
                raise ProtocolError("MERKLE group must be [group, mask, digest]")
            g, mask, their = item
            ps = _mask_parts(g, mask, parts)
            mine = [store.digest(p) for p in ps]
            if group_digest(mine) != their:
                out.append([g, mine])
        return out
    if level == 1:
        if len(items) > SUB_BATCH:
            raise ProtocolError(
                f"MERKLE level 1 carries {len(items)} partitions, at most {SUB_BATCH}"
            )
        now = wall_ms()
        nb = store.sub_buckets
        blocks = nb // min(BLOCK, nb)
        for item in items:
            if (
                type(item) is not list
                or len(item) != 3
                or type(item[1]) is not int
                or type(item[2]) is not bytes
            ):
                raise ProtocolError("MERKLE level-1 item must be [partition, entries, tops]")
            p, theirs, tops = item
            if type(p) is not int or not 0 <= p < parts:
                raise ProtocolError(f"MERKLE partition {p!r} out of range")
            if max(theirs, store.partition_len(p)) <= SMALL_PARTITION:
                rows: list[Any] = []
                for b in range(nb):
                    rows.extend(_bucket_entries(store, p, b, now))
                out.append([p, 1, rows])
                continue
            if len(tops) != 4 * blocks:
                raise ProtocolError("peer has a different number of sub-buckets")
            subs = store.sub_digests(p)
            my_tops = block_digests(subs)
            mask = 0
            for i in range(blocks):
                if my_tops[4 * i : 4 * i + 4] != tops[4 * i : 4 * i + 4]:
                    mask |= 1 << i
            out.append([p, 0, mask, _pack_subs(subs, mask)])
        return out
    raise ProtocolError(f"MERKLE level must be 0 or 1, got {level!r}")


def _bucket_entries(store: AEStore, p: int, b: int, now_ms: int) -> Iterator[list[Any]]:
    for key, _ts, _origin in store.sub_bucket_keys(p, b):
        got = store.peek(key, now_ms)  # reclaims an expired entry
        if got is not None:
            _value, ts, origin, expire_at, tomb = got
            yield _row(key, ts, origin, tomb, expire_at)


def handle_keys(store: AEStore, payload: Any) -> list[Any]:
    """``KEYS [[p, b, terms], ...]``: per item, ``[[key_row, ...], [i, ...]]`` (the
    entries whose term the asker lacks, the asker's terms matching none here)."""
    if type(payload) is not list:
        raise ProtocolError("KEYS payload must be [[partition, sub_bucket, terms], ...]")
    nb = store.sub_buckets
    # Work bounds: the sub-buckets of one level-1 batch, and twice the term bytes an
    # asker puts in one request (the extra half for the bucket that crosses it).
    if len(payload) > SUB_BATCH * nb:
        raise ProtocolError(f"KEYS carries {len(payload)} sub-buckets, at most {SUB_BATCH * nb}")
    terms = sum(
        len(item[2])
        for item in payload
        if type(item) is list and len(item) == 3 and type(item[2]) is bytes
    )
    if terms > 2 * KEYS_BYTES:
        raise ProtocolError(f"KEYS carries {terms} bytes of terms, at most {2 * KEYS_BYTES}")
    now = wall_ms()
    out: list[Any] = []
    for item in payload:
        if type(item) is not list or len(item) != 3 or type(item[2]) is not bytes:
            raise ProtocolError("KEYS item must be [partition, sub_bucket, terms]")
        p, b, packed = item
        if type(p) is not int or not 0 <= p < store.partitions:
            raise ProtocolError(f"KEYS partition {p!r} out of range")
        if type(b) is not int or not 0 <= b < nb:
            raise ProtocolError(f"KEYS sub-bucket {b!r} out of range")
        if len(packed) % 8:
            raise ProtocolError("KEYS terms must be packed uint64")
        theirs = {t: i for i, t in enumerate(struct.unpack(f"<{len(packed) // 8}Q", packed))}
        rows = []
        for term, key, (_value, ts, origin, expire_at, tomb) in bucket_terms(store, p, b, now):
            if theirs.pop(term, None) is None:
                rows.append(_row(key, ts, origin, tomb, expire_at))
        out.append([rows, sorted(theirs.values())])
    return out


def handle_pull(store: AEStore, limits: Limits, payload: Any) -> list[Any]:
    """``PULL [key, ...]``: the held unexpired entries, in request order, cut short
    once the answer exceeds :data:`BATCH_BYTES` (the caller asks again later)."""
    if type(payload) is not list:
        raise ProtocolError("PULL payload must be [key, ...]")
    if len(payload) > BATCH_KEYS:
        raise ProtocolError(f"PULL asks for {len(payload)} keys, at most {BATCH_KEYS}")
    now = wall_ms()
    budget = min(BATCH_BYTES, limits.max_frame // 2)
    out: list[Any] = []
    size = 0
    for key in payload:
        got = store.peek(limits.check_key(key), now)
        if got is None:
            continue
        value, ts, origin, expire_at, tomb = got
        size += len(key) + len(value) + 32
        if out and size > budget:
            break
        out.append([key, value, ts, origin, expire_at, tomb])
    return out


def list_keys(
    store: AEStore, p: int, cursor: bytes | None, limit: int, now_ms: int
) -> tuple[list[list[Any]], bytes | None]:
    """One page of partition ``p``'s entries sorted by key, after ``cursor``.

    :returns: ``([[key, ts, origin, tombstone, expire_at], ...], next_cursor)``;
        ``next_cursor`` is None on the last page.
    """
    keys = sorted(k for k, _, _ in store.keys(p) if cursor is None or k > cursor)
    page: list[list[Any]] = []
    for key in keys:
        got = store.peek(key, now_ms)
        if got is None:
            continue
        if len(page) == limit:
            return page, page[-1][0]
        page.append([key, got[1], got[2], got[4], got[3]])
    return page, None


# ------------------------------------------------------------------- initiator side


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
    """

    def __init__(
        self,
        *,
        store: AEStore,
        limits: Limits,
        apply: Callable[[bytes, bytes, int, int, int, bool], bool],
        peers: Callable[[], dict[str, _Peer]],
        leads: Callable[[str], list[int]],
        interval: float,
        max_interval: float,
        timeout: float,
        max_partitions: int = 512,
        max_keys: int = 20_000,
    ) -> None:
        self.store = store
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
        self.duration = Histogram(
            "hypercache_dist_antientropy_round_duration_seconds",
            "Duration of anti-entropy rounds",
            buckets=ROUND_BUCKETS,
            registry=None,
        )
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
            self.store.sweep(wall_ms(), SWEEP_BUDGET)
            applied = 0
            truncated = False
            for peer_id, peer in sorted(self._peers().items()):
                if not peer.up:
                    continue
                parts = self._leads(peer_id)
                if not parts:
                    continue
                try:
                    done = await self._sync(peer, parts)
                except (HyperCacheError, OSError) as exc:
                    self.stats.errors += 1
                    _log.info("anti-entropy with %s stopped: %s", peer_id, exc)
                    continue
                applied += done.applied
                truncated = truncated or done.truncated
            elapsed = time.perf_counter() - start
            self.stats.rounds += 1
            self.stats.last_round_s = elapsed
            if applied:
                self.stats.rounds_with_differences += 1
            self.duration.observe(elapsed)
            return applied, truncated

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
        for item in _list(answer, "MERKLE answer"):
            g, digests = _pair(item, "MERKLE group")
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
        now = wall_ms()
        # Per partition: the peer's differing rows and the keys of ours it lacks.
        remote: dict[int, list[_KeyRow]] = {}
        lacking: dict[int, list[bytes]] = {}
        asks: list[list[Any]] = []
        for item in _list(answer, "MERKLE answer"):
            if type(item) is not list or len(item) not in (3, 4) or item[0] not in subs:
                raise ProtocolError("MERKLE level-1 answer must be [partition, kind, ...]")
            p, kind = item[0], item[1]
            if kind == 1 and len(item) == 3:
                rows = remote[p] = [_key_row(row) for row in _list(item[2], "MERKLE listing")]
                listed = {row[0] for row in rows}
                lacking[p] = [k for k, _, _ in store.keys(p) if k not in listed]
                continue
            if len(item) != 4:
                raise ProtocolError("malformed MERKLE level-1 answer")
            mask, packed = item[2], item[3]
            mine = subs[p]
            width = min(BLOCK, len(mine))
            blocks = list(_bits(mask)) if type(mask) is int and mask >= 0 else None
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
                    if mine[b] & _M32 != peer_subs[j]:
                        asks.append([p, b, bucket_terms(store, p, b, now)])
                    j += 1
        await self._keys(peer, asks, remote, lacking)

        now = wall_ms()
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
            for key, ts, origin, tomb, expire_at in remote[p]:
                seen.add(key)
                if expire_at and expire_at <= now:
                    continue
                got = store.peek(key, now)
                if got is None or (ts, origin) > (got[1], got[2]):
                    if got is None and (
                        _evicted_covers(store, key, ts, origin)
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
        remote: dict[int, list[_KeyRow]],
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
            answer = _list(await self._call(peer, _KEYS, request), "KEYS answer")
            if len(answer) != len(batch):
                raise ProtocolError("KEYS answer does not match the request")
            for (p, _b, terms), item in zip(batch, answer, strict=True):
                if type(item) is not list or len(item) != 2:
                    raise ProtocolError("KEYS answer item must be [rows, missing]")
                rows, missing = _list(item[0], "KEYS rows"), _list(item[1], "KEYS missing")
                remote[p].extend(_key_row(row) for row in rows)
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
            rows = _list(await self._call(peer, _PULL, [k for k, _ in chunk]), "PULL answer")
            where = {key: (n, p) for n, (key, p) in enumerate(chunk)}
            # The answer keeps the request's order, skips keys the peer no longer
            # holds and may stop early (byte budget): go on after its last key.
            consumed = len(chunk)
            now = wall_ms()
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
            ("rounds", "Anti-entropy rounds run", s.rounds),
            (
                "rounds_with_differences",
                "Anti-entropy rounds that applied something",
                s.rounds_with_differences,
            ),
            ("partitions_compared", "Partitions compared with a peer", s.partitions_compared),
            ("partitions_differing", "Partitions found different", s.partitions_differing),
            ("keys_pulled", "Entries pulled from peers and applied", s.keys_pulled),
            ("keys_pushed", "Entries pushed to peers and applied there", s.keys_pushed),
            (
                "keys_settled",
                "Differences left alone (evicted, above high-water, expired, refused)",
                s.keys_settled,
            ),
            ("bytes_sent", "Payload bytes sent by anti-entropy", s.bytes_sent),
            ("bytes_received", "Payload bytes received by anti-entropy", s.bytes_received),
            ("errors", "Anti-entropy exchanges that failed", s.errors),
        ):
            yield CounterMetricFamily(f"hypercache_dist_antientropy_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "hypercache_dist_antientropy_interval_seconds",
            "Current anti-entropy interval",
            value=s.interval,
        )
        yield from self.duration.collect()


def _list(value: Any, what: str) -> list[Any]:
    if type(value) is not list:
        raise ProtocolError(f"{what} must be a list")
    return value


def _key_row(row: Any) -> _KeyRow:
    """``(key, ts, origin, tombstone, expire_at)`` of a ``key_row``."""
    if (
        type(row) is not list
        or len(row) not in (3, 5)
        or type(row[0]) is not bytes
        or type(row[1]) is not int
        or type(row[2]) is not int
    ):
        raise ProtocolError("malformed key row")
    if len(row) == 3:
        return row[0], row[1], row[2], False, 0
    if type(row[3]) is not bool or type(row[4]) is not int:
        raise ProtocolError("malformed key row")
    return row[0], row[1], row[2], row[3], row[4]


def _pair(value: Any, what: str) -> tuple[int, Any]:
    if type(value) is not list or len(value) != 2 or type(value[0]) is not int:
        raise ProtocolError(f"{what} must be [int, ...]")
    return value[0], value[1]
