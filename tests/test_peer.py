"""PeerConnection: one lazily opened, shared connection to an address, with back-off
and liveness hooks (both event loops, in-process transport)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from net_helpers import CLUSTER, Runner, serving

from hypercache.cluster.local import until as wait_until
from hypercache.errors import NoAnswerError, NodeUnavailableError, ServerError
from hypercache.net import InprocNetwork, PeerInfo, make_hello
from hypercache.net.peer import PeerConnection
from hypercache.net.transport import Connection


class Handler:
    def __init__(self) -> None:
        self.gate = asyncio.Event()

    def hello_info(self, peer_hello: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def handle(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        if payload == "fail":
            raise ServerError("boom")
        if payload == "block":
            await self.gate.wait()
        return payload


class Hooks:
    def __init__(self) -> None:
        self.answers = 0
        self.lost: list[BaseException] = []
        self.connected = 0


def peer(net: InprocNetwork, address: str, hooks: Hooks, dials: list[str]) -> PeerConnection:
    async def dial(addr: str) -> Connection:
        dials.append(addr)
        return await net.connect(addr, make_hello(CLUSTER), timeout=1)

    def on_connected(_conn: Connection) -> None:
        hooks.connected += 1

    return PeerConnection(
        address,
        dial,
        backoff_max=0.2,
        on_answer=lambda: setattr(hooks, "answers", hooks.answers + 1),
        on_lost=hooks.lost.append,
        on_connected=on_connected,
    )


def test_one_shared_connection_and_the_hooks(run: Runner[None]) -> None:
    async def main() -> None:
        net = InprocNetwork()
        handler = Handler()
        async with serving(net, handler) as server:
            hooks, dials = Hooks(), list[str]()
            link = peer(net, server.address, hooks, dials)
            try:
                # Many at once before any connection exists: one dial, shared.
                answers = await asyncio.gather(*(link.request(1, i, 2) for i in range(20)))
                assert answers == list(range(20)) and dials == [server.address]
                assert link.connected and hooks.connected == 1 and hooks.answers == 20
                # An error answer still says the peer is alive.
                with pytest.raises(ServerError):
                    await link.request(1, "fail", 2)
                assert hooks.answers == 21 and not hooks.lost
                # Silence says nothing by itself.
                with pytest.raises(NoAnswerError):
                    await link.request(1, "block", 0.05)
                assert hooks.answers == 21 and not hooks.lost
                handler.gate.set()
                # The fast path (connected) and the slow one (not yet) both call back.
                got: list[tuple[Any, Any]] = []
                link.send_callback(1, "fast", 2, lambda v, e: got.append((v, e)))
                await wait_until(lambda: len(got) == 1)
                assert got == [("fast", None)] and link.pending == 0
            finally:
                await link.close()

    run(main())


def test_an_unreachable_address_backs_off_and_reports_it(run: Runner[None]) -> None:
    async def main() -> None:
        net = InprocNetwork()
        hooks, dials = Hooks(), list[str]()
        link = peer(net, "127.0.0.1:9", hooks, dials)
        try:
            with pytest.raises(NodeUnavailableError):
                await link.request(1, None, 1)
            assert len(dials) == 1 and len(hooks.lost) == 1
            # Backing off: refused at once, no dial.
            with pytest.raises(NodeUnavailableError, match="backing off"):
                await link.request(1, None, 1)
            assert len(dials) == 1
            got: list[tuple[Any, Any]] = []
            link.send_callback(1, None, 1, lambda v, e: got.append((v, e)))
            await wait_until(lambda: len(got) == 1)
            assert got[0][0] is None and isinstance(got[0][1], NodeUnavailableError)
            # Once the back-off is over, it dials again.
            await asyncio.sleep(0.06)
            with pytest.raises(NodeUnavailableError):
                await link.request(1, None, 1)
            assert len(dials) == 2
        finally:
            await link.close()
        with pytest.raises(NodeUnavailableError, match="closed"):
            await link.connection()

    run(main())


def test_close_fails_what_waits_and_reports_no_loss(run: Runner[None]) -> None:
    async def main() -> None:
        net = InprocNetwork()
        handler = Handler()
        async with serving(net, handler) as server:
            hooks, dials = Hooks(), list[str]()
            link = peer(net, server.address, hooks, dials)
            waiting = asyncio.ensure_future(link.request(1, "block", 5))
            await wait_until(lambda: link.connected)
            await link.close()
            with pytest.raises(NodeUnavailableError):
                await waiting
            assert not hooks.lost  # our own close is not the peer's failure
            handler.gate.set()

    run(main())
