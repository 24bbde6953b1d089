"""LC-Fed: PCS and its contrastive loss, HC, the declared local keys and the two training stages."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg.models.errors import ModelError
from fedseg.models.lcfed import (
    PCS,
    CalibratedUNet,
    HeadCalibration,
    LCFedConfig,
    LCFedTrainer,
    LCFedUNet,
    Phase,
    calibration_keeps,
    gaussian_kernel,
    head_arrays,
    lcfed_round,
    predict_calibrated,
    site_onehot,
    train_hc_round,
)
from fedseg.models.local_training import TrainConfig, evaluate
from fedseg.models.personalization import LocalPart, local_keys, pull, push
from fedseg.models.unet import UNetConfig, build_model
from squares import squares

torch.set_num_threads(1)

TINY = UNetConfig(width=4, depth=2, groups=2)
K = 3


def _model(site: int = 1, seed: int = 0) -> LCFedUNet:
    torch.manual_seed(seed)
    return LCFedUNet(TINY, n_sites=K, site=site)


def _other_heads(seed: int = 5) -> list[dict[str, np.ndarray]]:
    return [head_arrays(_model(site=j, seed=seed + j)) for j in (0, 2)]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_pcs_shapes_and_attention_range():
    pcs = PCS(16, K)
    x = torch.randn(2, 16, 8, 8)
    y, a = pcs(x, site_onehot(1, K))
    assert y.shape == x.shape and a.shape == (2, 16, 1, 1)
    assert ((a > 0) & (a < 1)).all()
    assert torch.allclose(y, x * a + x)
    assert torch.allclose(pcs.attention(x, site_onehot(1, K).expand(2, K)), a)
    assert pcs.select[0].weight.shape == (1, 32, 1, 1)  # max(16 // 16, 1) hidden channels
    assert all(m.bias is None for m in pcs.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ModelError, match=r"\(2, 8, 8, 8\)"):
        pcs(torch.randn(2, 8, 8, 8), site_onehot(1, K))


def test_contrastive_loss_is_non_positive_and_reaches_only_the_own_attention():
    model = _model(site=1)
    x = torch.rand(2, 3, 32, 32)
    loss = model.contrastive_loss(x)
    assert loss.ndim == 0 and loss.item() <= 0
    loss.backward()
    embed_in = model.pcs.embed[0].weight.grad  # (C, K, 1, 1): column j is used by site j's code only
    assert embed_in[:, 1].abs().sum() > 0
    # A_j (j != k) are computed without gradient, so the other sites' columns get none.
    assert torch.equal(embed_in[:, 0], torch.zeros_like(embed_in[:, 0]))
    assert torch.equal(embed_in[:, 2], torch.zeros_like(embed_in[:, 2]))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pcs.select.parameters())
    assert model.head.weight.grad is None and all(p.grad is None for p in model.hc.parameters())


def test_state_dict_keys_and_declared_local_keys():
    torch.manual_seed(0)
    plain = build_model(TINY)
    model = _model(seed=0)
    keys, plain_keys = set(model.state_dict()), set(plain.state_dict())
    pcs = {k for k in keys if k.startswith("pcs.")}
    hc = {k for k in keys if k.startswith("hc.")}
    assert pcs and hc and keys - pcs - hc == plain_keys
    # Same seed, same U-Net weights: PCS and HC are built after the U-Net.
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.state_dict().items())
    local = local_keys(model, LocalPart.HEAD)
    assert local == {"head.weight", "head.bias"} | hc
    shared = push(model, local)
    assert set(shared) == keys - local and pcs <= set(shared)
    assert set(head_arrays(model)) == {"head.weight", "head.bias"}
    # The site code is a buffer fixed by the constructor, not state that would be averaged.
    assert "onehot" not in keys and torch.equal(model.onehot, torch.tensor([0.0, 1.0, 0.0]))


def test_pull_shares_pcs_between_sites_and_keeps_head_and_hc():
    a, b = _model(site=0, seed=0), _model(site=2, seed=1)
    local = local_keys(b, LocalPart.HEAD)
    before = _snapshot(b)
    pull(b, push(a, local_keys(a, LocalPart.HEAD)), local)
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k] if k in local else a.state_dict()[k]), k
    assert not torch.equal(b.head.weight, a.head.weight)


def test_gaussian_is_a_fixed_buffer_with_peak_one():
    hc = HeadCalibration(4, 1, LCFedConfig(window=31, gaussian_sigma=6.0))
    g = hc.gaussian
    assert g.shape == (1, 1, 31, 31) and g.max().item() == 1.0 and g[0, 0, 15, 15].item() == 1.0
    assert torch.allclose(g, g.transpose(-1, -2)) and g[0, 0, 0, 0] < g[0, 0, 15, 0] < 1
    assert not any(p is g for p in hc.parameters()) and any(b is g for b in hc.buffers())
    assert "gaussian" not in hc.state_dict() and set(n for n, _ in hc.named_parameters()) == {"conv.weight", "conv.bias"}
    assert hc.conv.weight.shape == (1, 2 * 4 * 1, 3, 3)


def test_hc_filter_scales_the_reference_filter_to_the_image_size():
    # The reference's sigma 6 px and 31 px window belong to its 384 px images.
    assert (LCFedConfig().at_size(384).window, LCFedConfig().at_size(384).gaussian_sigma) == (31, 6.0)
    assert (LCFedConfig().at_size(128).window, LCFedConfig().at_size(128).gaussian_sigma) == (11, 2.0)
    assert (LCFedConfig().at_size(64).window, LCFedConfig().at_size(64).gaussian_sigma) == (5, 1.0)
    assert LCFedConfig().at_size(8).window == 3
    # What the user sets stays, at any size.
    mine = LCFedConfig(window=9, gaussian_sigma=2.5)
    assert mine.at_size(64) == mine == mine.at_size(384)
    with pytest.raises(ModelError, match="image_size"):
        LCFedConfig().at_size(0)
    assert LCFedUNet(TINY, n_sites=2, site=0, image_size=64).hc.gaussian.shape == (1, 1, 5, 5)


def test_disagreement_is_normalized_and_zero_when_heads_agree():
    own = torch.rand(2, 1, 8, 8)
    u = HeadCalibration.disagreement(own, torch.rand(2, 2, 1, 8, 8))
    assert u.shape == own.shape and torch.allclose(u.amax(dim=(2, 3)), torch.ones(2, 1))
    same = HeadCalibration.disagreement(own, own[:, None].expand(2, 2, 1, 8, 8))
    assert torch.equal(same, torch.zeros_like(own))


def test_peak_map_marks_only_local_maxima_above_the_threshold():
    hc = HeadCalibration(4, 1, LCFedConfig(window=31, peak_threshold=0.2))
    u = torch.zeros(1, 1, 32, 32)
    u[0, 0, 5, 5] = 0.9  # peak
    u[0, 0, 6, 6] = 0.6  # above the threshold but next to a higher value
    u[0, 0, 20, 25] = 0.5  # peak: 20 columns from (5, 5), outside its 31x31 window
    u[0, 0, 31, 0] = 0.1  # a local maximum below the threshold
    p = hc.peak_map(u)
    assert p.dtype == u.dtype and set(p.unique().tolist()) <= {0.0, 1.0}
    assert p.nonzero().tolist() == [[0, 0, 5, 5], [0, 0, 20, 25]]


def test_hc_forward_shapes_and_head_formats():
    model = _model()
    feat = torch.randn(2, 4, 32, 32)
    others = _other_heads()
    out = model.hc(feat, model.head, others)
    assert out.shape == (2, 1, 32, 32)
    pairs = [(torch.from_numpy(h["head.weight"]), torch.from_numpy(h["head.bias"])) for h in others]
    assert torch.allclose(model.hc(feat, model.head, pairs), out)
    with pytest.raises(ModelError, match="at least one"):
        model.hc(feat, model.head, [])
    with pytest.raises(ModelError, match=r"\(1, 4, 1, 1\)"):
        model.hc(feat, model.head, [(torch.zeros(1, 3, 1, 1), torch.zeros(1))])


def test_features_and_forward():
    model = _model()
    x = torch.rand(2, 3, 32, 32)
    feat, logits = model.features(x)
    assert feat.shape == (2, 4, 32, 32) and logits.shape == (2, 1, 32, 32)
    assert torch.allclose(model(x), logits) and torch.allclose(model.head(feat), logits)
    with pytest.raises(ModelError, match="multiples"):
        model(torch.rand(1, 3, 30, 30))


def test_config_and_site_validation():
    assert LCFedConfig.from_dict({"alpha": 0.5}).alpha == 0.5
    for bad in ({"window": 30}, {"hc_epochs": 0}, {"gaussian_sigma": 0}, {"peak_threshold": 1.0},
                {"alpha": -1}, {"window": True}, {"oops": 1}):
        with pytest.raises(ModelError):
            LCFedConfig.from_dict(bad)
    for n_sites, site in ((1, 0), (3, 3), (3, -1), (3, True)):
        with pytest.raises(ModelError):
            LCFedUNet(TINY, n_sites=n_sites, site=site)


def test_stage1_phases_leave_frozen_parameters_bit_identical():
    images, masks = squares(8, 0)
    # Weight decay and a large lr would move any parameter that reached the optimizer.
    config = TrainConfig(batch_size=4, local_epochs=2.0, augment=False, weight_decay=0.1, lr=1e-2)
    lcfed = LCFedConfig()
    model = _model()
    head = {"head.weight", "head.bias"}
    hc = {k for k in model.state_dict() if k.startswith("hc.")}

    before = _snapshot(model)
    LCFedTrainer(model, config, lcfed, Phase.HEAD).train_round(images, masks, seed=0)
    assert _changed(model, before) == head

    before = _snapshot(model)
    result = LCFedTrainer(model, config, lcfed, Phase.SHARED).train_round(images, masks, seed=1)
    changed = _changed(model, before)
    assert not changed & (head | hc)
    assert any(k.startswith("pcs.") for k in changed) and any(k.startswith("encoder.") for k in changed)
    assert set(result.parts) == {"dice", "bce", "con"} and result.parts["con"] <= 0

    before = _snapshot(model)
    result = lcfed_round(model, config, lcfed, 0.2, images, masks, seed=2)
    assert result.steps == 1 + 4  # ceil(0.2 * 2 * 8 / 4) + ceil(0.8 * 2 * 8 / 4)
    assert not _changed(model, before) & hc


def test_contrastive_term_enters_the_shared_phase_loss():
    images, masks = squares(4, 0)
    config = TrainConfig(batch_size=4, augment=False)
    results = []
    for alpha in (0.0, 10.0):
        model = _model()
        results.append(LCFedTrainer(model, config, LCFedConfig(alpha=alpha), Phase.SHARED).train_round(images, masks, seed=0))
    off, on = results
    assert "con" not in off.parts and on.parts["con"] < 0
    assert on.mean_loss == pytest.approx(off.mean_loss + 10.0 * on.parts["con"], rel=1e-5)


def test_hc_training_moves_only_hc():
    images, masks = squares(8, 1)
    model = _model()
    before = _snapshot(model)
    config = TrainConfig(batch_size=4, augment=True, weight_decay=0.1, lr=1e-2)
    result = train_hc_round(model, _other_heads(), images, masks, config, seed=0)
    assert result.steps == 2 and result.n_samples == 8
    assert _changed(model, before) == {k for k in model.state_dict() if k.startswith("hc.")}


def test_lcfed_rounds_learn_and_calibration_predicts():
    images, masks = squares(16, 0)
    test_images, test_masks = squares(8, 1)
    # Init seed fixed: with 4 head channels some inits start with a dead head (cf. test_local_training).
    model = _model(seed=8)
    config = TrainConfig(batch_size=4, local_epochs=2.0, lr=5e-3)
    start = evaluate(model, test_images, test_masks)["dice"]
    for r in range(3):
        result = lcfed_round(model, config, LCFedConfig(), 0.2, images, masks, seed=r)
    assert result.parts["con"] < 0
    trained = evaluate(model, test_images, test_masks)["dice"]
    assert trained > start + 0.4 and trained > 0.8

    others = _other_heads()
    for r in range(2):
        train_hc_round(model, others, images, masks, config, seed=10 + r)
    pred = predict_calibrated(model, others, test_images)
    assert pred.shape == (8, 1, 32, 32) and pred.dtype == torch.bool and model.training
    calibrated = evaluate(CalibratedUNet(model, others), test_images, test_masks)["dice"]
    assert calibrated > 0.8


def test_hc_only_ablation_has_no_pcs_and_still_trains_both_stages():
    images, masks = squares(8, 0)
    torch.manual_seed(0)
    model = LCFedUNet(TINY, n_sites=3, site=1, lcfed=LCFedConfig(pcs=False))
    assert model.pcs is None and not any(k.startswith("pcs.") for k in model.state_dict())
    config = TrainConfig(batch_size=4, local_epochs=1.0, augment=False)
    result = lcfed_round(model, config, model.lcfed, 0.2, images, masks, seed=0)
    assert "con" not in result.parts
    with pytest.raises(ModelError, match="without PCS"):
        model.contrastive_loss(images.float() / 255)
    other = {"site-0": head_arrays(_model(site=0, seed=3))}
    before = _snapshot(model)
    train_hc_round(model, other, images, masks, config, seed=1)
    assert {k.split(".")[0] for k in _changed(model, before)} == {"hc"}


def test_calibration_is_kept_only_if_it_scores_at_least_the_stage1_model_on_validation():
    images, masks = squares(6, 3)
    assert masks.flatten(1).any(dim=1).all()  # every image has a lesion, so "nothing" scores Dice 0
    model = _model()
    calibrated = CalibratedUNet(model, _other_heads())
    with torch.no_grad():
        # Stage 1 marks everything as lesion (Dice > 0); HC marks nothing (Dice 0): drop HC.
        model.head.weight.zero_(), model.head.bias.fill_(100.0)
        model.hc.conv.weight.zero_(), model.hc.conv.bias.fill_(-100.0)
    assert not calibration_keeps(model, calibrated, images, masks)
    with torch.no_grad():
        model.hc.conv.bias.fill_(100.0)  # now HC equals stage 1: a tie keeps HC
    assert calibration_keeps(model, calibrated, images, masks)


def _attention_spread(model: LCFedUNet, images: torch.Tensor) -> float:
    """Mean over channels of the std over every site's code of PCS's attention on the same input."""
    with torch.no_grad():
        deep = model.encode(images.float() / 255)[-1]
        attentions = torch.stack([model.pcs.attention(deep, site_onehot(j, K)) for j in range(K)])  # (K, B, C, 1, 1)
    return attentions.std(dim=0).mean().item()


def test_site_attentions_separate_over_federated_rounds_despite_weight_decay():
    # Node k's embedding columns of the other sites' codes get no loss gradient; under Adam's
    # L2 decay they were pulled to zero in a few rounds and every site got the same attention.
    models = []
    for k in range(K):
        torch.manual_seed(0)
        models.append(LCFedUNet(TINY, n_sites=K, site=k))
    data = [squares(8, k) for k in range(K)]
    config = TrainConfig(batch_size=2, local_epochs=2.0, augment=False, lr=1e-2, weight_decay=1e-4)
    local = local_keys(models[0], LocalPart.HEAD)
    probe = squares(4, 9)[0]
    norm = models[0].pcs.embed[0].weight.norm().item()
    for r in range(4):
        updates = []
        for k, model in enumerate(models):
            lcfed_round(model, config, LCFedConfig(), 0.2, *data[k], seed=r)
            updates.append(push(model, local))
        mean = {name: np.mean([u[name] for u in updates], axis=0) for name in updates[0]}
        for model in models:
            pull(model, mean, local)
    # Measured: spread 0.038 and norm 2.10 (from 2.03); with decay on the embedding, 0.0 and 0.73.
    assert models[0].pcs.embed[0].weight.norm().item() > 0.95 * norm
    assert _attention_spread(models[0], probe) > 0.02


@pytest.mark.parametrize("size", [384, 128, 64, 32])
def test_hc_blur_has_the_same_effect_at_every_image_size(size):
    # One scene at several sizes: a lesion of radius size/8 with probability 1, and one
    # disagreement peak. The reference (384 px) blurs both with its peak-1 filter.
    hc = HeadCalibration(4, 1, image_size=size)
    u = torch.arange(size, dtype=torch.float32) - size // 2
    lesion = ((u[:, None] ** 2 + u[None] ** 2) <= (size / 8) ** 2).float()[None, None]  # (1, 1, S, S)
    reference = gaussian_kernel(31, 6.0).sum().item()  # 222: a dense map's plateau at 384 px
    assert hc.smooth_probabilities(lesion)[0, 0, size // 2, size // 2].item() == pytest.approx(reference, rel=0.03)
    peak = torch.zeros(1, 1, size, size)
    peak[0, 0, size // 2, size // 2] = 1
    assert hc.smooth(peak).max().item() == pytest.approx(1.0)


def test_hc_trains_on_inputs_computed_once_per_image_not_once_per_epoch():
    images, masks = squares(8, 1)
    model = _model()
    passes = []
    handle = model.encoder[0].register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0]))
    config = TrainConfig(batch_size=4, augment=False, local_epochs=60.0)
    result = train_hc_round(model, _other_heads(), images, masks, config, seed=0)
    handle.remove()
    assert result.steps == 120 and sum(passes) == 8  # 60 epochs, one U-Net pass per image


def test_cached_hc_inputs_give_the_calibrated_model_output():
    images = squares(5, 2)[0]
    model = _model()
    calibrated = CalibratedUNet(model, _other_heads())
    inputs = calibrated.hc_inputs(images, batch_size=2)
    assert inputs.shape == (5, 4 + 2, 32, 32)
    with torch.no_grad():
        direct = calibrated(images.float() / 255)
        assert torch.allclose(model.hc.calibrate(inputs[:, :4], inputs[:, 4:]), direct, rtol=1e-5, atol=1e-3)
