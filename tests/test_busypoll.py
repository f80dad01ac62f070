"""Busy polling (``--busy-poll``): the loop is kept awake for a window after a socket
write, only over kernel sockets, and a node reports what it spent.

Windows here are milliseconds long and the waits poll a condition with a deadline:
nothing asserts how long anything took beyond "the window was at least this long".
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aio_helpers import run
from cluster_harness import running_cluster
from net_helpers import CLUSTER, Runner, connected, serving

from hypercache.cluster.config import DistConfig
from hypercache.cluster.local import until
from hypercache.cluster.node import Node
from hypercache.errors import ConfigError
from hypercache.net import TCP, InprocNetwork, Op, PeerInfo, ServerOptions, Transport, busypoll
from hypercache.net.busypoll import MAX_BUSY_POLL, BusyPoller, check_window, poller

WINDOW = 0.002  # seconds


class Echo:
    def hello_info(self, peer_hello: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def handle(self, peer: PeerInfo, op: int, payload: Any) -> Any:
        return payload


@pytest.mark.parametrize("seconds", [0, 0.0, 1e-4, MAX_BUSY_POLL])
def test_check_window_accepts(seconds: float) -> None:
    assert check_window(seconds) == seconds
    assert type(check_window(seconds)) is float


@pytest.mark.parametrize("seconds", [-1e-6, MAX_BUSY_POLL * 2, float("nan"), True, "1", None])
def test_check_window_refuses(seconds: object) -> None:
    with pytest.raises(ValueError, match="must be"):
        check_window(seconds)


def test_a_poke_keeps_the_loop_polling_for_the_window_then_lets_it_sleep(
    run: Runner[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    yields = [0]
    monkeypatch.setattr(busypoll, "_sched_yield", lambda: yields.__setitem__(0, yields[0] + 1))

    async def scenario() -> None:
        p = BusyPoller(asyncio.get_running_loop())
        assert not p.active
        p.poke(int(WINDOW * 1e9))
        p.poke(int(WINDOW * 1e9))  # extends the open window: not a new one
        assert p.active and p.windows == 1
        await until(lambda: not p.active, what="the window to close")
        assert yields[0] > 1  # it polled again and again, yielding the CPU each time
        assert p.spin_ns >= WINDOW * 1e9
        polled = yields[0]
        await asyncio.sleep(0.01)
        assert yields[0] == polled  # asleep again: no poll without a poke
        p.poke(int(WINDOW * 1e9))
        assert p.windows == 2
        await until(lambda: not p.active, what="the second window to close")

    run(scenario())


def test_poller_is_one_per_loop() -> None:
    async def mine() -> BusyPoller:
        loop = asyncio.get_running_loop()
        assert poller(loop) is poller(loop)
        return poller(loop)

    assert run(mine()) is not run(mine())


def test_tcp_connections_poll_after_writes(run: Runner[Any]) -> None:
    async def scenario() -> None:
        p = poller(asyncio.get_running_loop())
        async with (
            serving(TCP, Echo(), busy_poll=WINDOW) as server,
            connected(TCP, server.address) as conn,
        ):
            await until(lambda: not p.active, what="the handshake's window to close")
            before = p.windows
            # The server answers with a window: the loop polls after its write.
            assert await conn.request(Op.GET, 1, 5.0) == 1
            assert p.windows > before
            assert conn.busy_poll == 0.0
            conn.busy_poll = WINDOW  # and now the client side too
            await until(lambda: not p.active, what="the window to close")
            before = p.windows
            fut = conn.send(Op.GET, 2, 5.0)
            await asyncio.sleep(0)  # the flush, and with it the client's write
            assert p.active and p.windows == before + 1
            assert await fut == 2

    run(scenario())


def test_in_process_connections_never_poll() -> None:
    async def scenario() -> None:
        net = InprocNetwork()
        p = poller(asyncio.get_running_loop())
        async with (
            serving(net, Echo(), busy_poll=WINDOW) as server,
            connected(net, server.address) as conn,
        ):
            conn.busy_poll = WINDOW
            assert conn.busy_poll == WINDOW  # kept, and without effect
            for i in range(5):
                assert await conn.request(Op.GET, i, 5.0) == i
        assert p.windows == 0

    run(scenario())


def test_bad_windows_are_refused_at_the_edge(transport: Transport) -> None:
    with pytest.raises(ConfigError) as info:
        ServerOptions(cluster=CLUSTER, busy_poll=1.0)
    assert info.value.field == "busy_poll"

    async def scenario() -> None:
        async with serving(transport, Echo()) as server, connected(transport, server.address) as c:
            with pytest.raises(ValueError, match="busy_poll must be"):
                c.busy_poll = -1
            assert c.busy_poll == 0.0

    run(scenario())


def test_node_polls_over_tcp_and_reports_it() -> None:
    async def scenario() -> None:
        config = DistConfig(
            cluster_name=CLUSTER, bind="127.0.0.1:0", http=None, replication=1, busy_poll=WINDOW
        )
        node = Node(config)
        async with node:
            async with connected(TCP, node.address) as conn:
                await conn.request(Op.SET, [b"k", b"v", None, None], 5.0)
            stats = node.stats()["busy_poll"]
            assert stats["window_us"] == WINDOW * 1e6
            assert stats["windows"] >= 1
            await until(lambda: node.stats()["busy_poll"]["polling_s"] >= WINDOW)
            text = node.metrics.render()
            assert b"hypercache_busy_poll_windows_total" in text
            assert b"hypercache_busy_poll_seconds_total" in text

    run(scenario())


def test_node_without_a_window_reports_none() -> None:
    node = Node(DistConfig(bind="10.0.0.1:7400", http=None), transport=InprocNetwork())
    assert node.config.busy_poll == 0.0
    assert node.stats()["busy_poll"] is None
    assert b"hypercache_busy_poll" not in node.metrics.render()


@pytest.mark.functional
def test_node_process_with_the_flag_polls_after_answering(tmp_path: Path) -> None:
    with running_cluster(2, tmp_path, ("--busy-poll", "500us")) as cluster:
        for i in range(20):
            cluster.request(0, Op.SET, [f"k{i}".encode(), b"v", None, "all"])
        for index in (0, 1):  # the coordinator, and the replica it wrote to
            stats = cluster[index].http_json("/stats")["busy_poll"]
            assert stats["window_us"] == 500
            assert stats["windows"] >= 1
        metrics = cluster[0].http_text("/metrics")
        assert "hypercache_busy_poll_windows_total" in metrics
