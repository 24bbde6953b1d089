"""Privacy audit log: every message a node or coordinator sends or receives, signed and chained.

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

A message is logged through its schema only (:func:`frame_schema`): its kind, its
declared scalar fields, and each tensor's name, dtype and shape. Tensor values (weights,
masks, predictions) are never logged. Scalar fields that the kind does not declare, and
oversized ones, are logged by name, type and size only, because an undeclared field may
carry data that must not be copied into the log. Declared fields that carry key material
(a kind's ``SECRET_FIELDS``, such as the Shamir shares revealed in secure aggregation) are
logged by size only, under ``secret``.

Limit: if entries are dropped from the *end* of a log, that log alone cannot show it.
:func:`cross_check` finds it by comparing the log with the peer's.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import io
import json
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import MessageError, ProtocolError
from ..messages import MESSAGE_TYPES, Message, MessageKind, declared_fields
from ..wire import DEFAULT_MAX_BYTES, canonical_json, decode_frame

#: File name of a writer's log: in a node's workdir and in a run directory.
AUDIT_FILE = "audit.jsonl"

__all__ = [
    "AUDIT_FILE",
    "AUDIT_LABEL",
    "AUDIT_VERSION",
    "GENESIS",
    "AuditError",
    "AuditLog",
    "Direction",
    "frame_schema",
    "read_log",
    "verify_log",
    "cross_check",
    "check_policy",
    "looks_per_sample",
    "summarize",
    "write_report",
]

#: Domain separation: an audit signature can never be taken for another use of the identity key.
AUDIT_LABEL = b"fedseg/v1/audit/entry"
AUDIT_VERSION = 1
#: The ``prev`` of the first entry of every log.
GENESIS = "0" * 64
#: A declared scalar field larger than this (canonical JSON) is logged by size only.
MAX_FIELD_BYTES = 16 * 2**10
#: Longer tensor or field names are cut, so a name cannot smuggle data into the log.
MAX_NAME_CHARS = 200
_MAX_ERROR_CHARS = 500
_FIELDS = frozenset(
    {"version", "seq", "time", "writer", "run", "round", "action", "direction", "peer", "schema",
     "bytes", "sha256", "prev", "note", "sig", "hash"}
)
_UNSIGNED = ("sig", "hash")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIG_HEX = re.compile(r"[0-9a-f]{128}")
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


_DECLARED: dict[str, tuple[frozenset[str], frozenset[str]]] = {cls.KIND.value: declared_fields(cls) for cls in MESSAGE_TYPES}
_TYPES: dict[str, type[Message]] = {cls.KIND.value: cls for cls in MESSAGE_TYPES}
_SECRET: dict[str, frozenset[str]] = {cls.KIND.value: cls.SECRET_FIELDS for cls in MESSAGE_TYPES}


def _short(name: str) -> str:
    return name if len(name) <= MAX_NAME_CHARS else f"{name[:MAX_NAME_CHARS]}...({len(name)} chars)"


def _undecodable(error: str) -> dict[str, Any]:
    return {"kind": None, "error": error[:_MAX_ERROR_CHARS]}


def frame_schema(frame: bytes) -> dict[str, Any]:
    """Describes a frame for the audit log, without any tensor value.

    Args:
        frame: The frame bytes as sent or received.

    Returns:
        ``{"kind", "schema_version", "fields", "tensors"}``. ``fields`` holds the header's
        scalar fields that the kind declares, except its ``SECRET_FIELDS``, which are
        listed under ``"secret"`` as ``{name: {"bytes"}}``. ``tensors`` is ``[[name, dtype, shape], ...]``
        in wire order. If some scalar fields are undeclared, not JSON-safe, or larger than
        :data:`MAX_FIELD_BYTES`, they are listed under ``"redacted"`` as
        ``{name: {"type", "bytes", "why"}}`` and their values are left out. A frame
        that cannot be decoded gives ``{"kind": None, "error": "<why>"}``. This function
        never raises.
    """
    try:
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            return _undecodable(f"frame must be bytes, got {type(frame).__name__}")
        data = bytes(frame)
        # No size limit here: the log describes whatever was seen, however large.
        decoded = decode_frame(data, max_bytes=max(len(data), DEFAULT_MAX_BYTES))
    except MessageError as exc:
        return _undecodable(str(exc))
    except Exception as exc:  # never raise: the message must be logged even if it is garbage
        return _undecodable(f"{type(exc).__name__}: {exc}")
    declared = _DECLARED.get(decoded.kind, (frozenset(), frozenset()))[0]
    secret_fields = _SECRET.get(decoded.kind, frozenset())
    fields: dict[str, Any] = {}
    redacted: dict[str, dict[str, Any]] = {}
    secret: dict[str, dict[str, int]] = {}
    for name, value in sorted(decoded.fields.items()):
        try:
            size = len(canonical_json(value))
        except (TypeError, ValueError):
            redacted[_short(name)] = {"type": type(value).__name__, "bytes": None, "why": "not JSON-safe (NaN or Inf)"}
            continue
        if name not in declared:
            redacted[_short(name)] = {"type": type(value).__name__, "bytes": size, "why": f"not declared by {_short(decoded.kind)!r}"}
        elif name in secret_fields:
            secret[name] = {"bytes": size}
        elif size > MAX_FIELD_BYTES:
            redacted[name] = {"type": type(value).__name__, "bytes": size, "why": f"larger than {MAX_FIELD_BYTES} bytes"}
        else:
            fields[name] = value
    schema: dict[str, Any] = {
        "kind": _short(decoded.kind),
        "schema_version": decoded.schema_version,
        "fields": fields,
        "tensors": [[_short(n), a.dtype.name, list(a.shape)] for n, a in decoded.tensors.items()],
    }
    if redacted:
        schema["redacted"] = redacted
    if secret:
        schema["secret"] = secret
    return schema


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _seal(body: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    signed = AUDIT_LABEL + canonical_json(body)
    sig = key.sign(signed)
    return {**body, "sig": sig.hex(), "hash": hashlib.sha256(signed + sig).hexdigest()}


def _same(a: Any, b: str) -> bool:
    """Constant-time equality of a logged hex string with the expected one."""
    return isinstance(a, str) and a.isascii() and hmac.compare_digest(a.encode(), b.encode())


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
            for last in _verified(self.path, key.public_key()):
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


def _verified(path: Path, public_key: Ed25519PublicKey) -> Iterator[dict[str, Any]]:
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
            end cannot be seen here; :func:`cross_check` against the peer finds them.
    """
    return list(_verified(Path(path), public_key))


