from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedseg.models.errors import ModelError
from fedseg.models.fedmix import (
    CoTrainedUNets,
    FedMixConfig,
    FedMixTrainer,
    adaptive_weights,
    aggregation_loss,
    box_from_mask,
    box_projection_loss,
    fixed_weights,
    boxes_to_mask,
    enlarge_box,
    random_margins,
    select_pseudo_labels,
    soft_agreement,
    synthesize_box_masks,
)
from fedseg.models.local_training import TrainConfig, evaluate, state_to_arrays
from fedseg.models.unet import UNetConfig
from squares import squares

torch.set_num_threads(1)

TINY = UNetConfig(width=4, depth=2, groups=2)
CFG = FedMixConfig()


def _model(seed: int) -> CoTrainedUNets:
    torch.manual_seed(seed)
    return CoTrainedUNets(TINY)


def _force(net: torch.nn.Module, bias: float) -> None:
    """Makes a network predict sigmoid(bias) at every pixel: zero head weights, constant bias."""
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(bias)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- boxes


def test_box_from_mask() -> None:
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[2:5, 3:7] = 1  # rows 2..4, cols 3..6
    assert box_from_mask(mask) == (3, 2, 7, 5)
    mask[8, 10] = 1  # second blob: one box around both
    assert box_from_mask(mask) == (3, 2, 11, 9)
    assert box_from_mask(np.zeros((4, 4), dtype=bool)) is None
    with pytest.raises(ModelError, match=r"\(1, 4, 4\)"):
        box_from_mask(np.zeros((1, 4, 4)))


def test_enlarge_box_clamps_and_margins_in_range() -> None:
    assert enlarge_box((3, 2, 7, 5), (1, 2, 3, 4), height=10, width=12) == (2, 0, 10, 9)
    assert enlarge_box((0, 0, 12, 10), np.array([9, 9, 9, 9]), height=10, width=12) == (0, 0, 12, 10)
    with pytest.raises(ModelError, match="margin"):
        enlarge_box((0, 0, 2, 2), (1, -1, 1, 1), height=4, width=4)
    with pytest.raises(ModelError, match=r"\(0, 0, 5, 2\)"):
        enlarge_box((0, 0, 5, 2), (1, 1, 1, 1), height=4, width=4)
    m = random_margins(np.random.default_rng(0), 500, 9)
    assert m.shape == (500, 4) and m.min() == 1 and m.max() == 9
    assert random_margins(np.random.default_rng(0), 3, 1).tolist() == [[1] * 4] * 3
    with pytest.raises(ModelError, match="max_margin"):
        random_margins(np.random.default_rng(0), 3, 0)


def test_boxes_to_mask_union_and_synthesis() -> None:
    m = boxes_to_mask([(0, 0, 2, 2), (1, 1, 4, 3)], height=4, width=5)
    assert m.dtype == bool and m.shape == (4, 5)
    assert m.sum() == 4 + 6 - 1 and m[0, 0] and m[2, 3] and not m[3, 0]
    assert not boxes_to_mask([], height=3, width=3).any()
    with pytest.raises(ModelError, match="outside|x1 <= width"):
        boxes_to_mask([(0, 0, 6, 2)], height=4, width=5)

    # At the paper's 224 px the margins are U{1..max_margin} px as drawn.
    masks = np.zeros((2, 1, 224, 224), dtype=np.uint8)
    masks[0, 0, 100:140, 120:200] = 1  # image 1 stays empty (lesion-free)
    boxes = synthesize_box_masks(masks, np.random.default_rng(0), max_margin=3)
    assert boxes.shape == (2, 1, 224, 224) and not boxes[1].any()
    x0, y0, x1, y1 = box_from_mask(boxes[0, 0])
    assert 1 <= 120 - x0 <= 3 and 1 <= 100 - y0 <= 3 and 1 <= x1 - 200 <= 3 and 1 <= y1 - 140 <= 3
    assert (boxes[0, 0] >= masks[0, 0].astype(bool)).all()  # the box covers the lesion
    # A tight box mask (as the loader gives) is enlarged the same way, fresh per rng.
    tight = boxes_to_mask([(120, 100, 200, 140)], 224, 224)[None, None].astype(np.uint8)
    assert np.array_equal(synthesize_box_masks(tight, np.random.default_rng(0), 3), boxes[:1])


