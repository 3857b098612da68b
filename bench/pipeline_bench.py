"""Per-image CPU of `dermtool infer` outside the network: each stage's former implementation
against the current one, on the real validation images, in one run.

For each image set (the 256 px ISIC 2017 validation images and the original-size JPEGs) the
model predicts every image once (untimed); then, one image at a time, each stage runs in both
versions, alternated, `--repeat` times, on one thread, timed with time.process_time:

  prepare            decode + fit, the file opened once  vs  opened for its size, then decoded
  closing            postprocess.closing (disk rows)  vs  scipy binary_closing (_reference_closing)
  largest component  labelled in the foreground's box  vs  in the whole frame
  fill holes         postprocess.fill_holes (one labelling, in the box)  vs  scipy binary_fill_holes
  postprocess        the whole chain, threshold to filled mask
  restore_mask       upscale_mask  vs  Pillow bilinear of a 0/255 mask, cut at 128
  mask PNG           io.encode_mask_png  vs  0/255 bytes + Pillow save(compress_level=1)

Both versions' outputs are compared as they run: model inputs and post-processed masks must be
identical, and the share of pixels where the restored masks differ is printed. A last table
compares zlib settings for the Up-filtered mask PNG on the original-size masks (why
encode_mask_png uses Z_RLE at memLevel 5).

    python bench/pipeline_bench.py                                  # ../shared/data/isic2017
    python bench/pipeline_bench.py --data DIR --model weights/isic-ham-lite0-joint-192 --repeat 5

Skips (exit 0, with a message) when the data folder is absent.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "isic2017"
SETS = ("val", "val_fullres")


def former_postprocess(prob: np.ndarray, cfg) -> np.ndarray:
    """postprocess with scipy's closing and hole filling, as before."""
    from scipy import ndimage

    from dermtool.postprocess import _reference_closing, _reference_largest_component

    mask = _reference_closing(prob >= cfg.threshold, cfg.closing_radius)
    return ndimage.binary_fill_holes(_reference_largest_component(mask))


def former_prepare(path: Path, cfg):
    """prepare as before: the file opened once for its size, then again to decode it."""
    from PIL import Image

    from dermtool.preprocess import fit_image, load_image, plan_transform

    with Image.open(path) as img:
        w, h = img.size
    t = plan_transform(h, w, cfg.size, cfg.fit, cfg.border)
    pixels, (orig_h, orig_w) = load_image(path, resize_to=(t.inner_h, t.inner_w))
    t = plan_transform(orig_h, orig_w, cfg.size, cfg.fit, cfg.border, cfg.margin)
    return fit_image(pixels, t), t


