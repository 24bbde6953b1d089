"""Joint image/mask augmentation on ``torchvision.transforms.v2`` tv_tensors.

Geometry is applied identically to the image, the mask and (if passed) boxes,
because v2 dispatches on the tv_tensor type; masks are resampled with nearest
interpolation so they stay binary. Intensity changes touch the image only.
"""

from __future__ import annotations

from typing import Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from fedseg.models.errors import ModelError

__all__ = ["augment_batch", "make_augment"]


def make_augment() -> Callable[..., object]:
    """Builds the training augmentation.

    The returned callable takes any structure of tv_tensors, e.g.
    ``aug(tv_tensors.Image(img), tv_tensors.Mask(mask))`` or with an extra
    ``tv_tensors.BoundingBoxes``, and returns the same structure. It draws from
    the global torch RNG; :func:`augment_batch` makes that deterministic.

    Returns:
        A ``v2.Compose`` of flips, a small affine and brightness/contrast jitter.
    """
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomAffine(degrees=15, translate=(0.05, 0.05), scale=(0.9, 1.1)),
            # v2 colour ops have no Mask/BoundingBoxes kernels and pass them through.
            v2.ColorJitter(brightness=0.2, contrast=0.2),
            # Affine can push boxes past the border; keep them inside the canvas.
            v2.ClampBoundingBoxes(),
        ]
    )


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augments each sample independently, deterministically given ``generator``.

    Args:
        images: ``(B, C, H, W)`` float in [0, 1].
        masks: ``(B, 1, H, W)`` with values in {0, 1}.
        generator: Source of one seed per sample; advanced by B draws.

    Returns:
        ``(images, masks)`` with the input shapes and dtypes; masks stay in {0, 1}.

    Raises:
        ModelError: On mismatched or non-4D shapes, or non-float images.
    """
    if images.ndim != 4 or masks.ndim != 4 or masks.shape[1] != 1 or (
        images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]
    ):
        raise ModelError(
            f"augment_batch expects images (B, C, H, W) and masks (B, 1, H, W), "
            f"got images {tuple(images.shape)} and masks {tuple(masks.shape)}"
        )
    if not images.is_floating_point():
        raise ModelError(f"augment_batch expects float images in [0, 1], got dtype {images.dtype}")
    aug = make_augment()
    seeds = torch.randint(0, 2**62, (images.shape[0],), generator=generator).tolist()
    out_images, out_masks = [], []
    for image, mask, seed in zip(images, masks, seeds):
        # v2 transforms only use the global RNG; fork it so callers' streams are untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image, mask = aug(tv_tensors.Image(image), tv_tensors.Mask(mask))
        out_images.append(image.as_subclass(torch.Tensor))
        out_masks.append(mask.as_subclass(torch.Tensor))
    return torch.stack(out_images), torch.stack(out_masks)  # (B, C, H, W), (B, 1, H, W)
