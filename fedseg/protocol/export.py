"""A run's global model as a file a hospital can ship: TorchScript, its input contract, a model card.

``fedseg export RUN --out DIR`` writes:

- ``model.pt``: the model traced to TorchScript; ``torch.jit.load`` is all it needs.
  It maps float images ``(N, C, S, S)`` in [0, 1] to logits ``(N, 1, S, S)``.
- ``model.json``: what a caller must do around it (size, channels, normalisation,
  threshold) and the run's plan.
- ``MODEL_CARD.md``: the run, its sites and its figures at the exported round.

Only methods whose whole model is shared can be exported from the coordinator: under
FedBN, FedRep, LC-Fed and Local part of each model never leaves its node.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.models.personalization import LocalPart

from .errors import ProtocolError
from .files import atomic_write
from .plan import Plan
from .report import markdown_table, site_table
from .run_store import RunStore

__all__ = ["EXPORT_FORMAT", "Exported", "export_run"]

EXPORT_FORMAT = "fedseg-export/1"
MODEL_FILE, SPEC_FILE, CARD_FILE = "model.pt", "model.json", "MODEL_CARD.md"
#: The foreground probability at and above which a pixel is lesion, as everywhere in fedseg.
THRESHOLD = 0.5


@dataclass(frozen=True)
class Exported:
    """What :func:`export_run` wrote."""

    run_id: str
    round: int
    files: list[Path]


def export_run(run_dir: Path, which: str, out: Path) -> Exported:
    """Writes ``out/model.pt``, ``out/model.json`` and ``out/MODEL_CARD.md`` for one of a run's models.

    Args:
        run_dir: A run directory of ``fedseg run``.
        which: "best" (best validation Dice, as ``report.md`` chooses) or "last".
        out: Output folder; files of an earlier export there are replaced.

    Raises:
        ProtocolError: If the run or that model is missing, or the run's method keeps
            part of every model on the nodes.
    """
    import torch

    from fedseg.models.fedmix import CoTrainedUNets
    from fedseg.models.local_training import arrays_to_state

    store = RunStore(run_dir)
    state, arrays = store.load(which)
    plan = Plan.from_dict(state.plan)
    if plan.local_part is not LocalPart.NONE:
        raise ProtocolError(f"run {state.run_id} trained with {plan.algorithm}: every node keeps its own "
                            f"{plan.local_part.value} part, so the coordinator holds no complete model to export "
                            "(segment on a node with `fedseg node predict`)")
    model = plan.build_model()
    arrays_to_state(model, arrays)
    if isinstance(model, CoTrainedUNets):
        model = model.net1  # FedMix predicts with network 1
    model.eval()
    example = torch.zeros(1, plan.model.in_channels, plan.image_size, plan.image_size)  # (1, C, S, S)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # Expected: the U-Net's input checks become constants of the trace, which serves
        # only the exported size; and PyTorch now prefers torch.export, whose files need
        # more than torch.jit.load to run.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, buf)
    rows = [r for r in store.read_metrics() if r["round"] <= state.round]
    spec = _spec(plan, state.run_id, state.round, which)
    # Everything is built before anything is written, so a failure leaves no partial export.
    files = {
        MODEL_FILE: buf.getvalue(),
        SPEC_FILE: (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode(),
        CARD_FILE: _card(plan, spec, rows).encode(),
    }
    for name, data in files.items():
        atomic_write(out / name, data)
    return Exported(state.run_id, state.round, [out / name for name in files])


def _spec(plan: Plan, run_id: str, round_: int, which: str) -> dict[str, Any]:
    channels, size = plan.model.in_channels, plan.image_size
    return {
        "format": EXPORT_FORMAT,
        "model": MODEL_FILE,
        "run_id": run_id,
        "round": round_,
        "which": which,
        "algorithm": plan.algorithm,
        "input": {
            "layout": "NCHW",
            "dtype": "float32",
            "size": [size, size],
            "channels": channels,
            "colour": "RGB" if channels == 3 else "L (grey)",
            "resize": f"bilinear, the whole image to {size} x {size} (the aspect ratio is not kept)",
            "normalisation": {"formula": "x = pixel / 255", "scale": 1 / 255, "mean": [0.0] * channels, "std": [1.0] * channels},
        },
        "output": {
            "layout": "NCHW",
            "meaning": "foreground logits, one channel",
            "activation": "sigmoid",
            "threshold": THRESHOLD,
            "mask": f"sigmoid(logits) > {THRESHOLD}, resized back to the image's size with nearest-neighbour",
        },
        "plan": plan.to_dict(),
    }


def _card(plan: Plan, spec: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    scored = [r for r in rows if r["round"] == spec["round"] and "test_dice" in r]
    sites = ", ".join(sorted({r["site"] for r in rows})) or "none recorded"
    chosen = "the round with the best validation Dice" if spec["which"] == "best" else "the last completed round"
    inp = spec["input"]
    lines = [
        f"# fedseg model: run {spec['run_id']}, round {spec['round']}",
        "",
        f"- **Method:** {plan.algorithm}, {plan.rounds} rounds planned; exported round {spec['round']} ({chosen}).",
        f"- **Sites:** {sites}. Each trained on its own images; none left its hospital.",
        f"- **Architecture:** U-Net, width {plan.model.width}, depth {plan.model.depth}, {plan.model.norm} norm.",
        f"- **Input:** {inp['channels']} channel(s) ({inp['colour']}), resized {inp['resize']}; {inp['normalisation']['formula']}.",
        f"- **Output:** one logit per pixel; lesion where sigmoid(logit) > {THRESHOLD}.",
        "",
        f"## Figures at round {spec['round']}",
        "",
        markdown_table(site_table(rows, spec["round"])) if scored else "No scores were recorded for this round.",
        "",
        "Each site's figures are on its own held-out test split. Dice and IoU count the foreground only, per image.",
        "",
        "## Use",
        "",
        "    import torch",
        f"    model = torch.jit.load('{MODEL_FILE}')",
        f"    logits = model(images)  # float (N, {inp['channels']}, {inp['size'][0]}, {inp['size'][1]}) in [0, 1]",
        f"    masks = torch.sigmoid(logits) > {THRESHOLD}",
        "",
        "Research use only: not validated for clinical decisions.",
        "",
    ]
    return "\n".join(lines)
