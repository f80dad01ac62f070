from libc.stdint cimport uint32_t

from hypercache._core.policy cimport Policy, SlotList


cdef class LFUPolicy(Policy):
    # Per slot: the bucket (index into the b* arrays) the entry sits in.
    cdef uint32_t* bucket
    # Bucket pool, ``bcap`` = cap + 1 buckets. A bucket holds every entry of one
    # frequency, most recent at its list head. Live buckets form a doubly linked
    # list ordered by strictly increasing frequency from ``bhead``.
    cdef SlotList* bentries
    cdef uint32_t* bfreq
    cdef uint32_t* bprev
    cdef uint32_t* bnext
    cdef uint32_t bcap
    # Lowest frequency bucket (the eviction end) or NO_SLOT.
    cdef uint32_t bhead
    # Free buckets: a stack threaded through ``bnext``, then never-used ones
    # from ``bused`` up, so that clear() is O(1).
    cdef uint32_t bfree
    cdef uint32_t bused

    cdef uint32_t bucket_new(self, uint32_t freq, uint32_t after) noexcept
    cdef void bucket_drop(self, uint32_t b) noexcept
