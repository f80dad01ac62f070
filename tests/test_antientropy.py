"""Merkle anti-entropy, tombstones and the capacity rule, on the in-process transport.

Rounds are driven by hand (``node.antientropy.run_round()``) with the periodic loop
set to a long interval, except where the loop itself is under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

import cluster_harness
import pytest
from aio_helpers import run
from cluster_harness import SMALL_FRAMES, key_owned_by, local

from hypercache._core.hlc import wall_clock_ms
from hypercache.cluster import antientropy, merkle, replica
from hypercache.cluster.local import InprocCluster, until
from hypercache.cluster.node import Node
from hypercache.errors import PermissionDeniedError, ProtocolError
from hypercache.net.protocol import Limits, Op, make_hello

FAST: dict[str, Any] = {
    **cluster_harness.FAST,
    "request_timeout": 2.0,
    # The loop stays out of the way: tests run rounds by hand.
    "anti_entropy_interval": 600.0,
    "anti_entropy_max_interval": 600.0,
    "hint_ttl": 60.0,
    "tombstone_ttl": 3600.0,
}


@contextlib.asynccontextmanager
async def cluster(
    size: int = 3, per_node: dict[int, dict[str, Any]] | None = None, **overrides: Any
) -> AsyncIterator[list[Node]]:
    settings = {**FAST, **overrides}
    async with InprocCluster(
        size, settings=settings, per_node=per_node, address="127.0.11.{n}:7400"
    ) as c:
        # Connect every pair once so that rounds do not race the connections.
        await c.connect_peers()
        yield c.nodes


def ae(node: Node) -> antientropy.AntiEntropy:
    assert node.antientropy is not None
    return node.antientropy


async def full_round(nodes: list[Node]) -> int:
    """One round on every node; return the entries applied in all."""
    applied = 0
    for node in nodes:
        done, _ = await ae(node).run_round()
        applied += done
    return applied


def digests(node: Node) -> list[int]:
    return [node.store.digest(p) for p in range(node.store.partitions)]


def converged(nodes: list[Node]) -> bool:
    first = digests(nodes[0])
    return all(digests(n) == first for n in nodes[1:])


def put(
    node: Node,
    key: bytes,
    value: bytes,
    ts: int,
    *,
    tomb: bool = False,
    exp: int = 0,
    at: int | None = None,
) -> bool:
    """Apply a version straight to ``node``'s store, as written ``at`` (wall ms; now)."""
    return node.store.apply(key, value, ts, 1, exp, tomb, wall_clock_ms() if at is None else at)


def now_ts(offset_ms: int = 0) -> int:
    return (wall_clock_ms() + offset_ms) << 16


async def write_all(node: Node, keys: list[bytes], value: bytes = b"v") -> None:
    coord = node.coordinator
    assert coord is not None
    await asyncio.gather(*(coord.set(k, value + k, None, "all") for k in keys))


# ------------------------------------------------------------------ convergence


def test_divergence_converges_in_one_round_both_directions() -> None:
    async def main() -> None:
        async with cluster() as nodes:
            keys = [f"key-{i}".encode() for i in range(300)]
            await write_all(nodes[0], keys)
            assert converged(nodes)
            a, b, c = nodes
            ts = now_ts(1000)
            # Newer versions on one replica each, keys only one replica has, a
            # delete only one replica saw.
            for i in range(10):
                assert put(a, keys[i], b"newer-a", ts)
                assert put(b, keys[10 + i], b"newer-b", ts)
                assert put(c, f"only-c-{i}".encode(), b"c", ts)
            assert put(b, keys[50], b"", ts, tomb=True)
            assert not converged(nodes)

            await full_round(nodes)
            assert converged(nodes)
            for n in nodes:
                assert n.store.peek(keys[0], wall_clock_ms())[0] == b"newer-a"  # type: ignore[index]
                assert n.store.peek(keys[10], wall_clock_ms())[0] == b"newer-b"  # type: ignore[index]
                assert n.store.peek(b"only-c-3", wall_clock_ms()) is not None
                assert n.store.peek(keys[50], wall_clock_ms())[4] is True  # type: ignore[index]
                assert len(n.store) == 300 + 10 - 1
            stats = [ae(n).stats for n in nodes]
            assert sum(s.keys_pulled + s.keys_pushed for s in stats) >= 2 * 31
            # A second round finds nothing and moves nothing.
            before = sum(s.bytes_sent for s in stats)
            assert await full_round(nodes) == 0
            clean_bytes = sum(s.bytes_sent for s in stats) - before
            assert clean_bytes < 256 * 8  # group digests only

    run(main())


