"""Scenario 5: a combined nemesis on 5 nodes under QUORUM writers. Every period one
fault, drawn at random (seeded), is applied and then undone: SIGKILL and restart a
node, SIGSTOP and resume one, a partition (one node, or a 3/2 split), or 10% loss.
Then everything heals: 0 lost, 0 phantom, replicas converged.

The default run draws 4 faults of 2 s; ``CHAOS_LONG=1`` (``make chaos``) one every
10 s for 2 minutes.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
from cluster_harness import running_cluster

from chaos.history import History, lost_writes, non_monotonic_reads, phantoms
from chaos.nemesis import FAULT_FLAGS, heal, loss, partition, set_faults
from chaos.observe import final_values, hint_figures, long_run, report, wait_converged
from chaos.workload import Workload
from hypercache.cluster.local import ProcessCluster

pytestmark = pytest.mark.functional

SEED = 20261204
FAULTS = ("kill", "pause", "partition", "loss")


def apply(cluster: ProcessCluster, fault: str, rng: random.Random, period: float) -> str:
    """Apply ``fault`` for ``period`` seconds, then undo it; what was done."""
    start = time.monotonic()
    victim = rng.randrange(len(cluster))
    ids = [node.node_id for node in cluster]
    if fault == "kill":
        cluster.kill(victim)
        time.sleep(max(0.0, period - (time.monotonic() - start)))
        cluster.restart(victim)
        return f"kill {ids[victim]}"
    if fault == "pause":
        cluster[victim].signal(signal.SIGSTOP)
        try:
            time.sleep(period)
        finally:
            cluster[victim].signal(signal.SIGCONT)
        cluster.wait_healthy()
        return f"pause {ids[victim]}"
    if fault == "partition":
        minority = rng.sample(ids, rng.choice((1, 2)))
        set_faults(cluster, partition([i for i in ids if i not in minority], minority))
        time.sleep(period)
        heal(cluster)
        cluster.wait_healthy()
        return f"partition {'+'.join(sorted(minority))}"
    set_faults(cluster, loss(0.10))
    time.sleep(period)
    heal(cluster)
    return "loss 10%"


def test_a_random_fault_every_period_then_heal(tmp_path: Path) -> None:
    period, rounds = (10.0, 12) if long_run() else (2.0, 4)
    rng = random.Random(SEED)
    with running_cluster(5, tmp_path, FAULT_FLAGS) as cluster:
        history = History()
        workload = Workload(cluster.addresses, history, writers=8, readers=2)
        done = []
        workload.start()
        try:
            # every kind once (in a random order), then at random
            kinds = rng.sample(FAULTS, len(FAULTS))
            kinds += [rng.choice(FAULTS) for _ in range(rounds - len(FAULTS))]
            for fault in kinds:
                done.append(apply(cluster, fault, rng, period))
        finally:
            workload.stop()
            heal(cluster)
        cluster.wait_healthy()
        converge = wait_converged(cluster)
        hints = hint_figures(cluster)
        final = final_values(cluster, history.keys())
        lost = lost_writes(history, final)
        phantom = phantoms(history, final)
        backwards = non_monotonic_reads(history)
        report(
            "nemesis",
            {
                "faults": ",".join(f.replace(" ", ":") for f in done),
                "period_s": period,
                "writes": len(history.writes()),
                "quorum_write_fail_pct": round(100 * history.failure_rate("write"), 3),
                "lost": len(lost),
                "phantom": len(phantom),
                "non_monotonic": len(backwards),
                "hints_replayed": hints["replayed"],
                "hints_dropped": hints["dropped"],
                "converge_s": round(converge, 2),
            },
        )
        assert lost == [] and phantom == [] and backwards == []
