"""The client's view of the cluster: the partition table, and where to send a request.

A node answers ``TOPOLOGY`` with the table the cluster agreed on::

    {"epoch": int, "partitions": int, "replication": int,
     "nodes": [[node_id, "host:port"], ...],
     "table": [[node_index, ...] for each partition]}

:class:`Topology` turns it into a lookup: the key's partition comes from the
compiled :class:`~hypercache._core.ring.Ring` (``Ring.from_table``, the very code
the nodes use, so client and node agree bit for bit), and each partition maps to a
precomputed tuple of owner addresses, primary first. ``owners(key)`` is one xxh3
hash, one shift and one tuple index.

:class:`Router` decides the order in which a client tries nodes for one request:

- ``route="owner"``: the key's owners that are not set aside, primary first; then
  every other node of the table; then the seeds; and last, as a final resort, the
  nodes set aside. Any node can coordinate any key, so the later candidates still
  give a correct answer (one proxy hop further).
- ``route="any"``: the seeds, round-robin (each node proxies to the owners).

A node is *set aside* (:meth:`Router.mark_down`) when a request to it timed out
or it could not be reached (refused or failed connection, connection lost). It
stays aside **until it answers again**: the client probes it in the background
(``PING``, see ``ClientBase``) and :meth:`Router.mark_up` brings it back at the
first answer, the probe's or any other request's. There is no expiry: a node that
is paused or dead is not sent real requests meanwhile, and costs them nothing.
When every candidate of a request is set aside they are still tried, in the same
order, last: the client never refuses a request on its own belief alone. Setting
a node aside also marks the table stale, and the next request fetches a new one
(at most once per ``min_refresh`` seconds). The table is also refetched every
``topology_refresh`` seconds. The newest fetched table always replaces the old
one: the epoch is shown for diagnostics, not used to refuse a table (a cluster
restarted from scratch starts again at a low epoch).

The router keeps only plain attributes and dicts that it never iterates while
another thread may change them (``list(d)`` and ``d.get`` are single operations
under the GIL), so the sync client shares one between threads without a lock; the
worst outcome of a race is one extra table fetch, or a node brought back by a
probe's answer just as another thread sets it aside (the probe did get an answer).
The probes themselves (a task or a thread per node set aside) belong to the
clients; the router only keeps the set.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from hypercache._core.ring import Ring
from hypercache.consistency import Consistency
from hypercache.errors import ConfigError, ProtocolError
from hypercache.replication import owners_tag
from hypercache.units import parse_hostport

__all__ = ["NodeInfo", "Router", "Topology"]

#: Smallest delay between two table fetches triggered by failures.
MIN_REFRESH: Final = 1.0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A cluster node as the table names it."""

    node_id: str
    address: str


