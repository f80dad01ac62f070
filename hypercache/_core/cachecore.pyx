# cython: binding=False, embedsignature.format=clinic
# Methods as plain C method descriptors, not Cython function objects: a bound
# ``cache.get`` is then a builtin method, which CPython calls through its
# specialised fast path. With binding=True it was a ``method`` over a
# cyfunction, a generic call that cost more than the whole lookup on a hit
# (get-hit 1,000 keys: 1.27 -> 1.08x dict.get, interleaved). The clinic
# signature format keeps inspect.signature() working on them.
"""The table behind :class:`hypercache.HyperCache`.

Layout
------
An entry lives in a *slot*, a small integer. Per-slot state is spread over
parallel C arrays (struct-of-arrays, so a lookup touches only what it needs):

    kv[2*s], kv[2*s+1]   key and value (PyObject*), stored in a Python list
    hashes[s]            32 bits of the key's hash; for a free slot, the next free slot
    sizes[s]             the entry's size in bytes, as ``sizeof`` measured it
    expiry[s]            absolute expiry in monotonic ns, 0 = none (allocated on first TTL)
    heap_pos[s]          the slot's place in the expiry heap

plus the policy's own arrays (links, frequencies, ...). The index is an
open-addressing table of uint32 (slot + 1, 0 = empty) with linear probing,
Fibonacci hashing of the 32-bit hash, and backward-shift deletion, so there are
no tombstones and a probe ends at the first empty bucket. In front of it, one
control byte per bucket (0 = empty, else 0x80 | 7 hash bits) lets a probe test
8 buckets with one load (see _find). The load factor stays under 3/8 below
2^16 buckets and under 1/2 above (see _index_full). At
one million entries that is about 46 bytes per entry: 16 (kv) + 4 (hash) +
8 (policy links) + 8 (size) + ~8 (index) + ~2 (control bytes).

Why the keys and values sit in a Python list rather than a raw C array: the
list is what the garbage collector traverses, so a value that refers back to
the cache forms an ordinary collectable cycle, with no hand-written tp_traverse.
Free slots hold the private ``_FREE`` marker (never NULL), so the list is
always a valid list to anyone who reaches it through ``gc``. The list is never
resized in place: growth builds a new one, and ``kv`` is re-read from it.

Atomicity
---------
Every public method is atomic under the GIL. Python code can run inside an
operation only at four points: the key's ``__hash__``, the key's ``__eq__``
during a probe, a user ``sizeof`` or ``timer``, and the deallocation of a
value or key we drop. The first and third run before any mutation. A probe
that had to call ``__eq__`` holds the stored key, re-checks the ``mutations``
counter afterwards and starts again if anything changed meanwhile (the same
defence CPython's dict uses). A probe whose two keys are both exact ``str``,
``bytes`` or ``int`` compares them in C instead (``hc_fast_eq``): those types
cannot be subclassed in place or patched, their comparison reads the two
objects and nothing else, so no Python code runs and there is nothing to
re-check. Any other pair, a subclass of those types included, takes the
guarded path. Dropped references are never released mid-operation: they are pushed on
a ``pending`` stack and released once the table is consistent again, so a
``__del__`` that re-enters the cache (or lets another thread in) only ever sees
a whole state. Allocations of Python objects (which can trigger the cyclic GC
and so run finalizers) also happen only before the mutation begins.

Expiry
------
TTLs are absolute from the write; a read never extends them. Expired entries
are dropped when read, and reclaimed without being read by an indexed min-heap
on expiry: each write pops at most ``SWEEP_PER_WRITE`` expired entries from the
top, so the sweep costs O(expired * log n), never O(size), and needs no thread.
"""

cimport cython
from cpython.object cimport PyObject, PyObject_Hash, Py_EQ, PyTypeObject
from cpython.ref cimport Py_INCREF, Py_DECREF
from libc.math cimport isnan, isinf
from libc.stdint cimport INT64_MIN, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset

from hypercache._core.clock cimport coarse_monotonic_ns
from hypercache._core.policy cimport NO_SLOT, Policy, grow_array, LRUPolicy

import types

from hypercache.errors import ConfigError, EntryTooLargeError


cdef extern from "Python.h":
    ctypedef struct PyListObject:
        PyObject** ob_item
    ctypedef struct PyVarObject:
        Py_ssize_t ob_size
    bint PyBytes_CheckExact(object)
    bint PyUnicode_CheckExact(object)
    bint PyByteArray_CheckExact(object)
    object PyNumber_Index(object)
    bint PyLong_CheckExact(object)
    bint PyFloat_CheckExact(object)
    bint PyTuple_CheckExact(object)
    Py_ssize_t PyBytes_GET_SIZE(object)
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    Py_ssize_t PyByteArray_GET_SIZE(object)
    PyTypeObject* Py_TYPE(object)


cdef enum:
    MIN_SLOTS = 8
    MIN_BUCKETS = 16
    SWEEP_PER_WRITE = 8

cdef extern from *:
    """
    #define HC_FIB 0x9E3779B97F4A7C15ULL
    """
    const uint64_t FIB "HC_FIB"
    const uint64_t BYTES_LSB "0x0101010101010101ULL"
    const uint64_t BYTES_MSB "0x8080808080808080ULL"
    int ctz64 "__builtin_ctzll"(uint64_t) noexcept nogil
    void prefetch "__builtin_prefetch"(const void*) noexcept nogil


cdef inline uint8_t ctrl_tag(uint32_t h) noexcept nogil:
    # Control byte of a full bucket: high bit set, 7 hash bits that the bucket
    # number (from the top of h * FIB) does not already encode.
    return <uint8_t>(0x80 | (h & 0x7F))
cdef int64_t NS = 1000000000
# "The clock has not been read yet": any real reading, 0 included, differs.
cdef int64_t NO_TIME = INT64_MIN


cdef class _FreeMarker:
    """Fills the key and value places of free slots."""

    def __repr__(self):
        return "<free slot>"


cdef object _FREE = _FreeMarker()
cdef PyObject* FREE = <PyObject*>_FREE


cdef extern from *:
    """
    /* str caches its hash; read it without a call, as dict does. */
    static CYTHON_INLINE Py_hash_t hc_cached_str_hash(PyObject *o) {
        return PyUnicode_CheckExact(o) ? ((PyASCIIObject *)o)->hash : -1;
    }
    """
    Py_hash_t hc_cached_str_hash(object o) noexcept


