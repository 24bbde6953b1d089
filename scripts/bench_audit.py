"""Cost of the audit log on a federated round, measured side by side in one run.

Runs FedAvg rounds in one process over an in-memory transport to real ``NodeRuntime``s
(the node's own dispatcher), with both ends writing their signed audit logs, and times
every ``AuditLog.record`` call: the audit's share of each round is measured in the same
run as the round itself. Writes ``bench_audit.json`` and ``bench_audit.md``.

    python scripts/bench_audit.py --data ../shared/data/polyp --limit 60 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from benchlib import InProcessTransport

from fedseg.node.actions import NodeRuntime
from fedseg.node.config import NodeConfig
from fedseg.protocol.audit.log import AuditLog
from fedseg.protocol.rounds import run_federation
from fedseg.protocol.plan import Plan

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "polyp")
parser.add_argument("--sites", default="Kvasir-SEG,CVC-ClinicDB,CVC-ColonDB")
parser.add_argument("--limit", type=int, default=60)
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--image-size", type=int, default=128)
parser.add_argument("--width", type=int, default=16)
parser.add_argument("--out", type=Path, default=Path("runs/bench_audit"))
args = parser.parse_args()
if not args.data.exists():
    raise SystemExit(f"{args.data} not found: the audit benchmark runs on the shared polyp data (--data)")

record_seconds: list[float] = []
_record = AuditLog.record


def timed_record(self, **kwargs):  # noqa: ANN001, ANN202 - wraps AuditLog.record unchanged
    t = time.perf_counter()
    try:
        return _record(self, **kwargs)
    finally:
        record_seconds.append(time.perf_counter() - t)


AuditLog.record = timed_record


class Quiet:
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def info(self, text: str) -> None:
        print(text, flush=True)

    def step(self, text: str) -> None:
        pass

    def round_done(self, round_: int, rows: list, summary: dict) -> None:
        if round_ > 0:
            self.seconds.append(summary["seconds"])
        print(f"round {round_}: {summary['seconds']:.1f} s", flush=True)


plan = Plan.from_dict({"rounds": args.rounds, "image_size": args.image_size, "model": {"width": args.width, "groups": 8},
                       "train": {"batch_size": 8, "threads": 1}})
print("--- audited run", flush=True)
runtimes = [NodeRuntime(NodeConfig(name=site, data=str(args.data / site), labels="pixel", limit=args.limit,
                                   workdir=str((args.out / "nodes" / site).resolve())), audit=True) for site in args.sites.split(",")]
reporter = Quiet()
run_federation(plan, [InProcessTransport(rt) for rt in runtimes], args.out / "run", reporter)
# Round 0 only evaluates; the per-round audit cost is spread over every round that wrote entries.
per_round_audit = sum(record_seconds) / (args.rounds + 1)
round_seconds = statistics.median(reporter.seconds)
share = per_round_audit / round_seconds
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
(args.out / "bench_audit.json").write_text(json.dumps({"commit": commit, "args": {k: str(v) for k, v in vars(args).items()},
                                                       "round_seconds": reporter.seconds, "record_seconds": record_seconds, "audit_share": share}, indent=2))
table = "\n".join([
    "| measure | value | goal |",
    "|---|---|---|",
    f"| audit write time per round ÷ round time | {share:.2%} ({per_round_audit:.3f} s of {round_seconds:.1f} s) | ≤ 2% |",
    f"| audit entries written (both ends) | {len(record_seconds)} | |",
    f"| one entry, median / max | {statistics.median(record_seconds) * 1000:.1f} ms / {max(record_seconds) * 1000:.1f} ms | |",
])
(args.out / "bench_audit.md").write_text(table + "\n")
print(table)
