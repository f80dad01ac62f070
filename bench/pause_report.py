"""Run the paused-node benchmark and print one markdown report:
``python -m bench.pause_report``.

One ``AsyncClient`` with 32 QUORUM requests in flight (half sets, half gets) against
three real ``hypercache-node`` processes; ops/s and p99 before, during and after a
SIGSTOP of one node; :mod:`bench.bench_pause` says exactly what is timed. Progress
goes to stderr, the report to stdout::

    .venv/bin/python -m bench.pause_report > pause-report.md

``--quick`` runs one short run (a 4 s pause): a smoke test of the harness, not
numbers to quote. ``--runs N`` changes the number of runs (default 3). Exit status 0
whether the target passes or misses; 1 when the benchmark itself failed. A full run
takes about two minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import math
import os
import platform
import shlex
import statistics
import sys
import traceback
from collections.abc import Callable
from importlib import metadata
from operator import methodcaller
from pathlib import Path

from bench.bench_cluster import KEYS, NODES, REPLICATION, VALUE_SIZE, Interrupted
from bench.bench_pause import (
    CONSISTENCY,
    FULL,
    IN_FLIGHT,
    OPS,
    PHASES,
    QUICK,
    PauseResults,
    PauseRun,
    Phase,
    measure,
)
from bench.report import cpu_model, git_commit, load_average, table

#: ``during`` ops/s over ``before`` ops/s must be at least this (the issue's target).
RATIO_GOAL = 0.5
VERSIONED = ("hypercache", "uvloop", "msgpack")


def command_line(argv: list[str]) -> str:
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(Path.cwd())
    return shlex.join([str(exe), "-m", "bench.pause_report", *argv])


def versions() -> str:
    parts = []
    for dist in VERSIONED:
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return ", ".join(parts)


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:,.0f}"


def render(
    results: PauseResults, started: dt.datetime, loads: tuple[float, float], argv: list[str]
) -> str:
    config = results.config
    cpus = os.cpu_count() or 0
    cpu = results.cpu
    cpu_text = (
        "n/a"
        if cpu is None
        else f"this benchmark and its nodes {cpu.ours:.2f}, other processes {cpu.others:.2f}"
    )
    lines = [
        "# hypercache: a paused node under load",
        "",
        f"- Machine: {cpu_model()}, {cpus} logical CPUs, {platform.system()} {platform.machine()}",
        f"- Python: {platform.python_implementation()} {platform.python_version()}; {versions()}",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}, commit {git_commit()}",
        f"- Load average (1 min) before / after the run: {loads[0]:.2f} / {loads[1]:.2f}",
        f"- CPU during the run (average CPUs busy): {cpu_text}",
        f"- Command: `{command_line(argv)}`",
        f"- Cluster: {NODES} nodes, replication {REPLICATION}; one `AsyncClient`, default "
        f"`timeout` (2 s), {IN_FLIGHT} requests in flight, every request "
        f"{CONSISTENCY.upper()}, half sets, half gets; {KEYS:,} keys, {VALUE_SIZE}-byte values",
        f"- Phases: `before` {config.phase:g} s, `during` {config.pause:g} s with one node "
        f"SIGSTOPped (another node each run), `after` the {config.phase:g} s from its SIGCONT "
        f"on; median of {len(results.runs)} run(s)",
    ]
    if config.quick:
        lines.append("- **--quick: smoke test (one short run); do not quote.**")
    rows = []
    for name in PHASES:

        def med(metric: Callable[[Phase], float], name: str = name) -> float:
            return float(statistics.median(metric(run.phases[name]) for run in results.runs))

        rows.append(
            [
                name,
                f"{med(lambda ph: ph.ops_per_s):,.0f}",
                *(_ms(med(methodcaller("p50_ms", op))) for op in OPS),
                *(_ms(med(methodcaller("p99_ms", op))) for op in OPS),
                _ms(med(methodcaller("max_ms"))),
                f"{med(lambda ph: float(sum(ph.failed.values()))):g}",
            ]
        )
    lines += [
        "",
        "## Medians",
        "",
        *table(
            [
                "phase",
                "ops/s",
                "set p50 ms",
                "get p50 ms",
                "set p99 ms",
                "get p99 ms",
                "max ms",
                "failed",
            ],
            rows,
            "lrrrrrrr",
        ),
    ]
    ratio = results.median(lambda r: r.ratio)
    verdict = "passes" if ratio >= RATIO_GOAL else "misses"
    lines += [
        "",
        f"**during / before ops/s: {ratio:.2f}** (target >= {RATIO_GOAL}: {verdict}; per run: "
        + ", ".join(f"{r.ratio:.2f}" for r in results.runs)
        + ")",
        "",
        "## Runs",
        "",
        *table(
            ["run", "node stopped", "before", "during", "after", "during, per second", "client"],
            [_run_row(i, run) for i, run in enumerate(results.runs)],
            "rlrrrll",
        ),
        "",
        "`max ms`: the slowest request that succeeded (a read that waited for a timeout "
        "before asking another owner). Runs: ops/s per phase; `during, per second`: "
        "requests completed in each second of the pause; `client`: counters of the client "
        "that moved during the run, and failed requests by phase and error type.",
        "",
    ]
    return "\n".join(lines)


def _run_row(index: int, run: PauseRun) -> list[str]:
    moved = {k: v for k, v in run.client_stats.items() if v and k not in _NOISY}
    failed = {
        f"{name}:{error}": count
        for name, phase in run.phases.items()
        for error, count in phase.failed.items()
    }
    counters = " ".join(f"{k}={v}" for k, v in {**moved, **failed}.items())
    return [
        str(index + 1),
        f"node-{run.paused_node + 1}",
        *(f"{run.phases[name].ops_per_s:,.0f}" for name in PHASES),
        " ".join(str(n) for n in run.phases["during"].per_second),
        counters,
    ]


#: Counters that move in every run and say nothing about the pause.
_NOISY = frozenset({"requests", "owner_reads"})


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench.pause_report", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="one short run (smoke test)")
    parser.add_argument("--runs", type=int, default=None, help="number of runs (default 3)")
    args = parser.parse_args(args_list)
    config = QUICK if args.quick else FULL
    if args.runs is not None:
        if args.runs < 1:
            parser.error("--runs must be at least 1")
        config = dataclasses.replace(config, runs=args.runs)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started, load_before = dt.datetime.now(dt.UTC), load_average()
    try:
        results = measure(config, progress=progress)
    except Interrupted as exc:
        print(f"pause benchmark {exc}; every process it started was stopped", file=sys.stderr)
        return 128 + exc.signum
    except Exception:
        traceback.print_exc()
        print("pause benchmark failed; every process it started was stopped", file=sys.stderr)
        return 1
    sys.stdout.write(render(results, started, (load_before, load_average()), args_list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
