"""``hypercache-local`` (``make run``): a local cluster in the foreground.

Starts N (default 3) ``hypercache-node`` processes on loopback at fixed ports: node
N's data port is ``--port`` + N - 1 (7400, 7401, 7402) and its management HTTP port
``--http-port`` + N - 1 (7480, 7481, 7482), the addresses the README's examples use.
``--port 0 --http-port 0`` binds free ports instead and reports them. Once every node
reports all members up on ``/health``, prints how to connect, then waits. Ctrl-C or
SIGTERM stops every node (SIGINT, a stop without leaving, then SIGKILL after a grace
period); so does the death of any node. A node that exits with status 0 left the
cluster (``hypercache leave``): the others go on.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from hypercache.cluster.local import NodeExitedError, NodeProcess, ProcessCluster

__all__ = ["main"]

_STOP_GRACE = 10.0


def _banner(nodes: list[NodeProcess]) -> str:
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
        prog="hypercache-local",
        description="Run a local hypercache cluster on loopback in the foreground.",
    )
    parser.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument(
        "--port",
        type=int,
        default=7400,
        help="data port of node 1; node N gets PORT+N-1 (default 7400; 0 = any free port)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=7480,
        help="management HTTP port of node 1; node N gets HTTP_PORT+N-1 (default 7480)",
    )
    parser.add_argument("--log-level", default="warning", help="log level of the nodes")
    parser.add_argument(
        "--start-timeout", type=float, default=30.0, help="seconds to wait for the cluster"
    )
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    for flag, port in (("--port", args.port), ("--http-port", args.http_port)):
        if not (port == 0 or 1 <= port <= 65535 - args.nodes + 1):
            parser.error(f"{flag} must be 0 or a port leaving room for {args.nodes} nodes")
    if (args.port == 0) != (args.http_port == 0):
        parser.error("--port and --http-port are both 0 (any free port) or both set")

    stopping: list[bool] = []
    with tempfile.TemporaryDirectory(prefix="hypercache-local-") as tmp:
        cluster = ProcessCluster(
            args.nodes,
            Path(tmp),
            ["--log-level", args.log_level],
            host=args.host,
            ports=None if args.port == 0 else (args.port, args.http_port),
            timeout=args.start_timeout,
            log_files=False,
        )

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stopping.append(True)
            cluster.interrupt()  # a wait under way gives up at its next poll

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        status = 0
        try:
            cluster.start()
            print(_banner(cluster.nodes), flush=True)
            left: set[str] = set()
            while not stopping:
                for node in cluster:
                    if node.running or node.node_id in left:
                        continue
                    if node.proc is not None and node.proc.returncode == 0:
                        # It left the cluster (hypercache leave): the others go on.
                        print(f"hypercache: {node.node_id} left the cluster", flush=True)
                        left.add(node.node_id)
                    else:
                        why = f"{node.node_id} exited; stopping the cluster"
                        print(f"hypercache: {why}", flush=True)
                        status = 1
                        stopping.append(True)
                        break
                if len(left) == len(cluster.nodes):
                    break
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        except (TimeoutError, NodeExitedError) as exc:
            print(f"hypercache: {exc}", file=sys.stderr, flush=True)
            status = 1
        finally:
            codes = cluster.stop(_STOP_GRACE)
            print(f"hypercache: cluster stopped ({codes})", flush=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return status


if __name__ == "__main__":
    sys.exit(main())