def _in_run(entry: Mapping[str, Any], run_id: str | None) -> bool:
    return run_id is None or entry.get("run") == run_id


def _describe(entry: Mapping[str, Any]) -> str:
    rnd = "" if entry.get("round") is None else f" of round {entry['round']}"
    return f"{entry.get('action') or 'undecodable message'}{rnd} ({entry.get('bytes')} bytes, sha256 {str(entry.get('sha256'))[:12]})"


def _match(sent: list[tuple[int, dict]], received: list[tuple[int, dict]], sender: str, receiver: str) -> list[str]:
    """Pairs each sent entry with a received one of the same size and hash, in order."""
    pool: dict[tuple[Any, Any], list[tuple[int, dict]]] = {}
    for j, entry in received:
        pool.setdefault((entry.get("sha256"), entry.get("bytes")), []).append((j, entry))
    lost = []
    for i, entry in sent:
        candidates = pool.get((entry.get("sha256"), entry.get("bytes")))
        if candidates:
            candidates.pop(0)
        else:
            lost.append((i, entry))
    unsent = sorted((x for xs in pool.values() for x in xs), key=lambda x: x[0])
    findings = []
    for i, entry in lost:
        same = next((x for x in unsent if (x[1].get("action"), x[1].get("round"), x[1].get("run")) == (entry.get("action"), entry.get("round"), entry.get("run"))), None)
        if same is not None:
            unsent.remove(same)
            j, other = same
            findings.append(
                f"entry {i} in {sender} and entry {j} in {receiver} record the same {entry.get('action')} message differently: "
                f"sent {_describe(entry)}, received {_describe(other)}"
            )
        else:
            findings.append(f"entry {i} in {sender}: sent {_describe(entry)} is missing from {receiver} (no received entry with that hash)")
    for j, entry in unsent:
        findings.append(f"entry {j} in {receiver}: received {_describe(entry)} was never recorded as sent in {sender}")
    return findings


