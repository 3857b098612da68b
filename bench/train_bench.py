"""Training throughput of the `compact` and `thesis` presets, timed through `dermtool train`.

Both presets train one epoch on the same synthetic images (made by dermtool.synthetic in a
temporary folder) in one run of this script, so their ratio is meaningful on a noisy machine.
The epoch time comes from the run's history.csv (the training loop's own clock, model build
and start-up excluded); an untimed warm-up epoch absorbs graph tracing.

    python bench/train_bench.py                 # 32 images, batch 8
    python bench/train_bench.py --images 64 --batch-size 4
    python bench/train_bench.py --recipes --images 240 --batch-size 16   # Lite0 joint recipes

`--recipes` times the Lite0 joint model at 192 px under the ways of spending a CPU minute
(`--seg-batch`, `--freeze stem|early`, smaller squares) against the plain joint step and the
classifier alone; a `--progressive 128` (or 96) run's rate is computed from its sides' rows
(an equal share of the epochs at each side, as `train` shares them), and so is a 224 px model's
`--progressive 160` (160, 192, 224) and Lite1's `--progressive 128`. Its
"cls updates/min" column counts optimizer steps that update the classifier and the encoder, the
figure issue 17 asks to triple; "vs first" compares each with the plain joint recipe.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def _joint(*options: str, size: int = 192) -> tuple[list[str], list[str]]:
    """(preprocess options, train options) of a Lite0 joint recipe at `size`."""
    return ["--size", str(size)], ["--preset", "lite0", "--task", "joint", "--size", str(size), *options]


_SB4 = ("--seg-batch", "4")
_LITE1 = ("--encoder", "efficientnet-lite1", "--no-pretrained")  # timing needs no ImageNet weights
RECIPES = {
    "joint": _joint(),
    "joint seg-batch 4": _joint(*_SB4),
    "joint seg-batch 4 + freeze stem": _joint(*_SB4, "--freeze", "stem"),
    "joint seg-batch 2 + freeze stem": _joint("--seg-batch", "2", "--freeze", "stem"),
    # the steps of a --progressive 128 run before it reaches 192 px (the same network on smaller squares)
    "joint seg-batch 4 + freeze stem @160": _joint(*_SB4, "--freeze", "stem", size=160),
    "joint seg-batch 4 + freeze stem @128": _joint(*_SB4, "--freeze", "stem", size=128),
    # issue 17 item 7: what 224 px would cost a step (its accuracy needs a training run)
    "joint seg-batch 4 + freeze stem @224": _joint(*_SB4, "--freeze", "stem", size=224),
    # --freeze early: the stages at 1/2 and 1/4 size frozen too
    "joint seg-batch 4 + freeze early": _joint(*_SB4, "--freeze", "early"),
    "joint seg-batch 2 + freeze early": _joint("--seg-batch", "2", "--freeze", "early"),
    "joint seg-batch 4 + freeze early @160": _joint(*_SB4, "--freeze", "early", size=160),
    "joint seg-batch 4 + freeze early @128": _joint(*_SB4, "--freeze", "early", size=128),
    "joint seg-batch 4 + freeze early @96": _joint(*_SB4, "--freeze", "early", size=96),
    # the same sides with the decoder on 2 images a batch (--progressive 128 or 96 with --seg-batch 2)
    "joint seg-batch 2 + freeze early @160": _joint("--seg-batch", "2", "--freeze", "early", size=160),
    "joint seg-batch 2 + freeze early @128": _joint("--seg-batch", "2", "--freeze", "early", size=128),
    "joint seg-batch 2 + freeze early @96": _joint("--seg-batch", "2", "--freeze", "early", size=96),
    # issue 17 item 7: the larger EfficientNet-Lite encoders under the same recipe (no ImageNet
    # weights needed to time them) and Lite0 at 224 px
    "joint seg-batch 4 + freeze early, Lite1": _joint(*_SB4, "--freeze", "early", *_LITE1),
    "joint seg-batch 4 + freeze early, Lite2": _joint(*_SB4, "--freeze", "early", "--encoder", "efficientnet-lite2",
                                                       "--no-pretrained"),
    "joint seg-batch 4 + freeze early @224": _joint(*_SB4, "--freeze", "early", size=224),
    # the smaller sides of a Lite1 --progressive 128 run (its rate is computed like Lite0's)
    "joint seg-batch 4 + freeze early, Lite1 @160": _joint(*_SB4, "--freeze", "early", *_LITE1, size=160),
    "joint seg-batch 4 + freeze early, Lite1 @128": _joint(*_SB4, "--freeze", "early", *_LITE1, size=128),
    "cls alone": (["--size", "192"], ["--preset", "lite0", "--task", "cls"]),
    "cls alone + freeze stem": (["--size", "192"], ["--preset", "lite0", "--task", "cls", "--freeze", "stem"]),
}
PRESETS = {
    # name: (preprocess options, train options)
    "compact@160": (["--size", "160"], ["--preset", "compact", "--size", "160"]),
    "compact@256": (["--size", "256"], ["--preset", "compact", "--size", "256"]),
    # the same steps with the batches from 2 worker processes (dermtool's own pool) instead of the
    # one tf.data worker: time it beside compact@160 (--presets compact@160 "compact@160 workers 2")
    "compact@160 workers 2": (["--size", "160"], ["--preset", "compact", "--size", "160", "--workers", "2"]),
    "thesis@572->388": (["--size", "388", "--fit", "pad", "--margin", "92"], ["--preset", "thesis"]),
}


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")


def epoch_seconds(run_dir: Path) -> list[float]:
    return [float(r["seconds"]) for r in csv.DictReader(open(run_dir / "history.csv"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--task", default="joint")
    parser.add_argument("--presets", nargs="*", default=None, metavar="NAME",
                        help=f"the presets to time (default: all): {', '.join(PRESETS)}; with --recipes, "
                             "the recipes, named as in this file's RECIPES (\"joint\", \"joint seg-batch 4 + "
                             "freeze early @160\", \"cls alone\", ...: quote each); a wrong name lists them all")
    parser.add_argument("--recipes", action="store_true", help="time the Lite0 joint recipes instead of the presets")
    args = parser.parse_args()
    table = RECIPES if args.recipes else PRESETS
    names = args.presets or list(table)
    unknown = [name for name in names if name not in table]
    if unknown:
        kind, other = ("recipe", "presets: drop --recipes") if args.recipes else ("preset", "recipes: add --recipes")
        in_other = unknown[0] in (PRESETS if args.recipes else RECIPES)
        hint = f" ({unknown[0]!r} is one of the {other})" if in_other else ""
        print(f"error: unknown {kind} {unknown[0]!r}{hint}; the {kind}s are: "
              + ", ".join(repr(name) for name in table) + ".", file=sys.stderr)
        sys.exit(2)

    from dermtool.synthetic import write_dataset

    tmp = Path(tempfile.mkdtemp(prefix="dermtool-train-bench-"))
    data = write_dataset(tmp / "data", args.images, rng_seed=0, sizes=[(450, 600)], formats=("jpg",))
    rows = []
    for name in names:
        prep, train = table[name]
        cache = tmp / f"cache-{' '.join(prep)}"
        if not cache.exists():
            run(["dermtool", "preprocess", str(data), "--out", str(cache), *prep])
        out = tmp / f"run-{name.replace(' ', '-')}"
        started = time.perf_counter()
        task = [] if args.recipes else ["--task", args.task]
        run(["dermtool", "train", str(cache), *task, "--out", str(out), "--epochs", "2",
             "--batch-size", str(args.batch_size), "--augment", "flips+color", *train])
        wall = time.perf_counter() - started
        secs = epoch_seconds(out)[-1]  # second epoch: traced graph, warm caches
        rows.append((name, args.images, secs, args.images / secs, wall))
        print(f"{name}: {args.images / secs:.2f} images/s", flush=True)
    base = rows[0][3]
    what = "Lite0 recipes at 192 px" if args.recipes else f"task={args.task}"
    print(f"\ntraining throughput, {what}, batch {args.batch_size}, CPU, one epoch of {args.images} images")
    print(f"| {'recipe' if args.recipes else 'preset':<32} | images | epoch s | images/s | cls updates/min | vs first | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, secs, ips, wall in rows:
        updates = 60 * ips / args.batch_size
        print(f"| {name:<32} | {n} | {secs:.1f} | {ips:.2f} | {updates:.1f} | {ips / base:.2f} | {wall:.1f} |")
    by_name = {r[0]: r for r in rows}
    for base_name in [r[0] for r in rows if "@" not in r[0] and r[0].startswith("joint seg-batch")]:
        # --progressive START to the model's size: an equal share of the epochs at each side
        for start, full in ((128, 192), (96, 192), (160, 224)):
            sides = [by_name.get(base_name if side == 192 else f"{base_name} @{side}")
                     for side in range(start, full + 1, 32)]
            if all(sides):
                secs = sum(r[2] for r in sides) / len(sides)
                ips = args.images / secs
                name = f"= {base_name}{' @224' if full == 224 else ''}, progressive {start} (computed)"
                print(f"| {name:<32} | {args.images} | {secs:.1f} | {ips:.2f} | "
                      f"{60 * ips / args.batch_size:.1f} | {ips / base:.2f} | - |")


if __name__ == "__main__":
    main()
