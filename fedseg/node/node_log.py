"""The node's own log, ``<workdir>/node.log``: refusals, approvals and training, one line each.

Kept apart from the actions so that ``fedseg node start`` sets it up without importing torch.
"""
from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["log", "log_to_workdir"]

log = logging.getLogger("fedseg.node")


def log_to_workdir(workdir: Path) -> None:
    """Sends the node's log to ``workdir/node.log``, once per process."""
    path = str((workdir / "node.log").resolve())
    if not any(getattr(h, "baseFilename", None) == path for h in log.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
