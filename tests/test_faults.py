"""FaultyTransport: drops, delays and partitions on the messages of the connections a
node opens, counted by kind (in-process transport, both event loops)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from net_helpers import CLUSTER, Runner, serving

from hypercache.errors import ConfigError, NoAnswerError, NodeUnavailableError
from hypercache.net import InprocNetwork, PeerInfo, make_hello
from hypercache.net.faults import FaultInjector, FaultyConnection, FaultyTransport, parse_rules


class Echo:
    """Answers each request with its payload and remembers what it saw."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def hello_info(self, peer_hello: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def handle(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        self.seen.append(payload)
        return payload


def faulty(*rules: dict[str, Any], seed: int | None = 1) -> FaultyTransport:
    injector = FaultInjector(local=frozenset({"client-1"}))
    injector.load({"rules": list(rules), "seed": seed})
    return FaultyTransport(InprocNetwork(), injector)


async def dial(transport: FaultyTransport, address: str) -> FaultyConnection:
    return await transport.connect(address, make_hello(CLUSTER), timeout=0.2)


def test_without_rules_every_message_passes_and_nothing_is_counted(run: Runner[None]) -> None:
    async def main() -> None:
        transport = faulty()
        handler = Echo()
        async with serving(transport, handler) as server:
            conn = await dial(transport, server.address)
            assert conn.names == {server.address, "server-1"}
            assert [await conn.request(1, i, 1.0) for i in range(20)] == list(range(20))
            await conn.close()
        assert transport.injector.injected == {"drop": 0, "delay": 0, "partition": 0}

    run(main())


def test_a_dropped_request_is_never_applied_a_dropped_answer_was(run: Runner[None]) -> None:
    async def main() -> None:
        transport = faulty({"kind": "drop", "direction": "out"})
        handler = Echo()
        async with serving(transport, handler) as server:
            conn = await dial(transport, server.address)
            with pytest.raises(NoAnswerError):
                await conn.request(1, "lost-out", 0.05)
            assert handler.seen == []
            assert transport.injector.injected["drop"] == 1

            transport.injector.load({"rules": [{"kind": "drop", "direction": "in"}]})
            with pytest.raises(NoAnswerError):
                await conn.request(1, "lost-in", 0.05)
            assert handler.seen == ["lost-in"]
            assert transport.injector.injected["drop"] == 2
            assert conn.pending == 0
            await conn.close()

    run(main())


def test_a_drop_rate_loses_that_fraction_and_counts_each_loss(run: Runner[None]) -> None:
    async def main() -> None:
        transport = faulty({"kind": "drop", "rate": 0.3, "direction": "out"}, seed=42)
        async with serving(transport, Echo()) as server:
            conn = await dial(transport, server.address)
            outcomes = await asyncio.gather(
                # (a deadline a loaded machine meets: only the drops go unanswered)
                *(conn.request(1, i, 2.0) for i in range(400)),
                return_exceptions=True,
            )
            lost = sum(isinstance(o, NoAnswerError) for o in outcomes)
            assert all(o == i for i, o in enumerate(outcomes) if not isinstance(o, Exception))
            assert 80 <= lost <= 160  # 30% of 400 is 120
            assert transport.injector.injected["drop"] == lost
            await conn.close()

    run(main())


def test_a_delayed_request_lands_after_one_sent_later(run: Runner[None]) -> None:
    async def main() -> None:
        transport = faulty({"kind": "delay", "delay_ms": 50, "jitter_ms": 10, "direction": "out"})
        handler = Echo()
        async with serving(transport, handler) as server:
            conn = await dial(transport, server.address)
            first = conn.send(1, "delayed", 2.0)
            transport.injector.clear()
            assert await conn.request(1, "prompt", 2.0) == "prompt"
            assert await first == "delayed"
            assert handler.seen == ["prompt", "delayed"]
            assert transport.injector.injected["delay"] == 1
            await conn.close()

    run(main())


