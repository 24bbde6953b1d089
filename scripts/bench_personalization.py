"""Benchmark personalized federated segmentation on four breast ultrasound sites: LC-Fed
against Local, FedAvg, FT, FedBN and FedRep, with LC-Fed's ablations.

The sites are the LC-Fed paper's four-site setting on breast ultrasound: BUSI and three
BUS-BRA scanners (GE Logiq 5, GE Logiq 7, Toshiba; meta.csv ``device``), seeded random
subsets of ``--limit`` images each. Every method goes through the same
:func:`run_federation` with the same rounds, local epochs and learning rate.

**In process** (the default): the (variant, method, seed) jobs run in ``--workers``
spawned processes (in this one with 1); each job holds one ``NodeRuntime`` per site,
the node's own dispatcher (:func:`fedseg.node.actions.handle`), behind a transport that
hands it the frames; the sites take turns, so a job uses ``--threads`` cores. Syft is never
imported. ``--syft`` runs the same jobs one after another over real ``fedseg node start``
datasites instead, as a spot check of the same code over Syft.

**Scoring.** Every method is scored twice, the same way: at the round its scored model
has the best image-weighted validation Dice, and at the last round. The scored model is
the global one (FedAvg), the node's own (Local, FedBN, FedRep, and LC-Fed's stage 1,
"LC-Fed PCS only"), the fine-tuned copy (FT) or the calibrated one (LC-Fed, HC only,
α = 0). LC-Fed calibrates after its last round; for its validation-chosen figure, the
job keeps the shared weights and every node's head of its best stage-1 round (from round 2) and runs the
calibration stage from there too (``run_federation`` resumed at that round).

**Gate and variants.** The gate asks whether there is anything to personalize: the best
of FT and FedRep must beat FedAvg by 2 IoU points. ``--variants conventions`` adds sites
that really differ: each site draws its masks its own way (BUSI as drawn, GE Logiq 5
dilated by 5% of the image side, GE Logiq 7 the lesion's bounding box, Toshiba dilated by
10%), written beside the subset's images.

Writes ``<out>/bench_personalization.json`` (config, commit, machine, ``gate``, ``goals``,
every metrics row), ``<out>/bench_personalization.md`` (per-site test IoU, Dice and ASSD
as mean ± std over seeds, paired differences per seed) and ``<out>/bench_personalization.png``.

    python scripts/bench_personalization.py                          # smoke run, a few minutes
    python scripts/bench_personalization.py --full --workers 5 --threads 3 --device cuda --data D --out runs/bench_personalization
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from benchlib import (
    REPO, InProcessTransport, Site, budget_parser, check_budget, commit_label, git_commit, machine_info, make_subset, mean_std, require_data,
    run_jobs, run_plan, say, start_bench, start_nodes, stop_nodes, with_budget, write_results,
)

BUSBRA = "breast/BUS-BRA"
SITES = [
    Site("BUSI", "breast/BUSI"),
    Site("GE-Logiq-5", BUSBRA, ("device", "GE Logiq 5")),
    Site("GE-Logiq-7", BUSBRA, ("device", "GE Logiq 7")),
    Site("Toshiba", BUSBRA, ("device", "Toshiba")),
]
#: Variant "conventions": how each site draws its masks, (kind, share of the image's shorter side).
CONVENTIONS = {"BUSI": None, "GE-Logiq-5": ("dilate", 0.05), "GE-Logiq-7": ("box", 0.0), "Toshiba": ("dilate", 0.10)}
VARIANTS = ("as-is", "conventions")
# method -> (plan overrides, prefix of the figures that method is scored by)
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "Local": ({"algorithm": "local"}, ""),
    "FedAvg": ({"algorithm": "fedavg"}, ""),
    "FT": ({"algorithm": "ft"}, "personal_"),
    "FedBN": ({"algorithm": "fedbn"}, ""),
    "FedRep": ({"algorithm": "fedrep"}, ""),
    "LC-Fed": ({"algorithm": "lcfed"}, "personal_"),
    "LC-Fed HC only": ({"algorithm": "lcfed", "lcfed": {"pcs": False}}, "personal_"),
    "LC-Fed α=0": ({"algorithm": "lcfed", "lcfed": {"alpha": 0.0}}, "personal_"),
}
#: Read off the LC-Fed runs, no run of its own: the stage-1 model, before calibration.
PCS_ONLY = "LC-Fed PCS only"
BASELINES = ("Local", "FedAvg", "FT", "FedBN", "FedRep")
#: Where a validation-chosen LC-Fed run keeps its best stage-1 round, and resumes from it;
#: and the snapshot of the round trained but not yet scored, which may become it.
BEST, CANDIDATE = "best_stage1", "unscored_stage1"
GATE_IOU = 0.02
GOAL_OVER_FEDAVG, GOAL_OVER_FEDREP, GOAL_ABLATION = 0.03, 0.01, 0.005
METRICS = ("iou", "dice", "assd")

DEFAULTS = {"rounds": 2, "limit": 40, "seeds": 1, "image_size": 32, "width": 8, "depth": 3}
FULL = {"rounds": 120, "limit": 150, "seeds": 3, "image_size": 64, "width": 16, "depth": 4}


# ------------------------------------------------------------------------- data


def apply_convention(folder: Path, convention: tuple[str, float] | None) -> None:
    """Replaces the subset's mask links by masks drawn the site's way (never touches the source)."""
    if convention is None:
        return
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    kind, share = convention
    for link in sorted((folder / "masks").iterdir()):
        with Image.open(link) as im:
            mask = np.asarray(im.convert("L")) > 0  # (h, w), as the node reads it
        if kind == "box" and mask.any():
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            mask = np.zeros_like(mask)
            mask[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1] = True
        elif kind == "dilate":
            r = max(1, round(share * min(mask.shape)))
            t = torch.from_numpy(mask).float()[None, None]
            mask = F.max_pool2d(t, 2 * r + 1, stride=1, padding=r)[0, 0].numpy() > 0
        link.unlink()
        Image.fromarray(mask.astype(np.uint8) * 255).save(link.with_suffix(".png"))


def prepare_data(args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    """Each variant's site folders under ``out/data/<variant>/<site>``; the subset descriptions."""
    subsets: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        for site in SITES:
            folder = out / "data" / variant / site.name
            subsets.setdefault(variant, {})[site.name] = make_subset(args.data / site.folder, folder, args.limit, site.where, args.split_seed)
            if variant == "conventions":
                apply_convention(folder, CONVENTIONS[site.name])
                subsets[variant][site.name]["convention"] = CONVENTIONS[site.name]
    return subsets


