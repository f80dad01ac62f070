"""Security against real ``hypercache-node`` processes: tokens and scopes on the data
port and the management HTTP, peers proved by the HMAC handshake, TLS and mTLS, and
the pre-authentication limits.

Every bypass attempt is refused before any state changes: the tests compare the
nodes' Merkle digests (``/internal/merkle``) before and after.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import FAST_FLAGS, running_cluster

from hypercache import Client
from hypercache._core.hlc import wall_clock_ms
from hypercache.cli.client import main as cli_main
from hypercache.cli.devca import DevCA
from hypercache.cluster.config import DistConfig
from hypercache.cluster.local import ProcessCluster, wait_for
from hypercache.cluster.membership import layout_of
from hypercache.errors import (
    HandshakeError,
    NodeUnavailableError,
    PermissionDeniedError,
)
from hypercache.net.auth import PeerAuthenticator
from hypercache.net.blocking import BlockingConnection
from hypercache.net.protocol import Op, make_hello
from hypercache.net.security import new_token

pytestmark = pytest.mark.functional

SECRET = "a-secret-of-the-security-tests"
CLUSTER = "hypercache"


# ---------------------------------------------------------------- fixtures


class Tokens:
    """The secrets of the test tokens file, by name."""

    def __init__(self, directory: Path) -> None:
        lines = []
        self.secrets: dict[str, str] = {}
        for name, scopes in (
            ("ops", ["admin"]),
            ("app", ["read", "write"]),
            ("dash", ["read"]),
            ("writer", ["write"]),
        ):
            secret, line = new_token(name, scopes)
            self.secrets[name] = secret
            lines.append(line)
        self.path = directory / "tokens"
        self.path.write_text("# test tokens\n" + "\n".join(lines) + "\n")

    def __getitem__(self, name: str) -> str:
        return self.secrets[name]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Tokens:
    return Tokens(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def token_cluster(
    tmp_path_factory: pytest.TempPathFactory, tokens: Tokens
) -> Iterator[ProcessCluster]:
    args = (
        "--replication",
        "2",
        "--cluster-secret",
        SECRET,
        "--tokens",
        str(tokens.path),
        "--handshake-timeout",
        "2",
    )
    cluster = running_cluster(2, tmp_path_factory.mktemp("token-cluster"), args)
    for node in cluster.nodes:
        node.auth = tokens["ops"]
    with cluster:
        yield cluster


def digests(cluster: ProcessCluster) -> list[Any]:
    return [node.http_json("/internal/merkle")["digests"] for node in cluster]


def connect(cluster: ProcessCluster, auth: str | None, index: int = 0) -> BlockingConnection:
    return BlockingConnection(cluster[index].data, make_hello(CLUSTER, auth=auth), timeout=5)


def metric(cluster: ProcessCluster, index: int, name: str) -> float:
    for line in cluster[index].http_text("/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def peer_hello(cluster: ProcessCluster, auth: PeerAuthenticator, node_id: str) -> dict[str, Any]:
    layout = layout_of(DistConfig(partitions=4096, replication=2, vnodes=0))
    address = "127.0.0.1:9"
    return make_hello(
        CLUSTER,
        node_id=node_id,
        address=address,
        info={"layout": layout},
        proof=auth.hello_proof(CLUSTER, node_id, address),
    )


def forget_peer(cluster: ProcessCluster, token: str, node_id: str) -> None:
    """Take the harness's proved peer out of the ring again: a proved HELLO makes it
    a member (by its own word), and the module's cluster is shared by the tests."""
    url = f"http://{cluster[0].http}/cluster/remove?node={node_id}"

    def removed() -> bool:
        status, _ = _http(url, token, "POST")
        return status in (200, 404)

    wait_for(removed, timeout=20, what=f"{node_id} removed")
    wait_for(
        lambda: all(node_id not in n.http_json("/cluster/ring")["nodes"] for n in cluster),
        timeout=20,
        what=f"{node_id} gone from every ring",
    )


# ---------------------------------------------------------------- tokens


