"""Benchmark IOP-FL: does test-time routing beat simpler ways to meet an unseen hospital?

Leave one site out, per task: a federation (``iopfl``) on the other sites, then
``adapt_new_site`` (what ``fedseg adapt`` runs) on the held-out site's images, unlabelled;
its masks only score afterwards. Tasks:

- breast: BUSI and BUS-BRA's GE Logiq 5, GE Logiq 7 and Toshiba scanners (grayscale):
  each held-out site routes over the 3 training sites' running mixes plus the global model;
- polyp: Kvasir-SEG, CVC-ClinicDB, CVC-ColonDB (RGB): 2 running mixes plus the global model.

The held-out site scores, by Dice over all its images: the unchanged global model; AdaBN
(the global model with the site's BatchNorm statistics); TENT; each expert with the site's
statistics (the best of them, chosen with the labels, is the upper bound); the uniform
average of the experts; routing before and after adaptation, and the one the node keeps by
its label-free rule. How far each expert is from the global model: relative L2 distance
of the weights, and 1 − Dice agreement of their predictions on the held-out site. Inside,
every federation's sites score their running mix against the global model.

Three configurations: "reference" (running mix α 0.1 of the round's model, as the paper);
"ensemble" (α 0.7: a temporal average of the node's last few local models rather than
little more than the latest one); and "specialized" (α 0.5 of a copy trained 3 more local
epochs, ``mix_epochs``). Neither the mix nor the extra epochs touch the shared update, so
for a seed every configuration trains the same global model.

Everything runs in process: each site is the node's own ``NodeRuntime`` behind its
whitelist (``handle``), driven by the coordinator's ``run_federation`` and
``adapt_new_site``: the code ``fedseg run`` and ``fedseg adapt`` run over Syft, without
Syft (never imported: checked at the end). Jobs (configuration, task, seed, held-out site)
run in ``--workers`` processes; a failed job is reported and the others finish. Writes
``<out>/bench_iopfl.json``, ``<out>/bench_iopfl.md`` and ``<out>/outside.png``.

    python scripts/bench_iopfl.py --tasks polyp --rounds 2 --limit 30       # smoke run
    python scripts/bench_iopfl.py --full --workers 5 --threads 3 --device cuda --data D --out runs/bench_iopfl
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchlib import (
    REPO, InProcessTransport, Reporter, budget_parser, check_budget, commit_label, git_commit, machine_info, make_subset, mean_std, require_data, run_jobs, say, start_bench,
    with_budget, write_results,
)

GATE_MARGIN = 0.02  # best single expert (labels) - AdaBN, on at least half the held-out sites
GOAL_OVER_BASELINES = 0.02  # routing - AdaBN and routing - TENT, mean over held-out sites
GOAL_MAX_LOSS = 0.01  # routing may lose at most this much to the unchanged global model on any site
GOAL_INSIDE = 0.01  # running mix - global, mean over the federations' sites

# site name, data folder (under --data), meta.csv filter (column, prefix) or None
TASKS: dict[str, dict[str, Any]] = {
    "breast": {"in_channels": 1, "sites": [("BUSI", "breast/BUSI", None), ("BUSBRA-Logiq5", "breast/BUS-BRA", ("device", "GE Logiq 5")),
                                           ("BUSBRA-Logiq7", "breast/BUS-BRA", ("device", "GE Logiq 7")),
                                           ("BUSBRA-Toshiba", "breast/BUS-BRA", ("device", "Toshiba"))]},
    "polyp": {"in_channels": 3, "sites": [("Kvasir-SEG", "polyp/Kvasir-SEG", None), ("CVC-ClinicDB", "polyp/CVC-ClinicDB", None),
                                          ("CVC-ColonDB", "polyp/CVC-ColonDB", None)]},
}
#: Inside personalization per configuration (plan.personal).
CONFIGS: dict[str, dict[str, float]] = {"reference": {"alpha": 0.1, "mix_epochs": 0.0}, "ensemble": {"alpha": 0.7, "mix_epochs": 0.0},
                                         "specialized": {"alpha": 0.5, "mix_epochs": 3.0}}
#: Method -> the adapt reply's model; "best expert" and "mean expert" are derived from the experts' scores.
OUTSIDE = {"global": "global", "AdaBN": "norm_stats", "TENT": "tent", "uniform average": "uniform", "routing before": "routed_before",
           "routing adapted": "routed_adapted", "routing (kept)": "routed"}
BEST, MEAN = "best expert (labels)", "mean expert"
METHODS = [*OUTSIDE, MEAN, BEST]
PLOTTED = ["global", "AdaBN", "TENT", "uniform average", "routing before", "routing (kept)", BEST]

DEFAULTS = {"rounds": 10, "limit": 60, "seeds": 1, "image_size": 32, "width": 8, "depth": 3, "adapt_epochs": 10.0}
FULL = {"rounds": 80, "limit": 0, "seeds": 2, "image_size": 64, "width": 16, "depth": 4, "adapt_epochs": 10.0}


# ------------------------------------------------------------------------ one job


def best_test(rows: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """Per-site test Dice of one model at the round (>= 1) with its best mean validation Dice."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r["round"] >= 1 and f"{prefix}val_dice" in r:
            by_round.setdefault(r["round"], []).append(r)
    best = max(by_round, key=lambda k: (statistics.fmean(r[f"{prefix}val_dice"] for r in by_round[k]), -k))
    return {r["site"]: r[f"{prefix}test_dice"] for r in by_round[best]} | {"round": best}


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One federation without the held-out site, then its adaptation; never raises."""
    label = f"{spec['config']} {spec['task']} seed {spec['seed']} held-out {spec['held_out']}"
    t0 = time.monotonic()
    try:
        result = _job(spec, label)
        say(f"{label}: done in {time.monotonic() - t0:.0f} s")
    except Exception:  # the other jobs still finish; the failure goes into the results
        result = {"error": traceback.format_exc()}
        say(f"{label}: FAILED\n{result['error']}")
    return {**{k: spec[k] for k in ("config", "task", "seed", "held_out")}, **result, "seconds": time.monotonic() - t0,
            "syft_imported": "syft" in sys.modules}


def _job(spec: dict[str, Any], label: str) -> dict[str, Any]:
    import shutil

    import torch

    from fedseg.models.iopfl import relative_distance
    from fedseg.node.actions import NodeRuntime
    from fedseg.node.config import NodeConfig
    from fedseg.protocol.adapt import adapt_new_site
    from fedseg.protocol.plan import Plan
    from fedseg.protocol.rounds import run_federation
    from fedseg.protocol.run_store import RunStore

    torch.set_num_threads(spec["threads"])
    root = Path(spec["dir"])
    shutil.rmtree(root, ignore_errors=True)

    def runtime(name: str, data: str, where: list[str] | None, role: str, **kw: Any) -> Any:
        return NodeRuntime(NodeConfig(name=name, data=data, workdir=str(root / "nodes" / f"{name}-{role}"), where=dict([where]) if where else {},
                                      split_seed=spec["split_seed"], device=spec["device"], **kw))

    train = [runtime(*site, "train", labels="pixel", share_personalized=True) for site in spec["sites"] if site[0] != spec["held_out"]]
    new = runtime(*next(s for s in spec["sites"] if s[0] == spec["held_out"]), "new", labels="none")
    plan = Plan.from_dict(spec["plan"])
    reporter = Reporter(label, plan.rounds)
    rows = run_federation(plan, [InProcessTransport(rt) for rt in train], root / "run", reporter)
    state, global_arrays = RunStore(root / "run").load()
    distance = {rt.name: relative_distance(rt.personal(state.run_id, "mix"), global_arrays) for rt in train}
    t_adapt = time.monotonic()
    outcome = adapt_new_site(root / "run", InProcessTransport(new), [InProcessTransport(rt) for rt in train], spec["adapt"], reporter)
    scores = "  ".join(f"{k} {v['dice']:.3f}" for k, v in outcome.reply.metrics.items())
    say(f"{label}: adapted over {outcome.experts}, kept {'adapted' if outcome.reply.adapted else 'before'}: Dice {scores}")
    return {"inside": {"global": best_test(rows, ""), "mix": best_test(rows, "personal_")}, "distance": distance,
            "outside": outcome.to_dict(), "round_seconds": [s for r, s in reporter.round_seconds.items() if r > 0], "adapt_seconds": time.monotonic() - t_adapt}


# ------------------------------------------------------------------------ summary


def outside_scores(job: dict[str, Any]) -> dict[str, float]:
    """Dice per method on the held-out site, from one job's adapt reply."""
    m = job["outside"]["metrics"]
    scores = {method: m[key]["dice"] for method, key in OUTSIDE.items()}
    # Every expert with the site's statistics; the global model's is AdaBN.
    experts = [v["dice"] for k, v in m.items() if k.startswith("expert:")] + [m["norm_stats"]["dice"]]
    return scores | {BEST: max(experts), MEAN: statistics.fmean(experts)}


