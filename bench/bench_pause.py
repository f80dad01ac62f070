"""A paused node under load: what one ``AsyncClient`` gets before, during and after
a SIGSTOP of one of three nodes. Run with ``python -m bench.pause_report``.

Three real ``hypercache-node`` processes (uvloop, TCP on 127.0.0.1, free ports,
replication 3; :func:`bench.bench_cluster.tcp_cluster`), one ``AsyncClient`` in this
process (uvloop) with its default ``timeout`` of 2 s, every request QUORUM, values
:data:`VALUE_SIZE` random bytes (``RawSerializer``) over :data:`KEYS` keys written
before timing. :data:`IN_FLIGHT` closed-loop workers share the client, each
alternating a ``set`` and a ``get`` of a random key, for the whole run:

``before``  :attr:`PauseConfig.phase` seconds with every node running;
``during``  the next :attr:`PauseConfig.pause` seconds, one node stopped (SIGSTOP: its
            sockets stay open, nothing is refused, nothing is answered);
``after``   the :attr:`PauseConfig.phase` seconds from its SIGCONT on.

Each request is timed alone (:func:`time.perf_counter_ns` around its ``await``) and
counted in the phase in which it *completed*; ops/s is requests completed in a phase
over its length, failed ones (``RequestTimeoutError`` of a write whose node stopped,
or anything else) counted apart and left out of ops/s and of the percentiles. Each
run stops another node (node ``run % 3``); the report gives the median over the
runs and the ratio of ``during`` to ``before`` ops/s (the target: at least 0.5).

Every process started here is stopped on the way out and a stopped node always gets
its SIGCONT first, whatever happens (SIGINT and SIGTERM unwind through the same
``finally`` blocks, :class:`bench.bench_cluster._Stopper`).

The loop is the same as ``bench.bench_cluster``'s (a plain timed harness, not
pytest-benchmark, for the same reasons: requests in flight, per-request
percentiles, processes kept across phases). The client under test only uses the
public API, so the same file measures an older client for comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench.bench_cluster import (
    NODES,
    CpuSample,
    CpuUse,
    _run_loop,
    _Stopper,
    bench_keys,
    bench_value,
    percentile,
    tcp_cluster,
)
from hypercache.client import AsyncClient, RawSerializer
from hypercache.cluster.local import until
from hypercache.errors import HyperCacheError

CONSISTENCY: Final = "quorum"
IN_FLIGHT: Final = 32
PHASES: Final = ("before", "during", "after")
OPS: Final = ("set", "get")
SEED: Final = 20241126
#: Deadline of the waits between runs (the cluster healthy again).
SETTLE_TIMEOUT: Final = 30.0


@dataclass(frozen=True, kw_only=True)
class PauseConfig:
    """How much to measure.

    :param runs: runs (each with its own pause of another node).
    :param phase: seconds of the ``before`` and the ``after`` phase.
    :param pause: seconds the node stays stopped (the ``during`` phase).
    """

    quick: bool
    runs: int
    phase: float
    pause: float


FULL = PauseConfig(quick=False, runs=3, phase=10.0, pause=10.0)
QUICK = PauseConfig(quick=True, runs=1, phase=2.0, pause=4.0)


@dataclass
class Phase:
    """What completed in one phase of one run."""

    seconds: float
    latencies: dict[str, list[int]] = field(default_factory=lambda: {op: [] for op in OPS})
    failed: dict[str, int] = field(default_factory=dict)  # error type name -> count
    #: requests completed per whole second of the phase (a timeline)
    per_second: list[int] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    @property
    def ops_per_s(self) -> float:
        return self.completed / self.seconds

    def p99_ms(self, op: str) -> float:
        ordered = sorted(self.latencies[op])
        return percentile(ordered, 0.99) / 1e6 if ordered else math.nan

    def max_ms(self) -> float:
        """The slowest request that succeeded, of either op."""
        return max((max(v) for v in self.latencies.values() if v), default=math.nan) / 1e6

    def p50_ms(self, op: str) -> float:
        ordered = sorted(self.latencies[op])
        return percentile(ordered, 0.50) / 1e6 if ordered else math.nan


@dataclass
class PauseRun:
    """One run: the node stopped, each phase, the client's counters afterwards."""

    paused_node: int
    phases: dict[str, Phase]
    client_stats: dict[str, int]
    others_cpu: float = math.nan

    @property
    def ratio(self) -> float:
        """``during`` ops/s over ``before`` ops/s."""
        return self.phases["during"].ops_per_s / self.phases["before"].ops_per_s


@dataclass
class PauseResults:
    config: PauseConfig
    runs: list[PauseRun] = field(default_factory=list)
    cpu: CpuUse | None = None

    def median(self, metric: Callable[[PauseRun], float]) -> float:
        return float(statistics.median(metric(run) for run in self.runs))


Progress = Callable[[str], None]


