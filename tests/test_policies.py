"""Eviction policies on their own, through their Python drivers (``_insert``,
``_access``, ``_evict``, ...): exact eviction choices, structural consistency,
and a hypothesis state machine per policy against a plain model of live slots.

The drivers do not check slots, so every test keeps to the contract: slots below
the last ``_grow`` size, ``_insert`` of a free slot, the other calls on live ones.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from hypercache._core.arc import ARCPolicy
from hypercache._core.lfu import LFUPolicy
from hypercache._core.policy import ClockPolicy, FIFOPolicy, LRUPolicy, Policy
from hypercache._core.tinylfu import TinyLFUPolicy

ALL = [LRUPolicy, FIFOPolicy, ClockPolicy, LFUPolicy, ARCPolicy, TinyLFUPolicy]
NAMES: dict[type, str] = {
    LRUPolicy: "lru",
    FIFOPolicy: "fifo",
    ClockPolicy: "clock",
    LFUPolicy: "lfu",
    ARCPolicy: "arc",
    TinyLFUPolicy: "tinylfu",
}


def H(key: int) -> int:
    """A 32-bit key hash (an odd multiplier: distinct keys never collide)."""
    return (key * 0x9E3779B1) & 0xFFFFFFFF


def fresh(cls: type, limit: int = 0, cap: int = 16) -> Any:
    p = cls(limit)
    p._grow(cap)
    return p


def drain(p: Any) -> list[int]:
    out = []
    while (s := p._evict()) is not None:
        out.append(s)
        assert len(out) <= 1 << 16, "evict never ran dry"
    return out


class Cache:
    """A minimal core: key -> slot, free slots, room made before each insert
    (as ``cachecore`` does), misses reported before the insert."""

    def __init__(self, p: Any, capacity: int) -> None:
        self.p = p
        self.capacity = capacity
        p._grow(capacity + 1)
        self.slot_of: dict[int, int] = {}
        self.key_of: dict[int, int] = {}
        self.free = list(range(capacity, -1, -1))
        self.evicted: list[int] = []  # keys, in order

    def get(self, key: int) -> bool:
        slot = self.slot_of.get(key)
        if slot is None:
            self.p._miss(H(key))
            return False
        self.p._access(slot, H(key))
        return True

    def set(self, key: int) -> None:
        slot = self.slot_of.get(key)
        if slot is not None:
            self.p._update(slot, H(key))
            return
        while len(self.p) >= self.capacity:
            victim = self.p._evict()
            gone = self.key_of.pop(victim)
            del self.slot_of[gone]
            self.free.append(victim)
            self.evicted.append(gone)
        slot = self.free.pop()
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.p._insert(slot, H(key))

    def request(self, key: int) -> bool:
        """Read-through: get, and set on a miss."""
        if self.get(key):
            return True
        self.set(key)
        return False


# ---- every policy -------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
def test_name(cls: type) -> None:
    assert cls().name == NAMES[cls]


@pytest.mark.parametrize("cls", ALL)
def test_limit_out_of_range(cls: type) -> None:
    with pytest.raises(ValueError):
        cls(-1)
    with pytest.raises((ValueError, OverflowError)):
        cls(2**32)


@pytest.mark.parametrize("cls", ALL)
def test_evict_on_empty_returns_none(cls: type) -> None:
    assert cls()._evict() is None  # never grown
    p = fresh(cls, 4)
    assert p._evict() is None
    p._insert(3, H(3))
    assert p._evict() == 3
    assert p._evict() is None
    assert len(p) == 0


@pytest.mark.parametrize("cls", ALL)
def test_clear_forgets_everything(cls: type) -> None:
    p = fresh(cls, 8)
    for s in range(8):
        p._insert(s, H(s))
    p._access(2, H(2))
    for _ in range(3):
        p._evict()
    p._clear()
    assert len(p) == 0
    assert p._evict() is None
    # Usable again, with the same slots.
    for s in range(8):
        p._insert(s, H(100 + s))
    assert sorted(drain(p)) == list(range(8))


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("limit", [0, 10])
def test_remove_arbitrary_slots_keeps_structures(cls: type, limit: int) -> None:
    rnd = random.Random(7)
    p = fresh(cls, limit, 64)
    live: set[int] = set()
    for s in range(64):
        p._insert(s, H(s))
        live.add(s)
        if rnd.random() < 0.5:
            p._access(rnd.choice(sorted(live)), 0)
    for s in rnd.sample(sorted(live), 40):
        p._remove(s)
        live.discard(s)
    for _ in range(5):
        s = p._evict()
        assert s in live
        live.discard(s)
    assert len(p) == len(live)
    out = drain(p)
    assert sorted(out) == sorted(live)


@pytest.mark.parametrize("cls", ALL)
def test_remove_leaves_policy_consistent_for_reuse(cls: type) -> None:
    # Head, tail and middle of a list, then the slots come back.
    p = fresh(cls, 5, 5)
    for s in range(5):
        p._insert(s, H(s))
    for s in (0, 4, 2):
        p._remove(s)
    assert len(p) == 2
    for s in (0, 4, 2):
        p._insert(s, H(50 + s))
    assert sorted(drain(p)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("cls", ALL)
def test_grow_after_inserts_preserves_state(cls: type) -> None:
    p = fresh(cls, 0, 4)
    for s in range(4):
        p._insert(s, H(s))
    p._access(1, H(1))
    p._grow(2)  # never shrinks
    p._grow(64)
    assert len(p) == 4
    for s in range(4, 40):
        p._insert(s, H(s))
    p._access(1, H(1))
    assert len(p) == 40
    assert sorted(drain(p)) == list(range(40))


def test_grow_keeps_lru_order() -> None:
    p = fresh(LRUPolicy, 0, 3)
    for s in (0, 1, 2):
        p._insert(s, H(s))
    p._access(0, H(0))
    p._grow(10)
    p._insert(7, H(7))
    assert drain(p) == [1, 2, 0, 7]


# ---- exact order against a model: LRU, FIFO, LFU ------------------------------


def _model_victim(cls: type, meta: dict[int, list[int]]) -> int:
    # meta[slot] = [frequency, time of last touch, time of insert]
    if cls is LRUPolicy:
        return min(meta, key=lambda s: meta[s][1])
    if cls is FIFOPolicy:
        return min(meta, key=lambda s: meta[s][2])
    # LFU: fewest accesses, then least recently touched.
    return min(meta, key=lambda s: (meta[s][0], meta[s][1]))


@pytest.mark.parametrize("cls", [LRUPolicy, FIFOPolicy, LFUPolicy])
@pytest.mark.parametrize("seed", range(5))
def test_exact_victims_against_model(cls: type, seed: int) -> None:
    rnd = random.Random(seed)
    p = fresh(cls, 0, 32)
    meta: dict[int, list[int]] = {}
    for t in range(3000):
        free = [s for s in range(32) if s not in meta]
        op = rnd.random()
        if free and op < 0.35:
            s = rnd.choice(free)
            p._insert(s, H(s))
            meta[s] = [1, t, t]
        elif meta and op < 0.8:
            s = rnd.choice(sorted(meta))
            (p._access if op < 0.7 else p._update)(s, H(s))
            meta[s][0] += 1
            meta[s][1] = t
        elif meta and op < 0.85:
            s = rnd.choice(sorted(meta))
            p._remove(s)
            del meta[s]
        elif meta:
            victim = _model_victim(cls, meta)
            assert p._evict() == victim
            del meta[victim]
        assert len(p) == len(meta)
    assert sorted(drain(p)) == sorted(meta)


# ---- LFU ----------------------------------------------------------------------


def test_lfu_evicts_least_frequent() -> None:
    p = fresh(LFUPolicy)
    for s in (0, 1, 2):
        p._insert(s, H(s))
    for _ in range(2):
        p._access(0, H(0))
    p._access(1, H(1))
    assert [p._freq(s) for s in (0, 1, 2)] == [3, 2, 1]
    assert p._buckets() == [1, 2, 3]
    assert drain(p) == [2, 1, 0]


def test_lfu_ties_go_to_the_least_recently_used() -> None:
    p = fresh(LFUPolicy)
    for s in (0, 1, 2, 3):
        p._insert(s, H(s))
    p._access(2, H(2))
    p._access(1, H(1))  # 1 and 2 at frequency 2; 2 got there first
    p._access(3, H(3))
    assert drain(p) == [0, 2, 1, 3]


def test_lfu_update_counts_as_access_and_new_entries_start_at_one() -> None:
    p = fresh(LFUPolicy)
    p._insert(0, H(0))
    p._insert(1, H(1))
    p._update(0, H(0))
    assert (p._freq(0), p._freq(1)) == (2, 1)
    assert p._evict() == 1


def test_lfu_buckets_stay_few_and_sorted() -> None:
    rnd = random.Random(3)
    p = fresh(LFUPolicy, 0, 50)
    live: set[int] = set()
    for _ in range(5000):
        if len(live) < 50 and rnd.random() < 0.3:
            s = rnd.choice([s for s in range(50) if s not in live])
            p._insert(s, H(s))
            live.add(s)
        elif live and rnd.random() < 0.9:
            p._access(rnd.choice(sorted(live)), 0)
        elif live:
            live.discard(p._evict())
        buckets = p._buckets()
        assert buckets == sorted(set(buckets))  # strictly increasing
        assert len(buckets) <= len(live)  # no empty bucket survives
        assert (buckets[0] if buckets else 1) >= 1


# ---- ARC ----------------------------------------------------------------------


def test_arc_new_entries_go_to_t1_and_a_hit_moves_to_t2() -> None:
    p = fresh(ARCPolicy, 4, 4)
    for s in range(4):
        p._insert(s, H(s))
    assert p._sizes() == (4, 0, 0, 0)
    p._access(2, H(2))
    assert p._list_of(2) == 2
    p._access(2, H(2))  # a hit in T2 stays in T2
    assert p._sizes() == (3, 1, 0, 0)


def test_arc_evict_leaves_a_ghost_remove_does_not() -> None:
    p = fresh(ARCPolicy, 4, 4)
    for s in range(4):
        p._insert(s, H(s))
    p._access(3, H(3))
    assert p._evict() == 0  # T1 is above p = 0: its LRU end goes
    assert p._ghost(H(0)) == 1
    p._remove(1)
    assert p._ghost(H(1)) == 0
    assert p._sizes() == (1, 1, 1, 0)
    assert p._evict() == 2  # T1 still above p
    assert p._evict() == 3  # then T2, into B2
    assert p._ghost(H(3)) == 2


def test_arc_ghost_hits_adapt_p_and_enter_t2() -> None:
    p = fresh(ARCPolicy, 4, 8)
    a, b, c, d, e = (H(k) for k in range(5))
    for s, h in enumerate((a, b, c, d)):
        p._insert(s, h)
    p._access(2, c)
    p._access(3, d)  # T1 = [b, a], T2 = [d, c]
    assert p._evict() == 0  # a -> B1
    p._insert(4, e)
    assert p._evict() == 1  # b -> B1
    assert p._target() == 0
    p._insert(0, a)  # ghost hit in B1: T1 was too small
    assert p._target() == 1
    assert p._list_of(0) == 2
    assert p._ghost(a) == 0  # the ghost is consumed
    assert p._sizes() == (1, 3, 1, 0)
    assert p._evict() == 2  # |T1| = 1 = p: REPLACE takes T2's LRU end, c -> B2
    assert p._ghost(c) == 2
    p._insert(2, c)  # ghost hit in B2: T2 was too small
    assert p._target() == 0
    assert p._list_of(2) == 2


def test_arc_limit_zero_uses_the_live_count() -> None:
    p = fresh(ARCPolicy, 0, 8)
    for s in range(8):
        p._insert(s, H(s))
    for _ in range(4):
        p._evict()
    t1, t2, b1, b2 = p._sizes()
    # c is now 4: |T1| + |B1| <= 4 and everything <= 8.
    assert t1 + b1 <= 4
    assert t1 + t2 + b1 + b2 <= 8


def _arc_bounds_hold(p: Any, limit: int) -> None:
    t1, t2, b1, b2 = p._sizes()
    c = limit or len(p)
    assert t1 + t2 == len(p)
    assert t1 + b1 <= max(c, t1)  # T1 alone may exceed c just before an eviction
    assert t1 + t2 + b1 + b2 <= max(2 * c, t1 + t2)
    assert 0 <= p._target() <= max(c, 0)


@pytest.mark.parametrize("limit", [0, 20])
def test_arc_ghost_bounds_under_load(limit: int) -> None:
    rnd = random.Random(11)
    cache = Cache(ARCPolicy(limit), 20)
    for _ in range(20000):
        k = int(rnd.paretovariate(1.0)) % 200 if rnd.random() < 0.8 else rnd.randrange(1000)
        cache.request(k)
        _arc_bounds_hold(cache.p, limit)
    _, t2, _, b2 = cache.p._sizes()
    assert t2 > 0 and b2 > 0  # the load exercised T2 and B2


# ---- TinyLFU ------------------------------------------------------------------


def test_tinylfu_rejects_one_hit_wonders() -> None:
    cache = Cache(TinyLFUPolicy(100), 100)
    for k in range(100):
        cache.request(k)
    for _ in range(5):
        for k in range(100):
            assert cache.request(k)
    main = {k for k in range(100) if cache.p._segment(cache.slot_of[k]) != 1}
    assert len(main) >= 97
    for k in range(1000, 1500):  # each seen once
        cache.request(k)
    assert main <= set(cache.slot_of)  # no frequent key in main was displaced
    assert set(cache.evicted) - set(range(1000, 1500)) <= set(range(100)) - main


def test_tinylfu_admits_a_frequent_candidate() -> None:
    cache = Cache(TinyLFUPolicy(20), 20)
    for k in range(20):
        cache.request(k)  # cold: seen once each
    y = 500
    for _ in range(8):
        assert not cache.get(y)  # misses are recorded
    cache.set(y)
    for k in range(1000, 1010):  # push one-hit wonders through the window
        cache.request(k)
        assert y in cache.slot_of
    assert cache.p._segment(cache.slot_of[y]) == 2  # admitted to probation
    assert any(k < 20 for k in cache.evicted)  # at the expense of a cold entry


def test_tinylfu_scan_keeps_the_hot_set() -> None:
    def run(p: Any) -> int:
        cache = Cache(p, 100)
        for k in range(100):
            cache.request(k)
        for _ in range(10):
            for k in range(50):
                cache.request(k)
        for k in range(10_000, 12_000):  # a scan
            cache.request(k)
        return sum(k in cache.slot_of for k in range(50))

    assert run(TinyLFUPolicy(100)) == 50
    assert run(LRUPolicy(100)) == 0  # the property is not a given


def test_tinylfu_probation_hit_promotes_and_protected_overflow_demotes() -> None:
    cache = Cache(TinyLFUPolicy(20), 20)
    for k in range(20):
        cache.request(k)
    window, probation, protected = cache.p._sizes()
    assert (window + probation, protected) == (20, 0)
    in_probation = [k for k in range(20) if cache.p._segment(cache.slot_of[k]) == 2]
    for k in in_probation:
        cache.get(k)
    w, pr, pt = cache.p._sizes()
    # Protected holds 80% of main's share (19 entries here): 15.
    assert pt == 15
    assert w + pr + pt == 20
    assert all(cache.p._segment(cache.slot_of[k]) == 3 for k in in_probation[-15:])
    assert all(cache.p._segment(cache.slot_of[k]) == 2 for k in in_probation[:-15])


def test_tinylfu_frequency_sketch_doorkeeper_and_aging() -> None:
    p = fresh(TinyLFUPolicy, 64, 65)
    assert p._sketch_words() == 64
    h = H(1)
    assert p._frequency(h) == 0
    p._miss(h)
    assert p._frequency(h) == 1  # the doorkeeper took the first sighting
    p._miss(h)
    p._miss(h)
    assert p._frequency(h) == 3
    for _ in range(30):
        p._miss(h)
    assert p._frequency(h) == 16  # 15 in the counters, saturated, + doorkeeper
    # 10 * 64 sketch increments age everything: counters halve, doorkeeper
    # clears. Each other key below is seen twice: at least one increment.
    pairs = 0
    for k in range(1000, 3000):
        p._miss(H(k))
        p._miss(H(k))
        pairs += 1
        if p._frequency(h) < 16:
            break
    assert pairs <= 640
    assert 7 <= p._frequency(h) <= 8


def test_tinylfu_read_through_miss_and_insert_count_once() -> None:
    p = fresh(TinyLFUPolicy, 16, 17)
    h = H(5)
    p._miss(h)
    p._insert(0, h)
    assert p._frequency(h) == 1
    p._access(0, h)
    assert p._frequency(h) == 2
    p._insert(1, H(6))  # an insert without a miss is recorded by itself
    assert p._frequency(H(6)) == 1


def test_tinylfu_sketch_follows_capacity() -> None:
    p = fresh(TinyLFUPolicy, 0, 100)
    assert p._sketch_words() == 128
    p._grow(1000)
    assert p._sketch_words() == 1024
    p = fresh(TinyLFUPolicy, 3000, 8)
    assert p._sketch_words() == 4096  # sized for the limit at once


def test_tinylfu_window_grows_when_recency_pays() -> None:
    # Every key comes back once, 8 new keys later: a 1% window (one entry)
    # loses all of them, a window of 10 catches them. The ghost ring of
    # rejected candidates sees it and the window grows.
    cache = Cache(TinyLFUPolicy(200), 200)
    hits = []
    for i in range(20_000):
        cache.request(i)
        hits.append(cache.request(i - 8) if i >= 8 else True)
        if i == 1000:
            assert cache.p._window_target() == 1
            assert sum(hits[-500:]) <= 5
    assert cache.p._window_target() >= 10
    assert sum(hits[-2000:]) >= 1900


def test_tinylfu_window_stays_small_on_a_skewed_load() -> None:
    rnd = random.Random(5)
    keys = list(range(5000))
    weights = [1 / (k + 1) for k in keys]
    cache = Cache(TinyLFUPolicy(200), 200)
    for k in rnd.choices(keys, weights, k=60_000):
        cache.request(k)
    assert cache.p._window_target() <= 2 + 200 // 16


# ---- stateful: every policy against a model of live slots ----------------------


class PolicyMachine(RuleBasedStateMachine):
    """Random protocol calls; the model is the set of live slots."""

    cls: ClassVar[type]
    limit: ClassVar[int]

    def __init__(self) -> None:
        super().__init__()
        self.cap = 6
        self.p = self.cls(self.limit)
        self.p._grow(self.cap)
        self.live: dict[int, int] = {}

    hashes = st.one_of(st.integers(0, 15), st.integers(0, 2**32 - 1))

    def free(self) -> list[int]:
        return [s for s in range(self.cap) if s not in self.live]

    @precondition(lambda self: len(self.live) < self.cap)
    @rule(data=st.data(), h=hashes)
    def insert(self, data: Any, h: int) -> None:
        slot = data.draw(st.sampled_from(self.free()))
        self.p._insert(slot, h)
        self.live[slot] = h

    @rule(h=hashes)
    def set_new(self, h: int) -> None:
        # As the core does: make room first (when bounded), then store.
        bound = self.limit or self.cap
        while len(self.live) >= min(bound, self.cap):
            self.evict()
        self.insert_at(min(self.free()), h)

    def insert_at(self, slot: int, h: int) -> None:
        self.p._insert(slot, h)
        self.live[slot] = h

    @precondition(lambda self: self.live)
    @rule(data=st.data(), update=st.booleans())
    def access(self, data: Any, update: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(self.live)))
        (self.p._update if update else self.p._access)(slot, self.live[slot])

    @rule(h=hashes)
    def miss(self, h: int) -> None:
        self.p._miss(h)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def remove(self, data: Any) -> None:
        slot = data.draw(st.sampled_from(sorted(self.live)))
        self.p._remove(slot)
        del self.live[slot]

    @rule()
    def evict(self) -> None:
        slot = self.p._evict()
        if not self.live:
            assert slot is None
        else:
            assert slot in self.live, f"evicted {slot}, live {sorted(self.live)}"
            del self.live[slot]

    @rule(extra=st.integers(1, 6))
    def grow(self, extra: int) -> None:
        self.cap += extra
        self.p._grow(self.cap)

    @rule()
    def clear(self) -> None:
        self.p._clear()
        self.live.clear()

    @invariant()
    def counts_match(self) -> None:
        assert len(self.p) == len(self.live)

    @invariant()
    def structure(self) -> None:
        p = self.p
        if isinstance(p, ARCPolicy):
            _arc_bounds_hold(p, self.limit)
            assert all(p._list_of(s) in (1, 2) for s in self.live)
        elif isinstance(p, TinyLFUPolicy):
            assert sum(p._sizes()) == len(self.live)
            assert all(p._segment(s) in (1, 2, 3) for s in self.live)
        elif isinstance(p, LFUPolicy):
            buckets = p._buckets()
            assert buckets == sorted(set(buckets))
            assert len(buckets) <= len(self.live)
            assert all(p._freq(s) >= 1 for s in self.live)

    def teardown(self) -> None:
        # Draining evicts every live slot exactly once, then nothing.
        out = drain(self.p)
        assert sorted(out) == sorted(self.live)
        assert len(self.p) == 0


MACHINES = {}
for _cls in ALL:
    for _limit in (0, 4):
        _name = f"{_cls.__name__}Limit{_limit}"
        MACHINES[_name] = type(_name, (PolicyMachine,), {"cls": _cls, "limit": _limit})


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_stateful(name: str) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        MACHINES[name],
        settings=settings(max_examples=200, stateful_step_count=40, deadline=None),
    )


@pytest.mark.parametrize("cls", ALL)
def test_drivers_refuse_slots_outside_the_arrays(cls: type[Policy]) -> None:
    # The C methods trust the core; the Python drivers must not let a test write
    # outside the per-slot arrays.
    p = cls(4)
    p._grow(4)
    p._insert(3, 7)
    for bad in (4, -1, 2**40):
        with pytest.raises(IndexError):
            p._insert(bad, 7)
        with pytest.raises(IndexError):
            p._access(bad, 7)
        with pytest.raises(IndexError):
            p._remove(bad)
    assert len(p) == 1
    assert p._evict() == 3
