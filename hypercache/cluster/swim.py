"""SWIM: one node's member table, failure detector and gossip, as a pure state machine.

No I/O, no clock and no randomness of its own: time comes in as ``now`` (monotonic
seconds) on every call, the wall clock (used only to judge incarnations) and the
random generator are given to the constructor, and what the machine wants done is
what its methods return (a :class:`Probe` to run, records to piggy-back, helpers
to ask) or what its hooks are told (the ring changed, a member went up or down, a
member restarted, an unknown member was claimed). :mod:`hypercache.cluster.membership`
moves its messages over the network; :mod:`hypercache.cluster.swimsim` over a
simulated one; ``tests/test_swim.py`` drives it by hand with a fake clock.

Members
-------
Every member, this node included, has one record: node id, address, *incarnation*,
*state* and *boot* (the incarnation the member's current life started with), plus
``since`` (local time of the last change of state). States:

``alive``
    answers probes; the only state that is *up* (coordinators wait on it).
``suspect``
    a probe of it failed (no ack, direct or indirect, within ``failure_timeout``);
    it has ``suspect_timeout`` to refute.
``dead``
    suspected for ``suspect_timeout`` without refuting. Still an owner in the
    ring (its partitions stay where they are; hints queue for it).
``left``
    it left gracefully (its own word). Out of the ring on every node, not hinted.
``removed``
    an operator removed it while it was dead or suspect (or, with
    ``dead_removal_timeout``, the timer did). Out of the ring everywhere.

Precedence: for one member, the record with the higher incarnation wins; at equal
incarnation ``removed > left > dead > suspect > alive`` (the :class:`State` values).
Every table merges every record it hears by that rule, so all tables converge on
the same newest record per member whatever the order of the messages. ``left`` and
``removed`` records are kept (a stale ``alive`` from a lagging peer loses against
them); a node that really comes back does so with a higher incarnation.

Incarnations
------------
A node starts with an incarnation taken from its wall clock (milliseconds), so a
restarted node (in memory, empty) comes back above every record of its previous life.
A node that hears a record about itself that beats its own (suspect, dead, removed,
or an older life's record above its current incarnation) *refutes*: it takes that
incarnation plus one, alive, and gossips it. The one exception is a node that left:
it does not come back in the same life. Refuting a removal is deliberate: a removed
node that is in fact alive (a partition healed, an automatic removal on both sides of
one) comes back instead of being shut out while it runs.

A record whose *boot* differs from the one known for that member (while it beats
it) is a **restart**: the hook ``on_restart`` is told (the rebalancer streams the
node its partitions back). A record's incarnation may not run more than
:data:`INCARNATION_HORIZON_MS` ahead of this node's wall clock (refused and
counted): a lie can push a member's incarnation up by a day at most, and the member
can always refute it.

Probing
-------
Each period (:meth:`tick` then :meth:`next_probe`) probes one member: round-robin
over a shuffled list of the ring's other members, a newcomer inserted at a random
place in what is left of the round. The prober pings it; with no ack within
``probe_timeout`` (or at once, when the ping failed outright) it asks up to
``indirect_probes`` alive members (:meth:`helpers`) to ping it on its behalf; with no
ack by ``failure_timeout`` from the start, :meth:`end_probe` marks it suspect. A dead
member is still probed (directly only, no helpers asked, no verdict): that is how the
two sides of a healed partition find each other. Besides its probe, a node pings the
members it holds as suspect (:meth:`notices`, a few a period) so that they hear of
it and refute without waiting for gossip to reach them.

Stalls: a :meth:`tick` more than ``failure_timeout`` after the previous one means this
node was the silent one (paused, starved): it judges nobody on that round, every
running deadline (suspect to dead, dead to removed) is pushed back by the stall, and
any probe that started before it, or whose verdict comes more than a period after its
deadline, is *inconclusive*.

Dissemination
-------------
Every change of a record queues it for gossip. Every ping and every answer carries the
sender's own record and up to ``max_piggyback`` records in all, the least-sent queued
ones first; each queued record is sent
``retransmit_mult * ceil(log2(members + 1))`` times, then dropped from the queue.
A message to a member held as suspect, dead or removed carries that member's record
first (so that it refutes if it runs). The queue holds one entry per member and at
most ``max_queue``; past that the most-sent entry is dropped (``gossip_dropped``).
The push-pull of whole tables (:meth:`table` / :meth:`receive`) repairs whatever the
queue lost.

Trust: a record about a member this node does not know, or at another address than
the known one, is only a *claim* (``on_claim``): the I/O layer confirms it with a
handshake and then calls :meth:`admit`. State claims about known members (suspect,
dead, left, removed) are taken from any peer by the precedence rules.

Membership version
------------------
:attr:`Swim.version` is a 53-bit hash (``xxh3_64 >> 11``) of the sorted ``(id,
address, incarnation, state)`` of the members in the ring (alive, suspect, dead). It
depends on the table alone, so nodes whose tables agree report the same number, and
any difference in the ring, an address, a state or an incarnation changes it (but
for a 2**-53 chance). A hash rather than a sum: a sum of per-record terms is equal
for different tables as soon as two differences offset (``x`` suspect here and ``y``
suspect there), and clients only ask "is my table the one this node has?". 53 bits
so that it is exact in JSON numbers and Prometheus samples (float64). Records that
left the ring do not count, so a node that never knew a long-gone member agrees.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import msgpack
from xxhash import xxh3_64_intdigest

from hypercache.cluster.config import MembershipSettings
from hypercache.errors import ConfigError

__all__ = [
    "INCARNATION_HORIZON_MS",
    "IN_RING",
    "MAX_RECORDS",
    "Member",
    "Probe",
    "Record",
    "State",
    "Swim",
    "SwimSettings",
    "parse_records",
]


class State(IntEnum):
    """A member's state; the value is its rank at equal incarnation (higher wins)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3
    REMOVED = 4

    @property
    def label(self) -> str:
        """The lower-case name (reports, metric labels)."""
        return self.name.lower()


