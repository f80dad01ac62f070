"""Run the cluster benchmarks and print one markdown report: ``python -m bench.cluster_report``.

An in-process 3-node cluster (the baseline), a 3-node TCP cluster of real
``hypercache-node`` processes and a local ``redis-server`` (the outside reference),
QUORUM set and get with 1 and 32 requests in flight; :mod:`bench.bench_cluster` says
exactly what is timed. Progress goes to stderr and the report to stdout, so::

    .venv/bin/python -m bench.cluster_report > cluster-report.md

Three phases, one after the other. First the nodes as they start by default; then
the in-process baseline and the TCP cluster again with every node started with
``--busy-poll 100us`` (each node's loop polls instead of sleeping for 100 µs after a
write; :mod:`hypercache.net.busypoll`), unless ``--no-busy-poll``; then with
``--cpu-latency-limit 0`` (idle CPUs poll instead of halting while the nodes run;
:mod:`hypercache.cluster.cpulatency`), unless ``--no-cpu-latency``. Both tunings
change how the whole machine schedules, so their phases cannot be interleaved with
the first. The last needs root and is skipped, with the reason in the report, where
the nodes cannot hold the limit.

``--quick`` runs one short run per cell: a smoke test of the harness, not numbers to
quote. ``--only tcp`` (repeatable; ``tcp``, ``tcp-sync``, ``redis``) measures the
in-process baseline and the named systems only. Exit status 0 whether targets pass or
miss; 1 when the benchmark itself failed. A full run takes about four minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import platform
import shlex
import sys
import traceback
from importlib import metadata
from pathlib import Path
from typing import Final

from bench.bench_cluster import (
    CLIENTS,
    CONSISTENCY,
    FULL,
    KEYS,
    NODES,
    OPS,
    QUICK,
    REPLICATION,
    SEQUENTIAL_ONLY,
    SYSTEMS,
    VALUE_SIZE,
    Cell,
    ClusterBenchConfig,
    CpuLatencyUnavailable,
    Interrupted,
    Results,
    measure,
)
from bench.report import cpu_model, git_commit, load_average, table
from hypercache.cluster.cpulatency import DEVICE

VERSIONED = ("hypercache", "uvloop", "msgpack", "redis")

#: op -> p95 of the TCP cluster over the in-process cluster's, same client count, must
#: stay strictly below this (the issue's targets).
P95_GOALS = {"set": 3.0, "get": 2.0}

#: The one-hop write targets (issue 13): one-client set p95 over get p95 at most this,
SET_OVER_GET_P95: Final = 1.2
#: one-client get p50 over redis-py GET p50 at most this,
GET_OVER_REDIS_P50: Final = 1.0
#: and direct over proxy set p95 at most this (a > 15% cut).
DIRECT_OVER_PROXY_P95: Final = 0.85

#: How the report names each phase, and the node flags of the tuned ones.
DEFAULT_PHASE = "nodes as started by default"
BUSY_POLL_ARGS = ("--busy-poll", "100us")
BUSY_POLL_PHASE = "nodes started with `--busy-poll 100us`"
CPU_LATENCY_ARGS = ("--cpu-latency-limit", "0")
CPU_LATENCY_PHASE = "nodes started with `--cpu-latency-limit 0`"


def us(ns: float) -> str:
    value = ns / 1e3
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def versions(results: Results) -> str:
    parts = []
    for dist in VERSIONED:
        name = "redis-py" if dist == "redis" else dist
        try:
            parts.append(f"{name} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    parts.append(f"redis-server {results.versions.get('redis-server', 'unknown')}")
    return ", ".join(parts)


def cpu_use(results: Results) -> str:
    cpu = results.cpu
    if cpu is None:
        return "n/a (no /proc/stat)"
    text = f"this benchmark and its servers {cpu.ours:.2f}, other processes {cpu.others:.2f}"
    if cpu.steal >= 0.005:
        text += f", hypervisor steal {cpu.steal:.2f}"
    return text


def command_line(argv: list[str]) -> str:
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(Path.cwd())
    return shlex.join([str(exe), "-m", "bench.cluster_report", *argv])


def render_header(
    results: Results,
    config: ClusterBenchConfig,
    started: dt.datetime,
    loads: tuple[float, float],
    argv: list[str],
) -> list[str]:
    cpus = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cpus
    lines = [
        "# hypercache cluster benchmarks",
        "",
        f"- Machine: {cpu_model()}, {cpus} logical CPUs ({usable} usable), "
        f"{platform.system()} {platform.machine()}",
        f"- Python: {platform.python_implementation()} {platform.python_version()}; "
        f"{versions(results)}",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}, commit {git_commit()}",
        f"- Load average (1 min) before / after the run: {loads[0]:.2f} / {loads[1]:.2f}",
        f"- CPU during the run (average CPUs busy of {usable}): {cpu_use(results)}",
        f"- Command: `{command_line(argv)}`",
        f"- Cluster: {NODES} nodes, replication {REPLICATION}, every request "
        f"{CONSISTENCY.upper()} (2 of 3 owners ack); clients read the owners themselves; "
        'they write them in one hop (`write_path="direct"`, the default) or through the '
        "key's primary (the `proxy writes` systems); "
        f"redis: GET/SET on one `redis-server`, `--save '' --appendonly no`",
        f"- Data: {KEYS:,} keys `key:<n>`, {VALUE_SIZE}-byte values (raw bytes on the wire "
        "for both), all written before timing: every get hits",
        f"- Runs: median of {config.runs} run(s) per cell, interleaved across systems; "
        f"{config.sequential:,} requests per run with 1 client, {config.concurrent:,} with "
        f"{max(CLIENTS)} in flight (capped at {config.run_seconds:g} s per run); "
        f"{config.warmup} warm-up requests per cell",
    ]
    if config.quick:
        lines.append("- **--quick: smoke test (one short run per cell); do not quote.**")
    return lines


def render_cells(results: Results, phase: str = DEFAULT_PHASE) -> list[str]:
    lines = [
        "",
        f"## Latency per request and throughput, {phase} (median of the runs)",
        "",
        "Latency: `perf_counter_ns` around each request, µs. `clients=1`: each request "
        f"awaited before the next; `clients={max(CLIENTS)}`: {max(CLIENTS)} closed-loop "
        "workers on one client, so that many requests always in flight. ops/s: requests "
        "over the run's wall time. others' CPU: CPUs kept busy meanwhile by processes "
        "other than this benchmark, its nodes and its redis-server (from `/proc`); "
        "well above 0, the cell timed a shared machine.",
        "",
    ]
    rows = []
    for op in OPS:
        for clients in CLIENTS:
            for system, label in SYSTEMS.items():
                if clients != 1 and system in SEQUENTIAL_ONLY:
                    continue
                if phase != DEFAULT_PHASE and system not in ("inproc", "tcp"):
                    continue
                cell = results.get(system, op, clients)
                name = f"QUORUM {op}" if system != "redis" else op.upper()
                if cell is None:
                    rows.append([label, name, str(clients), *["n/a"] * 6])
                    continue
                others = cell.median("others_cpu")
                rows.append(
                    [
                        label,
                        name,
                        str(clients),
                        us(cell.median("p50_ns")),
                        us(cell.median("p95_ns")),
                        us(cell.median("p99_ns")),
                        f"{cell.median('ops_per_s'):,.0f}",
                        f"{cell.median('requests'):,.0f}",
                        "n/a" if math.isnan(others) else f"{others:.2f}",
                    ]
                )
    lines += table(
        [
            "system",
            "op",
            "clients",
            "p50 µs",
            "p95 µs",
            "p99 µs",
            "ops/s",
            "requests/run",
            "others' CPU",
        ],
        rows,
        "llrrrrrrr",
    )
    return lines


def _per_run(cell: Cell, metric: str) -> str:
    return " / ".join(us(getattr(run, metric)) for run in cell.runs)


def render_targets(phases: dict[str, Results]) -> list[str]:
    lines = [
        "",
        "## Targets",
        "",
        "Each target compares the p95 of the TCP cluster with the p95 of the in-process "
        "cluster **at the same client count**, both driven by `AsyncClient`: "
        "TCP `clients=1` over in-process `clients=1`, and TCP "
        f"`clients={max(CLIENTS)}` over in-process `clients={max(CLIENTS)}`. "
        "Ratio of the medians of the runs; per-run p95s (TCP ; in-process) alongside. "
        "Each phase has its own in-process baseline, measured in the same phase.",
        "",
    ]
    rows = []
    for phase, results in phases.items():
        rows += _target_rows(phase, results)
    lines += table(["target", "ratio", "goal", "result", "per-run p95 µs"], rows, "lrrll")
    return lines


def _target_rows(phase: str, results: Results) -> list[list[str]]:
    rows = []
    for op in OPS:
        goal = P95_GOALS[op]
        for clients in CLIENTS:
            label = f"QUORUM {op} p95, clients={clients}, {phase}: TCP / in-process"
            tcp, inproc = results.get("tcp", op, clients), results.get("inproc", op, clients)
            if tcp is None or inproc is None:
                rows.append([label, "n/a", f"< {goal:.2f}", "n/a", ""])
                continue
            num, den = tcp.median("p95_ns"), inproc.median("p95_ns")
            ratio = num / den
            mark = "pass" if ratio < goal else "**miss**"
            rows.append(
                [
                    label,
                    f"{ratio:.2f} ({us(num)} / {us(den)} µs)",
                    f"< {goal:.2f}",
                    mark,
                    f"{_per_run(tcp, 'p95_ns')} ; {_per_run(inproc, 'p95_ns')}",
                ]
            )
    return rows


def render_redis(results: Results) -> list[str]:
    lines = [
        "",
        "## hypercache TCP against redis",
        "",
        "hypercache-TCP / redis: p50 ratio (above 1: hypercache slower) and ops/s ratio "
        "(below 1: hypercache slower), same op and client count. A QUORUM hypercache "
        "request asks the key's owners straight from the client, in parallel: two of "
        "them for a get (`R_GET`), all three for a set (`W_PUT`, done at two acks); a "
        "redis request asks one server. With 1 client redis runs its sync client: both "
        "hypercache clients are shown against it.",
        "",
    ]
    rows = []
    for op in OPS:
        for clients in CLIENTS:
            redis = results.get("redis", op, clients)
            for system in ("tcp", "tcp-sync"):
                if clients != 1 and system in SEQUENTIAL_ONLY:
                    continue
                redis_client = "sync `Redis`" if clients == 1 else "`redis.asyncio`"
                label = f"{op}, clients={clients}: {SYSTEMS[system]} / {redis_client}"
                ours = results.get(system, op, clients)
                if ours is None or redis is None:
                    rows.append([label, "n/a", "n/a"])
                    continue
                p50 = ours.median("p50_ns") / redis.median("p50_ns")
                ops = ours.median("ops_per_s") / redis.median("ops_per_s")
                rows.append(
                    [
                        label,
                        f"{p50:.2f} ({us(ours.median('p50_ns'))} / "
                        f"{us(redis.median('p50_ns'))} µs)",
                        f"{ops:.2f} ({ours.median('ops_per_s'):,.0f} / "
                        f"{redis.median('ops_per_s'):,.0f})",
                    ]
                )
    lines += table(["pair", "p50 ratio", "ops/s ratio"], rows, "lrr")
    return lines


def _ratio_row(
    label: str, num: Cell | None, den: Cell | None, metric: str, goal: float
) -> list[str]:
    if num is None or den is None:
        return [label, "n/a", f"<= {goal:.2f}", "n/a", ""]
    a, b = num.median(metric), den.median(metric)
    ratio = a / b
    return [
        label,
        f"{ratio:.2f} ({us(a)} / {us(b)} µs)",
        f"<= {goal:.2f}",
        "pass" if ratio <= goal else "**miss**",
        f"{_per_run(num, metric)} ; {_per_run(den, metric)}",
    ]


def render_onehop(results: Results) -> list[str]:
    """The one-hop write targets: set against get, direct against proxy, get against
    redis-py, from the same run."""
    lines = [
        "",
        "## One-hop writes: direct against proxy, set against get, get against redis",
        "",
        "`direct`: the client stamps the version and sends the write to the three owners "
        "at once (`W_PUT`), done at two acks; `proxy`: the key's primary stamps and "
        "replicates it. Ratios of the medians of the runs; per-run figures (numerator ; "
        "denominator) alongside.",
        "",
    ]
    get = results.get
    rows = []
    for system in ("tcp", "tcp-sync"):
        rows.append(
            _ratio_row(
                f"QUORUM set p95 / QUORUM get p95, clients=1, {SYSTEMS[system]}",
                get(system, "set", 1),
                get(system, "get", 1),
                "p95_ns",
                SET_OVER_GET_P95,
            )
        )
    for system in ("tcp-sync", "tcp"):
        rows.append(
            _ratio_row(
                f"QUORUM get p50 / redis-py GET p50, clients=1, {SYSTEMS[system]}",
                get(system, "get", 1),
                get("redis", "get", 1),
                "p50_ns",
                GET_OVER_REDIS_P50,
            )
        )
    for system, proxy, clients in (
        ("tcp-sync", "tcp-sync-proxy", 1),
        ("tcp", "tcp-proxy", 1),
        ("tcp", "tcp-proxy", max(CLIENTS)),
    ):
        rows.append(
            _ratio_row(
                f"QUORUM set p95 direct / proxy, clients={clients}, {SYSTEMS[system]}",
                get(system, "set", clients),
                get(proxy, "set", clients),
                "p95_ns",
                DIRECT_OVER_PROXY_P95,
            )
        )
    lines += table(["target", "ratio", "goal", "result", "per-run µs"], rows, "lrrll")
    return lines


def render(
    phases: dict[str, Results],
    config: ClusterBenchConfig,
    started: dt.datetime,
    loads: tuple[float, float],
    argv: list[str],
    notes: list[str],
) -> str:
    results = phases[DEFAULT_PHASE]
    lines = render_header(results, config, started, loads, argv)
    for phase, phase_results in phases.items():
        lines += render_cells(phase_results, phase)
    lines += render_targets(phases)
    lines += render_redis(results)
    lines += render_onehop(results)
    skipped = [*results.skipped.values(), *notes]
    if skipped:
        lines += ["", "Skipped (n/a above):", ""]
        lines += [f"- {reason}" for reason in skipped]
    return "\n".join(lines) + "\n"


def cpu_latency_unavailable() -> str | None:
    """Why nodes cannot hold a CPU latency limit here, or None."""
    if not os.path.exists(DEVICE):
        return f"no {DEVICE} on this machine"
    if not os.access(DEVICE, os.W_OK):
        return f"{DEVICE} is not writable (needs root)"
    return None


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster_report", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="one short run per cell")
    parser.add_argument(
        "--no-busy-poll",
        action="store_true",
        help="skip the phase of nodes started with --busy-poll 100us",
    )
    parser.add_argument(
        "--no-cpu-latency",
        action="store_true",
        help="skip the phase of nodes holding --cpu-latency-limit 0",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=[s for s in SYSTEMS if s != "inproc"],
        help="measure the in-process baseline and this system only (repeatable)",
    )
    args = parser.parse_args(args_list)
    config = QUICK if args.quick else FULL
    systems = ["inproc", *(args.only or [s for s in SYSTEMS if s != "inproc"])]

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started, load_before = dt.datetime.now(dt.UTC), load_average()
    phases: dict[str, Results] = {}
    notes: list[str] = []
    try:
        phases[DEFAULT_PHASE] = measure(config, systems=systems, progress=progress)
        tuned = [
            (BUSY_POLL_PHASE, BUSY_POLL_ARGS, "--no-busy-poll" if args.no_busy_poll else None),
            (
                CPU_LATENCY_PHASE,
                CPU_LATENCY_ARGS,
                "--no-cpu-latency" if args.no_cpu_latency else cpu_latency_unavailable(),
            ),
        ]
        for phase, node_args, unavailable in tuned:
            if "tcp" not in systems:
                notes.append(f"{phase}: tcp not selected (--only)")
            elif unavailable is not None:
                notes.append(f"{phase}: not measured ({unavailable})")
            else:
                progress(f"next phase: {phase}")
                try:
                    phases[phase] = measure(
                        config, systems=("inproc", "tcp"), progress=progress, node_args=node_args
                    )
                except CpuLatencyUnavailable as exc:
                    notes.append(f"{phase}: {exc}")
    except Interrupted as exc:
        print(f"cluster benchmark {exc}; every process it started was stopped", file=sys.stderr)
        return 128 + exc.signum
    except Exception:
        traceback.print_exc()
        print("cluster benchmark failed; every process it started was stopped", file=sys.stderr)
        return 1
    loads = (load_before, load_average())
    sys.stdout.write(render(phases, config, started, loads, args_list, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
