"""The package's public surface and what importing it costs."""

from __future__ import annotations

import subprocess
import sys

import hypercache


def test_the_embedded_cache_loads_no_networking_stack() -> None:
    code = (
        "import sys, hypercache, hypercache.cache\n"
        "heavy = ('asyncio', 'msgpack', 'uvloop', 'aiohttp', 'prometheus_client', 'socket')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_clients_load_on_first_use() -> None:
    assert hypercache.Client.__name__ == "Client"
    assert hypercache.AsyncClient.__name__ == "AsyncClient"
    assert set(hypercache.__all__) >= {"HyperCache", "Client", "AsyncClient", "Consistency"}
    try:
        hypercache.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("no AttributeError")
