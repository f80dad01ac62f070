"""Adaptive Replacement Cache (Megiddo & Modha, FAST 2003)."""

cimport cython
from libc.stdint cimport uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from hypercache._core.policy cimport (
    NO_SLOT,
    Policy,
    SlotList,
    grow_array,
    list_init,
    list_move_head,
    list_push_head,
    list_unlink,
    mix32,
)

cdef uint32_t TABLE_SEED = 0x2545F491U


@cython.final
cdef class ARCPolicy(Policy):
    """Adaptive Replacement Cache: balances recency against frequency by itself.

    Two resident LRU lists, T1 (entries seen once since they came in) and T2
    (seen again), and two ghost lists, B1 and B2, holding the key hashes of what
    was recently evicted from T1 and T2. A key re-inserted while its hash is in
    B1 shows that T1 was too small, so the target size ``p`` of T1 grows; a hit
    in B2 shrinks it. Such a key enters T2 directly. Eviction takes the LRU end
    of T1 when T1 is above its target, else that of T2, leaving a ghost.

    The capacity ``c`` of the paper is ``limit`` when it is non-zero; without an
    item limit (a cache bounded by bytes only) it is the live count at the time
    of the decision: after linking the new entry on insert, before unlinking the
    victim on evict, after unlinking on remove.

    Ghosts are 32-bit hashes: two keys with the same hash share one ghost, which
    at worst lets one key in through another's history. ``remove`` (delete,
    expiry) leaves no ghost; only ``evict`` does.

    The paper adapts ``p`` and then runs REPLACE for the request that missed.
    The core evicts before it inserts (and ``miss`` is not reported to ARC), so
    here REPLACE runs with the ``p`` and the B2 tie rule of the previous insert;
    the adaptation itself is the paper's.
    """

    # Bounds (checked at the end of every operation): |T1| + |B1| <= c and
    # |T1| + |T2| + |B1| + |B2| <= 2c, trimming ghosts from the LRU end of B1,
    # then of B2. Independently the ghost pool has ``cap`` nodes (the slot
    # capacity); when it is full, the list that receives a ghost first drops its
    # own oldest one. All of it lives in C arrays sized at grow(), so no
    # operation allocates.

    def __cinit__(self, limit=0):
        list_init(&self.t1)
        list_init(&self.t2)
        list_init(&self.b1)
        list_init(&self.b2)
        self.where = NULL
        self.hv = NULL
        self.gprev = NULL
        self.gnext = NULL
        self.ghash = NULL
        self.gwhere = NULL
        self.gcap = 0
        self.gfree = NO_SLOT
        self.gused = 0
        self.table = NULL
        self.tmask = 0
        self.p = 0
        self.b2_hit = False

    def __dealloc__(self):
        free(self.where)
        free(self.hv)
        free(self.gprev)  # gnext points into the same block
        free(self.ghash)
        free(self.gwhere)
        free(self.table)

    cdef int grow(self, uint32_t new_cap) except -1:
        if new_cap <= self.cap:
            return 0
        cdef size_t tsize = 2
        cdef uint32_t* table
        cdef uint32_t g
        while tsize < 2 * <size_t>new_cap:
            tsize <<= 1
        # Every array is grown before ``cap``/``gcap`` say so: a MemoryError
        # half-way leaves larger arrays behind, never smaller ones.
        self.where = <uint8_t*>grow_array(self.where, new_cap, sizeof(uint8_t))
        self.hv = <uint32_t*>grow_array(self.hv, new_cap, sizeof(uint32_t))
        # Interleaved like the resident links (see policy.pxd): gnext == gprev + 1.
        self.gprev = <uint32_t*>grow_array(self.gprev, 2 * <size_t>new_cap, sizeof(uint32_t))
        self.gnext = self.gprev + 1
        self.ghash = <uint32_t*>grow_array(self.ghash, new_cap, sizeof(uint32_t))
        self.gwhere = <uint8_t*>grow_array(self.gwhere, new_cap, sizeof(uint8_t))
        table = <uint32_t*>malloc(tsize * sizeof(uint32_t))
        if table == NULL:
            raise MemoryError()
        free(self.table)
        self.table = table
        self.tmask = <uint32_t>(tsize - 1)
        memset(self.table, 0xFF, tsize * sizeof(uint32_t))
        g = self.b1.head
        while g != NO_SLOT:
            self.table_put(g)
            g = self.gnext[2 * g]
        g = self.b2.head
        while g != NO_SLOT:
            self.table_put(g)
            g = self.gnext[2 * g]
        self.gcap = new_cap
        Policy.grow(self, new_cap)
        return 0

    cdef inline uint32_t capacity(self) noexcept:
        return self.limit if self.limit else self.count

    # ---- ghost hash table -------------------------------------------------

    cdef inline uint32_t table_home(self, uint32_t h) noexcept:
        return mix32(h, TABLE_SEED) & self.tmask

    cdef uint32_t ghost_find(self, uint32_t h) noexcept:
        # Load <= 1/2, so a probe run is short; it ends at an empty cell.
        cdef uint32_t i
        cdef uint32_t g
        if self.table == NULL:
            return NO_SLOT
        i = self.table_home(h)
        g = self.table[i]
        while g != NO_SLOT:
            if self.ghash[g] == h:
                return g
            i = (i + 1) & self.tmask
            g = self.table[i]
        return NO_SLOT

    cdef void table_put(self, uint32_t g) noexcept:
        cdef uint32_t i = self.table_home(self.ghash[g])
        while self.table[i] != NO_SLOT:
            i = (i + 1) & self.tmask
        self.table[i] = g

    cdef void ghost_drop(self, uint32_t g) noexcept:
        cdef uint32_t i = self.table_home(self.ghash[g])
        cdef uint32_t j
        cdef uint32_t k
        cdef uint32_t e
        while self.table[i] != g:
            i = (i + 1) & self.tmask
        # Backward-shift delete: pull later members of the probe run into the
        # hole unless their home lies cyclically in (hole, their cell], so that
        # every run stays unbroken and no tombstone is ever needed.
        j = i
        while True:
            j = (j + 1) & self.tmask
            e = self.table[j]
            if e == NO_SLOT:
                break
            k = self.table_home(self.ghash[e])
            if ((j - k) & self.tmask) >= ((j - i) & self.tmask):
                self.table[i] = e
                i = j
        self.table[i] = NO_SLOT
        if self.gwhere[g] == 1:
            list_unlink(&self.b1, self.gprev, self.gnext, g)
        else:
            list_unlink(&self.b2, self.gprev, self.gnext, g)
        self.gnext[2 * g] = self.gfree
        self.gfree = g

    cdef void ghost_add(self, uint32_t h, uint8_t which) noexcept:
        cdef uint32_t g
        cdef SlotList* own = &self.b1 if which == 1 else &self.b2
        cdef SlotList* other = &self.b2 if which == 1 else &self.b1
        if self.gcap == 0:
            return
        g = self.ghost_find(h)
        if g != NO_SLOT:
            self.ghost_drop(g)
        if self.b1.size + self.b2.size >= self.gcap:
            self.ghost_drop(own.tail if own.size else other.tail)
        if self.gfree != NO_SLOT:
            g = self.gfree
            self.gfree = self.gnext[2 * g]
        else:
            g = self.gused
            self.gused += 1
        self.ghash[g] = h
        self.gwhere[g] = which
        list_push_head(own, self.gprev, self.gnext, g)
        self.table_put(g)

    cdef void ghost_trim(self) noexcept:
        cdef uint32_t c = self.capacity()
        cdef size_t c2 = 2 * <size_t>c
        while self.b1.size and self.t1.size + self.b1.size > c:
            self.ghost_drop(self.b1.tail)
        while (self.b1.size or self.b2.size) and (
            <size_t>self.count + self.b1.size + self.b2.size > c2
        ):
            self.ghost_drop(self.b2.tail if self.b2.size else self.b1.tail)
        if self.p > c:
            self.p = c

    # ---- protocol ---------------------------------------------------------

    @cython.cdivision(True)
    cdef void insert(self, uint32_t slot, uint32_t h) noexcept:
        cdef uint32_t g = self.ghost_find(h)
        cdef uint32_t c
        cdef uint32_t delta
        self.count += 1
        self.hv[slot] = h
        self.b2_hit = False
        if g == NO_SLOT:
            self.where[slot] = 1
            list_push_head(&self.t1, self.prev, self.nxt, slot)
        else:
            # A ghost hit: the key was evicted lately and is wanted again, so
            # the list it was evicted from deserved more room. The step is the
            # ratio of the ghost lists (>= 1), as in the paper; the divisor is
            # the list that holds ``g``, hence non-zero.
            c = self.capacity()
            if self.gwhere[g] == 1:
                delta = self.b2.size / self.b1.size
                if delta < 1:
                    delta = 1
                self.p = c if delta >= c or self.p >= c - delta else self.p + delta
            else:
                delta = self.b1.size / self.b2.size
                if delta < 1:
                    delta = 1
                self.p = self.p - delta if self.p > delta else 0
                self.b2_hit = True
            self.ghost_drop(g)
            self.where[slot] = 2
            list_push_head(&self.t2, self.prev, self.nxt, slot)
        self.ghost_trim()

    cdef void access(self, uint32_t slot, uint32_t h) noexcept:
        if self.where[slot] == 1:
            list_unlink(&self.t1, self.prev, self.nxt, slot)
            list_push_head(&self.t2, self.prev, self.nxt, slot)
            self.where[slot] = 2
        else:
            list_move_head(&self.t2, self.prev, self.nxt, slot)

    cdef void update(self, uint32_t slot, uint32_t h) noexcept:
        self.access(slot, h)

    cdef void remove(self, uint32_t slot) noexcept:
        if self.where[slot] == 1:
            list_unlink(&self.t1, self.prev, self.nxt, slot)
        else:
            list_unlink(&self.t2, self.prev, self.nxt, slot)
        self.count -= 1
        self.ghost_trim()

    cdef uint32_t evict(self) noexcept:
        # REPLACE of the paper. Without an item limit c is the count before the
        # victim leaves, i.e. the size the cache is shrinking from.
        cdef uint32_t s
        cdef uint32_t c = self.capacity()
        cdef uint32_t target = self.p if self.p < c else c
        cdef uint32_t n1 = self.t1.size
        if self.count == 0:
            return NO_SLOT
        if n1 and (n1 > target or (self.b2_hit and n1 == target) or self.t2.size == 0):
            s = self.t1.tail
            list_unlink(&self.t1, self.prev, self.nxt, s)
            self.ghost_add(self.hv[s], 1)
        else:
            s = self.t2.tail
            list_unlink(&self.t2, self.prev, self.nxt, s)
            self.ghost_add(self.hv[s], 2)
        self.b2_hit = False
        self.count -= 1
        self.ghost_trim()
        return s

    cdef void clear(self) noexcept:
        list_init(&self.t1)
        list_init(&self.t2)
        list_init(&self.b1)
        list_init(&self.b2)
        self.gfree = NO_SLOT
        self.gused = 0
        if self.table != NULL:
            memset(self.table, 0xFF, (<size_t>self.tmask + 1) * sizeof(uint32_t))
        self.p = 0
        self.b2_hit = False
        self.count = 0

    @property
    def name(self):
        return "arc"

    # Introspection for tests.
    def _target(self):
        """``p``, the target size of T1."""
        return self.p

    def _sizes(self):
        """``(|T1|, |T2|, |B1|, |B2|)``."""
        return (self.t1.size, self.t2.size, self.b1.size, self.b2.size)

    def _ghost(self, h):
        """1 or 2 when the hash ``h`` is a ghost in B1 or B2, else 0."""
        cdef uint32_t g = self.ghost_find(h)
        return 0 if g == NO_SLOT else self.gwhere[g]

    def _list_of(self, slot):
        """1 or 2: the resident list (T1 or T2) of the live entry in ``slot``."""
        if slot >= self.cap:
            raise IndexError(slot)
        return self.where[<uint32_t>slot]
