"""hypercache.cluster.local: the polls, and the failures of a local cluster's start.

The clusters' working paths are what every cluster test runs on; these pin what
only a failure shows: a poll's deadline and its error, a node that exits before it
is ready, an interrupted start, ``make run`` when a node cannot start.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from aio_helpers import run
from cluster_harness import FAST_FLAGS

from hypercache.cli.local import main as local_main
from hypercache.cluster.local import NodeExitedError, ProcessCluster, until, wait_for


def test_wait_for_returns_the_first_truthy_value_and_retries_what_raises() -> None:
    answers = iter([ValueError("not yet"), 0, None, "ready"])

    def condition() -> object:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_for(condition, timeout=5) == "ready"


def test_wait_for_times_out_naming_what_with_the_last_exception() -> None:
    calls = [0]

    def condition() -> bool:
        calls[0] += 1
        raise KeyError(calls[0])

    start = time.monotonic()
    with pytest.raises(TimeoutError, match="waiting for the thing") as info:
        wait_for(condition, timeout=0.2, interval=0.01, what="the thing")
    assert 0.2 <= time.monotonic() - start < 2
    assert isinstance(info.value.__cause__, KeyError)
    assert info.value.__cause__.args == (calls[0],)  # the last one
    assert calls[0] > 2  # polled again and again


def test_wait_for_lets_a_keyboard_interrupt_through() -> None:
    def condition() -> bool:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        wait_for(condition, timeout=5)


def test_until_polls_plain_and_async_conditions_while_the_loop_runs() -> None:
    async def scenario() -> None:
        flag = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, flag.set)
        await until(flag.is_set, timeout=5, what="the flag")

        async def later() -> bool:
            await asyncio.sleep(0)
            return True

        await until(later, timeout=5)

        async def never() -> bool:
            raise ConnectionError("down")

        with pytest.raises(TimeoutError, match=r"after 0\.1s waiting for .*never$") as info:
            await until(never, timeout=0.1)
        assert isinstance(info.value.__cause__, ConnectionError)

    run(scenario())


@pytest.mark.functional
def test_a_node_that_exits_before_it_is_ready_fails_the_start_at_once(tmp_path: Path) -> None:
    cluster = ProcessCluster(2, tmp_path, (*FAST_FLAGS, "--replication", "zero"))
    start = time.monotonic()
    with pytest.raises(NodeExitedError, match="node-1 exited with status 2 before it was ready"):
        cluster.start()
    assert time.monotonic() - start < cluster.timeout / 2  # not at the deadline
    assert not any(node.running for node in cluster)
    assert cluster[1].proc is None  # never started


@pytest.mark.functional
def test_an_interrupted_start_stops_what_it_started(tmp_path: Path) -> None:
    cluster = ProcessCluster(3, tmp_path, FAST_FLAGS)
    timer = threading.Timer(0.2, cluster.interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.start()
    finally:
        timer.cancel()
    started = [node for node in cluster if node.proc is not None]
    assert started
    assert not any(node.running for node in started)


@pytest.mark.functional
def test_make_run_exits_1_when_a_node_cannot_start(capsys: pytest.CaptureFixture[str]) -> None:
    assert local_main(["--nodes", "2", "--log-level", "nonsense"]) == 1
    captured = capsys.readouterr()
    assert "node-1 exited with status 2 before it was ready" in captured.err
    assert "cluster stopped" in captured.out
