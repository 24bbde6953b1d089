"""Faults with real processes: a coordinator and a node killed with SIGKILL mid-round, a node restarted.

Nothing is lost: a resumed run ends with the very weights of an uninterrupted one, a run
goes on without a node that died (down to ``--min-nodes``) and says which one, and the
node, restarted on its workdir, rejoins with its identity, personal state and invite.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from conftest import TINY_PLAN_ARGS, fedseg
from fedseg.node.launcher import NodeProcess
from fedseg.node.synthetic import write_federation
from fedseg.protocol.invite import load_invite
from fedseg.protocol.plan import Plan
from fedseg.protocol.rounds import run_federation
from fedseg.protocol.run_store import RunStore
from fedseg.protocol.syft_transport import SyftTransport


def _invites(federation: dict[str, Any], names: tuple[str, ...] = ("site-a", "site-b", "site-c")) -> list[str]:
    return [arg for name in names for arg in ("--invite", str(federation[name].invite))]


def test_coordinator_killed_mid_round_resumes_to_the_weights_of_an_uninterrupted_run(federation, tmp_path):
    args = [*_invites(federation), "--rounds", "3", *TINY_PLAN_ARGS]
    reference = fedseg("run", *args, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stdout + reference.stderr

    out = tmp_path / "killed"
    coordinator = subprocess.Popen([sys.executable, "-m", "fedseg", "run", *args, "--out", str(out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # Kill as soon as round 1 is checkpointed: round 2 is then in flight on the nodes.
    while not (out / "checkpoint.npz").exists() or RunStore(out).load()[0].round < 1:
        assert coordinator.poll() is None and time.monotonic() < deadline, "the run ended or stalled before round 1"
        time.sleep(0.2)
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait(10)
    assert RunStore(out).load()[0].round < 3
    # Whatever the kill interrupted, no file is half written: the checkpoint and metrics read back whole.
    assert not list(out.glob("*.tmp*"))

    resumed = fedseg("run", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming run" in resumed.stdout
    state, weights = RunStore(out).load()
    ref_state, ref_weights = RunStore(tmp_path / "reference").load()
    assert state.round == ref_state.round == 3
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        np.testing.assert_array_equal(weights[name], ref_weights[name], err_msg=name)
    rounds = sorted({row["round"] for row in RunStore(out).read_metrics()})
    assert rounds == [0, 1, 2, 3]


class _Reporter:
    def __init__(self, on_step: Any = None, on_round: Any = None) -> None:
        self.lines: list[str] = []
        self.on_step, self.on_round = on_step, on_round

    def info(self, text: str) -> None:
        self.lines.append(text)

    def step(self, text: str) -> None:
        if self.on_step:
            self.on_step(text)

    def round_done(self, round_: int, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        if self.on_round:
            self.on_round(round_)


def test_node_killed_mid_round_is_left_out_and_rejoins_after_a_restart(federation, tmp_path):
    site = write_federation(tmp_path / "data", n_per_site=30, size=32, seed=7)[0]
    workdir = tmp_path / "site-k"
    node = NodeProcess("site-k", site, workdir)
    node.wait_ready()
    invite_before = node.invite.read_bytes()
    fingerprint = load_invite(node.invite).fingerprint
    plan = Plan.from_dict({"algorithm": "fedbn", "rounds": 3, "image_size": 32, "seed": 0, "timeout_s": 120.0, "min_nodes": 2,
                           "model": {"width": 8, "depth": 2, "groups": 8}, "train": {"batch_size": 8, "local_epochs": 2.0, "lr": 0.003}})
    killed = threading.Event()
    restarted: dict[str, NodeProcess] = {}

    def kill_mid_round(text: str) -> None:
        # Round 2 has just been sent out: the node dies while it works on it.
        if text.startswith("round 2: training") and not killed.is_set():
            killed.set()
            threading.Timer(0.3, lambda: os.killpg(node.process.pid, signal.SIGKILL)).start()

    def restart_between_rounds(round_: int) -> None:
        # Round 1's rows are recorded once round 2 has trained (its scoring rides on round 2's
        # request): this is the moment between rounds 2 and 3.
        if round_ == 1:
            node.process.wait(30)
            assert list((workdir / "personal").glob("*.local.npz")), "the node's personal state did not survive the kill"
            restarted["node"] = NodeProcess("site-k", site, workdir, port=node.port)
            restarted["node"].wait_ready()

    reporter = _Reporter(kill_mid_round, restart_between_rounds)
    transports = [SyftTransport(load_invite(p), approval_timeout_s=120)
                  for p in (federation["site-a"].invite, federation["site-b"].invite, node.invite)]
    try:
        rows = run_federation(plan, transports, tmp_path / "run", reporter)
    finally:
        for process in (node, restarted.get("node")):
            if process is not None:
                process.stop()
    trained = {r["round"]: {row["site"] for row in rows if row["round"] == r["round"] and "train_n" in row} for r in rows}
    assert trained[1] == {"site-a", "site-b", "site-k"}
    assert trained[2] == {"site-a", "site-b"}
    assert trained[3] == {"site-a", "site-b", "site-k"}, reporter.lines
    gone = [line for line in reporter.lines if "site-k" in line and "left out of training" in line]
    assert gone and "round 2" in gone[0], reporter.lines
    # Same identity, same credentials: the coordinator reconnected with the invite it had.
    assert node.invite.read_bytes() == invite_before and load_invite(node.invite).fingerprint == fingerprint
