"""Keeps a node's workdir to the node's user: 0700 folders, 0600 files, Syft's store included."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["make_private"]


def make_private(workdir: Path) -> None:
    """Restricts the workdir and everything in it, and everything the node creates from now on.

    The umask covers the files written later by this process and by the Syft server it
    forks: ``node.log``, ``server.log``, Syft's SQLite database (which holds every
    account's signing key) and its blob store. Files from an earlier run are restricted
    here, since a umask only applies to new files.
    """
    os.umask(0o077)
    workdir.mkdir(parents=True, exist_ok=True)
    for root, folders, files in os.walk(workdir):
        os.chmod(root, 0o700)
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                os.chmod(path, 0o600)
