"""The `dermtool` command line: thin typer commands that validate paths and call the core."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from dermtool import __version__
from dermtool.errors import InputError

app = typer.Typer(
    name="dermtool",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    help="Segment and classify dermoscopy images of skin lesions (ISIC 2017 conventions).\n\n"
    "Pipeline: [bold]preprocess[/] → [bold]train[/] → [bold]infer[/] → [bold]score[/].",
)
console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print one sentence (no traceback) and exit with `code`."""
    # escaped: a path may contain "[...]", which rich would otherwise read as markup
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _command_line(ctx: typer.Context) -> str:
    """The running command with every option spelled out, so a run can be repeated exactly."""
    import shlex

    parts = ["dermtool", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None:
            continue
        if param.param_type_name == "argument":
            parts.append(shlex.quote(str(value)))
        elif param.is_flag:
            flag = param.opts[0] if value else (param.secondary_opts[0] if param.secondary_opts else None)
            if flag:
                parts.append(flag)
        else:
            parts += [param.opts[0], shlex.quote(str(value))]
    return " ".join(parts)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dermtool {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """dermtool command line."""


@app.command("preprocess")
def preprocess_cli(
    images: Path = typer.Argument(..., help="Folder of images (.jpg .png .tif .bmp), or a folder holding images/, masks/, labels.csv."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder to write (created)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Folder of <image_id>_segmentation.png masks. Found automatically for the two known layouts."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="ISIC 2017 Part 3 label CSV (image_id,melanoma,seborrheic_keratosis). Found automatically for the two known layouts."),
    size: int = typer.Option(256, "--size", min=8, help="Side of the square the model predicts."),
    fit: str = typer.Option("squash", "--fit", help="pad: keep the aspect ratio, zero-pad to a square; squash: stretch the whole frame to a square."),
    border: float = typer.Option(0.0, "--border", min=0.0, max=1.0, help="With --fit pad: extra zero border on each side, as a fraction of the long side."),
    margin: int = typer.Option(0, "--margin", min=0, help="Reflected border for valid-convolution models (the thesis U-Net: 92 at --size 388)."),
    workers: int = typer.Option(0, "--workers", min=0, help="Decoding threads (0: one per core, at most 8)."),
    strict: bool = typer.Option(False, "--strict", help="Exit with code 1 when the data check finds any problem."),
) -> None:
    """Decode, fit and stack images (and masks, labels) into a fast, memory-mapped training cache.

    Writes OUT/images.tif, OUT/masks.tif, OUT/manifest.csv (image_id, class, original size,
    transform) and OUT/cache.json. Running it again on unchanged inputs reuses the cache.
    The ISIC 2017 layout as downloaded (ISIC-2017_Training_Data, ..._Part1_GroundTruth,
    ..._Part3_GroundTruth.csv) is recognised.
    """
    from dermtool.data import build_cache, resolve_layout
    from dermtool.report import print_cache_report

    if fit not in ("pad", "squash"):
        fail(f"--fit must be pad or squash, not {fit!r}.")
    for p, what in ((images, "images folder"), (masks, "masks folder")):
        if p is not None and not p.is_dir():
            fail(f"{p}: {what} not found.")
    if labels is not None and not labels.is_file():
        fail(f"{labels}: label CSV not found.")
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a folder; --out must be a cache folder.")
    try:
        layout = resolve_layout(images, masks, labels)
        report = build_cache(layout, out, size=size, fit=fit, border=border, margin=margin,
                             workers=workers, progress=sys.stderr.isatty())
    except InputError as exc:
        fail(str(exc))
    except OSError as exc:  # e.g. --out on a read-only or full disk
        fail(f"{exc.filename or out}: cannot write the cache ({exc.strerror or exc}).")
    print_cache_report(report, layout, out)
    if report.failed or (strict and report.problems):
        raise typer.Exit(1)


@app.command("train")
def train_cli(
    ctx: typer.Context,
    train_cache: Path = typer.Argument(..., help="Training cache written by dermtool preprocess."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation cache; scored every epoch with the metrics of dermtool score, and used to pick the best epoch."),
    task: str = typer.Option("joint", "--task", help="seg (U-Net mask), cls (classifier on the U-Net encoder) or joint (both heads, one encoder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to write (config.json, weights, history.csv, logs/)."),
    preset: str = typer.Option("compact", "--preset", help="compact: same-padded, batch-norm, ~2 M parameters, CPU-friendly; thesis: the thesis U-Net (valid convs, 572 -> 388)."),
    size: Optional[int] = typer.Option(None, "--size", help="Override the preset's output size (the square the model predicts)."),
    base_filters: Optional[int] = typer.Option(None, "--base-filters", help="Override the width of the first level (doubles each level)."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Override the number of pooling levels."),
    fit: Optional[str] = typer.Option(None, "--fit", help="Override pad | squash (must match the cache)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Total epochs [default: 50; with --resume: the run's own, or the new total to reach]."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    learning_rate: float = typer.Option(1e-3, "--learning-rate", help="Adam learning rate; multiplied by 0.8 after 5 epochs without a better validation loss."),
    alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0, help="Joint loss alpha * L_seg + (1 - alpha) * L_cls."),
    dice: bool = typer.Option(False, "--dice/--no-dice", help="Segmentation loss BCE + (1 - soft Dice) instead of BCE alone."),
    augment: str = typer.Option("flips+color", "--augment", help="none | flips (8 rotations/flips) | flips+color (plus mild colour jitter)."),
    seed: int = typer.Option(0, "--seed", help="Seed for weights, shuffling and augmentation; recorded in config.json."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Run folder whose layers are copied where names and shapes match (e.g. a seg run's encoder into cls/joint)."),
    freeze: str = typer.Option("none", "--freeze", help="encoder | decoder | none: layers kept fixed while training."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last completed epoch."),
    mixed_precision: bool = typer.Option(False, "--mixed-precision", help="float16 compute on a GPU (outputs stay float32)."),
    strategy: str = typer.Option("default", "--strategy", help="default | mirrored (all GPUs of this machine) | multiworker (several machines, TF_CONFIG)."),
) -> None:
    """Train a seg, cls or joint model; checkpoints every epoch, resumable with --resume.

    Example: dermtool train cache/train --val cache/val --task joint --out runs/joint --epochs 40
    """
    from dermtool.config import TrainConfig, preset_config

    if not (train_cache / "cache.json").is_file():
        fail(f"{train_cache}: not a dermtool cache (no cache.json); run dermtool preprocess first.")
    if val is not None and not (val / "cache.json").is_file():
        fail(f"{val}: not a dermtool cache (no cache.json); run dermtool preprocess first.")
    if init_from is not None and not (init_from / "config.json").is_file():
        fail(f"{init_from}: not a run folder (no config.json).")
    choices = {"task": (task, ("seg", "cls", "joint")), "freeze": (freeze, ("encoder", "decoder", "none")),
               "augment": (augment, ("none", "flips", "flips+color")),
               "strategy": (strategy, ("default", "mirrored", "multiworker"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            fail(f"--{name} must be one of {', '.join(allowed)}, not {value!r}.")
    try:
        cfg = preset_config(preset, task, size=size, base_filters=base_filters, depth=depth, fit=fit)
        tcfg = TrainConfig(
            epochs=epochs or (0 if resume else 50), batch_size=batch_size, learning_rate=learning_rate, alpha=alpha,
            seg_loss="bce+dice" if dice else "bce", augment=augment, seed=seed,
            mixed_precision=mixed_precision, strategy=strategy, freeze=freeze,
            init_from=str(init_from or ""), command=_command_line(ctx),
        )
        from dermtool.train import train

        train(cfg, tcfg, train_cache, val, out, resume=resume, log=lambda m: console.print(m, highlight=False),
              progress=sys.stderr.isatty())
    except InputError as exc:
        fail(str(exc))


def _parse_shard(value: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in value.split("/"))
    except ValueError:
        fail(f"--shard must look like K/N (e.g. 2/4), not {value!r}.")
    if not (1 <= k <= n):
        fail(f"--shard {value}: K must be between 1 and N.")
    return k, n


@app.command("infer")
def infer_cli(
    images: Path = typer.Argument(..., help="Folder of images (.jpg .jpeg .png .tif .tiff .bmp, any size)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: <image_id>_segmentation.png masks and predictions.csv."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="A run folder of dermtool train, a bundled model folder, or an export of dermtool export (its folder, or the .tflite / .onnx file). Default: the bundled model."),
    engine: Optional[str] = typer.Option(None, "--engine", help="keras | litert | onnx | savedmodel. Default: the model's own (keras for a model folder). litert on a model folder: a dynamic-range int8 LiteRT copy, converted once and cached — about 2x faster on a CPU, same JAC/BACC within 0.005."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per model call."),
    tta: int = typer.Option(1, "--tta", help="Test-time augmentation: average the model over 1 (off), 4 (flips) or 8 (flips and transposes) views; costs that many times the model time."),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0, help="Lesion probability threshold (default: the model's, 0.5)."),
    closing_radius: int = typer.Option(3, "--closing-radius", min=0, help="Radius (model pixels) of the morphological closing; 0 switches it off."),
    largest: bool = typer.Option(True, "--largest-component/--all-components", help="Keep only the largest connected component."),
    fill_holes: bool = typer.Option(True, "--fill-holes/--no-fill-holes", help="Fill holes inside the lesion."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write <image_id>_probability.tif (float32 lesion probability, original size)."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write <image_id>_overlay.jpg: the contour and predicted class drawn on the image."),
    resume: bool = typer.Option(False, "--resume", help="Skip images whose outputs are already complete in OUT."),
    shard: str = typer.Option("1/1", "--shard", help="Process only part K of N (stable by file name); writes predictions.part-K-of-N.csv. Concatenate the parts to merge."),
    workers: int = typer.Option(0, "--workers", min=0, help="Decode/write threads (0: automatic)."),
) -> None:
    """Segment and classify every image of a folder.

    Writes OUT/<image_id>_segmentation.png (8-bit 0/255, the original size, ISIC naming) and
    OUT/predictions.csv (image_id,melanoma,seborrheic_keratosis,nevus,label — readable by
    dermtool score and, by its first three columns, the ISIC 2017 scorer), plus OUT/infer.json
    with the run summary and the post-processing used: threshold → closing → largest component
    → hole filling → restore to the original size. Unreadable files are reported and skipped;
    the exit code is 1 when any image failed.
    """
    from dermtool.infer import InferOptions, predict_folder
    from dermtool.postprocess import PostprocessConfig

    if not images.is_dir():
        fail(f"{images}: images folder not found.")
    k_n = _parse_shard(shard)
    if tta not in (1, 4, 8):
        fail(f"--tta must be 1, 4 or 8, not {tta}.")
    try:
        opts = InferOptions(
            batch_size=batch_size, tta=tta, probabilities=probabilities, overlay=overlay, resume=resume,
            shard=k_n, workers=workers, engine=engine,
            post=PostprocessConfig(threshold=threshold, closing_radius=closing_radius,
                                   largest_component=largest, fill_holes=fill_holes),
        )
        summary = predict_folder(images, out, model, opts, progress=sys.stderr.isatty(),
                                 log=lambda m: console.print(m, highlight=False))
    except InputError as exc:
        fail(str(exc))
    except KeyboardInterrupt:  # during model loading: nothing was written yet
        fail("interrupted before any image was processed.", 130)
    for source, message in summary.failed:
        console.print(f"[red]failed[/] {message}", highlight=False, soft_wrap=True)
    console.print(
        f"{'[yellow]interrupted[/]' if summary.interrupted else '[green]done[/]'}: {summary.done} images, "
        f"{summary.skipped} skipped (already done), {len(summary.failed)} failed, "
        f"{summary.images_per_second:.1f} images/s on {summary.device} ({summary.engine}); model {summary.model}; "
        f"outputs in {out}",
        highlight=False, soft_wrap=True)
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.failed:
        raise typer.Exit(1)


@app.command("export")
def export_cli(
    model: Optional[Path] = typer.Argument(None, help="Model folder (config.json + weights): a run of dermtool train or a bundled model. Default: the bundled model."),
    out: Path = typer.Option(..., "--out", "-o", help="Export folder to write: the model file (model.tflite, model.onnx or saved_model/) and its config.json."),
    fmt: str = typer.Option(..., "--format", "-f", help="savedmodel (TF Serving, TF.js, any TensorFlow) | tflite (LiteRT: phones, small CPUs) | onnx (onnxruntime)."),
    quantize: str = typer.Option("none", "--quantize", help="none | float16 | dynamic (int8 weights) | int8 (int8 weights and activations; needs --calibration). tflite takes all four, onnx none and dynamic."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Folder of images that set the int8 activation ranges (a few hundred of the training images)."),
    check: Optional[Path] = typer.Option(None, "--check", help="Labelled folder (images/, masks/, labels.csv): score the Keras and the exported model on it, side by side."),
) -> None:
    """Write a model for another runtime, and check it against the Keras model.

    Right after writing, both models run on the same images and the largest difference of
    their outputs is printed. With --check DIR both go through dermtool infer and dermtool
    score on DIR, and JAC, BACC and the melanoma AUC are printed side by side. Run the export
    with dermtool infer --model OUT (or OUT/model.tflite, OUT/model.onnx).
    """
    from dermtool.export import export

    for p, what in ((calibration, "--calibration folder"), (check, "--check folder")):
        if p is not None and not p.is_dir():
            fail(f"{p}: {what} not found.")
    try:
        report = export(model, out, fmt, quantize, calibration, check, log=lambda m: console.print(m, highlight=False))
    except InputError as exc:
        fail(str(exc))
    diff = report.difference
    parts = [f"{k} {diff[k]:.2g}" for k in ("seg", "cls") if k in diff]
    if "mask_pixels_changed" in diff:
        parts.append(f"mask pixels changed at the threshold {100 * diff['mask_pixels_changed']:.3f} %")
    typer.echo(f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB, {report.seconds:.0f} s)")
    typer.echo(f"largest difference from the Keras model over {diff['images']} images: {', '.join(parts)}")
    if report.check:
        keras_scores, export_scores = report.check["keras"], report.check["export"]
        typer.echo(f"\nscored on {check} ({keras_scores['images']} images):")
        typer.echo(f"{'':<24} {'keras':>8} {'export':>8} {'diff':>8}")
        for name in ("JAC", "BACC", "melanoma AUC"):
            a, b = keras_scores[name], export_scores[name]
            if a is not None:
                typer.echo(f"{name:<24} {a:8.4f} {b:8.4f} {b - a:+8.4f}")


_SCORE_HELP = (
    "Score predictions against ground truth with the ISIC 2017 conventions.\n\n"
    "[bold]Classification[/] (the two CSVs, ISIC 2017 Part 3 format, values in [0, 1]): "
    "without a nevus column, nevus = 1 - melanoma - seborrheic_keratosis (a truth row with both "
    "0 is a nevus). The class of a row is the argmax over (melanoma, seborrheic_keratosis, "
    "nevus), an exact tie going to the earlier one. Reports per-class SE/SP/ACC (one-vs-all), "
    "ROC AUC on the probabilities, balanced accuracy BACC = mean of the sensitivities, and the "
    "confusion matrix.\n\n"
    "[bold]Segmentation[/] (--pred-masks with --truth-masks): masks are matched by the name "
    "<image_id>_segmentation.png and binarised at > 128, as the ISIC scorer does. Every truth "
    "mask is scored: both masks empty -> Jaccard 1.0; a missing prediction -> 0, counted. "
    "Reports the mean Jaccard (JAC), Dice, and the ISIC 2018 thresholded Jaccard (an image "
    "under 0.65 counts 0).\n\n"
    "With both tasks: mean performance = (JAC + BACC) / 2. "
    "Bad input exits with code 2 and one sentence naming the file."
)


@app.command("score", help=_SCORE_HELP)
def score_cli(
    pred_csv: Path = typer.Argument(
        ..., metavar="PRED_CSV", show_default=False,
        help="Predictions CSV: image_id,melanoma,seborrheic_keratosis[,nevus].",
    ),
    truth_csv: Path = typer.Argument(
        ..., metavar="TRUTH_CSV", show_default=False,
        help="Ground-truth CSV in the same ISIC 2017 Part 3 format.",
    ),
    pred_masks: Optional[Path] = typer.Option(
        None, "--pred-masks", metavar="DIR", help="Folder of predicted <image_id>_segmentation.png."
    ),
    truth_masks: Optional[Path] = typer.Option(
        None, "--truth-masks", metavar="DIR", help="Folder of truth <image_id>_segmentation.png.",
    ),
    json_file: Optional[Path] = typer.Option(
        None, "--json", metavar="FILE", help="Also write every number, per image too, as JSON.",
    ),
    bootstrap: int = typer.Option(
        0, "--bootstrap", min=0, metavar="N",
        help="Resample the images N times for 95 % intervals of JAC and BACC (0: none).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resampling."),
) -> None:
    """Score predictions against ground truth with the ISIC 2017 conventions."""
    from rich.console import Console
    from dermtool.score import render, score, write_json

    # Paths are checked in score() rather than by typer's exists=True, so that a missing file
    # gets the same one-line message as every other bad input.
    try:
        result = score(pred_csv, truth_csv, pred_masks, truth_masks, bootstrap=bootstrap, seed=seed)
    except InputError as exc:
        fail(str(exc))  # a path may contain "[...]", which is not rich markup
    render(result, Console())
    if json_file is not None:
        try:
            write_json(result, json_file)
        except OSError as exc:
            fail(f"Cannot write the JSON file {json_file} ({exc.strerror}).")
