"""Memory per entry: the RSS growth of holding N entries, one fresh process per reading.

A child process (``python -m bench.bench_memory IMPL N``) does, in order:

1. import the cache's module and build and drop a tiny instance (so imports and
   one-time initialisation are paid before the first reading);
2. build N keys (``"key:<n>"``) and N values (distinct ints) -- they exist before
   and after, so they are not counted;
3. ``gc.collect()``, read RSS (``/proc/self/statm``), build the cache with capacity
   N and insert the N pairs, ``gc.collect()``, read RSS again;
4. print ``{"rss_before", "rss_after", "entries", "held"}`` as JSON.

``(rss_after - rss_before) / N`` is the figure: everything the cache allocated for
its N entries (its table, nodes, policy metadata, allocator slack), nothing
subtracted. Each cache is measured twice, each time in a new process; the report
shows both readings. RSS moves in pages and with the allocator's arenas, so readings
of a few bytes apart are the same number.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from bench import impl as find_impl
from bench.traces import keys

if TYPE_CHECKING:
    from bench.conftest import BenchConfig

MEMORY_IMPLS = (
    "dict",
    "HyperCache(lru)",
    "cachebox.LRUCache",
    "lru_dict.LRU",
    "cachetools.LRUCache",
    "theine.Cache",
)
RUNS = 2
ROOT = Path(__file__).resolve().parent.parent

#: Exit status of the child when the cache cannot be built (not installed, not landed).
EXIT_UNAVAILABLE = 3


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS is the best the resource module offers
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def measure(name: str, entries: int) -> dict[str, Any]:
    """Run in the child process: the readings for ``entries`` entries in ``name``."""
    impl = find_impl(name)
    impl.set(impl.make(16))("warm", 0)  # imports and first-use initialisation
    gc.collect()

    names = keys(0, entries)
    values = list(range(1_000_000, 1_000_000 + entries))  # distinct int objects
    gc.collect()

    before = rss_bytes()
    cache = impl.make(entries)
    set_ = impl.set(cache)
    for k, v in zip(names, values, strict=True):
        set_(k, v)
    gc.collect()
    after = rss_bytes()

    try:
        held = len(cache)
    except TypeError:
        held = None
    return {"rss_before": before, "rss_after": after, "entries": entries, "held": held}


def run_child(name: str, entries: int) -> dict[str, Any]:
    """One reading in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_memory", name, str(entries)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for {name} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("impl_name", MEMORY_IMPLS)
def test_memory(benchmark: Any, bench_config: BenchConfig, impl_name: str) -> None:
    entries = bench_config.memory_entries
    impl = find_impl(impl_name)
    try:  # skip here: a skip inside pedantic() leaves pytest-benchmark with no data
        impl.make(16)
    except (ImportError, ValueError) as exc:  # ValueError includes hypercache's ConfigError
        pytest.skip(f"{impl_name}: {exc}")

    def readings() -> list[dict[str, Any]]:
        return [run_child(impl_name, entries) for _ in range(RUNS)]

    # The timing is of no interest (two child processes); the readings go to the JSON.
    runs = benchmark.pedantic(readings, rounds=1, iterations=1)
    benchmark.group = "memory"
    benchmark.extra_info.update(
        kind="memory",
        impl=impl_name,
        entries=entries,
        bytes_per_entry=[(r["rss_after"] - r["rss_before"]) / entries for r in runs],
        held=[r["held"] for r in runs],
    )


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.bench_memory IMPL ENTRIES", file=sys.stderr)
        return 2
    name, entries = argv[0], int(argv[1])
    try:
        result = measure(name, entries)
    except (ImportError, ValueError) as exc:  # ValueError includes hypercache's ConfigError
        print(f"{name}: {exc}")
        return EXIT_UNAVAILABLE
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
