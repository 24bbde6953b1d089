"""Fixed-point encoding of weighted updates into Z_{2^32}, with reported clipping.

A node sends ``q_k = round(ω_k · clip(θ_k, ±C) · 2^f) mod 2^32``, with ``Σ_k ω_k <= 1``.
Read as signed 32-bit integers, ``|Σ_k q_k| <= C · 2^f · Σ_k ω_k + N/2``, so the sum
cannot wrap as long as ``C · 2^f + N < 2^31`` (the ``+ N`` covers each node's rounding
and the float rounding of ``Σ ω``). :func:`scale_bits` picks the largest ``f`` that fits
and refuses a clip bound that leaves too little precision. The encoding keeps uint32,
so a masked update is exactly the size of the float32 one.

Values beyond ``±C`` are clipped and counted; the count travels with the masked update,
so clipping is never silent.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import PlanError

__all__ = ["MIN_BITS", "Layout", "scale_bits", "flatten", "unflatten", "quantize", "dequantize"]

#: Below 2^-16 resolution, averaging U-Net weights loses more than it protects.
MIN_BITS = 16
_LIMIT = 2**31

Layout = dict[str, tuple[int, ...]]


def scale_bits(clip: float, n_nodes: int, bits: int = 0) -> int:
    """The fixed-point fraction bits ``f`` for clip bound ``C`` and ``N`` nodes.

    Args:
        clip: ``C``: values are clipped to ``[-C, C]`` before weighting.
        n_nodes: ``N``: nodes whose updates are summed.
        bits: A requested ``f``; 0 picks the largest that cannot overflow.

    Raises:
        PlanError: If the requested ``f`` could overflow the 32-bit sum, or no
            ``f >= MIN_BITS`` fits.
    """
    if not (clip > 0 and np.isfinite(clip)) or n_nodes < 1:
        raise PlanError(f"secure aggregation needs a positive clip bound and nodes, got clip={clip}, nodes={n_nodes}")
    if bits:
        if clip * 2**bits + n_nodes >= _LIMIT:
            raise PlanError(f"plan.secagg: clip {clip} with scale 2^{bits} and {n_nodes} nodes could overflow the 32-bit sum "
                            f"(needs clip * 2^scale_bits + nodes < 2^31); lower scale_bits or clip")
        return bits
    fitting = int(np.floor(np.log2((_LIMIT - 1 - n_nodes) / clip)))
    while clip * 2**fitting + n_nodes >= _LIMIT:  # guard float log2 rounding at the edge
        fitting -= 1
    if fitting < MIN_BITS:
        raise PlanError(f"plan.secagg.clip {clip} leaves only 2^-{fitting} resolution in 32 bits for {n_nodes} nodes "
                        f"(need at least 2^-{MIN_BITS}); lower the clip bound")
    return fitting


def flatten(arrays: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    """The arrays in name order as one vector ``(d,)`` of their dtype (float32 updates, uint32 masked ones)."""
    return np.concatenate([np.asarray(arrays[name]).ravel() for name in sorted(layout)])


def unflatten(vector: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`: ``(d,)`` back to named arrays of the layout's shapes (views)."""
    out, offset = {}, 0
    for name in sorted(layout):
        size = int(np.prod(layout[name], dtype=np.int64))
        out[name] = vector[offset : offset + size].reshape(layout[name])
        offset += size
    if offset != vector.shape[0]:
        raise ValueError(f"vector has {vector.shape[0]} values, layout needs {offset}")
    return out


def quantize(vector: np.ndarray, weight: float, clip: float, bits: int) -> tuple[np.ndarray, int]:
    """``round(weight · clip(vector, ±clip) · 2^bits)`` as uint32 (two's complement).

    Args:
        vector: float32 ``(d,)``.
        weight: ``ω_k`` in ``[0, 1]``.
        clip: ``C``.
        bits: ``f``.

    Returns:
        uint32 ``(d,)`` and the number of values that were clipped.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"a normalised aggregation weight must be in [0, 1], got {weight}")
    clipped = int(np.count_nonzero(np.abs(vector) > clip))
    x = vector.astype(np.float64)
    np.clip(x, -clip, clip, out=x)
    x *= weight * 2.0**bits
    np.rint(x, out=x)
    return x.astype(np.int32).view(np.uint32), clipped


def dequantize(total: np.ndarray, bits: int, weight_sum: float) -> np.ndarray:
    """The weighted mean ``Σ_k ω_k θ_k / Σ_k ω_k`` as float32 ``(d,)`` from the uint32 sum."""
    if not weight_sum > 0:
        raise ValueError(f"the survivors' weights must sum to a positive number, got {weight_sum}")
    return (total.view(np.int32).astype(np.float64) / (2.0**bits * weight_sum)).astype(np.float32)
