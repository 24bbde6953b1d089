"""Foreground segmentation metrics, one value per image (reduce separately)."""

from __future__ import annotations

import torch

from fedseg.models.errors import ModelError

__all__ = ["dice_per_image", "iou_per_image"]


def _counts(pred: torch.Tensor, target: torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
    if pred.ndim != 4 or pred.shape[1] != 1 or pred.shape != target.shape:
        raise ModelError(
            f"{name} expects pred and target (B, 1, H, W) of equal shape, "
            f"got pred {tuple(pred.shape)} and target {tuple(target.shape)}"
        )
    # Anything non-bool is read as 0/1 (or a probability) and thresholded at 0.5.
    p = pred if pred.dtype == torch.bool else pred > 0.5
    t = target if target.dtype == torch.bool else target > 0.5
    inter = (p & t).sum(dim=(1, 2, 3)).float()  # (B,)
    return inter, p.sum(dim=(1, 2, 3)).float(), t.sum(dim=(1, 2, 3)).float()


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice ``2|P∩T| / (|P|+|T|)`` of the foreground, per image.

    Both masks empty counts as a perfect 1.0 (nothing to find, nothing found);
    exactly one empty gives 0.0.

    Args:
        pred: Predicted mask ``(B, 1, H, W)``, bool or 0/1.
        target: Ground-truth mask ``(B, 1, H, W)``, bool or 0/1.

    Returns:
        ``(B,)`` float32 in [0, 1].

    Raises:
        ModelError: If the shapes are not both ``(B, 1, H, W)`` and equal.
    """
    inter, np_, nt = _counts(pred, target, "dice_per_image")
    denom = np_ + nt
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))


def iou_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Intersection over union ``|P∩T| / |P∪T|`` of the foreground, per image.

    Same empty-mask convention as :func:`dice_per_image`.

    Args:
        pred: Predicted mask ``(B, 1, H, W)``, bool or 0/1.
        target: Ground-truth mask ``(B, 1, H, W)``, bool or 0/1.

    Returns:
        ``(B,)`` float32 in [0, 1].

    Raises:
        ModelError: If the shapes are not both ``(B, 1, H, W)`` and equal.
    """
    inter, np_, nt = _counts(pred, target, "iou_per_image")
    union = np_ + nt - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
