"""A run's figures as TensorBoard scalars, in ``RUN/tensorboard``: one curve per site and metric.

Each tag is ``<metrics key>/<site>`` (``val_dice/kvasir``, ``personal_test_hd95/kvasir``,
``train_loss/kvasir``), so TensorBoard groups the sites of one metric on one chart; the
step is the round. Written with tensorboardX, which needs only protobuf (already there
through Syft); the ``tensorboard`` package itself would need a protobuf newer than
Syft 0.9.5 allows, and is only needed to view the files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["TENSORBOARD_DIR", "ScalarLog"]

TENSORBOARD_DIR = "tensorboard"
#: The metrics keys' last parts that become curves; counts and pseudo-label shares do not.
_METRICS = ("dice", "iou", "assd", "hd95", "loss")


class ScalarLog:
    """Writes each round's metrics rows as scalars, flushed after every round.

    Args:
        folder: Where the event files go.
        first_round: The first round this writer records; a resumed run passes the round
            after its checkpoint, so TensorBoard drops what an interrupted run wrote past it.
    """

    def __init__(self, folder: Path, first_round: int) -> None:
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(folder), purge_step=first_round or None)

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            for key, value in row.items():
                if key.rsplit("_", 1)[-1] in _METRICS and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{key}/{row['site']}", value, row["round"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
