"""End-to-end speed and memory of `dermtool infer`: the real command, as a user runs it.

For each model (the bundled default or `--model`, and an untrained `thesis` preset joint model
built here: random weights time the same as trained ones) and each input set (the 256 px ISIC
2017 validation images and the original-size JPEGs), run `dermtool infer` in a subprocess and
report:

  seconds      wall time of the whole command (start-up, TensorFlow import, model load included)
  images/s     the command's own figure from infer.json: decode + model + post-processing +
               writing, after the model is loaded
  peak RSS MB  the child's peak resident memory (ru_maxrss)

plus the first model on 100 and on 1000 images (synthetic ~1024x768 JPEGs made with
dermtool.synthetic, a few distinct ones copied to reach the count): memory that stays flat as
the folder grows shows as the same peak RSS. Everything is written under a temporary folder,
never in the repo.

Peak RSS is read per child with os.wait4: it fills the same rusage record as
resource.getrusage(RUSAGE_CHILDREN), but that one holds the maximum over every child waited
for so far, so it could not tell the runs apart. Linux also counts the parent's own peak in a
child's ru_maxrss (the memory it was forked from), so this script stays small: TensorFlow,
the thesis model and the synthetic images are handled in helper processes.

    python bench/infer_bench.py                        # bundled model + thesis preset
    python bench/infer_bench.py --model runs/joint160  # a trained run folder instead
    python bench/infer_bench.py --model weights/isic-ham-lite0-joint-192 --model models/pair --no-thesis
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data" / "isic2017"


@dataclass
class Row:
    model: str
    input_set: str
    images: int
    seconds: float
    images_per_second: float
    peak_rss_mb: float
    failed: int


def run_measured(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run `cmd`; returns (exit code, wall seconds, peak RSS in MB, its stderr tail)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen.wait
        err.seek(0)
        tail = err.read()[-600:]
    return proc.returncode, seconds, usage.ru_maxrss / 1024.0, tail  # ru_maxrss is in KiB on Linux


def bench_one(model_label: str, model_dir: Path | None, set_label: str, images: Path, out: Path,
              batch_size: int) -> Row | None:
    cmd = [sys.executable, "-m", "dermtool", "infer", str(images), "--out", str(out),
           "--batch-size", str(batch_size)]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    print(f"  {model_label} on {set_label} ...", flush=True)
    code, seconds, rss, tail = run_measured(cmd)
    summary_path = out / "infer.json"
    if code not in (0, 1) or not summary_path.is_file():
        print(f"  {model_label} on {set_label}: dermtool infer exited with {code}:\n{tail}")
        return None
    summary = json.loads(summary_path.read_text())
    return Row(model_label, set_label, summary["done"], seconds, summary["images_per_second"], rss,
               len(summary["failed"]))


def limited(images: Path, limit: int, work: Path, name: str) -> Path:
    """The folder itself, or a folder of links to its first `limit` images."""
    from dermtool.data import find_images

    found = find_images(images)
    if not limit or limit >= len(found):
        return images
    folder = work / f"subset_{name}"
    folder.mkdir()
    for path in found[:limit]:
        (folder / path.name).symlink_to(path.resolve())
    return folder


WEIGHT_NAMES = ("best.weights.h5", "model.weights.h5", "last.weights.h5")  # dermtool.modelio.weights_file's order


def snapshot_model(model_dir: Path, work: Path) -> Path | None:
    """Copy config.json and the weights, so a run still training can't swap them mid-read."""
    weights = next((model_dir / n for n in WEIGHT_NAMES if (model_dir / n).is_file()), None)
    if weights is None:
        return None
    copy = work / "model_snapshot"
    copy.mkdir(parents=True)
    shutil.copy2(model_dir / "config.json", copy)
    shutil.copy2(weights, copy / weights.name)
    return copy


def build_thesis_model(folder: Path) -> Path:
    """An untrained thesis-preset joint model folder (572 -> 388 valid U-Net + dense head)."""
    from dermtool.config import preset_config, save_config
    from dermtool.models import build_model

    folder.mkdir()
    cfg = preset_config("thesis", "joint")
    save_config(folder / "config.json", cfg, note="untrained: random weights, for timing only")
    build_model(cfg).save_weights(str(folder / "best.weights.h5"))
    return folder


def synthetic_folder(folder: Path, count: int, distinct: int) -> Path:
    """`count` ~1024x768 synthetic JPEGs: `distinct` made with dermtool.synthetic, then copied."""
    import numpy as np
    from PIL import Image

    from dermtool.synthetic import make_lesion

    folder.mkdir()
    sizes = [(768, 1024), (768, 1024), (1024, 768), (720, 1080)]
    made = []
    for i in range(min(distinct, count)):
        rgb = make_lesion(*sizes[i % len(sizes)], np.random.default_rng([2017, i]))[0]
        path = folder / f"SYN_{i:07d}.jpg"
        Image.fromarray(rgb).save(path, quality=92)
        made.append(path)
    for i in range(len(made), count):
        shutil.copyfile(made[i % len(made)], folder / f"SYN_{i:07d}.jpg")
    return folder


