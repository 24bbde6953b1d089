"""The coordinator's secure round: train, mask and unmask over the nodes, never seeing an update.

Three calls per node and round, where a plain round has one (the last round's model is
scored on the first, as in a plain round):

1. ``secagg_train``: the train request plus the round's signed keys and threshold. The
   node trains and answers with its declared scalars and the shares it sealed to each
   peer; its update stays on the node.
2. ``secagg_mask``: the node's normalised weight ``ω_k`` (from the strategy's weights
   over the declared scalars: ``n_k`` for FedAvg, FedMix's adaptive ``w_k``) and the
   shares routed to it. The node answers ``y_k``, its masked ``ω_k θ_k`` in Z_{2^32}.
3. ``secagg_unmask``: who survived and who dropped. The node reveals the shares needed
   and, in the same answer, its signed keys for the next round, so keys cost a call of
   their own only in a session's first secure round or after a node missed one.

Each step waits at most ``plan.secagg.timeout_s`` (training: ``plan.timeout_s``) and goes
on without the nodes that did not answer, as long as ``t`` remain (and
``plan.min_nodes``, if set). Below that the round is aborted with nothing aggregated,
and the run can be resumed from its last completed round.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import PlanError, RoundError
from ..messages import (
    Arrays,
    DescribeReply,
    SecAggKeysReply,
    SecAggKeysRequest,
    SecAggMaskReply,
    SecAggMaskRequest,
    SecAggTrainReply,
    SecAggTrainRequest,
    SecAggUnmaskReply,
    SecAggUnmaskRequest,
    TrainRequest,
    check_arrays,
    encode,
)
from ..plan import Plan
from ..rounds import Peer, Reporter, _Outcome, _phase
from ..strategies import Strategy
from .protocol import CoordinatorRound, threshold
from .quantize import Layout, dequantize, flatten, scale_bits, unflatten
from .round_keys import AuthenticationFailed, verify_advertisement

__all__ = ["SecureRounds"]


class SecureRounds:
    """Secure rounds of one coordinator session; carries each node's next-round keys.

    Args:
        plan: The plan (``secure_aggregation`` on).
        strategy: A ``linear`` strategy; it only ever sees declared scalars.
        run_id: The run.
        peers: Every node of the run.
        described: Each node's describe reply, whose identity fingerprint its round keys
            must be signed with.
        pool: The engine's thread pool.
        reporter: Progress.

    Raises:
        PlanError: If the strategy is not linear, or the plan's clip and scale could
            overflow the sum for these nodes.
        AuthenticationFailed: If a node describes an identity other than its invite's.
    """

    def __init__(self, plan: Plan, strategy: Strategy, run_id: str, peers: Sequence[Peer], described: Mapping[str, DescribeReply],
                 pool: ThreadPoolExecutor, reporter: Reporter) -> None:
        if not strategy.linear:
            raise PlanError(f"secure aggregation needs a linear strategy; {type(strategy).__name__} is not")
        scale_bits(plan.secagg.clip, len(peers), plan.secagg.scale_bits)  # refuse an overflowing plan before round 1
        self.plan, self.strategy, self.run_id, self.pool, self.reporter = plan, strategy, run_id, pool, reporter
        self.peers = list(peers)
        self.pinned = {name: d.fingerprint for name, d in described.items()}
        for p in self.peers:
            invite = getattr(p.transport, "invite", None)
            if invite is not None and invite.fingerprint != self.pinned[p.name]:
                raise AuthenticationFailed(f"node {p.name} describes identity {self.pinned[p.name]}, but its invite pins {invite.fingerprint}")
        self._keys: dict[str, dict[str, Any]] = {}

    def _accept_keys(self, name: str, keys: dict[str, Any], round_: int) -> None:
        verify_advertisement(keys, name, self.run_id, round_, self.pinned[name])
        self._keys[name] = keys

    def run_round(self, round_: int, requests: Mapping[str, TrainRequest], layout: Layout) -> tuple[Arrays, dict[str, Any], _Outcome]:
        """One secure training round.

        Args:
            round_: The round.
            requests: The strategy's train request per participating node.
            layout: Name to shape of the shared parameters.

        Returns:
            The new global arrays, the round summary, and the training outcome (declared
            scalars per node, for the metrics rows).

        Raises:
            RoundError: If fewer than ``t`` nodes (or ``plan.min_nodes``) take part in a
                step; the message says how to resume.
            AuthenticationFailed: If revealed shares were tampered with.
        """
        taking_part = [p for p in self.peers if p.name in requests]
        n = len(taking_part)
        t = threshold(self.plan.secagg.threshold, n)
        needed = max(t, min(self.plan.min_nodes, n))
        try:
            return self._run(round_, requests, layout, taking_part, t, needed)
        except RoundError as exc:
            raise RoundError(f"{exc}. Secure round {round_} needs {needed} of {n} nodes (threshold {t}); it was aborted and nothing "
                             f"was aggregated. Continue the run with: fedseg run --resume <run dir>") from None

    def _step(self, peers: Sequence[Peer], call: Any, needed: int, round_: int, name: str, timeout_s: float) -> _Outcome:
        return _phase(self.pool, peers, call, needed, round_, name, timeout_s, self.reporter)

    def _run(self, round_: int, requests: Mapping[str, TrainRequest], layout: Layout, taking_part: list[Peer], t: int, needed: int
             ) -> tuple[Arrays, dict[str, Any], _Outcome]:
        plan, run_id, wait = self.plan, self.run_id, self.plan.secagg.timeout_s
        stale = [p for p in taking_part if self._keys.get(p.name, {}).get("round") != round_]
        if stale:
            def keys(p: Peer) -> None:
                self._accept_keys(p.name, p.request(SecAggKeysRequest(run_id=run_id, round=round_), SecAggKeysReply).keys, round_)

            self._step(stale, keys, max(0, needed - (len(taking_part) - len(stale))), round_, "key exchange", wait)
        keyed = [p for p in taking_part if self._keys.get(p.name, {}).get("round") == round_]
        roster = {p.name: self._keys[p.name] for p in keyed}
        if len(roster) < needed:
            raise RoundError(f"round {round_} key exchange: only {len(roster)} nodes hold verified keys")
        co = CoordinatorRound(run_id, round_, roster, t)

        secure = {id(r): SecAggTrainRequest(run_id=r.run_id, round=r.round, plan=r.plan, weights=r.weights, roster=roster, threshold=t,
                                               score=r.score, overlays=r.overlays)
                  for r in requests.values()}
        frames = {key: encode(r) for key, r in secure.items()}  # one encoding per distinct request, not per node

        def train(p: Peer) -> SecAggTrainReply:
            key = id(requests[p.name])
            reply = p.request(secure[key], SecAggTrainReply, frames[key])
            co.accept_shares(p.name, reply.commitment, reply.shares)
            return reply

        trained = self._step(keyed, train, needed, round_, "training", plan.timeout_s)
        u1 = list(trained.replies)
        weights = self.strategy.weights(trained.replies)
        total = sum(weights.values())
        if not total > 0 or any(w < 0 for w in weights.values()):
            raise RoundError(f"round {round_}: aggregation weights must be >= 0 with a positive sum, got {weights}")
        omega = {name: weights[name] / total for name in u1}

        def mask(p: Peer) -> SecAggMaskReply:
            request = SecAggMaskRequest(run_id=run_id, round=round_, survivors=u1, weight=omega[p.name], shares=co.routed(p.name, u1))
            reply = p.request(request, SecAggMaskReply)
            check_arrays(reply.masked, layout, f"masked update from node {p.name} in round {round_}", dtype="uint32")
            return reply

        masked = self._step([p for p in keyed if p.name in omega], mask, needed, round_, "masking", wait)
        u2 = list(masked.replies)
        dropped = sorted(set(u1) - set(u2))
        last = round_ >= plan.rounds
        unmask_request = SecAggUnmaskRequest(run_id=run_id, round=round_, survivors=u2, dropped=dropped, next_round=0 if last else round_ + 1)
        unmask_frame = encode(unmask_request)
        unmasked = self._step([p for p in keyed if p.name in masked.replies], lambda p: p.request(unmask_request, SecAggUnmaskReply, unmask_frame),
                              needed, round_, "unmasking", wait)
        self._keys = {}
        for name, reply in unmasked.replies.items():
            if reply.next_keys:
                try:
                    self._accept_keys(name, reply.next_keys, round_ + 1)
                except AuthenticationFailed as exc:
                    self.reporter.info(f"round {round_}: next-round keys of node {name} refused: {exc}")

        bits = scale_bits(plan.secagg.clip, len(roster), plan.secagg.scale_bits)
        vectors = {name: flatten(reply.masked, layout) for name, reply in masked.replies.items()}
        summed = co.unmask(vectors, {name: r.shares for name, r in unmasked.replies.items()}, u1)
        arrays = unflatten(dequantize(summed, bits, sum(omega[name] for name in u2)), layout)
        clipped = sum(r.clipped for r in masked.replies.values())
        if clipped:
            self.reporter.info(f"round {round_}: {clipped} update values were clipped to ±{plan.secagg.clip} (plan.secagg.clip)")
        summary = self.strategy.metrics(trained.replies, weights)
        summary["secagg"] = {"threshold": t, "survivors": u2, "dropped": dropped, "clipped": clipped, "scale_bits": bits}
        return arrays, summary, trained
