"""Tokens, scopes, security settings, TLS contexts and reloads (units), an in-loop
node over TLS with the async client, and hypothesis fuzzing of the handshake and of
every op's payload against a node that checks tokens and peer proofs."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aio_helpers import run
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hypercache import AsyncClient
from hypercache.cli.devca import DevCA
from hypercache.cluster.config import DistConfig
from hypercache.cluster.local import until
from hypercache.cluster.node import Node
from hypercache.cluster.security import NodeSecurity
from hypercache.errors import (
    ConfigError,
    HandshakeError,
    NodeUnavailableError,
    PermissionDeniedError,
)
from hypercache.net.auth import PeerAuthenticator
from hypercache.net.protocol import ERROR, RESPONSE, FrameDecoder, Op, encode_request, make_hello
from hypercache.net.security import (
    OP_SCOPES,
    SecuritySettings,
    TokenSet,
    hash_secret,
    new_token,
    permits,
    resolve_client_ssl,
)
from hypercache.net.transport import PeerInfo

SECRET = "a-secret-of-the-security-unit-tests"


# ------------------------------------------------------------------ tokens


def test_a_new_token_is_admitted_with_its_scopes() -> None:
    secret, line = new_token("app", ["write", "read"])
    name, scopes, digest = line.split()
    assert (name, scopes, digest) == ("app", "read,write", hash_secret(secret))
    assert secret not in line
    tokens = TokenSet.parse(f"# comment\n\n{line}\n")
    token = tokens.check(secret)
    assert (token.name, token.scopes) == ("app", frozenset({"read", "write"}))
    with pytest.raises(HandshakeError, match="bad token"):
        tokens.check(secret[:-1])
    with pytest.raises(HandshakeError, match="requires a token"):
        tokens.check(None)
    with pytest.raises(HandshakeError, match="requires a token"):
        tokens.check(7)
    assert tokens.refused == 3


def test_every_entry_is_compared_and_the_first_match_wins() -> None:
    a, line_a = new_token("a", ["read"])
    _, line_b = new_token("b", ["admin"])
    tokens = TokenSet.parse(f"{line_a}\n{line_b}\n")
    assert tokens.check(a).name == "a"
    assert tokens.names == ["a", "b"] and len(tokens) == 2


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "admits nobody"),
        ("# only a comment\n", "admits nobody"),
        ("app read\n", "line 1: expected"),
        ("app read sha256:00 extra\n", "line 1: expected"),
        ("app reed sha256:" + "0" * 64, "line 1: scopes are"),
        ("app read plaintext-secret", "never in clear"),
        ("app read sha256:" + "0" * 63, "never in clear"),
        ("app read sha256:" + "z" * 64, "never in clear"),
        ("a read sha256:" + "0" * 64 + "\na write sha256:" + "1" * 64, "line 2: .* used twice"),
    ],
)
def test_a_malformed_tokens_file_names_the_line(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        TokenSet.parse(text)
    assert info.value.field == "tokens"


def test_a_missing_tokens_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        TokenSet.load(str(tmp_path / "nope"))


def test_admin_grants_every_scope_and_the_op_table_leaves_peer_ops_out() -> None:
    assert permits(frozenset({"admin"}), "write") and permits(frozenset({"admin"}), "read")
    assert not permits(frozenset({"read"}), "write")
    assert not permits(frozenset({"write"}), "read")
    for op in (Op.R_PUT, Op.R_PUT_MANY, Op.R_DEL, Op.MERKLE, Op.KEYS, Op.PULL, Op.STREAM):
        assert int(op) not in OP_SCOPES
    for op in (Op.PING_REQ, Op.MEMBERS, Op.HOLDS, Op.HELLO):
        assert int(op) not in OP_SCOPES
    # the operator's ops need admin, like FLUSH
    for op in (Op.FLUSH, Op.LEAVE, Op.REMOVE):
        assert OP_SCOPES[int(op)] == "admin"


def test_with_tokens_a_client_reaches_only_ops_with_a_scope(tmp_path: Path) -> None:
    async def body() -> None:
        async with node_running() as node:
            open_ops = set(node._running().client_ops)
            assert {int(Op.R_PUT), int(Op.LEAVE), int(Op.REMOVE)} <= open_ops
        tokens = tmp_path / "tokens"
        tokens.write_text(new_token("ops", ["read"])[1] + "\n")
        secret = "s" * 32
        async with node_running(tokens=str(tokens), cluster_secret=secret) as node:
            restricted = set(node._running().client_ops)
        assert restricted == open_ops & set(OP_SCOPES) and int(Op.R_PUT) not in restricted

    run(body(), timeout=30)


def test_new_token_refuses_bad_names_and_scopes() -> None:
    with pytest.raises(ConfigError, match="without blanks"):
        new_token("has space", ["read"])
    with pytest.raises(ConfigError, match="scopes are"):
        new_token("app", ["root"])
    with pytest.raises(ConfigError, match="scopes are"):
        new_token("app", [])


# ------------------------------------------------------------------ settings


def test_tokens_need_the_cluster_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="required with tokens") as info:
        DistConfig(tokens=str(tmp_path / "tokens"))
    assert info.value.field == "cluster_secret"
    config = DistConfig(tokens=str(tmp_path / "t"), cluster_secret=SECRET, tls_cert="")
    assert config.security == SecuritySettings(tokens=str(tmp_path / "t"))


def test_mtls_settings_need_a_ca() -> None:
    with pytest.raises(ConfigError, match="needs tls_ca") as info:
        SecuritySettings(tls_cert="node.pem", tls_client_auth="required")
    assert info.value.field == "tls_client_auth"
    assert SecuritySettings(tls_cert=" n.pem ", tls_client_auth="OPTIONAL", tls_ca="ca").tls
    assert not SecuritySettings().tls


# ------------------------------------------------------------------ TLS files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca = DevCA(directory)
    return {"dir": directory, "ca": ca.cert, "node": ca.issue("node"), "ca_obj": ca}


def test_client_ssl_takes_a_context_a_path_or_a_dict(pki: dict[str, Any]) -> None:
    ctx = ssl.create_default_context()
    assert resolve_client_ssl(ctx) is ctx
    assert resolve_client_ssl(None) is None and resolve_client_ssl(False) is None
    assert isinstance(resolve_client_ssl(True), ssl.SSLContext)
    by_path = resolve_client_ssl(pki["ca"])
    assert by_path is not None and by_path.verify_mode == ssl.CERT_REQUIRED
    node = pki["node"]
    full = resolve_client_ssl(
        {"ca": pki["ca"], "cert": node.cert, "key": node.key, "check_hostname": False}
    )
    assert full is not None and not full.check_hostname
    with pytest.raises(ConfigError, match="unknown keys"):
        resolve_client_ssl({"cafile": pki["ca"]})
    with pytest.raises(ConfigError, match="cannot load CA"):
        resolve_client_ssl(str(pki["dir"] / "missing.pem"))
    with pytest.raises(ConfigError, match=r"expected an ssl\.SSLContext"):
        resolve_client_ssl(7)  # type: ignore[arg-type]


def test_node_security_refuses_files_that_do_not_load(pki: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="cannot load certificate") as info:
        NodeSecurity(SecuritySettings(tls_cert=pki["ca"] + ".missing"))
    assert info.value.field == "tls_cert"


def test_sighup_reload_of_certificates_applies_whole_or_not_at_all(tmp_path: Path) -> None:
    ca = DevCA(tmp_path)
    node = ca.issue("node")
    settings = SecuritySettings(tls_cert=node.cert, tls_key=node.key, tls_ca=ca.cert)
    security = NodeSecurity(settings)
    assert security.tls and security.server_ssl is not None
    ca.issue("node")  # a new certificate and key in the same files: rotated
    security.reload()
    assert (security.reloads, security.reload_failures) == (1, 0)
    Path(node.key).write_text("not a key\n")
    security.reload()
    assert (security.reloads, security.reload_failures) == (1, 1)


def test_http_scopes_and_reload(tmp_path: Path) -> None:
    read, line_r = new_token("dash", ["read"])
    admin, line_a = new_token("ops", ["admin"])
    path = tmp_path / "tokens"
    path.write_text(f"{line_r}\n{line_a}\n")
    security = NodeSecurity(SecuritySettings(tokens=str(path)))
    check = security.check_http
    assert check("GET", "/health", None) == "401"
    assert check("GET", "/health", "Basic abc") == "401"
    assert check("GET", "/health", f"Bearer {read}x") == "401"
    assert check("GET", "/health", f"Bearer {read}") is None
    assert check("HEAD", "/stats", f"bearer {read}") is None
    assert check("GET", "/config", f"Bearer {read}") == "403:admin"
    assert check("POST", "/cluster/remove", f"Bearer {read}") == "403:admin"
    assert check("GET", "/unknown", f"Bearer {read}") == "403:admin"
    assert check("GET", "/internal/keys", f"Bearer {admin}") is None
    assert security.http_refused == 6
    # a reload takes a new file; a broken one keeps the old tokens
    fresh, line_f = new_token("fresh", ["read"])
    path.write_text(line_f + "\n")
    security.reload()
    assert security.reloads == 1
    assert check("GET", "/health", f"Bearer {fresh}") is None
    assert check("GET", "/health", f"Bearer {read}") == "401"
    path.write_text("broken\n")
    security.reload()
    assert security.reload_failures == 1
    assert check("GET", "/health", f"Bearer {fresh}") is None


def test_check_op_refuses_what_the_token_lacks(tmp_path: Path) -> None:
    security = NodeSecurity(SecuritySettings())
    info = PeerInfo("x", 1, "c", None, None, {}, scopes=frozenset({"read"}), principal="dash")
    security.check_op(info, int(Op.GET))
    with pytest.raises(PermissionDeniedError, match=r"SET needs scope .write..*.dash."):
        security.check_op(info, int(Op.SET))
    security.check_op(PeerInfo("x", 1, "c", None, None, {}), int(Op.FLUSH))  # no tokens
    assert security.scope_refused == 1
    ops = {int(Op.R_PUT): 1, int(Op.GET): 2}
    assert security.restrict(dict(ops)) == ops  # without tokens: R_PUT stays open


# ------------------------------------------------------------- in-loop nodes


@contextlib.asynccontextmanager
async def node_running(**settings: Any) -> AsyncIterator[Node]:
    config = DistConfig(bind="127.0.0.1:0", http=None, replication=1, partitions=256, **settings)
    node = Node(config)
    await node.start()
    try:
        await until(lambda: node.rebalancer.ready, what="the node ready")
        yield node
    finally:
        await node.stop()


def test_async_client_over_tls(pki: dict[str, Any]) -> None:
    node_cert = pki["node"]

    async def main() -> None:
        async with node_running(tls_cert=node_cert.cert, tls_key=node_cert.key) as node:
            async with AsyncClient(node.address, ssl=pki["ca"]) as client:
                await client.set("k", {"over": "tls"})
                assert await client.get("k") == {"over": "tls"}
            # a client that does not trust the node's CA never gets to the HELLO
            with pytest.raises(NodeUnavailableError, match="TLS handshake failed"):
                async with AsyncClient(node.address, ssl=True, connect_timeout=2):
                    pass

    run(main())


# ------------------------------------------------------------------ fuzzing

_HELLO_KEYS = ("version", "cluster", "node_id", "address", "auth", "info", "proof")
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.binary(max_size=24)
    | st.text(max_size=24)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_proofs = st.fixed_dictionaries(
    {},
    optional={
        "ts": _values | st.integers(0, 2**62),
        "nonce": st.binary(min_size=16, max_size=16),
        "mac": st.binary(min_size=32, max_size=32),
    },
)
_hellos = st.fixed_dictionaries(
    {},
    optional={
        "version": st.sampled_from([1, 2, 0]) | _values,
        "cluster": st.sampled_from(["hypercache", "other"]) | _values,
        "node_id": st.sampled_from(["node-x", None]) | _values,
        "address": st.sampled_from(["127.0.0.1:9"]) | _values,
        "auth": st.sampled_from(["nope", SECRET]) | _values,
        "info": _values,
        "proof": _proofs | _values,
    },
)


class FuzzTarget:
    """A node with tokens and a cluster secret in a loop of its own, reached by raw
    sockets from the test's thread."""

    def __init__(self, tokens_path: Path) -> None:
        self.runner = asyncio.Runner()
        self.node = Node(
            DistConfig(
                bind="127.0.0.1:0",
                http=None,
                replication=1,
                partitions=256,
                cluster_secret=SECRET,
                tokens=str(tokens_path),
            )
        )
        self.runner.run(self.node.start())

    def exchange(
        self, frames: bytes, expect: int = 1 << 30, quiet: float = 0.5, *, by_id: bool = False
    ) -> list[tuple[int, Any]]:
        """Send ``frames`` on a new connection; the (type, payload) of each answer
        until the server closes it, goes ``quiet`` seconds, or ``expect`` came: in the
        order they came, or with ``by_id`` in the order of their request ids (a
        request served in a task, such as a coordinated GET, may answer after a
        later PING)."""

        async def main() -> list[tuple[int, Any]]:
            host, port = self.node.address.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(frames)
            got: list[Any] = []
            decoder = FrameDecoder()
            try:
                while len(got) < expect:
                    data = await asyncio.wait_for(reader.read(65536), quiet)
                    if not data:
                        break
                    decoder.feed(data)
                    got.extend(decoder)
            except (TimeoutError, ConnectionError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            if by_id:
                got.sort(key=lambda frame: frame[1])
            return [(frame[0], frame[3]) for frame in got]

        return self.runner.run(main())

    def close(self) -> None:
        self.runner.run(self.node.stop())
        self.runner.close()


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FuzzTarget, str]]:
    secret, line = new_token("ops", ["admin"])
    path = tmp_path_factory.mktemp("fuzz") / "tokens"
    path.write_text(line + "\n")
    target = FuzzTarget(path)
    try:
        yield target, secret
    finally:
        target.close()


