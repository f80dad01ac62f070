"""Membership: who is in the cluster, how to reach them, who is up (SWIM over the wire).

The state machine is :class:`~hypercache.cluster.swim.Swim` (states, incarnations,
precedence, suspicion, gossip, the membership version: read its docstring);
:class:`Membership` runs it: it moves its messages over peer connections, confirms
the members it is told of, and tells the node what changed.

The interface the node and its collaborators use
------------------------------------------------
* :meth:`Membership.ring_members` — ``[(node_id, address), ...]`` sorted by id, the
  members in the ring (alive, suspect, dead; not left nor removed), this node
  included; :meth:`~Membership.member_list` is the same as lists (TOPOLOGY,
  ``/cluster/members``).
* ``on_change(ring_members)`` (constructor) — called whenever that list changes (a
  member joins, moves, leaves or is removed): the node rebuilds its ring.
* :attr:`Membership.liveness_listeners` — ``(node_id, up)`` when a member becomes
  alive (``up``) or stops being alive: suspect and dead members are not up, so
  coordinators do not wait on them.
* :attr:`Membership.restart_listeners` — ``(node_id)`` when a member came back in a
  new life (in memory, empty: it needs its partitions again).
* :attr:`Membership.peers` — ``{node_id: Peer}`` of the other ring members, each
  with its :class:`~hypercache.net.peer.PeerConnection` and an ``up`` flag.
* :meth:`~Membership.is_up`, :meth:`~Membership.up_count`,
  :meth:`~Membership.state_of`, :meth:`~Membership.hintable`,
  :attr:`~Membership.version`, :meth:`~Membership.member_table` (reports).
* ``await`` :meth:`~Membership.leave` — announce ``left`` (incarnation + 1) and wait
  until a few peers took it, or ``leave_timeout``.
* :meth:`~Membership.remove` — take a dead (or suspect) member out of the ring;
  with ``dead_removal_timeout`` a member dead that long is removed by itself.
* The handlers of ``PING`` (:meth:`~Membership.on_ping`), ``PING_REQ``
  (:meth:`~Membership.on_ping_req`) and ``MEMBERS`` (:meth:`~Membership.on_members`).

The wire
--------
``PING {"gossip": [record, ...]}`` is a probe, answered ``{"gossip": [...]}``: both
carry the sender's piggy-backed records (``record = [node_id, address, incarnation,
state, boot]``). A ``PING`` from a client, or without ``gossip``, answers ``"pong"``.
``PING_REQ [target, gossip, timeout_ms]`` asks for an indirect probe, answered
``{"ack": bool, "gossip": [...]}`` once the target answered or did not in time (at
most :data:`MAX_PENDING_INDIRECT` run at once; past that the answer is a nack at
once, counted in ``indirect_refused``). ``MEMBERS {"table": [record, ...]}`` is a
push-pull: the receiver merges the table and answers its own. Every
:data:`PUSH_PULL_ROUNDS` periods a node push-pulls with one random alive member, and
at once with every member it admits (that is how a newcomer learns the whole table).

Timing: one probe per ``heartbeat_interval``; the direct ack is awaited half a period
before helpers are asked (at once when the ping failed outright, e.g. connection
refused); the probe's deadline is ``failure_timeout`` from its start (the direct
ping stays answerable until then). So a silent member is suspected about
``failure_timeout`` after its probe starts and dead ``suspect_timeout`` later, while a
member whose port refuses connections is suspected within a period of being probed.

Joining: every HELLO a node sends or answers carries, in its ``info`` map, the node's
id, address, incarnation and boot, and the ring members it knows (``{"node_id",
"address", "incarnation", "boot", "members"}``). A node reaches its seeds (retried
every ``seed_retry_interval`` until they answer), is admitted by them, and push-pulls
with each member it admits.

Trust
-----
Only connections the server accepted as peers (``PeerInfo.is_node``) are heard at
all. A member is added, or its address changed, only by its own word:

* a handshake this node made to that address, answered by that node id (with a
  proof of the cluster secret when the cluster has one: :mod:`hypercache.net.auth`),
  or
* that node's own HELLO to this node, when it carries a valid proof of the secret.

Everything else naming a member not known at that address is a *claim*: gossiped
records, member lists in HELLOs, and the HELLO of a peer of an open cluster (no
secret: taken from loopback, on its word). A claim names a *candidate*, which this
node dials to check (at most :data:`MAX_CANDIDATES`, retried with a back-off) before
it enters the table. So a forged HELLO or gossip listing fake members, or
re-pointing a member to a dead address, changes nothing: the fakes never answer.

State claims about known members (suspect, dead, left, removed, each at an
incarnation) are taken from peers by the precedence rules: that is what gossip is.
In an open cluster any process on loopback that connects as a peer could therefore
lie about states (mark members dead, say); with a cluster secret only nodes holding
it can. A lie about a running node does not last: it refutes. Incarnations more than
a day ahead of the wall clock are refused.

A consequence of the rule: a member that is dead while another node joins (or
restarts) cannot be confirmed by the newcomer, which leaves it out of its ring until
it answers or is removed (its membership version differs meanwhile): remove dead
members before adding nodes.

Connections: one multiplexed client connection per peer, opened lazily and shared by
every request to it. After a failed attempt the peer backs off (50 ms doubling up to
``max(heartbeat_interval, 1s)``); during the back-off requests to it fail at once
with :class:`~hypercache.errors.NodeUnavailableError` instead of piling up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from hypercache._core.ring import DEFAULT_VNODES
from hypercache.cluster.config import DistConfig
from hypercache.cluster.swim import IN_RING, Probe, State, Swim, SwimSettings
from hypercache.errors import HandshakeError, HyperCacheError, NodeUnavailableError, ProtocolError
from hypercache.net.auth import PeerAuthenticator
from hypercache.net.peer import PeerConnection
from hypercache.net.protocol import Limits, Op, make_hello
from hypercache.net.transport import Connection, Later, Outcome, Transport
from hypercache.observe.logs import RateLimiter
from hypercache.replication import WallClock, wall_ms

__all__ = [
    "MAX_CANDIDATES",
    "MAX_PENDING_INDIRECT",
    "PUSH_PULL_ROUNDS",
    "Membership",
    "Peer",
]

_log = logging.getLogger("hypercache.membership")
#: Lines that repeat while a peer stays down.
_limited = RateLimiter(60.0)

_PING: Final = int(Op.PING)
_PING_REQ: Final = int(Op.PING_REQ)
_MEMBERS: Final = int(Op.MEMBERS)
#: Claimed members waiting to be checked, at most; a claim beyond is dropped (counted).
MAX_CANDIDATES: Final = 256
#: Indirect probes this node runs for others at once, at most; a PING_REQ beyond is
#: answered with a nack at once (counted in ``indirect_refused``).
MAX_PENDING_INDIRECT: Final = 64
#: Probe periods between two push-pulls of the whole table with a random member.
PUSH_PULL_ROUNDS: Final = 10
#: Peers that must take a node's ``left`` before :meth:`Membership.leave` returns.
LEAVE_ACKS: Final = 3
#: Back-off between two checks of one candidate: doubles from the first to the last.
_CHECK_BACKOFF: Final = (0.2, 30.0)
#: Seconds between attempts at a seed that refused our HELLO (at least; a seed not
#: up yet is retried every ``seed_retry_interval``).
SEED_REFUSED_RETRY: Final = 5.0
#: Seconds between two log lines about the same refused peer.
LOG_EVERY: Final = 60.0


def _member_entries(raw: Any) -> list[tuple[str, str]]:
    """Validate a ``[[node_id, address], ...]`` member list; malformed entries are
    skipped."""
    out: list[tuple[str, str]] = []
    if not isinstance(raw, list | tuple):
        return out
    for item in raw:
        if (
            isinstance(item, list | tuple)
            and len(item) == 2
            and type(item[0]) is str
            and type(item[1]) is str
            and item[0]
            and item[1]
        ):
            out.append((item[0], item[1]))
    return out


def _int(raw: Any) -> int:
    return raw if type(raw) is int and raw >= 0 else 0


class Peer:
    """Another ring member: its address, its connection and whether it is up.

    The connection is a :class:`~hypercache.net.peer.PeerConnection` (lazy, shared,
    reopened with back-off). ``up`` follows the member's state (alive or not); the
    failure detector alone changes it.

    :ivar up: whether the member is alive.
    :ivar last_ok: ``time.monotonic()`` of the last answer it gave.
    """

    __slots__ = ("_membership", "address", "last_ok", "link", "node_id", "up")

    def __init__(
        self, membership: Membership, node_id: str, address: str, *, up: bool = True
    ) -> None:
        self._membership = membership
        self.node_id = node_id
        self.address = address
        self.up = up
        self.last_ok = time.monotonic()
        #: the connection to the peer
        self.link = PeerConnection(
            address,
            self._dial,
            backoff_max=membership.max_backoff,
            on_answer=self._answered,
            on_lost=self._lost,
            on_connected=self._connected,
        )

    @property
    def conn(self) -> Connection | None:
        return self.link.conn

    def _answered(self) -> None:
        self.last_ok = time.monotonic()

    def _lost(self, exc: BaseException) -> None:
        # Not a verdict: the failure detector judges by its probes.
        _log.debug("connection to %s (%s) lost: %s", self.node_id, self.address, exc)

    async def _dial(self, address: str) -> Connection:
        conn = await self._membership.dial(address)
        peer_id = conn.peer_hello.get("node_id")
        if peer_id != self.node_id:
            await conn.close()
            raise NodeUnavailableError(
                f"{address} answers as {peer_id!r}, expected {self.node_id!r}"
            )
        return conn

    def _connected(self, conn: Connection) -> None:
        self.last_ok = time.monotonic()
        self._membership.learn_from_answer(self.address, conn.peer_hello)

    async def connection(self) -> Connection:
        """The open connection to this peer, connecting (once, shared) if needed.

        :raises NodeUnavailableError: the peer cannot be reached, or is backing off.
        """
        return await self.link.connection()

    async def request(self, op: int, payload: Any, timeout: float) -> Any:
        """Send one request to the peer (connecting if needed) and return the answer.

        :raises HyperCacheError: the transport failed, or the error the peer answered.
        """
        return await self.link.request(op, payload, timeout)

    def send_callback(
        self,
        op: int,
        payload: Any,
        timeout: float,
        callback: Outcome,
        trace: dict[str, str] | None = None,
    ) -> None:
        """Send one request without a task when connected (see
        :meth:`~hypercache.net.peer.PeerConnection.send_callback`)."""
        self.link.send_callback(op, payload, timeout, callback, trace)

    async def close(self) -> None:
        await self.link.close()


class _Paths:
    """The paths of one probe (the direct ping, then each helper): the first ack
    decides; once every path failed, the probe has."""

    __slots__ = ("direct_done", "future", "open")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[str] = loop.create_future()
        self.direct_done = asyncio.Event()
        self.open = 0

    def ack(self, how: str) -> None:
        if not self.future.done():
            self.future.set_result(how)

    def fail(self) -> None:
        self.open -= 1
        if self.open <= 0 and not self.future.done():
            self.future.set_result("")


def layout_of(config: DistConfig) -> dict[str, int]:
    """What every node of a cluster must agree on to build the same partition table
    (sent in the HELLO's ``info.layout``; a peer with another is refused)."""
    placement = config.placement
    return {
        "partitions": placement.partitions,
        "replication": placement.replication,
        "vnodes": placement.vnodes or DEFAULT_VNODES,
    }


class Membership:
    """The member table of one node, its peers' connections and the failure detector
    (see the module docstring).

    :param config: the node's configuration (seeds, membership settings, timeouts,
        cluster, auth).
    :param transport: how to reach peers.
    :param node_id: this node's id.
    :param address: this node's data address, as peers should dial it.
    :param on_change: called with the new sorted ``[(node_id, address), ...]`` of the
        ring members whenever it changes.
    :param wall: the wall clock (ms): this node's first incarnation, and the horizon
        of the incarnations it accepts.
    :param rng: random choices of the detector (probe order, helpers, push-pull).
    """

    def __init__(
        self,
        config: DistConfig,
        transport: Transport,
        *,
        node_id: str,
        address: str,
        limits: Limits,
        on_change: Callable[[list[tuple[str, str]]], None],
        peer_auth: PeerAuthenticator | None = None,
        wall: WallClock = wall_ms,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.settings = config.membership
        self.transport = transport
        self.node_id = node_id
        self.address = address
        self.limits = limits
        self.peer_auth = peer_auth if peer_auth is not None else PeerAuthenticator(None)
        self._clock = time.monotonic
        self._rng = rng if rng is not None else random.Random()
        # Claimed members to check: (node id, address) -> (checks failed, next check
        # at, monotonic); ordered by arrival, the oldest dropped at the cap.
        self._candidates: dict[tuple[str, str], tuple[int, float]] = {}
        self._checking: set[tuple[str, str]] = set()
        #: claims dropped at MAX_CANDIDATES, and checks that failed
        self.candidates_dropped = 0
        self.checks_failed = 0
        #: what every node of a cluster must agree on to share one partition table;
        #: a peer whose layout differs is refused in the handshake, either way
        self.layout = layout_of(config)
        #: peer handshakes refused because the peer's layout differs from ours
        self.layout_refused = 0
        # seed -> why it last refused our HELLO; peer -> when its layout was last
        # logged (each said once a minute, not at every retry)
        self._seeds_refused: dict[str, str] = {}
        self._layout_logged: dict[str, float] = {}
        self.max_backoff = max(config.heartbeat_interval, 1.0)
        self._on_change = on_change
        #: the other ring members: node id -> Peer
        self.peers: dict[str, Peer] = {}
        self._seeds_pending: list[str] = [s for s in config.seeds if s != address]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self._indirect_pending = 0
        #: probe periods run
        self.gossip_rounds = 0
        #: pings (probes, notices, a leave's) that got no answer
        self.heartbeats_failed = 0
        #: PING_REQs answered with a nack at once: MAX_PENDING_INDIRECT running
        self.indirect_refused = 0
        #: push-pulls that failed
        self.push_pulls_failed = 0
        #: called with ``(node_id, up)`` whenever a member becomes alive or stops being
        self.liveness_listeners: list[Callable[[str, bool], None]] = []
        #: called with ``node_id`` when a member came back in a new life
        self.restart_listeners: list[Callable[[str], None]] = []
        #: the state machine (see :mod:`hypercache.cluster.swim`)
        self.swim = Swim(
            node_id,
            address,
            incarnation=wall(),
            settings=SwimSettings.from_membership(self.settings),
            now=self._clock(),
            wall_ms=wall,
            rng=self._rng,
            on_ring=self._ring_changed,
            on_liveness=self._liveness_changed,
            on_state=self._state_changed,
            on_restart=self._restarted,
            on_claim=self._claimed,
        )

    # ---------------------------------------------------------------- queries

    def ring_members(self) -> list[tuple[str, str]]:
        """``[(node_id, address), ...]`` of the ring members, sorted by id."""
        return self.swim.ring_members()

    def member_list(self) -> list[list[str]]:
        """:meth:`ring_members` as ``[[node_id, address], ...]``."""
        return [[nid, address] for nid, address in self.swim.ring_members()]

    @property
    def version(self) -> int:
        """The membership version: equal on nodes whose tables agree."""
        return self.swim.version

    @property
    def incarnation(self) -> int:
        return self.swim.incarnation

    def state_of(self, node_id: str) -> State | None:
        """The member's state (``None``: not a member)."""
        return self.swim.state_of(node_id)

    def is_up(self, node_id: str) -> bool:
        """Whether the member is alive (this node: unless it left)."""
        return self.swim.is_up(node_id)

    def up_count(self) -> int:
        """Alive members, this node included."""
        return self.swim.up_count()

    def hintable(self, node_id: str) -> bool:
        """Whether writes ``node_id`` misses are worth a hint: it is another member
        still in the ring (not left, not removed)."""
        return node_id != self.node_id and self.swim.in_ring(node_id)

    @property
    def stalls(self) -> int:
        """Probe periods that came more than ``failure_timeout`` late."""
        return self.swim.stalls

    @property
    def liveness_changes(self) -> int:
        return self.swim.liveness_changes

    def member_table(self) -> list[dict[str, Any]]:
        """Every record, sorted by id, for reports: ``node_id``, ``address``,
        ``state``, ``incarnation``, ``since`` (wall-clock seconds of the last change
        of state), ``since_s`` (how long ago), ``up``, ``self``."""
        now, wall_now = self._clock(), time.time()
        swim = self.swim
        out: list[dict[str, Any]] = []
        for nid in sorted(swim.members):
            m = swim.members[nid]
            ago = max(now - m.since, 0.0)
            out.append(
                {
                    "node_id": nid,
                    "address": m.address,
                    "state": m.state.label,
                    "incarnation": m.incarnation,
                    "since": round(wall_now - ago, 3),
                    "since_s": round(ago, 3),
                    "up": m.state is State.ALIVE,
                    "self": nid == self.node_id,
                }
            )
        return out

    # ------------------------------------------------------------- hooks of Swim

    def _ring_changed(self) -> None:
        ring = self.swim.ring_members()
        others = {nid: address for nid, address in ring if nid != self.node_id}
        for nid, peer in list(self.peers.items()):
            address = others.get(nid)
            if address != peer.address:
                del self.peers[nid]
                self._spawn(peer.close())
                if address is None:
                    _log.info("member %s is out of the ring (%s)", nid, self._label(nid))
                else:
                    _log.info("member %s moved from %s to %s", nid, peer.address, address)
        for nid, address in others.items():
            if nid not in self.peers:
                _log.info("member %s at %s is in the ring (%s)", nid, address, self._label(nid))
                self.peers[nid] = Peer(self, nid, address, up=self.swim.is_up(nid))
        self._on_change(ring)

    def _label(self, node_id: str) -> str:
        state = self.swim.state_of(node_id)
        return "unknown" if state is None else state.label

    def _state_changed(self, node_id: str, state: State) -> None:
        member = self.swim.members[node_id]
        level = logging.INFO if state in (State.ALIVE, State.LEFT) else logging.WARNING
        _log.log(
            level, "member %s is %s (incarnation %d)", node_id, state.label, member.incarnation
        )

    def _liveness_changed(self, node_id: str, up: bool) -> None:
        peer = self.peers.get(node_id)
        if peer is not None:
            peer.up = up
        for listener in self.liveness_listeners:
            try:
                listener(node_id, up)
            except Exception:  # a listener's bug must not break the failure detector
                _log.exception("liveness listener failed")

    def _restarted(self, node_id: str) -> None:
        _log.info("member %s restarted (incarnation %d)", node_id, self._incarnation_of(node_id))
        for listener in self.restart_listeners:
            try:
                listener(node_id)
            except Exception:
                _log.exception("restart listener failed")

    def _incarnation_of(self, node_id: str) -> int:
        member = self.swim.members.get(node_id)
        return -1 if member is None else member.incarnation

    def _claimed(self, node_id: str, address: str) -> None:
        self.propose([(node_id, address)])

    # ------------------------------------------------------------ handshakes

    def hello(self) -> dict[str, Any]:
        """The HELLO payload this node sends when it dials a peer (a fresh proof of
        the cluster secret each time)."""
        cluster = self.config.cluster_name
        return make_hello(
            cluster,
            node_id=self.node_id,
            address=self.address,
            auth=self.config.auth_token,
            info=self.hello_info(),
            proof=self.peer_auth.hello_proof(cluster, self.node_id, self.address),
        )

    async def dial(self, address: str) -> Connection:
        """Connect to ``address`` as a peer and check that the answer proves the
        cluster secret (when there is one).

        :raises NodeUnavailableError: cannot connect.
        :raises HandshakeError: refused, or the answer is not a peer's.
        """
        hello = self.hello()
        conn = await self.transport.connect(
            address, hello, self.limits, self.config.connect_timeout
        )
        try:
            self.peer_auth.check_answer(hello, conn.peer_hello)
            self.check_layout(address, conn.peer_hello.get("info"))
        except HandshakeError:
            await conn.close()
            raise
        conn.busy_poll = self.config.busy_poll
        return conn

    def check_layout(self, who: str, info: Any) -> None:
        """Refuse a peer (whose HELLO or answer carried ``info``) unless its partition
        count, replication and vnodes are ours: nodes that disagree would build
        different tables and each send keys where the other does not look.

        :raises HandshakeError: the layouts differ (logged and counted).
        """
        theirs = info.get("layout") if type(info) is dict else None
        if theirs == self.layout:
            return
        self.layout_refused += 1

        def text(layout: Any) -> str:
            if type(layout) is not dict:
                return "no layout"
            return " ".join(f"{k}={layout.get(k)}" for k in self.layout)

        message = (
            f"{who} runs with {text(theirs)}; {self.node_id} runs with {text(self.layout)}: "
            "the nodes of one cluster must agree on them (--partitions, --replication, "
            "--vnodes)"
        )
        now = self._clock()
        if now - self._layout_logged.get(who, -LOG_EVERY) >= LOG_EVERY:
            if len(self._layout_logged) >= MAX_CANDIDATES:
                self._layout_logged.clear()
            self._layout_logged[who] = now
            _log.warning("refusing peer: %s", message)
        raise HandshakeError(message)

    def hello_info(self) -> dict[str, Any]:
        """The ``info`` map of this node's HELLO and HELLO answers."""
        me = self.swim.me
        return {
            "node_id": self.node_id,
            "address": self.address,
            "incarnation": me.incarnation,
            "boot": me.boot,
            "members": self.member_list(),
            "layout": self.layout,
        }

    def _admit(self, node_id: str, address: str, info: dict[Any, Any]) -> None:
        """``node_id`` said, itself, that it is at ``address`` (see "Trust")."""
        if node_id == self.node_id:
            return
        self._candidates.pop((node_id, address), None)
        new = node_id not in self.swim.members
        self.swim.admit(
            node_id,
            address,
            _int(info.get("incarnation")),
            _int(info.get("boot")),
            self._clock(),
        )
        peer = self.peers.get(node_id)
        if new and peer is not None:
            self._spawn(self._push_pull(peer))

    def propose(self, entries: Iterable[tuple[str, str]]) -> None:
        """Take note of claimed members: each one not known at that address becomes a
        candidate, which this node dials to check before believing it."""
        members = self.swim.members
        for node_id, address in entries:
            if node_id == self.node_id:
                continue
            known = members.get(node_id)
            if known is not None and known.address == address:
                continue
            pair = (node_id, address)
            if pair in self._candidates:
                continue
            if len(self._candidates) >= MAX_CANDIDATES:
                self.candidates_dropped += 1
                continue
            self._candidates[pair] = (0, 0.0)
            self._check_soon(pair)

    @property
    def candidates(self) -> list[tuple[str, str]]:
        """Claimed members not checked yet (or whose checks keep failing)."""
        return list(self._candidates)

    def _check_soon(self, pair: tuple[str, str]) -> None:
        if pair not in self._checking and not self._stopping:
            self._checking.add(pair)
            self._spawn(self._check(pair))

    async def _check(self, pair: tuple[str, str]) -> None:
        node_id, address = pair
        try:
            while pair in self._candidates:
                failures, due = self._candidates[pair]
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                info: dict[Any, Any] = {}
                try:
                    conn = await self.dial(address)
                except (HyperCacheError, OSError) as exc:
                    answered = None
                    why = str(exc)
                else:
                    answered = conn.peer_hello.get("node_id")
                    raw = conn.peer_hello.get("info")
                    info = raw if type(raw) is dict else {}
                    why = f"answers as {answered!r}"
                    await conn.close()  # the member's Peer makes its own connection
                if answered == node_id:
                    self._admit(node_id, address, info)
                    return
                self.checks_failed += 1
                low, high = _CHECK_BACKOFF
                delay = min(low * 2**failures, high)
                _log.info("claimed member %s at %s not confirmed: %s", node_id, address, why)
                if pair in self._candidates:
                    self._candidates[pair] = (failures + 1, time.monotonic() + delay)
        finally:
            self._checking.discard(pair)

    def learn_from_answer(self, dialed: str, answer: dict[str, Any]) -> None:
        """What the answer to our HELLO at ``dialed`` tells: the node that answered is
        at that address (its own word), the rest are claims."""
        node_id = answer.get("node_id")
        info = answer.get("info")
        if type(info) is not dict:
            info = {}
        if type(node_id) is str and node_id:
            advertised = info.get("address")
            # The node answered at ``dialed``: that address is its own word. One it
            # advertises elsewhere is checked like any claim before it replaces a
            # known one.
            if advertised in (None, dialed) or node_id not in self.swim.members:
                self._admit(node_id, dialed, info)
        self._learn_claims(info)

    def learn_from_hello(self, hello: dict[str, Any]) -> None:
        """What a peer's HELLO to this node tells: its own address (believed at once
        when it proved the cluster secret, else checked first), and claims."""
        node_id, address = hello.get("node_id"), hello.get("address")
        info = hello.get("info")
        self.check_layout(f"peer {node_id!r} at {address}", info)
        if type(info) is not dict:
            info = {}
        if type(node_id) is str and node_id and type(address) is str and address:
            if hello.get("authenticated"):
                self._admit(node_id, address, info)
            else:
                self.propose([(node_id, address)])
        self._learn_claims(info)

    def _learn_claims(self, info: dict[Any, Any]) -> None:
        claims = _member_entries(info.get("members"))
        node_id, address = info.get("node_id"), info.get("address")
        if type(node_id) is str and node_id and type(address) is str and address:
            claims.append((node_id, address))
        self.propose(claims)

    # ----------------------------------------------------------------- handlers

    def on_ping(self, sender: str | None, payload: Any) -> Any:
        """``PING``: from a peer with gossip, a probe (merge, answer ours); anything
        else ``"pong"`` (a legacy ``{"members": [[id, address], ...]}`` from a peer
        is taken as claims)."""
        if sender is None:
            return "pong"
        if type(payload) is dict:
            if "gossip" in payload:
                self.swim.receive(payload["gossip"], self._clock())
                return {"gossip": self.swim.gossip(sender)}
            self.propose(_member_entries(payload.get("members")))
        return "pong"

    def on_ping_req(self, payload: Any) -> Any:
        """``PING_REQ [target, gossip, timeout_ms]``: probe ``target`` on the asker's
        behalf; a :class:`Later` answered ``{"ack", "gossip"}``."""
        if (
            type(payload) is not list
            or len(payload) != 3
            or type(payload[0]) is not str
            or type(payload[2]) is not int
        ):
            raise ProtocolError("PING_REQ payload must be [target, gossip, timeout_ms]")
        target, gossip, timeout_ms = payload
        swim = self.swim
        swim.receive(gossip, self._clock())
        peer = self.peers.get(target)
        if peer is None or self._stopping:
            return {"ack": False, "gossip": swim.gossip()}
        if self._indirect_pending >= MAX_PENDING_INDIRECT:
            self.indirect_refused += 1
            return {"ack": False, "gossip": swim.gossip()}
        timeout = min(max(timeout_ms, 1) / 1000, self.settings.failure_timeout)
        later = Later()
        self._indirect_pending += 1

        def answered(value: Any, error: BaseException | None) -> None:
            self._indirect_pending -= 1
            acked = error is None and self._heard(value)
            later.resolve({"ack": acked, "gossip": self.swim.gossip()})

        peer.send_callback(_PING, {"gossip": swim.gossip(target)}, timeout, answered)
        return later

    def on_members(self, payload: Any) -> Any:
        """``MEMBERS {"table": [record, ...]}``: merge it, answer this node's table."""
        table = payload.get("table") if type(payload) is dict else None
        if not isinstance(table, list):
            raise ProtocolError("MEMBERS payload must be {'table': [record, ...]}")
        self.swim.receive(table, self._clock())
        return {"table": self.swim.table()}

    def _heard(self, answer: Any) -> bool:
        """Merge what a peer's answer to a ping carries; any answer is an ack."""
        if type(answer) is dict:
            self.swim.receive(answer.get("gossip"), self._clock())
        return True

    # ---------------------------------------------------------------- probing

    async def _probe_loop(self) -> None:
        swim = self.swim
        period = self.settings.heartbeat_interval
        last = self._clock()
        while True:
            self.gossip_rounds += 1
            now = self._clock()
            if swim.tick(now):
                # This node was the silent one (paused, stopped by a debugger,
                # starved of CPU): its peers' answers are waiting unread in its
                # sockets. Nobody is judged on this round.
                _log.warning(
                    "event loop stalled for %.1f s: judging no member this round", now - last
                )
            last = now
            if swim.me.state is State.ALIVE:
                probe = swim.next_probe(now)
                if probe is not None:
                    self._spawn(self._probe(probe))
                for node_id in swim.notices():
                    self._notice(node_id)
                if self.gossip_rounds % PUSH_PULL_ROUNDS == 0:
                    self._push_pull_someone()
            await asyncio.sleep(period)

    async def _probe(self, probe: Probe) -> None:
        peer = self.peers.get(probe.target)
        if peer is None:
            return
        swim = self.swim
        settings = swim.settings
        paths = _Paths(asyncio.get_running_loop())
        paths.open = 2  # the direct ping, and the helpers until they are asked

        def direct(value: Any, error: BaseException | None) -> None:
            paths.direct_done.set()
            if error is None and self._heard(value):
                paths.ack("ack")
            else:
                self.heartbeats_failed += 1
                paths.fail()

        peer.send_callback(
            _PING, {"gossip": swim.gossip(probe.target)}, settings.failure_timeout, direct
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.probe_timeout):
                await paths.direct_done.wait()
        if not paths.future.done():
            left = max(probe.deadline - self._clock(), 0.001)
            for helper in swim.helpers(probe):
                helper_peer = self.peers.get(helper)
                if helper_peer is None:
                    continue
                paths.open += 1
                helper_peer.send_callback(
                    _PING_REQ,
                    [probe.target, swim.gossip(helper), max(int(left * 800), 1)],
                    left,
                    self._indirect(paths),
                )
            paths.fail()  # the helpers are asked
        try:
            async with asyncio.timeout(max(probe.deadline - self._clock(), 0.0)):
                result = await paths.future
        except TimeoutError:
            result = ""
        swim.end_probe(probe, result, self._clock())

    def _indirect(self, paths: _Paths) -> Outcome:
        def answered(value: Any, error: BaseException | None) -> None:
            if error is None and type(value) is dict:
                self.swim.receive(value.get("gossip"), self._clock())
                if value.get("ack") is True:
                    paths.ack("indirect")
                    return
            paths.fail()

        return answered

    def _notice(self, node_id: str) -> None:
        """Ping a suspect with its own record, so that it refutes at once."""
        peer = self.peers.get(node_id)
        if peer is None:
            return

        def answered(value: Any, error: BaseException | None) -> None:
            if error is None:
                self._heard(value)
            else:
                self.heartbeats_failed += 1

        peer.send_callback(
            _PING, {"gossip": self.swim.gossip(node_id)}, self.settings.failure_timeout, answered
        )

    def _push_pull_someone(self) -> None:
        alive = [nid for nid, peer in self.peers.items() if peer.up]
        if alive:
            self._spawn(self._push_pull(self.peers[self._rng.choice(alive)]))

    async def _push_pull(self, peer: Peer) -> None:
        try:
            answer = await peer.request(
                _MEMBERS, {"table": self.swim.table()}, self.config.request_timeout
            )
        except HyperCacheError as exc:
            self.push_pulls_failed += 1
            _log.debug("push-pull with %s failed: %s", peer.node_id, exc)
            return
        if type(answer) is dict:
            self.swim.receive(answer.get("table"), self._clock())

    # ----------------------------------------------------------- leave, remove

    async def leave(self) -> int:
        """Leave the cluster: ``left`` at this node's incarnation plus one, out of its
        own ring at once, and pushed to every peer in the ring (again each period to
        those that did not answer) until :data:`LEAVE_ACKS` of them (or all, when
        fewer) took it, or ``leave_timeout``. Return how many took it. The node goes
        on answering (its answers carry its ``left``) until it stops; it probes no
        more."""
        swim = self.swim
        if swim.me.state is State.LEFT:
            return 0
        swim.leave(self._clock())
        _log.info("leaving the cluster (incarnation %d)", swim.incarnation)
        targets = {nid: peer for nid, peer in self.peers.items() if swim.state_of(nid) in IN_RING}
        want = min(LEAVE_ACKS, len(targets))
        took: set[str] = set()
        if not want:
            return 0
        done = asyncio.Event()

        def sent_to(node_id: str) -> Outcome:
            def answered(value: Any, error: BaseException | None) -> None:
                if error is None:
                    self._heard(value)
                    took.add(node_id)
                    if len(took) >= want:
                        done.set()
                else:
                    self.heartbeats_failed += 1

            return answered

        period = self.settings.heartbeat_interval
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.leave_timeout):
                while True:
                    for nid, peer in targets.items():
                        if nid not in took:
                            peer.send_callback(
                                _PING, {"gossip": swim.gossip(nid)}, period, sent_to(nid)
                            )
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(period):
                            await done.wait()
                    if done.is_set():
                        break
        _log.info("left: %d of %d peers took it", len(took), len(targets))
        return len(took)

    def remove(self, node_id: str) -> bool:
        """Take a dead (or suspect) member out of the ring, on every node (gossiped).
        Return ``False`` when it was removed already.

        :raises ConfigError: (field ``node``) not a member, or neither dead nor suspect.
        """
        removed = self.swim.remove(node_id, self._clock())
        if removed:
            _log.warning("member %s removed from the ring", node_id)
        return removed

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the seed and probe loops (on the running loop)."""
        loop = asyncio.get_running_loop()
        self._stopping = False
        self._loops = [
            loop.create_task(self._seed_loop(), name="hypercache-seeds"),
            loop.create_task(self._probe_loop(), name="hypercache-probes"),
        ]

    async def stop(self) -> None:
        """Stop every loop and close every peer connection."""
        self._stopping = True
        tasks = [*self._loops, *self._tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._loops = []
        await asyncio.gather(*(peer.close() for peer in self.peers.values()))

    def _spawn(self, coro: Any) -> None:
        if self._stopping:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.debug("background task failed", exc_info=task.exception())

    # -------------------------------------------------------------------- seeds

    @property
    def seeds_pending(self) -> list[str]:
        """Seed addresses not reached yet."""
        return list(self._seeds_pending)

    async def _seed_loop(self) -> None:
        while self._seeds_pending:
            results = await asyncio.gather(
                *(self._try_seed(seed) for seed in self._seeds_pending), return_exceptions=True
            )
            self._seeds_pending = [
                seed
                for seed, ok in zip(self._seeds_pending, results, strict=True)
                if ok is not True
            ]
            if self._seeds_pending:
                # A seed that refused us will refuse again until someone changes a
                # setting: ask it less often than one that is not up yet.
                refused = all(seed in self._seeds_refused for seed in self._seeds_pending)
                pause = self.config.seed_retry_interval
                await asyncio.sleep(max(pause, SEED_REFUSED_RETRY) if refused else pause)

    async def _try_seed(self, seed: str) -> bool:
        try:
            conn = await self.dial(seed)
        except HandshakeError as exc:
            # said once per seed and reason, not at every retry
            if self._seeds_refused.get(seed) != str(exc):
                _log.error("seed %s refused us: %s", seed, exc)
            self._seeds_refused[seed] = str(exc)
            return False
        except (HyperCacheError, OSError) as exc:
            # Every seed_retry_interval while the seed is down: one line per seed a minute.
            _limited.log(
                _log,
                logging.INFO,
                ("seed", seed),
                "seed %s not reachable yet: %s",
                seed,
                exc,
                extra={"op": "join", "peer": seed, "error": str(exc)},
            )
            return False
        peer_id = conn.peer_hello.get("node_id")
        await conn.close()  # the peer's own connection is made by its Peer
        if peer_id == self.node_id:
            return True  # we are our own seed
        self.learn_from_answer(seed, conn.peer_hello)
        _log.info("reached seed %s (%s)", seed, peer_id)
        return True
