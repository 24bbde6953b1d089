"""Masks of secure aggregation: pairwise seeds from X25519 + HKDF, expanded with ChaCha20.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017 (https://eprint.iacr.org/2017/281). Node ``u`` sends
``y_u = x_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) - Σ_{v<u} PRG(s_uv)`` in Z_{2^32}: the pairwise
masks cancel in the sum, and the self-mask ``PRG(b_u)`` is removed once ``b_u`` is
recovered from the survivors' shares.

* ``s_uv = HKDF-SHA256(X25519(s_sk_u, s_pk_v), info = MASK_LABEL | run | round | min(u,v) | max(u,v))``:
  both ends derive the same seed, and it is bound to the run, the round and the pair,
  so no seed of another round or pair can be replayed into this one.
* ``PRG(seed)`` is the ChaCha20 keystream under the 32-byte seed (a cryptographic PRG,
  unlike a seeded Mersenne Twister), read as little-endian uint32. Every seed is used
  for exactly one mask, so the all-zero nonce never repeats under one key.
"""
from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..wire import canonical_json

__all__ = ["MASK_LABEL", "SEED_BYTES", "hkdf", "pairwise_seed", "expand", "add_mask", "pair_sign"]

MASK_LABEL = b"fedseg/v1/secagg/pairwise-mask"
SEED_BYTES = 32
_NONCE = bytes(16)  # ChaCha20's 4-byte counter + 12-byte nonce, all zero: one use per seed
_CHUNK = 1 << 22  # uint32 values per keystream chunk: bounds the zero buffer at 16 MiB


def hkdf(secret: bytes, label: bytes, context: object) -> bytes:
    """HKDF-SHA256 of ``secret`` into 32 bytes, with ``info = label | canonical JSON of context``."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label + canonical_json(context)).derive(secret)


def pairwise_seed(own: X25519PrivateKey, peer: X25519PublicKey, run_id: str, round_: int, a: str, b: str) -> bytes:
    """The mask seed nodes ``a`` and ``b`` share in this run and round (symmetric in a, b)."""
    lo, hi = sorted((a, b))
    return hkdf(own.exchange(peer), MASK_LABEL, [run_id, round_, lo, hi])


def pair_sign(own: str, peer: str) -> int:
    """+1 if ``own`` adds the pair's mask, -1 if it subtracts it (name order decides)."""
    return 1 if own < peer else -1


def expand(seed: bytes, n: int) -> np.ndarray:
    """``n`` uint32 values of the ChaCha20 keystream under ``seed``, shape ``(n,)``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    out = np.empty(n, dtype="<u4")
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    zeros = bytes(4 * min(n, _CHUNK))
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        encryptor.update_into(zeros[: 4 * (stop - start)], out[start:stop].view(np.uint8))
    return out.astype(np.uint32, copy=False)


def add_mask(acc: np.ndarray, seed: bytes, sign: int) -> None:
    """``acc += sign * PRG(seed)`` in place, modulo 2^32; ``acc`` is uint32 of shape ``(n,)``."""
    mask = expand(seed, acc.shape[0])
    if sign > 0:
        acc += mask
    else:
        acc -= mask
