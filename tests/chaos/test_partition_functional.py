"""Scenario 2: partitions of 5 nodes under QUORUM writers. One node cut off from the
rest, then a 3/2 majority/minority split: QUORUM writes the minority coordinates
fail with QuorumError, the majority's succeed; after healing, every replica
converges within the anti-entropy interval, with nothing acknowledged lost.

The default run holds each partition for 3 s; ``CHAOS_LONG=1`` for 15 s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import pytest
from cluster_harness import running_cluster

from chaos.history import History, lost_writes, non_monotonic_reads, phantoms
from chaos.nemesis import FAULT_FLAGS, heal, partition, set_faults
from chaos.observe import final_values, long_run, report, wait_converged
from chaos.workload import Workload
from hypercache.cluster.local import ProcessCluster, wait_for
from hypercache.errors import QuorumError
from hypercache.net.protocol import Op

pytestmark = pytest.mark.functional

#: anti-entropy's base period here: healing must converge faster than that
AE_INTERVAL = 10.0
NODES = [f"node-{i}" for i in range(1, 6)]


def owners(cluster: ProcessCluster, key: str) -> list[str]:
    body = cluster[0].http_json(f"/dist/owners?key={quote(key)}")
    return [o["node_id"] for o in body["owners"]]


def keys_short_in(cluster: ProcessCluster, minority: Sequence[str], count: int) -> list[str]:
    """Keys with at most one owner in ``minority`` (which cannot make a quorum)."""
    found = []
    for i in range(1000):
        key = f"split-{i}"
        if sum(o in minority for o in owners(cluster, key)) <= 1:
            found.append(key)
            if len(found) == count:
                return found
    raise AssertionError(f"no {count} keys short of a quorum in {minority}")


def split(
    cluster: ProcessCluster, history: History, name: str, minority: Sequence[str], hold: float
) -> dict[str, object]:
    """Partition ``minority`` from the rest under a workload; check both sides'
    QUORUM writes; heal; wait for convergence. The phase's figures."""
    majority = [n for n in NODES if n not in minority]
    keys = keys_short_in(cluster, minority, 5)
    workload = Workload(cluster.addresses, history, writers=8, readers=2, prefix=f"{name}-")
    workload.start()
    try:
        set_faults(cluster, partition(majority, minority))
        start = time.monotonic()
        inside = NODES.index(minority[0])
        wait_for(
            lambda: (
                cluster[inside].http_json("/health")["members_up"] == len(minority)
                and cluster[0].http_json("/health")["members_up"] == len(majority)
            ),
            timeout=30,
            what="each side to see the other down",
        )
        refused = 0
        for key in keys:
            try:
                cluster.request(inside, Op.SET, [key.encode(), b"minority", None, "quorum"])
            except QuorumError:
                refused += 1
            assert cluster.request(0, Op.SET, [key.encode(), b"majority", None, "quorum"]) is True
        time.sleep(max(0.0, hold - (time.monotonic() - start)))  # the workload runs on
    finally:
        workload.stop()
    heal(cluster)
    cluster.wait_healthy()
    converge = wait_converged(cluster, timeout=AE_INTERVAL)
    assert refused == len(keys), f"{refused} of {len(keys)} minority QUORUM writes refused"
    return {f"{name}_minority_refused": refused, f"{name}_converge_s": round(converge, 2)}


def test_partitions_fail_the_minority_and_heal_within_the_sync_interval(tmp_path: Path) -> None:
    hold = 15.0 if long_run() else 3.0
    flags = (*FAULT_FLAGS, "--anti-entropy-interval", str(AE_INTERVAL))
    with running_cluster(5, tmp_path, flags) as cluster:
        history = History()
        figures: dict[str, object] = {"hold_s": hold, "anti_entropy_interval_s": AE_INTERVAL}
        figures |= split(cluster, history, "one", ["node-5"], hold)
        figures |= split(cluster, history, "minority", ["node-4", "node-5"], hold)
        final = final_values(cluster, history.keys())
        lost = lost_writes(history, final)
        phantom = phantoms(history, final)
        backwards = non_monotonic_reads(history)
        figures |= {
            "writes": len(history.writes()),
            "quorum_write_fail_pct": round(100 * history.failure_rate("write"), 3),
            "lost": len(lost),
            "phantom": len(phantom),
            "non_monotonic": len(backwards),
        }
        report("partition", figures)
        assert lost == [] and phantom == [] and backwards == []
