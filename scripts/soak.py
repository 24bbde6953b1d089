"""Soak test: many real nodes, many short rounds; memory and file descriptors must stay flat.

Starts N synthetic sites as real ``fedseg node start`` datasites, runs R short FedAvg rounds
over Syft with a tiny model, and after every round records the resident memory (RSS) and
open file descriptors of the coordinator (this process) and of each node's whole process
group (the node and the Syft server it starts). Passes when every round completes with
every node, RSS at the last round is within 10% of RSS at the reference round, and no
process holds more file descriptors than at the reference round (plus a small slack for
sockets in flight).

Writes ``<out>/soak.json`` (every sample) and ``<out>/soak.md``; exits 1 if a check fails.

    python scripts/soak.py                          # 8 nodes, 30 rounds (the issue's load test)
    python scripts/soak.py --nodes 3 --rounds 8     # a short run
    python scripts/soak.py --invite a/invite.json --invite b/invite.json --rounds 8
                                                    # nodes already serving (what the test suite does)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from benchlib import REPO, Reporter, commit_label, git_commit, machine_info, say, stop_nodes

RSS_TOLERANCE = 0.10
FD_SLACK = 4


def node_pid(invite: Path) -> int:
    """The ``fedseg node start`` process serving from the invite's workdir."""
    workdir = str(invite.resolve().parent)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "start" in cmd and "--workdir" in cmd and str(Path(cmd[cmd.index("--workdir") + 1]).resolve()) == workdir:
            return proc.pid
    raise SystemExit(f"error: no running node serves from {workdir}")


def group_usage(pid: int) -> tuple[int, int]:
    """RSS bytes and open file descriptors summed over the process group led by ``pid``."""
    rss = fds = 0
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == pid or os.getpgid(proc.pid) == pid:
                rss += proc.memory_info().rss
                fds += proc.num_fds()
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return rss, fds


class SamplingReporter(Reporter):
    """Records RSS and fds of the coordinator and every node after each round."""

    def __init__(self, label: str, rounds: int, pids: dict[str, int]) -> None:
        super().__init__(label, rounds)
        self.pids = pids
        self.samples: list[dict[str, Any]] = []
        self.sites_per_round: dict[int, set[str]] = {}

    def round_done(self, round_: int, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        super().round_done(round_, rows, summary)
        me = psutil.Process()
        sample: dict[str, Any] = {"round": round_, "coordinator": {"rss": me.memory_info().rss, "fds": me.num_fds()}}
        for name, pid in self.pids.items():
            rss, fds = group_usage(pid)
            sample[name] = {"rss": rss, "fds": fds}
        self.samples.append(sample)
        self.sites_per_round[round_] = {r["site"] for r in rows if "train_n" in r}


def verdict(samples: list[dict[str, Any]], reference: int, rounds: int, sites: dict[int, set[str]], names: list[str]) -> dict[str, Any]:
    at = {s["round"]: s for s in samples}
    ref, last = at[reference], at[rounds]
    checks: dict[str, Any] = {"rounds_complete": all(sites.get(r) == set(names) for r in range(1, rounds + 1))}
    procs = ["coordinator", *names]
    checks["rss"] = {p: last[p]["rss"] / ref[p]["rss"] for p in procs}
    checks["fds"] = {p: (ref[p]["fds"], last[p]["fds"]) for p in procs}
    checks["rss_pass"] = all(abs(v - 1) <= RSS_TOLERANCE for v in checks["rss"].values())
    checks["fds_pass"] = all(b <= a + FD_SLACK for a, b in checks["fds"].values())
    checks["pass"] = checks["rounds_complete"] and checks["rss_pass"] and checks["fds_pass"]
    return checks


def markdown(checks: dict[str, Any], config: dict[str, Any], commit: str, wall: float) -> str:
    ok = lambda b: "pass" if b else "FAIL"  # noqa: E731
    lines = [
        "# Soak test", "",
        f"Commit {commit}; {config['n_nodes']} nodes, {config['rounds']} rounds, images at 32 px, "
        f"U-Net width 4; RSS and file descriptors at round {config['reference']} against round {config['rounds']}; {wall / 60:.1f} min.", "",
        f"- every round completed with every node: **{ok(checks['rounds_complete'])}**",
        f"- RSS within ±{100 * RSS_TOLERANCE:.0f}%: **{ok(checks['rss_pass'])}**",
        f"- no file descriptors leaked (slack {FD_SLACK}): **{ok(checks['fds_pass'])}**", "",
        "| process | RSS last ÷ reference | fds reference → last |", "|---|---|---|",
    ]
    for proc, ratio in checks["rss"].items():
        a, b = checks["fds"][proc]
        lines.append(f"| {proc} | {ratio:.3f} | {a} → {b} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--reference", type=int, default=None, help="round whose RSS is the baseline (default: 5, or 2 for short runs)")
    p.add_argument("--images", type=int, default=24, help="synthetic images per site")
    p.add_argument("--invite", dest="invites", type=Path, action="append", default=[],
                   help="use nodes already serving (repeat); then --nodes and --images are ignored")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "soak")
    args = p.parse_args()
    args.reference = args.reference or (5 if args.rounds >= 10 else 2)
    if not 1 <= args.reference < args.rounds:
        p.error("--reference must be a round before the last")

    from fedseg.node.launcher import NodeProcess
    from fedseg.node.synthetic import DEFAULT_SITES, write_federation
    from fedseg.protocol.invite import load_invite
    from fedseg.protocol.plan import Plan
    from fedseg.protocol.rounds import run_federation
    from fedseg.protocol.syft_transport import SyftTransport

    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # The synthetic generator has a few site styles; more nodes reuse them with other seeds.
    sites = []
    for i in range(0 if args.invites else (args.nodes + len(DEFAULT_SITES) - 1) // len(DEFAULT_SITES)):
        sites += write_federation(out / "data" / f"batch{i}", n_per_site=args.images, size=32, seed=i)
    nodes: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        if args.invites:
            invites = {load_invite(path).node: path for path in args.invites}
            pids = {name: node_pid(path) for name, path in invites.items()}
        else:
            for i, site in enumerate(sites[: args.nodes]):
                nodes[f"node-{i:02d}"] = NodeProcess(f"node-{i:02d}", site, out / "nodes" / f"node-{i:02d}")
            invites = {name: node.wait_ready(300) for name, node in nodes.items()}
            pids = {name: node.process.pid for name, node in nodes.items()}
        say(f"{len(invites)} nodes serving")
        plan = Plan.from_dict({"rounds": args.rounds, "image_size": 32, "model": {"width": 4, "depth": 2, "groups": 2},
                               "train": {"batch_size": 8, "local_epochs": 1.0, "augment": False}, "timeout_s": 300.0})
        reporter = SamplingReporter("soak", args.rounds, pids)
        transports = [SyftTransport(load_invite(path), approval_timeout_s=300) for path in invites.values()]
        run_federation(plan, transports, out / "run", reporter, invites=[str(p) for p in invites.values()])
    finally:
        stop_nodes(nodes)
    wall = time.monotonic() - t0
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["n_nodes"] = len(invites)
    checks = verdict(reporter.samples, args.reference, args.rounds, reporter.sites_per_round, sorted(invites))
    commit = git_commit()
    (out / "soak.json").write_text(json.dumps({"config": config, "git": commit, "machine": machine_info(), "wall_seconds": wall,
                                               "checks": checks, "samples": reporter.samples}, indent=2, default=str))
    md = markdown(checks, config, commit_label(commit), wall)
    (out / "soak.md").write_text(md)
    print(md)
    return 0 if checks["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
