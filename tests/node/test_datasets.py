"""Tests for fedseg.node.datasets: indexing, validation, loading and splits."""

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
    make_splits,
)
from fedseg.node.errors import DatasetError, NodeError
from fedseg.node.synthetic import DEFAULT_SITES, write_site

DATA = Path(__file__).parents[2].parent / "shared" / "data"
N = 12
SIZE = 32


def _write_meta(root: Path, header: list[str], rows: list[list[object]]) -> None:
    with (root / "meta.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site", DEFAULT_SITES[0], N, size=SIZE, seed=1)


@pytest.fixture
def names(site: Path) -> list[str]:
    return sorted(p.stem for p in (site / "images").glob("*.png"))


def _raises(root: Path, **kwargs: object) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        index_site(root, **kwargs)
    return info.value


# --------------------------------------------------------------------------- #
# Happy path
# --------------------------------------------------------------------------- #


def test_index_and_load_shapes(site: Path, names: list[str]) -> None:
    index = index_site(site)
    assert index.names == tuple(names)
    assert len(index) == N
    assert index.channels == 3
    assert index.native_size == (SIZE, SIZE)
    assert index.label_kind is LabelKind.PIXEL
    assert index.group_column is None and index.groups is None
    assert all(m is not None and m.stem == n for m, n in zip(index.mask_paths, index.names))

    images, masks = load_arrays(index, 16)
    assert images.shape == (N, 3, 16, 16) and images.dtype == np.uint8
    assert masks is not None and masks.shape == (N, 1, 16, 16) and masks.dtype == np.uint8
    assert set(np.unique(masks).tolist()) <= {0, 1}
    assert masks.any()

    grey, _ = load_arrays(index, 16, channels=1)
    assert grey.shape == (N, 1, 16, 16)


def test_grey_site_converts_to_rgb(tmp_path: Path) -> None:
    style = dataclasses.replace(DEFAULT_SITES[1], name="grey", channels=1)
    index = index_site(write_site(tmp_path / "grey", style, 4, size=SIZE))
    assert index.channels == 1
    rgb, _ = load_arrays(index, SIZE, channels=3)
    assert rgb.shape == (4, 3, SIZE, SIZE)
    # Grey replicated to RGB: all channels equal.
    assert np.array_equal(rgb[:, 0], rgb[:, 1]) and np.array_equal(rgb[:, 1], rgb[:, 2])


def test_mask_values_0_1_accepted_and_binarised(site: Path, names: list[str]) -> None:
    mask_path = site / "masks" / f"{names[0]}.png"
    arr = np.zeros((SIZE, SIZE), np.uint8)
    arr[4:12, 4:12] = 1
    Image.fromarray(arr).save(mask_path)
    _, masks = load_arrays(index_site(site), SIZE)
    assert masks is not None
    assert np.array_equal(masks[0, 0], arr)


def test_label_kind_none_needs_no_masks(site: Path) -> None:
    for path in (site / "masks").iterdir():
        path.unlink()
    (site / "masks").rmdir()
    index = index_site(site, labels=LabelKind.NONE)
    assert index.mask_paths == (None,) * N
    images, masks = load_arrays(index, 8)
    assert images.shape == (N, 3, 8, 8) and masks is None


def test_label_kind_none_keeps_complete_masks_to_score_only(site: Path) -> None:
    index = index_site(site, labels=LabelKind.NONE)
    assert index.has_masks and index.label_kind is LabelKind.NONE
    _, masks = load_arrays(index, 8)
    assert masks is not None and masks.shape == (N, 1, 8, 8)
    next((site / "masks").iterdir()).unlink()
    assert not index_site(site, labels=LabelKind.NONE).has_masks


def test_empty_image_folder_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"no images in .*images"):
        index_site(tmp_path, labels=LabelKind.NONE)


def test_limit_keeps_first_sorted_names(site: Path, names: list[str]) -> None:
    assert index_site(site, limit=5).names == tuple(names[:5])


def test_where_filters_by_prefix(site: Path, names: list[str]) -> None:
    devices = ["GE Logiq 5 @10-12MHz", "GE Logiq 7 @10-14MHz", "Toshiba"]
    _write_meta(site, ["name", "device"], [[n, devices[i % 3]] for i, n in enumerate(names)])
    index = index_site(site, where={"device": "GE Logiq 5"})
    assert index.names == tuple(names[0::3])
    assert index_site(site, where={"device": "GE"}, limit=3).names == tuple(
        n for i, n in enumerate(names) if i % 3 != 2
    )[:3]

    err = _raises(site, where={"scanner": "GE"})
    assert "meta.csv" in str(err) and "'scanner'" in str(err)


# --------------------------------------------------------------------------- #
# Splits and summaries
# --------------------------------------------------------------------------- #


