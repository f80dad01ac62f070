"""A throw-away certificate authority for development and tests: ``make run-tls``
and the TLS tests make one in a temporary directory.

Needs the ``cryptography`` package (a dev dependency, not one of the node's): for
production, use certificates of your own PKI. Every key is an ECDSA P-256 key; the
files are PEM, keys unencrypted and written with mode 0600.

::

    python -m hypercache.cli.devca DIR     # DIR/ca.pem, node.pem, node.key, client.pem, ...
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevCA", "Issued", "make_dev_pki"]


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its key, as files."""

    cert: str
    key: str


def _write(path: Path, data: bytes, *, private: bool = False) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return str(path)


class DevCA:
    """A self-signed CA in ``directory`` (``<name>.pem``), issuing leaf certificates.

    :param name: the CA's common name and file stem.
    """

    def __init__(self, directory: str | os.PathLike[str], name: str = "ca") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hypercache dev {name}")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        #: the CA certificate's file
        self.cert = _write(
            self.directory / f"{name}.pem", self._cert.public_bytes(serialization.Encoding.PEM)
        )

    def issue(
        self,
        name: str,
        *,
        hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
        days: float = 30,
        expired: bool = False,
    ) -> Issued:
        """A leaf certificate ``<name>.pem`` with key ``<name>.key``, for ``hosts``
        (IP addresses and DNS names, as subject alternative names), usable by servers
        and clients; ``expired`` makes one whose validity ended yesterday."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        if expired:
            start, end = now - datetime.timedelta(days=2), now - datetime.timedelta(days=1)
        else:
            start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
        names: list[Any] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        ser = serialization
        key_pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
        return Issued(
            cert=_write(self.directory / f"{name}.pem", cert.public_bytes(ser.Encoding.PEM)),
            key=_write(self.directory / f"{name}.key", key_pem, private=True),
        )


def make_dev_pki(directory: str | os.PathLike[str]) -> dict[str, str]:
    """A CA, a node certificate and a client certificate in ``directory``: the paths
    by role (``ca``, ``node_cert``, ``node_key``, ``client_cert``, ``client_key``)."""
    ca = DevCA(directory)
    node = ca.issue("node")
    client = ca.issue("client")
    return {
        "ca": ca.cert,
        "node_cert": node.cert,
        "node_key": node.key,
        "client_cert": client.cert,
        "client_key": client.key,
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m hypercache.cli.devca DIR", file=sys.stderr)
        raise SystemExit(2)
    for role, path in make_dev_pki(sys.argv[1]).items():
        print(f"{role}={path}")
