"""What post-processing, the mask threshold and test-time augmentation do to a model's validation scores.

Runs the real `dermtool infer` once per variant on a validation folder and scores each with
`dermtool score`, printing one table (JAC, thresholded JAC, Dice, BACC, melanoma SE, mean
performance, images/s). Use it to choose a bundled model's inference defaults.

    python bench/postprocess_ablation.py --model weights/isic-ham-lite0-joint-192
    python bench/postprocess_ablation.py --model runs/joint160 --val ../shared/data/isic2017/val
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "threshold only": ["--closing-radius", "0", "--all-components", "--no-fill-holes"],
    "+ closing": ["--all-components", "--no-fill-holes"],
    "+ largest component": ["--no-fill-holes"],
    "+ hole filling (default)": [],
    "default, threshold 0.3": ["--threshold", "0.3"],
    "default, threshold 0.4": ["--threshold", "0.4"],
    "default, threshold 0.6": ["--threshold", "0.6"],
    "default + TTA 4 (flips)": ["--tta", "4"],
    "default + TTA 8 (dihedral)": ["--tta", "8"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled one)")
    parser.add_argument("--val", type=Path, default=root.parent / "shared/data/isic2017/val")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args()
    if not (args.val / "images").is_dir():
        print(f"skipped: no validation data at {args.val}")
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="dermtool-ablation-") as tmp:
        for name, extra in VARIANTS.items():
            out = Path(tmp) / name.replace(" ", "_").replace("(", "").replace(")", "")
            cmd = ["dermtool", "infer", str(args.val / "images"), "--out", str(out), *extra]
            if args.model:
                cmd += ["--model", str(args.model)]
            subprocess.run(cmd, check=True, capture_output=True)
            score_json = out / "score.json"
            subprocess.run(["dermtool", "score", str(out / "predictions.csv"), str(args.val / "labels.csv"),
                            "--pred-masks", str(out), "--truth-masks", str(args.val / "masks"),
                            "--json", str(score_json)], check=True, capture_output=True)
            s = json.loads(score_json.read_text())
            speed = json.loads((out / "infer.json").read_text())["images_per_second"]
            seg, cls = s["segmentation"], s.get("classification") or {}
            rows.append({
                "variant": name, "jac": seg["jac"], "jac_thresholded": seg["jac_thresholded"], "dice": seg["dice"],
                "bacc": cls.get("bacc"), "mel_se": (cls.get("per_class") or {}).get("melanoma", {}).get("sensitivity"),
                "mean_performance": s.get("mean_performance"), "images_per_second": speed,
            })
            print(f"{name}: JAC {seg['jac']:.4f}", file=sys.stderr, flush=True)
    print(f"\n{args.val} ({len(rows)} variants), model {args.model or 'bundled'}")
    cols = ["jac", "jac_thresholded", "dice", "bacc", "mel_se", "mean_performance", "images_per_second"]
    print(f"{'variant':<28}" + "".join(f"{c[:12]:>13}" for c in cols))
    for r in rows:
        print(f"{r['variant']:<28}" + "".join(f"{r[c]:>13.4f}" if r[c] is not None else f"{'-':>13}" for c in cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
