"""The roadmap's KPIs in one report: ``python -m bench.kpi_report`` (``make kpi``).

Runs the KPI benchmarks of ``bench/bench_kpi.py`` under pytest-benchmark with
``--benchmark-json``, then writes, from that JSON, ``kpi-report.md`` (a table: KPI,
target, measured, pass/fail, with the machine, the commit and the date) and
``kpi-latency.png`` (QUORUM get/set p50, p95 and p99, in-process and TCP, 1 client and
32 in flight).

Where the figures come from (see bench/bench_kpi.py):

* latency: the ``test_kpi_latency`` benchmark, :func:`bench.bench_cluster.measure` of the
  in-process baseline and a 3-node TCP cluster, interleaved (the same cells and
  targets as ``bench.cluster_report``); its percentiles are in the benchmark's
  ``extra_info``;
* resilience: the ``test_kpi_chaos[...]`` benchmarks, one per chaos scenario of
  ``tests/chaos/`` (real nodes, injected faults). By default they run the scenarios
  (``--long``: their full lengths, ``CHAOS_LONG=1``); ``--chaos-results FILE`` reads
  the JSON lines a test run already wrote instead and runs nothing (what ``.ci/run``
  does after ``make test``); ``--soak-results FILE`` adds the memory soak's line
  (``python -m bench.soak --results FILE``; ``make soak`` writes soak-results.jsonl).

``--quick``: one short latency run per cell (a smoke test, not figures to quote).
``--from-json FILE``: only render the report from a benchmark JSON already written.
Exit status 0 whether targets pass or miss; 1 when a measurement itself failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.report import cpu_model, git_commit, table

ROOT = Path(__file__).resolve().parent.parent
#: set p95 and get p95 (TCP) at most this many times the in-process p95
LATENCY_TARGETS = {"set": 3.0, "get": 2.0}
#: QUORUM write failure share allowed with one node down and at 10% loss
MAX_FAIL_PCT = 2.0
#: a node's keys after a join at most this far from the ideal share, %
MAX_IMBALANCE_PCT = 15.0


#: ``{(system, op, clients): {"p50_ns", "p95_ns", "p99_ns", "others_cpu", "runs"}}``
Latency = dict[tuple[str, str, int], dict[str, float]]


def run_benchmarks(
    json_path: Path,
    *,
    quick: bool,
    long: bool,
    chaos_results: list[Path],
    run_chaos: bool,
) -> int:
    """Run bench/bench_kpi.py under pytest-benchmark, its JSON to ``json_path``;
    pytest's status."""
    env = {**os.environ, "KPI_CHAOS_RESULTS": os.pathsep.join(map(str, chaos_results))}
    env["KPI_CHAOS_RUN"] = "1" if run_chaos else "0"
    if long:
        env["CHAOS_LONG"] = "1"
    env.pop("CHAOS_REPORT", None)  # the scenarios run here report to the benchmark
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "python_files=bench_*.py",
        "-o",
        "timeout=0",
        "bench/bench_kpi.py",
        f"--benchmark-json={json_path}",
        "--benchmark-columns=max,rounds",
    ]
    if quick:
        argv.append("--bench-quick")
    return subprocess.run(argv, cwd=ROOT, env=env, check=False).returncode


def read_benchmarks(data: dict[str, Any]) -> tuple[Latency | None, dict[str, dict[str, Any]]]:
    """The latency cells and ``{scenario: figures}`` of a pytest-benchmark JSON of
    bench/bench_kpi.py (a benchmark that was skipped or failed is not in it)."""
    latency: Latency | None = None
    chaos: dict[str, dict[str, Any]] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("kpi") == "latency":
            latency = {(c["system"], c["op"], int(c["clients"])): c for c in info["cells"].values()}
        elif info.get("kpi") == "chaos":
            chaos[info["scenario"]] = info["figures"]
    return latency, chaos


def load_chaos(path: Path) -> dict[str, dict[str, Any]]:
    """``{scenario: figures}`` from the JSON lines at ``path`` (the last line of a
    scenario wins)."""
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                figures = json.loads(line)
                out[figures.pop("scenario")] = figures
    return out


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("pass" if ok else "**FAIL**")


