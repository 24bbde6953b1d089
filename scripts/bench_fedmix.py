"""Benchmark FedMix on mixed supervision: FedAvg-pixel, FedMix, FedMix without adaptive weights, FedAvg-full.

Two tasks, each with three real ``fedseg node start`` datasites holding pixel, box and
image-level labels (the weak labels derived from the masks, as the FedMix paper does):

- breast-mixed: BUS-BRA "GE Logiq 5" (pixel), BUS-BRA "GE Logiq 7" (box), BUSI (image-level,
  including its normal images); grayscale.
- polyp-mixed: Kvasir-SEG (pixel), CVC-ClinicDB (box), CVC-ColonDB (box); RGB.

The nodes of a task start once and serve every method and seed (the plan's seed changes
the initial weights and the shuffling; each node's split stays fixed). Each run goes
through the same :func:`run_federation`; the model is selected on validation Dice
(:func:`best_round`) and scored on test. Writes ``<out>/bench_fedmix.json`` (config, git
commit, machine, every metrics row), ``<out>/bench_fedmix.md`` (per-site test Dice, mean ±
std over seeds, and the goals), ``<out>/dice_<task>.png``, ``<out>/pseudo_<task>.png`` and
the run directories ``<out>/runs/<task>/<method>/seed<k>``.

    python scripts/bench_fedmix.py --rounds 2 --limit 40 --seeds 1 --tasks polyp   # smoke run
    python scripts/bench_fedmix.py                                                # default budget (< 60 min on 2 CPUs)
    python scripts/bench_fedmix.py --full                                         # more images and rounds
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

GOAL_GAIN = 0.05  # FedMix mean Dice - FedAvg-pixel mean Dice, at least
GOAL_GAP_CLOSED = 0.60  # (FedMix - FedAvg-pixel) / (FedAvg-full - FedAvg-pixel), at least

# site name, data folder (under DATA), labels, meta.csv filter (column, prefix) or None
TASKS: dict[str, dict[str, Any]] = {
    "breast": {
        "title": "breast-mixed",
        "in_channels": 1,
        "sites": [
            ("BUSBRA-Logiq5", "breast/BUS-BRA", "pixel", ("device", "GE Logiq 5")),
            ("BUSBRA-Logiq7", "breast/BUS-BRA", "box", ("device", "GE Logiq 7")),
            ("BUSI", "breast/BUSI", "image", None),
        ],
    },
    "polyp": {
        "title": "polyp-mixed",
        "in_channels": 3,
        "sites": [
            ("Kvasir-SEG", "polyp/Kvasir-SEG", "pixel", None),
            ("CVC-ClinicDB", "polyp/CVC-ClinicDB", "box", None),
            ("CVC-ColonDB", "polyp/CVC-ColonDB", "box", None),
        ],
    },
}
LABEL_ARGS = {"pixel": ["--labels", "pixel"], "box": ["--labels", "box", "--boxes-from-masks"],
              "image": ["--labels", "image", "--image-labels-from-masks"]}

# method name -> plan overrides; all four run through the same run_federation
METHODS: dict[str, dict[str, Any]] = {
    "FedAvg-pixel": {"algorithm": "fedavg"},
    "FedMix": {"algorithm": "fedmix"},
    "FedMix-noadapt": {"algorithm": "fedmix", "fedmix": {"adaptive": False}},
    "FedAvg-full": {"algorithm": "fedavg", "full_masks": True},
}
ORDER = ("FedMix", "FedAvg-pixel", "FedMix-noadapt", "FedAvg-full")  # FedMix first: it calibrates the time estimate

DEFAULTS = {"rounds": 10, "limit": 160, "seeds": 2, "image_size": 64, "width": 8, "depth": 3}
FULL = {"rounds": 30, "limit": 400, "seeds": 3, "image_size": 128, "width": 16, "depth": 4}


def make_plan(args: argparse.Namespace, task: str, method: str, seed: int) -> Any:
    from fedseg.protocol.plan import Plan

    d = {
        "algorithm": "fedavg", "rounds": args.rounds, "image_size": args.image_size, "seed": seed,
        "model": {"width": args.width, "depth": args.depth, "groups": min(8, max(1, args.width // 2)), "in_channels": TASKS[task]["in_channels"]},
        "train": {"lr": args.lr, "batch_size": args.batch_size, "local_epochs": 1.0, "threads": args.threads},
        "fedmix": {"tau": args.tau},
        "timeout_s": 1800.0,
    }
    for key, value in METHODS[method].items():
        d[key] = {**d[key], **value} if isinstance(value, dict) else value
    return Plan.from_dict(d)


def run_one(args: argparse.Namespace, task: str, method: str, seed: int, invites: dict[str, Path], out: Path) -> dict[str, Any]:
    plan = make_plan(args, task, method, seed)
    run = run_plan(plan, invites, out / "runs" / task / method / f"seed{seed}", f"{task} {method} seed {seed}")
    return {"task": task, "method": method, "seed": seed, **run}


# -------------------------------------------------------------------------- results


def summarize(runs: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Per task and method: per-site test Dice at the best-validation round, mean ± std over seeds, and the goals."""
    from fedseg.protocol.report import best_round

    res: dict[str, Any] = {}
    for task in tasks:
        sites = [s[0] for s in TASKS[task]["sites"]]
        methods: dict[str, Any] = {}
        for method in METHODS:
            mine = [r for r in runs if r["task"] == task and r["method"] == method]
            if not mine:
                continue
            per_seed = []
            for run in mine:
                best = best_round(run["rows"])
                at = {r["site"]: r for r in run["rows"] if r["round"] == best and "test_dice" in r}
                per_seed.append({"seed": run["seed"], "best_round": best, "test_dice": {s: at[s]["test_dice"] for s in sites},
                                 "mean_test_dice": statistics.fmean(at[s]["test_dice"] for s in sites)})
            methods[method] = {
                "per_seed": per_seed,
                "site_test_dice": {s: mean_std([p["test_dice"][s] for p in per_seed]) for s in sites},
                "mean_test_dice": mean_std([p["mean_test_dice"] for p in per_seed]),
            }
        goals = {}
        if all(m in methods for m in ("FedAvg-pixel", "FedMix", "FedAvg-full")):
            pix, mix, full = (methods[m]["mean_test_dice"][0] for m in ("FedAvg-pixel", "FedMix", "FedAvg-full"))
            gap = full - pix
            closed = (mix - pix) / gap if gap > 0 else float("nan")
            goals = {"gain": mix - pix, "gain_pass": mix - pix >= GOAL_GAIN, "gap": gap, "gap_closed": closed,
                     "gap_pass": gap > 0 and closed >= GOAL_GAP_CLOSED}
        res[task] = {"methods": methods, "goals": goals}
    return res


