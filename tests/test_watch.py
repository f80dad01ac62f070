"""The node's watch registry (hypercache/cluster/watch.py) against a fake connection:
prefix matching, one frame per loop iteration, the overflow rule (the frame comes
after every key it stands for), a node's flush, and the caps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from hypercache.cluster.watch import Watchers
from hypercache.errors import ConfigError, NodeUnavailableError, ProtocolError
from hypercache.net import Op

WATCH = int(Op.WATCH)


class FakeSink:
    def __init__(self) -> None:
        self.on_lost: list[Callable[[], None]] = []
        self.frames: list[Any] = []
        self.pending_bytes = 0
        self.closing = False

    def push(self, op: int, payload: Any) -> None:
        assert op == WATCH
        self.frames.append(payload)

    def lose(self) -> None:
        self.closing = True
        for callback in self.on_lost:
            callback()


def _watchers(**caps: int) -> Watchers:
    settings = {"max_watchers": 4, "max_prefixes": 3, "max_pending_bytes": 4096, "max_key": 64}
    settings.update(caps)
    return Watchers(**settings)


async def _turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_writes_under_a_prefix_come_in_one_frame_per_iteration() -> None:
    async def main() -> None:
        w = _watchers()
        sink = FakeSink()
        assert w.watch(sink, {"prefixes": [b"a:", b"b:"]})["watching"] == 2
        assert w.active
        for key in (b"a:1", b"z:1", b"b:2", b"a:1"):
            w.changed(key)
        assert sink.frames == []  # not before the iteration ends
        await _turn()
        assert sink.frames == [{"keys": [b"a:1", b"b:2"]}]
        w.changed(b"a:3")
        await _turn()
        assert sink.frames[-1] == {"keys": [b"a:3"]}
        assert (w.pushes, w.pushed_keys) == (2, 3)
        sink.lose()
        assert not w.active and len(w) == 0

    asyncio.run(main())


def test_an_overflow_drops_the_queue_and_says_so_once_drained() -> None:
    async def main() -> None:
        w = _watchers(max_pending_bytes=4096)
        sink = FakeSink()
        w.watch(sink, {"prefixes": [b""]})
        sink.pending_bytes = 4000  # the client does not read
        for i in range(50):
            w.changed(b"key%03d" % i)
        assert w.overflows == 1
        await asyncio.sleep(0.1)
        assert sink.frames == []  # still full: nothing, not even the overflow frame
        w.changed(b"late")  # dropped too: the overflow frame will cover it
        sink.pending_bytes = 0
        await asyncio.sleep(0.1)
        assert sink.frames == [{"overflow": True}]
        w.changed(b"after")
        await _turn()
        assert sink.frames[-1] == {"keys": [b"after"]}

    asyncio.run(main())


def test_a_node_flush_tells_every_watcher() -> None:
    async def main() -> None:
        w = _watchers()
        sinks = [FakeSink(), FakeSink()]
        for sink in sinks:
            w.watch(sink, {"prefixes": [b"p"]})
        w.changed(b"p1")
        w.flushed()
        await _turn()
        assert [s.frames for s in sinks] == [[{"flush": True}]] * 2

    asyncio.run(main())


def test_the_caps_and_bad_payloads_are_refused() -> None:
    async def main() -> None:
        w = _watchers(max_watchers=1, max_prefixes=2)
        first, second = FakeSink(), FakeSink()
        with pytest.raises(ConfigError, match="watch_max_prefixes"):
            w.watch(first, {"prefixes": [b"a", b"b", b"c"]})
        w.watch(first, {"prefixes": [b"a"]})
        w.watch(first, {"prefixes": [b"a", b"b"]})  # replaces, no second watcher
        with pytest.raises(NodeUnavailableError, match="watch_max_watchers"):
            w.watch(second, {"prefixes": [b"a"]})
        assert w.refused == {"watchers": 1, "prefixes": 1}
        bads: list[Any] = [
            None,
            [],
            {"prefixes": "a"},
            {"prefixes": ["a"]},
            {"prefixes": [b"x" * 65]},
        ]
        for bad in bads:
            with pytest.raises(ProtocolError):
                w.watch(second, bad)
        assert w.watch(first, {"prefixes": []}) == {"watching": 0}
        w.watch(second, {"prefixes": [b"a"]})
        assert len(w) == 1

    asyncio.run(main())


def test_every_path_that_applies_a_version_tells_the_watchers() -> None:
    """Replica.put is where replica writes, deletes, hint replays, repair pushes,
    anti-entropy and rebalancing streams apply versions: each one is heard, and a
    version that loses to a newer one is not."""
    from hypercache._core.hlc import HLC, make_ts, node_tag, wall_clock_ms
    from hypercache._core.vstore import VersionedStore
    from hypercache.cluster.metrics import DistStats
    from hypercache.cluster.replica import PUT_MANY_HINTS, PUT_MANY_REPAIR, Replica
    from hypercache.net.protocol import Limits

    store = VersionedStore(16)
    replica = Replica(
        store=store,
        clock=HLC(node_tag("n1"), max_skew_ms=5_000),
        limits=Limits(),
        stats=DistStats(),
    )
    heard: list[bytes] = []

    class Recorder:
        active = True

        def changed(self, key: bytes) -> None:
            heard.append(key)

    replica.watchers = Recorder()  # type: ignore[assignment]
    now = wall_clock_ms()

    def entry(key: bytes, ms: int, tomb: bool = False) -> list[Any]:
        return [key, b"" if tomb else b"v", make_ts(now + ms), 1, 0, tomb]

    replica.r_put(entry(b"r_put", 1))
    replica.r_del(entry(b"r_put", 2, tomb=True))
    replica.r_put_many([[entry(b"hint", 1)], PUT_MANY_HINTS])
    replica.r_put_many([[entry(b"repair", 1)], PUT_MANY_REPAIR])
    key, value, stamp, origin, expire_at, tomb = entry(b"antientropy", 1)
    replica.put(key, value, stamp, origin, expire_at, tomb, path="antientropy")
    replica.put_stream(store.partition_of(b"moved"), [entry(b"moved", 1)])
    assert heard == [b"r_put", b"r_put", b"hint", b"repair", b"antientropy", b"moved"]
    replica.r_put(entry(b"hint", 0))  # older than what is held: not applied
    assert heard[-1] == b"moved"
