"""The tiered cache against raw redis-py, aiocache and cashews, side by side in one run.

Run with ``python -m bench.tiered_report`` (which also measures the stampede and the
staleness bound, and prints the ratios), or by hand::

    .venv/bin/python -m pytest -o python_files='bench_*.py' bench/bench_tiered.py

One ``redis-server`` is started on a free loopback port (``--save '' --appendonly
no``) for the module and stopped after it. :data:`KEYS` keys ``"key:<n>"`` hold a small
dict each. Every timed loop builds its keys itself, one new ``str`` per request
(``f"key:{n}"``): equal to the stored keys, never the same objects, as a service
that reads ``cache.get(f"user:{uid}")``. A round is :data:`BATCH` requests; the
figures are per request.

``l1-hit``   every read is answered by the local tier (filled before timing):
             TieredCache / AsyncTieredCache over Redis, aiocache's
             ``SimpleMemoryCache``, cashews ``mem://``, cashews ``redis://`` with
             ``client_side=True`` (its local tier in front of Redis)
``l1-miss``  every read misses the local tier and goes to Redis (a TieredCache whose
             L1 holds one entry, cycling over the keys, so each read evicts and fills):
             against a raw ``redis.Redis.get`` (sync) and ``redis.asyncio`` (async),
             aiocache ``RedisCache`` and cashews ``redis://``
"""

from __future__ import annotations

import asyncio
import sys
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from redis_harness import RedisServer, wait_until

import hypercache
from hypercache import HyperCache

