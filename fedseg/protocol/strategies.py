"""Federated strategies: who is asked to train, and how replies are combined.

A strategy does no I/O: the round engine sends what ``configure`` returns and hands
``aggregate`` the valid replies. Secure aggregation (:mod:`.secagg.coordinator`) takes only
``linear`` strategies: it asks them for ``weights`` from the declared scalars and never
hands them an update.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from fedseg.models.errors import ModelError
from fedseg.models.fedmix import adaptive_weights, fixed_weights

from .aggregate import weighted_average
from .errors import PlanError, RoundError
from .messages import Arrays, DescribeReply, SecAggTrainReply, TrainReply, TrainRequest
from .plan import Plan

__all__ = ["Strategy", "FedAvg", "FedMix", "make_strategy"]


class Strategy(ABC):
    """Base of federated strategies.

    Attributes:
        linear: True if the aggregate is a weighted sum of updates whose weights are known
            from declared scalars, so secure aggregation can compute it without seeing any
            single update.
    """

    linear: ClassVar[bool] = False

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    @abstractmethod
    def participants(self, nodes: Mapping[str, DescribeReply]) -> list[str]:
        """The nodes that train; raises PlanError naming why the plan cannot work on these nodes."""

    def configure(self, round_: int, arrays: Arrays, run_id: str, nodes: Mapping[str, DescribeReply]) -> dict[str, TrainRequest]:
        """The train request for each participating node: the same plan and global weights."""
        request = TrainRequest(run_id=run_id, round=round_, plan=self.plan.to_dict(), weights=arrays)
        return {name: request for name in self.participants(nodes)}

    @abstractmethod
    def weights(self, replies: Mapping[str, TrainReply]) -> dict[str, float]:
        """Aggregation weight per replying node (0 leaves a node out)."""

    def aggregate(self, round_: int, replies: Mapping[str, TrainReply]) -> tuple[Arrays, dict[str, Any]]:
        """New global arrays and round metrics from the valid replies."""
        weights = self.weights(replies)
        arrays = weighted_average([(replies[name].weights, w) for name, w in weights.items() if w > 0])
        return arrays, self.metrics(replies, weights)

    @staticmethod
    def metrics(replies: Mapping[str, TrainReply | SecAggTrainReply], weights: dict[str, float]) -> dict[str, Any]:
        """Round metrics from the declared scalars alone, so a secure round reports the same."""
        n = sum(r.n_samples for r in replies.values())
        loss = sum(r.mean_loss * r.n_samples for r in replies.values()) / max(n, 1)
        return {"train_loss": loss, "n_train": n, "weights": weights}


class FedAvg(Strategy):
    """McMahan et al.: average of node weights, weighted by their sample counts (or
    uniformly, with ``plan.aggregation = "uniform"``).

    Only pixel-labelled nodes train (the FedAvg-pixel baseline of a mixed federation);
    with ``plan.full_masks`` every node trains on masks (the benchmark upper bound).
    """

    linear = True

    def participants(self, nodes: Mapping[str, DescribeReply]) -> list[str]:
        names = [n for n, d in nodes.items() if self.plan.full_masks or d.label_kind == "pixel"]
        if not names:
            raise PlanError("fedavg needs at least one node with pixel labels (or plan.full_masks for a benchmark)")
        return names

    def weights(self, replies: Mapping[str, TrainReply]) -> dict[str, float]:
        if self.plan.aggregation == "uniform":
            return {name: 1.0 for name in replies}
        return {name: float(r.n_samples) for name, r in replies.items()}


class FedMix(Strategy):
    """FedMix (TMI 2023): every label kind trains; adaptive weights from (loss, count, share of images that taught the update).

    With ``plan.fedmix.warmup_rounds`` only pixel nodes train in the first rounds, and
    with ``plan.fedmix.weak_weight`` the weights are fixed instead (FedST, the paper's
    comparator). A weak node is one that reports candidates (its weak images).

    A weak node's loss share counts as much as the share of its images that taught its
    update: the accepted pseudo-labels, except on a box node under the box projection,
    where every image teaches (see :func:`adaptive_weights`). The engine asks for the
    participants before any round, which is when the box nodes become known.
    """

    linear = True

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self._box_nodes: frozenset[str] = frozenset()

    def participants(self, nodes: Mapping[str, DescribeReply]) -> list[str]:
        self._box_nodes = frozenset(n for n, d in nodes.items() if d.label_kind == "box")
        if not any(d.label_kind == "pixel" for d in nodes.values()):
            kinds = {n: d.label_kind for n, d in nodes.items()}
            raise PlanError(f"fedmix needs at least one node with pixel labels to bootstrap pseudo-labels; nodes have {kinds}")
        unusable = {n: d.label_kind for n, d in nodes.items() if d.label_kind not in ("pixel", "box", "image")}
        if unusable:
            raise PlanError(f"fedmix cannot train nodes without labels: {unusable}")
        return list(nodes)

    def configure(self, round_: int, arrays: Arrays, run_id: str, nodes: Mapping[str, DescribeReply]) -> dict[str, TrainRequest]:
        requests = super().configure(round_, arrays, run_id, nodes)
        if round_ <= self.plan.fedmix.warmup_rounds:
            return {name: r for name, r in requests.items() if nodes[name].label_kind == "pixel"}
        return requests

    def weights(self, replies: Mapping[str, TrainReply]) -> dict[str, float]:
        config = self.plan.fedmix
        try:
            if config.weak_weight > 0:
                return fixed_weights({n: (r.n_samples, r.candidates > 0) for n, r in replies.items()}, config.weak_weight)
            stats = {n: (r.mean_loss, r.n_samples, self._taught_share(n, r)) for n, r in replies.items()}
            return adaptive_weights(stats, config)
        except ModelError as exc:
            raise RoundError(f"fedmix aggregation: {exc}") from None

    def _taught_share(self, name: str, reply: TrainReply | SecAggTrainReply) -> float:
        if not reply.candidates or (self.plan.fedmix.box_projection > 0 and name in self._box_nodes):
            return 1.0
        return reply.accepted / reply.candidates


def make_strategy(plan: Plan) -> Strategy:
    # The personalized baselines average their shared part exactly as FedAvg does.
    return FedMix(plan) if plan.algorithm == "fedmix" else FedAvg(plan)
