"""IOP-FL outside personalization over the in-memory transport: who sends what, and what comes back.

The nodes are real :class:`NodeRuntime` objects served through their whitelist, as in
``test_rounds.py``; the Syft path is covered end to end in ``tests/test_iopfl_end_to_end.py``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.node.actions import NodeRuntime
from fedseg.node.config import NodeConfig
from fedseg.node.synthetic import write_federation
from fedseg.protocol.adapt import adapt_new_site
from fedseg.protocol.errors import MessageError, PlanError, RemoteError
from fedseg.protocol.messages import AdaptRequest, PersonalReply, PersonalRequest, encode, pack_experts
from fedseg.protocol.plan import Plan
from fedseg.protocol.rounds import Peer, run_federation
from fedseg.protocol.run_store import RunStore

from test_rounds import InMemoryTransport, Reporter, TamperingTransport

PLAN = {"algorithm": "iopfl", "rounds": 2, "image_size": 32, "model": {"width": 4, "depth": 2, "groups": 2, "norm": "batch"},
        "train": {"batch_size": 4, "local_epochs": 1.0, "augment": False}}
ADAPT = {"epochs": 1.0, "batch_size": 4}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    """site-a shares its personalized model, site-b does not; site-c is new, with masks only to score."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adapt")
    sites = write_federation(root / "data", n_per_site=12, size=32, seed=0)
    share = {"site-a": True, "site-b": False}
    nodes = {s.name: NodeRuntime(NodeConfig(name=s.name, data=str(s), labels="pixel", workdir=str(root / "nodes" / s.name),
                                            share_personalized=share[s.name])) for s in sites[:2]}
    new = NodeRuntime(NodeConfig(name="site-c", data=str(sites[2]), labels="none", workdir=str(root / "nodes" / "site-c")))
    bare = root / "data" / "bare"
    shutil.copytree(sites[2] / "images", bare / "images")
    unscored = NodeRuntime(NodeConfig(name="bare", data=str(bare), labels="none", workdir=str(root / "nodes" / "bare")))
    run = root / "run"
    run_federation(Plan.from_dict(PLAN), [InMemoryTransport(rt) for rt in nodes.values()], run, Reporter())
    return nodes, new, unscored, run


def _originals(nodes: dict[str, NodeRuntime]) -> list[InMemoryTransport]:
    return [InMemoryTransport(rt) for rt in nodes.values()]


def test_only_consenting_models_are_routed_and_only_scores_come_back(federation) -> None:
    nodes, new, _, run = federation
    reporter = Reporter()
    target = InMemoryTransport(new)
    outcome = adapt_new_site(run, target, _originals(nodes), ADAPT, reporter)
    assert outcome.experts == ["site-a", "global"] and outcome.reply.experts == 2
    assert set(outcome.left_out) == {"site-b"} and "--share-personalized" in outcome.left_out["site-b"]
    assert any("site-b: left out of the routing set" in line for line in reporter.infos)
    # The new site scores on all of its images, after adapting without its masks.
    assert set(outcome.reply.metrics) == {"global", "norm_stats", "routed"}
    assert all(m["n"] == len(new.index) for m in outcome.reply.metrics.values())
    assert outcome.reply.n_images == len(new.index) and outcome.reply.steps == 3
    # What the new node received: site-a's running mix and the global model, nothing else.
    state, global_arrays = RunStore(run).load()
    request = next(m for m in target.requests if isinstance(m, AdaptRequest))
    expected = pack_experts([("site-a", nodes["site-a"].personal(state.run_id, "mix")), ("global", global_arrays)])[1]
    assert set(request.weights) == set(expected) and all(np.array_equal(request.weights[k], expected[k]) for k in expected)
    # The adapted model stays on the node, beside the global one, for `node predict`.
    kept = new.workdir / "models" / state.run_id
    assert {p.name for p in kept.iterdir()} >= {"routed.npz", "routed.json", "global.npz", "plan.json"}
    assert json.loads((kept / "routed.json").read_text())["experts"] == ["site-a", "global"]
    assert json.loads((run / "adapt" / "site-c.json").read_text())["experts"] == ["site-a", "global"]


