"""Benchmark FedMix on mixed supervision against FedAvg-pixel, FedAvg-full and FedST.

Two tasks, each a federation of three sites holding pixel, box and image-level labels
(the weak labels derived from the masks, as the FedMix paper does):

- polyp-mixed: Kvasir-SEG (pixel, about 60 images), CVC-ClinicDB (box, about 400, split by
  sequence), CVC-ColonDB (box, all); RGB.
- breast-mixed: BUS-BRA Toshiba (pixel, all), BUS-BRA GE Logiq 7 (box, about 400, split by
  patient), BUSI (image-level, about 400, normal images included); grayscale.

Methods, all through the same :func:`run_federation` and node dispatcher: FedAvg-pixel (only
the pixel node trains), FedMix, FedMix-noadapt (plain n_k weights), FedMix-paper (without
fedseg's box projection term, the paper's method), FedAvg-full (every node
trains on its masks: the upper bound) and FedST (the paper's comparator: warm-up on the pixel
node for half the rounds, then weak nodes self-train on confident pixels with fixed weights
0.05). Every method keeps each node's Adam state across rounds.

The round is selected by what a real federation sees, the pixel nodes' validation Dice
(weak sites have no masks to validate on), and the last round is reported too. The gate
(FedAvg-full − FedAvg-pixel on the weak sites' mean test Dice ≥ 8 points) comes first.

By default every run is in-process: the nodes' own :class:`NodeRuntime` dispatcher behind
an in-process transport, no Syft (``--workers`` runs, each in its own process);
``--transport syft`` runs the same plans over real ``fedseg node start`` datasites, as a
spot check that gives the same figures. Writes ``<out>/bench_fedmix.json`` (config, commit,
machine, gate, goals, per-round curves), ``<out>/bench_fedmix.md`` and ``<out>/fedmix_<task>.png``.

    python scripts/bench_fedmix.py                          # smoke budget (a few minutes on 2 CPUs)
    python scripts/bench_fedmix.py --full --workers 5 --threads 3 --device cuda --data D --out runs/bench_fedmix
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import (
    REPO, Site, budget_parser, check_budget, commit_label, git_commit, machine_info, make_subset, mean_std, require_data,
    run_jobs, run_plan, run_plan_in_process, say, start_bench, start_nodes, stop_nodes, with_budget, write_results,
)

GATE_GAP = 8.0  # FedAvg-full − FedAvg-pixel, weak sites' mean test Dice, points, at least
GOAL_GAIN = 5.0  # FedMix − FedAvg-pixel, points, at least
GOAL_GAP_CLOSED = 0.5  # (FedMix − FedAvg-pixel) / (FedAvg-full − FedAvg-pixel), at least
MOONSHOT_GAP_CLOSED = 0.8
GOAL_BOX_ACCEPTANCE = 0.5  # FedMix box nodes' accepted share in the last round, at least
FEDST_WEAK_WEIGHT = 0.05  # the reference's fixed weights [0.05, 0.05, 0.9]

# site name, data folder (under --data), labels, meta.csv filter (column, prefix) or None, image limit (None: --limit)
TASKS: dict[str, dict[str, Any]] = {
    "polyp": {
        "title": "polyp-mixed",
        "in_channels": 3,
        "sites": [
            ("Kvasir-SEG", "polyp/Kvasir-SEG", "pixel", None, 60),
            ("CVC-ClinicDB", "polyp/CVC-ClinicDB", "box", None, None),
            ("CVC-ColonDB", "polyp/CVC-ColonDB", "box", None, None),
        ],
    },
    "breast": {
        "title": "breast-mixed",
        "in_channels": 1,
        "sites": [
            ("BUSBRA-Toshiba", "breast/BUS-BRA", "pixel", ("device", "Toshiba"), 0),
            ("BUSBRA-Logiq7", "breast/BUS-BRA", "box", ("device", "GE Logiq 7"), None),
            ("BUSI", "breast/BUSI", "image", None, None),
        ],
    },
}
LABEL_ARGS = {"pixel": ["--labels", "pixel"], "box": ["--labels", "box", "--boxes-from-masks"],
              "image": ["--labels", "image", "--image-labels-from-masks"]}

# method name -> plan overrides ("fedst" is filled from the rounds)
METHODS: dict[str, dict[str, Any]] = {
    "FedAvg-pixel": {"algorithm": "fedavg"},
    "FedMix": {"algorithm": "fedmix"},
    "FedMix-noadapt": {"algorithm": "fedmix", "fedmix": {"adaptive": False}},
    "FedMix-paper": {"algorithm": "fedmix", "fedmix": {"box_projection": 0.0}},
    "FedAvg-full": {"algorithm": "fedavg", "full_masks": True},
    "FedST": {"algorithm": "fedmix", "fedmix": {"weak_training": "self_training", "weak_weight": FEDST_WEAK_WEIGHT}},
}
ORDER = ("FedMix", "FedMix-paper", "FedST", "FedMix-noadapt", "FedAvg-full", "FedAvg-pixel")  # dearest first, so workers finish together

DEFAULTS = {"rounds": 4, "limit": 40, "seeds": 1, "image_size": 32, "width": 8, "depth": 3}
FULL = {"rounds": 70, "limit": 400, "seeds": 3, "image_size": 64, "width": 16, "depth": 4}


def make_plan(args: argparse.Namespace, task: str, method: str, seed: int) -> Any:
    from fedseg.protocol.plan import Plan

    d: dict[str, Any] = {
        "algorithm": "fedavg", "rounds": args.rounds, "image_size": args.image_size, "seed": seed,
        "model": {"width": args.width, "depth": args.depth, "groups": min(8, max(1, args.width // 2)), "in_channels": TASKS[task]["in_channels"]},
        "train": {"lr": args.lr, "batch_size": args.batch_size, "local_epochs": 1.0, "threads": args.threads, "keep_optimizer": True},
        "fedmix": {"tau": args.tau},
        "timeout_s": 3600.0,
    }
    for key, value in METHODS[method].items():
        d[key] = {**d[key], **value} if isinstance(value, dict) else value
    if method == "FedST":
        d["fedmix"]["warmup_rounds"] = args.rounds // 2  # the reference warms up for 150 of 300 rounds
    return Plan.from_dict(d)


def site_limit(args: argparse.Namespace, own: int | None) -> int:
    """A site's image count (0 = all): its own, else ``--limit``; a smoke run caps every site at ``--limit``."""
    n = args.limit if own is None else own
    if args.full or not args.limit:
        return n
    return min(n, args.limit) if n else args.limit


