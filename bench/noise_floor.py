"""How far does the diagnosis move when the model's input changes by almost nothing?

The resolution check (bench/resolution_check.py) compares originals with their copies. This script
measures the floor under those figures: the same model input, perturbed in ways no reader would
see, through the code `dermtool infer` runs (`preprocess.prepare`, `infer.predict_batch` with the
model's lesion view and temperature, `decision.decide` at its operating point):

- `noise 1`: Gaussian noise of sd 1 grey level added to every pixel;
- `shift 1 px`: the square moved by one pixel right (the edge column repeated);
- `JPEG q95`: the model input saved and read back as a JPEG at quality 95.

For each it prints the mean |delta p(melanoma)| with a 95 % bootstrap interval over images, and
how often the argmax and the decision stay the same. If an original and its copy differ by about
as much as these, no resampling chain can bring them closer: only a smoother model (or averaging
over views) can. With several --model, the last table gives each later model's mean |delta p|
minus the first's, pooled over the perturbations, with an interval from resampling images.

    python bench/noise_floor.py --model weights/isic-ham-lite0-joint-192 \\
        --images ../shared/data/isic2017/val/images
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from dermtool.errors import InputError


def perturbations(x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """(N, H, W, 3) float model inputs -> name -> perturbed copy (same shape, 0-255)."""
    from PIL import Image

    from dermtool.augment import shift_edge

    rng = np.random.default_rng(seed)

    def jpeg(a: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
        buf.seek(0)
        with Image.open(buf) as img:
            return np.asarray(img.convert("RGB"), dtype=np.float32)

    return {
        "noise 1": np.clip(x + rng.normal(0.0, 1.0, x.shape), 0, 255).astype(np.float32),
        "shift 1 px": np.stack([shift_edge(a, 0, 1) for a in x]),  # one column right, edge repeated
        "JPEG q95": np.stack([jpeg(a) for a in x]),
    }


def predict(model, cfg, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """(N, 3) class probabilities as `dermtool infer` computes them (lesion view, temperature)."""
    from dermtool.infer import predict_batch

    out = []
    for i in range(0, len(x), batch):  # the lesion view as infer decides it (config checks it is joint)
        out += [c for _, c in predict_batch(model, list(x[i:i + batch]), temperature=cfg.temperature,
                                            lesion_view=cfg.cls_views == "frame+lesion")]
    return np.stack(out)


def measure(model_dir: Path, images: list[Path]) -> dict[str, dict]:
    from dermtool.decision import decide
    from dermtool.modelio import load_model
    from dermtool.preprocess import prepare

    model, cfg = load_model(model_dir)
    x = np.stack([prepare(p, cfg.input_size, cfg.fit, cfg.border, chain=cfg.input_chain)[0]
                  for p in images]).astype(np.float32)
    ref = predict(model, cfg, x)
    out = {}
    for name, xp in perturbations(x).items():
        p = predict(model, cfg, xp)
        out[name] = {
            "delta": np.abs(p[:, 0] - ref[:, 0]),
            "agree": p.argmax(1) == ref.argmax(1),
            "agree_label": decide(p, cfg.melanoma_threshold) == decide(ref, cfg.melanoma_threshold),
        }
    return out


def interval(values: np.ndarray, draws: np.ndarray) -> tuple[float, float]:
    return tuple(np.percentile(values[draws].mean(axis=1), [2.5, 97.5]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, type=Path, help="model folder (repeat to compare)")
    parser.add_argument("--images", type=Path, required=True, help="folder of images (jpg/png)")
    parser.add_argument("--limit", type=int, default=0, help="the first N images only (0: all)")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    if not args.images.is_dir():
        print(f"skipped: {args.images} not found (a folder of jpg/png images is needed).")
        return
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if args.limit:
        images = images[:args.limit]
    if not images:
        raise SystemExit(f"{args.images}: no jpg or png images.")
    draws = np.random.default_rng(0).integers(0, len(images), size=(args.resamples, len(images)))
    results = {}
    print(f"{len(images)} images from {args.images}\n")
    print("| model | perturbation | mean abs dp(mel) [95 % CI] | argmax agree | decisions agree |")
    print("|---|---|---|---:|---:|")
    for m in args.model:
        try:
            results[m] = measure(m, images)
        except InputError as exc:  # a bad model folder or image: one line, no traceback
            raise SystemExit(f"error: {exc}")
        for name, r in results[m].items():
            lo, hi = interval(r["delta"], draws)
            print(f"| {m.name} | {name} | {r['delta'].mean():.4f} [{lo:.4f}, {hi:.4f}] | "
                  f"{r['agree'].mean():.3f} | {r['agree_label'].mean():.3f} |")
    if len(args.model) > 1:
        first = args.model[0]
        base = np.mean([r["delta"] for r in results[first].values()], axis=0)  # per image, pooled
        print(f"\n| pooled perturbations | mean abs dp(mel) | minus {first.name} [95 % CI, images resampled] |")
        print("|---|---:|---|")
        print(f"| {first.name} | {base.mean():.4f} | |")
        for m in args.model[1:]:
            mine = np.mean([r["delta"] for r in results[m].values()], axis=0)
            lo, hi = interval(mine - base, draws)
            print(f"| {m.name} | {mine.mean():.4f} | {(mine - base).mean():+.4f} [{lo:+.4f}, {hi:+.4f}] |")


if __name__ == "__main__":
    main()