def test_absence_never_deletes_and_older_never_overwrites() -> None:
    async def main() -> None:
        async with cluster() as nodes:
            a, b, c = nodes
            ts = now_ts()
            put(a, b"lonely", b"x", ts)  # only a has it: copied, not deleted
            put(a, b"dead", b"", ts + 5, tomb=True)  # a deleted it...
            put(b, b"dead", b"old", ts)  # ...b and c hold an older value
            put(c, b"dead", b"old", ts)
            put(b, b"fresh", b"new", ts + 10)  # a newer write after a delete wins
            put(a, b"fresh", b"", ts + 5, tomb=True)
            await full_round(nodes)
            assert converged(nodes)
            now = wall_clock_ms()
            for n in nodes:
                assert n.store.peek(b"lonely", now)[0] == b"x"  # type: ignore[index]
                assert n.store.peek(b"dead", now)[4] is True  # type: ignore[index]
                assert n.store.peek(b"fresh", now)[:2] == (b"new", ts + 10)  # type: ignore[index]
            # An older write arriving later (late hint, repair, AE) stays refused.
            for n in nodes:
                assert n.coordinator is not None
                assert n.replica.r_put_many([[[b"dead", b"zombie", ts + 1, 1, 0, False]], 0]) == 0
            await full_round(nodes)
            assert all(n.store.peek(b"dead", wall_clock_ms())[4] for n in nodes)  # type: ignore[index]

    run(main())


def test_expired_entries_are_never_brought_back() -> None:
    async def main() -> None:
        async with cluster() as nodes:
            a, b, c = nodes
            # "brief" was written 150 ms ago with a TTL of 100 ms (applied at its
            # time of writing): it has expired, and nothing has swept it yet.
            exp = wall_clock_ms() - 50
            put(a, b"brief", b"x", now_ts(-150), exp=exp, at=exp - 100)
            put(a, b"long", b"y", now_ts(), exp=exp + 600_000)
            # a still holds "brief" (not swept), b and c never had it.
            assert b"brief" in a.store
            await full_round(nodes)
            now = wall_clock_ms()
            for n in (b, c):
                assert n.store.peek(b"brief", now) is None
                assert b"brief" not in n.store
                assert n.store.peek(b"long", now) is not None
            assert converged(nodes)

    run(main())


def test_tombstones_replicate_and_are_purged_after_their_ttl() -> None:
    async def main() -> None:
        async with cluster(
            tombstone_ttl=60.0,
            hint_ttl=0.5,
            anti_entropy_interval=1.0,
            anti_entropy_max_interval=1.0,
        ) as nodes:
            coord = nodes[0].coordinator
            assert coord is not None
            await coord.set(b"gone", b"x", None, "all")
            assert await coord.delete(b"gone", "all") is True
            for n in nodes:
                entry = n.store.peek(b"gone", wall_clock_ms())
                assert entry is not None and entry[4] is True
                assert n.store.tombstones == 1
            # The expiry loop purges every tombstone once its TTL has passed (the
            # nodes' wall clock is moved past it rather than slept through).
            for n in nodes:
                n.wall_ms = lambda: wall_clock_ms() + 61_000
            await until(
                lambda: all(n.store.tombstones == 0 for n in nodes), timeout=6, what="purge"
            )
            assert all(n.store.tombstones_purged == 1 for n in nodes)
            assert b"tombstones_purged" in nodes[0].metrics.render()

    run(main())


