"""Data safety against real ``hypercache-node`` processes: late writes, forged
versions and handshakes, resource exhaustion.

Each test reproduces one way that a single frame, handshake or paused process could
lose acknowledged data or stop the cluster, and checks that it no longer does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import running_cluster

from hypercache._core.hlc import wall_clock_ms
from hypercache.cluster.config import DistConfig
from hypercache.cluster.local import NODE_COMMAND, NodeProcess, ProcessCluster, wait_for
from hypercache.cluster.membership import layout_of
from hypercache.errors import (
    ClockSkewError,
    HandshakeError,
    HyperCacheError,
    NodeUnavailableError,
    ProtocolError,
    RequestTimeoutError,
)
from hypercache.net.blocking import BlockingConnection
from hypercache.net.protocol import Op, encode_request, make_hello

#: Anti-entropy every second, so that a poisoned version would spread within a test.
FAST_AE = ("--anti-entropy-interval", "1", "--anti-entropy-max-interval", "2")
YEAR_MS = 366 * 86_400_000

pytestmark = pytest.mark.functional


def owners(cluster: ProcessCluster, key: bytes) -> list[NodeProcess]:
    """The owners of ``key`` according to node 0's ring, primary first."""
    by_id = {node.node_id: node for node in cluster.nodes}
    answer = cluster[0].http_json(f"/dist/owners?key_hex={key.hex()}")
    return [by_id[o["node_id"]] for o in answer["owners"]]


def key_with_primary(cluster: ProcessCluster, node: NodeProcess, prefix: str) -> bytes:
    for i in range(10_000):
        key = f"{prefix}-{i}".encode()
        if owners(cluster, key)[0] is node:
            return key
    raise AssertionError(f"no key with primary {node.node_id}")


def net_stats(node: NodeProcess) -> dict[str, int]:
    stats: dict[str, int] = node.http_json("/stats")["net"]
    return stats


def test_a_write_that_timed_out_is_never_applied_over_a_later_acknowledged_one(
    tmp_path: Path,
) -> None:
    with running_cluster(3, tmp_path) as cluster:
        primary = cluster[0]
        key = key_with_primary(cluster, primary, "late")
        paused = cluster.conn(0)  # connected (and handshaken) before the pause
        primary.signal(signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeoutError):
                paused.request(Op.SET, [key, b"v1", None, "quorum"], 1.0)
            # The caller moves on: v2 through another node, acknowledged.
            assert cluster.request(1, Op.SET, [key, b"v2", None, "quorum"]) is True
        finally:
            primary.signal(signal.SIGCONT)
        # The primary reads the stale SET after it resumes, and refuses it unstarted.
        wait_for(lambda: net_stats(primary)["expired"] >= 1, timeout=10, what="v1 refused")

        def everywhere_v2() -> bool:
            return all(
                (cluster.request(n.index, Op.R_GET, [key]) or [None])[0] == b"v2"
                for n in cluster.nodes
            )

        wait_for(everywhere_v2, timeout=10, what="v2 on every replica")
        for node in cluster.nodes:
            assert cluster.request(node.index, Op.GET, [key, "one"]) == [True, b"v2"]


def clock(node: NodeProcess) -> dict[str, int]:
    got: dict[str, int] = node.http_json("/stats")["clock"]
    return got


def ae_rounds(cluster: ProcessCluster) -> list[int]:
    return [node.http_json("/dist/antientropy")["rounds"] for node in cluster]


def wait_ae_rounds(cluster: ProcessCluster, rounds: int) -> None:
    """Wait until every node has run ``rounds`` more anti-entropy rounds."""
    before = ae_rounds(cluster)
    wait_for(
        lambda: all(n >= b + rounds for n, b in zip(ae_rounds(cluster), before, strict=True)),
        timeout=20,
        what=f"{rounds} anti-entropy rounds on every node",
    )


def writes_succeed(
    cluster: ProcessCluster, level: str, n: int, prefix: str, via: tuple[int, ...] = (0, 1, 2)
) -> int:
    """How many of ``n`` writes at ``level``, coordinated by the nodes ``via`` in
    turn, succeed."""
    ok = 0
    for i in range(n):
        with contextlib.suppress(HyperCacheError):
            payload = [f"{prefix}-{i}".encode(), b"v", None, level]
            ok += cluster.request(via[i % len(via)], Op.SET, payload)
    return ok


