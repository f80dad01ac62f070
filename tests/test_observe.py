"""hypercache.observe: spans of in-process nodes (an in-memory exporter of the SDK),
no span objects with tracing off, JSON log lines, rate-limited warnings."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aio_helpers import run
from cluster_harness import FAST, key_owned_by
from opentelemetry import trace as otel_trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode
from test_metrics import exposition, families

from hypercache.cluster.local import InprocCluster, until
from hypercache.cluster.node import Node
from hypercache.errors import ConfigError, QuorumError
from hypercache.net.connection import ClientConnection
from hypercache.net.inproc import InprocNetwork
from hypercache.net.protocol import Op, make_hello
from hypercache.net.transport import ServerOptions
from hypercache.observe import RateLimiter, setup_logging, tracing
from hypercache.observe.logs import JsonLogFormatter

ADDRESS = "127.0.11.{n}:7400"


@contextlib.contextmanager
def traced(**kw: Any) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "test"}), **kw)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


@contextlib.asynccontextmanager
async def cluster(size: int = 3) -> AsyncIterator[tuple[InprocNetwork, list[Node]]]:
    async with InprocCluster(size, settings={**FAST}, address=ADDRESS) as c:
        yield c.net, c.nodes


@contextlib.asynccontextmanager
async def client(net: InprocNetwork, node: Node) -> AsyncIterator[ClientConnection]:
    conn = await net.connect(node.address, make_hello("hypercache"))
    try:
        yield conn
    finally:
        await conn.close()


def _by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _parent(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


# -------------------------------------------------------------------- spans


def test_a_set_has_a_fanout_with_one_child_per_owner_and_an_apply_per_remote_owner() -> None:
    async def main(exporter: InMemorySpanExporter) -> None:
        async with cluster() as (net, nodes):
            tracer = otel_trace.get_tracer("test", tracer_provider=tracing._provider)
            async with client(net, nodes[0]) as conn:
                with tracer.start_as_current_span("caller") as caller:
                    assert await conn.request(Op.SET, [b"k", b"v", None, "quorum"], 2)
            trace_id = caller.get_span_context().trace_id

            def of_trace() -> list[ReadableSpan]:
                got = exporter.get_finished_spans()
                return [s for s in got if s.context.trace_id == trace_id]

            await until(lambda: len(_by_name(of_trace(), "ReplicaApply")) == 2)
            await until(lambda: _by_name(of_trace(), "ReplicaFanout"))
        spans = of_trace()
        (op,) = _by_name(spans, "Set")
        assert _parent(op) == caller.get_span_context().span_id
        assert op.kind == otel_trace.SpanKind.SERVER
        attrs: dict[str, Any] = dict(op.attributes or {})
        assert attrs["hypercache.consistency"] == "quorum"
        assert attrs["hypercache.replicas"] == 3
        assert attrs["hypercache.acks"] >= 2
        assert attrs["hypercache.outcome"] == "ok"
        assert attrs["hypercache.key_hash"] == tracing.key_hash(b"k")
        assert "k" not in [str(v) for v in attrs.values()]  # the key itself, never
        (fan,) = _by_name(spans, "ReplicaFanout")
        assert _parent(fan) == op.context.span_id
        children = _by_name(spans, "ReplicaRequest")
        assert {_parent(s) for s in children} == {fan.context.span_id}
        assert sorted(str((s.attributes or {})["hypercache.peer"]) for s in children) == sorted(
            n.node_id for n in nodes
        )
        remote = {
            s.context.span_id for s in children if (s.attributes or {})["hypercache.peer"] != "n1"
        }
        applies = _by_name(spans, "ReplicaApply")
        assert {_parent(s) for s in applies} == remote
        assert {(s.attributes or {})["hypercache.op"] for s in applies} == {"R_PUT"}

    with traced() as exporter:
        run(main(exporter))


class _TaskHandler:
    """A handler without a synchronous fast path: every request runs in a task."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []  # (op, trace id, span id) current

    def hello_info(self, peer_hello: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def handle(self, conn_info: Any, op: int, payload: Any) -> Any:
        await asyncio.sleep(0)  # a slow path: it waits
        sc = otel_trace.get_current_span().get_span_context()
        self.seen.append((op, sc.trace_id, sc.span_id))
        return "pong" if op == Op.PING else None


def test_a_request_handled_in_a_task_runs_in_the_senders_trace() -> None:
    async def main(exporter: InMemorySpanExporter) -> None:
        net = InprocNetwork()
        handler = _TaskHandler()
        server = net.create_server(
            handler, "127.0.11.9:7400", ServerOptions(cluster="hypercache", node_id="srv")
        )
        await server.start()
        try:
            tracer = otel_trace.get_tracer("test", tracer_provider=tracing._provider)
            conn = await net.connect(server.address, make_hello("hypercache"))
            try:
                with tracer.start_as_current_span("caller") as caller:
                    assert await conn.request(Op.PING, None, 2) == "pong"
                    assert await conn.request(Op.R_GET, [b"k"], 2) is None
                assert await conn.request(Op.PING, None, 2) == "pong"  # untraced
            finally:
                await conn.close()
        finally:
            await server.close()
        ctx = caller.get_span_context()
        (apply,) = _by_name(exporter.get_finished_spans(), "ReplicaApply")
        assert _parent(apply) == ctx.span_id and apply.context.trace_id == ctx.trace_id
        assert (apply.attributes or {})["hypercache.op"] == "R_GET"
        assert handler.seen == [
            (int(Op.PING), ctx.trace_id, ctx.span_id),  # in the received context
            (int(Op.R_GET), ctx.trace_id, apply.context.span_id),  # under its apply span
            (int(Op.PING), 0, 0),
        ]

    with traced() as exporter:
        run(main(exporter))


def test_a_failed_quorum_marks_the_span_failed() -> None:
    async def main(exporter: InMemorySpanExporter) -> None:
        async with cluster() as (net, nodes):
            key = key_owned_by(nodes[0], ["n1", "n2", "n3"])
            await nodes[2].stop()
            await until(lambda: not nodes[0].membership.peers["n3"].up, what="n3 down")
            async with client(net, nodes[0]) as conn:
                with pytest.raises(QuorumError):
                    await conn.request(Op.SET, [key, b"v", None, "all"], 2)
        (op,) = _by_name(exporter.get_finished_spans(), "Set")
        assert op.status.status_code is StatusCode.ERROR
        assert any(e.name == "exception" for e in op.events)
        down = [
            s
            for s in _by_name(exporter.get_finished_spans(), "ReplicaRequest")
            if (s.attributes or {})["hypercache.peer"] == "n3"
        ]
        assert down and down[0].status.status_code is StatusCode.ERROR

    with traced() as exporter:
        run(main(exporter))


def _count_spans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every span object made from now on (recording or not)."""
    made = [0]
    for cls in (sdk_trace.Span, otel_trace.NonRecordingSpan):
        init = cls.__init__

        def counting(self: Any, *a: Any, __init: Any = init, **kw: Any) -> None:
            made[0] += 1
            __init(self, *a, **kw)

        monkeypatch.setattr(cls, "__init__", counting)
    return made


async def _some_requests(nodes: list[Node], net: InprocNetwork) -> None:
    async with client(net, nodes[0]) as conn:
        for i in range(20):
            key = f"k{i}".encode()
            assert await conn.request(Op.SET, [key, b"v", None, "quorum"], 2)
            assert await conn.request(Op.GET, [key, "quorum"], 2) == [True, b"v"]
            assert await conn.request(Op.DELETE, [key, "quorum"], 2) is True


def test_with_tracing_off_no_span_object_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _count_spans(monkeypatch)

    async def main() -> None:
        async with cluster() as (net, nodes):
            await _some_requests(nodes, net)

    assert tracing.tracer is None
    run(main())
    assert made[0] == 0
    with traced():  # the count does count
        run(main())
    assert made[0] > 0


def test_an_unsampled_operation_records_and_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with cluster() as (net, nodes):
            await _some_requests(nodes, net)

    with traced(sampler=ALWAYS_OFF) as exporter:
        sent: list[Any] = []
        real = tracing.carrier_of

        def spy(span: Any) -> dict[str, str]:
            sent.append(span)
            return real(span)

        monkeypatch.setattr(tracing, "carrier_of", spy)
        run(main())
        assert exporter.get_finished_spans() == ()
        assert sent == []


def _of_requests(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    """The spans of requests (the background loops' own left out)."""
    loops = {"Rebalance", "MerkleSync", "MerklePull", "HintReplay"}
    theirs = {s.context.trace_id for s in spans if s.name in loops}
    return [s for s in spans if s.context.trace_id not in theirs]


def test_a_parent_not_sampled_records_nothing_under_a_sampling_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The nodes sample every root (parent-based, always on); the caller's span is
    # not sampled: no node records anything for its writes, reads and expires,
    # their write backs included, nor sends a context on; a request without a
    # parent is still traced.
    async def main() -> None:
        async with cluster() as (net, nodes):
            async with client(net, nodes[0]) as conn:
                ctx = otel_trace.SpanContext(
                    0x0AF7651916CD43DD8448EB211C80319C,
                    0xB7AD6B7169203331,
                    is_remote=True,
                    trace_flags=otel_trace.TraceFlags(0),
                )
                with otel_trace.use_span(otel_trace.NonRecordingSpan(ctx)):
                    for i in range(5):
                        key = f"u{i}".encode()
                        assert await conn.request(Op.SET, [key, b"v", None, "quorum"], 2)
                        assert await conn.request(Op.GET, [key, "all"], 2) == [True, b"v"]
                        assert await conn.request(Op.EXPIRE, [key, 60_000, "all"], 2) is True
                        assert await conn.request(Op.R_GET, [key], 2) is not None
                        await until(lambda: all(n.coordinator.background == 0 for n in nodes))
                assert _of_requests(exporter.get_finished_spans()) == []
                assert sent == []
                assert await conn.request(Op.SET, [b"root", b"v", None, "quorum"], 2)
            await until(lambda: _by_name(exporter.get_finished_spans(), "ReplicaFanout"))

    with traced() as exporter:
        sent: list[Any] = []
        real = tracing.carrier_of

        def spy(span: Any) -> dict[str, str]:
            sent.append(span)
            return real(span)

        monkeypatch.setattr(tracing, "carrier_of", spy)
        run(main())
        assert _by_name(exporter.get_finished_spans(), "Set")


def test_a_malformed_carrier_is_ignored() -> None:
    assert tracing.extract("00-nope") is None
    assert tracing.extract({"traceparent": 5}) is None
    assert tracing.extract({"traceparent": "garbage"}) is None
    assert tracing.extract({"traceparent": "x" * 9000, "tracestate": ""}) is None
    good = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    ctx = tracing.extract(good)
    assert ctx is not None
    sc = otel_trace.get_current_span(ctx).get_span_context()
    assert sc.trace_id == int("1" * 32, 16) and sc.trace_flags.sampled


def test_configure_tracing_refuses_what_it_cannot_export() -> None:
    assert tracing.configure_tracing(enabled=False, node_id="n", version="1") is None
    for env in (
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    ):
        with pytest.raises(ConfigError, match="tracing"):
            tracing.configure_tracing(enabled=True, node_id="n", version="1", env=env)
    assert tracing.tracer is None


def test_the_hot_path_imports_the_api_alone() -> None:
    # Without tracing configured, a node's and a client's modules import the
    # OpenTelemetry API only: the SDK and the exporter are the [otel] extra's.
    code = (
        "import sys, hypercache.cluster.node, hypercache.client, hypercache.net.server\n"
        "from hypercache.observe import tracing\n"
        "tracing.begin('Set', b'k', 'quorum', 3); tracing.current_carrier()\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')\n"
        "    or m.startswith('opentelemetry.exporter')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_nodes_resource_names_it_and_takes_the_environments_attributes() -> None:
    # (in a process of its own: configure_tracing sets the global provider, once)
    code = (
        "import json\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import"
        " InMemorySpanExporter\n"
        "from hypercache.observe import tracing\n"
        "p = tracing.configure_tracing(enabled=True, node_id='n7', version='9.9',"
        " exporter=InMemorySpanExporter())\n"
        "print(json.dumps({k: str(v) for k, v in p.resource.attributes.items()}))\n"
        "print(type(p.sampler).__name__)\n"
    )
    env = {
        **os.environ,
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,service.namespace=cache",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    attrs_line, sampler = out.stdout.strip().splitlines()
    attrs = json.loads(attrs_line)
    assert attrs["service.name"] == "hypercache-node"
    assert attrs["service.instance.id"] == "n7"
    assert attrs["service.version"] == "9.9"
    assert attrs["deployment.environment"] == "test"
    assert attrs["service.namespace"] == "cache"
    assert sampler == "ParentBasedTraceIdRatio"


def test_roots_are_skipped_only_under_a_sampler_that_never_samples_them() -> None:
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_OFF,
        ALWAYS_ON,
        ParentBased,
        TraceIdRatioBased,
    )

    never = tracing._never_samples_roots
    assert never(ParentBased(TraceIdRatioBased(0)))
    assert never(ParentBased(ALWAYS_OFF)) and never(ALWAYS_OFF) and never(TraceIdRatioBased(0))
    assert not never(ParentBased(ALWAYS_ON)) and not never(ParentBased(TraceIdRatioBased(0.1)))
    assert not never(None) and not never(object())
    with traced(sampler=ParentBased(TraceIdRatioBased(0))) as exporter:
        assert tracing.begin("Set", b"k", "one", 1) is None
        sampled = otel_trace.SpanContext(1, 2, True, otel_trace.TraceFlags(1))
        with otel_trace.use_span(otel_trace.NonRecordingSpan(sampled)):
            op = tracing.begin("Set", b"k", "one", 1)  # a sampled parent still counts
            assert op is not None
            op.decided(1)
        assert sorted(s.name for s in exporter.get_finished_spans()) == ["ReplicaFanout", "Set"]


# --------------------------------------------------------------------- logs


def test_json_log_lines_carry_the_fields_and_the_trace() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonLogFormatter("node-7"))
    log = logging.getLogger("hypercache.test_observe")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        log.info("peer %s down", "n2", extra={"op": "probe", "peer": "n2", "count": 3})
        with traced():
            tr = tracing.tracer
            assert tr is not None
            with tr.start_as_current_span("s") as span:
                log.warning("inside")
            sc = span.get_span_context()
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    first, inside, failed = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "peer n2 down"
    assert first["level"] == "info" and first["logger"] == "hypercache.test_observe"
    assert first["node_id"] == "node-7"
    assert (first["op"], first["peer"], first["count"]) == ("probe", "n2", 3)
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert "trace_id" not in first
    assert inside["trace_id"] == f"{sc.trace_id:032x}"
    assert inside["span_id"] == f"{sc.span_id:016x}"
    assert "ValueError: boom" in failed["exc_info"]


def test_setup_logging_picks_the_format() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        out = io.StringIO()
        setup_logging(level="info", log_format="json", node_id="n1", stream=out)
        logging.getLogger("hypercache.x").info("hello")
        assert json.loads(out.getvalue())["node_id"] == "n1"
        out = io.StringIO()
        setup_logging(level="info", log_format="text", node_id="n1", stream=out)
        logging.getLogger("hypercache.x").info("hello")
        assert "[n1] hello" in out.getvalue()
        with pytest.raises(ConfigError, match="log_format"):
            setup_logging(level="info", log_format="xml", node_id="n1")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_a_repeated_warning_is_rate_limited_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limiter = RateLimiter(10.0, max_keys=2, clock=lambda: now[0])
    log = logging.getLogger("hypercache.test_limit")
    with caplog.at_level(logging.WARNING, logger="hypercache.test_limit"):
        assert limiter.warning(log, ("down", "n2"), "peer %s down", "n2")
        for _ in range(99):
            assert not limiter.warning(log, ("down", "n2"), "peer %s down", "n2")
        assert limiter.warning(log, ("down", "n3"), "peer %s down", "n3")  # another key
        now[0] = 10.0
        assert limiter.warning(log, ("down", "n2"), "peer %s down", "n2")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "peer n2 down",
        "peer n3 down",
        "peer n2 down (99 similar lines suppressed)",
    ]
    assert caplog.records[-1].suppressed == 99  # type: ignore[attr-defined]
    limiter.warning(log, ("down", "n4"), "x")  # past max_keys: the oldest is forgotten
    assert len(limiter._seen) == 2


# ---------------------------------------------------------------- dashboard

DASHBOARD = Path(__file__).resolve().parent.parent / "examples" / "grafana-dashboard.json"


def test_every_dashboard_query_names_a_metric_a_node_exports() -> None:
    text, by_family = exposition()
    exported = families(text)
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert panels
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"]
            names = re.findall(r"hypercache_[a-z0-9_]+", expr)
            assert names, expr
            for name in names:
                family = re.sub(r"_(bucket|sum|count)$", "", name)
                assert family in exported, f"{panel['title']}: {name} is not in /metrics"
                # Grouping labels are the family's own (or Prometheus's instance, le).
                for group in re.findall(r"by \(([^)]*)\)", expr):
                    for label in (g.strip() for g in group.split(",")):
                        assert label in {"instance", "le", *by_family.get(family, [])}, (
                            f"{panel['title']}: {family} has no label {label!r}"
                        )


def test_tracing_and_log_format_come_from_flags_env_and_toml(tmp_path: Path) -> None:
    from hypercache.cli.args import node_config_from_argv
    from hypercache.cluster.config import DistConfig

    config = node_config_from_argv(["--tracing", "on", "--log-format", "JSON"], {})
    assert (config.tracing, config.log_format) == (True, "json")
    env = {"HYPERCACHE_TRACING": "off", "HYPERCACHE_LOG_FORMAT": "text"}
    config = node_config_from_argv([], env)
    assert (config.tracing, config.log_format) == (False, "text")
    toml = tmp_path / "node.toml"
    toml.write_text('tracing = true\nlog_format = "json"\n')
    config = node_config_from_argv(["--config", str(toml)], {})
    assert (config.tracing, config.log_format) == (True, "json")
    with pytest.raises(ConfigError, match="tracing"):
        DistConfig(tracing="on")  # type: ignore[arg-type]


def test_the_sync_clients_worker_threads_send_in_the_callers_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Groups over one pipeline (a big get_many or set_many) go to worker threads,
    # which do not inherit contextvars: each gets a copy of the caller's context,
    # so its requests carry the caller's span too.
    from hypercache import Client
    from hypercache.client._common import BATCH

    client = Client("127.0.0.1:1")
    seen: list[tuple[str, int]] = []

    def send_group(address: str, requests: list[tuple[int, Any]]) -> list[Any]:
        seen.append((address, otel_trace.get_current_span().get_span_context().span_id))
        return [None] * len(requests)

    monkeypatch.setattr(client, "_send_group", send_group)
    caller = otel_trace.NonRecordingSpan(
        otel_trace.SpanContext(1, 0xABC, False, otel_trace.TraceFlags(1))
    )
    groups = {f"127.0.0.{n}:7400": [(int(Op.R_GET), [b"k"])] * (BATCH + 1) for n in (1, 2, 3)}
    try:
        with otel_trace.use_span(caller):
            out = client._fanout(groups)
    finally:
        client.close()
    assert set(out) == set(groups)
    assert sorted(seen) == sorted((address, 0xABC) for address in groups)
