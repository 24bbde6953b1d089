"""Tests for fedseg.protocol.aggregate and fedseg.protocol.strategies (pure, no I/O)."""
from __future__ import annotations

from dataclasses import replace

import math

import numpy as np
import pytest

from fedseg.protocol.aggregate import weighted_average
from fedseg.protocol.errors import PlanError, RoundError
from fedseg.protocol.messages import DescribeReply, TrainReply, TrainRequest, encode
from fedseg.protocol.plan import Plan
from fedseg.protocol.strategies import FedAvg, FedMix, Strategy, make_strategy

PLAN = Plan.from_dict(
    {
        "rounds": 2,
        "image_size": 32,
        "model": {"width": 4, "depth": 2, "groups": 2},
        "train": {"batch_size": 4, "local_epochs": 1.0, "augment": False},
    }
)


def _update(value: float, bias: tuple[float, float]) -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.full((2, 3), value, dtype=np.float32),
        "conv.bias": np.array(bias, dtype=np.float32),
    }


def test_weighted_average_matches_hand_computation() -> None:
    updates = [(_update(1.0, (0.0, 6.0)), 1.0), (_update(4.0, (3.0, 0.0)), 2.0), (_update(-2.0, (1.0, 1.0)), 3.0)]
    out = weighted_average(updates)
    # (1*1 + 2*4 + 3*(-2)) / 6 = 0.5 ; bias: (0 + 6 + 3) / 6 = 1.5, (6 + 0 + 3) / 6 = 1.5
    assert set(out) == {"conv.weight", "conv.bias"}
    assert all(a.dtype == np.float32 for a in out.values())
    np.testing.assert_allclose(out["conv.weight"], np.full((2, 3), 0.5), rtol=0, atol=1e-7)
    np.testing.assert_allclose(out["conv.bias"], [1.5, 1.5], rtol=0, atol=1e-7)


