"""Peer authentication (hypercache.net.auth): proofs of the cluster secret in HELLOs."""

from __future__ import annotations

from typing import Any

import pytest

from hypercache.errors import HandshakeError
from hypercache.net.auth import WINDOW_MS, PeerAuthenticator, is_loopback_host

SECRET = "correct horse battery staple"


class Clock:
    def __init__(self, ms: int = 1_800_000_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def check(server: PeerAuthenticator, hello_proof: Any, **overrides: Any) -> Any:
    claim: dict[str, Any] = {
        "cluster": "c",
        "node_id": "n1",
        "address": "10.0.0.1:7400",
        "remote_host": "10.0.0.1",
        "server_node_id": "srv",
    }
    claim.update(overrides)
    return server.check_hello(
        claim["cluster"],
        claim["node_id"],
        claim["address"],
        hello_proof,
        remote_host=claim["remote_host"],
        server_node_id=claim["server_node_id"],
    )


def test_a_valid_proof_is_accepted_once_and_answered_with_a_proof_of_our_own() -> None:
    clock = Clock()
    client, server = PeerAuthenticator(SECRET, clock=clock), PeerAuthenticator(SECRET, clock=clock)
    proof = client.hello_proof("c", "n1", "10.0.0.1:7400")
    assert proof is not None and len(proof["nonce"]) == 16
    answer_proof = check(server, proof)
    hello = {"cluster": "c", "proof": proof}
    client.check_answer(hello, {"node_id": "srv", "proof": answer_proof})
    # The same HELLO again (a recording replayed): refused.
    with pytest.raises(HandshakeError, match="replays a nonce"):
        check(server, proof)
    assert server.replays == 1
    # A fresh proof passes.
    assert check(server, client.hello_proof("c", "n1", "10.0.0.1:7400")) is not None


@pytest.mark.parametrize(
    "overrides",
    [
        {"node_id": "n2"},  # the proof was made for another node id
        {"address": "10.6.6.6:7400"},  # ... another address
        {"cluster": "other"},  # ... another cluster
    ],
)
def test_a_proof_binds_the_claim(overrides: dict[str, Any]) -> None:
    client, server = PeerAuthenticator(SECRET), PeerAuthenticator(SECRET)
    proof = client.hello_proof("c", "n1", "10.0.0.1:7400")
    with pytest.raises(HandshakeError, match="wrong proof"):
        check(server, proof, **overrides)
    assert server.refused == 1


def test_wrong_secret_missing_or_malformed_proof_stale_clock() -> None:
    clock = Clock()
    server = PeerAuthenticator(SECRET, clock=clock)
    other = PeerAuthenticator("another secret, 16+ chars", clock=clock)
    with pytest.raises(HandshakeError, match="wrong proof"):
        check(server, other.hello_proof("c", "n1", "10.0.0.1:7400"))
    for bad in (None, {}, {"ts": 1, "nonce": b"x", "mac": b"y"}, "proof", {"ts": "1"}):
        with pytest.raises(HandshakeError, match="without a proof"):
            check(server, bad)
    me = PeerAuthenticator(SECRET, clock=clock)
    old = me.hello_proof("c", "n1", "10.0.0.1:7400")
    clock.ms += WINDOW_MS + 1
    with pytest.raises(HandshakeError, match="replayed, or a clock far off"):
        check(server, old)


def test_a_server_answer_without_the_secret_is_refused() -> None:
    client = PeerAuthenticator(SECRET)
    proof = client.hello_proof("c", "n1", "a:1")
    hello = {"cluster": "c", "proof": proof}
    impostor = PeerAuthenticator("not the cluster secret!!")
    fake = check(impostor, impostor.hello_proof("c", "n1", "a:1"), address="a:1")
    with pytest.raises(HandshakeError, match="wrong"):
        client.check_answer(hello, {"node_id": "srv", "proof": fake})
    with pytest.raises(HandshakeError, match="did not prove"):
        client.check_answer(hello, {"node_id": "srv"})
    # The answer binds the server's node id too.
    server = PeerAuthenticator(SECRET)
    good = check(server, proof, address="a:1")
    with pytest.raises(HandshakeError, match="wrong"):
        client.check_answer(hello, {"node_id": "someone-else", "proof": good})


def test_open_cluster_takes_peers_from_loopback_only() -> None:
    open_mode = PeerAuthenticator(None)
    assert not open_mode.enabled
    assert open_mode.hello_proof("c", "n1", "a:1") is None
    assert check(open_mode, None, remote_host="127.0.0.1") is None
    assert check(open_mode, None, remote_host="::1") is None
    assert check(open_mode, None, remote_host="inproc") is None
    with pytest.raises(HandshakeError, match="cluster_secret"):
        check(open_mode, None, remote_host="10.0.0.7")
    open_mode.check_answer({"cluster": "c"}, {"node_id": "x"})  # nothing to check
    assert [is_loopback_host(h) for h in ("127.0.0.2", "[::1]", "10.1.1.1", "name")] == [
        True,
        True,
        False,
        False,
    ]


def test_the_replay_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hypercache.net.auth.MAX_NONCES", 3)
    clock = Clock()
    server, client = PeerAuthenticator(SECRET, clock=clock), PeerAuthenticator(SECRET, clock=clock)
    for _ in range(3):
        check(server, client.hello_proof("c", "n1", "10.0.0.1:7400"))
    with pytest.raises(HandshakeError, match="too many peer handshakes"):
        check(server, client.hello_proof("c", "n1", "10.0.0.1:7400"))
    # Once the window has passed, old nonces are forgotten and room comes back.
    clock.ms += WINDOW_MS + 1
    assert check(server, client.hello_proof("c", "n1", "10.0.0.1:7400")) is not None