def cross_check(
    coordinator: list[dict[str, Any]],
    nodes: Mapping[str, list[dict[str, Any]]],
    *,
    run_id: str | None = None,
    coordinator_name: str | None = None,
) -> list[str]:
    """Checks that both ends recorded every message with the same bytes.

    Every message the coordinator sent to node P must be in P's log as received, with
    the same SHA-256 and size, and every message P sent must be in the coordinator's log
    as received from P. Messages received but never recorded as sent are findings too.
    Identical messages are matched one to one, in order. Coordinator entries for peers
    not in ``nodes`` are not checked.

    Args:
        coordinator: The coordinator's entries (from :func:`verify_log`).
        nodes: Node name (the coordinator's ``peer``) to that node's entries.
        run_id: If given, only entries of this run are compared on both sides.
        coordinator_name: If given, only node entries with this ``peer`` are compared.

    Returns:
        Findings naming entry indices and logs; empty if both sides agree.
    """
    findings: list[str] = []
    for node in sorted(nodes):
        ours = [(i, e) for i, e in enumerate(coordinator) if e.get("peer") == node and _in_run(e, run_id)]
        theirs = [
            (i, e) for i, e in enumerate(nodes[node])
            if _in_run(e, run_id) and (coordinator_name is None or e.get("peer") == coordinator_name)
        ]
        node_log = f"node {node}'s log"

        def by(entries: list[tuple[int, dict]], direction: Direction) -> list[tuple[int, dict]]:
            return [x for x in entries if x[1].get("direction") == direction]

        findings += _match(by(ours, Direction.SENT), by(theirs, Direction.RECEIVED), "the coordinator's log", node_log)
        findings += _match(by(theirs, Direction.SENT), by(ours, Direction.RECEIVED), node_log, "the coordinator's log")
    return findings


def looks_per_sample(shape: Sequence[int], image_size: int | None = None) -> bool:
    """Whether a tensor shape looks like a batch of images, masks or predictions.

    Rank 3 or more, with the last two dimensions equal and at least 8, as in
    ``(N, C, H, W)`` or ``(N, H, W)``. A 3x3 convolution kernel ``(O, I, 3, 3)`` does not
    match. If ``image_size`` is given, a dimension equal to it in the last two positions
    also matches.
    """
    shape = tuple(shape)
    if len(shape) >= 3 and shape[-1] == shape[-2] >= 8:
        return True
    return image_size is not None and image_size in shape[-2:]


def _fields_fail(kind: str, fields: Mapping[str, Any]) -> str | None:
    """Runs the kind's own validate() on the logged scalars; the reason if it fails."""
    cls = _TYPES[kind]
    scalars, tensors = _DECLARED[kind]
    if set(fields) != scalars:
        return None  # missing or redacted fields are reported on their own
    try:
        cls(**fields, **{name: {} for name in tensors}).validate()
    except MessageError as exc:
        return str(exc)
    except Exception as exc:  # wrong types make validate() fail in other ways
        return f"{type(exc).__name__}: {exc}"
    return None


