"""Speed of single operations: HyperCache against dict and the peer caches.

Each benchmark times one batch of :data:`BATCH` operations per round (pytest-benchmark
``pedantic``: fixed rounds, one call per round, setup outside the timer) and the
report divides the round's median by the batch: ns per operation, loop included.
The loop is one of the ``loop_*`` functions below, the same for every cache; the
cache's bound method is hoisted out of it and passed in as an argument (a fast local).

Keys are ``str`` (``"key:<n>"``, the shape theine's benchmarks use) and values one
preallocated object. For a size ``N`` the cache has capacity ``N`` and is filled with
``key:0 .. key:N-1`` before timing. The same operation is timed with three kinds of
key (:data:`KEY_KINDS`), which differ in how the key a caller passes relates to the
one the cache stores:

``identical``  the very objects that were inserted, hashed once before any timing
               (``str`` caches its hash): a hit can be settled by pointer identity
``equal``      equal strings built again (``f"key:{n}"``) before each round, hashed
               then: equal, never identical, hash cached -- a caller that builds its
               key once and uses it twice (``get``, then ``set`` on a miss)
``fresh``      built by the timed loop itself, one new ``str`` per call, as a caller
               that writes ``cache.get(f"user:{uid}")`` does: neither identical nor
               hashed yet, so every cache pays the first hashing too. Building the
               key costs the same for every cache; ``build key only`` (the same
               loop without the cache call) measures it, and the report subtracts
               it for the ratios

Operations (``mix`` with identical keys only):

``get-hit``        read resident keys: each pass over them follows a new seeded
                   permutation, cut into batches (see "Hit order" below)
``get-miss``       read keys that were never inserted (``key:N ..``)
``set-new``        insert never-seen keys into the full cache: every insert evicts (an
                   admission policy may reject instead). ``dict`` cannot evict: it is
                   cleared in the untimed setup whenever the next batch would take it
                   past ``N``, so it times plain inserts into a dict of up to ``N`` keys
``set-overwrite``  write resident keys again (same passes as ``get-hit``)
``mix``            90% ``get`` / 10% ``set`` of resident keys, keys drawn Zipf(0.9)

Hit order: ``get-hit`` and ``set-overwrite`` draw a new permutation for every pass over
the resident keys (:data:`HIT_ORDERS`; ``replayed``, one permutation cycled, is kept to
reproduce older figures). Replaying one order is not neutral at 100,000 keys: after one
pass an LRU list is that order itself, so the neighbour that each hit unlinks from, and
so touches, is the key of the *next* operation, whose entry is then already in the CPU
caches. Caches that keep a whole entry (key pointer, value, links) in one node gain
most; on ``set-overwrite`` that stacks with cachebox storing the caller's key object on
an overwrite (dict, lru-dict, cachetools and HyperCache keep the stored one), so its
stored keys come to lie in memory in the order they are next compared. An application's
next key is not its last key's recency neighbour; a fresh order per pass removes that.

A missed or new key is never the stored object, so ``get-miss`` and ``set-new`` time
the same work with ``identical`` and ``equal`` keys; both rows are kept so that each
kind's table is whole. ``bench/interleaved.py`` runs these same workloads with every
cache taking turns round by round, for ratios that a busy machine cannot skew.
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
KEY_KINDS = ("identical", "equal", "fresh")
#: The operations timed with each kind of key.
KIND_OPS = {
    "identical": OPS,
    "equal": ("get-hit", "get-miss", "set-new", "set-overwrite"),
    "fresh": ("get-hit", "get-miss", "set-new", "set-overwrite"),
}
SPEED_IMPLS = (
    "HyperCache(lru)",
    "HyperCache(tinylfu)",
    "dict",
    "cachetools.LRUCache",
    "cachebox.LRUCache",
    "lru_dict.LRU",
    "theine.Cache",
)
#: The column of ``fresh`` rows that times building the key alone.
BUILD_ONLY = "build key only"
MIX_WRITE_FRACTION = 0.10
MIX_ZIPF_S = 0.9
SEED = 20240601
#: How ``get-hit`` and ``set-overwrite`` visit the resident keys pass after pass: a new
#: seeded permutation for every pass (the default), or one permutation replayed.
HIT_ORDERS = ("shuffled", "replayed")

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


# ``fresh`` keys: the loop builds each key as a caller would. The f-string is spelled
# out rather than calling bench.traces.key(), which would add a call per key; it
# builds the same "key:<n>" strings.


def loop_get_fresh(get: Callable[[Any], Any], ids: Sequence[int]) -> None:
    for i in ids:
        get(f"key:{i}")


def loop_set_fresh(set_: Callable[[Any, Any], Any], ids: Sequence[int], value: object) -> None:
    for i in ids:
        set_(f"key:{i}", value)


def loop_build_only(ids: Sequence[int]) -> None:
    # The fresh loops without the cache: building (and dropping) the key.
    for i in ids:
        _ = f"key:{i}"


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


def stored_keys(kind: str, size: int) -> list[str]:
    """The keys one contender is filled with.

    With ``identical`` keys, the shared resident objects: the batches are those very
    objects. With ``equal`` and ``fresh`` keys, a copy of its own for each contender.
    Filled from one shared list, every cache that keeps the key it was filled with
    (dict, lru-dict, cachetools, HyperCache) compares a hit against the same objects
    as the others, so in ``bench.interleaved`` whichever runs later in a round finds
    them in the CPU caches, fetched by another cache; cachebox stores the caller's
    key on an overwrite and drops out of that sharing. In an application no other
    cache reads a cache's stored keys.
    """
    if kind == "identical":
        return resident(size)
    return prehashed(keys(0, size))


def _chunks(seq: list[Any], n: int) -> list[list[Any]]:
    return [seq[i : i + n] for i in range(0, len(seq), n)]


@functools.cache
def hit_ids(size: int) -> list[list[int]]:
    """Batches of resident ids: one seeded permutation of ``0..size-1`` (the first pass)."""
    order = list(range(size))
    random.Random(SEED).shuffle(order)
    return _chunks(order, BATCH)


def hit_passes(size: int, order: str = "shuffled") -> Iterator[list[int]]:
    """Batches of resident ids, pass after pass over all of them: :func:`hit_ids`'
    permutation first, then a new seeded one for every further pass (``shuffled``),
    or :func:`hit_ids`' again and again (``replayed``)."""
    if order not in HIT_ORDERS:
        raise ValueError(f"hit order must be one of {HIT_ORDERS}, got {order!r}")
    if order == "replayed":
        yield from cycle(hit_ids(size))
    yield from hit_ids(size)
    n = 1
    while True:
        ids = list(range(size))
        random.Random(f"{SEED} pass {n}").shuffle(ids)
        yield from _chunks(ids, BATCH)
        n += 1


