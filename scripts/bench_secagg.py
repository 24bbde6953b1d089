"""Benchmark secure aggregation: crypto alone, and end to end over Syft.

(a) Crypto and aggregation alone, nodes simulated in one process, for N in {3, 10, 30}
and d in {1M, the fedseg U-Net, 30M}: per-node seconds (keys, sharing, masking,
unmasking), coordinator seconds (routing and unmasking), bytes each node sends and
receives, against plain aggregation (weighted average of float32 updates), plus
dropout cases. Every node does the same work, so per-node cost is timed on a few
sampled nodes doing the full-size protocol; the others run it on a 1-value update,
which costs the coordinator nothing less (its masks are expanded to the full ``d``).
The sum is checked against plain FedAvg where every node runs at full size.

(b) End to end: the three polyp sites as real Syft datasites, the same plan run plain
and with ``--secure-aggregation``, round wall time of each.

Writes ``<out>/bench_secagg.json`` (config, git commit, machine, every measurement) and
``<out>/bench_secagg.md``, and prints the Markdown.

    python scripts/bench_secagg.py                       # both parts
    python scripts/bench_secagg.py --skip-e2e            # crypto only (~5 min on 2 CPUs)
    python scripts/bench_secagg.py --skip-crypto --rounds 2 --limit 100
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_round import NODE_SITES, SITES, TimedTransport, read_cpu  # noqa: E402
from benchlib import commit_label, git_commit, machine_info, say, start_nodes, stop_nodes, write_results  # noqa: E402

from fedseg.protocol.aggregate import weighted_average  # noqa: E402
from fedseg.protocol.messages import (  # noqa: E402
    SecAggMaskReply,
    SecAggMaskRequest,
    SecAggTrainReply,
    SecAggTrainRequest,
    SecAggUnmaskReply,
    SecAggUnmaskRequest,
    TrainReply,
    TrainRequest,
    encode,
)
from fedseg.protocol.secagg.protocol import CoordinatorRound, NodeRound, threshold  # noqa: E402
from fedseg.protocol.secagg.quantize import dequantize, flatten, scale_bits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOAL_E2E_RATIO = 1.10
GOAL_NODE_SECONDS = 1.0  # crypto per node at N=10, d=5M
GOAL_BYTES_RATIO = 1.10
SAMPLED = 3
CLIP = 8.0
RUN = "bench"


class Clock:
    """Wall and CPU seconds of a block; CPU time is what other load on a shared machine cannot inflate."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def unet_layout() -> dict[str, tuple[int, ...]]:
    from fedseg.protocol.plan import Plan
    from fedseg.protocol.rounds import initial_arrays

    return {k: v.shape for k, v in initial_arrays(Plan()).items()}


