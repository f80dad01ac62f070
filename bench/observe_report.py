"""What tracing and compression cost: ``python -m bench.observe_report``.

Tracing: three 3-node clusters of real ``hypercache-node`` processes, started side by
side, with ``--tracing off``, ``--tracing on`` but never sampled
(``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ratio 0) and ``--tracing on``
sampled at 100 % (the SDK's default, parent-based always-on), the last two exporting
over OTLP/HTTP to a sink in this process that takes every batch and decodes nothing.
One blocking :class:`~hypercache.Client` per cluster (sets through a node,
``write_path="proxy"``: the coordinator's traced path) runs QUORUM ``set`` then ``get``
of 64-byte values over 1000 keys, one request in flight; the three take turns every
20 operations (``CHUNK``), in rounds of ``--ops`` each op (``--rounds``, the order
rotating every round), so that whatever else loads the machine loads them alike.
Reported: p50 and p99 of each operation and ops/s, and each mode's ratio to ``off``.

Compression: one 3-node cluster; clients with compression off, zstd level 1 (the
default) and level 3 (both from 1 KiB) write then read the same values: 4 KiB and 64 KiB JSON-like
documents (a list of records), and 4 KiB of random bytes. Reported: the bytes one
value takes on the wire (what the client sends, and each replica then stores), the
``hypercache_bytes`` growth of one node per value, and the p50 of ``set`` and ``get``
(QUORUM, the two clients taking turns in rounds).

Progress goes to stderr, the markdown report to stdout. ``--quick``: a smoke test of
the harness (few ops), not numbers to quote.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hypercache import Client
from hypercache.client.compression import Compression, ValueCodec
from hypercache.client.serializer import DEFAULT_SERIALIZER
from hypercache.cluster.local import ProcessCluster

FLAGS = (
    "--replication",
    "3",
    "--partitions",
    "256",
    "--log-level",
    "warning",
    "--request-timeout",
    "5",
)
MODES: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "off": (("--tracing", "off"), {}),
    "on, not sampled": (
        ("--tracing", "on"),
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
    ),
    "on, sampled 100%": (("--tracing", "on"), {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}),
}


#: Operations a mode runs before the next one takes its turn (tracing_bench).
CHUNK = 20


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    """An OTLP/HTTP endpoint on 127.0.0.1 that answers every export with 200."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timed(fn: Callable[[int], Any], n: int, out: list[float]) -> float:
    """Run ``fn(i)`` for i in range(n), appending each latency (s); the total time."""
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return time.perf_counter() - start


