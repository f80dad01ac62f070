"""Rebalancing benchmark: a 4th node joins a loaded 3-node cluster. Run with
``python -m bench.rebalance_report``.

What one run measures, side by side:

``load``     three real ``hypercache-node`` processes (uvloop, TCP on 127.0.0.1, free
             ports, the default 4096 partitions, 2048 vnodes, replication 3, so every
             node owns every key). ``keys`` keys (``key:<n>``) of :data:`VALUE_SIZE`
             random bytes are written straight into each replica with ``R_PUT_MANY``
             mode 0 (applied like replayed writes: newer-wins, one version for all),
             :data:`PUT_BATCH` entries a request, :data:`PIPELINE` requests in flight
             per node, the three nodes at once. Anti-entropy is out of the way
             (interval 600 s): only streaming moves data.
``steady``   ``clients`` (:data:`CLIENTS` by default; 0: no load) closed-loop workers
             in this process (uvloop), each on its
             own connection to one of the three old nodes (round robin), send QUORUM
             GETs and SETs (half each) of random loaded keys; every request is timed.
             *Before*: the :data:`WINDOW` seconds before node-4 is spawned. *During*:
             from node-4's spawn to the moment it reports ready.
``join``     node-4 is spawned with ``--seeds node-1``. *Time to ready*: from its spawn
             to ``/dist/rebalance`` showing ``ready`` (every partition it owns held;
             polled every :data:`POLL` s); also from its ready line (its interpreter
             start-up excluded) and the rebalancer's own ``last_rebalance_s`` (first
             partition queued to the last one held). *Keys moved*: its
             ``keys_moved`` counter (entries received by ``STREAM``) over the
             streaming time. Afterwards :data:`CHECK_KEYS` keys are read at QUORUM
             through node-4 (each must be found) and node-4 must hold about 3/4 of the
             keys (it owns 3/4 of the partitions: 1/4 of all replicas).
``floor``    the bytes node-4 received by streaming (its ``bytes`` counter: keys,
             values and 32 bytes of envelope per entry) sent over one loopback TCP
             socket by a plain Python sender thread (``sendall`` of 1 MiB chunks) to a
             receiver thread (``recv_into``), with the cluster idle: what the same
             bytes cost with nothing but a socket in the way.

The machine's CPUs are shared by the four nodes, the steady load and this process;
each run records how many CPUs were busy during the join (ours and others').
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import uvloop

from bench.bench_cluster import CpuSample, CpuUse, percentile
from hypercache._core.hlc import make_ts, wall_clock_ms
from hypercache.cluster.local import NodeProcess, ProcessCluster, wait_for
from hypercache.net import TCP, make_hello
from hypercache.net.blocking import pipeline_all
from hypercache.net.protocol import Op

__all__ = ["JoinResult", "Window", "floor_seconds", "join_benchmark"]

VALUE_SIZE: Final = 100
PUT_BATCH: Final = 4096
PIPELINE: Final = 8
CLIENTS: Final = 8
WINDOW: Final = 5.0
POLL: Final = 0.02
CHECK_KEYS: Final = 2000
START_TIMEOUT: Final = 60.0
REQUEST_TIMEOUT: Final = 10.0
#: The floor's chunk.
CHUNK: Final = 1 << 20

#: Node flags: fast failure detection that a busy machine does not trip, anti-entropy
#: out of the way, the rebalance settings at their defaults.
FLAGS: Final = (
    "--heartbeat-interval", "0.2", "--failure-timeout", "3", "--seed-retry-interval", "0.2",
    "--request-timeout", "10", "--anti-entropy-interval", "600",
    "--anti-entropy-max-interval", "600", "--log-level", "warning",
)  # fmt: skip


@dataclass(frozen=True)
class Window:
    """The steady load over one window."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def ops_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class JoinResult:
    keys: int
    load_seconds: float
    #: spawn -> ready, ready line -> ready, the rebalancer's own streaming time
    ready_from_spawn: float
    ready_from_line: float
    streaming_seconds: float
    keys_moved: int
    bytes_moved: int
    partitions_moved: int
    throttle_events: int
    node4_keys: int
    floor_seconds: float
    before: Window
    during: Window
    cpu: CpuUse | None

    @property
    def keys_per_s(self) -> float:
        return self.keys_moved / self.streaming_seconds

    @property
    def floor_ratio(self) -> float:
        return self.streaming_seconds / self.floor_seconds


