"""Consistency levels of cluster operations.

A read or a write on the cluster goes to the ``n`` replicas that own the key and
completes once :meth:`Consistency.required` of them have answered:

========  =============  ===================================================
level     acks of ``n``  meaning
========  =============  ===================================================
ONE       1              fastest; may read a stale copy
QUORUM    ``n // 2 + 1`` a read quorum and a write quorum always overlap
ALL       ``n``          every replica; fails while any replica is down
========  =============  ===================================================

``R + W > N`` (for example QUORUM reads with QUORUM writes) means every read
meets at least one replica that saw the latest acknowledged write.
"""

from __future__ import annotations

import enum

from hypercache.errors import ConfigError

__all__ = ["Consistency"]


class Consistency(enum.Enum):
    """How many replicas must acknowledge an operation.

    The values are the lower-case names used in configuration files, environment
    variables, command-line flags and on the wire: ``"one"``, ``"quorum"``, ``"all"``.
    """

    ONE = "one"
    QUORUM = "quorum"
    ALL = "all"

    @classmethod
    def parse(cls, value: Consistency | str, *, field: str = "consistency") -> Consistency:
        """Return the level named by ``value``.

        :param value: a :class:`Consistency`, or its name in any letter case
            (``"quorum"``, ``"QUORUM"``); surrounding blanks are ignored.
        :param field: the configuration field or argument to name in the error.
        :raises ConfigError: ``value`` names no level, or is neither a string nor
            a :class:`Consistency`.
        """
        if isinstance(value, Consistency):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        choices = ", ".join(repr(level.value) for level in cls)
        raise ConfigError(field, f"expected one of {choices}, got {value!r}")

    def required(self, n: int) -> int:
        """Number of acknowledgements this level needs out of ``n`` replicas.

        ``ONE`` needs 1, ``QUORUM`` a strict majority (``n // 2 + 1``), ``ALL`` all ``n``.

        :raises ConfigError: ``n`` is not a positive integer.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError("n", f"replica count must be a positive integer, got {n!r}")
        if self is Consistency.ONE:
            return 1
        if self is Consistency.QUORUM:
            return n // 2 + 1
        return n

    def __str__(self) -> str:
        return self.value
