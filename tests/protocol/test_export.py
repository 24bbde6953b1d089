"""The best model is kept, and ``fedseg export`` ships it: loaded with torch alone, it segments as fedseg does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.models.local_training import arrays_to_state, predict
from fedseg.node.actions import NodeRuntime
from fedseg.node.config import NodeConfig
from fedseg.node.datasets import LabelKind, index_site, load_arrays
from fedseg.node.synthetic import write_federation
from fedseg.protocol.errors import ProtocolError
from fedseg.protocol.export import export_run
from fedseg.protocol.messages import EvaluateRequest
from fedseg.protocol.plan import Plan
from fedseg.protocol.report import best_round
from fedseg.protocol.rounds import run_federation
from fedseg.protocol.run_store import RunStore

from engine_doubles import InMemoryTransport, Reporter, TINY

#: Learns within four rounds on the synthetic sites (validation Dice 0.1 to about 0.4).
PLAN = {**TINY, "rounds": 4, "model": {"width": 8, "depth": 2, "groups": 4},
        "train": {**TINY["train"], "lr": 0.003, "local_epochs": 2.0, "batch_size": 8}}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    sites = write_federation(root / "data", n_per_site=20, size=32, seed=3)
    nodes = [NodeRuntime(NodeConfig(name=s.name, data=str(s), labels="pixel", workdir=str(root / "nodes" / s.name))) for s in sites]
    transports = [InMemoryTransport(rt) for rt in nodes]
    rows = run_federation(Plan.from_dict(PLAN), transports, root / "run", Reporter())
    return sites, transports, rows, root / "run"


def test_best_npz_holds_the_weights_of_the_round_the_report_calls_best(federation) -> None:
    _, transports, rows, run = federation
    state, arrays = RunStore(run).load("best")
    assert state.round == best_round(rows)
    assert f"Best round by validation Dice: round {state.round}" in (run / "report.md").read_text()
    # The weights every node scored in that round are the ones kept.
    scored = next(m for m in transports[0].requests if isinstance(m, EvaluateRequest) and m.round == state.round)
    assert set(arrays) == set(scored.weights) and all(np.array_equal(arrays[k], scored.weights[k]) for k in arrays)
    assert RunStore(run).load("last")[0].round == PLAN["rounds"]


def test_the_export_loads_with_torch_alone_and_predicts_fedsegs_masks(federation, tmp_path: Path) -> None:
    sites, _, rows, run = federation
    out = tmp_path / "export"
    done = export_run(run, "best", out)
    assert sorted(p.name for p in done.files) == ["MODEL_CARD.md", "model.json", "model.pt"]
    spec = json.loads((out / "model.json").read_text())
    assert spec["round"] == best_round(rows) and spec["input"]["size"] == [32, 32] and spec["input"]["channels"] == 3
    assert spec["output"]["threshold"] == 0.5 and Plan.from_dict(spec["plan"]) == Plan.from_dict(PLAN)
    card = (out / "MODEL_CARD.md").read_text()
    assert f"round {spec['round']}" in card and all(s.name in card for s in sites) and "test Dice" in card

    # A user's script: torch, NumPy and PIL, no fedseg; preprocessing as model.json states it.
    script = textwrap.dedent("""
        import json, sys
        import numpy as np, torch
        from PIL import Image
        out, images = sys.argv[1], sorted(sys.argv[2:])
        spec = json.load(open(out + "/model.json"))
        model = torch.jit.load(out + "/model.pt")
        size = tuple(spec["input"]["size"])
        x = np.stack([np.asarray(Image.open(p).convert("RGB").resize(size, Image.BILINEAR)).transpose(2, 0, 1) for p in images])
        with torch.no_grad():
            logits = model(torch.from_numpy(x).float() * spec["input"]["normalisation"]["scale"])
        masks = torch.sigmoid(logits) > spec["output"]["threshold"]
        assert not any(m.startswith("fedseg") for m in sys.modules), "the export must not need fedseg"
        np.save(out + "/masks.npy", masks.numpy())
    """)
    images = sorted(str(p) for p in (sites[0] / "images").iterdir())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script, str(out), *images], check=True, env=env, cwd=tmp_path, timeout=120)
    theirs = np.load(out / "masks.npy")

    plan = Plan.from_dict(PLAN)
    model = plan.build_model()
    arrays_to_state(model, RunStore(run).load("best")[1])
    pixels, _ = load_arrays(index_site(sites[0], LabelKind.PIXEL, group_by=None), plan.image_size, plan.model.in_channels)
    ours = predict(model, torch.from_numpy(pixels)).numpy()
    assert theirs.shape == ours.shape == (len(images), 1, 32, 32)
    assert ours.any() and np.array_equal(theirs, ours)


def test_the_cli_exports_the_last_model_too(federation, tmp_path: Path) -> None:
    _, _, _, run = federation
    result = subprocess.run([sys.executable, "-m", "fedseg", "export", str(run), "--which", "last", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"(round {PLAN['rounds']})" in result.stdout
    assert json.loads((tmp_path / "x" / "model.json").read_text())["which"] == "last"


def test_a_run_whose_nodes_keep_part_of_the_model_is_not_exported(tmp_path: Path) -> None:
    plan = Plan.from_dict({**TINY, "algorithm": "fedbn"})
    store = RunStore(tmp_path / "run")
    from fedseg.protocol.rounds import initial_arrays
    from fedseg.protocol.run_store import RunState

    store.save(RunState("r1", 0, plan.to_dict(), []), initial_arrays(plan))
    with pytest.raises(ProtocolError, match="trained with fedbn: every node keeps its own norm part"):
        export_run(tmp_path / "run", "last", tmp_path / "out")
    with pytest.raises(ProtocolError, match="best.npz cannot be read"):
        export_run(tmp_path / "run", "best", tmp_path / "out")
    assert not (tmp_path / "out").exists()
