"""Segmenting new images on the node with a model it already holds; nothing leaves the node.

After each evaluation a node keeps the models it scored for that run in its workdir:
the global model (for personalized methods, completed with the node's own local part)
and, where the method has one, its personalized model. A new site that adapted with
IOP-FL's test-time routing also keeps its routed model, with ``routed.json`` naming its
experts and settings. ``fedseg node predict`` loads one of them and writes a mask and an
overlay per image.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import LabelKind, index_site, load_arrays
from .errors import NodeError

__all__ = ["HEADS_FILE", "MODELS_DIR", "latest_run", "predict_folder"]

MODELS_DIR = "models"
#: LC-Fed: the other sites' heads a node calibrated its personalized model with.
HEADS_FILE = "heads.npz"


def latest_run(workdir: Path) -> str:
    """The run whose models this node saved most recently.

    Raises:
        NodeError: If the node holds no saved model yet.
    """
    runs = sorted((p for p in (workdir / MODELS_DIR).glob("*") if (p / "plan.json").exists()), key=lambda p: (p / "plan.json").stat().st_mtime)
    if not runs:
        raise NodeError(f"{workdir} holds no model yet: a node keeps models once it has evaluated a run")
    return runs[-1].name


def predict_folder(workdir: Path, run: str, which: str, images: Path, out: Path) -> int:
    """Writes ``out/masks/NAME.png`` (0/255, original size) and ``out/overlays/NAME.png``.

    Args:
        workdir: The node's workdir.
        run: Run id, as saved under ``workdir/models``.
        which: "global", "personalized" or "routed".
        images: A folder of images, or a site folder with ``images/``.
        out: Output folder.

    Returns:
        The number of images segmented.

    Raises:
        NodeError: If the run or the model is missing, or an image cannot be read.
    """
    import torch

    from fedseg.models.device import resolve_device
    from fedseg.models.errors import ModelError
    from fedseg.models.lcfed import CalibratedUNet, split_heads
    from fedseg.models.local_training import arrays_to_state, predict
    from fedseg.models.overlay import overlay_png
    from fedseg.models.routing import build_routed
    from fedseg.protocol.plan import Plan

    from .config import NodeConfig

    folder = workdir / MODELS_DIR / run
    model_file = folder / f"{which}.npz"
    if not model_file.exists():
        kept = sorted(p.stem for p in folder.glob("*.npz"))
        raise NodeError(f"run {run} on this node has no {which} model (it has: {', '.join(kept) or 'none'})")
    config = NodeConfig.load(workdir)
    try:
        device = resolve_device(config.device)
    except ModelError as exc:
        raise NodeError(str(exc)) from None
    plan = Plan.from_dict(json.loads((folder / "plan.json").read_text()))
    if which == "routed":
        routed = json.loads((folder / "routed.json").read_text())
        model = build_routed(plan.model, len(routed["experts"]), routed["adapt"]["routing"])
    else:
        model = plan.build_model(config.name)
    model.to(device)
    with np.load(model_file) as saved:
        arrays_to_state(model, {k: saved[k] for k in saved.files})
    if which == "personalized" and (folder / HEADS_FILE).exists():
        with np.load(folder / HEADS_FILE) as saved:
            model = CalibratedUNet(model, split_heads({k: saved[k] for k in saved.files}))
    with tempfile.TemporaryDirectory() as tmp:
        root = images
        if not (images / "images").is_dir():
            # Reuse the site validation on a bare folder of images.
            root = Path(tmp)
            os.symlink(images.resolve(), root / "images")
        index = index_site(root, LabelKind.NONE, group_by=None)
        pixels, _ = load_arrays(index, plan.image_size, plan.model.in_channels)
        preds = predict(model, torch.from_numpy(pixels))
        (out / "masks").mkdir(parents=True, exist_ok=True)
        (out / "overlays").mkdir(parents=True, exist_ok=True)
        for name, path, pixel, pred in zip(index.names, index.image_paths, pixels, preds):
            with Image.open(path) as original:
                size = original.size
            mask = Image.fromarray(pred[0].numpy().astype(np.uint8) * 255).resize(size, Image.NEAREST)
            mask.save(out / "masks" / f"{name}.png")
            overlay_png(pixel, pred.numpy(), None, out / "overlays" / f"{name}.png")
    return len(index.names)
