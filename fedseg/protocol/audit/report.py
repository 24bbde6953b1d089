"""A writer's log summed up for a data-protection officer: totals per peer and round, the findings, and a plot of bytes sent."""
from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write
from ..messages import MessageKind
from .entry import Direction
from .policy import looks_per_sample

__all__ = ["summarize", "write_report"]


def summarize(
    entries: list[dict[str, Any]],
    declared: Mapping[str, tuple[int, ...]] | None = None,
) -> list[dict[str, Any]]:
    """Totals per (peer, round), for a report.

    Args:
        entries: One writer's entries.
        declared: If given, declared (name, shape) pairs never count as image-shaped.

    Returns:
        One dict per (peer, round), in round order (``None``, e.g. describe, first):
        ``peer``, ``round``, ``runs``, ``first``/``last`` (times), ``messages``, ``sent``,
        ``received``, ``bytes_out``, ``bytes_in``, ``actions_out``, ``tensors_out``
        (count), ``tensor_groups_out`` (e.g. ``["weights"]``), ``dtypes_out``,
        ``image_shaped_out`` (``"name (shape)"`` strings) and ``refusals`` (error
        replies sent).
    """
    exact = {name: tuple(shape) for name, shape in (declared or {}).items()}
    groups: dict[tuple[Any, Any], dict[str, Any]] = {}
    for entry in entries:
        key = (entry.get("peer"), entry.get("round"))
        s = groups.setdefault(key, {
            "peer": key[0], "round": key[1], "runs": set(), "first": entry.get("time"), "last": entry.get("time"),
            "messages": 0, "sent": 0, "received": 0, "bytes_out": 0, "bytes_in": 0, "actions_out": set(),
            "tensors_out": 0, "tensor_groups_out": set(), "dtypes_out": set(), "image_shaped_out": [], "refusals": 0,
        })
        s["messages"] += 1
        s["last"] = entry.get("time")
        if entry.get("run") is not None:
            s["runs"].add(entry["run"])
        size = entry.get("bytes") or 0
        if entry.get("direction") != Direction.SENT:
            s["received"] += 1
            s["bytes_in"] += size
            continue
        s["sent"] += 1
        s["bytes_out"] += size
        action = entry.get("action")
        s["actions_out"].add(action or "undecodable")
        s["refusals"] += action == MessageKind.ERROR
        for name, dtype, shape in (entry.get("schema") or {}).get("tensors", []):
            s["tensors_out"] += 1
            s["tensor_groups_out"].add(name.partition("/")[0])
            s["dtypes_out"].add(dtype)
            shape = tuple(shape)
            if looks_per_sample(shape) and exact.get(name.partition("/")[2]) != shape:
                s["image_shaped_out"].append(f"{name} {shape}")
    out = []
    for s in groups.values():
        for key in ("runs", "actions_out", "tensor_groups_out", "dtypes_out"):
            s[key] = sorted(s[key])
        out.append(s)
    return sorted(out, key=lambda s: (s["round"] is not None, s["round"] or 0, str(s["peer"])))


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _round_label(round_: int | None) -> str:
    return "setup" if round_ is None else str(round_)


def write_report(
    summaries: list[dict[str, Any]],
    path_md: Path,
    path_png: Path,
    *,
    title: str = "Audit report",
    findings: Sequence[str] = (),
) -> None:
    """Writes a short Markdown report for a data-protection officer, and a bar plot.

    Args:
        summaries: From :func:`summarize` of one writer's log.
        path_md: The Markdown file.
        path_png: The PNG of bytes sent per round, linked from the Markdown.
        title: E.g. ``"Audit report: node kvasir"``.
        findings: From :func:`.policy.check_policy` and :func:`.cross_check.cross_check`, listed as they are.
    """
    path_md, path_png = Path(path_md), Path(path_png)
    leaks = [(s, t) for s in summaries for t in s["image_shaped_out"]]
    sent = sum(s["bytes_out"] for s in summaries)
    n_sent = sum(s["sent"] for s in summaries)
    text = [
        f"# {title}",
        "",
        "This report lists every message in this audit log: what was sent, when, to whom and how large. "
        "Only model parameters and summary numbers (counts, losses, Dice scores) are meant to leave a hospital. "
        "Images, masks and predictions must never leave. The log records the names and shapes of what was sent, never its contents.",
        "",
    ]
    if leaks:
        text.append("**Attention: image-shaped data was sent.**")
        text += [f"- round {_round_label(s['round'])}, to {s['peer']}: {t}" for s, t in leaks]
    else:
        text.append("**Nothing image-shaped was sent.** No tensor had the shape of an image, mask or prediction batch.")
    text += [
        "",
        f"In total, {n_sent} messages carrying {_size(sent)} were sent.",
        "",
        "| Round | To / from | When (UTC) | Messages sent / received | Data sent | Data received | What was sent | Refusals |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        first, last = str(s["first"])[:19].replace("T", " "), str(s["last"])[:19].replace("T", " ")
        when = first if first == last else f"{first} to {last[11:] if last[:10] == first[:10] else last}"
        what = ", ".join(s["actions_out"]) or "nothing"
        if s["tensors_out"]:
            what += f" ({s['tensors_out']} tensors)"
        text.append(
            f"| {_round_label(s['round'])} | {s['peer']} | {when} | {s['sent']} / {s['received']} | "
            f"{_size(s['bytes_out'])} | {_size(s['bytes_in'])} | {what} | {s['refusals']} |"
        )
    text += ["", "## Findings", ""]
    text += [f"- {f}" for f in findings] if findings else ["No findings: the checks that were run found nothing wrong."]
    text += ["", f"![Data sent per round]({os.path.relpath(path_png, path_md.parent)})", ""]
    path_md.parent.mkdir(parents=True, exist_ok=True)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path_md, "\n".join(text).encode())
    atomic_write(path_png, _plot_bytes_out(summaries, title))


def _plot_bytes_out(summaries: list[dict[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted({s["round"] for s in summaries}, key=lambda r: (r is not None, r or 0))
    peers = sorted({str(s["peer"]) for s in summaries})
    fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * len(rounds) + 2), 3.5))
    bottom = [0.0] * len(rounds)
    for peer in peers:
        heights = [sum(s["bytes_out"] for s in summaries if s["round"] == r and str(s["peer"]) == peer) / 1e6 for r in rounds]
        ax.bar([_round_label(r) for r in rounds], heights, bottom=bottom, label=peer)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("round")
    ax.set_ylabel("data sent (MB)")
    ax.set_title(title)
    if len(peers) > 1:
        ax.legend(frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
