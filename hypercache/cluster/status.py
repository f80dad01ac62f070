"""What a node reports about itself: the JSON views of its management HTTP and the
Prometheus families of its own state.

:class:`NodeStatus` reads a :class:`~hypercache.cluster.node.Node` through its public
accessors and builds every body that ``hypercache.cluster.http`` serves, so the HTTP
layer only routes (it depends on the narrow :class:`~hypercache.cluster.http.NodeView`
protocol, which this class implements) and the node only runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hypercache.cluster.merkle import list_keys
from hypercache.cluster.metrics import asyncio_tasks, counter, gauge
from hypercache.cluster.swim import State
from hypercache.errors import ConfigError

if TYPE_CHECKING:
    from hypercache.cluster.http import NodeView
    from hypercache.cluster.node import Node

__all__ = ["NodeStatus"]

#: Server counters exported as ``hypercache_net_<name>_total``: (attribute of
#: NetStats, name, HELP). Traffic, and every cap and deadline that bites (in-flight
#: cap, write backpressure, request deadlines, connection caps; see ServerOptions).
_NET_COUNTERS: Final = (
    ("frames_in", "received_frames", "Frames received by the data-plane server."),
    ("frames_out", "sent_frames", "Frames sent by the data-plane server."),
    ("bytes_in", "received_bytes", "Bytes received by the data-plane server."),
    ("bytes_out", "sent_bytes", "Bytes sent by the data-plane server."),
    (
        "protocol_errors",
        "protocol_errors",
        "Malformed or oversized frames received; each closed its connection.",
    ),
    (
        "handshake_failures",
        "handshake_failures",
        "Connections whose HELLO was refused (cluster name, protocol version, token, "
        "peer proof or layout).",
    ),
    ("connections_accepted", "connections_accepted", "Connections accepted."),
    (
        "connections_rejected",
        "connections_rejected",
        "Connections refused on accept or at their HELLO: a cap was reached, or the "
        "server was closing.",
    ),
    (
        "inflight_pauses",
        "inflight_pauses",
        "Times a connection stopped being read with max_inflight requests in flight.",
    ),
    (
        "write_pauses",
        "write_pauses",
        "Times the transport asked the server to stop writing (buffer over its high mark).",
    ),
    ("timeouts", "timeouts", "Requests that ran out of time."),
    (
        "expired",
        "expired",
        "Requests refused unstarted because their deadline had passed.",
    ),
    (
        "rejected_source",
        "rejected_source",
        "Connections refused: max_connections_per_source reached for their host.",
    ),
    (
        "rejected_pending",
        "rejected_pending",
        "Connections refused: max_pending_handshakes reached.",
    ),
    (
        "rejected_clients",
        "rejected_clients",
        "Client HELLOs refused: max_connections reached.",
    ),
    (
        "frame_timeouts",
        "frame_timeouts",
        "Connections closed: a frame begun did not complete within frame_timeout.",
    ),
    (
        "idle_closes",
        "idle_closes",
        "Client connections closed after idle_timeout without a request.",
    ),
    (
        "output_limit_closes",
        "output_limit_closes",
        "Connections closed: their unread answers passed max_output_buffer.",
    ),
    (
        "handshake_timeouts",
        "handshake_timeouts",
        "Connections closed: no HELLO within handshake_timeout.",
    ),
    (
        "prehello_oversize",
        "prehello_oversize",
        "Connections closed: a frame before the HELLO was over the pre-auth frame limit.",
    ),
)


class NodeStatus:
    """The reports of one node (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    # ---------------------------------------------------------------- identity

    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def partitions(self) -> int:
        return int(self.node.store.partitions)

    @property
    def max_key(self) -> int:
        return self.node.config.max_key

    # ---------------------------------------------------------------- JSON views

    def health(self) -> tuple[dict[str, Any], bool]:
        """``status``: ``ok`` (every member up, so every owner set whole),
        ``degraded`` (running, but members are down: ``missing`` names them and counts
        the partitions short of an owner), or the node's own state when it is not
        running (``new``, ``stopping``, ``stopped``: HTTP 503), or ``leaving`` (it
        serves until its hand-over is done: HTTP 503 too)."""
        node = self.node
        running = node.state == "running"
        started = node.is_started
        missing = self._missing() if running else None
        status = node.state if not running else "degraded" if missing else "ok"
        if running and node.leaving:
            # Serving still, but on its way out: a load balancer takes it out.
            status, running = "leaving", False
        body: dict[str, Any] = {
            "status": status,
            "node_id": node.node_id,
            "address": node.address,
            "members": len(node.members()),
            "members_up": node.membership.up_count() if started else 1,
            "seeds_pending": node.membership.seeds_pending if started else [],
            "epoch": node.epoch,
            "version": node.membership.version if started else 0,
            # Holds every partition it owns (a joining or restarted node streams them
            # first): see /dist/rebalance.
            "ready": node.rebalancer.ready if started else False,
        }
        if missing:
            body["missing"] = missing
        return body, running

    def _missing(self) -> dict[str, Any] | None:
        """What keeps the node from ``ok``: the members down and how many partitions
        they leave short of an owner, and the partitions this node owns but has not
        received yet (``None``: nothing)."""
        node = self.node
        missing: dict[str, Any] = {}
        is_up = node.membership.is_up
        down = sorted(nid for nid, _ in node.members() if nid != node.node_id and not is_up(nid))
        ring = node.ring
        partitions = int(ring.partitions)
        if down:
            gone = set(down)
            short = sum(
                1 for p in range(partitions) if not gone.isdisjoint(ring.partition_owners(p))
            )
            missing.update(down=down, partitions_short=short, partitions=partitions)
        rebalancer = node.rebalancer
        if not rebalancer.ready:
            missing["partitions_not_ready"] = rebalancer.states.unready
            missing["partitions"] = partitions
        return missing or None

    def stats(self) -> dict[str, Any]:
        node = self.node
        store = node.store
        started = node.is_started
        clock = node.clock if started else None
        return {
            "node_id": node.node_id,
            "state": node.state,
            "address": node.address,
            "http": node.http_address,
            "uptime_s": round(time.monotonic() - node.started_at, 3) if node.started_at else 0,
            "keys": node.key_count(),
            "store": {
                "keys": node.key_count(),
                "bytes": int(store.bytes),
                "max_bytes": int(store.max_bytes),
                "tombstones": int(store.tombstones),
                "evictions": int(store.evictions),
                "expirations": int(store.expirations),
                "tombstones_purged": int(store.tombstones_purged),
            },
            "members": len(node.members()),
            "members_up": node.membership.up_count() if started else 1,
            "epoch": node.epoch,
            "membership": self._membership() if started else None,
            "clock": None
            if clock is None
            else {
                "last_ts": int(clock.last),
                "drift_ms": int(clock.drift_ms),
                "max_skew_ms": int(clock.max_skew_ms),
            },
            "peer_auth": {
                "secret": node.peer_auth.enabled,
                "refused": node.peer_auth.refused,
                "replays": node.peer_auth.replays,
                "peer_ops_refused": node.peer_ops_refused,
            },
            "net": node.server.stats.as_dict() if started else {},
            "dist": node.metrics.stats.as_dict(),
            "antientropy": node.antientropy.stats.as_dict() if started else {},
            "background": node.coordinator.background if started else 0,
            "tasks": asyncio_tasks(),
            "busy_poll": self._busy_poll(),
            "cpu_latency_limit": self._cpu_latency(),
        }

    def _membership(self) -> dict[str, Any]:
        m = self.node.membership
        swim = m.swim
        return {
            "version": m.version,
            "incarnation": m.incarnation,
            "states": {state.label: n for state, n in swim.counts().items()},
            "probes": dict(swim.probes),
            "transitions": {state.label: n for state, n in swim.transitions.items()},
            "refutations": swim.refutations,
            "restarts": swim.restarts,
            "stalls": swim.stalls,
            "gossip_queued": swim.queued,
            "gossip_dropped": swim.gossip_dropped,
            "records_refused": swim.records_refused,
            "indirect_refused": m.indirect_refused,
        }

    def _busy_poll(self) -> dict[str, Any] | None:
        node = self.node
        p = node.poller if node.is_started else None
        if p is None:
            return None
        return {
            "window_us": round(node.config.busy_poll * 1e6, 3),
            "windows": p.windows,
            "polling_s": round(p.spin_ns / 1e9, 6),
        }

    def _cpu_latency(self) -> dict[str, Any] | None:
        request = self.node.cpu_latency
        if request is None:
            return None
        return {"limit_us": request.limit_us, "held": request.held, "error": request.error}

    def config(self) -> dict[str, Any]:
        return self.node.config.to_dict()

    def metrics_text(self) -> bytes:
        return self.node.metrics.render()

    def dist_metrics(self) -> dict[str, Any]:
        metrics = self.node.metrics
        body = metrics.stats.as_dict()
        body["node_id"] = self.node.node_id
        body["latency"] = metrics.latency_summary()
        return body

    def owners(self, key: bytes) -> dict[str, Any]:
        node = self.node
        ring = node.ring
        members = {nid: addr for nid, addr in node.members()}
        up = node.membership.is_up if node.is_started else (lambda nid: nid == node.node_id)
        return {
            "key": key.decode("utf-8", "replace"),
            "key_hex": key.hex(),
            "partition": int(ring.partition_of(key)),
            "owners": [
                {"node_id": nid, "address": members.get(nid), "up": up(nid)}
                for nid in ring.owners(key)
            ],
            "epoch": node.epoch,
        }

    def members(self) -> dict[str, Any]:
        node = self.node
        started = node.is_started
        m = node.membership if started else None
        out: list[dict[str, Any]]
        if m is None:
            out = [{"node_id": node.node_id, "address": node.address, "up": True, "self": True}]
        else:
            out = m.member_table()
            now = time.monotonic()
            for row in out:
                peer = m.peers.get(row["node_id"])
                if peer is not None:
                    row["last_ok_ago_s"] = round(now - peer.last_ok, 3)
        return {
            "self": node.node_id,
            "epoch": node.epoch,
            # Equal on every node whose member table agrees (see
            # hypercache.cluster.swim, "Membership version").
            "version": m.version if m is not None else 0,
            "members": out,
            "seeds_pending": m.seeds_pending if m is not None else [],
            # Claimed members not confirmed by a handshake with them (see
            # hypercache.cluster.membership, "Trust").
            "candidates": [[nid, addr] for nid, addr in m.candidates] if m is not None else [],
            "checks_failed": m.checks_failed if m is not None else 0,
            "candidates_dropped": m.candidates_dropped if m is not None else 0,
            "layout_refused": m.layout_refused if m is not None else 0,
        }

    def remove(self, node_id: str) -> tuple[dict[str, Any], int]:
        """``POST /cluster/remove``: take a dead member out of the ring; 404 for an
        unknown member, 409 (with the reason) for one that is not dead nor suspect."""
        node = self.node
        if not node.is_started or node.state != "running":
            return {"error": f"node is {node.state}"}, 503
        state = node.membership.state_of(node_id)
        if state is None:
            return {"error": f"{node_id!r} is not a member"}, 404
        try:
            return node.remove_member(node_id), 200
        except ConfigError as exc:
            return {"error": exc.message, "node_id": node_id, "state": state.label}, 409

    def leave(self) -> tuple[dict[str, Any], int]:
        """``POST /cluster/leave``: this node leaves the cluster, then stops (202: it
        has started; the hand-over goes on after the answer)."""
        node = self.node
        if not node.is_started or node.state != "running":
            return {"error": f"node is {node.state}"}, 503
        return node.leave_and_stop(), 202

    def ring(self, table: bool) -> dict[str, Any]:
        node = self.node
        ring = node.ring
        body: dict[str, Any] = {
            "epoch": node.epoch,
            "nodes": list(ring.nodes),
            "partitions": int(ring.partitions),
            "replication": int(ring.replication),
            "vnodes": int(ring.vnodes),
            "load": ring.load(),
        }
        if table:
            body["table"] = ring.table()
        return body

    def antientropy(self) -> dict[str, Any]:
        body: dict[str, Any] = {"node_id": self.node.node_id}
        if self.node.is_started:
            body.update(self.node.antientropy.stats.as_dict())
        return body

    def hints(self) -> dict[str, Any]:
        """``queued``: hints waiting now; per-target pending; the handoff counters."""
        body: dict[str, Any] = {"node_id": self.node.node_id}
        if self.node.is_started:
            body.update(self.node.handoff.as_dict())
        else:
            body["queued"] = 0
        return body

    def rebalance(self) -> dict[str, Any]:
        """Readiness, transfers queued and running, pending owners, partitions waiting
        for removal, the last ring change's diff, the settings and the counters."""
        body: dict[str, Any] = {"node_id": self.node.node_id}
        if self.node.is_started:
            body.update(self.node.rebalancer.report())
        return body

    def merkle(self, partition: int | None) -> dict[str, Any]:
        store = self.node.store
        parts = int(store.partitions)
        body: dict[str, Any] = {
            "node_id": self.node.node_id,
            "partitions": parts,
            "sub_buckets": int(store.sub_buckets),
        }
        if partition is not None:
            p = partition
            body["partition"] = p
            body["digest"] = f"{store.digest(p):016x}"
            body["entries"] = int(store.partition_len(p))
            body["sub_digests"] = [f"{d:016x}" for d in store.sub_digests(p)]
        else:
            body["digests"] = {
                str(p): f"{store.digest(p):016x}" for p in range(parts) if store.partition_len(p)
            }
        return body

    def keys(self, partition: int, cursor: bytes | None, limit: int) -> dict[str, Any]:
        page, next_cursor = list_keys(
            self.node.store, partition, cursor, limit, self.node.wall_ms()
        )
        return {
            "partition": partition,
            "keys": [
                {"key": k.hex(), "ts": ts, "origin": origin, "tombstone": tomb, "expire_at": exp}
                for k, ts, origin, tomb, exp in page
            ],
            "next_cursor": None if next_cursor is None else next_cursor.hex(),
        }

    # ---------------------------------------------------------------- Prometheus

    def collect(self) -> Iterator[Metric]:
        """The families of the node's own state (the coordinator's counters, the
        anti-entropy and handoff loops have collectors of their own)."""
        node = self.node
        store = node.store
        yield gauge("hypercache_keys", "Live entries in the local store.", node.key_count())
        yield gauge("hypercache_bytes", "Bytes charged to the local store.", int(store.bytes))
        yield gauge("hypercache_max_bytes", "Byte budget of the store (0 = none).", store.max_bytes)
        yield gauge("hypercache_tombstones", "Tombstones held.", int(store.tombstones))
        yield counter("hypercache_evictions", "Entries evicted by the budget.", store.evictions)
        yield counter("hypercache_expirations", "Entries expired by TTL.", store.expirations)
        yield counter("hypercache_tombstones_purged", "Tombstones purged.", store.tombstones_purged)
        yield gauge("hypercache_dist_ring_epoch", "Ring rebuilds seen.", node.epoch)
        yield counter(
            "hypercache_dist_peer_handshakes_refused",
            "HELLOs naming a node id refused: no, wrong, stale or replayed proof of the "
            "cluster secret, or (open cluster) not from loopback.",
            node.peer_auth.refused,
        )
        yield counter(
            "hypercache_dist_peer_ops_refused",
            "Peer operations (replica, hint, anti-entropy) refused to client connections.",
            node.peer_ops_refused,
        )
        if node.cpu_latency is not None:
            yield gauge(
                "hypercache_cpu_latency_limit_held",
                "1 while the configured CPU wake-up latency limit is held, else 0",
                int(node.cpu_latency.held),
            )
        if not node.is_started:
            return
        membership = node.membership
        swim = membership.swim
        members = GaugeMetricFamily(
            "hypercache_dist_members", "Members in this node's table, per state.", labels=["state"]
        )
        for state, n in swim.counts().items():
            members.add_metric([state.label], n)
        yield members
        yield gauge("hypercache_dist_members_up", "Members up.", membership.up_count())
        yield gauge(
            "hypercache_dist_membership_version",
            "Membership version: equal on nodes whose member tables agree.",
            membership.version,
        )
        probes = CounterMetricFamily(
            "hypercache_dist_probes",
            "Probe verdicts: ack (direct), indirect (through a helper), failed (no ack), "
            "inconclusive (this node stalled).",
            labels=["result"],
        )
        for result, n in swim.probes.items():
            probes.add_metric([result], n)
        yield probes
        transitions = CounterMetricFamily(
            "hypercache_dist_member_transitions",
            "Changes of a member's state in this node's table, per new state (joins "
            "count as alive).",
            labels=["to"],
        )
        for state in State:
            transitions.add_metric([state.label], swim.transitions[state])
        yield transitions
        yield counter(
            "hypercache_dist_refutations",
            "Times this node refuted a record about itself (raised its incarnation).",
            swim.refutations,
        )
        yield counter(
            "hypercache_dist_member_restarts", "Members seen back in a new life.", swim.restarts
        )
        yield gauge(
            "hypercache_dist_gossip_queued",
            "Members whose record waits to be gossiped.",
            swim.queued,
        )
        yield counter(
            "hypercache_dist_gossip_dropped",
            "Queued gossip updates dropped at the queue's cap (push-pull repairs them).",
            swim.gossip_dropped,
        )
        yield counter(
            "hypercache_dist_gossip_records_refused",
            "Gossiped records refused: malformed, or an incarnation past the horizon.",
            swim.records_refused,
        )
        yield counter(
            "hypercache_dist_indirect_probes_refused",
            "PING_REQs answered with a nack at once: too many indirect probes running.",
            membership.indirect_refused,
        )
        yield counter(
            "hypercache_dist_heartbeat_failures",
            "Pings (probes, notices) that got no answer.",
            membership.heartbeats_failed,
        )
        yield counter(
            "hypercache_dist_liveness_changes",
            "Times a member stopped being alive or became alive again.",
            membership.liveness_changes,
        )
        yield counter(
            "hypercache_dist_heartbeat_stalls",
            "Probe periods over failure_timeout late (this node stalled); nobody is judged "
            "on them.",
            membership.stalls,
        )
        yield gauge(
            "hypercache_dist_member_candidates",
            "Claimed members waiting for a handshake to confirm them.",
            len(membership.candidates),
        )
        yield counter(
            "hypercache_dist_member_candidates_dropped",
            "Member claims dropped: too many waiting (MAX_CANDIDATES).",
            membership.candidates_dropped,
        )
        yield counter(
            "hypercache_dist_peer_layout_refused",
            "Peer handshakes refused because the peer's partitions, replication or vnodes "
            "differ from this node's.",
            membership.layout_refused,
        )
        yield gauge(
            "hypercache_dist_clock_drift_seconds",
            "How far the hybrid logical clock runs ahead of the wall clock.",
            node.clock.drift_ms / 1000,
        )
        poller = node.poller
        if poller is not None:
            yield counter(
                "hypercache_busy_poll_windows",
                "Times the event loop was kept awake after a socket write",
                poller.windows,
            )
            yield counter(
                "hypercache_busy_poll_seconds",
                "Seconds the event loop polled instead of sleeping",
                poller.spin_ns / 1e9,
            )
        yield gauge(
            "hypercache_dist_background_requests",
            "Replica requests and repairs still running.",
            node.coordinator.background,
        )
        net = node.server.stats
        for attribute, name, doc in _NET_COUNTERS:
            yield counter(f"hypercache_net_{name}", doc, getattr(net, attribute))
        yield gauge("hypercache_net_connections_open", "Open connections.", net.connections_open)
        yield gauge("hypercache_net_in_flight", "Requests being handled.", net.in_flight)


if TYPE_CHECKING:  # NodeStatus is what the management HTTP serves
    _view: NodeView = NodeStatus.__new__(NodeStatus)
