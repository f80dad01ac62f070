"""Write notifications (``WATCH``): the client connections that watch key prefixes
on this node, and the frames that tell them of each write this node applies.

A client connection sends ``WATCH {"prefixes": [bin, ...]}``; from then on, every
version this node's store *applies* to a key under one of those prefixes (whatever
brought it: a write it coordinates, a replica's ``R_PUT``/``R_DEL``, a hint replay,
an anti-entropy repair, a rebalancing stream; :meth:`Watchers.changed` is called
from :meth:`hypercache.cluster.replica.Replica.put`, the one place versions are
applied) is pushed to that connection as ``[RESPONSE, 0, WATCH, {"keys": [...]}]``,
the keys of one event-loop iteration in one frame. A ``FLUSH`` of the node pushes
``{"flush": true}``. Nothing waits on a watcher: when the bytes queued for one
connection (its pending keys and what its socket has not taken) pass
``watch_max_pending_bytes``, its pending keys are dropped and it gets
``{"overflow": true}`` once its queue has drained to half the cap: the client then
drops everything it holds, and nothing changed in between goes unsaid (the frame
comes after every dropped key). A watcher costs a ``bytes.startswith`` per write
applied; the count of watchers is capped (``watch_max_watchers``), and so are the
prefixes of one (``watch_max_prefixes``). Each cap that bites is counted.

Why not collapse the pushes of one write from its several owners: a reader that
refilled its copy between the first owner's push and the second's may have read a
lagging owner; the second push drops that stale copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

from prometheus_client.core import CounterMetricFamily, Metric

from hypercache.cluster.metrics import counter, gauge
from hypercache.errors import ConfigError, NodeUnavailableError, ProtocolError
from hypercache.net.protocol import Op

__all__ = ["PUSH_BATCH_BYTES", "Watchers"]

_WATCH: Final = int(Op.WATCH)
#: Keys of one push frame at most (bytes of key): a larger batch is sent at once.
PUSH_BATCH_BYTES: Final = 256 * 1024
# msgpack bytes a key costs in a push besides its own (its bin header).
_KEY_OVERHEAD: Final = 5
# Seconds between two looks at an overflowed watcher's queue.
_DRAIN_CHECK: Final = 0.02


class Sink(Protocol):
    """What a watcher pushes to: a server connection (``ServerProtocol``)."""

    on_lost: list[Callable[[], None]]

    def push(self, op: int, payload: Any) -> None: ...

    @property
    def pending_bytes(self) -> int: ...

    @property
    def closing(self) -> bool: ...


class _Watcher:
    __slots__ = ("keys", "overflowed", "prefixes", "scheduled", "sink", "size")

    def __init__(self, sink: Sink, prefixes: tuple[bytes, ...]) -> None:
        self.sink = sink
        self.prefixes = prefixes
        self.keys: dict[bytes, None] = {}
        self.size = 0
        self.scheduled = False
        self.overflowed = False


class Watchers:
    """This node's watching connections (see the module docstring).

    :param max_watchers: connections watching at once.
    :param max_prefixes: prefixes of one connection.
    :param max_pending_bytes: bytes queued for one connection before it overflows.
    :param max_key: the node's key limit (a prefix is no longer than a key).
    """

    def __init__(
        self, *, max_watchers: int, max_prefixes: int, max_pending_bytes: int, max_key: int
    ) -> None:
        self.max_watchers = max_watchers
        self.max_prefixes = max_prefixes
        self.max_pending_bytes = max_pending_bytes
        self.max_key = max_key
        self._by_sink: dict[int, _Watcher] = {}
        # What changed() walks: rebuilt on each (un)watch, never mutated in place.
        self._list: tuple[_Watcher, ...] = ()
        #: whether any connection watches (the store's hot path checks it first)
        self.active = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.refused = {"watchers": 0, "prefixes": 0}
        self.overflows = 0
        self.pushes = 0
        self.pushed_keys = 0

    def __len__(self) -> int:
        return len(self._list)

    # ------------------------------------------------------------------ requests

    def watch(self, sink: Sink, payload: Any) -> dict[str, Any]:
        """``WATCH {"prefixes": [bin, ...]}`` from ``sink``'s connection: watch those
        prefixes from now on (replacing what it watched; ``[]`` stops watching).

        :raises ProtocolError: the payload is malformed.
        :raises ConfigError: (field ``prefixes``) more than ``watch_max_prefixes``.
        :raises NodeUnavailableError: ``watch_max_watchers`` connections watch already.
        """
        if type(payload) is not dict or type(payload.get("prefixes")) is not list:
            raise ProtocolError('WATCH payload must be {"prefixes": [bin, ...]}')
        raw = payload["prefixes"]
        for prefix in raw:
            if type(prefix) is not bytes or len(prefix) > self.max_key:
                raise ProtocolError(
                    f"WATCH prefix must be bin of at most max_key bytes: {prefix!r:.60}"
                )
        if len(raw) > self.max_prefixes:
            self.refused["prefixes"] += 1
            raise ConfigError(
                "prefixes", f"{len(raw)} prefixes, at most {self.max_prefixes} (watch_max_prefixes)"
            )
        prefixes = tuple(dict.fromkeys(raw))
        ident = id(sink)
        watcher = self._by_sink.get(ident)
        if not prefixes:
            if watcher is not None:
                self._forget(ident)
            return {"watching": 0}
        if watcher is None:
            if len(self._by_sink) >= self.max_watchers:
                self.refused["watchers"] += 1
                raise NodeUnavailableError(
                    f"{len(self._by_sink)} connections watch this node (watch_max_watchers)"
                )
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            watcher = self._by_sink[ident] = _Watcher(sink, prefixes)
            sink.on_lost.append(lambda: self._forget(ident))
        else:
            watcher.prefixes = prefixes
        self._rebuild()
        return {"watching": len(prefixes), "max_pending_bytes": self.max_pending_bytes}

    def _forget(self, ident: int) -> None:
        if self._by_sink.pop(ident, None) is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        self._list = tuple(self._by_sink.values())
        self.active = bool(self._list)

    # ------------------------------------------------------------------ writes

    def changed(self, key: bytes) -> None:
        """A version of ``key`` was applied to this node's store: tell its watchers."""
        for watcher in self._list:
            if not watcher.overflowed and key.startswith(watcher.prefixes):
                self._queue(watcher, key)

    def flushed(self) -> None:
        """This node dropped everything (``FLUSH``): every watcher forgets all."""
        for watcher in self._list:
            watcher.keys.clear()
            watcher.size = 0
            if not watcher.overflowed and not watcher.sink.closing:
                watcher.sink.push(_WATCH, {"flush": True})
                self.pushes += 1

    def _queue(self, watcher: _Watcher, key: bytes) -> None:
        keys = watcher.keys
        if key in keys:
            return
        size = watcher.size + len(key) + _KEY_OVERHEAD
        sink = watcher.sink
        if size + sink.pending_bytes > self.max_pending_bytes:
            self._overflow(watcher)
            return
        keys[key] = None
        watcher.size = size
        if size >= PUSH_BATCH_BYTES:
            self._send(watcher)
        elif not watcher.scheduled and self._loop is not None:
            watcher.scheduled = True
            self._loop.call_soon(self._send, watcher)

    def _send(self, watcher: _Watcher) -> None:
        watcher.scheduled = False
        keys = watcher.keys
        if not keys:
            return
        watcher.keys = {}
        watcher.size = 0
        if watcher.sink.closing:
            return
        watcher.sink.push(_WATCH, {"keys": list(keys)})
        self.pushes += 1
        self.pushed_keys += len(keys)

    def _overflow(self, watcher: _Watcher) -> None:
        # What was queued and what comes until the queue drains is not sent: the
        # "overflow" frame sent after it tells the client to drop everything.
        watcher.overflowed = True
        watcher.keys.clear()
        watcher.size = 0
        self.overflows += 1
        if self._loop is not None:
            self._loop.call_later(_DRAIN_CHECK, self._drain, watcher)

    def _drain(self, watcher: _Watcher) -> None:
        sink = watcher.sink
        if sink.closing or self._by_sink.get(id(sink)) is not watcher:
            return
        if sink.pending_bytes > self.max_pending_bytes // 2:
            assert self._loop is not None
            self._loop.call_later(_DRAIN_CHECK, self._drain, watcher)
            return
        watcher.overflowed = False
        sink.push(_WATCH, {"overflow": True})
        self.pushes += 1

    # ------------------------------------------------------------------ metrics

    def collect(self) -> Iterator[Metric]:
        """The ``hypercache_dist_watch*`` families (a metrics source of the node)."""
        yield gauge("hypercache_dist_watchers", "Client connections watching writes.", len(self))
        refused = CounterMetricFamily(
            "hypercache_dist_watch_refused",
            "WATCH requests refused by a cap (watchers per node, prefixes per connection).",
            labels=["cap"],
        )
        for cap, n in self.refused.items():
            refused.add_metric([cap], n)
        yield refused
        yield counter(
            "hypercache_dist_watch_overflows",
            "Watching connections whose queued notifications passed watch_max_pending_bytes.",
            self.overflows,
        )
        yield counter(
            "hypercache_dist_watch_pushes", "Notification frames pushed to watchers.", self.pushes
        )
        yield counter(
            "hypercache_dist_watch_pushed_keys",
            "Keys pushed to watchers in notification frames.",
            self.pushed_keys,
        )