def test_box_margins_scale_with_the_image_size() -> None:
    # The paper's U{1..9} px margin is on 224 px crops; at 64 px it is at most 3 px
    # (9 * 64 / 224 = 2.6), the same share of the side. Unscaled, up to 9 px (14 %)
    # made even the ground truth fail the box rule Dice(y, B) >= 0.5 on small lesions.
    masks = np.zeros((400, 1, 64, 64), dtype=np.uint8)
    masks[:, 0, 28:34, 28:34] = 1  # a 6 x 6 lesion
    boxes = synthesize_box_masks(masks, np.random.default_rng(0), max_margin=9)
    sides = np.stack([np.array(box_from_mask(b[0])) for b in boxes])  # (400, 4)
    margins = np.abs(sides - np.array([28, 28, 34, 34]))
    assert margins.max() == 3 and margins.min() == 0
    assert np.mean(margins) == pytest.approx(5 * 64 / 224, abs=0.15)  # E[U{1..9}] = 5 px at 224
    gt = torch.from_numpy(masks).float()
    passes = soft_agreement(gt, torch.from_numpy(boxes).float()) >= CFG.box_agreement
    assert passes.float().mean() > 0.9
    # Non-square images scale x by the width and y by the height.
    wide = np.zeros((200, 1, 224, 448), dtype=np.uint8)
    wide[:, 0, 100:110, 200:210] = 1
    wide_boxes = synthesize_box_masks(wide, np.random.default_rng(0), max_margin=9)
    x0, y0, x1, y1 = np.stack([np.array(box_from_mask(b[0])) for b in wide_boxes]).T
    assert (200 - x0).max() == 18 and (100 - y0).max() == 9


# ----------------------------------------------------------------------------- selection


def _box(b: int = 1, r0: int = 8, r1: int = 24) -> torch.Tensor:
    m = torch.zeros(b, 1, 32, 32)
    m[:, :, r0:r1, r0:r1] = 1
    return m


def test_soft_agreement() -> None:
    a, empty = _box(), torch.zeros(1, 1, 32, 32)
    assert soft_agreement(empty, empty).item() == 1.0
    assert soft_agreement(a, empty).item() < 1e-6
    assert soft_agreement(a, a).item() == pytest.approx(1.0)
    half = a.clone()
    half[..., 16:, :] = 0  # 128 of the 256 pixels
    assert soft_agreement(a, half).item() == pytest.approx(2 * 128 / (256 + 128), abs=1e-6)
    with pytest.raises(ModelError, match=r"\(1, 1, 32, 32\).*\(1, 1, 16, 16\)"):
        soft_agreement(a, torch.zeros(1, 1, 16, 16))


def test_box_selection_rule() -> None:
    box = _box(4)
    prob1 = torch.zeros(4, 1, 32, 32)
    prob1[:, :, 9:23, 9:23] = 0.9  # a lesion inside the box; fills 196 / 256 of it
    prob2 = prob1.clone()
    prob2[0] = 1.0  # 0: everything foreground -> masked to the box: Dice 392/452 ≈ 0.87 < tau
    prob1[1] = 0.0
    prob1[1, :, 12:16, 12:16] = 0.9  # 1: agree exactly, but cover 16 / 256 of the box
    prob2[1] = prob1[1]
    prob1[2, :, 0:4, 0:4] = 0.9  # 2: outside the box is masked away, so the nets still agree
    box[3] = 0  # 3: no box = lesion-free; predictions are ignored
    sel = select_pseudo_labels(prob1, prob2, box_mask=box, config=CFG)
    assert sel.accepted.tolist() == [False, False, True, True]
    assert sel.pseudo1[2].sum() == 196 and (sel.pseudo1[2] <= box[2]).all()
    assert sel.pseudo1[3].sum() == 0 and sel.pseudo2[3].sum() == 0
    assert sel.pseudo1.dtype == torch.float32 and sel.pseudo1.shape == (4, 1, 32, 32)
    # Lower thresholds flip the two rejections.
    loose = select_pseudo_labels(prob1, prob2, box_mask=box, config=FedMixConfig(tau=0.8, box_agreement=0.1))
    assert loose.accepted.tolist() == [True, True, True, True]


