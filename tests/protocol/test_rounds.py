"""Unit tests of the round engine (fedseg.protocol.rounds) over an in-memory transport.

Each node is a real :class:`NodeRuntime` over a tiny synthetic site, served through the
node's own whitelist (:func:`fedseg.node.actions.handle`), so the engine, the wire format
and the node agree exactly as they do over Syft, minus the network. End-to-end runs with
real Syft nodes live in ``tests/test_end_to_end.py``.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedseg.node.actions import NodeRuntime, handle
from fedseg.node.config import NodeConfig
from fedseg.node.synthetic import write_federation
from fedseg.protocol.aggregate import weighted_average
from fedseg.protocol.errors import MessageError, ProtocolError, RemoteError, RoundError
from fedseg.protocol.messages import (
    DescribeReply,
    DescribeRequest,
    ErrorCode,
    ErrorReply,
    EvaluateReply,
    EvaluateRequest,
    CalibrateRequest,
    HeadsReply,
    Message,
    TrainReply,
    TrainRequest,
    decode,
    encode,
)
from fedseg.protocol.plan import Plan
from fedseg.protocol.rounds import Peer, initial_arrays, run_federation
from fedseg.protocol.run_store import RunStore
from fedseg.protocol.strategies import make_strategy
from fedseg.protocol.wire import encode_frame

from engine_doubles import SITES, TINY, CannedTransport, FailingTransport, InMemoryTransport, Reporter, TamperingTransport, tiny_plan

METRIC_COLUMNS = {f"{split}_{k}" for split in ("val", "test") for k in ("dice", "iou", "assd", "hd95", "loss", "n")}


def _is_train(m: Message) -> bool:
    return isinstance(m, TrainRequest)


def _frame_with_weights(reply: TrainReply, weights: dict[str, np.ndarray]) -> bytes:
    """Encodes a TrainReply without validation (encode would refuse NaN)."""
    scalars = {"run_id": reply.run_id, "round": reply.round, "n_samples": reply.n_samples,
               "mean_loss": reply.mean_loss, "seconds": reply.seconds, "accepted": reply.accepted, "candidates": reply.candidates,
               "scores": reply.scores}
    return encode_frame(reply.KIND.value, reply.SCHEMA_VERSION, scalars, {f"weights/{k}": v for k, v in weights.items()})


def _poison(value: float) -> Callable[[Message], bytes]:
    def tamper(reply: Message) -> bytes:
        assert isinstance(reply, TrainReply)
        weights = dict(reply.weights)
        name = sorted(weights)[0]
        bad = weights[name].copy()
        bad.flat[0] = value
        weights[name] = bad
        return _frame_with_weights(reply, weights)

    return tamper


def _reshape(reply: Message) -> bytes:
    assert isinstance(reply, TrainReply)
    name = next(k for k, v in sorted(reply.weights.items()) if v.ndim == 4)
    weights = {**reply.weights, name: np.zeros((1,) + reply.weights[name].shape, np.float32)}
    return encode(replace(reply, weights=weights))


def _drop_tensor(reply: Message) -> bytes:
    assert isinstance(reply, TrainReply)
    weights = dict(reply.weights)
    del weights[sorted(weights)[-1]]
    return encode(replace(reply, weights=weights))


def _extra_tensor(reply: Message) -> bytes:
    assert isinstance(reply, TrainReply)
    return encode(replace(reply, weights={**reply.weights, "backdoor.weight": np.ones(3, np.float32)}))


TAMPERS: dict[str, tuple[Callable[[Message], bytes], str]] = {
    "nan": (_poison(np.nan), "NaN or Inf"),
    "inf": (_poison(np.inf), "NaN or Inf"),
    "shape": (_reshape, "has shape"),
    "missing": (_drop_tensor, "missing tensors"),
    "extra": (_extra_tensor, r"unexpected tensors \['backdoor.weight'\]"),
}


def _assert_finite(arrays: dict[str, np.ndarray]) -> None:
    for name, arr in arrays.items():
        assert np.isfinite(arr).all(), name


def _fedavg(replies: list[TrainReply]) -> dict[str, np.ndarray]:
    return weighted_average([(r.weights, float(r.n_samples)) for r in replies])


def _assert_arrays_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), name


# --- a full run ------------------------------------------------------------------------


def test_run_records_every_round_and_site(runtimes: dict[str, NodeRuntime], tmp_path: Path) -> None:
    plan = tiny_plan(rounds=2)
    transports = [InMemoryTransport(rt) for rt in runtimes.values()]
    reporter = Reporter()
    out = tmp_path / "run"
    rows = run_federation(plan, transports, out, reporter, invites=["inv/a.json"])

    store = RunStore(out)
    assert store.read_metrics() == rows
    assert sorted((r["round"], r["site"]) for r in rows) == [(r, s) for r in range(3) for s in SITES]
    for row in rows:
        rt = runtimes[row["site"]]
        assert METRIC_COLUMNS <= set(row), row
        for split in ("val", "test"):
            assert 0.0 <= row[f"{split}_dice"] <= 1.0 and 0.0 <= row[f"{split}_iou"] <= row[f"{split}_dice"] + 1e-9
            assert np.isfinite(row[f"{split}_loss"])
            assert row[f"{split}_n"] == len(getattr(rt.splits, split))
        if row["round"] == 0:
            assert "train_loss" not in row
        else:
            assert row["train_n"] == len(rt.splits.train)
            assert row["train_loss"] == transports[SITES.index(row["site"])].train_replies()[row["round"]].mean_loss

    # The checkpoint holds the FedAvg of the last round's updates, and the run state.
    state, arrays = store.load()
    assert (state.round, state.plan, state.invites) == (2, plan.to_dict(), ["inv/a.json"])
    last = [t.train_replies()[2] for t in transports]
    _assert_arrays_equal(arrays, _fedavg(last))
    initial = initial_arrays(plan)
    assert set(arrays) == set(initial)
    assert any(not np.array_equal(arrays[k], initial[k]) for k in initial)

    # Each round starts from the previous aggregate. Round 1's aggregate is scored on round 2's
    # train request, which carries it; the last aggregate gets an evaluate request of its own.
    by_site = {r["site"]: r for r in rows if r["round"] == 1}
    for t in transports:
        train_requests = {m.round: m for m in t.requests if isinstance(m, TrainRequest)}
        evaluations = {m.round: m for m in t.requests if isinstance(m, EvaluateRequest)}
        _assert_arrays_equal(train_requests[1].weights, initial)
        _assert_arrays_equal(evaluations[0].weights, initial)
        round_1 = _fedavg([u.train_replies()[1] for u in transports])
        _assert_arrays_equal(train_requests[2].weights, round_1)
        assert (train_requests[1].score, train_requests[2].score) == ([], ["val", "test"])
        assert t.train_replies()[1].scores == {}
        scored = t.train_replies()[2].scores
        assert {f"{split}_{k}": v for split, values in scored.items() for k, v in values.items()}.items() <= by_site[t.name].items()
        _assert_arrays_equal(evaluations[2].weights, arrays)
        assert all(m.run_id == state.run_id for m in t.requests)
        assert t.connected and t.bytes_sent > 0 and t.bytes_received > 0
        assert t.kinds() == [("describe", None), ("evaluate", 0), ("train", 1), ("train", 2), ("evaluate", 2)]

    report = store.report.read_text()
    for site in SITES:
        assert site in report
    assert f"fedseg run {state.run_id} (fedavg)" in report
    assert store.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert [r for r, _, _ in reporter.rounds] == [0, 1, 2]
    for round_, round_rows, summary in reporter.rounds:
        assert [r["site"] for r in round_rows] == list(SITES)
        assert all(r["round"] == round_ for r in round_rows)
        if round_:
            replies = [t.train_replies()[round_] for t in transports]
            n = sum(r.n_samples for r in replies)
            assert summary["n_train"] == n
            assert summary["train_loss"] == pytest.approx(sum(r.mean_loss * r.n_samples for r in replies) / n)
    for site in SITES:
        assert any(site in text for text in reporter.infos)


def test_resume_continues_exactly_where_it_stopped(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    straight = tmp_path / "straight"
    run_federation(tiny_plan(rounds=3), [InMemoryTransport(rt) for rt in runtimes.values()], straight, Reporter())

    broken = tmp_path / "broken"
    run_federation(tiny_plan(rounds=1), [InMemoryTransport(rt) for rt in runtimes.values()], broken, Reporter())
    first_state, _ = RunStore(broken).load()
    # A crash between writing metrics and the checkpoint leaves rows past the checkpoint.
    store = RunStore(broken)
    store.write_metrics(store.read_metrics() + [{"round": 2, "site": "site-a", "val_dice": -1.0}])

    transports = [InMemoryTransport(rt) for rt in runtimes.values()]
    reporter = Reporter()
    rows = run_federation(tiny_plan(rounds=3), transports, broken, reporter, resume=True)

    assert sorted((r["round"], r["site"]) for r in rows) == [(r, s) for r in range(4) for s in SITES]
    assert store.read_metrics() == rows
    assert all(r["val_dice"] >= 0 for r in rows)
    state, arrays = store.load()
    assert state.round == 3 and state.run_id == first_state.run_id
    assert any(f"resuming run {first_state.run_id} after round 1" in text for text in reporter.infos)
    # Round 0 is not evaluated again, nor is round 1; rounds 2 and 3 run once, round 2 scored on round 3's request.
    assert transports[0].kinds() == [("describe", None), ("train", 2), ("train", 3), ("evaluate", 3)]
    assert [r for r, _, _ in reporter.rounds] == [2, 3]

    _, expected = RunStore(straight).load()
    _assert_arrays_equal(arrays, expected)
    straight_rows = {(r["round"], r["site"]): r for r in RunStore(straight).read_metrics()}
    for r in rows:
        other = straight_rows[(r["round"], r["site"])]
        assert {k: v for k, v in r.items() if k != "train_seconds"} == {k: v for k, v in other.items() if k != "train_seconds"}


def test_kept_optimizer_state_stays_on_the_node_and_survives_a_lost_round(
    runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None
) -> None:
    import shutil

    keep = {**TINY["train"], "keep_optimizer": True}
    straight = tmp_path / "straight"
    run_federation(tiny_plan(rounds=3, train=keep), [InMemoryTransport(rt) for rt in runtimes.values()], straight, Reporter())
    fresh = tmp_path / "fresh"
    run_federation(tiny_plan(rounds=3), [InMemoryTransport(rt) for rt in runtimes.values()], fresh, Reporter())

    # Round 3 is trained on the nodes (each keeps its state after it), then lost by the
    # coordinator: the resume repeats round 3, which must continue from round 2's state.
    broken, backup = tmp_path / "broken", tmp_path / "backup"
    run_federation(tiny_plan(rounds=2, train=keep), [InMemoryTransport(rt) for rt in runtimes.values()], broken, Reporter())
    shutil.copytree(broken, backup)
    run_id = RunStore(broken).load()[0].run_id
    transports = [InMemoryTransport(rt) for rt in runtimes.values()]
    run_federation(tiny_plan(rounds=3, train=keep), transports, broken, Reporter(), resume=True)
    shutil.rmtree(broken)
    shutil.copytree(backup, broken)
    run_federation(tiny_plan(rounds=3, train=keep), [InMemoryTransport(rt) for rt in runtimes.values()], broken, Reporter(), resume=True)

    _, expected = RunStore(straight).load()
    _assert_arrays_equal(RunStore(broken).load()[1], expected)
    with pytest.raises(AssertionError):  # keeping the optimizer changes training
        _assert_arrays_equal(RunStore(fresh).load()[1], expected)
    for rt, transport in zip(runtimes.values(), transports):
        # The state stays in the node's workdir: its last round and the one before, nothing older.
        kept = sorted(p.name for p in (rt.workdir / "personal").glob(f"{run_id}.optim.*"))
        assert kept == [f"{run_id}.optim.2.pt", f"{run_id}.optim.3.pt"]
        # ... and never leaves it: updates carry exactly the model's weights.
        assert all(set(r.weights) == set(expected) for r in transport.train_replies().values())
def _two_call_rows(runtimes: dict[str, NodeRuntime], plan: Plan) -> dict[tuple[int, str], dict]:
    """What each node reports per round when every round takes two calls: a train request,
    the strategy's aggregate, then an evaluate request of the new global model (the engine
    before evaluation rode on the next round's request). Train seconds are left out."""
    run_id, strategy = "two-calls", make_strategy(plan)
    trainers = strategy.participants({name: _describe(rt) for name, rt in runtimes.items()})
    arrays, rows = initial_arrays(plan), {}

    def ask(rt: NodeRuntime, message: Message) -> Message:
        return decode(handle(rt, encode(message)))

    for round_ in range(plan.rounds + 1):
        trained = {}
        if round_:
            request = TrainRequest(run_id=run_id, round=round_, plan=plan.to_dict(), weights=arrays)
            trained = {name: ask(runtimes[name], request) for name in trainers}
            arrays, _ = strategy.aggregate(round_, trained)
        evaluate = EvaluateRequest(run_id=run_id, round=round_, plan=plan.to_dict(), splits=["val", "test"], overlays=0, weights=arrays)
        for name, rt in runtimes.items():
            scored = ask(rt, evaluate)
            row = {"device": "cpu", **{f"{split}_{k}": v for split, values in scored.metrics.items() for k, v in values.items()}}
            if name in trained:
                row.update(train_loss=trained[name].mean_loss, train_n=trained[name].n_samples)
            rows[(round_, name)] = row
    return rows


