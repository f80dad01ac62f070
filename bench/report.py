"""Run the benchmarks and print one markdown report: ``python -m bench.report``.

The benchmarks run under pytest-benchmark in a child process (``--benchmark-json`` to
a temporary file); pytest's own output goes to stderr, the report to stdout, so::

    .venv/bin/python -m bench.report > bench-report.md

``--quick`` runs few rounds, short traces and 100,000-entry memory readings: a smoke
test of the harness, not numbers to quote. ``--only speed|memory|hitratio`` (may be
repeated) runs a subset. Exit status is 1 if a benchmark failed (skips are fine), 0
otherwise; a missed target does not change it. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import IMPLS
from bench.bench_embedded import BATCH, BUILD_ONLY, KEY_KINDS, KIND_OPS, SIZES, SPEED_IMPLS
from bench.bench_hitratio import HITRATIO_IMPLS, TRACES
from bench.bench_memory import MEMORY_IMPLS, RUNS

ROOT = Path(__file__).resolve().parent.parent
SUITES = {
    "speed": "bench/bench_embedded.py",
    "memory": "bench/bench_memory.py",
    "hitratio": "bench/bench_hitratio.py",
}
VERSIONED = ("hypercache", "cachetools", "cachebox", "lru-dict", "theine", "pytest-benchmark")

#: The implementation the targets are about, and the HyperCache policy judged on hit ratio.
SUBJECT = "HyperCache(lru)"
ADMISSION = "HyperCache(tinylfu)"


# -- targets ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Target:
    """A ratio the issue's goals are read from, with its pass threshold.

    :param at_most: pass if ``ratio <= goal`` (times, bytes); else ``ratio >= goal``.
    """

    goal: float
    at_most: bool

    def passes(self, ratio: float) -> bool:
        return ratio <= self.goal if self.at_most else ratio >= self.goal

    def describe(self) -> str:
        return f"{'≤' if self.at_most else '≥'} {self.goal:.2f}"


#: ns/op of HyperCache(lru) over the fastest third-party peer's: at least as fast.
VS_FASTEST_PEER = Target(goal=1.00, at_most=True)
#: HyperCache(lru) get-hit over dict.get at the hot size, identical keys.
VS_DICT = Target(goal=1.50, at_most=True)
#: The same with equal and fresh keys (issue 13): a hit there cannot be settled by identity.
VS_DICT_EQUAL = Target(goal=1.30, at_most=True)
#: bytes per entry of HyperCache(lru) over cachebox.LRUCache's (mean of the runs).
VS_CACHEBOX_MEMORY = Target(goal=1.00, at_most=True)
#: hit ratio of HyperCache(tinylfu) over theine's, per trace.
VS_THEINE_HIT_RATIO = Target(goal=1.00, at_most=False)

#: Operations judged against the fastest peer, per kind of key.
TARGET_OPS = {
    "identical": ("get-hit", "get-miss", "set-overwrite"),
    "equal": ("get-hit", "get-miss", "set-overwrite", "set-new"),
    "fresh": ("get-hit", "get-miss", "set-overwrite", "set-new"),
}
#: Operations that assume every resident key is held (flagged with † when it is not).
RESIDENT_OPS = ("get-hit", "set-overwrite", "mix")


# -- running ---------------------------------------------------------------------------


def run_benchmarks(
    suites: Iterable[str], quick: bool, workdir: Path
) -> tuple[int, list[dict[str, Any]], list[str]]:
    """Run pytest once over ``suites``; return (exit status, benchmarks, skip reasons)."""
    out_json = workdir / "benchmarks.json"
    out_skips = workdir / "skips.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *(SUITES[s] for s in suites),
        "-o",
        "python_files=bench_*.py",
        "-p",
        "no:cacheprovider",
        "-q",
        "--benchmark-quiet",
        f"--benchmark-json={out_json}",
        f"--bench-skips={out_skips}",
    ]
    if quick:
        cmd.append("--bench-quick")
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    status = subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr, check=False).returncode

    benchmarks: list[dict[str, Any]] = []
    if out_json.exists():
        benchmarks = json.loads(out_json.read_text(encoding="utf-8"))["benchmarks"]
    reasons: list[str] = []
    if out_skips.exists():
        for line in out_skips.read_text(encoding="utf-8").splitlines():
            reason = json.loads(line)["reason"]
            if reason not in reasons:
                reasons.append(reason)
    return status, benchmarks, reasons


# -- collected results -----------------------------------------------------------------


@dataclass
class Results:
    speed: dict[tuple[str, str, int, str], float]  # (keys, op, size, impl) -> ns/op (median)
    resident: dict[tuple[str, str, int, str], float]  # same key -> resident fraction
    memory: dict[str, list[float]]  # impl -> bytes/entry per run
    memory_held: dict[str, list[int | None]]
    memory_entries: int | None
    hit_ratio: dict[tuple[str, str], float]  # (trace, impl) -> ratio
    trace_specs: dict[str, str]
    rounds: int | None

    @classmethod
    def from_benchmarks(cls, benchmarks: list[dict[str, Any]]) -> Results:
        r = cls({}, {}, {}, {}, None, {}, {}, None)
        for b in benchmarks:
            info = b["extra_info"]
            kind = info.get("kind")
            if kind == "speed":
                key = (info.get("keys", "identical"), info["op"], info["size"], info["impl"])
                r.speed[key] = b["stats"]["median"] / info["batch"] * 1e9
                r.resident[key] = info["resident"]
                r.rounds = b["stats"]["rounds"]
            elif kind == "memory":
                r.memory[info["impl"]] = info["bytes_per_entry"]
                r.memory_held[info["impl"]] = info["held"]
                r.memory_entries = info["entries"]
            elif kind == "hitratio":
                r.hit_ratio[(info["trace"], info["impl"])] = info["hit_ratio"]
                r.trace_specs[info["trace"]] = info["trace_spec"]
        return r


# -- rendering -------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A markdown table; ``align`` has one of ``l``/``r`` per column."""
    marks = {"l": ":--", "r": "--:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def ns(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short HEAD, marked when the working tree differs from it (read-only git calls)."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", "--short", "HEAD")
    except FileNotFoundError:  # no git on PATH
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    dirty = git("status", "--porcelain").stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def versions() -> str:
    parts = []
    for dist in VERSIONED:
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return ", ".join(parts)


def command_line() -> str:
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):  # outside the working directory: keep it absolute
        exe = exe.relative_to(Path.cwd())
    return shlex.join([str(exe), "-m", "bench.report", *sys.argv[1:]])


