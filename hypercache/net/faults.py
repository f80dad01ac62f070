"""Fault injection: a transport wrapper that drops, delays and partitions messages.

:class:`FaultyTransport` wraps another transport (TCP on a node started with
``--fault-injection``, an :class:`~hypercache.net.inproc.InprocNetwork` in tests)
and hands out connections whose messages pass through a :class:`FaultInjector`:

* **where**: faults act on the connections this node opens (to its peers), on both
  of their messages: the request going *out* and the answer coming back *in*. A
  peer's own requests to this node are governed by the peer's injector, so a rule
  set posted to every node (what the chaos tests do) covers every message between
  them. The server side and client connections to this node are untouched.
* **drop**: a dropped request is never sent and a dropped answer is never
  delivered; either way the caller sees what a lost message looks like, silence,
  then :class:`~hypercache.errors.NoAnswerError` at its deadline (a dropped
  request is never applied; a dropped answer was).
* **delay**: the message goes (or is delivered) ``delay + uniform(0, jitter)``
  seconds late; past the request's deadline it counts as lost.
* **partition**: ``groups`` of node names; every message between this node and a
  peer of another group is dropped, and new connections to such a peer fail at
  their deadline as if no HELLO answer came.

Peers and this node are named by node id or by address (either matches). Every
fault that fires is counted in :attr:`FaultInjector.injected` by kind (the node
exports it as ``hypercache_dist_faults_injected_total{kind}``).

A rule set is JSON-shaped (what ``POST /internal/faults`` takes)::

    {"seed": 7, "rules": [
        {"kind": "drop", "rate": 0.1, "direction": "both"},
        {"kind": "delay", "delay_ms": 200, "jitter_ms": 20, "peers": ["node-3"]},
        {"kind": "partition", "groups": [["node-1"], ["node-2", "node-3"]]}]}

``direction`` is ``out``, ``in`` or ``both`` (default); ``peers`` (default: all)
names the peers a drop or delay applies to; ``rate`` (0..1, default 1) is the
fraction of those messages dropped or delayed.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from hypercache.errors import ConfigError, HyperCacheError, NoAnswerError, NodeUnavailableError
from hypercache.net.protocol import Limits
from hypercache.net.transport import (
    DEFAULT_CONNECT_TIMEOUT,
    Connection,
    Handler,
    NetStats,
    Outcome,
    Server,
    ServerOptions,
    Transport,
)

__all__ = [
    "DIRECTIONS",
    "FAULT_KINDS",
    "FaultInjector",
    "FaultRule",
    "FaultyConnection",
    "FaultyTransport",
    "parse_rules",
]

#: Kinds of fault (the ``kind`` label of the counter).
FAULT_KINDS: Final = ("drop", "delay", "partition")
#: Directions of a message, seen from this node.
DIRECTIONS: Final = ("out", "in", "both")
#: The largest delay a rule may ask for, seconds.
MAX_DELAY: Final = 60.0
#: Rules in one rule set at most.
MAX_RULES: Final = 64

_DROP: Final = -1.0  # a fate: the message is lost (else: seconds of delay, 0 = none)


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultRule:
    """One fault (see the module docstring for the JSON form).

    :param kind: ``drop``, ``delay`` or ``partition``.
    :param direction: ``out`` (requests sent), ``in`` (answers received) or ``both``.
    :param peers: names (node ids or addresses) of the peers it applies to;
        ``None`` = every peer. Not for partitions.
    :param rate: fraction of the matching messages dropped or delayed, 0..1.
    :param delay: seconds added to a delayed message.
    :param jitter: at most this many seconds more, uniformly drawn.
    :param groups: a partition's node sets: messages between two groups are lost.
    """

    kind: str
    direction: str = "both"
    peers: frozenset[str] | None = None
    rate: float = 1.0
    delay: float = 0.0
    jitter: float = 0.0
    groups: tuple[frozenset[str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ConfigError(
                "kind", f"expected one of {', '.join(FAULT_KINDS)}, got {self.kind!r}"
            )
        if self.direction not in DIRECTIONS:
            raise ConfigError(
                "direction", f"expected one of {', '.join(DIRECTIONS)}, got {self.direction!r}"
            )
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError("rate", f"must be between 0 and 1, got {self.rate!r}")
        for name in ("delay", "jitter"):
            value = getattr(self, name)
            if not 0.0 <= value <= MAX_DELAY:
                raise ConfigError(f"{name}_ms", f"must be between 0 and {MAX_DELAY * 1000:g} ms")
        if self.kind == "partition":
            if len(self.groups) < 2 or not all(self.groups):
                raise ConfigError("groups", "a partition needs at least two non-empty node sets")
            if self.peers is not None:
                raise ConfigError("peers", "a partition names its sides in groups, not peers")
        elif self.groups:
            raise ConfigError("groups", f"only a partition has groups, not a {self.kind}")
        if self.kind == "delay" and self.delay == 0.0 and self.jitter == 0.0:
            raise ConfigError("delay_ms", "a delay needs delay_ms or jitter_ms above 0")

    def applies(self, names: Iterable[str], direction: str) -> bool:
        """Whether a drop or a delay rule matches a message to/from the peer ``names``."""
        if self.direction != "both" and self.direction != direction:
            return False
        peers = self.peers
        return peers is None or not peers.isdisjoint(names)

    def splits(self, local: frozenset[str], names: frozenset[str]) -> bool:
        """Whether this partition separates this node (``local``) from the peer."""
        mine = theirs = -1
        for i, group in enumerate(self.groups):
            if not group.isdisjoint(local):
                mine = i
            if not group.isdisjoint(names):
                theirs = i
        return mine >= 0 and theirs >= 0 and mine != theirs

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (what :func:`parse_rules` reads back)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "partition":
            out["groups"] = [sorted(g) for g in self.groups]
            return out
        out["direction"] = self.direction
        if self.peers is not None:
            out["peers"] = sorted(self.peers)
        out["rate"] = self.rate
        if self.kind == "delay":
            out["delay_ms"] = self.delay * 1000
            out["jitter_ms"] = self.jitter * 1000
        return out


def _number(raw: Mapping[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ConfigError(name, f"expected a number, got {value!r}")
    return float(value)


def _names(raw: Any, field_name: str) -> frozenset[str]:
    if not isinstance(raw, list) or not all(type(n) is str and n for n in raw):
        raise ConfigError(field_name, f"expected a list of node ids or addresses, got {raw!r}")
    return frozenset(raw)


def _rule(raw: Any) -> FaultRule:
    if not isinstance(raw, dict):
        raise ConfigError("rules", f"each rule is an object, got {raw!r}")
    known = {"kind", "direction", "peers", "rate", "delay_ms", "jitter_ms", "groups"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(unknown[0], f"unknown field of a fault rule (known: {sorted(known)})")
    kind = raw.get("kind")
    if type(kind) is not str:
        raise ConfigError("kind", f"expected one of {', '.join(FAULT_KINDS)}, got {kind!r}")
    direction = raw.get("direction", "both")
    if type(direction) is not str:
        raise ConfigError("direction", f"expected one of {', '.join(DIRECTIONS)}")
    peers = raw.get("peers")
    groups = raw.get("groups", [])
    if not isinstance(groups, list):
        raise ConfigError("groups", f"expected a list of lists of node names, got {groups!r}")
    return FaultRule(
        kind=kind,
        direction=direction,
        peers=None if peers is None else _names(peers, "peers"),
        rate=_number(raw, "rate", 1.0),
        delay=_number(raw, "delay_ms", 0.0) / 1000,
        jitter=_number(raw, "jitter_ms", 0.0) / 1000,
        groups=tuple(_names(g, "groups") for g in groups),
    )


def parse_rules(raw: Any) -> tuple[tuple[FaultRule, ...], int | None]:
    """Read a JSON rule set ``{"rules": [...], "seed": N}``: its rules and seed.

    :raises ConfigError: naming the field that is wrong.
    """
    if not isinstance(raw, dict):
        raise ConfigError("rules", f"expected an object with a 'rules' list, got {raw!r}")
    unknown = sorted(set(raw) - {"rules", "seed"})
    if unknown:
        raise ConfigError(unknown[0], "unknown field of a rule set (known: rules, seed)")
    rules = raw.get("rules")
    if not isinstance(rules, list):
        raise ConfigError("rules", f"expected a list of rules, got {rules!r}")
    if len(rules) > MAX_RULES:
        raise ConfigError("rules", f"at most {MAX_RULES} rules, got {len(rules)}")
    seed = raw.get("seed")
    if seed is not None and type(seed) is not int:
        raise ConfigError("seed", f"expected an integer, got {seed!r}")
    return tuple(_rule(r) for r in rules), seed


@dataclass(slots=True)
class FaultInjector:
    """The rule set of one node, and the counters of the faults it injected.

    :ivar local: this node's names (node id, address), for partitions; the node
        sets it once it knows its bound address.
    :ivar injected: ``{kind: faults fired}``, every kind of :data:`FAULT_KINDS`.
    """

    local: frozenset[str] = frozenset()
    rules: tuple[FaultRule, ...] = ()
    seed: int | None = None
    injected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 0))
    _rng: random.Random = field(default_factory=random.Random)

    def set_rules(self, rules: Iterable[FaultRule], seed: int | None = None) -> None:
        """Replace the rule set (an empty one clears it); ``seed`` reseeds the draws."""
        self.rules = tuple(rules)
        self.seed = seed
        if seed is not None:
            self._rng.seed(seed)

    def load(self, raw: Any) -> None:
        """Replace the rule set by a JSON one (see :func:`parse_rules`).

        :raises ConfigError: the rule set is invalid (the current one stays).
        """
        rules, seed = parse_rules(raw)
        self.set_rules(rules, seed)

    def clear(self) -> None:
        self.set_rules(())

    def as_dict(self) -> dict[str, Any]:
        """``GET /internal/faults``: the rules, the seed and the counters."""
        return {
            "rules": [rule.as_dict() for rule in self.rules],
            "seed": self.seed,
            "injected": dict(self.injected),
            "local": sorted(self.local),
        }

    def partitioned(self, names: frozenset[str]) -> bool:
        """Whether a partition rule separates this node from the peer ``names``."""
        local = self.local
        return any(r.kind == "partition" and r.splits(local, names) for r in self.rules)

    def fate(self, names: frozenset[str], direction: str) -> float:
        """What happens to one message to (``out``) or from (``in``) the peer
        ``names``: ``-1`` lost, else the seconds it is held back (0: none).
        Each fault that fires is counted."""
        rules = self.rules
        if not rules:
            return 0.0
        delay = 0.0
        injected = self.injected
        rng = self._rng
        for rule in rules:
            kind = rule.kind
            if kind == "partition":
                if rule.splits(self.local, names):
                    injected["partition"] += 1
                    return _DROP
            elif rule.applies(names, direction) and (rule.rate >= 1.0 or rng.random() < rule.rate):
                if kind == "drop":
                    injected["drop"] += 1
                    return _DROP
                injected["delay"] += 1
                delay += rule.delay + (rng.uniform(0.0, rule.jitter) if rule.jitter else 0.0)
        return delay


class FaultyConnection:
    """A :class:`~hypercache.net.transport.Connection` whose messages pass through
    a :class:`FaultInjector` (requests ``out``, answers ``in``)."""

    def __init__(self, inner: Connection, injector: FaultInjector) -> None:
        self.inner = inner
        self.injector = injector
        # (the inner connection's own objects: its counters count these requests)
        self.peer_hello: dict[str, Any] = inner.peer_hello
        self.address: str = inner.address
        self.stats: NetStats = inner.stats
        node_id = inner.peer_hello.get("node_id")
        names = {inner.address}
        if type(node_id) is str:
            names.add(node_id)
        #: the peer's names (address, node id) that rules match
        self.names = frozenset(names)
        self._loop = asyncio.get_running_loop()
        # requests held by a fault (dropped, delayed): id -> (timer, callback)
        self._held: dict[int, tuple[asyncio.TimerHandle, Outcome]] = {}
        self._ids = itertools.count()

    # -- Connection attributes, the inner connection's

    @property
    def busy_poll(self) -> float:
        return self.inner.busy_poll

    @busy_poll.setter
    def busy_poll(self, value: float) -> None:
        self.inner.busy_poll = value

    @property
    def closed(self) -> bool:
        return self.inner.closed

    @property
    def pending(self) -> int:
        return self.inner.pending + len(self._held)

    # -- requests

    def _hold(self, seconds: float, callback: Outcome, fire: Any, *args: Any) -> None:
        """Run ``fire(*args)`` in ``seconds``; until then the request counts as held
        (and fails with NodeUnavailableError if the connection closes first)."""
        hold_id = next(self._ids)

        def run() -> None:
            if self._held.pop(hold_id, None) is not None:
                fire(*args)

        self._held[hold_id] = (self._loop.call_later(max(seconds, 0.0), run), callback)

    def _lost(self, op: int, timeout: float) -> NoAnswerError:
        return NoAnswerError(f"{self.address}: op {op} got no answer within {timeout}s")

    def send_callback(
        self,
        op: int,
        payload: Any,
        timeout: float,
        callback: Outcome,
        trace: dict[str, str] | None = None,
    ) -> None:
        if self.inner.closed:
            raise NodeUnavailableError(f"{self.address}: connection closed")
        loop = self._loop
        injector = self.injector
        deadline = loop.time() + timeout

        def timed_out() -> None:
            callback(None, self._lost(op, timeout))

        def answered(value: Any, error: BaseException | None) -> None:
            # A lost connection or the request's own deadline is no message.
            if isinstance(error, NodeUnavailableError | NoAnswerError):
                callback(value, error)
                return
            fate = injector.fate(self.names, "in")
            if fate == 0.0:
                callback(value, error)
            elif fate < 0.0 or loop.time() + fate >= deadline:
                self._hold(deadline - loop.time(), callback, timed_out)
            else:
                self._hold(fate, callback, callback, value, error)

        def send() -> None:
            try:
                self.inner.send_callback(op, payload, deadline - loop.time(), answered, trace)
            except HyperCacheError as exc:
                callback(None, exc)

        fate = injector.fate(self.names, "out")
        if fate == 0.0:
            self.inner.send_callback(op, payload, timeout, answered, trace)
        elif fate < 0.0 or fate >= timeout:
            self._hold(timeout, callback, timed_out)
        else:
            self._hold(fate, callback, send)

    def send(
        self, op: int, payload: Any, timeout: float, trace: dict[str, str] | None = None
    ) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if not fut.done():
                if error is None:
                    fut.set_result(value)
                else:
                    fut.set_exception(error)

        self.send_callback(op, payload, timeout, settle, trace)
        return fut

    async def request(
        self, op: int, payload: Any, timeout: float, trace: dict[str, str] | None = None
    ) -> Any:
        return await self.send(op, payload, timeout, trace)

    async def close(self) -> None:
        held, self._held = self._held, {}
        for timer, callback in held.values():
            timer.cancel()
            callback(None, NodeUnavailableError(f"{self.address}: connection closed"))
        await self.inner.close()


class FaultyTransport:
    """A :class:`~hypercache.net.transport.Transport` whose connections go through
    ``injector`` (servers are the inner transport's, untouched).

    :param inner: the transport that carries the messages.
    :param injector: the rules; a new, empty one by default.
    """

    def __init__(self, inner: Transport, injector: FaultInjector | None = None) -> None:
        self.inner = inner
        self.injector = injector if injector is not None else FaultInjector()

    def create_server(self, handler: Handler, address: str, options: ServerOptions) -> Server:
        return self.inner.create_server(handler, address, options)

    async def connect(
        self,
        address: str,
        hello: dict[str, Any],
        limits: Limits | None = None,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> FaultyConnection:
        """Connect through the inner transport; a peer on the other side of a
        partition (by address, or by node id once the HELLO answer names it) is
        not reached: the attempt fails at ``timeout``, as one whose HELLO got lost.

        :raises NodeUnavailableError: as the inner transport's, or partitioned.
        """
        injector = self.injector
        if injector.partitioned(frozenset((address,))):
            injector.injected["partition"] += 1
            await asyncio.sleep(timeout)
            raise NodeUnavailableError(f"{address}: no HELLO answer within {timeout}s")
        conn = FaultyConnection(await self.inner.connect(address, hello, limits, timeout), injector)
        if injector.partitioned(conn.names):
            injector.injected["partition"] += 1
            await conn.inner.close()
            raise NodeUnavailableError(f"{address}: no HELLO answer within {timeout}s")
        return conn


if TYPE_CHECKING:  # the classes above implement the interfaces of transport.py
    from hypercache.net.inproc import InprocNetwork

    _transport: Transport = FaultyTransport(InprocNetwork())
    _connection: Connection = FaultyConnection.__new__(FaultyConnection)
