"""SWIM at scale, simulated (hypercache.cluster.swimsim: the real state machine over a
simulated message layer, rounds counted, no wall clock): gossip converges in
O(log N) rounds, no member is taken for dead at 10% message loss, a real failure is
still found under that loss, and a healed partition converges.

Every random choice is seeded, so each run of these tests measures the same rounds.
``python -m bench.bench_swim`` measures more seeds and draws the figure of
``docs/cluster.md``.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

import pytest

from hypercache.cluster.swim import State
from hypercache.cluster.swimsim import SimCluster, convergence_rounds

SIZES = (8, 16, 32, 64, 128, 256)
#: The bound asserted: rounds <= C_LOG * log2(N). Measured (bench_swim, 40 seeds up
#: to 128 nodes, 15 at 256): at most 1.0 * log2(N) rounds, 0.7 * log2(N) on average.
C_LOG = 1.5


def test_gossip_converges_in_logarithmic_rounds(
    tmp_path_factory: pytest.TempPathFactory, record_property: Any
) -> None:
    table: dict[int, list[int]] = {
        n: [convergence_rounds(n, seed) for seed in range(10 if n < 256 else 5)] for n in SIZES
    }
    rows = [
        {
            "n": n,
            "mean": round(statistics.mean(rounds), 2),
            "max": max(rounds),
            "max_over_log2n": round(max(rounds) / math.log2(n), 2),
        }
        for n, rounds in table.items()
    ]
    out = tmp_path_factory.getbasetemp() / "swim_convergence.json"
    out.write_text(json.dumps(rows, indent=1))
    record_property("swim_convergence", rows)
    for n, rounds in table.items():
        assert max(rounds) <= C_LOG * math.log2(n), (n, rounds)
    # Far from linear: 32 times the nodes, not even 3 times the rounds.
    assert statistics.mean(table[256]) < 3 * statistics.mean(table[8])
    assert max(table[256]) < 256 / 16


def test_no_member_is_taken_for_dead_at_ten_percent_message_loss() -> None:
    sim = SimCluster(128, loss=0.1, seed=11)
    sim.run(300)
    suspicions = sum(node.swim.transitions[State.SUSPECT] for node in sim.nodes)
    assert suspicions > 0  # the loss did make probes fail ...
    assert sim.false_dead == []  # ... and every suspect refuted in time
    # Without the loss, every view settles on everyone alive.
    sim.loss = 0.0
    settled = sim.run_until(
        lambda: (
            sim.converged() and all(node.swim.up_count() == len(sim.nodes) for node in sim.nodes)
        ),
        limit=30,
    )
    assert settled is not None


def test_a_real_failure_is_still_found_under_that_loss() -> None:
    sim = SimCluster(64, loss=0.1, seed=5)
    sim.run(20)
    sim.stop(7)
    found = sim.run_until(
        lambda: all(state is State.DEAD for state in sim.states_of("s7").values()), limit=60
    )
    assert found is not None
    assert sim.false_dead == []


def test_a_healed_partition_converges() -> None:
    sim = SimCluster(32, seed=3, push_pull_every=10)
    sim.split(range(16), range(16, 32))
    sim.run(30)  # each side holds the other for dead
    assert set(sim.states_of("s20").values()) == {State.DEAD, State.ALIVE}
    assert all(sim.nodes[i].swim.state_of("s20") is State.DEAD for i in range(16))
    sim.split()
    healed = sim.run_until(
        lambda: (
            sim.converged() and all(node.swim.up_count() == len(sim.nodes) for node in sim.nodes)
        ),
        limit=50,
    )
    assert healed is not None
