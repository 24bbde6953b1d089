"""Benchmark one federated round: real Syft nodes against the same work without Syft.

Runs the three polyp sites as real PySyft datasites (``fedseg node start``) for a few
FedAvg rounds and, in the same run and interleaved round by round, the identical
federation without Syft: the same round engine (:func:`run_federation`) and the same
node dispatcher (:func:`fedseg.node.actions.handle`) in three worker processes reached
through pipes. After each round each worker also runs a bare PyTorch loop (Adam + the
same DiceBCE loss) on exactly the batches its node trained on. Writes
``<out>/bench_round.json`` (config, git commit, machine, every raw timing) and
``<out>/bench_round.md`` (measured ratios against their goals), and prints the Markdown.

    python scripts/bench_round.py --rounds 2 --limit 60 --width 8
    python scripts/bench_round.py            # 3 rounds, 300 images per site, 128 px
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from benchlib import REPO, Site, commit_label, git_commit, machine_info, say, start_nodes, stop_nodes, write_results

SITES = ("Kvasir-SEG", "CVC-ClinicDB", "CVC-ColonDB")
#: The nodes benchlib starts: each site's data folder under ``--data`` is named after it.
NODE_SITES = [Site(name, name) for name in SITES]
GOAL_ROUND_RATIO = 1.10  # Syft round wall time / in-process round wall time, at most
GOAL_THROUGHPUT_RATIO = 0.95  # node training samples/s / bare PyTorch loop samples/s, at least
MB = 1e6


# --------------------------------------------------------------- in-process nodes


def worker_main(config: Any, conn: Any) -> None:
    """One site without Syft: the node's own dispatcher behind a pipe, plus the bare loop."""
    # Its own session, like each `fedseg node start`: with the kernel's autogroup scheduling
    # (sched_autogroup_enabled=1) CPU is shared per session, so three workers in the
    # coordinator's session would get the CPU share of one Syft node.
    os.setsid()
    from fedseg.node.actions import NodeRuntime, handle, log_to_workdir
    from fedseg.protocol.messages import decode
    from fedseg.protocol.wire import decode_frame

    log_to_workdir(Path(config.workdir))  # the real node logs each request to its workdir too
    rt = NodeRuntime(config)
    last_train: bytes | None = None
    while True:
        command, payload = conn.recv()
        if command == "stop":
            return
        try:
            if command == "frame":
                if decode_frame(payload, rt.config.max_message_mb * 2**20).kind == "train":
                    last_train = payload
                conn.send(("ok", handle(rt, payload)))
            elif command == "bare":
                conn.send(("ok", bare_round(rt, decode(last_train, rt.config.max_message_mb * 2**20))))
        except Exception:  # report to the parent instead of hanging it
            conn.send(("error", traceback.format_exc()))


def bare_round(rt: Any, request: Any) -> dict[str, float]:
    """A bare PyTorch loop on the batches ``request`` made the node train on.

    Same weights, plan and round seed as the node's train request; the shuffle and
    augmentation of :meth:`LocalTrainer.train_round` are replayed before the clock
    starts, so the timed loop is forward, loss, backward, step, zero_grad only.
    """
    import torch

    from fedseg.models.augment import augment_batch
    from fedseg.models.losses import DiceBCELoss
    from fedseg.node.actions import round_seed
    from fedseg.protocol.plan import Plan

    plan = Plan.from_dict(request.plan)
    cfg = plan.train
    images, masks = rt.images("train", plan), rt.masks("train", plan)
    model = rt.model(plan, request.run_id, request.weights, "bare loop weights")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        # Replays LocalTrainer.train_round's batch order and augmentation draw for draw.
        t0 = time.perf_counter()
        x, y = images.float() / 255, masks.float()
        n = x.shape[0]
        gen = torch.Generator().manual_seed(round_seed(plan.seed, request.round, rt.name))
        total = math.ceil(cfg.local_epochs * n - 1e-9)
        steps = math.ceil(total / cfg.batch_size)
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(total / n))])
        batches = []
        for step in range(steps):
            idx = order[step * cfg.batch_size : min((step + 1) * cfg.batch_size, total)]
            xb, yb = x[idx], y[idx]  # (b, C, H, W), (b, 1, H, W)
            batches.append(augment_batch(xb, yb, gen) if cfg.augment else (xb, yb))
        prepare_s = time.perf_counter() - t0

        loss_fn = DiceBCELoss(cfg.lambda_dice, cfg.lambda_bce)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        for xb, yb in batches:
            loss = loss_fn(model(xb), yb).total
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(prev_threads)
    return {"samples": total, "steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds, "prepare_seconds": prepare_s}


class PipeTransport:
    """A :class:`fedseg.protocol.rounds.Transport` to a worker process: frames over a pipe."""

    def __init__(self, name: str, conn: Any) -> None:
        self.name = name
        self.conn = conn
        self.bytes_sent = 0
        self.bytes_received = 0

    def connect(self) -> None:
        pass

    def call(self, command: str, payload: Any) -> Any:
        self.conn.send((command, payload))
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"in-process worker {self.name} failed:\n{result}")
        return result

    def exchange(self, frame: bytes) -> bytes:
        reply = self.call("frame", frame)
        self.bytes_sent += len(frame)
        self.bytes_received += len(reply)
        return reply


