"""FedMix end to end: pixel, box and image-level hospitals in one federation of real nodes."""
from __future__ import annotations

import json

from conftest import TINY_PLAN_ARGS, fedseg


def _invites(nodes, names=None):
    return [arg for name, node in nodes.items() if names is None or name in names for arg in ("--invite", str(node.invite))]


def test_fedmix_trains_every_label_kind_and_records_pseudo_label_share(mixed_federation, tmp_path):
    run = tmp_path / "fedmix"
    result = fedseg("run", *_invites(mixed_federation), "--algorithm", "fedmix", "--rounds", "2", "--tau", "0.5", "--out", str(run), *TINY_PLAN_ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] >= 1]
    weak = [r for r in trained if r["site"] in ("site-b", "site-c")]
    # The pixel node trains on its masks; weak nodes report how many pseudo-labels they accepted.
    assert all("pseudo_share" not in r for r in trained if r["site"] == "site-a")
    assert len(weak) == 4
    for r in weak:
        assert r["pseudo_candidates"] == 21 and r["train_n"] == r["pseudo_accepted"]
        assert r["pseudo_share"] == r["pseudo_accepted"] / 21
    # Every site still scores the global model with the masks it keeps for evaluation.
    assert {r["site"] for r in rows if r["round"] == 2 and "test_dice" in r} == set(mixed_federation)


def test_fedavg_on_a_mixed_federation_trains_only_the_pixel_node(mixed_federation, tmp_path):
    run = tmp_path / "fedavg-pixel"
    result = fedseg("run", *_invites(mixed_federation), "--algorithm", "fedavg", "--rounds", "1", "--out", str(run), *TINY_PLAN_ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"round": 1' in line]
    assert {r["site"] for r in rows if "train_n" in r} == {"site-a"}


def test_fedmix_without_a_pixel_node_is_refused_with_the_reason(mixed_federation, tmp_path):
    result = fedseg("run", *_invites(mixed_federation, {"site-b", "site-c"}), "--algorithm", "fedmix", "--rounds", "1",
                    "--out", str(tmp_path / "run"), *TINY_PLAN_ARGS)
    assert result.returncode != 0
    assert "fedmix needs at least one node with pixel labels" in result.stderr and "Traceback" not in result.stderr
