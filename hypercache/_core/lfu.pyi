"""Least frequently used eviction in O(1) per operation (frequency buckets)."""

from typing import final

from hypercache._core.policy import Policy

@final
class LFUPolicy(Policy):
    """Least frequently used: the entry with the fewest accesses goes, and among
    equally frequent entries the least recently used one.

    New entries start at frequency 1; a hit or an overwrite adds 1. Counts never
    decay (plain LFU: a key hot long ago stays), and history ends with the
    entry (an evicted key comes back at frequency 1). Prefer ``TinyLFUPolicy``
    for loads whose popularity shifts.

    Entries of equal frequency share a bucket (an LRU list) and the buckets form
    a list ordered by frequency, so every operation is O(1); at most one bucket
    exists per distinct frequency, pooled in C arrays (no allocation after
    ``_grow``).

    :param limit: accepted for a uniform constructor; LFU does not use it.
    """

    def __init__(self, limit: int = 0) -> None: ...
    @property
    def name(self) -> str:
        """``"lfu"``."""

    def _freq(self, slot: int) -> int:
        """Access count of the live entry in ``slot`` (tests)."""

    def _buckets(self) -> list[int]:
        """Frequencies of the live buckets, lowest first (tests)."""
