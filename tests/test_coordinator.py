"""Coordinator, membership and node logic on the in-process transport (no sockets).

Every test runs its nodes in one event loop on its own :class:`InprocNetwork`
(:class:`~hypercache.cluster.local.InprocCluster`) and stops them on the way out;
waits poll a condition against a deadline, and TTLs pass by moving the nodes' wall
clock (``Node.wall_ms``), not by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aio_helpers import run
from cluster_harness import FAST, key_owned_by, local

from hypercache._core.hlc import wall_clock_ms
from hypercache.cluster import coordinator as coordinator_module
from hypercache.cluster.config import DistConfig
from hypercache.cluster.local import InprocCluster, until
from hypercache.cluster.membership import layout_of
from hypercache.cluster.node import Node
from hypercache.errors import (
    ClockSkewError,
    ConfigError,
    HandshakeError,
    KeyTooLargeError,
    PermissionDeniedError,
    ProtocolError,
    QuorumError,
)
from hypercache.net.auth import PeerAuthenticator
from hypercache.net.connection import ClientConnection
from hypercache.net.inproc import InprocNetwork
from hypercache.net.protocol import Op, make_hello
from hypercache.replication import is_live, newest, wall_ms

ADDRESS = "127.0.10.{n}:7400"


def address(i: int) -> str:
    return ADDRESS.format(n=i + 1)


def make_node(net: InprocNetwork, i: int, seeds: tuple[str, ...], **overrides: Any) -> Node:
    config = DistConfig(node_id=f"n{i + 1}", bind=address(i), seeds=seeds, **{**FAST, **overrides})
    return Node(config, transport=net)


@contextlib.asynccontextmanager
async def cluster(
    size: int = 3, **overrides: Any
) -> AsyncIterator[tuple[InprocNetwork, list[Node]]]:
    async with InprocCluster(size, settings={**FAST, **overrides}, address=ADDRESS) as c:
        yield c.net, c.nodes


@contextlib.asynccontextmanager
async def client(
    net: InprocNetwork, node: Node, *, as_peer: bool = False
) -> AsyncIterator[ClientConnection]:
    """A connection to ``node``: a client's, or (``as_peer``) a peer's, which may send
    the peer operations (``R_DEL``, ``R_PUT_MANY``, anti-entropy)."""
    hello = (
        make_hello(
            "hypercache",
            node_id="tester",
            address="127.0.10.250:7400",
            info={"layout": node.membership.layout},
        )
        if as_peer
        else make_hello("hypercache")
    )
    conn = await net.connect(node.address, hello)
    try:
        yield conn
    finally:
        await conn.close()


# --------------------------------------------------------------------------- basics


def test_quorum_write_through_one_node_is_read_through_another() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes):
            async with client(net, nodes[0]) as c0, client(net, nodes[1]) as c1:
                assert await c0.request(Op.SET, [b"k", b"v", None, "quorum"], 2) is True
                assert await c1.request(Op.GET, [b"k", "quorum"], 2) == [True, b"v"]
                assert await c1.request(Op.GET, [b"k", None], 2) == [True, b"v"]
                assert await c1.request(Op.GET, [b"k", "one"], 2) == [True, b"v"]
                assert await c1.request(Op.GET, [b"missing", "all"], 2) == [False, None]
            # The write landed on every owner, in the background if not before.
            await until(lambda: all(local(n, b"k") is not None for n in nodes), what="replicas")
            entries = {tuple(local(n, b"k")) for n in nodes}
            assert len(entries) == 1

    run(main())


def test_delete_answers_existed_and_replicates_a_tombstone() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes):
            async with client(net, nodes[2]) as c:
                await c.request(Op.SET, [b"d", b"1", None, "all"], 2)
                forwards = nodes[2].metrics.stats.forwards
                before = dict(forwards)
                assert await c.request(Op.DELETE, [b"d", "quorum"], 2) is True
                assert await c.request(Op.DELETE, [b"d", "quorum"], 2) is False
                assert await c.request(Op.DELETE, [b"never", "one"], 2) is False
                # One round trip per remote owner (R_DEL), no R_GET first.
                assert forwards["r_del"] - before["r_del"] == 6
                assert forwards["r_get"] == before["r_get"]
                assert await c.request(Op.GET, [b"d", "all"], 2) == [False, None]
            await until(lambda: all(local(n, b"d") is not None for n in nodes), what="tombstones")
            for n in nodes:
                assert local(n, b"d")[4] is True

    run(main())


def test_r_del_applies_the_tombstone_and_answers_what_was_held() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes), client(net, nodes[0], as_peer=True) as c:
            await c.request(Op.SET, [b"k", b"v", None, "all"], 2)
            held = await c.request(Op.R_GET, [b"k"], 2)
            tomb = [b"k", b"", held[1] + 1, held[2], 0, True]
            assert await c.request(Op.R_DEL, tomb, 2) == held
            assert local(nodes[0], b"k")[4] is True
            # A replay answers the tombstone it now holds and changes nothing.
            assert (await c.request(Op.R_DEL, tomb, 2))[4] is True
            older = [b"k", b"", held[1] - 1, held[2], 0, True]
            assert (await c.request(Op.R_DEL, older, 2))[1] == held[1] + 1
            with pytest.raises(ProtocolError):
                await c.request(Op.R_DEL, [b"k", b"v", held[1] + 2, held[2], 0, False], 2)

    run(main())


def test_ttl_travels_as_absolute_expiry() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes), client(net, nodes[0]) as c:
            before = wall_clock_ms()
            await c.request(Op.SET, [b"t", b"x", 60_000, "all"], 2)
            expiries = {local(n, b"t")[3] for n in nodes}
            assert len(expiries) == 1
            (expire_at,) = expiries
            assert before + 60_000 <= expire_at <= wall_clock_ms() + 60_000
            await c.request(Op.SET, [b"t2", b"x", 50, "all"], 2)
            # Past t2's TTL: every node's wall clock is moved on, not slept through.
            for n in nodes:
                n.wall_ms = lambda: wall_clock_ms() + 100
            assert await c.request(Op.GET, [b"t2", "all"], 2) == [False, None]

    run(main())


def test_topology_ping_and_bad_requests() -> None:
    async def main() -> None:
        async with cluster(max_key=16) as (net, nodes), client(net, nodes[1]) as c:
            assert await c.request(Op.PING, None, 2) == "pong"
            topo = await c.request(Op.TOPOLOGY, None, 2)
            assert topo["nodes"] == [[f"n{i + 1}", address(i)] for i in range(3)]
            assert topo["partitions"] == 256 and topo["replication"] == 3
            assert topo["table"] == nodes[0].ring.table()
            assert isinstance(topo["epoch"], int)
            # Clients coordinate reads at this level when a call names none.
            assert topo["read_consistency"] == "quorum"
            with pytest.raises(ProtocolError):
                await c.request(Op.GET, [b"k"], 2)
            with pytest.raises(ProtocolError):
                await c.request(Op.GET, ["not-bytes", None], 2)
            with pytest.raises(ConfigError) as info:
                await c.request(Op.SET, [b"k", b"v", None, "most"], 2)
            assert info.value.field == "consistency"
            with pytest.raises(ConfigError) as info:
                await c.request(Op.SET, [b"k", b"v", -5, None], 2)
            assert info.value.field == "ttl_ms"
            with pytest.raises(KeyTooLargeError):
                await c.request(Op.SET, [b"k" * 17, b"v", None, None], 2)

    run(main())


# ------------------------------------------------------------------ failures


def test_dead_owner_quorum_works_all_fails() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes):
            await nodes[2].server.close()  # n3 dies: its server is gone
            async with client(net, nodes[0]) as c:
                for i in range(20):
                    key = f"key-{i}".encode()
                    assert await c.request(Op.SET, [key, b"v", None, "quorum"], 3) is True
                    assert await c.request(Op.GET, [key, "quorum"], 3) == [True, b"v"]
                with pytest.raises(QuorumError) as info:
                    await c.request(Op.SET, [b"key-0", b"w", None, "all"], 3)
                assert (info.value.acks, info.value.required) == (2, 3)
                with pytest.raises(QuorumError) as info:
                    await c.request(Op.GET, [b"key-0", "all"], 3)
                assert (info.value.acks, info.value.required) == (2, 3)
                with pytest.raises(QuorumError):
                    await c.request(Op.DELETE, [b"key-0", "all"], 3)
            stats = nodes[0].metrics.stats
            assert stats.quorum_failures["set"] == 1 and stats.quorum_failures["get"] == 1
            # The failure detector marks it down; the coordinator then skips it.
            assert nodes[0].membership is not None
            await until(lambda: not nodes[0].membership.is_up("n3"), what="n3 down")

    run(main())


def test_failure_detector_marks_down_and_up() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes):
            m0 = nodes[0].membership
            assert m0 is not None
            await nodes[2].stop()
            await until(lambda: not m0.is_up("n3"), what="n3 down")
            assert m0.up_count() == 2
            # n3 comes back at the same address with an empty store.
            nodes[2] = make_node(net, 2, (address(0),))
            await nodes[2].start()
            await until(lambda: m0.is_up("n3") and m0.up_count() == 3, what="n3 up")

    run(main())


# ---------------------------------------------------------------- versions


def test_stale_replica_repaired_by_quorum_read() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes):
            key = b"stale"
            async with client(net, nodes[0]) as c:
                await c.request(Op.SET, [key, b"old", None, "all"], 2)
                _, ts, origin, _, _ = local(nodes[0], key)
                owners = nodes[0].ring.owners(key)
                by_id = {n.node_id: n for n in nodes}
                fresh, stale = [by_id[o] for o in owners[:2]], by_id[owners[2]]
                for n in fresh:  # a newer version reaches two owners only
                    assert n.coordinator is not None
                    assert n.replica.put(key, b"new", ts + 1, origin, 0, False)
                assert local(stale, key)[0] == b"old"
                assert await c.request(Op.GET, [key, "quorum"], 2) == [True, b"new"]
            await until(lambda: local(stale, key)[0] == b"new", what="read repair")
            assert local(stale, key)[1:3] == (ts + 1, origin)
            assert nodes[0].metrics.stats.read_repairs >= 1

    run(main())


def test_read_repairs_in_flight_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two stale owners, room for one push: the other is dropped and counted.
    monkeypatch.setattr(coordinator_module, "MAX_PENDING_REPAIRS", 1)

    async def main() -> None:
        async with cluster() as (_net, nodes):
            key = b"capped"
            coordinator = nodes[0].coordinator
            assert coordinator is not None
            await coordinator.set(key, b"old", None, "all")
            _, ts, origin, _, _ = local(nodes[0], key)
            # Only the coordinator holds the newer version.
            assert nodes[0].replica.put(key, b"new", ts + 1, origin, 0, False)
            stats = nodes[0].metrics.stats
            assert await coordinator.get(key, "all") == [True, b"new"]
            await until(lambda: coordinator.background == 0, what="pushes done")
            assert (stats.read_repairs, stats.read_repairs_dropped) == (1, 1)
            assert sorted(local(n, key)[0] for n in nodes[1:]) == [b"new", b"old"]
            # With the push done there is room again: the next read repairs the other.
            assert await coordinator.get(key, "all") == [True, b"new"]
            await until(lambda: all(local(n, key)[0] == b"new" for n in nodes), what="repair")
            assert (stats.read_repairs, stats.read_repairs_dropped) == (2, 1)
            assert nodes[0].metrics.stats.as_dict()["read_repairs_dropped"] == 1
            text = nodes[0].metrics.render().decode()
            assert "hypercache_dist_read_repairs_dropped_total 1.0" in text

    run(main())


def test_read_repairs_for_one_owner_are_batched_into_one_put_many() -> None:
    """Reads completing in the same event-loop iteration that find one owner stale
    push their repairs to it as one R_PUT_MANY (not one R_PUT a key), and the owner's
    answer counts the repairs applied."""

    async def main() -> None:
        async with cluster() as (_net, nodes):
            coordinator = nodes[0].coordinator
            assert coordinator is not None
            stale = nodes[2]
            keys = [b"batched-%d" % i for i in range(20)]
            for key in keys:
                await coordinator.set(key, b"old", None, "all")
                _, ts, origin, _, _ = local(nodes[0], key)
                for n in nodes[:2]:  # a newer version everywhere but on node 3
                    assert n.replica.put(key, b"new", ts + 1, origin, 0, False)
            stats, seen = nodes[0].metrics.stats, stale.metrics.stats
            puts_before = seen.replica_puts
            peers = nodes[0].membership.peers
            sent: list[tuple[int, int]] = []

            class Spy:
                """The stale owner's peer, noting what is sent to it."""

                def __init__(self, peer: Any) -> None:
                    self.peer = peer

                def __getattr__(self, name: str) -> Any:
                    return getattr(self.peer, name)

                def send_callback(self, op: int, payload: Any, *args: Any) -> None:
                    if op == Op.R_PUT or (op == Op.R_PUT_MANY and payload[1] == 2):
                        sent.append((op, len(payload[0]) if op == Op.R_PUT_MANY else 1))
                    self.peer.send_callback(op, payload, *args)

            peers[stale.node_id] = Spy(peers[stale.node_id])  # type: ignore[assignment]
            got = await asyncio.gather(*(coordinator.get(k, "all") for k in keys))
            assert got == [[True, b"new"]] * len(keys)
            await until(lambda: coordinator.background == 0, what="pushes done")
            assert all(local(stale, k)[0] == b"new" for k in keys)
            # (anti-entropy may repair a key or two first)
            repaired = stats.read_repairs
            assert len(keys) - 3 <= repaired <= len(keys)
            assert stats.read_repairs_applied == repaired
            assert seen.replica_puts >= puts_before + repaired
            # one request carried them all: a single R_PUT_MANY (mode 2, read repair)
            assert sent == [(Op.R_PUT_MANY, repaired)]
            peers[stale.node_id] = peers[stale.node_id].peer  # type: ignore[attr-defined]
            text = nodes[0].metrics.render().decode()
            assert f"hypercache_dist_read_repairs_applied_total {repaired}.0" in text

    run(main())


