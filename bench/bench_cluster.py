"""Cluster benchmarks: QUORUM set/get of a 3-node cluster, in-process against TCP,
with redis as the outside reference. Run with ``python -m bench.cluster_report``.

What is measured, in one process and one run:

``inproc``    three :class:`~hypercache.cluster.node.Node` objects on one
              :class:`~hypercache.net.inproc.InprocNetwork`, all in the benchmark's
              event loop, driven by an ``AsyncClient`` in that same loop whose node
              connections are opened on the in-process network
              (``AsyncClient(..., transport=network)``); everything above the byte
              pipe - client, framing, handshake, coordinator, store - is the code that
              runs over TCP.
``tcp``       three real ``hypercache-node`` processes (uvloop) on free 127.0.0.1 ports,
              driven by an ``AsyncClient`` in the benchmark process (uvloop).
``tcp-sync``  the same processes driven by the blocking :class:`~hypercache.client.Client`
              (1 client only): the like-for-like peer of redis-py's sync client.
``tcp-proxy``, ``tcp-sync-proxy``
              the same processes and clients with ``write_path="proxy"``: a set goes
              to the key's primary, which stamps and replicates it (client -> primary ->
              replicas -> primary -> client); the plain ``tcp`` systems write in one
              hop (``write_path="direct"``, the default: the client stamps the version
              and sends ``W_PUT`` to the three owners at once, done at two acks). Gets
              are the same on both (the client reads the owners itself): a control.
``redis``     a ``redis-server`` started here on a free loopback port with ``--save ''
              --appendonly no``: ``redis.Redis`` sequentially, ``redis.asyncio.Redis``
              (a pool, one connection per request in flight) for 32 concurrent requests.
              Skipped, with the reason in the report, when ``redis-server`` is not on
              ``PATH`` or redis-py is not installed.

Every hypercache request is QUORUM (``consistency="quorum"`` as the client default;
replication 3, so 2 of 3 owners ack). Clients route to the key's owners
(``route="owner"``, the default): the primary coordinates, writes its own replica and
needs one remote ack. Values are :data:`VALUE_SIZE` random bytes stored with
:class:`~hypercache.client.RawSerializer` (exactly those bytes on the wire, as for
redis); keys are ``"key:<n>"`` for n < :data:`KEYS`, all written before the first
timed request, so every get hits. Each cell walks a seeded permutation of the keys.

``clients=1`` awaits each request before sending the next. ``clients=32`` runs 32
closed-loop workers sharing one client (one multiplexed connection per node for
hypercache, a 32-connection pool for redis.asyncio): 32 requests always in flight.
Each request is timed alone with :func:`time.perf_counter_ns` around its ``await`` (or
call); ops/s is requests completed over the run's wall time. A run of a cell stops at
its request count or its time cap, whichever comes first; the report gives the median
over the runs of each figure. The runs are interleaved - run 1 of every cell, then run
2, ... - so that a burst of load from elsewhere lands on all systems rather than one.
The garbage collector stays on, as in an application.

The machine is shared, so each run also records how many CPUs *other* processes kept
busy meanwhile (``/proc/stat`` minus this process, its nodes and its redis-server):
the report shows it per cell, so that a figure timed on a busy machine says so.

Every process and server started here is stopped on the way out, whatever happens:
SIGINT and SIGTERM unwind through the same ``finally`` blocks (:class:`_Stopper`).

Why a plain timed harness and not pytest-benchmark: pytest-benchmark times a callable
per round and reports statistics of rounds; it cannot time each of 32 requests in
flight, report per-request percentiles, or keep an event loop, three node processes
and a redis-server alive across cells. The loops here are short and shared by every
system, and ``bench.cluster_report`` prints its own markdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

from hypercache.client import AsyncClient, Client, RawSerializer
from hypercache.cluster.local import (
    InprocCluster,
    ProcessCluster,
    file_tail,
    stop_process,
    wait_for,
)

NODES: Final = 3
REPLICATION: Final = 3
CONSISTENCY: Final = "quorum"
VALUE_SIZE: Final = 100
KEYS: Final = 10_000
CLIENTS: Final = (1, 32)
OPS: Final = ("set", "get")
SEED: Final = 20240601

#: system -> label in the report, in report order.
SYSTEMS: Final = {
    "inproc": "hypercache in-process (AsyncClient)",
    "tcp": "hypercache TCP (AsyncClient)",
    "tcp-sync": "hypercache TCP (sync Client)",
    "tcp-proxy": "hypercache TCP, proxy writes (AsyncClient)",
    "tcp-sync-proxy": "hypercache TCP, proxy writes (sync Client)",
    "redis": "redis-server (redis-py)",
}
#: systems that only run with one client (a blocking client has one request in flight).
SEQUENTIAL_ONLY: Final = frozenset({"tcp-sync", "tcp-sync-proxy"})
#: the hypercache systems over TCP, and the write path of each
TCP_SYSTEMS: Final = {
    "tcp": "direct",
    "tcp-sync": "direct",
    "tcp-proxy": "proxy",
    "tcp-sync-proxy": "proxy",
}

#: Deadlines of the set-up waits, and the per-request timeout of every client.
START_TIMEOUT: Final = 30.0
REQUEST_TIMEOUT: Final = 5.0
#: SIGTERM, then SIGKILL after this many seconds.
STOP_GRACE: Final = 5.0


@dataclass(frozen=True, kw_only=True)
class ClusterBenchConfig:
    """How much to measure.

    :param runs: timed runs of every cell (the report shows their medians).
    :param sequential: requests per run with one client.
    :param concurrent: requests per run with 32 in flight.
    :param warmup: untimed requests per cell before the first run.
    :param run_seconds: time cap of one run of one cell.
    """

    quick: bool
    runs: int
    sequential: int
    concurrent: int
    warmup: int
    run_seconds: float


FULL = ClusterBenchConfig(
    quick=False, runs=5, sequential=5_000, concurrent=16_000, warmup=1_000, run_seconds=10.0
)
QUICK = ClusterBenchConfig(
    quick=True, runs=1, sequential=200, concurrent=640, warmup=50, run_seconds=2.0
)


# -- statistics ----------------------------------------------------------------------------


def percentile(ordered: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of an ascending, non-empty sequence (``q`` in 0..1)."""
    rank = max(1, math.ceil(len(ordered) * q))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Run:
    """One timed run of one cell."""

    requests: int
    wall_ns: int
    p50_ns: int
    p95_ns: int
    p99_ns: int
    #: average CPUs that other processes of the machine kept busy meanwhile (NaN: unknown)
    others_cpu: float = math.nan

    @classmethod
    def from_latencies(cls, latencies: list[int], wall_ns: int) -> Run:
        if not latencies:
            raise RuntimeError("a run completed no request")
        ordered = sorted(latencies)
        return cls(
            requests=len(ordered),
            wall_ns=wall_ns,
            p50_ns=percentile(ordered, 0.50),
            p95_ns=percentile(ordered, 0.95),
            p99_ns=percentile(ordered, 0.99),
        )

    @property
    def ops_per_s(self) -> float:
        return self.requests / (self.wall_ns / 1e9)


