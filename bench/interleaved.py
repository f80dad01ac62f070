"""HyperCache(lru) against cachebox.LRUCache, interleaved in one process.

At 100,000 keys the pytest-benchmark rows move a lot between runs on a shared
machine, because each cache is timed in its own stretch of time. Here the two
caches take turns, sweep by sweep, over the same shuffled keys, and the ratio is
the median of the per-turn ratios, so slow stretches hit both sides alike.

Run: ``python -m bench.interleaved [--keys N]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import cachebox

from hypercache import HyperCache


def timed(op: Callable[[Any], Any], keys: Sequence[str]) -> float:
    start = time.perf_counter_ns()
    for k in keys:
        op(k)
    return (time.perf_counter_ns() - start) / len(keys)


def timed_set(op: Callable[[Any, Any], Any], keys: Sequence[str]) -> float:
    start = time.perf_counter_ns()
    for k in keys:
        op(k, k)
    return (time.perf_counter_ns() - start) / len(keys)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--turns", type=int, default=25)
    args = parser.parse_args(argv)
    n = args.keys
    keys = [f"key:{i}" for i in range(n)]
    random.Random(1).shuffle(keys)
    batch = 20_000
    fresh = [f"new:{i}" for i in range(batch * args.turns * 2)]
    for k in fresh:
        hash(k)  # hash them once, outside the timed loops
    ours: HyperCache[str, str] = HyperCache(n)
    peer: cachebox.LRUCache[str, str] = cachebox.LRUCache(n)
    for k in keys:
        ours[k] = k
        peer[k] = k
    get_ratios = [timed(ours.get, keys) / timed(peer.get, keys) for _ in range(args.turns)]
    set_ratios = []
    for turn in range(args.turns):
        mine = fresh[2 * turn * batch : (2 * turn + 1) * batch]
        theirs = fresh[(2 * turn + 1) * batch : (2 * turn + 2) * batch]
        set_ratios.append(timed_set(ours.set, mine) / timed_set(peer.insert, theirs))
    print(f"keys={n:,} turns={args.turns} (HyperCache / cachebox, median of per-turn ratios)")
    print(f"get-hit  {statistics.median(get_ratios):.3f}")
    print(f"set-new  {statistics.median(set_ratios):.3f}")


if __name__ == "__main__":
    main()