# -- the floor -----------------------------------------------------------------------


def floor_seconds(nbytes: int) -> float:
    """Seconds to send ``nbytes`` over one loopback TCP socket, thread to thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got = 0
    done = threading.Event()

    def receive() -> None:
        nonlocal got
        conn, _ = listener.accept()
        with conn:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while got < nbytes:
                n = conn.recv_into(view)
                if not n:
                    break
                got += n
        done.set()

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    payload = os.urandom(CHUNK)
    with socket.create_connection(("127.0.0.1", port)) as sender:
        start = time.perf_counter()
        left = nbytes
        while left > 0:
            n = min(left, CHUNK)
            sender.sendall(payload[:n] if n < CHUNK else payload)
            left -= n
        done.wait(120)
        elapsed = time.perf_counter() - start
    receiver.join(5)
    listener.close()
    if got != nbytes:
        raise RuntimeError(f"the floor's receiver got {got} of {nbytes} bytes")
    return elapsed


# -- loading ---------------------------------------------------------------------------


def _load(
    cluster: ProcessCluster, keys: int, value: bytes, progress: Callable[[str], None]
) -> float:
    """Write ``keys`` entries into every node's replica with R_PUT_MANY; seconds taken."""
    ts = make_ts(wall_clock_ms(), 0)
    conns = [node.connect(timeout=60, as_peer=True) for node in cluster]
    start = time.perf_counter()
    try:
        step = PUT_BATCH * PIPELINE
        for lo in range(0, keys, step):
            batches = []
            for b in range(lo, min(lo + step, keys), PUT_BATCH):
                entries = [
                    [b"key:%08d" % i, value, ts, 1, 0, False]
                    for i in range(b, min(b + PUT_BATCH, keys))
                ]
                batches.append((int(Op.R_PUT_MANY), [entries, 0]))
            answers = pipeline_all([(conn, batches) for conn in conns], 120)
            for per_node in answers:
                for answer in per_node:
                    if isinstance(answer, BaseException):
                        raise answer
            if lo and lo % 200_000 < step:
                progress(f"loaded {lo:,} keys")
    finally:
        for conn in conns:
            conn.close()
    return time.perf_counter() - start


# -- steady load -------------------------------------------------------------------------


class _Load:
    """Closed-loop QUORUM workers; every request's start time and latency."""

    def __init__(self, addresses: list[str], keys: int, value: bytes) -> None:
        self.addresses = addresses
        self.keys = keys
        self.value = value
        self.samples: list[tuple[float, int]] = []  # (start, latency ns)
        self.errors: list[float] = []
        self.stop = asyncio.Event()

    async def worker(self, index: int) -> None:
        address = self.addresses[index % len(self.addresses)]
        conn = await TCP.connect(address, make_hello("hypercache"), None, 10)
        rng = random.Random(index)
        clock = time.perf_counter_ns
        try:
            while not self.stop.is_set():
                key = b"key:%08d" % rng.randrange(self.keys)
                payload: list[object]
                if rng.random() < 0.5:
                    op, payload = int(Op.GET), [key, "quorum"]
                else:
                    op, payload = int(Op.SET), [key, self.value, None, "quorum"]
                t0 = clock()
                try:
                    await conn.request(op, payload, REQUEST_TIMEOUT)
                except Exception:
                    self.errors.append(t0 / 1e9)
                    continue
                self.samples.append((t0 / 1e9, clock() - t0))
        finally:
            await conn.close()

    def window(self, start: float, end: float) -> Window:
        lat = sorted(ns for t, ns in self.samples if start <= t < end)
        errors = sum(1 for t in self.errors if start <= t < end)
        if not lat:
            return Window(0, errors, end - start, 0.0, 0.0)
        return Window(
            requests=len(lat),
            errors=errors,
            seconds=end - start,
            p50_ms=percentile(lat, 0.50) / 1e6,
            p99_ms=percentile(lat, 0.99) / 1e6,
        )


def _now() -> float:
    return time.perf_counter_ns() / 1e9


# -- one run -----------------------------------------------------------------------------


