"""The round engine: the one loop that talks to nodes, with timeouts, checkpoints and resume.

Round 0 scores the initial model, so curves start there. Each round then: every node
trains from the global weights in parallel and the strategy aggregates the valid
replies. The new global model is scored on the next round's train request: each node
scores the weights it receives on its validation and test splits before training from
them, so the weights cross once and a node gets one call per round. A scorer that does
not train gets an evaluate request at the same time, and the last round's model gets
an evaluate request of its own. The round-r rows always describe the global model after
round r; they are recorded once scored (metrics rows, then the checkpoint, atomically),
and until then the checkpoint keeps their train columns, so a resumed run completes them.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fedseg.models.lcfed import join_heads

from .audit.log import AuditLog
from .errors import MessageError, ProtocolError, RemoteError, RoundError
from .identity import load_or_create_identity
from .manifest import MANIFEST_FILE, record_manifest
from .messages import (
    Arrays,
    CalibrateRequest,
    DescribeReply,
    DescribeRequest,
    ErrorReply,
    EvaluateReply,
    EvaluateRequest,
    HeadsReply,
    HeadsRequest,
    PERSONAL_PREFIX,
    Message,
    TrainReply,
    TrainRequest,
    check_arrays,
    decode,
    encode,
)
from .plan import Plan
from .report import best_round, plot_dice, write_report
from .run_store import RunState, RunStore
from .strategies import Strategy, make_strategy
from .tensorboard import TENSORBOARD_DIR, ScalarLog

__all__ = ["Transport", "Peer", "Reporter", "initial_arrays", "run_federation"]

M = TypeVar("M", bound=Message)
#: The splits every node scores each round; the test split is reported, never selected on.
SCORED_SPLITS = ("val", "test")
#: How the coordinator signs its own audit log.
COORDINATOR_WRITER = "coordinator"


class Transport(Protocol):
    """Moves frames to one node and back (Syft in production, in-memory in unit tests)."""

    name: str
    bytes_sent: int
    bytes_received: int

    def connect(self) -> None: ...

    def exchange(self, frame: bytes) -> bytes: ...


class Peer:
    """Typed requests to one node: encode, record, exchange, record, decode, and turn error
    replies into exceptions. Both frames go to the coordinator's audit log: the request
    before it is sent, the reply as soon as it arrives."""

    def __init__(self, transport: Transport, max_bytes: int, audit: AuditLog | None = None) -> None:
        self.transport = transport
        self.name = transport.name
        self.max_bytes = max_bytes
        self.audit = audit

    def request(self, message: Message, expect: type[M], frame: bytes | None = None) -> M:
        """Sends ``message`` (already encoded as ``frame`` when several nodes get the same one)."""
        frame = encode(message) if frame is None else frame
        if self.audit is not None:
            self.audit.record(direction="sent", peer=self.name, frame=frame)
        reply_frame = self.transport.exchange(frame)
        if self.audit is not None:
            self.audit.record(direction="received", peer=self.name, frame=reply_frame,
                              run_id=getattr(message, "run_id", None), round=getattr(message, "round", None))
        reply = decode(reply_frame, self.max_bytes)
        if isinstance(reply, ErrorReply):
            raise RemoteError(self.name, reply.code, reply.message)
        if not isinstance(reply, expect):
            raise MessageError(f"node {self.name} answered {reply.KIND} to a {message.KIND} request")
        # A reply from another run or round (stale or replayed) must never be averaged in.
        for key in ("run_id", "round"):
            if hasattr(message, key) and getattr(reply, key, getattr(message, key)) != getattr(message, key):
                raise MessageError(f"node {self.name} answered for {key}={getattr(reply, key)!r}, expected {getattr(message, key)!r}")
        return reply


class Reporter(Protocol):
    """What the engine tells the person running it."""

    def info(self, text: str) -> None: ...

    def step(self, text: str) -> None:
        """Transient progress within a round (which nodes are still working)."""

    def round_done(self, round_: int, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """A round's rows are recorded: once the next round has trained, whose request scored
        the round's model (the last round: once its own evaluation is done). ``summary`` is
        the round's training summary; its ``seconds`` are the round's training turn."""


def initial_arrays(plan: Plan) -> Arrays:
    """The shared part of the plan's model, initialised from ``plan.seed``."""
    from fedseg.models.personalization import local_keys, push

    model = plan.build_model()
    return push(model, local_keys(model, plan.local_part))


