"""``hypercache``: the command-line client of a cluster.

::

    hypercache [--seeds H:P,...] [--consistency one|quorum|all] COMMAND ...

    hypercache set user:1 Ada --ttl 60
    hypercache get user:1                 # Ada
    hypercache set photo @photo.jpg --raw # the file's bytes (- : standard input)
    hypercache --raw get photo > copy.jpg # the same bytes, nothing added
    hypercache ttl user:1 | expire user:1 30 | delete user:1
    hypercache mget a b c | mset a 1 b 2
    hypercache keys 'user:*' [--node H:P] [--limit N]
    hypercache flush [--yes]              # every entry of every node: asks first
    hypercache ping [--strict] | health [--strict] | members | topology | stats
    hypercache leave --node H:P [--no-wait] # hand its data over, then stop
    hypercache remove NODE_ID             # a dead member out of the ring
    hypercache bench --requests 10000 --concurrency 8
    hypercache token app read,write       # a new token: the secret and its --tokens line
    hypercache --tls-ca ca.pem --auth-token SECRET get user:1   # TLS and a token

Options may come before or after the command. Values are stored with msgpack,
like :class:`hypercache.Client` does, so what the command line writes the Python
client reads back (``set`` stores text; ``--json`` parses the value as JSON, for
numbers, lists and maps; ``--raw`` stores and prints plain bytes instead). A VALUE
of ``-`` is read from standard input and ``@FILE`` from a file (``@@...`` is the
text ``@...``); without ``--raw`` their content must be UTF-8 text.

Environment: ``HYPERCACHE_SEEDS``, ``HYPERCACHE_CLUSTER_NAME``,
``HYPERCACHE_AUTH_TOKEN``, ``HYPERCACHE_TLS_CA``, ``HYPERCACHE_TLS_CERT`` and
``HYPERCACHE_TLS_KEY`` give defaults to ``--seeds``, ``--cluster-name``,
``--auth-token``, ``--tls-ca``, ``--tls-cert`` and ``--tls-key``.

Exit status: 0 success; 1 the answer is no (``get``/``ttl``/``expire`` found no
key, ``mget`` missed one, ``flush`` was not confirmed, ``health``/``ping
--strict`` found the cluster degraded); 2 usage error (bad option or value, value
over ``max_value``, unknown ``--node``); 3 the cluster failed the request (no node
reachable, quorum not reached, timeout, refused handshake, a node not flushed,
``health`` found it down, requests failed in ``bench``); 130 interrupted. ``leave``
exits 1 when the node still runs after its leave timeout, ``remove`` when the member
is not dead nor suspect (or not a member).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, BinaryIO, Final, TextIO

from hypercache import __version__
from hypercache.cli.health import Health, assess
from hypercache.client import Client, Key, RawSerializer, Topology
from hypercache.client._common import check_address
from hypercache.client.compression import Compression
from hypercache.errors import (
    ConfigError,
    HandshakeError,
    HyperCacheError,
    NodeUnavailableError,
    QuorumError,
    RequestTimeoutError,
    UndecodableValueError,
    UsageError,
    ValueTooLargeError,
)

__all__ = [
    "EXIT_DEGRADED",
    "EXIT_ERROR",
    "EXIT_MISS",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

PROG: Final = "hypercache"
EXIT_OK: Final = 0
#: The command ran and the answer is no: a key not found, a flush not confirmed.
EXIT_MISS: Final = 1
#: ``health --strict`` / ``ping --strict`` of a degraded cluster (the answer is no).
EXIT_DEGRADED: Final = 1
EXIT_USAGE: Final = 2
EXIT_ERROR: Final = 3
EXIT_INTERRUPTED: Final = 130

DEFAULT_SEEDS: Final = "127.0.0.1:7400"
#: Seconds ``leave`` waits for the node to stop beyond the leave timeout it reports.
LEAVE_GRACE: Final = 10.0
_ENV: Final = {
    "seeds": "HYPERCACHE_SEEDS",
    "cluster_name": "HYPERCACHE_CLUSTER_NAME",
    "auth_token": "HYPERCACHE_AUTH_TOKEN",
    "tls_ca": "HYPERCACHE_TLS_CA",
    "tls_cert": "HYPERCACHE_TLS_CERT",
    "tls_key": "HYPERCACHE_TLS_KEY",
}

_VALUE_HELP: Final = "the value; - reads standard input, @FILE a file (@@x is the text @x)"


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
        help=f"the cluster's shared secret, or this client's token [env {_ENV['auth_token']}]",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=S,
        help="connect over TLS, checking the nodes against the system's CAs",
    )
    for name, what in (
        ("tls_ca", "connect over TLS, checking the nodes against these CA certificates"),
        ("tls_cert", "this client's certificate (PEM), for nodes that require one (mTLS)"),
        ("tls_key", "the private key of --tls-cert, if not in it"),
    ):
        group.add_argument(
            "--" + name.replace("_", "-"),
            metavar="FILE",
            default=S,
            help=f"{what} [env {_ENV[name]}]",
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
        "--raw",
        action="store_true",
        default=S,
        help="values are plain bytes, not msgpack (get writes them as they are)",
    )
    group.add_argument(
        "--compression-min",
        metavar="BYTES",
        type=int,
        default=S,
        help="compress values (zstd) from this size; -1 = never [default 1024; off with --raw]",
    )
    return common


def _value_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ttl", metavar="S", type=float, help="expire after S seconds")
    p.add_argument("--json", action="store_true", help="parse each VALUE as JSON")


def _compression(args: argparse.Namespace) -> Compression | None:
    """``--compression-min``: from which size values are compressed (``--raw`` stores
    the bytes as they are: not compressed either, unless asked)."""
    least = getattr(args, "compression_min", None)
    if least is None:
        return None if getattr(args, "raw", False) else Compression()
    return None if least < 0 else Compression(min_size=least)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hypercache``."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Command-line client of a hypercache cluster.",
        parents=[common],
        epilog=(
            "exit status: 0 ok; 1 the answer is no (not found, not confirmed, degraded "
            "with --strict); 2 usage error; 3 cluster error; 130 interrupted"
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, *aliases: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, aliases=list(aliases))
        p.set_defaults(run=name)
        return p

    p = command("get", "print the value of KEY (exit 1 if absent)")
    p.add_argument("key", metavar="KEY")

    p = command("set", "store VALUE under KEY")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE", help=_VALUE_HELP)
    _value_options(p)

    p = command("delete", "delete KEY")
    p.add_argument("key", metavar="KEY")

    p = command("ttl", "print the seconds KEY has left, or none (exit 1 if absent)")
    p.add_argument("key", metavar="KEY")

    p = command("expire", "give KEY a new TTL (exit 1 if absent)")
    p.add_argument("key", metavar="KEY")
    p.add_argument("seconds", metavar="SECONDS", help="seconds from now, or none: never expire")

    p = command("mget", "print KEY<tab>VALUE for each KEY found (exit 1 if one is absent)")
    p.add_argument("keys", metavar="KEY", nargs="+")

    p = command("mset", "store each KEY VALUE pair")
    p.add_argument("pairs", metavar="KEY VALUE", nargs="+", help=_VALUE_HELP)
    _value_options(p)

    p = command("keys", "list the keys (matching a glob PATTERN), one a line", "scan")
    p.add_argument("pattern", metavar="PATTERN", nargs="?", help="*, ? and [...] as in a shell")
    p.add_argument("--node", metavar="H:P", help="only the keys this node holds")
    p.add_argument("--limit", metavar="N", type=int, help="at most N keys")

    p = command(
        "flush",
        "drop every entry of every node (asks for the cluster name first)",
        "clear",
    )
    p.add_argument("--yes", action="store_true", help="do not ask")

    p = command("ping", "ping every node")
    p.add_argument("--strict", action="store_true", help="exit 1 if the cluster is degraded")
    p = command("health", "ok, degraded or down, as this client sees the cluster")
    p.add_argument("--strict", action="store_true", help="exit 1 if the cluster is degraded")
    command("members", "the nodes: id, address, reachable, latency")
    p = command("leave", "make a node leave the cluster: it hands its data over, then stops")
    p.add_argument("--node", metavar="H:P", required=True, help="the node's data address")
    p.add_argument("--no-wait", action="store_true", help="do not wait until the node has stopped")
    p = command("remove", "take a dead member out of the ring (exit 1 if it is not dead)")
    p.add_argument("node_id", metavar="NODE_ID")
    command("topology", "show nodes and partition ownership")
    command("stats", "per-node reachability, latency and load")

    p = command(
        "token",
        "print a new random token and its line for a node's --tokens file (no node needed)",
    )
    p.add_argument("name", metavar="NAME", help="the token's name (in logs and errors)")
    p.add_argument("scopes", metavar="SCOPES", help="read, write and/or admin, comma-separated")

    p = command("bench", "a QUORUM set and get load, then latency percentiles")
    p.add_argument("--requests", metavar="N", type=int, default=10_000, help="per op [10000]")
    p.add_argument("--concurrency", metavar="C", type=int, default=8, help="threads [8]")
    p.add_argument("--value-size", metavar="B", type=int, default=100, help="bytes [100]")
    p.add_argument("--keys", metavar="K", type=int, default=1000, help="distinct keys [1000]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
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


def _one_line(text: str) -> str:
    """``text`` on one line: backslash, newline, carriage return and tab escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _show_key(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _err(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr)


class _Command:
    """Runs one parsed command against a client, writing to ``out``."""

    def __init__(self, client: Client, args: argparse.Namespace, out: TextIO) -> None:
        self.client = client
        self.args = args
        self.out = out
        self.raw: bool = getattr(args, "raw", False)
        self._stdin_read = False
        self._table: Topology | None = None

    def echo(self, text: str) -> None:
        print(text, file=self.out)

    # ------------------------------------------------------------------ values

    def _max_value(self) -> tuple[int, str]:
        """The largest value to send, and whose limit it is: the cluster's
        ``max_value`` when its table says, if below this client's."""
        mine = self.client.options.limits.max_value
        try:
            theirs = self.client.topology().max_value
        except HyperCacheError:
            theirs = None  # the write itself will say what is wrong
        if theirs is not None and theirs < mine:
            return theirs, "the cluster's max_value"
        return mine, "max_value"

    def _source(self, spec: str, limit: int, what: str) -> str | bytes:
        """The value ``spec`` names: the text itself, or the bytes of standard input
        (``-``) or of a file (``@FILE``), read up to ``limit`` bytes and one more."""
        if spec == "-":
            if self._stdin_read:
                raise ConfigError(what, "standard input (-) can be read only once")
            self._stdin_read = True
            stdin: BinaryIO = sys.stdin.buffer
            return stdin.read(limit + 1)
        if spec.startswith("@@"):
            return spec[1:]
        if spec.startswith("@"):
            path = spec[1:]
            try:
                with open(path, "rb") as f:
                    return f.read(limit + 1)
            except OSError as exc:
                raise ConfigError(what, f"cannot read {path!r}: {exc.strerror or exc}") from None
        return spec

    def _value(self, spec: str, limit: tuple[int, str], what: str = "VALUE") -> Any:
        """What to store for ``spec``: text, parsed JSON, or (``--raw``) bytes."""
        most, whose = limit
        source = self._source(spec, most, what)
        if isinstance(source, bytes) and len(source) > most:
            origin = "standard input" if spec == "-" else spec[1:]
            raise ValueTooLargeError(
                f"{what} from {origin} is over {whose} ({most} bytes); nothing was stored"
            )
        if self.raw:
            if getattr(self.args, "json", False):
                raise ConfigError("--json", "cannot be combined with --raw")
            return source if isinstance(source, bytes) else source.encode()
        if isinstance(source, bytes):
            try:
                text = source.decode()
            except UnicodeDecodeError:
                origin = "standard input" if spec == "-" else spec[1:]
                raise ConfigError(
                    what, f"{origin} is not UTF-8 text: use --raw to store its bytes as they are"
                ) from None
        else:
            text = source
        if getattr(self.args, "json", False):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(what, f"not valid JSON: {exc}") from None
        return text

    def _check_size(self, key: str, value: Any, limit: tuple[int, str]) -> None:
        most, whose = limit
        size = len(self.client.options.serializer.dumps(value))
        if size > most:
            raise ValueTooLargeError(
                f"the value of {key!r} is {size} bytes, over {whose} ({most} bytes); "
                "nothing was stored"
            )

    # ---------------------------------------------------------------- commands

    def get(self) -> int:
        missing = object()
        value = self.client.get(self.args.key, missing)
        if value is missing:
            _err(f"{self.args.key!r} not found")
            return EXIT_MISS
        if self.raw and isinstance(value, bytes):
            self.out.flush()
            stream: BinaryIO = getattr(self.out, "buffer", sys.stdout.buffer)
            stream.write(value)  # exactly the bytes: no newline added
            stream.flush()
            return EXIT_OK
        self.echo(_format_value(value))
        return EXIT_OK

    def set(self) -> int:
        args = self.args
        limit = self._max_value()
        value = self._value(args.value, limit)
        self._check_size(args.key, value, limit)
        self.client.set(args.key, value, ttl=args.ttl)
        self.echo("OK")
        return EXIT_OK

    def delete(self) -> int:
        existed = self.client.delete(self.args.key)
        self.echo("deleted" if existed else "not found")
        return EXIT_OK

    def ttl(self) -> int:
        try:
            left = self.client.ttl(self.args.key)
        except KeyError:
            _err(f"{self.args.key!r} not found")
            return EXIT_MISS
        self.echo("none" if left is None else f"{left:.3f}")
        return EXIT_OK

    def expire(self) -> int:
        text = self.args.seconds.strip()
        ttl: float | None
        if text.lower() == "none":
            ttl = None
        else:
            try:
                ttl = float(text)
            except ValueError:
                raise ConfigError("SECONDS", f"expected seconds or none, got {text!r}") from None
            if not (ttl > 0 and math.isfinite(ttl)):
                raise ConfigError("SECONDS", f"must be a positive number of seconds, got {text!r}")
        if not self.client.expire(self.args.key, ttl):
            _err(f"{self.args.key!r} not found")
            return EXIT_MISS
        self.echo("OK")
        return EXIT_OK

    def mget(self) -> int:
        keys: list[str] = self.args.keys
        found = self.client.get_many(keys)
        status = EXIT_OK
        for key in keys:
            if key not in found:
                _err(f"{key!r} not found")
                status = EXIT_MISS
                continue
            value = found[key]
            if isinstance(value, bytes):
                text = value.decode("utf-8", "backslashreplace")
            else:
                text = _format_value(value)
            self.echo(f"{key}\t{_one_line(text)}")
        return status

    def mset(self) -> int:
        pairs: list[str] = self.args.pairs
        if len(pairs) % 2:
            raise ConfigError("KEY VALUE", f"expected pairs, got {len(pairs)} arguments")
        limit = self._max_value()
        mapping: dict[Key, Any] = {}
        for key, spec in zip(pairs[::2], pairs[1::2], strict=True):
            value = self._value(spec, limit, f"the value of {key!r}")
            self._check_size(key, value, limit)
            mapping[key] = value
        self.client.set_many(mapping, ttl=self.args.ttl)
        self.echo(f"OK ({len(mapping)} keys)")
        return EXIT_OK

    def keys(self) -> int:
        args = self.args
        limit = args.limit
        if limit is not None and limit < 1:
            raise ConfigError("--limit", f"must be a positive integer, got {limit}")
        listed: Iterable[bytes]
        if args.node is not None:
            address = self._member(args.node)
            listed = self.client.scan(address, pattern=args.pattern)
            if limit is not None:
                listed = itertools.islice(listed, limit)
        else:
            listed = self.client.keys(args.pattern, limit=limit)
        for key in listed:
            self.echo(_show_key(key))
        return EXIT_OK

    def _member(self, text: str) -> str:
        """The address ``--node`` names, which must be a node of the table."""
        try:
            address = check_address(text)
        except ConfigError as exc:
            raise ConfigError("--node", exc.message) from None
        known = self._addresses()
        if address not in known:
            raise ConfigError(
                "--node", f"{address} is not a node of the cluster (nodes: {', '.join(known)})"
            )
        return address

    def _addresses(self) -> list[str]:
        if self.client.options.route == "owner":
            return list(self.client.topology().addresses)
        return list(self.client.options.seeds)

    def flush(self) -> int:
        client = self.client
        nodes = self._addresses()
        name = client.options.cluster_name
        if not self.args.yes:
            print(
                f"{PROG}: this drops every entry of cluster {name!r} on its {len(nodes)} "
                f"nodes ({', '.join(nodes)}). A node that does not answer keeps its entries, "
                "and anti-entropy copies them back to the others.\n"
                f"Type the cluster name ({name}) to go on: ",
                end="",
                file=sys.stderr,
                flush=True,
            )
            answer = sys.stdin.readline()
            if not answer.endswith("\n"):
                print(file=sys.stderr)  # (end of input: end the prompt's line)
            if answer.strip() != name:
                _err("not confirmed: nothing was dropped")
                return EXIT_MISS
        results = client.flush()
        width = max(map(len, results), default=0)
        failed = []
        for address, result in results.items():
            if isinstance(result, int):
                self.echo(f"{address:<{width}}  dropped {result}")
            else:
                failed.append(address)
                self.echo(f"{address:<{width}}  NOT FLUSHED ({type(result).__name__}: {result})")
        if failed:
            _err(
                f"{len(failed)} of {len(results)} nodes were not flushed ({', '.join(failed)}): "
                "they keep their entries, and anti-entropy will copy them back to the "
                "flushed nodes. Flush again once they answer."
            )
            return EXIT_ERROR
        total = sum(r for r in results.values() if isinstance(r, int))
        self.echo(f"flushed: {total} entries dropped on {len(results)} nodes")
        return EXIT_OK

    # ------------------------------------------------------------ nodes, health

    def _nodes(self) -> list[str]:
        """The nodes of the table (kept in ``_table``), or the seeds without one."""
        if self.client.options.route == "owner":
            try:
                self._table = self.client.topology()
                return list(self._table.addresses)
            except HandshakeError:
                raise  # every node will refuse us the same way
            except HyperCacheError as exc:
                _err(f"cannot fetch the topology ({exc}); using the seeds")
        return list(self.client.options.seeds)

    def _ping_all(self, nodes: Sequence[str]) -> dict[str, float | HyperCacheError]:
        results: dict[str, float | HyperCacheError] = {}
        for address in nodes:
            try:
                results[address] = self.client.ping(address)
            except HyperCacheError as exc:
                results[address] = exc
        return results

    @staticmethod
    def _none_answered(results: Mapping[str, float | HyperCacheError]) -> HyperCacheError:
        errors = [r for r in results.values() if isinstance(r, HyperCacheError)]
        if errors and not isinstance(errors[0], NodeUnavailableError):
            return errors[0]
        return NodeUnavailableError("no node answered")

    def ping(self) -> int:
        results = self._ping_all(self._nodes())
        width = max(map(len, results), default=0)
        for address, result in results.items():
            text = f"pong in {_ms(result)}" if isinstance(result, float) else f"DOWN ({result})"
            self.echo(f"{address:<{width}}  {text}")
        if not any(isinstance(r, float) for r in results.values()):
            raise self._none_answered(results)
        if self.args.strict:
            down = {a: str(r) for a, r in results.items() if not isinstance(r, float)}
            if self._table is not None:
                health = assess(self._table, down)
                if health.status != "ok":
                    first, *rest = health.lines()
                    _err(first)
                    for line in rest:
                        print(line, file=sys.stderr)
                    return EXIT_DEGRADED
            elif down:
                _err(f"degraded: {len(down)} of {len(results)} seeds did not answer")
                return EXIT_DEGRADED
        return EXIT_OK

    def _health(self) -> Health:
        topology = self.client.topology()
        results = self._ping_all(topology.addresses)
        return assess(topology, {a: str(r) for a, r in results.items() if not isinstance(r, float)})

    def health(self) -> int:
        try:
            health = self._health()
        except HandshakeError:
            raise
        except HyperCacheError as exc:
            self.echo("status: down")
            self.echo(f"no node answered: {exc}")
            return EXIT_ERROR
        for line in health.lines():
            self.echo(line)
        if health.status == "down":
            return EXIT_ERROR
        if health.status == "degraded" and self.args.strict:
            return EXIT_DEGRADED
        return EXIT_OK

    def members(self) -> int:
        topology = self.client.topology()
        results = self._ping_all(topology.addresses)
        width = max(4, *(len(n.node_id) for n in topology.nodes))
        awidth = max(7, *(len(n.address) for n in topology.nodes))
        self.echo(f"{'NODE':<{width}}  {'ADDRESS':<{awidth}}  {'REACHABLE':<9}  LATENCY")
        for node in topology.nodes:
            result = results[node.address]
            if isinstance(result, float):
                state, latency = "yes", _ms(result)
            else:
                state, latency = "no", f"- ({str(result).removeprefix(node.address + ': ')})"
            self.echo(f"{node.node_id:<{width}}  {node.address:<{awidth}}  {state:<9}  {latency}")
        if not any(isinstance(r, float) for r in results.values()):
            raise self._none_answered(results)
        return EXIT_OK

    def leave(self) -> int:
        address = self.args.node
        answer = self.client.leave(address)
        node_id = answer["node_id"]
        if self.args.no_wait:
            self.echo(f"{node_id} is leaving")
            return EXIT_OK
        # It answers while it hands its partitions over, then stops.
        start = time.monotonic()
        deadline = start + float(answer.get("leave_timeout") or 30.0) + LEAVE_GRACE
        while time.monotonic() < deadline:
            try:
                self.client.ping(address)
            except HyperCacheError:
                self.echo(f"{node_id} left the cluster ({time.monotonic() - start:.1f} s)")
                return EXIT_OK
            time.sleep(0.2)
        _err(f"{node_id} is still running {time.monotonic() - start:.0f} s later")
        return EXIT_MISS

    def remove(self) -> int:
        try:
            answer = self.client.remove(self.args.node_id)
        except ConfigError as exc:  # not a member, or not dead: the node said no
            _err(exc.message)
            return EXIT_MISS
        done = "removed" if answer.get("removed") else "was removed already"
        self.echo(f"{answer['node_id']} {done} (membership version {answer.get('version')})")
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
                _err(f"cannot fetch the topology ({exc})")
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

    def bench(self) -> int:
        from hypercache.cli.bench import BenchSettings, run_bench

        args = self.args
        settings = BenchSettings(
            requests=args.requests,
            concurrency=args.concurrency,
            value_size=args.value_size,
            keys=args.keys,
            consistency=getattr(args, "consistency", None) or "quorum",
            progress=not args.no_progress,
        )
        most, whose = self._max_value()
        if settings.value_size > most - 5:  # room for the msgpack header
            raise ConfigError("--value-size", f"must be under {whose} ({most} bytes)")
        self.client.ping()  # fail now, not once per request
        results = run_bench(self.client, settings, self.out, sys.stderr)
        failed = sum(sum(r.errors.values()) for r in results)
        if failed:
            _err(f"{failed} requests failed")
            return EXIT_ERROR
        return EXIT_OK


def _describe(exc: HyperCacheError) -> str:
    if isinstance(exc, NodeUnavailableError):
        return f"cluster unavailable: {exc}"
    if isinstance(exc, QuorumError):
        return str(exc)  # names the level, the acks and why the others gave none
    if isinstance(exc, RequestTimeoutError):
        return f"timed out: {exc}"
    if isinstance(exc, HandshakeError):
        return f"refused by the cluster: {exc}"
    if isinstance(exc, UndecodableValueError | UsageError):
        return str(exc)  # names the key (and --raw), or the argument
    return f"{type(exc).__name__}: {exc}"


def _token(name: str, scopes: str) -> int:
    """``hypercache token``: a new secret (give it to the client) and its hashed line
    (append it to the nodes' tokens file)."""
    from hypercache.net.security import new_token

    try:
        secret, line = new_token(name, scopes.split(","))
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"secret: {secret}")
    print(f"line:   {line}")
    return EXIT_OK


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

    if args.run == "token":
        return _token(args.name, args.scopes)
    tls: Any = None
    ca, cert, key = setting("tls_ca", None), setting("tls_cert", None), setting("tls_key", None)
    if ca is not None or cert is not None or getattr(args, "tls", False):
        tls = {"ca": ca, "cert": cert, "key": key}
    try:
        client = client_factory(
            setting("seeds", DEFAULT_SEEDS),
            ssl=tls,
            cluster_name=setting("cluster_name", "hypercache"),
            auth_token=setting("auth_token", None),
            timeout=setting("timeout", 2.0),
            consistency=setting("consistency", None),
            serializer=RawSerializer() if getattr(args, "raw", False) else None,
            compression=_compression(args),
            route=setting("route", "owner"),
        )
    except ConfigError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with client:
            command = _Command(client, args, sys.stdout)
            status: int = getattr(command, args.run)()
            return status
    except UsageError as exc:  # ConfigError, a key or value over the limits
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
    except BrokenPipeError:  # `hypercache keys | head`: the reader has gone
        with contextlib.suppress(Exception):  # (no second error when Python flushes)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
