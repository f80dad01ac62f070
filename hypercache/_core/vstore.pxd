# The versioned store of a cluster node: key -> (value, version, expiry), with
# tombstones, incrementally maintained per-partition digests, a byte budget and
# expiry queues. See vstore.pyx for the invariants and vstore.pyi for the API.

from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from hypercache._core.policy cimport Policy


cdef extern from *:
    """
    #define HC_VS_NONE ((uint32_t)0xFFFFFFFFu)
    """
    # "No slot": null of slot numbers, list links and heap positions.
    const uint32_t VS_NONE "HC_VS_NONE"


# Slot flags.
cdef enum:
    F_TOMB = 1      # the entry is a tombstone (empty value)
    F_HEAP = 2      # queued in the expiry heap (hpos is valid)
    F_FIFO = 4      # queued in the tombstone FIFO (qprev/qnext are valid)


# One entry. Slots live in one C array and are named by index; the Python dict
# ``index`` maps key -> slot number. A free slot has key == NULL and sits on the
# free list through ``bnext``.
ctypedef struct Slot:
    uint64_t khash      # xxh3_64 of the key: partition, sub-bucket, digest term
    uint64_t ts         # version timestamp (HLC)
    int64_t expire_at   # absolute wall ms, 0 = never
    PyObject* key       # owned reference (bytes)
    PyObject* value     # owned reference (bytes; b"" for a tombstone)
    uint32_t origin     # version origin tag
    uint32_t bucket     # global sub-bucket: partition * sub_buckets + b
    uint32_t bprev      # doubly linked list of the sub-bucket's slots
    uint32_t bnext
    uint32_t qprev      # tombstone FIFO links
    uint32_t qnext
    uint32_t hpos       # index in the expiry heap
    uint32_t size       # bytes charged to the budget: key + value + ENTRY_OVERHEAD
    uint8_t flags


ctypedef struct HeapItem:
    int64_t expire_at
    uint32_t slot


# The 64-bit term an entry adds to its sub-bucket digest. Part of the wire
# contract between replicas (two nodes compare sums of these): never change it
# without a protocol version bump. Three rounds of the murmur3 64-bit finaliser,
# each a bijection, fold in the key hash, the timestamp, then origin and the
# tombstone bit; the constant keeps an all-zero input from mapping to 0.
cdef inline uint64_t fmix64(uint64_t x) noexcept nogil:
    x ^= x >> 33
    x *= 0xFF51AFD7ED558CCDULL
    x ^= x >> 33
    x *= 0xC4CEB9FE1A85EC53ULL
    x ^= x >> 33
    return x


cdef inline uint64_t digest_term(uint64_t khash, uint64_t ts, uint32_t origin,
                                bint tomb) noexcept nogil:
    cdef uint64_t h = fmix64(khash ^ 0x9E3779B97F4A7C15ULL)
    h = fmix64(h ^ ts)
    return fmix64(h ^ ((<uint64_t>origin << 1) | (<uint64_t>1 if tomb else <uint64_t>0)))


cdef class VersionedStore:
    cdef Slot* slots
    cdef uint32_t cap           # slots allocated
    cdef uint32_t free_head     # free list through Slot.bnext
    cdef uint32_t high          # slots [0, high) have been used at least once
    cdef dict index             # key -> slot number

    cdef readonly uint32_t partitions
    cdef readonly uint32_t sub_buckets
    cdef uint32_t bits          # log2(partitions)
    cdef uint32_t sub_bits      # log2(sub_buckets)
    cdef uint64_t* sub_digest   # partitions * sub_buckets
    cdef uint64_t* part_digest  # partitions; = sum of its sub-buckets, kept in step
    cdef uint32_t* bucket_head  # partitions * sub_buckets list heads
    cdef uint32_t* part_len     # entries (data + tombstones) per partition

    # Expiry: an indexed min-heap on expire_at for data entries with a TTL and for
    # tombstones that arrive out of order; a FIFO for in-order tombstones.
    cdef HeapItem* heap
    cdef uint32_t heap_len
    cdef uint32_t heap_cap
    cdef uint32_t fifo_head
    cdef uint32_t fifo_tail

    cdef Policy policy          # recency of data entries (tombstones never enter)

    cdef readonly int64_t max_bytes
    cdef readonly int64_t max_items
    cdef readonly int64_t tombstone_ttl_ms
    cdef readonly uint64_t bytes
    cdef readonly uint64_t evictions
    cdef readonly uint64_t expirations
    cdef readonly uint64_t tombstones_purged
    cdef readonly uint32_t tombstones
    cdef uint32_t live           # data entries held

    # Bounded record of recently evicted keys: a ring of (key, version, expiry)
    # with a dict key -> ring position.
    cdef PyObject** ev_keys
    cdef uint64_t* ev_ts
    cdef uint32_t* ev_origin
    cdef int64_t* ev_expire
    cdef uint32_t ev_cap
    cdef uint32_t ev_next
    cdef dict ev_index

    # Slot of ``key`` or VS_NONE; ``find`` also reclaims an expired entry (then
    # VS_NONE). For other extensions: the slot stays valid until the next call
    # that can insert or remove an entry.
    cdef uint32_t lookup(self, object key) except? 0xFFFFFFFE
    cdef uint32_t find(self, object key, int64_t now_ms) except? 0xFFFFFFFE
    cdef uint32_t partition_of_hash(self, uint64_t h) noexcept

    # Internal.
    cdef int _grow_slots(self, uint32_t new_cap) except -1
    cdef uint32_t _alloc_slot(self) except? 0xFFFFFFFE
    cdef uint32_t _bucket_of_hash(self, uint64_t h) noexcept
    cdef void _bucket_link(self, uint32_t s) noexcept
    cdef void _bucket_unlink(self, uint32_t s) noexcept
    cdef void _digest_add(self, uint32_t bucket, uint64_t h) noexcept
    cdef void _digest_sub(self, uint32_t bucket, uint64_t h) noexcept
    cdef void _heap_place(self, uint32_t i, HeapItem it) noexcept
    cdef void _heap_up(self, uint32_t i, HeapItem it) noexcept
    cdef void _heap_down(self, uint32_t i, HeapItem it) noexcept
    cdef void _heap_remove(self, uint32_t i) noexcept
    cdef int _enqueue(self, uint32_t s) except -1
    cdef void _dequeue(self, uint32_t s) noexcept
    cdef int _drop(self, uint32_t s, int how) except -1
    cdef int _record_eviction(self, Slot* e) except -1
    cdef bint _evicted_covers(self, object key, uint64_t ts, uint32_t origin,
                              int64_t now_ms) noexcept
    cdef bint _over_budget(self) noexcept
    cdef int _enforce_budget(self) except -1
    cdef int _insert(self, bytes key, uint64_t h, bytes value, uint64_t ts, uint32_t origin,
                     int64_t exp, bint tomb, uint32_t size) except -1
    cdef int _replace(self, uint32_t s, bytes value, uint64_t ts, uint32_t origin,
                      int64_t exp, bint tomb, uint32_t size) except -1
    cdef uint32_t _check_partition(self, object p) except? 0xFFFFFFFF
    cdef list _collect(self, uint32_t first_bucket, uint32_t nbuckets, bint full)
