"""pytest configuration for the benchmarks (``bench/bench_*.py``).

The project's pytest settings collect ``tests/`` only; ``python -m bench.report`` runs
these files explicitly with ``-o python_files=bench_*.py``. To run one by hand::

    .venv/bin/python -m pytest -o python_files='bench_*.py' bench/bench_embedded.py \\
        --bench-quick -k get-hit

Options added here:

``--bench-quick``
    Few rounds and short traces: a smoke test of the harness, not a measurement.
``--bench-skips=PATH``
    Append one JSON line per skipped benchmark (node id and reason) to PATH, so the
    report can say why a cell is empty.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Sizes shared by every benchmark of one run.

    :param quick: smoke-test mode.
    :param rounds: timed rounds per speed benchmark (one batch each).
    :param warmup_rounds: untimed rounds before them.
    :param trace_length: requests per hit-ratio trace.
    :param memory_entries: entries inserted per memory measurement.
    """

    quick: bool
    rounds: int
    warmup_rounds: int
    trace_length: int
    memory_entries: int


FULL = BenchConfig(
    quick=False,
    rounds=500,
    warmup_rounds=20,
    trace_length=1_000_000,
    memory_entries=1_000_000,
)
QUICK = BenchConfig(
    quick=True,
    rounds=15,
    warmup_rounds=2,
    trace_length=100_000,
    memory_entries=100_000,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hypercache-bench")
    group.addoption(
        "--bench-quick",
        action="store_true",
        default=False,
        help="few rounds and short traces (smoke test)",
    )
    group.addoption(
        "--bench-skips",
        default=None,
        metavar="PATH",
        help="append skipped benchmarks and their reasons to PATH (JSON lines)",
    )


@pytest.fixture(scope="session")
def bench_config(pytestconfig: pytest.Config) -> BenchConfig:
    return QUICK if pytestconfig.getoption("--bench-quick") else FULL


# A TestReport carries no config: remember the option when the session starts.
_SKIPS_PATH: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--bench-skips")
    if path:
        _SKIPS_PATH["path"] = path


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = _SKIPS_PATH.get("path")
    if not report.skipped or not path:
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps({"nodeid": report.nodeid, "reason": reason.removeprefix("Skipped: ")}))
        out.write("\n")
