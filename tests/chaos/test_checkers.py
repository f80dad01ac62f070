"""The chaos checkers on hand-made histories: each fault they exist to catch makes
them fail, and what the store may legitimately do does not."""

from __future__ import annotations

import itertools

from chaos.history import (
    History,
    Operation,
    diverged,
    lost_writes,
    non_monotonic_reads,
    phantoms,
    summary,
    value_of,
)


class Timeline:
    """A history built by hand, on a clock that ticks once per event."""

    def __init__(self) -> None:
        ticks = itertools.count()
        self.history = History(clock=lambda: float(next(ticks)))

    def write(self, key: str, version: int, outcome: str = "ok", process: int = 0) -> Operation:
        op = self.history.invoke(process, "write", key, value_of(key, version, process), version)
        self.history.complete(op, outcome)  # type: ignore[arg-type]
        return op

    def begin_write(self, key: str, version: int, process: int = 0) -> Operation:
        return self.history.invoke(process, "write", key, value_of(key, version, process), version)

    def read(self, key: str, value: str | None, process: int = 1) -> Operation:
        op = self.history.invoke(process, "read", key)
        self.history.complete(op, "ok", value)
        return op


def test_a_clean_history_passes_every_checker() -> None:
    t = Timeline()
    t.write("a", 0)
    t.read("a", "a=0@0")
    t.write("a", 1)
    t.read("a", "a=1@0")
    t.read("b", None)
    final = {"a": "a=1@0"}
    h = t.history
    assert lost_writes(h, final) == []
    assert phantoms(h, final) == []
    assert non_monotonic_reads(h) == []
    assert h.failure_rate() == 0.0
    assert "write_ok=2" in summary(h, [("lost", 0)]) and "lost=0" in summary(h, [("lost", 0)])


def test_a_converged_value_older_than_the_last_acknowledged_write_is_a_lost_write() -> None:
    t = Timeline()
    t.write("a", 0)
    t.write("a", 1)
    assert lost_writes(t.history, {"a": "a=0@0"}) == [
        "a: acknowledged 'a=1@0', converged on older 'a=0@0'"
    ]
    assert lost_writes(t.history, {"a": None}) == ["a: acknowledged 'a=1@0', converged on nothing"]
    assert lost_writes(t.history, {}) != []


def test_a_newer_unacknowledged_write_may_win_and_a_failed_one_is_not_owed() -> None:
    t = Timeline()
    t.write("a", 0)
    t.write("a", 1, "unknown")
    t.write("b", 0, "fail")
    assert lost_writes(t.history, {"a": "a=1@0", "b": None}) == []
    assert lost_writes(t.history, {"a": "a=0@0", "b": "b=0@0"}) == []
    assert phantoms(t.history, {"a": "a=1@0", "b": "b=0@0"}) == []


def test_a_value_never_written_or_read_before_its_write_is_a_phantom() -> None:
    t = Timeline()
    t.read("a", "a=5@0")
    early = t.read("b", "b=0@0")
    t.write("b", 0)
    problems = phantoms(t.history, {"c": "junk"})
    assert problems == [
        "a: read by client 1: 'a=5@0' was never written",
        "b: read by client 1: 'b=0@0' seen before its write began",
        "c: converged: 'junk' was never written",
    ]
    assert early.completed is not None


def test_a_value_of_another_key_is_a_phantom() -> None:
    t = Timeline()
    t.write("a", 0)
    t.read("b", "a=0@0")
    assert phantoms(t.history) == ["b: read by client 1: 'a=0@0' was never written"]


def test_owners_whose_digests_differ_have_diverged() -> None:
    owners = [["n1", "n2", "n3"], ["n2", "n3", "n4"]]
    same = {"n1": {"0": "aa"}, "n2": {"0": "aa", "1": "bb"}, "n3": {"0": "aa", "1": "bb"}}
    same["n4"] = {"1": "bb"}
    assert diverged(same, owners) == []
    apart = {**same, "n3": {"0": "ab", "1": "bb"}}
    assert diverged(apart, owners) == ["partition 0: owners differ (n1=aa, n2=aa, n3=ab)"]
    missing = {**same, "n4": {}}
    assert diverged(missing, owners) == ["partition 1: owners differ (n2=bb, n3=bb, n4=empty)"]


def test_a_client_reading_back_past_an_acknowledged_write_is_not_monotonic() -> None:
    t = Timeline()
    t.write("a", 0)
    t.write("a", 1)
    t.read("a", "a=1@0", process=1)
    t.read("a", "a=0@0", process=1)
    t.read("a", None, process=1)
    assert non_monotonic_reads(t.history) == [
        "a: client 1 read 'a=0@0' after 'a=1@0'",
        "a: client 1 read None after 'a=1@0'",
    ]


def test_reads_of_other_clients_or_of_an_unfinished_write_may_go_back() -> None:
    t = Timeline()
    t.write("a", 0)
    pending = t.begin_write("a", 1)
    t.read("a", "a=1@0", process=1)  # seen on one replica while the write runs
    t.read("a", "a=0@0", process=1)  # may vanish again: nothing acknowledged it yet
    t.read("a", "a=0@0", process=2)
    t.history.complete(pending, "unknown")
    assert non_monotonic_reads(t.history) == []
