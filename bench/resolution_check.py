"""Does the diagnosis depend on how the image was resampled? One lesion, many copies, one answer.

Runs the real `dermtool infer` on the original JPEGs of a folder and on copies of the same
images, then compares each copy's predictions with the originals' on the same images:

- `copy`: the copies someone else made (e.g. ../shared/data/isic2017/val, 256 x 256 squashed);
- copies this script derives from the originals: the whole frame scaled by 1/2 and 1/4
  (aspect kept) or squashed to 256 x 256, each saved as JPEG at quality 90, and the quarter
  and 256 px copies also at quality 50.

For each variant it prints label agreement with the originals (of the argmax, and of the CSV's
`label` column, the decision users see: it applies the model's melanoma operating point), the
mean and largest |delta p(melanoma)|, the mean p(melanoma), and BACC, melanoma AUC and SK AUC
against the truth. A last row pools every copy of every image.

    python bench/resolution_check.py --model weights/isic-ham-lite0-joint-192 \\
        --originals ../shared/data/isic2017/val_fullres --copies ../shared/data/isic2017/val \\
        --work /tmp/rescheck

With several --model, a last table compares each with the first on the pooled copies: mean
|delta p(melanoma)|, mean total variation distance of the three probabilities and argmax
agreement, the difference with a 95 % bootstrap interval that resamples images.

`--engine` and `--tta` are passed to infer. Derived copies and predictions are kept in --work,
so a second model reuses the copies.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np

#: name -> (scale of each side, or "256" for a 256 x 256 squash; JPEG quality)
DERIVED = {
    "half-q90": (0.5, 90),
    "quarter-q90": (0.25, 90),
    "256px-q90": ("256", 90),
    "quarter-q50": (0.25, 50),
    "256px-q50": ("256", 50),
}


def derive(originals: Path, out: Path, scale, quality: int) -> Path:
    """JPEG copies of every original at `scale` (antialiased, Pillow's Lanczos)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted((originals / "images").glob("*.jpg")):
        target = out / path.name
        if target.is_file():
            continue
        with Image.open(path) as img:
            img = img.convert("RGB")
            size = (256, 256) if scale == "256" else (round(img.width * scale), round(img.height * scale))
            img.resize(size, Image.LANCZOS).save(target, quality=quality)
    return out


def copies_of(copies: Path, ids: list[str], out: Path) -> Path:
    """A folder of links to the copies of exactly the originals' images."""
    out.mkdir(parents=True, exist_ok=True)
    for i in ids:
        link = out / f"{i}.jpg"
        if not link.exists():
            link.symlink_to((copies / "images" / f"{i}.jpg").resolve())
    return out


def infer(images: Path, out: Path, model: str, engine: str, tta: int) -> dict[str, tuple[np.ndarray, str]]:
    """image_id -> (class probabilities, label column), from `dermtool infer`'s predictions.csv."""
    csv_path = out / "predictions.csv"
    if not csv_path.is_file():
        cmd = ["dermtool", "infer", str(images), "--out", str(out), "--model", model, "--engine", engine,
               "--tta", str(tta)]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
        if code:  # infer has said why on stderr, above
            print(f"error: dermtool infer on {images} exited {code}.", file=sys.stderr)
            sys.exit(code)
    with open(csv_path, newline="") as fh:
        return {r["image_id"]: (np.array([float(r["melanoma"]), float(r["seborrheic_keratosis"]),
                                          float(r["nevus"])]), r["label"]) for r in csv.DictReader(fh)}


def truth_classes(labels: Path) -> dict[str, int]:
    from dermtool.io import read_class_csv
    from dermtool.data import truth_class

    return {i: truth_class(row) for i, row in read_class_csv(labels, role="truth").items()}


def compare(pred: dict, ref: dict, truth: dict, ids: list[str]) -> dict:
    from dermtool.metrics import balanced_accuracy, confusion_matrix, roc_auc

    p = np.stack([pred[i][0] for i in ids])
    r = np.stack([ref[i][0] for i in ids])
    t = np.array([truth[i] for i in ids])
    delta = np.abs(p[:, 0] - r[:, 0])
    return {
        "agree_each": p.argmax(1) == r.argmax(1),
        "tv": 0.5 * np.abs(p - r).sum(axis=1),  # total variation distance of the class probabilities
        "agree": float(np.mean(p.argmax(1) == r.argmax(1))),
        "agree_label": float(np.mean([pred[i][1] == ref[i][1] for i in ids])),
        "delta": delta,
        "mean_dp": float(delta.mean()), "max_dp": float(delta.max()),
        "mean_p": float(p[:, 0].mean()),
        "bacc": float(balanced_accuracy(confusion_matrix(t, p.argmax(1), 3))),
        "mel_auc": float(roc_auc(t == 0, p[:, 0])) if 0 < (t == 0).sum() < len(t) else None,
        "sk_auc": float(roc_auc(t == 1, p[:, 1])) if 0 < (t == 1).sum() < len(t) else None,
    }


def run(model: str, originals: Path, copies: Path | None, work: Path, engine: str, tta: int) -> list[tuple]:
    truth = truth_classes(originals / "labels.csv")
    ids = sorted(p.stem for p in (originals / "images").glob("*.jpg"))
    tag = Path(model).name + f"-{engine}-tta{tta}"
    ref = infer(originals / "images", work / "pred" / tag / "original", model, engine, tta)
    variants = {}
    if copies is not None:
        variants["copy"] = copies_of(copies, ids, work / "copies" / "copy")
    for name, (scale, quality) in DERIVED.items():
        variants[name] = derive(originals, work / "copies" / name, scale, quality)
    rows = [("original", compare(ref, ref, truth, ids))]
    for name, folder in variants.items():
        pred = infer(folder, work / "pred" / tag / name, model, engine, tta)
        rows.append((name, compare(pred, ref, truth, ids)))
    copies_rows = [r for name, r in rows[1:]]
    rows.append(("all copies (pooled)", {
        "agree": float(np.mean([r["agree"] for r in copies_rows])),
        "agree_label": float(np.mean([r["agree_label"] for r in copies_rows])),
        "mean_dp": float(np.mean(np.concatenate([r["delta"] for r in copies_rows]))),
        "max_dp": float(max(r["max_dp"] for r in copies_rows)),
        "mean_p": None, "bacc": None, "mel_auc": None, "sk_auc": None,
        # (copies, images) arrays for the paired comparison of two models
        "delta": np.stack([r["delta"] for r in copies_rows]), "tv": np.stack([r["tv"] for r in copies_rows]),
        "agree_each": np.stack([r["agree_each"] for r in copies_rows])}))
    return rows


PAIRED = (("mean abs dp(mel)", "delta"), ("mean total variation", "tv"), ("labels agree (argmax)", "agree_each"))


def paired_rows(a: dict, b: dict, resamples: int, seed: int = 0) -> list[tuple[str, float, float, float, float]]:
    """B - A on the pooled copies, with a 95 % bootstrap interval that resamples images (each with
    all its copies), since the copies of one image are not independent."""
    rng = np.random.default_rng(seed)
    n = a["delta"].shape[1]
    draws = rng.integers(0, n, size=(resamples, n))
    out = []
    for name, key in PAIRED:
        va, vb = a[key].astype(float).mean(axis=0), b[key].astype(float).mean(axis=0)  # per image
        diff = vb - va
        boot = diff[draws].mean(axis=1)
        out.append((name, float(va.mean()), float(vb.mean()), float(diff.mean()), *np.percentile(boot, [2.5, 97.5])))
    return out


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="model folder (repeat to compare)")
    parser.add_argument("--originals", type=Path, required=True, help="folder with images/ and labels.csv")
    parser.add_argument("--copies", type=Path, help="folder whose images/ holds copies of the same ids")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--engine", default="keras")
    parser.add_argument("--tta", type=int, default=1)
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the paired comparison")
    args = parser.parse_args()
    if not (args.originals / "images").is_dir():
        print(f"skipped: {args.originals / 'images'} not found (the original JPEGs and labels.csv are needed).")
        return
    from dermtool.errors import InputError

    pooled = {}
    print("| model | input | labels agree (argmax) | decisions agree (label column) | mean abs dp(mel) | "
          "max abs dp(mel) | mean p(mel) | BACC | mel AUC | SK AUC |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.model:
        try:
            rows = run(model, args.originals, args.copies, args.work, args.engine, args.tta)
        except InputError as exc:  # a missing or malformed labels.csv: one line, no traceback
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        pooled[model] = rows[-1][1]  # the pooled row carries the per-image arrays
        for name, r in rows:
            print(f"| {Path(model).name} | {name} | {r['agree']:.3f} | {r['agree_label']:.3f} | {r['mean_dp']:.3f} | "
                  f"{r['max_dp']:.3f} | {_f(r['mean_p'])} | {_f(r['bacc'])} | {_f(r['mel_auc'])} | {_f(r['sk_auc'])} |")

    if len(args.model) > 1:  # each later model against the first, on the same images and copies
        first = args.model[0]
        print(f"\n| pooled copies | {Path(first).name} | model | model - {Path(first).name} [95 % CI, images resampled] |")
        print("|---|---:|---:|---|")
        for model in args.model[1:]:
            for name, va, vb, d, lo, hi in paired_rows(pooled[first], pooled[model], args.resamples):
                print(f"| {name}: {Path(model).name} | {va:.3f} | {vb:.3f} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")


if __name__ == "__main__":
    main()
