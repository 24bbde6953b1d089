"""``fedseg node``: what a data owner runs. Only click (and light fedseg constants) is imported at module level."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from fedseg.cli_help import option

from .syft_retention import DEFAULT_RETENTION_S

__all__ = ["node"]


@click.group()
def node() -> None:
    """Run a hospital's node: a datasite that keeps its images and serves training only."""


def _parse_where(values: tuple[str, ...]) -> dict[str, str]:
    where = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not COLUMN=PREFIX", param_hint="--where")
        where[key] = value
    return where


@node.command()
@option("--name", required=True, help="Site name shown to the coordinator.")
@option("--data", "data", required=True, type=click.Path(path_type=Path), help="Site folder with images/, masks/ and optional meta.csv.")
@option("--labels", type=click.Choice(["pixel", "box", "image", "none"]), default="pixel", show_default=True,
              help="Labels this site has. none: a new site that only adapts (masks, if present, only score it).")
@option("--boxes", type=click.Path(path_type=Path), default=None, show_default="none", help="With --labels box: CSV name,x0,y0,x1,y1 (one row per lesion).")
@option("--image-labels", type=click.Path(path_type=Path), default=None, show_default="meta.csv's has_lesion", help="With --labels image: CSV name,has_lesion.")
@option("--boxes-from-masks", is_flag=True, help="Benchmarks: derive boxes from the masks (never trains on the masks).")
@option("--image-labels-from-masks", is_flag=True, help="Benchmarks: derive image-level labels from the masks.")
@option("--workdir", required=True, type=click.Path(path_type=Path), help="Private folder for keys, invite, logs and overlays.")
@option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@option("--port", default=8081, show_default=True, type=click.IntRange(1, 65535))
@option("--limit", type=click.IntRange(3), default=None, show_default="all images", help="Use only the first N images in sorted-name order (after --where); "
              "on a site sorted by class or video that is one class or video: prefer --sample.")
@option("--sample", type=click.IntRange(3), default=None, show_default="all images", help="Use a seeded random N images (after --where), "
              "stratified by has_lesion where meta.csv or the label file gives it.")
@option("--sample-seed", default=0, show_default=True, type=int, help="Seed of --sample.")
@option("--group-by", default="auto", show_default=True, help="meta.csv column that keeps related images in one split; 'none' for random.")
@option("--where", multiple=True, help="Keep images whose meta.csv COLUMN starts with PREFIX (COLUMN=PREFIX).")
@option("--split-seed", default=0, show_default=True, type=int, help="Seed of the local train/val/test split.")
@option("--max-message-mb", default=256, show_default=True, type=click.IntRange(1, 4096))
@option("--share-head/--no-share-head", default=True, show_default=True,
              help="LC-Fed: let this site's 1x1 segmentation head go to the other sites for their calibration "
                   "(--no-share-head: it stays here, and calibration runs without this site).")
@option("--new-credentials", is_flag=True,
              help="On a restart: issue new coordinator credentials, so the previous invite stops working "
                   "(by default a restarted node keeps them, and its coordinator reconnects by itself).")
@option("--require-secure-aggregation", is_flag=True, help="Train only in secure-aggregation rounds: no coordinator ever gets this node's update unmasked.")
@option("--share-personalized", is_flag=True, help="Allow this node's personalized model (IOP-FL) to leave it, "
              "so a new hospital can route over it. Off by default: the model never leaves.")
@option("--syft-retention", "syft_retention_s", type=click.FloatRange(min=1.0), default=DEFAULT_RETENTION_S, show_default=True, metavar="SECONDS",
              help="How long the Syft store keeps each served call's request and reply (models and updates) before deleting them.")
@option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
              help="Where this node trains, scores and predicts; auto takes the first CUDA GPU if PyTorch sees one, else the CPU.")
