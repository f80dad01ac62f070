"""Hybrid logical clock and the version order of the cluster.

A **timestamp** is a 64-bit unsigned integer::

    ts = (wall_clock_ms << 16) | logical_counter      (ts < 2**63)

so comparing two timestamps as integers compares physical time first, then the
counter. A **version** is the pair ``(ts, origin)``, ``origin`` being the 32-bit
:func:`node_tag` of the node that issued ``ts``. Versions are ordered
lexicographically: by ``ts``, then by ``origin``. The order is total, so replicas,
read repair, hinted handoff, migration and anti-entropy all agree on which of two
writes wins (the newer one), and two writes with equal versions are the same write.

Clock rules (:class:`HLC`):

* ``now()`` returns ``max(wall_ms << 16, last + 1)``: strictly increasing, even when
  the wall clock steps back (the counter then runs on from the last timestamp).
* ``update(remote)`` returns ``max(wall_ms << 16, last + 1, remote + 1)``, so every
  later local timestamp is newer than every version received.
* The counter has 16 bits. Past ``0xFFFF`` within one millisecond the ``+ 1``
  carries into the millisecond field: the clock borrows the next millisecond and
  the wall clock catches up with it.
"""

from collections.abc import Callable

#: Bits of the logical counter: ``ts >> LOGICAL_BITS`` is wall-clock ms.
LOGICAL_BITS: int
#: Exclusive bound of timestamps: ``2**63 - 1``.
MAX_TIMESTAMP: int
#: Largest ``max_skew_ms`` accepted (366 days).
MAX_SKEW_MS: int

class HLC:
    """Hybrid logical clock of one node.

    :param node_tag: this node's 32-bit origin tag, usually ``node_tag(node_id)``;
        kept as :attr:`tag` for building versions.
    :param clock: callable returning wall-clock milliseconds since the Unix epoch;
        by default ``clock_gettime(CLOCK_REALTIME)`` read from C. Injectable for
        tests. A clock that goes backwards never makes timestamps go backwards.
    :param max_skew_ms: how far ahead of the wall clock a timestamp received from
        elsewhere may be, in ms (the node's ``max_clock_skew``); ``None``: no bound.
        The *horizon* is the last timestamp of the millisecond ``wall + max_skew_ms``;
        :meth:`update` refuses a timestamp past it (the clock never moves there), and
        :meth:`admits` / :meth:`check` test one without moving the clock.
    :raises hypercache.errors.ConfigError: ``node_tag`` does not fit in 32 bits,
        ``clock`` is not callable, or ``max_skew_ms`` is not in ``1..MAX_SKEW_MS``.
    """

    #: The origin tag given to the constructor.
    tag: int
    #: The bound given to the constructor; ``-1`` when there is none.
    max_skew_ms: int

    def __init__(
        self,
        node_tag: int,
        *,
        clock: Callable[[], int] | None = None,
        max_skew_ms: int | None = None,
    ) -> None: ...
    def now(self) -> int:
        """A new timestamp, greater than every one returned or observed before.

        :raises OverflowError: the clock reached ``2**63`` (not in this millennium).
        """

    def update(self, remote_ts: int) -> int:
        """Observe a timestamp received from another node; returns a new local
        timestamp greater than both ``remote_ts`` and every earlier one.

        :raises ValueError: ``remote_ts`` is negative or not below ``2**63 - 1``.
        :raises hypercache.errors.ClockSkewError: ``remote_ts`` is past the horizon
            (the clock is left as it was).
        """

    def admits(self, remote_ts: object) -> bool:
        """Whether ``remote_ts`` is a timestamp :meth:`update` would accept now (an
        int in range, not past the horizon). Never raises, never moves the clock."""

    def check(self, remote_ts: int) -> None:
        """Raise what :meth:`update` would raise for ``remote_ts``, without moving the clock.

        :raises hypercache.errors.ClockSkewError: past the horizon.
        :raises ValueError: not a timestamp.
        """

    @property
    def horizon_ts(self) -> int:
        """The newest timestamp accepted from elsewhere right now."""

    @property
    def last(self) -> int:
        """The last timestamp returned (0 before the first); does not tick."""

    @property
    def drift_ms(self) -> int:
        """How far the logical clock runs ahead of the wall clock, in ms (negative
        when the wall clock is ahead, the normal state). A large positive value means
        some node's clock, or a remote timestamp, is in the future: worth a metric."""

def node_tag(node_id: str) -> int:
    """Origin tag of a node: the low 32 bits of ``xxh3_64(node_id.encode("utf-8"))``.

    Stable across processes, versions and platforms; two ids sharing a tag only
    weaken the tie-break between writes issued in the same timestamp.
    """

def version_newer(ts_a: int, origin_a: int, ts_b: int, origin_b: int) -> bool:
    """Is version ``(ts_a, origin_a)`` strictly newer than ``(ts_b, origin_b)``?
    Lexicographic: ``ts`` first, then ``origin``. Equal versions are not newer."""

def compare_versions(ts_a: int, origin_a: int, ts_b: int, origin_b: int) -> int:
    """``1`` if version a is newer, ``-1`` if b is, ``0`` if they are equal."""

def make_ts(ms: int, logical: int = 0) -> int:
    """Pack wall-clock ``ms`` and a ``logical`` counter (``0..0xFFFF``) into a timestamp."""

def ts_physical(ts: int) -> int:
    """Wall-clock milliseconds of a timestamp: ``ts >> 16``."""

def ts_logical(ts: int) -> int:
    """Logical counter of a timestamp: ``ts & 0xFFFF``."""

def wall_clock_ms() -> int:
    """The C wall clock that :class:`HLC` reads by default, in ms since the epoch;
    pass it as ``now_ms`` to :class:`~hypercache._core.vstore.VersionedStore`."""
