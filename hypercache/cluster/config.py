"""Configuration of a cluster node: :class:`DistConfig` and :func:`load_config`.

One frozen dataclass holds every setting of a ``hypercache-node``. It validates
itself on construction and raises :class:`~hypercache.errors.ConfigError` naming
the offending field, so a :class:`DistConfig` that exists is a valid one.

Its settings come in *sections*, each a frozen dataclass that validates itself and
is what the part of the node it configures takes: :class:`Placement`,
:class:`HintSettings`, :class:`AntiEntropySettings`, :class:`MembershipSettings`,
the wire's :class:`~hypercache.net.protocol.Limits` and the server's
:class:`~hypercache.net.transport.ConnectionLimits` (``config.placement``,
``config.hints``, ...). The fields stay flat on :class:`DistConfig` itself, named as
the flags, environment variables and TOML keys that set them; a rule across
sections (the tombstone rule, the output buffer against ``max_value``) is checked
by :class:`DistConfig`.

Sources and precedence
----------------------
:func:`load_config` fills the dataclass from four layers; each one overrides the
layers before it:

1. the defaults of :class:`DistConfig` (a bare ``hypercache-node`` runs a single
   node on loopback: data plane ``127.0.0.1:7400``, management HTTP ``127.0.0.1:7480``);
2. a TOML file: ``--config FILE`` or, without it, ``$HYPERCACHE_CONFIG``. Keys are the
   field names at top level (``replication = 3``, ``seeds = ["10.0.0.1:7400"]``);
3. environment variables ``HYPERCACHE_<FIELD>`` (the upper-cased field name, e.g.
   ``HYPERCACHE_READ_CONSISTENCY=quorum``; ``HYPERCACHE_SEEDS`` is comma-separated);
4. command-line flags ``--<field-with-dashes>`` (see :mod:`hypercache.cli.args`).

Typos never pass silently: an unknown TOML key, or an environment variable that
starts with ``HYPERCACHE_`` (in any letter case) and is neither a field nor one of
:data:`NON_NODE_ENV_VARS`, is a :class:`ConfigError` that names it.

Value syntax in text (environment, flags, TOML strings)
-------------------------------------------------------
* integers: ``3``, ``100_000``;
* sizes in bytes (``max_memory``, ``max_frame``, ``max_key``, ``max_value``,
  ``hint_max_bytes``): an integer or a number with a unit, ``B``, decimal ``KB MB GB TB``
  (powers of 1000) or binary ``KiB MiB GiB TiB`` (powers of 1024), case-insensitive:
  ``64MiB``, ``1GB``, ``1.5 GiB``. Bare ``K``/``M``/``G`` are refused as ambiguous;
* durations in seconds (every ``*_timeout``, ``*_ttl`` and ``*_interval``): a number of
  seconds or a number with a unit ``ms s m h d``: ``2.5``, ``500ms``, ``30s``, ``1h``;
* addresses: ``HOST:PORT`` with an IPv4 address, a host name or a bracketed IPv6
  address (``[::1]:7400``);
* ``http``: ``""``, ``off`` or ``none`` turn the management HTTP server off;
* ``auth_token``: ``""`` means no token.

Node id
-------
``node_id`` defaults to ``""``, which :class:`DistConfig` replaces with an id derived
from ``bind`` (see :func:`derive_node_id`): the bind address itself
(``"127.0.0.1:7400"``), or ``"<hostname>:<port>"`` when bind listens on a wildcard
address (``0.0.0.0``, ``[::]``), whose text would be the same on every host. The id
breaks version ties between nodes, so it must be unique in the cluster and stable
across restarts. A node that binds port 0 learns its real port only after binding;
it should then call :meth:`DistConfig.with_bind`, which re-derives a derived id.

Tombstone rule
--------------
A delete leaves a tombstone that must outlive every hint and a full anti-entropy
period; otherwise a replica that missed the delete (it was down, its hint was still
queued, or anti-entropy had not reached it yet) could hand the old value back after
the tombstone is gone and resurrect the key. A replica may also miss a delete
without being down: paused or slow, it is noticed only after ``failure_timeout``,
and its hint is queued only after ``request_timeout``. Hence, checked on
construction::

    tombstone_ttl > hint_ttl + anti_entropy_max_interval + failure_timeout + request_timeout
    tombstone_ttl >= MIN_TOMBSTONE_TTL (60 s)

The floor covers the absences that no setting foresees (a long GC or VM pause, a
restart): with a tombstone of a few seconds, a node paused for longer than that
across a delete brings the key back. A node absent for longer than the whole
window (``tombstone_ttl - anti_entropy_max_interval``) forgets its data when it
returns instead of handing it back (see :mod:`hypercache.cluster.node`).

Clock rule
----------
Every version a node receives (replica writes, hints, anti-entropy, read repair)
must be at most ``max_clock_skew`` ahead of the node's wall clock; one beyond is
refused and counted, and the node's hybrid logical clock never moves past that
horizon (see :class:`~hypercache._core.hlc.HLC`). The clocks of the nodes must
therefore agree within ``max_clock_skew`` (NTP keeps them within milliseconds); a
node whose clock runs further ahead has its writes refused by its peers, loudly.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from hypercache.consistency import Consistency
from hypercache.errors import ConfigError
from hypercache.net.busypoll import check_window
from hypercache.net.protocol import (
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_KEY,
    DEFAULT_MAX_VALUE,
    FRAME_OVERHEAD,
    MAX_PUT_MANY,
    Limits,
)
from hypercache.net.security import SecuritySettings
from hypercache.net.transport import ConnectionLimits
from hypercache.units import (
    MiB,
    check_int,
    check_seconds,
    describe,
    format_hostport,
    parse_duration,
    parse_hostport,
    parse_seeds,
    parse_size,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "ENV_PREFIX",
    "FRAME_OVERHEAD",
    "LOG_LEVELS",
    "MAX_FRAME_LIMIT",
    "MIN_TOMBSTONE_TTL",
    "NON_NODE_ENV_VARS",
    "REDACTED",
    "AntiEntropySettings",
    "DistConfig",
    "HintSettings",
    "MembershipSettings",
    "Placement",
    "RebalanceSettings",
    "derive_node_id",
    "env_var_name",
    "format_hostport",
    "load_config",
    "parse_duration",
    "parse_hostport",
    "parse_size",
]


#: Prefix of every environment variable hypercache reads.
ENV_PREFIX: Final = "HYPERCACHE_"

#: Environment variable naming the TOML file when ``--config`` is not given.
CONFIG_ENV_VAR: Final = "HYPERCACHE_CONFIG"

#: ``HYPERCACHE_*`` variables that belong to hypercache but are not node settings;
#: :func:`load_config` skips them instead of calling them typos. Register new ones here.
NON_NODE_ENV_VARS: Final = frozenset({CONFIG_ENV_VAR, "HYPERCACHE_DEBUG"})

#: A frame's length travels as a 4-byte big-endian integer.
MAX_FRAME_LIMIT: Final = 2**32 - 1

#: Accepted values of ``log_level`` (``"warn"`` is read as ``"warning"``).
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")

#: What :meth:`DistConfig.to_dict` shows instead of a set secret (``auth_token``,
#: ``cluster_secret``).
REDACTED: Final = "<redacted>"

#: Shortest ``tombstone_ttl`` accepted, seconds (see "Tombstone rule").
MIN_TOMBSTONE_TTL: Final = 60.0
#: Longest ``max_clock_skew`` accepted, seconds.
_MAX_CLOCK_SKEW: Final = 3600.0
#: Shortest cluster secret accepted, characters.
_MIN_SECRET: Final = 16

_MAX_PARTITIONS: Final = 65536
_MAX_VNODES: Final = 65536
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::"})
_OFF_WORDS: Final = frozenset({"", "off", "none"})
_MAX_CPU_LATENCY_LIMIT: Final = 1.0
_MAX_INDIRECT_PROBES: Final = 16

_NODE_ID = re.compile(r"[!-~]{1,255}")  # printable ASCII, no blanks
_CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# --------------------------------------------------------------------------- addresses


def derive_node_id(bind: str) -> str:
    """The default node id for a node bound to ``bind`` (``HOST:PORT``).

    That is the bind address itself, normalised (``"127.0.0.1:7400"``), except for
    a wildcard host (``0.0.0.0``, ``[::]``), which is replaced with this machine's
    host name, so that nodes on different hosts get different ids.
    """
    host, port = parse_hostport(bind, field="bind")
    if host in _WILDCARD_HOSTS:
        host = socket.gethostname()
    return format_hostport(host, port)


# --------------------------------------------------------------------- text values


# ---------------------------------------------------------------- field validators


_describe = describe
_int = check_int
_positive_seconds = check_seconds


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(name, f"expected a string, got {_describe(value)}")
    return value


def _address(name: str, value: Any) -> str:
    return format_hostport(*parse_hostport(_str(name, value), field=name))


def _seeds(value: Any) -> tuple[str, ...]:
    return parse_seeds(value)


def _split_commas(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# ------------------------------------------------------------------------ sections


def _section_fields(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Placement:
    """Where keys live: replicas per key, the ring, default consistency levels.
    Fields as in :class:`DistConfig`; validated (and normalised) on construction."""

    replication: int
    vnodes: int
    partitions: int
    read_consistency: Consistency
    write_consistency: Consistency

    def __post_init__(self) -> None:
        check_int("replication", self.replication, low=1)
        check_int("vnodes", self.vnodes, low=0, high=_MAX_VNODES)
        partitions = check_int("partitions", self.partitions, low=1, high=_MAX_PARTITIONS)
        if partitions & (partitions - 1):
            raise ConfigError("partitions", f"must be a power of two, got {partitions}")
        for name in ("read_consistency", "write_consistency"):
            object.__setattr__(self, name, Consistency.parse(getattr(self, name), field=name))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HintSettings:
    """Hinted handoff: how long and how many hints are kept, how they replay."""

    hint_ttl: float
    hint_max_per_node: int
    hint_max_total: int
    hint_max_bytes: int
    hint_replay_batch: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "hint_ttl", check_seconds("hint_ttl", self.hint_ttl))
        per_node = check_int("hint_max_per_node", self.hint_max_per_node, low=1)
        total = check_int("hint_max_total", self.hint_max_total, low=1)
        if per_node > total:
            raise ConfigError(
                "hint_max_per_node",
                f"must not exceed hint_max_total ({total}), got {per_node}",
            )
        check_int("hint_max_bytes", self.hint_max_bytes, low=1)
        check_int("hint_replay_batch", self.hint_replay_batch, low=1, high=MAX_PUT_MANY)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AntiEntropySettings:
    """The anti-entropy loop's base and longest interval."""

    anti_entropy_interval: float
    anti_entropy_max_interval: float

    def __post_init__(self) -> None:
        for name in ("anti_entropy_interval", "anti_entropy_max_interval"):
            object.__setattr__(self, name, check_seconds(name, getattr(self, name)))
        if self.anti_entropy_max_interval < self.anti_entropy_interval:
            raise ConfigError(
                "anti_entropy_max_interval",
                f"must be >= anti_entropy_interval ({self.anti_entropy_interval:g} s), "
                f"got {self.anti_entropy_max_interval:g} s",
            )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MembershipSettings:
    """Failure detection, joining and leaving: the probe period, the silence that
    makes a member suspect and then dead, leaving on stop, removing the dead."""

    heartbeat_interval: float
    failure_timeout: float
    seed_retry_interval: float
    indirect_probes: int
    suspect_timeout: float
    leave_on_stop: bool
    leave_timeout: float
    dead_removal_timeout: float | None

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_interval",
            "failure_timeout",
            "seed_retry_interval",
            "suspect_timeout",
            "leave_timeout",
        ):
            object.__setattr__(self, name, check_seconds(name, getattr(self, name)))
        if self.failure_timeout < 2 * self.heartbeat_interval:
            raise ConfigError(
                "failure_timeout",
                f"must be at least twice heartbeat_interval ({self.heartbeat_interval:g} s) "
                f"so that one late heartbeat does not mark a peer down, "
                f"got {self.failure_timeout:g} s",
            )
        check_int("indirect_probes", self.indirect_probes, low=0, high=_MAX_INDIRECT_PROBES)
        if self.suspect_timeout < self.heartbeat_interval:
            raise ConfigError(
                "suspect_timeout",
                f"must be at least heartbeat_interval ({self.heartbeat_interval:g} s): a "
                "suspected member needs a probe period to refute, "
                f"got {self.suspect_timeout:g} s",
            )
        if type(self.leave_on_stop) is not bool:
            raise ConfigError(
                "leave_on_stop", f"expected true or false, got {self.leave_on_stop!r}"
            )
        if self.dead_removal_timeout is not None:
            removal = check_seconds("dead_removal_timeout", self.dead_removal_timeout)
            object.__setattr__(self, "dead_removal_timeout", removal)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RebalanceSettings:
    """Moving partitions when the ring changes: batch sizes, how many partitions at
    once, the byte rate, and how long an old owner keeps what it gave away."""

    rebalance_batch_keys: int
    rebalance_batch_bytes: int
    rebalance_concurrency: int
    rebalance_rate: int
    removal_grace: float

    def __post_init__(self) -> None:
        check_int("rebalance_batch_keys", self.rebalance_batch_keys, low=1, high=MAX_PUT_MANY)
        check_int("rebalance_batch_bytes", self.rebalance_batch_bytes, low=1)
        check_int("rebalance_concurrency", self.rebalance_concurrency, low=1, high=1024)
        check_int("rebalance_rate", self.rebalance_rate, low=0)
        object.__setattr__(
            self, "removal_grace", check_seconds("removal_grace", self.removal_grace)
        )