def make_plan(args: argparse.Namespace, method: str, seed: int) -> Any:
    from fedseg.protocol.plan import Plan

    d: dict[str, Any] = {
        "rounds": args.rounds, "image_size": args.image_size, "seed": seed, "aggregation": args.aggregation,
        "model": {"width": args.width, "depth": args.depth, "groups": min(8, max(1, args.width // 2)), "in_channels": 1},
        "train": {"lr": args.lr, "batch_size": args.batch_size, "local_epochs": 1.0, "threads": args.threads},
        "lcfed": {"hc_epochs": args.hc_epochs},
        "personal": {"finetune_epochs": 1.0},
        "timeout_s": 3600.0,
    }
    for key, value in METHODS[method][0].items():
        d[key] = {**d[key], **value} if isinstance(value, dict) else value
    return Plan.from_dict(d)


# ------------------------------------------------------------- in-process jobs


def node_has_device() -> bool:
    from fedseg.node.config import NodeConfig

    return "device" in {f.name for f in dataclasses.fields(NodeConfig)}


def image_weighted(rows: list[dict[str, Any]], prefix: str, split: str, metric: str) -> float:
    return sum(r[f"{prefix}{split}_{metric}"] * r[f"{prefix}{split}_n"] for r in rows) / sum(r[f"{prefix}{split}_n"] for r in rows)


class JobReporter:
    """Progress lines every tenth round; for LC-Fed, keeps its best stage-1 round (shared
    weights and every node's local part) so the calibration can run from there too."""

    def __init__(self, label: str, rounds: int, run_dir: Path, workdirs: list[Path], keep_best: bool) -> None:
        self.label, self.rounds, self.run_dir, self.workdirs, self.keep_best = label, rounds, run_dir, workdirs, keep_best
        self.best: tuple[float, int] = (-1.0, -1)
        self.round_seconds: dict[str, float] = {}
        # CPU seconds of this job's process per round: the cost on a quiet machine, whatever else runs.
        self.round_cpu_seconds: dict[str, float] = {}
        self._cpu = time.process_time()

    def info(self, text: str) -> None:
        if "left out" in text or "stays on it" in text:
            say(f"{self.label}: {text}")

    def step(self, text: str) -> None:
        pass

    def round_done(self, round_: int, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        key = f"{summary['stage']} {round_}" if "stage" in summary else str(round_)
        cpu = time.process_time()
        self.round_seconds[key], self.round_cpu_seconds[key], self._cpu = summary["seconds"], cpu - self._cpu, cpu
        dice = image_weighted(rows, "", "val", "dice")
        if round_ % 10 == 0 or round_ >= self.rounds:
            say(f"{self.label}: {summary.get('stage') or f'round {round_}/{self.rounds}'} {summary['seconds']:.1f} s, val Dice {dice:.3f}")
        if not self.keep_best or "stage" in summary:
            return
        # Round r >= 1 is scored on round r+1's train request, so by now the checkpoint and
        # the nodes' local parts are round r+1's: the state round r had is the snapshot taken
        # one call earlier, kept if r is the best round so far. Round 1's state is never on
        # disk at a call (round 0 is scored before it trains), so the best counts from round 2.
        candidate, keep = self.run_dir.parent / CANDIDATE, self.run_dir.parent / BEST
        if 2 <= round_ <= self.rounds and dice > self.best[0]:
            self.best = (dice, round_)
            if round_ < self.rounds:
                shutil.rmtree(keep, ignore_errors=True)
                candidate.rename(keep)
        if 1 <= round_ < self.rounds - 1:
            shutil.rmtree(candidate, ignore_errors=True)
            (candidate / "run").mkdir(parents=True)
            shutil.copy2(self.run_dir / "checkpoint.npz", candidate / "run" / "checkpoint.npz")
            for workdir in self.workdirs:
                shutil.copytree(workdir / "personal", candidate / "personal" / workdir.name)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (variant, method, seed) federation in this process: the job with its results."""
    import torch

    from fedseg.node.actions import NodeRuntime
    from fedseg.node.config import NodeConfig
    from fedseg.protocol.rounds import run_federation

    torch.set_num_threads(job["threads"])
    label = f"{job['variant']} {job['method']} seed {job['seed']}"
    plan, root = job["plan"], Path(job["dir"])
    shutil.rmtree(root, ignore_errors=True)
    lock = threading.Lock()
    device = {"device": job["device"]} if node_has_device() else {}
    runtimes = [NodeRuntime(NodeConfig(name=site, data=str(folder), labels="pixel", workdir=str(root / "nodes" / site),
                                       split_seed=job["split_seed"], **device))
                for site, folder in job["sites"].items()]
    transports = [InProcessTransport(rt, lock) for rt in runtimes]
    t0 = time.monotonic()
    lcfed = plan.algorithm == "lcfed"
    reporter = JobReporter(label, plan.rounds, root / "run", [Path(rt.workdir) for rt in runtimes], keep_best=lcfed)
    rows = run_federation(plan, transports, root / "run", reporter)
    result: dict[str, Any] = {**job, "rows": rows, "round_seconds": reporter.round_seconds, "round_cpu_seconds": reporter.round_cpu_seconds}
    if lcfed:
        result["best_rows"] = _calibrate_at_best(plan, runtimes, transports, root, reporter, rows)
    result["seconds"], result["cpu_seconds"] = time.monotonic() - t0, time.process_time()
    result["syft_imported"] = "syft" in sys.modules
    say(f"{label}: done in {result['seconds']:.0f} s")
    return result


def _calibrate_at_best(plan: Any, runtimes: list[Any], transports: list[Any], root: Path, reporter: JobReporter,
                       rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calibration stage from the best stage-1 round's weights and heads (its rows)."""
    from fedseg.protocol.rounds import run_federation

    best = reporter.best[1]
    if best == plan.rounds:  # the run's own calibration already started from there
        return [r for r in rows if r["round"] == plan.rounds + 1]
    keep = root / BEST
    reporter.keep_best = False
    for rt in runtimes:
        shutil.rmtree(rt.workdir / "personal")
        shutil.copytree(keep / "personal" / rt.name, rt.workdir / "personal")
    resumed = run_federation(dataclasses.replace(plan, rounds=best), transports, keep / "run", reporter, resume=True)
    return [r for r in resumed if r["round"] == best + 1]


def run_syft(jobs: list[dict[str, Any]], out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The spot check: the jobs one after another over real Syft datasites, one set of nodes per variant."""
    results = []
    for variant in args.variants:
        nodes: dict[str, Any] = {}
        try:
            sites = [Site(s.name, str(out / "data" / variant / s.name)) for s in SITES]
            invites, _ = start_nodes(sites, Path("/"), out / "syft" / variant, 0, args.split_seed, nodes)
            for job in (j for j in jobs if j["variant"] == variant):
                try:
                    run = run_plan(job["plan"], invites, Path(job["dir"]) / "run", f"{variant} {job['method']} seed {job['seed']}")
                    results.append({**job, **run})
                except Exception:
                    results.append({**job, "error": traceback.format_exc()})
        finally:
            stop_nodes(nodes)
    return results


# ------------------------------------------------------------------ scoring


def by_round(rows: list[dict[str, Any]], prefix: str) -> dict[int, list[dict[str, Any]]]:
    rounds: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if f"{prefix}val_dice" in r:
            rounds.setdefault(r["round"], []).append(r)
    return rounds


def test_figures(rows: list[dict[str, Any]], prefix: str) -> dict[str, dict[str, float]]:
    return {r["site"]: {m: r[f"{prefix}test_{m}"] for m in METRICS} for r in rows}


def score_run(run: dict[str, Any], view: str) -> dict[str, Any]:
    """A run's per-site test figures at the validation-chosen round ("val") and at the last ("last")."""
    rows = run["rows"]
    if view == PCS_ONLY:
        rounds = by_round([r for r in rows if r["round"] <= run["rounds"]], "")
        best = max(rounds, key=lambda rnd: (image_weighted(rounds[rnd], "", "val", "dice"), -rnd))
        return {"round": {"val": best, "last": max(rounds)},
                "val": test_figures(rounds[best], ""), "last": test_figures(rounds[max(rounds)], "")}
    prefix = METHODS[view][1]
    rounds = by_round(rows, prefix)
    last = max(rounds)
    if "best_rows" in run:  # LC-Fed: the calibration from its best stage-1 round
        best_rows = run["best_rows"]
        return {"round": {"val": best_rows[0]["round"] - 1, "last": last - 1},
                "val": test_figures(best_rows, prefix), "last": test_figures(rounds[last], prefix)}
    best = max(rounds, key=lambda rnd: (image_weighted(rounds[rnd], prefix, "val", "dice"), -rnd))
    return {"round": {"val": best, "last": last}, "val": test_figures(rounds[best], prefix), "last": test_figures(rounds[last], prefix)}


def summarize_variant(runs: list[dict[str, Any]]) -> dict[str, Any]:
    sites = [s.name for s in SITES]
    methods: dict[str, Any] = {}
    views = [(m, m) for m in METHODS] + [(PCS_ONLY, "LC-Fed")]
    for view, method in views:
        mine = [r for r in runs if r["method"] == method and "error" not in r]
        if not mine:
            continue
        entry: dict[str, Any] = {}
        for at in ("val", "last"):
            per_seed = []
            for run in mine:
                scored = score_run(run, view)
                figures = scored[at]
                per_seed.append({"seed": run["seed"], "round": scored["round"][at], "sites": figures,
                                 **{f"mean_{m}": statistics.fmean(figures[s][m] for s in sites) for m in METRICS}})
            entry[at] = {
                "per_seed": per_seed,
                "sites": {s: {m: mean_std([p["sites"][s][m] for p in per_seed]) for m in METRICS} for s in sites},
                **{f"mean_{m}": mean_std([p[f"mean_{m}"] for p in per_seed]) for m in METRICS},
            }
        methods[view] = entry
    paired = {at: paired_differences(methods, at) for at in ("val", "last")}
    return {"methods": methods, "paired": paired, "gate": gate(methods), "goals": goals(methods, paired)}


def paired_differences(methods: dict[str, Any], at: str) -> dict[str, dict[int, float]]:
    """LC-Fed's mean IoU minus each other method's, per seed (same seed: same initial weights and splits)."""
    if "LC-Fed" not in methods:
        return {}
    mine = {p["seed"]: p["mean_iou"] for p in methods["LC-Fed"][at]["per_seed"]}
    out = {}
    for name, m in methods.items():
        if name != "LC-Fed":
            theirs = {p["seed"]: p["mean_iou"] for p in m[at]["per_seed"]}
            out[name] = {seed: mine[seed] - theirs[seed] for seed in sorted(mine.keys() & theirs.keys())}
    return out


def _goal(measured: Any, target: Any, met: bool) -> dict[str, Any]:
    return {"measured": measured, "target": target, "met": bool(met)}


def gate(methods: dict[str, Any]) -> dict[str, Any]:
    """Is there anything to personalize: best of FT and FedRep over FedAvg, mean IoU at the validation-chosen round."""
    have = [m for m in ("FT", "FedRep") if m in methods]
    if not have or "FedAvg" not in methods:
        return {}
    best = max(have, key=lambda m: methods[m]["val"]["mean_iou"][0])
    margin = methods[best]["val"]["mean_iou"][0] - methods["FedAvg"]["val"]["mean_iou"][0]
    return {"personalization_over_fedavg": {**_goal(round(margin, 4), _points(GATE_IOU), margin >= GATE_IOU), "method": best}}


def _points(target: float) -> str:
    return f">= +{100 * target:g} IoU points"


def goals(methods: dict[str, Any], paired: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, on the figures at the validation-chosen round."""
    out: dict[str, Any] = {}
    if "LC-Fed" not in methods:
        return out
    lc = methods["LC-Fed"]["val"]["mean_iou"][0]
    for name, baseline, target in (("iou_over_fedavg", "FedAvg", GOAL_OVER_FEDAVG), ("iou_over_fedrep", "FedRep", GOAL_OVER_FEDREP)):
        if baseline in methods:
            diff = lc - methods[baseline]["val"]["mean_iou"][0]
            seeds = paired["val"].get(baseline, {})
            out[name] = {**_goal(round(diff, 4), f"{_points(target)}, positive on every seed", diff >= target and all(v > 0 for v in seeds.values())),
                         "per_seed": seeds}
    assd = {m: v["val"]["mean_assd"][0] for m, v in methods.items() if m in (*BASELINES, "LC-Fed")}
    lowest = min(assd, key=assd.get)
    out["lowest_mean_assd"] = {**_goal(lowest, "LC-Fed", lowest == "LC-Fed"), "assd": assd}
    for name, ablation in (("pcs_adds", "LC-Fed HC only"), ("hc_adds", PCS_ONLY)):
        if ablation in methods:
            diff = lc - methods[ablation]["val"]["mean_iou"][0]
            out[name] = {**_goal(round(diff, 4), f"{_points(GOAL_ABLATION)} over {ablation}", diff >= GOAL_ABLATION)}
    return out


# ------------------------------------------------------------------- output


def round_costs(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of a training round (not round 0, not a calibration) per method."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method and "round_cpu_seconds" in r]
        keys = [(r, k) for r in mine for k in r["round_cpu_seconds"] if k.isdigit() and k != "0"]
        if keys:
            out[method] = {"wall_s": statistics.median(r["round_seconds"][k] for r, k in keys),
                           "cpu_s": statistics.median(r["round_cpu_seconds"][k] for r, k in keys)}
    return out


def plot(res: dict[str, Any], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [s.name for s in SITES]
    variants = list(res)
    fig, axes = plt.subplots(len(variants), 1, figsize=(11, 4 * len(variants)), squeeze=False)
    for ax, variant in zip(axes[:, 0], variants):
        names = list(res[variant]["methods"])
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            m = res[variant]["methods"][name]["val"]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(sites) + 1)]
            vals = [100 * m["sites"][s]["iou"][0] for s in sites] + [100 * m["mean_iou"][0]]
            errs = [100 * m["sites"][s]["iou"][1] for s in sites] + [100 * m["mean_iou"][1]]
            ax.bar(xs, vals, width, yerr=errs, capsize=2, label=name)
        ax.set_xticks(range(len(sites) + 1), [*sites, "mean"])
        ax.set(ylabel="test IoU (%)", ylim=(0, 100),
               title=f"Breast, sites {variant}: test IoU at the validation-chosen round (mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    fig.savefig(out / "bench_personalization.png", dpi=110)
    plt.close(fig)
    return "bench_personalization.png"


def _verdict(g: dict[str, Any]) -> str:
    return "**met**" if g["met"] else "**missed**"


def markdown(res: dict[str, Any], config: dict[str, Any], commit: str, wall_s: float, failures: list[str]) -> str:
    sites = [s.name for s in SITES]
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    px = lambda ms: f"{ms[0]:.2f} ± {ms[1]:.2f}"  # noqa: E731
    mode = "over real Syft nodes" if config["syft"] else f"in process, {config['workers']} workers × {config['threads']} threads, {config['device']}"
    lines = [
        "# Personalized federated segmentation: LC-Fed and its baselines (breast ultrasound, four sites)", "",
        f"Commit {commit}; {config['rounds']} rounds, {config['seeds']} seed(s), up to {config['limit'] or 'all'} images per site, "
        f"{config['image_size']} px, U-Net width {config['width']} depth {config['depth']}, lr {config['lr']}, batch {config['batch_size']}, "
        f"1 local epoch per round, {config['aggregation']} averaging, LC-Fed HC {config['hc_epochs']} epochs; "
        f"{wall_s / 60:.1f} min in all, {mode}.", "",
        "Test figures per site, mean ± std over seeds, of each method's scored model at two rounds: the round with its best "
        "image-weighted validation Dice (**val**), and the last round (**last**; LC-Fed's calibration follows it). "
        "IoU and Dice count the foreground only, per image, then per site; ASSD is in pixels at the benchmark's image size "
        "(a lesion missed entirely counts as the image diagonal). Means are unweighted over sites.", "",
    ]
    for job in failures:
        lines += [f"- **FAILED job**: {job}"]
    for variant, v in res.items():
        lines += [f"## Sites {variant}", ""]
        for name, g in v["gate"].items():
            lines += [f"**Gate** ({name}: best of FT and FedRep, here {g['method']}, minus FedAvg, mean test IoU at val): "
                      f"{100 * g['measured']:+.1f} points (target {g['target']}): {_verdict(g)}.", ""]
        for metric, title, fmt in (("iou", "IoU (%)", pct), ("dice", "Dice (%)", pct), ("assd", "ASSD (px, lower is better)", px)):
            lines += [f"### Test {title}", "", "| method | at | " + " | ".join(sites) + " | mean | rounds |", "|---|---|" + "---|" * (len(sites) + 2)]
            for name, m in v["methods"].items():
                for at in ("val", "last"):
                    e = m[at]
                    lines.append(f"| {name} | {at} | " + " | ".join(fmt(e["sites"][s][metric]) for s in sites)
                                 + f" | **{fmt(e[f'mean_{metric}'])}** | {', '.join(str(p['round']) for p in e['per_seed'])} |")
            lines.append("")
        if v["paired"].get("val"):
            seeds = sorted({s for d in v["paired"]["val"].values() for s in d})
            lines += ["### LC-Fed minus each method, mean test IoU points, per seed", "",
                      "| method | at | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|" + "---|" * len(seeds)]
            for at in ("val", "last"):
                for name, d in v["paired"][at].items():
                    lines.append(f"| {name} | {at} | " + " | ".join(f"{100 * d[s]:+.1f}" if s in d else "" for s in seeds) + " |")
            lines.append("")
        if v["goals"]:
            lines += ["### Goals (at the validation-chosen round)", ""]
            for name, g in v["goals"].items():
                measured = f"{100 * g['measured']:+.1f} IoU points" if isinstance(g["measured"], float) else g["measured"]
                lines.append(f"- {name}: {measured} (target {g['target']}): {_verdict(g)}")
            lines.append("")
    lines += [
        "Anchor: the LC-Fed paper's polyp table (384 px, four sites, 300 rounds): LC-Fed 75.6 IoU, FedAvg 69.6, FedRep 71.7, "
        "FT 70.8, FedBN 55.4, Local 51.2. Compare differences, not levels.", "", "Plot: `bench_personalization.png`.", "",
    ]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = budget_parser(__doc__.split("\n\n")[0], DEFAULTS, FULL)
    p.set_defaults(lr=1e-3)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--variants", default="as-is", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--hc-epochs", type=float, default=50.0, help="LC-Fed: local epochs of HC training")
    p.add_argument("--aggregation", choices=("samples", "uniform"), default="samples", help="averaging of the shared parameters")
    p.add_argument("--workers", type=int, default=1, help="jobs (variant, method, seed) run in parallel processes")
    p.add_argument("--device", default="cpu", help="torch device of the nodes: cpu or cuda")
    p.add_argument("--syft", action="store_true", help="spot check: the jobs one by one over real Syft nodes instead of in process")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_personalization")
    args = with_budget(p.parse_args(), FULL, DEFAULTS)
    args.methods = [m for m in args.methods.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    if bad := [m for m in args.methods if m not in METHODS] + [v for v in args.variants if v not in VARIANTS]:
        p.error(f"unknown method or variant: {bad}")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if args.device != "cpu" and not node_has_device():
        p.error("--device needs NodeConfig.device (merge main once the artefacts branch's 'Node device:' commit is in)")
    check_budget(p, args)
    require_data(p, args.data, [s.folder for s in SITES])
    return args


def every_variant(res: dict[str, Any], variants: list[str], key: str) -> dict[str, Any]:
    """The first variant's gate or goals as they are, each later variant's with its name appended."""
    return {f"{k} ({v})" if v != variants[0] else k: g for v in variants for k, g in res[v][key].items()}


def main() -> None:
    args = parse_args()
    out, config = start_bench(args)
    commit, machine = git_commit(), machine_info()
    subsets = prepare_data(args, out)
    jobs = [
        {"variant": variant, "method": method, "seed": seed, "rounds": args.rounds, "plan": make_plan(args, method, seed),
         "sites": {s.name: str(out / "data" / variant / s.name) for s in SITES}, "split_seed": args.split_seed,
         "threads": args.threads, "device": args.device, "dir": str(out / "runs" / variant / method.replace(" ", "_") / f"seed{seed}")}
        for variant in args.variants for method in args.methods for seed in range(args.seeds)
    ]
    say(f"{len(jobs)} jobs: variants {args.variants}, methods {args.methods}, {args.seeds} seed(s), {args.rounds} rounds, "
        f"{args.limit or 'all'} images/site, {args.image_size} px, width {args.width}, depth {args.depth}, "
        + ("over Syft" if args.syft else f"in process on {args.workers} workers"))
    t_start = time.monotonic()
    runs = run_syft(jobs, out, args) if args.syft else run_jobs(run_job, jobs, args.workers)
    wall = time.monotonic() - t_start
    machine["loadavg_end"] = os.getloadavg()[0]
    failures = [f"{r['variant']} {r['method']} seed {r['seed']}: {r['error'].strip().splitlines()[-1]}" for r in runs if "error" in r]
    res = {variant: summarize_variant([r for r in runs if r["variant"] == variant]) for variant in args.variants}
    png = plot(res, out)
    md = markdown(res, config, commit_label(commit), wall, failures)
    # Every job's metrics rows stay in its run directory (metrics.jsonl); the summary keeps its costs.
    jobs_summary = [{**{k: v for k, v in r.items() if k not in ("rows", "best_rows", "plan", "node_info")},
                     "plan": r["plan"] if isinstance(r["plan"], dict) else r["plan"].to_dict()} for r in runs]
    cost = round_costs(runs)
    md += "\n" + "\n".join(["## Cost per training round (median over rounds and seeds)", "", "| method | wall s | CPU s |", "|---|---|---|",
                             *(f"| {m} | {c['wall_s']:.2f} | {c['cpu_s']:.2f} |" for m, c in cost.items())]) + "\n"
    record = {"config": config, "git": commit, "machine": machine, "wall_seconds": wall, "subsets": subsets, "cost_per_round": cost,
              "gate": every_variant(res, args.variants, "gate"), "goals": every_variant(res, args.variants, "goals"),
              "failures": failures, "results": res, "plot": png, "jobs": jobs_summary,
              "syft_imported": any(r.get("syft_imported") for r in runs) or "syft" in sys.modules}
    write_results(out, "bench_personalization", record, md, [png], wall)


if __name__ == "__main__":
    main()
