"""Score predictions against ground truth: read CSVs and mask folders, call metrics, report.

`score()` returns a plain dict whose keys scripts depend on (written by `dermtool score --json`);
`render()` draws the same numbers as rich tables.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from dermtool import CLASS_NAMES
from dermtool import io, metrics
from dermtool.errors import InputError

#: Class names as table labels, short enough for an 80-column terminal.
_SHORT_NAMES = {"seborrheic_keratosis": "seb. keratosis"}


def score(
    pred_csv: Path | None,
    truth_csv: Path | None,
    pred_masks: Path | None = None,
    truth_masks: Path | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Score classification (two CSVs) and/or segmentation (two mask folders).

    Args:
        pred_csv, truth_csv: ISIC 2017 Part 3 CSVs; both None skips classification.
        pred_masks, truth_masks: folders of `<image_id>_segmentation.png`; both None skips
            segmentation. Every truth mask is scored; a missing prediction scores 0.
        bootstrap: number of bootstrap resamples of the images for 95 % intervals of JAC and
            BACC (0: no intervals).
        seed: seed of the bootstrap.

    Returns:
        {"segmentation": dict | None, "classification": dict | None,
         "mean_performance": (JAC + BACC) / 2 or None (also None when the truth masks and the
         truth CSV share no image), "mean_performance_note": why not, or that the two halves
         cover different images, else None, "bootstrap": dict | None}.

    Raises:
        InputError: any bad input, with one sentence naming the file.
    """
    for name, value in (("pred_csv", pred_csv), ("truth_csv", truth_csv), ("pred_masks", pred_masks),
                        ("truth_masks", truth_masks)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise InputError(f"{name} must be a path, not {type(value).__name__}.")
    for name, value in (("bootstrap", bootstrap), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputError(f"{name} must be a whole number, not {value!r}.")
    if not 0 <= seed <= 2**32 - 1:
        raise InputError(f"seed must be from 0 to 2^32 - 1, not {seed}.")
    if (pred_csv is None) != (truth_csv is None):
        raise InputError("Classification needs both a predictions CSV and a truth CSV.")
    if (pred_masks is None) != (truth_masks is None):
        raise InputError("Segmentation needs both --pred-masks and --truth-masks folders.")
    if pred_csv is None and pred_masks is None:
        raise InputError("Nothing to score: give two CSVs and/or two mask folders.")
    if bootstrap < 0:
        raise InputError(f"--bootstrap must be 0 or more, not {bootstrap}.")
    classification = None
    if pred_csv is not None:
        classification = score_classification(pred_csv, truth_csv, bootstrap=bootstrap, seed=seed)
    segmentation = None
    if pred_masks is not None:
        segmentation = score_segmentation(pred_masks, truth_masks, bootstrap=bootstrap, seed=seed)
    mean_performance, mean_note = None, None
    if classification is not None and segmentation is not None:
        seg_ids = {io.id_key(i) for i in segmentation["per_image"]}
        cls_ids = {io.id_key(i) for i in classification["per_image"]}
        common = seg_ids & cls_ids
        if not common:
            mean_note = (f"no mean performance: the {len(seg_ids)} truth masks and the {len(cls_ids)} rows of the "
                         "truth CSV name no image in common")
        else:
            # Thesis eq. 11: one number for the joint task.
            mean_performance = (segmentation["jac"] + classification["bacc"]) / 2.0
            if seg_ids != cls_ids:
                mean_note = (f"the mean performance joins two image sets: JAC of {len(seg_ids)} images (truth masks), "
                             f"BACC of {len(cls_ids)} (truth CSV), {len(common)} of them in both")
    return _plain(
        {
            "segmentation": segmentation,
            "classification": classification,
            "mean_performance": mean_performance,
            "mean_performance_note": mean_note,
            "bootstrap": {"n_resamples": bootstrap, "seed": seed} if bootstrap else None,
        }
    )


#: how far a row's three class values may sum from 1 and still be read as probabilities (rounded
#: to one decimal, three values sum to 0.85-1.15; independent scores often sum far from 1)
SUM_TOLERANCE = 0.2


def score_classification(
    pred_csv: Path, truth_csv: Path, bootstrap: int = 0, seed: int = 0
) -> dict[str, Any]:
    """Classification metrics of every truth image; the predictions must cover all of them.

    True and predicted classes are the argmax over (melanoma, seborrheic_keratosis, nevus).
    Prediction rows for images not in the truth are ignored. Beside them: `decision`, the same
    figures for the classes the CSV's `label` column names (the decision `dermtool infer` made,
    e.g. at a melanoma threshold; None without that column, or with values that are not class
    names, which `decision_note` then names), and `ece`, the expected
    calibration error of the probabilities (`metrics.expected_calibration_error`, 15 bins; None,
    with `ece_note` saying why, when some rows' values do not sum to 1 within SUM_TOLERANCE).
    """
    ids, y_true, pred_probs = class_arrays(pred_csv, truth_csv)
    y_pred = metrics.to_labels(pred_probs)
    cm = metrics.confusion_matrix(y_true, y_pred, n_classes=len(CLASS_NAMES))
    per_class = {}
    for k, (name, stats) in enumerate(zip(CLASS_NAMES, metrics.per_class_stats(cm))):
        stats["auc"] = metrics.roc_auc(y_true == k, pred_probs[:, k])
        per_class[name] = stats
    result = {
        "bacc": metrics.balanced_accuracy(cm),
        "accuracy": metrics.accuracy(cm),
        "n_images": len(ids),
        "classes": list(CLASS_NAMES),
        "confusion": cm.tolist(),
        "per_class": per_class,
        "per_image": {
            image_id: {"true": CLASS_NAMES[t], "pred": CLASS_NAMES[p]}
            for image_id, t, p in zip(ids, y_true, y_pred)
        },
        "bacc_ci95": None,
        "auc_ci95": None,
        "ece": None,
        "ece_note": None,
        "ece_bins": metrics.ECE_BINS,
        "decision": None,
        "decision_note": None,
    }
    result["challenge"] = challenge_scores(y_true, pred_probs)
    off = np.abs(pred_probs.sum(axis=1) - 1.0) > SUM_TOLERANCE
    if off.any():  # scores, not probabilities (ISIC accepts them): a calibration error means nothing
        result["ece_note"] = (f"ECE not computed: the three class values of {int(off.sum())} row(s) do not sum to 1 "
                              f"({io.first_few([i for i, o in zip(ids, off) if o])})")
    else:
        result["ece"] = metrics.expected_calibration_error(pred_probs, y_true)
    try:
        result["decision"] = decision_scores(pred_csv, ids, y_true, y_pred)
    except InputError as exc:  # another tool's "label" column: the argmax figures still stand
        result["decision_note"] = f"label column not scored: {exc}"
    if bootstrap:
        result["auc_ci95"] = {
            name: metrics.bootstrap_ci(
                lambda idx, k=k: metrics.roc_auc(y_true[idx] == k, pred_probs[idx, k]),
                len(ids), bootstrap, seed=seed)
            for k, name in enumerate(CLASS_NAMES)
        }
        result["bacc_ci95"] = metrics.bootstrap_ci(
            lambda idx: metrics.balanced_accuracy(
                metrics.confusion_matrix(y_true[idx], y_pred[idx], n_classes=len(CLASS_NAMES))
            ),
            len(ids),
            bootstrap,
            seed=seed,
        )
    return result


#: the probability above which the ISIC 2017 scorer called an image a class, column by column
CHALLENGE_CUT = 0.5


#: the challenge table's columns, as the terminal and the score page show them: header -> figure
CHALLENGE_COLUMNS = {"ACC": "accuracy", "SE": "sensitivity", "SP": "specificity", "AP": "average_precision",
                     **{f"SP@{round(t * 100)}": f"spec_at_sens_{round(t * 100)}" for t in metrics.CHALLENGE_SENSITIVITIES},
                     "AUC": "auc"}


def challenge_scores(y_true: np.ndarray, pred_probs: np.ndarray) -> dict[str, dict]:
    """The ISIC 2017 Part 3 scorer's figures: melanoma and seborrheic keratosis each alone, on
    its own probability column, and their mean.

    Each class is called where its probability is > 0.5 (not the argmax, so an image may be
    called both or neither): accuracy, sensitivity (None without a true case), specificity (None
    when every case is true); then, from the probabilities, average precision, specificity at
    sensitivity 0.82, 0.89 and 0.95 (`metrics.specificity_at_sensitivity`) and ROC AUC.
    """
    out: dict[str, dict] = {}
    for k, name in enumerate(CLASS_NAMES[:2]):
        truth, called = y_true == k, pred_probs[:, k] > CHALLENGE_CUT
        tp, fn = int(np.sum(truth & called)), int(np.sum(truth & ~called))
        fp, tn = int(np.sum(~truth & called)), int(np.sum(~truth & ~called))
        figures = {
            "accuracy": (tp + tn) / len(truth),
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "average_precision": metrics.average_precision(truth, pred_probs[:, k]),
        }
        for target in metrics.CHALLENGE_SENSITIVITIES:
            figures[f"spec_at_sens_{round(target * 100)}"] = metrics.specificity_at_sensitivity(
                truth, pred_probs[:, k], target)
        figures["auc"] = metrics.roc_auc(truth, pred_probs[:, k])
        out[name] = figures
    both = out.values()
    out["mean"] = {key: _mean_or_none([figures[key] for figures in both]) for key in out[CLASS_NAMES[0]]}
    return out


def _mean_or_none(values: list) -> float | None:
    """The mean of numbers, None when one of them is undefined (None or nan)."""
    if any(v is None or math.isnan(v) for v in values):
        return None
    return float(np.mean(values))


def decision_scores(pred_csv: Path, ids: list[str], y_true: np.ndarray, y_argmax: np.ndarray) -> dict | None:
    """BACC, accuracy, confusion and per-class SE/SP of the classes in the CSV's `label` column
    (None without one), and how many labels differ from the argmax."""
    labels = io.read_label_column(Path(pred_csv))
    if labels is None:
        return None
    labels = io.by_own_ids(labels, ids)
    y_pred = np.array([CLASS_NAMES.index(labels[image_id]) for image_id in ids], dtype=np.int64)
    cm = metrics.confusion_matrix(y_true, y_pred, n_classes=len(CLASS_NAMES))
    return {
        "source": "label column",
        "bacc": metrics.balanced_accuracy(cm),
        "accuracy": metrics.accuracy(cm),
        "confusion": cm.tolist(),
        "per_class": dict(zip(CLASS_NAMES, metrics.per_class_stats(cm))),
        "n_differ_from_argmax": int(np.sum(y_pred != y_argmax)),
    }


def class_arrays(pred_csv: Path, truth_csv: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(truth ids in file order, true class indices, predicted probabilities (N, 3)) of two CSVs.

    The one reading of the CSVs that the scores and the plots of `dermtool score` share.
    """
    truth = io.read_class_csv(Path(truth_csv), role="truth")
    pred = io.read_class_csv(Path(pred_csv), role="predictions")
    ids = list(truth)
    pred = io.by_own_ids(pred, ids)  # an id in the other Unicode form is the same image
    missing = [image_id for image_id in ids if image_id not in pred]
    if missing:
        raise InputError(
            f"The predictions CSV {pred_csv} has no row for {len(missing)} image(s) of the "
            f"truth CSV {truth_csv}: {io.first_few(missing)}."
        )
    truth_probs = np.stack([truth[image_id] for image_id in ids])
    pred_probs = np.stack([pred[image_id] for image_id in ids])
    return ids, metrics.to_labels(truth_probs), pred_probs


def score_segmentation(
    pred_masks: Path, truth_masks: Path, bootstrap: int = 0, seed: int = 0
) -> dict[str, Any]:
    """Segmentation metrics over every truth mask in `truth_masks`.

    A truth mask without a prediction scores JAC = Dice = 0 and is counted in `n_missing`;
    truth masks with no lesion are counted in `n_empty_truth` (they score 1 only when the
    prediction is empty too, so many of them flatter or sink JAC: the count says which);
    a prediction of another size than its truth mask is an error (never a silent resize).
    Masks stored as 0 and one value v other than 255 (0/1, 0/128 ...) are read with foreground
    = v, as the ISIC scorer reads them (`io.binarise_mask`; v only: a lesion filling the frame),
    and counted in `n_zero_one_masks`, truth and predictions together; a label map
    (`io.is_label_map`) is refused, and so is a predicted folder with no mask of a truth image.
    """
    for folder, role in ((pred_masks, "predicted"), (truth_masks, "truth")):
        if not Path(folder).is_dir():
            raise InputError(f"The {role} mask folder {folder} does not exist or is not a folder.")
    truth_paths = mask_ids_as_read(io.find_masks(Path(truth_masks)), truth_masks)
    pred_paths = mask_ids_as_read(io.find_masks(Path(pred_masks)), pred_masks)
    if not truth_paths:
        raise InputError(
            f"The truth mask folder {truth_masks} has no files named <image_id>{io.MASK_SUFFIX}."
        )
    if not pred_paths:
        raise InputError(
            f"The predicted mask folder {pred_masks} has no files named <image_id>{io.MASK_SUFFIX} "
            "(the names dermtool infer writes); is it the right folder?"
        )
    n_pred, pred_paths = len(pred_paths), io.by_own_ids(pred_paths, truth_paths)
    if not pred_paths.keys() & truth_paths.keys():
        raise InputError(
            f"None of the {n_pred} predicted masks in {pred_masks} names an image of the "
            f"{len(truth_paths)} truth masks in {truth_masks} (e.g. {list(pred_paths)[0]} "
            f"against {list(truth_paths)[0]}); is it the right folder?"
        )
    jacs, dices = [], []
    n_missing = n_empty_pred = n_empty_truth = n_zero_one = 0
    for image_id, truth_path in truth_paths.items():
        truth, zero_one = _read_mask(truth_path)
        n_zero_one += zero_one
        n_empty_truth += int(not truth.any())
        if image_id not in pred_paths:
            n_missing += 1
            jacs.append(0.0)
            dices.append(0.0)
            continue
        pred, zero_one = _read_mask(pred_paths[image_id])
        n_zero_one += zero_one
        _check_same_size(pred, truth, pred_paths[image_id], truth_path)
        n_empty_pred += int(truth.any() and not pred.any())
        jacs.append(metrics.jaccard(pred, truth))
        dices.append(metrics.dice(pred, truth))
    jac_values = np.array(jacs)
    result = {
        "jac": float(jac_values.mean()),
        "dice": float(np.mean(dices)),
        "jac_thresholded": metrics.thresholded_jaccard(jac_values),
        "frac_below_065": float(np.mean(jac_values < metrics.JAC_THRESHOLD)),
        "n_images": len(jacs),
        "n_missing": n_missing,
        "n_empty_pred": n_empty_pred,
        "n_empty_truth": n_empty_truth,
        "n_zero_one_masks": n_zero_one,
        "per_image": dict(zip(truth_paths, jacs)),
        "jac_ci95": None,
    }
    if bootstrap:
        result["jac_ci95"] = metrics.bootstrap_ci(
            lambda idx: jac_values[idx].mean(), len(jacs), bootstrap, seed=seed
        )
    return result


def mask_ids_as_read(masks: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Mask ids as the CSV readers read ids (spaces around them stripped), so that the
    segmentation and classification halves of one score name an image alike."""
    stripped: dict[str, Path] = {}
    for image_id, path in masks.items():
        key = image_id.strip()
        if not key:
            continue
        if key in stripped:
            raise InputError(f"The mask folder {folder} has two masks of image {key!r}: {stripped[key].name!r} and "
                             f"{path.name!r} (spaces around an id do not count, as in the CSVs).")
        stripped[key] = path
    return stripped


def _read_mask(path: Path) -> tuple[np.ndarray, bool]:
    """A mask as booleans, and whether it was stored as 0 and one value v other than 255 (0/1,
    0/128 ...: v = lesion, as the ISIC scorer reads it)."""
    values = io.read_mask_values(path)
    lesion = io.two_valued_lesion(values)
    if io.is_label_map(values, lesion):
        found = ", ".join(f"{v:g}" for v in np.unique(values)[:6])
        raise InputError(f"The mask file {path} has the values {found}: a label map, not a lesion mask "
                         "(0 and 255, or 0 and one other value); > 128 would read it as empty.")
    return io.binarise_mask(values, lesion), lesion is not None


def _check_same_size(pred: np.ndarray, truth: np.ndarray, pred_path: Path, truth_path: Path) -> None:
    """A prediction must be at its truth mask's size: never resized silently."""
    if pred.shape != truth.shape:
        raise InputError(
            f"The predicted mask {pred_path} is {pred.shape[1]}x{pred.shape[0]} pixels but its "
            f"truth mask {truth_path} is {truth.shape[1]}x{truth.shape[0]}; masks must be at the "
            "original image size."
        )


def _plain(value: Any) -> Any:
    """Turn numpy scalars, tuples and nan into JSON-ready Python values (nan -> None)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (np.integer, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write a `score()` result as indented JSON (null for undefined numbers)."""
    text = json.dumps(result, indent=2) + "\n"
    io.write_atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"), named=True)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci: list[float] | None) -> str:
    return "" if not ci or None in ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def render(result: dict[str, Any], console) -> None:
    """Print a `score()` result as rich tables on `console` (a `rich.console.Console`)."""
    seg, cls = result["segmentation"], result["classification"]
    if seg is not None:
        table = Table(title=f"Segmentation ({seg['n_images']} images)", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("95 % CI", justify="right")
        table.add_row("Jaccard (mean)", _fmt(seg["jac"]), _fmt_ci(seg["jac_ci95"]))
        table.add_row("Dice (mean)", _fmt(seg["dice"]), "")
        table.add_row("thresholded Jaccard (ISIC 2018)", _fmt(seg["jac_thresholded"]), "")
        table.add_row("images with Jaccard < 0.65", _fmt(seg["frac_below_065"], 3), "")
        table.add_row("missing predictions (scored 0)", str(seg["n_missing"]), "")
        table.add_row("empty predictions, lesion in truth", str(seg["n_empty_pred"]), "")
        table.add_row("empty truth masks (no lesion)", str(seg["n_empty_truth"]), "")
        if seg["n_zero_one_masks"]:
            table.add_row("masks stored as 0/v, e.g. 0/1 (read as v = lesion)", str(seg["n_zero_one_masks"]), "")
        console.print(table)
    if cls is not None:
        _render_classification(cls, console)
    if result["mean_performance"] is not None:
        console.print(f"mean performance (JAC + BACC) / 2 = {_fmt(result['mean_performance'])}")
    if result.get("mean_performance_note"):
        console.print(f"note: {result['mean_performance_note']}", highlight=False, markup=False, soft_wrap=True)


def _render_classification(cls: dict[str, Any], console) -> None:
    title = (
        f"Classification ({cls['n_images']} images): BACC {_fmt(cls['bacc'])} "
        f"{_fmt_ci(cls['bacc_ci95'])}  accuracy {_fmt(cls['accuracy'])}"
    )
    table = Table(title=title, title_justify="left")
    for column in ("class", "SE", "SP", "ACC", "AUC", "TP", "FN", "FP", "TN"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, stats in cls["per_class"].items():
        rates = [_fmt(stats[key]) for key in ("sensitivity", "specificity", "accuracy", "auc")]
        counts = [str(stats[key]) for key in ("tp", "fn", "fp", "tn")]
        table.add_row(_SHORT_NAMES.get(name, name), *rates, *counts)
    console.print(table)
    confusion = Table(title="Confusion matrix (rows true, columns predicted)", title_justify="left")
    confusion.add_column("")
    for name in cls["classes"]:
        confusion.add_column(_SHORT_NAMES.get(name, name), justify="right")
    for name, row in zip(cls["classes"], cls["confusion"]):
        confusion.add_row(_SHORT_NAMES.get(name, name), *map(str, row))
    console.print(confusion)
    if cls.get("challenge"):
        _render_challenge(cls["challenge"], console)
    if cls.get("ece_note"):
        console.print(cls["ece_note"], highlight=False, markup=False, soft_wrap=True)
    else:
        console.print(f"expected calibration error (ECE, {cls['ece_bins']} bins on the top probability): "
                      f"{_fmt(cls['ece'])}", highlight=False)
    decision = cls.get("decision")
    if decision is not None:
        _render_decision(decision, console)
    elif cls.get("decision_note"):
        console.print(f"note: {cls['decision_note']}", highlight=False, soft_wrap=True, markup=False)


def _render_challenge(challenge: dict[str, dict], console) -> None:
    """The ISIC 2017 scorer's figures (each class on its own column, called at > 0.5)."""
    table = Table(title="ISIC 2017 challenge figures (each class alone, called at p > 0.5)", title_justify="left")
    table.add_column("class")
    for column in CHALLENGE_COLUMNS:
        table.add_column(column, justify="right")
    for name, figures in challenge.items():
        # three digits: nine columns in an 80-column terminal
        table.add_row({"seborrheic_keratosis": "seb. ker."}.get(name, name),
                      *(_fmt(figures[key], 3) for key in CHALLENGE_COLUMNS.values()))
    console.print(table)


def _render_decision(decision: dict[str, Any], console) -> None:
    """The figures of the label column's decision (beside the argmax figures above)."""
    table = Table(title=f"Decision of the label column: BACC {_fmt(decision['bacc'])}  accuracy "
                        f"{_fmt(decision['accuracy'])}  ({decision['n_differ_from_argmax']} labels differ "
                        "from the argmax)", title_justify="left")
    for column in ("class", "SE", "SP", "TP", "FN", "FP", "TN"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, stats in decision["per_class"].items():
        table.add_row(_SHORT_NAMES.get(name, name), _fmt(stats["sensitivity"]), _fmt(stats["specificity"]),
                      *(str(stats[key]) for key in ("tp", "fn", "fp", "tn")))
    console.print(table)
