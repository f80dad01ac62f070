"""The framed protocol that both ends of a connection share.

:class:`FramedProtocol` is an ``asyncio.Protocol`` with a frame decoder and encoder,
counters, busy polling, and coalesced writes: frames produced while a read is
handled (a ``data_received`` of any connection of the loop: answers, requests sent
to other nodes by callbacks run from it) are flushed when that read is done, so a
burst costs one syscall per connection and no extra loop iteration. Frames written
from elsewhere (tasks, timer or future callbacks) wait for one ``call_soon`` flush
per connection and iteration.

The server side (:mod:`hypercache.net.server`) and the client side
(:mod:`hypercache.net.connection`) derive from it. Neither touches sockets itself,
so the transports (:mod:`hypercache.net.tcp`, :mod:`hypercache.net.inproc`, and a
fault-injecting one) run the very same classes over their own transport objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import weakref
from collections.abc import Callable
from typing import Final, cast

from hypercache.net.busypoll import check_window, poller
from hypercache.net.protocol import FrameDecoder, FrameEncoder, Limits, frame_header
from hypercache.net.transport import NetStats
from hypercache.units import format_hostport

__all__ = ["FramedProtocol", "remote_host", "remote_name"]

# A body at least this big is written on its own rather than copied into the batch;
# queued frames past it go to the transport at once.
LARGE_WRITE: Final = 256 * 1024


class _ReadScope:
    """Per event loop: how deep we are in ``data_received`` calls, and which
    connections queued frames meanwhile (flushed when the outermost one returns)."""

    __slots__ = ("depth", "dirty")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list[FramedProtocol] = []

    def leave(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.dirty:
            # A flush may not add to the list (depth is 0 now: later frames schedule
            # their own flush), so one pass empties it.
            dirty, self.dirty = self.dirty, []
            for proto in dirty:
                proto._flush()


_scopes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _ReadScope] = (
    weakref.WeakKeyDictionary()
)


def _scope(loop: asyncio.AbstractEventLoop) -> _ReadScope:
    scope = _scopes.get(loop)
    if scope is None:
        scope = _scopes[loop] = _ReadScope()
    return scope


def remote_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def remote_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_hostport(str(peer[0]), int(peer[1]))
    return str(peer)


def _no_poke(window_ns: int) -> None:
    """What a connection without a busy-poll window calls: nothing."""


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):  # a platform without TCP_NODELAY
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FramedProtocol(asyncio.Protocol):
    """What both ends share: decoder, encoder, coalesced writes, counters."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        self._loop = loop
        self._scope = _scope(loop)
        self._limits = limits
        self._decoder = FrameDecoder(limits.max_frame)
        self._encoder = FrameEncoder(limits.max_frame)
        self._transport: asyncio.Transport | None = None
        # Frames waiting for the end of the current read or loop iteration. The
        # bytearray is handed to transport.write() and replaced, never mutated after:
        # a transport may keep a reference to it (uvloop does) instead of copying.
        self._wbuf = bytearray()
        self._flush_scheduled = False  # a call_soon(_flush) is pending
        self._dirty = False  # in the read scope's list
        self._write_paused = False
        self._closing = False
        self._lost: asyncio.Future[None] = loop.create_future()
        # Busy polling after writes (hypercache.net.busypoll): the window asked for,
        # and the one in force in ns (0 unless the transport is a kernel socket).
        self._busy_poll = 0.0
        self._busy_ns = 0
        self._poke: Callable[[int], None] = _no_poke  # the loop poller's, once armed
        #: counters of this connection
        self.stats = NetStats()

    @property
    def busy_poll(self) -> float:
        """Seconds the loop stays awake after this connection writes; 0 = off.

        Only a connection over a kernel socket polls: over the in-process transport
        the setting is kept and does nothing.

        :raises ValueError: not a number of seconds in 0..``MAX_BUSY_POLL``.
        """
        return self._busy_poll

    @busy_poll.setter
    def busy_poll(self, seconds: float) -> None:
        try:
            self._busy_poll = check_window(seconds)
        except ValueError as exc:
            raise ValueError(f"busy_poll {exc}") from None
        self._arm_busy_poll()

    def _arm_busy_poll(self) -> None:
        transport = self._transport
        on_socket = transport is not None and transport.get_extra_info("socket") is not None
        self._busy_ns = round(self._busy_poll * 1e9) if on_socket else 0
        if self._busy_ns:
            self._poke = poller(self._loop).poke

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements the interface without subclassing
        # asyncio.Transport, so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)
        _set_nodelay(transport)
        if self._busy_poll:
            self._arm_busy_poll()

    def pause_writing(self) -> None:
        self._write_paused = True
        self.stats.write_pauses += 1

    def resume_writing(self) -> None:
        self._write_paused = False

    # -- writing

    def _send(self, body: bytes) -> None:
        """Queue one frame (body without header) for the end of this read or iteration."""
        self.stats.frames_out += 1
        size = len(body)
        buf = self._wbuf
        buf += frame_header(size)
        if size >= LARGE_WRITE:
            # Don't copy a big body into the batch: write what is queued (ending
            # with this frame's header), then the body itself.
            self._flush()
            self._write(body)
            return
        buf += body
        if len(buf) >= LARGE_WRITE:
            # Many answers of one read: hand them to the transport now, so that a
            # peer that does not read pauses our reading (pause_writing) before the
            # rest of its requests are answered into memory.
            self._flush()
            return
        scope = self._scope
        if scope.depth:
            if not self._dirty:
                self._dirty = True
                scope.dirty.append(self)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        # Called by the read scope, by call_soon, or directly (close, large body);
        # a flush that finds the buffer empty (done by another of them) is a no-op.
        self._flush_scheduled = False
        self._dirty = False
        buf = self._wbuf
        if buf:
            self._wbuf = bytearray()
            self._write(buf)

    def _write(self, data: bytes | bytearray) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the peer is gone: nobody to answer
        stats = self.stats
        stats.bytes_out += len(data)
        stats.writes += 1
        transport.write(data)
        if self._busy_ns:
            # An answer, or the peer's next request, is due soon: don't sleep.
            self._poke(self._busy_ns)

    def abort(self) -> None:
        """Drop the connection at once, without flushing."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()
