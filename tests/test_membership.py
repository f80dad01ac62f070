"""Membership on SWIM with real nodes on the in-process transport: a stopped node is
suspected, then dead, and stays in the ring; removal and leave take a node out of
every ring and out of hinting; refutation, restarts, the membership version in every
report, and who may send the membership operations."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aio_helpers import run
from cluster_harness import FAST

from hypercache.cluster import membership as membership_module
from hypercache.cluster.config import DistConfig
from hypercache.cluster.local import InprocCluster, until
from hypercache.cluster.node import Node
from hypercache.cluster.status import NodeStatus
from hypercache.cluster.swim import State
from hypercache.errors import ConfigError, PermissionDeniedError, ProtocolError
from hypercache.net.connection import ClientConnection
from hypercache.net.inproc import InprocNetwork
from hypercache.net.protocol import Op, make_hello

ADDRESS = "127.0.11.{n}:7400"
#: FAST, with a short suspicion so that the dead are dead soon.
SWIM: dict[str, Any] = {**FAST, "suspect_timeout": 0.3}


@contextlib.asynccontextmanager
async def cluster(size: int = 3, **overrides: Any) -> AsyncIterator[InprocCluster]:
    async with InprocCluster(size, settings={**SWIM, **overrides}, address=ADDRESS) as c:
        yield c


@contextlib.asynccontextmanager
async def connect(
    net: InprocNetwork, node: Node, *, as_peer: bool
) -> AsyncIterator[ClientConnection]:
    hello = (
        make_hello(
            "hypercache",
            node_id="tester",
            address="127.0.11.250:7400",
            info={"layout": node.membership.layout},  # a peer of the same layout
        )
        if as_peer
        else make_hello("hypercache")
    )
    conn = await net.connect(node.address, hello)
    try:
        yield conn
    finally:
        await conn.close()


def held_as(nodes: list[Node], member: str, state: State) -> bool:
    return all(n.membership.state_of(member) is state for n in nodes)


def one_version(nodes: list[Node]) -> bool:
    return len({n.membership.version for n in nodes}) == 1


def test_a_stopped_node_is_suspected_then_dead_and_stays_in_the_ring() -> None:
    async def main() -> None:
        async with cluster() as c:
            n1, n2, n3 = c.nodes
            assert one_version(c.nodes)
            await n3.stop()
            await until(lambda: held_as([n1, n2], "n3", State.DEAD), what="n3 dead")
            for n in (n1, n2):
                assert n.membership.swim.transitions[State.SUSPECT] >= 1  # suspect first
                assert "n3" in n.ring.nodes and ["n3", n3.address] in n.members()
                assert not n.membership.is_up("n3") and n.membership.up_count() == 2
            await until(lambda: one_version([n1, n2]), what="one version")
            # Its partitions stay where they were: writes it misses are hinted.
            assert await n1.coordinator.set(b"k", b"v", None, "quorum") is True
            assert n1.handoff.pending().get("n3", 0) == 1

    run(main())


def test_removal_takes_a_dead_node_out_of_every_ring_and_drops_its_hints() -> None:
    async def main() -> None:
        async with cluster() as c:
            n1, n2, n3 = c.nodes
            await n3.stop()
            await until(lambda: held_as([n1, n2], "n3", State.DEAD), what="n3 dead")
            await n1.coordinator.set(b"k", b"v", None, "quorum")
            await n2.coordinator.set(b"k2", b"v", None, "quorum")
            assert n2.handoff.pending()["n3"] == 1
            status = NodeStatus(n1)
            # Only a dead (or suspect) member can be removed.
            with pytest.raises(ConfigError, match="n2 is alive"):
                n1.membership.remove("n2")
            body, code = status.remove("n2")
            assert code == 409 and "only a dead or suspect" in body["error"]
            assert status.remove("nobody")[1] == 404
            body, code = status.remove("n3")
            assert (code, body["removed"]) == (200, True)
            assert status.remove("n3")[0]["removed"] is False  # again: nothing to do
            await until(
                lambda: (
                    held_as([n1, n2], "n3", State.REMOVED)
                    and all("n3" not in n.ring.nodes for n in (n1, n2))
                ),
                what="n3 removed everywhere",
            )
            assert one_version([n1, n2])
            for n in (n1, n2):
                assert "n3" not in n.handoff.pending()
                assert n.topology()["nodes"] == [["n1", n1.address], ["n2", n2.address]]
                assert n.topology()["version"] == n.membership.version
            # Two owners left, both up: ALL is two acks.
            assert await n2.coordinator.set(b"k3", b"v", None, "all") is True
            members = {m["node_id"]: m for m in status.members()["members"]}
            assert members["n3"]["state"] == "removed" and not members["n3"]["up"]

    run(main())


def test_a_node_that_leaves_is_out_of_every_ring_and_never_hinted_for() -> None:
    async def main() -> None:
        async with cluster() as c:
            n1, n2, n3 = c.nodes
            # A write n3 misses (its server is gone, its membership still runs) is
            # hinted for it...
            await n3.server.close()
            assert await n1.coordinator.set(b"missed", b"v", None, "quorum") is True
            await until(lambda: n1.handoff.pending().get("n3") == 1, what="a hint for n3")
            # ... until it leaves.
            assert await n3.membership.leave() == 2
            assert "n3" not in n3.ring.nodes  # out of its own ring at once
            await until(
                lambda: (
                    held_as(c.nodes, "n3", State.LEFT)
                    and all("n3" not in n.ring.nodes for n in (n1, n2))
                ),
                what="n3 left everywhere",
            )
            assert one_version(c.nodes)
            assert "n3" not in n1.handoff.pending()
            # A write that raced the departure (its owners taken from an older
            # ring) gets no hint for the member that left.
            coord = n1.coordinator
            coord.owners = lambda key: ["n1", "n2", "n3"]
            assert await coord.set(b"raced", b"v", None, "quorum") is True
            assert "n3" not in n1.handoff.pending()
            coord.owners = n1._owners
            # Stopped, it stays left: it is not probed, so never suspected.
            await n3.stop()
            rounds = n1.membership.gossip_rounds
            await until(lambda: n1.membership.gossip_rounds >= rounds + 10, what="10 rounds")
            assert held_as([n1, n2], "n3", State.LEFT)
            assert n1.membership.swim.transitions[State.SUSPECT] == 0

    run(main())


def test_a_suspected_node_refutes_over_the_wire() -> None:
    async def main() -> None:
        async with cluster() as c:
            n1, _, n3 = c.nodes
            inc = n1.membership.swim.members["n3"].incarnation
            # A peer tells n1 that n3 is suspect (a lie, or a lost probe).
            async with connect(c.net, n1, as_peer=True) as peer:
                claim = ["n3", n3.address, inc, int(State.SUSPECT), inc]
                answer = await peer.request(Op.PING, {"gossip": [claim]}, 2)
                assert answer["gossip"][0][0] == "n1"  # n1's own record first
            await until(
                lambda: n3.membership.incarnation > inc and held_as(c.nodes, "n3", State.ALIVE),
                what="n3's refutation everywhere",
            )
            assert n3.membership.swim.refutations >= 1
            await until(lambda: one_version(c.nodes), what="one version")

    run(main())


def test_a_restarted_node_is_a_restart_to_its_peers() -> None:
    async def main() -> None:
        async with cluster() as c:
            n1, _, n3 = c.nodes
            restarts: list[str] = []
            n1.membership.restart_listeners.append(restarts.append)
            before = n1.membership.swim.members["n3"].incarnation
            await n3.stop()
            await until(lambda: not n1.membership.is_up("n3"), what="n3 down")
            c.nodes[2] = n3 = Node(
                DistConfig(node_id="n3", bind=n3.address, seeds=(n1.address,), **SWIM),
                transport=c.net,
            )
            await n3.start()
            await until(
                lambda: restarts == ["n3"] and held_as(c.nodes, "n3", State.ALIVE),
                what="n3 back",
            )
            assert n1.membership.swim.members["n3"].incarnation > before
            await until(lambda: one_version(c.nodes), what="one version")

    run(main())


def test_the_version_and_the_states_are_in_every_report() -> None:
    async def main() -> None:
        async with cluster() as c:
            n1 = c.nodes[0]
            await until(lambda: one_version(c.nodes), what="one version")
            version = n1.membership.version
            status = NodeStatus(n1)
            assert n1.topology()["version"] == version and "epoch" in n1.topology()
            health, running = status.health()
            assert running and health["version"] == version and health["members_up"] == 3
            stats = status.stats()["membership"]
            assert stats["version"] == version and stats["states"]["alive"] == 3
            members = status.members()
            assert members["version"] == version and members["epoch"] == n1.epoch
            rows = {m["node_id"]: m for m in members["members"]}
            assert set(rows) == {"n1", "n2", "n3"}
            for row in rows.values():
                assert row["state"] == "alive" and row["up"] and row["incarnation"] > 0
                assert row["since"] > 0 and row["since_s"] >= 0
            assert rows["n1"]["self"] and not rows["n2"]["self"]
            await until(lambda: n1.membership.swim.probes["ack"] > 0, what="a probe acked")
            samples = dict(
                line.rsplit(" ", 1)
                for line in n1.metrics.render().decode().splitlines()
                if line and not line.startswith("#")
            )
            # Exact: the version has 53 bits.
            assert int(float(samples["hypercache_dist_membership_version"])) == version
            assert float(samples['hypercache_dist_members{state="alive"}']) == 3
            assert float(samples['hypercache_dist_members{state="dead"}']) == 0
            assert float(samples['hypercache_dist_probes_total{result="ack"}']) >= 1
            assert 'hypercache_dist_member_transitions_total{to="suspect"}' in samples

    run(main())


def test_the_membership_operations_are_for_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with cluster() as c:
            n1, n2, _ = c.nodes
            async with connect(c.net, n1, as_peer=False) as client:
                assert await client.request(Op.PING, None, 2) == "pong"
                assert await client.request(Op.PING, {"gossip": []}, 2) == "pong"
                for op, payload in ((Op.PING_REQ, ["n2", [], 100]), (Op.MEMBERS, {"table": []})):
                    with pytest.raises(PermissionDeniedError):
                        await client.request(op, payload, 2)
            async with connect(c.net, n1, as_peer=True) as peer:
                answer = await peer.request(Op.PING_REQ, ["n2", [], 500], 2)
                assert answer["ack"] is True
                assert (await peer.request(Op.PING_REQ, ["nobody", [], 500], 2))["ack"] is False
                table = (await peer.request(Op.MEMBERS, {"table": []}, 2))["table"]
                assert sorted(r[0] for r in table) == ["n1", "n2", "n3"]
                with pytest.raises(ProtocolError):
                    await peer.request(Op.PING_REQ, ["n2"], 2)
                with pytest.raises(ProtocolError):
                    await peer.request(Op.MEMBERS, [], 2)
                # At the cap of indirect probes running, a PING_REQ is a nack at once.
                monkeypatch.setattr(membership_module, "MAX_PENDING_INDIRECT", 0)
                assert (await peer.request(Op.PING_REQ, ["n2", [], 500], 2))["ack"] is False
                assert n1.membership.indirect_refused == 1
            assert n2.membership.state_of("n1") is State.ALIVE

    run(main())
