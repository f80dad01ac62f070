"""The replica-write retry (docs/design.md, "Retries") on the in-process transport:
a write whose answers are lost is sent once more to each owner, inside the request
deadline, and hinted when both tries fail; reads are not retried."""

from __future__ import annotations

from aio_helpers import run
from cluster_harness import FAST, key_owned_by, local

from hypercache.cluster.local import InprocCluster, until
from hypercache.errors import QuorumError
from hypercache.net.faults import FaultInjector, FaultyTransport
from hypercache.net.inproc import InprocNetwork
from hypercache.net.transport import Transport


def faulty(_index: int, net: InprocNetwork) -> Transport:
    return FaultyTransport(net, FaultInjector())


def test_a_write_whose_answers_are_lost_is_sent_twice_then_hinted() -> None:
    async def main() -> None:
        async with InprocCluster(3, settings=FAST, transport=faulty) as cluster:
            n1, n2, n3 = cluster.nodes
            key = key_owned_by(n1, ["n1", "n2", "n3"])
            assert n1.faults is not None and n2.faults is not None
            n1.faults.load({"rules": [{"kind": "drop", "direction": "in", "peers": ["n2", "n3"]}]})
            puts = [n.metrics.stats.replica_puts for n in (n2, n3)]
            try:
                await n1.coordinator.set(key, b"v", consistency="quorum")
            except QuorumError as exc:
                assert (exc.acks, exc.required) == (1, 2)
            else:
                raise AssertionError("a write with every peer answer lost reached QUORUM")
            stats = n1.metrics.stats
            assert stats.replica_retries == 2
            assert stats.quorum_failures["set"] == 1
            # each peer got the write twice (a lost answer is no lost request) and
            # holds it once, with the coordinator's version
            assert [
                n.metrics.stats.replica_puts - p for n, p in zip((n2, n3), puts, strict=True)
            ] == [2, 2]
            assert local(n2, key)[:3] == local(n3, key)[:3] == local(n1, key)[:3]
            assert sum(n1.handoff.pending().values()) == 2
            assert n1.faults.injected["drop"] >= 4

            # a read is not retried
            n1.faults.clear()
            await until(lambda: n1.membership.up_count() == 3, what="peers up again")
            n1.faults.load({"rules": [{"kind": "drop", "direction": "out", "peers": ["n2", "n3"]}]})
            try:
                await n1.coordinator.get(key, consistency="quorum")
            except QuorumError:
                pass
            else:
                raise AssertionError("a read with every peer request lost reached QUORUM")
            assert stats.replica_retries == 2
            assert n2.faults.injected == {"drop": 0, "delay": 0, "partition": 0}

    run(main())
