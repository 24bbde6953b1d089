"""``RUN/manifest.json``: the resolved plan, seed, versions, commit, and per node a hash of each split, never its names."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fedseg
from fedseg.node.actions import NodeRuntime, handle
from fedseg.protocol.manifest import MANIFEST_FILE
from fedseg.protocol.errors import MessageError
from fedseg.protocol.messages import DescribeReply, DescribeRequest, encode
from fedseg.protocol.rounds import run_federation

from engine_doubles import InMemoryTransport, Reporter, tiny_plan


def _split_hash(rt: NodeRuntime, split: str) -> str:
    # As README states it, so a researcher can check a node's data against a manifest.
    names = sorted(rt.index.image_paths[i].name for i in getattr(rt.splits, split))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def test_the_manifest_says_exactly_what_the_run_was(runtimes, tmp_path: Path, no_plots) -> None:
    plan = tiny_plan(rounds=1, seed=7)
    run_federation(plan, [InMemoryTransport(rt) for rt in runtimes.values()], tmp_path, Reporter())
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["plan"] == plan.to_dict() and manifest["seed"] == 7 and manifest["first_round"] == 0
    env = manifest["environment"]
    assert env["fedseg"] == fedseg.__version__ and torch.__version__.startswith(env["libraries"]["torch"])
    assert env["torch_cuda"] == torch.version.cuda
    assert set(env["libraries"]) >= {"torch", "numpy", "syft"} and all(env["libraries"].values())
    if (Path(fedseg.__file__).parents[1] / ".git").exists():
        assert len(env["git"]["commit"]) == 40 and isinstance(env["git"]["dirty"], bool)
    for name, rt in runtimes.items():
        node = manifest["nodes"][name]
        assert node["split_hashes"] == {s: _split_hash(rt, s) for s in ("train", "val", "test")}
        assert node["device"] == "cpu" and node["images"] == {"train": len(rt.splits.train), "val": len(rt.splits.val), "test": len(rt.splits.test)}
        # The hashes stand in for the names: none is in the manifest or in what the node sent.
        described = handle(rt, encode(DescribeRequest(run_id="r")))
        for path in rt.index.image_paths:
            assert path.name not in (tmp_path / MANIFEST_FILE).read_text() and path.name.encode() not in described


def test_a_resume_records_its_start_and_names_a_node_whose_splits_changed(runtimes, tmp_path: Path, no_plots) -> None:
    run_federation(tiny_plan(rounds=1), [InMemoryTransport(rt) for rt in runtimes.values()], tmp_path, Reporter())
    moved = dict(runtimes, **{"site-b": NodeRuntime(replace(runtimes["site-b"].config, split_seed=1))})
    reporter = Reporter()
    run_federation(tiny_plan(rounds=2), [InMemoryTransport(rt) for rt in moved.values()], tmp_path, reporter, resume=True)
    assert [line for line in reporter.infos if "split differs" in line] == [
        f"node site-b: its {split} split differs from the one this run started with" for split in ("train", "val", "test")]
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["first_round"] == 0 and [r["first_round"] for r in manifest["resumes"]] == [2]
    assert manifest["resumes"][0]["nodes"]["site-b"]["split_hashes"]["train"] == _split_hash(moved["site-b"], "train")
    assert manifest["nodes"]["site-b"]["split_hashes"]["train"] == _split_hash(runtimes["site-b"], "train")


def test_a_describe_reply_carries_hashes_only() -> None:
    reply = dict(node="a", label_kind="pixel", channels=3, image_size=32, n_train=1, n_val=1, n_test=1, can_score=True, fingerprint="f")
    assert encode(DescribeReply(**reply, split_hashes={"train": "0" * 64}))
    for bad in ({"train": "case_0001.png"}, {"holdout": "0" * 64}, {"val": "0" * 63}):
        with pytest.raises(MessageError, match="split_hashes must map splits"):
            encode(DescribeReply(**reply, split_hashes=bad))