# ---------------------------------------------------------------- capacity rule


def test_evicted_keys_are_not_pulled_back_and_rounds_settle() -> None:
    async def main() -> None:
        small = {"max_memory": 40_000}
        async with cluster(per_node={2: small}) as nodes:
            a, b, c = nodes
            keys = [f"cap-{i:04d}".encode() for i in range(400)]
            await write_all(a, keys, b"v" * 50)
            assert c.store.evictions > 0
            assert len(c.store) < len(keys) == len(a.store) == len(b.store)
            held = len(c.store)
            # Rounds run; c takes back none of what it evicted, and after the
            # first round nothing more is exchanged: the partitions are settled.
            await full_round(nodes)
            assert len(c.store) <= held
            assert c.store.bytes <= c.store.max_bytes
            stats = [ae(n).stats for n in nodes]
            settled = sum(s.keys_settled for s in stats)
            assert settled >= len(keys) - held
            before = sum(s.bytes_sent for s in stats)
            assert await full_round(nodes) == 0
            assert sum(s.bytes_sent for s in stats) - before < 256 * 4 * 16
            assert len(c.store) <= held
            # a and b still agree with each other.
            assert digests(a) == digests(b)
            # A newer write of an evicted key is taken (it is not the evicted version).
            coord = a.coordinator
            assert coord is not None
            evicted = next(k for k in keys if c.store.peek(k, wall_clock_ms()) is None)
            await coord.set(evicted, b"new", None, "all")
            assert c.store.peek(evicted, wall_clock_ms()) is not None

    run(main())


def test_repair_push_respects_the_high_water_mark() -> None:
    async def main() -> None:
        async with cluster(size=1, max_memory=10_000) as nodes:
            (node,) = nodes
            rep = node.replica
            ts = now_ts()
            entries = [[f"k{i}".encode(), b"x" * 100, ts, 1, 0, False] for i in range(100)]
            applied = rep.r_put_many([entries, 1])
            assert 0 < applied < 100
            assert node.store.bytes <= 10_000 * replica.HIGH_WATER + 400
            # Tombstones and newer versions of held keys are always taken.
            tomb = [[b"k99", b"", ts + 1, 1, 0, True], [b"k0", b"y", ts + 1, 1, 0, False]]
            assert rep.r_put_many([tomb, 1]) == 2
            # Replayed hints (mode 0) are writes: applied, evicting as needed.
            assert rep.r_put_many([[[b"hint", b"h", ts, 1, 0, False]], 0]) == 1

    run(main())


# ------------------------------------------------------------- loop and bounds


def test_work_per_round_is_bounded_and_continues() -> None:
    async def main() -> None:
        async with cluster(size=2) as nodes:
            a, b = nodes
            ts = now_ts()
            for i in range(500):
                put(a, f"only-a-{i}".encode(), b"x", ts)
            for n in nodes:
                ae(n).max_keys = 40
                ae(n).max_partitions = 20
            rounds = 0
            truncated = []
            while not converged(nodes):
                rounds += 1
                assert rounds < 100
                truncated.append((await ae(a).run_round())[1])
                await ae(b).run_round()
            assert rounds > 3 and any(truncated)
            assert len(b.store) == 500

    run(main())


