"""Tests of the privacy audit (fedseg.protocol.audit): chain, tampering, cross-check, policy, report."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedseg.protocol.audit.cross_check import cross_check
from fedseg.protocol.audit.entry import AUDIT_LABEL, GENESIS, AuditError
from fedseg.protocol.audit.log import AuditLog
from fedseg.protocol.audit.policy import check_policy
from fedseg.protocol.audit.report import summarize, write_report
from fedseg.protocol.audit.schema import frame_schema
from fedseg.protocol.audit.verify import read_log, verify_log
from fedseg.protocol.errors import ProtocolError
from fedseg.protocol.messages import (
    DescribeReply,
    DescribeRequest,
    ErrorCode,
    ErrorReply,
    EvaluateReply,
    TrainReply,
    TrainRequest,
    encode,
)
from fedseg.protocol.wire import encode_frame

DECLARED = {"enc.0.weight": (4, 1, 3, 3), "enc.0.bias": (4,), "head.weight": (1, 4, 1, 1)}
METRICS = {"val": {"dice": 0.5, "iou": 0.4, "assd": 3.5, "hd95": 7.0, "loss": 0.3, "n": 10}}


def weights(shapes: dict[str, tuple[int, ...]] = DECLARED, value: float = 0.25) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, np.float32) for name, shape in shapes.items()}


def train_request(round_: int = 1) -> bytes:
    return encode(TrainRequest(run_id="run-1", round=round_, plan={"lr": 0.01}, weights=weights()))


def train_reply(round_: int = 1, arrays: dict[str, np.ndarray] | None = None) -> bytes:
    return encode(TrainReply(run_id="run-1", round=round_, n_samples=8, mean_loss=0.5, seconds=1.0, accepted=0,
                             candidates=0, weights=weights() if arrays is None else arrays))


def error_reply() -> bytes:
    return encode(ErrorReply(code=ErrorCode.NOT_EXPOSED.value, message="action 'export' is not exposed"))


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def exchange(coord: AuditLog, node: AuditLog, name: str, rounds: int = 2) -> None:
    """Records a describe and ``rounds`` train rounds on both ends, as the protocol would."""
    for frame, sender, receiver in [
        (encode(DescribeRequest(run_id="run-1")), coord, node),
        (encode(DescribeReply(node=name, label_kind="pixel", channels=3, image_size=32, n_train=8, n_val=2, n_test=2,
                              can_score=True, fingerprint="sha256:00")), node, coord),
        *[x for r in range(1, rounds + 1) for x in ((train_request(r), coord, node), (train_reply(r), node, coord))],
    ]:
        sender.record(direction="sent", peer=receiver.writer, frame=frame)
        receiver.record(direction="received", peer=sender.writer, frame=frame)


@pytest.fixture
def clean_log(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    """Ten entries written from two threads at once."""
    path = tmp_path / "nodes" / "kvasir" / "audit.jsonl"
    frames = [train_request(1), train_reply(1), error_reply(), b"garbage", train_reply(2)]
    with AuditLog(path, key, "kvasir") as log:
        barrier = threading.Barrier(2)

        def work(direction: str) -> None:
            barrier.wait()
            for frame in frames:
                log.record(direction=direction, peer="coordinator", frame=frame)

        threads = [threading.Thread(target=work, args=(d,)) for d in ("sent", "received")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def expect_error(path: Path, key: Ed25519PrivateKey, index: int, reason: str) -> AuditError:
    with pytest.raises(AuditError, match=reason or None) as info:
        verify_log(path, key.public_key())
    assert info.value.index == index and info.value.line == index + 1
    assert f"entry {index} (line {index + 1}) in {path}" in str(info.value)
    return info.value


# --- writing, verifying, resuming -------------------------------------------------------


def test_clean_log_from_two_threads_verifies(clean_log: Path, key: Ed25519PrivateKey) -> None:
    entries = verify_log(clean_log, key.public_key())
    assert [e["seq"] for e in entries] == list(range(10))
    assert entries[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(entries, entries[1:]))
    assert sorted(e["direction"] for e in entries) == ["received"] * 5 + ["sent"] * 5
    assert read_log(clean_log) == entries
    reply = next(e for e in entries if e["action"] == "train_reply")
    assert reply["run"] == "run-1" and reply["round"] in (1, 2)  # taken from the frame's fields
    assert reply["sha256"] == hashlib.sha256(train_reply(reply["round"])).hexdigest()
    assert reply["bytes"] == len(train_reply(reply["round"]))
    assert reply["writer"] == "kvasir" and reply["peer"] == "coordinator"
    garbage = next(e for e in entries if e["bytes"] == len(b"garbage"))
    assert garbage["action"] is None and "magic" in garbage["schema"]["error"]
    assert (clean_log.stat().st_mode & 0o777) == 0o600


def test_entry_signs_canonical_body(clean_log: Path, key: Ed25519PrivateKey) -> None:
    entry = read_log(clean_log)[3]
    body = {k: v for k, v in entry.items() if k not in ("sig", "hash")}
    signed = AUDIT_LABEL + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    key.public_key().verify(bytes.fromhex(entry["sig"]), signed)
    assert entry["hash"] == hashlib.sha256(signed + bytes.fromhex(entry["sig"])).hexdigest()


def test_resume_continues_the_chain(clean_log: Path, key: Ed25519PrivateKey) -> None:
    last = read_log(clean_log)[-1]
    with AuditLog(clean_log, key, "kvasir") as log:
        assert len(log) == 10
        entry = log.record(direction="sent", peer="coordinator", frame=error_reply(), run_id="run-1", round=3, note="refused")
    assert entry["seq"] == 10 and entry["prev"] == last["hash"]
    assert (entry["run"], entry["round"], entry["note"], entry["action"]) == ("run-1", 3, "refused", "error")
    assert len(verify_log(clean_log, key.public_key())) == 11


def test_reopening_a_corrupt_or_foreign_log_raises(clean_log: Path, key: Ed25519PrivateKey) -> None:
    good = clean_log.read_bytes()
    with pytest.raises(AuditError, match="entry 0 .*signature invalid"):  # not this writer's key
        AuditLog(clean_log, Ed25519PrivateKey.generate(), "kvasir")
    clean_log.write_bytes(good[:-5])
    with pytest.raises(AuditError, match="entry 9 .*truncated"):
        AuditLog(clean_log, key, "kvasir")
    assert clean_log.read_bytes() == good[:-5]  # nothing was appended to the corrupt log


def test_one_writer_at_a_time_and_closed_log(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key, "coordinator")
    with pytest.raises(AuditError, match="already open"):
        AuditLog(path, key, "coordinator")
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.record(direction="sent", peer="kvasir", frame=train_request())
    with AuditLog(path, key, "coordinator") as log, pytest.raises(ValueError):
        log.record(direction="sideways", peer="kvasir", frame=b"")
    assert read_log(path) == []
    assert issubclass(AuditError, ProtocolError)


# --- tampering ----------------------------------------------------------------------------


def _position(line: bytes, where: str) -> int:
    """Byte offset in one line: inside a named field's value, or at the start or end."""
    if where == "first":
        return 0
    if where == "newline":
        return len(line) - 1
    if where == "sig-uppercase":  # same signature bytes, different text
        start = line.index(b'"sig":"') + 7
        return next(i for i in range(start, start + 128) if line[i : i + 1] in b"abcdef")
    offsets = {"sig": b'"sig":"', "hash": b'"hash":"', "prev": b'"prev":"', "schema": b'"tensors":[["', "time": b'"time":"'}
    return line.index(offsets[where]) + len(offsets[where]) + 3


