"""Index, validate, load and split one site's segmentation data.

A site folder has the layout::

    <root>/images/NAME.ext   image (.png, .jpg, .jpeg, .bmp, .tif, .tiff)
    <root>/masks/NAME.png    binary mask, same NAME stem and size as its image
    <root>/meta.csv          optional, one row per NAME (column ``name``)

A site may instead hold weak labels (see :class:`LabelKind`), read from a CSV
file that can live anywhere::

    boxes.csv    name,x0,y0,x1,y1     one row per lesion, pixel coordinates of
                                      the image file, x1/y1 exclusive; an image
                                      without a row has no lesion
    labels.csv   name,has_lesion      one row per image, 0 or 1 (the
                                      ``has_lesion`` column of meta.csv also works)

For benchmarks the weak labels can be derived from the masks instead
(``labels_from_masks``): the tight box around all foreground, or "mask is not
empty".

:func:`index_site` checks the whole folder before anything is served and
raises one :class:`~fedseg.node.errors.DatasetError` that lists every
offender. :func:`load_arrays` turns an index into fixed-size uint8 arrays,
:func:`load_weak_labels` gives the weak training targets at the same size,
:func:`make_splits` makes seeded, group-aware train/val/test splits and
:func:`describe` summarises a site without revealing any pixel.

Training targets and scoring masks are kept apart on purpose: a box or
image-level site trains only on what :func:`load_weak_labels` returns. The
masks :func:`load_arrays` returns for such a site (when it has them) are for
scoring the model and must never reach the trainer.

This module imports only numpy, PIL and the standard library so that the node
CLI and the datasite can import it without paying for torch.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedseg.node.errors import DatasetError

__all__ = [
    "AUTO_GROUP_COLUMNS",
    "IMAGE_SUFFIXES",
    "LabelKind",
    "SiteIndex",
    "Splits",
    "describe",
    "index_site",
    "load_arrays",
    "load_weak_labels",
    "make_splits",
    "sample_names",
]

#: Image file suffixes recognised in ``images/`` (compared case-insensitively).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

#: meta.csv columns that ``group_by="auto"`` uses, in order of preference.
#: Both mark near-duplicates (consecutive video frames in CVC-ClinicDB, two
#: views of one patient in BUS-BRA) that must not straddle train and test.
AUTO_GROUP_COLUMNS = ("sequence", "patient_case")

_MASK_SUFFIX = ".png"
_META_FILE = "meta.csv"
_BOX_COLUMNS = ("name", "x0", "y0", "x1", "y1")
_IMAGE_LABEL_COLUMNS = ("name", "has_lesion")
_HAS_LESION = "has_lesion"
_INT = re.compile(r"-?[0-9]+")
_MAX_VALUES_SHOWN = 5
_WORKERS = min(8, os.cpu_count() or 1)

# Modes whose pixels carry no colour. "P" is absent on purpose: a palette can
# hold colours or greys, so palette images are inspected pixel by pixel.
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Modes deeper than 8 bit; PIL's own convert("L") clips them instead of scaling.
_DEEP_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


class LabelKind(str, Enum):
    """What kind of annotation a site provides.

    ``PIXEL``: masks. ``BOX``: lesion bounding boxes. ``IMAGE``: one
    has-a-lesion flag per image. ``NONE``: images only. Where box and image
    labels come from is chosen by :func:`index_site`.
    """

    PIXEL = "pixel"
    BOX = "box"
    IMAGE = "image"
    NONE = "none"


#: One box ``(x0, y0, x1, y1)`` in pixel coordinates of its image file; x1 and
#: y1 are exclusive, so the box covers columns x0..x1-1 and rows y0..y1-1.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class SiteIndex:
    """Validated, deterministic listing of one site's images, masks and labels.

    Attributes:
        root: Site folder.
        names: Image stems, sorted.
        image_paths: Image file per name.
        mask_paths: Mask file per name, or ``None`` for every entry when the
            index has no masks. ``PIXEL`` and ``labels_from_masks`` sites always
            have masks; ``NONE`` sites and ``BOX``/``IMAGE`` sites reading their
            labels from a file have them only when ``masks/`` holds a mask for every indexed image,
            and then only to score the model (see :attr:`has_masks`).
        channels: The site's mode: 3 if any image is in colour, else 1.
        native_size: ``(H, W)`` shared by every image, or ``None`` if sizes vary.
        groups: Group key per name (from ``group_column``), or ``None`` for
            purely random splits.
        group_column: meta.csv column the groups come from, or ``None``.
        label_kind: Annotation kind the index was validated for.
        boxes: For ``BOX`` read from a file, the boxes of each image (possibly
            none) in pixel coordinates of its image file; ``None`` otherwise.
        has_lesion: For ``IMAGE`` read from a file or meta.csv, the flag of each
            image; ``None`` otherwise.
        labels_from_masks: ``BOX``/``IMAGE`` labels are derived from the masks
            (benchmarks) rather than read from a file.
        label_file: The box or image-label file ``boxes``/``has_lesion`` were
            read from; ``None`` for ``has_lesion`` from meta.csv and otherwise.
    """

    root: Path
    names: tuple[str, ...]
    image_paths: tuple[Path, ...]
    mask_paths: tuple[Path | None, ...]
    channels: int
    native_size: tuple[int, int] | None
    groups: tuple[str, ...] | None
    group_column: str | None
    label_kind: LabelKind
    boxes: tuple[tuple[Box, ...], ...] | None = None
    has_lesion: tuple[bool, ...] | None = None
    labels_from_masks: bool = False
    label_file: Path | None = None

    def __post_init__(self) -> None:
        n = len(self.names)
        if len(self.image_paths) != n or len(self.mask_paths) != n:
            raise ValueError(
                f"SiteIndex: {n} names but {len(self.image_paths)} image paths "
                f"and {len(self.mask_paths)} mask paths"
            )
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"SiteIndex: {n} names but {len(self.groups)} groups")
        if self.channels not in (1, 3):
            raise ValueError(f"SiteIndex: channels must be 1 or 3, got {self.channels}")
        if not isinstance(self.label_kind, LabelKind):
            raise ValueError(f"SiteIndex: label_kind must be a LabelKind, got {self.label_kind!r}")
        present = sum(p is not None for p in self.mask_paths)
        if present not in (0, n):
            raise ValueError(f"SiteIndex: {present} of {n} mask paths given; give all or none")
        self._check_labels(n, present == n and n > 0)

    def _check_labels(self, n: int, all_masks: bool) -> None:
        kind = self.label_kind
        weak = kind in (LabelKind.BOX, LabelKind.IMAGE)
        if self.labels_from_masks and not weak:
            raise ValueError(f"SiteIndex: labels_from_masks needs label_kind box or image, got {kind.value}")
        if self.labels_from_masks and not all_masks:
            raise ValueError("SiteIndex: labels_from_masks needs a mask path for every image")
        if kind is LabelKind.PIXEL and not all_masks and n > 0:
            raise ValueError("SiteIndex: label_kind pixel needs a mask path for every image")

        want_boxes = kind is LabelKind.BOX and not self.labels_from_masks
        if (self.boxes is not None) != want_boxes:
            raise ValueError(
                "SiteIndex: boxes are given exactly for label_kind box read from a file "
                f"(label_kind={kind.value}, labels_from_masks={self.labels_from_masks})"
            )
        if self.boxes is not None:
            if len(self.boxes) != n:
                raise ValueError(f"SiteIndex: {n} names but boxes for {len(self.boxes)}")
            for name, image_boxes in zip(self.names, self.boxes):
                for box in image_boxes:
                    if not (
                        isinstance(box, tuple)
                        and len(box) == 4
                        and all(isinstance(v, int) for v in box)
                        and 0 <= box[0] < box[2]
                        and 0 <= box[1] < box[3]
                    ):
                        raise ValueError(f"SiteIndex: invalid box {box!r} for {name!r}")

        want_flags = kind is LabelKind.IMAGE and not self.labels_from_masks
        if (self.has_lesion is not None) != want_flags:
            raise ValueError(
                "SiteIndex: has_lesion is given exactly for label_kind image read from a file "
                f"or meta.csv (label_kind={kind.value}, labels_from_masks={self.labels_from_masks})"
            )
        if self.has_lesion is not None:
            if len(self.has_lesion) != n:
                raise ValueError(f"SiteIndex: {n} names but has_lesion for {len(self.has_lesion)}")
            if not all(isinstance(v, bool) for v in self.has_lesion):
                raise ValueError("SiteIndex: has_lesion must hold bools")
        if self.label_file is not None and self.boxes is None and self.has_lesion is None:
            raise ValueError("SiteIndex: label_file is only given with boxes or has_lesion read from it")

    @property
    def weak_label_source(self) -> str | None:
        """Where the weak labels come from: ``"file"``, ``"meta"`` (meta.csv
        ``has_lesion``), ``"masks"``, or ``None`` for ``PIXEL``/``NONE``."""
        if self.label_kind not in (LabelKind.BOX, LabelKind.IMAGE):
            return None
        if self.labels_from_masks:
            return "masks"
        return "meta" if self.boxes is None and self.label_file is None else "file"

    @property
    def has_masks(self) -> bool:
        """Whether :func:`load_arrays` returns masks (to train on for ``PIXEL``,
        else only to score)."""
        return len(self.mask_paths) > 0 and all(p is not None for p in self.mask_paths)

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True, eq=False)
class Splits:
    """Disjoint train/val/test index arrays into a :class:`SiteIndex`.

    ``eq`` is disabled because element-wise array comparison has no single
    truth value; compare the arrays with ``np.array_equal`` instead.

    Attributes:
        train: Sorted int64 indices, shape ``(n_train,)``.
        val: Sorted int64 indices, shape ``(n_val,)``.
        test: Sorted int64 indices, shape ``(n_test,)``.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def __post_init__(self) -> None:
        parts = {"train": self.train, "val": self.val, "test": self.test}
        for name, arr in parts.items():
            if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype != np.int64:
                got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise ValueError(f"Splits.{name} must be a 1-D int64 array, got {got}")
        joined = np.concatenate(list(parts.values()))
        if np.unique(joined).size != joined.size:
            raise ValueError("Splits: train, val and test overlap")


