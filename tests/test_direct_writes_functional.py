"""One-hop client writes against real ``hypercache-node`` processes.

A client with ``write_path="direct"`` (the default) stamps each write from its own
hybrid logical clock and sends it, as ``W_PUT``, to every owner of the key; an owner
it cannot reach gets the write as a hint through one that took it (``W_HINT``).
The nodes refuse a client version too far from their clocks, and a write for an
owner list they no longer hold; the client then goes through a node (``SET``).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import running_cluster

from hypercache._core.hlc import HLC, LOGICAL_BITS, wall_clock_ms
from hypercache.client import AsyncClient, Client
from hypercache.client.topology import Topology
from hypercache.cluster.local import ProcessCluster, wait_for
from hypercache.errors import ClockSkewError, WrongOwnerError
from hypercache.net.protocol import Op
from hypercache.replication import owners_tag

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    """Three nodes, every key on all three (replication 3)."""
    with running_cluster(3, tmp_path_factory.mktemp("direct")) as cl:
        cl.wait_healthy()
        yield cl


def entries(cluster: ProcessCluster, key: bytes) -> list[Any]:
    """Each node's own entry of ``key`` (``R_GET``: no coordination)."""
    return [cluster.request(i, Op.R_GET, [key]) for i in range(len(cluster))]


def dist(cluster: ProcessCluster, i: int) -> dict[str, Any]:
    stats: dict[str, Any] = cluster[i].http_json("/stats")["dist"]
    return stats


def metric(cluster: ProcessCluster, i: int, line_start: str) -> float:
    for line in cluster[i].http_text("/metrics").splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {line_start}")


def test_a_direct_write_lands_on_every_owner_in_one_hop(cluster: ProcessCluster) -> None:
    before = [dist(cluster, i) for i in range(3)]
    with Client(cluster.addresses, consistency="quorum") as client:
        client.set("one-hop", "v1")
        assert client.stats.direct_writes == 1
        assert client.stats.direct_write_fallbacks == 0
        tag = client._hlc.tag
        value = client.options.serializer.dumps("v1")
    # QUORUM returns at two acks; the third owner's copy is on its way.
    wait_for(
        lambda: all(e is not None and e[0] == value for e in entries(cluster, b"one-hop")),
        timeout=10,
        what="the write on every owner",
    )
    for e in entries(cluster, b"one-hop"):
        assert e[2] == tag  # the client's origin: stamped by the client, not a node
    after = [dist(cluster, i) for i in range(3)]
    for b, a in zip(before, after, strict=True):
        assert a["direct_puts"] == b["direct_puts"] + 1
        assert a["requests"]["set"] == b["requests"]["set"]  # no node coordinated it
        assert a["forwards"]["r_put"] == b["forwards"]["r_put"]  # nor replicated it


def test_the_async_client_writes_direct_too(cluster: ProcessCluster) -> None:
    async def main() -> tuple[int, int]:
        async with AsyncClient(cluster.addresses, consistency="all") as client:
            await client.set("one-hop-async", 7)
            assert await client.get("one-hop-async") == 7
            return client.stats.direct_writes, client._hlc.tag

    writes, tag = asyncio.run(main())
    assert writes == 1
    assert [e[2] for e in entries(cluster, b"one-hop-async")] == [tag] * 3


def test_write_path_proxy_goes_through_a_node(cluster: ProcessCluster) -> None:
    before = sum(dist(cluster, i)["requests"]["set"] for i in range(3))
    with Client(cluster.addresses, consistency="quorum", write_path="proxy") as client:
        client.set("proxied", "p")
        assert client.get("proxied") == "p"
        assert client.stats.direct_writes == 0
        tag = client._hlc.tag
    assert sum(dist(cluster, i)["requests"]["set"] for i in range(3)) == before + 1
    assert all(e[2] != tag for e in entries(cluster, b"proxied") if e is not None)


