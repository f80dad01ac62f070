"""Versioned store of a cluster node: last-writer-wins versions, tombstones, incremental
partition digests, expiry queues and a byte budget with eviction."""

cimport cython
from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.dict cimport PyDict_DelItem, PyDict_GetItem, PyDict_SetItem
from cpython.long cimport PyLong_AsSsize_t
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort

from hypercache._core.hlc cimport newer, ts_ms
from hypercache._core.policy cimport NO_SLOT, LRUPolicy, Policy, grow_array
from hypercache._core.ring cimport partition_of_hash

from xxhash import xxh3_64_intdigest as _xxh3

from hypercache.errors import ConfigError

# ---------------------------------------------------------------------------
# Invariants (every public method leaves them true)
#
# * Version order. An entry is replaced only by a strictly newer (ts, origin)
#   (hlc.newer); an equal version is the same write replayed and is a no-op, so
#   applying any sequence of writes in any order, any number of times, leaves
#   the same state. Tombstones are entries like any other.
#
# * Expired = absent. An entry with 0 < expire_at <= now is treated exactly as
#   if it were not there: get() and apply() reclaim it on touch, sweep() in
#   bulk. So the state a caller sees depends only on the versions received and
#   the time, never on when reclamation happened to run. A write that arrives
#   already expired still supersedes the older entry it beats, then is gone.
#   Expiry is not a delete: no tombstone is left, so an OLDER write carrying a
#   later expiry can still be applied afterwards; deletes that must stick are
#   tombstones.
#
# * Tombstone expiry comes from the version: expire_at = (ts >> 16) + ttl, the
#   same instant on every replica (the delete's HLC time plus the TTL), so
#   replicas purge a tombstone together instead of handing it back and forth.
#
# * Digests. Each held entry adds digest_term(khash, ts, origin, tomb) to its
#   sub-bucket digest (wrapping uint64 sum) and to its partition digest; every
#   insert, replace and removal subtracts the old term and adds the new one, so
#   the digests are always the sum over what is HELD, expired-but-unreclaimed
#   entries included, and reclaiming is a removal. Replicas that sweep at
#   slightly different moments then differ only by entries whose exchange is a
#   no-op (an expired entry received is never stored); calling sweep(now)
#   before comparing keeps that window to entries expiring meanwhile.
#
# * Budget. bytes = sum over held entries of len(key) + len(value) +
#   ENTRY_OVERHEAD. After every apply, bytes <= max_bytes, or no data entry is
#   left: eviction takes data entries in LRU order and never a tombstone (a
#   tombstone that went early could let an older write come back), so
#   tombstones alone may hold the store above its budget until they expire.
#
# * Ownership. Keys and values are exact bytes (Cython's ``bytes`` arguments
#   refuse subclasses, whose __hash__/__eq__/__del__ could run Python code in
#   the middle of an update). Slot.key and Slot.value are owned references; ``index`` holds
#   its own reference to each key. A slot is in exactly one of: the free list,
#   or one sub-bucket list (+ the policy if it is data, + the heap or FIFO if it
#   expires). Nothing here calls back into Python code that could reenter the
#   store: dict operations on bytes keys and the policy are all C, and the one
#   call that might let another thread run (xxh3 on a long key) happens in
#   apply() before any decision is taken (see there).
# ---------------------------------------------------------------------------

DEFAULT_TOMBSTONE_TTL_MS = 3_600_000
DEFAULT_SUB_BUCKETS = 64
DEFAULT_EVICTED_HISTORY = 1024

# Fixed cost charged per entry on top of key and value bytes. Measured (RSS over
# 1M entries with TTLs): ~180 B of structures per entry (the 72 B Slot, the index
# dict entry and its int, the policy links, the heap item), plus the two bytes
# object headers (2 x 33 B) that the store usually owns alone.
ENTRY_OVERHEAD = 240
cdef uint32_t OVERHEAD = 240

MAX_PARTITION_BITS = 20
MAX_SUB_BUCKET_BITS = 16
MAX_BUCKETS = 1 << 22
MAX_EVICTED_HISTORY = 1 << 20

cdef bytes _EMPTY = b""

#: Bytes counted per entry of a stream batch besides its key and value (the
#: msgpack envelope of ``[key, value, ts, origin, expire_at, tombstone]``).
STREAM_ENTRY_OVERHEAD = 32
cdef Py_ssize_t _STREAM_OVERHEAD = 32


