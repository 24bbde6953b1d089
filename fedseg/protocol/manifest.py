"""``RUN/manifest.json``: what a researcher needs to say exactly what a run was.

The resolved plan, the seed, fedseg's and its libraries' versions, the git commit of
the fedseg source where it is a checkout, and per node its device, label kind, split
sizes and each split's hash (the SHA-256 of the split's sorted image file names; the
names themselves never leave the node). A resumed run appends what it found at its
start under ``resumes`` and says which node's splits changed since the run began.
"""
from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import fedseg

from .files import atomic_write
from .messages import SPLITS, DescribeReply
from .plan import Plan

__all__ = ["LIBRARIES", "MANIFEST_FILE", "record_manifest"]

MANIFEST_FILE = "manifest.json"
#: The libraries whose versions decide a run's numbers (or its wire format).
LIBRARIES = ("torch", "numpy", "pillow", "syft")


def record_manifest(path: Path, run_id: str, plan: Plan, nodes: dict[str, DescribeReply], first_round: int) -> list[str]:
    """Writes the run's manifest, or on a resume appends to it.

    Args:
        path: The manifest file.
        run_id: The run.
        plan: The resolved plan (LC-Fed's sites filled in).
        nodes: Each node's describe reply.
        first_round: The first round this start of the run records.

    Returns:
        One line per node whose splits differ from those the run started with (a resume
        only), for the coordinator to show.
    """
    start = {"first_round": first_round, "environment": _environment(), "nodes": {n: _node(d) for n, d in sorted(nodes.items())}}
    if first_round == 0 or not path.exists():
        manifest = {
            "run_id": run_id,
            "plan": plan.to_dict(),
            # Every other seed follows from this one: model initialisation, and each node's
            # per-round seed (from the seed, the round and the node's name). A node's split
            # seed stays on it; its split hashes identify the splits.
            "seed": plan.seed,
            **start,
            "resumes": [],
        }
        changed = []
    else:
        manifest = json.loads(path.read_text())
        changed = [
            f"node {name}: its {split} split differs from the one this run started with"
            for name, node in start["nodes"].items()
            for split in SPLITS
            if name in manifest["nodes"] and node["split_hashes"].get(split) != manifest["nodes"][name]["split_hashes"].get(split)
        ]
        manifest["resumes"].append(start)
    atomic_write(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return changed


def _node(d: DescribeReply) -> dict[str, Any]:
    return {
        "device": d.device,
        "labels": d.label_kind,
        "channels": d.channels,
        "images": {"train": d.n_train, "val": d.n_val, "test": d.n_test},
        "split_hashes": dict(d.split_hashes),
        "fingerprint": d.fingerprint,
    }


def _environment() -> dict[str, Any]:
    libraries = {}
    for name in LIBRARIES:
        try:
            libraries[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libraries[name] = None
    import torch

    # torch.version.cuda is the CUDA that torch was built with (None for CPU builds).
    return {"fedseg": fedseg.__version__, "python": platform.python_version(), "libraries": libraries,
            "torch_cuda": torch.version.cuda, "git": _git()}


def _git() -> dict[str, Any] | None:
    """The commit of the fedseg source, and whether it had uncommitted changes; None outside a checkout."""
    source = Path(fedseg.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}
