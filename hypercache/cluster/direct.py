"""The node side of one-hop client writes: ``W_PUT`` and ``W_HINT``.

A client that knows the partition table stamps a write's version from its own hybrid
logical clock and sends it, as ``W_PUT``, to every owner of the key at once
(``docs/design.md``, "Client-stamped writes"). Each owner checks, in this order:

1. the payload, as an ``R_PUT`` entry (:meth:`Replica.check_entry`), and that it is
   a value (deletes go through ``DELETE``: a node coordinates them);
2. that this node owns the key in its own ring: else
   :class:`~hypercache.errors.WrongOwnerError`, nothing applied (the client's table
   is stale: it fetches the table once and tries again, then goes through a node);
3. the version's timestamp: not past the clock's horizon (``max_clock_skew`` ahead,
   the :meth:`HLC.admits <hypercache._core.hlc.HLC.admits>` rule every path applies)
   nor more than ``max_clock_skew`` behind this node's wall clock: else
   :class:`~hypercache.errors.ClockSkewError`, counted in
   ``hypercache_dist_versions_refused_total{path="client"}`` (the client goes
   through a node, which stamps the version).

An owner applies the write even when the owner list the client names (its
:func:`~hypercache.replication.owners_tag`) is not this node's own (the ring changed
under the client): the key is this node's, and a client that stops waiting at its
quorum would not hear a refusal. It then copies the write to the other owners of its
own ring (one may be missing from the client's list: a node that just gained the
partition), and the answer says the client's list is stale (the client fetches the
table before long). While the key's partition is being handed over, the owner also
copies the write to the partition's previous owners. Copies are best effort, as a
coordinator's to previous owners are (``Coordinator.copy_on``: ``R_PUT_MANY``
mode 3, which a node that neither owns nor holds the partition any more drops).

The write is then applied through :meth:`Replica.put` like every other version (the
WATCH hook, newer wins) and answered ``[applied, clock, stale]``: whether it was newer than
what the node held, the node's clock after it (the client moves its own clock past
it), and whether the client's owner list differs from this node's. The scope
check (``write``, for a token's client) is the server's, from
:data:`~hypercache.net.security.OP_SCOPES`.

``W_HINT [target, key, value, ts, origin, expire_at, tombstone, tag]``: the client
could not reach owner ``target``; this node, another owner that took the write,
queues it as a hint for ``target`` (:meth:`~hypercache.cluster.handoff.Handoff.hint`),
replayed as every hint is. The same checks apply (the hint's version must be one
this node would take), and ``target`` must be another owner of the key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

from hypercache._core.hlc import LOGICAL_BITS, wall_clock_ms
from hypercache.cluster.coordinator import Coordinator
from hypercache.cluster.replica import Replica
from hypercache.errors import ClockSkewError, ProtocolError, WrongOwnerError
from hypercache.replication import KeyedEntry, owners_tag

__all__ = ["DirectWrites"]

_W_PUT_FIELDS: Final = 7
_W_HINT_FIELDS: Final = 8


class _Hintable(Protocol):
    def hintable(self, node_id: str) -> bool: ...


class DirectWrites:
    """Answers ``W_PUT`` and ``W_HINT`` (see the module docstring).

    :param node_id: this node's id.
    :param replica: this node's replica side (its store, clock and counters).
    :param owners: ``key -> [node_id, ...]`` from the current ring.
    :param coordinator: this node's coordinator (the partitions on the move, where
        hints go, the copies to previous owners).
    :param membership: who is worth a hint.
    :param max_skew_ms: how far behind this node's wall clock a client version may be.
    """

    def __init__(
        self,
        *,
        node_id: str,
        replica: Replica,
        owners: Callable[[bytes], list[str]],
        coordinator: Coordinator,
        membership: _Hintable,
        max_skew_ms: int,
    ) -> None:
        self.node_id = node_id
        self.replica = replica
        self.owners = owners
        self.coordinator = coordinator
        self.membership = membership
        self.max_skew_ms = max_skew_ms
        self._partition_of = replica.store.partition_of
        # owner list -> its tag: a cluster has few distinct lists
        self._tags: dict[tuple[str, ...], int] = {}

    def w_put(self, payload: Any) -> list[Any]:
        """``W_PUT [key, value, ts, origin, expire_at_ms, false, owners_tag]`` →
        ``[applied, clock]``."""
        if type(payload) is not list or len(payload) != _W_PUT_FIELDS:
            raise ProtocolError(
                "W_PUT payload must be [key, value, ts, origin, expire_at, false, owners_tag]"
            )
        entry, owners, stale = self._checked(payload[:6], payload[6])
        applied = self.replica.w_put(entry)
        others: list[str] = []
        if stale:
            # The client wrote the owners of a table that is not this node's: an
            # owner of this node's ring may be left out (one that just gained the
            # partition, whose stream may be over): every other owner gets a copy.
            others = [o for o in owners if o != self.node_id]
        moves = self.coordinator.moves
        if moves is not None and moves.active:
            p = self._partition_of(entry[0])
            others += [o for o in moves.previous_owners(p) if o not in owners]
        if others:
            self.coordinator.copy_on(others, list(entry))
        return [applied, self.replica.clock.update(0), stale]

    def w_hint(self, payload: Any) -> bool:
        """``W_HINT [target, key, value, ts, origin, expire_at_ms, false, owners_tag]``
        → whether the hint was queued (False: no hinted handoff here, or ``target``
        is no longer worth one)."""
        if type(payload) is not list or len(payload) != _W_HINT_FIELDS:
            raise ProtocolError(
                "W_HINT payload must be [target, key, value, ts, origin, expire_at, false, "
                "owners_tag]"
            )
        target = payload[0]
        if type(target) is not str:
            raise ProtocolError("W_HINT target must be a node id (str)")
        entry, owners, _stale = self._checked(payload[1:7], payload[7])
        key, value, ts, origin, expire_at, tombstone = entry
        if target == self.node_id or target not in owners:
            raise WrongOwnerError(f"W_HINT target {target!r} is not another owner of the key")
        sink = self.coordinator.hints
        if sink is None or not self.membership.hintable(target):
            return False
        self.replica.stats.client_hints += 1
        sink.hint(target, key, value, ts, origin, expire_at, tombstone)
        return True

    def _checked(self, raw: list[Any], tag: Any) -> tuple[KeyedEntry, tuple[str, ...], bool]:
        """The checked entry, this node's owners of its key, and whether the client's
        owner list is another (stale)."""
        replica = self.replica
        entry = replica.check_entry(raw)
        key, _value, ts, _origin, _expire_at, tombstone = entry
        if tombstone:
            raise ProtocolError("W_PUT carries a value (a delete goes through DELETE)")
        if type(tag) is not int:
            raise ProtocolError("W_PUT owners_tag must be an int")
        owners = tuple(self.owners(key))
        mine = self._tags.get(owners)
        if mine is None:
            if len(self._tags) > 4096:
                self._tags.clear()
            mine = self._tags[owners] = owners_tag(owners)
        stats = replica.stats
        if self.node_id not in owners:
            stats.direct_puts_stale += 1
            raise WrongOwnerError(
                f"{self.node_id}: not an owner of this key: the client's table is stale "
                f"(this node's ring names {', '.join(owners)})"
            )
        stale = tag != mine
        if stale:
            stats.direct_puts_stale += 1
        floor = (wall_clock_ms() - self.max_skew_ms) << LOGICAL_BITS
        if not replica.clock.admits(ts) or ts < floor:
            stats.versions_refused["client"] += 1
            behind = ts < floor
            raise ClockSkewError(
                f"{self.node_id}: client version {ts} is more than max_clock_skew="
                f"{self.max_skew_ms} ms {'behind' if behind else 'ahead of'} this node's "
                "clock: write through a node, or fix the client's clock"
            )
        return entry, owners, stale
