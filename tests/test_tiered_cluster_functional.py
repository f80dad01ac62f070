"""TieredCache over real hypercache-node processes: the nodes' write notifications
(``WATCH``) drop another process's overwritten, deleted or expired values from L1,
whichever node the write came through; a killed node (a broken notification link)
and an overflowed notification queue flush L1; the caps of WATCH bite and are
counted; and 50 concurrent get_or_set over several processes compute once (the
cluster's ``ADD`` is the lease)."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import tiered_workers
from cluster_harness import running_cluster

from hypercache.backends import open as open_backend
from hypercache.cluster.local import ProcessCluster, wait_for
from hypercache.errors import ConfigError, NodeUnavailableError
from hypercache.net import Op
from hypercache.net.blocking import BlockingConnection
from hypercache.net.protocol import make_hello
from hypercache.tiered import AsyncTieredCache, TieredCache

SPAWN = multiprocessing.get_context("spawn")


def _ns() -> str:
    return f"w{uuid.uuid4().hex[:8]}:"


def _url(cluster: ProcessCluster, namespace: str, extra: str = "") -> str:
    return "hypercache://" + ",".join(cluster.addresses) + f"?namespace={namespace}{extra}"


def _watching(cache: TieredCache | AsyncTieredCache) -> None:
    wait_for(lambda: cache.watching, what="the notification links")


def _in_l1(cache: TieredCache, key: str, value: Any) -> None:
    # A notification of an earlier write may drop a fill (the epoch guard): read
    # until L1 holds the value.
    wait_for(
        lambda: cache.get(key) == value and key.encode() in cache.local,
        what=f"an L1 copy of {key}",
    )


def _metric(cluster: ProcessCluster, index: int, name: str) -> float:
    text = cluster[index].http_text("/metrics")
    total = 0.0
    for line in text.splitlines():
        if re.match(rf"^{re.escape(name)}(\{{| )", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    with running_cluster(3, tmp_path_factory.mktemp("watch")) as c:
        yield c


def test_another_process_write_drops_the_old_value_from_l1(cluster: ProcessCluster) -> None:
    url = _url(cluster, _ns())
    writer = open_backend(url)
    try:
        writer.set("k", "old")
        here, there = SPAWN.Pipe()
        child = SPAWN.Process(target=tiered_workers.reader, args=(url, "k", there))
        child.start()
        try:
            assert here.poll(60), "the reader did not start"
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
    finally:
        writer.close()


def test_a_write_through_any_node_a_delete_and_an_expiry_drop_l1(
    cluster: ProcessCluster,
) -> None:
    ns = _ns()
    with TieredCache(_url(cluster, ns)) as cache:
        _watching(cache)
        assert len(cache._watch.nodes) == 3  # type: ignore[union-attr]
        wire = (ns + "k").encode()
        for i in range(3):
            # A write that node i coordinates, as any other client would send it.
            cluster.request(i, Op.SET, [wire, msgpack.packb(f"v{i}"), None, "one"])
            expected = f"v{i}"
            wait_for(lambda: cache.get("k") == expected, what=f"the write via node {i}")  # noqa: B023
            _in_l1(cache, "k", f"v{i}")
        invalidations = cache.stats().invalidations
        cluster.request(1, Op.DELETE, [wire, "one"])
        wait_for(lambda: cache.get("k") is None, what="the delete")
        assert cache.stats().invalidations > invalidations
        # A value with a TTL: L1 keeps it no longer than L2 does.
        cluster.request(2, Op.SET, [wire, msgpack.packb("short"), 300, "all"])
        _in_l1(cache, "k", "short")
        wait_for(lambda: cache.get("k") is None, what="the expiry")
        assert cache.stats().flushes >= 1  # the links coming up


def test_the_async_tiered_cache_drops_another_writer_value(cluster: ProcessCluster) -> None:
    url = _url(cluster, _ns())

    async def main() -> None:
        other = open_backend(url)
        cache = AsyncTieredCache(url)
        try:
            await asyncio.to_thread(_watching, cache)
            other.set("k", 1)
            deadline = time.monotonic() + 10
            while await cache.get("k") != 1 or b"k" not in cache.local:
                assert time.monotonic() < deadline, "no L1 copy"
                await asyncio.sleep(0.01)
            other.set("k", 2)
            while await cache.get("k") != 2:
                assert time.monotonic() < deadline, "the write was not seen"
                await asyncio.sleep(0.01)
        finally:
            await cache.close()
            other.close()

    asyncio.run(main())


def test_50_concurrent_get_or_set_over_processes_compute_once(
    cluster: ProcessCluster, tmp_path: Path
) -> None:
    url = _url(cluster, _ns())
    go, computed = tmp_path / "go", tmp_path / "computed"
    out = SPAWN.Queue()
    procs = [
        SPAWN.Process(
            target=tiered_workers.stampede_counted_in_files,
            args=(url, "stampede", 10, str(go), str(computed), out),
        )
        for _ in range(5)
    ]
    try:
        for p in procs:
            p.start()
        go.touch()
        results = [out.get(timeout=90) for _ in procs]
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0] * 5
        assert [r for batch in results for r in batch] == ["value"] * 50
        assert len(computed.read_text().splitlines()) == 1
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def test_add_is_won_once_by_concurrent_clients(cluster: ProcessCluster) -> None:
    ns = _ns()
    backends = [open_backend(_url(cluster, ns)) for _ in range(3)]
    try:
        import threading

        wins: list[bool] = []
        start = threading.Barrier(30)

        def contend(b: Any, n: int) -> None:
            start.wait()
            wins.append(b.add("lease", n, 30))

        threads = [threading.Thread(target=contend, args=(backends[n % 3], n)) for n in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wins.count(True) == 1
        assert backends[0].add("lease", "again", 30) is False
        # Absent or expired again: added again.
        backends[1].delete("lease")
        assert backends[2].add("lease", "after", 0.2) is True
        wait_for(lambda: backends[0].add("lease", "expired", 30), what="the expiry")
        assert backends[1].get("lease") == "expired"
    finally:
        for b in backends:
            b.close()


def test_a_killed_node_flushes_l1_and_the_cache_trusts_it_again_once_back(
    tmp_path: Path,
) -> None:
    with running_cluster(3, tmp_path) as c:
        url = _url(c, _ns())
        other = open_backend(url)
        with TieredCache(url) as cache:
            _watching(cache)
            other.set("k", "old")
            _in_l1(cache, "k", "old")
            flushes = cache.stats().flushes
            c.kill(2)
            wait_for(lambda: not cache.watching, what="the lost link")
            assert cache.stats().flushes > flushes
            assert b"k" not in cache.local
            # While a node's link is down, reads go to L2 and nothing stale is kept.
            other.set("k", "new")
            assert cache.get("k") == "new"
            assert b"k" not in cache.local
            c.restart(2)
            _watching(cache)
            _in_l1(cache, "k", "new")
            other.set("k", "newer")
            wait_for(lambda: cache.get("k") == "newer", what="a notification after the return")
            # A node that joins is watched too (the node list is read every second).
            joined = c.add()
            wait_for(
                lambda: joined.data in cache._watch.nodes and cache.watching,  # type: ignore[union-attr]
                timeout=30,
                what="a link to the node that joined",
            )
            _in_l1(cache, "k", "newer")
            wire = (url.split("namespace=")[1] + "k").encode()
            c.request(3, Op.SET, [wire, msgpack.packb("via the new node"), None, "all"])
            wait_for(lambda: cache.get("k") == "via the new node", what="the write via it")
        other.close()


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    flags = [
        "--watch-max-watchers",
        "1",
        "--watch-max-prefixes",
        "2",
        "--watch-max-pending-bytes",
        "4096",
    ]
    with running_cluster(1, tmp_path_factory.mktemp("capped"), flags) as c:
        yield c


def test_an_overflowed_queue_flushes_l1(capped: ProcessCluster) -> None:
    ns = _ns()
    url = _url(capped, ns)
    other = open_backend(url)
    try:
        with TieredCache(url) as cache:
            _watching(cache)
            other.set("k", "old")
            _in_l1(cache, "k", "old")
            flushes = cache.stats().flushes
            before = _metric(capped, 0, "hypercache_dist_watch_overflows_total")
            # One burst: the node applies it in one read, so its notifications pass
            # the 4 KiB cap before any could be sent.
            other.set_many({f"burst{i:05d}-{'x' * 40}": i for i in range(2000)})
            wait_for(lambda: cache.stats().flushes > flushes, what="the flush")
            assert b"k" not in cache.local
            assert _metric(capped, 0, "hypercache_dist_watch_overflows_total") > before
            assert cache.watching  # an overflow is no lost link
            other.set("k", "new")
            wait_for(lambda: cache.get("k") == "new", what="notifications after it")
    finally:
        other.close()
    wait_for(lambda: _metric(capped, 0, "hypercache_dist_watchers") == 0, what="the watcher gone")


def test_the_caps_of_watch_refuse_and_are_counted(capped: ProcessCluster) -> None:
    wait_for(lambda: _metric(capped, 0, "hypercache_dist_watchers") == 0, what="no watcher left")
    hello = make_hello("hypercache")
    address = capped.addresses[0]
    with BlockingConnection(address, hello) as first, BlockingConnection(address, hello) as second:
        with pytest.raises(ConfigError, match="watch_max_prefixes"):
            first.request(Op.WATCH, {"prefixes": [b"a", b"b", b"c"]})
        assert first.request(Op.WATCH, {"prefixes": [b"a", b"b"]})["watching"] == 2
        with pytest.raises(NodeUnavailableError, match="watch_max_watchers"):
            second.request(Op.WATCH, {"prefixes": [b"a"]})
        refused = capped[0].http_text("/metrics")
        assert 'hypercache_dist_watch_refused_total{cap="prefixes"} 1.0' in refused
        assert 'hypercache_dist_watch_refused_total{cap="watchers"} 1.0' in refused
        # A write under a watched prefix is pushed to the connection.
        pushed: list[Any] = []
        first.on_push = lambda op, payload: pushed.append((op, payload))
        capped.request(0, Op.SET, [b"a1", b"v", None, "one"])
        capped.request(0, Op.SET, [b"z1", b"v", None, "one"])
        wait_for(lambda: first.read_pushes(0.1) or pushed, what="the push")
        assert pushed == [(int(Op.WATCH), {"keys": [b"a1"]})]
        # [] stops watching: the other connection may watch now.
        assert first.request(Op.WATCH, {"prefixes": []}) == {"watching": 0}
        assert second.request(Op.WATCH, {"prefixes": [b""]})["watching"] == 1
