"""Per-site tables and Dice curves from a run's metrics rows."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from .files import atomic_write

__all__ = ["best_round", "markdown_table", "site_table", "write_report", "plot_dice"]


_COLUMNS = {
    "test_dice": "test Dice",
    "test_iou": "test IoU",
    "test_assd": "test ASSD (px)",
    "test_hd95": "test HD95 (px)",
    "val_dice": "val Dice",
    "personal_test_dice": "personal test Dice",
    "personal_test_iou": "personal test IoU",
    "personal_test_assd": "personal test ASSD (px)",
    "personal_test_hd95": "personal test HD95 (px)",
}


def _mean_over_sites(rows: list[dict[str, Any]], key: str, weighted: bool) -> float:
    # "personal_test_dice" is weighted by "personal_test_n", "val_dice" by "val_n".
    vals = [(r[key], r[key.rsplit("_", 1)[0] + "_n"] if weighted else 1) for r in rows]
    total = sum(w for _, w in vals)
    return sum(v * w for v, w in vals) / total if total else float("nan")


def _by_round(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Scored rows by round (a node without masks trains but has no scores)."""
    grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if "test_dice" in row:
            grouped[row["round"]].append(row)
    return dict(sorted(grouped.items()))


def best_round(rows: list[dict[str, Any]]) -> int:
    """The round with the highest image-weighted mean validation Dice (never chosen on test)."""
    rounds = _by_round(rows)
    return max(rounds, key=lambda r: (_mean_over_sites(rounds[r], "val_dice", weighted=True), -r))


def site_table(rows: list[dict[str, Any]], round_: int) -> list[list[str]]:
    """Header plus one row per site, then the mean over sites and the image-weighted mean."""
    at = sorted(_by_round(rows)[round_], key=lambda r: r["site"])
    # Personalized methods also score each node's own model: shown beside the global one.
    keys = [k for k in _COLUMNS if all(k in r for r in at)]
    # Where each node trained; runs recorded before nodes reported it have no column.
    device = all("device" in r for r in at)
    table = [["site", "test n", *(_COLUMNS[k] for k in keys), *(["device"] if device else [])]]
    for r in at:
        table.append([r["site"], str(r["test_n"]), *(f"{r[k]:.4f}" for k in keys), *([r["device"]] if device else [])])
    for label, weighted in (("mean over sites", False), ("mean, image-weighted", True)):
        table.append([label, str(sum(r["test_n"] for r in at)), *(f"{_mean_over_sites(at, k, weighted):.4f}" for k in keys),
                      *([""] if device else [])])
    return table


def markdown_table(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def write_report(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Writes the Markdown report: the best round by validation Dice and the last round."""
    best, last = best_round(rows), max(_by_round(rows))
    text = [
        f"# {title}",
        "",
        f"## Best round by validation Dice: round {best}",
        "",
        markdown_table(site_table(rows, best)),
        "",
        f"## Last round: round {last}",
        "",
        markdown_table(site_table(rows, last)),
        "",
        "Dice and IoU count the foreground only, per image, then per site. ASSD is the average symmetric "
        "surface distance in pixels, HD95 the larger of the two directed 95th percentiles of the surface distances "
        "(MONAI's definition), in pixels (both lower is better; a lesion missed or invented entirely counts as the image diagonal). "
        "Curves: `dice.png`.",
        "",
    ]
    atomic_write(path, "\n".join(text).encode())


def plot_dice(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Writes a PNG of validation and test Dice per site over rounds."""
    import io

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({r["site"] for r in rows if "test_dice" in r})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, split in zip(axes, ("val", "test")):
        for site in sites:
            pts = sorted((r["round"], r[f"{split}_dice"]) for r in rows if r["site"] == site and "test_dice" in r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=site)
        ax.set_title(f"{split} Dice")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice (foreground, per image)")
    axes[0].set_ylim(0, 1)
    axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(sites), 6), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