def test_baselines_are_scored_beside_routing_and_the_kept_model_is_one_of_the_two_routings(federation) -> None:
    nodes, new, _, run = federation
    outcome = adapt_new_site(run, InMemoryTransport(new), _originals(nodes), {**ADAPT, "baselines": True}, Reporter())
    metrics, reply = outcome.reply.metrics, outcome.reply
    assert set(metrics) == {"global", "norm_stats", "routed", "routed_adapted", "routed_before", "tent", "uniform", "expert:site-a"}
    assert metrics["routed"] == metrics["routed_adapted" if reply.adapted else "routed_before"]
    # The rule's label-free figures and the expert's agreement with the global model come back too.
    assert set(reply.agreement) == {"adapted", "before", "expert:site-a"} and all(0 <= v <= 1 for v in reply.agreement.values())
    assert reply.adapted == (reply.agreement["adapted"] >= reply.agreement["before"] - 0.05)
    # The settings' tolerance decides, and the node keeps the model the reply names.
    strict = adapt_new_site(run, InMemoryTransport(new), _originals(nodes), {**ADAPT, "keep_tolerance": 0.0}, Reporter()).reply
    assert strict.adapted == (strict.agreement["adapted"] >= strict.agreement["before"])
    state = RunStore(run).load()[0]
    assert json.loads((new.workdir / "models" / state.run_id / "routed.json").read_text())["adapted"] is strict.adapted


def test_a_node_without_masks_adapts_and_reports_no_scores(federation) -> None:
    nodes, _, unscored, run = federation
    outcome = adapt_new_site(run, InMemoryTransport(unscored), _originals(nodes), ADAPT, Reporter())
    assert outcome.reply.metrics == {} and outcome.reply.steps == 3


def test_personalized_model_is_refused_without_consent_and_names_why(federation) -> None:
    nodes, _, _, run = federation
    run_id = RunStore(run).load()[0].run_id
    peer = Peer(InMemoryTransport(nodes["site-b"]), 2**26)
    peer.transport.connect()
    with pytest.raises(RemoteError, match=r"node site-b refused \(declined\).*--share-personalized"):
        peer.request(PersonalRequest(run_id=run_id), PersonalReply)
    sharer = Peer(InMemoryTransport(nodes["site-a"]), 2**26)
    sharer.transport.connect()
    with pytest.raises(RemoteError, match=r"\(no_model\).*run other"):
        sharer.request(PersonalRequest(run_id="other"), PersonalReply)


def test_mismatched_routing_set_is_a_clear_error_on_both_sides(federation) -> None:
    nodes, new, _, run = federation
    state, global_arrays = RunStore(run).load()

    def wider(reply: PersonalReply) -> bytes:
        weights = dict(reply.weights, **{"head.weight": np.zeros((1, 8, 1, 1), np.float32)})
        return encode(PersonalReply(run_id=reply.run_id, node=reply.node, weights=weights))

    tampered = [TamperingTransport(nodes["site-a"], lambda m: isinstance(m, PersonalRequest), wider)]
    with pytest.raises(MessageError, match=r"personalized model of node site-a: tensor head.weight has shape \(1, 8, 1, 1\)"):
        adapt_new_site(run, InMemoryTransport(new), tampered, ADAPT, Reporter())
    # The new node checks too, naming the expert and the tensor.
    bad = dict(global_arrays, **{"encoder.0.0.weight": np.zeros((4, 3, 5, 5), np.float32)})
    names, weights = pack_experts([("site-x", bad), ("global", global_arrays)])
    peer = Peer(InMemoryTransport(new), 2**26)
    peer.transport.connect()
    request = AdaptRequest(run_id=state.run_id, plan=state.plan, adapt=ADAPT, experts=names, weights=weights)
    with pytest.raises(RemoteError, match=r"bad_weights.*expert site-x has encoder.0.0.weight of shape \(4, 3, 5, 5\)"):
        peer.request(request, PersonalReply)


def test_runs_whose_global_model_is_not_whole_are_refused(federation, tmp_path: Path) -> None:
    nodes, new, _, _ = federation
    run_federation(Plan.from_dict({**PLAN, "algorithm": "fedbn", "rounds": 1}), _originals(nodes), tmp_path / "fedbn", Reporter())
    with pytest.raises(PlanError, match="fedbn"):
        adapt_new_site(tmp_path / "fedbn", InMemoryTransport(new), _originals(nodes), ADAPT, Reporter())
