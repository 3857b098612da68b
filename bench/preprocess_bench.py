"""Preprocessing speed: dermtool's cache builder against the thesis recipe, in one run.

The thesis decoded every original JPEG at full size with scikit-image and resized it with
anti-aliasing to 572 x 572. dermtool decodes JPEGs with DCT scaling (Pillow draft) to the
smallest size still >= the target, resizes with Pillow, and spreads files over threads.
Both produce 572 x 572 RGB (squash: the whole frame, aspect not kept), so the work is equal.

    python bench/preprocess_bench.py                       # ../shared/data/isic2017/val_fullres
    python bench/preprocess_bench.py --images DIR --size 256 --workers 4

Skips (exit 0, with a message) when the image folder is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO / ".." / "shared" / "data" / "isic2017" / "val_fullres"


def thesis_recipe(paths: list[Path], size: int) -> np.ndarray:
    """skimage.io.imread, then skimage.transform.resize(anti_aliasing=True), one file at a time."""
    from skimage.io import imread
    from skimage.transform import resize

    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, path in enumerate(paths):
        img = imread(path)
        out[i] = np.round(resize(img, (size, size), anti_aliasing=True) * 255)
    return out


def dermtool_cache(images_dir: Path, size: int, workers: int) -> np.ndarray:
    """What `dermtool preprocess DIR --size N --fit squash --margin 0` does, into a fresh folder."""
    from dermtool.data import Layout, build_cache, load_cache

    with tempfile.TemporaryDirectory() as tmp:
        build_cache(Layout(images_dir, None, None), Path(tmp) / "cache", size=size, fit="squash",
                    margin=0, workers=workers, progress=False)
        return np.array(load_cache(Path(tmp) / "cache").images)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="folder of original JPEGs, or a folder holding images/ (default: %(default)s)")
    parser.add_argument("--size", type=int, default=572, help="output side (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="dermtool threads (0: one per core, at most 8)")
    args = parser.parse_args(argv)

    from dermtool.data import find_images, resolve_layout

    if not args.images.is_dir():
        print(f"skipped: {args.images.resolve()} not found (the real ISIC 2017 originals are needed).")
        return 0
    images_dir = resolve_layout(args.images).images
    paths = find_images(images_dir)
    for p in paths:  # read every file once so neither side pays for a cold disk cache
        p.read_bytes()
    megapixels = _megapixels(paths)
    workers = args.workers or min(8, os.cpu_count() or 1)
    print(f"{len(paths)} images from {images_dir.resolve()}, {megapixels:.0f} MP in all, output {args.size} x {args.size}")
    print(f"CPU cores: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.1f}")

    ref, t_ref = timed(thesis_recipe, paths, args.size)
    one, t_one = timed(dermtool_cache, images_dir, args.size, 1)
    many, t_many = timed(dermtool_cache, images_dir, args.size, workers)
    assert ref.shape == one.shape == many.shape, (ref.shape, one.shape)
    diff = np.abs(ref.astype(int) - many.astype(int)).mean()

    rows = [("thesis recipe (skimage imread + resize, anti_aliasing)", t_ref),
            ("dermtool preprocess, 1 thread", t_one),
            (f"dermtool preprocess, {workers} threads", t_many)]
    print()
    print(f"| {'method':<55} | images | seconds | images/s | speed-up |")
    print(f"|{'-' * 57}|-------:|--------:|---------:|---------:|")
    for name, seconds in rows:
        print(f"| {name:<55} | {len(paths):>6} | {seconds:>7.2f} | {len(paths) / seconds:>8.2f} | {t_ref / seconds:>7.1f}x |")
    print(f"\nmean absolute difference between the two outputs: {diff:.2f} grey levels (of 255)")
    return 0


def _megapixels(paths: list[Path]) -> float:
    from PIL import Image

    total = 0
    for p in paths:
        with Image.open(p) as img:
            total += img.size[0] * img.size[1]
    return total / 1e6


if __name__ == "__main__":
    sys.exit(main())
