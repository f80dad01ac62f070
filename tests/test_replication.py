"""The replicated entry: its wire shape, liveness, version order, newest, the
read-repair plan, and the quorum round (hypercache.replication)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from hypercache.errors import NodeUnavailableError, ProtocolError, QuorumError
from hypercache.replication import (
    Entry,
    QuorumRound,
    entry_from_wire,
    is_live,
    newest,
    older,
    plan_repair,
)


def test_an_entry_travels_as_a_five_element_array() -> None:
    wire = msgpack.unpackb(msgpack.packb([b"v", 7, 3, 0, False]))
    assert entry_from_wire(wire) == (b"v", 7, 3, 0, False)
    assert entry_from_wire(None) is None


@pytest.mark.parametrize(
    "raw",
    [
        [b"v", 7, 3, 0],  # too short
        [b"v", 7, 3, 0, False, 1],  # too long
        ("v", 7, 3, 0, False),  # not a list
        ["v", 7, 3, 0, False],  # value not bytes
        [b"v", 7.0, 3, 0, False],  # ts not an int
        [b"v", True, 3, 0, False],  # bools are not integers here
        [b"v", 7, 3, None, False],
        [b"v", 7, 3, 0, 0],  # tombstone not a bool
        b"v",
    ],
)
def test_a_malformed_entry_is_a_protocol_error(raw: Any) -> None:
    with pytest.raises(ProtocolError, match="malformed R_GET answer"):
        entry_from_wire(raw)


def test_entry_liveness_and_version_order() -> None:
    value = (b"v", 10, 2, 0, False)
    assert is_live(value, 5) and is_live((b"v", 10, 2, 100, False), 99)
    assert not is_live((b"v", 10, 2, 100, False), 100)  # expired at its instant
    assert not is_live((b"", 10, 2, 0, True), 5)  # a tombstone
    assert not is_live(None, 5)
    # versions compare as (ts, origin): the origin breaks ties
    assert older(None, value)
    assert older((b"v", 9, 9, 0, False), value)
    assert older((b"v", 10, 1, 0, False), value)
    assert not older(value, value)
    assert not older((b"v", 10, 3, 0, False), value)


def test_newest_takes_the_highest_version_the_origin_breaking_ties() -> None:
    a: Entry = (b"a", 10, 1, 0, False)
    b: Entry = (b"b", 10, 2, 0, False)
    c: Entry = (b"c", 9, 9, 0, False)
    assert newest([None, a, c, b]) == b
    assert newest([None, None]) is None
    assert newest([]) is None


def test_repair_plan() -> None:
    now = 1_000
    new: Entry = (b"new", 20, 1, 0, False)
    old: Entry = (b"old", 10, 1, 0, False)
    best, stale = plan_repair({"a": new, "b": old, "c": None}, now)
    assert best == new and sorted(stale) == [("b", new), ("c", new)]
    assert plan_repair({"a": new}, now) == (new, [])  # one answer repairs nothing
    assert plan_repair({"a": None, "b": None}, now) == (None, [])
    # A tombstone travels to owners that hold nothing too: it keeps a late older
    # write out of them.
    tomb: Entry = (b"", 30, 1, 0, True)
    assert plan_repair({"a": tomb, "b": None}, now) == (tomb, [("b", tomb)])
    # An entry that expired in flight is still the newest write: the older live
    # value must not come back from under it, and it is repaired over; an owner
    # holding nothing gets nothing (there is nothing to restore).
    expired: Entry = (b"gone", 40, 1, now - 1, False)
    best, stale = plan_repair({"a": expired, "b": old, "c": None}, now)
    assert best == expired and not is_live(best, now)
    assert stale == [("b", expired)]


def test_a_round_that_asks_all_decides_at_quorum_and_completes_with_every_owner() -> None:
    rnd = QuorumRound(("a", "b", "c"), 2)
    decided: list[int] = []
    completed: list[int] = []
    rnd.on_complete = lambda r: completed.append(r.acks)
    assert list(rnd.start()) == ["a", "b", "c"]
    rnd.arm(lambda r: decided.append(r.acks))
    rnd.ok("a", 1)
    assert not decided
    assert rnd.failed("b", "down") is None  # asking all: nobody to replace it with
    assert not decided
    rnd.ok("c", 3)
    assert decided == [2] and completed == [2]
    assert rnd.error() is None
    assert rnd.results == {"a": 1, "c": 3}


def test_a_round_fails_once_nothing_is_left_and_says_why() -> None:
    rnd = QuorumRound(("a", "b", "c"), 3)
    rnd.start()
    rnd.ok("a", None)
    rnd.failed("b", "down")
    rnd.failed("c", NodeUnavailableError("c: refused"))
    assert rnd.decided
    error = rnd.error()
    assert isinstance(error, QuorumError) and (error.acks, error.required) == (1, 3)
    assert "b: down" in str(error) and "c: refused" in str(error)
    assert not rnd.unreachable  # a answered


def test_a_round_error_names_its_level_and_each_owner_once() -> None:
    rnd = QuorumRound(("10.0.0.1:7400", "b", "c"), 3, level="all")
    rnd.start()
    rnd.ok("c", None)
    rnd.failed("10.0.0.1:7400", NodeUnavailableError("10.0.0.1:7400: cannot connect"))
    rnd.failed("b", "down")
    assert str(rnd.error()) == (
        "ALL not reached: 1 of 3 required replicas answered, of 3 owners "
        "(10.0.0.1:7400: cannot connect; b: down)"
    )


def test_a_round_that_asks_what_it_needs_replaces_who_fails() -> None:
    rnd = QuorumRound(("a", "b", "c"), 2, ask_all=False)
    assert list(rnd.start()) == ["a", "b"]
    assert rnd.failed("a", NodeUnavailableError("a")) == "c"
    rnd.ok("b", 1)
    assert not rnd.decided
    assert rnd.failed("c", NodeUnavailableError("c")) is None  # none left
    assert rnd.decided and rnd.error() is not None
    every_owner_down = QuorumRound(("a", "b"), 1, ask_all=False)
    every_owner_down.start()
    assert every_owner_down.failed("a", NodeUnavailableError("a")) == "b"
    every_owner_down.failed("b", NodeUnavailableError("b"))
    assert every_owner_down.unreachable
