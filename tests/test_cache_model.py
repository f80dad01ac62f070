"""HyperCache against a plain-Python model, with hypothesis stateful testing.

One machine per policy and bound (items, or bytes only), with TTLs on an
injected clock; and one per policy whose keys are built again for every call
(``str`` of three widths, ``bytes``, a multi-digit ``int``): equal to the stored
key, never the same object, so every hit goes through the key comparison.
For every policy the model knows the latest value written for each key and
when it expires: the cache may have dropped a key, but whatever it
returns must be that latest value, and never after it expired. For ``lru`` and
``fifo`` the model is exact: it predicts which key each write evicts, so the
cache must hold exactly the model's live entries after every step.

The exact model's semantics (cachecore's ``_store``):

* an expired entry is gone from the moment it expires: a write never evicts a
  live entry while an expired one could be reclaimed instead, and writing an
  expired key again stores a new entry (the newest, for FIFO);
* room is made before the write, among the entries already there, so a write
  never evicts what it stores; when the victim is the old version of the key
  being overwritten, the write stores a new entry (the newest, for FIFO).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
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

from hypercache.cache import POLICIES, HyperCache

KEYS = st.integers(0, 4)
CAPACITY = 3
MAX_BYTES = 10
SIZES = st.integers(0, 6)
TTLS = st.sampled_from([0.5, 1.0, 2.5, 5.0])
STEPS = st.sampled_from([0.5, 1.0, 2.0, 4.0])
READS = st.sampled_from(["get", "getitem", "get_many", "contains", "ttl"])
# Clearing often would keep the cache nearly empty.
CHANGES = st.sampled_from(["delete", "delete", "expire", "expire", "sweep", "sweep", "clear"])
MISSING: Any = object()


def rebuilt_key(key: int) -> Any:
    """A new object for model key ``key`` on every call, equal to the last one."""
    n = str(key)
    if key == 0:
        return "".join(["k:", n])  # ASCII
    if key == 1:
        return "".join(["ключ:", n])  # 2-byte kind
    if key == 2:
        return "".join(["\U0001f511:", n])  # 4-byte kind
    if key == 3:
        return b"".join([b"k:", n.encode()])
    return (1 << 70) + int(n)


CANONICAL = {rebuilt_key(k): k for k in range(5)}


def value_size(value: tuple[int, int, int]) -> int:
    return value[2]


@dataclass
class Entry:
    value: tuple[int, int, int]
    expires: float | None

    @property
    def size(self) -> int:
        return self.value[2]


class CacheMachine(RuleBasedStateMachine):
    """Rules and invariants shared by every variant; subclasses set the class vars."""

    POLICY: ClassVar[str] = "lru"
    BY_BYTES: ClassVar[bool] = False
    REBUILT: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.exact = self.POLICY in ("lru", "fifo")
        if self.BY_BYTES:
            self.cache: HyperCache[int, Any] = HyperCache(
                max_bytes=MAX_BYTES, policy=self.POLICY, sizeof=value_size, timer=self.clock
            )
        else:
            self.cache = HyperCache(
                CAPACITY, policy=self.POLICY, sizeof=value_size, timer=self.clock
            )
        # Exact policies: the live entries, next victim first. Others: the
        # latest write of every key the cache may still hold.
        self.model: OrderedDict[int, Entry] = OrderedDict()
        self.version = 0
        self.hits = 0
        self.misses = 0

    def clock(self) -> float:
        return self.now

    def k(self, key: int) -> Any:
        """The key object to pass to the cache for model key ``key``."""
        return rebuilt_key(key) if self.REBUILT else key

    def canon(self, obj: Any) -> int:
        """The model key of a key object the cache holds."""
        return CANONICAL[obj] if self.REBUILT else int(obj)

    def items(self) -> list[tuple[int, Any]]:
        """The cache's items, keyed by model key."""
        return [(self.canon(k), v) for k, v in self.cache.items()]

    # ------------------------------------------------------------ model helpers

    def live(self, key: int) -> Entry | None:
        e = self.model.get(key)
        if e is None:
            return None
        if e.expires is not None and e.expires <= self.now:
            return None
        return e

    def purge_expired(self) -> None:
        for k in [k for k in self.model if self.live(k) is None]:
            del self.model[k]

    def over_after(self, key: int, size: int, present: bool) -> bool:
        # Would writing ``size`` bytes under ``key`` break the bound?
        if self.BY_BYTES:
            total = sum(e.size for k, e in self.model.items() if not (present and k == key))
            return total + size > MAX_BYTES
        return not present and len(self.model) + 1 > CAPACITY

    def expires_at(self, ttl: float | None) -> float | None:
        return None if ttl is None else self.now + ttl

    def forget(self, key: int) -> None:
        # Non-exact policies: the cache told us it does not hold ``key``.
        if not self.exact:
            self.model.pop(key, None)

    def check_read(self, key: int, got: Any) -> None:
        e = self.live(key)
        if got is MISSING:
            self.misses += 1
            if self.exact:
                assert e is None, f"key {key} should hold {e}, cache missed"
            self.forget(key)
            return
        self.hits += 1
        assert e is not None, f"key {key}: returned {got!r}, model has {self.model.get(key)}"
        assert got == e.value, f"key {key}: returned {got!r}, latest is {e.value!r}"
        if self.POLICY == "lru":
            self.model.move_to_end(key)

    # ------------------------------------------------------------------- rules

    @rule(key=KEYS, size=SIZES)
    def set(self, key: int, size: int) -> None:
        self.version += 1
        value = (key, self.version, size)
        self.cache.set(self.k(key), value)
        self.store(key, value, None)

    @rule(key=KEYS, size=SIZES, ttl=TTLS)
    def set_with_ttl(self, key: int, size: int, ttl: float) -> None:
        self.version += 1
        value = (key, self.version, size)
        self.cache.set(self.k(key), value, ttl)
        self.store(key, value, ttl)

    @precondition(lambda self: self.BY_BYTES)
    @rule(key=KEYS, extra=st.integers(1, 3))
    def set_too_large(self, key: int, extra: int) -> None:
        self.version += 1
        value = (key, self.version, MAX_BYTES + extra)
        try:
            self.cache.set(self.k(key), value)
        except ValueError:
            pass
        else:
            raise AssertionError("a value over max_bytes was accepted")

    @rule(key=KEYS, size=SIZES)
    def set_many(self, key: int, size: int) -> None:
        # Two keys in one call; applied in order, each atomically.
        other = (key + 1) % 5
        self.version += 1
        items = {key: (key, self.version, size), other: (other, self.version, 1)}
        self.cache.set_many({self.k(k): v for k, v in items.items()})
        for k, v in items.items():
            self.store(k, v, None)

    def store(self, key: int, value: tuple[int, int, int], ttl: float | None) -> None:
        entry = Entry(value, self.expires_at(ttl))
        if not self.exact:
            self.model[key] = entry
            return
        self.purge_expired()
        # Room is made before the write, among the entries already there.
        present = key in self.model
        while self.over_after(key, entry.size, present):
            victim = next(iter(self.model))
            del self.model[victim]
            if victim == key:
                present = False  # its old version went: the write is a new entry
        if present:
            self.model[key] = entry  # an overwrite keeps its place (FIFO)...
            if self.POLICY == "lru":
                self.model.move_to_end(key)  # ...or is a use (LRU)
        else:
            self.model[key] = entry  # a new entry is the newest

    @rule(key=KEYS, how=READS)
    def read(self, key: int, how: str) -> None:
        if how == "get":
            self.check_read(key, self.cache.get(self.k(key), MISSING))
        elif how == "getitem":
            try:
                got = self.cache[self.k(key)]
            except KeyError:
                got = MISSING
            self.check_read(key, got)
        elif how == "get_many":
            keys = [key, (key + 2) % 5]
            many = self.cache.get_many([self.k(k) for k in keys])
            assert set(many) <= {self.k(k) for k in keys}
            for k in keys:
                self.check_read(k, many.get(self.k(k), MISSING))
        elif how == "contains":
            self.contains(key)
        else:
            self.ttl(key)

    def contains(self, key: int) -> None:
        present = self.k(key) in self.cache
        if self.exact:
            assert present == (self.live(key) is not None)
        elif present:
            assert self.live(key) is not None
        else:
            self.forget(key)

    @rule(key=KEYS, how=CHANGES, ttl=st.none() | TTLS)
    def change(self, key: int, how: str, ttl: float | None) -> None:
        if how == "delete":
            self.delete(key)
        elif how == "expire":
            self.expire(key, ttl)
        elif how == "sweep":
            self.sweep()
        elif how == "clear":
            self.clear()

    def delete(self, key: int) -> None:
        removed = self.cache.delete(self.k(key))
        if self.exact:
            assert removed == (self.live(key) is not None)
        elif removed:
            assert self.live(key) is not None
        self.model.pop(key, None)

    def ttl(self, key: int) -> None:
        e = self.live(key)
        try:
            left = self.cache.ttl(self.k(key))
        except KeyError:
            if self.exact:
                assert e is None
            self.forget(key)
            return
        assert e is not None
        if e.expires is None:
            assert left is None
        else:
            assert left == pytest.approx(e.expires - self.now)

    def expire(self, key: int, ttl: float | None) -> None:
        e = self.live(key)
        ok = self.cache.expire(self.k(key), ttl)
        if self.exact:
            assert ok == (e is not None)
        if ok:
            assert e is not None
            e.expires = self.expires_at(ttl)
        else:
            self.forget(key)

    @rule(dt=STEPS)
    def advance_clock(self, dt: float) -> None:
        self.now += dt

    def sweep(self) -> None:
        self.cache.sweep()
        items = self.items()
        assert len(self.cache) == len(items)
        assert self.cache.stats().bytes == sum(v[2] for _, v in items)
        if self.exact:
            self.purge_expired()
            assert len(self.cache) == len(self.model)

    def clear(self) -> None:
        self.cache.clear()
        self.model.clear()
        assert len(self.cache) == 0
        assert self.cache.stats().bytes == 0

    # -------------------------------------------------------------- invariants

    @invariant()
    def bounds_and_stats(self) -> None:
        stats = self.cache.stats()
        assert stats.size == len(self.cache)
        if self.BY_BYTES:
            assert stats.bytes <= MAX_BYTES
        else:
            assert len(self.cache) <= CAPACITY
        assert (stats.hits, stats.misses) == (self.hits, self.misses)

    @invariant()
    def contents_agree(self) -> None:
        items = self.items()
        keys = [k for k, _ in items]
        assert len(keys) == len(set(keys))
        assert sorted(keys) == sorted(map(self.canon, self.cache.keys()))
        assert self.cache.stats().bytes >= sum(v[2] for _, v in items)
        for k, v in items:
            e = self.live(k)
            assert e is not None, f"cache holds {k}={v!r}, model has {self.model.get(k)}"
            assert v == e.value, f"cache holds {k}={v!r}, latest is {e.value!r}"
        if self.exact:
            live = {k: e.value for k in self.model if (e := self.live(k)) is not None}
            assert dict(items) == live


MODEL_SETTINGS = settings(max_examples=150, stateful_step_count=50, deadline=None, database=None)


def machine(policy: str, by_bytes: bool, rebuilt: bool = False) -> type[CacheMachine]:
    name = f"{policy.upper()}{'Bytes' if by_bytes else 'Items'}{'Rebuilt' if rebuilt else ''}"
    attrs = {"POLICY": policy, "BY_BYTES": by_bytes, "REBUILT": rebuilt}
    return type(name, (CacheMachine,), attrs)


VARIANTS = [(p, b, False) for p in sorted(POLICIES) for b in (False, True)]
VARIANTS += [(p, False, True) for p in sorted(POLICIES)]


@pytest.mark.parametrize(
    ("policy", "by_bytes", "rebuilt"),
    VARIANTS,
    ids=[f"{p}-{'bytes' if b else 'items'}{'-rebuilt' if r else ''}" for p, b, r in VARIANTS],
)
def test_cache_matches_model(policy: str, by_bytes: bool, rebuilt: bool) -> None:
    cls = machine(policy, by_bytes, rebuilt)
    cls.TestCase.settings = MODEL_SETTINGS
    cls.TestCase().runTest()