def test_image_level_selection_rule() -> None:
    prob1 = torch.zeros(4, 1, 32, 32)
    prob1[:, :, 4:12, 4:12] = 0.8
    prob2 = prob1.clone()
    prob2[1] = 1 - prob1[1]  # 1: disagree
    prob1[2] = prob2[2] = 0.0  # 2: a lesion image with an empty (agreeing) label
    has_lesion = torch.tensor([True, True, True, False])  # 3: negative, predictions ignored
    sel = select_pseudo_labels(prob1, prob2, has_lesion=has_lesion, config=CFG)
    assert sel.accepted.tolist() == [True, False, False, True]
    assert sel.pseudo1[0].sum() == 64 and sel.pseudo2[3].sum() == 0 and sel.pseudo1[3].sum() == 0
    neg = select_pseudo_labels(torch.ones(2, 1, 32, 32), torch.rand(2, 1, 32, 32),
                               has_lesion=torch.tensor([False, False]), config=CFG)
    assert neg.accepted.all() and neg.pseudo1.sum() == 0 and neg.pseudo2.sum() == 0


def test_selection_argument_checks() -> None:
    p = torch.zeros(2, 1, 32, 32)
    with pytest.raises(ModelError, match="exactly one"):
        select_pseudo_labels(p, p, config=CFG)
    with pytest.raises(ModelError, match="exactly one"):
        select_pseudo_labels(p, p, box_mask=p, has_lesion=torch.ones(2, dtype=torch.bool), config=CFG)
    with pytest.raises(ModelError, match=r"\(2,\) bool.*\(3,\)"):
        select_pseudo_labels(p, p, has_lesion=torch.ones(3, dtype=torch.bool), config=CFG)
    with pytest.raises(ModelError, match=r"\(2, 1, 16, 16\)"):
        select_pseudo_labels(p, p, box_mask=torch.zeros(2, 1, 16, 16), config=CFG)
    with pytest.raises(ModelError, match=r"\{0, 1\}"):
        select_pseudo_labels(p, p, box_mask=p + 0.5, config=CFG)


# ----------------------------------------------------------------------------- weights


def test_adaptive_weights_formula() -> None:
    stats = {"a": (0.2, 100), "b": (0.4, 50), "c": (0.8, 10)}
    w = adaptive_weights(stats, FedMixConfig(lam=10, beta=1.5))
    d = np.array([100, 50, 10]) / 160
    s = np.array([1, 2**1.5, 8]) / (9 + 2**1.5)  # 0.2^1.5 : 0.4^1.5 : 0.8^1.5
    expected = (d + 10 * s) / 11
    assert list(w) == ["a", "b", "c"]
    assert list(w.values()) == pytest.approx(expected.tolist(), rel=1e-12)
    assert list(w.values()) == pytest.approx([0.1337, 0.2458, 0.6205], abs=1e-4)
    assert w["a"] < w["b"] < w["c"] and math.isclose(sum(w.values()), 1.0)

    plain = adaptive_weights(stats, FedMixConfig(adaptive=False))
    assert list(plain.values()) == pytest.approx(d.tolist())

    # A node that trained nothing gets 0 and changes nobody else's weight.
    with_idle = adaptive_weights({**stats, "idle": (0.0, 0)}, FedMixConfig(lam=10, beta=1.5))
    assert with_idle["idle"] == 0.0 and all(with_idle[k] == pytest.approx(w[k], rel=1e-12) for k in stats)
    # All losses zero: uniform loss shares instead of 0/0.
    zero = adaptive_weights({"a": (0.0, 30), "b": (0.0, 10)}, FedMixConfig(lam=1))
    assert list(zero.values()) == pytest.approx([(0.75 + 0.5) / 2, (0.25 + 0.5) / 2])


def test_adaptive_weights_follow_the_accepted_share() -> None:
    # A weak node that accepted 2 of 300 images, with a high loss on them, against a pixel node.
    w = adaptive_weights({"pixel": (0.3, 40, 1.0), "weak": (0.9, 2, 2 / 300)}, FedMixConfig(lam=10, beta=1.5))
    assert w["weak"] < 0.05 and w["pixel"] > 0.95
    # Without the share (the paper's formula) its loss alone made it dominate.
    assert adaptive_weights({"pixel": (0.3, 40), "weak": (0.9, 2)}, FedMixConfig(lam=10, beta=1.5))["weak"] > 0.7
    # Full acceptance is the paper's formula exactly.
    stats = {"a": (0.2, 100), "b": (0.4, 50)}
    assert adaptive_weights({k: (*v, 1.0) for k, v in stats.items()}, CFG) == adaptive_weights(stats, CFG)
    with pytest.raises(ModelError, match="'b'.*share"):
        adaptive_weights({"a": (0.3, 5), "b": (0.3, 5, 1.5)}, CFG)


