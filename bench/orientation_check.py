"""Does the diagnosis depend on which way up the lesion is? One image, its 8 symmetries, one answer.

A dermoscopy image has no "up": a lesion turned by 90 degrees or mirrored is the same lesion.
This script runs each model (through `dermtool.load_model`, the code `infer` runs) on the 8
flips and rotations of every square image in a folder and reports how far the 8 answers lie
apart: the mean over images of the standard deviation of p(melanoma) over the 8 views, the mean
largest minus smallest p(melanoma), and the share of images whose argmax label is the same in
all 8 views. `infer --tta 8` averages exactly these views.

    python bench/orientation_check.py --model weights/isic-ham-lite0-joint-192 --model runs/x \\
        --images ../shared/data/isic2017/val/images

With several --model, a last table gives each model's difference from the first with a 95 %
bootstrap interval that resamples images (paired: the same images for both). Only square
images are used, so turning one does not change how it is squashed to the model's square.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def views(rgb: np.ndarray) -> list[np.ndarray]:
    from dermtool.augment import dihedral

    return [np.ascontiguousarray(dihedral(rgb, k)) for k in range(8)]


def spread(model_dir: str, images: list[np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Per image: std and range of p(melanoma) over the 8 views, and whether all 8 argmax agree."""
    import dermtool

    model = dermtool.load_model(model_dir)
    sd, rng, agree = [], [], []
    for rgb in images:
        preds = model.predict(views(rgb), batch_size=batch)
        p_mel = np.array([p.probabilities["melanoma"] for p in preds])
        labels = {max(p.probabilities, key=p.probabilities.get) for p in preds}
        sd.append(p_mel.std())
        rng.append(p_mel.max() - p_mel.min())
        agree.append(len(labels) == 1)
    return {"sd": np.array(sd), "range": np.array(rng), "agree": np.array(agree, float)}


def square_images(folder: Path) -> tuple[list[np.ndarray], int]:
    """The square images of `folder`, decoded as dermtool decodes them, and how many it holds;
    a file that is not a readable image is named on stderr and left out."""
    from dermtool.data import find_images
    from dermtool.errors import InputError
    from dermtool.preprocess import load_image

    files = find_images(folder)
    images = []
    for path in files:
        try:
            rgb, _ = load_image(path)
        except InputError as exc:
            print(f"skipped: {exc}", file=sys.stderr)
            continue
        if rgb.shape[0] == rgb.shape[1]:
            images.append(rgb)
    return images, len(files)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="a model folder (repeat to compare)")
    ap.add_argument("--images", required=True, type=Path, help="a folder of images; square ones are used")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from dermtool.errors import InputError

    try:
        images, found = square_images(a.images)
        if not images:
            raise InputError(f"{a.images}: no square images to turn")
        results = {m: spread(m, images, a.batch) for m in a.model}
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(images)} square images of {found} in {a.images}, 8 views each\n")
    print("| model | mean sd of p(mel) over 8 views | mean max - min | all 8 argmax agree |")
    print("|---|---:|---:|---:|")
    for m, r in results.items():
        print(f"| {Path(m).name} | {r['sd'].mean():.4f} | {r['range'].mean():.4f} | {r['agree'].mean():.3f} |")
    if len(a.model) > 1:
        base = results[a.model[0]]
        gen = np.random.default_rng(a.seed)
        idx = gen.integers(0, len(images), size=(a.resamples, len(images)))
        print(f"\n| model − {Path(a.model[0]).name} | sd of p(mel) [95 % paired] | max − min | all agree |")
        print("|---|---|---|---|")
        for m in a.model[1:]:
            cells = []
            for key in ("sd", "range", "agree"):
                d = results[m][key] - base[key]
                boot = d[idx].mean(axis=1)
                lo, hi = np.percentile(boot, [2.5, 97.5])
                cells.append(f"{d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]")
            print(f"| {Path(m).name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
