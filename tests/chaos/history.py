"""Histories of client operations under faults, and the checkers that judge them.

A :class:`History` records every operation twice: when it is invoked and when its
outcome is known: ``ok``, ``fail`` (an error answer: for a write, a
:class:`~hypercache.errors.QuorumError` may still have landed on some replicas, as in
any Dynamo-style store), or ``unknown`` (no answer in time: it may or may not have
been applied). Each write carries a value unique in the whole history and a
*version*: its place in its key's order of writes. The workloads give every key one
writer that writes it in turn, so versions order a key's writes in real time.

Checkers return the problems they find, one line each (empty: the history passes):

* :func:`lost_writes`: a key's converged value is older than its last acknowledged
  write, or gone;
* :func:`phantoms`: a value read (during the run or converged) that no write of that
  key attempted, or read before the write that made it was invoked;
* :func:`diverged`: owners of one partition whose digests differ after healing;
* :func:`non_monotonic_reads`: a client's QUORUM read older than a value it read
  before, when that value's write was acknowledged before the later read began
  (what quorum intersection promises; a value seen only from a failed or unknown
  write may vanish again, and is not held against the store).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hypercache.errors import HyperCacheError, RequestTimeoutError

Kind = Literal["write", "read"]
Outcome = Literal["ok", "fail", "unknown"]


@dataclass(slots=True)
class Operation:
    """One operation of one client (``process``)."""

    process: int
    kind: Kind
    key: str
    #: a write's value; a read's answer (``None``: not found)
    value: str | None
    #: a write's place in its key's order of writes
    version: int | None
    invoked: float
    completed: float | None = None
    outcome: Outcome | None = None
    error: str = ""


def value_of(key: str, version: int, process: int) -> str:
    """The unique value of a key's write number ``version`` by ``process``."""
    return f"{key}={version}@{process}"


@dataclass
class History:
    """A thread-safe record of operations (see the module docstring)."""

    ops: list[Operation] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def invoke(
        self,
        process: int,
        kind: Kind,
        key: str,
        value: str | None = None,
        version: int | None = None,
    ) -> Operation:
        op = Operation(process, kind, key, value, version, self.clock())
        with self._lock:
            self.ops.append(op)
        return op

    def complete(
        self, op: Operation, outcome: Outcome, value: str | None = None, error: str = ""
    ) -> None:
        op.completed = self.clock()
        op.outcome = outcome
        op.error = error
        if op.kind == "read" and outcome == "ok":
            op.value = value

    def write(self, client: Any, process: int, key: str, version: int) -> Outcome:
        """``client.set`` the next unique value of ``key``, recorded."""
        op = self.invoke(process, "write", key, value_of(key, version, process), version)
        assert op.value is not None
        try:
            client.set(key, op.value)
        except RequestTimeoutError as exc:
            self.complete(op, "unknown", error=repr(exc))
        except HyperCacheError as exc:
            self.complete(op, "fail", error=repr(exc))
        else:
            self.complete(op, "ok")
        assert op.outcome is not None
        return op.outcome

    def read(self, client: Any, process: int, key: str) -> Outcome:
        """``client.get`` ``key``, recorded (a timeout is ``unknown``, harmless for a read)."""
        op = self.invoke(process, "read", key)
        try:
            raw = client.get(key)
        except RequestTimeoutError as exc:
            self.complete(op, "unknown", error=repr(exc))
        except HyperCacheError as exc:
            self.complete(op, "fail", error=repr(exc))
        else:
            self.complete(op, "ok", _text(raw))
        assert op.outcome is not None
        return op.outcome

    # -- views

    def writes(self) -> list[Operation]:
        return [op for op in self.ops if op.kind == "write"]

    def reads(self) -> list[Operation]:
        return [op for op in self.ops if op.kind == "read"]

    def keys(self) -> list[str]:
        return sorted({op.key for op in self.writes()})

    def counts(self) -> dict[str, int]:
        """``{"write_ok": n, "write_fail": n, "write_unknown": n, "read_ok": ...}``."""
        out: dict[str, int] = {}
        for op in self.ops:
            name = f"{op.kind}_{op.outcome}"
            out[name] = out.get(name, 0) + 1
        return out

    def failure_rate(self, kind: Kind = "write", processes: Iterable[int] | None = None) -> float:
        """Share of ``kind`` operations (of the clients ``processes``, default all)
        that did not end ``ok``."""
        of = None if processes is None else set(processes)
        done = [op for op in self.ops if op.kind == kind and (of is None or op.process in of)]
        return sum(op.outcome != "ok" for op in done) / len(done) if done else 0.0


