"""An AsyncClient's QUORUM read from the owners leaves no reference cycle behind: a
finished read is freed by reference counting, so a client reading in a loop does not
feed the garbage collector (whose pauses land in the read latency's tail)."""

from __future__ import annotations

import gc

from aio_helpers import run
from cluster_harness import FAST

from hypercache import AsyncClient
from hypercache.client._common import OwnerRead
from hypercache.client.owner_ask import OwnerAsk
from hypercache.cluster.local import InprocCluster

READS = 200


def test_a_quorum_owner_read_leaves_no_cyclic_garbage() -> None:
    async def main() -> tuple[list[object], int]:
        async with InprocCluster(3, settings=FAST, address="127.0.14.{n}:7400") as cluster:
            client = AsyncClient(cluster.addresses, transport=cluster.net, consistency="quorum")
            async with client:
                await client.set_many({f"k{i}": b"v" for i in range(20)})
                for i in range(20):  # connections to every owner, the table known
                    await client.get(f"k{i}")
                reads_before = client.stats.owner_reads
                gc.collect()
                gc.disable()
                gc.set_debug(gc.DEBUG_SAVEALL)
                try:
                    for i in range(READS):
                        assert await client.get(f"k{i % 20}") == b"v"
                    gc.collect()
                    garbage = list(gc.garbage)
                finally:
                    gc.set_debug(0)
                    gc.garbage.clear()
                    gc.enable()
                return garbage, client.stats.owner_reads - reads_before

    garbage, owner_reads = run(main())
    assert owner_reads == READS  # the reads did go to the owners
    left = [o for o in garbage if isinstance(o, OwnerRead | OwnerAsk)]
    assert left == [], f"{len(left)} owner reads of {READS} were only freed by the GC"
