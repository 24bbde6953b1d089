"""Segmentation losses that return named parts for logging."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedseg.models.errors import ModelError

__all__ = ["DiceBCELoss", "Losses"]


@dataclass
class Losses:
    """A loss to back-propagate plus its named, detached parts.

    Attributes:
        total: Scalar tensor with grad; the only thing ``backward()`` sees.
        parts: Unweighted component values (e.g. ``{"dice": .., "bce": ..}``)
            as plain floats, so logging never holds on to the graph.
    """

    total: torch.Tensor
    parts: dict[str, float]


class DiceBCELoss(nn.Module):
    """``lambda_dice * soft_dice_loss + lambda_bce * bce`` for binary masks.

    The soft Dice is computed per sample over its pixels and then averaged over
    the batch, so a large lesion in one image cannot drown a small one in another.

    Args:
        lambda_dice: Weight of ``1 - soft Dice``; >= 0.
        lambda_bce: Weight of the mean pixel-wise binary cross-entropy; >= 0.
        smooth: Added to numerator and denominator so empty masks give Dice 1
            and gradients stay finite; > 0.

    Raises:
        ModelError: If a weight is negative, both are zero, or smooth <= 0.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_bce < 0 or lambda_dice + lambda_bce == 0:
            raise ModelError(
                f"DiceBCELoss needs non-negative weights, not both zero; "
                f"got lambda_dice={lambda_dice}, lambda_bce={lambda_bce}"
            )
        if smooth <= 0:
            raise ModelError(f"DiceBCELoss.smooth must be > 0, got {smooth}")
        self.lambda_dice = lambda_dice
        self.lambda_bce = lambda_bce
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> Losses:
        """Computes the loss.

        Args:
            logits: Raw scores ``(B, 1, H, W)``.
            target: Foreground mask ``(B, 1, H, W)``, values in {0, 1}.

        Returns:
            :class:`Losses` with parts ``{"dice", "bce"}`` (unweighted).

        Raises:
            ModelError: If the shapes are not both ``(B, 1, H, W)`` and equal.
        """
        if logits.ndim != 4 or logits.shape[1] != 1 or logits.shape != target.shape:
            raise ModelError(
                f"DiceBCELoss expects logits and target (B, 1, H, W) of equal shape, "
                f"got logits {tuple(logits.shape)} and target {tuple(target.shape)}"
            )
        target = target.to(logits.dtype)
        prob = torch.sigmoid(logits)
        inter = (prob * target).sum(dim=(1, 2, 3))  # (B,)
        denom = prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))  # (B,)
        dice = 1 - ((2 * inter + self.smooth) / (denom + self.smooth)).mean()
        # The logits form is numerically stable where sigmoid saturates.
        bce = F.binary_cross_entropy_with_logits(logits, target)
        total = self.lambda_dice * dice + self.lambda_bce * bce
        return Losses(total=total, parts={"dice": dice.item(), "bce": bce.item()})
