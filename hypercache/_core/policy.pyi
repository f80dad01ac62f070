"""Eviction policies of the embedded cache: the base protocol, LRU, FIFO and CLOCK.

The cache core owns the *slots* (small integers naming one entry each) and
drives a policy through C methods that see only slot numbers and 32-bit key
hashes, never Python objects; they never call into Python, so a core
operation stays atomic. For one entry's life:

* ``insert(slot, h)`` -- the entry was just stored in ``slot``;
* ``access(slot, h)`` -- a read hit it; ``update(slot, h)`` -- it was
  overwritten (counts as an access);
* ``miss(h)`` -- a read missed (frequency policies count it; the core calls it
  only when ``counts_misses`` is set);
* ``remove(slot)`` -- the core dropped it for its own reasons (delete, expiry):
  no history is kept;
* ``evict()`` -- the core is over a bound: the policy unlinks the entry of its
  choice, keeps whatever history it keeps, and returns its slot (``None`` from
  the Python driver when nothing is tracked); the core frees it without
  calling ``remove``;
* ``clear()`` -- forget everything; ``grow(n)`` -- slots ``0 .. n-1`` may be used.

The underscore methods below call those C methods from Python, for unit tests
and simulations of a policy alone. They do not check their arguments: a slot
must be below the last ``_grow`` size, ``_access``/``_update``/``_remove`` need
a live slot, ``_insert`` a free one. Anything else corrupts the policy.
"""

from typing import final

class Policy:
    """Base of the eviction policies (tracks nothing; ``_evict`` returns ``None``).

    :param limit: the cache's item capacity, for policies that size segments or
        history by it; ``0`` when the cache has no item bound (such policies
        then use their live count).
    :raises ValueError: ``limit`` is negative or above ``2**32 - 2``.
    """

    def __init__(self, limit: int = 0) -> None: ...
    @property
    def name(self) -> str:
        """Short name of the policy, as given to ``HyperCache(policy=...)``."""

    def _grow(self, new_cap: int) -> None:
        """Make room for slots ``0 .. new_cap - 1`` (never shrinks).

        :raises MemoryError: the arrays could not grow; the policy is unchanged.
        """

    def _insert(self, slot: int, h: int) -> None:
        """A new entry with key hash ``h`` is stored in the free ``slot``."""

    def _access(self, slot: int, h: int) -> None:
        """A read hit the live entry in ``slot``."""

    def _update(self, slot: int, h: int) -> None:
        """The live entry in ``slot`` was overwritten."""

    def _miss(self, h: int) -> None:
        """A read of a key with hash ``h`` missed."""

    def _remove(self, slot: int) -> None:
        """The live entry in ``slot`` is gone (delete or expiry): forget it."""

    def _evict(self) -> int | None:
        """Choose a victim, unlink it and return its slot; ``None`` if empty."""

    def _clear(self) -> None:
        """Forget every entry (and any history)."""

    def __len__(self) -> int:
        """Number of entries tracked."""

class ListPolicy(Policy):
    """One recency list: inserts at the head, evicts the tail (FIFO as it stands)."""

@final
class LRUPolicy(ListPolicy):
    """Least recently used: every hit or overwrite moves the entry to the front;
    the least recent entry goes."""

@final
class FIFOPolicy(ListPolicy):
    """First in, first out: reads and overwrites do not reorder; the oldest
    insert goes."""

@final
class ClockPolicy(ListPolicy):
    """CLOCK (second chance): a hit sets the entry's reference bit; the hand
    gives each referenced entry one more round before it goes. New entries
    start unreferenced."""
