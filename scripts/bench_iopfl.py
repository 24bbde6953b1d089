"""Benchmark IOP-FL: inside personalization, and outside personalization on a held-out site.

Two tasks of three real sites each, served by real ``fedseg node start`` datasites:

- polyp: Kvasir-SEG, CVC-ClinicDB, CVC-ColonDB (RGB);
- breast: BUSI, BUS-BRA "GE Logiq 5", BUS-BRA "GE Logiq 7" (grayscale).

Every site runs twice: as a training node (pixel labels, ``--share-personalized``) and as a
new site (``--labels none``; its masks only score, after adapting). Per task and seed:

- Inside: an ``iopfl`` run and an ``ft`` run on all three training nodes. Per site, test
  Dice of the global model, of the node's running mix (inside-personalized) and of FT,
  each at the round with the best mean validation Dice of that model.
- Outside, leave one site out: an ``iopfl`` run on the other two, then ``adapt_new_site``
  (what ``fedseg adapt`` runs) on the held-out site's new-site node. It scores, on all its
  images, the global FedAvg model unchanged, the global model with BatchNorm statistics
  recomputed on its images (the simple test-time baseline) and IOP-FL routing.

The U-Net uses BatchNorm (``norm="batch"``), as the paper does, so the statistics
baseline exists. Writes ``<out>/bench_iopfl.json`` (config, git commit, machine, every
row and reply), ``<out>/bench_iopfl.md`` and ``<out>/outside.png``.

    python scripts/bench_iopfl.py --tasks polyp --seeds 1 --rounds 2 --limit 40   # smoke run
    python scripts/bench_iopfl.py                                                # default budget (< 60 min on 2 CPUs)
    python scripts/bench_iopfl.py --full                                         # more images, rounds and epochs
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchlib import (
    NODE_START_TIMEOUT_S, REPO, Reporter, budget_parser, check_budget, commit_label, git_commit, machine_info, make_subset, mean_std, require_data, say, start_bench,
    stop_nodes, with_budget, write_results,
)

GOAL_MEAN_GAIN = 0.02  # routing - unchanged global, mean over held-out sites, at least
GOAL_MAX_LOSS = 0.01  # routing may lose at most this much to the unchanged global on any site

# site name, data folder (under DATA), meta.csv filter (column, prefix) or None
TASKS: dict[str, dict[str, Any]] = {
    "polyp": {"in_channels": 3, "sites": [("Kvasir-SEG", "polyp/Kvasir-SEG", None), ("CVC-ClinicDB", "polyp/CVC-ClinicDB", None),
                                          ("CVC-ColonDB", "polyp/CVC-ColonDB", None)]},
    "breast": {"in_channels": 1, "sites": [("BUSI", "breast/BUSI", None), ("BUSBRA-Logiq5", "breast/BUS-BRA", ("device", "GE Logiq 5")),
                                           ("BUSBRA-Logiq7", "breast/BUS-BRA", ("device", "GE Logiq 7"))]},
}
INSIDE = {"global": "", "inside-personalized": "personal_", "FT": "personal_"}  # method -> metrics prefix
OUTSIDE = {"global (unchanged)": "global", "global + target BN statistics": "norm_stats", "IOP-FL routing": "routed"}

DEFAULTS = {"rounds": 10, "limit": 120, "seeds": 2, "image_size": 64, "width": 8, "depth": 4, "adapt_epochs": 10.0}
FULL = {"rounds": 20, "limit": 300, "seeds": 3, "image_size": 128, "width": 16, "depth": 4, "adapt_epochs": 10.0}


def start_nodes(task: str, args: argparse.Namespace, out: Path, nodes: dict[str, Any]) -> tuple[dict[str, Path], dict[str, Path], dict[str, Any]]:
    """Each site as a training node and as a new-site node over the same seeded subset."""
    from fedseg.node.errors import NodeError
    from fedseg.node.launcher import NodeProcess

    subsets = {}
    for name, folder, where in TASKS[task]["sites"]:
        data = out / "data" / task / name
        subsets[name] = make_subset(args.data / folder, data, args.limit, where, args.split_seed)
        common = ["--split-seed", str(args.split_seed)] + (["--where", f"{where[0]}={where[1]}"] if where else [])
        nodes[f"train:{name}"] = NodeProcess(name, data, out / "nodes" / task / name, extra=["--labels", "pixel", "--share-personalized", *common])
        nodes[f"new:{name}"] = NodeProcess(name, data, out / "nodes" / task / f"{name}-new", extra=["--labels", "none", *common])
        say(f"{task}: started training and new-site nodes of {name} ({subsets[name]['images']} images)")
    invites: dict[str, dict[str, Path]] = {"train": {}, "new": {}}
    for key, node in nodes.items():
        role, name = key.split(":")
        try:
            invites[role][name] = node.wait_ready(NODE_START_TIMEOUT_S)
        except NodeError as exc:
            raise SystemExit(f"error: {exc}") from None
    say(f"{task}: all nodes serving")
    return invites["train"], invites["new"], subsets


def make_plan(args: argparse.Namespace, task: str, algorithm: str, seed: int) -> Any:
    from fedseg.protocol.plan import Plan

    return Plan.from_dict({
        "algorithm": algorithm, "rounds": args.rounds, "image_size": args.image_size, "seed": seed, "timeout_s": 1800.0,
        "model": {"width": args.width, "depth": args.depth, "groups": min(8, args.width), "norm": "batch", "in_channels": TASKS[task]["in_channels"]},
        "train": {"lr": args.lr, "batch_size": args.batch_size, "local_epochs": 1.0, "threads": args.threads},
        "personal": {"alpha": args.alpha},
    })


def federate(args: argparse.Namespace, task: str, algorithm: str, seed: int, invites: dict[str, Path], run_dir: Path) -> dict[str, Any]:
    from fedseg.protocol.rounds import run_federation

    plan = make_plan(args, task, algorithm, seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.monotonic()
    rows = run_federation(plan, connected(list(invites.values())), run_dir, Reporter(f"{task} {run_dir.name} seed {seed}", plan.rounds), invites=[str(p) for p in invites.values()])
    return {"rows": rows, "seconds": time.monotonic() - t0, "run_dir": str(run_dir)}


def connected(invites: list[Path]) -> list[Any]:
    """Transports logged in here, one after another: Syft's login silences stdout process-wide,
    which is not safe to do from several threads at once."""
    from fedseg.protocol.invite import load_invite
    from fedseg.protocol.syft_transport import SyftTransport

    transports = [SyftTransport(load_invite(p), approval_timeout_s=120) for p in invites]
    for t in transports:
        t.connect()
    return transports


def adapt_held_out(args: argparse.Namespace, task: str, seed: int, site: str, run_dir: Path, transports: tuple[Any, list[Any]]) -> dict[str, Any]:
    from fedseg.protocol.adapt import adapt_new_site

    settings = {"epochs": args.adapt_epochs, "batch_size": args.batch_size, "lr": args.adapt_lr, "routing": args.routing}
    new_site, originals = transports
    outcome = adapt_new_site(run_dir, new_site, originals, settings, Reporter(f"{task} adapt {site} seed {seed}", 0))
    scores = "  ".join(f"{k} {v['dice']:.3f}" for k, v in outcome.reply.metrics.items())
    say(f"{task} seed {seed}: held-out {site} adapted over {outcome.experts} in {outcome.reply.seconds:.0f} s: Dice {scores}")
    return outcome.to_dict()


def best_test(rows: list[dict[str, Any]], prefix: str) -> tuple[int, dict[str, float]]:
    """Per-site test Dice of one model at the round (>= 1) with its best mean validation Dice."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r["round"] >= 1 and f"{prefix}val_dice" in r:
            by_round.setdefault(r["round"], []).append(r)
    best = max(by_round, key=lambda k: (statistics.fmean(r[f"{prefix}val_dice"] for r in by_round[k]), -k))
    return best, {r["site"]: r[f"{prefix}test_dice"] for r in by_round[best]}


