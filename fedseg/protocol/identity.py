"""Long-term Ed25519 identity keys of nodes and coordinators, and their fingerprints."""
from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from .files import write_private
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["load_or_create_identity", "fingerprint"]


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
