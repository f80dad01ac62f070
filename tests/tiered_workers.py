"""What the child processes of tests/test_tiered_redis.py run (a module of its
own, so that a ``spawn`` child can import it)."""

from __future__ import annotations

import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import redis

from hypercache.tiered import TieredCache


def _wait_watching(cache: TieredCache, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not cache.watching:
        if time.monotonic() > end:
            raise TimeoutError("the invalidation link did not come up")
        time.sleep(0.005)


def reader(url: str, key: str, pipe: Connection) -> None:
    """Read ``key`` into L1, say so; on "poll", read until the value changes and
    answer what it saw: the new value, how many reads L1 answered meanwhile with
    the old one (stale reads), and the seconds from the write's time to seeing it."""
    cache = TieredCache(url)
    try:
        _wait_watching(cache)
        first = cache.get(key)
        assert cache.get(key) == first and cache.stats().l1_hits >= 1
        pipe.send(("ready", first))
        msg, written_at = pipe.recv()
        assert msg == "written"
        stale = 0
        end = time.monotonic() + 10
        while True:
            value = cache.get(key)
            if value != first:
                seen = time.time() - written_at
                break
            stale += 1
            if time.monotonic() > end:
                pipe.send(("timeout", None, stale, None))
                return
        pipe.send(("seen", value, stale, seen))
    finally:
        cache.close()


def stampede(url: str, redis_port: int, key: str, threads: int, go: str, out: Any) -> None:
    """``threads`` threads of this process call get_or_set(key) at once, once the
    ``go`` key exists; the factory counts its runs in Redis (``INCR``)."""
    counter = redis.Redis(port=redis_port)
    cache = TieredCache(url, lease_poll=0.005)

    def factory() -> str:
        counter.incr(key + ":computed")
        time.sleep(0.3)
        return "value"

    results: list[Any] = []
    end = time.monotonic() + 30
    while not counter.exists(go):
        if time.monotonic() > end:
            raise TimeoutError("no go")
        time.sleep(0.002)
    workers = [
        threading.Thread(target=lambda: results.append(cache.get_or_set(key, factory, ttl=60)))
        for _ in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put(results)
    cache.close()
    counter.close()


def stampede_counted_in_files(
    url: str, key: str, threads: int, go: str, computed: str, out: Any
) -> None:
    """:func:`stampede` for a backend without Redis beside it: the process starts
    its threads once the file ``go`` exists, and the factory appends a line to the
    file ``computed`` (one ``O_APPEND`` write a run: atomic across processes)."""
    import os

    cache = TieredCache(url, lease_poll=0.005)

    def factory() -> str:
        fd = os.open(computed, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        time.sleep(0.3)
        return "value"

    results: list[Any] = []
    end = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > end:
            raise TimeoutError("no go")
        time.sleep(0.002)
    workers = [
        threading.Thread(target=lambda: results.append(cache.get_or_set(key, factory, ttl=60)))
        for _ in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put(results)
    cache.close()
