"""A node's invite: everything one coordinator needs to reach it, and nothing more."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import TransportError
from .files import write_private

__all__ = ["Invite", "load_invite"]


@dataclass(frozen=True)
class Invite:
    """Credentials and address for one coordinator, pinned to the node's identity key and TLS certificate.

    Attributes:
        url: Base URL of the node's datasite (``https://<host>``).
        port: Its port.
        node: Node name.
        email: The coordinator account's login.
        password: Its random password.
        fingerprint: SHA-256 fingerprint of the node's Ed25519 identity key.
        tls_fingerprint: SHA-256 fingerprint of the node's TLS server certificate: the
            coordinator talks to no other server at this address.
        client_cert: The TLS client certificate (PEM) the node issued for this coordinator;
            the node completes a TLS handshake with no one else.
        client_key: Its private key (PEM).
        version: Invite format version.
    """

    url: str
    port: int
    node: str
    email: str
    password: str
    fingerprint: str
    tls_fingerprint: str
    client_cert: str
    client_key: str
    version: int = 2

    @property
    def host(self) -> str:
        return self.url.removeprefix("https://")

    def save(self, path: Path) -> None:
        """Writes the invite with mode 0600: it holds a password."""
        write_private(path, json.dumps(asdict(self), indent=2, sort_keys=True).encode())


def load_invite(path: Path) -> Invite:
    """Reads a node's invite.

    Raises:
        TransportError: Naming the file if it is missing, unreadable, malformed, or not for HTTPS.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TransportError(f"invite {path} cannot be read: {exc}") from None
    if isinstance(data, dict) and data.get("version") == 1:
        raise TransportError(f"invite {path} is a version-1 invite for plain HTTP; restart the node with this fedseg for a TLS invite")
    expected = {f.name for f in fields(Invite)}
    if not isinstance(data, dict) or set(data) != expected:
        raise TransportError(f"invite {path} is not a fedseg invite (expected keys {sorted(expected)})")
    if not str(data["url"]).startswith("https://"):
        raise TransportError(f"invite {path}: url {data['url']!r} is not https://; fedseg nodes serve HTTPS only")
    return Invite(**data)
