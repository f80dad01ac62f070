"""``hypercache-local`` (``make run``): a local cluster in the foreground.

Starts N (default 3) ``hypercache-node`` processes on loopback at fixed ports: node
N's data port is ``--port`` + N - 1 (7400, 7401, 7402) and its management HTTP port
``--http-port`` + N - 1 (7480, 7481, 7482), the addresses the README's examples use.
``--port 0 --http-port 0`` binds free ports instead and reports them. Once every node
reports all members up on ``/health``, prints how to connect, then waits. Ctrl-C or
SIGTERM stops every node (SIGINT, a stop without leaving, then SIGKILL after a grace
period); so does the death of any node. A node that exits with status 0 left the
cluster (``hypercache leave``): the others go on.

``--tls`` (``make run-tls``) runs the cluster secured as ``docs/security.md``
describes: a throw-away CA made in the temporary directory (the ``cryptography``
package, a dev dependency), TLS with client certificates required (mTLS) on the
data ports and the management HTTP, an admin token in a tokens file, and a random
cluster secret; the banner says how to connect.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import ssl
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from hypercache.cluster.local import NodeExitedError, NodeProcess, ProcessCluster

__all__ = ["main"]

_STOP_GRACE = 10.0


def _secure(workdir: Path) -> tuple[list[str], dict[str, str]]:
    """The node flags of a secured cluster, and what a client needs (paths, token)."""
    from hypercache.cli.devca import make_dev_pki
    from hypercache.net.security import new_token

    pki = make_dev_pki(workdir / "pki")
    token, line = new_token("admin", ["admin"])
    tokens = workdir / "tokens"
    tokens.write_text(line + "\n")
    flags = [
        "--tls-cert",
        pki["node_cert"],
        "--tls-key",
        pki["node_key"],
        "--tls-ca",
        pki["ca"],
        "--tls-client-auth",
        "required",
        "--tokens",
        str(tokens),
        "--cluster-secret",
        secrets.token_urlsafe(24),
    ]
    return flags, {**pki, "token": token}


def _secure_banner(nodes: list[NodeProcess], tls: dict[str, str]) -> str:
    seeds = [n.data for n in nodes]
    ca, cert, key, token = tls["ca"], tls["client_cert"], tls["client_key"], tls["token"]
    return "\n".join(
        [
            f"hypercache: local cluster of {len(nodes)} nodes is up, over mTLS with tokens.",
            "",
            *(f"  {n.node_id}  data {n.data}   http https://{n.http}" for n in nodes),
            "",
            f"  CA          {ca}",
            f"  client cert {cert}",
            f"  client key  {key}",
            f"  admin token {token}",
            "",
            "Try:",
            f"  curl -s --cacert {ca} --cert {cert} --key {key} \\",
            f"       -H 'Authorization: Bearer {token}' https://{nodes[0].http}/cluster/members",
            f"  hypercache --seeds {seeds[0]} --tls-ca {ca} --tls-cert {cert} --tls-key {key} \\",
            f"       --auth-token {token} set hello world",
            "",
            "From Python:",
            "  import hypercache",
            f"  tls = {{'ca': {ca!r}, 'cert': {cert!r}, 'key': {key!r}}}",
            f"  with hypercache.Client({seeds!r}, ssl=tls, auth_token={token!r}) as client:",
            '      client.set("hello", "world")',
            "",
            "The CA, keys and token are deleted when the cluster stops. Ctrl-C stops it.",
        ]
    )


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
    parser.add_argument(
        "--tls",
        action="store_true",
        help="mTLS with a throw-away CA, an admin token and a cluster secret (make run-tls)",
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
        flags = ["--log-level", args.log_level]
        tls: dict[str, str] = {}
        harness: dict[str, Any] = {}
        if args.tls:
            secure_flags, tls = _secure(Path(tmp))
            flags += secure_flags
            ctx = ssl.create_default_context(cafile=tls["ca"])
            ctx.load_cert_chain(tls["client_cert"], tls["client_key"])
            harness = {"ssl": ctx, "auth": tls["token"]}
        cluster = ProcessCluster(
            args.nodes,
            Path(tmp),
            flags,
            host=args.host,
            ports=None if args.port == 0 else (args.port, args.http_port),
            timeout=args.start_timeout,
            log_files=False,
            **harness,
        )

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stopping.append(True)
            cluster.interrupt()  # a wait under way gives up at its next poll

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        status = 0
        try:
            cluster.start()
            banner = _secure_banner(cluster.nodes, tls) if tls else _banner(cluster.nodes)
            print(banner, flush=True)
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