def check_policy(
    node: str,
    entries: list[dict[str, Any]],
    declared: Mapping[str, tuple[int, ...]],
    image_size: int | None = None,
) -> list[str]:
    """Checks what a node sent against what it declares it may send.

    For each message the node sent, it reports:

    * any tensor whose shape looks like per-sample data (:func:`looks_per_sample`),
      unless its name and shape are exactly a declared pair;
    * any tensor that is not a declared parameter: a name outside ``declared`` after
      the wire prefix (``weights/``) is stripped, or a declared name with a different
      shape;
    * scalar fields the message kind does not declare, declared fields too large to be
      logged, and declared fields that fail the kind's validation (such as extra keys in
      ``metrics``);
    * frames that could not be decoded, and kinds that messages.py does not know.

    Args:
        node: The node's name, for the findings.
        entries: The node's own log entries.
        declared: Parameter name to shape: the node's declared exchange set.
        image_size: The node's image size (from its describe reply), if known.

    Returns:
        Findings, each naming the entry index, the node, the tensor or field and why.
    """
    findings: list[str] = []
    exact = {name: tuple(shape) for name, shape in declared.items()}
    for i, entry in enumerate(entries):
        if entry.get("direction") != Direction.SENT:
            continue
        at = f"entry {i} in node {node}'s log"
        schema = entry.get("schema") or {}
        kind = schema.get("kind")
        if kind is None:
            findings.append(f"{at}: sent a frame that could not be decoded ({schema.get('error')}); what it held cannot be checked")
            continue
        if kind not in _DECLARED:
            findings.append(f"{at}: sent a message of unknown kind {kind!r}")
        scalars, tensor_fields = _DECLARED.get(kind, (frozenset(), frozenset()))
        for name, _dtype, shape in schema.get("tensors", []):
            shape = tuple(shape)
            field, sep, param = name.partition("/")
            param_name = param if sep and field in tensor_fields else None
            if param_name is not None and exact.get(param_name) == shape:
                continue
            if looks_per_sample(shape):
                findings.append(f"{at}: tensor {name} with shape {shape} looks like per-sample data (image, mask or prediction)")
            elif looks_per_sample(shape, image_size):
                findings.append(f"{at}: tensor {name} with shape {shape} has a dimension equal to the image size {image_size}")
            if param_name is None:
                findings.append(f"{at}: tensor {name} is not in a declared tensor field of {kind}")
            elif param_name not in exact:
                findings.append(f"{at}: tensor {name} is not in the declared exchange set")
            else:
                findings.append(f"{at}: tensor {name} has shape {shape}, but {exact[param_name]} is declared")
        fields = schema.get("fields", {})
        redacted = schema.get("redacted", {})
        for name in sorted(set(fields) | set(redacted)):
            if name not in scalars:
                findings.append(f"{at}: scalar field {name!r} is not declared by {kind} messages")
            elif name in redacted:
                findings.append(f"{at}: scalar field {name!r} was not logged ({redacted[name].get('why')}); it may carry data")
        if kind in _TYPES and not redacted and (why := _fields_fail(kind, fields)):
            findings.append(f"{at}: scalar fields fail the {kind} checks: {why}")
    return findings


def summarize(
    entries: list[dict[str, Any]],
    declared: Mapping[str, tuple[int, ...]] | None = None,
) -> list[dict[str, Any]]:
    """Totals per (peer, round), for a report.

    Args:
        entries: One writer's entries.
        declared: If given, declared (name, shape) pairs never count as image-shaped.

    Returns:
        One dict per (peer, round), in round order (``None``, e.g. describe, first):
        ``peer``, ``round``, ``runs``, ``first``/``last`` (times), ``messages``, ``sent``,
        ``received``, ``bytes_out``, ``bytes_in``, ``actions_out``, ``tensors_out``
        (count), ``tensor_groups_out`` (e.g. ``["weights"]``), ``dtypes_out``,
        ``image_shaped_out`` (``"name (shape)"`` strings) and ``refusals`` (error
        replies sent).
    """
    exact = {name: tuple(shape) for name, shape in (declared or {}).items()}
    groups: dict[tuple[Any, Any], dict[str, Any]] = {}
    for entry in entries:
        key = (entry.get("peer"), entry.get("round"))
        s = groups.setdefault(key, {
            "peer": key[0], "round": key[1], "runs": set(), "first": entry.get("time"), "last": entry.get("time"),
            "messages": 0, "sent": 0, "received": 0, "bytes_out": 0, "bytes_in": 0, "actions_out": set(),
            "tensors_out": 0, "tensor_groups_out": set(), "dtypes_out": set(), "image_shaped_out": [], "refusals": 0,
        })
        s["messages"] += 1
        s["last"] = entry.get("time")
        if entry.get("run") is not None:
            s["runs"].add(entry["run"])
        size = entry.get("bytes") or 0
        if entry.get("direction") != Direction.SENT:
            s["received"] += 1
            s["bytes_in"] += size
            continue
        s["sent"] += 1
        s["bytes_out"] += size
        action = entry.get("action")
        s["actions_out"].add(action or "undecodable")
        s["refusals"] += action == MessageKind.ERROR
        for name, dtype, shape in (entry.get("schema") or {}).get("tensors", []):
            s["tensors_out"] += 1
            s["tensor_groups_out"].add(name.partition("/")[0])
            s["dtypes_out"].add(dtype)
            shape = tuple(shape)
            if looks_per_sample(shape) and exact.get(name.partition("/")[2]) != shape:
                s["image_shaped_out"].append(f"{name} {shape}")
    out = []
    for s in groups.values():
        for key in ("runs", "actions_out", "tensor_groups_out", "dtypes_out"):
            s[key] = sorted(s[key])
        out.append(s)
    return sorted(out, key=lambda s: (s["round"] is not None, s["round"] or 0, str(s["peer"])))


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _round_label(round_: int | None) -> str:
    return "setup" if round_ is None else str(round_)


