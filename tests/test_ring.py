"""Ring: placement determinism, balance, minimal movement, table round trip, arguments.

Run as a script to print the balance table of docs/ring.md::

    .venv/bin/python tests/test_ring.py [vnodes ...] [--random N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import uuid

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from hypercache._core.ring import DEFAULT_PARTITIONS, DEFAULT_VNODES, Ring
from hypercache.errors import ConfigError

BALANCE_LIMIT = 0.10


def named_ids(n: int) -> list[str]:
    return [f"node-{i}" for i in range(1, n + 1)]


def uuid_ids(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def deviation(ring: Ring) -> tuple[float, float]:
    """Max |load - ideal| / ideal over nodes, for primaries and for all owned replicas."""
    n = len(ring.nodes)
    p = ring.partitions
    width = min(ring.replication, n)
    loads = ring.load().values()
    prim = max(abs(v["primary"] - p / n) / (p / n) for v in loads)
    owned = max(abs(v["owned"] - p * width / n) / (p * width / n) for v in loads)
    return prim, owned


def table_digest(ring: Ring) -> str:
    return xxhash.xxh3_64_hexdigest(json.dumps([list(ring.nodes), ring.table()]).encode())


# -- structure -------------------------------------------------------------------


def test_owner_rows_distinct_and_sized() -> None:
    for n, r in [(1, 3), (2, 3), (3, 3), (5, 3), (5, 1), (7, 2)]:
        ring = Ring(named_ids(n), vnodes=64, partitions=256, replication=r)
        table = ring.table()
        assert len(table) == 256
        for row in table:
            assert len(row) == min(r, n)
            assert len(set(row)) == len(row)
            assert all(0 <= i < n for i in row)
        assert ring.replication == r
        assert len(ring) == n


def test_owners_match_table_and_partition_hash() -> None:
    ring = Ring(named_ids(6), partitions=1024)
    table = ring.table()
    for i in range(500):
        key = f"key-{i}".encode()
        p = ring.partition_of(key)
        assert p == xxhash.xxh3_64_intdigest(key) >> (64 - 10)
        owners = ring.owners(key)
        assert owners == [ring.nodes[j] for j in table[p]]
        assert owners == ring.partition_owners(p)
        assert owners[0] == ring.primary(p)


def test_single_partition_and_single_node() -> None:
    ring = Ring(["solo"], vnodes=1, partitions=1, replication=3)
    assert ring.partition_of(b"anything") == 0
    assert ring.owners(b"x") == ["solo"]
    assert ring.table() == [[0]]


def test_walk_starts_at_partition_midpoint() -> None:
    # Independent model of the owner-set rule: first `width` distinct nodes on
    # the sorted token ring at or after the midpoint of the partition's range.
    ids = ["a", "b", "c", "d"]
    vnodes, partitions, repl = 5, 64, 2
    ring = Ring(ids, vnodes=vnodes, partitions=partitions, replication=repl)
    tokens = sorted(
        (xxhash.xxh3_64_intdigest(f"{nid}#{i}".encode()), j)
        for j, nid in enumerate(sorted(ids))
        for i in range(vnodes)
    )
    for p, row in enumerate(ring.table()):
        point = (p << 58) + (1 << 57)
        start = next((k for k, (t, _) in enumerate(tokens) if t >= point), 0)
        want: list[int] = []
        k = start
        while len(want) < repl:
            node = tokens[k % len(tokens)][1]
            if node not in want:
                want.append(node)
            k += 1
        assert set(row) == set(want), p


def test_primary_is_first_owner_and_rest_follow_walk_order() -> None:
    plain = Ring(named_ids(5), vnodes=32, partitions=512, replication=1)
    full = Ring(named_ids(5), vnodes=32, partitions=512, replication=3)
    for row1, row3 in zip(plain.table(), full.table(), strict=True):
        # replication 1 is the bare walk; its node is in the owner set of replication 3
        assert row1[0] in row3


# -- determinism -------------------------------------------------------------------


def test_same_table_whatever_the_input_order() -> None:
    ids = uuid_ids(7, seed=5)
    a = Ring(ids)
    b = Ring(list(reversed(ids)))
    c = Ring(sorted(ids, key=lambda s: s[::-1]))
    assert a.nodes == tuple(sorted(ids))
    assert a.table() == b.table() == c.table()


def test_same_table_in_another_process() -> None:
    ids = uuid_ids(5, seed=9) + named_ids(3)
    ring = Ring(ids, partitions=2048)
    code = (
        "import json, sys, xxhash\n"
        "from hypercache._core.ring import Ring\n"
        "ids = json.loads(sys.argv[1])\n"
        "r = Ring(ids, partitions=2048)\n"
        "print(xxhash.xxh3_64_hexdigest(json.dumps([list(r.nodes), r.table()]).encode()))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(list(reversed(ids)))],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == table_digest(ring)


# -- balance -----------------------------------------------------------------------


@pytest.mark.parametrize("n", range(3, 11))
@pytest.mark.parametrize("ids", ["named", "uuid"])
def test_balance_under_ten_percent_at_defaults(n: int, ids: str) -> None:
    node_ids = named_ids(n) if ids == "named" else uuid_ids(n, seed=n)
    ring = Ring(node_ids)
    assert ring.vnodes == DEFAULT_VNODES
    assert ring.partitions == DEFAULT_PARTITIONS
    prim, owned = deviation(ring)
    assert prim < BALANCE_LIMIT
    assert owned < BALANCE_LIMIT


def test_primaries_are_exactly_balanced() -> None:
    for n in range(2, 11):
        ring = Ring(uuid_ids(n, seed=100 + n))
        counts = sorted(v["primary"] for v in ring.load().values())
        lo = ring.partitions // n
        assert counts[0] >= lo
        assert counts[-1] <= lo + 1
        assert sum(counts) == ring.partitions


def test_load_counts_add_up() -> None:
    ring = Ring(named_ids(5), vnodes=128, partitions=1024, replication=3)
    load = ring.load()
    assert set(load) == set(ring.nodes)
    assert sum(v["primary"] for v in load.values()) == 1024
    assert sum(v["owned"] for v in load.values()) == 3 * 1024
    for v in load.values():
        assert v["owned"] == v["primary"] + v["replica"]
    for node in ring.nodes:
        assert len(ring.node_partitions(node)) == load[node]["owned"]


# -- movement ----------------------------------------------------------------------


def check_growth(old: Ring, new: Ring, added: str) -> int:
    """Owner sets may only gain ``added`` (replacing one old owner); returns how
    many partitions changed."""
    changed = 0
    for p in range(old.partitions):
        before = set(old.partition_owners(p))
        after = set(new.partition_owners(p))
        if before != after:
            changed += 1
            assert after - before == {added}, p
            assert len(before - after) == (1 if len(after) == len(before) else 0)
    assert changed == new.moved(old) == old.moved(new)
    return changed


@pytest.mark.parametrize("n", range(3, 10))
def test_adding_a_node_moves_about_one_in_n_plus_one(n: int) -> None:
    ids = named_ids(n)
    old = Ring(ids)
    new = Ring([*ids, f"node-{n + 1}"])
    changed = check_growth(old, new, f"node-{n + 1}")
    repl = min(3, n + 1)
    expected = old.partitions * repl / (n + 1)
    assert abs(changed - expected) / expected < 0.15
    # the newcomer takes its fair share of primaries, nothing more
    prim_new = new.load()[f"node-{n + 1}"]["primary"]
    assert prim_new in (old.partitions // (n + 1), old.partitions // (n + 1) + 1)


def test_removing_a_node_moves_only_its_partitions() -> None:
    ids = uuid_ids(6, seed=77)
    full = Ring(ids)
    gone = ids[2]
    less = Ring([i for i in ids if i != gone])
    for p in range(full.partitions):
        before = set(full.partition_owners(p))
        after = set(less.partition_owners(p))
        if gone in before:
            assert len(before - after) == 1
            assert before - after == {gone}
        else:
            assert before == after


@settings(max_examples=25, deadline=None)
@given(
    ids=st.lists(
        st.text(alphabet="abcdefgh-0123456789", min_size=1, max_size=8),
        min_size=1,
        max_size=7,
        unique=True,
    ),
    extra=st.text(alphabet="xyz#", min_size=1, max_size=4),
    vnodes=st.integers(1, 48),
    bits=st.integers(0, 9),
    repl=st.integers(1, 4),
)
def test_growth_never_moves_between_old_nodes(
    ids: list[str], extra: str, vnodes: int, bits: int, repl: int
) -> None:
    if extra in ids:
        return
    old = Ring(ids, vnodes=vnodes, partitions=1 << bits, replication=repl)
    new = Ring([*ids, extra], vnodes=vnodes, partitions=1 << bits, replication=repl)
    check_growth(old, new, extra)
    for row in new.table():
        assert len(set(row)) == len(row) == min(repl, len(ids) + 1)


# -- table download ------------------------------------------------------------------


def test_from_table_round_trip() -> None:
    ring = Ring(uuid_ids(5, seed=3), partitions=1024, replication=2)
    copy = Ring.from_table(ring.nodes, ring.table())
    assert copy.nodes == ring.nodes
    assert copy.table() == ring.table()
    assert copy.partitions == 1024
    assert copy.replication == 2
    assert copy.vnodes == 0
    assert copy.load() == ring.load()
    assert copy.moved(ring) == 0
    assert Ring.from_table(iter(ring.nodes), iter(ring.table())).table() == ring.table()
    for i in range(300):
        key = os.urandom(8) + bytes([i % 256])
        assert copy.owners(key) == ring.owners(key)
    # replication larger than the cluster: rows hold every node
    small = Ring(["a", "b"], vnodes=8, partitions=16, replication=3)
    again = Ring.from_table(small.nodes, small.table(), replication=3)
    assert again.replication == 3
    assert again.table() == small.table()


@pytest.mark.parametrize(
    ("nodes", "table", "kwargs"),
    [
        (["b", "a"], [[0], [1]], {}),  # unsorted
        (["a", "a"], [[0], [1]], {}),  # duplicate
        (["a", "b"], [[0], [1], [0]], {}),  # not a power of two
        (["a", "b"], [], {}),  # empty
        (["a", "b"], [[0], [2]], {}),  # index out of range
        (["a", "b"], [[0, 0], [1, 0]], {}),  # repeated owner
        (["a", "b"], [[0, 1], [1]], {}),  # ragged
        (["a", "b"], [[0], [1]], {"replication": 2}),  # width != min(repl, n)
        (["a", "b"], [[0], [True]], {}),  # bool is not an index
        (["a", "b"], [0, 1], {}),  # rows are not sequences
        ("ab", [[0], [1]], {}),  # a string is not a node list
    ],
)
def test_from_table_rejects_bad_tables(
    nodes: list[str], table: list[list[int]], kwargs: dict[str, int]
) -> None:
    with pytest.raises(ConfigError):
        Ring.from_table(nodes, table, **kwargs)


# -- arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        ([[]], {}, "node_ids"),
        (["node-1"], {}, "node_ids"),
        ([["a", "a"]], {}, "node_ids"),
        ([["a", ""]], {}, "node_ids"),
        ([["a", 3]], {}, "node_ids"),
        ([["a"]], {"vnodes": 0}, "vnodes"),
        ([["a"]], {"vnodes": 1.5}, "vnodes"),
        ([["a"]], {"replication": 0}, "replication"),
        ([["a"]], {"partitions": 1000}, "partitions"),
        ([["a"]], {"partitions": 0}, "partitions"),
        ([["a"]], {"partitions": 1 << 21}, "partitions"),
        ([["a"]], {"partitions": True}, "partitions"),
    ],
)
def test_bad_arguments_name_the_field(
    args: list[object], kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Ring(*args, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_lookup_errors() -> None:
    ring = Ring(["a", "b"], vnodes=4, partitions=8)
    with pytest.raises(IndexError):
        ring.partition_owners(8)
    with pytest.raises(IndexError):
        ring.primary(-1)
    with pytest.raises(TypeError):
        ring.owners("text")  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        ring.node_partitions("zzz")
    with pytest.raises(ValueError):
        ring.moved(Ring(["a", "b"], vnodes=4, partitions=16))


# -- the measurement of docs/ring.md ---------------------------------------------------


def balance_table(vnodes: int) -> list[tuple[int, float, float, float, float]]:
    """Per cluster size: primary and owned deviation for node-i ids and for uuids."""
    rows = []
    for n in range(3, 11):
        named = deviation(Ring(named_ids(n), vnodes=vnodes))
        uuids = deviation(Ring(uuid_ids(n, seed=n), vnodes=vnodes))
        rows.append((n, named[0], named[1], uuids[0], uuids[1]))
    return rows


def random_sweep(vnodes: int, trials: int) -> tuple[float, float, float, int, int]:
    """Owned deviation over `trials` random uuid clusters of each size 3..10."""
    rng = random.Random(2024)
    devs = []
    for _ in range(trials):
        for n in range(3, 11):
            ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]
            devs.append(deviation(Ring(ids, vnodes=vnodes))[1])
    devs.sort()
    over = sum(d >= BALANCE_LIMIT for d in devs)
    return devs[len(devs) // 2], devs[int(len(devs) * 0.99)], devs[-1], over, len(devs)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="tests/test_ring.py", description="Print the ring's balance tables (docs/ring.md)."
    )
    parser.add_argument(
        "vnodes", nargs="*", type=int, help=f"vnode counts to tabulate (default {DEFAULT_VNODES})"
    )
    parser.add_argument(
        "--random", type=int, default=0, metavar="T", help="add T random-uuid clusters per size"
    )
    args = parser.parse_args(argv)
    trials = args.random
    for v in args.vnodes or [DEFAULT_VNODES]:
        print(f"\nvnodes={v} partitions={DEFAULT_PARTITIONS} replication=3")
        print("| nodes | node-i primary | node-i owned | uuid primary | uuid owned |")
        print("|------:|---------------:|-------------:|-------------:|-----------:|")
        for n, a, b, c, d in balance_table(v):
            print(f"| {n} | {a:.2%} | {b:.2%} | {c:.2%} | {d:.2%} |")
        if trials:
            med, p99, worst, over, total = random_sweep(v, trials)
            print(
                f"random uuids, {total} clusters: owned deviation median {med:.2%}, "
                f"p99 {p99:.2%}, max {worst:.2%}, >= 10%: {over}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