@dataclass
class Cell:
    """All runs of one (system, op, clients)."""

    system: str
    op: str
    clients: int
    runs: list[Run] = field(default_factory=list)

    def median(self, metric: str) -> float:
        """Median over the runs of ``metric`` (a :class:`Run` attribute)."""
        return float(statistics.median(getattr(run, metric) for run in self.runs))


@dataclass
class Results:
    cells: dict[tuple[str, str, int], Cell] = field(default_factory=dict)
    #: system -> why it was not measured
    skipped: dict[str, str] = field(default_factory=dict)
    #: "redis-server" -> version line, etc.
    versions: dict[str, str] = field(default_factory=dict)
    #: CPU use over the whole measurement (None where /proc/stat is missing).
    cpu: CpuUse | None = None

    def get(self, system: str, op: str, clients: int) -> Cell | None:
        cell = self.cells.get((system, op, clients))
        return cell if cell is not None and cell.runs else None


@dataclass(frozen=True)
class CpuSample:
    """Machine-wide CPU counters (``/proc/stat``) and our own CPU time, at one instant."""

    wall: float
    busy: float  # CPU-seconds of every process: user, nice, system, irq, softirq
    steal: float  # CPU-seconds the hypervisor gave to other guests
    ours: float  # CPU-seconds of this process and its children, live or reaped

    @classmethod
    def take(cls, children: Sequence[int] = ()) -> CpuSample | None:
        """Now; ``children``: the pids of live children (the nodes, redis-server)."""
        hz = os.sysconf("SC_CLK_TCK")
        try:
            with open("/proc/stat", encoding="ascii") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        me = resource.getrusage(resource.RUSAGE_SELF)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = me.ru_utime + me.ru_stime + reaped.ru_utime + reaped.ru_stime
        for pid in children:
            try:
                with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # reaped meanwhile: counted in RUSAGE_CHILDREN
            ours += (int(fields[11]) + int(fields[12])) / hz  # utime, stime
        user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
        return cls(
            wall=time.monotonic(),
            busy=(user + nice + system + irq + softirq) / hz,
            steal=steal / hz,
            ours=ours,
        )