REASONS = {
    "first": "malformed JSON",
    "newline": "malformed JSON|truncated",  # on the last line, a missing newline is truncation
    "sig": "hash mismatch|signature is not",
    "sig-uppercase": "signature is not 64 bytes of lowercase hex",
    "hash": "hash mismatch|hash is not",
    "prev": "hash chain broken",
    "schema": "hash mismatch",
    "time": "hash mismatch",
}


@pytest.mark.parametrize("index", [0, 4, 9])
@pytest.mark.parametrize("where", ["first", "newline", "sig", "sig-uppercase", "hash", "prev", "schema", "time"])
def test_one_changed_byte_is_caught_at_its_entry(clean_log: Path, key: Ed25519PrivateKey, index: int, where: str) -> None:
    lines = lines_of(clean_log)
    if where == "schema" and b'"tensors":[["' not in lines[index]:
        where = "time"  # this entry's frame has no tensors
    line = bytearray(lines[index])
    pos = _position(bytes(line), where)
    line[pos] = ord(chr(line[pos]).upper()) if where == "sig-uppercase" else (line[pos] ^ 0x01 if line[pos] != ord("\n") else ord("x"))
    lines[index] = bytes(line)
    clean_log.write_bytes(b"".join(lines))
    expect_error(clean_log, key, index, REASONS[where])


