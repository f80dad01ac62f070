"""W-TinyLFU eviction (Einziger, Friedman & Manes, ACM ToS 2017), with a window
whose size follows ghost evidence."""

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free
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

cdef enum:
    SEG_WINDOW = 1
    SEG_PROBATION = 2
    SEG_PROTECTED = 3

# Independent seeds: each structure draws its indexes from its own mix of the
# one 32-bit key hash.
# Row i of the sketch uses seed SEED_ROW + i * ROW_STRIDE.
cdef uint32_t SEED_ROW = 0x7FEB352DU
cdef uint32_t ROW_STRIDE = 0x9E3779B9U
cdef uint32_t SEED_DOOR_WORD = 0x846CA68BU
cdef uint32_t SEED_DOOR_BITS = 0x3C6EF372U
cdef uint32_t SEED_GHOST_WORD = 0x51ED2701U
cdef uint32_t SEED_GHOST_BITS = 0x2F1A3B45U
cdef uint32_t SEED_ADMIT = 0xA54FF53AU

cdef uint64_t HALF_MASK = 0x7777777777777777ULL
# Sketch words: at least 8, at most 2**26 (512 MiB; also keeps the word index
# clear of the two top bits that pick the counter); past that the estimates of
# a huge cache only get noisier.
cdef uint32_t MIN_WORDS = 8
cdef uint32_t MAX_WORDS = 1U << 26
# Limits up to this many entries get their full-size filters at the first
# grow (12 MiB at most); above it the filters widen with the slot arrays.
cdef uint32_t EAGER_LIMIT = 1U << 20
# Doorkeeper: 64 bits per sketch word, i.e. about 8 bytes per entry: fewer
# false positives measured better than a 4-byte filter on skewed and scan loads.
cdef uint32_t DOOR_BITS_PER_WORD = 64
# Admission: a candidate that does not beat the victim loses, except that a
# warm one (estimate >= WARM) gets in with probability 1/128 (``admit``).
cdef uint32_t WARM = 6

# Window share of capacity, in 1/65536ths: starts at 1%, moves by 1/16 of
# capacity at a time, never above 95% (main keeps a foothold).
cdef uint32_t WINDOW_START = 655
cdef uint32_t WINDOW_STEP = 4096
cdef uint32_t WINDOW_TOP = 62259
# Ghost rings: bloom bits per remembered hash; ghost hits per verdict.
cdef uint32_t GHOST_BITS = 16
cdef uint32_t VERDICT = 128
# Window entries moved into main per call at most (see ``drain``).
cdef uint32_t DRAIN_BATCH = 4


cdef inline uint64_t three_bits(uint32_t g) noexcept nogil:
    # Three bit positions of one 64-bit word from 18 bits of a mix: a
    # single-word ("blocked") bloom probe costs one cache line.
    return (1ULL << (g & 63)) | (1ULL << ((g >> 6) & 63)) | (1ULL << ((g >> 12) & 63))


