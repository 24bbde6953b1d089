"""IOP-FL, inside personalization (Jiang et al., IEEE TMI 2023; arXiv 2204.08467).

Each node keeps a running mix of the models it trained, p_k^t = α·p_k^{t−1} + (1−α)·θ_k^t,
with p_k^1 = θ_k^1. It never leaves the node. Unlike the reference code, the first round
stores a copy, so the mix really starts at round 1 instead of aliasing live tensors.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedseg.models.errors import ModelError

__all__ = ["relative_distance", "running_mix"]

#: Buffers that are statistics of data, not weights a node learned.
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def running_mix(previous: Mapping[str, np.ndarray] | None, current: Mapping[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """One step of the running mix.

    Args:
        previous: p^{t−1}, or None at a node's first round.
        current: θ^t, the node's model after this round's local training.
        alpha: Weight of the previous mix, in [0, 1).

    Returns:
        New float32 arrays; neither input is aliased or modified.

    Raises:
        ModelError: If alpha is out of range or the two models differ in names or shapes.
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0 <= alpha < 1):
        raise ModelError(f"running_mix: alpha must be in [0, 1), got {alpha!r}")
    if previous is None:
        return {k: np.array(v, dtype=np.float32, copy=True) for k, v in current.items()}
    if set(previous) != set(current):
        raise ModelError(f"running_mix: models differ in tensors {sorted(set(previous) ^ set(current))[:5]}")
    out = {}
    for k, theta in current.items():
        if previous[k].shape != theta.shape:
            raise ModelError(f"running_mix: tensor {k} has shape {theta.shape}, the mix has {previous[k].shape}")
        out[k] = (alpha * previous[k].astype(np.float64) + (1 - alpha) * theta.astype(np.float64)).astype(np.float32)
    return out


def relative_distance(model: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """How far a personalized model is from the global one: ``‖w − w_ref‖₂ / ‖w_ref‖₂``.

    Over every learned tensor, all flattened into one vector; BatchNorm statistics are
    left out, being statistics of data rather than weights.

    Raises:
        ModelError: If the two differ in names or shapes, or the reference is all zero.
    """
    keys = sorted(k for k in reference if not k.endswith(_STATISTICS))
    if set(keys) != {k for k in model if not k.endswith(_STATISTICS)}:
        raise ModelError(f"relative_distance: models differ in tensors {sorted(set(keys) ^ set(model))[:5]}")
    diff = norm = 0.0
    for k in keys:
        a, b = np.asarray(model[k], np.float64), np.asarray(reference[k], np.float64)
        if a.shape != b.shape:
            raise ModelError(f"relative_distance: tensor {k} has shape {a.shape}, the reference has {b.shape}")
        diff += float(np.sum((a - b) ** 2))
        norm += float(np.sum(b**2))
    if norm == 0:
        raise ModelError("relative_distance: the reference model is all zero")
    return math.sqrt(diff / norm)
