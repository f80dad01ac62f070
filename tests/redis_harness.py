"""Real ``redis-server`` processes for the backend tests, on free loopback ports.

:class:`RedisServer` is one standalone server; :class:`RedisClusterProcs` a Redis
Cluster of three masters (made with ``redis-cli --cluster create``) and one replica
of the first master, so that a test can fail a master over. Both wait by polling
with a deadline and always stop what they started. ``redis-server`` must be
installed (``.ci/run`` installs it): without it the fixtures fail, loudly.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
from cluster_harness import free_port_run

#: Seconds a server (or the cluster) has to come up.
DEADLINE = 30.0


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(
            f"{tool} is not installed: the Redis tests run real servers "
            "(apt-get install redis-server; .ci/run does it)"
        )
    return path


def wait_until(check: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not within {deadline} s")
        time.sleep(0.02)


class RedisServer:
    """One ``redis-server --port N --save '' --appendonly no`` (plus ``extra``)."""

    def __init__(self, workdir: Path, port: int | None = None, extra: tuple[str, ...] = ()):
        self.port = port if port is not None else free_port_run(1)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra = extra

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def start(self) -> RedisServer:
        args = [
            _need("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            *self.extra,
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        c = self.client()
        try:
            wait_until(lambda: self._alive() and bool(c.ping()), f"redis-server :{self.port}")
        finally:
            c.close()
        return self

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"redis-server :{self.port} exited: {self.log.read_text()[-2000:]}")
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def cluster_ports(count: int) -> int:
    """A base port ``p`` with ``p..p+count-1`` and their cluster bus ports
    (``+10000``) free on loopback now; ``p + count + 10000`` stays under 65536."""
    for _ in range(200):
        base = random.randrange(20000, 45000)
        wanted = [*range(base, base + count), *range(base + 10000, base + 10000 + count)]
        held: list[socket.socket] = []
        try:
            for port in wanted:
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return base
    raise RuntimeError("no free ports for a Redis Cluster")


class RedisClusterProcs:
    """Three masters and a replica of the first, ``--cluster-enabled yes``."""

    def __init__(self, workdir: Path) -> None:
        base = cluster_ports(4)
        self.servers = [
            RedisServer(
                workdir / f"n{i}",
                base + i,
                (
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ),
            )
            for i in range(4)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(s.address for s in self.servers[:3])

    def start(self) -> RedisClusterProcs:
        try:
            for s in self.servers:
                s.start()
            cli = _need("redis-cli")
            masters = [s.address for s in self.servers[:3]]
            subprocess.run(
                [cli, "--cluster", "create", *masters, "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=DEADLINE,
            )  # fmt: skip
            self.wait_ok(self.servers[:3])
            first = self.servers[0].client()
            master_id = first.execute_command("CLUSTER", "MYID").decode()  # type: ignore[no-untyped-call]
            first.close()
            subprocess.run(
                [cli, "--cluster", "add-node", self.servers[3].address, masters[0],
                 "--cluster-slave", "--cluster-master-id", master_id],
                check=True, capture_output=True, timeout=DEADLINE,
            )  # fmt: skip
            self.wait_ok(self.servers)
            replica = self.servers[3].client()
            try:
                wait_until(
                    lambda: replica.info("replication").get("master_link_status") == "up",
                    "the replica's link to its master",
                )
            finally:
                replica.close()
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def wait_ok(servers: list[RedisServer]) -> None:
        def ok() -> bool:
            for s in servers:
                c = s.client()
                try:
                    info = c.cluster("info")
                    if info.get("cluster_state") != "ok":
                        return False
                    if int(info.get("cluster_known_nodes", 0)) != len(servers):
                        return False
                finally:
                    c.close()
            return True

        wait_until(ok, "cluster_state:ok on every node")

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> RedisClusterProcs:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
