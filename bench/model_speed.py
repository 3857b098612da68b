"""Raw model speed of the compact preset at several sizes: train_on_batch and predict images/s.

No data pipeline, no disk: random inputs, so this isolates the network's cost on this machine
and is what picked the bundled model's input size.

    python bench/model_speed.py
    python bench/model_speed.py --sizes 128 160 192 256 --batch-size 16 --task joint
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[128, 160, 192, 256])
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--task", default="joint")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    import keras

    from dermtool.config import preset_config
    from dermtool.losses import build_losses
    from dermtool.models import build_model

    print(f"{'size':>5}{'params':>10}{'train img/s':>13}{'predict img/s':>15}")
    for size in args.sizes:
        cfg = preset_config("compact", args.task, size=size, base_filters=args.base_filters)
        model = build_model(cfg)
        losses, weights = build_losses(cfg.has_seg, cfg.has_cls, 0.5, True, (1.0, 1.0, 1.0))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=losses, loss_weights=weights)
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, (args.batch_size, size, size, 3)).astype("float32")
        y = {}
        if cfg.has_seg:
            y["seg"] = (rng.random((args.batch_size, size, size, 1)) > 0.5).astype("float32")
        if cfg.has_cls:
            y["cls"] = np.eye(3, dtype="float32")[rng.integers(0, 3, args.batch_size)]
        for _ in range(2):  # tracing
            model.train_on_batch(x, y)
            model.predict_on_batch(x)
        t = time.perf_counter()
        for _ in range(args.steps):
            model.train_on_batch(x, y)
        train_ips = args.steps * args.batch_size / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(args.steps):
            model.predict_on_batch(x)
        pred_ips = args.steps * args.batch_size / (time.perf_counter() - t)
        print(f"{size:>5}{model.count_params():>10}{train_ips:>13.1f}{pred_ips:>15.1f}", flush=True)


if __name__ == "__main__":
    main()
