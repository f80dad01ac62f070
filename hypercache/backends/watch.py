"""Write notifications from a hypercache cluster, client side: a ``WATCH`` link to
every node, each on a thread of its own, dialled again when it breaks.

A write reaches at least one of its key's owners, and any node may be one, so
:class:`ClusterWatch` watches every node the cluster's table names (fetched every
``refresh`` seconds: nodes that join are watched within that) and counts as
*connected* only while every one of those links is up. Each link sends ``WATCH
{"prefixes": [prefix]}`` once connected, then reads the node's pushes
(``{"keys": [...]}``; ``{"overflow": true}`` or ``{"flush": true}``: drop
everything) and pings every ``ping_interval`` seconds, so that a silent, half-open
link is not trusted for longer than that plus the client's timeout. The callback is
called as ``callback(keys, connected)``: ``keys`` the changed keys, or ``None`` for
"anything may have changed" (a link came up, went down, overflowed).

A node that the cluster still lists but that cannot be reached (dead, partitioned)
keeps the watch disconnected: a tier in front then trusts nothing it holds until the
node is back, or is removed from the cluster.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from hypercache.backends.base import Invalidation, InvalidationCallback
from hypercache.net.blocking import BlockingConnection
from hypercache.net.protocol import Op

__all__ = ["DEFAULT_PING_INTERVAL", "DEFAULT_REFRESH", "ClusterWatch", "NodeWatch"]

#: Seconds between two pings of an idle watch link.
DEFAULT_PING_INTERVAL: Final = 1.0
#: Seconds between two fetches of the node list.
DEFAULT_REFRESH: Final = 1.0

_WATCH: Final = int(Op.WATCH)
_TOPOLOGY: Final = int(Op.TOPOLOGY)
_PING: Final = int(Op.PING)
# Longest read of a link's socket: how soon a link sees close() and a ping is due.
_READ_SLICE: Final = 0.2

Dial = Callable[[str], BlockingConnection]


class NodeWatch:
    """The watch link to one node (see the module docstring)."""

    def __init__(
        self,
        address: str,
        dial: Dial,
        prefixes: list[bytes],
        on_keys: Callable[[list[bytes] | None], None],
        on_state: Callable[[], None],
        ping_interval: float,
    ) -> None:
        self.address = address
        self._dial = dial
        self._prefixes = prefixes
        self._on_keys = on_keys
        self._on_state = on_state
        self._ping_interval = ping_interval
        self._stop = threading.Event()
        self._conn: BlockingConnection | None = None
        self.connected = False
        #: times the link was lost after it had been up
        self.reconnects = 0
        #: notification frames received, and overflows among them
        self.pushes = 0
        self.overflows = 0
        self._thread = threading.Thread(
            target=self._run, name=f"hypercache-watch-{address}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def join(self, timeout: float) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _pushed(self, op: int, payload: Any) -> None:
        if op != _WATCH or self._stop.is_set():
            return
        self.pushes += 1
        keys = payload.get("keys") if type(payload) is dict else None
        if type(keys) is list:
            self._on_keys([k for k in keys if type(k) is bytes])
        else:  # overflow, a node's flush, or a frame we cannot read: trust nothing
            self.overflows += 1
            self._on_keys(None)

    def _run(self) -> None:
        delay = 0.05
        stop = self._stop
        while not stop.is_set():
            conn: BlockingConnection | None = None
            try:
                conn = self._conn = self._dial(self.address)
                if stop.is_set():
                    break
                conn.on_push = self._pushed
                conn.request(_WATCH, {"prefixes": self._prefixes})
                self.connected = True
                delay = 0.05
                # Anything written while we were not listening is unknown: say so.
                self._on_state()
                self._listen(conn)
            except Exception:
                pass
            finally:
                if self.connected:
                    self.connected = False
                    self.reconnects += 1
                    if not stop.is_set():
                        self._on_state()
                if conn is not None:
                    conn.close()
            stop.wait(delay)
            delay = min(delay * 2, 1.0)

    def _listen(self, conn: BlockingConnection) -> None:
        last = time.monotonic()
        stop = self._stop
        while not stop.is_set():
            conn.read_pushes(min(_READ_SLICE, self._ping_interval))
            if time.monotonic() - last >= self._ping_interval:
                # No answer within the connection's timeout breaks the link (and
                # pushes that come before the answer are handed on meanwhile).
                conn.request(_PING, None)
                last = time.monotonic()


class ClusterWatch(Invalidation):
    """Watch links to every node of a cluster (see the module docstring).

    :param seeds: where to ask for the node list first.
    :param dial: opens a handshaken connection to an address.
    :param prefix: the key prefix watched (a backend's namespace; ``b""``: all).
    :param callback: ``callback(keys, connected)``, from the links' threads.
    """

    def __init__(
        self,
        seeds: Iterable[str],
        dial: Dial,
        prefix: bytes,
        callback: InvalidationCallback,
        *,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        refresh: float = DEFAULT_REFRESH,
    ) -> None:
        self._seeds = list(seeds)
        self._dial = dial
        self._prefixes = [prefix]
        self._callback = callback
        self._ping_interval = ping_interval
        self._refresh = refresh
        self._links: dict[str, NodeWatch] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._topo_conn: BlockingConnection | None = None
        # The first node list is fetched by the thread too: a cluster that cannot be
        # reached does not hold up the cache's constructor.
        self._thread = threading.Thread(
            target=self._supervise, name="hypercache-watch-cluster", daemon=True
        )
        self._thread.start()

    @property
    def connected(self) -> bool:
        with self._lock:
            links = list(self._links.values())
        return bool(links) and all(link.connected for link in links)

    @property
    def nodes(self) -> list[str]:
        """The addresses watched now."""
        with self._lock:
            return list(self._links)

    @property
    def reconnects(self) -> int:
        with self._lock:
            return sum(link.reconnects for link in self._links.values())

    @property
    def overflows(self) -> int:
        with self._lock:
            return sum(link.overflows for link in self._links.values())

    def _on_keys(self, keys: list[bytes] | None) -> None:
        if not self._closed:
            self._callback(keys, self.connected)

    def _on_state(self) -> None:
        if not self._closed:
            self._callback(None, self.connected)

    def _addresses(self) -> list[str] | None:
        """The node list from a node (the one asked last time first); None when no
        node answers."""
        with self._lock:
            known = list(self._links)
        for address in dict.fromkeys([*known, *self._seeds]):
            conn = self._topo_conn
            try:
                if conn is None or conn.closed or conn.address != address:
                    if conn is not None:
                        conn.close()
                    conn = self._topo_conn = None
                    conn = self._topo_conn = self._dial(address)
                answer = conn.request(_TOPOLOGY, None)
                return [str(item[1]) for item in answer["nodes"]]
            except Exception:
                if conn is not None:
                    conn.close()
                self._topo_conn = None
                if self._stop.is_set():
                    return None
        return None

    def _sync_nodes(self) -> None:
        addresses = self._addresses()
        if addresses is None:
            if not self._links:
                # No node answers yet: watch the seeds (each link keeps dialling).
                addresses = self._seeds
            else:
                return
        wanted = set(addresses)
        gone: list[NodeWatch] = []
        added = False
        with self._lock:
            if self._stop.is_set():
                return
            for address in list(self._links):
                if address not in wanted:
                    gone.append(self._links.pop(address))
            for address in addresses:
                if address not in self._links:
                    self._links[address] = NodeWatch(
                        address,
                        self._dial,
                        self._prefixes,
                        self._on_keys,
                        self._on_state,
                        self._ping_interval,
                    )
                    added = True
        for link in gone:
            link.close()
        if added or gone:
            self._on_state()

    def _supervise(self) -> None:
        self._sync_nodes()
        while not self._stop.wait(self._refresh):
            self._sync_nodes()

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            link.close()
        for link in links:
            link.join(5)
        conn = self._topo_conn
        if conn is not None:
            conn.close()
