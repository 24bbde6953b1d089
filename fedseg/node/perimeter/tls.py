"""The node's TLS certificates: one server certificate, pinned by its coordinator through
the invite, and client certificates the node issues, so that only holders of an invite
(and the node's own owner) complete a TLS handshake with it.

All certificates are self-signed: trust comes from the pin in the invite and from the
node's list of the client certificates it issued, never from a certificate authority.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedseg.protocol.files import write_private
from fedseg.protocol.tls_session import cert_fingerprint

__all__ = ["KeyPair", "issue", "load_or_issue", "trust_bundle"]

#: Long enough that a node never has to re-issue its invite for expiry; the pin, not the date, is what is checked.
VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM.

    Attributes:
        cert_pem: The certificate.
        key_pem: Its unencrypted PKCS#8 private key.
    """

    cert_pem: str
    key_pem: str

    @property
    def fingerprint(self) -> str:
        return cert_fingerprint(self.cert_pem)


def issue(common_name: str, server: bool) -> KeyPair:
    """A new self-signed P-256 certificate for a TLS server or a TLS client.

    Args:
        common_name: Subject name (informative only: peers check the pin, not the name).
        server: Server certificate if True, else a client certificate.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        # A CA flag lets OpenSSL take this self-signed client certificate as its own trust anchor.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode())


def load_or_issue(folder: Path, name: str, common_name: str, server: bool) -> KeyPair:
    """The key pair kept as ``folder/name.pem`` and ``folder/name.key``, issued on first use.

    The node keeps its server certificate across restarts, so the pin in its invite stays valid.
    """
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    if cert_path.exists() and key_path.exists():
        return KeyPair(cert_path.read_text(), key_path.read_text())
    pair = issue(common_name, server)
    write_private(key_path, pair.key_pem.encode())
    write_private(cert_path, pair.cert_pem.encode())
    return pair


def trust_bundle(path: Path, clients: list[KeyPair]) -> Path:
    """Writes the certificates of the clients the node accepts, as the TLS server's CA file."""
    write_private(path, "".join(c.cert_pem for c in clients).encode())
    return path
