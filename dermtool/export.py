"""`dermtool export`: write a model for another runtime, then check it against the Keras model.

The file itself is written by `modelio.write_export` (or, for --format keras, a model folder
again by `modelio.write_keras`: float16 weights); this module adds the two checks a user needs
before trusting it:

- the largest difference between the exported and the Keras model's outputs on the same inputs
  (the --check images, else the --calibration images, else synthetic lesions);
- with --check DIR (a labelled folder: images/, masks/, labels.csv), both models run through
  `dermtool infer`'s own pipeline and are scored by `dermtool score`'s own functions
  (JAC, BACC, melanoma AUC), side by side.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermtool.config import ModelConfig, load_config
from dermtool.data import Layout, find_images, resolve_layout
from dermtool.errors import InputError, disk_full
from dermtool.io import publish, read_class_csv, read_json, staging_folder
from dermtool.modelio import (CLASSIFIER_FILE, FORMATS, KerasEngine, trust_written_savedmodel, check_format, shown_path, load_engine, resolve_model, write_export,
                              write_keras)
from dermtool.preprocess import prepare

#: images compared output by output right after writing (the whole --check folder is scored)
COMPARE_IMAGES = 16
CALIBRATION_IMAGES = 200


@dataclass
class ExportReport:
    path: Path
    size_bytes: int
    seconds: float
    difference: dict  # output -> largest absolute difference; "mask_pixels_changed" fraction; "images"
    check: dict | None = None  # {"keras": scores, "export": scores}


def load_inputs(folder: Path, cfg: ModelConfig, limit: int, log=None) -> np.ndarray:
    """Up to `limit` images of `folder` (evenly spread, by name) as model inputs, float32.

    An unreadable file is skipped with a line to `log` naming it; only a folder with no
    readable image at all is an error.
    """
    paths = find_images(folder)
    if not paths:
        raise InputError(f"{folder}: no images (.jpg .png .tif .bmp) in this folder.")
    if len(paths) > limit:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    inputs, problems = [], []
    for path in paths:
        try:
            inputs.append(prepare(path, cfg.size, cfg.fit, cfg.border, cfg.margin, cfg.input_chain)[0])
        except InputError as exc:
            problems.append(str(exc))
    if not inputs:
        raise InputError(f"{folder}: none of its {len(paths)} images could be read (the first: {problems[0]})")
    for problem in problems:
        if log:
            log(f"skipped {problem}")
    return np.stack(inputs).astype(np.float32)


def synthetic_inputs(cfg: ModelConfig, n: int = 8) -> np.ndarray:
    """Lesion-like images at the model's input size, for a check that needs no data."""
    from dermtool.synthetic import make_lesion

    rng = np.random.default_rng(0)
    return np.stack([make_lesion(cfg.input_size, cfg.input_size, rng)[0] for _ in range(n)]).astype(np.float32)


def compare_outputs(reference, engine, x: np.ndarray, threshold: float, batch_size: int = 8,
                    classifier: bool = True) -> dict:
    """Largest absolute difference per output over the images `x`, and the share of mask pixels
    on the other side of `threshold` (what a probability difference does to a mask). With
    `classifier`, an engine's `classify` (an export's classifier-only file) is checked alike."""
    diff: dict = {"images": int(len(x))}
    changed = total = 0
    classify = getattr(engine, "classify", None) if classifier else None
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        a, b = reference.predict_on_batch(xb), engine.predict_on_batch(xb)
        for key in a:
            diff[key] = max(diff.get(key, 0.0), float(np.abs(a[key] - b[key]).max()))
        if "seg" in a:
            changed += int(np.count_nonzero((a["seg"] > threshold) != (b["seg"] > threshold)))
            total += a["seg"].size
        if classify is not None:
            diff["classifier"] = max(diff.get("classifier", 0.0), float(np.abs(a["cls"] - classify(xb)["cls"]).max()))
    if total:
        diff["mask_pixels_changed"] = changed / total
    return diff


#: how far the export's scores on a --check folder may lie from the Keras model's before --check
#: fails (exit 1): the bundled model's mixed-int8 file moves JAC by 0.002 and BACC by 0.012 on
#: the 150 ISIC 2017 validation images; all-int8 by 0.006 and 0.004
CHECK_TOLERANCE = {"JAC": 0.01, "BACC": 0.05}


def beyond_tolerance(check: dict) -> list[str]:
    """The figures of a --check (`ExportReport.check`) on which the export strays from Keras."""
    return [f"{name} {check['export'][name] - check['keras'][name]:+.4f} (more than {tolerance})"
            for name, tolerance in CHECK_TOLERANCE.items()
            if check["keras"][name] is not None and abs(check["export"][name] - check["keras"][name]) > tolerance]


