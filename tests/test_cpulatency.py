"""The CPU latency request (``--cpu-latency-limit``): the PM QoS protocol, failures,
and a node holding the limit exactly while it runs.

The unit tests point the request at a regular file or FIFO standing in for
``/dev/cpu_dma_latency``: what is written, and when the file is closed, is what the
kernel acts on. The functional test starts a real ``hypercache-node`` with the flag
and checks it against whether this machine's device is writable.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest
from aio_helpers import run
from cluster_harness import running_cluster

from hypercache.cluster.config import DistConfig
from hypercache.cluster.cpulatency import DEVICE, CpuLatencyRequest
from hypercache.cluster.node import Node
from hypercache.net.inproc import InprocNetwork


def open_fds_on(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            continue  # the descriptor of the listing itself, closed meanwhile
    return count


def test_acquire_writes_the_limit_as_a_native_s32_and_holds_the_file_open(
    tmp_path: Path,
) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"")
    request = CpuLatencyRequest(20, device=str(device))
    assert not request.held
    assert request.acquire() is True
    assert request.held and request.error is None
    assert device.read_bytes() == struct.pack("=i", 20)
    assert open_fds_on(device) == 1
    assert request.acquire() is True  # idempotent: no second descriptor
    assert open_fds_on(device) == 1
    request.release()
    assert not request.held
    assert open_fds_on(device) == 0
    request.release()  # idempotent


def test_missing_device_is_a_logged_warning_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    request = CpuLatencyRequest(0, device=str(tmp_path / "absent"))
    with caplog.at_level(logging.WARNING, logger="hypercache.node"):
        assert request.acquire() is False
    assert not request.held
    assert request.error is not None and "absent" in request.error
    assert "running without it" in caplog.text
    request.release()  # nothing to release


def test_unwritable_device_fails_and_leaks_no_descriptor(tmp_path: Path) -> None:
    # A directory opens for reading but not for writing: the open itself fails.
    request = CpuLatencyRequest(0, device=str(tmp_path))
    assert request.acquire() is False
    assert request.error is not None
    assert open_fds_on(tmp_path) == 0


@pytest.mark.parametrize("limit", [-1, 2**31, 1.5, True, "0"])
def test_bad_limit_is_refused(limit: object) -> None:
    with pytest.raises(ValueError, match="limit_us"):
        CpuLatencyRequest(limit)  # type: ignore[arg-type]


def test_node_holds_the_limit_from_start_to_stop_and_reports_it(tmp_path: Path) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"")

    async def scenario() -> None:
        net = InprocNetwork()
        node = Node(
            DistConfig(bind="10.0.0.1:7400", http=None, cpu_latency_limit=15e-6),
            transport=net,
        )
        assert node.cpu_latency is not None
        node.cpu_latency.device = str(device)
        assert not node.cpu_latency.held
        await node.start()
        try:
            assert node.stats()["cpu_latency_limit"] == {
                "limit_us": 15,
                "held": True,
                "error": None,
            }
            assert b"hypercache_cpu_latency_limit_held 1.0" in node.metrics.render()
            assert device.read_bytes() == struct.pack("=i", 15)
            assert open_fds_on(device) == 1
        finally:
            await node.stop()
        assert open_fds_on(device) == 0
        assert node.stats()["cpu_latency_limit"]["held"] is False

    run(scenario())


def test_node_without_the_device_runs_on_and_says_why(tmp_path: Path) -> None:
    async def scenario() -> None:
        node = Node(
            DistConfig(bind="10.0.0.1:7400", http=None, cpu_latency_limit=0),
            transport=InprocNetwork(),
        )
        assert node.cpu_latency is not None
        node.cpu_latency.device = str(tmp_path / "absent")
        async with node:
            stats = node.stats()["cpu_latency_limit"]
            assert stats["held"] is False and "absent" in stats["error"]
            assert b"hypercache_cpu_latency_limit_held 0.0" in node.metrics.render()
            assert node.state == "running"

    run(scenario())


def test_node_without_the_setting_asks_nothing() -> None:
    node = Node(DistConfig(bind="10.0.0.1:7400", http=None), transport=InprocNetwork())
    assert node.cpu_latency is None
    assert node.stats()["cpu_latency_limit"] is None
    assert b"hypercache_cpu_latency_limit_held" not in node.metrics.render()


@pytest.mark.functional
def test_node_process_with_the_flag_holds_the_limit_where_the_device_allows(
    tmp_path: Path,
) -> None:
    writable = os.access(DEVICE, os.W_OK)
    with running_cluster(1, tmp_path, ("--cpu-latency-limit", "0")) as cluster:
        stats = cluster[0].http_json("/stats")["cpu_latency_limit"]
        assert stats["limit_us"] == 0
        assert stats["held"] is writable
        if writable:
            with open(DEVICE, "rb") as device:
                # The kernel answers with the limit in force: ours is the lowest possible.
                assert struct.unpack("=i", device.read(4))[0] == 0
        else:
            assert stats["error"]
