"""hypercache.cluster.local: the polls, and the failures of a local cluster's start.

The clusters' working paths are what every cluster test runs on; these pin what
only a failure shows: a poll's deadline and its error, a node that exits before it
is ready, an interrupted start, ``make run`` when a node cannot start, and the
fixed ports of ``make run`` that the README's examples use.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aio_helpers import run
from cluster_harness import FAST_FLAGS, free_port_run

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


@pytest.mark.functional
def test_a_cluster_with_ports_binds_consecutive_fixed_ports(tmp_path: Path) -> None:
    base = free_port_run(6)
    with ProcessCluster(3, tmp_path, FAST_FLAGS, ports=(base, base + 3)) as cluster:
        assert [node.data for node in cluster] == [f"127.0.0.1:{base + i}" for i in range(3)]
        assert [node.http for node in cluster] == [f"127.0.0.1:{base + 3 + i}" for i in range(3)]
        members = cluster[2].http_json("/cluster/members")
        assert sorted(m["address"] for m in members["members"]) == [
            f"127.0.0.1:{base + i}" for i in range(3)
        ]


def test_make_run_defaults_to_the_ports_the_readme_uses() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "127.0.0.1:7400" in readme and "127.0.0.1:7480" in readme
    with pytest.raises(SystemExit):
        local_main(["--help"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "65535"], "--port must be 0 or a port leaving room for 3 nodes"),
        (["--http-port", "-1"], "--http-port must be 0 or a port"),
        (["--port", "0"], "--port and --http-port are both 0"),
        (["--nodes", "0"], "--nodes must be at least 1"),
    ],
)
def test_make_run_refuses_ports_it_cannot_use(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        local_main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.functional
def test_make_run_serves_at_the_ports_asked_for_and_names_them(tmp_path: Path) -> None:
    base = free_port_run(4)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "hypercache.cli.local", "--nodes", "2"),
            *("--port", str(base), "--http-port", str(base + 2)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops the cluster" in line:
                break
        banner = "".join(lines)
        assert f"data 127.0.0.1:{base}" in banner, banner
        assert f"http http://127.0.0.1:{base + 3}" in banner, banner
        with socket.create_connection(("127.0.0.1", base + 1), timeout=5):
            pass
    finally:
        proc.terminate()
        status = proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert status == 0