def test_malformed_leave_is_refused_and_the_node_stays(
    fuzz_target: tuple[FuzzTarget, str],
) -> None:
    target, secret = fuzz_target
    hello = make_hello("hypercache", auth=secret)
    for payload in ([1], {"now": True}, "now", [None]):
        answers = target.exchange(
            encode_request(1, 0, hello)
            + encode_request(2, int(Op.LEAVE), payload)
            + encode_request(3, int(Op.PING), None),
            3,
            by_id=True,
        )
        assert [kind for kind, _ in answers] == [RESPONSE, ERROR, RESPONSE], answers
        assert answers[1][1][0] == 2, answers  # ProtocolError
    assert not target.node.leaving


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(hello=_hellos, op=st.sampled_from([0, 0, 0, 1, 11, 12, 31, 200]))
def test_fuzzed_handshakes_never_admit_anyone(
    fuzz_target: tuple[FuzzTarget, str], hello: dict[str, Any], op: int
) -> None:
    target, _ = fuzz_target
    frame = encode_request(1, op, hello)
    answers = target.exchange(frame + encode_request(2, int(Op.GET), [b"k", "one"]))
    # Never a HELLO answered, never a request served: an error, then closed.
    assert all(kind == ERROR for kind, _ in answers), answers
    assert len(answers) <= 1
    assert len(target.node.store) == 0


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=64))
def test_fuzzed_bytes_before_the_hello_close_only_that_connection(
    fuzz_target: tuple[FuzzTarget, str], data: bytes
) -> None:
    target, secret = fuzz_target
    target.exchange(struct.pack(">I", len(data)) + data, quiet=0.05)
    hello = make_hello("hypercache", auth=secret)
    answers = target.exchange(encode_request(1, 0, hello) + encode_request(2, 1, None), 2)
    assert [kind for kind, _ in answers] == [RESPONSE, RESPONSE]