def test_one_read_does_not_repair() -> None:
    async def main() -> None:
        async with cluster() as (_net, nodes):
            key = b"one"
            coordinator = nodes[0].coordinator
            assert coordinator is not None
            await coordinator.set(key, b"v", None, "all")
            _, ts, origin, _, _ = local(nodes[0], key)
            nodes[1].store.apply(key, b"v2", ts + 1, origin, 0, False, wall_clock_ms())
            assert await coordinator.get(key, "one") == [True, b"v"]  # local, stale
            await until(lambda: coordinator.background == 0, what="the read's work done")
            assert nodes[0].metrics.stats.read_repairs == 0
            assert await coordinator.get(key, "all") == [True, b"v2"]

    run(main())


def test_concurrent_writers_leave_one_value_on_all_owners() -> None:
    async def main() -> None:
        async with cluster() as (_net, nodes):
            key = b"hot"
            coords = [n.coordinator for n in nodes]
            assert all(c is not None for c in coords)
            await asyncio.gather(
                *(coords[i % 3].set(key, f"v{i}".encode(), None, "quorum") for i in range(60))
            )

            def converged() -> bool:
                entries = [local(n, key) for n in nodes]
                return entries[0] is not None and all(e == entries[0] for e in entries)

            await until(converged, what="convergence")
            value = local(nodes[0], key)[0]
            for c in coords:
                assert await c.get(key, "all") == [True, value]

    run(main())


