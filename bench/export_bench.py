"""Exported engines against the Keras model: speed of the real `dermtool infer`, and accuracy.

1. Model only (the issue's starting measurement): the network on random inputs at its input
   size, batch 8, through Keras `predict_on_batch`, LiteRT float32, LiteRT dynamic-range int8
   and the mixed-int8 file the model folder carries (MODEL/litert/, if any), all XNNPACK;
   images/s and the largest probability difference from Keras.
2. End to end: `dermtool export` writes each engine's model into a temporary folder ("litert"
   is `infer --engine litert` on the model folder itself: the export it carries, else a
   dynamic-range copy), then the real `dermtool infer` command runs once per engine and input set (256 px validation images,
   original-size JPEGs), the engines taking turns round by round so that a load change on the
   machine hits them alike. images/s is the command's own figure from infer.json (decode,
   model, post-processing, writing; model load excluded); the ratio is against the Keras run
   of the same round, and the best round of each engine is reported.
3. Accuracy: every engine's validation output is scored by `dermtool score` (JAC, BACC,
   melanoma AUC) and printed beside the Keras figures, with the issue's targets checked:
   >= 2.5x on the 256 px set, >= 1.5x on the original JPEGs, JAC within 0.005, BACC within 0.01.

    python bench/export_bench.py                       # bundled model, ../shared/data/isic2017
    python bench/export_bench.py --engines keras,litert-dynamic --rounds 3
    python bench/export_bench.py --calibration ../shared/data/isic2017/train/images  # adds int8, mixed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data" / "isic2017"
#: engine label -> `dermtool export` options (None: the Keras model folder itself)
ENGINES = {
    "keras": None,
    "litert": "engine",  # infer --engine litert on the model folder
    "litert-dynamic": ["--format", "tflite", "--quantize", "dynamic"],
    "litert-float32": ["--format", "tflite"],
    "litert-float16": ["--format", "tflite", "--quantize", "float16"],
    "litert-int8": ["--format", "tflite", "--quantize", "int8"],  # needs --calibration
    "litert-mixed": ["--format", "tflite", "--quantize", "mixed"],  # needs --calibration
    "onnx": ["--format", "onnx"],
}
TARGETS = {"val": 2.5, "fullres": 1.5}


def dermtool(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dermtool", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode not in (0, 1):
        raise SystemExit(f"dermtool {args[0]} exited {proc.returncode}:\n{proc.stderr[-1500:]}")
    return proc


def model_only(model_dir: Path, work: Path, n: int = 64, batch: int = 8) -> list[tuple]:
    """Rows (engine, images/s, largest difference) for the network alone on random inputs."""
    import numpy as np

    from dermtool.export import compare_outputs
    from dermtool.modelio import KerasEngine, load_engine, shipped_export, write_export

    keras = KerasEngine(model_dir)
    s = keras.cfg.input_size
    x = np.random.default_rng(0).uniform(0, 255, (n, s, s, 3)).astype(np.float32)
    engines = [("keras", keras)]
    for label, quantize in (("litert float32", "none"), ("litert dynamic int8", "dynamic")):
        write_export(model_dir, work / label.replace(" ", "-"), "tflite", quantize)
        engines.append((label, load_engine(work / label.replace(" ", "-"))))
    if shipped_export(model_dir, "litert"):
        engines.append(("litert carried (MODEL/litert)", load_engine(model_dir, "litert")))
    rows = []
    for label, engine in engines:
        engine.predict_on_batch(x[:batch])
        started = time.perf_counter()
        for i in range(0, n, batch):
            engine.predict_on_batch(x[i:i + batch])
        speed = n / (time.perf_counter() - started)
        diff = compare_outputs(keras, engine, x, keras.cfg.threshold) if label != "keras" else {}
        rows.append((label, speed, max((diff.get(k, 0.0) for k in ("seg", "cls")), default=0.0)))
    return rows


def repeated(images: Path, times: int, folder: Path) -> Path:
    """A folder of links to every image of `images`, `times` over under distinct names."""
    from dermtool.data import find_images

    folder.mkdir()
    for k in range(times):
        for path in find_images(images):
            (folder / f"{path.stem}_r{k}{path.suffix}").symlink_to(path.resolve())
    return folder


def score(out: Path, val_root: Path) -> dict:
    report = out / "score.json"
    dermtool("score", out / "predictions.csv", val_root / "labels.csv", "--pred-masks", out,
             "--truth-masks", val_root / "masks", "--json", report)
    result = json.loads(report.read_text())
    cls = result["classification"]
    return {"JAC": result["segmentation"]["jac"], "BACC": cls["bacc"],
            "AUC": cls["per_class"]["melanoma"]["auc"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Model folder (default: the bundled model).")
    parser.add_argument("--val", type=Path, default=DATA / "val", help="Labelled folder: images/, masks/, labels.csv.")
    parser.add_argument("--fullres", type=Path, default=DATA / "val_fullres" / "images",
                        help="Folder of the original-size JPEGs themselves, timed only (not a labelled folder "
                             "like --val: no images/ inside; default: ../shared/data/isic2017/val_fullres/images).")
    parser.add_argument("--engines", default="keras,litert,litert-dynamic,litert-float32,onnx")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="Images for litert-int8 and litert-mixed (both added when given).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fullres-repeat", type=int, default=4,
                        help="Time the original JPEGs this many times over (links under new names): "
                             "17 files alone take a few seconds, too short to time on a busy machine.")
    parser.add_argument("--no-model-only", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model is None:
        from dermtool.modelio import default_model_dir

        args.model = default_model_dir()
    if not (args.val / "images").is_dir() or not args.fullres.is_dir():
        print(f"skipped: {args.val}/images or {args.fullres} not found")
        return 0
    engines = args.engines.split(",") + (["litert-int8", "litert-mixed"] if args.calibration else [])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.no_model_only:
            print("model only, random inputs, batch 8:")
            for label, speed, diff in model_only(args.model, work / "model_only"):
                print(f"  {label:<22} {speed:7.1f} images/s   largest difference {diff:.3g}")
        models = {}
        for label in engines:
            if ENGINES[label] in (None, "engine"):
                models[label] = args.model
                continue
            extra = ["--calibration", args.calibration] if label in ("litert-int8", "litert-mixed") else []
            proc = dermtool("export", args.model, "--out", work / label, *ENGINES[label], *extra)
            print(f"{label}: {proc.stdout.strip().splitlines()[-1]}")
            models[label] = work / label
        sets = {"val": args.val / "images", "fullres": repeated(args.fullres, args.fullres_repeat, work / "fullres")}
        speed: dict = {}
        for r in range(args.rounds):
            for set_label, images in sets.items():
                for label in engines:
                    out = work / f"out-{label}-{set_label}"
                    engine = ["--engine", "litert"] if ENGINES[label] == "engine" else []
                    dermtool("infer", images, "--out", out, "--model", models[label], *engine)
                    ips = json.loads((out / "infer.json").read_text())["images_per_second"]
                    speed.setdefault((label, set_label), []).append(ips)
                    print(f"  round {r + 1} {set_label:<8} {label:<16} {ips:6.1f} images/s", flush=True)
        scores = {label: score(work / f"out-{label}-val", args.val) for label in engines}
    report(engines, speed, scores, args.rounds)
    return 0


def report(engines, speed, scores, rounds) -> None:
    ref = scores["keras"]
    print(f"\nend to end (dermtool infer), best of {rounds} rounds; ratio against keras in the same round")
    print(f"{'engine':<16} {'val 256 px':>11} {'ratio':>6} {'full-res':>9} {'ratio':>6} "
          f"{'JAC':>7} {'dJAC':>7} {'BACC':>7} {'dBACC':>7} {'mel AUC':>8}  targets")
    for label in engines:
        cells, ok = [], True
        for set_label in ("val", "fullres"):
            mine, base = speed[(label, set_label)], speed[("keras", set_label)]
            ratio = max(m / b for m, b in zip(mine, base))
            cells += [f"{max(mine):11.1f}" if set_label == "val" else f"{max(mine):9.1f}", f"{ratio:5.2f}x"]
            ok &= ratio >= TARGETS[set_label]
        s = scores[label]
        d_jac, d_bacc = s["JAC"] - ref["JAC"], s["BACC"] - ref["BACC"]
        ok &= abs(d_jac) <= 0.005 and abs(d_bacc) <= 0.01
        print(f"{label:<16} {' '.join(cells)} {s['JAC']:7.4f} {d_jac:+7.4f} {s['BACC']:7.4f} {d_bacc:+7.4f} "
              f"{s['AUC']:8.4f}  {'-' if label == 'keras' else ('met' if ok else 'missed')}")


if __name__ == "__main__":
    sys.exit(main())
