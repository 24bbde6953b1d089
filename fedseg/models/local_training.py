"""One round of local training, evaluation, prediction and state <-> arrays.

The step reads top to bottom in :meth:`LocalTrainer.train_round`. Methods from
papers subclass :class:`LocalTrainer` and override only the hooks they change
(``compute_loss``, ``before_round``, ``after_step``, ``parameters_to_train``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fedseg.models.augment import augment_batch
from fedseg.models.config import DictConfig, check_number
from fedseg.models.errors import ModelError
from fedseg.models.losses import DiceBCELoss, Losses
from fedseg.models.metrics import dice_per_image, iou_per_image, surface_distances_per_image

__all__ = [
    "LocalTrainer",
    "RoundResult",
    "TrainConfig",
    "arrays_to_state",
    "batch_indices",
    "evaluate",
    "load_optimizer_state",
    "predict",
    "state_to_arrays",
    "torch_threads",
]


@dataclass(frozen=True)
class TrainConfig(DictConfig):
    """Hyper-parameters of one local round.

    Attributes:
        lr: Adam learning rate.
        weight_decay: Adam (L2) weight decay.
        batch_size: Samples per step.
        local_epochs: Passes over the local data; fractions allowed, giving
            ``ceil(local_epochs * n / batch_size)`` steps.
        augment: Apply :func:`augment_batch` to every batch.
        grad_clip: Max global grad norm; 0 disables clipping.
        lambda_dice: Weight of the Dice term of the default loss.
        lambda_bce: Weight of the BCE term of the default loss.
        threads: torch intra-op threads used during the round.
        keep_optimizer: Each node keeps its Adam state across the rounds of a run
            (in its workdir; it never leaves the node) instead of starting a fresh
            one every round. None: the algorithm's default (FedMix keeps it, as its
            reference does; the others start fresh).
    """

    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    local_epochs: float = 1.0
    augment: bool = True
    grad_clip: float = 1.0
    lambda_dice: float = 1.0
    lambda_bce: float = 1.0
    threads: int = 1
    keep_optimizer: bool | None = None

    def __post_init__(self) -> None:
        check_number("TrainConfig", "lr", self.lr, lo=0, lo_open=True)
        check_number("TrainConfig", "weight_decay", self.weight_decay, lo=0, lo_open=False)
        check_number("TrainConfig", "batch_size", self.batch_size, lo=1, lo_open=False, integer=True)
        check_number("TrainConfig", "local_epochs", self.local_epochs, lo=0, lo_open=True)
        if not isinstance(self.augment, bool):
            raise ModelError(f"TrainConfig.augment must be a bool, got {self.augment!r}")
        check_number("TrainConfig", "grad_clip", self.grad_clip, lo=0, lo_open=False)
        check_number("TrainConfig", "lambda_dice", self.lambda_dice, lo=0, lo_open=False)
        check_number("TrainConfig", "lambda_bce", self.lambda_bce, lo=0, lo_open=False)
        if self.lambda_dice + self.lambda_bce == 0:
            raise ModelError("TrainConfig.lambda_dice and lambda_bce must not both be 0")
        check_number("TrainConfig", "threads", self.threads, lo=1, lo_open=False, integer=True)
        if self.keep_optimizer is not None and not isinstance(self.keep_optimizer, bool):
            raise ModelError(f"TrainConfig.keep_optimizer must be true, false or null, got {self.keep_optimizer!r}")


@dataclass
class RoundResult:
    """Summary of one local round.

    Attributes:
        n_samples: Local dataset size N (the FedAvg weight).
        mean_loss: Sample-weighted mean of the total loss over all steps.
        steps: Optimizer steps taken.
        seconds: Wall-clock duration of the round.
        parts: Sample-weighted means of the named loss parts.
    """

    n_samples: int
    mean_loss: float
    steps: int
    seconds: float
    parts: dict[str, float]


def _check_pair(images: torch.Tensor, masks: torch.Tensor, name: str) -> None:
    if images.ndim != 4 or masks.ndim != 4 or masks.shape[1] != 1 or (
        images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]
    ):
        raise ModelError(
            f"{name} expects images (N, C, H, W) and masks (N, 1, H, W), "
            f"got images {tuple(images.shape)} and masks {tuple(masks.shape)}"
        )
    if images.shape[0] == 0:
        raise ModelError(f"{name} needs at least one sample, got images {tuple(images.shape)}")


def _as_float_images(images: torch.Tensor) -> torch.Tensor:
    # Datasets store uint8 to save memory; the model contract is float in [0, 1].
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Runs the block with ``n`` torch intra-op threads, then restores the previous count.

    The count is process-wide, so a node (or a test running several in one process)
    sets it per piece of work rather than once.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def batch_indices(n: int, epochs: float, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The sample indices of every step of ``epochs`` passes over ``n`` samples.

    Steps take ``ceil(epochs * n)`` samples in all, from concatenated permutations, so
    fractional epochs and ``batch_size > n`` both just work.

    Returns:
        One int64 index tensor per step, ``ceil(epochs * n / batch_size)`` of them.
    """
    # The epsilon stops float noise (0.1 * 30 = 3.0000000000000004) adding a step.
    total = math.ceil(epochs * n - 1e-9)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(total / n))])
    return [order[i : min(i + batch_size, total)] for i in range(0, total, batch_size)]


