"""A run directory: checkpoint, metrics and plan, each written so a crash never leaves half a file.

Files:
    ``checkpoint.npz``: global weights plus the run state (round, run id, plan, invites,
        the round's rows still awaiting scores), replaced atomically after each completed round.
    ``best.npz``: the same for the round with the best validation Dice so far, as
        ``report.md`` chooses it (:func:`~fedseg.protocol.report.best_round`).
    ``metrics.jsonl``: one row per round and site.
    ``report.md`` and ``dice.png``: regenerated from the metrics after each round.
    ``manifest.json``: plan, seed, versions and each node's split hashes
        (:mod:`fedseg.protocol.manifest`).
    ``tensorboard/``: the same figures as TensorBoard scalars (:mod:`fedseg.protocol.tensorboard`).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .audit.log import AUDIT_FILE
from .errors import ProtocolError
from .files import atomic_write
from .messages import Arrays

__all__ = ["KEPT_MODELS", "RunState", "RunStore"]

_STATE_KEY = "__fedseg_state__"
#: The global models a run keeps: "last" (the checkpoint) and "best" (best validation Dice).
KEPT_MODELS = ("best", "last")


@dataclass(frozen=True)
class RunState:
    """What a resumed run needs besides the weights.

    ``pending`` is None once the rows of ``round`` are in the metrics. Until then (a
    round's global model is scored on the next round's train request) it holds that
    round's ``columns`` (the train columns of each node's row) and its ``summary``, so a
    resumed run completes those rows instead of losing them.
    """

    run_id: str
    round: int
    plan: dict[str, Any]
    invites: list[str]
    pending: dict[str, Any] | None = None


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.checkpoint = self.root / "checkpoint.npz"
        self.best = self.root / "best.npz"
        self.metrics = self.root / "metrics.jsonl"
        self.report = self.root / "report.md"
        self.plot = self.root / "dice.png"
        self.audit = self.root / AUDIT_FILE
        # The coordinator's identity for this run: it signs the run's audit log.
        self.identity = self.root / "coordinator.key"

    def save(self, state: RunState, arrays: Arrays, best: bool = False) -> None:
        """Replaces the checkpoint, or with ``best`` the best round's weights."""
        import io

        buf = io.BytesIO()
        state_bytes = np.frombuffer(json.dumps(state.__dict__, sort_keys=True).encode(), dtype=np.uint8)
        np.savez(buf, **{_STATE_KEY: state_bytes}, **arrays)
        atomic_write(self.best if best else self.checkpoint, buf.getvalue())

    def load(self, which: str = "last") -> tuple[RunState, Arrays]:
        """Loads the last completed round, or with ``which="best"`` the best one.

        Raises:
            ProtocolError: If the directory holds no readable file of that model.
        """
        if which not in KEPT_MODELS:
            raise ProtocolError(f"a run keeps the models {', '.join(KEPT_MODELS)}, not {which!r}")
        path = self.best if which == "best" else self.checkpoint
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in data.files if k != _STATE_KEY}
                state = RunState(**json.loads(data[_STATE_KEY].tobytes()))
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise ProtocolError(f"{path} cannot be {'resumed from' if which == 'last' else 'read'}: {exc}") from None
        return state, arrays

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replaces the metrics file with ``rows`` (so a resumed run drops rows past its checkpoint)."""
        atomic_write(self.metrics, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
