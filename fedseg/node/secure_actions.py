"""The node's side of secure aggregation: four whitelisted actions over one round's secrets.

The round's keys, self-mask seed, shares and trained update live only in this server
process's memory (:attr:`NodeRuntime.secure_round`), never in a file or a log. The
trained update never leaves the node unmasked: the secure train action keeps it and
answers with declared scalars and sealed shares only. A node holds one secure round at a
time; a request for any other round is refused, as is a step out of order.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedseg.protocol.errors import MessageError
from fedseg.protocol.messages import (
    SecAggKeysReply,
    SecAggKeysRequest,
    SecAggMaskReply,
    SecAggMaskRequest,
    SecAggTrainReply,
    SecAggTrainRequest,
    SecAggUnmaskReply,
    SecAggUnmaskRequest,
    TrainReply,
    TrainRequest,
)
from fedseg.protocol.plan import Plan
from fedseg.protocol.secagg.protocol import NodeRound
from fedseg.protocol.secagg.quantize import scale_bits

from .node_log import log

if TYPE_CHECKING:
    from .actions import NodeRuntime

__all__ = ["secure_keys", "secure_train", "secure_mask", "secure_unmask"]


def _current(rt: NodeRuntime, run_id: str, round_: int) -> NodeRound:
    state = rt.secure_round
    if state is None or (state.run_id, state.round) != (run_id, round_):
        held = f"run {state.run_id} round {state.round}" if state else "none"
        raise MessageError(f"node {rt.name} holds no secure-aggregation keys for run {run_id} round {round_} (holds {held}; restarted?)")
    return state


def secure_keys(rt: NodeRuntime, msg: SecAggKeysRequest) -> SecAggKeysReply:
    """Fresh signed keys for a round; they replace whatever round this node held."""
    rt.secure_round = NodeRound(rt.identity, rt.name, msg.run_id, msg.round)
    return SecAggKeysReply(run_id=msg.run_id, round=msg.round, keys=rt.secure_round.advertisement)


def secure_train(rt: NodeRuntime, msg: SecAggTrainRequest, train: Callable[[NodeRuntime, TrainRequest], TrainReply]) -> SecAggTrainReply:
    """Checks the roster, seals the shares, trains, and keeps the update on the node."""
    state = _current(rt, msg.run_id, msg.round)
    plan = Plan.from_dict(msg.plan)
    # Refuse swapped keys before spending a round on training.
    commitment, sealed = state.share(msg.roster, msg.threshold)
    bits = scale_bits(plan.secagg.clip, len(msg.roster), plan.secagg.scale_bits)
    trained = train(rt, msg)
    state.hold(trained.weights, plan.secagg.clip, bits)
    return SecAggTrainReply(
        run_id=msg.run_id, round=msg.round, n_samples=trained.n_samples, mean_loss=trained.mean_loss, seconds=trained.seconds,
        accepted=trained.accepted, candidates=trained.candidates, commitment=commitment, shares=sealed,
        scores=trained.scores,
    )


def secure_mask(rt: NodeRuntime, msg: SecAggMaskRequest) -> SecAggMaskReply:
    """Opens the shares routed to this node and answers with its masked, weighted update."""
    state = _current(rt, msg.run_id, msg.round)
    masked, clipped = state.mask(msg.survivors, msg.shares, msg.weight)
    if clipped:
        log.warning("round %d node %s: %d update values clipped to ±the plan's secagg.clip", msg.round, rt.name, clipped)
    return SecAggMaskReply(run_id=msg.run_id, round=msg.round, clipped=clipped, masked=masked)


def secure_unmask(rt: NodeRuntime, msg: SecAggUnmaskRequest) -> SecAggUnmaskReply:
    """Reveals the shares the coordinator needs, then forgets the round (and keys the next)."""
    state = _current(rt, msg.run_id, msg.round)
    shares = state.unmask(msg.survivors, msg.dropped)
    rt.secure_round = None
    next_keys = {}
    if msg.next_round:
        rt.secure_round = NodeRound(rt.identity, rt.name, msg.run_id, msg.next_round)
        next_keys = rt.secure_round.advertisement
    log.info("round %d node %s: unmasked (%d survivors, %d dropped)", msg.round, rt.name, len(msg.survivors), len(msg.dropped))
    return SecAggUnmaskReply(run_id=msg.run_id, round=msg.round, shares=shares, next_keys=next_keys)
