"""Adaptive Replacement Cache (Megiddo & Modha, FAST 2003)."""

from typing import final

from hypercache._core.policy import Policy

@final
class ARCPolicy(Policy):
    """Adaptive Replacement Cache: balances recency against frequency by itself.

    Resident entries sit in T1 (seen once since they came in) or T2 (seen again);
    the ghost lists B1 and B2 hold the key *hashes* of what was lately evicted
    from T1 and T2. Inserting a key whose hash is in B1 grows ``p``, the target
    size of T1 (in B2: shrinks it), and the entry goes straight to T2; a hit in
    T1 moves the entry to T2. ``evict`` takes T1's least recent entry when T1 is
    above ``p``, else T2's, and leaves a ghost; ``remove`` leaves none.

    Capacity ``c`` is ``limit`` when non-zero, else the live count when the
    decision is made. Ghosts are bounded: ``|T1| + |B1| <= c`` and
    ``|T1| + |T2| + |B1| + |B2| <= 2c`` after every operation, and never more
    ghosts than slots; they live in C arrays with an open-addressing table, so
    no operation allocates. Two keys with equal 32-bit hashes share a ghost.

    With a core that evicts before it inserts, ``p`` adapts on the insert that
    follows the eviction, one request later than in the paper.

    :param limit: the cache's item capacity, or 0 (see above).
    """

    def __init__(self, limit: int = 0) -> None: ...
    @property
    def name(self) -> str:
        """``"arc"``."""

    def _target(self) -> int:
        """``p``, the target size of T1 (tests)."""

    def _sizes(self) -> tuple[int, int, int, int]:
        """``(|T1|, |T2|, |B1|, |B2|)`` (tests)."""

    def _ghost(self, h: int) -> int:
        """1 or 2 when the hash ``h`` is a ghost in B1 or B2, else 0 (tests)."""

    def _list_of(self, slot: int) -> int:
        """1 or 2: the list (T1 or T2) of the live entry in ``slot`` (tests)."""
