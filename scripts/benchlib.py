"""What every benchmark script shares: real-site subsets, real node processes, one run, provenance.

Each benchmark starts its sites as real ``fedseg node start`` datasites and drives them
through the same :func:`~fedseg.protocol.rounds.run_federation` that ``fedseg run`` uses.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
NODE_START_TIMEOUT_S = 240.0


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def make_subset(src: Path, dst: Path, limit: int, where: tuple[str, str] | None, seed: int) -> dict[str, Any]:
    """A seeded random subset of a site as a folder of symlinks plus the matching meta.csv rows.

    The subset is the one ``fedseg node start --sample limit --sample-seed seed`` serves
    (one sampler, :func:`fedseg.node.datasets.sample_names`, stratified by ``has_lesion``
    where meta.csv has it); ``--limit`` would keep the first N names in sorted order, which
    for BUSI is benign images only. Nothing is copied: images and masks are symlinks.
    """
    from fedseg.node.datasets import sample_names

    with open(src / "meta.csv", newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames or [], list(reader)
    if where:
        rows = [r for r in rows if r[where[0]].startswith(where[1])]
    if limit and len(rows) > limit:
        flags = {r["name"]: r["has_lesion"] == "1" for r in rows} if "has_lesion" in columns else None
        chosen = set(sample_names([r["name"] for r in rows], limit, seed, flags))
        rows = sorted((r for r in rows if r["name"] in chosen), key=lambda r: r["name"])
    shutil.rmtree(dst, ignore_errors=True)
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True)
        files = {p.stem: p for p in (src / sub).iterdir()}
        for r in rows:
            p = files[r["name"]]
            (dst / sub / p.name).symlink_to(p.resolve())
    with open(dst / "meta.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lesion = sum(float(r.get("fg_frac") or 0) > 0 for r in rows)
    return {"source": str(src), "where": where, "images": len(rows), "with_lesion": lesion}


@dataclass(frozen=True)
class Site:
    """One benchmark site: its name, folder under the data root, optional meta.csv filter and node flags."""

    name: str
    folder: str
    where: tuple[str, str] | None = None
    extra: tuple[str, ...] = ()


def start_nodes(sites: list[Site], data: Path, out: Path, limit: int, split_seed: int, nodes: dict[str, Any]) -> tuple[dict[str, Path], dict[str, Any]]:
    """Subsets each site and starts its node; fills ``nodes`` as they start, so the caller can stop them.

    Returns:
        Invite path and subset description per site.
    """
    from fedseg.node.errors import NodeError
    from fedseg.node.launcher import NodeProcess

    subsets = {}
    for site in sites:
        folder = out / "data" / site.name
        subsets[site.name] = make_subset(data / site.folder, folder, limit, site.where, split_seed)
        extra = [*site.extra, "--split-seed", str(split_seed)]
        if site.where:
            extra += ["--where", f"{site.where[0]}={site.where[1]}"]
        nodes[site.name] = NodeProcess(site.name, folder, out / "nodes" / site.name, extra=extra)
        say(f"started node {site.name} ({subsets[site.name]['images']} images, "
            f"{subsets[site.name]['with_lesion']} with a lesion; pid {nodes[site.name].process.pid})")
    invites = {}
    for name, node in nodes.items():
        try:
            invites[name] = node.wait_ready(NODE_START_TIMEOUT_S)
        except NodeError as exc:
            raise SystemExit(f"error: {exc}") from None
    say("all nodes serving")
    return invites, subsets


def stop_nodes(nodes: dict[str, Any]) -> None:
    """SIGTERM to every node's process group at once, SIGKILL to what is left after 10 s; empties ``nodes``."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        list(pool.map(lambda node: node.stop(timeout_s=10), nodes.values()))
    left = [name for name, node in nodes.items() if _group_alive(node.process.pid)]
    if left:
        say(f"WARNING: processes of nodes {left} are still running")
    nodes.clear()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Reporter:
    """Prints one line per round with the run's label; keeps the node descriptions and round times."""

    label: str
    rounds: int
    lines: list[str] = field(default_factory=list)
    round_seconds: dict[int, float] = field(default_factory=dict)
    #: Print every n-th round (and the last); long in-process runs would flood the log.
    every: int = 1
    #: Each round's strategy summary (train loss, aggregation weights).
    summaries: dict[int, dict[str, Any]] = field(default_factory=dict)

    def info(self, text: str) -> None:
        self.lines.append(text)
        if not text.startswith("connecting"):
            say(f"{self.label}: {text}")

    def step(self, text: str) -> None:
        pass

    def round_done(self, round_: int, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        self.round_seconds[round_] = summary["seconds"]
        self.summaries[round_] = summary
        if round_ % self.every and round_ != self.rounds:
            return
        key = "personal_val_dice" if summary.get("stage") == "calibration" else "val_dice"
        dice = "  ".join(f"{r['site']} {r[key]:.3f}" for r in rows if key in r)
        pseudo = "  ".join(f"{r['site']} {r['pseudo_accepted']}/{r['pseudo_candidates']}" for r in rows if "pseudo_candidates" in r)
        loss = f"  loss {summary['train_loss']:.3f}" if "train_loss" in summary else ""
        stage = summary.get("stage") or f"round {round_:>2}/{self.rounds}"
        say(f"{self.label}: {stage} {summary['seconds']:5.1f} s{loss}  val Dice {dice}"
            + (f"  pseudo-labels accepted {pseudo}" if pseudo else ""))


def run_plan(plan: Any, invites: dict[str, Path], run_dir: Path, label: str) -> dict[str, Any]:
    """One federated run over the nodes' Syft datasites, recorded in ``run_dir``."""
    from fedseg.protocol.invite import load_invite
    from fedseg.protocol.rounds import run_federation
    from fedseg.protocol.syft_transport import SyftTransport

    shutil.rmtree(run_dir, ignore_errors=True)
    transports = [SyftTransport(load_invite(p), approval_timeout_s=120) for p in invites.values()]
    reporter = Reporter(label, plan.rounds)
    t0 = time.monotonic()
    rows = run_federation(plan, transports, run_dir, reporter, invites=[str(p) for p in invites.values()])
    return {"plan": plan.to_dict(), "seconds": time.monotonic() - t0, "round_seconds": reporter.round_seconds,
            "node_info": reporter.lines, "run_dir": str(run_dir), "rows": rows}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def git_commit() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty_files": len(git("status", "--porcelain").splitlines())}


def commit_label(commit: dict[str, Any]) -> str:
    return commit["commit"][:12] + (" (dirty)" if commit["dirty_files"] else "")


def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "platform": platform.platform(),
            "torch": metadata.version("torch"), "syft": _version("syft"), "gpu": _gpu(), "loadavg_start": os.getloadavg()[0]}


