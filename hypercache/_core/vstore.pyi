"""Versioned key/value store of a cluster node.

Each entry is ``key -> (value, ts, origin, expire_at, tombstone)``: bytes value, a
version ``(ts, origin)`` (see :mod:`hypercache._core.hlc`), an absolute expiry in
wall-clock ms (0 = never) and a tombstone flag. Time is always passed in as
``now_ms`` (wall-clock ms, e.g. :func:`~hypercache._core.hlc.wall_clock_ms`): the
store never reads a clock, so tests drive it freely.

Rules:

* **Last writer wins.** :meth:`VersionedStore.apply` keeps a write only when its
  version is strictly newer than the one held; equal is a replay and a no-op. A
  delete is a write of a *tombstone* (empty value) and follows the same rule: it
  beats older writes and loses to newer ones.
* **Expired means absent.** An entry whose ``expire_at`` has passed is treated as
  missing by every call and reclaimed when touched or swept. A write that arrives
  already expired removes the older entry it beats and is not stored. Expiry
  leaves no tombstone.
* **Tombstone TTL.** A tombstone's ``expire_at`` is, unless given, the delete's
  physical time plus ``tombstone_ttl_ms``: ``(ts >> 16) + tombstone_ttl_ms``, the
  same instant on every replica. It must outlive the hint TTL and the
  anti-entropy period, or an older write that was still travelling can come back.
* **Digests.** Every held entry (tombstones included, and expired entries until
  reclaimed) contributes ``entry_hash(xxh3_64(key), ts, origin, tombstone)`` to its
  sub-bucket's digest by wrapping 64-bit addition; a partition's digest is the
  wrapping sum of its sub-buckets. Both are kept up to date in O(1) per change.
  Call :meth:`~VersionedStore.sweep` before comparing digests with a replica.
* **Byte budget.** An entry costs ``len(key) + len(value) + ENTRY_OVERHEAD`` bytes.
  With ``max_bytes`` set, writes evict data entries in least-recently-used order
  until the store fits; tombstones are never evicted, so only they can keep the
  store above budget. Evicted keys are remembered (bounded) with their versions;
  while remembered, a copy of the key that is not newer than the evicted version
  is refused by :meth:`~VersionedStore.apply`, so repair cannot pull the key
  straight back nor bring back a stale copy.
"""

from typing import TypeAlias

from hypercache.replication import Entry

# ``VersionedStore.bytes`` (a counter) shadows the builtin inside the class.
_Bytes: TypeAlias = bytes

#: Fixed per-entry cost added to ``len(key) + len(value)`` in the byte budget.
ENTRY_OVERHEAD: int
#: Bytes a :meth:`VersionedStore.stream` batch counts per entry besides its key and value.
STREAM_ENTRY_OVERHEAD: int
DEFAULT_TOMBSTONE_TTL_MS: int
DEFAULT_SUB_BUCKETS: int
DEFAULT_EVICTED_HISTORY: int
MAX_PARTITION_BITS: int
MAX_SUB_BUCKET_BITS: int
MAX_BUCKETS: int
MAX_EVICTED_HISTORY: int

def entry_hash(key_hash: int, ts: int, origin: int, tombstone: bool) -> int:
    """Digest term of one entry (part of the replica protocol; never change it).

    With ``fmix64`` the murmur3 64-bit finaliser and all arithmetic mod ``2**64``::

        h = fmix64(key_hash ^ 0x9E3779B97F4A7C15)
        h = fmix64(h ^ ts)
        h = fmix64(h ^ ((origin << 1) | tombstone))
    """

# (value, ts, origin, expire_at, tombstone)
_EntryView: TypeAlias = Entry

