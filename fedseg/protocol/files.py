"""The one way fedseg replaces a file: temporary file, fsync, rename, so no reader sees half of it."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write", "write_private"]


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Writes ``data`` to a temporary file beside ``path``, fsyncs it, then renames it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_private(path: Path, data: bytes) -> None:
    """:func:`atomic_write` with mode 0600, for keys, passwords and invites."""
    atomic_write(path, data, mode=0o600)
