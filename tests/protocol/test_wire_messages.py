"""Tests for fedseg.protocol.wire and fedseg.protocol.messages.

Every message type round-trips through its one canonical encoding, and every kind of
malformed frame is refused with a MessageError that names what is wrong.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import fields, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedseg.protocol.errors import MessageError
from fedseg.protocol.messages import (
    AdaptReply,
    AdaptRequest,
    CalibrateRequest,
    DescribeReply,
    DescribeRequest,
    ErrorCode,
    ErrorReply,
    EvaluateReply,
    EvaluateRequest,
    HeadsReply,
    HeadsRequest,
    Message,
    MessageKind,
    SecAggKeysReply,
    SecAggKeysRequest,
    SecAggMaskReply,
    SecAggMaskRequest,
    SecAggTrainReply,
    SecAggTrainRequest,
    SecAggUnmaskReply,
    SecAggUnmaskRequest,
    PersonalReply,
    PersonalRequest,
    TrainReply,
    TrainRequest,
    check_arrays,
    decode,
    encode,
    pack_experts,
    unpack_experts,
)
from fedseg.protocol.plan import Plan
from fedseg.protocol.wire import MAGIC, MAX_HEADER_BYTES, decode_frame, encode_frame

PLAN = Plan.from_dict(
    {
        "rounds": 2,
        "image_size": 32,
        "model": {"width": 4, "depth": 2, "groups": 2},
        "train": {"batch_size": 4, "local_epochs": 1.0, "augment": False},
    }
).to_dict()


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "enc.0.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "enc.0.bias": rng.standard_normal(4).astype(np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),  # zero elements
    }


METRICS = {
    "val": {"dice": 0.5, "iou": 0.25, "assd": 2.0, "hd95": 4.0, "loss": 1.125, "n": 2},
    "test": {"dice": 0.75, "iou": 0.6, "assd": 1.5, "hd95": 3.0, "loss": 0.875, "n": 3},
}

#: A round-key advertisement as it travels (values are opaque here; round_keys.py checks them).
KEYS = {"node": "site-a", "run_id": "run-1", "round": 1, "identity": "aWQ=", "c_pk": "Yw==", "s_pk": "cw==", "sig": "c2ln"}

#: One instance of every message type declared in messages.py.
MESSAGES: dict[str, Message] = {
    "describe": DescribeRequest(run_id="run-1"),
    "describe_reply": DescribeReply(
        node="site-a",
        label_kind="pixel",
        channels=3,
        image_size=32,
        n_train=8,
        n_val=2,
        n_test=2,
        can_score=True,
        fingerprint="sha256:" + "ab" * 32,
    ),
    "train": TrainRequest(run_id="run-1", round=1, plan=PLAN, weights=_weights()),
    "train_reply": TrainReply(run_id="run-1", round=1, n_samples=8, mean_loss=0.4375, seconds=1.5, accepted=0, candidates=0, weights=_weights()),
    "evaluate": EvaluateRequest(
        run_id="run-1", round=0, plan=PLAN, splits=["val", "test"], overlays=2, weights=_weights()
    ),
    "evaluate_reply": EvaluateReply(run_id="run-1", round=1, metrics=METRICS),
    "heads": HeadsRequest(run_id="run-1", round=3, plan=PLAN),
    "heads_reply": HeadsReply(
        run_id="run-1", round=3, weights={"head.weight": np.ones((1, 4, 1, 1), np.float32), "head.bias": np.zeros(1, np.float32)}
    ),
    "calibrate": CalibrateRequest(
        run_id="run-1", round=3, plan=PLAN, splits=["val", "test"], weights=_weights(),
        heads={"site-b/head.weight": np.ones((1, 4, 1, 1), np.float32), "site-b/head.bias": np.zeros(1, np.float32)},
    ),
    "personal": PersonalRequest(run_id="run-1"),
    "personal_reply": PersonalReply(run_id="run-1", node="site-a", weights=_weights()),
    "adapt": AdaptRequest(run_id="run-1", plan=PLAN, adapt={"epochs": 2.0}, experts=["site-a", "global"],
                          weights=pack_experts([("site-a", _weights()), ("global", _weights())])[1]),
    "adapt_reply": AdaptReply(run_id="run-1", experts=2, n_images=12, steps=6, seconds=3.5, mean_loss=2.25,
                              metrics={"global": METRICS["val"], "routed": METRICS["test"], "expert:site-a": METRICS["val"]},
                              adapted=False, agreement={"adapted": 0.5, "before": 0.75}),
    "error": ErrorReply(code=ErrorCode.NOT_EXPOSED.value, message="action 'shutdown' is not exposed"),
    "secagg_keys": SecAggKeysRequest(run_id="run-1", round=1),
    "secagg_keys_reply": SecAggKeysReply(run_id="run-1", round=1, keys=KEYS),
    "secagg_train": SecAggTrainRequest(run_id="run-1", round=1, plan=PLAN, weights=_weights(), roster={"site-a": KEYS, "site-b": KEYS}, threshold=2),
    "secagg_train_reply": SecAggTrainReply(run_id="run-1", round=1, n_samples=8, mean_loss=0.4375, seconds=1.5, accepted=0, candidates=0,
                                           commitment="ab" * 32, shares={"site-b": "c2VhbGVk"}),
    "secagg_mask": SecAggMaskRequest(run_id="run-1", round=1, survivors=["site-a", "site-b"], weight=0.25, shares={"site-b": "c2VhbGVk"}),
    "secagg_mask_reply": SecAggMaskReply(run_id="run-1", round=1, clipped=3, masked={k: v.view(np.uint32) for k, v in _weights().items()}),
    "secagg_unmask": SecAggUnmaskRequest(run_id="run-1", round=1, survivors=["site-a"], dropped=["site-b"], next_round=2),
    "secagg_unmask_reply": SecAggUnmaskReply(run_id="run-1", round=1, shares={"site-a": "c2hhcmU=", "site-b": "c2hhcmU="}, next_keys=KEYS),
}


def _assert_same_message(a: Message, b: Message) -> None:
    """Field-by-field equality; tensor fields compare names, dtype, shape and values."""
    assert type(a) is type(b)
    for f in fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, dict) and va and all(isinstance(v, np.ndarray) for v in va.values()):
            assert set(va) == set(vb), f.name
            for name in va:
                assert vb[name].dtype == va[name].dtype, (f.name, name)
                assert vb[name].shape == va[name].shape, (f.name, name)
                assert np.array_equal(vb[name], va[name]), (f.name, name)
        else:
            assert va == vb, f.name
            assert type(va) is type(vb), f.name


def _raw(header: Any, body: bytes = b"", *, allow_nan: bool = False) -> bytes:
    """A frame with an arbitrary JSON header, built by hand."""
    h = header if isinstance(header, bytes) else json.dumps(header, sort_keys=True, allow_nan=allow_nan).encode()
    return MAGIC + struct.pack(">I", len(h)) + h + body


def _header(data: bytes) -> dict[str, Any]:
    (hlen,) = struct.unpack_from(">I", data, len(MAGIC))
    return json.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + hlen])


# --- round trips and canonical form -------------------------------------------------


def test_messages_cover_every_kind() -> None:
    assert {m.KIND for m in MESSAGES.values()} == set(MessageKind)


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_round_trip(kind: str) -> None:
    message = MESSAGES[kind]
    data = encode(message)
    back = decode(data)
    _assert_same_message(message, back)
    assert encode(back) == data  # decoding then encoding changes nothing


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_encoding_is_deterministic_and_header_is_canonical_json(kind: str) -> None:
    data = encode(MESSAGES[kind])
    assert data == encode(MESSAGES[kind])
    (hlen,) = struct.unpack_from(">I", data, 4)
    raw = data[8 : 8 + hlen]
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    assert _header(data)["kind"] == kind


def test_dict_order_does_not_change_bytes() -> None:
    message = MESSAGES["train"]
    shuffled = replace(
        message,
        plan={k: message.plan[k] for k in reversed(list(message.plan))},
        weights={k: message.weights[k] for k in reversed(list(message.weights))},
    )
    assert list(shuffled.weights) != list(message.weights)
    assert encode(shuffled) == encode(message)

    metrics = replace(MESSAGES["evaluate_reply"], metrics={s: dict(reversed(v.items())) for s, v in reversed(METRICS.items())})
    assert encode(metrics) == encode(MESSAGES["evaluate_reply"])


def test_byte_order_and_memory_layout_do_not_change_bytes() -> None:
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    little = encode(TrainReply(run_id="r", round=1, n_samples=1, mean_loss=0.0, seconds=0.0, accepted=0, candidates=0, weights={"w": w}))
    big = encode(TrainReply(run_id="r", round=1, n_samples=1, mean_loss=0.0, seconds=0.0, accepted=0, candidates=0, weights={"w": w.astype(">f4")}))
    strided = np.asfortranarray(w)
    assert not strided.flags.c_contiguous
    fortran = encode(TrainReply(run_id="r", round=1, n_samples=1, mean_loss=0.0, seconds=0.0, accepted=0, candidates=0, weights={"w": strided}))
    assert little == big == fortran
    assert np.array_equal(decode(big).weights["w"], w)


def test_rank_0_tensor_keeps_its_shape() -> None:
    # e.g. BatchNorm's num_batches_tracked is a 0-d int64 tensor in a state dict.
    weights = {"bn.num_batches_tracked": np.array(7, dtype=np.int64), "bn.weight": np.ones(2, np.float32)}
    back = decode(encode(TrainReply(run_id="r", round=1, n_samples=1, mean_loss=0.0, seconds=0.0, accepted=0, candidates=0, weights=weights)))
    assert back.weights["bn.num_batches_tracked"].shape == ()
    assert _header(encode_frame("x", 1, {}, {"t": np.array(1.0, np.float32)}))["tensors"] == [["t", "float32", []]]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int32", "uint32", "uint8"])
def test_every_wire_dtype_round_trips(dtype: str) -> None:
    arr = (np.arange(12) % 7).astype(dtype).reshape(3, 4)
    frame = decode_frame(encode_frame("x", 1, {}, {"t": arr}))
    assert frame.tensors["t"].dtype == np.dtype(dtype)
    assert np.array_equal(frame.tensors["t"], arr)


def test_int_is_accepted_where_float_is_declared() -> None:
    data = encode_frame("train_reply", 1, {"run_id": "r", "round": 1, "n_samples": 3, "mean_loss": 1, "seconds": 0, "accepted": 0, "candidates": 0, "scores": {}}, {})
    reply = decode(data)
    assert isinstance(reply, TrainReply) and reply.mean_loss == 1 and reply.weights == {}


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode(MESSAGES["describe"])
    assert decode(bytearray(data)) == MESSAGES["describe"]
    assert decode(memoryview(data)) == MESSAGES["describe"]


# --- frame-level rejections -------------------------------------------------------


def _valid_train_frame() -> bytes:
    return encode(MESSAGES["train"])


@pytest.mark.parametrize(
    "cut, pattern",
    [
        (0, "magic"),
        (3, "magic"),
        (6, "magic"),  # magic present but the length field is cut
        (12, "header length .* out of bounds"),
        (-1, "tensor .* truncated"),
    ],
)
def test_truncated_frame(cut: int, pattern: str) -> None:
    data = _valid_train_frame()
    with pytest.raises(MessageError, match=pattern):
        decode(data[:cut])


def test_every_truncation_is_refused() -> None:
    data = encode(MESSAGES["evaluate_reply"])
    for cut in range(len(data)):
        with pytest.raises(MessageError):
            decode(data[:cut])


def test_wrong_magic() -> None:
    data = _valid_train_frame()
    with pytest.raises(MessageError, match="magic"):
        decode(b"FSG2" + data[4:])


def test_not_bytes() -> None:
    with pytest.raises(MessageError, match="must be bytes, got str"):
        decode("FSG1")  # type: ignore[arg-type]


def test_oversized_frame() -> None:
    data = _valid_train_frame()
    assert isinstance(decode(data, max_bytes=len(data)), TrainRequest)
    with pytest.raises(MessageError, match=f"frame of {len(data)} bytes exceeds the limit of {len(data) - 1} bytes"):
        decode(data, max_bytes=len(data) - 1)


@pytest.mark.parametrize("hlen", ["past_end", "over_max"])
def test_header_length_out_of_bounds(hlen: str) -> None:
    data = _valid_train_frame()
    value = len(data) if hlen == "past_end" else MAX_HEADER_BYTES + 1
    padded = data + b"\0" * (MAX_HEADER_BYTES + 16 if hlen == "over_max" else 0)
    bad = padded[:4] + struct.pack(">I", value) + padded[8:]
    with pytest.raises(MessageError, match=f"header length {value} is out of bounds"):
        decode(bad)


@pytest.mark.parametrize("header", [b"{not json", b"\xff\xfe\x00garbage", b""])
def test_invalid_json_header(header: bytes) -> None:
    with pytest.raises(MessageError, match="header is not valid JSON"):
        decode(_raw(header))


@pytest.mark.parametrize(
    "header",
    [
        [1, 2, 3],
        {"kind": "describe", "schema_version": 1, "fields": {"run_id": "r"}},
        {"kind": "describe", "schema_version": 1, "fields": {"run_id": "r"}, "tensors": [], "extra": 1},
    ],
)
def test_header_must_hold_exactly_the_four_keys(header: Any) -> None:
    with pytest.raises(MessageError, match="exactly kind, schema_version, fields and tensors"):
        decode(_raw(header))


@pytest.mark.parametrize(
    "kind, version, fields_, tensors",
    [
        (1, 1, {}, []),
        ("describe", "1", {"run_id": "r"}, []),
        ("describe", True, {"run_id": "r"}, []),
        ("describe", 1, [], []),
    ],
)
def test_header_value_types(kind: Any, version: Any, fields_: Any, tensors: Any) -> None:
    header = {"kind": kind, "schema_version": version, "fields": fields_, "tensors": tensors}
    with pytest.raises(MessageError, match="kind must be a string, schema_version an integer, fields an object"):
        decode(_raw(header))


def test_tensor_table_must_be_a_list() -> None:
    header = {"kind": "describe", "schema_version": 1, "fields": {"run_id": "r"}, "tensors": {}}
    with pytest.raises(MessageError, match="tensors must be a list"):
        decode(_raw(header))


def test_unknown_kind() -> None:
    with pytest.raises(MessageError, match="unknown message kind 'shutdown'"):
        decode(encode_frame("shutdown", 1, {}, {}))


@pytest.mark.parametrize("version", [0, 2])
def test_wrong_schema_version(version: int) -> None:
    with pytest.raises(MessageError, match=f"describe: schema version {version} is not supported"):
        decode(encode_frame("describe", version, {"run_id": "r"}, {}))


def test_missing_field() -> None:
    with pytest.raises(MessageError, match=r"train: missing fields \['overlays', 'plan', 'round', 'score'\], unexpected fields \[\]"):
        decode(encode_frame("train", 1, {"run_id": "r"}, {}))


def test_extra_field() -> None:
    with pytest.raises(MessageError, match=r"describe: missing fields \[\], unexpected fields \['admin'\]"):
        decode(encode_frame("describe", 1, {"run_id": "r", "admin": True}, {}))


@pytest.mark.parametrize(
    "kind, fields_, pattern",
    [
        ("train", {"run_id": "r", "round": "1", "plan": PLAN, "score": [], "overlays": 0}, "train: field round must be int, got str"),
        ("train", {"run_id": "r", "round": True, "plan": PLAN, "score": [], "overlays": 0}, "train: field round must be int, got bool"),
        ("train", {"run_id": "r", "round": 1.0, "plan": PLAN, "score": [], "overlays": 0}, "train: field round must be int, got float"),
        ("train", {"run_id": 7, "round": 1, "plan": PLAN, "score": [], "overlays": 0}, "train: field run_id must be str, got int"),
        ("train", {"run_id": "r", "round": 1, "plan": [PLAN], "score": [], "overlays": 0}, "train: field plan must be dict, got list"),
        (
            "train_reply",
            {"run_id": "r", "round": 1, "n_samples": 3, "mean_loss": True, "seconds": 0.0, "accepted": 0, "candidates": 0, "scores": {}},
            "train_reply: field mean_loss must be float, got bool",
        ),
        (
            "train_reply",
            {"run_id": "r", "round": 1, "n_samples": 3, "mean_loss": "0.5", "seconds": 0.0, "accepted": 0, "candidates": 0, "scores": {}},
            "train_reply: field mean_loss must be float, got str",
        ),
        (
            "evaluate",
            {"run_id": "r", "round": 1, "plan": PLAN, "splits": "val", "overlays": 0},
            "evaluate: field splits must be list, got str",
        ),
        (
            "describe_reply",
            {
                "node": "a",
                "label_kind": "pixel",
                "channels": 3,
                "image_size": 32,
                "n_train": None,
                "n_val": 1,
                "n_test": 1,
                "can_score": True,
                "fingerprint": "f",
                "device": "cpu",
                "split_hashes": {},
            },
            "describe_reply: field n_train must be int, got NoneType",
        ),
    ],
)
def test_wrong_field_type(kind: str, fields_: dict[str, Any], pattern: str) -> None:
    with pytest.raises(MessageError, match=pattern):
        decode(encode_frame(kind, 1, fields_, {}))


@pytest.mark.parametrize(
    "kind, fields_, tensor",
    [
        ("train", {"run_id": "r", "round": 1, "plan": PLAN, "score": [], "overlays": 0}, "bias/x"),
        ("train", {"run_id": "r", "round": 1, "plan": PLAN, "score": [], "overlays": 0}, "weights/"),
        ("train", {"run_id": "r", "round": 1, "plan": PLAN, "score": [], "overlays": 0}, "weights"),
        ("describe", {"run_id": "r"}, "weights/x"),
        ("error", {"code": "internal", "message": "m"}, "weights/x"),
    ],
)
def test_tensor_not_in_a_declared_field(kind: str, fields_: dict[str, Any], tensor: str) -> None:
    data = encode_frame(kind, 1, fields_, {tensor: np.zeros(2, np.float32)})
    with pytest.raises(MessageError, match=f"{kind}: tensor '{tensor}' does not belong to a declared tensor field"):
        decode(data)


def test_trailing_bytes() -> None:
    with pytest.raises(MessageError, match="frame has 3 trailing bytes after the last tensor"):
        decode(_valid_train_frame() + b"abc")


def test_duplicate_tensor() -> None:
    header = {
        "kind": "train",
        "schema_version": 1,
        "fields": {"run_id": "r", "round": 1, "plan": PLAN, "score": [], "overlays": 0},
        "tensors": [["weights/a", "float32", [1]], ["weights/a", "float32", [1]]],
    }
    with pytest.raises(MessageError, match="tensor 'weights/a' appears twice"):
        decode(_raw(header, np.zeros(2, np.float32).tobytes()))


@pytest.mark.parametrize("dtype", ["float64", "object", "<f4", "bool", 5])
def test_unsupported_dtype_in_frame(dtype: Any) -> None:
    header = {
        "kind": "train",
        "schema_version": 1,
        "fields": {"run_id": "r", "round": 1, "plan": PLAN, "score": [], "overlays": 0},
        "tensors": [["weights/a", dtype, [2]]],
    }
    with pytest.raises(MessageError, match=f"tensor 'weights/a': dtype {dtype!r} is not allowed"):
        decode(_raw(header, b"\0" * 16))


@pytest.mark.parametrize("dtype", [np.float64, np.bool_, np.complex64])
def test_unsupported_dtype_is_refused_on_encode(dtype: type) -> None:
    with pytest.raises(MessageError, match=f"tensor 'weights/a': dtype {np.dtype(dtype).name} is not allowed on the wire"):
        encode(TrainRequest(run_id="r", round=1, plan=PLAN, weights={"a": np.zeros(2, dtype)}))


@pytest.mark.parametrize("shape", [[-1], [2, -3], [2.0], [True], "2", None, [1] * 9, [[2]]])
def test_bad_shape(shape: Any) -> None:
    header = {
        "kind": "train",
        "schema_version": 1,
        "fields": {"run_id": "r", "round": 1, "plan": PLAN, "score": [], "overlays": 0},
        "tensors": [["weights/a", "float32", shape]],
    }
    with pytest.raises(MessageError, match=r"tensor 'weights/a': shape .* is not a list of non-negative integers"):
        decode(_raw(header, b"\0" * 8))


@pytest.mark.parametrize("entry", [["weights/a", "float32"], [1, "float32", [1]], "weights/a", {"name": "weights/a"}])
def test_malformed_tensor_descriptor(entry: Any) -> None:
    header = {"kind": "train", "schema_version": 1, "fields": {"run_id": "r", "round": 1, "plan": PLAN, "score": [], "overlays": 0}, "tensors": [entry]}
    with pytest.raises(MessageError, match=r"must be \[name, dtype, shape\]"):
        decode(_raw(header, b"\0" * 4))


def test_huge_declared_shape_is_refused_without_allocating() -> None:
    header = {
        "kind": "train",
        "schema_version": 1,
        "fields": {"run_id": "r", "round": 1, "plan": PLAN, "score": [], "overlays": 0},
        "tensors": [["weights/a", "float32", [2**40, 2**40]]],
    }
    with pytest.raises(MessageError, match="tensor 'weights/a': needs .* bytes but the frame is truncated"):
        decode(_raw(header, b"\0" * 16))


# --- message-level validation -----------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["train", "train_reply", "evaluate"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_non_finite_weights_are_refused(bad: float, kind: str, dtype: type) -> None:
    message = MESSAGES[kind]
    w = np.ones(5, dtype=dtype)
    w[3] = bad
    weights = {**message.weights, "poisoned": w}
    # encode validates, so the sender cannot produce it ...
    with pytest.raises(MessageError, match=f"{kind}: tensor weights/poisoned has NaN or Inf values"):
        encode(replace(message, weights=weights))
    # ... and a hand-built frame is refused by the receiver.
    scalars = {f.name: getattr(message, f.name) for f in fields(message) if f.name != "weights"}
    data = encode_frame(kind, 1, scalars, {f"weights/{k}": v for k, v in weights.items()})
    with pytest.raises(MessageError, match=f"{kind}: tensor weights/poisoned has NaN or Inf values"):
        decode(data)


def test_non_finite_integers_do_not_exist_so_int_tensors_pass() -> None:
    weights = {"count": np.array([0, 2**31 - 1], dtype=np.int64)}
    back = decode(encode(TrainRequest(run_id="r", round=1, plan=PLAN, weights=weights)))
    assert np.array_equal(back.weights["count"], weights["count"])


@pytest.mark.parametrize("field_name", ["mean_loss", "seconds"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_train_reply_scalars(field_name: str, literal: str) -> None:
    scalars = {"run_id": "r", "round": 1, "n_samples": 3, "mean_loss": 0.5, "seconds": 1.0, "accepted": 0, "candidates": 0, "scores": {}}
    header = json.dumps(
        {"kind": "train_reply", "schema_version": 1, "fields": {**scalars, field_name: "@@"}, "tensors": []}, sort_keys=True
    ).replace('"@@"', literal)
    with pytest.raises(MessageError, match=f"train_reply: field {field_name} must be finite"):
        decode(_raw(header.encode()))
    with pytest.raises(MessageError, match=f"train_reply: field {field_name} must be finite"):
        encode(TrainReply(**{**scalars, field_name: float(json.loads(literal))}, weights={}))


def test_encode_frame_refuses_non_finite_scalars() -> None:
    with pytest.raises(MessageError, match="header cannot be encoded"):
        encode_frame("train_reply", 1, {"mean_loss": math.nan}, {})


@pytest.mark.parametrize(
    "metrics, pattern",
    [
        ({"val": {"dice": 0.5, "iou": 0.2, "assd": 4.0, "hd95": 8.0, "loss": 1.0, "n": 2, "per_image": [0.1]}}, r"metrics\['val'\] must hold exactly"),
        ({"val": {"dice": 0.5, "iou": 0.2, "assd": 4.0, "loss": 1.0}}, r"metrics\['val'\] must hold exactly"),
        ({"holdout": {"dice": 0.5, "iou": 0.2, "assd": 4.0, "hd95": 8.0, "loss": 1.0, "n": 2}}, r"metrics\['holdout'\] must hold exactly"),
        ({"val": [0.5, 0.2, 1.0, 2]}, r"metrics\['val'\] must hold exactly"),
        ({"val": {"dice": "0.5", "iou": 0.2, "assd": 4.0, "hd95": 8.0, "loss": 1.0, "n": 2}}, r"metrics\['val'\]\['dice'\] must be a number"),
        ({"val": {"dice": 0.5, "iou": 0.2, "assd": 4.0, "hd95": 8.0, "loss": 1.0, "n": True}}, r"metrics\['val'\]\['n'\] must be a number"),
        ({"val": {"dice": 0.5, "iou": 0.2, "assd": 4.0, "hd95": 8.0, "loss": math.inf, "n": 2}}, r"metrics\['val'\]\['loss'\]\ must be finite"),
    ],
)
def test_evaluate_reply_metrics_are_checked(metrics: dict[str, Any], pattern: str) -> None:
    with pytest.raises(MessageError, match=pattern):
        encode(EvaluateReply(run_id="r", round=1, metrics=metrics))
    header = json.dumps(
        {"kind": "evaluate_reply", "schema_version": 1, "fields": {"run_id": "r", "round": 1, "metrics": metrics}, "tensors": []},
        sort_keys=True,
        allow_nan=True,
    )
    with pytest.raises(MessageError, match=pattern):
        decode(_raw(header.encode()))


@pytest.mark.parametrize(
    "message, pattern",
    [
        (replace(MESSAGES["train"], round=0), "train: field round must be >= 1, got 0"),
        (replace(MESSAGES["train_reply"], n_samples=-1), "train_reply: field n_samples must be >= 0, got -1"),
        (replace(MESSAGES["evaluate"], round=-1), "evaluate: field round must be >= 0, got -1"),
        (replace(MESSAGES["evaluate"], splits=[]), "evaluate: field splits must be distinct names"),
        (replace(MESSAGES["evaluate"], splits=["val", "val"]), "evaluate: field splits must be distinct names"),
        (replace(MESSAGES["evaluate"], splits=["val", "holdout"]), "evaluate: field splits must be distinct names"),
        (replace(MESSAGES["evaluate"], splits=[["val"]]), "evaluate: field splits must be distinct names"),
        (replace(MESSAGES["evaluate"], overlays=65), r"evaluate: field overlays must be in \[0, 64\], got 65"),
        (replace(MESSAGES["evaluate"], overlays=-1), r"evaluate: field overlays must be in \[0, 64\], got -1"),
        (replace(MESSAGES["describe_reply"], n_test=-2), "describe_reply: field n_test must be >= 0"),
        (replace(MESSAGES["describe_reply"], channels=-1), "describe_reply: field channels must be >= 0"),
        (replace(MESSAGES["error"], code="oops"), "error: unknown error code 'oops'"),
        (replace(MESSAGES["adapt"], experts=[]), "adapt: field experts must be distinct non-empty names"),
        (replace(MESSAGES["adapt"], experts=["a", "a"]), "adapt: field experts must be distinct non-empty names"),
        (replace(MESSAGES["adapt"], experts=["a", "b", "global"]), r"adapt: experts \['global'\] have no tensors"),
        (replace(MESSAGES["adapt"], weights={"2/w": np.zeros(2, np.float32)}), "adapt: tensor weights/2/w is not 'i/name'"),
        (replace(MESSAGES["adapt"], weights={"w": np.zeros(2, np.float32)}), "adapt: tensor weights/w is not 'i/name'"),
        (replace(MESSAGES["adapt_reply"], steps=-1), "adapt_reply: field steps must be >= 0"),
        (replace(MESSAGES["adapt_reply"], metrics={"local": METRICS["val"]}), r"adapt_reply: metrics\['local'\] is not one of"),
        (replace(MESSAGES["adapt_reply"], metrics={"routed": {"dice": 1.0}}), r"adapt_reply: metrics\['routed'\] must hold exactly"),
    ],
)
def test_validate_names_the_field_on_both_sides(message: Message, pattern: str) -> None:
    with pytest.raises(MessageError, match=pattern):
        encode(message)
    scalars = {f.name: getattr(message, f.name) for f in fields(message) if f.name != "weights"}
    tensors = {f"weights/{k}": v for k, v in getattr(message, "weights", {}).items()}
    with pytest.raises(MessageError, match=pattern):
        decode(encode_frame(message.KIND.value, 1, scalars, tensors))


def test_boundary_values_are_accepted() -> None:
    for message in (
        replace(MESSAGES["train"], round=1),
        replace(MESSAGES["train_reply"], n_samples=0),
        replace(MESSAGES["evaluate"], round=0, overlays=0, splits=["train", "val", "test"]),
        replace(MESSAGES["evaluate"], overlays=64, splits=["test"]),
        replace(MESSAGES["evaluate_reply"], metrics={}),
    ):
        _assert_same_message(message, decode(encode(message)))


def test_experts_pack_and_unpack_in_order() -> None:
    experts = [("site-b", _weights()), ("site-a", {"x": np.ones(3, np.float32)}), ("global", _weights())]
    names, weights = pack_experts(experts)
    back = unpack_experts(decode(encode(replace(MESSAGES["adapt"], experts=names, weights=weights))))
    assert [n for n, _ in back] == ["site-b", "site-a", "global"]
    for (_, a), (_, b) in zip(experts, back):
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("code", [c.value for c in ErrorCode])
def test_every_error_code_round_trips(code: str) -> None:
    assert decode(encode(ErrorReply(code=code, message="m"))) == ErrorReply(code=code, message="m")


# --- check_arrays -----------------------------------------------------------------

EXPECTED = {"a": (2, 3), "b": (4,), "c": ()}


def _arrays() -> dict[str, np.ndarray]:
    return {k: np.zeros(s, np.float32) for k, s in EXPECTED.items()}


def test_check_arrays_accepts_exact_layout() -> None:
    check_arrays(_arrays(), EXPECTED, "update from node a")


def test_check_arrays_names_missing_tensor() -> None:
    arrays = _arrays()
    del arrays["b"]
    with pytest.raises(MessageError, match=r"update from node a: missing tensors \['b'\], unexpected tensors \[\]"):
        check_arrays(arrays, EXPECTED, "update from node a")


def test_check_arrays_names_extra_tensor() -> None:
    arrays = {**_arrays(), "backdoor": np.zeros(1, np.float32)}
    with pytest.raises(MessageError, match=r"update from node a: missing tensors \[\], unexpected tensors \['backdoor'\]"):
        check_arrays(arrays, EXPECTED, "update from node a")


def test_check_arrays_names_misshaped_tensor() -> None:
    arrays = {**_arrays(), "a": np.zeros((3, 2), np.float32)}
    with pytest.raises(MessageError, match=r"update from node a: tensor a has shape \(3, 2\), expected \(2, 3\)"):
        check_arrays(arrays, EXPECTED, "update from node a")


def test_check_arrays_names_wrong_dtype() -> None:
    arrays = {**_arrays(), "b": np.zeros(4, np.float16)}
    with pytest.raises(MessageError, match="update from node a: tensor b has dtype float16, expected float32"):
        check_arrays(arrays, EXPECTED, "update from node a")


# --- fuzzing: malformed input only ever raises MessageError -----------------------

_FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
_TRAIN_FRAME = encode(
    TrainRequest(
        run_id="run-1",
        round=3,
        plan=PLAN,
        weights={"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)},
    )
)


def _decode_or_message_error(data: bytes) -> None:
    try:
        message = decode(data)
    except MessageError:
        return
    # Whatever decodes is a fully valid message: it re-encodes (encode validates).
    assert isinstance(message, Message)
    encode(message)


@_FUZZ_SETTINGS
@given(
    st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=200).map(lambda b: MAGIC + b),
        st.tuples(st.integers(0, 300), st.binary(max_size=300)).map(lambda t: MAGIC + struct.pack(">I", t[0]) + t[1]),
    )
)
def test_random_bytes_only_raise_message_error(data: bytes) -> None:
    _decode_or_message_error(data)


@_FUZZ_SETTINGS
@given(
    st.one_of(
        st.tuples(st.integers(0, len(_TRAIN_FRAME) - 1), st.integers(0, 255)).map(
            lambda t: _TRAIN_FRAME[: t[0]] + bytes([t[1]]) + _TRAIN_FRAME[t[0] + 1 :]
        ),
        st.integers(0, len(_TRAIN_FRAME)).map(lambda n: _TRAIN_FRAME[:n]),
        st.tuples(st.integers(0, len(_TRAIN_FRAME)), st.binary(min_size=1, max_size=8)).map(
            lambda t: _TRAIN_FRAME[: t[0]] + t[1] + _TRAIN_FRAME[t[0] :]
        ),
    )
)
def test_mutated_train_request_only_raises_message_error(data: bytes) -> None:
    _decode_or_message_error(data)
