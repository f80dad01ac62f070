"""A node's Prometheus exposition follows the Prometheus naming conventions, and
docs/metrics.md lists it as it is.

Names: ``hypercache_`` first, snake case, the base unit last (``..._bytes``,
``..._seconds``; a counter's ``_total`` after it); counters end in ``_total``; no
``_created`` series. HELP texts are sentences (a capital first, a full stop last).

``python tests/test_metrics.py`` prints the reference table of docs/metrics.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from aio_helpers import run
from cluster_harness import FAST

from hypercache.cluster.local import InprocCluster
from hypercache.cluster.node import Node
from hypercache.net.protocol import Op, make_hello

_NAME = re.compile(r"hypercache_[a-z0-9]+(_[a-z0-9]+)*")
_UNITS = ("bytes", "seconds")


def exposition() -> tuple[str, dict[str, list[str]]]:
    """The /metrics text of a node of a 2-node in-process cluster that has served
    some traffic (so that families with labels have samples), and its label names."""

    async def main() -> tuple[str, dict[str, list[str]]]:
        async with InprocCluster(2, settings=FAST, address="127.0.12.{n}:7400") as cluster:
            node = cluster.nodes[0]
            conn = await cluster.net.connect(node.address, make_hello("hypercache"))
            try:
                await conn.request(Op.SET, [b"k", b"v", None, "all"], 2)
                await conn.request(Op.GET, [b"k", "quorum"], 2)
                await conn.request(Op.R_GET, [b"k"], 2)
            finally:
                await conn.close()
            return node.metrics.render().decode(), labels(node)

    return run(main())


def families(text: str) -> dict[str, tuple[str, str]]:
    """``{name: (type, help)}`` of every family in ``text``."""
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", text, re.M))
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert helps.keys() == types.keys()
    return {name: (types[name], helps[name]) for name in helps}


def labels(node: Node) -> dict[str, list[str]]:
    """``{family: [label names]}`` as the node's collectors declare them (a family
    with no sample yet has its label names too)."""
    out: dict[str, list[str]] = {}
    for fam in node.metrics.registry.collect():
        name = f"{fam.name}_total" if fam.type == "counter" else fam.name
        out[name] = [n for n in getattr(fam, "_labelnames", ()) if n != "le"]
    return out


DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
BEGIN, END = "<!-- metrics:begin -->", "<!-- metrics:end -->"


def reference(text: str, by_family: dict[str, list[str]]) -> str:
    """The table of docs/metrics.md: every family with its type, labels and HELP."""
    found = families(text)
    rows = ["| metric | type | labels | meaning |", "|:--|:--|:--|:--|"]
    for name, (kind, help_text) in sorted(found.items()):
        names = ", ".join(f"`{n}`" for n in by_family.get(name, []))
        rows.append(f"| `{name}` | {kind} | {names} | {help_text.replace('|', '/')} |")
    return "\n".join(rows)


def test_docs_metrics_lists_every_family_as_the_node_exports_it() -> None:
    doc = DOC.read_text()
    table = doc.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    expected = reference(*exposition())
    assert table == expected, (
        "docs/metrics.md differs from what a node exports: regenerate the table between "
        f"its markers with `.venv/bin/python tests/test_metrics.py`\n{expected}"
    )


def test_every_family_is_named_and_described_by_the_conventions() -> None:
    text, _ = exposition()
    found = families(text)
    assert len(found) > 60  # the whole node: store, net, dist, membership, hints, AE
    wrong: list[str] = []
    for name, (kind, help_text) in sorted(found.items()):
        if not _NAME.fullmatch(name):
            wrong.append(f"{name}: not hypercache_snake_case")
        stem = name.removesuffix("_total") if kind == "counter" else name
        if kind == "counter" and not name.endswith("_total"):
            wrong.append(f"{name}: a counter must end in _total")
        words = stem.split("_")
        for unit in _UNITS:
            if unit in words[:-1]:
                wrong.append(f"{name}: the unit {unit!r} goes last")
        if not (help_text[:1].isupper() and help_text.endswith(".")):
            wrong.append(f"{name}: HELP is not a sentence: {help_text!r}")
    assert not wrong, "\n".join(wrong)
    samples = [line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"]
    assert not [s for s in samples if s.endswith("_created")]


def test_the_conventions_check_catches_what_it_is_for() -> None:
    bad = (
        "# HELP hypercache_net_bytes_in_total bytes received\n"
        "# TYPE hypercache_net_bytes_in_total counter\n"
        "hypercache_net_bytes_in_total 1.0\n"
    )
    ((name, (kind, help_text)),) = families(bad).items()
    assert kind == "counter" and "bytes" in name.split("_")[:-2]
    assert not help_text[:1].isupper()


if __name__ == "__main__":
    sys.stdout.write(reference(*exposition()) + "\n")
