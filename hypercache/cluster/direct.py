"""The node side of one-hop client writes: ``W_PUT`` and ``W_HINT``.

A client that knows the partition table stamps a write's version from its own hybrid
logical clock and sends it, as ``W_PUT``, to every owner of the key at once
(``docs/design.md``, "Client-stamped writes"). Each owner checks, in this order:

1. the payload, as an ``R_PUT`` entry (:meth:`Replica.check_entry`), and that it is
   a value (deletes go through ``DELETE``: a node coordinates them);
2. that the owner list the client names (its :func:`~hypercache.replication.owners_tag`)
   is this node's own for the key, with this node in it: else
   :class:`~hypercache.errors.WrongOwnerError` (the client's table is stale: it
   fetches the table once and tries again, then goes through a node);
3. that the key's partition is not moving (a hand-over writes its previous owners
   too, which the client does not know of): else
   :class:`~hypercache.errors.NotReadyError` (the client goes through a node);
4. the version's timestamp: not past the clock's horizon (``max_clock_skew`` ahead,
   the :meth:`HLC.admits <hypercache._core.hlc.HLC.admits>` rule every path applies)
   nor more than ``max_clock_skew`` behind this node's wall clock: else
   :class:`~hypercache.errors.ClockSkewError`, counted in
   ``hypercache_dist_versions_refused_total{path="client"}`` (the client goes
   through a node, which stamps the version).

The write is then applied through :meth:`Replica.put` like every other version (the
WATCH hook, newer wins) and answered ``[applied, clock]``: whether it was newer than
what the node held, and the node's clock after it (the client moves its own clock
past it). The scope check (``write``, for a token's client) is the server's, from
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
from hypercache.cluster.coordinator import Moves
from hypercache.cluster.handoff import Handoff
from hypercache.cluster.replica import Replica
from hypercache.errors import ClockSkewError, NotReadyError, ProtocolError, WrongOwnerError
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
    :param moves: the partitions on the move (None: nothing ever moves).
    :param hints: where hints go (None: no hinted handoff).
    :param membership: who is worth a hint.
    :param max_skew_ms: how far behind this node's wall clock a client version may be.
    """

    def __init__(
        self,
        *,
        node_id: str,
        replica: Replica,
        owners: Callable[[bytes], list[str]],
        moves: Callable[[], Moves | None],
        hints: Callable[[], Handoff | None],
        membership: _Hintable,
        max_skew_ms: int,
    ) -> None:
        self.node_id = node_id
        self.replica = replica
        self.owners = owners
        self._moves = moves
        self._hints = hints
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
        entry = self._checked(payload[:6], payload[6])
        applied = self.replica.w_put(entry)
        return [applied, self.replica.clock.update(0)]

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
        key, value, ts, origin, expire_at, tombstone = self._checked(payload[1:7], payload[7])
        if target == self.node_id or target not in self.owners(key):
            raise WrongOwnerError(f"W_HINT target {target!r} is not another owner of the key")
        sink = self._hints()
        if sink is None or not self.membership.hintable(target):
            return False
        self.replica.stats.client_hints += 1
        sink.hint(target, key, value, ts, origin, expire_at, tombstone)
        return True

    def _checked(self, raw: list[Any], tag: Any) -> KeyedEntry:
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
        if tag != mine or self.node_id not in owners:
            stats.direct_puts_stale += 1
            raise WrongOwnerError(
                f"{self.node_id}: the client's owner list of this key is stale "
                f"(this node's ring names {', '.join(owners)})"
            )
        moves = self._moves()
        if moves is not None and moves.active:
            p = self._partition_of(key)
            if any(o not in owners for o in moves.previous_owners(p)):
                stats.direct_puts_stale += 1
                raise NotReadyError(
                    f"{self.node_id}: partition {p} is being handed over: write through a node"
                )
        floor = (wall_clock_ms() - self.max_skew_ms) << LOGICAL_BITS
        if not replica.clock.admits(ts) or ts < floor:
            stats.versions_refused["client"] += 1
            behind = ts < floor
            raise ClockSkewError(
                f"{self.node_id}: client version {ts} is more than max_clock_skew="
                f"{self.max_skew_ms} ms {'behind' if behind else 'ahead of'} this node's "
                "clock: write through a node, or fix the client's clock"
            )
        return entry