async def _join(
    cluster: ProcessCluster,
    node4: NodeProcess,
    keys: int,
    value: bytes,
    progress: Callable[[str], None],
    clients: int,
) -> tuple[float, float, float, Window, Window, CpuUse | None]:
    load = _Load(cluster.addresses, keys, value)
    workers = [asyncio.create_task(load.worker(i)) for i in range(clients)]
    try:
        before_start = _now()
        if clients:
            await asyncio.sleep(1.0)  # connected and warm
            before_start = _now()
            await asyncio.sleep(WINDOW)
        progress("spawning node-4")
        cpu0 = CpuSample.take([*cluster.pids])
        t_spawn = _now()
        node4.start(bind="127.0.0.1:0", http="127.0.0.1:0", seeds=[cluster[0].data])
        t_line = None
        while True:
            if t_line is None and node4.ready():
                t_line = _now()
            if t_line is not None:
                body = await asyncio.to_thread(node4.http_json, "/dist/rebalance", 5.0)
                if body.get("ready"):
                    break
            if not node4.running:
                raise RuntimeError(f"node-4 exited\n{node4.log_tail()}")
            if _now() - t_spawn > 600:
                raise TimeoutError("node-4 not ready within 600 s")
            await asyncio.sleep(POLL)
        t_ready = _now()
        pids = [*cluster.pids, *([node4.proc.pid] if node4.proc else [])]
        cpu1 = CpuSample.take(pids)
    finally:
        load.stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    return (
        t_ready - t_spawn,
        t_ready - (t_line or t_spawn),
        t_spawn,
        load.window(before_start, before_start + WINDOW),
        load.window(t_spawn, t_ready),
        CpuUse.between(cpu0, cpu1),
    )


def join_benchmark(
    keys: int,
    *,
    progress: Callable[[str], None],
    join_flags: Sequence[str] = (),
    clients: int = CLIENTS,
) -> JoinResult:
    """One run (see the module docstring); ``join_flags``: more flags for node-4;
    ``clients``: workers of the steady load (0: none)."""
    value = os.urandom(VALUE_SIZE)
    with tempfile.TemporaryDirectory(prefix="hc-bench-rebalance-") as tmp:
        workdir = Path(tmp)
        node4 = NodeProcess(3, "node-4", workdir, (*FLAGS, *join_flags))
        with ProcessCluster(3, workdir, FLAGS, timeout=START_TIMEOUT) as cluster:
            try:
                progress(f"loading {keys:,} keys of {VALUE_SIZE} B into 3 nodes")
                load_seconds = _load(cluster, keys, value, progress)
                for node in cluster:
                    held = int(node.http_json("/stats")["keys"])
                    if held != keys:
                        raise RuntimeError(f"{node.node_id} holds {held} keys, not {keys}")
                ready_spawn, ready_line, _, before, during, cpu = uvloop.run(
                    _join(cluster, node4, keys, value, progress, clients)
                )
                report = node4.http_json("/dist/rebalance")
                stats = node4.http_json("/stats")
                progress(f"node-4 ready in {ready_spawn:.2f} s; checking {CHECK_KEYS} keys")
                with node4.connect(timeout=30) as conn:
                    picks = random.Random(1).sample(range(keys), CHECK_KEYS)
                    answers = conn.pipeline(
                        [(Op.GET, [b"key:%08d" % i, "quorum"]) for i in picks], 60
                    )
                missing = sum(1 for a in answers if not (isinstance(a, list) and a[0]))
                if missing:
                    raise RuntimeError(f"{missing} of {CHECK_KEYS} keys not found through node-4")
                node4_keys = int(stats["keys"])
                if not 0.6 < node4_keys / keys < 0.9:
                    raise RuntimeError(f"node-4 holds {node4_keys} of {keys} keys")
            finally:
                node4.stop()
                if node4.proc is not None:
                    wait_for(lambda: not node4.running, timeout=10, what="node-4 stopped")
        streaming = float(report["last_rebalance_s"] or ready_line)
        nbytes = int(report["bytes"])
        progress(f"floor: {nbytes:,} bytes over a loopback socket")
        floor = min(floor_seconds(nbytes) for _ in range(3))
    return JoinResult(
        keys=keys,
        load_seconds=load_seconds,
        ready_from_spawn=ready_spawn,
        ready_from_line=ready_line,
        streaming_seconds=streaming,
        keys_moved=int(report["keys_moved"]),
        bytes_moved=nbytes,
        partitions_moved=int(report["partitions_moved"]),
        throttle_events=int(report["throttle_events"]),
        node4_keys=node4_keys,
        floor_seconds=floor,
        before=before,
        during=during,
        cpu=cpu,
    )