def test_versions_compared_on_receive() -> None:
    async def main() -> None:
        async with cluster(size=1) as (net, nodes):
            node = nodes[0]
            async with client(net, node) as c:
                ts = (wall_clock_ms() + 2_000) << 16  # ahead, within max_clock_skew
                put = [b"v", b"a", ts, 7, 0, False]
                assert await c.request(Op.R_PUT, put, 2) is True
                assert await c.request(Op.R_PUT, put, 2) is False  # replay: no-op
                assert await c.request(Op.R_PUT, [b"v", b"b", ts - 1, 9, 0, False], 2) is False
                assert await c.request(Op.R_PUT, [b"v", b"c", ts, 6, 0, False], 2) is False
                assert await c.request(Op.R_GET, [b"v"], 2) == [b"a", ts, 7, 0, False]
                assert await c.request(Op.R_PUT, [b"v", b"d", ts, 8, 0, False], 2) is True
                assert (await c.request(Op.R_GET, [b"v"], 2))[0] == b"d"
                assert node.metrics.stats.version_conflicts == 3
                # The clock moved past the received version: the next local write wins.
                assert node.clock.last > ts
                assert await c.request(Op.SET, [b"v", b"mine", None, "one"], 2) is True
                assert await c.request(Op.GET, [b"v", "one"], 2) == [True, b"mine"]
                assert await c.request(Op.R_GET, [b"absent"], 2) is None
                with pytest.raises(ProtocolError):
                    await c.request(Op.R_PUT, [b"v", b"x", -1, 0, 0, False], 2)

    run(main())


