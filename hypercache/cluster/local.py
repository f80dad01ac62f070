"""Clusters on this machine, and the polls that wait for them.

:class:`ProcessCluster` starts N real ``hypercache-node`` processes on loopback; it is
what ``make run`` (:mod:`hypercache.cli.local`), the functional tests and the cluster
benchmarks run::

    with ProcessCluster(3, workdir) as cluster:
        cluster.request(0, Op.SET, [b"k", b"v", None, "quorum"])
        cluster.kill(2)            # SIGKILL; returns once the others see it down
        cluster.restart(2)         # same id, same addresses
        cluster[1].http_json("/health")

No port is guessed: the first node binds port 0 and prints its addresses in its ready
line; the others get it as their seed and bind port 0 too. A restarted node binds the
addresses it had (freed by its death) and seeds from every other running node.
Leaving the ``with`` block stops every process started (SIGINT: a stop without
leaving the cluster; then SIGKILL after a grace period) whatever happens, and a
failed wait carries the tail of each node's log.

:class:`InprocCluster` is the same for :class:`~hypercache.cluster.node.Node` objects
in the running event loop, on one :class:`~hypercache.net.inproc.InprocNetwork` (unit
tests, the in-process benchmark)::

    async with InprocCluster(3, settings={"replication": 2}) as cluster:
        await cluster.nodes[0].coordinator.set(b"k", b"v", None, "all")

:func:`wait_for` (blocking) and :func:`until` (asyncio) are the one poll behind every
wait of both, and of the tests: a condition, a deadline, and what is waited for.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

# The one import from the layer above: the ready line is the contract of the program
# this module starts (hypercache-node), and it is defined there.
from hypercache.cli.node import READY_PREFIX
from hypercache.cluster.config import DistConfig
from hypercache.cluster.membership import layout_of
from hypercache.cluster.node import Node
from hypercache.net import BlockingConnection, InprocNetwork, Op, Transport, make_hello
from hypercache.units import format_hostport

__all__ = [
    "NODE_COMMAND",
    "READY_PREFIX",
    "InprocCluster",
    "NodeExitedError",
    "NodeProcess",
    "ProcessCluster",
    "file_tail",
    "stop_process",
    "until",
    "wait_for",
]

T = TypeVar("T")

#: How a node process is started: this interpreter, so that it runs this checkout.
NODE_COMMAND: Final = (sys.executable, "-m", "hypercache.cli.node")

# The first pause between two polls; it doubles up to the poll's ``interval``, so a
# condition that holds soon is seen soon and a slow one is not polled in a busy loop.
_FIRST_PAUSE: Final = 0.001


# ----------------------------------------------------------------------------- polls


class _Poll:
    """The attempts, pauses and end of one wait (what :func:`wait_for` and
    :func:`until` share). ``clock`` gives monotonic seconds."""

    def __init__(
        self,
        condition: Callable[[], Any],
        timeout: float,
        interval: float,
        what: str,
        clock: Callable[[], float],
    ) -> None:
        self.condition = condition
        self.timeout = timeout
        self.interval = interval
        self.what = what or getattr(condition, "__qualname__", repr(condition))
        self.clock = clock
        self.end = clock() + timeout
        self.pause = _FIRST_PAUSE
        self.last: Exception | None = None

    def attempt(self) -> Any:
        """The condition's value; ``None`` when it raised an :class:`Exception`."""
        try:
            return self.condition()
        except Exception as exc:
            self.last = exc
            return None

    async def attempt_async(self) -> Any:
        """:meth:`attempt`, awaiting the value when it is awaitable."""
        value = self.attempt()
        if inspect.isawaitable(value):
            try:
                return await value
            except Exception as exc:
                self.last = exc
                return None
        return value

    def next_pause(self) -> float:
        """Seconds to wait before the next attempt.

        :raises TimeoutError: the deadline has passed (from the last exception).
        """
        left = self.end - self.clock()
        if left <= 0:
            raise TimeoutError(
                f"timed out after {self.timeout:g}s waiting for {self.what}"
            ) from self.last
        pause = min(self.pause, left)
        self.pause = min(self.pause * 2, self.interval)
        return pause


