"""Scenario 1: SIGKILL one of 5 nodes (RF 3, QUORUM) under 8 writers, restart it:
no acknowledged write lost, no phantom, QUORUM writes fail < 2%, the hints drain.

The default run kills the node for 5 s; ``CHAOS_LONG=1`` (``make chaos``) for 30 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cluster_harness import running_cluster

from chaos.history import History, lost_writes, non_monotonic_reads, phantoms
from chaos.nemesis import FAULT_FLAGS
from chaos.observe import final_values, hint_figures, long_run, report, wait_converged
from chaos.workload import Workload

pytestmark = pytest.mark.functional

VICTIM = 2


def test_sigkill_one_of_five_nodes_under_writers_then_restart(tmp_path: Path) -> None:
    outage = 30.0 if long_run() else 5.0
    with running_cluster(5, tmp_path, FAULT_FLAGS) as cluster:
        history = History()
        workload = Workload(cluster.addresses, history, writers=8, readers=2)
        workload.start()
        try:
            time.sleep(1.0)  # traffic before the fault (a workload phase, not a wait)
            killed_at = time.monotonic()
            before = len(history.writes())
            cluster.kill(VICTIM)
            time.sleep(max(0.0, outage - (time.monotonic() - killed_at)))
            hints = hint_figures(cluster)
            during = len(history.writes()) - before
            cluster.restart(VICTIM)
            restarted_at = time.monotonic()
            time.sleep(1.0)
        finally:
            workload.stop()
        drain = (time.monotonic() - restarted_at) + wait_converged(cluster)
        after = hint_figures(cluster)
        final = final_values(cluster, history.keys())

        lost = lost_writes(history, final)
        phantom = phantoms(history, final)
        backwards = non_monotonic_reads(history)
        replayed = after["replayed"]
        report(
            "kill",
            {
                "outage_s": outage,
                "writes": len(history.writes()),
                "writes_during_outage": during,
                "quorum_write_fail_pct": round(100 * history.failure_rate("write"), 3),
                "lost": len(lost),
                "phantom": len(phantom),
                "non_monotonic": len(backwards),
                "hints_enqueued": hints["enqueued"],
                "hints_queued_at_restart": hints["queued"],
                "hints_replayed": replayed,
                "hints_dropped": after["dropped"],
                "drain_s": round(drain, 2),
                "hints_per_s": round(replayed / drain, 1) if drain else 0,
            },
        )
        assert lost == []
        assert phantom == []
        assert backwards == []
        assert history.failure_rate("write") < 0.02, history.counts()
        assert hints["queued"] > 0 and replayed > 0 and after["dropped"] == 0
