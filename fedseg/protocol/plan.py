"""The training plan a coordinator sends: model, hyper-parameters and round settings."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from fedseg.models.config import DictConfig
from fedseg.models.errors import ModelError
from fedseg.models.fedmix import CoTrainedUNets, FedMixConfig
from fedseg.models.lcfed import LCFedConfig, LCFedUNet, head_arrays
from fedseg.models.personalization import LocalPart, PersonalConfig
from fedseg.models.local_training import TrainConfig
from fedseg.models.unet import SeededInit, UNet, UNetConfig, build_model

from .errors import PlanError

__all__ = ["AGGREGATIONS", "ALGORITHMS", "PERSONAL_MODELS", "SecAggConfig", "Plan"]

ALGORITHMS = ("fedavg", "fedmix", "local", "ft", "fedbn", "fedrep", "iopfl", "lcfed")
#: Algorithms whose nodes also score a personalized model of their own beside the global one.
PERSONAL_MODELS = ("ft", "iopfl", "lcfed")
#: Algorithms whose local training is one optimizer over fixed parameters, which a node can keep across rounds.
KEEPS_OPTIMIZER = ("fedavg", "fedmix", "local", "ft", "fedbn", "iopfl")
#: How the shared parameters are averaged: by each node's training images n_k (FedAvg), or
#: uniformly, 1/K (LC-Fed's reference). FedMix weighs by its own adaptive weights.
AGGREGATIONS = ("samples", "uniform")
#: What stays on each node per algorithm; the rest is shared and averaged.
_LOCAL_PARTS = {"local": LocalPart.ALL, "fedbn": LocalPart.NORM, "fedrep": LocalPart.HEAD, "lcfed": LocalPart.HEAD}


@dataclass(frozen=True)
class SecAggConfig(DictConfig):
    """Settings of secure aggregation (used when ``plan.secure_aggregation`` is on).

    Attributes:
        clip: Update values are clipped to ``[-clip, clip]`` before fixed-point encoding;
            every clipped value is counted and reported.
        scale_bits: Fixed-point fraction bits; 0 picks the most that cannot overflow the
            32-bit sum for the round's nodes. A value that could overflow is refused.
        threshold: Nodes that must survive to unmask (Shamir's t); 0 means a majority.
        timeout_s: How long the coordinator waits for one node in the key, mask and
            unmask steps (training keeps ``plan.timeout_s``).
    """

    clip: float = 8.0
    scale_bits: int = 0
    threshold: int = 0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("clip", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise PlanError(f"plan.secagg.{name} must be a positive number, got {value!r}")
        for name, hi in (("scale_bits", 30), ("threshold", 10_000)):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= hi:
                raise PlanError(f"plan.secagg.{name} must be an integer in [0, {hi}], got {value!r}")


@dataclass(frozen=True)
class Plan:
    """Everything a node needs to train and evaluate one federated run.

    Attributes:
        algorithm: Federated algorithm; one of :data:`ALGORITHMS`.
        rounds: Number of federated rounds.
        image_size: Side in pixels that every node resizes its images to.
        seed: Seeds the initial weights and every node's local shuffling.
        model: U-Net shape; ``model.in_channels`` decides grey or RGB on every node.
        train: Local training hyper-parameters.
        eval_batch_size: Batch size for evaluation on nodes.
        timeout_s: How long the coordinator waits for one node's answer.
        min_nodes: Nodes that must answer for a round to count; 0 means all.
        overlays: Prediction overlays each node writes into its own workdir per evaluation.
        max_message_mb: Largest message either side accepts.
        fedmix: FedMix settings (λ, β, τ, box agreement, adaptive weights); used by "fedmix".
        full_masks: Benchmark upper bound only: nodes whose weak labels were derived from
            masks train on those masks. Nodes with real weak labels refuse it.
        personal: Settings of the personalized baselines (FedRep's and LC-Fed's head phase,
            FT's fine-tuning, IOP-FL's running mix).
        lcfed: LC-Fed settings (contrastive weight, HC); used by "lcfed".
        aggregation: How the shared parameters are averaged, one of :data:`AGGREGATIONS`:
            "samples" weighs node k by its training images n_k, "uniform" by 1/K.
        sites: The federation's node names in a fixed order; LC-Fed's site index k of a
            node is its position here. The coordinator fills it from the invites.
        secure_aggregation: The coordinator learns only the weighted sum of the shared
            parameters (see :mod:`fedseg.protocol.secagg.protocol`).
        secagg: Settings of secure aggregation.
    """

    algorithm: str = "fedavg"
    rounds: int = 20
    image_size: int = 128
    seed: int = 0
    model: UNetConfig = field(default_factory=UNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_batch_size: int = 16
    timeout_s: float = 900.0
    min_nodes: int = 0
    overlays: int = 0
    max_message_mb: int = 256
    fedmix: FedMixConfig = field(default_factory=FedMixConfig)
    full_masks: bool = False
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    lcfed: LCFedConfig = field(default_factory=LCFedConfig)
    aggregation: str = "samples"
    sites: tuple[str, ...] = ()
    secure_aggregation: bool = False
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise PlanError(f"plan.algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        checks = {
            "rounds": (1, 100_000),
            "image_size": (8, 1024),
            "seed": (0, 2**31 - 1),
            "eval_batch_size": (1, 1024),
            "min_nodes": (0, 10_000),
            "overlays": (0, 64),
            "max_message_mb": (1, 4096),
        }
        for name, (lo, hi) in checks.items():
            value = getattr(self, name)
            if type(value) is not int or not lo <= value <= hi:
                raise PlanError(f"plan.{name} must be an integer in [{lo}, {hi}], got {value!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise PlanError(f"plan.timeout_s must be a positive number, got {self.timeout_s!r}")
        for name in ("full_masks", "secure_aggregation"):
            if not isinstance(getattr(self, name), bool):
                raise PlanError(f"plan.{name} must be true or false, got {getattr(self, name)!r}")
        if self.aggregation not in AGGREGATIONS:
            raise PlanError(f"plan.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.aggregation != "samples" and self.algorithm == "fedmix":
            raise PlanError("plan.aggregation applies to the averaging of fedavg and the personalized methods; "
                            "fedmix weighs nodes by its own adaptive weights (plan.fedmix.adaptive)")
        if self.secure_aggregation and self.local_part is LocalPart.ALL:
            raise PlanError(f"plan.secure_aggregation needs shared parameters; algorithm {self.algorithm!r} shares none")
        if not isinstance(self.sites, tuple) or not all(isinstance(n, str) and n for n in self.sites) or len(set(self.sites)) != len(self.sites):
            raise PlanError(f"plan.sites must be distinct node names, got {self.sites!r}")
        if self.algorithm == "lcfed" and len(self.sites) == 1:
            raise PlanError("lcfed needs at least 2 sites: its contrastive loss and HC compare sites")
        if self.keeps_optimizer and self.algorithm not in KEEPS_OPTIMIZER:
            raise PlanError(f"plan.train.keep_optimizer: {self.algorithm} trains phases with different parameters and "
                            f"cannot keep one optimizer across rounds (supported: {', '.join(KEEPS_OPTIMIZER)})")
        if self.image_size % 2**self.model.depth:
            raise PlanError(
                f"plan.image_size {self.image_size} must be a multiple of 2**model.depth = {2**self.model.depth}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Builds a plan from JSON, rejecting unknown keys at every level.

        Raises:
            PlanError: Naming the unknown key or the out-of-range value.
        """
        if not isinstance(d, dict):
            raise PlanError(f"plan must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise PlanError(f"unknown plan keys: {unknown}")
        values = dict(d)
        try:
            if "model" in values:
                values["model"] = UNetConfig.from_dict(_obj(values["model"], "model"))
            if "train" in values:
                values["train"] = TrainConfig.from_dict(_obj(values["train"], "train"))
            if "personal" in values:
                values["personal"] = PersonalConfig.from_dict(_obj(values["personal"], "personal"))
            if "fedmix" in values:
                values["fedmix"] = FedMixConfig.from_dict(_obj(values["fedmix"], "fedmix"))
            if "lcfed" in values:
                values["lcfed"] = LCFedConfig.from_dict(_obj(values["lcfed"], "lcfed"))
            if isinstance(values.get("sites"), list):
                values["sites"] = tuple(values["sites"])
            if "secagg" in values:
                values["secagg"] = SecAggConfig.from_dict(_obj(values["secagg"], "secagg"))
            return cls(**values)
        except ModelError as exc:
            raise PlanError(f"plan: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON would give it back (lists, not tuples), so a saved plan compares equal."""
        return {**asdict(self), "sites": list(self.sites)}

    def with_node_channels(self, channels: dict[str, int]) -> Plan:
        """The plan with the model's input channels the nodes' images have.

        Args:
            channels: Node name to the channels it described (1 grey, 3 RGB).

        Raises:
            PlanError: If the nodes differ, naming each: the model takes one kind, and
                copying grey into RGB (or the reverse) is the user's choice to make.
        """
        kinds = set(channels.values())
        if len(kinds) != 1:
            listed = ", ".join(f"{name} {'grey' if c == 1 else 'RGB'}" for name, c in sorted(channels.items()))
            raise PlanError(f"the nodes' images differ ({listed}): choose the model's input with --in-channels "
                            "(3: grey copied into RGB; 1: colour made grey)")
        return replace(self, model=replace(self.model, in_channels=kinds.pop()))

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 2**20

    @property
    def keeps_optimizer(self) -> bool:
        """Whether nodes continue their Adam state across rounds (``train.keep_optimizer``, else FedMix only)."""
        return self.algorithm == "fedmix" if self.train.keep_optimizer is None else self.train.keep_optimizer

    @property
    def local_part(self) -> LocalPart:
        """The parameters that never leave a node under this plan's algorithm."""
        return _LOCAL_PARTS.get(self.algorithm, LocalPart.NONE)

    def head_layout(self) -> dict[str, tuple[int, ...]]:
        """LC-Fed: name and shape of the head a node sends for the others' calibration."""
        return {k: v.shape for k, v in head_arrays(self.build_model()).items()}

    def build_model(self, node: str | None = None) -> UNet | CoTrainedUNets:
        """The network this plan's algorithm trains, initialised from ``plan.seed``.

        Every node and the coordinator build the same initial weights, so parameters that
        stay local start where the shared ones do. Torch's global generator is left alone
        (:class:`~fedseg.models.unet.SeededInit`): nodes in threads of one process may
        build at the same time, and the caller's random stream stays its own.

        Args:
            node: The node that builds it; LC-Fed's site code depends on it. The
                coordinator passes none (the shared weights do not depend on it).

        Raises:
            PlanError: For LC-Fed, if ``sites`` is empty or does not name ``node``.
        """
        with SeededInit(self.seed):
            if self.algorithm == "fedmix":
                return CoTrainedUNets(self.model)
            if self.algorithm == "lcfed":
                if not self.sites:
                    raise PlanError("lcfed needs plan.sites, the federation's node names in order (the coordinator fills it)")
                if node is not None and node not in self.sites:
                    raise PlanError(f"node {node} is not among plan.sites {list(self.sites)}")
                return LCFedUNet(self.model, len(self.sites), self.sites.index(node) if node else 0, self.lcfed, self.image_size)
            return build_model(self.model)


def _obj(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PlanError(f"plan.{name} must be an object, got {type(value).__name__}")
    return value
