"""Where one request goes: the nodes it tries in turn, and what it raises in the end.

:class:`Failover` (a request along its key's candidates) and :class:`TopologyFetch`
(the partition table along the fetch order) are bookkeeping, like
:class:`~hypercache.client._common.OwnerRead`: they decide which node comes next,
whether a failure moves on, and what to raise; each client's ``_run`` does the
sending and the waiting, the one loop that drives both::

    for address in attempts:
        try:
            return attempts.done(address, send(address, attempts.op, payload))
        except HyperCacheError as exc:
            if not attempts.failed(address, exc):
                raise
    raise attempts.error()
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
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
    """One request's way through the nodes, as the clients' ``_run`` drives it: the
    addresses to try in turn (iterating), what an answer gives (:meth:`done`), whether
    a failure moves on to the next address (:meth:`failed`), and what to raise when no
    address is left (:meth:`error`). Implemented by :class:`Failover` and
    :class:`TopologyFetch`."""

    @property
    def op(self) -> int: ...

    def __iter__(self) -> Iterator[str]: ...

    def done(self, address: str, answer: Any) -> T_co:
        """``address`` answered ``answer``: the result of the request (may raise a
        :class:`~hypercache.errors.HyperCacheError`, handed to :meth:`failed`)."""
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

    __slots__ = ("_key", "_router", "_stats", "cmd", "errors", "timed_out")

    def __init__(self, client: ClientBase, key: bytes | None, cmd: Command[T]) -> None:
        self.cmd = cmd
        self._key = key
        self._router = client._router
        self._stats = client.stats
        self._stats.requests += 1
        #: address -> why it did not answer
        self.errors: dict[str, BaseException] = {}
        self.timed_out: RequestTimeoutError | None = None

    @property
    def op(self) -> int:
        return self.cmd.op

    def __iter__(self) -> Iterator[str]:
        router, errors = self._router, self.errors
        for address in router.candidates(self._key):
            if self.timed_out is not None and router.is_down(address):
                return  # only nodes set aside are left: each could cost a timeout more
            if errors:
                self._stats.failovers += 1
            yield address

    def done(self, address: str, answer: Any) -> T:
        return self.cmd.read(answer)

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

    __slots__ = ("_client", "errors")

    op: Final = TOPOLOGY.op

    def __init__(self, client: ClientBase) -> None:
        self._client = client
        self.errors: dict[str, BaseException] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._client._router.fetch_order())

    def done(self, address: str, answer: Any) -> Topology:
        topology = TOPOLOGY.read(answer)
        client = self._client
        client._router.set_topology(topology, time.monotonic())
        client._recovered(address)
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
