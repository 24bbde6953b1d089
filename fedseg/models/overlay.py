"""PNG overlays of predicted and ground-truth masks for visual inspection."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from fedseg.models.errors import ModelError

__all__ = ["overlay_png"]

_PRED_RGB = np.array([255, 64, 0], dtype=np.float32)  # orange: prediction fill + outline
_TRUE_RGB = np.array([0, 255, 64], dtype=np.uint8)  # green: ground-truth outline
_PRED_ALPHA = 0.35


def _outline(mask: np.ndarray) -> np.ndarray:
    # A foreground pixel is on the outline if any 4-neighbour is background;
    # padding with False makes the image border count as background.
    m = np.pad(mask, 1)
    interior = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~interior


def overlay_png(
    image: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor | None,
    path: str | os.PathLike[str],
) -> None:
    """Writes an RGB PNG: prediction filled and outlined in orange, truth outlined in green.

    Args:
        image: ``(C, H, W)`` uint8 with C in {1, 3}.
        pred: Predicted mask ``(1, H, W)`` bool.
        target: Ground-truth mask ``(1, H, W)`` bool, or None to draw only the prediction.
        path: Output file.

    Raises:
        ModelError: On shapes that do not match the contract.
    """
    img = np.asarray(torch.as_tensor(image).detach().cpu())
    masks = [pred] if target is None else [pred, target]
    if img.ndim != 3 or img.shape[0] not in (1, 3) or any(
        tuple(m.shape) != (1, *img.shape[1:]) for m in masks
    ):
        raise ModelError(
            f"overlay_png expects image (C, H, W) with C in {{1, 3}} and masks (1, H, W), got image "
            f"{tuple(img.shape)}, pred {tuple(pred.shape)}, "
            f"target {None if target is None else tuple(target.shape)}"
        )
    rgb = np.repeat(img, 3 // img.shape[0], axis=0).transpose(1, 2, 0).astype(np.float32)  # (H, W, 3)
    p = np.asarray(torch.as_tensor(pred).detach().cpu(), dtype=bool)[0]  # (H, W)
    rgb[p] = (1 - _PRED_ALPHA) * rgb[p] + _PRED_ALPHA * _PRED_RGB
    rgb[_outline(p)] = _PRED_RGB
    out = rgb.round().clip(0, 255).astype(np.uint8)
    if target is not None:
        # Drawn last so the truth outline stays visible where the two coincide.
        out[_outline(np.asarray(torch.as_tensor(target).detach().cpu(), dtype=bool)[0])] = _TRUE_RGB
    Image.fromarray(out).save(path, format="PNG")