# --------------------------------------------------------------------------- #
# Indexing and validation
# --------------------------------------------------------------------------- #


def index_site(
    root: Path,
    labels: LabelKind = LabelKind.PIXEL,
    limit: int | None = None,
    group_by: str | None = "auto",
    where: Mapping[str, str] | None = None,
    *,
    boxes: Path | None = None,
    image_labels: Path | None = None,
    labels_from_masks: bool = False,
    sample: int | None = None,
    sample_seed: int = 0,
) -> SiteIndex:
    """Index and validate a site folder and its labels.

    Checks are run in two passes. The structural pass covers the whole folder
    and only lists files and reads CSV files: image/mask pairing, orphan masks,
    duplicate stems, meta.csv consistency and the format of a label file (header,
    column count, integers, 0/1 flags, known names, duplicated image labels,
    empty boxes). The pixel pass opens and fully decodes every selected image
    and mask (after ``where`` and ``limit``), so that a benchmark subset of a
    large site stays fast; it checks readability, mask size and binarity, that
    every box lies inside its image, and that every selected image has an
    image-level label. Every offender of a pass is collected and reported in
    one error; label-file problems are named by file and 1-based line number.

    Where the labels come from:

    * ``PIXEL``: ``masks/``. ``NONE``: no labels; complete masks are kept to score with only.
    * ``BOX``: exactly one of ``boxes`` (CSV with header ``name,x0,y0,x1,y1``,
      one row per lesion) or ``labels_from_masks=True``.
    * ``IMAGE``: ``image_labels`` (CSV with header ``name,has_lesion``, one row
      per image), else ``labels_from_masks=True``, else the ``has_lesion``
      column of meta.csv. A file and ``labels_from_masks`` exclude each other.

    With ``labels_from_masks`` the masks are required and validated as for
    ``PIXEL``; the weak labels are derived from them by
    :func:`load_weak_labels` and the masks themselves serve only to score.
    With labels from a file, or none, ``masks/`` is optional: if it holds a mask
    for every selected image those masks are validated and kept for scoring,
    otherwise the index has no masks.

    Args:
        root: Site folder containing ``images/``, ``masks/`` (for pixel labels)
            and optionally ``meta.csv``.
        labels: Annotation kind to validate. ``NONE`` never trains, and keeps
            ``masks/`` only to score (a benchmark's held-out site).
        limit: Keep only the first ``limit`` images in sorted-name order, after
            ``where`` filtering. ``None`` keeps all.
        sample: Keep a seeded random ``sample`` of the images instead, after
            ``where`` filtering, stratified by ``has_lesion`` where it is known
            (see :func:`sample_names`). Excludes ``limit``.
        sample_seed: Seed of ``sample``.
        group_by: meta.csv column whose values keep related images in the same
            split. ``"auto"`` picks the first of :data:`AUTO_GROUP_COLUMNS`
            present in meta.csv, or none; ``None`` means random splits.
        where: Keep only images whose meta.csv value in each given column starts
            with the given prefix, e.g. ``{"device": "GE Logiq 5"}`` matches
            ``"GE Logiq 5 @10-12MHz"``. Images without a meta.csv row never match.
        boxes: Box label file, for ``labels=BOX`` only. Coordinates are pixels
            of the image file as stored in ``images/``; an image without a row
            has no lesion.
        image_labels: Image-level label file, for ``labels=IMAGE`` only.
        labels_from_masks: Derive ``BOX``/``IMAGE`` labels from the masks
            (benchmarks), for those kinds only.

    Returns:
        The validated index.

    Raises:
        DatasetError: If the folder or a label file is missing or malformed, or
            the label options contradict each other or ``labels``. The message
            names every offending file or line (up to ten, then a count).
        ValueError: If ``limit`` or ``sample`` is smaller than 1, or both are given.
    """
    root = Path(root)
    labels = LabelKind(labels)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if sample is not None and (sample < 1 or limit is not None):
        raise ValueError(f"sample must be >= 1 and excludes limit, got sample={sample}, limit={limit}")
    boxes = Path(boxes) if boxes is not None else None
    image_labels = Path(image_labels) if image_labels is not None else None
    _check_label_options(labels, boxes, image_labels, labels_from_masks)
    if not root.exists():
        raise DatasetError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"data folder {root} is not a directory")
    for label_file in (boxes, image_labels):
        if label_file is not None and not label_file.is_file():
            raise DatasetError(f"label file {label_file} does not exist")

    where_ctx = str(root)
    images, problems = _list_files(root, "images", IMAGE_SUFFIXES)
    if not images and not problems:
        raise DatasetError(
            f"no images in {root / 'images'} (expected {', '.join(sorted(IMAGE_SUFFIXES))})"
        )

    masks: dict[str, Path] = {}
    need_masks = labels is LabelKind.PIXEL or labels_from_masks
    if need_masks:
        if not (root / "masks").is_dir():
            problems.append(f"masks/: folder {root / 'masks'} does not exist")
        else:
            masks, mask_problems = _list_files(root, "masks", frozenset({_MASK_SUFFIX}))
            problems += mask_problems
            problems += [
                f"{_rel(root, images[n])} has no mask masks/{n}{_MASK_SUFFIX}"
                for n in sorted(images.keys() - masks.keys())
            ]
            problems += [
                f"{_rel(root, masks[n])} has no image images/{n}.*"
                for n in sorted(masks.keys() - images.keys())
            ]
    elif (root / "masks").is_dir():
        # Optional scoring masks: used only if the listing is clean and, below,
        # complete for the selected images.
        masks, mask_problems = _list_files(root, "masks", frozenset({_MASK_SUFFIX}))
        if mask_problems:
            masks = {}

    meta_columns, meta_rows, meta_lines, meta_problems = _read_meta(root, images)
    problems += meta_problems

    # Weak labels as read from a file or meta.csv, keyed by image name.
    box_rows: dict[str, list[tuple[int, Box]]] = {}
    flags: dict[str, bool] = {}
    flag_source = ""
    if boxes is not None:
        box_rows, box_problems = _read_boxes(root, boxes, images)
        problems += box_problems
    elif image_labels is not None:
        flag_source = _label_file_name(root, image_labels)
        flags, flag_problems = _read_image_labels(root, image_labels, images)
        problems += flag_problems
    elif labels is LabelKind.IMAGE and not labels_from_masks:
        flag_source = _META_FILE
        if _HAS_LESION in meta_columns:
            flags, flag_problems = _meta_flags(meta_rows, meta_lines)
            problems += flag_problems
        elif not meta_problems:
            detail = f"columns: {', '.join(meta_columns)}" if meta_columns else "file does not exist"
            problems.append(
                f"{_META_FILE}: labels='image' needs an image-label file (name,has_lesion), "
                f"a '{_HAS_LESION}' column in {_META_FILE} ({detail}), or labels derived from the masks"
            )
    if problems:
        raise DatasetError(problems, where=where_ctx)

    names = sorted(images)
    if where:
        names = _filter_where(root, names, meta_columns, meta_rows, where)
    if limit is not None:
        names = names[:limit]
    if sample is not None:
        strata = flags
        if not flag_source and _HAS_LESION in meta_columns:
            # Pixel and box sites may still say in meta.csv which images hold a lesion.
            strata, _ = _meta_flags(meta_rows, meta_lines)
        names = sample_names(names, sample, sample_seed, strata)

    group_column = _resolve_group_column(root, group_by, meta_columns)
    groups = None
    if group_column is not None:
        groups = _group_values(names, meta_rows, group_column, where_ctx)

    image_paths = tuple(images[n] for n in names)
    with_masks = need_masks or (bool(masks) and all(n in masks for n in names))
    mask_paths: tuple[Path | None, ...] = (
        tuple(masks[n] for n in names) if with_masks else (None,) * len(names)
    )

    # Second pass: pixels, plus label checks that need the image or the selection.
    problems, sizes, any_colour = _inspect_all(root, image_paths, mask_paths)
    index_boxes = None
    if boxes is not None:
        problems += _boxes_outside(root, _label_file_name(root, boxes), names, image_paths, sizes, box_rows)
        index_boxes = tuple(tuple(box for _, box in box_rows.get(n, ())) for n in names)
    index_flags = None
    if flag_source:
        problems += [
            f"{_rel(root, images[n])}: no {_HAS_LESION} value in {flag_source}"
            for n in names
            if n not in flags
        ]
        index_flags = tuple(flags.get(n, False) for n in names)
    if problems:
        raise DatasetError(problems, where=where_ctx)
    valid_sizes = {s for s in sizes if s is not None}
    native = None
    if len(valid_sizes) == 1:
        w, h = next(iter(valid_sizes))
        native = (h, w)

    return SiteIndex(
        root=root,
        names=tuple(names),
        image_paths=image_paths,
        mask_paths=mask_paths,
        channels=3 if any_colour else 1,
        native_size=native,
        groups=groups,
        group_column=group_column,
        label_kind=labels,
        boxes=index_boxes,
        has_lesion=index_flags,
        labels_from_masks=labels_from_masks,
        label_file=boxes if boxes is not None else image_labels,
    )


