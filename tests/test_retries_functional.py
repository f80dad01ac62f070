"""Replica-write retries (docs/design.md, "Retries"): under 10% message loss both
ways between the nodes, QUORUM writes fail less than 2% of the time, and every
acknowledged write is there once the loss stops."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from chaos.nemesis import FAULT_FLAGS, heal, injected, loss, set_faults
from cluster_harness import running_cluster

from hypercache import Client
from hypercache.errors import HyperCacheError

pytestmark = pytest.mark.functional

WRITERS = 8
WRITES_PER_WRITER = 50
#: < 2% of the writes (the policy's figure is 0.13%; without retries 3.6%)
MAX_FAILED = WRITERS * WRITES_PER_WRITER * 2 // 100


def test_quorum_writes_under_ten_percent_loss_both_ways(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path, FAULT_FLAGS) as cluster:
        seeds = cluster.addresses
        set_faults(cluster, loss(0.10), seed=None)
        acked: dict[str, bytes] = {}
        failed: list[str] = []
        lock = threading.Lock()

        def writer(t: int) -> None:
            # Through a node: the faults are on the nodes' links to each other, and
            # the retries measured are a coordinator's replica writes.
            with Client(seeds, timeout=5.0, consistency="quorum", write_path="proxy") as client:
                for i in range(WRITES_PER_WRITER):
                    key, value = f"w{t}-{i}", f"v{t}-{i}".encode()
                    try:
                        client.set(key, value)
                    except HyperCacheError as exc:
                        with lock:
                            failed.append(f"{key}: {exc!r}")
                    else:
                        with lock:
                            acked[key] = value

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(WRITERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        drops = sum(injected(node)["drop"] for node in cluster)
        retries = sum(node.http_json("/dist/metrics")["replica_retries"] for node in cluster)
        heal(cluster)
        assert drops > 0 and retries > 0, (drops, retries)
        assert len(failed) <= MAX_FAILED, failed
        with Client(seeds, timeout=5.0, consistency="quorum") as client:
            lost = [k for k, v in acked.items() if client.get(k) != v]
        assert lost == []