def test_a_delay_past_the_deadline_is_a_loss(run: Runner[None]) -> None:
    async def main() -> None:
        transport = faulty({"kind": "delay", "delay_ms": 500, "direction": "in"})
        handler = Echo()
        async with serving(transport, handler) as server:
            conn = await dial(transport, server.address)
            with pytest.raises(NoAnswerError):
                await conn.request(1, "late", 0.05)
            assert handler.seen == ["late"]
            await conn.close()

    run(main())


def test_rules_apply_to_the_peers_they_name_by_id_or_address(run: Runner[None]) -> None:
    async def main() -> None:
        transport = faulty({"kind": "drop", "peers": ["server-9"]})
        async with serving(transport, Echo()) as server:
            conn = await dial(transport, server.address)
            assert await conn.request(1, "x", 1.0) == "x"
            for name in ("server-1", server.address):
                transport.injector.load({"rules": [{"kind": "drop", "peers": [name]}]})
                with pytest.raises(NoAnswerError):
                    await conn.request(1, "y", 0.05)
            assert transport.injector.injected["drop"] == 2
            await conn.close()

    run(main())


def test_a_partition_silences_connections_and_refuses_new_ones(run: Runner[None]) -> None:
    async def main() -> None:
        transport = faulty()
        handler = Echo()
        async with serving(transport, handler) as server:
            conn = await dial(transport, server.address)
            split = {"kind": "partition", "groups": [["client-1"], ["server-1"]]}
            transport.injector.load({"rules": [split]})
            with pytest.raises(NoAnswerError):
                await conn.request(1, "cut", 0.05)
            with pytest.raises(NodeUnavailableError):
                await dial(transport, server.address)
            # the other side of no group: untouched
            transport.injector.load(
                {"rules": [{"kind": "partition", "groups": [["client-1"], ["node-7"]]}]}
            )
            assert await conn.request(1, "ok", 1.0) == "ok"
            assert handler.seen == ["ok"]
            assert transport.injector.injected["partition"] == 2
            await conn.close()

    run(main())


def test_closing_fails_the_requests_a_fault_holds(run: Runner[None]) -> None:
    async def main() -> None:
        transport = faulty({"kind": "delay", "delay_ms": 5000, "direction": "out"})
        async with serving(transport, Echo()) as server:
            conn = await dial(transport, server.address)
            held = conn.send(1, "held", 10.0)
            assert conn.pending == 1
            await conn.close()
            with pytest.raises(NodeUnavailableError):
                await held
            assert conn.pending == 0

    run(main())


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        ([{"kind": "explode"}], "kind"),
        ([{"kind": "drop", "rate": 1.5}], "rate"),
        ([{"kind": "drop", "direction": "sideways"}], "direction"),
        ([{"kind": "drop", "speed": 3}], "speed"),
        ([{"kind": "delay"}], "delay_ms"),
        ([{"kind": "delay", "delay_ms": -1}], "delay_ms"),
        ([{"kind": "partition", "groups": [["a"]]}], "groups"),
        ([{"kind": "drop", "peers": "node-1"}], "peers"),
        ([{"kind": "drop", "groups": [["a"], ["b"]]}], "groups"),
        ("drop", "rules"),
    ],
)
def test_a_bad_rule_set_names_its_field_and_changes_nothing(rules: Any, field: str) -> None:
    injector = FaultInjector()
    injector.load({"rules": [{"kind": "drop", "rate": 0.5}]})
    with pytest.raises(ConfigError) as caught:
        injector.load({"rules": rules})
    assert caught.value.field == field
    assert [r.kind for r in injector.rules] == ["drop"]


def test_the_json_form_reads_back_the_same_rules() -> None:
    raw = {
        "seed": 3,
        "rules": [
            {"kind": "drop", "rate": 0.1, "direction": "in", "peers": ["n2"]},
            {"kind": "delay", "delay_ms": 200, "jitter_ms": 20},
            {"kind": "partition", "groups": [["n1"], ["n2", "n3"]]},
        ],
    }
    injector = FaultInjector()
    injector.load(raw)
    shown = injector.as_dict()
    assert shown["seed"] == 3
    assert parse_rules({"rules": shown["rules"]})[0] == injector.rules