@dataclass
class _Outcome:
    replies: dict[str, Any]
    failures: dict[str, str]


def _fan_out(
    pool: ThreadPoolExecutor, peers: Sequence[Peer], call: Callable[[Peer], Any], timeout_s: float, step: Callable[[str], None]
) -> _Outcome:
    futures = {pool.submit(call, p): p.name for p in peers}
    replies: dict[str, Any] = {}
    failures: dict[str, str] = {}
    try:
        for future in as_completed(futures, timeout=timeout_s):
            name = futures[future]
            try:
                replies[name] = future.result()
            except (ProtocolError, OSError) as exc:
                failures[name] = str(exc)
            waiting = [n for n in futures.values() if n not in replies and n not in failures]
            if waiting:
                step(f"{len(futures) - len(waiting)}/{len(futures)} nodes done, waiting for {', '.join(waiting)}")
    except FutureTimeout:
        for name in futures.values():
            if name not in replies and name not in failures:
                failures[name] = f"no answer within {timeout_s:.0f} s"
    # Node order, not arrival order, so aggregation sums in the same order on every run.
    return _Outcome({p.name: replies[p.name] for p in peers if p.name in replies}, failures)


def _phase(
    pool: ThreadPoolExecutor, peers: Sequence[Peer], call: Callable[[Peer], Any], needed: int, round_: int, phase: str, timeout_s: float, reporter: Reporter
) -> _Outcome:
    """One step of a round on every node, with progress, the quorum check and who was left out."""
    reporter.step(f"round {round_}: {phase} on {len(peers)} nodes")
    outcome = _fan_out(pool, peers, call, timeout_s, lambda text: reporter.step(f"round {round_} {phase}: {text}"))
    _require(outcome, needed, phase, round_)
    for name, why in outcome.failures.items():
        reporter.info(f"round {round_}: node {name} left out of {phase}: {why}")
    return outcome


def _require(outcome: _Outcome, needed: int, phase: str, round_: int) -> None:
    if len(outcome.replies) < needed:
        lost = "; ".join(f"{n}: {why}" for n, why in outcome.failures.items())
        raise RoundError(f"round {round_} {phase}: only {len(outcome.replies)} of the {needed} required nodes answered ({lost})")


