"""Peer authentication: how a connection proves that it is a node of the cluster.

A node's HELLO names it (``node_id``, ``address``). A server believes that name, and
lets the connection send the operations reserved to cluster peers (replica writes,
hints, gossip, anti-entropy) and announce members, only when the HELLO carries a
*proof*: an HMAC-SHA256, keyed with the cluster secret, over the cluster name, the
node id, its address, the sender's wall clock and a fresh random nonce::

    proof = {"ts": ms, "nonce": 16 random bytes, "mac": HMAC(secret, HELLO-context)}

The server refuses a proof whose ``ts`` is more than :data:`WINDOW_MS` away from its
own clock, or whose nonce it has already accepted within that window (a recorded
HELLO replayed later, or twice, is refused). It answers with a proof of its own over
the client's nonce and its node id, so the dialing node knows it reached a peer and
not an impostor listening at the address::

    answer proof = {"mac": HMAC(secret, ANSWER-context)}

Without a cluster secret the cluster runs *open*: a HELLO naming a node id is taken
only from a loopback address (or the in-process transport), so a cluster on one
machine needs no setting and a cluster across machines cannot run unprotected by
mistake (set ``cluster_secret`` on every node). In open mode a process on the same
machine can pose as a peer; ``docs/protocol.md`` says what that leaves open.

The secret never travels. What this does not give is confidentiality or integrity
of the frames after the handshake: that is TLS's work.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from hypercache._core.hlc import wall_clock_ms
from hypercache.errors import HandshakeError

__all__ = ["NONCE_SIZE", "WINDOW_MS", "PeerAuthenticator", "is_loopback_host"]

#: How far a HELLO proof's clock may be from the server's, either way, in ms.
WINDOW_MS: Final = 60_000
#: Bytes of a HELLO nonce.
NONCE_SIZE: Final = 16
#: Nonces remembered at most; past it, peer handshakes are refused (and counted)
#: until old ones leave the window. 65,536 handshakes a minute is far beyond any
#: cluster's reconnects.
MAX_NONCES: Final = 65_536

_HELLO_CONTEXT: Final = b"hypercache peer hello v1\0"
_ANSWER_CONTEXT: Final = b"hypercache peer answer v1\0"
_pack_ts: Final = struct.Struct(">Q").pack


def is_loopback_host(host: str) -> bool:
    """Whether a remote host is this machine: a loopback IP, or the in-process
    transport (whose peers are ``"inproc"``)."""
    if host == "inproc":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _field(text: str | None) -> bytes:
    return (text or "").encode("utf-8") + b"\0"


class PeerAuthenticator:
    """Makes and checks the proofs of peer HELLOs for one node.

    :param secret: the cluster secret; ``None`` runs the cluster open (see the module).
    :param clock: wall-clock ms, injectable for tests.

    :ivar refused: peer HELLOs refused (bad or missing proof, stale, replayed, open
        mode from a remote host).
    :ivar replays: proofs refused because their nonce was already used.
    """

    def __init__(self, secret: str | None, *, clock: Callable[[], int] = wall_clock_ms) -> None:
        self._key = None if secret is None else secret.encode("utf-8")
        self._clock = clock
        # nonce -> ms after which it is outside the window (insertion order = age)
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self.refused = 0
        self.replays = 0

    @property
    def enabled(self) -> bool:
        """Whether peers must prove the secret (else: open, loopback peers only)."""
        return self._key is not None

    # ---------------------------------------------------------------- dialing side

    def hello_proof(self, cluster: str, node_id: str, address: str | None) -> dict[str, Any] | None:
        """The ``proof`` of a HELLO this node sends, or None in open mode."""
        key = self._key
        if key is None:
            return None
        ts = self._clock()
        nonce = os.urandom(NONCE_SIZE)
        return {
            "ts": ts,
            "nonce": nonce,
            "mac": self._hello_mac(key, cluster, node_id, address, ts, nonce),
        }

    def check_answer(self, hello: dict[str, Any], answer: dict[str, Any]) -> None:
        """Check the server's answer to a HELLO of ours: that it proves the secret over
        our nonce and the node id it answers as (open mode: nothing to check).

        :raises HandshakeError: the answer carries no proof, or a wrong one.
        """
        key = self._key
        if key is None:
            return
        sent = hello.get("proof")
        proof = answer.get("proof")
        if type(sent) is not dict or type(proof) is not dict or type(proof.get("mac")) is not bytes:
            self.refused += 1
            raise HandshakeError(
                "the server did not prove the cluster secret: not a peer of this cluster"
            )
        mac = self._answer_mac(key, str(hello["cluster"]), answer.get("node_id"), sent["nonce"])
        if not hmac.compare_digest(mac, proof["mac"]):
            self.refused += 1
            raise HandshakeError("the server's proof of the cluster secret is wrong")

    # ---------------------------------------------------------------- serving side

    def check_hello(
        self,
        cluster: str,
        node_id: str,
        address: str | None,
        proof: Any,
        *,
        remote_host: str,
        server_node_id: str | None,
    ) -> dict[str, Any] | None:
        """Check the claim of a HELLO that names ``node_id``; return the answer's proof
        (None in open mode).

        :raises HandshakeError: no valid, fresh, unused proof (with a secret), or a
            remote host that is not loopback (open mode).
        """
        key = self._key
        if key is None:
            if not is_loopback_host(remote_host):
                self.refused += 1
                raise HandshakeError(
                    f"{remote_host} claims to be node {node_id!r}, but this node has no "
                    "cluster_secret: peers are trusted from loopback only (set the same "
                    "cluster_secret on every node)"
                )
            return None
        if (
            type(proof) is not dict
            or type(proof.get("ts")) is not int
            or type(proof.get("nonce")) is not bytes
            or len(proof["nonce"]) != NONCE_SIZE
            or type(proof.get("mac")) is not bytes
        ):
            self.refused += 1
            raise HandshakeError(
                f"HELLO claims node {node_id!r} without a proof of the cluster secret"
            )
        ts, nonce = proof["ts"], proof["nonce"]
        expected = self._hello_mac(key, cluster, node_id, address, ts, nonce)
        if not hmac.compare_digest(expected, proof["mac"]):
            self.refused += 1
            raise HandshakeError(f"HELLO of node {node_id!r}: wrong proof of the cluster secret")
        now = self._clock()
        if abs(now - ts) > WINDOW_MS:
            self.refused += 1
            raise HandshakeError(
                f"HELLO of node {node_id!r} is {abs(now - ts) / 1000:.0f} s from this node's "
                f"clock (at most {WINDOW_MS // 1000} s): replayed, or a clock far off"
            )
        self._forget(now)
        if nonce in self._seen:
            self.refused += 1
            self.replays += 1
            raise HandshakeError(f"HELLO of node {node_id!r} replays a nonce already used")
        if len(self._seen) >= MAX_NONCES:
            self.refused += 1
            raise HandshakeError("too many peer handshakes in the last minute; try again later")
        self._seen[nonce] = ts + WINDOW_MS
        return {"mac": self._answer_mac(key, cluster, server_node_id, nonce)}

    def _forget(self, now: int) -> None:
        seen = self._seen
        # Insertion order is close to ts order; an entry out of order stays a little
        # longer, which only makes the replay check stricter.
        while seen:
            nonce, until = next(iter(seen.items()))
            if until >= now:
                break
            del seen[nonce]

    # ---------------------------------------------------------------- the MACs

    @staticmethod
    def _hello_mac(
        key: bytes, cluster: str, node_id: str, address: str | None, ts: int, nonce: bytes
    ) -> bytes:
        msg = _HELLO_CONTEXT + _field(cluster) + _field(node_id) + _field(address)
        return hmac.new(
            key, msg + _pack_ts(ts & 0xFFFFFFFFFFFFFFFF) + nonce, hashlib.sha256
        ).digest()

    @staticmethod
    def _answer_mac(key: bytes, cluster: str, node_id: str | None, nonce: Any) -> bytes:
        if type(nonce) is not bytes:
            nonce = b""
        msg = _ANSWER_CONTEXT + _field(cluster) + _field(node_id) + nonce
        return hmac.new(key, msg, hashlib.sha256).digest()