def test_no_or_a_wrong_token_is_refused_at_the_handshake(
    token_cluster: ProcessCluster, tokens: Tokens
) -> None:
    before = digests(token_cluster)
    refused = metric(token_cluster, 0, "hypercache_token_refused_total")
    with pytest.raises(HandshakeError, match="requires a token"):
        connect(token_cluster, None)
    with pytest.raises(HandshakeError, match="bad token"):
        connect(token_cluster, tokens["app"] + "x")
    with pytest.raises(HandshakeError, match="bad token"):
        connect(token_cluster, SECRET)  # the cluster secret is no client token
    assert metric(token_cluster, 0, "hypercache_token_refused_total") == refused + 3
    assert digests(token_cluster) == before


def test_each_op_needs_its_scope(token_cluster: ProcessCluster, tokens: Tokens) -> None:
    with connect(token_cluster, tokens["app"]) as app:
        assert app.request(Op.SET, [b"scoped", b"v1", None, "all"]) is True
    before = digests(token_cluster)
    with connect(token_cluster, tokens["dash"]) as dash:
        assert dash.request(Op.GET, [b"scoped", "quorum"]) == [True, b"v1"]
        for op, payload in (
            (Op.SET, [b"scoped", b"v2", None, "all"]),
            (Op.DELETE, [b"scoped", "all"]),
            (Op.EXPIRE, [b"scoped", 1000, "all"]),
            (Op.ADD, [b"scoped", b"v2", None, "all"]),
            # the one-hop writes: a client-stamped version, and a hint of one
            (Op.W_PUT, [b"scoped", b"v2", wall_clock_ms() << 16, 7, 0, False, 0]),
            (Op.W_HINT, ["node-2", b"scoped", b"v2", wall_clock_ms() << 16, 7, 0, False, 0]),
            (Op.FLUSH, []),
        ):
            with pytest.raises(PermissionDeniedError, match="needs scope"):
                dash.request(op, payload)
        # Watching writes is reading.
        assert dash.request(Op.WATCH, {"prefixes": [b"scoped"]})["watching"] == 1
    with connect(token_cluster, tokens["writer"]) as writer:
        with pytest.raises(PermissionDeniedError, match="needs scope 'read'"):
            writer.request(Op.GET, [b"scoped", "quorum"])
        with pytest.raises(PermissionDeniedError, match="needs scope 'read'"):
            writer.request(Op.WATCH, {"prefixes": [b"scoped"]})
    with (
        connect(token_cluster, tokens["app"]) as app,
        pytest.raises(PermissionDeniedError, match="needs scope 'admin'"),
    ):
        app.request(Op.FLUSH, [])
    assert digests(token_cluster) == before
    assert metric(token_cluster, 0, "hypercache_scope_refused_total") >= 10


def test_a_client_token_can_send_no_peer_op(token_cluster: ProcessCluster, tokens: Tokens) -> None:
    """Not even ``admin``: replica writes with a version of the client's choosing,
    hints, gossip, anti-entropy and rebalancing are for proved peers only."""
    before = digests(token_cluster)
    entry = [b"forged", b"evil", 2**62, 7, 0, False]
    with connect(token_cluster, tokens["ops"]) as ops:
        for op, payload in (
            (Op.R_PUT, entry),  # read repair: open to clients without tokens only
            (Op.R_PUT_MANY, [[entry], 0]),  # a hint replay
            (Op.R_PUT_MANY, [[entry], 1]),  # an anti-entropy push
            (Op.R_DEL, [b"scoped", 2**62, 7]),
            (Op.MEMBERS, [[], 0]),
            (Op.PING_REQ, ["node-2", "127.0.0.1:9"]),
            (Op.MERKLE, [0, []]),
            (Op.STREAM, [0, None, 10]),
            (Op.HOLDS, [[0]]),
        ):
            with pytest.raises(PermissionDeniedError, match="for cluster peers"):
                ops.request(op, payload)
    assert digests(token_cluster) == before
    assert token_cluster[0].http_json("/stats")["peer_auth"]["peer_ops_refused"] >= 9