def summarize(jobs: list[dict[str, Any]], configs: list[str], tasks: list[str]) -> dict[str, Any]:
    ok = [j for j in jobs if "error" not in j]
    res: dict[str, Any] = {"configs": {}, "gate": {}, "goals": {}}
    for config in configs:
        mine = [j for j in ok if j["config"] == config]
        sites = [(t, s[0]) for t in tasks for s in TASKS[t]["sites"] if any(j["task"] == t and j["held_out"] == s[0] for j in mine)]
        if not sites:
            continue
        outside, experts, inside = {}, {}, {}
        for task, site in sites:
            held = [j for j in mine if j["task"] == task and j["held_out"] == site]
            per_seed = [outside_scores(j) for j in held]
            outside[f"{task}/{site}"] = {m: mean_std([s[m] for s in per_seed]) for m in METHODS}
            outside[f"{task}/{site}"]["kept adapted"] = sum(j["outside"]["adapted"] for j in held) / len(held)
            experts[f"{task}/{site}"] = {
                "relative_l2": statistics.fmean(d for j in held for d in j["distance"].values()),
                "dice_disagreement": statistics.fmean(1 - v for j in held for k, v in j["outside"]["agreement"].items() if k.startswith("expert:")),
            }
            # Inside: every federation this site trained in (without another held-out site), each seed.
            runs = [j["inside"] for j in mine if j["task"] == task and j["held_out"] != site]
            if runs:
                inside[f"{task}/{site}"] = {"global": mean_std([r["global"][site] for r in runs]), "mix": mean_std([r["mix"][site] for r in runs])}
        mean_gap = lambda a, b: statistics.fmean(v[a][0] - v[b][0] for v in outside.values())  # noqa: E731
        gate_sites = sum(v[BEST][0] - v["AdaBN"][0] >= GATE_MARGIN for v in outside.values())
        res["configs"][config] = {"outside": outside, "experts": experts, "inside": inside}
        res["gate"][f"{config}: best single expert (labels) >= AdaBN + 2 Dice, share of held-out sites"] = _goal(gate_sites / len(outside), 0.5)
        routed = "routing (kept)"
        res["goals"][f"{config}: routing - AdaBN, mean Dice over held-out sites"] = _goal(mean_gap(routed, "AdaBN"), GOAL_OVER_BASELINES)
        res["goals"][f"{config}: routing - TENT, mean Dice over held-out sites"] = _goal(mean_gap(routed, "TENT"), GOAL_OVER_BASELINES)
        res["goals"][f"{config}: routing - global, worst held-out site"] = _goal(min(v[routed][0] - v["global"][0] for v in outside.values()), -GOAL_MAX_LOSS)
        if inside:
            gain = statistics.fmean(v["mix"][0] - v["global"][0] for v in inside.values())
            res["goals"][f"{config}: inside, running mix - global, mean Dice over sites"] = _goal(gain, GOAL_INSIDE)
    return res


