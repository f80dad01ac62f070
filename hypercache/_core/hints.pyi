"""Hint buffers of hinted handoff.

When an owner misses a write or a delete (down, timed out, refused), the coordinator
queues a *hint* for it here; the replay loop of that target later pops hints in
batches and delivers them, and the target applies them newer-version-wins. A hint is
``(target, key, value, ts, origin, expire_at_ms, tombstone)`` plus the wall-clock ms
it was queued at. Time is always passed in as ``now_ms``, wall-clock milliseconds
(e.g. :func:`~hypercache.cluster.coordinator.wall_ms`), the clock of the versions'
``ts >> 16``: the buffer never reads a clock, so tests drive it freely.

Rules:

* **FIFO per target.** Each target's hints come out in the order they were queued.
  :meth:`HintBuffer.enqueue` and the per-hint cost of :meth:`~HintBuffer.dequeue_batch`
  are O(1), plus O(log T) when a target's oldest hint changes (T: targets with hints).
* **One hint per key.** A hint for a ``(target, key)`` that already has one keeps only
  the newer version (``(ts, origin)``, see :mod:`hypercache._core.hlc`); the loser is
  counted in ``superseded``. A newer hint replaces the queued one and goes to the
  tail, its age counted from now; one that is not newer is dropped on arrival. Replay
  then sends each key once, in its newest version.
* **TTL.** A hint is expired once ``now_ms >= queued_at + ttl_ms``. Expired hints are
  never handed out: :meth:`~HintBuffer.dequeue_batch` skips and drops them, and
  :meth:`~HintBuffer.expire` drops them in bulk at a cost proportional to the number
  dropped. Until then they still count in ``len``, ``bytes`` and ``pending``. The hint
  TTL is what the tombstone rule counts on (``tombstone_ttl > hint_ttl +
  anti-entropy period``), so nothing here ever makes a hint younger than it is.
* **Caps never block the writer.** ``len <= max_total``, ``bytes <= max_bytes`` and
  every ``pending(t) <= max_per_node`` hold at all times. A hint that would break a
  cap is queued anyway and an *older* hint makes room, counted per cap:

  - ``max_per_node``: the oldest hint of the same target goes (``dropped_node_cap``);
  - ``max_total``: the oldest hint in the whole buffer goes (``dropped_total_cap``);
  - ``max_bytes``: oldest hints in the whole buffer go until the new one fits
    (``dropped_bytes_cap``).

  The buffer thus keeps the newest hints of every target: a short outage keeps all of
  its hints while a long one loses its oldest, which anti-entropy repairs. The only
  hint ever refused is one larger than ``max_bytes`` on its own
  (``dropped_oversize``).
* **Bytes.** A hint costs ``len(key) + len(value) + HINT_OVERHEAD`` bytes.
* **Conservation.** ``queued_total + requeued == len + dequeued + expired +
  superseded + dropped_node_cap + dropped_total_cap + dropped_bytes_cap +
  dropped_target``; ``dropped_oversize`` counts the hints refused outright.
"""

from collections.abc import Iterable
from typing import TypeAlias, final

from hypercache.replication import KeyedEntry

# ``HintBuffer.bytes`` (a counter) shadows the builtin inside the class.
_Bytes: TypeAlias = bytes

#: ``(key, value, ts, origin, expire_at_ms, tombstone)``, as dequeue_batch returns it.
_HintTuple: TypeAlias = KeyedEntry

#: Fixed per-hint cost added to ``len(key) + len(value)`` in the byte cap: the
#: buffer's own structures (about 150 B per hint, measured) plus the headers of the
#: key and value objects, which the buffer usually ends up owning alone.
HINT_OVERHEAD: int
#: Upper bound of ``max_total`` and ``max_per_node``: ``2**31 - 1``.
MAX_HINTS: int
#: Upper bound of ``max_bytes``: ``2**62``.
MAX_BYTES: int
#: Upper bound of ``ttl_ms``: ``2**40`` (about 35 years).
MAX_TTL_MS: int