def test_newest_and_liveness_helpers() -> None:
    a = (b"a", 10, 1, 0, False)
    b = (b"b", 10, 2, 0, False)
    c = (b"c", 9, 9, 0, False)
    assert newest([None, a, c, b]) == b
    assert newest([None, None]) is None
    assert is_live(a, 5)
    assert not is_live((b"", 10, 1, 0, True), 5)
    assert not is_live((b"x", 10, 1, 100, False), 100)
    assert is_live((b"x", 10, 1, 100, False), 99)
    assert not is_live(None, 0)


def test_delete_coordinator_advances_its_clock_past_r_del_answers() -> None:
    """docs/cluster.md: a node "advances its clock past every ts it receives, so its
    next write is newer than anything it has seen". A DELETE's R_DEL answers carry
    the owners' versions, but the coordinator never feeds them to its clock: when
    the owners hold a version ahead of the coordinator's clock, the delete answers
    ``existed=True`` yet loses, and so does every retry (the clock still has not
    moved), until the wall clock catches up."""

    async def main() -> None:
        async with cluster(3, replication=2) as (_net, nodes):
            n1, n2, n3 = nodes
            assert n1.coordinator is not None
            key = key_owned_by(n1, ["n2", "n3"])
            # An owner clock 3 s ahead (within max_clock_skew) wrote this version
            # (n1 has never seen it).
            ahead = (wall_ms() + 3_000) << 16
            for owner in (n2, n3):
                assert owner.coordinator is not None
                owner.replica.put(key, b"v", ahead, owner.clock.tag, 0, False)
            assert await n1.coordinator.delete(key, "all") is True  # seen, lost
            # n1 has now seen `ahead`: its next delete must be newer and win.
            await n1.coordinator.delete(key, "all")
            for owner in (n2, n3):
                entry = local(owner, key)
                assert entry is not None and entry[4] is True, entry

    run(main())


# --------------------------------------------------------------- membership


def test_membership_converges_whatever_the_join_order() -> None:
    async def main() -> None:
        net = InprocNetwork()
        # A chain: n2 knows only n1, n3 only n2, n4 only n3; n1 starts last.
        nodes = [
            make_node(net, 1, (address(0),)),
            make_node(net, 2, (address(1),)),
            make_node(net, 3, (address(2),)),
            make_node(net, 0, ()),
        ]
        try:
            for node in nodes:
                await node.start()
            await until(lambda: all(len(n.members()) == 4 for n in nodes), what="convergence")
            tables = {str(n.ring.table()) for n in nodes}
            assert len(tables) == 1
            assert {tuple(n.ring.nodes) for n in nodes} == {("n1", "n2", "n3", "n4")}
            topo = {str(n.topology()["nodes"]) for n in nodes}
            assert len(topo) == 1
        finally:
            for node in nodes:
                await node.stop()

    run(main())


def test_seed_down_at_start_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        net = InprocNetwork()
        attempts: list[str] = []  # connections tried to the seed
        connect = net.connect

        async def counted(to: str, *args: Any, **kwargs: Any) -> ClientConnection:
            if to == address(0):
                attempts.append(to)
            return await connect(to, *args, **kwargs)

        monkeypatch.setattr(net, "connect", counted)
        late_seed = make_node(net, 0, ())
        joiner = make_node(net, 1, (address(0),))
        try:
            await joiner.start()
            assert joiner.membership is not None
            await until(lambda: len(attempts) >= 3, what="a few failed attempts")
            assert joiner.membership.seeds_pending == [address(0)]
            await late_seed.start()
            m = joiner.membership
            await until(
                lambda: (
                    len(joiner.members()) == 2
                    and len(late_seed.members()) == 2
                    and m.seeds_pending == []
                ),
                what="the late seed to be reached",
            )
        finally:
            await joiner.stop()
            await late_seed.stop()

    run(main())


def test_node_stop_is_idempotent_and_restartable_elsewhere() -> None:
    async def main() -> None:
        net = InprocNetwork()
        node = make_node(net, 0, ())
        await node.stop()  # never started: no-op
        node = make_node(net, 0, ())
        await node.start()
        assert node.state == "running"
        with pytest.raises(RuntimeError):
            await node.start()
        await node.stop()
        await node.stop()
        assert node.state == "stopped"
        assert net.server(address(0)) is None

    run(main())


def test_port_zero_rederives_the_node_id() -> None:
    async def main() -> None:
        net = InprocNetwork()
        node = Node(DistConfig(bind="127.9.9.9:0", **FAST), transport=net)
        try:
            await node.start()
            assert node.address != "127.9.9.9:0"
            assert node.node_id == node.address
            async with client(net, node) as c:
                assert c.peer_hello["node_id"] == node.node_id
                assert await c.request(Op.SET, [b"k", b"v", None, None], 2) is True
        finally:
            await node.stop()

    run(main())


def test_max_items_bounds_each_node_store() -> None:
    async def main() -> None:
        async with cluster(max_items=3) as (net, nodes), client(net, nodes[0]) as c:
            for i in range(10):
                await c.request(Op.SET, [b"k%d" % i, b"v", None, "all"], 2)
            for n in nodes:
                assert len(n.store) == 3
                assert n.store.evictions == 7

    run(main())


# ------------------------------------------- the clock's horizon, on every receiving path

#: A version a year ahead, and one at the very end of the clock's range.
YEAR_MS = 366 * 86_400_000


def future_ts(ahead_ms: int) -> int:
    return (wall_clock_ms() + ahead_ms) << 16


def refused(node: Node) -> dict[str, int]:
    return dict(node.metrics.stats.versions_refused)