cdef extern from *:
    """
    /* n bytes at a and b equal? Keys are mostly short: up to 16 bytes take two
     * overlapping loads a side instead of a call to memcmp, never reading
     * outside [a, a + n). */
    static CYTHON_INLINE int hc_memeq(const char *a, const char *b, size_t n) {
        uint64_t x, y, d;
        uint32_t u, v, e;
        if (n >= 8) {
            if (n > 16)
                return memcmp(a, b, n) == 0;
            memcpy(&x, a, 8); memcpy(&y, b, 8); d = x ^ y;
            memcpy(&x, a + n - 8, 8); memcpy(&y, b + n - 8, 8);
            return (d | (x ^ y)) == 0;
        }
        if (n >= 4) {
            memcpy(&u, a, 4); memcpy(&v, b, 4); e = u ^ v;
            memcpy(&u, a + n - 4, 4); memcpy(&v, b + n - 4, 4);
            return (e | (u ^ v)) == 0;
        }
        for (size_t i = 0; i < n; i++)
            if (a[i] != b[i])
                return 0;
        return 1;
    }

    /* Two exact str: equal? */
    static CYTHON_INLINE int hc_str_eq(PyObject *a, PyObject *b) {
        Py_hash_t ha = ((PyASCIIObject *)a)->hash, hb = ((PyASCIIObject *)b)->hash;
        Py_ssize_t n = PyUnicode_GET_LENGTH(a);
        unsigned int kind = PyUnicode_KIND(a);
        if ((ha != hb && ha != -1 && hb != -1) || n != PyUnicode_GET_LENGTH(b)
                || kind != PyUnicode_KIND(b))
            return 0;
        if (PyUnicode_IS_COMPACT_ASCII(a) && PyUnicode_IS_COMPACT_ASCII(b))
            return hc_memeq((const char *)(((PyASCIIObject *)a) + 1),
                            (const char *)(((PyASCIIObject *)b) + 1), (size_t)n);
        return hc_memeq((const char *)PyUnicode_DATA(a), (const char *)PyUnicode_DATA(b),
                        (size_t)n * kind);
    }

    /* Equality of a stored key and a probe key, for the few exact built-in
     * types whose comparison is plain C that reads the two objects and nothing
     * else: 1 equal, 0 not equal, -1 not settled here (any other type pair,
     * subclasses included: their __eq__ may be Python code, and the caller
     * must take the guarded path). Never runs Python code, never allocates,
     * never sets an error, so a probe that uses it needs no re-check of the
     * table afterwards. The results are what PyObject_RichCompareBool returns
     * for these pairs; identity has been tested by the caller.
     *
     * str: both hashes are cached (the stored key was hashed when inserted,
     * the probe key just now), and equal strings have equal hashes, so the
     * full 64-bit hash rejects what the table's 32 bits let through; then
     * length, kind (CPython keeps every str in its narrowest kind, so equal
     * strings share it) and the code units, as unicode_eq does. */
    static CYTHON_INLINE int hc_fast_eq(PyObject *a, PyObject *b) {
        PyTypeObject *t = Py_TYPE(a);
        if (t != Py_TYPE(b))
            return -1;
        if (t == &PyUnicode_Type)
            return hc_str_eq(a, b);
        if (t == &PyBytes_Type) {
            Py_ssize_t n = PyBytes_GET_SIZE(a);
            return n == PyBytes_GET_SIZE(b)
                && hc_memeq(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), (size_t)n);
        }
        if (t == &PyLong_Type) {
    #if PY_VERSION_HEX < 0x030C0000
            /* Sign and digit count in ob_size, then the digits (normalised). */
            Py_ssize_t n = Py_SIZE(a);
            return n == Py_SIZE(b) && memcmp(((PyLongObject *)a)->ob_digit,
                ((PyLongObject *)b)->ob_digit, (size_t)(n < 0 ? -n : n) * sizeof(digit)) == 0;
    #else
            if (PyUnstable_Long_IsCompact((PyLongObject *)a)
                    && PyUnstable_Long_IsCompact((PyLongObject *)b))
                return PyUnstable_Long_CompactValue((PyLongObject *)a)
                    == PyUnstable_Long_CompactValue((PyLongObject *)b);
            /* long_richcompare: C only, and it cannot fail for two ints. */
            return PyObject_RichCompareBool(a, b, Py_EQ);
    #endif
        }
        return -1;
    }
    """
    int hc_fast_eq(PyObject* a, PyObject* b) noexcept


cdef extern from "Python.h":
    # Without Cython's ``except -1``: the caller releases what it holds first.
    int rich_compare_bool "PyObject_RichCompareBool"(PyObject* a, PyObject* b, int op) noexcept


cdef inline uint32_t fold(Py_hash_t h) noexcept nogil:
    cdef uint64_t u = <uint64_t>h
    return <uint32_t>(u ^ (u >> 32))


cdef inline uint32_t key_hash(object key) except? 0:
    cdef Py_hash_t h = hc_cached_str_hash(key)
    if h == -1:
        h = PyObject_Hash(key)
    return fold(h)


cdef extern from *:
    """
    /* Exact ints keep their digit count in ob_size only before 3.12. */
    #if PY_VERSION_HEX >= 0x030C0000
    #define HC_LONG_FAST 0
    #else
    #define HC_LONG_FAST 1
    #endif
    static CYTHON_INLINE unsigned int hc_type_tag(PyTypeObject *t) {
        return (t->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) ? t->tp_version_tag : 0;
    }
    """
    bint HC_LONG_FAST
    unsigned int hc_type_tag(PyTypeObject* t) noexcept


cdef object _object_sizeof = object.__sizeof__
# The last type seen that keeps object's __sizeof__, with its version tag:
# values of one type are usually written over and over, so one comparison
# settles most calls, and the tag changes if the class is patched later.
cdef object _plain_type = None
cdef unsigned int _plain_tag = 0


cdef inline bint _inherits_object_sizeof(object value, PyTypeObject* tp):
    global _plain_type, _plain_tag
    cdef object t = type(value)
    cdef unsigned int tag
    if t is _plain_type and _plain_tag and hc_type_tag(tp) == _plain_tag:
        return True
    if getattr(t, "__sizeof__", None) is _object_sizeof:
        tag = hc_type_tag(tp)  # the attribute lookup gave the type a tag
        _plain_type = t if tag else None
        _plain_tag = tag
        return True
    return False