@dataclass(frozen=True)
class RunInfo:
    """When the run happened and how busy the machine was around it."""

    started: dt.datetime
    load_before: float
    load_after: float


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def render_header(run: RunInfo, quick: bool) -> list[str]:
    cpus = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cpus
    lines = [
        "# hypercache benchmarks",
        "",
        f"- Machine: {cpu_model()}, {cpus} logical CPUs ({usable} usable), "
        f"{platform.system()} {platform.machine()}",
        f"- Python: {platform.python_implementation()} {platform.python_version()}",
        f"- Date: {run.started.strftime('%Y-%m-%d %H:%M UTC')}, commit {git_commit()}",
        f"- Load average (1 min) before / after the run: "
        f"{run.load_before:.2f} / {run.load_after:.2f}",
        f"- Command: `{command_line()}`",
        f"- Versions: {versions()}",
    ]
    if quick:
        lines.append("- **--quick: smoke test (few rounds, short traces); do not quote.**")
    return lines


KIND_NOTES = {
    "identical": 'Keys: `str` `"key:<n>"`, the very objects inserted (a hit can be settled by '
    "identity), hashed before timing; capacity = key count, filled before timing.",
    "equal": 'Keys: `str` `"key:<n>"` built again before each round and hashed then: equal to '
    "the stored keys, never identical, hash cached. `get-miss` and `set-new` keys are never "
    "the stored object, so those rows time the same work as with identical keys.",
    "fresh": 'Keys: built by the timed loop, `get(f"key:{i}")`: a new `str` per call, not '
    "hashed yet. `build key only` is the same loop without the cache call; the targets "
    "subtract it.",
}