def _peer_hello(node_id: str) -> dict[str, Any]:
    from hypercache.cluster.membership import layout_of

    layout = layout_of(DistConfig(partitions=256, replication=1, vnodes=0))
    return make_hello(
        "hypercache",
        node_id=node_id,
        address="127.0.0.1:9",
        info={"layout": layout},
        proof=PeerAuthenticator(SECRET).hello_proof("hypercache", node_id, "127.0.0.1:9"),
    )


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    op=st.sampled_from([int(op) for op in Op if op != Op.HELLO]),
    payload=_values,
    as_peer=st.booleans(),
)
def test_fuzzed_payloads_get_a_typed_answer(
    fuzz_target: tuple[FuzzTarget, str], op: int, payload: Any, as_peer: bool
) -> None:
    """Every op's payload validation, as a client (admin token) and as a proved peer:
    an answer or a typed error, never a crash (a ServerError is a handler bug), and
    the connection still serves the next request. A well-formed ``LEAVE`` from the
    admin (``None`` or ``[]``) is obeyed: the node leaves and stops, so the target
    is spared it (test_malformed_leave_is_refused_and_the_node_stays covers it)."""
    assume(not (op == Op.LEAVE and not as_peer and payload in (None, [])))
    target, secret = fuzz_target
    hello = _peer_hello("fuzz-peer") if as_peer else make_hello("hypercache", auth=secret)
    answers = target.exchange(
        encode_request(1, 0, hello) + encode_request(2, op, payload) + encode_request(3, 1, None),
        3,
        by_id=True,
    )
    assert len(answers) == 3, answers
    kind, answer = answers[1]
    if kind == ERROR:
        assert answer[0] != 10, f"op {Op(op).name} crashed on {payload!r}: {answer}"
    assert answers[2][0] == RESPONSE
