"""Static membership: who is in the cluster, how to reach them, who is up.

Membership is *static*: the set of members only grows (a member that dies stays a
member and an owner in the ring; only its ``up`` flag changes). It is learned, not
written by hand:

* every HELLO a node sends or answers carries, in its ``info`` map, the node's id,
  its data address and the members it knows (``{"node_id", "address", "members"}``);
* each side learns what it hears, so connecting to one seed is enough to learn the
  cluster, and the seed learns the newcomer;
* the member list is gossiped: pushed to every peer in each heartbeat ``PING``
  (payload ``{"members": [[id, address], ...]}``), and at once whenever it changes.
  Every node pushes to every member it knows, so after one round every node knows
  the union, whatever the join order, and every node builds the same ring;
* a seed that does not answer is retried every ``seed_retry_interval`` until it does.

Trust: only a peer's own word changes what is known of it. A member is added, or
its address changed, only by

* a handshake this node made to that address, answered by that node id (with a
  proof of the cluster secret when the cluster has one: :mod:`hypercache.net.auth`),
  or
* that node's own HELLO to this node, when it carries a valid proof of the secret.

Everything else is a *claim*: member lists in gossip and in HELLOs, and the HELLO
of a peer of an open cluster (no secret: taken from loopback, on its word). A claim
names a *candidate*, which this node then dials to check (at most
:data:`MAX_CANDIDATES` of them, retried with a back-off); a claim about a member
already known at another address changes nothing until the new address answers as
that member. So a forged HELLO listing fake members, or re-pointing a member to a
dead address, changes nothing: the fakes never answer. Only connections the server
accepted as peers (``PeerInfo.is_node``) are heard at all.

Failure detection: each heartbeat pings every peer. A peer with no successful
exchange for ``failure_timeout`` seconds, or whose connection attempt just failed,
is *down*; the coordinator does not wait on down peers (it counts them as missing
acks at once). Any successful exchange, the heartbeat's included, marks it up again.

Connections: one multiplexed client connection per peer, opened lazily and shared
by every request to it. After a failed attempt the peer backs off (50 ms doubling
up to ``max(heartbeat_interval, 1s)``); during the back-off requests to it fail at
once with :class:`~hypercache.errors.NodeUnavailableError` instead of piling up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from hypercache.cluster.config import DistConfig
from hypercache.errors import HandshakeError, HyperCacheError, NodeUnavailableError
from hypercache.net.auth import PeerAuthenticator
from hypercache.net.peer import PeerConnection
from hypercache.net.protocol import Limits, Op, make_hello
from hypercache.net.transport import Connection, Outcome, Transport

__all__ = ["MAX_CANDIDATES", "Membership", "Peer"]

_log = logging.getLogger("hypercache.membership")

_PING: Final = int(Op.PING)
#: Claimed members waiting to be checked, at most; a claim beyond is dropped (counted).
MAX_CANDIDATES: Final = 256
#: Back-off between two checks of one candidate: doubles from the first to the last.
_CHECK_BACKOFF: Final = (0.2, 30.0)


def _member_entries(raw: Any) -> list[tuple[str, str]]:
    """Validate a gossiped member list; malformed entries are skipped."""
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


class Peer:
    """Another member: its address, its connection and its liveness.

    The connection is a :class:`~hypercache.net.peer.PeerConnection` (lazy, shared,
    reopened with back-off); every answer marks the peer up, every failure to reach
    it marks it down.

    :ivar up: whether the failure detector thinks the peer is alive.
    :ivar last_ok: ``time.monotonic()`` of the last successful exchange.
    """

    __slots__ = ("_membership", "address", "last_ok", "link", "node_id", "up")

    def __init__(self, membership: Membership, node_id: str, address: str) -> None:
        self._membership = membership
        self.node_id = node_id
        self.address = address
        # Optimistic: a peer just learned of has just talked to someone.
        self.up = True
        self.last_ok = time.monotonic()
        #: the connection to the peer
        self.link = PeerConnection(
            address,
            self._dial,
            backoff_max=membership.max_backoff,
            on_answer=self._answered,
            on_lost=lambda exc: self.mark_down(str(exc)),
            on_connected=self._connected,
        )

    @property
    def conn(self) -> Connection | None:
        return self.link.conn

    def mark_ok(self) -> None:
        self.last_ok = time.monotonic()
        if not self.up:
            self.up = True
            _log.info("peer %s (%s) is up", self.node_id, self.address)
            self._membership._changed_liveness(self.node_id, True)

    def mark_down(self, why: str) -> None:
        if self.up:
            self.up = False
            _log.warning("peer %s (%s) is down: %s", self.node_id, self.address, why)
            self._membership._changed_liveness(self.node_id, False)

    def _answered(self) -> None:
        self.last_ok = time.monotonic()
        if not self.up:
            self.mark_ok()

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
        self.mark_ok()
        self._membership.learn_from_answer(self.address, conn.peer_hello)

    async def connection(self) -> Connection:
        """The open connection to this peer, connecting (once, shared) if needed.

        :raises NodeUnavailableError: the peer cannot be reached, or is backing off.
        """
        return await self.link.connection()

    async def request(self, op: int, payload: Any, timeout: float) -> Any:
        """Send one request to the peer (connecting if needed) and return the answer.

        Transport failures mark the peer down; remote errors are re-raised as is.
        """
        return await self.link.request(op, payload, timeout)

    def send_callback(self, op: int, payload: Any, timeout: float, callback: Outcome) -> None:
        """Send one request without a task when connected (see
        :meth:`~hypercache.net.peer.PeerConnection.send_callback`)."""
        self.link.send_callback(op, payload, timeout, callback)

    async def close(self) -> None:
        await self.link.close()

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "address": self.address,
            "up": self.up,
            "self": False,
            "last_ok_ago_s": round(time.monotonic() - self.last_ok, 3),
        }


class Membership:
    """The member set of one node, its peers' connections and the failure detector.

    :param config: the node's configuration (seeds, intervals, timeouts, cluster, auth).
    :param transport: how to reach peers.
    :param node_id: this node's id.
    :param address: this node's data address, as peers should dial it.
    :param on_change: called with the new sorted ``[(node_id, address), ...]`` whenever
        a member joins (not on liveness changes).
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
    ) -> None:
        self.config = config
        self.transport = transport
        self.node_id = node_id
        self.address = address
        self.limits = limits
        self.peer_auth = peer_auth if peer_auth is not None else PeerAuthenticator(None)
        # Claimed members to check: (node id, address) -> (checks failed, next check
        # at, monotonic); ordered by arrival, the oldest dropped at the cap.
        self._candidates: dict[tuple[str, str], tuple[int, float]] = {}
        self._checking: set[tuple[str, str]] = set()
        #: claims dropped at MAX_CANDIDATES, and checks that failed
        self.candidates_dropped = 0
        self.checks_failed = 0
        self.max_backoff = max(config.heartbeat_interval, 1.0)
        self._on_change = on_change
        self.peers: dict[str, Peer] = {}
        #: members known, self included: node id -> data address
        self.members: dict[str, str] = {node_id: address}
        self._seeds_pending: list[str] = [s for s in config.seeds if s != address]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._push_scheduled = False
        self._stopping = False
        #: counters shown in metrics
        self.gossip_rounds = 0
        self.heartbeats_failed = 0
        self.liveness_changes = 0
        #: heartbeat rounds that came more than failure_timeout late (this node stalled)
        self.stalls = 0
        #: called with ``(node_id, up)`` whenever a peer goes down or comes back up
        self.liveness_listeners: list[Callable[[str, bool], None]] = []

    # ------------------------------------------------------------------ members

    def member_list(self) -> list[list[str]]:
        """``[[node_id, address], ...]`` sorted by id: what is gossiped."""
        return [[nid, self.members[nid]] for nid in sorted(self.members)]

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
        except HandshakeError:
            await conn.close()
            raise
        conn.busy_poll = self.config.busy_poll
        return conn

    def hello_info(self) -> dict[str, Any]:
        """The ``info`` map of this node's HELLO and HELLO answers."""
        return {"node_id": self.node_id, "address": self.address, "members": self.member_list()}

    def is_up(self, node_id: str) -> bool:
        if node_id == self.node_id:
            return True
        peer = self.peers.get(node_id)
        return peer is not None and peer.up

    def up_count(self) -> int:
        return 1 + sum(1 for peer in self.peers.values() if peer.up)

    def admit(self, node_id: str, address: str) -> bool:
        """Add ``node_id`` at ``address``, or move it there: only for what the node
        itself said (see "Trust" in the module docstring). Return whether anything
        changed."""
        if node_id == self.node_id:
            return False
        self._candidates.pop((node_id, address), None)
        known = self.members.get(node_id)
        if known == address:
            return False
        if known is None:
            _log.info("member %s at %s joined", node_id, address)
        else:
            _log.info("member %s moved from %s to %s", node_id, known, address)
            self._spawn(self.peers[node_id].close())
        self.members[node_id] = address
        self.peers[node_id] = Peer(self, node_id, address)
        self._on_change(sorted(self.members.items()))
        self._schedule_push()
        return True

    def propose(self, entries: Iterable[tuple[str, str]]) -> None:
        """Take note of claimed members: each one not known at that address becomes a
        candidate, which this node dials to check before believing it."""
        for node_id, address in entries:
            if node_id == self.node_id or self.members.get(node_id) == address:
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
                try:
                    conn = await self.dial(address)
                except (HyperCacheError, OSError) as exc:
                    answered = None
                    why = str(exc)
                else:
                    answered = conn.peer_hello.get("node_id")
                    why = f"answers as {answered!r}"
                    await conn.close()  # the member's Peer makes its own connection
                if answered == node_id:
                    if self.admit(node_id, address):
                        self._spawn(self._ping(self.peers[node_id]))
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
            if advertised in (None, dialed) or node_id not in self.members:
                self.admit(node_id, dialed)
            peer = self.peers.get(node_id)
            if peer is not None:
                peer.mark_ok()
        self._learn_claims(info)

    def learn_from_hello(self, hello: dict[str, Any]) -> None:
        """What a peer's HELLO to this node tells: its own address (believed at once
        when it proved the cluster secret, else checked first), and claims."""
        node_id, address = hello.get("node_id"), hello.get("address")
        if type(node_id) is str and node_id and type(address) is str and address:
            if hello.get("authenticated"):
                self.admit(node_id, address)
                peer = self.peers.get(node_id)
                if peer is not None:
                    peer.mark_ok()
            else:
                self.propose([(node_id, address)])
        info = hello.get("info")
        if type(info) is dict:
            self._learn_claims(info)

    def _learn_claims(self, info: dict[Any, Any]) -> None:
        claims = _member_entries(info.get("members"))
        node_id, address = info.get("node_id"), info.get("address")
        if type(node_id) is str and node_id and type(address) is str and address:
            claims.append((node_id, address))
        self.propose(claims)

    def observe_ping(self, sender: str | None, payload: Any) -> None:
        """A peer's heartbeat: it is alive, and it gossips its members (claims)."""
        if sender is not None:
            peer = self.peers.get(sender)
            if peer is not None:
                peer.mark_ok()
        if type(payload) is dict:
            self.propose(_member_entries(payload.get("members")))

    def _changed_liveness(self, node_id: str, up: bool) -> None:
        self.liveness_changes += 1
        for listener in self.liveness_listeners:
            try:
                listener(node_id, up)
            except Exception:  # a listener's bug must not break the failure detector
                _log.exception("liveness listener failed")

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the seed and heartbeat loops (on the running loop)."""
        loop = asyncio.get_running_loop()
        self._stopping = False
        self._loops = [
            loop.create_task(self._seed_loop(), name="hypercache-seeds"),
            loop.create_task(self._heartbeat_loop(), name="hypercache-heartbeat"),
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
                await asyncio.sleep(self.config.seed_retry_interval)

    async def _try_seed(self, seed: str) -> bool:
        try:
            conn = await self.dial(seed)
        except HandshakeError as exc:
            _log.error("seed %s refused us: %s", seed, exc)
            return False
        except (HyperCacheError, OSError) as exc:
            _log.info("seed %s not reachable yet: %s", seed, exc)
            return False
        peer_id = conn.peer_hello.get("node_id")
        await conn.close()  # the peer's own connection is made by its Peer
        if peer_id == self.node_id:
            return True  # we are our own seed
        self.learn_from_answer(seed, conn.peer_hello)
        if type(peer_id) is str and peer_id in self.peers:
            self._spawn(self._ping(self.peers[peer_id]))
        _log.info("reached seed %s (%s)", seed, peer_id)
        return True

    # ---------------------------------------------------------------- heartbeat

    def _schedule_push(self) -> None:
        """Gossip the member list to every peer soon (coalesced)."""
        if self._push_scheduled or self._stopping:
            return
        self._push_scheduled = True
        asyncio.get_running_loop().call_soon(self._push_now)

    def _push_now(self) -> None:
        self._push_scheduled = False
        for peer in list(self.peers.values()):
            self._spawn(self._ping(peer))

    async def _ping(self, peer: Peer) -> None:
        timeout = min(self.config.request_timeout, self.config.failure_timeout)
        try:
            await peer.request(_PING, {"members": self.member_list()}, timeout)
        except HyperCacheError as exc:
            self.heartbeats_failed += 1
            _log.debug("heartbeat to %s failed: %s", peer.node_id, exc)

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        failure_timeout = self.config.failure_timeout
        last_round = time.monotonic()
        while True:
            self.gossip_rounds += 1
            now = time.monotonic()
            # A round long overdue means this node was the silent one (paused,
            # stopped by a debugger, starved of CPU): its peers' answers are
            # waiting unread in its sockets. Judge nobody on that round; the pings
            # it sends now bring the answers that the next round judges by.
            stalled = now - last_round > failure_timeout
            if stalled:
                self.stalls += 1
                _log.warning(
                    "event loop stalled for %.1f s: not marking peers down this round",
                    now - last_round,
                )
            last_round = now
            for peer in list(self.peers.values()):
                if not stalled and peer.up and now - peer.last_ok > failure_timeout:
                    peer.mark_down(f"silent for {now - peer.last_ok:.1f}s")
                self._spawn(self._ping(peer))
            await asyncio.sleep(interval)
