"""The blocking client: :class:`Client`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeVar

from hypercache.client._common import (
    BATCH,
    ClientBase,
    decode_get,
    ttl_to_ms,
    unreachable,
    wire_consistency,
)
from hypercache.client.keys import Key, normalize_key
from hypercache.client.topology import Topology
from hypercache.consistency import Consistency
from hypercache.errors import HyperCacheError, NodeUnavailableError, ProtocolError
from hypercache.net.blocking import BlockingConnection
from hypercache.net.protocol import Op

__all__ = ["Client"]

_T = TypeVar("_T")
_GET: Final = int(Op.GET)
_SET: Final = int(Op.SET)
_DELETE: Final = int(Op.DELETE)
_PING: Final = int(Op.PING)
_TOPOLOGY: Final = int(Op.TOPOLOGY)
# Idle connections kept per node; more threads at once open more, closed on return.
_MAX_IDLE: Final = 8


class _Pool:
    """Connections to one node. A connection is used by one thread at a time."""

    __slots__ = ("_closed", "_connect", "_idle", "_lock")

    def __init__(self, connect: Callable[[], BlockingConnection]) -> None:
        self._connect = connect
        self._idle: list[BlockingConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> BlockingConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def release(self, conn: BlockingConnection) -> None:
        if not conn.closed:
            with self._lock:
                if not self._closed and len(self._idle) < _MAX_IDLE:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


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
    :param auth_token: the cluster's shared secret, if it has one.
    :param timeout: deadline of each request, in seconds.
    :param connect_timeout: deadline of opening a connection (and its handshake).
    :param consistency: default level of every operation (``"one"``, ``"quorum"``,
        ``"all"`` or a :class:`~hypercache.Consistency`); ``None`` lets each node
        apply its configured read/write defaults.
    :param serializer: how values become bytes; default msgpack (see
        :mod:`hypercache.client.serializer`).
    :param route: ``"owner"`` (default) fetches the partition table once and sends
        each request straight to the key's owners, failing over to the other owners
        and then to any node; ``"any"`` sends to the seeds round-robin and lets the
        node proxy (for clients that cannot reach the addresses nodes advertise).
    :param limits: size limits; keys and values are checked before sending.
    :param topology_refresh: seconds between two fetches of the partition table.
        It is also fetched again soon after a node is found unreachable.

    Connections are opened lazily (call :meth:`connect` to fail fast) and kept:
    each node has a small pool, and a connection serves one thread at a time, so a
    ``Client`` may be shared by any number of threads; requests of concurrent
    threads go out on separate connections (at most 8 idle connections per node
    are kept). Not fork-safe: create clients after forking.

    :raises ConfigError: an argument is invalid (``field`` names it).
    """

    def _init_transport(self) -> None:
        self._pools: dict[str, _Pool] = {}
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()

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

    def close(self) -> None:
        """Close every connection. Idempotent; the client cannot be used afterwards."""
        with self._lock:
            self._closed = True
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(seeds={','.join(self.options.seeds)!r}, route={self.options.route!r})"

    # ------------------------------------------------------------------ operations

    def get(
        self, key: Key, default: Any = None, *, consistency: Consistency | str | None = None
    ) -> Any:
        """Return the value of ``key``, or ``default`` when it is absent or expired.

        :raises TypeError: ``key`` is neither ``str`` nor ``bytes``.
        :raises KeyTooLargeError: ``key`` is over the key size limit.
        :raises NodeUnavailableError: no node could be reached.
        :raises QuorumError: too few replicas answered for ``consistency``.
        :raises RequestTimeoutError: the node did not answer within ``timeout``.
        """
        k = normalize_key(key, self._limits)
        level = wire_consistency(consistency, self._default)
        found, value = decode_get(self._call(k, _GET, [k, level]))
        return self._loads(value) if found else default

    def set(
        self,
        key: Key,
        value: Any,
        ttl: float | None = None,
        *,
        consistency: Consistency | str | None = None,
    ) -> None:
        """Store ``value`` under ``key``, for ``ttl`` seconds (``None``: no expiry).

        :raises TypeError: the serializer cannot encode ``value``.
        :raises ValueTooLargeError: the encoded value is over the value size limit.
        :raises ConfigError: ``ttl`` is not positive.

        and the errors of :meth:`get`.
        """
        k = normalize_key(key, self._limits)
        payload = [
            k,
            self._encode(value),
            ttl_to_ms(ttl),
            wire_consistency(consistency, self._default),
        ]
        self._call(k, _SET, payload)

    def delete(self, key: Key, *, consistency: Consistency | str | None = None) -> bool:
        """Delete ``key``; return whether it existed. Errors as for :meth:`get`."""
        k = normalize_key(key, self._limits)
        return bool(self._call(k, _DELETE, [k, wire_consistency(consistency, self._default)]))

    def get_many(
        self, keys: Iterable[Key], *, consistency: Consistency | str | None = None
    ) -> dict[Key, Any]:
        """Return ``{key: value}`` for the keys that are present (misses are left out).

        Keys are grouped by the node they go to and each group is pipelined on one
        connection (one write, then the answers), so n keys on m nodes cost about m
        round trips, not n. A group whose node fails is retried key by key with the
        usual failover. The first error of any key is raised once all are done.
        """
        level = wire_consistency(consistency, self._default)
        wire = self._wire_keys(keys)
        requests = {k: (_GET, [k, level]) for k in wire}
        answers = self._batch(requests)
        out: dict[Key, Any] = {}
        for k, answer in answers.items():
            found, value = decode_get(answer)
            if found:
                out[wire[k]] = self._loads(value)
        return out

    def set_many(
        self,
        mapping: Mapping[Key, Any],
        ttl: float | None = None,
        *,
        consistency: Consistency | str | None = None,
    ) -> None:
        """Store every item of ``mapping`` (same ``ttl`` for all), pipelined like
        :meth:`get_many`. The first error is raised once every item was tried."""
        level = wire_consistency(consistency, self._default)
        ttl_ms = ttl_to_ms(ttl)
        limits = self._limits
        requests = {}
        for key, value in mapping.items():
            k = normalize_key(key, limits)
            requests[k] = (_SET, [k, self._encode(value), ttl_ms, level])
        self._batch(requests)

    def ping(self, address: str | None = None) -> float:
        """Round trip of a PING to ``address`` (or to the first reachable node), in seconds.

        :raises NodeUnavailableError: the node (or every node) is unreachable.
        """
        start = time.perf_counter()
        if address is not None:
            answer = self._call_at(address, _PING, None)
        else:
            answer = self._call(None, _PING, None)
        elapsed = time.perf_counter() - start
        if answer != "pong":
            raise ProtocolError(f"unexpected PING answer: {answer!r:.100}")
        return elapsed

    def topology(self) -> Topology:
        """Fetch the partition table now and return it (routing uses it too).

        :raises NodeUnavailableError: no node is reachable.
        """
        return self._refresh()

    # ------------------------------------------------------------------ internals

    def _encode(self, value: Any) -> bytes:
        data = self._dumps(value)
        self._limits.check_value(data)
        return data

    def _wire_keys(self, keys: Iterable[Key]) -> dict[bytes, Key]:
        if isinstance(keys, str | bytes):
            raise TypeError("keys must be an iterable of keys, not a single key")
        limits = self._limits
        return {normalize_key(key, limits): key for key in keys}

    def _pool(self, address: str) -> _Pool:
        pool = self._pools.get(address)
        if pool is None:
            with self._lock:
                if self._closed:
                    raise NodeUnavailableError("the client is closed")
                pool = self._pools.get(address)
                if pool is None:
                    pool = self._pools[address] = _Pool(lambda: self._open(address))
        return pool

    def _open(self, address: str) -> BlockingConnection:
        options = self.options
        conn = BlockingConnection(address, self._hello, self._limits, options.connect_timeout)
        self.stats.connections_opened += 1
        return conn

    def _call_at(self, address: str, op: int, payload: Any) -> Any:
        return self._attempt(address, op, payload, pipeline=False)

    def _call(self, key: bytes | None, op: int, payload: Any) -> Any:
        """Send one request for ``key``, failing over along the router's candidates."""
        if self._closed:
            raise NodeUnavailableError("the client is closed")
        router = self._router
        if router.needs_refresh(time.monotonic()):
            self._try_refresh()
        self.stats.requests += 1
        errors: dict[str, BaseException] = {}
        for address in router.candidates(key):
            if errors:
                self.stats.failovers += 1
            try:
                result = self._attempt(address, op, payload, pipeline=False)
            except NodeUnavailableError as exc:
                errors[address] = exc
                continue
            return result
        raise unreachable(f"op {Op(op).name}", errors)

    def _attempt(self, address: str, op: int, payload: Any, *, pipeline: bool) -> Any:
        """One attempt on ``address``: a request, or a pipeline when ``pipeline``
        (``payload`` is then the list of ``(op, payload)``).

        A connection that broke is dropped and the node marked down; one that
        merely carried an error answer goes back to the pool; one interrupted by
        a non-hypercache exception (KeyboardInterrupt...) is closed, its stream
        being in doubt.

        :raises NodeUnavailableError: cannot connect, or the connection broke.
        """
        timeout = self._timeout
        pool = self._pool(address)
        try:
            conn = pool.acquire()
        except NodeUnavailableError:
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
            pool.release(conn)
            raise
        except HyperCacheError:
            pool.release(conn)
            raise
        except BaseException:
            conn.close()
            raise
        if conn.closed:  # a pipeline whose connection broke half-way
            self._node_down(address)
        pool.release(conn)
        return result

    def _node_down(self, address: str) -> None:
        self.stats.nodes_marked_down += 1
        self._router.mark_down(address, time.monotonic())

    def _batch(self, requests: dict[bytes, tuple[int, Any]]) -> dict[bytes, Any]:
        """Send many keyed requests, pipelined per node; return key -> answer."""
        if self._closed:
            raise NodeUnavailableError("the client is closed")
        router = self._router
        if router.needs_refresh(time.monotonic()):
            self._try_refresh()
        groups: dict[str, list[bytes]] = {}
        for k in requests:
            groups.setdefault(router.first(k), []).append(k)
        answers: dict[bytes, Any] = {}
        retry: list[bytes] = []
        first_error: BaseException | None = None
        for address, keys in groups.items():
            for start in range(0, len(keys), BATCH):
                chunk = keys[start : start + BATCH]
                batch = [requests[k] for k in chunk]
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
                        answers[k] = result
        for k in retry:
            self.stats.failovers += 1
            self.stats.requests -= 1  # _call counts it again
            op, payload = requests[k]
            try:
                answers[k] = self._call(k, op, payload)
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
        with self._refreshing:
            return self._refresh_locked()

    def _refresh_locked(self) -> Topology:
        router = self._router
        errors: dict[str, BaseException] = {}
        for address in router.fetch_order():
            try:
                answer = self._attempt(address, _TOPOLOGY, None, pipeline=False)
                topology = Topology.from_wire(answer)
            except HyperCacheError as exc:
                errors[address] = exc
                continue
            router.set_topology(topology, time.monotonic())
            router.mark_up(address)
            self.stats.topology_refreshes += 1
            return topology
        self.stats.topology_errors += 1
        router.refresh_failed(time.monotonic())
        if all(isinstance(exc, NodeUnavailableError) for exc in errors.values()):
            raise unreachable("TOPOLOGY", errors)
        raise next(exc for exc in errors.values() if not isinstance(exc, NodeUnavailableError))
