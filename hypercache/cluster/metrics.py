"""Metrics of one node: plain counters on the hot path, Prometheus at scrape time.

The coordinator and the replica handlers bump plain ``int`` attributes of
:class:`DistStats` (an attribute increment costs a few nanoseconds; a
prometheus-client ``Counter.inc`` takes a lock). A custom collector turns them into
Prometheus families when ``/metrics`` is scraped, together with gauges read from the
store, the server and the membership through :meth:`NodeMetrics.add_source`.
Latencies go to :class:`LatencyHistogram` (a bisect and two additions, no lock),
exported as Prometheus histograms by the same collector.

Every node has its own :class:`~prometheus_client.CollectorRegistry`, so several
nodes embedded in one process (tests, benchmarks) never share or clash.

Names: ``hypercache_*`` for the node and its store, ``hypercache_dist_*`` for the
distributed plane (coordination, replication, repair, membership).
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from hypercache.net.faults import FAULT_KINDS

__all__ = [
    "CLIENT_OPS",
    "LATENCY_BUCKETS",
    "VERSION_PATHS",
    "DistStats",
    "LatencyHistogram",
    "NodeMetrics",
    "asyncio_tasks",
    "faults_families",
]

#: Client-facing operations that the coordinator times and counts (an ``expire``
#: that finds its key live writes it back: that write counts as a ``set`` too).
CLIENT_OPS: Final = ("get", "set", "delete", "ttl", "expire")

#: Paths by which a node receives versions (labels of ``versions_refused``).
VERSION_PATHS: Final = (
    "r_put",
    "r_del",
    "hints",
    "repair_push",
    "antientropy",
    "read",
    "rebalance",
    "client",
)

#: Histogram buckets in seconds: 50 us .. 5 s, finer where a healthy cluster lives.
LATENCY_BUCKETS: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


_go_float: Callable[[float], str] = floatToGoString  # (untyped in prometheus-client)


class LatencyHistogram:
    """A histogram over fixed buckets (by default :data:`LATENCY_BUCKETS`) for one
    event loop's hot path.

    :meth:`observe` costs a bisect and two additions: no lock, unlike
    prometheus-client's ``Histogram`` (a node updates it from its event loop only),
    and no ``_created`` series on export. Counts are per bucket (not cumulative)
    until exported.
    """

    __slots__ = ("buckets", "counts", "le", "sum")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        #: the ``le`` labels, as Prometheus writes them, ``+Inf`` last
        self.le = (*(_go_float(b) for b in buckets), "+Inf")
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound falls in that bucket (le = "<=").
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, observations <= le), ...]``, ending with ``("+Inf", count)``."""
        out: list[tuple[str, int]] = []
        total = 0
        for le, n in zip(self.le, self.counts, strict=True):
            total += n
            out.append((le, total))
        return out

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        """This histogram as a one-sample Prometheus family."""
        fam = HistogramMetricFamily(name, doc)
        fam.add_metric([], self.cumulative(), self.sum)
        return fam