def test_a_forged_version_at_the_end_of_the_clock_stops_nothing(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path, FAST_AE) as cluster:
        with pytest.raises(ClockSkewError):
            cluster.request(1, Op.R_PUT, [b"poison", b"x", 2**63 - 3, 7, 0, False])
        # Several anti-entropy rounds later, every node still takes writes, and no
        # node's clock has moved towards the forged version.
        wait_ae_rounds(cluster, 2)
        assert writes_succeed(cluster, "quorum", 60, "after-poison") == 60
        for node in cluster.nodes:
            assert abs(clock(node)["drift_ms"]) < 10_000
            assert cluster.request(node.index, Op.R_GET, [b"poison"]) is None
        assert cluster[1].http_json("/dist/metrics")["versions_refused"]["r_put"] == 1


def test_a_version_a_year_ahead_loses_to_a_later_acknowledged_write(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path, FAST_AE) as cluster:
        key = b"future"
        ahead = (wall_clock_ms() + YEAR_MS) << 16
        with pytest.raises(ClockSkewError):
            cluster.request(2, Op.R_PUT, [key, b"from-the-future", ahead, 7, 0, False])
        assert cluster.request(0, Op.SET, [key, b"acked", None, "quorum"]) is True
        wait_ae_rounds(cluster, 2)
        for node in cluster.nodes:
            assert (cluster.request(node.index, Op.R_GET, [key]) or [None])[0] == b"acked"
            assert abs(clock(node)["drift_ms"]) < 10_000
        # A delete's tombstone lives its configured TTL, not a year more.
        assert cluster.request(0, Op.DELETE, [key, "all"]) is True
        for node in cluster.nodes:
            tomb = cluster.request(node.index, Op.R_GET, [key])
            assert tomb[4] is True and tomb[1] >> 16 < wall_clock_ms() + 10_000


def forged_hello(node_id: str, address: str, members: list[list[str]]) -> dict[str, Any]:
    # the cluster's own layout: what is tested is the word about members
    layout = layout_of(DistConfig())
    info = {"node_id": node_id, "address": address, "members": members, "layout": layout}
    return make_hello("hypercache", node_id=node_id, address=address, info=info)


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there afterwards


def test_a_hello_cannot_rewrite_membership(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path) as cluster:
        fakes = [[f"fake-{i}", free_address()] for i in range(8)]
        with BlockingConnection(cluster[0].data, forged_hello("fake-9", free_address(), fakes)):
            pass
        # One claiming node-2's id at a dead address.
        with BlockingConnection(cluster[1].data, forged_hello("node-2", free_address(), [])):
            pass
        with BlockingConnection(cluster[2].data, forged_hello("node-2", free_address(), [])):
            pass
        wait_for(
            lambda: cluster[0].http_json("/cluster/members")["checks_failed"] >= 9,
            timeout=10,
            what="the forged claims checked",
        )
        for node in cluster.nodes:
            members = node.http_json("/cluster/members")["members"]
            assert {m["node_id"]: m["address"] for m in members} == {
                n.node_id: n.data for n in cluster.nodes
            }
        assert writes_succeed(cluster, "quorum", 200, "after-hello") == 200
        assert writes_succeed(cluster, "all", 100, "after-repoint") == 100


def test_a_secret_cluster_refuses_peers_without_the_secret(tmp_path: Path) -> None:
    secret = ("--cluster-secret", "a-secret-of-this-test-cluster")
    with running_cluster(3, tmp_path, secret) as cluster:
        assert writes_succeed(cluster, "all", 20, "secret") == 20
        with pytest.raises(HandshakeError, match="without a proof"):
            BlockingConnection(cluster[0].data, forged_hello("fake", free_address(), []))
        with cluster[0].connect() as client:  # clients need no secret...
            assert client.request(Op.GET, [b"secret-1", "quorum"]) == [True, b"v"]
            with pytest.raises(Exception, match="for cluster peers"):  # ... nor may peer
                client.request(Op.R_PUT_MANY, [[], 0])
        assert cluster[0].http_json("/stats")["peer_auth"]["refused"] == 1


