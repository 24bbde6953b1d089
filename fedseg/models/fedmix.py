"""FedMix: mixed supervised federated learning for medical image segmentation.

Paper: Wicaksana et al., "FedMix: Mixed Supervised Federated Learning for Medical
Image Segmentation", IEEE TMI 42:1955-1968 (2023), https://arxiv.org/abs/2205.01840.

Clients hold pixel masks, bounding boxes or image-level (lesion / no lesion)
labels. Two independently initialised U-Nets are co-trained:

* **Weak labels** (:func:`box_from_mask`, :func:`enlarge_box`,
  :func:`random_margins`, :func:`boxes_to_mask`, :func:`synthesize_box_masks`):
  benchmark boxes are the tight box around all foreground, each side enlarged by
  a random margin from U{1..max_box_margin} px on the paper's 224 px crops, scaled
  to the image's size, and clamped to the image.
* **Pseudo-labels** (:func:`select_pseudo_labels`): each network's thresholded
  prediction, restricted to the box, kept only where the two networks agree
  (Dice >= tau) and, on box clients, agree with the box (Dice >= box_agreement).
* **Co-training** (:class:`FedMixTrainer`): pixel clients train both networks on
  the ground truth; weak clients use cross pseudo-supervision (network 1 learns
  network 2's label and vice versa), with the plan's Dice + BCE loss.
* **Box projection** (:func:`box_projection_loss`, fedseg's addition): on box
  clients every image, its pseudo-label accepted or not, also teaches both networks
  that their prediction spans its box.
* **Adaptive aggregation** (:func:`adaptive_weights`): the server weights client
  k by ``(d_k + lam * s_k) / sum_j (d_j + lam * s_j)`` from its sample share
  ``d_k`` and loss share ``s_k``.

Where the reference code is wrong or silent, fedseg decides (METHODS.md §4): a weak
client that accepts no pseudo-label trains nothing and never falls back to any
ground truth, and a lesion-free image on an image-level client becomes an
all-background pseudo-label, accepted as is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedseg.models.augment import augment_batch
from fedseg.models.config import DictConfig, check_number
from fedseg.models.errors import ModelError
from fedseg.models.local_training import (
    RoundResult, TrainConfig, _as_float_images, _check_pair, _device, load_optimizer_state, torch_threads,
)
from fedseg.models.losses import DiceBCELoss, Losses
from fedseg.models.unet import UNetConfig, build_model

__all__ = [
    "MARGIN_REFERENCE_SIDE",
    "CoTrainedUNets",
    "FedMixConfig",
    "FedMixRoundResult",
    "FedMixTrainer",
    "Selection",
    "WEAK_TRAINING",
    "adaptive_weights",
    "aggregation_loss",
    "fixed_weights",
    "box_from_mask",
    "box_projection_loss",
    "boxes_to_mask",
    "enlarge_box",
    "random_margins",
    "select_pseudo_labels",
    "soft_agreement",
    "synthesize_box_masks",
]

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), inclusive-exclusive pixel coordinates

#: Side in pixels of the crops the paper's box margins U{1..9} px were drawn on.
MARGIN_REFERENCE_SIDE = 224
#: How weak nodes learn: FedMix's co-training, or FedST's self-training.
WEAK_TRAINING = ("cotraining", "self_training")


@dataclass(frozen=True)
class FedMixConfig(DictConfig):
    """FedMix hyper-parameters (paper defaults are the breast-ultrasound setting).

    Attributes:
        lam: λ, weight of the loss share in the adaptive aggregation weights; >= 0.
        beta: β, exponent on the client losses; >= 0.
        tau: Minimum Dice between the two networks' pseudo-labels; in [0, 1].
        box_agreement: Minimum Dice between network 1's pseudo-label and the box
            mask on box clients; in [0, 1].
        max_box_margin: Synthesised boxes are enlarged by U{1..max_box_margin} px
            per side on a :data:`MARGIN_REFERENCE_SIDE` px image, scaled to the
            actual size (at 64 px the paper's 9 px is about 3 px); >= 1.
        adaptive: False gives plain ``n_k / sum n`` weights (the ablation).
        weak_training: How weak nodes learn: ``"cotraining"`` (FedMix's cross
            pseudo-supervision with the acceptance rule) or ``"self_training"``
            (FedST, the paper's comparator: each network learns its own confident
            pixels of a gamma-shifted image; the weak labels are not used).
        warmup_rounds: Rounds in which only pixel nodes train (FedST's warm-up).
        weak_weight: If > 0, fixed aggregation weights replace the adaptive ones:
            each weak node gets ``weak_weight`` and the pixel nodes share the rest
            by sample count (FedST's [0.05, 0.05, 0.9]); in [0, 1).
        confidence: Self-training learns pixels with ``p > confidence`` or
            ``p < 1 - confidence``; in (0.5, 1).
        box_projection: Weight of :func:`box_projection_loss` on every image of a
            box node that accepted at least one pseudo-label, rejected images
            included; >= 0. 0 is the paper's FedMix, where a rejected image
            teaches nothing although its box says where the lesion is not.
    """

    lam: float = 10.0
    beta: float = 1.5
    tau: float = 0.9
    box_agreement: float = 0.5
    max_box_margin: int = 9
    adaptive: bool = True
    weak_training: str = "cotraining"
    warmup_rounds: int = 0
    weak_weight: float = 0.0
    confidence: float = 0.9
    box_projection: float = 1.0

    def __post_init__(self) -> None:
        check_number("FedMixConfig", "lam", self.lam, lo=0)
        check_number("FedMixConfig", "beta", self.beta, lo=0)
        check_number("FedMixConfig", "tau", self.tau, lo=0, hi=1)
        check_number("FedMixConfig", "box_agreement", self.box_agreement, lo=0, hi=1)
        check_number("FedMixConfig", "max_box_margin", self.max_box_margin, lo=1, integer=True)
        if not isinstance(self.adaptive, bool):
            raise ModelError(f"FedMixConfig.adaptive must be a bool, got {self.adaptive!r}")
        if self.weak_training not in WEAK_TRAINING:
            raise ModelError(f"FedMixConfig.weak_training must be one of {WEAK_TRAINING}, got {self.weak_training!r}")
        check_number("FedMixConfig", "warmup_rounds", self.warmup_rounds, lo=0, integer=True)
        check_number("FedMixConfig", "weak_weight", self.weak_weight, lo=0, hi=1, hi_open=True)
        check_number("FedMixConfig", "confidence", self.confidence, lo=0.5, hi=1, lo_open=True, hi_open=True)
        check_number("FedMixConfig", "box_projection", self.box_projection, lo=0)


# --------------------------------------------------------------------------- boxes


def _check_box(box: Any, height: int, width: int, name: str) -> Box:
    try:
        x0, y0, x1, y1 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise ModelError(f"{name} expects a box (x0, y0, x1, y1), got {box!r}") from None
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ModelError(
            f"{name} needs 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, "
            f"got box {(x0, y0, x1, y1)} for height={height}, width={width}"
        )
    return x0, y0, x1, y1


def _check_size(height: Any, width: Any, name: str) -> None:
    for label, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ModelError(f"{name} needs a positive int {label}, got {v!r}")


def box_from_mask(mask: np.ndarray) -> Box | None:
    """Tight box around all foreground pixels of one mask.

    Several blobs get one box around all of them, as in the paper.

    Args:
        mask: ``(H, W)``; nonzero is foreground.

    Returns:
        ``(x0, y0, x1, y1)`` with ``mask[y0:y1, x0:x1]`` holding every foreground
        pixel, or None if the mask is empty.

    Raises:
        ModelError: If ``mask`` is not 2D.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ModelError(f"box_from_mask expects a mask (H, W), got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def enlarge_box(box: Box, margin: tuple[int, int, int, int] | np.ndarray, height: int, width: int) -> Box:
    """Moves each side of a box outwards by its margin, clamped to the image.

    Args:
        box: ``(x0, y0, x1, y1)`` inside the ``height x width`` image.
        margin: ``(4,)`` non-negative ints for the left, top, right and bottom sides,
            e.g. one row of :func:`random_margins`.
        height: Image height H.
        width: Image width W.

    Returns:
        ``(max(0, x0 - ml), max(0, y0 - mt), min(W, x1 + mr), min(H, y1 + mb))``.

    Raises:
        ModelError: On a box outside the image or a margin that is not 4 ints >= 0.
    """
    _check_size(height, width, "enlarge_box")
    x0, y0, x1, y1 = _check_box(box, height, width, "enlarge_box")
    m = np.asarray(margin)
    if m.shape != (4,) or not np.issubdtype(m.dtype, np.integer) or (m < 0).any():
        raise ModelError(f"enlarge_box expects margin (4,) of ints >= 0, got {m.tolist()} with shape {m.shape}")
    ml, mt, mr, mb = (int(v) for v in m)
    return max(0, x0 - ml), max(0, y0 - mt), min(width, x1 + mr), min(height, y1 + mb)


def random_margins(rng: np.random.Generator, n: int, max_margin: int) -> np.ndarray:
    """Random per-side box margins drawn from U{1..max_margin}.

    Args:
        rng: Source of the draws.
        n: Number of boxes; >= 0.
        max_margin: Largest margin; >= 1.

    Returns:
        ``(n, 4)`` int64, columns left, top, right, bottom.

    Raises:
        ModelError: If ``n < 0`` or ``max_margin < 1``.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ModelError(f"random_margins needs n >= 0, got {n!r}")
    if not isinstance(max_margin, (int, np.integer)) or isinstance(max_margin, bool) or max_margin < 1:
        raise ModelError(f"random_margins needs max_margin >= 1, got {max_margin!r}")
    return rng.integers(1, max_margin, size=(n, 4), endpoint=True, dtype=np.int64)


def boxes_to_mask(boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    """Rasterises the union of boxes.

    Args:
        boxes: ``(x0, y0, x1, y1)`` boxes inside the image; may be empty.
        height: Image height H.
        width: Image width W.

    Returns:
        ``(H, W)`` bool, True inside any box (all False for no boxes).

    Raises:
        ModelError: On a malformed box or one outside the image.
    """
    _check_size(height, width, "boxes_to_mask")
    out = np.zeros((height, width), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = _check_box(box, height, width, "boxes_to_mask")
        out[y0:y1, x0:x1] = True
    return out


def synthesize_box_masks(masks: np.ndarray, rng: np.random.Generator, max_margin: int) -> np.ndarray:
    """Benchmark box labels from ground-truth masks (tight box + random margin per side).

    Composes :func:`box_from_mask`, :func:`random_margins`, :func:`enlarge_box` and
    :func:`boxes_to_mask`. One margin row is drawn per image, empty or not, so the
    draws for image i do not depend on which other images are empty.

    The margins are drawn in pixels of a :data:`MARGIN_REFERENCE_SIDE` px image, as
    the paper's are, and scaled to the masks' size (x by W/224, y by H/224, rounded):
    the same relative looseness at every size. Unscaled, a 9 px margin is 14 % of a
    64 px side, and the box rule then rejected even the ground truth on most images.

    Tight single-box masks (as a loader derives them from masks) are valid input
    too: their box is recovered exactly and enlarged, so calling this once per
    round with a round-seeded ``rng`` gives fresh margins each round, as the
    paper does. Boxes read from annotation files should not be enlarged.

    Args:
        masks: ``(N, 1, H, W)``; nonzero is foreground.
        rng: Source of the margins.
        max_margin: Largest margin at the reference side, e.g. ``FedMixConfig.max_box_margin``.

    Returns:
        ``(N, 1, H, W)`` bool box masks; all False where the mask is empty.

    Raises:
        ModelError: If ``masks`` is not ``(N, 1, H, W)``.
    """
    masks = np.asarray(masks)
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ModelError(f"synthesize_box_masks expects masks (N, 1, H, W), got shape {masks.shape}")
    n, _, h, w = masks.shape
    scale = np.array([w, h, w, h]) / MARGIN_REFERENCE_SIDE  # left, top, right, bottom
    margins = np.rint(random_margins(rng, n, max_margin) * scale).astype(np.int64)  # (N, 4)
    out = np.zeros(masks.shape, dtype=bool)
    for i in range(n):
        box = box_from_mask(masks[i, 0])
        if box is not None:
            out[i, 0] = boxes_to_mask([enlarge_box(box, margins[i], h, w)], h, w)
    return out


# --------------------------------------------------------------------------- selection


def soft_agreement(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Dice ``(2|a·b| + eps) / (|a| + |b| + eps)`` per sample, the paper's agreement score.

    Two empty masks score exactly 1; one empty and one not score about 0.

    Args:
        a: ``(B, ...)``, e.g. ``(B, 1, H, W)`` with values in {0, 1}.
        b: Same shape as ``a``.
        eps: Smoothing; > 0.

    Returns:
        ``(B,)`` float32.

    Raises:
        ModelError: On unequal shapes, fewer than 2 dims, or ``eps <= 0``.
    """
    if a.shape != b.shape or a.ndim < 2:
        raise ModelError(
            f"soft_agreement expects a and b (B, ...) of equal shape, got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if not eps > 0:
        raise ModelError(f"soft_agreement needs eps > 0, got {eps}")
    a, b = a.flatten(1).float(), b.flatten(1).float()  # (B, P)
    return (2 * (a * b).sum(1) + eps) / (a.sum(1) + b.sum(1) + eps)  # (B,)


def _is_binary(t: torch.Tensor) -> bool:
    return t.dtype == torch.bool or bool(((t == 0) | (t == 1)).all())


@dataclass
class Selection:
    """Pseudo-labels of one batch and which of them to train on.

    Attributes:
        accepted: ``(B,)`` bool.
        pseudo1: ``(B, 1, H, W)`` float in {0, 1}, network 1's label; trains network 2.
        pseudo2: ``(B, 1, H, W)`` float in {0, 1}, network 2's label; trains network 1.
    """

    accepted: torch.Tensor
    pseudo1: torch.Tensor
    pseudo2: torch.Tensor


def select_pseudo_labels(
    prob1: torch.Tensor,
    prob2: torch.Tensor,
    *,
    box_mask: torch.Tensor | None = None,
    has_lesion: torch.Tensor | None = None,
    config: FedMixConfig,
) -> Selection:
    """FedMix pseudo-labels ``y^m = 1[prob^m > 0.5]`` and the acceptance rule.

    * Box client (``box_mask`` given): ``y^m <- y^m ⊙ box_mask``; accept iff
      ``soft_agreement(y1, y2) >= tau`` and ``soft_agreement(y1, box_mask) >=
      box_agreement``. An image without a box is lesion-free: its label is all
      background, accepted as is.
    * Image-level client (``has_lesion`` given): a lesion-free image gets an
      all-background label, accepted as is (fedseg's fix; the reference ignores
      the flag). A lesion image is accepted iff ``soft_agreement(y1, y2) >= tau``
      and both labels are non-empty: an empty label contradicts the image's own
      label, and two empty labels would otherwise agree perfectly.

    Args:
        prob1: ``(B, 1, H, W)`` sigmoid output of network 1.
        prob2: ``(B, 1, H, W)`` sigmoid output of network 2.
        box_mask: ``(B, 1, H, W)`` in {0, 1}, the (enlarged) union of boxes per image.
        has_lesion: ``(B,)`` bool.
        config: Thresholds ``tau`` and ``box_agreement``.

    Returns:
        The selection; tensors on the device of ``prob1``.

    Raises:
        ModelError: Unless exactly one of ``box_mask``/``has_lesion`` is given, on
            mismatched shapes, a non-binary box mask or a non-bool ``has_lesion``.
    """
    if (box_mask is None) == (has_lesion is None):
        raise ModelError("select_pseudo_labels needs exactly one of box_mask and has_lesion")
    if prob1.ndim != 4 or prob1.shape[1] != 1 or prob1.shape != prob2.shape:
        raise ModelError(
            f"select_pseudo_labels expects prob1 and prob2 (B, 1, H, W) of equal shape, "
            f"got prob1 {tuple(prob1.shape)} and prob2 {tuple(prob2.shape)}"
        )
    y1 = (prob1 > 0.5).float()  # (B, 1, H, W)
    y2 = (prob2 > 0.5).float()
    if box_mask is not None:
        if box_mask.shape != prob1.shape:
            raise ModelError(
                f"select_pseudo_labels expects box_mask {tuple(prob1.shape)} like prob1, got {tuple(box_mask.shape)}"
            )
        if not _is_binary(box_mask):
            raise ModelError("select_pseudo_labels expects box_mask values in {0, 1}")
        box = box_mask.to(y1.device).float()
        y1, y2 = y1 * box, y2 * box
        # No box means no lesion: y1 = y2 = 0 = box, which passes both tests by
        # construction (empty Dice is 1); stated explicitly so it cannot drift.
        no_box = box.sum(dim=(1, 2, 3)) == 0  # (B,)
        ok = (soft_agreement(y1, y2) >= config.tau) & (soft_agreement(y1, box) >= config.box_agreement)
        accepted = ok | no_box
    else:
        assert has_lesion is not None
        if has_lesion.shape != prob1.shape[:1] or has_lesion.dtype != torch.bool:
            raise ModelError(
                f"select_pseudo_labels expects has_lesion ({prob1.shape[0]},) bool, "
                f"got {tuple(has_lesion.shape)} {has_lesion.dtype}"
            )
        lesion = has_lesion.to(y1.device)
        keep = lesion.float()[:, None, None, None]  # (B, 1, 1, 1): the presence vector c, broadcast
        y1, y2 = y1 * keep, y2 * keep
        non_empty = (y1.sum(dim=(1, 2, 3)) > 0) & (y2.sum(dim=(1, 2, 3)) > 0)  # (B,)
        accepted = ~lesion | ((soft_agreement(y1, y2) >= config.tau) & non_empty)
    return Selection(accepted=accepted, pseudo1=y1, pseudo2=y2)


def box_projection_loss(logits: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """Per-image loss that the prediction spans its box, the box supervision of BoxInst (Tian et al., CVPR 2021).

    A box fixes the projections of its lesion: the column-wise maximum of the mask is 1
    exactly on the box's columns, and the row-wise maximum on its rows. This is the
    Dice loss ``1 - 2 Σ p b / (Σ p² + Σ b²)`` between the predicted probability's
    projections and the box's, summed over both axes. It is 0 for any prediction that
    touches every row and column of the box and nothing outside it, so, unlike a
    pseudo-label, it does not say which pixels inside the box are lesion: it needs no
    agreement between the networks, and every box image can teach it. The margin of a
    synthesised box makes its target a few pixels wider than the lesion.

    Args:
        logits: ``(B, 1, H, W)``.
        box_mask: ``(B, 1, H, W)`` in {0, 1}, non-empty for every image.

    Returns:
        ``(B,)`` in [0, 2], with grad.

    Raises:
        ModelError: On unequal or non ``(B, 1, H, W)`` shapes, or an empty box mask.
    """
    if logits.ndim != 4 or logits.shape[1] != 1 or logits.shape != box_mask.shape:
        raise ModelError(
            f"box_projection_loss expects logits and box_mask (B, 1, H, W) of equal shape, "
            f"got logits {tuple(logits.shape)} and box_mask {tuple(box_mask.shape)}"
        )
    box = box_mask.to(logits.dtype)
    if not bool((box.flatten(1).sum(1) > 0).all()):
        raise ModelError("box_projection_loss needs a non-empty box on every image")
    prob = torch.sigmoid(logits)
    loss = logits.new_zeros(logits.shape[0])
    for axis in (2, 3):
        p, b = prob.amax(dim=axis).flatten(1), box.amax(dim=axis).flatten(1)  # (B, W) or (B, H)
        loss = loss + 1 - 2 * (p * b).sum(1) / ((p * p).sum(1) + (b * b).sum(1))
    return loss


# --------------------------------------------------------------------------- aggregation


def aggregation_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-image loss ``l`` that feeds the adaptive weights: near 0 for a correct prediction, empty or not.

    On an image with foreground it is the soft Dice loss ``1 - (2 Σ p y + smooth) /
    (Σ p + Σ y + smooth)``. On an all-background target the soft Dice stays near 1
    however right the prediction is (0.99 with every logit at -4: the probability mass
    of 4096 pixels), so there it is the mean foreground probability instead, the soft
    share of false-positive pixels: 0.018 for that prediction, 1 for all foreground.
    Without this, a node whose images are mostly lesion-free reports a high loss and,
    with λ = 10, takes over the aggregate.

    Args:
        logits: ``(B, 1, H, W)``.
        target: ``(B, 1, H, W)`` in {0, 1}.
        smooth: Dice smoothing; > 0.

    Returns:
        ``(B,)`` float in [0, 1], detached.

    Raises:
        ModelError: On unequal or non ``(B, 1, H, W)`` shapes.
    """
    if logits.ndim != 4 or logits.shape[1] != 1 or logits.shape != target.shape:
        raise ModelError(
            f"aggregation_loss expects logits and target (B, 1, H, W) of equal shape, "
            f"got logits {tuple(logits.shape)} and target {tuple(target.shape)}"
        )
    p = torch.sigmoid(logits.detach()).flatten(1)  # (B, P)
    y = target.detach().flatten(1).to(p.dtype)
    dice = 1 - (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)  # (B,)
    return torch.where(y.sum(1) > 0, dice, p.mean(1))


def _check_stats(stats: Mapping[str, tuple[Any, ...]]) -> dict[str, tuple[float, int, float]]:
    out = {}
    for node, pair in stats.items():
        try:
            loss, count, *rest = pair
            (share,) = rest or (1.0,)
        except (TypeError, ValueError):
            raise ModelError(f"adaptive_weights: node {node!r} needs (loss, count[, share]), got {pair!r}") from None
        is_number = isinstance(loss, (int, float, np.floating)) and not isinstance(loss, bool)
        if not is_number or not math.isfinite(loss) or loss < 0:
            raise ModelError(f"adaptive_weights: node {node!r} needs a finite loss >= 0, got {loss!r}")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ModelError(f"adaptive_weights: node {node!r} needs an int count >= 0, got {count!r}")
        if isinstance(share, bool) or not isinstance(share, (int, float, np.floating)) or not 0 <= share <= 1:
            raise ModelError(f"adaptive_weights: node {node!r} needs a share of taught images in [0, 1], got {share!r}")
        out[node] = (float(loss), int(count), float(share))
    if not any(n > 0 for _, n, _ in out.values()):
        raise ModelError(f"adaptive_weights: no node trained on any sample (counts {[n for _, n, _ in out.values()]})")
    return out


def adaptive_weights(stats: Mapping[str, tuple[Any, ...]], config: FedMixConfig) -> dict[str, float]:
    """FedMix aggregation weights from each node's round loss, sample count and share of images that taught it.

    With ``d_k = n_k / sum_j n_j`` and ``s_k = a_k l_k^β / sum_j a_j l_j^β``:
    ``w_k = (d_k + λ s_k) / sum_j (d_j + λ s_j)``, so a higher loss gives a higher
    weight. ``a_k`` is the share of its images that taught a weak node's update (1 on
    pixel nodes): its accepted pseudo-labels, or every image on a box node under
    ``box_projection``, which teaches each of them its box. It is the paper's formula
    when every image teaches, while a weak node whose update came from 2 of 300 images
    no longer takes a loss share like one whose update came from all, whatever its loss
    on those 2. Nodes with ``n_k == 0`` trained nothing: they get 0
    and are left out of every sum. If every participating loss is 0, the loss shares
    follow ``a_k`` alone. With ``config.adaptive`` False, ``w_k = d_k``.

    Args:
        stats: Node name to ``(l_k, n_k)`` or ``(l_k, n_k, a_k)``: network 1's mean
            :func:`aggregation_loss`, the number of samples it trained on (accepted
            pseudo-labels on weak nodes) and the share that taught it (default 1).
        config: ``lam``, ``beta`` and ``adaptive``.

    Returns:
        Node name to weight, for every node of ``stats`` in its order; sums to 1.

    Raises:
        ModelError: If a loss is negative or not finite, a count is not an int
            >= 0, a share is outside [0, 1], or no node has ``n_k > 0``.
    """
    active = {k: v for k, v in _check_stats(stats).items() if v[1] > 0}
    total_n = sum(n for _, n, _ in active.values())
    d = {k: n / total_n for k, (_, n, _) in active.items()}
    if config.adaptive:
        # Dividing by the largest loss first keeps l^β from overflowing; s is unchanged.
        top = max(l for l, _, _ in active.values())
        powered = {k: a * ((l / top) ** config.beta if top > 0 else 1.0) for k, (l, _, a) in active.items()}
        z = sum(powered.values())
        s = {k: p / z for k, p in powered.items()}
        raw = {k: d[k] + config.lam * s[k] for k in active}
        norm = sum(raw.values())  # = 1 + λ
        w = {k: v / norm for k, v in raw.items()}
    else:
        w = d
    return {k: w.get(k, 0.0) for k in stats}


def fixed_weights(counts: Mapping[str, tuple[int, bool]], weak_weight: float) -> dict[str, float]:
    """FedST's fixed aggregation weights: ``weak_weight`` per weak node, the rest to the pixel nodes.

    Pixel nodes share ``1 - weak_weight * (weak nodes that trained)`` by sample count;
    without pixel nodes the weak nodes share everything equally; a node that trained
    nothing gets 0.

    Args:
        counts: Node name to ``(n_k, weak)``.
        weak_weight: Each weak node's weight, in [0, 1).

    Returns:
        Node name to weight, in the order of ``counts``; sums to 1.

    Raises:
        ModelError: If no node trained, or the weak nodes' weights leave nothing
            for the pixel nodes.
    """
    weak = [k for k, (n, is_weak) in counts.items() if n > 0 and is_weak]
    pixel = {k: n for k, (n, is_weak) in counts.items() if n > 0 and not is_weak}
    if not weak and not pixel:
        raise ModelError("fixed_weights: no node trained on any sample")
    if not pixel:
        return {k: 1 / len(weak) if k in weak else 0.0 for k in counts}
    rest = 1 - weak_weight * len(weak)
    if rest <= 0:
        raise ModelError(f"fixed_weights: {len(weak)} weak nodes of weight {weak_weight} leave nothing for the pixel nodes")
    total = sum(pixel.values())
    return {k: weak_weight if k in weak else rest * pixel[k] / total if k in pixel else 0.0 for k in counts}


# --------------------------------------------------------------------------- model and training


class CoTrainedUNets(nn.Module):
    """The two independently initialised networks G1 and G2.

    ``forward`` is network 1's, so evaluation and prediction use G1 and code written
    for one U-Net (``evaluate``, ``predict``, ``state_to_arrays``) works unchanged.
    State-dict keys are ``net1.*`` and ``net2.*``; both networks are shared and
    aggregated with the same weights.

    Args:
        config: Architecture of both networks.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        # Consecutive draws from the torch RNG, so the two initialisations differ.
        self.net1 = build_model(config)
        self.net2 = build_model(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Network 1's logits.

        Args:
            x: ``(B, in_channels, H, W)`` float in [0, 1].

        Returns:
            Logits ``(B, out_channels, H, W)``.

        Raises:
            ModelError: On a malformed input (checked by the U-Net).
        """
        return self.net1(x)


@dataclass
class FedMixRoundResult(RoundResult):
    """:class:`RoundResult` plus the pseudo-label counts.

    ``n_samples`` is N on a pixel node and the number of accepted pseudo-labels on
    a weak node (0 if it trained nothing); ``mean_loss`` is network 1's.

    Attributes:
        accepted: Pseudo-labels accepted this round (0 on pixel nodes).
        candidates: Weak images considered this round (0 on pixel nodes).
    """

    accepted: int
    candidates: int


class FedMixTrainer:
    """One FedMix round on a pixel, box or image-level node.

    Not a :class:`~fedseg.models.local_training.LocalTrainer` subclass: its step
    trains one network on one target, while FedMix steps two networks with their
    own optimizers, clipping and (on weak nodes) different targets. The loop below
    keeps LocalTrainer's order (forward, loss, backward, clip, step, zero_grad),
    sampling and augmentation.

    Each network has one Adam, built with the trainer; pass the state a previous
    round left (:attr:`optimizer_state`) to continue it, as the reference keeps each
    network's optimizer across rounds: a fresh Adam's first step moves every
    parameter by about the full learning rate, which on a weak node that accepted a
    few images is a large, noisy move.

    Training uses the plan's Dice + BCE loss (``TrainConfig.lambda_dice``/
    ``lambda_bce``), as FedAvg's does; ``lambda_bce=0`` gives the paper's
    ``1 - soft Dice``. The loss each round reports (``mean_loss``), which feeds the
    adaptive weights, is network 1's :func:`aggregation_loss`.

    Args:
        model: The two networks, trained in place.
        train: Optimiser, batch, epoch, augmentation, clipping and thread settings.
        fedmix: Pseudo-label thresholds and how weak nodes learn.
        optimizer_state: :attr:`optimizer_state` of an earlier trainer of the same
            networks, or None for fresh optimizers.

    Raises:
        ModelError: If the model is not a :class:`CoTrainedUNets`, or the optimizer
            state does not fit its networks.
    """

    def __init__(
        self, model: CoTrainedUNets, train: TrainConfig, fedmix: FedMixConfig, optimizer_state: dict[str, Any] | None = None
    ) -> None:
        if not isinstance(model, CoTrainedUNets):
            raise ModelError(f"FedMixTrainer needs a CoTrainedUNets model, got {type(model).__name__}")
        self.model = model
        self.config = train
        self.fedmix = fedmix
        self.loss_fn = DiceBCELoss(lambda_dice=train.lambda_dice, lambda_bce=train.lambda_bce)
        self.nets = {"net1": model.net1, "net2": model.net2}
        # One optimizer per network, holding only that network's parameters.
        self.optimizers = {
            name: torch.optim.Adam(net.parameters(), lr=train.lr, weight_decay=train.weight_decay) for name, net in self.nets.items()
        }
        if optimizer_state is not None:
            load_optimizer_state(self.optimizers, optimizer_state)

    @property
    def optimizer_state(self) -> dict[str, Any]:
        """Each network's Adam state (``{"net1": .., "net2": ..}``), to continue in the next round."""
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def compute_loss(self, logits: torch.Tensor, target: torch.Tensor) -> Losses:
        """Loss of one network on one batch: the plan's Dice + BCE (``TrainConfig`` lambdas).

        Args:
            logits: ``(B, 1, H, W)``.
            target: ``(B, 1, H, W)`` float in {0, 1}.

        Returns:
            The loss and its parts.
        """
        return self.loss_fn(logits, target)

    def train_round(
        self,
        images: torch.Tensor,
        *,
        masks: torch.Tensor | None = None,
        box_masks: torch.Tensor | None = None,
        has_lesion: torch.Tensor | None = None,
        seed: int,
    ) -> FedMixRoundResult:
        """Runs one round; deterministic given the model and optimizer state, data and seed.

        Exactly one label kind is given. Pixel node (``masks``): both networks
        train on the ground truth. Weak node (``box_masks`` or ``has_lesion``), with
        co-training: each image is augmented once, both networks predict it in eval
        mode, and :func:`select_pseudo_labels` picks the triples ``(x_aug, y1, y2)``;
        network 1 then trains toward ``y2`` and network 2 toward ``y1``. With
        ``box_projection`` > 0, a box node also trains both networks on
        :func:`box_projection_loss` over all its images, the rejected ones included;
        ``n_samples`` still counts the accepted pseudo-labels, the ``n_k`` of the
        adaptive weights. A weak node that accepts nothing trains nothing
        (``n_samples == 0``, weights untouched).
        With self-training (FedST) every image is used and the weak labels are not.

        Args:
            images: ``(N, C, H, W)`` uint8 (scaled by 1/255) or float in [0, 1].
            masks: ``(N, 1, H, W)`` in {0, 1}, ground truth of a pixel node.
            box_masks: ``(N, 1, H, W)`` in {0, 1}, the enlarged union of boxes per
                image (empty for a lesion-free image) of a box node.
            has_lesion: ``(N,)`` bool, the labels of an image-level node.
            seed: Seeds shuffling and augmentation; the global torch RNG is
                neither read nor advanced.

        Returns:
            The round summary; ``parts`` holds each network's mean training loss
            (``dice_net1``, ``dice_net2``).

        Raises:
            ModelError: Unless exactly one label kind is given, or on mismatched
                shapes, empty data, non-binary box masks or non-bool ``has_lesion``.
        """
        given = [name for name, v in (("masks", masks), ("box_masks", box_masks), ("has_lesion", has_lesion))
                 if v is not None]
        if len(given) != 1:
            raise ModelError(f"train_round needs exactly one of masks, box_masks, has_lesion; got {given}")
        if masks is not None:
            _check_pair(images, masks, "train_round")
        elif box_masks is not None:
            _check_pair(images, box_masks, "train_round")
            if not _is_binary(box_masks):
                raise ModelError("train_round expects box_masks values in {0, 1}")
        else:
            assert has_lesion is not None
            if images.ndim != 4 or images.shape[0] == 0 or has_lesion.shape != images.shape[:1] or (
                has_lesion.dtype != torch.bool
            ):
                raise ModelError(
                    f"train_round expects images (N, C, H, W) with N >= 1 and has_lesion (N,) bool, "
                    f"got images {tuple(images.shape)} and has_lesion {tuple(has_lesion.shape)} {has_lesion.dtype}"
                )

        cfg = self.config
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        with torch_threads(cfg.threads):
            if masks is not None:
                x, y = _as_float_images(images), masks.float()
                result = self._fit(x, y, y, gen, augment=cfg.augment)
                accepted = candidates = 0
            elif self.fedmix.weak_training == "self_training":
                result = self._fit(_as_float_images(images), None, None, gen, augment=cfg.augment)
                accepted = candidates = images.shape[0]
            else:
                x, y1, y2, chosen, boxes = self._pseudo_label(images, box_masks, has_lesion, gen)
                accepted, candidates = int(chosen.sum()), images.shape[0]
                if accepted == 0:
                    # Never fall back to any ground truth (METHODS §4): train nothing.
                    result = (0, 0.0, 0, {})
                else:
                    # The triples are already augmented and stay fixed for the round.
                    result = self._fit(x, y2, y1, gen, augment=False, boxes=boxes, accepted=chosen if boxes is not None else None)
        n, mean_loss, steps, parts = result
        return FedMixRoundResult(
            n_samples=n,
            mean_loss=mean_loss,
            steps=steps,
            seconds=time.perf_counter() - start,
            parts=parts,
            accepted=accepted,
            candidates=candidates,
        )

    @torch.no_grad()
    def _pseudo_label(
        self,
        images: torch.Tensor,
        box_masks: torch.Tensor | None,
        has_lesion: torch.Tensor | None,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Augments every image once and labels it: ``(x_aug, y1, y2, accepted, boxes)`` on the model's device.

        Only the accepted images are kept, unless the box projection trains on every
        image of a box node; then all are, with their augmented boxes (else None).
        """
        model, cfg = self.model, self.config
        device = _device(model)
        keep_all = box_masks is not None and self.fedmix.box_projection > 0
        was_training = model.training
        model.eval()
        kept: list[tuple[torch.Tensor, ...]] = []
        try:
            # Chunked so that, without the projection, only the accepted augmented images are held.
            for i in range(0, images.shape[0], cfg.batch_size):
                # On the training device, where the batch is augmented too.
                xd = _as_float_images(images[i : i + cfg.batch_size]).to(device)  # (b, C, H, W)
                # Image-level nodes have nothing spatial to transform; a zero mask stands in.
                bb = box_masks[i : i + cfg.batch_size].float().to(device) if box_masks is not None else (
                    torch.zeros(xd.shape[0], 1, *xd.shape[-2:], device=device)
                )  # (b, 1, H, W)
                if cfg.augment:
                    # The box is a mask here, so it follows the image's geometry exactly.
                    xd, bb = augment_batch(xd, bb, gen)
                prob1 = torch.sigmoid(model.net1(xd))  # (b, 1, H, W)
                prob2 = torch.sigmoid(model.net2(xd))
                if box_masks is not None:
                    sel = select_pseudo_labels(prob1, prob2, box_mask=bb, config=self.fedmix)
                else:
                    assert has_lesion is not None
                    sel = select_pseudo_labels(
                        prob1, prob2, has_lesion=has_lesion[i : i + cfg.batch_size], config=self.fedmix
                    )
                keep = torch.ones_like(sel.accepted) if keep_all else sel.accepted  # (b,)
                kept.append((xd[keep], sel.pseudo1[keep], sel.pseudo2[keep], sel.accepted[keep], bb[keep]))
        finally:
            model.train(was_training)
        x, y1, y2, accepted, boxes = (torch.cat(parts) for parts in zip(*kept))
        # (n, C, H, W), (n, 1, H, W) twice, (n,), (n, 1, H, W); n = all images or the accepted ones
        return x, y1, y2, accepted, boxes if keep_all else None

    def _self_training_loss(self, net: nn.Module, xb: torch.Tensor, gen: torch.Generator) -> Losses:
        """FedST: BCE between the prediction on a gamma-shifted image (γ ~ U(0, 2)) and the
        network's own thresholded prediction on the image, on its confident pixels only."""
        with torch.no_grad():
            prob = torch.sigmoid(net(xb))  # (b, 1, H, W)
        confident = ((prob > self.fedmix.confidence) | (prob < 1 - self.fedmix.confidence)).float()
        gamma = (2 * torch.rand(xb.shape[0], generator=gen)).to(xb.device)[:, None, None, None]  # (b, 1, 1, 1)
        logits = net(xb.clamp_min(1e-6) ** gamma)
        bce = F.binary_cross_entropy_with_logits(logits, (prob > 0.5).float(), reduction="none")
        loss = (bce * confident).sum() / confident.sum().clamp_min(1)
        return Losses(total=loss, parts={"bce": loss.item()})

    def _fit(
        self,
        x: torch.Tensor,
        target1: torch.Tensor | None,
        target2: torch.Tensor | None,
        gen: torch.Generator,
        *,
        augment: bool,
        boxes: torch.Tensor | None = None,
        accepted: torch.Tensor | None = None,
    ) -> tuple[int, float, int, dict[str, float]]:
        """Trains net1 toward ``target1`` and net2 toward ``target2`` for one round.

        With ``augment`` the targets must be the same tensor (a pixel node's masks):
        one augmentation is drawn per batch and applied to it. Without targets each
        network self-trains (FedST). With ``boxes`` and ``accepted`` (a box node with
        the projection on), the targets count only on accepted images and the
        projection on every image with a box. Returns ``(n, mean net1 aggregation
        loss, steps, parts)``, ``n`` and the loss over the images with a target.
        """
        if augment and target1 is not target2:
            raise ModelError("internal: only a single shared target can be augmented during training")
        cfg = self.config
        device = _device(self.model)
        n = x.shape[0]
        # The epsilon stops float noise (0.1 * 30 = 3.0000000000000004) adding a step.
        total = math.ceil(cfg.local_epochs * n - 1e-9)
        steps = math.ceil(total / cfg.batch_size)
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(total / n))])
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        sums = {"net1": 0.0, "net2": 0.0}
        weigh, weighed_n = 0.0, 0
        # Which images have a box is fixed for the round: found once, not per step and network.
        has_box = None if boxes is None else boxes.flatten(1).sum(1) > 0  # (n,)
        for step in range(steps):
            idx = order[step * cfg.batch_size : min((step + 1) * cfg.batch_size, total)]
            # On the training device, where the batch is augmented too.
            xb = x[idx].to(device)  # (b, C, H, W)
            targets = {name: None if t is None else t[idx].to(device) for name, t in (("net1", target1), ("net2", target2))}
            bb = None if boxes is None else boxes[idx].to(device)  # (b, 1, H, W)
            ab = None if accepted is None else accepted[idx].to(device)  # (b,)
            hb = None if has_box is None else has_box[idx].to(device)  # (b,)
            if augment:
                # Pixel nodes (one shared mask) and self-training nodes (none; zeros stand in).
                shared = targets["net1"] if targets["net1"] is not None else torch.zeros_like(xb[:, :1])
                xb, yb = augment_batch(xb, shared, gen)
                targets = {name: None if t is None else yb for name, t in targets.items()}
            for name, net in self.nets.items():
                opt, yb = self.optimizers[name], targets[name]
                if yb is None:
                    # FedST's weights are fixed, so its own loss stands in for the aggregation loss.
                    losses = self._self_training_loss(net, xb, gen)
                    weighed = losses.total.detach().expand(len(idx))
                elif bb is None:
                    logits = net(xb)
                    losses = self.compute_loss(logits, yb)
                    weighed = aggregation_loss(logits, yb)
                else:
                    assert ab is not None and hb is not None
                    logits = net(xb)
                    losses = self._box_node_loss(logits, yb, bb, ab, hb)
                    weighed = aggregation_loss(logits[ab], yb[ab])
                losses.total.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                opt.step()
                net.zero_grad(set_to_none=True)
                sums[name] += losses.total.item() * len(idx)
                if name == "net1":
                    weigh += weighed.sum().item()
                    weighed_n += len(weighed)
        n_target = n if accepted is None else int(accepted.sum())
        return n_target, weigh / max(weighed_n, 1), steps, {"dice_net1": sums["net1"] / total, "dice_net2": sums["net2"] / total}

    def _box_node_loss(
        self, logits: torch.Tensor, target: torch.Tensor, box: torch.Tensor, accepted: torch.Tensor, has_box: torch.Tensor
    ) -> Losses:
        """A box node's loss on one batch: the pseudo-label loss on its accepted images plus
        ``box_projection`` times :func:`box_projection_loss` on its images with a box.

        A lesion-free image has no box and is always accepted, so every image adds a term.
        """
        total, parts = logits.new_zeros(()), {}
        if bool(accepted.any()):
            pseudo = self.compute_loss(logits[accepted], target[accepted])
            total, parts = total + pseudo.total, dict(pseudo.parts)
        if bool(has_box.any()):
            projection = box_projection_loss(logits[has_box], box[has_box]).mean()
            total = total + self.fedmix.box_projection * projection
            parts["projection"] = projection.item()
        return Losses(total=total, parts=parts)

