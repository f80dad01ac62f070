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
from typing import TYPE_CHECKING, Any

from prometheus_client.core import Metric

from hypercache.cluster.merkle import list_keys
from hypercache.cluster.metrics import counter, gauge

if TYPE_CHECKING:
    from hypercache.cluster.http import NodeView
    from hypercache.cluster.node import Node

__all__ = ["NodeStatus"]

#: Server counters exported as ``hypercache_net_<name>_total``: traffic, and every
#: cap and deadline that bites (in-flight cap, write backpressure, request
#: deadlines, connection caps; see ``ServerOptions``).
_NET_COUNTERS = (
    "frames_in",
    "frames_out",
    "bytes_in",
    "bytes_out",
    "protocol_errors",
    "handshake_failures",
    "connections_accepted",
    "connections_rejected",
    "inflight_pauses",
    "write_pauses",
    "timeouts",
    "expired",
    "rejected_source",
    "rejected_pending",
    "rejected_clients",
    "frame_timeouts",
    "idle_closes",
    "output_limit_closes",
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

    # ---------------------------------------------------------------- JSON views

    def health(self) -> tuple[dict[str, Any], bool]:
        node = self.node
        running = node.state == "running"
        started = node.is_started
        return {
            "status": "ok" if running else node.state,
            "node_id": node.node_id,
            "address": node.address,
            "members": len(node.members()),
            "members_up": node.membership.up_count() if started else 1,
            "seeds_pending": node.membership.seeds_pending if started else [],
            "epoch": node.epoch,
            # Holds every partition it owns (a joining or restarted node streams them
            # first): see /dist/rebalance.
            "ready": node.rebalancer.ready if started else False,
        }, running

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
            "busy_poll": self._busy_poll(),
            "cpu_latency_limit": self._cpu_latency(),
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
        out: list[dict[str, Any]] = []
        for nid, addr in node.members():
            if nid == node.node_id:
                out.append({"node_id": nid, "address": addr, "up": True, "self": True})
            elif started and nid in node.membership.peers:
                out.append(node.membership.peers[nid].as_dict())
        m = node.membership if started else None
        return {
            "self": node.node_id,
            "epoch": node.epoch,
            "members": out,
            "seeds_pending": m.seeds_pending if m is not None else [],
            # Claimed members not confirmed by a handshake with them (see
            # hypercache.cluster.membership, "Trust").
            "candidates": [[nid, addr] for nid, addr in m.candidates] if m is not None else [],
            "checks_failed": m.checks_failed if m is not None else 0,
            "candidates_dropped": m.candidates_dropped if m is not None else 0,
        }

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
        yield gauge("hypercache_keys", "Live entries in the local store", node.key_count())
        yield gauge("hypercache_bytes", "Bytes charged to the local store", int(store.bytes))
        yield gauge("hypercache_max_bytes", "Byte budget of the store (0 = none)", store.max_bytes)
        yield gauge("hypercache_tombstones", "Tombstones held", int(store.tombstones))
        yield counter("hypercache_evictions", "Entries evicted by the budget", store.evictions)
        yield counter("hypercache_expirations", "Entries expired by TTL", store.expirations)
        yield counter("hypercache_tombstones_purged", "Tombstones purged", store.tombstones_purged)
        yield gauge("hypercache_dist_ring_epoch", "Ring rebuilds seen", node.epoch)
        yield counter(
            "hypercache_dist_peer_handshakes_refused",
            "HELLOs naming a node id refused: no, wrong, stale or replayed proof of the "
            "cluster secret, or (open cluster) not from loopback",
            node.peer_auth.refused,
        )
        yield counter(
            "hypercache_dist_peer_ops_refused",
            "Peer operations (replica, hint, anti-entropy) refused to client connections",
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
        yield gauge("hypercache_dist_members", "Members known", len(membership.members))
        yield gauge("hypercache_dist_members_up", "Members up", membership.up_count())
        yield counter(
            "hypercache_dist_heartbeat_failures",
            "Heartbeats that failed",
            membership.heartbeats_failed,
        )
        yield counter(
            "hypercache_dist_liveness_changes",
            "Times a peer was marked down or back up",
            membership.liveness_changes,
        )
        yield counter(
            "hypercache_dist_heartbeat_stalls",
            "Heartbeat rounds over failure_timeout late (this node stalled); no peer "
            "is marked down on them",
            membership.stalls,
        )
        yield gauge(
            "hypercache_dist_member_candidates",
            "Claimed members waiting for a handshake to confirm them",
            len(membership.candidates),
        )
        yield counter(
            "hypercache_dist_member_candidates_dropped",
            "Member claims dropped: too many waiting (MAX_CANDIDATES)",
            membership.candidates_dropped,
        )
        yield gauge(
            "hypercache_dist_clock_drift_seconds",
            "How far the hybrid logical clock runs ahead of the wall clock",
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
            "Replica requests and repairs still running",
            node.coordinator.background,
        )
        net = node.server.stats
        for name in _NET_COUNTERS:
            yield counter(f"hypercache_net_{name}", f"Server {name}", getattr(net, name))
        yield gauge("hypercache_net_connections_open", "Open connections", net.connections_open)
        yield gauge("hypercache_net_in_flight", "Requests being handled", net.in_flight)


if TYPE_CHECKING:  # NodeStatus is what the management HTTP serves
    _view: NodeView = NodeStatus.__new__(NodeStatus)