def sample_names(
    names: Sequence[str], n: int, seed: int, has_lesion: Mapping[str, bool] | None = None
) -> list[str]:
    """A seeded random subset of ``n`` names, stratified by ``has_lesion`` where known.

    Names with a known flag are drawn from their stratum (lesion, no lesion) in
    proportion to its share of ``names``, by largest remainder; names without one
    form a third stratum. So a subset of BUSI keeps its benign, malignant and normal
    mix, where the first ``n`` sorted names would all be benign.

    Args:
        names: Names to draw from.
        n: How many to keep; all of them if ``n >= len(names)``.
        seed: Seed of ``np.random.default_rng``; the same arguments give the same subset.
        has_lesion: Name to flag, for the names where it is known.

    Returns:
        The chosen names, sorted.
    """
    flags = has_lesion or {}
    strata: dict[bool | None, list[str]] = {}
    for name in sorted(names):
        strata.setdefault(flags.get(name), []).append(name)
    if n >= len(names):
        return sorted(names)
    keys = sorted(strata, key=lambda k: (k is None, k))
    share = np.array([len(strata[k]) for k in keys], dtype=np.float64) * n / len(names)
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[: n - int(counts.sum())]] += 1
    rng = np.random.default_rng(seed)
    chosen = [name for k, c in zip(keys, counts) for name in rng.choice(strata[k], size=int(c), replace=False).tolist()]
    return sorted(chosen)


