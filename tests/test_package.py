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


def test_the_distribution_carries_its_license_classifiers_and_urls() -> None:
    from importlib import metadata

    meta = metadata.metadata("hypercache")
    assert {"LICENSE", "NOTICE"} <= set(meta.get_all("License-File") or []), meta.get_all(
        "License-File"
    )
    assert meta["License-Expression"] == "Apache-2.0"
    classifiers = meta.get_all("Classifier") or []
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in classifiers)
    assert meta.get_all("Project-URL"), "no project URLs"


def test_release_extensions_are_stripped_and_built_once() -> None:
    import os
    from pathlib import Path

    core = Path(hypercache.__file__).parent / "_core"
    objects = sorted(core.glob("*.so"))
    assert objects, "no compiled extension next to the sources"
    if os.environ.get("HYPERCACHE_DEBUG") != "1":
        # A release build links with -s: no symbol table.
        for obj in objects:
            assert b".symtab" not in obj.read_bytes(), f"{obj.name} is not stripped"
    # `make build` has nothing left to do once the core is built (one compilation).
    root = core.parent.parent
    if (root / "Makefile").exists() and (root / ".venv").exists():
        up_to_date = subprocess.run(["make", "-q", "build"], cwd=root, capture_output=True)
        assert up_to_date.returncode == 0, "make build would compile the core again"
