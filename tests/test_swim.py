"""The SWIM state machine (hypercache.cluster.swim) with a fake clock and hand-carried
messages: probes, indirect probes, suspicion, refutation, dead, left and removed,
precedence, stalls, restarts, the version, dissemination and its bounds."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from hypercache.cluster.swim import (
    IN_RING,
    INCARNATION_HORIZON_MS,
    Record,
    State,
    Swim,
    SwimSettings,
    parse_records,
)
from hypercache.errors import ConfigError

WALL = 1_700_000_000_000
SETTINGS = SwimSettings(
    period=1.0, probe_timeout=0.5, failure_timeout=2.0, suspect_timeout=5.0, indirect_probes=3
)


@dataclass
class Hooks:
    """What a Swim told its hooks."""

    rings: list[list[tuple[str, str]]] = field(default_factory=list)
    liveness: list[tuple[str, bool]] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)
    claims: list[tuple[str, str]] = field(default_factory=list)


def make(
    node_id: str = "a",
    incarnation: int = WALL,
    *,
    members: tuple[str, ...] = (),
    settings: SwimSettings = SETTINGS,
    seed: int = 1,
) -> tuple[Swim, Hooks]:
    """A Swim knowing ``members`` (alive, incarnation ``WALL``, boot ``WALL``) at t=0."""
    hooks = Hooks()
    swim = Swim(
        node_id,
        f"{node_id}:1",
        incarnation=incarnation,
        settings=settings,
        now=0.0,
        wall_ms=lambda: WALL,
        rng=random.Random(seed),
    )
    for member in members:
        swim.admit(member, f"{member}:1", WALL, WALL, 0.0)
    swim.on_ring = lambda: hooks.rings.append(swim.ring_members())
    swim.on_liveness = lambda nid, up: hooks.liveness.append((nid, up))
    swim.on_restart = hooks.restarts.append
    swim.on_claim = lambda nid, address: hooks.claims.append((nid, address))
    return swim, hooks


def rec(node_id: str, incarnation: int, state: State, boot: int = WALL) -> Record:
    return [node_id, f"{node_id}:1", incarnation, int(state), boot]


def carry(src: Swim, dst: Swim, now: float) -> None:
    """One message from ``src`` to ``dst``: what it piggy-backs, merged."""
    dst.receive(src.gossip(dst.node_id), now)


def ticks(swim: Swim, start: float, end: float) -> None:
    """Periods from ``start`` to ``end`` (inclusive), one a second, as a node runs them."""
    t = start
    while t <= end + 1e-9:
        assert swim.tick(t) is False
        t += 1.0


def probe_of(swim: Swim, target: str, now: float) -> Any:
    """The next probe of ``swim`` that targets ``target`` (others are acked)."""
    for _ in range(len(swim.members) * 2):
        probe = swim.next_probe(now)
        assert probe is not None
        if probe.target == target:
            return probe
        swim.end_probe(probe, "ack", now)
    raise AssertionError(f"{target} never probed")


# ------------------------------------------------------------------- probing


def test_a_probe_answered_keeps_the_member_alive() -> None:
    a, hooks = make(members=("b", "c"))
    probe = probe_of(a, "b", 1.0)
    assert probe.indirect and probe.deadline == 1.0 + SETTINGS.failure_timeout
    assert a.end_probe(probe, "ack", 1.1) == "ack"
    assert a.state_of("b") is State.ALIVE and a.probes["ack"] >= 1
    assert hooks.liveness == []


def test_a_timed_out_probe_answered_through_a_helper_keeps_it_alive() -> None:
    a, _ = make(members=("b", "c", "d", "e", "f"))
    probe = probe_of(a, "b", 1.0)
    helpers = a.helpers(probe)
    assert len(helpers) == SETTINGS.indirect_probes
    assert set(helpers) <= {"c", "d", "e", "f"}  # never itself nor the target
    assert a.end_probe(probe, "indirect", 2.0) == "indirect"
    assert a.state_of("b") is State.ALIVE and a.probes["indirect"] == 1


def test_no_ack_on_any_path_makes_it_suspect_then_dead_and_it_stays_in_the_ring() -> None:
    a, hooks = make(members=("b", "c"))
    probe = probe_of(a, "b", 1.0)
    assert a.end_probe(probe, "", 3.0) == "failed"
    assert a.state_of("b") is State.SUSPECT
    assert not a.is_up("b") and a.up_count() == 2
    assert hooks.liveness == [("b", False)]
    assert ["b", "b:1", WALL, int(State.SUSPECT), WALL] in a.gossip("c")
    # Not dead before suspect_timeout...
    ticks(a, 3.0, 7.0)
    a.tick(7.9)
    assert a.state_of("b") is State.SUSPECT
    # ... dead after, still an owner.
    a.tick(8.0)
    assert a.state_of("b") is State.DEAD
    assert ("b", "b:1") in a.ring_members()
    assert hooks.rings == []  # the ring never changed
    assert a.transitions[State.SUSPECT] == 1 and a.transitions[State.DEAD] == 1


def test_a_failed_probe_of_a_member_that_refuted_meanwhile_is_moot() -> None:
    a, _ = make(members=("b",))
    probe = probe_of(a, "b", 1.0)
    a.receive([rec("b", WALL + 1, State.ALIVE)], 1.5)
    assert a.end_probe(probe, "", 3.0) == "failed"
    assert a.state_of("b") is State.ALIVE


def test_a_dead_member_is_probed_directly_only_and_not_judged() -> None:
    a, _ = make(members=("b", "c"))
    a.receive([rec("b", WALL, State.DEAD)], 1.0)
    probe = probe_of(a, "b", 2.0)
    assert not probe.indirect and a.helpers(probe) == []
    assert a.end_probe(probe, "", 4.0) == "failed"
    assert a.state_of("b") is State.DEAD


def test_probes_go_round_robin_over_a_shuffled_list() -> None:
    members = tuple(f"m{i}" for i in range(8))
    a, _ = make(members=members)
    rounds = []
    for r in range(3):
        targets = []
        for _ in members:
            probe = a.next_probe(float(r))
            assert probe is not None
            targets.append(probe.target)
            a.end_probe(probe, "ack", float(r))
        rounds.append(targets)
    assert all(sorted(t) == sorted(members) for t in rounds)  # each once per round
    assert len({tuple(t) for t in rounds}) > 1  # in a new order each round
    # A newcomer is probed within the round it joins.
    a.admit("new", "new:1", WALL, WALL, 5.0)
    seen = {a.next_probe(5.0).target for _ in range(len(members) + 1)}  # type: ignore[union-attr]
    assert "new" in seen


def test_helpers_are_alive_members_only() -> None:
    a, _ = make(members=("b", "c", "d", "e"))
    a.receive([rec("c", WALL, State.SUSPECT), rec("d", WALL, State.DEAD)], 1.0)
    probe = probe_of(a, "b", 1.0)
    assert a.helpers(probe) == ["e"]
    no_helpers = replace(SETTINGS, indirect_probes=0)
    z, _ = make(members=("b", "c"), settings=no_helpers)
    assert z.helpers(probe_of(z, "b", 1.0)) == []


# ------------------------------------------------------------------ refutation


def test_a_suspected_node_refutes_and_is_alive_everywhere() -> None:
    a, a_hooks = make("a", members=("b", "c"))
    b, _ = make("b", members=("a", "c"))
    c, _ = make("c", members=("a", "b"))
    a.end_probe(probe_of(a, "b", 1.0), "", 3.0)
    carry(a, c, 3.0)  # c hears of the suspicion
    assert c.state_of("b") is State.SUSPECT
    # a's next message to b carries b's own record first (so that b can refute).
    to_b = a.gossip("b")
    assert to_b[:2] == [a.me.record(), rec("b", WALL, State.SUSPECT)]
    b.receive(to_b, 3.1)
    assert b.incarnation == WALL + 1 and b.refutations == 1
    assert b.state_of("b") is State.ALIVE
    # b's answer and its next messages carry its refutation.
    carry(b, a, 3.2)
    carry(b, c, 3.3)
    for node in (a, c):
        assert node.state_of("b") is State.ALIVE
        assert node.members["b"].incarnation == WALL + 1
    assert a_hooks.liveness == [("b", False), ("b", True)]
    # The suspicion ran out nowhere.
    a.tick(10.0)
    c.tick(10.0)
    assert a.state_of("b") is State.ALIVE and c.state_of("b") is State.ALIVE
    assert a.version == b.version == c.version


def test_a_node_refutes_its_death_and_its_removal_but_not_its_leave() -> None:
    b, _ = make("b", members=("a",))
    b.receive([rec("b", WALL, State.DEAD)], 1.0)
    assert b.incarnation == WALL + 1 and b.me.state is State.ALIVE
    # A removal of a node that runs is refuted: it comes back.
    b.receive([rec("b", WALL + 1, State.REMOVED)], 2.0)
    assert b.incarnation == WALL + 2 and b.me.state is State.ALIVE
    # A stale record changes nothing.
    b.receive([rec("b", WALL, State.DEAD)], 3.0)
    assert b.incarnation == WALL + 2 and b.refutations == 2
    b.leave(4.0)
    assert b.state_of("b") is State.LEFT and b.incarnation == WALL + 3
    b.receive([rec("b", WALL + 3, State.REMOVED)], 5.0)
    assert b.state_of("b") is State.LEFT and b.incarnation == WALL + 3
    assert b.next_probe(6.0) is None  # a node that left probes no more


# ------------------------------------------------------------- left, removed


def test_left_takes_a_member_out_of_the_ring_for_good() -> None:
    a, hooks = make(members=("b", "c"))
    c, _ = make("c", members=("a", "b"))
    c.leave(1.0)
    assert ("c", "c:1") not in c.ring_members()
    carry(c, a, 1.1)
    assert a.state_of("c") is State.LEFT
    assert a.ring_members() == [("a", "a:1"), ("b", "b:1")]
    assert hooks.rings == [a.ring_members()]
    assert hooks.liveness == [("c", False)]
    # A lagging peer's older news brings nothing back.
    for stale in (State.ALIVE, State.SUSPECT, State.DEAD):
        a.receive([rec("c", WALL + 1, stale), rec("c", WALL, stale)], 2.0)
    assert a.state_of("c") is State.LEFT and len(hooks.rings) == 1
    # A node that left is not probed any more.
    assert {a.next_probe(3.0).target for _ in range(4)} == {"b"}  # type: ignore[union-attr]
    # It comes back only in a new life, with a higher incarnation.
    a.receive([rec("c", WALL + 5000, State.ALIVE, boot=WALL + 5000)], 4.0)
    assert a.state_of("c") is State.ALIVE and hooks.restarts == ["c"]


def test_removal_is_for_dead_or_suspect_members_and_sticks() -> None:
    a, hooks = make(members=("b", "c"))
    with pytest.raises(ConfigError, match="b is alive: only a dead or suspect"):
        a.remove("b", 1.0)
    with pytest.raises(ConfigError, match="not a member"):
        a.remove("zz", 1.0)
    with pytest.raises(ConfigError):
        a.remove("a", 1.0)  # itself: alive
    a.receive([rec("b", WALL, State.DEAD)], 1.0)
    assert a.remove("b", 2.0) is True
    assert a.remove("b", 2.5) is False  # again: nothing to do
    assert a.state_of("b") is State.REMOVED
    assert a.ring_members() == [("a", "a:1"), ("c", "c:1")]
    assert hooks.rings == [a.ring_members()]
    c, _ = make("c", members=("a", "b"))
    carry(a, c, 3.0)
    assert c.state_of("b") is State.REMOVED and c.version == a.version
    a.receive([rec("b", WALL, State.DEAD), rec("b", WALL, State.ALIVE)], 4.0)
    assert a.state_of("b") is State.REMOVED
    # If b runs after all (a partition, say), whatever a answers it tells it so, and
    # b refutes: a removal never shuts out a node that runs.
    b, _ = make("b", members=("a", "c"))
    carry(a, b, 4.5)
    assert b.incarnation == WALL + 1 and b.state_of("b") is State.ALIVE
    carry(b, a, 4.6)
    assert a.state_of("b") is State.ALIVE and ("b", "b:1") in a.ring_members()
    a.receive([rec("b", WALL + 1, State.DEAD)], 4.7)
    assert a.remove("b", 4.8) is True
    # A suspect may be removed too.
    a.receive([rec("c", WALL, State.SUSPECT)], 5.0)
    assert a.remove("c", 5.0) is True


def test_a_dead_member_is_removed_automatically_when_configured() -> None:
    settings = replace(SETTINGS, dead_removal_timeout=30.0)
    a, hooks = make(members=("b", "c"), settings=settings)
    a.end_probe(probe_of(a, "b", 1.0), "", 3.0)
    ticks(a, 3.0, 8.0)
    assert a.state_of("b") is State.DEAD
    ticks(a, 9.0, 37.0)
    a.tick(37.9)
    assert a.state_of("b") is State.DEAD
    a.tick(38.0)
    assert a.state_of("b") is State.REMOVED
    assert hooks.rings == [[("a", "a:1"), ("c", "c:1")]]
    # Off by default: dead stays dead.
    z, _ = make(members=("b",))
    z.receive([rec("b", WALL, State.DEAD)], 1.0)
    z.tick(1e9)
    assert z.state_of("b") is State.DEAD


# ------------------------------------------------------------------ precedence

_ORDER = [
    (WALL, State.ALIVE),
    (WALL, State.SUSPECT),
    (WALL, State.DEAD),
    (WALL, State.LEFT),
    (WALL, State.REMOVED),
    (WALL + 1, State.ALIVE),
    (WALL + 1, State.SUSPECT),
    (WALL + 2, State.DEAD),
]


@pytest.mark.parametrize(("lower", "higher"), list(itertools.combinations(_ORDER, 2)))
def test_precedence_higher_incarnation_then_removed_left_dead_suspect_alive(
    lower: tuple[int, State], higher: tuple[int, State]
) -> None:
    for first, second in ((lower, higher), (higher, lower)):
        a, _ = make(members=("b",))
        a.receive([rec("b", *first)], 1.0)
        a.receive([rec("b", *second)], 2.0)
        member = a.members["b"]
        assert (member.incarnation, member.state) == higher


# ----------------------------------------------------------------------- stalls


def test_a_stalled_period_judges_nobody_and_pushes_deadlines_back() -> None:
    a, _ = make(members=("b", "c"))
    assert a.tick(0.0) is False
    a.receive([rec("c", WALL, State.SUSPECT)], 0.5)  # c has until 5.5
    probe = probe_of(a, "b", 1.0)
    assert a.tick(1.0) is False
    # The node sleeps 9 s (SIGSTOP): its next period comes 9 s late.
    assert a.tick(10.0) is True and a.stalls == 1
    assert a.state_of("c") is State.SUSPECT  # not dead on the round it wakes in
    assert a.members["c"].deadline == pytest.approx(5.5 + 8.0)
    # The probe that was under way when it stalled proves nothing.
    assert a.end_probe(probe, "", 10.0) == "inconclusive"
    assert a.state_of("b") is State.ALIVE
    assert a.tick(11.0) is False
    # A verdict more than a period past its deadline proves nothing either.
    late = probe_of(a, "b", 11.0)
    assert a.end_probe(late, "", 11.0 + SETTINGS.failure_timeout + 1.5) == "inconclusive"
    assert a.state_of("b") is State.ALIVE
    a.tick(12.5)
    a.tick(13.4)
    assert a.state_of("c") is State.SUSPECT
    a.tick(13.5)
    assert a.state_of("c") is State.DEAD


# --------------------------------------------------------------------- restarts


def test_a_new_boot_is_a_restart_a_refutation_is_not() -> None:
    a, hooks = make(members=("b",))
    a.receive([rec("b", WALL + 1, State.ALIVE)], 1.0)  # refuted: same life
    assert hooks.restarts == []
    new_life = WALL + 60_000
    a.receive([rec("b", new_life, State.ALIVE, boot=new_life)], 2.0)
    assert hooks.restarts == ["b"] and a.restarts == 1
    # Through a handshake (the member's own word) too.
    later_life = new_life + 60_000
    assert a.admit("b", "b:1", later_life, later_life, 3.0) is True
    assert hooks.restarts == ["b", "b"]
    # A handshake of the same life changes nothing.
    assert a.admit("b", "b:1", later_life, later_life, 4.0) is False
    # A dead member back in a new life is alive again.
    a.receive([rec("b", later_life, State.DEAD, boot=later_life)], 5.0)
    last_life = later_life + 60_000
    a.receive([rec("b", last_life, State.ALIVE, boot=last_life)], 6.0)
    assert a.state_of("b") is State.ALIVE and hooks.restarts == ["b", "b", "b"]
    assert hooks.liveness == [("b", False), ("b", True)]


# ------------------------------------------------------------------------ version


def test_equal_tables_have_equal_versions_whatever_the_order_heard() -> None:
    updates = [
        rec("b", WALL, State.ALIVE),
        rec("c", WALL, State.ALIVE),
        rec("c", WALL, State.SUSPECT),
        rec("b", WALL + 1, State.ALIVE),
        rec("d", WALL, State.DEAD),
    ]
    versions = set()
    for perm in itertools.permutations(updates):
        x, _ = make("x", members=("a", "b", "c", "d"))
        for update in perm:
            x.receive([update], 1.0)
        versions.add(x.version)
    assert len(versions) == 1
    # Any difference of state, incarnation or address shows.
    y, _ = make("x", members=("a", "b", "c", "d"))
    y.receive(updates, 1.0)
    base = y.version
    assert base in versions
    y.receive([rec("b", WALL + 1, State.SUSPECT)], 2.0)
    assert y.version != base
    # Sum-like offsets do not collide: c suspect here, b suspect there.
    p, _ = make("x", members=("b", "c"))
    q, _ = make("x", members=("b", "c"))
    p.receive([rec("c", WALL, State.SUSPECT)], 1.0)
    q.receive([rec("b", WALL, State.SUSPECT)], 1.0)
    assert p.version != q.version
    # Fits a float64 exactly (JSON, Prometheus).
    assert 0 <= base < 2**53


def test_the_version_follows_every_change_once_computed() -> None:
    a, _ = make("x", members=("b",))
    before = a.version  # computed (and cached) ...
    a.admit("c", "c:1", WALL, WALL, 1.0)  # ... then a member joins
    fresh, _ = make("x", members=("b", "c"))
    assert a.version != before and a.version == fresh.version
    a.admit("c", "c:2", WALL, WALL, 2.0)  # a move
    moved = a.version
    assert moved != fresh.version
    a.receive([["c", "c:2", WALL + 1, int(State.ALIVE), WALL]], 3.0)  # a refutation
    assert a.version != moved
    a.leave(4.0)  # this node leaves
    assert a.version != moved


def test_the_version_ignores_members_out_of_the_ring() -> None:
    a, _ = make("x", members=("b", "c"))
    never_knew, _ = make("x", members=("b",))
    a.receive([rec("c", WALL, State.DEAD)], 1.0)
    a.remove("c", 2.0)
    assert a.version == never_knew.version
    assert len(a.table()) == 3  # the record is kept


# ------------------------------------------------------------------------- trust


def test_unknown_members_and_new_addresses_are_claims_only() -> None:
    a, hooks = make(members=("b",))
    a.receive([rec("new", WALL, State.ALIVE), rec("ghost", WALL, State.DEAD)], 1.0)
    assert hooks.claims == [("new", "new:1"), ("ghost", "ghost:1")]
    assert a.state_of("new") is None and a.state_of("ghost") is None
    # Terminal records of strangers are not even claims.
    a.receive([rec("gone", WALL, State.REMOVED)], 1.0)
    assert a.state_of("gone") is None and len(hooks.claims) == 2
    # A known member at another address: a claim, nothing applied...
    moved = ["b", "elsewhere:9", WALL + 9, int(State.ALIVE), WALL + 9]
    a.receive([moved], 2.0)
    assert hooks.claims[-1] == ("b", "elsewhere:9")
    assert a.members["b"].address == "b:1" and a.members["b"].incarnation == WALL
    # ... until its own word (a handshake there) moves it.
    assert a.admit("b", "elsewhere:9", WALL + 9, WALL + 9, 3.0) is True
    assert a.members["b"].address == "elsewhere:9"
    assert hooks.rings[-1] == [("a", "a:1"), ("b", "elsewhere:9")]
    # State claims about a known member are taken (precedence).
    a.receive([["b", "elsewhere:9", WALL + 9, int(State.DEAD), WALL + 9]], 4.0)
    assert a.state_of("b") is State.DEAD


def test_incarnations_past_the_horizon_and_malformed_records_are_refused() -> None:
    a, _ = make(members=("b",))
    a.receive([rec("b", WALL + INCARNATION_HORIZON_MS + 1, State.DEAD)], 1.0)
    assert a.state_of("b") is State.ALIVE and a.records_refused == 1
    a.receive([rec("b", WALL + INCARNATION_HORIZON_MS, State.DEAD)], 1.0)
    assert a.state_of("b") is State.DEAD
    bad: list[Any] = [
        ["b", "b:1", -1, 0, 0],
        ["b", "b:1", 1, 9, 0],
        ["", "b:1", 1, 0, 0],
        ["b", 7, 1, 0, 0],
        ["b", "b:1", 1.5, 0, 0],
        ["b", "b:1", 1, 0],
        "junk",
    ]
    records, refused = parse_records([*bad, rec("c", 5, State.LEFT)])
    assert refused == len(bad) and records == [("c", "c:1", 5, State.LEFT, WALL)]
    assert parse_records(None) == ([], 0) and parse_records("x") == ([], 1)
    a.receive({"not": "a list"}, 2.0)
    assert a.records_refused == 2


# ---------------------------------------------------------------- dissemination


def test_each_update_is_sent_a_bounded_number_of_times() -> None:
    members = tuple(f"m{i}" for i in range(6))
    a, _ = make(members=members)
    limit = a.retransmit_limit
    assert limit == SETTINGS.retransmit_mult * 3  # ceil(log2(7 + 1))
    a.receive([rec("m0", WALL, State.SUSPECT)], 1.0)
    sends = 0
    for _ in range(limit * 3):
        if rec("m0", WALL, State.SUSPECT) in a.gossip("m1"):
            sends += 1
    assert sends == limit and a.queued == 0
    # Its own record always goes out first; a suspect's own record goes to it.
    assert a.gossip("m2")[0] == a.me.record()
    assert a.gossip("m0")[:2] == [a.me.record(), rec("m0", WALL, State.SUSPECT)]


def test_piggy_backed_records_and_the_queue_are_capped() -> None:
    settings = replace(SETTINGS, max_piggyback=4, max_queue=5)
    members = tuple(f"m{i}" for i in range(10))
    a, _ = make(members=members, settings=settings)
    dropped = a.gossip_dropped  # (the joins queued ten records already)
    a.receive([rec(m, WALL, State.SUSPECT) for m in members], 1.0)
    assert a.queued == 5 and a.gossip_dropped == dropped + 10
    # The newest five are kept (among equals, the oldest entry goes first).
    sent = a.gossip(None)
    assert len(sent) == 4 and sent[0] == a.me.record()
    assert sent[1:] == [rec(m, WALL, State.SUSPECT) for m in ("m5", "m6", "m7")]
    # The least-sent go first: fresh updates are not starved by old ones.
    a.receive([rec("m0", WALL, State.DEAD)], 2.0)
    assert rec("m0", WALL, State.DEAD) in a.gossip(None)


def test_notices_take_turns_over_the_suspects() -> None:
    a, _ = make(members=("b", "c", "d"))
    assert a.notices() == []
    a.receive([rec("b", WALL, State.SUSPECT), rec("c", WALL, State.SUSPECT)], 1.0)
    assert {a.notices()[0] for _ in range(4)} == {"b", "c"}


def test_states_in_the_ring() -> None:
    assert {State.ALIVE, State.SUSPECT, State.DEAD} == IN_RING
    assert [s.label for s in State] == ["alive", "suspect", "dead", "left", "removed"]