def _text(raw: Any) -> str | None:
    if raw is None:
        return None
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def _writes_by_value(history: History) -> dict[tuple[str, str], Operation]:
    return {(op.key, op.value): op for op in history.writes() if op.value is not None}


def lost_writes(history: History, final: Mapping[str, str | None]) -> list[str]:
    """Keys whose converged value (``final``) is older than their last acknowledged
    write, or missing."""
    by_value = _writes_by_value(history)
    last_ok: dict[str, Operation] = {}
    for op in history.writes():
        if op.outcome == "ok" and op.version is not None:
            best = last_ok.get(op.key)
            if best is None or (best.version is not None and op.version > best.version):
                last_ok[op.key] = op
    problems = []
    for key, acked in sorted(last_ok.items()):
        value = final.get(key)
        if value is None:
            problems.append(f"{key}: acknowledged {acked.value!r}, converged on nothing")
            continue
        made = by_value.get((key, value))
        if made is None:
            continue  # a phantom: phantoms() reports it
        assert made.version is not None and acked.version is not None
        if made.version < acked.version:
            problems.append(f"{key}: acknowledged {acked.value!r}, converged on older {value!r}")
    return problems


def phantoms(history: History, final: Mapping[str, str | None] | None = None) -> list[str]:
    """Values read that no write of their key attempted, or read before their write
    was invoked; ``final`` (converged values) is checked too."""
    by_value = _writes_by_value(history)
    problems = []
    seen: list[tuple[str, str, float | None, str]] = [
        (op.key, op.value, op.completed, f"read by client {op.process}")
        for op in history.reads()
        if op.outcome == "ok" and op.value is not None
    ]
    if final is not None:
        seen += [(k, v, None, "converged") for k, v in final.items() if v is not None]
    for key, value, completed, where in seen:
        made = by_value.get((key, value))
        if made is None:
            problems.append(f"{key}: {where}: {value!r} was never written")
        elif completed is not None and completed < made.invoked:
            problems.append(f"{key}: {where}: {value!r} seen before its write began")
    return problems


def diverged(
    digests: Mapping[str, Mapping[str, str]], owners: Sequence[Sequence[str]]
) -> list[str]:
    """Partitions whose owners' digests differ.

    :param digests: per node id, ``{partition: digest}`` of its non-empty partitions
        (``/internal/merkle``); a partition it lacks is empty there.
    :param owners: per partition, its owners' node ids (from the ring table).
    """
    problems = []
    for p, nodes in enumerate(owners):
        held = {node: digests.get(node, {}).get(str(p), "empty") for node in nodes}
        if len(set(held.values())) > 1:
            detail = ", ".join(f"{n}={d}" for n, d in sorted(held.items()))
            problems.append(f"partition {p}: owners differ ({detail})")
    return problems


def _version(op: Operation | None) -> int:
    return -1 if op is None or op.version is None else op.version


def non_monotonic_reads(history: History) -> list[str]:
    """QUORUM reads of a client that went back before a value it had read, when that
    value's write was acknowledged before the later read began."""
    by_value = _writes_by_value(history)
    problems = []
    newest: dict[tuple[int, str], Operation] = {}  # (client, key) -> write last seen
    reads = sorted(
        (op for op in history.reads() if op.outcome == "ok" and op.completed is not None),
        key=lambda op: (op.process, op.invoked),
    )
    for op in reads:
        made = None if op.value is None else by_value.get((op.key, op.value))
        before = newest.get((op.process, op.key))
        if before is not None and before.outcome == "ok" and before.completed is not None:
            assert before.version is not None
            older = made is None or (made.version is not None and made.version < before.version)
            if older and before.completed < op.invoked:
                problems.append(
                    f"{op.key}: client {op.process} read {op.value!r} after {before.value!r}"
                )
        if made is not None and _version(made) >= _version(before):
            newest[(op.process, op.key)] = made
    return problems


def summary(history: History, extra: Iterable[tuple[str, Any]] = ()) -> str:
    """One line of figures: counts, write failure %, and ``extra`` (name, value) pairs."""
    counts = history.counts()
    parts = [f"{name}={n}" for name, n in sorted(counts.items())]
    parts.append(f"write_fail%={100 * history.failure_rate('write'):.2f}")
    parts += [f"{name}={value}" for name, value in extra]
    return " ".join(parts)