@pytest.mark.parametrize("index", [0, 5, 9])
def test_every_byte_of_an_entry_matters(clean_log: Path, key: Ed25519PrivateKey, index: int) -> None:
    original = clean_log.read_bytes()
    start = sum(len(x) for x in lines_of(clean_log)[:index])
    end = start + len(lines_of(clean_log)[index])
    for pos in range(start, end, 7):
        data = bytearray(original)
        data[pos] ^= 0x20 if data[pos] != ord("\n") else 0x2A
        clean_log.write_bytes(bytes(data))
        with pytest.raises(AuditError) as info:
            verify_log(clean_log, key.public_key())
        assert info.value.index == index, (pos - start, str(info.value))


def test_deleted_entry(clean_log: Path, key: Ed25519PrivateKey) -> None:
    lines = lines_of(clean_log)
    clean_log.write_bytes(b"".join(lines[:3] + lines[4:]))
    expect_error(clean_log, key, 3, "sequence number 4, expected 3")


def test_reordered_entries(clean_log: Path, key: Ed25519PrivateKey) -> None:
    lines = lines_of(clean_log)
    lines[5], lines[6] = lines[6], lines[5]
    clean_log.write_bytes(b"".join(lines))
    expect_error(clean_log, key, 5, "sequence number 6, expected 5")


@pytest.mark.parametrize("cut", [1, 40, -2])
def test_truncated_mid_line(clean_log: Path, key: Ed25519PrivateKey, cut: int) -> None:
    lines = lines_of(clean_log)
    clean_log.write_bytes(b"".join(lines[:7]) + lines[7][:cut])
    expect_error(clean_log, key, 7, "truncated")
    with pytest.raises(AuditError, match="entry 7"):
        read_log(clean_log)


def test_missing_fields_and_bad_json(clean_log: Path, key: Ed25519PrivateKey) -> None:
    lines = lines_of(clean_log)
    entry = json.loads(lines[2])
    del entry["peer"]
    clean_log.write_bytes(b"".join(lines[:2] + [json.dumps(entry).encode() + b"\n"] + lines[3:]))
    expect_error(clean_log, key, 2, r"missing fields \['peer'\]")
    clean_log.write_bytes(b"".join(lines[:2] + [b"[1, 2]\n"] + lines[3:]))
    expect_error(clean_log, key, 2, "not a JSON object")


def _forge(entry: dict, prev: str, attacker: Ed25519PrivateKey) -> dict:
    body = {k: v for k, v in entry.items() if k not in ("sig", "hash")} | {"prev": prev}
    signed = AUDIT_LABEL + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    sig = attacker.sign(signed)
    return body | {"sig": sig.hex(), "hash": hashlib.sha256(signed + sig).hexdigest()}


