from __future__ import annotations

import pytest
import torch

from fedseg.models.errors import ModelError
from fedseg.models.losses import DiceBCELoss
from fedseg.models.metrics import assd_per_image, dice_per_image, hd95_per_image, iou_per_image, surface_distances_per_image

torch.set_num_threads(1)


def _mask(*boxes: tuple[int, int, int, int], size: int = 8) -> torch.Tensor:
    m = torch.zeros(1, size, size, dtype=torch.bool)
    for r0, r1, c0, c1 in boxes:
        m[0, r0:r1, c0:c1] = True
    return m


def test_dice_iou_hand_made_cases() -> None:
    square = _mask((0, 4, 0, 4))  # 16 px
    cases = [
        (square, square, 1.0, 1.0),  # perfect
        (square, _mask((4, 8, 4, 8)), 0.0, 0.0),  # disjoint
        (_mask(), _mask(), 1.0, 1.0),  # both empty
        (_mask(), square, 0.0, 0.0),  # empty prediction
        (square, _mask(), 0.0, 0.0),  # empty target
        (square, _mask((0, 4, 2, 6)), 0.5, 1 / 3),  # half overlap: 8 shared of 16 + 16
    ]
    pred = torch.stack([c[0] for c in cases])  # (6, 1, 8, 8)
    target = torch.stack([c[1] for c in cases]).float()  # 0/1 floats are accepted too
    dice, iou = dice_per_image(pred, target), iou_per_image(pred, target)
    assert dice.shape == iou.shape == (len(cases),)
    assert dice.tolist() == pytest.approx([c[2] for c in cases])
    assert iou.tolist() == pytest.approx([c[3] for c in cases])


def test_metrics_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\).*\(2, 1, 8, 4\)"):
        dice_per_image(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 4))
    with pytest.raises(ModelError, match=r"\(2, 8, 8\)"):
        iou_per_image(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8))


def test_loss_goes_to_zero_for_confident_correct_logits() -> None:
    target = torch.stack([_mask((0, 4, 0, 4)), _mask()]).float()  # (2, 1, 8, 8)
    loss = DiceBCELoss()
    values = [loss(scale * (2 * target - 1), target) for scale in (0.5, 2.0, 20.0)]
    totals = [v.total.item() for v in values]
    assert totals[0] > totals[1] > totals[2]
    assert totals[2] < 1e-3
    assert set(values[2].parts) == {"dice", "bce"}
    assert all(isinstance(x, float) for x in values[2].parts.values())


def test_loss_weights_and_gradient() -> None:
    target = torch.stack([_mask((0, 4, 0, 4))]).float()
    logits = torch.zeros_like(target, requires_grad=True)
    out = DiceBCELoss(lambda_dice=2.0, lambda_bce=0.5)(logits, target)
    assert out.total.item() == pytest.approx(2.0 * out.parts["dice"] + 0.5 * out.parts["bce"], rel=1e-6)
    out.total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_loss_shape_mismatch_and_bad_options_raise() -> None:
    with pytest.raises(ModelError, match=r"logits \(2, 1, 8, 8\) and target \(2, 1, 4, 8\)"):
        DiceBCELoss()(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 8))
    with pytest.raises(ModelError, match=r"\(2, 2, 8, 8\)"):
        DiceBCELoss()(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8))
    with pytest.raises(ModelError, match="lambda"):
        DiceBCELoss(lambda_dice=0, lambda_bce=0)
    with pytest.raises(ModelError, match="smooth"):
        DiceBCELoss(smooth=0)


def test_assd_hand_made_cases() -> None:
    size = 32
    masks = torch.zeros(5, 1, size, size, dtype=torch.bool)
    preds = torch.zeros_like(masks)
    # 0: a perfect prediction.
    masks[0, 0, 8:20, 8:20] = preds[0, 0, 8:20, 8:20] = True
    # 1: two one-pixel-wide vertical lines three columns apart: every boundary pixel is 3 px from the other line.
    masks[1, 0, 5:25, 10] = True
    preds[1, 0, 5:25, 13] = True
    # 2: nothing to find, nothing found.
    # 3: a lesion missed entirely; 4: a lesion invented on an empty image.
    masks[3, 0, 4:9, 4:9] = True
    preds[4, 0, 4:9, 4:9] = True
    assd = assd_per_image(preds, masks)
    diagonal = (2 * size**2) ** 0.5
    assert assd.tolist() == pytest.approx([0.0, 3.0, 0.0, diagonal, diagonal])


def test_assd_is_symmetric_and_grows_with_the_offset() -> None:
    target = torch.zeros(1, 1, 48, 48, dtype=torch.bool)
    target[..., 10:30, 10:30] = True
    shifted = [torch.roll(target, shifts=s, dims=-1) for s in (1, 2, 4, 8)]
    values = [assd_per_image(p, target).item() for p in shifted]
    assert values == sorted(values) and values[0] > 0
    assert assd_per_image(target, shifted[2]).item() == pytest.approx(values[2])
    with pytest.raises(ModelError, match="assd_per_image expects"):
        assd_per_image(target[:, :, :10], target)


def test_hd95_hand_made_cases() -> None:
    size = 32
    masks = torch.zeros(5, 1, size, size, dtype=torch.bool)
    preds = torch.zeros_like(masks)
    # 0: a line of 21 pixels against one pixel at its end. Line to pixel: distances
    # 0, 1, ..., 20, whose 95th percentile is at rank 0.95 * 20 = 19, so 19 (the plain
    # Hausdorff distance would be 20); pixel to line: 0. HD95 = max(19, 0).
    preds[0, 0, 5, 0:21] = True
    masks[0, 0, 5, 0] = True
    # 1: three pixels against the first: 0, 1, 2, 95th percentile between 1 and 2 at 0.9: 1.9.
    preds[1, 0, 0, 0:3] = True
    masks[1, 0, 0, 0] = True
    # 2: two one-pixel-wide lines three columns apart: every distance is 3.
    masks[2, 0, 5:25, 10] = True
    preds[2, 0, 5:25, 13] = True
    # 3: nothing to find, nothing found; 4: a lesion missed entirely (ASSD's conventions).
    masks[4, 0, 4:9, 4:9] = True
    diagonal = (2 * size**2) ** 0.5
    assert hd95_per_image(preds, masks).tolist() == pytest.approx([19.0, 1.9, 3.0, 0.0, diagonal])
    # Symmetric: the larger directed percentile, whichever mask is the prediction.
    assert hd95_per_image(masks, preds).tolist() == pytest.approx([19.0, 1.9, 3.0, 0.0, diagonal])
    both = surface_distances_per_image(preds, masks)
    assert both["hd95"].tolist() == pytest.approx([19.0, 1.9, 3.0, 0.0, diagonal])
    # ASSD of case 0: (0 + 1 + ... + 20 + 0) / 22 boundary pixels.
    assert both["assd"].tolist() == pytest.approx([210 / 22, 3 / 4, 3.0, 0.0, diagonal])
    with pytest.raises(ModelError, match="hd95_per_image expects"):
        hd95_per_image(masks[:, :, :10], masks)
