"""Tests of the client SDK: serializers, keys, options, routing, failover, errors, CLI.

End-to-end tests run the real clients (blocking sockets and asyncio) over real TCP
against ``FakeNode``: a unit-test double of ``hypercache-node`` built on the net
layer's TCP server, answering GET/SET/DELETE/TOPOLOGY/PING from a dict shared by
the fake nodes of one "cluster". It records which node received which key, so the
tests can check the client's routing. The fake servers run on an event loop in a
background thread, so the sync client can call them from the test thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aio_helpers import run
from cluster_harness import FAST, running_cluster
from hypothesis import given
from hypothesis import strategies as st

from hypercache._core.hlc import wall_clock_ms
from hypercache._core.ring import Ring
from hypercache.cli.client import (
    EXIT_DEGRADED,
    EXIT_ERROR,
    EXIT_MISS,
    EXIT_OK,
    EXIT_USAGE,
    main,
)
from hypercache.cli.health import assess
from hypercache.client import (
    AsyncClient,
    Client,
    ClientStats,
    ConnectionPool,
    Key,
    MsgpackSerializer,
    PickleSerializer,
    RawSerializer,
    Topology,
    normalize_key,
)
from hypercache.client._common import (
    probe_delays,
    scan_pattern,
    ttl_left,
    ttl_to_ms,
    wire_consistency,
)
from hypercache.client.topology import Router
from hypercache.cluster.config import DistConfig
from hypercache.cluster.local import ProcessCluster, until, wait_for
from hypercache.cluster.node import Node
from hypercache.consistency import Consistency
from hypercache.errors import (
    ConfigError,
    HandshakeError,
    HyperCacheError,
    KeyTooLargeError,
    NodeUnavailableError,
    NotReadyError,
    ProtocolError,
    QuorumError,
    RequestTimeoutError,
    ServerError,
    UndecodableValueError,
    ValueTooLargeError,
    WrongOwnerError,
)
from hypercache.net.blocking import BlockingConnection
from hypercache.net.inproc import InprocNetwork
from hypercache.net.protocol import Limits, Op, make_hello
from hypercache.net.tcp import TcpServer
from hypercache.net.transport import PeerInfo, ServerOptions
from hypercache.units import parse_seeds

T = TypeVar("T")
DEADLINE = 10.0


# ============================================================================ fake node


class FakeNode:
    """Handler answering the client ops over ``store`` (shared by a fake cluster).

    ``R_GET`` answers ``entries[key]`` when the test chose this node's version of
    the key (a 5-element list, or None), else the shared store's value at version
    ``(1, 0)``; ``R_PUT`` records the entry in ``entries`` (and in ``received``).
    """

    def __init__(self, name: str, store: dict[bytes, bytes]) -> None:
        self.name = name
        self.store = store
        self.address = ""
        self.topology: dict[str, Any] | None = None
        self.received: list[tuple[str, Any]] = []
        self.fail: Exception | None = None
        self.fail_r_get: Exception | None = None
        self.delay = 0.0
        self.inflight = 0
        self.max_inflight = 0
        self.entries: dict[bytes, list[Any] | None] = {}
        self.r_puts: list[list[Any]] = []

    def hello_info(self, peer_hello: dict[str, Any]) -> dict[str, Any]:
        return {}

    def keys_of(self, op: str) -> list[Any]:
        return [k for o, k in self.received if o == op]

    async def handle(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        name = Op(op).name
        key: Any = payload[0] if op in (Op.GET, Op.SET, Op.DELETE, Op.R_GET, Op.R_PUT) else None
        self.received.append((name, key))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
            if op == Op.PING:
                return "pong"
            if op == Op.TOPOLOGY:
                if self.topology is None:
                    raise ServerError("no topology")
                return self.topology
            if op == Op.GET:
                value = self.store.get(key)
                return [value is not None, value]
            if op == Op.SET:
                _, value, ttl_ms, consistency = payload
                assert ttl_ms is None or type(ttl_ms) is int
                assert consistency in (None, "one", "quorum", "all")
                self.store[key] = value
                return True
            if op == Op.DELETE:
                return self.store.pop(key, None) is not None
            if op == Op.R_GET:
                if self.fail_r_get is not None:
                    raise self.fail_r_get
                if key in self.entries:
                    return self.entries[key]
                value = self.store.get(key)
                return None if value is None else [value, 1, 0, 0, False]
            if op == Op.R_PUT:
                self.r_puts.append(list(payload))
                self.entries[key] = list(payload[1:])
                return True
            raise ServerError(f"unknown op {op}")
        finally:
            self.inflight -= 1


class ServerThread:
    """An event loop in a thread that hosts fake nodes; closes all of them on close()."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: dict[str, TcpServer] = {}

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE)

    def start(
        self, node: FakeNode, address: str = "127.0.0.1:0", cluster: str = "hypercache"
    ) -> str:
        async def go() -> TcpServer:
            server = TcpServer(node, address, ServerOptions(cluster=cluster, close_grace=1.0))
            await server.start()
            return server

        server = self.run(go())
        node.address = server.address
        self.servers[server.address] = server
        return server.address

    def stop(self, address: str) -> None:
        server = self.servers.pop(address)
        self.run(server.close())

    def close(self) -> None:
        for address in list(self.servers):
            self.stop(address)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()


@pytest.fixture
def servers() -> Iterator[ServerThread]:
    st_ = ServerThread()
    try:
        yield st_
    finally:
        st_.close()


def dead_address(servers: ServerThread) -> str:
    """A loopback address where nothing listens (a server started and stopped)."""
    address = servers.start(FakeNode("dead", {}))
    servers.stop(address)
    return address


def topology_payload(
    nodes: dict[str, str], replication: int, partitions: int = 64, epoch: int = 1
) -> tuple[dict[str, Any], Ring]:
    """A TOPOLOGY answer for ``{node_id: address}`` built with the real ring."""
    ring = Ring(list(nodes), partitions=partitions, replication=replication, vnodes=16)
    payload = {
        "epoch": epoch,
        "partitions": partitions,
        "replication": replication,
        "nodes": [[nid, nodes[nid]] for nid in ring.nodes],
        "table": ring.table(),
    }
    return payload, ring


def cluster(
    servers: ServerThread, n: int, replication: int
) -> tuple[list[FakeNode], dict[str, Any], Ring]:
    """``n`` fake nodes sharing one store, each answering TOPOLOGY with the same table."""
    store: dict[bytes, bytes] = {}
    nodes = [FakeNode(f"n{i}", store) for i in range(n)]
    for node in nodes:
        servers.start(node)
    payload, ring = topology_payload({nd.name: nd.address for nd in nodes}, replication)
    for node in nodes:
        node.topology = payload
    return nodes, payload, ring


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return run(coro, DEADLINE)


KEYS = [f"key-{i}" for i in range(40)]


# ============================================================================ serializers

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text() | st.integers(-1000, 1000), children, max_size=5)
    ),
    max_leaves=20,
)


@given(msgpack_values)
def test_msgpack_round_trip(value: Any) -> None:
    s = MsgpackSerializer()
    data = s.dumps(value)
    assert type(data) is bytes
    assert s.loads(data) == value


@given(msgpack_values | st.tuples(st.integers(), st.text()) | st.frozensets(st.integers()))
def test_pickle_round_trip(value: Any) -> None:
    s = PickleSerializer()
    assert s.loads(s.dumps(value)) == value


@given(st.binary())
def test_raw_round_trip(value: bytes) -> None:
    s = RawSerializer()
    assert s.loads(s.dumps(value)) == value
    assert s.dumps(bytearray(value)) == value
    assert s.dumps(memoryview(value)) == value


def test_serializer_errors() -> None:
    with pytest.raises(TypeError, match="msgpack"):
        MsgpackSerializer().dumps(object())
    with pytest.raises(TypeError, match="bytes-like"):
        RawSerializer().dumps("text")
    with pytest.raises(TypeError, match="pickle"):
        PickleSerializer().dumps(lambda: None)
    assert MsgpackSerializer().loads(MsgpackSerializer().dumps((1, 2))) == [1, 2]
    assert PickleSerializer(protocol=2).dumps(1) == pickle.dumps(1, protocol=2)
    with pytest.raises(TypeError, match="dumps"):
        Client(serializer=object())  # type: ignore[arg-type]


# ============================================================================ keys, options


@given(st.text())
def test_str_key_is_utf8(key: str) -> None:
    assert normalize_key(key, Limits(max_key=1 << 20)) == key.encode()


def test_key_normalisation_and_limits() -> None:
    limits = Limits(max_frame=1024, max_key=8, max_value=64)
    assert normalize_key(b"\xff\x00", limits) == b"\xff\x00"
    assert normalize_key("é", limits) == "é".encode()
    assert normalize_key("", limits) == b""

    class B(bytes):
        pass

    assert type(normalize_key(B(b"ab"), limits)) is bytes
    assert normalize_key("12345678", limits) == b"12345678"
    with pytest.raises(KeyTooLargeError):
        normalize_key("123456789", limits)
    with pytest.raises(KeyTooLargeError):
        normalize_key("éééé" + "e", limits)  # 9 bytes in UTF-8
    for bad in (1, 1.5, None, ("a",), bytearray(b"a"), memoryview(b"a")):
        with pytest.raises(TypeError, match="str or bytes"):
            normalize_key(bad, limits)


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_a_client_compresses_only_for_nodes_that_take_it(
    servers: ServerThread, monkeypatch: pytest.MonkeyPatch, aio: bool
) -> None:
    # The node's HELLO answer lists the compression feature: the client's first
    # large write is compressed already. A node of a version without it (its answer
    # lists only "trace"): the same client writes raw, first write included.
    from hypercache.client.compression import MARK
    from hypercache.net.protocol import FEATURE_TRACE

    value = [{"id": i, "name": f"user-{i}", "tags": ["a", "b"]} for i in range(100)]

    def write(address: str) -> Any:
        if not aio:
            with Client(address, route="any") as client:
                client.set("big", value)
                client.set_many({"many": value})
                return client.compressing

        async def go() -> Any:
            client = AsyncClient(address, route="any")  # no connect(): the write reaches
            try:
                await client.set("big", value)
                await client.set_many({"many": value})
                return client.compressing
            finally:
                await client.close()

        return run(go())

    new = FakeNode("new", {})
    assert write(servers.start(new)) is not None
    assert new.store[b"big"][0] == MARK and new.store[b"many"][0] == MARK
    monkeypatch.setattr("hypercache.net.server.FEATURES", (FEATURE_TRACE,))
    old = FakeNode("old", {})
    assert write(servers.start(old)) is None
    raw = MsgpackSerializer().dumps(value)
    assert old.store[b"big"] == raw and old.store[b"many"] == raw


def test_limits_checked_before_sending(servers: ServerThread) -> None:
    node = FakeNode("n", {})
    address = servers.start(node)
    limits = Limits(max_frame=1024, max_key=8, max_value=64)
    with Client(address, limits=limits, route="any") as client:
        with pytest.raises(KeyTooLargeError):
            client.set("x" * 9, 1)
        with pytest.raises(ValueTooLargeError):
            client.set("k", b"x" * 100)
        with pytest.raises(KeyTooLargeError):
            client.get_many(["ok", "x" * 9])
        with pytest.raises(TypeError):
            client.get(1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="single key"):
            client.get_many("abc")
        assert client.stats.connections_opened == 0
    assert node.received == []


def test_consistency_parsing() -> None:
    assert wire_consistency(None, None) is None
    assert wire_consistency(None, "all") == "all"
    assert wire_consistency("QUORUM", "one") == "quorum"
    assert wire_consistency(Consistency.ALL, None) == "all"
    with pytest.raises(ConfigError) as err:
        wire_consistency("most", None)
    assert err.value.field == "consistency"
    with pytest.raises(ConfigError):
        Client(consistency="two")
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        AsyncClient(consistency=3)  # type: ignore[arg-type]
    assert Client(consistency=" One ").options.consistency == "one"