@dataclass(frozen=True)
class CpuUse:
    """Average CPUs busy during the measurement: ours (this process, the nodes, redis)
    and everything else on the machine, plus hypervisor steal."""

    ours: float
    others: float
    steal: float

    @classmethod
    def between(cls, before: CpuSample | None, after: CpuSample | None) -> CpuUse | None:
        if before is None or after is None or after.wall <= before.wall:
            return None
        wall = after.wall - before.wall
        ours = (after.ours - before.ours) / wall
        busy = (after.busy - before.busy) / wall
        steal = (after.steal - before.steal) / wall
        return cls(ours=ours, others=max(0.0, busy - ours), steal=steal)


# -- timed loops (shared by every system) --------------------------------------------------

AsyncOp = Callable[[str], Awaitable[Any]]
SyncOp = Callable[[str], Any]


async def run_async(call: AsyncOp, keys: Sequence[str], n: int, clients: int, cap: float) -> Run:
    """``n`` requests (or ``cap`` seconds) with ``clients`` requests in flight."""
    clock = time.perf_counter_ns
    deadline = clock() + int(cap * 1e9)
    latencies: list[int] = []
    indexes = iter(range(n))  # shared by the workers: each index is taken once
    size = len(keys)

    async def worker() -> None:
        record = latencies.append
        for i in indexes:
            key = keys[i % size]
            start = clock()
            await call(key)
            end = clock()
            record(end - start)
            if end > deadline:
                break

    start = clock()
    if clients == 1:
        await worker()
    else:
        await asyncio.gather(*(worker() for _ in range(clients)))
    return Run.from_latencies(latencies, clock() - start)


def run_sync(call: SyncOp, keys: Sequence[str], n: int, cap: float, stop: threading.Event) -> Run:
    """``n`` blocking requests one after the other (or ``cap`` seconds, or until
    ``stop`` is set: this runs in a worker thread, which cancellation cannot reach)."""
    clock = time.perf_counter_ns
    deadline = clock() + int(cap * 1e9)
    latencies: list[int] = []
    record = latencies.append
    stopped = stop.is_set
    size = len(keys)
    start = clock()
    for i in range(n):
        key = keys[i % size]
        t0 = clock()
        call(key)
        t1 = clock()
        record(t1 - t0)
        if t1 > deadline or stopped():
            break
    return Run.from_latencies(latencies, clock() - start)


# -- stopping on a signal ------------------------------------------------------------------

_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


class CpuLatencyUnavailable(RuntimeError):
    """The nodes were asked for ``--cpu-latency-limit`` and could not hold it."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; everything started was stopped on the way out.

    :ivar signum: the signal.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = signum


class _Stopper:
    """Turns SIGINT and SIGTERM into an orderly unwinding, so that every ``finally``
    runs and stops the nodes and redis-server.

    Outside the event loop the Python-level handler raises :class:`Interrupted`.
    Inside it, a handler raised from a protocol callback would be swallowed by the
    loop, so the loop's own signal handler cancels the main task instead, and sets
    :attr:`event` for the timed loop running in a worker thread.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.event = threading.Event()
        self.task: asyncio.Task[Any] | None = None

    def sync_handler(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self.event.set()
        raise Interrupted(signum)

    def loop_handler(self, signum: int) -> None:
        self.signum = signum
        self.event.set()
        if self.task is not None:
            self.task.cancel()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Python-level handlers for the duration (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.sync_handler) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def in_loop(self) -> Iterator[None]:
        """The loop's handlers while the current task runs, then the Python-level ones."""
        loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, self.loop_handler, sig)
        try:
            yield
        finally:
            for sig in _STOP_SIGNALS:
                loop.remove_signal_handler(sig)
                signal.signal(sig, self.sync_handler)


# -- processes -----------------------------------------------------------------------------


