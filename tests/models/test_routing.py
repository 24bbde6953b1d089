"""IOP-FL outside personalization: the routed U-Net, its test-time losses and adaptation."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedseg.models.errors import ModelError
from fedseg.models.local_training import LocalTrainer, TrainConfig, arrays_to_state, evaluate, state_to_arrays
from fedseg.models.routing import (
    AdaptConfig,
    adapt,
    adapt_norm_statistics,
    build_routed,
    consistency_loss,
    consistency_noise,
    entropy_loss,
    foreground_prior_loss,
    initial_foreground,
    route_experts,
    shape_loss,
)
from fedseg.models.unet import UNetConfig, build_model

from squares import squares

torch.set_num_threads(1)

GROUP = UNetConfig(width=4, depth=2, groups=2)
BATCH = UNetConfig(width=4, depth=2, groups=2, norm="batch")


def _experts(config: UNetConfig, n: int) -> list[tuple[str, dict[str, np.ndarray]]]:
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append((f"e{i}", state_to_arrays(build_model(config))))
    return out


def test_identical_experts_route_to_the_plain_model() -> None:
    torch.manual_seed(3)
    plain = build_model(GROUP)
    arrays = state_to_arrays(plain)
    routed = route_experts(GROUP, [("a", arrays), ("b", arrays), ("global", arrays)], seed=1)
    x = torch.rand(2, 3, 16, 16)
    plain.eval(), routed.eval()
    # Softmax weights sum to 1, so any mix of equal kernels is that kernel.
    torch.testing.assert_close(routed(x), plain(x), rtol=1e-4, atol=1e-5)


def test_sigmoid_routing_is_not_normalized() -> None:
    arrays = state_to_arrays(build_model(GROUP))
    routed = route_experts(GROUP, [("a", arrays), ("global", arrays)], routing="sigmoid")
    routed.eval()
    r = routed.head.router(torch.rand(3, 4, 8, 8))
    assert r.shape == (3, 2) and ((r > 0) & (r < 1)).all() and not torch.allclose(r.sum(1), torch.ones(3))


def test_every_conv_is_routed_with_k_plus_one_experts_and_only_routers_and_norms_train() -> None:
    routed = route_experts(BATCH, _experts(BATCH, 3))
    assert not any(type(m) is torch.nn.Conv2d for m in routed.modules())
    for name, buf in routed.named_buffers():
        if name.endswith("experts") or name.endswith("expert_bias"):
            assert buf.shape[0] == 3, name
    trainable = {n for n, _ in routed.named_parameters()}
    norms = {n for n in trainable if ".router." not in f".{n}"}
    # Routers of every layer, the bottleneck's included, plus exactly the norm affine parameters.
    assert {n.rsplit(".router.", 1)[0] for n in trainable - norms} == {n.rsplit(".", 1)[0] for n, _ in routed.named_buffers() if n.endswith("experts")}
    assert norms and all(n.endswith((".weight", ".bias")) for n in norms)
    # BatchNorm starts from the global model's statistics (the last expert's).
    glob = _experts(BATCH, 3)[-1][1]
    np.testing.assert_array_equal(routed.encoder[0][1].running_var.numpy(), glob["encoder.0.1.running_var"])


def test_expert_shape_mismatch_names_the_expert_and_key() -> None:
    experts = _experts(GROUP, 2)
    wider = state_to_arrays(build_model(UNetConfig(width=8, depth=2, groups=2)))
    with pytest.raises(ModelError, match=r"expert wide has encoder\.0\.0\.weight of shape \(8, 3, 3, 3\).*\(4, 3, 3, 3\)"):
        route_experts(GROUP, [experts[0], ("wide", wider), experts[1]])
    partial = {k: v for k, v in experts[0][1].items() if k != "head.bias"}
    with pytest.raises(ModelError, match=r"expert p.*missing \['head.bias'\]"):
        route_experts(GROUP, [("p", partial), experts[1]])
    with pytest.raises(ModelError, match="empty"):
        route_experts(GROUP, [])


def test_routed_state_round_trips_through_arrays() -> None:
    routed = route_experts(BATCH, _experts(BATCH, 3), seed=2)
    again = build_routed(BATCH, 3)
    arrays_to_state(again, state_to_arrays(routed))
    x = torch.rand(2, 3, 16, 16)
    routed.eval(), again.eval()
    torch.testing.assert_close(again(x), routed(x))


def test_losses_behave() -> None:
    confident = torch.full((2, 1, 8, 8), 12.0)
    undecided = torch.zeros(2, 1, 8, 8)
    assert entropy_loss(confident).item() < 1e-3
    assert entropy_loss(undecided).item() == pytest.approx(1.0, abs=1e-6)
    # A compact blob has less boundary than scattered noise of the same area.
    blob = torch.full((1, 1, 32, 32), -10.0)
    blob[..., 8:20, 8:20] = 10.0
    speckle = torch.where(torch.rand(1, 1, 32, 32) < 144 / 1024, 10.0, -10.0)
    assert shape_loss(blob, 5) < shape_loss(speckle, 5)
    assert shape_loss(torch.full((1, 1, 16, 16), 5.0)).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ModelError, match=r"\(B, 1, H, W\)"):
        entropy_loss(torch.zeros(2, 2, 8, 8))


def test_consistency_noise_follows_each_image_contrast() -> None:
    gen = torch.Generator().manual_seed(0)
    # A dim, flat image (std 0.02) and a contrasted one (std 0.3), as ultrasound and endoscopy differ.
    images = torch.stack([0.5 + 0.02 * torch.randn(1, 64, 64), 0.5 + 0.3 * torch.randn(1, 64, 64)])
    noise = consistency_noise(images, 0.1, gen)
    ratio = noise.flatten(1).std(dim=1) / images.flatten(1).std(dim=1)
    # Each image gets a tenth of its own spread: never the reference's σ = 0.5, which on
    # images in [0, 1] is 25 times the dim image's whole contrast.
    torch.testing.assert_close(ratio, torch.full((2,), 0.1), rtol=0.05, atol=0)
    assert AdaptConfig().noise_scale == 0.1


def test_consistency_is_zero_for_an_equivariant_model_without_noise() -> None:
    identity = torch.nn.Conv2d(1, 1, 1, bias=False)
    torch.nn.init.ones_(identity.weight)
    x = torch.rand(4, 1, 8, 8)
    gen = torch.Generator().manual_seed(0)
    # A 1x1 conv commutes with flips and rotations, so T⁻¹ f(T x) = f(x) exactly.
    assert consistency_loss(identity, x, identity(x), 0.0, gen).item() == pytest.approx(0.0, abs=1e-12)
    assert consistency_loss(identity, x, identity(x), 0.5, gen).item() > 0
    with pytest.raises(ModelError, match="square"):
        consistency_loss(identity, torch.rand(1, 1, 8, 4), torch.rand(1, 1, 8, 4), 0.0, gen)


def _trained(config: UNetConfig, images: torch.Tensor, masks: torch.Tensor, **train: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(config)
    LocalTrainer(model, TrainConfig(augment=False, **train)).train_round(images, masks, seed=0)
    return model


@pytest.mark.parametrize("config", [BATCH, GROUP], ids=["batchnorm", "groupnorm"])
def test_adaptation_changes_only_routers_and_norm_affine_and_lowers_entropy(config: UNetConfig) -> None:
    images, masks = squares(24, seed=0)
    glob = state_to_arrays(_trained(config, images, masks, lr=3e-3, batch_size=8, local_epochs=4))
    routed = route_experts(config, [("a", glob), ("global", glob)], seed=0)
    before = {k: v.clone() for k, v in routed.state_dict().items()}
    calls = []
    cfg = AdaptConfig(epochs=3, batch_size=8, lr=1e-2)
    first = adapt(routed, images, AdaptConfig(epochs=0.34, batch_size=8, lr=1e-9), seed=0)
    result = adapt(routed, images, cfg, seed=0, progress=lambda step, steps, parts: calls.append((step, steps)))
    assert result.steps == 9 and calls[-1] == (9, 9) and result.n_images == 24
    assert set(result.parts) == {"entropy", "consistency", "shape", "prior"} and math.isfinite(result.mean_loss)
    assert result.parts["entropy"] < first.parts["entropy"]
    changed = {k for k, v in routed.state_dict().items() if not torch.equal(v, before[k])}
    # Beside what trains, only BatchNorm statistics change: set to the site's after adapting.
    trainable = {n for n, _ in routed.named_parameters()} | {n for n, _ in routed.named_buffers() if n.endswith(("running_mean", "running_var"))}
    assert changed and changed <= trainable and any(".router." in k for k in changed) and changed - {k for k in changed if ".router." in k}


def test_routed_scores_do_not_depend_on_file_order() -> None:
    images, masks = squares(20, seed=2)
    model = _trained(BATCH, images, masks, lr=1e-2, batch_size=4, local_epochs=24)
    glob = state_to_arrays(model)
    routed = route_experts(BATCH, [("a", glob), ("global", glob)], seed=0)
    adapt(routed, images, AdaptConfig(epochs=1, batch_size=8), seed=0)
    # The files of a site in another order (e.g. video order against sorted names): every
    # image meets other images in its evaluation batch, and a batch of 7 leaves one alone.
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    ordered = evaluate(routed, images, masks, batch_size=7)
    shuffled = evaluate(routed, images[perm], masks[perm], batch_size=7)
    assert ordered["dice"] > 0.5
    assert shuffled["dice"] == pytest.approx(ordered["dice"], abs=1e-6) and shuffled["loss"] == pytest.approx(ordered["loss"], rel=1e-5)
    # The site's statistics themselves are the same whatever the order and the batch size.
    again = build_model(BATCH)
    arrays_to_state(again, glob)
    adapt_norm_statistics(again, images[perm], batch_size=3)
    adapt_norm_statistics(model, images, batch_size=16)
    for a, b in zip(again.modules(), model.modules()):
        if isinstance(a, torch.nn.BatchNorm2d):
            torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4, atol=1e-5)


def test_norm_statistics_baseline_recomputes_only_batchnorm_statistics() -> None:
    images, masks = squares(16, seed=1)
    torch.manual_seed(0)
    model = build_model(BATCH)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapt_norm_statistics(model, images, batch_size=8)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("running_mean", "running_var")) for k in changed)
    assert model.training and "encoder.0.1.num_batches_tracked" not in model.state_dict()
    # Two equal batches: the cumulative average is the mean over all the site's images.
    with torch.no_grad():
        first = model.encoder[0][0](images.float() / 255).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.encoder[0][1].running_mean, first, rtol=1e-4, atol=1e-5)
    assert evaluate(model, images, masks)["n"] == 16
    with pytest.raises(ModelError, match="norm='group'"):
        adapt_norm_statistics(build_model(GROUP), images)
    with pytest.raises(ModelError, match="at least one image"):
        adapt_norm_statistics(model, images[:0])


def test_adapt_config_names_bad_field() -> None:
    with pytest.raises(ModelError, match="routing"):
        AdaptConfig(routing="tanh")
    with pytest.raises(ModelError, match="shape_window"):
        AdaptConfig(shape_window=4)
    with pytest.raises(ModelError, match="epochs"):
        AdaptConfig(epochs=0)
    with pytest.raises(ModelError, match="lambda_prior"):
        AdaptConfig(lambda_prior=-1.0)
    assert AdaptConfig.from_dict(AdaptConfig(routing="sigmoid").to_dict()).routing == "sigmoid"


def test_foreground_anchor_prices_moving_the_lesion_mass_not_its_place() -> None:
    reference = torch.tensor(0.1)
    logits = torch.full((2, 1, 8, 8), -10.0)
    logits[:, :, :2, :4] = 10.0  # 1/8 of the pixels
    same = logits.clone()
    same[:, :, :2, :4] = -10.0
    same[:, :, 6:, 4:] = 10.0  # the same mass elsewhere
    torch.testing.assert_close(foreground_prior_loss(logits, reference), foreground_prior_loss(same, reference))
    half, double = (torch.logit(torch.tensor(p)).expand(1, 1, 4, 4) for p in (0.05, 0.2))
    assert foreground_prior_loss(half, reference).item() == pytest.approx(foreground_prior_loss(double, reference).item(), rel=0.02)
    empty = torch.full((1, 1, 4, 4), -30.0)
    assert foreground_prior_loss(empty, reference) > 4 * foreground_prior_loss(half, reference)
    # Its gradient pushes a shrinking foreground back up.
    x = torch.full((1, 1, 4, 4), -4.0, requires_grad=True)
    foreground_prior_loss(x, reference).backward()
    assert (x.grad < 0).all()


def test_the_anchor_keeps_entropy_minimisation_from_erasing_the_lesions() -> None:
    images, masks = squares(24, seed=0)
    glob = state_to_arrays(_trained(BATCH, images, masks, lr=3e-3, batch_size=8, local_epochs=4))
    # An aggressive adaptation, so that entropy alone has room to collapse.
    cfg = AdaptConfig(epochs=6, batch_size=8, lr=5e-2, lambda_cons=0.0, lambda_shape=0.0)
    start = route_experts(BATCH, [("a", glob), ("global", glob)], seed=0)
    before = initial_foreground(start, images, 8).mean().item()
    fractions = {}
    for weight in (0.0, 10.0):
        routed = route_experts(BATCH, [("a", glob), ("global", glob)], seed=0)
        result = adapt(routed, images, replace(cfg, lambda_prior=weight), seed=0)
        assert ("prior" in result.parts) and (result.parts["prior"] == 0) == (weight == 0)
        fractions[weight] = initial_foreground(routed, images, 8).mean().item()
    assert abs(math.log(fractions[10.0] / before)) < abs(math.log(fractions[0.0] / before))
