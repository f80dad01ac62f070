"""Backends: one interface (:class:`Backend`, :class:`AsyncBackend`) over the stores a
:class:`~hypercache.tiered.TieredCache` can sit in front of.

==========================================  =============================================
URL                                         backend
==========================================  =============================================
``memory://?max_items=10000&policy=lru``    :class:`~.memory.MemoryBackend` (in-process)
``redis://[user:pass@]host:6379/0``         :class:`~.redis.RedisBackend` (``redis.Redis``)
``rediss://host:6380/0``                    the same over TLS
``redis+cluster://h1:7000,h2:7001``         :class:`~.redis.RedisBackend` over
                                            ``redis.cluster.RedisCluster`` (also
                                            ``rediss+cluster://``)
``hypercache://h1:7400,h2:7400``            :class:`~.cluster.HypercacheBackend`
                                            (:class:`~hypercache.Client`)
==========================================  =============================================

Query options of every URL: ``namespace`` (key prefix), ``serializer`` (``msgpack``,
the default, ``pickle``, ``json`` or ``raw``), ``timeout`` (seconds per call,
default 1) and ``compression`` (``zstd``, the default: values from 1 KiB serialised
are stored zstd-compressed, level 1; ``zstd:<level>``; ``off``: stored as the
serializer wrote them, for a store shared with programs that read them; reading
decodes either form, see :mod:`hypercache.client.compression`). ``memory://`` also
takes ``max_items``, ``max_bytes`` and ``policy``; ``hypercache://`` also
``cluster_name`` and ``auth_token``. An unknown option or a bad value raises
:class:`~hypercache.errors.ConfigError` naming it.

Redis needs the ``redis`` extra: ``pip install 'hypercache[redis]'``.
"""

from __future__ import annotations

import math
from types import EllipsisType
from typing import Any
from urllib.parse import parse_qsl, unquote

from hypercache.backends.base import (
    BACKEND_DOWN,
    MISSING,
    AsyncBackend,
    Backend,
    Entry,
    Invalidation,
    InvalidationCallback,
)
from hypercache.backends.memory import AsyncMemoryBackend, MemoryBackend
from hypercache.client.compression import (
    DEFAULT_COMPRESSION,
    CompressedSerializer,
    Compression,
    parse_compression,
    resolve_compression,
)
from hypercache.client.serializer import SERIALIZERS, Serializer, resolve_serializer
from hypercache.errors import ConfigError
from hypercache.net.protocol import DEFAULT_MAX_VALUE

__all__ = [
    "BACKEND_DOWN",
    "MISSING",
    "AsyncBackend",
    "AsyncMemoryBackend",
    "Backend",
    "Entry",
    "Invalidation",
    "InvalidationCallback",
    "MemoryBackend",
    "open",
    "open_async",
]

_COMMON = {"namespace", "serializer", "timeout", "compression"}
#: ``open(url, compression=...)``: what a caller (a tiered cache) may give instead
#: of the URL's option; ``...`` = as the URL says.
CompressionArg = Compression | str | bool | None | EllipsisType
_ALLOWED = {
    "memory": _COMMON | {"max_items", "max_bytes", "policy"},
    "redis": _COMMON,
    "rediss": _COMMON,
    "redis+cluster": _COMMON,
    "rediss+cluster": _COMMON,
    "hypercache": _COMMON | {"cluster_name", "auth_token"},
}


class _Url:
    def __init__(self, url: object) -> None:
        if not isinstance(url, str):
            raise ConfigError("url", f"must be a str, got {type(url).__name__}")
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in _ALLOWED:
            raise ConfigError(
                "url", f"unknown scheme in {url!r}; use one of {', '.join(sorted(_ALLOWED))}"
            )
        self.url = url
        self.scheme = scheme
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        self.path = path
        self.userinfo, _, hosts = netloc.rpartition("@")
        self.hosts = [h for h in hosts.split(",") if h]
        self.options: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
            if name not in _ALLOWED[scheme]:
                raise ConfigError(
                    name,
                    f"unknown option of a {scheme}:// URL; known: "
                    + ", ".join(sorted(_ALLOWED[scheme])),
                )
            self.options[name] = value

    def pop_int(self, name: str) -> int | None:
        value = self.options.pop(name, None)
        if value is None:
            return None
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(name, f"must be an integer, got {value!r}") from None
        if number < 1:
            raise ConfigError(name, f"must be positive, got {number}")
        return number

    def timeout(self) -> float:
        value = self.options.pop("timeout", None)
        if value is None:
            return 1.0
        try:
            seconds = float(value)
        except ValueError:
            raise ConfigError("timeout", f"must be a number of seconds, got {value!r}") from None
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ConfigError("timeout", f"must be a positive number of seconds, got {value!r}")
        return seconds

    def serializer(self) -> Serializer | None:
        name = self.options.pop("serializer", None)
        if name is None:
            return None
        cls = SERIALIZERS.get(name.lower())
        if cls is None:
            raise ConfigError(
                "serializer", f"unknown serializer {name!r}; use one of {', '.join(SERIALIZERS)}"
            )
        return cls()

    def compression(self, given: CompressionArg) -> Compression | None:
        """The ``compression`` option (or what the caller gave), default zstd."""
        text = self.options.pop("compression", None)
        if given is not ...:
            return resolve_compression(given)
        return DEFAULT_COMPRESSION if text is None else parse_compression(text)

    def host_ports(self, default_port: int) -> list[tuple[str, int]]:
        if not self.hosts:
            raise ConfigError("url", f"{self.url!r} names no host")
        out = []
        for h in self.hosts:
            host, sep, port = h.rpartition(":")
            if not sep:
                host, port = h, str(default_port)
            try:
                out.append((host.strip("[]"), int(port)))
            except ValueError:
                raise ConfigError("url", f"bad port in {h!r}") from None
        return out


