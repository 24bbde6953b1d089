"""Per-round X25519 keys of secure aggregation, signed by each node's Ed25519 identity.

Every node makes two fresh X25519 key pairs per round, as in Bonawitz et al. (CCS 2017):
``c`` encrypts the Shamir shares a node sends its peers, ``s`` derives the pairwise mask
seeds. Keeping them apart means that recovering a dropped node's ``s`` key reveals
nothing about the shares it was sent.

An advertisement is ``{node, run_id, round, identity, c_pk, s_pk, sig}``, where ``sig``
is the identity key's Ed25519 signature of ``KEYS_LABEL | canonical JSON of the rest``.
So an advertisement cannot be moved to another node, run or round, and whoever relays it
cannot swap the keys without the node's identity key. The identity's fingerprint is
pinned in the invite.

Shares travel under AES-256-GCM with a key derived as
``HKDF-SHA256(X25519(c_sk_u, c_pk_v), info = CHANNEL_LABEL | run | round | u | v)``, which
is different for each direction, and with ``run | round | u | v`` as associated data. A
share that was altered, or replayed from another round or pair, fails the tag.
"""
from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import MessageError
from ..identity import fingerprint
from ..wire import canonical_json
from .masking import hkdf

__all__ = [
    "KEYS_LABEL",
    "CHANNEL_LABEL",
    "AuthenticationFailed",
    "RoundKeys",
    "raw",
    "b64",
    "unb64",
    "verify_advertisement",
    "seal",
    "open_sealed",
]

KEYS_LABEL = b"fedseg/v1/secagg/round-keys"
CHANNEL_LABEL = b"fedseg/v1/secagg/share-channel"
_AD_KEYS = frozenset({"node", "run_id", "round", "identity", "c_pk", "s_pk", "sig"})
_NONCE_BYTES = 12


class AuthenticationFailed(MessageError):
    """A signature, fingerprint, AEAD tag or commitment did not verify; names who and what.

    A message error: what failed is never applied.
    """


def raw(key: Any) -> bytes:
    """The raw 32 bytes of an X25519 or Ed25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str) -> bytes:
    """Decodes base64 from a message field, naming the field if it is not base64."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (AttributeError, ValueError) as exc:
        raise AuthenticationFailed(f"{what} is not base64: {exc}") from None


def _signed_body(ad: dict[str, Any]) -> bytes:
    return KEYS_LABEL + canonical_json({k: ad[k] for k in sorted(_AD_KEYS - {"sig"})})


@dataclass
class RoundKeys:
    """One node's key pairs for one round; the private halves never leave the node."""

    node: str
    run_id: str
    round: int
    c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)

    def advertisement(self, identity: Ed25519PrivateKey) -> dict[str, Any]:
        """The signed public half, as sent to the coordinator and on to every peer."""
        ad = {"node": self.node, "run_id": self.run_id, "round": self.round, "identity": b64(raw(identity.public_key())),
              "c_pk": b64(raw(self.c.public_key())), "s_pk": b64(raw(self.s.public_key()))}
        ad["sig"] = b64(identity.sign(_signed_body(ad)))
        return ad

    def s_private(self) -> bytes:
        return self.s.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def verify_advertisement(ad: Any, node: str, run_id: str, round_: int, pinned: str | None = None) -> tuple[X25519PublicKey, X25519PublicKey]:
    """Checks a peer's advertisement and returns its ``(c_pk, s_pk)``.

    Args:
        ad: The advertisement as received.
        node: Who it must come from.
        run_id: The run it must be for.
        round_: The round it must be for.
        pinned: The identity fingerprint it must be signed with (from the invite), if known.

    Raises:
        AuthenticationFailed: Naming the node and what did not match (fields, run, round,
            fingerprint or signature).
    """
    if not isinstance(ad, dict) or set(ad) != _AD_KEYS:
        raise AuthenticationFailed(f"round keys of node {node}: expected fields {sorted(_AD_KEYS)}")
    for key, expected in (("node", node), ("run_id", run_id), ("round", round_)):
        if ad[key] != expected:
            raise AuthenticationFailed(f"round keys of node {node} are for {key}={ad[key]!r}, expected {expected!r} (replayed?)")
    identity_raw = unb64(ad["identity"], f"identity key of node {node}")
    try:
        identity = Ed25519PublicKey.from_public_bytes(identity_raw)
        c_pk = X25519PublicKey.from_public_bytes(unb64(ad["c_pk"], f"c_pk of node {node}"))
        s_pk = X25519PublicKey.from_public_bytes(unb64(ad["s_pk"], f"s_pk of node {node}"))
    except ValueError as exc:
        raise AuthenticationFailed(f"round keys of node {node}: {exc}") from None
    if pinned is not None and fingerprint(identity) != pinned:
        raise AuthenticationFailed(f"round keys of node {node} are signed by {fingerprint(identity)}, not by its pinned key {pinned}")
    try:
        identity.verify(unb64(ad["sig"], f"signature of node {node}"), _signed_body(ad))
    except InvalidSignature:
        raise AuthenticationFailed(f"round keys of node {node}: bad signature (keys swapped or altered)") from None
    return c_pk, s_pk


def _channel(own: X25519PrivateKey, peer: X25519PublicKey, context: list[Any]) -> AESGCM:
    return AESGCM(hkdf(own.exchange(peer), CHANNEL_LABEL, context))


def seal(own: X25519PrivateKey, peer: X25519PublicKey, run_id: str, round_: int, sender: str, recipient: str, plaintext: bytes) -> bytes:
    """AES-GCM encryption of ``plaintext`` from ``sender`` to ``recipient``: ``nonce | ciphertext | tag``."""
    context = [run_id, round_, sender, recipient]
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + _channel(own, peer, context).encrypt(nonce, plaintext, canonical_json(context))


def open_sealed(own: X25519PrivateKey, peer: X25519PublicKey, run_id: str, round_: int, sender: str, recipient: str, sealed: bytes) -> bytes:
    """Inverse of :func:`seal`, run by the recipient.

    Raises:
        AuthenticationFailed: If the tag fails: altered in transit, or from another run,
            round or sender.
    """
    context = [run_id, round_, sender, recipient]
    try:
        return _channel(own, peer, context).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], canonical_json(context))
    except (InvalidTag, ValueError):
        raise AuthenticationFailed(f"shares from node {sender} to {recipient} for round {round_} fail authentication (tampered or replayed)") from None