def run_federation(
    plan: Plan,
    transports: Sequence[Transport],
    out: Path,
    reporter: Reporter,
    invites: Sequence[str] = (),
    resume: bool = False,
    strategy: Strategy | None = None,
    channels_from_nodes: bool = False,
) -> list[dict[str, Any]]:
    """Runs (or resumes) a federation and records it in ``out``.

    Args:
        plan: The training plan.
        transports: One per node.
        out: Run directory.
        reporter: Receives progress.
        invites: Invite paths, kept in the checkpoint so ``--resume`` needs nothing else.
        resume: Continue from ``out``'s last completed round.
        strategy: Defaults to the plan's algorithm.
        channels_from_nodes: A new run takes the model's input channels from the nodes'
            images (refused if they differ) instead of ``plan.model.in_channels``; the
            default strategy is then made for that plan.

    Returns:
        All metrics rows of the run.

    Raises:
        RoundError: If fewer nodes answer than the plan requires.
        TransportError: If a node cannot be reached or logged into.
    """
    names = [t.name for t in transports]
    if len(set(names)) != len(names):
        raise ProtocolError(f"node names must be distinct, got {names}")
    if plan.algorithm == "lcfed":
        # LC-Fed's site codes index the nodes: fixed once, in the plan every node receives.
        if not plan.sites:
            plan = replace(plan, sites=tuple(names))
        elif set(plan.sites) != set(names):
            raise ProtocolError(f"plan.sites {list(plan.sites)} do not match the invited nodes {names}")
    store = RunStore(out)
    store.root.mkdir(parents=True, exist_ok=True)
    strategy = strategy or make_strategy(plan)
    audit = AuditLog(store.audit, load_or_create_identity(store.identity), COORDINATOR_WRITER)
    peers = [Peer(t, plan.max_message_bytes, audit) for t in transports]
    needed = plan.min_nodes or len(peers)
    if needed > len(peers):
        raise ProtocolError(f"plan.min_nodes is {needed} but only {len(peers)} nodes were given")

    for t in transports:
        reporter.info(f"connecting to node {t.name} ...")
        t.connect()
    # The last round trained (its global model is ``arrays``) and, until that model is scored,
    # the round's train columns and summary.
    last, pending = 0, None
    if resume:
        state, arrays = store.load()
        run_id, start, last, pending = state.run_id, state.round + 1, state.round, state.pending
        # Rows past the checkpoint (a crash between the two writes) are dropped, and so are
        # those of a round still awaiting its scores: the next request scores it again.
        last_rows = state.round - 1 if pending is not None else state.round
        rows = [r for r in store.read_metrics() if r["round"] <= last_rows]
        store.write_metrics(rows)
        reporter.info(f"resuming run {run_id} after round {state.round}")
    else:
        run_id, start, rows, arrays = uuid.uuid4().hex[:12], 0, [], initial_arrays(plan)
    layout = {k: tuple(v.shape) for k, v in arrays.items()}
    board = ScalarLog(store.root / TENSORBOARD_DIR, start)

    def record(round_: int, pending: dict[str, Any] | None = None, scored: int | None = None, scored_arrays: Arrays | None = None) -> None:
        _record(store, board, RunState(run_id, round_, plan.to_dict(), list(invites), pending), arrays, rows, scored, scored_arrays)

    try:
        # One worker more than nodes: it waits on the evaluations of nodes that score but do not train.
        with ThreadPoolExecutor(max_workers=len(peers) + 1) as pool:
            described = _fan_out(pool, peers, lambda p: p.request(DescribeRequest(run_id=run_id), DescribeReply), plan.timeout_s, reporter.step)
            _require(described, len(peers), "describe", start)
            nodes = described.replies
            if channels_from_nodes and start == 0:
                plan = plan.with_node_channels({name: d.channels for name, d in nodes.items()})
                strategy, arrays = make_strategy(plan), initial_arrays(plan)
                layout = {k: tuple(v.shape) for k, v in arrays.items()}
            strategy.participants(nodes)  # refuses a plan that cannot work before any round runs
            scorers = [p for p in peers if nodes[p.name].can_score]
            if not scorers:
                raise ProtocolError("no node holds masks to score the model with")
            for name, d in nodes.items():
                reporter.info(f"node {name}: {d.n_train}/{d.n_val}/{d.n_test} train/val/test images, {'grey' if d.channels == 1 else 'RGB'}, "
                              f"{d.label_kind} labels, on {d.device}, key {d.fingerprint[7:19]}")
            for line in record_manifest(store.root / MANIFEST_FILE, run_id, plan, nodes, start):
                reporter.info(line)

            def evaluation(round_: int, weights: Arrays) -> Callable[[Peer], Scores]:
                request = EvaluateRequest(run_id=run_id, round=round_, plan=plan.to_dict(), splits=list(SCORED_SPLITS), overlays=plan.overlays, weights=weights)
                # Every node gets the same weights: encode them once, not once per node.
                frame = encode(request)
                return lambda p: _scored(p.name, p.request(request, EvaluateReply, frame).metrics)

            def evaluate(round_: int, weights: Arrays) -> _Outcome:
                return _phase(pool, scorers, evaluation(round_, weights), min(needed, len(scorers)), round_, "evaluation", plan.timeout_s, reporter)

            def calibrate(round_: int, weights: Arrays) -> _Outcome:
                """LC-Fed stage 2: gather the heads of the nodes that share them, send each sharing
                node the others' heads, and let every scorer score its calibrated model."""
                ask = HeadsRequest(run_id=run_id, round=round_, plan=plan.to_dict())
                frame = encode(ask)
                head_layout = plan.head_layout()

                def fetch(p: Peer) -> HeadsReply:
                    reply = p.request(ask, HeadsReply, frame)
                    check_arrays(reply.weights, head_layout, f"head from node {p.name}")
                    return reply

                sharers = set(strategy.participants(nodes))
                trainers = [p for p in peers if p.name in sharers]
                shared = _fan_out(pool, trainers, fetch, plan.timeout_s, lambda text: reporter.step(f"calibration heads: {text}"))
                heads = {name: reply.weights for name, reply in shared.replies.items()}
                for name, why in shared.failures.items():
                    reporter.info(f"calibration: node {name}'s head stays on it, so HC runs without it: {why}")
                # Only a node that shares its head receives the others'.
                requests = {
                    p.name: CalibrateRequest(
                        run_id=run_id, round=round_, plan=plan.to_dict(), splits=list(SCORED_SPLITS), weights=weights,
                        heads=join_heads({n: h for n, h in heads.items() if n != p.name}) if p.name in heads else {},
                    )
                    for p in scorers
                }

                def call(p: Peer) -> Scores:
                    return _scored(p.name, p.request(requests[p.name], EvaluateReply).metrics)

                return _phase(pool, scorers, call, min(needed, len(scorers)), round_, "calibration", plan.timeout_s, reporter)

            secure = None
            if plan.secure_aggregation:
                from .secagg.coordinator import SecureRounds  # crypto loads only for secure runs

                secure = SecureRounds(plan, strategy, run_id, peers, nodes, pool, reporter)
            if start == 0:
                t0 = time.monotonic()
                rows += _rows(0, evaluate(0, arrays).replies, {}, nodes)
                record(0, scored=0, scored_arrays=arrays)
                reporter.round_done(0, [r for r in rows if r["round"] == 0], {"seconds": time.monotonic() - t0})
                start = 1
            for round_ in range(start, plan.rounds + 1):
                t0, sent = time.monotonic(), arrays
                requests = strategy.configure(round_, arrays, run_id, nodes)
                side = None
                if pending is not None:
                    # The weights of this round are the last round's global model: each node scores
                    # them on the same call, before training from them; a scorer that does not train
                    # gets an evaluation of its own, at the same time.
                    requests = _with_scoring(requests, {p.name for p in scorers}, plan.overlays)
                    others = [p for p in scorers if p.name not in requests]
                    if others:
                        side = pool.submit(_fan_out, pool, others, evaluation(round_ - 1, arrays), plan.timeout_s, reporter.step)
                if secure is not None:
                    arrays, summary, trained = secure.run_round(round_, requests, layout)
                else:
                    arrays, summary, trained = _plain_round(pool, peers, requests, layout, min(needed, len(requests)), round_, strategy, plan, reporter)
                t_train = time.monotonic() - t0
                new_rows: list[dict[str, Any]] = []
                if pending is not None:
                    scores = _ridden_scores(trained, requests, side.result() if side is not None else None)
                    _require(scores, min(needed, len(scorers)), "evaluation", round_ - 1)
                    for name, why in scores.failures.items():
                        reporter.info(f"round {round_ - 1}: node {name} left out of evaluation: {why}")
                    new_rows = _rows(round_ - 1, scores.replies, pending["columns"], nodes)
                    rows.extend(new_rows)
                summary.update(train_seconds=t_train, seconds=time.monotonic() - t0)
                done = {"columns": _train_columns(trained), "summary": summary}
                record(round_, done, scored=round_ - 1 if pending is not None else None, scored_arrays=sent)
                if pending is not None:
                    reporter.round_done(round_ - 1, new_rows, pending["summary"])
                pending, last = done, round_
            if pending is not None:
                # The last round's global model has no next request to ride on: its own call.
                t0, round_ = time.monotonic(), last
                rows += _rows(round_, evaluate(round_, arrays).replies, pending["columns"], nodes)
                record(round_, scored=round_, scored_arrays=arrays)
                pending["summary"]["evaluation_seconds"] = time.monotonic() - t0
                reporter.round_done(round_, [r for r in rows if r["round"] == round_], pending["summary"])
            if plan.algorithm == "lcfed" and start <= plan.rounds + 1:
                t0, round_ = time.monotonic(), plan.rounds + 1
                new_rows = _rows(round_, calibrate(round_, arrays).replies, {}, nodes)
                rows += new_rows
                record(round_, scored=round_, scored_arrays=arrays)
                reporter.round_done(round_, new_rows, {"seconds": time.monotonic() - t0, "stage": "calibration"})
    finally:
        board.close()
        audit.close()
    return rows


