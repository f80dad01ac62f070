"""Hinted handoff: keep the writes an owner missed and replay them when it is back.

The coordinator calls :meth:`Handoff.hint` whenever an owner misses a write or a
delete (down, timed out, failed, refused). The hint goes into the node's
:class:`~hypercache._core.hints.HintBuffer`: a FIFO per target node, bounded by a
per-node count, a global count, a global byte size and a TTL. Queuing never blocks
and never fails: at a cap the buffer drops a hint and counts the drop (which one is
the buffer's documented rule); anti-entropy repairs what was dropped.

One replay loop per node (:meth:`Handoff._loop`) ticks every
:data:`TICK` seconds, and at once when a peer comes back up. On each tick it
expires old hints (bounded work) and, for every target that has hints, is up in
the membership, is not backing off and has no replay running, starts a replay task
for it. A replay task sends the target's hints in FIFO order, in batches of
``hint_replay_batch``, with ``R_PUT_MANY [entries, 0]``; the target applies each
entry newer-version-wins, so a replayed hint never overwrites a newer write and a
replay that is repeated (its answer was lost) is harmless. A batch that fails goes
back to the front of the queue and the target backs off exponentially
(:data:`BACKOFF_MIN` doubling to :data:`BACKOFF_MAX`); a success resets the backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Protocol, TypeAlias

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hypercache.errors import HyperCacheError
from hypercache.net.protocol import Op
from hypercache.observe import tracing
from hypercache.observe.logs import RateLimiter
from hypercache.replication import KeyedEntry, wall_ms

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "TICK", "Handoff", "HintBufferLike"]

_log = logging.getLogger("hypercache.handoff")
_limited = RateLimiter(60.0)

_R_PUT_MANY: Final = int(Op.R_PUT_MANY)

#: Period of the replay loop, seconds.
TICK: Final = 0.2
#: Backoff of a target after a failed batch: doubles from MIN up to MAX seconds.
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 10.0
#: Hints expired per tick, at most.
EXPIRE_BUDGET: Final = 100_000


#: A hint is a keyed entry, as queued and replayed (``R_PUT``'s shape).
Hint: TypeAlias = KeyedEntry


class HintBufferLike(Protocol):
    """What the handoff loop uses of :class:`~hypercache._core.hints.HintBuffer`."""

    def enqueue(
        self,
        target: str,
        key: bytes,
        value: bytes,
        ts: int,
        origin: int,
        expire_at_ms: int,
        tombstone: bool,
        now_ms: int,
    ) -> bool: ...

    def dequeue_batch(self, target: str, max_count: int, now_ms: int) -> list[Hint]: ...

    def requeue_front(self, target: str, batch: Iterable[Hint]) -> int: ...

    def pending(self, target: str) -> int: ...

    def targets(self) -> list[str]: ...

    def drop_target(self, target: str) -> int: ...

    def expire(self, now_ms: int, budget: int) -> int: ...

    def stats(self) -> dict[str, int]: ...


class _Peer(Protocol):
    up: bool

    async def request(self, op: int, payload: Any, timeout: float) -> Any: ...


class Handoff:
    """Hint buffer of one node and its replay loop (see the module docstring).

    :param buffer: the hint buffer.
    :param peers: ``() -> {node_id: peer}`` of the current peers.
    :param batch: hints per ``R_PUT_MANY``.
    :param timeout: deadline of one replay request.
    """

    def __init__(
        self,
        *,
        buffer: HintBufferLike,
        peers: Callable[[], dict[str, _Peer]],
        batch: int,
        timeout: float,
        batch_bytes: int = 4 << 20,
    ) -> None:
        self.buffer = buffer
        self._peers = peers
        self.batch = batch
        #: what one R_PUT_MANY may carry (keys and values), so that a batch of big
        #: hints never exceeds the frame limit and blocks its target for good
        self.batch_bytes = batch_bytes
        self.timeout = timeout
        #: hints delivered (acknowledged by the target, applied or not)
        self.replayed = 0
        #: of those, applied by the target (the others it held newer)
        self.replayed_applied = 0
        #: replay batches that failed (requeued)
        self.replay_failures = 0
        self._active: dict[str, asyncio.Task[None]] = {}
        self._backoff: dict[str, float] = {}
        self._retry_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # --------------------------------------------------------------- queueing

    def hint(
        self,
        target: str,
        key: bytes,
        value: bytes,
        ts: int,
        origin: int,
        expire_at: int,
        tombstone: bool,
    ) -> None:
        """Queue what ``target`` missed; never blocks (a full buffer drops, counted)."""
        # False only for a hint larger than the byte cap (counted as dropped_oversize).
        self.buffer.enqueue(target, key, value, ts, origin, expire_at, tombstone, wall_ms())

    def forget(self, target: str) -> int:
        """Drop every hint for ``target`` (it left the cluster or was removed: it
        will never take them); return how many (counted in ``dropped_target``)."""
        dropped = self.buffer.drop_target(target)
        if dropped:
            _log.info("dropped %d hints for %s: out of the cluster", dropped, target)
        return dropped

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="hypercache-handoff")

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._task, *self._active.values()) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._active.clear()

    def wake(self, target: str | None = None) -> None:
        """Replay now (a peer came back up): forget its backoff and tick at once."""
        if target is not None:
            self._backoff.pop(target, None)
            self._retry_at.pop(target, None)
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._wake.wait()
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # a bug must not kill the loop; it is logged
                _log.exception("hint replay tick failed")

    def tick(self) -> None:
        """Expire old hints and start a replay for every target ready for one."""
        buffer = self.buffer
        buffer.expire(wall_ms(), EXPIRE_BUDGET)
        peers = self._peers()
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        for target in buffer.targets():
            if target in self._active or buffer.pending(target) == 0:
                continue
            peer = peers.get(target)
            if peer is None or not peer.up or now < self._retry_at.get(target, 0.0):
                continue
            task = loop.create_task(self._replay(target, peer), name=f"hypercache-hints-{target}")
            self._active[target] = task
            task.add_done_callback(self._replay_done)

    def _replay_done(self, task: asyncio.Task[None]) -> None:
        for target, active in list(self._active.items()):
            if active is task:
                del self._active[target]
        if not task.cancelled() and task.exception() is not None:
            _log.error("hint replay failed", exc_info=task.exception())

    async def _replay(self, target: str, peer: _Peer) -> None:
        buffer = self.buffer
        while not self._stopping and peer.up:
            batch = buffer.dequeue_batch(target, self.batch, wall_ms())
            if not batch:
                return
            batch = self._within_bytes(target, batch)
            entries = [list(hint) for hint in batch]
            # Its R_PUT_MANY carries the span: the target's ReplicaApply is its child.
            with tracing.span(
                "HintReplay", {tracing.ATTR_PEER: target, tracing.ATTR_COUNT: len(entries)}
            ) as span:
                try:
                    applied = await peer.request(_R_PUT_MANY, [entries, 0], self.timeout)
                except asyncio.CancelledError:
                    buffer.requeue_front(target, batch)
                    raise
                except (HyperCacheError, OSError) as exc:
                    tracing.failed(span, exc)
                    buffer.requeue_front(target, batch)
                    self.replay_failures += 1
                    backoff = min(self._backoff.get(target, BACKOFF_MIN / 2) * 2, BACKOFF_MAX)
                    self._backoff[target] = backoff
                    self._retry_at[target] = time.monotonic() + backoff
                    # A dead target fails every backoff: one line per target a minute.
                    _limited.log(
                        _log,
                        logging.INFO,
                        target,
                        "hint replay to %s failed (%s); %d waiting, retry in %.2fs",
                        target,
                        exc,
                        buffer.pending(target),
                        backoff,
                        extra={"op": "hint_replay", "peer": target, "error": str(exc)},
                    )
                    return
                if type(applied) is int:
                    tracing.annotate(span, tracing.ATTR_APPLIED, applied)
            self._backoff.pop(target, None)
            self._retry_at.pop(target, None)
            self.replayed += len(batch)
            if type(applied) is int:
                self.replayed_applied += applied

    def _within_bytes(self, target: str, batch: list[Any]) -> list[Any]:
        """The longest prefix of ``batch`` within ``batch_bytes`` (at least one hint;
        one hint always fits a frame); the rest goes back to the front, in order."""
        size = 0
        for i, hint in enumerate(batch):
            size += len(hint[0]) + len(hint[1])
            if size > self.batch_bytes and i:
                self.buffer.requeue_front(target, batch[i:])
                return batch[:i]
        return batch

    # ---------------------------------------------------------------- metrics

    def pending(self) -> dict[str, int]:
        """Hints waiting, per target (targets with none left out)."""
        buffer = self.buffer
        out = {}
        for target in buffer.targets():
            n = buffer.pending(target)
            if n:
                out[target] = n
        return out

    def as_dict(self) -> dict[str, Any]:
        """What ``GET /dist/hints`` shows: ``queued`` is the number waiting now."""
        pending = self.pending()
        stats = self.buffer.stats()
        dropped = {
            cap: stats[f"dropped_{cap}"]
            for cap in ("node_cap", "total_cap", "bytes_cap", "oversize", "target")
        }
        return {
            "queued": sum(pending.values()),
            "pending": pending,
            "bytes": stats["bytes"],
            "max_bytes": stats["max_bytes"],
            "enqueued": stats["queued_total"],
            "replayed": self.replayed,
            "replayed_applied": self.replayed_applied,
            "replay_failures": self.replay_failures,
            "expired": stats["expired"],
            "superseded": stats["superseded"],
            "dropped": dropped,
            "dropped_total": sum(dropped.values()),
            "caps": {
                "max_per_node": stats["max_per_node"],
                "max_total": stats["max_total"],
                "max_bytes": stats["max_bytes"],
                "ttl_ms": stats["ttl_ms"],
            },
        }

    def collect(self) -> Iterator[Metric]:
        stats = self.buffer.stats()
        pending = self.pending()
        yield GaugeMetricFamily(
            "hypercache_dist_hints_queued", "Hints waiting for replay.", value=sum(pending.values())
        )
        fam = GaugeMetricFamily(
            "hypercache_dist_hints_pending", "Hints waiting, per target.", labels=["target"]
        )
        for target, n in sorted(pending.items()):
            fam.add_metric([target], n)
        yield fam
        yield GaugeMetricFamily(
            "hypercache_dist_hints_bytes", "Bytes charged to queued hints.", value=stats["bytes"]
        )
        yield GaugeMetricFamily(
            "hypercache_dist_hints_max_bytes",
            "Byte cap of the hint buffer.",
            value=stats["max_bytes"],
        )
        for name, doc, value in (
            ("enqueued", "Hints accepted by the buffer.", stats["queued_total"]),
            ("replayed", "Hints delivered to their target.", self.replayed),
            (
                "replay_failures",
                "Replay batches that failed and were requeued.",
                self.replay_failures,
            ),
            ("expired", "Hints dropped by their TTL.", stats["expired"]),
            ("superseded", "Hints replaced by a newer one for the same key.", stats["superseded"]),
        ):
            yield CounterMetricFamily(f"hypercache_dist_hints_{name}", doc, value=value)
        dropped = CounterMetricFamily(
            "hypercache_dist_hints_dropped", "Hints dropped by a cap.", labels=["cap"]
        )
        for cap in ("node_cap", "total_cap", "bytes_cap", "oversize", "target"):
            dropped.add_metric([cap], stats[f"dropped_{cap}"])
        yield dropped