class DistStats:
    """Counters of the distributed plane; every attribute only grows."""

    __slots__ = (
        "client_hints",
        "direct_gets",
        "direct_puts",
        "direct_puts_applied",
        "direct_puts_stale",
        "errors",
        "flushed_entries",
        "flushes",
        "forwards",
        "not_ready_substitutions",
        "pending_copies",
        "pending_copies_dropped",
        "pending_copy_failures",
        "quorum_failures",
        "read_acks",
        "read_attempts",
        "read_repairs",
        "read_repairs_applied",
        "read_repairs_dropped",
        "replica_failures",
        "replica_gets",
        "replica_puts",
        "replica_puts_applied",
        "replica_retries",
        "requests",
        "stream_entries_served",
        "streams_served",
        "version_conflicts",
        "versions_refused",
        "write_acks",
        "write_attempts",
    )

    def __init__(self) -> None:
        #: client-facing requests handled, by op
        self.requests: dict[str, int] = dict.fromkeys(CLIENT_OPS, 0)
        #: client-facing requests that failed, by (op, error type)
        self.errors: dict[tuple[str, str], int] = {}
        #: replica requests sent to other nodes, by op (R_GET, R_PUT)
        self.forwards: dict[str, int] = {"r_get": 0, "r_put": 0, "r_del": 0, "add": 0}
        #: replica writes attempted (one per owner per write, local included)
        self.write_attempts = 0
        #: replica writes acknowledged (applied or already newer there)
        self.write_acks = 0
        #: replica reads attempted and answered
        self.read_attempts = 0
        self.read_acks = 0
        #: replica requests that failed (down, timeout, error)
        self.replica_failures = 0
        #: replica writes sent a second time after the first got no answer in half
        #: the request deadline, or lost its connection (see Coordinator._remote)
        self.replica_retries = 0
        #: operations that did not reach their consistency level, by op
        self.quorum_failures: dict[str, int] = dict.fromkeys(CLIENT_OPS, 0)
        #: newer versions pushed to stale owners after a read
        self.read_repairs = 0
        #: pushes to stale owners dropped because too many were in flight
        self.read_repairs_dropped = 0
        #: received entries not applied because the store held a version as new or newer
        self.version_conflicts = 0
        #: received versions refused for being past the clock's horizon (more than
        #: ``max_clock_skew`` ahead), by the path that brought them
        self.versions_refused: dict[str, int] = dict.fromkeys(VERSION_PATHS, 0)
        #: owner reads served to clients that read the owners themselves (R_GET)
        self.direct_gets = 0
        #: client-stamped writes received from clients writing the owners themselves
        #: (W_PUT), those applied, and those naming a stale owner list (refused by a
        #: non-owner; taken by an owner, which copies them to its ring's other owners)
        self.direct_puts = 0
        self.direct_puts_applied = 0
        self.direct_puts_stale = 0
        #: hints queued for another owner at a client's request (W_HINT)
        self.client_hints = 0
        #: read-repair entries that were applied by the owner they were pushed to
        #: (counted from the answers of the pushes, R_PUT_MANY)
        self.read_repairs_applied = 0
        #: replica requests served for other nodes
        self.replica_gets = 0
        self.replica_puts = 0
        self.replica_puts_applied = 0
        #: writes and deletes also sent to a partition's pending (previous) owners
        #: during a hand-over, those not sent (too many in flight), those that failed
        self.pending_copies = 0
        self.pending_copies_dropped = 0
        self.pending_copy_failures = 0
        #: reads that asked a pending owner in place of an owner not ready
        self.not_ready_substitutions = 0
        #: STREAM batches served to other nodes, and their entries
        self.streams_served = 0
        self.stream_entries_served = 0
        #: ``FLUSH`` requests carried out, and the data entries they dropped
        self.flushes = 0
        self.flushed_entries = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "errors": {f"{op}:{err}": n for (op, err), n in sorted(self.errors.items())},
            "forwards": dict(self.forwards),
            "forwards_total": sum(self.forwards.values()),
            "write_attempts": self.write_attempts,
            "write_acks": self.write_acks,
            "read_attempts": self.read_attempts,
            "read_acks": self.read_acks,
            "replica_failures": self.replica_failures,
            "replica_retries": self.replica_retries,
            "quorum_failures": dict(self.quorum_failures),
            "quorum_failures_total": sum(self.quorum_failures.values()),
            "read_repairs": self.read_repairs,
            "read_repairs_dropped": self.read_repairs_dropped,
            "read_repairs_applied": self.read_repairs_applied,
            "version_conflicts": self.version_conflicts,
            "versions_refused": dict(self.versions_refused),
            "direct_gets": self.direct_gets,
            "direct_puts": self.direct_puts,
            "direct_puts_applied": self.direct_puts_applied,
            "direct_puts_stale": self.direct_puts_stale,
            "client_hints": self.client_hints,
            "replica_gets": self.replica_gets,
            "replica_puts": self.replica_puts,
            "replica_puts_applied": self.replica_puts_applied,
            "pending_copies": self.pending_copies,
            "pending_copies_dropped": self.pending_copies_dropped,
            "pending_copy_failures": self.pending_copy_failures,
            "not_ready_substitutions": self.not_ready_substitutions,
            "streams_served": self.streams_served,
            "stream_entries_served": self.stream_entries_served,
            "flushes": self.flushes,
            "flushed_entries": self.flushed_entries,
        }


