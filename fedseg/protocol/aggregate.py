"""Pure averaging of model updates; strategies call these, the round engine does the I/O."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import RoundError
from .messages import Arrays

__all__ = ["weighted_average"]


def weighted_average(updates: Sequence[tuple[Arrays, float]]) -> Arrays:
    """Σ_k w_k θ_k / Σ_k w_k for every tensor, accumulated in float64.

    Args:
        updates: ``(arrays, weight)`` per node; all arrays share names and shapes.

    Returns:
        The averaged arrays as float32.

    Raises:
        RoundError: If there are no updates, the weights do not sum to a positive number,
            or the updates disagree on names or shapes.
    """
    if not updates:
        raise RoundError("no updates to aggregate")
    total = float(sum(w for _, w in updates))
    if not total > 0 or any(w < 0 for _, w in updates):
        raise RoundError(f"aggregation weights must be >= 0 with a positive sum, got {[w for _, w in updates]}")
    reference = updates[0][0]
    out: Arrays = {}
    for name, ref in reference.items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for arrays, weight in updates:
            arr = arrays.get(name)
            if arr is None or arr.shape != ref.shape:
                raise RoundError(f"updates disagree on tensor {name}")
            acc += (weight / total) * arr
        out[name] = acc.astype(np.float32)
    return out