_PLACEMENT: Final = _section_fields(Placement)
_HINTS: Final = _section_fields(HintSettings)
_ANTI_ENTROPY: Final = _section_fields(AntiEntropySettings)
_MEMBERSHIP: Final = _section_fields(MembershipSettings)
_REBALANCE: Final = _section_fields(RebalanceSettings)
_SECURITY: Final = _section_fields(SecuritySettings)
_CONNECTIONS: Final = (
    "max_connections",
    "max_connections_per_source",
    "max_pending_handshakes",
    "handshake_timeout",
    "frame_timeout",
    "idle_timeout",
    "max_output_buffer",
)


# ---------------------------------------------------------------------- DistConfig


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DistConfig:
    """Every setting of a cluster node, validated on construction.

    Construct it directly (``DistConfig(bind="127.0.0.1:0", replication=1)``), with
    :func:`dataclasses.replace`, or from files, environment and flags with
    :func:`load_config`. Every invalid value raises
    :class:`~hypercache.errors.ConfigError` whose ``field`` names the setting.

    A few inputs are normalised: ``node_id=""`` is derived from ``bind`` (see
    :func:`derive_node_id`); consistency names become :class:`Consistency`;
    ``http`` of ``""``/``"off"``/``"none"`` and ``auth_token=""`` become ``None``;
    ``seeds`` becomes a tuple without duplicates (a comma-separated string is split);
    addresses lose surrounding blanks; integer seconds become floats;
    ``log_level`` becomes lower case.

    Identity and addresses:

    :ivar node_id: unique, stable id of this node (printable ASCII, no blanks, at
        most 255 characters). Default ``""``: derived from ``bind``.
    :ivar cluster_name: nodes only talk to nodes of the same cluster name
        (``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 64 characters). Default ``"hypercache"``.
    :ivar bind: ``HOST:PORT`` of the data plane. Default ``"127.0.0.1:7400"``;
        port 0 picks a free port.
    :ivar http: ``HOST:PORT`` of the management HTTP server, or ``None`` for none.
        Default ``"127.0.0.1:7480"``.
    :ivar advertise: the ``HOST:PORT`` that peers and clients are told to dial;
        ``None``: ``bind``, with a wildcard host replaced by this machine's host name
        (see :attr:`advertised`). Default ``None``.
    :ivar seeds: ``HOST:PORT`` of nodes to join through; empty = start a new
        cluster. Default ``()``.

    Placement and consistency:

    :ivar replication: replicas per key, >= 1. Default 3 (a smaller cluster
        keeps as many replicas as it has nodes).
    :ivar vnodes: virtual nodes per node on the ring, 0..65536; 0 (the default) =
        the ring's own default, :data:`hypercache._core.ring.DEFAULT_VNODES` (2048).
    :ivar partitions: fixed number of partitions, a power of two in 1..65536. Default 4096.
    :ivar read_consistency: default consistency of reads. Default ``QUORUM``.
    :ivar write_consistency: default consistency of writes. Default ``QUORUM``.

    Capacity and limits (bytes unless stated):

    :ivar max_memory: memory bound of the local store; 0 = unbounded. Default 0.
    :ivar max_items: item bound of the local store; 0 = unbounded. Default 0.
    :ivar max_frame: largest wire frame, at most 2**32-1. Default 64 MiB.
    :ivar max_key: largest key. Default 64 KiB.
    :ivar max_value: largest value. Default 32 MiB.
        ``max_key + max_value + FRAME_OVERHEAD`` must not exceed ``max_frame``.

    Timeouts (seconds, positive):

    :ivar request_timeout: deadline of one request to a peer. Default 2.0.
    :ivar connect_timeout: deadline of opening a connection. Default 1.0.

    Security and logging:

    :ivar auth_token: shared secret that clients must send in the handshake;
        ``None`` = no client authentication. Never shown by ``repr`` or :meth:`to_dict`.
    :ivar cluster_secret: secret shared by the nodes of the cluster (at least 16
        characters): a connection is a *peer* (may send replica, hint, gossip and
        anti-entropy operations, and announce members) only when its handshake
        proves it holds the secret (HMAC-SHA256 over a fresh nonce and the time;
        see ``docs/protocol.md``). ``None``: peers are trusted only from loopback
        addresses, so that a cluster on one machine needs no setting and a cluster
        across machines cannot run open by mistake. Never shown.
    :ivar max_connections: client connections open at once (peers do not count).
        Default 10 000.
    :ivar max_connections_per_source: from one remote IP address: handshaken
        client connections, and (counted apart) handshakes under way. Default 1024.
    :ivar max_pending_handshakes: connections open at once that have not finished
        their handshake. Default 256.
    :ivar handshake_timeout: seconds a new connection has to complete its handshake.
        Default 5.
    :ivar frame_timeout: seconds a frame may take to arrive once its first byte did,
        plus one second per MiB of its length. Default 10.
    :ivar idle_timeout: seconds a client connection may stay without a request
        before it is closed; ``None`` (``"off"``) = never. Peers are exempt. Default 300.
    :ivar max_output_buffer: bytes of answers queued on one connection that its
        peer does not read; past it the connection is closed. At least
        ``max_value + FRAME_OVERHEAD``. Default 64 MiB.
    :ivar watch_max_watchers: client connections that may watch writes (``WATCH``)
        on this node at once; more are refused. Default 1024.
    :ivar watch_max_prefixes: key prefixes one watching connection may name.
        Default 16.
    :ivar watch_max_pending_bytes: bytes of notifications queued for one watching
        connection (its socket's unsent bytes included) before its queue overflows
        and it is told to drop everything. Default 1 MiB.
    :ivar log_level: one of :data:`LOG_LEVELS`. Default ``"info"``.
    :ivar log_format: ``"text"`` or ``"json"`` (one object a line, see
        :mod:`hypercache.observe.logs`). Default ``"text"``.
    :ivar tracing: OpenTelemetry tracing (``on``/``off``; the exporter and sampler
        come from the ``OTEL_*`` variables, see ``docs/observability.md``). Needs
        ``pip install 'hypercache[otel]'``. Default off.

    Convergence (hinted handoff, tombstones, anti-entropy, failure detection):

    :ivar hint_ttl: seconds a hint for a down replica is kept. Default 3600.
    :ivar hint_max_per_node: hints kept for one down node, >= 1, at most
        ``hint_max_total``. Default 100 000.
    :ivar hint_max_total: hints kept in all, >= 1. Default 1 000 000.
    :ivar hint_max_bytes: bytes of hints kept in all, >= 1. Default 256 MiB.
    :ivar hint_replay_batch: hints sent per replay batch, 1..4096. Default 512.
    :ivar tombstone_ttl: seconds a delete's tombstone is kept; at least 60 and more
        than ``hint_ttl + anti_entropy_max_interval + failure_timeout +
        request_timeout`` (see the module docs). Default 86400.
    :ivar anti_entropy_interval: base period of anti-entropy rounds. Default 30.
    :ivar anti_entropy_max_interval: longest period (backoff while replicas
        agree), >= ``anti_entropy_interval``. Default 300.
    :ivar heartbeat_interval: the probe period: each node probes one member per
        period (SWIM, :mod:`hypercache.cluster.swim`). Default 1.
    :ivar failure_timeout: a probe's deadline: a member that answered neither the
        probe nor the helpers' indirect probes within it is suspected; also how
        late a period must come for this node to count itself stalled. At least
        twice ``heartbeat_interval``. Default 5.
    :ivar seed_retry_interval: pause between attempts to reach the seeds. Default 1.
    :ivar indirect_probes: members asked to probe a member that did not answer a
        probe itself, before it is suspected (SWIM), 0..16. Default 3.
    :ivar suspect_timeout: seconds a suspected member has to refute before it is
        declared dead; at least ``heartbeat_interval``. Default 5.
    :ivar leave_on_stop: on SIGTERM (and ``Node.stop(leave=True)``), leave the
        cluster gracefully: announce ``left``, hand every partition to its new
        owners, then exit. Default true.
    :ivar leave_timeout: seconds a leaving node waits for its partitions' new owners
        to confirm they hold them. Default 30.
    :ivar dead_removal_timeout: remove a member dead for this long from the ring
        automatically; ``None`` (``"off"``) = only by hand (``POST
        /cluster/remove``). Default off.
    :ivar rebalance_batch_keys: entries per partition-streaming batch, 1..4096.
        Default 1024.
    :ivar rebalance_batch_bytes: bytes per partition-streaming batch. Default 4 MiB.
    :ivar rebalance_concurrency: partitions streamed at once. Default 4.
    :ivar rebalance_rate: bytes per second a node streams at most; 0 = unbounded.
        Default 128 MiB.
    :ivar removal_grace: seconds an old owner keeps a partition it no longer owns
        (and still receives its writes), and only drops it once the new owners
        confirm they hold it. Default 30.
    :ivar max_clock_skew: how far ahead of this node's wall clock a received version
        may be (see "Clock rule"), seconds in (0, 3600]. Default 5.

    Latency:

    :ivar busy_poll: seconds the node's event loop keeps polling its sockets
        instead of sleeping after it writes to one, so that an answer or the next
        request arriving meanwhile finds it awake (see
        :mod:`hypercache.net.busypoll`); 0..0.01, 0 = off. Costs CPU time while it
        polls; needs no privilege. Default 0.
    :ivar cpu_latency_limit: while the node runs, hold this CPU wake-up latency
        limit (seconds, 0..1, rounded to microseconds) through Linux's PM QoS device
        ``/dev/cpu_dma_latency``: 0 keeps idle CPUs polling instead of halting, so
        that no hop of a request waits for a CPU to wake (see
        :mod:`hypercache.cluster.cpulatency`). Machine-wide, costs CPU time, needs
        root; a node that cannot hold it logs a warning and runs on. ``None`` (or
        ``"off"``) = don't ask. Default ``None``.

    Testing:

    :ivar fault_injection: wrap the node's peer connections in a
        :class:`~hypercache.net.faults.FaultyTransport` and serve ``GET``/``POST
        /internal/faults`` to set its rules (drops, delays, partitions); for chaos
        tests only. Default false.
    """

    node_id: str = ""
    cluster_name: str = "hypercache"
    bind: str = "127.0.0.1:7400"
    http: str | None = "127.0.0.1:7480"
    advertise: str | None = None
    seeds: tuple[str, ...] = ()
    replication: int = 3
    vnodes: int = 0
    partitions: int = 4096
    read_consistency: Consistency = Consistency.QUORUM
    write_consistency: Consistency = Consistency.QUORUM
    max_memory: int = 0
    max_items: int = 0
    request_timeout: float = 2.0
    connect_timeout: float = 1.0
    max_frame: int = DEFAULT_MAX_FRAME
    max_key: int = DEFAULT_MAX_KEY
    max_value: int = DEFAULT_MAX_VALUE
    auth_token: str | None = dataclasses.field(default=None, repr=False)
    cluster_secret: str | None = dataclasses.field(default=None, repr=False)
    max_connections: int = 10_000
    max_connections_per_source: int = 1024
    max_pending_handshakes: int = 256
    handshake_timeout: float = 5.0
    frame_timeout: float = 10.0
    idle_timeout: float | None = 300.0
    max_output_buffer: int = 64 * MiB
    watch_max_watchers: int = 1024
    watch_max_prefixes: int = 16
    watch_max_pending_bytes: int = 1 * MiB
    log_level: str = "info"
    log_format: str = "text"
    tracing: bool = False
    hint_ttl: float = 3600.0
    hint_max_per_node: int = 100_000
    hint_max_total: int = 1_000_000
    hint_max_bytes: int = 256 * MiB
    hint_replay_batch: int = 512
    tombstone_ttl: float = 86400.0
    anti_entropy_interval: float = 30.0
    anti_entropy_max_interval: float = 300.0
    heartbeat_interval: float = 1.0
    failure_timeout: float = 5.0
    seed_retry_interval: float = 1.0
    indirect_probes: int = 3
    suspect_timeout: float = 5.0
    leave_on_stop: bool = True
    leave_timeout: float = 30.0
    dead_removal_timeout: float | None = None
    rebalance_batch_keys: int = 1024
    rebalance_batch_bytes: int = 4 * MiB
    rebalance_concurrency: int = 4
    rebalance_rate: int = 128 * MiB
    removal_grace: float = 30.0
    max_clock_skew: float = 5.0
    busy_poll: float = 0.0
    cpu_latency_limit: float | None = None
    fault_injection: bool = False
    # -- security: TLS and client tokens (SecuritySettings, docs/security.md)
    tokens: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_client_auth: str = "none"
    # -- end security

    def _section(self, cls: Any, names: tuple[str, ...]) -> Any:
        """Section ``cls`` of the fields ``names``: built (so validated) by
        ``__post_init__``, which writes back what it normalised, and again by the
        properties below (from values it accepted already)."""
        return cls(**{name: getattr(self, name) for name in names})

    def _check_section(self, cls: Any, names: tuple[str, ...]) -> None:
        section = self._section(cls, names)
        for name in names:
            object.__setattr__(self, name, getattr(section, name))

    @property
    def placement(self) -> Placement:
        placement: Placement = self._section(Placement, _PLACEMENT)
        return placement

    @property
    def hints(self) -> HintSettings:
        hints: HintSettings = self._section(HintSettings, _HINTS)
        return hints

    @property
    def antientropy(self) -> AntiEntropySettings:
        settings: AntiEntropySettings = self._section(AntiEntropySettings, _ANTI_ENTROPY)
        return settings

    @property
    def membership(self) -> MembershipSettings:
        settings: MembershipSettings = self._section(MembershipSettings, _MEMBERSHIP)
        return settings

    @property
    def rebalance(self) -> RebalanceSettings:
        settings: RebalanceSettings = self._section(RebalanceSettings, _REBALANCE)
        return settings

    @property
    def security(self) -> SecuritySettings:
        """TLS and client tokens (see :mod:`hypercache.cluster.security`)."""
        settings: SecuritySettings = self._section(SecuritySettings, _SECURITY)
        return settings

    @property
    def connections(self) -> ConnectionLimits:
        """The caps and deadlines of the node's data-plane server."""
        limits: ConnectionLimits = self._section(ConnectionLimits, _CONNECTIONS)
        return limits

    def __post_init__(self) -> None:
        # Frozen: normalised values are stored through object.__setattr__. Checks run
        # in field order, so the first bad field is the one reported.
        put = object.__setattr__

        # -- identity and addresses
        node_id = _str("node_id", self.node_id)
        cluster_name = _str("cluster_name", self.cluster_name)
        if not _CLUSTER_NAME.fullmatch(cluster_name):
            raise ConfigError(
                "cluster_name",
                "must be 1..64 characters of letters, digits, '.', '_' or '-', "
                f"starting with a letter or digit; got {cluster_name!r}",
            )
        put(self, "bind", _address("bind", self.bind))
        http = self.http
        if http is not None and _str("http", http).strip().lower() in _OFF_WORDS:
            http = None
        put(self, "http", None if http is None else _address("http", http))
        advertise = self.advertise
        if advertise is not None and _str("advertise", advertise).strip() == "":
            advertise = None
        if advertise is not None:
            advertise = _address("advertise", advertise)
            host, port = parse_hostport(advertise, field="advertise")
            if host in _WILDCARD_HOSTS or port == 0:
                raise ConfigError(
                    "advertise",
                    f"must be an address peers and clients can reach, got {advertise!r}",
                )
        put(self, "advertise", advertise)
        put(self, "seeds", _seeds(self.seeds))
        if node_id == "":
            node_id = derive_node_id(self.bind)
        elif not _NODE_ID.fullmatch(node_id):
            raise ConfigError(
                "node_id",
                f"must be 1..255 printable ASCII characters without blanks, got {node_id!r}",
            )
        put(self, "node_id", node_id)

        # -- placement and consistency
        self._check_section(Placement, _PLACEMENT)

        # -- capacity and limits
        _int("max_memory", self.max_memory, low=0)
        _int("max_items", self.max_items, low=0)
        for name in ("request_timeout", "connect_timeout"):
            put(self, name, _positive_seconds(name, getattr(self, name)))
        max_frame = _int("max_frame", self.max_frame, low=1, high=MAX_FRAME_LIMIT)
        max_key = _int("max_key", self.max_key, low=1)
        max_value = _int("max_value", self.max_value, low=1)
        # The frame rule is the wire's own (one rule: Limits checks it).
        Limits(max_frame=max_frame, max_key=max_key, max_value=max_value)

        # -- security and logging
        token = self.auth_token
        if token is not None and _str("auth_token", token) == "":
            token = None
        put(self, "auth_token", token)
        secret = self.cluster_secret
        if secret is not None and _str("cluster_secret", secret) == "":
            secret = None
        if secret is not None and len(secret) < _MIN_SECRET:
            raise ConfigError(
                "cluster_secret",
                f"must be at least {_MIN_SECRET} characters (got {len(secret)}): it is "
                "what lets a node prove it belongs to the cluster",
            )
        put(self, "cluster_secret", secret)
        # security: TLS and tokens; a client token means nothing if any process
        # on loopback could pose as a peer, so tokens need the peers' secret.
        self._check_section(SecuritySettings, _SECURITY)
        if self.tokens is not None and secret is None:
            raise ConfigError(
                "cluster_secret",
                "is required with tokens: without it any process on this machine can "
                "claim to be a peer and skip the token check",
            )
        self._check_section(ConnectionLimits, _CONNECTIONS)
        output = self.max_output_buffer
        if output < max_value + FRAME_OVERHEAD:
            raise ConfigError(
                "max_output_buffer",
                f"must hold the largest answer: at least max_value + {FRAME_OVERHEAD} = "
                f"{max_value + FRAME_OVERHEAD}, got {output}",
            )
        _int("watch_max_watchers", self.watch_max_watchers, low=0)
        _int("watch_max_prefixes", self.watch_max_prefixes, low=1, high=1024)
        _int("watch_max_pending_bytes", self.watch_max_pending_bytes, low=4 * 1024)
        level = _str("log_level", self.log_level).strip().lower()
        level = "warning" if level == "warn" else level
        if level not in LOG_LEVELS:
            raise ConfigError(
                "log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )
        put(self, "log_level", level)
        log_format = _str("log_format", self.log_format).strip().lower()
        if log_format not in ("text", "json"):
            raise ConfigError("log_format", f"expected text or json, got {self.log_format!r}")
        put(self, "log_format", log_format)
        if type(self.tracing) is not bool:
            raise ConfigError("tracing", f"expected on or off, got {self.tracing!r}")

        # -- convergence
        for name in ("tombstone_ttl", "max_clock_skew"):
            put(self, name, _positive_seconds(name, getattr(self, name)))
        if self.max_clock_skew > _MAX_CLOCK_SKEW:
            raise ConfigError(
                "max_clock_skew",
                f"must be at most {_MAX_CLOCK_SKEW:g} s, got {self.max_clock_skew:g} s: a "
                "version that far ahead would win over every write of that long",
            )
        self._check_section(HintSettings, _HINTS)
        self._check_section(AntiEntropySettings, _ANTI_ENTROPY)
        self._check_section(MembershipSettings, _MEMBERSHIP)
        self._check_section(RebalanceSettings, _REBALANCE)
        horizon = (
            self.hint_ttl
            + self.anti_entropy_max_interval
            + self.failure_timeout
            + self.request_timeout
        )
        if self.tombstone_ttl <= horizon:
            raise ConfigError(
                "tombstone_ttl",
                f"must exceed hint_ttl + anti_entropy_max_interval + failure_timeout + "
                f"request_timeout ({self.hint_ttl:g} + {self.anti_entropy_max_interval:g} + "
                f"{self.failure_timeout:g} + {self.request_timeout:g} = {horizon:g} s), "
                f"got {self.tombstone_ttl:g} s: a tombstone must outlive every hint, the "
                "time it takes to notice a silent replica, and a full anti-entropy period, "
                "otherwise a replica that missed the delete could resurrect the key",
            )
        if self.tombstone_ttl < MIN_TOMBSTONE_TTL:
            raise ConfigError(
                "tombstone_ttl",
                f"must be at least {MIN_TOMBSTONE_TTL:g} s, got {self.tombstone_ttl:g} s: a "
                "replica paused or restarting for longer than the tombstone lives would "
                "bring the deleted key back",
            )

        # -- latency
        try:
            put(self, "busy_poll", check_window(self.busy_poll))
        except ValueError as exc:
            raise ConfigError("busy_poll", str(exc)) from None
        limit = self.cpu_latency_limit
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int | float):
                raise ConfigError(
                    "cpu_latency_limit", f"expected a number of seconds, got {_describe(limit)}"
                )
            if not 0 <= limit <= _MAX_CPU_LATENCY_LIMIT:
                raise ConfigError(
                    "cpu_latency_limit",
                    f"must be between 0 and {_MAX_CPU_LATENCY_LIMIT:g} s, got {limit!r}",
                )
            put(self, "cpu_latency_limit", float(limit))
        if type(self.fault_injection) is not bool:
            raise ConfigError(
                "fault_injection", f"expected true or false, got {_describe(self.fault_injection)}"
            )

    # ------------------------------------------------------------------ helpers

    @property
    def limits(self) -> Limits:
        """The wire's size limits (``max_frame``, ``max_key``, ``max_value``), checked."""
        return Limits(max_frame=self.max_frame, max_key=self.max_key, max_value=self.max_value)

    @property
    def advertised(self) -> str:
        """The ``HOST:PORT`` peers and clients are told: ``advertise``, else ``bind``,
        whose wildcard host (``0.0.0.0``, ``[::]``) is replaced with this machine's
        host name (never advertised as such: nobody can dial it)."""
        if self.advertise is not None:
            return self.advertise
        host, port = parse_hostport(self.bind, field="bind")
        if host in _WILDCARD_HOSTS:
            host = socket.gethostname()
        return format_hostport(host, port)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of :attr:`bind` (IPv6 hosts without brackets)."""
        return parse_hostport(self.bind, field="bind")

    @property
    def http_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of :attr:`http`, or ``None`` when the HTTP server is off."""
        return None if self.http is None else parse_hostport(self.http, field="http")

    @property
    def seed_addresses(self) -> tuple[tuple[str, int], ...]:
        """``(host, port)`` of each seed."""
        return tuple(parse_hostport(seed, field="seeds") for seed in self.seeds)

    @property
    def partition_bits(self) -> int:
        """``k`` with ``partitions == 2**k``: a key's partition is ``hash64 >> (64 - k)``."""
        return self.partitions.bit_length() - 1

    def with_bind(self, bind: str) -> DistConfig:
        """A copy listening on ``bind``, e.g. the real address after binding port 0.

        A node id that was derived from the old ``bind`` is derived again from the
        new one; an explicitly configured id is kept.
        """
        derived = self.node_id == derive_node_id(self.bind)
        return dataclasses.replace(self, bind=bind, node_id="" if derived else self.node_id)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-safe dict (for ``GET /config``).

        Consistency levels are their names, seeds a list, and a set ``auth_token``
        is replaced with :data:`REDACTED`.
        """
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Consistency):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        for secret in ("auth_token", "cluster_secret"):
            if getattr(self, secret) is not None:
                out[secret] = REDACTED
        return out


# ----------------------------------------------------------------------- loading

# Each loader turns one raw input (a string from the environment or the command
# line, or a TOML value) into what DistConfig accepts; DistConfig validates the rest.
_Loader = Callable[[str, Any], Any]


def _load_str(name: str, raw: Any) -> Any:
    return _str(name, raw)


def _load_optional_str(name: str, raw: Any) -> Any:
    return None if raw is None else _str(name, raw)


def _load_int(name: str, raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return int(raw.strip(), 10)
        except ValueError:
            raise ConfigError(name, f"expected an integer, got {raw!r}") from None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(name, f"expected an integer, got {_describe(raw)}")
    return raw


def _load_size(name: str, raw: Any) -> Any:
    if isinstance(raw, str):
        return parse_size(raw, field=name)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(name, f"expected a size in bytes (e.g. 64MiB), got {_describe(raw)}")
    return raw


def _load_seconds(name: str, raw: Any) -> Any:
    if isinstance(raw, str):
        return parse_duration(raw, field=name)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ConfigError(name, f"expected a number of seconds, got {_describe(raw)}")
    return float(raw)


def _load_optional_seconds(name: str, raw: Any) -> Any:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in _OFF_WORDS):
        return None
    return _load_seconds(name, raw)


_TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS: Final = frozenset({"0", "false", "no", "off"})


def _load_bool(name: str, raw: Any) -> Any:
    if isinstance(raw, str):
        word = raw.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ConfigError(name, f"expected true or false, got {raw!r}")
    if type(raw) is not bool:
        raise ConfigError(name, f"expected true or false, got {_describe(raw)}")
    return raw


def _load_seeds(name: str, raw: Any) -> Any:
    if isinstance(raw, str):
        return tuple(_split_commas(raw))
    if isinstance(raw, list | tuple):
        return tuple(_str(name, item) for item in raw)
    raise ConfigError(name, f"expected a list of HOST:PORT, got {_describe(raw)}")


_LOADERS: Final[Mapping[str, _Loader]] = {
    "node_id": _load_str,
    "cluster_name": _load_str,
    "bind": _load_str,
    "http": _load_optional_str,
    "advertise": _load_optional_str,
    "seeds": _load_seeds,
    "replication": _load_int,
    "vnodes": _load_int,
    "partitions": _load_int,
    "read_consistency": _load_str,
    "write_consistency": _load_str,
    "max_memory": _load_size,
    "max_items": _load_int,
    "request_timeout": _load_seconds,
    "connect_timeout": _load_seconds,
    "max_frame": _load_size,
    "max_key": _load_size,
    "max_value": _load_size,
    "auth_token": _load_optional_str,
    "cluster_secret": _load_optional_str,
    "max_connections": _load_int,
    "max_connections_per_source": _load_int,
    "max_pending_handshakes": _load_int,
    "handshake_timeout": _load_seconds,
    "frame_timeout": _load_seconds,
    "idle_timeout": _load_optional_seconds,
    "max_output_buffer": _load_size,
    "watch_max_watchers": _load_int,
    "watch_max_prefixes": _load_int,
    "watch_max_pending_bytes": _load_size,
    "log_level": _load_str,
    "log_format": _load_str,
    "tracing": _load_bool,
    "hint_ttl": _load_seconds,
    "hint_max_per_node": _load_int,
    "hint_max_total": _load_int,
    "hint_max_bytes": _load_size,
    "hint_replay_batch": _load_int,
    "tombstone_ttl": _load_seconds,
    "anti_entropy_interval": _load_seconds,
    "anti_entropy_max_interval": _load_seconds,
    "heartbeat_interval": _load_seconds,
    "failure_timeout": _load_seconds,
    "seed_retry_interval": _load_seconds,
    "indirect_probes": _load_int,
    "suspect_timeout": _load_seconds,
    "leave_on_stop": _load_bool,
    "leave_timeout": _load_seconds,
    "dead_removal_timeout": _load_optional_seconds,
    "rebalance_batch_keys": _load_int,
    "rebalance_batch_bytes": _load_size,
    "rebalance_concurrency": _load_int,
    "rebalance_rate": _load_size,
    "removal_grace": _load_seconds,
    "max_clock_skew": _load_seconds,
    "busy_poll": _load_seconds,
    "cpu_latency_limit": _load_optional_seconds,
    "fault_injection": _load_bool,
    # security
    "tokens": _load_optional_str,
    "tls_cert": _load_optional_str,
    "tls_key": _load_optional_str,
    "tls_ca": _load_optional_str,
    "tls_client_auth": _load_str,
}

_FIELDS: Final = tuple(field.name for field in dataclasses.fields(DistConfig))
if set(_LOADERS) != set(_FIELDS):  # pragma: no cover - guards edits of DistConfig
    raise AssertionError("every DistConfig field needs a loader in _LOADERS")


def env_var_name(field: str) -> str:
    """The environment variable of ``field`` (``bind`` -> ``HYPERCACHE_BIND``)."""
    return ENV_PREFIX + field.upper()


def _flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "config", f"{path!r} is not UTF-8 text (byte {exc.start}): TOML files are UTF-8"
        ) from None


def _toml_layer(path: str) -> list[tuple[str, Any, str]]:
    data = _read_toml(path)
    unknown = [key for key in data if key not in _LOADERS]
    if unknown:
        key = unknown[0]
        others = f" (also unknown: {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else ""
        raise ConfigError(
            key, f"unknown key in config file {path!r}{_suggest(key, _FIELDS)}{others}"
        )
    return [(key, value, f"config file {path!r}") for key, value in data.items()]


def _env_layer(environ: Mapping[str, str]) -> list[tuple[str, Any, str]]:
    layer: list[tuple[str, Any, str]] = []
    for var in sorted(environ):
        if not var.upper().startswith(ENV_PREFIX) or var in NON_NODE_ENV_VARS:
            continue
        field = var[len(ENV_PREFIX) :].lower()
        if field in _LOADERS and var == env_var_name(field):
            layer.append((field, environ[var], f"environment variable {var}"))
            continue
        if var.upper() in NON_NODE_ENV_VARS or field in _LOADERS:
            raise ConfigError(var, f"environment variable names are upper case: use {var.upper()}")
        known = [env_var_name(name) for name in _FIELDS] + sorted(NON_NODE_ENV_VARS)
        raise ConfigError(var, f"unknown environment variable{_suggest(var.upper(), known)}")
    return layer


def _argv_layer(argv_values: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    layer: list[tuple[str, Any, str]] = []
    for name, value in argv_values.items():
        if value is None:
            continue
        if name not in _LOADERS:
            raise ConfigError(name, f"unknown option{_suggest(name, _FIELDS)}")
        layer.append((name, value, f"command-line option {_flag_name(name)}"))
    return layer


def load_config(
    *,
    argv_values: Mapping[str, Any] | None,
    environ: Mapping[str, str],
    toml_path: str | None,
) -> DistConfig:
    """Build and validate a :class:`DistConfig` from its sources.

    Precedence, lowest first: the dataclass defaults, the TOML file, ``HYPERCACHE_*``
    environment variables, ``argv_values``.

    :param argv_values: field name -> value from the command line; ``None`` values
        are "not given" and skipped. Values may be strings (parsed like environment
        values) or already typed.
    :param environ: the environment, e.g. :data:`os.environ`.
    :param toml_path: the TOML file; when ``None``, ``environ["HYPERCACHE_CONFIG"]``
        names it if set and non-empty; otherwise no file is read.
    :raises ConfigError: a file cannot be read or parsed (field ``"config"``), a key
        or ``HYPERCACHE_*`` variable is unknown (field = that key or variable), or a
        value is invalid (field = the setting; the message says where the value came
        from).
    """
    if toml_path is None:
        toml_path = environ.get(CONFIG_ENV_VAR) or None
    layers: list[tuple[str, Any, str]] = []
    if toml_path is not None:
        layers += _toml_layer(toml_path)
    layers += _env_layer(environ)
    layers += _argv_layer(argv_values or {})

    # Only the value that wins is parsed: a bad environment variable that a flag
    # overrides does not stop the start.
    winners: dict[str, tuple[Any, str]] = {name: (raw, where) for name, raw, where in layers}
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, (raw, where) in winners.items():
        try:
            values[name] = _LOADERS[name](name, raw)
        except ConfigError as exc:
            raise ConfigError(exc.field, f"{exc.message} (from {where})") from None
        origin[name] = where
    try:
        return DistConfig(**values)
    except ConfigError as exc:
        source = origin.get(exc.field)
        if source is None:
            raise
        raise ConfigError(exc.field, f"{exc.message} (from {source})") from None
