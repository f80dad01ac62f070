"""``hypercache``: the command-line client of a cluster.

::

    hypercache [--seeds H:P,...] [--consistency one|quorum|all] COMMAND ...

    hypercache set user:1 Ada --ttl 60
    hypercache get user:1                 # Ada
    hypercache delete user:1
    hypercache ping | topology | stats

Options may come before or after the command. Values are stored with msgpack,
like :class:`hypercache.Client` does, so what the command line writes the Python
client reads back (``set`` stores text; ``--json`` parses the value as JSON, for
numbers, lists and maps; ``--raw`` stores and prints plain bytes instead).

Environment: ``HYPERCACHE_SEEDS``, ``HYPERCACHE_CLUSTER_NAME`` and
``HYPERCACHE_AUTH_TOKEN`` give defaults to ``--seeds``, ``--cluster-name`` and
``--auth-token``.

Exit status: 0 success, 1 ``get`` found no value, 2 usage error (bad option or
value), 3 the cluster failed the request (no node reachable, quorum not reached,
timeout, refused handshake), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TextIO

from hypercache import __version__
from hypercache.client import Client, RawSerializer
from hypercache.errors import (
    ConfigError,
    HandshakeError,
    HyperCacheError,
    NodeUnavailableError,
    QuorumError,
    RequestTimeoutError,
    UndecodableValueError,
)

__all__ = ["EXIT_ERROR", "EXIT_MISS", "EXIT_OK", "EXIT_USAGE", "main"]

PROG: Final = "hypercache"
EXIT_OK: Final = 0
EXIT_MISS: Final = 1
EXIT_USAGE: Final = 2
EXIT_ERROR: Final = 3
EXIT_INTERRUPTED: Final = 130

DEFAULT_SEEDS: Final = "127.0.0.1:7400"
_ENV: Final = {
    "seeds": "HYPERCACHE_SEEDS",
    "cluster_name": "HYPERCACHE_CLUSTER_NAME",
    "auth_token": "HYPERCACHE_AUTH_TOKEN",
}


def _common_options() -> argparse.ArgumentParser:
    # Added to the main parser and to every sub-command, with SUPPRESS defaults so
    # that an option given in either place is kept and none overwrites the other.
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    S = argparse.SUPPRESS
    group.add_argument(
        "--seeds",
        metavar="H:P[,H:P...]",
        default=S,
        help=f"nodes to contact [env {_ENV['seeds']}; default {DEFAULT_SEEDS}]",
    )
    group.add_argument(
        "--cluster-name",
        metavar="NAME",
        default=S,
        help=f"cluster name [env {_ENV['cluster_name']}; default hypercache]",
    )
    group.add_argument(
        "--auth-token",
        metavar="TOKEN",
        default=S,
        help=f"shared secret of the cluster [env {_ENV['auth_token']}]",
    )
    group.add_argument(
        "--consistency",
        metavar="LEVEL",
        default=S,
        help="one, quorum or all [default: the node's setting]",
    )
    group.add_argument(
        "--timeout", metavar="S", type=float, default=S, help="request deadline [default 2.0]"
    )
    group.add_argument(
        "--route",
        choices=("owner", "any"),
        default=S,
        help="send to the key's owners (default) or to any seed",
    )
    group.add_argument(
        "--raw", action="store_true", default=S, help="values are plain bytes, not msgpack"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hypercache``."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Command-line client of a hypercache cluster.",
        parents=[common],
        epilog="exit status: 0 ok, 1 get missed, 2 usage error, 3 cluster error",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("get", parents=[common], help="print the value of KEY (exit 1 if absent)")
    p.add_argument("key", metavar="KEY")

    p = sub.add_parser("set", parents=[common], help="store VALUE under KEY")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE")
    p.add_argument("--ttl", metavar="S", type=float, help="expire after S seconds")
    p.add_argument("--json", action="store_true", help="parse VALUE as JSON")

    p = sub.add_parser("delete", parents=[common], help="delete KEY")
    p.add_argument("key", metavar="KEY")

    sub.add_parser("ping", parents=[common], help="ping every node")
    sub.add_parser("topology", parents=[common], help="show nodes and partition ownership")
    sub.add_parser("stats", parents=[common], help="per-node reachability, latency and load")
    return parser


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return repr(value)
    try:
        return json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):
        return repr(value)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


class _Command:
    """Runs one parsed command against a client, writing to ``out``."""

    def __init__(self, client: Client, args: argparse.Namespace, out: TextIO) -> None:
        self.client = client
        self.args = args
        self.out = out

    def echo(self, text: str) -> None:
        print(text, file=self.out)

    def get(self) -> int:
        missing = object()
        value = self.client.get(self.args.key, missing)
        if value is missing:
            print(f"{PROG}: {self.args.key!r} not found", file=sys.stderr)
            return EXIT_MISS
        self.echo(_format_value(value))
        return EXIT_OK

    def set(self) -> int:
        args = self.args
        value: Any = args.value
        if args.json:
            if getattr(args, "raw", False):
                raise ConfigError("--json", "cannot be combined with --raw")
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError("VALUE", f"not valid JSON: {exc}") from None
        elif getattr(args, "raw", False):
            value = value.encode()
        self.client.set(args.key, value, ttl=args.ttl)
        self.echo("OK")
        return EXIT_OK

    def delete(self) -> int:
        existed = self.client.delete(self.args.key)
        self.echo("deleted" if existed else "not found")
        return EXIT_OK

    def _nodes(self) -> list[str]:
        if self.client.options.route == "owner":
            try:
                return list(self.client.topology().addresses)
            except HandshakeError:
                raise  # every node will refuse us the same way
            except HyperCacheError as exc:
                print(
                    f"{PROG}: cannot fetch the topology ({exc}); using the seeds", file=sys.stderr
                )
        return list(self.client.options.seeds)

    def _ping_all(self, nodes: Sequence[str]) -> dict[str, float | HyperCacheError]:
        results: dict[str, float | HyperCacheError] = {}
        for address in nodes:
            try:
                results[address] = self.client.ping(address)
            except HyperCacheError as exc:
                results[address] = exc
        return results

    def ping(self) -> int:
        results = self._ping_all(self._nodes())
        width = max(map(len, results), default=0)
        for address, result in results.items():
            text = f"pong in {_ms(result)}" if isinstance(result, float) else f"DOWN ({result})"
            self.echo(f"{address:<{width}}  {text}")
        if not any(isinstance(r, float) for r in results.values()):
            errors = [r for r in results.values() if isinstance(r, HyperCacheError)]
            if errors and not isinstance(errors[0], NodeUnavailableError):
                raise errors[0]
            raise NodeUnavailableError("no node answered")
        return EXIT_OK

    def topology(self) -> int:
        topo = self.client.topology()
        load = topo.load()
        self.echo(
            f"epoch {topo.epoch}  partitions {topo.partitions}  replication {topo.replication}"
            f"  nodes {len(topo.nodes)}"
        )
        width = max(4, *(len(n.node_id) for n in topo.nodes))
        awidth = max(7, *(len(n.address) for n in topo.nodes))
        self.echo(f"{'NODE':<{width}}  {'ADDRESS':<{awidth}}  {'PRIMARY':>7}  {'HELD':>6}")
        for node in topo.nodes:
            primary, held = load[node.address]
            self.echo(f"{node.node_id:<{width}}  {node.address:<{awidth}}  {primary:>7}  {held:>6}")
        return EXIT_OK

    def stats(self) -> int:
        client = self.client
        topo = None
        if client.options.route == "owner":
            try:
                topo = client.topology()
            except HyperCacheError as exc:
                print(f"{PROG}: cannot fetch the topology ({exc})", file=sys.stderr)
        nodes = list(topo.addresses) if topo is not None else list(client.options.seeds)
        results = self._ping_all(nodes)
        load = topo.load() if topo is not None else {}
        if topo is not None:
            self.echo(
                f"cluster: epoch {topo.epoch}, {len(topo.nodes)} nodes, "
                f"{topo.partitions} partitions, replication {topo.replication}"
            )
        up = sum(isinstance(r, float) for r in results.values())
        self.echo(f"reachable: {up} of {len(results)}")
        width = max(map(len, results), default=0)
        for address, result in results.items():
            state = f"up  {_ms(result):>10}" if isinstance(result, float) else "DOWN"
            extra = ""
            if address in load:
                primary, held = load[address]
                extra = f"  primary {primary}  held {held}"
            self.echo(f"  {address:<{width}}  {state}{extra}")
        self.echo("client: " + " ".join(f"{k}={v}" for k, v in client.stats.as_dict().items()))
        return EXIT_OK if up else EXIT_ERROR


def _describe(exc: HyperCacheError) -> str:
    if isinstance(exc, NodeUnavailableError):
        return f"cluster unavailable: {exc}"
    if isinstance(exc, QuorumError):
        return str(exc)  # names the level, the acks and why the others gave none
    if isinstance(exc, RequestTimeoutError):
        return f"timed out: {exc}"
    if isinstance(exc, HandshakeError):
        return f"refused by the cluster: {exc}"
    if isinstance(exc, UndecodableValueError):
        return str(exc)  # names the key, and --raw
    return f"{type(exc).__name__}: {exc}"


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    client_factory: Callable[..., Client] = Client,
) -> int:
    """Run ``hypercache`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    :param env: the environment to read ``HYPERCACHE_*`` from (default ``os.environ``).
    :param client_factory: makes the client (tests pass a wrapper).
    """
    environ = os.environ if env is None else env
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    def setting(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        if value is None and name in _ENV:
            value = environ.get(_ENV[name]) or None  # an empty variable counts as unset
        return default if value is None else value

    try:
        client = client_factory(
            setting("seeds", DEFAULT_SEEDS),
            cluster_name=setting("cluster_name", "hypercache"),
            auth_token=setting("auth_token", None),
            timeout=setting("timeout", 2.0),
            consistency=setting("consistency", None),
            serializer=RawSerializer() if getattr(args, "raw", False) else None,
            route=setting("route", "owner"),
        )
    except ConfigError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with client:
            command = _Command(client, args, sys.stdout)
            status: int = getattr(command, args.command)()
            return status
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UnicodeError as exc:
        # An argument that was not valid UTF-8 in the shell (Python keeps such
        # bytes as lone surrogates): a usage error, not a crash.
        print(f"{PROG}: error: argument not encodable as UTF-8 ({exc})", file=sys.stderr)
        return EXIT_USAGE
    except HyperCacheError as exc:
        print(f"{PROG}: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
