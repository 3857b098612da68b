"""Score models on both validation sets the way a user would: `dermtool infer`, then `dermtool score`.

The two validation sets of the model card:
- ISIC 2017 validation (150 images, ../shared/data/isic2017/val);
- the HAM10000 holdout by lesion: the val.txt of `dermtool split ../shared/data/ham10000
  --out SPLIT --fraction 0.1 --seed 0` (1,005 images of 749 lesions; 903 carry one of the
  three labels and count for classification, all 1,005 for segmentation).

For each model (and each --tta value) it runs the real commands, keeps their JSON, and prints
one markdown row per (model, set): JAC, BACC, melanoma AUC, SE and SK AUC with bootstrap 95 %
intervals, and the images/s infer reported.

    python bench/validation.py weights/isic-ham-lite0-joint-192 runs/other --split /work/data/ham-split \\
        --work /tmp/val --bootstrap 1000 --tta 1 --tta 4
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path


def ham_val_folder(ham: Path, split: Path, work: Path, name: str = "ham-val") -> Path:
    """A folder of links to the holdout images and masks, and its truth CSV (labelled images only)."""
    folder = work / name
    from dermtool.io import read_text

    ids = [i for i in read_text(split / "val.txt", "id list").split() if i]
    for sub, name in (("images", "{}.jpg"), ("masks", "{}_segmentation.png")):
        if not (ham / sub).is_dir():  # ISIC 2020 has no masks
            continue
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for i in ids:
            link = folder / sub / name.format(i)
            try:  # another validation.py on the same --work may have made it meanwhile
                link.symlink_to((ham / sub / name.format(i)).resolve())
            except FileExistsError:
                pass
    keep = set(ids)
    with open(ham / "labels.csv", newline="") as fh, open(folder / "labels.csv", "w", newline="") as out:
        reader = csv.reader(fh)
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(next(reader))
        writer.writerows(r for r in reader if r and r[0] in keep)
    return folder


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def evaluate(model: Path, data: Path, out: Path, tta: int, bootstrap: int) -> dict:
    """infer on `data`, then the scorer on what the model predicts (masks and/or classes)."""
    from dermtool.config import load_config
    from dermtool.score import score

    cfg, _, _ = load_config(model)
    if not (out / "masks" / "predictions.csv").is_file():
        run(["dermtool", "infer", str(data / "images"), "--out", str(out / "masks"), "--model", str(model),
             "--tta", str(tta)])
    if not (out / "score.json").is_file():
        # dermtool score's own function, so a seg-only or cls-only model is scored on its task
        result = score(out / "masks" / "predictions.csv" if cfg.has_cls else None,
                       data / "labels.csv" if cfg.has_cls else None,
                       out / "masks" if cfg.has_seg and (data / "masks").is_dir() else None,
                       data / "masks" if cfg.has_seg and (data / "masks").is_dir() else None,
                       bootstrap=bootstrap)
        (out / "score.json").write_text(json.dumps(result, indent=2))
    result = json.loads((out / "score.json").read_text())
    info = json.loads((out / "masks" / "infer.json").read_text())
    result["images_per_second"] = info.get("images_per_second")
    return result


def _ci(value, ci) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else "")


def row(name: str, dataset: str, tta: int, r: dict) -> str:
    seg, cls = r.get("segmentation"), r.get("classification")
    cells = [name, dataset, str(tta), _ci(seg["jac"], seg.get("jac_ci95")) if seg else "–"]
    if cls:
        mel, sk = cls["per_class"]["melanoma"], cls["per_class"]["seborrheic_keratosis"]
        auc_ci = cls.get("auc_ci95") or {}
        cells += [_ci(cls["bacc"], cls.get("bacc_ci95")), _ci(mel["auc"], auc_ci.get("melanoma")),
                  f"{mel['sensitivity']:.3f}", _ci(sk["auc"], auc_ci.get("seborrheic_keratosis"))]
    else:
        cells += ["–"] * 4
    cells.append(f"{r['images_per_second']:.1f}" if r.get("images_per_second") else "–")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--isic-val", type=Path, help="default: ../shared/data/isic2017/val beside the repository")
    parser.add_argument("--ham", type=Path, help="default: ../shared/data/ham10000 beside the repository")
    parser.add_argument("--split", type=Path, required=True, help="folder written by dermtool split (val.txt)")
    parser.add_argument("--isic2020", type=Path, help="default: ../shared/data/isic2020 beside the repository")
    parser.add_argument("--isic2020-split", type=Path,
                        help="dermtool split ISIC2020 --group patient_id --fraction 0.5 --seed 0: adds its val side")
    parser.add_argument("--work", type=Path, required=True, help="folder for the outputs (reused when present)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--tta", type=int, action="append", help="repeat for several (default 1)")
    args = parser.parse_args()
    given = [name for name in ("isic_val", "ham", "isic2020") if getattr(args, name) is not None]
    args.isic_val = args.isic_val or root.parent / "shared/data/isic2017/val"
    args.ham = args.ham or root.parent / "shared/data/ham10000"
    args.isic2020 = args.isic2020 or root.parent / "shared/data/isic2020"
    missing = [path for path in (args.isic_val, args.ham) if not (path / "images").is_dir()]
    if args.isic2020_split and not (args.isic2020 / "images").is_dir():
        missing.append(args.isic2020)
    where = ", ".join(map(str, missing))
    if missing and given:  # data was named: a script scoring on it must not go on quietly
        sys.exit(f"error: no images/ folder in {where}: the validation data is absent there "
                 "(--isic-val, --ham and --isic2020 name where it is).")
    if missing:
        print(f"skipped: no validation data (no images/ folder in {where})")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sets = {"ISIC 2017 val": args.isic_val, "HAM10000 holdout": ham_val_folder(args.ham, args.split, args.work)}
    if args.isic2020_split:
        sets["ISIC2020 patient holdout"] = ham_val_folder(args.isic2020, args.isic2020_split, args.work, "i20-val")
    lines = ["| model | set | TTA | JAC | BACC | melanoma AUC | melanoma SE | SK AUC | images/s |",
             "|---|---|---:|---|---|---|---:|---|---:|"]
    results = {}
    for model in args.models:
        for tta in args.tta or [1]:
            for label, data in sets.items():
                out = args.work / f"{model.name}-tta{tta}-{label.split()[0].lower()}"
                r = evaluate(model, data, out, tta, args.bootstrap)
                results[f"{model}|{label}|{tta}"] = r
                lines.append(row(model.name, label, tta, r))
    (args.work / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from dermtool.errors import InputError

    try:
        main()
    except InputError as exc:  # a wrong model or split folder: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