def latency_rows(latency: Latency | None) -> list[list[str]]:
    rows = []
    for op, limit in LATENCY_TARGETS.items():
        for clients in (1, 32):
            name = f"QUORUM {op} p95, {clients} {'client' if clients == 1 else 'in flight'}"
            base = None if latency is None else latency.get(("inproc", op, clients))
            tcp = None if latency is None else latency.get(("tcp", op, clients))
            if base is None or tcp is None:
                rows.append([name, f"< {limit:g}x in-process", "not measured", _verdict(None)])
                continue
            ratio = tcp["p95_ns"] / base["p95_ns"]
            measured = (
                f"{tcp['p95_ns'] / 1000:.0f} us vs {base['p95_ns'] / 1000:.0f} us "
                f"= {ratio:.2f}x (others' CPU {tcp['others_cpu']:.2f})"
            )
            rows.append([name, f"< {limit:g}x in-process", measured, _verdict(ratio < limit)])
    return rows


def chaos_rows(chaos: dict[str, dict[str, Any]]) -> list[list[str]]:
    kill, loss, part = chaos.get("kill"), chaos.get("loss"), chaos.get("partition")
    rows = []
    if kill is None:
        rows.append(["Hint drain after an outage", "drained, 0 dropped", "not measured", "—"])
        rows.append(
            ["QUORUM write failure, one node down", f"< {MAX_FAIL_PCT:g}%", "not measured", "—"]
        )
    else:
        drained = kill["hints_dropped"] == 0 and kill["hints_replayed"] > 0
        rows.append(
            [
                f"Hint drain after a {kill['outage_s']:g} s outage (SIGKILL 1 of 5)",
                "drained, 0 dropped",
                f"{kill['drain_s']} s, {kill['hints_replayed']} hints replayed "
                f"({kill['hints_per_s']}/s), {kill['hints_dropped']} dropped",
                _verdict(drained),
            ]
        )
        pct = kill["quorum_write_fail_pct"]
        ok = pct < MAX_FAIL_PCT and kill["lost"] == 0 and kill["phantom"] == 0
        rows.append(
            [
                "QUORUM write failure, one node down",
                f"< {MAX_FAIL_PCT:g}%, 0 lost, 0 phantom",
                f"{pct}% of {kill['writes']}, {kill['lost']} lost, {kill['phantom']} phantom",
                _verdict(ok),
            ]
        )
    if loss is None:
        rows.append(
            ["QUORUM write failure at 10% loss", f"< {MAX_FAIL_PCT:g}%", "not measured", "—"]
        )
    else:
        # The loss is between nodes: the writes through a node cross it (the figure
        # the retry policy answers for), the one-hop ones do not. Both are judged.
        pct = loss["quorum_write_fail_pct"]
        proxied = loss.get("proxy_write_fail_pct", pct)
        direct = loss.get("direct_write_fail_pct", pct)
        split = (
            f" (through a node {proxied}%, one hop {direct}%)"
            if "proxy_write_fail_pct" in loss
            else ""
        )
        rows.append(
            [
                "QUORUM write failure at 10% loss both ways",
                f"< {MAX_FAIL_PCT:g}%, 0 lost",
                f"{pct}% of {loss['writes']}{split}, {loss['lost']} lost",
                _verdict(max(pct, proxied, direct) < MAX_FAIL_PCT and loss["lost"] == 0),
            ]
        )
    if part is None:
        rows.append(["Convergence after a partition", "< sync interval", "not measured", "—"])
    else:
        interval = part["anti_entropy_interval_s"]
        worst = max(part["one_converge_s"], part["minority_converge_s"])
        rows.append(
            [
                "Convergence after a partition heals",
                f"< anti-entropy interval ({interval:g} s)",
                f"{worst} s (one node cut off: {part['one_converge_s']} s, 3/2 split: "
                f"{part['minority_converge_s']} s)",
                _verdict(worst < interval),
            ]
        )
    slow = chaos.get("slow")
    if slow is None:
        rows.append(["QUORUM write p99 with a slow node", "< the delay", "not measured", "—"])
    else:
        delay = slow["delay_ms"]
        rows.append(
            [
                f"QUORUM write p99 with one node +{delay:g} ms",
                f"< {delay:g} ms (the fastest quorum), 0 dead after a "
                f"{slow['pause_s']:g} s SIGSTOP",
                f"p99 {slow['p99_ms']} ms (p50 {slow['p50_ms']} ms), "
                f"{slow['dead_marks']} dead marks",
                _verdict(slow["p99_ms"] < delay and slow["dead_marks"] == 0),
            ]
        )
    soak = chaos.get("soak")
    if soak is not None:
        rows.append(
            [
                f"Memory soak, {soak['minutes']:g} min with {soak['faults']} faults",
                "every node judged, RSS slope within noise after warm-up; caps hold",
                f"RSS {soak['rss_mib']} MiB, slope {soak['slope_mib_per_min']} MiB/min, "
                f"{soak.get('judged', '?')} nodes judged, tasks max "
                f"{soak.get('tasks_max', '?')}, connections max {soak.get('conns_max', '?')}, "
                f"{soak['caps_broken']} caps broken",
                _verdict(bool(soak.get("ok", soak["rss_flat"] and soak["caps_broken"] == 0))),
            ]
        )
    nemesis = chaos.get("nemesis")
    if nemesis is not None:
        faults = len(str(nemesis["faults"]).split(","))
        rows.append(
            [
                f"Combined nemesis: {faults} faults, one every {nemesis['period_s']:g} s",
                "0 lost, 0 phantom, converged after heal",
                f"{nemesis['lost']} lost, {nemesis['phantom']} phantom of {nemesis['writes']} "
                f"writes ({nemesis['quorum_write_fail_pct']}% failed), converged in "
                f"{nemesis['converge_s']} s",
                _verdict(nemesis["lost"] == 0 and nemesis["phantom"] == 0),
            ]
        )
    join = chaos.get("join")
    if join is None:
        rows.append(
            ["Data imbalance after a join", "< 15% off the ideal share", "not measured", "—"]
        )
    else:
        pct = join["imbalance_pct"]
        rows.append(
            [
                f"Data imbalance after a join ({join['nodes'] - 1} -> {join['nodes']} nodes)",
                f"< {MAX_IMBALANCE_PCT:g}% off the ideal share",
                f"{pct}% (keys held {join['held']}, ideal {join['ideal']})",
                _verdict(pct < MAX_IMBALANCE_PCT),
            ]
        )
    return rows


