"""Which parameters stay on a node and which are shared, for personalized federated methods.

Every method declares the state-dict keys that never leave the node: FedAvg and FT
share everything, FedBN keeps its normalization layers, FedRep keeps its head (Collins
et al., ICML 2021), and Local keeps everything. :func:`push` returns exactly the shared
arrays and :func:`pull` loads exactly those, so personalized layers cannot leak by
accident. FedRep trains its head and its body in separate phases, and a phase's frozen
parameters are left out of the optimizer, not merely given no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np
import torch
from torch import nn

from fedseg.models.config import DictConfig, check_number
from fedseg.models.errors import ModelError
from fedseg.models.local_training import LocalTrainer, RoundResult, TrainConfig

__all__ = ["LocalPart", "PersonalConfig", "local_keys", "push", "pull", "PhaseTrainer", "fedrep_round"]

_NORMS = (nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm)


class LocalPart(StrEnum):
    """What stays on the node."""

    NONE = "none"
    NORM = "norm"
    HEAD = "head"
    ALL = "all"


@dataclass(frozen=True)
class PersonalConfig(DictConfig):
    """Settings of the personalized baselines.

    Attributes:
        head_fraction: FedRep: share of each round's samples spent on the head phase
            (LC-Fed's schedule trains the head for 10 of 50 iterations: 0.2).
        finetune_epochs: FT: local epochs of fine-tuning from the global model before
            a node scores its personalized model.
        alpha: IOP-FL: weight of the previous running mix, p = α·p + (1−α)·θ.
        mix_epochs: IOP-FL: local epochs a node trains a copy of its round's model on
            its own data before mixing it in (θ above); the update it shares is not
            affected. 0, the reference, mixes in the round's model itself, which is one
            local epoch from the global model: experts that barely differ.
    """

    head_fraction: float = 0.2
    finetune_epochs: float = 1.0
    alpha: float = 0.1
    mix_epochs: float = 0.0

    def __post_init__(self) -> None:
        check_number("PersonalConfig", "head_fraction", self.head_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
        check_number("PersonalConfig", "finetune_epochs", self.finetune_epochs, lo=0, lo_open=True)
        check_number("PersonalConfig", "alpha", self.alpha, lo=0, hi=1, hi_open=True)
        check_number("PersonalConfig", "mix_epochs", self.mix_epochs, lo=0)


def local_keys(model: nn.Module, part: LocalPart) -> frozenset[str]:
    """State-dict keys that stay on the node under ``part``."""
    keys = model.state_dict().keys()
    if part is LocalPart.NONE:
        return frozenset()
    if part is LocalPart.ALL:
        return frozenset(keys)
    if part is LocalPart.HEAD:
        # The head and, where a model has one, LC-Fed's calibration of it ("hc").
        return frozenset(k for k in keys if k.startswith(("head.", "hc.")) or ".head." in k or ".hc." in k)
    norm_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, _NORMS))
    return frozenset(k for k in keys if k.startswith(norm_prefixes))


def push(model: nn.Module, local: frozenset[str]) -> dict[str, np.ndarray]:
    """The shared arrays only: float32 copies of every state-dict entry not in ``local``."""
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in model.state_dict().items() if k not in local}


def pull(model: nn.Module, shared: dict[str, np.ndarray], local: frozenset[str]) -> None:
    """Loads exactly the shared arrays, leaving the local ones as they are.

    Raises:
        ModelError: Naming the first missing or unexpected key, or a mismatched shape;
            nothing is loaded then.
    """
    state = model.state_dict()
    expected = set(state) - local
    missing, extra = sorted(expected - set(shared)), sorted(set(shared) - expected)
    if missing or extra:
        raise ModelError(f"shared arrays: missing {missing[:5]}, unexpected {extra[:5]} (local keys never travel)")
    for k in expected:
        if tuple(shared[k].shape) != tuple(state[k].shape):
            raise ModelError(f"shared array {k}: shape {tuple(shared[k].shape)}, expected {tuple(state[k].shape)}")
    with torch.no_grad():
        for k in expected:
            # Received arrays are read-only views of the frame; copy_ copies them anyway.
            state[k].copy_(torch.from_numpy(np.require(shared[k], requirements="W")))


class PhaseTrainer(LocalTrainer):
    """Trains only the parameters whose names are in ``keys``; the others are not in the optimizer."""

    def __init__(self, model: nn.Module, config: TrainConfig, keys: frozenset[str]) -> None:
        super().__init__(model, config)
        self.keys = keys

    def parameters_to_train(self) -> list[nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if name in self.keys]


def fedrep_round(model: nn.Module, config: TrainConfig, images: torch.Tensor, masks: torch.Tensor, seed: int, head_fraction: float) -> RoundResult:
    """FedRep's round: the head trains first with the body fixed, then the body with the head fixed.

    Returns:
        The body phase's result, with ``steps`` and ``seconds`` of both phases.
    """
    head = local_keys(model, LocalPart.HEAD)
    body = frozenset(n for n, _ in model.named_parameters()) - head
    head_cfg = replace(config, local_epochs=config.local_epochs * head_fraction)
    body_cfg = replace(config, local_epochs=config.local_epochs * (1 - head_fraction))
    first = PhaseTrainer(model, head_cfg, head).train_round(images, masks, seed)
    second = PhaseTrainer(model, body_cfg, body).train_round(images, masks, seed + 1)
    return replace(second, steps=first.steps + second.steps, seconds=first.seconds + second.seconds)