def print_table(rows: list[Row]) -> None:
    header = ("model", "input set", "images", "seconds", "images/s", "peak RSS MB")
    cells = [(r.model, r.input_set, str(r.images) + (f" (+{r.failed} failed)" if r.failed else ""),
              f"{r.seconds:.1f}", f"{r.images_per_second:.1f}", f"{r.peak_rss_mb:.0f}") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", default=None,
                        help="Model or run folder to time (default: the bundled model in weights/); repeat "
                             "to time several in one run (an ensemble against its members, say).")
    parser.add_argument("--val", type=Path, default=DATA / "val" / "images",
                        help="256 px images (default: ../shared/data/isic2017/val/images).")
    parser.add_argument("--val-fullres", type=Path, default=DATA / "val_fullres" / "images",
                        help="Original-size JPEGs (default: ../shared/data/isic2017/val_fullres/images).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-thesis", action="store_true", help="Skip the thesis-preset model.")
    parser.add_argument("--thesis-max-images", type=int, default=0,
                        help="Time the thesis model on the first N images of each set only (0: all).")
    parser.add_argument("--rss-images", type=int, default=1000,
                        help="Images of the memory run (0: skip it).")
    parser.add_argument("--rss-distinct", type=int, default=40,
                        help="Distinct synthetic images of the memory run; the rest are copies.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON.")
    return parser.parse_args(argv)


def helper(*args: str) -> str:
    """Run one of this script's helpers in a child process (keeps this process small)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_helper", *args],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"helper {args[0]} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def run_helper(name: str, *args: str) -> None:
    if name == "thesis":
        print(build_thesis_model(Path(args[0])))
    elif name == "synthetic":
        print(synthetic_folder(Path(args[0]), int(args[1]), int(args[2])))
    elif name == "default-model":
        from dermtool.errors import InputError
        from dermtool.infer import default_model_dir

        try:
            print(default_model_dir())
        except InputError as exc:
            print(f"none: {exc}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_helper"]:
        run_helper(*argv[1:])
        return 0
    args = parse_args(argv)
    sets = []
    for label, folder in (("val 256px", args.val), ("val full-res JPEG", args.val_fullres)):
        if folder.is_dir():
            sets.append((label, folder))
        else:
            print(f"skipping {label}: {folder} not found")
    if not sets and not args.rss_images:
        print(f"skipped: neither {args.val} nor {args.val_fullres} found (the real ISIC 2017 data is needed), "
              "and --rss-images 0 leaves nothing to time.")
        return 0
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="dermtool_infer_bench_") as tmp:
        work = Path(tmp)
        models: list[tuple[str, Path | None, int]] = []
        if args.model:
            for k, model in enumerate(args.model):
                snapshot = snapshot_model(model, work / f"model_{k}") if (model / "config.json").is_file() else None
                if snapshot is None:
                    print(f"error: {model}: not a model folder (config.json and weights).")
                    return 2
                models.append((str(model), snapshot, 0))
        else:
            bundled = helper("default-model")
            if bundled.startswith("none: "):
                print(f"skipping the default model: {bundled[6:]}")
            else:
                models.append((f"default ({Path(bundled).name})", None, 0))
        if not args.no_thesis:
            print("building an untrained thesis-preset joint model ...", flush=True)
            models.append(("thesis (untrained)", Path(helper("thesis", str(work / "thesis_joint"))),
                           args.thesis_max_images))
        for m, (model_label, model_dir, limit) in enumerate(models):
            for s, (set_label, folder) in enumerate(sets):
                images = limited(folder, limit, work, f"{m}_{s}")
                row = bench_one(model_label, model_dir, set_label, images, work / f"out_{m}_{s}",
                                args.batch_size)
                if row:
                    rows.append(row)
                shutil.rmtree(work / f"out_{m}_{s}", ignore_errors=True)
        if args.rss_images and models:
            # the same model on a tenth of the folder and on all of it: flat memory means
            # the same peak RSS
            model_label, model_dir, _ = models[0]
            print(f"making {args.rss_images} synthetic ~1024x768 JPEGs ...", flush=True)
            folder = Path(helper("synthetic", str(work / "synthetic"), str(args.rss_images),
                                 str(args.rss_distinct)))
            for n in (max(1, args.rss_images // 10), args.rss_images):
                row = bench_one(model_label, model_dir, "synthetic ~1024x768",
                                limited(folder, n, work, f"rss_{n}"), work / f"out_rss_{n}", args.batch_size)
                if row:
                    rows.append(row)
                shutil.rmtree(work / f"out_rss_{n}", ignore_errors=True)
    print()
    print_table(rows)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"(this script's own peak RSS, a floor under each figure: {own:.0f} MB)")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
