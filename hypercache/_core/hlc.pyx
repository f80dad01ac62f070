"""Hybrid logical clock (physical ms << 16 | logical counter) and the version order."""

cimport cython
from libc.stdint cimport int64_t, uint32_t, uint64_t

from xxhash import xxh3_64_intdigest as _xxh3

from hypercache.errors import ClockSkewError, ConfigError

LOGICAL_BITS = COUNTER_BITS
MAX_TIMESTAMP = MAX_TS
# Largest physical time a clock may report: MAX_TS >> COUNTER_BITS.
cdef int64_t MAX_MS = <int64_t>(MAX_TS >> COUNTER_BITS)
# Largest max_skew_ms accepted: a year (a bound beyond it protects nothing).
MAX_SKEW_MS = 366 * 86_400_000


@cython.final
cdef class HLC:
    """Hybrid logical clock of one node; see hlc.pyi."""

    def __cinit__(self, node_tag, *, clock=None, max_skew_ms=None):
        if isinstance(node_tag, bool) or not isinstance(node_tag, int):
            raise ConfigError("node_tag", f"must be an int, got {type(node_tag).__name__}")
        if not 0 <= node_tag <= 0xFFFFFFFF:
            raise ConfigError("node_tag", f"must fit in 32 bits, got {node_tag}")
        if clock is not None and not callable(clock):
            raise ConfigError("clock", "must be a callable returning wall-clock ms, or None")
        if max_skew_ms is None:
            self.max_skew_ms = -1
        elif isinstance(max_skew_ms, bool) or not isinstance(max_skew_ms, int):
            raise ConfigError("max_skew_ms", f"must be an int or None, got {max_skew_ms!r}")
        elif not 0 < max_skew_ms <= MAX_SKEW_MS:
            raise ConfigError(
                "max_skew_ms", f"must be in 1..{MAX_SKEW_MS} (one year), got {max_skew_ms}"
            )
        else:
            self.max_skew_ms = max_skew_ms
        self.tag = <uint32_t>node_tag
        self.clock = clock
        self.latest = 0

    cdef int64_t read_clock(self) except? -1:
        cdef int64_t ms
        if self.clock is None:
            ms = wall_ms()
        else:
            value = self.clock()
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"clock must return an int (ms), got {type(value).__name__}")
            if value > MAX_MS:
                raise ValueError(f"clock returned {value} ms, beyond the timestamp range")
            ms = value
        # A clock before 1970 is nonsense; read it as 0 and let the counter carry on.
        return ms if ms > 0 else 0

    # Both operations reduce to one max over packed integers, because the packed
    # order IS the (physical, counter) lexicographic order:
    #   now:    max(pt << 16, last + 1)
    #   update: max(pt << 16, last + 1, remote + 1)
    # When the wall clock is ahead, the counter restarts at 0 on its millisecond.
    # Otherwise the counter of the newest timestamp seen goes up by one; from 0xFFFF
    # that +1 carries into the millisecond field: overflow borrows the next
    # millisecond, and the wall clock catches up with it later. A wall clock that
    # steps back therefore never makes time go back: the clock keeps counting from
    # ``last`` until the wall passes it again.

    cdef uint64_t tick(self) except? 0:
        cdef uint64_t cand = (<uint64_t>self.read_clock()) << COUNTER_BITS
        if cand <= self.latest:
            if self.latest >= MAX_TS - 1:
                raise OverflowError("hybrid logical clock exhausted its 63-bit range")
            cand = self.latest + 1
        self.latest = cand
        return cand

    # The horizon is the newest timestamp this clock accepts from elsewhere: the end
    # of the millisecond ``max_skew_ms`` ahead of the wall clock. Without it, one
    # forged or badly skewed version would drag this clock (and, through every
    # version it then stamps, the whole cluster's) into the future for good: a
    # timestamp near 2**63 exhausts the clock and stops every write; one a year
    # ahead wins over every later write for a year. A version past the horizon is
    # refused, never clamped: clamping would rewrite the version, and two replicas
    # would then disagree on which write is newer.

    cdef uint64_t horizon(self) except? 0:
        cdef int64_t ms
        if self.max_skew_ms < 0:
            return MAX_TS - 2
        ms = self.read_clock() + self.max_skew_ms
        if ms >= MAX_MS:
            return MAX_TS - 2
        return ((<uint64_t>ms) << COUNTER_BITS) | 0xFFFF

    cdef uint64_t observe(self, uint64_t remote) except? 0:
        if remote >= MAX_TS - 1:
            raise ValueError(f"remote timestamp {remote} out of range")
        if self.max_skew_ms >= 0 and remote > self.horizon():
            raise ClockSkewError(self._skew_message(remote))
        cdef uint64_t cand = (<uint64_t>self.read_clock()) << COUNTER_BITS
        cdef uint64_t seen = self.latest if self.latest > remote else remote
        if cand <= seen:
            if seen >= MAX_TS - 1:
                raise OverflowError("hybrid logical clock exhausted its 63-bit range")
            cand = seen + 1
        self.latest = cand
        return cand

    def _skew_message(self, uint64_t remote):
        ahead = <int64_t>(remote >> COUNTER_BITS) - self.read_clock()
        return (f"version {remote} is {ahead} ms ahead of this node's clock, more than "
                f"max_clock_skew ({self.max_skew_ms} ms) allows")

    def now(self):
        return self.tick()

    def admits(self, remote_ts):
        if isinstance(remote_ts, bool) or not isinstance(remote_ts, int) or remote_ts < 0:
            return False
        if remote_ts >= MAX_TS - 1:
            return False
        return self.max_skew_ms < 0 or <uint64_t>remote_ts <= self.horizon()

    def check(self, remote_ts):
        if not self.admits(remote_ts):
            if isinstance(remote_ts, int) and 0 <= remote_ts < MAX_TS - 1:
                raise ClockSkewError(self._skew_message(<uint64_t>remote_ts))
            raise ValueError(f"remote timestamp {remote_ts!r} out of range")

    @property
    def horizon_ts(self):
        return self.horizon()

    def update(self, remote_ts):
        if isinstance(remote_ts, bool) or not isinstance(remote_ts, int) or remote_ts < 0:
            raise ValueError(f"remote timestamp must be a non-negative int, got {remote_ts!r}")
        if remote_ts >= MAX_TS - 1:
            raise ValueError(f"remote timestamp {remote_ts} out of range")
        return self.observe(<uint64_t>remote_ts)

    @property
    def last(self):
        return self.latest

    @property
    def drift_ms(self):
        return <int64_t>(self.latest >> COUNTER_BITS) - self.read_clock()

    def __repr__(self):
        return (f"HLC(tag={self.tag:#010x}, last={self.latest >> COUNTER_BITS}ms"
                f"+{self.latest & 0xFFFF})")


def node_tag(node_id):
    if not isinstance(node_id, str):
        raise TypeError(f"node id must be str, got {type(node_id).__name__}")
    return _xxh3(node_id.encode("utf-8")) & 0xFFFFFFFF


def version_newer(uint64_t ts_a, uint32_t origin_a, uint64_t ts_b, uint32_t origin_b):
    return newer(ts_a, origin_a, ts_b, origin_b)


def compare_versions(uint64_t ts_a, uint32_t origin_a, uint64_t ts_b, uint32_t origin_b):
    if newer(ts_a, origin_a, ts_b, origin_b):
        return 1
    if newer(ts_b, origin_b, ts_a, origin_a):
        return -1
    return 0


def make_ts(uint64_t ms, uint32_t logical=0):
    if ms > <uint64_t>MAX_MS or logical > 0xFFFF:
        raise ValueError("ms or logical counter out of range")
    return (ms << COUNTER_BITS) | logical


def ts_physical(uint64_t ts):
    return ts >> COUNTER_BITS


def ts_logical(uint64_t ts):
    return ts & 0xFFFF


def wall_clock_ms():
    return wall_ms()
