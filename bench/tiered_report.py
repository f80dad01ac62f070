"""The figures of ``docs/backends.md``: ``python -m bench.tiered_report [--quick]``.

One run, one ``redis-server`` on a free loopback port, everything side by side:

1. **Speed** (the workloads of :mod:`bench.bench_tiered`, keys built per request):
   every implementation runs one batch of :data:`BATCH` reads per round, taking
   turns round by round (the order rotates), so that load from elsewhere on the
   machine lands on all of them; the table gives the median round per read and the
   ratios the issue sets targets for (L1 hit at least 50x faster than a redis-py
   GET; an L1 miss within 1.15x of one).
2. **Stampede**: 50 callers of ``get_or_set`` on one missing key, whose factory
   takes 0.2 s: ours as 5 processes x 10 threads sharing the Redis, and each
   library as 50 asyncio tasks in one process (aiocache's ``cached_stampede``,
   cashews ``@cache(lock=True)``, our ``AsyncTieredCache.memoize``): the factory's
   calls.
3. **Staleness**: a second process reads one key in a loop from its TieredCache
   (L1 hits); this one writes the key :data:`WRITES` times, the value being the
   wall-clock time of the write; the reader records, for each value, how long after
   its write it first read it. p50 / p99 / max is the bound a reader sees.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import redis
import redis.asyncio
from redis_harness import RedisServer, wait_until

import hypercache
from hypercache import HyperCache
from hypercache.client.serializer import MsgpackSerializer

BATCH = 200
KEYS = 1_000
WRITES = 100
VALUE = {"name": "Ada", "id": 7, "tags": ["a", "b"]}
SPAWN = multiprocessing.get_context("spawn")


def _sync_loop(get: Callable[[str], Any], start: int) -> None:
    for i in range(start, start + BATCH):
        get(f"key:{i % KEYS}")


async def _async_loop(get: Callable[[str], Awaitable[Any]], start: int) -> None:
    for i in range(start, start + BATCH):
        await get(f"key:{i % KEYS}")


def interleave(impls: dict[str, Callable[[int], None]], rounds: int) -> dict[str, float]:
    """Median ns per read of each implementation, the rounds taken in turns."""
    names = list(impls)
    times: dict[str, list[int]] = {n: [] for n in names}
    for r in range(rounds + 3):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter_ns()
            impls[name](r * BATCH)
            if r >= 3:  # the first rounds warm up
                times[name].append(time.perf_counter_ns() - t0)
    return {n: statistics.median(t) / BATCH for n, t in times.items()}


def _watching(cache: Any) -> None:
    wait_until(lambda: cache.watching, "the invalidation link")


def speed_sync(server: RedisServer, rounds: int) -> dict[str, float]:
    r = redis.Redis(port=server.port)
    loads = MsgpackSerializer().loads
    hit = hypercache.TieredCache(server.url)
    miss = hypercache.TieredCache(server.url, local=HyperCache(1))
    _watching(hit)
    _watching(miss)
    for i in range(KEYS):
        hit.get(f"key:{i}")

    def get_decoded(key: str) -> Any:
        data = r.get(key)
        return None if data is None else loads(data)  # type: ignore[arg-type]

    out = interleave(
        {
            "redis-py GET": lambda s: _sync_loop(r.get, s),
            "redis-py GET + msgpack": lambda s: _sync_loop(get_decoded, s),
            "TieredCache L1 miss": lambda s: _sync_loop(miss.get, s),
            "TieredCache L1 hit": lambda s: _sync_loop(hit.get, s),
        },
        rounds,
    )
    assert hit.stats().l2_hits == KEYS, "L1 hits were not all L1 hits"
    hit.close()
    miss.close()
    r.close()
    return out


def speed_async(server: RedisServer, rounds: int) -> dict[str, float]:
    from aiocache import RedisCache, SimpleMemoryCache
    from cashews import Cache

    loop = asyncio.new_event_loop()
    run = loop.run_until_complete

    async def setup() -> dict[str, Any]:
        objs: dict[str, Any] = {}
        objs["raw"] = redis.asyncio.Redis(port=server.port)
        objs["hit"] = hypercache.AsyncTieredCache(server.url)
        objs["miss"] = hypercache.AsyncTieredCache(server.url, local=HyperCache(1))
        objs["aio_mem"] = SimpleMemoryCache()
        objs["aio_redis"] = RedisCache(endpoint="127.0.0.1", port=server.port, db=3)
        cashews_setups: list[tuple[str, str, dict[str, Any]]] = [
            ("cashews_mem", "mem://", {}),
            ("cashews_cs", f"redis://127.0.0.1:{server.port}/1", {"client_side": True}),
            ("cashews_redis", f"redis://127.0.0.1:{server.port}/2", {}),
        ]
        for name, url, opts in cashews_setups:
            c = Cache()
            c.setup(url, **opts)
            await c.init()
            objs[name] = c
        for i in range(KEYS):
            k = f"key:{i}"
            for name in ("aio_mem", "aio_redis", "cashews_mem", "cashews_cs", "cashews_redis"):
                await objs[name].set(k, VALUE)
        return objs

    objs = run(setup())
    _watching(objs["hit"])

    async def fill() -> None:
        for i in range(KEYS):
            await objs["hit"].get(f"key:{i}")
            await objs["cashews_cs"].get(f"key:{i}")

    run(fill())

    def arun(get: Callable[[str], Awaitable[Any]]) -> Callable[[int], None]:
        return lambda s: run(_async_loop(get, s))

    out = interleave(
        {
            "redis.asyncio GET": arun(objs["raw"].get),
            "AsyncTieredCache L1 miss": arun(objs["miss"].get),
            "AsyncTieredCache L1 hit": arun(objs["hit"].get),
            "aiocache SimpleMemoryCache": arun(objs["aio_mem"].get),
            "aiocache RedisCache": arun(objs["aio_redis"].get),
            "cashews mem://": arun(objs["cashews_mem"].get),
            "cashews redis:// client_side (L1 hit)": arun(objs["cashews_cs"].get),
            "cashews redis://": arun(objs["cashews_redis"].get),
        },
        rounds,
    )

    async def close() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            await objs["raw"].aclose()
            await objs["hit"].close()
            await objs["miss"].close()
            await objs["aio_redis"].close()
            for name in ("cashews_mem", "cashews_cs", "cashews_redis"):
                await objs[name].close()

    run(close())
    loop.close()
    return out


# ---------------------------------------------------------------- stampede


def _stampede_child(url: str, port: int, key: str, go: str, pipe: Connection) -> None:
    import threading

    counter = redis.Redis(port=port)
    cache = hypercache.TieredCache(url)

    def factory() -> str:
        counter.incr(key + ":calls")
        time.sleep(0.2)
        return "v"

    while not counter.exists(go):
        time.sleep(0.001)
    threads = [threading.Thread(target=cache.get_or_set, args=(key, factory)) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    pipe.send("done")


def stampede(server: RedisServer) -> dict[str, int]:
    out: dict[str, int] = {}
    url = server.url + f"?namespace=st{uuid.uuid4().hex[:6]}:"
    key, go = "hot", f"go{uuid.uuid4().hex[:6]}"
    admin = redis.Redis(port=server.port)
    pipes = []
    procs = []
    for _ in range(5):
        here, there = SPAWN.Pipe()
        p = SPAWN.Process(target=_stampede_child, args=(url, server.port, key, go, there))
        p.start()
        procs.append(p)
        pipes.append(here)
    time.sleep(2.0)  # let the children import and connect
    admin.set(go, 1)
    for here in pipes:
        assert here.poll(60)
        here.recv()
    for p in procs:
        p.join()
    out["TieredCache, 5 processes x 10 threads"] = int(admin.get(key + ":calls") or 0)
    admin.delete(go)
    admin.close()

    from aiocache import RedisCache, cached_stampede
    from cashews import Cache

    async def tasks() -> None:
        calls = {"ours": 0, "aiocache": 0, "cashews": 0}
        ours = hypercache.AsyncTieredCache(server.url + f"?namespace=sa{uuid.uuid4().hex[:6]}:")
        cashews = Cache()
        cashews.setup(f"redis://127.0.0.1:{server.port}/4")
        await cashews.init()

        @ours.memoize(ttl=60)
        async def f_ours() -> str:
            calls["ours"] += 1
            await asyncio.sleep(0.2)
            return "v"

        @cached_stampede(  # type: ignore[untyped-decorator]
            cache=RedisCache, endpoint="127.0.0.1", port=server.port, db=5, lease=2, ttl=60
        )
        async def f_aio() -> str:
            calls["aiocache"] += 1
            await asyncio.sleep(0.2)
            return "v"

        @cashews(ttl=60, lock=True)
        async def f_cashews() -> str:
            calls["cashews"] += 1
            await asyncio.sleep(0.2)
            return "v"

        for f in (f_ours, f_aio, f_cashews):
            await asyncio.gather(*(f() for _ in range(50)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            await ours.close()
            await cashews.close()
            await f_aio.cache.close()
        out["AsyncTieredCache.memoize, 50 tasks"] = calls["ours"]
        out["aiocache cached_stampede(lease=2), 50 tasks"] = calls["aiocache"]
        out["cashews @cache(lock=True), 50 tasks"] = calls["cashews"]

    asyncio.run(tasks())
    return out


# ---------------------------------------------------------------- staleness


def _stale_reader(url: str, writes: int, pipe: Connection) -> None:
    cache = hypercache.TieredCache(url)
    wait_until(lambda: cache.watching, "the invalidation link")
    cache.get("k")
    pipe.send("ready")
    seen: dict[float, float] = {}
    last = None
    end = time.monotonic() + 60
    while len(seen) < writes and time.monotonic() < end:
        value = cache.get("k")
        if value != last and isinstance(value, float):
            seen[value] = time.time() - value
            last = value
    pipe.send(list(seen.values()))
    cache.close()


def staleness(server: RedisServer, writes: int) -> dict[str, float]:
    return staleness_of(server.url + f"?namespace=sl{uuid.uuid4().hex[:6]}:", writes)


def staleness_of(url: str, writes: int) -> dict[str, float]:
    """The staleness figures of any backend URL (see the module docstring, 3)."""
    writer = hypercache.open(url)
    writer.set("k", "start")
    here, there = SPAWN.Pipe()
    p = SPAWN.Process(target=_stale_reader, args=(url, writes, there))
    p.start()
    assert here.poll(60)
    here.recv()
    for _ in range(writes):
        writer.set("k", time.time())
        time.sleep(0.02)
    assert here.poll(60)
    delays = sorted(here.recv())
    p.join()
    writer.close()
    if not delays:
        return {}
    return {
        "writes seen": len(delays),
        "p50 ms": statistics.median(delays) * 1000,
        "p99 ms": delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000,
        "max ms": delays[-1] * 1000,
    }


# ---------------------------------------------------------------- the cluster


def cluster_figures(writes: int) -> dict[str, Any]:
    """Staleness and a 50-caller stampede over a 3-node hypercache cluster (real
    ``hypercache-node`` processes on loopback, replication 3): the same reader and
    writer as for Redis, notifications by the nodes' ``WATCH`` pushes; the stampede
    as 5 processes x 10 threads, the lease being the cluster's ``ADD``."""
    import tiered_workers
    from cluster_harness import running_cluster

    workdir = Path(tempfile.mkdtemp(prefix="tiered-cluster-bench-"))
    with running_cluster(3, workdir) as cluster:
        seeds = ",".join(cluster.addresses)
        stale = staleness_of(f"hypercache://{seeds}?namespace=sl{uuid.uuid4().hex[:6]}:", writes)
        url = f"hypercache://{seeds}?namespace=st{uuid.uuid4().hex[:6]}:"
        go, computed = workdir / "go", workdir / "computed"
        out = SPAWN.Queue()
        procs = [
            SPAWN.Process(
                target=tiered_workers.stampede_counted_in_files,
                args=(url, "k", 10, str(go), str(computed), out),
            )
            for _ in range(5)
        ]
        for p in procs:
            p.start()
        go.touch()
        results = [r for _ in procs for r in out.get(timeout=120)]
        for p in procs:
            p.join(30)
        calls = len(computed.read_text().splitlines())
    return {"staleness": stale, "stampede calls": calls, "callers": len(results)}


