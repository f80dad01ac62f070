"""Seeded key traces for the benchmarks: a Zipf sampler and the traces built on it.

Everything here is pure Python (numpy is not a dependency). The speed and memory
benchmarks use ``str`` keys ``"key:<n>"`` (:func:`key`, :func:`keys` -- the shape
theine's own benchmarks use). Hit-ratio traces are tuples of ``int`` ids, as trace
simulators use: ``hash()`` of an ``int`` is not randomised per process (``str``'s is),
so an admission policy built on hashes gives the same ratio on every run.

The Zipf sampler precomputes the cumulative weights of ranks ``1..universe``
(weight ``1 / rank**s``) once, then draws by inverse transform: a uniform number
in ``[0, total)`` located with :func:`bisect.bisect_right`, O(log universe) per
draw. Ranks are mapped to key ids through a seeded permutation, so the hottest
keys are not simply ``key:0``, ``key:1``, ... (which would flatter any structure
that happens to like small, sequential ids).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
from dataclasses import dataclass

__all__ = [
    "SCAN",
    "ZIPF",
    "TraceSpec",
    "ZipfSampler",
    "key",
    "keys",
    "trace",
]


def key(n: int) -> str:
    """The key for id ``n``; every benchmark builds its keys with this."""
    return f"key:{n}"


def keys(start: int, stop: int) -> list[str]:
    """Keys for ids ``start..stop-1``, in order."""
    return [f"key:{n}" for n in range(start, stop)]


class ZipfSampler:
    """Draw key ids in ``[0, universe)`` with Zipf(s) popularity, reproducibly.

    :param universe: number of distinct ids.
    :param s: Zipf exponent; the id of popularity rank ``r`` is drawn with
        probability proportional to ``1 / r**s``.
    :param seed: seed of both the rank -> id permutation and the draws.
    """

    def __init__(self, universe: int, s: float, seed: int) -> None:
        if universe < 1:
            raise ValueError("universe must be >= 1")
        if s <= 0:
            raise ValueError("s must be > 0")
        self.universe = universe
        self.s = s
        self._rng = random.Random(seed)
        self._cdf = list(itertools.accumulate(1.0 / (r**s) for r in range(1, universe + 1)))
        self._total = self._cdf[-1]
        ids = list(range(universe))
        self._rng.shuffle(ids)
        self._ids = ids

    def sample(self, n: int) -> list[int]:
        """Draw ``n`` ids."""
        cdf, ids, total = self._cdf, self._ids, self._total
        last = self.universe - 1
        rnd = self._rng.random
        find = bisect.bisect_right
        # min(): a draw of exactly ``total`` (float rounding) must stay in range.
        return [ids[min(find(cdf, rnd() * total), last)] for _ in range(n)]


@dataclass(frozen=True, kw_only=True)
class TraceSpec:
    """Parameters of a hit-ratio trace; the report prints them.

    :param name: short label used in the report.
    :param universe: distinct keys the Zipf part draws from (ids ``0..universe-1``).
    :param length: total requests, scans included.
    :param s: Zipf exponent.
    :param cache_size: capacity (entries) every cache is given for this trace.
    :param scan_length: keys per scan; 0 means no scans.
    :param scan_every: Zipf requests between the start of two scans.
    :param seed: seed of the sampler.
    """

    name: str
    universe: int
    length: int
    s: float
    cache_size: int
    scan_length: int = 0
    scan_every: int = 0
    seed: int = 1

    def __post_init__(self) -> None:
        if self.scan_length and self.scan_every < 1:
            raise ValueError("scan_every must be >= 1 when scan_length is set")

    def describe(self) -> str:
        text = (
            f"Zipf s={self.s}, universe {self.universe:,} keys, {self.length:,} requests, "
            f"cache {self.cache_size:,} entries, seed {self.seed}"
        )
        if self.scan_length:
            text += (
                f"; after every {self.scan_every:,} Zipf requests a scan of "
                f"{self.scan_length:,} never-seen keys in sequence"
            )
        return text

    def scaled(self, length: int) -> TraceSpec:
        """The same trace shape with a different length (for ``--quick``)."""
        return TraceSpec(
            name=self.name,
            universe=self.universe,
            length=length,
            s=self.s,
            cache_size=self.cache_size,
            scan_length=self.scan_length,
            scan_every=self.scan_every,
            seed=self.seed,
        )


@functools.lru_cache(maxsize=8)
def trace(spec: TraceSpec) -> tuple[int, ...]:
    """Build the trace ``spec`` describes (memoised: specs are immutable).

    With scans, the trace alternates ``scan_every`` Zipf requests and one scan of
    ``scan_length`` fresh ids counting up from ``universe`` -- one-hit wonders that an
    admission policy should keep out and that flush a plain LRU.
    """
    sampler = ZipfSampler(spec.universe, spec.s, spec.seed)
    out: list[int] = []
    next_scan_id = spec.universe
    while len(out) < spec.length:
        burst = spec.scan_every if spec.scan_length else spec.length
        out.extend(sampler.sample(min(burst, spec.length - len(out))))
        if spec.scan_length and len(out) < spec.length:
            n = min(spec.scan_length, spec.length - len(out))
            out.extend(range(next_scan_id, next_scan_id + n))
            next_scan_id += n
    return tuple(out)


# The two traces of the hit-ratio benchmark. Cache size is 1% of the universe: small
# enough that the policy matters, the ratio every target compares is at this size.
ZIPF = TraceSpec(name="zipf", universe=100_000, length=1_000_000, s=0.9, cache_size=1_000)
SCAN = TraceSpec(
    name="zipf+scan",
    universe=100_000,
    length=1_000_000,
    s=0.9,
    cache_size=1_000,
    scan_length=3_000,
    scan_every=20_000,
)