def _goal(measured: float, target: float) -> dict[str, Any]:
    return {"measured": round(measured, 4), "target": target, "met": bool(measured >= target)}


def plot(res: dict[str, Any], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(res["configs"])
    fig, axes = plt.subplots(len(configs), 1, figsize=(12, 3.6 * len(configs)), squeeze=False)
    for ax, config in zip(axes[:, 0], configs):
        outside = res["configs"][config]["outside"]
        sites = list(outside)
        width = 0.8 / len(PLOTTED)
        for i, method in enumerate(PLOTTED):
            vals = [outside[s][method] for s in sites]
            ax.bar([k + i * width for k in range(len(sites))], [100 * m for m, _ in vals], width, yerr=[100 * e for _, e in vals], label=method, capsize=2)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(sites))], [s.split("/")[1] for s in sites], fontsize=8)
        ax.set(ylabel="Dice (%)", title=f"{config}: held-out site, mean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "outside.png", dpi=110)
    plt.close(fig)
    return "outside.png"


def markdown(res: dict[str, Any], record: dict[str, Any]) -> str:
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    c = record["config"]
    images = f"up to {c['limit']}" if c["limit"] else "all"
    verdict = lambda g: f"{'met' if g['met'] else '**not met**'} ({100 * g['measured']:+.1f} vs {100 * g['target']:+.0f})"  # noqa: E731
    lines = ["# IOP-FL: test-time routing on an unseen site against simpler baselines", "",
             f"Commit {commit_label(record['git'])}; in process (the nodes' own whitelist and the coordinator's round engine, no Syft); "
             f"{c['rounds']} rounds, {c['seeds']} seed(s), {images} images per site, "
             f"{c['image_size']} px, BatchNorm U-Net width {c['width']} depth {c['depth']}, lr {c['lr']}, batch {c['batch_size']}; "
             f"adaptation {c['adapt_epochs']} epochs, lr {c['adapt_lr']}, {c['routing']} routing, fixed in advance; device {c['device']}, "
             f"{c['workers']} worker(s) x {c['threads']} thread(s); {record['wall_seconds'] / 60:.1f} min in all.", "",
             "Dice (%) of the foreground, per image, then per site, over all the held-out site's images; mean ± std over seeds. "
             "Configurations: " + "; ".join(f"{k}: running mix α {v['alpha']}, mix_epochs {v['mix_epochs']:g}" for k, v in CONFIGS.items()) + ".", ""]
    if record["failures"]:
        lines += [f"**{len(record['failures'])} job(s) failed**: " + "; ".join(f["label"] for f in record["failures"]), ""]
    lines += ["## Gate", ""] + [f"- {name}: {'met' if g['met'] else '**not met**'} ({g['measured']:.2f} of the sites; needs {g['target']:.2f})"
                                for name, g in res["gate"].items()]
    lines += ["", "## Goals", ""] + [f"- {name}: {verdict(g)}" for name, g in res["goals"].items()] + [""]
    for config, r in res["configs"].items():
        lines += [f"## {config}", "", "| held-out site | " + " | ".join(METHODS) + " | kept adapted |", "|---|" + "---|" * (len(METHODS) + 1)]
        for site, v in r["outside"].items():
            lines.append(f"| {site} | " + " | ".join(pct(v[m]) for m in METHODS) + f" | {v['kept adapted']:.0%} |")
        lines += ["", "Experts against the global model (training sites of each held-out site's federations): relative L2 distance of "
                  "the weights, and 1 − Dice agreement of their predictions on the held-out site (each with its statistics).", "",
                  "| held-out site | relative L2 | Dice disagreement |", "|---|---|---|"]
        lines += [f"| {site} | {v['relative_l2']:.4f} | {100 * v['dice_disagreement']:.1f} % |" for site, v in r["experts"].items()]
        lines += ["", "Inside: test Dice of each site in the federations it trained in, at the round of best mean validation Dice.", "",
                  "| site | global | running mix | mix − global |", "|---|---|---|---|"]
        lines += [f"| {site} | {pct(v['global'])} | {pct(v['mix'])} | {100 * (v['mix'][0] - v['global'][0]):+.1f} |" for site, v in r["inside"].items()]
        lines.append("")
    lines += ["Plot: `outside.png`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    p = budget_parser(__doc__.split("\n\n")[0], DEFAULTS, FULL)
    p.add_argument("--tasks", default="breast,polyp", help="comma-separated: " + ", ".join(TASKS))
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    p.add_argument("--adapt-epochs", type=float, help=f"epochs of test-time routing and TENT (default {DEFAULTS['adapt_epochs']})")
    p.add_argument("--adapt-lr", type=float, default=1e-3)
    p.add_argument("--routing", choices=["softmax", "sigmoid"], default="softmax")
    p.add_argument("--workers", type=int, default=1, help="parallel job processes (spawned)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where every node trains, adapts and scores")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_iopfl")
    args = with_budget(p.parse_args(), FULL, DEFAULTS)
    check_budget(p, args)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.configs = [c for c in args.configs.split(",") if c]
    if bad := [t for t in args.tasks if t not in TASKS] + [c for c in args.configs if c not in CONFIGS]:
        p.error(f"unknown task or configuration: {bad}")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    require_data(p, args.data, [f for t in args.tasks for _, f, _ in TASKS[t]["sites"]])
    return args


def job_specs(args: argparse.Namespace, out: Path, subsets: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    specs = []
    for config in args.configs:
        for task in args.tasks:
            sites = [(name, str(out / "data" / task / name), list(where) if where else None) for name, _, where in TASKS[task]["sites"]]
            for seed in range(args.seeds):
                plan = {"algorithm": "iopfl", "rounds": args.rounds, "image_size": args.image_size, "seed": seed, "timeout_s": 7200.0,
                        "eval_batch_size": 64,
                        "model": {"width": args.width, "depth": args.depth, "groups": min(8, args.width), "norm": "batch",
                                  "in_channels": TASKS[task]["in_channels"]},
                        "train": {"lr": args.lr, "batch_size": args.batch_size, "local_epochs": 1.0, "threads": args.threads},
                        "personal": CONFIGS[config]}
                adapt = {"epochs": args.adapt_epochs, "lr": args.adapt_lr, "batch_size": args.batch_size, "routing": args.routing,
                         "threads": args.threads, "baselines": True}
                for held_out, _, _ in sites:
                    specs.append({"config": config, "task": task, "seed": seed, "held_out": held_out, "sites": sites, "plan": plan,
                                  "adapt": adapt, "threads": args.threads, "device": args.device, "split_seed": args.split_seed,
                                  "dir": str(out / "jobs" / config / task / f"seed{seed}" / held_out)})
    return specs


def main() -> None:
    args = parse_args()
    out, config = start_bench(args, clear=("jobs", "data"))
    record: dict[str, Any] = {"config": config, "configs": CONFIGS, "git": git_commit(), "machine": machine_info(), "subsets": {}}
    t_start = time.monotonic()
    for task in args.tasks:
        for name, folder, where in TASKS[task]["sites"]:
            record["subsets"][f"{task}/{name}"] = make_subset(args.data / folder, out / "data" / task / name, args.limit, where, args.split_seed)
    specs = job_specs(args, out, record["subsets"])
    say(f"{len(specs)} jobs on {args.workers} worker(s), {args.threads} thread(s) each, device {args.device}")
    jobs = run_jobs(run_job, specs, args.workers)
    record["wall_seconds"] = time.monotonic() - t_start
    record["failures"] = [{"label": f"{j['config']} {j['task']} seed {j['seed']} held-out {j['held_out']}", "error": j["error"]} for j in jobs if "error" in j]
    record["syft_imported"] = "syft" in sys.modules or any(j.get("syft_imported") for j in jobs)
    record["jobs"] = jobs
    ok = [j for j in jobs if "error" not in j]
    record["seconds_per_round"] = {c: statistics.median(s for j in ok if j["config"] == c for s in j["round_seconds"]) for c in args.configs
                                   if any(j["config"] == c for j in ok)}
    res = summarize(jobs, args.configs, args.tasks)
    record.update(results=res["configs"], gate=res["gate"], goals=res["goals"])
    record["plot"] = plot(res, out) if res["configs"] else None
    write_results(out, "bench_iopfl", record, markdown(res, record), [record["plot"]] if record["plot"] else [], record["wall_seconds"])
    if record["syft_imported"]:
        raise SystemExit("error: the in-process benchmark imported syft")


if __name__ == "__main__":
    main()