def start_workers(configs: dict[str, Any]) -> tuple[list[Any], dict[str, PipeTransport]]:
    ctx = mp.get_context("spawn")
    procs, transports = [], {}
    for site, config in configs.items():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(config, child), name=f"bench-{site}", daemon=True)
        proc.start()
        procs.append(proc)
        transports[site] = PipeTransport(site, parent)
    return procs, transports


def stop_workers(procs: list[Any], transports: dict[str, PipeTransport]) -> None:
    for t in transports.values():
        try:
            t.conn.send(("stop", None))
        except (OSError, ValueError):
            pass
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


# ----------------------------------------------------------------- measurement


def read_cpu(groups: dict[str, int], pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) so far of each node: a Syft node's whole process group, or a worker's pid.

    Also ``coordinator``: this process (all its threads, not its children). CPU time is what
    the shared machine's other load cannot inflate, unlike wall time.
    """
    tick = os.sysconf("SC_CLK_TCK")
    by_group: dict[int, float] = {}
    by_pid: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()  # fields 3.. of proc(5): state, ppid, pgrp, ...
        cpu = (int(rest[11]) + int(rest[12])) / tick  # utime + stime
        by_group[int(rest[2])] = by_group.get(int(rest[2]), 0.0) + cpu
        by_pid[int(entry)] = cpu
    out = {name: by_group.get(pgid, 0.0) for name, pgid in groups.items()}
    out.update({name: by_pid.get(pid, 0.0) for name, pid in pids.items()})
    out["coordinator"] = time.process_time()
    return out


class TimedTransport:
    """Wraps a transport and records each call: kind, round, wall time, node-side seconds."""

    def __init__(self, inner: Any, max_bytes: int, cpu: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_bytes = max_bytes
        self.cpu = cpu  # () -> {name: CPU seconds}
        self.calls: list[dict[str, Any]] = []

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    def connect(self) -> None:
        self.inner.connect()

    def exchange(self, frame: bytes) -> bytes:
        from fedseg.protocol.wire import decode_frame

        cpu0 = self.cpu()[self.name]
        t0 = time.perf_counter()
        reply = self.inner.exchange(frame)
        seconds = time.perf_counter() - t0
        node_cpu = self.cpu()[self.name] - cpu0
        request, answer = decode_frame(frame, self.max_bytes), decode_frame(reply, self.max_bytes)
        self.calls.append({
            "kind": request.kind, "round": request.fields.get("round"), "seconds": seconds, "node_cpu_seconds": node_cpu,
            "node_seconds": answer.fields.get("seconds"), "sent": len(frame), "received": len(reply),
        })
        return reply


class Lockstep:
    """Lets the two federations take turns round by round, so machine noise hits both alike."""

    def __init__(self, first: str) -> None:
        self.turn = first
        self.failed: str | None = None
        self.cond = threading.Condition()

    def wait(self, side: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == side or self.failed is not None)
            if self.failed is not None:
                raise RuntimeError(f"stopping: {self.failed}")

    def hand_over(self, to: str) -> None:
        with self.cond:
            self.turn = to
            self.cond.notify_all()

    def fail(self, why: str) -> None:
        with self.cond:
            self.failed = why
            self.cond.notify_all()


class SideReporter:
    """A :class:`fedseg.protocol.rounds.Reporter` that records and prints one side's rounds."""

    def __init__(self, side: str, other: str, lockstep: Lockstep, transports: list[Any], rounds: int, cpu: Any, after_round: Any = None) -> None:
        self.side, self.other, self.lockstep = side, other, lockstep
        self.transports, self.rounds, self.cpu, self.after_round = transports, rounds, cpu, after_round
        self.cpu_marks: dict[str, dict[int, dict[str, float]]] = {"start": {}, "end": {}}  # taken when the turn starts and ends
        self.summaries: dict[int, dict[str, Any]] = {}
        self.rows: dict[int, list[dict[str, Any]]] = {}
        self.bytes: dict[int, dict[str, list[int]]] = {}  # cumulative [sent, received] after each round

    def info(self, text: str) -> None:
        say(f"[{self.side}] {text}")

    def step(self, text: str) -> None:
        """In-round progress; left out so the log shows one line per round."""

    def mark(self, which: str, round_: int) -> None:
        self.cpu_marks[which][round_] = {"wall": time.monotonic(), **self.cpu()}

    def start(self) -> None:
        self.lockstep.wait(self.side)
        self.mark("start", 0)

    def round_done(self, round_: int, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        # The engine stopped its clock before calling this, so the work below is not timed.
        self.mark("end", round_)
        self.summaries[round_], self.rows[round_] = dict(summary), rows
        self.bytes[round_] = {t.name: [t.bytes_sent, t.bytes_received] for t in self.transports}
        train = f", training phase {summary['train_seconds']:.1f} s" if "train_seconds" in summary else " (evaluation only)"
        dice = " ".join(f"{r['site']} {r['val_dice']:.3f}" for r in rows)
        say(f"[{self.side}] round {round_}/{self.rounds}: {summary['seconds']:.1f} s{train}; val Dice {dice}")
        if self.after_round is not None:
            self.after_round(round_)
        self.lockstep.hand_over(self.other)
        if round_ < self.rounds:
            self.lockstep.wait(self.side)
            self.mark("start", round_ + 1)


def run_side(plan: Any, transports: list[Any], out: Path, reporter: SideReporter, errors: dict[str, str]) -> None:
    from fedseg.protocol.rounds import run_federation

    try:
        reporter.start()
        run_federation(plan, transports, out, reporter)
    except BaseException as exc:  # noqa: BLE001 - the other side must not wait forever
        errors[reporter.side] = traceback.format_exc()
        reporter.lockstep.fail(f"{reporter.side} side failed: {type(exc).__name__}: {exc}")


def run_bare(transports: dict[str, PipeTransport], round_: int, bare: dict[int, dict[str, Any]]) -> None:
    if round_ == 0:
        return
    for t in transports.values():  # all three at once, as the nodes train
        t.conn.send(("bare", None))
    bare[round_] = {}
    for name, t in transports.items():
        status, result = t.conn.recv()
        if status != "ok":
            raise RuntimeError(f"bare loop on {name} failed:\n{result}")
        bare[round_][name] = result
    text = ", ".join(f"{n} {r['samples'] / r['seconds']:.1f}" for n, r in bare[round_].items())
    say(f"[bare]  round {round_}: samples/s {text}")


# --------------------------------------------------------------------- results


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def per_round_bytes(snapshots: dict[int, dict[str, list[int]]]) -> dict[int, dict[str, dict[str, int]]]:
    out, prev = {}, None
    for round_ in sorted(snapshots):
        out[round_] = {}
        for name, (sent, received) in snapshots[round_].items():
            before = prev[name] if prev else [0, 0]
            out[round_][name] = {"sent": sent - before[0], "received": received - before[1]}
        prev = snapshots[round_]
    return out


def summarize(plan: Any, syft: SideReporter, local: SideReporter, bare: dict[int, dict[str, Any]],
              syft_calls: list[TimedTransport], local_calls: list[TimedTransport], payload_bytes: int) -> dict[str, Any]:
    rounds = [r for r in sorted(syft.summaries) if r >= 1]
    sides = {"syft": (syft, syft_calls), "inproc": (local, local_calls)}

    def round_cpu(reporter: SideReporter, r: int) -> float:
        start, end = reporter.cpu_marks["start"][r], reporter.cpu_marks["end"][r]
        return sum(end[k] - start[k] for k in end if k != "wall")

    def idle_cpu_share(site: str) -> float:
        # A Syft node's CPU while the in-process side and the bare loop run, per second of wall time.
        gaps = [(syft.cpu_marks["start"][r + 1], syft.cpu_marks["end"][r]) for r in range(max(rounds))]
        return sum(a[site] - b[site] for a, b in gaps) / sum(a["wall"] - b["wall"] for a, b in gaps)

    def calls(side: str, kind: str, site: str | None = None) -> list[dict[str, Any]]:
        return [c for t in sides[side][1] if site in (None, t.name) for c in t.calls if c["kind"] == kind and (c["round"] or 0) >= 1]

    def processed(row: dict[str, Any]) -> int:
        return math.ceil(plan.train.local_epochs * row["train_n"] - 1e-9)

    nodes: dict[str, dict[str, float]] = {}
    for site in SITES:
        node_rows = [row for r in rounds for row in syft.rows[r] if row["site"] == site]
        local_rows = [row for r in rounds for row in local.rows[r] if row["site"] == site]
        n = nodes[site] = {
            "samples": sum(processed(row) for row in node_rows),
            "node_seconds": sum(row["train_seconds"] for row in node_rows),
            "inproc_seconds": sum(row["train_seconds"] for row in local_rows),
            "bare_seconds": sum(bare[r][site]["seconds"] for r in rounds),
            "augment_seconds": sum(bare[r][site]["prepare_seconds"] for r in rounds),
            "node_call_cpu": sum(c["node_cpu_seconds"] for c in calls("syft", "train", site)),
            "inproc_call_cpu": sum(c["node_cpu_seconds"] for c in calls("inproc", "train", site)),
            "bare_cpu": sum(bare[r][site]["cpu_seconds"] for r in rounds),
        }
        for key in ("node", "inproc", "bare"):
            n[f"{key}_samples_per_s"] = n["samples"] / n[f"{key}_seconds"]
        n["throughput_ratio"] = n["node_samples_per_s"] / n["bare_samples_per_s"]
    total = {k: sum(n[k] for n in nodes.values()) for k in next(iter(nodes.values())) if not k.endswith(("_per_s", "_ratio"))}

    syft_s = [syft.summaries[r]["seconds"] for r in rounds]
    local_s = [local.summaries[r]["seconds"] for r in rounds]
    syft_cpu = [round_cpu(syft, r) for r in rounds]
    local_cpu = [round_cpu(local, r) for r in rounds]
    syft_bytes, local_bytes = per_round_bytes(syft.bytes), per_round_bytes(local.bytes)
    per_node_round = [syft_bytes[r][site] for r in rounds for site in SITES]
    dice_diff = max(
        (abs(a["val_dice"] - b["val_dice"]) for r in syft.rows for a, b in zip(syft.rows[r], local.rows[r])),
        default=float("nan"),
    )
    return {
        "rounds_timed": rounds,
        # Wall time, as the goals are defined.
        "round_ratio": median(syft_s) / median(local_s),
        "round_ratio_paired": [a / b for a, b in zip(syft_s, local_s)],
        "round_seconds_syft": syft_s,
        "round_seconds_inproc": local_s,
        "train_phase_ratio": median([syft.summaries[r]["train_seconds"] for r in rounds]) / median([local.summaries[r]["train_seconds"] for r in rounds]),
        "round0_seconds": {"syft": syft.summaries[0]["seconds"], "inproc": local.summaries[0]["seconds"]},
        "throughput_ratio": total["bare_seconds"] / total["node_seconds"],
        "node_samples_per_s": total["samples"] / total["node_seconds"],
        "inproc_samples_per_s": total["samples"] / total["inproc_seconds"],
        "bare_samples_per_s": total["samples"] / total["bare_seconds"],
        "bare_plus_augment_ratio": (total["bare_seconds"] + total["augment_seconds"]) / total["node_seconds"],
        "call_wall_beyond_training_s": {
            side: {"train": median([c["seconds"] - c["node_seconds"] for c in calls(side, "train")]),
                   "evaluate": median([c["seconds"] for c in calls(side, "evaluate")])}
            for side in sides
        },
        # CPU time (coordinator + the side's three node processes): what other load on the machine cannot inflate.
        "round_cpu_syft": syft_cpu,
        "round_cpu_inproc": local_cpu,
        "cpu_round_ratio": median(syft_cpu) / median(local_cpu),
        "coordinator_cpu_per_round": {name: median([r.cpu_marks["end"][k]["coordinator"] - r.cpu_marks["start"][k]["coordinator"] for k in rounds])
                                      for name, r in (("syft", syft), ("inproc", local))},
        "node_cpu_per_call": {
            side: {kind: median([c["node_cpu_seconds"] for c in calls(side, kind)]) for kind in ("train", "evaluate")} for side in sides
        },
        "cpu_throughput_ratio": total["bare_cpu"] / total["node_call_cpu"],
        "inproc_cpu_throughput_ratio": total["bare_cpu"] / total["inproc_call_cpu"],
        "syft_idle_node_cpu_share": {site: idle_cpu_share(site) for site in SITES},
        "nodes": nodes,
        "bytes_per_round": {"syft": syft_bytes, "inproc": local_bytes},
        "mb_sent_per_node_round": median([b["sent"] / MB for b in per_node_round]),
        "mb_received_per_node_round": median([b["received"] / MB for b in per_node_round]),
        "weight_payload_mb": payload_bytes / MB,
        "max_val_dice_diff_syft_vs_inproc": dice_diff,
    }


def markdown(res: dict[str, Any], config: dict[str, Any], machine: dict[str, Any], commit: str) -> str:
    def verdict(ok: bool) -> str:
        return "pass" if ok else "**FAIL**"

    wall, cpu = res["call_wall_beyond_training_s"], res["node_cpu_per_call"]
    first, last = res["rounds_timed"][0], res["rounds_timed"][-1]
    lines = [
        "# Round benchmark: Syft nodes vs the same rounds without Syft",
        "",
        f"commit `{commit}`; {config['rounds']} rounds, {config['limit'] or 'all'} images per site, "
        f"{config['image_size']} px, U-Net width {config['width']} depth {config['depth']}, {config['threads']} torch thread(s) per node; "
        f"{machine['nproc']} CPUs, torch {machine['torch']}, syft {machine['syft']}; "
        f"1-min load average {machine['loadavg_start']:.1f} at start, {machine['loadavg_end']:.1f} at end.",
        "",
        "| measure | measured | goal | result |",
        "|---|---|---|---|",
        f"| round wall time, Syft ÷ in-process (median of rounds {first}–{last}) "
        f"| {res['round_ratio']:.3f} ({median(res['round_seconds_syft']):.1f} s ÷ {median(res['round_seconds_inproc']):.1f} s) "
        f"| ≤ {GOAL_ROUND_RATIO:.2f} | {verdict(res['round_ratio'] <= GOAL_ROUND_RATIO)} |",
        f"| node training throughput ÷ bare PyTorch loop, same batches (wall time) "
        f"| {res['throughput_ratio']:.3f} ({res['node_samples_per_s']:.1f} ÷ {res['bare_samples_per_s']:.1f} samples/s per node) "
        f"| ≥ {GOAL_THROUGHPUT_RATIO:.2f} | {verdict(res['throughput_ratio'] >= GOAL_THROUGHPUT_RATIO)} |",
        f"| bytes per node per round, sent / received (median) | {res['mb_sent_per_node_round']:.2f} MB / {res['mb_received_per_node_round']:.2f} MB "
        f"| — | weights are {res['weight_payload_mb']:.2f} MB |",
        "",
        "CPU-time view of the same run (user + system seconds of the coordinator and the three node processes; "
        "other load on the machine does not inflate it, so it is steadier than wall time; not the goals' definition):",
        "",
        "| measure | Syft | in-process | ratio |",
        "|---|---|---|---|",
        f"| CPU per round (median) | {median(res['round_cpu_syft']):.1f} s | {median(res['round_cpu_inproc']):.1f} s | {res['cpu_round_ratio']:.3f} |",
        f"| coordinator CPU per round (median) | {res['coordinator_cpu_per_round']['syft']:.2f} s | {res['coordinator_cpu_per_round']['inproc']:.2f} s | |",
        f"| node CPU per train call (median) | {cpu['syft']['train']:.2f} s | {cpu['inproc']['train']:.2f} s | {cpu['syft']['train'] / cpu['inproc']['train']:.3f} |",
        f"| node CPU per evaluate call (median) | {cpu['syft']['evaluate']:.2f} s | {cpu['inproc']['evaluate']:.2f} s | {cpu['syft']['evaluate'] / cpu['inproc']['evaluate']:.3f} |",
        f"| bare-loop CPU ÷ node CPU of the train calls (samples per CPU-second vs bare) | {res['cpu_throughput_ratio']:.3f} | "
        f"{res['inproc_cpu_throughput_ratio']:.3f} | |",
        "",
        "An idle Syft node (while the other side runs) uses "
        + ", ".join(f"{site} {share:.1%}" for site, share in res["syft_idle_node_cpu_share"].items())
        + " of one CPU (its approval-polling loop and the datasite server).",
        "",
        "## Rounds (wall time)",
        "",
        "| round | Syft s | in-process s | ratio |",
        "|---|---|---|---|",
        f"| 0 (evaluation only, includes data loading; not in the ratio) | {res['round0_seconds']['syft']:.1f} | {res['round0_seconds']['inproc']:.1f} "
        f"| {res['round0_seconds']['syft'] / res['round0_seconds']['inproc']:.3f} |",
    ]
    for r, a, b, q in zip(res["rounds_timed"], res["round_seconds_syft"], res["round_seconds_inproc"], res["round_ratio_paired"]):
        lines.append(f"| {r} | {a:.1f} | {b:.1f} | {q:.3f} |")
    lines += [
        "",
        f"Training phase only (train fan-out + aggregation), Syft ÷ in-process: {res['train_phase_ratio']:.3f}. "
        f"Median wall time of a train call beyond the node's own training: {wall['syft']['train']:.2f} s over Syft, "
        f"{wall['inproc']['train']:.2f} s over a pipe; of a whole evaluate call: {wall['syft']['evaluate']:.2f} s vs {wall['inproc']['evaluate']:.2f} s.",
        f"Largest validation-Dice difference between the two federations: {res['max_val_dice_diff_syft_vs_inproc']:.2e} "
        "(0: both trained identically).",
        "",
        "## Training throughput per node (rounds ≥ 1)",
        "",
        "| node | samples | Syft node samples/s | in-process trainer samples/s | bare loop samples/s | node ÷ bare | "
        "augmentation s (outside the bare loop) | node CPU s in train calls, Syft / in-process | bare CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for site, n in res["nodes"].items():
        lines.append(f"| {site} | {n['samples']} | {n['node_samples_per_s']:.1f} | {n['inproc_samples_per_s']:.1f} | "
                     f"{n['bare_samples_per_s']:.1f} | {n['throughput_ratio']:.3f} | {n['augment_seconds']:.1f} | "
                     f"{n['node_call_cpu']:.1f} / {n['inproc_call_cpu']:.1f} | {n['bare_cpu']:.1f} |")
    lines += [
        "",
        f"Wall time: the in-process trainer (same `LocalTrainer`, no Syft) reaches {res['inproc_samples_per_s'] / res['bare_samples_per_s']:.3f} "
        f"of the bare loop; bare loop plus the augmentation the trainer does inside its clock: {res['bare_plus_augment_ratio']:.3f} of the node's time.",
        "",
        "## Bytes per node per round (fedseg frames, MB sent / received)",
        "",
        "| round | " + " | ".join(SITES) + " |",
        "|---|" + "---|" * len(SITES),
    ]
    for r, per in res["bytes_per_round"]["syft"].items():
        lines.append(f"| {r} | " + " | ".join(f"{per[s]['sent'] / MB:.2f} / {per[s]['received'] / MB:.2f}" for s in SITES) + " |")
    lines += [
        "",
        "## Method",
        "",
        "- Both federations run the same round engine (`run_federation`) with the same plan and seeds; only the transport "
        "differs. Syft side: three `fedseg node start` datasites on loopback, one `SyftTransport` each. In-process side: "
        "three worker processes, each holding a `NodeRuntime` built from the node's own `node.json` and serving frames with "
        "the node's dispatcher `fedseg.node.actions.handle` (train → `LocalTrainer.train_round` with `round_seed`, evaluate on "
        "val+test), reached through a `multiprocessing` pipe; FedAvg averages with `weighted_average` on both sides. The "
        "Dice check above confirms both sides did the identical training.",
        "- Three processes, not threads or one sequential loop, because the Syft nodes are three processes training at the "
        "same time on the same CPUs: one process per site with the same torch thread count reproduces that contention, "
        "whereas threads would share one GIL (augmentation is per-sample Python) and a sequential loop would avoid it. "
        "Each worker calls `os.setsid()` as each node runs in its own session: with the kernel's autogroup scheduling "
        "CPU is shared per session, and without it the three workers got about half the CPU of the three nodes.",
        "- Rounds are interleaved: Syft round r, then in-process round r, then the bare loop of round r, so drift in the "
        "machine's load hits all three alike. Round wall time is the engine's own `summary['seconds']` (train fan-out, "
        "aggregation, evaluation fan-out, metrics/checkpoint/report write), the same scope on both sides.",
        "- Bare loop: in each worker, the round's global weights, Adam with the plan's lr and weight decay, the same DiceBCE "
        "loss and batch size, on exactly the node's batches (shuffle and augmentation replayed from the round seed before the "
        "clock starts); the timed loop is forward, loss, backward, step, zero_grad; the three workers run it at the same time. "
        "The node's throughput is its reported `train_seconds` (inside `train_round`, which also converts to float, augments "
        "and clips gradients).",
        "- CPU seconds come from `/proc/<pid>/stat` (utime + stime) of each Syft node's process group (CLI + datasite server) "
        "or each worker process, read before and after every call and at the start and end of every round; the coordinator "
        "counts via `time.process_time()`. A node's CPU in a train call includes decoding, model build, training and encoding, "
        "and on the Syft side Syft's request handling and the node's approval-polling loop.",
        "- Bytes are the fedseg frames counted by the transports (train + evaluate requests and replies; round 0 also holds "
        "the describe exchange). Syft's own serialization, blob storage and HTTP overhead come on top and are not counted.",
    ]
    return "\n".join(lines) + "\n"


def raw_side(reporter: SideReporter, transports: list[TimedTransport]) -> dict[str, Any]:
    return {"summaries": reporter.summaries, "rows": reporter.rows, "bytes": reporter.bytes,
            "cpu_marks": reporter.cpu_marks, "calls": {t.name: t.calls for t in transports}}


# ------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="FedAvg rounds after the evaluation-only round 0")
    p.add_argument("--limit", type=int, default=300, help="images per site; 0 = all")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--width", type=int, default=16, help="U-Net channels at the first level")
    p.add_argument("--depth", type=int, default=4, help="U-Net down-samplings")
    p.add_argument("--threads", type=int, default=1, help="torch threads per node")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_round")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "polyp", help="folder holding " + ", ".join(SITES))
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.limit != 0 and args.limit < 3:
        p.error("--limit must be 0 (all images) or >= 3")
    missing = [s for s in SITES if not (args.data / s / "images").is_dir()]
    if missing:
        p.exit(2, f"error: polyp data not found: {', '.join(str(args.data / s) for s in missing)} missing; pass --data\n")
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in `finally` on SIGTERM too
    from fedseg.node.config import NodeConfig
    from fedseg.protocol.cli import plan_from_options
    from fedseg.protocol.plan import Plan
    from fedseg.protocol.rounds import initial_arrays
    from fedseg.protocol.invite import load_invite
    from fedseg.protocol.syft_transport import SyftTransport

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    plan = Plan.from_dict(plan_from_options({}, {
        "rounds": args.rounds, "image_size": args.image_size, "width": args.width, "depth": args.depth, "threads": args.threads,
    }))
    out = args.out.resolve()
    for sub in ("data", "nodes", "inproc_nodes", "syft_run", "inproc_run"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    commit, machine = git_commit(), machine_info()
    payload_bytes = sum(a.nbytes for a in initial_arrays(plan).values())
    say(f"plan: {args.rounds} rounds, {args.image_size} px, width {args.width}, depth {args.depth}, {args.threads} thread(s)/node; "
        f"weights {payload_bytes / MB:.2f} MB; {machine['nproc']} CPUs, load {machine['loadavg_start']:.2f}")

    nodes: dict[str, Any] = {}
    procs: list[Any] = []
    pipes: dict[str, PipeTransport] = {}
    t_start = time.monotonic()
    try:
        invites, _ = start_nodes(NODE_SITES, args.data.resolve(), out, args.limit, 0, nodes)
        say(f"all nodes serving after {time.monotonic() - t_start:.0f} s; starting the in-process workers")
        configs = {}
        for site, node in nodes.items():
            (out / "inproc_nodes" / site).mkdir(parents=True)
            configs[site] = dataclasses.replace(NodeConfig.load(node.workdir), workdir=str(out / "inproc_nodes" / site))
        procs, pipes = start_workers(configs)

        # Both sides read all CPU counters in one /proc scan, so metering costs them alike.
        groups = {f"syft:{s}": nodes[s].process.pid for s in SITES}
        worker_pids = {f"inproc:{s}": p.pid for s, p in zip(SITES, procs)}

        def cpu_of(side: str) -> Any:
            return lambda: {k.split(":", 1)[-1]: v for k, v in read_cpu(groups, worker_pids).items() if k.startswith(side) or k == "coordinator"}

        lockstep = Lockstep(first="syft")
        syft_transports = [TimedTransport(SyftTransport(load_invite(invites[s]), approval_timeout_s=120), plan.max_message_bytes, cpu_of("syft")) for s in SITES]
        local_transports = [TimedTransport(pipes[s], plan.max_message_bytes, cpu_of("inproc")) for s in SITES]
        bare: dict[int, dict[str, Any]] = {}
        syft = SideReporter("syft", "inproc", lockstep, syft_transports, plan.rounds, cpu_of("syft"))
        local = SideReporter("inproc", "syft", lockstep, local_transports, plan.rounds, cpu_of("inproc"), after_round=lambda r: run_bare(pipes, r, bare))
        errors: dict[str, str] = {}
        threads = [
            threading.Thread(target=run_side, args=(plan, syft_transports, out / "syft_run", syft, errors), daemon=True),
            threading.Thread(target=run_side, args=(plan, local_transports, out / "inproc_run", local, errors), daemon=True),
        ]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
        if errors:
            raise SystemExit("benchmark failed:\n" + "\n".join(f"--- {side}\n{tb}" for side, tb in errors.items()))
    finally:
        say("stopping workers and nodes")
        stop_workers(procs, pipes)
        stop_nodes(nodes)

    machine["loadavg_end"] = os.getloadavg()[0]
    res = summarize(plan, syft, local, bare, syft_transports, local_transports, payload_bytes)
    md = markdown(res, config, machine, commit_label(commit))
    record = {
        "config": config, "plan": plan.to_dict(), "git": commit, "machine": machine,
        "wall_seconds": time.monotonic() - t_start, "results": res,
        "raw": {
            "syft": raw_side(syft, syft_transports),
            "inproc": raw_side(local, local_transports),
            "bare": bare,
        },
    }
    write_results(out, "bench_round", record, md, [], record["wall_seconds"])


if __name__ == "__main__":
    main()