def _line(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def test_forged_append_is_caught(clean_log: Path, key: Ed25519PrivateKey) -> None:
    entries = read_log(clean_log)
    fake = _forge(entries[-1] | {"seq": 10, "note": "nothing to see"}, entries[-1]["hash"], Ed25519PrivateKey.generate())
    clean_log.write_bytes(clean_log.read_bytes() + _line(fake))
    expect_error(clean_log, key, 10, "signature invalid")


def test_forged_rewrite_with_recomputed_chain_is_caught(clean_log: Path, key: Ed25519PrivateKey) -> None:
    entries = read_log(clean_log)
    attacker = Ed25519PrivateKey.generate()
    forged = entries[:4]
    for entry in entries[4:]:
        changed = entry | {"bytes": 1} if entry["seq"] == 4 else entry
        forged.append(_forge(changed, forged[-1]["hash"], attacker))
    clean_log.write_bytes(b"".join(_line(e) for e in forged))
    expect_error(clean_log, key, 4, "signature invalid")
    with pytest.raises(AuditError, match="entry 0 .*signature invalid"):
        verify_log(clean_log, attacker.public_key())


# --- cross-check ---------------------------------------------------------------------------


@pytest.fixture
def both_ends(tmp_path: Path) -> tuple[Path, dict[str, Path], Ed25519PrivateKey, dict[str, Ed25519PrivateKey]]:
    ckey = Ed25519PrivateKey.generate()
    nkeys = {n: Ed25519PrivateKey.generate() for n in ("kvasir", "cvc")}
    cpath = tmp_path / "run" / "audit.jsonl"
    npaths = {n: tmp_path / "nodes" / n / "audit.jsonl" for n in nkeys}
    with AuditLog(cpath, ckey, "coordinator") as coord:
        for name, k in nkeys.items():
            with AuditLog(npaths[name], k, name) as node:
                exchange(coord, node, name)
    return cpath, npaths, ckey, nkeys


def test_cross_check_clean(both_ends) -> None:
    cpath, npaths, ckey, nkeys = both_ends
    coordinator = verify_log(cpath, ckey.public_key())
    nodes = {n: verify_log(p, nkeys[n].public_key()) for n, p in npaths.items()}
    assert len(coordinator) == 12 and all(len(v) == 6 for v in nodes.values())
    assert cross_check(coordinator, nodes) == []
    assert cross_check(coordinator, nodes, run_id="run-1", coordinator_name="coordinator") == []
    assert cross_check(coordinator, {"kvasir": nodes["kvasir"]}) == []  # cvc's log not given: not checked


def test_cross_check_different_hash_and_missing(both_ends) -> None:
    cpath, npaths, _, _ = both_ends
    coordinator = read_log(cpath)
    nodes = {n: read_log(p) for n, p in npaths.items()}
    # kvasir records a different train reply than the coordinator received (entry 3 in kvasir's log).
    altered = [dict(e) for e in nodes["kvasir"]]
    assert altered[3]["direction"] == "sent" and altered[3]["action"] == "train_reply"
    altered[3]["sha256"] = "ab" * 32
    findings = cross_check(coordinator, {"kvasir": altered, "cvc": nodes["cvc"]})
    assert len(findings) == 1
    assert "entry 3 in node kvasir's log" in findings[0] and "entry 3 in the coordinator's log" in findings[0]
    assert "differently" in findings[0]

    # A train request the coordinator sent never shows up at cvc (entry 8 in the coordinator's log).
    assert coordinator[8]["peer"] == "cvc" and coordinator[8]["direction"] == "sent"
    findings = cross_check(coordinator, {"kvasir": nodes["kvasir"], "cvc": [e for i, e in enumerate(nodes["cvc"]) if i != 2]})
    assert findings == [f"entry 8 in the coordinator's log: sent train of round 1 ({coordinator[8]['bytes']} bytes, "
                        f"sha256 {coordinator[8]['sha256'][:12]}) is missing from node cvc's log (no received entry with that hash)"]

    # A reply cvc received that the coordinator never recorded as sent.
    findings = cross_check([e for i, e in enumerate(coordinator) if i != 8], {"cvc": nodes["cvc"]})
    assert len(findings) == 1 and findings[0].startswith("entry 2 in node cvc's log: received train of round 1")
    assert "never recorded as sent in the coordinator's log" in findings[0]


# --- policy --------------------------------------------------------------------------------


def node_log(tmp_path: Path, *frames: bytes) -> list[dict]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "node.jsonl"
    with AuditLog(path, key, "kvasir") as log:
        log.record(direction="received", peer="coordinator", frame=train_request())
        for frame in frames:
            log.record(direction="sent", peer="coordinator", frame=frame)
    return verify_log(path, key.public_key())


def test_policy_clean_reply_with_declared_kernels(tmp_path: Path) -> None:
    entries = node_log(tmp_path, train_reply(), error_reply(),
                       encode(EvaluateReply(run_id="run-1", round=1, metrics=METRICS)))
    assert check_policy("kvasir", entries, DECLARED, image_size=32) == []
    # A declared large kernel (last dims 8 x 8) is exactly declared, so it is not flagged.
    big = DECLARED | {"mix.weight": (2, 2, 8, 8)}
    assert check_policy("kvasir", node_log(tmp_path / "b", train_reply(arrays=weights(big))), big) == []


def test_policy_catches_image_shaped_tensor(tmp_path: Path) -> None:
    entries = node_log(tmp_path, train_reply(arrays=weights() | {"leak": np.zeros((4, 1, 64, 64), np.float32)}))
    findings = check_policy("kvasir", entries, DECLARED)
    assert ("entry 1 in node kvasir's log: tensor weights/leak with shape (4, 1, 64, 64) "
            "looks like per-sample data (image, mask or prediction)") in findings
    assert "entry 1 in node kvasir's log: tensor weights/leak is not in the declared exchange set" in findings
    assert len(findings) == 2


def test_policy_catches_undeclared_or_reshaped_tensor_and_image_size(tmp_path: Path) -> None:
    entries = node_log(tmp_path, train_reply(arrays=weights() | {"extra.bias": np.zeros(4, np.float32)}),
                       train_reply(arrays=weights(DECLARED | {"enc.0.bias": (2, 32)})),
                       train_reply(arrays=weights(DECLARED | {"enc.0.weight": (4, 1, 8, 8)})))
    findings = check_policy("kvasir", entries, DECLARED, image_size=32)
    assert findings == [
        "entry 1 in node kvasir's log: tensor weights/extra.bias is not in the declared exchange set",
        "entry 2 in node kvasir's log: tensor weights/enc.0.bias with shape (2, 32) has a dimension equal to the image size 32",
        "entry 2 in node kvasir's log: tensor weights/enc.0.bias has shape (2, 32), but (4,) is declared",
        "entry 3 in node kvasir's log: tensor weights/enc.0.weight with shape (4, 1, 8, 8) looks like per-sample data (image, mask or prediction)",
        "entry 3 in node kvasir's log: tensor weights/enc.0.weight has shape (4, 1, 8, 8), but (4, 1, 3, 3) is declared",
    ]


def test_policy_catches_extra_scalar_field_without_logging_its_value(tmp_path: Path) -> None:
    fields = {"run_id": "run-1", "round": 1, "n_samples": 8, "mean_loss": 0.5, "seconds": 1.0, "accepted": 0,
              "candidates": 0, "patient_ids": ["P-0001", "P-0002"]}
    frame = encode_frame("train_reply", 1, fields, {f"weights/{k}": v for k, v in weights().items()})
    entries = node_log(tmp_path, frame)
    assert check_policy("kvasir", entries, DECLARED) == [
        "entry 1 in node kvasir's log: scalar field 'patient_ids' is not declared by train_reply messages"]
    assert b"P-0001" not in (tmp_path / "node.jsonl").read_bytes()
    assert entries[1]["schema"]["redacted"]["patient_ids"]["type"] == "list"


def test_policy_catches_extra_metric_and_undecodable_and_outside_tensor_field(tmp_path: Path) -> None:
    metrics = {"val": METRICS["val"] | {"per_image": [0.1, 0.9]}}
    entries = node_log(tmp_path,
                       encode_frame("evaluate_reply", 1, {"run_id": "run-1", "round": 1, "metrics": metrics}, {}),
                       b"FSG1\x00\x00\x00\x05{oops",
                       encode_frame("error", 1, {"code": "internal", "message": "x"}, {"preds": np.zeros((2, 16, 16), np.uint8)}))
    findings = check_policy("kvasir", entries, DECLARED)
    assert findings[0].startswith("entry 1 in node kvasir's log: scalar fields fail the evaluate_reply checks")
    assert findings[1].startswith("entry 2 in node kvasir's log: sent a frame that could not be decoded")
    assert findings[2:] == [
        "entry 3 in node kvasir's log: tensor preds with shape (2, 16, 16) looks like per-sample data (image, mask or prediction)",
        "entry 3 in node kvasir's log: tensor preds is not in a declared tensor field of error",
    ]


# --- schema ----------------------------------------------------------------------------------


def test_frame_schema_of_a_train_request() -> None:
    schema = frame_schema(train_request())
    assert schema == {
        "kind": "train",
        "schema_version": 1,
        "fields": {"overlays": 0, "plan": {"lr": 0.01}, "round": 1, "run_id": "run-1", "score": []},
        "tensors": [["weights/enc.0.bias", "float32", [4]], ["weights/enc.0.weight", "float32", [4, 1, 3, 3]],
                    ["weights/head.weight", "float32", [1, 4, 1, 1]]],
    }


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.binary(max_size=32).map(lambda b: b"FSG1" + b), st.none(), st.integers(),
                 st.text(max_size=8)))
