"""Federated strategies: what each node is asked to do, and how replies are combined.

A strategy does no I/O: the round engine sends what ``configure`` returns and hands
``aggregate`` the valid replies. Later methods (FedMix weights, personalization,
secure aggregation as a wrapper of a linear strategy) plug in here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .aggregate import weighted_average
from .messages import Arrays, TrainReply, TrainRequest
from .plan import Plan

__all__ = ["Strategy", "FedAvg", "make_strategy"]


class Strategy(ABC):
    """Base of federated strategies.

    Attributes:
        linear: True if the aggregate is a weighted sum of updates, so secure
            aggregation can compute it without seeing any single update.
    """

    linear: ClassVar[bool] = False

    @abstractmethod
    def configure(self, round_: int, arrays: Arrays, plan: Plan, run_id: str, nodes: Sequence[str]) -> dict[str, TrainRequest]:
        """The train request for each node taking part in this round."""

    @abstractmethod
    def aggregate(self, round_: int, replies: Mapping[str, TrainReply]) -> tuple[Arrays, dict[str, Any]]:
        """New global arrays and round metrics from the valid replies."""


class FedAvg(Strategy):
    """McMahan et al.: average of node weights, weighted by their sample counts."""

    linear = True

    def configure(self, round_: int, arrays: Arrays, plan: Plan, run_id: str, nodes: Sequence[str]) -> dict[str, TrainRequest]:
        request = TrainRequest(run_id=run_id, round=round_, plan=plan.to_dict(), weights=arrays)
        return {name: request for name in nodes}

    def aggregate(self, round_: int, replies: Mapping[str, TrainReply]) -> tuple[Arrays, dict[str, Any]]:
        arrays = weighted_average([(r.weights, float(r.n_samples)) for r in replies.values()])
        n = sum(r.n_samples for r in replies.values())
        loss = sum(r.mean_loss * r.n_samples for r in replies.values()) / max(n, 1)
        return arrays, {"train_loss": loss, "n_train": n}


def make_strategy(plan: Plan) -> Strategy:
    return {"fedavg": FedAvg}[plan.algorithm]()