def test_splits_disjoint_covering_deterministic(site: Path) -> None:
    index = index_site(site)
    splits = make_splits(index, seed=7)
    parts = (splits.train, splits.val, splits.test)
    assert all(p.dtype == np.int64 and p.size > 0 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(N))

    again = make_splits(index, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, (again.train, again.val, again.test)))
    others = [make_splits(index, seed=s).test for s in range(8, 14)]
    assert any(not np.array_equal(splits.test, t) for t in others)


def test_every_split_nonempty_for_three_images(site: Path) -> None:
    splits = make_splits(index_site(site, limit=3), seed=0)
    assert [p.size for p in (splits.train, splits.val, splits.test)] == [1, 1, 1]
    with pytest.raises(DatasetError, match="at least 3"):
        make_splits(index_site(site, limit=2), seed=0)
    with pytest.raises(ValueError, match="fractions"):
        make_splits(index_site(site), seed=0, fractions=(0.8, 0.2, 0.0))


def test_group_splits_keep_groups_together(site: Path, names: list[str]) -> None:
    # Uneven groups (sizes 1..4) to exercise the greedy assignment.
    sequence = [1, 1, 1, 1, 2, 3, 3, 4, 4, 4, 5, 6]
    _write_meta(site, ["name", "sequence"], [[n, s] for n, s in zip(names, sequence)])
    index = index_site(site)
    assert index.group_column == "sequence"
    assert index.groups == tuple(str(s) for s in sequence)

    groups = np.asarray(index.groups)
    for seed in range(20):
        splits = make_splits(index, seed=seed)
        parts = (splits.train, splits.val, splits.test)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(N))
        assert all(p.size > 0 for p in parts)
        seen = [set(groups[p]) for p in parts]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2]), seed

    assert index_site(site, group_by=None).groups is None