def _redis_kwargs(u: _Url, timeout: float) -> dict[str, Any]:
    from hypercache.backends.redis import client_options

    kwargs = client_options(timeout)
    if u.userinfo:
        user, sep, password = u.userinfo.partition(":")
        if sep:
            kwargs["username"] = unquote(user) or None
            kwargs["password"] = unquote(password)
        else:
            kwargs["password"] = unquote(user)
    if u.scheme.startswith("rediss"):
        kwargs["ssl"] = True
    return kwargs


def _db(u: _Url) -> int:
    if not u.path:
        return 0
    try:
        return int(u.path.strip("/"))
    except ValueError:
        raise ConfigError("url", f"the database must be a number, got {u.path!r}") from None


def _compressed(serializer: Serializer | None, compression: Compression | None) -> Serializer:
    # The backends' serializer stack: the serializer, then the codec (which reads
    # raw values too). Bounded like a node's values (max_value's default).
    return CompressedSerializer(resolve_serializer(serializer), compression, DEFAULT_MAX_VALUE)


def open(url: str, *, compression: CompressionArg = ...) -> Backend:
    """A blocking backend for ``url`` (the table of :mod:`hypercache.backends`).

    Nothing is dialled yet for Redis and the hypercache cluster: connections open
    on first use (call ``.ping()`` to fail fast).

    :param compression: instead of the URL's ``compression`` option: a
        :class:`~hypercache.client.compression.Compression`, ``"zstd"``,
        ``"off"``, ``None``/``False`` (off), ``True`` (the defaults).
    :raises ConfigError: an unknown scheme or option, or a bad value (``field``
        names it).
    """
    u = _Url(url)
    namespace = u.options.pop("namespace", "")
    serializer = u.serializer()
    timeout = u.timeout()
    comp = u.compression(compression)
    if u.scheme == "hypercache":
        from hypercache.backends.cluster import HypercacheBackend
        from hypercache.client import Client

        seeds = [f"{h}:{p}" for h, p in u.host_ports(7400)]
        extra: dict[str, Any] = dict(u.options)
        hclient = Client(
            seeds,
            timeout=timeout,
            connect_timeout=timeout,
            serializer=serializer,
            compression=comp,
            **extra,
        )
        return HypercacheBackend(hclient, namespace=namespace)
    serializer = _compressed(serializer, comp)
    if u.scheme == "memory":
        return MemoryBackend(
            max_items=u.pop_int("max_items"),
            max_bytes=u.pop_int("max_bytes"),
            policy=u.options.pop("policy", "lru"),
            namespace=namespace,
            serializer=serializer,
        )
    import redis
    import redis.cluster

    from hypercache.backends.redis import RedisBackend

    kwargs = _redis_kwargs(u, timeout)
    if u.scheme.endswith("+cluster"):
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in u.host_ports(6379)]  # type: ignore[no-untyped-call]
        client: Any = redis.cluster.RedisCluster(startup_nodes=nodes, **kwargs)
    else:
        ((host, port),) = u.host_ports(6379)[:1] or [("localhost", 6379)]
        client = redis.Redis(host=host, port=port, db=_db(u), **kwargs)
    return RedisBackend(client, namespace=namespace, serializer=serializer)


def open_async(url: str, *, compression: CompressionArg = ...) -> AsyncBackend:
    """An asyncio backend for ``url`` (as :func:`open`; to be used on one event loop)."""
    u = _Url(url)
    if u.scheme == "memory":
        sync = open(url, compression=compression)
        assert isinstance(sync, MemoryBackend)
        return AsyncMemoryBackend(sync.store, namespace=sync.namespace, serializer=sync.serializer)
    namespace = u.options.pop("namespace", "")
    serializer = u.serializer()
    timeout = u.timeout()
    comp = u.compression(compression)
    if u.scheme == "hypercache":
        from hypercache.backends.cluster import AsyncHypercacheBackend
        from hypercache.client import AsyncClient

        seeds = [f"{h}:{p}" for h, p in u.host_ports(7400)]
        extra: dict[str, Any] = dict(u.options)
        aclient = AsyncClient(
            seeds,
            timeout=timeout,
            connect_timeout=timeout,
            serializer=serializer,
            compression=comp,
            **extra,
        )
        return AsyncHypercacheBackend(aclient, namespace=namespace)
    serializer = _compressed(serializer, comp)
    import redis.asyncio
    import redis.asyncio.cluster

    from hypercache.backends.redis import AsyncRedisBackend, RedisBackend

    kwargs = _redis_kwargs(u, timeout)
    kwargs.pop("retry")
    client: Any
    if u.scheme.endswith("+cluster"):
        nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in u.host_ports(6379)]
        client = redis.asyncio.cluster.RedisCluster(startup_nodes=nodes, **kwargs)
    else:
        ((host, port),) = u.host_ports(6379)[:1]
        client = redis.asyncio.Redis(host=host, port=port, db=_db(u), **kwargs)
    sync = open(url, compression=compression)
    assert isinstance(sync, RedisBackend)
    return AsyncRedisBackend(client, namespace=namespace, serializer=serializer, sync=sync)
