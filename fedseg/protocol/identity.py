"""Long-term Ed25519 identity keys of nodes and coordinators, and their fingerprints."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["load_or_create_identity", "fingerprint", "write_private"]


def write_private(path: Path, data: bytes) -> None:
    """Writes a secret file atomically with mode 0600, so it is never readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_identity(path: Path) -> Ed25519PrivateKey:
    """Loads the raw 32-byte private key at ``path``, creating it on first use.

    A node keeps the same identity across restarts, so invites stay valid.
    """
    if path.exists():
        return Ed25519PrivateKey.from_private_bytes(path.read_bytes())
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    write_private(path, raw)
    return key


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, as ``sha256:<hex>``."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()
