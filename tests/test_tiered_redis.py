"""TieredCache over real redis-server processes: another process's write drops
this one's L1 entry (RESP3 tracking), a killed invalidation link flushes L1, 50
concurrent get_or_set over several processes compute once, a Redis Cluster keeps
serving through a master's failover, and L2 down with and without serve_local."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import tiered_workers
from redis_harness import RedisServer, wait_until

from hypercache.backends import open as open_backend
from hypercache.errors import NodeUnavailableError
from hypercache.tiered import AsyncTieredCache, TieredCache

pytestmark = pytest.mark.redis

SPAWN = multiprocessing.get_context("spawn")


def _ns() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


def _watching(cache: TieredCache) -> None:
    wait_until(lambda: cache.watching, "the invalidation link")


def test_another_process_write_drops_the_old_value_from_l1(redis_server: Any) -> None:
    url = redis_server.url + f"?namespace={_ns()}"
    with TieredCache(url) as writer:
        writer.set("k", "old")
        here, there = SPAWN.Pipe()
        child = SPAWN.Process(target=tiered_workers.reader, args=(url, "k", there))
        child.start()
        try:
            assert here.poll(30), "the reader did not start"
            assert here.recv() == ("ready", "old")
            writer.set("k", "new")
            here.send(("written", time.time()))
            assert here.poll(30)
            status, value, _stale, _seen = here.recv()
            assert (status, value) == ("seen", "new")
        finally:
            child.join(30)
            if child.is_alive():
                child.kill()
        assert child.exitcode == 0


def test_a_killed_invalidation_link_flushes_l1_instead_of_serving_stale(
    redis_server: Any,
) -> None:
    url = redis_server.url + f"?namespace={_ns()}"
    admin = redis_server.client()
    other = open_backend(url)
    try:
        with TieredCache(url) as cache:
            _watching(cache)
            cache.set("k", "old")
            # Its own write's notification drops the write-through copy, maybe while
            # the next read fills it again: read until L1 holds it.
            wait_until(lambda: cache.get("k") == "old" and b"k" in cache.local, "an L1 copy")
            flushes = cache.stats().flushes
            assert _kill_tracking(admin) == 1
            other.set("k", "new")  # nobody tells this cache of it
            wait_until(lambda: cache.stats().flushes > flushes, "the flush after the loss")
            assert cache.get("k") == "new"
            _watching(cache)  # dialled again, and notifications flow again
            other.set("k", "newer")
            wait_until(lambda: cache.get("k") == "newer", "the next notification")
            assert cache.stats().flushes >= flushes + 2  # the loss, and the return
    finally:
        other.close()
        admin.close()


def test_50_concurrent_get_or_set_over_processes_compute_once(redis_server: Any) -> None:
    url = redis_server.url + f"?namespace={_ns()}"
    key, go = f"stampede{uuid.uuid4().hex[:6]}", f"go{uuid.uuid4().hex[:6]}"
    out = SPAWN.Queue()
    procs = [
        SPAWN.Process(
            target=tiered_workers.stampede, args=(url, redis_server.port, key, 10, go, out)
        )
        for _ in range(5)
    ]
    admin = redis_server.client()
    try:
        for p in procs:
            p.start()
        admin.set(go, 1)
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0] * 5
        assert [r for batch in results for r in batch] == ["value"] * 50
        assert int(admin.get(key + ":computed") or 0) == 1
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        admin.delete(go, key + ":computed")
        admin.close()


def test_l2_down_raises_or_serves_local(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        url = server.url + "?timeout=0.3"
        strict = TieredCache(url)
        lenient = TieredCache(url, on_backend_error="serve_local")
        try:
            _watching(strict)
            _watching(lenient)
            heard = lenient._epoch
            strict.set("k", 1)
            # The write's notification reaches lenient too; a fill before it arrives
            # would be dropped by it (the race the epoch guards against).
            wait_until(lambda: lenient._epoch > heard, "the write's notification")
            assert strict.get("k") == 1 and lenient.get("k") == 1
            server.stop()
            wait_until(lambda: not strict.watching and not lenient.watching, "the loss")
            with pytest.raises(NodeUnavailableError):
                strict.get("k")
            assert lenient.get("k") == 1
            with pytest.raises(NodeUnavailableError):
                lenient.get("other")
            s = lenient.stats()
            assert s.served_local == 1 and s.backend_errors == 2
        finally:
            strict.close()
            lenient.close()


def test_a_redis_cluster_keeps_serving_through_a_failover(redis_cluster: Any) -> None:
    url = redis_cluster.url + f"?namespace={_ns()}"
    keys = [f"k{i}" for i in range(60)]
    other = open_backend(url)
    replica = redis_cluster.servers[3].client()
    try:
        with TieredCache(url) as cache:
            _watching(cache)
            cache.set_many({k: i for i, k in enumerate(keys)})
            assert cache.get_many(keys) == {k: i for i, k in enumerate(keys)}
            assert cache.get_many(keys) == {k: i for i, k in enumerate(keys)}  # L1
            replica.execute_command("CLUSTER", "FAILOVER")
            wait_until(lambda: replica.info("replication")["role"] == "master", "the failover")
            redis_cluster.wait_ok(redis_cluster.servers)
            # Writes and reads go on, through the new master too.
            cache.set_many({k: i + 100 for i, k in enumerate(keys)})
            assert cache.get_many(keys) == {k: i + 100 for i, k in enumerate(keys)}
            # And another client's writes still reach this L1 (the new master's
            # link was up before it was promoted).
            other.set_many({k: -i for i, k in enumerate(keys)})
            wait_until(
                lambda: cache.get_many(keys) == {k: -i for i, k in enumerate(keys)},
                "the notifications of every master",
            )
    finally:
        replica.close()
        other.close()


def _kill_tracking(admin: redis.Redis) -> int:
    """CLIENT KILL every invalidation connection; return how many."""
    n = 0
    for c in admin.client_list():
        if c.get("name") == "hypercache-invalidation":
            admin.execute_command("CLIENT", "KILL", "ID", c["id"])  # type: ignore[no-untyped-call]
            n += 1
    return n


def test_the_async_tiered_cache_hears_other_writers_too(redis_server: Any) -> None:
    url = redis_server.url + f"?namespace={_ns()}"
    other = open_backend(url)

    async def main() -> None:
        cache = AsyncTieredCache(url)
        try:
            wait_until(lambda: cache.watching, "the invalidation link")
            other.set("k", "old")
            # The write's own notification may land during the first read, which then
            # is not kept: read until L1 holds it.
            end = time.monotonic() + 10
            while b"k" not in cache.local:
                assert await cache.get("k") == "old"
                assert time.monotonic() < end
            assert await cache.get("k") == "old"
            assert cache.stats().l1_hits >= 1
            other.set("k", "new")
            end = time.monotonic() + 10
            while await cache.get("k") != "new":
                assert time.monotonic() < end, "the notification never came"
                await asyncio.sleep(0.005)
        finally:
            await cache.close()

    try:
        asyncio.run(main())
    finally:
        other.close()


def test_a_tiered_cache_compresses_what_it_stores_in_redis(redis_server: Any) -> None:
    # From 1 KiB (serialised) up, the value in Redis is zstd-compressed (the 0xC1
    # form), a tenth of the size or less for a JSON-like document, and reads back
    # equal (through L2: another cache with an empty L1). Small values, and all of
    # them with compression off, are stored as msgpack wrote them.
    from hypercache.client.compression import MARK
    from hypercache.client.serializer import MsgpackSerializer

    doc = [{"id": i, "name": f"user-{i}", "tags": ["a", "b"], "ok": i % 2 == 0} for i in range(200)]
    raw = MsgpackSerializer().dumps(doc)
    ns = _ns()
    redis_client = redis_server.client()
    with TieredCache(redis_server.url + f"?namespace={ns}") as cache:
        cache.set("doc", doc)
        cache.set("small", {"a": 1})
    stored = redis_client.get(f"{ns}doc".encode())
    assert stored[0] == MARK and len(stored) * 5 < len(raw)
    assert redis_client.get(f"{ns}small".encode()) == MsgpackSerializer().dumps({"a": 1})
    with TieredCache(redis_server.url + f"?namespace={ns}", compression="off") as other:
        assert other.get("doc") == doc  # from Redis: L1 is empty; decoded whatever its own
        other.set("plain", doc)
    assert redis_client.get(f"{ns}plain".encode()) == raw
    with TieredCache(redis_server.url + f"?namespace={ns}&compression=zstd:19") as strong:
        strong.set("strong", doc)
    assert len(redis_client.get(f"{ns}strong".encode())) <= len(stored)

    async def via_async() -> Any:
        async with AsyncTieredCache(redis_server.url + f"?namespace={ns}") as acache:
            await acache.set("async", doc)
            return await acache.get("doc")

    assert asyncio.run(via_async()) == doc
    assert redis_client.get(f"{ns}async".encode())[0] == MARK
