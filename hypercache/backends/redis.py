"""Redis, Valkey and Redis Cluster behind the backend interface, through redis-py
(with hiredis parsing replies, when installed: ``pip install 'hypercache[redis]'``).

- :class:`RedisBackend` / :class:`AsyncRedisBackend` wrap a ``redis.Redis`` or a
  ``redis.cluster.RedisCluster`` (their ``redis.asyncio`` twins for the async one).
- A read that wants the entry's remaining TTL too (:meth:`RedisBackend.get_entry`)
  is one round trip: ``GET`` and ``PTTL`` written together on one connection (on a
  cluster, a Lua script answering both).
- :meth:`RedisBackend.add` is ``SET NX PX``; :meth:`RedisBackend.delete_if` a
  compare-and-delete script: the leases of the tiered cache's stampede protection.
- :meth:`RedisBackend.watch` is RESP3 client-side tracking in broadcast mode: a
  connection of its own (per node, on a cluster) says ``CLIENT TRACKING ON BCAST
  PREFIX <namespace>`` and hears an ``invalidate`` push for every write to a key of
  the namespace, from any client; ``FLUSHDB`` and ``FLUSHALL`` push "everything".
  The link is pinged every ``ping_interval`` seconds; when it breaks (or the ping
  gets no answer) the callback hears ``(None, False)`` and it is dialled again.
- redis-py errors become the hypercache tree: no connection is
  :class:`~hypercache.errors.NodeUnavailableError`, no answer in time
  :class:`~hypercache.errors.RequestTimeoutError`, a refused command
  :class:`~hypercache.errors.ServerError`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis._parsers import _RESP3Parser
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from hypercache.backends.base import (
    MISSING,
    AsyncBackend,
    Backend,
    Entry,
    Invalidation,
    InvalidationCallback,
    _Missing,
    check_ttl,
)
from hypercache.client._common import ttl_to_ms
from hypercache.client.serializer import Serializer
from hypercache.errors import NodeUnavailableError, RequestTimeoutError, ServerError

__all__ = ["AsyncRedisBackend", "RedisBackend", "redis_error"]

#: Seconds a Redis call may take (connect, or one reply) unless the URL says otherwise.
DEFAULT_TIMEOUT = 1.0

# GET and PTTL in one round trip: false (a nil reply) when absent.
_GET_TTL = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('PTTL', KEYS[1])}
"""
# Delete a lease only if it still holds our token.
_DEL_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: What an invalidation connection differs in: RESP3 (pushes) and a name to find it by
#: in ``CLIENT LIST``.
_TRACKING: dict[str, Any] = {
    "protocol": 3,
    "parser_class": _RESP3Parser,
    "client_name": "hypercache-invalidation",
}

SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


def redis_error(exc: redis.RedisError) -> Exception:
    """The hypercache error for a redis-py one (kept as ``__cause__`` by callers)."""
    if isinstance(exc, redis.TimeoutError):
        return RequestTimeoutError(f"redis: no answer in time: {exc}")
    if isinstance(
        exc, redis.ConnectionError | redis.exceptions.ClusterDownError | redis.BusyLoadingError
    ):
        return NodeUnavailableError(f"redis: cannot reach the server: {exc}")
    if isinstance(exc, redis.exceptions.RedisClusterException) and "connection" in str(exc).lower():
        return NodeUnavailableError(f"redis: cannot reach the cluster: {exc}")
    return ServerError(f"redis: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise redis_error(exc) from exc


def _px(ttl: float | None) -> int | None:
    check_ttl(ttl)
    return ttl_to_ms(ttl)


def _left(pttl: int) -> float | None:
    return None if pttl < 0 else pttl / 1000


def _glob_escape(prefix: bytes) -> bytes:
    out = bytearray()
    for b in prefix:
        if b in b"*?[]\\":
            out += b"\\"
        out.append(b)
    return bytes(out)


def client_options(timeout: float) -> dict[str, Any]:
    """The redis-py keyword arguments that bound every call by ``timeout`` seconds."""
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(ExponentialBackoff(cap=0.05, base=0.005), 1),
    }