def tracing_bench(workdir: Path, rounds: int, ops: int) -> str:
    value = b"x" * 64
    lat: dict[str, dict[str, list[float]]] = {m: {"set": [], "get": []} for m in MODES}
    spent: dict[str, dict[str, float]] = {m: {"set": 0.0, "get": 0.0} for m in MODES}
    with otlp_sink() as endpoint, contextlib.ExitStack() as stack:
        clients: dict[str, Client] = {}
        for i, (mode, (flags, env)) in enumerate(MODES.items()):
            _say(f"starting the cluster with tracing {mode}")
            otel = {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                **env,
            }
            (workdir / f"trace{i}").mkdir()
            with environment(otel):
                cluster = stack.enter_context(
                    ProcessCluster(3, workdir / f"trace{i}", (*FLAGS, *flags), timeout=120.0)
                )
            # Sets through a node (the coordinator's Set span and its fan-out, the
            # path tracing costs most on): a one-hop write from a process without a
            # tracer of its own carries no context, and no node starts a trace for it.
            clients[mode] = stack.enter_context(
                Client(cluster.addresses, timeout=10.0, write_path="proxy")
            )
            for k in range(1000):  # warm: connections, the table, every key present
                clients[mode].set(f"k{k}", value, consistency="quorum")
        order = list(MODES)
        for r in range(rounds):
            _say(f"round {r + 1}/{rounds}")
            turn = order[r % len(order) :] + order[: r % len(order)]
            for op in ("set", "get"):
                # The modes take turns every CHUNK operations, so that a burst of
                # load from elsewhere on the machine falls on all of them alike.
                for first in range(0, ops, CHUNK):
                    n = min(CHUNK, ops - first)
                    for mode in turn:
                        c = clients[mode]

                        def set_(i: int, c: Client = c, first: int = first) -> None:
                            c.set(f"k{(first + i) % 1000}", value, consistency="quorum")

                        def get(i: int, c: Client = c, first: int = first) -> None:
                            c.get(f"k{(first + i) % 1000}", consistency="quorum")

                        fn = set_ if op == "set" else get
                        spent[mode][op] += _timed(fn, n, lat[mode][op])
    rows = [
        "| tracing | op | p50 (µs) | p99 (µs) | ops/s | ops/s vs off | p50 vs off |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        for op in ("set", "get"):
            p50, p99 = _pct(lat[mode][op], 0.5), _pct(lat[mode][op], 0.99)
            rate = len(lat[mode][op]) / spent[mode][op]
            base_rate = len(lat["off"][op]) / spent["off"][op]
            base_p50 = _pct(lat["off"][op], 0.5)
            rows.append(
                f"| {mode} | {op} | {p50 * 1e6:.0f} | {p99 * 1e6:.0f} | {rate:.0f} | "
                f"{rate / base_rate:.3f} | {p50 / base_p50:.3f} |"
            )
    return "\n".join(rows)


#: The in-process modes of inproc_bench: what is installed, and the caller's span.
_INPROC_MODES = ("off", "on, no parent, not sampled", "on, parent not sampled")


def inproc_bench(rounds: int, ops: int) -> str:
    """The tracing code's own cost: a 3-node :class:`InprocCluster` in this process
    (one event loop, no sockets, so the machine's load and the kernel weigh less),
    QUORUM sets through one connection in each mode, taking turns every CHUNK sets:
    tracing off; on with a sampler that samples no root (the requests carry no
    parent); on with every root sampled but the requests sent inside a caller's
    span that is not sampled (a traceparent with flags 00 reaches the coordinator)."""
    import asyncio

    from opentelemetry import trace as otel_trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    from hypercache.cluster.local import InprocCluster
    from hypercache.net.protocol import Op, make_hello
    from hypercache.observe import tracing

    settings = {"http": None, "partitions": 256, "request_timeout": 5.0}
    providers = {
        "off": None,
        "on, no parent, not sampled": TracerProvider(sampler=ParentBased(TraceIdRatioBased(0))),
        "on, parent not sampled": TracerProvider(sampler=ParentBased(ALWAYS_ON)),
    }
    unsampled = otel_trace.NonRecordingSpan(
        otel_trace.SpanContext(0x1234, 0x5678, True, otel_trace.TraceFlags(0))
    )
    lat: dict[str, list[float]] = {m: [] for m in _INPROC_MODES}

    async def main() -> None:
        async with InprocCluster(3, settings=settings, address="127.0.12.{n}:7400") as c:
            conn = await c.net.connect(c.nodes[0].address, make_hello("hypercache"))
            try:
                for k in range(1000):
                    await conn.request(Op.SET, [f"k{k}".encode(), b"x" * 64, None, "quorum"], 5)
                for r in range(rounds):
                    turn = _INPROC_MODES[r % 3 :] + _INPROC_MODES[: r % 3]
                    for first in range(0, ops, CHUNK):
                        for mode in turn:
                            tracing.install(providers[mode])
                            span = unsampled if mode == "on, parent not sampled" else None
                            with otel_trace.use_span(span) if span else contextlib.nullcontext():
                                for i in range(first, min(first + CHUNK, ops)):
                                    payload = [f"k{i % 1000}".encode(), b"x" * 64, None, "quorum"]
                                    t = time.perf_counter()
                                    await conn.request(Op.SET, payload, 5)
                                    lat[mode].append(time.perf_counter() - t)
            finally:
                tracing.install(None)
                await conn.close()

    asyncio.run(main())
    rows = ["| tracing | set p50 (µs) | p50 vs off |", "|---|---:|---:|"]
    base = _pct(lat["off"], 0.5)
    for mode in _INPROC_MODES:
        p50 = _pct(lat[mode], 0.5)
        rows.append(f"| {mode} | {p50 * 1e6:.1f} | {p50 / base:.3f} |")
    return "\n".join(rows)


def _jsonish(size: int) -> bytes:
    """A JSON document of about ``size`` bytes: records of an API's answer."""
    records: list[dict[str, Any]] = []
    n = 0
    while n < size:
        i = len(records)
        rec = {
            "id": 100_000 + i,
            "user": f"user-{i * 7919 % 10007}",
            "email": f"user{i * 7919 % 10007}@example.com",
            "active": i % 3 != 0,
            "score": round((i * 37 % 1000) / 7, 3),
            "tags": ["alpha", "beta", "gamma"][: 1 + i % 3],
        }
        records.append(rec)
        n += len(json.dumps(rec)) + 2
    return json.dumps(records).encode()[:size]


def _store_bytes(cluster: ProcessCluster) -> int:
    return int(cluster[0].http_json("/stats")["store"]["bytes"])


def compression_bench(workdir: Path, rounds: int, ops: int) -> str:
    values = {
        "4 KiB JSON-like": _jsonish(4096),
        "64 KiB JSON-like": _jsonish(65536),
        "4 KiB random": os.urandom(4096),
    }
    settings: dict[str, Compression | None] = {
        "off": None,
        "zstd-1": Compression(level=1),
        "zstd-3": Compression(level=3),
    }
    rows = [
        "| value | compression | bytes on the wire | hypercache_bytes / value | "
        "set p50 (µs) | get p50 (µs) | set p50 vs off | get p50 vs off |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    _say("starting the cluster for compression")
    (workdir / "comp").mkdir()
    with ProcessCluster(3, workdir / "comp", FLAGS, timeout=120.0) as cluster:
        clients = {
            name: Client(cluster.addresses, timeout=10.0, compression=comp)
            for name, comp in settings.items()
        }
        try:
            for label, raw in values.items():
                _say(f"compression: {label}")
                stored: dict[str, float] = {}
                sets: dict[str, list[float]] = {name: [] for name in settings}
                gets: dict[str, list[float]] = {name: [] for name in settings}
                for name, c in clients.items():  # bytes stored: 100 values each
                    before = _store_bytes(cluster)
                    for i in range(100):
                        c.set(f"{label}/{name}/{i}", raw, consistency="all")
                    stored[name] = (_store_bytes(cluster) - before) / 100
                order = list(settings)
                for r in range(rounds):  # latency: the two take turns
                    k = r % len(order)
                    for name in order[k:] + order[:k]:
                        c = clients[name]

                        def set_(
                            i: int, c: Client = c, key: str = f"{label}/{name}/", v: bytes = raw
                        ) -> None:
                            c.set(key + str(i % 100), v, consistency="quorum")

                        def get(i: int, c: Client = c, key: str = f"{label}/{name}/") -> None:
                            c.get(key + str(i % 100), consistency="quorum")

                        _timed(set_, ops, sets[name])
                        _timed(get, ops, gets[name])
                base_set, base_get = _pct(sets["off"], 0.5), _pct(gets["off"], 0.5)
                for name, comp in settings.items():
                    wire = len(ValueCodec(comp, 1 << 30).encode(DEFAULT_SERIALIZER.dumps(raw)))
                    p50s, p50g = _pct(sets[name], 0.5), _pct(gets[name], 0.5)
                    rows.append(
                        f"| {label} | {name} | {wire} | {stored[name]:.0f} | {p50s * 1e6:.0f} | "
                        f"{p50g * 1e6:.0f} | {p50s / base_set:.3f} | {p50g / base_get:.3f} |"
                    )
        finally:
            for c in clients.values():
                c.close()
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.observe_report")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--ops", type=int, default=1000, help="operations a round, each op")
    parser.add_argument("--quick", action="store_true", help="a smoke test of the harness")
    parser.add_argument(
        "--only", choices=("tracing", "compression"), help="run one of the two parts"
    )
    args = parser.parse_args(argv)
    rounds, ops = (2, 100) if args.quick else (args.rounds, args.ops)
    cmd = "python -m bench.observe_report" + " ".join(
        [""] + (["--quick"] if args.quick else []) + ([f"--only {args.only}"] if args.only else [])
    )
    with tempfile.TemporaryDirectory(prefix="hc-observe-") as tmp:
        workdir = Path(tmp)
        if args.only != "compression":
            tracing = tracing_bench(workdir, rounds, ops)
            _say("in-process: the tracing code's own cost")
            inproc = inproc_bench(rounds, ops)
            print(f"## Tracing overhead\n\n`{cmd}` ({rounds} rounds of {ops} ops per mode)\n")
            print(tracing)
            title = "The tracing code's own cost (in process)"
            print(f"\n## {title}\n\n`{cmd}` ({rounds} rounds of {ops} sets)\n")
            print(inproc)
        if args.only != "tracing":
            comp_ops = max(ops // 4, 50)
            comp = compression_bench(workdir, rounds, comp_ops)
            print(f"\n## Compression\n\n`{cmd}` ({rounds} rounds of {comp_ops} ops a mode)\n")
            print(comp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
