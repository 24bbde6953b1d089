"""The one canonical encoding of fedseg messages, used for transport, hashing and signing.

A frame is ``MAGIC | u32 header length | header | tensor bytes``. The header is JSON
with sorted keys and no whitespace; it names the message kind, its schema version, its
scalar fields and, for each tensor in name order, its dtype and shape. The tensor bytes
follow in the same order, little-endian and C-contiguous, so the same message always
encodes to the same bytes.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import MessageError

__all__ = ["MAGIC", "DEFAULT_MAX_BYTES", "DTYPES", "Frame", "canonical_json", "encode_frame", "decode_frame"]

MAGIC = b"FSG1"
#: Larger than any plan's weights at 128 px; a plan may lower or raise it.
DEFAULT_MAX_BYTES = 256 * 2**20
#: A header only holds scalars and tensor descriptors, so 1 MiB is far beyond honest use.
MAX_HEADER_BYTES = 2**20
MAX_RANK = 8
DTYPES = frozenset({"float32", "float16", "int64", "int32", "uint32", "uint8"})
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class Frame:
    """A decoded frame before it is typed into a message."""

    kind: str
    schema_version: int
    fields: dict[str, Any]
    tensors: dict[str, np.ndarray]


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, finite numbers only: the one JSON encoding fedseg hashes and signs.

    Raises:
        ValueError: On NaN or Inf. TypeError: On objects JSON cannot hold.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _canonical_json(obj: Any) -> bytes:
    try:
        return canonical_json(obj)
    except (TypeError, ValueError) as exc:  # NaN/Inf scalars or objects JSON cannot hold
        raise MessageError(f"header cannot be encoded: {exc}") from exc


def encode_frame(kind: str, schema_version: int, fields: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    """Encodes one message.

    Args:
        kind: Message kind.
        schema_version: Version of that kind's schema.
        fields: JSON-safe scalars, lists and dicts (finite numbers only).
        tensors: Named arrays of a dtype in :data:`DTYPES`.

    Returns:
        The frame bytes.

    Raises:
        MessageError: On a non-finite scalar or an unsupported dtype.
    """
    names = sorted(tensors)
    arrays = []
    for name in names:
        # asarray, not ascontiguousarray: the latter turns 0-d tensors into shape (1,).
        arr = np.asarray(tensors[name])
        if arr.dtype.name not in DTYPES:
            raise MessageError(f"tensor {name!r}: dtype {arr.dtype.name} is not allowed on the wire")
        arrays.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    header = _canonical_json(
        {
            "kind": kind,
            "schema_version": schema_version,
            "fields": fields,
            "tensors": [[n, a.dtype.name, list(a.shape)] for n, a in zip(names, arrays)],
        }
    )
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *(a.tobytes() for a in arrays)])


def decode_frame(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Frame:
    """Parses a frame, checking every length before it is trusted.

    Args:
        data: The received bytes.
        max_bytes: Size limit; larger frames are refused before parsing.

    Returns:
        The frame; tensors are read-only views into ``data``.

    Raises:
        MessageError: Naming what is malformed (size, magic, header, tensor table).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"frame must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise MessageError(f"frame of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if len(data) < len(MAGIC) + _LEN.size or not data.startswith(MAGIC):
        raise MessageError("frame does not start with the fedseg magic (truncated or not a fedseg message)")
    (hlen,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if hlen > MAX_HEADER_BYTES or start + hlen > len(data):
        raise MessageError(f"header length {hlen} is out of bounds for a {len(data)}-byte frame")
    try:
        header = json.loads(data[start : start + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or set(header) != {"kind", "schema_version", "fields", "tensors"}:
        raise MessageError("header must hold exactly kind, schema_version, fields and tensors")
    kind, version, fields, table = header["kind"], header["schema_version"], header["fields"], header["tensors"]
    if not isinstance(kind, str) or type(version) is not int or not isinstance(fields, dict):
        raise MessageError("header kind must be a string, schema_version an integer, fields an object")
    if not isinstance(table, list):
        raise MessageError("header tensors must be a list")
    tensors: dict[str, np.ndarray] = {}
    offset = start + hlen
    for entry in table:
        name, arr, offset = _read_tensor(entry, data, offset)
        if name in tensors:
            raise MessageError(f"tensor {name!r} appears twice")
        tensors[name] = arr
    if offset != len(data):
        raise MessageError(f"frame has {len(data) - offset} trailing bytes after the last tensor")
    return Frame(kind, version, fields, tensors)


def _read_tensor(entry: Any, data: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
        raise MessageError(f"tensor descriptor {entry!r} must be [name, dtype, shape]")
    name, dtype, shape = entry
    if dtype not in DTYPES:
        raise MessageError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(type(s) is int and s >= 0 for s in shape)):
        raise MessageError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    dt = np.dtype(dtype).newbyteorder("<")
    count = 1
    for s in shape:
        count *= s
    nbytes = count * dt.itemsize
    if offset + nbytes > len(data):
        raise MessageError(f"tensor {name!r}: needs {nbytes} bytes but the frame is truncated")
    arr = np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(shape)
    return name, arr, offset + nbytes
