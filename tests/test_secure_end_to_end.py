"""End to end: ``fedseg run --secure-aggregation`` over real Syft node processes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import TINY_PLAN_ARGS, fedseg


def test_secure_run_equals_the_plain_run_and_sends_no_update(federation, tmp_path: Path) -> None:
    from fedseg.protocol.audit.verify import read_log
    from fedseg.protocol.run_store import RunStore

    invites = [arg for node in federation.values() for arg in ("--invite", str(node.invite))]
    runs = {}
    for name, extra in (("plain", []), ("secure", ["--secure-aggregation"])):
        runs[name] = tmp_path / name
        result = fedseg("run", *invites, "--rounds", "1", "--out", str(runs[name]), *TINY_PLAN_ARGS, *extra)
        assert result.returncode == 0, result.stdout + result.stderr

    # Same seed, same nodes: the secure aggregate is the plain one up to fixed-point error.
    plain, secure = (RunStore(runs[n]).load()[1] for n in ("plain", "secure"))
    names = sorted(plain)
    a = np.concatenate([secure[k].ravel() for k in names]).astype(np.float64)
    b = np.concatenate([plain[k].ravel() for k in names]).astype(np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-6

    received = [e["schema"] for e in read_log(runs["secure"] / "audit.jsonl") if e["direction"] == "received"]
    kinds = {s["kind"] for s in received}
    assert {"secagg_train_reply", "secagg_mask_reply", "secagg_unmask_reply"} <= kinds and "train_reply" not in kinds
    assert {dtype for s in received for _, dtype, _ in s["tensors"]} == {"uint32"}
    rows = [json.loads(line) for line in (runs["secure"] / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows if r["round"] == 1 and "train_loss" in r} == set(federation)
