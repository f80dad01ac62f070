"""Merkle digests and rows: the codecs of anti-entropy, and the answers a node gives.

What two replicas exchange to find what differs between them, without the data
(``docs/cluster.md`` lists the payloads). The asking side is the loop in
:mod:`hypercache.cluster.antientropy`; the answering side is
:meth:`hypercache.cluster.replica.Replica`, which calls :func:`answer_merkle`,
:func:`answer_keys` and :func:`answer_pull`. One peer sync is:

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

"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, Final, TypeAlias

from xxhash import xxh3_64_intdigest

from hypercache._core.vstore import VersionedStore, entry_hash
from hypercache.errors import ProtocolError
from hypercache.net.protocol import Limits
from hypercache.replication import Entry

__all__ = [
    "BATCH_BYTES",
    "BATCH_KEYS",
    "BLOCK",
    "GROUP",
    "KEYS_BYTES",
    "MASK32",
    "SMALL_PARTITION",
    "SUB_BATCH",
    "SWEEP_BUDGET",
    "KeyRow",
    "answer_keys",
    "answer_merkle",
    "answer_pull",
    "bits",
    "block_digests",
    "bucket_terms",
    "check_list",
    "check_pair",
    "group_digest",
    "list_keys",
    "parse_key_row",
]

#: A parsed ``key_row``: ``(key, ts, origin, expire_at_ms, tombstone)``, the
#: version fields in the order of an :data:`~hypercache.replication.Entry`.
KeyRow: TypeAlias = tuple[bytes, int, int, int, bool]

#: Partitions per group digest (the width of the mask).
GROUP: Final = 16
#: A differing partition with at most this many entries on both sides is listed
#: whole (~25 bytes a key) instead of through its sub-bucket digests (~9 bytes each).
SMALL_PARTITION: Final = 16
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
#: The low 32 bits that block and sub-digests keep.
MASK32: Final = 0xFFFFFFFF


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


def block_digests(subs: list[int]) -> bytes:
    """The block digests of a partition's sub-digests (blocks of :data:`BLOCK`, or
    of all of them when fewer): wrapping sums, low 32 bits, packed as little-endian
    uint32."""
    width = min(BLOCK, len(subs))
    return struct.pack(
        f"<{len(subs) // width}I",
        *(sum(subs[i : i + width]) & MASK32 for i in range(0, len(subs), width)),
    )


def _pack_subs(subs: list[int], mask: int) -> bytes:
    width = min(BLOCK, len(subs))
    picked = [subs[b] & MASK32 for i in bits(mask) for b in range(i * width, (i + 1) * width)]
    return struct.pack(f"<{len(picked)}I", *picked)


def bits(mask: int) -> Iterator[int]:
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
    store: VersionedStore, p: int, b: int, now_ms: int
) -> list[tuple[int, bytes, Entry]]:
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


# ------------------------------------------------------------------- answering side


def answer_merkle(store: VersionedStore, payload: Any, now_ms: int) -> list[Any]:
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
        store.sweep(now_ms, SWEEP_BUDGET)
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
                    rows.extend(_bucket_entries(store, p, b, now_ms))
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


def _bucket_entries(store: VersionedStore, p: int, b: int, now_ms: int) -> Iterator[list[Any]]:
    for key, _ts, _origin in store.sub_bucket_keys(p, b):
        got = store.peek(key, now_ms)  # reclaims an expired entry
        if got is not None:
            _value, ts, origin, expire_at, tomb = got
            yield _row(key, ts, origin, tomb, expire_at)


def answer_keys(store: VersionedStore, payload: Any, now_ms: int) -> list[Any]:
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
        for term, key, (_value, ts, origin, expire_at, tomb) in bucket_terms(store, p, b, now_ms):
            if theirs.pop(term, None) is None:
                rows.append(_row(key, ts, origin, tomb, expire_at))
        out.append([rows, sorted(theirs.values())])
    return out


def answer_pull(store: VersionedStore, limits: Limits, payload: Any, now_ms: int) -> list[Any]:
    """``PULL [key, ...]``: the held unexpired entries, in request order, cut short
    once the answer exceeds :data:`BATCH_BYTES` (the caller asks again later)."""
    if type(payload) is not list:
        raise ProtocolError("PULL payload must be [key, ...]")
    if len(payload) > BATCH_KEYS:
        raise ProtocolError(f"PULL asks for {len(payload)} keys, at most {BATCH_KEYS}")
    budget = min(BATCH_BYTES, limits.max_frame // 2)
    out: list[Any] = []
    size = 0
    for key in payload:
        got = store.peek(limits.check_key(key), now_ms)
        if got is None:
            continue
        value, ts, origin, expire_at, tomb = got
        size += len(key) + len(value) + 32
        if out and size > budget:
            break
        out.append([key, value, ts, origin, expire_at, tomb])
    return out


def list_keys(
    store: VersionedStore, p: int, cursor: bytes | None, limit: int, now_ms: int
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


def check_list(value: Any, what: str) -> list[Any]:
    if type(value) is not list:
        raise ProtocolError(f"{what} must be a list")
    return value


def parse_key_row(row: Any) -> KeyRow:
    """``(key, ts, origin, expire_at, tombstone)`` of a ``key_row`` (on the wire the
    last two come the other way round, and only when not ``(False, 0)``).

    :raises ProtocolError: not a key row.
    """
    if (
        type(row) is not list
        or len(row) not in (3, 5)
        or type(row[0]) is not bytes
        or type(row[1]) is not int
        or type(row[2]) is not int
    ):
        raise ProtocolError("malformed key row")
    if len(row) == 3:
        return row[0], row[1], row[2], 0, False
    if type(row[3]) is not bool or type(row[4]) is not int:
        raise ProtocolError("malformed key row")
    return row[0], row[1], row[2], row[4], row[3]


def check_pair(value: Any, what: str) -> tuple[int, Any]:
    if type(value) is not list or len(value) != 2 or type(value[0]) is not int:
        raise ProtocolError(f"{what} must be [int, ...]")
    return value[0], value[1]