def former_png(mask: np.ndarray) -> bytes:
    """The PNG infer wrote through Pillow, here into memory."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool).view(np.uint8) * np.uint8(255)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Clock:
    """CPU milliseconds per stage and version, summed over calls."""

    def __init__(self):
        self.ms: dict[tuple[str, str], float] = {}

    def run(self, stage: str, version: str, fn, *args):
        start = time.process_time()
        result = fn(*args)
        key = (stage, version)
        self.ms[key] = self.ms.get(key, 0.0) + (time.process_time() - start) * 1e3
        return result


def predict(model, cfg, paths: list[Path], clock: Clock, repeat: int):
    """(prob, transform) per image; prepare is timed, the network is not."""
    from dermtool.infer import _run_model
    from dermtool.preprocess import prepare

    prepared = []
    for path in paths:
        for _ in range(repeat):
            old_x, _ = clock.run("prepare", "former", former_prepare, path, cfg)
            x, t = clock.run("prepare", "now", prepare, path, cfg.size, cfg.fit, cfg.border, cfg.margin)
            assert np.array_equal(old_x, x)
        prepared.append((x, t))
    probs = []
    for i in range(0, len(prepared), 8):
        batch = np.stack([x for x, _ in prepared[i:i + 8]]).astype(np.float32)
        probs.extend(_run_model(model, batch)["seg"])
    return [(prob, t) for prob, (_, t) in zip(probs, prepared)]


def time_stages(items, post, clock: Clock, repeat: int) -> dict:
    from scipy import ndimage

    from dermtool.io import encode_mask_png
    from dermtool.postprocess import (_reference_closing, _reference_largest_component, closing, fill_holes,
                                      largest_component, postprocess)
    from dermtool.preprocess import _crop_inner, _pil_resize_mask, restore_mask

    differ = pixels = old_bytes = new_bytes = 0
    for prob, t in items:
        thresholded = prob >= post.threshold
        for _ in range(repeat):  # versions alternate, so load changes hit both alike
            closed = clock.run("closing", "former", _reference_closing, thresholded, post.closing_radius)
            clock.run("closing", "now", closing, thresholded, post.closing_radius)
            kept = clock.run("largest component", "former", _reference_largest_component, closed)
            clock.run("largest component", "now", largest_component, closed)
            filled = clock.run("fill holes", "former", ndimage.binary_fill_holes, kept)
            clock.run("fill holes", "now", fill_holes, kept)
            old = clock.run("postprocess", "former", former_postprocess, prob, post)
            new = clock.run("postprocess", "now", postprocess, prob, post)
            assert np.array_equal(old, new) and np.array_equal(new, filled)
            old_full = clock.run("restore_mask", "former", _pil_resize_mask, _crop_inner(new, t), t.orig_h, t.orig_w)
            full = clock.run("restore_mask", "now", restore_mask, new, t)
            old_png = clock.run("mask PNG", "former", former_png, full)
            new_png = clock.run("mask PNG", "now", encode_mask_png, full)
        differ += int((old_full != full).sum())
        pixels += full.size
        old_bytes += len(old_png)
        new_bytes += len(new_png)
    return {"differ": differ / pixels, "old_kb": old_bytes / len(items) / 1e3, "new_kb": new_bytes / len(items) / 1e3}


def print_stages(name: str, n: int, clock: Clock, repeat: int, extra: dict) -> None:
    stages = ["prepare", "closing", "largest component", "fill holes", "postprocess", "restore_mask", "mask PNG"]
    per = {k: v / (n * repeat) for k, v in clock.ms.items()}
    print(f"\n{name}: {n} images, CPU ms per image (process_time, one thread, mean of {repeat} runs)\n")
    print(f"| {'stage':<40} | former ms | now ms | former / now |")
    print(f"|{'-' * 42}|----------:|-------:|-------------:|")
    for stage in stages:
        old, new = per[(stage, "former")], per[(stage, "now")]
        print(f"| {stage:<40} | {old:>9.3f} | {new:>6.3f} | {old / new:>11.1f}x |")
    old_total = sum(per[(s, "former")] for s in ("prepare", "postprocess", "restore_mask", "mask PNG"))
    new_total = sum(per[(s, "now")] for s in ("prepare", "postprocess", "restore_mask", "mask PNG"))
    print(f"| {'total (prepare + post + restore + PNG)':<40} | {old_total:>9.3f} | {new_total:>6.3f} | "
          f"{old_total / new_total:>11.1f}x |")
    print(f"\nrestored pixels differing from the Pillow path: {100 * extra['differ']:.5f} %; "
          f"mask PNG {extra['old_kb']:.1f} KB (Pillow) -> {extra['new_kb']:.1f} KB")


def print_zlib(masks: list[np.ndarray], repeat: int) -> None:
    from dermtool.io import _up_filtered

    settings = [("level 1 (memLevel 8, zlib's default)", 1, 8, zlib.Z_DEFAULT_STRATEGY),
                ("level 6 (zlib's default level)", 6, 8, zlib.Z_DEFAULT_STRATEGY),
                ("Z_RLE, memLevel 9", 1, 9, zlib.Z_RLE), ("Z_RLE, memLevel 8", 1, 8, zlib.Z_RLE),
                ("Z_RLE, memLevel 5 (used)", 1, 5, zlib.Z_RLE), ("Z_RLE, memLevel 1", 1, 1, zlib.Z_RLE)]
    rows = [_up_filtered(m) for m in masks]
    print(f"\nzlib on the Up-filtered masks ({len(masks)} original-size masks; ms per mask, mean of {repeat} runs)\n")
    ms, size = np.zeros(len(settings)), np.zeros(len(settings))
    for _ in range(repeat):
        for r in rows:  # settings alternate, so load changes hit each alike
            for i, (_, level, mem_level, strategy) in enumerate(settings):
                start = time.process_time()
                packer = zlib.compressobj(level, zlib.DEFLATED, 15, mem_level, strategy)
                size[i] += len(packer.compress(r) + packer.flush())
                ms[i] += (time.process_time() - start) * 1e3
    print("| setting | ms | KB |\n|---|---:|---:|")
    for i, (name, *_) in enumerate(settings):
        print(f"| {name} | {ms[i] / (repeat * len(rows)):.2f} | {size[i] / (repeat * len(rows)) / 1e3:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder holding val/images and val_fullres/images (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each stage per image (default: %(default)s)")
    args = parser.parse_args(argv)

    folders = [(name, args.data / name / "images") for name in SETS if (args.data / name / "images").is_dir()]
    if not folders:
        print(f"skipped: no {' or '.join(SETS)} images under {args.data.resolve()} (the real ISIC 2017 data is needed).")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from dermtool.data import find_images
    from dermtool.infer import default_model_dir, load_model
    from dermtool.postprocess import PostprocessConfig
    from dermtool.preprocess import restore_mask

    model_dir = args.model or default_model_dir()
    model, cfg = load_model(model_dir)
    post = PostprocessConfig(threshold=cfg.threshold)
    print(f"model {model_dir} ({cfg.size} px, fit {cfg.fit}); post-processing {post.to_dict()}")
    print(f"CPU cores: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.1f}")
    full_masks = []
    for name, folder in folders:
        paths = find_images(folder)
        for p in paths:  # read every file once so no stage pays for a cold disk cache
            p.read_bytes()
        clock = Clock()
        items = predict(model, cfg, paths, clock, args.repeat)
        extra = time_stages(items, post, clock, args.repeat)
        print_stages(f"{name} ({folder})", len(items), clock, args.repeat, extra)
        if name == "val_fullres":
            from dermtool.postprocess import postprocess

            full_masks = [restore_mask(postprocess(prob, post), t) for prob, t in items]
    if full_masks:
        print_zlib(full_masks, args.repeat)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
