"""Command-line arguments of ``hypercache-node``.

Every :class:`~hypercache.cluster.config.DistConfig` field has a flag named after it
(``read_consistency`` -> ``--read-consistency``). Flags default to ``None`` so that
only the flags actually given override the TOML file and the ``HYPERCACHE_*``
environment (see :func:`~hypercache.cluster.config.load_config`). Flag values are
read as text, like environment values, and validated by
:class:`~hypercache.cluster.config.DistConfig`, so a bad value is reported with the
name of its field.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

from hypercache import __version__
from hypercache.cluster.config import (
    CONFIG_ENV_VAR,
    LOG_LEVELS,
    DistConfig,
    env_var_name,
    load_config,
)
from hypercache.errors import ConfigError

__all__ = ["PROG", "build_node_parser", "node_config_from_argv"]

PROG = "hypercache-node"

_DEFAULTS = DistConfig()


def _add(
    group: argparse._ArgumentGroup,
    field: str,
    metavar: str,
    text: str,
    *,
    append: bool = False,
    default_text: str | None = None,
) -> None:
    flag = "--" + field.replace("_", "-")
    default = getattr(_DEFAULTS, field)
    if default_text is None:
        default_text = ",".join(default) if isinstance(default, tuple) else str(default)
        if default is None or default_text == "":
            default_text = "none"
    help_text = f"{text} [env {env_var_name(field)}; default: {default_text}]"
    group.add_argument(
        flag,
        dest=field,
        metavar=metavar,
        default=None,
        action="append" if append else "store",
        help=help_text,
    )


def build_node_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hypercache-node``.

    Every option defaults to ``None`` ("not given"); ``--seeds`` may be repeated
    and collects a list of comma-separated strings; ``--config`` names the TOML file.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Run one node of a hypercache cluster. Settings come from defaults, a TOML "
            f"file (--config or ${CONFIG_ENV_VAR}), HYPERCACHE_* environment variables "
            "and these flags, each overriding the previous. Sizes accept units "
            "(64MiB, 1GB); durations accept units (500ms, 30s, 1h)."
        ),
    )
    parser.add_argument(
        "--config",
        dest="config",
        metavar="FILE.toml",
        default=None,
        help=f"TOML file of settings, keys named like the fields [env {CONFIG_ENV_VAR}]",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    node = parser.add_argument_group("node")
    _add(
        node,
        "node_id",
        "ID",
        "unique, stable node id",
        default_text="--bind, or HOSTNAME:PORT when bound to a wildcard address",
    )
    _add(node, "cluster_name", "NAME", "nodes only join nodes with the same cluster name")
    _add(node, "bind", "HOST:PORT", "data-plane address; port 0 picks a free port")
    _add(node, "http", "HOST:PORT", "management HTTP address; 'off' disables it")
    _add(
        node,
        "advertise",
        "HOST:PORT",
        "the address peers and clients dial",
        default_text="--bind, its wildcard host replaced by HOSTNAME",
    )
    _add(
        node,
        "seeds",
        "HOST:PORT[,HOST:PORT...]",
        "nodes to join through (may be repeated); none = start a new cluster",
        append=True,
    )
    _add(node, "auth_token", "TOKEN", "secret that clients must send in the handshake")
    _add(
        node,
        "cluster_secret",
        "SECRET",
        "secret shared by the nodes (>= 16 characters); without it only loopback peers are trusted",
    )
    _add(node, "log_level", "LEVEL", f"one of {', '.join(LOG_LEVELS)}")
    _add(node, "log_format", "text|json", "log lines as text, or one JSON object a line")
    _add(node, "tracing", "on|off", "OpenTelemetry tracing (OTEL_* variables configure it)")

    placement = parser.add_argument_group("placement and consistency")
    _add(placement, "replication", "N", "replicas per key")
    _add(placement, "vnodes", "N", "virtual nodes per node on the ring; 0 = ring default")
    _add(placement, "partitions", "N", "number of partitions, a power of two <= 65536")
    _add(placement, "read_consistency", "one|quorum|all", "default consistency of reads")
    _add(placement, "write_consistency", "one|quorum|all", "default consistency of writes")

    capacity = parser.add_argument_group("capacity and limits")
    _add(capacity, "max_memory", "BYTES", "memory bound of the local store; 0 = unbounded")
    _add(capacity, "max_items", "N", "item bound of the local store; 0 = unbounded")
    _add(capacity, "max_frame", "BYTES", "largest wire frame")
    _add(capacity, "max_key", "BYTES", "largest key")
    _add(capacity, "max_value", "BYTES", "largest value")
    _add(capacity, "max_connections", "N", "client connections open at once")
    _add(capacity, "max_connections_per_source", "N", "client connections from one IP")
    _add(capacity, "max_pending_handshakes", "N", "connections still in their handshake")
    _add(capacity, "max_output_buffer", "BYTES", "unread answers a connection may queue")
    _add(capacity, "watch_max_watchers", "N", "connections watching writes at once")
    _add(capacity, "watch_max_prefixes", "N", "key prefixes one watching connection names")
    _add(capacity, "watch_max_pending_bytes", "BYTES", "notifications queued per watcher")

    timing = parser.add_argument_group("timeouts and intervals (seconds)")
    _add(timing, "request_timeout", "SECONDS", "deadline of one request to a peer")
    _add(timing, "connect_timeout", "SECONDS", "deadline of opening a connection")
    _add(timing, "heartbeat_interval", "SECONDS", "period of heartbeats")
    _add(timing, "failure_timeout", "SECONDS", "silence after which a peer is down")
    _add(timing, "seed_retry_interval", "SECONDS", "pause between attempts to reach seeds")
    _add(timing, "handshake_timeout", "SECONDS", "time a new connection has to handshake")
    _add(timing, "frame_timeout", "SECONDS", "time a frame may take, plus 1 s per MiB")
    _add(timing, "idle_timeout", "SECONDS", "close idle client connections; 'off' = never")

    convergence = parser.add_argument_group("convergence")
    _add(convergence, "hint_ttl", "SECONDS", "how long a hint for a down replica is kept")
    _add(convergence, "hint_max_per_node", "N", "hints kept for one down node")
    _add(convergence, "hint_max_total", "N", "hints kept in all")
    _add(convergence, "hint_max_bytes", "BYTES", "bytes of hints kept in all")
    _add(convergence, "hint_replay_batch", "N", "hints sent per replay batch")
    _add(
        convergence,
        "tombstone_ttl",
        "SECONDS",
        "how long a delete's tombstone is kept; >= 60 s and more than hint-ttl + "
        "anti-entropy-max-interval + failure-timeout + request-timeout",
    )
    _add(convergence, "anti_entropy_interval", "SECONDS", "base period of anti-entropy")
    _add(convergence, "anti_entropy_max_interval", "SECONDS", "longest anti-entropy period")
    _add(
        convergence,
        "max_clock_skew",
        "SECONDS",
        "refuse versions further ahead of this node's clock than this",
    )

    membership = parser.add_argument_group("membership and rebalancing")
    _add(membership, "indirect_probes", "N", "members asked to probe a silent member")
    _add(membership, "suspect_timeout", "SECONDS", "time a suspect has to refute before dead")
    _add(membership, "leave_on_stop", "true|false", "leave the cluster gracefully on SIGTERM")
    _add(membership, "leave_timeout", "SECONDS", "wait for new owners when leaving")
    _add(
        membership,
        "dead_removal_timeout",
        "SECONDS",
        "remove a member dead this long from the ring; 'off' = only by hand",
        default_text="off",
    )
    _add(membership, "rebalance_batch_keys", "N", "entries per streaming batch")
    _add(membership, "rebalance_batch_bytes", "BYTES", "bytes per streaming batch")
    _add(membership, "rebalance_concurrency", "N", "partitions streamed at once")
    _add(membership, "rebalance_rate", "BYTES", "bytes per second streamed at most; 0 = no cap")
    _add(membership, "removal_grace", "SECONDS", "time an old owner keeps a partition it gave away")

    latency = parser.add_argument_group("latency")
    _add(
        latency,
        "busy_poll",
        "SECONDS",
        "after a socket write, poll instead of sleeping for this long (e.g. 100us; "
        "costs CPU time); 0 = off",
    )
    _add(
        latency,
        "cpu_latency_limit",
        "SECONDS",
        "hold this CPU wake-up latency limit while running (PM QoS, needs root; "
        "0 keeps idle CPUs polling, e.g. 0 or 20us); 'off' = don't ask",
        default_text="off",
    )

    testing = parser.add_argument_group("testing")
    testing.add_argument(
        "--fault-injection",
        dest="fault_injection",
        action="store_const",
        const=True,
        default=None,
        help="serve GET/POST /internal/faults to drop, delay or partition this node's "
        "messages to its peers (chaos tests only) "
        f"[env {env_var_name('fault_injection')}; default: off]",
    )
    security = parser.add_argument_group("security (docs/security.md)")
    _add(
        security,
        "tokens",
        "FILE",
        "client tokens, one 'NAME SCOPE[,SCOPE] sha256:HEX' a line (hypercache token "
        "makes them); needs --cluster-secret",
    )
    _add(security, "tls_cert", "FILE", "PEM certificate: TLS on the data port and HTTP")
    _add(security, "tls_key", "FILE", "PEM private key of --tls-cert (if not in it)")
    _add(security, "tls_ca", "FILE", "CA certificates that peer and client certificates chain to")
    _add(security, "tls_client_auth", "none|optional|required", "client certificates (mTLS)")
    return parser


def node_config_from_argv(argv: list[str], environ: Mapping[str, str]) -> DistConfig:
    """Parse ``argv`` (without the program name), load and validate the configuration.

    Exits like argparse on a usage error; on an invalid setting prints
    ``hypercache-node: error: <field>: <message>`` to stderr and exits with status 2.
    """
    parser = build_node_parser()
    namespace = parser.parse_args(argv)
    values = dict(vars(namespace))
    toml_path = values.pop("config")
    seeds = values.get("seeds")
    if seeds is not None:
        values["seeds"] = ",".join(seeds)
    try:
        return load_config(argv_values=values, environ=environ, toml_path=toml_path)
    except ConfigError as exc:
        print(f"{parser.prog}: error: {exc.field}: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
