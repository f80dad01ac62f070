# Hint buffers of hinted handoff: the writes and deletes an owner missed, kept
# per target node until the replay loop can deliver them. A FIFO per target in
# one slab of C records, three caps and a TTL. See hints.pyx for the invariants
# and hints.pyi for the API.

from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef extern from *:
    """
    #define HC_HB_NONE ((uint32_t)0xFFFFFFFFu)
    """
    # "No record / no target": null of record numbers, links and heap positions.
    const uint32_t HB_NONE "HC_HB_NONE"


# One queued hint. Records live in one C array and are named by index; a free
# record sits on the free list through ``next``. 72 bytes.
ctypedef struct Hint:
    PyObject* key       # owned reference (exact bytes)
    PyObject* value     # owned reference (exact bytes)
    uint64_t ts         # version timestamp (HLC)
    int64_t expire_at   # the entry's absolute expiry, wall ms, 0 = never (payload only)
    int64_t queued_at   # wall ms the hint counts its age from
    int64_t seq         # tie-break of queued_at: enqueue order (< 0: set by requeue_front)
    uint32_t origin     # version origin tag
    uint32_t target     # index of the target the hint is queued for
    uint32_t prev       # toward the target's head (older)
    uint32_t next       # toward the target's tail (newer); free-list link
    uint8_t tomb        # the hint is a delete


# The age stamp of a hint handed out by dequeue_batch, kept so that requeue_front
# can give it back its age.
ctypedef struct Stamp:
    int64_t queued_at
    int64_t seq


# One target node. Its FIFO runs head (oldest) -> tail (newest) through
# Hint.next, sorted by (queued_at, seq).
ctypedef struct Target:
    uint32_t head
    uint32_t tail
    uint32_t count
    uint32_t hpos       # position in the targets heap, HB_NONE when empty
    uint64_t bytes      # charged bytes of its hints
    Stamp* window       # stamps of the last dequeue_batch, in order
    uint32_t window_n
    uint32_t window_cap
    bint used           # the slot names a target (else on the free list via head)


cdef class HintBuffer:
    cdef Hint* recs
    cdef uint32_t rec_cap       # records allocated
    cdef uint32_t rec_high      # records [0, rec_high) have been used at least once
    cdef uint32_t rec_free      # free list through Hint.next
    cdef list rec_ids           # rec_ids[r] is the int r (dict values, never reallocated)

    cdef Target* tgts
    cdef uint32_t tgt_cap
    cdef uint32_t tgt_free      # free list of target slots through Target.head
    cdef list tgt_names         # target slot -> str, or None when free
    cdef list tgt_keys          # target slot -> dict key -> record id, or None
    cdef dict tgt_index         # str -> target slot

    # Min-heap of non-empty targets on their head's (queued_at, seq): the root's
    # head is the oldest hint in the buffer.
    cdef uint32_t* heap
    cdef uint32_t heap_len

    cdef int64_t seq_next       # enqueue order, from 0 up
    cdef int64_t seq_low        # requeue_front's own stamps, from -1 down

    cdef readonly int64_t max_per_node
    cdef readonly int64_t max_total
    cdef readonly int64_t max_bytes
    cdef readonly int64_t ttl_ms

    cdef uint32_t count         # hints queued
    cdef readonly uint64_t bytes
    cdef readonly uint64_t queued_total
    cdef readonly uint64_t requeued
    cdef readonly uint64_t dequeued
    cdef readonly uint64_t expired
    cdef readonly uint64_t superseded
    cdef readonly uint64_t dropped_node_cap
    cdef readonly uint64_t dropped_total_cap
    cdef readonly uint64_t dropped_bytes_cap
    cdef readonly uint64_t dropped_oversize
    cdef readonly uint64_t dropped_target
    # Records and heap entries visited by the internal loops: lets tests check
    # the cost of an operation by counting, not timing.
    cdef readonly uint64_t work

    # Internal.
    cdef int _grow_recs(self) except -1
    cdef int _reserve_recs(self, uint32_t n) except -1
    cdef uint32_t _alloc_rec(self) except? 0xFFFFFFFE
    cdef uint32_t _find_target(self, str target) except? 0xFFFFFFFE
    cdef uint32_t _target_slot(self, str target) except? 0xFFFFFFFE
    cdef int _release_target(self, uint32_t t) except -1
    cdef int _release_if_idle(self, uint32_t t) except -1
    cdef int _reserve_window(self, Target* tg, uint32_t n) except -1
    cdef uint32_t _active(self) noexcept
    cdef bint _before(self, uint32_t a, uint32_t b) noexcept
    cdef void _heap_place(self, uint32_t i, uint32_t t) noexcept
    cdef void _heap_up(self, uint32_t i, uint32_t t) noexcept
    cdef void _heap_down(self, uint32_t i, uint32_t t) noexcept
    cdef void _heap_fix(self, uint32_t t) noexcept
    cdef uint32_t _oldest(self) noexcept
    cdef uint64_t _size(self, Hint* h) noexcept
    cdef int _index(self, uint32_t t, uint32_t r) except -1
    cdef void _account_in(self, uint32_t t, uint32_t r) noexcept
    cdef int _link_tail(self, uint32_t t, uint32_t r) except -1
    cdef int _link_head(self, uint32_t t, uint32_t r) except -1
    cdef int _unlink(self, uint32_t r, bint fix, bint unindex=*) except -1
    cdef void _free(self, uint32_t r) noexcept
    cdef int _drop(self, uint32_t r) except -1
    cdef int _drop_oldest(self, uint32_t keep) except -1
    cdef uint32_t _drop_all(self, uint32_t t) except? 0xFFFFFFFE