def load_optimizer_state(optimizers: Mapping[str, torch.optim.Optimizer], state: Mapping[str, Any]) -> None:
    """Loads each optimizer's saved state, refusing state that does not fit.

    Args:
        optimizers: Name to optimizer.
        state: Name to ``optimizer.state_dict()``, for exactly the same names.

    Raises:
        ModelError: On other names, or a state whose parameter groups or sizes differ.
    """
    if set(state) != set(optimizers):
        raise ModelError(f"optimizer state is for {sorted(state)}, expected {sorted(optimizers)}")
    for name, opt in optimizers.items():
        try:
            opt.load_state_dict(state[name])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"optimizer state of {name} does not fit its parameters: {exc}") from None
        # load_state_dict checks only the parameter counts; moments of another shape would fail mid-round.
        for group in opt.param_groups:
            for p in group["params"]:
                bad = [k for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v) and v.ndim and v.shape != p.shape]
                if bad:
                    raise ModelError(f"optimizer state of {name} has {bad[0]} {tuple(opt.state[p][bad[0]].shape)} "
                                     f"for a parameter {tuple(p.shape)}")


class LocalTrainer:
    """Trains a model for one round on local data with overridable hooks.

    Args:
        model: The model to train in place, mapping ``(B, C, H, W)`` to
            logits ``(B, 1, H, W)``.
        config: Round hyper-parameters.
        optimizer_state: :attr:`optimizer_state` after an earlier round of the same
            model, to continue its Adam instead of starting a fresh one.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, optimizer_state: dict[str, Any] | None = None) -> None:
        self.model = model
        self.config = config
        self.loss_fn = DiceBCELoss(config.lambda_dice, config.lambda_bce)
        self._optimizer_state = optimizer_state

    @property
    def optimizer_state(self) -> dict[str, Any] | None:
        """The Adam state (``{"model": ..}``) after the last :meth:`train_round`, or the one given."""
        return self._optimizer_state

    def compute_loss(self, logits: torch.Tensor, target: torch.Tensor) -> Losses:
        """Loss of one batch; used by :meth:`train_round` at every step.

        Override to add penalties (e.g. a proximal term) to ``total`` and
        ``parts``.

        Args:
            logits: ``(B, 1, H, W)``.
            target: ``(B, 1, H, W)`` float in {0, 1}.

        Returns:
            The total loss and its named parts.
        """
        return self.loss_fn(logits, target)

    def before_round(self) -> None:
        """Called by :meth:`train_round` before the optimizer is built; no-op."""

    def after_step(self, step: int) -> None:
        """Called by :meth:`train_round` after each optimizer step; no-op.

        Args:
            step: Zero-based index of the step just taken.
        """

    def parameters_to_train(self) -> list[nn.Parameter]:
        """Parameters the optimizer of :meth:`train_round` updates; default all."""
        return list(self.model.parameters())

    def param_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        """The optimizer's parameter groups over ``params``; default one group with the config's weight decay."""
        return [{"params": params}]

    def train_round(self, images: torch.Tensor, masks: torch.Tensor, seed: int) -> RoundResult:
        """Runs one round; deterministic given the model state, data and seed.

        Args:
            images: ``(N, C, H, W)`` uint8 (scaled by 1/255) or float in [0, 1].
            masks: ``(N, 1, H, W)`` with values in {0, 1}.
            seed: Seeds shuffling and augmentation.

        Returns:
            The round summary.

        Raises:
            ModelError: On mismatched shapes or empty data.
        """
        _check_pair(images, masks, "train_round")
        cfg, model = self.config, self.model
        start = time.perf_counter()
        device = _device(model)
        x, y = _as_float_images(images), masks.float()
        n = x.shape[0]
        gen = torch.Generator().manual_seed(seed)
        batches = batch_indices(n, cfg.local_epochs, cfg.batch_size, gen)
        total = sum(len(idx) for idx in batches)

        with torch_threads(cfg.threads):
            self.before_round()
            params = self.parameters_to_train()
            opt = torch.optim.Adam(self.param_groups(params), lr=cfg.lr, weight_decay=cfg.weight_decay)
            if self._optimizer_state is not None:
                load_optimizer_state({"model": opt}, self._optimizer_state)
            model.train()
            model.zero_grad(set_to_none=True)
            loss_sum, part_sums = 0.0, {}
            for step, idx in enumerate(batches):
                # On the training device, where the batch is augmented too.
                xb, yb = x[idx].to(device), y[idx].to(device)  # (b, C, H, W), (b, 1, H, W)
                if cfg.augment:
                    xb, yb = augment_batch(xb, yb, gen)
                losses = self.compute_loss(model(xb), yb)
                losses.total.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                # On the model, not the optimizer: frozen-but-grad-enabled params
                # would otherwise accumulate gradients across steps.
                model.zero_grad(set_to_none=True)
                self.after_step(step)
                b = len(idx)
                loss_sum += losses.total.item() * b
                for k, v in losses.parts.items():
                    part_sums[k] = part_sums.get(k, 0.0) + v * b
            self._optimizer_state = {"model": opt.state_dict()}
        return RoundResult(
            n_samples=n,
            mean_loss=loss_sum / total,
            steps=len(batches),
            seconds=time.perf_counter() - start,
            parts={k: v / total for k, v in part_sums.items()},
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    batch_size: int = 16,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], Losses] | None = None,
) -> dict[str, float]:
    """Mean per-image foreground Dice/IoU/ASSD/HD95 and mean loss, in eval mode.

    Args:
        model: Maps ``(B, C, H, W)`` to logits ``(B, 1, H, W)``; its train/eval
            mode is restored afterwards.
        images: ``(N, C, H, W)`` uint8 or float in [0, 1].
        masks: ``(N, 1, H, W)`` with values in {0, 1}.
        batch_size: Samples per forward pass.
        loss_fn: Returns :class:`Losses`; default ``DiceBCELoss()``.

    Returns:
        ``{"dice", "iou", "assd", "hd95", "loss", "n"}``; "n" is N, "assd" and
        "hd95" are in pixels (see :func:`~fedseg.models.metrics.surface_distances_per_image`).

    Raises:
        ModelError: On mismatched shapes or empty data.
    """
    _check_pair(images, masks, "evaluate")
    loss_fn = loss_fn or DiceBCELoss()
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        dice, iou, assd, hd95, loss_sum = [], [], [], [], 0.0
        for i in range(0, images.shape[0], batch_size):
            xb = _as_float_images(images[i : i + batch_size]).to(device)
            yb = masks[i : i + batch_size].float().to(device)
            logits = model(xb)  # (b, 1, H, W)
            pred = torch.sigmoid(logits) > 0.5
            dice.append(dice_per_image(pred, yb))
            iou.append(iou_per_image(pred, yb))
            surface = surface_distances_per_image(pred, yb)
            assd.append(surface["assd"])
            hd95.append(surface["hd95"])
            loss_sum += loss_fn(logits, yb).total.item() * xb.shape[0]
    finally:
        model.train(was_training)
    n = images.shape[0]
    return {
        "dice": torch.cat(dice).mean().item(),
        "iou": torch.cat(iou).mean().item(),
        "assd": torch.cat(assd).mean().item(),
        "hd95": torch.cat(hd95).mean().item(),
        "loss": loss_sum / n,
        "n": n,
    }


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Binary masks: sigmoid of the logits thresholded at 0.5, in eval mode.

    Args:
        model: Maps ``(B, C, H, W)`` to logits ``(B, 1, H, W)``; its mode is restored.
        images: ``(N, C, H, W)`` uint8 or float in [0, 1].
        batch_size: Samples per forward pass.

    Returns:
        ``(N, 1, H, W)`` bool on the CPU.

    Raises:
        ModelError: If ``images`` is not 4D.
    """
    if images.ndim != 4:
        raise ModelError(f"predict expects images (N, C, H, W), got {tuple(images.shape)}")
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        out = [
            torch.sigmoid(model(_as_float_images(images[i : i + batch_size]).to(device))).cpu() > 0.5
            for i in range(0, images.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out)  # (N, 1, H, W)


def state_to_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Copies the full state dict to float32 numpy arrays.

    Args:
        model: Any module.

    Returns:
        State-dict key to a C-contiguous float32 array that shares no memory
        with the model, so later training cannot alter what was sent.
    """
    return {
        k: np.array(v.detach().cpu().numpy(), dtype=np.float32, order="C", copy=True)
        for k, v in model.state_dict().items()
    }


def arrays_to_state(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Loads arrays into the model after checking keys and shapes exactly.

    Nothing is loaded unless every check passes. Values are cast to each
    tensor's own dtype (e.g. back to int64 for integer buffers).

    Args:
        model: Module to update in place.
        arrays: State-dict key to array, as from :func:`state_to_arrays`.

    Raises:
        ModelError: Naming the first missing or unexpected key, or the first key
            whose shape differs (expected vs got).
    """
    state = model.state_dict()
    missing = [k for k in state if k not in arrays]
    if missing:
        raise ModelError(f"missing key {missing[0]!r} ({len(missing)} missing in total)")
    unexpected = [k for k in arrays if k not in state]
    if unexpected:
        raise ModelError(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in total)")
    for k, t in state.items():
        got = tuple(np.shape(arrays[k]))
        if got != tuple(t.shape):
            raise ModelError(f"shape mismatch for {k!r}: expected {tuple(t.shape)}, got {got}")
    model.load_state_dict(
        {k: torch.tensor(np.asarray(arrays[k]), dtype=t.dtype) for k, t in state.items()}
    )