def _check_label_options(
    labels: LabelKind, boxes: Path | None, image_labels: Path | None, from_masks: bool
) -> None:
    """Reject label sources that contradict ``labels`` or each other."""
    problems: list[str] = []
    if boxes is not None and labels is not LabelKind.BOX:
        problems.append(f"a box file ({boxes}) is only read with labels='box', not {labels.value!r}")
    if image_labels is not None and labels is not LabelKind.IMAGE:
        problems.append(
            f"an image-label file ({image_labels}) is only read with labels='image', not {labels.value!r}"
        )
    if from_masks and labels not in (LabelKind.BOX, LabelKind.IMAGE):
        problems.append(
            f"labels_from_masks derives box or image labels; it does not apply to labels={labels.value!r}"
        )
    if labels is LabelKind.BOX and (boxes is None) == (not from_masks):
        problems.append(
            "labels='box' needs exactly one source: a box file (name,x0,y0,x1,y1) "
            "or boxes derived from the masks"
            + (", not both" if from_masks else "")
        )
    if labels is LabelKind.IMAGE and image_labels is not None and from_masks:
        problems.append(
            "labels='image' needs at most one source: an image-label file or labels "
            "derived from the masks, not both"
        )
    if problems:
        raise DatasetError(problems)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _list_files(root: Path, sub: str, suffixes: frozenset[str]) -> tuple[dict[str, Path], list[str]]:
    """Map stem -> file for ``root/sub``, reporting stems used twice."""
    folder = root / sub
    found: dict[str, Path] = {}
    problems: list[str] = []
    if not folder.is_dir():
        raise DatasetError(f"no images in {folder} (folder does not exist)")
    for path in sorted(folder.iterdir()):
        # Hidden files (.DS_Store, editor swap files) and unrelated files are
        # common in hand-made exports and are not data.
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            problems.append(
                f"{_rel(root, path)} and {_rel(root, found[path.stem])} share the name {path.stem!r}"
            )
            continue
        found[path.stem] = path
    return found, problems


def _read_meta(
    root: Path, images: Mapping[str, Path]
) -> tuple[tuple[str, ...], dict[str, dict[str, str]], dict[str, int], list[str]]:
    """Read ``meta.csv`` if present: (columns, name -> row, name -> line number, problems)."""
    path = root / _META_FILE
    if not path.is_file():
        return (), {}, {}, []
    problems: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    try:
        # utf-8-sig: spreadsheet exports often prepend a BOM to the header.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = tuple(reader.fieldnames or ())
            if "name" not in columns:
                return columns, {}, {}, [f"{_META_FILE}: no 'name' column (columns: {', '.join(columns)})"]
            for row in reader:
                line = reader.line_num
                name = (row.get("name") or "").strip()
                if not name:
                    problems.append(f"{_META_FILE} line {line}: empty name")
                elif name not in images:
                    problems.append(
                        f"{_META_FILE} line {line}: name {name!r} has no image images/{name}.*"
                    )
                elif name in rows:
                    problems.append(
                        f"{_META_FILE} line {line}: name {name!r} repeats line {first_line[name]}"
                    )
                else:
                    rows[name] = {k: (v or "").strip() for k, v in row.items() if k is not None}
                    first_line[name] = line
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return (), {}, {}, [f"{_META_FILE}: cannot be read ({exc})"]
    return columns, rows, first_line, problems


