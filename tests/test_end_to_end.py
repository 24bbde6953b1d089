"""End to end: real node processes serving Syft datasites, driven through the ``fedseg`` CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_PLAN_ARGS, fedseg


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _mean(rows: list[dict], round_: int, key: str) -> float:
    at = [r[key] for r in rows if r["round"] == round_]
    return sum(at) / len(at)


@pytest.fixture(scope="module")
def finished_run(federation, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "polyp"
    invites = [arg for node in federation.values() for arg in ("--invite", str(node.invite))]
    result = fedseg("run", *invites, "--rounds", "3", "--out", str(run), "--overlays", "2", *TINY_PLAN_ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    return run, result


def test_fedavg_run_learns_and_records_everything(finished_run, federation):
    run, result = finished_run
    rows = _rows(run)
    assert sorted({(r["round"], r["site"]) for r in rows}) == sorted((r, s) for r in range(4) for s in federation)
    assert len(rows) == 4 * len(federation)
    for row in rows:
        for key in ("val_dice", "val_iou", "val_assd", "val_loss", "val_n", "test_dice", "test_iou", "test_assd", "test_loss", "test_n"):
            assert key in row
    # The global model learns: Dice on every site's test split rises clearly above round 0.
    assert _mean(rows, 3, "test_dice") > _mean(rows, 0, "test_dice") + 0.15
    report = (run / "report.md").read_text()
    assert all(site in report for site in federation) and "Best round by validation Dice" in report
    assert (run / "dice.png").read_bytes().startswith(b"\x89PNG")
    assert (run / "checkpoint.npz").exists()
    assert "Per-site test figures" in result.stdout
    for site in federation:
        assert "round   3/3" in result.stdout and site in result.stdout


def test_overlays_stay_on_the_node(finished_run, federation):
    run, _ = finished_run
    for node in federation.values():
        overlays = list((node.workdir / "overlays").rglob("*.png"))
        assert overlays, f"node {node.name} wrote no overlays"
    assert not list(run.rglob("*overlay*")) and not any(p.suffix == ".png" and p.name != "dice.png" for p in run.rglob("*"))


def test_output_to_a_pipe_is_neither_wrapped_nor_cut(federation, tmp_path):
    """A log has no width: even with COLUMNS=30, round lines stay whole and the table keeps every site name."""
    invites = [arg for node in federation.values() for arg in ("--invite", str(node.invite))]
    result = fedseg("run", *invites, "--rounds", "1", "--out", str(tmp_path / "run"), *TINY_PLAN_ARGS, columns=30)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    rounds = [line for line in lines if line.startswith("round ")]
    assert len(rounds) == 2 and all(all(f"{site} 0." in line for site in federation) for line in rounds)
    assert "…" not in result.stdout
    for site in federation:
        assert any(line.startswith(f"│ {site} ") for line in lines), f"no table row for {site}"


def test_resume_continues_from_last_completed_round(finished_run, tmp_path):
    run, _ = finished_run
    before = _rows(run)
    result = fedseg("run", "--resume", str(run), "--rounds", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming run" in result.stdout and "round   4/4" in result.stdout and "round   1/4" not in result.stdout
    rows = _rows(run)
    assert [r for r in rows if r["round"] <= 3] == before
    assert sorted(r["round"] for r in rows).count(4) == len({r["site"] for r in rows})


def test_invite_is_private_and_has_no_default_password(federation):
    for node in federation.values():
        assert node.invite.stat().st_mode & 0o777 == 0o600
        invite = json.loads(node.invite.read_text())
        assert invite["node"] == node.name and invite["fingerprint"].startswith("sha256:")
        assert invite["password"] != "changethis" and len(invite["password"]) >= 24
        assert "changethis" not in (node.workdir / "owner.json").read_text()


def test_wrong_credentials_are_refused_and_node_keeps_serving(federation, tmp_path):
    node = next(iter(federation.values()))
    invite = json.loads(node.invite.read_text())
    invite["password"] = "not-the-password"
    bad = tmp_path / "bad-invite.json"
    bad.write_text(json.dumps(invite))
    result = fedseg("run", "--invite", str(bad), "--rounds", "1", "--out", str(tmp_path / "run"), *TINY_PLAN_ARGS)
    assert result.returncode != 0
    assert f"node {node.name}" in result.stderr and "refused the login" in result.stderr
    assert "Traceback" not in result.stderr
    assert node.alive()


def test_unreadable_invite_is_one_clear_line(tmp_path):
    bad = tmp_path / "invite.json"
    bad.write_text("{not json")
    result = fedseg("run", "--invite", str(bad), "--out", str(tmp_path / "run"))
    assert result.returncode != 0 and "cannot be read" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_node_is_one_line_without_library_warnings(tmp_path):
    from fedseg.node.launcher import free_port
    from fedseg.node.perimeter.tls import issue
    from fedseg.protocol.invite import Invite

    port, client = free_port(), issue("coordinator", server=False)  # nothing listens there
    invite = tmp_path / "invite.json"
    Invite(url="https://127.0.0.1", port=port, node="ghost", email="c@fedseg.org", password="pw", fingerprint="sha256:" + "0" * 64,
           tls_fingerprint="sha256:" + "0" * 64, client_cert=client.cert_pem, client_key=client.key_pem).save(invite)
    result = fedseg("run", "--invite", str(invite), "--out", str(tmp_path / "run"), timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"Error: node ghost at https://127.0.0.1:{port} is not reachable"]
    assert "Retrying" not in result.stdout + result.stderr and "urllib3" not in result.stdout + result.stderr


def test_real_polyp_site_runs_a_round(tmp_path):
    from conftest import shared_data
    from fedseg.node.launcher import NodeProcess

    node = NodeProcess("kvasir", shared_data("polyp", "Kvasir-SEG"), tmp_path / "kvasir", extra=["--limit", "24"])
    try:
        invite = node.wait_ready()
        result = fedseg("run", "--invite", str(invite), "--rounds", "1", "--out", str(tmp_path / "run"), *TINY_PLAN_ARGS)
    finally:
        node.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _rows(tmp_path / "run")
    assert [(r["round"], r["site"]) for r in rows] == [(0, "kvasir"), (1, "kvasir")]
    assert rows[1]["train_n"] + rows[1]["val_n"] + rows[1]["test_n"] == 24


def test_fedbn_keeps_normalization_layers_in_each_node_workdir(federation, tmp_path):
    invites = [arg for node in federation.values() for arg in ("--invite", str(node.invite))]
    result = fedseg("run", *invites, "--algorithm", "fedbn", "--rounds", "1", "--out", str(tmp_path / "run"), *TINY_PLAN_ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    import numpy as np

    from fedseg.models.personalization import LocalPart, local_keys
    from fedseg.protocol.plan import Plan

    # The run's model (TINY_PLAN_ARGS: width 8, depth 2) and its GroupNorm parameters.
    model = Plan.from_dict({"algorithm": "fedbn", "image_size": 32, "model": {"width": 8, "depth": 2, "groups": 8}}).build_model()
    norm = local_keys(model, LocalPart.NORM)
    for node in federation.values():
        saved = list((node.workdir / "personal").glob("*.npz"))
        assert len(saved) == 1
        with np.load(saved[0]) as local:
            assert set(local.files) == norm


def test_node_predict_segments_new_images_locally(finished_run, federation, tmp_path):
    from PIL import Image

    from fedseg.protocol.run_store import RunStore

    node = federation["site-a"]
    run_id = RunStore(finished_run[0]).load()[0].run_id
    images = Path(json.loads((node.workdir / "node.json").read_text())["data"]) / "images"
    args = ["node", "predict", "--workdir", str(node.workdir), "--run", run_id, "--images", str(images)]
    result = fedseg(*args, "--model", "global", "--out", str(tmp_path / "pred"))
    assert result.returncode == 0, result.stderr
    masks = sorted((tmp_path / "pred" / "masks").glob("*.png"))
    assert len(masks) == len(list(images.iterdir())) and len(list((tmp_path / "pred" / "overlays").glob("*.png"))) == len(masks)
    with Image.open(masks[0]) as mask, Image.open(images / masks[0].name) as image:
        assert mask.size == image.size and set(mask.getdata()) <= {0, 255}
    # A FedAvg run has no personalized model, and the node says so instead of guessing.
    missing = fedseg(*args, "--model", "personalized", "--out", str(tmp_path / "p2"))
    assert missing.returncode != 0 and "no personalized model" in missing.stderr and "Traceback" not in missing.stderr


def test_audit_of_a_real_run_verifies_clean_and_reports(finished_run, federation, tmp_path):
    run, _ = finished_run
    nodes = [str(node.workdir) for node in federation.values()]
    result = fedseg("audit", "verify", str(run), *nodes)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit clean" in result.stdout
    report = fedseg("audit", "report", str(run), *nodes, "--out", str(tmp_path / "audit"))
    assert report.returncode == 0, report.stderr
    for name in federation:
        assert (tmp_path / "audit" / f"{name}.md").read_text().strip()


def test_audit_detects_a_tampered_node_log(finished_run, federation, tmp_path):
    import shutil

    run, _ = finished_run
    node = federation["site-c"]
    copy = tmp_path / "site-c"
    shutil.copytree(node.workdir, copy, ignore=shutil.ignore_patterns("syft", "overlays", "models", "personal"))
    log = copy / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"bytes":', b'"bytes":1', 1)
    log.write_bytes(b"".join(lines))
    result = fedseg("audit", "verify", str(run), str(copy))
    assert result.returncode != 0 and "entry 1 (line 2)" in result.stderr and "audit.jsonl" in result.stderr


@pytest.fixture(scope="module")
def grey_node(tmp_path_factory):
    import dataclasses

    from fedseg.node.launcher import NodeProcess
    from fedseg.node.synthetic import DEFAULT_SITES, write_site

    root = tmp_path_factory.mktemp("grey")
    site = write_site(root / "data", dataclasses.replace(DEFAULT_SITES[1], name="grey-site", channels=1), 24, size=32, seed=3)
    node = NodeProcess("grey-site", site, root / "node")
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


def test_a_grey_site_trains_a_grey_model(grey_node, tmp_path):
    from fedseg.protocol.run_store import RunStore

    result = fedseg("run", "--invite", str(grey_node.invite), "--rounds", "1", "--out", str(tmp_path / "run"), *TINY_PLAN_ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "node grey-site: " in result.stdout and ", grey, pixel labels" in result.stdout
    state, arrays = RunStore(tmp_path / "run").load()
    assert state.plan["model"]["in_channels"] == 1
    assert arrays["encoder.0.0.weight"].shape[1] == 1  # (out, in, k, k): the first convolution takes one channel


def test_grey_and_rgb_nodes_are_refused_in_one_line_unless_the_user_chooses(grey_node, federation, tmp_path):
    rgb = next(iter(federation.values()))
    invites = ["--invite", str(grey_node.invite), "--invite", str(rgb.invite)]
    result = fedseg("run", *invites, "--rounds", "1", "--out", str(tmp_path / "run"), *TINY_PLAN_ARGS)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: the nodes' images differ (grey-site grey, {rgb.name} RGB): choose the model's input with --in-channels "
        "(3: grey copied into RGB; 1: colour made grey)"]
