"""A node's settings, kept in its workdir so its Syft server process can read them."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedseg.protocol.files import atomic_write

from .syft_retention import DEFAULT_RETENTION_S

__all__ = ["NodeConfig", "WORKDIR_ENV"]

#: How the node's Syft server process, started by Syft's own launcher, finds its workdir.
WORKDIR_ENV = "FEDSEG_NODE_WORKDIR"


@dataclass(frozen=True)
class NodeConfig:
    """What a data owner chose when starting the node.

    Attributes:
        name: Node (site) name, shown to the coordinator.
        data: Absolute path of the site folder.
        labels: Label kind: "pixel", "box", "image" or "none".
        workdir: Absolute path of the node's private working directory.
        limit: Keep only the first N images (subsets for tests and benchmarks).
        group_by: meta.csv column for group-aware splits; "auto" or None.
        where: meta.csv prefix filters, e.g. {"device": "GE Logiq 5"}.
        split_seed: Seed of the train/val/test split, which never leaves the node.
        max_message_mb: Largest request the node accepts.
        boxes: Absolute path of boxes.csv (box labels from a file).
        image_labels: Absolute path of labels.csv (image-level labels from a file).
        labels_from_masks: Weak labels derived from the masks (benchmarks only).
        share_head: LC-Fed: whether this node's segmentation head may be sent to the other
            sites for their calibration (its owner's choice, ``--no-share-head``).
        require_secure_aggregation: Refuse plain train requests, so no coordinator ever
            receives this node's update unmasked.
        share_personalized: The owner allows this node's personalized model (IOP-FL's
            running mix) to leave it, to be routed over on a new site. Off by default.
        syft_retention_s: How long the node's Syft store keeps each served call's request
            and reply (models and updates) before deleting them.
        device: Where the node trains, scores and predicts: "auto" (the first CUDA GPU
            if PyTorch sees one, else the CPU), "cpu", "cuda" or "cuda:N". Resolved once,
            when the node's runtime is created.
    """

    name: str
    data: str
    labels: str
    workdir: str
    limit: int | None = None
    group_by: str | None = "auto"
    where: dict[str, str] = field(default_factory=dict)
    split_seed: int = 0
    max_message_mb: int = 256
    boxes: str | None = None
    image_labels: str | None = None
    labels_from_masks: bool = False
    share_head: bool = True
    require_secure_aggregation: bool = False
    share_personalized: bool = False
    syft_retention_s: float = DEFAULT_RETENTION_S
    device: str = "auto"

    @property
    def path(self) -> Path:
        return Path(self.workdir) / "node.json"

    def save(self) -> None:
        atomic_write(self.path, json.dumps(asdict(self), indent=2, sort_keys=True).encode())

    @classmethod
    def load(cls, workdir: Path) -> NodeConfig:
        data: dict[str, Any] = json.loads((Path(workdir) / "node.json").read_text())
        return cls(**data)
