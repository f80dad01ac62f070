"""A small HTTP service that keeps the answers of a slow lookup in an embedded cache.

The service answers ``GET /users/<id>`` from a "database" that takes 50 ms a
lookup. A :class:`hypercache.HyperCache` in the process keeps each answer for 30
seconds; concurrent requests for a user not cached yet wait for one lookup instead
of each making their own (``get_or_set`` is single-flight). ``DELETE /users/<id>``
drops the cached answer (after the record changed, say), ``GET /stats`` shows the
cache's counters and how many lookups reached the database.

Standard library only, besides hypercache; the cache is safe to share between the
server's threads without a lock of your own::

    python examples/embedded_service.py --port 8000
    curl -s localhost:8000/users/42      # the first time: 50 ms, from the database
    curl -s localhost:8000/users/42      # then from the cache
    curl -s localhost:8000/stats
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from hypercache import HyperCache

#: 10 000 users at most, the ones used most kept (W-TinyLFU), each for 30 s.
cache: HyperCache[str, dict[str, Any]] = HyperCache(10_000, policy="tinylfu", default_ttl=30)

_lookups = 0
_lookups_lock = threading.Lock()


def load_user(user_id: int) -> dict[str, Any]:
    """The slow part: a database query, an API call..."""
    global _lookups
    with _lookups_lock:
        _lookups += 1
    time.sleep(0.05)
    return {"id": user_id, "name": f"user {user_id}", "loaded_at": time.time()}


def get_user(user_id: int) -> dict[str, Any]:
    return cache.get_or_set(f"user:{user_id}", lambda: load_user(user_id))


class Handler(BaseHTTPRequestHandler):
    USER = re.compile(r"^/users/(\d{1,18})$")

    def do_GET(self) -> None:
        match = self.USER.match(self.path)
        if match:
            self._json(200, get_user(int(match[1])))
        elif self.path == "/stats":
            stats = cache.stats()
            self._json(
                200,
                {
                    "hits": stats.hits,
                    "misses": stats.misses,
                    "size": stats.size,
                    "hit_ratio": stats.hit_ratio,
                    "lookups": _lookups,
                },
            )
        else:
            self._json(404, {"error": f"no such path: {self.path}"})

    def do_DELETE(self) -> None:
        match = self.USER.match(self.path)
        if not match:
            self._json(404, {"error": f"no such path: {self.path}"})
            return
        self._json(200, {"dropped": cache.delete(f"user:{match[1]}")})

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: one line per request is too much for an example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    host, port = server.server_address[:2]
    print(f"listening on http://{host!s}:{port}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