@contextlib.contextmanager
def tcp_cluster(
    workdir: Path,
    size: int = NODES,
    pids: list[int] | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[list[str]]:
    """Start ``size`` ``hypercache-node`` processes on 127.0.0.1
    (:class:`~hypercache.cluster.local.ProcessCluster`); yield their data addresses
    once every node sees every member up. Always stops them all.

    :param pids: the pid of each process started is appended to it.
    :param extra_args: more flags for every node.
    """
    args = ("--replication", str(REPLICATION), "--log-level", "warning", *extra_args)
    with ProcessCluster(size, workdir, args, timeout=START_TIMEOUT) as cluster:
        if pids is not None:
            pids.extend(cluster.pids)
        if "--cpu-latency-limit" in extra_args:
            for node in cluster:
                held = node.http_json("/stats", timeout=1.0).get("cpu_latency_limit") or {}
                if not held.get("held"):
                    raise CpuLatencyUnavailable(
                        f"{node.node_id} does not hold its CPU latency limit: {held.get('error')}"
                    )
        yield cluster.addresses


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_unavailable() -> str | None:
    """Why the redis reference cannot run here, or ``None`` when it can."""
    if shutil.which("redis-server") is None:
        return (
            "redis: `redis-server` is not on PATH "
            "(`apt-get install redis-server` brings it); redis rows skipped"
        )
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis: redis-py is not installed (`pip install redis`); redis rows skipped"
    return None


def redis_version() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        return "not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip() or "unknown"


def _redis_answers(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Wait until the redis-server on ``port`` answers PING; False if it exited first."""
    import redis

    conn = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
    try:
        up = wait_for(
            lambda: "exited" if proc.poll() is not None else conn.ping(),
            timeout=START_TIMEOUT,
            what="redis-server to answer PING",
        )
    finally:
        conn.close()
    return bool(up != "exited")


@contextlib.contextmanager
def redis_server(workdir: Path, pids: list[int] | None = None) -> Iterator[tuple[str, int]]:
    """A ``redis-server`` on a free 127.0.0.1 port, persistence off; always stopped.

    :param pids: the pid of the server is appended to it.
    """
    exe = shutil.which("redis-server")
    assert exe is not None
    log = workdir / "redis.log"
    for _attempt in range(3):  # the free port may be taken before redis binds it
        port = _free_port()
        argv = [
            exe,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--dir",
            str(workdir),
        ]
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        if pids is not None:
            pids.append(proc.pid)
        try:
            if _redis_answers(proc, port):
                yield "127.0.0.1", port
                return
        finally:
            stop_process(proc, STOP_GRACE)
    raise RuntimeError(f"redis-server did not start:\n{file_tail(log, 20)}")


# -- the systems ---------------------------------------------------------------------------


def bench_keys() -> list[str]:
    return [f"key:{i}" for i in range(KEYS)]


def bench_value() -> bytes:
    return random.Random(SEED).randbytes(VALUE_SIZE)


def _client_args(write_path: str = "direct") -> dict[str, Any]:
    return {
        "write_path": write_path,
        "consistency": CONSISTENCY,
        "serializer": RawSerializer(),
        "timeout": REQUEST_TIMEOUT,
        "connect_timeout": REQUEST_TIMEOUT,
    }


@contextlib.asynccontextmanager
async def inproc_cluster(size: int = NODES) -> AsyncIterator[AsyncClient]:
    """``size`` Nodes on one in-process network in this loop, and a client of them."""
    settings = {"replication": REPLICATION, "log_level": "warning"}
    async with InprocCluster(
        size,
        settings=settings,
        address="10.0.0.{n}:7400",
        node_id="node-{n}",
        timeout=START_TIMEOUT,
    ) as cluster:
        client = AsyncClient(cluster.addresses, transport=cluster.net, **_client_args())
        try:
            await client.connect()
            yield client
        finally:
            await client.close()


@dataclass
class Driver:
    """One system as the timed loops see it: a set and a get of one key."""

    name: str
    set: AsyncOp | SyncOp
    get: AsyncOp | SyncOp
    sync: bool = False


def _hypercache_async(name: str, client: AsyncClient, value: bytes) -> Driver:
    async def set_(key: str) -> None:
        await client.set(key, value)

    async def get(key: str) -> None:
        if await client.get(key) is None:
            raise RuntimeError(f"{name}: {key!r} missing: the key space was not populated")

    return Driver(name, set_, get)


def _hypercache_sync(name: str, client: Client, value: bytes) -> Driver:
    def set_(key: str) -> None:
        client.set(key, value)

    def get(key: str) -> None:
        if client.get(key) is None:
            raise RuntimeError(f"{name}: {key!r} missing: the key space was not populated")

    return Driver(name, set_, get, sync=True)


def _redis_drivers(
    host: str, port: int, value: bytes
) -> tuple[Driver, Driver, Callable[[], Awaitable[None]]]:
    """(sequential driver, concurrent driver, close)."""
    import redis
    import redis.asyncio as aredis

    sync_conn = redis.Redis(host=host, port=port, socket_timeout=REQUEST_TIMEOUT)
    async_conn = aredis.Redis(
        host=host, port=port, socket_timeout=REQUEST_TIMEOUT, max_connections=max(CLIENTS)
    )
    sync_set, sync_get = sync_conn.set, sync_conn.get
    async_set, async_get = async_conn.set, async_conn.get

    def s_set(key: str) -> None:
        sync_set(key, value)

    def s_get(key: str) -> None:
        if sync_get(key) is None:
            raise RuntimeError(f"redis: {key!r} missing")

    async def a_set(key: str) -> None:
        await async_set(key, value)

    async def a_get(key: str) -> None:
        if await async_get(key) is None:
            raise RuntimeError(f"redis: {key!r} missing")

    async def close() -> None:
        sync_conn.close()
        await async_conn.aclose()

    return (
        Driver("redis", s_set, s_get, sync=True),
        Driver("redis", a_set, a_get),
        close,
    )


# -- the run -------------------------------------------------------------------------------


Progress = Callable[[str], None]


async def _measure(
    drivers: dict[tuple[str, int], Driver],
    keys: list[str],
    config: ClusterBenchConfig,
    results: Results,
    progress: Progress,
    stopper: _Stopper,
    children: Sequence[int],
) -> None:
    """Warm every cell up, then run every cell ``config.runs`` times, interleaved."""
    order = random.Random(SEED).sample(keys, len(keys))
    cells = [
        (system, op, clients)
        for op in OPS
        for clients in CLIENTS
        for system in SYSTEMS
        if (system, clients) in drivers
    ]
    cursor = 0

    async def once(system: str, op: str, clients: int, n: int) -> Run:
        nonlocal cursor
        driver = drivers[(system, clients)]
        call = getattr(driver, op)
        # Each run walks the next slice of the permutation (wrapping around).
        start = cursor % len(order)
        cursor += n
        walk = order[start:] + order[:start]
        before = CpuSample.take(children)
        if driver.sync:
            run = await asyncio.to_thread(
                run_sync, call, walk, n, config.run_seconds, stopper.event
            )
        else:
            run = await run_async(call, walk, n, clients, config.run_seconds)
        use = CpuUse.between(before, CpuSample.take(children))
        return run if use is None else dataclasses.replace(run, others_cpu=use.others)

    for system, op, clients in cells:
        await once(system, op, clients, config.warmup)
    for r in range(config.runs):
        for system, op, clients in cells:
            n = config.sequential if clients == 1 else config.concurrent
            run = await once(system, op, clients, n)
            cell = results.cells.setdefault((system, op, clients), Cell(system, op, clients))
            cell.runs.append(run)
            progress(
                f"run {r + 1}/{config.runs} {system:8} {op} x{clients:<2}: "
                f"p50 {run.p50_ns / 1e3:7.1f} us  p95 {run.p95_ns / 1e3:7.1f} us  "
                f"{run.ops_per_s:9,.0f} ops/s  ({run.requests} requests, "
                f"others' CPU {run.others_cpu:.2f})"
            )


async def _populate_hypercache(client: AsyncClient, keys: list[str], value: bytes) -> None:
    await client.set_many(dict.fromkeys(keys, value))


async def _main_loop(
    tcp_seeds: list[str] | None,
    redis_addr: tuple[str, int] | None,
    config: ClusterBenchConfig,
    results: Results,
    progress: Progress,
    systems: Sequence[str],
    stopper: _Stopper,
    children: Sequence[int],
) -> None:
    keys, value = bench_keys(), bench_value()
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(stopper.in_loop())
        drivers: dict[tuple[str, int], Driver] = {}

        inproc = await stack.enter_async_context(inproc_cluster())
        await _populate_hypercache(inproc, keys, value)
        for clients in CLIENTS:
            drivers[("inproc", clients)] = _hypercache_async("inproc", inproc, value)

        if tcp_seeds is not None:
            populated = False
            for system, write_path in TCP_SYSTEMS.items():
                if system not in systems:
                    continue
                if system in SEQUENTIAL_ONLY:
                    sync_client = Client(tcp_seeds, **_client_args(write_path))
                    stack.callback(sync_client.close)
                    sync_client.connect()
                    drivers[(system, 1)] = _hypercache_sync(system, sync_client, value)
                    continue
                tcp = AsyncClient(tcp_seeds, **_client_args(write_path))
                stack.push_async_callback(tcp.close)
                await tcp.connect()
                if not populated:
                    await _populate_hypercache(tcp, keys, value)
                    populated = True
                for clients in CLIENTS:
                    drivers[(system, clients)] = _hypercache_async(system, tcp, value)
            if not populated:
                with Client(tcp_seeds, **_client_args()) as filler:
                    filler.set_many(dict.fromkeys(keys, value))

        if redis_addr is not None:
            sequential, concurrent, close = _redis_drivers(*redis_addr, value)
            stack.push_async_callback(close)
            with _redis_pipeline(*redis_addr) as pipe:
                for key in keys:
                    pipe.set(key, value)
                pipe.execute()
            for clients in CLIENTS:
                drivers[("redis", clients)] = sequential if clients == 1 else concurrent

        progress(f"populated {KEYS:,} keys of {VALUE_SIZE} bytes; timing")
        await _measure(drivers, keys, config, results, progress, stopper, children)


@contextlib.contextmanager
def _redis_pipeline(host: str, port: int) -> Iterator[Any]:
    import redis

    conn = redis.Redis(host=host, port=port, socket_timeout=REQUEST_TIMEOUT)
    try:
        with conn.pipeline(transaction=False) as pipe:
            yield pipe
    finally:
        conn.close()


def _run_loop(main: Coroutine[Any, Any, None], stopper: _Stopper) -> None:
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - non-Linux without uvloop
            asyncio.run(main)
        else:
            uvloop.run(main)
    except asyncio.CancelledError:
        if stopper.signum is None:
            raise
        raise Interrupted(stopper.signum) from None


def measure(
    config: ClusterBenchConfig,
    *,
    systems: Sequence[str] = tuple(SYSTEMS),
    progress: Progress,
    node_args: Sequence[str] = (),
) -> Results:
    """Start what ``systems`` need, measure every cell, stop everything; return results.

    ``node_args`` are more flags for every ``hypercache-node``; with
    ``--cpu-latency-limit`` among them, :class:`CpuLatencyUnavailable` is raised
    (after stopping everything) when a node could not hold the limit.

    The in-process cluster always runs (it is the baseline). Every process and server
    started here is stopped before this returns or raises.

    :raises Interrupted: SIGINT or SIGTERM arrived (from the main thread only).
    """
    stopper = _Stopper()
    results = Results()
    results.versions["redis-server"] = redis_version()
    want_tcp = any(system in systems for system in TCP_SYSTEMS)
    for system in SYSTEMS:
        if system not in systems:
            results.skipped[system] = f"{system}: not selected (--only)"
    redis_reason = redis_unavailable() if "redis" in systems else None
    if redis_reason is not None:
        results.skipped["redis"] = redis_reason
        progress(redis_reason)
    before = CpuSample.take()
    with (
        stopper.installed(),
        tempfile.TemporaryDirectory(prefix="hypercache-cluster-bench-") as tmp,
    ):
        workdir = Path(tmp)
        children: list[int] = []
        with contextlib.ExitStack() as stack:
            seeds = None
            if want_tcp:
                progress(f"starting {NODES} hypercache-node processes")
                seeds = stack.enter_context(
                    tcp_cluster(workdir, pids=children, extra_args=node_args)
                )
            redis_addr = None
            if redis_reason is None and "redis" in systems:
                progress("starting redis-server")
                redis_addr = stack.enter_context(redis_server(workdir, pids=children))
            main = _main_loop(
                seeds, redis_addr, config, results, progress, systems, stopper, children
            )
            _run_loop(main, stopper)
    # After the ExitStack: the nodes and redis-server are reaped, their CPU counted.
    results.cpu = CpuUse.between(before, CpuSample.take())
    return results