class RedisBackend(Backend):
    """A backend over a ``redis.Redis`` or a ``redis.cluster.RedisCluster``.

    :param client: the redis-py client; build it with :func:`client_options` (or
        let :func:`hypercache.open` do it) so that no call outlives its deadline.
    :param namespace: prefix of every key; :meth:`clear` drops those keys only
        (``SCAN MATCH`` and ``UNLINK``; with no namespace, every key of the db).
    :param serializer: how values become bytes (msgpack by default).
    :param ping_interval: seconds between two pings of an invalidation link.
    """

    scheme = "redis"

    def __init__(
        self,
        client: SyncClient,
        *,
        namespace: str | bytes = "",
        serializer: Serializer | None = None,
        ping_interval: float = 1.0,
    ) -> None:
        super().__init__(namespace=namespace, serializer=serializer)
        self.client = client
        self.cluster = isinstance(client, redis.cluster.RedisCluster)
        self.ping_interval = ping_interval
        self._get_ttl = client.register_script(_GET_TTL)
        self._del_if = client.register_script(_DEL_IF)
        # standalone: get_entry talks to a pooled connection itself (a cluster client
        # routes by slot, so there it is the script)
        self._pool: Any = None if self.cluster else client.connection_pool  # type: ignore[union-attr]
        self._watches: list[Invalidation] = []

    def get_entry(self, key: str | bytes) -> Entry | _Missing:
        full = self._k(key)
        try:
            if self._pool is not None:
                value, pttl = self._get_pttl(full)
            else:
                answer = self._get_ttl(keys=[full])
                if answer is None:
                    return MISSING
                value, pttl = answer
        except redis.RedisError as exc:
            raise redis_error(exc) from exc
        if value is None or pttl == -2:
            return MISSING
        return self.serializer.loads(bytes(value)), _left(pttl)

    def _get_pttl(self, full: bytes) -> tuple[Any, int]:
        # GET and PTTL written together on one connection, the two replies read back:
        # one round trip, and cheaper than EVALSHA (no Lua on the server) or a
        # redis-py pipeline (no command stack). A failure midway leaves the
        # connection out of step: it is closed before it goes back to the pool.
        pool = self._pool
        assert pool is not None
        conn = pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_commands([("GET", full), ("PTTL", full)]))
            value = conn.read_response()
            pttl = conn.read_response()
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        return value, int(pttl)

    def get_entries(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Entry]:
        given = list(keys)
        if not given:
            return {}
        with _mapped():
            pipe = self.client.pipeline(transaction=False)
            if self.cluster:
                # A cluster pipeline refuses scripts: GET and PTTL, side by side (an
                # entry that expires between the two is left out).
                for k in given:
                    full = self._k(k)
                    pipe.get(full)
                    pipe.pttl(full)
                flat = pipe.execute()
                answers = [
                    None if v is None or t == -2 else (v, t)
                    for v, t in zip(flat[::2], flat[1::2], strict=True)
                ]
            else:
                for k in given:
                    self._get_ttl(keys=[self._k(k)], client=pipe)
                answers = pipe.execute()
        loads = self.serializer.loads
        return {
            k: (loads(a[0]), _left(a[1]))
            for k, a in zip(given, answers, strict=True)
            if a is not None
        }

    def get(self, key: str | bytes, default: Any = None) -> Any:
        try:
            data = self.client.get(self._k(key))
        except redis.RedisError as exc:
            raise redis_error(exc) from exc
        return default if data is None else self.serializer.loads(data)  # type: ignore[arg-type]

    def set(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        px = _px(ttl)
        data = self.serializer.dumps(value)
        with _mapped():
            self.client.set(self._k(key), data, px=px)

    def add(self, key: str | bytes, value: Any, ttl: float | None = None) -> bool:
        px = _px(ttl)
        data = self.serializer.dumps(value)
        with _mapped():
            return bool(self.client.set(self._k(key), data, px=px, nx=True))

    def delete(self, key: str | bytes) -> bool:
        with _mapped():
            return bool(self.client.delete(self._k(key)))

    def delete_if(self, key: str | bytes, value: Any) -> bool:
        data = self.serializer.dumps(value)
        with _mapped():
            return bool(self._del_if(keys=[self._k(key)], args=[data]))

    def get_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        given = list(keys)
        if not given:
            return {}
        full = [self._k(k) for k in given]
        with _mapped():
            if isinstance(self.client, redis.cluster.RedisCluster):
                values = self.client.mget_nonatomic(full)
            else:
                values = self.client.mget(full)
        loads = self.serializer.loads
        return {k: loads(v) for k, v in zip(given, values, strict=True) if v is not None}

    def set_many(self, mapping: Mapping[str | bytes, Any], ttl: float | None = None) -> None:
        px = _px(ttl)
        if not mapping:
            return
        dumps = self.serializer.dumps
        with _mapped():
            pipe = self.client.pipeline(transaction=False)
            for k, v in mapping.items():
                pipe.set(self._k(k), dumps(v), px=px)
            pipe.execute()

    def ttl(self, key: str | bytes) -> float | None:
        with _mapped():
            pttl = self.client.pttl(self._k(key))
        if pttl == -2:
            raise KeyError(key)
        return _left(pttl)

    def clear(self) -> int:
        match = _glob_escape(self.namespace) + b"*"
        n = 0
        with _mapped():
            batch: list[bytes] = []
            for k in self.client.scan_iter(match=match, count=1000):
                batch.append(k)
                if len(batch) >= 500:
                    n += self._unlink(batch)
                    batch = []
            if batch:
                n += self._unlink(batch)
        return n

    def _unlink(self, keys: list[bytes]) -> int:
        if isinstance(self.client, redis.cluster.RedisCluster):
            return sum(int(self.client.unlink(k)) for k in keys)
        return int(self.client.unlink(*keys))

    def ping(self) -> None:
        with _mapped():
            self.client.ping()

    # ------------------------------------------------------------ notifications

    def watch(self, callback: InvalidationCallback) -> Invalidation:
        """RESP3 broadcast tracking of this namespace (see the module docstring)."""
        strip = len(self.namespace)

        def on_keys(keys: list[bytes] | None, connected: bool) -> None:
            callback(None if keys is None else [k[strip:] for k in keys], connected)

        if isinstance(self.client, redis.cluster.RedisCluster):
            w: Invalidation = _ClusterWatch(
                self.client, self.namespace, on_keys, self.ping_interval
            )
        else:
            pool = self.client.connection_pool
            kwargs = dict(pool.connection_kwargs)

            def dial() -> redis.connection.AbstractConnection:
                return pool.connection_class(  # type: ignore[no-any-return]
                    **{**kwargs, **_TRACKING}
                )

            w = _Tracker(dial, self.namespace, on_keys, self.ping_interval, "redis")
        self._watches.append(w)
        return w

    def close(self) -> None:
        for w in self._watches:
            w.close()
        self._watches.clear()
        with contextlib.suppress(redis.RedisError):
            self.client.close()

    def __repr__(self) -> str:
        kind = "cluster" if self.cluster else "standalone"
        return f"RedisBackend({kind}, namespace={self.namespace!r})"


class _Tracker(Invalidation):
    """One tracking connection, on a thread of its own, dialled again when it breaks."""

    def __init__(
        self,
        dial: Callable[[], Any],
        prefix: bytes,
        callback: InvalidationCallback,
        ping_interval: float,
        name: str,
    ) -> None:
        self._dial = dial
        self._prefix = prefix
        self._callback = callback
        self._ping_interval = ping_interval
        self._stop = threading.Event()
        self._connected = False
        self._conn: Any = None
        self.reconnects = 0
        self._thread = threading.Thread(
            target=self._run, name=f"hypercache-invalidation-{name}", daemon=True
        )
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connected

    def close(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _pushed(self, message: list[Any]) -> None:
        keys = message[1]
        if not self._stop.is_set():
            self._callback(None if keys is None else list(keys), True)

    def _run(self) -> None:
        delay = 0.05
        while not self._stop.is_set():
            conn = None
            try:
                conn = self._conn = self._dial()
                conn.connect()
                conn._parser.set_invalidation_push_handler(self._pushed)
                args: list[Any] = ["CLIENT", "TRACKING", "ON", "BCAST"]
                if self._prefix:
                    args += ["PREFIX", self._prefix]
                conn.send_command(*args)
                conn.read_response()
                self._connected = True
                delay = 0.05
                # Anything written while we were not listening is unknown: say so.
                self._callback(None, True)
                self._listen(conn)
            except Exception:
                pass
            finally:
                if self._connected:
                    self._connected = False
                    self.reconnects += 1
                    if not self._stop.is_set():
                        self._callback(None, False)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.disconnect()
            self._stop.wait(delay)
            delay = min(delay * 2, 1.0)

    def _listen(self, conn: Any) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            if conn.can_read(timeout=min(0.2, self._ping_interval)):
                conn.read_response(push_request=True)
            if time.monotonic() - last >= self._ping_interval:
                # A ping that gets no answer in socket_timeout breaks the link: a
                # silent, half-open connection is not trusted for longer than that.
                conn.send_command("PING")
                conn.read_response()  # pushes before the PONG go to _pushed
                last = time.monotonic()


class _ClusterWatch(Invalidation):
    """A tracker per node of a Redis Cluster (primaries and replicas: after a
    failover the new primary's link is up already), and new nodes added as the
    client learns of them."""

    def __init__(
        self,
        client: redis.cluster.RedisCluster,
        prefix: bytes,
        callback: InvalidationCallback,
        ping_interval: float,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._callback = callback
        self._ping_interval = ping_interval
        self._trackers: dict[str, _Tracker] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sync_nodes()
        self._thread = threading.Thread(
            target=self._supervise, name="hypercache-invalidation-cluster", daemon=True
        )
        self._thread.start()

    @property
    def connected(self) -> bool:
        with self._lock:
            trackers = list(self._trackers.values())
        return bool(trackers) and all(t.connected for t in trackers)

    def _on(self, keys: list[bytes] | None, _connected: bool) -> None:
        self._callback(keys, self.connected)

    def _sync_nodes(self) -> None:
        with contextlib.suppress(redis.RedisError):
            nodes = self._client.get_nodes()  # type: ignore[no-untyped-call]
            for node in nodes:
                if node.name in self._trackers or self._stop.is_set():
                    continue
                kwargs = dict(node.redis_connection.connection_pool.connection_kwargs)
                cls = node.redis_connection.connection_pool.connection_class

                def dial(kwargs: dict[str, Any] = kwargs, cls: Any = cls) -> Any:
                    return cls(**{**kwargs, **_TRACKING})

                with self._lock:
                    self._trackers[node.name] = _Tracker(
                        dial, self._prefix, self._on, self._ping_interval, node.name
                    )

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            self._sync_nodes()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            trackers = list(self._trackers.values())
            self._trackers.clear()
        for t in trackers:
            t.close()


class AsyncRedisBackend(AsyncBackend):
    """The asyncio twin of :class:`RedisBackend`, over ``redis.asyncio.Redis`` or
    ``redis.asyncio.cluster.RedisCluster``. :meth:`watch` needs the connection
    settings of a sync client: pass ``sync`` (``hypercache.open_async`` does)."""

    scheme = "redis"

    def __init__(
        self,
        client: AsyncClient,
        *,
        namespace: str | bytes = "",
        serializer: Serializer | None = None,
        sync: RedisBackend | None = None,
    ) -> None:
        super().__init__(namespace=namespace, serializer=serializer)
        self.client = client
        self._sync = sync
        self._pool: Any = (
            None
            if isinstance(client, redis.asyncio.cluster.RedisCluster)
            else client.connection_pool
        )
        self._get_ttl = client.register_script(_GET_TTL)
        self._del_if = client.register_script(_DEL_IF)

    async def get_entry(self, key: str | bytes) -> Entry | _Missing:
        full = self._k(key)
        try:
            if self._pool is not None:
                value, pttl = await self._get_pttl(full)
            else:
                answer = await self._get_ttl(keys=[full])
                if answer is None:
                    return MISSING
                value, pttl = answer
        except redis.RedisError as exc:
            raise redis_error(exc) from exc
        if value is None or pttl == -2:
            return MISSING
        return self.serializer.loads(bytes(value)), _left(pttl)

    async def _get_pttl(self, full: bytes) -> tuple[Any, int]:
        # As RedisBackend._get_pttl: GET and PTTL in one write on a pooled connection.
        pool = self._pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(conn.pack_commands([("GET", full), ("PTTL", full)]))
            value = await conn.read_response()
            pttl = await conn.read_response()
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return value, int(pttl)

    async def get(self, key: str | bytes, default: Any = None) -> Any:
        try:
            data = await self.client.get(self._k(key))
        except redis.RedisError as exc:
            raise redis_error(exc) from exc
        return default if data is None else self.serializer.loads(data)  # type: ignore[arg-type]

    async def set(self, key: str | bytes, value: Any, ttl: float | None = None) -> None:
        px = _px(ttl)
        data = self.serializer.dumps(value)
        with _mapped():
            await self.client.set(self._k(key), data, px=px)

    async def add(self, key: str | bytes, value: Any, ttl: float | None = None) -> bool:
        px = _px(ttl)
        data = self.serializer.dumps(value)
        with _mapped():
            return bool(await self.client.set(self._k(key), data, px=px, nx=True))

    async def delete(self, key: str | bytes) -> bool:
        with _mapped():
            return bool(await self.client.delete(self._k(key)))

    async def delete_if(self, key: str | bytes, value: Any) -> bool:
        data = self.serializer.dumps(value)
        with _mapped():
            return bool(await self._del_if(keys=[self._k(key)], args=[data]))

    async def get_many(self, keys: Iterable[str | bytes]) -> dict[str | bytes, Any]:
        given = list(keys)
        if not given:
            return {}
        full = [self._k(k) for k in given]
        with _mapped():
            if isinstance(self.client, redis.asyncio.cluster.RedisCluster):
                values = await self.client.mget_nonatomic(full)
            else:
                values = await self.client.mget(full)
        loads = self.serializer.loads
        return {k: loads(v) for k, v in zip(given, values, strict=True) if v is not None}

    async def set_many(self, mapping: Mapping[str | bytes, Any], ttl: float | None = None) -> None:
        px = _px(ttl)
        if not mapping:
            return
        dumps = self.serializer.dumps
        with _mapped():
            pipe = self.client.pipeline(transaction=False)
            for k, v in mapping.items():
                pipe.set(self._k(k), dumps(v), px=px)
            await pipe.execute()

    async def ttl(self, key: str | bytes) -> float | None:
        with _mapped():
            pttl = await self.client.pttl(self._k(key))
        if pttl == -2:
            raise KeyError(key)
        return _left(pttl)

    async def clear(self) -> int:
        match = _glob_escape(self.namespace) + b"*"
        n = 0
        with _mapped():
            async for k in self.client.scan_iter(match=match, count=1000):
                n += int(await self.client.unlink(k))
        return n

    async def ping(self) -> None:
        with _mapped():
            await self.client.ping()

    def watch(self, callback: InvalidationCallback) -> Invalidation | None:
        return None if self._sync is None else self._sync.watch(callback)

    async def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
        with contextlib.suppress(redis.RedisError):
            await self.client.aclose()
