"""Does averaging two models' lesion probabilities beat either model alone?

Loads both models the way `dermtool infer` does, predicts each validation image with both, and
turns each model's probability map and their mean into a mask with infer's own path
(dermtool.postprocess defaults at the model's size, then restore_mask to the original size).
Prints the mean per-image Jaccard (dermtool.metrics) of all three. Used to decide whether
bundling two models and averaging them is worth twice the inference time.

    python bench/ensemble_check.py weights/isic-ham-lite0-joint-192 runs/other
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dermtool.data import find_images, image_id_of
from dermtool.infer import load_model
from dermtool.io import read_mask
from dermtool.metrics import jaccard
from dermtool.postprocess import postprocess
from dermtool.preprocess import prepare, restore_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("model_a", type=Path)
    parser.add_argument("model_b", type=Path)
    parser.add_argument("--val", type=Path, default=root.parent / "shared/data/isic2017/val")
    args = parser.parse_args()
    if not (args.val / "images").is_dir():
        print(f"skipped: no validation data at {args.val}")
        return
    (model_a, cfg), (model_b, cfg_b) = load_model(args.model_a), load_model(args.model_b)
    geometry = (cfg.size, cfg.fit, cfg.border, cfg.margin)
    if geometry != (cfg_b.size, cfg_b.fit, cfg_b.border, cfg_b.margin) or not (cfg.has_seg and cfg_b.has_seg):
        raise SystemExit("both models must segment and share size, fit, border and margin")
    scores = {"model A": [], "model B": [], "mean of A and B": []}
    for path in find_images(args.val / "images"):
        x, t = prepare(path, *geometry)
        a = np.asarray(model_a.predict_on_batch(x[None].astype(np.float32))["seg"])[0, ..., 0]
        b = np.asarray(model_b.predict_on_batch(x[None].astype(np.float32))["seg"])[0, ..., 0]
        truth = read_mask(args.val / "masks" / f"{image_id_of(path)}_segmentation.png")
        for name, prob in (("model A", a), ("model B", b), ("mean of A and B", (a + b) / 2)):
            scores[name].append(jaccard(restore_mask(postprocess(prob), t), truth))
    print(f"A = {args.model_a}, B = {args.model_b}, {len(scores['model A'])} validation images")
    print("| masks from | mean JAC |\n|---|---:|")
    for name, values in scores.items():
        print(f"| {name} | {np.mean(values):.4f} |")


if __name__ == "__main__":
    main()