def test_a_peer_claim_needs_a_fresh_unused_proof(
    token_cluster: ProcessCluster, tokens: Tokens
) -> None:
    before = digests(token_cluster)
    # no proof at all: a client claiming to be a node
    with pytest.raises(HandshakeError, match="without a proof"):
        BlockingConnection(
            token_cluster[0].data, make_hello(CLUSTER, node_id="intruder", address="127.0.0.1:9")
        )
    # a proof with another secret
    wrong = PeerAuthenticator("not-the-secret-of-this-cluster")
    with pytest.raises(HandshakeError, match="wrong proof"):
        BlockingConnection(token_cluster[0].data, peer_hello(token_cluster, wrong, "intruder"))
    # a stale one: made two minutes ago (a recorded HELLO)
    stale = PeerAuthenticator(SECRET, clock=lambda: wall_clock_ms() - 120_000)
    with pytest.raises(HandshakeError, match="from this node's clock"):
        BlockingConnection(token_cluster[0].data, peer_hello(token_cluster, stale, "intruder"))
    # a good one, accepted once, then replayed
    hello = peer_hello(token_cluster, PeerAuthenticator(SECRET), "harness-peer")
    with BlockingConnection(token_cluster[0].data, hello) as peer:
        assert peer.request(Op.MERKLE, [0, []]) == []  # a proved peer may
    with pytest.raises(HandshakeError, match="replays a nonce"):
        BlockingConnection(token_cluster[0].data, hello)
    assert digests(token_cluster) == before
    assert token_cluster[0].http_json("/stats")["peer_auth"]["replays"] >= 1
    forget_peer(token_cluster, tokens["ops"], "harness-peer")


def _http(url: str, token: str | None, method: str = "GET") -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_management_endpoints_check_their_scope(
    token_cluster: ProcessCluster, tokens: Tokens
) -> None:
    base = f"http://{token_cluster[0].http}"
    before = digests(token_cluster)
    assert _http(base + "/health", None)[0] == 401
    assert _http(base + "/health", "nope")[0] == 401
    assert _http(base + "/health", tokens["dash"])[0] == 200
    assert _http(base + "/stats", tokens["dash"])[0] == 200
    for path in ("/config", "/internal/merkle", "/internal/keys?partition=0"):
        status, body = _http(base + path, tokens["dash"])
        assert status == 403 and "admin" in body["error"]
        assert _http(base + path, tokens["ops"])[0] == 200
    status, _ = _http(base + "/cluster/remove?node=node-2", tokens["app"], "POST")
    assert status == 403
    assert token_cluster[0].http_json("/cluster/members")["members"]  # still both
    config = token_cluster[0].http_json("/config")
    assert config["tokens"] == str(tokens.path)  # a path, never a secret
    assert digests(token_cluster) == before
    assert metric(token_cluster, 0, "hypercache_http_auth_refused_total") >= 6


def test_the_client_works_with_a_token(token_cluster: ProcessCluster, tokens: Tokens) -> None:
    seeds = [node.data for node in token_cluster]
    with Client(seeds, auth_token=tokens["app"]) as client:
        client.set("client-key", {"n": 1})
        assert client.get("client-key") == {"n": 1}
        assert client.stats.direct_writes == 1  # one hop, stamped by the client
    with Client(seeds, auth_token=tokens["dash"]) as reader:
        assert reader.get("client-key") == {"n": 1}
        with pytest.raises(PermissionDeniedError, match="W_PUT needs scope 'write'"):
            reader.set("client-key", 2)  # refused on the direct path, not sent again
    with (
        Client(seeds, auth_token=tokens["dash"], write_path="proxy") as proxied,
        pytest.raises(PermissionDeniedError, match="SET needs scope 'write'"),
    ):
        proxied.set("client-key", 2)
    with Client(seeds, auth_token=tokens["app"]) as client:
        assert client.get("client-key") == {"n": 1}


