"""What TLS costs a round: the node's TLS (1.3, mutual, pinned) against plain HTTP, side by side.

A node has no plaintext mode, and must not get one for a benchmark, so the two sides are
measured where they differ, the transfer: the same uvicorn server serves an echo endpoint
twice in this run, once with exactly the node's TLS settings and once in plain HTTP, and the
coordinator's pinned session (:func:`fedseg.protocol.tls_session.pinned_session`) and a
plain session send it one round's frame (the global weights out, an update of the same size
back), interleaved. In the same run, one round of the same plan is trained in process on the
real polyp sites. The ratio charges every node's TLS cost to the round one after another,
as if nothing overlapped, and divides by the in-process round, which is shorter than a
round over Syft: it is an upper bound of round wall time with TLS ÷ without.

    python scripts/bench_tls.py                       # 60 images per site, 64 px, width 16
    python scripts/bench_tls.py --limit 300 --image-size 128 --results scripts/results
"""
from __future__ import annotations

import argparse
import multiprocessing
import socket
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import DATA, commit_label, git_commit, machine_info, make_subset, say, write_results

SITES = ("Kvasir-SEG", "CVC-ClinicDB", "CVC-ColonDB")
GOAL = 1.03


async def _echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/octet-stream")]})
    await send({"type": "http.response.body", "body": body})


def _serve(port: int, tls: dict[str, str] | None) -> None:
    import uvicorn

    # The node's own settings (fedseg.node.perimeter.server): the same certificates, the client's required.
    options = dict(ssl_certfile=tls["cert"], ssl_keyfile=tls["key"], ssl_ca_certs=tls["clients"], ssl_cert_reqs=ssl.CERT_REQUIRED) if tls else {}
    uvicorn.run(_echo, host="127.0.0.1", port=port, log_level="warning", loop="asyncio", **options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, session: Any, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            session.post(url, data=b"x", timeout=5)
            return
        except Exception:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def transfer_seconds(frame_bytes: int, calls: int, folder: Path) -> dict[str, list[float]]:
    """Seconds per call, TLS and plain interleaved, each call sending and receiving ``frame_bytes``."""
    import requests

    from fedseg.node.perimeter.tls import issue, trust_bundle
    from fedseg.protocol.tls_session import pinned_session

    server, client = issue("bench node", server=True), issue("bench coordinator", server=False)
    (folder / "server.pem").write_text(server.cert_pem)
    (folder / "server.key").write_text(server.key_pem)
    tls = {"cert": str(folder / "server.pem"), "key": str(folder / "server.key"), "clients": str(trust_bundle(folder / "clients.pem", [client]))}
    ports = {"tls": _free_port(), "plain": _free_port()}
    context = multiprocessing.get_context("spawn")
    servers = [context.Process(target=_serve, args=(ports["tls"], tls), daemon=True), context.Process(target=_serve, args=(ports["plain"], None), daemon=True)]
    for p in servers:
        p.start()
    try:
        sides = {
            "tls": (f"https://127.0.0.1:{ports['tls']}/", pinned_session(server.fingerprint, client.cert_pem, client.key_pem)),
            "plain": (f"http://127.0.0.1:{ports['plain']}/", requests.Session()),
        }
        payload = bytes(frame_bytes)
        seconds: dict[str, list[float]] = {side: [] for side in sides}
        for side, (url, session) in sides.items():
            _wait(url, session)
            session.post(url, data=payload)  # warm: the handshake is once per session, not per call
        for _ in range(calls):
            for side, (url, session) in sides.items():
                t0 = time.perf_counter()
                reply = session.post(url, data=payload)
                seconds[side].append(time.perf_counter() - t0)
                assert len(reply.content) == frame_bytes
        return seconds
    finally:
        for p in servers:
            p.terminate()
            p.join(5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=60, help="images per site")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--calls", type=int, default=15, help="calls per side")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=Path("runs/bench_tls"))
    p.add_argument("--results", type=Path, help="also write the summary here (e.g. scripts/results)")
    args = p.parse_args()
    if not all((args.data / "polyp" / s).is_dir() for s in SITES):
        p.error(f"needs the polyp sites under {args.data}")

    from benchlib import run_plan_in_process

    from fedseg.node.actions import NodeRuntime
    from fedseg.node.config import NodeConfig
    from fedseg.protocol.plan import Plan
    from fedseg.protocol.rounds import initial_arrays

    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    plan = Plan.from_dict({"rounds": 1, "image_size": args.image_size, "model": {"width": args.width}})
    frame_bytes = sum(a.nbytes for a in initial_arrays(plan).values())
    say(f"TLS and plain HTTP, {args.calls} calls each of {frame_bytes / 1e6:.2f} MB out and back")
    with tempfile.TemporaryDirectory() as tmp:
        seconds = transfer_seconds(frame_bytes, args.calls, Path(tmp))
    per_call = {side: statistics.median(v) for side, v in seconds.items()}
    extra = per_call["tls"] - per_call["plain"]

    say(f"one round in process: {len(SITES)} polyp sites, {args.limit} images each, {args.image_size} px, width {args.width}")
    runtimes = []
    for site in SITES:
        subset = args.out / "data" / site
        make_subset(args.data / "polyp" / site, subset, args.limit, None, 0)
        runtimes.append(NodeRuntime(NodeConfig(name=site, data=str(subset), labels="pixel", workdir=str(args.out / "nodes" / site))))
    run = run_plan_in_process(plan, runtimes, args.out / "run", "fedavg")
    round_s = run["round_seconds"][plan.rounds]
    ratio = (round_s + len(SITES) * extra) / round_s

    goals = {"round_wall_ratio_tls_bound": {"measured": round(ratio, 4), "target": GOAL, "met": ratio <= GOAL}}
    record = {
        "commit": git_commit(), "machine": machine_info(), "config": vars(args) | {"out": str(args.out), "data": str(args.data)},
        "frame_bytes": frame_bytes, "seconds_per_call": seconds, "median_per_call": per_call, "tls_extra_per_call_s": extra,
        "round_seconds_in_process": round_s, "goals": goals,
    }
    md = "\n".join([
        "# bench_tls: what TLS costs a round", "",
        f"Commit {commit_label(record['commit'])}. {args.calls} interleaved calls per side, each {frame_bytes / 1e6:.2f} MB out and back "
        "(one round's weights and update) on loopback; one round trained in process in the same run.", "",
        "| | median s per call |", "|---|---|",
        f"| TLS 1.3, mutual, pinned (the node's settings) | {per_call['tls']:.4f} |",
        f"| plain HTTP | {per_call['plain']:.4f} |",
        f"| TLS's extra per call | {extra:.4f} |", "",
        f"Round in process ({len(SITES)} sites, {args.limit} images each, {args.image_size} px, width {args.width}): {round_s:.1f} s.", "",
        f"Round wall time with TLS ÷ without, at most: **{ratio:.4f}** (goal ≤ {GOAL}: {'met' if ratio <= GOAL else 'not met'}). "
        "Every node's extra is charged to the round one after another and divided by the in-process round, "
        "shorter than a round over Syft, so the true ratio is lower.",
    ])
    for folder in filter(None, (args.out, args.results)):
        write_results(folder, "bench_tls", record, md, [], time.monotonic() - t_start)


if __name__ == "__main__":
    main()
