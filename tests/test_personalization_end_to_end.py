"""LC-Fed end to end: real node processes, heads shared only with consent, calibrated models kept on the nodes."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY_PLAN_ARGS, fedseg
from fedseg.protocol.run_store import RunStore


def test_lcfed_calibrates_with_consenting_heads_and_predicts_locally(federation, tmp_path):
    run = tmp_path / "run"
    invites = [arg for node in federation.values() for arg in ("--invite", str(node.invite))]
    result = fedseg("run", *invites, "--algorithm", "lcfed", "--rounds", "2", "--hc-epochs", "2", "--out", str(run), *TINY_PLAN_ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    # site-c was started with --no-share-head: the run says so, and goes on without its head.
    assert "site-c's head stays on it" in result.stdout and "--no-share-head" in result.stdout
    assert "calibration" in result.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = {r["site"]: r for r in rows if r["round"] == 3}
    assert set(final) == set(federation)
    assert all(0 <= r["personal_test_dice"] <= 1 and r["personal_test_assd"] >= 0 for r in final.values())
    assert final["site-c"]["personal_val_loss"] == final["site-c"]["val_loss"]
    report = (run / "report.md").read_text()
    assert "personal test Dice" in report and "test ASSD (px)" in report

    # The calibrated model stays on site-a, which segments new images with it locally.
    node = federation["site-a"]
    run_id = RunStore(run).load()[0].run_id
    assert (node.workdir / "models" / run_id / "heads.npz").exists()
    images = Path(json.loads((node.workdir / "node.json").read_text())["data"]) / "images"
    predicted = fedseg("node", "predict", "--workdir", str(node.workdir), "--run", run_id, "--images", str(images),
                       "--model", "personalized", "--out", str(tmp_path / "pred"))
    assert predicted.returncode == 0, predicted.stderr
    assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == len(list(images.iterdir()))

    # The heads that left site-a and site-b are a declared exchange: the audit is clean.
    audited = fedseg("audit", "verify", str(run), *(str(n.workdir) for n in federation.values()))
    assert audited.returncode == 0 and "audit clean" in audited.stdout, audited.stdout + audited.stderr
