"""A node's security settings and their state: TLS contexts, client tokens and the
checks made with them (see ``docs/security.md`` for the threat model).

:class:`SecuritySettings` is the section of :class:`~hypercache.cluster.config.DistConfig`
that holds them; :class:`NodeSecurity` is what a running node makes of it: the TLS
contexts of its servers and of its dials to peers, the :class:`~hypercache.net.security.TokenSet`
of its clients, the scope check of every client op and every management endpoint,
the reload of all of it on ``SIGHUP``, and the counters of what it refused.

Without any of these settings a node behaves as before they existed: plaintext, no
client token (or the one shared ``auth_token``), peers proving ``cluster_secret``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from typing import Any, Final, TypeVar

from prometheus_client.core import Metric

from hypercache.cluster.metrics import counter, gauge
from hypercache.errors import ConfigError, HandshakeError, PermissionDeniedError
from hypercache.net.protocol import Op
from hypercache.net.security import (
    ADMIN,
    OP_SCOPES,
    READ,
    SecuritySettings,
    TokenSet,
    client_context,
    permits,
    server_context,
)
from hypercache.net.tcp import TcpTransport
from hypercache.net.transport import PeerInfo

__all__ = ["HTTP_SCOPES", "NodeSecurity", "SecuritySettings"]

_log = logging.getLogger("hypercache.security")
_H = TypeVar("_H")

#: The scope each management endpoint needs (``(method, path)``); one not listed
#: needs ``admin``.
HTTP_SCOPES: Final[dict[tuple[str, str], str]] = {
    ("GET", "/health"): READ,
    ("GET", "/stats"): READ,
    ("GET", "/metrics"): READ,
    ("GET", "/dist/metrics"): READ,
    ("GET", "/dist/owners"): READ,
    ("GET", "/cluster/members"): READ,
    ("GET", "/cluster/ring"): READ,
    ("GET", "/dist/antientropy"): READ,
    ("GET", "/dist/hints"): READ,
    ("GET", "/dist/rebalance"): READ,
    # /config, /internal/merkle, /internal/keys, POST /cluster/remove: admin
}


class NodeSecurity:
    """The TLS contexts, tokens and scope checks of one node.

    :raises ConfigError: a file cannot be read (field ``tokens``, ``tls_cert``,
        ``tls_ca``).

    :ivar scope_refused: client ops refused for want of a scope.
    :ivar http_refused: management requests refused (no, bad or weak token).
    :ivar reloads: successful reloads (``SIGHUP``); ``reload_failures`` the others.
    """

    def __init__(self, settings: SecuritySettings) -> None:
        self.settings = settings
        self.tokens: TokenSet | None = None
        self.server_ssl: ssl.SSLContext | None = None
        self.peer_ssl: ssl.SSLContext | None = None
        if settings.tokens is not None:
            self.tokens = TokenSet.load(settings.tokens)
        if settings.tls_cert is not None:
            self.server_ssl = server_context(
                settings.tls_cert,
                settings.tls_key,
                ca=settings.tls_ca,
                client_auth=settings.tls_client_auth,
            )
            # Peers are dialed by address (often an IP), so their certificate is
            # checked against the CA, not against a host name; who the peer is, is
            # then proved by the HMAC handshake (cluster_secret).
            self.peer_ssl = client_context(
                settings.tls_ca,
                cert=settings.tls_cert,
                key=settings.tls_key,
                check_hostname=False,
            )
        self.scope_refused = 0
        self.http_refused = 0
        self.reloads = 0
        self.reload_failures = 0

    @property
    def tls(self) -> bool:
        return self.server_ssl is not None

    def transport(self) -> TcpTransport | None:
        """The TCP transport that dials peers over TLS (None: plaintext TCP)."""
        return None if self.peer_ssl is None else TcpTransport(ssl=self.peer_ssl)

    def restrict(self, client_ops: dict[int, _H]) -> dict[int, _H]:
        """The client op table when the node checks tokens: only the ops that
        :data:`OP_SCOPES` gives a scope (fail closed: an op added without one is not
        open to token clients). That leaves ``R_PUT`` out: a client could otherwise
        write a version of its choosing (its read-repair pushes are then refused, and
        anti-entropy repairs the stale owner)."""
        if self.tokens is not None:
            for op in [op for op in client_ops if op not in OP_SCOPES]:
                del client_ops[op]
        return client_ops

    def http_options(self) -> dict[str, Any]:
        """The TLS context and request check of the management HTTP (``start_http``)."""
        return {
            "ssl": self.server_ssl,
            "guard": None if self.tokens is None else self.check_http,
        }

    # ------------------------------------------------------------------ checks

    def check_op(self, conn_info: PeerInfo, op: int) -> None:
        """Refuse a client op its token's scopes do not cover (nothing for peers, or
        without tokens; ops not in :data:`OP_SCOPES` are the peer-op check's).

        :raises PermissionDeniedError: the token lacks the scope.
        """
        scopes = conn_info.scopes
        if scopes is None:
            return
        need = OP_SCOPES.get(op)
        if need is not None and not permits(scopes, need):
            self.scope_refused += 1
            name = Op(op).name
            raise PermissionDeniedError(
                f"op {name} needs scope {need!r}; token {conn_info.principal!r} has "
                f"{', '.join(sorted(scopes))}"
            )

    def check_http(self, method: str, path: str, authorization: str | None) -> str | None:
        """Why a management request is refused (None: allowed).

        ``authorization`` is the ``Authorization`` header: ``Bearer SECRET``.
        """
        tokens = self.tokens
        if tokens is None:
            return None
        need = HTTP_SCOPES.get(("GET" if method == "HEAD" else method, path), ADMIN)
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            self.http_refused += 1
            return "401"
        try:
            token = tokens.check(secret.strip())
        except HandshakeError:
            self.http_refused += 1
            return "401"
        if not permits(token.scopes, need):
            self.http_refused += 1
            return f"403:{need}"
        return None

    # ------------------------------------------------------------------ reload

    def reload(self) -> None:
        """Read the certificate, key, CA and tokens files again (``SIGHUP``): new
        connections get them; open ones keep what they negotiated. A file that
        fails leaves everything as it was (logged and counted)."""
        settings = self.settings
        try:
            tokens = None if settings.tokens is None else TokenSet.load(settings.tokens)
            if self.server_ssl is not None and settings.tls_cert is not None:
                # Load into fresh contexts first: a bad file must not half-apply.
                server_context(
                    settings.tls_cert,
                    settings.tls_key,
                    ca=settings.tls_ca,
                    client_auth=settings.tls_client_auth,
                )
                for ctx in (self.server_ssl, self.peer_ssl):
                    if ctx is not None:
                        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
                        if settings.tls_ca is not None:
                            ctx.load_verify_locations(cafile=settings.tls_ca)
        except (ConfigError, OSError, ssl.SSLError) as exc:
            self.reload_failures += 1
            _log.error("reload of TLS files and tokens failed, keeping the old ones: %s", exc)
            return
        if tokens is not None and self.tokens is not None:
            self.tokens.replace(tokens)
        self.reloads += 1
        _log.info("reloaded TLS files and tokens")

    # ----------------------------------------------------------------- metrics

    def collect(self) -> Iterator[Metric]:
        tokens = self.tokens
        yield gauge(
            "hypercache_tls_enabled",
            "Whether the node serves TLS on its data port and HTTP (1) or plaintext (0).",
            int(self.tls),
        )
        yield gauge(
            "hypercache_tokens_loaded",
            "Client tokens the node accepts (0: no tokens file).",
            0 if tokens is None else len(tokens),
        )
        yield counter(
            "hypercache_token_refused",
            "Client credentials refused (data-port HELLOs, HTTP bearer tokens): not in "
            "the tokens file, or none on the data port.",
            0 if tokens is None else tokens.refused,
        )
        yield counter(
            "hypercache_scope_refused",
            "Client operations refused: the token lacks the scope.",
            self.scope_refused,
        )
        yield counter(
            "hypercache_http_auth_refused",
            "Management HTTP requests refused: no, bad or too weak a bearer token.",
            self.http_refused,
        )
        yield counter(
            "hypercache_security_reloads",
            "Reloads of the TLS files and tokens (SIGHUP) that took effect.",
            self.reloads,
        )
        yield counter(
            "hypercache_security_reload_failures",
            "Reloads of the TLS files and tokens that failed (the old ones kept).",
            self.reload_failures,
        )
