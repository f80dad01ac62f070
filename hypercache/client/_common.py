"""What the sync and async clients share: options, requests, answers, counters.

The two clients differ only in how they wait (blocking sockets or asyncio). Every
step of an operation that does not wait is written once, here and in
:mod:`hypercache.client.commands`, as redis-py writes its commands once for its two
clients:

- **what to send**: :class:`ClientBase` validates and normalises the key and the
  value and builds each operation's payload (``_set_request``, ``_delete_request``,
  ``_set_many_requests``; ``commands.get_payload``);
- **how to read the answer**: each :class:`~hypercache.client.commands.Command`
  carries the function that checks and shapes its answer; ``get``'s value and
  ``get_many``'s ``{key: value}`` are shaped by :meth:`ClientBase._value` and
  :meth:`ClientBase._get_many_result`;
- **where to send it**: :class:`~hypercache.client.failover.Failover` (one request
  along its candidate nodes), :class:`~hypercache.client.failover.TopologyFetch`
  (the table, along the fetch order) and :class:`OwnerRead` (a read coordinated by
  the client) are pure bookkeeping: the clients send and wait, the bookkeeping
  decides what comes next and what to raise;
- the closed checks, the counters (:class:`ClientStats`) and node health.

The clients keep the I/O: connections, sending, waiting, threads or tasks.
"""

from __future__ import annotations

import fnmatch
import math
import re
import secrets
import ssl as _ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, TypedDict, TypeVar, Unpack

from hypercache._core.hlc import HLC
from hypercache.client import commands
from hypercache.client.commands import MISS, Found, Level
from hypercache.client.compression import (
    DEFAULT_COMPRESSION,
    Compression,
    ValueCodec,
    resolve_compression,
)
from hypercache.client.failover import unreachable
from hypercache.client.keys import Key, normalize_key, wire_keys
from hypercache.client.serializer import Serializer, resolve_serializer
from hypercache.client.topology import Router, Topology
from hypercache.consistency import Consistency
from hypercache.errors import (
    ClockSkewError,
    ConfigError,
    HyperCacheError,
    NodeUnavailableError,
    NotReadyError,
    PermissionDeniedError,
    ProtocolError,
    RequestTimeoutError,
    UndecodableValueError,
    UsageError,
    ValueTooLargeError,
    WrongOwnerError,
)
from hypercache.net.protocol import (
    FEATURE_COMPRESSION,
    FEATURE_SET_VERSION,
    Limits,
    Op,
    make_hello,
)
from hypercache.net.security import SslArg, resolve_client_ssl
from hypercache.replication import (
    Entry,
    QuorumRound,
    entry_from_wire,
    is_live,
    plan_repair,
    wall_ms,
)
from hypercache.units import format_hostport, parse_hostport, parse_seeds

