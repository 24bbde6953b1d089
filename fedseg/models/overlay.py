"""PNG overlays for a person to read: the image, the truth and the prediction side by side, enlarged."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from fedseg.models.errors import ModelError

__all__ = ["MIN_PANEL", "overlay_png"]

#: Panels are enlarged (nearest neighbour, by a whole factor) to at least this side: a
#: 64 px training image is too small to judge a boundary by eye.
MIN_PANEL = 256
_PRED_RGB = np.array([255, 96, 0], dtype=np.float32)  # orange
_TRUE_RGB = np.array([0, 220, 64], dtype=np.float32)  # green
_FILL_ALPHA = 0.35
_OUTLINE_PX = 2
_GAP = 6
_HEADER = 18


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Foreground pixels within ``width`` 4-neighbour steps of the background (the image border counts as background)."""
    interior = mask
    for _ in range(width):
        m = np.pad(interior, 1)
        interior = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:] & interior
    return mask & ~interior


def _painted(rgb: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """The image with the mask filled translucently and outlined in the colour. ``rgb (H, W, 3)`` float32."""
    out = rgb.copy()
    out[mask] = (1 - _FILL_ALPHA) * out[mask] + _FILL_ALPHA * colour
    out[_outline(mask, _OUTLINE_PX)] = colour
    return out


def _as_array(t: torch.Tensor | np.ndarray, dtype: type | None = None) -> np.ndarray:
    return np.asarray(torch.as_tensor(t).detach().cpu(), dtype=dtype)


def overlay_png(
    image: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor | None,
    path: str | os.PathLike[str],
) -> None:
    """Writes one PNG of labelled panels: the image, the truth (green) and the prediction (orange).

    Each mask is drawn on its own copy of the image, filled translucently and outlined, so
    neither hides the other. Panels are enlarged by a whole factor to at least
    :data:`MIN_PANEL` pixels, each pixel a block, so nothing is smoothed away.

    Args:
        image: ``(C, H, W)`` uint8 with C in {1, 3}.
        pred: Predicted mask ``(1, H, W)`` bool.
        target: Ground-truth mask ``(1, H, W)`` bool, or None for image and prediction only.
        path: Output file.

    Raises:
        ModelError: On shapes that do not match the contract.
    """
    img = _as_array(image)
    masks = [pred] if target is None else [pred, target]
    if img.ndim != 3 or img.shape[0] not in (1, 3) or any(tuple(m.shape) != (1, *img.shape[1:]) for m in masks):
        raise ModelError(
            f"overlay_png expects image (C, H, W) with C in {{1, 3}} and masks (1, H, W), got image "
            f"{tuple(img.shape)}, pred {tuple(pred.shape)}, "
            f"target {None if target is None else tuple(target.shape)}"
        )
    scale = max(1, -(-MIN_PANEL // max(img.shape[1:])))

    def enlarge(a: np.ndarray) -> np.ndarray:
        return a.repeat(scale, axis=0).repeat(scale, axis=1)

    rgb = enlarge(np.repeat(img, 3 // img.shape[0], axis=0).transpose(1, 2, 0).astype(np.float32))  # (H*s, W*s, 3)
    panels = [("image", rgb)]
    if target is not None:
        panels.append(("truth", _painted(rgb, enlarge(_as_array(target, bool)[0]), _TRUE_RGB)))
    panels.append(("prediction", _painted(rgb, enlarge(_as_array(pred, bool)[0]), _PRED_RGB)))
    h, w = rgb.shape[:2]
    sheet = np.zeros((_HEADER + h, len(panels) * w + (len(panels) - 1) * _GAP, 3), dtype=np.uint8)
    for i, (_, panel) in enumerate(panels):
        sheet[_HEADER:, i * (w + _GAP): i * (w + _GAP) + w] = panel.round().clip(0, 255).astype(np.uint8)
    picture = Image.fromarray(sheet)
    draw = ImageDraw.Draw(picture)
    for i, (label, _) in enumerate(panels):
        draw.text((i * (w + _GAP) + 4, 3), label, fill=(255, 255, 255))
    picture.save(path, format="PNG")
