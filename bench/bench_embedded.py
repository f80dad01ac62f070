"""Speed of single operations: HyperCache against dict and the peer caches.

Each benchmark times one batch of :data:`BATCH` operations per round (pytest-benchmark
``pedantic``: fixed rounds, one call per round, setup outside the timer) and the
report divides the round's median by the batch: ns per operation, loop included.
The loop is one of the ``loop_*`` functions below, the same for every cache; the
cache's bound method is hoisted out of it and passed in as an argument (a fast local).

Keys are ``str`` (``"key:<n>"``, the shape theine's benchmarks use), built and hashed
once per size (``str`` caches its hash, so no timed loop pays for a first hashing) and
shared by every cache; values are one preallocated object. For a size ``N`` the cache
has capacity ``N`` and is filled with ``key:0 .. key:N-1`` before timing.

``get-hit``        read resident keys, batches cycle over a seeded permutation of them
``get-miss``       read keys that were never inserted (``key:N ..``)
``set-new``        insert never-seen keys into the full cache: every insert evicts (an
                   admission policy may reject instead). ``dict`` cannot evict: it is
                   cleared in the untimed setup whenever the next batch would take it
                   past ``N``, so it times plain inserts into a dict of up to ``N`` keys
``set-overwrite``  write resident keys again (same permutation as ``get-hit``)
``mix``            90% ``get`` / 10% ``set`` of resident keys, keys drawn Zipf(0.9)
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from bench import IMPLS, Impl
from bench.traces import ZipfSampler, keys

if TYPE_CHECKING:
    from bench.conftest import BenchConfig

BATCH = 1_000
SIZES = (1_000, 100_000)
OPS = ("get-hit", "get-miss", "set-new", "set-overwrite", "mix")
SPEED_IMPLS = (
    "HyperCache(lru)",
    "HyperCache(tinylfu)",
    "dict",
    "cachetools.LRUCache",
    "cachebox.LRUCache",
    "lru_dict.LRU",
    "theine.Cache",
)
MIX_WRITE_FRACTION = 0.10
MIX_ZIPF_S = 0.9
SEED = 20240601

VALUE = object()


# -- the timed loops: one shape per operation, shared by every cache ---------------------


def loop_get(get: Callable[[Any], Any], batch: Sequence[str]) -> None:
    for k in batch:
        get(k)


def loop_set(set_: Callable[[Any, Any], Any], batch: Sequence[str], value: object) -> None:
    for k in batch:
        set_(k, value)


def loop_mix(
    get: Callable[[Any], Any],
    set_: Callable[[Any, Any], Any],
    batch: Sequence[tuple[str, bool]],
    value: object,
) -> None:
    for k, write in batch:
        if write:
            set_(k, value)
        else:
            get(k)


# -- key sets (built once per size, shared by every cache) -------------------------------


def prehashed(names: list[str]) -> list[str]:
    """``names``, each hashed once: ``str`` caches its hash, so no timed loop pays for
    the first hashing of a key (the resident keys get theirs when the cache is filled)."""
    for k in names:
        hash(k)
    return names


@functools.cache
def resident(size: int) -> list[str]:
    return prehashed(keys(0, size))


def _chunks(seq: list[Any], n: int) -> list[list[Any]]:
    return [seq[i : i + n] for i in range(0, len(seq), n)]


@functools.cache
def hit_batches(size: int) -> list[list[str]]:
    order = list(resident(size))
    random.Random(SEED).shuffle(order)
    return _chunks(order, BATCH)


@functools.cache
def miss_batches(size: int) -> list[list[str]]:
    absent = prehashed(keys(size, 2 * size))
    random.Random(SEED + 1).shuffle(absent)
    return _chunks(absent, BATCH)


@functools.cache
def mix_batches(size: int, n_batches: int = 64) -> list[list[tuple[str, bool]]]:
    names = resident(size)
    ids = ZipfSampler(size, MIX_ZIPF_S, SEED + 2).sample(n_batches * BATCH)
    rnd = random.Random(SEED + 3).random
    ops = [(names[i], rnd() < MIX_WRITE_FRACTION) for i in ids]
    return _chunks(ops, BATCH)


def new_batches(size: int, n_batches: int) -> list[list[str]]:
    # Not cached: fresh keys per benchmark, so no cache ever sees them twice.
    return _chunks(prehashed(keys(2 * size, 2 * size + n_batches * BATCH)), BATCH)


def cycle(batches: list[Any]) -> Iterator[Any]:
    while True:
        yield from batches


# -- the benchmark ---------------------------------------------------------------------


def build(impl: Impl, size: int) -> Any:
    try:
        cache = impl.make(size)
    except (ImportError, ValueError) as exc:  # ValueError includes hypercache's ConfigError
        pytest.skip(f"{impl.name}: {exc}")
    set_ = impl.set(cache)
    for k in resident(size):
        set_(k, VALUE)
    return cache


def resident_fraction(impl: Impl, cache: Any, size: int) -> float:
    """Fraction of the resident keys the filled cache really holds (get-hit only hits
    where this is 1.0). Read with ``in`` where the cache has it, so no policy sees an
    extra access."""
    names = resident(size)
    try:
        held = sum(1 for k in names if k in cache)
    except TypeError:
        lookup = impl.lookup(cache)
        held = sum(1 for k in names if lookup(k))
    return held / len(names)


@pytest.mark.parametrize("impl_name", SPEED_IMPLS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("op", OPS)
def test_speed(
    benchmark: Any, bench_config: BenchConfig, op: str, size: int, impl_name: str
) -> None:
    impl = IMPLS[impl_name]
    cache = build(impl, size)
    get = impl.get(cache)
    set_ = impl.set(cache)
    total_rounds = bench_config.rounds + bench_config.warmup_rounds

    target: Callable[..., None]
    if op == "get-hit":
        target, batches = loop_get, cycle(hit_batches(size))

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (get, next(batches)), {}

    elif op == "get-miss":
        target, batches = loop_get, cycle(miss_batches(size))

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (get, next(batches)), {}

    elif op == "set-overwrite":
        target, batches = loop_set, cycle(hit_batches(size))

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (set_, next(batches), VALUE), {}

    elif op == "set-new":
        target, batches = loop_set, iter(new_batches(size, total_rounds))
        clear_when_full = impl.name == "dict"

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            if clear_when_full and len(cache) + BATCH > size:
                cache.clear()
            return (set_, next(batches), VALUE), {}

    elif op == "mix":
        target, batches = loop_mix, cycle(mix_batches(size))

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (get, set_, next(batches), VALUE), {}

    else:  # pragma: no cover - OPS is closed
        raise AssertionError(op)

    benchmark.group = f"{op} @ {size:,}"
    benchmark.extra_info.update(
        kind="speed",
        op=op,
        size=size,
        impl=impl.name,
        batch=BATCH,
        resident=resident_fraction(impl, cache, size),
    )
    try:
        benchmark.pedantic(
            target,
            setup=setup,
            rounds=bench_config.rounds,
            warmup_rounds=bench_config.warmup_rounds,
            iterations=1,
        )
    finally:
        impl.close(cache)
