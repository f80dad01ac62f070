"""HyperCache.memoize for plain and ``async def`` functions.

Async tests run each body under the default event loop and under uvloop. Tasks
are coordinated with asyncio.Event and with ``await asyncio.sleep(0)``, which
only yields: a task created before the yield has run up to its first await
when the yielding task resumes (the ready queue is FIFO in both loops).
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

import hypercache.cache as cache_module
from hypercache.cache import HyperCache

T = TypeVar("T")
WAIT = 30.0


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Runner = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Runner[Any]]:
    """Run a coroutine to completion on a fresh loop of the parametrized kind.

    Anything the loop reports to its exception handler (such as a future whose
    exception was never retrieved) fails the test.
    """
    factory = uvloop.new_event_loop if request.param == "uvloop" else None
    reported: list[dict[str, Any]] = []

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as r:
            r.get_loop().set_exception_handler(lambda _loop, ctx: reported.append(ctx))
            return r.run(coro)

    yield runner
    gc.collect()
    assert not reported, reported


async def yield_to_others() -> None:
    await asyncio.sleep(0)


# --------------------------------------------------------------------------- sync


def test_sync_caches_results() -> None:
    cache: HyperCache[Any, Any] = HyperCache(100)
    calls: list[tuple[Any, ...]] = []

    @cache.memoize()
    def f(x: int, y: int = 0) -> int:
        """Adds."""
        calls.append((x, y))
        return x + y

    assert f(1) == 1
    assert f(1) == 1
    assert f(2) == 2
    assert f(1, 2) == 3
    assert f(1, y=2) == 3  # positional and keyword are distinct calls
    assert f(1, y=2) == 3
    assert calls == [(1, 0), (2, 0), (1, 2), (1, 2)]
    assert len(cache) == 4
    assert f.__name__ == "f" and f.__doc__ == "Adds."
    assert f.__wrapped__(5) == 5  # type: ignore[attr-defined]


def test_sync_kwargs_order_is_irrelevant() -> None:
    cache: HyperCache[Any, Any] = HyperCache()
    calls = 0

    @cache.memoize()
    def f(**kw: int) -> int:
        nonlocal calls
        calls += 1
        return sum(kw.values())

    assert f(a=1, b=2, c=3) == 6
    assert f(c=3, a=1, b=2) == 6
    assert f(b=2, c=3, a=1) == 6
    assert calls == 1
    assert f.cache_key(a=1, b=2) == f.cache_key(b=2, a=1)  # type: ignore[attr-defined]
    assert f.cache_key(a=1, b=2) != f.cache_key(a=2, b=1)  # type: ignore[attr-defined]


def test_sync_none_result_is_cached() -> None:
    cache: HyperCache[Any, Any] = HyperCache()
    calls = 0

    @cache.memoize()
    def f() -> None:
        nonlocal calls
        calls += 1

    f()
    f()
    assert calls == 1


def test_sync_counts_one_lookup_per_call() -> None:
    cache: HyperCache[Any, Any] = HyperCache()

    @cache.memoize()
    def f(x: int) -> int:
        return x

    f(1)
    f(1)
    f(2)
    st = cache.stats()
    assert (st.hits, st.misses, st.sets) == (1, 2, 2)


def test_functions_do_not_share_entries() -> None:
    cache: HyperCache[Any, Any] = HyperCache()

    @cache.memoize()
    def double(x: int) -> int:
        return 2 * x

    @cache.memoize()
    def triple(x: int) -> int:
        return 3 * x

    assert double(5) == 10
    assert triple(5) == 15
    assert double(5) == 10
    assert len(cache) == 2


def test_custom_key_function() -> None:
    cache: HyperCache[Any, Any] = HyperCache()
    calls = 0

    def by_user(user: str, *, request_id: int = 0) -> str:
        return user.lower()

    @cache.memoize(key=by_user)
    def profile(user: str, *, request_id: int = 0) -> str:
        nonlocal calls
        calls += 1
        return f"profile of {user}"

    assert profile("Ann", request_id=1) == "profile of Ann"
    assert profile("ANN", request_id=2) == "profile of Ann"
    assert profile("bob") == "profile of bob"
    assert calls == 2
    assert profile.cache_key("ann") == profile.cache_key("ANN", request_id=9)  # type: ignore[attr-defined]
    assert profile.invalidate("aNN") is True  # type: ignore[attr-defined]
    assert profile("Ann") == "profile of Ann"
    assert calls == 3


def test_ttl_expiry_via_timer() -> None:
    clock = Clock()
    cache: HyperCache[Any, Any] = HyperCache(timer=clock)
    calls = 0

    @cache.memoize(ttl=5)
    def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x * calls

    assert f(1) == 1
    assert cache.ttl(f.cache_key(1)) == 5.0  # type: ignore[attr-defined]
    clock.advance(4.5)
    assert f(1) == 1  # a hit does not extend the TTL
    clock.advance(0.5)
    assert f(1) == 2
    assert calls == 2


def test_default_ttl_applies_without_memoize_ttl() -> None:
    clock = Clock()
    cache: HyperCache[Any, Any] = HyperCache(timer=clock, default_ttl=3)

    @cache.memoize()
    def f(x: int) -> int:
        return x

    f(1)
    assert cache.ttl(f.cache_key(1)) == 3.0  # type: ignore[attr-defined]


def test_sync_exceptions_are_not_cached() -> None:
    cache: HyperCache[Any, Any] = HyperCache()
    calls = 0

    @cache.memoize()
    def flaky(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("first call fails")
        return x

    with pytest.raises(ConnectionError):
        flaky(7)
    assert flaky.cache_key(7) not in cache  # type: ignore[attr-defined]
    assert flaky(7) == 7
    assert flaky(7) == 7
    assert calls == 2


def test_invalidate_and_cache_key() -> None:
    cache: HyperCache[Any, Any] = HyperCache()
    calls = 0

    @cache.memoize()
    def f(x: int, *, scale: int = 1) -> int:
        nonlocal calls
        calls += 1
        return x * scale

    f(2, scale=3)
    key = f.cache_key(2, scale=3)  # type: ignore[attr-defined]
    assert key in cache
    assert cache.get(key) == 6
    assert f.cache_key(2) != key  # type: ignore[attr-defined]
    assert f.invalidate(2) is False  # type: ignore[attr-defined]
    assert f.invalidate(2, scale=3) is True  # type: ignore[attr-defined]
    assert f.invalidate(2, scale=3) is False  # type: ignore[attr-defined]
    assert key not in cache
    assert f(2, scale=3) == 6
    assert calls == 2


def test_unhashable_arguments_raise() -> None:
    cache: HyperCache[Any, Any] = HyperCache()

    @cache.memoize()
    def f(x: Any) -> int:
        return 1

    with pytest.raises(TypeError):
        f([1, 2])
    with pytest.raises(TypeError):
        f(x={"a": 1})
    assert len(cache) == 0


def test_memoized_entries_are_evicted_like_any_other() -> None:
    cache: HyperCache[Any, Any] = HyperCache(2)
    calls = 0

    @cache.memoize()
    def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    for x in (1, 2, 3, 1):
        f(x)
    assert calls == 4
    assert len(cache) == 2


def _install_follower_counter(monkeypatch: pytest.MonkeyPatch, expected: int) -> threading.Event:
    """An Event set once ``expected`` callers have joined a flight as followers."""
    joined = 0
    lock = threading.Lock()
    all_joined = threading.Event()

    class CountingFlight(cache_module._Flight):
        __slots__ = ()

        def wait(self) -> Any:
            nonlocal joined
            with lock:
                joined += 1
                if joined == expected:
                    all_joined.set()
            return super().wait()

    monkeypatch.setattr(cache_module, "_Flight", CountingFlight)
    return all_joined


@pytest.mark.parametrize("fails", [False, True], ids=["result", "error"])
def test_sync_concurrent_callers_share_one_computation(
    monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    n = 16
    all_joined = _install_follower_counter(monkeypatch, n - 1)
    cache: HyperCache[Any, Any] = HyperCache()
    calls = 0

    @cache.memoize()
    def slow(x: int) -> object:
        nonlocal calls
        calls += 1
        assert all_joined.wait(WAIT), "not every caller joined the flight"
        if fails:
            raise LookupError("backend")
        return object()

    barrier = threading.Barrier(n)
    results: list[Any] = []
    lock = threading.Lock()

    def caller() -> None:
        barrier.wait(WAIT)
        try:
            r: Any = slow(1)
        except LookupError as exc:
            r = exc
        with lock:
            results.append(r)

    threads = [threading.Thread(target=caller) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert calls == 1
    assert len(results) == n
    if fails:
        assert all(isinstance(r, LookupError) for r in results)
        assert len(cache) == 0
    else:
        assert all(r is results[0] for r in results)
        assert slow(1) is results[0]
        assert calls == 1


def test_memoized_class_factory_works() -> None:
    c: HyperCache[Any, Any] = HyperCache(16)

    @c.memoize()
    def make(name: str) -> type:
        return type(name, (), {})

    assert make("A") is make("A")


def test_memoize_result_too_large_to_cache_is_still_returned() -> None:
    # memoize/get_or_set store the result with set(), which raises ValueError
    # for a value over max_bytes: the decorated function then fails for
    # arguments it computed fine, and the result is thrown away.
    c: HyperCache[Any, Any] = HyperCache(max_bytes=10)

    @c.memoize()
    def payload(n: int) -> bytes:
        return b"x" * n

    assert payload(100) == b"x" * 100
    assert c.get_or_set("big", lambda: b"y" * 100) == b"y" * 100


# --------------------------------------------------------------------------- async


def test_async_caches_results(run: Runner[Any]) -> None:
    cache: HyperCache[Any, Any] = HyperCache()
    calls = 0

    @cache.memoize()
    async def f(x: int, *, y: int = 0) -> int:
        """Adds, later."""
        nonlocal calls
        calls += 1
        await yield_to_others()
        return x + y

    async def main() -> None:
        assert await f(1) == 1
        assert await f(1) == 1
        assert await f(1, y=2) == 3
        assert await f(1, y=2) == 3
        assert calls == 2
        assert f.__name__ == "f" and f.__doc__ == "Adds, later."
        assert f.cache_key(1, y=2) in cache  # type: ignore[attr-defined]
        assert f.invalidate(1, y=2) is True  # type: ignore[attr-defined]
        assert await f(1, y=2) == 3
        assert calls == 3

    run(main())


def test_async_counts_one_lookup_per_call(run: Runner[Any]) -> None:
    cache: HyperCache[Any, Any] = HyperCache()

    @cache.memoize()
    async def f(x: int) -> int:
        return x

    async def main() -> None:
        await f(1)
        await f(1)
        await f(2)

    run(main())
    st = cache.stats()
    assert (st.hits, st.misses, st.sets) == (1, 2, 2)


def test_async_concurrent_awaiters_share_one_computation(run: Runner[Any]) -> None:
    cache: HyperCache[Any, Any] = HyperCache()
    calls = 0

    @cache.memoize()
    async def fetch(x: int) -> object:
        nonlocal calls
        calls += 1
        for _ in range(5):
            await yield_to_others()
        return object()

    async def main() -> list[Any]:
        return await asyncio.gather(*(fetch(1) for _ in range(50)))

    results = run(main())
    assert calls == 1
    assert len(results) == 50
    assert all(r is results[0] for r in results)


def test_async_exception_reaches_every_awaiter_and_is_not_cached(run: Runner[Any]) -> None:
    cache: HyperCache[Any, Any] = HyperCache()
    calls = 0

    class BackendError(Exception):
        pass

    @cache.memoize()
    async def fetch(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
            raise BackendError(x)
        return x

    gate: asyncio.Event

    async def main() -> None:
        nonlocal gate
        gate = asyncio.Event()
        tasks = [asyncio.ensure_future(fetch(1)) for _ in range(50)]
        await yield_to_others()  # every task is now in the flight
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert calls == 1
        assert all(isinstance(r, BackendError) for r in results), results
        assert fetch.cache_key(1) not in cache  # type: ignore[attr-defined]
        assert await fetch(1) == 1
        assert await fetch(1) == 1
        assert calls == 2

    run(main())


def test_async_cancelled_leader_hands_over_to_a_follower(run: Runner[Any]) -> None:
    cache: HyperCache[Any, Any] = HyperCache()
    calls = 0

    @cache.memoize()
    async def fetch(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()  # the leader never finishes by itself
        return x * 10

    async def main() -> None:
        leader = asyncio.ensure_future(fetch(1))
        await yield_to_others()
        assert calls == 1
        followers = [asyncio.ensure_future(fetch(1)) for _ in range(3)]
        await yield_to_others()  # the followers await the leader's flight
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        results = await asyncio.gather(*followers)
        assert results == [10, 10, 10]
        assert calls == 2
        assert await fetch(1) == 10
        assert calls == 2

    run(main())


def test_async_cancelled_follower_does_not_disturb_the_flight(run: Runner[Any]) -> None:
    cache: HyperCache[Any, Any] = HyperCache()
    calls = 0

    @cache.memoize()
    async def fetch(x: int) -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return x + 1

    gate: asyncio.Event

    async def main() -> None:
        nonlocal gate
        gate = asyncio.Event()
        leader = asyncio.ensure_future(fetch(1))
        await yield_to_others()
        followers = [asyncio.ensure_future(fetch(1)) for _ in range(3)]
        await yield_to_others()
        followers[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await followers[0]
        gate.set()
        assert await leader == 2
        assert await asyncio.gather(*followers[1:]) == [2, 2]
        assert calls == 1

    run(main())


def test_async_ttl_expiry_via_timer(run: Runner[Any]) -> None:
    clock = Clock()
    cache: HyperCache[Any, Any] = HyperCache(timer=clock)
    calls = 0

    @cache.memoize(ttl=2)
    async def f() -> int:
        nonlocal calls
        calls += 1
        return calls

    async def main() -> None:
        assert await f() == 1
        clock.advance(1.9)
        assert await f() == 1
        clock.advance(0.1)
        assert await f() == 2

    run(main())


def test_async_distinct_arguments_run_concurrently(run: Runner[Any]) -> None:
    # Flights are per key: a slow call for one argument does not hold up another.
    cache: HyperCache[Any, Any] = HyperCache()
    other_done: asyncio.Event

    @cache.memoize()
    async def f(x: int) -> int:
        if x == 1:
            await other_done.wait()
        return x

    async def main() -> None:
        nonlocal other_done
        other_done = asyncio.Event()
        slow = asyncio.ensure_future(f(1))
        await yield_to_others()
        assert await f(2) == 2
        other_done.set()
        assert await slow == 1

    run(main())


def test_async_wrapper_on_two_loops_in_two_threads() -> None:
    # A flight's future belongs to one loop: awaiters on another loop must
    # never await it (that raises), they compute for themselves.
    cache: HyperCache[Any, Any] = HyperCache()
    start = threading.Barrier(2)
    errors: list[BaseException] = []
    results: list[Any] = []

    @cache.memoize()
    async def f(x: int) -> int:
        for _ in range(20):
            await yield_to_others()
        return x * 2

    async def many() -> list[int]:
        return await asyncio.gather(*(f(3) for _ in range(20)))

    def thread(factory: Callable[[], asyncio.AbstractEventLoop] | None) -> None:
        try:
            start.wait(WAIT)
            with asyncio.Runner(loop_factory=factory) as r:
                results.extend(r.run(many()))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=thread, args=(None,)),
        threading.Thread(target=thread, args=(uvloop.new_event_loop,)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors, errors
    assert results == [6] * 40