def _version(package: str) -> str | None:
    # In-process benchmarks run where Syft is not installed.
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def with_budget(args: argparse.Namespace, full: dict[str, Any], defaults: dict[str, Any]) -> argparse.Namespace:
    """Fills the budget options the user left unset from ``full`` (with ``--full``) or ``defaults``."""
    for key, value in (full if args.full else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def require_data(p: argparse.ArgumentParser, data: Path, folders: list[str]) -> None:
    """Exits with the missing site folders named, before any node starts."""
    missing = sorted({str(data / f) for f in folders if not (data / f / "images").is_dir()})
    if missing:
        p.exit(2, f"error: data not found: {', '.join(missing)}; pass --data\n")


def start_bench(args: argparse.Namespace, clear: tuple[str, ...] = ("runs", "nodes", "data")) -> tuple[Path, dict[str, Any]]:
    """The output folder, cleared of an earlier benchmark's runs, nodes and data, and the config to record."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in `finally` on SIGTERM too
    out = args.out.resolve()
    for sub in clear:
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out, {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def budget_parser(description: str, defaults: dict[str, Any], full: dict[str, Any]) -> argparse.ArgumentParser:
    """The options the federated benchmarks share: the budget (each value, or ``--full``), the
    optimizer, threads per node, the split seed and the data root. Unset budget values are
    filled by :func:`with_budget`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--full", action="store_true", help=f"longer budget: {full} (explicit flags still win)")
    p.add_argument("--rounds", type=int, help=f"rounds after the evaluation-only round 0 (default {defaults['rounds']})")
    p.add_argument("--limit", type=int, help=f"images per site, a seeded random subset; 0 = all (default {defaults['limit']})")
    p.add_argument("--seeds", type=int, help=f"plan seeds 0..N-1 per method (default {defaults['seeds']})")
    p.add_argument("--image-size", type=int, help=f"default {defaults['image_size']}")
    p.add_argument("--width", type=int, help=f"U-Net first-level channels (default {defaults['width']})")
    p.add_argument("--depth", type=int, help=f"U-Net down-samplings (default {defaults['depth']})")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per node")
    p.add_argument("--split-seed", type=int, default=0, help="node split seed and subset sampling seed")
    p.add_argument("--data", type=Path, default=DATA)
    return p


def check_budget(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.rounds < 1 or args.seeds < 1 or (args.limit and args.limit < 10):
        p.error("--rounds and --seeds must be >= 1, --limit 0 or >= 10")


def write_results(out: Path, name: str, record: dict[str, Any], md: str, figures: list[str], wall_s: float) -> None:
    """Writes ``<out>/<name>.json`` and ``<out>/<name>.md`` and prints the table."""
    # NumPy and torch scalars keep their numeric value; anything else (paths) is written as text.
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    (out / f"{name}.md").write_text(md)
    print()
    print(md)
    say(f"wrote {out / name}.json, {name}.md and {', '.join(figures) or 'no figure'} ({wall_s / 60:.1f} min)")


# ----------------------------------------------------------------- runs without Syft


class InProcessTransport:
    """A :class:`fedseg.protocol.rounds.Transport` to a node in this process: every frame goes
    straight to the node's own dispatcher (:func:`fedseg.node.actions.handle`), so the node
    validates, trains and answers exactly as a datasite does, without Syft.

    Nodes given one ``lock`` take turns, so a job of several nodes uses only its own threads.
    """

    def __init__(self, runtime: Any, lock: threading.Lock | None = None) -> None:
        self.runtime = runtime
        self.name = runtime.name
        self.lock = lock or contextlib.nullcontext()
        self.bytes_sent = 0
        self.bytes_received = 0

    def connect(self) -> None:
        pass

    def exchange(self, frame: bytes) -> bytes:
        from fedseg.node.actions import handle

        with self.lock:
            reply = handle(self.runtime, frame)
        self.bytes_sent += len(frame)
        self.bytes_received += len(reply)
        return reply


def run_plan_in_process(plan: Any, runtimes: list[Any], run_dir: Path, label: str, every: int = 1) -> dict[str, Any]:
    """One federated run over in-process nodes, recorded in ``run_dir``; same result shape as :func:`run_plan`.

    The run's own Dice plot is not drawn: redrawn every round from every row, it cost
    more CPU than a 64 px round's training on a GPU, and the benchmark draws its own.
    """
    from fedseg.protocol import rounds
    from fedseg.protocol.rounds import run_federation

    rounds.plot_dice = lambda rows, path, title: None  # this process only serves benchmark runs
    shutil.rmtree(run_dir, ignore_errors=True)
    reporter = Reporter(label, plan.rounds, every=every)
    t0 = time.monotonic()
    rows = run_federation(plan, [InProcessTransport(rt) for rt in runtimes], run_dir, reporter)
    return {"plan": plan.to_dict(), "seconds": time.monotonic() - t0, "round_seconds": reporter.round_seconds,
            "summaries": reporter.summaries, "node_info": reporter.lines, "run_dir": str(run_dir), "rows": rows}


def run_jobs(fn: Any, jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Runs ``fn(job)`` for every job in ``workers`` spawned processes (in this one if 1).

    A job that raises, or whose worker process dies, becomes ``{**job, "error": traceback}``,
    and the others still finish. Says after each job how many are done and about how long the rest will take.
    Results come back in the order of ``jobs``.
    """
    import traceback
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing as mp

    results: dict[int, dict[str, Any]] = {}
    t0 = time.monotonic()

    def finish(i: int, result: dict[str, Any]) -> None:
        results[i] = result
        per_job = (time.monotonic() - t0) / len(results)
        say(f"{len(results)}/{len(jobs)} jobs done; ~{per_job * (len(jobs) - len(results)) / 60:.1f} min to go")

    def failed(job: dict[str, Any], text: str) -> dict[str, Any]:
        say(f"job {job} FAILED:\n{text}")
        return {**job, "error": text}

    if workers <= 1:
        for i, job in enumerate(jobs):
            try:
                result = fn(job)
            except Exception:
                result = failed(job, traceback.format_exc())
            finish(i, result)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    result = future.result()
                except Exception:
                    result = failed(jobs[i], traceback.format_exc())
                finish(i, result)
    return [results[i] for i in range(len(jobs))]