def _label_file_name(root: Path, path: Path) -> str:
    """How a label file is named in messages: relative to the site if inside it."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _read_label_csv(
    root: Path, path: Path, columns: tuple[str, ...]
) -> tuple[list[tuple[int, list[str]]], list[str]]:
    """Read a label CSV whose header must be exactly ``columns``.

    Returns:
        ``(rows, problems)``: rows as (1-based line number, stripped cells) with
        the right column count; blank lines are skipped. Problems name the file
        and line.
    """
    label = _label_file_name(root, path)
    header = ",".join(columns)
    rows: list[tuple[int, list[str]]] = []
    problems: list[str] = []
    try:
        # utf-8-sig: spreadsheet exports often prepend a BOM to the header.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            seen_header = False
            for raw in reader:
                line = reader.line_num
                cells = [c.strip() for c in raw]
                if not any(cells):
                    continue
                if not seen_header:
                    seen_header = True
                    if tuple(cells) != columns:
                        problems.append(
                            f"{label} line {line}: expected the header {header!r}, got {','.join(cells)!r}"
                        )
                    continue
                if len(cells) != len(columns):
                    problems.append(
                        f"{label} line {line}: {len(cells)} column(s), expected {len(columns)} ({header})"
                    )
                    continue
                rows.append((line, cells))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [], [f"{label}: cannot be read ({exc})"]
    if not seen_header:
        problems.append(f"{label}: empty file; expected the header {header!r}")
    return rows, problems


def _unknown_name(label: str, line: int, name: str, images: Mapping[str, Path]) -> str:
    if not name:
        return f"{label} line {line}: empty name"
    hint = ""
    stem = Path(name).stem
    if stem != name and stem in images:
        hint = f" (names are file stems: use {stem!r})"
    return f"{label} line {line}: name {name!r} has no image images/{name}.*{hint}"


def _read_boxes(
    root: Path, path: Path, images: Mapping[str, Path]
) -> tuple[dict[str, list[tuple[int, Box]]], list[str]]:
    """Parse a box file: (name -> [(line, box)], problems). Bounds are checked later."""
    label = _label_file_name(root, path)
    rows, problems = _read_label_csv(root, path, _BOX_COLUMNS)
    boxes: dict[str, list[tuple[int, Box]]] = {}
    for line, (name, *coords) in rows:
        row_problems = []
        if name not in images:
            row_problems.append(_unknown_name(label, line, name, images))
        bad = [f"{col} {val!r}" for col, val in zip(_BOX_COLUMNS[1:], coords) if not _INT.fullmatch(val)]
        if bad:
            row_problems.append(f"{label} line {line}: {', '.join(bad)} not an integer")
        else:
            x0, y0, x1, y1 = (int(v) for v in coords)
            if x1 <= x0 or y1 <= y0:
                row_problems.append(
                    f"{label} line {line}: box ({x0}, {y0}, {x1}, {y1}) is empty "
                    "(needs x1 > x0 and y1 > y0; x1 and y1 are exclusive)"
                )
            elif not row_problems:
                boxes.setdefault(name, []).append((line, (x0, y0, x1, y1)))
        problems += row_problems
    return boxes, problems


def _parse_flag(value: str) -> bool | None:
    return {"0": False, "1": True}.get(value)


def _read_image_labels(
    root: Path, path: Path, images: Mapping[str, Path]
) -> tuple[dict[str, bool], list[str]]:
    """Parse an image-label file: (name -> has_lesion, problems)."""
    label = _label_file_name(root, path)
    rows, problems = _read_label_csv(root, path, _IMAGE_LABEL_COLUMNS)
    flags: dict[str, bool] = {}
    first_line: dict[str, int] = {}
    for line, (name, value) in rows:
        if name not in images:
            problems.append(_unknown_name(label, line, name, images))
        elif name in first_line:
            problems.append(f"{label} line {line}: name {name!r} repeats line {first_line[name]}")
        else:
            first_line[name] = line
        flag = _parse_flag(value)
        if flag is None:
            problems.append(f"{label} line {line}: {_HAS_LESION} {value!r} is not 0 or 1")
        elif first_line.get(name) == line:
            flags[name] = flag
    return flags, problems


def _meta_flags(
    rows: Mapping[str, Mapping[str, str]], lines: Mapping[str, int]
) -> tuple[dict[str, bool], list[str]]:
    """The ``has_lesion`` column of meta.csv: (name -> flag, problems)."""
    flags: dict[str, bool] = {}
    problems: list[str] = []
    for name, row in rows.items():
        value = row.get(_HAS_LESION, "")
        flag = _parse_flag(value)
        if flag is None:
            problems.append(f"{_META_FILE} line {lines[name]}: {_HAS_LESION} {value!r} is not 0 or 1")
        else:
            flags[name] = flag
    return flags, problems  # rows keep file order, so problems are in line order


def _boxes_outside(
    root: Path,
    label: str,
    names: Sequence[str],
    image_paths: Sequence[Path],
    sizes: Sequence[tuple[int, int] | None],
    boxes: Mapping[str, Sequence[tuple[int, Box]]],
) -> list[str]:
    """Problems for boxes of the selected images that leave their image."""
    found: list[tuple[int, str]] = []
    for name, path, size in zip(names, image_paths, sizes):
        if size is None:  # unreadable image, already reported
            continue
        w, h = size
        for line, (x0, y0, x1, y1) in boxes.get(name, ()):
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                found.append(
                    (line, f"{label} line {line}: box ({x0}, {y0}, {x1}, {y1}) lies outside "
                     f"{_rel(root, path)} ({w}x{h})")
                )
    return [p for _, p in sorted(found)]


def _filter_where(
    root: Path,
    names: list[str],
    columns: Sequence[str],
    rows: Mapping[str, Mapping[str, str]],
    where: Mapping[str, str],
) -> list[str]:
    if not columns:
        raise DatasetError(f"where={dict(where)!r} needs {root / _META_FILE}, which does not exist")
    unknown = [c for c in where if c not in columns]
    if unknown:
        raise DatasetError(
            f"{_META_FILE}: unknown column(s) {', '.join(map(repr, unknown))} in where "
            f"(columns: {', '.join(columns)})",
            where=str(root),
        )
    kept = [
        n
        for n in names
        if n in rows and all(rows[n][c].startswith(str(p)) for c, p in where.items())
    ]
    if not kept:
        raise DatasetError(
            f"{_META_FILE}: no row matches where={dict(where)!r}", where=str(root)
        )
    return kept


def _resolve_group_column(root: Path, group_by: str | None, columns: Sequence[str]) -> str | None:
    if group_by is None:
        return None
    if group_by == "auto":
        return next((c for c in AUTO_GROUP_COLUMNS if c in columns), None)
    if group_by not in columns:
        detail = f"columns: {', '.join(columns)}" if columns else "file does not exist"
        raise DatasetError(
            f"{_META_FILE}: group_by column {group_by!r} not found ({detail})", where=str(root)
        )
    return group_by


def _group_values(
    names: Sequence[str], rows: Mapping[str, Mapping[str, str]], column: str, where: str
) -> tuple[str, ...]:
    missing = [n for n in names if not rows.get(n, {}).get(column)]
    if missing:
        raise DatasetError(
            [f"images/{n}.*: no {column!r} value in {_META_FILE}" for n in missing], where=where
        )
    return tuple(rows[n][column] for n in names)


class _Unreadable(Exception):
    """Internal: a file could not be decoded; the message is the reason."""


def _open_loaded(path: Path) -> Image.Image:
    """Open and fully decode ``path``; truncated files only fail on load()."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    # PIL's decoders raise many exception types for malformed files (OSError,
    # SyntaxError, struct.error, ValueError, DecompressionBombError, ...), and
    # one bad file must not hide the others, so all are reported uniformly.
    except Exception as exc:  # noqa: BLE001
        reason = str(exc) or type(exc).__name__
        raise _Unreadable(reason) from exc


