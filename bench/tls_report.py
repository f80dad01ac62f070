"""TLS against plaintext, side by side: ``python -m bench.tls_report``.

Two 3-node clusters of real ``hypercache-node`` processes run at the same time on
loopback: one plaintext, one with TLS on every data port (a throw-away CA from
:mod:`hypercache.cli.devca`; nodes peer over TLS too) and, with ``--mtls``, client
certificates required. One ``AsyncClient`` per cluster (``ssl=`` the CA for the TLS
one) sends QUORUM sets and gets of 100-byte values with 1 and 32 requests in
flight, timed per request as :mod:`bench.bench_cluster` does (its loops). The runs
of the two clusters are interleaved (run 1 of every cell of both, then run 2, ...),
so a burst of load from elsewhere lands on both; the report gives the median over
the runs of p50, p99 and ops/s, and the TLS/plaintext ratio of each. Connections
are opened before timing: the figures are TLS's per-record cost, not its handshakes.

``--quick`` runs one short run per cell (a smoke test, not figures to quote).
Progress goes to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import ssl
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.bench_cluster import (
    CLIENTS,
    FULL,
    KEYS,
    QUICK,
    REPLICATION,
    SEED,
    VALUE_SIZE,
    Cell,
    ClusterBenchConfig,
    run_async,
)
from bench.report import cpu_model, git_commit, load_average, table
from hypercache.cli.devca import DevCA
from hypercache.client import AsyncClient, RawSerializer
from hypercache.cluster.local import ProcessCluster

OPS = ("set", "get")
SYSTEMS = ("plain", "tls")


def _client(seeds: list[str], ssl: Any) -> AsyncClient:
    return AsyncClient(
        seeds,
        ssl=ssl,
        consistency="quorum",
        serializer=RawSerializer(),
        timeout=5.0,
        connect_timeout=5.0,
    )


async def _measure(
    clients: dict[str, AsyncClient], config: ClusterBenchConfig, cells: dict[Any, Cell]
) -> None:
    keys = [f"key:{n}" for n in range(KEYS)]
    value = random.Random(SEED).randbytes(VALUE_SIZE)
    for client in clients.values():
        await client.connect()
        await client.set_many(dict.fromkeys(keys, value))
    order = random.Random(SEED).sample(keys, len(keys))

    def call(system: str, op: str) -> Any:
        client = clients[system]
        if op == "set":

            async def set_(key: str) -> None:
                await client.set(key, value)

            return set_

        async def get(key: str) -> None:
            if await client.get(key) is None:
                raise RuntimeError(f"{system}: {key!r} missing")

        return get

    plan = [(s, op, n) for op in OPS for n in CLIENTS for s in SYSTEMS]
    for system, op, n in plan:
        await run_async(call(system, op), order, config.warmup, n, config.run_seconds)
    for r in range(config.runs):
        for system, op, n in plan:
            count = config.sequential if n == 1 else config.concurrent
            run = await run_async(call(system, op), order, count, n, config.run_seconds)
            cells.setdefault((system, op, n), Cell(system, op, n)).runs.append(run)
            print(
                f"run {r + 1}/{config.runs} {system:5} {op} x{n:<2}: p50 {run.p50_ns / 1e3:7.1f} "
                f"us  p99 {run.p99_ns / 1e3:7.1f} us  {run.ops_per_s:9,.0f} ops/s",
                file=sys.stderr,
                flush=True,
            )


def render(cells: dict[Any, Cell], config: ClusterBenchConfig, mtls: bool, argv: list[str]) -> str:
    rows = []
    for op in OPS:
        for n in CLIENTS:
            plain, tls = cells[("plain", op, n)], cells[("tls", op, n)]
            row = [f"{op} x{n}"]
            for metric, scale in (("p50_ns", 1e3), ("p99_ns", 1e3), ("ops_per_s", 1.0)):
                a, b = plain.median(metric), tls.median(metric)
                spec = ",.0f" if scale == 1.0 else ".1f"
                row += [format(a / scale, spec), format(b / scale, spec), f"{b / a:.2f}"]
            rows.append(row)
    header = [
        "cell",
        "p50 µs plain",
        "p50 µs TLS",
        "ratio",
        "p99 µs plain",
        "p99 µs TLS",
        "ratio",
        "ops/s plain",
        "ops/s TLS",
        "ratio",
    ]
    mode = "TLS with client certificates (mTLS)" if mtls else "TLS (server certificates)"
    lines = [
        f"# TLS against plaintext: {mode}",
        "",
        f"- command: `{' '.join(['python -m bench.tls_report', *argv])}`",
        f"- commit {git_commit()}, {cpu_model()}, load {load_average():.2f}",
        f"- 3 nodes each, replication {REPLICATION}, QUORUM, {VALUE_SIZE}-byte values, "
        f"{config.runs} interleaved runs (medians)",
        "",
        *table(header, rows, "l" + "r" * 9),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_report", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short run per cell")
    parser.add_argument("--mtls", action="store_true", help="require client certificates")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    cells: dict[Any, Cell] = {}
    with tempfile.TemporaryDirectory(prefix="hypercache-tls-bench-") as tmp:
        work = Path(tmp)
        ca = DevCA(work / "pki")
        node, client = ca.issue("node"), ca.issue("client")
        base = ["--replication", str(REPLICATION), "--log-level", "warning"]
        tls_args = [*base, "--tls-cert", node.cert, "--tls-key", node.key, "--tls-ca", ca.cert]
        client_tls: dict[str, Any] = {"ca": ca.cert}
        if args.mtls:
            tls_args += ["--tls-client-auth", "required"]
            client_tls |= {"cert": client.cert, "key": client.key}
        harness = ssl.create_default_context(cafile=ca.cert)
        harness.load_cert_chain(client.cert, client.key)
        (work / "plain").mkdir()
        (work / "tls").mkdir()
        with (
            ProcessCluster(3, work / "plain", base) as plain,
            ProcessCluster(3, work / "tls", tls_args, ssl=harness) as tls,
        ):

            async def main_async() -> None:
                clients = {
                    "plain": _client(plain.addresses, None),
                    "tls": _client(tls.addresses, client_tls),
                }
                try:
                    await _measure(clients, config, cells)
                finally:
                    for c in clients.values():
                        await c.close()

            try:
                import uvloop
            except ImportError:  # pragma: no cover
                asyncio.run(main_async())
            else:
                uvloop.run(main_async())
    print(render(cells, config, args.mtls, list(argv or sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