@functools.cache
def miss_ids(size: int) -> list[list[int]]:
    """Batches of ids never inserted: a seeded permutation of ``size..2*size-1``."""
    order = list(range(size, 2 * size))
    random.Random(SEED + 1).shuffle(order)
    return _chunks(order, BATCH)


def new_ids(size: int, n_batches: int) -> list[list[int]]:
    """Fresh ids for ``n_batches`` batches of set-new, from ``2*size`` on."""
    return _chunks(list(range(2 * size, 2 * size + n_batches * BATCH)), BATCH)


@functools.cache
def miss_batches(size: int) -> list[list[str]]:
    return [prehashed([f"key:{i}" for i in ids]) for ids in miss_ids(size)]


@functools.cache
def mix_batches(size: int, n_batches: int = 64) -> list[list[tuple[str, bool]]]:
    names = resident(size)
    ids = ZipfSampler(size, MIX_ZIPF_S, SEED + 2).sample(n_batches * BATCH)
    rnd = random.Random(SEED + 3).random
    ops = [(names[i], rnd() < MIX_WRITE_FRACTION) for i in ids]
    return _chunks(ops, BATCH)


def new_batches(size: int, n_batches: int) -> list[list[str]]:
    # Not cached: fresh keys per benchmark, so no cache ever sees them twice.
    return [prehashed([f"key:{i}" for i in ids]) for ids in new_ids(size, n_batches)]


def cycle(batches: list[Any]) -> Iterator[Any]:
    while True:
        yield from batches


