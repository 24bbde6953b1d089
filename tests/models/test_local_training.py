from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fedseg.models.augment import augment_batch
from fedseg.models.errors import ModelError
from fedseg.models.local_training import (
    LocalTrainer,
    TrainConfig,
    arrays_to_state,
    evaluate,
    predict,
    state_to_arrays,
)
from fedseg.models.overlay import overlay_png
from fedseg.models.unet import UNet, UNetConfig, build_model
from squares import squares

torch.set_num_threads(1)

TINY = UNetConfig(width=4, depth=2, groups=2)


def _model(seed: int) -> UNet:
    torch.manual_seed(seed)
    return build_model(TINY)


def test_same_seed_same_weights() -> None:
    images, masks = squares(6, 0)
    init = _model(0).state_dict()
    runs = []
    for _ in range(2):
        model = build_model(TINY)
        model.load_state_dict(init)
        # Global RNG is scrambled in between to show the round does not read it.
        torch.manual_seed(len(runs) + 100)
        result = LocalTrainer(model, TrainConfig(batch_size=4, local_epochs=1.5)).train_round(
            images, masks, seed=7
        )
        runs.append(model.state_dict())
    assert result.steps == 3 and result.n_samples == 6  # ceil(1.5 * 6 / 4)
    assert set(result.parts) == {"dice", "bce"} and result.mean_loss > 0
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in init)
    assert not all(torch.equal(init[k], runs[0][k]) for k in init)


def test_rounds_improve_dice_onsquares() -> None:
    images, masks = squares(16, 0)
    val_images, val_masks = squares(8, 1)
    # Init seed fixed: with only 4 head channels some inits start with every head
    # weight negative, a dead-ReLU mode that takes far longer than 3 rounds to leave.
    model = _model(3)
    before = evaluate(model, val_images, val_masks)
    trainer = LocalTrainer(model, TrainConfig(lr=5e-3, batch_size=4, local_epochs=2))
    for r in range(3):
        trainer.train_round(images, masks, seed=r)
    after = evaluate(model, val_images, val_masks)
    assert after["n"] == 8 and model.training
    assert after["loss"] < before["loss"]
    assert after["dice"] > before["dice"] + 0.4 and after["dice"] > 0.8
    assert 0 < after["iou"] <= after["dice"]


def test_hooks_restrict_training() -> None:
    class HeadOnly(LocalTrainer):
        def before_round(self) -> None:
            self.steps: list[int] = []

        def parameters_to_train(self) -> list[torch.nn.Parameter]:
            return list(self.model.head.parameters())

        def after_step(self, step: int) -> None:
            self.steps.append(step)

    images, masks = squares(4, 0)
    model = _model(0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = HeadOnly(model, TrainConfig(batch_size=2, augment=False))
    trainer.train_round(images, masks, seed=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, init[k])}
    assert changed == {"head.weight", "head.bias"} and trainer.steps == [0, 1]


def test_train_config_validation() -> None:
    cfg = TrainConfig(local_epochs=0.5, augment=False)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ModelError, match=r"\['lrr'\]"):
        TrainConfig.from_dict({"lrr": 0.1})
    for bad, field in [({"lr": 0}, "lr"), ({"batch_size": 0}, "batch_size"), ({"batch_size": 2.0}, "batch_size"),
                       ({"local_epochs": -1}, "local_epochs"), ({"augment": 1}, "augment"),
                       ({"grad_clip": float("nan")}, "grad_clip"), ({"threads": 0}, "threads")]:
        with pytest.raises(ModelError, match=field):
            TrainConfig(**bad)


def test_train_round_shape_check() -> None:
    trainer = LocalTrainer(_model(0), TrainConfig())
    with pytest.raises(ModelError, match=r"\(4, 3, 32, 32\).*\(3, 1, 32, 32\)"):
        trainer.train_round(torch.zeros(4, 3, 32, 32), torch.zeros(3, 1, 32, 32), seed=0)


def test_arrays_round_trip_and_rejections() -> None:
    source, target = _model(0), _model(1)
    arrays = state_to_arrays(source)
    assert all(a.dtype == np.float32 and a.flags["C_CONTIGUOUS"] for a in arrays.values())
    arrays_to_state(target, arrays)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    # The arrays are copies: training the source later cannot change what was sent.
    with torch.no_grad():
        source.head.bias.add_(1.0)
    assert arrays["head.bias"][0] != source.head.bias[0].item()

    missing = dict(arrays)
    del missing["head.weight"]
    with pytest.raises(ModelError, match="missing key 'head.weight'"):
        arrays_to_state(target, missing)
    with pytest.raises(ModelError, match="unexpected key 'extra'"):
        arrays_to_state(target, {**arrays, "extra": np.zeros(1, np.float32)})
    wrong = {**arrays, "head.weight": np.zeros((2, 4, 1, 1), np.float32)}
    before = target.head.bias.clone()
    with pytest.raises(ModelError, match=r"'head.weight'.*expected \(1, 4, 1, 1\), got \(2, 4, 1, 1\)"):
        arrays_to_state(target, {**wrong, "head.bias": np.full(1, 5.0, np.float32)})
    assert torch.equal(target.head.bias, before)  # nothing loaded on failure


