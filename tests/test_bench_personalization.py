"""bench_personalization scores every method the same way: at its validation-chosen round and at its last."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_personalization as bench  # noqa: E402

SITES = [s.name for s in bench.SITES]


def _figures(val: float, test: float, prefix: str = "") -> dict:
    keys = {f"{prefix}{split}_{m}": value for split, value in (("val", val), ("test", test)) for m in ("dice", "iou", "assd")}
    return {**keys, f"{prefix}val_n": 10, f"{prefix}test_n": 10}


def _rows(round_: int, val: float, test: float, personal: tuple[float, float] | None = None) -> list[dict]:
    """One row per site, as the round engine records them; ``personal``: the node's own model's figures too."""
    extra = _figures(*personal, prefix="personal_") if personal else {}
    return [{"round": round_, "site": s, **_figures(val, test), **extra} for s in SITES]


def test_a_baseline_is_scored_at_its_best_validation_round_and_at_its_last():
    rows = _rows(0, 0.1, 0.1) + _rows(1, 0.6, 0.5) + _rows(2, 0.4, 0.7)
    scored = bench.score_run({"method": "FedRep", "rounds": 2, "rows": rows}, "FedRep")
    assert scored["round"] == {"val": 1, "last": 2}
    assert scored["val"]["BUSI"]["iou"] == 0.5 and scored["last"]["BUSI"]["iou"] == 0.7


def test_lcfed_is_scored_calibrated_from_its_best_stage1_round_and_from_its_last():
    # Stage 1 peaks at round 1; the run calibrates after round 2 (row 3), and again from round 1 (row 2).
    rows = _rows(0, 0.1, 0.1) + _rows(1, 0.6, 0.5) + _rows(2, 0.4, 0.3) + _rows(3, 0.4, 0.3, (0.5, 0.45))
    run = {"method": "LC-Fed", "rounds": 2, "rows": rows, "best_rows": _rows(2, 0.6, 0.5, (0.7, 0.65))}
    scored = bench.score_run(run, "LC-Fed")
    assert scored["round"] == {"val": 1, "last": 2}
    assert scored["val"]["Toshiba"]["iou"] == 0.65 and scored["last"]["Toshiba"]["iou"] == 0.45
    stage1 = bench.score_run(run, bench.PCS_ONLY)
    assert stage1["round"] == {"val": 1, "last": 2} and stage1["val"]["BUSI"]["iou"] == 0.5


@pytest.mark.parametrize("margin, met", [(0.03, True), (0.01, False)])
def test_gate_is_the_best_of_ft_and_fedrep_over_fedavg(margin, met):
    def method(iou: float) -> dict:
        return {"val": {"mean_iou": (iou, 0.0)}}

    g = bench.gate({"FedAvg": method(0.5), "FT": method(0.5 + margin), "FedRep": method(0.4)})["personalization_over_fedavg"]
    assert g["met"] is met and g["method"] == "FT" and g["measured"] == pytest.approx(margin)


def test_lcfed_calibrates_from_the_state_its_best_round_was_scored_with(tmp_path, monkeypatch):
    """Round r is scored while round r+1 already trains, so the job must keep round r's own
    checkpoint and local parts: resumed from them, the stage-1 model scores as it did in round r."""
    from types import SimpleNamespace

    from fedseg.node.synthetic import write_federation

    folders = write_federation(tmp_path / "data", n_per_site=20, size=32)
    # Validation "peaks" at round 2 of 4, whatever the model learns, so the job resumes mid-run.
    monkeypatch.setattr(bench, "image_weighted", lambda rows, *_: 1.0 / (1 + abs(rows[0]["round"] - 2)))
    args = SimpleNamespace(rounds=4, image_size=32, aggregation="samples", width=4, depth=2, lr=1e-3, batch_size=8,
                           threads=1, hc_epochs=2.0)
    job = {"variant": "as-is", "method": "LC-Fed", "seed": 0, "rounds": 4, "plan": bench.make_plan(args, "LC-Fed", 0),
           "sites": {f.name: str(f) for f in folders}, "split_seed": 0, "threads": 1, "device": "cpu", "dir": str(tmp_path / "job")}
    result = bench.run_job(job)
    original = {r["site"]: r for r in result["rows"] if r["round"] == 2}
    best = {r["site"]: r for r in result["best_rows"]}
    assert set(best) == set(original)
    for site, row in best.items():
        assert row["round"] == 3 and "personal_test_iou" in row
        # The unprefixed figures are the stage-1 model the calibration started from.
        assert row["val_dice"] == pytest.approx(original[site]["val_dice"], abs=1e-6)
        assert row["test_iou"] == pytest.approx(original[site]["test_iou"], abs=1e-6)


def test_the_summary_keeps_every_variants_gate_and_goals():
    res = {"as-is": {"gate": {"g": {"met": False}}, "goals": {"x": {"met": False}}},
           "conventions": {"gate": {"g": {"met": True}}, "goals": {"x": {"met": True}}}}
    variants = ["as-is", "conventions"]
    assert bench.every_variant(res, variants, "gate") == {"g": {"met": False}, "g (conventions)": {"met": True}}
    assert bench.every_variant(res, variants, "goals") == {"x": {"met": False}, "x (conventions)": {"met": True}}
