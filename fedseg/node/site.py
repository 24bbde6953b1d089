"""The node's site as its settings describe it: indexed, validated and split.

``fedseg node start`` opens it before the node writes its invite, and the node's server
process opens it again at its first call; one function serves both, so a node that
would fail its calls never starts.
"""
from __future__ import annotations

from pathlib import Path

from .config import NodeConfig
from .datasets import LabelKind, SiteIndex, Splits, index_site, make_splits

__all__ = ["open_site"]


def open_site(config: NodeConfig) -> tuple[SiteIndex, Splits]:
    """Indexes the node's data folder and makes its train/val/test splits.

    Args:
        config: The node's settings.

    Returns:
        The validated index and its splits.

    Raises:
        DatasetError: If the folder, its labels or its splits are not usable, naming the
            file, column or setting at fault.
    """
    index = index_site(
        Path(config.data), LabelKind(config.labels), config.limit, config.group_by, config.where or None,
        boxes=_path(config.boxes), image_labels=_path(config.image_labels), labels_from_masks=config.labels_from_masks,
        sample=config.sample, sample_seed=config.sample_seed,
    )
    return index, make_splits(index, config.split_seed)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
