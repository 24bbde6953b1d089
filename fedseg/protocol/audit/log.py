"""The audit log a node or the coordinator writes: append-only, signed, hash-chained, on disk before a message is sent."""
from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..wire import canonical_json
from .entry import AUDIT_LABEL, AUDIT_VERSION, GENESIS, AuditError, Direction
from .schema import frame_schema
from .verify import verified_entries

__all__ = ["AUDIT_FILE", "AuditLog"]

#: File name of a writer's log: in a node's workdir and in a run directory.
AUDIT_FILE = "audit.jsonl"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _seal(body: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    signed = AUDIT_LABEL + canonical_json(body)
    sig = key.sign(signed)
    return {**body, "sig": sig.hex(), "hash": hashlib.sha256(signed + sig).hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    """An append-only, signed, hash-chained JSON Lines log of one writer's messages.

    An open log holds an exclusive ``flock`` on its file, so two writers can never
    interleave one chain. Opening an existing file first verifies all of it with the
    writer's own public key: a corrupt or foreign log raises, and a new chain is never
    started silently. Use it as a context manager, or call :meth:`close`.

    Args:
        path: The ``.jsonl`` file, created (mode 0600) if missing.
        key: The writer's Ed25519 identity key (see :mod:`fedseg.protocol.identity`).
        writer: The writer's name as it appears in entries, e.g. the node name.

    Raises:
        AuditError: If the existing file fails verification (naming the first bad
            entry), or another writer holds it open.
    """

    def __init__(self, path: Path, key: Ed25519PrivateKey, writer: str) -> None:
        if not isinstance(writer, str) or not writer:
            raise ValueError("writer must be a non-empty string")
        self.path = Path(path)
        self.writer = writer
        self._key = key
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditError(self.path, None, "is already open by another writer") from None
            last = None
            for last in verified_entries(self.path, key.public_key()):
                pass
            if created:
                _fsync_dir(self.path.parent)
            self._size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._seq = 0 if last is None else last["seq"] + 1
        self._prev = GENESIS if last is None else last["hash"]

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self._seq

    def close(self) -> None:
        """Releases the file and its lock; later :meth:`record` calls raise."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def record(
        self,
        *,
        direction: str,
        peer: str,
        frame: bytes,
        run_id: str | None = None,
        round: int | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        """Appends, flushes and fsyncs one entry. Call it before sending, or right after receiving.

        Args:
            direction: ``"sent"`` or ``"received"``.
            peer: Who the message went to or came from.
            frame: The exact frame bytes (also for frames that fail to decode).
            run_id: The run; if ``None``, the frame's ``run_id`` field, if any.
            round: The round; if ``None``, the frame's ``round`` field, if any.
            note: Short free text, e.g. why a message was refused. Never patient data.

        Returns:
            The entry as written, with ``sig`` and ``hash``.

        Raises:
            ValueError: On a bad direction, peer or note.
            TypeError: If ``frame`` is not bytes.
            AuditError: If the log is closed or the entry could not be written; the file
                is then left as it was, and the message must not be sent.
        """
        direction = Direction(direction).value
        if not isinstance(peer, str) or not peer:
            raise ValueError("peer must be a non-empty string")
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise TypeError(f"frame must be bytes, got {type(frame).__name__}")
        if note is not None and not isinstance(note, str):
            raise ValueError("note must be a string or None")
        data = bytes(frame)
        schema = frame_schema(data)  # the costly parts (decode, hash) run outside the lock
        fields = schema.get("fields", {})
        if run_id is None and isinstance(fields.get("run_id"), str):
            run_id = fields["run_id"]
        if round is None and type(fields.get("round")) is int:
            round = fields["round"]
        if run_id is not None and not isinstance(run_id, str):
            raise ValueError(f"run_id must be a string, got {type(run_id).__name__}")
        if round is not None and type(round) is not int:
            raise ValueError(f"round must be an integer, got {type(round).__name__}")
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if self._fd is None:
                raise AuditError(self.path, None, "is closed")
            body = {
                "version": AUDIT_VERSION,
                "seq": self._seq,
                "time": _now(),
                "writer": self.writer,
                "run": run_id,
                "round": round,
                "action": schema["kind"],
                "direction": direction,
                "peer": peer,
                "schema": schema,
                "bytes": len(data),
                "sha256": digest,
                "prev": self._prev,
                "note": note,
            }
            entry = _seal(body, self._key)
            self._append(canonical_json(entry) + b"\n")
            self._seq += 1
            self._prev = entry["hash"]
        return entry

    def _append(self, line: bytes) -> None:
        assert self._fd is not None
        view, written = memoryview(line), 0
        try:
            while written < len(line):
                written += os.write(self._fd, view[written:])
            os.fsync(self._fd)
        except OSError as exc:
            try:  # leave no half line behind, so the chain stays verifiable
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise AuditError(self.path, self._seq, f"could not be written: {exc}") from exc
        self._size += len(line)
