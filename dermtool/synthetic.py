"""Synthetic dermoscopy-like images whose lesion mask and class are known exactly.

Used by the tests and examples so that nothing depends on the real (licensed) ISIC data. An
image is skin-toned, shaded and noisy, with a darker irregular blob (an ellipse whose radius is
perturbed by a few low harmonics) and, sometimes, dark hairs drawn over it. The three classes
differ in size, boundary irregularity, colour and texture, so a classifier can learn them:

    0 melanoma               large, irregular, dark brown with blue-grey variegation, soft edge
    1 seborrheic keratosis   medium, fairly regular, tan with a coarse texture and light dots,
                             sharp ("stuck-on") edge
    2 nevus                  small, round and symmetric, uniform medium brown
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dermtool import CLASS_NAMES

# Per class: radius as a fraction of the short side, harmonic amplitude range, edge softness
# (fraction of the radius), and the lesion's base colour.
_CLASS_STATS = {
    0: dict(radius=(0.24, 0.36), wobble=(0.10, 0.20), edge=0.06, colour=(70, 42, 32)),
    1: dict(radius=(0.18, 0.30), wobble=(0.04, 0.09), edge=0.01, colour=(150, 105, 70)),
    2: dict(radius=(0.11, 0.22), wobble=(0.01, 0.04), edge=0.04, colour=(125, 80, 55)),
}


def _smooth_noise(h: int, w: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """A low-frequency random field, float32 (h, w), roughly N(0, 1) per grid cell."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC))


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Skin tone with uneven shading and the dark corners of a dermoscope's round field."""
    skin = np.array([225, 172, 148], np.float32) + rng.uniform(-25, 15, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
    shade = 1.0 - rng.uniform(0.0, 0.25) * np.clip(r2 / 2.0, 0, 1) + 0.04 * _smooth_noise(h, w, rng, 5)
    return skin * shade[..., None]


def _blob(h: int, w: int, rng: np.random.Generator, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mask bool, alpha float32) of one irregular blob; mask == (alpha >= 0.5) exactly."""
    short = min(h, w)
    a = rng.uniform(*stats["radius"]) * short
    b = a * rng.uniform(0.65, 1.0)
    angle = rng.uniform(0, np.pi)
    cy = h / 2 + rng.uniform(-0.12, 0.12) * h
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / a
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / b
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    radius = np.ones_like(theta)
    for k in range(2, 8):  # low harmonics only: lobes, not fractal noise
        amp = rng.uniform(*stats["wobble"]) / (k - 1) ** 0.5
        radius += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    inside = (radius - rho) * min(a, b)  # ~ pixels inside the boundary
    mask = inside >= 0
    edge = max(0.5, stats["edge"] * a)
    alpha = np.clip(inside / edge + 0.5, 0.0, 1.0).astype(np.float32)
    alpha[mask] = np.maximum(alpha[mask], 0.5)  # keeps mask == alpha >= 0.5 despite rounding
    alpha[~mask] = np.minimum(alpha[~mask], 0.49)
    return mask, alpha


def _lesion_colour(h: int, w: int, rng: np.random.Generator, cls: int) -> np.ndarray:
    """The lesion's colour field (h, w, 3) float32 for class `cls`."""
    base = np.array(_CLASS_STATS[cls]["colour"], np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
    colour = np.broadcast_to(base, (h, w, 3)).copy()
    short = min(h, w)
    if cls == 0:  # variegation: dark brown, near-black and blue-grey regions
        mix = np.clip(_smooth_noise(h, w, rng, 6) * 0.6 + 0.2, 0, 1)[..., None]
        blue_grey = np.array([95, 100, 125], np.float32)
        colour = colour * (1 - mix) + blue_grey * mix
        colour *= (1.0 - 0.35 * np.clip(_smooth_noise(h, w, rng, 9), 0, 1))[..., None]
    elif cls == 1:  # cerebriform texture and milia-like light dots
        colour *= (1.0 + 0.12 * _smooth_noise(h, w, rng, max(8, short // 12)))[..., None]
        yy, xx = np.mgrid[0:h, 0:w]
        for _ in range(int(rng.integers(4, 12))):
            y, x = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
            r = max(1.0, rng.uniform(0.006, 0.015) * short)
            colour[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = (215, 200, 175)
    else:  # a nevus is nearly uniform: only a faint shading
        colour *= (1.0 + 0.04 * _smooth_noise(h, w, rng, 4))[..., None]
    return colour


def _draw_hairs(img: Image.Image, rng: np.random.Generator) -> None:
    """Dark, gently curved hairs across the image (not part of the lesion mask)."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    width = max(1, round(min(h, w) / 250))
    for _ in range(int(rng.integers(1, 9))):
        p0 = rng.uniform(0, 1, 2) * (w, h)
        direction = rng.uniform(0, 2 * np.pi)
        bend = rng.uniform(-1.5, 1.5)
        length = rng.uniform(0.3, 1.0) * max(h, w)
        t = np.linspace(0, 1, 24)
        ang = direction + bend * t
        pts = p0 + np.cumsum(np.stack([np.cos(ang), np.sin(ang)], 1) * length / len(t), axis=0)
        shade = tuple(int(c) for c in rng.integers(15, 60, 3))
        draw.line([tuple(p) for p in pts], fill=shade, width=width)


def make_lesion(height: int, width: int, rng: np.random.Generator, cls: int | None = None,
                hair_probability: float = 0.3) -> tuple[np.ndarray, np.ndarray, int]:
    """One synthetic dermoscopy image with its exact lesion mask.

    Args:
        rng: the only source of randomness, so a seeded generator repeats the image.
        cls: 0 melanoma, 1 seborrheic keratosis, 2 nevus; None draws one at random.
        hair_probability: chance that hairs are drawn over the image.
    Returns:
        (rgb uint8 (height, width, 3), mask bool (height, width), class index).
    """
    if cls is None:
        cls = int(rng.integers(0, 3))
    if cls not in _CLASS_STATS:
        raise ValueError(f"cls must be 0, 1 or 2, not {cls!r}")
    h, w = int(height), int(width)
    background = _background(h, w, rng)
    mask, alpha = _blob(h, w, rng, _CLASS_STATS[cls])
    lesion = _lesion_colour(h, w, rng, cls)
    rgb = background * (1 - alpha[..., None]) + lesion * alpha[..., None]
    rgb += rng.normal(0, rng.uniform(2, 6), rgb.shape).astype(np.float32)  # sensor noise
    img = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < hair_probability:
        _draw_hairs(img, rng)
    return np.asarray(img), mask, cls


def _save_image(rgb: np.ndarray, path: Path) -> None:
    ext = path.suffix.lower()
    if ext in (".jpg", ".jpeg"):
        Image.fromarray(rgb).save(path, quality=92)
    elif ext in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, rgb, photometric="rgb")
    else:  # png, bmp
        Image.fromarray(rgb).save(path)


def write_dataset(folder: Path, n: int, rng_seed: int, sizes: Sequence[tuple[int, int]] = ((192, 256),),
                  formats: Sequence[str] = ("jpg",), hair_probability: float = 0.3) -> Path:
    """Write `n` synthetic images in the development layout.

    `folder/images/SYN_0000000.<ext>`, `folder/masks/SYN_0000000_segmentation.png` (0/255) and
    `folder/labels.csv` (ISIC 2017 Part 3 columns). Sizes and formats are cycled through; the
    classes cycle 0, 1, 2 so every class appears. Image i depends only on (rng_seed, i).

    Returns:
        `folder`.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        ext = formats[i % len(formats)].lstrip(".")
        image_id = f"SYN_{i:07d}"
        rgb, mask, cls = make_lesion(h, w, np.random.default_rng([rng_seed, i]), cls=i % 3,
                                     hair_probability=hair_probability)
        _save_image(rgb, folder / "images" / f"{image_id}.{ext}")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{image_id}_segmentation.png")
        rows.append([image_id, float(cls == 0), float(cls == 1)])
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image_id", CLASS_NAMES[0], CLASS_NAMES[1]])
        writer.writerows(rows)
    return folder
