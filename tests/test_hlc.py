"""Hybrid logical clock: monotonicity, remote updates, counter overflow, version order."""

from __future__ import annotations

import itertools
import time

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from hypercache._core.hlc import (
    HLC,
    LOGICAL_BITS,
    MAX_TIMESTAMP,
    compare_versions,
    make_ts,
    node_tag,
    ts_logical,
    ts_physical,
    version_newer,
    wall_clock_ms,
)
from hypercache.errors import ConfigError


class FakeClock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_layout() -> None:
    assert LOGICAL_BITS == 16
    assert MAX_TIMESTAMP == 2**63 - 1
    ts = make_ts(1_700_000_000_123, 7)
    assert ts == (1_700_000_000_123 << 16) | 7
    assert ts_physical(ts) == 1_700_000_000_123
    assert ts_logical(ts) == 7
    with pytest.raises(ValueError):
        make_ts(1, 0x10000)


def test_now_is_strictly_increasing_on_a_stuck_clock() -> None:
    clock = FakeClock(1000)
    hlc = HLC(1, clock=clock)
    first = hlc.now()
    assert first == make_ts(1000, 0)
    prev = first
    for _ in range(1000):
        ts = hlc.now()
        assert ts == prev + 1
        prev = ts
    assert hlc.last == prev
    clock.ms = 2000
    assert hlc.now() == make_ts(2000, 0)


def test_default_clock_tracks_wall_time() -> None:
    hlc = HLC(node_tag("n1"))
    before = int(time.time() * 1000)
    ts = hlc.now()
    after = int(time.time() * 1000)
    assert before - 5 <= ts_physical(ts) <= after + 5
    assert abs(wall_clock_ms() - int(time.time() * 1000)) < 1000
    seen = [hlc.now() for _ in range(10_000)]
    assert all(b > a for a, b in itertools.pairwise(seen))
    assert seen[0] > ts


def test_update_advances_past_remote() -> None:
    clock = FakeClock(1000)
    hlc = HLC(1, clock=clock)
    hlc.now()
    remote = make_ts(5000, 42)  # a node whose clock runs ahead
    got = hlc.update(remote)
    assert got == remote + 1
    nxt = hlc.now()
    assert nxt > remote
    assert ts_physical(nxt) == 5000  # counter carries on in the remote's ms
    assert hlc.drift_ms == 4000
    # an old remote timestamp still ticks the clock
    assert hlc.update(make_ts(10, 0)) == nxt + 1
    # once the wall clock passes, physical time takes over again
    clock.ms = 6000
    assert hlc.now() == make_ts(6000, 0)
    assert hlc.update(make_ts(5999, 0xFFFF)) == make_ts(6000, 1)


def test_counter_overflow_borrows_the_next_millisecond() -> None:
    clock = FakeClock(1000)
    hlc = HLC(1, clock=clock)
    stamps = [hlc.now() for _ in range(0x10000 + 3)]
    assert ts_physical(stamps[0xFFFF]) == 1000
    assert ts_logical(stamps[0xFFFF]) == 0xFFFF
    assert stamps[0x10000] == make_ts(1001, 0)
    assert stamps[-1] == make_ts(1001, 2)
    # the wall clock reaching the borrowed ms does not reset the counter backwards
    clock.ms = 1001
    assert hlc.now() == make_ts(1001, 3)
    # a remote at the very top of a millisecond carries too
    assert hlc.update(make_ts(3000, 0xFFFF)) == make_ts(3001, 0)


def test_clock_going_backwards_stays_monotonic() -> None:
    clock = FakeClock(10_000)
    hlc = HLC(1, clock=clock)
    a = hlc.now()
    clock.ms = 5_000  # NTP step back
    b = hlc.now()
    c = hlc.now()
    assert a < b < c
    assert ts_physical(c) == 10_000
    clock.ms = 10_001
    assert hlc.now() == make_ts(10_001, 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("tick"), st.integers(0, 2**40)),
            st.tuples(st.just("update"), st.integers(0, 2**56)),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_every_timestamp_exceeds_everything_seen(ops: list[tuple[str, int]]) -> None:
    clock = FakeClock(0)
    hlc = HLC(3, clock=clock)
    high = -1
    for kind, value in ops:
        if kind == "tick":
            clock.ms = value
            ts = hlc.now()
            assert ts >= value << LOGICAL_BITS
        else:
            ts = hlc.update(value)
            assert ts > value
        assert ts > high
        high = ts
        assert hlc.last == ts


def test_bad_arguments() -> None:
    for bad in (-1, 2**32, 1.0, "1", True):
        with pytest.raises(ConfigError) as info:
            HLC(bad)  # type: ignore[arg-type]
        assert info.value.field == "node_tag"
    with pytest.raises(ConfigError) as info:
        HLC(1, clock=42)  # type: ignore[arg-type]
    assert info.value.field == "clock"
    hlc = HLC(1, clock=FakeClock(1))
    for bad_remote in (-1, 2**63, 2**64, "5", 1.5):
        with pytest.raises(ValueError):
            hlc.update(bad_remote)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        HLC(1, clock=lambda: "soon").now()  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError):
        HLC(1, clock=lambda: 2**48).now()


def test_clock_exhaustion_raises() -> None:
    hlc = HLC(1, clock=FakeClock(0))
    hlc.update(MAX_TIMESTAMP - 2)
    with pytest.raises(OverflowError):
        hlc.now()


def test_version_order_is_lexicographic() -> None:
    assert version_newer(2, 0, 1, 9)
    assert not version_newer(1, 9, 2, 0)
    assert version_newer(5, 2, 5, 1)
    assert not version_newer(5, 1, 5, 2)
    assert not version_newer(5, 1, 5, 1)  # equal: the same write, not newer
    assert compare_versions(5, 1, 5, 1) == 0
    assert compare_versions(6, 0, 5, 7) == 1
    assert compare_versions(5, 0, 5, 7) == -1


versions = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))


@settings(max_examples=100)
@given(st.lists(versions, min_size=1, max_size=20))
def test_version_order_is_total_and_matches_tuples(vs: list[tuple[int, int]]) -> None:
    for a in vs:
        for b in vs:
            assert version_newer(*a, *b) == (a > b)
            assert compare_versions(*a, *b) == (a > b) - (a < b)
            # exactly one of: a newer, b newer, equal
            assert version_newer(*a, *b) + version_newer(*b, *a) + (a == b) == 1


def test_node_tag_is_low_32_bits_of_xxh3() -> None:
    for nid in ("node-1", "node-10", "ça-va", "f47ac10b-58cc-4372-a567-0e02b2c3d479"):
        assert node_tag(nid) == xxhash.xxh3_64_intdigest(nid.encode()) & 0xFFFFFFFF
        assert 0 <= node_tag(nid) < 2**32
    # pinned: a change here changes every stored version's tie-break
    assert node_tag("node-1") == 3645211525
    with pytest.raises(TypeError):
        node_tag(b"node-1")  # type: ignore[arg-type]
    assert HLC(node_tag("node-1")).tag == 3645211525