@option("--amp", is_flag=True, help="Mixed precision (bfloat16) on a CUDA GPU: faster, less memory; refused on the CPU.")
def start(name: str, data: Path, labels: str, boxes: Path | None, image_labels: Path | None, boxes_from_masks: bool,
          image_labels_from_masks: bool, workdir: Path, host: str, port: int, limit: int | None, sample: int | None, sample_seed: int,
          group_by: str, where: tuple[str, ...], split_seed: int, max_message_mb: int, share_head: bool,
          new_credentials: bool, require_secure_aggregation: bool, share_personalized: bool, syft_retention_s: float,
          device: str, amp: bool) -> None:
    """Check everything the node needs, start the datasite and write the coordinator's invite.

    The data folder, its labels and its train/val/test splits are checked before anything
    is served: a node that could not answer its coordinator's calls does not start.
    """
    from fedseg.models.device import resolve_device
    from fedseg.models.errors import ModelError

    from .config import NodeConfig
    from .errors import NodeError
    from .site import open_site
    from .perimeter.private_files import make_private

    if boxes_from_masks and labels != "box" or image_labels_from_masks and labels != "image":
        raise click.UsageError("--boxes-from-masks goes with --labels box, --image-labels-from-masks with --labels image")
    if limit is not None and sample is not None:
        raise click.UsageError("--limit (the first N names) and --sample (a random N) exclude each other")
    try:
        resolve_device(device, amp)
    except ModelError as exc:
        raise click.ClickException(f"node {name} will not start: {exc}") from None
    from_masks = boxes_from_masks or image_labels_from_masks
    config = NodeConfig(
        name=name, data=str(data.resolve()), labels=labels, workdir=str(workdir.resolve()), limit=limit,
        sample=sample, sample_seed=sample_seed,
        group_by=None if group_by == "none" else group_by, where=_parse_where(where), split_seed=split_seed,
        max_message_mb=max_message_mb, boxes=str(boxes.resolve()) if boxes else None,
        image_labels=str(image_labels.resolve()) if image_labels else None, labels_from_masks=from_masks,
        share_head=share_head,
        require_secure_aggregation=require_secure_aggregation,
        share_personalized=share_personalized,
        syft_retention_s=syft_retention_s,
        device=device,
        amp=amp,
    )
    try:
        index, _ = open_site(config)
    except NodeError as exc:
        raise click.ClickException(f"node {name} will not start: {exc}") from None
    make_private(workdir)
    config.save()
    _serve(config, index, host, port, new_credentials)


def _serve(config, index, host: str, port: int, new_credentials: bool) -> None:  # noqa: ANN001 - types live behind lazy imports
    from .node_log import log_to_workdir
    from .datasite import serve
    from .errors import NodeError

    # Syft and uvicorn print a great deal; it goes to server.log, and the owner's terminal
    # shows fedseg's own lines only.
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    log_fd = os.open(Path(config.workdir) / "server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    log_to_workdir(Path(config.workdir))
    try:
        serve(config, index, host, port, say=lambda line: print(line, file=terminal, flush=True), new_credentials=new_credentials)
    except NodeError as exc:
        print(f"Error: {exc}", file=terminal, flush=True)
        sys.exit(1)


@node.command(name="predict")
@option("--workdir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False), help="The node's workdir.")
@option("--run", "run_id", default=None, show_default="the run this node evaluated last", help="Run id.")
@option("--model", "which", type=click.Choice(["personalized", "global", "routed"]), default="personalized", show_default=True,
              help="routed: the model a new site adapted with `fedseg adapt`.")
@option("--images", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False), help="Folder of images to segment.")
@option("--out", required=True, type=click.Path(path_type=Path), help="Where masks/ and overlays/ go.")
def predict_cmd(workdir: Path, run_id: str | None, which: str, images: Path, out: Path) -> None:
    """Segment new images locally with a model this node holds."""
    from .errors import NodeError
    from .predict import latest_run, predict_folder

    try:
        run_id = run_id or latest_run(workdir)
        n = predict_folder(workdir, run_id, which, images, out)
    except NodeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"segmented {n} images with the {which} model of run {run_id}: {out / 'masks'}, {out / 'overlays'}")
