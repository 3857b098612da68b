"""Does averaging two models' lesion probabilities beat either model alone?

Runs the real `dermtool infer --probabilities` with each model on a validation folder, then
post-processes each model's probability maps and their mean with the default post-processing
(dermtool.postprocess) and prints the mean per-image Jaccard (dermtool.metrics) of all three.
Used to decide whether bundling two models and averaging them is worth twice the inference time.

    python bench/ensemble_check.py weights/isic2017-joint-160 runs/joint160-a08
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from dermtool.io import read_mask
from dermtool.metrics import jaccard
from dermtool.postprocess import PostprocessConfig, postprocess


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
    with tempfile.TemporaryDirectory() as tmp:
        outs = []
        for i, model in enumerate((args.model_a, args.model_b)):
            out = Path(tmp) / f"m{i}"
            subprocess.run([sys.executable, "-m", "dermtool", "infer", str(args.val / "images"), "--out", str(out),
                            "--model", str(model), "--probabilities"], check=True, capture_output=True)
            outs.append(out)
        scores = {"model A": [], "model B": [], "mean of A and B": []}
        for prob_a in sorted(outs[0].glob("*_probability.tif")):
            image_id = prob_a.name[: -len("_probability.tif")]
            a = tifffile.imread(prob_a)
            b = tifffile.imread(outs[1] / prob_a.name)
            truth = read_mask(args.val / "masks" / f"{image_id}_segmentation.png")
            for name, prob in (("model A", a), ("model B", b), ("mean of A and B", (a + b) / 2)):
                scores[name].append(jaccard(postprocess(prob, PostprocessConfig()), truth))
    print(f"A = {args.model_a}, B = {args.model_b}, {len(scores['model A'])} validation images")
    print("| masks from | mean JAC |\n|---|---:|")
    for name, values in scores.items():
        print(f"| {name} | {np.mean(values):.4f} |")


if __name__ == "__main__":
    main()