def batch_source(
    kind: str, op: str, size: int, n_batches: int, order: str = "shuffled"
) -> Iterator[Any]:
    """The batches of one benchmark, one per round (warm-up rounds included).

    ``set-new`` yields ``n_batches`` batches of keys no cache has seen; ``get-hit``
    and ``set-overwrite`` make pass after pass over the resident keys in ``order``
    (:func:`hit_passes`); the others cycle. ``equal`` batches are built as they are
    taken: every round gets new objects, so a cache that keeps the key of an
    overwrite never meets it again.
    """
    if kind not in KEY_KINDS or op not in KIND_OPS[kind]:
        raise ValueError(f"no {op} benchmark with {kind} keys")
    if op == "mix":
        return cycle(mix_batches(size))
    if op == "set-new":
        ids: Iterator[list[int]] = iter(new_ids(size, n_batches))
        if kind == "identical":
            return iter(new_batches(size, n_batches))
    elif op == "get-miss":
        ids = cycle(miss_ids(size))
        if kind == "identical":
            return cycle(miss_batches(size))
    else:
        ids = hit_passes(size, order)
        if kind == "identical":
            names = resident(size)
            return ([names[i] for i in batch] for batch in ids)
    if kind == "fresh":
        # New int objects for each round, allocated together, as a request's freshly
        # parsed id would be: the shuffled ids of one long list lie scattered in memory,
        # and at 100,000 keys loading them cost the loop more than building the key.
        return ([i + 0 for i in batch] for batch in ids)
    return (prehashed([f"key:{i}" for i in batch]) for batch in ids)


def loop_for(kind: str, op: str) -> Callable[..., None]:
    """The timed loop of ``op`` with ``kind`` keys; see :func:`loop_args`."""
    if op == "mix":
        return loop_mix
    reads = op.startswith("get")
    if kind == "fresh":
        return loop_get_fresh if reads else loop_set_fresh
    return loop_get if reads else loop_set


def loop_args(op: str, get: Any, set_: Any, batch: Any) -> tuple[Any, ...]:
    """The arguments :func:`loop_for`'s loop takes for one batch."""
    if op == "mix":
        return (get, set_, batch, VALUE)
    if op.startswith("get"):
        return (get, batch)
    return (set_, batch, VALUE)


def n_batches_for(bench_config: BenchConfig) -> int:
    return bench_config.rounds + bench_config.warmup_rounds


# -- the benchmark ---------------------------------------------------------------------


def build(impl: Impl, size: int, kind: str = "identical") -> Any:
    try:
        cache = impl.make(size)
    except (ImportError, ValueError) as exc:  # ValueError includes hypercache's ConfigError
        pytest.skip(f"{impl.name}: {exc}")
    set_ = impl.set(cache)
    for k in stored_keys(kind, size):
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


CASES = [(kind, op, size) for kind in KEY_KINDS for op in KIND_OPS[kind] for size in SIZES]


def _case_id(case: tuple[str, str, int]) -> str:
    kind, op, size = case
    return f"{kind}-{op}-{size}"


@pytest.mark.parametrize("impl_name", SPEED_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_speed(
    benchmark: Any, bench_config: BenchConfig, case: tuple[str, str, int], impl_name: str
) -> None:
    kind, op, size = case
    impl = IMPLS[impl_name]
    cache = build(impl, size, kind)
    get = impl.get(cache)
    set_ = impl.set(cache)
    target = loop_for(kind, op)
    batches = batch_source(kind, op, size, n_batches_for(bench_config))
    clear_when_full = op == "set-new" and impl.name == "dict"

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        if clear_when_full and len(cache) + BATCH > size:
            cache.clear()
        return loop_args(op, get, set_, next(batches)), {}

    benchmark.group = f"{op} @ {size:,}, {kind} keys"
    benchmark.extra_info.update(
        kind="speed",
        keys=kind,
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


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "fresh"], ids=_case_id)
def test_build_key_only(
    benchmark: Any, bench_config: BenchConfig, case: tuple[str, str, int]
) -> None:
    """What the ``fresh`` loops spend building keys, over the same ids."""
    kind, op, size = case
    batches = batch_source(kind, op, size, n_batches_for(bench_config))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (next(batches),), {}

    benchmark.group = f"{op} @ {size:,}, {kind} keys"
    benchmark.extra_info.update(
        kind="speed", keys=kind, op=op, size=size, impl=BUILD_ONLY, batch=BATCH, resident=1.0
    )
    benchmark.pedantic(
        loop_build_only,
        setup=setup,
        rounds=bench_config.rounds,
        warmup_rounds=bench_config.warmup_rounds,
        iterations=1,
    )