def test_fixed_weights_give_each_weak_node_its_share() -> None:
    w = fixed_weights({"pix": (30, False), "box": (50, True), "img": (80, True)}, 0.05)
    assert w == pytest.approx({"pix": 0.9, "box": 0.05, "img": 0.05})
    two = fixed_weights({"p1": (30, False), "p2": (10, False), "box": (0, True)}, 0.05)
    assert two == pytest.approx({"p1": 0.75, "p2": 0.25, "box": 0.0})  # warm-up: weak nodes did not train
    with pytest.raises(ModelError, match="nothing for the pixel"):
        fixed_weights({"p": (3, False), "a": (3, True), "b": (3, True)}, 0.5)


def test_aggregation_loss_costs_a_correct_empty_prediction_about_nothing() -> None:
    empty = torch.zeros(2, 1, 64, 64)
    confident_background = torch.full((2, 1, 64, 64), -4.0)
    assert aggregation_loss(confident_background, empty).max().item() < 0.02
    # The soft Dice the training loss uses stays near 1 on it, which inflated lesion-free nodes' weights.
    p = torch.sigmoid(confident_background[0])
    assert 1 - 1 / (p.sum().item() + 1) > 0.98
    assert aggregation_loss(torch.full((1, 1, 8, 8), 6.0), torch.zeros(1, 1, 8, 8)).item() > 0.99  # all foreground: wrong
    lesion = torch.zeros(1, 1, 8, 8)
    lesion[..., 2:6, 2:6] = 1
    assert aggregation_loss(lesion * 20 - 10, lesion).item() < 0.01
    assert aggregation_loss(-lesion * 20 + 10, lesion).item() > 0.7


def test_lesion_free_image_level_node_reports_a_low_loss() -> None:
    images, _ = squares(8, 3)
    model = _model(0)
    _force(model.net1, -4.0)
    _force(model.net2, -4.0)
    result = FedMixTrainer(model, TrainConfig(batch_size=4, lr=1e-5), CFG).train_round(
        images, has_lesion=torch.zeros(8, dtype=torch.bool), seed=0)
    assert result.accepted == 8 and result.mean_loss < 0.05


def test_optimizer_state_continues_across_rounds() -> None:
    import io

    images, masks = squares(8, 4)
    cfg = TrainConfig(batch_size=4, augment=False)
    one = _model(0)
    trainer = FedMixTrainer(one, cfg, CFG)
    trainer.train_round(images, masks=masks, seed=1)
    after_round_1 = _snapshot(one)
    saved = io.BytesIO()
    torch.save(trainer.optimizer_state, saved)  # as a node keeps it in its workdir
    trainer.train_round(images, masks=masks, seed=2)

    # A node rebuilds its trainer each round from the state it saved: the same as one trainer.
    state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
    two = _model(1)
    two.load_state_dict(after_round_1)
    FedMixTrainer(two, cfg, CFG, optimizer_state=state).train_round(images, masks=masks, seed=2)
    assert _same(two, _snapshot(one))
    fresh = _model(1)
    fresh.load_state_dict(after_round_1)
    FedMixTrainer(fresh, cfg, CFG).train_round(images, masks=masks, seed=2)
    assert not _same(fresh, _snapshot(one))
    with pytest.raises(ModelError, match="net1"):
        FedMixTrainer(_model(0), cfg, CFG, optimizer_state={"net1": state["net1"]})
    with pytest.raises(ModelError, match="for a parameter"):
        FedMixTrainer(CoTrainedUNets(UNetConfig(width=8, depth=2, groups=2)), cfg, CFG, optimizer_state=state)


