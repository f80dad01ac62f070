"""The requests in flight of one owner read of :class:`~hypercache.client.AsyncClient`
(``R_GET`` to ``required`` owners at once, each that fails replaced by the next).

The answers come back through callbacks, not a task per owner. The state of one read
lives in an :class:`OwnerAsk` whose callbacks are bound methods: nothing it hands out
refers back to it in a loop, so a finished read is freed by reference counting.
Closures that name each other (a launch that names the outcome handler, which names
the launch) would make a reference cycle of about 20 objects per read, left to the
garbage collector: with a client reading in a loop, a collection every few dozen
reads, whose pauses land in the read latency's tail (``bench/read_profile.py``).
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any

from hypercache.client import commands
from hypercache.errors import HyperCacheError, NoAnswerError
from hypercache.net.protocol import Op

if TYPE_CHECKING:
    from hypercache.client._common import DirectWrite, OwnerRead
    from hypercache.client.aio import AsyncClient

__all__ = ["DirectAsk", "OwnerAsk"]

_R_GET = commands.R_GET.op
_W_PUT = int(Op.W_PUT)
_W_HINT = int(Op.W_HINT)


class _Ask:
    """One request (``_op`` with ``_payload``) sent to owners, each answer to
    ``_answered(address, raw, exc)``; ``done`` is set by the subclass."""

    __slots__ = ("_client", "_payload", "_timeout", "done")
    _op: int

    def __init__(self, client: AsyncClient, payload: Any, timeout: float) -> None:
        self._client = client
        self._payload = payload
        self._timeout = timeout
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def launch(self, address: str) -> None:
        # Connected: the answer comes back through a callback, no task per owner
        # (not connected yet: the peer connects in a task, then sends).
        try:
            peer = self._client._peer(address)
        except HyperCacheError as exc:
            self._answered(address, None, exc)
            return
        peer.send_callback(
            self._op, self._payload, self._timeout, functools.partial(self._answered, address)
        )

    def _answered(self, address: str, raw: Any, exc: BaseException | None) -> None:
        raise NotImplementedError


class OwnerAsk(_Ask):
    """Ask the owners of ``rd`` for it; ``done`` is set once ``rd`` is done (or gets
    the exception that is not a node's failure: a bug or an interrupt)."""

    __slots__ = ("rd",)
    _op = _R_GET

    def __init__(self, client: AsyncClient, rd: OwnerRead, timeout: float) -> None:
        super().__init__(client, [rd.key], timeout)
        self.rd = rd

    def _answered(self, address: str, raw: Any, exc: BaseException | None) -> None:
        if isinstance(exc, NoAnswerError):
            self._client._suspect(address)
        self._outcome(address, raw, exc)

    def _outcome(self, address: str, raw: Any, exc: BaseException | None) -> None:
        done = self.done
        if done.cancelled():  # the caller gave up: replace no one
            return
        if exc is not None and not isinstance(exc, HyperCacheError):
            # not a node's failure: a bug or an interrupt, let it through
            if not done.done():
                done.set_exception(exc)
            return
        rd = self.rd
        nxt = self._client._owner_answer(rd, address, raw, exc)
        if nxt is not None:
            self.launch(nxt)
        if rd.done and not done.done():
            done.set_result(None)


class DirectAsk(_Ask):
    """Send the direct write ``wr`` (``W_PUT``) to its owners at once; ``done`` is set
    once ``wr`` is decided. The answers that come after go on being recorded, and
    once every owner answered (or failed) the hints of a write that succeeded are
    sent (``W_HINT``, not waited for)."""

    __slots__ = ("wr",)
    _op = _W_PUT

    def __init__(self, client: AsyncClient, wr: DirectWrite, timeout: float) -> None:
        super().__init__(client, wr.payload, timeout)
        self.wr = wr

    def _answered(self, address: str, raw: Any, exc: BaseException | None) -> None:
        if isinstance(exc, NoAnswerError):
            self._client._suspect(address)
        done = self.done
        if exc is not None and not isinstance(exc, HyperCacheError):
            if not done.done():
                done.set_exception(exc)
            return
        wr = self.wr
        wr.answer(address, raw, exc)
        if wr.decided and not done.done():
            done.set_result(None)
        if wr.outstanding == 0 and wr.errors and wr.acks >= wr.required:
            self._hint()

    def _hint(self) -> None:
        client = self._client
        for via, payload in self.wr.hints():
            client.stats.write_hints += 1
            try:
                peer = client._peer(via)
            except HyperCacheError:
                continue
            peer.send_callback(_W_HINT, payload, self._timeout, _ignore)


def _ignore(_value: Any, _error: BaseException | None) -> None:
    """A hint that failed is repaired by anti-entropy."""