def test_r_put_past_the_horizon_is_refused_and_the_clock_stays() -> None:
    async def main() -> None:
        async with cluster(size=1) as (net, nodes):
            node = nodes[0]
            async with client(net, node) as c:
                for ts in (2**63 - 3, future_ts(YEAR_MS), future_ts(60_000)):
                    with pytest.raises(ClockSkewError) as info:
                        await c.request(Op.R_PUT, [b"k", b"forged", ts, 7, 0, False], 2)
                    assert "max_clock_skew" in str(info.value)
                assert await c.request(Op.R_GET, [b"k"], 2) is None  # nothing applied
                assert refused(node)["r_put"] == 3
                # The clock never moved towards the forged versions: writes go on, and
                # a write made now is stamped now.
                assert node.clock.last < future_ts(round(node.config.max_clock_skew * 1000) + 1)
                assert await c.request(Op.SET, [b"k", b"mine", None, "one"], 2) is True
                assert await c.request(Op.GET, [b"k", "one"], 2) == [True, b"mine"]
                # Within the bound a version from a little ahead is still taken.
                soon = future_ts(1_000)
                assert await c.request(Op.R_PUT, [b"k", b"soon", soon, 7, 0, False], 2) is True
                assert node.clock.last > soon

    run(main())


def test_r_del_and_r_put_many_refuse_versions_past_the_horizon() -> None:
    async def main() -> None:
        async with cluster(size=1) as (net, nodes):
            node = nodes[0]
            async with client(net, node, as_peer=True) as c:
                assert await c.request(Op.SET, [b"d", b"v", None, "one"], 2) is True
                with pytest.raises(ClockSkewError):
                    await c.request(Op.R_DEL, [b"d", b"", future_ts(YEAR_MS), 7, 0, True], 2)
                assert await c.request(Op.GET, [b"d", "one"], 2) == [True, b"v"]
                good = [b"g", b"ok", future_ts(0), 7, 0, False]
                bad = [b"b", b"forged", future_ts(YEAR_MS), 7, 0, False]
                poison = [b"p", b"forged", 2**63 - 3, 7, 0, False]
                for mode, path, applied in ((0, "hints", 1), (1, "repair_push", 0)):
                    # The batch goes on without the refused entries (a sender would
                    # otherwise replay the same batch for ever); the second time the
                    # good entry is already held.
                    answer = await c.request(Op.R_PUT_MANY, [[bad, good, poison], mode], 2)
                    assert answer == applied
                    assert refused(node)[path] == 2
                assert await c.request(Op.R_GET, [b"g"], 2) is not None
                assert await c.request(Op.R_GET, [b"b"], 2) is None
                assert await c.request(Op.R_GET, [b"p"], 2) is None
                assert refused(node)["r_del"] == 1
                assert node.clock.last < future_ts(round(node.config.max_clock_skew * 1000) + 1)

    run(main())


def test_r_put_many_out_of_range_expiry_is_refused_whole_batch() -> None:
    """docs/cluster.md: R_PUT_MANY "checks the whole batch before applying any
    entry"; a payload of the wrong shape is a ProtocolError. ``_check_r_put``
    bounds ``ts`` and ``origin`` but not ``expire_at_ms``: an entry with
    ``expire_at >= 2**63`` passes the check, the batch's earlier entries are
    applied, then the store raises OverflowError (sent as ServerError and logged
    as a handler crash)."""

    async def main() -> None:
        async with cluster(1) as (_net, nodes):
            (n1,) = nodes
            assert n1.coordinator is not None
            ts = n1.clock.now()
            good = [b"first", b"v", ts, 1, 0, False]
            bad = [b"second", b"v", ts, 1, 2**64 - 1, False]
            error: BaseException | None = None
            try:
                n1.replica.r_put_many([[good, bad], 0])
            except Exception as exc:
                error = exc
            assert isinstance(error, ProtocolError), repr(error)
            assert local(n1, b"first") is None  # nothing applied from a refused batch

    run(main())


def test_a_future_entry_held_by_one_owner_neither_wins_a_read_nor_spreads() -> None:
    async def main() -> None:
        async with cluster() as (_net, nodes):
            a, b, c = nodes
            coord = a.coordinator
            assert coord is not None
            keys = (f"k{i}".encode() for i in range(1000))
            key = next(k for k in keys if a.node_id in a.ring.owners(k))
            await coord.set(key, b"acked", None, "all")
            # b holds a version a year ahead (written straight into its store, as a
            # node with a wild clock, or one poisoned before this check, would).
            assert b.store.apply(key, b"forged", future_ts(YEAR_MS), 9, 0, False, wall_clock_ms())
            before = a.clock.last
            assert await coord.get(key, "all") == [True, b"acked"]
            assert refused(a)["read"] >= 1
            assert a.clock.last < future_ts(round(a.config.max_clock_skew * 1000) + 1)
            assert a.clock.last >= before
            # Read repair did not push the forged version to c.
            await until(lambda: coord.background == 0, what="repairs done")
            got = local(c, key)
            assert got is not None and got[0] == b"acked"

    run(main())


def test_hlc_horizon_follows_max_clock_skew() -> None:
    async def main() -> None:
        async with cluster(size=1, max_clock_skew=0.5) as (_net, nodes):
            node = nodes[0]
            assert node.clock.max_skew_ms == 500
            assert node.clock.admits(future_ts(0))
            assert not node.clock.admits(future_ts(2_000))
            with pytest.raises(ClockSkewError):
                node.clock.update(future_ts(2_000))

    run(main())


# -------------------------------------------------- membership: only a node's own word


def intruder_hello(node_id: str, address: str, members: list[list[str]]) -> dict[str, Any]:
    # the cluster's own layout: what is tested is the word about members
    layout = layout_of(DistConfig(**FAST))
    info = {"node_id": node_id, "address": address, "members": members, "layout": layout}
    return make_hello("hypercache", node_id=node_id, address=address, info=info)


