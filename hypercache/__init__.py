"""hypercache: a performance-first cache for Python.

- :class:`HyperCache`: the embedded, in-process cache on a compiled core.
- :class:`Client`, :class:`AsyncClient`: the cluster SDK, routing to key owners.
- :class:`Consistency`: ONE / QUORUM / ALL for the cluster.
- :mod:`hypercache.errors`: the error tree, rooted at :class:`HyperCacheError`.

The embedded cache stays light: ``import hypercache`` (or ``hypercache.cache``) loads
neither asyncio, msgpack nor the networking stack; the clients are imported on first
use of ``hypercache.Client`` / ``hypercache.AsyncClient``.
"""

from typing import TYPE_CHECKING, Any

from hypercache._version import __version__
from hypercache.cache import POLICIES, CacheStats, HyperCache
from hypercache.consistency import Consistency
from hypercache.errors import (
    ConfigError,
    HyperCacheError,
    NodeUnavailableError,
    QuorumError,
    RequestTimeoutError,
)

__all__ = [
    "POLICIES",
    "AsyncClient",
    "AsyncTieredCache",
    "CacheStats",
    "Client",
    "ConfigError",
    "Consistency",
    "HyperCache",
    "HyperCacheError",
    "NodeUnavailableError",
    "QuorumError",
    "RequestTimeoutError",
    "TieredCache",
    "__version__",
    "open",
    "open_async",
]

if TYPE_CHECKING:
    from hypercache.backends import open, open_async
    from hypercache.client import AsyncClient, Client
    from hypercache.tiered import AsyncTieredCache, TieredCache


def __getattr__(name: str) -> Any:
    # The cluster clients (and asyncio, msgpack, the wire) load only when asked for.
    if name in ("AsyncClient", "Client"):
        from hypercache import client

        value = getattr(client, name)
        globals()[name] = value
        return value
    # So do the backends (redis-py only for a redis:// URL) and the tiered cache.
    if name in ("open", "open_async"):
        from hypercache import backends

        value = getattr(backends, name)
        globals()[name] = value
        return value
    if name in ("TieredCache", "AsyncTieredCache"):
        from hypercache import tiered

        value = getattr(tiered, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hypercache' has no attribute {name!r}")
