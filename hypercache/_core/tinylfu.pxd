from libc.stdint cimport uint8_t, uint32_t, uint64_t

from hypercache._core.policy cimport Policy, SlotList


cdef class TinyLFUPolicy(Policy):
    # Segments: new entries enter the window (LRU); the window's overflow
    # competes for a place in main, an SLRU of probation and protected.
    cdef SlotList window
    cdef SlotList probation
    cdef SlotList protected
    # Per slot: its segment (SEG_* in the .pyx) and its key hash.
    cdef uint8_t* seg
    cdef uint32_t* hv

    # Count-min sketch: ``swords`` 64-bit words of sixteen 4-bit counters, as
    # four rows (row i: nibbles 4i..4i+3 of every word).
    cdef uint64_t* sketch
    cdef uint32_t swords
    # Doorkeeper bloom filter: ``dkwords`` words, a key's bits in one word.
    cdef uint64_t* dk
    cdef uint32_t dkwords
    # Sketch increments since the last aging, and the period (10 * capacity).
    cdef uint32_t additions
    cdef uint32_t sample
    # At least one aging happened: the sketch has seen a full sample.
    cdef bint aged
    # The hash of the last miss not yet followed by its insert (read-through
    # dedup: a miss and the insert it causes are one access).
    cdef uint32_t pending
    cdef bint has_pending
    # xorshift32 state for the 1/128 admission of warm candidates.
    cdef uint32_t rng

    # Window share of capacity in 1/65536ths, moved by the ghost rings.
    cdef uint32_t wfrac
    # Ghost rings (ring 0: rejected candidates, ring 1: main's victims), each
    # two generations of a bloom filter of ``gwords`` words; a generation
    # takes ``gspan`` hashes before the older one is wiped and reused.
    cdef uint64_t* ghost
    cdef uint32_t gwords
    cdef uint32_t gspan
    cdef uint32_t gfill[2]
    cdef uint8_t gcur[2]
    # Evictions remembered since the rings were (re)made: the rings judge
    # only after 2 * gspan, when a ring that stays empty means something.
    cdef uint32_t gseen
    cdef uint32_t ghits[2]

    cdef uint32_t capacity(self) noexcept
    cdef uint32_t window_max(self, uint32_t c) noexcept
    cdef int resize_filters(self, uint32_t capacity) except -1
    cdef void record(self, uint32_t h) noexcept
    cdef uint32_t frequency(self, uint32_t h) noexcept
    cdef void age(self) noexcept
    cdef bint admit(self, uint32_t cand_h, uint32_t victim_h) noexcept
    cdef void ghost_put(self, int ring, uint32_t h) noexcept
    cdef bint ghost_has(self, int ring, uint32_t h) noexcept
    cdef void adapt(self, uint32_t h) noexcept
    cdef void drain(self, uint32_t c) noexcept
    cdef void promote(self, uint32_t slot, uint32_t c) noexcept
