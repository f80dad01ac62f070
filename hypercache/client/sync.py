"""The blocking client: :class:`Client`."""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import functools
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final, TypeVar, Unpack

from hypercache.client import commands
from hypercache.client._common import (
    BATCH,
    DEFAULT_SEEDS,
    DIRECT_OK,
    DIRECT_STALE,
    SCAN_PAGE,
    ClientArgs,
    ClientBase,
    DirectWrite,
    KeyMatch,
    OwnerRead,
    check_address,
    check_count,
    ttl_left,
)
from hypercache.client.commands import Level
from hypercache.client.failover import Attempts, Failover, TopologyFetch
from hypercache.client.keys import Key
from hypercache.client.pool import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IDLE,
    BlockingConnect,
    ConnectionPool,
    after_fork,
)
from hypercache.client.topology import Topology
from hypercache.errors import (
    ConfigError,
    HyperCacheError,
    NoAnswerError,
    NodeUnavailableError,
    PermissionDeniedError,
    QuorumError,
)
from hypercache.net.blocking import UNANSWERED, BlockingConnection, pipeline_all
from hypercache.net.protocol import Op
from hypercache.observe import tracing
from hypercache.replication import wall_ms

__all__ = ["Client"]

_T = TypeVar("_T")
_W_PUT: Final = int(Op.W_PUT)
_W_HINT: Final = int(Op.W_HINT)
# Worker threads of one client: they send the requests of a read to its other
# owners while the calling thread sends its own, and push read repairs.
_WORKERS: Final = 16


