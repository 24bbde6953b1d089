"""A real node refuses what it does not expose and anything malformed, and keeps serving."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import NODE_MAX_MB
from fedseg.protocol.errors import RemoteError
from fedseg.protocol.messages import (
    DescribeReply,
    DescribeRequest,
    ErrorReply,
    EvaluateReply,
    EvaluateRequest,
    MessageKind,
    TrainReply,
    TrainRequest,
    decode,
    encode,
)
from fedseg.protocol.plan import Plan
from fedseg.protocol.rounds import Peer, initial_arrays
from fedseg.protocol.invite import load_invite
from fedseg.protocol.syft_transport import SyftTransport
from fedseg.protocol.wire import encode_frame

PLAN = Plan.from_dict({"image_size": 32, "model": {"width": 4, "depth": 2, "groups": 2}, "train": {"batch_size": 8, "augment": False}})


@pytest.fixture(scope="module")
def node(federation):
    node = federation["site-b"]
    transport = SyftTransport(load_invite(node.invite))
    transport.connect()
    return node, transport, Peer(transport, PLAN.max_message_bytes)


def _still_serving(peer: Peer) -> None:
    assert peer.request(DescribeRequest(run_id="check"), DescribeReply).node == "site-b"


def _reply(transport: SyftTransport, frame: bytes) -> ErrorReply:
    reply = decode(transport.exchange(frame))
    assert isinstance(reply, ErrorReply), reply
    return reply


def test_describe_reports_counts_never_pixels(node):
    _, transport, peer = node
    reply = peer.request(DescribeRequest(run_id="t"), DescribeReply)
    assert (reply.n_train, reply.n_val, reply.n_test) == (21, 5, 4)
    assert reply.label_kind == "pixel" and reply.fingerprint.startswith("sha256:")
    assert len(transport.exchange(encode(DescribeRequest(run_id="t")))) < 1024


def test_train_and_evaluate_return_only_weights_and_aggregates(node):
    _, _, peer = node
    weights = initial_arrays(PLAN)
    reply = peer.request(TrainRequest(run_id="t", round=1, plan=PLAN.to_dict(), weights=weights), TrainReply)
    assert set(reply.weights) == set(weights) and reply.n_samples == 21
    assert any(not np.array_equal(reply.weights[k], weights[k]) for k in weights)
    scores = peer.request(EvaluateRequest(run_id="t", round=1, plan=PLAN.to_dict(), splits=["val"], overlays=0, weights=reply.weights), EvaluateReply)
    assert set(scores.metrics) == {"val"} and set(scores.metrics["val"]) == {"dice", "iou", "assd", "hd95", "loss", "n"}


@pytest.mark.parametrize("kind", ["shutdown", "read_asset", MessageKind.TRAIN_REPLY.value])
def test_action_not_exposed_is_refused(node, kind):
    node_proc, transport, peer = node
    reply = _reply(transport, encode_frame(kind, 1, {}, {}))
    assert reply.code == "not_exposed" and repr(kind) in reply.message and "site-b" in reply.message
    _still_serving(peer)
    assert "not exposed" in (node_proc.workdir / "node.log").read_text()


def test_weights_with_nan_are_refused_naming_the_tensor(node):
    _, transport, peer = node
    weights = initial_arrays(PLAN)
    name = sorted(weights)[0]
    weights[name] = weights[name].copy()
    weights[name].flat[0] = np.nan
    frame = encode_frame("train", 1, {"run_id": "t", "round": 1, "plan": PLAN.to_dict(), "score": [], "overlays": 0}, {f"weights/{k}": v for k, v in weights.items()})
    reply = _reply(transport, frame)
    assert reply.code == "bad_weights" and name in reply.message and "NaN" in reply.message
    _still_serving(peer)


def test_weights_of_the_wrong_shape_are_refused_naming_the_tensor(node):
    _, _, peer = node
    weights = initial_arrays(PLAN)
    name = sorted(weights)[-1]
    weights[name] = np.zeros((3, 3), np.float32)
    with pytest.raises(RemoteError) as err:
        peer.request(TrainRequest(run_id="t", round=1, plan=PLAN.to_dict(), weights=weights), TrainReply)
    assert err.value.code == "bad_weights" and name in str(err.value) and "(3, 3)" in str(err.value)
    _still_serving(peer)


def test_bad_plan_is_refused(node):
    _, _, peer = node
    plan = PLAN.to_dict() | {"rounds": 0}
    with pytest.raises(RemoteError) as err:
        peer.request(TrainRequest(run_id="t", round=1, plan=plan, weights=initial_arrays(PLAN)), TrainReply)
    assert err.value.code == "bad_plan" and "rounds" in str(err.value)
    _still_serving(peer)


def test_garbage_and_oversized_frames_are_refused(node):
    _, transport, peer = node
    assert _reply(transport, b"\x00" * 64).code == "bad_message"
    oversized = encode_frame("describe", 1, {"run_id": "t"}, {"pad": np.zeros((NODE_MAX_MB + 1) * 2**20, np.uint8)})
    reply = _reply(transport, oversized)
    assert reply.code == "bad_message" and "exceeds the limit" in reply.message
    _still_serving(peer)


def test_code_not_on_the_allow_list_is_denied(node):
    import time

    import syft as sy
    from syft.service.policy.policy import OutputPolicyExecuteCount

    node_proc, transport, _ = node
    client = transport._client
    site = client.datasets["site"].assets["summary"]

    def read_private(site, message):
        return site

    fn = sy.syft_function(input_policy=sy.MixedInputPolicy(site=site, message=dict, client=client),
                          output_policy=OutputPolicyExecuteCount(limit=1))(read_private)
    client.code.request_code_execution(fn)
    deadline = time.monotonic() + 30
    status = ""
    while time.monotonic() < deadline and "REJECTED" not in status:
        status = str([r.status for r in client.requests if r.code.service_func_name == "read_private"])
        time.sleep(0.5)
    assert "REJECTED" in status
    assert "not on this node's allow-list" in (node_proc.workdir / "node.log").read_text()
    with pytest.raises(Exception):
        client.code.read_private(site=site, message={"frame": b""}).get()


def test_private_images_cannot_be_read_through_syft(node):
    # Neither the images nor their mock: the coordinator's Syft paths are those of fedseg's action only.
    _, transport, peer = node
    images = transport._client.datasets["site"].assets["images"]
    for side in ("data", "mock"):
        try:
            value = getattr(images, side)
        except Exception as exc:  # the perimeter's refusal, raised through Syft
            value = exc
        assert not isinstance(value, np.ndarray), side
    _still_serving(peer)


def _stored(workdir, ids: set[str]) -> set[str]:
    """Which of these object ids a node's Syft store still holds; read from Syft's own
    database, since no Syft API lists a store's objects."""
    import sqlite3

    (db,) = (workdir / "syft").glob("*/db/*_json.db")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return ids & {row[0] for row in con.execute("SELECT id FROM ActionObject")}