def test_describe_is_json_and_pixel_free(site: Path, names: list[str]) -> None:
    _write_meta(site, ["name", "patient_case"], [[n, i // 2] for i, n in enumerate(names)])
    index = index_site(site)
    summary = describe(index, make_splits(index, seed=0))
    assert set(summary) == {
        "n_images", "n_train", "n_val", "n_test", "label_kind",
        "channels", "native_size", "group_column", "n_groups",
        "weak_label_source", "n_boxes", "n_positive",
    }
    assert not any(isinstance(v, np.ndarray | np.generic) for v in summary.values())
    assert json.loads(json.dumps(summary)) == summary
    assert summary["n_images"] == N
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] == N
    assert summary["group_column"] == "patient_case" and summary["n_groups"] == N // 2
    assert summary["label_kind"] == "pixel" and summary["native_size"] == [SIZE, SIZE]
    assert summary["weak_label_source"] is None
    assert summary["n_boxes"] is None and summary["n_positive"] is None


# --------------------------------------------------------------------------- #
# Bad data: every message names the offending file
# --------------------------------------------------------------------------- #


def test_corrupt_image(site: Path, names: list[str]) -> None:
    (site / "images" / f"{names[3]}.png").write_bytes(b"this is not a png at all")
    err = _raises(site)
    assert f"images/{names[3]}.png: cannot be read" in str(err)
    assert isinstance(err, NodeError)


def test_truncated_image(site: Path, names: list[str]) -> None:
    path = site / "images" / f"{names[4]}.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert f"images/{names[4]}.png: cannot be read" in str(_raises(site))


def test_mask_of_wrong_size(site: Path, names: list[str]) -> None:
    Image.fromarray(np.zeros((SIZE, SIZE - 2), np.uint8)).save(site / "masks" / f"{names[2]}.png")
    message = str(_raises(site))
    assert (
        f"masks/{names[2]}.png: size {SIZE - 2}x{SIZE} differs from its image "
        f"images/{names[2]}.png ({SIZE}x{SIZE})"
    ) in message


def test_non_binary_mask(site: Path, names: list[str]) -> None:
    arr = np.zeros((SIZE, SIZE), np.uint8)
    arr[:4] = 17
    arr[-4:] = 255
    Image.fromarray(arr).save(site / "masks" / f"{names[5]}.png")
    assert f"masks/{names[5]}.png: not binary (values 0, 17, 255" in str(_raises(site))


def test_missing_and_orphan_masks(site: Path, names: list[str]) -> None:
    (site / "masks" / f"{names[1]}.png").unlink()
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(site / "masks" / "zzz.png")
    err = _raises(site)
    assert f"images/{names[1]}.png has no mask masks/{names[1]}.png" in str(err)
    assert "masks/zzz.png has no image" in str(err)
    assert len(err.problems) == 2


def test_missing_data_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert str(_raises(missing)) == f"data folder {missing} does not exist"


def test_empty_images_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    assert f"no images in {tmp_path / 'images'}" in str(_raises(tmp_path))


def test_meta_row_with_unknown_name(site: Path, names: list[str]) -> None:
    _write_meta(site, ["name", "label"], [[n, "x"] for n in names] + [["ghost", "x"]])
    message = str(_raises(site))
    assert f"meta.csv line {N + 2}: name 'ghost' has no image images/ghost.*" in message


def test_all_offenders_reported_together(site: Path, names: list[str]) -> None:
    (site / "images" / f"{names[0]}.png").write_bytes(b"garbage")
    arr = np.full((SIZE, SIZE), 3, np.uint8)
    Image.fromarray(arr).save(site / "masks" / f"{names[1]}.png")
    err = _raises(site)
    assert len(err.problems) == 2
    assert f"images/{names[0]}.png" in str(err) and f"masks/{names[1]}.png" in str(err)
    assert str(site) in str(err)


def test_long_problem_lists_are_truncated() -> None:
    err = DatasetError([f"masks/{i:03d}.png: bad" for i in range(25)], where="/data/site")
    message = str(err)
    assert message.startswith("/data/site: 25 problems:")
    assert "masks/009.png" in message and "masks/010.png" not in message
    assert message.endswith("... and 15 more")
    assert len(err.problems) == 25


# --------------------------------------------------------------------------- #
# Real data (read from ../shared/data, never copied into the repository)
# --------------------------------------------------------------------------- #


@pytest.fixture
def real_data() -> Path:
    if not DATA.is_dir():
        pytest.skip("../shared/data not present: real-data test skipped")
    return DATA


def test_real_cvc_clinicdb_groups_by_sequence(real_data: Path) -> None:
    index = index_site(real_data / "polyp" / "CVC-ClinicDB")
    assert index.group_column == "sequence"
    assert len(index) == 612 and index.channels == 3
    splits = make_splits(index, seed=0)
    groups = np.asarray(index.groups)
    assert not set(groups[splits.train]) & set(groups[splits.test])


def test_real_bus_bra_device_filter(real_data: Path) -> None:
    index = index_site(real_data / "breast" / "BUS-BRA", where={"device": "GE Logiq 5"})
    assert len(index) == 809
    assert index.channels == 1
    assert index.group_column == "patient_case"


def test_real_kvasir_limit_loads(real_data: Path) -> None:
    index = index_site(real_data / "polyp" / "Kvasir-SEG", limit=20)
    images, masks = load_arrays(index, 64)
    assert images.shape == (20, 3, 64, 64) and images.dtype == np.uint8
    assert masks is not None and masks.shape == (20, 1, 64, 64)
    assert set(np.unique(masks).tolist()) == {0, 1}


# --------------------------------------------------------------------------- #
# Seeded, stratified samples
# --------------------------------------------------------------------------- #


def test_sample_is_seeded_and_keeps_the_lesion_share(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site", DEFAULT_SITES[0], 20, size=SIZE, seed=1)
    names = sorted(p.stem for p in (site / "images").glob("*.png"))
    # The first half of the sorted names have a lesion and the rest none: the first 10 are all lesions.
    _write_meta(site, ["name", "has_lesion"], [[n, int(i < 10)] for i, n in enumerate(names)])
    first = index_site(site, sample=10, sample_seed=3)
    assert first.names == index_site(site, sample=10, sample_seed=3).names
    assert first.names != index_site(site, sample=10, sample_seed=4).names
    assert first.names != tuple(names[:10])
    assert sum(n in names[:10] for n in first.names) == 5


def test_sample_and_limit_exclude_each_other(site: Path) -> None:
    with pytest.raises(ValueError, match="excludes limit"):
        index_site(site, limit=4, sample=4)


def test_real_busi_sample_keeps_normal_images(real_data: Path) -> None:
    # BUSI sorts benign first: the first 60 names hold no normal (lesion-free) image.
    root = real_data / "breast" / "BUSI"
    assert all(n.startswith("benign") for n in index_site(root, limit=60).names)
    index = index_site(root, sample=60, sample_seed=0)
    kinds = {n.split("_")[0] for n in index.names}
    assert kinds == {"benign", "malignant", "normal"}
    # 133 of BUSI's 780 images have no lesion: 60 * 133 / 780 = 10.2, so 10 of the sample.
    assert sum(n.startswith("normal") for n in index.names) == 10


def test_benchmark_subsets_are_the_nodes_own_sample(tmp_path: Path) -> None:
    """scripts/benchlib.make_subset serves the images `node start --sample` would pick."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
    from benchlib import make_subset

    site = write_site(tmp_path / "site", DEFAULT_SITES[0], 20, size=SIZE, seed=1)
    subset = make_subset(site, tmp_path / "subset", 8, None, 5)
    assert subset["images"] == 8
    assert index_site(tmp_path / "subset").names == index_site(site, sample=8, sample_seed=5).names