def test_a_client_stops_pushing_read_repairs_once_refused(
    token_cluster: ProcessCluster, tokens: Tokens
) -> None:
    """A token client's read finds node 2 stale; its repair push is refused (R_PUT is
    for peers once tokens are on) and it pushes no more; the read still answers."""
    seeds = [node.data for node in token_cluster]
    with Client(seeds, auth_token=tokens["app"], consistency="all") as client:
        client.set("stale-key", "old")
        hello = peer_hello(token_cluster, PeerAuthenticator(SECRET), "harness-peer-2")
        with BlockingConnection(token_cluster[0].data, hello) as peer:
            _, ts, origin, _, _ = peer.request(Op.R_GET, [b"stale-key"])
            newer = client.options.serializer.dumps("new")
            assert peer.request(Op.R_PUT, [b"stale-key", newer, ts + 1, origin, 0, False])
        refused = token_cluster[1].http_json("/stats")["peer_auth"]["peer_ops_refused"]
        assert client.get("stale-key") == "new"
        wait_for(lambda: client._repairs_refused, timeout=10, what="the push refused")
        assert client.get("stale-key") == "new"  # no second push
        after = token_cluster[1].http_json("/stats")["peer_auth"]["peer_ops_refused"]
        assert after == refused + 1
    forget_peer(token_cluster, tokens["ops"], "harness-peer-2")


def test_sighup_reloads_the_tokens_file(token_cluster: ProcessCluster, tokens: Tokens) -> None:
    secret, line = new_token("late", ["read"])
    with pytest.raises(HandshakeError, match="bad token"):
        connect(token_cluster, secret)
    with tokens.path.open("a") as file:
        file.write(line + "\n")
    for node in token_cluster:
        node.signal(signal.SIGHUP)
    wait_for(
        lambda: all(
            metric(token_cluster, n.index, "hypercache_security_reloads_total") >= 1
            for n in token_cluster
        ),
        timeout=10,
        what="the tokens reloaded",
    )
    with connect(token_cluster, secret) as late:
        assert late.request(Op.PING, None) is not None
    with connect(token_cluster, tokens["app"]) as app:  # the others still work
        assert app.request(Op.GET, [b"nothing-here", "one"]) == [False, None]


# ---------------------------------------------------------------- limits


def test_pre_auth_limits_close_the_connection_and_are_counted(
    token_cluster: ProcessCluster,
) -> None:
    host, port = token_cluster[0].data.rsplit(":", 1)
    stats: dict[str, int] = token_cluster[0].http_json("/stats")["net"]
    # A frame header announcing 1 MiB before any HELLO: over the pre-auth limit.
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(struct.pack(">I", 1024 * 1024))
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed, unanswered
    # Nothing at all: closed at the handshake deadline (2 s here).
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.settimeout(10)
        assert sock.recv(1) == b""

    def counted() -> bool:
        now: dict[str, int] = token_cluster[0].http_json("/stats")["net"]
        return (
            now["prehello_oversize"] > stats["prehello_oversize"]
            and now["handshake_timeouts"] > stats["handshake_timeouts"]
        )

    wait_for(counted, timeout=10, what="the limits counted")
    text = token_cluster[0].http_text("/metrics")
    assert "hypercache_net_prehello_oversize_total" in text
    assert "hypercache_net_handshake_timeouts_total" in text


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca = DevCA(directory)
    foreign = DevCA(directory / "foreign", name="foreign-ca")
    return {
        "ca": ca.cert,
        "node": ca.issue("node"),
        "client": ca.issue("client"),
        "expired": ca.issue("expired", expired=True),
        "foreign": foreign.issue("foreign-client"),
        "foreign_ca": foreign.cert,
    }


@pytest.fixture(scope="module")
def tls_cluster(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any]
) -> Iterator[ProcessCluster]:
    node = pki["node"]
    args = (
        "--replication",
        "2",
        "--cluster-secret",
        SECRET,
        "--tls-cert",
        node.cert,
        "--tls-key",
        node.key,
        "--tls-ca",
        pki["ca"],
        "--tls-client-auth",
        "required",
    )
    harness = ssl.create_default_context(cafile=pki["ca"])
    harness.load_cert_chain(pki["client"].cert, pki["client"].key)
    workdir = tmp_path_factory.mktemp("tls-cluster")
    # healthy once the peers reached each other over mTLS
    with ProcessCluster(2, workdir, (*FAST_FLAGS, *args), ssl=harness) as cluster:
        yield cluster


