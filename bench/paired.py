"""Is model B better than model A on the same images? Paired bootstrap of the differences.

Reads what `bench/validation.py` left in its --work folder for each model and set (the real
`dermtool infer` predictions and `dermtool score`'s per-image JAC), resamples the images of a
set with replacement, and recomputes B - A on each resample: JAC, BACC, melanoma AUC, and on a
set with a metadata.csv of benign_malignant (ISIC 2020) melanoma-vs-benign AUC over all its
images, the benign ones without a diagnosis included. Two intervals that overlap do not show
"no difference"; the interval of the difference does.

    python bench/paired.py --work /tmp/val --a isic-ham-lite0-joint-192 --b run1-model \\
        --isic2020 ../shared/data/isic2020 --resamples 2000

A name joined by "+" (`--a final+other`) is the ensemble of those models: the mean of their class
probabilities, image by image (masks and JAC: the first model's). It prices a second view
against a second whole-frame model at the same cost of two forward passes.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from dermtool.metrics import balanced_accuracy, confusion_matrix, roc_auc

SETS = {"isic": "ISIC 2017 val", "ham10000": "HAM10000 holdout", "isic2020": "ISIC 2020 patient holdout"}
CLASSES = ("melanoma", "seborrheic_keratosis", "nevus")


def _probs(folder: Path) -> dict[str, np.ndarray]:
    with open(folder / "masks" / "predictions.csv", newline="") as fh:
        return {r["image_id"]: np.array([float(r[c]) for c in CLASSES]) for r in csv.DictReader(fh)}


def _truth(labels: Path) -> dict[str, int]:
    from dermtool.data import truth_class
    from dermtool.io import read_class_csv

    return {i: truth_class(row) for i, row in read_class_csv(labels, role="truth").items()}


def _benign(metadata: Path | None) -> dict[str, int]:
    """image_id -> 1 melanoma, 0 benign (any diagnosis), from benign_malignant."""
    if metadata is None or not metadata.is_file():
        return {}
    with open(metadata, newline="") as fh:
        return {r["image_id"]: int(r["benign_malignant"] == "malignant") for r in csv.DictReader(fh)
                if r.get("benign_malignant") in ("benign", "malignant")}


def _jacs(folder: Path) -> dict[str, float]:
    per_image = json.loads((folder / "score.json").read_text()).get("segmentation") or {}
    return {Path(k).name.replace("_segmentation.png", ""): v for k, v in (per_image.get("per_image") or {}).items()}


def figures(pa, pb, truth, ids, mal, jac_a, jac_b) -> dict:
    out = {}
    if ids:
        t = np.array([truth[i] for i in ids])
        a = np.stack([pa[i] for i in ids])
        b = np.stack([pb[i] for i in ids])
        out["BACC"] = (balanced_accuracy(confusion_matrix(t, a.argmax(1), 3)),
                       balanced_accuracy(confusion_matrix(t, b.argmax(1), 3)))
        if 0 < (t == 0).sum() < len(t):
            out["mel AUC"] = (roc_auc(t == 0, a[:, 0]), roc_auc(t == 0, b[:, 0]))
    if mal:
        m = sorted(mal)
        y = np.array([mal[i] for i in m])
        out["mel-vs-benign AUC"] = (roc_auc(y == 1, np.array([pa[i][0] for i in m])),
                                    roc_auc(y == 1, np.array([pb[i][0] for i in m])))
    if jac_a and jac_b:
        common = sorted(set(jac_a) & set(jac_b))
        out["JAC"] = (float(np.mean([jac_a[i] for i in common])), float(np.mean([jac_b[i] for i in common])))
    return out


def _mean_probs(folders: list[Path]) -> dict[str, np.ndarray]:
    """The ensemble's class probabilities: the mean over the models, on the images all of them have."""
    each = [_probs(f) for f in folders]
    return {i: np.mean([p[i] for p in each], axis=0) for i in each[0] if all(i in p for p in each)}


def _folders(work: Path, name: str, tta: int, key: str) -> list[Path]:
    return [work / f"{part}-tta{tta}-{key}" for part in name.split("+")]


def compare(fa, fb, labels: Path, metadata: Path | None, resamples: int, seed: int) -> dict:
    fa, fb = ([fa] if isinstance(fa, Path) else fa), ([fb] if isinstance(fb, Path) else fb)
    pa, pb = _mean_probs(fa), _mean_probs(fb)
    truth = {i: c for i, c in _truth(labels).items() if i in pa and i in pb}
    mal = {i: v for i, v in _benign(metadata).items() if i in pa and i in pb}
    jac_a, jac_b = _jacs(fa[0]), _jacs(fb[0])
    ids = sorted(set(pa) & set(pb))
    point = figures(pa, pb, truth, [i for i in ids if i in truth], mal, jac_a, jac_b)
    rng = np.random.default_rng(seed)
    diffs = {k: [] for k in point}
    for _ in range(resamples):
        pick = [ids[k] for k in rng.integers(0, len(ids), len(ids))]
        # an image drawn twice counts twice: keys get a suffix per draw
        sa = {f"{i}#{n}": pa[i] for n, i in enumerate(pick)}
        sb = {f"{i}#{n}": pb[i] for n, i in enumerate(pick)}
        st = {f"{i}#{n}": truth[i] for n, i in enumerate(pick) if i in truth}
        sm = {f"{i}#{n}": mal[i] for n, i in enumerate(pick) if i in mal}
        ja = {f"{i}#{n}": jac_a[i] for n, i in enumerate(pick) if i in jac_a}
        jb = {f"{i}#{n}": jac_b[i] for n, i in enumerate(pick) if i in jac_b}
        try:
            f = figures(sa, sb, st, sorted(st), sm, ja, jb)
        except (ValueError, ZeroDivisionError):
            continue
        for k in diffs:
            if k in f and None not in f[k]:
                diffs[k].append(f[k][1] - f[k][0])
    return {k: (point[k][0], point[k][1], np.percentile(diffs[k], [2.5, 97.5]) if diffs[k] else None) for k in point}


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="bench/validation.py's --work folder")
    parser.add_argument("--a", required=True, help="reference model folder name")
    parser.add_argument("--b", required=True, nargs="+", help="model folder name(s) compared with A")
    parser.add_argument("--tta", type=int, default=1)
    parser.add_argument("--isic-val", type=Path, default=root.parent / "shared/data/isic2017/val")
    parser.add_argument("--isic2020", type=Path, default=root.parent / "shared/data/isic2020")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| B | set | figure | A | B | B - A [95 % paired] |")
    print("|---|---|---|---:|---:|---|")
    for b in args.b:
        for key, title in SETS.items():
            fa, fb = _folders(args.work, args.a, args.tta, key), _folders(args.work, b, args.tta, key)
            if not all((f / "masks" / "predictions.csv").is_file() for f in fa + fb):
                continue
            labels = args.isic_val / "labels.csv" if key == "isic" else args.work / (
                "ham-val" if key == "ham10000" else "i20-val") / "labels.csv"
            metadata = args.isic2020 / "metadata.csv" if key == "isic2020" else None
            for name, (va, vb, ci) in compare(fa, fb, labels, metadata, args.resamples, args.seed).items():
                interval = f"{vb - va:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci is not None else f"{vb - va:+.3f}"
                print(f"| {b} | {title} | {name} | {va:.3f} | {vb:.3f} | {interval} |")


if __name__ == "__main__":
    main()
