"""Run the rebalancing benchmark and print one markdown report:
``python -m bench.rebalance_report``.

A 4th node joins a 3-node cluster of real ``hypercache-node`` processes holding
``--keys`` keys of 100 bytes under a steady QUORUM load; :mod:`bench.bench_rebalance`
says exactly what is timed. Each size runs ``--runs`` times (a fresh cluster each
time) and the report gives the median of every figure, and each run. Progress goes
to stderr, the report to stdout::

    .venv/bin/python -m bench.rebalance_report > rebalance-report.md

``--keys`` may be repeated (default: 200,000 and 1,000,000). ``--quick``: one run of
50,000 keys, a smoke test of the harness, not numbers to quote. Exit status 0, or 1
when the benchmark itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.bench_rebalance import CLIENTS, VALUE_SIZE, WINDOW, JoinResult, join_benchmark
from bench.report import cpu_model, git_commit, load_average, table

DEFAULT_KEYS = (200_000, 1_000_000)
DEFAULT_RUNS = 3


def progress(message: str) -> None:
    print(f"[rebalance] {message}", file=sys.stderr, flush=True)


def command_line() -> str:
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):  # outside the working directory: absolute
        exe = exe.relative_to(Path.cwd())
    return shlex.join([str(exe), "-m", "bench.rebalance_report", *sys.argv[1:]])


def median(runs: list[JoinResult], figure: Callable[[JoinResult], float]) -> float:
    return float(statistics.median(figure(r) for r in runs))


def render(results: dict[int, list[JoinResult]], clients: int) -> list[str]:
    lines = [
        "",
        "## A 4th node joins a loaded 3-node cluster",
        "",
        f"Values of {VALUE_SIZE} B; replication 3, 4096 partitions, default rebalance "
        "settings (batches of 1024 entries / 4 MiB, 4 partitions at once, 128 MiB/s); "
        f"{clients} closed-loop QUORUM clients (half GET, half SET) on the 3 old nodes. "
        "Medians over the runs; *floor* = the same bytes over one loopback socket, "
        "plain Python sender and receiver threads.",
        "",
    ]
    rows = []
    for keys, runs in sorted(results.items()):
        rows.append(
            [
                f"{keys:,}",
                str(len(runs)),
                f"{median(runs, lambda r: r.ready_from_spawn):.2f}",
                f"{median(runs, lambda r: r.ready_from_line):.2f}",
                f"{median(runs, lambda r: r.streaming_seconds):.2f}",
                f"{median(runs, lambda r: r.floor_seconds):.3f}",
                f"{median(runs, lambda r: r.floor_ratio):.0f}x",
                f"{median(runs, lambda r: r.keys_moved):,.0f}",
                f"{median(runs, lambda r: r.bytes_moved) / 2**20:,.1f}",
                f"{median(runs, lambda r: r.keys_per_s):,.0f}",
            ]
        )
    lines += table(
        [
            "keys",
            "runs",
            "ready from spawn (s)",
            "ready from ready line (s)",
            "streaming (s)",
            "floor (s)",
            "streaming / floor",
            "keys moved",
            "MiB moved",
            "keys/s",
        ],
        rows,
        "rrrrrrrrrr",
    )
    if clients:
        lines += render_load(results)
    lines += render_runs(results)
    return lines


def render_load(results: dict[int, list[JoinResult]]) -> list[str]:
    lines: list[str] = []
    lines += [
        "",
        f"Steady QUORUM load: the {WINDOW:g} s before the join against the join (spawn to ready):",
        "",
    ]
    rows = []
    for keys, runs in sorted(results.items()):
        rows.append(
            [
                f"{keys:,}",
                f"{median(runs, lambda r: r.before.ops_per_s):,.0f}",
                f"{median(runs, lambda r: r.during.ops_per_s):,.0f}",
                f"{median(runs, lambda r: r.before.p50_ms):.2f}",
                f"{median(runs, lambda r: r.during.p50_ms):.2f}",
                f"{median(runs, lambda r: r.before.p99_ms):.2f}",
                f"{median(runs, lambda r: r.during.p99_ms):.2f}",
                f"{sum(r.before.errors + r.during.errors for r in runs)}",
            ]
        )
    lines += table(
        [
            "keys",
            "ops/s before",
            "ops/s during",
            "p50 ms before",
            "p50 ms during",
            "p99 ms before",
            "p99 ms during",
            "errors",
        ],
        rows,
        "rrrrrrrr",
    )
    return lines


def render_runs(results: dict[int, list[JoinResult]]) -> list[str]:
    lines: list[str] = []
    lines += ["", "Every run:", ""]
    rows = []
    for keys, runs in sorted(results.items()):
        for i, r in enumerate(runs, 1):
            cpu = "n/a" if r.cpu is None else f"{r.cpu.ours:.2f} / {r.cpu.others:.2f}"
            rows.append(
                [
                    f"{keys:,}",
                    str(i),
                    f"{r.load_seconds:.1f}",
                    f"{r.ready_from_spawn:.2f}",
                    f"{r.streaming_seconds:.2f}",
                    f"{r.floor_seconds:.3f}",
                    f"{r.partitions_moved:,}",
                    f"{r.node4_keys:,}",
                    f"{r.throttle_events:,}",
                    f"{r.before.ops_per_s:,.0f} / {r.during.ops_per_s:,.0f}",
                    f"{r.before.p99_ms:.2f} / {r.during.p99_ms:.2f}",
                    cpu,
                ]
            )
    lines += table(
        [
            "keys",
            "run",
            "load (s)",
            "ready (s)",
            "streaming (s)",
            "floor (s)",
            "partitions",
            "node-4 keys",
            "throttled",
            "ops/s before / during",
            "p99 ms before / during",
            "CPUs ours / others",
        ],
        rows,
        "rrrrrrrrrrrr",
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rebalance_report")
    parser.add_argument("--keys", type=int, action="append", help="keys loaded (repeatable)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs per size")
    parser.add_argument("--quick", action="store_true", help="one run of 50,000 keys")
    parser.add_argument(
        "--clients", type=int, default=CLIENTS, help="steady-load workers (0: no load)"
    )
    parser.add_argument(
        "--join-flag",
        action="append",
        default=[],
        help="a flag of the joining node (repeatable): --join-flag=--rebalance-concurrency=16",
    )
    args = parser.parse_args(argv)
    sizes = [50_000] if args.quick else (args.keys or list(DEFAULT_KEYS))
    runs = 1 if args.quick else args.runs
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    results: dict[int, list[JoinResult]] = {}
    try:
        for keys in sizes:
            for i in range(runs):
                progress(f"{keys:,} keys, run {i + 1} of {runs}")
                result = join_benchmark(
                    keys, progress=progress, join_flags=args.join_flag, clients=args.clients
                )
                results.setdefault(keys, []).append(result)
    except Exception:
        traceback.print_exc()
        return 1
    lines = [
        "# hypercache rebalancing benchmark",
        "",
        f"- command: `{command_line()}`",
        f"- commit: {git_commit()}, {started:%Y-%m-%d %H:%M} UTC",
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}",
        f"- load average before: {load_before:.2f}",
        f"- joining node's extra flags: {' '.join(args.join_flag) or 'none'}",
        *render(results, args.clients),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