def test_weighted_average_random_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    updates = [({"w": rng.standard_normal((3, 4)).astype(np.float32)}, float(w)) for w in (1, 2, 3)]
    expected = sum(w * u["w"].astype(np.float64) for u, w in updates) / 6.0
    np.testing.assert_allclose(weighted_average(updates)["w"], expected.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_weighted_average_zero_weight_drops_that_update() -> None:
    out = weighted_average([(_update(1.0, (1.0, 1.0)), 0.0), (_update(3.0, (2.0, 2.0)), 5.0)])
    np.testing.assert_array_equal(out["conv.weight"], np.full((2, 3), 3.0, np.float32))


def test_weighted_average_does_not_modify_inputs() -> None:
    a, b = _update(1.0, (1.0, 1.0)), _update(3.0, (2.0, 2.0))
    weighted_average([(a, 1.0), (b, 1.0)])
    np.testing.assert_array_equal(a["conv.weight"], np.full((2, 3), 1.0, np.float32))
    np.testing.assert_array_equal(b["conv.weight"], np.full((2, 3), 3.0, np.float32))


@pytest.mark.parametrize("weights", [(0.0, 0.0), (1.0, -1.0), (-1.0, -2.0), (math.nan, 1.0)])
def test_weighted_average_rejects_bad_weights(weights: tuple[float, float]) -> None:
    updates = [(_update(1.0, (0.0, 0.0)), weights[0]), (_update(2.0, (0.0, 0.0)), weights[1])]
    with pytest.raises(RoundError, match="aggregation weights must be >= 0 with a positive sum"):
        weighted_average(updates)


def test_weighted_average_rejects_no_updates() -> None:
    with pytest.raises(RoundError, match="no updates to aggregate"):
        weighted_average([])


def test_weighted_average_rejects_mismatched_shapes() -> None:
    bad = {**_update(1.0, (0.0, 0.0)), "conv.bias": np.zeros(3, np.float32)}
    with pytest.raises(RoundError, match="updates disagree on tensor conv.bias"):
        weighted_average([(_update(1.0, (0.0, 0.0)), 1.0), (bad, 1.0)])


def test_weighted_average_rejects_missing_tensor() -> None:
    bad = {"conv.weight": np.zeros((2, 3), np.float32)}
    with pytest.raises(RoundError, match="updates disagree on tensor conv.bias"):
        weighted_average([(_update(1.0, (0.0, 0.0)), 1.0), (bad, 1.0)])


def _node(kind: str) -> DescribeReply:
    return DescribeReply(node="x", label_kind=kind, channels=3, image_size=32, n_train=4, n_val=1, n_test=1, can_score=True, fingerprint="f")


NODES = {"site-a": _node("pixel"), "site-b": _node("pixel"), "site-c": _node("pixel")}


def test_make_strategy_and_linearity() -> None:
    strategy = make_strategy(PLAN)
    assert isinstance(strategy, FedAvg) and isinstance(strategy, Strategy)
    assert isinstance(make_strategy(Plan.from_dict({"algorithm": "fedmix"})), FedMix)
    assert FedAvg.linear is True and FedMix.linear is True  # secure aggregation may wrap them


def test_fedavg_configure_sends_every_node_the_same_request() -> None:
    arrays = _update(0.25, (1.0, 2.0))
    requests = FedAvg(PLAN).configure(3, arrays, "run-x", NODES)
    assert list(requests) == ["site-a", "site-b", "site-c"]
    first = requests["site-a"]
    assert isinstance(first, TrainRequest)
    assert first.run_id == "run-x" and first.round == 3
    assert first.plan == PLAN.to_dict() and Plan.from_dict(first.plan) == PLAN
    assert set(first.weights) == set(arrays)
    for name in arrays:
        np.testing.assert_array_equal(first.weights[name], arrays[name])
    # Same request for everyone: identical bytes on the wire.
    assert len({encode(r) for r in requests.values()}) == 1


def test_fedavg_trains_only_pixel_nodes_unless_full_masks() -> None:
    mixed = {"a": _node("pixel"), "b": _node("box"), "c": _node("image")}
    assert list(FedAvg(PLAN).configure(1, _update(0.0, (0.0, 0.0)), "r", mixed)) == ["a"]
    full = Plan.from_dict({"full_masks": True})
    assert list(FedAvg(full).configure(1, _update(0.0, (0.0, 0.0)), "r", mixed)) == ["a", "b", "c"]
    with pytest.raises(PlanError, match="fedavg needs at least one node with pixel labels"):
        FedAvg(PLAN).participants({"b": _node("box")})


def test_fedmix_refuses_a_federation_without_pixel_labels() -> None:
    fedmix = FedMix(Plan.from_dict({"algorithm": "fedmix"}))
    with pytest.raises(PlanError, match="fedmix needs at least one node with pixel labels"):
        fedmix.participants({"b": _node("box"), "c": _node("image")})
    with pytest.raises(PlanError, match="without labels"):
        fedmix.participants({"a": _node("pixel"), "n": _node("none")})
    assert fedmix.participants({"a": _node("pixel"), "b": _node("box")}) == ["a", "b"]


def test_fedmix_aggregates_with_adaptive_weights_and_skips_idle_nodes() -> None:
    plan = Plan.from_dict({"algorithm": "fedmix", "fedmix": {"lam": 10.0, "beta": 1.5}})
    replies = {"a": _reply(1.0, 100, 0.2), "b": _reply(4.0, 50, 0.8), "idle": _reply(-8.0, 0, 0.0)}
    arrays, metrics = FedMix(plan).aggregate(1, replies)
    w = metrics["weights"]
    assert w["idle"] == 0.0 and w["b"] > w["a"] and w["a"] + w["b"] == pytest.approx(1.0)
    np.testing.assert_allclose(arrays["conv.weight"], np.full((2, 3), w["a"] * 1.0 + w["b"] * 4.0), rtol=1e-6)
    ablation = Plan.from_dict({"algorithm": "fedmix", "fedmix": {"adaptive": False}})
    _, plain = FedMix(ablation).aggregate(1, replies)
    assert plain["weights"] == pytest.approx({"a": 100 / 150, "b": 50 / 150, "idle": 0.0})
    with pytest.raises(RoundError, match="fedmix aggregation"):
        FedMix(plan).aggregate(1, {"idle": _reply(0.0, 0, 0.0)})


def test_fedmix_weighs_a_weak_node_by_the_share_it_accepted() -> None:
    plan = Plan.from_dict({"algorithm": "fedmix", "fedmix": {"lam": 10.0, "beta": 1.5}})
    few = replace(_reply(4.0, 2, 0.9), accepted=2, candidates=300)
    _, metrics = FedMix(plan).aggregate(1, {"pixel": _reply(1.0, 40, 0.3), "weak": few})
    assert metrics["weights"]["weak"] < 0.05
    most = replace(_reply(4.0, 280, 0.9), accepted=280, candidates=300)
    _, metrics = FedMix(plan).aggregate(1, {"pixel": _reply(1.0, 40, 0.3), "weak": most})
    assert metrics["weights"]["weak"] > 0.7


def test_fedmix_counts_every_image_of_a_box_node_under_the_box_projection() -> None:
    # Under the projection every image of a box node teaches its update, accepted or not,
    # so a low acceptance no longer discounts its loss share; an image-level node's still does.
    nodes = {"pixel": _node("pixel"), "box": _node("box"), "image": _node("image")}
    replies = {"pixel": _reply(1.0, 40, 0.3), "box": replace(_reply(4.0, 30, 0.9), accepted=30, candidates=300),
               "image": replace(_reply(2.0, 30, 0.9), accepted=30, candidates=300)}
    weights = {}
    for projection in (1.0, 0.0):
        fedmix = FedMix(Plan.from_dict({"algorithm": "fedmix", "fedmix": {"box_projection": projection}}))
        fedmix.participants(nodes)
        weights[projection] = fedmix.aggregate(1, replies)[1]["weights"]
    assert weights[1.0]["box"] > 0.6 and weights[0.0]["box"] < 0.3
    # Same loss and count as the box node, but its share still discounts it.
    assert weights[1.0]["image"] < weights[1.0]["box"] / 5


def test_fedst_warms_up_on_pixel_nodes_then_fixes_the_weights() -> None:
    plan = Plan.from_dict({"algorithm": "fedmix", "fedmix": {"weak_training": "self_training", "warmup_rounds": 2, "weak_weight": 0.05}})
    mixed = {"a": _node("pixel"), "b": _node("box"), "c": _node("image")}
    fedst = FedMix(plan)
    assert list(fedst.configure(2, _update(0.0, (0.0, 0.0)), "r", mixed)) == ["a"]
    assert list(fedst.configure(3, _update(0.0, (0.0, 0.0)), "r", mixed)) == ["a", "b", "c"]
    replies = {"a": _reply(1.0, 30, 0.5), "b": replace(_reply(2.0, 50, 0.1), accepted=50, candidates=50),
               "c": replace(_reply(3.0, 80, 0.9), accepted=80, candidates=80)}
    _, metrics = fedst.aggregate(3, replies)
    assert metrics["weights"] == pytest.approx({"a": 0.9, "b": 0.05, "c": 0.05})


def _reply(value: float, n: int, loss: float) -> TrainReply:
    return TrainReply(run_id="r", round=1, n_samples=n, mean_loss=loss, seconds=0.5, accepted=0, candidates=0, weights=_update(value, (value, -value)))


def test_fedavg_aggregate_weights_by_sample_count() -> None:
    replies = {"a": _reply(1.0, 10, 0.5), "b": _reply(4.0, 30, 1.0), "c": _reply(-8.0, 0, 99.0)}
    arrays, metrics = FedAvg(PLAN).aggregate(1, replies)
    # (10*1 + 30*4 + 0*(-8)) / 40 = 3.25 ; a node with no samples does not count.
    np.testing.assert_allclose(arrays["conv.weight"], np.full((2, 3), 3.25), atol=1e-7)
    np.testing.assert_allclose(arrays["conv.bias"], [3.25, -3.25], atol=1e-7)
    assert metrics["n_train"] == 40
    assert metrics["train_loss"] == pytest.approx((10 * 0.5 + 30 * 1.0) / 40)


def test_fedavg_aggregate_equal_counts_is_plain_mean() -> None:
    replies = {"a": _reply(1.0, 5, 0.2), "b": _reply(2.0, 5, 0.4)}
    arrays, metrics = FedAvg(PLAN).aggregate(2, replies)
    np.testing.assert_allclose(arrays["conv.weight"], np.full((2, 3), 1.5), atol=1e-7)
    assert metrics == {"train_loss": pytest.approx(0.3), "n_train": 10, "weights": {"a": 5.0, "b": 5.0}}


def test_uniform_aggregation_weighs_every_node_alike() -> None:
    uniform = Plan.from_dict({**PLAN.to_dict(), "algorithm": "lcfed", "aggregation": "uniform"})
    replies = {"a": _reply(1.0, 10, 0.5), "b": _reply(4.0, 30, 1.0)}
    arrays, metrics = make_strategy(uniform).aggregate(1, replies)
    np.testing.assert_allclose(arrays["conv.weight"], np.full((2, 3), 2.5), atol=1e-7)  # (1 + 4) / 2, not 3.25
    assert metrics["weights"] == {"a": 1.0, "b": 1.0} and metrics["n_train"] == 40


def test_fedavg_aggregate_with_no_samples_raises() -> None:
    with pytest.raises(RoundError, match="no updates to aggregate"):
        FedAvg(PLAN).aggregate(1, {"a": _reply(1.0, 0, 0.1), "b": _reply(2.0, 0, 0.2)})
