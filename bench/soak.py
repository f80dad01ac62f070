"""Memory soak: ``python -m bench.soak --minutes 30`` (``make soak``).

Three ``hypercache-node`` processes started with ``--fault-injection`` take a steady
mix from 4 client threads (QUORUM sets with TTLs of 1-5 s, deletes, gets over a
bounded key space) while a fault comes every ``--fault-every`` seconds (10% loss
for a few seconds, or a SIGKILL and restart of one node). Every node's RSS is
sampled every few seconds; after a warm-up (the first third) the least-squares
slope of each node's RSS must stay within noise: the growth it predicts over the
measured window is under 10% of the node's mean RSS, or under 3 times the residuals'
standard deviation. A restarted node is followed by its new pid, a series of its own;
a node is judged on its longest series, and the verdict fails when a node could not
be judged (too few samples) or a sample of it failed. The caps are checked at every
sample: queued hints under the hint caps, tombstones and keys under the key space,
open connections and asyncio tasks (``/stats``'s ``tasks``, the
``hypercache_asyncio_tasks`` gauge) under bounds.

Prints one summary line (and appends it as JSON to ``$CHAOS_REPORT`` when set, and to
``--results FILE``: ``make soak`` writes soak-results.jsonl, which ``make kpi`` reads).
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


class Series:
    """One node's samples, a segment per process (a restart starts a new one, followed
    by its pid), and what went wrong sampling it."""

    def __init__(self) -> None:
        #: ``[(pid, [(t, rss_bytes)])]``, in start order
        self.segments: list[tuple[int, list[tuple[float, float]]]] = []
        self.failures: list[str] = []
        self.tasks_max = 0
        self.conns_max = 0
        self.hints_max = 0
        self.tombstones_max = 0

    def add(self, pid: int, t: float, rss: float) -> None:
        if not self.segments or self.segments[-1][0] != pid:
            self.segments.append((pid, []))
        self.segments[-1][1].append((t, rss))

    def judged(self) -> list[tuple[float, float]] | None:
        """The window judged: the warm part (after its first third) of the longest
        segment, or None when no segment has ``MIN_POINTS`` warm samples."""
        best: list[tuple[float, float]] | None = None
        for _, points in self.segments:
            if len(points) < 2:
                continue
            cut = points[0][0] + (points[-1][0] - points[0][0]) / 3
            warm = [p for p in points if p[0] >= cut]
            if len(warm) >= MIN_POINTS and (
                best is None or warm[-1][0] - warm[0][0] > best[-1][0] - best[0][0]
            ):
                best = warm
        return best


#: warm samples a node's judged window needs (fewer: the node was not judged: a failure)
MIN_POINTS = 6
#: asyncio tasks a node may have alive: about 10 under this mix (its fixed loops:
#: membership, anti-entropy, hints, the servers; the requests in flight of 4
#: synchronous clients with their replica requests); a leak of one task per request or
#: per connection crosses it within seconds
MAX_TASKS = 200


def _sample(node: Any, series: Series, t: float) -> list[str]:
    """Sample one running node (RSS by its current pid, then ``/stats`` and
    ``/dist/hints``, retried once); the caps it broke. A failure goes to
    ``series.failures``."""
    assert node.proc is not None
    pid = node.proc.pid
    rss = rss_bytes(pid)
    if rss <= 0:
        series.failures.append(f"t={t:.0f}s: no RSS for pid {pid}")
        return []
    for attempt in (1, 2):
        try:
            stats = node.http_json("/stats")
            hints = node.http_json("/dist/hints")
            break
        except OSError as exc:
            if attempt == 2:
                series.failures.append(f"t={t:.0f}s: {exc}")
                return []
            time.sleep(0.5)
    series.add(pid, t, float(rss))
    broken = []
    tasks, conns = int(stats["tasks"]), int(stats["net"]["connections_open"])
    tombstones, keys = int(stats["store"]["tombstones"]), int(stats["store"]["keys"])
    series.tasks_max = max(series.tasks_max, tasks)
    series.conns_max = max(series.conns_max, conns)
    series.hints_max = max(series.hints_max, int(hints["queued"]))
    series.tombstones_max = max(series.tombstones_max, tombstones)
    if hints["queued"] > hints["caps"]["max_total"]:
        broken.append(f"{node.node_id}: {hints['queued']} hints queued")
    if tombstones + keys > KEYS:
        broken.append(f"{node.node_id}: {keys} keys + {tombstones} tombstones > {KEYS}")
    if conns > MAX_CONNECTIONS:
        broken.append(f"{node.node_id}: {conns} connections open > {MAX_CONNECTIONS}")
    if tasks > MAX_TASKS:
        broken.append(f"{node.node_id}: {tasks} asyncio tasks > {MAX_TASKS}")
    return broken


def verdict(series: Series) -> tuple[float, float, bool | None]:
    """Slope (MiB/min), mean RSS (MiB) of the judged window and whether it is flat
    (None: the node was not judged)."""
    warm = series.judged()
    if warm is None:
        return 0.0, 0.0, None
    b, noise = slope(warm)
    growth = b * (warm[-1][0] - warm[0][0])
    mean = statistics.fmean(p[1] for p in warm)
    return b * 60 / 2**20, mean / 2**20, growth < 0.1 * mean or growth < 3 * noise


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
        series = [Series() for _ in range(NODES)]
        caps_broken: list[str] = []
        faults: list[str] = []
        start = time.monotonic()
        next_fault = start + fault_every

        def sample_all(down: int | None = None) -> None:
            """Sample every node but ``down`` (the one a fault killed)."""
            now = time.monotonic() - start
            for i, node in enumerate(cluster):
                if i == down:
                    continue
                if not node.running or node.proc is None:
                    # only a fault stops a node, and it restarts it before the next
                    # sample: this one died on its own
                    series[i].failures.append(f"t={now:.0f}s: not running")
                    continue
                caps_broken.extend(_sample(node, series[i], now))

        def hold(seconds: float, down: int | None = None) -> None:
            """Keep a fault for ``seconds``, sampling the others half-way (the hints
            queued for a killed node are seen while it is down)."""
            time.sleep(seconds / 2)
            sample_all(down)
            time.sleep(seconds / 2)

        try:
            while time.monotonic() - start < duration:
                sample_all()
                if time.monotonic() >= next_fault:
                    if rng.random() < 0.5:
                        post_faults(cluster, [{"kind": "drop", "rate": 0.1}])
                        hold(min(5.0, fault_every / 2))
                        post_faults(cluster, [])
                        faults.append("loss")
                    else:
                        victim = rng.randrange(NODES)
                        cluster.kill(victim)
                        hold(min(5.0, fault_every / 2), down=victim)
                        cluster.restart(victim)  # sampled by its new pid from now on
                        faults.append(f"kill:{victim}")
                    next_fault = time.monotonic() + fault_every
                time.sleep(sample_every)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        verdicts = [verdict(s) for s in series]
        judged = [v[2] is not None for v in verdicts]
        unsampled = [
            f"{cluster[i].node_id}: " + (s.failures[0] if s.failures else "too few samples")
            for i, s in enumerate(series)
            if s.failures or not judged[i]
        ]
        rss_flat = all(v[2] is True for v in verdicts)
        return {
            "minutes": minutes,
            "faults": len(faults),
            "kills": sum(f.startswith("kill") for f in faults),
            "client_errors": errors[0],
            "rss_mib": ",".join(f"{v[1]:.1f}" for v in verdicts),
            "slope_mib_per_min": ",".join(f"{v[0]:.3f}" for v in verdicts),
            "segments": ",".join(str(len(s.segments)) for s in series),
            "judged": f"{sum(judged)}/{NODES}",
            "rss_flat": rss_flat,
            "tasks_max": ",".join(str(s.tasks_max) for s in series),
            "conns_max": ",".join(str(s.conns_max) for s in series),
            "hints_max": ",".join(str(s.hints_max) for s in series),
            "tombstones_max": ",".join(str(s.tombstones_max) for s in series),
            "caps_broken": len(caps_broken),
            "caps_detail": caps_broken[:3],
            "sample_failures": sum(len(s.failures) for s in series),
            "unsampled_detail": unsampled[:3],
            "ok": rss_flat and not caps_broken and not unsampled,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--results", type=Path, help="append the figures as a JSON line to this file too"
    )
    args = parser.parse_args(argv)
    figures = soak(args.minutes, args.fault_every, args.sample_every)
    line = "soak: " + " ".join(f"{k}={v}" for k, v in figures.items())
    print(line)
    for path in (os.environ.get("CHAOS_REPORT"), args.results):
        if path:
            with open(path, "a") as out:
                out.write(json.dumps({"scenario": "soak", **figures}) + "\n")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