cdef inline uint64_t shallow_size(object value) except? 0xFFFFFFFFFFFFFFFF:
    # len() for bytes-like and str; otherwise ``value.__sizeof__()``: the
    # object's own footprint without the GC header, not what it references.
    # The common scalar types are computed here without a call.
    if PyBytes_CheckExact(value):
        return <uint64_t>PyBytes_GET_SIZE(value)
    if PyUnicode_CheckExact(value):
        return <uint64_t>PyUnicode_GET_LENGTH(value)
    if PyByteArray_CheckExact(value):
        return <uint64_t>PyByteArray_GET_SIZE(value)
    cdef PyTypeObject* tp = Py_TYPE(value)
    cdef Py_ssize_t n
    if HC_LONG_FAST and PyLong_CheckExact(value):
        n = (<PyVarObject*>value).ob_size
        n = -n if n < 0 else n
        return <uint64_t>(tp.tp_basicsize + (n if n else 1) * tp.tp_itemsize)
    if (PyFloat_CheckExact(value) or PyTuple_CheckExact(value) or value is None
            or _inherits_object_sizeof(value, tp)):
        # What object.__sizeof__ computes, without the call.
        n = (<PyVarObject*>value).ob_size if tp.tp_itemsize else 0
        return <uint64_t>(tp.tp_basicsize + n * tp.tp_itemsize)
    # Through the type: a class stored as a value must not find its own
    # unbound __sizeof__ (sys.getsizeof does the same).
    n = PyNumber_Index(type(value).__sizeof__(value))
    if n < 0:
        raise ValueError(f"__sizeof__ returned a negative size: {n!r}")
    return <uint64_t>n


@cython.final
cdef class CacheStats:
    """Counters of a cache at one moment; see :meth:`CacheCore.stats`."""

    cdef readonly uint64_t hits, misses, sets, deletes, evictions, expirations
    cdef readonly uint64_t size, bytes

    @property
    def hit_ratio(self):
        cdef uint64_t total = self.hits + self.misses
        return <double>self.hits / total if total else 0.0

    def _asdict(self):
        return {
            "hits": self.hits, "misses": self.misses, "sets": self.sets,
            "deletes": self.deletes, "evictions": self.evictions,
            "expirations": self.expirations, "size": self.size, "bytes": self.bytes,
        }

    def __eq__(self, other):
        if not isinstance(other, CacheStats):
            return NotImplemented
        return self._asdict() == (<CacheStats>other)._asdict()

    def __repr__(self):
        return "CacheStats(" + ", ".join(f"{k}={v}" for k, v in self._asdict().items()) + ")"


cdef extern from *:
    """
    /* Positional entry points for get() and set(), the two calls a cache
     * serves most. Cython's wrappers parse arguments for the general case
     * (keywords, defaults) and take and drop a reference to each argument:
     * about 40 instructions of a get that costs 250 inside. These take the
     * positional calls straight to the compiled body and hand every other call
     * (keywords, a wrong count, anything raising TypeError) to Cython's
     * wrapper, which stays the one place that parses and reports errors.
     * hc_install_entries() puts them in the type's dict, in place of Cython's
     * method descriptors, once at import. */
    typedef PyObject *(*hc_get_fn)(PyObject *, PyObject *, PyObject *);
    typedef int (*hc_set_fn)(PyObject *, PyObject *, PyObject *, PyObject *);
    static hc_get_fn hc_get_body;
    static hc_set_fn hc_set_body;
    static _PyCFunctionFastWithKeywords hc_get_full, hc_set_full;

    static PyObject *hc_get_entry(PyObject *self, PyObject *const *args,
                                  Py_ssize_t nargs, PyObject *kwnames) {
        if (kwnames == NULL && (nargs == 1 || nargs == 2))
            return hc_get_body(self, args[0], nargs == 2 ? args[1] : Py_None);
        return hc_get_full(self, args, nargs, kwnames);
    }

    static PyObject *hc_set_entry(PyObject *self, PyObject *const *args,
                                  Py_ssize_t nargs, PyObject *kwnames) {
        if (kwnames == NULL && (nargs == 2 || nargs == 3)) {
            if (hc_set_body(self, args[0], args[1], nargs == 3 ? args[2] : Py_None) < 0)
                return NULL;
            Py_RETURN_NONE;
        }
        return hc_set_full(self, args, nargs, kwnames);
    }

    static PyMethodDef hc_get_def = {"get", NULL, METH_FASTCALL | METH_KEYWORDS, NULL};
    static PyMethodDef hc_set_def = {"set", NULL, METH_FASTCALL | METH_KEYWORDS, NULL};

    /* Replace the descriptor named def->ml_name in t's dict by one calling
     * entry, keeping the old one's C function as *full and its docstring. */
    static int hc_install_entry(PyTypeObject *t, PyMethodDef *def, PyCFunction entry,
                                _PyCFunctionFastWithKeywords *full) {
        PyObject *old = PyDict_GetItemString(t->tp_dict, def->ml_name);  /* borrowed */
        PyObject *descr;
        int rc;
        if (old == NULL || Py_TYPE(old) != &PyMethodDescr_Type) {
            PyErr_Format(PyExc_RuntimeError, "%s.%s is not a C method", t->tp_name, def->ml_name);
            return -1;
        }
        PyMethodDef *was = ((PyMethodDescrObject *)old)->d_method;
        if ((was->ml_flags & (METH_FASTCALL | METH_KEYWORDS)) != (METH_FASTCALL | METH_KEYWORDS)) {
            PyErr_Format(PyExc_RuntimeError, "%s.%s is not a fastcall method", t->tp_name, def->ml_name);
            return -1;
        }
        *full = (_PyCFunctionFastWithKeywords)(void (*)(void))was->ml_meth;
        def->ml_meth = entry;
        def->ml_doc = was->ml_doc;
        descr = PyDescr_NewMethod(t, def);
        if (descr == NULL)
            return -1;
        rc = PyDict_SetItemString(t->tp_dict, def->ml_name, descr);
        Py_DECREF(descr);
        PyType_Modified(t);
        return rc;
    }

    static int hc_install_entries(PyTypeObject *t, hc_get_fn get_body, hc_set_fn set_body) {
        hc_get_body = get_body;
        hc_set_body = set_body;
        if (hc_install_entry(t, &hc_get_def, (PyCFunction)(void (*)(void))hc_get_entry, &hc_get_full) < 0)
            return -1;
        return hc_install_entry(t, &hc_set_def, (PyCFunction)(void (*)(void))hc_set_entry, &hc_set_full);
    }
    """
    ctypedef object (*hc_get_fn)(object, object, object)
    ctypedef int (*hc_set_fn)(object, object, object, object) except -1
    int hc_install_entries(PyTypeObject* t, hc_get_fn get_body, hc_set_fn set_body) except -1


