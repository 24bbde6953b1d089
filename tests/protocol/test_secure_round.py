"""Secure rounds in the round engine, over the node's real whitelist (in-memory transport).

A secure run must give the plain run's aggregate up to fixed-point error, survive nodes
that drop after training or after masking while ``t`` remain, abort below ``t`` so that
``--resume`` can retry, and never let an unmasked update reach the coordinator.
"""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedseg.node.actions import NodeRuntime
from fedseg.node.config import NodeConfig
from fedseg.node.synthetic import write_federation
from fedseg.protocol.errors import PlanError, RoundError
from fedseg.protocol.messages import (
    Message,
    SecAggKeysReply,
    SecAggKeysRequest,
    SecAggMaskRequest,
    SecAggUnmaskRequest,
    encode,
)
from fedseg.protocol.rounds import run_federation

from engine_doubles import SITES, FailingTransport, InMemoryTransport, Reporter, TamperingTransport, tiny_plan
from fedseg.protocol.run_store import RunStore
from fedseg.protocol.secagg.quantize import flatten

SECURE = {"secure_aggregation": True}


def _aggregate(out: Path) -> dict[str, np.ndarray]:
    return RunStore(out).load()[1]


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    layout = {k: v.shape for k, v in want.items()}
    assert set(got) == set(want)
    a, b = flatten(got, layout).astype(np.float64), flatten(want, layout).astype(np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-6


@pytest.mark.parametrize("algorithm", ["fedavg", "fedmix", "fedbn"])
def test_secure_round_gives_the_plain_aggregate(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None, algorithm: str) -> None:
    run_federation(tiny_plan(rounds=1, algorithm=algorithm), [InMemoryTransport(rt) for rt in runtimes.values()], tmp_path / "plain", Reporter())
    transports = [InMemoryTransport(rt) for rt in runtimes.values()]
    reporter = Reporter()
    rows = run_federation(tiny_plan(rounds=1, algorithm=algorithm, **SECURE), transports, tmp_path / "secure", reporter)

    # FedBN's norm layers stay on the nodes: both aggregates hold the shared part only.
    _assert_close(_aggregate(tmp_path / "secure"), _aggregate(tmp_path / "plain"))
    summary = reporter.rounds[-1][2]
    assert summary["secagg"]["survivors"] == list(SITES) and summary["secagg"]["dropped"] == [] and summary["secagg"]["clipped"] == 0
    assert {r["site"] for r in rows if r["round"] == 1 and "train_loss" in r} == set(SITES)


def test_keys_ride_on_the_unmask_answer_after_the_first_round(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    transports = [InMemoryTransport(rt) for rt in runtimes.values()]
    run_federation(tiny_plan(rounds=2, **SECURE), transports, tmp_path, Reporter())
    for t in transports:
        assert t.kinds() == [
            ("describe", None), ("evaluate", 0),
            ("secagg_keys", 1), ("secagg_train", 1), ("secagg_mask", 1), ("secagg_unmask", 1),
            ("secagg_train", 2), ("secagg_mask", 2), ("secagg_unmask", 2), ("evaluate", 2),
        ]
        # Round 1's global model is scored on round 2's secure train request, as in a plain round.
        trains = [m for m in t.requests if m.KIND.value == "secagg_train"]
        assert [m.score for m in trains] == [[], ["val", "test"]]
        assert t.runtime.secure_round is None  # the last round asked for no next keys; nothing is left


def test_coordinator_never_receives_an_unmasked_update(tmp_path: Path, no_plots: None) -> None:
    from fedseg.protocol.audit.cross_check import cross_check
    from fedseg.protocol.audit.policy import check_policy
    from fedseg.protocol.audit.verify import verify_log
    from fedseg.protocol.identity import load_or_create_identity

    sites = write_federation(tmp_path / "data", n_per_site=12, size=32, seed=3)
    nodes = [NodeRuntime(NodeConfig(name=s.name, data=str(s), labels="pixel", workdir=str(tmp_path / "nodes" / s.name)), audit=True) for s in sites]
    run_federation(tiny_plan(rounds=1, **SECURE), [InMemoryTransport(rt) for rt in nodes], tmp_path / "run", Reporter())
    for rt in nodes:
        rt.audit.close()
    store = RunStore(tmp_path / "run")
    coordinator = verify_log(store.audit, load_or_create_identity(store.identity).public_key())
    received = [e["schema"] for e in coordinator if e["direction"] == "received"]
    assert {s["kind"] for s in received} >= {"secagg_train_reply", "secagg_mask_reply", "secagg_unmask_reply"}
    assert "train_reply" not in {s["kind"] for s in received}
    # The only tensors that reach the coordinator are masked uint32 vectors.
    assert {dtype for s in received for _, dtype, _ in s["tensors"]} == {"uint32"}
    # Revealed shares are key material: the log keeps their size, never their value.
    unmasked = [s for s in received if s["kind"] == "secagg_unmask_reply"]
    assert len(unmasked) == 3 and all("shares" not in s["fields"] and s["secret"]["shares"]["bytes"] > 0 for s in unmasked)
    logs = {rt.name: verify_log(rt.workdir / "audit.jsonl", load_or_create_identity(rt.workdir / "identity.key").public_key()) for rt in nodes}
    assert cross_check(coordinator, logs, coordinator_name="coordinator") == []
    declared = {k: tuple(v.shape) for k, v in store.load()[1].items()}
    assert all(check_policy(name, entries, declared, image_size=32) == [] for name, entries in logs.items())


def _is(kind: type[Message]):
    return lambda m: isinstance(m, kind)


def test_node_dropping_after_training_is_unmasked_from_shares(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    a, b, c = runtimes.values()
    # Plain reference: FedAvg of site-a and site-b alone.
    run_federation(tiny_plan(rounds=1, min_nodes=2), [InMemoryTransport(a), InMemoryTransport(b), FailingTransport(c, lambda m: m.KIND == "train")],
                   tmp_path / "plain", Reporter())
    reporter = Reporter()
    transports = [InMemoryTransport(a), InMemoryTransport(b), FailingTransport(c, _is(SecAggMaskRequest))]
    run_federation(tiny_plan(rounds=1, **SECURE), transports, tmp_path / "secure", reporter)
    _assert_close(_aggregate(tmp_path / "secure"), _aggregate(tmp_path / "plain"))
    assert reporter.rounds[-1][2]["secagg"]["dropped"] == ["site-c"]
    assert any("node site-c left out of masking" in text for text in reporter.infos)


def test_node_dropping_after_masking_is_unmasked_from_shares(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    run_federation(tiny_plan(rounds=1), [InMemoryTransport(rt) for rt in runtimes.values()], tmp_path / "plain", Reporter())
    a, b, c = runtimes.values()
    reporter = Reporter()
    transports = [InMemoryTransport(a), InMemoryTransport(b), FailingTransport(c, _is(SecAggUnmaskRequest))]
    run_federation(tiny_plan(rounds=1, **SECURE), transports, tmp_path / "secure", reporter)
    # site-c's masked update is in the sum; its self-mask came back from the others' shares.
    _assert_close(_aggregate(tmp_path / "secure"), _aggregate(tmp_path / "plain"))
    assert reporter.rounds[-1][2]["secagg"]["survivors"] == list(SITES)


def test_below_threshold_the_round_aborts_and_resume_retries_it(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    a, b, c = runtimes.values()
    plan = tiny_plan(rounds=1, secagg={"threshold": 3}, **SECURE)
    transports = [InMemoryTransport(a), InMemoryTransport(b), FailingTransport(c, _is(SecAggMaskRequest))]
    with pytest.raises(RoundError, match=r"masking: only 2 of the 3 required nodes.*threshold 3.*aborted and nothing was aggregated.*--resume"):
        run_federation(plan, transports, tmp_path, Reporter())
    assert RunStore(tmp_path).load()[0].round == 0
    run_federation(plan, [InMemoryTransport(rt) for rt in runtimes.values()], tmp_path, Reporter(), resume=True)
    assert RunStore(tmp_path).load()[0].round == 1


def _swap_keys(reply: Message) -> bytes:
    assert isinstance(reply, SecAggKeysReply)
    forged = dict(reply.keys, s_pk=base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode())
    return encode(SecAggKeysReply(run_id=reply.run_id, round=reply.round, keys=forged))


def test_swapped_key_leaves_that_node_out(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    a, b, c = runtimes.values()
    reporter = Reporter()
    transports = [InMemoryTransport(a), InMemoryTransport(b), TamperingTransport(c, _is(SecAggKeysRequest), _swap_keys)]
    run_federation(tiny_plan(rounds=1, **SECURE), transports, tmp_path, reporter)
    assert any("node site-c left out of key exchange" in t and "bad signature" in t for t in reporter.infos)
    assert reporter.rounds[-1][2]["secagg"]["survivors"] == ["site-a", "site-b"]


def test_plan_that_could_overflow_is_refused_before_any_round(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    with pytest.raises(PlanError, match="could overflow the 32-bit sum"):
        run_federation(tiny_plan(rounds=1, secagg={"clip": 8.0, "scale_bits": 28}, **SECURE),
                       [InMemoryTransport(rt) for rt in runtimes.values()], tmp_path, Reporter())
    assert not (tmp_path / "checkpoint.npz").exists()


def test_node_whose_identity_differs_from_its_invite_is_refused(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    from types import SimpleNamespace

    from fedseg.protocol.secagg.round_keys import AuthenticationFailed

    a, b, c = runtimes.values()
    impostor = InMemoryTransport(c)
    impostor.invite = SimpleNamespace(fingerprint="sha256:" + "00" * 32)  # what the coordinator pinned for site-c
    with pytest.raises(AuthenticationFailed, match="node site-c describes identity sha256:.*but its invite pins sha256:0000"):
        run_federation(tiny_plan(rounds=1, **SECURE), [InMemoryTransport(a), InMemoryTransport(b), impostor], tmp_path, Reporter())


def test_node_requiring_secure_aggregation_refuses_plain_training(tmp_path: Path, no_plots: None) -> None:
    sites = write_federation(tmp_path / "data", n_per_site=12, size=32, seed=4)
    nodes = [NodeRuntime(NodeConfig(name=s.name, data=str(s), labels="pixel", workdir=str(tmp_path / "nodes" / s.name),
                                    require_secure_aggregation=True)) for s in sites]
    with pytest.raises(RoundError, match=r"node site-a refused \(bad_plan\): node site-a trains only under secure aggregation"):
        run_federation(tiny_plan(rounds=1), [InMemoryTransport(rt) for rt in nodes], tmp_path / "plain", Reporter())
    run_federation(tiny_plan(rounds=1, **SECURE), [InMemoryTransport(rt) for rt in nodes], tmp_path / "secure", Reporter())
    assert RunStore(tmp_path / "secure").load()[0].round == 1


def test_replayed_messages_are_refused_and_the_round_goes_on(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    from fedseg.node.actions import handle
    from fedseg.protocol.messages import ErrorReply, SecAggMaskReply, decode

    a, b, c = runtimes.values()
    first_reply: list[Message] = []

    def replay_round_1(reply: Message) -> bytes:
        # site-c's round-2 masked update is swapped for the one it sent in round 1.
        if reply.round == 1:
            first_reply.append(reply)
        return encode(first_reply[0])

    reporter = Reporter()
    transports = [InMemoryTransport(a), InMemoryTransport(b), TamperingTransport(c, _is(SecAggMaskRequest), replay_round_1)]
    run_federation(tiny_plan(rounds=2, **SECURE), transports, tmp_path, reporter)
    assert any("node site-c left out of masking" in t and "answered for round=1, expected 2" in t for t in reporter.infos)
    assert reporter.rounds[-1][2]["secagg"]["dropped"] == ["site-c"]
    assert isinstance(first_reply[0], SecAggMaskReply)

    # A request replayed to a node after its round is over is refused, naming what it holds.
    old = next(m for m in transports[0].requests if isinstance(m, SecAggMaskRequest) and m.round == 1)
    reply = decode(handle(a, encode(old)))
    assert isinstance(reply, ErrorReply) and "holds no secure-aggregation keys for run" in reply.message