def test_a_client_clock_far_ahead_is_refused_and_the_write_goes_through_a_node(
    cluster: ProcessCluster,
) -> None:
    before = metric(cluster, 0, 'hypercache_dist_versions_refused_total{path="client"}')
    hour = 3_600_000
    with Client(cluster.addresses, consistency="all") as client:
        # The client's clock runs an hour ahead of the nodes'.
        client._hlc = HLC(client._hlc.tag, clock=lambda: wall_clock_ms() + hour)
        client.set("future", "f")
        assert client.stats.direct_writes == 0
        assert client.stats.direct_write_fallbacks == 1
        assert client.get("future") == "f"
        tag = client._hlc.tag
    for e in entries(cluster, b"future"):
        assert e[2] != tag  # a node stamped it
        assert e[1] >> LOGICAL_BITS < wall_clock_ms() + 1000  # and not an hour ahead
    after = metric(cluster, 0, 'hypercache_dist_versions_refused_total{path="client"}')
    assert after == before + 1
    # The error itself, as a client sees it (code 12, ClockSkewError).
    row = cluster.request(0, Op.TOPOLOGY, None)
    ids = [row["nodes"][i][0] for i in row["table"][0]]
    key = next(
        k
        for k in (b"skew-%d" % i for i in range(10_000))
        if Topology.from_wire(row).owners(k) == Topology.from_wire(row).partition_owners(0)
    )
    ahead = (wall_clock_ms() + hour) << LOGICAL_BITS
    with pytest.raises(ClockSkewError, match="max_clock_skew"):
        cluster.request(0, Op.W_PUT, [key, b"x", ahead, 7, 0, False, owners_tag(ids)])
    behind = (wall_clock_ms() - hour) << LOGICAL_BITS
    with pytest.raises(ClockSkewError, match="behind"):
        cluster.request(0, Op.W_PUT, [key, b"x", behind, 7, 0, False, owners_tag(ids)])
    # An owner list in another order (the ring moved under the client): an owner
    # still takes the write (the key is its), and says the client's list is stale.
    now = wall_clock_ms() << LOGICAL_BITS
    applied, clock, stale = cluster.request(
        0, Op.W_PUT, [key, b"x", now, 7, 0, False, owners_tag(ids[::-1])]
    )
    assert (applied, stale) == (True, True) and clock > now


def test_an_owner_list_in_another_order_is_written_and_flagged_stale(
    cluster: ProcessCluster,
) -> None:
    with Client(cluster.addresses, consistency="quorum") as client:
        table = client.topology()
        wire = table.as_dict()
        wire["table"] = [row[1:] + row[:1] for row in wire["table"]]
        now = time.monotonic()
        client._router.set_topology(Topology.from_wire(wire), now)
        client.set("reordered", "r")
        assert client.stats.direct_writes == 1
        assert client.stats.stale_table_writes == 1
        # fetched again soon (within MIN_REFRESH of the write), not every 30 s
        assert client._router._next_refresh <= time.monotonic() + 1.0
        assert client.get("reordered") == "r"


def test_a_stale_table_is_fetched_again_then_the_write_goes_direct(tmp_path: Path) -> None:
    """With replication 2 of 3, a table naming a node that does not own the key: that
    node refuses the write (WrongOwnerError, nothing applied); the client fetches
    the table and writes again, to the right owners."""
    with running_cluster(3, tmp_path, ("--replication", "2")) as cl:
        cl.wait_healthy()
        with Client(cl.addresses, consistency="quorum") as client:
            table = client.topology()
            fetched = client.stats.topology_refreshes
            n = len(table.nodes)
            # Each row's owners become the node it lacks, then its primary.
            wire = table.as_dict()
            wire["table"] = [
                [next(i for i in range(n) if i not in row), row[0]] for row in wire["table"]
            ]
            stale_table = Topology.from_wire(wire)
            client._router.set_topology(stale_table, time.monotonic())
            client._router.fetched_at = 0.0  # (long ago: the write may fetch again)
            client.set("stale-table", "s")
            assert client.stats.stale_table_writes >= 1
            assert client.stats.topology_refreshes == fetched + 1
            assert client.stats.direct_writes == 1
            assert client.stats.direct_write_fallbacks == 0
            assert client.get("stale-table") == "s"
            assert client._router.topology is not None
            assert client._router.topology.table == table.table
        wrong = stale_table.owners(b"stale-table")[0]
        index = cl.addresses.index(wrong)
        with pytest.raises(WrongOwnerError):  # it holds nothing of the partition
            cl.request(index, Op.R_GET, [b"stale-table"])
        row = cl.request(index, Op.TOPOLOGY, None)
        ids = [row["nodes"][i][0] for i in stale_table.table[0]]
        key = next(
            k for k in (b"w-%d" % i for i in range(10_000)) if stale_table.partition_of(k) == 0
        )
        with pytest.raises(WrongOwnerError, match="not an owner"):
            now = wall_clock_ms() << LOGICAL_BITS
            cl.request(
                cl.addresses.index(stale_table.owners(key)[0]),
                Op.W_PUT,
                [key, b"x", now, 7, 0, False, owners_tag(ids)],
            )