@cython.final
cdef class TinyLFUPolicy(Policy):
    """W-TinyLFU: a small LRU window in front of a segmented LRU, with a
    frequency filter deciding who gets into the main space.

    New entries enter the window (1% of capacity at first, at least one entry).
    When the cache is full, the least recent window entry (the candidate) must
    beat the least recent entry of main's probation segment (the victim) on
    estimated frequency to move into main; the loser is evicted. A burst of
    keys seen once (a scan) thus flows through the window without displacing
    the working set, while a key seen often gets in. Main is an SLRU: a hit in
    probation (about 20% of main) promotes to protected (about 80%), whose
    overflow falls back to probation's most recent end.

    Frequencies come from a count-min sketch of 4-bit counters (4 per key,
    drawn from the 32-bit hash with ``mix32``; conservative update) behind a
    doorkeeper bloom filter that absorbs each key's first sighting, so one-hit
    wonders never reach the counters. After 10 * capacity recorded accesses
    (capacity: the limit, else the slot capacity) the counters are halved and
    the doorkeeper is cleared: old popularity fades. An access is *recorded*
    when it raises a counter, as in Caffeine: a first sighting (doorkeeper) or
    a key whose counters are all saturated does not advance the aging clock,
    so a flood of new keys cannot age the history of the working set away.

    Recorded: every hit (``access``), overwrite (``update``) and miss (``miss``),
    and every ``insert`` except one that directly follows a miss on the same
    hash, since a read-through miss and the insert it causes are one request.

    The window adapts (instead of Caffeine's hit-rate hill climbing, whose
    noise cost up to a point of hit ratio on steady skewed loads here): two
    ghost rings (bloom filters in two generations) remember the hashes of the
    last capacity/16 (up to twice that) rejected candidates and entries
    evicted from main. A key that misses while in the first ring would have hit
    with a window larger by capacity/16; one in the second, with a main larger
    by as much. Every 128 such ghost hits, if one ring leads by more than two
    standard deviations (Poisson), the window target moves by capacity/16
    toward it (between one entry and 95%). Entries follow a few per call: a
    shrunk window drains into main, a grown one fills as main evicts. The rings
    judge only once the sketch has aged at its present width and capacity/8
    evictions have been remembered, so that warm-up noise does not steer.

    Capacity is ``limit`` once the cache holds that many entries, else the live
    count at the time of the decision: without a limit, while the cache fills,
    or while another bound (bytes) holds it below the limit. Segments are
    shares of it. The policy works whether the core evicts before inserting
    (as ``cachecore`` does) or after.

    The sketch has the next power of two >= capacity words (16 counters each,
    8 bytes per entry; the doorkeeper adds 8): sized for ``limit`` at the first
    ``grow`` when the limit is at most 2**20, else (and without a limit) for
    the slot capacity, widening with ``grow``. Widening clears the filters.

    Hash flooding: an attacker who can make a victim's key look hot could keep
    every candidate out. Ties go to the victim, and a candidate with an estimate
    >= 6 (warm) that does not beat the victim still gets in with probability
    1/128 (a xorshift generator with a fixed seed, so that runs reproduce; it
    advances only on such rejections, which an outsider cannot see), so no
    forged frequency pins main forever; cold candidates never get this chance.
    """

    def __cinit__(self, limit=0):
        list_init(&self.window)
        list_init(&self.probation)
        list_init(&self.protected)
        self.seg = NULL
        self.hv = NULL
        self.sketch = NULL
        self.swords = 0
        self.dk = NULL
        self.dkwords = 0
        self.additions = 0
        self.sample = 0
        self.aged = False
        self.pending = 0
        self.has_pending = False
        # Fixed seed: hit ratios are reproducible; its state moves only on
        # warm rejections, which an outsider cannot observe.
        self.rng = mix32(self.limit, SEED_ADMIT) | 1U
        # Misses feed the sketch: ask the core to report them.
        self.counts_misses = True
        self.wfrac = WINDOW_START
        self.ghost = NULL
        self.gwords = 0
        self.gspan = 0
        self.gfill[0] = self.gfill[1] = 0
        self.gcur[0] = self.gcur[1] = 0
        self.gseen = 0
        self.ghits[0] = self.ghits[1] = 0

    def __dealloc__(self):
        free(self.seg)
        free(self.hv)
        free(self.sketch)
        free(self.dk)
        free(self.ghost)

    cdef int grow(self, uint32_t new_cap) except -1:
        if new_cap <= self.cap:
            return 0
        # Own arrays first: a MemoryError half-way leaves arrays larger than
        # ``cap`` says, never smaller.
        self.seg = <uint8_t*>grow_array(self.seg, new_cap, sizeof(uint8_t))
        self.hv = <uint32_t*>grow_array(self.hv, new_cap, sizeof(uint32_t))
        self.resize_filters(
            self.limit if 0 < self.limit and (self.limit <= EAGER_LIMIT or self.limit < new_cap)
            else new_cap)
        Policy.grow(self, new_cap)
        return 0

    cdef int resize_filters(self, uint32_t capacity) except -1:
        # Widening starts the filters afresh, as Caffeine does: counts learned
        # in a narrower table are mostly collisions, and carrying them over
        # measurably hurt admission. With a limit up to EAGER_LIMIT this runs
        # once, at the first grow.
        cdef uint32_t words = MIN_WORDS
        cdef uint32_t dkwords
        cdef uint32_t span
        cdef uint32_t gwords = 1
        cdef uint64_t* sketch = NULL
        cdef uint64_t* dk = NULL
        cdef uint64_t* ghost = NULL
        # The aging period follows the limit from the start.
        cdef uint64_t sample = 10 * <uint64_t>(self.limit if self.limit else capacity)
        while words < capacity and words < MAX_WORDS:
            words <<= 1
        self.sample = <uint32_t>(sample if sample < 0xFFFFFFFFU else 0xFFFFFFFFU)
        if words <= self.swords:
            return 0
        dkwords = <uint32_t>((<uint64_t>words * DOOR_BITS_PER_WORD) >> 6)
        span = <uint32_t>((<uint64_t>capacity * WINDOW_STEP) >> 16)
        if span < 8:
            span = 8
        while <uint64_t>gwords * 64 < <uint64_t>span * GHOST_BITS:
            gwords <<= 1
        # All or nothing: on MemoryError the old filters stay in place.
        try:
            sketch = <uint64_t*>grow_array(NULL, words, sizeof(uint64_t))
            dk = <uint64_t*>grow_array(NULL, dkwords, sizeof(uint64_t))
            ghost = <uint64_t*>grow_array(NULL, 4 * <size_t>gwords, sizeof(uint64_t))
        except MemoryError:
            free(sketch)
            free(dk)
            raise
        memset(sketch, 0, words * sizeof(uint64_t))
        memset(dk, 0, dkwords * sizeof(uint64_t))
        memset(ghost, 0, 4 * <size_t>gwords * sizeof(uint64_t))
        free(self.sketch)
        free(self.dk)
        free(self.ghost)
        self.sketch = sketch
        self.swords = words
        self.dk = dk
        self.dkwords = dkwords
        self.ghost = ghost
        self.gwords = gwords
        self.gspan = span
        self.additions = 0
        self.gfill[0] = self.gfill[1] = 0
        self.gcur[0] = self.gcur[1] = 0
        self.gseen = 0
        self.ghits[0] = self.ghits[1] = 0
        # The window adapts only on a full sample at the new width.
        self.aged = False
        return 0

    # ---- frequency sketch -------------------------------------------------

    cdef void record(self, uint32_t h) noexcept:
        cdef uint32_t wi
        cdef uint64_t m
        cdef uint32_t x
        cdef uint32_t w[4]
        cdef uint32_t sh[4]
        cdef uint32_t c[4]
        cdef uint32_t low = 15
        cdef int i
        if self.swords == 0:
            return
        # Doorkeeper first: a key's first sighting in a period only sets its
        # bits, so keys seen once never reach the counters.
        wi = mix32(h, SEED_DOOR_WORD) & (self.dkwords - 1)
        m = three_bits(mix32(h, SEED_DOOR_BITS))
        if (self.dk[wi] & m) != m:
            self.dk[wi] |= m
            return
        # Four independent rows: row i owns nibbles 4i..4i+3 of every word; a
        # mix per row picks the word (low bits) and the nibble (top 2 bits).
        # Four cache lines rather than one (Caffeine packs a key's counters in
        # one line): measured, the misses are lost in the cost of a Python
        # call, while the fewer collisions gain 0.1 to 0.3 points of hit ratio.
        for i in range(4):
            x = mix32(h, SEED_ROW + <uint32_t>i * ROW_STRIDE)
            w[i] = x & (self.swords - 1)
            sh[i] = ((<uint32_t>i << 2) | (x >> 30)) << 2
            c[i] = (self.sketch[w[i]] >> sh[i]) & 15
            if c[i] < low:
                low = c[i]
        if low == 15:
            return
        # Conservative update: only the counters at the minimum move, since
        # the others already overcount through collisions.
        for i in range(4):
            if c[i] == low:
                self.sketch[w[i]] += 1ULL << sh[i]
        self.additions += 1
        if self.additions >= self.sample:
            self.age()

    cdef uint32_t frequency(self, uint32_t h) noexcept:
        cdef uint32_t wi
        cdef uint64_t m
        cdef uint32_t x
        cdef uint32_t c
        cdef uint32_t low = 15
        cdef int i
        if self.swords == 0:
            return 0
        for i in range(4):
            x = mix32(h, SEED_ROW + <uint32_t>i * ROW_STRIDE)
            c = (self.sketch[x & (self.swords - 1)] >> (((<uint32_t>i << 2) | (x >> 30)) << 2)) & 15
            if c < low:
                low = c
        wi = mix32(h, SEED_DOOR_WORD) & (self.dkwords - 1)
        m = three_bits(mix32(h, SEED_DOOR_BITS))
        return low + 1 if (self.dk[wi] & m) == m else low

    cdef void age(self) noexcept:
        # O(sketch) once per 10 * capacity increments: amortised O(1).
        cdef uint32_t i
        for i in range(self.swords):
            self.sketch[i] = (self.sketch[i] >> 1) & HALF_MASK
        memset(self.dk, 0, self.dkwords * sizeof(uint64_t))
        self.additions >>= 1
        self.aged = True

    cdef bint admit(self, uint32_t cand_h, uint32_t victim_h) noexcept:
        cdef uint32_t fc = self.frequency(cand_h)
        cdef uint32_t fv = self.frequency(victim_h)
        if fc > fv:
            return True
        if fc < WARM:
            return False
        self.rng ^= self.rng << 13
        self.rng ^= self.rng >> 17
        self.rng ^= self.rng << 5
        return (self.rng & 127) == 0

    # ---- window adaptation ------------------------------------------------

    cdef void ghost_put(self, int ring, uint32_t h) noexcept:
        # A ring holds between gspan and 2 * gspan hashes: when the current
        # generation is full, the older one is wiped and becomes current.
        cdef uint64_t* bloom
        if self.gwords == 0:
            return
        if self.gfill[ring] >= self.gspan:
            self.gcur[ring] ^= 1
            self.gfill[ring] = 0
            memset(self.ghost + (2 * ring + self.gcur[ring]) * self.gwords, 0,
                   self.gwords * sizeof(uint64_t))
        bloom = self.ghost + (2 * ring + self.gcur[ring]) * self.gwords
        bloom[mix32(h, SEED_GHOST_WORD) & (self.gwords - 1)] |= three_bits(
            mix32(h, SEED_GHOST_BITS))
        self.gfill[ring] += 1
        if self.gseen < 0xFFFFFFFFU:
            self.gseen += 1

    cdef bint ghost_has(self, int ring, uint32_t h) noexcept:
        cdef uint32_t wi = mix32(h, SEED_GHOST_WORD) & (self.gwords - 1)
        cdef uint64_t m = three_bits(mix32(h, SEED_GHOST_BITS))
        cdef uint64_t* bloom = self.ghost + 2 * ring * self.gwords
        return (bloom[wi] & m) == m or (bloom[self.gwords + wi] & m) == m

    cdef void adapt(self, uint32_t h) noexcept:
        # Compares the marginal value of capacity/16 more window (hits on
        # rejected candidates) with that of as much more main (hits on main's
        # victims), like ARC's ghost lists; bloom false positives strike both
        # rings alike.
        cdef int64_t d
        cdef int64_t n
        cdef int64_t f
        if self.gwords == 0:
            return
        if self.ghost_has(0, h):
            self.ghits[0] += 1
        if self.ghost_has(1, h):
            self.ghits[1] += 1
        n = <int64_t>self.ghits[0] + self.ghits[1]
        if n < VERDICT:
            return
        d = <int64_t>self.ghits[0] - self.ghits[1]
        self.ghits[0] = self.ghits[1] = 0
        if not (self.aged and self.gseen >= 2 * <uint64_t>self.gspan):
            return
        # Counts are Poisson: act only when the lead exceeds 2 sigma.
        if d * d <= 4 * n:
            return
        f = <int64_t>self.wfrac + (WINDOW_STEP if d > 0 else -<int64_t>WINDOW_STEP)
        if f < 0:
            f = 0
        elif f > WINDOW_TOP:
            f = WINDOW_TOP
        self.wfrac = <uint32_t>f

    # ---- segments ---------------------------------------------------------

    cdef inline uint32_t capacity(self) noexcept:
        # The size the segments share: the limit once the cache has reached
        # it, the live count before that or without a limit (or when another
        # bound, e.g. bytes, holds the cache below its limit).
        return self.limit if self.limit and self.count >= self.limit else self.count

    cdef inline uint32_t window_max(self, uint32_t c) noexcept:
        cdef uint32_t w = <uint32_t>((<uint64_t>c * self.wfrac) >> 16)
        if w == 0 and c:
            w = 1
        return w

    cdef void drain(self, uint32_t c) noexcept:
        # The window's overflow moves into main without a contest while main
        # is at least two entries short of its share: nothing has to leave for
        # it. One short is the steady state of a full cache whose core evicts
        # before it inserts (the new entry is still to come), so moving then
        # would let every other candidate in unjudged. A few moves per call
        # keep every call O(1) even when the window target just shrank.
        cdef uint32_t wmax = self.window_max(c)
        cdef uint32_t mmax = c - wmax
        cdef uint32_t s
        cdef uint32_t moved = 0
        while (self.window.size > wmax
               and self.probation.size + self.protected.size + 1 < mmax
               and moved < DRAIN_BATCH):
            s = self.window.tail
            list_unlink(&self.window, self.prev, self.nxt, s)
            list_push_head(&self.probation, self.prev, self.nxt, s)
            self.seg[s] = SEG_PROBATION
            moved += 1

    @cython.cdivision(True)
    cdef void promote(self, uint32_t slot, uint32_t c) noexcept:
        # Protected holds 80% of main's share; its overflow falls back to
        # probation's MRU end. Usually one in, one out; after the window grew
        # (main's share shrank) the surplus goes a few per promotion.
        cdef uint32_t wmax = self.window_max(c)
        cdef uint32_t pmax = <uint32_t>((<uint64_t>(c - wmax) * 4) / 5)
        cdef uint32_t s
        cdef uint32_t moved = 0
        list_unlink(&self.probation, self.prev, self.nxt, slot)
        list_push_head(&self.protected, self.prev, self.nxt, slot)
        self.seg[slot] = SEG_PROTECTED
        while self.protected.size > pmax and moved < DRAIN_BATCH:
            moved += 1
            s = self.protected.tail
            list_unlink(&self.protected, self.prev, self.nxt, s)
            list_push_head(&self.probation, self.prev, self.nxt, s)
            self.seg[s] = SEG_PROBATION

    # ---- protocol ---------------------------------------------------------

    cdef void insert(self, uint32_t slot, uint32_t h) noexcept:
        if not (self.has_pending and self.pending == h):
            self.record(h)
        self.has_pending = False
        self.adapt(h)
        self.hv[slot] = h
        self.seg[slot] = SEG_WINDOW
        list_push_head(&self.window, self.prev, self.nxt, slot)
        self.count += 1
        self.drain(self.capacity())

    cdef void access(self, uint32_t slot, uint32_t h) noexcept:
        cdef uint8_t sg = self.seg[slot]
        self.record(h)
        if sg == SEG_WINDOW:
            list_move_head(&self.window, self.prev, self.nxt, slot)
        elif sg == SEG_PROBATION:
            self.promote(slot, self.capacity())
        else:
            list_move_head(&self.protected, self.prev, self.nxt, slot)

    cdef void update(self, uint32_t slot, uint32_t h) noexcept:
        self.access(slot, h)

    cdef void miss(self, uint32_t h) noexcept:
        self.record(h)
        self.pending = h
        self.has_pending = True

    cdef void remove(self, uint32_t slot) noexcept:
        cdef uint8_t sg = self.seg[slot]
        if sg == SEG_WINDOW:
            list_unlink(&self.window, self.prev, self.nxt, slot)
        elif sg == SEG_PROBATION:
            list_unlink(&self.probation, self.prev, self.nxt, slot)
        else:
            list_unlink(&self.protected, self.prev, self.nxt, slot)
        self.count -= 1

    cdef uint32_t evict(self) noexcept:
        # The cache is at or over a bound. Works whether the core evicts
        # before inserting (count == capacity) or after (count == capacity + 1).
        cdef uint32_t c
        cdef uint32_t cand
        cdef uint32_t victim
        cdef SlotList* vlist
        if self.count == 0:
            return NO_SLOT
        c = self.capacity()
        self.drain(c)
        if self.window.size > self.window_max(c):
            # The window is over its share and main is (all but) full: the
            # window's LRU entry must win its place against main's.
            cand = self.window.tail
            if self.probation.size:
                vlist = &self.probation
            elif self.protected.size:
                vlist = &self.protected
            else:
                list_unlink(&self.window, self.prev, self.nxt, cand)
                self.count -= 1
                return cand
            victim = vlist.tail
            list_unlink(&self.window, self.prev, self.nxt, cand)
            self.count -= 1
            if self.admit(self.hv[cand], self.hv[victim]):
                list_unlink(vlist, self.prev, self.nxt, victim)
                list_push_head(&self.probation, self.prev, self.nxt, cand)
                self.seg[cand] = SEG_PROBATION
                self.ghost_put(1, self.hv[victim])
                return victim
            self.ghost_put(0, self.hv[cand])
            return cand
        # The window is within its share, so main holds the surplus.
        if self.probation.size:
            vlist = &self.probation
        elif self.protected.size:
            vlist = &self.protected
        else:
            vlist = &self.window
        victim = vlist.tail
        list_unlink(vlist, self.prev, self.nxt, victim)
        self.count -= 1
        if vlist != &self.window:
            self.ghost_put(1, self.hv[victim])
        return victim

    cdef void clear(self) noexcept:
        # A fresh start: the history of the dropped entries is dropped too.
        list_init(&self.window)
        list_init(&self.probation)
        list_init(&self.protected)
        if self.swords:
            memset(self.sketch, 0, self.swords * sizeof(uint64_t))
            memset(self.dk, 0, self.dkwords * sizeof(uint64_t))
            memset(self.ghost, 0, 4 * <size_t>self.gwords * sizeof(uint64_t))
        self.additions = 0
        self.aged = False
        self.has_pending = False
        self.wfrac = WINDOW_START
        self.gfill[0] = self.gfill[1] = 0
        self.gcur[0] = self.gcur[1] = 0
        self.gseen = 0
        self.ghits[0] = self.ghits[1] = 0
        self.count = 0

    @property
    def name(self):
        return "tinylfu"

    # Introspection for tests.
    def _sizes(self):
        """``(|window|, |probation|, |protected|)``."""
        return (self.window.size, self.probation.size, self.protected.size)

    def _segment(self, slot):
        """1 window, 2 probation, 3 protected: the segment of the live ``slot``."""
        if slot >= self.cap:
            raise IndexError(slot)
        return self.seg[<uint32_t>slot]

    def _frequency(self, h):
        """Estimated frequency of the hash ``h`` (sketch + doorkeeper)."""
        return self.frequency(h)

    def _sketch_words(self):
        """Number of 64-bit words of the sketch (16 counters each)."""
        return self.swords

    def _window_target(self):
        """Current target size of the window, in entries."""
        return self.window_max(self.capacity())