def score_folder(model: Path, check_dir: Path, engine: str | None = None) -> dict:
    """JAC, BACC and melanoma AUC of a model on a labelled folder, through infer and score."""
    from dermtool.infer import InferOptions, predict_folder
    from dermtool.score import score

    cfg, _, _ = load_config(resolve_model(model)[0])
    layout = check_folder(check_dir, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run = predict_folder(layout.images, out, model, InferOptions(engine=engine), progress=False, log=lambda m: None)
        if not run.done:  # scored, its empty temporary folder would be named as the wrong folder
            why = f" ({run.failed[0][1]})" if run.failed else ""
            raise InputError(f"{check_dir}: no image of the check folder could be run{why}.")
        use_cls, use_seg = cfg.has_cls and layout.labels, cfg.has_seg and layout.masks
        result = score(out / "predictions.csv" if use_cls else None, layout.labels if use_cls else None,
                       out if use_seg else None, layout.masks if use_seg else None)
    seg, cls = result["segmentation"], result["classification"]
    return {"JAC": seg["jac"] if seg else None, "BACC": cls["bacc"] if cls else None,
            "melanoma AUC": cls["per_class"]["melanoma"]["auc"] if cls else None,
            "images": (seg or cls)["n_images"]}


def check_folder(check_dir: Path, cfg: ModelConfig) -> Layout:
    """The layout of a --check folder, refused unless it can score this model: images, and masks
    (for a model with a mask head) or labels (with a class head), the labels readable."""
    layout = resolve_layout(check_dir)
    if not find_images(layout.images):
        raise InputError(f"{check_dir}: --check needs a labelled folder, and {layout.images} has no images.")
    masks = layout.masks if cfg.has_seg else None
    labels = layout.labels if cfg.has_cls else None
    if masks is None and labels is None:
        wanted = " or ".join([w for w, ok in (("masks/", cfg.has_seg), ("labels.csv", cfg.has_cls)) if ok])
        raise InputError(f"{check_dir}: --check needs a labelled folder, and it has no {wanted} to score this "
                         f"{cfg.task} model on (expected images/ with {wanted} beside it).")
    if labels is not None:
        read_class_csv(labels, role="truth")  # a bad label file is named now, not after the export
    return layout


def check_target(folder: Path, out_dir: Path, fmt: str = "tflite") -> None:
    """Refuse an --out the export would damage: a file, the model folder itself, or any other
    model folder (its config.json would become the export's, and the folder would then run the
    exported file instead of its weights). An earlier export's folder may be overwritten; a
    --format keras copy is a model folder, written only into a new or empty folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is a file; --out is a folder (it gets the model file and its config.json).")
    if out_dir.suffix.lower() in (".tflite", ".onnx"):
        raise InputError(f"{out_dir}: --out is a folder (it gets the model file and its config.json).")
    if fmt == "keras" and out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir}: already exists and is not empty; --format keras writes a model folder, "
                         "so name a new folder for it.")
    if out_dir.resolve() == folder.resolve():
        raise InputError(f"{out_dir}: is the model folder itself; its config.json would be replaced by the export's. "
                         f"Write the export into a folder of its own, e.g. --out {out_dir / 'litert'}.")
    config = out_dir / "config.json"
    if config.exists():
        try:
            is_export = bool(read_json(config, "config").get("export"))
        except InputError:
            is_export = False
        if not is_export:
            raise InputError(f"{config}: --out holds a model folder's config.json, which the export would replace; "
                             "write the export into a folder of its own.")
    elif out_dir.is_dir():  # a folder of the user's: what stands where the export's files go is theirs
        # the export's file or folder, and classifier.tflite, which commit_export removes as stale
        # whatever the format: a folder there (or anything where a SavedModel goes) is the user's
        for name in ([FORMATS[fmt]] if fmt != "keras" else []) + [CLASSIFIER_FILE]:
            there = out_dir / name
            if there.is_dir() and not there.is_symlink() or name == FORMATS.get(fmt) == "saved_model" and there.exists():
                raise InputError(f"{there}: already there, where the export writes or replaces a "
                                 f"{'folder' if name == 'saved_model' else 'file'}, in a folder that holds no "
                                 "export (no config.json); move it away or name another --out.")


def export(model_dir: Path, out_dir: Path, fmt: str, quantize: str = "none", calibration: Path | None = None,
           check: Path | None = None, log=print) -> ExportReport:
    """Write the export (see modelio.write_export), compare it with the Keras model, and score
    both on `check` when given. Returns what was measured."""
    folder, _, kind = resolve_model(model_dir)
    if kind != "keras":
        raise InputError(f"{model_dir}: already an export; export from the model folder (config.json + weights).")
    out_dir = Path(out_dir)
    check_format(fmt, quantize, calibration is not None)
    check_target(folder, out_dir, fmt)
    cfg, _, _ = load_config(folder)
    if check is not None:  # every input is checked before any work: a refusal leaves nothing behind
        check_folder(check, cfg)
    calib = load_inputs(calibration, cfg, CALIBRATION_IMAGES, log) if calibration else None
    started = time.perf_counter()
    # built whole in a folder of its own, checked there, then moved in: an interrupted or failed
    # export leaves the folder as it was (an earlier export in it still runs) and nothing new
    final = Path(out_dir).resolve()  # through a link to the folder it names (staging goes beside or in it)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where a folder of the path should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(out_dir)) from None
    try:
        staging = staging_folder(final)
    except OSError as exc:  # a read-only --out: named as asked for, not as the folder that was not made
        raise OSError(exc.errno, exc.strerror, str(out_dir)) from None
    try:
        if fmt == "keras":
            path = write_keras(folder, staging, quantize) / "model.weights.h5"
        else:
            path = write_export(folder, staging, fmt, quantize, calib,
                                calibration_from=shown_path(calibration) if calibration else None)
        seconds = time.perf_counter() - started
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        extra = staging / CLASSIFIER_FILE if fmt == "tflite" else None
        if extra is not None and extra.is_file():  # a joint model's classifier-only file travels with it
            size += extra.stat().st_size
        if check is not None:
            x = load_inputs(resolve_layout(check).images, cfg, COMPARE_IMAGES, log)
        elif calib is not None:
            x = calib[:COMPARE_IMAGES]
        else:
            x = synthetic_inputs(cfg)
        # only a TFLite export carries a classifier file of its own; a keras copy's is its own graph
        difference = compare_outputs(KerasEngine(folder), load_engine(staging), x, cfg.threshold,
                                     classifier=fmt == "tflite")
        report = ExportReport(out_dir / path.relative_to(staging), size, seconds, difference)
        if check is not None:
            log(f"scoring the Keras and the exported model on {check} ...")
            report.check = {"keras": score_folder(folder, check, engine="keras"), "export": score_folder(staging, check)}
        commit_export(staging, final)
        if fmt == "savedmodel":  # written here: this process may run it (modelio._check_savedmodel_trusted)
            trust_written_savedmodel(final / FORMATS[fmt])
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        named = str(getattr(exc, "filename", "") or "")
        if isinstance(exc, OSError) and (named.startswith(str(staging)) or disk_full(exc)):
            # name the folder asked for: not the staging folder, nor the source a full disk's copy had open
            raise OSError(exc.errno or errno.ENOSPC, exc.strerror or os.strerror(errno.ENOSPC), str(out_dir)) from None
        if isinstance(exc, Exception) and not isinstance(exc, OSError) and (
                not isinstance(exc, InputError) or str(staging) in str(exc)):
            raise InputError(failed_export(exc, out_dir, staging, fmt, quantize)) from None
        raise
    return report


def failed_export(exc: Exception, out_dir: Path, staging: Path, fmt: str, quantize: str) -> str:
    """One sentence for a converter or runtime that failed on the model (TensorFlow's, LiteRT's,
    tf2onnx's own errors): the export asked for, that nothing was written, and the error's first
    words, with the staging folder (removed by now) named as the folder asked for."""
    text = " ".join(str(exc).replace(str(staging), str(out_dir)).split()) or type(exc).__name__
    text = text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}"
    how = f" --quantize {quantize}" if quantize != "none" else ""
    return (f"{out_dir}: the {fmt}{how} export of this model failed, and nothing was written "
            f"({text[:320].rstrip('.')}{'...' if len(text) > 320 else ''}).")


def commit_export(staging: Path, final: Path) -> None:
    """Move the finished export from `staging` onto `final` (`io.publish`).

    The export was built and checked in `staging` (the long part, which a failure or Ctrl-C
    leaves the folder untouched by); this is a few renames. A new or empty `final` simply gets
    the files. An earlier export's folder (check_target lets only such a folder, or one without
    config.json, be reused) gets the new files: its config.json goes first, so the folder is
    never the old config.json over new model files, then every export file of dermtool's
    (model.tflite, model.onnx, saved_model/, classifier.tflite) the new export does not have is
    removed, so a stale file of another format cannot run under the new config.json. In a folder
    without an export's config.json only a stale classifier.tflite goes; other files stay.
    """
    earlier = (final / "config.json").is_file()  # an earlier export's (check_target refused a model folder's)
    # first: without config.json the folder is no export at all, so a failure in the few renames
    # below leaves one that is refused by name, never old settings over new files
    (final / "config.json").unlink(missing_ok=True)
    new = {p.name for p in staging.iterdir()}
    for name in (*FORMATS.values(), CLASSIFIER_FILE):
        if not earlier and name != CLASSIFIER_FILE:  # a folder of the user's: their model.onnx stays
            continue
        target = final / name
        if name in new or not (target.exists() or target.is_symlink()):
            continue
        if target.is_dir() and not target.is_symlink():
            if earlier:  # an earlier export's own saved_model/; a folder of the user's is never removed
                shutil.rmtree(target)
        else:
            target.unlink()
    publish(staging, final)  # config.json last
