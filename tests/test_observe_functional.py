"""Traces and JSON logs of real ``hypercache-node`` processes.

The nodes export over OTLP/HTTP to :class:`otlp_receiver.OtlpReceiver` in
this process; the client's spans go to an in-memory exporter. One trace must join
them all, with the right parent links.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import running_cluster
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_receiver import OtlpReceiver, ReceivedSpan

from hypercache import AsyncClient, Client
from hypercache._core.hlc import make_ts
from hypercache.cluster.local import ProcessCluster
from hypercache.net.protocol import Op
from hypercache.observe import tracing
from hypercache.replication import wall_ms

pytestmark = pytest.mark.functional

# 256 partitions: a fresh cluster's start-up streams every partition, each batch a
# Rebalance span (and, at debug, a log line) that a loaded machine must export.
TRACED = (
    "--tracing",
    "on",
    "--replication",
    "3",
    "--partitions",
    "256",
    "--log-format",
    "json",
    "--log-level",
    "debug",
)


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """This process traces into an in-memory exporter (the client's spans)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "test-client"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
        yield rx


def _client(cluster: ProcessCluster, write_path: str = "proxy") -> Client:
    # Writes through a node (the coordinated trees below); the one-hop writes have a
    # test of their own.
    return Client(cluster.addresses, timeout=10.0, write_path=write_path)


def _of_trace(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def _check_write_tree(
    spans: list[ReceivedSpan], root: str, op: str, nodes: set[str]
) -> ReceivedSpan:
    """The node spans of one client write, under the client span ``root``: op ->
    ReplicaFanout -> one ReplicaRequest per owner -> ReplicaApply in each remote
    owner's process. Returns the op span."""
    by_id = {s.span_id: s for s in spans}
    (top,) = [s for s in spans if s.name == op]
    assert top.parent_id == root
    assert top.attributes["hypercache.consistency"] == "quorum"
    assert top.attributes["hypercache.replicas"] == 3
    assert top.attributes["hypercache.acks"] >= 2
    assert top.attributes["hypercache.outcome"] == "ok"
    assert len(top.attributes["hypercache.key_hash"]) == 16
    (fan,) = [s for s in spans if s.name == "ReplicaFanout"]
    assert fan.parent_id == top.span_id and fan.instance == top.instance
    requests = [s for s in spans if s.name == "ReplicaRequest"]
    assert len(requests) == 3
    assert {s.parent_id for s in requests} == {fan.span_id}
    assert {s.attributes["hypercache.peer"] for s in requests} == nodes
    applies = [s for s in spans if s.name == "ReplicaApply"]
    assert len(applies) == 2  # the coordinator's own replica is written in place
    for apply in applies:
        parent = by_id[apply.parent_id]
        assert parent.name == "ReplicaRequest"
        # In the owner's own process.
        assert apply.instance == parent.attributes["hypercache.peer"] != top.instance
    assert {s.instance for s in spans} == nodes
    return top


def test_a_quorum_set_is_one_trace_across_the_client_and_three_nodes(
    tmp_path: Path, exported: InMemorySpanExporter, receiver: OtlpReceiver
) -> None:
    with running_cluster(3, tmp_path, TRACED) as cluster:
        nodes = {n.node_id for n in cluster}
        with _client(cluster) as client:
            client.set("user:1", {"name": "ada-7f3a9c"}, consistency="quorum")
            assert client.get("user:1") == {"name": "ada-7f3a9c"}
        (client_span,) = [s for s in exported.get_finished_spans() if s.name == "Client.set"]
        trace_id = f"{client_span.context.trace_id:032x}"
        root = f"{client_span.context.span_id:016x}"
        spans = receiver.wait_for(
            lambda got: (
                len([s for s in _of_trace(got, trace_id) if s.name == "ReplicaApply"]) >= 2
                and any(s.name == "ReplicaFanout" for s in _of_trace(got, trace_id))
            )
        )
        top = _check_write_tree(_of_trace(spans, trace_id), root, "Set", nodes)
        # The resource names the node.
        assert top.resource["service.name"] == "hypercache-node"
        assert top.resource["service.version"]

        # JSON logs: every line of every node parses and names its node; the lines
        # logged while a replica applied the traced write carry its trace id.
        traced_lines = 0
        for node in cluster:
            for line in node.log_path.read_text().splitlines():
                if line.startswith("---- start #"):  # the harness's own marker
                    continue
                record = json.loads(line)
                assert "ada-7f3a9c" not in line  # never a value (debug level included)
                assert record["node_id"] == node.node_id
                assert {"ts", "level", "logger", "msg"} <= record.keys()
                assert record["ts"].endswith("Z")
                if record.get("op") == "R_PUT" and record.get("trace_id") == trace_id:
                    assert len(record["span_id"]) == 16
                    traced_lines += 1
        assert traced_lines == 2


def test_a_one_hop_set_is_one_apply_span_on_each_owner_under_the_client_span(
    tmp_path: Path, exported: InMemorySpanExporter, receiver: OtlpReceiver
) -> None:
    with running_cluster(3, tmp_path, TRACED) as cluster:
        nodes = {n.node_id for n in cluster}
        with _client(cluster, "direct") as client:
            client.set("user:2", "grace", consistency="all")
            assert client.stats.direct_writes == 1
        (client_span,) = [s for s in exported.get_finished_spans() if s.name == "Client.set"]
        trace_id = f"{client_span.context.trace_id:032x}"
        root = f"{client_span.context.span_id:016x}"
        spans = receiver.wait_for(
            lambda got: len([s for s in _of_trace(got, trace_id) if s.name == "ReplicaApply"]) >= 3
        )
        applies = [s for s in _of_trace(spans, trace_id) if s.name == "ReplicaApply"]
        assert {s.instance for s in applies} == nodes
        assert all(s.parent_id == root for s in applies)  # one hop: no coordinator span
        assert {s.attributes["hypercache.op"] for s in applies} == {"W_PUT"}


def _chain_to(spans: list[ReceivedSpan], span: ReceivedSpan, root: str) -> bool:
    """Whether ``span``'s parent links lead to the span id ``root``."""
    by_id = {s.span_id: s for s in spans}
    while span.parent_id != root:
        parent = by_id.get(span.parent_id)
        if parent is None:
            return False
        span = parent
    return True


def test_a_read_that_repairs_continues_the_trace(
    tmp_path: Path, exported: InMemorySpanExporter, receiver: OtlpReceiver
) -> None:
    with running_cluster(3, tmp_path, TRACED) as cluster:
        with _client(cluster) as client:
            client.set("k", b"v1", consistency="all")
            # Two owners get a newer version behind the third's back.
            newer = [b"k", client.options.serializer.dumps(b"v2"), make_ts(wall_ms() + 500, 0)]
            for i in (0, 1):
                assert cluster.peer_request(i, Op.R_PUT, [*newer, 7, 0, False]) is True
            exported.clear()
            assert client.get("k", consistency="all") == b"v2"
        (client_span,) = [s for s in exported.get_finished_spans() if s.name == "Client.get"]
        trace_id = f"{client_span.context.trace_id:032x}"
        root = f"{client_span.context.span_id:016x}"
        stale = cluster[2].node_id

        def reads(spans: list[ReceivedSpan]) -> set[str]:
            return {s.instance for s in spans if s.attributes.get("hypercache.op") == "R_GET"}

        def repaired(got: list[ReceivedSpan]) -> bool:
            # Each process exports in its own batches: wait for the whole tree, not
            # only for its last span.
            spans = _of_trace(got, trace_id)
            return (
                any(
                    s.name == "ReplicaApply"
                    and s.attributes["hypercache.op"] == "R_PUT"
                    and s.instance == stale
                    for s in spans
                )
                and len(reads(spans)) == 3
                and all(_chain_to(spans, s, root) for s in spans)
            )

        spans = _of_trace(receiver.wait_for(repaired), trace_id)
        # Read from the three owners, each in its own process, all under the client's span.
        assert reads(spans) == {n.node_id for n in cluster}
        assert all(_chain_to(spans, s, root) for s in spans)


def test_a_restarted_peer_gets_its_hints_in_traced_replays(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    with running_cluster(3, tmp_path, TRACED) as cluster:
        cluster.kill(2)  # and waits until the others see it down
        down = cluster[2].node_id
        with _client(cluster) as client:
            for i in range(5):
                client.set(f"h{i}", i, consistency="quorum")
        cluster.restart(2)

        def replayed(got: list[ReceivedSpan]) -> bool:
            by_id = {s.span_id: s for s in got}
            sent = sum(
                s.attributes["hypercache.count"]
                for s in got
                if s.name == "HintReplay" and s.status != 2  # a failed try is retried
            )
            return sent >= 5 and any(
                s.name == "ReplicaApply"
                and s.attributes["hypercache.op"] == "R_PUT_MANY"
                and s.instance == down
                and by_id.get(s.parent_id, s).name == "HintReplay"
                for s in got
            )

        spans = receiver.wait_for(replayed)
        replays = [s for s in spans if s.name == "HintReplay"]
        assert all(s.attributes["hypercache.peer"] == down for s in replays)
        # A replay may fail while the restarted node is still coming up (it is
        # retried, the span says so); the ones that carried the hints succeeded.
        assert any(s.status != 2 for s in replays)


def test_a_diverged_replica_is_repaired_in_traced_merkle_rounds(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    with running_cluster(3, tmp_path, (*TRACED, "--anti-entropy-interval", "0.5")) as cluster:
        # One node alone holds a key (replication 3: everyone should).
        entry = [b"only-here", b"v", make_ts(wall_ms(), 0), 9, 0, False]
        assert cluster.peer_request(0, Op.R_PUT, entry) is True

        def pulled(got: list[ReceivedSpan]) -> bool:
            by_id = {s.span_id: s for s in got}
            return any(
                s.name == "ReplicaApply"
                and s.attributes["hypercache.op"] == "PULL"
                and by_id.get(s.parent_id, s).name == "MerklePull"
                for s in got
            )

        spans = receiver.wait_for(pulled)
        by_id = {s.span_id: s for s in spans}
        for pull in [s for s in spans if s.name == "MerklePull"]:
            parent = by_id.get(pull.parent_id)
            assert parent is None or parent.name == "MerkleSync"
        syncs = [s for s in spans if s.name == "MerkleSync"]
        assert {s.attributes["hypercache.peer"] for s in syncs} <= {n.node_id for n in cluster}


def test_the_async_client_continues_the_callers_trace(
    tmp_path: Path, exported: InMemorySpanExporter, receiver: OtlpReceiver
) -> None:
    async def main(addresses: list[str]) -> None:
        async with AsyncClient(addresses, timeout=10.0, write_path="proxy") as client:
            await client.set("a", [1, 2, 3], consistency="quorum")

    with running_cluster(3, tmp_path, TRACED) as cluster:
        nodes = {n.node_id for n in cluster}
        asyncio.run(main(cluster.addresses))
        (client_span,) = [s for s in exported.get_finished_spans() if s.name == "Client.set"]
        trace_id = f"{client_span.context.trace_id:032x}"
        root = f"{client_span.context.span_id:016x}"
        spans = receiver.wait_for(
            lambda got: (
                len([s for s in _of_trace(got, trace_id) if s.name == "ReplicaApply"]) >= 2
                and any(s.name == "ReplicaFanout" for s in _of_trace(got, trace_id))
            )
        )
        _check_write_tree(_of_trace(spans, trace_id), root, "Set", nodes)


def test_an_expire_writes_back_inside_the_callers_trace(
    tmp_path: Path, exported: InMemorySpanExporter, receiver: OtlpReceiver
) -> None:
    # EXPIRE reads the owners, then writes back from the callback of the last read
    # answer, which runs outside the request's context (the loop's, over TCP): the
    # write's Set, its fan-out and the replicas' applies stay in the caller's trace.
    with running_cluster(3, tmp_path, TRACED) as cluster:
        nodes = {n.node_id for n in cluster}
        with _client(cluster) as client:
            client.set("k", "v", consistency="all")
            assert tracing.tracer is not None
            with tracing.tracer.start_as_current_span("caller") as caller:
                assert client.expire("k", 600, consistency="quorum") is True
        trace_id = f"{caller.get_span_context().trace_id:032x}"
        root = f"{caller.get_span_context().span_id:016x}"
        spans = receiver.wait_for(
            lambda got: (
                len([s for s in _of_trace(got, trace_id) if s.name == "ReplicaApply"]) >= 4
                and any(s.name == "ReplicaFanout" for s in _of_trace(got, trace_id))
            )
        )
        mine = _of_trace(spans, trace_id)
        (write,) = [s for s in mine if s.name == "Set"]
        assert write.attributes["hypercache.outcome"] == "ok"
        assert _chain_to(mine, write, root)
        applies = [s for s in mine if s.name == "ReplicaApply"]
        assert {s.attributes["hypercache.op"] for s in applies} == {"R_GET", "R_PUT"}
        assert {s.instance for s in mine} <= nodes
        assert all(_chain_to(mine, s, root) for s in mine)


def test_a_join_streams_partitions_in_rebalance_spans(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    # Replication 2 of 2 nodes: a third node's join moves about two thirds of the
    # partitions' copies to it, one Rebalance span per STREAM batch it pulls, each
    # naming its partition and its source, with the source's apply span under it.
    args = [*TRACED]
    args[args.index("--replication") + 1] = "2"
    with running_cluster(2, tmp_path, args) as cluster:
        old = {n.node_id for n in cluster}
        with _client(cluster) as client:
            client.set_many({f"r{i}": i for i in range(200)}, consistency="all")
        joined = cluster.add().node_id

        def streamed(got: list[ReceivedSpan]) -> bool:
            mine = [s for s in got if s.name == "Rebalance" and s.instance == joined]
            moved: int = sum(s.attributes.get("hypercache.count", 0) for s in mine)
            return moved >= 100

        spans = receiver.wait_for(streamed)
        by_id = {s.span_id: s for s in spans}
        batches = [s for s in spans if s.name == "Rebalance" and s.instance == joined]
        for batch in batches:
            assert 0 <= batch.attributes["hypercache.partition"] < 256
            assert batch.attributes["hypercache.peer"] in old
            if batch.status != 2:  # (a source not ready yet fails the batch, retried)
                count = batch.attributes["hypercache.count"]
                assert 0 <= batch.attributes["hypercache.applied"] <= count
        # Each partition its own batches (at most a few keys each here).
        assert len({b.attributes["hypercache.partition"] for b in batches}) > 50
        # The source served each batch in a span of its own, under the batch's.
        serving = [
            s
            for s in spans
            if s.name == "ReplicaApply"
            and s.attributes["hypercache.op"] == "STREAM"
            and by_id.get(s.parent_id) in batches
        ]
        assert serving and all(s.instance in old for s in serving)
        assert all(s.instance == by_id[s.parent_id].attributes["hypercache.peer"] for s in serving)
