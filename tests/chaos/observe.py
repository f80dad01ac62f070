"""What the checkers need from a real cluster once the faults are healed: the owners'
digests, the converged values, the hint counters."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

from chaos.history import diverged
from hypercache import Client
from hypercache.cluster.local import ProcessCluster, wait_for


def owners_table(cluster: ProcessCluster) -> list[list[str]]:
    """Per partition, its owners' node ids (the ring of the first running node)."""
    node = next(n for n in cluster if n.running)
    ring = node.http_json("/cluster/ring?table=1")
    names: list[str] = ring["nodes"]
    return [[names[i] for i in row] for row in ring["table"]]


def digests(cluster: ProcessCluster) -> dict[str, dict[str, str]]:
    """Per node id, ``{partition: digest}`` of its non-empty partitions."""
    return {n.node_id: n.http_json("/internal/merkle")["digests"] for n in cluster if n.running}


def divergence(cluster: ProcessCluster) -> list[str]:
    return diverged(digests(cluster), owners_table(cluster))


def hint_figures(cluster: ProcessCluster) -> dict[str, int]:
    """``queued`` (now), ``enqueued``, ``replayed``, ``dropped`` summed over the nodes."""
    out = {"queued": 0, "enqueued": 0, "replayed": 0, "dropped": 0}
    for node in cluster:
        if node.running:
            hints = node.http_json("/dist/hints")
            out["queued"] += hints["queued"]
            out["enqueued"] += hints.get("enqueued", 0)
            out["replayed"] += hints.get("replayed", 0)
            out["dropped"] += hints.get("dropped_total", 0)
    return out


def wait_converged(cluster: ProcessCluster, timeout: float = 60.0) -> float:
    """Wait until no hint is queued and every partition's owners agree; the seconds
    it took."""
    start = time.monotonic()
    wait_for(
        lambda: hint_figures(cluster)["queued"] == 0 and divergence(cluster) == [],
        timeout=timeout,
        interval=0.2,
        what="hints drained and replicas equal",
    )
    return time.monotonic() - start


def final_values(cluster: ProcessCluster, keys: Iterable[str]) -> dict[str, str | None]:
    """Every key's value as a QUORUM read sees it now."""
    out: dict[str, str | None] = {}
    with Client(cluster.addresses, timeout=5.0, consistency="quorum") as client:
        for key in keys:
            raw: Any = client.get(key)
            out[key] = None if raw is None else str(raw)
    return out


def long_run() -> bool:
    """Whether the full-length scenarios were asked for (``CHAOS_LONG=1``: ``make
    chaos``, ``make kpi``); the default test run uses short forms."""
    return os.environ.get("CHAOS_LONG", "") not in ("", "0")


def report(scenario: str, figures: dict[str, Any]) -> str:
    """Print the scenario's summary line and append it, as JSON, to the file named
    by ``CHAOS_REPORT`` (read by ``bench.kpi_report``) when set."""
    line = f"chaos {scenario}: " + " ".join(f"{k}={v}" for k, v in figures.items())
    print(line)
    path = os.environ.get("CHAOS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"scenario": scenario, **figures}) + "\n")
    return line
