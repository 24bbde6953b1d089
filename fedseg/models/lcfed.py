"""LC-Fed: personalized federated segmentation by local calibration.

Paper: Wang et al., "Personalizing Federated Medical Image Segmentation via Local
Calibration", ECCV 2022, pp. 456-472, https://arxiv.org/abs/2207.04655.

LC-Fed is adapted here to fedseg's GroupNorm U-Net (:class:`~fedseg.models.unet.UNet`)
rather than the paper's FedDG backbone. Two parts calibrate a shared model to a site:

* **PCS**, contrastive site embedding with channel selection (:class:`PCS`): after
  the deepest encoder stage, a learned embedding of the site's one-hot ``e_k`` and
  the pooled features choose channel weights ``A_k`` in (0, 1), and the features
  become ``x * A_k + x``. A contrastive term pushes ``A_k`` away from the
  attentions the other sites' one-hots would give on the same input:
  ``L_con = -1/(K-1) * sum_{j != k} MSE(A_k, A_j)``, with the ``A_j`` computed
  without gradient. Stage 1 minimizes ``L_seg + alpha * L_con``.
* **HC**, disagreement-aware head calibration (:class:`HeadCalibration`): in
  stage 2 every node applies all sites' heads to its own decoder features F,
  takes the per-pixel spread of their probabilities around its own, keeps the
  local peaks of that disagreement, blurs the peaks and its own probabilities
  with a fixed Gaussian, re-weights F by both maps and predicts with a 3x3 conv.
  Only that conv trains.

Shared and local parameters (``local_keys(model, LocalPart.HEAD)``): the encoder,
decoder and PCS are shared and averaged; the 1x1 ``head`` and ``hc`` stay on the
node. Each stage-1 round trains the head alone on the first ``head_fraction`` of
its samples, then the shared parameters alone (:func:`lcfed_round`).

Where the reference code is wrong or silent, fedseg decides (METHODS.md §4): PCS is
a registered, shared module; the contrastive loss is on (alpha = 0.1) with gradient
clipping at norm 1 (``TrainConfig.grad_clip``); parameters that do not train in a
phase are left out of the optimizer, so weight decay and Adam momentum cannot move
them; the heads a node needs for HC travel as a declared message
(:func:`head_arrays`), never its features or predictions; and HC's Gaussian and peak
window, given in pixels of the reference's 384 px images, scale with the image size
(:meth:`LCFedConfig.at_size`) while the blurred probabilities keep the reference's
strength (:meth:`HeadCalibration.smooth_probabilities`); PCS's site embedding has no
weight decay (:meth:`LCFedTrainer.param_groups`).

The segmentation loss is the project's ``DiceBCELoss`` from ``TrainConfig``
(per-image soft Dice plus BCE by default); set ``lambda_bce=0`` for the paper's
pure soft-Dice objective.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedseg.models.config import DictConfig, check_number
from fedseg.models.errors import ModelError
from fedseg.models.local_training import RoundResult, TrainConfig, _as_float_images, _check_pair, evaluate, predict, torch_threads
from fedseg.models.losses import Losses
from fedseg.models.personalization import PhaseTrainer
from fedseg.models.unet import UNet, UNetConfig

__all__ = [
    "CalibratedUNet",
    "HeadCalibration",
    "HeadLike",
    "LCFedConfig",
    "LCFedTrainer",
    "LCFedUNet",
    "PCS",
    "REFERENCE_IMAGE_SIZE",
    "Phase",
    "calibration_keeps",
    "gaussian_kernel",
    "head_arrays",
    "join_heads",
    "split_heads",
    "lcfed_phase_keys",
    "lcfed_round",
    "predict_calibrated",
    "site_onehot",
    "train_hc_round",
]

#: A site's segmentation head as received from the federation: a 1x1 conv module,
#: a ``(weight, bias)`` pair, or the mapping :func:`head_arrays` produces
#: (``{"head.weight": (C, width, 1, 1), "head.bias": (C,)}``); tensors or arrays.
HeadLike = Union[nn.Conv2d, tuple[Any, Any], Mapping[str, Any]]


#: The reference's HC filter, in pixels of its 384 x 384 polyp images.
REFERENCE_IMAGE_SIZE, REFERENCE_SIGMA, REFERENCE_WINDOW = 384, 6.0, 31


@dataclass(frozen=True)
class LCFedConfig(DictConfig):
    """LC-Fed settings shared by every node (the site index and count are per node
    and go to the :class:`LCFedUNet` constructor instead).

    Attributes:
        alpha: Weight of the contrastive PCS loss in stage 1 (the reference code
            ships 0; its author's later reimplementation and fedseg use 0.1).
        pcs: Whether the model has PCS at all (False: the "HC only" ablation).
        hc_epochs: Stage 2: local epochs that train HC once the heads are
            distributed. The heads and the shared body no longer change then, so
            one distribution and one local run equal the reference's repeated rounds
            (300 of 50 steps). Its inputs are computed once, so epochs are cheap.
        peak_threshold: HC keeps disagreement peaks whose normalized value is above this.
        gaussian_sigma: Standard deviation, in pixels, of HC's fixed Gaussian filter;
            None scales the reference's 6 px at 384 px to the plan's image size.
        window: Odd side, in pixels, of HC's peak (max-pool) window and Gaussian
            filter; None scales the reference's 31 px at 384 px likewise.
    """

    alpha: float = 0.1
    pcs: bool = True
    hc_epochs: float = 50.0
    peak_threshold: float = 0.2
    gaussian_sigma: float | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        check_number("LCFedConfig", "alpha", self.alpha, lo=0)
        check_number("LCFedConfig", "hc_epochs", self.hc_epochs, lo=0, lo_open=True)
        if not isinstance(self.pcs, bool):
            raise ModelError(f"LCFedConfig.pcs must be true or false, got {self.pcs!r}")
        check_number("LCFedConfig", "peak_threshold", self.peak_threshold, lo=0, hi=1, hi_open=True)
        if self.gaussian_sigma is not None:
            check_number("LCFedConfig", "gaussian_sigma", self.gaussian_sigma, lo=0, lo_open=True)
        if self.window is not None:
            check_number("LCFedConfig", "window", self.window, lo=1, integer=True)
            if self.window % 2 == 0:
                raise ModelError(f"LCFedConfig.window must be odd, got {self.window}")

    def at_size(self, image_size: int) -> LCFedConfig:
        """These settings with HC's filter in pixels of ``image_size`` (unset sizes scaled).

        The reference's sigma of 6 px and 31 px window are for 384 px images; kept
        as pixels at 64 px, the filter would span half the image and ``G(p_k)`` would
        sum a whole lesion into every pixel, which measured here left HC far below the
        stage-1 model (mean test IoU 15 against 25 on three polyp sites).

        Returns:
            A config whose ``gaussian_sigma`` and ``window`` are set; those the user
            set stay as they are.
        """
        check_number("LCFedConfig.at_size", "image_size", image_size, lo=1, integer=True)
        scale = image_size / REFERENCE_IMAGE_SIZE
        sigma = self.gaussian_sigma if self.gaussian_sigma is not None else REFERENCE_SIGMA * scale
        # The nearest odd size, at least 3 so that a peak has neighbours to beat.
        window = self.window if self.window is not None else max(3, 2 * round((REFERENCE_WINDOW * scale - 1) / 2) + 1)
        return replace(self, gaussian_sigma=sigma, window=window)


def _check_site(n_sites: Any, site: Any) -> None:
    for name, value in (("n_sites", n_sites), ("site", site)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelError(f"LC-Fed {name} must be an int, got {value!r}")
    if n_sites < 2:
        raise ModelError(f"LC-Fed needs n_sites >= 2 (the contrastive loss compares sites), got {n_sites}")
    if not 0 <= site < n_sites:
        raise ModelError(f"LC-Fed site must be in [0, {n_sites - 1}], got {site}")


def site_onehot(site: int, n_sites: int, device: torch.device | None = None) -> torch.Tensor:
    """The site's one-hot code ``e_k``.

    Args:
        site: Index k in ``[0, n_sites)``.
        n_sites: K >= 2.
        device: Where to put it.

    Returns:
        ``(K,)`` float32.

    Raises:
        ModelError: If the index or count is invalid.
    """
    _check_site(n_sites, site)
    onehot = torch.zeros(n_sites, device=device)
    onehot[site] = 1
    return onehot


class PCS(nn.Module):
    """Contrastive site embedding with channel selection, for C channels and K sites.

    ``xi = Conv1x1(C->C)(ReLU(Conv1x1(K->C)(e)))`` embeds the site code ``e``;
    ``phi = Conv1x1(2C->r) -> ReLU -> Conv1x1(r->C)`` with ``r = max(C // 16, 1)``
    is shared by the average- and max-pooled branches; ``A = sigmoid(phi([GAP(x); xi])
    + phi([GMP(x); xi]))``. All convs are bias-free.

    State-dict keys: ``embed.0.weight`` (C, K, 1, 1), ``embed.2.weight``,
    ``select.0.weight`` (r, 2C, 1, 1), ``select.2.weight`` (C, r, 1, 1).

    Args:
        channels: C, the channels of the features it re-weights.
        n_sites: K >= 2.

    Raises:
        ModelError: If ``channels < 1`` or ``n_sites < 2``.
    """

    def __init__(self, channels: int, n_sites: int) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ModelError(f"PCS channels must be an int >= 1, got {channels!r}")
        _check_site(n_sites, 0)
        self.channels, self.n_sites = channels, n_sites
        hidden = max(channels // 16, 1)
        self.embed = nn.Sequential(
            nn.Conv2d(n_sites, channels, 1, bias=False), nn.ReLU(), nn.Conv2d(channels, channels, 1, bias=False)
        )
        self.select = nn.Sequential(
            nn.Conv2d(2 * channels, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False)
        )

    def _check(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ModelError(f"PCS expects features (B, {self.channels}, h, w), got {tuple(x.shape)}")
        if onehot.ndim == 1:
            onehot = onehot.expand(x.shape[0], -1)
        if onehot.shape != (x.shape[0], self.n_sites):
            raise ModelError(
                f"PCS expects a site code ({self.n_sites},) or ({x.shape[0]}, {self.n_sites}), got {tuple(onehot.shape)}"
            )
        return onehot.to(x.dtype)[:, :, None, None]  # (B, K, 1, 1)

    def attention(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Channel attention of the site ``onehot`` on features ``x``.

        Args:
            x: Features ``(B, C, h, w)``.
            onehot: Site code ``(K,)`` or ``(B, K)``.

        Returns:
            ``A`` of shape ``(B, C, 1, 1)``, values in (0, 1).

        Raises:
            ModelError: On wrong shapes.
        """
        code = self._check(x, onehot)
        xi = self.embed(code)  # (B, C, 1, 1)
        avg = self.select(torch.cat([x.mean(dim=(2, 3), keepdim=True), xi], dim=1))  # (B, 2C, 1, 1) -> (B, C, 1, 1)
        peak = self.select(torch.cat([x.amax(dim=(2, 3), keepdim=True), xi], dim=1))  # (B, C, 1, 1)
        return torch.sigmoid(avg + peak)

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-weights the channels of ``x`` for the site ``onehot``.

        Args:
            x: Features ``(B, C, h, w)``.
            onehot: Site code ``(K,)`` or ``(B, K)``.

        Returns:
            ``(x * A + x, A)``: features ``(B, C, h, w)`` and attention ``(B, C, 1, 1)``.

        Raises:
            ModelError: On wrong shapes.
        """
        a = self.attention(x, onehot)
        return x * a + x, a

    def contrastive_loss(self, x: torch.Tensor, site: int, attention: torch.Tensor | None = None) -> torch.Tensor:
        """``L_con = -1/(K-1) * sum_{j != k} MSE(A_k, A_j)``, with ``A_j`` computed without gradient.

        Args:
            x: The features PCS re-weighted, ``(B, C, h, w)``.
            site: This node's index k.
            attention: ``A_k`` ``(B, C, 1, 1)`` if already computed on ``x`` (it keeps
                its gradient); computed here otherwise.

        Returns:
            A scalar <= 0 whose gradient reaches ``A_k`` only.

        Raises:
            ModelError: On wrong shapes or an invalid site.
        """
        own = attention if attention is not None else self.attention(x, site_onehot(site, self.n_sites, x.device))
        if own.shape != (x.shape[0], self.channels, 1, 1):
            raise ModelError(
                f"PCS.contrastive_loss expects attention ({x.shape[0]}, {self.channels}, 1, 1), got {tuple(own.shape)}"
            )
        total = own.new_zeros(())
        with torch.no_grad():
            codes = [site_onehot(j, self.n_sites, x.device) for j in range(self.n_sites) if j != site]
            others = [self.attention(x, code) for code in codes]  # K-1 x (B, C, 1, 1), no grad
        for other in others:
            total = total - F.mse_loss(own, other)
        return total / (self.n_sites - 1)


class LCFedUNet(UNet):
    """fedseg's U-Net with PCS after the deepest encoder stage and an HC module.

    The state-dict names of :class:`UNet` are kept (``encoder.*``, ``decoder.*``,
    ``head.*``), so a model built with the same torch seed starts from the same
    weights; PCS adds ``pcs.*`` (shared) and HC adds ``hc.*`` (local, used in
    stage 2 only). Input size rule as for :class:`UNet`: H and W multiples of
    ``2**depth``.

    Args:
        config: The U-Net architecture.
        n_sites: K, the number of sites in the federation, >= 2.
        site: This node's index k in ``[0, K)``; every node must agree on the order.
        lcfed: HC settings (peak threshold, Gaussian); defaults to :class:`LCFedConfig`.
        image_size: Side of the images the model sees, which sizes HC's filter
            (:meth:`LCFedConfig.at_size`).

    Raises:
        ModelError: On an invalid site index or count.
    """

    def __init__(self, config: UNetConfig, n_sites: int, site: int, lcfed: LCFedConfig | None = None,
                 image_size: int = REFERENCE_IMAGE_SIZE) -> None:
        _check_site(n_sites, site)
        super().__init__(config)
        self.n_sites, self.site = n_sites, site
        self.lcfed = lcfed or LCFedConfig()
        self.pcs = PCS(config.width * 2**config.depth, n_sites) if self.lcfed.pcs else None
        self.hc = HeadCalibration(config.width, config.out_channels, self.lcfed, image_size)
        # Not persistent: it is fixed by (site, n_sites), and a state-dict entry would be averaged.
        self.register_buffer("onehot", site_onehot(site, n_sites), persistent=False)  # (K,)

    def bottleneck(self, deep: torch.Tensor) -> torch.Tensor:
        """PCS re-weights the deepest features' channels for this site (if the model has PCS)."""
        return deep if self.pcs is None else self.pcs(deep, self.onehot)[0]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder features and head logits.

        Args:
            x: Images ``(B, in_channels, H, W)``, float in [0, 1].

        Returns:
            ``(F, logits)``: F ``(B, width, H, W)`` before the head, logits
            ``(B, out_channels, H, W)``.

        Raises:
            ModelError: On wrong rank, channels, dtype or spatial size.
        """
        feat = self.decode(self.encode(x))
        return feat, self.head(feat)  # (B, width, H, W), (B, out_channels, H, W)

    def contrastive_loss(self, x: torch.Tensor) -> torch.Tensor:
        """PCS's contrastive loss on images ``x`` ``(B, in_channels, H, W)``; a scalar <= 0.

        Raises:
            ModelError: On a wrong input shape, or if the model has no PCS.
        """
        if self.pcs is None:
            raise ModelError("this LC-Fed model was built without PCS (lcfed.pcs = false): it has no contrastive loss")
        return self.pcs.contrastive_loss(self.encode(x)[-1], self.site)


def gaussian_kernel(window: int, sigma: float) -> torch.Tensor:
    """``exp(-(u^2 + v^2) / (2 sigma^2))`` on a centred ``window x window`` grid; the peak is 1.

    Returns:
        ``(1, 1, window, window)`` float32.
    """
    u = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-(u**2) / (2 * sigma**2))  # (window,); separable, so the 2D peak is 1 * 1
    return torch.outer(g, g)[None, None]


def _head_tensors(head: HeadLike, width: int, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(head, nn.Conv2d):
        weight = head.weight
        bias = head.bias if head.bias is not None else torch.zeros(head.out_channels)
    elif isinstance(head, Mapping):
        if set(head) != {"head.weight", "head.bias"}:
            raise ModelError(f"a head mapping needs exactly 'head.weight' and 'head.bias', got {sorted(head)}")
        weight, bias = head["head.weight"], head["head.bias"]
    elif isinstance(head, (tuple, list)) and len(head) == 2:
        weight, bias = head
    else:
        raise ModelError(f"a head must be a 1x1 Conv2d, a (weight, bias) pair or head arrays, got {type(head).__name__}")
    # Received arrays are read-only views of a frame; torch wants writable memory.
    weight, bias = (torch.as_tensor(np.require(t, requirements="W") if isinstance(t, np.ndarray) else t).detach().float()
                    for t in (weight, bias))
    if tuple(weight.shape) != (n_classes, width, 1, 1) or tuple(bias.shape) != (n_classes,):
        raise ModelError(
            f"a head needs weight ({n_classes}, {width}, 1, 1) and bias ({n_classes},), "
            f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    return weight, bias


class HeadCalibration(nn.Module):
    """Disagreement-aware head calibration for one node (only ``conv`` trains).

    With ``p_j = sigmoid(h_j(F))`` for every head including the node's own ``p_k``:

    * ``U = sqrt(sum_j (p_j - p_k)^2 / (K-1))``, divided by its max per image and class;
    * ``P = 1[U == maxpool_window(U)] * 1[U > peak_threshold]``, the disagreement peaks;
    * ``S_u = G(P)`` with G the fixed Gaussian (peak 1), ``S_p = g * G(p_k)`` with the gain
      g that gives G the sum of the reference's filter at 384 px (1 there), so that the
      boost of a lesion does not fade with the image size;
    * per class c: ``F * S_u[c] + F`` and ``F * S_p[c] + F``, concatenated
      to ``(B, 2 * width * C, H, W)``, then ``Conv3x3 -> C`` logits.

    F, the heads and everything derived from them are detached.

    Args:
        width: Channels of F (the U-Net's ``width``).
        n_classes: C, the head's output channels.
        config: Peak threshold, Gaussian sigma and window.
        image_size: Side of the images, for a filter size left unset in ``config``.
    """

    def __init__(self, width: int, n_classes: int, config: LCFedConfig | None = None,
                 image_size: int = REFERENCE_IMAGE_SIZE) -> None:
        super().__init__()
        self.width, self.n_classes = width, n_classes
        self.config = (config or LCFedConfig()).at_size(image_size)
        self.conv = nn.Conv2d(2 * width * n_classes, n_classes, 3, padding=1)
        nn.init.zeros_(self.conv.bias)
        # A fixed filter, not a parameter; not persistent, as it follows from the config.
        kernel = gaussian_kernel(self.config.window, self.config.gaussian_sigma)  # (1, 1, window, window)
        self.register_buffer("gaussian", kernel, persistent=False)
        # The peak-1 filter sums to 222 at the reference's 384 px but to 6.2 at 64 px, so a
        # blurred probability map, which is dense, would boost a lesion 36 times less at
        # 64 px. Scaled to the reference's sum, G(p_k) keeps its strength at every size.
        # Disagreement peaks are one per window at any size, so their peak-1 bumps already do.
        self.dense_gain = (gaussian_kernel(REFERENCE_WINDOW, REFERENCE_SIGMA).sum() / kernel.sum()).item()

    @staticmethod
    def disagreement(own: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Normalized spread of the other heads' probabilities around the node's own.

        Args:
            own: ``p_k`` ``(B, C, H, W)``.
            others: ``p_j`` for the J = K-1 other heads, ``(B, J, C, H, W)``.

        Returns:
            ``U`` ``(B, C, H, W)`` in [0, 1]: 1 at each image's and class's maximum;
            all 0 where the heads agree everywhere.

        Raises:
            ModelError: On mismatched shapes or J = 0.
        """
        if (own.ndim != 4 or others.ndim != 5 or others.shape[1] == 0
                or others.shape[:1] + others.shape[2:] != own.shape):
            raise ModelError(
                f"disagreement expects own (B, C, H, W) and others (B, J>=1, C, H, W), "
                f"got {tuple(own.shape)} and {tuple(others.shape)}"
            )
        u = ((others - own[:, None]) ** 2).sum(dim=1).div(others.shape[1]).sqrt()  # (B, C, H, W)
        peak = u.amax(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        return torch.where(peak > 0, u / peak.clamp_min(torch.finfo(u.dtype).tiny), torch.zeros_like(u))

    def peak_map(self, u: torch.Tensor) -> torch.Tensor:
        """``1[U == maxpool(U)] * 1[U > peak_threshold]`` (what the reference calls NMS).

        Args:
            u: Normalized disagreement ``(B, C, H, W)``.

        Returns:
            ``(B, C, H, W)`` float in {0, 1}.
        """
        w = self.config.window
        pooled = F.max_pool2d(u, w, stride=1, padding=w // 2)  # (B, C, H, W); the padding is -inf
        return ((u == pooled) & (u > self.config.peak_threshold)).to(u.dtype)

    def smooth(self, m: torch.Tensor) -> torch.Tensor:
        """Applies the fixed Gaussian to every channel of ``m`` ``(B, C, H, W)``; same shape."""
        b, c, h, w = m.shape
        out = F.conv2d(m.reshape(b * c, 1, h, w), self.gaussian.to(m.dtype), padding=self.config.window // 2)
        return out.reshape(b, c, h, w)

    def smooth_probabilities(self, p: torch.Tensor) -> torch.Tensor:
        """``S_p``: the node's probabilities ``(B, C, H, W)`` blurred with the Gaussian scaled to
        the reference's sum, so a lesion's plateau is as strong at every image size."""
        return self.smooth(p) * self.dense_gain

    def maps(self, features: torch.Tensor, own_head: HeadLike, other_heads: Sequence[HeadLike]) -> torch.Tensor:
        """``S_u`` and ``S_p`` per class: everything HC derives from F and the heads, without gradient.

        Args:
            features: Decoder output F ``(B, width, H, W)``.
            own_head: This node's head h_k.
            other_heads: The other sites' heads, at least one; see :data:`HeadLike`.

        Returns:
            ``(B, 2C, H, W)``, class-major: ``S_u[c], S_p[c]`` for each class c.

        Raises:
            ModelError: On wrong shapes or no other head.
        """
        if features.ndim != 4 or features.shape[1] != self.width:
            raise ModelError(f"HeadCalibration expects features (B, {self.width}, H, W), got {tuple(features.shape)}")
        if len(other_heads) == 0:
            raise ModelError("HeadCalibration needs the heads of at least one other site")
        feat = features.detach()
        b, _, h, w = feat.shape
        c = self.n_classes
        with torch.no_grad():
            own_w, own_b = (t.to(feat) for t in _head_tensors(own_head, self.width, c))
            pairs = [_head_tensors(head, self.width, c) for head in other_heads]
            others_w = torch.cat([p[0] for p in pairs]).to(feat)  # (J*C, width, 1, 1)
            others_b = torch.cat([p[1] for p in pairs]).to(feat)  # (J*C,)
            own = torch.sigmoid(F.conv2d(feat, own_w, own_b))  # (B, C, H, W)
            others = torch.sigmoid(F.conv2d(feat, others_w, others_b)).reshape(b, len(pairs), c, h, w)
            s_u = self.smooth(self.peak_map(self.disagreement(own, others)))  # (B, C, H, W)
            s_p = self.smooth_probabilities(own)  # (B, C, H, W)
            return torch.stack([s_u, s_p], dim=2).reshape(b, 2 * c, h, w)

    def calibrate(self, features: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, H, W)`` from F ``(B, width, H, W)`` and :meth:`maps` ``(B, 2C, H, W)``;
        only here does the gradient reach ``conv``."""
        b, _, h, w = features.shape
        with torch.no_grad():
            feat = features.detach()[:, None]  # (B, 1, width, H, W)
            calibrated = (feat * maps[:, :, None] + feat).reshape(b, 2 * self.n_classes * self.width, h, w)
        return self.conv(calibrated)

    def forward(self, features: torch.Tensor, own_head: HeadLike, other_heads: Sequence[HeadLike]) -> torch.Tensor:
        """Calibrated logits ``(B, C, H, W)`` from F ``(B, width, H, W)`` and the heads (see :meth:`maps`).

        Raises:
            ModelError: On wrong shapes or no other head.
        """
        return self.calibrate(features, self.maps(features, own_head, other_heads))


def head_arrays(model: LCFedUNet) -> dict[str, np.ndarray]:
    """The node's head, as it travels to the other nodes for HC (the declared message).

    Returns:
        ``{"head.weight": (C, width, 1, 1), "head.bias": (C,)}`` float32 copies.
    """
    return {
        f"head.{k}": np.array(v.detach().cpu().numpy(), dtype=np.float32, order="C", copy=True)
        for k, v in model.head.state_dict().items()
    }


def join_heads(heads: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several sites' heads as one flat mapping, ``"<site>/head.weight"`` etc., to travel together."""
    return {f"{site}/{k}": v for site, head in heads.items() for k, v in head.items()}


def split_heads(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of :func:`join_heads`.

    Raises:
        ModelError: Naming a key that is not ``<site>/head.weight`` or ``<site>/head.bias``,
            or a site without both.
    """
    heads: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        site, _, name = key.rpartition("/")
        if not site or name not in ("head.weight", "head.bias"):
            raise ModelError(f"head arrays are keyed '<site>/head.weight' or '<site>/head.bias', got {key!r}")
        heads.setdefault(site, {})[name] = value
    incomplete = sorted(site for site, head in heads.items() if len(head) != 2)
    if incomplete:
        raise ModelError(f"the heads of {incomplete} lack head.weight or head.bias")
    return heads


class Phase(StrEnum):
    """What a stage-1 phase trains."""

    HEAD = "head"
    SHARED = "shared"


def lcfed_phase_keys(model: LCFedUNet, phase: Phase) -> frozenset[str]:
    """Parameter names a stage-1 phase trains: the head, or the encoder, decoder and PCS.

    HC is in neither; it trains only in stage 2.
    """
    names = [n for n, _ in model.named_parameters()]
    if phase is Phase.HEAD:
        return frozenset(n for n in names if n.startswith("head."))
    return frozenset(n for n in names if n.startswith(("encoder.", "decoder.", "pcs.")))


class LCFedTrainer(PhaseTrainer):
    """One stage-1 phase: segmentation loss plus ``alpha * L_con`` when PCS trains.

    Only the phase's parameters are in the optimizer. The contrastive term is
    computed from the deepest features and attention that the forward pass hands
    to PCS (captured with a forward hook for the duration of :meth:`train_round`),
    so the encoder is not run twice. Loss parts: ``dice``, ``bce`` and, in the
    shared phase, ``con`` (unweighted L_con).

    Args:
        model: The LC-Fed model to train in place.
        config: Round hyper-parameters; ``grad_clip`` 1 is LC-Fed's setting.
        lcfed: Supplies ``alpha``.
        phase: Which parameters train.
    """

    def __init__(self, model: LCFedUNet, config: TrainConfig, lcfed: LCFedConfig, phase: Phase) -> None:
        super().__init__(model, config, lcfed_phase_keys(model, phase))
        self.lcfed = lcfed
        self.phase = phase
        self._captured: tuple[torch.Tensor, torch.Tensor] | None = None

    def _capture(self, module: nn.Module, args: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._captured = (args[0], output[1])  # deepest features (B, C, h, w), A_k (B, C, 1, 1)

    def param_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        """PCS's site embedding without weight decay, the rest with the config's.

        On node k the embedding's columns for the other sites' codes get no loss
        gradient, only the decay, which Adam rescales into a full step toward zero at
        every step: measured over 12 rounds, the embedding's norm fell from 2.71 to 1.33
        and the sites' channel attentions stayed identical (spread 8e-4, against 0.11
        without decay on it). The reference uses no weight decay at all.
        """
        model: LCFedUNet = self.model  # type: ignore[assignment]
        embed = {id(p) for p in model.pcs.embed.parameters()} if model.pcs is not None else set()
        groups = [{"params": [p for p in params if id(p) not in embed]},
                  {"params": [p for p in params if id(p) in embed], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def compute_loss(self, logits: torch.Tensor, target: torch.Tensor) -> Losses:
        """Segmentation loss, plus ``alpha * L_con`` in the shared phase."""
        losses = super().compute_loss(logits, target)
        captured, self._captured = self._captured, None
        if captured is None:
            return losses
        model: LCFedUNet = self.model  # type: ignore[assignment]
        con = model.pcs.contrastive_loss(captured[0], model.site, attention=captured[1])
        return Losses(total=losses.total + self.lcfed.alpha * con, parts={**losses.parts, "con": con.item()})

    def train_round(self, images: torch.Tensor, masks: torch.Tensor, seed: int) -> RoundResult:
        """:meth:`LocalTrainer.train_round` with the PCS capture on in the shared phase."""
        if self.phase is not Phase.SHARED or self.lcfed.alpha == 0 or self.model.pcs is None:
            return super().train_round(images, masks, seed)
        handle = self.model.pcs.register_forward_hook(self._capture)
        try:
            return super().train_round(images, masks, seed)
        finally:
            handle.remove()
            self._captured = None


def lcfed_round(model: LCFedUNet, config: TrainConfig, lcfed: LCFedConfig, head_fraction: float,
                images: torch.Tensor, masks: torch.Tensor, seed: int) -> RoundResult:
    """One stage-1 round: the head alone on ``head_fraction`` of the samples, then the shared part.

    Args:
        model: Trained in place; HC does not move.
        config: Round hyper-parameters; ``local_epochs`` is split between the phases.
        lcfed: Supplies ``alpha``.
        head_fraction: Share of the samples for the head phase, in (0, 1) (10 of 50
            iterations in the paper: 0.2); the same setting as FedRep's.
        images: ``(N, C, H, W)`` uint8 or float in [0, 1].
        masks: ``(N, 1, H, W)`` in {0, 1}.
        seed: Seeds the head phase; the shared phase uses ``seed + 1``.

    Returns:
        The shared phase's result, with ``steps`` and ``seconds`` of both phases.

    Raises:
        ModelError: On mismatched shapes or empty data.
    """
    head_cfg = replace(config, local_epochs=config.local_epochs * head_fraction)
    shared_cfg = replace(config, local_epochs=config.local_epochs * (1 - head_fraction))
    first = LCFedTrainer(model, head_cfg, lcfed, Phase.HEAD).train_round(images, masks, seed)
    second = LCFedTrainer(model, shared_cfg, lcfed, Phase.SHARED).train_round(images, masks, seed + 1)
    return replace(second, steps=first.steps + second.steps, seconds=first.seconds + second.seconds)


class CalibratedUNet(nn.Module):
    """An LC-Fed model plus the other sites' heads, mapping images to HC logits.

    It fits :func:`~fedseg.models.local_training.evaluate`, ``predict`` and
    :class:`~fedseg.models.local_training.LocalTrainer` as is. The heads are copied
    into non-persistent buffers, so they follow ``.to(device)`` and never enter a
    state dict.

    Args:
        model: The node's stage-1 model (with the final shared parameters pulled).
        other_heads: The other sites' heads, at least one, by site name (or in a
            sequence, named by position); see :data:`HeadLike`.

    Raises:
        ModelError: If no head is given or one has the wrong shape.
    """

    def __init__(self, model: LCFedUNet, other_heads: Mapping[str, HeadLike] | Sequence[HeadLike]) -> None:
        super().__init__()
        if len(other_heads) == 0:
            raise ModelError("CalibratedUNet needs the heads of at least one other site")
        named = dict(other_heads) if isinstance(other_heads, Mapping) else {str(j): h for j, h in enumerate(other_heads)}
        self.model = model
        self.sites = list(named)
        self.n_heads = len(named)
        self.train(model.training)  # so predict/evaluate restore the model's own mode
        device = model.head.weight.device
        for j, head in enumerate(named.values()):
            weight, bias = _head_tensors(head, model.config.width, model.config.out_channels)
            self.register_buffer(f"other_weight_{j}", weight.clone().to(device), persistent=False)
            self.register_buffer(f"other_bias_{j}", bias.clone().to(device), persistent=False)

    def heads_arrays(self) -> dict[str, np.ndarray]:
        """The other sites' heads as :func:`join_heads` keys them, float32 copies."""
        return join_heads({
            site: {
                "head.weight": getattr(self, f"other_weight_{j}").detach().cpu().numpy().copy(),
                "head.bias": getattr(self, f"other_bias_{j}").detach().cpu().numpy().copy(),
            }
            for j, site in enumerate(self.sites)
        })

    def _heads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"other_weight_{j}"), getattr(self, f"other_bias_{j}")) for j in range(self.n_heads)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """HC logits ``(B, out_channels, H, W)`` for images ``(B, in_channels, H, W)``."""
        with torch.no_grad():
            feat, _ = self.model.features(x)  # (B, width, H, W)
        return self.model.hc(feat, self.model.head, self._heads())

    @torch.no_grad()
    def hc_inputs(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """What HC sees of each image, computed once in eval mode: F and :meth:`HeadCalibration.maps`.

        Args:
            images: ``(N, C, H, W)`` uint8 or float in [0, 1].
            batch_size: Images per forward pass.

        Returns:
            ``(N, width + 2 * out_channels, H, W)`` float32 on the model's device
            (``4 * (width + 2C) * H * W`` bytes per image).

        Raises:
            ModelError: On a wrong input shape.
        """
        device = self.model.head.weight.device
        was_training = self.model.training
        self.model.eval()
        try:
            out = []
            for i in range(0, images.shape[0], batch_size):
                feat, _ = self.model.features(_as_float_images(images[i : i + batch_size]).to(device))  # (b, width, H, W)
                out.append(torch.cat([feat, self.model.hc.maps(feat, self.model.head, self._heads())], dim=1))
        finally:
            self.model.train(was_training)
        return torch.cat(out)


class _CachedCalibration(nn.Module):
    """HC's conv over :meth:`CalibratedUNet.hc_inputs`, so that a trainer runs it like a model."""

    def __init__(self, hc: HeadCalibration) -> None:
        super().__init__()
        self.hc = hc

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.hc.calibrate(inputs[:, : self.hc.width], inputs[:, self.hc.width :])


def train_hc_round(model: LCFedUNet, other_heads: Mapping[str, HeadLike] | Sequence[HeadLike], images: torch.Tensor, masks: torch.Tensor,
                   config: TrainConfig, seed: int) -> RoundResult:
    """One stage-2 round: only ``model.hc`` trains, on the segmentation loss of its output.

    HC is one 3x3 conv on inputs that the fixed body and heads determine, so those inputs
    are computed once (:meth:`CalibratedUNet.hc_inputs`) and the epochs run over them,
    without augmentation: 50 epochs cost about one forward pass of the U-Net.

    Args:
        model: The node's model; everything but ``hc`` stays bit-identical.
        other_heads: The other sites' (fixed, stage-1) heads.
        images: ``(N, C, H, W)`` uint8 or float in [0, 1].
        masks: ``(N, 1, H, W)`` in {0, 1}.
        config: Round hyper-parameters (loss weights, lr, clipping, ...).
        seed: Seeds shuffling and augmentation.

    Returns:
        The round summary.

    Raises:
        ModelError: On mismatched shapes, empty data or bad heads.
    """
    _check_pair(images, masks, "train_hc_round")
    with torch_threads(config.threads):
        inputs = CalibratedUNet(model, other_heads).hc_inputs(images, config.batch_size)
    cached = _CachedCalibration(model.hc)
    keys = frozenset(n for n, _ in cached.named_parameters())
    return PhaseTrainer(cached, replace(config, augment=False), keys).train_round(inputs, masks, seed)


def calibration_keeps(model: LCFedUNet, calibrated: CalibratedUNet, images: torch.Tensor, masks: torch.Tensor,
                      batch_size: int = 16) -> bool:
    """Whether HC earns its place: the calibrated model's Dice on a held-out (validation)
    split is at least the stage-1 model's.

    HC trains from noise on one site's images for a few epochs; on a site with small
    lesions it can collapse to all background (measured: CVC-ColonDB, one seed of four,
    test IoU 0.1 against 15.5 for its stage-1 model), and a hospital should not be
    handed that model as its personalized one.

    Args:
        model: The stage-1 model (its ``hc`` trained, unused here).
        calibrated: ``CalibratedUNet`` over ``model``.
        images: Validation images ``(N, C, H, W)``, never the ones HC trained on.
        masks: Their masks ``(N, 1, H, W)``.
        batch_size: Samples per forward pass.

    Raises:
        ModelError: On mismatched shapes or empty data.
    """
    return evaluate(calibrated, images, masks, batch_size)["dice"] >= evaluate(model, images, masks, batch_size)["dice"]


def predict_calibrated(model: LCFedUNet, other_heads: Mapping[str, HeadLike] | Sequence[HeadLike], images: torch.Tensor,
                       batch_size: int = 16) -> torch.Tensor:
    """HC's binary masks: sigmoid of the calibrated logits thresholded at 0.5, in eval mode.

    Args:
        model: The node's model with a trained ``hc``.
        other_heads: The other sites' heads, as used in :func:`train_hc_round`.
        images: ``(N, C, H, W)`` uint8 or float in [0, 1].
        batch_size: Samples per forward pass.

    Returns:
        ``(N, out_channels, H, W)`` bool on the CPU.

    Raises:
        ModelError: On a wrong input shape or bad heads.
    """
    return predict(CalibratedUNet(model, other_heads), images, batch_size)
