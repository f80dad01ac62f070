"""W-TinyLFU eviction (Einziger, Friedman & Manes, ACM ToS 2017)."""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset
from libc.math cimport sqrt
from libc.stdlib cimport abs

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

# Independent seeds for the indexes drawn from one key hash.
cdef uint32_t SEED_BLOCK = 0x9E3779B9U
cdef uint32_t SEED_COUNTER = 0x7FEB352DU
cdef uint32_t SEED_DOOR1 = 0x846CA68BU
cdef uint32_t SEED_DOOR2 = 0x3C6EF372U
cdef uint32_t SEED_ADMIT = 0xA54FF53AU

cdef uint64_t HALF_MASK = 0x7777777777777777ULL
# Sketch words: at least one block, at most 2**26 (512 MiB would be absurd for
# a 32-bit slot space anyway; past it estimates just get noisier).
cdef uint32_t MIN_WORDS = 8
cdef uint32_t MAX_WORDS = 1U << 26
# Doorkeeper bits per sketch word, and probes per key.
cdef uint32_t DOOR_BITS_PER_WORD = 16
cdef int DOOR_PROBES = 2
cdef int COUNT_ALL = 1
cdef int CONSERVATIVE = 0
cdef int BLOCKED = 1
cdef int CLIMB = 0
cdef int LAZY = 0
cdef int WARMGATE = 1
cdef double RATIO = 1.0
cdef uint32_t GHBITS = 8
cdef int64_t SHRINKMUL = 1
cdef int GATE = 0
cdef int64_t GROWK = 4
cdef uint32_t GH_N = 256
cdef int64_t GH_STEP = 2048
cdef int DKFULL = 0
cdef double BANDK = 2.0
cdef bint FIRSTDEF = True
cdef double RESTART = 0.05
cdef int32_t STEP0 = 4096
cdef int64_t WMAXF = 52428
cdef int DKB = 0
cdef uint32_t SAMPLE_MUL = 10

def _tune(lazy=None, warmgate=None, ratio=None, ghbits=None, shrinkmul=None, gate=None, growk=None, ghn=None, ghstep=None, dkfull=None, bandk=None, climb=None, restart=None, step0=None, wmaxf=None, dkb=None, blocked=None, door=None, count_all=None, wstart=None, conservative=None, sample_mul=None, dkbits=None):
    global LAZY, WARMGATE, RATIO, GHBITS, SHRINKMUL, GATE, GROWK, GH_N, GH_STEP, DKFULL, BANDK, CLIMB, RESTART, STEP0, WMAXF, DKB, BLOCKED, DOOR_PROBES, COUNT_ALL, WINDOW_START, CONSERVATIVE, SAMPLE_MUL, DOOR_BITS_PER_WORD
    if blocked is not None: BLOCKED = blocked
    if dkb is not None: DKB = dkb
    if climb is not None: CLIMB = climb
    if bandk is not None: BANDK = bandk
    if dkfull is not None: DKFULL = dkfull
    if ghn is not None: GH_N = ghn
    if gate is not None: GATE = gate
    if shrinkmul is not None: SHRINKMUL = shrinkmul
    if ghbits is not None: GHBITS = ghbits
    if ratio is not None: RATIO = ratio
    if warmgate is not None: WARMGATE = warmgate
    if lazy is not None: LAZY = lazy
    if growk is not None: GROWK = growk
    if ghstep is not None: GH_STEP = ghstep
    if restart is not None: RESTART = restart
    if step0 is not None: STEP0 = step0
    if wmaxf is not None: WMAXF = wmaxf
    if door is not None: DOOR_PROBES = door
    if count_all is not None: COUNT_ALL = count_all
    if wstart is not None: WINDOW_START = wstart
    if conservative is not None: CONSERVATIVE = conservative
    if sample_mul is not None: SAMPLE_MUL = sample_mul
    if dkbits is not None: DOOR_BITS_PER_WORD = dkbits

# Admission: a candidate no more frequent than the victim loses, except that a
# warm one (estimate >= WARM) wins with probability 1/128 (see ``admit``).
cdef uint32_t WARM = 6

# Window share of capacity in 1/65536ths: 1% at start.
cdef uint32_t WINDOW_START = 655


