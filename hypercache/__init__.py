"""hypercache: a performance-first cache for Python."""

from hypercache._version import __version__

__all__ = ["__version__"]
