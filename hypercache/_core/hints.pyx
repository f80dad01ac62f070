"""Hint buffers of hinted handoff: per-target FIFOs of missed writes and deletes, with a
per-node cap, a global count cap, a global byte cap and a TTL."""

cimport cython
from cpython.bytes cimport PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_DelItem, PyDict_GetItem, PyDict_SetDefault, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM
from cpython.long cimport PyLong_AsSsize_t
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport INT64_MIN, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from hypercache._core.hlc cimport newer, ts_ms
from hypercache._core.policy cimport grow_array

from hypercache.errors import ConfigError

# ---------------------------------------------------------------------------
# Invariants (every public method leaves them true)
#
# * Layout. Hints are records in one C array (``recs``), named by index. A
#   queued record is on exactly one target's FIFO, a doubly linked list through
#   prev/next; a free record is on the free list through next. Each target's
#   ``keys`` dict maps key -> record id for every record on its FIFO, one record
#   per (target, key) (dedup below), and only for those. The dict values are the
#   ints of ``rec_ids``, made once per record slot, so enqueue allocates no int.
#   Per-hint Python objects are the key and value the caller gave (owned
#   references in the record) and the tuple dequeue_batch returns; nothing else.
#
# * Order. Each hint carries a stamp (queued_at, seq): the wall ms it was queued
#   and a counter in enqueue order that breaks ties inside one millisecond. Every
#   FIFO is sorted by stamp from head (oldest) to tail: enqueue appends with
#   queued_at = max(now_ms, the tail's), so a wall clock stepping back cannot
#   unsort it, and requeue_front prepends stamps no later than the head's (see
#   there). Hence a target's oldest hint is its head, and the oldest hint of the
#   whole buffer is the head of the target at the root of ``heap``, a min-heap of
#   the non-empty targets on their head's stamp (positions in Target.hpos).
#
# * Complexity. enqueue is O(1) record work plus O(log T) heap work when a
#   target's head changes (T = targets with hints, i.e. at most the peers that
#   share partitions with this node); a hint dropped by a cap costs the same.
#   dequeue_batch is O(batch + expired skipped + log T). In practice the
#   per-target key dict (one probe per enqueue, one per dequeued hint) costs
#   more than all the rest. expire() is
#   O(expired + targets touched x log T): expired hints are at the heads, and the
#   heap hands out heads oldest first, so it never looks at a live hint but one
#   per target it stops at. ``work`` counts the records linked or unlinked and
#   the heap levels walked, so tests check these bounds by counting.
#
# * Expiry. A hint is expired once now_ms >= queued_at + ttl_ms. Expired hints
#   are never handed out: dequeue_batch skips (and drops) them, expire() drops
#   them in bulk. Until one of those runs they still count in len, bytes and
#   pending(); that is what "lazily" means here. The entry expiry expire_at_ms is
#   payload for the target only: a write whose value has since expired still
#   supersedes older versions on the target, so it is delivered like any other.
#
# * Caps and victims. Room is made BEFORE a hint is linked, so the queued hints
#   never exceed max_total, bytes never exceed max_bytes and no target exceeds
#   max_per_node, at every moment, not just between calls. The writer is never
#   refused for lack of room (only a hint larger than max_bytes alone is): the
#   cap drops an OLDER hint instead. At max_per_node the victim is the target's
#   own oldest hint; at max_total and max_bytes it is the oldest hint of the
#   whole buffer, whatever its target. Why the globally oldest: it is the hint
#   closest to its TTL, its target has been unreachable the longest and needs
#   anti-entropy anyway, and the rule turns the buffer into "the newest hints of
#   every target", a shared time window that shrinks under pressure, so a short
#   outage keeps all its hints while a long one is cut back. (Dropping from the
#   longest queue instead would need a byte-weighted max over targets for the
#   byte cap, and lets a few huge hints of one target push out many small ones
#   of another.) Ties cannot happen: no two queued hints share a stamp (see
#   requeue_front), so "the oldest" is always one well-defined hint. A hint
#   that requeue_front puts back can itself be the oldest, and then it is the
#   one dropped.
#
# * Dedup. A newer version (hlc.newer on (ts, origin)) for a (target, key) that
#   already has a queued hint replaces it: the old hint is superseded and the
#   new one takes over its record (and so its dict entry), moved to the tail
#   with a fresh stamp, so the FIFO stays sorted and the TTL runs from the
#   newest write (kept in place, the newest write would expire with the first). A hint that is not newer than
#   the queued one (an older write arriving late, or the same write hinted
#   twice) is superseded on arrival. Replay then sends one version per key, the
#   newest, which the target applies newer-wins; order between keys is free.
#
# * Conservation. Every hint that enqueue accepts (queued_total: all but
#   oversize ones) or requeue_front takes back (requeued) is at any moment in
#   exactly one place: queued (len), dequeued, expired, superseded,
#   dropped_node_cap, dropped_total_cap, dropped_bytes_cap or dropped_target.
#
# * Re-entrancy. Mutations run in pure C, with only dict operations on exact
#   bytes and str keys and decrefs of exact bytes, none of which can run Python
#   code. Everything that can (iterating the caller's batch, converting its
#   items, allocating the dicts, lists and tuples that may trigger the cyclic
#   GC and its finalizers) happens before the first change or after the last:
#   dequeue_batch pops into a C scratch array and builds the tuples afterwards,
#   requeue_front converts the whole batch before touching the buffer. So a
#   finalizer that calls into the buffer always finds it consistent.
# ---------------------------------------------------------------------------