def test_antientropy_push_respects_max_frame() -> None:
    """Anti-entropy pushes (R_PUT_MANY mode 1) are cut at BATCH_BYTES (4 MiB)
    whatever ``max_frame`` is; PULL answers honour ``max_frame // 2`` but pushes do
    not. With a smaller (valid) ``max_frame`` the push fails to encode, the sync
    with that peer errors out every round and the peer never gets the entries."""

    async def main() -> None:
        async with cluster(2, replication=2, **SMALL_FRAMES) as nodes:
            n1, n2 = nodes
            assert n1.coordinator is not None and n1.antientropy is not None
            # Entries only n1 holds, in partitions n1 leads with n2 (one per key).
            keys = [key_owned_by(n1, ["n1", "n2"], b"ae%d-" % i) for i in range(3)]
            for key in keys:
                n1.replica.put(key, b"v" * 8000, n1.clock.now(), n1.clock.tag, 0, False)
            for _ in range(3):
                await n1.antientropy.run_round()
            assert n1.antientropy.stats.errors == 0
            assert all(local(n2, k) is not None for k in keys)

    run(main())


def test_adaptive_interval_backs_off_and_resets() -> None:
    async def main() -> None:
        async with cluster(
            size=2, anti_entropy_interval=0.05, anti_entropy_max_interval=0.4
        ) as nodes:
            a, b = nodes
            await until(lambda: ae(a).stats.interval == 0.4, what="backoff to the max")
            rounds = ae(a).stats.rounds + ae(b).stats.rounds
            assert rounds >= 3
            put(b, b"diverged", b"x", now_ts())
            await until(lambda: a.store.peek(b"diverged", wall_clock_ms()) is not None, timeout=3)
            assert ae(a).stats.rounds_with_differences + ae(b).stats.rounds_with_differences >= 1
            # The round that found it reset the interval to the base.
            await until(lambda: ae(a).stats.interval == 0.4 and ae(b).stats.interval == 0.4)
            metrics = a.metrics.render().decode()
            assert "hypercache_dist_antientropy_rounds_total" in metrics
            assert "hypercache_dist_antientropy_interval_seconds" in metrics
            assert "hypercache_dist_antientropy_round_duration_seconds_bucket" in metrics

    run(main())


def test_bytes_grow_with_divergence_not_with_key_count() -> None:
    async def measure(total: int, divergent: int) -> tuple[int, int]:
        """Bytes of the round that repairs, minus those of a clean round (the
        fixed cost of comparing partition digests), and that fixed cost."""
        async with cluster(size=2, partitions=4096) as nodes:
            a, b = nodes
            ts = now_ts()
            for i in range(total):
                put(a, f"k{i}".encode(), b"v" * 100, ts)
                put(b, f"k{i}".encode(), b"v" * 100, ts)
            for i in range(divergent):
                put(a, f"k{i * 7}".encode(), b"w" * 100, ts + 1)
            stats = [ae(n).stats for n in nodes]

            def exchanged() -> int:
                return sum(s.bytes_sent + s.bytes_received for s in stats)

            await full_round(nodes)
            assert converged(nodes)
            repair = exchanged()
            assert await full_round(nodes) == 0
            clean = exchanged() - repair
            return repair - clean, clean

    async def main() -> None:
        small, clean_small = await measure(1_000, 100)
        large, clean_large = await measure(10_000, 100)
        double, _ = await measure(10_000, 200)
        assert clean_small == clean_large < 8_000  # depends on partitions only
        assert 0.6 < large / small < 1.6, (small, large)
        assert 1.5 < double / large < 2.5, (large, double)

    run(main())


# ------------------------------------------------------------------ handlers