def test_self_training_weak_node_learns_its_own_confident_pixels() -> None:
    # FedST: every image trains (the box is ignored); each network moves toward its own
    # confident prediction, so a confidently-background network stays background.
    images, masks = squares(4, 5)
    model = _model(0)
    _force(model.net1, -3.0)
    _force(model.net2, 3.0)
    fedst = FedMixConfig(weak_training="self_training")
    result = FedMixTrainer(model, TrainConfig(batch_size=4, weight_decay=0.0), fedst).train_round(
        images, box_masks=torch.zeros_like(masks), seed=0)
    assert (result.n_samples, result.accepted, result.candidates, result.steps) == (4, 4, 4, 1)
    assert model.net1.head.bias.item() < -3.0 and model.net2.head.bias.item() > 3.0


def test_adaptive_weights_rejections() -> None:
    with pytest.raises(ModelError, match="no node"):
        adaptive_weights({"a": (0.3, 0), "b": (0.0, 0)}, CFG)
    with pytest.raises(ModelError, match="no node"):
        adaptive_weights({}, CFG)
    for bad in [(-0.1, 5), (float("nan"), 5), (float("inf"), 5)]:
        with pytest.raises(ModelError, match="'b'.*loss"):
            adaptive_weights({"a": (0.3, 5), "b": bad}, CFG)
    with pytest.raises(ModelError, match="count"):
        adaptive_weights({"a": (0.3, -1)}, CFG)


def test_config_validation() -> None:
    cfg = FedMixConfig(lam=2.0, beta=3.0, max_box_margin=4, adaptive=False)
    assert FedMixConfig.from_dict(cfg.to_dict()) == cfg
    for bad, field in [({"lam": -1}, "lam"), ({"beta": float("nan")}, "beta"), ({"tau": 1.5}, "tau"),
                       ({"box_agreement": -0.1}, "box_agreement"), ({"max_box_margin": 0}, "max_box_margin"),
                       ({"max_box_margin": 2.0}, "max_box_margin"), ({"adaptive": 1}, "adaptive"),
                       ({"tau": True}, "tau"), ({"weak_training": "self"}, "weak_training"),
                       ({"warmup_rounds": -1}, "warmup_rounds"), ({"weak_weight": 1.0}, "weak_weight"),
                       ({"confidence": 0.5}, "confidence")]:
        with pytest.raises(ModelError, match=field):
            FedMixConfig(**bad)


# ----------------------------------------------------------------------------- model and training


def test_cotrained_unets_keys_and_forward() -> None:
    model = _model(0)
    keys = list(state_to_arrays(model))
    assert keys and all(k.startswith(("net1.", "net2.")) for k in keys)
    assert {k[5:] for k in keys if k.startswith("net1.")} == {k[5:] for k in keys if k.startswith("net2.")}
    assert not torch.equal(model.net1.encoder[0][0].weight, model.net2.encoder[0][0].weight)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), model.net1(x))
    with pytest.raises(ModelError, match="CoTrainedUNets"):
        FedMixTrainer(model.net1, TrainConfig(), CFG)  # type: ignore[arg-type]


def test_weak_node_with_no_accepted_label_trains_nothing() -> None:
    images, masks = squares(6, 0)
    box_masks = torch.from_numpy(synthesize_box_masks(masks.numpy(), np.random.default_rng(0), 3))
    model = _model(0)
    _force(model.net1, -20.0)  # all background
    _force(model.net2, 20.0)  # all foreground: Dice between them ~0 < tau
    model.train()
    snap = _snapshot(model)
    trainer = FedMixTrainer(model, TrainConfig(batch_size=4), FedMixConfig(tau=0.9))
    for kind in [{"box_masks": box_masks}, {"has_lesion": torch.ones(6, dtype=torch.bool)}]:
        result = trainer.train_round(images, seed=0, **kind)
        assert (result.n_samples, result.steps, result.accepted, result.candidates) == (0, 0, 0, 6)
        assert result.mean_loss == 0.0 and result.parts == {}
        assert _same(model, snap) and model.training