cdef class CacheCore:
    """An item- and byte-bounded table with pluggable eviction and TTLs.

    Python code uses it through :class:`hypercache.HyperCache`, which validates
    arguments and adds ``get_or_set`` and ``memoize``.
    """

    def __cinit__(self, *args, **kwargs):
        # Always a usable, empty, unbounded LRU table; _configure sets it up.
        self.kvlist = [_FREE] * (2 * MIN_SLOTS)
        self.kv = (<PyListObject*>self.kvlist).ob_item
        self.cap = MIN_SLOTS
        self.hashes = <uint32_t*>grow_array(NULL, MIN_SLOTS, sizeof(uint32_t))
        self.sizes = <uint64_t*>grow_array(NULL, MIN_SLOTS, sizeof(uint64_t))
        self.index = <uint32_t*>grow_array(NULL, MIN_BUCKETS, sizeof(uint32_t))
        memset(self.index, 0, MIN_BUCKETS * sizeof(uint32_t))
        self.ctrl = <uint8_t*>grow_array(NULL, MIN_BUCKETS + 8, 1)
        memset(self.ctrl, 0, MIN_BUCKETS + 8)
        self.mask = MIN_BUCKETS - 1
        self.shift = 64 - 4
        self.used = 0
        self.free_head = NO_SLOT
        self.policy = LRUPolicy(0)
        self.policy.grow(MIN_SLOTS)
        self.timer = None
        self.size_fn = None

    def __dealloc__(self):
        # The kv list releases keys and values itself.
        free(self.hashes)
        free(self.sizes)
        free(self.index)
        free(self.ctrl)
        free(self.expiry)
        free(self.heap_pos)
        free(self.heap)
        free(self.pending)

    def _configure(self, Policy policy not None, uint64_t max_items, uint64_t max_bytes,
                   double default_ttl, size_fn, timer):
        """Set bounds and policy on an empty table (called once by HyperCache)."""
        if self.count:
            raise RuntimeError("cannot reconfigure a cache that holds entries")
        if max_items > 0xFFFFFFF0:
            raise OverflowError("capacity too large")
        policy.grow(self.cap)
        self.policy = policy
        self.item_limit = <uint32_t>max_items
        self.byte_limit = max_bytes
        self.default_ttl_ns = self._ttl_ns(default_ttl) if default_ttl > 0 else 0
        self.size_fn = size_fn
        self.timer = timer

    @classmethod  # implicit only for functions, not for C method descriptors
    def __class_getitem__(cls, item):
        return types.GenericAlias(cls, item)

    # ------------------------------------------------------------------ clock

    @cython.final
    cdef int64_t _ttl_ns(self, double ttl) except -1:
        if isnan(ttl) or ttl <= 0:
            raise ConfigError("ttl", f"must be a positive number of seconds, inf or None, got {ttl!r}")
        if isinf(ttl) or ttl > 1e9:
            return 0
        return max(<int64_t>(ttl * NS), 1)

    @cython.final
    cdef int64_t _now(self) except? -1:
        # Only the injected test timer runs Python code; callers that have
        # looked up a slot re-check ``mutations`` after calling this.
        if self.timer is None:
            return coarse_monotonic_ns()
        return <int64_t>(float(self.timer()) * NS)

    @cython.final
    cdef int64_t _expiry_for(self, object ttl, int64_t* now) except? -2:
        # Absolute expiry for a write; 0 = none. Reads the clock only when a TTL applies.
        cdef int64_t ttl_ns
        if ttl is None:
            ttl_ns = self.default_ttl_ns
        elif isinstance(ttl, bool):
            raise ConfigError("ttl", f"must be a number of seconds, got {ttl!r}")
        else:
            ttl_ns = self._ttl_ns(ttl)
        if ttl_ns == 0:
            return 0
        if now[0] == NO_TIME:
            now[0] = self._now()
        # 0 means "no TTL": an expiry that lands exactly on it moves by 1 ns.
        return now[0] + ttl_ns or 1

    # ------------------------------------------------------------------ index

    @cython.final
    cdef inline uint32_t _bucket(self, uint32_t h) noexcept nogil:
        return <uint32_t>((<uint64_t>h * FIB) >> self.shift)

    @cython.final
    cdef inline int64_t _find(self, object key, uint32_t h) except -2:
        # The slot holding ``key``, or -1. Scans the control bytes 8 buckets at
        # a time: a miss is usually settled by one group that holds an empty
        # byte and no tag match, without touching the index. A tag match whose
        # slot holds the very key object (interned strings, small ints, the
        # object stored) is a hit without reading the stored hash. A candidate
        # with an equal hash is compared in C when both keys are exact str,
        # bytes or int (hc_fast_eq), the usual case of a key built again per
        # request; any other pair takes _find_eq, which may call __eq__.
        cdef uint32_t i = self._bucket(h)
        cdef uint64_t g, m, empty
        cdef uint64_t pattern = BYTES_LSB * ctrl_tag(h)
        cdef uint32_t s
        cdef PyObject* k
        cdef int r
        while True:
            # The group's index entries are the next load of a hit: ask for
            # them now, alongside the control bytes, rather than after them.
            prefetch(self.index + i)
            memcpy(&g, self.ctrl + i, 8)
            m = g ^ pattern
            m = (m - BYTES_LSB) & ~m & BYTES_MSB
            empty = ~g & BYTES_MSB
            if empty:
                # Only the run before the first empty bucket belongs to the probe.
                m &= (empty & (~empty + 1)) - 1
            while m:
                s = self.index[(i + (ctz64(m) >> 3)) & self.mask] - 1
                # A hit goes on to the policy's links of this slot: start
                # that load now so it overlaps the key comparison's.
                prefetch(self.policy.prev + 2 * s)
                k = self.kv[2 * s]
                if k == <PyObject*>key:
                    return s
                if self.hashes[s] == h:
                    # An equal key that is another object: settled in place for
                    # exact str, bytes and int (no Python code can run, so the
                    # table cannot change under the probe), else the guarded path.
                    r = hc_fast_eq(k, <PyObject*>key)
                    if r > 0:
                        return s
                    if r < 0:
                        return self._find_eq(key, h)
                m &= m - 1
            if empty:
                return -1
            i = (i + 8) & self.mask

    @cython.final
    cdef int64_t _find_eq(self, object key, uint32_t h) except -2:
        # The full probe, comparing with __eq__, which may run Python code:
        # if that changed the table, start again (as CPython's dict does).
        cdef uint32_t i, b
        cdef uint64_t seen
        cdef PyObject* k
        cdef int r
        while True:
            i = self._bucket(h)
            while True:
                b = self.index[i]
                if b == 0:
                    return -1
                b -= 1
                if self.hashes[b] == h:
                    k = self.kv[2 * b]
                    if k == <PyObject*>key:
                        return b
                    r = hc_fast_eq(k, <PyObject*>key)
                    if r > 0:
                        return b
                    if r == 0:
                        i = (i + 1) & self.mask
                        continue
                    seen = self.mutations
                    # Hold the stored key over the comparison, as dict does: an
                    # __eq__ may drop it from the table, and the comparison still
                    # uses it afterwards (the reflected key.__eq__(stored) runs
                    # when stored.__eq__ returns NotImplemented). The release may
                    # run a finalizer, so ``mutations`` is read after it.
                    Py_INCREF(<object>k)
                    r = rich_compare_bool(k, <PyObject*>key, Py_EQ)
                    Py_DECREF(<object>k)
                    if r < 0:
                        return -2  # the comparison's exception is set
                    if seen != self.mutations:
                        break
                    if r:
                        return b
                i = (i + 1) & self.mask

    @cython.final
    cdef void _index_insert(self, uint32_t slot, uint32_t h) noexcept:
        cdef uint32_t i = self._bucket(h)
        while self.index[i]:
            i = (i + 1) & self.mask
        self.index[i] = slot + 1
        self._set_ctrl(i, ctrl_tag(h))

    @cython.final
    cdef inline void _set_ctrl(self, uint32_t i, uint8_t v) noexcept:
        # The first 8 control bytes are mirrored past the end, so a group read
        # at any bucket is one unaligned 8-byte load, with no wrap-around.
        self.ctrl[i] = v
        if i < 8:
            self.ctrl[self.mask + 1 + i] = v

    @cython.final
    cdef void _index_remove(self, uint32_t slot) noexcept:
        # Backward-shift deletion: pull later members of the probe run into the
        # hole unless their home bucket lies cyclically in (hole, their place].
        # Fields live in locals: the stores through ``index`` and ``ctrl`` would
        # otherwise make the compiler reload them on every step.
        cdef uint32_t* index = self.index
        cdef uint32_t* hashes = self.hashes
        cdef uint8_t* ctrl = self.ctrl
        cdef uint32_t mask = self.mask
        cdef int shift = self.shift
        cdef uint32_t i = <uint32_t>((<uint64_t>hashes[slot] * FIB) >> shift)
        cdef uint32_t j, home, b
        while index[i] != slot + 1:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            b = index[j]
            if b == 0:
                break
            home = <uint32_t>((<uint64_t>hashes[b - 1] * FIB) >> shift)
            if i <= j:
                if i < home <= j:
                    continue
            elif i < home or home <= j:
                continue
            index[i] = b
            ctrl[i] = ctrl[j]
            if i < 8:
                ctrl[mask + 1 + i] = ctrl[j]
            i = j
        index[i] = 0
        ctrl[i] = 0
        if i < 8:
            ctrl[mask + 1 + i] = 0

    @cython.final
    cdef inline bint _index_full(self) noexcept:
        # Would one more entry pass the load limit? Under 2^16 buckets (an index
        # of at most 256 KiB) the limit is 3/8: sparser probe runs make the
        # insert-and-evict path ~20% faster (set-new at 1,000 keys: 67 -> 53 ns).
        # Above, 1/2: at 100,000 keys a 3/8 limit doubled the index that every
        # hit walks and cost 10% on get-hit, and at a million it costs ~10 bytes
        # per entry.
        cdef uint64_t buckets = <uint64_t>self.mask + 1
        cdef uint64_t wanted = (<uint64_t>self.count + 1) * 8
        if buckets < (1 << 16):
            return wanted > buckets * 3
        return wanted > buckets * 4

    @cython.final
    cdef int _index_grow(self) except -1:
        cdef uint32_t nb = (self.mask + 1) * 2
        cdef uint32_t s
        cdef uint32_t* idx = <uint32_t*>grow_array(NULL, nb, sizeof(uint32_t))
        cdef uint8_t* ctl = <uint8_t*>grow_array(NULL, nb + 8, 1)
        memset(idx, 0, nb * sizeof(uint32_t))
        memset(ctl, 0, nb + 8)
        free(self.index)
        free(self.ctrl)
        self.index = idx
        self.ctrl = ctl
        self.mask = nb - 1
        self.shift -= 1
        for s in range(self.used):
            if self.kv[2 * s] != FREE:
                self._index_insert(s, self.hashes[s])
        return 0

    # ------------------------------------------------------------------ slots

    @cython.final
    cdef int _grow_slots(self) except -1:
        # Allocates a Python list, which may run the cyclic GC and finalizers:
        # callers do this before looking anything up.
        cdef uint32_t old = self.cap
        cdef uint64_t seen = self.mutations
        cdef uint64_t want = <uint64_t>old * 2
        if self.item_limit and want > <uint64_t>self.item_limit + 1:
            want = <uint64_t>self.item_limit + 1
        if want > 0xFFFFFFF0:
            raise MemoryError("cache holds too many entries")
        if want <= old:
            want = old + 1
        cdef uint32_t new_cap = <uint32_t>want
        grown = self.kvlist + [_FREE] * (2 * (new_cap - old))
        if seen != self.mutations:
            # A finalizer run by that allocation changed the table; the caller
            # looks again at what it needs.
            return 0
        self.kvlist = grown
        self.kv = (<PyListObject*>self.kvlist).ob_item
        self.hashes = <uint32_t*>grow_array(self.hashes, new_cap, sizeof(uint32_t))
        self.sizes = <uint64_t*>grow_array(self.sizes, new_cap, sizeof(uint64_t))
        if self.expiry != NULL:
            self.expiry = <int64_t*>grow_array(self.expiry, new_cap, sizeof(int64_t))
            self.heap_pos = <uint32_t*>grow_array(self.heap_pos, new_cap, sizeof(uint32_t))
            self.heap = <uint32_t*>grow_array(self.heap, new_cap, sizeof(uint32_t))
            memset(self.expiry + old, 0, (new_cap - old) * sizeof(int64_t))
        self.policy.grow(new_cap)
        self.cap = new_cap
        self.mutations += 1
        return 0

    @cython.final
    cdef inline bint _has_free_slot(self) noexcept:
        return self.free_head != NO_SLOT or self.used < self.cap

    @cython.final
    cdef uint32_t _take_slot(self) noexcept:
        cdef uint32_t s
        if self.free_head != NO_SLOT:
            s = self.free_head
            self.free_head = self.hashes[s]
        else:
            s = self.used
            self.used += 1
        return s

    @cython.final
    cdef inline void _defer(self, PyObject* o) noexcept:
        # Caller guarantees room: _reserve_pending ran before the mutation.
        self.pending[self.npending] = o
        self.npending += 1

    @cython.final
    cdef inline int _reserve_pending(self, Py_ssize_t n) except -1:
        if self.npending + n > self.pending_cap:
            self.pending_cap = max(self.pending_cap * 2, self.npending + n, 16)
            self.pending = <PyObject**>grow_array(
                self.pending, self.pending_cap, sizeof(PyObject*))
        return 0

    @cython.final
    cdef void _release(self) noexcept:
        # Runs once the table is consistent; a finalizer that re-enters pushes
        # and pops above our mark, so re-reading npending each turn is enough.
        cdef PyObject* o
        while self.npending:
            self.npending -= 1
            o = self.pending[self.npending]
            Py_DECREF(<object>o)

    @cython.final
    cdef void _drop_slot(self, uint32_t s) noexcept:
        # Forget slot ``s`` everywhere but in the policy (the caller tells the
        # policy, which differs between remove and evict). Needs 2 pending places.
        self._index_remove(s)
        self._defer(self.kv[2 * s])
        self._defer(self.kv[2 * s + 1])
        Py_INCREF(_FREE)
        Py_INCREF(_FREE)
        self.kv[2 * s] = FREE
        self.kv[2 * s + 1] = FREE
        self.nbytes -= self.sizes[s]
        if self.expiry != NULL and self.expiry[s]:
            self._heap_remove(s)
            self.expiry[s] = 0
        self.hashes[s] = self.free_head
        self.free_head = s
        self.count -= 1
        self.mutations += 1

    # ------------------------------------------------------------------ expiry heap

    @cython.final
    cdef int _enable_expiry(self) except -1:
        self.expiry = <int64_t*>grow_array(NULL, self.cap, sizeof(int64_t))
        memset(self.expiry, 0, self.cap * sizeof(int64_t))
        self.heap_pos = <uint32_t*>grow_array(NULL, self.cap, sizeof(uint32_t))
        self.heap = <uint32_t*>grow_array(NULL, self.cap, sizeof(uint32_t))
        self.heap_len = 0
        return 0

    @cython.final
    cdef void _heap_place(self, uint32_t pos, uint32_t s) noexcept:
        self.heap[pos] = s
        self.heap_pos[s] = pos

    @cython.final
    cdef void _heap_up(self, uint32_t pos) noexcept:
        cdef uint32_t s = self.heap[pos]
        cdef int64_t e = self.expiry[s]
        cdef uint32_t parent
        while pos:
            parent = (pos - 1) >> 1
            if self.expiry[self.heap[parent]] <= e:
                break
            self._heap_place(pos, self.heap[parent])
            pos = parent
        self._heap_place(pos, s)

    @cython.final
    cdef void _heap_down(self, uint32_t pos) noexcept:
        cdef uint32_t s = self.heap[pos]
        cdef int64_t e = self.expiry[s]
        cdef uint32_t child
        while True:
            child = 2 * pos + 1
            if child >= self.heap_len:
                break
            if child + 1 < self.heap_len and \
                    self.expiry[self.heap[child + 1]] < self.expiry[self.heap[child]]:
                child += 1
            if self.expiry[self.heap[child]] >= e:
                break
            self._heap_place(pos, self.heap[child])
            pos = child
        self._heap_place(pos, s)

    @cython.final
    cdef void _heap_remove(self, uint32_t s) noexcept:
        cdef uint32_t pos = self.heap_pos[s]
        self.heap_len -= 1
        if pos == self.heap_len:
            return
        cdef uint32_t moved = self.heap[self.heap_len]
        self._heap_place(pos, moved)
        self._heap_up(pos)
        self._heap_down(self.heap_pos[moved])

    @cython.final
    cdef void _set_expiry(self, uint32_t s, int64_t at) noexcept:
        # Requires self.expiry != NULL when at != 0.
        cdef int64_t old
        if self.expiry == NULL:
            return
        old = self.expiry[s]
        if old == at:
            return
        if at == 0:
            self._heap_remove(s)
            self.expiry[s] = 0
        elif old == 0:
            self.expiry[s] = at
            self.heap_pos[s] = self.heap_len
            self.heap[self.heap_len] = s
            self.heap_len += 1
            self._heap_up(self.heap_len - 1)
        else:
            self.expiry[s] = at
            self._heap_up(self.heap_pos[s])
            self._heap_down(self.heap_pos[s])

    @cython.final
    cdef uint32_t _sweep(self, int64_t now, uint32_t budget) noexcept:
        # Needs 2 pending places per entry it may drop.
        cdef uint32_t s, n = 0
        while self.heap_len and n < budget:
            s = self.heap[0]
            if self.expiry[s] > now:
                break
            self.policy.remove(s)
            self._drop_slot(s)
            self.expirations += 1
            n += 1
        return n

    @cython.final
    cdef inline bint _expired(self, uint32_t s, int64_t now) noexcept:
        return self.expiry != NULL and self.expiry[s] != 0 and self.expiry[s] <= now

    # ------------------------------------------------------------------ reads

    @cython.final
    cdef int64_t _live(self, object key, uint32_t h) except -2:
        # Lookup that honours TTLs: drops an expired entry it finds, returns -1.
        cdef int64_t s
        cdef int64_t now
        cdef uint64_t seen
        while True:
            s = self._find(key, h)
            if s < 0 or self.expiry == NULL or self.expiry[s] == 0:
                return s
            seen = self.mutations
            now = self._now()
            if seen != self.mutations:
                continue
            if self.expiry[s] > now:
                return s
            self._reserve_pending(2)
            self.policy.remove(<uint32_t>s)
            self._drop_slot(<uint32_t>s)
            self.expirations += 1
            self._release()
            return -1

    def get(self, key, default=None):
        """The value stored under ``key``, or ``default``; counts as a use."""
        return self._get(key, default)

    @cython.final
    cdef object _get(self, object key, object default):
        cdef uint32_t h = key_hash(key)
        cdef int64_t s = self._live(key, h)
        if s < 0:
            self.misses += 1
            if self.policy.counts_misses:
                self.policy.miss(h)
            return default
        self.hits += 1
        self.policy.access(<uint32_t>s, h)
        return <object>self.kv[2 * s + 1]

    def __getitem__(self, key):
        cdef uint32_t h = key_hash(key)
        cdef int64_t s = self._live(key, h)
        if s < 0:
            self.misses += 1
            if self.policy.counts_misses:
                self.policy.miss(h)
            raise KeyError(key)
        self.hits += 1
        self.policy.access(<uint32_t>s, h)
        return <object>self.kv[2 * s + 1]

    def _peek(self, key, default=None):
        """The live value under ``key`` or ``default``, without counting a use or a hit."""
        cdef int64_t s = self._live(key, key_hash(key))
        if s < 0:
            return default
        return <object>self.kv[2 * s + 1]

    def __contains__(self, key):
        return self._live(key, key_hash(key)) >= 0

    def __len__(self):
        return self.count

    def get_many(self, keys):
        """A dict of the hits among ``keys``; each lookup counts as a use."""
        cdef dict out = {}
        cdef uint32_t h
        cdef int64_t s
        for key in keys:
            h = key_hash(key)
            s = self._live(key, h)
            if s < 0:
                self.misses += 1
                if self.policy.counts_misses:
                    self.policy.miss(h)
            else:
                self.hits += 1
                self.policy.access(<uint32_t>s, h)
                out[key] = <object>self.kv[2 * s + 1]
        return out

    def ttl(self, key):
        """Seconds left before ``key`` expires; None if it has no TTL; KeyError if absent."""
        cdef int64_t s = self._live(key, key_hash(key))
        if s < 0:
            raise KeyError(key)
        if self.expiry == NULL or self.expiry[s] == 0:
            return None
        # Read the entry before the clock: a Python timer may change the table.
        cdef int64_t at = self.expiry[s]
        cdef int64_t left = at - self._now()
        return max(left, 0) / <double>NS

    @cython.final
    cdef list _live_entries(self, bint with_values):
        # Keys (or (key, value) pairs) of the live entries, in slot order.
        cdef list out = []
        cdef uint32_t s
        cdef int64_t now = NO_TIME
        if self.expiry != NULL and self.heap_len:
            now = self._now()
        for s in range(self.used):
            if self.kv[2 * s] == FREE or (now != NO_TIME and self._expired(s, now)):
                continue
            if with_values:
                out.append((<object>self.kv[2 * s], <object>self.kv[2 * s + 1]))
            else:
                out.append(<object>self.kv[2 * s])
        return out

    def keys(self):
        """A list of the live keys (in slot order, which is no particular order)."""
        return self._live_entries(False)

    def __iter__(self):
        return iter(self.keys())

    # ------------------------------------------------------------------ writes

    @cython.final
    cdef uint64_t _measure(self, object value) except? 0xFFFFFFFFFFFFFFFF:
        # An integer, strictly: a float would be truncated and slip under the budget.
        n = PyNumber_Index(self.size_fn(value))
        if n < 0:
            raise ValueError(f"sizeof returned a negative size: {n!r}")
        return <uint64_t>n

    @cython.final
    cdef int _store(self, object key, object value, object ttl) except -1:
        # Raises only before the first mutation, with nothing deferred; on
        # success it releases what it dropped itself.
        #
        # Room is made *before* the write, so a bound never lets a write evict
        # the entry it stores: the victim is chosen among the entries already
        # there (TinyLFU still filters admission, through its window).
        cdef uint32_t h = key_hash(key)
        cdef uint64_t size
        cdef int64_t now = NO_TIME
        cdef int64_t at = 0
        cdef int64_t s
        cdef uint32_t slot, v
        if self.size_fn is None:
            size = shallow_size(value)
        else:
            size = self._measure(value)
        if ttl is not None or self.default_ttl_ns:
            at = self._expiry_for(ttl, &now)
            if self.expiry == NULL:
                self._enable_expiry()
        if self.byte_limit and size > self.byte_limit:
            raise EntryTooLargeError(
                f"value of {size} bytes exceeds the cache's max_bytes={self.byte_limit}")
        if self.heap_len and now == NO_TIME:
            now = self._now()
        s = self._find(key, h)
        # Growing the slot list allocates a Python object, which may run the
        # cyclic GC and so finalizers that change the table: look again after.
        while s < 0 and not self._has_free_slot():
            self._grow_slots()
            s = self._find(key, h)
        # From here the write is pure C: no Python code runs until _release().
        if s < 0 and self._index_full():
            self._index_grow()
        # Room for the old value, the expired entries the sweep may drop and
        # one eviction; a byte budget may need more evictions, each of which
        # reserves its own room below (a C realloc: no Python code runs).
        self._reserve_pending(2 * (SWEEP_PER_WRITE + 4))
        if s >= 0 and now != NO_TIME and self._expired(<uint32_t>s, now):
            # A write over an expired entry stores a new one.
            self.policy.remove(<uint32_t>s)
            self._drop_slot(<uint32_t>s)
            self.expirations += 1
            s = -1
        if now != NO_TIME:
            # Expired entries go before any live one is evicted for room.
            self._sweep(now, SWEEP_PER_WRITE)
        if self.item_limit or self.byte_limit:
            while self._over_after(s, size):
                # Fails only for lack of memory, between whole evictions; what
                # is pending then goes with the next operation's release.
                self._reserve_pending(2)
                v = self.policy.evict()
                if v == NO_SLOT:
                    break
                self._drop_slot(v)
                if v == s:
                    # The policy chose the entry being overwritten: its old
                    # version goes, and the write stores a new entry.
                    s = -1
                else:
                    self.evictions += 1
        if s >= 0:
            slot = <uint32_t>s
            self._defer(self.kv[2 * slot + 1])
            Py_INCREF(value)
            self.kv[2 * slot + 1] = <PyObject*>value
            self.nbytes += size - self.sizes[slot]
            self.sizes[slot] = size
            if self.expiry != NULL:
                self._set_expiry(slot, at)
            self.policy.update(slot, h)
        else:
            slot = self._take_slot()
            Py_DECREF(_FREE)  # two references to the marker go, they never hit zero
            Py_DECREF(_FREE)
            Py_INCREF(key)
            Py_INCREF(value)
            self.kv[2 * slot] = <PyObject*>key
            self.kv[2 * slot + 1] = <PyObject*>value
            self.hashes[slot] = h
            self.sizes[slot] = size
            self.nbytes += size
            if self.expiry != NULL:
                self.expiry[slot] = 0
                self._set_expiry(slot, at)
            self._index_insert(slot, h)
            self.count += 1
            self.mutations += 1
            self.policy.insert(slot, h)
        self.sets += 1
        self._release()
        return 0

    @cython.final
    cdef inline bint _over_after(self, int64_t s, uint64_t size) noexcept:
        # Would writing ``size`` bytes (over slot s, or as a new entry when
        # s < 0) break a bound?
        # Subtractions, not sums: sizes near 2**64 must not wrap. Between
        # operations nbytes <= byte_limit, so the differences never go negative.
        if s < 0:
            return ((self.item_limit and self.count + 1 > self.item_limit)
                    or (self.byte_limit and size > self.byte_limit - self.nbytes))
        return self.byte_limit and size > self.byte_limit - (self.nbytes - self.sizes[s])

    def set(self, key, value, ttl=None):
        """Store ``value`` under ``key``; ``ttl`` seconds (None: the default TTL)."""
        self._store(key, value, ttl)

    def __setitem__(self, key, value):
        self._store(key, value, None)

    def set_many(self, mapping, ttl=None):
        """Store every item of ``mapping`` (a mapping or an iterable of pairs)."""
        items = mapping.items() if hasattr(mapping, "items") else mapping
        for key, value in items:
            self._store(key, value, ttl)

    @cython.final
    cdef bint _remove(self, object key) except -1:
        cdef int64_t s = self._live(key, key_hash(key))
        if s < 0:
            return False
        # Reserve only now: _live may run Python code (__eq__, the timer),
        # during which another thread can use up room reserved earlier.
        self._reserve_pending(2)
        self.policy.remove(<uint32_t>s)
        self._drop_slot(<uint32_t>s)
        self.deletes += 1
        self._release()
        return True

    def delete(self, key):
        """Remove ``key``; True if it was present (and live)."""
        return self._remove(key)

    def __delitem__(self, key):
        if not self._remove(key):
            raise KeyError(key)

    def delete_many(self, keys):
        """Remove each of ``keys``; the number that were present."""
        cdef Py_ssize_t n = 0
        for key in keys:
            n += self._remove(key)
        return n

    def expire(self, key, ttl):
        """Give a present ``key`` a new TTL from now (None or inf: never); False if absent."""
        cdef int64_t now = NO_TIME
        cdef int64_t at
        cdef int64_t s
        at = self._expiry_for(float("inf") if ttl is None else ttl, &now)
        if at and self.expiry == NULL:
            self._enable_expiry()
        s = self._live(key, key_hash(key))
        if s < 0:
            return False
        self._set_expiry(<uint32_t>s, at)
        return True

    def sweep(self):
        """Reclaim every expired entry now; the number reclaimed."""
        cdef uint32_t n = 0, k
        cdef int64_t now
        if self.expiry == NULL or not self.heap_len:
            return 0
        now = self._now()
        while True:
            self._reserve_pending(2 * 256)
            k = self._sweep(now, 256)
            self._release()
            n += k
            if k < 256:
                return n

    def clear(self):
        """Remove every entry (counters other than size and bytes are kept)."""
        cdef uint32_t cap
        # A fresh list first (may run the GC and so re-enter), then reset the C
        # state, then let the old list, and with it every key and value, go.
        while True:
            cap = self.cap
            new = [_FREE] * (2 * cap)
            if cap == self.cap:
                break
        old = self.kvlist
        memset(self.index, 0, (self.mask + 1) * sizeof(uint32_t))
        memset(self.ctrl, 0, self.mask + 1 + 8)
        if self.expiry != NULL:
            memset(self.expiry, 0, self.cap * sizeof(int64_t))
            self.heap_len = 0
        self.kvlist = new
        self.kv = (<PyListObject*>self.kvlist).ob_item
        self.used = 0
        self.free_head = NO_SLOT
        self.count = 0
        self.nbytes = 0
        self.mutations += 1
        self.policy.clear()
        del old

    # ------------------------------------------------------------------ stats

    def stats(self):
        """A :class:`CacheStats` snapshot of the counters."""
        cdef CacheStats st = CacheStats.__new__(CacheStats)
        st.hits = self.hits
        st.misses = self.misses
        st.sets = self.sets
        st.deletes = self.deletes
        st.evictions = self.evictions
        st.expirations = self.expirations
        st.size = self.count
        st.bytes = self.nbytes
        return st

    @property
    def policy_name(self):
        return self.policy.name

    @property
    def capacity(self):
        return self.item_limit or None

    @property
    def max_bytes(self):
        return self.byte_limit or None

    def items(self):
        """A list of the live (key, value) pairs."""
        return self._live_entries(True)


cdef object _get_body(object self, object key, object default):
    return (<CacheCore>self)._get(key, default)


cdef int _set_body(object self, object key, object value, object ttl) except -1:
    return (<CacheCore>self)._store(key, value, ttl)


hc_install_entries(<PyTypeObject*>CacheCore, _get_body, _set_body)
