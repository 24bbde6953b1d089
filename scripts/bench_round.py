"""Benchmark one federated round: real Syft nodes against the same work without Syft.

Runs the three polyp sites as real PySyft datasites (``fedseg node start``) for a few
FedAvg rounds and, in the same run and interleaved round by round, the identical
federation without Syft: the same round engine (:func:`run_federation`) and the same
node dispatcher (:func:`fedseg.node.actions.handle`) in three worker processes reached
through pipes. After each round each worker also runs a bare PyTorch loop (Adam + the
same DiceBCE loss) on exactly the batches its node trained on. Writes
``<out>/bench_round.json`` (config, git commit, machine, every raw timing) and
``<out>/bench_round.md`` (measured ratios against their goals), and prints the Markdown.

    python scripts/bench_round.py --setting small --rounds 2 --width 8      # a quick look
    python scripts/bench_round.py --results scripts/results                 # 3 rounds, 300 images per site, 128 px
    python scripts/bench_round.py --setting small --results scripts/results # 60 images per site, 64 px
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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
#: Syft round wall time / in-process round wall time, at most, per setting.
GOAL_ROUND_RATIO = {"defaults": 1.10, "small": 1.25}
GOAL_CPU_RATIO = 1.10  # Syft round CPU time / in-process round CPU time, at most (set for the defaults)
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


def turn_of(kind: str, round_: int | None, rounds: int) -> int:
    """The turn a call belongs to: 0 is the describe exchange and round 0's evaluation, r the
    training round r (round r-1's scoring rides on it from r = 2), rounds + 1 the last round's
    own evaluation."""
    if kind == "describe" or (kind == "evaluate" and round_ == 0):
        return 0
    return rounds + 1 if kind == "evaluate" else int(round_)


class Lockstep:
    """Lets the two federations take turns, so machine noise hits both alike."""

    def __init__(self, first: str) -> None:
        self.turn = first
        self.failed: str | None = None
        self.cond = threading.Condition()  # re-entrant: a side hands over while it holds it

    def wait(self, side: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == side or self.failed is not None)
            self.check()

    def check(self) -> None:
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


class Side:
    """One federation: its turns (wall clock and CPU counters at their start and end) and,
    as the engine's :class:`fedseg.protocol.rounds.Reporter`, its rows.

    A turn starts with its first call and ends when the side's next turn starts (or its
    run ends), so it holds the calls, the aggregation and the record of the round: all the
    engine does for it, the same scope on both sides. Between its turns the side waits
    while the other runs its turn (and, after an in-process training turn, the bare loop).
    """

    def __init__(self, name: str, other: str, lockstep: Lockstep, rounds: int, cpu: Any, after_turn: Any = None) -> None:
        self.name, self.other, self.lockstep, self.rounds, self.cpu, self.after_turn = name, other, lockstep, rounds, cpu, after_turn
        self.entered: int | None = None  # the turn the side's calls belong to now
        self.running: int | None = None  # that turn, once it holds the machine
        self.marks: dict[int, dict[str, dict[str, float]]] = {}
        self.summaries: dict[int, dict[str, Any]] = {}
        self.rows: dict[int, list[dict[str, Any]]] = {}

    def _mark(self) -> dict[str, float]:
        return {"wall": time.monotonic(), **self.cpu()}

    def enter(self, turn: int) -> None:
        """Called before each call: the first call of a new turn closes the last and waits for the machine."""
        with self.lockstep.cond:
            if turn != self.entered:
                self.entered = turn
                self.close()
                self.lockstep.wait(self.name)
                self.marks[turn] = {"start": self._mark()}
                self.running = turn
                self.lockstep.cond.notify_all()
            else:
                self.lockstep.cond.wait_for(lambda: self.running == turn or self.lockstep.failed is not None)
                self.lockstep.check()

    def close(self) -> None:
        with self.lockstep.cond:
            if self.running is None:
                return
            turn, self.running = self.running, None
            self.marks[turn]["end"] = self._mark()
            if self.after_turn is not None:
                self.after_turn(turn)
            self.lockstep.hand_over(self.other)

    def info(self, text: str) -> None:
        say(f"[{self.name}] {text}")

    def step(self, text: str) -> None:
        """In-round progress; left out so the log shows one line per round."""

    def round_done(self, round_: int, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        self.summaries[round_], self.rows[round_] = dict(summary), rows
        dice = " ".join(f"{r['site']} {r['val_dice']:.3f}" for r in rows)
        say(f"[{self.name}] round {round_}/{self.rounds} recorded; val Dice {dice}")


class TimedTransport:
    """Wraps a transport: puts each call in its side's turn and records it (kind, round, wall
    time, node CPU, bytes and, over Syft, where the time went)."""

    def __init__(self, inner: Any, max_bytes: int, side: Side) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_bytes = max_bytes
        self.side = side
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

        request = decode_frame(frame, self.max_bytes)
        turn = turn_of(request.kind, request.fields.get("round"), self.side.rounds)
        self.side.enter(turn)
        cpu0 = self.side.cpu()[self.name]
        t0 = time.perf_counter()
        reply = self.inner.exchange(frame)
        seconds = time.perf_counter() - t0
        node_cpu = self.side.cpu()[self.name] - cpu0
        answer = decode_frame(reply, self.max_bytes)
        self.calls.append({
            "kind": request.kind, "round": request.fields.get("round"), "turn": turn, "scored": bool(request.fields.get("score")),
            "seconds": seconds, "node_cpu_seconds": node_cpu, "node_seconds": answer.fields.get("seconds"),
            "sent": len(frame), "received": len(reply), "syft": dict(getattr(self.inner, "last_call", {})),
        })
        return reply


def run_side(plan: Any, transports: list[Any], out: Path, side: Side, errors: dict[str, str]) -> None:
    from fedseg.protocol.rounds import run_federation

    try:
        run_federation(plan, transports, out, side)
        side.close()
    except BaseException as exc:  # noqa: BLE001 - the other side must not wait forever
        errors[side.name] = traceback.format_exc()
        side.lockstep.fail(f"{side.name} side failed: {type(exc).__name__}: {exc}")


def run_bare(transports: dict[str, PipeTransport], round_: int, bare: dict[int, dict[str, Any]]) -> None:
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


#: The Syft call's parts, in the order they happen (seconds, from SyftTransport.last_call).
BREAKDOWN = (
    ("upload", "upload of the request frame (node's frame route) and of its digest (ActionObject.send)"),
    ("node_wall", "code call: fedseg's own work on the node"),
    ("syft_on_node", "code call: Syft's work around it (input policy, store reads and writes, output policy)"),
    ("fetch", "fetch of the reply's digest (.get()) and of its frame (frame route)"),
)


def summarize(plan: Any, syft: Side, local: Side, bare: dict[int, dict[str, Any]],
              syft_calls: list[TimedTransport], local_calls: list[TimedTransport], payload_bytes: int) -> dict[str, Any]:
    rounds = list(range(1, plan.rounds + 1))
    final = plan.rounds + 1
    sides = {"syft": (syft, syft_calls), "inproc": (local, local_calls)}

    def wall(side: Side, turn: int) -> float:
        return side.marks[turn]["end"]["wall"] - side.marks[turn]["start"]["wall"]

    def turn_cpu(side: Side, turn: int, key: str | None = None) -> float:
        start, end = side.marks[turn]["start"], side.marks[turn]["end"]
        return sum(end[k] - start[k] for k in end if k != "wall" and key in (None, k))

    def idle_cpu_share(site: str) -> float:
        # A Syft node's CPU while the in-process side and the bare loop run, per second of wall time.
        gaps = [(syft.marks[t + 1]["start"], syft.marks[t]["end"]) for t in range(final)]
        return sum(a[site] - b[site] for a, b in gaps) / sum(a["wall"] - b["wall"] for a, b in gaps)

    def calls(side: str, kind: str, site: str | None = None, scored: bool | None = None) -> list[dict[str, Any]]:
        return [c for t in sides[side][1] if site in (None, t.name) for c in t.calls
                if c["kind"] == kind and c["turn"] >= 1 and scored in (None, c["scored"])]

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

    syft_s, local_s = [wall(syft, r) for r in rounds], [wall(local, r) for r in rounds]
    syft_cpu, local_cpu = [turn_cpu(syft, r) for r in rounds], [turn_cpu(local, r) for r in rounds]
    whole = [*rounds, final]  # every turn after round 0's, whose first call loads each node's images

    # Where a Syft call's time goes, for the steady train call (scoring the last model rides on
    # it from round 2) and the last round's evaluate call; medians over nodes and rounds.
    steady = calls("syft", "train", scored=True) or calls("syft", "train")
    breakdown: dict[str, dict[str, float]] = {}
    for name, group, other in (("train", steady, calls("inproc", "train", scored=bool(steady[0]["scored"]))),
                               ("evaluate", calls("syft", "evaluate"), calls("inproc", "evaluate"))):
        parts = [{**c["syft"], "syft_on_node": c["syft"]["run"] - c["syft"]["node_wall"]} for c in group]
        breakdown[name] = {key: median([p[key] for p in parts]) for key, _ in BREAKDOWN}
        breakdown[name].update(
            total=median([c["seconds"] for c in group]), inproc_total=median([c["seconds"] for c in other]),
            node_cpu=median([c["node_cpu_seconds"] for c in group]), fedseg_cpu=median([c["syft"]["node_cpu"] for c in group]),
            inproc_node_cpu=median([c["node_cpu_seconds"] for c in other]),
            sent_mb=median([c["sent"] / MB for c in group]), received_mb=median([c["received"] / MB for c in group]),
        )

    def per_turn_bytes(side: str) -> dict[int, dict[str, dict[str, int]]]:
        out: dict[int, dict[str, dict[str, int]]] = {}
        for t in sides[side][1]:
            for c in t.calls:
                at = out.setdefault(c["turn"], {}).setdefault(t.name, {"sent": 0, "received": 0})
                at["sent"] += c["sent"]
                at["received"] += c["received"]
        return dict(sorted(out.items()))

    syft_bytes = per_turn_bytes("syft")
    steady_turns = [r for r in rounds if r >= 2] or rounds
    per_node_round = [syft_bytes[r][site] for r in steady_turns for site in SITES]
    dice_diff = max(
        (abs(a["val_dice"] - b["val_dice"]) for r in syft.rows for a, b in zip(syft.rows[r], local.rows[r])),
        default=float("nan"),
    )
    return {
        "rounds_timed": rounds,
        # Wall time, as the goals are defined: a training round's turn, Syft ÷ in-process, the
        # median of the rounds' ratios (a load spike during one side's turn spoils one round only).
        "round_ratio": median([a / b for a, b in zip(syft_s, local_s)]),
        "round_ratio_paired": [a / b for a, b in zip(syft_s, local_s)],
        "round_seconds_syft": syft_s,
        "round_seconds_inproc": local_s,
        "run_ratio": sum(wall(syft, t) for t in whole) / sum(wall(local, t) for t in whole),
        "final_evaluation_seconds": {"syft": wall(syft, final), "inproc": wall(local, final)},
        "round0_seconds": {"syft": wall(syft, 0), "inproc": wall(local, 0)},
        "throughput_ratio": total["bare_seconds"] / total["node_seconds"],
        "node_samples_per_s": total["samples"] / total["node_seconds"],
        "inproc_samples_per_s": total["samples"] / total["inproc_seconds"],
        "bare_samples_per_s": total["samples"] / total["bare_seconds"],
        "bare_plus_augment_ratio": (total["bare_seconds"] + total["augment_seconds"]) / total["node_seconds"],
        "call_breakdown": breakdown,
        # CPU time (coordinator + the side's three node processes): what other load on the machine cannot inflate.
        "round_cpu_syft": syft_cpu,
        "round_cpu_inproc": local_cpu,
        "cpu_round_ratio": median([a / b for a, b in zip(syft_cpu, local_cpu)]),
        "cpu_run_ratio": sum(turn_cpu(syft, t) for t in whole) / sum(turn_cpu(local, t) for t in whole),
        "coordinator_cpu_per_round": {name: median([turn_cpu(side, r, "coordinator") for r in rounds]) for name, side in (("syft", syft), ("inproc", local))},
        "cpu_throughput_ratio": total["bare_cpu"] / total["node_call_cpu"],
        "inproc_cpu_throughput_ratio": total["bare_cpu"] / total["inproc_call_cpu"],
        "syft_idle_node_cpu_share": {site: idle_cpu_share(site) for site in SITES},
        "nodes": nodes,
        "bytes_per_turn": {"syft": syft_bytes, "inproc": per_turn_bytes("inproc")},
        "calls_per_node_per_turn": {t: max(sum(c["turn"] == t for c in tr.calls) for tr in syft_calls) for t in [0, *whole]},
        "mb_sent_per_node_round": median([b["sent"] / MB for b in per_node_round]),
        "mb_received_per_node_round": median([b["received"] / MB for b in per_node_round]),
        "weight_payload_mb": payload_bytes / MB,
        "max_val_dice_diff_syft_vs_inproc": dice_diff,
    }


def goals(setting: str, res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's goals this setting measures: {name: {measured, target, met}}."""
    def goal(measured: float, target: float, at_most: bool = True) -> dict[str, Any]:
        return {"measured": round(measured, 4), "target": target, "met": bool(measured <= target if at_most else measured >= target)}

    out = {f"{setting}_round_wall_ratio": goal(res["round_ratio"], GOAL_ROUND_RATIO[setting])}
    if setting == "defaults":
        out["defaults_round_cpu_ratio"] = goal(res["cpu_round_ratio"], GOAL_CPU_RATIO)
    out[f"{setting}_throughput_ratio"] = goal(res["throughput_ratio"], GOAL_THROUGHPUT_RATIO, at_most=False)
    return out