def speed_cell(r: Results, kind: str, op: str, size: int, impl: str) -> float | None:
    """ns/op of ``impl``; with ``fresh`` keys net of building the key."""
    v = r.speed.get((kind, op, size, impl))
    if v is None or kind != "fresh":
        return v
    build = r.speed.get((kind, op, size, BUILD_ONLY))
    return None if build is None else v - build


def render_speed(r: Results) -> list[str]:
    rounds = f"{r.rounds} rounds" if r.rounds else "rounds"
    lines = [
        "",
        f"## Speed: ns per operation (median of {rounds} of {BATCH:,} ops; lower is better)",
        "",
        "**Bold**: fastest cache in the row (`dict` excluded: it does not evict).",
    ]
    footnote = False
    for kind in KEY_KINDS:
        cols = [*SPEED_IMPLS, *([BUILD_ONLY] if kind == "fresh" else [])]
        rows = []
        for op in KIND_OPS[kind]:
            for size in SIZES:
                cells = {i: r.speed.get((kind, op, size, i)) for i in cols}
                caches = [
                    v for i, v in cells.items() if v is not None and i not in ("dict", BUILD_ONLY)
                ]
                best = min(caches) if caches else None
                row = [op, f"{size:,}"]
                for i in cols:
                    v = cells[i]
                    if v is None:
                        row.append("n/a")
                        continue
                    text = f"**{ns(v)}**" if v == best else ns(v)
                    if op in RESIDENT_OPS and r.resident.get((kind, op, size, i), 1.0) < 0.999:
                        text += " †"
                        footnote = True
                    row.append(text)
                rows.append(row)
        if all(all(c == "n/a" for c in row[2:]) for row in rows):
            continue
        lines += ["", f"### {kind} keys", "", KIND_NOTES[kind], ""]
        lines += table(["operation", "keys", *cols], rows, "lr" + "r" * len(cols))
    lines += [
        "",
        "`set-new`: inserts of never-seen keys into the full cache (each one evicts); "
        "`dict` is cleared between batches when the next one would exceed the key count, "
        "so it times plain inserts. `mix`: 90% get / 10% set, Zipf(0.9) keys.",
    ]
    if footnote:
        lines.append(
            "† the filled cache did not hold every key: some reads missed, some writes inserted."
        )
    return lines


def render_memory(r: Results) -> list[str]:
    entries = f"{r.memory_entries:,}" if r.memory_entries else "N"
    lines = [
        "",
        f"## Memory: bytes per entry at {entries} entries (RSS delta, fresh process per run)",
        "",
    ]
    rows = []
    for i in MEMORY_IMPLS:
        runs = r.memory.get(i)
        cells = [f"{v:,.1f}" for v in runs] if runs else ["n/a"] * RUNS
        held = r.memory_held.get(i) or []
        note = ""
        if any(h is not None and h != r.memory_entries for h in held):
            note = "holds " + " / ".join(f"{h:,}" for h in held if h is not None)
        rows.append([i, *cells, note])
    lines += table(
        ["cache", *(f"run {n + 1}" for n in range(RUNS)), "note"], rows, "l" + "r" * RUNS + "l"
    )
    return lines


def render_hit_ratio(r: Results) -> list[str]:
    lines = ["", "## Hit ratio (get, then set on a miss; higher is better)", ""]
    for name, spec in TRACES.items():
        lines.append(f"- `{name}`: {r.trace_specs.get(name, spec.describe())}")
    lines.append("")
    rows = []
    for i in HITRATIO_IMPLS:
        cells = []
        for t in TRACES:
            v = r.hit_ratio.get((t, i))
            cells.append("n/a" if v is None else f"{v:.2%}")
        rows.append([i, *cells])
    lines += table(["cache", *TRACES], rows, "l" + "r" * len(TRACES))
    return lines


def _ratio_row(
    label: str,
    target: Target,
    num: float | None,
    den: float | None,
    fmt: Callable[[float], str],
    digits: int = 2,
) -> list[str]:
    if num is None or den is None or den == 0:
        return [label, "n/a", target.describe(), "n/a"]
    ratio = num / den
    mark = "pass" if target.passes(ratio) else "**miss**"
    return [label, f"{ratio:.{digits}f} ({fmt(num)} / {fmt(den)})", target.describe(), mark]