class Client(ClientBase):
    """A blocking client of a hypercache cluster.

    ::

        with Client("10.0.0.1:7400,10.0.0.2:7400") as cache:
            cache.set("user:1", {"name": "Ada"}, ttl=60)
            cache.get("user:1")              # {'name': 'Ada'}
            cache.get_many(["user:1", "user:2"])

    :param seeds: ``"host:port"`` of one or more nodes, as a comma-separated string
        or a sequence. Any live node can answer; more seeds survive more failures.
    :param cluster_name: the cluster's name (nodes refuse other clusters).
    :param auth_token: the cluster's shared secret, or this client's token when the
        nodes check tokens (see ``docs/security.md``).
    :param ssl: TLS to the nodes, like redis-py's: an :class:`ssl.SSLContext`,
        ``True`` (the system's CAs), the path of a CA file, or a dict with ``ca``,
        ``cert``, ``key`` (a client certificate, for mTLS) and ``check_hostname``.
        A given ``connection_factory`` is left to open its own TLS.
    :param timeout: deadline of each request, in seconds.
    :param connect_timeout: deadline of opening a connection (and its handshake).
    :param consistency: default level of every operation (``"one"``, ``"quorum"``,
        ``"all"`` or a :class:`~hypercache.Consistency`); ``None`` lets each node
        apply its configured read/write defaults.
    :param serializer: how values become bytes; default msgpack (see
        :mod:`hypercache.client.serializer`).
    :param compression: how values are compressed before they are sent: a
        :class:`~hypercache.client.compression.Compression` (level, min_size),
        ``"zstd"`` (default: level 1, from 1 KiB) or ``"off"``/``None``. Values
        are read back decompressed whatever this setting (see
        :mod:`hypercache.client.compression`). Negotiated: values are compressed
        only once a node's HELLO answer says it takes them (a first large write
        reaches a node first), never after one said it does not
        (:attr:`compressing` tells which).
    :param route: ``"owner"`` (default) fetches the partition table once, reads
        straight from the key's owners (``R_GET`` to as many as the level needs,
        newest version wins, stale owners repaired in the background) and sends
        writes to the key's primary, failing over to the other owners and then to
        any node; ``"any"`` sends to the seeds round-robin and lets the
        node proxy (for clients that cannot reach the addresses nodes advertise).
    :param limits: size limits; keys and values are checked before sending.
    :param topology_refresh: seconds between two fetches of the partition table.
        It is also fetched again soon after a node is found unreachable.
    :param max_connections_per_node: connections open at most to each node (default
        64). A thread that finds them all in use waits for one, for at most
        ``timeout``, then raises :class:`~hypercache.errors.RequestTimeoutError`
        (the request was not sent; the node is not set aside). Counted in
        ``stats.pool_waits`` and ``stats.pool_timeouts``.
    :param connection_factory: opens one connection:
        ``(address, hello, limits, connect_timeout) -> BlockingConnection``;
        :class:`~hypercache.net.blocking.BlockingConnection` by default (or a
        subclass of it, or a wrapper: for tests, or another socket). The sync
        counterpart of ``AsyncClient``'s ``transport``.

    Connections are opened lazily (call :meth:`connect` to fail fast) and kept: each
    node has a :class:`~hypercache.client.pool.ConnectionPool`, and a connection
    serves one thread at a time, so a ``Client`` may be shared by any number of
    threads; requests of concurrent threads go out on separate connections, up to
    ``max_connections_per_node`` (8 idle ones per node are kept).

    **Fork safety.** A ``Client`` may be made before ``os.fork()`` and used on both
    sides: in the child, its first operation notices the new process (``os.getpid()``)
    and starts again with its own connections (each pool drops the parent's, whose
    sockets the two processes would otherwise share), locks, worker threads and
    probes; the parent's connections stay open and in use by the parent.

    **Failures.** A node that cannot be reached, or whose request got no answer
    within ``timeout``, is set aside: no operation is sent to it while another
    candidate is left, and a daemon thread of the client probes it (``PING``, one
    thread per node at a time, stopped by :meth:`close`) until it answers; see
    "Node health" in ``docs/client.md``. What an operation does when its node fails:

    - cannot connect, or the connection broke: it moves on to the next candidate
      (the next owner, then any node, which coordinates);
    - timed out: a read (``get``, ``get_many``, ``ping``, ``topology``) moves on to
      another owner or node not set aside; a write (``set``, ``delete``,
      ``set_many``) raises :class:`~hypercache.errors.RequestTimeoutError`: its
      outcome is unknown (the node may apply it when it wakes up), and sending it
      elsewhere too could apply it twice, out of order.

    :raises ConfigError: an argument is invalid (``field`` names it).
    """

    def __init__(
        self,
        seeds: str | Sequence[str] = DEFAULT_SEEDS,
        *,
        max_connections_per_node: int = DEFAULT_MAX_CONNECTIONS,
        connection_factory: BlockingConnect = BlockingConnection,
        **options: Unpack[ClientArgs],
    ) -> None:
        cap = max_connections_per_node
        if type(cap) is not int or cap < 1:
            raise ConfigError(
                "max_connections_per_node", f"must be a positive integer, got {cap!r}"
            )
        if not callable(connection_factory):
            raise ConfigError("connection_factory", "must be callable")
        super().__init__(seeds, **options)
        self._max_connections = cap
        tls = self.options.ssl
        if tls is not None and connection_factory is BlockingConnection:
            connection_factory = functools.partial(BlockingConnection, ssl=tls)
        self._connection_factory = connection_factory
        self._pid = os.getpid()
        self._pools: dict[str, ConnectionPool] = {}
        self._lock = threading.Lock()
        # address -> the thread probing it while it is set aside (one per node); both
        # guarded by _lock, with _closed
        self._probing: dict[str, threading.Thread] = {}
        self._stop = threading.Event()  # set by close(): probes stop waiting
        self._refreshing = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._repairs_pending = 0  # read-repair pushes queued or in flight

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> Client:
        """Reach the cluster now: fetch the partition table (``route="owner"``) or
        ping a seed (``route="any"``), instead of waiting for the first request.

        :raises NodeUnavailableError: no seed is reachable.
        """
        if self._router.by_owner:
            self._refresh()
        else:
            self.ping()
        return self

    def _reach(self) -> bool:
        # Before a first write that may be compressed: reach a node, whose HELLO
        # answer says whether it takes compressed values (failing, the write goes
        # on raw and meets the same failure). Whether values are compressed now.
        with contextlib.suppress(HyperCacheError):
            self.connect()
        return self._codec.active is not None

    def close(self) -> None:
        """Close every connection, once the read repairs still queued went out (each
        bounded by ``timeout``), and stop the probes (each within its deadline).
        Idempotent; the client cannot be used afterwards."""
        self._check_fork()
        self._stop.set()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        with self._lock:
            self._closed = True
            pools, self._pools = self._pools, {}
            executor, self._executor = self._executor, None
            probes, self._probing = list(self._probing.values()), {}
        if executor is not None:  # made by a request that raced with close()
            executor.shutdown(wait=False, cancel_futures=True)
        # A probe is in a PING (at most the probe timeout) or connecting (at most
        # connect_timeout); it sees _stop right after.
        wait = self.options.connect_timeout + self._probe_timeout + 1.0
        for thread in probes:
            thread.join(wait)
        for pool in pools.values():
            pool.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ operations

    def get(self, key: Key, default: Any = None, *, consistency: Level = None) -> Any:
        """Return the value of ``key``, or ``default`` when it is absent or expired.

        :raises TypeError: ``key`` is neither ``str`` nor ``bytes``.
        :raises KeyTooLargeError: ``key`` is over the key size limit.
        :raises NodeUnavailableError: no node could be reached.
        :raises QuorumError: too few replicas answered for ``consistency``.
        :raises RequestTimeoutError: the node did not answer within ``timeout``.
        :raises UndecodableValueError: the value cannot be decoded by ``serializer``.
        """
        k, level = self._get_request(key, consistency)
        with tracing.client_op("Client.get", k):
            result = self._read({k: None}, level)[k]
        if isinstance(result, BaseException):
            raise result
        return self._value(key, result, default)

    def set(
        self, key: Key, value: Any, ttl: float | None = None, *, consistency: Level = None
    ) -> None:
        """Store ``value`` under ``key``, for ``ttl`` seconds (``None``: no expiry).

        :raises TypeError: the serializer cannot encode ``value``.
        :raises ValueTooLargeError: the encoded value is over the value size limit.
        :raises ConfigError: ``ttl`` is not positive.

        and the errors of :meth:`get`.
        """
        k, payload = self._set_request(key, value, ttl, consistency)
        if self._codec.pending(payload[1]) and self._reach():
            payload[1] = self._encode(value)  # (once: the client's first write)
        with tracing.client_op("Client.set", k):
            if self._direct and self._write_direct(k, payload):
                return
            ts = self._call(commands.SET, k, payload)
            if ts is not None:
                self._observe(ts)  # the node's stamp: this client's next write is newer

    def add(
        self, key: Key, value: Any, ttl: float | None = None, *, consistency: Level = None
    ) -> bool:
        """Store ``value`` under ``key`` only if it holds no live value; return whether
        it was stored. The key's first live owner checks and writes, with nothing in
        between, then replicates as :meth:`set` does: of concurrent ``add`` s of one
        key, one wins (see ``docs/cluster.md`` for what a failover does to that).
        Errors as for :meth:`set`."""
        k, payload = self._set_request(key, value, ttl, consistency)
        with tracing.client_op("Client.add", k):
            return self._call(commands.ADD, k, payload)

    def delete(self, key: Key, *, consistency: Level = None) -> bool:
        """Delete ``key``; return whether it existed. Errors as for :meth:`get`."""
        k, payload = self._delete_request(key, consistency)
        with tracing.client_op("Client.delete", k):
            return self._call(commands.DELETE, k, payload)

    def get_many(self, keys: Iterable[Key], *, consistency: Level = None) -> dict[Key, Any]:
        """Return ``{key: value}`` for the keys that are present (misses are left out).

        Each key is read as by :meth:`get`, from its owners: the ``R_GET`` requests
        are grouped by owner and each group is pipelined on one connection (one
        write, then the answers), the groups of different owners at the same time,
        so n keys on m nodes cost about one round trip per wave, not n. A key whose
        owner fails moves on to its next owner. The first error of any key is
        raised once all are done.
        """
        wire, level = self._get_many_request(keys, consistency)
        return self._get_many_result(wire, self._read(dict.fromkeys(wire), level).items())

    def set_many(
        self, mapping: Mapping[Key, Any], ttl: float | None = None, *, consistency: Level = None
    ) -> None:
        """Store every item of ``mapping`` (same ``ttl`` for all), pipelined like
        :meth:`get_many`. The first error is raised once every item was tried."""
        requests = self._set_many_requests(mapping, ttl, consistency)
        if self._pending(requests) and self._reach():
            requests = self._set_many_requests(mapping, ttl, consistency)  # (once)
        stamps = [ts for ts in self._batch(commands.SET, requests).values() if ts is not None]
        if stamps:
            self._observe(max(stamps))

    def ping(self, address: str | None = None) -> float:
        """Round trip of a PING to ``address`` (or to the first reachable node), in seconds.

        :raises NodeUnavailableError: the node (or every node) is unreachable.
        """
        start = time.perf_counter()
        if address is None:
            self._call(commands.PING, None, None)
        else:
            self._check_fork()
            commands.PING.read(self._attempt(address, commands.PING.op, None, pipeline=False))
        return time.perf_counter() - start

    def leave(self, address: str) -> dict[str, Any]:
        """Ask the node at ``address`` to leave the cluster: it hands its partitions
        over to their new owners (for at most its ``leave_timeout``), then stops.
        Returns at once with ``{"node_id", "leaving", "leave_timeout"}``; the node
        stops answering once it is done.

        :raises NodeUnavailableError: the node is unreachable.
        """
        self._check_fork()
        answer = self._attempt(address, commands.LEAVE.op, [], pipeline=False)
        return commands.LEAVE.read(answer)

    def remove(self, node_id: str) -> dict[str, Any]:
        """Take the dead (or suspect) member ``node_id`` out of the ring, through any
        node (the removal is gossiped): ``{"node_id", "removed", "version"}``,
        ``removed`` false when it was removed already. Its hints are dropped.

        :raises ConfigError: (field ``node``) not a member, or not dead nor suspect.
        """
        return self._call(commands.REMOVE, None, [node_id])

    def topology(self) -> Topology:
        """Fetch the partition table now and return it (routing uses it too).

        :raises NodeUnavailableError: no node is reachable.
        """
        return self._refresh()

    def ttl(self, key: Key, *, consistency: Level = None) -> float | None:
        """Seconds left before ``key`` expires, or ``None`` if it never does, as
        :meth:`HyperCache.ttl <hypercache.HyperCache.ttl>` answers. The node that
        coordinates it reads the owners as for :meth:`get` (same level default,
        same read repair); the seconds are counted on this machine's clock from
        the absolute expiry the entry carries, so clock skew between this machine
        and the nodes shows in them.

        :raises KeyError: ``key`` is absent, deleted or expired.

        and the errors of :meth:`get`.
        """
        answer = self._call(commands.TTL, *self._ttl_request(key, consistency))
        return ttl_left(key, answer, wall_ms())

    def expire(self, key: Key, ttl: float | None, *, consistency: Level = None) -> bool:
        """Give ``key`` a new TTL of ``ttl`` seconds from now (``None``: never expire),
        if it is live; return whether it was (``False``: nothing was written).

        A read then a write, by the key's primary: the value read is written back
        with the new expiry as a new version, through the write path of :meth:`set`
        (``consistency`` applies to both; default: the nodes' write level). Not
        atomic: a ``set`` of the key concurrent with it may lose to it (the old value
        comes back) or win, whichever the nodes' clocks stamp last.

        :raises ConfigError: ``ttl`` is not positive.

        and the errors of :meth:`set` (a timeout is not retried elsewhere).
        """
        return self._call(commands.EXPIRE, *self._expire_request(key, ttl, consistency))

    def scan(
        self,
        address: str | None = None,
        *,
        pattern: str | bytes | None = None,
        page_size: int = SCAN_PAGE,
    ) -> Iterator[bytes]:
        """The keys one node holds (live entries, as wire ``bytes``), a ``SCAN`` page
        of at most ``page_size`` keys at a time, in the node's order (partition, then
        key bytes); a key held from start to end comes exactly once.

        :param address: the node; ``None``: the first one that answers (table
            order, then the seeds), kept for every page.
        :param pattern: a glob (``*``, ``?``, ``[...]``) the keys must match; its
            literal prefix is filtered on the node.
        :raises ConfigError: a bad ``address``, ``pattern`` or ``page_size`` (at
            once, before anything is sent).
        :raises NodeUnavailableError: the node (or, with ``address=None``, every
            node) cannot be reached; also between pages if it fails then.
        """
        self._check_fork()
        prefix, match, page = self._scan_request(pattern, page_size)
        if address is not None:
            address = check_address(address)
        return self._scan(address, prefix, match, page)

    def keys(self, pattern: str | bytes | None = None, *, limit: int | None = None) -> list[bytes]:
        """The keys of every node of the table (the seeds with ``route="any"``),
        listed with :meth:`scan` node after node, deduplicated and sorted. Each node
        sends every key it holds, so the cost is the keys times the replication.

        :param limit: stop once that many distinct keys are found (which ones is
            not specified).
        :raises NodeUnavailableError: some partitions have no owner that could be
            listed (their keys would be missing), or no node could be.
        :raises ConfigError: a bad ``pattern`` or ``limit``.
        """
        self._check_fork()
        prefix, match, page = self._scan_request(pattern, SCAN_PAGE)
        most = check_count("limit", limit, allow_none=True)
        topology, nodes = self._every_node()
        found: builtins.set[bytes] = builtins.set()
        listed: builtins.set[str] = builtins.set()
        errors: dict[str, BaseException] = {}
        for address in nodes:
            try:
                for key in self._scan(address, prefix, match, page):
                    found.add(key)
                    if most is not None and len(found) >= most:
                        return sorted(found)[:most]
            except HyperCacheError as exc:
                errors[address] = exc
                continue
            listed.add(address)
        self._check_listed(topology, listed, errors)
        return sorted(found)

    def flush(self) -> dict[str, int | HyperCacheError]:
        """Drop every entry of every node of the table (the seeds with
        ``route="any"``), sending ``FLUSH`` to all of them at once; return, per
        address, the entries it dropped or the error that kept it from answering. A
        node that did not get it keeps its entries, and anti-entropy copies them back
        to the others: check the result, and flush again once it is back.

        :raises NodeUnavailableError: the table cannot be fetched.
        """
        self._check_fork()
        _, nodes = self._every_node()
        answers = self._fanout({address: [(commands.FLUSH.op, [])] for address in nodes})
        return {
            address: self._flush_answer(
                a if isinstance(a := answers[address], BaseException) else a[0]
            )
            for address in nodes
        }

    # ------------------------------------------------------------------ internals

    def _every_node(self) -> tuple[Topology | None, list[str]]:
        """The table (``None`` with ``route="any"``) and the nodes to send to."""
        if self._router.by_owner:
            topology = self._refresh()
            return topology, list(topology.addresses)
        return None, list(self.options.seeds)

    def _scan(
        self, address: str | None, prefix: bytes | None, match: KeyMatch | None, page: int
    ) -> Iterator[bytes]:
        scan, op = commands.SCAN, commands.SCAN.op
        payload = self._scan_payload(None, page, prefix)
        if address is None:
            # The first page from the first node that answers; that node for the rest.
            if self._begin():
                self._try_refresh()
            attempts = Failover(self, None, scan)
            address = attempts.first()
            while True:
                if address is None:
                    raise attempts.error()
                try:
                    keys, cursor = scan.read(self._attempt(address, op, payload, pipeline=False))
                    break
                except HyperCacheError as exc:
                    if not attempts.failed(address, exc):
                        raise
                address = attempts.next()
        else:
            keys, cursor = scan.read(self._attempt(address, op, payload, pipeline=False))
        while True:
            for key in keys:
                if match is None or match(key):
                    yield key
            if cursor is None:
                return
            payload = self._scan_payload(cursor, page, prefix)
            keys, cursor = scan.read(self._attempt(address, op, payload, pipeline=False))

    def _begin(self) -> bool:
        # ClientBase._begin with _check_fork, inline: every operation passes here.
        if self._pid != os.getpid():
            after_fork(self)
        if self._closed:
            raise self._closed_error()
        return self._router.needs_refresh(time.monotonic())

    def _check_fork(self) -> None:
        """Start again in a child process (see "Fork safety" and :func:`after_fork`)."""
        if self._pid != os.getpid():
            after_fork(self)

    def _reset_in_child(self) -> None:
        """The first operation in a child process (see :func:`after_fork`): the
        parent's threads (probes, workers) do not exist here, and the locks they held
        stay held; start again with new ones. Each pool drops the parent's
        connections itself."""
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._stop = threading.Event()
        if self._closed:
            self._stop.set()
        self._probing = {}
        self._executor = None
        self._repairs_pending = 0
        for pool in list(self._pools.values()):
            after_fork(pool)  # this client uses them without their own check
        for address in self._router.down:
            self._start_probe(address)  # the parent's probes stayed in the parent

    def _pool(self, address: str) -> ConnectionPool:
        pool = self._pools.get(address)
        if pool is None:
            with self._lock:
                self._check_open()
                pool = self._pools.get(address)
                if pool is None:
                    pool = self._pools[address] = ConnectionPool(
                        address,
                        self._open,
                        max_connections=self._max_connections,
                        max_idle=DEFAULT_MAX_IDLE,
                        stats=self.stats,
                    )
        return pool

    def _open(self, address: str) -> BlockingConnection:
        connect_timeout = self.options.connect_timeout
        conn = self._connection_factory(address, self._hello, self._limits, connect_timeout)
        self.stats.connections_opened += 1
        self._handshaken(conn)
        return conn

    def _call(self, cmd: commands.Command[_T], key: bytes | None, payload: Any) -> _T:
        """Send one request for ``key`` along its candidates (see :class:`Failover`)."""
        if self._begin():
            self._try_refresh()
        return self._run(Failover(self, key, cmd), payload)

    def _run(self, attempts: Attempts[_T], payload: Any) -> _T:
        """Send one request to each address of ``attempts`` in turn, until one answers
        (or a failure is to be raised)."""
        op, read = attempts.op, attempts.read
        address = attempts.first()
        while address is not None:
            try:
                return read(self._attempt(address, op, payload, pipeline=False))
            except HyperCacheError as exc:
                if not attempts.failed(address, exc):
                    raise
            address = attempts.next()
        raise attempts.error()

    def _attempt(self, address: str, op: int, payload: Any, *, pipeline: bool) -> Any:
        """One attempt on ``address``: a request, or a pipeline when ``pipeline``
        (``payload`` is then the list of ``(op, payload)``).

        A connection that broke is dropped and the node set aside; one that timed
        out (a request without an answer in time, on our side) goes back to the pool
        and the node is set aside; one that merely carried an error answer goes back
        to the pool; one interrupted by a non-hypercache exception
        (KeyboardInterrupt...) is closed, its stream being in doubt. An answer from
        a node set aside brings it back.

        :raises NodeUnavailableError: cannot connect, or the connection broke.
        :raises RequestTimeoutError: no answer within ``timeout``.
        """
        timeout = self._timeout
        pool = self._pool(address)
        try:
            conn = pool._acquire(timeout)
        except NodeUnavailableError:
            if not self._closed:
                self._node_down(address)
            raise
        try:
            if pipeline:
                result = conn.pipeline(payload, timeout)
            else:
                result = conn.request(op, payload, timeout)
        except NodeUnavailableError:
            if conn.closed:  # our connection broke (not an answer from the node)
                self._node_down(address)
            pool._release(conn)
            raise
        except HyperCacheError as exc:
            pool._release(conn)
            if isinstance(exc, NoAnswerError):
                self._suspect(address)
            raise
        except BaseException:
            conn.close()
            pool._release(conn)
            raise
        if pipeline:
            self._health(address, conn, result)
        elif self._router.is_down(address):
            self._recovered(address)  # it answered
        pool._release(conn)
        return result

    def _health(self, address: str, conn: BlockingConnection, results: Any) -> None:
        """After an exchange on ``conn`` that returned (a pipeline's ``results`` may hold
        errors): set ``address`` aside if the connection broke or no answer came in
        time (a :class:`NoAnswerError` among them), else it answered."""
        if conn.closed:  # a pipeline whose connection broke half-way
            self._node_down(address)
        elif any(isinstance(r, NoAnswerError) for r in results):
            self._suspect(address)
        elif self._router.is_down(address):
            self._recovered(address)

    # ------------------------------------------------------------------ probes

    def _start_probe(self, address: str) -> None:
        with self._lock:
            if self._closed or self._stop.is_set() or address in self._probing:
                return  # one probe per node
            thread = threading.Thread(
                target=self._probe, args=(address,), name=f"hypercache-probe {address}"
            )
            thread.daemon = True
            self._probing[address] = thread
            thread.start()

    def _probe(self, address: str) -> None:
        """PING ``address`` until it answers (then use it again), the client closes, it
        is brought back otherwise, or it leaves the table.

        Whether to go on is decided under ``_lock``, where :meth:`_start_probe` looks
        for a running probe: a node set aside again just as its probe decides to stop
        gets a new probe."""
        router, stats, stop = self._router, self.stats, self._stop
        timeout = self._probe_timeout
        delays = self._probe_delays()
        while True:
            with self._lock:
                if self._closed or stop.is_set() or not router.is_down(address):
                    self._forget_probe(address)
                    return
                if not router.knows(address):  # nothing routes to it: forget it
                    router.mark_up(address)
                    self._forget_probe(address)
                    return
            stats.probes += 1
            if self._ping_once(address, timeout):
                with self._lock:
                    self._recovered(address)
                    self._forget_probe(address)
                return
            stats.probes_failed += 1
            if stop.wait(next(delays)):
                with self._lock:
                    self._forget_probe(address)
                return

    def _forget_probe(self, address: str) -> None:
        """Under ``_lock``: the probe of ``address`` (this thread) ends."""
        if self._probing.get(address) is threading.current_thread():
            del self._probing[address]

    def _ping_once(self, address: str, timeout: float) -> bool:
        """One probe: whether ``address`` answered a PING within ``timeout``, over a
        pooled connection, or a new one if none is idle. A pooled connection found
        closed (the node restarted: the others are likely stale too) is dropped and
        the next one tried at once, up to a new connection."""
        try:
            pool = self._pool(address)
        except HyperCacheError:
            return False
        for _ in range(pool.max_idle + 1):
            try:
                conn = pool._acquire(timeout)
            except HyperCacheError:
                return False  # cannot connect
            try:
                conn.request(commands.PING.op, None, timeout)
            except HyperCacheError:
                if not conn.closed:
                    return False  # no answer in time, or an error answer
                continue
            except BaseException:
                conn.close()
                raise
            finally:
                pool._release(conn)
            return True
        return False

    def _read(
        self, keys: dict[bytes, None], level: str | None
    ) -> dict[bytes, commands.Found | BaseException]:
        """``(found, value)`` (or the error) of each key, read from its owners
        (``R_GET``) when the table and the level are known, else through a node."""
        if self._begin():
            self._try_refresh()
        reads: dict[bytes, OwnerRead] = {}
        proxied: list[bytes] = []
        wave: dict[str, list[bytes]] = {}
        for k in keys:
            rd = self._owner_read(k, level)
            if rd is None:
                proxied.append(k)
                continue
            reads[k] = rd
            for address in rd.start():
                wave.setdefault(address, []).append(k)
        r_get = commands.R_GET.op
        while wave:
            answers = self._fanout(
                {address: [(r_get, [k]) for k in ks] for address, ks in wave.items()}
            )
            asked, wave = wave, {}
            for address, ks in asked.items():
                got = answers[address]
                for i, k in enumerate(ks):
                    raw = got if isinstance(got, BaseException) else got[i]
                    if isinstance(raw, HyperCacheError):
                        nxt = self._owner_answer(reads[k], address, None, raw)
                    else:
                        nxt = self._owner_answer(reads[k], address, raw, None)
                    if nxt is not None:
                        wave.setdefault(nxt, []).append(k)
        out: dict[bytes, commands.Found | BaseException] = {}
        repairs: dict[str, list[tuple[int, Any]]] = {}
        for k, rd in reads.items():
            try:
                outcome = self._owner_outcome(rd)
            except QuorumError as exc:
                out[k] = exc
                continue
            if outcome is None:
                proxied.append(k)
                continue
            out[k], stale = outcome
            for owner, payload in stale:
                repairs.setdefault(owner, []).append((commands.R_PUT.op, payload))
        if repairs and not self._repairs_refused:
            self._repair(repairs)
        if proxied:
            try:
                if len(proxied) == 1:
                    k = proxied[0]
                    out[k] = self._call(commands.GET, k, commands.get_payload(k, level))
                else:
                    out.update(
                        self._batch(
                            commands.GET, {k: commands.get_payload(k, level) for k in proxied}
                        )
                    )
            except HyperCacheError as exc:
                for k in proxied:
                    out.setdefault(k, exc)
        return out

    def _write_direct(self, key: bytes, payload: list[Any]) -> bool:
        """Write ``SET``'s ``payload`` to the key's owners in one hop (``W_PUT``, stamped
        by this client); return whether it reached its level (else the caller sends
        it through a node). A stale table is fetched once, and the write tried again.

        :raises PermissionDeniedError: no ``write`` scope (and the errors of a ``SET``
        that a node would refuse the same way).
        """
        if self._begin():
            self._try_refresh()
        for attempt in range(2):
            wr = self._direct_write(key, payload)
            if wr is None:
                return False
            self._send_direct(wr)
            outcome = self._direct_outcome(wr)
            if outcome == DIRECT_OK:
                for via, hint in wr.hints():
                    self.stats.write_hints += 1
                    with contextlib.suppress(HyperCacheError):  # anti-entropy, else
                        self._attempt(via, _W_HINT, hint, pipeline=False)
                return True
            if outcome != DIRECT_STALE or attempt:
                break
            if self._stale_refetch_due():
                try:
                    self._refresh()
                except HyperCacheError:
                    break
        self.stats.direct_write_fallbacks += 1
        return False

    def _send_direct(self, wr: DirectWrite) -> None:
        """Send ``wr`` to its owners at once from this thread; return at its level (the
        owners not answered by then are left: their answers are skipped)."""
        send = wr.start(self._router.is_down)
        if not send:
            return
        request = [(_W_PUT, wr.payload)]
        if len(send) == 1:
            address = send[0]
            try:
                raw = self._attempt(address, _W_PUT, wr.payload, pipeline=False)
            except HyperCacheError as exc:
                wr.answer(address, None, exc)
            else:
                wr.answer(address, raw, None)
            return
        answers = self._send_groups_at_once(dict.fromkeys(send, request), need=wr.required)
        for address in send:
            got = answers[address]
            raw = got if isinstance(got, BaseException) else got[0]
            if raw is UNANSWERED:
                continue
            if isinstance(raw, BaseException):
                wr.answer(address, None, raw)
            else:
                wr.answer(address, raw, None)

    def _workers(self) -> ThreadPoolExecutor:
        executor = self._executor
        if executor is None:
            with self._lock:
                self._check_open()
                executor = self._executor
                if executor is None:
                    executor = self._executor = ThreadPoolExecutor(
                        _WORKERS, thread_name_prefix="hypercache-client"
                    )
        return executor

    def _send_group(
        self, address: str, requests: list[tuple[int, Any]]
    ) -> list[Any] | BaseException:
        """Pipeline ``requests`` to ``address``: the answers (or errors) in order, or
        the error that kept every one of them from the node."""
        results: list[Any] = []
        try:
            for start in range(0, len(requests), BATCH):
                chunk = requests[start : start + BATCH]
                if len(chunk) == 1:
                    op, payload = chunk[0]
                    try:
                        results.append(self._attempt(address, op, payload, pipeline=False))
                    except NodeUnavailableError:
                        raise
                    except HyperCacheError as exc:
                        results.append(exc)
                else:
                    results += self._attempt(address, 0, chunk, pipeline=True)
        except HyperCacheError as exc:
            if not results:
                return exc
            results += [exc] * (len(requests) - len(results))
        return results

    def _fanout(
        self, groups: dict[str, list[tuple[int, Any]]]
    ) -> dict[str, list[Any] | BaseException]:
        """Send each group to its node, all nodes at once: from the calling thread
        alone (:meth:`_send_groups_at_once`), or, when a group is too big for one
        pipeline, the calling thread takes one group and the worker threads the others."""
        items = list(groups.items())
        if len(items) == 1:
            address, requests = items[0]
            return {address: self._send_group(address, requests)}
        if all(len(requests) <= BATCH for _, requests in items):
            return self._send_groups_at_once(groups)
        try:
            executor = self._workers()
            # Each worker in the caller's trace context (its own copy: one context
            # cannot be entered by two threads at once).
            futures: list[Future[list[Any] | BaseException]] = [
                executor.submit(contextvars.copy_context().run, self._send_group, address, requests)
                for address, requests in items[1:]
            ]
        except RuntimeError:  # the executor shut down: the client was closed meanwhile
            raise self._closed_error() from None
        out = {items[0][0]: self._send_group(*items[0])}
        for (address, _), fut in zip(items[1:], futures, strict=True):
            out[address] = fut.result()
        return out

    def _send_groups_at_once(
        self, groups: dict[str, list[tuple[int, Any]]], need: int | None = None
    ) -> dict[str, list[Any] | BaseException]:
        """:meth:`_fanout` from this thread alone: one connection per node, every
        group sent before any answer is awaited (see ``pipeline_all``; with ``need``,
        only until ``need`` groups are answered without error)."""
        out: dict[str, list[Any] | BaseException] = {}
        taken: list[tuple[str, ConnectionPool, BlockingConnection]] = []
        timeout = self._timeout
        try:
            # In address order: a thread never waits for a pool while holding a
            # connection of a later one, so two threads at the cap of two pools
            # cannot wait for each other.
            for address in sorted(groups):
                pool = self._pool(address)
                try:
                    taken.append((address, pool, pool._acquire(timeout)))
                except HyperCacheError as exc:  # cannot connect, or the HELLO refused
                    if isinstance(exc, NodeUnavailableError):
                        self._node_down(address)
                    out[address] = exc
            answers = pipeline_all(
                [(conn, groups[address]) for address, _, conn in taken], self._timeout, need
            )
        except BaseException:
            for _, pool, conn in taken:  # streams in doubt
                conn.close()
                pool._release(conn)
            raise
        for (address, pool, conn), results in zip(taken, answers, strict=True):
            # broke: what it did not answer failed; timed out: the node is set aside
            self._health(address, conn, results)
            pool._release(conn)
            out[address] = results
        return out

    def _repair(self, repairs: dict[str, list[tuple[int, Any]]]) -> None:
        """Push the newest entries to stale owners from the worker threads, without
        waiting (a failed push is dropped: anti-entropy repairs it later). Pushes
        beyond ``max_pending_repairs`` in flight are dropped and counted."""
        stats = self.stats
        try:
            executor = self._workers()
        except NodeUnavailableError:
            return  # closed meanwhile
        for address, requests in repairs.items():
            with self._lock:
                room = max(self.max_pending_repairs - self._repairs_pending, 0)
                if len(requests) > room:
                    stats.read_repairs_dropped += len(requests) - room
                    requests = requests[:room]
                self._repairs_pending += len(requests)
            if not requests:
                continue
            try:
                # In the caller's trace context (a read's span): contextvars do not
                # follow work into the executor's threads by themselves.
                pushed = executor.submit(
                    contextvars.copy_context().run, self._send_group, address, requests
                )
            except RuntimeError:  # closed meanwhile
                self._repairs_done(len(requests))
                return
            stats.read_repairs += len(requests)
            pushed.add_done_callback(functools.partial(self._repairs_done, len(requests)))

    def _repairs_done(self, n: int, pushed: Future[Any] | None = None) -> None:
        with self._lock:
            self._repairs_pending -= n
        if pushed is not None and not pushed.cancelled() and pushed.exception() is None:
            results = pushed.result()
            answers = results if isinstance(results, list) else [results]
            if any(isinstance(a, PermissionDeniedError) for a in answers):
                self._repairs_refused = True

    def _batch(self, cmd: commands.Command[_T], requests: dict[bytes, Any]) -> dict[bytes, _T]:
        """Send ``cmd`` for many keys (key -> payload), pipelined per node; return
        key -> what ``cmd`` reads from its answer."""
        if self._begin():
            self._try_refresh()
        router = self._router
        groups: dict[str, list[bytes]] = {}
        for k in requests:
            groups.setdefault(router.first(k), []).append(k)
        answers: dict[bytes, _T] = {}
        retry: list[bytes] = []
        first_error: BaseException | None = None
        op, read = cmd.op, cmd.read
        for address, keys in groups.items():
            for start in range(0, len(keys), BATCH):
                chunk = keys[start : start + BATCH]
                batch = [(op, requests[k]) for k in chunk]
                self.stats.requests += len(chunk)
                try:
                    results = self._attempt(address, 0, batch, pipeline=True)
                except NodeUnavailableError:
                    retry.extend(chunk)
                    continue
                for k, result in zip(chunk, results, strict=True):
                    if isinstance(result, NodeUnavailableError):
                        retry.append(k)  # the connection broke under the batch
                    elif isinstance(result, BaseException):
                        first_error = first_error or result
                    else:
                        try:
                            answers[k] = read(result)
                        except HyperCacheError as exc:
                            first_error = first_error or exc
        for k in retry:
            self.stats.failovers += 1
            self.stats.requests -= 1  # _call counts it again
            try:
                answers[k] = self._call(cmd, k, requests[k])
            except HyperCacheError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return answers

    def _try_refresh(self) -> None:
        """Fetch the table if no other thread is; on failure keep routing with the old one."""
        if not self._refreshing.acquire(blocking=False):
            return
        try:
            self._refresh_locked()
        except HyperCacheError:
            pass  # counted; requests go on via the old table or the seeds
        finally:
            self._refreshing.release()

    def _refresh(self) -> Topology:
        self._check_fork()
        with self._refreshing:
            return self._refresh_locked()

    def _refresh_locked(self) -> Topology:
        return self._run(TopologyFetch(self), None)
