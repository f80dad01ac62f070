"""Membership on SWIM across real ``hypercache-node`` processes on loopback: a killed
node goes suspect then dead and stays in the ring, ``POST /cluster/remove`` takes it
out of every ring, and every report shows the same membership version."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import FAST_FLAGS, running_cluster

from hypercache.cluster.local import NodeProcess, ProcessCluster, wait_for
from hypercache.net.protocol import Op

pytestmark = pytest.mark.functional


def post(node: NodeProcess, path: str) -> tuple[int, Any]:
    """``POST`` a management path: the status and the body (JSON, or the text of a
    400)."""
    request = urllib.request.Request(f"http://{node.http}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, body.decode() if exc.code == 400 else json.loads(body)


def states(node: NodeProcess) -> dict[str, str]:
    return {m["node_id"]: m["state"] for m in node.http_json("/cluster/members")["members"]}


def samples(node: NodeProcess) -> dict[str, float]:
    lines = node.http_text("/metrics").splitlines()
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in lines if line and line[0] != "#")
    }


def one_version(cluster: ProcessCluster, nodes: list[NodeProcess]) -> bool:
    """Whether every report of every node shows the same membership version.

    :raises AssertionError: they differ (with what each node's table holds: the
        last one is the cause of a wait's time-out).
    """
    seen: dict[str, set[int]] = {}
    for node in nodes:
        seen[node.node_id] = {
            node.http_json("/cluster/members")["version"],
            node.http_json("/health")["version"],
            node.http_json("/stats")["membership"]["version"],
            int(samples(node)["hypercache_dist_membership_version"]),
            cluster.request(node.index, Op.TOPOLOGY, None)["version"],
        }
    if len(set().union(*seen.values())) == 1:
        return True
    tables = {
        node.node_id: [
            (m["node_id"], m["address"], m["state"], m["incarnation"])
            for m in node.http_json("/cluster/members")["members"]
        ]
        for node in nodes
    }
    raise AssertionError(f"versions {seen}, tables {tables}")


def test_a_killed_node_goes_dead_and_is_removed_everywhere(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path, ("--suspect-timeout", "0.5")) as cluster:
        wait_for(lambda: one_version(cluster, cluster.nodes), what="one version")
        live = cluster.nodes[:2]
        cluster.kill(2)  # returns once the others see it down
        wait_for(
            lambda: all(states(n)["node-3"] == "dead" for n in live),
            timeout=20,
            what="node-3 dead on both",
        )
        for node in live:  # dead, still an owner
            assert node.http_json("/cluster/ring")["nodes"] == ["node-1", "node-2", "node-3"]
            assert samples(node)['hypercache_dist_member_transitions_total{to="dead"}'] >= 1
        code, body = post(cluster[0], "/cluster/remove?node=node-2")
        assert code == 409 and "node-2 is alive" in body["error"]
        assert post(cluster[0], "/cluster/remove?node=nobody")[0] == 404
        assert post(cluster[0], "/cluster/remove")[0] == 400
        code, body = post(cluster[0], "/cluster/remove?node=node-3")
        assert (code, body["removed"]) == (200, True)
        wait_for(
            lambda: all(states(n)["node-3"] == "removed" for n in live),
            timeout=20,
            what="node-3 removed on both",
        )
        for node in live:
            assert node.http_json("/cluster/ring")["nodes"] == ["node-1", "node-2"]
            assert node.http_json("/health")["members"] == 2
        wait_for(lambda: one_version(cluster, live), what="one version again")
        for i in range(20):  # ALL is both remaining owners
            assert cluster.request(i % 2, Op.SET, [b"k%d" % i, b"v", None, "all"]) is True
        assert samples(cluster[0])['hypercache_dist_probes_total{result="ack"}'] > 0


def test_a_node_with_another_layout_is_refused_on_both_sides(tmp_path: Path) -> None:
    with running_cluster(2, tmp_path) as cluster:
        odd = NodeProcess(
            9, "odd", tmp_path, (*FAST_FLAGS, "--replication", "1", "--partitions", "256")
        )
        odd.start(bind="127.0.0.1:0", http="127.0.0.1:0", seeds=[cluster[0].data])
        try:
            odd.wait_ready()

            def refused() -> bool:
                seed = samples(cluster[0])["hypercache_dist_peer_layout_refused_total"]
                return seed >= 1 and "refused us" in odd.log_path.read_text()

            wait_for(refused, timeout=15, interval=0.1, what="the layouts refused")
            assert set(states(cluster[0])) == {"node-1", "node-2"}
            assert set(states(odd)) == {"odd"}
            expected = (
                f"peer 'odd' at {odd.data} runs with partitions=256 replication=1 vnodes=2048; "
                "node-1 runs with partitions=4096 replication=3 vnodes=2048"
            )
            for node, says in ((odd, "refused us"), (cluster[0], "refusing peer")):
                lines = [ln for ln in node.log_path.read_text().splitlines() if says in ln]
                assert len(lines) == 1, lines  # once, not at every retry
                assert expected in lines[0], lines[0]
            assert cluster[0].http_json("/cluster/members")["layout_refused"] >= 1
        finally:
            odd.stop()
