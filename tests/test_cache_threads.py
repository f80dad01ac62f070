"""HyperCache under threads: a mixed-operation stress per policy, single flight, and
the hand-off points where the core lets other threads in.

Coordination is by Barrier and Event only; nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import hypercache.cache as cache_module
from hypercache.cache import POLICIES, HyperCache

ALL_POLICIES = sorted(POLICIES)
REPO = Path(__file__).resolve().parent.parent
WAIT = 30.0  # seconds: a bound on every wait, so a bug fails instead of hanging


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Let threads switch every few bytecodes, so operations interleave finely."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


class SlowKey:
    """A key compared in Python (so a probe can let another thread in); few hashes."""

    __slots__ = ("v",)

    def __init__(self, v: int) -> None:
        self.v = v

    def __hash__(self) -> int:
        return self.v % 3

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlowKey) and other.v == self.v

    def __repr__(self) -> str:
        return f"SlowKey({self.v})"


class ReentrantValue(tuple[int, int, int]):
    """A value whose release reads the cache again (Python code inside a release)."""

    __slots__ = ()
    cache: HyperCache[Any, Any] | None = None

    def __del__(self) -> None:
        c = ReentrantValue.cache
        if c is not None:
            c.get(self[0])


# --------------------------------------------------------------------------- stress

CAPACITY = 16
MAX_BYTES = 700  # about 11 three-item tuples: both bounds bite
THREADS = 8
OPS = 20_000


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_mixed_operations_stress(policy: str, fast_switching: None) -> None:
    cache: HyperCache[Any, Any] = HyperCache(CAPACITY, max_bytes=MAX_BYTES, policy=policy)
    keys: list[Any] = [*range(24), *(SlowKey(i) for i in range(8)), *(("t", i) for i in range(8))]
    index = {k: i for i, k in enumerate(keys)}
    assert len(index) == len(keys)
    written: list[set[tuple[int, int, int]]] = [set() for _ in range(THREADS)]
    errors: list[str] = []
    done = [0] * THREADS
    barrier = threading.Barrier(THREADS)
    ReentrantValue.cache = cache

    def check(k: Any, v: Any, where: str) -> None:
        if v is not None and v[0] != index[k]:
            errors.append(f"{where}: {k!r} -> {v!r}")

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        mine = written[tid]

        def value(i: int, seq: int) -> tuple[int, int, int]:
            v = (i, tid, seq)
            mine.add(v)
            return ReentrantValue(v) if seq % 7 == 0 else v

        try:
            barrier.wait(WAIT)
            for seq in range(OPS):
                i = rng.randrange(len(keys))
                k = keys[i]
                r = rng.random()
                if r < 0.30:
                    check(k, cache.get(k), "get")
                elif r < 0.52:
                    cache.set(k, value(i, seq), rng.choice((None, None, 0.002, 0.02)))
                elif r < 0.60:
                    cache.delete(k)
                elif r < 0.67:
                    many = [keys[j] for j in rng.sample(range(len(keys)), 4)]
                    for kk, vv in cache.get_many(many).items():
                        check(kk, vv, "get_many")
                elif r < 0.73:
                    j = rng.randrange(len(keys))
                    pairs = [(k, value(i, seq)), (keys[j], value(j, seq))]
                    cache.set_many(pairs, ttl=rng.choice((None, 0.003)))
                elif r < 0.77:
                    cache.delete_many([k, keys[(i + 1) % len(keys)]])
                elif r < 0.82:
                    cache.expire(k, rng.choice((None, 0.001, 10.0)))
                elif r < 0.86:
                    _ = k in cache
                elif r < 0.90:
                    check(k, cache.get_or_set(k, functools.partial(value, i, seq)), "gos")
                elif r < 0.93:
                    cache.sweep()
                elif r < 0.96:
                    for kk, vv in cache.items():
                        check(kk, vv, "items")
                    for kk in cache.keys():  # noqa: SIM118 -- keys() is under test
                        if kk not in index:
                            errors.append(f"keys: {kk!r}")
                elif r < 0.965:
                    cache.clear()
                else:
                    try:
                        left = cache.ttl(k)
                    except KeyError:
                        pass
                    else:
                        if left is not None and not 0 <= left <= 10.0:
                            errors.append(f"ttl {left}")
                done[tid] += 1
        except BaseException as exc:
            errors.append(f"thread {tid}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 4)
    finally:
        ReentrantValue.cache = None
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:10]
    assert done == [OPS] * THREADS

    st = cache.stats()
    assert st.evictions > 0 and st.expirations > 0 and st.hits > 0
    assert st.size == len(cache) <= CAPACITY
    assert st.bytes <= MAX_BYTES
    everything = set().union(*written)
    items = cache.items()
    assert len({index[k] for k, _ in items}) == len(items)
    for k, v in items:
        assert v[0] == index[k]
        assert tuple(v) in everything, f"{k!r} holds {v!r}, which no thread wrote"
    cache.sweep()
    assert cache.stats().bytes == sum(v.__sizeof__() for _, v in cache.items())
    cache.clear()
    assert len(cache) == 0


# --------------------------------------------------------------------------- single flight


class Followers:
    """Counts callers that joined a flight (cache._Flight.wait) instead of leading it."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.lock = threading.Lock()
        self.all_waiting = threading.Event()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        outer = self

        class CountingFlight(cache_module._Flight):
            __slots__ = ()

            def wait(self) -> Any:
                with outer.lock:
                    outer.count += 1
                    if outer.count == outer.expected:
                        outer.all_waiting.set()
                return super().wait()

        monkeypatch.setattr(cache_module, "_Flight", CountingFlight)


