"""Does XLA or bfloat16 make a CPU training step cheaper? One Lite0 joint step, three ways.

Times `train_on_batch`-style steps (Keras `fit` on one repeated synthetic batch) of the Lite0
joint model with the cheap recipe's levers (`--seg-batch 4 --freeze early`, EMA), under float32,
`jit_compile=True` (XLA) and the `mixed_bfloat16` policy. Each mode runs in its own process (the
precision policy is global), after untimed warm-up steps that absorb tracing and compilation.
`dermtool train` uses float32 without XLA on a CPU; this shows why.

    python bench/precision_probe.py                    # 192 px, batch 16, 12 timed steps
    python bench/precision_probe.py --steps 4 --size 128
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

MODES = ("float32", "xla", "bfloat16")


def one(mode: str, size: int, batch: int, steps: int) -> float:
    """Seconds per training step in this process."""
    import numpy as np

    from dermtool import _tf

    tf = _tf.load()
    import keras

    if mode == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    from dermtool.config import preset_config
    from dermtool.losses import build_losses
    from dermtool.models import build_models
    from dermtool.train import apply_freeze

    cfg = preset_config("lite0", "joint", size=size, color_constancy="shades-of-gray", pretrained=False)
    model, train_model = build_models(cfg, seg_batch=4)
    apply_freeze(model, "early")
    losses, weights = build_losses(True, True, 0.5, True, (1, 1, 1))
    train_model.compile(optimizer=keras.optimizers.Adam(1e-4, use_ema=True, ema_momentum=0.99), loss=losses,
                        loss_weights=weights, jit_compile=mode == "xla")
    rng = np.random.default_rng(0)
    x = (rng.random((batch, size, size, 3)) * 255).astype(np.float32)
    y = {}
    for name, out in zip(train_model.output_names, train_model.outputs):
        if len(out.shape) == 4:  # the mask head sees the first 4 images
            y[name] = (rng.random((4, size, size, 1)) > 0.5).astype(np.float32)
        else:
            y[name] = np.eye(3, dtype=np.float32)[rng.integers(0, 3, batch)]
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    train_model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)  # tracing, compilation
    started = time.perf_counter()
    train_model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a child process
    args = parser.parse_args()
    if args.mode:
        print(f"{one(args.mode, args.size, args.batch_size, args.steps):.4f}")
        return
    rows = []
    for mode in MODES:
        result = subprocess.run([sys.executable, __file__, "--mode", mode, "--size", str(args.size), "--batch-size",
                                 str(args.batch_size), "--steps", str(args.steps)], capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"{mode} failed:\n{result.stderr[-2000:]}")
        rows.append((mode, float(result.stdout.strip().splitlines()[-1])))
        print(f"{mode}: {rows[-1][1]:.3f} s/step", file=sys.stderr, flush=True)
    print(f"\nLite0 joint step, {args.size} px, batch {args.batch_size}, --seg-batch 4 --freeze early, EMA; "
          f"{args.steps} timed steps")
    print("| mode | s/step | vs float32 |")
    print("|---|---:|---:|")
    for mode, secs in rows:
        print(f"| {mode} | {secs:.3f} | {secs / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