# One entry picked for a stream batch: its key hash (the cursor order) and slot.
ctypedef struct _Pick:
    uint64_t khash
    uint32_t slot


cdef int _pick_order(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const _Pick*>a).khash
    cdef uint64_t y = (<const _Pick*>b).khash
    return -1 if x < y else (1 if x > y else 0)

# How an entry leaves the store (what _drop counts).
cdef enum:
    GONE_SILENT = 0     # superseded by a dead write, partition dropped, cleared
    GONE_EXPIRED = 1    # expire_at passed: expirations / tombstones_purged
    GONE_EVICTED = 2    # byte budget or evict(): evictions, recorded


cdef object _check_int(str name, object value, long long lo, long long hi):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an int, got {type(value).__name__}")
    if value < lo or value > hi:
        raise ConfigError(name, f"must be between {lo} and {hi}, got {value}")
    return value


cdef uint32_t _log2_exact(str name, object value, uint32_t max_bits) except? 0xFFFFFFFF:
    _check_int(name, value, 1, 1 << max_bits)
    if value & (value - 1):
        raise ConfigError(name, f"must be a power of two, got {value}")
    return <uint32_t>(value.bit_length() - 1)


def entry_hash(uint64_t key_hash, uint64_t ts, uint32_t origin, bint tombstone):
    """Digest term of one entry; see vstore.pyi."""
    return digest_term(key_hash, ts, origin, tombstone)


