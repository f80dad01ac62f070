"""The roadmap's KPIs as pytest-benchmark benchmarks; ``python -m bench.kpi_report``
(``make kpi``) runs this file with ``--benchmark-json`` and turns the JSON into
``kpi-report.md``. To run it by hand::

    .venv/bin/python -m pytest -o python_files='bench_*.py' bench/bench_kpi.py \\
        --bench-quick --benchmark-json=kpi.json

Each KPI is one benchmark, run once (``benchmark.pedantic``, one round of one
iteration: its time is how long the measurement took), its figures in
``benchmark.extra_info`` (``{"kpi": ..., ...}``), which the report judges against the
targets; a benchmark never asserts a target itself.

``test_kpi_latency``
    :func:`bench.bench_cluster.measure` of the in-process baseline and a 3-node TCP
    cluster, every cell (QUORUM set/get, 1 client and 32 in flight) interleaved in
    one run so that the ratios compare side by side; ``extra_info["cells"]`` has each
    cell's median p50/p95/p99 over the runs and the CPUs other processes kept busy.
    One benchmark for the four latency KPIs: pytest-benchmark times one callable per
    round and cannot give per-request percentiles (see docs/benchmarks.md), so the
    percentiles are the harness's and the benchmark carries them.
    ``--bench-quick``: one short run per cell (a smoke test, not figures to quote).
``test_kpi_chaos[<scenario>]``
    A chaos scenario of ``tests/chaos/`` (real nodes, injected faults): its summary
    line's figures in ``extra_info["figures"]``. They are read from the JSON lines of
    the files in ``$KPI_CHAOS_RESULTS`` (``os.pathsep``-separated: what a test run or
    the soak appended to ``$CHAOS_REPORT``) when the scenario is there; otherwise, with
    ``KPI_CHAOS_RUN=1``, the scenario's test is run here (full length with
    ``CHAOS_LONG=1``); otherwise the benchmark is skipped (the report says "not
    measured"). The memory soak is never run here: it is ``make soak``'s (30 minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from bench.bench_cluster import FULL, QUICK, measure
from bench.conftest import BenchConfig

ROOT = Path(__file__).resolve().parent.parent
#: scenario -> the test that reports it (None: not run from here)
SCENARIOS: dict[str, str | None] = {
    "kill": "tests/chaos/test_kill_functional.py",
    "loss": "tests/chaos/test_loss_functional.py",
    "partition": "tests/chaos/test_partition_functional.py",
    "slow": "tests/chaos/test_slow_functional.py",
    "nemesis": "tests/chaos/test_nemesis_functional.py",
    "join": "tests/chaos/test_join_functional.py",
    "soak": None,
}


def read_results(paths: str) -> dict[str, dict[str, Any]]:
    """``{scenario: figures}`` from the JSON lines of the ``os.pathsep``-separated
    files (missing files are skipped; the last line of a scenario wins)."""
    out: dict[str, dict[str, Any]] = {}
    for name in filter(None, paths.split(os.pathsep)):
        path = Path(name)
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                figures = json.loads(line)
                out[figures.pop("scenario")] = figures
    return out


def run_scenario(scenario: str, test: str) -> dict[str, Any]:
    """Run the scenario's test in a pytest of its own; the figures it reported.

    :raises RuntimeError: the test failed or reported nothing.
    """
    with tempfile.TemporaryDirectory(prefix="hypercache-kpi-") as tmp:
        results = Path(tmp) / "chaos.jsonl"
        env = {**os.environ, "CHAOS_REPORT": str(results)}
        argv = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", test]
        status = subprocess.run(argv, cwd=ROOT, env=env, check=False).returncode
        figures = read_results(str(results)).get(scenario)
    if figures is None:
        raise RuntimeError(f"{test} reported no {scenario} figures (pytest status {status})")
    figures["test_status"] = status
    return figures


def test_kpi_latency(benchmark: Any, bench_config: BenchConfig) -> None:
    config = QUICK if bench_config.quick else FULL

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = benchmark.pedantic(
        measure,
        args=(config,),
        kwargs={"systems": ("inproc", "tcp"), "progress": progress},
        rounds=1,
        iterations=1,
        warmup_rounds=0,
    )
    cells = {}
    for (system, op, clients), cell in results.cells.items():
        if cell.runs:
            cells[f"{system}/{op}/{clients}"] = {
                "system": system,
                "op": op,
                "clients": clients,
                "runs": len(cell.runs),
                **{m: cell.median(m) for m in ("p50_ns", "p95_ns", "p99_ns", "others_cpu")},
            }
    benchmark.extra_info.update(
        kpi="latency",
        quick=config.quick,
        cells=cells,
        others_cpu=None if results.cpu is None else results.cpu.others,
    )


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kpi_chaos(benchmark: Any, scenario: str) -> None:
    known = read_results(os.environ.get("KPI_CHAOS_RESULTS", ""))
    test = SCENARIOS[scenario]
    if scenario in known:
        figures = benchmark.pedantic(lambda: known[scenario], rounds=1, iterations=1)
        source = "results file"
    elif test is not None and os.environ.get("KPI_CHAOS_RUN", "") not in ("", "0"):
        figures = benchmark.pedantic(
            run_scenario, args=(scenario, test), rounds=1, iterations=1, warmup_rounds=0
        )
        source = "run here"
    else:
        pytest.skip(f"{scenario}: no figures (not in $KPI_CHAOS_RESULTS and not run here)")
    benchmark.extra_info.update(kpi="chaos", scenario=scenario, source=source, figures=figures)
