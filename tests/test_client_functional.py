"""The clients against real ``hypercache-node`` processes, under adversity.

A node stopped with SIGSTOP keeps its sockets open: connections to it stay up,
nothing is refused, requests are simply never answered. Each client must notice it
from its first request timeouts, route around the node while it is stopped, and use
it again once it answers (see "Node health" in ``docs/client.md``).

The load is closed-loop: ``WORKERS`` threads (``Client``) or tasks (``AsyncClient``)
each keep one QUORUM request in flight, alternating ``set`` and ``get`` over a small
key space, and record when each request started and ended and how it ended. The
assertions are about what happened to requests, not how fast they went.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import running_cluster

from hypercache.client import AsyncClient, Client
from hypercache.cluster.local import ProcessCluster, wait_for
from hypercache.errors import HyperCacheError, RequestTimeoutError

pytestmark = pytest.mark.functional

#: Requests in flight at any time (one per worker thread or task).
WORKERS = 8
#: The clients' request timeout (s).
TIMEOUT = 1.0
#: How long the node stays stopped (s): several timeouts, so that a client that
#: keeps sending to it shows one stalled request per worker and per timeout.
PAUSE = 3.0
#: The node that is stopped: not the first seed, so the table comes from elsewhere.
PAUSED = 1
KEYS = [f"pause-{i}" for i in range(200)]
DEADLINE = 30.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request of the load."""

    op: str
    start: float  # time.monotonic()
    end: float
    error: BaseException | None

    @property
    def stalled(self) -> bool:
        """It failed, or it waited for a timeout (a read that moved on to another
        owner after one timed out succeeds, but only after ``TIMEOUT``: timeouts
        never fire early)."""
        return self.error is not None or self.end - self.start >= TIMEOUT


class Load:
    """``WORKERS`` closed-loop workers sharing one client, until :meth:`stop`."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.stopping = threading.Event()
        self.client: Client | AsyncClient | None = None
        self._threads: list[threading.Thread] = []
        self.crashed: list[BaseException] = []

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(DEADLINE)
        assert not any(t.is_alive() for t in self._threads), "the load did not stop"
        assert not self.crashed, f"the load crashed: {self.crashed!r}"

    def stats(self) -> dict[str, int]:
        assert self.client is not None
        return self.client.stats.as_dict()

    def suspects(self) -> list[str]:
        assert self.client is not None
        return self.client._router.down

    def done_since(self, when: float) -> int:
        return sum(1 for o in list(self.outcomes) if o.start >= when and not o.stalled)

    @staticmethod
    def plan(worker: int) -> Callable[[], tuple[str, str, int]]:
        """Worker ``worker``'s next request: (op, key, value), set and get in turn."""
        rng = random.Random(worker)
        ops = itertools.cycle(("set", "get"))
        counter = itertools.count()
        return lambda: (next(ops), rng.choice(KEYS), next(counter))


class SyncLoad(Load):
    def __init__(self, seeds: list[str]) -> None:
        super().__init__()
        self.client = self.sync = Client(seeds, consistency="quorum", timeout=TIMEOUT)

    def start(self) -> None:
        self.sync.set_many(dict.fromkeys(KEYS, 0))
        self._threads = [
            threading.Thread(target=self._work, args=(w,), name=f"load-{w}", daemon=True)
            for w in range(WORKERS)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self, worker: int) -> None:
        client, record, nxt = self.sync, self.outcomes.append, self.plan(worker)
        clock = time.monotonic
        try:
            while not self.stopping.is_set():
                op, key, value = nxt()
                error: BaseException | None = None
                start = clock()
                try:
                    if op == "set":
                        client.set(key, value)
                    else:
                        client.get(key)
                except HyperCacheError as exc:
                    error = exc
                record(Outcome(op, start, clock(), error))
        except BaseException as exc:  # not a request's failure: a bug of the test or client
            self.crashed.append(exc)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.sync.close()


class AsyncLoad(Load):
    """The workers are tasks of one event loop, run by a thread of their own so that
    the test drives the pause from its thread as for :class:`SyncLoad`."""

    def __init__(self, seeds: list[str]) -> None:
        super().__init__()
        self._seeds = seeds
        self._ready = threading.Event()

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._run, name="load-loop", daemon=True)]
        self._threads[0].start()
        wait_for(
            lambda: self._ready.is_set() or self.crashed, timeout=DEADLINE, what="the async load"
        )
        assert not self.crashed, f"the load did not start: {self.crashed!r}"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.crashed.append(exc)

    async def _main(self) -> None:
        async with AsyncClient(self._seeds, consistency="quorum", timeout=TIMEOUT) as client:
            self.client = client
            await client.set_many(dict.fromkeys(KEYS, 0))
            self._ready.set()
            await asyncio.gather(*(self._work(client, w) for w in range(WORKERS)))

    async def _work(self, client: AsyncClient, worker: int) -> None:
        record, clock, nxt = self.outcomes.append, time.monotonic, self.plan(worker)
        while not self.stopping.is_set():
            op, key, value = nxt()
            error: BaseException | None = None
            start = clock()
            try:
                if op == "set":
                    await client.set(key, value)
                else:
                    await client.get(key)
            except HyperCacheError as exc:
                error = exc
            record(Outcome(op, start, clock(), error))


