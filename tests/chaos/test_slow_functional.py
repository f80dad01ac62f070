"""Scenario 4: a slow node (+200 ms on every message to and from it) and a node
paused with SIGSTOP, 5 nodes under QUORUM writers.

* slow: QUORUM writes do not wait for the slow owner. It owns 3/5 of the keys, so a
  coordinator that waited for every owner would make most writes slower than the
  delay; here fewer than 10% may be (a loaded machine stalls some writes for its
  own reasons). The p99 against the delay is the KPI, reported, not asserted;
* paused for less than the suspicion timeout: no node is declared dead, and once it
  resumes its stale values never win (no acknowledged write lost).

The default run slows the node for 4 s and pauses it for 3 s; ``CHAOS_LONG=1`` for
20 s and 10 s.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from cluster_harness import running_cluster

from chaos.history import History, lost_writes, non_monotonic_reads, phantoms
from chaos.nemesis import FAULT_FLAGS, heal, set_faults
from chaos.observe import final_values, long_run, report, wait_converged
from chaos.workload import Workload
from hypercache.cluster.local import ProcessCluster

pytestmark = pytest.mark.functional

SLOW = 2  # node-3
DELAY = 0.2


def dead_transitions(cluster: ProcessCluster) -> int:
    return sum(
        n.http_json("/stats")["membership"]["transitions"]["dead"] for n in cluster if n.running
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def test_a_slow_node_and_a_paused_node_do_not_slow_or_corrupt_quorums(tmp_path: Path) -> None:
    slow_for, pause_for = (20.0, 10.0) if long_run() else (4.0, 3.0)
    flags = (*FAULT_FLAGS, "--suspect-timeout", str(pause_for + 5))
    with running_cluster(5, tmp_path, flags) as cluster:
        slow_id = cluster[SLOW].node_id
        history = History()
        workload = Workload(cluster.addresses, history, writers=8, readers=2, prefix="slow-")
        rule = {"kind": "delay", "delay_ms": DELAY * 1000, "direction": "both"}
        set_faults([n for n in cluster if n.node_id != slow_id], [{**rule, "peers": [slow_id]}])
        workload.start()
        try:
            time.sleep(slow_for)  # the workload runs against the slow node (not a wait)
        finally:
            workload.stop()
        heal(cluster)
        slow_ms = [
            (op.completed - op.invoked) * 1000
            for op in history.writes()
            if op.outcome == "ok" and op.completed is not None
        ]
        over = sum(ms > DELAY * 1000 for ms in slow_ms)

        paused = History()
        workload = Workload(cluster.addresses, paused, writers=8, readers=2, prefix="pause-")
        dead_before = dead_transitions(cluster)
        workload.start()
        try:
            time.sleep(0.5)
            cluster[SLOW].signal(signal.SIGSTOP)
            try:
                time.sleep(pause_for)  # paused under the workload (not a wait)
            finally:
                cluster[SLOW].signal(signal.SIGCONT)
            time.sleep(1.0)
        finally:
            workload.stop()
        dead_after = dead_transitions(cluster)
        cluster.wait_healthy()
        converge = wait_converged(cluster)
        problems = []
        for h in (history, paused):
            final = final_values(cluster, h.keys())
            problems += lost_writes(h, final) + phantoms(h, final) + non_monotonic_reads(h)
        report(
            "slow",
            {
                "delay_ms": DELAY * 1000,
                "slow_s": slow_for,
                "writes_slow": len(slow_ms),
                "p50_ms": round(percentile(slow_ms, 0.50), 2),
                "p99_ms": round(percentile(slow_ms, 0.99), 2),
                "over_delay": over,
                "pause_s": pause_for,
                "writes_paused": len(paused.writes()),
                "write_fail_pct_paused": round(100 * paused.failure_rate("write"), 3),
                "dead_marks": dead_after - dead_before,
                "converge_s": round(converge, 2),
                "problems": len(problems),
            },
        )
        assert slow_ms and over < len(slow_ms) / 10, (over, len(slow_ms))
        assert dead_after == dead_before
        assert problems == []