@dataclass(frozen=True, eq=False)
class Topology:
    """A partition table fetched from the cluster.

    :ivar epoch: version of the membership the table was built from.
    :ivar partitions: number of partitions (a power of two).
    :ivar replication: replicas per key the cluster is configured for.
    :ivar nodes: the nodes, in the order the table indexes them.
    :ivar table: per partition, the indexes into :attr:`nodes` of its owners,
        primary first.
    :ivar read_consistency: the nodes' default read level (``"one"``, ``"quorum"``,
        ``"all"``) when the answer carries the optional ``read_consistency`` key,
        else ``None``. A client that reads from the owners itself uses it for reads
        without an explicit level; without it such reads go through a node.
    :ivar max_value: the largest value the nodes take (their ``max_value``, in
        bytes) when the answer carries the optional ``max_value`` key, else ``None``.
    :ivar write_consistency: the nodes' default write level when the answer carries
        the optional ``write_consistency`` key, else ``None`` (a client that writes
        the owners itself then sends writes without an explicit level through a node).
    """

    epoch: int
    partitions: int
    replication: int
    nodes: tuple[NodeInfo, ...]
    table: tuple[tuple[int, ...], ...] = field(repr=False)
    _ring: Any = field(repr=False)
    _rows: tuple[tuple[str, ...], ...] = field(repr=False)
    read_consistency: str | None = None
    max_value: int | None = None
    write_consistency: str | None = None
    #: per partition: (owner addresses, owner ids, owners_tag), for W_PUT
    _writes: tuple[tuple[tuple[str, ...], tuple[str, ...], int], ...] = field(
        repr=False, default=()
    )

    @classmethod
    def from_wire(cls, payload: Any) -> Topology:
        """Validate a ``TOPOLOGY`` answer and build the lookup.

        :raises ProtocolError: the answer is malformed or inconsistent.
        """
        try:
            return cls._from_wire(payload)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"malformed TOPOLOGY answer: {exc}") from None

    @classmethod
    def _from_wire(cls, payload: Any) -> Topology:
        if type(payload) is not dict:
            raise ProtocolError(f"TOPOLOGY answer must be a map, got {type(payload).__name__}")
        epoch, partitions, replication = (
            payload["epoch"],
            payload["partitions"],
            payload["replication"],
        )
        for name, value in (
            ("epoch", epoch),
            ("partitions", partitions),
            ("replication", replication),
        ):
            if type(value) is not int or value < 0:
                raise ProtocolError(f"TOPOLOGY field {name!r} must be a natural, got {value!r}")
        nodes: list[NodeInfo] = []
        for item in payload["nodes"]:
            node_id, address = item
            if type(node_id) is not str or type(address) is not str:
                raise ProtocolError(f"TOPOLOGY node entry must be [str, str], got {item!r}")
            try:
                parse_hostport(address)
            except ConfigError:
                raise ProtocolError(
                    f"TOPOLOGY node {node_id!r} has a bad address {address!r}"
                ) from None
            nodes.append(NodeInfo(node_id, address))
        table = tuple(tuple(row) for row in payload["table"])
        if len(table) != partitions:
            raise ProtocolError(f"TOPOLOGY table has {len(table)} rows for {partitions} partitions")
        # Ring.from_table wants the node ids sorted (its own order); the wire lists
        # them in the node's order, so translate the indexes.
        order = sorted(range(len(nodes)), key=lambda i: nodes[i].node_id)
        rank = {old: new for new, old in enumerate(order)}
        try:
            ring = Ring.from_table(
                [nodes[i].node_id for i in order],
                [[rank[o] for o in row] for row in table],
                replication=max(replication, 1),
            )
        except ConfigError as exc:
            raise ProtocolError(f"TOPOLOGY table rejected: {exc}") from None
        # Many partitions share an owner list: keep one tuple per distinct list.
        interned: dict[tuple[int, ...], tuple[str, ...]] = {}
        interned_w: dict[tuple[int, ...], tuple[tuple[str, ...], tuple[str, ...], int]] = {}
        rows = []
        writes = []
        for row in table:
            owners = interned.get(row)
            if owners is None:
                owners = interned[row] = tuple(nodes[o].address for o in row)
                ids = tuple(nodes[o].node_id for o in row)
                interned_w[row] = (owners, ids, owners_tag(ids))
            rows.append(owners)
            writes.append(interned_w[row])
        levels: dict[str, str | None] = {}
        for name in ("read_consistency", "write_consistency"):
            level = payload.get(name)
            if level is not None:
                try:
                    level = Consistency.parse(level).value
                except ConfigError:
                    raise ProtocolError(
                        f"TOPOLOGY field {name!r} is not a level: {level!r:.50}"
                    ) from None
            levels[name] = level
        max_value = payload.get("max_value")
        if max_value is not None and (type(max_value) is not int or max_value <= 0):
            raise ProtocolError(
                f"TOPOLOGY field 'max_value' must be a positive int, got {max_value!r:.50}"
            )
        return cls(
            epoch=epoch,
            partitions=partitions,
            replication=replication,
            nodes=tuple(nodes),
            table=table,
            _ring=ring,
            _rows=tuple(rows),
            read_consistency=levels["read_consistency"],
            max_value=max_value,
            write_consistency=levels["write_consistency"],
            _writes=tuple(writes),
        )

    @property
    def addresses(self) -> tuple[str, ...]:
        """Addresses of all nodes, in table order."""
        return tuple(node.address for node in self.nodes)

    def partition_of(self, key: bytes) -> int:
        """The partition of a wire key (``xxh3_64(key) >> (64 - log2(partitions))``)."""
        partition: int = self._ring.partition_of(key)
        return partition

    def owners(self, key: bytes) -> tuple[str, ...]:
        """Addresses of the owners of a wire key, primary first."""
        return self._rows[self._ring.partition_of(key)]

    def write_owners(self, key: bytes) -> tuple[tuple[str, ...], tuple[str, ...], int]:
        """``(addresses, node ids, owners_tag)`` of the owners of a wire key, primary
        first: what a client's ``W_PUT`` needs."""
        return self._writes[self._ring.partition_of(key)]

    def partition_owners(self, partition: int) -> tuple[str, ...]:
        """Addresses of the owners of ``partition``, primary first."""
        return self._rows[partition]

    def load(self) -> dict[str, tuple[int, int]]:
        """Per node address: (partitions it is primary of, partitions it holds)."""
        primary = dict.fromkeys(self.addresses, 0)
        held = dict.fromkeys(self.addresses, 0)
        for row in self._rows:
            primary[row[0]] += 1
            for address in row:
                held[address] += 1
        return {address: (primary[address], held[address]) for address in self.addresses}

    def as_dict(self) -> dict[str, Any]:
        """The table in its wire form."""
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "partitions": self.partitions,
            "replication": self.replication,
            "nodes": [[node.node_id, node.address] for node in self.nodes],
            "table": [list(row) for row in self.table],
        }
        if self.read_consistency is not None:
            out["read_consistency"] = self.read_consistency
        if self.max_value is not None:
            out["max_value"] = self.max_value
        if self.write_consistency is not None:
            out["write_consistency"] = self.write_consistency
        return out


