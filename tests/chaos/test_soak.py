"""bench.soak's verdict: every node is judged on the samples of its own processes (a
restart is followed by its new pid), a node without enough samples fails the
verdict, and the asyncio task gauge the soak caps counts a node's tasks."""

from __future__ import annotations

import asyncio
from typing import Any

from aio_helpers import run
from cluster_harness import FAST

from bench.soak import MIN_POINTS, Series, verdict
from hypercache.cluster.local import InprocCluster
from hypercache.cluster.node import Node
from hypercache.cluster.status import NodeStatus

MIB = 2**20


def flat(series: Series, pid: int, start: float, n: int, rss: float = 50 * MIB) -> None:
    for i in range(n):
        series.add(pid, start + i * 5.0, rss + (i % 2) * 0.1 * MIB)


def test_a_restart_starts_a_series_of_its_own_and_the_longest_is_judged() -> None:
    series = Series()
    flat(series, 100, 0.0, 30)
    # the new process starts small and grows: judged alone it would not be flat
    for i in range(4):
        series.add(200, 200.0 + i * 5.0, (20 + 10 * i) * MIB)
    assert [pid for pid, _ in series.segments] == [100, 200]
    _slope, mean, ok = verdict(series)
    assert ok is True
    assert 49 < mean < 51


def test_a_growing_node_fails() -> None:
    series = Series()
    for i in range(30):
        series.add(100, i * 5.0, (50 + i) * MIB)
    assert verdict(series)[2] is False


def test_a_node_with_too_few_samples_is_not_judged() -> None:
    series = Series()
    # many short lives (killed over and over): no segment has MIN_POINTS warm samples
    for pid in range(5):
        flat(series, pid, pid * 100.0, MIN_POINTS)
    assert verdict(series)[2] is None
    assert verdict(Series())[2] is None


def test_the_task_gauge_counts_the_loops_tasks() -> None:
    async def main() -> tuple[int, int]:
        async with InprocCluster(1, settings=FAST, address="127.0.13.{n}:7400") as cluster:
            node = cluster.nodes[0]
            before = int(status(node)["tasks"])
            gate = asyncio.Event()
            extra = [asyncio.create_task(gate.wait()) for _ in range(25)]
            after = int(status(node)["tasks"])
            text = node.metrics.render().decode()
            gauge = next(
                float(line.split()[1])
                for line in text.splitlines()
                if line.startswith("hypercache_asyncio_tasks ")
            )
            gate.set()
            await asyncio.gather(*extra)
            assert gauge == after
            return before, after

    before, after = run(main())
    assert after == before + 25


def status(node: Node) -> dict[str, Any]:
    """What the node's ``GET /stats`` serves."""
    return NodeStatus(node).stats()
