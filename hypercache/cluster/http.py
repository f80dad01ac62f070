"""Management HTTP of a node (aiohttp), on its own port (``config.http``).

======================  ======================================================
``GET /health``         ``{"status": "ok", ...}`` while the node runs (503 otherwise)
``GET /stats``          node, store (incl. ``keys``), network and dist counters
``GET /config``         the effective configuration (auth token redacted)
``GET /metrics``        Prometheus text exposition (``hypercache_*``)
``GET /dist/metrics``   JSON: forwards, write attempts/acks, quorum failures, read
                        repairs, version conflicts, latency histograms
``GET /dist/owners``    ``?key=K`` (percent-encoded bytes; plain text is UTF-8) or
                        ``?key_hex=..``: partition and owners
``GET /cluster/members`` members: address, state, incarnation, since; the version
``POST /cluster/remove`` ``?node=ID``: take a dead member out of the ring (409 when
                        it is not dead nor suspect)
``POST /cluster/leave`` this node leaves the cluster, hands its data over, then
                        stops (202 at once; ``/health`` says ``leaving`` meanwhile)
``GET /cluster/ring``   ring parameters and per-node load; ``?table=1`` adds the table
``GET /dist/antientropy`` anti-entropy counters and current interval
``GET /dist/hints``     hinted handoff: ``queued`` (waiting now), per-target pending,
                        counters (queued, replayed, expired, dropped per cap, bytes)
``GET /dist/rebalance`` rebalancing: readiness, transfers queued, running and
                        retrying, pending owners, removals waiting, counters
``GET /internal/merkle`` partition digests (non-empty partitions; hex), or with
                        ``?partition=P`` its sub-bucket digests
``GET /internal/keys``  ``?partition=P&cursor=HEX&limit=L``: one page of the
                        partition's entries sorted by key (keys hex)
``GET /internal/faults`` only with ``--fault-injection``: the fault rules and the
                        counts of faults injected (:mod:`hypercache.net.faults`)
``POST /internal/faults`` only with ``--fault-injection``: replace the rule set by
                        the JSON body (``{"rules": []}`` clears it); 400 if invalid
======================  ======================================================
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from hypercache.errors import ConfigError
from hypercache.net.faults import FaultInjector

__all__ = ["NodeView", "make_app", "start_http"]


class NodeView(Protocol):
    """What the management HTTP needs of a node: JSON-ready reports, nothing to run
    (implemented by :class:`hypercache.cluster.status.NodeStatus`)."""

    @property
    def partitions(self) -> int: ...

    @property
    def max_key(self) -> int:
        """The longest key the node takes, bytes."""
        ...

    def health(self) -> tuple[dict[str, Any], bool]:
        """The ``/health`` body, and whether the node is running (200, else 503)."""
        ...

    def stats(self) -> dict[str, Any]: ...
    def config(self) -> dict[str, Any]: ...
    def metrics_text(self) -> bytes: ...
    def dist_metrics(self) -> dict[str, Any]: ...
    def owners(self, key: bytes) -> dict[str, Any]: ...
    def members(self) -> dict[str, Any]: ...
    def remove(self, node_id: str) -> tuple[dict[str, Any], int]:
        """Remove a dead member: the body and the status (200, 404, 409, 503)."""
        ...

    def leave(self) -> tuple[dict[str, Any], int]:
        """Start leaving the cluster (then stop): the body and the status (202, 503)."""
        ...

    def ring(self, table: bool) -> dict[str, Any]: ...
    def antientropy(self) -> dict[str, Any]: ...
    def hints(self) -> dict[str, Any]: ...
    def rebalance(self) -> dict[str, Any]: ...
    def merkle(self, partition: int | None) -> dict[str, Any]: ...
    def keys(self, partition: int, cursor: bytes | None, limit: int) -> dict[str, Any]: ...


_VIEW: web.AppKey[NodeView] = web.AppKey("view")


def _view(request: web.Request) -> NodeView:
    return request.app[_VIEW]


async def _health(request: web.Request) -> web.Response:
    body, running = _view(request).health()
    return web.json_response(body, status=200 if running else 503)


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(_view(request).stats())


async def _config(request: web.Request) -> web.Response:
    return web.json_response(_view(request).config())


async def _metrics(request: web.Request) -> web.Response:
    body = _view(request).metrics_text()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _dist_metrics(request: web.Request) -> web.Response:
    return web.json_response(_view(request).dist_metrics())


def _key_param(request: web.Request) -> bytes:
    """The key of ``?key=`` (its percent-encoded bytes as they are: ``%FF`` is the
    byte 0xFF, not U+FFFD) or of ``?key_hex=``."""
    key = None
    for part in request.rel_url.raw_query_string.split("&"):
        name, _, value = part.partition("=")
        if name == "key_hex":
            try:
                key = bytes.fromhex(unquote_to_bytes(value).decode("ascii"))
            except ValueError:
                raise web.HTTPBadRequest(text="key_hex: not hexadecimal") from None
        elif name == "key":
            key = unquote_to_bytes(value.replace("+", " "))
    if key is None:
        raise web.HTTPBadRequest(text="key: missing query parameter (?key=K or ?key_hex=HEX)")
    limit = _view(request).max_key
    if len(key) > limit:
        raise web.HTTPBadRequest(text=f"key: {len(key)} bytes is over max_key={limit}")
    return key


async def _owners(request: web.Request) -> web.Response:
    return web.json_response(_view(request).owners(_key_param(request)))


async def _members(request: web.Request) -> web.Response:
    return web.json_response(_view(request).members())


async def _remove(request: web.Request) -> web.Response:
    node_id = request.query.get("node")
    if not node_id:
        raise web.HTTPBadRequest(text="node: missing query parameter (?node=ID)")
    body, status = _view(request).remove(node_id)
    return web.json_response(body, status=status)


async def _leave(request: web.Request) -> web.Response:
    body, status = _view(request).leave()
    return web.json_response(body, status=status)


async def _ring(request: web.Request) -> web.Response:
    table = request.query.get("table") in ("1", "true", "yes")
    return web.json_response(_view(request).ring(table))


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
    view = _view(request)
    partition = None
    if "partition" in request.query:
        partition = _int_param(request, "partition", None, 0, view.partitions - 1)
    return web.json_response(view.merkle(partition))


async def _keys(request: web.Request) -> web.Response:
    view = _view(request)
    p = _int_param(request, "partition", None, 0, view.partitions - 1)
    limit = _int_param(request, "limit", 1000, 1, 100_000)
    raw_cursor = request.query.get("cursor")
    try:
        cursor = bytes.fromhex(raw_cursor) if raw_cursor else None
    except ValueError:
        raise web.HTTPBadRequest(text="cursor: not hexadecimal") from None
    return web.json_response(view.keys(p, cursor, limit))


async def _antientropy(request: web.Request) -> web.Response:
    return web.json_response(_view(request).antientropy())


async def _hints(request: web.Request) -> web.Response:
    return web.json_response(_view(request).hints())


async def _rebalance(request: web.Request) -> web.Response:
    return web.json_response(_view(request).rebalance())


_FAULTS: web.AppKey[FaultInjector] = web.AppKey("faults")


async def _faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[_FAULTS].as_dict())


async def _set_faults(request: web.Request) -> web.Response:
    injector = request.app[_FAULTS]
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body: not JSON") from None
    try:
        injector.load(body)
    except ConfigError as exc:
        raise web.HTTPBadRequest(text=f"{exc.field}: {exc.message}") from None
    return web.json_response(injector.as_dict())


def make_app(view: NodeView, faults: FaultInjector | None = None) -> web.Application:
    """The management application of the node that ``view`` reports on; with
    ``faults``, also ``/internal/faults`` (else that path does not exist)."""
    # A request line that holds the longest key percent-encoded (3 characters a
    # byte), and then some: a key past max_key gets our own error, not aiohttp's.
    app = web.Application(handler_args={"max_line_size": 3 * view.max_key + 8192})
    app[_VIEW] = view
    app.router.add_get("/health", _health)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/config", _config)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/dist/metrics", _dist_metrics)
    app.router.add_get("/dist/owners", _owners)
    app.router.add_get("/cluster/members", _members)
    app.router.add_post("/cluster/remove", _remove)
    app.router.add_post("/cluster/leave", _leave)
    app.router.add_get("/cluster/ring", _ring)
    app.router.add_get("/dist/antientropy", _antientropy)
    app.router.add_get("/dist/hints", _hints)
    app.router.add_get("/dist/rebalance", _rebalance)
    app.router.add_get("/internal/merkle", _merkle)
    app.router.add_get("/internal/keys", _keys)
    if faults is not None:
        app[_FAULTS] = faults
        app.router.add_get("/internal/faults", _faults)
        app.router.add_post("/internal/faults", _set_faults)
    return app


async def start_http(
    view: NodeView, host: str, port: int, faults: FaultInjector | None = None
) -> tuple[web.AppRunner, str]:
    """Serve :func:`make_app` on ``host:port`` (port 0 picks one); return the runner
    and the bound address."""
    runner = web.AppRunner(
        make_app(view, faults), access_log=None, handle_signals=False, shutdown_timeout=1.0
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