# Fixed cost charged per hint on top of len(key) + len(value). Measured: RSS grows
# by 145-165 B per hint over 0.1M-1M queued hints (16 B keys, 1 to 50 targets):
# the 72 B record, its id int and list slot (~36 B), the per-target dict entry
# (~45 B at a dict's average load), slab slack. Plus the two bytes object headers
# (2 x 33 B) that the buffer ends up owning alone once the write that made the
# hint has completed.
HINT_OVERHEAD = 224
cdef uint64_t OVERHEAD = 224

# Bounds of the constructor arguments. Record numbers are uint32 with two values
# reserved (HB_NONE and the error sentinel).
MAX_HINTS = (1 << 31) - 1
MAX_BYTES = 1 << 62
MAX_TTL_MS = 1 << 40

cdef uint32_t INITIAL_RECS = 64
cdef uint32_t INITIAL_TARGETS = 4


cdef object _check_int(str name, object value, long long lo, long long hi):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an int, got {type(value).__name__}")
    if value < lo or value > hi:
        raise ConfigError(name, f"must be between {lo} and {hi}, got {value}")
    return value


cdef inline bint stamp_lt(int64_t qa1, int64_t s1, int64_t qa2, int64_t s2) noexcept nogil:
    return qa1 < qa2 or (qa1 == qa2 and s1 < s2)


cdef inline int64_t ttl_cutoff(int64_t now_ms, int64_t ttl_ms) noexcept nogil:
    # A hint is expired iff queued_at <= now_ms - ttl_ms; saturate instead of
    # wrapping for a now_ms near the bottom of int64.
    if now_ms < INT64_MIN + ttl_ms:
        return INT64_MIN
    return now_ms - ttl_ms


cdef list hand_over(Hint* scratch, uint32_t got, bint with_age):
    # The answer tuples of dequeue_batch (and, with ages, of peek). ``scratch``
    # owns the references not handed over yet; whatever happens it is released
    # and freed here.
    cdef uint32_t i = 0
    cdef Hint* h
    cdef list out = []
    try:
        while i < got:
            h = &scratch[i]
            if with_age:
                out.append((<object>h.key, <object>h.value, h.ts, h.origin, h.expire_at,
                            <bint>h.tomb, h.queued_at))
            else:
                out.append((<object>h.key, <object>h.value, h.ts, h.origin, h.expire_at,
                            <bint>h.tomb))
            release_refs(h)
            i += 1
        return out
    finally:
        while i < got:
            release_refs(&scratch[i])
            i += 1
        free(scratch)


cdef inline void release_refs(Hint* h) noexcept:
    if h.key != NULL:
        Py_DECREF(<object>h.key)
        h.key = NULL
    if h.value != NULL:
        Py_DECREF(<object>h.value)
        h.value = NULL


