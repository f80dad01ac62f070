"""Hit-ratio simulator for the eviction policies of ``hypercache._core``.

Drives a policy through its Python test drivers the way the cache core does
(a dict from key to slot, a free-slot list, ``_access`` on a hit; on a miss
``_miss``, then ``_evict`` until there is room, then ``_insert``;
``--insert-first`` evicts after the insert instead) and compares it with
theine (a W-TinyLFU cache in Rust) fed the same trace, both through theine's
public ``Cache`` and through its core alone (no lossy read buffer).

Traces are synthetic and seeded: Zipf(s) over a key universe, and the same
polluted by scans (runs of never-repeated sequential keys); optionally a Zipf
whose popularity drifts and an LRU-friendly reuse load::

    python bench/hitratio_sim.py                        # the default matrix
    python bench/hitratio_sim.py --requests 200000 --sizes 1,5 --policies tinylfu,lru
    python bench/hitratio_sim.py --traces drift,reuse --sizes 1,10
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from hypercache._core.arc import ARCPolicy
from hypercache._core.lfu import LFUPolicy
from hypercache._core.policy import ClockPolicy, FIFOPolicy, LRUPolicy
from hypercache._core.tinylfu import TinyLFUPolicy

POLICIES: dict[str, Callable[[int], Any]] = {
    "lru": LRUPolicy,
    "fifo": FIFOPolicy,
    "clock": ClockPolicy,
    "lfu": LFUPolicy,
    "arc": ARCPolicy,
    "tinylfu": TinyLFUPolicy,
}

_GOLDEN = 0x9E3779B1


def key_hash(key: int) -> int:
    """32-bit hash of an integer key: an odd multiplier is a bijection mod 2**32,
    so distinct keys below 2**32 never collide (policies mix it further)."""
    return (key * _GOLDEN) & 0xFFFFFFFF


# ---- traces -----------------------------------------------------------------


def zipf_cdf(universe: int, s: float) -> list[float]:
    """Cumulative weights of ranks 1..universe under Zipf(s), normalised to 1."""
    cdf = list(itertools.accumulate(1.0 / (k**s) for k in range(1, universe + 1)))
    total = cdf[-1]
    return [c / total for c in cdf]


def zipf_trace(requests: int, universe: int, s: float, seed: int) -> list[int]:
    """Keys in [0, universe), key k with probability proportional to 1/(k+1)**s."""
    cdf = zipf_cdf(universe, s)
    rnd = random.Random(seed).random
    last = universe - 1
    # bisect_left on a uniform draw inverts the CDF; min() guards rounding at 1.0.
    return [min(bisect.bisect_left(cdf, rnd()), last) for _ in range(requests)]


def scan_trace(
    requests: int,
    universe: int,
    s: float,
    seed: int,
    every: int,
    length: int,
) -> list[int]:
    """Zipf(s) interrupted after every ``every`` requests by a scan of ``length``
    fresh sequential keys (from ``universe`` up, each requested exactly once)."""
    base = zipf_trace(requests, universe, s, seed)
    out: list[int] = []
    fresh = universe
    i = 0
    while len(out) < requests:
        out.extend(base[i : i + every])
        i += every
        out.extend(range(fresh, fresh + length))
        fresh += length
    return out[:requests]


def drift_trace(
    requests: int, universe: int, s: float, seed: int, every: int, shift: int
) -> list[int]:
    """Zipf(s) whose popular keys drift: every ``every`` requests the ranking
    moves ``shift`` keys along, so yesterday's hot keys cool down (recency pays)."""
    base = zipf_trace(requests, universe, s, seed)
    return [r + (i // every) * shift for i, r in enumerate(base)]


def reuse_trace(requests: int, seed: int, reuse: float, distance: float) -> list[int]:
    """Fresh keys, each re-requested with probability ``reuse`` at an exponential
    stack distance of mean ``distance`` requests: an LRU-friendly load on which
    frequency carries little information."""
    rnd = random.Random(seed)
    out: list[int] = []
    fresh = 0
    for _ in range(requests):
        if out and rnd.random() < reuse:
            back = min(int(rnd.expovariate(1 / distance)), len(out) - 1)
            out.append(out[-1 - back])
        else:
            out.append(fresh)
            fresh += 1
    return out


# ---- drivers ----------------------------------------------------------------


def simulate(
    policy: Any, trace: Iterable[int], capacity: int, *, evict_first: bool = True
) -> float:
    """Hit ratio of ``policy`` (a fresh ``hypercache._core`` policy) on ``trace``
    with room for ``capacity`` entries.

    ``evict_first`` mirrors the cache core, which makes room before it stores a
    new entry (so a write never evicts what it stores); ``False`` inserts first
    and then evicts while over capacity. Both must give the same quality.
    """
    policy._grow(capacity + 1)
    slot_of: dict[int, int] = {}
    key_of = [0] * (capacity + 1)
    free = list(range(capacity, -1, -1))
    access, miss, insert, evict = policy._access, policy._miss, policy._insert, policy._evict
    room = capacity if evict_first else capacity + 1
    hits = total = 0
    for key in trace:
        total += 1
        h = (key * _GOLDEN) & 0xFFFFFFFF
        slot = slot_of.get(key)
        if slot is not None:
            hits += 1
            access(slot, h)
            continue
        miss(h)
        if evict_first:
            while len(policy) >= room:
                victim = evict()
                del slot_of[key_of[victim]]
                free.append(victim)
        slot = free.pop()
        slot_of[key] = slot
        key_of[slot] = key
        insert(slot, h)
        if not evict_first:
            while len(policy) >= room:
                victim = evict()
                del slot_of[key_of[victim]]
                free.append(victim)
    return hits / total if total else 0.0


def simulate_theine(trace: Iterable[int], capacity: int) -> float:
    """Hit ratio of ``theine.Cache`` used as read-through (get, then set on a miss)."""
    from theine import Cache

    cache: Any = Cache(capacity)
    get, put = cache.get, cache.set
    hits = total = 0
    for key in trace:
        total += 1
        _, ok = get(key)
        if ok:
            hits += 1
        else:
            put(key, key)
    cache.close()
    return hits / total if total else 0.0


def simulate_theine_core(trace: Iterable[int], capacity: int) -> float:
    """Hit ratio of theine's policy core alone: every hit is reported (theine's
    ``Cache`` drops some from its lossy read buffer)."""
    from theine_core import TlfuCore, spread

    core: Any = TlfuCore(capacity)
    resident: set[int] = set()
    hits = total = 0
    for key in trace:
        total += 1
        kh = spread(key)
        if kh in resident:
            hits += 1
            core.access([kh])
        else:
            resident.add(kh)
            for gone in core.set([(kh, 0)]):
                resident.discard(gone)
    return hits / total if total else 0.0


# ---- command line -----------------------------------------------------------


def run(
    names: Sequence[str],
    traces: dict[str, list[int]],
    sizes: Sequence[int],
    *,
    evict_first: bool = True,
) -> list[tuple[str, int, str, float, float]]:
    """(trace, capacity, policy, hit ratio, seconds) for each combination."""
    rows = []
    for tname, trace in traces.items():
        for cap in sizes:
            for name in names:
                t0 = time.perf_counter()
                if name == "theine":
                    ratio = simulate_theine(trace, cap)
                elif name == "theine-core":
                    ratio = simulate_theine_core(trace, cap)
                else:
                    ratio = simulate(POLICIES[name](cap), trace, cap, evict_first=evict_first)
                rows.append((tname, cap, name, ratio, time.perf_counter() - t0))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--universe", type=int, default=100_000)
    ap.add_argument("--zipf", type=float, default=0.9, help="Zipf exponent s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--sizes", default="1,5,10", help="capacities, percent of the universe (comma list)"
    )
    ap.add_argument("--scan-every", type=int, default=10_000, help="Zipf requests between scans")
    ap.add_argument("--scan-length", type=int, default=5_000, help="keys per scan")
    ap.add_argument(
        "--policies",
        default="lru,arc,lfu,tinylfu,theine,theine-core",
        help="comma list of: " + ", ".join([*POLICIES, "theine", "theine-core"]),
    )
    ap.add_argument("--traces", default="zipf,scan", help="comma list of: zipf, scan, drift, reuse")
    ap.add_argument(
        "--insert-first", action="store_true", help="insert, then evict (default: room first)"
    )
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    for n in names:
        if n not in POLICIES and n not in ("theine", "theine-core"):
            ap.error(f"unknown policy {n!r}")
    sizes = [max(1, round(args.universe * float(p) / 100)) for p in args.sizes.split(",")]
    traces: dict[str, list[int]] = {}
    for t in args.traces.split(","):
        if t == "zipf":
            traces["zipf"] = zipf_trace(args.requests, args.universe, args.zipf, args.seed)
        elif t == "scan":
            traces["scan"] = scan_trace(
                args.requests,
                args.universe,
                args.zipf,
                args.seed,
                args.scan_every,
                args.scan_length,
            )
        elif t == "drift":
            traces["drift"] = drift_trace(
                args.requests, args.universe, args.zipf, args.seed, 1000, args.universe // 500
            )
        elif t == "reuse":
            traces["reuse"] = reuse_trace(args.requests, args.seed, 0.7, args.universe / 50)
        else:
            ap.error(f"unknown trace {t!r}")

    print(
        f"requests={args.requests} universe={args.universe} zipf_s={args.zipf} "
        f"seed={args.seed} scan={args.scan_length}/{args.scan_every}"
    )
    print(f"{'trace':<6} {'capacity':>8} {'policy':<12} {'hit ratio':>9} {'secs':>6}")
    for tname, cap, name, ratio, secs in run(
        names, traces, sizes, evict_first=not args.insert_first
    ):
        print(f"{tname:<6} {cap:>8} {name:<12} {ratio:>9.4f} {secs:>6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
