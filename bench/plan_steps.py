"""How many training steps fit in a time budget, from the measured rate of the batch workers.

bench/gpu_recipe.sh sizes its run with this when TRAIN_SECONDS is set: on a GPU the batches
(read, augment, two resampling chains) are made by the CPU's workers, so their rate, counted as
the batches arrive back in the main process (as fit receives them), bounds the steps per
second. It makes `--batches` batches of the recipe's kind in `--workers` processes and prints
the steps per epoch for `--epochs` epochs to fill `--seconds`, after taking off `--overhead`
seconds (start-up and compilation).

    python bench/plan_steps.py CACHE ... --seconds 420 --epochs 16 --batch-size 64 [options as train]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

_source = None


def _make(step: int):
    return _source.batch(0, step)  # sent back whole: fit's workers pay that transfer too


def main() -> None:
    global _source
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("caches", nargs="+", type=Path)
    ap.add_argument("--seconds", type=float, required=True, help="the time the run may take, all in")
    ap.add_argument("--overhead", type=float, default=90.0, help="seconds of start-up and compilation")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--batches", type=int, default=0, help="batches to time (default: 3 per worker)")
    ap.add_argument("--augment", default="flips+color-strong+lesion-crop+chain")
    ap.add_argument("--consistency", type=float, default=3.0)
    ap.add_argument("--color-constancy", default="shades-of-gray")
    ap.add_argument("--input-chain", default="jpeg256")
    ap.add_argument("--cls-views", default="frame+lesion")
    ap.add_argument("--min-steps", type=int, default=20)
    args = ap.parse_args()

    from dermtool.config import TrainConfig, preset_config
    from dermtool.train import BatchSource, load_training_set

    cfg = preset_config("lite0", "joint", color_constancy=args.color_constancy, input_chain=args.input_chain,
                        cls_views=args.cls_views)
    tcfg = TrainConfig(batch_size=args.batch_size, augment=args.augment, sampler="balanced",
                       consistency=args.consistency, steps_per_epoch=10_000)
    data = load_training_set(args.caches, cfg, lambda m: print(m, file=sys.stderr))
    _source = BatchSource(data, cfg, tcfg, 10_000)
    n = args.batches or 3 * args.workers
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        pool.map(_make, range(args.workers))  # each worker's first batch: imports, the epoch's order
        started = time.perf_counter()
        images = sum(len(x) for x, _ in pool.imap(_make, range(args.workers, args.workers + n)))
        rate = images / (time.perf_counter() - started)
    budget = max(args.seconds - args.overhead, 0.0)
    steps = max(args.min_steps, int(rate * budget / args.batch_size / args.epochs))
    print(f"batch workers: {rate:.0f} images/s with {args.workers} processes; {args.epochs} epochs x {steps} steps "
          f"of {args.batch_size} fill {budget:.0f} s", file=sys.stderr)
    print(steps)


if __name__ == "__main__":
    main()