def test_handlers_refuse_malformed_payloads() -> None:
    from hypercache._core.vstore import VersionedStore

    store = VersionedStore(64)
    limits = Limits()
    tops = bytes(32)
    bad: Any
    for bad in (
        None,
        [0],
        [2, []],
        [0, [[0, 1]]],
        [1, [64]],
        [1, [[64, 0]]],
        [1, [[64, 100, tops]]],
        [1, [[0, 100, tops[:28]]]],
        [0, [[4, 1, 0]]],
    ):
        with pytest.raises(ProtocolError):
            merkle.answer_merkle(store, bad, wall_clock_ms())
    for bad in (None, [[0]], [[0, [0]]], [[64, 0, b""]], [[0, 64, b""]], [[0, 0, b"1234"]]):
        with pytest.raises(ProtocolError):
            merkle.answer_keys(store, bad, wall_clock_ms())
    with pytest.raises(ProtocolError):
        merkle.answer_pull(store, limits, [1], wall_clock_ms())
    store.apply(b"k", b"v", 5 << 16, 1, 0, False, wall_clock_ms())
    p, b = store.bucket_of(b"k")
    # KEYS lists the entries whose term the asker lacks and the asker's terms not held.
    ((term, key, _),) = merkle.bucket_terms(store, p, b, wall_clock_ms())
    assert key == b"k"
    packed = struct.pack("<Q", term)
    other = struct.pack("<Q", term ^ 1)
    assert merkle.answer_keys(store, [[p, b, b""]], wall_clock_ms()) == [[[[b"k", 5 << 16, 1]], []]]
    assert merkle.answer_keys(store, [[p, b, packed]], wall_clock_ms()) == [[[], []]]
    assert merkle.answer_keys(store, [[p, b, other + packed]], wall_clock_ms()) == [[[], [0]]]
    assert merkle.answer_pull(store, limits, [b"k", b"nope"], wall_clock_ms()) == [
        [b"k", b"v", 5 << 16, 1, 0, False]
    ]
    page, cursor = merkle.list_keys(store, p, None, 10, wall_clock_ms())
    assert page == [[b"k", 5 << 16, 1, False, 0]] and cursor is None


def test_merkle_and_keys_over_the_wire() -> None:
    async def main() -> None:
        async with cluster(size=1) as nodes:
            (node,) = nodes
            put(node, b"a", b"1", now_ts())
            # Anti-entropy is for peers: a client is refused, a (loopback) peer served.
            client = await node.transport.connect(node.address, make_hello("hypercache"))
            try:
                with pytest.raises(PermissionDeniedError, match="MERKLE is for cluster peers"):
                    await client.request(Op.MERKLE, [0, []], 2)
            finally:
                await client.close()
            assert node.peer_ops_refused == 1
            hello = make_hello(
                "hypercache",
                node_id="tester",
                address="127.0.11.99:7400",
                info={"layout": node.membership.layout},
            )
            net_conn = await node.transport.connect(node.address, hello)
            try:
                p = node.store.partition_of(b"a")
                g = p // merkle.GROUP
                mask = 1 << (p % merkle.GROUP)
                answer = await net_conn.request(Op.MERKLE, [0, [[g, mask, 0]]], 2)
                assert answer == [[g, [node.store.digest(p)]]]
                digest = merkle.group_digest([node.store.digest(p)])
                assert await net_conn.request(Op.MERKLE, [0, [[g, mask, digest]]], 2) == []
                # A small partition is listed whole, a larger one by the sub-digests
                # of the blocks that differ.
                subs = node.store.sub_digests(p)
                tops = merkle.block_digests(subs)
                listing = await net_conn.request(Op.MERKLE, [1, [[p, 0, tops]]], 2)
                entry = node.store.peek(b"a", wall_clock_ms())
                assert entry is not None
                assert listing == [[p, 1, [[b"a", entry[1], entry[2]]]]]
                same = await net_conn.request(Op.MERKLE, [1, [[p, 1000, tops]]], 2)
                assert same == [[p, 0, 0, b""]]
                _, b = node.store.bucket_of(b"a")
                block = b // merkle.BLOCK
                answer = await net_conn.request(Op.MERKLE, [1, [[p, 1000, bytes(32)]]], 2)
                low = [d & 0xFFFFFFFF for d in subs[block * 8 : block * 8 + 8]]
                assert answer == [[p, 0, 1 << block, struct.pack("<8I", *low)]]
                with pytest.raises(ProtocolError):
                    await net_conn.request(Op.KEYS, [[p, 9999, b""]], 2)
            finally:
                await net_conn.close()

    run(main())


