"""Hint buffer throughput: hints per second through ``HintBuffer`` alone.

The cluster's replay target is 10,000 hints/s end to end (network, apply and all; that
benchmark lives with the replay loop). This one measures only the buffer, which should
sit orders of magnitude above it so that queueing hints never shows up on a write's
path. Each round handles :data:`HINTS` hints (1,000,000; 100,000 with ``--bench-quick``)
spread round-robin over :data:`TARGETS` targets: 16-byte keys, 100-byte values, HLC
timestamps, all built before timing. The timed loops call the bound methods hoisted into
locals, so the figures include a plain Python loop's cost, as a caller would pay it.

``enqueue``          queue every hint into an empty buffer large enough for all of them
``dequeue``          drain a buffer holding them all, ``dequeue_batch`` of :data:`BATCH`
``enqueue+dequeue``  both, on a fresh buffer: the headline figure (hints in and out / s)
``enqueue-at-cap``   queue every hint into a buffer capped at a tenth of them: past the
                     first tenth, each enqueue also drops the buffer's oldest hint

Run under pytest-benchmark like the other suites::

    .venv/bin/python -m pytest -o python_files='bench_*.py' bench/bench_hints.py

or print the rates directly: ``.venv/bin/python -m bench.bench_hints [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from hypercache._core.hints import HintBuffer

if TYPE_CHECKING:
    from bench.conftest import BenchConfig

HINTS = 1_000_000
QUICK_HINTS = 100_000
TARGETS = ("10.0.0.2:7400", "10.0.0.3:7400", "10.0.0.4:7400")
VALUE_SIZE = 100
BATCH = 512
ROUNDS = 5
QUICK_ROUNDS = 2
NOW_MS = 1_700_000_000_000
TTL_MS = 3_600_000
SCENARIOS = ("enqueue", "dequeue", "enqueue+dequeue", "enqueue-at-cap")

Workload = tuple[list[str], list[bytes], bytes, list[int]]


def workload(n: int) -> Workload:
    """Targets, keys, the value and timestamps of ``n`` hints (built once, untimed)."""
    targets = [TARGETS[i % len(TARGETS)] for i in range(n)]
    keys = [b"key:%012d" % i for i in range(n)]
    ts = [(NOW_MS << 16) + i for i in range(n)]
    return targets, keys, b"v" * VALUE_SIZE, ts


def new_buffer(n: int, cap: int | None = None) -> HintBuffer:
    total = n if cap is None else cap
    return HintBuffer(max_per_node=total, max_total=total, max_bytes=1 << 40, ttl_ms=TTL_MS)


def enqueue_all(buf: HintBuffer, w: Workload) -> None:
    targets, keys, value, ts = w
    enqueue = buf.enqueue
    for target, key, t in zip(targets, keys, ts, strict=True):
        enqueue(target, key, value, t, 7, 0, False, NOW_MS)


def dequeue_all(buf: HintBuffer) -> int:
    dequeue = buf.dequeue_batch
    n = 0
    for target in TARGETS:
        while True:
            batch = dequeue(target, BATCH, NOW_MS)
            if not batch:
                break
            n += len(batch)
    return n


def round_for(scenario: str, n: int, w: Workload) -> tuple[Callable[[], Any], Callable[[], None]]:
    """``(setup, timed)`` of one round: setup builds the buffer, timed runs the loop."""
    state: dict[str, HintBuffer] = {}

    def setup_empty(cap: int | None = None) -> None:
        state["buf"] = new_buffer(n, cap)

    if scenario == "enqueue":
        return setup_empty, lambda: enqueue_all(state["buf"], w)
    if scenario == "dequeue":

        def setup_full() -> None:
            setup_empty()
            enqueue_all(state["buf"], w)

        def timed_dequeue() -> None:
            assert dequeue_all(state["buf"]) == n

        return setup_full, timed_dequeue
    if scenario == "enqueue+dequeue":

        def timed_both() -> None:
            enqueue_all(state["buf"], w)
            assert dequeue_all(state["buf"]) == n

        return setup_empty, timed_both
    if scenario == "enqueue-at-cap":

        def timed_at_cap() -> None:
            enqueue_all(state["buf"], w)
            assert state["buf"].dropped_total_cap == n - n // 10

        return lambda: setup_empty(n // 10), timed_at_cap
    raise ValueError(scenario)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_hints_rate(benchmark: Any, bench_config: BenchConfig, scenario: str) -> None:
    n = QUICK_HINTS if bench_config.quick else HINTS
    w = workload(n)
    setup, timed = round_for(scenario, n, w)

    def pedantic_setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        setup()
        gc.collect()
        return (), {}

    benchmark.group = f"hint buffer @ {n:,} hints"
    benchmark.extra_info.update(kind="hints", scenario=scenario, hints=n, targets=len(TARGETS))
    benchmark.pedantic(
        timed,
        setup=pedantic_setup,
        rounds=QUICK_ROUNDS if bench_config.quick else ROUNDS,
        iterations=1,
    )


def measure(scenario: str, n: int, rounds: int, w: Workload) -> float:
    """Median hints per second over ``rounds`` rounds (GC off while timing)."""
    setup, timed = round_for(scenario, n, w)
    times = []
    for _ in range(rounds):
        setup()
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            timed()
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
    return n / statistics.median(times)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="HintBuffer throughput (hints/s)")
    parser.add_argument("--quick", action="store_true", help="100,000 hints, 2 rounds")
    args = parser.parse_args(argv)
    n = QUICK_HINTS if args.quick else HINTS
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    w = workload(n)
    print(f"| scenario ({n:,} hints, {len(TARGETS)} targets) | hints/s |")
    print("|---|---:|")
    for scenario in SCENARIOS:
        print(f"| {scenario} | {measure(scenario, n, rounds, w):,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
