"""Is the demo's training stable? Its plan and variants on its synthetic sites, several seeds.

Runs the round engine and the nodes' own whitelist in one process (no Syft: the demo's
Syft overhead is not in question here, its learning curve is), with exactly the demo's
data (``write_federation``) and plan (``fedseg.demo.demo_plan``), and variants of that
plan side by side. Per run it records every site's validation Dice per round and reports:
the largest fall of one site's validation Dice from one round to the next, how far the
last round's mean test Dice is below the best round's, and CPU seconds.

    python scripts/bench_demo.py                       # all variants, seeds 0-2
    python scripts/bench_demo.py --variants lr3e-3 lr1e-3 --seeds 0
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import REPO, InProcessTransport, commit_label, git_commit, machine_info, say, write_results

#: Variant name -> changes to the demo's plan (section -> key -> value) and images per site.
VARIANTS: dict[str, dict[str, Any]] = {
    "lr3e-3": {"train": {"lr": 3e-3}},  # the demo's plan until this benchmark
    "lr1e-3": {"train": {"lr": 1e-3}},
    "lr1e-3-90img": {"train": {"lr": 1e-3}, "images": 90},
    "batchnorm-lr3e-3": {"model": {"norm": "batch"}, "train": {"lr": 3e-3}},
}
GOAL_MAX_FALL = 0.15  # a site's validation Dice never falls by more than this between rounds
IMAGES = 60


class _Quiet:
    def info(self, text: str) -> None:
        pass

    def step(self, text: str) -> None:
        pass

    def round_done(self, round_: int, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        pass


def run_variant(name: str, seed: int, rounds: int, root: Path) -> dict[str, Any]:
    import torch

    from fedseg.demo import DEMO_IMAGE_SIZE, demo_plan
    from fedseg.node.actions import NodeRuntime
    from fedseg.node.config import NodeConfig
    from fedseg.node.synthetic import write_federation
    from fedseg.protocol.plan import Plan
    from fedseg.protocol.rounds import run_federation

    torch.set_num_threads(1)
    change = VARIANTS[name]
    plan_dict = copy.deepcopy(demo_plan(rounds, seed))
    plan_dict["overlays"] = 0
    for section, values in change.items():
        if isinstance(values, dict):
            plan_dict.setdefault(section, {}).update(values)
    images = change.get("images", IMAGES)
    work = root / f"{name}-{seed}"
    sites = write_federation(work / "data", n_per_site=images, size=DEMO_IMAGE_SIZE, seed=seed)
    runtimes = [NodeRuntime(NodeConfig(name=s.name, data=str(s), labels="pixel", workdir=str(work / "nodes" / s.name))) for s in sites]
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    rows = run_federation(Plan.from_dict(plan_dict), [InProcessTransport(rt) for rt in runtimes], work / "run", _Quiet(), channels_from_nodes=True)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    val = {s.name: [r["val_dice"] for r in sorted(rows, key=lambda r: r["round"]) if r["site"] == s.name] for s in sites}
    test = [statistics.mean(r["test_dice"] for r in rows if r["round"] == k) for k in range(rounds + 1)]
    fall = max(max(0.0, v[i] - v[i + 1]) for v in val.values() for i in range(1, len(v) - 1))
    return {"variant": name, "seed": seed, "images_per_site": images, "plan": plan_dict, "val_dice": val, "mean_test_dice": test,
            "max_val_fall": fall, "last_below_best": max(test[1:]) - test[-1], "last_test_dice": test[-1],
            "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, "wall_s": time.monotonic() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=6, help="the demo's default")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_demo")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0, runs = time.monotonic(), []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # seeds outermost: the variants of one seed run side by side
            for name in args.variants:
                run = run_variant(name, seed, args.rounds, Path(tmp))
                runs.append(run)
                say(f"{name} seed {seed}: test Dice per round {[round(x, 3) for x in run['mean_test_dice']]}, "
                    f"largest val fall {run['max_val_fall']:.3f}, {run['cpu_s']:.0f} CPU s")
    summary = {}
    for name in args.variants:
        mine = [r for r in runs if r["variant"] == name]
        summary[name] = {k: statistics.mean(r[k] for r in mine) for k in ("last_test_dice", "last_below_best", "cpu_s")}
        summary[name]["max_val_fall"] = max(r["max_val_fall"] for r in mine)
    commit = git_commit()
    record = {"commit": commit, "machine": machine_info(), "rounds": args.rounds, "seeds": args.seeds, "runs": runs, "summary": summary,
              "goals": {f"max_val_fall[{n}]": {"measured": s["max_val_fall"], "target": GOAL_MAX_FALL, "met": s["max_val_fall"] <= GOAL_MAX_FALL}
                        for n, s in summary.items()}}
    md = [f"# Demo training stability ({commit_label(commit)}), {args.rounds} rounds, seeds {args.seeds}", "",
          "| variant | last-round test Dice (mean) | last below best (mean) | largest val Dice fall, any site/seed | CPU s per run |",
          "|---|---|---|---|---|"]
    md += [f"| {n} | {s['last_test_dice']:.3f} | {s['last_below_best']:.3f} | {s['max_val_fall']:.3f} | {s['cpu_s']:.0f} |" for n, s in summary.items()]
    write_results(args.out, "bench_demo", record, "\n".join(md) + "\n", [], time.monotonic() - t0)


if __name__ == "__main__":
    main()