def test_weak_node_cross_pseudo_supervision() -> None:
    # tau = box_agreement = 0 accept everything. net1 says "box" (all foreground,
    # masked to the box), net2 says "nothing". Cross supervision pushes net1 toward
    # background and net2 toward the box; self-training would do the opposite. The
    # box projection, which pulls the same way, is off so that only the pseudo-labels act.
    images, masks = squares(4, 1)
    box_masks = torch.from_numpy(synthesize_box_masks(masks.numpy(), np.random.default_rng(1), 3))
    model = _model(0)
    _force(model.net1, 3.0)
    _force(model.net2, -3.0)
    trainer = FedMixTrainer(model, TrainConfig(batch_size=4, weight_decay=0.0),
                            FedMixConfig(tau=0.0, box_agreement=0.0, box_projection=0.0))
    result = trainer.train_round(images, box_masks=box_masks, seed=0)
    assert (result.n_samples, result.steps, result.accepted, result.candidates) == (4, 1, 4, 4)
    assert set(result.parts) == {"dice_net1", "dice_net2"} and 0 < result.mean_loss < 1
    assert model.net1.head.bias.item() < 3.0 and model.net2.head.bias.item() > -3.0


def test_box_projection_prices_the_extent_not_the_shape() -> None:
    box = _box(1, 8, 24)  # rows and columns 8..23
    filled = torch.where(box > 0, 20.0, -20.0)
    cross = torch.full_like(box, -20.0)  # a thin cross touching every row and column of the box, nothing outside
    cross[:, :, 8:24, 15] = 20.0
    cross[:, :, 15, 8:24] = 20.0
    half = torch.full_like(box, -20.0)
    half[:, :, 8:24, 8:16] = 20.0  # every row, half the columns
    spill = filled.clone()
    spill[:, :, 8:24, 24:30] = 20.0  # the box plus 6 columns outside it
    loss = {name: box_projection_loss(x, box).item() for name, x in
            (("filled", filled), ("cross", cross), ("half", half), ("spill", spill))}
    assert loss["filled"] < 1e-6 and loss["cross"] < 1e-6
    assert loss["half"] == pytest.approx(1 - 2 * 8 / (8 + 16), abs=1e-4)  # rows exact, columns Dice 2/3
    assert loss["spill"] == pytest.approx(1 - 2 * 16 / (22 + 16), abs=1e-4)


def test_box_projection_gradient_grows_the_prediction_into_its_box_and_out_of_the_rest() -> None:
    box = _box(1, 8, 24)
    logits = torch.zeros(1, 1, 32, 32, requires_grad=True)
    box_projection_loss(logits, box).sum().backward()
    grad = logits.grad[0, 0]
    # Gradient descent raises the logits inside the box and lowers them where neither row nor column is the box's.
    assert grad[16, 16] < 0 and grad[2, 2] > 0 and grad[2, 28] > 0


def test_box_projection_argument_checks() -> None:
    with pytest.raises(ModelError, match="equal shape"):
        box_projection_loss(torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 9))
    with pytest.raises(ModelError, match="non-empty box"):
        box_projection_loss(torch.zeros(2, 1, 8, 8), torch.cat([torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)]))
    with pytest.raises(ModelError, match="box_projection"):
        FedMixConfig(box_projection=-1.0)


@pytest.mark.parametrize("projection", [0.0, 1.0])
def test_rejected_box_images_teach_only_through_the_projection(projection: float) -> None:
    # Both networks predict nothing on every image: Dice(y1, B) = 0 < box_agreement
    # rejects all, except image 0, whose box is blanked so it is lesion-free and accepted.
    # Changing a rejected image must change the update exactly when the projection is on.
    images, masks = squares(6, 3)
    box_masks = torch.from_numpy(synthesize_box_masks(masks.numpy(), np.random.default_rng(3), 3))
    box_masks[0] = 0
    updates = []
    for scale in (1.0, 0.5):
        x = images.clone()
        x[3] = (x[3].float() * scale).to(x.dtype)
        model = _model(0)
        _force(model.net1, -4.0)
        _force(model.net2, -4.0)
        trainer = FedMixTrainer(model, TrainConfig(batch_size=6, augment=False), FedMixConfig(box_projection=projection))
        result = trainer.train_round(x, box_masks=box_masks, seed=0)
        assert (result.n_samples, result.accepted, result.candidates) == (1, 1, 6)
        updates.append(_snapshot(model))
    same = all(torch.equal(v, updates[1][k]) for k, v in updates[0].items())
    assert same is (projection == 0.0)