#: A node's metrics per split, as in an :class:`EvaluateReply`.
Scores = dict[str, Any]


def _scored(name: str, metrics: Scores) -> Scores:
    """Checks that a node scored exactly the splits asked for (each maybe also as ``personal_``)."""
    bases = {k.removeprefix(PERSONAL_PREFIX) for k in metrics}
    if not set(SCORED_SPLITS) <= set(metrics) or bases != set(SCORED_SPLITS):
        raise MessageError(f"node {name} scored splits {sorted(metrics)}, expected {list(SCORED_SPLITS)}")
    return metrics


def _with_scoring(requests: dict[str, TrainRequest], scorers: set[str], overlays: int) -> dict[str, TrainRequest]:
    """The train requests, those of the scorers also asking for the scores of their weights."""
    scoring: dict[int, TrainRequest] = {}  # one request object per distinct request, so each is encoded once
    out = {}
    for name, request in requests.items():
        if name in scorers:
            if id(request) not in scoring:
                scoring[id(request)] = replace(request, score=list(SCORED_SPLITS), overlays=overlays)
            request = scoring[id(request)]
        out[name] = request
    return out


def _ridden_scores(trained: _Outcome, requests: dict[str, TrainRequest], side: _Outcome | None) -> _Outcome:
    """The scores that rode on the train replies, and those of the scorers that did not train."""
    replies: dict[str, Scores] = {}
    failures: dict[str, str] = {}
    for name, request in requests.items():
        if not request.score:
            continue
        if name in trained.replies:
            try:
                replies[name] = _scored(name, trained.replies[name].scores)
            except MessageError as exc:
                failures[name] = str(exc)
        else:
            failures[name] = trained.failures.get(name, "it did not take part in training")
    if side is not None:
        replies.update(side.replies)
        failures.update(side.failures)
    return _Outcome({name: replies[name] for name in sorted(replies)}, failures)