def _largest_stored(workdir, ids: set[str]) -> int:
    """The size of the largest of these objects in the node's Syft store, as Syft keeps it."""
    import sqlite3

    (db,) = (workdir / "syft").glob("*/db/*_json.db")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return max(len(fields) for id_, fields in con.execute("SELECT id, fields FROM ActionObject") if id_ in ids)


def test_served_calls_leave_no_models_or_updates_on_the_node(node):
    """Frames never enter Syft's store; a reply is handed out once; the store forgets each call."""
    import time

    import syft as sy

    from conftest import NODE_SYFT_RETENTION_S
    from fedseg.protocol.syft_action import ACTION_NAME, FRAMES_ROUTE, from_payload, to_payload

    proc, transport, peer = node
    frames = f"https://{transport.invite.host}:{transport.invite.port}{FRAMES_ROUTE}"
    frame = np.random.default_rng(0).bytes(3 * 2**20)  # refused: not a fedseg frame
    calls = set()
    for _ in range(3):  # what SyftTransport.exchange does, keeping the ids of the request and the reply
        digest = transport._session.post(frames, data=frame).text
        request = sy.ActionObject.from_obj(to_payload(digest)).send(transport._client)
        reply = getattr(transport._client.code, ACTION_NAME)(site=transport._site, message=request)
        reply_digest = from_payload(reply.get())
        assert isinstance(decode(transport._session.get(f"{frames}/{reply_digest}").content), ErrorReply)
        assert transport._session.get(f"{frames}/{reply_digest}").status_code == 404
        calls |= {request.id.no_dash, reply.id.no_dash}
    assert len(calls) == 6 and _stored(proc.workdir, calls) == calls
    assert _largest_stored(proc.workdir, calls) < 2**14  # digests, not 3 MB frames
    # The node checks every few seconds, and less often as its list of served calls grows.
    deadline = time.monotonic() + 30 * NODE_SYFT_RETENTION_S
    while _stored(proc.workdir, calls) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _stored(proc.workdir, calls)
    _still_serving(peer)


def test_a_call_naming_a_frame_never_staged_gets_a_typed_error(node):
    import syft as sy

    from fedseg.protocol.syft_action import ACTION_NAME, FRAMES_ROUTE, from_payload, to_payload

    _, transport, peer = node
    frames = f"https://{transport.invite.host}:{transport.invite.port}{FRAMES_ROUTE}"
    for payload in (to_payload("cd" * 32), {"frame": np.zeros(8, np.uint8)}):
        request = sy.ActionObject.from_obj(payload).send(transport._client)
        reply = getattr(transport._client.code, ACTION_NAME)(site=transport._site, message=request).get()
        error = decode(transport._session.get(f"{frames}/{from_payload(reply)}").content)
        assert isinstance(error, ErrorReply) and error.code == "bad_message"
        assert ("cd" * 32 in error.message) if "sha256" in payload else ("payload must be" in error.message)
    _still_serving(peer)


def test_a_node_whose_data_went_away_answers_a_typed_error_and_logs_it(tmp_path):
    """Data moved after the node started: the coordinator hears why, not Syft's "contact the Server Admin"."""
    from conftest import TINY_PLAN_ARGS, fedseg
    from fedseg.node.launcher import NodeProcess
    from fedseg.node.synthetic import DEFAULT_SITES, write_site

    site = write_site(tmp_path / "site", DEFAULT_SITES[0], 12, size=32, seed=2)
    node = NodeProcess("moved", site, tmp_path / "node")
    try:
        invite = node.wait_ready()
        # The node reads its data at its first call, so this is what it finds then.
        (site / "images").rename(tmp_path / "elsewhere")
        result = fedseg("run", "--invite", str(invite), "--out", str(tmp_path / "run"), "--rounds", "1", *TINY_PLAN_ARGS, timeout=300)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and "Traceback" not in output
        assert "node moved refused (node_data)" in output and str(site / "images") in output
        assert "Server Admin" not in output
        log = (tmp_path / "node" / "node.log").read_text()
        assert "node moved cannot serve" in log and str(site / "images") in log
        assert node.alive()
    finally:
        node.stop()