def _table(title: str, rows: dict[str, float], ref: str | None) -> str:
    lines = [f"### {title}", "", "| implementation | ns per read | vs " + (ref or "") + " |"]
    lines.append("| --- | ---: | ---: |")
    for name, ns in rows.items():
        ratio = f"{ns / rows[ref]:.3f}x" if ref else ""
        lines.append(f"| {name} | {ns:,.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (smoke test)")
    parser.add_argument(
        "--cluster-only",
        action="store_true",
        help="only the hypercache cluster's staleness and stampede (no redis-server)",
    )
    args = parser.parse_args(argv)
    rounds = 20 if args.quick else 300
    writes = 20 if args.quick else WRITES
    if args.cluster_only:
        _print_cluster(cluster_figures(writes))
        return 0
    with RedisServer(Path(tempfile.mkdtemp(prefix="tiered-bench-"))) as server:
        version = redis.Redis(port=server.port).info("server")["redis_version"]
        backend = hypercache.open(server.url)
        backend.set_many({f"key:{i}": VALUE for i in range(KEYS)})
        backend.close()
        sync = speed_sync(server, rounds)
        asyn = speed_async(server, rounds)
        storm = stampede(server)
        stale = staleness(server, writes)
    on_cluster = cluster_figures(writes)
    print(f"redis-server {version}, redis-py {redis.__version__}, {rounds} rounds of {BATCH}")
    print()
    print(_table("sync", sync, "redis-py GET"))
    print()
    print(_table("asyncio", asyn, "redis.asyncio GET"))
    print()
    get = sync["redis-py GET"]
    print("### targets")
    print()
    print(
        f"- L1 hit vs redis-py GET: {get / sync['TieredCache L1 hit']:.0f}x faster (target >= 50x)"
    )
    print(
        f"- L1 miss vs redis-py GET: {sync['TieredCache L1 miss'] / get:.3f}x "
        f"(target <= 1.15x); vs GET + msgpack decode: "
        f"{sync['TieredCache L1 miss'] / sync['redis-py GET + msgpack']:.3f}x"
    )
    aget = asyn["redis.asyncio GET"]
    print(
        f"- async: L1 hit {aget / asyn['AsyncTieredCache L1 hit']:.0f}x faster, "
        f"L1 miss {asyn['AsyncTieredCache L1 miss'] / aget:.3f}x of redis.asyncio GET"
    )
    print()
    print("### stampede: factory calls for 50 concurrent callers of one missing key")
    print()
    for name, n in storm.items():
        print(f"- {name}: {n}")
    print()
    print("### staleness after a write by another process")
    print()
    for name, v in stale.items():
        print(f"- {name}: {v:.2f}" if isinstance(v, float) else f"- {name}: {v}")
    print()
    _print_cluster(on_cluster)
    return 0


def _print_cluster(figures: dict[str, Any]) -> None:
    print("### hypercache cluster (3 nodes): staleness after a write by another process")
    print()
    for name, v in figures["staleness"].items():
        print(f"- {name}: {v:.2f}" if isinstance(v, float) else f"- {name}: {v}")
    print()
    print(
        f"- stampede: {figures['stampede calls']} factory call(s) for "
        f"{figures['callers']} callers (5 processes x 10 threads)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