def _plain_round(
    pool: ThreadPoolExecutor, peers: Sequence[Peer], requests: dict[str, Any], layout: dict[str, tuple[int, ...]], needed: int,
    round_: int, strategy: Strategy, plan: Plan, reporter: Reporter,
) -> tuple[Arrays, dict[str, Any], _Outcome]:
    """Every participating node trains and sends its update; the strategy averages them."""
    taking_part = [p for p in peers if p.name in requests]
    frames = {id(r): encode(r) for r in requests.values()}  # strategies share one request across nodes

    def train(p: Peer) -> TrainReply:
        reply = p.request(requests[p.name], TrainReply, frames[id(requests[p.name])])
        check_arrays(reply.weights, layout, f"update from node {p.name} in round {round_}")
        return reply

    trained = _phase(pool, taking_part, train, needed, round_, "training", plan.timeout_s, reporter)
    arrays, summary = strategy.aggregate(round_, trained.replies)
    return arrays, summary, trained


def _train_columns(trained: _Outcome) -> dict[str, dict[str, Any]]:
    """Each trained node's columns of its row: loss, samples, seconds, FedMix pseudo-labels."""
    columns: dict[str, dict[str, Any]] = {}
    for name, t in trained.replies.items():
        columns[name] = {"train_loss": t.mean_loss, "train_n": t.n_samples, "train_seconds": t.seconds}
        if t.candidates:
            columns[name].update(pseudo_accepted=t.accepted, pseudo_candidates=t.candidates, pseudo_share=t.accepted / t.candidates)
    return columns


def _rows(round_: int, scores: dict[str, Scores], trained: dict[str, dict[str, Any]], nodes: dict[str, DescribeReply]) -> list[dict[str, Any]]:
    rows = []
    # A weak-label node without masks trains but cannot be scored: it still gets a row.
    for name in sorted(set(scores) | set(trained)):
        row: dict[str, Any] = {"round": round_, "site": name, "device": nodes[name].device}
        for split, values in scores.get(name, {}).items():
            row.update({f"{split}_{k}": v for k, v in values.items()})
        row.update(trained.get(name, {}))
        rows.append(row)
    return rows


def _record(store: RunStore, board: ScalarLog, state: RunState, arrays: Arrays, rows: list[dict[str, Any]],
            scored: int | None, scored_arrays: Arrays | None) -> None:
    """Writes what a completed step leaves: rows, checkpoint, best model, report, plot, scalars.

    A round's scores ride on the next round's request, so the rows just added (round
    ``scored``) describe ``scored_arrays``, the weights that request carried, while the
    checkpoint holds the newer ``arrays``.
    """
    # Metrics first, checkpoint last: a crash in between leaves rows past the checkpoint,
    # which a resume drops, never a checkpoint without its rows.
    store.write_metrics(rows)
    store.save(state, arrays)
    if scored is not None and scored_arrays is not None and best_round(rows) == scored:
        # After the checkpoint, so best.npz never holds a round a resume would drop.
        store.save(RunState(state.run_id, scored, state.plan, state.invites), scored_arrays, best=True)
    title = f"fedseg run {state.run_id} ({state.plan['algorithm']})"
    write_report(rows, store.report, title)
    plot_dice(rows, store.plot, title)
    if scored is not None:
        board.write([r for r in rows if r["round"] == scored])
