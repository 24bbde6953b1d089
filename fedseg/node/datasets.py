"""Index, validate, load and split one site's segmentation data.

A site folder has the layout::

    <root>/images/NAME.ext   image (.png, .jpg, .jpeg, .bmp, .tif, .tiff)
    <root>/masks/NAME.png    binary mask, same NAME stem and size as its image
    <root>/meta.csv          optional, one row per NAME (column ``name``)

:func:`index_site` checks the whole folder before anything is served and
raises one :class:`~fedseg.node.errors.DatasetError` that lists every
offender. :func:`load_arrays` turns an index into fixed-size uint8 arrays,
:func:`make_splits` makes seeded, group-aware train/val/test splits and
:func:`describe` summarises a site without revealing any pixel.

This module imports only numpy, PIL and the standard library so that the node
CLI and the datasite can import it without paying for torch.
"""

from __future__ import annotations

import csv
import math
import os
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
    "make_splits",
]

#: Image file suffixes recognised in ``images/`` (compared case-insensitively).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

#: meta.csv columns that ``group_by="auto"`` uses, in order of preference.
#: Both mark near-duplicates (consecutive video frames in CVC-ClinicDB, two
#: views of one patient in BUS-BRA) that must not straddle train and test.
AUTO_GROUP_COLUMNS = ("sequence", "patient_case")

_MASK_SUFFIX = ".png"
_META_FILE = "meta.csv"
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

    Only ``PIXEL`` (masks) and ``NONE`` (images only) are implemented; box and
    image-level labels are planned and rejected by :func:`index_site` for now.
    """

    PIXEL = "pixel"
    BOX = "box"
    IMAGE = "image"
    NONE = "none"


@dataclass(frozen=True)
class SiteIndex:
    """Validated, deterministic listing of one site's images and masks.

    Attributes:
        root: Site folder.
        names: Image stems, sorted.
        image_paths: Image file per name.
        mask_paths: Mask file per name, ``None`` for every entry when
            ``label_kind`` is ``NONE``.
        channels: The site's mode: 3 if any image is in colour, else 1.
        native_size: ``(H, W)`` shared by every image, or ``None`` if sizes vary.
        groups: Group key per name (from ``group_column``), or ``None`` for
            purely random splits.
        group_column: meta.csv column the groups come from, or ``None``.
        label_kind: Annotation kind the index was validated for.
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
) -> SiteIndex:
    """Index and validate a site folder.

    Checks are run in two passes. The structural pass covers the whole folder
    and only lists files: image/mask pairing, orphan masks, duplicate stems and
    meta.csv consistency. The pixel pass opens and fully decodes every selected
    image and mask (after ``where`` and ``limit``), so that a benchmark subset of
    a large site stays fast; it checks readability, mask size and binarity.
    Every offender of a pass is collected and reported in one error.

    Args:
        root: Site folder containing ``images/``, ``masks/`` (for pixel labels)
            and optionally ``meta.csv``.
        labels: Annotation kind to validate. ``NONE`` ignores ``masks/``.
        limit: Keep only the first ``limit`` images in sorted-name order, after
            ``where`` filtering. ``None`` keeps all.
        group_by: meta.csv column whose values keep related images in the same
            split. ``"auto"`` picks the first of :data:`AUTO_GROUP_COLUMNS`
            present in meta.csv, or none; ``None`` means random splits.
        where: Keep only images whose meta.csv value in each given column starts
            with the given prefix, e.g. ``{"device": "GE Logiq 5"}`` matches
            ``"GE Logiq 5 @10-12MHz"``. Images without a meta.csv row never match.

    Returns:
        The validated index.

    Raises:
        DatasetError: If the folder is missing or malformed. The message names
            every offending file (up to ten, then a count).
        ValueError: If ``limit`` is smaller than 1.
        NotImplementedError: For ``LabelKind.BOX`` and ``LabelKind.IMAGE``.
    """
    root = Path(root)
    labels = LabelKind(labels)
    if labels in (LabelKind.BOX, LabelKind.IMAGE):
        raise NotImplementedError(f"labels={labels.value!r} is not supported yet")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if not root.exists():
        raise DatasetError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"data folder {root} is not a directory")

    where_ctx = str(root)
    images, problems = _list_files(root, "images", IMAGE_SUFFIXES)
    if not images and not problems:
        raise DatasetError(
            f"no images in {root / 'images'} (expected {', '.join(sorted(IMAGE_SUFFIXES))})"
        )

    masks: dict[str, Path] = {}
    if labels is LabelKind.PIXEL:
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

    meta_columns, meta_rows, meta_problems = _read_meta(root, images)
    problems += meta_problems
    if problems:
        raise DatasetError(problems, where=where_ctx)

    names = sorted(images)
    if where:
        names = _filter_where(root, names, meta_columns, meta_rows, where)
    if limit is not None:
        names = names[:limit]

    group_column = _resolve_group_column(root, group_by, meta_columns)
    groups = None
    if group_column is not None:
        groups = _group_values(names, meta_rows, group_column, where_ctx)

    image_paths = tuple(images[n] for n in names)
    mask_paths: tuple[Path | None, ...] = (
        tuple(masks[n] for n in names) if labels is LabelKind.PIXEL else (None,) * len(names)
    )
    channels, native_size = _check_pixels(root, image_paths, mask_paths)

    return SiteIndex(
        root=root,
        names=tuple(names),
        image_paths=image_paths,
        mask_paths=mask_paths,
        channels=channels,
        native_size=native_size,
        groups=groups,
        group_column=group_column,
        label_kind=labels,
    )


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
) -> tuple[tuple[str, ...], dict[str, dict[str, str]], list[str]]:
    """Read ``meta.csv`` if present: (columns, name -> row, problems)."""
    path = root / _META_FILE
    if not path.is_file():
        return (), {}, []
    problems: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    try:
        # utf-8-sig: spreadsheet exports often prepend a BOM to the header.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = tuple(reader.fieldnames or ())
            if "name" not in columns:
                return columns, {}, [f"{_META_FILE}: no 'name' column (columns: {', '.join(columns)})"]
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
        return (), {}, [f"{_META_FILE}: cannot be read ({exc})"]
    return columns, rows, problems


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


