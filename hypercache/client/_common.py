"""What the sync and async clients share: options, payloads, answers, counters.

The two clients differ only in how they wait (blocking sockets or asyncio); every
decision that does not wait lives here, written once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal

from hypercache.client.serializer import Serializer, resolve_serializer
from hypercache.client.topology import Router
from hypercache.consistency import Consistency
from hypercache.errors import ConfigError, NodeUnavailableError, ProtocolError
from hypercache.net.protocol import Limits, make_hello
from hypercache.net.transport import parse_address

__all__ = [
    "BATCH",
    "ClientOptions",
    "ClientStats",
    "Route",
    "decode_get",
    "parse_seeds",
    "ttl_to_ms",
    "unreachable",
    "wire_consistency",
]

Route = Literal["owner", "any"]

#: Requests sent in one pipelined batch (sync) or gathered at once (async) by
#: ``get_many``/``set_many``: bounds the buffers of a huge batch.
BATCH: Final = 1024


def parse_seeds(seeds: str | Sequence[str]) -> tuple[str, ...]:
    """Return the seed addresses of ``"h:p,h:p"`` or a sequence of ``"h:p"``, deduplicated.

    :raises ConfigError: no seed, or a malformed address (field ``seeds``).
    """
    items = seeds.split(",") if isinstance(seeds, str) else list(seeds)
    out: dict[str, None] = {}
    for item in items:
        if not isinstance(item, str):
            raise ConfigError("seeds", f"addresses must be strings, got {item!r}")
        text = item.strip()
        if not text:
            continue
        try:
            parse_address(text)
        except ConfigError as exc:
            raise ConfigError("seeds", exc.message) from None
        out[text] = None
    if not out:
        raise ConfigError("seeds", "at least one 'host:port' is required")
    return tuple(out)


def wire_consistency(value: Consistency | str | None, fallback: str | None) -> str | None:
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


def decode_get(answer: Any) -> tuple[bool, Any]:
    """Split a GET answer ``[found, value]``.

    :raises ProtocolError: the answer has another shape.
    """
    if type(answer) is not list or len(answer) != 2 or type(answer[0]) is not bool:
        raise ProtocolError(f"malformed GET answer: {answer!r:.200}")
    found, value = answer
    if found and not isinstance(value, bytes):
        raise ProtocolError(f"GET answer value must be bytes, got {type(value).__name__}")
    return found, value


def unreachable(what: str, errors: Mapping[str, BaseException]) -> NodeUnavailableError:
    """The error raised when no node could take a request."""
    if not errors:
        return NodeUnavailableError(f"{what}: no node to send to")
    parts = []
    for address, exc in errors.items():
        text = str(exc)
        parts.append(text if text.startswith(address) else f"{address}: {text}")
    detail = "; ".join(parts)
    return NodeUnavailableError(f"{what}: no node reachable ({detail})")


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
    route: Route = "owner"
    limits: Limits = field(default_factory=Limits)
    topology_refresh: float = 30.0
    retry_down_after: float = 1.0

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
        if not isinstance(self.limits, Limits):
            raise ConfigError("limits", f"must be a Limits, got {type(self.limits).__name__}")

    @classmethod
    def build(
        cls,
        seeds: str | Sequence[str],
        *,
        cluster_name: str,
        auth_token: str | None,
        timeout: float,
        connect_timeout: float,
        consistency: Consistency | str | None,
        serializer: Serializer | None,
        route: str,
        limits: Limits | None,
        topology_refresh: float,
    ) -> ClientOptions:
        """Validate the constructor arguments of a client."""
        level = None if consistency is None else Consistency.parse(consistency).value
        if route not in ("owner", "any"):
            raise ConfigError("route", f"expected 'owner' or 'any', got {route!r}")
        return cls(
            seeds=parse_seeds(seeds),
            cluster_name=cluster_name,
            auth_token=auth_token,
            timeout=timeout,
            connect_timeout=connect_timeout,
            consistency=level,
            serializer=resolve_serializer(serializer),
            route="owner" if route == "owner" else "any",
            limits=Limits() if limits is None else limits,
            topology_refresh=topology_refresh,
        )

    def hello(self) -> dict[str, Any]:
        """The HELLO payload of a client connection."""
        return make_hello(self.cluster_name, auth=self.auth_token)


@dataclass(slots=True)
class ClientStats:
    """Counters of one client (they only grow).

    :ivar requests: operations sent (a ``get_many`` of n keys counts n).
    :ivar failovers: times an operation moved on to another node after one failed.
    :ivar nodes_marked_down: times a node was found unreachable.
    :ivar topology_refreshes: partition tables fetched.
    :ivar topology_errors: table fetches that failed.
    :ivar connections_opened: connections made to nodes.
    """

    requests: int = 0
    failovers: int = 0
    nodes_marked_down: int = 0
    topology_refreshes: int = 0
    topology_errors: int = 0
    connections_opened: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ClientBase:
    """What :class:`~hypercache.Client` and :class:`~hypercache.AsyncClient` share:
    the constructor, validated options, the router and the counters. Each
    subclass sets up its own connections in :meth:`_init_transport`."""

    def __init__(
        self,
        seeds: str | Sequence[str] = "127.0.0.1:7400",
        *,
        cluster_name: str = "hypercache",
        auth_token: str | None = None,
        timeout: float = 2.0,
        connect_timeout: float = 1.0,
        consistency: Consistency | str | None = None,
        serializer: Serializer | None = None,
        route: str = "owner",
        limits: Limits | None = None,
        topology_refresh: float = 30.0,
    ) -> None:
        options = ClientOptions.build(
            seeds,
            cluster_name=cluster_name,
            auth_token=auth_token,
            timeout=timeout,
            connect_timeout=connect_timeout,
            consistency=consistency,
            serializer=serializer,
            route=route,
            limits=limits,
            topology_refresh=topology_refresh,
        )
        self.options = options
        #: counters of this client
        self.stats = ClientStats()
        self._router = Router(
            options.seeds,
            route=options.route,
            topology_refresh=options.topology_refresh,
            retry_down_after=options.retry_down_after,
        )
        self._hello = options.hello()
        self._limits = options.limits
        self._timeout = options.timeout
        self._default = options.consistency
        self._dumps = options.serializer.dumps
        self._loads = options.serializer.loads
        self._closed = False
        self._init_transport()

    def _init_transport(self) -> None:
        raise NotImplementedError
