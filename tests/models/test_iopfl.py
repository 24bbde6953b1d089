"""IOP-FL's inside personalization: the running mix equals its closed form, with no aliasing."""
from __future__ import annotations

import numpy as np
import pytest

from fedseg.models.errors import ModelError
from fedseg.models.iopfl import relative_distance, running_mix


def test_running_mix_equals_the_closed_form_over_rounds():
    rng = np.random.default_rng(0)
    alpha, rounds = 0.1, 5
    thetas = [{"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)} for _ in range(rounds)]
    mix = None
    for theta in thetas:
        mix = running_mix(mix, theta, alpha)
    for k in ("w", "b"):
        # p^T = α^{T-1} θ^1 + (1-α) Σ_{t=2..T} α^{T-t} θ^t
        closed = alpha ** (rounds - 1) * thetas[0][k] + sum((1 - alpha) * alpha ** (rounds - t) * thetas[t - 1][k] for t in range(2, rounds + 1))
        np.testing.assert_allclose(mix[k], closed, rtol=1e-6, atol=1e-7)


def test_first_round_copies_and_nothing_is_aliased():
    theta = {"w": np.ones((2, 2), np.float32)}
    mix = running_mix(None, theta, 0.1)
    theta["w"][0, 0] = 5.0  # the node's live model keeps training after the snapshot
    assert mix["w"][0, 0] == 1.0
    nxt = running_mix(mix, {"w": np.zeros((2, 2), np.float32)}, 0.1)
    assert nxt["w"] is not mix["w"] and mix["w"][0, 0] == 1.0
    np.testing.assert_allclose(nxt["w"], 0.1)


def test_mismatched_models_and_bad_alpha_are_refused():
    with pytest.raises(ModelError, match="differ in tensors"):
        running_mix({"a": np.zeros(1, np.float32)}, {"b": np.zeros(1, np.float32)}, 0.1)
    with pytest.raises(ModelError, match="shape"):
        running_mix({"a": np.zeros(1, np.float32)}, {"a": np.zeros(2, np.float32)}, 0.1)
    with pytest.raises(ModelError, match="alpha"):
        running_mix(None, {"a": np.zeros(1, np.float32)}, 1.0)


def test_relative_distance_measures_weights_not_statistics():
    ref = {"w": np.array([3.0, 4.0], np.float32), "bn.running_mean": np.zeros(2, np.float32)}
    moved = {"w": np.array([3.0, 4.5], np.float32), "bn.running_mean": np.full(2, 100.0, np.float32)}
    assert relative_distance(ref, ref) == 0.0
    # ‖(0, 0.5)‖ / ‖(3, 4)‖; the statistics differ hugely and do not count.
    assert relative_distance(moved, ref) == pytest.approx(0.1)
    with pytest.raises(ModelError, match="differ in tensors"):
        relative_distance({"v": np.ones(2, np.float32)}, ref)
    with pytest.raises(ModelError, match="all zero"):
        relative_distance({"w": np.ones(2, np.float32)}, {"w": np.zeros(2, np.float32)})
