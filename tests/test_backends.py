"""The backend contract, run against every backend: in-process memory, a real
redis-server, a real Redis Cluster and a real hypercache-node (one parametrized
suite); then ``hypercache.open`` URL parsing and the error mapping."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import BACKEND_KINDS, backend_url

import hypercache
from hypercache.backends import (
    MISSING,
    AsyncMemoryBackend,
    Backend,
    MemoryBackend,
    open,
    open_async,
)
from hypercache.backends.cluster import HypercacheBackend
from hypercache.backends.redis import RedisBackend
from hypercache.client.compression import DEFAULT_LEVEL, MARK, CompressedSerializer, Compression
from hypercache.client.serializer import (
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    RawSerializer,
)
from hypercache.errors import ConfigError, NodeUnavailableError, RequestTimeoutError


def _ns() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture(params=BACKEND_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(request: pytest.FixtureRequest, kind: str) -> str:
    return backend_url(request, kind, _ns())


@pytest.fixture
def backend(url: str) -> Iterator[Backend]:
    b = open(url)
    yield b
    b.clear()
    b.close()


def _sibling(b: Backend, url: str, namespace: str) -> Backend:
    """Another backend over the same store, in ``namespace``."""
    if isinstance(b, MemoryBackend):
        return MemoryBackend(b.store, namespace=namespace)
    return open(url.split("?")[0] + f"?namespace={namespace}")


def _wait(check: Any, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


# ------------------------------------------------------------------- the contract


@pytest.mark.parametrize(
    "value", [{"name": "Ada", "n": [1, 2.5, None]}, [1, "two"], "text", 7, b"\x00bytes", None]
)
def test_a_value_reads_back_as_stored(backend: Backend, value: Any) -> None:
    backend.set("k", value)
    assert backend.get("k", "absent") == value
    assert backend.get_entry("k") == (value, None)


def test_an_absent_key_is_missing_or_the_default(backend: Backend) -> None:
    assert backend.get_entry("nope") is MISSING
    assert backend.get("nope") is None
    assert backend.get("nope", 5) == 5
    with pytest.raises(KeyError):
        backend.ttl("nope")


def test_str_and_bytes_keys_name_one_entry(backend: Backend) -> None:
    backend.set("same", 1)
    assert backend.get(b"same") == 1
    backend.set(b"same", 2)
    assert backend.get("same") == 2


def test_ttl_is_what_is_left(backend: Backend) -> None:
    before = time.monotonic()
    backend.set("t", 1, ttl=30)
    left = backend.ttl("t")
    assert left is not None
    assert 30 - (time.monotonic() - before) - 0.01 <= left <= 30
    entry = backend.get_entry("t")
    assert entry is not MISSING
    assert entry[1] is not None and 0 < entry[1] <= 30  # type: ignore[index]
    backend.set("forever", 1)
    assert backend.ttl("forever") is None


def test_an_entry_expires(backend: Backend) -> None:
    backend.set("short", 1, ttl=0.2)
    backend.set("long", 1, ttl=60)
    _wait(lambda: backend.get_entry("short") is MISSING)
    assert backend.get("long") == 1


def test_delete_says_whether_it_was_there(backend: Backend) -> None:
    backend.set("d", 1)
    assert backend.delete("d") is True
    assert backend.delete("d") is False
    assert backend.get_entry("d") is MISSING


def test_get_many_and_set_many(backend: Backend) -> None:
    backend.set_many({f"m{i}": i for i in range(30)}, ttl=60)
    got = backend.get_many([*(f"m{i}" for i in range(30)), "absent", b"m1"])
    want: dict[str | bytes, int] = {f"m{i}": i for i in range(30)}
    assert got == {**want, b"m1": 1}
    assert backend.get_many([]) == {}
    entries = backend.get_entries(["m3", "absent"])
    assert set(entries) == {"m3"}
    value, left = entries["m3"]
    assert value == 3 and left is not None and 0 < left <= 60


def test_add_stores_only_when_absent_and_delete_if_only_its_own(backend: Backend) -> None:
    assert backend.add("lease", "me", ttl=30) is True
    assert backend.add("lease", "you", ttl=30) is False
    assert backend.get("lease") == "me"
    assert backend.delete_if("lease", "you") is False
    assert backend.get("lease") == "me"
    assert backend.delete_if("lease", "me") is True
    assert backend.get_entry("lease") is MISSING


def test_clear_drops_its_namespace_only(backend: Backend, url: str) -> None:
    other = _sibling(backend, url, _ns())
    try:
        backend.set_many({"a": 1, "b": 2})
        other.set("a", "other's")
        assert backend.clear() == 2
        assert backend.get_many(["a", "b"]) == {}
        assert other.get("a") == "other's"
    finally:
        other.clear()
        other.close()


def test_bad_arguments_are_refused_before_anything_is_sent(backend: Backend) -> None:
    with pytest.raises(ConfigError):
        backend.set("k", 1, ttl=0)
    with pytest.raises(ConfigError):
        backend.set("k", 1, ttl=-1)
    with pytest.raises(TypeError):
        backend.set(3, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        backend.set("k", object())
    assert backend.get_entry("k") is MISSING


def test_the_async_twin_keeps_the_same_contract(url: str) -> None:
    async def main() -> None:
        b = open_async(url)
        try:
            await b.set("k", {"v": 1}, ttl=30)
            assert await b.get("k") == {"v": 1}
            entry = await b.get_entry("k")
            assert entry is not MISSING and entry[0] == {"v": 1}  # type: ignore[index]
            assert await b.get_entry("nope") is MISSING
            left = await b.ttl("k")
            assert left is not None and 0 < left <= 30
            await b.set_many({"a": 1, "b": 2})
            assert await b.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}
            assert await b.add("a", 3) is False
            assert await b.add("lease", "t", ttl=5) is True
            assert await b.delete_if("lease", "x") is False
            assert await b.delete_if("lease", "t") is True
            assert await b.delete("a") is True
            assert await b.delete("a") is False
            assert await b.clear() == 2
            assert await b.get_many(["k", "b"]) == {}
            await b.ping()
        finally:
            await b.close()

    asyncio.run(main())


# ------------------------------------------------------------------- open(URL)


def test_open_picks_the_backend_of_the_scheme(request: pytest.FixtureRequest) -> None:
    m = open("memory://?max_items=5&policy=lfu&namespace=x:&serializer=json")
    assert isinstance(m, MemoryBackend)
    assert m.store.capacity == 5 and m.store.policy_name == "lfu"
    # (the serializer stack: the URL's serializer under the value codec)
    assert isinstance(m.serializer, CompressedSerializer)
    assert m.namespace == b"x:" and isinstance(m.serializer.inner, JsonSerializer)
    r = open("redis://:secret@127.0.0.1:1/3?timeout=0.2&serializer=pickle")
    assert isinstance(r, RedisBackend) and not r.cluster
    assert isinstance(r.client, redis.Redis)
    kwargs = r.client.connection_pool.connection_kwargs
    assert kwargs["db"] == 3 and kwargs["password"] == "secret"
    assert kwargs["socket_timeout"] == 0.2 and kwargs["socket_connect_timeout"] == 0.2
    assert isinstance(r.serializer, CompressedSerializer)
    assert isinstance(r.serializer.inner, PickleSerializer)
    r.close()
    h = open("hypercache://127.0.0.1:1,127.0.0.1:2?serializer=raw&cluster_name=c")
    assert isinstance(h, HypercacheBackend)
    assert isinstance(h.serializer, RawSerializer)
    assert h.client.options.seeds == ("127.0.0.1:1", "127.0.0.1:2")
    assert h.client.options.compression == Compression()  # the cluster client's own
    h.close()
    off = open("hypercache://127.0.0.1:1?compression=off")
    assert isinstance(off, HypercacheBackend) and off.client.options.compression is None
    off.close()
    assert hypercache.open is open
    assert isinstance(open_async("memory://"), AsyncMemoryBackend)


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("mysql://h", "url"),
        ("memory", "url"),
        ("memory://?max_items=0", "max_items"),
        ("memory://?max_items=lots", "max_items"),
        ("memory://?colour=red", "colour"),
        ("redis://h:1?serializer=yaml", "serializer"),
        ("redis://h:1?timeout=-1", "timeout"),
        ("redis://h:1/zero", "url"),
        ("redis://h:port", "url"),
        ("redis+cluster://?timeout=1", "url"),
        ("memory://?compression=lz4", "compression"),
        ("redis://h:1?compression=zstd:99", "compression"),
        ("hypercache://h:1?compression=zstd:x", "compression"),
    ],
)
def test_open_names_what_is_wrong(url: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        open(url)
    assert info.value.field == field


def test_a_server_that_is_not_there_is_a_typed_error_in_bounded_time() -> None:
    from cluster_harness import free_port_run

    port = free_port_run(1)
    b = open(f"redis://127.0.0.1:{port}?timeout=0.2")
    with pytest.raises(NodeUnavailableError):
        b.get("k")
    with pytest.raises(NodeUnavailableError):
        b.set("k", 1)
    b.close()


def test_a_server_that_does_not_answer_times_out(tmp_path: Path) -> None:
    """A stopped redis-server (SIGSTOP) is a RequestTimeoutError, not a hang."""
    from redis_harness import RedisServer

    with RedisServer(tmp_path) as server:
        b = open(server.url + "?timeout=0.2")
        b.ping()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeoutError):
                b.get("k")
            with pytest.raises(RequestTimeoutError):
                b.set("k", 1)
        finally:
            server.proc.send_signal(signal.SIGCONT)
            b.close()


@pytest.mark.parametrize("where", ["redis", "redis_cluster"])
def test_scripts_flushed_on_the_server_are_loaded_again(
    request: pytest.FixtureRequest, where: str
) -> None:
    b = open(backend_url(request, where, _ns()))
    assert isinstance(b, RedisBackend)
    try:
        b.set("k", 1, ttl=30)
        b.add("lease", "t", ttl=30)
        b.client.script_flush()
        entry = b.get_entry("k")
        assert entry is not MISSING and entry[0] == 1  # type: ignore[index]
        assert b.delete_if("lease", "t") is True

        async def from_asyncio() -> None:
            ab = open_async(backend_url(request, where, b.namespace.decode()))
            try:
                await ab.client.script_flush()  # type: ignore[attr-defined]
                entry = await ab.get_entry("k")
                assert entry is not MISSING and entry[0] == 1  # type: ignore[index]
            finally:
                await ab.close()

        asyncio.run(from_asyncio())
    finally:
        b.clear()
        b.close()


_DOC = [{"id": i, "name": f"user-{i}", "tags": ["a", "b"]} for i in range(200)]


def _memory(url: str, **kw: Any) -> MemoryBackend:
    b = open(url, **kw)
    assert isinstance(b, MemoryBackend)
    return b


def test_the_memory_backend_stores_values_compressed_from_the_threshold() -> None:
    raw = MsgpackSerializer().dumps(_DOC)
    for url, level in (("memory://", DEFAULT_LEVEL), ("memory://?compression=zstd:9", 9)):
        b = _memory(url)
        b.set("doc", _DOC)
        b.set("small", "x" * 100)
        stored = b.store.get(b"doc")
        assert stored is not None and stored[0] == MARK and len(stored) * 5 < len(raw)
        assert b.get("doc") == _DOC and b.get_many(["doc"]) == {"doc": _DOC}
        assert b.store.get(b"small") == MsgpackSerializer().dumps("x" * 100)
        assert isinstance(b.serializer, CompressedSerializer)
        assert b.serializer.codec.compression == Compression(level=level)
    for off in (_memory("memory://?compression=off"), _memory("memory://", compression=None)):
        off.set("doc", _DOC)
        assert off.store.get(b"doc") == raw and off.get("doc") == _DOC
    # The parameter wins over the URL's option; raw values read back from a
    # compressing backend (data written with compression off).
    given = _memory("memory://?compression=off", compression=Compression(level=1))
    given.set("doc", _DOC)
    assert (given.store.get(b"doc") or b"")[:1] == bytes([MARK]) and given.get("doc") == _DOC
    plain = _memory("memory://")
    plain.store.set(b"old", raw)
    assert plain.get("old") == _DOC


def test_a_tiered_cache_passes_compression_to_the_backend_it_opens() -> None:
    from hypercache.tiered import AsyncTieredCache, TieredCache

    with TieredCache("memory://", compression="off") as cache:
        cache.set("doc", _DOC)
        assert isinstance(cache.backend, MemoryBackend)
        assert cache.backend.store.get(b"doc") == MsgpackSerializer().dumps(_DOC)
    with TieredCache("memory://") as cache:
        cache.set("doc", _DOC)
        assert isinstance(cache.backend, MemoryBackend)
        stored = cache.backend.store.get(b"doc")
        assert stored is not None and stored[0] == MARK
    with pytest.raises(ConfigError, match="compression"):
        TieredCache(open("memory://"), compression="zstd")
    with pytest.raises(ConfigError, match="compression"):
        AsyncTieredCache("memory://", compression="gzip")


def test_the_serializers_of_the_url() -> None:
    as_json = open("memory://?serializer=json")
    as_json.set("k", {"a": (1, 2)})
    assert as_json.get("k") == {"a": [1, 2]}
    with pytest.raises(TypeError):
        as_json.set("k", b"bytes")
    raw = open("memory://?serializer=raw")
    raw.set("k", b"\x00\x01")
    assert raw.get("k") == b"\x00\x01"
    with pytest.raises(TypeError):
        raw.set("k", "text")
    pickled = open("memory://?serializer=pickle")
    pickled.set("k", {1, 2})
    assert pickled.get("k") == {1, 2}
