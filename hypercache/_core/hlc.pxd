# Hybrid logical clock and the version order of the whole cluster.
#
# A timestamp is one uint64: wall-clock milliseconds in the high 48 bits, a
# logical counter in the low 16. Compared as plain integers, timestamps order
# first by physical time, then by counter. A *version* is the pair
# (ts, origin) with origin the 32-bit tag of the node that wrote it (node_tag);
# versions compare lexicographically, so the order is total and every replica,
# hint, repair and migration agrees on which of two versions is newer.

from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef extern from *:
    """
    #if defined(_WIN32)
    #include <windows.h>
    static inline int64_t hc_wall_ms(void) {
        FILETIME ft;
        ULARGE_INTEGER u;
        GetSystemTimeAsFileTime(&ft);
        u.LowPart = ft.dwLowDateTime;
        u.HighPart = ft.dwHighDateTime;
        /* 100 ns ticks since 1601 -> ms since 1970 */
        return (int64_t)((u.QuadPart - 116444736000000000ULL) / 10000ULL);
    }
    #else
    #include <time.h>
    static inline int64_t hc_wall_ms(void) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
    }
    #endif
    #define HC_MAX_TS ((uint64_t)0x7FFFFFFFFFFFFFFFULL)
    """
    # Wall clock (CLOCK_REALTIME) in milliseconds since the Unix epoch.
    int64_t wall_ms "hc_wall_ms" () noexcept nogil
    # Timestamps stay below 2**63 so that they survive any signed 64-bit path
    # (msgpack in other languages, SQL, JSON numbers): physical time up to the
    # year 6400 or so.
    const uint64_t MAX_TS "HC_MAX_TS"

# Bits of the logical counter; the physical milliseconds are ts >> COUNTER_BITS.
cdef enum:
    COUNTER_BITS = 16


cdef inline uint64_t ts_ms(uint64_t ts) noexcept nogil:
    return ts >> COUNTER_BITS


cdef inline bint newer(uint64_t ts_a, uint32_t origin_a,
                       uint64_t ts_b, uint32_t origin_b) noexcept nogil:
    # Is version a strictly newer than version b? Equal versions are the same
    # write (a replay), so "not newer" makes applying it again a no-op.
    return ts_a > ts_b or (ts_a == ts_b and origin_a > origin_b)


cdef class HLC:
    # Last timestamp handed out or observed; every new one is strictly greater.
    cdef uint64_t latest
    cdef readonly uint32_t tag
    # Python callable returning wall ms, or None for the C clock.
    cdef object clock
    # How far (ms) a remote timestamp may run ahead of our wall clock; -1 = no bound.
    cdef readonly int64_t max_skew_ms

    cdef int64_t read_clock(self) except? -1
    cdef uint64_t tick(self) except? 0
    cdef uint64_t observe(self, uint64_t remote) except? 0
    cdef uint64_t horizon(self) except? 0