def _tls_connect(address: str, ctx: ssl.SSLContext | None) -> BlockingConnection:
    return BlockingConnection(address, make_hello(CLUSTER), timeout=5, ssl=ctx)


def test_mtls_cluster_serves_a_client_with_a_certificate(
    tls_cluster: ProcessCluster, pki: dict[str, Any]
) -> None:
    seeds = [n.data for n in tls_cluster]
    tls = {"ca": pki["ca"], "cert": pki["client"].cert, "key": pki["client"].key}
    with Client(seeds, ssl=tls) as client:
        client.set("tls-key", b"over tls")
        assert client.get("tls-key") == b"over tls"
        client.set_many({f"k{i}": i for i in range(50)})
        assert client.get_many([f"k{i}" for i in range(50)]) == {f"k{i}": i for i in range(50)}
    assert tls_cluster[0].http_json("/health")["status"] == "ok"  # https, client cert
    assert "hypercache_tls_enabled 1.0" in tls_cluster[0].http_text("/metrics")


def test_mtls_refuses_plaintext_and_bad_certificates(
    tls_cluster: ProcessCluster, pki: dict[str, Any]
) -> None:
    before = digests(tls_cluster)
    address = tls_cluster[0].data
    with pytest.raises(NodeUnavailableError):  # plaintext to the TLS port
        _tls_connect(address, None)

    def ctx(issued: Any = None) -> ssl.SSLContext:
        c = ssl.create_default_context(cafile=pki["ca"])
        if issued is not None:
            c.load_cert_chain(issued.cert, issued.key)
        return c

    for bad in (ctx(), ctx(pki["foreign"]), ctx(pki["expired"])):
        with pytest.raises(NodeUnavailableError):
            conn = _tls_connect(address, bad)
            # TLS 1.3 may end the handshake client-side before the server's
            # verdict: the refusal then arrives at the first exchange.
            conn.request(Op.PING, None)
    # a server certificate of another CA is refused by the client
    with pytest.raises(NodeUnavailableError, match="TLS handshake failed"):
        _tls_connect(address, ssl.create_default_context(cafile=pki["foreign_ca"]))
    # a plaintext HTTP request to the HTTPS port gets no answer
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{tls_cluster[0].http}/health", timeout=5).read()
    assert digests(tls_cluster) == before


def test_the_command_line_client_over_mtls(
    tls_cluster: ProcessCluster, pki: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    tls = ["--tls-ca", pki["ca"], "--tls-cert", pki["client"].cert, "--tls-key", pki["client"].key]
    seeds = ["--seeds", tls_cluster[0].data]
    assert cli_main([*seeds, *tls, "set", "cli-key", "cli-value"], env={}) == 0
    assert cli_main([*seeds, *tls, "get", "cli-key"], env={}) == 0
    assert capsys.readouterr().out.split() == ["OK", "cli-value"]
    assert cli_main([*seeds, "get", "cli-key"], env={}) == 3  # plaintext: refused


def test_make_run_tls_starts_a_secured_cluster(tmp_path: Path) -> None:
    """``hypercache-local --tls`` (``make run-tls``): what its banner prints connects."""
    out = tmp_path / "banner"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "hypercache.cli.local", "--tls", "--nodes", "1"),
                *("--port", "0", "--http-port", "0"),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(lambda: "Ctrl-C stops it" in out.read_text(), timeout=60, what="the banner")
        fields = {}
        for line in out.read_text().splitlines():
            words = line.split()
            if line.startswith("  node-1"):
                fields["data"] = words[2]
            elif line.startswith(("  CA ", "  client cert", "  client key", "  admin token")):
                fields[" ".join(words[:-1])] = words[-1]
        tls = {"ca": fields["CA"], "cert": fields["client cert"], "key": fields["client key"]}
        with Client([fields["data"]], ssl=tls, auth_token=fields["admin token"]) as client:
            client.set("run-tls", "works")
            assert client.get("run-tls") == "works"
        with pytest.raises(HandshakeError), Client([fields["data"]], ssl=tls) as anonymous:
            anonymous.get("run-tls")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0