def test_options_validation() -> None:
    assert parse_seeds("a:1, b:2,a:1", required=True) == ("a:1", "b:2")
    assert parse_seeds(["[::1]:7400"], required=True) == ("[::1]:7400",)
    for bad, field in (
        ({"seeds": ""}, "seeds"),
        ({"seeds": "nohost"}, "seeds"),
        ({"seeds": "h:99999"}, "seeds"),
        ({"timeout": 0}, "timeout"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"timeout": math.inf}, "timeout"),
        ({"route": "proxy"}, "route"),
        ({"cluster_name": ""}, "cluster_name"),
        ({"topology_refresh": 0}, "topology_refresh"),
    ):
        with pytest.raises(ConfigError) as err:
            Client(**bad)
        assert err.value.field == field
    assert ttl_to_ms(None) is None
    assert ttl_to_ms(1.5) == 1500
    assert ttl_to_ms(0.0001) == 1
    for bad_ttl in (0, -1, math.nan, math.inf):
        with pytest.raises(ConfigError):
            ttl_to_ms(bad_ttl)
    with pytest.raises(TypeError):
        ttl_to_ms("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ttl_to_ms(True)


def test_topology_from_wire() -> None:
    nodes = {"b": "127.0.0.1:2", "a": "127.0.0.1:1", "c": "127.0.0.1:3"}
    payload, ring = topology_payload(nodes, replication=2)
    # The wire may list nodes in any order: shuffle them and translate the table.
    order = ["c", "a", "b"]
    index = {nid: i for i, nid in enumerate(order)}
    shuffled = dict(payload)
    shuffled["nodes"] = [[nid, nodes[nid]] for nid in order]
    shuffled["table"] = [[index[ring.nodes[o]] for o in row] for row in payload["table"]]
    for wire in (payload, shuffled):
        topo = Topology.from_wire(wire)
        for i in range(200):
            key = f"k{i}".encode()
            assert topo.owners(key) == tuple(nodes[nid] for nid in ring.owners(key))
            assert topo.partition_of(key) == ring.partition_of(key)
    topo = Topology.from_wire(payload)
    assert sum(p for p, _ in topo.load().values()) == 64
    assert sum(h for _, h in topo.load().values()) == 128
    assert Topology.from_wire(topo.as_dict()).owners(b"x") == topo.owners(b"x")
    bad_cases = [
        None,
        {},
        {**payload, "partitions": 32},
        {**payload, "epoch": -1},
        {**payload, "nodes": [["a", "nohostport"]]},
        {**payload, "table": [[0, 9]] * 64},
        {**payload, "table": [[0, 0]] * 64},
    ]
    for bad in bad_cases:
        with pytest.raises(ProtocolError):
            Topology.from_wire(bad)


# ============================================================================ end to end, sync


def test_sync_basic_ops(servers: ServerThread) -> None:
    nodes, _, _ = cluster(servers, 1, replication=1)
    with Client(nodes[0].address, consistency="quorum") as client:
        assert client.get("missing") is None
        assert client.get("missing", 7) == 7
        client.set("a", {"x": [1, 2.5, "s", b"b"]}, ttl=1.5)
        assert client.get("a") == {"x": [1, 2.5, "s", b"b"]}
        assert client.get(b"a", consistency=Consistency.ONE) == {"x": [1, 2.5, "s", b"b"]}
        assert client.delete("a") is True
        assert client.delete("a", consistency="all") is False
        assert client.get("a") is None
        client.set_many({"m1": 1, "m2": None}, ttl=10)
        assert client.get_many(["m1", "m2", "m3"]) == {"m1": 1, "m2": None}
        assert client.ping() > 0
        assert client.topology().epoch == 1
        assert client.stats.topology_refreshes >= 1
    assert client.closed
    with pytest.raises(NodeUnavailableError, match="closed"):
        client.get("a")


def test_sync_routes_to_owner(servers: ServerThread) -> None:
    nodes, _, ring = cluster(servers, 2, replication=2)
    by_id = {nd.name: nd for nd in nodes}
    with Client([nd.address for nd in nodes]) as client:
        client.connect()
        for key in KEYS:
            client.set(key, key)
        for key in KEYS:
            assert client.get(key) == key
    for key in KEYS:
        k = key.encode()
        primary = by_id[ring.owners(k)[0]]
        other = next(nd for nd in nodes if nd is not primary)
        assert primary.keys_of("SET").count(k) == 1
        assert primary.keys_of("GET").count(k) == 1
        assert k not in other.keys_of("SET") + other.keys_of("GET")
    assert all(nd.keys_of("SET") for nd in nodes)  # both are primary of some keys
    assert client.stats.failovers == 0


def test_sync_route_any_round_robin(servers: ServerThread) -> None:
    nodes, _, _ = cluster(servers, 2, replication=1)
    with Client([nd.address for nd in nodes], route="any") as client:
        for key in KEYS:
            client.set(key, 1)
    counts = [len(nd.keys_of("SET")) for nd in nodes]
    assert sum(counts) == len(KEYS)
    assert min(counts) >= len(KEYS) // 2 - 1
    assert not any(nd.keys_of("TOPOLOGY") for nd in nodes)


def test_sync_failover_when_owner_down(servers: ServerThread) -> None:
    store: dict[bytes, bytes] = {}
    live = FakeNode("live", store)
    live_address = servers.start(live)
    down = dead_address(servers)
    payload, ring = topology_payload({"down": down, "live": live_address}, replication=2)
    live.topology = payload
    keys_down_primary = [k for k in KEYS if ring.owners(k.encode())[0] == "down"]
    assert keys_down_primary
    with Client(live_address) as client:
        for key in keys_down_primary:
            client.set(key, key)
            assert client.get(key) == key
        assert client.stats.nodes_marked_down >= 1
        assert client.stats.failovers >= 1
        assert down in client._router.down
    assert sorted(live.keys_of("SET")) == sorted(k.encode() for k in keys_down_primary)


def test_sync_failover_to_non_owner(servers: ServerThread) -> None:
    # replication 1: the only owner is down, so the request goes to another node,
    # which coordinates it (the proxy path).
    store: dict[bytes, bytes] = {}
    live = FakeNode("live", store)
    live_address = servers.start(live)
    down = dead_address(servers)
    payload, ring = topology_payload({"down": down, "live": live_address}, replication=1)
    live.topology = payload
    key = next(k for k in KEYS if ring.owners(k.encode()) == ["down"])
    with Client(live_address) as client:
        client.set(key, "v")
        assert client.get(key) == "v"


def test_sync_no_node_reachable(servers: ServerThread) -> None:
    seeds = [dead_address(servers), dead_address(servers)]
    with Client(seeds, connect_timeout=0.5) as client:
        with pytest.raises(NodeUnavailableError) as err:
            client.get("k")
        assert isinstance(err.value, ConnectionError)
        assert seeds[0] in str(err.value) and seeds[1] in str(err.value)
        with pytest.raises(NodeUnavailableError):
            client.connect()
        with pytest.raises(NodeUnavailableError):
            client.get_many(["a", "b"])


def test_sync_error_mapping(servers: ServerThread) -> None:
    nodes, _, _ = cluster(servers, 1, replication=1)
    node = nodes[0]
    with Client(node.address, route="any", timeout=0.3) as client:
        node.fail = QuorumError(1, 2)
        with pytest.raises(QuorumError) as err:
            client.set("k", 1, consistency="quorum")
        assert (err.value.acks, err.value.required) == (1, 2)
        with pytest.raises(QuorumError):
            client.get_many(["a", "b"])
        node.fail = None
        node.delay = 1.0
        with pytest.raises(RequestTimeoutError) as terr:
            client.get("k")
        assert isinstance(terr.value, TimeoutError)
        assert client.stats.nodes_suspected == 1  # error answers did not count
        node.delay = 0.0
        # The node is set aside until a probe (over the pooled connection) gets an answer.
        wait_for(lambda: not client._router.down)
        assert client.stats.nodes_recovered == 1
        client.set("k", 2)  # the connection survived the error answers and the timeout
        assert client.get("k") == 2
        assert client.stats.connections_opened == 1
    with Client(node.address, cluster_name="other") as client, pytest.raises(HandshakeError):
        client.get("k")


def test_sync_topology_unsupported_falls_back_to_seeds(servers: ServerThread) -> None:
    node = FakeNode("old", {})  # answers TOPOLOGY with an error
    address = servers.start(node)
    with Client(address) as client:
        client.set("k", 1)
        assert client.get("k") == 1
        assert client.stats.topology_errors >= 1
        with pytest.raises(ServerError):
            client.topology()


def test_sync_topology_refresh(servers: ServerThread) -> None:
    store: dict[bytes, bytes] = {}
    a, b = FakeNode("a", store), FakeNode("b", store)
    servers.start(a)
    servers.start(b)
    old, _ = topology_payload({"a": a.address}, replication=1, epoch=1)
    new, _ = topology_payload({"b": b.address}, replication=1, epoch=2)
    a.topology = old
    b.topology = new
    with Client(a.address, topology_refresh=0.05) as client:
        client.set("k", 1)
        assert a.keys_of("SET") == [b"k"]
        a.topology = new

        def routed_to_b() -> bool:
            client.get("k")
            return bool(b.keys_of("GET"))

        wait_for(routed_to_b)
        assert client.stats.topology_refreshes >= 2


def test_sync_get_many_pipelined(servers: ServerThread) -> None:
    nodes, _, _ = cluster(servers, 2, replication=1)
    for nd in nodes:
        nd.delay = 0.02
    with Client([nd.address for nd in nodes]) as client:
        client.set_many({k: k.upper() for k in KEYS})
        start = time.monotonic()
        got = client.get_many([*KEYS, "absent-1", "absent-2", KEYS[0]])
        elapsed = time.monotonic() - start
        assert got == {k: k.upper() for k in KEYS}
        assert client.stats.connections_opened == 2
    # 42 distinct keys one after the other would take >= 0.84 s; pipelined they overlap.
    assert elapsed < 0.5
    assert all(nd.max_inflight > 1 for nd in nodes)


def test_sync_get_many_failover(servers: ServerThread) -> None:
    store: dict[bytes, bytes] = {}
    live = FakeNode("live", store)
    live_address = servers.start(live)
    down = dead_address(servers)
    payload, _ = topology_payload({"down": down, "live": live_address}, replication=2)
    live.topology = payload
    with Client(live_address) as client:
        client.set_many({k: 1 for k in KEYS})
        assert client.get_many(KEYS) == dict.fromkeys(KEYS, 1)
    assert len(set(live.keys_of("SET"))) == len(KEYS)


def test_sync_threads(servers: ServerThread) -> None:
    nodes, _, _ = cluster(servers, 2, replication=2)
    errors: list[BaseException] = []
    with Client([nd.address for nd in nodes]) as client:

        def work(t: int) -> None:
            try:
                for i in range(30):
                    client.set(f"t{t}-{i}", [t, i])
                    assert client.get(f"t{t}-{i}") == [t, i]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(DEADLINE)
        assert not any(th.is_alive() for th in threads)
    assert errors == []


def test_sync_serializer_hook(servers: ServerThread) -> None:
    nodes, _, _ = cluster(servers, 1, replication=1)
    with Client(nodes[0].address, serializer=RawSerializer()) as raw:
        raw.set("r", b"\x00bytes")
        assert nodes[0].store[b"r"] == b"\x00bytes"
        assert raw.get("r") == b"\x00bytes"
    with Client(nodes[0].address, serializer=PickleSerializer()) as pk:
        pk.set("p", (1, {2}))
        assert pk.get("p") == (1, {2})


# ============================================================================ end to end, async


def test_async_basic_ops(servers: ServerThread) -> None:
    nodes, _, _ = cluster(servers, 1, replication=1)

    async def go() -> None:
        async with AsyncClient(nodes[0].address, consistency="one") as client:
            assert await client.get("missing", "d") == "d"
            await client.set("a", [1, "two"], ttl=5)
            assert await client.get("a") == [1, "two"]
            assert await client.delete("a") is True
            assert await client.delete("a") is False
            await client.set_many({"x": 1, "y": 2})
            assert await client.get_many(["x", "y", "z"]) == {"x": 1, "y": 2}
            assert await client.ping() > 0
            assert (await client.topology()).partitions == 64
        assert client.closed
        with pytest.raises(NodeUnavailableError):
            await client.get("a")

    arun(go())


def test_async_routes_to_owner(servers: ServerThread) -> None:
    nodes, _, ring = cluster(servers, 2, replication=2)
    by_id = {nd.name: nd for nd in nodes}

    async def go() -> None:
        async with AsyncClient([nd.address for nd in nodes]) as client:
            await asyncio.gather(*(client.set(k, k) for k in KEYS))
            assert [await client.get(k) for k in KEYS] == KEYS
            assert client.stats.connections_opened == 2

    arun(go())
    for key in KEYS:
        k = key.encode()
        primary = by_id[ring.owners(k)[0]]
        assert primary.keys_of("SET").count(k) == 1
        for nd in nodes:
            if nd is not primary:
                assert k not in nd.keys_of("SET") + nd.keys_of("GET")


def test_async_failover_and_unreachable(servers: ServerThread) -> None:
    store: dict[bytes, bytes] = {}
    live = FakeNode("live", store)
    live_address = servers.start(live)
    down = dead_address(servers)
    payload, ring = topology_payload({"down": down, "live": live_address}, replication=2)
    live.topology = payload
    keys = [k for k in KEYS if ring.owners(k.encode())[0] == "down"]

    async def go() -> None:
        async with AsyncClient([down, live_address]) as client:
            for key in keys:
                await client.set(key, key)
                assert await client.get(key) == key
            # the dead seed was found down while fetching the table: skipped since
            assert client.stats.nodes_marked_down >= 1
        async with AsyncClient([down], connect_timeout=0.5, route="any"):
            pass  # pragma: no cover

    with pytest.raises(NodeUnavailableError):
        arun(go())
    assert sorted(live.keys_of("SET")) == sorted(k.encode() for k in keys)

    async def lazy() -> None:
        client = AsyncClient(down, connect_timeout=0.5)
        try:
            with pytest.raises(NodeUnavailableError):
                await client.get("k")
        finally:
            await client.close()

    arun(lazy())


def test_async_error_mapping(servers: ServerThread) -> None:
    nodes, _, _ = cluster(servers, 1, replication=1)
    node = nodes[0]

    async def go() -> None:
        async with AsyncClient(node.address, route="any", timeout=0.3) as client:
            node.fail = QuorumError(2, 3)
            with pytest.raises(QuorumError) as err:
                await client.delete("k", consistency="all")
            assert (err.value.acks, err.value.required) == (2, 3)
            with pytest.raises(QuorumError):
                await client.get_many(["a", "b", "c"])
            node.fail = None
            node.delay = 1.0
            with pytest.raises(RequestTimeoutError):
                await client.get("k")
            node.delay = 0.0
            await client.set("k", 1)
            assert await client.get("k") == 1
        with pytest.raises(HandshakeError):
            async with AsyncClient(node.address, cluster_name="other"):
                pass  # pragma: no cover

    arun(go())


def test_async_get_many_pipelined(servers: ServerThread) -> None:
    nodes, _, _ = cluster(servers, 2, replication=1)
    for nd in nodes:
        nd.delay = 0.02

    async def go() -> float:
        async with AsyncClient([nd.address for nd in nodes]) as client:
            await client.set_many({k: k for k in KEYS})
            start = time.monotonic()
            got = await client.get_many([*KEYS, "absent"])
            assert got == {k: k for k in KEYS}
            assert client.stats.connections_opened == 2
            return time.monotonic() - start

    assert arun(go()) < 0.5
    assert all(nd.max_inflight > 1 for nd in nodes)


def test_get_many_keys_the_result_by_every_key_passed() -> None:
    """docs/client.md: get_many returns "{key: value} of the hits, keyed by the keys
    you passed", and ``"k"`` and ``b"k"`` are the same entry. Passing both, the
    result has only the last of them: the wire-key -> original-key map keeps one."""

    async def main() -> None:
        node = Node(DistConfig(node_id="solo", bind="127.0.0.1:0", **FAST))
        await node.start()
        try:
            async with AsyncClient(node.address) as client:
                await client.set("k", 1)
                got = await client.get_many(["k", b"k"])
                assert got == {"k": 1, b"k": 1}
        finally:
            await node.stop()

    run(main())


def test_async_client_over_an_inproc_network() -> None:
    # transport=: the client reaches real Nodes of an in-process network by their
    # address on that network (10.9.0.x: nothing listens there over TCP).
    net = InprocNetwork()
    fast: dict[str, Any] = {"http": None, "heartbeat_interval": 0.05, "replication": 2}
    bind = ["10.9.0.1:7400", "10.9.0.2:7400"]

    async def go() -> None:
        nodes = [
            Node(DistConfig(node_id=f"n{i}", bind=b, seeds=(bind[0],), **fast), transport=net)
            for i, b in enumerate(bind)
        ]
        try:
            for node in nodes:
                await node.start()
            await until(
                lambda: all(len(n.members()) == 2 and n.rebalancer.ready for n in nodes),
                what="membership, every partition held",
            )
            async with AsyncClient(bind[1], transport=net, consistency="quorum") as client:
                assert set((await client.topology()).addresses) == set(bind)
                await client.set("k", {"v": 1})
                assert await client.get("k") == {"v": 1}
                assert await client.get_many(["k", "absent"]) == {"k": {"v": 1}}
                assert await client.delete("k") is True
                assert await client.get("k", "gone") == "gone"
                assert await client.ping(bind[0]) >= 0
                assert client.stats.owner_reads == 4  # get, get_many (2 keys), get
                assert client.stats.connections_opened == 2
            server = net.server(bind[0])
            assert server is not None and server.stats.connections_accepted >= 2  # peer + us
        finally:
            for node in nodes:
                await node.stop()

    arun(go())


# ============================================================================ CLI


def test_cli_set_get_delete(servers: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    nodes, _, _ = cluster(servers, 2, replication=2)
    seeds = ",".join(nd.address for nd in nodes)
    assert main(["--seeds", seeds, "set", "greeting", "hello", "--ttl", "30"]) == EXIT_OK
    assert capsys.readouterr().out == "OK\n"
    assert main(["get", "greeting", "--seeds", seeds, "--consistency", "quorum"]) == EXIT_OK
    assert capsys.readouterr().out == "hello\n"
    with Client(seeds) as client:  # the CLI stores what the Python client reads
        assert client.get("greeting") == "hello"
        client.set("doc", {"a": [1, 2]})
    assert main(["--seeds", seeds, "get", "doc"]) == EXIT_OK
    assert capsys.readouterr().out == '{"a": [1, 2]}\n'
    assert main(["--seeds", seeds, "set", "n", "[1, 2]", "--json"]) == EXIT_OK
    capsys.readouterr()
    with Client(seeds) as client:
        assert client.get("n") == [1, 2]
    assert main(["--seeds", seeds, "--raw", "set", "r", "bytes"]) == EXIT_OK
    assert main(["--seeds", seeds, "--raw", "get", "r"]) == EXIT_OK
    assert capsys.readouterr().out == "OK\nbytes"  # --raw get: the bytes, nothing added
    assert main(["--seeds", seeds, "delete", "greeting"]) == EXIT_OK
    assert capsys.readouterr().out == "deleted\n"
    assert main(["--seeds", seeds, "delete", "greeting"]) == EXIT_OK
    assert capsys.readouterr().out == "not found\n"
    assert main(["--seeds", seeds, "get", "greeting"]) == EXIT_MISS
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "not found" in captured.err


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("many", [False, True])
def test_a_value_the_serializer_cannot_decode_is_an_error_naming_the_key(
    servers: ServerThread, kind: str, many: bool
) -> None:
    nodes, _, _ = cluster(servers, 3, replication=3)
    for nd in nodes:
        nd.entries[b"raw"] = [b"\x01\x02 written raw", 10, 1, 0, False]
        nd.entries[b"fine"] = entry("ok", 10)
    keys = ["fine", "raw"] if many else ["raw"]
    out, _ = read(kind, [nd.address for nd in nodes], keys)
    assert isinstance(out, UndecodableValueError), out
    assert out.key == "raw"
    assert str(out).startswith(
        "the value of key 'raw' (14 bytes) cannot be decoded by MsgpackSerializer: ExtraData"
    )
    assert "serializer=RawSerializer() (CLI: --raw)" in str(out)
    raw, _ = read(kind, [nd.address for nd in nodes], keys, serializer=RawSerializer())
    assert (raw["raw"] if many else raw) == b"\x01\x02 written raw"


def test_cli_get_of_a_raw_value_says_so_without_a_traceback(
    servers: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes, _, _ = cluster(servers, 1, replication=1)
    nodes[0].store[b"raw"] = b"\x01\x02"  # as the make run banner's wire example writes it
    assert main(["--seeds", nodes[0].address, "get", "raw"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("hypercache: error: the value of key 'raw' (2 bytes) cannot be")
    assert "Traceback" not in err and "(CLI: --raw)" in err


def test_cli_env_ping_topology_stats(
    servers: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes, _, _ = cluster(servers, 2, replication=2)
    env = {"HYPERCACHE_SEEDS": nodes[0].address}
    assert main(["set", "k", "v"], env=env) == EXIT_OK
    assert main(["get", "k"], env=env) == EXIT_OK
    assert capsys.readouterr().out == "OK\nv\n"
    assert main(["ping"], env=env) == EXIT_OK
    out = capsys.readouterr().out
    assert all(f"{nd.address}" in out for nd in nodes) and out.count("pong") == 2
    assert main(["topology"], env=env) == EXIT_OK
    out = capsys.readouterr().out
    assert "epoch 1" in out and "n0" in out and "n1" in out
    assert main(["stats"], env=env) == EXIT_OK
    out = capsys.readouterr().out
    assert "reachable: 2 of 2" in out and "client:" in out
    assert (
        main(["ping"], env={"HYPERCACHE_SEEDS": nodes[0].address, "HYPERCACHE_CLUSTER_NAME": "x"})
        == EXIT_ERROR
    )
    assert "refused" in capsys.readouterr().err


def test_cli_errors(servers: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    nodes, _, _ = cluster(servers, 1, replication=1)
    seeds = nodes[0].address
    assert main([]) == EXIT_USAGE
    assert main(["frobnicate"]) == EXIT_USAGE
    assert main(["get"]) == EXIT_USAGE
    assert main(["--seeds", "nohost", "get", "k"]) == EXIT_USAGE
    assert "seeds" in capsys.readouterr().err
    assert main(["--seeds", seeds, "--consistency", "most", "get", "k"]) == EXIT_USAGE
    assert "consistency" in capsys.readouterr().err
    assert main(["--seeds", seeds, "set", "k", "v", "--ttl", "-1"]) == EXIT_USAGE
    assert main(["--seeds", seeds, "set", "k", "{", "--json"]) == EXIT_USAGE
    capsys.readouterr()
    assert main(["--seeds", dead_address(servers), "--timeout", "0.5", "get", "k"]) == EXIT_ERROR
    assert "cluster unavailable" in capsys.readouterr().err
    nodes[0].fail = QuorumError(1, 2)
    assert main(["--seeds", seeds, "--route", "any", "set", "k", "v"]) == EXIT_ERROR
    assert capsys.readouterr().err == (
        "hypercache: error: quorum not reached: 1 of 2 required replicas answered\n"
    )
    assert main(["--help"]) == EXIT_OK
    assert "usage" in capsys.readouterr().out


def test_cli_key_not_encodable_is_a_usage_error_not_a_traceback() -> None:
    """``hypercache get $'\\xff'`` (argv decoded with surrogateescape) raises
    UnicodeEncodeError out of main(): a traceback and exit status 1, which the
    docs reserve for "get found no value". Expected: exit 2 (usage error)."""
    assert main(["get", "\udcff", "--seeds", "127.0.0.1:1"], env={}) == EXIT_USAGE


# ============================================================================ owner reads

# Client-coordinated reads: with a table and a known level, get/get_many send R_GET
# straight to the key's owners and resolve the newest version themselves.

KIND = pytest.mark.parametrize("kind", ["sync", "async"])


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def owner_nodes(nodes: list[FakeNode], ring: Ring, key: str) -> list[FakeNode]:
    by_id = {nd.name: nd for nd in nodes}
    return [by_id[o] for o in ring.owners(key.encode())]


def entry(value: Any, ts: int, origin: int = 1, expire: int = 0, tomb: bool = False) -> list[Any]:
    return [MsgpackSerializer().dumps(value), ts, origin, expire, tomb]


def read(
    kind: str, seeds: list[str], keys: list[str], consistency: str | None = "quorum", **kw: Any
) -> tuple[Any, dict[str, int]]:
    """``get`` (one key) or ``get_many`` with a fresh client of ``kind``; the result
    and the client's stats. A raised error is returned as the result."""
    if kind == "sync":
        with Client(seeds, consistency=consistency, **kw) as client:
            try:
                out: Any = client.get(keys[0]) if len(keys) == 1 else client.get_many(keys)
            except Exception as exc:
                out = exc
            return out, client.stats.as_dict()

    async def go() -> tuple[Any, dict[str, int]]:
        async with AsyncClient(seeds, consistency=consistency, **kw) as client:
            try:
                out: Any = (
                    await client.get(keys[0]) if len(keys) == 1 else await client.get_many(keys)
                )
            except Exception as exc:
                out = exc
            await until(lambda: not client._background, what="the background repairs out")
            return out, client.stats.as_dict()

    return arun(go())


def r_gets(node: FakeNode) -> list[Any]:
    return node.keys_of("R_GET")


@KIND
def test_owner_read_newest_wins_and_repairs(servers: ServerThread, kind: str) -> None:
    nodes, _, ring = cluster(servers, 3, replication=3)
    a, b, c = owner_nodes(nodes, ring, "k")
    a.entries[b"k"] = entry("old", 100, origin=9)
    b.entries[b"k"] = entry("new", 200, origin=1)
    value, stats = read(kind, [nd.address for nd in nodes], ["k"])
    assert value == "new"
    # QUORUM of 3: the first two owners in table order, not the third; no proxy GET.
    assert r_gets(a) == [b"k"] and r_gets(b) == [b"k"] and r_gets(c) == []
    assert not any(nd.keys_of("GET") for nd in nodes)
    wait_for(lambda: len(a.r_puts) == 1)
    assert a.r_puts == [[b"k", *entry("new", 200, origin=1)]]
    assert b.r_puts == [] and c.r_puts == []
    assert stats["read_repairs"] == 1 and stats["owner_reads"] == 1


@KIND
def test_owner_read_origin_breaks_ties(servers: ServerThread, kind: str) -> None:
    nodes, _, ring = cluster(servers, 3, replication=3)
    a, b, _ = owner_nodes(nodes, ring, "k")
    a.entries[b"k"] = entry("from-7", 100, origin=7)
    b.entries[b"k"] = entry("from-3", 100, origin=3)
    assert read(kind, [nd.address for nd in nodes], ["k"])[0] == "from-7"
    wait_for(lambda: len(b.r_puts) == 1)
    assert b.r_puts[0][1:] == entry("from-7", 100, origin=7)


def test_async_owner_read_cancelled_asks_no_replacement(servers: ServerThread) -> None:
    nodes, _, ring = cluster(servers, 3, replication=3)
    a, b, c = owner_nodes(nodes, ring, "k")
    for nd in (a, b, c):
        nd.entries[b"k"] = entry("v", 100)

    async def go() -> None:
        async with AsyncClient([nd.address for nd in nodes], consistency="quorum") as client:
            assert await client.get("k") == "v"  # connects to a and b
            for nd in nodes:
                nd.received.clear()
            a.delay, a.fail_r_get = 0.3, ServerError("boom")  # fails, but late
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await client.get("k")
            conn = client._peers[a.address].conn
            assert conn is not None
            await until(lambda: conn.pending == 0, what="a's error back")
            assert r_gets(a) == r_gets(b) == [b"k"]
            assert r_gets(c) == []  # nobody asked in a's place for a read given up
            assert client.stats.failovers == 0

    arun(go())


@KIND
def test_owner_read_repairs_in_flight_are_capped(servers: ServerThread, kind: str) -> None:
    # Two stale owners, slow to answer; room for one push: the other is dropped.
    nodes, _, ring = cluster(servers, 3, replication=3)
    a, b, c = owner_nodes(nodes, ring, "k")
    a.entries[b"k"] = entry("old", 100)
    b.entries[b"k"] = entry("old", 100)
    c.entries[b"k"] = entry("new", 200)
    a.delay = b.delay = 0.3
    seeds = [nd.address for nd in nodes]
    if kind == "sync":
        with Client(seeds, consistency="all") as client:
            client.max_pending_repairs = 1
            assert client.get("k") == "new"
            stats = client.stats.as_dict()
    else:

        async def go() -> dict[str, int]:
            async with AsyncClient(seeds, consistency="all") as client:
                client.max_pending_repairs = 1
                assert await client.get("k") == "new"
                await until(lambda: not client._background, what="the push that went out")
                return client.stats.as_dict()

        stats = arun(go())
    assert (stats["read_repairs"], stats["read_repairs_dropped"]) == (1, 1)
    wait_for(lambda: len(a.r_puts) + len(b.r_puts) == 1)
    assert (a.r_puts + b.r_puts)[0] == [b"k", *entry("new", 200)]


@KIND
def test_owner_read_tombstone_newer_is_a_miss(servers: ServerThread, kind: str) -> None:
    nodes, _, ring = cluster(servers, 3, replication=3)
    a, b, _ = owner_nodes(nodes, ring, "k")
    a.entries[b"k"] = entry("alive", 100)
    b.entries[b"k"] = [b"", 200, 1, 0, True]
    value, stats = read(kind, [nd.address for nd in nodes], ["k"])
    assert value is None
    wait_for(lambda: len(a.r_puts) == 1)
    assert a.r_puts[0] == [b"k", b"", 200, 1, 0, True]  # the tombstone travels
    assert stats["read_repairs"] == 1


@KIND
def test_owner_read_expired_is_a_miss(servers: ServerThread, kind: str) -> None:
    nodes, _, ring = cluster(servers, 3, replication=3)
    a, b, _ = owner_nodes(nodes, ring, "k")
    a.entries[b"k"] = entry("gone", 300, expire=_now_ms() - 1000)
    b.entries[b"k"] = None
    value, stats = read(kind, [nd.address for nd in nodes], ["k"])
    assert value is None  # two answers (acks), both misses: no QuorumError
    assert stats["read_repairs"] == 0
    # A live entry with a future expiry is a hit.
    a.entries[b"k"] = entry("soon", 300, expire=_now_ms() + 60_000)
    assert read(kind, [nd.address for nd in nodes], ["k"])[0] == "soon"


@KIND
def test_owner_read_fails_over_to_next_owner(servers: ServerThread, kind: str) -> None:
    nodes, _, ring = cluster(servers, 3, replication=3)
    a, b, c = owner_nodes(nodes, ring, "k")
    for nd in (a, b, c):
        nd.entries[b"k"] = entry("v", 100)
    seeds = [nd.address for nd in nodes]
    # An owner answering with an error is replaced by the next one.
    a.fail_r_get = ServerError("boom")
    value, stats = read(kind, seeds, ["k"])
    assert value == "v"
    assert r_gets(a) == r_gets(b) == r_gets(c) == [b"k"]
    assert stats["failovers"] == 1
    # The primary is down: the same.
    a.fail_r_get = None
    for nd in nodes:
        nd.received.clear()
    servers.stop(a.address)
    value, stats = read(kind, [b.address], ["k"])
    assert value == "v"
    assert r_gets(b) == [b"k"] and r_gets(c) == [b"k"]
    assert stats["nodes_marked_down"] >= 1 and stats["failovers"] >= 1


@KIND
@pytest.mark.parametrize(
    "moved",
    [
        NotReadyError("partition 7 is still streaming to this node; ask another owner"),
        WrongOwnerError("partition 7 is not owned here"),
    ],
)
def test_an_owner_read_the_table_moved_under_goes_through_a_node(
    servers: ServerThread, kind: str, moved: HyperCacheError
) -> None:
    # RF 2, QUORUM 2: an owner that answers "not ready" or "not mine" leaves no
    # quorum of owners; a node coordinates the read instead (with its own table and
    # the partition's previous owners) and the client marks its table for a fetch.
    nodes, _, ring = cluster(servers, 2, replication=2)
    a, b = owner_nodes(nodes, ring, "k")
    for nd in (a, b):
        nd.entries[b"k"] = entry("v", 100)
        nd.store[b"k"] = MsgpackSerializer().dumps("v")
    b.fail_r_get = moved
    value, stats = read(kind, [nd.address for nd in nodes], ["k"])
    assert value == "v"
    assert stats["stale_table_reads"] == 1
    assert [op for op, _ in a.received + b.received].count("GET") == 1


@KIND
def test_owner_read_replaces_an_owner_that_refuses_the_handshake(
    servers: ServerThread, kind: str
) -> None:
    nodes, _, ring = cluster(servers, 3, replication=3)
    a, b, c = owner_nodes(nodes, ring, "k")
    for nd in (b, c):
        nd.entries[b"k"] = entry("v", 100)
    # The primary's address now answers for another cluster: its HELLO is refused.
    servers.stop(a.address)
    servers.start(FakeNode("stranger", {}), address=a.address, cluster="another-cluster")
    value, stats = read(kind, [b.address], ["k"])
    assert value == "v"
    assert r_gets(b) == r_gets(c) == [b"k"]
    assert stats["failovers"] >= 1


def test_async_owner_read_fails_over_on_open_connections(servers: ServerThread) -> None:
    # Once connected, the owners are asked without a task each (an answer callback):
    # each kind of failure still hands the read to the next owner.
    nodes, _, ring = cluster(servers, 3, replication=3)
    a, b, c = owner_nodes(nodes, ring, "k")
    for nd in (a, b, c):
        nd.entries[b"k"] = entry("v", 100)

    async def go() -> None:
        async with AsyncClient(
            [nd.address for nd in nodes], consistency="quorum", timeout=0.3
        ) as client:
            assert await client.get("k") == "v"  # connects to a and b
            for nd in nodes:
                nd.received.clear()
            # an error answer from a: c replaces it
            a.fail_r_get = ServerError("boom")
            assert await client.get("k") == "v"
            assert r_gets(a) == r_gets(b) == r_gets(c) == [b"k"]
            a.fail_r_get = None
            # a malformed answer from b: c replaces it
            b.entries[b"k"] = [b"v", "not a version"]
            assert await client.get("k") == "v"
            b.entries[b"k"] = entry("v", 100)
            # no answer from a in time: c replaces it, and a is set aside
            a.delay = 2.0
            assert await client.get("k") == "v"
            assert client.stats.nodes_suspected == 1
            assert a.address in client._router.down
            a.delay = 0.0
            # until a probe over the same connection gets an answer
            await until(lambda: a.address not in client._router.down, what="a used again")
            assert client.stats.nodes_recovered == 1
            assert client.stats.failovers == 3
            assert client.stats.connections_opened == 3  # one per node, kept open
            # a stale owner answering over an open connection is repaired
            b.entries[b"k"] = entry("new", 200)
            assert await client.get("k") == "new"
            await until(lambda: not client._background, what="the repair push done")
            assert a.r_puts[-1] == [b"k", *entry("new", 200)]

    arun(go())


@KIND
def test_owner_read_too_few_owners(servers: ServerThread, kind: str) -> None:
    nodes, _, ring = cluster(servers, 3, replication=3)
    a, b, c = owner_nodes(nodes, ring, "k")
    c.entries[b"k"] = entry("v", 100)
    servers.stop(a.address)
    servers.stop(b.address)
    err, _ = read(kind, [c.address], ["k"])
    assert isinstance(err, QuorumError)
    assert (err.acks, err.required) == (1, 2)
    # ONE still reads from the owner that is left.
    assert read(kind, [c.address], ["k"], consistency="one")[0] == "v"
    # Error answers from every owner: QuorumError(0, 3) at ALL.
    c.fail_r_get = ServerError("boom")
    err, _ = read(kind, [c.address], ["k"], consistency="all")
    assert isinstance(err, QuorumError)
    assert (err.acks, err.required) == (0, 3)


@KIND
def test_owner_read_unreachable_owners_fall_back_to_proxy(servers: ServerThread, kind: str) -> None:
    store: dict[bytes, bytes] = {}
    live = FakeNode("live", store)
    live_address = servers.start(live)
    down = [dead_address(servers) for _ in range(2)]
    payload, ring = topology_payload({"d1": down[0], "d2": down[1], "live": live_address}, 2)
    live.topology = payload
    key = next(k for k in KEYS if "live" not in ring.owners(k.encode()))
    store[key.encode()] = MsgpackSerializer().dumps("proxied")
    value, _ = read(kind, [live_address], [key])
    assert value == "proxied"  # no owner reachable: the live node coordinates
    assert live.keys_of("GET") == [key.encode()]


@KIND
@pytest.mark.parametrize(("level", "asked"), [("one", 1), ("quorum", 2), ("all", 3)])
def test_owner_read_asks_as_many_as_the_level(
    servers: ServerThread, kind: str, level: str, asked: int
) -> None:
    nodes, _, ring = cluster(servers, 3, replication=3)
    owners = owner_nodes(nodes, ring, "k")
    for nd in owners:
        nd.entries[b"k"] = entry("v", 100)
    assert read(kind, [nd.address for nd in nodes], ["k"], consistency=level)[0] == "v"
    assert [len(r_gets(nd)) for nd in owners] == [1] * asked + [0] * (3 - asked)


@KIND
def test_owner_read_level_unknown_uses_proxy(servers: ServerThread, kind: str) -> None:
    nodes, payload, _ = cluster(servers, 3, replication=3)
    for nd in nodes:
        nd.store[b"k"] = MsgpackSerializer().dumps("v")
    seeds = [nd.address for nd in nodes]
    # No level given and none advertised: the node applies its default (GET).
    assert read(kind, seeds, ["k"], consistency=None)[0] == "v"
    assert sum(len(nd.keys_of("GET")) for nd in nodes) == 1
    assert not any(r_gets(nd) for nd in nodes)
    # The table advertises the default read level: the client reads the owners.
    for nd in nodes:
        nd.topology = {**payload, "read_consistency": "all"}
    assert read(kind, seeds, ["k"], consistency=None)[0] == "v"
    assert sorted(len(r_gets(nd)) for nd in nodes) == [1, 1, 1]
    # route="any": always the proxy GET.
    assert read(kind, seeds, ["k"], route="any")[0] == "v"
    assert sum(len(nd.keys_of("GET")) for nd in nodes) == 2


@KIND
def test_owner_read_get_many(servers: ServerThread, kind: str) -> None:
    nodes, _, ring = cluster(servers, 3, replication=3)
    keys = KEYS[:20]
    for key in keys:
        a, b, c = owner_nodes(nodes, ring, key)
        a.entries[key.encode()] = entry(key + "-old", 100)
        b.entries[key.encode()] = c.entries[key.encode()] = entry(key, 200)
    down = nodes[0]
    servers.stop(down.address)
    value, stats = read(kind, [nd.address for nd in nodes[1:]], [*keys, "absent"])
    assert value == {key: key for key in keys}
    assert stats["owner_reads"] == len(keys) + 1
    # Each stale primary that answered got its repair (the stopped node answered none).
    stale = {key.encode() for key in keys if owner_nodes(nodes, ring, key)[0] is not down}
    assert stale
    wait_for(lambda: {k for nd in nodes for k in nd.keys_of("R_PUT")} == stale)
    assert stats["read_repairs"] == len(stale)


# ============================================================================ node health

# A node whose request timed out, or that cannot be reached, is set aside until it
# answers: no operation goes to it while another candidate is left, and a probe
# (a task or a thread of the client) PINGs it until it answers.


class AsyncView:
    """An ``AsyncClient`` on an event loop of its own (a thread), driven from the test
    thread with the sync client's calls, so that one scenario tests both clients."""

    def __init__(self, seeds: list[str], **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = AsyncClient(seeds, **kw)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE)

    @property
    def stats(self) -> ClientStats:
        return self.client.stats

    @property
    def _router(self) -> Router:
        return self.client._router

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        self._run(self.client.set(key, value, ttl))

    def get(self, key: str) -> Any:
        return self._run(self.client.get(key))

    def ping(self, address: str | None = None) -> float:
        return self._run(self.client.ping(address))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        # any other operation: run it on the client's loop
        method = getattr(self.client, name)
        return lambda *args, **kw: self._run(method(*args, **kw))

    def scan(self, *args: Any, **kw: Any) -> list[bytes]:
        async def go() -> list[bytes]:
            return [key async for key in self.client.scan(*args, **kw)]

        return self._run(go())

    def probing(self) -> list[str]:
        """Addresses with a probe running."""
        return [a for a, task in list(self.client._probes.items()) if not task.done()]

    def probe_handles(self) -> list[Callable[[], bool]]:
        """For each probe now: whether it is still running."""

        def running(task: asyncio.Task[None]) -> Callable[[], bool]:
            return lambda: not task.done()

        return [running(task) for task in list(self.client._probes.values())]

    def close(self) -> None:
        try:
            self._run(self.client.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(DEADLINE)
            self.loop.close()


class SyncView:
    """The sync client with the same test-only helpers as :class:`AsyncView`."""

    def __init__(self, seeds: list[str], **kw: Any) -> None:
        self.client = Client(seeds, **kw)
        self.stats = self.client.stats
        self._router = self.client._router
        self.set, self.get, self.ping = self.client.set, self.client.get, self.client.ping

    def probing(self) -> list[str]:
        return [a for a, thread in list(self.client._probing.items()) if thread.is_alive()]

    def probe_handles(self) -> list[Callable[[], bool]]:
        return [thread.is_alive for thread in list(self.client._probing.values())]

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def client_of(kind: str, seeds: list[str], **kw: Any) -> Iterator[SyncView | AsyncView]:
    view = SyncView(seeds, **kw) if kind == "sync" else AsyncView(seeds, **kw)
    try:
        yield view
    finally:
        view.close()


def two_owners(servers: ServerThread) -> tuple[FakeNode, FakeNode, str]:
    """Two fake nodes, replication 2, and a key whose primary is the first."""
    nodes, _, ring = cluster(servers, 2, replication=2)
    key = next(k for k in KEYS if ring.owners(k.encode())[0] == nodes[0].name)
    return nodes[0], nodes[1], key


def test_router_sets_nodes_aside_until_marked_up() -> None:
    a, b, c = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"
    router = Router((a, b), route="any")
    assert router.mark_down(a, 0.0) is True
    assert router.mark_down(a, 100.0) is False  # already aside: no second probe
    assert router.down == [a] and router.is_down(a)
    # No expiry: aside until mark_up, last in every order.
    for _ in range(4):
        assert list(router.candidates(None)) == [b, a]
    # Every candidate aside: all still tried.
    router.mark_down(b, 0.0)
    assert sorted(router.candidates(None)) == [a, b]
    assert router.mark_up(a) is True and router.mark_up(a) is False
    assert list(router.candidates(None)) == [a, b]
    assert router.knows(b) and not router.knows(c)
    # With a table: an owner aside is asked last by reads, and by writes.
    router = Router((a,), route="owner")
    payload, _ = topology_payload({"n1": a, "n2": b, "n3": c}, replication=3)
    topology = Topology.from_wire(payload)
    router.set_topology(topology, 0.0)
    assert router.knows(c)
    owners = topology.owners(b"k")
    assert router.read_owners(b"k") == owners
    router.mark_down(owners[0], 0.0)
    assert router.read_owners(b"k") == (*owners[1:], owners[0])
    assert list(router.candidates(b"k")) == [*owners[1:], owners[0]]


def test_probe_delays_double_up_to_the_cap() -> None:
    delays = probe_delays(1.0)
    assert [next(delays) for _ in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert next(probe_delays(0.01)) == 0.01


@KIND
def test_timed_out_write_is_raised_not_retried_then_owner_set_aside(
    servers: ServerThread, kind: str
) -> None:
    primary, other, key = two_owners(servers)
    k = key.encode()
    with client_of(kind, [other.address], timeout=0.2) as client:
        client.set(key, 0)  # the table, and a connection to the primary
        primary.delay = 1.0
        with pytest.raises(RequestTimeoutError):
            client.set(key, 1)
        # Its outcome is unknown: not sent to the other owner in the same call.
        assert k not in other.keys_of("SET")
        assert client._router.down == [primary.address]
        assert client.stats.nodes_suspected == 1
        # Set aside: the next write goes to the next owner at once, which coordinates.
        client.set(key, 2)
        assert other.keys_of("SET") == [k]
        # Until a probe's PING gets an answer; then the primary is used again.
        primary.delay = 0.0
        wait_for(lambda: not client._router.down)
        assert client.stats.nodes_recovered == 1 and client.stats.probes >= 1
        assert ("PING", None) in primary.received
        client.set(key, 3)
        assert primary.keys_of("SET") == [k, k, k]
        wait_for(lambda: client.probing() == [])  # the probe ended with the answer


@KIND
def test_timed_out_read_moves_on_to_the_next_node(servers: ServerThread, kind: str) -> None:
    # consistency=None and no advertised level: a read is a GET to the primary (the
    # proxy path), retried on the next owner after a timeout, like an unreachable node.
    primary, other, key = two_owners(servers)
    primary.store[key.encode()] = MsgpackSerializer().dumps("v")
    with client_of(kind, [other.address], timeout=0.2, consistency=None) as client:
        primary.delay = 1.0
        assert client.get(key) == "v"
        assert other.keys_of("GET") == [key.encode()]
        assert client._router.down == [primary.address]
        assert client.stats.failovers == 1


@KIND
def test_timeout_answered_by_the_node_does_not_set_it_aside(
    servers: ServerThread, kind: str
) -> None:
    # A node that answers "timed out" (e.g. a coordinator whose replicas were slow) is
    # alive: the error reaches the caller, the node stays in use.
    nodes, _, _ = cluster(servers, 1, replication=1)
    node = nodes[0]
    with client_of(kind, [node.address], route="any") as client:
        node.fail = RequestTimeoutError("replica answers missing")
        with pytest.raises(RequestTimeoutError, match="replica answers missing"):
            client.set("k", 1)
        with pytest.raises(RequestTimeoutError):
            client.get("k")
        assert client._router.down == []
        assert client.stats.nodes_suspected == 0 and client.stats.probes == 0


@KIND
def test_unreachable_node_comes_back_through_its_probe(servers: ServerThread, kind: str) -> None:
    # One mechanism for both kinds of failure: a refused node is probed, not retried
    # by operations after a delay, and used again once a probe connects and is answered.
    store: dict[bytes, bytes] = {}
    live = FakeNode("live", store)
    servers.start(live)
    down = dead_address(servers)
    payload, ring = topology_payload({"down": down, "live": live.address}, replication=2)
    live.topology = payload
    key = next(k for k in KEYS if ring.owners(k.encode())[0] == "down")
    with client_of(kind, [live.address], connect_timeout=0.5) as client:
        client.set(key, 1)
        assert client._router.down == [down]
        assert client.stats.nodes_marked_down == 1
        wait_for(lambda: client.stats.probes_failed >= 2)  # refused, again and again
        back = FakeNode("down", store)
        back.topology = payload
        servers.start(back, address=down)
        wait_for(lambda: not client._router.down)
        assert client.stats.nodes_recovered == 1
        client.set(key, 2)
        assert back.keys_of("SET") == [key.encode()]
        assert live.keys_of("SET") == [key.encode()]  # only the first one


@KIND
def test_close_stops_the_probes(servers: ServerThread, kind: str) -> None:
    nodes, _, _ = cluster(servers, 1, replication=1)
    node = nodes[0]
    node.delay = 5.0  # answers nothing in time, probes included
    client = (
        SyncView([node.address], route="any", timeout=0.2)
        if kind == "sync"
        else (AsyncView([node.address], route="any", timeout=0.2))
    )
    try:
        with pytest.raises(RequestTimeoutError):
            client.get("k")
        wait_for(lambda: client.stats.probes_failed >= 1)
        assert client.probing() == [node.address]
        running = client.probe_handles()
        assert len(running) == 1 and running[0]()
    finally:
        client.close()
    # close() waited for the probe (cancelled, or stopped at the end of its PING).
    assert not running[0]()
    assert client.probing() == []


def test_sync_probe_skips_stale_pooled_connections(servers: ServerThread) -> None:
    # The primary restarts: every idle connection to it is dead. The first request on
    # one sets it aside; its probe drops the others and answers over a new one.
    primary, other, key = two_owners(servers)
    with Client([other.address]) as client:
        client.set(key, 0)
        pool = client._pool(primary.address)
        conns = [pool.acquire() for _ in range(3)]
        for conn in conns:
            pool.release(conn)
        servers.stop(primary.address)
        back = FakeNode(primary.name, primary.store)
        back.topology = primary.topology
        servers.start(back, address=primary.address)
        client.set(key, 1)  # on a dead connection: the next owner takes it
        assert other.keys_of("SET") == [key.encode()]
        wait_for(lambda: not client._router.down)
        assert (client.stats.probes, client.stats.probes_failed) == (1, 0)
        client.set(key, 2)
        assert back.keys_of("SET") == [key.encode()]


@KIND
def test_probe_of_an_address_outside_the_cluster_stops(servers: ServerThread, kind: str) -> None:
    nodes, _, _ = cluster(servers, 1, replication=1)
    stray = dead_address(servers)
    with client_of(kind, [nodes[0].address]) as client:
        client.get("k")
        with pytest.raises(NodeUnavailableError):
            client.ping(stray)
        # Nothing routes to it: its probe forgets it instead of PINGing for ever.
        wait_for(lambda: not client._router.down and not client.probing())
        assert client.stats.nodes_recovered == 0


# ============================================================================ connection pool

# The sync client's per-node pool: a cap on open connections (a thread beyond waits,
# with the request's deadline), a cap on idle ones, and a pid check that makes a
# forked child drop the parent's sockets instead of sharing them.

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
# Python 3.12+ warns that forking a process with threads (the fake nodes' loop) may
# deadlock the child: these children use only their own locks, which is the point.
fork_with_threads = pytest.mark.filterwarnings("ignore:.*multi-threaded.*:DeprecationWarning")


def opener(address: str) -> BlockingConnection:
    return BlockingConnection(address, make_hello("hypercache"), timeout=DEADLINE)


def run_in_child(body: Callable[[], None]) -> None:
    """Run ``body`` in a forked child process; raise its error here (or fail if it hangs)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_fd)
        code = 0
        try:
            body()
        except BaseException as exc:
            os.write(write_fd, f"{type(exc).__name__}: {exc}".encode()[:4000])
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    deadline = time.monotonic() + DEADLINE
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the child process hung")
        time.sleep(0.01)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, f"in the child: {message}"


def test_pool_caps_open_connections_and_waits_for_a_release(servers: ServerThread) -> None:
    address = servers.start(FakeNode("n", {}))
    pool = ConnectionPool(address, opener, max_connections=2, max_idle=1)
    a, b = pool.acquire(), pool.acquire()
    assert (pool.size, pool.idle) == (2, 0)
    start = time.monotonic()
    with pytest.raises(RequestTimeoutError, match="max_connections"):
        pool.acquire(timeout=0.2)
    assert time.monotonic() - start >= 0.2
    assert (pool.stats.pool_waits, pool.stats.pool_timeouts) == (1, 1)
    # A thread waiting at the cap gets the first connection released.
    got: list[BlockingConnection] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=DEADLINE)))
    waiter.start()
    wait_for(lambda: pool.stats.pool_waits == 2)
    pool.release(a)
    waiter.join(DEADLINE)
    assert got == [a] and pool.size == 2
    # A broken connection released frees its place: the next thread opens a new one.
    b.close()
    pool.release(b)
    assert pool.size == 1
    c = pool.acquire(timeout=0)
    assert c is not b and not c.closed and pool.size == 2
    # Released beyond max_idle (and nobody waiting): closed.
    pool.release(a)
    pool.release(c)
    assert (pool.size, pool.idle) == (1, 1) and c.closed and not a.closed
    # Closing wakes a waiter up with an error and refuses new acquires.
    held = pool.acquire()
    other = pool.acquire()
    errors: list[BaseException] = []

    def wait_then_fail() -> None:
        try:
            pool.acquire(timeout=DEADLINE)
        except NodeUnavailableError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_then_fail)
    waiter.start()
    wait_for(lambda: pool.stats.pool_waits == 3)
    pool.close()
    waiter.join(DEADLINE)
    assert len(errors) == 1 and "closed" in str(errors[0])
    with pytest.raises(NodeUnavailableError):
        pool.acquire()
    pool.release(held)
    pool.release(other)
    assert held.closed and other.closed and pool.size == 0
    with pytest.raises(ConfigError) as err:
        ConnectionPool(address, opener, max_connections=0)
    assert err.value.field == "max_connections"


def test_sync_client_waits_for_a_connection_at_its_cap(servers: ServerThread) -> None:
    # One connection per node and three threads writing at once: the first write holds
    # it for 0.6 s, the next thread to get it holds it until 1.2 s, and the last one,
    # whose wait is bounded by its 1 s deadline, raises - unsent, the node not set aside.
    node = FakeNode("n", {})
    address = servers.start(node)
    node.delay = 0.6
    outcomes: list[BaseException | None] = []
    with Client(address, route="any", timeout=1.0, max_connections_per_node=1) as client:

        def write(i: int) -> None:
            try:
                client.set(f"k{i}", i)
            except RequestTimeoutError as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        errors = [exc for exc in outcomes if exc is not None]
        assert len(outcomes) == 3 and len(errors) == 1
        assert "max_connections_per_node" in str(errors[0])
        assert client.stats.pool_waits == 2 and client.stats.pool_timeouts == 1
        assert client.stats.connections_opened == 1 and node.max_inflight == 1
        assert len(node.keys_of("SET")) == 2  # the third was never sent
        assert client._router.down == []
    with pytest.raises(ConfigError) as err:
        Client(address, max_connections_per_node=0)
    assert err.value.field == "max_connections_per_node"


def test_sync_client_opens_connections_through_its_factory(servers: ServerThread) -> None:
    nodes, _, _ = cluster(servers, 2, replication=2)
    made: list[str] = []

    def factory(
        address: str, hello: dict[str, Any], limits: Limits, timeout: float
    ) -> BlockingConnection:
        made.append(address)
        return BlockingConnection(address, hello, limits, timeout)

    with Client(nodes[0].address, connection_factory=factory, consistency="all") as client:
        client.set_many({k: k for k in KEYS})
        assert client.get_many(KEYS) == {k: k for k in KEYS}
        assert sorted(made) == sorted(nd.address for nd in nodes)
        assert client.stats.connections_opened == 2


@needs_fork
@fork_with_threads
def test_pool_after_fork_drops_the_parents_connections(servers: ServerThread) -> None:
    address = servers.start(FakeNode("n", {}))
    server = servers.servers[address]
    pool = ConnectionPool(address, opener)
    held = pool.acquire()
    idle = pool.acquire()
    pool.release(idle)
    assert (pool.size, pool.idle) == (2, 1)

    def child() -> None:
        conn = pool.acquire()  # the parent's two are forgotten: a new one
        assert conn is not idle and conn is not held
        assert (pool.size, pool.idle) == (1, 0)
        assert conn.request(Op.PING, None, DEADLINE) == "pong"
        pool.release(held)  # acquired before the fork: closed, not kept
        assert held.closed and pool.idle == 0
        pool.release(conn)
        assert (pool.size, pool.idle) == (1, 1)

    accepted = server.stats.connections_accepted
    run_in_child(child)
    assert server.stats.connections_accepted == accepted + 1  # the child's own
    # The child closed its copies of the parent's sockets, not the parent's.
    assert held.request(Op.PING, None, DEADLINE) == "pong"
    again = pool.acquire()
    assert again is idle and again.request(Op.PING, None, DEADLINE) == "pong"
    pool.release(again)
    pool.release(held)
    pool.close()


@needs_fork
@fork_with_threads
def test_sync_client_after_fork_uses_its_own_connections(servers: ServerThread) -> None:
    nodes, _, _ = cluster(servers, 2, replication=2)
    values: dict[Key, Any] = {k: k for k in KEYS}

    def accepted() -> int:
        return sum(s.stats.connections_accepted for s in servers.servers.values())

    with Client(nodes[0].address, consistency="quorum") as client:
        client.set_many(values)
        assert client.get_many(KEYS) == values  # a connection to each node, pooled
        opened, before = client.stats.connections_opened, accepted()

        def child() -> None:
            assert set(client.topology().addresses) == {nd.address for nd in nodes}
            client.set("k", "child")
            assert client.get("k") == "child"
            assert client.get_many(KEYS) == values
            assert client.stats.connections_opened >= opened + 2

        # As if another thread were fetching the table at the fork: the child's copy
        # of that lock stays held (nobody there will release it) unless it is renewed.
        with client._refreshing:
            run_in_child(child)
        assert accepted() >= before + 2  # the child connected to both nodes itself
        after_child = accepted()
        # The parent goes on over its own connections, which the child left open.
        assert client.get("k") == "child"
        assert client.get_many(KEYS) == values
        client.set("k", "parent")
        assert client.stats.connections_opened == opened
        assert accepted() == after_child


@needs_fork
@fork_with_threads
def test_sync_client_after_fork_probes_the_nodes_set_aside_itself(servers: ServerThread) -> None:
    # The parent's probe threads do not exist in the child: the child starts its own
    # for the nodes set aside, or they would stay aside there for ever.
    primary, other, key = two_owners(servers)
    with Client([primary.address, other.address]) as client:
        client.set(key, 0)
        servers.stop(primary.address)
        client.set(key, 1)  # fails over to the other owner; the primary is set aside
        assert client._router.down == [primary.address]
        parent_probe = client._probing[primary.address]
        assert parent_probe.is_alive()

        def child() -> None:
            probes = client.stats.probes
            client.set(key, 2)
            probe = client._probing.get(primary.address)
            assert probe is not None and probe is not parent_probe and probe.is_alive()
            wait_for(lambda: client.stats.probes > probes)

        run_in_child(child)
        assert client._probing[primary.address] is parent_probe  # the parent's own, still


# ============================================================================ real nodes


@pytest.mark.functional
def test_real_nodes_sync_and_async(tmp_path: Path) -> None:
    """Both clients against 3 real ``hypercache-node`` processes (tests/cluster_harness.py)."""
    with running_cluster(3, tmp_path) as real:
        _real_nodes_checks(real)


def _real_nodes_checks(real: ProcessCluster) -> None:
    seeds = real.addresses
    keys = [f"real-{i}" for i in range(100)]
    with Client(seeds, consistency="quorum") as client:
        client.set_many({k: [k, 1] for k in keys}, ttl=60)
        assert client.get_many(keys) == {k: [k, 1] for k in keys}
        assert client.delete(keys[0]) is True
        assert client.get(keys[0]) is None
        assert client.topology().replication == 3

    async def via_async() -> None:
        async with AsyncClient(seeds, consistency="quorum") as client:
            assert await client.get_many(keys[1:]) == {k: [k, 1] for k in keys[1:]}
            await client.set("async", {"x": 1})
            assert await client.get("async", consistency="all") == {"x": 1}

    arun(via_async())
    _real_stale_replica_repaired(real)
    # SIGKILL one node: QUORUM still works for every key through the survivors,
    # ALL fails with QuorumError.
    dead = seeds[0]
    real.kill(0)
    with Client(seeds, consistency="quorum", timeout=3.0) as client:
        assert client.get_many(keys[1:]) == {k: [k, 1] for k in keys[1:]}
        for k in keys[1:]:
            assert client.get(k) == [k, 1]
        assert client.stats.owner_reads == 2 * len(keys[1:])
        client.set("after-kill", 2)
        assert client.get("after-kill") == 2
        with pytest.raises(QuorumError):
            client.set("all", 1, consistency="all")
        with pytest.raises(QuorumError) as info:
            client.get("after-kill", consistency="all")
        assert (info.value.acks, info.value.required) == (2, 3)
        assert dead in client._router.down

    async def after_kill() -> None:
        async with AsyncClient(seeds, consistency="quorum", timeout=3.0) as client:
            for k in keys[1:]:
                assert await client.get(k) == [k, 1]
            assert await client.get("after-kill") == 2

    arun(after_kill())


def _real_stale_replica_repaired(real: ProcessCluster) -> None:
    """A replica given an older version (R_PUT) is repaired by a client QUORUM read."""
    seeds = real.addresses
    serializer = MsgpackSerializer()
    key = b"stale-replica"
    now = time.time_ns() // 1_000_000
    old = [serializer.dumps("old"), (now - 20_000) << 16, 7, 0, False]
    new = [serializer.dumps("new"), (now - 10_000) << 16, 7, 0, False]
    with Client(seeds, consistency="quorum") as client:
        owners = client.topology().owners(key)
        stale = seeds.index(owners[0])  # the primary: asked by every QUORUM read
        assert real.request(stale, Op.R_PUT, [key, *old]) is True
        for address in owners[1:]:
            assert real.request(seeds.index(address), Op.R_PUT, [key, *new]) is True
        assert real.request(stale, Op.R_GET, [key]) == old
        assert client.get(key) == "new"
        assert client.stats.read_repairs == 1
        wait_for(lambda: real.request(stale, Op.R_GET, [key]) == new)


# ============================================================ ttl, expire, scan, keys, flush

# Issue 14: the client face of TTL, EXPIRE, SCAN and FLUSH, against real nodes (on TCP,
# in the fake servers' loop thread) with both clients, then the routing and the
# errors against fake nodes.


@contextlib.contextmanager
def either_client(kind: str, seeds: str, **options: Any) -> Iterator[Any]:
    """A ``Client``, or an :class:`AsyncView` of an ``AsyncClient`` (on a loop of its
    own), closed on exit."""
    if kind == "sync":
        with Client(seeds, **options) as client:
            yield client
        return
    view = AsyncView([seeds], **options)
    try:
        yield view
    finally:
        view.close()


@contextlib.contextmanager
def real_nodes(servers: ServerThread, n: int, **settings: Any) -> Iterator[list[Node]]:
    """``n`` real nodes on loopback TCP, in the loop of ``servers``; stopped on exit."""
    nodes: list[Node] = []

    async def start() -> None:
        for i in range(n):
            seeds = (nodes[0].address,) if nodes else ()
            config = DistConfig(
                node_id=f"r{i}", bind="127.0.0.1:0", seeds=seeds, **{**FAST, **settings}
            )
            nodes.append(Node(config))
            await nodes[-1].start()
        await until(
            lambda: all(len(nd.members()) == n and nd.rebalancer.ready for nd in nodes),
            what="members, each with its partitions ready",
        )

    async def stop() -> None:
        for node in nodes:
            await node.stop()

    try:
        servers.run(start())
        yield nodes
    finally:
        servers.run(stop())


@KIND
def test_ttl_and_expire_against_real_nodes(servers: ServerThread, kind: str) -> None:
    with (
        real_nodes(servers, 3) as nodes,
        either_client(kind, nodes[0].address, consistency="quorum") as c,
    ):
        c.set("session", "s", ttl=30)
        c.set("forever", "f")
        left = c.ttl("session")
        assert 29 < left <= 30
        assert c.ttl("forever") is None
        with pytest.raises(KeyError):
            c.ttl("absent")
        assert c.expire("forever", 5) is True
        assert 4 < c.ttl("forever", consistency="all") <= 5
        assert c.get("forever") == "f"  # the value is untouched
        assert c.expire("forever", None) is True
        assert c.ttl("forever") is None
        assert c.expire("absent", 5) is False
        with pytest.raises(KeyError):
            c.ttl("absent")  # expire wrote nothing
        c.delete("session")
        with pytest.raises(KeyError):
            c.ttl("session")
        for bad in (0, -1, math.inf, math.nan):
            with pytest.raises(ConfigError):
                c.expire("forever", bad)
        with pytest.raises(TypeError):
            c.expire("forever", "5")


@KIND
def test_scan_keys_and_flush_against_real_nodes(servers: ServerThread, kind: str) -> None:
    with (
        real_nodes(servers, 3, replication=2) as nodes,
        either_client(kind, nodes[1].address, consistency="all") as c,
    ):
        c.set_many({f"user:{i}": i for i in range(120)})
        c.set_many({f"order:{i}": i for i in range(30)})
        c.set("user:[x]", 0)
        everything = {f"user:{i}".encode() for i in range(120)} | {b"user:[x]"}
        everything |= {f"order:{i}".encode() for i in range(30)}
        assert c.keys() == sorted(everything)
        assert c.keys("user:1?") == sorted(f"user:{i}".encode() for i in range(10, 20))
        assert c.keys("user:[[]x]") == [b"user:[x]"]
        assert c.keys("order:*") == sorted(k for k in everything if k.startswith(b"order:"))
        assert c.keys("order:2") == [b"order:2"]
        assert c.keys("*:2[0-9]") == sorted(
            k for k in everything if k.split(b":")[1][:1] == b"2" and len(k.split(b":")[1]) == 2
        )
        assert len(c.keys(limit=7)) == 7
        # One node: the keys it holds, each once, as many pages as it takes.
        held = {k for k in everything if nodes[2].replica.get(k) is not None}
        assert 0 < len(held) < len(everything)
        listed = list(c.scan(nodes[2].address, page_size=9))
        assert len(listed) == len(held) and set(listed) == held
        assert set(c.scan(nodes[2].address, pattern="order:*")) == {
            k for k in held if k.startswith(b"order:")
        }
        assert set(c.scan()) <= everything  # some node, the same one for every page
        for bad in ("user:[", "[!"):
            with pytest.raises(ConfigError) as info:
                c.scan(nodes[0].address, pattern=bad)
            assert info.value.field == "pattern"
        with pytest.raises(ConfigError):
            c.keys(limit=0)
        with pytest.raises(ConfigError):
            c.scan("nohost", pattern="*")
        with pytest.raises(ConfigError):
            c.scan(nodes[0].address, page_size=0)
        # Each key on its 2 owners, and on a previous owner until the grace after
        # the joins has passed: each node reports what it held.
        holding = {nd.address: len(nd.store) for nd in nodes}
        assert sum(holding.values()) >= 2 * len(everything)
        dropped = c.flush()
        assert dropped == holding
        assert all(len(nd.store) == 0 for nd in nodes)
        assert c.keys() == []
        assert c.get("user:1") is None


def test_scan_pattern_splits_the_literal_prefix_from_the_match() -> None:
    limits = Limits(max_frame=4096, max_key=8, max_value=1024)
    assert scan_pattern(None, limits) == (None, None)
    assert scan_pattern("user:*", limits) == (b"user:", None)
    assert scan_pattern("*", limits) == (b"", None)
    prefix, match = scan_pattern("ab", limits)
    assert prefix == b"ab" and match is not None and match(b"ab") and not match(b"abc")
    prefix, match = scan_pattern("u?er*x", limits)
    assert prefix == b"u" and match is not None
    assert match(b"user-x") and match(b"uxerx") and not match(b"user-y")
    prefix, match = scan_pattern("é?", limits)  # ? is one character, not one byte
    assert prefix == "é".encode() and match is not None and match("éé".encode())
    prefix, match = scan_pattern(b"\xff*\xfe", limits)  # bytes that are not UTF-8
    assert prefix == b"\xff" and match is not None and match(b"\xff\x00\xfe")
    assert scan_pattern("[]]*", limits)[0] == b""  # a leading ] is a member
    for bad in ("a[", "a[!", "a[]", 5, "x" * 9 + "*"):
        with pytest.raises(ConfigError) as info:
            scan_pattern(bad, limits)  # type: ignore[arg-type]
        assert info.value.field == "pattern"
    assert ttl_left("k", (True, 0), 1000) is None
    assert ttl_left("k", (True, 2500), 1000) == 1.5
    assert ttl_left("k", (True, 500), 1000) == 0.0
    with pytest.raises(KeyError):
        ttl_left("k", (False, 0), 1000)


class ScanNode(FakeNode):
    """A fake node that also answers TTL, EXPIRE, SCAN (``held``, pages of
    ``page`` keys) and FLUSH, and records what it was sent."""

    def __init__(self, name: str, store: dict[bytes, bytes], held: list[bytes]) -> None:
        super().__init__(name, store)
        self.held = held
        self.expiries: dict[bytes, int] = {}
        self.fail_sets: Exception | None = None
        self.payloads: list[tuple[str, Any]] = []
        self.flush_error: Exception | None = None

    async def handle(self, conn_info: PeerInfo, op: int, payload: Any) -> Any:
        if op == Op.SET and self.fail_sets is not None:
            raise self.fail_sets
        if op not in (Op.TTL, Op.EXPIRE, Op.SCAN, Op.FLUSH):
            return await super().handle(conn_info, op, payload)
        self.payloads.append((Op(op).name, payload))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        if op == Op.TTL:
            return [payload[0] in self.store, self.expiries.get(payload[0], 0)]
        if op == Op.EXPIRE:
            return payload[0] in self.store
        if op == Op.SCAN:
            start = 0 if payload[0] is None else int(payload[0])
            prefix = payload[2] if len(payload) == 3 else b""
            keys = [k for k in self.held if k.startswith(prefix)]
            end = start + min(payload[1], 4)
            return [keys[start:end], str(end).encode() if end < len(keys) else None]
        if self.flush_error is not None:
            raise self.flush_error
        return len(self.held)


def scan_cluster(
    servers: ServerThread, held: list[list[bytes]], replication: int
) -> tuple[list[ScanNode], Ring]:
    store: dict[bytes, bytes] = {}
    nodes = [ScanNode(f"n{i}", store, keys) for i, keys in enumerate(held)]
    for node in nodes:
        servers.start(node)
    payload, ring = topology_payload({nd.name: nd.address for nd in nodes}, replication)
    for node in nodes:
        node.topology = payload
    return nodes, ring


@KIND
def test_ttl_goes_to_the_primary_and_expire_is_not_retried_after_a_timeout(
    servers: ServerThread, kind: str
) -> None:
    nodes, ring = scan_cluster(servers, [[], [], []], replication=3)
    nodes[0].store[b"k"] = b"v"
    primary = next(nd for nd in nodes if nd.name == ring.owners(b"k")[0])
    with either_client(kind, nodes[0].address, timeout=0.3) as c:
        assert c.ttl("k", consistency="one") is None
        assert c.expire("k", 1.5) is True
        assert [name for name, _ in primary.payloads] == ["TTL", "EXPIRE"]
        assert primary.payloads[0][1] == [b"k", "one"]
        assert primary.payloads[1][1] == [b"k", 1500, None]
        primary.delay = 1.0
        with pytest.raises(RequestTimeoutError):
            c.expire("k", 1)  # a write: its outcome is unknown, not sent elsewhere
        assert sum(name == "EXPIRE" for nd in nodes for name, _ in nd.payloads) == 2
        assert c.ttl("k") is None  # a read: another owner answers
    primary.delay = 0


@KIND
def test_keys_lists_every_node_and_says_when_partitions_are_missing(
    servers: ServerThread, kind: str
) -> None:
    held = [[b"a:1", b"a:2", b"b:1"], [b"a:2", b"a:3", b"a:4", b"a:5", b"c"], [b"b:1", b"c"]]
    nodes, _ = scan_cluster(servers, held, replication=2)
    with either_client(kind, nodes[0].address) as c:
        assert c.keys() == [b"a:1", b"a:2", b"a:3", b"a:4", b"a:5", b"b:1", b"c"]
        assert c.keys("a:*") == [b"a:1", b"a:2", b"a:3", b"a:4", b"a:5"]
        # the prefix went to the nodes; pages of 4 were followed
        scans = [p for nd in nodes for name, p in nd.payloads if name == "SCAN"]
        assert [None, 1000, b"a:"] in scans and [b"4", 1000] in scans
        # With replication 2, one node down leaves every partition an owner listed.
        servers.stop(nodes[2].address)
        assert c.keys() == [b"a:1", b"a:2", b"a:3", b"a:4", b"a:5", b"b:1", b"c"]
        servers.stop(nodes[1].address)
        with pytest.raises(NodeUnavailableError, match=r"no owner of \d+ partition"):
            c.keys()
        assert set(c.scan()) == set(held[0])  # the one node left


@KIND
def test_flush_reports_each_node(servers: ServerThread, kind: str) -> None:
    nodes, _ = scan_cluster(servers, [[b"x"] * 3, [b"y"] * 5, []], replication=2)
    nodes[1].flush_error = ServerError("disk on fire")
    gone = nodes[2].address
    servers.stop(gone)
    with either_client(kind, nodes[0].address) as c:
        c.topology()
        result = c.flush()
    assert result[nodes[0].address] == 3
    assert isinstance(result[nodes[1].address], ServerError)
    assert isinstance(result[gone], NodeUnavailableError)


# ---------------------------------------------------------------- the CLI's new commands


def stdin_of(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    """Make ``data`` the standard input (text and ``.buffer``)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_cli_values_from_stdin_and_files_and_raw_bytes_out(
    servers: ServerThread,
    capsysbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    nodes, _ = scan_cluster(servers, [[], []], replication=2)
    seeds = nodes[0].address
    blob = bytes(range(256)) * 1064  # 266 KiB, every byte value, not UTF-8
    (tmp_path / "blob").write_bytes(blob)
    assert main(["--seeds", seeds, "--raw", "set", "file", f"@{tmp_path / 'blob'}"]) == EXIT_OK
    assert nodes[0].store[b"file"] == blob  # stored as it is, no msgpack
    stdin_of(monkeypatch, blob)
    assert main(["--seeds", seeds, "set", "piped", "-", "--raw"]) == EXIT_OK
    assert nodes[0].store[b"piped"] == blob
    capsysbinary.readouterr()
    assert main(["--seeds", seeds, "--raw", "get", "file"]) == EXIT_OK
    assert capsysbinary.readouterr().out == blob  # byte for byte, no newline
    # Text from a file or stdin is stored as text, like an argument.
    (tmp_path / "note").write_text("héllo\nworld\n")
    assert main(["--seeds", seeds, "set", "note", f"@{tmp_path / 'note'}"]) == EXIT_OK
    stdin_of(monkeypatch, b'{"a": [1, 2]}')
    assert main(["--seeds", seeds, "set", "doc", "-", "--json"]) == EXIT_OK
    assert main(["--seeds", seeds, "set", "at", "@@home"]) == EXIT_OK
    capsysbinary.readouterr()
    with Client(seeds) as client:
        assert client.get("note") == "héllo\nworld\n"
        assert client.get("doc") == {"a": [1, 2]}
        assert client.get("at") == "@home"
    assert main(["--seeds", seeds, "get", "note"]) == EXIT_OK
    assert capsysbinary.readouterr().out == "héllo\nworld\n\n".encode()  # text: as before


def test_cli_value_errors_are_usage_errors_and_store_nothing(
    servers: ServerThread,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    nodes, _ = scan_cluster(servers, [[], []], replication=2)
    for nd in nodes:  # the cluster takes values up to 1000 bytes
        assert nd.topology is not None
        nd.topology = {**nd.topology, "max_value": 1000}
    seeds = nodes[0].address
    (tmp_path / "big").write_bytes(b"x" * 1001)
    assert main(["--seeds", seeds, "--raw", "set", "k", f"@{tmp_path / 'big'}"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "over the cluster's max_value (1000 bytes)" in err and "Traceback" not in err
    assert main(["--seeds", seeds, "set", "k", "y" * 999]) == EXIT_USAGE  # msgpack: 1002
    assert "is 1002 bytes, over the cluster's max_value (1000 bytes)" in capsys.readouterr().err
    stdin_of(monkeypatch, b"z" * 5000)
    assert main(["--seeds", seeds, "--raw", "set", "k", "-"]) == EXIT_USAGE
    assert "from standard input is over" in capsys.readouterr().err
    stdin_of(monkeypatch, b"\xff\xfe")
    assert main(["--seeds", seeds, "set", "k", "-"]) == EXIT_USAGE
    assert "not UTF-8 text: use --raw" in capsys.readouterr().err
    assert main(["--seeds", seeds, "set", "k", f"@{tmp_path / 'absent'}"]) == EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err
    stdin_of(monkeypatch, b"1")
    assert main(["--seeds", seeds, "mset", "a", "-", "b", "-"]) == EXIT_USAGE
    assert "read only once" in capsys.readouterr().err
    assert main(["--seeds", seeds, "mset", "a", "1", "b"]) == EXIT_USAGE
    assert main(["--seeds", seeds, "--raw", "set", "k", "v", "--json"]) == EXIT_USAGE
    assert b"k" not in nodes[0].store and b"a" not in nodes[0].store
    assert main(["--seeds", seeds, "--raw", "set", "k", "x" * 1000]) == EXIT_OK
    assert nodes[0].store[b"k"] == b"x" * 1000


def test_cli_ttl_expire_mget_mset(
    servers: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes, _ = scan_cluster(servers, [[], []], replication=2)
    seeds = nodes[0].address
    assert main(["--seeds", seeds, "mset", "a", "1", "b", "two\tlines\n", "--ttl", "60"]) == 0
    assert capsys.readouterr().out == "OK (2 keys)\n"
    assert main(["--seeds", seeds, "mget", "a", "b"]) == EXIT_OK
    assert capsys.readouterr().out == "a\t1\nb\ttwo\\tlines\\n\n"  # one line per key
    assert main(["--seeds", seeds, "mget", "a", "nope", "b"]) == EXIT_MISS
    captured = capsys.readouterr()
    assert captured.out == "a\t1\nb\ttwo\\tlines\\n\n" and "'nope' not found" in captured.err
    assert main(["--seeds", seeds, "ttl", "a"]) == EXIT_OK
    assert capsys.readouterr().out == "none\n"
    set_at = wall_clock_ms()
    for nd in nodes:
        nd.expiries[b"a"] = set_at + 30_000
    assert main(["--seeds", seeds, "ttl", "a"]) == EXIT_OK
    remaining_ms = float(capsys.readouterr().out) * 1000
    assert 30_000 - (wall_clock_ms() - set_at) <= remaining_ms <= 30_000
    assert main(["--seeds", seeds, "ttl", "nope"]) == EXIT_MISS
    assert "'nope' not found" in capsys.readouterr().err
    assert main(["--seeds", seeds, "expire", "a", "2.5"]) == EXIT_OK
    assert main(["--seeds", seeds, "expire", "a", "none"]) == EXIT_OK
    assert capsys.readouterr().out == "OK\nOK\n"
    expires = [p for nd in nodes for name, p in nd.payloads if name == "EXPIRE"]
    assert expires == [[b"a", 2500, None], [b"a", None, None]]
    assert main(["--seeds", seeds, "expire", "nope", "5"]) == EXIT_MISS
    for bad in ("0", "-3", "soon", "inf", "nan"):
        assert main(["--seeds", seeds, "expire", "a", bad]) == EXIT_USAGE
        assert "SECONDS" in capsys.readouterr().err


def test_cli_keys_scan_and_their_errors(
    servers: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    held = [[b"a:1", b"a:2", b"b\xff"], [b"a:2", b"a:3", b"c"]]
    nodes, _ = scan_cluster(servers, held, replication=2)
    seeds = nodes[0].address
    assert main(["--seeds", seeds, "keys"]) == EXIT_OK
    assert capsys.readouterr().out == "a:1\na:2\na:3\nb\\xff\nc\n"
    assert main(["--seeds", seeds, "keys", "a:*", "--limit", "2"]) == EXIT_OK
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["--seeds", seeds, "scan", "--node", nodes[1].address]) == EXIT_OK
    assert capsys.readouterr().out == "a:2\na:3\nc\n"
    assert main(["--seeds", seeds, "keys", "?:[23]", "--node", nodes[1].address]) == EXIT_OK
    assert capsys.readouterr().out == "a:2\na:3\n"
    dead = dead_address(servers)
    for argv, field in (
        (["keys", "--node", dead], "--node: " + dead + " is not a node of the cluster"),
        (["keys", "--node", "nohost"], "--node"),
        (["keys", "--limit", "0"], "--limit"),
        (["keys", "a["], "pattern"),
        (["keys", "--limit", "x"], "invalid int"),
    ):
        assert main(["--seeds", seeds, *argv]) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert field in err and "Traceback" not in err, err


def test_cli_flush_asks_for_the_cluster_name(
    servers: ServerThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes, _ = scan_cluster(servers, [[b"x"] * 2, [b"y"] * 3], replication=2)
    seeds = nodes[0].address
    stdin_of(monkeypatch, b"yes\n")
    assert main(["--seeds", seeds, "flush"]) == EXIT_MISS
    captured = capsys.readouterr()
    assert "Type the cluster name (hypercache)" in captured.err
    assert "anti-entropy copies them back" in captured.err
    assert "nothing was dropped" in captured.err and captured.out == ""
    assert not any(name == "FLUSH" for nd in nodes for name, _ in nd.payloads)
    stdin_of(monkeypatch, b"")  # no answer at all
    assert main(["--seeds", seeds, "clear"]) == EXIT_MISS
    stdin_of(monkeypatch, b"hypercache\n")
    assert main(["--seeds", seeds, "flush"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "dropped 2" in out and "dropped 3" in out
    assert out.endswith("flushed: 5 entries dropped on 2 nodes\n")
    servers.stop(nodes[1].address)
    assert main(["--seeds", seeds, "clear", "--yes"]) == EXIT_ERROR
    captured = capsys.readouterr()
    assert f"{nodes[1].address}  NOT FLUSHED (NodeUnavailableError" in captured.out
    assert "1 of 2 nodes were not flushed" in captured.err
    assert "they keep their entries, and anti-entropy will copy them back" in captured.err


def test_cli_members_health_and_ping_strict(
    servers: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes, _ = scan_cluster(servers, [[], [], []], replication=2)
    seeds = ",".join(nd.address for nd in nodes)
    assert main(["--seeds", seeds, "health", "--strict"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("status: ok\nnodes: 3 of 3 reachable\n")
    assert "all 64 have 2 reachable owners" in out
    assert main(["--seeds", seeds, "ping", "--strict"]) == EXIT_OK
    assert main(["--seeds", seeds, "members"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "REACHABLE" in out and out.count(" yes ") == 3
    servers.stop(nodes[2].address)
    assert main(["--seeds", seeds, "health"]) == EXIT_OK  # degraded: 0 unless --strict
    out = capsys.readouterr().out
    assert out.startswith("status: degraded\nnodes: 2 of 3 reachable\n")
    assert f"unreachable: n2 at {nodes[2].address}" in out
    assert "(e.g. partition" in out and "unreachable: n2" in out
    assert main(["--seeds", seeds, "health", "--strict"]) == EXIT_DEGRADED
    capsys.readouterr()
    assert main(["--seeds", seeds, "ping"]) == EXIT_OK
    assert main(["--seeds", seeds, "ping", "--strict"]) == EXIT_DEGRADED
    assert "status: degraded" in capsys.readouterr().err
    assert main(["--seeds", seeds, "members"]) == EXIT_OK
    assert capsys.readouterr().out.count(" no ") == 1
    for nd in nodes[:2]:
        servers.stop(nd.address)
    assert main(["--seeds", seeds, "--timeout", "0.5", "health"]) == EXIT_ERROR  # down
    assert capsys.readouterr().out.startswith("status: down\n")
    assert main(["--seeds", seeds, "--timeout", "0.5", "ping"]) == EXIT_ERROR


def test_health_assessment() -> None:
    payload, _ = topology_payload({"a": "h:1", "b": "h:2", "c": "h:3"}, replication=2)
    topo = Topology.from_wire(payload)
    assert assess(topo, {}).status == "ok"
    one = assess(topo, {"h:3": "refused"})
    assert one.status == "degraded" and one.unreachable == {"h:3": "refused"}
    shorts = {p for p in range(64) if "h:3" in topo.partition_owners(p)}
    assert one.short_partitions == len(shorts) > 0
    assert all(s.missing == ("c",) and s.reachable == 1 for s in one.short)
    assert assess(topo, {"h:1": "x", "h:2": "x", "h:3": "x"}).status == "down"
    assert assess(topo, {"elsewhere:1": "x"}).status == "ok"  # not a node of the table
    # Fewer nodes than the replication: every partition is short, with no node down.
    payload, _ = topology_payload({"a": "h:1", "b": "h:2"}, replication=2)
    small = Topology.from_wire({**payload, "replication": 3})
    report = assess(small, {})
    assert report.status == "degraded" and not report.unreachable
    assert report.short_partitions == 64
    assert "only 2 owners in the table" in "\n".join(report.lines())


def test_cli_bench_runs_a_small_load_and_prints_the_summary(
    servers: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes, _ = scan_cluster(servers, [[], []], replication=2)
    seeds = nodes[0].address
    argv = ["--seeds", seeds, "bench", "--requests", "200", "--concurrency", "4"]
    assert main([*argv, "--value-size", "32", "--keys", "10"]) == EXIT_OK
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("bench: 200 requests per op, concurrency 4, values of 32 bytes")
    header = ["op", "requests", "errors", "ops/s", "p50", "ms", "p95", "ms", "p99", "ms", "max"]
    assert lines[1].split() == [*header, "ms"]
    for op, line in zip(("set", "get"), lines[2:4], strict=True):
        cells = line.split()
        assert cells[:3] == [op, "200", "0"], line
        p50, p95, p99, most = map(float, cells[4:8])
        assert 0 < p50 <= p95 <= p99 <= most
    assert "set: 100%" in captured.err and "200/200" in captured.err  # the tqdm bars
    assert len(nodes[0].store) == 10  # keys bench:0 .. bench:9
    for bad in (["--requests", "0"], ["--concurrency", "0"], ["--keys", "0"]):
        assert main(["--seeds", seeds, "bench", *bad]) == EXIT_USAGE
        assert bad[0] in capsys.readouterr().err
    for nd in nodes:
        nd.fail_sets = ServerError("boom")
    assert main([*argv, "--no-progress"]) == EXIT_ERROR
    captured = capsys.readouterr()
    assert "set: 200 x ServerError" in captured.out and "200 requests failed" in captured.err
    assert captured.err.count("100%") == 0  # --no-progress


# ------------------------------------------------------------------ direct writes


def _direct(required: int = 2) -> Any:
    from hypercache.client._common import DirectWrite

    return DirectWrite(("a:1", "b:1", "c:1"), ("na", "nb", "nc"), required, [b"k", b"v"])


def test_a_direct_write_is_ok_at_its_acks_and_hints_the_owner_it_missed() -> None:
    from hypercache.errors import NodeUnavailableError

    wr = _direct()
    assert wr.start(lambda address: address == "c:1") == ["a:1", "b:1"]
    wr.answer("a:1", [True, 5, False], None)
    assert not wr.decided
    wr.answer("b:1", [False, 6], None)  # held a newer version: still an ack
    assert wr.decided and wr.outcome() == "ok"
    assert isinstance(wr.errors["c:1"], NodeUnavailableError)
    assert wr.hints() == [("a:1", ["nc", b"k", b"v"])]


def test_a_direct_write_refused_says_what_to_do_next() -> None:
    from hypercache.errors import (
        ClockSkewError,
        NotReadyError,
        PermissionDeniedError,
        RequestTimeoutError,
        WrongOwnerError,
    )

    cases: list[tuple[BaseException, str]] = [
        (WrongOwnerError("stale"), "stale"),
        (ClockSkewError("ahead"), "proxy"),
        (NotReadyError("moving"), "proxy"),
        (ProtocolError("unsupported operation 14"), "proxy"),
        (RequestTimeoutError("slow"), "proxy"),  # too few acks
    ]
    for exc, outcome in cases:
        wr = _direct(required=3)
        wr.start(lambda _address: False)
        wr.answer("a:1", [True, 1, False], None)
        wr.answer("b:1", [True, 1, False], None)
        wr.answer("c:1", None, exc)
        assert wr.decided and wr.outcome() == outcome, exc
    wr = _direct()
    wr.start(lambda _address: False)
    wr.answer("a:1", None, PermissionDeniedError("op W_PUT needs scope 'write'"))
    wr.answer("b:1", [True, 1], None)
    wr.answer("c:1", "garbage", None)  # a malformed answer is no ack
    assert wr.acks == 1 and isinstance(wr.errors["c:1"], ProtocolError)
    with pytest.raises(PermissionDeniedError):
        wr.outcome()
