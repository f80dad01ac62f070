"""The test settings of clusters, over :mod:`hypercache.cluster.local` (which holds
the clusters themselves and the polls that wait for them).

Functional tests start real processes::

    with running_cluster(3, tmp_path) as cluster:
        cluster.request(0, Op.SET, [b"k", b"v", None, "quorum"])
        cluster.kill(2)            # SIGKILL
        cluster.restart(2)         # same id, same addresses
        cluster[1].http_json("/health")

Unit tests run :class:`~hypercache.cluster.local.InprocCluster` in their loop, with
:data:`FAST` (or settings of their own built on it).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypercache.cluster.local import ProcessCluster
from hypercache.cluster.node import Node

#: Flags that make a test cluster of processes converge and detect failures fast.
FAST_FLAGS: tuple[str, ...] = (
    "--heartbeat-interval",
    "0.2",
    "--failure-timeout",
    "1",
    "--seed-retry-interval",
    "0.2",
    "--request-timeout",
    "2",
    "--connect-timeout",
    "1",
    "--log-level",
    "info",
)

#: Settings that make an in-process test cluster converge and detect failures fast.
FAST: dict[str, Any] = {
    "http": None,
    "heartbeat_interval": 0.05,
    "failure_timeout": 0.3,
    "seed_retry_interval": 0.05,
    "request_timeout": 1.0,
    "connect_timeout": 0.5,
    "partitions": 256,
}

# Small frames (valid: max_key + max_value + 4 KiB <= max_frame): a few entries of
# the largest value no longer fit in one frame together.
SMALL_FRAMES: dict[str, Any] = {"max_key": 64, "max_value": 8192, "max_frame": 16384}


def running_cluster(size: int, workdir: Path, extra_args: Sequence[str] = ()) -> ProcessCluster:
    """``size`` node processes with :data:`FAST_FLAGS` and ``extra_args``, to use as
    ``with running_cluster(...) as cluster``: started on entry, stopped on exit."""
    return ProcessCluster(size, workdir, (*FAST_FLAGS, *extra_args))


def key_owned_by(node: Node, owners: list[str], prefix: bytes = b"k") -> bytes:
    """A key whose owner list (primary first) is exactly ``owners`` on ``node``'s ring."""
    for i in range(100_000):
        key = prefix + str(i).encode()
        if node.ring.owners(key) == owners:
            return key
    raise AssertionError(f"no key owned by {owners}")


def local(node: Node, key: bytes) -> Any:
    """``node``'s own entry for ``key`` (tombstones included), or ``None``."""
    assert node.coordinator is not None
    return node.replica.get(key)


def free_port_run(count: int) -> int:
    """A port ``p`` with ``p .. p+count-1`` all free on loopback right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return int(base)
    raise RuntimeError("no run of free ports")