def _is_colour(img: Image.Image) -> bool:
    if img.mode in ("P", "PA"):
        rgb = np.asarray(img.convert("RGB"))
        return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))
    return img.mode not in _GREY_MODES


def _mask_plane(img: Image.Image) -> np.ndarray:
    """Return a mask's values as a 2-D array (H, W).

    Raises:
        _Unreadable: If a multi-channel mask has differing colour channels.
    """
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr.astype(np.uint8) if arr.dtype == np.bool_ else arr
    # Grey masks are sometimes saved as RGB(A); accept them only when the
    # colour channels agree, since otherwise "foreground" is ambiguous.
    colour = arr[..., :-1] if img.mode in _ALPHA_MODES else arr  # (H, W, C)
    if not all(np.array_equal(colour[..., 0], colour[..., k]) for k in range(1, colour.shape[-1])):
        raise _Unreadable(f"colour mask (mode {img.mode}) with differing channels; expected one channel")
    return colour[..., 0]


def _distinct_values(plane: np.ndarray) -> np.ndarray:
    if plane.dtype == np.uint8:
        # bincount is several times faster than np.unique on uint8 images.
        return np.flatnonzero(np.bincount(plane.ravel(), minlength=256))
    return np.unique(plane)


def _inspect_pair(
    root: Path, image_path: Path, mask_path: Path | None
) -> tuple[list[str], tuple[int, int] | None, bool]:
    """Decode one image and its mask: (problems, image (W, H) or None, is colour)."""
    problems: list[str] = []
    image_rel = _rel(root, image_path)
    image_size = None
    colour = False
    try:
        img = _open_loaded(image_path)
        image_size = img.size
        colour = _is_colour(img)
    except _Unreadable as exc:
        problems.append(f"{image_rel}: cannot be read ({exc})")
    if mask_path is None:
        return problems, image_size, colour
    mask_rel = _rel(root, mask_path)
    try:
        mask = _open_loaded(mask_path)
        plane = _mask_plane(mask)
    except _Unreadable as exc:
        problems.append(f"{mask_rel}: cannot be read ({exc})")
        return problems, image_size, colour
    if image_size is not None and mask.size != image_size:
        problems.append(
            f"{mask_rel}: size {mask.size[0]}x{mask.size[1]} differs from its image "
            f"{image_rel} ({image_size[0]}x{image_size[1]})"
        )
    values = _distinct_values(plane)
    value_set = set(values.tolist())
    if not (value_set <= {0, 255} or value_set <= {0, 1}):
        shown = ", ".join(str(v) for v in values[:_MAX_VALUES_SHOWN].tolist())
        more = " ..." if values.size > _MAX_VALUES_SHOWN else ""
        problems.append(f"{mask_rel}: not binary (values {shown}{more}; expected only 0/255 or 0/1)")
    return problems, image_size, colour


def _inspect_all(
    root: Path, image_paths: Sequence[Path], mask_paths: Sequence[Path | None]
) -> tuple[list[str], list[tuple[int, int] | None], bool]:
    """Decode every file: (problems, image (W, H) or None per image, any colour)."""
    problems: list[str] = []
    sizes: list[tuple[int, int] | None] = []
    any_colour = False
    # PIL releases the GIL while decoding, so threads overlap the decode cost;
    # map() keeps results in name order, so the report stays deterministic.
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        for found, size, colour in pool.map(partial(_inspect_pair, root), image_paths, mask_paths):
            problems += found
            sizes.append(size)
            any_colour = any_colour or colour
    return problems, sizes, any_colour


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert ``img`` to 8-bit ``"L"`` or ``"RGB"``."""
    if img.mode in _DEEP_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max(initial=0.0))
        # Scale by the container's range rather than per image, so intensities
        # stay comparable across a site; float images in [0, 1] are common too.
        peak = 1.0 if (img.mode == "F" and top <= 1.0) else (65535.0 if top > 255.0 else 255.0)
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8))
    if img.mode == mode:
        return img
    if img.mode not in ("L", "RGB"):
        # Not every mode converts directly to "L" (e.g. CMYK); RGB is the hub.
        img = img.convert("RGB")
    return img.convert(mode) if img.mode != mode else img


def _load_pair(
    root: Path, size: int, mode: str, with_mask: bool, image_path: Path, mask_path: Path | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Load one resized pair: image (C, size, size) uint8, mask (1, size, size) {0,1} or None."""
    try:
        img = _to_mode(_open_loaded(image_path), mode)
    except _Unreadable as exc:
        raise DatasetError(f"{_rel(root, image_path)}: cannot be read ({exc})", where=str(root)) from exc
    arr = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))  # (H, W) or (H, W, 3)
    image = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)
    if not with_mask or mask_path is None:
        return image, None
    return image, _resize_mask(_read_mask(root, mask_path), size)[None]  # (1, H, W)


def _read_mask(root: Path, mask_path: Path) -> np.ndarray:
    """A mask at its native size, binarised: (H, W) bool."""
    try:
        plane = _mask_plane(_open_loaded(mask_path))
    except _Unreadable as exc:
        raise DatasetError(f"{_rel(root, mask_path)}: cannot be read ({exc})", where=str(root)) from exc
    return plane > 0


