"""Least frequently used eviction with O(1) operations (frequency buckets)."""

cimport cython
from libc.stdint cimport uint32_t
from libc.stdlib cimport free

from hypercache._core.policy cimport (
    NO_SLOT,
    Policy,
    SlotList,
    grow_array,
    list_init,
    list_move_head,
    list_push_head,
    list_unlink,
)

# Frequencies saturate here: a key read four billion times stays in the top
# bucket and only moves to its head.
cdef uint32_t FREQ_MAX = 0xFFFFFFFFU


@cython.final
cdef class LFUPolicy(Policy):
    """Least frequently used: the entry with the fewest accesses goes, and among
    equally frequent entries the least recently used one.

    The O(1) scheme of Shah, Mitra and Matani: entries of equal frequency share a
    bucket (an LRU list), and the buckets form a list ordered by frequency. A hit
    moves an entry to the next bucket (frequency + 1), creating it when absent;
    eviction takes the tail of the first bucket. New entries start at frequency 1;
    an overwrite counts as an access. Counts never decay: this is plain LFU, so a
    key that was hot long ago stays; prefer ``TinyLFUPolicy`` for shifting loads.
    """

    # Bucket bound: a bucket is created only for an entry that leaves a bucket
    # shared with at least one other entry, or for a new entry when no bucket of
    # frequency 1 exists, and an emptied bucket is freed at once. Hence every
    # live bucket is non-empty, there are at most ``count`` <= ``cap`` of them,
    # and a pool of cap + 1 never runs out: no allocation on the hot path.

    def __cinit__(self, limit=0):
        self.bucket = NULL
        self.bentries = NULL
        self.bfreq = NULL
        self.bprev = NULL
        self.bnext = NULL
        self.bcap = 0
        self.bhead = NO_SLOT
        self.bfree = NO_SLOT
        self.bused = 0

    def __dealloc__(self):
        free(self.bucket)
        free(self.bentries)
        free(self.bfreq)
        free(self.bprev)
        free(self.bnext)

    cdef int grow(self, uint32_t new_cap) except -1:
        if new_cap <= self.cap:
            return 0
        # Own arrays first: if one of these fails, ``cap`` still describes the
        # smallest array, so nothing indexes past an allocation.
        cdef uint32_t nb = new_cap + 1 if new_cap < NO_SLOT else new_cap
        self.bucket = <uint32_t*>grow_array(self.bucket, new_cap, sizeof(uint32_t))
        self.bentries = <SlotList*>grow_array(self.bentries, nb, sizeof(SlotList))
        self.bfreq = <uint32_t*>grow_array(self.bfreq, nb, sizeof(uint32_t))
        self.bprev = <uint32_t*>grow_array(self.bprev, nb, sizeof(uint32_t))
        self.bnext = <uint32_t*>grow_array(self.bnext, nb, sizeof(uint32_t))
        self.bcap = nb
        Policy.grow(self, new_cap)
        return 0

    cdef uint32_t bucket_new(self, uint32_t freq, uint32_t after) noexcept:
        # Links a fresh bucket right after ``after`` (NO_SLOT: at the front).
        cdef uint32_t b
        if self.bfree != NO_SLOT:
            b = self.bfree
            self.bfree = self.bnext[b]
        else:
            b = self.bused
            self.bused += 1
        self.bfreq[b] = freq
        list_init(&self.bentries[b])
        self.bprev[b] = after
        if after == NO_SLOT:
            self.bnext[b] = self.bhead
            self.bhead = b
        else:
            self.bnext[b] = self.bnext[after]
            self.bnext[after] = b
        if self.bnext[b] != NO_SLOT:
            self.bprev[self.bnext[b]] = b
        return b

    cdef void bucket_drop(self, uint32_t b) noexcept:
        cdef uint32_t p = self.bprev[b]
        cdef uint32_t n = self.bnext[b]
        if p != NO_SLOT:
            self.bnext[p] = n
        else:
            self.bhead = n
        if n != NO_SLOT:
            self.bprev[n] = p
        self.bnext[b] = self.bfree
        self.bfree = b

    cdef void insert(self, uint32_t slot, uint32_t h) noexcept:
        cdef uint32_t b = self.bhead
        if b == NO_SLOT or self.bfreq[b] != 1:
            b = self.bucket_new(1, NO_SLOT)
        list_push_head(&self.bentries[b], self.prev, self.nxt, slot)
        self.bucket[slot] = b
        self.count += 1

    cdef void access(self, uint32_t slot, uint32_t h) noexcept:
        cdef uint32_t b = self.bucket[slot]
        cdef uint32_t f = self.bfreq[b]
        cdef uint32_t nb
        if f == FREQ_MAX:
            list_move_head(&self.bentries[b], self.prev, self.nxt, slot)
            return
        nb = self.bnext[b]
        if nb == NO_SLOT or self.bfreq[nb] != f + 1:
            if self.bentries[b].size == 1:
                # Alone in its bucket: renumber the bucket in place. Order holds
                # because the next bucket, if any, is above f + 1.
                self.bfreq[b] = f + 1
                return
            nb = self.bucket_new(f + 1, b)
        list_unlink(&self.bentries[b], self.prev, self.nxt, slot)
        list_push_head(&self.bentries[nb], self.prev, self.nxt, slot)
        self.bucket[slot] = nb
        if self.bentries[b].size == 0:
            self.bucket_drop(b)

    cdef void update(self, uint32_t slot, uint32_t h) noexcept:
        self.access(slot, h)

    cdef void remove(self, uint32_t slot) noexcept:
        cdef uint32_t b = self.bucket[slot]
        list_unlink(&self.bentries[b], self.prev, self.nxt, slot)
        if self.bentries[b].size == 0:
            self.bucket_drop(b)
        self.count -= 1

    cdef uint32_t evict(self) noexcept:
        cdef uint32_t b = self.bhead
        cdef uint32_t s
        if b == NO_SLOT:
            return NO_SLOT
        s = self.bentries[b].tail
        list_unlink(&self.bentries[b], self.prev, self.nxt, s)
        if self.bentries[b].size == 0:
            self.bucket_drop(b)
        self.count -= 1
        return s

    cdef void clear(self) noexcept:
        self.bhead = NO_SLOT
        self.bfree = NO_SLOT
        self.bused = 0
        self.count = 0

    @property
    def name(self):
        return "lfu"

    # Introspection for tests.
    def _freq(self, slot):
        """Access count of the entry in ``slot`` (which must be live)."""
        if slot >= self.cap:
            raise IndexError(slot)
        return self.bfreq[self.bucket[<uint32_t>slot]]

    def _buckets(self):
        """Frequencies of the live buckets, lowest first."""
        out = []
        cdef uint32_t b = self.bhead
        while b != NO_SLOT:
            out.append(self.bfreq[b])
            b = self.bnext[b]
        return out
