"""Data safety against real ``hypercache-node`` processes: late writes, forged
versions and handshakes, resource exhaustion.

Each test reproduces one way that a single frame, handshake or paused process could
lose acknowledged data or stop the cluster, and checks that it no longer does.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from cluster_harness import Cluster, NodeProcess, running_cluster, wait_for

from hypercache.errors import RequestTimeoutError
from hypercache.net.protocol import Op

pytestmark = pytest.mark.functional


def owners(cluster: Cluster, key: bytes) -> list[NodeProcess]:
    """The owners of ``key`` according to node 0's ring, primary first."""
    by_id = {node.node_id: node for node in cluster.nodes}
    answer = cluster[0].http_json(f"/dist/owners?key_hex={key.hex()}")
    return [by_id[o["node_id"]] for o in answer["owners"]]


def key_with_primary(cluster: Cluster, node: NodeProcess, prefix: str) -> bytes:
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