def test_read_repair_never_brings_an_older_write_back() -> None:
    async def main() -> None:
        async with cluster() as nodes:
            a, b, c = nodes
            ts = now_ts()
            put(a, b"rr", b"", ts + 5, tomb=True)
            put(b, b"rr", b"", ts + 5, tomb=True)
            put(c, b"rr", b"old", ts)  # c missed the delete
            coord = c.coordinator
            assert coord is not None
            assert await coord.get(b"rr", "all") == [False, None]
            await until(lambda: c.store.peek(b"rr", wall_clock_ms())[4] is True, what="repair")  # type: ignore[index]
            # The repaired tombstone stays through anti-entropy too.
            await full_round(nodes)
            assert all(n.store.peek(b"rr", wall_clock_ms())[4] for n in nodes)  # type: ignore[index]

    run(main())


def test_anti_entropy_refuses_a_peers_version_past_the_horizon() -> None:
    async def main() -> None:
        async with cluster(size=2) as nodes:
            a, b = nodes
            year = 366 * 86_400_000

            def led_by(node: Node) -> bytes:
                return next(
                    k
                    for k in (f"forged-{i}".encode() for i in range(10_000))
                    if node.ring.owners(k)[0] == node.node_id
                )

            # b holds forged entries a year ahead, and an honest one a is missing:
            # a pulls what it leads, b pushes what it leads.
            pulled, pushed = led_by(a), led_by(b)
            for key in (pulled, pushed):
                assert put(b, key, b"x", now_ts(year))
            assert put(b, b"honest", b"y", now_ts())
            await full_round(nodes)
            now = wall_clock_ms()
            assert a.store.peek(b"honest", now) is not None
            assert a.store.peek(pulled, now) is None
            assert a.store.peek(pushed, now) is None
            refused = a.metrics.stats.versions_refused
            assert refused["antientropy"] == 1
            assert refused["repair_push"] == 1
            assert a.clock.last < now_ts(round(a.config.max_clock_skew * 1000) + 1)

    run(main())


def test_one_request_cannot_ask_for_unbounded_work() -> None:
    async def main() -> None:
        async with cluster(size=1) as nodes:
            (node,) = nodes
            hello = make_hello(
                "hypercache",
                node_id="tester",
                address="127.0.11.99:7400",
                info={"layout": node.membership.layout},
            )
            conn = await node.transport.connect(node.address, hello)
            groups = node.store.partitions // merkle.GROUP
            too_much = [
                (Op.MERKLE, [0, [[0, 1, 0]] * (groups + 1)], "at most"),
                (Op.MERKLE, [0, [[0, 1 << merkle.GROUP, 0]]], "must be"),
                (Op.MERKLE, [1, [[0, 0, b""]] * (merkle.SUB_BATCH + 1)], "at most"),
                (Op.KEYS, [[0, 0, b""]] * (merkle.SUB_BATCH * 64 + 1), "at most"),
                (Op.KEYS, [[0, 0, bytes(2 * merkle.KEYS_BYTES + 8)]], "bytes of terms"),
                (Op.PULL, [b"k"] * (merkle.BATCH_KEYS + 1), "at most"),
                (Op.R_PUT_MANY, [[[b"k", b"v", 1, 1, 0, False]] * 4097, 0], "at most 4096"),
            ]
            try:
                for op, payload, why in too_much:
                    with pytest.raises(ProtocolError, match=why):
                        await conn.request(op, payload, 10)
                # At the bounds, requests are served.
                full = [[g, 0xFFFF, 0] for g in range(groups)]
                assert len(await conn.request(Op.MERKLE, [0, full], 10)) == groups
                assert await conn.request(Op.PULL, [b"k"] * merkle.BATCH_KEYS, 10) == []
            finally:
                await conn.close()

    run(main())
