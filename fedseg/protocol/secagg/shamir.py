"""Shamir's t-of-n secret sharing of 32-byte secrets over GF(2^521 - 1).

Shamir, "How to share a secret", CACM 1979: a secret ``s`` is the constant term of a
random polynomial ``f`` of degree ``t - 1``; share ``i`` is ``(i, f(i))``. Any ``t``
shares give ``s = Σ_j y_j Π_{m≠j} x_m / (x_m - x_j)`` (Lagrange at 0); fewer than ``t``
are uniformly distributed and say nothing about ``s``.

The field is the Mersenne prime ``p = 2^521 - 1``, so every 32-byte secret is a field
element as it is, with no splitting. Coefficients come from :mod:`secrets`. A share is
encoded as ``x`` (2 bytes, big-endian) followed by ``y`` (66 bytes, big-endian).
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence

from ..errors import ProtocolError

__all__ = ["PRIME", "SECRET_BYTES", "SHARE_BYTES", "ShareError", "split", "combine", "share_index"]

PRIME = 2**521 - 1
_Y_BYTES = 66
SHARE_BYTES = 2 + _Y_BYTES
SECRET_BYTES = 32


class ShareError(ProtocolError):
    """A share is malformed, duplicated, or too few shares were given."""


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Shares ``secret`` so that any ``threshold`` of the shares recover it.

    Args:
        secret: 32 bytes.
        threshold: ``t``, with ``1 <= t <= len(xs)``.
        xs: Distinct non-zero share indices in ``[1, 65535]``, one per holder.

    Returns:
        Index to encoded share.

    Raises:
        ShareError: On a bad secret length, threshold or index set.
    """
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(xs)) != len(xs) or not all(0 < x < 2**16 for x in xs):
        raise ShareError(f"share indices must be distinct integers in [1, 65535], got {list(xs)}")
    if not 1 <= threshold <= len(xs):
        raise ShareError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = x.to_bytes(2, "big") + y.to_bytes(_Y_BYTES, "big")
    return shares


def _parse(share: bytes) -> tuple[int, int]:
    if len(share) != SHARE_BYTES:
        raise ShareError(f"a share is {SHARE_BYTES} bytes, got {len(share)}")
    x, y = int.from_bytes(share[:2], "big"), int.from_bytes(share[2:], "big")
    if x == 0 or y >= PRIME:
        raise ShareError("share is not a point of the field (x = 0 or y >= p)")
    return x, y


def share_index(share: bytes) -> int:
    """The ``x`` a share was issued for."""
    return _parse(share)[0]


def combine(shares: Sequence[bytes], threshold: int) -> bytes:
    """Recovers the secret from the first ``threshold`` shares (Lagrange at 0).

    Wrong shares give a wrong secret, not an error: callers check the result against a
    commitment (a hash or a public key) to detect tampering.

    Raises:
        ShareError: On fewer than ``threshold`` shares, duplicate indices, or a secret that
            does not fit 32 bytes (which only wrong shares produce).
    """
    if len(shares) < threshold:
        raise ShareError(f"need {threshold} shares to recover the secret, got {len(shares)}")
    points = [_parse(s) for s in shares[:threshold]]
    if len({x for x, _ in points}) != len(points):
        raise ShareError("two shares have the same index")
    secret = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ShareError("the shares do not recover a 32-byte secret (a share is wrong)")
    return secret.to_bytes(SECRET_BYTES, "big")