@cython.final
cdef class HintBuffer:
    """Per-target FIFOs of hints with caps and a TTL; see hints.pyi."""

    def __cinit__(self, *, max_per_node, max_total, max_bytes, ttl_ms):
        self.recs = NULL
        self.tgts = NULL
        self.heap = NULL
        self.rec_cap = 0
        self.tgt_cap = 0

        _check_int("max_total", max_total, 1, MAX_HINTS)
        _check_int("max_per_node", max_per_node, 1, MAX_HINTS)
        if max_per_node > max_total:
            raise ConfigError("max_per_node",
                              f"must not exceed max_total ({max_total}), got {max_per_node}")
        _check_int("max_bytes", max_bytes, 1, MAX_BYTES)
        _check_int("ttl_ms", ttl_ms, 1, MAX_TTL_MS)
        self.max_per_node = max_per_node
        self.max_total = max_total
        self.max_bytes = max_bytes
        self.ttl_ms = ttl_ms

        self.rec_high = 0
        self.rec_free = HB_NONE
        self.rec_ids = []
        self.tgt_free = HB_NONE
        self.tgt_names = []
        self.tgt_keys = []
        self.tgt_index = {}
        self.heap_len = 0
        self.seq_next = 0
        self.seq_low = -1
        self._grow_recs()

    def __dealloc__(self):
        cdef uint32_t i
        if self.recs != NULL:
            for i in range(self.rec_high):
                release_refs(&self.recs[i])
        if self.tgts != NULL:
            for i in range(self.tgt_cap):
                free(self.tgts[i].window)
        free(self.recs)
        free(self.tgts)
        free(self.heap)

    # -- records --------------------------------------------------------------------

    cdef int _grow_recs(self) except -1:
        # Doubling, up to max_total + 1 records: at most max_total are queued,
        # and enqueue takes its record (and indexes it) before making room, so
        # one more may be in hand. Records past rec_high are never read before
        # _alloc_rec hands them out (and untouched memory costs no RSS).
        cdef uint32_t new_cap
        cdef uint32_t limit = <uint32_t>self.max_total + 1
        if self.rec_cap >= limit:
            return 0
        new_cap = self.rec_cap * 2 if self.rec_cap else INITIAL_RECS
        if new_cap > limit:
            new_cap = limit
        self.recs = <Hint*>grow_array(self.recs, new_cap, sizeof(Hint))
        self.rec_cap = new_cap
        return 0

    cdef int _reserve_recs(self, uint32_t n) except -1:
        # Make sure n records can be allocated without growing the slab or
        # rec_ids (or that the slab is full, where room-making frees what
        # requeue_front needs), so that _alloc_rec cannot fail once changes
        # began. With at most max_total queued, one is always available.
        cdef uint32_t free_seen = 0
        cdef uint32_t r = self.rec_free
        cdef Py_ssize_t want
        cdef Py_ssize_t have = len(self.rec_ids)
        while r != HB_NONE and free_seen < n:
            free_seen += 1
            r = self.recs[r].next
        while (<uint64_t>free_seen + (self.rec_cap - self.rec_high) < n
               and self.rec_cap <= self.max_total):
            self._grow_recs()
        # The ids of the records that may be handed out for the first time.
        want = <Py_ssize_t>self.rec_high + n - free_seen
        if want > self.rec_cap:
            want = self.rec_cap
        if want > have:
            self.rec_ids.extend(range(have, want))
        return 0

    cdef uint32_t _alloc_rec(self) except? 0xFFFFFFFE:
        cdef uint32_t r = self.rec_free
        if r != HB_NONE:
            self.rec_free = self.recs[r].next
            return r
        if self.rec_high == self.rec_cap or self.rec_high >= len(self.rec_ids):
            raise MemoryError("hint records not reserved")  # a broken invariant
        r = self.rec_high
        self.rec_high += 1
        # A record is handed out empty (free ones are, by _free).
        self.recs[r].key = NULL
        self.recs[r].value = NULL
        return r

    # -- targets --------------------------------------------------------------------

    cdef uint32_t _find_target(self, str target) except? 0xFFFFFFFE:
        cdef PyObject* p = PyDict_GetItem(self.tgt_index, target)
        if p == NULL:
            return HB_NONE
        return <uint32_t>PyLong_AsSsize_t(<object>p)

    cdef uint32_t _target_slot(self, str target) except? 0xFFFFFFFE:
        cdef uint32_t t = self._find_target(target)
        cdef uint32_t i
        cdef uint32_t new_cap
        cdef Target* tg
        if t != HB_NONE:
            return t
        keys = {}
        if self.tgt_free == HB_NONE:
            new_cap = self.tgt_cap * 2 if self.tgt_cap else INITIAL_TARGETS
            if new_cap > 0x7FFFFFFF:
                raise MemoryError("too many hint targets")
            self.tgts = <Target*>grow_array(self.tgts, new_cap, sizeof(Target))
            self.heap = <uint32_t*>grow_array(self.heap, new_cap, sizeof(uint32_t))
            self.tgt_names.extend([None] * (new_cap - self.tgt_cap))
            self.tgt_keys.extend([None] * (new_cap - self.tgt_cap))
            memset(&self.tgts[self.tgt_cap], 0, (new_cap - self.tgt_cap) * sizeof(Target))
            i = new_cap
            while i > self.tgt_cap:
                i -= 1
                self.tgts[i].head = self.tgt_free
                self.tgt_free = i
            self.tgt_cap = new_cap
        t = self.tgt_free
        self.tgt_index[target] = t
        self.tgt_free = self.tgts[t].head
        tg = &self.tgts[t]
        tg.head = HB_NONE
        tg.tail = HB_NONE
        tg.count = 0
        tg.hpos = HB_NONE
        tg.bytes = 0
        tg.window_n = 0
        tg.used = True
        self.tgt_names[t] = target
        self.tgt_keys[t] = keys
        return t

    cdef int _release_target(self, uint32_t t) except -1:
        # Only for an empty target. Its window goes too: a later requeue_front
        # for it falls back to version-time stamps.
        cdef Target* tg = &self.tgts[t]
        PyDict_DelItem(self.tgt_index, <object>PyList_GET_ITEM(self.tgt_names, t))
        self.tgt_names[t] = None
        self.tgt_keys[t] = None
        free(tg.window)
        tg.window = NULL
        tg.window_n = 0
        tg.window_cap = 0
        tg.used = False
        tg.head = self.tgt_free
        self.tgt_free = t
        return 0

    cdef int _release_if_idle(self, uint32_t t) except -1:
        # An empty target stays while it has a window, so that requeue_front can
        # still give the last batch its stamps back.
        if self.tgts[t].count == 0 and self.tgts[t].window_n == 0:
            self._release_target(t)
        return 0

    cdef int _reserve_window(self, Target* tg, uint32_t n) except -1:
        if n > tg.window_cap:
            tg.window = <Stamp*>grow_array(tg.window, n, sizeof(Stamp))
            tg.window_cap = n
        return 0

    # -- the heap of targets --------------------------------------------------------

    cdef bint _before(self, uint32_t a, uint32_t b) noexcept:
        cdef Hint* x = &self.recs[self.tgts[a].head]
        cdef Hint* y = &self.recs[self.tgts[b].head]
        return stamp_lt(x.queued_at, x.seq, y.queued_at, y.seq)

    cdef void _heap_place(self, uint32_t i, uint32_t t) noexcept:
        self.heap[i] = t
        self.tgts[t].hpos = i

    cdef void _heap_up(self, uint32_t i, uint32_t t) noexcept:
        cdef uint32_t parent
        while i > 0:
            parent = (i - 1) >> 1
            if not self._before(t, self.heap[parent]):
                break
            self._heap_place(i, self.heap[parent])
            i = parent
            self.work += 1
        self._heap_place(i, t)

    cdef void _heap_down(self, uint32_t i, uint32_t t) noexcept:
        cdef uint32_t c
        cdef uint32_t n = self.heap_len
        while True:
            c = 2 * i + 1
            if c >= n:
                break
            if c + 1 < n and self._before(self.heap[c + 1], self.heap[c]):
                c += 1
            if not self._before(self.heap[c], t):
                break
            self._heap_place(i, self.heap[c])
            i = c
            self.work += 1
        self._heap_place(i, t)

    cdef void _heap_fix(self, uint32_t t) noexcept:
        # Restore the heap after t's head changed, t filled up or t emptied.
        cdef Target* tg = &self.tgts[t]
        cdef uint32_t i = tg.hpos
        cdef uint32_t last
        if tg.count == 0:
            if i == HB_NONE:
                return
            tg.hpos = HB_NONE
            self.heap_len -= 1
            if i == self.heap_len:
                return
            last = self.heap[self.heap_len]
            if i > 0 and self._before(last, self.heap[(i - 1) >> 1]):
                self._heap_up(i, last)
            else:
                self._heap_down(i, last)
            return
        if i == HB_NONE:
            self.heap_len += 1
            self._heap_up(self.heap_len - 1, t)
        elif i > 0 and self._before(t, self.heap[(i - 1) >> 1]):
            self._heap_up(i, t)
        else:
            self._heap_down(i, t)

    cdef uint32_t _oldest(self) noexcept:
        if self.heap_len == 0:
            return HB_NONE
        return self.tgts[self.heap[0]].head

    # -- linking --------------------------------------------------------------------

    cdef uint64_t _size(self, Hint* h) noexcept:
        return (<uint64_t>PyBytes_GET_SIZE(<object>h.key)
                + <uint64_t>PyBytes_GET_SIZE(<object>h.value) + OVERHEAD)

    cdef int _index(self, uint32_t t, uint32_t r) except -1:
        # key -> record id in t's dict. The one fallible step of queueing a
        # hint, so it runs before the record is linked anywhere.
        PyDict_SetItem(<dict>PyList_GET_ITEM(self.tgt_keys, t), <object>self.recs[r].key,
                       <object>PyList_GET_ITEM(self.rec_ids, r))
        return 0

    cdef void _account_in(self, uint32_t t, uint32_t r) noexcept:
        cdef uint64_t size = self._size(&self.recs[r])
        self.tgts[t].count += 1
        self.tgts[t].bytes += size
        self.count += 1
        self.bytes += size
        self.work += 1

    cdef int _link_tail(self, uint32_t t, uint32_t r) except -1:
        cdef Target* tg = &self.tgts[t]
        cdef Hint* h = &self.recs[r]
        h.target = t
        h.next = HB_NONE
        h.prev = tg.tail
        if tg.tail != HB_NONE:
            self.recs[tg.tail].next = r
        else:
            tg.head = r
        tg.tail = r
        self._account_in(t, r)
        if tg.head == r:
            self._heap_fix(t)
        return 0

    cdef int _link_head(self, uint32_t t, uint32_t r) except -1:
        cdef Target* tg = &self.tgts[t]
        cdef Hint* h = &self.recs[r]
        h.target = t
        h.prev = HB_NONE
        h.next = tg.head
        if tg.head != HB_NONE:
            self.recs[tg.head].prev = r
        else:
            tg.tail = r
        tg.head = r
        self._account_in(t, r)
        self._heap_fix(t)
        return 0

    cdef int _unlink(self, uint32_t r, bint fix, bint unindex=True) except -1:
        # Take r off its FIFO and (with ``unindex``) out of its target's dict;
        # its references stay in the record. ``fix`` restores the heap when r
        # was the head; batch pops pass False and fix it once at the end.
        cdef Hint* h = &self.recs[r]
        cdef uint32_t t = h.target
        cdef Target* tg = &self.tgts[t]
        cdef uint64_t size = self._size(h)
        cdef bint was_head = h.prev == HB_NONE
        if h.prev != HB_NONE:
            self.recs[h.prev].next = h.next
        else:
            tg.head = h.next
        if h.next != HB_NONE:
            self.recs[h.next].prev = h.prev
        else:
            tg.tail = h.prev
        tg.count -= 1
        tg.bytes -= size
        self.count -= 1
        self.bytes -= size
        self.work += 1
        if unindex:
            PyDict_DelItem(<dict>PyList_GET_ITEM(self.tgt_keys, t), <object>h.key)
        if fix and was_head:
            self._heap_fix(t)
        return 0

    cdef void _free(self, uint32_t r) noexcept:
        release_refs(&self.recs[r])
        self.recs[r].next = self.rec_free
        self.rec_free = r

    cdef int _drop(self, uint32_t r) except -1:
        self._unlink(r, True)
        self._free(r)
        return 0

    cdef int _drop_oldest(self, uint32_t keep) except -1:
        # Drop the oldest hint of the buffer; release its target if that left it
        # idle, unless it is ``keep`` (the target about to receive a hint).
        cdef uint32_t r = self._oldest()
        cdef uint32_t t = self.recs[r].target
        self._drop(r)
        if t != keep:
            self._release_if_idle(t)
        return 0

    # -- API ------------------------------------------------------------------------

    def enqueue(self, str target not None, bytes key not None, bytes value not None,
                uint64_t ts, uint32_t origin, int64_t expire_at_ms, bint tombstone,
                int64_t now_ms):
        """Queue one hint; see hints.pyi."""
        cdef uint64_t size = (<uint64_t>PyBytes_GET_SIZE(key)
                              + <uint64_t>PyBytes_GET_SIZE(value) + OVERHEAD)
        cdef uint32_t t
        cdef uint32_t r
        cdef Target* tg
        cdef Hint* h
        cdef PyObject* p
        cdef int64_t qa
        if size > <uint64_t>self.max_bytes:
            self.dropped_oversize += 1
            return False
        # Everything that can allocate or fail comes first (see Re-entrancy).
        t = self._target_slot(target)
        self._reserve_recs(1)
        r = self._alloc_rec()
        # One probe of the key dict both finds a queued hint for the key and
        # indexes the new record if there is none (half the dict work of a
        # lookup then an insert; the dict is the main cost of an enqueue).
        try:
            p = PyDict_SetDefault(<dict>PyList_GET_ITEM(self.tgt_keys, t), key,
                                  <object>PyList_GET_ITEM(self.rec_ids, r))
        except BaseException:
            self._free(r)
            self._release_if_idle(t)
            raise
        self.queued_total += 1
        if p != PyList_GET_ITEM(self.rec_ids, r):
            # The key has a hint queued: r goes back, and if the new version
            # wins it takes over the old record (and so its dict entry), which
            # leaves its place in the FIFO for the tail.
            self._free(r)
            r = <uint32_t>PyLong_AsSsize_t(<object>p)
            h = &self.recs[r]
            self.superseded += 1
            if not newer(ts, origin, h.ts, h.origin):
                return False
            self._unlink(r, True, False)
            release_refs(h)

        # r is in hand: indexed, on no FIFO, so never a victim below.
        tg = &self.tgts[t]
        qa = now_ms
        if tg.tail != HB_NONE and self.recs[tg.tail].queued_at > qa:
            qa = self.recs[tg.tail].queued_at

        # Room first (see Caps and victims). Dropping the target's own head at
        # max_per_node also lowers the total and the bytes.
        if tg.count >= self.max_per_node:
            self._drop(tg.head)
            self.dropped_node_cap += 1
        if self.count >= self.max_total:
            self._drop_oldest(t)
            self.dropped_total_cap += 1
        while self.bytes + size > <uint64_t>self.max_bytes:
            self._drop_oldest(t)
            self.dropped_bytes_cap += 1

        h = &self.recs[r]
        Py_INCREF(key)
        Py_INCREF(value)
        h.key = <PyObject*>key
        h.value = <PyObject*>value
        h.ts = ts
        h.origin = origin
        h.expire_at = expire_at_ms
        h.tomb = tombstone
        h.queued_at = qa
        h.seq = self.seq_next
        self.seq_next += 1
        self._link_tail(t, r)
        return True

    def dequeue_batch(self, str target not None, Py_ssize_t max_count, int64_t now_ms):
        """Pop up to ``max_count`` live hints of ``target``, oldest first; see hints.pyi."""
        cdef uint32_t t
        cdef Target* tg
        cdef Hint* h
        cdef Hint* scratch = NULL
        cdef uint32_t n
        cdef uint32_t got = 0
        cdef uint32_t r
        cdef uint64_t skipped = 0
        cdef int64_t cutoff = ttl_cutoff(now_ms, self.ttl_ms)
        if max_count < 0:
            raise ConfigError("max_count", f"must be >= 0, got {max_count}")
        t = self._find_target(target)
        if t == HB_NONE:
            return []
        tg = &self.tgts[t]
        n = tg.count if <uint64_t>max_count > tg.count else <uint32_t>max_count
        if n:
            self._reserve_window(tg, n)
            scratch = <Hint*>malloc(n * sizeof(Hint))
            if scratch == NULL:
                raise MemoryError()

        # Phase 1, pure C: pop into scratch (the references move with the copy),
        # keeping each handed-out hint's stamp in the window.
        tg.window_n = 0
        while got < n and tg.head != HB_NONE:
            r = tg.head
            self._unlink(r, False)
            h = &self.recs[r]
            if h.queued_at <= cutoff:
                self._free(r)
                skipped += 1
                continue
            scratch[got] = h[0]
            tg.window[got].queued_at = h.queued_at
            tg.window[got].seq = h.seq
            got += 1
            h.key = NULL
            h.value = NULL
            self._free(r)
        tg.window_n = got
        self._heap_fix(t)
        self.expired += skipped
        self.dequeued += got
        if got == 0:
            self._release_if_idle(t)

        # Phase 2: build the tuples.
        return hand_over(scratch, got, False)

    def peek(self, str target not None, Py_ssize_t max_count, int64_t now_ms):
        """The hints ``dequeue_batch`` would return next, without taking them; see
        hints.pyi."""
        cdef uint32_t t
        cdef Target* tg
        cdef Hint* scratch = NULL
        cdef uint32_t n
        cdef uint32_t got = 0
        cdef uint32_t r
        cdef uint64_t skipped = 0
        cdef int64_t cutoff = ttl_cutoff(now_ms, self.ttl_ms)
        if max_count < 0:
            raise ConfigError("max_count", f"must be >= 0, got {max_count}")
        t = self._find_target(target)
        if t == HB_NONE:
            return []
        tg = &self.tgts[t]
        # Phase 1, pure C: drop the expired heads (the FIFO is sorted, so they
        # are all there), then copy the next hints with new references.
        while tg.head != HB_NONE and self.recs[tg.head].queued_at <= cutoff:
            r = tg.head
            self._unlink(r, False)
            self._free(r)
            skipped += 1
        if skipped:
            self.expired += skipped
            self._heap_fix(t)
        n = tg.count if <uint64_t>max_count > tg.count else <uint32_t>max_count
        if n:
            scratch = <Hint*>malloc(n * sizeof(Hint))
            if scratch == NULL:
                raise MemoryError()
        r = tg.head
        while got < n:
            scratch[got] = self.recs[r]
            Py_INCREF(<object>scratch[got].key)
            Py_INCREF(<object>scratch[got].value)
            got += 1
            r = self.recs[r].next
        if tg.count == 0:
            self._release_if_idle(t)

        return hand_over(scratch, got, True)

    def requeue_front(self, str target not None, batch):
        """Put an undelivered batch back at the head of ``target``; see hints.pyi."""
        cdef Hint* items = NULL
        cdef Hint* h
        cdef uint32_t n
        cdef uint32_t i
        cdef uint32_t t
        cdef uint32_t r
        cdef uint32_t o
        cdef uint32_t kept = 0
        cdef Target* tg
        cdef PyObject* p
        cdef int64_t qa
        cdef int64_t seq
        cdef uint64_t size
        cdef bint drop_item

        # Phase 1: convert the whole batch (may run the caller's code).
        seq_batch = list(batch)
        if len(seq_batch) > 0x7FFFFFFF:
            raise ConfigError("batch", "too many hints")
        n = <uint32_t>len(seq_batch)
        if n == 0:
            # Nothing to put back still ends the batch: the window is spent.
            t = self._find_target(target)
            if t != HB_NONE:
                self.tgts[t].window_n = 0
                self._release_if_idle(t)
            return 0
        items = <Hint*>malloc(n * sizeof(Hint))
        if items == NULL:
            raise MemoryError()
        memset(items, 0, n * sizeof(Hint))
        i = 0
        try:
            for item in seq_batch:
                k, v, ts, origin, exp, tomb = item
                if not PyBytes_CheckExact(k) or not PyBytes_CheckExact(v):
                    raise TypeError("a hint's key and value must be bytes")
                h = &items[i]
                h.ts = ts
                h.origin = origin
                h.expire_at = exp
                h.tomb = bool(tomb)
                Py_INCREF(k)
                Py_INCREF(v)
                h.key = <PyObject*>k
                h.value = <PyObject*>v
                i += 1
            t = self._target_slot(target)
            self._reserve_recs(n)
        except BaseException:
            for i in range(n):
                release_refs(&items[i])
            free(items)
            raise

        # Phase 2: newest first, each one in front of the head. A hint takes the
        # stamp at its position in the target's window (the stamps of the last
        # dequeue_batch): exact when the batch is that batch or a prefix of it,
        # and never younger than the truth for any in-order subset of it, since
        # the window is sorted and the i-th of a subset was at position >= i.
        # A hint beyond the window is dated by its version's wall time, which no
        # hint is queued before. Either stamp is then clamped to precede the
        # head, which keeps the FIFO sorted and only ever makes a hint older:
        # the TTL is what the tombstone rule counts on, so a failed replay must
        # never buy a hint extra life. Fallback and clamped stamps take their
        # seq from seq_low, a second counter running down from -1: below every
        # enqueue seq and below every earlier such stamp, so the hint sorts
        # before the head even at an equal queued_at, and no two queued hints
        # ever share a stamp (window stamps are those of hints that left).
        tg = &self.tgts[t]
        i = n
        try:
            while i > 0:
                i -= 1
                h = &items[i]
                size = self._size(h)
                if size > <uint64_t>self.max_bytes:
                    self.dropped_oversize += 1
                    release_refs(h)
                    continue
                self.requeued += 1
                p = PyDict_GetItem(<dict>PyList_GET_ITEM(self.tgt_keys, t), <object>h.key)
                if p != NULL:
                    r = <uint32_t>PyLong_AsSsize_t(<object>p)
                    self.superseded += 1
                    if not newer(h.ts, h.origin, self.recs[r].ts, self.recs[r].origin):
                        release_refs(h)
                        continue
                    self._drop(r)

                if i < tg.window_n:
                    qa = tg.window[i].queued_at
                    seq = tg.window[i].seq
                else:
                    qa = <int64_t>ts_ms(h.ts)
                    seq = self.seq_low
                    self.seq_low -= 1
                if tg.head != HB_NONE:
                    r = tg.head
                    if not stamp_lt(qa, seq, self.recs[r].queued_at, self.recs[r].seq):
                        qa = self.recs[r].queued_at
                        seq = self.seq_low
                        self.seq_low -= 1

                # Caps: the hint is its target's oldest, so at max_per_node it is
                # the victim; at the global caps, it is when it is older than the
                # buffer's oldest.
                drop_item = False
                if tg.count >= self.max_per_node:
                    self.dropped_node_cap += 1
                    drop_item = True
                elif self.count >= self.max_total:
                    self.dropped_total_cap += 1
                    o = self._oldest()
                    if stamp_lt(qa, seq, self.recs[o].queued_at, self.recs[o].seq):
                        drop_item = True
                    else:
                        self._drop_oldest(t)
                if not drop_item:
                    while self.bytes + size > <uint64_t>self.max_bytes:
                        self.dropped_bytes_cap += 1
                        o = self._oldest()
                        if stamp_lt(qa, seq, self.recs[o].queued_at, self.recs[o].seq):
                            drop_item = True
                            break
                        self._drop_oldest(t)
                if drop_item:
                    release_refs(h)
                    continue

                r = self._alloc_rec()
                self.recs[r] = h[0]
                self.recs[r].queued_at = qa
                self.recs[r].seq = seq
                h.key = NULL
                h.value = NULL
                try:
                    self._index(t, r)
                except BaseException:
                    self._free(r)
                    raise
                self._link_head(t, r)
                kept += 1
        finally:
            # Items not consumed (an error midway) still own their references.
            for i in range(n):
                release_refs(&items[i])
            free(items)
            tg.window_n = 0
            self._release_if_idle(t)
        return kept

    def pending(self, str target not None):
        """Hints queued for ``target`` (expired ones not yet dropped included)."""
        cdef uint32_t t = self._find_target(target)
        return 0 if t == HB_NONE else self.tgts[t].count

    def targets(self):
        """Targets with at least one hint queued."""
        cdef uint32_t t
        out = []
        for t in range(self.tgt_cap):
            if self.tgts[t].used and self.tgts[t].count:
                out.append(<object>PyList_GET_ITEM(self.tgt_names, t))
        return out

    cdef uint32_t _drop_all(self, uint32_t t) except? 0xFFFFFFFE:
        # Free every hint of t and t itself. The dict goes with the target, so
        # the records are freed without deleting their keys one by one.
        cdef Target* tg = &self.tgts[t]
        cdef uint32_t n = tg.count
        cdef uint32_t r = tg.head
        cdef uint32_t nxt
        while r != HB_NONE:
            nxt = self.recs[r].next
            self._free(r)
            self.work += 1
            r = nxt
        self.count -= n
        self.bytes -= tg.bytes
        tg.count = 0
        tg.bytes = 0
        tg.head = HB_NONE
        tg.tail = HB_NONE
        self._heap_fix(t)
        self.dropped_target += n
        self._release_target(t)
        return n

    def drop_target(self, str target not None):
        """Drop every hint of ``target`` (a node that left); returns how many."""
        cdef uint32_t t = self._find_target(target)
        if t == HB_NONE:
            return 0
        return self._drop_all(t)

    def expire(self, int64_t now_ms, Py_ssize_t budget):
        """Drop up to ``budget`` expired hints, oldest first; returns how many."""
        cdef int64_t cutoff = ttl_cutoff(now_ms, self.ttl_ms)
        cdef Py_ssize_t n = 0
        cdef uint32_t t
        cdef uint32_t r
        cdef Target* tg
        if budget < 0:
            raise ConfigError("budget", f"must be >= 0, got {budget}")
        while n < budget and self.heap_len:
            t = self.heap[0]
            tg = &self.tgts[t]
            if self.recs[tg.head].queued_at > cutoff:
                break
            while n < budget and tg.head != HB_NONE and self.recs[tg.head].queued_at <= cutoff:
                r = tg.head
                self._unlink(r, False)
                self._free(r)
                n += 1
            self._heap_fix(t)
            self._release_if_idle(t)
        self.expired += n
        return n

    cdef uint32_t _active(self) noexcept:
        # Targets with hints: the heap holds exactly those.
        return self.heap_len

    def clear(self):
        """Drop every hint (counted in ``dropped_target``) and forget every target."""
        cdef uint32_t t
        for t in range(self.tgt_cap):
            if self.tgts[t].used:
                self._drop_all(t)

    def __len__(self):
        return self.count

    def stats(self):
        """Counters and sizes as a dict; see hints.pyi."""
        return {
            "queued": self.count,
            "bytes": self.bytes,
            "targets": self._active(),
            "queued_total": self.queued_total,
            "requeued": self.requeued,
            "dequeued": self.dequeued,
            "expired": self.expired,
            "superseded": self.superseded,
            "dropped_node_cap": self.dropped_node_cap,
            "dropped_total_cap": self.dropped_total_cap,
            "dropped_bytes_cap": self.dropped_bytes_cap,
            "dropped_oversize": self.dropped_oversize,
            "dropped_target": self.dropped_target,
            "max_per_node": self.max_per_node,
            "max_total": self.max_total,
            "max_bytes": self.max_bytes,
            "ttl_ms": self.ttl_ms,
        }
