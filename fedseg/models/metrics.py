"""Foreground segmentation metrics, one value per image (reduce separately)."""

from __future__ import annotations

import torch

from fedseg.models.errors import ModelError

__all__ = ["assd_per_image", "dice_per_image", "hd95_per_image", "iou_per_image", "surface_distances_per_image"]


def _binary(pred: torch.Tensor, target: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.ndim != 4 or pred.shape[1] != 1 or pred.shape != target.shape:
        raise ModelError(
            f"{name} expects pred and target (B, 1, H, W) of equal shape, "
            f"got pred {tuple(pred.shape)} and target {tuple(target.shape)}"
        )
    # Anything non-bool is read as 0/1 (or a probability) and thresholded at 0.5.
    p = pred if pred.dtype == torch.bool else pred > 0.5
    t = target if target.dtype == torch.bool else target > 0.5
    return p, t


def _counts(pred: torch.Tensor, target: torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
    p, t = _binary(pred, target, name)
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


def _surface(mask: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates ``(M, 2)`` of a mask's boundary: foreground pixels with a
    background 4-neighbour (or on the image border)."""
    m = mask.float()[None, None]  # (1, 1, H, W)
    # Erosion as a min-pool with a cross element; outside the image counts as background.
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    inner = torch.minimum(
        torch.minimum(padded[..., :-2, 1:-1], padded[..., 2:, 1:-1]),
        torch.minimum(padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]),
    )
    edge = (m > 0) & (inner < 1)
    return edge[0, 0].nonzero().float()


def surface_distances_per_image(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """ASSD and HD95 per image, in pixels, from one pass over the boundaries.

    For each image the boundary pixels of both masks are found (:func:`_surface`) and each
    one's Euclidean distance to the nearest boundary pixel of the other mask is taken,
    giving two directed sets, prediction to truth and truth to prediction.

    - ``assd``: the mean of both sets together (average symmetric surface distance).
    - ``hd95``: MONAI's 95th-percentile Hausdorff distance, the larger of the two directed
      sets' 95th percentiles (linear interpolation between order statistics, as
      ``numpy.percentile``). Unlike the plain Hausdorff distance, a few stray pixels
      do not dominate it.

    Both masks empty gives 0 for both (nothing to find, nothing found); exactly one
    empty gives the image diagonal, the largest distance possible, so a missed or
    hallucinated lesion is penalized instead of silently dropped.

    Args:
        pred: Predicted mask ``(B, 1, H, W)``, bool or 0/1.
        target: Ground-truth mask ``(B, 1, H, W)``, bool or 0/1.

    Returns:
        ``{"assd": (B,), "hd95": (B,)}`` float32, >= 0; lower is better.

    Raises:
        ModelError: If the shapes are not both ``(B, 1, H, W)`` and equal.
    """
    return _surface_distances(pred, target, "surface_distances_per_image")


def _surface_distances(pred: torch.Tensor, target: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    p, t = _binary(pred, target, name)
    h, w = p.shape[-2:]
    worst = float((h**2 + w**2) ** 0.5)
    assd = torch.empty(p.shape[0], dtype=torch.float32)
    hd95 = torch.empty(p.shape[0], dtype=torch.float32)
    for i in range(p.shape[0]):
        sp, st = _surface(p[i, 0].cpu()), _surface(t[i, 0].cpu())
        if len(sp) == 0 or len(st) == 0:
            assd[i] = hd95[i] = 0.0 if len(sp) == len(st) else worst
            continue
        d = torch.cdist(sp, st)  # (|Sp|, |St|)
        to_truth, to_pred = d.min(dim=1).values, d.min(dim=0).values  # (|Sp|,), (|St|,)
        assd[i] = (to_truth.sum() + to_pred.sum()) / (len(sp) + len(st))
        hd95[i] = torch.maximum(torch.quantile(to_truth, 0.95), torch.quantile(to_pred, 0.95))
    return {"assd": assd, "hd95": hd95}


def assd_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Average symmetric surface distance, in pixels, per image; see :func:`surface_distances_per_image`."""
    return _surface_distances(pred, target, "assd_per_image")["assd"]


def hd95_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """95th-percentile Hausdorff distance, in pixels, per image; see :func:`surface_distances_per_image`."""
    return _surface_distances(pred, target, "hd95_per_image")["hd95"]