def _resize_mask(binary: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) bool mask to (size, size) uint8 {0, 1}."""
    # Binarised before resizing so that {0,1} and {0,255} masks behave alike.
    img = Image.fromarray(binary.astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.Resampling.NEAREST))


def load_arrays(
    index: SiteIndex, size: int, channels: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Load every indexed image (and mask) at a fixed square size.

    Images are resized with bilinear filtering, masks with nearest neighbour so
    that no intermediate labels appear; masks are then binarised.

    Args:
        index: Result of :func:`index_site`.
        size: Output height and width in pixels.
        channels: 1 or 3 to force grey or RGB output; ``None`` uses
            ``index.channels``. Grey images are replicated to RGB, colour images
            are reduced to luma.

    Which masks come back (``index.has_masks``):

    * ``PIXEL``: the masks, which are the training targets.
    * ``BOX``/``IMAGE`` with ``labels_from_masks``: the masks, **for scoring
      only**; the training targets are :func:`load_weak_labels`.
    * ``BOX``/``IMAGE`` from a file: the masks if ``masks/`` held one for every
      indexed image, **for scoring only**; else ``None``.
    * ``NONE``: the masks if ``masks/`` held one for every indexed image,
      **for scoring only**; else ``None``.

    Returns:
        ``(images, masks)``: images ``(N, C, size, size)`` uint8 in [0, 255];
        masks ``(N, 1, size, size)`` uint8 in {0, 1}, or ``None`` when the
        index has no masks (see above).

    Raises:
        ValueError: If ``size`` < 1 or ``channels`` is not 1, 3 or None.
        DatasetError: If a file became unreadable since indexing.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    c = index.channels if channels is None else channels
    if c not in (1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    mode = "RGB" if c == 3 else "L"
    n = len(index.names)
    with_masks = index.has_masks
    images = np.empty((n, c, size, size), dtype=np.uint8)  # (N, C, H, W)
    masks = np.empty((n, 1, size, size), dtype=np.uint8) if with_masks else None  # (N, 1, H, W)

    load = partial(_load_pair, index.root, size, mode, with_masks)
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        for i, (image, mask) in enumerate(pool.map(load, index.image_paths, index.mask_paths)):
            images[i] = image
            if masks is not None:
                masks[i] = mask
    return images, masks


def _scale_box(box: Box, width: int, height: int, size: int) -> Box:
    """Rescale a box from a ``width`` x ``height`` image to ``size`` x ``size``.

    Rounds outward (start down, end up, in exact integer arithmetic), so the
    result covers the box's whole footprint and a non-empty box never becomes
    empty.
    """
    x0, y0, x1, y1 = box
    return (
        max(0, x0 * size // width),
        max(0, y0 * size // height),
        min(size, -(-x1 * size // width)),
        min(size, -(-y1 * size // height)),
    )


def _tight_box(binary: np.ndarray) -> Box | None:
    """The smallest box ``(x0, y0, x1, y1)``, ends exclusive, around a mask's foreground."""
    cols = np.flatnonzero(binary.any(axis=0))
    rows = np.flatnonzero(binary.any(axis=1))
    if cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _image_size(root: Path, index: SiteIndex, i: int) -> tuple[int, int]:
    """(W, H) of image ``i``, from the index or the file header (no decode)."""
    if index.native_size is not None:
        h, w = index.native_size
        return w, h
    path = index.image_paths[i]
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"{_rel(root, path)}: cannot be read ({exc})", where=str(root)) from exc


def _boxes_to_mask(boxes: Sequence[Box], width: int, height: int, size: int) -> np.ndarray:
    """Union of ``boxes`` (coordinates of a ``width`` x ``height`` image) at size x size: uint8 {0,1}."""
    out = np.zeros((size, size), dtype=np.uint8)
    for box in boxes:
        x0, y0, x1, y1 = _scale_box(box, width, height, size)
        out[y0:y1, x0:x1] = 1
    return out


def _box_from_mask(root: Path, size: int, mask_path: Path) -> np.ndarray:
    """Tight box of the resized, binarised mask as a (size, size) uint8 {0,1} mask.

    A lesion too small to survive the nearest-neighbour resize falls back to its
    native tight box rescaled outward, so that an image with a lesion never
    ends up without a box.
    """
    native = _read_mask(root, mask_path)
    resized = _resize_mask(native, size)
    out = np.zeros((size, size), dtype=np.uint8)
    box = _tight_box(resized)
    if box is None:
        native_box = _tight_box(native)
        if native_box is None:
            return out
        h, w = native.shape
        box = _scale_box(native_box, w, h, size)
    x0, y0, x1, y1 = box
    out[y0:y1, x0:x1] = 1
    return out


def _mask_nonempty(root: Path, mask_path: Path) -> bool:
    return bool(_read_mask(root, mask_path).any())


def load_weak_labels(index: SiteIndex, size: int) -> dict[str, np.ndarray]:
    """Load the weak training targets of a ``BOX`` or ``IMAGE`` site.

    These, not the masks of :func:`load_arrays`, are what a weak site trains on.

    * ``BOX`` from a file: the union of each image's boxes, rescaled from its
      image's ``W`` x ``H`` to ``size`` x ``size`` (x by size/W, y by size/H),
      rounded outward so that a box never shrinks to nothing. An image without
      boxes gets an empty mask.
    * ``BOX`` with ``labels_from_masks``: the tight box (one box around all
      foreground, as FedMix does) of the resized, binarised mask, in the same
      representation. A lesion lost by the resize falls back to its native
      tight box rescaled outward.
    * ``IMAGE``: the has-lesion flag per image, from the file or meta.csv, or
      "the mask (at native size) is not empty" with ``labels_from_masks``.

    No random margin is added to boxes here: FedMix enlarges each side of the
    tight box by a random margin drawn afresh per round (and per augmented
    sample), so the trainer draws it, not the loader.

    Args:
        index: Result of :func:`index_site` with ``label_kind`` ``BOX`` or
            ``IMAGE``.
        size: Output height and width in pixels, as given to :func:`load_arrays`.

    Returns:
        ``{"box_masks": (N, 1, size, size) uint8 in {0, 1}}`` for ``BOX``, or
        ``{"has_lesion": (N,) bool}`` for ``IMAGE``, rows in ``index.names``
        order.

    Raises:
        ValueError: If ``size`` < 1.
        DatasetError: If the index has pixel labels or none, or a file became
            unreadable since indexing.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    root = index.root
    kind = index.label_kind
    n = len(index.names)
    if kind is LabelKind.BOX:
        box_masks = np.zeros((n, 1, size, size), dtype=np.uint8)  # (N, 1, H, W)
        if index.labels_from_masks:
            with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
                loaded = pool.map(partial(_box_from_mask, root, size), index.mask_paths)
                for i, mask in enumerate(loaded):
                    box_masks[i, 0] = mask
        else:
            assert index.boxes is not None  # guaranteed by SiteIndex
            for i, image_boxes in enumerate(index.boxes):
                if image_boxes:
                    box_masks[i, 0] = _boxes_to_mask(image_boxes, *_image_size(root, index, i), size)
        return {"box_masks": box_masks}
    if kind is LabelKind.IMAGE:
        if index.labels_from_masks:
            with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
                flags = list(pool.map(partial(_mask_nonempty, root), index.mask_paths))
        else:
            assert index.has_lesion is not None  # guaranteed by SiteIndex
            flags = list(index.has_lesion)
        return {"has_lesion": np.asarray(flags, dtype=bool).reshape(n)}
    raise DatasetError(
        f"labels={kind.value!r} has no weak labels; use load_arrays for pixel labels",
        where=str(root),
    )


# --------------------------------------------------------------------------- #
# Splitting and summaries
# --------------------------------------------------------------------------- #


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or not np.all(np.isfinite(f)) or np.any(f <= 0) or not math.isclose(
        float(f.sum()), 1.0, abs_tol=1e-6
    ):
        raise ValueError(
            f"fractions must be three positive numbers summing to 1, got {tuple(fractions)}"
        )
    return f


def _split_counts(n: int, fractions: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of ``n * fractions``, with every count >= 1."""
    raw = fractions * n
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - int(counts.sum())]] += 1
    while np.any(counts == 0):
        counts[int(np.argmax(counts))] -= 1
        counts[int(np.argmin(counts))] += 1
    return counts