def rss_mb(node: NodeProcess) -> float:
    assert node.proc is not None
    with open(f"/proc/{node.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def raw_client(node: NodeProcess) -> socket.socket:
    host, port = node.data.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(encode_request(1, Op.HELLO, make_hello("hypercache")))
    header = sock.recv(4, socket.MSG_WAITALL)
    sock.recv(struct.unpack(">I", header)[0], socket.MSG_WAITALL)
    return sock


def test_a_client_that_never_reads_cannot_take_the_nodes_memory(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path) as cluster:
        node = cluster[0]
        assert cluster.request(0, Op.SET, [b"big", os.urandom(1 << 20), None, "all"]) is True
        before = rss_mb(node)
        sock = raw_client(node)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            gets = b"".join(encode_request(i, Op.GET, [b"big", "quorum"]) for i in range(2, 1026))
            sock.sendall(gets)
            wait_for(
                lambda: net_stats(node)["output_limit_closes"] == 1,
                timeout=20,
                what="the connection dropped at max_output_buffer",
            )
        finally:
            sock.close()
        # The memory of the unread answers goes back (it took ~590 MB and kept it).
        wait_for(lambda: rss_mb(node) < before + 100, timeout=30, what="RSS back down")
        assert cluster.request(1, Op.GET, [b"big", "quorum"])[0] is True


def test_one_huge_merkle_request_is_refused_before_any_work(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path) as cluster:
        # ~2.5 MiB of groups; it took 6 s of the node's loop. The frame decoder's
        # budget refuses it (it would decode to 24 times its size), closing only
        # that connection...
        items = [[0, 1, 0]] * 200_000
        with (
            cluster[0].connect(as_peer=True) as peer,
            pytest.raises(NodeUnavailableError, match="closed by the server"),
        ):
            peer.request(Op.MERKLE, [0, items], 30)
        assert net_stats(cluster[0])["protocol_errors"] == 1
        # ... and one within the decode budget is refused by MERKLE's own bound.
        items = [[g, 0xFFFF, 2**63 + g] for g in range(60_000)]  # 1.2 MiB
        with cluster[0].connect(as_peer=True) as peer:
            with pytest.raises(ProtocolError, match="at most 256"):
                peer.request(Op.MERKLE, [0, items], 30)
            assert peer.request(Op.PING, None, 5) == "pong"  # that connection goes on
        assert cluster.request(0, Op.PING, None) == "pong"


def test_slow_and_idle_connections_cannot_lock_out_a_peer(tmp_path: Path) -> None:
    flags = ("--frame-timeout", "1", "--max-connections-per-source", "20")
    with running_cluster(3, tmp_path, flags) as cluster:
        node = cluster[0]
        # Slowloris: 10 connections that start a frame and never finish it.
        slow = [raw_client(node) for _ in range(10)]
        for sock in slow:
            sock.sendall(struct.pack(">I", 1000) + b"\x94")
        wait_for(
            lambda: net_stats(node)["frame_timeouts"] == 10, timeout=10, what="slow frames cut"
        )
        for sock in slow:
            sock.close()
        # Idle clients fill the per-source cap (all of them come from 127.0.0.1,
        # like the peers)...
        idle = [raw_client(node) for _ in range(20)]
        try:
            with pytest.raises((HandshakeError, NodeUnavailableError)):
                node.connect()
            # ... and yet a restarted peer gets back in: writes at ALL go through
            # node-1 too (coordinated by the others: node-1 refuses more clients
            # from here, as it should).
            cluster.kill(1)
            cluster.restart(1)
            assert writes_succeed(cluster, "all", 50, "after-restart", via=(1, 2)) == 50
            assert net_stats(node)["rejected_source"] >= 1
        finally:
            for sock in idle:
                sock.close()


def test_a_tombstone_ttl_that_cannot_outlive_a_pause_is_refused() -> None:
    argv = [*NODE_COMMAND, "--tombstone-ttl", "3", "--hint-ttl", "0.5", "--http", "off"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "tombstone_ttl" in proc.stderr
    assert "bring the deleted key back" in proc.stderr or "resurrect" in proc.stderr


def test_a_frame_of_empty_arrays_cannot_blow_up_the_nodes_memory(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path) as cluster:
        node = cluster[0]
        before = rss_mb(node)
        # [0, 2, GET, [[], [], ... 8 Mi empty arrays]]: took a node from 44 to 625 MB.
        n = 8 * 1024 * 1024
        body = b"\x94\x00\x02\x02\xdd" + struct.pack(">I", n) + b"\x90" * n
        sock = raw_client(node)
        try:
            sock.sendall(struct.pack(">I", len(body)) + body)
            wait_for(lambda: net_stats(node)["protocol_errors"] == 1, timeout=20, what="refusal")
        finally:
            sock.close()
        assert rss_mb(node) < before + 100
        assert cluster.request(0, Op.PING, None) == "pong"


def metric(node: NodeProcess, name: str) -> float:
    for line in node.http_text("/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_a_node_waking_from_a_pause_does_not_mark_its_peers_down(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path) as cluster:
        node = cluster[0]
        node.signal(signal.SIGSTOP)
        try:
            time.sleep(3)  # three failure timeouts
        finally:
            node.signal(signal.SIGCONT)
        wait_for(lambda: metric(node, "hypercache_dist_heartbeat_stalls_total") >= 1, timeout=10)
        cluster.wait_healthy()
        # It never took its (healthy) peers for dead, so the writes it coordinates
        # right after waking reach them.
        assert metric(node, "hypercache_dist_liveness_changes_total") == 0
        assert writes_succeed(cluster, "all", 30, "after-wake", via=(0,)) == 30
