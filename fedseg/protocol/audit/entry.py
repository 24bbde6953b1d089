"""One audit-log entry: its fields, its signature, and the hash chain that links it to the one before.

Both ends of every exchange append to their own JSON Lines log: before a message is
sent, and as soon as one is received (requests, replies, errors and refusals alike). One
line is one entry::

    {"action": "train_reply", "bytes": 52311, "direction": "sent", "hash": "<hex>",
     "note": null, "peer": "coordinator", "prev": "<hash of entry seq-1>", "round": 3,
     "run": "run-1", "schema": {...}, "seq": 41, "sha256": "<hex of the frame>",
     "sig": "<hex>", "time": "2025-01-01T12:00:00.000000+00:00", "version": 1,
     "writer": "kvasir"}

The body of an entry (all but ``sig`` and ``hash``) is encoded canonically like the wire
header (sorted keys, no whitespace). ``sig`` is the writer's Ed25519 signature of
``AUDIT_LABEL + body``, and ``hash`` is SHA-256 of ``AUDIT_LABEL + body + sig``. Each
entry's ``prev`` is the previous entry's ``hash`` (:data:`GENESIS` for the first). So
editing, deleting, inserting or reordering entries breaks the chain at that entry, and
rewriting the chain needs the writer's private key. Each line must also be exactly the
canonical encoding of its entry, so a change to any single byte is detected.
"""
from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from ..errors import ProtocolError

__all__ = ["AUDIT_LABEL", "AUDIT_VERSION", "GENESIS", "AuditError", "Direction"]

#: Domain separation: an audit signature can never be taken for another use of the identity key.
AUDIT_LABEL = b"fedseg/v1/audit/entry"
AUDIT_VERSION = 1
#: The ``prev`` of the first entry of every log.
GENESIS = "0" * 64


class AuditError(ProtocolError):
    """An audit log is corrupt, tampered with, or cannot be written.

    Attributes:
        path: The log file.
        index: 0-based index of the first bad entry (``None`` if the problem is the
            whole file); its line in the file is ``index + 1``.
        reason: What is wrong with it.
    """

    def __init__(self, path: Path | str, index: int | None, reason: str) -> None:
        self.path, self.index, self.reason = Path(path), index, reason
        where = f"{path}" if index is None else f"entry {index} (line {index + 1}) in {path}"
        super().__init__(f"{where}: {reason}")

    @property
    def line(self) -> int | None:
        """1-based line of the bad entry, or ``None``."""
        return None if self.index is None else self.index + 1

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.index, self.reason))


class Direction(StrEnum):
    """Whether the writer sent the message or received it."""

    SENT = "sent"
    RECEIVED = "received"
