"""``python -m hypercache.cli.local`` (``make run``): a local cluster in the foreground.

Starts N (default 3) ``hypercache-node`` processes on loopback. No port is guessed:
the first node binds port 0 and reports its addresses in its ready line; the others
bind port 0 too and join through it. Once every node reports all members up on
``/health``, prints how to connect, then waits. Ctrl-C or SIGTERM stops every node
(SIGTERM, then SIGKILL after a grace period); so does the death of any node.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from hypercache.cli.node import READY_PREFIX

__all__ = ["main"]

_NODE_COMMAND = (sys.executable, "-m", "hypercache.cli.node")
_STOP_GRACE = 10.0


class _Node:
    def __init__(self, index: int, workdir: Path) -> None:
        self.node_id = f"node-{index + 1}"
        self.out_path = workdir / f"{self.node_id}.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.data = ""
        self.http = ""

    def start(self, host: str, seeds: list[str], extra: list[str]) -> None:
        argv = [
            *_NODE_COMMAND,
            "--node-id",
            self.node_id,
            "--bind",
            f"{host}:0",
            "--http",
            f"{host}:0",
            *extra,
        ]
        if seeds:
            argv += ["--seeds", ",".join(seeds)]
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HYPERCACHE_")}
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stdin=subprocess.DEVNULL, env=env)

    def ready(self) -> bool:
        for line in self.out_path.read_text(errors="replace").splitlines():
            if line.startswith(READY_PREFIX):
                fields = dict(part.split("=", 1) for part in line.split()[2:])
                self.data, self.http = fields["data"], fields["http"]
                return True
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.node_id} exited with status {self.proc.returncode}")
        return False

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.http}/health", timeout=1.0) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def reap(self, deadline: float) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return proc.returncode


def _wait(what: str, condition: Any, timeout: float, stopping: list[bool]) -> None:
    deadline = time.monotonic() + timeout
    while not stopping:
        try:
            if condition():
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
    raise KeyboardInterrupt


def _banner(nodes: list[_Node]) -> str:
    seeds = ",".join(n.data for n in nodes)
    lines = [
        f"hypercache: local cluster of {len(nodes)} nodes is up.",
        "",
    ]
    for n in nodes:
        lines.append(f"  {n.node_id}  data {n.data}   http http://{n.http}")
    lines += [
        "",
        "Try:",
        f"  curl -s http://{nodes[0].http}/cluster/members",
        f"  curl -s 'http://{nodes[0].http}/dist/owners?key=hello'",
        "",
        "From Python:",
        "  import hypercache",
        f"  with hypercache.Client({seeds.split(',')!r}) as client:",
        '      client.set("hello", "world", consistency="quorum")',
        '      print(client.get("hello"))',
        "",
        "Or on the wire protocol directly:",
        "  from hypercache.net.blocking import BlockingConnection",
        "  from hypercache.net.protocol import Op, make_hello",
        f"  conn = BlockingConnection({nodes[0].data!r}, make_hello('hypercache'))",
        "  conn.request(Op.SET, [b'hello', b'world', None, 'quorum'])",
        "  conn.request(Op.GET, [b'hello', 'quorum'])",
        "",
        "Ctrl-C stops the cluster.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hypercache.cli.local",
        description="Run a local hypercache cluster on loopback in the foreground.",
    )
    parser.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--log-level", default="warning", help="log level of the nodes")
    parser.add_argument(
        "--start-timeout", type=float, default=30.0, help="seconds to wait for the cluster"
    )
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")

    stopping: list[bool] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(True)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    extra = ["--log-level", args.log_level]
    status = 0
    with tempfile.TemporaryDirectory(prefix="hypercache-local-") as tmp:
        nodes = [_Node(i, Path(tmp)) for i in range(args.nodes)]
        try:
            first = nodes[0]
            first.start(args.host, [], extra)
            _wait(f"{first.node_id} to start", first.ready, args.start_timeout, stopping)
            for node in nodes[1:]:
                node.start(args.host, [first.data], extra)
            for node in nodes[1:]:
                _wait(f"{node.node_id} to start", node.ready, args.start_timeout, stopping)

            def healthy() -> bool:
                return all(n.health()["members_up"] == len(nodes) for n in nodes)

            _wait("every node to see every member up", healthy, args.start_timeout, stopping)
            print(_banner(nodes), flush=True)
            while not stopping:
                dead = [n for n in nodes if not n.alive()]
                if dead:
                    print(f"hypercache: {dead[0].node_id} exited; stopping the cluster", flush=True)
                    status = 1
                    break
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        except RuntimeError as exc:
            print(f"hypercache: {exc}", file=sys.stderr, flush=True)
            status = 1
        finally:
            for node in nodes:
                node.terminate()
            deadline = time.monotonic() + _STOP_GRACE
            codes = {n.node_id: n.reap(deadline) for n in nodes if n.proc is not None}
            print(f"hypercache: cluster stopped ({codes})", flush=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return status


if __name__ == "__main__":
    sys.exit(main())