def _describe(rt: NodeRuntime) -> DescribeReply:
    reply = decode(handle(rt, encode(DescribeRequest(run_id="two-calls"))))
    assert isinstance(reply, DescribeReply)
    return reply


@pytest.mark.parametrize("algorithm", ["fedavg", "ft", "iopfl", "fedbn"])
def test_one_call_per_round_records_the_rows_of_two_calls(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None,
                                                          algorithm: str) -> None:
    plan = tiny_plan(rounds=3, algorithm=algorithm)
    transports = [InMemoryTransport(rt) for rt in runtimes.values()]
    rows = run_federation(plan, transports, tmp_path, Reporter())

    # One call per node and round: round r's model is scored on round r + 1's train request;
    # round 0 and the last round are scored on evaluate requests of their own.
    for t in transports:
        assert t.kinds() == [("describe", None), ("evaluate", 0), ("train", 1), ("train", 2), ("train", 3), ("evaluate", 3)]
        assert [len(m.score) for m in t.requests if isinstance(m, TrainRequest)] == [0, 2, 2]
    assert {(r["round"], r["site"]): {k: v for k, v in r.items() if k not in ("round", "site", "train_seconds")} for r in rows} \
        == _two_call_rows(runtimes, plan)


def test_a_scorer_that_does_not_train_is_evaluated_beside_the_training(tmp_path: Path, no_plots: None) -> None:
    # FedAvg trains on pixel labels only; the box-labelled node holds masks, so it still scores every round.
    sites = write_federation(tmp_path / "data", n_per_site=12, size=32, seed=4)
    labels = {"site-a": {"labels": "pixel"}, "site-b": {"labels": "pixel"}, "site-c": {"labels": "box", "labels_from_masks": True}}
    runtimes = {s.name: NodeRuntime(NodeConfig(name=s.name, data=str(s), workdir=str(tmp_path / "nodes" / s.name), **labels[s.name])) for s in sites}
    plan = tiny_plan(rounds=2)
    transports = [InMemoryTransport(rt) for rt in runtimes.values()]
    rows = run_federation(plan, transports, tmp_path / "run", Reporter())

    assert transports[2].kinds() == [("describe", None), ("evaluate", 0), ("evaluate", 1), ("evaluate", 2)]
    assert transports[0].kinds() == [("describe", None), ("evaluate", 0), ("train", 1), ("train", 2), ("evaluate", 2)]
    assert {(r["round"], r["site"]): {k: v for k, v in r.items() if k not in ("round", "site", "train_seconds")} for r in rows} \
        == _two_call_rows(runtimes, plan)


