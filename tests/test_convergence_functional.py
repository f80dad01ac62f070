"""Replica convergence on real ``hypercache-node`` processes: hinted handoff, hint
caps, Merkle anti-entropy and the delete / resurrection matrix.

A node "down with its data" is a SIGSTOPped process (its peers' failure detectors
mark it down; SIGCONT brings it back with its store intact); a node "down and
restarted" is SIGKILLed and started again, empty, with the same id and addresses.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import running_cluster

from hypercache.cluster.local import ProcessCluster, wait_for
from hypercache.net.protocol import Op

pytestmark = pytest.mark.functional

#: Hinted handoff alone: anti-entropy far away.
HINTS_ONLY = (
    "--anti-entropy-interval", "300", "--anti-entropy-max-interval", "300",
    "--hint-ttl", "120", "--tombstone-ttl", "1000",
)  # fmt: skip


def hints(cluster: ProcessCluster, i: int) -> Any:
    return cluster[i].http_json("/dist/hints")


def keys_of(cluster: ProcessCluster, i: int) -> int:
    keys: int = cluster[i].http_json("/stats")["keys"]
    return keys


def ae_stats(cluster: ProcessCluster, i: int) -> Any:
    return cluster[i].http_json("/dist/antientropy")


def digests(cluster: ProcessCluster, i: int) -> Any:
    return cluster[i].http_json("/internal/merkle")["digests"]


def all_digests_equal(cluster: ProcessCluster) -> bool:
    first = digests(cluster, 0)
    return all(digests(cluster, i) == first for i in range(1, len(cluster)))


def set_many(cluster: ProcessCluster, i: int, keys: list[bytes], value: bytes = b"v") -> None:
    conn = cluster.conn(i)
    for start in range(0, len(keys), 2000):
        chunk = keys[start : start + 2000]
        answers = conn.pipeline([(Op.SET, [k, value + k, None, "quorum"]) for k in chunk], 60)
        assert answers == [True] * len(chunk)


def pause(cluster: ProcessCluster, i: int) -> None:
    """SIGSTOP node ``i`` and wait until the others see it down."""
    cluster._drop_conn(i)
    cluster[i].signal(signal.SIGSTOP)
    others = [j for j in range(len(cluster)) if j != i]
    wait_for(
        lambda: all(cluster[j].http_json("/health")["members_up"] == 2 for j in others),
        timeout=15,
        what=f"node {i} seen down",
    )


def resume(cluster: ProcessCluster, i: int) -> None:
    cluster[i].signal(signal.SIGCONT)
    wait_for(
        lambda: all(
            cluster[j].http_json("/health")["members_up"] == len(cluster)
            for j in range(len(cluster))
        ),
        timeout=15,
        what=f"node {i} seen up",
    )


@pytest.fixture
def resumed() -> Iterator[list[Any]]:
    """Processes a test paused: always resumed, so that they can be stopped."""
    paused: list[Any] = []
    yield paused
    for node in paused:
        node.signal(signal.SIGCONT)


# ------------------------------------------------------------------ hinted handoff


def test_hints_bring_a_restarted_node_every_key(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path, HINTS_ONLY) as cluster:
        keys = [f"h{i:05d}".encode() for i in range(10_000)]
        cluster.kill(2)
        set_many(cluster, 0, keys)
        waiting = sum(hints(cluster, i)["queued"] for i in (0, 1))
        assert waiting == len(keys)  # node 0 coordinated every write
        cluster.restart(2)
        wait_for(
            lambda: all(hints(cluster, i)["queued"] == 0 for i in range(3)),
            timeout=60,
            what="every hint replayed",
        )
        wait_for(
            lambda: keys_of(cluster, 2) == keys_of(cluster, 0) == len(keys),
            timeout=30,
            what="the restarted node to hold every key",
        )
        assert sum(hints(cluster, i)["replayed"] for i in range(3)) >= len(keys)
        # Anti-entropy had no part in it.
        assert all(ae_stats(cluster, i)["keys_pushed"] == 0 for i in range(3))
        metrics = cluster[0].http_text("/metrics")
        assert "hypercache_dist_hints_replayed_total" in metrics
        assert "hypercache_dist_hints_queued 0.0" in metrics


def test_hint_caps_drop_and_the_rest_is_repaired(tmp_path: Path) -> None:
    flags = (
        "--hint-max-per-node", "200", "--hint-max-total", "300", "--hint-max-bytes", "32KiB",
        "--anti-entropy-interval", "1", "--anti-entropy-max-interval", "2",
        "--hint-ttl", "60", "--tombstone-ttl", "120",
    )  # fmt: skip
    with running_cluster(3, tmp_path, flags) as cluster:
        keys = [f"c{i:05d}".encode() for i in range(3_000)]
        cluster.kill(2)
        set_many(cluster, 0, keys)
        state = hints(cluster, 0)
        assert state["dropped_total"] > 0
        assert state["dropped"]["node_cap"] + state["dropped"]["bytes_cap"] > 0
        assert state["bytes"] <= 32 * 1024 == state["max_bytes"]
        assert 0 < state["queued"] <= 200
        metrics = cluster[0].http_text("/metrics")
        assert 'hypercache_dist_hints_dropped_total{cap="bytes_cap"}' in metrics
        cluster.restart(2)
        wait_for(
            lambda: keys_of(cluster, 2) == len(keys),
            timeout=30,
            what="the restarted node to get every key back",
        )
        assert all(hints(cluster, i)["queued"] == 0 for i in range(3))
        # A node restarted empty pulls its partitions from its co-owners (streaming);
        # anti-entropy repairs whatever that and the hints left out.
        pushed = sum(ae_stats(cluster, i)["keys_pushed"] for i in range(3))
        pulled = sum(ae_stats(cluster, i)["keys_pulled"] for i in range(3))
        streamed = cluster[2].http_json("/dist/rebalance")["keys_moved"]
        assert pushed + pulled + streamed >= len(keys) - 200
        wait_for(lambda: all_digests_equal(cluster), timeout=10, what="equal digests")


# ------------------------------------------------------------------ anti-entropy


def test_injected_divergence_converges_within_one_interval(tmp_path: Path) -> None:
    max_interval = 3.0
    flags = (
        "--anti-entropy-interval", "0.5", "--anti-entropy-max-interval", str(max_interval),
        "--hint-ttl", "60", "--tombstone-ttl", "120",
    )  # fmt: skip
    with running_cluster(3, tmp_path, flags) as cluster:

        def exchanged() -> int:
            total = 0
            for i in range(3):
                s = ae_stats(cluster, i)
                total += s["bytes_sent"] + s["bytes_received"]
            return total

        def diverge(keys: list[bytes]) -> int:
            """Newer versions of ``keys`` written to node 0 only; return the bytes
            anti-entropy exchanged until every replica agrees again."""
            wait_for(lambda: all_digests_equal(cluster), timeout=20, what="agreement")
            before = exchanged()
            ts = (int(time.time() * 1000) + 1000) << 16
            writes = [(Op.R_PUT, [k, b"d" * 100, ts, 7, 0, False]) for k in keys]
            assert cluster.conn(0).pipeline(writes, 60) == [True] * len(keys)
            start = time.monotonic()
            wait_for(lambda: all_digests_equal(cluster), timeout=20, what="convergence")
            assert time.monotonic() - start < max_interval + 2.0
            for i in (1, 2):
                entry = cluster.request(i, Op.R_GET, [keys[0]])
                assert entry[:3] == [b"d" * 100, ts, 7]
            return exchanged() - before

        keys = [f"a{i:05d}".encode() for i in range(10_000)]
        set_many(cluster, 0, keys[:1_000], b"v" * 100)
        small = diverge(keys[:500])
        set_many(cluster, 0, keys[1_000:], b"v" * 100)
        large = diverge(keys[1_000:1_500])
        double = diverge(keys[2_000:3_000])
        # Bytes follow the divergence, not the number of keys held.
        assert 0.6 < large / small < 1.6, (small, large)
        assert 1.4 < double / large < 2.6, (large, double)
        # The paged listing shows the same versions on every replica.
        p = cluster[0].http_json(f"/dist/owners?key_hex={keys[0].hex()}")["partition"]
        listings: list[Any] = []
        for i in range(3):
            rows, cursor = [], ""
            while cursor is not None:
                page = cluster[i].http_json(
                    f"/internal/keys?partition={p}&limit=2"
                    + (f"&cursor={cursor}" if cursor else "")
                )
                rows += page["keys"]
                cursor = page["next_cursor"]
            listings.append(rows)
        assert listings[0] == listings[1] == listings[2]
        assert keys[0].hex() in [row["key"] for row in listings[0]]
        sub = cluster[1].http_json(f"/internal/merkle?partition={p}")
        assert sub["digest"] == digests(cluster, 1)[str(p)] and len(sub["sub_digests"]) == 64
        # What was exchanged is of the order of the divergent entries themselves
        # (500 entries of ~110 bytes, each repaired on two replicas).
        assert large < 500 * 110 * 2 * 6


# ------------------------------------------------------- deletes and resurrection


def entry(cluster: ProcessCluster, i: int, key: bytes) -> Any:
    return cluster.request(i, Op.R_GET, [key])


def absent_everywhere(cluster: ProcessCluster, key: bytes) -> bool:
    """Every replica holds the tombstone (or nothing) and every read misses."""
    for i in range(len(cluster)):
        got = entry(cluster, i, key)
        if got is not None and not got[4]:
            return False
    return all(cluster.request(i, Op.GET, [key, "all"]) == [False, None] for i in range(3))


def test_delete_while_a_replica_is_down(tmp_path: Path, resumed: list[Any]) -> None:
    flags = (
        "--hint-max-per-node", "20", "--hint-max-total", "20",
        "--hint-ttl", "2", "--anti-entropy-interval", "1", "--anti-entropy-max-interval", "2",
        "--tombstone-ttl", "60",
    )  # fmt: skip
    with running_cluster(3, tmp_path, flags) as cluster:
        resumed.append(cluster[2])
        a, c = 0, 2

        def delete_while_down(key: bytes, between: Any) -> None:
            cluster.request(a, Op.SET, [key, b"alive", None, "all"])
            pause(cluster, c)
            assert cluster.request(a, Op.DELETE, [key, "quorum"]) is True
            between()
            resume(cluster, c)
            # The paused replica still holds the live value until repaired...
            wait_for(
                lambda: absent_everywhere(cluster, key),
                timeout=15,
                what=f"{key!r} absent everywhere",
            )

        # 1. The delete's hint is delivered.
        before = hints(cluster, a)["replayed"]
        delete_while_down(b"del-delivered", lambda: None)
        assert hints(cluster, a)["replayed"] > before

        # 2. The delete's hint is dropped by the per-node cap (the oldest goes first):
        #    anti-entropy carries the tombstone.
        def overflow() -> None:
            filler = [f"fill-{i}".encode() for i in range(40)]
            set_many(cluster, a, filler)
            assert hints(cluster, a)["dropped"]["node_cap"] >= 20

        delete_while_down(b"del-dropped", overflow)

        # 3. The delete's hint expires before the replica is back.
        def outlive_hints() -> None:
            expired = hints(cluster, a)["expired"]
            wait_for(lambda: hints(cluster, a)["expired"] > expired, timeout=10, what="hint expiry")

        delete_while_down(b"del-expired", outlive_hints)

        # 4. An older write travelling as a hint lands after the delete: it loses.
        key = b"late-hint"
        cluster.request(a, Op.SET, [key, b"v1", None, "all"])
        pause(cluster, c)
        cluster.request(a, Op.SET, [key, b"v2", None, "quorum"])  # hinted on a
        assert cluster.request(1, Op.DELETE, [key, "quorum"]) is True  # hinted on b
        resume(cluster, c)
        wait_for(lambda: absent_everywhere(cluster, key), timeout=15, what="late hint loses")
        _, ts, origin, _, _ = entry(cluster, c, key)
        older = [[key, b"zombie", ts - 1, origin, 0, False]]
        assert cluster.peer_request(c, Op.R_PUT_MANY, [older, 0]) == 0  # as a hint replay
        assert cluster.peer_request(c, Op.R_PUT_MANY, [older, 1]) == 0  # as an AE push
        assert cluster.request(c, Op.R_PUT, older[0]) is False  # as a read repair
        assert absent_everywhere(cluster, key)

        # 5. A newer write after the delete wins everywhere.
        assert cluster.request(2, Op.SET, [key, b"reborn", None, "quorum"]) is True
        wait_for(
            lambda: all(entry(cluster, i, key)[0] == b"reborn" for i in range(3)),
            timeout=10,
            what="the newer write on every replica",
        )
