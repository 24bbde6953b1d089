"""Fuzzing both ends of the wire: 10,000+ random and mutated messages, none crashes, none is applied.

Coordinator side: every frame either decodes into a fully valid message or raises
:class:`MessageError`; a node reply that decodes but is not what was asked for (another
kind, another run or round, misshaped weights) is refused with a typed error too.
Node side: every frame that is not a valid request gets an :class:`ErrorReply` with a
declared code, the node's workdir is untouched, and it keeps serving.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedseg.node.actions import NodeRuntime, handle
from fedseg.node.config import NodeConfig
from fedseg.node.synthetic import write_federation
from fedseg.protocol.errors import MessageError, ProtocolError
from fedseg.protocol.messages import (
    DescribeReply,
    DescribeRequest,
    ErrorCode,
    ErrorReply,
    EvaluateReply,
    EvaluateRequest,
    TrainReply,
    TrainRequest,
    check_arrays,
    decode,
    encode,
)
from fedseg.protocol.plan import Plan
from fedseg.protocol.rounds import Peer, initial_arrays
from fedseg.protocol.wire import MAGIC, encode_frame

from engine_doubles import CannedTransport

PLAN = Plan.from_dict({"rounds": 2, "image_size": 32, "model": {"width": 4, "depth": 2, "groups": 2},
                       "train": {"batch_size": 4, "augment": False}})
WEIGHTS = initial_arrays(PLAN)
LAYOUT = {k: v.shape for k, v in WEIGHTS.items()}
MAX_BYTES = 2**20
#: Valid frames of each kind a node or a coordinator receives; mutations start from these.
SEEDS = {
    "train": encode(TrainRequest(run_id="run-1", round=1, plan=PLAN.to_dict(), weights=WEIGHTS)),
    "evaluate": encode(EvaluateRequest(run_id="run-1", round=1, plan=PLAN.to_dict(), splits=["val"], overlays=0, weights=WEIGHTS)),
    "describe": encode(DescribeRequest(run_id="run-1")),
    "train_reply": encode(TrainReply(run_id="run-1", round=1, n_samples=8, mean_loss=0.5, seconds=1.0, accepted=0, candidates=0, weights=WEIGHTS)),
    "evaluate_reply": encode(EvaluateReply(run_id="run-1", round=1, metrics={"val": {"dice": 0.5, "iou": 0.4, "assd": 2.0, "hd95": 4.0, "loss": 0.3, "n": 4}})),
}
EXAMPLES = 2_000  # per test below; five tests make 10,000 messages
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeRuntime:
    root = tmp_path_factory.mktemp("fuzz")
    site = write_federation(root / "data", n_per_site=9, size=32, seed=0)[0]
    return NodeRuntime(NodeConfig(name=site.name, data=str(site), labels="pixel", workdir=str(root / "node"), max_message_mb=1))


def _workdir_state(rt: NodeRuntime) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in Path(rt.workdir).rglob("*") if p.is_file()}


def _node_refuses_or_serves(rt: NodeRuntime, frame: bytes) -> None:
    """A frame that is not a valid request gets a typed refusal and changes nothing on the node."""
    try:
        message = decode(frame, MAX_BYTES)
    except MessageError:
        message = None
    if message is not None and message.KIND.value in ("describe", "train", "evaluate"):
        # A valid request is served, by design; valid requests with absurd weights have their own test.
        return
    before = _workdir_state(rt)
    reply = decode(handle(rt, frame))
    assert isinstance(reply, ErrorReply) and reply.code in set(ErrorCode), reply
    assert _workdir_state(rt) == before


def _coordinator_refuses_or_accepts(frame: bytes) -> None:
    """What a node sends back is either a valid, expected reply or a typed ProtocolError."""

    request = TrainRequest(run_id="run-1", round=1, plan=PLAN.to_dict(), weights=WEIGHTS)
    try:
        reply = Peer(CannedTransport(frame), MAX_BYTES).request(request, TrainReply, SEEDS["train"])
        check_arrays(reply.weights, LAYOUT, "update from node fuzzed-node")
    except ProtocolError:
        return
    assert isinstance(reply, TrainReply) and reply.run_id == "run-1" and reply.round == 1
    assert all(np.isfinite(v).all() for v in reply.weights.values())


def _mutate(seed: bytes, how: tuple[int, int, int, bytes]) -> bytes:
    kind, at, value, extra = how
    at %= len(seed) + 1
    if kind == 0:  # flip one byte
        return seed[:at] + bytes([value]) + seed[at + 1 :]
    if kind == 1:  # truncate
        return seed[:at]
    if kind == 2:  # insert bytes
        return seed[:at] + extra + seed[at:]
    return seed[:at] + seed[at + 1 + value % 16 :]  # delete a run


MUTATIONS = st.tuples(st.sampled_from(sorted(SEEDS)), st.tuples(st.integers(0, 3), st.integers(0, 2**24), st.integers(0, 255), st.binary(min_size=1, max_size=16)))
# Structurally valid frames with wrong field types, missing or extra fields, unknown kinds and versions.
# Flat on purpose: deeply nested values cost hypothesis far more time to draw than the code under test to refuse.
JSONISH = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=6), st.lists(st.integers(-9, 9), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
FIELDS = st.dictionaries(st.sampled_from(["run_id", "round", "plan", "weights", "splits", "overlays", "metrics", "node", "code", "x"]), JSONISH, max_size=6)
KINDS = st.sampled_from(["train", "evaluate", "describe", "heads", "calibrate", "train_reply", "evaluate_reply", "error", "shutdown", ""])


@st.composite
def bad_tensors(draw: st.DrawFn) -> bytes:
    """Train requests and replies whose tensors have NaN/Inf, wrong shapes, wrong dtypes, or wrong names."""
    weights = {k: v.copy() for k, v in WEIGHTS.items()}
    names = sorted(weights)
    name = draw(st.sampled_from(names))
    fault = draw(st.integers(0, 4))
    if fault == 0:
        weights[name].flat[draw(st.integers(0, weights[name].size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif fault == 1:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        weights[name] = np.zeros(shape if shape != weights[name].shape else (*shape, 2), np.float32)
    elif fault == 2:
        weights[name] = weights[name].astype(draw(st.sampled_from([np.float16, np.int32, np.uint8])))
    elif fault == 3:
        del weights[name]
    else:
        weights[draw(st.text(min_size=1, max_size=8))] = np.zeros(3, np.float32)
    fields = {"run_id": "run-1", "round": 1}
    if draw(st.booleans()):
        kind, fields = "train", {**fields, "plan": PLAN.to_dict()}
    else:
        kind, fields = "train_reply", {**fields, "n_samples": 8, "mean_loss": 0.5, "seconds": 1.0, "accepted": 0, "candidates": 0}
    return encode_frame(kind, 1, fields, {f"weights/{k}": v for k, v in weights.items()})


@FUZZ
@given(st.one_of(st.binary(max_size=256), st.binary(max_size=256).map(lambda b: MAGIC + b),
                 st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=64)).map(lambda t: MAGIC + struct.pack(">I", t[0]) + t[1])))
def test_random_bytes(node: NodeRuntime, frame: bytes) -> None:
    _coordinator_refuses_or_accepts(frame)
    _node_refuses_or_serves(node, frame)


@FUZZ
@given(MUTATIONS)
def test_mutated_valid_frames(node: NodeRuntime, case: tuple[str, tuple[int, int, int, bytes]]) -> None:
    frame = _mutate(SEEDS[case[0]], case[1])
    _coordinator_refuses_or_accepts(frame)
    _node_refuses_or_serves(node, frame)


@FUZZ
@given(KINDS, st.integers(-1, 3), FIELDS)
def test_wrong_kinds_versions_and_field_types(node: NodeRuntime, kind: str, version: int, fields: dict) -> None:
    try:
        frame = encode_frame(kind, version, fields, {})
    except MessageError:
        return  # the encoder itself refuses (e.g. an empty kind)
    _coordinator_refuses_or_accepts(frame)
    _node_refuses_or_serves(node, frame)


@FUZZ
@given(bad_tensors())
def test_nan_inf_wrong_shapes_dtypes_and_names(node: NodeRuntime, frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        reply = decode(frame, MAX_BYTES)
        if isinstance(reply, (TrainReply, TrainRequest)):
            check_arrays(reply.weights, LAYOUT, "fuzzed weights")
    _coordinator_refuses_or_accepts(frame)
    reply = decode(handle(node, frame))
    assert isinstance(reply, ErrorReply) and reply.code in {ErrorCode.BAD_WEIGHTS.value, ErrorCode.BAD_MESSAGE.value, ErrorCode.NOT_EXPOSED.value}, reply


@FUZZ
@given(st.integers(MAX_BYTES + 1, 2**32 - 1), st.sampled_from(sorted(SEEDS)))
def test_oversized_frames_are_refused_before_parsing(node: NodeRuntime, declared: int, kind: str) -> None:
    # A header length beyond the limit, and a real frame padded past the limit.
    frames = [MAGIC + struct.pack(">I", declared) + b"{}", SEEDS[kind] + b"\0" * (MAX_BYTES + 1 - len(SEEDS[kind]) + declared % 7)]
    for frame in frames:
        with pytest.raises(MessageError):
            decode(frame, MAX_BYTES)
        _coordinator_refuses_or_accepts(frame)
        reply = decode(handle(node, frame))
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.BAD_MESSAGE.value


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["train", "evaluate"]), st.sampled_from(sorted(WEIGHTS)), st.sampled_from([1e30, -1e30, 3e38]))
def test_valid_requests_with_absurd_weights_are_refused_whole(node: NodeRuntime, kind: str, name: str, value: float) -> None:
    # Finite but absurd weights decode fine; what they produce (Inf or NaN) must be neither kept nor sent.
    weights = {k: v.copy() for k, v in WEIGHTS.items()}
    weights[name][...] = value
    request = (TrainRequest(run_id="absurd", round=1, plan=PLAN.to_dict(), weights=weights) if kind == "train" else
               EvaluateRequest(run_id="absurd", round=1, plan=PLAN.to_dict(), splits=["val"], overlays=0, weights=weights))
    before = _workdir_state(node)
    reply = decode(handle(node, encode(request)))
    if isinstance(reply, ErrorReply):
        assert reply.code == ErrorCode.BAD_WEIGHTS.value and ("non-finite" in reply.message or "NaN or Inf" in reply.message), reply
        assert _workdir_state(node) == before
    else:
        weights_out = getattr(reply, "weights", {})
        assert all(np.isfinite(v).all() for v in weights_out.values())


def test_node_still_serves_after_the_fuzzing(node: NodeRuntime) -> None:
    reply = decode(handle(node, SEEDS["describe"]))
    assert isinstance(reply, DescribeReply) and reply.node == node.name and reply.n_train > 0
