"""Cross-checking two parties' logs: each message one end sent is in the other's log as received, with the same bytes."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .entry import Direction

__all__ = ["cross_check"]


def _in_run(entry: Mapping[str, Any], run_id: str | None) -> bool:
    return run_id is None or entry.get("run") == run_id


def _describe(entry: Mapping[str, Any]) -> str:
    rnd = "" if entry.get("round") is None else f" of round {entry['round']}"
    return f"{entry.get('action') or 'undecodable message'}{rnd} ({entry.get('bytes')} bytes, sha256 {str(entry.get('sha256'))[:12]})"


def _match(sent: list[tuple[int, dict]], received: list[tuple[int, dict]], sender: str, receiver: str) -> list[str]:
    """Pairs each sent entry with a received one of the same size and hash, in order."""
    pool: dict[tuple[Any, Any], list[tuple[int, dict]]] = {}
    for j, entry in received:
        pool.setdefault((entry.get("sha256"), entry.get("bytes")), []).append((j, entry))
    lost = []
    for i, entry in sent:
        candidates = pool.get((entry.get("sha256"), entry.get("bytes")))
        if candidates:
            candidates.pop(0)
        else:
            lost.append((i, entry))
    unsent = sorted((x for xs in pool.values() for x in xs), key=lambda x: x[0])
    findings = []
    for i, entry in lost:
        same = next((x for x in unsent if (x[1].get("action"), x[1].get("round"), x[1].get("run")) == (entry.get("action"), entry.get("round"), entry.get("run"))), None)
        if same is not None:
            unsent.remove(same)
            j, other = same
            findings.append(
                f"entry {i} in {sender} and entry {j} in {receiver} record the same {entry.get('action')} message differently: "
                f"sent {_describe(entry)}, received {_describe(other)}"
            )
        else:
            findings.append(f"entry {i} in {sender}: sent {_describe(entry)} is missing from {receiver} (no received entry with that hash)")
    for j, entry in unsent:
        findings.append(f"entry {j} in {receiver}: received {_describe(entry)} was never recorded as sent in {sender}")
    return findings


def cross_check(
    coordinator: list[dict[str, Any]],
    nodes: Mapping[str, list[dict[str, Any]]],
    *,
    run_id: str | None = None,
    coordinator_name: str | None = None,
) -> list[str]:
    """Checks that both ends recorded every message with the same bytes.

    Every message the coordinator sent to node P must be in P's log as received, with
    the same SHA-256 and size, and every message P sent must be in the coordinator's log
    as received from P. Messages received but never recorded as sent are findings too.
    Identical messages are matched one to one, in order. Coordinator entries for peers
    not in ``nodes`` are not checked.

    Args:
        coordinator: The coordinator's entries (from :func:`.verify.verify_log`).
        nodes: Node name (the coordinator's ``peer``) to that node's entries.
        run_id: If given, only entries of this run are compared on both sides.
        coordinator_name: If given, only node entries with this ``peer`` are compared.

    Returns:
        Findings naming entry indices and logs; empty if both sides agree.
    """
    findings: list[str] = []
    for node in sorted(nodes):
        ours = [(i, e) for i, e in enumerate(coordinator) if e.get("peer") == node and _in_run(e, run_id)]
        theirs = [
            (i, e) for i, e in enumerate(nodes[node])
            if _in_run(e, run_id) and (coordinator_name is None or e.get("peer") == coordinator_name)
        ]
        node_log = f"node {node}'s log"

        def by(entries: list[tuple[int, dict]], direction: Direction) -> list[tuple[int, dict]]:
            return [x for x in entries if x[1].get("direction") == direction]

        findings += _match(by(ours, Direction.SENT), by(theirs, Direction.RECEIVED), "the coordinator's log", node_log)
        findings += _match(by(theirs, Direction.SENT), by(ours, Direction.RECEIVED), node_log, "the coordinator's log")
    return findings
