"""Review findings: each test fails because of a genuine bug (see its docstring).

The cluster tests run nodes on the in-process transport in one event loop (as
tests/test_coordinator.py does); the client test runs one real TCP node in the
test's loop (port 0, loopback). Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aio_helpers import run

from hypercache.cli.client import EXIT_USAGE
from hypercache.cli.client import main as cli_main
from hypercache.client import AsyncClient
from hypercache.cluster.config import DistConfig
from hypercache.cluster.coordinator import wall_ms
from hypercache.cluster.local import until
from hypercache.cluster.node import Node
from hypercache.errors import ProtocolError
from hypercache.net.inproc import InprocNetwork

FAST: dict[str, Any] = {
    "http": None,
    "heartbeat_interval": 0.05,
    "failure_timeout": 0.3,
    "seed_retry_interval": 0.05,
    "request_timeout": 1.0,
    "connect_timeout": 0.5,
    "partitions": 256,
}

# Small frames (valid: max_key + max_value + 4 KiB <= max_frame): a few entries of
# the largest value no longer fit in one frame together.
SMALL_FRAMES: dict[str, Any] = {"max_key": 64, "max_value": 8192, "max_frame": 16384}


def address(i: int) -> str:
    return f"127.0.20.{i + 1}:7400"


@contextlib.asynccontextmanager
async def cluster(size: int = 3, **overrides: Any) -> AsyncIterator[list[Node]]:
    net = InprocNetwork()
    nodes = [
        Node(
            DistConfig(
                node_id=f"n{i + 1}", bind=address(i), seeds=(address(0),), **{**FAST, **overrides}
            ),
            transport=net,
        )
        for i in range(size)
    ]
    try:
        for node in nodes:
            await node.start()
        await until(lambda: all(len(n.members()) == size for n in nodes), what="membership")
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


def local(node: Node, key: bytes) -> Any:
    assert node.coordinator is not None
    return node.coordinator.replica_get(key)


def key_owned_by(node: Node, owners: list[str], prefix: bytes = b"k") -> bytes:
    """A key whose owner list (primary first) is exactly ``owners``."""
    for i in range(100_000):
        key = prefix + str(i).encode()
        if node.ring.owners(key) == owners:
            return key
    raise AssertionError(f"no key owned by {owners}")


# ------------------------------------------------------------------ hinted handoff


def test_hint_replay_is_not_stuck_when_a_batch_exceeds_max_frame() -> None:
    """Hints are batched by count only (``hint_replay_batch``), never by bytes: a
    batch of large hints is over ``max_frame``, its R_PUT_MANY fails to encode
    (FrameTooLargeError), the batch is requeued at the front and the target backs
    off, forever. Every hint for that target (the small ones behind too) is stuck."""

    async def main() -> None:
        async with cluster(2, replication=2, **SMALL_FRAMES) as nodes:
            n1, n2 = nodes
            assert n1.handoff is not None and n1.coordinator is not None
            ts = n1.clock.now()
            tag = n1.clock.tag
            keys = [b"big1", b"big2", b"big3", b"small"]
            values = [b"x" * 8000, b"y" * 8000, b"w" * 8000, b"z"]
            for i, (key, value) in enumerate(zip(keys, values, strict=True)):
                n1.handoff.hint("n2", key, value, ts + i, tag, 0, False)
            # Each hint fits a frame on its own; all of them must reach n2.
            await until(
                lambda: all(local(n2, k) is not None for k in keys),
                timeout=3.0,
                what="hints delivered (each batch fails with FrameTooLargeError)",
            )

    run(main())


# -------------------------------------------------------------------- anti-entropy


def test_antientropy_push_respects_max_frame() -> None:
    """Anti-entropy pushes (R_PUT_MANY mode 1) are cut at BATCH_BYTES (4 MiB)
    whatever ``max_frame`` is; PULL answers honour ``max_frame // 2`` but pushes do
    not. With a smaller (valid) ``max_frame`` the push fails to encode, the sync
    with that peer errors out every round and the peer never gets the entries."""

    async def main() -> None:
        async with cluster(2, replication=2, **SMALL_FRAMES) as nodes:
            n1, n2 = nodes
            assert n1.coordinator is not None and n1.antientropy is not None
            # Entries only n1 holds, in partitions n1 leads with n2 (one per key).
            keys = [key_owned_by(n1, ["n1", "n2"], b"ae%d-" % i) for i in range(3)]
            for key in keys:
                n1.coordinator.replica_put(key, b"v" * 8000, n1.clock.now(), n1.clock.tag, 0, False)
            for _ in range(3):
                await n1.antientropy.run_round()
            assert n1.antientropy.stats.errors == 0
            assert all(local(n2, k) is not None for k in keys)

    run(main())


# ------------------------------------------------------------------------ versions


def test_delete_coordinator_advances_its_clock_past_r_del_answers() -> None:
    """docs/cluster.md: a node "advances its clock past every ts it receives, so its
    next write is newer than anything it has seen". A DELETE's R_DEL answers carry
    the owners' versions, but the coordinator never feeds them to its clock: when
    the owners hold a version ahead of the coordinator's clock, the delete answers
    ``existed=True`` yet loses, and so does every retry (the clock still has not
    moved), until the wall clock catches up."""

    async def main() -> None:
        async with cluster(3, replication=2) as nodes:
            n1, n2, n3 = nodes
            assert n1.coordinator is not None
            key = key_owned_by(n1, ["n2", "n3"])
            # An owner clock 3 s ahead (within max_clock_skew) wrote this version
            # (n1 has never seen it).
            ahead = (wall_ms() + 3_000) << 16
            for owner in (n2, n3):
                assert owner.coordinator is not None
                owner.coordinator.replica_put(key, b"v", ahead, owner.clock.tag, 0, False)
            assert await n1.coordinator.delete(key, "all") is True  # seen, lost
            # n1 has now seen `ahead`: its next delete must be newer and win.
            await n1.coordinator.delete(key, "all")
            for owner in (n2, n3):
                entry = local(owner, key)
                assert entry is not None and entry[4] is True, entry

    run(main())


# -------------------------------------------------------------------------- client


def test_get_many_keys_the_result_by_every_key_passed() -> None:
    """docs/client.md: get_many returns "{key: value} of the hits, keyed by the keys
    you passed", and ``"k"`` and ``b"k"`` are the same entry. Passing both, the
    result has only the last of them: the wire-key -> original-key map keeps one."""

    async def main() -> None:
        node = Node(DistConfig(node_id="solo", bind="127.0.0.1:0", **FAST))
        await node.start()
        try:
            async with AsyncClient(node.address) as client:
                await client.set("k", 1)
                got = await client.get_many(["k", b"k"])
                assert got == {"k": 1, b"k": 1}
        finally:
            await node.stop()

    run(main())


# ----------------------------------------------------------------------------- CLI


def test_cli_key_not_encodable_is_a_usage_error_not_a_traceback() -> None:
    """``hypercache get $'\\xff'`` (argv decoded with surrogateescape) raises
    UnicodeEncodeError out of main(): a traceback and exit status 1, which the
    docs reserve for "get found no value". Expected: exit 2 (usage error)."""
    assert cli_main(["get", "\udcff", "--seeds", "127.0.0.1:1"], env={}) == EXIT_USAGE


# ------------------------------------------------------------------ malformed input


def test_r_put_many_out_of_range_expiry_is_refused_whole_batch() -> None:
    """docs/cluster.md: R_PUT_MANY "checks the whole batch before applying any
    entry"; a payload of the wrong shape is a ProtocolError. ``_check_r_put``
    bounds ``ts`` and ``origin`` but not ``expire_at_ms``: an entry with
    ``expire_at >= 2**63`` passes the check, the batch's earlier entries are
    applied, then the store raises OverflowError (sent as ServerError and logged
    as a handler crash)."""

    async def main() -> None:
        async with cluster(1) as nodes:
            (n1,) = nodes
            assert n1.coordinator is not None
            ts = n1.clock.now()
            good = [b"first", b"v", ts, 1, 0, False]
            bad = [b"second", b"v", ts, 1, 2**64 - 1, False]
            error: BaseException | None = None
            try:
                n1.coordinator.handle_r_put_many([[good, bad], 0])
            except Exception as exc:
                error = exc
            assert isinstance(error, ProtocolError), repr(error)
            assert local(n1, b"first") is None  # nothing applied from a refused batch

    run(main())