def run_concurrently(n: int, call: Callable[[], Any]) -> tuple[list[Any], list[BaseException]]:
    barrier = threading.Barrier(n)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait(WAIT)
        try:
            r = call()
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a caller is stuck"
    return results, errors


@pytest.mark.parametrize("policy", ["lru", "tinylfu"])
def test_get_or_set_stampede_runs_factory_once(
    policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 16
    followers = Followers(n - 1)
    followers.install(monkeypatch)
    cache: HyperCache[str, object] = HyperCache(100, policy=policy)
    calls = 0

    def factory() -> object:
        nonlocal calls
        calls += 1
        # Hold the flight open until every other caller has joined it.
        assert followers.all_waiting.wait(WAIT), f"only {followers.count} followers joined"
        return object()

    results, errors = run_concurrently(n, lambda: cache.get_or_set("hot", factory, ttl=60))
    assert not errors
    assert calls == 1
    assert len(results) == n
    assert all(r is results[0] for r in results)
    assert cache.get("hot") is results[0]
    st = cache.stats()
    assert (st.sets, st.misses) == (1, n)


def test_get_or_set_stampede_error_reaches_all_and_is_not_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 16
    followers = Followers(n - 1)
    followers.install(monkeypatch)
    cache: HyperCache[str, int] = HyperCache(100)
    calls = 0

    class FactoryError(Exception):
        pass

    def failing() -> int:
        nonlocal calls
        calls += 1
        assert followers.all_waiting.wait(WAIT)
        raise FactoryError("backend down")

    results, errors = run_concurrently(n, lambda: cache.get_or_set("k", failing))
    assert calls == 1
    assert results == []
    assert len(errors) == n
    assert all(isinstance(e, FactoryError) for e in errors)
    assert "k" not in cache
    assert cache.stats().sets == 0
    # Not cached: the next call computes again.
    assert cache.get_or_set("k", lambda: 42) == 42
    assert cache.get("k") == 42


def test_get_or_set_distinct_keys_do_not_wait_for_each_other() -> None:
    cache: HyperCache[str, str] = HyperCache()
    a_started = threading.Event()
    b_done = threading.Event()

    def factory_a() -> str:
        a_started.set()
        # Only returns once b's flight has completed: a global lock would deadlock.
        assert b_done.wait(WAIT), "another key's flight waited for this one"
        return "a"

    def factory_b() -> str:
        return "b"

    ta = threading.Thread(target=lambda: cache.get_or_set("a", factory_a))
    ta.start()
    assert a_started.wait(WAIT)
    assert cache.get_or_set("b", factory_b) == "b"
    b_done.set()
    ta.join(WAIT)
    assert not ta.is_alive()
    assert cache.get("a") == "a"


def test_get_or_set_after_flight_uses_stored_value() -> None:
    # Many rounds of racing callers: the factory runs once per round.
    cache: HyperCache[int, int] = HyperCache()
    counts: dict[int, int] = {}
    lock = threading.Lock()

    def factory(r: int) -> int:
        with lock:
            counts[r] = counts.get(r, 0) + 1
        return r

    for r in range(30):
        results, errors = run_concurrently(
            8, functools.partial(cache.get_or_set, r, functools.partial(factory, r))
        )
        assert not errors
        assert results == [r] * 8
    assert counts == {r: 1 for r in range(30)}


# --------------------------------------------------------------------------- re-entered flights

# A call that re-enters its own flight must finish (or fail clearly), never hang.
# Each runs in a daemon thread given a short join: a hang fails the test without
# hanging the suite.

HANG = 1.5  # seconds a call may take before we call it a deadlock


def _runs_to_completion(fn: Any) -> tuple[bool, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # reported to the test
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG)
    return not t.is_alive(), out


def test_get_or_set_factory_reentering_same_key_does_not_deadlock() -> None:
    # The leader waits on its own flight: threading.Event.wait() forever.
    # Expected: a clear error (or the nested call computing), never a hang.
    c: HyperCache[str, int] = HyperCache(16)

    def factory() -> int:
        return c.get_or_set("k", lambda: 1) + 1

    finished, _ = _runs_to_completion(lambda: c.get_or_set("k", factory))
    assert finished, "get_or_set deadlocked on a re-entrant call for its own key"


def test_async_memoize_reentering_same_args_does_not_deadlock() -> None:
    c: HyperCache[Any, Any] = HyperCache(16)
    depth = [0]

    @c.memoize()
    async def f(x: int) -> int:
        depth[0] += 1
        if depth[0] == 1:
            return await f(x) + 1
        return x

    finished, _ = _runs_to_completion(lambda: asyncio.run(asyncio.wait_for(f(1), 30)))
    assert finished, "async memoize awaited its own future"


# --------------------------------------------------------------------------- hand-off points

# A thread in ``delete`` compares keys with a Python ``__eq__``: another thread
# runs meanwhile. That one sweeps 256 expired entries, filling the stack of
# references waiting for release, and stops in the finalizer of the first one
# it releases. Then the deleter goes on and drops its entry on that stack. It
# must have room: glibc's debugging malloc (if present) aborts on a write past
# the end of the block.
PENDING_RACE = textwrap.dedent(
    """
    import threading
    from hypercache.cache import HyperCache

    WAIT = 30
    now = [1000.0]
    cache = HyperCache(timer=lambda: now[0])
    in_eq, go_eq = threading.Event(), threading.Event()
    in_del, go_del = threading.Event(), threading.Event()

    class Key:
        block = False
        def __init__(self, v):
            self.v = v
        def __hash__(self):
            return 99
        def __eq__(self, other):
            if Key.block and threading.current_thread().name == "deleter":
                Key.block = False
                in_eq.set()
                assert go_eq.wait(WAIT)
            return isinstance(other, Key) and other.v == self.v

    class Blocker:
        armed = False
        def __del__(self):
            if Blocker.armed and threading.current_thread().name == "sweeper":
                Blocker.armed = False
                in_del.set()
                assert go_del.wait(WAIT)

    cache.set(Key(1), "target")
    for i in range(300):
        cache.set(("short", i), Blocker(), ttl=1)
    now[0] += 5
    Blocker.armed = Key.block = True

    failures = []

    def delete():
        try:
            assert cache.delete(Key(1)) is True
        except BaseException as exc:
            failures.append(exc)

    def sweep():
        try:
            assert in_eq.wait(WAIT)
            assert cache.sweep() == 300
        except BaseException as exc:
            failures.append(exc)

    d = threading.Thread(target=delete, name="deleter")
    s = threading.Thread(target=sweep, name="sweeper")
    d.start()
    s.start()
    assert in_del.wait(WAIT)
    go_eq.set()
    d.join(WAIT)
    go_del.set()
    s.join(WAIT)
    assert not failures, failures
    assert len(cache) == 0
    del cache
    print("ok")
    """
)


def _debug_malloc_env() -> dict[str, str]:
    env = dict(os.environ)
    for lib in (
        "/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0",
        "/usr/lib/aarch64-linux-gnu/libc_malloc_debug.so.0",
        "/lib64/libc_malloc_debug.so.0",
    ):
        if os.path.exists(lib):
            env["LD_PRELOAD"] = lib
            env["MALLOC_CHECK_"] = "3"
            break
    return env


def test_delete_keeps_its_pending_room_while_other_threads_run() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PENDING_RACE],
        cwd=REPO,
        env=_debug_malloc_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (
        f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr[-2000:]}"
    )


