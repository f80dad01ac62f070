"""The replicated entry and what every replica and coordinator decides about it.

One home for the concepts that a node's coordinator, its replica side, anti-entropy,
hinted handoff and both clients share:

* the **entry**: one version of a key as owners hold and answer it,
  ``(value, ts, origin, expire_at_ms, tombstone)`` (a 5-element array on the wire);
* its **version** ``(ts, origin)``, totally ordered (``ts`` first, then ``origin``):
  newer wins everywhere, equal is the same write;
* **newest** of several answers, whether an entry **is live** (a value, not a
  tombstone, not expired), and the **read-repair plan**: which owners to push the
  newest version to;
* one **quorum round**: the bookkeeping of asking the owners of a key, deciding at
  ``required`` answers, and failing with :class:`~hypercache.errors.QuorumError`;
* the **clock** that expiries are judged by (:func:`wall_ms`, wall-clock ms, the
  C clock the hybrid logical clocks read), injectable where a test moves time.

Pure: no I/O, nothing that waits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeAlias

from hypercache._core.hlc import node_tag, wall_clock_ms
from hypercache.errors import NodeUnavailableError, ProtocolError, QuorumError

__all__ = [
    "Entry",
    "KeyedEntry",
    "QuorumRound",
    "WallClock",
    "entry_from_wire",
    "is_live",
    "newest",
    "older",
    "owners_tag",
    "plan_repair",
    "version",
    "wall_ms",
]

#: One version of a key: ``(value, ts, origin, expire_at_ms, tombstone)``.
#: ``expire_at_ms`` is absolute wall-clock ms (0: none); a tombstone's value is b"".
Entry: TypeAlias = tuple[bytes, int, int, int, bool]

#: An entry with its key, as ``R_PUT`` carries it and hints keep it:
#: ``(key, value, ts, origin, expire_at_ms, tombstone)``.
KeyedEntry: TypeAlias = tuple[bytes, bytes, int, int, int, bool]

#: A source of wall-clock milliseconds (what expiries are judged by).
WallClock: TypeAlias = Callable[[], int]

#: The wall clock read from C (``clock_gettime(CLOCK_REALTIME)``), in ms.
wall_ms: Final[WallClock] = wall_clock_ms

_TS: Final = 1
_ORIGIN: Final = 2
_EXPIRE_AT: Final = 3
_TOMBSTONE: Final = 4


def owners_tag(node_ids: Iterable[str]) -> int:
    """The 32-bit tag of an owner list (node ids, primary first), as a client's
    ``W_PUT`` names the owners it believes in and a node checks them against its own
    ring: ``node_tag`` of the ids joined by ``"\\x1f"``. Equal lists give equal tags;
    a stale list gives another tag (but for a 2**-32 chance)."""
    return node_tag("\x1f".join(node_ids))


def version(entry: Entry) -> tuple[int, int]:
    """The version ``(ts, origin)`` of an entry."""
    return entry[_TS], entry[_ORIGIN]


def older(entry: Entry | None, than: Entry) -> bool:
    """Whether ``entry`` is absent or has an older version than ``than``."""
    return entry is None or (entry[_TS], entry[_ORIGIN]) < (than[_TS], than[_ORIGIN])


def newest(entries: Iterable[Entry | None]) -> Entry | None:
    """The entry with the highest version; ``None`` if there is none."""
    best: Entry | None = None
    for entry in entries:
        if entry is not None and (
            best is None or (entry[_TS], entry[_ORIGIN]) > (best[_TS], best[_ORIGIN])
        ):
            best = entry
    return best


def is_live(entry: Entry | None, now_ms: int) -> bool:
    """Whether ``entry`` is a value (not a tombstone) that has not expired by ``now_ms``."""
    if entry is None or entry[_TOMBSTONE]:
        return False
    expire_at = entry[_EXPIRE_AT]
    return expire_at == 0 or expire_at > now_ms


def entry_from_wire(raw: Any) -> Entry | None:
    """Validate an owner's answer (``R_GET``, ``R_DEL``): an entry array, or nil.

    :raises ProtocolError: the answer has another shape.
    """
    if raw is None:
        return None
    if (
        type(raw) is list
        and len(raw) == 5
        and isinstance(raw[0], bytes)
        and type(raw[1]) is int
        and type(raw[2]) is int
        and type(raw[3]) is int
        and type(raw[4]) is bool
    ):
        return (raw[0], raw[1], raw[2], raw[3], raw[4])
    raise ProtocolError(f"malformed R_GET answer: {raw!r:.200}")


def plan_repair(
    answers: Mapping[str, Entry | None], now_ms: int
) -> tuple[Entry | None, list[tuple[str, Entry]]]:
    """What a read found and which owners to repair: ``(newest, [(owner, newest), ...])``.

    The newest version wins, tombstones and expired entries included (the caller
    serves a miss through :func:`is_live`): an entry that expired in flight is still
    the newest write, and an older live one elsewhere must not come back from under
    it. Every owner that answered with an older version is repaired with the newest;
    so is one that answered nothing (a tombstone there keeps a late older write
    out), unless the newest is a value that has expired (nothing would be restored
    there). A single answer repairs nothing.
    """
    best = newest(answers.values())
    if best is None or len(answers) < 2:
        return best, []
    fill = best[_TOMBSTONE] or is_live(best, now_ms)
    return best, [
        (owner, best)
        for owner, entry in answers.items()
        if older(entry, best) and (fill or entry is not None)
    ]


class QuorumRound:
    """The bookkeeping of one operation on the owners of a key.

    :param owners: the owners, in the order to ask them.
    :param required: answers needed to succeed (``Consistency.required(n)``).
    :param ask_all: ask every owner at once (a node coordinating a write or a read:
        a write must reach every live owner; a read repairs the others); otherwise
        ask ``required`` of them and replace each that fails by the next one not
        asked yet (a client's read: it asks no more owners than it needs).
    :param spares: nodes that may answer in place of an owner that is not ready
        (a moving partition's previous owners), taken in order by :meth:`replace`.

    Answers come in through :meth:`ok` and :meth:`failed`, synchronously or from
    request callbacks. The round is *decided* at the ``required``-th answer, or once
    nothing is left to wait for; *complete* once every owner asked has answered or
    failed. Failure waits for every owner asked (each bounded by the request
    timeout) so that :class:`~hypercache.errors.QuorumError` reports every answer
    that did come: the caller learns how far a failed write got. A hook given to
    :meth:`arm` runs once, when decided; ``on_complete`` once complete, after the
    decision hook when both fall on the same answer.
    """

    __slots__ = (
        "_next",
        "_spares",
        "errors",
        "level",
        "on_complete",
        "on_decided",
        "outstanding",
        "owners",
        "required",
        "results",
    )

    def __init__(
        self,
        owners: Sequence[str],
        required: int,
        *,
        ask_all: bool = True,
        spares: Sequence[str] = (),
        level: str = "quorum",
    ) -> None:
        self.owners = owners
        self._spares = list(spares)
        self.required = required
        #: the consistency level's name, for the error
        self.level = level
        #: owner -> what it answered (for reads: its entry), in arrival order
        self.results: dict[str, Any] = {}
        #: owner -> why it gave no answer
        self.errors: dict[str, BaseException | str] = {}
        #: owners asked that have not answered yet
        self.outstanding = 0
        self._next = len(owners) if ask_all else min(required, len(owners))
        self.on_decided: Callable[[QuorumRound], None] | None = None
        self.on_complete: Callable[[QuorumRound], None] | None = None

    def start(self) -> Sequence[str]:
        """The owners to ask now (every one, or the first ``required``)."""
        first = self.owners[: self._next]
        self.outstanding = len(first)
        return first

    @property
    def acks(self) -> int:
        return len(self.results)

    @property
    def decided(self) -> bool:
        return len(self.results) >= self.required or self.outstanding == 0

    def ok(self, owner: str, result: Any) -> None:
        """Record ``owner``'s answer."""
        self.results[owner] = result
        self._step()

    def failed(self, owner: str, why: BaseException | str) -> str | None:
        """Record that ``owner`` gave no answer; return the next owner to ask instead
        (only when not asking all, while the quorum is not reached), else None."""
        self.errors[owner] = why
        nxt = None
        if self._next < len(self.owners) and len(self.results) < self.required:
            nxt = self.owners[self._next]
            self._next += 1
            self.outstanding += 1
        self._step()
        return nxt

    @property
    def spares(self) -> bool:
        """Whether a spare is left for :meth:`replace`."""
        return bool(self._spares)

    def replace(self, owner: str, why: BaseException | str) -> str | None:
        """Record that ``owner`` gave no answer because it is not ready, and return the
        spare to ask in its place (its answer counts like an owner's); with no spare
        left this is :meth:`failed` and returns what it returns."""
        if not self._spares:
            return self.failed(owner, why)
        self.errors[owner] = why
        spare = self._spares.pop(0)
        # Still waiting on as many as before: the spare stands for the owner.
        return spare

    def _step(self) -> None:
        self.outstanding -= 1
        hook = self.on_decided
        if hook is not None and (len(self.results) >= self.required or self.outstanding == 0):
            self.on_decided = None
            hook(self)
        if self.outstanding == 0 and self.on_complete is not None:
            hook, self.on_complete = self.on_complete, None
            hook(self)

    def arm(self, hook: Callable[[QuorumRound], None]) -> None:
        """Run ``hook(self)`` once decided (now, if it already is)."""
        if self.decided:
            hook(self)
        else:
            self.on_decided = hook

    @property
    def unreachable(self) -> bool:
        """No owner answered and every one asked was unreachable."""
        return not self.results and all(
            isinstance(why, NodeUnavailableError) for why in self.errors.values()
        )

    def error(self) -> QuorumError | None:
        """``None`` when the quorum was reached, else the :class:`QuorumError` to raise."""
        acks = len(self.results)
        if acks >= self.required:
            return None
        reasons = "; ".join(_reason(owner, why) for owner, why in list(self.errors.items())[:4])
        detail = f" ({reasons})" if reasons else ""
        return QuorumError(
            acks,
            self.required,
            f"{self.level.upper()} not reached: {acks} of {self.required} required replicas "
            f"answered, of {len(self.owners)} owners{detail}",
        )


def _reason(owner: str, why: BaseException | str) -> str:
    """``owner: why``, without the owner twice when ``why`` already starts with it."""
    text = str(why)
    if text.startswith(owner):
        text = text[len(owner) :].lstrip(": ")
    return f"{owner}: {text}"
