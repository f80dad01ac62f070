"""Start N real ``hypercache-node`` processes on 127.0.0.1 for functional tests.

::

    with running_cluster(3, tmp_path) as cluster:
        cluster.request(0, Op.SET, [b"k", b"v", None, "quorum"])
        cluster.kill(2)            # SIGKILL
        cluster.restart(2)         # same id, same addresses
        cluster.http_json(1, "/health")

No port is guessed: the first node binds port 0 and prints its addresses in its
ready line; the others get it as their seed and bind port 0 too. A restarted node
binds the addresses it had (freed by its death) and seeds from every other node.

Every wait polls a condition against a deadline. :func:`running_cluster` stops every
process it started (SIGTERM, then SIGKILL after a grace period) whatever happens,
and a failing wait attaches the tail of each node's log to its error.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hypercache.net.blocking import BlockingConnection
from hypercache.net.protocol import make_hello

READY_PREFIX = "hypercache-node ready:"

#: Flags that make a test cluster converge and detect failures fast.
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

NODE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "hypercache.cli.node")


class HarnessError(AssertionError):
    """A node did not start, become healthy or stop in time."""


def wait_for(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns a truthy value; return that value.

    Exceptions raised by ``condition`` count as "not yet"; the last one is chained
    to the :class:`HarnessError` raised at the deadline.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
        except Exception as exc:
            last_exc = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout}s waiting for {what}") from last_exc
        time.sleep(interval)


class NodeProcess:
    """One ``hypercache-node`` subprocess and its files."""

    def __init__(self, index: int, node_id: str, workdir: Path, extra: Sequence[str]) -> None:
        self.index = index
        self.node_id = node_id
        self.workdir = workdir
        self.extra = tuple(extra)
        self.data: str = ""
        self.http: str = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stdout_path = workdir / f"{node_id}.out"
        self.log_path = workdir / f"{node_id}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, bind: str, http: str, seeds: Sequence[str]) -> None:
        if self.running:
            raise HarnessError(f"{self.node_id} is already running")
        self.starts += 1
        argv = [
            *NODE_COMMAND,
            "--node-id",
            self.node_id,
            "--bind",
            bind,
            "--http",
            http,
            *FAST_FLAGS,
            *self.extra,
        ]
        if seeds:
            argv += ["--seeds", ",".join(seeds)]
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HYPERCACHE_")}
        with (
            open(self.stdout_path, "wb") as out,
            open(self.log_path, "ab") as log,
        ):
            log.write(f"---- start #{self.starts}: {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=env
            )

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait for the ready line; learn the bound data and HTTP addresses."""

        def ready() -> bool:
            proc = self.proc
            assert proc is not None
            text = self.stdout_path.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith(READY_PREFIX):
                    fields = dict(part.split("=", 1) for part in line.split()[2:])
                    self.data, self.http = fields["data"], fields["http"]
                    return True
            if proc.poll() is not None:
                raise HarnessError(
                    f"{self.node_id} exited with {proc.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            return False

        try:
            wait_for(ready, timeout=timeout, what=f"{self.node_id} to print its ready line")
        except HarnessError as exc:
            if isinstance(exc.__cause__, HarnessError):
                raise exc.__cause__ from None
            raise HarnessError(f"{exc}\n{self.log_tail()}") from None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"[{self.node_id}: no log]"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"---- {self.node_id} log tail ----\n{tail}"

    def http_json(self, path: str, timeout: float = 5.0) -> Any:
        with urllib.request.urlopen(f"http://{self.http}{path}", timeout=timeout) as resp:
            return json.loads(resp.read())

    def http_text(self, path: str, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(f"http://{self.http}{path}", timeout=timeout) as resp:
            body: bytes = resp.read()
            return body.decode()

    def connect(self, timeout: float = 5.0, *, as_peer: bool = False) -> BlockingConnection:
        """A client connection to this node's data port; with ``as_peer``, one that
        names itself a node (accepted from loopback by a cluster without a secret),
        which may send the peer operations."""
        hello = (
            make_hello("hypercache", node_id="harness-peer", address="127.0.0.1:9")
            if as_peer
            else make_hello("hypercache")
        )
        return BlockingConnection(self.data, hello, timeout=timeout)


class Cluster:
    """N nodes named ``node-1`` .. ``node-N``; index ``i`` is ``node-{i+1}``."""

    def __init__(self, size: int, workdir: Path, extra_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.nodes = [NodeProcess(i, f"node-{i + 1}", workdir, extra_args) for i in range(size)]
        self._conns: dict[int, BlockingConnection] = {}

    def __getitem__(self, index: int) -> NodeProcess:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def addresses(self) -> list[str]:
        return [node.data for node in self.nodes]

    def start(self, timeout: float = 30.0) -> None:
        first = self.nodes[0]
        first.start(bind="127.0.0.1:0", http="127.0.0.1:0", seeds=())
        first.wait_ready(timeout)
        for node in self.nodes[1:]:
            node.start(bind="127.0.0.1:0", http="127.0.0.1:0", seeds=[first.data])
        for node in self.nodes[1:]:
            node.wait_ready(timeout)
        self.wait_healthy(timeout=timeout)

    def wait_healthy(self, *, up: int | None = None, timeout: float = 20.0) -> None:
        """Wait until every running node answers ``/health`` with ``up`` members up."""
        want = len(self.nodes) if up is None else up

        def healthy() -> bool:
            for node in self.nodes:
                if not node.running:
                    continue
                health = node.http_json("/health", timeout=1.0)
                if (
                    health["status"] != "ok"
                    or health["members"] != len(self.nodes)
                    or health["members_up"] != want
                ):
                    return False
            return True

        try:
            wait_for(healthy, timeout=timeout, interval=0.1, what=f"{want} healthy members")
        except HarnessError as exc:
            raise HarnessError(f"{exc}\n{self.log_tails()}") from exc

    def kill(self, index: int) -> None:
        """SIGKILL one node; wait until the others see it down."""
        self._drop_conn(index)
        self.nodes[index].kill()
        self.wait_healthy(up=len(self.nodes) - 1)

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start a stopped node again with its id and addresses; wait for a healthy cluster."""
        node = self.nodes[index]
        others = [n.data for n in self.nodes if n is not node and n.running]
        node.start(bind=node.data, http=node.http, seeds=others)
        node.wait_ready(timeout)
        self.wait_healthy(timeout=timeout)

    def conn(self, index: int) -> BlockingConnection:
        """A cached client connection to node ``index``."""
        conn = self._conns.get(index)
        if conn is None or conn.closed:
            conn = self._conns[index] = self.nodes[index].connect()
        return conn

    def request(self, index: int, op: int, payload: Any, timeout: float = 10.0) -> Any:
        return self.conn(index).request(op, payload, timeout)

    def peer_request(self, index: int, op: int, payload: Any, timeout: float = 10.0) -> Any:
        """One request as a peer would send it (on a connection of its own)."""
        with self.nodes[index].connect(as_peer=True) as conn:
            return conn.request(op, payload, timeout)

    def _drop_conn(self, index: int) -> None:
        conn = self._conns.pop(index, None)
        if conn is not None:
            conn.close()

    def log_tails(self) -> str:
        return "\n".join(node.log_tail() for node in self.nodes)

    def stop(self) -> dict[str, int | None]:
        """Stop every node (SIGTERM, then SIGKILL); return the exit statuses."""
        for index in list(self._conns):
            self._drop_conn(index)
        for node in self.nodes:
            node.signal(signal.SIGTERM)
        return {node.node_id: node.stop() for node in self.nodes}


@contextlib.contextmanager
def running_cluster(size: int, workdir: Path, extra_args: Sequence[str] = ()) -> Iterator[Cluster]:
    """A started :class:`Cluster` of ``size`` nodes, always stopped on exit."""
    cluster = Cluster(size, workdir, extra_args)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