def wait_for(
    condition: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``condition`` until it returns a truthy value, and return that value.

    The first poll is at once; the pauses between polls start at 1 ms and double up
    to ``interval`` seconds. An :class:`Exception` raised by ``condition`` counts as
    "not yet" (anything else, such as :class:`KeyboardInterrupt`, goes through).

    :param what: what is waited for, for the error.
    :raises TimeoutError: ``condition`` did not hold within ``timeout`` seconds; the
        last exception it raised, if any, is the error's ``__cause__``.
    """
    poll = _Poll(condition, timeout, interval, what, time.monotonic)
    while not (value := poll.attempt()):
        time.sleep(poll.next_pause())
    result: T = value
    return result


async def until(
    condition: Callable[[], object],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "",
) -> None:
    """:func:`wait_for` in the running event loop: the pauses let the loop run.

    ``condition`` may be a plain function or return an awaitable (a coroutine
    function): its result is awaited.
    """
    poll = _Poll(condition, timeout, interval, what, asyncio.get_running_loop().time)
    while not await poll.attempt_async():
        await asyncio.sleep(poll.next_pause())


# ------------------------------------------------------------------------- processes


class NodeExitedError(RuntimeError):
    """A node process exited while it was waited for."""


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int:
    """SIGTERM ``proc`` (unless it has exited), wait up to ``grace`` seconds, then
    SIGKILL it; always reaped. Return its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return _reap(proc, time.monotonic() + grace)


def _reap(proc: subprocess.Popen[bytes], deadline: float) -> int:
    try:
        return proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def file_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file ("" when it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class NodeProcess:
    """One ``hypercache-node`` process, its flags and its files in ``workdir``.

    Its stdout goes to ``<node_id>.out`` (where the ready line is read); its stderr
    (the log) is appended to ``<node_id>.log``, or with ``log_files=False`` goes
    where this process's stderr goes. ``HYPERCACHE_*`` variables of this process's
    environment are not passed on: only ``args`` configure the node.

    :param args: flags for every start, after ``--node-id``, ``--bind`` and ``--http``.
    """

    def __init__(
        self,
        index: int,
        node_id: str,
        workdir: Path,
        args: Sequence[str] = (),
        *,
        log_files: bool = True,
    ) -> None:
        self.index = index
        self.node_id = node_id
        self.workdir = workdir
        self.args = tuple(args)
        self.log_files = log_files
        #: data and management addresses, from the ready line
        self.data = ""
        self.http = ""
        self.proc: subprocess.Popen[bytes] | None = None
        #: how many times it was started
        self.starts = 0
        self.stdout_path = workdir / f"{node_id}.out"
        self.log_path = workdir / f"{node_id}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, bind: str, http: str, seeds: Sequence[str]) -> None:
        """Start the process (not waiting for it: see :meth:`wait_ready`)."""
        if self.running:
            raise RuntimeError(f"{self.node_id} is already running")
        self.starts += 1
        argv = [
            *NODE_COMMAND,
            "--node-id",
            self.node_id,
            "--bind",
            bind,
            "--http",
            http,
            *self.args,
        ]
        if seeds:
            argv += ["--seeds", ",".join(seeds)]
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HYPERCACHE_")}
        with open(self.stdout_path, "wb") as out:
            if not self.log_files:
                self.proc = subprocess.Popen(argv, stdout=out, stdin=subprocess.DEVNULL, env=env)
                return
            with open(self.log_path, "ab") as log:
                log.write(f"---- start #{self.starts}: {' '.join(argv)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    argv, stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=env
                )

    def ready(self) -> bool:
        """Whether the ready line is out (and :attr:`data`, :attr:`http` known).

        :raises NodeExitedError: the process exited before it was ready.
        """
        for line in self.stdout_path.read_text(errors="replace").splitlines():
            if line.startswith(READY_PREFIX):
                fields = dict(part.split("=", 1) for part in line.split()[2:])
                self.data, self.http = fields["data"], fields["http"]
                return True
        proc = self.proc
        if proc is not None and proc.poll() is not None:
            raise NodeExitedError(
                f"{self.node_id} exited with status {proc.returncode} before it was ready"
                + self._tail_note()
            )
        return False

    def wait_ready(
        self,
        timeout: float = 30.0,
        *,
        interval: float = 0.05,
        check: Callable[[], object] | None = None,
    ) -> None:
        """Wait for the ready line (polled at most ``interval`` seconds apart).

        :param check: called before each poll; what it raises ends the wait.
        :raises NodeExitedError: the process exited first.
        :raises TimeoutError: no ready line within ``timeout`` seconds.
        """

        def ready_or_exited() -> bool:
            if check is not None:
                check()
            return not self.running or self.ready()

        try:
            wait_for(
                ready_or_exited,
                timeout=timeout,
                interval=interval,
                what=f"{self.node_id}'s ready line",
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}{self._tail_note()}") from exc.__cause__
        self.ready()  # raises NodeExitedError when the process exited first

    def signal(self, sig: int) -> None:
        """Send ``sig`` if the process runs."""
        if self.proc is not None and self.running:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the exit status
        (``None``: never started)."""
        return None if self.proc is None else stop_process(self.proc, grace)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_files:
            return ""
        return f"---- {self.node_id} log tail ----\n{file_tail(self.log_path, lines)}"

    def _tail_note(self) -> str:
        tail = self.log_tail()
        return f"\n{tail}" if tail else ""

    def http_json(self, path: str, timeout: float = 5.0) -> Any:
        """``GET`` a management path; the decoded JSON body."""
        return json.loads(self.http_text(path, timeout))

    def http_text(self, path: str, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(f"http://{self.http}{path}", timeout=timeout) as resp:
            body: bytes = resp.read()
            return body.decode()

    def http_post(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        """``POST`` a management path (no body); the status and the decoded JSON body
        (an error status too: it is returned, not raised)."""
        request = urllib.request.Request(f"http://{self.http}{path}", data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def connect(self, timeout: float = 5.0, *, as_peer: bool = False) -> BlockingConnection:
        """A client connection to this node's data port; with ``as_peer``, one that
        names itself a node (accepted from loopback by a cluster without a secret),
        which may send the peer operations."""
        if as_peer:
            # a peer must share the node's layout (see Membership.check_layout)
            config = self.http_json("/config", timeout)
            layout = layout_of(
                DistConfig(**{k: config[k] for k in ("partitions", "replication", "vnodes")})
            )
            hello = make_hello(
                "hypercache",
                node_id="harness-peer",
                address="127.0.0.1:9",
                info={"layout": layout},
            )
        else:
            hello = make_hello("hypercache")
        return BlockingConnection(self.data, hello, timeout=timeout)


class ProcessCluster:
    """``size`` ``hypercache-node`` processes ``node-1`` .. ``node-N`` on ``host``;
    index ``i`` is ``node-{i+1}``.

    :param args: flags of every node (see :class:`NodeProcess`).
    :param host: the address every node binds.
    :param ports: ``(data, http)`` of node 1; node ``i`` binds ``data + i`` and
        ``http + i``. ``None`` (the default): every node binds port 0 and reports
        the ports it got.
    :param timeout: seconds that every wait of the cluster's own allows (a node's
        ready line, the cluster healthy).
    :param log_files: each node's log to its file (else to this process's stderr).

    :meth:`interrupt` (from a signal handler, say) makes a wait under way raise
    :class:`KeyboardInterrupt` at its next poll, so that the caller unwinds and stops
    what was started.
    """

    def __init__(
        self,
        size: int,
        workdir: Path,
        args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        ports: tuple[int, int] | None = None,
        timeout: float = 30.0,
        log_files: bool = True,
    ) -> None:
        self.workdir = workdir
        self.host = host
        self.ports = ports
        self.timeout = timeout
        self.nodes = [
            NodeProcess(i, f"node-{i + 1}", workdir, args, log_files=log_files) for i in range(size)
        ]
        self.args = tuple(args)
        self.log_files = log_files
        #: indexes of the nodes that left the cluster or were removed from it
        self.departed: set[int] = set()
        self._conns: dict[int, BlockingConnection] = {}
        self._interrupted = False

    def __getitem__(self, index: int) -> NodeProcess:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[NodeProcess]:
        return iter(self.nodes)

    def __enter__(self) -> ProcessCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def addresses(self) -> list[str]:
        """Every node's data address (empty until it was ready once)."""
        return [node.data for node in self.nodes]

    @property
    def pids(self) -> list[int]:
        """The pid of every node started."""
        return [node.proc.pid for node in self.nodes if node.proc is not None]

    def interrupt(self) -> None:
        """Make every wait of this cluster raise :class:`KeyboardInterrupt`."""
        self._interrupted = True

    def _check(self) -> None:
        if self._interrupted:
            raise KeyboardInterrupt("interrupted")

    def _wait_ready(self, node: NodeProcess) -> None:
        node.wait_ready(self.timeout, check=self._check)

    def start(self) -> None:
        """Start node 1, then the others seeded with it; wait for a healthy cluster.
        On any failure (or interruption), stop what was started, then raise."""
        first = self.nodes[0]
        try:
            first.start(bind=self._address(0, 0), http=self._address(0, 1), seeds=())
            self._wait_ready(first)
            for node in self.nodes[1:]:
                i = node.index
                node.start(bind=self._address(i, 0), http=self._address(i, 1), seeds=[first.data])
            for node in self.nodes[1:]:
                self._wait_ready(node)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _address(self, index: int, which: int) -> str:
        port = 0 if self.ports is None else self.ports[which] + index
        return format_hostport(self.host, port)

    def healthy(self, up: int | None = None) -> bool:
        """Whether every running node answers ``/health`` with every member listed and
        ``up`` of them (all by default) up (status ``ok`` when all are, ``degraded``
        when fewer), and ready (it holds every partition it owns: a joining or
        restarted node streams them first)."""
        members = len(self.nodes) - len(self.departed)
        want = members if up is None else up
        status = "ok" if want == members else "degraded"
        for node in self.nodes:
            if not node.running or node.index in self.departed:
                continue
            health = node.http_json("/health", timeout=1.0)
            if (
                health["status"] != status
                or health["members"] != members
                or health["members_up"] != want
                or not health.get("ready", True)
            ):
                return False
        return True

    def wait_healthy(self, *, up: int | None = None, interval: float = 0.1) -> None:
        """Wait until :meth:`healthy` (polled at most ``interval`` seconds apart).

        :raises TimeoutError: not within the cluster's timeout (with the log tails).
        """
        want = len(self.nodes) - len(self.departed) if up is None else up

        def healthy() -> bool:
            self._check()
            return self.healthy(up)

        try:
            wait_for(
                healthy, timeout=self.timeout, interval=interval, what=f"{want} healthy members"
            )
        except TimeoutError as exc:
            tails = self.log_tails()
            raise TimeoutError(f"{exc}\n{tails}" if tails else str(exc)) from exc

    def kill(self, index: int) -> None:
        """SIGKILL one node; wait until the others see it down."""
        self._drop_conn(index)
        self.nodes[index].kill()
        self.wait_healthy(up=len(self.nodes) - len(self.departed) - 1)

    def add(self) -> NodeProcess:
        """Start one more node (``node-{N+1}``, the same flags), seeded with every
        running node; wait until the cluster is healthy with it (and it is ready)."""
        index = len(self.nodes)
        node = NodeProcess(
            index, f"node-{index + 1}", self.workdir, self.args, log_files=self.log_files
        )
        self.nodes.append(node)
        seeds = [n.data for n in self.nodes if n is not node and n.running]
        node.start(bind=self._address(index, 0), http=self._address(index, 1), seeds=seeds)
        self._wait_ready(node)
        self.wait_healthy()
        return node

    def leave(self, index: int, timeout: float = 60.0) -> int:
        """SIGTERM one node, which leaves the cluster (``leave_on_stop``) and exits;
        wait for its exit (SIGKILL after ``timeout``), then until the others are
        healthy without it. Return its exit status."""
        self._drop_conn(index)
        status = self.nodes[index].stop(timeout)
        self.departed.add(index)
        assert status is not None
        self.wait_healthy()
        return status

    def remove(self, index: int, via: int) -> Any:
        """Take the dead node ``index`` out of the ring with ``POST /cluster/remove``
        on node ``via``; wait until the others are healthy without it. Return the
        answer's body.

        :raises RuntimeError: the node refused (the status and body say why).
        """
        status, body = self.nodes[via].http_post(
            f"/cluster/remove?node={self.nodes[index].node_id}"
        )
        if status != 200:
            raise RuntimeError(f"remove {self.nodes[index].node_id}: {status} {body}")
        self.departed.add(index)
        self.wait_healthy()
        return body

    def respawn(self, index: int) -> None:
        """Start a stopped node again with its id and addresses, seeded with every
        running node (not waiting: see :meth:`restart`)."""
        node = self.nodes[index]
        others = [n.data for n in self.nodes if n is not node and n.running]
        node.start(bind=node.data, http=node.http, seeds=others)

    def restart(self, index: int) -> None:
        """:meth:`respawn`, then wait for its ready line and a healthy cluster."""
        self.respawn(index)
        self._wait_ready(self.nodes[index])
        self.wait_healthy()

    def conn(self, index: int) -> BlockingConnection:
        """A cached client connection to node ``index``."""
        conn = self._conns.get(index)
        if conn is None or conn.closed:
            conn = self._conns[index] = self.nodes[index].connect()
        return conn

    def request(self, index: int, op: int | Op, payload: Any, timeout: float = 10.0) -> Any:
        return self.conn(index).request(op, payload, timeout)

    def peer_request(self, index: int, op: int | Op, payload: Any, timeout: float = 10.0) -> Any:
        """One request as a peer would send it (on a connection of its own)."""
        with self.nodes[index].connect(as_peer=True) as conn:
            return conn.request(op, payload, timeout)

    def _drop_conn(self, index: int) -> None:
        conn = self._conns.pop(index, None)
        if conn is not None:
            conn.close()

    def log_tails(self) -> str:
        return "\n".join(tail for node in self.nodes if (tail := node.log_tail()))

    def stop(self, grace: float = 5.0) -> dict[str, int]:
        """Stop every node started: SIGINT to all (a stop without leaving: with every
        node going, there is nobody to hand data over to), then SIGKILL to any still
        running ``grace`` seconds later. Return the exit status of each."""
        for index in list(self._conns):
            self._drop_conn(index)
        started = [node for node in self.nodes if node.proc is not None]
        for node in started:
            node.signal(signal.SIGINT)
        deadline = time.monotonic() + grace
        return {node.node_id: _reap(node.proc, deadline) for node in started if node.proc}