def render_targets(r: Results, suites: set[str]) -> list[str]:
    rows = []
    peers = [i for i in SPEED_IMPLS if IMPLS[i].peer]
    if "speed" in suites:
        for kind in KEY_KINDS:
            net = ", net of building the key" if kind == "fresh" else ""
            for size in SIZES:
                for op in TARGET_OPS[kind]:
                    timed = {
                        i: v for i in peers if (v := speed_cell(r, kind, op, size, i)) is not None
                    }
                    fastest = min(timed, key=timed.__getitem__) if timed else None
                    rows.append(
                        _ratio_row(
                            f"{op} @ {size:,}, {kind} keys{net}: {SUBJECT} / fastest peer "
                            f"({fastest or 'n/a'})",
                            VS_FASTEST_PEER,
                            speed_cell(r, kind, op, size, SUBJECT),
                            timed.get(fastest) if fastest else None,
                            lambda v: f"{ns(v)} ns",
                        )
                    )
            hot = SIZES[0]
            rows.append(
                _ratio_row(
                    f"get-hit @ {hot:,}, {kind} keys{net}: {SUBJECT} / dict",
                    VS_DICT if kind == "identical" else VS_DICT_EQUAL,
                    speed_cell(r, kind, "get-hit", hot, SUBJECT),
                    speed_cell(r, kind, "get-hit", hot, "dict"),
                    lambda v: f"{ns(v)} ns",
                )
            )
    if "memory" in suites:

        def mean(runs: list[float] | None) -> float | None:
            return sum(runs) / len(runs) if runs else None

        rows.append(
            _ratio_row(
                f"memory per entry: {SUBJECT} / cachebox.LRUCache (mean of runs)",
                VS_CACHEBOX_MEMORY,
                mean(r.memory.get(SUBJECT)),
                mean(r.memory.get("cachebox.LRUCache")),
                lambda v: f"{v:,.1f} B",
            )
        )
    if "hitratio" in suites:
        for t in TRACES:
            rows.append(
                _ratio_row(
                    f"hit ratio `{t}`: {ADMISSION} / theine.Cache",
                    VS_THEINE_HIT_RATIO,
                    r.hit_ratio.get((t, ADMISSION)),
                    r.hit_ratio.get((t, "theine.Cache")),
                    lambda v: f"{v:.2%}",
                    digits=3,  # two W-TinyLFUs land close: 0.9995 must not print as 1.00
                )
            )
    lines = [
        "",
        "## Targets",
        "",
        "Ratios from this one run. Timing noise on this machine is about ±15%, ±30% "
        "below 100 ns/op: a mark within that band of its goal is not settled by one run.",
        "",
    ]
    lines += table(["target", "ratio", "goal", "result"], rows, "lrrl")
    return lines


def render(r: Results, run: RunInfo, suites: set[str], quick: bool, skipped: list[str]) -> str:
    lines = render_header(run, quick)
    if "speed" in suites:
        lines += render_speed(r)
    if "memory" in suites:
        lines += render_memory(r)
    if "hitratio" in suites:
        lines += render_hit_ratio(r)
    lines += render_targets(r, suites)
    if skipped:
        lines += ["", "Skipped (n/a above):", ""]
        lines += [f"- {reason}" for reason in skipped]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="few rounds and short traces (smoke test)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SUITES),
        help="run only this suite (repeatable); default: all",
    )
    args = parser.parse_args(argv)
    suites = [s for s in SUITES if s in (args.only or SUITES)]

    started, load_before = dt.datetime.now(dt.UTC), load_average()
    with tempfile.TemporaryDirectory(prefix="hypercache-bench-") as tmp:
        status, benchmarks, skipped = run_benchmarks(suites, args.quick, Path(tmp))
    run = RunInfo(started=started, load_before=load_before, load_after=load_average())
    results = Results.from_benchmarks(benchmarks)
    sys.stdout.write(render(results, run, set(suites), args.quick, skipped))
    if status not in (0, 5):  # 5: nothing collected
        print(f"pytest exited with status {status}; see its output above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