def test_frame_schema_never_raises(garbage) -> None:
    schema = frame_schema(garbage)
    assert schema["kind"] is None or isinstance(schema["kind"], str)
    json.dumps(schema, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 40))
def test_frame_schema_never_holds_tensor_values(marker: int, cut: int) -> None:
    value = np.float32(marker % 1000 + 0.123)
    frame = train_reply(arrays=weights(value=float(value)))
    text = json.dumps(frame_schema(frame))
    assert str(float(value)) not in text and "0.123" not in text
    assert frame_schema(frame[:-cut])["kind"] is None  # truncated: an error, not an exception


def test_frame_schema_nan_header_field_is_redacted() -> None:
    frame = b"FSG1" + (17).to_bytes(4, "big") + b'{"kind":"x","sche'  # undecodable header
    assert frame_schema(frame)["kind"] is None
    header = b'{"fields":{"x":NaN},"kind":"train","schema_version":1,"tensors":[]}'
    schema = frame_schema(b"FSG1" + len(header).to_bytes(4, "big") + header)
    assert schema["redacted"]["x"]["why"].startswith("not JSON-safe")


# --- summary and report ----------------------------------------------------------------------


def test_summarize_and_report(tmp_path: Path) -> None:
    entries = node_log(tmp_path, train_reply(), error_reply(),
                       train_reply(arrays=weights() | {"leak": np.zeros((4, 1, 64, 64), np.float32)}))
    summaries = summarize(entries, DECLARED)
    assert [(s["peer"], s["round"]) for s in summaries] == [("coordinator", None), ("coordinator", 1)]
    setup, round1 = summaries
    assert setup["refusals"] == 1 and setup["sent"] == 1
    assert round1["sent"] == 2 and round1["received"] == 1
    assert round1["bytes_out"] == entries[1]["bytes"] + entries[3]["bytes"] and round1["bytes_in"] == entries[0]["bytes"]
    assert round1["image_shaped_out"] == ["weights/leak (4, 1, 64, 64)"] and round1["tensor_groups_out"] == ["weights"]
    md, png = tmp_path / "report" / "audit.md", tmp_path / "report" / "audit_bytes.png"
    write_report(summaries, md, png, title="Audit report: node kvasir", findings=check_policy("kvasir", entries, DECLARED))
    text = md.read_text()
    assert "image-shaped data was sent" in text and "weights/leak (4, 1, 64, 64)" in text and "](audit_bytes.png)" in text
    assert png.read_bytes().startswith(b"\x89PNG")
    write_report(summarize(entries[:2], DECLARED), md, png)
    assert "Nothing image-shaped was sent" in md.read_text() and "No findings" in md.read_text()