def test_box_projection_teaches_where_pseudo_labels_are_rejected() -> None:
    # One accepted lesion-free image keeps the node training; every lesion image is
    # rejected (tau = 1). Without the projection the node learns only "background" and
    # its Dice on the lesions falls to 0; with it, the boxes alone keep the lesions found.
    images, masks = squares(8, 4)
    box_masks = torch.from_numpy(synthesize_box_masks(masks.numpy(), np.random.default_rng(4), 1))
    box_masks[0] = 0
    dice = {}
    for projection in (0.0, 1.0):
        model = _model(1)
        before = evaluate(model, images[1:], masks[1:])["dice"]
        trainer = FedMixTrainer(model, TrainConfig(batch_size=8, lr=1e-2, augment=False),
                                FedMixConfig(tau=1.0, box_agreement=1.0, box_projection=projection))
        for r in range(10):
            trainer.train_round(images, box_masks=box_masks, seed=r)
        dice[projection] = evaluate(model, images[1:], masks[1:])["dice"]
    assert dice[0.0] < 0.05 and dice[1.0] > before, (before, dice)


def test_image_level_node_learns_from_negatives() -> None:
    # Only lesion-free images: all-background labels accepted whatever the nets say.
    images, _ = squares(4, 2)
    model = _model(0)
    _force(model.net1, 3.0)
    _force(model.net2, 3.0)
    trainer = FedMixTrainer(model, TrainConfig(batch_size=2, weight_decay=0.0), CFG)
    result = trainer.train_round(images, has_lesion=torch.zeros(4, dtype=torch.bool), seed=0)
    assert (result.n_samples, result.steps, result.accepted) == (4, 2, 4)
    assert model.net1.head.bias.item() < 3.0 and model.net2.head.bias.item() < 3.0


def test_pixel_node_deterministic_and_rng_free() -> None:
    images, masks = squares(6, 0)
    init = _snapshot(_model(0))
    runs, results = [], []
    for r in range(2):
        model = _model(5)
        model.load_state_dict(init)
        torch.manual_seed(100 + r)  # scrambled: the round must not read the global RNG...
        before = torch.random.get_rng_state()
        results.append(FedMixTrainer(model, TrainConfig(batch_size=4, local_epochs=1.5), CFG).train_round(
            images, masks=masks, seed=7))
        assert torch.equal(before, torch.random.get_rng_state())  # ...nor advance it
        runs.append(_snapshot(model))
    res = results[0]
    assert (res.n_samples, res.steps, res.accepted, res.candidates) == (6, 3, 0, 0)  # ceil(1.5 * 6 / 4)
    assert res.mean_loss == results[1].mean_loss > 0
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in init)
    changed = {k.split(".")[0] for k in init if not torch.equal(init[k], runs[0][k])}
    assert changed == {"net1", "net2"}


def test_pixel_rounds_improve_net1_dice() -> None:
    images, masks = squares(16, 0)
    val_images, val_masks = squares(8, 1)
    model = _model(3)
    before = evaluate(model, val_images, val_masks)
    trainer = FedMixTrainer(model, TrainConfig(lr=5e-3, batch_size=4, local_epochs=2), CFG)
    losses = [trainer.train_round(images, masks=masks, seed=r).mean_loss for r in range(3)]
    after = evaluate(model, val_images, val_masks)
    assert losses[-1] < losses[0]
    assert after["dice"] > before["dice"] + 0.3 and after["dice"] > 0.7, (before, after)


def test_train_round_argument_checks() -> None:
    images, masks = squares(2, 0)
    trainer = FedMixTrainer(_model(0), TrainConfig(), CFG)
    with pytest.raises(ModelError, match="exactly one"):
        trainer.train_round(images, seed=0)
    with pytest.raises(ModelError, match="exactly one"):
        trainer.train_round(images, masks=masks, has_lesion=torch.ones(2, dtype=torch.bool), seed=0)
    with pytest.raises(ModelError, match=r"\(2, 3, 32, 32\).*\(3, 1, 32, 32\)"):
        trainer.train_round(images, box_masks=torch.zeros(3, 1, 32, 32), seed=0)
    with pytest.raises(ModelError, match=r"\{0, 1\}"):
        trainer.train_round(images, box_masks=masks * 0.5, seed=0)
    with pytest.raises(ModelError, match=r"has_lesion \(2,\) torch.int64"):
        trainer.train_round(images, has_lesion=torch.ones(2, dtype=torch.int64), seed=0)
