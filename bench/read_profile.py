"""Where a 1-client QUORUM get's p95 goes: ``python -m bench.read_profile``.

A 3-node TCP cluster (the cells of :mod:`bench.bench_cluster`: replication 3, 100-byte
raw values, 10,000 keys) and the in-process baseline, read by one client awaiting
each get, in variants whose runs are interleaved (run 1 of every variant, then run
2, ...) so that the machine's other load falls on all of them alike:

``inproc``      the in-process baseline of the KPI (the denominator of the ratio)
``tcp``         the TCP cluster as the KPI times it (``AsyncClient``, route "owner":
                ``R_GET`` to 2 of the 3 owners, done at both answers)
``tcp-closures`` the same client with the owner read as it was before
                :mod:`hypercache.client.owner_ask`: callbacks as closures naming each
                other, a reference cycle of ~22 objects per read left to the GC (the
                fix, measured side by side)
``tcp-nogc``    ``tcp`` with the client process's garbage collector off during the
                run (what GC pauses still cost)
``tcp-poll``    the client's connections busy-poll 100 µs after each write (is it the
                client's wake-up from ``epoll``?)
``tcp-all3``    ``R_GET`` to all 3 owners, done at the first 2 answers (is it one
                slow owner process, scheduled late on a shared machine?)

Also counted: the GC pauses in the benchmark's process during each variant's runs
(``gc.callbacks``), and
the nodes' own ``R_GET`` service time (their ``direct`` latency histogram, whose p95
bucket bounds what the node spent). Prints one line per variant: median over the
runs of p50/p95/p99, the p95 ratio to ``inproc``, and the others' CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.bench_cluster import (
    CpuSample,
    CpuUse,
    _client_args,
    bench_keys,
    bench_value,
    inproc_cluster,
    run_async,
    tcp_cluster,
)
from hypercache import AsyncClient
from hypercache.client import commands
from hypercache.client._common import OwnerRead
from hypercache.errors import HyperCacheError, NoAnswerError
from hypercache.replication import QuorumRound

R_GET = commands.R_GET.op
VARIANTS = ("inproc", "tcp", "tcp-closures", "tcp-nogc", "tcp-poll", "tcp-all3")


class AllOwnersRead(OwnerRead):
    """An owner read that asks every owner at once and is done at ``required``."""

    def __init__(
        self, key: bytes, owners: tuple[str, ...], required: int, level: str = "quorum"
    ) -> None:
        QuorumRound.__init__(self, owners, required, ask_all=True, level=level)
        self.key = key


class AllOwnersClient(AsyncClient):
    def _owner_read(self, key: bytes, level: str | None) -> OwnerRead | None:
        rd = super()._owner_read(key, level)
        if rd is None:
            return None
        return AllOwnersRead(rd.key, tuple(rd.owners), rd.required, rd.level)


class ClosuresClient(AsyncClient):
    """The owner read's callbacks as closures that name each other (the code before
    :class:`~hypercache.client.owner_ask.OwnerAsk`): a reference cycle per read."""

    async def _ask_owners(self, rd: OwnerRead) -> None:
        payload = [rd.key]
        first = rd.start()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timeout = self._timeout

        def launch(address: str) -> None:
            try:
                peer = self._peer(address)
            except HyperCacheError as exc:
                outcome(address, None, exc)
                return
            peer.send_callback(
                R_GET, payload, timeout, lambda raw, exc: answered(address, raw, exc)
            )

        def answered(address: str, raw: Any, exc: BaseException | None) -> None:
            if isinstance(exc, NoAnswerError):
                self._suspect(address)
            outcome(address, raw, exc)

        def outcome(address: str, raw: Any, exc: BaseException | None) -> None:
            if done.cancelled():
                return
            if exc is not None and not isinstance(exc, HyperCacheError):
                if not done.done():
                    done.set_exception(exc)
                return
            nxt = self._owner_answer(rd, address, raw, exc)
            if nxt is not None:
                launch(nxt)
            if rd.done and not done.done():
                done.set_result(None)

        for address in first:
            launch(address)
        await done


@contextlib.contextmanager
def gc_pauses(into: list[float]) -> Iterator[None]:
    """Record the seconds of every garbage collection meanwhile into ``into``."""
    started: list[float] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            into.append(time.perf_counter() - started.pop())

    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)


def direct_p95_us(text: str) -> float | None:
    """The upper bound (µs) of the bucket holding the p95 of the node's ``get``
    ``direct`` (R_GET) latency, from its /metrics text."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("hypercache_dist_op_latency_seconds_bucket{") and (
            'route="direct"' in line
        ):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    return next(le for le, count in sorted(buckets) if count >= 0.95 * total) * 1e6


