"""A real 3-node cluster of ``hypercache-node`` processes on loopback.

Clients speak the wire protocol directly (``hypercache.net.blocking``): ``GET``,
``SET``, ``DELETE`` to any node, ``R_GET`` / ``R_PUT`` to reach one replica.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import FAST_FLAGS, running_cluster

from hypercache.cluster.local import NODE_COMMAND, NodeProcess, ProcessCluster, wait_for
from hypercache.errors import QuorumError
from hypercache.net.protocol import Op

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    with running_cluster(3, tmp_path_factory.mktemp("cluster")) as c:
        yield c


def owners(cluster: ProcessCluster, key: bytes) -> list[NodeProcess]:
    """The owners of ``key`` according to node 0's ring, as processes."""
    by_id = {node.node_id: node for node in cluster.nodes}
    answer = cluster[0].http_json(f"/dist/owners?key_hex={key.hex()}")
    return [by_id[o["node_id"]] for o in answer["owners"]]


def r_get(cluster: ProcessCluster, node: NodeProcess, key: bytes) -> Any:
    return cluster.request(node.index, Op.R_GET, [key])


def test_quorum_write_through_one_node_is_read_through_another(cluster: ProcessCluster) -> None:
    assert cluster.request(0, Op.SET, [b"greeting", b"hello", None, "quorum"]) is True
    assert cluster.request(1, Op.GET, [b"greeting", "quorum"]) == [True, b"hello"]
    assert cluster.request(2, Op.GET, [b"greeting", None]) == [True, b"hello"]
    assert cluster.request(1, Op.GET, [b"no-such-key", "quorum"]) == [False, None]
    # Deletes answer whether a live value existed, and leave the key absent.
    assert cluster.request(2, Op.DELETE, [b"greeting", "quorum"]) is True
    assert cluster.request(0, Op.GET, [b"greeting", "quorum"]) == [False, None]
    assert cluster.request(1, Op.DELETE, [b"greeting", "quorum"]) is False
    # TTLs travel as absolute expiries.
    assert cluster.request(0, Op.SET, [b"brief", b"x", 200, "all"]) is True
    wait_for(
        lambda: cluster.request(1, Op.GET, [b"brief", "quorum"]) == [False, None],
        timeout=5,
        what="the TTL to expire",
    )


def test_topology_and_ping(cluster: ProcessCluster) -> None:
    assert cluster.request(0, Op.PING, None) == "pong"
    topo = cluster.request(1, Op.TOPOLOGY, None)
    assert topo["nodes"] == sorted([n.node_id, n.data] for n in cluster.nodes)
    assert topo["replication"] == 3
    assert len(topo["table"]) == topo["partitions"]
    assert all(sorted(row) == [0, 1, 2] for row in topo["table"])


def test_management_http(cluster: ProcessCluster) -> None:
    node = cluster[0]
    cluster.request(0, Op.SET, [b"http-key", b"v", None, "all"])
    health = node.http_json("/health")
    assert health["status"] == "ok" and health["members_up"] == 3
    stats = node.http_json("/stats")
    assert stats["node_id"] == "node-1" and stats["keys"] >= 1
    assert "hypercache_" in node.http_text("/metrics")
    metrics = node.http_text("/metrics")
    assert "hypercache_dist_write_acks" in metrics
    # Every cap that can bite has its counter: in-flight cap, write backpressure,
    # deadlines, hint caps, read repairs in flight, the store's byte budget.
    for name in (
        "hypercache_net_inflight_pauses",
        "hypercache_net_write_pauses",
        "hypercache_net_timeouts",
        "hypercache_dist_hints_dropped",
        "hypercache_dist_read_repairs_dropped",
        "hypercache_evictions",
        # connection caps, request deadlines, the clock's horizon, peer trust
        "hypercache_net_expired",
        "hypercache_net_rejected_source",
        "hypercache_net_rejected_pending",
        "hypercache_net_rejected_clients",
        "hypercache_net_frame_timeouts",
        "hypercache_net_idle_closes",
        "hypercache_net_output_limit_closes",
        "hypercache_dist_versions_refused",
        "hypercache_dist_peer_handshakes_refused",
        "hypercache_dist_peer_ops_refused",
        "hypercache_dist_member_candidates_dropped",
    ):
        assert name in metrics, name
    assert node.http_json("/config")["node_id"] == "node-1"
    owners_answer = node.http_json("/dist/owners?key=http-key")
    assert sorted(o["node_id"] for o in owners_answer["owners"]) == [
        "node-1",
        "node-2",
        "node-3",
    ]
    members = node.http_json("/cluster/members")
    assert sorted(m["node_id"] for m in members["members"]) == ["node-1", "node-2", "node-3"]
    assert all(m["up"] for m in members["members"])
    ring = node.http_json("/cluster/ring")
    assert ring["nodes"] == ["node-1", "node-2", "node-3"]
    dist = node.http_json("/dist/metrics")
    assert dist["write_acks"] > 0 and "set" in dist["latency"]


def test_dist_owners_answers_for_the_bytes_the_query_names(cluster: ProcessCluster) -> None:
    node = cluster[0]
    raw = node.http_json("/dist/owners?key=%FF%FE")
    assert raw["key_hex"] == "fffe"  # the bytes sent, not U+FFFD twice
    assert raw == node.http_json("/dist/owners?key_hex=fffe")
    assert node.http_json("/dist/owners?key=caf%C3%A9")["key"] == "café"
    assert node.http_json("/dist/owners?key=a+b%2Bc")["key"] == "a b+c"
    # a key as long as a URL gets: answered (aiohttp alone stops at 8190 bytes)
    long_key = "k" * 8192
    assert node.http_json(f"/dist/owners?key={long_key}")["key"] == long_key
    with pytest.raises(urllib.error.HTTPError) as info:
        node.http_json("/dist/owners?key=" + "%41" * (64 * 1024 + 1))
    assert info.value.code == 400
    assert info.value.read().decode() == "key: 65537 bytes is over max_key=65536"


