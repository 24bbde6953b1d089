"""IOP-FL outside personalization, the coordinator's side: gather the routing set, send it, report.

The routing set is the run's global model plus the personalized model of every original
node whose owner allowed it to leave (``fedseg node start --share-personalized``). A node
that refuses, or cannot be reached, is simply left out, with a line saying why. The new
node receives the set and the adaptation settings, adapts on its own unlabelled images,
keeps the adapted model, and answers with counts, losses and (if it holds masks) scores.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.models.personalization import LocalPart

from .audit.log import AuditLog
from .errors import PlanError, ProtocolError, RemoteError
from .files import atomic_write
from .identity import load_or_create_identity
from .messages import (
    AdaptReply,
    AdaptRequest,
    Arrays,
    ErrorCode,
    PersonalReply,
    PersonalRequest,
    check_arrays,
    encode,
    pack_experts,
)
from .plan import Plan
from .rounds import COORDINATOR_WRITER, Peer, Reporter, Transport
from .run_store import RunStore

__all__ = ["GLOBAL_EXPERT", "AdaptOutcome", "adapt_new_site", "routing_set"]

#: The global model's name in the routing set; it is always the last expert.
GLOBAL_EXPERT = "global"


@dataclass
class AdaptOutcome:
    """What a new site reported back, and which experts it routed over."""

    node: str
    experts: list[str]
    left_out: dict[str, str]
    reply: AdaptReply

    def to_dict(self) -> dict[str, Any]:
        r = self.reply
        return {"node": self.node, "run_id": r.run_id, "experts": self.experts, "left_out": self.left_out, "n_images": r.n_images,
                "steps": r.steps, "seconds": r.seconds, "mean_loss": r.mean_loss, "metrics": r.metrics, "adapted": r.adapted,
                "agreement": r.agreement}


def routing_set(
    run_id: str, global_arrays: Arrays, peers: Sequence[Peer], reporter: Reporter
) -> tuple[list[tuple[str, Arrays]], dict[str, str]]:
    """Asks each original node for its personalized model; the global model comes last.

    Returns:
        The experts as ``(name, arrays)``, and the nodes left out with why.

    Raises:
        MessageError: If a node's personalized model does not match the global model's
            layout, naming the node and the tensor.
    """
    layout = {k: tuple(v.shape) for k, v in global_arrays.items()}
    experts: list[tuple[str, Arrays]] = []
    left_out: dict[str, str] = {}
    for peer in peers:
        try:
            peer.transport.connect()
            reply = peer.request(PersonalRequest(run_id=run_id), PersonalReply)
        except RemoteError as exc:
            why = "its owner did not allow its personalized model to leave (--share-personalized)" if exc.code == ErrorCode.DECLINED else str(exc)
            left_out[peer.name] = why
            reporter.info(f"node {peer.name}: left out of the routing set: {why}")
            continue
        except (ProtocolError, OSError) as exc:
            left_out[peer.name] = str(exc)
            reporter.info(f"node {peer.name}: left out of the routing set: {exc}")
            continue
        check_arrays(reply.weights, layout, f"personalized model of node {peer.name}")
        experts.append((peer.name, reply.weights))
        reporter.info(f"node {peer.name}: personalized model received")
    return experts + [(GLOBAL_EXPERT, global_arrays)], left_out


def adapt_new_site(
    run_dir: Path, new_site: Transport, originals: Sequence[Transport], adapt: dict[str, Any], reporter: Reporter
) -> AdaptOutcome:
    """Routes a new site over the run's models and records what it reports.

    Args:
        run_dir: A finished (or checkpointed) run.
        new_site: The new node.
        originals: The run's nodes, asked for their personalized models.
        adapt: Adaptation settings (:class:`fedseg.models.routing.AdaptConfig` fields).
        reporter: Receives progress.

    Returns:
        The outcome, also written to ``run_dir/adapt/<node>.json``.

    Raises:
        PlanError: If the run's global model is not a whole U-Net (FedMix, or an algorithm
            that keeps part of the model on the nodes).
        RemoteError: If the new node refuses, e.g. a mismatched routing set or an empty site.
    """
    store = RunStore(run_dir)
    state, global_arrays = store.load()
    plan = Plan.from_dict(state.plan)
    if plan.algorithm == "fedmix" or plan.local_part is not LocalPart.NONE:
        raise PlanError(f"run {state.run_id} used {plan.algorithm}, whose global model is not a whole U-Net to route over")
    if plan.algorithm != "iopfl":
        reporter.info(f"run {state.run_id} used {plan.algorithm}: nodes keep no personalized model, so the routing set is the global model alone")
    audit = AuditLog(store.audit, load_or_create_identity(store.identity), COORDINATOR_WRITER)
    try:
        peers = [Peer(t, plan.max_message_bytes, audit) for t in originals] if plan.algorithm == "iopfl" else []
        experts, left_out = routing_set(state.run_id, global_arrays, peers, reporter)
        names, weights = pack_experts(experts)
        request = AdaptRequest(run_id=state.run_id, plan=plan.to_dict(), adapt=adapt, experts=names, weights=weights)
        frame = encode(request)
        reporter.info(f"routing set: {', '.join(names)} ({len(frame) / 2**20:.1f} MB) to node {new_site.name}")
        new_site.connect()
        peer = Peer(new_site, plan.max_message_bytes, audit)
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(peer.request, request, AdaptReply, frame)
            start = time.monotonic()
            while not future.done():
                reporter.step(f"node {new_site.name} is adapting on its images: {time.monotonic() - start:.0f} s")
                time.sleep(0.5)
            reply = future.result()
    finally:
        audit.close()
    outcome = AdaptOutcome(node=new_site.name, experts=names, left_out=left_out, reply=reply)
    atomic_write(store.root / "adapt" / f"{new_site.name}.json", json.dumps(outcome.to_dict(), indent=2, sort_keys=True).encode())
    return outcome