def markdown(res: dict[str, Any], config: dict[str, Any], machine: dict[str, Any], commit: str, goal: dict[str, Any]) -> str:
    def verdict(ok: bool) -> str:
        return "pass" if ok else "**FAIL**"

    br = res["call_breakdown"]
    first, last = res["rounds_timed"][0], res["rounds_timed"][-1]
    wall_goal = goal[f"{config['setting']}_round_wall_ratio"]
    lines = [
        f"# Round benchmark ({config['setting']} setting): Syft nodes vs the same rounds without Syft",
        "",
        f"commit `{commit}`; {config['rounds']} rounds, {config['limit'] or 'all'} images per site, "
        f"{config['image_size']} px, U-Net width {config['width']} depth {config['depth']}, {config['threads']} torch thread(s) per node; "
        f"{machine['nproc']} CPUs, torch {machine['torch']}, syft {machine['syft']}; "
        f"1-min load average {machine['loadavg_start']:.1f} at start, {machine['loadavg_end']:.1f} at end "
        f"(the machine is shared: wall time is noisy, CPU time is the steadier figure).",
        "",
        "| measure | measured | goal | result |",
        "|---|---|---|---|",
        f"| round wall time, Syft ÷ in-process (median of the ratios of training rounds {first}–{last}) "
        f"| {res['round_ratio']:.3f} ({median(res['round_seconds_syft']):.1f} s ÷ {median(res['round_seconds_inproc']):.1f} s) "
        f"| ≤ {wall_goal['target']:.2f} | {verdict(wall_goal['met'])} |",
        f"| round CPU time, Syft ÷ in-process (coordinator + nodes, median of the rounds' ratios) | {res['cpu_round_ratio']:.3f} "
        f"({median(res['round_cpu_syft']):.1f} s ÷ {median(res['round_cpu_inproc']):.1f} s) | ≤ {GOAL_CPU_RATIO:.2f} "
        f"| {verdict(res['cpu_round_ratio'] <= GOAL_CPU_RATIO)}{'' if config['setting'] == 'defaults' else ' (goal set for the defaults)'} |",
        f"| node training throughput ÷ bare PyTorch loop, same batches (wall time) "
        f"| {res['throughput_ratio']:.3f} ({res['node_samples_per_s']:.1f} ÷ {res['bare_samples_per_s']:.1f} samples/s per node) "
        f"| ≥ {GOAL_THROUGHPUT_RATIO:.2f} | {verdict(res['throughput_ratio'] >= GOAL_THROUGHPUT_RATIO)} |",
        f"| bytes per node per round, sent / received (median, rounds ≥ 2) | {res['mb_sent_per_node_round']:.2f} MB / "
        f"{res['mb_received_per_node_round']:.2f} MB | — | weights are {res['weight_payload_mb']:.2f} MB |",
        f"| calls per node per round | {res['calls_per_node_per_turn'][last]} | 1 | |",
        "",
        f"Whole run after round 0 (every training round plus the last round's own evaluation), Syft ÷ in-process: "
        f"wall {res['run_ratio']:.3f}, CPU {res['cpu_run_ratio']:.3f}. The last evaluation took "
        f"{res['final_evaluation_seconds']['syft']:.1f} s over Syft, {res['final_evaluation_seconds']['inproc']:.1f} s in-process.",
        "",
        "## Where a call's time goes over Syft (median per call, seconds)",
        "",
        "| part | train call (scoring the last model on it) | evaluate call (last round) |",
        "|---|---|---|",
    ]
    for key, label in BREAKDOWN:
        lines.append(f"| {label} | {br['train'][key]:.2f} | {br['evaluate'][key]:.2f} |")
    lines += [
        f"| whole call over Syft | {br['train']['total']:.2f} | {br['evaluate']['total']:.2f} |",
        f"| the same call over a pipe (in-process) | {br['train']['inproc_total']:.2f} | {br['evaluate']['inproc_total']:.2f} |",
        f"| node CPU in the call, Syft (fedseg's own code) | {br['train']['node_cpu']:.2f} ({br['train']['fedseg_cpu']:.2f}) "
        f"| {br['evaluate']['node_cpu']:.2f} ({br['evaluate']['fedseg_cpu']:.2f}) |",
        f"| node CPU in the call, in-process | {br['train']['inproc_node_cpu']:.2f} | {br['evaluate']['inproc_node_cpu']:.2f} |",
        f"| MB sent / received | {br['train']['sent_mb']:.2f} / {br['train']['received_mb']:.2f} "
        f"| {br['evaluate']['sent_mb']:.2f} / {br['evaluate']['received_mb']:.2f} |",
        "",
        f"Coordinator CPU per round: {res['coordinator_cpu_per_round']['syft']:.2f} s over Syft, "
        f"{res['coordinator_cpu_per_round']['inproc']:.2f} s in-process. An idle Syft node (while the other side runs) uses "
        + ", ".join(f"{site} {share:.1%}" for site, share in res["syft_idle_node_cpu_share"].items())
        + " of one CPU (its approval-polling loop and the datasite server).",
        "",
        "## Rounds",
        "",
        "| round | Syft s | in-process s | ratio | Syft CPU s | in-process CPU s |",
        "|---|---|---|---|---|---|",
        f"| 0 (evaluation only, includes data loading; not in the ratio) | {res['round0_seconds']['syft']:.1f} | {res['round0_seconds']['inproc']:.1f} "
        f"| {res['round0_seconds']['syft'] / res['round0_seconds']['inproc']:.3f} | | |",
    ]
    for r, a, b, q, ca, cb in zip(res["rounds_timed"], res["round_seconds_syft"], res["round_seconds_inproc"], res["round_ratio_paired"],
                                  res["round_cpu_syft"], res["round_cpu_inproc"]):
        lines.append(f"| {r} | {a:.1f} | {b:.1f} | {q:.3f} | {ca:.1f} | {cb:.1f} |")
    lines += [
        "",
        f"Largest validation-Dice difference between the two federations: {res['max_val_dice_diff_syft_vs_inproc']:.2e} "
        "(0: both trained identically).",
        "",
        "## Training throughput per node",
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
        "## Bytes per node per round over Syft (fedseg frames, MB sent / received)",
        "",
        "| round | " + " | ".join(SITES) + " |",
        "|---|" + "---|" * len(SITES),
    ]
    for t, per in res["bytes_per_turn"]["syft"].items():
        label = "0 (describe + evaluation)" if t == 0 else ("last evaluation" if t == config["rounds"] + 1 else str(t))
        lines.append(f"| {label} | " + " | ".join(f"{per[s]['sent'] / MB:.2f} / {per[s]['received'] / MB:.2f}" for s in SITES) + " |")
    lines += [
        "",
        "## Method",
        "",
        "- Both federations run the same round engine (`run_federation`) with the same plan and seeds; only the transport "
        "differs. Syft side: three `fedseg node start` datasites on loopback, one `SyftTransport` each. In-process side: "
        "three worker processes, each holding a `NodeRuntime` built from the node's own `node.json` and serving frames with "
        "the node's dispatcher `fedseg.node.actions.handle`, reached through a `multiprocessing` pipe (each worker in its own "
        "session, as each node is, so the kernel's autogroup scheduling treats them alike). The Dice check above confirms both "
        "sides did the identical training.",
        "- A round's evaluation rides on the next round's train request: a node scores the weights it receives, then trains "
        "from them. A round here is therefore one turn holding the round's train calls (with the last round's scoring from "
        "round 2 on), the aggregation and the record; round 0's evaluation and the last round's own evaluation are turns of "
        "their own. The two sides take turns (Syft's round r, then the in-process round r, then the bare loop of round r), so "
        "drift in the machine's load hits all three alike. A turn starts at its first call and ends when the side's next turn "
        "starts.",
        "- Bare loop: in each worker, the round's global weights, Adam with the plan's lr and weight decay, the same DiceBCE "
        "loss and batch size, on exactly the node's batches (shuffle and augmentation replayed from the round seed before the "
        "clock starts); the timed loop is forward, loss, backward, step, zero_grad; the three workers run it at the same time. "
        "The node's throughput is its reported `train_seconds` (inside `train_round`, which also converts to float, augments "
        "and clips gradients).",
        "- CPU seconds come from `/proc/<pid>/stat` (utime + stime) of each Syft node's process group (CLI + datasite server) "
        "or each worker process, read before and after every call and at the start and end of every turn; the coordinator "
        "counts via `time.process_time()`.",
        "- The call breakdown comes from `SyftTransport.last_call`: the coordinator times the payload upload, the code call and "
        "the reply's fetch; the node reports the wall and thread-CPU seconds spent in fedseg's own code inside the call, and "
        "the rest of the code call is Syft's work on the node.",
        "- Bytes are the fedseg frames counted by the transports. Syft's own serialization and HTTP overhead come on top.",
    ]
    return "\n".join(lines) + "\n"