def crypto_case(n: int, layout: dict[str, tuple[int, ...]], drop_before: int, drop_after: int, rng: np.random.Generator) -> dict[str, Any]:
    """One simulated round; returns timings, bytes and the error against plain FedAvg."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    d = sum(int(np.prod(s)) for s in layout.values())
    names = [f"node-{i:02d}" for i in range(n)]
    full = n * d <= 3 * 10**8  # every node at full size: the sum can be checked
    sampled = set(names if full else names[:SAMPLED])
    # Correlated updates, like nodes' models trained from one global model.
    base = {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in layout.items()}
    update = {m: ({k: v + rng.normal(0, 0.005, v.shape).astype(np.float32) for k, v in base.items()} if m in sampled else None) for m in names}
    tiny = {"w": np.zeros(1, np.float32)}
    weights = {m: float(rng.integers(50, 500)) for m in names}
    t, bits = threshold(0, n), scale_bits(CLIP, n)
    node_wall = {m: 0.0 for m in sampled}
    node_cpu = {m: 0.0 for m in sampled}

    def timed(m: str, fn: Any) -> Any:
        with Clock() as c:
            out = fn()
        if m in sampled:
            node_wall[m] += c.wall
            node_cpu[m] += c.cpu
        return out

    nodes = {m: timed(m, lambda m=m: NodeRound(Ed25519PrivateKey.generate(), m, RUN, 1)) for m in names}
    roster = {m: nodes[m].advertisement for m in names}
    with Clock() as co_clock:
        co = CoordinatorRound(RUN, 1, roster, t)
    shared = {}
    for m in names:
        shared[m] = timed(m, lambda m=m: nodes[m].share(roster, t))
        nodes[m].hold(update[m] if m in sampled else tiny, CLIP, bits)
    dropped_before = set(names[n - drop_before:]) if drop_before else set()
    u1 = [m for m in names if m not in dropped_before]
    with Clock() as c:
        for m in u1:
            co.accept_shares(m, *shared[m])
    co_wall, co_cpu = co_clock.wall + c.wall, co_clock.cpu + c.cpu
    total = sum(weights[m] for m in u1)
    omega = {m: weights[m] / total for m in u1}
    masked, clipped = {}, 0
    filler = rng.integers(0, 2**32, d, dtype=np.uint64).astype(np.uint32)
    bytes_up = bytes_down = 0
    for m in u1:
        routed = co.routed(m, u1)
        y, k = timed(m, lambda m=m, routed=routed: nodes[m].mask(u1, routed, omega[m]))
        clipped += k
        if m in sampled:
            masked[m] = flatten(y, layout)
            if m == names[0]:
                bytes_down += len(encode(SecAggMaskRequest(run_id=RUN, round=1, survivors=u1, weight=omega[m], shares=routed)))
                bytes_up += len(encode(SecAggMaskReply(run_id=RUN, round=1, clipped=k, masked=y)))
        else:
            masked[m] = filler  # same size as a real y; its content only matters when the sum is checked
    dropped_after = set(u1[len(u1) - drop_after:]) if drop_after else set()
    u2 = [m for m in u1 if m not in dropped_after]
    dropped = sorted(set(u1) - set(u2))
    revealed = {m: timed(m, lambda m=m: nodes[m].unmask(u2, dropped)) for m in u2}
    with Clock() as c:
        summed = co.unmask({m: masked[m] for m in u2}, revealed, u1)
        mean = dequantize(summed, bits, sum(omega[m] for m in u2))
    co_wall, co_cpu = co_wall + c.wall, co_cpu + c.cpu

    # Bytes of node-00's other frames, encoded exactly as on the wire.
    first = names[0]
    plan_weights = {k: np.zeros(s, np.float32) for k, s in layout.items()}
    commitment, sealed = shared[first]
    bytes_down += len(encode(SecAggTrainRequest(run_id=RUN, round=1, plan={}, weights=plan_weights, roster=roster, threshold=t)))
    bytes_up += len(encode(SecAggTrainReply(run_id=RUN, round=1, n_samples=1, mean_loss=0.0, seconds=0.0, accepted=0, candidates=0,
                                            commitment=commitment, shares=sealed)))
    bytes_down += len(encode(SecAggUnmaskRequest(run_id=RUN, round=1, survivors=u2, dropped=dropped, next_round=2)))
    bytes_up += len(encode(SecAggUnmaskReply(run_id=RUN, round=1, shares=revealed[first], next_keys=nodes[first].advertisement)))
    plain_down = len(encode(TrainRequest(run_id=RUN, round=1, plan={}, weights=plan_weights)))
    plain_up = len(encode(TrainReply(run_id=RUN, round=1, n_samples=1, mean_loss=0.0, seconds=0.0, accepted=0, candidates=0, weights=plan_weights)))

    with Clock() as plain:
        reference = weighted_average([(update[m] if m in sampled else plan_weights, weights[m]) for m in u2])
    error = None
    if full:
        want = flatten(reference, layout).astype(np.float64)
        error = float(np.linalg.norm(mean.astype(np.float64) - want) / np.linalg.norm(want))
    node_wall_mean, node_cpu_mean = statistics.mean(node_wall.values()), statistics.mean(node_cpu.values())
    return {
        "n": n, "d": d, "threshold": t, "scale_bits": bits, "dropped_before_masking": drop_before, "dropped_after_masking": drop_after,
        "node_seconds": node_wall_mean, "node_cpu_seconds": node_cpu_mean,
        "coordinator_seconds": co_wall, "coordinator_cpu_seconds": co_cpu, "plain_aggregation_seconds": plain.wall,
        "coordinator_ratio": co_wall / plain.wall,
        "bytes_up": bytes_up, "bytes_down": bytes_down, "plain_bytes_up": plain_up, "plain_bytes_down": plain_down,
        "bytes_ratio_up": bytes_up / plain_up, "bytes_ratio_down": bytes_down / plain_down,
        "clipped": clipped, "relative_error": error, "checked_sum": full, "sampled_nodes": len(sampled),
    }


def crypto_part(ns: list[int], ds: list[str], seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    layouts = {"unet": unet_layout()}
    results = []
    cases = [(n, name, 0, 0) for n in ns for name in ds]
    cases += [(10, "5M", 0, 0), (10, "unet", 0, 1), (30, "unet", 0, 3), (10, "unet", 1, 0), (30, "unet", 3, 0)]
    for n, name, before, after in cases:
        layout = layouts.get(name) or {"w": (int(float(name[:-1]) * 10**6),)}
        say(f"crypto: N={n} d={name} dropped before/after masking {before}/{after}")
        res = crypto_case(n, layout, before, after, rng)
        res["d_name"] = name
        say(f"  node {res['node_seconds']:.3f} s (cpu {res['node_cpu_seconds']:.3f}), coordinator {res['coordinator_seconds']:.3f} s, "
            f"plain {res['plain_aggregation_seconds']:.3f} s, bytes up x{res['bytes_ratio_up']:.4f}, error {res['relative_error']}")
        results.append(res)
    return results


# ------------------------------------------------------------------ end to end


class Rounds:
    def __init__(self) -> None:
        self.summaries: dict[int, dict[str, Any]] = {}

    def info(self, text: str) -> None:
        say(text)

    def step(self, text: str) -> None:
        pass

    def round_done(self, round_: int, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        self.summaries[round_] = summary
        say(f"round {round_}: {summary['seconds']:.1f} s")


def e2e_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from fedseg.protocol.cli import plan_from_options
    from fedseg.protocol.invite import load_invite
    from fedseg.protocol.plan import Plan
    from fedseg.protocol.rounds import run_federation
    from fedseg.protocol.syft_transport import SyftTransport

    options = {"rounds": args.rounds, "image_size": args.image_size, "width": args.width, "depth": 4, "threads": 1}
    plans = {"plain": Plan.from_dict(plan_from_options({}, options)),
             "secure": Plan.from_dict(plan_from_options({}, {**options, "secure_aggregation": True}))}
    shutil.rmtree(out / "nodes", ignore_errors=True)
    nodes: dict[str, Any] = {}
    results: dict[str, Any] = {}
    try:
        invites, _ = start_nodes(NODE_SITES, args.data.resolve(), out, args.limit, 0, nodes)
        # Alternate the two modes so that load from other users of the machine hits both alike.
        for repeat in range(args.repeats):
            for mode, plan in plans.items():
                run_dir = out / f"{mode}_{repeat}"
                shutil.rmtree(run_dir, ignore_errors=True)
                groups = {s: nodes[s].process.pid for s in SITES}
                transports = [TimedTransport(SyftTransport(load_invite(invites[s]), approval_timeout_s=120), plan.max_message_bytes,
                                             lambda groups=groups: read_cpu(groups, {})) for s in SITES]
                reporter = Rounds()
                say(f"end to end: {mode} run {repeat + 1}/{args.repeats}")
                run_federation(plan, transports, run_dir, reporter)
                calls = {t.name: t.calls for t in transports}
                results.setdefault(mode, []).append({
                    "rounds": {r: s["seconds"] for r, s in reporter.summaries.items() if r > 0},
                    # CPU the three nodes spent serving each round: what other load cannot inflate.
                    "node_cpu": {r: sum(c["node_cpu_seconds"] for cs in calls.values() for c in cs if c["round"] == r) for r in reporter.summaries if r > 0},
                    "calls": calls,
                })
    finally:
        stop_nodes(nodes)
    round_times = {mode: [s for run in runs for s in run["rounds"].values()] for mode, runs in results.items()}
    medians = {mode: statistics.median(v) for mode, v in round_times.items()}
    node_cpu = {mode: statistics.median(c for run in runs for c in run["node_cpu"].values()) for mode, runs in results.items()}
    # Each secure run against the plain run just before it: the fairest view when load drifts.
    pairs = [statistics.mean(s["rounds"].values()) / statistics.mean(p["rounds"].values()) for p, s in zip(results["plain"], results["secure"])]
    secure_calls = [c for run in results["secure"] for calls in run["calls"].values() for c in calls]
    plain_calls = [c for run in results["plain"] for calls in run["calls"].values() for c in calls]
    per_kind = {}
    for kind in sorted({c["kind"] for c in secure_calls + plain_calls}):
        calls = [c for c in secure_calls + plain_calls if c["kind"] == kind]
        per_kind[kind] = {"calls": len(calls), "median_seconds": statistics.median(c["seconds"] for c in calls),
                          "median_node_cpu_seconds": statistics.median(c["node_cpu_seconds"] for c in calls),
                          "median_sent": statistics.median(c["sent"] for c in calls), "median_received": statistics.median(c["received"] for c in calls)}
    return {"plans": {k: p.to_dict() for k, p in plans.items()}, "runs": results, "round_seconds": round_times,
            "median_round_seconds": medians, "ratio": medians["secure"] / medians["plain"], "pair_ratios": pairs,
            "median_round_node_cpu_seconds": node_cpu, "node_cpu_ratio": node_cpu["secure"] / node_cpu["plain"], "per_kind": per_kind}


# ------------------------------------------------------------------ report


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def markdown(crypto: list[dict[str, Any]], e2e: dict[str, Any] | None, machine: dict[str, Any], commit: str) -> str:
    lines = [f"# Secure aggregation benchmark (commit {commit})", "",
             f"{machine['nproc']} CPUs ({machine['cpu']}), load average {machine['loadavg_start']:.1f} at start; "
             "wall seconds are inflated by other load, CPU seconds much less.", ""]
    if crypto:
        goal = next((r for r in crypto if r["n"] == 10 and r["d_name"] == "5M" and not r["dropped_before_masking"] and not r["dropped_after_masking"]), None)
        lines += ["## (a) Crypto and aggregation alone (one process)", "",
                  "Per node: key generation, sharing, masking, unmasking. Coordinator: share routing and unmasking. "
                  "Plain: `weighted_average` of the float32 updates. Bytes: what one node sends (up) and receives (down) in a round, "
                  "all frames encoded as on the wire, against the plain train request and reply.", "",
                  "| N | d | t | dropped (before/after masking) | node s (cpu) | coordinator s (cpu) | plain aggregation s | coordinator ÷ plain | bytes up (MB) | up ÷ plain | down ÷ plain | relative error |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in crypto:
            err = f"{r['relative_error']:.1e}" if r["relative_error"] is not None else "n/a (sampled)"
            lines.append(f"| {r['n']} | {r['d_name']} ({r['d']:,}) | {r['threshold']} | {r['dropped_before_masking']}/{r['dropped_after_masking']} | "
                         f"{r['node_seconds']:.3f} ({r['node_cpu_seconds']:.3f}) | {r['coordinator_seconds']:.3f} ({r['coordinator_cpu_seconds']:.3f}) | "
                         f"{r['plain_aggregation_seconds']:.3f} | {r['coordinator_ratio']:.1f} | {_mb(r['bytes_up'])} | {r['bytes_ratio_up']:.4f} | "
                         f"{r['bytes_ratio_down']:.4f} | {err} |")
        if goal:
            worst = max(max(r["bytes_ratio_up"], r["bytes_ratio_down"]) for r in crypto)
            lines += ["", f"- Goal crypto per node at N=10, d=5M ≤ {GOAL_NODE_SECONDS} s: {goal['node_seconds']:.3f} s wall, "
                          f"{goal['node_cpu_seconds']:.3f} s CPU: {'met' if goal['node_seconds'] <= GOAL_NODE_SECONDS else 'NOT met'}.",
                      f"- Goal bytes per node ≤ {GOAL_BYTES_RATIO}× plain fp32: worst {worst:.4f}×: {'met' if worst <= GOAL_BYTES_RATIO else 'NOT met'}."]
    if e2e:
        med = e2e["median_round_seconds"]
        lines += ["", "## (b) End to end over Syft (three polyp sites)", "",
                  f"Median round wall time: plain {med['plain']:.1f} s, secure {med['secure']:.1f} s, ratio {e2e['ratio']:.3f} "
                  f"(goal ≤ {GOAL_E2E_RATIO}: {'met' if e2e['ratio'] <= GOAL_E2E_RATIO else 'NOT met'}).", "",
                  f"Rounds: plain {[round(s, 1) for s in e2e['round_seconds']['plain']]}, secure {[round(s, 1) for s in e2e['round_seconds']['secure']]}; "
                  f"each secure run ÷ the plain run before it: {[round(r, 3) for r in e2e['pair_ratios']]}.", "",
                  f"Median CPU seconds the three nodes spent per round: plain {e2e['median_round_node_cpu_seconds']['plain']:.1f}, "
                  f"secure {e2e['median_round_node_cpu_seconds']['secure']:.1f}, ratio {e2e['node_cpu_ratio']:.3f}.", "",
                  "| call | calls | median s | median node CPU s | median sent (MB) | median received (MB) |", "|---|---|---|---|---|---|"]
        for kind, k in e2e["per_kind"].items():
            lines.append(f"| {kind} | {k['calls']} | {k['median_seconds']:.2f} | {k['median_node_cpu_seconds']:.2f} | {_mb(k['median_sent'])} | {_mb(k['median_received'])} |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ns", type=int, nargs="+", default=[3, 10, 30], help="node counts of part (a)")
    p.add_argument("--ds", nargs="+", default=["1M", "unet", "30M"], help="update sizes of part (a): NM or unet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-crypto", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--rounds", type=int, default=2, help="rounds per end-to-end run")
    p.add_argument("--repeats", type=int, default=1, help="plain/secure run pairs, alternated")
    p.add_argument("--limit", type=int, default=100, help="images per site in part (b)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "polyp")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_secagg")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    commit, machine = git_commit(), machine_info()
    crypto = [] if args.skip_crypto else crypto_part(args.ns, args.ds, args.seed)
    e2e = None if args.skip_e2e else e2e_part(args, out)
    machine["loadavg_end"] = os.getloadavg()[0]
    record = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "git": commit, "machine": machine,
              "crypto": crypto, "end_to_end": e2e}
    md = markdown(crypto, e2e, machine, commit_label(commit))
    write_results(out, "bench_secagg", record, md, [], time.monotonic() - t_start)


if __name__ == "__main__":
    main()
