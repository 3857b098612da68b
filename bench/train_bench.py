"""Training throughput of the `compact` and `thesis` presets, timed through `dermtool train`.

Both presets train one epoch on the same synthetic images (made by dermtool.synthetic in a
temporary folder) in one run of this script, so their ratio is meaningful on a noisy machine.
The epoch time comes from the run's history.csv (the training loop's own clock, model build
and start-up excluded); an untimed warm-up epoch absorbs graph tracing.

    python bench/train_bench.py                 # 32 images, batch 8
    python bench/train_bench.py --images 64 --batch-size 4
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    # name: (preprocess options, train options)
    "compact@160": (["--size", "160"], ["--preset", "compact", "--size", "160"]),
    "compact@256": (["--size", "256"], ["--preset", "compact", "--size", "256"]),
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
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    args = parser.parse_args()

    from dermtool.synthetic import write_dataset

    tmp = Path(tempfile.mkdtemp(prefix="dermtool-train-bench-"))
    data = write_dataset(tmp / "data", args.images, rng_seed=0, sizes=[(450, 600)], formats=("jpg",))
    rows = []
    for name in args.presets:
        prep, train = PRESETS[name]
        cache = tmp / f"cache-{name}"
        run(["dermtool", "preprocess", str(data), "--out", str(cache), *prep])
        out = tmp / f"run-{name}"
        started = time.perf_counter()
        run(["dermtool", "train", str(cache), "--task", args.task, "--out", str(out), "--epochs", "2",
             "--batch-size", str(args.batch_size), "--augment", "flips+color", *train])
        wall = time.perf_counter() - started
        secs = epoch_seconds(out)[-1]  # second epoch: traced graph, warm caches
        rows.append((name, args.images, secs, args.images / secs, wall))
        print(f"{name}: {args.images / secs:.2f} images/s", flush=True)
    base = rows[0][3]
    print(f"\ntraining throughput, task={args.task}, batch {args.batch_size}, CPU, one epoch of {args.images} images")
    print(f"{'preset':<18}{'images':>7}{'epoch s':>10}{'images/s':>10}{'vs first':>10}{'wall s':>9}")
    for name, n, secs, ips, wall in rows:
        print(f"{name:<18}{n:>7}{secs:>10.1f}{ips:>10.2f}{ips / base:>10.2f}{wall:>9.1f}")


if __name__ == "__main__":
    main()