def prepare_sites(args: argparse.Namespace, out: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Seeded random subsets (symlinks) of every site, and the node settings that serve them."""
    sites, subsets = {}, {}
    for task in args.tasks:
        sites[task] = []
        for name, folder, labels, where, limit in TASKS[task]["sites"]:
            n = args.pixel_limit if labels == "pixel" and args.pixel_limit is not None else site_limit(args, limit)
            subset = out / "data" / task / name
            subsets[name] = {**make_subset(args.data / folder, subset, n, where, args.split_seed), "labels": labels}
            sites[task].append({"name": name, "data": str(subset), "labels": labels})
            say(f"{task}: {name} ({labels}) {subsets[name]['images']} images, {subsets[name]['with_lesion']} with a lesion")
    return sites, subsets


# -------------------------------------------------------------------------- one job


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (task, method, seed) run over in-process nodes; runs in a worker process."""
    import torch

    from fedseg.node.actions import NodeRuntime
    from fedseg.node.config import NodeConfig

    torch.set_num_threads(job["threads"])
    args = argparse.Namespace(**job["args"])
    task, method, seed = job["task"], job["method"], job["seed"]
    run_dir = Path(job["out"]) / "runs" / task / method / f"seed{seed}"
    runtimes = [
        NodeRuntime(NodeConfig(name=s["name"], data=s["data"], labels=s["labels"], workdir=str(run_dir / "nodes" / s["name"]),
                               split_seed=args.split_seed, labels_from_masks=s["labels"] != "pixel", device=args.device))
        for s in job["sites"]
    ]
    plan = make_plan(args, task, method, seed)
    result = run_plan_in_process(plan, runtimes, run_dir / "run", f"{task} {method} seed {seed}", every=args.log_every)
    say(f"{task} {method} seed {seed}: done in {result['seconds']:.0f} s")
    return {"task": task, "method": method, "seed": seed, "syft_imported": "syft" in sys.modules, **result}


def run_syft(args: argparse.Namespace, sites: dict[str, list[dict[str, Any]]], out: Path) -> list[dict[str, Any]]:
    """The same plans over real datasites, one run at a time (the spot check)."""
    runs: list[dict[str, Any]] = []
    nodes: dict[str, Any] = {}
    try:
        for task in args.tasks:
            # The subsets are already drawn: the nodes serve all of each.
            node_sites = [Site(s["name"], s["name"], None, tuple(LABEL_ARGS[s["labels"]])) for s in sites[task]]
            invites, _ = start_nodes(node_sites, out / "data" / task, out / "syft" / task, 0, args.split_seed, nodes)
            try:
                for method in args.methods:
                    for seed in range(args.seeds):
                        run = run_plan(make_plan(args, task, method, seed), invites, out / "syft" / task / method / f"seed{seed}",
                                       f"{task} {method} seed {seed} (syft)")
                        runs.append({"task": task, "method": method, "seed": seed, **run})
            finally:
                stop_nodes(nodes)
    finally:
        stop_nodes(nodes)
    return runs


# -------------------------------------------------------------------------- results


def kinds(task: str) -> dict[str, str]:
    return {name: labels for name, _, labels, _, _ in TASKS[task]["sites"]}


def selected_round(rows: list[dict[str, Any]], pixel_sites: list[str]) -> int:
    """The round with the best mean validation Dice over the pixel sites: what a federation can see."""
    by_round: dict[int, list[float]] = {}
    for r in rows:
        if r["site"] in pixel_sites and "val_dice" in r:
            by_round.setdefault(r["round"], []).append(r["val_dice"])
    return max(sorted(by_round), key=lambda rnd: statistics.fmean(by_round[rnd]))


def scores(run: dict[str, Any], task: str, round_: int) -> dict[str, Any]:
    """Per-site test Dice (points) at one round, with the weak sites' and all sites' means."""
    at = {r["site"]: 100 * r["test_dice"] for r in run["rows"] if r["round"] == round_ and "test_dice" in r}
    weak = [s for s, k in kinds(task).items() if k != "pixel"]
    return {"round": round_, "site": at, "weak_mean": statistics.fmean(at[s] for s in weak),
            "all_mean": statistics.fmean(at[s] for s in kinds(task))}


def acceptance(run: dict[str, Any], task: str) -> dict[str, list[float | None]]:
    """Accepted pseudo-label share per weak site and round (None where it did not train)."""
    last = max(r["round"] for r in run["rows"])
    out = {}
    for site, kind in kinds(task).items():
        if kind != "pixel":
            share = {r["round"]: r["pseudo_share"] for r in run["rows"] if r["site"] == site and "pseudo_share" in r}
            out[site] = [share.get(rnd) for rnd in range(1, last + 1)]
    return out


def summarize(runs: list[dict[str, Any]], task: str) -> dict[str, Any]:
    sites = list(kinds(task))
    pixel_sites = [s for s, k in kinds(task).items() if k == "pixel"]
    methods: dict[str, Any] = {}
    for method in METHODS:
        mine = sorted((r for r in runs if r["task"] == task and r["method"] == method and "rows" in r), key=lambda r: r["seed"])
        if not mine:
            continue
        per_seed = []
        for run in mine:
            last = max(r["round"] for r in run["rows"])
            per_seed.append({"seed": run["seed"], "selected": scores(run, task, selected_round(run["rows"], pixel_sites)),
                             "last": scores(run, task, last), "acceptance": acceptance(run, task),
                             "weights": {int(k): v.get("weights") for k, v in run.get("summaries", {}).items()},
                             "seconds": run["seconds"]})
        entry: dict[str, Any] = {"seeds": [p["seed"] for p in per_seed], "per_seed": per_seed}
        for at in ("selected", "last"):
            entry[at] = {"site": {s: mean_std([p[at]["site"][s] for p in per_seed]) for s in sites},
                         "weak_mean": mean_std([p[at]["weak_mean"] for p in per_seed]),
                         "all_mean": mean_std([p[at]["all_mean"] for p in per_seed]),
                         "rounds": [p[at]["round"] for p in per_seed]}
        methods[method] = entry
    return {"methods": methods, "paired": paired(methods)}


def paired(methods: dict[str, Any]) -> dict[str, Any]:
    """FedMix minus each other method, per seed, on the weak sites' mean test Dice (selected round)."""
    out = {}
    if "FedMix" not in methods:
        return out
    mix = {p["seed"]: p["selected"]["weak_mean"] for p in methods["FedMix"]["per_seed"]}
    for other, m in methods.items():
        if other != "FedMix":
            theirs = {p["seed"]: p["selected"]["weak_mean"] for p in m["per_seed"]}
            diffs = {s: mix[s] - theirs[s] for s in sorted(set(mix) & set(theirs))}
            out[f"FedMix - {other}"] = {"per_seed": diffs, "mean_std": mean_std(list(diffs.values())) if diffs else None}
    return out


def goal(measured: Any, target: Any, met: bool) -> dict[str, Any]:
    return {"measured": measured, "target": target, "met": bool(met)}


def gate_and_goals(res: dict[str, Any], tasks: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    gate, goals = {}, {}
    for task in tasks:
        m = res[task]["methods"]
        weak = {k: v["selected"]["weak_mean"][0] for k, v in m.items()}
        if {"FedAvg-full", "FedAvg-pixel"} <= set(weak):
            gap = weak["FedAvg-full"] - weak["FedAvg-pixel"]
            gate[task] = goal(round(gap, 2), f">= {GATE_GAP} points (FedAvg-full - FedAvg-pixel, weak sites' mean test Dice)", gap >= GATE_GAP)
        pair = res[task]["paired"]
        if "FedMix - FedAvg-pixel" in pair and pair["FedMix - FedAvg-pixel"]["per_seed"]:
            gain = pair["FedMix - FedAvg-pixel"]
            goals[f"{task}.gain_over_pixel"] = goal(round(gain["mean_std"][0], 2), f">= {GOAL_GAIN} points", gain["mean_std"][0] >= GOAL_GAIN)
            goals[f"{task}.positive_every_seed"] = goal({s: round(d, 2) for s, d in gain["per_seed"].items()}, "> 0 on every seed",
                                                        all(d > 0 for d in gain["per_seed"].values()))
        if "FedMix - FedST" in pair and pair["FedMix - FedST"]["per_seed"]:
            d = pair["FedMix - FedST"]["mean_std"][0]
            goals[f"{task}.above_fedst"] = goal(round(d, 2), "> 0 points", d > 0)
        if {"FedMix", "FedAvg-full", "FedAvg-pixel"} <= set(weak):
            gap = weak["FedAvg-full"] - weak["FedAvg-pixel"]
            closed = (weak["FedMix"] - weak["FedAvg-pixel"]) / gap if gap > 0 else float("nan")
            goals[f"{task}.gap_closed"] = goal(round(closed, 3), f">= {GOAL_GAP_CLOSED}", gap > 0 and closed >= GOAL_GAP_CLOSED)
            goals[f"{task}.gap_closed_moonshot"] = goal(round(closed, 3), f">= {MOONSHOT_GAP_CLOSED}", gap > 0 and closed >= MOONSHOT_GAP_CLOSED)
        if "FedMix" in m:
            box = [a[-1] for p in m["FedMix"]["per_seed"] for s, a in p["acceptance"].items()
                   if kinds(task)[s] == "box" and a and a[-1] is not None]
            if box:
                share = statistics.fmean(box)
                goals[f"{task}.box_acceptance_last_round"] = goal(round(share, 3), f">= {GOAL_BOX_ACCEPTANCE}", share >= GOAL_BOX_ACCEPTANCE)
        if "FedMix - FedMix-noadapt" in pair and pair["FedMix - FedMix-noadapt"]["per_seed"]:
            d = pair["FedMix - FedMix-noadapt"]["mean_std"][0]
            goals[f"{task}.adaptive_not_worse"] = goal(round(d, 2), ">= 0 points (FedMix - FedMix-noadapt)", d >= 0)
    return gate, goals


def box_rule(subsets: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Share of the box sites' ground-truth masks that pass the box rule Dice(y·B, B) >= box_agreement,
    with the margin unscaled (U{1..9} px at the plan's size, before the fix) and scaled to the image size."""
    import numpy as np
    import torch

    from fedseg.models.fedmix import FedMixConfig, box_from_mask, boxes_to_mask, enlarge_box, random_margins, soft_agreement, synthesize_box_masks
    from fedseg.node.datasets import LabelKind, index_site, load_arrays

    cfg, size, out = FedMixConfig(), args.image_size, {}
    for name, s in subsets.items():
        if s["labels"] != "box":
            continue
        _, masks = load_arrays(index_site(Path(s["folder"]), LabelKind.PIXEL, None, "auto", None), size, 1)
        masks = masks.astype(bool)[masks.reshape(len(masks), -1).any(1)]  # (N, 1, S, S), lesion images only
        margins = random_margins(np.random.default_rng(0), len(masks), cfg.max_box_margin)
        unscaled = np.stack([boxes_to_mask([enlarge_box(box_from_mask(m[0]), margins[i], size, size)], size, size)[None]
                             for i, m in enumerate(masks)])
        scaled = synthesize_box_masks(masks, np.random.default_rng(0), cfg.max_box_margin)
        y = torch.from_numpy(masks).float()
        share = {k: (soft_agreement(y, torch.from_numpy(b).float()) >= cfg.box_agreement).float().mean().item()
                 for k, b in (("unscaled", unscaled), ("scaled", scaled))}
        out[name] = {"images": len(masks), "size": size, **share}
    return out


# -------------------------------------------------------------------------- report


def curve(runs: list[dict[str, Any]], task: str, method: str, key: str, sites: list[str]) -> tuple[list[int], list[float]]:
    """Per round, the mean over seeds of ``key`` averaged over ``sites``."""
    per_round: dict[int, list[float]] = {}
    for run in (r for r in runs if r["task"] == task and r["method"] == method and "rows" in r):
        by_round: dict[int, list[float]] = {}
        for row in run["rows"]:
            if key in row and row["site"] in sites:
                by_round.setdefault(row["round"], []).append(row[key])
        for rnd, vals in by_round.items():
            per_round.setdefault(rnd, []).append(statistics.fmean(vals))
    rounds = sorted(per_round)
    return rounds, [statistics.fmean(per_round[r]) for r in rounds]


def plot(runs: list[dict[str, Any]], task: str, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = kinds(task)
    weak = [s for s in k if k[s] != "pixel"]
    pixel = [s for s in k if k[s] == "pixel"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method in METHODS:
        for ax, key, sites in ((axes[0], "test_dice", weak), (axes[1], "val_dice", pixel)):
            x, m = curve(runs, task, method, key, sites)
            if x:
                ax.plot(x, [100 * v for v in m], label=method)
    for method, style in (("FedMix", "-"), ("FedMix-paper", ":"), ("FedMix-noadapt", "--")):
        for site in weak:
            x, m = curve(runs, task, method, "pseudo_share", [site])
            if x:
                axes[2].plot(x, m, style, label=f"{site} ({k[site]}, {method})")
    axes[0].set(title="weak sites' mean test Dice", xlabel="round", ylabel="Dice (%)")
    axes[1].set(title="pixel site validation Dice (model selection)", xlabel="round", ylabel="Dice (%)")
    axes[2].set(title="accepted pseudo-label share", xlabel="round", ylabel="accepted / candidates", ylim=(0, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{TASKS[task]['title']} (mean over seeds)")
    fig.tight_layout()
    name = f"fedmix_{task}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def markdown(record: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    cfg, res = record["config"], record["results"]
    fmt = lambda ms: f"{ms[0]:.1f} ± {ms[1]:.1f}"  # noqa: E731
    lines = ["# FedMix benchmark: mixed supervision (pixel, box, image-level)", ""]
    if cfg["budget_note"]:
        lines += [f"**{cfg['budget_note']}**", ""]
    lines += [
        f"Commit {commit_label(record['git'])}; {cfg['rounds']} rounds, {cfg['seeds']} seed(s), {cfg['image_size']} px, "
        f"U-Net width {cfg['width']} depth {cfg['depth']}, lr {cfg['lr']}, batch {cfg['batch_size']}, τ {cfg['tau']}, "
        f"{cfg['transport']} nodes, device {cfg['device']}, {cfg['workers']} worker(s) × {cfg['threads']} thread(s); "
        f"{record['wall_seconds'] / 60:.1f} min in all.", "",
    ]
    if record["failures"]:
        lines += ["**Failed runs:** " + "; ".join(f"{f['job']}" for f in record["failures"]), ""]
    lines += ["## Gate", ""]
    for task, g in record["gate"].items():
        lines.append(f"- {TASKS[task]['title']}: FedAvg-full − FedAvg-pixel on the weak sites = {g['measured']:.1f} points "
                     f"(gate ≥ {GATE_GAP:.0f}): **{'met' if g['met'] else 'NOT met'}**"
                     + ("" if g["met"] else " — the pixel site is not scarce enough for this task to show a win; shrink it (--pixel-limit)"))
    lines += ["", "Test Dice (%) per site, mean ± std over seeds, at the round with the best pixel-site validation Dice "
              "(what a federation sees; weak sites hold no masks to validate on) and at the last round. "
              "Dice counts the foreground only, per image, then per site.", ""]
    for task, r in res.items():
        sites = list(kinds(task))
        lines += [f"## {TASKS[task]['title']}", "",
                  "| method | " + " | ".join(f"{s} ({kinds(task)[s]})" for s in sites) + " | weak sites' mean | all sites' mean | last round: weak mean | selected rounds |",
                  "|---|" + "---|" * (len(sites) + 4)]
        for method, m in r["methods"].items():
            sel = m["selected"]
            lines.append(f"| {method} | " + " | ".join(fmt(sel["site"][s]) for s in sites)
                         + f" | **{fmt(sel['weak_mean'])}** | {fmt(sel['all_mean'])} | {fmt(m['last']['weak_mean'])} | "
                         + ", ".join(map(str, sel["rounds"])) + " |")
        lines += ["", "Paired differences on the weak sites' mean test Dice (points), per seed:", ""]
        for name, p in r["paired"].items():
            per = ", ".join(f"seed {s}: {d:+.1f}" for s, d in p["per_seed"].items())
            lines.append(f"- {name}: {per}" + (f" (mean {p['mean_std'][0]:+.1f} ± {p['mean_std'][1]:.1f})" if p["mean_std"] else ""))
        for method in ("FedMix", "FedMix-paper", "FedMix-noadapt"):
            if method in r["methods"]:
                per_site = {}
                for p in r["methods"][method]["per_seed"]:
                    for site, share in p["acceptance"].items():
                        per_site.setdefault(site, []).append(share)
                for site, seeds in per_site.items():
                    mean = [statistics.fmean(v) if (v := [s[i] for s in seeds if s[i] is not None]) else None for i in range(len(seeds[0]))]
                    lines.append(f"- {method} accepted share at {site} ({kinds(task)[site]}) per round: "
                                 + " ".join("–" if v is None else f"{v:.2f}" for v in mean))
        lines += ["", f"Curves: `fedmix_{task}.png`.", ""]
    lines += ["## Goals", "", "| goal | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {g['measured']} | {g['target']} | {'yes' if g['met'] else '**no**'} |" for name, g in record["goals"].items()]
    if record["box_rule"]:
        lines += ["", "## Box rule on the ground truth", "",
                  "Share of the box sites' lesion masks y whose own box B passes Dice(y·B, B) ≥ 0.5, margins U{1..9} px unscaled "
                  "(before) and scaled from 224 px to the image size (now):", ""]
        lines += [f"- {name}: {100 * b['unscaled']:.0f}% → {100 * b['scaled']:.0f}% ({b['images']} images, {b['size']} px)"
                  for name, b in record["box_rule"].items()]
    lines += [
        "", "## Method", "",
        "- Sites are seeded random subsets (`--split-seed`) of the data; box and image-level labels are derived from the masks on "
        "the node; each node splits its images 70/15/15, by sequence (CVC-ClinicDB) or patient (BUS-BRA).",
        "- Every method runs through `run_federation` and the node's own dispatcher, keeps each node's Adam state across rounds, "
        "and is scored by every node on val and test each round. FedST warms up on the pixel node for half the rounds.",
        "- FedMix is fedseg's: the paper's method plus a box projection term (a box node's predictions must span their boxes, "
        "on every box image, accepted or not). FedMix-paper leaves that term out.",
        "- Goals compare the weak sites' mean test Dice at the selected round, as the gate does.",
    ]
    return "\n".join(lines) + "\n"


def compact(run: dict[str, Any]) -> dict[str, Any]:
    """What the summary keeps of a run: its figures per round and site, not the node logs."""
    keep = ("round", "site", "val_dice", "test_dice", "train_loss", "train_n", "pseudo_share")
    return {k: v for k, v in run.items() if k not in ("rows", "node_info", "summaries", "run_dir")} | {
        "rows": [{k: r[k] for k in keep if k in r} for r in run.get("rows", [])]}


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = budget_parser(__doc__.split("\n\n")[0], DEFAULTS, FULL)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    p.add_argument("--methods", default=",".join(ORDER), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--pixel-limit", type=int, default=None, help="images at the pixel site of every task (0 = all); default the task's own")
    p.add_argument("--tau", type=float, default=0.9, help="FedMix pseudo-label agreement threshold")
    p.add_argument("--transport", choices=("inprocess", "syft"), default="inprocess",
                   help="in-process nodes (no Syft) or real fedseg datasites (the spot check)")
    p.add_argument("--workers", type=int, default=1, help="in-process runs at once, each in its own process")
    p.add_argument("--device", default="cpu", help="torch device of the nodes: cpu, cuda, cuda:N or auto")
    p.add_argument("--log-every", type=int, default=10, help="print every n-th round of each run")
    p.add_argument("--budget-note", default="", help="a line printed at the top of the Markdown (e.g. 'smoke budget')")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_fedmix")
    args = with_budget(p.parse_args(), FULL, DEFAULTS)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    if bad := [t for t in args.tasks if t not in TASKS] + [m for m in args.methods if m not in METHODS]:
        p.error(f"unknown task or method: {bad}")
    if args.workers < 1 or (args.transport == "syft" and args.workers != 1):
        p.error("--workers must be >= 1, and 1 with --transport syft")
    check_budget(p, args)
    require_data(p, args.data, [f for t in args.tasks for _, f, _, _, _ in TASKS[t]["sites"]])
    return args


def main() -> None:
    args = parse_args()
    out, config = start_bench(args, clear=("runs", "data", "syft"))
    commit, machine = git_commit(), machine_info()
    order = [m for m in ORDER if m in args.methods]
    sites, subsets = prepare_sites(args, out)
    for name, s in subsets.items():
        s["folder"] = str(out / "data" / next(t for t in args.tasks if name in kinds(t)) / name)
    jobs = [{"task": t, "method": m, "seed": seed, "threads": args.threads, "out": str(out), "sites": sites[t],
             "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
            for m in order for t in args.tasks for seed in range(args.seeds)]
    say(f"{len(jobs)} runs ({args.transport}): tasks {args.tasks}, methods {order}, {args.seeds} seed(s), {args.rounds} rounds, "
        f"{args.image_size} px, width {args.width}, depth {args.depth}, {args.workers} worker(s) × {args.threads} thread(s), {args.device}")

    t_start = time.monotonic()
    if args.transport == "syft":
        runs = run_syft(args, sites, out)
    else:
        runs = run_jobs(run_job, jobs, args.workers)
    wall = time.monotonic() - t_start
    failures = [r for r in runs if "error" in r]
    runs = [r for r in runs if "error" not in r]
    if any(r.get("syft_imported") for r in runs):
        raise SystemExit("error: an in-process run imported syft")
    machine["loadavg_end"] = os.getloadavg()[0]

    res = {task: summarize(runs, task) for task in args.tasks}
    gate, goals = gate_and_goals(res, args.tasks)
    record = {"config": config, "git": commit, "machine": machine, "wall_seconds": wall, "subsets": subsets,
              "gate": gate, "goals": goals, "box_rule": box_rule(subsets, args), "results": res,
              "failures": [{"job": {k: f[k] for k in ("task", "method", "seed")}, "error": f["error"]} for f in failures],
              "runs": [compact(r) for r in runs]}
    pngs = [plot(runs, task, out) for task in args.tasks]
    record["plots"] = pngs
    write_results(out, "bench_fedmix", record, markdown(record, runs), pngs, wall)


if __name__ == "__main__":
    main()