@cython.final
cdef class VersionedStore:
    """Versioned key/value store of a cluster node; see vstore.pyi."""

    def __cinit__(self, partitions, *, sub_buckets=DEFAULT_SUB_BUCKETS, max_bytes=0,
                  max_items=0, tombstone_ttl_ms=DEFAULT_TOMBSTONE_TTL_MS,
                  evicted_history=DEFAULT_EVICTED_HISTORY):
        self.slots = NULL
        self.sub_digest = NULL
        self.part_digest = NULL
        self.bucket_head = NULL
        self.part_len = NULL
        self.heap = NULL
        self.ev_keys = NULL
        self.ev_ts = NULL
        self.ev_origin = NULL
        self.ev_expire = NULL
        self.cap = 0
        self.high = 0
        self.ev_cap = 0

        self.bits = _log2_exact("partitions", partitions, MAX_PARTITION_BITS)
        self.sub_bits = _log2_exact("sub_buckets", sub_buckets, MAX_SUB_BUCKET_BITS)
        if partitions * sub_buckets > MAX_BUCKETS:
            raise ConfigError("sub_buckets",
                              f"partitions x sub_buckets must not exceed {MAX_BUCKETS}")
        _check_int("max_bytes", max_bytes, 0, (1 << 62))
        _check_int("max_items", max_items, 0, 0x7FFFFFFF)
        _check_int("tombstone_ttl_ms", tombstone_ttl_ms, 1, (1 << 40))
        _check_int("evicted_history", evicted_history, 0, MAX_EVICTED_HISTORY)
        self.partitions = <uint32_t>partitions
        self.sub_buckets = <uint32_t>sub_buckets
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.tombstone_ttl_ms = tombstone_ttl_ms

        cdef size_t nb = <size_t>self.partitions * self.sub_buckets
        cdef size_t i
        self.sub_digest = <uint64_t*>calloc(nb, sizeof(uint64_t))
        self.part_digest = <uint64_t*>calloc(self.partitions, sizeof(uint64_t))
        self.part_len = <uint32_t*>calloc(self.partitions, sizeof(uint32_t))
        self.bucket_head = <uint32_t*>malloc(nb * sizeof(uint32_t))
        if (self.sub_digest == NULL or self.part_digest == NULL or self.part_len == NULL
                or self.bucket_head == NULL):
            raise MemoryError()
        for i in range(nb):
            self.bucket_head[i] = VS_NONE

        self.index = {}
        self.free_head = VS_NONE
        self.fifo_head = VS_NONE
        self.fifo_tail = VS_NONE
        self.heap_len = 0
        self.heap_cap = 0
        self.policy = LRUPolicy()
        self._grow_slots(64)

        self.ev_index = {}
        self.ev_next = 0
        if evicted_history:
            self.ev_keys = <PyObject**>calloc(evicted_history, sizeof(PyObject*))
            self.ev_ts = <uint64_t*>malloc(evicted_history * sizeof(uint64_t))
            self.ev_origin = <uint32_t*>malloc(evicted_history * sizeof(uint32_t))
            self.ev_expire = <int64_t*>malloc(evicted_history * sizeof(int64_t))
            if (self.ev_keys == NULL or self.ev_ts == NULL or self.ev_origin == NULL
                    or self.ev_expire == NULL):
                raise MemoryError()
            self.ev_cap = evicted_history

    def __dealloc__(self):
        cdef uint32_t i
        if self.slots != NULL:
            for i in range(self.high):
                if self.slots[i].key != NULL:
                    Py_DECREF(<object>self.slots[i].key)
                    Py_DECREF(<object>self.slots[i].value)
        if self.ev_keys != NULL:
            for i in range(self.ev_cap):
                if self.ev_keys[i] != NULL:
                    Py_DECREF(<object>self.ev_keys[i])
        free(self.slots)
        free(self.sub_digest)
        free(self.part_digest)
        free(self.part_len)
        free(self.bucket_head)
        free(self.heap)
        free(self.ev_keys)
        free(self.ev_ts)
        free(self.ev_origin)
        free(self.ev_expire)

    # -- slots --------------------------------------------------------------------

    cdef int _grow_slots(self, uint32_t new_cap) except -1:
        # Slot pointers are invalidated here: no caller holds one across a call
        # that may allocate a slot.
        self.slots = <Slot*>grow_array(self.slots, new_cap, sizeof(Slot))
        self.policy.grow(new_cap)
        self.cap = new_cap
        return 0

    cdef uint32_t _alloc_slot(self) except? 0xFFFFFFFE:
        cdef uint32_t s = self.free_head
        if s != VS_NONE:
            self.free_head = self.slots[s].bnext
            return s
        if self.high == self.cap:
            if self.cap >= 0x7FFFFFFF:
                raise MemoryError("versioned store is full")
            self._grow_slots(self.cap * 2)
        s = self.high
        self.high += 1
        return s

    cdef uint32_t lookup(self, object key) except? 0xFFFFFFFE:
        cdef PyObject* p = PyDict_GetItem(self.index, key)
        if p == NULL:
            return VS_NONE
        return <uint32_t>PyLong_AsSsize_t(<object>p)

    cdef uint32_t find(self, object key, int64_t now_ms) except? 0xFFFFFFFE:
        # lookup() that reclaims an expired entry on the way: expired = absent.
        cdef uint32_t s = self.lookup(key)
        if s != VS_NONE:
            if self.slots[s].expire_at != 0 and self.slots[s].expire_at <= now_ms:
                self._drop(s, GONE_EXPIRED)
                return VS_NONE
        return s

    cdef uint32_t partition_of_hash(self, uint64_t h) noexcept:
        return partition_of_hash(h, self.bits)

    cdef uint32_t _bucket_of_hash(self, uint64_t h) noexcept:
        # Partition bits, then the next sub_bits bits of the same hash.
        cdef uint32_t p = partition_of_hash(h, self.bits)
        cdef uint32_t b = <uint32_t>(((h << self.bits) >> 1) >> (63 - self.sub_bits))
        return (p << self.sub_bits) | b

    # -- sub-bucket lists -----------------------------------------------------------

    cdef void _bucket_link(self, uint32_t s) noexcept:
        cdef Slot* e = &self.slots[s]
        cdef uint32_t head = self.bucket_head[e.bucket]
        e.bprev = VS_NONE
        e.bnext = head
        if head != VS_NONE:
            self.slots[head].bprev = s
        self.bucket_head[e.bucket] = s

    cdef void _bucket_unlink(self, uint32_t s) noexcept:
        cdef Slot* e = &self.slots[s]
        if e.bprev != VS_NONE:
            self.slots[e.bprev].bnext = e.bnext
        else:
            self.bucket_head[e.bucket] = e.bnext
        if e.bnext != VS_NONE:
            self.slots[e.bnext].bprev = e.bprev

    cdef void _digest_add(self, uint32_t bucket, uint64_t h) noexcept:
        self.sub_digest[bucket] += h
        self.part_digest[bucket >> self.sub_bits] += h

    cdef void _digest_sub(self, uint32_t bucket, uint64_t h) noexcept:
        self.sub_digest[bucket] -= h
        self.part_digest[bucket >> self.sub_bits] -= h

    # -- expiry queues --------------------------------------------------------------
    #
    # Data entries carry arbitrary TTLs: they go in an indexed binary min-heap
    # (Slot.hpos tracks each one's place, so a rewrite or eviction removes it in
    # O(log n) and the heap never holds stale items). Tombstones share one TTL, so
    # they mostly arrive in expiry order: they are appended to a FIFO, O(1), as
    # long as they expire no earlier than its tail; a straggler (an old delete
    # arriving late through a hint or a repair) goes to the heap instead. Both
    # queues stay sorted, so sweep() pops only what has expired: O(expired log n)
    # whatever the store's size.

    cdef void _heap_place(self, uint32_t i, HeapItem it) noexcept:
        self.heap[i] = it
        self.slots[it.slot].hpos = i

    cdef void _heap_up(self, uint32_t i, HeapItem it) noexcept:
        cdef uint32_t parent
        while i > 0:
            parent = (i - 1) >> 1
            if self.heap[parent].expire_at <= it.expire_at:
                break
            self._heap_place(i, self.heap[parent])
            i = parent
        self._heap_place(i, it)

    cdef void _heap_down(self, uint32_t i, HeapItem it) noexcept:
        cdef uint32_t c
        cdef uint32_t n = self.heap_len
        while True:
            c = 2 * i + 1
            if c >= n:
                break
            if c + 1 < n and self.heap[c + 1].expire_at < self.heap[c].expire_at:
                c += 1
            if self.heap[c].expire_at >= it.expire_at:
                break
            self._heap_place(i, self.heap[c])
            i = c
        self._heap_place(i, it)

    cdef void _heap_remove(self, uint32_t i) noexcept:
        self.heap_len -= 1
        if i == self.heap_len:
            return
        cdef HeapItem last = self.heap[self.heap_len]
        if i > 0 and self.heap[(i - 1) >> 1].expire_at > last.expire_at:
            self._heap_up(i, last)
        else:
            self._heap_down(i, last)

    cdef int _enqueue(self, uint32_t s) except -1:
        cdef Slot* e = &self.slots[s]
        cdef HeapItem it
        if e.expire_at == 0:
            return 0
        if e.flags & F_TOMB and (self.fifo_tail == VS_NONE
                                 or self.slots[self.fifo_tail].expire_at <= e.expire_at):
            e.qnext = VS_NONE
            e.qprev = self.fifo_tail
            if self.fifo_tail != VS_NONE:
                self.slots[self.fifo_tail].qnext = s
            else:
                self.fifo_head = s
            self.fifo_tail = s
            e.flags |= F_FIFO
            return 0
        if self.heap_len == self.heap_cap:
            self.heap = <HeapItem*>grow_array(self.heap, self.heap_cap * 2 + 64,
                                              sizeof(HeapItem))
            self.heap_cap = self.heap_cap * 2 + 64
        it.expire_at = e.expire_at
        it.slot = s
        self.heap_len += 1
        self._heap_up(self.heap_len - 1, it)
        e.flags |= F_HEAP
        return 0

    cdef void _dequeue(self, uint32_t s) noexcept:
        cdef Slot* e = &self.slots[s]
        if e.flags & F_HEAP:
            self._heap_remove(e.hpos)
        elif e.flags & F_FIFO:
            if e.qprev != VS_NONE:
                self.slots[e.qprev].qnext = e.qnext
            else:
                self.fifo_head = e.qnext
            if e.qnext != VS_NONE:
                self.slots[e.qnext].qprev = e.qprev
            else:
                self.fifo_tail = e.qprev
        e.flags &= ~(F_HEAP | F_FIFO)

    # -- entry life -----------------------------------------------------------------

    cdef int _drop(self, uint32_t s, int how) except -1:
        cdef Slot* e = &self.slots[s]
        cdef bint tomb = e.flags & F_TOMB
        cdef PyObject* key = e.key
        cdef PyObject* value = e.value
        self._digest_sub(e.bucket, digest_term(e.khash, e.ts, e.origin, tomb))
        self.part_len[e.bucket >> self.sub_bits] -= 1
        self._bucket_unlink(s)
        self._dequeue(s)
        if tomb:
            self.tombstones -= 1
            if how == GONE_EXPIRED:
                self.tombstones_purged += 1
        else:
            self.live -= 1
            if how == GONE_EVICTED:
                # The policy already unlinked the victim it returned.
                self.evictions += 1
                self._record_eviction(e)
            else:
                self.policy.remove(s)
                if how == GONE_EXPIRED:
                    self.expirations += 1
        self.bytes -= e.size
        e.key = NULL
        e.value = NULL
        e.flags = 0
        e.bnext = self.free_head
        self.free_head = s
        PyDict_DelItem(self.index, <object>key)
        Py_DECREF(<object>key)
        Py_DECREF(<object>value)
        return 0

    cdef int _record_eviction(self, Slot* e) except -1:
        # Ring of the last ev_cap evicted keys. A key holds at most one position
        # (re-eviction updates it in place), so the key being overwritten at the
        # ring's head is always indexed at exactly that position.
        if self.ev_cap == 0:
            return 0
        cdef object key = <object>e.key
        cdef PyObject* p = PyDict_GetItem(self.ev_index, key)
        cdef uint32_t i
        cdef PyObject* old
        if p != NULL:
            i = <uint32_t>PyLong_AsSsize_t(<object>p)
        else:
            i = self.ev_next
            self.ev_next = i + 1 if i + 1 < self.ev_cap else 0
            old = self.ev_keys[i]
            if old != NULL:
                PyDict_DelItem(self.ev_index, <object>old)
                self.ev_keys[i] = NULL
                Py_DECREF(<object>old)
            PyDict_SetItem(self.ev_index, key, i)
            Py_INCREF(key)
            self.ev_keys[i] = e.key
        self.ev_ts[i] = e.ts
        self.ev_origin[i] = e.origin
        self.ev_expire[i] = e.expire_at
        return 0

    cdef bint _evicted_covers(self, object key, uint64_t ts, uint32_t origin,
                              int64_t now_ms) noexcept:
        # An evicted version still orders writes for this key while it is
        # remembered: a copy that is not newer (the same version pulled back by
        # repair, or an older one) is refused, as if the entry were still held.
        cdef PyObject* p = PyDict_GetItem(self.ev_index, key)
        if p == NULL:
            return False
        cdef uint32_t i = <uint32_t>PyLong_AsSsize_t(<object>p)
        if self.ev_expire[i] != 0 and self.ev_expire[i] <= now_ms:
            return False
        return not newer(ts, origin, self.ev_ts[i], self.ev_origin[i])

    cdef inline bint _over_budget(self) noexcept:
        # Data entries count against max_items; tombstones never do (nor are evicted).
        return ((self.max_bytes and self.bytes > <uint64_t>self.max_bytes)
                or (self.max_items and self.live > <uint64_t>self.max_items))

    cdef int _enforce_budget(self) except -1:
        cdef uint32_t v
        while self._over_budget():
            v = self.policy.evict()
            if v == NO_SLOT:
                break
            self._drop(v, GONE_EVICTED)
        return 0

    cdef int _insert(self, bytes key, uint64_t h, bytes value, uint64_t ts, uint32_t origin,
                     int64_t exp, bint tomb, uint32_t size) except -1:
        cdef uint32_t s = self._alloc_slot()
        cdef Slot* e = &self.slots[s]
        e.khash = h
        e.ts = ts
        e.origin = origin
        e.expire_at = exp
        e.bucket = self._bucket_of_hash(h)
        e.size = size
        e.flags = F_TOMB if tomb else 0
        e.hpos = VS_NONE
        Py_INCREF(key)
        e.key = <PyObject*>key
        Py_INCREF(value)
        e.value = <PyObject*>value
        self._bucket_link(s)
        self._digest_add(e.bucket, digest_term(h, ts, origin, tomb))
        self.part_len[e.bucket >> self.sub_bits] += 1
        self.bytes += size
        if tomb:
            self.tombstones += 1
        else:
            self.live += 1
            self.policy.insert(s, <uint32_t>h)
        self._enqueue(s)
        PyDict_SetItem(self.index, key, s)
        return 0

    cdef int _replace(self, uint32_t s, bytes value, uint64_t ts, uint32_t origin,
                      int64_t exp, bint tomb, uint32_t size) except -1:
        cdef Slot* e = &self.slots[s]
        cdef bint was_tomb = e.flags & F_TOMB
        cdef PyObject* old_value = e.value
        self._dequeue(s)
        self._digest_sub(e.bucket, digest_term(e.khash, e.ts, e.origin, was_tomb))
        e.ts = ts
        e.origin = origin
        e.expire_at = exp
        self.bytes = self.bytes - e.size + size
        e.size = size
        Py_INCREF(value)
        e.value = <PyObject*>value
        if tomb:
            e.flags |= F_TOMB
        else:
            e.flags &= ~F_TOMB
        self._digest_add(e.bucket, digest_term(e.khash, ts, origin, tomb))
        if was_tomb and not tomb:
            self.tombstones -= 1
            self.live += 1
            self.policy.insert(s, <uint32_t>e.khash)
        elif tomb and not was_tomb:
            self.live -= 1
            self.tombstones += 1
            self.policy.remove(s)
        elif not tomb:
            self.policy.update(s, <uint32_t>e.khash)
        self._enqueue(s)
        Py_DECREF(<object>old_value)
        return 0

    # -- public API ---------------------------------------------------------------

    def apply(self, bytes key not None, bytes value not None, uint64_t ts, uint32_t origin,
              int64_t expire_at_ms, bint tombstone, int64_t now_ms):
        cdef int64_t exp = expire_at_ms
        if exp < 0:
            raise ValueError(f"expire_at_ms must be >= 0, got {exp}")
        if tombstone:
            value = _EMPTY
            if exp == 0:
                exp = <int64_t>ts_ms(ts) + self.tombstone_ttl_ms
        cdef uint64_t h = 0
        cdef uint32_t s = self.find(key, now_ms)
        if s == VS_NONE:
            # Hash before deciding anything: xxhash may release the GIL on long
            # inputs, so the key is looked up again once the hash is in hand, and
            # from there to the end nothing lets another thread in.
            h = _xxh3(key)
            s = self.find(key, now_ms)
        if s != VS_NONE:
            if not newer(ts, origin, self.slots[s].ts, self.slots[s].origin):
                return False
        elif self.ev_cap and self._evicted_covers(key, ts, origin, now_ms):
            return False
        if exp != 0 and exp <= now_ms:
            # Dead on arrival: it supersedes what it beats, then is reclaimed.
            if s != VS_NONE:
                self._drop(s, GONE_SILENT)
            if tombstone:
                self.tombstones_purged += 1
            else:
                self.expirations += 1
            return True
        cdef Py_ssize_t size = PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(value) + OVERHEAD
        if size > 0xFFFFFFFF:
            raise ValueError("entry too large for the versioned store (4 GiB)")
        if s == VS_NONE:
            self._insert(key, h, value, ts, origin, exp, tombstone, <uint32_t>size)
        else:
            self._replace(s, value, ts, origin, exp, tombstone, <uint32_t>size)
        if self._over_budget():
            self._enforce_budget()
        return True

    def get(self, bytes key not None, int64_t now_ms):
        cdef uint32_t s = self.find(key, now_ms)
        if s == VS_NONE:
            return None
        cdef Slot* e = &self.slots[s]
        cdef bint tomb = e.flags & F_TOMB
        if not tomb:
            self.policy.access(s, <uint32_t>e.khash)
        return (<object>e.value, e.ts, e.origin, e.expire_at, tomb)

    def peek(self, bytes key not None, int64_t now_ms):
        cdef uint32_t s = self.find(key, now_ms)
        if s == VS_NONE:
            return None
        cdef Slot* e = &self.slots[s]
        return (<object>e.value, e.ts, e.origin, e.expire_at, bool(e.flags & F_TOMB))

    def evict(self, bytes key not None):
        cdef uint32_t s = self.lookup(key)
        if s == VS_NONE or self.slots[s].flags & F_TOMB:
            return False
        self.policy.remove(s)
        self._drop(s, GONE_EVICTED)
        return True

    def recently_evicted(self, bytes key not None):
        cdef PyObject* p = PyDict_GetItem(self.ev_index, key)
        if p == NULL:
            return None
        cdef uint32_t i = <uint32_t>PyLong_AsSsize_t(<object>p)
        return (self.ev_ts[i], self.ev_origin[i])

    def sweep(self, int64_t now_ms, Py_ssize_t budget=0):
        cdef Py_ssize_t done = 0
        cdef uint64_t expired = 0, purged = 0
        cdef uint32_t s
        while budget <= 0 or done < budget:
            # The earlier of the two queue heads, if it has expired.
            s = self.fifo_head
            if self.heap_len and (s == VS_NONE
                                  or self.heap[0].expire_at < self.slots[s].expire_at):
                s = self.heap[0].slot
            if s == VS_NONE or self.slots[s].expire_at > now_ms:
                break
            if self.slots[s].flags & F_TOMB:
                purged += 1
            else:
                expired += 1
            self._drop(s, GONE_EXPIRED)
            done += 1
        return (expired, purged)

    def next_expiry(self):
        cdef int64_t t = 0
        if self.fifo_head != VS_NONE:
            t = self.slots[self.fifo_head].expire_at
        if self.heap_len and (t == 0 or self.heap[0].expire_at < t):
            t = self.heap[0].expire_at
        return t

    # -- partitions and digests -------------------------------------------------------

    cdef uint32_t _check_partition(self, object p) except? 0xFFFFFFFF:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < self.partitions:
            raise IndexError(f"partition {p!r} out of range 0..{self.partitions - 1}")
        return <uint32_t>p

    def partition_of(self, bytes key not None):
        return partition_of_hash(_xxh3(key), self.bits)

    def bucket_of(self, bytes key not None):
        cdef uint32_t g = self._bucket_of_hash(_xxh3(key))
        return (g >> self.sub_bits, g & (self.sub_buckets - 1))

    def digest(self, p):
        return self.part_digest[self._check_partition(p)]

    def sub_digests(self, p):
        cdef size_t base = <size_t>self._check_partition(p) << self.sub_bits
        return [self.sub_digest[base + b] for b in range(self.sub_buckets)]

    def partition_len(self, p):
        return self.part_len[self._check_partition(p)]

    cdef list _collect(self, uint32_t first_bucket, uint32_t nbuckets, bint full):
        cdef list out = []
        cdef uint32_t g, s
        cdef Slot* e
        for g in range(first_bucket, first_bucket + nbuckets):
            s = self.bucket_head[g]
            while s != VS_NONE:
                e = &self.slots[s]
                if full:
                    out.append((<object>e.key, <object>e.value, e.ts, e.origin, e.expire_at,
                                bool(e.flags & F_TOMB)))
                else:
                    out.append((<object>e.key, e.ts, e.origin))
                s = e.bnext
        return out

    def keys(self, p):
        cdef uint32_t q = self._check_partition(p)
        return self._collect(q << self.sub_bits, self.sub_buckets, False)

    def entries(self, p):
        cdef uint32_t q = self._check_partition(p)
        return self._collect(q << self.sub_bits, self.sub_buckets, True)

    # Streaming a partition (rebalancing). The cursor is a key hash: a batch holds
    # the unexpired entries whose hash is >= the cursor, in hash order, and the next
    # cursor is the hash of the first entry left out. Sub-buckets are ranges of
    # the hash taken in order (the partition's bits, then the sub-bucket's), so a
    # batch walks the sub-buckets from the cursor's one and sorts each one's few
    # entries: O(batch + the sub-buckets walked) per call, whatever the partition's size
    # (a full batch still looks for the next entry, so that the last batch of a
    # partition says so: no empty batch to ask for).
    # The cursor names a place in the hash space, not a slot, so it survives
    # writes, removals and evictions between batches (an entry written behind the
    # cursor is not sent; an entry removed is simply not met), and means the same
    # on every replica of the partition: a transfer cut short resumes from any of
    # them. Entries with the same hash are never split across two batches.
    def stream(self, p, cursor, Py_ssize_t max_keys, Py_ssize_t max_bytes, int64_t now_ms):
        cdef uint32_t q = self._check_partition(p)
        # Two shifts, as partition_of_hash: bits == 0 (one partition) is no shift by 64.
        cdef uint64_t lo = (<uint64_t>q << 1) << (63 - self.bits)
        cdef uint64_t span = ((<uint64_t>2) << (63 - self.bits)) - 1  # partition width - 1
        cdef uint64_t c = lo
        if max_keys < 1 or max_bytes < 1:
            raise ValueError("max_keys and max_bytes must be at least 1")
        if cursor is not None:
            if (isinstance(cursor, bool) or not isinstance(cursor, int)
                    or not 0 <= cursor < 2**64):
                raise ValueError(f"cursor must be nil or a uint64, got {cursor!r}")
            c = cursor
            if c - lo > span:  # unsigned: below lo wraps around above span
                raise ValueError(f"cursor {cursor:#x} is outside partition {q}")
        cdef uint32_t first = self._bucket_of_hash(c)
        cdef uint32_t end = (q << self.sub_bits) + self.sub_buckets
        cdef list out = []
        cdef Py_ssize_t n = 0, size, total = 0
        cdef uint64_t last = 0
        cdef uint32_t g, s, m, i, cap = 64
        cdef Slot* e
        cdef _Pick* picks = <_Pick*>malloc(cap * sizeof(_Pick))
        if picks == NULL:
            raise MemoryError()
        try:
            for g in range(first, end):
                m = 0
                s = self.bucket_head[g]
                while s != VS_NONE:
                    e = &self.slots[s]
                    if e.khash >= c and not (e.expire_at != 0 and e.expire_at <= now_ms):
                        if m == cap:
                            picks = <_Pick*>grow_array(picks, cap * 2, sizeof(_Pick))
                            cap *= 2
                        picks[m].khash = e.khash
                        picks[m].slot = s
                        m += 1
                    s = e.bnext
                if m > 1:
                    qsort(picks, m, sizeof(_Pick), _pick_order)
                for i in range(m):
                    e = &self.slots[picks[i].slot]
                    size = (PyBytes_GET_SIZE(<object>e.key) + PyBytes_GET_SIZE(<object>e.value)
                            + _STREAM_OVERHEAD)
                    if (n and (n >= max_keys or total + size > max_bytes)
                            and e.khash != last):
                        return out, e.khash
                    out.append((<object>e.key, <object>e.value, e.ts, e.origin, e.expire_at,
                                bool(e.flags & F_TOMB)))
                    n += 1
                    total += size
                    last = e.khash
            return out, None
        finally:
            free(picks)

    def sub_bucket_keys(self, p, b):
        cdef uint32_t q = self._check_partition(p)
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.sub_buckets:
            raise IndexError(f"sub-bucket {b!r} out of range 0..{self.sub_buckets - 1}")
        return self._collect((q << self.sub_bits) | <uint32_t>b, 1, False)

    def recompute_digest(self, p):
        # From scratch and independent of the incremental state: every held key is
        # re-hashed and re-placed; only the version fields are read from its slot.
        cdef uint32_t q = self._check_partition(p)
        cdef uint64_t total = 0, h
        cdef uint32_t s
        cdef Slot* e
        for key, slot in self.index.items():
            h = _xxh3(key)
            if partition_of_hash(h, self.bits) == q:
                s = slot
                e = &self.slots[s]
                total += digest_term(h, e.ts, e.origin, e.flags & F_TOMB)
        return total

    def drop_partition(self, p):
        cdef uint32_t q = self._check_partition(p)
        cdef uint32_t g, n = 0
        for g in range(q << self.sub_bits, (q + 1) << self.sub_bits):
            while self.bucket_head[g] != VS_NONE:
                self._drop(self.bucket_head[g], GONE_SILENT)
                n += 1
        return n

    def clear(self):
        cdef uint32_t p
        cdef uint32_t i
        for p in range(self.partitions):
            self.drop_partition(p)
        for i in range(self.ev_cap):
            if self.ev_keys[i] != NULL:
                Py_DECREF(<object>self.ev_keys[i])
                self.ev_keys[i] = NULL
        self.ev_index.clear()
        self.ev_next = 0

    # -- counters -----------------------------------------------------------------

    def __len__(self):
        return self.live

    def __contains__(self, key):
        return isinstance(key, bytes) and self.lookup(key) != VS_NONE

    def stats(self):
        return {
            "entries": self.live,
            "tombstones": self.tombstones,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "max_items": self.max_items,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "tombstones_purged": self.tombstones_purged,
            "evicted_history": len(self.ev_index),
        }

    def __repr__(self):
        return (f"VersionedStore(partitions={self.partitions}, entries={self.live}, "
                f"tombstones={self.tombstones}, bytes={self.bytes})")