def test_stale_replica_is_repaired_by_a_quorum_read(cluster: ProcessCluster) -> None:
    key = b"repair-me"
    cluster.request(0, Op.SET, [key, b"old", None, "all"])
    a, b, stale = owners(cluster, key)
    value, ts, origin, _, tomb = r_get(cluster, a, key)
    assert (value, tomb) == (b"old", False)
    # A newer version reaches two owners only: the third is now stale.
    newer = [key, b"new", ts + 1, origin, 0, False]
    assert cluster.request(a.index, Op.R_PUT, newer) is True
    assert cluster.request(b.index, Op.R_PUT, newer) is True
    assert cluster.request(a.index, Op.R_PUT, newer) is False  # equal version: no-op
    assert r_get(cluster, stale, key)[0] == b"old"
    before = cluster[0].http_json("/dist/metrics")["read_repairs"]

    assert cluster.request(0, Op.GET, [key, "quorum"]) == [True, b"new"]
    wait_for(
        lambda: r_get(cluster, stale, key)[:3] == [b"new", ts + 1, origin],
        timeout=5,
        what="read repair of the stale owner",
    )
    assert cluster[0].http_json("/dist/metrics")["read_repairs"] > before


def test_concurrent_writers_leave_one_value_on_all_owners(cluster: ProcessCluster) -> None:
    key = b"contended"
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            with cluster[w % 3].connect() as conn:
                for i in range(25):
                    conn.request(Op.SET, [key, f"w{w}-{i}".encode(), None, "quorum"], 10)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors

    def converged() -> bool:
        entries = [r_get(cluster, node, key) for node in owners(cluster, key)]
        return all(e == entries[0] for e in entries)

    wait_for(converged, timeout=10, what="every owner to hold the same version")
    value = r_get(cluster, cluster[0], key)[0]
    assert value.startswith(b"w") and value.endswith(b"-24")  # some writer's last write
    for i in range(3):
        assert cluster.request(i, Op.GET, [key, "all"]) == [True, value]


def test_sigkill_one_node_quorum_survives_all_fails(cluster: ProcessCluster) -> None:
    keys = [f"k{i:03d}".encode() for i in range(200)]
    answers = cluster.conn(0).pipeline([(Op.SET, [k, b"v-" + k, None, "quorum"]) for k in keys], 30)
    assert answers == [True] * len(keys)
    cluster.kill(2)
    try:
        for index in (0, 1):
            got = cluster.conn(index).pipeline([(Op.GET, [k, "quorum"]) for k in keys], 30)
            assert got == [[True, b"v-" + k] for k in keys]
        answers = cluster.conn(1).pipeline(
            [(Op.SET, [k, b"w-" + k, None, "quorum"]) for k in keys], 30
        )
        assert answers == [True] * len(keys)
        got = cluster.conn(0).pipeline([(Op.GET, [k, "quorum"]) for k in keys], 30)
        assert got == [[True, b"w-" + k] for k in keys]
        with pytest.raises(QuorumError) as info:
            cluster.request(0, Op.SET, [keys[0], b"x", None, "all"])
        assert (info.value.acks, info.value.required) == (2, 3)
        with pytest.raises(QuorumError) as info:
            cluster.request(1, Op.GET, [keys[0], "all"])
        assert (info.value.acks, info.value.required) == (2, 3)
        metrics = cluster[0].http_json("/dist/metrics")
        assert metrics["quorum_failures"]["set"] >= 1
    finally:
        cluster.restart(2)
    # Back with an empty store: QUORUM still reads every key (R + W > N). The ALL
    # write that failed still landed on the two live owners: a failed write is not
    # rolled back (QuorumError reports how many owners took it).
    got = cluster.conn(2).pipeline([(Op.GET, [k, "quorum"]) for k in keys], 30)
    assert got == [[True, b"x"]] + [[True, b"w-" + k] for k in keys[1:]]


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    node = NodeProcess(0, "lonely", tmp_path, FAST_FLAGS)
    node.start(bind="127.0.0.1:0", http="127.0.0.1:0", seeds=())
    try:
        node.wait_ready()
        assert node.http_json("/health")["status"] == "ok"
        node.signal(signal.SIGTERM)
        assert node.proc is not None
        assert node.proc.wait(timeout=10) == 0
        assert "stopped" in node.log_path.read_text()
    finally:
        node.stop()


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--replication", "three"], "replication"),
        (["--read-consistency", "most"], "read_consistency"),
        (["--bind", "nowhere"], "bind"),
    ],
)
def test_bad_flag_exits_2_naming_the_field(flags: list[str], field: str) -> None:
    proc = subprocess.run(
        [*NODE_COMMAND, *flags], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 2
    assert f"error: {field}:" in proc.stderr


def test_health_is_degraded_while_a_member_is_down_naming_it(tmp_path: Path) -> None:
    with running_cluster(4, tmp_path, ("--replication", "2")) as cluster:
        assert cluster[0].http_json("/health")["status"] == "ok"
        cluster.kill(3)
        cluster.wait_healthy(up=3)
        health = cluster[0].http_json("/health")
        assert health["status"] == "degraded"
        missing = health["missing"]
        assert missing["down"] == ["node-4"]
        # replication 2 of 4 members: node-4 owns about half the partitions
        assert 0.3 < missing["partitions_short"] / missing["partitions"] < 0.7, missing
        cluster.restart(3)
        cluster.wait_healthy()
        assert "missing" not in cluster[0].http_json("/health")