#: States of the members that own partitions (in the ring).
IN_RING: Final = frozenset({State.ALIVE, State.SUSPECT, State.DEAD})
#: States a member is told of in every message to it (so that it refutes if it runs).
_TOLD: Final = frozenset({State.SUSPECT, State.DEAD, State.REMOVED})
_STATES: Final = tuple(State)

#: A record on the wire: ``[node_id, address, incarnation, state, boot]``.
Record = list[Any]

#: Incarnations (and boots) are below this (they are wall-clock ms plus refutations).
MAX_INCARNATION: Final = 1 << 62
#: How far ahead of the wall clock (ms) a record's incarnation may be: a day.
INCARNATION_HORIZON_MS: Final = 86_400_000
#: Records read from one message at most (the rest are ignored, counted).
MAX_RECORDS: Final = 16_384
_MAX_ID: Final = 255
_MAX_ADDRESS: Final = 1024


def _nothing(*_args: Any) -> None:
    """The default hook."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SwimSettings:
    """The timing and the bounds of the detector (seconds, counts).

    :param period: one probe per period (``heartbeat_interval``).
    :param probe_timeout: how long the direct ack is awaited before helpers are
        asked (the direct ping stays answerable until ``failure_timeout``).
    :param failure_timeout: a probe's whole deadline: no ack by then, the member is
        suspected. Also how late a period must come to count as a stall.
    :param suspect_timeout: suspect for that long without refuting: dead.
    :param indirect_probes: helpers asked per failed direct probe.
    :param dead_removal_timeout: dead for that long: removed; ``None``: never.
    :param retransmit_mult: ``λ`` of the ``λ·ceil(log2(N+1))`` sends of one update.
    :param max_piggyback: records on one message at most.
    :param max_queue: members with updates waiting to be gossiped, at most.
    :param notices: suspects pinged per period (besides the probe).
    """

    period: float
    probe_timeout: float
    failure_timeout: float
    suspect_timeout: float
    indirect_probes: int
    dead_removal_timeout: float | None = None
    retransmit_mult: int = 3
    max_piggyback: int = 16
    max_queue: int = 1024
    notices: int = 1

    @classmethod
    def from_membership(cls, settings: MembershipSettings) -> SwimSettings:
        """The detector of a node's configuration: the probe period is
        ``heartbeat_interval``, the direct ack is awaited half of it, the whole probe
        ``failure_timeout``."""
        return cls(
            period=settings.heartbeat_interval,
            probe_timeout=settings.heartbeat_interval / 2,
            failure_timeout=settings.failure_timeout,
            suspect_timeout=settings.suspect_timeout,
            indirect_probes=settings.indirect_probes,
            dead_removal_timeout=settings.dead_removal_timeout,
        )


@dataclass(slots=True, eq=False)
class Member:
    """One member's record in this node's table (see the module docstring)."""

    node_id: str
    address: str
    incarnation: int
    state: State
    boot: int
    #: local (monotonic) time of the last change of state
    since: float
    #: local time when the state runs out: suspect -> dead, dead -> removed
    deadline: float = math.inf

    def record(self) -> Record:
        """The wire record."""
        return [self.node_id, self.address, self.incarnation, int(self.state), self.boot]

    def beaten_by(self, incarnation: int, state: State) -> bool:
        """Whether a record at ``(incarnation, state)`` wins over this one."""
        return (incarnation, state) > (self.incarnation, self.state)


@dataclass(slots=True, eq=False)
class Probe:
    """One probe under way (see :meth:`Swim.next_probe`)."""

    target: str
    address: str
    #: the target's incarnation when the probe started (a refutation meanwhile
    #: makes a failed probe moot)
    incarnation: int
    started: float
    #: no ack by then: suspect
    deadline: float
    #: whether helpers may be asked (not for a dead member)
    indirect: bool


def parse_records(raw: Any) -> tuple[list[tuple[str, str, int, State, int]], int]:
    """The well-formed records of a gossiped list, and how many were not.

    A record is ``[node_id: str, address: str, incarnation: int, state: int,
    boot: int]`` with non-empty strings of bounded length and ints in range.
    """
    if not isinstance(raw, list | tuple):
        return [], 0 if raw is None else 1
    out: list[tuple[str, str, int, State, int]] = []
    bad = max(len(raw) - MAX_RECORDS, 0)
    for item in raw[:MAX_RECORDS]:
        if isinstance(item, list | tuple) and len(item) == 5:
            node_id, address, incarnation, state, boot = item
            if (
                type(node_id) is str
                and 0 < len(node_id) <= _MAX_ID
                and type(address) is str
                and 0 < len(address) <= _MAX_ADDRESS
                and type(incarnation) is int
                and 0 <= incarnation < MAX_INCARNATION
                and type(state) is int
                and 0 <= state < len(_STATES)
                and type(boot) is int
                and 0 <= boot < MAX_INCARNATION
            ):
                out.append((node_id, address, incarnation, _STATES[state], boot))
                continue
        bad += 1
    return out, bad


class Swim:
    """The member table and failure detector of node ``node_id`` (see the module
    docstring).

    :param incarnation: this node's first incarnation (its wall clock in ms).
    :param now: the current local time (monotonic seconds).
    :param wall_ms: the wall clock in ms (judges how far ahead incarnations may be).
    :param rng: the random generator (probe order, helpers); a new one by default.
    :param on_ring: the set of ring members (or an address) changed.
    :param on_liveness: ``(node_id, up)``: a member became alive, or stopped being.
    :param on_state: ``(node_id, state)``: another member's state changed.
    :param on_restart: ``(node_id)``: a member came back in a new life.
    :param on_claim: ``(node_id, address)``: a member not known at that address was
        claimed; confirm it, then :meth:`admit` it.
    """

    def __init__(
        self,
        node_id: str,
        address: str,
        *,
        incarnation: int,
        settings: SwimSettings,
        now: float,
        wall_ms: Callable[[], int],
        rng: random.Random | None = None,
        on_ring: Callable[[], None] = _nothing,
        on_liveness: Callable[[str, bool], None] = _nothing,
        on_state: Callable[[str, State], None] = _nothing,
        on_restart: Callable[[str], None] = _nothing,
        on_claim: Callable[[str, str], None] = _nothing,
    ) -> None:
        self.node_id = node_id
        self.settings = settings
        self._wall = wall_ms
        self._rng = rng if rng is not None else random.Random()
        self.on_ring = on_ring
        self.on_liveness = on_liveness
        self.on_state = on_state
        self.on_restart = on_restart
        self.on_claim = on_claim
        #: this node's own record
        self.me = Member(node_id, address, incarnation, State.ALIVE, incarnation, now)
        #: every record, this node's included
        self.members: dict[str, Member] = {node_id: self.me}
        # member id -> times its record was sent; ordered by when it was queued
        self._queue: dict[str, int] = {}
        self._rotation: list[str] = []
        self._rot_next = 0
        self._notice_next = 0
        self._last_tick: float | None = None
        self._stalled_at = -math.inf
        self._version: int | None = None
        self._ring: list[tuple[str, str]] | None = None
        self._in_ring = 1
        # Hook calls waiting for the end of the current operation (so that hooks
        # see a consistent table), and whether the ring changed meanwhile.
        self._events: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._ring_dirty = False
        self._flushing = False
        #: transitions into each state seen in this table (joins count as alive)
        self.transitions: dict[State, int] = dict.fromkeys(State, 0)
        #: probe verdicts: ack (direct), indirect (through a helper), failed (no
        #: ack: suspected unless already not alive), inconclusive (this node stalled)
        self.probes: dict[str, int] = dict.fromkeys(
            ("ack", "indirect", "failed", "inconclusive"), 0
        )
        #: periods that came more than failure_timeout late (this node stalled)
        self.stalls = 0
        #: records about this node that it refuted
        self.refutations = 0
        #: restarts of other members seen
        self.restarts = 0
        #: queued updates dropped at max_queue
        self.gossip_dropped = 0
        #: records refused: malformed, or an incarnation past the horizon
        self.records_refused = 0
        #: changes of a member's up-ness (alive or not)
        self.liveness_changes = 0

    # ----------------------------------------------------------------- queries

    @property
    def incarnation(self) -> int:
        return self.me.incarnation

    def state_of(self, node_id: str) -> State | None:
        member = self.members.get(node_id)
        return None if member is None else member.state

    def is_up(self, node_id: str) -> bool:
        member = self.members.get(node_id)
        return member is not None and member.state is State.ALIVE

    def in_ring(self, node_id: str) -> bool:
        member = self.members.get(node_id)
        return member is not None and member.state in IN_RING

    def up_count(self) -> int:
        return sum(1 for m in self.members.values() if m.state is State.ALIVE)

    def counts(self) -> dict[State, int]:
        """Members per state, this node included."""
        out = dict.fromkeys(State, 0)
        for member in self.members.values():
            out[member.state] += 1
        return out

    def ring_members(self) -> list[tuple[str, str]]:
        """``[(node_id, address), ...]`` of the members in the ring, sorted by id."""
        ring = self._ring
        if ring is None:
            ring = self._ring = sorted(
                (m.node_id, m.address) for m in self.members.values() if m.state in IN_RING
            )
        return list(ring)

    @property
    def version(self) -> int:
        """The membership version (see the module docstring)."""
        version = self._version
        if version is None:
            rows = sorted(
                [m.node_id, m.address, m.incarnation, int(m.state)]
                for m in self.members.values()
                if m.state in IN_RING
            )
            version = self._version = xxh3_64_intdigest(msgpack.packb(rows)) >> 11
        return version

    def table(self) -> list[Record]:
        """Every record, sorted by id: what a push-pull sends."""
        return [self.members[nid].record() for nid in sorted(self.members)]

    @property
    def retransmit_limit(self) -> int:
        """Times one update is sent: ``λ·ceil(log2(members in the ring + 1))``."""
        return self.settings.retransmit_mult * max(1, math.ceil(math.log2(self._in_ring + 1)))

    @property
    def queued(self) -> int:
        """Members whose record waits to be gossiped."""
        return len(self._queue)

    # ----------------------------------------------------------------- probing

    def tick(self, now: float) -> bool:
        """Start a period: detect a stall, run out suspicions and dead members'
        removal timers. Return whether this period is a stall (nobody judged)."""
        last, self._last_tick = self._last_tick, now
        settings = self.settings
        if last is not None and now - last > settings.failure_timeout:
            self.stalls += 1
            self._stalled_at = now
            late = now - last - settings.period
            for member in self.members.values():
                member.deadline += late
            return True
        for member in list(self.members.values()):
            if member.deadline <= now and member is not self.me:
                if member.state is State.SUSPECT:
                    self._apply(member, member.incarnation, State.DEAD, member.boot, now)
                elif member.state is State.DEAD:
                    self._apply(member, member.incarnation, State.REMOVED, member.boot, now)
        self._flush()
        return False

    def next_probe(self, now: float) -> Probe | None:
        """The member to probe this period (``None``: nobody, or this node left)."""
        if self.me.state is not State.ALIVE:
            return None
        for _ in range(2):
            rotation = self._rotation
            while self._rot_next < len(rotation):
                node_id = rotation[self._rot_next]
                self._rot_next += 1
                member = self.members.get(node_id)
                if member is not None and member.state in IN_RING:
                    return Probe(
                        target=node_id,
                        address=member.address,
                        incarnation=member.incarnation,
                        started=now,
                        deadline=now + self.settings.failure_timeout,
                        indirect=member.state is not State.DEAD,
                    )
            self._rotation = [
                nid for nid, m in self.members.items() if m is not self.me and m.state in IN_RING
            ]
            self._rng.shuffle(self._rotation)
            self._rot_next = 0
            if not self._rotation:
                return None
        return None

    def helpers(self, probe: Probe) -> list[str]:
        """Up to ``indirect_probes`` alive members, chosen at random, to ask to probe
        ``probe.target`` (none for a dead target)."""
        if not probe.indirect:
            return []
        pool = [
            nid
            for nid, m in self.members.items()
            if m.state is State.ALIVE and m is not self.me and nid != probe.target
        ]
        k = min(self.settings.indirect_probes, len(pool))
        return self._rng.sample(pool, k) if k else []

    def end_probe(self, probe: Probe, result: str, now: float) -> str:
        """The probe's outcome: ``"ack"``, ``"indirect"`` or ``""`` (no ack from any
        path). Return the verdict counted (see :attr:`probes`)."""
        if result:
            verdict = "indirect" if result == "indirect" else "ack"
        elif probe.started <= self._stalled_at or now > probe.deadline + self.settings.period:
            verdict = "inconclusive"
        else:
            verdict = "failed"
            member = self.members.get(probe.target)
            if (
                member is not None
                and member.state is State.ALIVE
                and member.incarnation == probe.incarnation
            ):
                self._apply(member, member.incarnation, State.SUSPECT, member.boot, now)
                self._flush()
        self.probes[verdict] += 1
        return verdict

    def notices(self) -> list[str]:
        """Suspects to ping this period with their own record, so that they refute
        (``settings.notices`` of them, taking turns)."""
        suspects = [
            nid for nid, m in self.members.items() if m.state is State.SUSPECT and m is not self.me
        ]
        n = min(self.settings.notices, len(suspects))
        if not n:
            return []
        start = self._notice_next % len(suspects)
        self._notice_next = start + n
        return [suspects[(start + i) % len(suspects)] for i in range(n)]

    # ----------------------------------------------------------- dissemination

    def gossip(self, to: str | None = None) -> list[Record]:
        """The records to piggy-back on a message to ``to``: this node's own record,
        then ``to``'s own record when it is held as suspect, dead or removed (so that
        it refutes if it runs), then the least-sent queued updates."""
        me = self.me
        out: list[Record] = [me.record()]
        room = self.settings.max_piggyback - 1
        target = self.members.get(to) if to is not None else None
        buddy = target is not None and target.state in _TOLD
        if buddy:
            assert target is not None
            out.append(target.record())
            room -= 1
        queue = self._queue
        if not queue or room <= 0:
            return out
        if len(queue) <= room:
            picks = list(queue.items())
        else:
            picks = heapq.nsmallest(room, queue.items(), key=lambda item: item[1])
        limit = self.retransmit_limit
        for node_id, sent in picks:
            member = self.members.get(node_id)
            if member is None:  # (cannot happen: records are never deleted)
                del queue[node_id]
                continue
            if member is not me and not (buddy and node_id == to):
                out.append(member.record())
            if sent + 1 >= limit:
                del queue[node_id]
            else:
                queue[node_id] = sent + 1
        return out

    def receive(self, raw: Any, now: float) -> None:
        """Merge gossiped records (a piggy-backed list or a whole table); malformed
        ones are skipped and counted."""
        records, bad = parse_records(raw)
        self.records_refused += bad
        if records:
            horizon = self._wall() + INCARNATION_HORIZON_MS
            for node_id, address, incarnation, state, boot in records:
                if incarnation > horizon or boot > horizon:
                    self.records_refused += 1
                    continue
                self._merge(node_id, address, incarnation, state, boot, now)
        self._flush()

    def _merge(
        self, node_id: str, address: str, incarnation: int, state: State, boot: int, now: float
    ) -> None:
        member = self.members.get(node_id)
        if member is None:
            if state in IN_RING:
                self._events.append((self.on_claim, (node_id, address)))
            return
        if not member.beaten_by(incarnation, state):
            return
        if member is self.me:
            if member.state is not State.LEFT:  # a node that left does not come back
                self._refute(incarnation, now)
            return
        if address != member.address and state in IN_RING:
            # Only the member's own word moves it: check the new address first.
            self._events.append((self.on_claim, (node_id, address)))
            return
        self._apply(member, incarnation, state, boot, now)

    def _refute(self, incarnation: int, now: float) -> None:
        me = self.me
        me.incarnation = incarnation + 1
        self.refutations += 1
        self._version = None
        self._enqueue(me.node_id)

    # ------------------------------------------------------------ local changes

    def admit(self, node_id: str, address: str, incarnation: int, boot: int, now: float) -> bool:
        """Take what ``node_id`` itself said in a handshake at ``address``: it is a
        member, there, alive at ``incarnation`` (a record of its current life that
        is not newer changes nothing but the address). Return whether anything
        changed."""
        if node_id == self.node_id:
            return False
        if not 0 <= incarnation < MAX_INCARNATION or incarnation > (
            self._wall() + INCARNATION_HORIZON_MS
        ):
            incarnation = 0
        if not 0 <= boot < MAX_INCARNATION:
            boot = 0
        member = self.members.get(node_id)
        if member is None:
            member = Member(node_id, address, incarnation, State.ALIVE, boot, now)
            self.members[node_id] = member
            self.transitions[State.ALIVE] += 1
            self._in_ring += 1
            self._ring_changed()
            self._enqueue(node_id)
            rotation = self._rotation
            rotation.insert(self._rng.randint(self._rot_next, len(rotation)), node_id)
            self._flush()
            return True
        changed = False
        if member.address != address:
            member.address = address
            changed = True
            self._version = None
            if member.state in IN_RING:
                self._ring_changed()
            self._enqueue(node_id)
        if member.beaten_by(incarnation, State.ALIVE):
            self._apply(member, incarnation, State.ALIVE, boot, now)
            changed = True
        self._flush()
        return changed

    def leave(self, now: float) -> None:
        """This node leaves: ``left`` at its incarnation plus one, gossiped."""
        me = self.me
        if me.state is State.LEFT:
            return
        self._apply(me, me.incarnation + 1, State.LEFT, me.boot, now)
        self._flush()

    def remove(self, node_id: str, now: float) -> bool:
        """Take a dead (or suspect) member out of the ring: ``removed`` at its
        incarnation, gossiped. Return ``False`` when it was removed already.

        :raises ConfigError: (field ``node``) not a member, or not dead nor suspect.
        """
        member = self.members.get(node_id)
        if member is None:
            raise ConfigError("node", f"{node_id!r} is not a member")
        if member.state is State.REMOVED:
            return False
        if member.state not in (State.SUSPECT, State.DEAD):
            raise ConfigError(
                "node",
                f"{node_id} is {member.state.label}: only a dead or suspect member can be removed",
            )
        self._apply(member, member.incarnation, State.REMOVED, member.boot, now)
        self._flush()
        return True

    # ---------------------------------------------------------------- internals

    def _apply(self, member: Member, incarnation: int, state: State, boot: int, now: float) -> None:
        old_state, old_boot = member.state, member.boot
        member.incarnation = incarnation
        if boot:  # (0: not said, e.g. a handshake of an older build)
            member.boot = boot
        if state is not old_state:
            member.state = state
            member.since = now
            self.transitions[state] += 1
        settings = self.settings
        if state is State.SUSPECT:
            member.deadline = now + settings.suspect_timeout
        elif state is State.DEAD and settings.dead_removal_timeout is not None:
            member.deadline = now + settings.dead_removal_timeout
        else:
            member.deadline = math.inf
        self._version = None
        self._enqueue(member.node_id)
        if (old_state in IN_RING) != (state in IN_RING):
            self._in_ring += 1 if state in IN_RING else -1
            self._ring_changed()
        if member is self.me:
            return
        if state is not old_state:
            self._events.append((self.on_state, (member.node_id, state)))
        if (old_state is State.ALIVE) != (state is State.ALIVE):
            self.liveness_changes += 1
            self._events.append((self.on_liveness, (member.node_id, state is State.ALIVE)))
        if old_boot and boot and boot != old_boot and state in IN_RING:
            self.restarts += 1
            self._events.append((self.on_restart, (member.node_id,)))

    def _ring_changed(self) -> None:
        self._ring = None
        self._version = None
        self._ring_dirty = True

    def _enqueue(self, node_id: str) -> None:
        queue = self._queue
        queue.pop(node_id, None)
        if len(queue) >= self.settings.max_queue:
            most = max(queue, key=queue.__getitem__)
            del queue[most]
            self.gossip_dropped += 1
        queue[node_id] = 0

    def _flush(self) -> None:
        """Tell the hooks what changed: the ring first, then states, liveness,
        restarts and claims in order."""
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._ring_dirty or self._events:
                if self._ring_dirty:
                    self._ring_dirty = False
                    self.on_ring()
                    continue
                hook, args = self._events.pop(0)
                hook(*args)
        finally:
            self._flushing = False

    def seed_table(self, records: Iterable[Record], now: float) -> None:
        """Take ``records`` as known members at once, unchecked (simulations and
        tests only: a node learns members by :meth:`admit`)."""
        for node_id, address, incarnation, state, boot in records:
            if node_id != self.node_id and node_id not in self.members:
                self.admit(node_id, address, incarnation, boot, now)
                member = self.members[node_id]
                if state is not State.ALIVE:
                    self._apply(member, incarnation, State(state), boot, now)
        self._queue.clear()
        self._flush()