def test_resume_completes_a_round_still_awaiting_its_scores(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    straight = tmp_path / "straight"
    run_federation(tiny_plan(rounds=3), [InMemoryTransport(rt) for rt in runtimes.values()], straight, Reporter())

    # The coordinator dies in round 3, after round 2 was checkpointed but before its model was scored.
    broken = tmp_path / "broken"
    a, b, c = runtimes.values()
    dies = lambda m: isinstance(m, TrainRequest) and m.round == 3  # noqa: E731
    with pytest.raises(RoundError):
        run_federation(tiny_plan(rounds=3, min_nodes=0), [InMemoryTransport(a), InMemoryTransport(b), FailingTransport(c, dies)], broken, Reporter())
    store = RunStore(broken)
    state, _ = store.load()
    assert state.round == 2 and set(state.pending["columns"]) == set(SITES)
    assert {r["round"] for r in store.read_metrics()} == {0, 1}

    transports = [InMemoryTransport(rt) for rt in runtimes.values()]
    rows = run_federation(tiny_plan(rounds=3), transports, broken, Reporter(), resume=True)
    assert transports[0].kinds() == [("describe", None), ("train", 3), ("evaluate", 3)]
    assert store.read_metrics() == rows
    straight_rows = RunStore(straight).read_metrics()
    assert [(r["round"], r["site"]) for r in rows] == [(r["round"], r["site"]) for r in straight_rows]
    for r, other in zip(rows, straight_rows):
        # Round 2's train columns come back from the checkpoint, its scores from the resumed request.
        assert {k: v for k, v in r.items() if k != "train_seconds"} == {k: v for k, v in other.items() if k != "train_seconds"}
    assert [r["train_seconds"] for r in rows if r["round"] == 2] == [state.pending["columns"][s]["train_seconds"] for s in SITES]


def test_resume_without_checkpoint_names_the_file(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    with pytest.raises(ProtocolError, match="checkpoint.npz cannot be resumed from"):
        run_federation(tiny_plan(), [InMemoryTransport(rt) for rt in runtimes.values()], tmp_path, Reporter(), resume=True)


# --- nodes that fail -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fails, phase",
    [(lambda m: True, "round 0 describe"), (_is_train, "round 1 training")],
    ids=["unreachable", "fails-training"],
)
def test_failing_node_aborts_when_all_are_required(
    runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None, fails: Callable[[Message], bool], phase: str
) -> None:
    a, b, c = runtimes.values()
    transports = [InMemoryTransport(a), InMemoryTransport(b), FailingTransport(c, fails)]
    with pytest.raises(RoundError, match=f"{phase}: only 2 of the 3 required nodes answered \\(site-c: node site-c did not answer"):
        run_federation(tiny_plan(min_nodes=0), transports, tmp_path, Reporter())
    if phase.startswith("round 1"):
        # Round 0 stays the last completed round, so --resume can retry round 1.
        state, arrays = RunStore(tmp_path).load()
        assert state.round == 0
        _assert_arrays_equal(arrays, initial_arrays(tiny_plan()))
        assert {r["round"] for r in RunStore(tmp_path).read_metrics()} == {0}


def test_failing_node_is_left_out_when_enough_answer(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    a, b, c = runtimes.values()
    transports = [InMemoryTransport(a), InMemoryTransport(b), FailingTransport(c, _is_train)]
    reporter = Reporter()
    rows = run_federation(tiny_plan(rounds=1, min_nodes=2), transports, tmp_path, reporter)

    assert any("round 1: node site-c left out of training: node site-c did not answer" in text for text in reporter.infos)
    _, arrays = RunStore(tmp_path).load()
    _assert_arrays_equal(arrays, _fedavg([transports[0].train_replies()[1], transports[1].train_replies()[1]]))
    round_1 = {r["site"]: r for r in rows if r["round"] == 1}
    assert set(round_1) == set(SITES)  # site-c still scores the new model ...
    assert "train_loss" not in round_1["site-c"] and "train_loss" in round_1["site-a"]  # ... but did not train
    assert reporter.rounds[-1][2]["n_train"] == len(a.splits.train) + len(b.splits.train)


def test_node_lost_after_start_is_left_out(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    a, b, c = runtimes.values()
    lost = FailingTransport(c, lambda m: getattr(m, "round", 0) >= 1)
    transports = [InMemoryTransport(a), InMemoryTransport(b), lost]
    reporter = Reporter()
    rows = run_federation(tiny_plan(rounds=2, min_nodes=2), transports, tmp_path, reporter)
    assert sorted((r["round"], r["site"]) for r in rows) == [(0, s) for s in SITES] + [
        (r, s) for r in (1, 2) for s in ("site-a", "site-b")
    ]
    # Each of the two rounds reports site-c once for training and once for evaluation.
    assert sum("node site-c left out" in text for text in reporter.infos) == 4
    _, arrays = RunStore(tmp_path).load()
    _assert_arrays_equal(arrays, _fedavg([transports[0].train_replies()[2], transports[1].train_replies()[2]]))


def test_node_left_out_of_evaluation_is_reported(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    a, b, c = runtimes.values()
    fails_eval = FailingTransport(c, lambda m: isinstance(m, EvaluateRequest) and m.round >= 1)
    reporter = Reporter()
    rows = run_federation(tiny_plan(rounds=1, min_nodes=2), [InMemoryTransport(a), InMemoryTransport(b), fails_eval], tmp_path, reporter)
    # site-c trained, so it keeps a row for round 1, but that row has no scores.
    assert {r["site"] for r in rows if r["round"] == 1 and "test_dice" in r} == {"site-a", "site-b"}
    # Its row is silently missing from metrics and report; the person running it must be told.
    assert any("site-c" in text and "round 1" in text for text in reporter.infos), reporter.infos


class _Blocked(InMemoryTransport):
    """Never answers a train request until released."""

    def __init__(self, runtime: NodeRuntime, release: threading.Event) -> None:
        super().__init__(runtime)
        self.release = release

    def serve(self, request: Message, frame: bytes) -> bytes:
        if isinstance(request, TrainRequest):
            self.release.wait(timeout=60)
        return super().serve(request, frame)


def test_node_that_times_out_is_left_out(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    a, b, c = runtimes.values()
    release = threading.Event()

    class Releasing(Reporter):
        def info(self, text: str) -> None:
            super().info(text)
            if "left out" in text:
                release.set()  # unblock the stuck node so the engine's pool can shut down

    reporter = Releasing()
    transports = [InMemoryTransport(a), InMemoryTransport(b), _Blocked(c, release)]
    run_federation(tiny_plan(rounds=1, min_nodes=2, timeout_s=2.0), transports, tmp_path, reporter)
    assert any("round 1: node site-c left out of training: no answer within 2 s" in text for text in reporter.infos)
    state, arrays = RunStore(tmp_path).load()
    assert state.round == 1
    _assert_arrays_equal(arrays, _fedavg([transports[0].train_replies()[1], transports[1].train_replies()[1]]))


# --- tampered updates are never applied --------------------------------------------------


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_bad_update_aborts_when_all_are_required(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None, tamper: str) -> None:
    a, b, c = runtimes.values()
    fn, reason = TAMPERS[tamper]
    transports = [InMemoryTransport(a), InMemoryTransport(b), TamperingTransport(c, _is_train, fn)]
    with pytest.raises(RoundError, match=f"round 1 training: only 2 of the 3 required nodes answered \\(site-c: .*{reason}"):
        run_federation(tiny_plan(min_nodes=0), transports, tmp_path, Reporter())
    state, arrays = RunStore(tmp_path).load()
    assert state.round == 0
    _assert_finite(arrays)
    _assert_arrays_equal(arrays, initial_arrays(tiny_plan()))


@pytest.mark.parametrize("tamper", ["nan", "shape"])
def test_bad_update_is_left_out_when_enough_answer(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None, tamper: str) -> None:
    a, b, c = runtimes.values()
    fn, reason = TAMPERS[tamper]
    transports = [InMemoryTransport(a), InMemoryTransport(b), TamperingTransport(c, _is_train, fn)]
    reporter = Reporter()
    run_federation(tiny_plan(rounds=1, min_nodes=2), transports, tmp_path, reporter)
    left_out = [text for text in reporter.infos if "round 1: node site-c left out" in text]
    assert len(left_out) == 1 and re.search(reason, left_out[0]), reporter.infos
    state, arrays = RunStore(tmp_path).load()
    assert state.round == 1
    _assert_finite(arrays)
    _assert_arrays_equal(arrays, _fedavg([transports[0].train_replies()[1], transports[1].train_replies()[1]]))


def _with_run_id(run_id: str) -> Callable[[Message], bytes]:
    def tamper(reply: Message) -> bytes:
        return encode(replace(reply, run_id=run_id))

    return tamper


def _with_round(delta: int) -> Callable[[Message], bytes]:
    def tamper(reply: Message) -> bytes:
        assert isinstance(reply, TrainReply)
        return encode(replace(reply, round=reply.round + delta))

    return tamper


@pytest.mark.parametrize("tamper", [_with_run_id("another-run"), _with_round(-1)], ids=["run_id", "stale-round"])
def test_update_for_another_run_or_round_is_not_applied(
    runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None, tamper: Callable[[Message], bytes]
) -> None:
    a, b, c = runtimes.values()
    transports = [InMemoryTransport(a), InMemoryTransport(b), TamperingTransport(c, _is_train, tamper)]
    try:
        run_federation(tiny_plan(rounds=1, min_nodes=0), transports, tmp_path, Reporter())
    except RoundError as exc:
        assert "site-c" in str(exc)
    else:
        raise AssertionError("a reply for another run or round was averaged into the global model")


def _only_val(reply: Message) -> bytes:
    assert isinstance(reply, EvaluateReply)
    return encode(replace(reply, metrics={"val": reply.metrics["val"]}))


def test_evaluation_missing_a_requested_split_is_refused(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    a, b, c = runtimes.values()
    applies = lambda m: isinstance(m, EvaluateRequest) and m.round == 1  # noqa: E731
    transports = [InMemoryTransport(a), InMemoryTransport(b), TamperingTransport(c, applies, _only_val)]
    with pytest.raises(RoundError, match="site-c"):
        run_federation(tiny_plan(rounds=1, min_nodes=0), transports, tmp_path, Reporter())


# --- engine preconditions --------------------------------------------------------------------


def test_node_names_must_be_distinct(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    a = runtimes["site-a"]
    with pytest.raises(ProtocolError, match="node names must be distinct"):
        run_federation(tiny_plan(), [InMemoryTransport(a), InMemoryTransport(a)], tmp_path, Reporter())


def test_min_nodes_above_node_count_is_refused(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    transports = [InMemoryTransport(rt) for rt in runtimes.values()]
    with pytest.raises(ProtocolError, match="plan.min_nodes is 4 but only 3 nodes were given"):
        run_federation(tiny_plan(min_nodes=4), transports, tmp_path, Reporter())
    assert not any(t.requests for t in transports)


# --- Peer and the node whitelist ---------------------------------------------------------------


def test_peer_turns_error_reply_into_remote_error() -> None:
    peer = Peer(CannedTransport(encode(ErrorReply(code="bad_plan", message="plan.rounds must be ..."))), 2**20)
    with pytest.raises(RemoteError, match=r"node site-x refused \(bad_plan\): plan.rounds must be") as info:
        peer.request(DescribeRequest(run_id="r"), DescribeReply)
    assert (info.value.node, info.value.code) == ("site-x", "bad_plan")


def test_peer_refuses_a_reply_of_the_wrong_kind() -> None:
    peer = Peer(CannedTransport(encode(EvaluateReply(run_id="r", round=1, metrics={}))), 2**20)
    with pytest.raises(MessageError, match="node site-x answered evaluate_reply to a describe request"):
        peer.request(DescribeRequest(run_id="r"), DescribeReply)


def test_peer_enforces_its_size_limit() -> None:
    reply = encode(DescribeReply(node="x", label_kind="pixel", channels=3, image_size=32, n_train=1, n_val=1, n_test=1, can_score=True, fingerprint="f"))
    with pytest.raises(MessageError, match="exceeds the limit of 10 bytes"):
        Peer(CannedTransport(reply), 10).request(DescribeRequest(run_id="r"), DescribeReply)


def _refusal(rt: NodeRuntime, frame: bytes) -> ErrorReply:
    reply = decode(handle(rt, frame))
    assert isinstance(reply, ErrorReply), reply
    return reply


NOT_EXPOSED: dict[str, Message | bytes] = {
    "error": ErrorReply(code="internal", message="x"),
    "train_reply": TrainReply(run_id="r", round=1, n_samples=1, mean_loss=0.0, seconds=0.0, accepted=0, candidates=0, weights={}),
    "evaluate_reply": EvaluateReply(run_id="r", round=1, metrics={}),
    "heads_reply": HeadsReply(run_id="r", round=1, weights={}),
    "shutdown": encode_frame("shutdown", 1, {}, {}),
}


@pytest.mark.parametrize("action", sorted(NOT_EXPOSED))
def test_action_not_exposed_is_refused_and_node_keeps_serving(runtimes: dict[str, NodeRuntime], action: str) -> None:
    rt = runtimes["site-b"]
    item = NOT_EXPOSED[action]
    reply = _refusal(rt, item if isinstance(item, bytes) else encode(item))
    assert reply.code == ErrorCode.NOT_EXPOSED.value
    assert f"action {action!r} is not exposed by node site-b (exposed: adapt, calibrate, describe, evaluate, heads, personal, secagg_keys, secagg_mask, secagg_train, secagg_unmask, train)" in reply.message
    if isinstance(item, Message):  # the engine's Peer surfaces it as a RemoteError
        with pytest.raises(RemoteError, match=f"node site-b refused \\(not_exposed\\): action {action!r}") as info:
            Peer(_connected(rt), 2**20).request(item, DescribeReply)
        assert info.value.code == "not_exposed"
    described = decode(handle(rt, encode(DescribeRequest(run_id="after"))))
    assert isinstance(described, DescribeReply) and described.node == "site-b"


def _connected(rt: NodeRuntime) -> InMemoryTransport:
    transport = InMemoryTransport(rt)
    transport.connect()
    return transport


@pytest.mark.parametrize(
    "frame, code, text",
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad_message", "fedseg magic"),
        (encode_frame("describe", 2, {"run_id": "r"}, {}), "bad_message", "schema version 2"),
        (encode_frame("describe", 1, {"run_id": "r", "sudo": True}, {}), "bad_message", "unexpected fields ['sudo']"),
    ],
    ids=["garbage", "version", "extra-field"],
)
def test_malformed_request_is_refused(runtimes: dict[str, NodeRuntime], frame: bytes, code: str, text: str) -> None:
    reply = _refusal(runtimes["site-a"], frame)
    assert reply.code == code and text in reply.message


def test_poisoned_weights_are_refused_by_the_node(runtimes: dict[str, NodeRuntime]) -> None:
    plan = tiny_plan()
    weights = initial_arrays(plan)
    name = sorted(weights)[0]
    weights[name] = weights[name].copy()
    weights[name].flat[0] = np.nan
    frame = encode_frame("train", 1, {"run_id": "r", "round": 1, "plan": plan.to_dict(), "score": [], "overlays": 0}, {f"weights/{k}": v for k, v in weights.items()})
    reply = _refusal(runtimes["site-a"], frame)
    assert reply.code == ErrorCode.BAD_WEIGHTS.value and f"weights/{name}" in reply.message


# --- personalized methods: local parts never travel ------------------------------------


@pytest.mark.parametrize("algorithm", ["fedbn", "fedrep", "local"])
def test_personalized_layers_never_leave_the_node(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None, algorithm: str) -> None:
    from fedseg.models.personalization import local_keys

    transports = [InMemoryTransport(rt) for rt in runtimes.values()]
    plan = tiny_plan(algorithm=algorithm, rounds=2)
    run_federation(plan, transports, tmp_path, Reporter())
    run_id = RunStore(tmp_path).load()[0].run_id
    model = plan.build_model()
    local = local_keys(model, plan.local_part)
    shared = set(model.state_dict()) - local
    assert local
    kept = {}
    for t in transports:
        for message in t.requests + t.replies:
            if hasattr(message, "weights"):
                assert set(message.weights) == shared, f"{t.name} {message.KIND} carried {set(message.weights) & local}"
        with np.load(t.runtime.workdir / "personal" / f"{run_id}.local.npz") as saved:
            assert set(saved.files) == local
            kept[t.name] = {k: saved[k] for k in saved.files}
    # Each node's local part is its own: trained on its own data, never averaged.
    a, b = list(kept.values())[:2]
    assert any(not np.array_equal(a[k], b[k]) for k in local)


def test_ft_scores_a_fine_tuned_copy_and_leaves_the_global_model_alone(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    rows = {}
    arrays = {}
    for algorithm in ("fedavg", "ft"):
        out = tmp_path / algorithm
        rows[algorithm] = run_federation(tiny_plan(algorithm=algorithm, rounds=1), [InMemoryTransport(rt) for rt in runtimes.values()], out, Reporter())
        arrays[algorithm] = RunStore(out).load()[1]
    _assert_arrays_equal(arrays["ft"], arrays["fedavg"])
    at = {a: {r["site"]: r for r in rows[a] if r["round"] == 1} for a in rows}
    assert [r for r in rows["ft"] if r["round"] == 0] == [r for r in rows["fedavg"] if r["round"] == 0]
    for s in SITES:
        # The global figures are FedAvg's; the personalized ones come from the fine-tuned copy.
        assert at["ft"][s]["val_loss"] == at["fedavg"][s]["val_loss"]
        assert "personal_val_loss" not in at["fedavg"][s]
    assert any(at["ft"][s]["personal_val_loss"] != at["ft"][s]["val_loss"] for s in SITES)


def test_iopfl_keeps_a_running_mix_on_each_node_and_scores_it(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None) -> None:
    from fedseg.models.iopfl import running_mix

    transports = [InMemoryTransport(rt) for rt in runtimes.values()]
    rows = run_federation(tiny_plan(algorithm="iopfl", rounds=2, personal={"alpha": 0.1}), transports, tmp_path, Reporter())
    run_id = RunStore(tmp_path).load()[0].run_id
    for t in transports:
        trained = [r.weights for r in t.replies if isinstance(r, TrainReply)]
        expected = running_mix(running_mix(None, trained[0], 0.1), trained[1], 0.1)
        mix = t.runtime.personal(run_id, "mix")
        _assert_arrays_equal(mix, expected)
        # Only the node's trained weights travelled; the mix itself never did.
        assert all(set(r.weights) == set(mix) for r in t.replies if isinstance(r, TrainReply))
    last = [r for r in rows if r["round"] == 2]
    assert all("personal_test_dice" in r and "test_dice" in r for r in last)
    assert not any("personal_test_dice" in r for r in rows if r["round"] == 0)


def test_iopfl_mix_epochs_specialize_the_running_mix_without_touching_the_shared_update(
    runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None
) -> None:
    from fedseg.models.iopfl import relative_distance

    far: dict[float, dict[str, float]] = {}
    shared: dict[float, list[dict[str, np.ndarray]]] = {}
    for epochs in (0.0, 2.0):
        transports = [InMemoryTransport(rt) for rt in runtimes.values()]
        run_federation(tiny_plan(algorithm="iopfl", rounds=1, personal={"alpha": 0.5, "mix_epochs": epochs}), transports, tmp_path / str(epochs), Reporter())
        state, global_arrays = RunStore(tmp_path / str(epochs)).load()
        far[epochs] = {t.name: relative_distance(t.runtime.personal(state.run_id, "mix"), global_arrays) for t in transports}
        shared[epochs] = [r.weights for t in transports for r in t.replies if isinstance(r, TrainReply)]
    # The extra epochs train a copy: every node shares exactly the update it shares without them.
    for a, b in zip(shared[0.0], shared[2.0]):
        _assert_arrays_equal(a, b)
    # The mixed-in model has trained two more epochs on the node's own data: its mix sits further from the global model.
    assert all(far[2.0][s] > 1.5 * far[0.0][s] for s in SITES), far


def test_lcfed_shares_only_heads_and_only_with_consent(runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import fedseg.node.actions as actions
    from fedseg.models.personalization import LocalPart, local_keys

    # This test is about what travels; whether HC beats stage 1 on validation is tested below and in test_lcfed.py.
    monkeypatch.setattr(actions, "calibration_keeps", lambda *a, **k: True)
    # site-c's owner keeps its head: it neither sends it nor receives the others'.
    nodes = dict(runtimes, **{"site-c": NodeRuntime(replace(runtimes["site-c"].config, share_head=False))})
    transports = [InMemoryTransport(rt) for rt in nodes.values()]
    plan = tiny_plan(algorithm="lcfed", rounds=2, lcfed={"hc_epochs": 2.0})
    rows = run_federation(plan, transports, tmp_path, Reporter())
    state, _ = RunStore(tmp_path).load()
    assert state.round == 3 and state.plan["sites"] == list(SITES)
    model = Plan.from_dict(state.plan).build_model()
    local = local_keys(model, LocalPart.HEAD)
    assert {k.split(".")[0] for k in local} == {"head", "hc"}
    by_name = {t.name: t for t in transports}
    for t in transports:
        for message in t.requests + t.replies:
            if isinstance(message, (TrainRequest, TrainReply, EvaluateRequest, CalibrateRequest)):
                assert not set(message.weights) & local, f"{t.name} {message.KIND} carried local tensors"
    heads_sent = {t.name: r for t in transports for r in t.replies if isinstance(r, HeadsReply)}
    assert set(heads_sent) == {"site-a", "site-b"}
    assert all(set(r.weights) == {"head.weight", "head.bias"} for r in heads_sent.values())
    refused = [r for r in by_name["site-c"].replies if isinstance(r, ErrorReply)]
    assert [r.code for r in refused] == [ErrorCode.DECLINED.value] and "--no-share-head" in refused[0].message
    calibrations = {t.name: [m for m in t.requests if isinstance(m, CalibrateRequest)] for t in transports}
    assert {k.split("/")[0] for k in calibrations["site-a"][0].heads} == {"site-b"}
    assert {k.split("/")[0] for k in calibrations["site-b"][0].heads} == {"site-a"}
    assert calibrations["site-c"][0].heads == {}
    np.testing.assert_array_equal(calibrations["site-a"][0].heads["site-b/head.weight"], heads_sent["site-b"].weights["head.weight"])
    # The calibration row scores both the stage-1 model and the calibrated one.
    final = {r["site"]: r for r in rows if r["round"] == 3}
    assert set(final) == set(SITES) and all("personal_test_dice" in r for r in final.values())
    assert final["site-c"]["personal_val_loss"] == final["site-c"]["val_loss"]  # no HC without heads
    assert all(final[s]["personal_val_loss"] != final[s]["val_loss"] for s in ("site-a", "site-b"))
    # HC is kept on the node, with the heads it was trained on beside the model.
    kept = nodes["site-a"].personal(state.run_id)
    assert set(kept) == local and np.abs(kept["hc.conv.weight"]).sum() > 0
    assert (nodes["site-a"].workdir / "models" / state.run_id / "heads.npz").exists()
    assert not (nodes["site-c"].workdir / "models" / state.run_id / "heads.npz").exists()


def test_lcfed_node_keeps_its_stage1_model_when_hc_scores_lower_on_validation(
        runtimes: dict[str, NodeRuntime], tmp_path: Path, no_plots: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedseg.node.actions as actions

    monkeypatch.setattr(actions, "calibration_keeps", lambda *a, **k: False)
    plan = tiny_plan(algorithm="lcfed", rounds=1, lcfed={"hc_epochs": 1.0})
    rows = run_federation(plan, [InMemoryTransport(rt) for rt in runtimes.values()], tmp_path, Reporter())
    state, _ = RunStore(tmp_path).load()
    calibration = [r for r in rows if r["round"] == 2]
    assert sorted(r["site"] for r in calibration) == sorted(SITES)
    for r in calibration:
        # The personalized figures are the stage-1 model's, and no heads are kept beside it.
        assert r["personal_val_dice"] == r["val_dice"] and r["personal_test_loss"] == r["test_loss"], r["site"]
        assert not (runtimes[r["site"]].workdir / "models" / state.run_id / "heads.npz").exists()


def test_lcfed_sites_must_match_the_invited_nodes(runtimes: dict[str, NodeRuntime], tmp_path: Path) -> None:
    plan = tiny_plan(algorithm="lcfed", sites=["site-a", "site-x"])
    with pytest.raises(ProtocolError, match=r"plan.sites \['site-a', 'site-x'\] do not match"):
        run_federation(plan, [InMemoryTransport(rt) for rt in list(runtimes.values())[:2]], tmp_path, Reporter())


def test_both_ends_log_every_message_and_the_logs_agree(tmp_path: Path, no_plots: None) -> None:
    from fedseg.protocol.audit.cross_check import cross_check
    from fedseg.protocol.audit.policy import check_policy
    from fedseg.protocol.audit.verify import verify_log
    from fedseg.protocol.identity import load_or_create_identity

    sites = write_federation(tmp_path / "data", n_per_site=12, size=32, seed=3)
    runtimes = [NodeRuntime(NodeConfig(name=s.name, data=str(s), labels="pixel", workdir=str(tmp_path / "nodes" / s.name)), audit=True) for s in sites]
    transports = [InMemoryTransport(rt) for rt in runtimes]
    run_federation(tiny_plan(rounds=1), transports, tmp_path / "run", Reporter())
    for rt in runtimes:
        rt.audit.close()
    store = RunStore(tmp_path / "run")
    coordinator = verify_log(store.audit, load_or_create_identity(store.identity).public_key())
    # describe, evaluate (round 0), train and evaluate (round 1): 4 requests and 4 replies per node.
    assert len(coordinator) == 8 * len(runtimes)
    nodes = {rt.name: verify_log(rt.workdir / "audit.jsonl", load_or_create_identity(rt.workdir / "identity.key").public_key()) for rt in runtimes}
    assert all(len(entries) == 8 for entries in nodes.values())
    assert cross_check(coordinator, nodes, coordinator_name="coordinator") == []
    declared = {k: tuple(v.shape) for k, v in store.load()[1].items()}
    assert all(check_policy(name, entries, declared, image_size=32) == [] for name, entries in nodes.items())
