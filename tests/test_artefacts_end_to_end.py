"""End to end over real Syft nodes: what a run leaves for researchers (device per node, best model,
manifest, TensorBoard scalars with HD95) and a shippable export, all through the ``fedseg`` CLI."""
from __future__ import annotations

import json
import re

import torch

from conftest import TINY_PLAN_ARGS, fedseg


def test_a_run_leaves_best_model_manifest_scalars_and_an_export(federation, tmp_path):
    run = tmp_path / "run"
    invites = [arg for node in federation.values() for arg in ("--invite", str(node.invite))]
    result = fedseg("run", *invites, "--rounds", "2", "--out", str(run), *TINY_PLAN_ARGS)
    assert result.returncode == 0, result.stdout + result.stderr
    # Each node said where it trains (`fedseg node start` defaults to auto: the CPU here,
    # unless PyTorch sees a GPU), and the per-site table shows it.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert all(re.search(rf"node {site}: .* on {device}", result.stdout) for site in federation), result.stdout
    assert "device" in result.stdout and "device |" in (run / "report.md").read_text()

    from fedseg.protocol.report import best_round
    from fedseg.protocol.run_store import RunStore

    rows = RunStore(run).read_metrics()
    assert RunStore(run).load("best")[0].round == best_round(rows)
    manifest = json.loads((run / "manifest.json").read_text())
    events = b"".join(p.read_bytes() for p in (run / "tensorboard").glob("events.out.tfevents.*"))
    assert all("test_hd95" in r and "val_hd95" in r for r in rows)
    for site in federation:
        hashes = manifest["nodes"][site]["split_hashes"]
        assert set(hashes) == {"train", "val", "test"} and all(re.fullmatch("[0-9a-f]{64}", h) for h in hashes.values())
        # Tags are stored as plain strings; tests/protocol/test_tensorboard.py reads the values back.
        assert f"test_hd95/{site}".encode() in events and f"val_dice/{site}".encode() in events

    out = tmp_path / "export"
    exported = fedseg("export", str(run), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    model = torch.jit.load(str(out / "model.pt"))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 1, 32, 32)
