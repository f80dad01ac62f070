cimport cython
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from hypercache._core.policy cimport Policy


cdef class CacheCore:
    # Keys and values: kv[2*s], kv[2*s+1], owned by the list kvlist (see cachecore.pyx).
    cdef object kvlist
    cdef PyObject** kv
    cdef uint32_t* hashes
    cdef uint64_t* sizes
    cdef uint32_t* index
    cdef uint8_t* ctrl
    cdef uint32_t mask
    cdef int shift
    cdef uint32_t cap
    cdef uint32_t used
    cdef uint32_t free_head
    cdef uint32_t count
    cdef uint64_t nbytes
    cdef uint32_t item_limit
    cdef uint64_t byte_limit
    cdef Policy policy
    cdef uint64_t mutations

    cdef int64_t* expiry
    cdef uint32_t* heap_pos
    cdef uint32_t* heap
    cdef uint32_t heap_len
    cdef int64_t default_ttl_ns
    cdef object timer
    cdef object size_fn

    cdef PyObject** pending
    cdef Py_ssize_t npending
    cdef Py_ssize_t pending_cap

    cdef uint64_t hits, misses, sets, deletes, evictions, expirations

    @cython.final
    cdef int64_t _ttl_ns(self, double ttl) except -1
    @cython.final
    cdef int64_t _now(self) except? -1
    @cython.final
    cdef int64_t _expiry_for(self, object ttl, int64_t* now) except? -2
    @cython.final
    cdef uint32_t _bucket(self, uint32_t h) noexcept nogil
    @cython.final
    cdef inline int64_t _find(self, object key, uint32_t h) except -2
    @cython.final
    cdef int64_t _find_eq(self, object key, uint32_t h) except -2
    @cython.final
    @cython.final
    cdef void _set_ctrl(self, uint32_t i, uint8_t v) noexcept
    @cython.final
    cdef void _index_insert(self, uint32_t slot, uint32_t h) noexcept
    @cython.final
    @cython.final
    cdef void _index_remove(self, uint32_t slot) noexcept
    @cython.final
    cdef bint _index_full(self) noexcept
    @cython.final
    cdef int _index_grow(self) except -1
    @cython.final
    cdef int _grow_slots(self) except -1
    @cython.final
    @cython.final
    cdef bint _has_free_slot(self) noexcept
    @cython.final
    cdef uint32_t _take_slot(self) noexcept
    @cython.final
    @cython.final
    cdef void _defer(self, PyObject* o) noexcept
    @cython.final
    cdef int _reserve_pending(self, Py_ssize_t n) except -1
    @cython.final
    @cython.final
    cdef void _release(self) noexcept
    @cython.final
    @cython.final
    cdef void _drop_slot(self, uint32_t s) noexcept
    @cython.final
    @cython.final
    cdef bint _over_after(self, int64_t s, uint64_t size) noexcept
    @cython.final
    cdef int _enable_expiry(self) except -1
    @cython.final
    @cython.final
    cdef void _heap_place(self, uint32_t pos, uint32_t s) noexcept
    @cython.final
    @cython.final
    cdef void _heap_up(self, uint32_t pos) noexcept
    @cython.final
    @cython.final
    cdef void _heap_down(self, uint32_t pos) noexcept
    @cython.final
    @cython.final
    cdef void _heap_remove(self, uint32_t s) noexcept
    @cython.final
    @cython.final
    cdef void _set_expiry(self, uint32_t s, int64_t at) noexcept
    @cython.final
    cdef uint32_t _sweep(self, int64_t now, uint32_t budget) noexcept
    @cython.final
    @cython.final
    cdef bint _expired(self, uint32_t s, int64_t now) noexcept
    @cython.final
    cdef list _live_entries(self, bint with_values)
    @cython.final
    cdef int64_t _live(self, object key, uint32_t h) except -2
    @cython.final
    cdef object _get(self, object key, object default)
    @cython.final
    cdef uint64_t _measure(self, object value) except? 0xFFFFFFFFFFFFFFFF
    @cython.final
    cdef int _store(self, object key, object value, object ttl) except -1
    @cython.final
    @cython.final
    cdef bint _remove(self, object key) except -1