def test_a_hello_listing_fake_members_adds_none_of_them() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes):
            fakes = [[f"fake-{i}", f"127.0.66.{i + 1}:7400"] for i in range(8)]
            conn = await net.connect(
                nodes[0].address, intruder_hello("fake-9", "127.0.66.9:7400", fakes)
            )
            try:
                # ... and gossips them once more in a heartbeat.
                assert await conn.request(Op.PING, {"members": fakes}, 2) == "pong"
                m = nodes[0].membership
                assert m is not None
                # Every claim is checked (nobody answers there) and none believed.
                await until(lambda: m.checks_failed >= 9, what="the claims checked")
                claimed = [f"fake-{i}" for i in range(8)] + ["fake-9"]
                assert sorted(nid for nid, _ in m.candidates) == claimed
            finally:
                await conn.close()
            for n in nodes:
                assert sorted(n.ring.nodes) == ["n1", "n2", "n3"]
                assert len(n.members()) == 3
            coord = nodes[1].coordinator
            assert coord is not None
            for i in range(20):
                assert await coord.set(b"after-%d" % i, b"v", None, "all") is True

    run(main())


def test_a_hello_repointing_a_member_to_a_dead_address_changes_nothing() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes):
            n1, n2 = nodes[0], nodes[1]
            dead = "127.0.66.66:7400"
            conn = await net.connect(n1.address, intruder_hello("n2", dead, []))
            await conn.close()
            m = n1.membership
            assert m is not None
            await until(lambda: m.checks_failed >= 1, what="the claim checked")
            assert {nid: addr for nid, addr in n1.members()}["n2"] == n2.address
            coord = n1.coordinator
            assert coord is not None
            assert await coord.set(b"all-three", b"v", None, "all") is True

    run(main())


def test_with_a_cluster_secret_peers_must_prove_it() -> None:
    secret = "s3cret-shared-by-the-nodes"

    async def main() -> None:
        async with cluster(cluster_secret=secret) as (net, nodes):
            n1 = nodes[0]
            assert n1.peer_auth.enabled
            # The nodes proved it to each other: a full cluster.
            coord = n1.coordinator
            assert coord is not None
            assert await coord.set(b"k", b"v", None, "all") is True
            # A HELLO naming a node id without a proof is refused outright...
            with pytest.raises(HandshakeError, match="without a proof"):
                await net.connect(n1.address, intruder_hello("n2", "127.0.66.1:7400", []))
            # ... and so is one with a proof of another secret.
            wrong = PeerAuthenticator("not the secret of this cluster")
            hello = intruder_hello("n9", "127.0.66.9:7400", [])
            hello["proof"] = wrong.hello_proof("hypercache", "n9", "127.0.66.9:7400")
            with pytest.raises(HandshakeError, match="wrong proof"):
                await net.connect(n1.address, hello)
            assert n1.peer_auth.refused == 2
            assert len(n1.members()) == 3
            # A client needs no secret, and cannot send peer operations.
            async with client(net, n1) as c:
                assert await c.request(Op.GET, [b"k", "quorum"], 2) == [True, b"v"]
                with pytest.raises(PermissionDeniedError):
                    await c.request(Op.R_PUT_MANY, [[], 0], 2)

    run(main())


def test_a_member_moves_only_by_its_own_authenticated_word() -> None:
    secret = "s3cret-shared-by-the-nodes"

    async def main() -> None:
        async with cluster(cluster_secret=secret) as (net, nodes):
            n1, n2, n3 = nodes
            await n3.stop()
            # n3 comes back at another address, with the same id and the secret.
            moved = Node(
                DistConfig(
                    node_id="n3",
                    bind="127.0.10.99:7400",
                    seeds=(address(0),),
                    cluster_secret=secret,
                    **FAST,
                ),
                transport=net,
            )
            await moved.start()
            try:
                await until(
                    lambda: all(
                        {nid: addr for nid, addr in n.members()}["n3"] == "127.0.10.99:7400"
                        for n in (n1, n2)
                    ),
                    what="n3's new address everywhere",
                )
                coord = n2.coordinator
                assert coord is not None
                assert await coord.set(b"k", b"v", None, "all") is True
            finally:
                await moved.stop()

    run(main())


# ------------------------------------------------- TTL, EXPIRE, SCAN, FLUSH (issue 14)


def test_ttl_answers_the_expiry_of_the_newest_live_version() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes), client(net, nodes[1]) as c:
            before = wall_ms()
            await c.request(Op.SET, [b"t", b"v", 60_000, "all"], 2)
            await c.request(Op.SET, [b"forever", b"v", None, "all"], 2)
            for level in ("one", "quorum", "all", None):
                found, expire_at = await c.request(Op.TTL, [b"t", level], 2)
                assert found is True and before + 60_000 <= expire_at <= wall_ms() + 60_000
                assert await c.request(Op.TTL, [b"forever", level], 2) == [True, 0]
                assert await c.request(Op.TTL, [b"never", level], 2) == [False, 0]
            await c.request(Op.DELETE, [b"forever", "all"], 2)
            assert await c.request(Op.TTL, [b"forever", "quorum"], 2) == [False, 0]
            for n in nodes:  # the TTL has passed: expired reads as absent
                n.wall_ms = lambda: wall_clock_ms() + 61_000
            assert await c.request(Op.TTL, [b"t", "quorum"], 2) == [False, 0]
            assert nodes[1].metrics.stats.requests["ttl"] == 14
            with pytest.raises(ConfigError) as info:
                await c.request(Op.TTL, [b"t", "most"], 2)
            assert info.value.field == "consistency"
            with pytest.raises(ProtocolError):
                await c.request(Op.TTL, [b"t"], 2)

    run(main())


