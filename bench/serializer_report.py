"""The value serializers side by side: ``python -m bench.serializer_report``.

Each serializer of :mod:`hypercache.client.serializer` encodes and decodes the same
values (a small record, a 4 KiB JSON-like document, a list of 1,000 ints), in one
process, interleaved rounds: the median per call of ``dumps`` and of ``loads``
(``perf_counter_ns`` around a batch of calls, divided by its size) and the encoded
size. The raw serializer takes bytes only: it gets the msgpack encoding of each
value, so its row is the cost of passing bytes through. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.report import load_average, table
from hypercache.client.serializer import (
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    RawSerializer,
    Serializer,
)

SERIALIZERS: dict[str, Serializer] = {
    "msgpack": MsgpackSerializer(),
    "pickle": PickleSerializer(),
    "json": JsonSerializer(),
    "raw": RawSerializer(),
}


def values() -> dict[str, Any]:
    record = {"id": 12345, "name": "Ada Lovelace", "email": "ada@example.com", "active": True}
    doc = {
        "items": [
            {"sku": f"sku-{i:05d}", "qty": i % 7, "price": i * 1.25, "tags": ["a", "b"]}
            for i in range(48)
        ],
        "owner": record,
    }
    return {"record (4 fields)": record, "document (~4 KiB)": doc, "1,000 ints": list(range(1000))}


def per_call_ns(fn: Callable[[Any], Any], arg: Any, batch: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(batch):
        fn(arg)
    return (time.perf_counter_ns() - start) / batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serializer_report")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--batch", type=int, default=2000, help="calls per timed batch")
    args = parser.parse_args(argv)
    load = load_average()
    samples: dict[tuple[str, str, str], list[float]] = {}
    sizes: dict[tuple[str, str], int] = {}
    packed = MsgpackSerializer()
    for _ in range(args.rounds):
        for vname, value in values().items():
            for sname, ser in SERIALIZERS.items():
                obj = packed.dumps(value) if sname == "raw" else value
                data = ser.dumps(obj)
                sizes[(vname, sname)] = len(data)
                samples.setdefault((vname, sname, "dumps"), []).append(
                    per_call_ns(ser.dumps, obj, args.batch)
                )
                samples.setdefault((vname, sname, "loads"), []).append(
                    per_call_ns(ser.loads, data, args.batch)
                )
    rows = []
    for vname in values():
        for sname in SERIALIZERS:
            dumps = statistics.median(samples[(vname, sname, "dumps")])
            loads = statistics.median(samples[(vname, sname, "loads")])
            rows.append(
                [
                    vname,
                    sname,
                    str(sizes[(vname, sname)]),
                    f"{dumps / 1e3:.2f}",
                    f"{loads / 1e3:.2f}",
                ]
            )
    command = " ".join(["python -m bench.serializer_report", *(argv or sys.argv[1:])])
    print(
        f"Serializers, median of {args.rounds} interleaved rounds of {args.batch} calls; "
        f"load average (1 min) {load:.2f}; `{command}`\n"
    )
    print("\n".join(table(["value", "serializer", "bytes", "dumps µs", "loads µs"], rows, "llrrr")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