def curves(runs: list[dict[str, Any]], task: str, method: str, key: str, site: str | None = None) -> tuple[list[int], list[float], list[float]]:
    """Per round, mean ± std over seeds of ``key`` (averaged over scored sites, or at ``site``)."""
    per_round: dict[int, list[float]] = {}
    for run in (r for r in runs if r["task"] == task and r["method"] == method):
        by_round: dict[int, list[float]] = {}
        for row in run["rows"]:
            if key in row and (site is None or row["site"] == site):
                by_round.setdefault(row["round"], []).append(row[key])
        for rnd, vals in by_round.items():
            per_round.setdefault(rnd, []).append(statistics.fmean(vals))
    rounds = sorted(per_round)
    stats = [mean_std(per_round[r]) for r in rounds]
    return rounds, [m for m, _ in stats], [s for _, s in stats]


def plot(runs: list[dict[str, Any]], task: str, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = TASKS[task]["title"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        x, m, s = curves(runs, task, method, "val_dice")
        if x:
            ax.plot(x, m, marker="o", markersize=3, label=method)
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15)
    ax.set(title=f"{title}: validation Dice (mean over sites, ± std over seeds)", xlabel="round", ylabel="val Dice", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"dice_{task}.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    weak = [name for name, _, labels, _ in TASKS[task]["sites"] if labels != "pixel"]
    for method, style in (("FedMix", "-"), ("FedMix-noadapt", "--")):
        for site in weak:
            x, m, _ = curves(runs, task, method, "pseudo_share", site)
            if x:
                ax.plot(x, m, style, marker="o", markersize=3, label=f"{site} ({method})")
    ax.set(title=f"{title}: accepted pseudo-label share (mean over seeds)", xlabel="round", ylabel="accepted / candidates", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"pseudo_{task}.png", dpi=110)
    plt.close(fig)
    return [f"dice_{task}.png", f"pseudo_{task}.png"]


def markdown(res: dict[str, Any], runs: list[dict[str, Any]], config: dict[str, Any], commit: str, wall_s: float, budget_note: str) -> str:
    fmt = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    lines = ["# FedMix benchmark: mixed supervision (pixel, box, image-level)", ""]
    if budget_note:
        lines += [f"**{budget_note}**", ""]
    lines += [
        f"Commit {commit}; {config['rounds']} rounds, {config['seeds']} seed(s), up to {config['limit']} images per site, "
        f"{config['image_size']} px, U-Net width {config['width']} depth {config['depth']}, lr {config['lr']}, batch {config['batch_size']}, "
        f"τ {config['tau']}, {config['threads']} thread(s) per node; {wall_s / 60:.1f} min in all.",
        "",
        "Test Dice (%) per site at the round with the best image-weighted validation Dice, mean ± std over seeds. "
        "Dice counts the foreground only, per image, then per site; the last column is the unweighted mean over sites.",
        "",
    ]
    for task, r in res.items():
        sites = [s[0] for s in TASKS[task]["sites"]]
        kinds = {s[0]: s[2] for s in TASKS[task]["sites"]}
        lines += [f"## {TASKS[task]['title']}", "",
                  "| method | " + " | ".join(f"{s} ({kinds[s]})" for s in sites) + " | mean over sites | best rounds |",
                  "|---|" + "---|" * (len(sites) + 2)]
        for method, m in r["methods"].items():
            lines.append(f"| {method} | " + " | ".join(fmt(m["site_test_dice"][s]) for s in sites)
                         + f" | **{fmt(m['mean_test_dice'])}** | {', '.join(str(p['best_round']) for p in m['per_seed'])} |")
        g = r["goals"]
        if g:
            lines += ["",
                      f"- FedMix − FedAvg-pixel: {100 * g['gain']:+.1f} points (goal ≥ {100 * GOAL_GAIN:.0f}): **{'pass' if g['gain_pass'] else 'FAIL'}**",
                      f"- Gap FedAvg-full − FedAvg-pixel: {100 * g['gap']:.1f} points; FedMix closes {100 * g['gap_closed']:.0f}% of it "
                      f"(goal ≥ {100 * GOAL_GAP_CLOSED:.0f}%): **{'pass' if g['gap_pass'] else 'FAIL'}**"]
        shares = []
        for site in sites:
            x, m, _ = curves(runs, task, "FedMix", "pseudo_share", site)
            if x:
                shares.append(f"{site} {', '.join(f'{v:.2f}' for v in m)}")
        if shares:
            lines += [f"- FedMix accepted pseudo-label share per round (mean over seeds): {'; '.join(shares)}"]
        lines += ["", f"Curves: `dice_{task}.png`; pseudo-label share: `pseudo_{task}.png`.", ""]
    lines += [
        "## Method",
        "",
        "- Each task's three sites run as real `fedseg node start` datasites, started once and shared by every method and seed; "
        "the plan's seed changes the initial weights and the shuffling, the node splits (`--split-seed`) stay fixed.",
        "- Each site is a seeded random subset (symlinks, `<out>/<task>/data`) of at most `limit` images, because `--limit` keeps the "
        "first N sorted names (BUSI: benign only). Box and image-level labels are derived from the masks on the node.",
        "- FedAvg-pixel: only the pixel node trains; FedAvg-full: every node trains on its masks (upper bound); FedMix-noadapt: "
        "FedMix with plain n_k weights. All four use the same `run_federation`; every node is scored on val and test each round.",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = budget_parser(__doc__.split("\n\n")[0], DEFAULTS, FULL)
    p.add_argument("--tasks", default="breast,polyp", help="comma-separated: " + ", ".join(TASKS))
    p.add_argument("--methods", default=",".join(ORDER), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--tau", type=float, default=0.9, help="FedMix pseudo-label agreement threshold")
    p.add_argument("--budget-note", default="", help="a line printed at the top of the Markdown (e.g. 'reduced budget')")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_fedmix")
    args = with_budget(p.parse_args(), FULL, DEFAULTS)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    if bad := [t for t in args.tasks if t not in TASKS] + [m for m in args.methods if m not in METHODS]:
        p.error(f"unknown task or method: {bad}")
    check_budget(p, args)
    require_data(p, args.data, [f for t in args.tasks for _, f, _, _ in TASKS[t]["sites"]])
    return args


def main() -> None:
    args = parse_args()
    out, config = start_bench(args, clear=("runs", *TASKS))
    commit, machine = git_commit(), machine_info()
    order = [m for m in ORDER if m in args.methods]
    n_runs = len(args.tasks) * len(order) * args.seeds
    say(f"{n_runs} runs: tasks {args.tasks}, methods {order}, {args.seeds} seed(s), {args.rounds} rounds, "
        f"{args.limit or 'all'} images/site, {args.image_size} px, width {args.width}, depth {args.depth}")

    t_start = time.monotonic()
    runs: list[dict[str, Any]] = []
    subsets: dict[str, Any] = {}
    nodes: dict[str, Any] = {}
    try:
        for task in args.tasks:
            sites = [Site(name, folder, where, tuple(LABEL_ARGS[labels])) for name, folder, labels, where in TASKS[task]["sites"]]
            invites, subsets[task] = start_nodes(sites, args.data, out / task, args.limit, args.split_seed, nodes)
            try:
                for method in order:
                    for seed in range(args.seeds):
                        runs.append(run_one(args, task, method, seed, invites, out))
                        rs = runs[-1]["round_seconds"]
                        say(f"{task} {method} seed {seed}: done in {runs[-1]['seconds']:.0f} s "
                            f"(round 1: {rs.get(1, float('nan')):.1f} s; {time.monotonic() - t_start:.0f} s since start)")
                        if len(runs) == 1 and 1 in rs:
                            # Calibration: FedMix's run is the dearest (later rounds accept more pseudo-labels,
                            # so they take longer than round 1); FedAvg-pixel trains one node only.
                            est = runs[0]["seconds"] * n_runs + 30 * len(args.tasks)
                            say(f"calibration: FedMix round 1 took {rs[1]:.1f} s, the whole run {runs[0]['seconds']:.0f} s; "
                                f"at most ~{est / 60:.0f} min for all {n_runs} runs")
            finally:
                say(f"{task}: stopping nodes")
                stop_nodes(nodes)
    finally:
        stop_nodes(nodes)

    wall = time.monotonic() - t_start
    machine["loadavg_end"] = os.getloadavg()[0]
    res = summarize(runs, args.tasks)
    pngs = [name for task in args.tasks for name in plot(runs, task, out)]
    md = markdown(res, runs, config, commit_label(commit), wall, args.budget_note)
    record = {"config": config, "git": commit, "machine": machine, "wall_seconds": wall, "subsets": subsets,
              "results": res, "plots": pngs, "runs": runs}
    write_results(out, "bench_fedmix", record, md, pngs, wall)


if __name__ == "__main__":
    main()
