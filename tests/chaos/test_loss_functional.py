"""Scenario 3: 10% message loss both ways between 5 nodes under QUORUM writers:
writes fail < 2% of the time, and nothing acknowledged is lost once the loss stops.
The loss is on the links between nodes: the writers that write through a node
(``write_path="proxy"``) cross them, and their failure rate is the one the retry
policy answers for; those that write the owners directly do not, and are judged too.

The default run keeps the loss up for 5 s; ``CHAOS_LONG=1`` (``make chaos``) for 30 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cluster_harness import running_cluster

from chaos.history import History, lost_writes, non_monotonic_reads, phantoms
from chaos.nemesis import FAULT_FLAGS, heal, injected, loss, set_faults
from chaos.observe import final_values, long_run, report, wait_converged
from chaos.workload import Workload

pytestmark = pytest.mark.functional


def test_ten_percent_loss_both_ways_under_quorum_writers(tmp_path: Path) -> None:
    duration = 30.0 if long_run() else 5.0
    with running_cluster(5, tmp_path, FAULT_FLAGS) as cluster:
        history = History()
        workload = Workload(cluster.addresses, history, writers=8, readers=2)
        set_faults(cluster, loss(0.10))
        workload.start()
        try:
            time.sleep(duration)  # the workload runs under loss (not a wait)
        finally:
            workload.stop()
        drops = sum(injected(node)["drop"] for node in cluster)
        proxied, direct = workload.writers_on("proxy"), workload.writers_on("direct")
        retries = sum(node.http_json("/dist/metrics")["replica_retries"] for node in cluster)
        heal(cluster)
        converge = wait_converged(cluster)
        final = final_values(cluster, history.keys())
        lost = lost_writes(history, final)
        phantom = phantoms(history, final)
        backwards = non_monotonic_reads(history)
        report(
            "loss",
            {
                "loss_pct": 10,
                "duration_s": duration,
                "writes": len(history.writes()),
                "quorum_write_fail_pct": round(100 * history.failure_rate("write"), 3),
                "proxy_write_fail_pct": round(100 * history.failure_rate("write", proxied), 3),
                "direct_write_fail_pct": round(100 * history.failure_rate("write", direct), 3),
                "reads": len(history.reads()),
                "quorum_read_fail_pct": round(100 * history.failure_rate("read"), 3),
                "lost": len(lost),
                "phantom": len(phantom),
                "non_monotonic": len(backwards),
                "drops": drops,
                "replica_retries": retries,
                "converge_s": round(converge, 2),
            },
        )
        assert drops > 0 and proxied and direct
        assert lost == [] and phantom == [] and backwards == []
        assert history.failure_rate("write", proxied) < 0.02, history.counts()
        assert history.failure_rate("write", direct) < 0.02, history.counts()
