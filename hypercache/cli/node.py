"""``hypercache-node``: run one cluster node in the foreground.

Configuration comes from defaults, ``--config FILE.toml`` (or ``$HYPERCACHE_CONFIG``),
``HYPERCACHE_*`` environment variables and flags (see :mod:`hypercache.cli.args`); an
invalid value prints ``hypercache-node: error: <field>: <message>`` and exits 2.

When the node is ready it prints one line to stdout::

    hypercache-node ready: node_id=127.0.0.1:7400 data=127.0.0.1:7400 http=127.0.0.1:7480

SIGTERM makes it leave the cluster first (``leave_on_stop``, on by default): it
hands its partitions over to their new owners, for at most ``leave_timeout``
seconds, then stops; a second SIGTERM stops it at once. SIGINT stops it without
leaving (its peers then see it dead, and it stays an owner until it is back or
removed). Either way the exit status is 0. A node asked to leave (``LEAVE``,
``hypercache leave``, ``POST /cluster/leave``) exits once it has. SIGHUP reloads its
TLS files and tokens. Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import sys

from hypercache._version import __version__
from hypercache.cli.args import PROG, node_config_from_argv
from hypercache.cluster.config import DistConfig
from hypercache.errors import ConfigError
from hypercache.observe.logs import setup_logging
from hypercache.observe.tracing import configure_tracing

__all__ = ["READY_PREFIX", "main", "run"]

#: Start of the line printed when the node is ready (scripts and tests wait for it).
READY_PREFIX = f"{PROG} ready:"

_log = logging.getLogger("hypercache.cli")

#: Allocations (minus deallocations) between two young-generation collections. The
#: default (700) makes the collector run every few hundred requests: each request
#: allocates tens of short-lived containers (decoded frames, payload lists, closures),
#: and each young collection also walks whatever survived since the last one. Those
#: objects die by reference counting long before a collection would matter, so a much
#: higher threshold costs little memory (a few MB at most) and takes the collector off
#: the latency path. The older generations are collected after 20 collections of the
#: one below (default 10): with gen 0 this rare, that is still every million
#: allocations or so for gen 1, and the rarer full walks matter more than the memory.
GC_THRESHOLDS = (50_000, 20, 20)


async def run(config: DistConfig) -> None:
    """Run a node until a signal (see the module docstring), or until it has left
    the cluster when asked to, then stop it."""
    from hypercache.cluster.node import Node

    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    node = Node(config)
    # SIGHUP: read the TLS certificate, key, CA and tokens files again.
    loop.add_signal_handler(signal.SIGHUP, node.security.reload)
    try:
        await node.start()
        _tune_gc()
        print(
            f"{READY_PREFIX} node_id={node.node_id} data={node.address} "
            f"http={node.http_address or 'off'}",
            flush=True,
        )
        received = loop.create_task(signals.get())
        stopped = loop.create_task(node.wait_stopped())
        await asyncio.wait((received, stopped), return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if received.done():
            sig = received.result()
            leave = sig is signal.SIGTERM and config.leave_on_stop
            _log.info("%s received, %s", sig.name, "leaving the cluster" if leave else "stopping")
            if leave:
                # A second signal cuts the hand-over short.
                leaving = loop.create_task(node.stop(leave=True))
                again = loop.create_task(signals.get())
                await asyncio.wait((leaving, again), return_when=asyncio.FIRST_COMPLETED)
                if again.done():
                    _log.warning("%s received again, stopping now", again.result().name)
                again.cancel()
        else:
            received.cancel()
    finally:
        await node.stop()
        from hypercache.observe.tracing import shutdown_tracing

        shutdown_tracing()  # exports the spans still buffered
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def _tune_gc() -> None:
    """Keep the garbage collector off the request path of a long-running node.

    ``gc.freeze()`` moves everything allocated so far (modules, the node's objects,
    the store's tables) to a permanent generation that collections never walk again:
    a node keeps a large, stable heap, and walking it in every full collection would
    stall requests for milliseconds. Called once the node has started, so that what
    start-up built is frozen. Cycles made later are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _run_loop(config: DistConfig) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - non-Linux without uvloop
        asyncio.run(run(config))
    else:
        uvloop.run(run(config))


def main() -> None:
    """Entry point of the ``hypercache-node`` console script."""
    config = node_config_from_argv(sys.argv[1:], os.environ)
    setup_logging(level=config.log_level, log_format=config.log_format, node_id=config.node_id)
    try:
        configure_tracing(enabled=config.tracing, node_id=config.node_id, version=__version__)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from hypercache.cluster.node import ListenError

    try:
        _run_loop(config)
    except ListenError as exc:
        hint = " (is another node running there?)" if exc.errno == errno.EADDRINUSE else ""
        print(
            f"{PROG}: error: {exc.strerror}{hint}; choose another with --{exc.setting}",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except ConfigError as exc:  # a TLS or tokens file that cannot be loaded
        print(f"{PROG}: error: {exc.field}: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # a signal before the handlers were installed
        pass


if __name__ == "__main__":
    main()
