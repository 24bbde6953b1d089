"""What routing is compared with on a new site (TENT, experts on the site, their average) and the keep rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg.models.errors import ModelError
from fedseg.models.local_training import LocalTrainer, TrainConfig, state_to_arrays
from fedseg.models.routing import AdaptConfig, entropy_loss
from fedseg.models.test_time import keeps_adaptation, majority_vote, mask_agreement, on_site, tent, uniform_average
from fedseg.models.unet import UNetConfig, build_model

from squares import squares

torch.set_num_threads(1)

BATCH = UNetConfig(width=4, depth=2, groups=2, norm="batch")


def test_tent_trains_only_the_norm_affine_parameters_and_lowers_entropy() -> None:
    images, masks = squares(24, seed=0)
    torch.manual_seed(0)
    model = build_model(BATCH)
    LocalTrainer(model, TrainConfig(lr=3e-3, batch_size=8, local_epochs=4, augment=False)).train_round(images, masks, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    site = on_site(BATCH, state_to_arrays(model), images)
    with torch.no_grad():
        site.eval()
        before = entropy_loss(site(images.float() / 255)).item()
    result = tent(model, images, AdaptConfig(epochs=3, batch_size=8, lr=1e-2), seed=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    norms = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) for p in ("weight", "bias", "running_mean", "running_var")}
    # Convs and the head stay the global model's; only norm layers move (and take the site's statistics).
    assert changed and changed <= norms and any(k.endswith(".weight") for k in changed)
    assert result.parts["consistency"] == 0.0
    with torch.no_grad():
        model.eval()
        assert entropy_loss(model(images.float() / 255)).item() < before


def test_uniform_average_and_site_statistics() -> None:
    a = {"w": np.array([0.0, 2.0], np.float32)}
    b = {"w": np.array([4.0, 4.0], np.float32)}
    np.testing.assert_array_equal(uniform_average([("a", a), ("b", b)])["w"], [2.0, 3.0])
    with pytest.raises(ModelError, match="expert b differs"):
        uniform_average([("a", a), ("b", {"v": b["w"]})])
    images, _ = squares(8, seed=3)
    torch.manual_seed(0)
    arrays = state_to_arrays(build_model(BATCH))
    site = on_site(BATCH, arrays, images)
    # The first BatchNorm now normalizes with the mean of its input over the site's images.
    with torch.no_grad():
        first = site.encoder[0][0](images.float() / 255).mean(dim=(0, 2, 3))
    torch.testing.assert_close(site.encoder[0][1].running_mean, first, rtol=1e-4, atol=1e-5)


class _Constant(torch.nn.Module):
    """Predicts one fixed mask for every image."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.where(mask, 10.0, -10.0))  # (1, 1, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1)


def test_the_keep_rule_keeps_small_moves_from_the_experts_and_falls_back_on_collapse() -> None:
    images = torch.rand(6, 1, 16, 16)
    blob = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    blob[..., 4:12, 4:12] = True
    smaller = torch.zeros_like(blob)
    smaller[..., 6:10, 6:10] = True
    nicked = blob.clone()
    nicked[..., 4, 4:6] = False  # 62 of the blob's 64 pixels: Dice 124/126 with it
    empty = torch.zeros_like(blob)
    # Two experts of three see the blob: the vote is the blob.
    vote = majority_vote([blob.expand(6, -1, -1, -1), blob.expand(6, -1, -1, -1), empty.expand(6, -1, -1, -1)])
    assert mask_agreement(vote, blob.expand(6, -1, -1, -1)) == 1.0
    # Adaptation that collapses the prediction to a quarter of the lesion is not kept ...
    keep, scores = keeps_adaptation(_Constant(smaller), _Constant(blob), vote, images, tolerance=0.05)
    assert not keep and scores["before"] == 1.0 and scores["adapted"] == pytest.approx(0.4)
    # ... one that moves a little off the vote is, within the tolerance only ...
    keep, scores = keeps_adaptation(_Constant(nicked), _Constant(blob), vote, images, tolerance=0.05)
    assert keep and scores["adapted"] == pytest.approx(124 / 126)
    assert not keeps_adaptation(_Constant(nicked), _Constant(blob), vote, images, tolerance=0.01)[0]
    # ... and one that recovers the experts' consensus always is.
    assert keeps_adaptation(_Constant(blob), _Constant(smaller), vote, images, tolerance=0.0)[0]
