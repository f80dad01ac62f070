"""Every cache taking turns over the same batches, in one process: ``python -m bench.interleaved``.

``python -m bench.report`` times each cache in its own stretch of time (pytest-benchmark
runs one benchmark after another), so on a shared machine a neighbour that wakes up
during one cache's stretch moves that cache's figure and every ratio it enters. Here
the caches take turns: each round times one batch of every cache (and, with ``fresh``
keys, of the key building alone) on the very same batch, in an order shuffled anew
every round (seeded). A ratio is the median over rounds of the ratio within a round, so
a slow stretch of the machine weighs on both sides of it alike.

The order is shuffled, not rotated: a batch starts with the CPU caches as its
predecessor left them, and a rotation gives every cache the same predecessor in every
round. At 100,000 keys that alone put HyperCache's get-hit at 1.07x cachebox's with
fresh keys and 0.84x with equal ones, against 0.96x and 0.72x shuffled, same build, one
run after the other (it always followed theine, whose tables are the largest).

The workloads are those of :mod:`bench.bench_embedded` (same key kinds, batches,
loops and fills); see its docstring. With ``fresh`` keys the ratios are of the costs
net of building the key: within each round, ``build key only``'s time is subtracted
from each cache's before dividing.

Run::

    .venv/bin/python -m bench.interleaved                 # every kind, op and size
    .venv/bin/python -m bench.interleaved --kinds equal fresh --sizes 1000
    .venv/bin/python -m bench.interleaved --quick         # smoke test, not figures

The markdown report goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import IMPLS, Impl
from bench.bench_embedded import (
    BATCH,
    BUILD_ONLY,
    HIT_ORDERS,
    KEY_KINDS,
    KIND_OPS,
    SIZES,
    VALUE,
    batch_source,
    loop_args,
    loop_build_only,
    loop_for,
    resident_fraction,
    stored_keys,
)
from bench.report import cpu_model, git_commit, load_average, ns, table, versions

SUBJECT = "HyperCache(lru)"
CONTENDERS = (
    SUBJECT,
    "dict",
    "cachebox.LRUCache",
    "lru_dict.LRU",
    "cachetools.LRUCache",
    "theine.Cache",
)
#: HyperCache(lru) ns/op over each peer's: at most this (at least as fast as every one).
VS_PEER_GOAL = 1.00
#: HyperCache(lru) get-hit over dict.get with equal and fresh keys.
VS_DICT_GOAL = 1.30


@dataclass
class Cell:
    """One (kind, op, size): the per-round ns/op of every contender."""

    kind: str
    op: str
    size: int
    ns: dict[str, list[float]] = field(default_factory=dict)
    resident: dict[str, float] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.ns[name])

    def ratio(self, num: str, den: str) -> float:
        """Median over rounds of num/den, both net of key building for ``fresh``."""
        a, b = self.ns[num], self.ns[den]
        if self.kind == "fresh":
            build = self.ns[BUILD_ONLY]
            a = [x - c for x, c in zip(a, build, strict=True)]
            b = [x - c for x, c in zip(b, build, strict=True)]
        return statistics.median(x / y for x, y in zip(a, b, strict=True) if y > 0)


@dataclass
class Contender:
    name: str
    loop: Callable[..., None]
    args: Callable[[Any], tuple[Any, ...]]
    before: Callable[[], None]
    close: Callable[[], None]


def contenders(kind: str, op: str, size: int, names: Sequence[str], cell: Cell) -> list[Contender]:
    out = []
    for name in names:
        impl = IMPLS[name]
        cache = impl.make(size)
        set_ = impl.set(cache)
        for k in stored_keys(kind, size):
            set_(k, VALUE)
        cell.resident[name] = resident_fraction(impl, cache, size)
        get = impl.get(cache)

        def args(batch: Any, get: Any = get, set_: Any = set_) -> tuple[Any, ...]:
            return loop_args(op, get, set_, batch)

        def before(cache: Any = cache) -> None:
            if len(cache) + BATCH > size:
                cache.clear()

        def close(impl: Impl = impl, cache: Any = cache) -> None:
            impl.close(cache)

        out.append(
            Contender(
                name=name,
                loop=loop_for(kind, op),
                args=args,
                before=before if op == "set-new" and name == "dict" else lambda: None,
                close=close,
            )
        )
    if kind == "fresh":
        out.append(
            Contender(
                name=BUILD_ONLY,
                loop=loop_build_only,
                args=lambda batch: (batch,),
                before=lambda: None,
                close=lambda: None,
            )
        )
    return out


def run_cell(
    kind: str,
    op: str,
    size: int,
    names: Sequence[str],
    rounds: int,
    warmup: int,
    hit_order: str = "shuffled",
) -> Cell:
    cell = Cell(kind, op, size)
    players = contenders(kind, op, size, names, cell)
    for p in players:
        cell.ns[p.name] = []
    source = batch_source(kind, op, size, rounds + warmup, hit_order)
    clock = time.perf_counter_ns
    rng = random.Random(f"{kind} {op} {size}")
    try:
        for r in range(rounds + warmup):
            batch = next(source)
            order = players[:]
            rng.shuffle(order)
            for p in order:
                p.before()
                args = p.args(batch)
                start = clock()
                p.loop(*args)
                elapsed = clock() - start
                if r >= warmup:
                    cell.ns[p.name].append(elapsed / len(batch))
    finally:
        for p in players:
            p.close()
    return cell


# -- report --------------------------------------------------------------------------------


def short(name: str) -> str:
    return name.split(".")[0] if name != SUBJECT else name


def render(cells: list[Cell], names: Sequence[str], header: list[str]) -> str:
    lines = ["# hypercache, interleaved (every cache in turn, one round after another)", ""]
    lines += header
    peers = [n for n in names if IMPLS[n].peer]
    for kind in KEY_KINDS:
        mine = [c for c in cells if c.kind == kind]
        if not mine:
            continue
        cols = [*names, *([BUILD_ONLY] if kind == "fresh" else [])]
        lines += ["", f"## {kind} keys: ns per operation (median of per-round ns/op)", ""]
        rows = []
        for c in mine:
            best = min(c.median(n) for n in names if n != "dict")
            row = [c.op, f"{c.size:,}"]
            for n in cols:
                v = c.median(n)
                text = f"**{ns(v)}**" if v == best else ns(v)
                if c.resident.get(n, 1.0) < 0.999 and c.op in ("get-hit", "set-overwrite"):
                    text += " †"
                row.append(text)
            rows.append(row)
        lines += table(["operation", "keys", *map(short, cols)], rows, "lr" + "r" * len(cols))
        net = " net of building the key" if kind == "fresh" else ""
        lines += [
            "",
            f"{kind} keys: {SUBJECT} / each{net} (median of per-round ratios; "
            f"goal ≤ {VS_PEER_GOAL:.2f} against every peer, ≤ {VS_DICT_GOAL:.2f} "
            "against dict on get-hit)",
            "",
        ]
        rows = []
        for c in mine:
            row = [c.op, f"{c.size:,}"]
            worst = 0.0
            for n in names:
                if n == SUBJECT:
                    continue
                ratio = c.ratio(SUBJECT, n)
                row.append(f"{ratio:.2f}")
                if n in peers:
                    worst = max(worst, ratio)
            marks = ["pass" if worst <= VS_PEER_GOAL else "**miss**"]
            if c.op == "get-hit" and kind != "identical" and "dict" in names:
                d = c.ratio(SUBJECT, "dict")
                marks.append("dict pass" if d <= VS_DICT_GOAL else "dict **miss**")
            row.append(", ".join(marks))
            rows.append(row)
        others = [short(n) for n in names if n != SUBJECT]
        lines += table(
            ["operation", "keys", *(f"/ {o}" for o in others), "vs peers"],
            rows,
            "lr" + "r" * len(others) + "l",
        )
    lines += [
        "",
        "† the filled cache did not hold every key: some reads missed, some writes inserted.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.interleaved", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--kinds", nargs="+", choices=KEY_KINDS, default=list(KEY_KINDS))
    parser.add_argument("--ops", nargs="+", default=None, help="default: every op of each kind")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument(
        "--hit-order",
        choices=HIT_ORDERS,
        default=HIT_ORDERS[0],
        help="get-hit and set-overwrite: a new permutation every pass (default), or one "
        "replayed (the order of figures before 2026-12-06; see bench.bench_embedded)",
    )
    parser.add_argument("--quick", action="store_true", help="15 rounds: a smoke test")
    args = parser.parse_args(argv)
    rounds, warmup = (15, 2) if args.quick else (args.rounds, args.warmup)
    names = [n for n in CONTENDERS if n in args.contenders]
    if SUBJECT not in names:
        parser.error(f"{SUBJECT} must be one of the contenders")

    started, load_before = dt.datetime.now(dt.UTC), load_average()
    cells = []
    for kind in args.kinds:
        for op in KIND_OPS[kind]:
            if args.ops and op not in args.ops:
                continue
            for size in args.sizes:
                print(f"{kind} {op} {size:,}", file=sys.stderr, flush=True)
                cells.append(run_cell(kind, op, size, names, rounds, warmup, args.hit_order))
                gc.collect()
    load_after = load_average()
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):  # outside the working directory: keep it absolute
        exe = exe.relative_to(Path.cwd())
    given = sys.argv[1:] if argv is None else list(argv)
    header = [
        f"- Machine: {cpu_model()}, Python {platform.python_version()}",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}, commit {git_commit()}",
        f"- Load average (1 min) before / after the run: {load_before:.2f} / {load_after:.2f}",
        f"- Command: `{shlex.join([str(exe), '-m', 'bench.interleaved', *given])}`",
        f"- Rounds: {rounds} of {BATCH:,} ops per cache and cell, after {warmup} warm-up rounds",
        f"- Hit order (get-hit, set-overwrite): {args.hit_order}",
        f"- Versions: {versions()}",
    ]
    if args.quick:
        header.append("- **--quick: smoke test; do not quote.**")
    sys.stdout.write(render(cells, names, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
