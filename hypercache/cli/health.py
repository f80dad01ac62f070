"""Whether a cluster is whole, as a client sees it: ``hypercache health`` and
``hypercache ping --strict``.

The client decides from what it can reach, not from what the nodes say of
themselves (their ``/health`` is another view): given the partition table and the
nodes that answered a ``PING``,

- **down**: no node of the table answered;
- **degraded**: some node of the table did not answer, or some partition has fewer
  reachable owners than the cluster's replication (its owners are down, or the
  cluster has fewer nodes than its replication);
- **ok**: otherwise.

:func:`assess` is pure; the CLI does the asking.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from hypercache.client.topology import NodeInfo, Topology

__all__ = ["Health", "Shortfall", "assess"]

Status = Literal["ok", "degraded", "down"]

#: Groups of short partitions listed at most (the rest are counted).
MAX_GROUPS: Final = 8


@dataclass(frozen=True, slots=True)
class Shortfall:
    """Partitions that miss owners the same way.

    :ivar partitions: how many partitions.
    :ivar reachable: their owners that answered.
    :ivar owners: their owners in the table (below the replication when the cluster
        has fewer nodes than that).
    :ivar missing: the ids of their owners that did not answer.
    :ivar example: one of them.
    """

    partitions: int
    reachable: int
    owners: int
    missing: tuple[str, ...]
    example: int


@dataclass(frozen=True, slots=True)
class Health:
    """What :func:`assess` found (see the module docstring)."""

    status: Status
    replication: int
    partitions: int
    nodes: tuple[NodeInfo, ...]
    #: address -> why it did not answer, for the nodes of the table that did not
    unreachable: dict[str, str] = field(default_factory=dict)
    #: the partitions with fewer reachable owners than the replication, grouped
    short: tuple[Shortfall, ...] = ()

    @property
    def short_partitions(self) -> int:
        return sum(s.partitions for s in self.short)

    def lines(self) -> list[str]:
        """The report, one line each, as ``hypercache health`` prints it."""
        up = len(self.nodes) - len(self.unreachable)
        out = [f"status: {self.status}", f"nodes: {up} of {len(self.nodes)} reachable"]
        for node in self.nodes:
            if node.address in self.unreachable:
                why = self.unreachable[node.address].removeprefix(f"{node.address}: ")
                out.append(f"  unreachable: {node.node_id} at {node.address} ({why})")
        if not self.short:
            out.append(
                f"partitions: all {self.partitions} have {self.replication} reachable owners"
                f" (replication {self.replication})"
            )
            return out
        out.append(
            f"partitions: {self.short_partitions} of {self.partitions} have fewer than "
            f"{self.replication} reachable owners (replication {self.replication})"
        )
        for s in self.short[:MAX_GROUPS]:
            reasons = []
            if s.missing:
                reasons.append("unreachable: " + ", ".join(s.missing))
            if s.owners < self.replication:
                reasons.append(f"only {s.owners} owners in the table")
            out.append(
                f"  {s.partitions} partitions with {s.reachable} of {self.replication} "
                f"(e.g. partition {s.example}; {'; '.join(reasons)})"
            )
        rest = self.short[MAX_GROUPS:]
        if rest:
            out.append(f"  and {sum(s.partitions for s in rest)} partitions more")
        return out


def assess(topology: Topology, unreachable: Mapping[str, str]) -> Health:
    """The health of the cluster of ``topology`` when the nodes in ``unreachable``
    (address -> why) did not answer and every other node of the table did."""
    ids = {node.address: node.node_id for node in topology.nodes}
    down = {a: why for a, why in unreachable.items() if a in ids}
    replication = topology.replication
    groups: dict[tuple[int, int, tuple[str, ...]], list[int]] = {}
    for p in range(topology.partitions):
        owners = topology.partition_owners(p)
        missing = tuple(ids[a] for a in owners if a in down)
        reachable = len(owners) - len(missing)
        if reachable < replication:
            groups.setdefault((reachable, len(owners), missing), []).append(p)
    short = tuple(
        sorted(
            (
                Shortfall(len(ps), reachable, owners, missing, ps[0])
                for (reachable, owners, missing), ps in groups.items()
            ),
            key=lambda s: (s.reachable, -s.partitions, s.missing),
        )
    )
    if topology.nodes and len(down) == len(topology.nodes):
        status: Status = "down"
    elif down or short:
        status = "degraded"
    else:
        status = "ok"
    return Health(status, replication, topology.partitions, topology.nodes, down, short)