def test_augment_binary_and_deterministic() -> None:
    images, masks = squares(4, 0)
    images = images.float() / 255
    out = [augment_batch(images, masks, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    (i1, m1), (i2, m2), (i3, m3) = out
    assert torch.equal(i1, i2) and torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    assert i1.shape == images.shape and m1.shape == masks.shape and m1.dtype == masks.dtype
    assert set(m1.unique().tolist()) <= {0.0, 1.0} and m1.sum() > 0
    assert i1.min() >= 0 and i1.max() <= 1
    # The global stream is untouched by augmentation.
    torch.manual_seed(0)
    augment_batch(images, masks, torch.Generator().manual_seed(5))
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_augment_moves_image_and_masks_together() -> None:
    """The image and every mask channel are warped alike: a box drawn as a mask still bounds its lesion."""
    lesion = torch.zeros(16, 1, 32, 32)
    lesion[:, :, 6:14, 18:28] = 1
    box = torch.zeros_like(lesion)
    box[:, :, 4:16, 16:30] = 1
    image = lesion.repeat(1, 3, 1, 1)  # the lesion is the image's bright part
    out, masks = augment_batch(image, torch.cat([lesion, box], dim=1), torch.Generator().manual_seed(3))
    moved, moved_box = masks[:, :1], masks[:, 1:]
    assert not torch.equal(moved, lesion)  # the geometry did change
    # Jitter maps each image's values monotonically, so its brightest pixels are the lesion's.
    brightest = out[:, :1] > out[:, :1].amin(dim=(-2, -1), keepdim=True) + 1e-6
    assert torch.equal(brightest, moved.bool())
    assert torch.all(moved <= moved_box)
    # A warp, not a redraw: the lesion keeps about its area (scale 0.9-1.1, minus the borders).
    area = moved.sum(dim=(1, 2, 3)) / lesion[0].sum()
    assert area.min() > 0.7 and area.max() < 1.3


def test_augment_flips_and_rotates_in_both_directions() -> None:
    """Over many samples, a lesion in the top-left quadrant lands in every quadrant."""
    mask = torch.zeros(64, 1, 32, 32)
    mask[:, :, 4:10, 4:10] = 1
    _, moved = augment_batch(mask.repeat(1, 3, 1, 1), mask, torch.Generator().manual_seed(0))
    ys, xs = (torch.arange(32.0)[:, None] * moved[:, 0]).sum((1, 2)), (torch.arange(32.0) * moved[:, 0]).sum((1, 2))
    cy, cx = ys / moved[:, 0].sum((1, 2)), xs / moved[:, 0].sum((1, 2))
    quadrants = {(bool(y > 16), bool(x > 16)) for y, x in zip(cy, cx)}
    assert quadrants == {(False, False), (False, True), (True, False), (True, True)}


def test_predict_and_overlay(tmp_path) -> None:
    images, masks = squares(3, 0)
    model = _model(0).train()
    pred = predict(model, images, batch_size=2)
    assert pred.shape == (3, 1, 32, 32) and pred.dtype == torch.bool and model.training
    path = tmp_path / "overlay.png"
    truth = masks[0].bool()
    overlay_png(images[0], pred[0], truth, path)
    png = np.asarray(Image.open(path))
    # Three panels of 32 px enlarged 8 times (256 px), 6 px apart, under an 18 px header of labels.
    assert png.shape == (18 + 256, 3 * 256 + 2 * 6, 3)
    image, truth_panel, pred_panel = (png[18:, i * 262: i * 262 + 256] for i in range(3))
    enlarged = images[0].numpy().transpose(1, 2, 0).repeat(8, axis=0).repeat(8, axis=1)
    assert np.array_equal(image, enlarged)
    inside = truth[0].numpy().repeat(8, axis=0).repeat(8, axis=1)
    assert (truth_panel[inside] == [0, 220, 64]).all(axis=1).any() and not np.array_equal(truth_panel, image)  # truth outlined
    assert np.array_equal(truth_panel[~inside], image[~inside])  # nothing drawn outside the truth
    predicted = pred[0, 0].numpy().repeat(8, axis=0).repeat(8, axis=1)
    assert np.array_equal(pred_panel[~predicted], image[~predicted])
    overlay_png(images[0], pred[0], None, path)
    assert np.asarray(Image.open(path)).shape == (18 + 256, 2 * 256 + 6, 3)  # image and prediction only
    with pytest.raises(ModelError, match=r"\(1, 16, 16\)"):
        overlay_png(images[0], pred[0, :, :16, :16], None, path)