def raw_side(side: Side, transports: list[TimedTransport]) -> dict[str, Any]:
    return {"summaries": side.summaries, "rows": side.rows, "marks": side.marks, "calls": {t.name: t.calls for t in transports}}


def merge_results(results: Path, setting: str, record: dict[str, Any], md: str) -> None:
    """Keeps this setting's summary (without the raw timings) beside the other setting's in
    ``results/bench_round.json`` and ``.md``, with every measured goal in one ``goals`` object."""
    path = results / "bench_round.json"
    merged = json.loads(path.read_text()) if path.exists() else {"runs": {}, "markdown": {}}
    merged["runs"][setting] = {k: v for k, v in record.items() if k != "raw"}
    merged["markdown"][setting] = md
    merged["goals"] = {name: g for run in merged["runs"].values() for name, g in run["goals"].items()}
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    def measured_on(setting: str) -> str:
        config = merged["runs"][setting]["config"]
        reduced = any(config[k] != v for k, v in SETTINGS[setting].items())
        return (f"{config['rounds']} rounds, {config['limit']} images per site, {config['image_size']} px"
                + (f" (reduced from the {setting}' {SETTINGS[setting]['limit']} images per site)" if reduced else "")
                + f", commit {merged['runs'][setting]['git']['commit'][:12]}")

    text = ["# Round benchmark: summary", "", "| goal | measured | target | met | run |", "|---|---|---|---|---|"]
    text += [f"| {name} | {g['measured']} | {g['target']} | {g['met']} | {measured_on(name.split('_')[0])} |"
             for name, g in merged["goals"].items()]
    text += ["", *(merged["markdown"][s] for s in ("defaults", "small") if s in merged["markdown"])]
    (results / "bench_round.md").write_text("\n".join(text))
    say(f"merged the {setting} setting into {path} and bench_round.md")


