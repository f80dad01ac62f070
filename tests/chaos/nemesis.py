"""Faults on real nodes: the ``/internal/faults`` endpoint of nodes started with
``--fault-injection``, and rule sets for the usual faults."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

from hypercache.cluster.local import NodeProcess, ProcessCluster

#: The flag every node of a chaos cluster runs with.
FAULT_FLAGS: tuple[str, ...] = ("--fault-injection",)


def post_json(node: NodeProcess, path: str, body: Any, timeout: float = 5.0) -> Any:
    """``POST`` ``body`` as JSON to a management path; the decoded JSON answer.

    :raises urllib.error.HTTPError: a status other than 2xx.
    """
    request = urllib.request.Request(
        f"http://{node.http}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def set_faults(
    nodes: Iterable[NodeProcess], rules: Sequence[dict[str, Any]], seed: int | None = None
) -> None:
    """Give every running node of ``nodes`` the rule set ``rules`` (empty: clear)."""
    for node in nodes:
        if node.running:
            post_json(node, "/internal/faults", {"rules": list(rules), "seed": seed})


def heal(cluster: ProcessCluster) -> None:
    """Clear every running node's rules."""
    set_faults(cluster, [])


def loss(rate: float) -> list[dict[str, Any]]:
    """Lose ``rate`` of the messages both ways (each node drops that share of what it
    sends and of what it receives)."""
    return [{"kind": "drop", "rate": rate, "direction": "both"}]


def partition(*groups: Sequence[str]) -> list[dict[str, Any]]:
    """No message between nodes of different ``groups`` (lists of node ids)."""
    return [{"kind": "partition", "groups": [list(g) for g in groups]}]


def injected(node: NodeProcess) -> dict[str, int]:
    """The node's counts of faults injected, by kind."""
    counts: dict[str, int] = node.http_json("/internal/faults")["injected"]
    return counts