async def profile(seeds: list[str], runs: int, n: int, children: Sequence[int]) -> dict[str, Any]:
    keys, value = bench_keys(), bench_value()
    figures: dict[str, list[Any]] = {v: [] for v in VARIANTS}
    pauses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    async with contextlib.AsyncExitStack() as stack:
        inproc = await stack.enter_async_context(inproc_cluster())
        await inproc.set_many(dict.fromkeys(keys, value))
        clients: dict[str, AsyncClient] = {"inproc": inproc}
        for name in VARIANTS[1:]:
            cls = {"tcp-all3": AllOwnersClient, "tcp-closures": ClosuresClient}.get(
                name, AsyncClient
            )
            client = cls(seeds, **_client_args())
            stack.push_async_callback(client.close)
            await client.connect()
            clients[name] = client
        await clients["tcp"].set_many(dict.fromkeys(keys, value))
        for client in clients.values():  # connections to every owner, warm
            for key in keys[:1000]:
                await client.get(key)
        for peer in clients["tcp-poll"]._peers.values():
            conn: Any = peer.conn
            conn.busy_poll = 100e-6
        for r in range(runs):
            for name in VARIANTS:
                client = clients[name]
                walk = keys[(r * n) % len(keys) :] + keys[: (r * n) % len(keys)]
                before = CpuSample.take(children)
                if name == "tcp-nogc":
                    gc.disable()
                try:
                    with gc_pauses(pauses[name]):
                        run = await run_async(client.get, walk, n, 1, 30.0)
                finally:
                    gc.enable()
                use = CpuUse.between(before, CpuSample.take(children))
                figures[name].append((run, math.nan if use is None else use.others))
                print(
                    f"run {r + 1}/{runs} {name:9} p50 {run.p50_ns / 1e3:6.0f} us "
                    f"p95 {run.p95_ns / 1e3:6.0f} us p99 {run.p99_ns / 1e3:6.0f} us",
                    file=sys.stderr,
                    flush=True,
                )
    return {"figures": figures, "gc_pauses": pauses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.read_profile", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--requests", type=int, default=3000, help="gets per run")
    parser.add_argument("--node-arg", action="append", default=[], help="a flag for nodes")
    args = parser.parse_args(argv)
    import uvloop

    children: list[int] = []
    with (
        tempfile.TemporaryDirectory(prefix="hypercache-read-profile-") as tmp,
        tcp_cluster(Path(tmp), pids=children, extra_args=args.node_arg) as seeds,
    ):
        out = uvloop.run(profile(seeds, args.runs, args.requests, children))
        servers = []

        for port_file in sorted(Path(tmp).glob("*.out")):
            line = port_file.read_text()
            http = line.split("http=", 1)[1].split()[0]
            with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as resp:
                servers.append(direct_p95_us(resp.read().decode()))
    med: Callable[[list[float]], float] = statistics.median
    base = med([run.p95_ns for run, _ in out["figures"]["inproc"]])
    for name in VARIANTS:
        rows = out["figures"][name]
        p50 = med([r.p50_ns for r, _ in rows]) / 1e3
        p95 = med([r.p95_ns for r, _ in rows]) / 1e3
        p99 = med([r.p99_ns for r, _ in rows]) / 1e3
        ratios = [
            r.p95_ns / i.p95_ns
            for (r, _), (i, _) in zip(rows, out["figures"]["inproc"], strict=True)
        ]
        others = med([o for _, o in rows])
        print(
            f"{name:9} p50 {p50:6.0f} us  p95 {p95:6.0f} us  p99 {p99:6.0f} us  "
            f"p95/inproc {p95 * 1e3 / base:4.2f}x (per run {min(ratios):.2f}-{max(ratios):.2f})"
            f"  others' CPU {others:.2f}"
        )
    for name, pauses in out["gc_pauses"].items():
        print(
            f"{name:12} GC in the benchmark process: {len(pauses)} collections, "
            f"{sum(pauses) * 1e3:.1f} ms in all, longest {max(pauses, default=0) * 1e6:.0f} us"
        )
    print("nodes' R_GET service p95 bucket (us):", servers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
