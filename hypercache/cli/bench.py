"""``hypercache bench``: a QUORUM set and get load against a cluster, then latency
percentiles and throughput per operation.

Closed loop: ``concurrency`` threads share one :class:`~hypercache.Client` (its
pool gives each thread a connection of its own) and take request numbers from one
counter until ``requests`` are done; request ``i`` uses key ``bench:{i % keys}``,
built when it is sent. The set phase writes every key; the get phase reads them
back. A ``tqdm`` bar on stderr shows each phase's progress; the summary goes to
stdout. Latency is each call's wall time in the calling thread, so it includes
the client's own work and the threads' contention for the GIL: on a small machine
it is a floor for the cluster's capacity, not a measure of the server alone
(``bench/`` holds the project's benchmarks proper).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

from hypercache.client import Client
from hypercache.client.commands import Level
from hypercache.errors import ConfigError, HyperCacheError

__all__ = ["BenchSettings", "OpResult", "percentile", "run_bench"]

#: Threads at most (each holds a connection per node).
MAX_CONCURRENCY: Final = 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchSettings:
    """What ``hypercache bench`` runs (validated: ``ConfigError`` names the flag)."""

    requests: int = 10_000
    concurrency: int = 8
    value_size: int = 100
    keys: int = 1000
    consistency: Level = "quorum"
    progress: bool = True

    def __post_init__(self) -> None:
        for flag, value, low, high in (
            ("--requests", self.requests, 1, None),
            ("--concurrency", self.concurrency, 1, MAX_CONCURRENCY),
            ("--value-size", self.value_size, 0, None),
            ("--keys", self.keys, 1, None),
        ):
            if type(value) is not int or value < low or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise ConfigError(flag, f"must be an integer {bound}, got {value!r}")


@dataclass(slots=True)
class OpResult:
    """One phase: latencies of the calls that succeeded (s), errors by type."""

    op: str
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.latencies) + sum(self.errors.values())

    @property
    def rate(self) -> float:
        """Requests completed per second of the phase (failed ones included)."""
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of the sorted ``ordered``."""
    if not ordered:
        return math.nan
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def _phase(
    op: str,
    call: Callable[[int], Any],
    settings: BenchSettings,
    err: TextIO,
) -> OpResult:
    from tqdm import tqdm  # only this command needs it: the CLI starts faster without

    result = OpResult(op)
    numbers = itertools.count()  # next() on it is atomic under the GIL
    total = settings.requests
    lock = threading.Lock()
    bar = tqdm(
        total=total,
        desc=f"{op:>3}",
        unit="req",
        file=err,
        disable=not settings.progress,
        mininterval=0.2,
        leave=True,
    )
    stop = threading.Event()

    def worker() -> None:
        latencies: list[float] = []
        errors: dict[str, int] = {}
        done = 0
        try:
            while not stop.is_set():
                i = next(numbers)
                if i >= total:
                    break
                start = time.perf_counter()
                try:
                    call(i)
                except HyperCacheError as exc:
                    name = type(exc).__name__
                    errors[name] = errors.get(name, 0) + 1
                else:
                    latencies.append(time.perf_counter() - start)
                done += 1
                if done == 64:
                    with lock:
                        bar.update(done)
                    done = 0
        finally:
            with lock:
                bar.update(done)
                result.latencies += latencies
                for name, n in errors.items():
                    result.errors[name] = result.errors.get(name, 0) + n

    threads = [
        threading.Thread(target=worker, name=f"hypercache-bench-{op}-{t}", daemon=True)
        for t in range(settings.concurrency)
    ]
    start = time.perf_counter()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)  # (a bare join() would not see Ctrl-C)
    except BaseException:
        stop.set()
        raise
    finally:
        result.elapsed = time.perf_counter() - start
        bar.close()
    return result


def run_bench(client: Client, settings: BenchSettings, out: TextIO, err: TextIO) -> list[OpResult]:
    """Run the set phase, then the get phase; print the summary to ``out``."""
    value = os.urandom(settings.value_size)
    nkeys, level = settings.keys, settings.consistency

    def key(i: int) -> str:
        return f"bench:{i % nkeys}"

    def set_(i: int) -> None:
        client.set(key(i), value, consistency=level)

    def get(i: int) -> None:
        client.get(key(i), consistency=level)

    print(
        f"bench: {settings.requests} requests per op, concurrency {settings.concurrency}, "
        f"values of {settings.value_size} bytes, {nkeys} keys, consistency {level}",
        file=out,
        flush=True,
    )
    results = [_phase("set", set_, settings, err), _phase("get", get, settings, err)]
    print(
        f"{'op':<4}{'requests':>10}{'errors':>8}{'ops/s':>11}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}",
        file=out,
    )
    for r in results:
        ordered = sorted(r.latencies)
        ms = [percentile(ordered, q) * 1000 for q in (0.5, 0.95, 0.99, 1.0)]
        print(
            f"{r.op:<4}{r.requests:>10}{sum(r.errors.values()):>8}{r.rate:>11,.0f}"
            + "".join(f"{v:>9.3f}" for v in ms),
            file=out,
        )
        for name, n in sorted(r.errors.items()):
            print(f"  {r.op}: {n} x {name}", file=out)
    return results