def test_ttl_reads_the_newest_version_and_repairs_the_stale_owner() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes), client(net, nodes[0]) as c:
            key = b"ttl-stale"
            await c.request(Op.SET, [key, b"v", None, "all"], 2)
            _, ts, origin, _, _ = local(nodes[0], key)
            owners = nodes[0].ring.owners(key)
            by_id = {n.node_id: n for n in nodes}
            fresh, stale = [by_id[o] for o in owners[:2]], by_id[owners[2]]
            expire_at = wall_ms() + 30_000
            for n in fresh:  # a newer version, with an expiry, on two owners only
                assert n.replica.put(key, b"v", ts + 1, origin, expire_at, False)
            assert await c.request(Op.TTL, [key, "quorum"], 2) == [True, expire_at]
            await until(lambda: local(stale, key)[3] == expire_at, what="read repair")

    run(main())


def test_expire_writes_the_value_back_with_a_new_expiry_as_a_newer_version() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes), client(net, nodes[2]) as c:
            await c.request(Op.SET, [b"e", b"value", None, "all"], 2)
            old = local(nodes[0], b"e")
            before = wall_ms()
            assert await c.request(Op.EXPIRE, [b"e", 5_000, "quorum"], 2) is True
            found, expire_at = await c.request(Op.TTL, [b"e", "quorum"], 2)
            assert found and before + 5_000 <= expire_at <= wall_ms() + 5_000
            await until(lambda: all(local(n, b"e")[3] == expire_at for n in nodes), what="all")
            for n in nodes:
                value, ts, _origin, _, tombstone = local(n, b"e")
                assert value == b"value" and not tombstone and ts > old[1]
            # nil: no expiry any more
            assert await c.request(Op.EXPIRE, [b"e", None, "all"], 2) is True
            assert await c.request(Op.TTL, [b"e", "all"], 2) == [True, 0]
            assert await c.request(Op.GET, [b"e", "all"], 2) == [True, b"value"]
            # Absent, deleted, expired: False, and nothing is written.
            assert await c.request(Op.EXPIRE, [b"absent", 1_000, "all"], 2) is False
            assert all(local(n, b"absent") is None for n in nodes)
            await c.request(Op.DELETE, [b"e", "all"], 2)
            assert await c.request(Op.EXPIRE, [b"e", 1_000, "all"], 2) is False
            assert all(local(n, b"e")[4] is True for n in nodes)  # still a tombstone
            await c.request(Op.SET, [b"short", b"v", 1_000, "all"], 2)
            for n in nodes:
                n.wall_ms = lambda: wall_clock_ms() + 2_000
            assert await c.request(Op.EXPIRE, [b"short", 60_000, "all"], 2) is False
            stats = nodes[2].metrics.stats
            assert stats.requests["expire"] == 5
            # A write-back is a SET too: 2 SETs by hand, 2 EXPIREs that found the key.
            assert stats.requests["set"] == 4

    run(main())


def test_a_set_after_expire_wins_and_bad_expires_are_refused() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes), client(net, nodes[0]) as c:
            await c.request(Op.SET, [b"k", b"one", None, "all"], 2)
            assert await c.request(Op.EXPIRE, [b"k", 60_000, "all"], 2) is True
            await c.request(Op.SET, [b"k", b"two", None, "all"], 2)  # last writer wins
            assert await c.request(Op.GET, [b"k", "all"], 2) == [True, b"two"]
            assert await c.request(Op.TTL, [b"k", "all"], 2) == [True, 0]
            for bad in (0, -1, 1.5, "10", 2**63):
                with pytest.raises(ConfigError) as info:
                    await c.request(Op.EXPIRE, [b"k", bad, None], 2)
                assert info.value.field == "ttl_ms"
            with pytest.raises(ProtocolError):
                await c.request(Op.EXPIRE, [b"k", 1_000], 2)
            assert await c.request(Op.GET, [b"k", "all"], 2) == [True, b"two"]

    run(main())


def test_expire_fails_with_its_quorum_and_writes_nothing_without_it() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes):
            await nodes[2].server.close()  # n3 dies
            async with client(net, nodes[0]) as c:
                await c.request(Op.SET, [b"q", b"v", None, "quorum"], 3)
                with pytest.raises(QuorumError) as info:
                    await c.request(Op.EXPIRE, [b"q", 1_000, "all"], 3)
                assert (info.value.acks, info.value.required) == (2, 3)
                assert await c.request(Op.TTL, [b"q", "quorum"], 3) == [True, 0]
                assert await c.request(Op.EXPIRE, [b"q", 9_000, "quorum"], 3) is True
            assert nodes[0].metrics.stats.quorum_failures["expire"] == 1

    run(main())


def _live_keys(node: Node) -> set[bytes]:
    """The keys of ``node``'s live entries (no tombstones, nothing expired)."""
    now = node.wall_ms()
    out = set()
    for p in range(int(node.store.partitions)):
        for key, _v, _ts, _o, expire_at, tombstone in node.store.entries(p):
            if not tombstone and (expire_at == 0 or expire_at > now):
                out.add(key)
    return out


async def _scan_all(c: ClientConnection, limit: int, prefix: bytes | None = None) -> list[bytes]:
    keys: list[bytes] = []
    cursor = None
    pages = 0
    while True:
        payload = [cursor, limit] if prefix is None else [cursor, limit, prefix]
        page, cursor = await c.request(Op.SCAN, payload, 2)
        assert len(page) <= limit
        keys += page
        pages += 1
        assert pages < 10_000, "the cursor does not advance"
        if cursor is None:
            return keys


