"""Reading an audit log, and checking every link, hash and signature of it.

Limit: if entries are dropped from the *end* of a log, that log alone cannot show it.
:func:`.cross_check.cross_check` finds it by comparing the log with the peer's.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..wire import canonical_json
from .entry import AUDIT_LABEL, AUDIT_VERSION, GENESIS, AuditError

__all__ = ["read_log", "verified_entries", "verify_log"]

_FIELDS = frozenset(
    {"version", "seq", "time", "writer", "run", "round", "action", "direction", "peer", "schema",
     "bytes", "sha256", "prev", "note", "sig", "hash"}
)
_UNSIGNED = ("sig", "hash")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIG_HEX = re.compile(r"[0-9a-f]{128}")


def _same(a: Any, b: str) -> bool:
    """Constant-time equality of a logged hex string with the expected one."""
    return isinstance(a, str) and a.isascii() and hmac.compare_digest(a.encode(), b.encode())


def _parse(path: Path, index: int, line: bytes) -> dict[str, Any]:
    if not line.endswith(b"\n"):
        raise AuditError(path, index, "truncated: the last line does not end with a newline")
    try:
        entry = json.loads(line)
    except ValueError:
        raise AuditError(path, index, "malformed JSON (truncated or edited)") from None
    if not isinstance(entry, dict):
        raise AuditError(path, index, "malformed entry: not a JSON object")
    missing, extra = sorted(_FIELDS - set(entry)), sorted(set(entry) - _FIELDS)
    if missing or extra:
        raise AuditError(path, index, f"missing fields {missing}, unexpected fields {extra}")
    return entry


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f)


def read_log(path: Path) -> list[dict[str, Any]]:
    """Reads a log without checking hashes or signatures (see :func:`verify_log`).

    Raises:
        AuditError: At the first line that is not a complete JSON entry.
    """
    return [_parse(Path(path), i, line) for i, line in _lines(Path(path))]


def verified_entries(path: Path, public_key: Ed25519PublicKey) -> Iterator[dict[str, Any]]:
    """The entries of a log one at a time, each checked as :func:`verify_log` checks them.

    Raises:
        AuditError: At the first bad entry, once the iteration reaches it.
    """
    prev = GENESIS
    for index, line in _lines(path):
        entry = _parse(path, index, line)
        try:
            canonical = canonical_json(entry) + b"\n" == line
        except (TypeError, ValueError):
            canonical = False
        if not canonical:
            raise AuditError(path, index, "not in canonical form (edited)")
        if entry["version"] != AUDIT_VERSION:
            raise AuditError(path, index, f"unsupported version {entry['version']!r} (expected {AUDIT_VERSION})")
        if type(entry["seq"]) is not int or entry["seq"] != index:
            raise AuditError(path, index, f"sequence number {entry['seq']!r}, expected {index} (entries deleted, inserted or reordered)")
        if not _same(entry["prev"], prev):
            raise AuditError(path, index, "hash chain broken (prev is not the previous entry's hash)")
        if not (isinstance(entry["sig"], str) and _SIG_HEX.fullmatch(entry["sig"])):
            raise AuditError(path, index, "signature is not 64 bytes of lowercase hex")
        if not (isinstance(entry["hash"], str) and _HEX64.fullmatch(entry["hash"])):
            raise AuditError(path, index, "hash is not 32 bytes of lowercase hex")
        signed = AUDIT_LABEL + canonical_json({k: v for k, v in entry.items() if k not in _UNSIGNED})
        sig = bytes.fromhex(entry["sig"])
        if not _same(entry["hash"], hashlib.sha256(signed + sig).hexdigest()):
            raise AuditError(path, index, "hash mismatch (entry edited)")
        try:
            public_key.verify(sig, signed)
        except InvalidSignature:
            raise AuditError(path, index, "signature invalid (not signed with the writer's key: forged, or the wrong key)") from None
        prev = entry["hash"]
        yield entry


def verify_log(path: Path, public_key: Ed25519PublicKey) -> list[dict[str, Any]]:
    """Recomputes every link, hash and signature of a log.

    Args:
        path: The ``.jsonl`` file.
        public_key: The writer's identity public key (its fingerprint is in the invite
            and in the node's describe reply).

    Returns:
        The entries, in order.

    Raises:
        AuditError: At the first bad entry, naming it and its line. Covers truncation,
            malformed lines, missing fields, deleted, inserted or reordered entries, a
            broken chain, edited entries and forged signatures. Entries dropped from the
            end cannot be seen here; :func:`.cross_check.cross_check` against the peer finds them.
    """
    return list(verified_entries(Path(path), public_key))