def test_a_dead_owner_gets_a_hint_that_is_replayed(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path) as cl:
        cl.wait_healthy()
        with Client(cl.addresses, consistency="quorum") as client:
            client.connect()
            cl.kill(2)
            # The survivors see node 3 down (their hints wait for it to come back).
            wait_for(lambda: cl.healthy(up=2), timeout=20, what="node 3 seen down")
            client.set("hinted", "h")
            assert client.stats.direct_writes == 1
            assert client.stats.write_hints == 1
            tag = client._hlc.tag
            value = client.options.serializer.dumps("h")
        hints = sum(dist(cl, i)["client_hints"] for i in range(2))
        assert hints == 1
        cl.respawn(2)
        cl.wait_healthy()
        wait_for(
            lambda: (e := cl.request(2, Op.R_GET, [b"hinted"])) is not None and e[0] == value,
            timeout=30,
            what="the write on the owner that was dead",
        )
        assert cl.request(2, Op.R_GET, [b"hinted"])[2] == tag
        replayed = sum(cl[i].http_json("/dist/hints")["replayed"] for i in range(2))
        assert replayed >= 1


def test_a_stale_client_version_loses_to_a_later_proxy_write(cluster: ProcessCluster) -> None:
    """Last writer wins, across the paths: a direct write stamped before a proxy
    write (a client clock behind, within the skew bound) does not overwrite it."""
    with (
        Client(cluster.addresses, consistency="all") as late,
        Client(cluster.addresses, consistency="all", write_path="proxy") as proxy,
    ):
        late._hlc = HLC(late._hlc.tag, clock=lambda: wall_clock_ms() - 2000)
        late.topology()
        proxy.set("lww", "proxy")  # stamped by a node, now
        late.set("lww", "late-direct")  # stamped 2 s ago: older
        assert late.stats.direct_writes == 1
        assert late.get("lww") == "proxy"
        assert proxy.get("lww") == "proxy"
        value = proxy.options.serializer.dumps("proxy")
    assert [e[0] for e in entries(cluster, b"lww")] == [value] * 3


class Recording:
    """A client's clock that remembers the last timestamp it stamped."""

    def __init__(self, hlc: HLC) -> None:
        self.hlc = hlc
        self.tag = hlc.tag
        self.stamped = 0

    def now(self) -> int:
        self.stamped = self.hlc.now()
        return self.stamped

    @property
    def last(self) -> int:
        return self.hlc.last

    def admits(self, ts: object) -> bool:
        return self.hlc.admits(ts)

    def update(self, ts: int) -> int:
        return self.hlc.update(ts)


def test_direct_and_proxy_writers_on_one_key_converge_to_the_newest(
    cluster: ProcessCluster,
) -> None:
    """Several writers (direct ones with clocks off by up to half a second, proxy
    ones) hammer one key; at the end every replica holds the same version, newer
    than or equal to every version a direct writer had acknowledged."""
    key = b"contended"
    acked: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    rng = random.Random(13)

    def writer(n: int, path: str, offset: int) -> None:
        try:
            with Client(cluster.addresses, consistency="quorum", write_path=path) as c:
                clock = Recording(HLC(c._hlc.tag, clock=lambda: wall_clock_ms() + offset))
                if path == "direct":
                    c._hlc = clock  # type: ignore[assignment]
                for i in range(40):
                    c.set(key, f"{n}:{i}")
                    if path == "direct" and c.stats.direct_writes == i + 1:
                        acked.append((clock.stamped, clock.tag))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(n, path, rng.randint(-500, 500)))
        for n, path in enumerate(["direct", "direct", "direct", "proxy", "proxy"])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert acked

    def converged() -> bool:
        got = entries(cluster, key)
        return all(e is not None for e in got) and len({(e[1], e[2]) for e in got}) == 1

    wait_for(converged, timeout=20, what="the replicas agreeing")
    final = entries(cluster, key)[0]
    assert (final[1], final[2]) >= max(acked)
