"""The services in examples/ run and do what their docstrings say.

Each runs as a script, the way a reader runs it (``python examples/NAME.py``), on a
free port; the cluster one against a real 3-node cluster of ``hypercache-node``
processes.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import running_cluster

import hypercache

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@contextmanager
def service(script: str, *args: str, timeout: float = 30.0) -> Iterator[str]:
    """Run ``examples/<script>`` on a free port; yield its base URL; stop it (it
    must exit 0 on SIGTERM)."""
    with (
        tempfile.TemporaryFile("w+") as stderr,
        subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as proc,
    ):

        def errors() -> str:
            stderr.seek(0)
            return stderr.read()

        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + timeout
            line = ""
            while not line.startswith("listening on "):
                remaining = max(deadline - time.monotonic(), 0)
                ready, _, _ = select.select([proc.stdout], [], [], remaining)
                if not ready or proc.poll() is not None:
                    raise AssertionError(f"{script} did not start:\n{errors()}")
                line = proc.stdout.readline()
            yield line.removeprefix("listening on ").strip()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{errors()}"


def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_the_embedded_service_answers_from_its_cache() -> None:
    with service("embedded_service.py") as url:
        status, first = call("GET", f"{url}/users/7")
        assert status == 200 and first["id"] == 7
        assert call("GET", f"{url}/users/7") == (200, first)  # the same, cached answer
        # ten requests at once for a user not cached yet make one lookup
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda _: call("GET", f"{url}/users/8"), range(10)))
        assert len({a["loaded_at"] for _, a in answers}) == 1
        _, stats = call("GET", f"{url}/stats")
        assert stats["lookups"] == 2 and stats["size"] == 2
        assert stats["hits"] >= 1
        assert call("DELETE", f"{url}/users/7") == (200, {"dropped": True})
        status, again = call("GET", f"{url}/users/7")
        assert again["loaded_at"] > first["loaded_at"]
        assert call("GET", f"{url}/stats")[1]["lookups"] == 3
        assert call("GET", f"{url}/nowhere")[0] == 404


@pytest.mark.functional
def test_the_cluster_service_keeps_sessions_in_the_cluster(tmp_path: Path) -> None:
    with running_cluster(3, tmp_path) as cluster:
        seeds = ",".join(cluster.addresses)
        with service("cluster_service.py", "--seeds", seeds, "--ttl", "600") as url:
            status, created = call("POST", f"{url}/sessions", {"user": 42})
            assert status == 201
            session = f"{url}/sessions/{created['id']}"
            status, got = call("GET", session)
            assert status == 200 and got["user"] == 42 and 0 < got["ttl"] <= 600
            # it is in the cluster, where any other client sees it
            with hypercache.Client(cluster.addresses) as client:
                assert client.get(f"session:{created['id']}") == {"user": 42}
            assert call("POST", f"{url}/sessions", [1, 2])[0] == 400

            # one node of three down: QUORUM still reads and writes
            cluster.kill(2)
            assert call("GET", session)[1]["user"] == 42
            status, other = call("POST", f"{url}/sessions", {"user": 7})
            assert status == 201
            assert call("GET", f"{url}/sessions/{other['id']}")[1]["user"] == 7

            assert call("DELETE", session) == (204, None)
            assert call("GET", session)[0] == 404
            assert call("DELETE", session)[0] == 404