def test_key_eq_lets_another_thread_mutate_mid_probe() -> None:
    # A thread blocks inside a key's __eq__ during get(); another thread
    # deletes, inserts and clears meanwhile. The probe must start again and
    # answer from the table as it is now.
    cache: HyperCache[Any, Any] = HyperCache(8)
    in_eq, go_eq = threading.Event(), threading.Event()

    class Key(SlowKey):
        __slots__ = ()
        block = False

        def __eq__(self, other: object) -> bool:
            if Key.block and threading.current_thread().name == "reader":
                Key.block = False
                in_eq.set()
                assert go_eq.wait(WAIT)
            return super().__eq__(other)

        __hash__ = SlowKey.__hash__

    cache.set(Key(0), "zero")
    cache.set(Key(3), "three")  # same hash as Key(0)
    got: list[Any] = []
    Key.block = True
    reader = threading.Thread(target=lambda: got.append(cache.get(Key(3))), name="reader")
    reader.start()
    assert in_eq.wait(WAIT)
    cache.delete(Key(0))
    cache.set(Key(3), "three again")
    for i in range(20):
        cache.set(("fill", i), i)
    cache.set(Key(3), "latest")
    go_eq.set()
    reader.join(WAIT)
    assert not reader.is_alive()
    assert got == ["latest"]
    assert len(cache) <= 8