def test_scan_pages_through_the_live_keys_a_node_holds_once_each() -> None:
    async def main() -> None:
        # Replication 2 of 3: each node holds about two thirds of the keys.
        async with cluster(replication=2) as (net, nodes), client(net, nodes[0]) as c:
            for i in range(300):
                await c.request(Op.SET, [f"user:{i}".encode(), b"v", None, "all"], 2)
            for i in range(40):
                await c.request(Op.SET, [f"tmp:{i}".encode(), b"v", 1_000, "all"], 2)
            for i in range(0, 300, 10):
                await c.request(Op.DELETE, [f"user:{i}".encode(), "all"], 2)
            for n in nodes:  # the tmp: keys expire
                n.wall_ms = lambda: wall_clock_ms() + 2_000
            # A previous owner may still hold everything until its grace has passed.
            assert any(0 < len(_live_keys(n)) < 270 for n in nodes)
            for n in nodes:
                async with client(net, n) as cn:
                    expected = _live_keys(n)
                    assert 0 < len(expected) <= 270
                    assert all(k.startswith(b"user:") for k in expected)
                    for limit in (7, 1000, 10**6):
                        keys = await _scan_all(cn, limit)
                        assert len(keys) == len(set(keys))  # once each
                        assert set(keys) == expected
                        order = [(n.store.partition_of(k), k) for k in keys]
                        assert order == sorted(order)
                    assert set(await _scan_all(cn, 5, b"user:1")) == {
                        k for k in expected if k.startswith(b"user:1")
                    }
                    assert await _scan_all(cn, 5, b"nothing") == []
            page, cursor = await c.request(Op.SCAN, [None, 10**6], 2)
            assert cursor is None and set(page) == _live_keys(nodes[0])  # under MAX_SCAN

    run(main())


def test_scan_pages_are_bounded_in_keys_bytes_and_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from hypercache.cluster import replica as replica_module

    async def main() -> None:
        async with cluster(1) as (net, nodes), client(net, nodes[0]) as c:
            for i in range(1200):
                await c.request(Op.SET, [b"%04d" % i, b"v", None, "one"], 2)
            page, cursor = await c.request(Op.SCAN, [None, 5000], 2)
            assert len(page) == replica_module.MAX_SCAN and cursor is not None
            # bytes: keys of 4 bytes cost 12; 100 bytes hold 8 of them
            monkeypatch.setattr(replica_module, "SCAN_MAX_BYTES", 100)
            page, cursor = await c.request(Op.SCAN, [None, 50], 2)
            assert len(page) == 8 and cursor is not None
            assert len(await _scan_all(c, 50)) == 1200
            monkeypatch.setattr(replica_module, "SCAN_MAX_BYTES", 1 << 20)
            # work: a prefix that matches nothing ends pages at partition boundaries
            monkeypatch.setattr(replica_module, "SCAN_BUDGET", 20)
            page, cursor = await c.request(Op.SCAN, [None, 50, b"zzz"], 2)
            assert page == [] and cursor is not None
            assert await _scan_all(c, 50, b"zzz") == []
            assert len(await _scan_all(c, 50)) == 1200

    run(main())


def test_scan_refuses_bad_requests_clearly() -> None:
    async def main() -> None:
        async with cluster(1, max_key=16) as (net, nodes), client(net, nodes[0]) as c:
            for limit in (0, -1, 1.5, None, True):
                with pytest.raises(ConfigError) as info:
                    await c.request(Op.SCAN, [None, limit], 2)
                assert info.value.field == "limit"
            for cursor in (b"", b"\x00\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00\x01", "c"):
                with pytest.raises(ConfigError) as info:
                    await c.request(Op.SCAN, [cursor, 10], 2)
                assert info.value.field == "cursor"
            with pytest.raises(ProtocolError):
                await c.request(Op.SCAN, [None], 2)
            with pytest.raises(ProtocolError):
                await c.request(Op.SCAN, [None, 10, "text"], 2)
            with pytest.raises(KeyTooLargeError):
                await c.request(Op.SCAN, [None, 10, b"p" * 17], 2)

    run(main())


def test_flush_drops_what_the_node_holds_and_its_hints_and_counts_it() -> None:
    async def main() -> None:
        async with cluster() as (net, nodes), client(net, nodes[0]) as c:
            for i in range(50):
                await c.request(Op.SET, [b"f%d" % i, b"v", None, "all"], 2)
            await c.request(Op.SET, [b"gone", b"v", 1_000, "all"], 2)
            await c.request(Op.DELETE, [b"f0", "all"], 2)
            await until(lambda: all(len(n.store) == 50 for n in nodes), what="replicas")
            hints = nodes[0].handoff
            hints.hint("n2", b"hinted", b"v", 1, 1, 0, False)
            assert hints.buffer.stats()["queued"] == 1
            for n in nodes:  # "gone" expired: not counted as dropped
                n.wall_ms = lambda: wall_clock_ms() + 2_000
            assert await c.request(Op.FLUSH, [], 2) == 49  # f1..f49 (f0 is a tombstone)
            assert len(nodes[0].store) == 0 and nodes[0].store.tombstones == 0
            assert hints.buffer.stats()["queued"] == 0
            assert len(nodes[1].store) == 50  # the others keep theirs (not swept yet)
            assert await c.request(Op.FLUSH, None, 2) == 0
            stats = nodes[0].metrics.stats
            assert (stats.flushes, stats.flushed_entries) == (2, 49)
            text = nodes[0].metrics.render().decode()
            assert "hypercache_flushes_total 2.0" in text
            assert "hypercache_flushed_entries_total 49.0" in text
            with pytest.raises(ProtocolError):
                await c.request(Op.FLUSH, [1], 2)

    run(main())


def test_topology_advertises_max_value() -> None:
    async def main() -> None:
        async with cluster(1, max_value=4096) as (net, nodes), client(net, nodes[0]) as c:
            assert (await c.request(Op.TOPOLOGY, None, 2))["max_value"] == 4096

    run(main())
