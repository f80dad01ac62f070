"""Convergence benchmarks: hinted-handoff replay rate and Merkle anti-entropy cost.
Run with ``python -m bench.convergence_report``.

``hints``  Three real ``hypercache-node`` processes (uvloop, TCP on 127.0.0.1, free
           ports). One is SIGKILLed; once the other two see it down, ``keys`` QUORUM
           SETs are sent, split between the two live nodes (each coordinates its half,
           writes its own replica and one remote one, and queues a hint for the dead
           node). The dead node is started again, empty, with its id and addresses.
           The replay is timed from the moment every node reports all three members up
           on ``/health`` ("target healthy") to the moment ``GET /dist/hints`` shows
           ``queued == 0`` on every node; ``/dist/hints`` is polled every
           :data:`POLL` seconds on every node. The rate is hints delivered over that
           time. Two more conservative rates count from the restarted process's ready
           line (its peers can see it up a few ms earlier: it listens before it prints)
           and from its spawn (interpreter start-up included: an upper bound).
           Anti-entropy is pushed out (interval 600 s) so that only hints carry the
           data; afterwards the restarted node must hold every key.

``ae``     Two :class:`~hypercache.cluster.node.Node` objects in this process, on the
           TCP transport (real loopback sockets, msgpack frames), default settings
           (4096 partitions, 64 sub-buckets, anti-entropy interval 30 s). Before they
           start, each store is filled directly through ``VersionedStore.apply`` - a
           test-only path, 1,000,000 entries per node in seconds instead of minutes
           over the wire - with ``divergent`` differences in four equal kinds: a newer
           version on A, a newer version on B, a key only A holds, a key only B holds.
           Once the two see each other, both anti-entropy loops are woken as their
           interval timer would (``wake(now=True)``) and left to run; the time to
           converge is from that wake to the moment every partition digest is equal on
           both nodes (polled every :data:`POLL` s), and every divergent key is then
           checked on both sides. Bytes exchanged are the loops' own counters
           (``bytes_sent + bytes_received`` of both nodes: msgpack payload bytes of
           every anti-entropy request and answer), broken down per operation by
           wrapping the loop's request method. They are set against the size of the
           divergent entries themselves: the sum over the winning versions of
           ``len(key) + len(value) + 12`` (8-byte ts, 4-byte origin).
"""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from hypercache._core.hlc import wall_clock_ms
from hypercache.cluster.config import DistConfig
from hypercache.cluster.local import ProcessCluster, until, wait_for
from hypercache.cluster.node import Node
from hypercache.net.protocol import Op

__all__ = [
    "AEResult",
    "HintResult",
    "anti_entropy",
    "hint_replay",
]

#: Seconds between two polls of a condition.
POLL: Final = 0.02
START_TIMEOUT: Final = 30.0

#: Node flags of the hint benchmark: fast failure detection, anti-entropy out of the way.
HINT_FLAGS: Final = (
    "--heartbeat-interval", "0.2", "--failure-timeout", "1", "--seed-retry-interval", "0.2",
    "--request-timeout", "5", "--anti-entropy-interval", "600",
    "--anti-entropy-max-interval", "600", "--log-level", "warning",
)  # fmt: skip

_OP_NAMES: Final = {int(op): op.name for op in (Op.MERKLE, Op.KEYS, Op.PULL, Op.R_PUT_MANY)}


# -- hinted handoff ---------------------------------------------------------------------


@dataclass
class HintResult:
    keys: int
    hints_queued: int
    seconds_healthy: float
    seconds_ready: float
    seconds_spawn: float
    write_seconds: float
    restarted_keys: int
    replay_batch: int = 512

    @property
    def rate_healthy(self) -> float:
        return self.hints_queued / self.seconds_healthy

    @property
    def rate_ready(self) -> float:
        return self.hints_queued / self.seconds_ready

    @property
    def rate_spawn(self) -> float:
        return self.hints_queued / self.seconds_spawn