#: A source yields metric families at scrape time.
Source = Callable[[], Iterable[Metric]]


class _Collector:
    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics._dist_families()
        for source in self._metrics._sources:
            yield from source()


class NodeMetrics:
    """The metrics of one node, in a registry of its own.

    :ivar stats: the counters the coordinator bumps.
    :ivar latency: ``{op: LatencyHistogram}`` of client-facing operation latency.
    """

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.registry = CollectorRegistry(auto_describe=False)
        self.stats = DistStats()
        self._sources: list[Source] = []
        self.latency = {op: LatencyHistogram() for op in CLIENT_OPS}
        #: latency of the reads clients make of this node as an owner (``R_GET``)
        self.direct_latency = LatencyHistogram()
        self.registry.register(_Collector(self))

    def add_source(self, source: Source) -> None:
        """Add a callable yielding metric families at each scrape."""
        self._sources.append(source)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric of the node."""
        data: bytes = generate_latest(self.registry)
        return data

    def latency_summary(self) -> dict[str, Any]:
        """``{op: {"count", "sum_s", "buckets": {le: cumulative count}}}`` for JSON."""
        out: dict[str, Any] = {}
        for op, hist in self.latency.items():
            buckets = hist.cumulative()
            out[op] = {"count": buckets[-1][1], "sum_s": hist.sum, "buckets": dict(buckets)}
        return out

    def _dist_families(self) -> Iterator[Metric]:
        hist_family = HistogramMetricFamily(
            "hypercache_dist_op_latency_seconds",
            "Latency of client operations this node answered, by op and route "
            "(coordinated: through this node; direct: a client reading this owner).",
            labels=["op", "route"],
        )
        for op, hist in self.latency.items():
            hist_family.add_metric([op, "coordinated"], hist.cumulative(), hist.sum)
        direct = self.direct_latency
        hist_family.add_metric(["get", "direct"], direct.cumulative(), direct.sum)
        yield hist_family
        s = self.stats
        fam = CounterMetricFamily(
            "hypercache_requests",
            "Requests this node answered, by op and route (coordinated: a client's "
            "request through this node; direct: a client reading this owner itself; "
            "replica: a peer's read for a request it coordinates).",
            labels=["op", "route"],
        )
        for op, n in s.requests.items():
            fam.add_metric([op, "coordinated"], n)
        fam.add_metric(["get", "direct"], s.direct_gets)
        fam.add_metric(["set", "direct"], s.direct_puts)
        fam.add_metric(["get", "replica"], s.replica_gets)
        yield fam
        fam = CounterMetricFamily(
            "hypercache_request_errors", "Client requests that failed.", labels=["op", "error"]
        )
        for (op, err), n in s.errors.items():
            fam.add_metric([op, err], n)
        yield fam
        fam = CounterMetricFamily(
            "hypercache_dist_forwards", "Replica requests sent to other nodes.", labels=["op"]
        )
        for op, n in s.forwards.items():
            fam.add_metric([op], n)
        yield fam
        fam = CounterMetricFamily(
            "hypercache_dist_quorum_failures",
            "Operations that missed their consistency level.",
            labels=["op"],
        )
        for op, n in s.quorum_failures.items():
            fam.add_metric([op], n)
        yield fam
        fam = CounterMetricFamily(
            "hypercache_dist_versions_refused",
            "Received versions refused for running more than max_clock_skew ahead of the "
            "local clock, by the path that brought them.",
            labels=["path"],
        )
        for path, n in s.versions_refused.items():
            fam.add_metric([path], n)
        yield fam
        for name, doc, value in (
            ("write_attempts", "Replica writes attempted.", s.write_attempts),
            ("write_acks", "Replica writes acknowledged.", s.write_acks),
            ("read_attempts", "Replica reads attempted.", s.read_attempts),
            ("read_acks", "Replica reads answered.", s.read_acks),
            ("replica_failures", "Replica requests that failed.", s.replica_failures),
            (
                "replica_retries",
                "Replica writes sent again after the first attempt got no answer.",
                s.replica_retries,
            ),
            ("read_repairs", "Newer versions pushed to stale owners.", s.read_repairs),
            (
                "read_repairs_dropped",
                "Read-repair pushes dropped: too many in flight.",
                s.read_repairs_dropped,
            ),
            (
                "read_repairs_applied",
                "Read-repair entries the stale owner applied (answers of the pushes).",
                s.read_repairs_applied,
            ),
            (
                "direct_puts_applied",
                "Client-stamped writes (W_PUT) this owner applied.",
                s.direct_puts_applied,
            ),
            (
                "direct_puts_stale",
                "Client-stamped writes naming a stale owner list: refused by a node that "
                "does not own the key, or taken by an owner and copied to its ring's "
                "other owners.",
                s.direct_puts_stale,
            ),
            (
                "client_hints",
                "Hints queued at a client's request for an owner it could not reach (W_HINT).",
                s.client_hints,
            ),
            (
                "version_conflicts",
                "Received entries not applied (a version as new or newer was held).",
                s.version_conflicts,
            ),
            ("replica_gets", "Replica reads served for other nodes.", s.replica_gets),
            ("replica_puts", "Replica writes received from other nodes.", s.replica_puts),
            (
                "pending_copies",
                "Writes also sent to a moving partition's previous owners.",
                s.pending_copies,
            ),
            (
                "pending_copies_dropped",
                "Copies to previous owners not sent: too many in flight.",
                s.pending_copies_dropped,
            ),
            (
                "pending_copy_failures",
                "Copies to previous owners that failed.",
                s.pending_copy_failures,
            ),
            (
                "not_ready_substitutions",
                "Reads that asked a previous owner instead of an owner not ready.",
                s.not_ready_substitutions,
            ),
            (
                "rebalance_streams_served",
                "STREAM batches served to nodes pulling a partition.",
                s.streams_served,
            ),
            (
                "rebalance_stream_entries_served",
                "Entries served in STREAM batches.",
                s.stream_entries_served,
            ),
        ):
            yield CounterMetricFamily(f"hypercache_dist_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "hypercache_asyncio_tasks",
            "Asyncio tasks not yet done in the node's event loop (the nodes of an "
            "in-process cluster share one).",
            value=asyncio_tasks(),
        )
        # FLUSH is local to the node: not a hypercache_dist_ figure.
        yield CounterMetricFamily(
            "hypercache_flushes",
            "FLUSH requests carried out.",
            value=s.flushes,
        )
        yield CounterMetricFamily(
            "hypercache_flushed_entries", "Data entries dropped by FLUSH.", value=s.flushed_entries
        )


def asyncio_tasks() -> int:
    """Tasks not yet done in the running event loop (0 outside one): what the
    ``hypercache_asyncio_tasks`` gauge and ``/stats`` report, so that a leak of tasks
    shows (the memory soak checks it against a cap)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # no running loop (a scrape from another thread)
        return 0


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    """A one-sample gauge family (helper for sources)."""
    return GaugeMetricFamily(name, doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    """A one-sample counter family (helper for sources)."""
    return CounterMetricFamily(name, doc, value=value)


def faults_families(injected: Mapping[str, int] | None) -> Iterator[Metric]:
    """The counter of injected faults by kind (zeros on a node without fault
    injection; see :mod:`hypercache.net.faults`)."""
    fam = CounterMetricFamily(
        "hypercache_dist_faults_injected",
        "Faults injected into this node's messages to its peers, by kind (only on a node "
        "started with --fault-injection).",
        labels=["kind"],
    )
    for kind in FAULT_KINDS:
        fam.add_metric([kind], 0 if injected is None else injected.get(kind, 0))
    yield fam
