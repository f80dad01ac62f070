# Eviction policies of the embedded cache.
#
# The cache core (cachecore.pyx) owns the slots: a slot is a small integer that
# names one entry for as long as it lives. A policy sees only slot numbers and
# 32-bit key hashes, never Python objects, and keeps its per-slot bookkeeping in
# C arrays that grow with the core's slot arrays (``grow``). Every method below is
# pure C: it never calls into Python, so it cannot release the GIL halfway and a
# core operation that calls it stays atomic.
#
# Protocol between core and policy, for one entry's life:
#   insert(slot, h)    the entry was just stored in ``slot``
#   access(slot, h)    a read hit the entry (every read counts)
#   miss(h)            a read missed (frequency policies count it)
#   remove(slot)       the core drops the entry for its own reasons (delete,
#                      expiry, clear); the policy forgets the slot, no ghost
#   evict() -> slot    the core is over a bound: the policy unlinks the entry it
#                      chooses, records whatever history it keeps (ghosts), and
#                      returns the slot; the core then frees it without calling
#                      remove(). NO_SLOT when the policy tracks nothing.
#   update(slot, h)    the entry's value was overwritten (counts as an access)

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport realloc

cdef extern from *:
    """
    #define HC_NO_SLOT ((uint32_t)0xFFFFFFFFu)
    """
    # "No entry": the null of slot numbers and list links.
    const uint32_t NO_SLOT "HC_NO_SLOT"


cdef inline void* grow_array(void* p, size_t count, size_t item) except NULL:
    # realloc that raises MemoryError; the old block stays valid on failure.
    cdef void* q = realloc(p, count * item if count else item)
    if q == NULL:
        raise MemoryError()
    return q


# An intrusive doubly linked list threaded through a policy's links. The links
# of slot s are interleaved, prev at links[2s] and next at links[2s+1], so one
# cache line holds both: an LRU hit at 100k entries touches three random lines
# instead of five. ``prev`` points at links[0] and ``nxt`` at links[1], and the
# helpers index both with stride 2.
# ``head`` is the most recent end, ``tail`` the least recent (the usual victim).
ctypedef struct SlotList:
    uint32_t head
    uint32_t tail
    uint32_t size


cdef inline void list_init(SlotList* l) noexcept nogil:
    l.head = NO_SLOT
    l.tail = NO_SLOT
    l.size = 0


cdef inline void list_push_head(SlotList* l, uint32_t* prev, uint32_t* nxt,
                                uint32_t s) noexcept nogil:
    prev[2 * s] = NO_SLOT
    nxt[2 * s] = l.head
    if l.head != NO_SLOT:
        prev[2 * l.head] = s
    else:
        l.tail = s
    l.head = s
    l.size += 1


cdef inline void list_push_tail(SlotList* l, uint32_t* prev, uint32_t* nxt,
                                uint32_t s) noexcept nogil:
    nxt[2 * s] = NO_SLOT
    prev[2 * s] = l.tail
    if l.tail != NO_SLOT:
        nxt[2 * l.tail] = s
    else:
        l.head = s
    l.tail = s
    l.size += 1


cdef inline void list_unlink(SlotList* l, uint32_t* prev, uint32_t* nxt,
                             uint32_t s) noexcept nogil:
    cdef uint32_t p = prev[2 * s]
    cdef uint32_t n = nxt[2 * s]
    if p != NO_SLOT:
        nxt[2 * p] = n
    else:
        l.head = n
    if n != NO_SLOT:
        prev[2 * n] = p
    else:
        l.tail = p
    l.size -= 1


cdef inline void list_move_head(SlotList* l, uint32_t* prev, uint32_t* nxt,
                                uint32_t s) noexcept nogil:
    # Hot path of LRU hits: already at the head is the common case for hot keys.
    if l.head == s:
        return
    list_unlink(l, prev, nxt, s)
    list_push_head(l, prev, nxt, s)


cdef inline uint32_t mix32(uint32_t h, uint32_t seed) noexcept nogil:
    # A cheap avalanche (murmur3 finaliser) so that several independent indexes
    # can be drawn from one 32-bit key hash.
    h ^= seed
    h ^= h >> 16
    h *= 0x85EBCA6BU
    h ^= h >> 13
    h *= 0xC2B2AE35U
    h ^= h >> 16
    return h


cdef class Policy:
    # Per-slot links shared by every policy: each entry sits in one list.
    # One allocation, interleaved: prev is links[2s], nxt[2s] is links[2s+1]
    # (nxt == prev + 1); use the list_* helpers, never prev[s] directly.
    cdef uint32_t* prev
    cdef uint32_t* nxt
    # Number of slots the arrays can hold (the core's slot capacity).
    cdef uint32_t cap
    # Nominal item capacity for policies that size segments or history by it;
    # 0 when the cache has no item bound (the policy then uses its live count).
    cdef uint32_t limit
    # Entries currently tracked.
    cdef uint32_t count
    # Whether miss() does anything: the core skips the call when it does not.
    cdef bint counts_misses

    cdef int grow(self, uint32_t new_cap) except -1
    cdef void insert(self, uint32_t slot, uint32_t h) noexcept
    cdef void access(self, uint32_t slot, uint32_t h) noexcept
    cdef void update(self, uint32_t slot, uint32_t h) noexcept
    cdef void miss(self, uint32_t h) noexcept
    cdef void remove(self, uint32_t slot) noexcept
    cdef uint32_t evict(self) noexcept
    cdef void clear(self) noexcept
    cdef uint32_t _checked(self, slot) except? 0xFFFFFFFF


cdef class ListPolicy(Policy):
    # One recency list: head = most recent insert (or use), tail = next victim.
    cdef SlotList lst


cdef class LRUPolicy(ListPolicy):
    pass


cdef class FIFOPolicy(ListPolicy):
    pass


cdef class ClockPolicy(ListPolicy):
    # Second-chance FIFO: the list is the clock face, the tail the hand.
    cdef uint8_t* ref
