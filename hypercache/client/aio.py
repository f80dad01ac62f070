"""The asyncio client: :class:`AsyncClient`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, TypeVar, Unpack

from hypercache.client import commands
from hypercache.client._common import (
    BATCH,
    DEFAULT_SEEDS,
    DIRECT_OK,
    DIRECT_STALE,
    SCAN_PAGE,
    ClientArgs,
    ClientBase,
    KeyMatch,
    OwnerRead,
    check_address,
    check_count,
    ttl_left,
)
from hypercache.client.commands import Level
from hypercache.client.failover import Attempts, Failover, TopologyFetch
from hypercache.client.keys import Key
from hypercache.client.owner_ask import DirectAsk, OwnerAsk
from hypercache.client.topology import Topology
from hypercache.errors import (
    HyperCacheError,
    NoAnswerError,
    NodeUnavailableError,
    PermissionDeniedError,
)
from hypercache.net.peer import PeerConnection
from hypercache.net.tcp import TCP, TcpTransport
from hypercache.net.transport import Connection, Transport
from hypercache.observe import tracing
from hypercache.replication import wall_ms

__all__ = ["AsyncClient"]

_T = TypeVar("_T")


class AsyncClient(ClientBase):
    """An asyncio client of a hypercache cluster.

    ::

        async with AsyncClient("10.0.0.1:7400,10.0.0.2:7400") as cache:
            await cache.set("user:1", {"name": "Ada"}, ttl=60)
            await cache.get("user:1")        # {'name': 'Ada'}

    Takes the arguments of :class:`~hypercache.client.Client` (see there) but its
    connection pool's (``max_connections_per_node``, ``connection_factory``), and:

    :param transport: how connections to the nodes are made: a
        :class:`~hypercache.net.transport.Transport`, as
        :class:`~hypercache.cluster.Node` takes one. TCP by default
        (:data:`hypercache.net.tcp.TCP`); an :class:`~hypercache.net.inproc.InprocNetwork`
        reaches the in-process nodes of that network (tests, benchmarks). Only its
        ``connect`` is used.

    ``async with`` (or :meth:`connect`) reaches the cluster at once; without it the
    first request does. Each node gets **one** multiplexed connection: any number
    of tasks may issue requests at the same time, and their requests are pipelined
    on it. A client belongs to the event loop it first ran on, and to its process
    (unlike ``Client``, it is not for use across ``os.fork()``).

    A node whose request timed out, or that cannot be reached, is set aside and
    probed by a task of its own (one per node, cancelled by :meth:`close`) until it
    answers; see "Node health" in ``docs/client.md``. Which operations are retried
    on another node after a timeout is as for ``Client``: reads yes, writes no.

    :raises ConfigError: an argument is invalid (``field`` names it).
    """

    def __init__(
        self,
        seeds: str | Sequence[str] = DEFAULT_SEEDS,
        *,
        transport: Transport | None = None,
        **options: Unpack[ClientArgs],
    ) -> None:
        super().__init__(seeds, **options)
        if transport is None:
            tls = self.options.ssl
            transport = TCP if tls is None else TcpTransport(ssl=tls)
        self._transport: Transport = transport
        # address -> its connection, opened on first use (one attempt shared)
        self._peers: dict[str, PeerConnection] = {}
        self._refresh_task: asyncio.Task[Topology] | None = None
        # Read repairs in flight (fire and forget; referenced so that they are not
        # collected half-way; at most max_pending_repairs).
        self._background: set[asyncio.Task[Any]] = set()
        # address -> the task probing it while it is set aside (one per node)
        self._probes: dict[str, asyncio.Task[None]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> AsyncClient:
        """Reach the cluster now: fetch the partition table (``route="owner"``) or
        ping a seed (``route="any"``).

        :raises NodeUnavailableError: no seed is reachable.
        """
        if self._router.by_owner:
            await self._refresh()
        else:
            await self.ping()
        return self

    async def _reach(self) -> bool:
        # Before a first write that may be compressed: reach a node, whose HELLO
        # answer says whether it takes compressed values (failing, the write goes
        # on raw and meets the same failure). Whether values are compressed now.
        with contextlib.suppress(HyperCacheError):
            await self.connect()
        return self._codec.active is not None

    async def close(self) -> None:
        """Close every connection, stop the background table refresh and the probes.
        Idempotent."""
        self._closed = True
        task, self._refresh_task = self._refresh_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        probes, self._probes = list(self._probes.values()), {}
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        for pending in list(self._background):
            pending.cancel()
        peers, self._peers = self._peers, {}
        await asyncio.gather(*(peer.close() for peer in peers.values()), return_exceptions=True)

    async def __aenter__(self) -> AsyncClient:
        try:
            return await self.connect()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ operations

    async def get(self, key: Key, default: Any = None, *, consistency: Level = None) -> Any:
        """Return the value of ``key``, or ``default`` when absent (see ``Client.get``)."""
        k, level = self._get_request(key, consistency)
        with tracing.client_op("Client.get", k):
            return self._value(key, await self._read(k, level), default)

    async def set(
        self, key: Key, value: Any, ttl: float | None = None, *, consistency: Level = None
    ) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (see ``Client.set``)."""
        k, payload = self._set_request(key, value, ttl, consistency)
        if self._codec.pending(payload[1]) and await self._reach():
            payload[1] = self._encode(value)  # (once: the client's first write)
        with tracing.client_op("Client.set", k):
            if self._direct and await self._write_direct(k, payload):
                return
            ts = await self._call(commands.SET, k, payload)
            if ts is not None:
                self._observe(ts)  # the node's stamp: this client's next write is newer

    async def add(
        self, key: Key, value: Any, ttl: float | None = None, *, consistency: Level = None
    ) -> bool:
        """Store ``value`` only if ``key`` holds no live value (see ``Client.add``)."""
        k, payload = self._set_request(key, value, ttl, consistency)
        with tracing.client_op("Client.add", k):
            return await self._call(commands.ADD, k, payload)

    async def delete(self, key: Key, *, consistency: Level = None) -> bool:
        """Delete ``key``; return whether it existed."""
        k, payload = self._delete_request(key, consistency)
        with tracing.client_op("Client.delete", k):
            return await self._call(commands.DELETE, k, payload)

    async def get_many(self, keys: Iterable[Key], *, consistency: Level = None) -> dict[Key, Any]:
        """Return ``{key: value}`` for the keys that are present.

        Every key is read as by :meth:`get` (from its owners), all at once (up to
        1024 keys at a time), pipelined on the nodes' connections; each fails over
        on its own. The first error is raised once all are done.
        """
        wire, level = self._get_many_request(keys, consistency)
        ks = list(wire)
        answers: list[commands.Found | BaseException] = []
        for start in range(0, len(ks), BATCH):
            answers += await asyncio.gather(
                *(self._read(k, level) for k in ks[start : start + BATCH]),
                return_exceptions=True,
            )
        return self._get_many_result(wire, zip(ks, answers, strict=True))

    async def set_many(
        self, mapping: Mapping[Key, Any], ttl: float | None = None, *, consistency: Level = None
    ) -> None:
        """Store every item of ``mapping``, concurrently like :meth:`get_many`."""
        wire = self._set_many_requests(mapping, ttl, consistency)
        if self._pending(wire) and await self._reach():
            wire = self._set_many_requests(mapping, ttl, consistency)  # (once)
        requests = list(wire.items())
        answers: list[Any] = []
        for start in range(0, len(requests), BATCH):
            answers += await asyncio.gather(
                *(
                    self._call(commands.SET, k, payload)
                    for k, payload in requests[start : start + BATCH]
                ),
                return_exceptions=True,
            )
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
            if answer is not None:
                self._observe(answer)

    async def ping(self, address: str | None = None) -> float:
        """Round trip of a PING to ``address`` (or the first reachable node), in seconds."""
        start = time.perf_counter()
        if address is None:
            await self._call(commands.PING, None, None)
        else:
            commands.PING.read(await self._attempt(address, commands.PING.op, None))
        return time.perf_counter() - start

    async def leave(self, address: str) -> dict[str, Any]:
        """Ask the node at ``address`` to leave the cluster (see ``Client.leave``)."""
        return commands.LEAVE.read(await self._attempt(address, commands.LEAVE.op, []))

    async def remove(self, node_id: str) -> dict[str, Any]:
        """Take a dead member out of the ring (see ``Client.remove``)."""
        return await self._call(commands.REMOVE, None, [node_id])

    async def topology(self) -> Topology:
        """Fetch the partition table now and return it (routing uses it too)."""
        return await self._refresh()

    async def ttl(self, key: Key, *, consistency: Level = None) -> float | None:
        """Seconds left before ``key`` expires, ``None`` if never (see ``Client.ttl``).

        :raises KeyError: ``key`` is absent, deleted or expired.
        """
        answer = await self._call(commands.TTL, *self._ttl_request(key, consistency))
        return ttl_left(key, answer, wall_ms())

    async def expire(self, key: Key, ttl: float | None, *, consistency: Level = None) -> bool:
        """Give a live ``key`` a new TTL; whether it was live (see ``Client.expire``)."""
        return await self._call(commands.EXPIRE, *self._expire_request(key, ttl, consistency))

    def scan(
        self,
        address: str | None = None,
        *,
        pattern: str | bytes | None = None,
        page_size: int = SCAN_PAGE,
    ) -> AsyncIterator[bytes]:
        """The keys one node holds, page by page (see ``Client.scan``)::

            async for key in cache.scan("10.0.0.1:7400", pattern="user:*"):
                ...

        :raises ConfigError: a bad ``address``, ``pattern`` or ``page_size`` (at once).
        """
        prefix, match, page = self._scan_request(pattern, page_size)
        if address is not None:
            address = check_address(address)
        return self._scan(address, prefix, match, page)

    async def keys(
        self, pattern: str | bytes | None = None, *, limit: int | None = None
    ) -> list[bytes]:
        """The keys of every node, deduplicated and sorted (see ``Client.keys``)."""
        prefix, match, page = self._scan_request(pattern, SCAN_PAGE)
        most = check_count("limit", limit, allow_none=True)
        topology, nodes = await self._every_node()
        found: set[bytes] = set()
        listed: set[str] = set()
        errors: dict[str, BaseException] = {}
        for address in nodes:
            try:
                async for key in self._scan(address, prefix, match, page):
                    found.add(key)
                    if most is not None and len(found) >= most:
                        return sorted(found)[:most]
            except HyperCacheError as exc:
                errors[address] = exc
                continue
            listed.add(address)
        self._check_listed(topology, listed, errors)
        return sorted(found)

    async def flush(self) -> dict[str, int | HyperCacheError]:
        """Drop every entry of every node, all at once (see ``Client.flush``)."""
        _, nodes = await self._every_node()
        answers = await asyncio.gather(
            *(self._attempt(address, commands.FLUSH.op, []) for address in nodes),
            return_exceptions=True,
        )
        return {
            address: self._flush_answer(answer)
            for address, answer in zip(nodes, answers, strict=True)
        }

    # ------------------------------------------------------------------ internals

    async def _every_node(self) -> tuple[Topology | None, list[str]]:
        """The table (``None`` with ``route="any"``) and the nodes to send to."""
        if self._router.by_owner:
            topology = await self._refresh()
            return topology, list(topology.addresses)
        return None, list(self.options.seeds)

    async def _scan(
        self, address: str | None, prefix: bytes | None, match: KeyMatch | None, page: int
    ) -> AsyncIterator[bytes]:
        scan, op = commands.SCAN, commands.SCAN.op
        payload = self._scan_payload(None, page, prefix)
        if address is None:
            # The first page from the first node that answers; that node for the rest.
            if self._begin():
                await self._refresh_due()
            attempts = Failover(self, None, scan)
            address = attempts.first()
            while True:
                if address is None:
                    raise attempts.error()
                try:
                    keys, cursor = scan.read(await self._attempt(address, op, payload))
                    break
                except HyperCacheError as exc:
                    if not attempts.failed(address, exc):
                        raise
                address = attempts.next()
        else:
            keys, cursor = scan.read(await self._attempt(address, op, payload))
        while True:
            for key in keys:
                if match is None or match(key):
                    yield key
            if cursor is None:
                return
            payload = self._scan_payload(cursor, page, prefix)
            keys, cursor = scan.read(await self._attempt(address, op, payload))

    async def _refresh_due(self) -> None:
        """The table is due: fetch it (first time) or refresh it in the background."""
        if self._router.topology is None:
            # On failure (counted), route through the seeds meanwhile.
            with contextlib.suppress(HyperCacheError):
                await self._refresh()
        else:
            self._refresh_in_background()

    async def _read(self, key: bytes, level: str | None) -> commands.Found:
        """``(found, value)`` of ``key``: read from its owners (``R_GET``) when the
        table and the level are known, else through a node (``GET``)."""
        if self._begin():
            await self._refresh_due()
        rd = self._owner_read(key, level)
        if rd is not None:
            await self._ask_owners(rd)
            outcome = self._owner_outcome(rd)  # QuorumError: too few answered
            if outcome is not None:
                found, repairs = outcome
                for owner, payload in repairs:
                    self._repair(owner, payload)
                return found
        return await self._call(commands.GET, key, commands.get_payload(key, level))

    async def _write_direct(self, key: bytes, payload: list[Any]) -> bool:
        """Write ``SET``'s ``payload`` to the key's owners in one hop (``W_PUT``); return
        whether it reached its level (see ``Client._write_direct``)."""
        if self._begin():
            await self._refresh_due()
        for attempt in range(2):
            wr = self._direct_write(key, payload)
            if wr is None:
                return False
            ask = DirectAsk(self, wr, self._timeout)
            send = wr.start(self._router.is_down)
            for address in send:
                ask.launch(address)
            if send:
                await ask.done
            outcome = self._direct_outcome(wr)
            if outcome == DIRECT_OK:
                return True
            if outcome != DIRECT_STALE or attempt:
                break
            if self._stale_refetch_due():
                try:
                    await self._refresh()
                except HyperCacheError:
                    break
        self.stats.direct_write_fallbacks += 1
        return False

    async def _ask_owners(self, rd: OwnerRead) -> None:
        """Send ``R_GET`` to ``rd``'s owners, replacing each that fails, until done."""
        payload = [rd.key]
        r_get = commands.R_GET.op
        first = rd.start()
        if len(first) == 1:  # ONE (or a single owner): ask one after the other
            address: str | None = first[0]
            while address is not None:
                try:
                    raw = await self._attempt(address, r_get, payload)
                except HyperCacheError as exc:
                    address = self._owner_answer(rd, address, None, exc)
                    continue
                address = self._owner_answer(rd, address, raw, None)
            return
        ask = OwnerAsk(self, rd, self._timeout)  # callbacks, and no reference cycle
        for address in first:
            ask.launch(address)
        await ask.done

    def _repair(self, owner: str, payload: list[Any]) -> None:
        """Push ``payload`` to ``owner`` in the background (``R_PUT``), not waiting;
        dropped when ``max_pending_repairs`` pushes are in flight already, and not
        sent at all once a node refused one (it checks tokens)."""
        if self._repairs_refused:
            return
        if len(self._background) >= self.max_pending_repairs:
            self.stats.read_repairs_dropped += 1
            return
        self.stats.read_repairs += 1
        task = asyncio.get_running_loop().create_task(
            self._attempt(owner, commands.R_PUT.op, payload)
        )
        self._background.add(task)
        task.add_done_callback(self._repair_done)

    def _repair_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and isinstance(task.exception(), PermissionDeniedError):
            self._repairs_refused = True
        _consume(task)

    async def _call(self, cmd: commands.Command[_T], key: bytes | None, payload: Any) -> _T:
        """Send one request for ``key`` along its candidates (see :class:`Failover`)."""
        if self._begin():
            await self._refresh_due()
        return await self._run(Failover(self, key, cmd), payload)

    async def _run(self, attempts: Attempts[_T], payload: Any) -> _T:
        """Send one request to each address of ``attempts`` in turn, until one answers
        (or a failure is to be raised)."""
        op, read = attempts.op, attempts.read
        address = attempts.first()
        while address is not None:
            try:
                return read(await self._attempt(address, op, payload))
            except HyperCacheError as exc:
                if not attempts.failed(address, exc):
                    raise
            address = attempts.next()
        raise attempts.error()

    async def _attempt(self, address: str, op: int, payload: Any) -> Any:
        """One request to ``address``. Sets the node aside when it cannot be reached
        or the request timed out; brings it back when it was aside and answered.

        :raises NodeUnavailableError: cannot connect, or the connection broke.
        :raises RequestTimeoutError: no answer within ``timeout``.
        """
        try:
            return await self._peer(address).request(op, payload, self._timeout)
        except NoAnswerError:
            # no answer in time (raised on our side; a node's error answer that
            # happens to be a timeout is an answer: the node is alive)
            self._suspect(address)
            raise

    def _peer(self, address: str) -> PeerConnection:
        """The connection to ``address``: made on first use. A connection that breaks
        or cannot be made sets the node aside; any answer brings it back."""
        peer = self._peers.get(address)
        if peer is None:
            self._check_open()
            peer = self._peers[address] = PeerConnection(
                address,
                self._dial,
                backoff_max=0,  # the client sets a failed node aside and probes it
                on_answer=functools.partial(self._answered, address),
                on_lost=functools.partial(self._lost, address),
                on_connected=self._connected,
            )
        return peer

    def _answered(self, address: str) -> None:
        if self._router.is_down(address):
            self._recovered(address)

    def _lost(self, address: str, exc: BaseException) -> None:
        if isinstance(exc, NodeUnavailableError):  # (a refused handshake is an answer)
            self._node_down(address)

    def _connected(self, conn: Connection) -> None:
        self.stats.connections_opened += 1
        self._handshaken(conn)

    async def _dial(self, address: str) -> Connection:
        return await self._transport.connect(
            address, self._hello, self._limits, self.options.connect_timeout
        )

    # ------------------------------------------------------------------ probes

    def _start_probe(self, address: str) -> None:
        if self._closed:
            return
        task = self._probes.get(address)
        if task is not None and not task.done():
            return  # one probe per node
        task = asyncio.get_running_loop().create_task(
            self._probe(address), name=f"hypercache-probe {address}"
        )
        self._probes[address] = task
        task.add_done_callback(functools.partial(self._probe_done, address))

    def _probe_done(self, address: str, task: asyncio.Task[None]) -> None:
        if self._probes.get(address) is task:
            del self._probes[address]
        _consume(task)

    async def _probe(self, address: str) -> None:
        """PING ``address`` until it answers (then use it again), the client closes, it
        is brought back otherwise, or it leaves the table. Never raises a node's error."""
        router, stats = self._router, self.stats
        timeout = self._probe_timeout
        delays = self._probe_delays()
        while router.is_down(address) and not self._closed:
            if not router.knows(address):
                router.mark_up(address)  # nothing routes to it: forget it
                return
            stats.probes += 1
            try:
                await self._peer(address).request(commands.PING.op, None, timeout)
            except HyperCacheError:
                stats.probes_failed += 1
                await asyncio.sleep(next(delays))
                continue
            self._recovered(address)
            return

    def _refresh_in_background(self) -> asyncio.Task[Topology]:
        """Start fetching the table unless a fetch is in flight; return the fetch."""
        task = self._refresh_task
        if task is None or task.done():
            task = self._refresh_task = asyncio.get_running_loop().create_task(self._fetch())
            task.add_done_callback(_consume)
        return task

    async def _refresh(self) -> Topology:
        """Fetch the table, sharing a fetch already in flight."""
        return await asyncio.shield(self._refresh_in_background())

    async def _fetch(self) -> Topology:
        return await self._run(TopologyFetch(self), None)


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve a background task's exception so that asyncio does not log it."""
    if not task.cancelled():
        task.exception()
