from libc.stdint cimport uint8_t, uint32_t

from hypercache._core.policy cimport Policy, SlotList


cdef class ARCPolicy(Policy):
    # Resident lists: T1 seen once since it came in, T2 seen at least twice.
    cdef SlotList t1
    cdef SlotList t2
    # Per slot: 1 when in T1, 2 when in T2; and the key hash, kept so that an
    # evicted slot can leave a ghost.
    cdef uint8_t* where
    cdef uint32_t* hv

    # Ghosts: the hashes of recently evicted keys, in a pool of ``gcap`` nodes
    # (= cap) threaded into the B1/B2 lists, found by hash through ``table``.
    cdef SlotList b1
    cdef SlotList b2
    cdef uint32_t* gprev
    cdef uint32_t* gnext
    cdef uint32_t* ghash
    cdef uint8_t* gwhere
    cdef uint32_t gcap
    cdef uint32_t gfree
    cdef uint32_t gused
    # Open addressing (linear probing, backward-shift delete): ghost node
    # indexes or NO_SLOT; ``tmask + 1`` slots, a power of two >= 2 * gcap.
    cdef uint32_t* table
    cdef uint32_t tmask

    # Target size of T1, in [0, c].
    cdef uint32_t p
    # The last insert came from B2 (the tie rule of REPLACE), until one evict.
    cdef bint b2_hit

    cdef uint32_t capacity(self) noexcept
    cdef uint32_t table_home(self, uint32_t h) noexcept
    cdef uint32_t ghost_find(self, uint32_t h) noexcept
    cdef void table_put(self, uint32_t g) noexcept
    cdef void ghost_drop(self, uint32_t g) noexcept
    cdef void ghost_add(self, uint32_t h, uint8_t which) noexcept
    cdef void ghost_trim(self) noexcept
