"""HintBuffer: FIFO per target, caps and their victims, TTL, requeue, supersede, cost;
and the replay of its hints by a node (in-process nodes, one event loop).

The stateful test drives the buffer and a plain Python model of it with the same
operations and compares every hint handed out, every counter and every size after
each step; the model re-implements the documented rules, not the data structure.
Costs are checked by counting (the ``work`` counter), never by timing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
from aio_helpers import run
from cluster_harness import FAST, SMALL_FRAMES, local
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hypercache._core.hints import HINT_OVERHEAD, MAX_BYTES, MAX_HINTS, MAX_TTL_MS, HintBuffer
from hypercache.cluster.local import InprocCluster, until
from hypercache.errors import ConfigError

T0 = 1_700_000_000_000  # wall ms
BIG = 1 << 40


def ts_at(ms: int, logical: int = 0) -> int:
    return (ms << 16) | logical


def buf(
    *, per_node: int = 1000, total: int = 1000, max_bytes: int = BIG, ttl: int = 1000
) -> HintBuffer:
    return HintBuffer(max_per_node=per_node, max_total=total, max_bytes=max_bytes, ttl_ms=ttl)


def put(
    b: HintBuffer,
    target: str,
    key: bytes,
    now: int = T0,
    *,
    value: bytes = b"v",
    ts: int | None = None,
    origin: int = 1,
    tomb: bool = False,
) -> bool:
    return b.enqueue(target, key, value, ts_at(now) if ts is None else ts, origin, 0, tomb, now)


def keys_of(batch: list[tuple[bytes, bytes, int, int, int, bool]]) -> list[bytes]:
    return [h[0] for h in batch]


def drain(b: HintBuffer, target: str, now: int = T0) -> list[bytes]:
    return keys_of(b.dequeue_batch(target, 1 << 30, now))


def conserved(b: HintBuffer) -> bool:
    return b.queued_total + b.requeued == (
        len(b)
        + b.dequeued
        + b.expired
        + b.superseded
        + b.dropped_node_cap
        + b.dropped_total_cap
        + b.dropped_bytes_cap
        + b.dropped_target
    )


# -- FIFO ------------------------------------------------------------------------------


def test_fifo_per_target_and_tuple_shape() -> None:
    b = buf()
    for i in range(5):
        put(b, "a", b"a%d" % i, T0 + i)
        put(b, "b", b"b%d" % i, T0 + i)
    assert b.enqueue("a", b"del", b"", ts_at(T0, 7), 9, 0, True, T0 + 9)
    assert b.enqueue("a", b"ttl", b"x", ts_at(T0, 8), 9, T0 + 500, False, T0 + 9)
    assert len(b) == 12 and b.pending("a") == 7 and b.pending("b") == 5
    assert sorted(b.targets()) == ["a", "b"]
    first = b.dequeue_batch("a", 3, T0 + 10)
    assert first == [
        (b"a0", b"v", ts_at(T0), 1, 0, False),
        (b"a1", b"v", ts_at(T0 + 1), 1, 0, False),
        (b"a2", b"v", ts_at(T0 + 2), 1, 0, False),
    ]
    assert type(first[0][5]) is bool
    rest = b.dequeue_batch("a", 100, T0 + 10)
    assert keys_of(rest) == [b"a3", b"a4", b"del", b"ttl"]
    assert rest[2] == (b"del", b"", ts_at(T0, 7), 9, 0, True)
    assert rest[3] == (b"ttl", b"x", ts_at(T0, 8), 9, T0 + 500, False)
    assert b.dequeue_batch("a", 100, T0 + 10) == []
    assert b.targets() == ["b"]
    assert drain(b, "b", T0 + 10) == [b"b%d" % i for i in range(5)]
    assert len(b) == 0 and b.bytes == 0 and b.dequeued == 12 and conserved(b)


def test_unknown_target_and_zero_count() -> None:
    b = buf()
    assert b.dequeue_batch("nobody", 10, T0) == []
    assert b.pending("nobody") == 0
    assert b.drop_target("nobody") == 0
    put(b, "a", b"k")
    assert b.dequeue_batch("a", 0, T0) == []
    assert b.pending("a") == 1


def test_clock_stepping_back_keeps_fifo_order() -> None:
    b = buf(ttl=100)
    put(b, "a", b"k1", T0 + 50)
    put(b, "a", b"k2", T0)  # the wall clock stepped back 50 ms
    put(b, "a", b"k3", T0 + 10)
    # k2 and k3 are dated no earlier than k1, so they are not expired before it.
    assert b.expire(T0 + 100, 100) == 0
    assert drain(b, "a", T0 + 149) == [b"k1", b"k2", b"k3"]


def test_bytes_accounting() -> None:
    b = buf()
    put(b, "a", b"key", value=b"12345")
    put(b, "b", b"k", value=b"")
    assert b.bytes == (3 + 5 + HINT_OVERHEAD) + (1 + HINT_OVERHEAD)
    b.dequeue_batch("a", 1, T0)
    assert b.bytes == 1 + HINT_OVERHEAD


# -- caps -------------------------------------------------------------------------------


def test_per_node_cap_drops_that_nodes_oldest() -> None:
    b = buf(per_node=3, total=100)
    for i in range(3):
        put(b, "a", b"a%d" % i, T0 + i)
    put(b, "b", b"b0", T0 - 100)  # older, but another node: untouched
    assert put(b, "a", b"a3", T0 + 3)
    assert b.dropped_node_cap == 1 and b.pending("a") == 3 and len(b) == 4
    assert put(b, "a", b"a4", T0 + 4)
    assert b.dropped_node_cap == 2
    assert drain(b, "a") == [b"a2", b"a3", b"a4"]
    assert drain(b, "b") == [b"b0"]
    assert conserved(b)


def test_total_cap_drops_the_globally_oldest() -> None:
    b = buf(per_node=4, total=4)
    put(b, "a", b"a0", T0 + 5)
    put(b, "b", b"b0", T0 + 1)
    put(b, "b", b"b1", T0 + 6)
    put(b, "c", b"c0", T0 + 3)
    assert put(b, "a", b"a1", T0 + 7)  # drops b0 (T0 + 1)
    assert b.dropped_total_cap == 1 and len(b) == 4
    assert put(b, "a", b"a2", T0 + 8)  # drops c0 (T0 + 3); c is left empty
    assert b.dropped_total_cap == 2 and sorted(b.targets()) == ["a", "b"]
    assert put(b, "b", b"b2", T0 + 8)  # drops a0 (T0 + 5)
    assert drain(b, "a") == [b"a1", b"a2"]
    assert drain(b, "b") == [b"b1", b"b2"]
    assert drain(b, "c") == []
    assert conserved(b)


def test_ties_in_one_millisecond_go_by_enqueue_order() -> None:
    b = buf(per_node=3, total=3)
    put(b, "b", b"b0", T0)
    put(b, "a", b"a0", T0)
    put(b, "a", b"a1", T0)
    put(b, "c", b"c0", T0)  # all at T0: b0 came first, so it goes
    assert drain(b, "b") == []
    put(b, "c", b"c1", T0)
    assert drain(b, "a") == [b"a1"]


def test_byte_cap_drops_oldest_until_the_new_hint_fits() -> None:
    unit = 10 + HINT_OVERHEAD  # 2-byte key, 8-byte value
    b = buf(per_node=100, total=100, max_bytes=4 * unit)
    for i in range(4):
        put(b, "ab"[i % 2], b"k%d" % i, T0 + i, value=b"x" * 8)
    assert b.bytes == 4 * unit
    # Needs room for 2.5 hints: the three oldest go, whatever their target.
    assert put(b, "c", b"kk", T0 + 9, value=b"x" * (8 + unit + unit // 2))
    assert b.dropped_bytes_cap == 3 and b.dropped_total_cap == 0
    assert b.bytes <= 4 * unit
    assert drain(b, "a") == [] and drain(b, "b") == [b"k3"]
    assert drain(b, "c") == [b"kk"]
    assert conserved(b)


def test_oversize_hint_is_refused_and_nothing_else_goes() -> None:
    b = buf(max_bytes=HINT_OVERHEAD + 10)
    assert put(b, "a", b"k", value=b"123456789")  # exactly max_bytes
    assert b.bytes == b.max_bytes
    assert not put(b, "a", b"big", value=b"1234567890")
    assert b.dropped_oversize == 1 and b.pending("a") == 1 and b.queued_total == 1
    assert conserved(b)


def test_caps_never_exceeded_under_churn() -> None:
    b = buf(per_node=50, total=120, max_bytes=120 * (HINT_OVERHEAD + 20))
    for i in range(5000):
        put(b, f"t{i % 7}", b"%d" % i, T0 + i // 3, value=b"x" * (i % 37))
        assert len(b) <= 120 and b.bytes <= b.max_bytes
        assert all(b.pending(t) <= 50 for t in b.targets())
    assert b.dropped_node_cap + b.dropped_total_cap + b.dropped_bytes_cap > 0
    assert conserved(b)


# -- cost, by counting ----------------------------------------------------------------


def _work_per_enqueue_at_cap(n: int) -> float:
    b = buf(per_node=n, total=n)
    for i in range(n):
        put(b, f"t{i % 8}", b"%d" % i, T0 + i)
    before = b.work
    for i in range(n, n + 200):
        put(b, f"t{i % 8}", b"%d" % i, T0 + i)
    assert b.dropped_total_cap == 200
    return (b.work - before) / 200


def test_enqueue_and_dequeue_cost_does_not_grow_with_size() -> None:
    small, large = _work_per_enqueue_at_cap(100), _work_per_enqueue_at_cap(50_000)
    assert large <= small + 1 and large < 10  # link + unlink + a few heap levels
    b = buf(per_node=50_000, total=50_000)
    for i in range(50_000):
        put(b, "a", b"%d" % i, T0)
    before = b.work
    b.dequeue_batch("a", 100, T0)
    assert b.work - before <= 100 + 2


def test_expire_cost_is_proportional_to_what_expired() -> None:
    b = buf(per_node=100_000, total=100_000, ttl=100)
    for i in range(10):
        put(b, f"t{i % 5}", b"old%d" % i, T0)
    for i in range(50_000):
        put(b, f"t{i % 5}", b"new%d" % i, T0 + 60)
    before = b.work
    assert b.expire(T0 + 100, 1 << 30) == 10
    assert b.work - before <= 10 + 5 * 4  # the 10 hints, plus heap work per target
    assert b.expire(T0 + 100, 1 << 30) == 0 and len(b) == 50_000


# -- TTL --------------------------------------------------------------------------------


def test_expired_hints_are_skipped_lazily_by_dequeue() -> None:
    b = buf(ttl=100)
    put(b, "a", b"k0", T0)
    put(b, "a", b"k1", T0 + 10)
    put(b, "a", b"k2", T0 + 50)
    assert len(b) == 3 and b.pending("a") == 3  # lazily: still counted
    # now - queued_at >= ttl is expired: k0 at exactly 100 ms, k1 not yet.
    assert keys_of(b.dequeue_batch("a", 1, T0 + 100)) == [b"k1"]
    assert b.expired == 1 and b.dequeued == 1
    assert drain(b, "a", T0 + 150) == []
    assert b.expired == 2 and len(b) == 0 and conserved(b)


def test_expire_respects_budget_and_stops_at_live_hints() -> None:
    b = buf(ttl=100)
    for i in range(6):
        put(b, "ab"[i % 2], b"k%d" % i, T0 + i)
    put(b, "c", b"live", T0 + 80)
    assert b.expire(T0 + 99, 100) == 0
    assert b.expire(T0 + 103, 2) == 2
    assert b.expire(T0 + 103, 100) == 2  # k0..k3 are past 100 ms, k4 and k5 not
    assert b.expired == 4 and len(b) == 3
    assert b.expire(T0 + 1000, 0) == 0
    assert b.expire(T0 + 1000, 100) == 3
    assert len(b) == 0 and b.targets() == [] and b.bytes == 0 and conserved(b)


def test_entry_expiry_is_payload_only() -> None:
    b = buf(ttl=1000)
    # The entry has expired, but the hint has not: it still supersedes older data.
    b.enqueue("a", b"k", b"v", ts_at(T0), 1, T0 - 5, False, T0)
    assert b.dequeue_batch("a", 10, T0 + 10) == [(b"k", b"v", ts_at(T0), 1, T0 - 5, False)]


# -- requeue ----------------------------------------------------------------------------


def test_requeue_front_puts_the_batch_back_ahead_in_order() -> None:
    b = buf()
    for i in range(6):
        put(b, "a", b"k%d" % i, T0 + i)
    batch = b.dequeue_batch("a", 4, T0 + 10)
    put(b, "a", b"late", T0 + 11)
    assert b.requeue_front("a", batch[1:]) == 3  # k0 got through
    assert b.requeued == 3 and b.pending("a") == 6
    assert drain(b, "a", T0 + 20) == [b"k1", b"k2", b"k3", b"k4", b"k5", b"late"]
    assert conserved(b)


def test_requeue_front_keeps_the_age_of_a_whole_batch() -> None:
    b = buf(ttl=100)
    for i in range(4):
        put(b, "a", b"k%d" % i, T0 + 10 * i)
    batch = b.dequeue_batch("a", 4, T0 + 40)
    b.requeue_front("a", batch)
    # k0 was queued at T0 and k1 at T0 + 10: each expires at its own 100 ms.
    assert b.expire(T0 + 100, 10) == 1
    assert b.expire(T0 + 109, 10) == 0
    assert keys_of(b.dequeue_batch("a", 1, T0 + 110)) == [b"k2"]


def test_requeue_front_never_makes_a_hint_younger() -> None:
    b = buf(ttl=100)
    for i in range(4):
        put(b, "a", b"k%d" % i, T0 + 10 * i)
    batch = b.dequeue_batch("a", 4, T0 + 40)
    b.requeue_front("a", [batch[1], batch[3]])  # k1 and k3 failed
    # k1 takes k0's age (T0) and k3 k1's (T0 + 10): older, never younger.
    assert b.expire(T0 + 100, 10) == 1
    assert b.expire(T0 + 110, 10) == 1
    assert len(b) == 0


def test_requeue_front_without_a_window_dates_by_version_time() -> None:
    b = buf(ttl=100)
    put(b, "a", b"k0", T0 + 50)
    b.dequeue_batch("a", 10, T0 + 50)
    b.dequeue_batch("a", 10, T0 + 50)  # empty: the window is gone
    hint = (b"k0", b"v", ts_at(T0 + 20), 1, 0, False)
    assert b.requeue_front("a", [hint]) == 1
    assert b.expire(T0 + 119, 10) == 0
    assert b.expire(T0 + 120, 10) == 1  # ts >> 16 is T0 + 20


def test_requeue_front_clamps_ages_to_keep_the_fifo_sorted() -> None:
    b = buf(ttl=100)
    put(b, "a", b"k0", T0 + 50)
    batch = b.dequeue_batch("a", 10, T0 + 50)
    put(b, "a", b"k1", T0)  # the clock stepped back 50 ms; "a" was empty
    b.requeue_front("a", batch)
    # k0 (queued at T0 + 50) is put in front of k1 (T0): it is dated T0 too.
    assert [(h[0], h[6]) for h in b.peek("a", 10, T0)] == [(b"k0", T0), (b"k1", T0)]
    assert b.expire(T0 + 100, 10) == 2


def test_an_empty_requeue_spends_the_window() -> None:
    b = buf(ttl=100)
    put(b, "a", b"k0", T0 + 50)
    batch = b.dequeue_batch("a", 10, T0 + 50)
    assert b.requeue_front("a", []) == 0
    b.requeue_front("a", batch)  # no window left: dated by version time
    assert b.peek("a", 10, T0)[0][6] == T0 + 50
    put(b, "b", b"k0", T0 + 50, ts=ts_at(T0 + 10))
    batch = b.dequeue_batch("b", 10, T0 + 50)
    assert b.requeue_front("b", []) == 0
    b.requeue_front("b", batch)
    assert b.peek("b", 10, T0)[0][6] == T0 + 10


def test_peek_shows_what_dequeue_would_return_and_drops_expired_heads() -> None:
    b = buf(ttl=100)
    put(b, "a", b"k0", T0)
    put(b, "a", b"k1", T0 + 10)
    put(b, "a", b"k2", T0 + 20)
    assert b.peek("a", 2, T0 + 50) == [
        (b"k0", b"v", ts_at(T0), 1, 0, False, T0),
        (b"k1", b"v", ts_at(T0 + 10), 1, 0, False, T0 + 10),
    ]
    assert b.pending("a") == 3 and b.dequeued == 0
    assert keys_of(b.dequeue_batch("a", 2, T0 + 50)) == [b"k0", b"k1"]  # peek took nothing
    put(b, "a", b"k3", T0 + 60)
    assert [h[0] for h in b.peek("a", 10, T0 + 125)] == [b"k3"]  # k2 expired on the way
    assert b.expired == 1 and b.pending("a") == 1
    assert b.peek("nobody", 10, T0) == [] and b.peek("a", 0, T0) == []
    with pytest.raises(ConfigError):
        b.peek("a", -1, T0)


def test_requeue_front_is_dropped_first_at_the_node_cap() -> None:
    b = buf(per_node=3)
    for i in range(3):
        put(b, "a", b"k%d" % i, T0 + i)
    batch = b.dequeue_batch("a", 2, T0 + 5)
    put(b, "a", b"n0", T0 + 6)
    put(b, "a", b"n1", T0 + 7)
    assert b.requeue_front("a", batch) == 0  # the two oldest: k0 and k1 give way
    assert b.dropped_node_cap == 2
    assert drain(b, "a") == [b"k2", b"n0", b"n1"]
    assert conserved(b)


def test_requeue_front_at_the_total_cap_drops_whichever_is_older() -> None:
    b = buf(per_node=3, total=3)
    put(b, "a", b"a0", T0)
    put(b, "b", b"b0", T0 + 10)
    batch = b.dequeue_batch("a", 1, T0 + 20)
    put(b, "b", b"b1", T0 + 20)
    put(b, "c", b"c0", T0 + 21)
    # The requeued a0 (T0) is older than the buffer's oldest, b0 (T0 + 10): a0 goes.
    assert b.requeue_front("a", batch) == 0
    assert b.dropped_total_cap == 1 and b.pending("a") == 0 and len(b) == 3
    batch = b.dequeue_batch("b", 1, T0 + 30)  # b0
    put(b, "a", b"a1", T0 + 5)  # a clock behind: the oldest hint now
    # The requeued b0 (T0 + 10) is newer than a1 (T0 + 5): a1 goes.
    assert b.requeue_front("b", batch) == 1
    assert b.dropped_total_cap == 2
    assert drain(b, "a") == [] and drain(b, "b") == [b"b0", b"b1"]
    assert conserved(b)


def test_requeue_front_rejects_bad_items_without_changing_anything() -> None:
    b = buf()
    put(b, "a", b"k")
    with pytest.raises(TypeError):
        b.requeue_front("a", [("k", b"v", 1, 1, 0, False)])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        b.requeue_front("a", [(b"k", b"v", 1)])  # type: ignore[list-item]
    with pytest.raises(OverflowError):
        b.requeue_front("a", [(b"k2", b"v", -1, 1, 0, False)])
    assert b.pending("a") == 1 and b.requeued == 0
    assert b.requeue_front("a", []) == 0


# -- supersede --------------------------------------------------------------------------


def test_newer_hint_supersedes_and_moves_to_the_tail() -> None:
    b = buf(ttl=100)
    put(b, "a", b"k", T0, value=b"old", ts=ts_at(T0))
    put(b, "a", b"other", T0 + 1)
    assert put(b, "a", b"k", T0 + 50, value=b"newer", ts=ts_at(T0 + 50))
    assert b.superseded == 1 and b.pending("a") == 2
    assert b.bytes == 2 * HINT_OVERHEAD + len(b"other") + 1 + len(b"k") + 5
    # Its age now counts from the newest write.
    assert b.expire(T0 + 101, 10) == 1
    assert b.dequeue_batch("a", 10, T0 + 120) == [(b"k", b"newer", ts_at(T0 + 50), 1, 0, False)]
    assert conserved(b)


def test_older_or_equal_hint_is_superseded_on_arrival() -> None:
    b = buf()
    assert put(b, "a", b"k", value=b"v2", ts=ts_at(T0, 2), origin=1)
    assert not put(b, "a", b"k", value=b"v1", ts=ts_at(T0, 1), origin=9)
    assert not put(b, "a", b"k", value=b"v2", ts=ts_at(T0, 2), origin=1)  # same write
    assert put(b, "a", b"k", value=b"", ts=ts_at(T0, 2), origin=2, tomb=True)  # origin wins
    assert b.superseded == 3 and b.queued_total == 4 and b.pending("a") == 1
    assert put(b, "other", b"k", ts=ts_at(T0, 0))  # per target
    assert b.dequeue_batch("a", 10, T0) == [(b"k", b"", ts_at(T0, 2), 2, 0, True)]
    assert conserved(b)


def test_requeued_hint_loses_to_a_newer_one_queued_meanwhile() -> None:
    b = buf()
    put(b, "a", b"k", ts=ts_at(T0, 1), value=b"v1")
    put(b, "a", b"j", ts=ts_at(T0, 1))
    batch = b.dequeue_batch("a", 10, T0)
    put(b, "a", b"k", T0 + 5, ts=ts_at(T0 + 5), value=b"v2")
    assert b.requeue_front("a", batch) == 1
    assert b.superseded == 1
    assert [h[:2] for h in b.dequeue_batch("a", 10, T0 + 5)] == [(b"j", b"v"), (b"k", b"v2")]
    assert conserved(b)


# -- targets, drop_target, clear, stats ------------------------------------------------


def test_drop_target_clear_and_stats() -> None:
    b = buf()
    for i in range(3):
        put(b, "a", b"a%d" % i)
    put(b, "b", b"b0")
    assert b.drop_target("a") == 3 and b.targets() == ["b"]
    assert b.pending("a") == 0 and b.dropped_target == 3
    put(b, "a", b"again")
    assert sorted(b.targets()) == ["a", "b"]
    s = b.stats()
    assert s["queued"] == 2 == len(b) and s["targets"] == 2 and s["bytes"] == b.bytes
    assert s["dropped_target"] == 3 and s["max_total"] == 1000 and s["ttl_ms"] == 1000
    assert set(s) == {
        "queued", "bytes", "targets", "queued_total", "requeued", "dequeued", "expired",
        "superseded", "dropped_node_cap", "dropped_total_cap", "dropped_bytes_cap",
        "dropped_oversize", "dropped_target", "max_per_node", "max_total", "max_bytes",
        "ttl_ms",
    }  # fmt: skip
    b.clear()
    assert len(b) == 0 and b.bytes == 0 and b.targets() == [] and b.dropped_target == 5
    assert conserved(b)
    put(b, "c", b"k")
    assert drain(b, "c") == [b"k"]


def test_many_targets_come_and_go() -> None:
    b = buf(per_node=5, total=40)
    for round_ in range(5):
        for t in range(30):
            put(b, f"n{round_}-{t}", b"k", T0 + round_)
        for t in range(30):
            drain(b, f"n{round_}-{t}")
            drain(b, f"n{round_}-{t}")
    assert len(b) == 0 and b.targets() == [] and conserved(b)


def test_references_are_released() -> None:
    key, value = b"refcount-key-%d" % 7, b"refcount-value-%d" % 7
    base_k, base_v = sys.getrefcount(key), sys.getrefcount(value)
    b = buf(per_node=2, total=2)
    put(b, "a", key, value=value)
    assert sys.getrefcount(key) > base_k
    batch = b.dequeue_batch("a", 10, T0)
    b.requeue_front("a", batch)
    del batch
    put(b, "a", b"x1")
    put(b, "a", b"x2")  # the node cap drops key
    assert (sys.getrefcount(key), sys.getrefcount(value)) == (base_k, base_v)
    put(b, "b", key, value=value)
    b.clear()
    put(b, "b", key, value=value)
    del b
    assert (sys.getrefcount(key), sys.getrefcount(value)) == (base_k, base_v)


# -- bad arguments ----------------------------------------------------------------------


GOOD = {"max_per_node": 10, "max_total": 100, "max_bytes": 10_000, "ttl_ms": 1000}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_per_node", 0),
        ("max_per_node", -1),
        ("max_per_node", 101),  # above max_total
        ("max_per_node", True),
        ("max_per_node", 1.5),
        ("max_total", 0),
        ("max_total", MAX_HINTS + 1),
        ("max_total", "100"),
        ("max_bytes", 0),
        ("max_bytes", MAX_BYTES + 1),
        ("max_bytes", None),
        ("ttl_ms", 0),
        ("ttl_ms", MAX_TTL_MS + 1),
        ("ttl_ms", 1.0),
    ],
)
def test_bad_constructor_arguments_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        HintBuffer(**{**GOOD, field: value})  # type: ignore[arg-type]
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_constructor_is_keyword_only_and_complete() -> None:
    with pytest.raises(TypeError):
        HintBuffer(10, 100, 10_000, 1000)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        HintBuffer(max_per_node=10, max_total=100, max_bytes=10_000)  # type: ignore[call-arg]
    b = HintBuffer(max_per_node=1, max_total=1, max_bytes=1, ttl_ms=1)
    assert (b.max_per_node, b.max_total, b.max_bytes, b.ttl_ms) == (1, 1, 1, 1)


def test_bad_call_arguments() -> None:
    b = buf()
    with pytest.raises(TypeError):
        b.enqueue("a", "key", b"v", 1, 1, 0, False, T0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        b.enqueue("a", bytearray(b"k"), b"v", 1, 1, 0, False, T0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        b.enqueue(b"a", b"k", b"v", 1, 1, 0, False, T0)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        b.enqueue("a", b"k", b"v", -1, 1, 0, False, T0)
    with pytest.raises(OverflowError):
        b.enqueue("a", b"k", b"v", 1, 1 << 32, 0, False, T0)
    with pytest.raises(ConfigError) as info:
        b.dequeue_batch("a", -1, T0)
    assert info.value.field == "max_count"
    with pytest.raises(ConfigError) as info:
        b.expire(T0, -1)
    assert info.value.field == "budget"
    assert len(b) == 0 and b.queued_total == 0


# -- replay by a node -------------------------------------------------------------------


def test_hint_replay_is_not_stuck_when_a_batch_exceeds_max_frame() -> None:
    """Hints are batched by count only (``hint_replay_batch``), never by bytes: a
    batch of large hints is over ``max_frame``, its R_PUT_MANY fails to encode
    (FrameTooLargeError), the batch is requeued at the front and the target backs
    off, forever. Every hint for that target (the small ones behind too) is stuck."""

    async def main() -> None:
        settings = {**FAST, "replication": 2, **SMALL_FRAMES}
        async with InprocCluster(2, settings=settings) as cluster:
            n1, n2 = cluster.nodes
            assert n1.handoff is not None and n1.coordinator is not None
            ts = n1.clock.now()
            tag = n1.clock.tag
            keys = [b"big1", b"big2", b"big3", b"small"]
            values = [b"x" * 8000, b"y" * 8000, b"w" * 8000, b"z"]
            for i, (key, value) in enumerate(zip(keys, values, strict=True)):
                n1.handoff.hint("n2", key, value, ts + i, tag, 0, False)
            # Each hint fits a frame on its own; all of them must reach n2.
            await until(
                lambda: all(local(n2, k) is not None for k in keys),
                timeout=3.0,
                what="hints delivered (each batch fails with FrameTooLargeError)",
            )

    run(main())


# -- the model --------------------------------------------------------------------------


@dataclass
class H:
    key: bytes
    value: bytes
    ts: int
    origin: int
    exp: int
    tomb: bool
    qa: int
    seq: int

    def stamp(self) -> tuple[int, int]:
        return (self.qa, self.seq)

    def out(self) -> tuple[bytes, bytes, int, int, int, bool]:
        return (self.key, self.value, self.ts, self.origin, self.exp, self.tomb)


COUNTERS = (
    "queued_total",
    "requeued",
    "dequeued",
    "expired",
    "superseded",
    "dropped_node_cap",
    "dropped_total_cap",
    "dropped_bytes_cap",
    "dropped_oversize",
    "dropped_target",
)
TARGETS = ["a", "b", "c"]
KEYS = [b"k0", b"k1", b"k2", b"k3", b"k4", b"key-5"]
TTL = 40


class HintModel(RuleBasedStateMachine):
    """The documented rules, one list per target, no cleverness."""

    def __init__(self) -> None:
        super().__init__()
        self.q: dict[str, list[H]] = {}
        self.window: dict[str, list[tuple[int, int]]] = {}
        self.history: dict[str, list[tuple[bytes, bytes, int, int, int, bool]]] = {}
        self.c = dict.fromkeys(COUNTERS, 0)
        self.seq = 0
        self.seq_low = -1
        self.now = T0
        self.logical = 0
        self.last: tuple[str | None, list[tuple[bytes, bytes, int, int, int, bool]]] = (None, [])

    @initialize(
        per_node=st.integers(1, 6),
        extra=st.integers(0, 6),
        units=st.integers(1, 8),
    )
    def start(self, per_node: int, extra: int, units: int) -> None:
        self.max_per_node, self.max_total = per_node, per_node + extra
        self.max_bytes = units * (HINT_OVERHEAD + 12) + 5
        self.b = HintBuffer(
            max_per_node=self.max_per_node,
            max_total=self.max_total,
            max_bytes=self.max_bytes,
            ttl_ms=TTL,
        )

    # -- helpers
    def size(self, key: bytes, value: bytes) -> int:
        return len(key) + len(value) + HINT_OVERHEAD

    def total(self) -> int:
        return sum(len(q) for q in self.q.values())

    def nbytes(self) -> int:
        return sum(self.size(h.key, h.value) for q in self.q.values() for h in q)

    def oldest(self) -> str:
        return min((t for t in self.q if self.q[t]), key=lambda t: self.q[t][0].stamp())

    def drop_oldest(self) -> None:
        self.q[self.oldest()].pop(0)

    def find(self, t: str, key: bytes) -> H | None:
        return next((h for h in self.q.get(t, []) if h.key == key), None)

    # -- rules
    @rule(
        t=st.sampled_from(TARGETS),
        key=st.sampled_from(KEYS),
        vlen=st.sampled_from([0, 1, 12, 40, 12 * 9]),
        age=st.sampled_from([0, 0, 0, 3, 30]),
        origin=st.integers(0, 2),
        tomb=st.booleans(),
    )
    def enqueue(self, t: str, key: bytes, vlen: int, age: int, origin: int, tomb: bool) -> None:
        self.logical += 1
        ts, value = ts_at(self.now - age, self.logical % 3), bytes([65 + vlen % 26]) * vlen
        got = self.b.enqueue(t, key, value, ts, origin, 0, tomb, self.now)
        want = self._enqueue(t, key, value, ts, origin, tomb)
        assert got == want

    def _enqueue(self, t: str, key: bytes, value: bytes, ts: int, origin: int, tomb: bool) -> bool:
        size = self.size(key, value)
        if size > self.max_bytes:
            self.c["dropped_oversize"] += 1
            return False
        self.c["queued_total"] += 1
        q = self.q.setdefault(t, [])
        old = self.find(t, key)
        if old is not None:
            self.c["superseded"] += 1
            if (ts, origin) <= (old.ts, old.origin):
                return False
            q.remove(old)
        qa = max(self.now, q[-1].qa) if q else self.now
        if len(q) >= self.max_per_node:
            q.pop(0)
            self.c["dropped_node_cap"] += 1
        if self.total() >= self.max_total:
            self.drop_oldest()
            self.c["dropped_total_cap"] += 1
        while self.nbytes() + size > self.max_bytes:
            self.drop_oldest()
            self.c["dropped_bytes_cap"] += 1
        q.append(H(key, value, ts, origin, 0, tomb, qa, self.seq))
        self.seq += 1
        return True

    @rule(t=st.sampled_from(TARGETS), n=st.integers(0, 4))
    def dequeue(self, t: str, n: int) -> None:
        got = self.b.dequeue_batch(t, n, self.now)
        q = self.q.get(t, [])
        want: list[tuple[bytes, bytes, int, int, int, bool]] = []
        window: list[tuple[int, int]] = []
        limit = min(n, len(q))
        while len(want) < limit and q:
            h = q.pop(0)
            if h.qa <= self.now - TTL:
                self.c["expired"] += 1
                continue
            want.append(h.out())
            window.append(h.stamp())
        self.c["dequeued"] += len(want)
        self.window[t] = window
        assert got == want
        self.history.setdefault(t, []).extend(got)
        self.last = (t, got)

    @rule(
        t=st.sampled_from(TARGETS),
        pick=st.sampled_from(["all", "prefix", "suffix", "subset", "history"]),
        data=st.data(),
    )
    def requeue(self, t: str, pick: str, data: st.DataObject) -> None:
        last_t, last = self.last
        source = last if last_t == t and pick != "history" else self.history.get(t, [])
        if pick == "all":
            batch = list(source)
        elif pick == "prefix":
            batch = source[: data.draw(st.integers(0, len(source)))]
        elif pick == "suffix":
            batch = source[data.draw(st.integers(0, len(source))) :]
        else:
            mask = data.draw(st.lists(st.booleans(), min_size=len(source), max_size=len(source)))
            batch = [h for h, m in zip(source, mask, strict=True) if m]
        got = self.b.requeue_front(t, batch)
        assert got == self._requeue(t, batch)
        self.last = (None, [])

    def _requeue(self, t: str, batch: list[tuple[bytes, bytes, int, int, int, bool]]) -> int:
        window = self.window.get(t, [])
        q = self.q.setdefault(t, [])
        kept = 0
        for i in reversed(range(len(batch))):
            key, value, ts, origin, exp, tomb = batch[i]
            size = self.size(key, value)
            if size > self.max_bytes:
                self.c["dropped_oversize"] += 1
                continue
            self.c["requeued"] += 1
            old = self.find(t, key)
            if old is not None:
                self.c["superseded"] += 1
                if (ts, origin) <= (old.ts, old.origin):
                    continue
                q.remove(old)
            if i < len(window):
                stamp = window[i]
            else:
                stamp = (ts >> 16, self.seq_low)
                self.seq_low -= 1
            if q and not stamp < q[0].stamp():
                stamp = (q[0].qa, self.seq_low)
                self.seq_low -= 1
            if len(q) >= self.max_per_node:
                self.c["dropped_node_cap"] += 1
                continue
            if self.total() >= self.max_total:
                self.c["dropped_total_cap"] += 1
                if stamp < self.q[self.oldest()][0].stamp():
                    continue
                self.drop_oldest()
            dropped = False
            while self.nbytes() + size > self.max_bytes:
                self.c["dropped_bytes_cap"] += 1
                if stamp < self.q[self.oldest()][0].stamp():
                    dropped = True
                    break
                self.drop_oldest()
            if dropped:
                continue
            q.insert(0, H(key, value, ts, origin, exp, tomb, stamp[0], stamp[1]))
            kept += 1
        self.window[t] = []
        return kept

    @rule(
        t=st.sampled_from(TARGETS),
        n=st.integers(1, 4),
        writes=st.lists(
            st.tuples(st.sampled_from(TARGETS), st.sampled_from(KEYS), st.sampled_from([0, 40])),
            max_size=4,
        ),
        pick=st.sampled_from(["all", "prefix", "suffix", "subset"]),
        data=st.data(),
    )
    def failed_replay(
        self,
        t: str,
        n: int,
        writes: list[tuple[str, bytes, int]],
        pick: str,
        data: st.DataObject,
    ) -> None:
        # The replay loop's life: take a batch, writes keep coming meanwhile, the
        # send fails, (part of) the batch goes back.
        self.dequeue(t, n)
        for target, key, vlen in writes:
            self.enqueue(target, key, vlen, 0, 1, False)
        self.requeue(t, pick, data)

    @rule(t=st.sampled_from(TARGETS), n=st.integers(0, 3))
    def peek(self, t: str, n: int) -> None:
        got = self.b.peek(t, n, self.now)
        q = self.q.get(t, [])
        while q and q[0].qa <= self.now - TTL:
            q.pop(0)
            self.c["expired"] += 1
        assert got == [(*h.out(), h.qa) for h in q[:n]]

    @rule(budget=st.integers(0, 5))
    def expire(self, budget: int) -> None:
        got = self.b.expire(self.now, budget)
        n = 0
        while n < budget and any(self.q.values()):
            t = self.oldest()
            if self.q[t][0].qa > self.now - TTL:
                break
            while n < budget and self.q[t] and self.q[t][0].qa <= self.now - TTL:
                self.q[t].pop(0)
                n += 1
        self.c["expired"] += n
        assert got == n

    @rule(dt=st.sampled_from([0, 1, 5, 20, 45, -7]))
    def advance(self, dt: int) -> None:
        self.now += dt  # -7: the wall clock steps back

    @rule(t=st.sampled_from(TARGETS))
    def drop_target(self, t: str) -> None:
        n = len(self.q.pop(t, []))
        self.window[t] = []
        self.c["dropped_target"] += n
        assert self.b.drop_target(t) == n

    @rule()
    def clear(self) -> None:
        self.b.clear()
        self.c["dropped_target"] += self.total()
        self.q.clear()
        self.window.clear()

    # -- invariants
    @invariant()
    def matches_model(self) -> None:
        b = self.b
        assert len(b) == self.total() <= self.max_total
        assert b.bytes == self.nbytes() <= self.max_bytes
        for t in TARGETS:
            assert b.pending(t) == len(self.q.get(t, [])) <= self.max_per_node
        assert sorted(b.targets()) == sorted(t for t, q in self.q.items() if q)
        assert {k: getattr(b, k) for k in COUNTERS} == self.c
        assert b.stats()["queued"] == len(b)
        assert conserved(b)
        for t in TARGETS:  # contents, order and ages (no time: nothing is expired)
            assert b.peek(t, 1 << 30, -(2**63)) == [(*h.out(), h.qa) for h in self.q.get(t, [])]
        for q in self.q.values():  # FIFO order is stamp order, keys unique per target
            assert [h.stamp() for h in q] == sorted(h.stamp() for h in q)
            assert len({h.key for h in q}) == len(q)


TestHintModel = HintModel.TestCase
TestHintModel.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