# -------------------------------------------------------------------------- in-process


class InprocCluster:
    """``size`` :class:`~hypercache.cluster.node.Node` objects in the running event
    loop, on one :class:`~hypercache.net.inproc.InprocNetwork`.

    Entering starts node 1, then each other node seeded with node 1's address, and
    waits until every node lists every member, sees it up and is ready; leaving stops
    them all.

    :param settings: :class:`~hypercache.cluster.config.DistConfig` fields of every
        node; the management HTTP server is off unless ``http`` is given.
    :param per_node: more fields for some nodes, by index (they win over ``settings``).
    :param address: node ``i``'s bind address, ``{n}`` standing for ``i + 1`` (port 0
        is allowed: the network picks a port).
    :param node_id: node ``i``'s id, ``{n}`` likewise.
    :param network: the network (a new one by default).
    :param transport: node ``i``'s transport, made from the network (the network
        itself by default); e.g. a :class:`~hypercache.net.faults.FaultyTransport`.
    :param timeout: seconds for the cluster to form.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        settings: Mapping[str, Any] | None = None,
        per_node: Mapping[int, Mapping[str, Any]] | None = None,
        address: str = "127.0.0.{n}:7400",
        node_id: str = "n{n}",
        network: InprocNetwork | None = None,
        transport: Callable[[int, InprocNetwork], Transport] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.size = size
        self.settings: dict[str, Any] = {"http": None, **(settings or {})}
        self.per_node = dict(per_node or {})
        self.address = address
        self.node_id = node_id
        self.net = network if network is not None else InprocNetwork()
        self._transport = transport
        self.timeout = timeout
        self.nodes: list[Node] = []

    async def __aenter__(self) -> InprocCluster:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    def config(self, index: int, seeds: Sequence[str] = ()) -> DistConfig:
        """Node ``index``'s configuration."""
        n = index + 1
        fields = {**self.settings, **self.per_node.get(index, {})}
        return DistConfig(
            node_id=self.node_id.format(n=n),
            bind=self.address.format(n=n),
            seeds=tuple(seeds),
            **fields,
        )

    async def start(self) -> None:
        """Start node 1, then the others seeded with it; wait until :meth:`formed`.
        On any failure, stop what was started, then raise."""
        try:
            for index in range(self.size):
                seeds = (self.nodes[0].address,) if self.nodes else ()
                make = self._transport
                node = Node(
                    self.config(index, seeds),
                    transport=self.net if make is None else make(index, self.net),
                )
                self.nodes.append(node)
                await node.start()
            await until(self.formed, timeout=self.timeout, what=f"{self.size} members up")
        except BaseException:
            await self.stop()
            raise

    def formed(self) -> bool:
        """Whether every node lists every member, sees it up, and is ready (holds
        every partition it owns: the nodes seeded with node 1 stream theirs first)."""
        size = self.size
        return all(
            len(node.members()) == size
            and node.membership is not None
            and node.membership.up_count() == size
            and node.rebalancer.ready
            for node in self.nodes
        )

    async def connect_peers(self) -> None:
        """PING every peer from every node once, so that each pair is connected."""
        for node in self.nodes:
            assert node.membership is not None
            for peer in node.membership.peers.values():
                await peer.request(Op.PING, None, 2)

    async def stop(self) -> None:
        """Stop every node started (idempotent)."""
        for node in self.nodes:
            await node.stop()
