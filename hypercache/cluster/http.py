"""Management HTTP of a node (aiohttp), on its own port (``config.http``).

======================  ======================================================
``GET /health``         ``{"status": "ok", ...}`` while the node runs (503 otherwise)
``GET /stats``          node, store (incl. ``keys``), network and dist counters
``GET /config``         the effective configuration (auth token redacted)
``GET /metrics``        Prometheus text exposition (``hypercache_*``)
``GET /dist/metrics``   JSON: forwards, write attempts/acks, quorum failures, read
                        repairs, version conflicts, latency histograms
``GET /dist/owners``    ``?key=K`` (UTF-8) or ``?key_hex=..``: partition and owners
``GET /cluster/members`` members with address and liveness
``GET /cluster/ring``   ring parameters and per-node load; ``?table=1`` adds the table
``GET /dist/antientropy`` anti-entropy counters and current interval
``GET /dist/hints``     hinted handoff: ``queued`` (waiting now), per-target pending,
                        counters (queued, replayed, expired, dropped per cap, bytes)
``GET /internal/merkle`` partition digests (non-empty partitions; hex), or with
                        ``?partition=P`` its sub-bucket digests
``GET /internal/keys``  ``?partition=P&cursor=HEX&limit=L``: one page of the
                        partition's entries sorted by key (keys hex)
======================  ======================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from hypercache._core.hlc import wall_clock_ms
from hypercache.cluster.antientropy import list_keys

if TYPE_CHECKING:
    from hypercache.cluster.node import Node

__all__ = ["make_app", "start_http"]

_NODE: web.AppKey[Node] = web.AppKey("node")


def _node(request: web.Request) -> Node:
    return request.app[_NODE]


async def _health(request: web.Request) -> web.Response:
    node = _node(request)
    running = node.state == "running"
    membership = node.membership
    body = {
        "status": "ok" if running else node.state,
        "node_id": node.node_id,
        "address": node.address,
        "members": len(node.members()),
        "members_up": membership.up_count() if membership is not None else 1,
        "seeds_pending": membership.seeds_pending if membership is not None else [],
        "epoch": node.epoch,
    }
    return web.json_response(body, status=200 if running else 503)


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(_node(request).stats())


async def _config(request: web.Request) -> web.Response:
    return web.json_response(_node(request).config.to_dict())


async def _metrics(request: web.Request) -> web.Response:
    body = _node(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _dist_metrics(request: web.Request) -> web.Response:
    node = _node(request)
    body = node.metrics.stats.as_dict()
    body["node_id"] = node.node_id
    body["latency"] = node.metrics.latency_summary()
    return web.json_response(body)


def _key_param(request: web.Request) -> bytes:
    query = request.query
    if "key_hex" in query:
        try:
            return bytes.fromhex(query["key_hex"])
        except ValueError:
            raise web.HTTPBadRequest(text="key_hex: not hexadecimal") from None
    if "key" in query:
        return query["key"].encode("utf-8")
    raise web.HTTPBadRequest(text="key: missing query parameter (?key=K or ?key_hex=HEX)")


async def _owners(request: web.Request) -> web.Response:
    node = _node(request)
    key = _key_param(request)
    ring = node.ring
    members = dict((nid, addr) for nid, addr in node.members())
    membership = node.membership
    owners = [
        {
            "node_id": nid,
            "address": members.get(nid),
            "up": membership.is_up(nid) if membership is not None else nid == node.node_id,
        }
        for nid in ring.owners(key)
    ]
    return web.json_response(
        {
            "key": key.decode("utf-8", "replace"),
            "key_hex": key.hex(),
            "partition": int(ring.partition_of(key)),
            "owners": owners,
            "epoch": node.epoch,
        }
    )


async def _members(request: web.Request) -> web.Response:
    node = _node(request)
    membership = node.membership
    out: list[dict[str, Any]] = []
    for nid, addr in node.members():
        if nid == node.node_id:
            out.append({"node_id": nid, "address": addr, "up": True, "self": True})
        elif membership is not None and nid in membership.peers:
            out.append(membership.peers[nid].as_dict())
    return web.json_response(
        {
            "self": node.node_id,
            "epoch": node.epoch,
            "members": out,
            "seeds_pending": membership.seeds_pending if membership is not None else [],
            # Claimed members not confirmed by a handshake with them (see
            # hypercache.cluster.membership, "Trust").
            "candidates": (
                [[nid, addr] for nid, addr in membership.candidates]
                if membership is not None
                else []
            ),
            "checks_failed": membership.checks_failed if membership is not None else 0,
            "candidates_dropped": membership.candidates_dropped if membership is not None else 0,
        }
    )


async def _ring(request: web.Request) -> web.Response:
    node = _node(request)
    ring = node.ring
    body: dict[str, Any] = {
        "epoch": node.epoch,
        "nodes": list(ring.nodes),
        "partitions": int(ring.partitions),
        "replication": int(ring.replication),
        "vnodes": int(ring.vnodes),
        "load": ring.load(),
    }
    if request.query.get("table") in ("1", "true", "yes"):
        body["table"] = ring.table()
    return web.json_response(body)


def _int_param(request: web.Request, name: str, default: int | None, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise web.HTTPBadRequest(text=f"{name}: missing query parameter")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}: not an integer: {raw!r}") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=f"{name}: must be between {low} and {high}")
    return value


async def _merkle(request: web.Request) -> web.Response:
    node = _node(request)
    store = node.store
    parts = int(store.partitions)
    body: dict[str, Any] = {
        "node_id": node.node_id,
        "partitions": parts,
        "sub_buckets": int(store.sub_buckets),
    }
    if "partition" in request.query:
        p = _int_param(request, "partition", None, 0, parts - 1)
        body["partition"] = p
        body["digest"] = f"{store.digest(p):016x}"
        body["entries"] = int(store.partition_len(p))
        body["sub_digests"] = [f"{d:016x}" for d in store.sub_digests(p)]
    else:
        body["digests"] = {
            str(p): f"{store.digest(p):016x}" for p in range(parts) if store.partition_len(p)
        }
    return web.json_response(body)


async def _keys(request: web.Request) -> web.Response:
    node = _node(request)
    store = node.store
    p = _int_param(request, "partition", None, 0, int(store.partitions) - 1)
    limit = _int_param(request, "limit", 1000, 1, 100_000)
    raw_cursor = request.query.get("cursor")
    try:
        cursor = bytes.fromhex(raw_cursor) if raw_cursor else None
    except ValueError:
        raise web.HTTPBadRequest(text="cursor: not hexadecimal") from None
    page, next_cursor = list_keys(store, p, cursor, limit, wall_clock_ms())
    return web.json_response(
        {
            "partition": p,
            "keys": [
                {"key": k.hex(), "ts": ts, "origin": origin, "tombstone": tomb, "expire_at": exp}
                for k, ts, origin, tomb, exp in page
            ],
            "next_cursor": None if next_cursor is None else next_cursor.hex(),
        }
    )


async def _antientropy(request: web.Request) -> web.Response:
    node = _node(request)
    ae = node.antientropy
    body: dict[str, Any] = {"node_id": node.node_id}
    if ae is not None:
        body.update(ae.stats.as_dict())
    return web.json_response(body)


async def _hints(request: web.Request) -> web.Response:
    return web.json_response(_node(request).hint_stats())


def make_app(node: Node) -> web.Application:
    """The management application of ``node``."""
    app = web.Application()
    app[_NODE] = node
    app.router.add_get("/health", _health)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/config", _config)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/dist/metrics", _dist_metrics)
    app.router.add_get("/dist/owners", _owners)
    app.router.add_get("/cluster/members", _members)
    app.router.add_get("/cluster/ring", _ring)
    app.router.add_get("/dist/antientropy", _antientropy)
    app.router.add_get("/dist/hints", _hints)
    app.router.add_get("/internal/merkle", _merkle)
    app.router.add_get("/internal/keys", _keys)
    return app


async def start_http(node: Node) -> tuple[web.AppRunner, str]:
    """Serve :func:`make_app` on ``node.config.http``; return the runner and bound address."""
    http = node.config.http_address
    if http is None:
        raise RuntimeError("the management HTTP server is off (config.http is None)")
    host, port = http
    runner = web.AppRunner(
        make_app(node), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    bound_host, bound_port = str(bound[0]), int(bound[1])
    address = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    return runner, address