def replica_gets(cluster: ProcessCluster, index: int) -> int:
    """``R_GET`` requests node ``index`` has served to clients (route ``direct``)."""
    served: int = cluster[index].http_json("/stats")["dist"]["direct_gets"]
    return served


def _pause_and_resume(cluster: ProcessCluster, load: Load) -> dict[str, Any]:
    """Run ``load``, SIGSTOP node :data:`PAUSED` for :data:`PAUSE` seconds, SIGCONT it,
    wait until the client sends to it again; the figures the assertions need."""
    address = cluster.addresses[PAUSED]
    node = cluster[PAUSED]
    load.start()
    try:
        warm = time.monotonic()
        wait_for(lambda: load.done_since(warm) >= 200, timeout=DEADLINE, what="a steady load")
        node.signal(signal.SIGSTOP)
        paused = time.monotonic()
        try:
            # Stay stopped for PAUSE seconds (the length of the experiment), and
            # until the load has gone on without the node.
            wait_for(
                lambda: time.monotonic() - paused >= PAUSE and load.done_since(paused) >= 50,
                timeout=DEADLINE,
                what="the load to go on during the pause",
            )
            suspected_during_pause = address in load.suspects()
        finally:
            node.signal(signal.SIGCONT)
        resumed = time.monotonic()
        served = replica_gets(cluster, PAUSED)
        # The node is used again: the client no longer avoids it, and its R_GETs
        # reach it (reads ask the owners in table order once none is suspected).
        wait_for(
            lambda: address not in load.suspects() and replica_gets(cluster, PAUSED) > served + 20,
            timeout=DEADLINE,
            what=f"the client to send to {address} again",
        )
        recovered = time.monotonic()
        wait_for(lambda: load.done_since(recovered) >= 100, timeout=DEADLINE, what="more load")
    finally:
        load.stop()
    return {
        "paused": paused,
        "resumed": resumed,
        "suspected_during_pause": suspected_during_pause,
    }


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_paused_node_is_routed_around_then_used_again(tmp_path: Path, kind: str) -> None:
    """3 nodes, RF 3, QUORUM: one node is SIGSTOPped under load, then SIGCONTed."""
    with running_cluster(3, tmp_path) as cluster:
        seeds = cluster.addresses
        load: Load = SyncLoad(seeds) if kind == "sync" else AsyncLoad(seeds)
        when = _pause_and_resume(cluster, load)
        stats = load.stats()
    outcomes = sorted(load.outcomes, key=lambda o: o.start)
    stalled = [o for o in outcomes if o.stalled]
    errors = [o.error for o in stalled if o.error is not None]
    summary = (
        f"{len(stalled)} stalled requests of {len(outcomes)}, {len(errors)} raised "
        f"({sum(isinstance(e, RequestTimeoutError) for e in errors)} RequestTimeoutError, "
        f"others: {[e for e in errors if not isinstance(e, RequestTimeoutError)][:3]}); "
        f"stats {stats}"
    )
    # The pause was felt: the requests in flight to the node when it stopped (and any
    # sent to it before the first timeout) waited for their timeout.
    assert stalled, summary
    assert all(o.end >= when["paused"] for o in stalled), f"stalled before the pause; {summary}"
    first = min(o.end for o in stalled)  # the client has seen a timeout from here on
    # About the requests in flight when the node stopped: each worker loses at most
    # one, not one per timeout while the pause lasts, nor one per request.
    assert len(stalled) <= WORKERS, summary
    # Every request sent once the client had seen a timeout succeeded at once,
    # during the pause and after it.
    late = [o for o in stalled if o.start >= first]
    assert not late, f"{len(late)} requests sent after the first timeout stalled; {summary}"
    # The load went on without the node, which was set aside all along.
    assert any(first <= o.start and o.end < when["resumed"] for o in outcomes), summary
    assert when["suspected_during_pause"], summary
    # Counters: the node was suspected, probed without an answer while stopped, and
    # a probe found it back.
    assert stats["nodes_suspected"] >= 1, summary
    assert stats["probes_failed"] >= 1, summary
    assert stats["probes"] > stats["probes_failed"], summary
    assert stats["nodes_recovered"] >= 1, summary


def _samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of metric ``name`` in a Prometheus exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name) :].rpartition(" ")
            out[labels] = float(value)
    return out


def test_every_read_a_node_answers_is_counted_with_its_route(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path) as cluster:
        seeds = [node.data for node in cluster]
        with Client(seeds, consistency="quorum") as client:
            client.set_many({f"k{i}": i for i in range(50)})
            for i in range(50):
                assert client.get(f"k{i}") == i  # the client reads the owners itself
        with Client(seeds, consistency="quorum", route="any") as proxied:
            for i in range(10):
                assert proxied.get(f"k{i}") == i  # a node coordinates
        totals: dict[str, float] = {}
        for node in cluster:
            text = node.http_text("/metrics")
            for labels, n in _samples(text, "hypercache_requests_total").items():
                totals[labels] = totals.get(labels, 0) + n
            hist = _samples(text, "hypercache_dist_op_latency_seconds_count")
            totals["hist direct"] = totals.get("hist direct", 0) + hist['{op="get",route="direct"}']
        direct = totals['{op="get",route="direct"}']
        assert direct >= 100  # 50 quorum reads of 2 owners each
        assert totals["hist direct"] == direct
        assert totals['{op="get",route="coordinated"}'] == 10
        assert totals['{op="get",route="replica"}'] >= 10  # the coordinators' own reads
