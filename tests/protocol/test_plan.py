"""Tests for fedseg.protocol.plan: defaults, strict parsing, ranges, round trip."""
from __future__ import annotations

import json
import math
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from fedseg.models.local_training import TrainConfig
from fedseg.models.unet import UNetConfig, build_model
from fedseg.protocol.errors import PlanError
from fedseg.protocol.plan import ALGORITHMS, Plan

TINY = {
    "rounds": 2,
    "image_size": 32,
    "model": {"width": 4, "depth": 2, "groups": 2},
    "train": {"batch_size": 4, "local_epochs": 1.0, "augment": False},
}


def test_defaults_are_valid_and_match_an_empty_dict() -> None:
    plan = Plan()
    assert plan == Plan.from_dict({})
    assert plan.algorithm in ALGORITHMS
    assert plan.model == UNetConfig() and plan.train == TrainConfig()
    assert plan.image_size % 2**plan.model.depth == 0
    assert plan.max_message_bytes == plan.max_message_mb * 2**20


def test_partial_sections_keep_other_defaults() -> None:
    plan = Plan.from_dict(TINY)
    assert plan.rounds == 2 and plan.image_size == 32
    assert plan.model == UNetConfig(width=4, depth=2, groups=2)
    assert plan.model.in_channels == UNetConfig().in_channels
    assert plan.train.batch_size == 4 and plan.train.augment is False
    assert plan.train.lr == TrainConfig().lr
    assert plan.timeout_s == Plan().timeout_s


@pytest.mark.parametrize(
    "d, key",
    [
        ({**TINY, "learning_rate": 0.1}, "learning_rate"),
        ({**TINY, "model": {**TINY["model"], "dropout": 0.5}}, "dropout"),
        ({**TINY, "train": {**TINY["train"], "momentum": 0.9}}, "momentum"),
    ],
)
def test_unknown_keys_are_rejected_by_name(d: dict[str, Any], key: str) -> None:
    with pytest.raises(PlanError, match=f"unknown .*keys: \\['{key}'\\]"):
        Plan.from_dict(d)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"rounds": 0}, r"plan\.rounds must be an integer in \[1, 100000\], got 0"),
        ({"rounds": 2.0}, r"plan\.rounds must be an integer"),
        ({"rounds": True}, r"plan\.rounds must be an integer"),
        ({"rounds": "2"}, r"plan\.rounds must be an integer"),
        ({"image_size": 34}, r"plan\.image_size 34 must be a multiple of 2\*\*model\.depth = 4"),
        ({"image_size": 4}, r"plan\.image_size must be an integer in \[8, 1024\], got 4"),
        ({"seed": -1}, r"plan\.seed must be an integer"),
        ({"eval_batch_size": 0}, r"plan\.eval_batch_size must be an integer"),
        ({"min_nodes": -1}, r"plan\.min_nodes must be an integer"),
        ({"overlays": 65}, r"plan\.overlays must be an integer in \[0, 64\], got 65"),
        ({"max_message_mb": 0}, r"plan\.max_message_mb must be an integer"),
        ({"timeout_s": 0}, r"plan\.timeout_s must be a positive number, got 0"),
        ({"timeout_s": -5.0}, r"plan\.timeout_s must be a positive number"),
        ({"timeout_s": math.inf}, r"plan\.timeout_s must be a positive number, got inf"),
        ({"timeout_s": math.nan}, r"plan\.timeout_s must be a positive number, got nan"),
        ({"timeout_s": "60"}, r"plan\.timeout_s must be a positive number"),
        ({"algorithm": "fedprox"}, re.escape(f"plan.algorithm must be one of {ALGORITHMS}, got 'fedprox'")),
        ({"aggregation": "median"}, r"plan\.aggregation must be one of \('samples', 'uniform'\), got 'median'"),
        ({"aggregation": "uniform", "algorithm": "fedmix"}, r"fedmix weighs nodes by its own adaptive weights"),
        ({"train": {"lr": -0.1}}, r"TrainConfig\.lr must be > 0, got -0\.1"),
        ({"train": {"lr": 0}}, r"TrainConfig\.lr must be > 0"),
        ({"train": {"batch_size": 0}}, r"TrainConfig\.batch_size must be >= 1"),
        ({"model": {"width": 6, "groups": 4}}, r"UNetConfig\.groups must divide width"),
        ({"model": {"in_channels": 2}}, r"UNetConfig\.in_channels must be 1 or 3"),
        ({"model": [4, 2]}, r"plan\.model must be an object, got list"),
        ({"train": None}, r"plan\.train must be an object, got NoneType"),
    ],
)
def test_out_of_range_values_are_rejected_naming_the_field(override: dict[str, Any], pattern: str) -> None:
    with pytest.raises(PlanError, match=pattern):
        Plan.from_dict({**TINY, **override})


def test_image_size_rule_follows_model_depth() -> None:
    assert Plan.from_dict({"image_size": 40, "model": {"depth": 3}}).image_size == 40
    with pytest.raises(PlanError, match=r"2\*\*model\.depth = 16"):
        Plan.from_dict({"image_size": 40, "model": {"depth": 4}})


