"""Fixtures shared by the transport tests (see net_helpers.py for their helpers)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from net_helpers import LOOPS, Runner

from hypercache.net import TCP, InprocNetwork, Transport


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Runner[Any]]:
    """Run a coroutine on a fresh loop of each kind; the loop lives for the test."""
    with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
        yield runner.run


@pytest.fixture(params=["tcp", "inproc"])
def transport(request: pytest.FixtureRequest) -> Transport:
    return TCP if request.param == "tcp" else InprocNetwork()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One standalone redis-server for the session (tests use namespaces of their own)."""
    from redis_harness import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Redis Cluster of three masters and a replica, for the session."""
    from redis_harness import RedisClusterProcs

    with RedisClusterProcs(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def hypercache_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real hypercache-node for the session (the backend suite's cluster)."""
    from cluster_harness import running_cluster

    with running_cluster(1, tmp_path_factory.mktemp("hc")) as cluster:
        yield cluster


#: The backends of the contract suite, by the fixture that serves them.
BACKEND_KINDS = ["memory", "redis", "redis_cluster", "hypercache"]


def backend_url(request: pytest.FixtureRequest, kind: str, namespace: str) -> str:
    """A URL for ``kind`` with ``namespace``, starting the servers it needs."""
    if kind == "memory":
        return f"memory://?namespace={namespace}"
    if kind == "redis":
        return str(request.getfixturevalue("redis_server").url) + f"?namespace={namespace}"
    if kind == "redis_cluster":
        return str(request.getfixturevalue("redis_cluster").url) + f"?namespace={namespace}"
    cluster = request.getfixturevalue("hypercache_node")
    return "hypercache://" + ",".join(cluster.addresses) + f"?namespace={namespace}"
