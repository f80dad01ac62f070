"""``--fault-injection`` on real nodes: ``/internal/faults`` exists only with the flag,
sets and clears rules, and the faults it sets fire (counted) and heal."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import pytest
from chaos.nemesis import FAULT_FLAGS, heal, injected, partition, post_json, set_faults
from cluster_harness import running_cluster

from hypercache.cluster.local import wait_for

pytestmark = pytest.mark.functional


def status_of(call: object) -> int:
    try:
        assert callable(call)
        call()
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


def test_without_the_flag_the_fault_endpoint_does_not_exist(tmp_path: Path) -> None:
    with running_cluster(1, tmp_path) as cluster:
        node = cluster[0]
        assert status_of(lambda: node.http_json("/internal/faults")) == 404
        assert status_of(lambda: post_json(node, "/internal/faults", {"rules": []})) == 404
        assert 'hypercache_dist_faults_injected_total{kind="drop"} 0.0' in node.http_text(
            "/metrics"
        )


def test_rules_are_set_checked_counted_and_cleared_on_real_nodes(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path, FAULT_FLAGS) as cluster:
        first = cluster[0]
        shown = first.http_json("/internal/faults")
        assert shown["rules"] == []
        assert shown["injected"] == {"drop": 0, "delay": 0, "partition": 0}
        assert "node-1" in shown["local"]

        bad = {"rules": [{"kind": "drop", "rate": 2}]}
        try:
            post_json(first, "/internal/faults", bad)
        except urllib.error.HTTPError as exc:
            assert exc.code == 400
            assert exc.read().decode().startswith("rate: ")
        else:
            raise AssertionError("an invalid rule set was accepted")
        assert first.http_json("/internal/faults")["rules"] == []

        # node-3 cut off from the others: they see it down, and count the drops.
        set_faults(cluster, partition(["node-1", "node-2"], ["node-3"]))
        assert first.http_json("/internal/faults")["rules"][0]["kind"] == "partition"
        wait_for(
            lambda: first.http_json("/health")["members_up"] == 2,
            timeout=30,
            what="node-1 to see node-3 down",
        )
        assert injected(first)["partition"] > 0
        assert injected(cluster[2])["partition"] > 0
        counted = re.search(
            r'^hypercache_dist_faults_injected_total\{kind="partition"\} (\S+)$',
            first.http_text("/metrics"),
            re.M,
        )
        assert counted is not None and float(counted.group(1)) > 0

        heal(cluster)
        assert first.http_json("/internal/faults")["rules"] == []
        cluster.wait_healthy()
