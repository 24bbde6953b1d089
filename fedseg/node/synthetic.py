"""Synthetic multi-site segmentation data for the demo and fast tests.

Each site is drawn from a :class:`SiteStyle`: a textured background, one
lesion (or none) of a site-specific shape and brightness, smooth noise and a
colour tint. Sites therefore differ in intensity, contrast, noise and lesion
shape, a small stand-in for the scanner and protocol shift between hospitals.
The output uses the real-data layout read by
:func:`fedseg.node.datasets.index_site`::

    <root>/images/NAME.png   (RGB or grey)
    <root>/masks/NAME.png    values {0, 255}
    <root>/meta.csv          name, has_lesion, fg_frac

Only numpy is used for drawing and PIL for saving, so 100 images of 64x64
take a few tens of milliseconds.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DEFAULT_SITES", "LESION_SHAPES", "SiteStyle", "write_federation", "write_site"]

#: Lesion outlines :class:`SiteStyle` accepts.
LESION_SHAPES = ("ellipse", "blob", "polygon")

# Background texture amplitude before the style's contrast is applied. The
# default lesion offsets are 1.5-2.5x this, so a lesion is visible by eye but
# is not separable by a single global threshold.
_TEXTURE_AMPLITUDE = 0.12
# Width in pixels of the blurred lesion rim; a hard edge would be trivial.
_EDGE_WIDTH = 1.5


@dataclass(frozen=True)
class SiteStyle:
    """Appearance of one synthetic site. Intensities are on a [0, 1] scale.

    Attributes:
        name: Site name, used as the folder name by :func:`write_federation`.
        background: Mean background intensity.
        contrast: Multiplier on every deviation from the background (texture
            and lesion).
        noise: Standard deviation of the added smooth noise.
        lesion_shape: One of :data:`LESION_SHAPES`.
        lesion_intensity: Lesion offset from the background, before
            ``contrast``; negative values give dark lesions.
        channels: 3 for RGB output, 1 for grey (``tint`` is then ignored).
        tint: Per-channel gain (R, G, B) applied to the grey image.
    """

    name: str
    background: float
    contrast: float
    noise: float
    lesion_shape: str
    lesion_intensity: float
    channels: int
    tint: tuple[float, float, float]

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"SiteStyle.name must be a plain folder name, got {self.name!r}")
        if self.lesion_shape not in LESION_SHAPES:
            raise ValueError(
                f"SiteStyle.lesion_shape must be one of {LESION_SHAPES}, got {self.lesion_shape!r}"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"SiteStyle.channels must be 1 or 3, got {self.channels}")
        if len(self.tint) != 3 or any(t < 0 for t in self.tint):
            raise ValueError(f"SiteStyle.tint must be three gains >= 0, got {self.tint}")
        if not 0.0 <= self.background <= 1.0 or self.contrast <= 0 or self.noise < 0:
            raise ValueError(
                "SiteStyle needs 0 <= background <= 1, contrast > 0 and noise >= 0, got "
                f"background={self.background}, contrast={self.contrast}, noise={self.noise}"
            )


#: Three clearly distinct RGB sites: a bright, clean, pink site with elliptic
#: lesions; a dark, high-contrast, noisy, bluish site with lobulated blobs; and
#: a bright, low-contrast, greenish site with dark polygonal lesions.
DEFAULT_SITES: tuple[SiteStyle, ...] = (
    SiteStyle(
        name="site-a",
        background=0.55,
        contrast=1.0,
        noise=0.015,
        lesion_shape="ellipse",
        lesion_intensity=0.22,
        channels=3,
        tint=(1.0, 0.72, 0.62),
    ),
    SiteStyle(
        name="site-b",
        background=0.32,
        contrast=1.5,
        noise=0.07,
        lesion_shape="blob",
        lesion_intensity=0.2,
        channels=3,
        tint=(0.8, 0.9, 1.0),
    ),
    SiteStyle(
        name="site-c",
        background=0.72,
        contrast=0.7,
        noise=0.05,
        lesion_shape="polygon",
        lesion_intensity=-0.3,
        channels=3,
        tint=(0.9, 1.0, 0.78),
    ),
)


def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """Smooth-step interpolation weights from ``cells + 1`` knots to ``size`` pixels.

    Returns:
        Array of shape ``(size, cells + 1)``; each row sums to 1.
    """
    x = (np.arange(size) + 0.5) / size * cells
    i0 = np.floor(x).astype(np.int64)
    t = x - i0
    t = t * t * (3.0 - 2.0 * t)  # smoothstep hides the coarse grid's creases
    w = np.zeros((size, cells + 1))
    rows = np.arange(size)
    w[rows, i0] = 1.0 - t
    w[rows, i0 + 1] = t
    return w


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """Unit-variance smooth random fields, shape ``(n, size, size)``."""
    cells = max(1, min(cells, size))
    w = _interp_matrix(size, cells)  # (S, K)
    coarse = rng.standard_normal((n, cells + 1, cells + 1))  # (n, K, K)
    field = w @ coarse @ w.T  # (n, S, S)
    # Interpolation shrinks the variance unevenly; renormalise per image.
    field -= field.mean(axis=(1, 2), keepdims=True)
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-8
    return field


def _lesion_radius(rng: np.random.Generator, shape: str, r0: float, theta: np.ndarray) -> np.ndarray:
    """Outline radius R(theta) of a star-shaped lesion around its centre."""
    phi = rng.uniform(0.0, 2.0 * math.pi)
    if shape == "ellipse":
        a = r0 * rng.uniform(1.0, 1.4)
        b = r0 * rng.uniform(0.6, 1.0)
        c, s = np.cos(theta - phi), np.sin(theta - phi)
        return a * b / np.sqrt((b * c) ** 2 + (a * s) ** 2)
    if shape == "blob":
        radius = np.ones_like(theta)
        for k in (2, 3, 4):
            radius += rng.uniform(0.04, 0.16) * np.cos(k * theta + rng.uniform(0.0, 2.0 * math.pi))
        return r0 * radius
    # polygon: vertices at jittered angles keep every edge under pi radians, so
    # each ray from the centre crosses exactly one edge.
    m = int(rng.integers(5, 8))
    alpha = 2.0 * math.pi * (np.arange(m) + rng.uniform(-0.3, 0.3, m)) / m  # increasing
    rho = r0 * rng.uniform(0.75, 1.25, m)
    vx, vy = rho * np.cos(alpha), rho * np.sin(alpha)
    # Ray angle in the polygon's own frame (rotated by phi), in [alpha[0], alpha[0] + 2 pi).
    local = np.mod(theta - phi - alpha[0], 2.0 * math.pi) + alpha[0]
    i = np.clip(np.searchsorted(alpha, local, side="right") - 1, 0, m - 1)
    j = (i + 1) % m
    x1, y1, x2, y2 = vx[i], vy[i], vx[j], vy[j]
    # Distance along the ray to the line through (x1, y1)-(x2, y2).
    return (x1 * y2 - x2 * y1) / ((y2 - y1) * np.cos(local) - (x2 - x1) * np.sin(local))


def _draw_site(
    style: SiteStyle, n: int, size: int, rng: np.random.Generator, empty_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` images and masks.

    Returns:
        ``(images, masks)``: images ``(n, size, size, C)`` uint8, masks
        ``(n, size, size)`` bool.
    """
    n_empty = int(round(empty_fraction * n))
    empty = np.zeros(n, dtype=bool)
    empty[rng.permutation(n)[:n_empty]] = True

    texture = 0.65 * _smooth_noise(rng, n, size, 4) + 0.35 * _smooth_noise(rng, n, size, 12)
    inner = _smooth_noise(rng, n, size, 8)  # lesion's own texture
    noise = 0.7 * _smooth_noise(rng, n, size, max(2, size // 3)) + 0.3 * rng.standard_normal(
        (n, size, size)
    )

    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # (S, S) pixel centres
    soft = np.zeros((n, size, size))
    masks = np.zeros((n, size, size), dtype=bool)
    ramps = np.empty((n, size, size))
    for k in range(n):
        # Uneven illumination, a realistic nuisance the model must ignore.
        angle = rng.uniform(0.0, 2.0 * math.pi)
        ramps[k] = 0.06 * ((xx / size - 0.5) * math.cos(angle) + (yy / size - 0.5) * math.sin(angle))
        if empty[k]:
            continue
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        r0 = rng.uniform(0.1, 0.2) * size
        dx, dy = xx - cx, yy - cy
        dist = np.hypot(dx, dy)
        inside = _lesion_radius(rng, style.lesion_shape, r0, np.arctan2(dy, dx)) - dist  # (S, S)
        masks[k] = inside > 0
        soft[k] = np.clip(inside / _EDGE_WIDTH + 0.5, 0.0, 1.0)

    lesion = soft * (style.lesion_intensity + 0.04 * inner)
    grey = (
        style.background
        + style.contrast * (_TEXTURE_AMPLITUDE * texture + lesion + ramps)
        + style.noise * noise
    )  # (n, S, S)
    if style.channels == 3:
        img = grey[..., None] * np.asarray(style.tint)  # (n, S, S, 3)
    else:
        img = grey[..., None]  # (n, S, S, 1)
    images = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return images, masks


def write_site(
    root: Path,
    style: SiteStyle,
    n: int,
    size: int = 64,
    seed: int = 0,
    empty_fraction: float = 0.1,
) -> Path:
    """Write one synthetic site in the real-data layout.

    Args:
        root: Site folder to create; ``images/`` and ``masks/`` must not
            already hold files, since mixing two generations would silently
            corrupt the site.
        style: Appearance of the site.
        n: Number of image/mask pairs.
        size: Height and width in pixels (at least 16).
        seed: Seed; the same arguments always write identical files.
        empty_fraction: Fraction of images without a lesion (empty mask),
            rounded to the nearest count.

    Returns:
        ``root``.

    Raises:
        ValueError: If ``n`` < 1, ``size`` < 16 or ``empty_fraction`` is
            outside [0, 1].
        FileExistsError: If ``root/images`` or ``root/masks`` holds files.
    """
    if n < 1 or size < 16 or not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(
            f"need n >= 1, size >= 16 and 0 <= empty_fraction <= 1, got n={n}, size={size}, "
            f"empty_fraction={empty_fraction}"
        )
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    for folder in (image_dir, mask_dir):
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} already holds files; write into an empty folder")
        folder.mkdir(parents=True, exist_ok=True)

    images, masks = _draw_site(style, n, size, np.random.default_rng(seed), empty_fraction)
    width = max(4, len(str(n - 1)))
    rows = []
    for k in range(n):
        name = f"{k:0{width}d}"
        pixels = images[k] if style.channels == 3 else images[k, ..., 0]
        # compress_level=1: these files are throwaway, and level 6 is ~3x slower.
        Image.fromarray(pixels).save(image_dir / f"{name}.png", compress_level=1)
        Image.fromarray(masks[k].astype(np.uint8) * 255).save(mask_dir / f"{name}.png", compress_level=1)
        rows.append((name, int(masks[k].any()), f"{masks[k].mean():.4f}"))
    with (root / "meta.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("name", "has_lesion", "fg_frac"))
        writer.writerows(rows)
    return root


def write_federation(
    root: Path,
    n_per_site: int = 60,
    size: int = 64,
    seed: int = 0,
    sites: Sequence[SiteStyle] = DEFAULT_SITES,
) -> list[Path]:
    """Write one synthetic site per style under ``root``.

    Each site gets its own seed derived from ``seed`` so that sites differ in
    lesion placement as well as style, yet the whole federation is
    reproducible.

    Args:
        root: Parent folder; site ``s`` is written to ``root / s.name``.
        n_per_site: Image/mask pairs per site.
        size: Height and width in pixels.
        seed: Federation seed.
        sites: Site styles, with distinct names.

    Returns:
        The site folders, in the order of ``sites``.

    Raises:
        ValueError: If site names repeat, or as :func:`write_site`.
        FileExistsError: As :func:`write_site`.
    """
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be distinct, got {names}")
    seeds = np.random.SeedSequence(seed).spawn(len(sites))
    return [
        write_site(
            Path(root) / style.name,
            style,
            n_per_site,
            size=size,
            seed=int(ss.generate_state(1)[0]),
        )
        for style, ss in zip(sites, seeds)
    ]