class _Load:
    """:data:`IN_FLIGHT` closed-loop workers on one client, recording every request."""

    def __init__(self, client: AsyncClient, keys: list[str], value: bytes) -> None:
        self.client = client
        self.keys = keys
        self.value = value
        self.running = True
        # (op, end_ns, latency_ns, error type name or "")
        self.records: list[tuple[str, int, int, str]] = []

    async def worker(self, index: int) -> None:
        rng = random.Random(SEED + index)
        client, keys, value, record = self.client, self.keys, self.value, self.records.append
        clock = time.perf_counter_ns
        n = 0
        while self.running:
            key = rng.choice(keys)
            op = OPS[n & 1]
            n += 1
            start = clock()
            error = ""
            try:
                if op == "set":
                    await client.set(key, value)
                else:
                    await client.get(key)
            except HyperCacheError as exc:
                error = type(exc).__name__
            end = clock()
            record((op, end, end - start, error))

    def phase(self, start_ns: int, end_ns: int) -> Phase:
        out = Phase(seconds=(end_ns - start_ns) / 1e9)
        buckets = [0] * max(1, round(out.seconds))  # the last takes any fraction left
        for op, end, latency, error in self.records:
            if not start_ns <= end < end_ns:
                continue
            if error:
                out.failed[error] = out.failed.get(error, 0) + 1
                continue
            out.latencies[op].append(latency)
            buckets[min(len(buckets) - 1, (end - start_ns) // 1_000_000_000)] += 1
        out.per_second = buckets
        return out


async def _healthy(client: AsyncClient, seeds: list[str]) -> None:
    """Wait until every node answers a PING and the client sets none aside (read from
    its router: no public API says so)."""

    async def answered() -> bool:
        for address in seeds:
            await client.ping(address)
        return not client._router.down

    await until(answered, timeout=SETTLE_TIMEOUT, interval=0.1, what="the cluster healthy")


async def _one_run(
    client: AsyncClient,
    seeds: list[str],
    pids: list[int],
    run: int,
    config: PauseConfig,
    keys: list[str],
    value: bytes,
    progress: Progress,
) -> PauseRun:
    await _healthy(client, seeds)
    target = run % NODES
    before_stats = client.stats.as_dict()
    load = _Load(client, keys, value)
    cpu_before = CpuSample.take(pids)
    workers = [asyncio.create_task(load.worker(i)) for i in range(IN_FLIGHT)]
    clock = time.perf_counter_ns
    try:
        t0 = clock()
        await asyncio.sleep(config.phase)
        t1 = clock()
        os.kill(pids[target], signal.SIGSTOP)
        try:
            progress(f"run {run + 1}: node-{target + 1} stopped for {config.pause:g} s")
            await asyncio.sleep(config.pause)
        finally:
            os.kill(pids[target], signal.SIGCONT)
        t2 = clock()
        await asyncio.sleep(config.phase)
        t3 = clock()
    finally:
        load.running = False
        await asyncio.gather(*workers, return_exceptions=True)
    cpu = CpuUse.between(cpu_before, CpuSample.take(pids))
    after_stats = client.stats.as_dict()
    phases = {
        "before": load.phase(t0, t1),
        "during": load.phase(t1, t2),
        "after": load.phase(t2, t3),
    }
    result = PauseRun(
        paused_node=target,
        phases=phases,
        client_stats={k: v - before_stats.get(k, 0) for k, v in after_stats.items()},
        others_cpu=math.nan if cpu is None else cpu.others,
    )
    for name, ph in phases.items():
        progress(
            f"run {run + 1} {name:6}: {ph.ops_per_s:8,.0f} ops/s  "
            f"p99 set {ph.p99_ms('set'):7.1f} ms  get {ph.p99_ms('get'):7.1f} ms  "
            f"failed {sum(ph.failed.values())}  per second {ph.per_second}"
        )
    progress(f"run {run + 1}: during/before {result.ratio:.2f}")
    return result


async def _main_loop(
    seeds: list[str],
    pids: list[int],
    config: PauseConfig,
    results: PauseResults,
    progress: Progress,
    stopper: _Stopper,
) -> None:
    keys, value = bench_keys(), bench_value()
    with stopper.in_loop():
        client = AsyncClient(seeds, consistency=CONSISTENCY, serializer=RawSerializer())
        try:
            await client.connect()
            await client.set_many(dict.fromkeys(keys, value))
            progress(f"populated {len(keys):,} keys of {len(value)} bytes; timing")
            for run in range(config.runs):
                results.runs.append(
                    await _one_run(client, seeds, pids, run, config, keys, value, progress)
                )
        finally:
            await client.close()


def measure(config: PauseConfig, *, progress: Progress) -> PauseResults:
    """Start the nodes, run every pause, stop everything; return the results.

    :raises bench.bench_cluster.Interrupted: SIGINT or SIGTERM arrived.
    """
    stopper = _Stopper()
    results = PauseResults(config)
    before = CpuSample.take()
    with (
        stopper.installed(),
        tempfile.TemporaryDirectory(prefix="hypercache-pause-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        pids: list[int] = []
        progress(f"starting {NODES} hypercache-node processes")
        seeds = stack.enter_context(tcp_cluster(Path(tmp), size=NODES, pids=pids))
        _run_loop(_main_loop(seeds, pids, config, results, progress, stopper), stopper)
    results.cpu = CpuUse.between(before, CpuSample.take())
    return results
