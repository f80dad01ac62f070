"""Busy polling: keep an event loop awake for a short window after a socket write.

A request over loopback or a fast LAN is answered within tens of microseconds. If the
process waiting for the answer sleeps in ``epoll_wait`` meanwhile, its CPU may go
idle, and waking an idle CPU costs time of its own; on a virtual machine whose idle
vCPUs halt, an exit to the hypervisor at every hop (``docs/design.md`` has the
figures). The machine-wide remedy is a CPU latency request
(:mod:`hypercache.cluster.cpulatency`), which needs root; this is the per-process
one, for where that is not allowed.

After a connection with a window writes to its socket, :meth:`BusyPoller.poke` keeps
the loop from sleeping for that long: a callback re-schedules itself with
``call_soon``, so each loop iteration polls the sockets without blocking (uvloop and
asyncio both poll with a zero timeout while a callback is ready). Between polls the
callback calls ``sched_yield``, so a process with work on the same CPU runs first.
Nothing else changes: answers are read and handled by the loop as always, and the
loop sleeps again once a window has passed without a write.

The cost is CPU time - at most one window after each burst of writes, counted in
:attr:`BusyPoller.spin_ns` - traded for latency. Windows are set per connection, the
polling is per loop.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from typing import Final

__all__ = ["MAX_BUSY_POLL", "BusyPoller", "check_window", "poller"]

#: The longest window accepted, in seconds: beyond a few milliseconds sleeping is
#: cheaper than polling whatever the wake-up costs.
MAX_BUSY_POLL: Final = 0.01

_monotonic_ns = time.monotonic_ns
_sched_yield = getattr(os, "sched_yield", None) or (lambda: None)


def check_window(seconds: object) -> float:
    """Validate a busy-poll window in seconds (0 = off, at most :data:`MAX_BUSY_POLL`).

    :raises ValueError: not a number in range; the message reads "must be ...".
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError(f"must be a number of seconds, got {seconds!r}")
    if not 0 <= seconds <= MAX_BUSY_POLL:
        raise ValueError(f"must be between 0 and {MAX_BUSY_POLL:g} s, got {seconds!r}")
    return float(seconds)


class BusyPoller:
    """The busy polling of one event loop; get it with :func:`poller`."""

    __slots__ = ("__weakref__", "_armed", "_loop", "_since", "_until", "spin_ns", "windows")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._until = 0  # monotonic ns until which the loop stays awake
        self._since = 0  # when the current window opened
        self._armed = False
        #: windows opened from idle so far
        self.windows = 0
        #: nanoseconds the loop was kept awake, in all (counted when a window closes)
        self.spin_ns = 0

    @property
    def active(self) -> bool:
        """Whether the loop is being kept awake now."""
        return self._armed

    def poke(self, window_ns: int) -> None:
        """Keep the loop awake for ``window_ns`` from now (extending an open window)."""
        now = _monotonic_ns()
        until = now + window_ns
        if until > self._until:
            self._until = until
        if not self._armed:
            self._armed = True
            self._since = now
            self.windows += 1
            self._loop.call_soon(self._spin)

    def _spin(self) -> None:
        now = _monotonic_ns()
        if now < self._until and not self._loop.is_closed():
            _sched_yield()
            self._loop.call_soon(self._spin)
        else:
            self._armed = False
            self.spin_ns += now - self._since


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BusyPoller] = (
    weakref.WeakKeyDictionary()
)


def poller(loop: asyncio.AbstractEventLoop) -> BusyPoller:
    """The :class:`BusyPoller` of ``loop`` (made on first use)."""
    found = _pollers.get(loop)
    if found is None:
        found = _pollers[loop] = BusyPoller(loop)
    return found
