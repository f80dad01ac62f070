"""A standing history check: QUORUM writers of unique values while a node is killed
and restarted, then every acknowledged write checked against what the cluster holds.

Each writer thread owns its keys and writes them in turn, so on every key the writes
are sequential and numbered: the value converged on must come from the last
acknowledged write or a later one (lost write otherwise), and every value read,
during the run and after it, must be one that was written (phantom otherwise).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cluster_harness import running_cluster

from hypercache import Client
from hypercache.cluster.local import wait_for
from hypercache.errors import HyperCacheError
from hypercache.net.protocol import Op

pytestmark = pytest.mark.functional

WRITERS = 4
KEYS_PER_WRITER = 25


@dataclass
class History:
    """Per key: the highest write index attempted, and the highest acknowledged."""

    attempted: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    reads: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def value_of(key: str, index: int) -> str:
    return f"{key}#{index}"


def index_of(key: str, value: str) -> int:
    owner, _, index = value.rpartition("#")
    assert owner == key, f"{key} holds {value!r}, written for another key (phantom)"
    return int(index)


def writer(seeds: list[str], t: int, stop: threading.Event, history: History) -> None:
    keys = [f"w{t}-k{j}" for j in range(KEYS_PER_WRITER)]
    with Client(seeds, timeout=1.0, consistency="quorum") as client:
        i = 0
        while not stop.is_set():
            key = keys[i % len(keys)]
            index = i // len(keys)
            with history.lock:
                history.attempted[key] = index
            try:
                client.set(key, value_of(key, index))
            except HyperCacheError:
                with history.lock:
                    history.failed += 1
            else:
                with history.lock:
                    history.acked[key] = index
            # A read of another writer's key: whatever it returns must have been written.
            other = f"w{(t + 1) % WRITERS}-k{i % KEYS_PER_WRITER}"
            try:
                got = client.get(other)
            except HyperCacheError:
                pass
            else:
                with history.lock:
                    history.reads.append((other, got))
            i += 1


def test_kill_and_restart_under_quorum_writers_loses_nothing(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path) as cluster:
        seeds = cluster.addresses
        history = History()
        stop = threading.Event()
        threads = [
            threading.Thread(target=writer, args=(seeds, t, stop, history), daemon=True)
            for t in range(WRITERS)
        ]
        for thread in threads:
            thread.start()
        try:
            # The scenario: 2 s of writes, 3 s with node 3 dead, 2 s after its restart.
            time.sleep(2)
            cluster.kill(2)
            time.sleep(3)
            cluster.restart(2)
            time.sleep(2)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert sum(history.acked.values()) > 0

        def holdings(key: str) -> list[tuple[bytes, int] | None]:
            """What each replica holds of ``key``: its (encoded value, version ts)."""
            out = []
            for node in cluster.nodes:
                got = cluster.request(node.index, Op.R_GET, [key.encode()])
                out.append(None if got is None else (got[0], got[1]))
            return out

        def converged() -> bool:
            return all(len(set(holdings(key))) == 1 for key in history.attempted)

        # Hints and anti-entropy bring the restarted node level with the others.
        wait_for(converged, timeout=60, interval=0.5, what="replicas equal")
        with Client(seeds, consistency="all") as client:
            for key, attempted in history.attempted.items():
                final = client.get(key)
                acked = history.acked.get(key, -1)
                if final is None:
                    assert acked == -1, f"{key}: acknowledged #{acked} lost (key absent)"
                    continue
                index = index_of(key, final)
                assert index >= acked, f"{key}: holds #{index}, acknowledged #{acked} lost"
                assert index <= attempted, f"{key}: holds #{index}, never written"
        for key, got in history.reads:
            if got is not None:
                index_of(key, got)  # written for that key: no phantom
