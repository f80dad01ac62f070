"""A small HTTP session store on a hypercache cluster, with the asyncio client.

Sessions live in the cluster, so every instance of this service (run as many as
you like, on any machine) sees the same ones, and a session survives the loss of a
node: each is written to its key's owners at QUORUM (2 of 3 replicas) with a TTL
and read back at QUORUM.

    POST   /sessions        body: any JSON object -> 201 {"id": ...}
    GET    /sessions/<id>   -> 200 the object, with "ttl" the seconds it has left; 404
    DELETE /sessions/<id>   -> 204; 404

Against the local cluster of ``make run``::

    python examples/cluster_service.py --seeds 127.0.0.1:7400,127.0.0.1:7401 --port 8001
    curl -s -X POST -d '{"user": 42}' localhost:8001/sessions     # {"id": "..."}
    curl -s localhost:8001/sessions/<id>

The seeds also come from ``HYPERCACHE_SEEDS``, and a cluster's ``auth_token`` from
``HYPERCACHE_AUTH_TOKEN``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

import hypercache
from hypercache.errors import HyperCacheError

CLIENT = web.AppKey("client", hypercache.AsyncClient)
TTL = web.AppKey("ttl", float)


def _key(session_id: str) -> str:
    return f"session:{session_id}"


async def create(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        return web.json_response({"error": "the body must be a JSON object"}, status=400)
    session_id = secrets.token_urlsafe(16)
    client = request.app[CLIENT]
    await client.set(_key(session_id), body, ttl=request.app[TTL], consistency="quorum")
    return web.json_response({"id": session_id}, status=201)


async def read(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    key = _key(request.match_info["id"])
    session: dict[str, Any] | None = await client.get(key, consistency="quorum")
    if session is None:
        return web.json_response({"error": "no such session"}, status=404)
    return web.json_response({**session, "ttl": await client.ttl(key)})


async def delete(request: web.Request) -> web.Response:
    found = await request.app[CLIENT].delete(_key(request.match_info["id"]), consistency="quorum")
    if not found:
        return web.json_response({"error": "no such session"}, status=404)
    return web.Response(status=204)


@web.middleware
async def cluster_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """A cluster that cannot answer (too few replicas up, a timeout) is a 503."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except HyperCacheError as exc:
        return web.json_response({"error": str(exc)}, status=503)


def build_app(seeds: list[str], ttl: float, auth_token: str | None) -> web.Application:
    app = web.Application(middlewares=[cluster_errors])
    app[TTL] = ttl

    async def client_context(app: web.Application) -> AsyncIterator[None]:
        # one client for the whole service: it keeps a connection to each node
        async with hypercache.AsyncClient(seeds, auth_token=auth_token) as client:
            app[CLIENT] = client
            yield

    app.cleanup_ctx.append(client_context)
    app.router.add_post("/sessions", create)
    app.router.add_get("/sessions/{id}", read)
    app.router.add_delete("/sessions/{id}", delete)
    return app


async def serve(args: argparse.Namespace) -> None:
    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]
    app = build_app(seeds, args.ttl, os.environ.get("HYPERCACHE_AUTH_TOKEN") or None)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
        host, port = runner.addresses[0][:2]
        print(f"listening on http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()  # closes the client too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds",
        default=os.environ.get("HYPERCACHE_SEEDS", "127.0.0.1:7400"),
        help="HOST:PORT[,HOST:PORT...] of cluster nodes [env HYPERCACHE_SEEDS]",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--ttl", type=float, default=1800.0, help="seconds a session lives")
    args = parser.parse_args()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