@cython.final
cdef class TinyLFUPolicy(Policy):
    """W-TinyLFU: a small LRU window in front of a segmented LRU, with a
    frequency filter deciding who gets into the main space.

    New entries enter the window (about 1% of capacity, at least one entry).
    When the cache is full, the least recent window entry (the candidate) must
    beat the least recent entry of main's probation segment (the victim) on
    estimated frequency to move into main; the loser is evicted. So a burst of
    keys seen once (a scan) flows through the window without displacing the
    working set, while a key seen often gets in. Main is an SLRU: a hit in
    probation (about 20% of main) promotes to protected (about 80%), whose
    overflow falls back to probation's most recent end.

    Frequencies come from a count-min sketch of 4-bit counters (4 per key,
    drawn from the 32-bit hash with ``mix32``) behind a doorkeeper bloom filter
    that absorbs each key's first sighting, so that one-hit wonders do not
    pollute the counters. Every 10 * capacity recorded accesses all counters
    are halved and the doorkeeper is cleared: old popularity fades.

    Recorded: every hit (``access``), overwrite (``update``) and miss (``miss``),
    and every ``insert`` except one that directly follows a miss on the same
    hash, since a read-through miss and the insert it causes are one request.

    Capacity is ``limit`` when non-zero, else the live count at the time of the
    decision (the segments are then shares of what the cache holds). The sketch
    is sized to the next power of two >= min(limit, slot capacity), or the slot
    capacity without a limit, and grows with ``grow``.

    Hash flooding: an attacker who can make a victim's key look hot could keep
    every candidate out. Ties go to the victim, and a candidate with an estimate
    >= 6 (warm) that does not beat the victim still gets in with probability
    1/128 (a per-instance xorshift seeded from the object's address), so no
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
        self.dkbits = 0
        self.additions = 0
        self.sample = 0
        self.dkins = 0
        self.aged = True
        self.gh = NULL
        self.aged = False
        self.ghw = 0
        self.gch = 0
        self.gvh = 0
        self.pending = 0
        self.has_pending = False
        self.rng = mix32(<uint32_t><size_t><void*>self, SEED_ADMIT) | 1U
        self.wfrac = WINDOW_START
        self.step = STEP0
        self.first = True
        self.hits = 0
        self.misses = 0
        self.prev_rate = 0.0

    def __dealloc__(self):
        free(self.seg)
        free(self.hv)
        free(self.sketch)
        free(self.dk)
        free(self.gh)

    cdef int grow(self, uint32_t new_cap) except -1:
        if new_cap <= self.cap:
            return 0
        self.seg = <uint8_t*>grow_array(self.seg, new_cap, sizeof(uint8_t))
        self.hv = <uint32_t*>grow_array(self.hv, new_cap, sizeof(uint32_t))
        self.resize_sketch(self.limit if 0 < self.limit < new_cap else new_cap)
        Policy.grow(self, new_cap)
        return 0

    cdef int resize_sketch(self, uint32_t capacity) except -1:
        # Doubling keeps every estimate: indexes are the low bits of a mix, so
        # with one more bit a key lands either on its old word or on that
        # word's copy in the new half; copying the old table into each new
        # part (likewise for the doorkeeper) preserves all counts.
        cdef uint32_t words = MIN_WORDS
        cdef uint32_t old = self.swords
        cdef uint32_t old_dk = self.dkbits >> 6
        cdef uint32_t dkwords
        cdef uint32_t i
        while words < capacity and words < MAX_WORDS:
            words <<= 1
        cdef uint64_t sample = SAMPLE_MUL * <uint64_t>capacity
        self.sample = <uint32_t>(sample if sample < 0xFFFFFFFFU else 0xFFFFFFFFU)
        if words <= old:
            return 0
        dkwords = words * DOOR_BITS_PER_WORD >> 6
        self.sketch = <uint64_t*>grow_array(self.sketch, words, sizeof(uint64_t))
        if old == 0:
            memset(self.sketch, 0, words * sizeof(uint64_t))
        else:
            i = old
            while i < words:
                memcpy(self.sketch + i, self.sketch, old * sizeof(uint64_t))
                i += old
        self.swords = words
        self.dk = <uint64_t*>grow_array(self.dk, dkwords, sizeof(uint64_t))
        if old_dk == 0:
            memset(self.dk, 0, dkwords * sizeof(uint64_t))
        else:
            i = old_dk
            while i < dkwords:
                memcpy(self.dk + i, self.dk, old_dk * sizeof(uint64_t))
                i += old_dk
        self.dkbits = dkwords << 6
        cdef uint32_t delta = capacity * GH_STEP >> 16
        if delta < 8:
            delta = 8
        cdef uint32_t gw = 1
        while gw * 64 < delta * GHBITS:
            gw <<= 1
        free(self.gh)
        self.gh = <uint64_t*>grow_array(NULL, 4 * gw, sizeof(uint64_t))
        memset(self.gh, 0, 4 * gw * sizeof(uint64_t))
        self.ghw = gw
        self.ghdelta = delta
        self.ghins[0] = self.ghins[1] = 0
        self.ghgen[0] = self.ghgen[1] = 0
        self.ghcur[0] = self.ghcur[1] = 0
        return 0

    # ---- frequency sketch -------------------------------------------------

    cdef void record(self, uint32_t h) noexcept:
        cdef uint32_t g1
        cdef uint32_t g2
        cdef uint32_t b
        cdef uint64_t bit
        cdef bint seen = True
        cdef uint32_t blk
        cdef uint32_t ch
        cdef uint32_t w
        cdef uint32_t sh
        cdef int i
        if self.swords == 0:
            return
        # Doorkeeper first: a key's first sighting in a period only sets its
        # bits, so keys seen once never reach the counters.
        g1 = mix32(h, SEED_DOOR1)
        g2 = mix32(h, SEED_DOOR2) | 1U
        for i in range(DOOR_PROBES):
            b = (g1 + <uint32_t>i * g2) & (self.dkbits - 1)
            if DKB:
                b = ((g1 & ((self.dkbits >> 6) - 1)) << 6) | ((g2 >> (6 * i + 1)) & 63)
            bit = 1ULL << (b & 63)
            if not (self.dk[b >> 6] & bit):
                seen = False
                self.dk[b >> 6] |= bit
        cdef bint added = False
        cdef uint32_t x
        cdef uint32_t mn = 15
        if seen:
            if CONSERVATIVE:
                mn = self.frequency_sk(h)
            blk = (mix32(h, SEED_BLOCK) & ((self.swords >> 3) - 1)) << 3
            ch = mix32(h, SEED_COUNTER)
            for i in range(4):
                # Row i owns words 2i and 2i+1 of the block; one hash byte picks
                # the word (bit 0) and the nibble (bits 1-4).
                w = blk + (<uint32_t>i << 1) + (ch & 1)
                sh = ((ch >> 1) & 15) << 2
                if not BLOCKED:
                    x = mix32(h, 0x1234567U * (i + 1))
                    w = x & (self.swords - 1)
                    sh = ((<uint32_t>i << 2) | (x >> 30)) << 2
                if ((self.sketch[w] >> sh) & 15) != 15 and (not CONSERVATIVE or ((self.sketch[w] >> sh) & 15) == mn):
                    self.sketch[w] += 1ULL << sh
                    added = True
                ch >>= 8
        if COUNT_ALL == 1 or added or (COUNT_ALL == 0 and not seen):
            self.additions += 1
        if not seen:
            self.dkins += 1
        if self.additions >= self.sample or (DKFULL and self.dkins >= (self.dkbits >> DKFULL)):
            self.age()

    cdef uint32_t frequency_sk(self, uint32_t h) noexcept:
        cdef uint32_t blk, ch, w, sh, c, x
        cdef uint32_t best = 15
        cdef int i
        blk = (mix32(h, SEED_BLOCK) & ((self.swords >> 3) - 1)) << 3
        ch = mix32(h, SEED_COUNTER)
        for i in range(4):
            w = blk + (<uint32_t>i << 1) + (ch & 1)
            sh = ((ch >> 1) & 15) << 2
            if not BLOCKED:
                x = mix32(h, 0x1234567U * (i + 1))
                w = x & (self.swords - 1)
                sh = ((<uint32_t>i << 2) | (x >> 30)) << 2
            c = (self.sketch[w] >> sh) & 15
            if c < best:
                best = c
            ch >>= 8
        return best

    cdef uint32_t frequency(self, uint32_t h) noexcept:
        cdef uint32_t blk
        cdef uint32_t ch
        cdef uint32_t w
        cdef uint32_t sh
        cdef uint32_t c
        cdef uint32_t best = 15
        cdef uint32_t x
        cdef uint32_t g1
        cdef uint32_t g2
        cdef uint32_t b
        cdef int i
        if self.swords == 0:
            return 0
        blk = (mix32(h, SEED_BLOCK) & ((self.swords >> 3) - 1)) << 3
        ch = mix32(h, SEED_COUNTER)
        for i in range(4):
            w = blk + (<uint32_t>i << 1) + (ch & 1)
            sh = ((ch >> 1) & 15) << 2
            if not BLOCKED:
                x = mix32(h, 0x1234567U * (i + 1))
                w = x & (self.swords - 1)
                sh = ((<uint32_t>i << 2) | (x >> 30)) << 2
            c = (self.sketch[w] >> sh) & 15
            if c < best:
                best = c
            ch >>= 8
        g1 = mix32(h, SEED_DOOR1)
        g2 = mix32(h, SEED_DOOR2) | 1U
        for i in range(DOOR_PROBES):
            b = (g1 + <uint32_t>i * g2) & (self.dkbits - 1)
            if DKB:
                b = ((g1 & ((self.dkbits >> 6) - 1)) << 6) | ((g2 >> (6 * i + 1)) & 63)
            if not (self.dk[b >> 6] & (1ULL << (b & 63))):
                return best
        return best + 1

    cdef void age(self) noexcept:
        # O(sketch) once per 10 * capacity records: amortised O(1) per record.
        cdef uint32_t i
        for i in range(self.swords):
            self.sketch[i] = (self.sketch[i] >> 1) & HALF_MASK
        memset(self.dk, 0, (self.dkbits >> 6) * sizeof(uint64_t))
        self.additions >>= 1
        self.dkins = 0
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

    # ---- segments ---------------------------------------------------------

    cdef inline uint32_t capacity(self) noexcept:
        return self.limit if self.limit else self.count

    cdef inline uint32_t window_max(self, uint32_t c) noexcept:
        cdef uint32_t w = <uint32_t>((<uint64_t>c * self.wfrac) >> 16)
        if w == 0 and c:
            w = 1
        return w

    cdef void reshape(self, uint32_t c) noexcept:
        # While main has room, the window's overflow moves in without a contest
        # (nothing has to leave). Amortised O(1): each entry moves once.
        cdef uint32_t wmax = self.window_max(c)
        cdef uint32_t mmax = c - wmax
        cdef uint32_t s
        while self.window.size > wmax and self.probation.size + self.protected.size < mmax:
            s = self.window.tail
            list_unlink(&self.window, self.prev, self.nxt, s)
            list_push_head(&self.probation, self.prev, self.nxt, s)
            self.seg[s] = SEG_PROBATION

    cdef void promote(self, uint32_t slot, uint32_t c) noexcept:
        cdef uint32_t wmax = self.window_max(c)
        cdef uint32_t pmax = <uint32_t>((<uint64_t>(c - wmax) * 4) / 5)
        cdef uint32_t s
        list_unlink(&self.probation, self.prev, self.nxt, slot)
        list_push_head(&self.protected, self.prev, self.nxt, slot)
        self.seg[slot] = SEG_PROTECTED
        while self.protected.size > pmax:
            s = self.protected.tail
            list_unlink(&self.protected, self.prev, self.nxt, s)
            list_push_head(&self.probation, self.prev, self.nxt, s)
            self.seg[s] = SEG_PROBATION

    cdef void climb(self) noexcept:
        cdef uint32_t total = self.hits + self.misses
        cdef double rate
        cdef double delta
        cdef double band
        cdef int32_t amount
        cdef int64_t nf
        cdef uint32_t c, wmax, s
        if not CLIMB or CLIMB == 4:
            self.hits = 0
            self.misses = 0
            return
        rate = <double>self.hits / total if total else 0.0
        delta = rate - self.prev_rate
        band = BANDK * sqrt(2.0 * rate * (1.0 - rate) / total) if total else 0.0
        self.prev_rate = rate
        self.hits = 0
        self.misses = 0
        if CLIMB == 1 or CLIMB == 3:
            amount = self.step if delta >= 0 else -self.step
        else:
            if self.first:
                self.first = False
                amount = STEP0
            elif delta > band:
                amount = self.step
            elif delta < -band:
                amount = -self.step
            else:
                amount = -abs(self.step)
        if delta >= RESTART or delta <= -RESTART:
            self.step = STEP0 if amount >= 0 else -STEP0
        elif CLIMB == 3 and -band < delta < band:
            self.step = amount // 2
        else:
            self.step = amount - amount // 50
        nf = <int64_t>self.wfrac + amount
        if nf < 0:
            nf = 0
        if nf > WMAXF:
            nf = WMAXF
        self.wfrac = <uint32_t>nf
        c = self.capacity()
        wmax = self.window_max(c)
        while self.window.size > wmax:
            s = self.window.tail
            list_unlink(&self.window, self.prev, self.nxt, s)
            list_push_head(&self.probation, self.prev, self.nxt, s)
            self.seg[s] = SEG_PROBATION
        if self.count >= c:
            while self.window.size < wmax and (self.probation.size or self.protected.size):
                if self.probation.size:
                    s = self.probation.tail
                    list_unlink(&self.probation, self.prev, self.nxt, s)
                else:
                    s = self.protected.tail
                    list_unlink(&self.protected, self.prev, self.nxt, s)
                list_push_head(&self.window, self.prev, self.nxt, s)
                self.seg[s] = SEG_WINDOW

    cdef void gh_put(self, int side, uint32_t h) noexcept:
        cdef uint32_t x, b
        cdef uint64_t* bl
        if self.ghw == 0:
            return
        if self.ghins[side] >= self.ghdelta:
            self.ghcur[side] ^= 1
            self.ghgen[side] += 1
            memset(self.gh + (2 * side + self.ghcur[side]) * self.ghw, 0, self.ghw * sizeof(uint64_t))
            self.ghins[side] = 0
        bl = self.gh + (2 * side + self.ghcur[side]) * self.ghw
        x = mix32(h, 0x51ED27U)
        b = x & (self.ghw * 64 - 1)
        bl[b >> 6] |= 1ULL << (b & 63)
        x = mix32(h, 0x2F1A3BU)
        b = x & (self.ghw * 64 - 1)
        bl[b >> 6] |= 1ULL << (b & 63)
        x = mix32(h, 0x7A3C1DU)
        b = x & (self.ghw * 64 - 1)
        bl[b >> 6] |= 1ULL << (b & 63)
        self.ghins[side] += 1

    cdef bint gh_has(self, int side, uint32_t h) noexcept:
        cdef uint32_t x1, x2, b1, b2
        cdef uint64_t* bl
        cdef int g
        if self.ghw == 0:
            return False
        x1 = mix32(h, 0x51ED27U) & (self.ghw * 64 - 1)
        x2 = mix32(h, 0x2F1A3BU) & (self.ghw * 64 - 1)
        cdef uint32_t x3 = mix32(h, 0x7A3C1DU) & (self.ghw * 64 - 1)
        for g in range(2):
            bl = self.gh + (2 * side + g) * self.ghw
            if (bl[x1 >> 6] >> (x1 & 63)) & 1 and (bl[x2 >> 6] >> (x2 & 63)) & 1 and (bl[x3 >> 6] >> (x3 & 63)) & 1:
                return True
        return False

    cdef void gh_judge(self, uint32_t h) noexcept:
        cdef int64_t d, nf
        cdef uint32_t n
        if self.ghw == 0:
            return
        if self.gh_has(0, h):
            self.gch += 1
            self.tch += 1
        if self.gh_has(1, h):
            self.gvh += 1
            self.tvh += 1
        if CLIMB != 4:
            return
        if WARMGATE and not (self.ghgen[0] >= 1 and self.ghgen[1] >= 1):
            self.gch = 0
            self.gvh = 0
            return
        n = self.gch + self.gvh
        if n < GH_N:
            return
        d = <int64_t>self.gch - <int64_t>self.gvh
        self.gvh_last = self.gvh
        self.gch = 0
        self.gvh = 0
        if GATE and not self.aged:
            return
        if d > 0 and d * d <= GROWK * <int64_t>n:
            return
        if d > 0 and <double>(d + <int64_t>self.gvh_last) < (RATIO - 1.0) * <double>self.gvh_last:
            return
        if d < 0 and d * d <= 4 * <int64_t>n:
            return
        if d > 0:
            self.ngrow += 1
        else:
            self.nshrink += 1
        nf = <int64_t>self.wfrac + (GH_STEP if d > 0 else -GH_STEP * SHRINKMUL)
        if nf < 0:
            nf = 0
        if nf > WMAXF:
            nf = WMAXF
        self.wfrac = <uint32_t>nf
        if not LAZY:
            self.apply_window()

    cdef void apply_window(self) noexcept:
        cdef uint32_t c = self.capacity()
        cdef uint32_t wmax = self.window_max(c)
        cdef uint32_t s
        while self.window.size > wmax:
            s = self.window.tail
            list_unlink(&self.window, self.prev, self.nxt, s)
            list_push_head(&self.probation, self.prev, self.nxt, s)
            self.seg[s] = SEG_PROBATION
        if self.count >= c:
            while self.window.size < wmax and (self.probation.size or self.protected.size):
                if self.probation.size:
                    s = self.probation.tail
                    list_unlink(&self.probation, self.prev, self.nxt, s)
                else:
                    s = self.protected.tail
                    list_unlink(&self.protected, self.prev, self.nxt, s)
                list_push_head(&self.window, self.prev, self.nxt, s)
                self.seg[s] = SEG_WINDOW

    # ---- protocol ---------------------------------------------------------

    cdef void insert(self, uint32_t slot, uint32_t h) noexcept:
        if not (self.has_pending and self.pending == h):
            self.record(h)
        self.has_pending = False
        self.gh_judge(h)
        self.hv[slot] = h
        self.seg[slot] = SEG_WINDOW
        list_push_head(&self.window, self.prev, self.nxt, slot)
        self.count += 1
        self.reshape(self.capacity())

    cdef void access(self, uint32_t slot, uint32_t h) noexcept:
        cdef uint8_t sg = self.seg[slot]
        self.record(h)
        self.hits += 1
        if sg == SEG_WINDOW:
            list_move_head(&self.window, self.prev, self.nxt, slot)
        elif sg == SEG_PROBATION:
            self.promote(slot, self.capacity())
        else:
            list_move_head(&self.protected, self.prev, self.nxt, slot)
        if self.hits + self.misses >= self.sample:
            self.climb()

    cdef void update(self, uint32_t slot, uint32_t h) noexcept:
        self.access(slot, h)

    cdef void miss(self, uint32_t h) noexcept:
        self.record(h)
        self.misses += 1
        if self.hits + self.misses >= self.sample:
            self.climb()
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
        # The cache is over a bound: it must shrink by one. Segments are sized
        # for the count it shrinks to, capped by the limit.
        cdef uint32_t t
        cdef uint32_t wmax
        cdef uint32_t mmax
        cdef uint32_t cand
        cdef uint32_t victim
        cdef SlotList* vlist
        if self.count == 0:
            return NO_SLOT
        t = self.count - 1
        if self.limit and self.limit < t:
            t = self.limit
        wmax = self.window_max(t)
        mmax = t - wmax
        self.reshape(t)
        if self.window.size > wmax:
            # Main is full (count > t and the window overflows only then), so
            # the window's LRU entry must win its place against main's.
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
            if self.admit(self.hv[cand], self.hv[victim]):
                list_unlink(vlist, self.prev, self.nxt, victim)
                list_push_head(&self.probation, self.prev, self.nxt, cand)
                self.seg[cand] = SEG_PROBATION
                self.count -= 1
                self.gh_put(1, self.hv[victim])
                return victim
            self.count -= 1
            self.gh_put(0, self.hv[cand])
            return cand
        # The window is within its share, so main is over its own.
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
            self.gh_put(1, self.hv[victim])
        return victim

    cdef void clear(self) noexcept:
        list_init(&self.window)
        list_init(&self.probation)
        list_init(&self.protected)
        if self.swords:
            memset(self.sketch, 0, self.swords * sizeof(uint64_t))
            memset(self.dk, 0, (self.dkbits >> 6) * sizeof(uint64_t))
        self.additions = 0
        self.has_pending = False
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

    def _gh(self):
        r = (self.tch, self.tvh, self.ngrow, self.nshrink)
        self.tch = self.tvh = 0
        self.ngrow = self.nshrink = 0
        return r

    def _wfrac(self):
        return self.wfrac

    def _sketch_words(self):
        """Number of 64-bit words of the sketch (16 counters each)."""
        return self.swords
