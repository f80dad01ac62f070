"""hypercache: a performance-first cache for Python.

- :class:`HyperCache`: the embedded, in-process cache.
"""

from hypercache._version import __version__
from hypercache.cache import CacheStats, HyperCache

__all__ = ["CacheStats", "HyperCache", "__version__"]