def make_splits(
    index: SiteIndex, seed: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)
) -> Splits:
    """Split a site into train/val/test, deterministically for ``seed``.

    Without groups, images are permuted with ``np.random.default_rng(seed)``
    and cut by ``fractions``. With ``index.groups``, whole groups are shuffled
    with that generator and each goes to the split furthest below its target
    count, so near-duplicates never straddle splits; the resulting fractions
    are then only approximate.

    Args:
        index: Result of :func:`index_site`.
        seed: Seed for the split; same seed and index give the same splits.
        fractions: Target ``(train, val, test)`` fractions, positive, sum 1.

    Returns:
        Disjoint, sorted int64 index arrays covering ``range(len(index))``,
        each non-empty.

    Raises:
        DatasetError: If the site has fewer than 3 images, or fewer than 3
            groups when grouped.
        ValueError: If ``fractions`` is invalid.
    """
    f = _check_fractions(fractions)
    n = len(index.names)
    if n < 3:
        raise DatasetError(
            f"{n} image(s): at least 3 are needed for train/val/test splits", where=str(index.root)
        )
    rng = np.random.default_rng(seed)

    if index.groups is None:
        perm = rng.permutation(n)
        c_train, c_val, _ = _split_counts(n, f)
        parts = (perm[:c_train], perm[c_train : c_train + c_val], perm[c_train + c_val :])
        return Splits(*(np.sort(p).astype(np.int64) for p in parts))

    # np.unique sorts the keys, so the shuffle does not depend on file order.
    keys, inverse = np.unique(np.asarray(index.groups), return_inverse=True)
    if keys.size < 3:
        raise DatasetError(
            f"group column {index.group_column!r} has {keys.size} group(s): at least 3 are "
            "needed for train/val/test splits (group_by=None, --group-by none on the CLI, for a random split)",
            where=str(index.root),
        )
    sizes = np.bincount(inverse)  # (n_groups,)
    targets = f * n
    filled = np.zeros(3)
    members: list[list[int]] = [[], [], []]
    for g in rng.permutation(keys.size).tolist():
        k = int(np.argmax(targets - filled))
        members[k].append(g)
        filled[k] += sizes[g]
    # A few large groups can starve a split; move the smallest group from the
    # split holding the most groups, which disturbs the fractions least.
    for k in range(3):
        if not members[k]:
            donor = max(range(3), key=lambda j: len(members[j]))
            g = min(members[donor], key=lambda j: sizes[j])
            members[donor].remove(g)
            members[k].append(g)
    assign = np.empty(keys.size, dtype=np.int64)
    for k, groups in enumerate(members):
        assign[groups] = k
    per_image = assign[inverse]  # (N,)
    return Splits(*(np.flatnonzero(per_image == k).astype(np.int64) for k in range(3)))


def describe(index: SiteIndex, splits: Splits) -> dict[str, Any]:
    """Summarise a site for logs and the coordinator, without any pixel data.

    Args:
        index: Result of :func:`index_site`.
        splits: Result of :func:`make_splits` for that index.

    For ``labels_from_masks`` the counts come from decoding the masks at
    their native size, so this reads files; otherwise it reads none.

    Returns:
        A JSON-serialisable dict with keys ``n_images``, ``n_train``, ``n_val``,
        ``n_test``, ``label_kind``, ``channels``, ``native_size`` (``[H, W]`` or
        ``None``), ``group_column``, ``n_groups`` (``None`` without groups),
        ``weak_label_source`` (``"file"``, ``"meta"`` or ``"masks"`` for
        ``BOX``/``IMAGE``, else ``None``), ``n_boxes`` (``BOX`` only: boxes in
        total; one per image with a lesion when derived from masks) and
        ``n_positive`` (``BOX``/``IMAGE``: images with a lesion, i.e. with at
        least one box or a positive flag). Keys that do not apply are ``None``.

    Raises:
        DatasetError: If a mask became unreadable (``labels_from_masks`` only).
    """
    source, n_boxes, n_positive = _weak_summary(index)
    return {
        "n_images": len(index.names),
        "n_train": int(splits.train.size),
        "n_val": int(splits.val.size),
        "n_test": int(splits.test.size),
        "label_kind": index.label_kind.value,
        "channels": int(index.channels),
        "native_size": list(index.native_size) if index.native_size is not None else None,
        "group_column": index.group_column,
        "n_groups": len(set(index.groups)) if index.groups is not None else None,
        "weak_label_source": source,
        "n_boxes": n_boxes,
        "n_positive": n_positive,
    }


def _weak_summary(index: SiteIndex) -> tuple[str | None, int | None, int | None]:
    """(weak_label_source, n_boxes, n_positive) for :func:`describe`."""
    source = index.weak_label_source
    if source is None:
        return None, None, None
    if index.labels_from_masks:
        with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
            positive = sum(pool.map(partial(_mask_nonempty, index.root), index.mask_paths))
        return source, (positive if index.label_kind is LabelKind.BOX else None), positive
    if index.boxes is not None:
        return source, sum(len(b) for b in index.boxes), sum(bool(b) for b in index.boxes)
    assert index.has_lesion is not None  # guaranteed by SiteIndex
    return source, None, sum(index.has_lesion)
