"""Static membership: who is in the cluster, how to reach them, who is up.

Membership is *static*: the set of members only grows (a member that dies stays a
member and an owner in the ring; only its ``up`` flag changes). It is learned, not
written by hand:

* every HELLO a node sends or answers carries, in its ``info`` map, the node's id,
  its data address and the members it knows (``{"node_id", "address", "members"}``);
* each side merges what it hears, so connecting to one seed is enough to learn the
  cluster, and the seed learns the newcomer;
* the member list is gossiped: pushed to every peer in each heartbeat ``PING``
  (payload ``{"members": [[id, address], ...]}``), and at once whenever it changes.
  Every node pushes to every member it knows, so after one round every node knows
  the union, whatever the join order, and every node builds the same ring;
* a seed that does not answer is retried every ``seed_retry_interval`` until it does.

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
from hypercache.net.protocol import Limits, Op, make_hello
from hypercache.net.transport import Connection, Transport

__all__ = ["Membership", "Peer"]

_log = logging.getLogger("hypercache.membership")

_PING: Final = int(Op.PING)
_BACKOFF_MIN: Final = 0.05


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

    :ivar up: whether the failure detector thinks the peer is alive.
    :ivar last_ok: ``time.monotonic()`` of the last successful exchange.
    """

    __slots__ = (
        "_backoff",
        "_connecting",
        "_membership",
        "_retry_at",
        "address",
        "conn",
        "last_ok",
        "node_id",
        "up",
    )

    def __init__(self, membership: Membership, node_id: str, address: str) -> None:
        self._membership = membership
        self.node_id = node_id
        self.address = address
        self.conn: Connection | None = None
        # Optimistic: a peer just learned of has just talked to someone.
        self.up = True
        self.last_ok = time.monotonic()
        self._connecting: asyncio.Task[Connection] | None = None
        self._retry_at = 0.0
        self._backoff = _BACKOFF_MIN

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

    async def connection(self) -> Connection:
        """The open connection to this peer, connecting (once, shared) if needed.

        :raises NodeUnavailableError: the peer cannot be reached, or is backing off.
        """
        conn = self.conn
        if conn is not None and not conn.closed:
            return conn
        task = self._connecting
        if task is None:
            if time.monotonic() < self._retry_at:
                raise NodeUnavailableError(f"{self.node_id} ({self.address}): down, backing off")
            task = self._connecting = asyncio.get_running_loop().create_task(self._connect())
        return await asyncio.shield(task)

    async def _connect(self) -> Connection:
        m = self._membership
        try:
            conn = await m.transport.connect(
                self.address, m.hello(), m.limits, m.config.connect_timeout
            )
            conn.busy_poll = m.config.busy_poll
            peer_id = conn.peer_hello.get("node_id")
            if peer_id != self.node_id:
                await conn.close()
                raise NodeUnavailableError(
                    f"{self.address} answers as {peer_id!r}, expected {self.node_id!r}"
                )
        except (HyperCacheError, OSError) as exc:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, m.max_backoff)
            self.mark_down(str(exc))
            if isinstance(exc, NodeUnavailableError):
                raise
            raise NodeUnavailableError(f"{self.node_id} ({self.address}): {exc}") from None
        finally:
            self._connecting = None
        self._backoff = _BACKOFF_MIN
        self._retry_at = 0.0
        old, self.conn = self.conn, conn
        if old is not None and old is not conn:
            m._spawn(old.close())
        self.mark_ok()
        m.merge_hello_info(conn.peer_hello.get("info") or {})
        return conn

    async def request(self, op: int, payload: Any, timeout: float) -> Any:
        """Send one request to the peer (connecting if needed) and return the answer.

        Transport failures mark the peer down; remote errors are re-raised as is.
        """
        conn = self.conn
        if conn is None or conn.closed:
            conn = await self.connection()
        try:
            result = await conn.request(op, payload, timeout)
        except NodeUnavailableError as exc:
            self.mark_down(str(exc))
            raise
        self.last_ok = time.monotonic()
        if not self.up:
            self.mark_ok()
        return result

    async def close(self) -> None:
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()

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
    ) -> None:
        self.config = config
        self.transport = transport
        self.node_id = node_id
        self.address = address
        self.limits = limits
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
        #: called with ``(node_id, up)`` whenever a peer goes down or comes back up
        self.liveness_listeners: list[Callable[[str, bool], None]] = []

    # ------------------------------------------------------------------ members

    def member_list(self) -> list[list[str]]:
        """``[[node_id, address], ...]`` sorted by id: what is gossiped."""
        return [[nid, self.members[nid]] for nid in sorted(self.members)]

    def hello(self) -> dict[str, Any]:
        """The HELLO payload this node sends when it dials a peer."""
        return make_hello(
            self.config.cluster_name,
            node_id=self.node_id,
            address=self.address,
            auth=self.config.auth_token,
            info=self.hello_info(),
        )

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

    def merge(self, entries: Iterable[tuple[str, str]], *, authoritative: bool = False) -> bool:
        """Add members not known yet; return whether the member set changed.

        An address is only replaced when ``authoritative`` (the member itself said
        so in its own HELLO): gossip never overrides what a node says about itself.
        """
        added = False
        for node_id, address in entries:
            if node_id == self.node_id:
                continue
            known = self.members.get(node_id)
            if known is None:
                self.members[node_id] = address
                self.peers[node_id] = Peer(self, node_id, address)
                _log.info("member %s at %s joined", node_id, address)
                added = True
            elif known != address and authoritative:
                _log.info("member %s moved from %s to %s", node_id, known, address)
                self.members[node_id] = address
                old = self.peers[node_id]
                self.peers[node_id] = Peer(self, node_id, address)
                self._spawn(old.close())
                added = True
        if added:
            self._on_change(sorted(self.members.items()))
            self._schedule_push()
        return added

    def merge_hello_info(self, info: Any) -> None:
        """Learn from the ``info`` map of a peer's HELLO (or HELLO answer)."""
        if type(info) is not dict:
            return
        node_id, address = info.get("node_id"), info.get("address")
        if type(node_id) is str and node_id and type(address) is str and address:
            self.merge([(node_id, address)], authoritative=True)
            peer = self.peers.get(node_id)
            if peer is not None:
                peer.mark_ok()
        self.merge(_member_entries(info.get("members")))

    def observe_ping(self, sender: str | None, payload: Any) -> None:
        """A peer's heartbeat: it is alive, and it gossips its members."""
        if sender is not None:
            peer = self.peers.get(sender)
            if peer is not None:
                peer.mark_ok()
        if type(payload) is dict:
            self.merge(_member_entries(payload.get("members")))

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
            conn = await self.transport.connect(
                seed, self.hello(), self.limits, self.config.connect_timeout
            )
        except HandshakeError as exc:
            _log.error("seed %s refused us: %s", seed, exc)
            return False
        except (HyperCacheError, OSError) as exc:
            _log.info("seed %s not reachable yet: %s", seed, exc)
            return False
        info = conn.peer_hello.get("info") or {}
        peer_id = conn.peer_hello.get("node_id")
        await conn.close()  # the peer's own connection is made by its Peer
        if peer_id == self.node_id:
            return True  # we are our own seed
        self.merge_hello_info(info)
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
        while True:
            self.gossip_rounds += 1
            now = time.monotonic()
            for peer in list(self.peers.values()):
                if peer.up and now - peer.last_ok > failure_timeout:
                    peer.mark_down(f"silent for {now - peer.last_ok:.1f}s")
                self._spawn(self._ping(peer))
            await asyncio.sleep(interval)
