"""VersionedStore: LWW order, tombstones, expiry, digests, budget, sweep, partitions.

The stateful tests drive the store and a plain Python model of it with the same
operations and compare everything observable after each step, digests included
(the model computes the digest terms with its own copy of the documented hash).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pytest
import xxhash
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hypercache._core.hlc import make_ts
from hypercache._core.ring import Ring
from hypercache._core.vstore import (
    ENTRY_OVERHEAD,
    STREAM_ENTRY_OVERHEAD,
    VersionedStore,
    entry_hash,
)
from hypercache.errors import ConfigError

MASK = 2**64 - 1


def fmix64(x: int) -> int:
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & MASK
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & MASK
    x ^= x >> 33
    return x


def model_term(key: bytes, ts: int, origin: int, tomb: bool) -> int:
    h = fmix64(xxhash.xxh3_64_intdigest(key) ^ 0x9E3779B97F4A7C15)
    h = fmix64(h ^ ts)
    return fmix64(h ^ ((origin << 1) | int(tomb)))


def ts(ms: int, logical: int = 0) -> int:
    return make_ts(ms, logical)


# -- digest term --------------------------------------------------------------------


def test_entry_hash_matches_the_documented_formula() -> None:
    for key, t, o, tomb in [
        (b"", 0, 0, False),
        (b"k", ts(5, 1), 7, True),
        (b"x" * 99, 2**62, 2**32 - 1, False),
    ]:
        assert entry_hash(xxhash.xxh3_64_intdigest(key), t, o, tomb) == model_term(key, t, o, tomb)
    # pinned: the term is part of the replica protocol
    assert entry_hash(0, 0, 0, False) == 0x365AFC61535B3920
    assert entry_hash(0x0123456789ABCDEF, 1 << 40, 7, True) == 0x0F673D797A1400F6
    assert entry_hash(1, 2, 3, True) != entry_hash(1, 2, 3, False)
    assert entry_hash(1, 2, 3, False) != entry_hash(1, 3, 2, False)


# -- last writer wins ------------------------------------------------------------------


def test_newer_wins_older_and_equal_are_no_ops() -> None:
    s = VersionedStore(16)
    assert s.apply(b"k", b"v1", ts(100), 1, 0, False, 0)
    assert not s.apply(b"k", b"old", ts(99), 9, 0, False, 0)
    assert not s.apply(b"k", b"same", ts(100), 1, 0, False, 0)  # replay: no-op
    assert s.get(b"k", 0) == (b"v1", ts(100), 1, 0, False)
    assert s.apply(b"k", b"v2", ts(100), 2, 0, False, 0)  # same ts, higher origin
    assert not s.apply(b"k", b"v0", ts(100), 0, 0, False, 0)
    assert s.apply(b"k", b"v3", ts(100, 1), 0, 0, False, 0)  # logical counter counts
    assert s.get(b"k", 0) == (b"v3", ts(100, 1), 0, 0, False)
    assert len(s) == 1
    assert s.bytes == 1 + 2 + ENTRY_OVERHEAD


def test_tombstones_beat_older_writes_and_lose_to_newer() -> None:
    s = VersionedStore(16, tombstone_ttl_ms=1000)
    s.apply(b"k", b"v", ts(100), 1, 0, False, 100)
    assert s.apply(b"k", b"ignored", ts(200), 1, 0, True, 200)
    assert s.get(b"k", 200) == (b"", ts(200), 1, 1200, True)  # expire = delete ms + ttl
    assert len(s) == 0
    assert s.tombstones == 1
    assert s.bytes == 1 + ENTRY_OVERHEAD
    assert not s.apply(b"k", b"late", ts(150), 5, 0, False, 300)  # older write stays deleted
    assert not s.apply(b"k", b"", ts(200), 1, 0, True, 300)  # replayed delete
    assert s.apply(b"k", b"back", ts(300), 1, 0, False, 300)  # newer write wins
    assert s.get(b"k", 300) == (b"back", ts(300), 1, 0, False)
    assert s.tombstones == 0
    assert len(s) == 1
    # a delete for a key never seen is kept too, to beat older writes still in flight
    assert s.apply(b"new", b"", ts(400), 1, 0, True, 400)
    assert not s.apply(b"new", b"v", ts(399), 1, 0, False, 401)
    assert s.get(b"new", 401) == (b"", ts(400), 1, 1400, True)


def test_data_expiry_is_absence_and_reclaims() -> None:
    s = VersionedStore(16)
    s.apply(b"k", b"v", ts(10), 1, 500, False, 10)
    p = s.partition_of(b"k")
    assert s.get(b"k", 499) is not None
    assert s.digest(p) != 0
    assert s.get(b"k", 500) is None  # expire_at is exclusive
    assert len(s) == 0
    assert s.expirations == 1
    assert s.digest(p) == 0
    assert s.bytes == 0
    assert s.next_expiry() == 0
    # an expired holder does not block an older write: expiry is not a delete
    assert s.apply(b"k", b"older", ts(5), 1, 0, False, 600)
    assert s.get(b"k", 600) == (b"older", ts(5), 1, 0, False)


def test_write_that_arrives_expired_supersedes_then_vanishes() -> None:
    s = VersionedStore(16)
    s.apply(b"k", b"v1", ts(10), 1, 0, False, 10)
    assert s.apply(b"k", b"v2", ts(20), 1, 100, False, 150)
    assert s.get(b"k", 150) is None
    assert s.expirations == 1
    assert s.apply(b"t", b"", ts(1), 1, 0, True, 10_000_000)  # tombstone long past its ttl
    assert s.get(b"t", 10_000_000) is None
    assert s.tombstones_purged == 1
    # nothing is left to order against: an older write is stored (expiry is not a delete)
    assert s.apply(b"k", b"v0", ts(5), 1, 0, False, 150)


# -- sweep -----------------------------------------------------------------------------


def test_sweep_reclaims_in_expiry_order_with_budget() -> None:
    s = VersionedStore(64, tombstone_ttl_ms=100)
    for i in range(10):
        s.apply(b"d%d" % i, b"v", ts(1), 1, 1000 + i, False, 0)
    for i in range(5):
        s.apply(b"t%d" % i, b"", ts(2000 + i), 1, 0, True, 0)  # expire 2100 + i
    s.apply(b"forever", b"v", ts(1), 1, 0, False, 0)
    assert s.next_expiry() == 1000
    assert s.sweep(999) == (0, 0)
    assert s.sweep(1004, budget=3) == (3, 0)
    assert s.get(b"d2", 0) is None and s.get(b"d3", 0) is not None
    assert s.sweep(1004) == (2, 0)
    assert s.sweep(2102) == (5, 3)
    assert s.sweep(10**9) == (0, 2)
    assert (len(s), s.tombstones) == (1, 0)
    assert (s.expirations, s.tombstones_purged) == (10, 5)
    assert s.next_expiry() == 0


def test_sweep_budget_takes_the_earliest_of_both_queues() -> None:
    s = VersionedStore(16, tombstone_ttl_ms=50)
    s.apply(b"late", b"v", ts(1), 1, 100, False, 0)  # heap, expires 100
    s.apply(b"tomb", b"", ts(0), 1, 0, True, 0)  # FIFO, expires 50
    s.apply(b"early", b"v", ts(1), 1, 40, False, 0)  # heap, expires 40
    assert s.sweep(1000, budget=1) == (1, 0)
    assert s.peek(b"early", 0) is None and s.peek(b"tomb", 0) is not None
    assert s.sweep(1000, budget=1) == (0, 1)
    assert s.sweep(1000, budget=1) == (1, 0)


def test_out_of_order_tombstones_still_purge_on_time() -> None:
    # A late old delete (hint replay) expires before the FIFO's tail: it must not
    # wait behind the newer tombstones.
    s = VersionedStore(64, tombstone_ttl_ms=100)
    s.apply(b"new", b"", ts(5000), 1, 0, True, 5000)  # expires 5100
    s.apply(b"old", b"", ts(1000), 1, 0, True, 1050)  # expires 1100, arrives later
    s.apply(b"mid", b"", ts(3000), 1, 0, True, 1060)  # expires 3100
    assert s.next_expiry() == 1100
    assert s.sweep(1100) == (0, 1)
    assert s.get(b"old", 1100) is None
    assert s.sweep(3100) == (0, 1)
    assert s.sweep(5100) == (0, 1)
    assert s.tombstones == 0


def test_sweep_cost_does_not_grow_with_store_size() -> None:
    small = VersionedStore(4096)
    big = VersionedStore(4096)
    for i in range(100):
        small.apply(b"k%d" % i, b"v", ts(1), 1, 10**9, False, 0)
    for i in range(200_000):
        big.apply(b"k%d" % i, b"v", ts(1), 1, 10**9 + i, False, 0)

    def cost(store: VersionedStore) -> float:
        t0 = time.perf_counter()
        for now in range(2000):
            store.sweep(now)
        return time.perf_counter() - t0

    cost(small)
    # O(size) would be ~2000 x 200k entry visits: seconds; O(expired) is microseconds.
    assert cost(big) < max(0.05, 20 * cost(small))
    assert big.sweep(10**9 + 10) == (11, 0)
    assert len(big) == 200_000 - 11


# -- byte budget -------------------------------------------------------------------------


def test_budget_evicts_least_recently_used_data() -> None:
    per = 1 + 10 + ENTRY_OVERHEAD
    s = VersionedStore(16, max_bytes=3 * per)
    for k in (b"a", b"b", b"c"):
        s.apply(k, b"x" * 10, ts(1), 1, 0, False, 0)
    assert s.bytes == 3 * per
    s.get(b"a", 0)  # a is now the most recent
    s.apply(b"d", b"x" * 10, ts(2), 1, 0, False, 0)
    assert s.get(b"b", 0) is None
    assert s.get(b"a", 0) is not None
    assert s.evictions == 1
    assert s.recently_evicted(b"b") == (ts(1), 1)
    assert s.recently_evicted(b"a") is None
    # repair may not pull the evicted version back, nor an older one; newer is fine
    assert not s.apply(b"b", b"x" * 10, ts(1), 1, 0, False, 0)
    assert not s.apply(b"b", b"x" * 10, ts(0, 5), 1, 0, False, 0)
    assert s.apply(b"b", b"y" * 10, ts(3), 1, 0, False, 0)
    assert s.bytes <= s.max_bytes


def test_item_bound_evicts_least_recently_used_data_not_tombstones() -> None:
    s = VersionedStore(16, max_items=3)
    for k in (b"a", b"b", b"c"):
        s.apply(k, b"v", ts(1), 1, 0, False, 0)
    s.get(b"a", 0)  # a is now the most recent
    s.apply(b"d", b"v", ts(2), 1, 0, False, 0)
    assert len(s) == 3 and s.evictions == 1
    assert s.get(b"b", 0) is None and s.get(b"a", 0) is not None
    # Tombstones are not data entries: they neither count nor get evicted.
    for k in (b"t1", b"t2", b"t3"):
        s.apply(k, b"", ts(3), 1, 0, True, 0)
    assert len(s) == 3 and s.tombstones == 3 and s.evictions == 1
    assert s.stats()["max_items"] == 3
    with pytest.raises(ConfigError) as info:
        VersionedStore(16, max_items=-1)
    assert info.value.field == "max_items"


def test_overwrite_and_read_refresh_recency_but_peek_does_not() -> None:
    per = 1 + ENTRY_OVERHEAD
    s = VersionedStore(16, max_bytes=3 * per)
    for k in (b"a", b"b", b"c"):
        s.apply(k, b"", ts(1), 1, 0, False, 0)
    s.apply(b"a", b"", ts(2), 1, 0, False, 0)  # overwrite: a is the most recent
    s.peek(b"b", 0)  # repair/anti-entropy reads do not count
    s.apply(b"d", b"", ts(2), 1, 0, False, 0)
    assert s.get(b"b", 0) is None
    assert s.get(b"a", 0) is not None
    s.apply(b"e", b"", ts(2), 1, 0, False, 0)
    assert s.get(b"c", 0) is None
    assert s.evictions == 2


def test_budget_never_evicts_live_tombstones() -> None:
    per_tomb = 2 + ENTRY_OVERHEAD
    s = VersionedStore(16, max_bytes=3 * per_tomb, tombstone_ttl_ms=1000)
    for i in range(4):
        s.apply(b"t%d" % i, b"", ts(100), 1, 0, True, 100)
    assert s.tombstones == 4  # over budget, but a tombstone is never evicted
    assert s.bytes > s.max_bytes
    assert s.apply(b"d", b"v", ts(100), 1, 0, False, 100)  # accepted, evicted at once
    assert len(s) == 0
    assert s.evictions == 1
    assert s.recently_evicted(b"d") == (ts(100), 1)
    s.sweep(1100)
    assert s.tombstones == 0 and s.bytes == 0


def test_entry_larger_than_budget_is_evicted_not_kept() -> None:
    s = VersionedStore(16, max_bytes=1000)
    s.apply(b"k", b"small", ts(1), 1, 0, False, 0)
    assert s.apply(b"k", b"x" * 2000, ts(2), 1, 0, False, 0)
    assert s.get(b"k", 0) is None
    assert s.bytes == 0
    assert s.recently_evicted(b"k") == (ts(2), 1)


def test_evicted_history_is_bounded() -> None:
    s = VersionedStore(16, max_bytes=1, evicted_history=4)
    for i in range(10):
        s.apply(b"k%d" % i, b"v", ts(i + 1), 1, 0, False, 0)
    assert s.evictions == 10
    remembered = [i for i in range(10) if s.recently_evicted(b"k%d" % i) is not None]
    assert remembered == [6, 7, 8, 9]
    assert s.stats()["evicted_history"] == 4
    assert s.evict(b"k9") is False  # not held


def test_evict_one_key() -> None:
    s = VersionedStore(16)
    s.apply(b"k", b"v", ts(1), 1, 0, False, 0)
    s.apply(b"t", b"", ts(1), 1, 0, True, 0)
    assert s.evict(b"k")
    assert not s.evict(b"t")  # tombstones are not evictable
    assert not s.evict(b"zz")
    assert s.evictions == 1
    assert s.recently_evicted(b"k") == (ts(1), 1)


# -- partitions and digests -----------------------------------------------------------------


def test_partitions_agree_with_ring_and_enumerate() -> None:
    ring = Ring(["a", "b", "c"], partitions=256)
    s = VersionedStore(256, sub_buckets=8)
    keys = [b"key-%d" % i for i in range(3000)]
    for i, k in enumerate(keys):
        s.apply(k, b"v", ts(1), 1, 0, i % 7 == 0, 0)
    by_part: dict[int, set[bytes]] = {}
    for k in keys:
        p = s.partition_of(k)
        assert p == ring.partition_of(k)
        assert s.bucket_of(k) == (p, (xxhash.xxh3_64_intdigest(k) >> (64 - 8 - 3)) & 7)
        by_part.setdefault(p, set()).add(k)
    for p in range(256):
        listed = {k for k, _, _ in s.keys(p)}
        assert listed == by_part.get(p, set())
        assert s.partition_len(p) == len(listed)
        union = set()
        for b in range(8):
            sub = {k for k, _, _ in s.sub_bucket_keys(p, b)}
            assert all(s.bucket_of(k) == (p, b) for k in sub)
            union |= sub
        assert union == listed
        assert {e[0] for e in s.entries(p)} == listed
        assert s.digest(p) == s.recompute_digest(p) == sum(s.sub_digests(p)) & MASK


def test_digest_tracks_every_change_incrementally() -> None:
    s = VersionedStore(1, sub_buckets=1)
    assert s.digest(0) == 0
    s.apply(b"k", b"v", ts(1), 1, 0, False, 0)
    assert s.digest(0) == model_term(b"k", ts(1), 1, False)
    s.apply(b"k", b"w", ts(2), 3, 0, False, 0)
    assert s.digest(0) == model_term(b"k", ts(2), 3, False)  # value is not in the term
    s.apply(b"k", b"", ts(3), 3, 0, True, 0)
    s.apply(b"j", b"v", ts(3), 3, 0, False, 0)
    both = model_term(b"k", ts(3), 3, True) + model_term(b"j", ts(3), 3, False)
    assert s.digest(0) == both & MASK
    # two replicas that applied the same writes in different orders agree
    r = VersionedStore(1, sub_buckets=1)
    r.apply(b"j", b"v", ts(3), 3, 0, False, 0)
    r.apply(b"k", b"", ts(3), 3, 0, True, 0)
    r.apply(b"k", b"v", ts(1), 1, 0, False, 0)
    assert r.digest(0) == s.digest(0)


def test_drop_partition_and_clear() -> None:
    s = VersionedStore(8, max_bytes=10**6)
    for i in range(200):
        s.apply(b"k%d" % i, b"v", ts(1), 1, 0, i % 5 == 0, 0)
    p = s.partition_of(b"k0")
    n = s.partition_len(p)
    assert s.drop_partition(p) == n > 0
    assert s.keys(p) == [] and s.digest(p) == 0
    assert s.evictions == 0
    s.evict(b"k1" if s.partition_of(b"k1") != p else b"k2")
    s.clear()
    assert (len(s), s.tombstones, s.bytes) == (0, 0, 0)
    assert all(s.digest(q) == 0 for q in range(8))
    assert s.stats()["evicted_history"] == 0
    s.apply(b"k1", b"v", ts(1), 1, 0, False, 0)
    assert len(s) == 1


def test_drop_partition_keeps_digests_budget_and_queues_consistent() -> None:
    s = VersionedStore(16, sub_buckets=4)
    for i in range(500):
        # data, data with a TTL, tombstones: every queue and counter takes part
        s.apply(b"k%d" % i, b"v" * (i % 9), ts(10), 1, 50_000 if i % 3 == 0 else 0, i % 7 == 0, 0)
    p = s.partition_of(b"k3")
    kept = {q: s.digest(q) for q in range(16) if q != p}
    held = [(k, v) for k, v, *_ in s.entries(p)]
    before = (len(s), s.tombstones, s.bytes)
    s.drop_partition(p)
    gone_live = sum(1 for k, _ in held if s.peek(k, 0) is None)
    assert gone_live == len(held)
    assert s.digest(p) == s.recompute_digest(p) == 0 and s.sub_digests(p) == [0] * 4
    assert {q: s.digest(q) for q in range(16) if q != p} == kept
    tombs = sum(1 for k, v in held if int(k[1:]) % 7 == 0)
    assert s.tombstones == before[1] - tombs
    assert len(s) == before[0] - (len(held) - tombs)
    assert s.bytes == before[2] - sum(len(k) + len(v) + ENTRY_OVERHEAD for k, v in held)
    assert (s.evictions, s.expirations, s.tombstones_purged) == (0, 0, 0)
    # the expiry queues lost the dropped entries: a sweep reclaims only the others
    expired, purged = s.sweep(10**15)
    others = [i for i in range(500) if s.partition_of(b"k%d" % i) != p]
    assert expired + purged == sum(1 for i in others if i % 3 == 0 or i % 7 == 0)
    # the partition takes writes again, with a fresh digest
    s.apply(b"k3", b"x", ts(20), 1, 0, False, 10**15)
    assert s.digest(p) == s.recompute_digest(p) == model_term(b"k3", ts(20), 1, False)


# -- streaming a partition ------------------------------------------------------------------


def _stream_all(
    s: VersionedStore, p: int, max_keys: int, max_bytes: int, now: int = 0
) -> tuple[list[tuple[bytes, bytes, int, int, int, bool]], int]:
    out: list[tuple[bytes, bytes, int, int, int, bool]] = []
    cursor = None
    batches = 0
    while True:
        batch, cursor = s.stream(p, cursor, max_keys, max_bytes, now)
        batches += 1
        assert len(batch) <= max_keys
        out += batch
        if cursor is None:
            return out, batches
        assert batch, "a batch that is not the last holds something"


@pytest.mark.parametrize("max_keys,max_bytes", [(1, 10**6), (7, 10**6), (10**6, 300), (5, 1)])
def test_stream_lists_every_entry_once_in_hash_order(max_keys: int, max_bytes: int) -> None:
    s = VersionedStore(8, sub_buckets=16)
    for i in range(2000):
        s.apply(b"k%d" % i, b"v%d" % i, ts(i + 1), i % 5, 0, i % 11 == 0, 0)
    for p in range(8):
        got, batches = _stream_all(s, p, max_keys, max_bytes)
        assert sorted(got) == sorted(s.entries(p))
        hashes = [xxhash.xxh3_64_intdigest(e[0]) for e in got]
        assert hashes == sorted(hashes)
        assert all(s.partition_of(e[0]) == p for e in got)
        if max_keys == 1:
            assert batches >= len(got)


def test_stream_batches_respect_the_byte_cap() -> None:
    s = VersionedStore(1, sub_buckets=8)
    for i in range(300):
        s.apply(b"k%d" % i, b"x" * 100, ts(1), 1, 0, False, 0)
    cursor = None
    while True:
        batch, cursor = s.stream(0, cursor, 1000, 1000, 0)
        size = sum(len(k) + len(v) + STREAM_ENTRY_OVERHEAD for k, v, *_ in batch)
        assert size <= 1000 or len(batch) == 1
        if cursor is None:
            break
    # one entry larger than the cap still goes, alone
    big = VersionedStore(1)
    big.apply(b"a", b"y" * 5000, ts(1), 1, 0, False, 0)
    big.apply(b"b", b"y" * 5000, ts(1), 1, 0, False, 0)
    first, cursor = big.stream(0, None, 10, 100, 0)
    assert len(first) == 1 and cursor is not None
    second, cursor = big.stream(0, cursor, 10, 100, 0)
    assert len(second) == 1 and cursor is None


def test_stream_carries_versions_expiry_tombstones_and_skips_the_expired() -> None:
    s = VersionedStore(1)
    s.apply(b"live", b"v", ts(5, 2), 7, 0, False, 0)
    s.apply(b"ttl", b"t", ts(6), 8, 9_000, False, 0)
    s.apply(b"gone", b"g", ts(6), 8, 2_000, False, 0)
    s.apply(b"tomb", b"", ts(7), 9, 0, True, 0)
    got = {e[0]: e for e in s.stream(0, None, 100, 10**6, 5_000)[0]}
    assert got[b"live"] == (b"live", b"v", ts(5, 2), 7, 0, False)
    assert got[b"ttl"] == (b"ttl", b"t", ts(6), 8, 9_000, False)
    tomb = got[b"tomb"]
    assert tomb[1:4] == (b"", ts(7), 9) and tomb[5] is True and tomb[4] > 0
    assert b"gone" not in got  # expired at 2_000: absent
    assert b"gone" in s  # and not reclaimed by the listing


def test_stream_cursor_survives_changes_between_batches() -> None:
    s = VersionedStore(4, sub_buckets=8)
    keys = [b"k%d" % i for i in range(1000)]
    for k in keys:
        s.apply(k, b"v", ts(1), 1, 0, False, 0)
    p = s.partition_of(keys[0])
    mine = sorted((k for k in keys if s.partition_of(k) == p), key=xxhash.xxh3_64_intdigest)
    first, cursor = s.stream(p, None, 20, 10**6, 0)
    assert cursor is not None
    first_cursor = cursor
    seen = {e[0] for e in first}
    # remove entries behind and ahead of the cursor, add new ones: nothing ahead that
    # stays is skipped, nothing is sent twice
    ahead = [k for k in mine if xxhash.xxh3_64_intdigest(k) >= cursor]
    removed = set(ahead[:5])
    for k in removed:
        s.apply(k, b"", ts(2), 1, 1, False, 2)  # dead on arrival: removes the entry
    s.drop_partition(p ^ 1)  # another partition
    for i in range(1000, 1300):
        s.apply(b"k%d" % i, b"n", ts(3), 1, 0, False, 2)
    rest = []
    while cursor is not None:
        batch, cursor = s.stream(p, cursor, 20, 10**6, 2)
        rest += [e[0] for e in batch]
    assert len(rest) == len(set(rest)) and not seen & set(rest)
    # everything held now at or after the first cursor came, nothing before it
    held_ahead = {k for k, _, _ in s.keys(p) if xxhash.xxh3_64_intdigest(k) >= first_cursor}
    assert set(rest) == held_ahead
    assert set(ahead) - removed <= set(rest)


def test_stream_any_replica_resumes_a_cursor() -> None:
    a, b = VersionedStore(2, sub_buckets=4), VersionedStore(2, sub_buckets=4)
    for i in range(400):
        for s in (a, b):
            s.apply(b"k%d" % i, b"v", ts(1), 1, 0, False, 0)
    got, cursor = a.stream(1, None, 30, 10**6, 0)
    while cursor is not None:
        batch, cursor = b.stream(1, cursor, 30, 10**6, 0)
        got += batch
    assert sorted(got) == sorted(a.entries(1))


def test_stream_checks_its_arguments() -> None:
    s = VersionedStore(4)
    s.apply(b"k", b"v", ts(1), 1, 0, False, 0)
    p = s.partition_of(b"k")
    with pytest.raises(IndexError):
        s.stream(4, None, 1, 1, 0)
    with pytest.raises(ValueError, match="outside partition"):
        s.stream(p, ((p + 1) % 4) << 62, 1, 1, 0)
    bad: Any
    for bad in (-1, 2**64, True, 1.5, "0"):
        with pytest.raises(ValueError):
            s.stream(p, bad, 1, 1, 0)
    with pytest.raises(ValueError):
        s.stream(p, None, 0, 1, 0)
    with pytest.raises(ValueError):
        s.stream(p, None, 1, 0, 0)
    assert s.stream(p, p << 62, 1, 1, 0)[0][0][0] == b"k"
    one = VersionedStore(1, sub_buckets=1)  # no shift by 64 anywhere
    one.apply(b"k", b"v", ts(1), 1, 0, False, 0)
    assert one.stream(0, None, 1, 1, 0) == ([(b"k", b"v", ts(1), 1, 0, False)], None)
    assert one.stream(0, 2**64 - 1, 1, 1, 0)[1] is None


def test_bad_arguments_name_the_field() -> None:
    cases = [
        ((1000,), {}, "partitions"),
        ((0,), {}, "partitions"),
        ((2**21,), {}, "partitions"),
        ((16,), {"sub_buckets": 3}, "sub_buckets"),
        ((2**20,), {"sub_buckets": 2**16}, "sub_buckets"),
        ((16,), {"max_bytes": -1}, "max_bytes"),
        ((16,), {"tombstone_ttl_ms": 0}, "tombstone_ttl_ms"),
        ((16,), {"evicted_history": -1}, "evicted_history"),
    ]
    for args, kwargs, field in cases:
        with pytest.raises(ConfigError) as info:
            VersionedStore(*args, **kwargs)
        assert info.value.field == field
    s = VersionedStore(16)
    with pytest.raises(ValueError):
        s.apply(b"k", b"v", 1, 1, -5, False, 0)
    with pytest.raises(TypeError):
        s.apply("k", b"v", 1, 1, 0, False, 0)  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        s.digest(16)
    with pytest.raises(IndexError):
        s.sub_bucket_keys(0, 64)


# -- model-based -------------------------------------------------------------------------


@dataclass
class Held:
    value: bytes
    ts: int
    origin: int
    expire: int
    tomb: bool


KEYS = [b"a", b"bb", b"ccc", b"dddd", b"e" * 9, b"f" * 20]
PARTS = 4
SUBS = 4
TTL = 40


class StoreModel(RuleBasedStateMachine):
    max_bytes = 0

    def __init__(self) -> None:
        super().__init__()
        self.store = VersionedStore(
            PARTS, sub_buckets=SUBS, max_bytes=self.max_bytes, tombstone_ttl_ms=TTL
        )
        self.held: dict[bytes, Held] = {}
        self.lru: OrderedDict[bytes, None] = OrderedDict()  # last = most recent
        self.evicted: dict[bytes, tuple[int, int, int]] = {}
        self.now = 0
        self.expirations = 0
        self.purged = 0
        self.evictions = 0

    # -- model helpers
    def expired(self, h: Held) -> bool:
        return h.expire != 0 and h.expire <= self.now

    def remove(self, key: bytes, how: str) -> None:
        h = self.held.pop(key)
        self.lru.pop(key, None)
        if how == "expired":
            if h.tomb:
                self.purged += 1
            else:
                self.expirations += 1
        elif how == "evicted":
            self.evictions += 1
            self.evicted[key] = (h.ts, h.origin, h.expire)

    def find(self, key: bytes) -> Held | None:
        h = self.held.get(key)
        if h is not None and self.expired(h):
            self.remove(key, "expired")
            return None
        return h

    def size(self, key: bytes, h: Held) -> int:
        return len(key) + len(h.value) + ENTRY_OVERHEAD

    def total(self) -> int:
        return sum(self.size(k, h) for k, h in self.held.items())

    # -- rules
    @rule(
        key=st.sampled_from(KEYS),
        value=st.binary(max_size=300),
        ms=st.integers(0, 120),
        logical=st.integers(0, 2),
        origin=st.integers(0, 2),
        ttl=st.one_of(st.just(0), st.integers(-5, 60)),
        tomb=st.booleans(),
    )
    def apply(
        self, key: bytes, value: bytes, ms: int, logical: int, origin: int, ttl: int, tomb: bool
    ) -> None:
        t = make_ts(ms, logical)
        exp = 0 if ttl == 0 else max(0, self.now + ttl)
        got = self.store.apply(key, value, t, origin, exp, tomb, self.now)
        if tomb:
            value = b""
            if exp == 0:
                exp = ms + TTL
        h = self.find(key)
        if h is not None:
            want = (t, origin) > (h.ts, h.origin)
        else:
            rec = self.evicted.get(key)
            remembered = rec is not None and (rec[2] == 0 or rec[2] > self.now)
            want = not (remembered and rec is not None and (t, origin) <= rec[:2])
        assert got == want
        if not want:
            return
        if exp != 0 and exp <= self.now:
            if h is not None:
                self.remove(key, "silent")
            if tomb:
                self.purged += 1
            else:
                self.expirations += 1
            return
        self.held[key] = Held(value, t, origin, exp, tomb)
        if tomb:
            self.lru.pop(key, None)
        else:
            self.lru[key] = None
            self.lru.move_to_end(key)
        if self.max_bytes:
            while self.total() > self.max_bytes and self.lru:
                victim = next(iter(self.lru))
                self.remove(victim, "evicted")

    @rule(key=st.sampled_from(KEYS), touch=st.booleans())
    def get(self, key: bytes, touch: bool) -> None:
        got = self.store.get(key, self.now) if touch else self.store.peek(key, self.now)
        h = self.find(key)
        if h is None:
            assert got is None
        else:
            assert got == (h.value, h.ts, h.origin, h.expire, h.tomb)
            if touch and not h.tomb:
                self.lru.move_to_end(key)

    @rule(dt=st.integers(0, 30))
    def advance(self, dt: int) -> None:
        self.now += dt

    @rule()
    def sweep(self) -> None:
        got = self.store.sweep(self.now)
        dead = [k for k, h in self.held.items() if self.expired(h)]
        data = sum(not self.held[k].tomb for k in dead)
        for k in dead:
            self.remove(k, "expired")
        assert got == (data, len(dead) - data)

    @rule(key=st.sampled_from(KEYS))
    def evict(self, key: bytes) -> None:
        got = self.store.evict(key)
        h = self.held.get(key)
        want = h is not None and not h.tomb
        assert got == want
        if want:
            self.remove(key, "evicted")

    # -- invariants
    @invariant()
    def counters_match(self) -> None:
        s = self.store
        assert len(s) == sum(not h.tomb for h in self.held.values())
        assert s.tombstones == sum(h.tomb for h in self.held.values())
        assert s.bytes == self.total()
        assert (s.expirations, s.tombstones_purged, s.evictions) == (
            self.expirations,
            self.purged,
            self.evictions,
        )
        if self.max_bytes:
            assert s.bytes <= self.max_bytes or len(s) == 0
        for k in KEYS:
            rec = self.evicted.get(k)
            assert s.recently_evicted(k) == (rec[:2] if rec else None)

    @invariant()
    def digests_match(self) -> None:
        s = self.store
        for p in range(PARTS):
            want = 0
            subs = [0] * SUBS
            listed = set()
            for k, h in self.held.items():
                part, b = s.bucket_of(k)
                if part == p:
                    term = model_term(k, h.ts, h.origin, h.tomb)
                    want = (want + term) & MASK
                    subs[b] = (subs[b] + term) & MASK
                    listed.add((k, h.ts, h.origin))
            assert s.digest(p) == want == s.recompute_digest(p)
            assert s.sub_digests(p) == subs
            assert set(s.keys(p)) == listed


class BoundedStoreModel(StoreModel):
    max_bytes = 1200


model_settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = model_settings
TestBoundedStoreModel = BoundedStoreModel.TestCase
TestBoundedStoreModel.settings = model_settings


def test_references_are_released() -> None:
    import sys

    key = b"refcount-key-" + bytes(range(20))
    value = b"refcount-value-" + bytes(range(30))
    k0, v0 = sys.getrefcount(key), sys.getrefcount(value)
    s = VersionedStore(16, max_bytes=10**6, evicted_history=2)
    for i in range(5):
        s.apply(key, value, ts(i + 1), 1, 10**6, False, 0)  # replace in place
        s.get(key, 0)
    s.apply(key, b"", ts(9), 1, 0, True, 0)  # to a tombstone
    assert sys.getrefcount(value) == v0
    s.apply(key, value, ts(10), 1, 0, False, 0)
    s.evict(key)  # remembered: the record's ring and its index hold the key
    assert sys.getrefcount(key) == k0 + 2
    assert sys.getrefcount(value) == v0
    s.apply(b"x", b"", ts(1), 1, 0, False, 0)
    s.evict(b"x")
    s.apply(b"y", b"", ts(1), 1, 0, False, 0)
    s.evict(b"y")  # pushes the key out of the 2-slot record
    assert sys.getrefcount(key) == k0
    s.apply(key, value, ts(11), 1, 0, False, 0)
    s.sweep(10**7)
    del s
    assert (sys.getrefcount(key), sys.getrefcount(value)) == (k0, v0)


def test_bytes_subclasses_are_refused() -> None:
    # their __hash__/__eq__/__del__ could run Python code in the middle of an update
    class Key(bytes):
        pass

    s = VersionedStore(16)
    with pytest.raises(TypeError):
        s.apply(Key(b"k"), b"v", ts(1), 1, 0, False, 0)
    with pytest.raises(TypeError):
        s.apply(b"k", Key(b"v"), ts(1), 1, 0, False, 0)
    assert len(s) == 0
