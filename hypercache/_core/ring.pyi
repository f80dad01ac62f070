"""Consistent-hash ring with virtual nodes, precomputed as a partition -> owners table.

The key space is split into :attr:`Ring.partitions` = ``2**k`` partitions by the top
``k`` bits of the key's ``xxh3_64`` hash: ``partition = xxh3_64(key) >> (64 - k)``.
Each partition gets an owner list once, when the ring is built, so :meth:`Ring.owners`
is one hash and one row of a C table.

Placement (docs/ring.md has the measurements and the reasoning):

* Node ``n`` has ``vnodes`` tokens ``xxh3_64(f"{n}#{i}".encode())``, ``i`` in
  ``0..vnodes-1``, on a ring of 64-bit points ordered by (token, node index).
* A partition's **owner set** is the first ``min(replication, len(nodes))``
  distinct nodes met walking the ring clockwise (increasing, wrapping) from the
  **midpoint** of the partition's hash range. Adding a node therefore only ever
  puts the new node into owner sets (about ``replication / (N + 1)`` of them),
  and no partition moves between nodes that were already members.
* The **primary** (first owner) is chosen among the owner set so that every node
  is primary for ``floor(P/N)`` or ``ceil(P/N)`` partitions; the other owners
  follow in walk order. Changing which replica is primary moves no data.

Node indexes in :meth:`Ring.table` refer to :attr:`Ring.nodes`, which is sorted, so
the same membership gives the same table in every process whatever the input order.
"""

from collections.abc import Iterable, Sequence

#: Virtual nodes per node by default (see docs/ring.md for the measurement).
DEFAULT_VNODES: int
#: Partitions by default: 4096 = 2**12.
DEFAULT_PARTITIONS: int
#: Replication factor by default.
DEFAULT_REPLICATION: int
MAX_PARTITION_BITS: int
MAX_VNODES: int
MAX_NODES: int
MAX_REPLICATION: int
MAX_TOKENS: int

class Ring:
    """Partition -> owners table of one cluster membership.

    :param node_ids: the member node ids (non-empty, distinct, non-empty strings);
        any order.
    :param vnodes: virtual nodes (ring tokens) per node, ``1..65536``.
    :param partitions: number of partitions, a power of two up to ``2**20``.
    :param replication: owners per partition; a ring with fewer nodes gives every
        partition all of them.
    :raises hypercache.errors.ConfigError: an argument is invalid; ``field`` names it.
    """

    #: Member node ids, sorted; table entries are indexes into this tuple.
    nodes: tuple[str, ...]
    partitions: int
    #: Replication factor asked for; rows hold ``min(replication, len(nodes))``.
    replication: int
    #: Virtual nodes per node; 0 for a lookup-only ring from :meth:`from_table`.
    vnodes: int

    def __init__(
        self,
        node_ids: Sequence[str],
        *,
        vnodes: int = ...,
        partitions: int = ...,
        replication: int = ...,
    ) -> None: ...
    @classmethod
    def from_table(
        cls,
        nodes: Iterable[str],
        table: Iterable[Iterable[int]],
        *,
        replication: int | None = None,
    ) -> Ring:
        """Rebuild a lookup-only ring from a downloaded :meth:`table`.

        :param nodes: the ring's :attr:`nodes`, in that (sorted) order.
        :param table: one row per partition (a power of two of them), each row the
            owners' indexes into ``nodes``, primary first.
        :param replication: the replication factor; by default the row width.
        :raises hypercache.errors.ConfigError: ``nodes`` unsorted or repeated, or a
            row of the wrong width, with a repeated or out-of-range index.
        """

    def partition_of(self, key: bytes) -> int:
        """Partition of ``key``: ``xxh3_64(key) >> (64 - log2(partitions))``.

        Keys are exact ``bytes`` here and everywhere in the core (subclasses and
        other buffers raise TypeError)."""

    def owners(self, key: bytes) -> list[str]:
        """Owner node ids of ``key``'s partition, primary first."""

    def partition_owners(self, p: int) -> list[str]:
        """Owner node ids of partition ``p``, primary first.

        :raises IndexError: ``p`` is not a partition number.
        """

    def primary(self, p: int) -> str:
        """Primary owner of partition ``p``."""

    def node_partitions(self, node_id: str) -> list[int]:
        """Partitions that ``node_id`` owns (as primary or replica), ascending.

        :raises KeyError: ``node_id`` is not a member.
        """

    def table(self) -> list[list[int]]:
        """The partition -> owners table: row ``p`` lists indexes into :attr:`nodes`,
        primary first. This, with :attr:`nodes`, is what clients download."""

    def load(self) -> dict[str, dict[str, int]]:
        """Per node: ``primary`` partitions, ``replica`` (non-primary) partitions and
        ``owned`` = their sum."""

    def moved(self, other: Ring) -> int:
        """Number of partitions whose owner *set* differs between the two rings
        (node ids compared, primary order ignored).

        :raises ValueError: the rings have different partition counts.
        """

    def __len__(self) -> int:
        """Number of member nodes."""
