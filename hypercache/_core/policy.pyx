"""Recency eviction policies: LRU, FIFO and CLOCK; the base every policy extends."""

cimport cython
from libc.stdint cimport uint8_t, uint32_t
from libc.stdlib cimport free


cdef class Policy:
    """Base of the eviction policies; see policy.pxd for the contract with the core."""

    def __cinit__(self, limit=0):
        if limit < 0 or limit > 0xFFFFFFFE:
            raise ValueError("policy limit out of range")
        self.limit = <uint32_t>limit
        self.prev = NULL
        self.nxt = NULL
        self.cap = 0
        self.count = 0

    def __dealloc__(self):
        free(self.prev)  # nxt points into the same block

    cdef int grow(self, uint32_t new_cap) except -1:
        self.prev = <uint32_t*>grow_array(self.prev, 2 * <size_t>new_cap, sizeof(uint32_t))
        self.nxt = self.prev + 1
        self.cap = new_cap
        return 0

    cdef void insert(self, uint32_t slot, uint32_t h) noexcept:
        pass

    cdef void access(self, uint32_t slot, uint32_t h) noexcept:
        pass

    cdef void update(self, uint32_t slot, uint32_t h) noexcept:
        self.access(slot, h)

    cdef void miss(self, uint32_t h) noexcept:
        pass

    cdef void remove(self, uint32_t slot) noexcept:
        pass

    cdef uint32_t evict(self) noexcept:
        return NO_SLOT

    cdef void clear(self) noexcept:
        self.count = 0

    @property
    def name(self):
        return "base"

    # Python-visible drivers of the C protocol, for unit tests of a policy alone.
    # They check slot numbers: the C methods trust the core and would write out
    # of bounds.
    cdef uint32_t _checked(self, slot) except? 0xFFFFFFFF:
        if not 0 <= slot < self.cap:
            raise IndexError(f"slot {slot} outside 0..{self.cap - 1} (call _grow first)")
        return <uint32_t>slot

    def _grow(self, new_cap):
        self.grow(new_cap)

    def _insert(self, slot, h):
        self.insert(self._checked(slot), h)

    def _access(self, slot, h):
        self.access(self._checked(slot), h)

    def _update(self, slot, h):
        self.update(self._checked(slot), h)

    def _miss(self, h):
        self.miss(h)

    def _remove(self, slot):
        self.remove(self._checked(slot))

    def _evict(self):
        cdef uint32_t s = self.evict()
        return None if s == NO_SLOT else s

    def _clear(self):
        self.clear()

    def __len__(self):
        return self.count


cdef class ListPolicy(Policy):
    """One recency list: inserts at the head, evicts the tail; reads do not reorder.

    As it stands this is FIFO; LRU and CLOCK refine how reads count.
    """

    def __cinit__(self, limit=0):
        list_init(&self.lst)

    cdef void insert(self, uint32_t slot, uint32_t h) noexcept:
        list_push_head(&self.lst, self.prev, self.nxt, slot)
        self.count += 1

    cdef void update(self, uint32_t slot, uint32_t h) noexcept:
        pass

    cdef void remove(self, uint32_t slot) noexcept:
        list_unlink(&self.lst, self.prev, self.nxt, slot)
        self.count -= 1

    cdef uint32_t evict(self) noexcept:
        cdef uint32_t s = self.lst.tail
        if s != NO_SLOT:
            list_unlink(&self.lst, self.prev, self.nxt, s)
            self.count -= 1
        return s

    cdef void clear(self) noexcept:
        list_init(&self.lst)
        self.count = 0


@cython.final
cdef class LRUPolicy(ListPolicy):
    """Least recently used: every hit and overwrite moves the entry to the head."""

    cdef void access(self, uint32_t slot, uint32_t h) noexcept:
        list_move_head(&self.lst, self.prev, self.nxt, slot)

    cdef void update(self, uint32_t slot, uint32_t h) noexcept:
        list_move_head(&self.lst, self.prev, self.nxt, slot)

    @property
    def name(self):
        return "lru"


@cython.final
cdef class FIFOPolicy(ListPolicy):
    """First in, first out: reads and overwrites do not reorder; the oldest insert goes."""

    @property
    def name(self):
        return "fifo"


@cython.final
cdef class ClockPolicy(ListPolicy):
    """CLOCK (second chance): a hit sets the entry's reference bit; the hand, at the
    tail of a FIFO, gives each referenced entry one more round before it goes.

    An entry starts unreferenced, so a key written once and never read is the
    first to go, as in FIFO; a hit costs one byte store, cheaper than LRU's relink.
    """

    def __cinit__(self, limit=0):
        self.ref = NULL

    def __dealloc__(self):
        free(self.ref)

    cdef int grow(self, uint32_t new_cap) except -1:
        Policy.grow(self, new_cap)
        self.ref = <uint8_t*>grow_array(self.ref, new_cap, sizeof(uint8_t))
        return 0

    cdef void insert(self, uint32_t slot, uint32_t h) noexcept:
        self.ref[slot] = 0
        list_push_head(&self.lst, self.prev, self.nxt, slot)
        self.count += 1

    cdef void access(self, uint32_t slot, uint32_t h) noexcept:
        self.ref[slot] = 1

    cdef void update(self, uint32_t slot, uint32_t h) noexcept:
        self.ref[slot] = 1

    cdef uint32_t evict(self) noexcept:
        # Terminates: each pass clears the bit of the entry it skips, so within
        # one full turn of the face some entry is found unreferenced.
        cdef uint32_t s = self.lst.tail
        while s != NO_SLOT and self.ref[s]:
            self.ref[s] = 0
            list_unlink(&self.lst, self.prev, self.nxt, s)
            list_push_head(&self.lst, self.prev, self.nxt, s)
            s = self.lst.tail
        if s != NO_SLOT:
            list_unlink(&self.lst, self.prev, self.nxt, s)
            self.count -= 1
        return s

    @property
    def name(self):
        return "clock"
