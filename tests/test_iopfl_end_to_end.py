"""IOP-FL end to end through the CLI: a federation, then a new hospital adapts with unlabelled images."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_PLAN_ARGS, fedseg


@pytest.fixture(scope="module")
def new_site(federation, tmp_path_factory):
    """A new hospital's node with images and no labels; its folder also has masks, which only score."""
    from fedseg.node.launcher import NodeProcess

    data = Path(json.loads((federation["site-c"].workdir / "node.json").read_text())["data"])
    node = NodeProcess("newsite", data, tmp_path_factory.mktemp("newsite") / "node", extra=["--labels", "none"])
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


def test_new_site_adapts_over_consenting_models_only_and_reports_scores(federation, new_site, tmp_path):
    from fedseg.protocol.run_store import RunStore

    run = tmp_path / "run"
    invites = [arg for node in federation.values() for arg in ("--invite", str(node.invite))]
    result = fedseg("run", *invites, "--algorithm", "iopfl", "--norm", "batch", "--rounds", "2", "--out", str(run), *TINY_PLAN_ARGS)
    assert result.returncode == 0, result.stdout + result.stderr

    adapted = fedseg("adapt", "--invite", str(new_site.invite), "--from", str(run), "--epochs", "2", "--batch-size", "8")
    out = adapted.stdout + adapted.stderr
    assert adapted.returncode == 0, out
    # site-a consented; site-b and site-c did not (the default), and are left out with a line saying so.
    consent = {name: json.loads((node.workdir / "node.json").read_text())["share_personalized"] for name, node in federation.items()}
    assert consent == {"site-a": True, "site-b": False, "site-c": False}
    assert "adapted over 2 experts (site-a, global)" in out
    for name in ("site-b", "site-c"):
        assert f"node {name}: left out of the routing set" in out and "--share-personalized" in out
    for model in ("global", "norm_stats", "routed"):
        assert f"  {model} " in out and "Dice" in out
    record = json.loads((run / "adapt" / "newsite.json").read_text())
    assert record["experts"] == ["site-a", "global"] and set(record["metrics"]) == {"global", "norm_stats", "routed"}
    assert all(m["n"] == 30 for m in record["metrics"].values())
    # The adapted model stays on the new node, and segments images there.
    run_id = RunStore(run).load()[0].run_id
    assert (new_site.workdir / "models" / run_id / "routed.npz").exists()
    images = Path(json.loads((new_site.workdir / "node.json").read_text())["data"]) / "images"
    predicted = fedseg("node", "predict", "--workdir", str(new_site.workdir), "--run", run_id, "--model", "routed",
                       "--images", str(images), "--out", str(tmp_path / "pred"))
    assert predicted.returncode == 0, predicted.stderr
    assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == 30


def test_new_site_with_an_empty_image_folder_does_not_start(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    result = fedseg("node", "start", "--name", "newsite", "--data", str(tmp_path / "empty"), "--labels", "none",
                    "--workdir", str(tmp_path / "w"), timeout=120)
    assert result.returncode != 0 and "will not start" in result.stderr and "no images in" in result.stderr
    assert "Traceback" not in result.stderr
