"""bench.kpi_report: the chaos scenarios' figures become KPI rows that pass or fail
against their targets, and a scenario not run says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.kpi_report import chaos_rows, latency_rows, load_chaos

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
