"""What test-time routing is compared with on a new site, and the rule that keeps it or not.

IOP-FL's routing (:mod:`fedseg.models.routing`) is only worth its cost if it beats simpler
ways to meet an unseen site with unlabelled images. This module builds them from the same
routing set, on the same images:

- each expert with its BatchNorm statistics recomputed on the site (AdaBN; the global
  model's is the usual AdaBN baseline);
- the uniform average of the experts' weights, with the site's statistics;
- TENT (Wang et al., ICLR 2021): entropy minimisation on a model's norm affine
  parameters alone, here the global model's.

It also holds the label-free rule by which ``fedseg adapt`` keeps the adapted routing or
falls back to routing before adaptation (:func:`keeps_adaptation`): the adaptation
objective itself (entropy) cannot judge the adaptation, since adapting always lowers it,
so the rule asks instead whether adaptation carried the routed model's predictions far
from the experts' majority vote, a reference it never trained on.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from fedseg.models.errors import ModelError
from fedseg.models.local_training import arrays_to_state, predict
from fedseg.models.metrics import dice_per_image
from fedseg.models.routing import AdaptConfig, AdaptResult, adapt, adapt_norm_statistics, has_batch_norm
from fedseg.models.unet import UNet, UNetConfig, build_model

__all__ = ["keeps_adaptation", "mask_agreement", "majority_vote", "on_site", "tent", "uniform_average"]

Arrays = Mapping[str, np.ndarray]
_NORMS = (nn.BatchNorm2d, nn.GroupNorm)


def on_site(config: UNetConfig, arrays: Arrays, images: torch.Tensor, batch_size: int = 16,
            device: torch.device | str = "cpu") -> UNet:
    """A plain U-Net from ``arrays``, on ``device``, with its BatchNorm statistics set to the site's (AdaBN).

    A GroupNorm model keeps no statistics and is returned as it is.
    """
    model = build_model(config)
    arrays_to_state(model, dict(arrays))
    model.to(device)
    if has_batch_norm(model):
        adapt_norm_statistics(model, images, batch_size)
    return model


def uniform_average(experts: Sequence[tuple[str, Arrays]]) -> dict[str, np.ndarray]:
    """Every tensor averaged over the experts with equal weights.

    Raises:
        ModelError: If there is no expert or they differ in names.
    """
    if not experts:
        raise ModelError("uniform_average needs at least one expert")
    keys = set(experts[0][1])
    for name, arrays in experts:
        if set(arrays) != keys:
            raise ModelError(f"uniform_average: expert {name} differs in tensors {sorted(set(arrays) ^ keys)[:3]}")
    return {k: np.mean([np.asarray(a[k], np.float64) for _, a in experts], axis=0).astype(np.float32) for k in keys}


def tent(model: nn.Module, images: torch.Tensor, config: AdaptConfig, seed: int) -> AdaptResult:
    """TENT: minimizes the prediction entropy over the model's norm affine parameters alone.

    Everything else is frozen (``requires_grad`` off). Same epochs, batch size, learning
    rate, entropy and foreground prior as routing's adaptation, without its consistency
    and shape terms: TENT without the prior erases lesions just as routing does;
    like routing, the model ends with the site's BatchNorm statistics.

    Args:
        model: A plain U-Net, adapted in place.
        images: The site's images ``(N, C, H, W)``.
        config: Routing's adaptation settings.
        seed: Seeds the batch order.
    """
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in norm_params)
    return adapt(model, images, replace(config, lambda_cons=0.0, lambda_shape=0.0), seed)


def majority_vote(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pixels that more than half of the predicted masks ``(N, 1, H, W)`` call foreground."""
    if not masks:
        raise ModelError("majority_vote needs at least one mask")
    return torch.stack([m.float() for m in masks]).mean(dim=0) > 0.5  # (N, 1, H, W)


def mask_agreement(prediction: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-image foreground Dice between two predicted masks ``(N, 1, H, W)``; no labels."""
    return dice_per_image(prediction, reference).mean().item()


def keeps_adaptation(
    adapted: nn.Module, before: nn.Module, vote: torch.Tensor, images: torch.Tensor, tolerance: float, batch_size: int = 16
) -> tuple[bool, dict[str, float]]:
    """The label-free rule: keep the adapted routing unless adapting moved its predictions
    more than ``tolerance`` (mean per-image Dice) away from the experts' majority vote.

    Routing before adaptation mixes the experts and so sits close to their vote; adapting
    always moves it some way off. Collapse (lesions erased or flooded) moves it far.

    Args:
        adapted: The routed model after adaptation.
        before: The routed model before adaptation, with the site's statistics.
        vote: :func:`majority_vote` of the experts' predictions, each with the site's statistics.
        images: The site's images.
        tolerance: :attr:`AdaptConfig.keep_tolerance`, fixed in advance.
        batch_size: Images per forward pass.

    Returns:
        Whether to keep the adapted model, and both agreements ("adapted", "before").
    """
    scores = {"adapted": mask_agreement(predict(adapted, images, batch_size), vote),
              "before": mask_agreement(predict(before, images, batch_size), vote)}
    return scores["adapted"] >= scores["before"] - tolerance, scores