# ------------------------------------------------------------------------ main


#: The issue's two settings: images per site and image size (the rest as given).
SETTINGS = {"defaults": {"limit": 300, "image_size": 128}, "small": {"limit": 60, "image_size": 64}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="defaults",
                   help="the goal this run measures, and the images per site and image size unless given: " + str(SETTINGS))
    p.add_argument("--rounds", type=int, default=3, help="FedAvg rounds after the evaluation-only round 0")
    p.add_argument("--limit", type=int, help="images per site; 0 = all")
    p.add_argument("--image-size", type=int)
    p.add_argument("--width", type=int, default=16, help="U-Net channels at the first level")
    p.add_argument("--depth", type=int, default=4, help="U-Net down-samplings")
    p.add_argument("--threads", type=int, default=1, help="torch threads per node")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_round")
    p.add_argument("--from-raw", type=Path, help="recompute the summary of an earlier run from its bench_round.json, running nothing")
    p.add_argument("--results", type=Path, help="also merge this run's summary into DIR/bench_round.json and .md (e.g. scripts/results)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "polyp", help="folder holding " + ", ".join(SITES))
    args = p.parse_args()
    for key, value in SETTINGS[args.setting].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.limit != 0 and args.limit < 3:
        p.error("--limit must be 0 (all images) or >= 3")
    missing = [s for s in SITES if not (args.data / s / "images").is_dir()]
    if missing and args.from_raw is None:
        p.exit(2, f"error: polyp data not found: {', '.join(str(args.data / s) for s in missing)} missing; pass --data\n")
    return args


class _Recorded:
    """A side or transport of an earlier run, rebuilt from its raw record for :func:`summarize`."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def from_raw(args: argparse.Namespace) -> None:
    """Recomputes the summary (and, with ``--results``, the merged one) from a run's raw record."""
    from fedseg.protocol.plan import Plan

    record = json.loads(args.from_raw.read_text())
    raw, plan = record["raw"], Plan.from_dict(record["plan"])

    def side(name: str) -> tuple[Any, list[Any]]:
        r = raw[name]
        marks = {int(t): m for t, m in r["marks"].items()}
        recorded = _Recorded(marks=marks, rows={int(k): v for k, v in r["rows"].items()}, summaries=r["summaries"])
        return recorded, [_Recorded(name=n, calls=c) for n, c in r["calls"].items()]

    (syft, syft_calls), (local, local_calls) = side("syft"), side("inproc")
    bare = {int(k): v for k, v in raw["bare"].items()}
    payload_bytes = round(record["results"]["weight_payload_mb"] * MB)
    res = summarize(plan, syft, local, bare, syft_calls, local_calls, payload_bytes)
    setting = record["config"]["setting"]
    record.update(results=res, goals=goals(setting, res))
    md = markdown(res, record["config"], record["machine"], commit_label(record["git"]), record["goals"])
    write_results(args.from_raw.parent, "bench_round", record, md, [], record["wall_seconds"])
    if args.results is not None:
        merge_results(args.results, setting, record, md)


def main() -> None:
    args = parse_args()
    if args.from_raw is not None:
        from_raw(args)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in `finally` on SIGTERM too
    from fedseg.node.config import NodeConfig
    from fedseg.protocol.cli import plan_from_options
    from fedseg.protocol.plan import Plan
    from fedseg.protocol.rounds import initial_arrays
    from fedseg.protocol.invite import load_invite
    from fedseg.protocol.syft_transport import SyftTransport

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    # A side waits for its turn inside a call, so the per-call timeout must cover the other side's turn.
    plan = Plan.from_dict(plan_from_options({}, {
        "rounds": args.rounds, "image_size": args.image_size, "width": args.width, "depth": args.depth, "threads": args.threads,
        "timeout_s": 3600.0,
    }))
    out = args.out.resolve()
    for sub in ("data", "nodes", "inproc_nodes", "syft_run", "inproc_run"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    commit, machine = git_commit(), machine_info()
    payload_bytes = sum(a.nbytes for a in initial_arrays(plan).values())
    say(f"plan: {args.rounds} rounds, {args.limit} images/site, {args.image_size} px, width {args.width}, depth {args.depth}, "
        f"{args.threads} thread(s)/node; weights {payload_bytes / MB:.2f} MB; {machine['nproc']} CPUs, load {machine['loadavg_start']:.2f}")

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
        bare: dict[int, dict[str, Any]] = {}
        syft = Side("syft", "inproc", lockstep, plan.rounds, cpu_of("syft"))
        local = Side("inproc", "syft", lockstep, plan.rounds, cpu_of("inproc"),
                     after_turn=lambda turn: run_bare(pipes, turn, bare) if 1 <= turn <= plan.rounds else None)
        syft_transports = [TimedTransport(SyftTransport(load_invite(invites[s]), approval_timeout_s=120), plan.max_message_bytes, syft) for s in SITES]
        local_transports = [TimedTransport(pipes[s], plan.max_message_bytes, local) for s in SITES]
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
    goal = goals(args.setting, res)
    md = markdown(res, config, machine, commit_label(commit), goal)
    record = {
        "config": config, "plan": plan.to_dict(), "git": commit, "machine": machine,
        "wall_seconds": time.monotonic() - t_start, "results": res, "goals": goal,
        "raw": {"syft": raw_side(syft, syft_transports), "inproc": raw_side(local, local_transports), "bare": bare},
    }
    write_results(out, "bench_round", record, md, [], record["wall_seconds"])
    if args.results is not None:
        merge_results(args.results, args.setting, record, md)


if __name__ == "__main__":
    main()