def hint_replay(keys: int, value_size: int = 100, *, progress: Callable[[str], None]) -> HintResult:
    """Time the replay of ``keys`` hints to a restarted node (see the module docstring)."""
    with (
        tempfile.TemporaryDirectory(prefix="hc-bench-hints-") as tmp,
        ProcessCluster(3, Path(tmp), HINT_FLAGS, timeout=START_TIMEOUT) as cluster,
    ):
        live, dead = cluster.nodes[:2], cluster[2]
        cluster.kill(2)  # SIGKILL; returns once the other two see it down
        value = os.urandom(value_size)
        progress(f"hints: writing {keys:,} keys at QUORUM with node-3 down")
        start = time.perf_counter()
        conns = [node.connect(timeout=30) for node in live]
        try:
            for lo in range(0, keys, 2000):
                chunk = [f"hint:{i:08d}".encode() for i in range(lo, min(lo + 2000, keys))]
                conn = conns[(lo // 2000) % 2]
                answers = conn.pipeline([(Op.SET, [k, value, None, "quorum"]) for k in chunk], 60)
                if answers != [True] * len(chunk):
                    raise RuntimeError("a QUORUM write failed")
        finally:
            for conn in conns:
                conn.close()
        write_seconds = time.perf_counter() - start
        queued = sum(node.http_json("/dist/hints")["queued"] for node in live)
        if queued != keys:
            raise RuntimeError(f"{queued} hints queued for {keys} writes")
        progress(f"hints: {queued:,} queued; restarting node-3")
        t_spawn = time.perf_counter()
        cluster.respawn(2)  # empty, with its id and addresses
        dead.wait_ready(START_TIMEOUT, interval=POLL)
        t_ready = time.perf_counter()
        cluster.wait_healthy(interval=POLL)
        t_healthy = time.perf_counter()

        def drained() -> bool:
            # Nothing waiting, and every hint acknowledged by node-3 (a batch in
            # flight is no longer queued but not delivered yet).
            states = [node.http_json("/dist/hints") for node in cluster]
            return (
                all(s["queued"] == 0 for s in states) and sum(s["replayed"] for s in states) >= keys
            )

        wait_for(drained, timeout=300, interval=POLL, what="every hint replayed")
        t_done = time.perf_counter()
        held = int(dead.http_json("/stats")["keys"])
        if held != keys:
            raise RuntimeError(f"the restarted node holds {held} keys, not {keys}")
        return HintResult(
            keys=keys,
            hints_queued=queued,
            seconds_healthy=max(t_done - t_healthy, 1e-9),
            seconds_ready=t_done - t_ready,
            seconds_spawn=t_done - t_spawn,
            write_seconds=write_seconds,
            restarted_keys=held,
        )


# -- anti-entropy ---------------------------------------------------------------------


@dataclass
class AEResult:
    keys: int
    divergent: int
    value_size: int
    interval: float
    load_seconds: float
    converge_seconds: float
    rounds: int
    rounds_with_differences: int
    keys_moved: int
    divergent_bytes: int
    bytes_exchanged: int
    #: op name -> [requests, bytes sent, bytes received]
    by_op: dict[str, list[int]] = field(default_factory=dict)
    clean_round_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.bytes_exchanged / self.divergent_bytes


def _ae_config(name: str, seeds: tuple[str, ...] = ()) -> DistConfig:
    return DistConfig(
        node_id=name,
        bind="127.0.0.1:0",
        http=None,
        seeds=seeds,
        log_level="warning",
        heartbeat_interval=0.2,
        failure_timeout=2.0,
        seed_retry_interval=0.1,
        request_timeout=30.0,
    )


def _load(
    a: Node, b: Node, keys: int, divergent: int, value_size: int
) -> tuple[int, list[tuple[bytes, int, int]]]:
    """Fill both stores with ``keys`` entries each, ``divergent`` of them differing;
    return the divergent bytes and ``(key, ts, origin)`` of every winning version."""
    now = wall_clock_ms()
    ts_old = (now - 60_000) << 16
    ts_new = (now - 30_000) << 16
    origin_a, origin_b = 0x1A2B3C4D, 0x5E6F7081
    old = b"o" * value_size
    new = b"n" * value_size
    quarter = divergent // 4
    common = keys - quarter  # each node: the common keys and its own lone quarter
    apply_a = a.store.apply
    apply_b = b.store.apply
    for i in range(common):
        key = b"key:%08d" % i
        apply_a(key, old, ts_old, origin_a, 0, False, now)
        apply_b(key, old, ts_old, origin_a, 0, False, now)
    winners: list[tuple[bytes, int, int]] = []
    stride = max(common // (2 * quarter), 1)
    for j in range(quarter):
        for key, apply, origin in (
            (b"key:%08d" % (2 * j * stride), apply_a, origin_a),  # newer on A
            (b"key:%08d" % ((2 * j + 1) * stride), apply_b, origin_b),  # newer on B
            (b"only-a:%08d" % j, apply_a, origin_a),  # missing on B
            (b"only-b:%08d" % j, apply_b, origin_b),  # missing on A
        ):
            apply(key, new, ts_new, origin, 0, False, now)
            winners.append((key, ts_new, origin))
    size = sum(len(key) + value_size + 12 for key, _, _ in winners)
    return size, winners


def _digests(node: Node) -> list[int]:
    digest = node.store.digest
    return [digest(p) for p in range(node.store.partitions)]


def _instrument(node: Node, by_op: dict[str, list[int]]) -> None:
    """Count requests and bytes per operation (wraps the loop's request method)."""
    ae = node.antientropy
    assert ae is not None
    call = ae._call
    stats = ae.stats

    async def counted(peer: Any, op: int, payload: Any) -> Any:
        sent, received = stats.bytes_sent, stats.bytes_received
        try:
            return await call(peer, op, payload)
        finally:
            row = by_op.setdefault(_OP_NAMES.get(op, str(op)), [0, 0, 0])
            row[0] += 1
            row[1] += stats.bytes_sent - sent
            row[2] += stats.bytes_received - received

    ae._call = counted  # type: ignore[method-assign]


async def _anti_entropy(
    keys: int, divergent: int, value_size: int, progress: Callable[[str], None]
) -> AEResult:
    a = Node(_ae_config("ae-a"))
    b: Node | None = None
    try:
        await a.start()
        b = Node(_ae_config("ae-b", (a.address,)))
        progress(
            f"ae: loading {keys:,} keys per node, {divergent:,} divergent, {value_size} B values"
        )
        t0 = time.perf_counter()
        divergent_bytes, winners = _load(a, b, keys, divergent, value_size)
        load_seconds = time.perf_counter() - t0
        gc.collect()
        gc.freeze()  # millions of live objects: keep the collector from walking them
        await b.start()
        await until(
            lambda: len(a.members()) == len(b.members()) == 2 and _peers_up(a) and _peers_up(b),
            timeout=START_TIMEOUT,
            interval=POLL,
            what="the two nodes to see each other",
        )
        assert a.antientropy is not None and b.antientropy is not None
        loops = (a.antientropy, b.antientropy)
        interval = a.config.anti_entropy_interval
        by_op: dict[str, list[int]] = {}
        for node in (a, b):
            _instrument(node, by_op)
        if _digests(a) == _digests(b):
            raise RuntimeError("no divergence to repair")

        def exchanged() -> int:
            return sum(s.stats.bytes_sent + s.stats.bytes_received for s in loops)

        def moved() -> int:
            return sum(s.stats.keys_pulled + s.stats.keys_pushed for s in loops)

        before = exchanged()
        rounds_before = [s.stats.rounds for s in loops]
        progress("ae: waking both loops")
        start = time.perf_counter()
        for ae in loops:
            ae.wake(now=True)
        await until(
            lambda: _digests(a) == _digests(b),
            timeout=600,
            interval=POLL,
            what="anti-entropy to converge",
        )
        converge_seconds = time.perf_counter() - start
        # Let the rounds in flight finish (they find nothing more), then count.
        for ae in loops:
            async with ae._lock:
                pass
        total = exchanged() - before
        now = wall_clock_ms()
        for node in (a, b):
            for key, ts, origin in winners:
                got = node.store.peek(key, now)
                if got is None or got[1:3] != (ts, origin):
                    raise RuntimeError(f"{node.node_id}: {key!r} not converged: {got!r}")
        rounds = sum(s.stats.rounds for s in loops) - sum(rounds_before)
        with_diff = sum(s.stats.rounds_with_differences for s in loops)
        keys_moved = moved()
        # The fixed cost of a clean round (both nodes), for reference.
        clean_before = exchanged()
        for ae in loops:
            await ae.run_round()
        clean = exchanged() - clean_before
        return AEResult(
            keys=keys,
            divergent=len(winners),
            value_size=value_size,
            interval=interval,
            load_seconds=load_seconds,
            converge_seconds=converge_seconds,
            rounds=rounds,
            rounds_with_differences=with_diff,
            keys_moved=keys_moved,
            divergent_bytes=divergent_bytes,
            bytes_exchanged=total,
            by_op=by_op,
            clean_round_bytes=clean,
        )
    finally:
        if b is not None:
            await b.stop()
        await a.stop()
        gc.unfreeze()


def _peers_up(node: Node) -> bool:
    membership = node.membership
    return membership is not None and all(p.up for p in membership.peers.values())


def anti_entropy(
    keys: int, divergent: int, value_size: int, *, progress: Callable[[str], None]
) -> AEResult:
    """Measure one anti-entropy repair (see the module docstring)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(_anti_entropy(keys, divergent, value_size, progress))
    return uvloop.run(_anti_entropy(keys, divergent, value_size, progress))
