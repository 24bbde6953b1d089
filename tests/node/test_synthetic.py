"""Tests for fedseg.node.synthetic: distinct, binary, reproducible sites."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedseg.node.datasets import index_site
from fedseg.node.synthetic import DEFAULT_SITES, SiteStyle, write_federation, write_site

SIZE = 32


def _read_folder(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


@pytest.fixture
def federation(tmp_path: Path) -> list[Path]:
    return write_federation(tmp_path / "fed", n_per_site=20, size=SIZE, seed=3)


def test_federation_layout_is_indexable(federation: list[Path]) -> None:
    assert [p.name for p in federation] == ["site-a", "site-b", "site-c"]
    for root in federation:
        index = index_site(root)
        assert len(index) == 20 and index.channels == 3 and index.native_size == (SIZE, SIZE)


def test_sites_differ_in_intensity_and_noise(federation: list[Path]) -> None:
    means, roughness = [], []
    for root in federation:
        grey = _read_folder(root / "images").astype(np.float64).mean(axis=-1)  # (N, H, W)
        means.append(grey.mean())
        # Mean absolute neighbour difference: grows with noise and contrast.
        roughness.append(np.abs(np.diff(grey, axis=2)).mean())
    for i in range(3):
        for j in range(i + 1, 3):
            assert abs(means[i] - means[j]) > 20, means
            assert abs(roughness[i] - roughness[j]) > 0.1 * max(roughness[i], roughness[j]), roughness


def test_masks_binary_and_some_empty(federation: list[Path]) -> None:
    for root in federation:
        masks = _read_folder(root / "masks")  # (N, H, W)
        assert set(np.unique(masks).tolist()) == {0, 255}
        empty = ~masks.reshape(len(masks), -1).any(axis=1)
        assert 0 < empty.sum() < len(masks)
        with (root / "meta.csv").open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert [r["has_lesion"] == "0" for r in rows] == empty.tolist()
        assert np.allclose([float(r["fg_frac"]) for r in rows], (masks > 0).mean(axis=(1, 2)), atol=1e-4)


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    style = DEFAULT_SITES[2]
    a = write_site(tmp_path / "a", style, 6, size=SIZE, seed=5)
    b = write_site(tmp_path / "b", style, 6, size=SIZE, seed=5)
    c = write_site(tmp_path / "c", style, 6, size=SIZE, seed=6)
    for sub in ("images", "masks"):
        assert np.array_equal(_read_folder(a / sub), _read_folder(b / sub))
    assert not np.array_equal(_read_folder(a / "images"), _read_folder(c / "images"))
    assert (a / "meta.csv").read_text() == (b / "meta.csv").read_text()


def test_grey_site_and_refuses_to_overwrite(tmp_path: Path) -> None:
    style = dataclasses.replace(DEFAULT_SITES[0], channels=1)
    root = write_site(tmp_path / "g", style, 3, size=SIZE)
    assert _read_folder(root / "images").shape == (3, SIZE, SIZE)
    with pytest.raises(FileExistsError, match="images"):
        write_site(root, style, 3, size=SIZE)


def test_style_validation() -> None:
    with pytest.raises(ValueError, match="lesion_shape"):
        SiteStyle("x", 0.5, 1.0, 0.01, "star", 0.2, 3, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="channels"):
        SiteStyle("x", 0.5, 1.0, 0.01, "blob", 0.2, 2, (1.0, 1.0, 1.0))