def summarize(record: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for task in tasks:
        sites = [s[0] for s in TASKS[task]["sites"]]
        seeds = [s for s in record["seeds"] if s["task"] == task]
        inside: dict[str, Any] = {}
        for method, prefix in INSIDE.items():
            run = "ft" if method == "FT" else "iopfl"
            picked = [best_test(s["inside"][run]["rows"], prefix) for s in seeds]
            inside[method] = {"best_rounds": [b for b, _ in picked], "site": {site: mean_std([d[site] for _, d in picked]) for site in sites}}
        outside: dict[str, Any] = {}
        for method, key in OUTSIDE.items():
            per_site = {site: [s["outside"][site]["metrics"][key]["dice"] for s in seeds if key in s["outside"][site]["metrics"]] for site in sites}
            outside[method] = {"site": {site: mean_std(v) for site, v in per_site.items() if v}}
        gains = {site: outside["IOP-FL routing"]["site"][site][0] - outside["global (unchanged)"]["site"][site][0] for site in sites}
        beats = {site: inside["inside-personalized"]["site"][site][0] - inside["global"]["site"][site][0] for site in sites}
        res[task] = {"inside": inside, "outside": outside, "routing_gain": gains, "inside_gain": beats}
    everywhere = [g for t in res.values() for g in t["routing_gain"].values()]
    res["goals"] = {
        "mean_routing_gain": statistics.fmean(everywhere),
        "mean_gain_pass": statistics.fmean(everywhere) >= GOAL_MEAN_GAIN,
        "worst_routing_gain": min(everywhere),
        "worst_pass": min(everywhere) >= -GOAL_MAX_LOSS,
        "inside_pass": all(g > 0 for t in tasks for g in res[t]["inside_gain"].values()),
    }
    return res


def plot(res: dict[str, Any], tasks: list[str], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [(t, s[0]) for t in tasks for s in TASKS[t]["sites"]]
    fig, ax = plt.subplots(figsize=(1.6 * len(sites) + 2, 4))
    width = 0.8 / len(OUTSIDE)
    for i, method in enumerate(OUTSIDE):
        vals = [res[t]["outside"][method]["site"].get(s, (float("nan"), 0.0)) for t, s in sites]
        ax.bar([k + i * width for k in range(len(sites))], [100 * m for m, _ in vals], width, yerr=[100 * e for _, e in vals], label=method, capsize=2)
    ax.set_xticks([k + width for k in range(len(sites))], [s for _, s in sites], rotation=20, fontsize=8)
    ax.set(ylabel="Dice (%) on the held-out site", title="IOP-FL outside personalization, leave one site out (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "outside.png", dpi=110)
    plt.close(fig)
    return "outside.png"


def markdown(res: dict[str, Any], record: dict[str, Any], tasks: list[str]) -> str:
    fmt = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    c = record["config"]
    g = res["goals"]
    verdict = lambda ok: "pass" if ok else "FAIL"  # noqa: E731
    lines = ["# IOP-FL benchmark: inside and outside personalization", "",
             f"Commit {commit_label(record['git'])}; {c['rounds']} rounds, {c['seeds']} seed(s), "
             f"up to {c['limit']} images per site, {c['image_size']} px, U-Net width {c['width']} depth {c['depth']} with BatchNorm, lr {c['lr']}, "
             f"batch {c['batch_size']}, running mix α {c['alpha']}; adaptation {c['adapt_epochs']} epochs, lr {c['adapt_lr']}, {c['routing']} routing; "
             f"{record['wall_seconds'] / 60:.1f} min in all.", "",
             "Dice (%) counts the foreground only, per image, then per site; mean ± std over seeds.", "",
             "## Outside: leave one site out", "",
             "Federation (iopfl) on the other two sites; the held-out site adapts on all its images, unlabelled, and its masks "
             "score it afterwards (all images).", ""]
    for task in tasks:
        sites = [s[0] for s in TASKS[task]["sites"]]
        lines += [f"### {task}", "", "| held-out site | " + " | ".join(OUTSIDE) + " | routing − global |", "|---|" + "---|" * (len(OUTSIDE) + 1)]
        for site in sites:
            cells = [fmt(res[task]["outside"][m]["site"][site]) if site in res[task]["outside"][m]["site"] else "n/a" for m in OUTSIDE]
            lines.append(f"| {site} | " + " | ".join(cells) + f" | {100 * res[task]['routing_gain'][site]:+.1f} |")
        lines.append("")
    lines += [f"- Routing − unchanged global, mean over held-out sites: {100 * g['mean_routing_gain']:+.1f} points "
              f"(goal ≥ +{100 * GOAL_MEAN_GAIN:.0f}): **{verdict(g['mean_gain_pass'])}**",
              f"- Worst held-out site: {100 * g['worst_routing_gain']:+.1f} points (goal ≥ −{100 * GOAL_MAX_LOSS:.0f}): **{verdict(g['worst_pass'])}**",
              "", "## Inside: the three-site federation", "",
              "Test Dice per site; each model at the round with its best mean validation Dice (rounds per seed in the last column).", ""]
    for task in tasks:
        sites = [s[0] for s in TASKS[task]["sites"]]
        lines += [f"### {task}", "", "| method | " + " | ".join(sites) + " | best rounds |", "|---|" + "---|" * (len(sites) + 1)]
        for method, m in res[task]["inside"].items():
            lines.append(f"| {method} | " + " | ".join(fmt(m["site"][s]) for s in sites) + f" | {', '.join(map(str, m['best_rounds']))} |")
        lines.append("")
    lines += [f"- Inside-personalized beats global on every site: **{verdict(g['inside_pass'])}** "
              f"({', '.join(f'{s} {100 * v:+.1f}' for t in tasks for s, v in res[t]['inside_gain'].items())})", "",
              "Plot: `outside.png`.", ""]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = budget_parser(__doc__.split("\n\n")[0], DEFAULTS, FULL)
    p.add_argument("--tasks", default="polyp,breast", help="comma-separated: " + ", ".join(TASKS))
    p.add_argument("--adapt-epochs", type=float, help=f"epochs of test-time routing (default {DEFAULTS['adapt_epochs']})")
    p.add_argument("--adapt-lr", type=float, default=1e-3)
    p.add_argument("--routing", choices=["softmax", "sigmoid"], default="softmax")
    p.add_argument("--alpha", type=float, default=0.1, help="inside personalization: weight of the previous running mix")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_iopfl")
    args = with_budget(p.parse_args(), FULL, DEFAULTS)
    check_budget(p, args)
    args.tasks = [t for t in args.tasks.split(",") if t]
    if bad := [t for t in args.tasks if t not in TASKS]:
        p.error(f"unknown task: {bad}")
    require_data(p, args.data, [f for t in args.tasks for _, f, _ in TASKS[t]["sites"]])
    return args


def main() -> None:
    args = parse_args()
    out, config = start_bench(args)
    record: dict[str, Any] = {"config": config, "git": git_commit(), "machine": machine_info(), "subsets": {}, "seeds": []}
    t_start = time.monotonic()
    nodes: dict[str, Any] = {}
    try:
        for task in args.tasks:
            train, new, record["subsets"][task] = start_nodes(task, args, out, nodes)
            sites = list(train)
            for seed in range(args.seeds):
                runs = out / "runs" / task / f"seed{seed}"
                entry: dict[str, Any] = {"task": task, "seed": seed, "inside": {}, "loo": {}, "outside": {}}
                for algorithm in ("iopfl", "ft"):
                    entry["inside"][algorithm] = federate(args, task, algorithm, seed, train, runs / algorithm)
                for site in sites:
                    others = {s: train[s] for s in sites if s != site}
                    entry["loo"][site] = federate(args, task, "iopfl", seed, others, runs / f"without-{site}")
                # The held-out sites are separate nodes: all three adapt at once, sharing the cores.
                links = {site: (connected([new[site]])[0], connected([train[s] for s in sites if s != site])) for site in sites}
                with ThreadPoolExecutor(max_workers=len(sites)) as pool:
                    jobs = {site: pool.submit(adapt_held_out, args, task, seed, site, runs / f"without-{site}", links[site]) for site in sites}
                    entry["outside"] = {site: job.result() for site, job in jobs.items()}
                record["seeds"].append(entry)
                say(f"{task} seed {seed} done ({time.monotonic() - t_start:.0f} s since start)")
            say(f"{task}: stopping nodes")
            stop_nodes(nodes)
    finally:
        stop_nodes(nodes)
    record["wall_seconds"] = time.monotonic() - t_start
    res = summarize(record, args.tasks)
    record["results"] = res
    record["plot"] = plot(res, args.tasks, out)
    write_results(out, "bench_iopfl", record, markdown(res, record, args.tasks), [record["plot"]], record["wall_seconds"])


if __name__ == "__main__":
    main()
