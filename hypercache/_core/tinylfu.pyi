"""W-TinyLFU eviction: a window LRU, a frequency-filtered segmented LRU, and a
window size that follows ghost evidence."""

from typing import final

from hypercache._core.policy import Policy

@final
class TinyLFUPolicy(Policy):
    """W-TinyLFU (Einziger, Friedman & Manes): the best hit ratio on skewed
    loads, and scan resistant.

    * New entries enter an LRU *window* (1% of capacity at first, at least 1).
    * When the cache is full, the window's least recent entry (the candidate)
      must beat main's least recent probation entry (the victim) on estimated
      frequency; the loser is evicted (so the candidate may be refused:
      admission). Ties go to the victim; a warm candidate (estimate >= 6) that
      loses still gets in with probability 1/128, against hash flooding.
    * Main is an SLRU: probation (about 20%) and protected (about 80%); a hit in
      probation promotes, protected's overflow returns to probation.
    * Frequencies: a count-min sketch of 4-bit counters (4 per key, drawn from
      the hash) behind a doorkeeper bloom filter that absorbs first sightings.
      Every hit, overwrite and miss is recorded (an insert too, unless it follows
      a miss on the same hash). After 10 * capacity recorded increments all
      counters halve and the doorkeeper clears.
    * The window size adapts: ghost rings of recently rejected candidates and of
      main's recent victims tell whether a larger window or a larger main would
      have hit more; on significant evidence the window moves by capacity/16
      (between 1 entry and 95%).

    Capacity is ``limit`` once the cache holds that many entries, else the live
    count (no limit, still filling, or held below the limit by a byte bound).
    Memory beyond the per-slot links: 5 bytes per slot, and about 16.5 bytes
    per entry of capacity for the filters (up to twice that, as the sketch is a
    power of two). No operation allocates after ``_grow``.

    :param limit: the cache's item capacity, or 0 (see above).
    """

    def __init__(self, limit: int = 0) -> None: ...
    @property
    def name(self) -> str:
        """``"tinylfu"``."""

    def _sizes(self) -> tuple[int, int, int]:
        """``(|window|, |probation|, |protected|)`` (tests)."""

    def _segment(self, slot: int) -> int:
        """1 window, 2 probation, 3 protected: the segment of the live ``slot``."""

    def _frequency(self, h: int) -> int:
        """Estimated frequency of the hash ``h``, 0 to 16 (tests)."""

    def _sketch_words(self) -> int:
        """Number of 64-bit words of the sketch, 16 counters each (tests)."""

    def _window_target(self) -> int:
        """Current target size of the window, in entries (tests)."""
