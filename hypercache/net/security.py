"""Client credentials and TLS: who a client connection is and what it may do, and the
TLS contexts of servers and clients.

Tokens
------
A node started with ``tokens`` (a file) takes client connections only with a bearer
token from that file, sent in the HELLO's ``auth`` field (and on the management
HTTP as ``Authorization: Bearer SECRET``). Each line of the file is::

    NAME SCOPE[,SCOPE...] sha256:HEX

``NAME`` names the credential in logs and counters, ``HEX`` is the SHA-256 of the
secret (:func:`hash_secret`; ``hypercache token NAME SCOPES`` prints a new secret
and its line). Blank lines and lines starting with ``#`` are skipped. The secret
itself is never stored: a node hashes what a client sends and compares the hash
with *every* entry in constant time (:func:`hmac.compare_digest`, no early exit),
so neither the answer nor its timing tells which entry came close. Secrets must be
random (``secrets.token_urlsafe(32)``): a fast hash of a guessable password would
not stand a dictionary attack on a stolen file.

Scopes: ``read`` (GET, TTL, SCAN, TOPOLOGY, R_GET, PING), ``write`` (SET, DELETE,
EXPIRE), ``admin`` (FLUSH, the management endpoints that change or reveal internals;
it grants ``read`` and ``write`` too). :data:`OP_SCOPES` is the table; an op
missing from it is for cluster peers only.

TLS
---
:func:`server_context` and :func:`client_context` build :class:`ssl.SSLContext` s
from PEM files (TLS 1.2 at least). With ``client_auth="required"`` a server asks
every connection for a certificate signed by ``ca`` (mTLS); ``"optional"`` checks
one when given. A node dials its peers with a client context that presents its own
certificate, so under mTLS a peer is also known by its certificate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from hypercache.errors import ConfigError, HandshakeError
from hypercache.net.protocol import Op

__all__ = [
    "ADMIN",
    "OP_SCOPES",
    "READ",
    "SCOPES",
    "WRITE",
    "ClientAuth",
    "SecuritySettings",
    "SslArg",
    "Token",
    "TokenSet",
    "client_context",
    "hash_secret",
    "new_token",
    "permits",
    "resolve_client_ssl",
    "server_context",
]

READ: Final = "read"
WRITE: Final = "write"
ADMIN: Final = "admin"
#: Every scope a token may carry.
SCOPES: Final = frozenset({READ, WRITE, ADMIN})

#: The scope each client op needs. Ops not listed are for cluster peers only.
OP_SCOPES: Final[dict[int, str]] = {
    int(Op.PING): READ,
    int(Op.GET): READ,
    int(Op.TTL): READ,
    int(Op.SCAN): READ,
    int(Op.TOPOLOGY): READ,
    int(Op.R_GET): READ,
    int(Op.WATCH): READ,
    int(Op.SET): WRITE,
    int(Op.W_PUT): WRITE,
    int(Op.W_HINT): WRITE,
    int(Op.ADD): WRITE,
    int(Op.DELETE): WRITE,
    int(Op.EXPIRE): WRITE,
    int(Op.FLUSH): ADMIN,
    int(Op.LEAVE): ADMIN,
    int(Op.REMOVE): ADMIN,
}

_HASH_PREFIX: Final = "sha256:"


def hash_secret(secret: str) -> str:
    """The form a tokens file stores a secret in: ``sha256:`` and 64 hex digits."""
    return _HASH_PREFIX + hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_token(name: str, scopes: Iterable[str]) -> tuple[str, str]:
    """A fresh random secret and the tokens-file line that admits it.

    :raises ConfigError: a bad name or an unknown scope.
    """
    wanted = _parse_scopes("scopes", ",".join(scopes))
    _check_name("name", name)
    secret = secrets.token_urlsafe(32)
    return secret, f"{name} {','.join(sorted(wanted))} {hash_secret(secret)}"


def permits(scopes: frozenset[str], scope: str) -> bool:
    """Whether a token of ``scopes`` may do what needs ``scope`` (admin grants all)."""
    return scope in scopes or ADMIN in scopes


def _check_name(field: str, name: str) -> None:
    if not name or not name.isprintable() or any(c.isspace() for c in name):
        raise ConfigError(field, f"a token name is printable text without blanks, got {name!r}")


def _parse_scopes(field: str, text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(scopes - SCOPES)
    if unknown or not scopes:
        raise ConfigError(
            field, f"scopes are {', '.join(sorted(SCOPES))} (comma-separated), got {text!r}"
        )
    return scopes


@dataclass(frozen=True, slots=True)
class Token:
    """One credential: its name and scopes (the secret's hash stays in the set)."""

    name: str
    scopes: frozenset[str]


class TokenSet:
    """The bearer tokens a node accepts (see the module).

    :param entries: ``(name, scopes, digest)`` with ``digest`` the 32 raw bytes of
        the secret's SHA-256.
    :ivar refused: credentials refused (missing, unknown) since the set was made.
    """

    def __init__(self, entries: Iterable[tuple[str, frozenset[str], bytes]]) -> None:
        self._entries = [(Token(name, scopes), digest) for name, scopes, digest in entries]
        if not self._entries:
            raise ConfigError("tokens", "the tokens file admits nobody (no token line)")
        self.refused = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> list[str]:
        return [token.name for token, _ in self._entries]

    @classmethod
    def parse(cls, text: str, *, source: str = "tokens") -> TokenSet:
        """A set from the text of a tokens file.

        :raises ConfigError: a malformed line (field ``tokens``, with its number).
        """
        entries = []
        seen: set[str] = set()
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{source} line {number}"
            parts = line.split()
            if len(parts) != 3:
                raise ConfigError(
                    "tokens", f"{where}: expected 'NAME SCOPE[,SCOPE] sha256:HEX', got {line!r}"
                )
            name, scope_text, digest_text = parts
            _check_name("tokens", name)
            if name in seen:
                raise ConfigError("tokens", f"{where}: token name {name!r} is used twice")
            seen.add(name)
            try:
                scopes = _parse_scopes("tokens", scope_text)
            except ConfigError as exc:
                raise ConfigError("tokens", f"{where}: {exc.message}") from None
            hexdigest = digest_text.removeprefix(_HASH_PREFIX)
            try:
                digest = bytes.fromhex(hexdigest)
            except ValueError:
                digest = b""
            if not digest_text.startswith(_HASH_PREFIX) or len(digest) != 32:
                raise ConfigError(
                    "tokens",
                    f"{where}: the secret is stored as sha256: and 64 hex digits "
                    "(hypercache token NAME SCOPES makes one), never in clear",
                )
            entries.append((name, scopes, digest))
        return cls(entries)

    @classmethod
    def load(cls, path: str) -> TokenSet:
        """Read a tokens file.

        :raises ConfigError: the file cannot be read or is malformed (field ``tokens``).
        """
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("tokens", f"cannot read {path!r}: {exc}") from None
        return cls.parse(text, source=os.path.basename(path))

    def replace(self, other: TokenSet) -> None:
        """Take the entries of ``other`` (a reload); the counters go on."""
        self._entries = other._entries

    def check(self, secret: object) -> Token:
        """The token whose secret is ``secret``.

        Every entry is compared, in constant time, whatever matched before.

        :raises HandshakeError: no secret, or none that this set admits.
        """
        if type(secret) is not str or not secret:
            self.refused += 1
            raise HandshakeError("authentication failed: this node requires a token")
        digest = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
        found: Token | None = None
        for token, expected in self._entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = token
        if found is None:
            self.refused += 1
            raise HandshakeError("authentication failed: bad token")
        return found


# ---------------------------------------------------------------------------- TLS

_CLIENT_AUTH_NAMES: Final = ("none", "optional", "required")


def _path(field: str, value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is not str:
        raise ConfigError(field, f"expected a file path, got {type(value).__name__}")
    return value.strip() or None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SecuritySettings:
    """TLS and client tokens, a section of
    :class:`~hypercache.cluster.config.DistConfig` (fields as there); validated (paths
    normalised, ``""`` = unset) on construction; the files are read by
    :class:`~hypercache.cluster.security.NodeSecurity`.

    :ivar tokens: the tokens file (``NAME SCOPES sha256:HEX`` per line); clients
        then need a token, and the management HTTP a bearer token.
    :ivar tls_cert: PEM certificate (chain) of the node: TLS on the data port and
        the management HTTP, and what the node presents to its peers.
    :ivar tls_key: its private key (when not in ``tls_cert``).
    :ivar tls_ca: CA certificates that peers' and clients' certificates chain to.
    :ivar tls_client_auth: ``none``, ``optional`` or ``required`` (mTLS).
    """

    tokens: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_client_auth: str = "none"

    def __post_init__(self) -> None:
        put = object.__setattr__
        for name in ("tokens", "tls_cert", "tls_key", "tls_ca"):
            put(self, name, _path(name, getattr(self, name)))
        mode = self.tls_client_auth
        if type(mode) is not str or mode.strip().lower() not in _CLIENT_AUTH_NAMES:
            raise ConfigError(
                "tls_client_auth", f"expected none, optional or required, got {mode!r}"
            )
        put(self, "tls_client_auth", mode.strip().lower())
        if self.tls_cert is None:
            for name in ("tls_key", "tls_ca"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, "needs tls_cert (the node's own certificate)")
            if self.tls_client_auth != "none":
                raise ConfigError("tls_client_auth", "needs tls_cert and tls_ca")
        elif self.tls_client_auth != "none" and self.tls_ca is None:
            raise ConfigError(
                "tls_client_auth", f"{self.tls_client_auth} needs tls_ca to check certificates"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


ClientAuth = Literal["none", "optional", "required"]
_CLIENT_AUTH: Final[dict[str, ssl.VerifyMode]] = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str | None, field: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(field, f"cannot load certificate {cert!r} / key {key!r}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str, field: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(field, f"cannot load CA certificates {ca!r}: {exc}") from None


def server_context(
    cert: str, key: str | None, *, ca: str | None = None, client_auth: str = "none"
) -> ssl.SSLContext:
    """The TLS context of a server presenting ``cert`` (with ``key``).

    :param ca: CA certificates that client certificates must chain to (mTLS).
    :param client_auth: ``none``, ``optional`` or ``required`` (needs ``ca``).
    :raises ConfigError: a file cannot be loaded, or mTLS without a CA.
    """
    mode = _CLIENT_AUTH.get(client_auth)
    if mode is None:
        raise ConfigError(
            "tls_client_auth", f"expected none, optional or required, got {client_auth!r}"
        )
    if mode != ssl.CERT_NONE and ca is None:
        raise ConfigError("tls_client_auth", f"{client_auth} needs tls_ca to check certificates")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key, "tls_cert")
    if ca is not None:
        _load_ca(ctx, ca, "tls_ca")
    ctx.verify_mode = mode
    return ctx


def client_context(
    ca: str | None = None,
    *,
    cert: str | None = None,
    key: str | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """The TLS context of a client: servers checked against ``ca`` alone (the
    system's CAs when None), presenting ``cert``/``key`` when given (mTLS).

    :raises ConfigError: a file cannot be loaded.
    """
    if ca is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        # A private CA replaces the system's: a certificate some public CA signed
        # for the same name must not pass for a node.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _load_ca(ctx, ca, "ssl")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if cert is not None:
        _load_chain(ctx, cert, key, "ssl")
    return ctx


#: What clients take as ``ssl=``: a context, ``True`` (the system's CAs), a CA file
#: path, or a dict of :func:`client_context`'s arguments (``ca``, ``cert``, ``key``,
#: ``check_hostname``).
SslArg = ssl.SSLContext | bool | str | Mapping[str, object] | None


def resolve_client_ssl(value: SslArg) -> ssl.SSLContext | None:
    """A client's ``ssl=`` argument as a context (None: plaintext).

    :raises ConfigError: a value of another type, or files that cannot be loaded.
    """
    if value is None or value is False:
        return None
    if isinstance(value, ssl.SSLContext):
        return value
    if value is True:
        return client_context()
    if isinstance(value, str):
        return client_context(value)
    if isinstance(value, Mapping):
        unknown = set(value) - {"ca", "cert", "key", "check_hostname"}
        if unknown:
            raise ConfigError(
                "ssl", f"unknown keys {sorted(unknown)}: ca, cert, key, check_hostname"
            )
        ca, cert, key = value.get("ca"), value.get("cert"), value.get("key")
        for name, item in (("ca", ca), ("cert", cert), ("key", key)):
            if item is not None and not isinstance(item, str):
                raise ConfigError("ssl", f"{name} must be a path, got {type(item).__name__}")
        check = value.get("check_hostname", True)
        if type(check) is not bool:
            raise ConfigError("ssl", "check_hostname must be true or false")
        return client_context(
            ca if isinstance(ca, str) else None,
            cert=cert if isinstance(cert, str) else None,
            key=key if isinstance(key, str) else None,
            check_hostname=check,
        )
    raise ConfigError(
        "ssl", f"expected an ssl.SSLContext, True, a CA path or a dict, got {type(value).__name__}"
    )
