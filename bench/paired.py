"""Is model B better than model A on the same images? Paired bootstrap of the differences.

Reads what `bench/validation.py` left in its --work folder for each model and set (the real
`dermtool infer` predictions and `dermtool score`'s per-image JAC), resamples the images of a
set with replacement, and recomputes B - A on each resample: JAC, BACC, melanoma AUC, and on a
set with a metadata.csv of benign_malignant (ISIC 2020) melanoma-vs-benign AUC over all its
images, the benign ones without a diagnosis included. Two intervals that overlap do not show
"no difference"; the interval of the difference does.

    python bench/paired.py --work /tmp/val --a isic-ham-lite0-joint-192 --b run1-model \\
        --isic2020 ../shared/data/isic2020 --resamples 2000

`--pairs E1:C1 E2:C2 E3:C3` averages B - A over pairs that differ in one change made on several
seeds, on the same resamples of the images (one seed is not a recipe).

A name joined by "+" (`--a final+other`) is the ensemble of those models: the mean of their class
probabilities, image by image (masks and JAC: the first model's). It prices a second view
against a second whole-frame model at the same cost of two forward passes.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
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


def _on(pick: list[str], pa, pb, truth, mal, jac_a, jac_b) -> dict:
    """`figures` on a list of image ids; an image drawn twice counts twice (keys get a suffix per draw)."""
    def keyed(values):
        return {f"{i}#{n}": values[i] for n, i in enumerate(pick) if i in values}

    st = keyed(truth)
    return figures(keyed(pa), keyed(pb), st, sorted(st), keyed(mal), keyed(jac_a), keyed(jac_b))


def compare_pairs(pairs, labels: Path, metadata: Path | None, resamples: int, seed: int) -> dict:
    """B - A averaged over several (A, B) pairs, on the same resamples of the images.

    One pair is the plain paired comparison. Several pairs are one recipe change made on several
    seeds (A_k and B_k trained alike but for the change, with seed k): the statistic is the mean of
    the pairs' differences, so the seeds' noise averages out and the interval is over images.
    Returns {figure: (mean of A, mean of B, 95 % interval of the mean difference or None)}.
    """
    loaded = []
    for fa, fb in pairs:
        fa, fb = ([fa] if isinstance(fa, Path) else fa), ([fb] if isinstance(fb, Path) else fb)
        loaded.append((_mean_probs(fa), _mean_probs(fb), _jacs(fa[0]), _jacs(fb[0])))
    ids = sorted(set.intersection(*(set(pa) & set(pb) for pa, pb, _, _ in loaded)))
    truth = {i: c for i, c in _truth(labels).items() if i in ids}
    mal = {i: v for i, v in _benign(metadata).items() if i in ids}
    points = [_on(ids, pa, pb, truth, mal, ja, jb) for pa, pb, ja, jb in loaded]
    keys = [k for k in points[0] if all(k in p for p in points)]
    rng = np.random.default_rng(seed)
    diffs = {k: [] for k in keys}
    for _ in range(resamples):
        pick = [ids[k] for k in rng.integers(0, len(ids), len(ids))]
        try:
            each = [_on(pick, pa, pb, truth, mal, ja, jb) for pa, pb, ja, jb in loaded]
        except (ValueError, ZeroDivisionError):
            continue
        for k in diffs:
            if all(k in f and None not in f[k] for f in each):
                diffs[k].append(float(np.mean([f[k][1] - f[k][0] for f in each])))
    return {k: (float(np.mean([p[k][0] for p in points])), float(np.mean([p[k][1] for p in points])),
                np.percentile(diffs[k], [2.5, 97.5]) if diffs[k] else None) for k in keys}


def compare(fa, fb, labels: Path, metadata: Path | None, resamples: int, seed: int) -> dict:
    """B - A on the same images (`compare_pairs` with one pair)."""
    return compare_pairs([(fa, fb)], labels, metadata, resamples, seed)


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="bench/validation.py's --work folder")
    parser.add_argument("--a", help="reference model folder name")
    parser.add_argument("--b", nargs="+", help="model folder name(s) compared with A")
    parser.add_argument("--pairs", nargs="+", metavar="A:B",
                        help="instead of --a/--b: one change made on several seeds (E1:C1 E2:C2 ...); reports "
                             "the mean of the pairs' B - A, resampling the images once for all pairs")
    parser.add_argument("--tta", type=int, default=1)
    parser.add_argument("--isic-val", type=Path, default=root.parent / "shared/data/isic2017/val")
    parser.add_argument("--isic2020", type=Path, default=root.parent / "shared/data/isic2020")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if bool(args.pairs) == bool(args.a or args.b) or (args.a is None) != (args.b is None):
        parser.error("give --a and --b, or --pairs A:B ...")
    if args.pairs:
        if not all(p.count(":") == 1 and all(p.split(":")) for p in args.pairs):
            parser.error("--pairs takes A:B, model folder names joined by one colon")
        comparisons = [(", ".join(p.split(":")[1] for p in args.pairs) + " (mean of B - A)",
                        [tuple(p.split(":")) for p in args.pairs])]
    else:
        comparisons = [(b, [(args.a, b)]) for b in args.b]
    print("| B | set | figure | A | B | B - A [95 % paired] |")
    print("|---|---|---|---:|---:|---|")
    for shown, names in comparisons:
        for key, title in SETS.items():
            pairs = [(_folders(args.work, a, args.tta, key), _folders(args.work, b, args.tta, key)) for a, b in names]
            missing = [f for fa, fb in pairs for f in fa + fb if not (f / "masks" / "predictions.csv").is_file()]
            if missing:  # that set was not run for every model: say so rather than print a shorter table
                print(f"skipped {title}: no {missing[0] / 'masks' / 'predictions.csv'} "
                      f"(run bench/validation.py for that model)", file=sys.stderr)
                continue
            labels = args.isic_val / "labels.csv" if key == "isic" else args.work / (
                "ham-val" if key == "ham10000" else "i20-val") / "labels.csv"
            metadata = args.isic2020 / "metadata.csv" if key == "isic2020" else None
            for name, (va, vb, ci) in compare_pairs(pairs, labels, metadata, args.resamples, args.seed).items():
                interval = f"{vb - va:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci is not None else f"{vb - va:+.3f}"
                print(f"| {shown} | {title} | {name} | {va:.3f} | {vb:.3f} | {interval} |")


if __name__ == "__main__":
    from dermtool.errors import InputError

    try:
        main()
    except InputError as exc:  # a missing truth CSV or predictions: one line, not a traceback
        sys.exit(f"error: {exc}")
