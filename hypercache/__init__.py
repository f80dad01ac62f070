"""hypercache: a performance-first cache for Python.

- :class:`HyperCache`: the embedded, in-process cache on a compiled core.
- :class:`Client`, :class:`AsyncClient`: the cluster SDK, routing to key owners.
- :class:`Consistency`: ONE / QUORUM / ALL for the cluster.
- :mod:`hypercache.errors`: the error tree, rooted at :class:`HyperCacheError`.
"""

from hypercache._version import __version__
from hypercache.cache import POLICIES, CacheStats, HyperCache
from hypercache.client import AsyncClient, Client
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
    "CacheStats",
    "Client",
    "ConfigError",
    "Consistency",
    "HyperCache",
    "HyperCacheError",
    "NodeUnavailableError",
    "QuorumError",
    "RequestTimeoutError",
    "__version__",
]
