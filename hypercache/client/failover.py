"""Where one request goes: the nodes it tries in turn, and what it raises in the end.

:class:`Failover` (a request along its key's candidates) and :class:`TopologyFetch`
(the partition table along the fetch order) are bookkeeping, like
:class:`~hypercache.client._common.OwnerRead`: they decide which node comes next,
whether a failure moves on, and what to raise; each client's ``_run`` does the
sending and the waiting, the one loop that drives both::

    address = attempts.first()
    while address is not None:
        try:
            return attempts.read(send(address, attempts.op, payload))
        except HyperCacheError as exc:
            if not attempts.failed(address, exc):
                raise
        address = attempts.next()
    raise attempts.error()

The first attempt costs one object and the router's own candidate generator: the
bookkeeping of failures (counters, the stop after a timeout) runs only after one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar

from hypercache.client.commands import TOPOLOGY, Command
from hypercache.client.topology import Topology
from hypercache.errors import HyperCacheError, NodeUnavailableError, RequestTimeoutError

if TYPE_CHECKING:
    from hypercache.client._common import ClientBase

__all__ = ["Attempts", "Failover", "TopologyFetch", "unreachable"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


def unreachable(what: str, errors: Mapping[str, BaseException]) -> NodeUnavailableError:
    """The error raised when no node could take a request."""
    if not errors:
        return NodeUnavailableError(f"{what}: no node to send to")
    parts = []
    for address, exc in errors.items():
        text = str(exc)
        parts.append(text if text.startswith(address) else f"{address}: {text}")
    detail = "; ".join(parts)
    return NodeUnavailableError(f"{what}: no node reachable ({detail})")


class Attempts(Protocol[T_co]):
    """One request's way through the nodes, as the clients' ``_run`` drives it (see
    the module docstring). Implemented by :class:`Failover` and :class:`TopologyFetch`."""

    @property
    def op(self) -> int: ...

    def first(self) -> str | None:
        """The first address to try (``None``: there is none)."""
        ...

    def next(self) -> str | None:
        """After a failure that goes on: the next address to try, or ``None``."""
        ...

    def read(self, answer: Any) -> T_co:
        """The last address tried answered ``answer``: the result of the request
        (may raise a :class:`~hypercache.errors.HyperCacheError`, handed to
        :meth:`failed`)."""
        ...

    def failed(self, address: str, exc: HyperCacheError) -> bool:
        """``address`` failed with ``exc``: whether to go on (else ``exc`` is raised)."""
        ...

    def error(self) -> BaseException:
        """What to raise when every address failed."""
        ...


class Failover(Generic[T]):
    """One request for ``key`` along the router's candidates (counted in
    ``stats.requests``; each move to another node in ``stats.failovers``).

    After a node could not be reached, the request always moves on; after a
    timeout, only a command that changes nothing (:attr:`Command.retry_after_timeout`),
    and only to a node not set aside (a cluster that is entirely paused costs a read
    one timeout, not one per node). Any other error (an error answer, a malformed
    answer) is raised. When no node is left: the first timeout, else
    :func:`unreachable` naming every node tried.
    """

    __slots__ = (
        "_candidates",
        "_key",
        "_router",
        "_stats",
        "cmd",
        "errors",
        "op",
        "read",
        "timed_out",
    )

    _candidates: Iterator[str]  # set by first()

    def __init__(self, client: ClientBase, key: bytes | None, cmd: Command[T]) -> None:
        self.cmd = cmd
        self.op = cmd.op
        #: checks and shapes the answer (the command's)
        self.read: Callable[[Any], T] = cmd.read
        self._key = key
        self._router = client._router
        self._stats = stats = client.stats
        stats.requests += 1
        #: address -> why it did not answer
        self.errors: dict[str, BaseException] = {}
        self.timed_out: RequestTimeoutError | None = None

    def first(self) -> str | None:
        candidates = self._candidates = self._router.candidates(self._key)
        return next(candidates, None)

    def next(self) -> str | None:
        address = next(self._candidates, None)
        if address is None:
            return None
        if self.timed_out is not None and self._router.is_down(address):
            return None  # only nodes set aside are left: each could cost a timeout more
        self._stats.failovers += 1
        return address

    def failed(self, address: str, exc: HyperCacheError) -> bool:
        if isinstance(exc, RequestTimeoutError):
            if not self.cmd.retry_after_timeout:
                return False
            self.timed_out = self.timed_out or exc
        elif not isinstance(exc, NodeUnavailableError):
            return False
        self.errors[address] = exc
        return True

    def error(self) -> BaseException:
        if self.timed_out is not None:
            return self.timed_out
        return unreachable(f"op {self.cmd.name}", self.errors)


class TopologyFetch:
    """One fetch of the partition table: the router's fetch order in turn, any error
    moving on to the next node. The first valid table is adopted at once
    (``stats.topology_refreshes``); when no node gave one, the refresh is recorded as
    failed (``stats.topology_errors``, next try after ``MIN_REFRESH``) and the error
    raised is :func:`unreachable` if every node was, else the first other error."""

    __slots__ = ("_address", "_client", "_order", "errors")

    op: Final = TOPOLOGY.op

    def __init__(self, client: ClientBase) -> None:
        self._client = client
        self._order: Iterator[str] = iter(())
        self._address = ""
        self.errors: dict[str, BaseException] = {}

    def first(self) -> str | None:
        self._order = iter(self._client._router.fetch_order())
        return self.next()

    def next(self) -> str | None:
        address = next(self._order, None)
        if address is not None:
            self._address = address
        return address

    def read(self, answer: Any) -> Topology:
        topology = TOPOLOGY.read(answer)
        client = self._client
        client._router.set_topology(topology, time.monotonic())
        client._recovered(self._address)
        client.stats.topology_refreshes += 1
        return topology

    def failed(self, address: str, exc: HyperCacheError) -> bool:
        self.errors[address] = exc
        return True

    def error(self) -> BaseException:
        client, errors = self._client, self.errors
        client.stats.topology_errors += 1
        client._router.refresh_failed(time.monotonic())
        if all(isinstance(exc, NodeUnavailableError) for exc in errors.values()):
            return unreachable("TOPOLOGY", errors)
        return next(exc for exc in errors.values() if not isinstance(exc, NodeUnavailableError))