__all__ = [
    "BATCH",
    "DEFAULT_SEEDS",
    "DIRECT_OK",
    "DIRECT_PROXY",
    "DIRECT_STALE",
    "MAX_PENDING_REPAIRS",
    "PROBE_BACKOFF",
    "PROBE_TIMEOUT",
    "SCAN_PAGE",
    "ClientArgs",
    "ClientBase",
    "ClientOptions",
    "ClientStats",
    "DirectWrite",
    "Entry",
    "KeyMatch",
    "OwnerRead",
    "Repair",
    "Route",
    "check_address",
    "check_count",
    "entry_from_wire",
    "is_live",
    "probe_delays",
    "scan_pattern",
    "ttl_left",
    "ttl_to_ms",
    "uncovered_partitions",
    "wire_consistency",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

Route = Literal["owner", "any"]
WritePath = Literal["direct", "proxy"]

_W_PUT: Final = int(Op.W_PUT)
_W_HINT: Final = int(Op.W_HINT)
#: How far a client's clock follows a version seen in an answer, ahead of its own
#: wall clock, at most (ms): a forged answer cannot push it further (the nodes would
#: refuse its versions; it would write through a node meanwhile).
CLIENT_MAX_SKEW_MS: Final = 60_000

#: Requests sent in one pipelined batch (sync) or gathered at once (async) by
#: ``get_many``/``set_many``: bounds the buffers of a huge batch.
BATCH: Final = 1024
#: Read-repair pushes a client keeps in flight at most; beyond, a push is dropped
#: (counted in ``stats.read_repairs_dropped``) and anti-entropy repairs the owner later.
MAX_PENDING_REPAIRS: Final = 1024
#: Deadline of one probe ``PING`` of a node set aside (at most the client's ``timeout``).
PROBE_TIMEOUT: Final = 0.5
#: Pause after a node's first failed probe; it doubles after each failure, up to
#: ``retry_down_after``.
PROBE_BACKOFF: Final = 0.05


def probe_delays(cap: float) -> Iterator[float]:
    """Pauses between the probes of one node set aside: :data:`PROBE_BACKOFF`, doubling
    up to ``cap`` (``retry_down_after``), then ``cap`` for ever. A paused node costs a
    probe at most every ``cap + PROBE_TIMEOUT`` seconds, a dead one a refused
    connection every ``cap`` seconds."""
    delay = min(PROBE_BACKOFF, cap)
    while True:
        yield delay
        delay = min(delay * 2, cap)


def wire_consistency(value: Level, fallback: str | None) -> str | None:
    """The consistency to send: ``value`` parsed, or ``fallback`` (the client default)."""
    if value is None:
        return fallback
    return Consistency.parse(value).value


def ttl_to_ms(ttl: float | None) -> int | None:
    """Seconds to whole milliseconds, rounded up so that a tiny TTL never means "no TTL".

    :raises TypeError: ``ttl`` is not a number.
    :raises ConfigError: ``ttl`` is not positive and finite (field ``ttl``).
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"ttl must be a number of seconds or None, not {type(ttl).__name__}")
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ConfigError("ttl", f"must be a positive finite number of seconds, got {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


def ttl_left(key: Key, answer: tuple[bool, int], now_ms: int) -> float | None:
    """What ``ttl`` returns for a ``TTL`` answer, as :meth:`HyperCache.ttl
    <hypercache.HyperCache.ttl>` does: seconds left (``0.0`` once past, on this
    machine's clock), or ``None`` when the entry never expires.

    :raises KeyError: the key is absent (or deleted, or expired).
    """
    found, expire_at = answer
    if not found:
        raise KeyError(key)
    if expire_at == 0:
        return None
    return max(expire_at - now_ms, 0) / 1000


#: Keys asked of a node per ``SCAN`` page by default (the most a node gives).
SCAN_PAGE: Final = 1000

#: Whether a key (wire bytes) matches the rest of a pattern.
KeyMatch = Callable[[bytes], bool]

_GLOB: Final = frozenset("*?[")


def scan_pattern(
    pattern: str | bytes | None, limits: Limits
) -> tuple[bytes | None, KeyMatch | None]:
    """Split a glob ``pattern`` (``*``, ``?``, ``[...]``, ``[!...]``, as :mod:`fnmatch`;
    ``[*]`` for a literal ``*``) into the literal prefix a node filters on (``SCAN``'s
    ``prefix``) and the match of the whole pattern, ``None`` when the prefix decides
    alone (no pattern, or ``"prefix*"``). Keys and patterns are compared as text:
    UTF-8, bytes that are not kept as they are (``?`` is one character).

    :raises ConfigError: ``pattern`` is not text or bytes, has a ``[`` never closed,
        or a prefix longer than ``max_key`` (field ``pattern``).
    """
    if pattern is None:
        return None, None
    if isinstance(pattern, bytes):
        text = pattern.decode("utf-8", "surrogateescape")
    elif isinstance(pattern, str):
        text = pattern
    else:
        raise ConfigError("pattern", f"must be str or bytes, got {type(pattern).__name__}")
    i, n = 0, len(text)
    cut = n  # where the first wildcard is
    while i < n:
        c = text[i]
        if c in _GLOB and cut == n:
            cut = i
        if c == "[":
            j = i + 1
            if j < n and text[j] == "!":
                j += 1
            if j < n and text[j] == "]":
                j += 1  # a leading ] is a member
            j = text.find("]", j)
            if j < 0:
                raise ConfigError(
                    "pattern", f"'[' at position {i} is never closed (write [[] for a literal '[')"
                )
            i = j
        i += 1
    try:
        prefix = text[:cut].encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ConfigError("pattern", f"not encodable as UTF-8: {text!r:.60}") from None
    if len(prefix) > limits.max_key:
        raise ConfigError("pattern", f"its prefix is longer than max_key={limits.max_key}")
    if cut == n:  # no wildcard: that key alone
        return prefix, prefix.__eq__
    if text[cut:] == "*":
        return prefix, None
    regex = re.compile(fnmatch.translate(text))

    def match(key: bytes) -> bool:
        return regex.match(key.decode("utf-8", "surrogateescape")) is not None

    return prefix, match


def check_count(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """A positive integer argument (``limit``, ``page_size``), or ``None`` if allowed.

    :raises ConfigError: anything else (``field`` is ``name``).
    """
    if value is None and allow_none:
        return None
    if type(value) is not int or value < 1:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")
    return value


def check_address(address: object) -> str:
    """``"host:port"`` of a node, normalised.

    :raises ConfigError: it is not one (field ``address``).
    """
    if not isinstance(address, str):
        raise ConfigError("address", f"expected HOST:PORT, got {address!r}")
    host, port = parse_hostport(address)
    return format_hostport(host, port)


def uncovered_partitions(topology: Topology, scanned: set[str]) -> list[int]:
    """The partitions of which no owner is among ``scanned`` (their keys may be missing
    from a listing of those nodes)."""
    return [
        p
        for p in range(topology.partitions)
        if not any(owner in scanned for owner in topology.partition_owners(p))
    ]


class OwnerRead(QuorumRound):
    """One client-coordinated read of a key (``route="owner"``): which owners to ask,
    the answers, and the outcome. Pure bookkeeping, shared by both clients; they do
    the asking.

    A :class:`~hypercache.replication.QuorumRound` that asks only what it needs: the
    first ``required`` owners (in the router's order: table order, owners set aside
    last) are asked at once; each owner that fails (unreachable, timed out, an error
    answer, a malformed answer) is replaced at once by the next owner not asked yet
    (a read changes nothing, so asking another owner after a timeout is safe). The
    read succeeds at ``required`` answers and fails once every owner asked has
    answered or failed with fewer.

    :param key: the wire key.
    :param owners: the owners, in the order to ask them.
    :param required: answers needed (``Consistency.required(len(owners))``).
    """

    __slots__ = ("key",)

    def __init__(
        self, key: bytes, owners: tuple[str, ...], required: int, level: str = "quorum"
    ) -> None:
        super().__init__(owners, required, ask_all=False, level=level)
        self.key = key

    def start(self) -> list[str]:
        """The owners to ask first (``required`` of them, or all if fewer)."""
        return list(super().start())

    def ok(self, owner: str, raw: Any) -> str | None:  # type: ignore[override]
        """Record ``owner``'s answer; return an owner to ask instead if it is malformed."""
        try:
            entry = entry_from_wire(raw)
        except ProtocolError as exc:
            return self.failed(owner, exc)
        super().ok(owner, entry)
        return None

    @property
    def answers(self) -> dict[str, Entry | None]:
        """owner -> its entry (``None``: it holds nothing)."""
        return self.results

    @property
    def done(self) -> bool:
        """Whether the read is over: quorum reached, or nothing left to wait for (every
        owner asked has answered or failed and none is left to ask; like a node, the
        client waits for the requests out so that ``acks`` is exact)."""
        return self.decided

    def outcome(self) -> tuple[Entry | None, list[tuple[str, Entry]]]:
        """The newest entry among the answers and the repairs to push
        (:func:`~hypercache.replication.plan_repair`: the newest version wins,
        tombstones and entries expired in flight included; the caller serves a miss
        through :func:`~hypercache.replication.is_live`).

        :raises QuorumError: fewer than ``required`` owners answered.
        """
        error = self.error()
        if error is not None:
            raise error
        return plan_repair(self.results, wall_ms())


#: What :meth:`DirectWrite.outcome` decides.
DIRECT_OK: Final = "ok"
DIRECT_STALE: Final = "stale"
DIRECT_PROXY: Final = "proxy"


class DirectWrite:
    """One client-stamped write of a key to all its owners (``W_PUT``,
    ``write_path="direct"``): the payload, the answers, and what to do next. Pure
    bookkeeping, shared by both clients; they do the sending.

    Every owner not set aside is sent the write at once; one set aside counts as
    failed from the start (it gets a hint). The write is *decided* at ``required``
    acks or once nothing is left to wait for. Then :meth:`outcome` says:

    - ``"ok"``: ``required`` owners took it (applied, or held a newer version);
    - ``"stale"``: an owner said the client's owner list is stale
      (:class:`WrongOwnerError`): fetch the table, then try once more;
    - ``"proxy"``: send it through a node instead (a node coordinates with its own
      table and stamps the version): an owner refused the client's version
      (:class:`ClockSkewError`), the partition is moving (:class:`NotReadyError`), the
      node does not know ``W_PUT`` (an older version), or too few owners answered;
    - or it raises what a node would raise for the same ``SET`` through it: no
      ``write`` scope, a key or value over the limits.

    :meth:`hints` lists the ``W_HINT`` s to send once it is ``"ok"``: each owner that
    could not be reached (or gave no answer), to the first owner that took it.
    """

    __slots__ = (
        "acks",
        "addresses",
        "errors",
        "ids",
        "outstanding",
        "payload",
        "required",
        "results",
    )

    def __init__(
        self,
        addresses: tuple[str, ...],
        ids: tuple[str, ...],
        required: int,
        payload: list[Any],
    ) -> None:
        self.addresses = addresses
        self.ids = ids
        self.required = required
        #: ``W_PUT [key, value, ts, origin, expire_at, false, owners_tag]``
        self.payload = payload
        self.acks = 0
        #: owner address -> its answer, in arrival order
        self.results: dict[str, Any] = {}
        #: owner address -> why it did not take the write
        self.errors: dict[str, BaseException] = {}
        self.outstanding = 0

    @property
    def decided(self) -> bool:
        return self.acks >= self.required or self.outstanding == 0

    def start(self, is_down: Callable[[str], bool]) -> list[str]:
        """The owners to send the write to now (those not set aside; each set aside
        is failed at once, and gets a hint if the write succeeds)."""
        send = []
        for address in self.addresses:
            if is_down(address):
                self.errors[address] = NodeUnavailableError(f"{address}: set aside")
            else:
                send.append(address)
        self.outstanding = len(send)
        return send

    def answer(self, address: str, raw: Any, exc: BaseException | None) -> None:
        """Record ``address``'s answer (``[applied, clock, stale]``) or its failure."""
        self.outstanding -= 1
        if exc is None and (
            type(raw) is not list or len(raw) not in (2, 3) or type(raw[1]) is not int
        ):
            exc = ProtocolError(f"malformed W_PUT answer: {raw!r:.100}")
        if exc is not None:
            self.errors[address] = exc
            return
        self.results[address] = raw
        self.acks += 1

    def outcome(self) -> str:
        """What to do now that it is decided (see the class docstring).

        :raises PermissionDeniedError: the client's token lacks the ``write`` scope.
        :raises UsageError: the key or the value is refused (over a limit).
        """
        stale = False
        proxy = False
        for exc in self.errors.values():
            if isinstance(exc, PermissionDeniedError | UsageError):
                raise exc
            if isinstance(exc, WrongOwnerError):
                stale = True
            elif isinstance(exc, ClockSkewError | NotReadyError | ProtocolError):
                proxy = True
        if stale:
            return DIRECT_STALE
        if proxy or self.acks < self.required:
            return DIRECT_PROXY
        return DIRECT_OK

    def hints(self) -> list[tuple[str, list[Any]]]:
        """``(address, W_HINT payload)`` for each owner that could not be reached or
        gave no answer, sent to the first owner that took the write."""
        if not self.results:
            return []
        via = next(iter(self.results))
        out = []
        for address, exc in self.errors.items():
            if isinstance(exc, NodeUnavailableError | RequestTimeoutError):
                target = self.ids[self.addresses.index(address)]
                out.append((via, [target, *self.payload]))
        return out


#: Where a client looks for the cluster when given no seeds.
DEFAULT_SEEDS: Final = "127.0.0.1:7400"


class ClientArgs(TypedDict, total=False):
    """The keyword arguments of both clients but their own (see
    :class:`~hypercache.Client` for each)."""

    cluster_name: str
    auth_token: str | None
    timeout: float
    connect_timeout: float
    consistency: Level
    serializer: Serializer | None
    compression: Compression | str | bool | None
    route: str
    write_path: str
    limits: Limits | None
    topology_refresh: float
    ssl: SslArg


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientOptions:
    """Validated settings shared by :class:`~hypercache.client.Client` and
    :class:`~hypercache.client.AsyncClient` (see their docstrings for each field)."""

    seeds: tuple[str, ...]
    cluster_name: str = "hypercache"
    auth_token: str | None = None
    timeout: float = 2.0
    connect_timeout: float = 1.0
    consistency: str | None = None
    serializer: Serializer = field(default_factory=lambda: resolve_serializer(None))
    compression: Compression | None = DEFAULT_COMPRESSION
    route: Route = "owner"
    #: "direct": writes stamped by the client and sent to every owner; "proxy": a node
    write_path: WritePath = "direct"
    limits: Limits = field(default_factory=Limits)
    topology_refresh: float = 30.0
    #: longest pause between two probes of a node set aside (s)
    retry_down_after: float = 1.0
    #: TLS context of the connections to the nodes (None: plaintext)
    ssl: _ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if type(self.cluster_name) is not str or not self.cluster_name:
            raise ConfigError("cluster_name", "must be a non-empty string")
        if self.auth_token is not None and type(self.auth_token) is not str:
            raise ConfigError("auth_token", "must be a string or None")
        for name in ("timeout", "connect_timeout", "topology_refresh", "retry_down_after"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (value > 0 and math.isfinite(value))
            ):
                raise ConfigError(name, f"must be a positive number of seconds, got {value!r}")
        if self.route not in ("owner", "any"):
            raise ConfigError("route", f"expected 'owner' or 'any', got {self.route!r}")
        if self.write_path not in ("direct", "proxy"):
            raise ConfigError(
                "write_path", f"expected 'direct' or 'proxy', got {self.write_path!r}"
            )
        if self.compression is not None and not isinstance(self.compression, Compression):
            raise ConfigError(
                "compression", f"must be a Compression or None, got {self.compression!r}"
            )
        if not isinstance(self.limits, Limits):
            raise ConfigError("limits", f"must be a Limits, got {type(self.limits).__name__}")
        if self.ssl is not None and not isinstance(self.ssl, _ssl.SSLContext):
            raise ConfigError("ssl", f"must be an ssl.SSLContext, got {type(self.ssl).__name__}")

    @classmethod
    def build(cls, seeds: str | Sequence[str], **options: Unpack[ClientArgs]) -> ClientOptions:
        """Validate the constructor arguments of a client (those not given take the
        defaults above)."""
        given: dict[str, Any] = dict(options)
        if "consistency" in given:
            level = given["consistency"]
            given["consistency"] = None if level is None else Consistency.parse(level).value
        if "serializer" in given:
            given["serializer"] = resolve_serializer(given["serializer"])
        if "compression" in given:
            given["compression"] = resolve_compression(given["compression"])
        if "limits" in given and given["limits"] is None:
            given["limits"] = Limits()
        if "ssl" in given:
            given["ssl"] = resolve_client_ssl(given["ssl"])
        return cls(seeds=parse_seeds(seeds, required=True), **given)

    def hello(self) -> dict[str, Any]:
        """The HELLO payload of a client connection."""
        # Every client reads compressed values, whatever its own setting: it says so,
        # and a node then answers them as stored (docs/protocol.md, "Features").
        # It also takes SET answered with the version's timestamp (a client that
        # stamps its own writes moves its clock past the nodes' stamps).
        return make_hello(
            self.cluster_name,
            auth=self.auth_token,
            features=(FEATURE_COMPRESSION, FEATURE_SET_VERSION),
        )


@dataclass(slots=True)
class ClientStats:
    """Counters of one client (they only grow).

    :ivar requests: operations sent (a ``get_many`` of n keys counts n).
    :ivar failovers: times an operation moved on to another node after one failed.
    :ivar nodes_marked_down: times a node in use was set aside because it could not
        be reached (connection refused or failed, or lost).
    :ivar nodes_suspected: times a node in use was set aside because a request to it
        got no answer within ``timeout``.
    :ivar nodes_recovered: times a node set aside answered again (a probe's ``PING``
        or another request) and was used again.
    :ivar probes: ``PING`` probes sent to nodes set aside (connecting included).
    :ivar stale_table_reads: owner reads sent through a node instead because an owner
        answered that the partition moved (not ready yet, or handed over); each marks
        the table for a fetch.
    :ivar probes_failed: probes that got no answer (timed out, refused, failed).
    :ivar topology_refreshes: partition tables fetched.
    :ivar topology_errors: table fetches that failed.
    :ivar connections_opened: connections made to nodes.
    :ivar owner_reads: reads the client coordinated itself (``R_GET`` to the owners).
    :ivar read_repairs: ``R_PUT`` pushes of the newest version to a stale owner,
        sent by the client after a read whose owners disagreed.
    :ivar read_repairs_dropped: pushes not sent because ``max_pending_repairs`` were
        in flight already.
    :ivar direct_writes: writes the client stamped and sent to the owners itself
        (``W_PUT``, ``write_path="direct"``) that reached their level.
    :ivar direct_write_fallbacks: direct writes sent through a node instead (the
        owners refused the client's version, a partition moving, too few owners
        reached, a table still stale after a fetch).
    :ivar stale_table_writes: direct writes an owner refused for a stale owner list
        (the client fetches the table, then tries again once), or took while saying
        the list is stale (the table is fetched again soon).
    :ivar write_hints: ``W_HINT`` s sent: a direct write for an owner that could not
        be reached, handed to an owner that took it.
    :ivar pool_waits: (``Client``) times a thread found ``max_connections_per_node``
        connections to a node in use and waited for one.
    :ivar pool_timeouts: (``Client``) waits for a connection that ran out after
        ``timeout`` (the request raised ``RequestTimeoutError``, unsent).
    """

    requests: int = 0
    failovers: int = 0
    nodes_marked_down: int = 0
    nodes_suspected: int = 0
    nodes_recovered: int = 0
    probes: int = 0
    probes_failed: int = 0
    stale_table_reads: int = 0
    topology_refreshes: int = 0
    topology_errors: int = 0
    connections_opened: int = 0
    owner_reads: int = 0
    read_repairs: int = 0
    read_repairs_dropped: int = 0
    direct_writes: int = 0
    direct_write_fallbacks: int = 0
    stale_table_writes: int = 0
    write_hints: int = 0
    pool_waits: int = 0
    pool_timeouts: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: A read-repair push: the stale owner and the ``R_PUT`` payload.
Repair = tuple[str, list[Any]]


class ClientBase:
    """What :class:`~hypercache.Client` and :class:`~hypercache.AsyncClient` share:
    the validated options, the router and the counters, every step of an operation
    that does not wait (see the module docstring), and what happens to a node that
    fails. Each subclass adds its connections, and the I/O: ``_call`` (one request
    along a :class:`~hypercache.client.failover.Failover`), ``_run`` (any
    :class:`~hypercache.client.failover.Attempts`), ``_read`` (reads through
    :class:`OwnerRead`), batches, probes.

    **Node health.** A node is *set aside* when a request to it timed out locally
    (no answer within ``timeout``: the node is paused, overloaded or cut off; an
    error answer that happens to be a timeout proves it alive and does not count)
    or when it could not be reached (refused or failed connection, connection
    lost). Both are one mechanism: the router puts the node last in every order,
    so that no operation is sent to it while another candidate is left (reads ask
    the other owners, writes go to the next owner, which coordinates), and the
    client probes it in the background (:meth:`_start_probe`: one probe per node
    at a time, a ``PING`` with a deadline of ``min(timeout, PROBE_TIMEOUT)``,
    repeated after :func:`probe_delays`). The first answer from the node, to a
    probe or to any request, brings it back. Setting aside never fails a request
    by itself: when every candidate is aside, they are still tried, last."""

    #: read-repair pushes in flight at most (see ``MAX_PENDING_REPAIRS``)
    max_pending_repairs: int = MAX_PENDING_REPAIRS

    def __init__(
        self, seeds: str | Sequence[str] = DEFAULT_SEEDS, **options: Unpack[ClientArgs]
    ) -> None:
        opts = ClientOptions.build(seeds, **options)
        self.options = opts
        #: counters of this client
        self.stats = ClientStats()
        self._router = Router(opts.seeds, route=opts.route, topology_refresh=opts.topology_refresh)
        self._hello = opts.hello()
        self._limits = opts.limits
        self._timeout = opts.timeout
        self._default = opts.consistency
        # Values are compressed after serialisation and decompressed before it is
        # undone (hypercache.client.compression); reading decompresses whatever
        # this client's own setting. Writes are compressed once a node's HELLO
        # answer said it takes compressed values (_handshaken), never after one
        # said it does not.
        codec = self._codec = ValueCodec(opts.compression, opts.limits.max_value, negotiate=True)
        dumps, loads = opts.serializer.dumps, opts.serializer.loads
        encode, decode = codec.encode, codec.decode
        self._dumps: Callable[[Any], bytes] = lambda obj: encode(dumps(obj))
        self._loads: Callable[[bytes], Any] = lambda data: loads(decode(data))
        self._closed = False
        # Set once a node refused a read-repair push (nodes that check tokens take
        # R_PUT from peers only): no more pushes, anti-entropy repairs instead.
        self._repairs_refused = False
        # The client's hybrid logical clock, for the versions of its direct writes:
        # a random origin tag (two clients' versions never tie: docs/design.md,
        # "Client-stamped writes"), moved past every version and node clock seen.
        self._hlc = HLC(secrets.randbits(32), max_skew_ms=CLIENT_MAX_SKEW_MS)
        self._direct = opts.write_path == "direct" and opts.route == "owner"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def compressing(self) -> Compression | None:
        """How this client compresses the values it writes now: its ``compression``
        once the nodes it reached take compressed values (see
        :mod:`hypercache.client.compression`); None while it writes raw."""
        return self._codec.active

    def _pending(self, requests: Mapping[bytes, list[Any]]) -> bool:
        """Whether a value of these ``SET`` payloads is raw only because no node said
        yet that it takes compressed values (see :meth:`ValueCodec.pending`)."""
        pending = self._codec.pending
        return any(pending(payload[1]) for payload in requests.values())

    def _handshaken(self, conn: object) -> None:
        """A connection to a node is open: learn from its HELLO answer whether the
        node takes compressed values."""
        hello = getattr(conn, "peer_hello", None)
        if type(hello) is dict and hello:
            self._codec.learn(hello.get("features") or frozenset())

    def __repr__(self) -> str:
        seeds = ",".join(self.options.seeds)
        return f"{type(self).__name__}(seeds={seeds!r}, route={self.options.route!r})"

    # ------------------------------------------------------------------ requests

    def _begin(self) -> bool:
        """Start an operation: raise if the client is closed; return whether the
        partition table is due for a fetch (the caller fetches it, or starts to).

        :raises NodeUnavailableError: the client is closed.
        """
        if self._closed:
            raise self._closed_error()
        return self._router.needs_refresh(time.monotonic())

    def _check_open(self) -> None:
        """:raises NodeUnavailableError: the client is closed."""
        if self._closed:
            raise self._closed_error()

    @staticmethod
    def _closed_error() -> NodeUnavailableError:
        return NodeUnavailableError("the client is closed")

    def _encode(self, value: Any) -> bytes:
        data = self._dumps(value)
        self._limits.check_value(data)
        return data

    def _get_request(self, key: Key, consistency: Level) -> tuple[bytes, str | None]:
        """The wire key and level of a ``get``."""
        return normalize_key(key, self._limits), wire_consistency(consistency, self._default)

    def _get_many_request(
        self, keys: Iterable[Key], consistency: Level
    ) -> tuple[dict[bytes, list[Key]], str | None]:
        """The wire keys (each with the keys given for it) and level of a ``get_many``."""
        level = wire_consistency(consistency, self._default)
        return wire_keys(keys, self._limits), level

    def _set_request(
        self, key: Key, value: Any, ttl: float | None, consistency: Level
    ) -> tuple[bytes, list[Any]]:
        """The wire key and payload of a ``set``: ``SET [key, value, ttl_ms, level]``."""
        k = normalize_key(key, self._limits)
        return k, [
            k,
            self._encode(value),
            ttl_to_ms(ttl),
            wire_consistency(consistency, self._default),
        ]

    def _ttl_request(self, key: Key, consistency: Level) -> tuple[bytes, list[Any]]:
        """The wire key and payload of a ``ttl``: ``TTL [key, level]``."""
        k = normalize_key(key, self._limits)
        return k, [k, wire_consistency(consistency, self._default)]

    def _expire_request(
        self, key: Key, ttl: float | None, consistency: Level
    ) -> tuple[bytes, list[Any]]:
        """The wire key and payload of an ``expire``: ``EXPIRE [key, ttl_ms, level]``."""
        k = normalize_key(key, self._limits)
        return k, [k, ttl_to_ms(ttl), wire_consistency(consistency, self._default)]

    def _scan_request(
        self, pattern: str | bytes | None, page_size: int
    ) -> tuple[bytes | None, KeyMatch | None, int]:
        """The ``SCAN`` prefix, the match of the rest of ``pattern``, and the page size."""
        prefix, match = scan_pattern(pattern, self._limits)
        page = check_count("page_size", page_size)
        assert page is not None
        return prefix, match, page

    def _scan_payload(self, cursor: bytes | None, page: int, prefix: bytes | None) -> list[Any]:
        return [cursor, page] if prefix is None else [cursor, page, prefix]

    def _check_listed(
        self, topology: Topology | None, listed: set[str], errors: Mapping[str, BaseException]
    ) -> None:
        """Raise unless the nodes listed cover what ``keys`` promises: with a table,
        an owner of every partition; without one (``route="any"``), some node."""
        if topology is None:
            if not listed:
                raise unreachable("SCAN", errors)
            return
        missing = uncovered_partitions(topology, listed)
        if missing:
            raise self._keys_error(missing, errors)

    @staticmethod
    def _flush_answer(result: object) -> int | HyperCacheError:
        """One node's FLUSH outcome: the count it dropped, or the error it answered
        (a lost connection or a bug is raised, not reported)."""
        if isinstance(result, HyperCacheError):
            return result
        if isinstance(result, BaseException):
            raise result
        try:
            return commands.FLUSH.read(result)
        except HyperCacheError as exc:
            return exc

    def _keys_error(
        self, uncovered: list[int], errors: Mapping[str, BaseException]
    ) -> HyperCacheError:
        """What ``keys`` raises when no owner of some partitions could be listed."""
        detail = "; ".join(f"{a}: {e}" for a, e in errors.items()) or "no node listed"
        return NodeUnavailableError(
            f"keys: no owner of {len(uncovered)} partition(s) could be listed, their keys "
            f"would be missing ({detail})"
        )

    def _delete_request(self, key: Key, consistency: Level) -> tuple[bytes, list[Any]]:
        """The wire key and payload of a ``delete``: ``DELETE [key, level]``."""
        k = normalize_key(key, self._limits)
        return k, [k, wire_consistency(consistency, self._default)]

    def _set_many_requests(
        self, mapping: Mapping[Key, Any], ttl: float | None, consistency: Level
    ) -> dict[bytes, list[Any]]:
        """The ``SET`` payload of each wire key of a ``set_many`` (of keys naming one
        entry, ``"k"`` and ``b"k"``, the last given wins)."""
        level = wire_consistency(consistency, self._default)
        ttl_ms = ttl_to_ms(ttl)
        limits, encode = self._limits, self._encode
        requests = {}
        for key, value in mapping.items():
            k = normalize_key(key, limits)
            requests[k] = [k, encode(value), ttl_ms, level]
        return requests

    # ------------------------------------------------------------------ answers

    def _value(self, key: Key, found: Found, default: Any) -> Any:
        """What ``get`` of ``key`` returns for ``found``.

        :raises UndecodableValueError: the serializer cannot decode the value.
        """
        if not found[0]:
            return default
        try:
            return self._loads(found[1])
        except ValueTooLargeError:
            raise  # a compressed value past max_value (a bomb): not the serializer's
        except Exception as exc:
            raise self._undecodable(key, found[1], exc) from exc

    def _undecodable(self, key: Key, data: bytes, exc: Exception) -> UndecodableValueError:
        return UndecodableValueError(key, len(data), self.options.serializer, exc)

    def _get_many_result(
        self,
        wire: dict[bytes, list[Key]],
        results: Iterable[tuple[bytes, Found | BaseException]],
    ) -> dict[Key, Any]:
        """``{key: value}`` of a ``get_many``: the hits, keyed by every key given for
        their wire key (each value decoded once).

        :raises BaseException: the first error among ``results``, once all are seen.
        """
        out: dict[Key, Any] = {}
        first_error: BaseException | None = None
        loads = self._loads
        for k, result in results:
            if isinstance(result, BaseException):
                first_error = first_error or result
                continue
            found, value = result
            if found:
                try:
                    loaded = loads(value)
                except Exception as exc:
                    raise self._undecodable(wire[k][0], value, exc) from exc
                for key in wire[k]:
                    out[key] = loaded
        if first_error is not None:
            raise first_error
        return out

    # ------------------------------------------------------------------ direct writes

    def _observe(self, ts: int) -> None:
        """Move the client's clock past ``ts`` (a version or a node's clock seen in an
        answer); one too far ahead is ignored (see :data:`CLIENT_MAX_SKEW_MS`)."""
        hlc = self._hlc
        if ts > hlc.last and hlc.admits(ts):
            hlc.update(ts)

    def _direct_write(self, key: bytes, payload: list[Any]) -> DirectWrite | None:
        """The direct write of a ``SET`` payload (``[key, value, ttl_ms, level]``) to
        the key's owners, stamped now and counted; ``None`` when the client does not
        know the table or the level (the write then goes through a node)."""
        router = self._router
        topology = router.topology
        if topology is None or not router.by_owner:
            return None
        addresses, ids, tag = topology.write_owners(key)
        required = router.write_required(payload[3], len(addresses))
        if required is None:
            return None
        ttl_ms = payload[2]
        expire_at = 0 if ttl_ms is None else wall_ms() + ttl_ms
        hlc = self._hlc
        wire = [key, payload[1], hlc.now(), hlc.tag, expire_at, False, tag]
        self.stats.requests += 1
        return DirectWrite(addresses, ids, required, wire)

    def _direct_outcome(self, wr: DirectWrite) -> str:
        """:meth:`DirectWrite.outcome`, counted; the clocks of the answers observed."""
        stats = self.stats
        stale = False
        for raw in wr.results.values():
            self._observe(raw[1])
            stale = stale or (len(raw) > 2 and raw[2] is True)
        if stale:
            # An owner took the write but its ring names other owners: the table
            # moved under this client; it fetches a new one before long.
            stats.stale_table_writes += 1
            self._router.mark_stale(time.monotonic())
        outcome = wr.outcome()
        if outcome == DIRECT_OK:
            stats.direct_writes += 1
        else:
            stats.requests -= 1  # counted again on the next try
            if outcome == DIRECT_STALE:
                stats.stale_table_writes += 1
        return outcome

    def _stale_refetch_due(self) -> bool:
        """Whether a stale write should fetch the table (not when another request
        fetched it just now: it tries again with that one)."""
        return time.monotonic() - self._router.fetched_at > 0.05

    # ------------------------------------------------------------------ owner reads

    def _owner_read(self, key: bytes, level: str | None) -> OwnerRead | None:
        """The read of ``key`` from its owners (``R_GET``, counted), or ``None`` when
        the client does not know the table or the level: the read then goes through
        a node (``GET``, the proxy path)."""
        router = self._router
        owners = router.read_owners(key)
        if owners is None:
            return None
        required = router.read_required(level, len(owners))
        if required is None:
            return None
        stats = self.stats
        stats.requests += 1
        stats.owner_reads += 1
        return OwnerRead(key, owners, required, level or router.read_default)

    def _owner_answer(
        self, rd: OwnerRead, address: str, raw: Any, exc: HyperCacheError | None
    ) -> str | None:
        """Record the answer ``raw`` (or the failure ``exc``) of ``address`` to ``rd``;
        return the owner to ask in its place, if any (counted as a failover)."""
        nxt = rd.ok(address, raw) if exc is None else rd.failed(address, exc)
        if nxt is not None:
            self.stats.failovers += 1
        return nxt

    def _owner_outcome(self, rd: OwnerRead) -> tuple[Found, list[Repair]] | None:
        """What the done ``rd`` found, and the read repairs to push; ``None`` when no
        owner could be reached (maybe the table is wrong for this client; any node
        that answers can still coordinate the read: the caller sends a ``GET``).

        :raises QuorumError: too few owners answered.
        """
        if rd.unreachable:
            self.stats.requests -= 1  # counted again on the proxy path
            return None
        if rd.error() is not None and any(
            isinstance(why, NotReadyError | WrongOwnerError) for why in rd.errors.values()
        ):
            # The table moved under this client (an owner still receiving the
            # partition, or one that handed it over): a node coordinates the read
            # with its own table, asking a previous owner in a not-ready one's place,
            # and the client fetches the new table.
            self._router.mark_stale(time.monotonic())
            self.stats.requests -= 1
            self.stats.stale_table_reads += 1
            return None
        best, stale = rd.outcome()
        if best is not None and self._direct:
            self._observe(best[1])
        found = (True, best[0]) if best is not None and is_live(best, wall_ms()) else MISS
        if not stale:  # the owners agree: the common case
            return found, []
        return found, [(owner, [rd.key, *entry]) for owner, entry in stale]

    # ------------------------------------------------------------------ node health

    def _start_probe(self, address: str) -> None:
        """Probe ``address``, set aside, in the background until it answers (or the
        client closes); no-op when a probe of it is running already."""
        raise NotImplementedError

    @property
    def _probe_timeout(self) -> float:
        return min(self._timeout, PROBE_TIMEOUT)

    def _probe_delays(self) -> Iterator[float]:
        """The pauses between the probes of one node (see :func:`probe_delays`)."""
        return probe_delays(self.options.retry_down_after)

    def _node_down(self, address: str) -> None:
        """``address`` could not be reached: set it aside and probe it."""
        if self._router.mark_down(address, time.monotonic()):
            self.stats.nodes_marked_down += 1
            self._start_probe(address)

    def _suspect(self, address: str) -> None:
        """A request to ``address`` got no answer in time: set it aside and probe it."""
        if self._router.mark_down(address, time.monotonic()):
            self.stats.nodes_suspected += 1
            self._start_probe(address)

    def _recovered(self, address: str) -> None:
        """``address`` answered: use it again if it was set aside."""
        if self._router.mark_up(address):
            self.stats.nodes_recovered += 1