class VersionedStore:
    """Versioned key/value store, partitioned like :class:`~hypercache._core.ring.Ring`.

    :param partitions: number of partitions, a power of two up to ``2**20``; must
        equal the ring's so that :meth:`partition_of` agrees with it.
    :param sub_buckets: digest sub-buckets per partition, a power of two up to
        ``2**16`` (``partitions * sub_buckets`` at most ``2**22``). A key's
        sub-bucket is given by the hash bits right after its partition bits.
    :param max_bytes: byte budget, 0 for none.
    :param max_items: most data entries held (tombstones not counted), 0 for none;
        over it, writes evict least-recently-used data entries as for the byte budget.
    :param tombstone_ttl_ms: how long a tombstone is kept after its delete's time.
    :param evicted_history: how many recently evicted keys are remembered (0: none).
    :raises hypercache.errors.ConfigError: an argument is invalid; ``field`` names it.
    """

    partitions: int
    sub_buckets: int
    max_bytes: int
    max_items: int
    tombstone_ttl_ms: int
    #: Bytes charged for all held entries (data and tombstones).
    bytes: int
    #: Data entries evicted for the budget or by :meth:`evict`.
    evictions: int
    #: Data entries that expired (reclaimed, swept or dead on arrival).
    expirations: int
    #: Tombstones dropped after their TTL.
    tombstones_purged: int
    #: Tombstones held.
    tombstones: int

    def __init__(
        self,
        partitions: int,
        *,
        sub_buckets: int = 64,
        max_bytes: int = 0,
        max_items: int = 0,
        tombstone_ttl_ms: int = 3_600_000,
        evicted_history: int = 1024,
    ) -> None: ...
    def apply(
        self,
        key: _Bytes,
        value: _Bytes,
        ts: int,
        origin: int,
        expire_at_ms: int,
        tombstone: bool,
        now_ms: int,
    ) -> bool:
        """Apply one write (or, with ``tombstone=True``, one delete).

        :param value: the value; ignored (stored as ``b""``) for a tombstone.
        :param expire_at_ms: absolute expiry in wall-clock ms, 0 for none. For a
            tombstone, 0 means ``(ts >> 16) + tombstone_ttl_ms``.
        :returns: True when the write's version was newer than what the store held
            (it then replaced it, even if the write was already expired or was
            evicted at once by the budget); False when it was equal or older, or not
            newer than a remembered evicted version (nothing changed).
        :raises ValueError: ``expire_at_ms`` is negative or the entry exceeds 4 GiB.
        """

    def get(self, key: _Bytes, now_ms: int) -> _EntryView | None:
        """The held entry, tombstones included (callers need the versions of deletes);
        None when absent or expired (an expired entry is reclaimed). A hit on a data
        entry counts as a use for eviction."""

    def peek(self, key: _Bytes, now_ms: int) -> _EntryView | None:
        """Like :meth:`get` but not counted as a use (for repair and anti-entropy)."""

    def evict(self, key: _Bytes) -> bool:
        """Evict one data entry now, as the budget would (counted and remembered).
        False when the key is absent or a tombstone."""

    def recently_evicted(self, key: _Bytes) -> tuple[int, int] | None:
        """``(ts, origin)`` of the key's last evicted version, while remembered."""

    def sweep(self, now_ms: int, budget: int = 0) -> tuple[int, int]:
        """Reclaim entries expired at ``now_ms``, earliest expiry first, at most
        ``budget`` of them (0: all). Costs O(reclaimed * log n), not O(size).

        :returns: ``(expired_entries, purged_tombstones)``.
        """

    def next_expiry(self) -> int:
        """Earliest ``expire_at`` among held entries, 0 when nothing expires."""

    def partition_of(self, key: _Bytes) -> int:
        """Partition of ``key``, the same as ``Ring.partition_of``."""

    def bucket_of(self, key: _Bytes) -> tuple[int, int]:
        """``(partition, sub_bucket)`` of ``key``."""

    def digest(self, p: int) -> int:
        """Digest of partition ``p``: wrapping sum of its sub-bucket digests.

        :raises IndexError: ``p`` is not a partition number.
        """

    def sub_digests(self, p: int) -> list[int]:
        """The ``sub_buckets`` digests of partition ``p``."""

    def sub_bucket_keys(self, p: int, b: int) -> list[tuple[_Bytes, int, int]]:
        """``(key, ts, origin)`` of every entry held in sub-bucket ``b`` of ``p``
        (tombstones included; unordered)."""

    def keys(self, p: int) -> list[tuple[_Bytes, int, int]]:
        """``(key, ts, origin)`` of every entry held in partition ``p``
        (tombstones included; unordered)."""

    def entries(self, p: int) -> list[tuple[_Bytes, _Bytes, int, int, int, bool]]:
        """``(key, value, ts, origin, expire_at, tombstone)`` of every entry held in
        partition ``p``, for migration (unordered)."""

    def stream(
        self, p: int, cursor: int | None, max_keys: int, max_bytes: int, now_ms: int
    ) -> tuple[list[tuple[_Bytes, _Bytes, int, int, int, bool]], int | None]:
        """One batch of partition ``p``'s unexpired entries (tombstones included), for
        streaming it to another node: ``(entries, next_cursor)``, each entry
        ``(key, value, ts, origin, expire_at, tombstone)``.

        Entries come in the order of their key's ``xxh3_64`` hash; ``cursor`` is the
        hash to start from (``None``: the partition's start) and ``next_cursor`` the
        hash of the first entry left out (``None``: the partition is done). A batch
        stops before ``max_keys`` entries or ``max_bytes`` bytes (key + value +
        :data:`STREAM_ENTRY_OVERHEAD` each) would be exceeded, but always holds at
        least one entry when any is left, and never splits entries of equal hash.
        The cursor is a place in the hash space, so it stays valid whatever changes
        between batches, and means the same on every replica of ``p``. Nothing is
        reclaimed or counted as a use. Costs O(batch + the sub-buckets it walks).

        :raises IndexError: ``p`` is not a partition number.
        :raises ValueError: ``cursor`` is not in ``p``'s hash range, or a cap is below 1.
        """

    def partition_len(self, p: int) -> int:
        """Entries (data and tombstones) held in partition ``p``."""

    def recompute_digest(self, p: int) -> int:
        """Partition ``p``'s digest computed from scratch (every key re-hashed); for
        tests of the incremental value. O(size of the store)."""

    def drop_partition(self, p: int) -> int:
        """Remove every entry of partition ``p`` (the node no longer owns it);
        uncounted, unremembered: its digests go to 0 and the byte budget, the item
        count and the expiry queues lose its entries. Returns how many were removed."""

    def clear(self) -> None:
        """Remove every entry and forget evicted keys; counters are kept."""

    def stats(self) -> dict[str, int]:
        """Counters: ``entries``, ``tombstones``, ``bytes``, ``max_bytes``,
        ``evictions``, ``expirations``, ``tombstones_purged``, ``evicted_history``."""

    def __len__(self) -> int:
        """Data entries held (tombstones excluded)."""

    def __contains__(self, key: object) -> bool:
        """Whether an entry (data or tombstone, even expired) is held for ``key``."""
