"""Memory soak: ``python -m bench.soak --minutes 30`` (``make soak``).

Three ``hypercache-node`` processes started with ``--fault-injection`` take a steady
mix from 4 client threads (QUORUM sets with TTLs of 1-5 s, deletes, gets over a
bounded key space) while a fault comes every ``--fault-every`` seconds (10% loss
for a few seconds, or a SIGKILL and restart of one node). Every node's RSS is
sampled every few seconds; after a warm-up (the first third) the least-squares
slope of each node's RSS must stay within noise: the growth it predicts over the
measured window is under 10% of the node's mean RSS, or under 3 times the residuals'
standard deviation. The caps are checked at every sample: queued hints under the
hint caps, tombstones and keys under the key space, open connections under a bound.

Prints one summary line (and appends it as JSON to ``$CHAOS_REPORT`` when set).
Exit status 0 when everything held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hypercache import Client
from hypercache.cluster.local import ProcessCluster
from hypercache.errors import HyperCacheError

NODES = 3
KEYS = 2000
CLIENTS = 4
#: open connections a node may hold: peers, clients (a pool each), the harness
MAX_CONNECTIONS = 64
FLAGS = (
    "--fault-injection",
    "--heartbeat-interval",
    "0.2",
    "--failure-timeout",
    "1",
    "--seed-retry-interval",
    "0.2",
    "--request-timeout",
    "2",
    "--connect-timeout",
    "1",
    "--hint-max-per-node",
    "5000",
)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def slope(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope (units per second) and the residuals' standard deviation."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    residuals = [y - (my + b * (x - mx)) for x, y in points]
    return b, statistics.pstdev(residuals)


def post_faults(cluster: ProcessCluster, rules: list[dict[str, Any]]) -> None:
    import urllib.request

    for node in cluster:
        if node.running:
            request = urllib.request.Request(
                f"http://{node.http}/internal/faults",
                data=json.dumps({"rules": rules}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=5) as resp:
                resp.read()


def client_loop(seeds: list[str], stop: threading.Event, seed: int, errors: list[int]) -> None:
    rng = random.Random(seed)
    with Client(seeds, timeout=5.0, consistency="quorum") as client:
        while not stop.is_set():
            key = f"soak-{rng.randrange(KEYS)}"
            roll = rng.random()
            try:
                if roll < 0.5:
                    client.set(key, b"x" * rng.randrange(10, 500), ttl=rng.uniform(1, 5))
                elif roll < 0.65:
                    client.delete(key)
                else:
                    client.get(key)
            except HyperCacheError:
                errors[0] += 1
            stop.wait(0.001)


def soak(minutes: float, fault_every: float, sample_every: float) -> dict[str, Any]:
    duration = minutes * 60
    rng = random.Random(20261204)
    with (
        tempfile.TemporaryDirectory(prefix="hypercache-soak-") as tmp,
        ProcessCluster(NODES, Path(tmp), FLAGS) as cluster,
    ):
        stop = threading.Event()
        errors = [0]
        threads = [
            threading.Thread(target=client_loop, args=(cluster.addresses, stop, i, errors))
            for i in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        samples: dict[int, list[tuple[float, float]]] = {i: [] for i in range(NODES)}
        caps_broken: list[str] = []
        faults: list[str] = []
        start = time.monotonic()
        next_fault = start + fault_every
        try:
            while (now := time.monotonic()) - start < duration:
                for i, node in enumerate(cluster):
                    if not node.running or node.proc is None:
                        continue
                    samples[i].append((now - start, float(rss_bytes(node.proc.pid))))
                    stats = node.http_json("/stats")
                    hints = node.http_json("/dist/hints")
                    if hints["queued"] > hints["caps"]["max_total"]:
                        caps_broken.append(f"{node.node_id}: {hints['queued']} hints queued")
                    if stats["store"]["tombstones"] + stats["store"]["keys"] > KEYS:
                        caps_broken.append(f"{node.node_id}: {stats['store']} over the key space")
                    if stats["net"]["connections_open"] > MAX_CONNECTIONS:
                        caps_broken.append(
                            f"{node.node_id}: {stats['net']['connections_open']} open"
                        )
                if now >= next_fault:
                    if rng.random() < 0.5:
                        post_faults(cluster, [{"kind": "drop", "rate": 0.1}])
                        time.sleep(min(5.0, fault_every / 2))
                        post_faults(cluster, [])
                        faults.append("loss")
                    else:
                        victim = rng.randrange(NODES)
                        cluster.kill(victim)
                        time.sleep(min(5.0, fault_every / 2))
                        cluster.restart(victim)
                        samples[victim] = []  # a new process: a new series
                        faults.append(f"kill:{victim}")
                    next_fault = time.monotonic() + fault_every
                time.sleep(sample_every)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        verdicts = []
        for i, points in samples.items():
            warm = [p for p in points if p[0] >= points[0][0] + (points[-1][0] - points[0][0]) / 3]
            if len(warm) < 3:
                verdicts.append((i, 0.0, 0.0, True))
                continue
            b, noise = slope(warm)
            growth = b * (warm[-1][0] - warm[0][0])
            mean = statistics.fmean(p[1] for p in warm)
            verdicts.append(
                (i, b * 60 / 2**20, mean / 2**20, growth < 0.1 * mean or growth < 3 * noise)
            )
        return {
            "minutes": minutes,
            "faults": len(faults),
            "client_errors": errors[0],
            "rss_mib": ",".join(f"{v[2]:.1f}" for v in verdicts),
            "slope_mib_per_min": ",".join(f"{v[1]:.3f}" for v in verdicts),
            "rss_flat": all(v[3] for v in verdicts),
            "caps_broken": len(caps_broken),
            "caps_detail": caps_broken[:3],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    args = parser.parse_args(argv)
    figures = soak(args.minutes, args.fault_every, args.sample_every)
    line = "soak: " + " ".join(f"{k}={v}" for k, v in figures.items())
    print(line)
    path = os.environ.get("CHAOS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"scenario": "soak", **figures}) + "\n")
    return 0 if figures["rss_flat"] and not figures["caps_broken"] else 1


if __name__ == "__main__":
    sys.exit(main())