def test_not_a_dict_is_rejected() -> None:
    with pytest.raises(PlanError, match="plan must be a JSON object, got list"):
        Plan.from_dict([("rounds", 2)])  # type: ignore[arg-type]


def test_bool_timeout_is_rejected() -> None:
    # TrainConfig and UNetConfig reject JSON `true` for numbers ("a bug, not 1"); the plan should too.
    try:
        Plan.from_dict({**TINY, "timeout_s": True})
    except PlanError as exc:
        assert "timeout_s" in str(exc)
    else:
        raise AssertionError("timeout_s=True was accepted as 1 second")


@pytest.mark.parametrize("d", [{}, TINY, {**TINY, "seed": 7, "timeout_s": 12.5, "min_nodes": 2, "overlays": 3}])
def test_to_dict_from_dict_round_trip(d: dict[str, Any]) -> None:
    plan = Plan.from_dict(d)
    as_dict = plan.to_dict()
    assert Plan.from_dict(as_dict) == plan
    # It is what travels in every request, so it must survive JSON unchanged.
    assert Plan.from_dict(json.loads(json.dumps(as_dict))) == plan
    assert set(as_dict) == {
        "algorithm", "rounds", "image_size", "seed", "model", "train",
        "eval_batch_size", "timeout_s", "min_nodes", "overlays", "max_message_mb", "fedmix", "full_masks", "personal",
        "secure_aggregation", "secagg", "lcfed", "aggregation", "sites",
    }
    assert as_dict["model"] == plan.model.to_dict() and as_dict["train"] == plan.train.to_dict()


def test_plan_is_frozen() -> None:
    plan = Plan()
    with pytest.raises(AttributeError):
        plan.rounds = 3  # type: ignore[misc]


def test_lcfed_model_gets_the_hc_filter_of_the_plans_image_size():
    plan = Plan.from_dict({"algorithm": "lcfed", "image_size": 64, "sites": ["a", "b"],
                           "model": {"width": 4, "depth": 2, "groups": 2}})
    model = plan.build_model("b")
    assert model.hc.gaussian.shape == (1, 1, 5, 5) and model.hc.config.gaussian_sigma == 1.0
    # The plan keeps "unset" (so it means the same at any size) and survives the wire.
    assert plan.lcfed.window is None and Plan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("algorithm", ["fedavg", "fedmix", "lcfed"])
def test_build_model_leaves_torchs_global_generator_alone(algorithm: str) -> None:
    plan = Plan.from_dict({**TINY, "algorithm": algorithm, "seed": 3, "sites": ["a", "b"]})
    torch.manual_seed(11)
    state = torch.get_rng_state()
    plan.build_model("b")
    assert torch.equal(torch.get_rng_state(), state)


def test_build_model_gives_the_weights_of_torchs_global_generator_seeded_with_plan_seed() -> None:
    plan = Plan.from_dict({**TINY, "seed": 3})
    torch.manual_seed(3)
    expected = build_model(plan.model).state_dict()
    state = plan.build_model().state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedmix", "lcfed"])
def test_build_model_in_concurrent_threads_gives_the_sequential_weights(algorithm: str) -> None:
    # In-process nodes are threads: they build at once, while others draw from torch's global generator.
    plan = Plan.from_dict({**TINY, "algorithm": algorithm, "seed": 3, "sites": ["a", "b"]})
    expected = plan.build_model("b").state_dict()
    start, stop = threading.Barrier(3), threading.Event()

    def build() -> dict[str, torch.Tensor]:
        start.wait()
        return plan.build_model("b").state_dict()

    def draw() -> None:
        start.wait()
        while not stop.is_set():
            torch.rand(1)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # so the threads interleave inside a build
    try:
        with ThreadPoolExecutor(3) as pool:
            drawing = pool.submit(draw)
            builds = [pool.submit(build) for _ in range(2)]
            try:
                states = [b.result() for b in builds]
            finally:
                stop.set()
            drawing.result()
    finally:
        sys.setswitchinterval(switch)
    for state in states:
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_keep_optimizer_defaults_to_fedmix_and_is_refused_for_phased_training() -> None:
    assert Plan.from_dict({"algorithm": "fedmix"}).keeps_optimizer
    assert not Plan.from_dict({"algorithm": "fedavg"}).keeps_optimizer
    assert Plan.from_dict({"algorithm": "fedavg", "train": {"keep_optimizer": True}}).keeps_optimizer
    assert not Plan.from_dict({"algorithm": "fedmix", "train": {"keep_optimizer": False}}).keeps_optimizer
    with pytest.raises(PlanError, match="keep_optimizer: fedrep"):
        Plan.from_dict({"algorithm": "fedrep", "train": {"keep_optimizer": True}})
    with pytest.raises(PlanError, match="keep_optimizer"):
        Plan.from_dict({"train": {"keep_optimizer": 1}})
