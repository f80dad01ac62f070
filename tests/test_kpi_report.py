"""bench.kpi_report: the chaos scenarios' figures become KPI rows that pass or fail
against their targets, and a scenario not run says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.kpi_report import chaos_rows, latency_rows, load_chaos, read_benchmarks

KILL = {
    "outage_s": 5.0,
    "writes": 1000,
    "quorum_write_fail_pct": 0.1,
    "lost": 0,
    "phantom": 0,
    "hints_replayed": 90,
    "hints_dropped": 0,
    "drain_s": 1.0,
    "hints_per_s": 90.0,
}


def verdicts(chaos: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {row[0]: row[3] for row in chaos_rows(chaos)}


def test_figures_within_target_pass_and_outside_fail(tmp_path: Path) -> None:
    path = tmp_path / "chaos.jsonl"
    lines = [{"scenario": "kill", **KILL}, {"scenario": "kill", **KILL, "lost": 2}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    chaos = load_chaos(path)
    assert chaos["kill"]["lost"] == 2  # the last line of a scenario wins
    rows = verdicts(chaos)
    assert rows["QUORUM write failure, one node down"] == "**FAIL**"
    assert rows["Hint drain after a 5 s outage (SIGKILL 1 of 5)"] == "pass"
    assert (
        verdicts({"kill": {**KILL, "quorum_write_fail_pct": 2.5}})[
            "QUORUM write failure, one node down"
        ]
        == "**FAIL**"
    )
    assert verdicts({"kill": KILL})["QUORUM write failure, one node down"] == "pass"


def test_what_was_not_run_is_reported_as_not_measured(tmp_path: Path) -> None:
    assert load_chaos(tmp_path / "missing.jsonl") == {}
    rows = chaos_rows({})
    assert all(row[2] == "not measured" for row in rows)
    assert all(row[3] != "pass" for row in rows + latency_rows(None))


def cell(system: str, op: str, clients: int, p95_us: float) -> dict[str, Any]:
    return {
        "system": system,
        "op": op,
        "clients": clients,
        "runs": 5,
        "p50_ns": p95_us * 500,
        "p95_ns": p95_us * 1000,
        "p99_ns": p95_us * 2000,
        "others_cpu": 0.5,
    }


def test_the_benchmark_json_gives_the_rows() -> None:
    cells = [
        cell("inproc", "set", 1, 100),
        cell("tcp", "set", 1, 350),  # 3.5x: over the 3x target
        cell("inproc", "get", 1, 100),
        cell("tcp", "get", 1, 150),  # 1.5x: under 2x
    ]
    data = {
        "benchmarks": [
            {
                "name": "test_kpi_latency",
                "extra_info": {"kpi": "latency", "cells": {str(i): c for i, c in enumerate(cells)}},
            },
            {
                "name": "test_kpi_chaos[kill]",
                "extra_info": {"kpi": "chaos", "scenario": "kill", "figures": KILL},
            },
        ]
    }
    latency, chaos = read_benchmarks(json.loads(json.dumps(data)))
    assert chaos == {"kill": KILL}
    rows = {row[0]: row for row in latency_rows(latency)}
    assert rows["QUORUM set p95, 1 client"][3] == "**FAIL**"
    assert "3.50x" in rows["QUORUM set p95, 1 client"][2]
    assert rows["QUORUM get p95, 1 client"][3] == "pass"
    assert rows["QUORUM get p95, 32 in flight"][2] == "not measured"
    assert verdicts(chaos)["QUORUM write failure, one node down"] == "pass"


def test_the_nemesis_row_fails_on_a_lost_write() -> None:
    nemesis = {
        "faults": "loss:10%,kill:node-1",
        "period_s": 10.0,
        "writes": 100,
        "quorum_write_fail_pct": 5.0,
        "lost": 0,
        "phantom": 0,
        "converge_s": 0.1,
    }
    name = "Combined nemesis: 2 faults, one every 10 s"
    assert verdicts({"nemesis": nemesis})[name] == "pass"
    assert verdicts({"nemesis": {**nemesis, "lost": 1}})[name] == "**FAIL**"


def test_the_loss_row_fails_when_either_write_path_fails_too_often() -> None:
    loss = {"loss_pct": 10, "writes": 1000, "quorum_write_fail_pct": 1.5, "lost": 0}
    row = "QUORUM write failure at 10% loss both ways"
    assert verdicts({"loss": loss})[row] == "pass"
    split = {**loss, "proxy_write_fail_pct": 2.9, "direct_write_fail_pct": 0.1}
    assert verdicts({"loss": split})[row] == "**FAIL**"
    ok = {**loss, "proxy_write_fail_pct": 1.9, "direct_write_fail_pct": 1.1}
    assert verdicts({"loss": ok})[row] == "pass"
    (measured,) = [r[2] for r in chaos_rows({"loss": ok}) if r[0] == row]
    assert "through a node 1.9%" in measured and "one hop 1.1%" in measured