def _check_pixels(
    root: Path, image_paths: Sequence[Path], mask_paths: Sequence[Path | None]
) -> tuple[int, tuple[int, int] | None]:
    """Decode every file; return (channels, native (H, W) or None) or raise with all offenders."""
    problems: list[str] = []
    sizes: set[tuple[int, int]] = set()
    any_colour = False
    # PIL releases the GIL while decoding, so threads overlap the decode cost;
    # map() keeps results in name order, so the report stays deterministic.
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        for found, size, colour in pool.map(partial(_inspect_pair, root), image_paths, mask_paths):
            problems += found
            if size is not None:
                sizes.add(size)
            any_colour = any_colour or colour
    if problems:
        raise DatasetError(problems, where=str(root))
    native = None
    if len(sizes) == 1:
        w, h = next(iter(sizes))
        native = (h, w)
    return (3 if any_colour else 1), native


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
    try:
        plane = _mask_plane(_open_loaded(mask_path))
    except _Unreadable as exc:
        raise DatasetError(f"{_rel(root, mask_path)}: cannot be read ({exc})", where=str(root)) from exc
    # Binarise before resizing so that {0,1} and {0,255} masks behave alike.
    binary = Image.fromarray((plane > 0).astype(np.uint8))
    mask = np.asarray(binary.resize((size, size), Image.Resampling.NEAREST))[None]  # (1, H, W)
    return image, mask


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

    Returns:
        ``(images, masks)``: images ``(N, C, size, size)`` uint8 in [0, 255];
        masks ``(N, 1, size, size)`` uint8 in {0, 1}, or ``None`` when
        ``index.label_kind`` is ``NONE``.

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
    with_masks = index.label_kind is LabelKind.PIXEL
    images = np.empty((n, c, size, size), dtype=np.uint8)  # (N, C, H, W)
    masks = np.empty((n, 1, size, size), dtype=np.uint8) if with_masks else None  # (N, 1, H, W)

    load = partial(_load_pair, index.root, size, mode, with_masks)
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        for i, (image, mask) in enumerate(pool.map(load, index.image_paths, index.mask_paths)):
            images[i] = image
            if masks is not None:
                masks[i] = mask
    return images, masks


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
            "needed for train/val/test splits (use group_by=None for a random split)",
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

    Returns:
        A JSON-serialisable dict with keys ``n_images``, ``n_train``, ``n_val``,
        ``n_test``, ``label_kind``, ``channels``, ``native_size`` (``[H, W]`` or
        ``None``), ``group_column`` and ``n_groups`` (``None`` without groups).
    """
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
    }