def write_report(
    summaries: list[dict[str, Any]],
    path_md: Path,
    path_png: Path,
    *,
    title: str = "Audit report",
    findings: Sequence[str] = (),
) -> None:
    """Writes a short Markdown report for a data-protection officer, and a bar plot.

    Args:
        summaries: From :func:`summarize` of one writer's log.
        path_md: The Markdown file.
        path_png: The PNG of bytes sent per round, linked from the Markdown.
        title: E.g. ``"Audit report: node kvasir"``.
        findings: From :func:`check_policy` and :func:`cross_check`, listed as they are.
    """
    from ..run_store import atomic_write

    path_md, path_png = Path(path_md), Path(path_png)
    leaks = [(s, t) for s in summaries for t in s["image_shaped_out"]]
    sent = sum(s["bytes_out"] for s in summaries)
    n_sent = sum(s["sent"] for s in summaries)
    text = [
        f"# {title}",
        "",
        "This report lists every message in this audit log: what was sent, when, to whom and how large. "
        "Only model parameters and summary numbers (counts, losses, Dice scores) are meant to leave a hospital. "
        "Images, masks and predictions must never leave. The log records the names and shapes of what was sent, never its contents.",
        "",
    ]
    if leaks:
        text.append("**Attention: image-shaped data was sent.**")
        text += [f"- round {_round_label(s['round'])}, to {s['peer']}: {t}" for s, t in leaks]
    else:
        text.append("**Nothing image-shaped was sent.** No tensor had the shape of an image, mask or prediction batch.")
    text += [
        "",
        f"In total, {n_sent} messages carrying {_size(sent)} were sent.",
        "",
        "| Round | To / from | When (UTC) | Messages sent / received | Data sent | Data received | What was sent | Refusals |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        first, last = str(s["first"])[:19].replace("T", " "), str(s["last"])[:19].replace("T", " ")
        when = first if first == last else f"{first} to {last[11:] if last[:10] == first[:10] else last}"
        what = ", ".join(s["actions_out"]) or "nothing"
        if s["tensors_out"]:
            what += f" ({s['tensors_out']} tensors)"
        text.append(
            f"| {_round_label(s['round'])} | {s['peer']} | {when} | {s['sent']} / {s['received']} | "
            f"{_size(s['bytes_out'])} | {_size(s['bytes_in'])} | {what} | {s['refusals']} |"
        )
    text += ["", "## Findings", ""]
    text += [f"- {f}" for f in findings] if findings else ["No findings: the checks that were run found nothing wrong."]
    text += ["", f"![Data sent per round]({os.path.relpath(path_png, path_md.parent)})", ""]
    path_md.parent.mkdir(parents=True, exist_ok=True)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path_md, "\n".join(text).encode())
    atomic_write(path_png, _plot_bytes_out(summaries, title))


def _plot_bytes_out(summaries: list[dict[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted({s["round"] for s in summaries}, key=lambda r: (r is not None, r or 0))
    peers = sorted({str(s["peer"]) for s in summaries})
    fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * len(rounds) + 2), 3.5))
    bottom = [0.0] * len(rounds)
    for peer in peers:
        heights = [sum(s["bytes_out"] for s in summaries if s["round"] == r and str(s["peer"]) == peer) / 1e6 for r in rounds]
        ax.bar([_round_label(r) for r in rounds], heights, bottom=bottom, label=peer)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("round")
    ax.set_ylabel("data sent (MB)")
    ax.set_title(title)
    if len(peers) > 1:
        ax.legend(frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
