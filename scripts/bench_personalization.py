"""Benchmark personalized federated segmentation on the three polyp sites: LC-Fed against
Local, FedAvg, FT, FedBN and FedRep, with LC-Fed's ablations.

The sites (Kvasir-SEG, CVC-ClinicDB, CVC-ColonDB, seeded random subsets) run as real
``fedseg node start`` datasites, started once and shared by every method and seed. Every
method goes through the same :func:`run_federation` with the same rounds, local epochs and
learning rate, so Local trains for the same number of steps as the federated methods.

Which model is scored per method: the global model (FedAvg), the node's own model
(Local, FedBN, FedRep: their local part is part of it), the fine-tuned copy (FT) and the
calibrated model (LC-Fed, after its calibration stage). The round is chosen on validation
Dice, image-weighted over sites (LC-Fed's calibrated model exists at its calibration round
only). Ablations: "LC-Fed PCS only" is LC-Fed's stage-1 model from the same runs (no HC),
"LC-Fed HC only" has no PCS, and "LC-Fed α=0" switches the contrastive loss off.

Writes ``<out>/bench_personalization.json`` (config, commit, machine, every metrics row),
``<out>/bench_personalization.md`` (per-site test IoU, Dice and ASSD as mean ± std over
seeds, and the goals) and ``<out>/iou_per_site.png``.

    python scripts/bench_personalization.py --rounds 2 --limit 40 --seeds 1   # smoke run
    python scripts/bench_personalization.py                                   # default budget (< 60 min on 2 CPUs)
    python scripts/bench_personalization.py --full                            # more images, pixels and rounds
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchlib import (
    REPO, Site, budget_parser, check_budget, commit_label, git_commit, machine_info, mean_std, require_data, run_plan, say, start_bench,
    start_nodes, stop_nodes, with_budget, write_results,
)

SITES = [Site("Kvasir-SEG", "polyp/Kvasir-SEG"), Site("CVC-ClinicDB", "polyp/CVC-ClinicDB"), Site("CVC-ColonDB", "polyp/CVC-ColonDB")]
# method -> (plan overrides, prefix of the figures that method is scored by)
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "LC-Fed": ({"algorithm": "lcfed"}, "personal_"),
    "FedAvg": ({"algorithm": "fedavg"}, ""),
    "Local": ({"algorithm": "local"}, ""),
    "FT": ({"algorithm": "ft"}, "personal_"),
    "FedBN": ({"algorithm": "fedbn"}, ""),
    "FedRep": ({"algorithm": "fedrep"}, ""),
    "LC-Fed HC only": ({"algorithm": "lcfed", "lcfed": {"pcs": False}}, "personal_"),
    "LC-Fed α=0": ({"algorithm": "lcfed", "lcfed": {"alpha": 0.0}}, "personal_"),
}
#: Read off the LC-Fed runs, no run of its own: the stage-1 model before calibration.
PCS_ONLY = "LC-Fed PCS only"
BASELINES = ("FedAvg", "Local", "FT", "FedBN", "FedRep")
GOAL_IOU_OVER_FEDAVG = 0.03

DEFAULTS = {"rounds": 10, "limit": 200, "seeds": 2, "image_size": 64, "width": 16, "depth": 3}
FULL = {"rounds": 40, "limit": 0, "seeds": 3, "image_size": 128, "width": 16, "depth": 4}


def make_plan(args: argparse.Namespace, method: str, seed: int) -> Any:
    from fedseg.protocol.plan import Plan

    d: dict[str, Any] = {
        "rounds": args.rounds, "image_size": args.image_size, "seed": seed,
        "model": {"width": args.width, "depth": args.depth, "groups": min(8, max(1, args.width // 2)), "in_channels": 3},
        "train": {"lr": args.lr, "batch_size": args.batch_size, "local_epochs": 1.0, "threads": args.threads},
        "lcfed": {"hc_epochs": args.hc_epochs},
        "personal": {"finetune_epochs": 1.0},
        "timeout_s": 1800.0,
    }
    for key, value in METHODS[method][0].items():
        d[key] = {**d[key], **value} if isinstance(value, dict) else value
    return Plan.from_dict(d)


def scored(rows: list[dict[str, Any]], prefix: str) -> tuple[int, dict[str, dict[str, float]]]:
    """The round with the best image-weighted validation Dice of the ``prefix`` model, and its
    per-site test figures."""
    key = f"{prefix}val_dice"
    rounds: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if key in r:
            rounds.setdefault(r["round"], []).append(r)

    def weighted(rs: list[dict[str, Any]]) -> float:
        return sum(r[key] * r[f"{prefix}val_n"] for r in rs) / sum(r[f"{prefix}val_n"] for r in rs)

    best = max(rounds, key=lambda rnd: (weighted(rounds[rnd]), -rnd))
    return best, {r["site"]: {m: r[f"{prefix}test_{m}"] for m in ("iou", "dice", "assd")} for r in rounds[best]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    sites = [s.name for s in SITES]
    methods: dict[str, Any] = {}
    views = [(m, m, METHODS[m][1]) for m in METHODS] + [(PCS_ONLY, "LC-Fed", "")]
    for name, method, prefix in views:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        per_seed = []
        for run in mine:
            best, at = scored(run["rows"], prefix)
            per_seed.append({"seed": run["seed"], "round": best, "sites": at,
                             **{f"mean_{m}": statistics.fmean(at[s][m] for s in sites) for m in ("iou", "dice", "assd")}})
        methods[name] = {
            "per_seed": per_seed,
            "sites": {s: {m: mean_std([p["sites"][s][m] for p in per_seed]) for m in ("iou", "dice", "assd")} for s in sites},
            **{f"mean_{m}": mean_std([p[f"mean_{m}"] for p in per_seed]) for m in ("iou", "dice", "assd")},
        }
    goals: dict[str, Any] = {}
    if "LC-Fed" in methods and all(b in methods for b in BASELINES):
        lc = methods["LC-Fed"]
        iou = {m: methods[m]["mean_iou"][0] for m in ("LC-Fed", *BASELINES)}
        assd = {m: methods[m]["mean_assd"][0] for m in ("LC-Fed", *BASELINES)}
        goals = {
            "iou_over_fedavg": lc["mean_iou"][0] - iou["FedAvg"],
            "iou_over_fedavg_pass": lc["mean_iou"][0] - iou["FedAvg"] >= GOAL_IOU_OVER_FEDAVG,
            "best_personalized_baseline": max((m for m in BASELINES if m != "FedAvg"), key=iou.get),
            "beats_every_baseline": all(iou["LC-Fed"] > iou[m] for m in BASELINES),
            "lowest_assd": min(assd, key=assd.get),
            "lowest_assd_pass": min(assd, key=assd.get) == "LC-Fed",
        }
    return {"methods": methods, "goals": goals}


def plot(res: dict[str, Any], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [s.name for s in SITES]
    names = list(res["methods"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        m = res["methods"][name]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(sites) + 1)]
        vals = [100 * m["sites"][s]["iou"][0] for s in sites] + [100 * m["mean_iou"][0]]
        errs = [100 * m["sites"][s]["iou"][1] for s in sites] + [100 * m["mean_iou"][1]]
        ax.bar(xs, vals, width, yerr=errs, capsize=2, label=name)
    ax.set_xticks(range(len(sites) + 1), [*sites, "mean"])
    ax.set(ylabel="test IoU (%)", title="Polyp: test IoU per site and method (mean ± std over seeds)", ylim=(0, 100))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "iou_per_site.png", dpi=110)
    plt.close(fig)
    return "iou_per_site.png"


def markdown(res: dict[str, Any], config: dict[str, Any], commit: str, wall_s: float) -> str:
    sites = [s.name for s in SITES]
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    px = lambda ms: f"{ms[0]:.1f} ± {ms[1]:.1f}"  # noqa: E731
    lines = [
        "# Personalized federated segmentation: LC-Fed and its baselines (polyp, three sites)", "",
        f"Commit {commit}; {config['rounds']} rounds, {config['seeds']} seed(s), up to {config['limit'] or 'all'} images per site, "
        f"{config['image_size']} px, U-Net width {config['width']} depth {config['depth']}, lr {config['lr']}, batch {config['batch_size']}, "
        f"1 local epoch per round, LC-Fed HC {config['hc_epochs']} epochs; {wall_s / 60:.1f} min in all on real Syft nodes.", "",
        "Test figures per site at the round with the best image-weighted validation Dice of the scored model, mean ± std over seeds. "
        "IoU and Dice count the foreground only, per image, then per site; ASSD is in pixels at the benchmark's image size "
        "(a lesion missed entirely counts as the image diagonal). Means are unweighted over sites.", "",
    ]
    for metric, title, fmt in (("iou", "IoU (%)", pct), ("dice", "Dice (%)", pct), ("assd", "ASSD (px, lower is better)", px)):
        lines += [f"## Test {title}", "", "| method | " + " | ".join(sites) + " | mean | rounds |", "|---|" + "---|" * (len(sites) + 2)]
        for name, m in res["methods"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(m["sites"][s][metric]) for s in sites)
                         + f" | **{fmt(m[f'mean_{metric}'])}** | {', '.join(str(p['round']) for p in m['per_seed'])} |")
        lines.append("")
    g = res["goals"]
    if g:
        lines += [
            "## Goals", "",
            f"- LC-Fed mean IoU − FedAvg: {100 * g['iou_over_fedavg']:+.1f} points (goal ≥ +{100 * GOAL_IOU_OVER_FEDAVG:.0f}): "
            f"**{'pass' if g['iou_over_fedavg_pass'] else 'FAIL'}**",
            f"- LC-Fed above every baseline in mean IoU (best personalized baseline: {g['best_personalized_baseline']}): "
            f"**{'pass' if g['beats_every_baseline'] else 'FAIL'}**",
            f"- Lowest mean ASSD: {g['lowest_assd']}: **{'pass' if g['lowest_assd_pass'] else 'FAIL'}**", "",
        ]
    lines += [
        "Anchor: the LC-Fed paper's polyp table (384 px, four sites, 300 rounds): LC-Fed 75.6 IoU, FedAvg 69.6, FedRep 71.7, "
        "FT 70.8, FedBN 55.4, Local 51.2. This benchmark is smaller (three sites, fewer images and pixels, fewer rounds), "
        "so compare differences, not levels.", "",
        "Plot: `iou_per_site.png`.", "",
    ]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = budget_parser(__doc__.split("\n\n")[0], DEFAULTS, FULL)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--hc-epochs", type=float, default=5.0, help="LC-Fed: local epochs of HC training")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_personalization")
    args = with_budget(p.parse_args(), FULL, DEFAULTS)
    args.methods = [m for m in args.methods.split(",") if m]
    if bad := [m for m in args.methods if m not in METHODS]:
        p.error(f"unknown method: {bad}")
    check_budget(p, args)
    require_data(p, args.data, [s.folder for s in SITES])
    return args


def main() -> None:
    args = parse_args()
    out, config = start_bench(args)
    commit, machine = git_commit(), machine_info()
    n_runs = len(args.methods) * args.seeds
    say(f"{n_runs} runs: methods {args.methods}, {args.seeds} seed(s), {args.rounds} rounds, "
        f"{args.limit or 'all'} images/site, {args.image_size} px, width {args.width}, depth {args.depth}")
    t_start = time.monotonic()
    runs: list[dict[str, Any]] = []
    nodes: dict[str, Any] = {}
    try:
        invites, subsets = start_nodes(SITES, args.data, out, args.limit, args.split_seed, nodes)
        for method in args.methods:
            for seed in range(args.seeds):
                run = run_plan(make_plan(args, method, seed), invites, out / "runs" / method.replace(" ", "_") / f"seed{seed}",
                               f"{method} seed {seed}")
                runs.append({"method": method, "seed": seed, **run})
                done = time.monotonic() - t_start
                say(f"{method} seed {seed}: done in {run['seconds']:.0f} s; ~{done / len(runs) * (n_runs - len(runs)) / 60:.0f} min to go")
    finally:
        stop_nodes(nodes)
    wall = time.monotonic() - t_start
    machine["loadavg_end"] = os.getloadavg()[0]
    res = summarize(runs)
    png = plot(res, out)
    md = markdown(res, config, commit_label(commit), wall)
    record = {"config": config, "git": commit, "machine": machine, "wall_seconds": wall, "subsets": subsets,
              "results": res, "plot": png, "runs": runs}
    write_results(out, "bench_personalization", record, md, [png], wall)


if __name__ == "__main__":
    main()
