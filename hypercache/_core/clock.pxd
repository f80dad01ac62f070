# Clocks read from C, shared by every extension that needs time.
#
# The embedded cache reads CLOCK_MONOTONIC_COARSE: a vDSO read of the kernel's
# tick-resolution clock (1-4 ms on Linux), several times cheaper than the fine
# clock, and a TTL finer than a tick is not a promise a cache should make. It is
# read only when an entry has a TTL.

from libc.stdint cimport int64_t

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    ctypedef int clockid_t
    int clock_gettime(clockid_t clk, timespec* tp)
    clockid_t CLOCK_MONOTONIC
    clockid_t CLOCK_REALTIME

cdef extern from *:
    """
    #ifdef CLOCK_MONOTONIC_COARSE
    #define HC_CLOCK_COARSE CLOCK_MONOTONIC_COARSE
    #else
    #define HC_CLOCK_COARSE CLOCK_MONOTONIC
    #endif
    """
    clockid_t HC_CLOCK_COARSE


cdef inline int64_t coarse_monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(HC_CLOCK_COARSE, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int64_t wall_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000
