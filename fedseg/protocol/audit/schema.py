"""What an audit entry says about a message: its schema, never a tensor value.

A message is logged through its schema only (:func:`frame_schema`): its kind, its
declared scalar fields, and each tensor's name, dtype and shape. Tensor values (weights,
masks, predictions) are never logged. Scalar fields that the kind does not declare, and
oversized ones, are logged by name, type and size only, because an undeclared field may
carry data that must not be copied into the log. Declared fields that carry key material
(a kind's ``SECRET_FIELDS``, such as the Shamir shares revealed in secure aggregation) are
logged by size only, under ``secret``.
"""
from __future__ import annotations

from typing import Any

from ..errors import MessageError
from ..messages import TYPE_BY_KIND, declared_fields
from ..wire import DEFAULT_MAX_BYTES, canonical_json, decode_frame

__all__ = ["frame_schema"]

#: A declared scalar field larger than this (canonical JSON) is logged by size only.
MAX_FIELD_BYTES = 16 * 2**10
#: Longer tensor or field names are cut, so a name cannot smuggle data into the log.
MAX_NAME_CHARS = 200
_MAX_ERROR_CHARS = 500


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
    cls = TYPE_BY_KIND.get(decoded.kind)
    declared = declared_fields(cls)[0] if cls is not None else frozenset()
    secret_fields = cls.SECRET_FIELDS if cls is not None else frozenset()
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