def plot(latency: Latency, path: Path) -> bool:
    """Draw QUORUM get/set percentiles per system and client count; False if no cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    series: dict[str, list[float]] = {"p50": [], "p95": [], "p99": []}
    for op in ("set", "get"):
        for clients in (1, 32):
            for system in ("inproc", "tcp"):
                cell = latency.get((system, op, clients))
                if cell is None:
                    continue
                labels.append(f"{op}\n{system}\n{clients}")
                for name in series:
                    series[name].append(cell[f"{name}_ns"] / 1000)
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=120)
    width = 0.27
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + (i - 1) * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("latency (µs)")
    ax.set_yscale("log")
    ax.set_title("QUORUM latency percentiles (op, system, requests in flight)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def render(
    rows: list[list[str]], *, started: dt.datetime, quick: bool, long: bool, plot_file: str | None
) -> str:
    length = "full length (CHAOS_LONG=1)" if long else "short forms"
    latency = "--quick (one short run per cell: not figures to quote)" if quick else "full"
    lines = [
        "# hypercache KPI report",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- commit: {git_commit()}",
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}",
        f"- latency: {latency}; chaos scenarios: {length}",
        "",
        *table(["KPI", "target", "measured", "result"], rows, "llll"),
        "",
    ]
    if plot_file is not None:
        lines += [f"![QUORUM latency percentiles]({plot_file})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kpi_report", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="one short latency run per cell")
    parser.add_argument("--long", action="store_true", help="full-length chaos scenarios")
    parser.add_argument(
        "--chaos-results",
        type=Path,
        action="append",
        default=[],
        help="JSON lines a test run wrote (repeatable); the scenarios are not run",
    )
    parser.add_argument(
        "--soak-results", type=Path, action="append", default=[], help="the soak's JSON lines"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "kpi-benchmarks.json")
    parser.add_argument("--from-json", type=Path, help="render from this benchmark JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "kpi-report.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "kpi-latency.png")
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    failed = False
    json_path = args.from_json or args.json
    if args.from_json is None:
        status = run_benchmarks(
            json_path,
            quick=args.quick,
            long=args.long,
            chaos_results=args.chaos_results + args.soak_results,
            run_chaos=not args.chaos_results,
        )
        failed = status != 0
    try:
        data = json.loads(json_path.read_text())
        latency, chaos = read_benchmarks(data)
        if args.from_json is not None and "datetime" in data:  # when it was measured
            started = dt.datetime.fromisoformat(data["datetime"])
    except (OSError, ValueError) as exc:
        print(f"no benchmark JSON: {exc}", file=sys.stderr)
        latency, chaos, failed = None, {}, True
    plot_file = None
    if latency is not None and plot(latency, args.plot):
        plot_file = args.plot.name
    report = render(
        latency_rows(latency) + chaos_rows(chaos),
        started=started,
        quick=args.quick,
        long=args.long,
        plot_file=plot_file,
    )
    args.out.write_text(report)
    print(report)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