class Router:
    """Orders the nodes to try for each request (see the module docstring).

    :param seeds: the addresses the client was given.
    :param route: ``"owner"`` or ``"any"``.
    :param topology_refresh: seconds between periodic table fetches.
    """

    def __init__(
        self,
        seeds: tuple[str, ...],
        *,
        route: str = "owner",
        topology_refresh: float = 30.0,
    ) -> None:
        self.seeds = seeds
        self.by_owner = route == "owner"
        self.topology: Topology | None = None
        self.topology_refresh = topology_refresh
        self._next_refresh = 0.0  # monotonic time of the next fetch; 0 = now
        #: monotonic time the table in use was fetched (0: never)
        self.fetched_at = 0.0
        # address set aside -> (monotonic time it was set aside,)
        self._down: dict[str, tuple[float]] = {}
        self._rr = itertools.count()
        # (wire level, owner count) -> answers needed: a few entries at most
        self._required: dict[tuple[str, int], int] = {}

    # -- the table

    def needs_refresh(self, now: float) -> bool:
        """Whether a table fetch is due (only with ``route="owner"``)."""
        return self.by_owner and now >= self._next_refresh

    def set_topology(self, topology: Topology, now: float) -> None:
        self.topology = topology
        self.fetched_at = now
        self._next_refresh = now + self.topology_refresh

    def refresh_failed(self, now: float) -> None:
        """A fetch failed: try again after :data:`MIN_REFRESH` seconds."""
        self._next_refresh = now + MIN_REFRESH

    def mark_stale(self, now: float) -> None:
        """Fetch a new table soon (not before :data:`MIN_REFRESH` after the last try)."""
        self._next_refresh = min(self._next_refresh, now + MIN_REFRESH)

    def fetch_order(self) -> list[str]:
        """Where to ask for the table: known nodes that are up, the seeds, then the rest."""
        known = self.topology.addresses if self.topology is not None else ()
        return self._ordered(dict.fromkeys((*known, *self.seeds)))

    # -- node health

    def mark_down(self, address: str, now: float) -> bool:
        """Set ``address`` aside until :meth:`mark_up`; return whether it was in use
        until now (the caller then starts probing it)."""
        # setdefault is one step under the GIL: of threads setting the same node
        # aside at once, only the one whose entry (a new tuple) went in sees it back.
        entry = (now,)
        fresh = self._down.setdefault(address, entry) is entry
        self.mark_stale(now)
        return fresh

    def mark_up(self, address: str) -> bool:
        """Use ``address`` again; return whether it was set aside."""
        return self._down.pop(address, None) is not None

    def is_down(self, address: str) -> bool:
        """Whether ``address`` is set aside."""
        return address in self._down

    def knows(self, address: str) -> bool:
        """Whether ``address`` is a seed or a node of the table (a probe of any other
        address, e.g. one given to ``ping``, stops: nothing would route to it)."""
        if address in self.seeds:
            return True
        topology = self.topology
        return topology is not None and address in topology.addresses

    @property
    def down(self) -> list[str]:
        """Addresses set aside now."""
        return list(self._down)

    # -- candidates

    def read_owners(self, key: bytes) -> tuple[str, ...] | None:
        """The owners of ``key`` to read from directly, in the order to ask them:
        table order (primary first), owners set aside last. ``None`` when
        the client does not route by owner or has no table (use the proxy path).
        """
        topology = self.topology
        if not self.by_owner or topology is None:
            return None
        owners = topology.owners(key)
        if not self._down:
            return owners
        down = self._down
        up = tuple(a for a in owners if a not in down)
        if len(up) == len(owners):
            return owners
        return up + tuple(a for a in owners if a not in up)

    def write_required(self, level: str | None, owners: int) -> int | None:
        """Acks a direct write needs from ``owners`` owners at ``level`` (a wire level),
        else at the cluster's advertised default write level; ``None`` when neither
        is known (the write then goes through a node, which applies its own)."""
        if level is None:
            topology = self.topology
            level = None if topology is None else topology.write_consistency
            if level is None:
                return None
        return self.read_required(level, owners)

    @property
    def read_default(self) -> str:
        """The cluster's default read level (its name), ``"quorum"`` if unknown."""
        topology = self.topology
        level = None if topology is None else topology.read_consistency
        return level or "quorum"

    def read_required(self, level: str | None, owners: int) -> int | None:
        """Answers a direct read needs from ``owners`` owners at ``level`` (a wire
        level), else at the cluster's advertised default read level; ``None`` when
        neither is known (the node must apply its own).

        Cached per (level, owners): ``Consistency(level).required(owners)`` costs
        about a microsecond (enum lookups), on every read."""
        if level is None:
            topology = self.topology
            level = None if topology is None else topology.read_consistency
            if level is None:
                return None
        required = self._required.get((level, owners))
        if required is None:
            required = self._required[level, owners] = Consistency(level).required(owners)
        return required

    def first(self, key: bytes | None) -> str:
        """The node a request for ``key`` goes to first (used to group batches)."""
        return next(self.candidates(key))

    def candidates(self, key: bytes | None) -> Iterator[str]:
        """Addresses to try, in order, for a request about ``key`` (None: any node).

        Every address comes at most once; nodes set aside come last.
        """
        topology = self.topology
        if self.by_owner and topology is not None:
            if key is not None:
                owners = topology.owners(key)
                if not self._down:  # the common case: no allocation
                    yield from owners
                    rest = dict.fromkeys((*topology.addresses, *self.seeds))
                    for address in owners:
                        rest.pop(address, None)
                    yield from self._ordered(rest)
                    return
                order = dict.fromkeys((*owners, *topology.addresses, *self.seeds))
            else:
                order = dict.fromkeys(self._rotate(topology.addresses) + self.seeds)
        else:
            order = dict.fromkeys(self._rotate(self.seeds))
        yield from self._ordered(order)

    def _rotate(self, addresses: tuple[str, ...]) -> tuple[str, ...]:
        if len(addresses) < 2:
            return addresses
        i = next(self._rr) % len(addresses)
        return addresses[i:] + addresses[:i]

    def _ordered(self, addresses: dict[str, None]) -> list[str]:
        down = self._down
        up = [a for a in addresses if a not in down]
        if len(up) == len(addresses):
            return up
        return up + [a for a in addresses if a not in up]