BATCH = 200
KEYS = 1_000
VALUE = {"name": "Ada", "id": 7, "tags": ["a", "b"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("bench-redis")) as s:
        backend = hypercache.open(s.url)
        backend.set_many({f"key:{i}": VALUE for i in range(KEYS)})
        backend.close()
        yield s


def _watching(cache: Any) -> None:
    """Wait for the invalidation link: until it is up, L1 is bypassed."""
    wait_until(lambda: cache.watching, "the invalidation link")


def _close_quietly(loop: asyncio.AbstractEventLoop, close: Callable[[], Awaitable[Any]]) -> None:
    # The peers close redis-py clients with its deprecated close(): not ours to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loop.run_until_complete(close())


def _rounds(config: Any) -> int:
    return 15 if config.quick else 200


def loop_sync(get: Callable[[str], Any], start: int) -> None:
    for i in range(start, start + BATCH):
        get(f"key:{i % KEYS}")


async def loop_async(get: Callable[[str], Awaitable[Any]], start: int) -> None:
    for i in range(start, start + BATCH):
        await get(f"key:{i % KEYS}")


class _Offsets:
    """Each round starts where the last ended: the loops walk every key in turn."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.n += BATCH
        return (self.n,), {}


def _time_sync(benchmark: Any, config: Any, get: Callable[[str], Any]) -> None:
    offsets = _Offsets()
    benchmark.pedantic(
        lambda start: loop_sync(get, start),
        setup=offsets,
        rounds=_rounds(config),
        warmup_rounds=3,
    )


def _time_async(
    benchmark: Any, config: Any, loop: asyncio.AbstractEventLoop, get: Callable[[str], Any]
) -> None:
    offsets = _Offsets()
    benchmark.pedantic(
        lambda start: loop.run_until_complete(loop_async(get, start)),
        setup=offsets,
        rounds=_rounds(config),
        warmup_rounds=3,
    )


# ------------------------------------------------------------------------- sync


@pytest.mark.benchmark(group="l1-hit")
def bench_l1_hit_tiered(benchmark: Any, bench_config: Any, server: RedisServer) -> None:
    cache = hypercache.TieredCache(server.url)
    _watching(cache)
    for i in range(KEYS):
        cache.get(f"key:{i}")
    benchmark.extra_info["impl"] = "TieredCache (L1 hit)"
    _time_sync(benchmark, bench_config, cache.get)
    assert cache.stats().l2_hits == KEYS  # every timed read was an L1 hit
    cache.close()


@pytest.mark.benchmark(group="l1-miss")
def bench_redis_py_get(benchmark: Any, bench_config: Any, server: RedisServer) -> None:
    import redis

    r = redis.Redis(port=server.port)
    benchmark.extra_info["impl"] = "redis-py GET"
    _time_sync(benchmark, bench_config, r.get)
    r.close()


@pytest.mark.benchmark(group="l1-miss")
def bench_redis_py_get_decoded(benchmark: Any, bench_config: Any, server: RedisServer) -> None:
    import msgpack
    import redis

    r = redis.Redis(port=server.port)

    def get(key: str) -> Any:
        data = r.get(key)
        return None if data is None else msgpack.unpackb(data)

    benchmark.extra_info["impl"] = "redis-py GET + msgpack"
    _time_sync(benchmark, bench_config, get)
    r.close()


@pytest.mark.benchmark(group="l1-miss")
def bench_l1_miss_tiered(benchmark: Any, bench_config: Any, server: RedisServer) -> None:
    cache = hypercache.TieredCache(server.url, local=HyperCache(1))
    benchmark.extra_info["impl"] = "TieredCache (L1 miss)"
    _time_sync(benchmark, bench_config, cache.get)
    assert cache.stats().l2_hits > 0
    cache.close()


# ------------------------------------------------------------------------- async


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.mark.benchmark(group="l1-hit")
def bench_l1_hit_async_tiered(
    benchmark: Any, bench_config: Any, server: RedisServer, loop: asyncio.AbstractEventLoop
) -> None:
    cache = hypercache.AsyncTieredCache(server.url)
    _watching(cache)

    async def fill() -> None:
        for i in range(KEYS):
            await cache.get(f"key:{i}")

    loop.run_until_complete(fill())
    benchmark.extra_info["impl"] = "AsyncTieredCache (L1 hit)"
    _time_async(benchmark, bench_config, loop, cache.get)
    _close_quietly(loop, cache.close)


@pytest.mark.benchmark(group="l1-miss")
def bench_l1_miss_async_tiered(
    benchmark: Any, bench_config: Any, server: RedisServer, loop: asyncio.AbstractEventLoop
) -> None:
    cache = hypercache.AsyncTieredCache(server.url, local=HyperCache(1))
    benchmark.extra_info["impl"] = "AsyncTieredCache (L1 miss)"
    _time_async(benchmark, bench_config, loop, cache.get)
    _close_quietly(loop, cache.close)


@pytest.mark.benchmark(group="l1-miss")
def bench_redis_asyncio_get(
    benchmark: Any, bench_config: Any, server: RedisServer, loop: asyncio.AbstractEventLoop
) -> None:
    import redis.asyncio

    r = redis.asyncio.Redis(port=server.port)
    benchmark.extra_info["impl"] = "redis.asyncio GET"
    _time_async(benchmark, bench_config, loop, r.get)
    loop.run_until_complete(r.aclose())


@pytest.mark.benchmark(group="l1-hit")
def bench_l1_hit_aiocache_memory(
    benchmark: Any, bench_config: Any, loop: asyncio.AbstractEventLoop
) -> None:
    from aiocache import SimpleMemoryCache

    cache = SimpleMemoryCache()

    async def fill() -> None:
        for i in range(KEYS):
            await cache.set(f"key:{i}", VALUE)

    loop.run_until_complete(fill())
    benchmark.extra_info["impl"] = "aiocache SimpleMemoryCache"
    _time_async(benchmark, bench_config, loop, cache.get)


@pytest.mark.benchmark(group="l1-miss")
def bench_aiocache_redis(
    benchmark: Any, bench_config: Any, server: RedisServer, loop: asyncio.AbstractEventLoop
) -> None:
    from aiocache import RedisCache

    async def make() -> Any:
        cache = RedisCache(endpoint="127.0.0.1", port=server.port, db=3)  # JSON, its default
        for i in range(KEYS):
            await cache.set(f"key:{i}", VALUE)
        return cache

    cache = loop.run_until_complete(make())
    benchmark.extra_info["impl"] = "aiocache RedisCache"
    _time_async(benchmark, bench_config, loop, cache.get)
    _close_quietly(loop, cache.close)


def _cashews(loop: asyncio.AbstractEventLoop, url: str, **options: Any) -> Any:
    from cashews import Cache

    cache = Cache()
    cache.setup(url, **options)

    async def init() -> None:
        await cache.init()

    loop.run_until_complete(init())
    return cache


@pytest.mark.benchmark(group="l1-hit")
def bench_l1_hit_cashews_memory(
    benchmark: Any, bench_config: Any, loop: asyncio.AbstractEventLoop
) -> None:
    cache = _cashews(loop, "mem://")

    async def fill() -> None:
        for i in range(KEYS):
            await cache.set(f"key:{i}", VALUE)

    loop.run_until_complete(fill())
    benchmark.extra_info["impl"] = "cashews mem://"
    _time_async(benchmark, bench_config, loop, cache.get)
    _close_quietly(loop, cache.close)


@pytest.mark.benchmark(group="l1-hit")
def bench_l1_hit_cashews_client_side(
    benchmark: Any, bench_config: Any, server: RedisServer, loop: asyncio.AbstractEventLoop
) -> None:
    cache = _cashews(loop, f"redis://127.0.0.1:{server.port}/1", client_side=True)

    async def fill() -> None:
        for i in range(KEYS):
            await cache.set(f"key:{i}", VALUE)
        for i in range(KEYS):
            await cache.get(f"key:{i}")

    loop.run_until_complete(fill())
    benchmark.extra_info["impl"] = "cashews redis:// client_side"
    _time_async(benchmark, bench_config, loop, cache.get)
    _close_quietly(loop, cache.close)


@pytest.mark.benchmark(group="l1-miss")
def bench_cashews_redis(
    benchmark: Any, bench_config: Any, server: RedisServer, loop: asyncio.AbstractEventLoop
) -> None:
    cache = _cashews(loop, f"redis://127.0.0.1:{server.port}/2")

    async def fill() -> None:
        for i in range(KEYS):
            await cache.set(f"key:{i}", VALUE)

    loop.run_until_complete(fill())
    benchmark.extra_info["impl"] = "cashews redis://"
    _time_async(benchmark, bench_config, loop, cache.get)
    _close_quietly(loop, cache.close)
