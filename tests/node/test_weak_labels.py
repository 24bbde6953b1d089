"""Tests for weak labels in fedseg.node.datasets: box files, image-level labels
and labels derived from masks."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedseg.node.datasets import (
    LabelKind,
    describe,
    index_site,
    load_arrays,
    load_weak_labels,
    make_splits,
)
from fedseg.node.errors import DatasetError
from fedseg.node.synthetic import DEFAULT_SITES, write_site

DATA = Path(__file__).parents[2].parent / "shared" / "data"
N = 12
SIZE = 32
BOX_HEADER = ["name", "x0", "y0", "x1", "y1"]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site", DEFAULT_SITES[0], N, size=SIZE, seed=3)


@pytest.fixture
def names(site: Path) -> list[str]:
    return sorted(p.stem for p in (site / "images").glob("*.png"))


def _write_csv(path: Path, rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def _native_masks(site: Path, names: list[str]) -> np.ndarray:
    """(N, H, W) bool masks read straight from the files."""
    return np.stack([np.asarray(Image.open(site / "masks" / f"{n}.png")) > 0 for n in names])


def _raises(root: Path, **kwargs: object) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        index_site(root, **kwargs)
    return info.value


# --------------------------------------------------------------------------- #
# Boxes from a file
# --------------------------------------------------------------------------- #


def test_box_file_union_at_load_size(site: Path, names: list[str], tmp_path: Path) -> None:
    boxes = _write_csv(
        tmp_path / "boxes.csv",
        [BOX_HEADER, [names[0], 3, 5, 10, 9], [names[0], 20, 20, 32, 32], [names[2], 0, 0, 1, 1]],
    )
    index = index_site(site, LabelKind.BOX, boxes=boxes)
    assert index.boxes is not None and len(index.boxes) == N
    assert index.boxes[0] == ((3, 5, 10, 9), (20, 20, 32, 32))
    assert index.boxes[1] == () and index.boxes[2] == ((0, 0, 1, 1),)
    assert index.has_lesion is None and not index.labels_from_masks
    assert index.label_file == boxes

    full = load_weak_labels(index, SIZE)["box_masks"]
    assert full.shape == (N, 1, SIZE, SIZE) and full.dtype == np.uint8
    expected = np.zeros((SIZE, SIZE), np.uint8)
    expected[5:9, 3:10] = 1
    expected[20:32, 20:32] = 1
    assert np.array_equal(full[0, 0], expected)
    assert not full[1].any() and not full[3:].any()

    # At half size, x by 16/32 and y by 16/32, rounded outward:
    # (3, 5, 10, 9) -> (1, 2, 5, 5); (20, 20, 32, 32) -> (10, 10, 16, 16);
    # the 1-pixel box (0, 0, 1, 1) -> (0, 0, 1, 1) rather than nothing.
    half = load_weak_labels(index, 16)["box_masks"]
    expected = np.zeros((16, 16), np.uint8)
    expected[2:5, 1:5] = 1
    expected[10:16, 10:16] = 1
    assert np.array_equal(half[0, 0], expected)
    assert half[2, 0].sum() == 1 and half[2, 0, 0, 0] == 1
    assert set(np.unique(half).tolist()) <= {0, 1}


def test_box_file_non_square_image_without_masks(site: Path, names: list[str], tmp_path: Path) -> None:
    # Boxes are in the image file's own pixels; sizes differ, so none is shared.
    Image.fromarray(np.full((20, 40, 3), 90, np.uint8)).save(site / "images" / f"{names[0]}.png")
    for path in (site / "masks").iterdir():
        path.unlink()
    (site / "masks").rmdir()
    boxes = _write_csv(tmp_path / "b.csv", [BOX_HEADER, [names[0], 0, 0, 40, 20], [names[1], 10, 5, 11, 6]])
    index = index_site(site, "box", boxes=boxes)
    assert index.native_size is None and not index.has_masks
    box_masks = load_weak_labels(index, 8)["box_masks"]
    assert box_masks[0].all()
    # (10, 5, 11, 6) in a 32x32 image at 8: x 10*8//32=2 .. ceil(11*8/32)=3, same for y.
    assert np.array_equal(np.argwhere(box_masks[1, 0]), [[1, 2]])
    _, masks = load_arrays(index, 8)
    assert masks is None


def test_box_file_scoring_masks_only_when_complete(site: Path, names: list[str], tmp_path: Path) -> None:
    boxes = _write_csv(tmp_path / "boxes.csv", [BOX_HEADER])
    index = index_site(site, "box", boxes=boxes)
    assert index.has_masks
    _, masks = load_arrays(index, SIZE)  # for scoring only
    assert masks is not None and np.array_equal(masks[:, 0], _native_masks(site, names))
    assert not load_weak_labels(index, SIZE)["box_masks"].any()

    (site / "masks" / f"{names[4]}.png").unlink()
    partial_index = index_site(site, "box", boxes=boxes)
    assert not partial_index.has_masks
    assert load_arrays(partial_index, SIZE)[1] is None
    # A subset that still has every mask keeps them.
    assert index_site(site, "box", limit=4, boxes=boxes).has_masks


def test_box_file_inside_site_named_relative(site: Path, names: list[str]) -> None:
    boxes = _write_csv(site / "boxes.csv", [BOX_HEADER, [names[1], 0, 0, 33, 4]])
    err = _raises(site, labels="box", boxes=boxes)
    assert err.problems == (
        f"boxes.csv line 2: box (0, 0, 33, 4) lies outside images/{names[1]}.png ({SIZE}x{SIZE})",
    )


def test_box_file_format_errors_all_reported(site: Path, names: list[str], tmp_path: Path) -> None:
    boxes = _write_csv(
        tmp_path / "boxes.csv",
        [
            BOX_HEADER,                        # line 1
            [names[0], 1, 1, 5, 5],            # line 2: fine
            ["ghost", 1, 1, 5, 5],             # line 3: unknown name
            [names[1], 1, 1, 5],               # line 4: 4 columns
            [names[2], 1, "a", 5, 2.5],        # line 5: non-integers
            [names[3], 10, 5, 10, 40],         # line 6: empty (x1 == x0)
            [names[4], 4, 9, 8, 3],            # line 7: empty (y1 < y0)
            [f"{names[5]}.png", 1, 1, 5, 5],   # line 8: file name instead of stem
        ],
    )
    err = _raises(site, labels="box", boxes=boxes)
    message = str(err)
    assert len(err.problems) == 6
    assert "boxes.csv line 3: name 'ghost' has no image images/ghost.*" in message
    assert "boxes.csv line 4: 4 column(s), expected 5 (name,x0,y0,x1,y1)" in message
    assert "boxes.csv line 5: y0 'a', y1 '2.5' not an integer" in message
    assert "boxes.csv line 6: box (10, 5, 10, 40) is empty" in message
    assert "boxes.csv line 7: box (4, 9, 8, 3) is empty" in message
    assert f"boxes.csv line 8: name '{names[5]}.png' has no image" in message
    assert f"use '{names[5]}'" in message
    assert "line 2" not in message


def test_box_outside_image(site: Path, names: list[str], tmp_path: Path) -> None:
    boxes = _write_csv(
        tmp_path / "boxes.csv",
        [BOX_HEADER, [names[0], 0, 0, 32, 32], [names[1], 10, 5, 300, 40], [names[2], -1, 0, 4, 4]],
    )
    err = _raises(site, labels="box", boxes=boxes)
    # A label file outside the site folder is named by the path as given.
    assert err.problems == (
        f"{boxes} line 3: box (10, 5, 300, 40) lies outside images/{names[1]}.png ({SIZE}x{SIZE})",
        f"{boxes} line 4: box (-1, 0, 4, 4) lies outside images/{names[2]}.png ({SIZE}x{SIZE})",
    )


def test_box_outside_checked_only_for_selected_images(site: Path, names: list[str], tmp_path: Path) -> None:
    boxes = _write_csv(tmp_path / "boxes.csv", [BOX_HEADER, [names[-1], 0, 0, 99, 99]])
    assert len(index_site(site, "box", limit=3, boxes=boxes)) == 3
    assert "line 2" in str(_raises(site, labels="box", boxes=boxes))


def test_box_file_missing_header(site: Path, names: list[str], tmp_path: Path) -> None:
    boxes = _write_csv(tmp_path / "boxes.csv", [[names[0], 1, 1, 5, 5], [names[1], 1, 1, 5]])
    err = _raises(site, labels="box", boxes=boxes)
    assert err.problems[0] == (
        f"{boxes} line 1: expected the header 'name,x0,y0,x1,y1', got '{names[0]},1,1,5,5'"
    )
    assert "line 2: 4 column(s)" in str(err)

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "empty.csv: empty file" in str(_raises(site, labels="box", boxes=empty))


def test_box_file_blank_lines_and_bom(site: Path, names: list[str], tmp_path: Path) -> None:
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(f"\ufeffname, x0, y0, x1, y1\n\n{names[0]}, 1, 2, 3, 4\n\n", encoding="utf-8")
    assert index_site(site, "box", boxes=boxes).boxes[0] == ((1, 2, 3, 4),)


def test_missing_label_file(site: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    assert str(_raises(site, labels="box", boxes=missing)) == f"label file {missing} does not exist"


# --------------------------------------------------------------------------- #
# Boxes from masks
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("size", [SIZE, 16])
def test_boxes_from_masks_are_tight(site: Path, names: list[str], size: int) -> None:
    index = index_site(site, LabelKind.BOX, labels_from_masks=True)
    assert index.labels_from_masks and index.boxes is None and index.has_masks
    _, masks = load_arrays(index, size)  # returned for scoring only
    assert masks is not None and masks.shape == (N, 1, size, size)
    box_masks = load_weak_labels(index, size)["box_masks"]
    assert box_masks.shape == (N, 1, size, size) and box_masks.dtype == np.uint8
    for mask, box in zip(masks[:, 0], box_masks[:, 0]):
        expected = np.zeros_like(mask)
        if mask.any():
            rows, cols = np.nonzero(mask)
            expected[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = 1
        assert np.array_equal(box, expected)
    assert (box_masks >= masks).all()  # a box covers its lesion
    assert 0 < int(box_masks.any(axis=(1, 2, 3)).sum()) < N


def test_boxes_from_masks_keep_tiny_lesion(site: Path, names: list[str]) -> None:
    arr = np.zeros((SIZE, SIZE), np.uint8)
    arr[1, 1] = 255  # lost by a nearest-neighbour resize to 4x4
    Image.fromarray(arr).save(site / "masks" / f"{names[0]}.png")
    index = index_site(site, "box", labels_from_masks=True)
    assert not load_arrays(index, 4)[1][0].any()
    box = load_weak_labels(index, 4)["box_masks"][0, 0]
    assert np.array_equal(np.argwhere(box), [[0, 0]])


def test_boxes_from_masks_need_valid_masks(site: Path, names: list[str]) -> None:
    (site / "masks" / f"{names[2]}.png").unlink()
    err = _raises(site, labels="box", labels_from_masks=True)
    assert f"images/{names[2]}.png has no mask masks/{names[2]}.png" in str(err)


# --------------------------------------------------------------------------- #
# Image-level labels
# --------------------------------------------------------------------------- #


def test_image_labels_file_meta_and_masks_agree(site: Path, names: list[str], tmp_path: Path) -> None:
    truth = _native_masks(site, names).any(axis=(1, 2))
    assert 0 < truth.sum() < N
    labels = _write_csv(
        tmp_path / "labels.csv", [["name", "has_lesion"]] + [[n, int(t)] for n, t in zip(names, truth)]
    )
    from_file = index_site(site, LabelKind.IMAGE, image_labels=labels)
    from_meta = index_site(site, LabelKind.IMAGE)
    from_masks = index_site(site, LabelKind.IMAGE, labels_from_masks=True)
    assert from_file.has_lesion == tuple(bool(t) for t in truth) == from_meta.has_lesion
    assert from_masks.has_lesion is None and from_masks.labels_from_masks
    for index, source in ((from_file, "file"), (from_meta, "meta"), (from_masks, "masks")):
        flags = load_weak_labels(index, 16)["has_lesion"]
        assert flags.shape == (N,) and flags.dtype == np.bool_
        assert np.array_equal(flags, truth)
        assert index.has_masks  # scoring masks: the site has all of them
        summary = describe(index, make_splits(index, seed=0))
        assert summary["weak_label_source"] == source
        assert summary["n_positive"] == int(truth.sum()) and summary["n_boxes"] is None
        assert json.loads(json.dumps(summary)) == summary


def test_image_label_file_errors(site: Path, names: list[str], tmp_path: Path) -> None:
    labels = _write_csv(
        tmp_path / "labels.csv",
        [
            ["name", "has_lesion"],   # line 1
            [names[0], 1],            # line 2
            [names[1], "yes"],        # line 3
            [names[2], 2],            # line 4
            [names[3], ""],           # line 5
            [names[0], 1],            # line 6: repeats line 2
            ["ghost", 0],             # line 7
            [names[4], 0, 1],         # line 8
        ],
    )
    err = _raises(site, labels="image", image_labels=labels)
    message = str(err)
    assert len(err.problems) == 6
    assert "labels.csv line 3: has_lesion 'yes' is not 0 or 1" in message
    assert "labels.csv line 4: has_lesion '2' is not 0 or 1" in message
    assert "labels.csv line 5: has_lesion '' is not 0 or 1" in message
    assert f"labels.csv line 6: name '{names[0]}' repeats line 2" in message
    assert "labels.csv line 7: name 'ghost' has no image" in message
    assert "labels.csv line 8: 3 column(s), expected 2 (name,has_lesion)" in message

    header = _write_csv(tmp_path / "h.csv", [["name", "label"], [names[0], 1]])
    assert "h.csv line 1: expected the header 'name,has_lesion'" in str(
        _raises(site, labels="image", image_labels=header)
    )


def test_image_label_file_must_cover_selected_images(site: Path, names: list[str], tmp_path: Path) -> None:
    labels = _write_csv(tmp_path / "labels.csv", [["name", "has_lesion"]] + [[n, 0] for n in names[:5]])
    assert len(index_site(site, "image", limit=5, image_labels=labels)) == 5
    err = _raises(site, labels="image", image_labels=labels)
    assert len(err.problems) == N - 5
    assert f"images/{names[5]}.png: no has_lesion value in {labels}" in str(err)


def test_image_labels_from_meta_errors(site: Path, names: list[str]) -> None:
    rows = [["name", "has_lesion"]] + [[n, 1] for n in names]
    rows[3][1] = "true"
    del rows[5]  # names[4] has no row
    _write_csv(site / "meta.csv", rows)
    err = _raises(site, labels="image")
    assert err.problems == ("meta.csv line 4: has_lesion 'true' is not 0 or 1",)
    rows[3][1] = 0
    _write_csv(site / "meta.csv", rows)
    assert _raises(site, labels="image").problems == (
        f"images/{names[4]}.png: no has_lesion value in meta.csv",
    )

    _write_csv(site / "meta.csv", [["name", "label"]] + [[n, "x"] for n in names])
    assert "needs an image-label file" in str(_raises(site, labels="image"))
    (site / "meta.csv").unlink()
    assert "file does not exist" in str(_raises(site, labels="image"))
    assert index_site(site, "image", labels_from_masks=True).labels_from_masks


# --------------------------------------------------------------------------- #
# Options, summaries and the dataclass
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"labels": "box"}, "needs exactly one source"),
        ({"labels": "box", "boxes": "b.csv", "labels_from_masks": True}, "not both"),
        ({"labels": "image", "image_labels": "l.csv", "labels_from_masks": True}, "not both"),
        ({"labels": "pixel", "boxes": "b.csv"}, "only read with labels='box'"),
        ({"labels": "box", "image_labels": "l.csv", "labels_from_masks": True}, "only read with labels='image'"),
        ({"labels": "none", "labels_from_masks": True}, "does not apply to labels='none'"),
        ({"labels": "pixel", "labels_from_masks": True}, "does not apply to labels='pixel'"),
    ],
)
def test_contradictory_label_options(site: Path, kwargs: dict[str, object], needle: str) -> None:
    assert needle in str(_raises(site, **kwargs))


def test_load_weak_labels_rejects_pixel_and_none(site: Path) -> None:
    for labels in (LabelKind.PIXEL, LabelKind.NONE):
        with pytest.raises(DatasetError, match="no weak labels"):
            load_weak_labels(index_site(site, labels), 8)
    with pytest.raises(ValueError, match="size"):
        load_weak_labels(index_site(site, "image"), 0)


def test_describe_counts_boxes(site: Path, names: list[str], tmp_path: Path) -> None:
    boxes = _write_csv(
        tmp_path / "boxes.csv",
        [BOX_HEADER, [names[0], 0, 0, 4, 4], [names[0], 8, 8, 12, 12], [names[3], 1, 1, 2, 2]],
    )
    index = index_site(site, "box", boxes=boxes)
    summary = describe(index, make_splits(index, seed=0))
    assert summary["label_kind"] == "box" and summary["weak_label_source"] == "file"
    assert summary["n_boxes"] == 3 and summary["n_positive"] == 2

    from_masks = index_site(site, "box", labels_from_masks=True)
    summary = describe(from_masks, make_splits(from_masks, seed=0))
    positive = int(_native_masks(site, names).any(axis=(1, 2)).sum())
    assert summary["weak_label_source"] == "masks"
    assert summary["n_boxes"] == summary["n_positive"] == positive


def test_site_index_stays_consistent(site: Path, tmp_path: Path) -> None:
    boxed = index_site(site, "box", boxes=_write_csv(tmp_path / "b.csv", [BOX_HEADER]))
    flagged = index_site(site, "image")
    with pytest.raises(dataclasses.FrozenInstanceError):
        boxed.boxes = None  # type: ignore[misc]
    with pytest.raises(ValueError, match="boxes"):
        dataclasses.replace(boxed, boxes=None)
    with pytest.raises(ValueError, match="boxes"):
        dataclasses.replace(boxed, boxes=boxed.boxes[:-1])
    with pytest.raises(ValueError, match="invalid box"):
        dataclasses.replace(boxed, boxes=((5, 5, 5, 9),) + boxed.boxes[1:])
    with pytest.raises(ValueError, match="has_lesion"):
        dataclasses.replace(flagged, has_lesion=None)
    with pytest.raises(ValueError, match="has_lesion"):
        dataclasses.replace(flagged, has_lesion=(1,) * N)
    with pytest.raises(ValueError, match="labels_from_masks"):
        dataclasses.replace(index_site(site), labels_from_masks=True)
    with pytest.raises(ValueError, match="mask paths"):
        dataclasses.replace(flagged, mask_paths=(None,) + flagged.mask_paths[1:])


# --------------------------------------------------------------------------- #
# Real data (read from ../shared/data, never copied into the repository)
# --------------------------------------------------------------------------- #


@pytest.fixture
def real_data() -> Path:
    if not DATA.is_dir():
        pytest.skip("../shared/data not present: real-data test skipped")
    return DATA


def test_real_busi_image_labels_from_meta(real_data: Path) -> None:
    index = index_site(real_data / "breast" / "BUSI", LabelKind.IMAGE)
    assert len(index) == 780
    assert index.has_lesion is not None and sum(index.has_lesion) == 647
    assert index.has_masks  # BUSI ships masks: kept for scoring only
    assert int(load_weak_labels(index, 64)["has_lesion"].sum()) == 647
    summary = describe(index, make_splits(index, seed=0))
    assert summary["weak_label_source"] == "meta" and summary["n_positive"] == 647
