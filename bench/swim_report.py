"""Measure SWIM at scale in simulation and draw it: ``python -m bench.swim_report``.

:mod:`hypercache.cluster.swimsim` runs the real state machine over a simulated
message layer (rounds counted, no sockets, no wall clock). Two measurements:

* **Convergence**: one member dead everywhere, one node removes it; rounds until
  every node's membership version is the same, by piggy-backed gossip alone (no
  push-pull), for N in 8..256, over many seeds;
* **Loss**: 128 nodes for 300 rounds with every message lost with probability 10 %
  and 20 %, with and without the pings to suspects (``notices``): probes that
  failed, suspicions, and members taken for dead while they ran (false deads).

The report (markdown) goes to stdout, progress to stderr; the figure to
``docs/swim-convergence.png`` (``--figure PATH``)::

    .venv/bin/python -m bench.swim_report > swim-report.md

``--quick``: fewer seeds and a shorter loss run, a smoke test of the harness. Every
random choice is seeded: a run measures the same rounds on any machine. A full run
takes about a minute.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.report import git_commit, table
from hypercache.cluster.swim import State
from hypercache.cluster.swimsim import DEFAULT_SETTINGS, SimCluster, convergence_rounds

ROOT = Path(__file__).resolve().parent.parent
SIZES = (8, 16, 32, 64, 128, 256)
#: The bound tests/test_swimsim.py asserts: rounds <= C_LOG * log2(N).
C_LOG = 1.5


def progress(message: str) -> None:
    print(f"[swim] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Convergence:
    n: int
    rounds: list[int]

    @property
    def mean(self) -> float:
        return statistics.mean(self.rounds)

    @property
    def worst(self) -> int:
        return max(self.rounds)


@dataclass(frozen=True)
class LossRun:
    n: int
    loss: float
    notices: int
    rounds: int
    probes_failed: int
    suspicions: int
    false_dead: int
    messages: int


def convergence(seeds: int) -> list[Convergence]:
    out = []
    for n in SIZES:
        start = time.perf_counter()
        out.append(Convergence(n, [convergence_rounds(n, seed) for seed in range(seeds)]))
        progress(
            f"convergence N={n}: {out[-1].mean:.2f} rounds ({time.perf_counter() - start:.1f}s)"
        )
    return out


def loss_run(n: int, loss: float, notices: int, rounds: int) -> LossRun:
    settings = replace(DEFAULT_SETTINGS, notices=notices)
    sim = SimCluster(n, loss=loss, seed=11, settings=settings)
    sim.run(rounds)
    run = LossRun(
        n=n,
        loss=loss,
        notices=notices,
        rounds=rounds,
        probes_failed=sum(node.swim.probes["failed"] for node in sim.nodes),
        suspicions=sum(node.swim.transitions[State.SUSPECT] for node in sim.nodes),
        false_dead=len(sim.false_dead),
        messages=sim.messages,
    )
    progress(f"loss {loss:.0%} notices={notices}: {run.false_dead} false dead")
    return run


def figure(results: list[Convergence], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r.n for r in results]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(ns, [r.mean for r in results], "o-", label="mean rounds")
    ax.plot(ns, [r.worst for r in results], "s--", label="worst run")
    ax.plot(ns, [C_LOG * math.log2(n) for n in ns], ":", color="grey", label=f"{C_LOG} log2 N")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("members N")
    ax.set_ylabel("probe periods until one version everywhere")
    ax.set_title("SWIM gossip: one update reaches every member")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def render(results: list[Convergence], losses: list[LossRun], seeds: int) -> list[str]:
    lines = [
        "# SWIM in simulation",
        "",
        f"`python -m bench.swim_report` at {git_commit()}: the real state machine "
        "(`hypercache.cluster.swim`) over `hypercache.cluster.swimsim`'s message layer. "
        f"Settings: {DEFAULT_SETTINGS.indirect_probes} helpers, suspect timeout "
        f"{DEFAULT_SETTINGS.suspect_timeout:g} periods, {DEFAULT_SETTINGS.max_piggyback} "
        f"records a message, each update sent {DEFAULT_SETTINGS.retransmit_mult}"
        "·ceil(log2(N+1)) times.",
        "",
        f"## Convergence ({seeds} seeds each, piggy-backed gossip only)",
        "",
    ]
    rows = [
        [
            str(r.n),
            f"{r.mean:.2f}",
            str(r.worst),
            f"{r.mean / math.log2(r.n):.2f}",
            f"{r.worst / math.log2(r.n):.2f}",
        ]
        for r in results
    ]
    lines += table(["N", "mean rounds", "worst", "mean / log2 N", "worst / log2 N"], rows, "rrrrr")
    lines += [
        "",
        f"## Message loss ({losses[0].n} nodes, {losses[0].rounds} rounds)" if losses else "",
        "",
    ]
    rows = [
        [
            f"{run.loss:.0%}",
            "on" if run.notices else "off",
            f"{run.probes_failed:,}",
            f"{run.suspicions:,}",
            str(run.false_dead),
            f"{run.messages / (run.n * run.rounds):.1f}",
        ]
        for run in losses
    ]
    lines += table(
        [
            "loss",
            "pings to suspects",
            "probes failed",
            "suspicions (all tables)",
            "false dead",
            "messages / node / round",
        ],
        rows,
        "lrrrrr",
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swim_report")
    parser.add_argument("--quick", action="store_true", help="few seeds, short loss runs")
    parser.add_argument(
        "--figure", type=Path, default=ROOT / "docs" / "swim-convergence.png", help="PNG path"
    )
    args = parser.parse_args(argv)
    seeds = 5 if args.quick else 30
    rounds = 60 if args.quick else 300
    results = convergence(seeds)
    losses = [loss_run(128, loss, notices, rounds) for loss in (0.1, 0.2) for notices in (1, 0)]
    figure(results, args.figure)
    progress(f"figure: {args.figure}")
    print("\n".join(render(results, losses, seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