@final
class HintBuffer:
    """The hints a node holds for the owners that missed writes, one FIFO per target.

    :param max_per_node: most hints queued for one target, from 1 to ``max_total``.
    :param max_total: most hints queued in all, from 1 to :data:`MAX_HINTS`.
    :param max_bytes: most bytes of hints (see :data:`HINT_OVERHEAD`), from 1 to
        :data:`MAX_BYTES`.
    :param ttl_ms: how long a hint is kept after it was queued, from 1 to
        :data:`MAX_TTL_MS`.
    :raises hypercache.errors.ConfigError: an argument is invalid; ``field`` names it.
    """

    max_per_node: int
    max_total: int
    max_bytes: int
    ttl_ms: int
    #: Bytes charged for the queued hints.
    bytes: int
    #: Hints accepted by :meth:`enqueue` (every call but oversize ones).
    queued_total: int
    #: Hints taken back by :meth:`requeue_front` (all but oversize ones).
    requeued: int
    #: Hints handed out by :meth:`dequeue_batch`.
    dequeued: int
    #: Hints dropped for their TTL (by :meth:`dequeue_batch` or :meth:`expire`).
    expired: int
    #: Hints made redundant by a newer version for the same target and key (the
    #: older one, whether it was queued or arriving).
    superseded: int
    #: Hints dropped at ``max_per_node`` (the oldest of their target).
    dropped_node_cap: int
    #: Hints dropped at ``max_total`` (the oldest in the buffer).
    dropped_total_cap: int
    #: Hints dropped at ``max_bytes`` (the oldest in the buffer).
    dropped_bytes_cap: int
    #: Hints refused because they alone exceed ``max_bytes``.
    dropped_oversize: int
    #: Hints dropped by :meth:`drop_target` and :meth:`clear`.
    dropped_target: int
    #: Diagnostic: records linked or unlinked and heap levels walked so far. Tests
    #: use it to check the cost of an operation by counting instead of timing.
    work: int

    def __init__(
        self, *, max_per_node: int, max_total: int, max_bytes: int, ttl_ms: int
    ) -> None: ...
    def enqueue(
        self,
        target: str,
        key: _Bytes,
        value: _Bytes,
        ts: int,
        origin: int,
        expire_at_ms: int,
        tombstone: bool,
        now_ms: int,
    ) -> bool:
        """Queue a hint for ``target``: the write ``key -> value`` (or, with
        ``tombstone=True``, the delete of ``key``) at version ``(ts, origin)``.

        Never blocks and never fails for lack of room: at a cap an older hint is
        dropped instead (see the module rules).

        :param ts: the version's HLC timestamp, ``0 <= ts < 2**64``.
        :param origin: the version's 32-bit origin tag.
        :param expire_at_ms: the entry's absolute expiry (wall ms, 0 = never); carried
            to the target as is, it plays no part in the hint's own TTL.
        :param now_ms: wall-clock ms; the hint's age counts from here (or from the
            target's newest hint, if the clock stepped back).
        :returns: True when the hint is queued; False when it was dropped at once:
            larger than ``max_bytes`` alone (``dropped_oversize``), or not newer than
            the hint already queued for that target and key (``superseded``).
        :raises TypeError: ``target`` is not a str, ``key`` or ``value`` not bytes.
        :raises OverflowError: ``ts``, ``origin`` or a time does not fit its C type.
        """

    def dequeue_batch(self, target: str, max_count: int, now_ms: int) -> list[_HintTuple]:
        """Pop up to ``max_count`` hints of ``target``, oldest first.

        Expired hints met on the way are dropped (``expired``) and do not count
        toward ``max_count``. The returned hints' ages are remembered until the next
        ``dequeue_batch`` for the target, for :meth:`requeue_front`.

        :returns: ``(key, value, ts, origin, expire_at_ms, tombstone)`` tuples; an
            empty list when the target has nothing live (or is unknown).
        :raises hypercache.errors.ConfigError: ``max_count`` is negative.
        """

    def peek(
        self, target: str, max_count: int, now_ms: int
    ) -> list[tuple[_Bytes, _Bytes, int, int, int, bool, int]]:
        """The next ``max_count`` hints of ``target``, as :meth:`dequeue_batch` would
        return them, plus each one's ``queued_at_ms``, without taking them.

        Expired hints at the head are dropped on the way (``expired``), like
        dequeue_batch does. Costs O(max_count + expired).

        :returns: ``(key, value, ts, origin, expire_at_ms, tombstone, queued_at_ms)``.
        :raises hypercache.errors.ConfigError: ``max_count`` is negative.
        """

    def requeue_front(self, target: str, batch: Iterable[_HintTuple]) -> int:
        """Put hints that could not be delivered back at the head of ``target``, in
        the same order, ahead of anything queued since.

        Meant for the undelivered hints of the target's last :meth:`dequeue_batch`
        (all of them, or any of them in their order), before the next
        ``dequeue_batch`` for it: they then keep their age exactly (the whole batch or
        a prefix of it) or come back slightly older (another subset), never younger,
        so a failing replay cannot extend a hint's life past its TTL. Hints beyond
        that batch are dated by their version's wall time (``ts >> 16``), which is
        never later than when they were queued.

        The usual rules apply: a key that has a newer hint queued meanwhile drops the
        requeued one (``superseded``); at a cap the oldest hint goes, which is the
        requeued one at ``max_per_node`` and whichever is older at the global caps.
        Hints already expired are dropped at the next dequeue or expire.

        :returns: how many hints were put back (the rest were dropped and counted).
        :raises TypeError: a key or value is not bytes, or a number not an int.
        :raises ValueError: an item does not unpack into six fields.
        :raises OverflowError: a number does not fit its C type.
        """

    def pending(self, target: str) -> int:
        """Hints queued for ``target`` (0 if unknown); expired ones not yet dropped
        are included."""

    def targets(self) -> list[str]:
        """The targets with at least one hint queued."""

    def drop_target(self, target: str) -> int:
        """Drop every hint of ``target`` (e.g. a node that left the cluster), counted
        in ``dropped_target``; returns how many."""

    def expire(self, now_ms: int, budget: int) -> int:
        """Drop up to ``budget`` expired hints; returns how many.

        Goes target by target, each time to the target holding the oldest hint, and
        drops its expired hints from the head. Costs O(dropped + targets visited x
        log T): beyond the expired hints it only looks at one live hint per target.

        :raises hypercache.errors.ConfigError: ``budget`` is negative.
        """

    def clear(self) -> None:
        """Drop every hint (counted in ``dropped_target``) and forget every target."""

    def __len__(self) -> int:
        """Hints queued in all (expired ones not yet dropped included)."""

    def stats(self) -> dict[str, int]:
        """Everything above as one dict, for metrics and ``GET /dist/hints``: ``queued``
        (hints waiting, ``len``), ``bytes``, ``targets`` (with hints), every counter,
        and the four limits."""
