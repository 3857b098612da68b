"""Segmentation and classification metrics as plain numpy functions.

This is the one implementation used by `dermtool score`, by training's validation and by the
benchmarks. The conventions follow the ISIC challenge scorer:

- masks are boolean arrays; Jaccard and Dice are 1.0 when both masks are empty (no epsilon
  smoothing anywhere, so the empty case is decided here, in the open);
- the ISIC 2018 thresholded Jaccard counts an image whose Jaccard is below 0.65 as 0;
- classes are indices into `dermtool.CLASS_NAMES` (melanoma, seborrheic_keratosis, nevus); a
  confusion matrix has true classes as rows and predicted classes as columns;
- balanced accuracy is the mean of the per-class sensitivities, over the classes that occur in
  the truth (a class with no true cases has no sensitivity);
- ROC AUC is the rank (Mann-Whitney) statistic with ties counted half, equal to the area under
  the trapezoidal ROC curve.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

#: The ISIC 2018 Task 1 threshold: an image with Jaccard below it scores 0.
JAC_THRESHOLD = 0.65


def _overlap_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (intersection, union) pixel counts over the last two axes."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, truth {truth.shape}")
    intersection = np.logical_and(pred, truth).sum(axis=(-2, -1))
    union = np.logical_or(pred, truth).sum(axis=(-2, -1))
    return intersection, union


def jaccard_batch(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Jaccard index |P ∩ T| / |P ∪ T| of each mask pair in a batch (..., H, W).

    A pair of empty masks scores 1.0: nothing to find and nothing found is a perfect answer
    (the ISIC scorer's rule).

    Returns:
        float64 array with the batch shape (a 0-d array for a single H x W pair).
    """
    intersection, union = _overlap_counts(pred, truth)
    # np.maximum only keeps the division defined; where union == 0 the 1.0 rule decides.
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1)).astype(np.float64)


def jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard index |P ∩ T| / |P ∪ T| of two boolean masks of equal shape.

    Both masks empty -> 1.0 (documented rule, no smoothing). Prediction empty but truth not
    (or the reverse) -> 0.0.
    """
    return float(jaccard_batch(pred, truth))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient 2|P ∩ T| / (|P| + |T|) of two boolean masks of equal shape.

    Both masks empty -> 1.0, as for `jaccard`. Dice = 2J / (1 + J) for the same pair.
    """
    intersection, union = _overlap_counts(pred, truth)
    total = int(intersection) + int(union)  # |P| + |T| = |P ∩ T| + |P ∪ T|
    return 1.0 if total == 0 else 2.0 * int(intersection) / total


def thresholded_jaccard(jacs: np.ndarray, threshold: float = JAC_THRESHOLD) -> float:
    """Mean of per-image Jaccard values where an image below `threshold` counts 0 (ISIC 2018).

    An image at exactly the threshold keeps its value. Returns nan for no images.
    """
    jacs = np.asarray(jacs, dtype=np.float64)
    if jacs.size == 0:
        return float("nan")
    return float(np.where(jacs < threshold, 0.0, jacs).mean())


def to_labels(probabilities: np.ndarray) -> np.ndarray:
    """Class index per row of an (N, 3) array of (melanoma, seborrheic_keratosis, nevus) scores.

    The class is the argmax; an exact tie goes to the earlier class in that order.
    """
    return np.argmax(np.asarray(probabilities), axis=1)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Counts of (true class, predicted class): rows are true, columns are predicted.

    Args:
        y_true, y_pred: integer class indices in [0, n_classes), equal length.

    Returns:
        int64 array of shape (n_classes, n_classes).
    """
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"label counts differ: {y_true.size} true, {y_pred.size} predicted")
    for name, labels in (("true", y_true), ("predicted", y_pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"{name} labels must lie in [0, {n_classes})")
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def _ratio(numerator: int, denominator: int) -> float:
    """numerator / denominator, nan when the denominator is 0 (the rate is undefined)."""
    return numerator / denominator if denominator else float("nan")


def per_class_stats(cm: np.ndarray) -> list[dict]:
    """One-vs-all statistics of each class from a confusion matrix (rows true, columns predicted).

    For class k: TP = cm[k, k]; FN = rest of row k; FP = rest of column k; TN = everything else.
    sensitivity = TP / (TP + FN), specificity = TN / (TN + FP), accuracy = (TP + TN) / N.
    A rate whose denominator is 0 (no true cases, or no negatives) is nan, never a guess.

    Returns:
        a list, one dict per class in matrix order, with keys
        tp, tn, fp, fn (int) and sensitivity, specificity, accuracy (float).
    """
    cm = np.asarray(cm, dtype=np.int64)
    total = int(cm.sum())
    stats = []
    for k in range(cm.shape[0]):
        tp = int(cm[k, k])
        fn = int(cm[k, :].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = total - tp - fn - fp
        stats.append(
            {
                "tp": tp,
                "tn": tn,
                "fp": fp,
                "fn": fn,
                "sensitivity": _ratio(tp, tp + fn),
                "specificity": _ratio(tn, tn + fp),
                "accuracy": _ratio(tp + tn, total),
            }
        )
    return stats


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean of the per-class sensitivities (recall), over the classes present in the truth.

    A class with no true cases has no sensitivity and is left out of the mean, as the ISIC
    scorer does. Returns nan for an empty matrix.
    """
    cm = np.asarray(cm, dtype=np.int64)
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(cm)[present] / support[present]))


def accuracy(cm: np.ndarray) -> float:
    """Categorical accuracy: the fraction of cases on the diagonal (nan when empty)."""
    cm = np.asarray(cm, dtype=np.int64)
    return _ratio(int(np.trace(cm)), int(cm.sum()))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)  # rank of the last member of each group of equal values
    mean_rank = last_rank - (counts - 1) / 2.0
    return mean_rank[inverse.ravel()]


def _binary_inputs(y_true_binary, scores) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(labels as bool, scores as float64, positives, negatives), flattened and checked."""
    y_true = np.asarray(y_true_binary).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if y_true.shape != scores.shape:
        raise ValueError(f"lengths differ: {y_true.size} labels, {scores.size} scores")
    n_pos = int(y_true.sum())
    return y_true, scores, n_pos, y_true.size - n_pos


def roc_auc(y_true_binary: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, as the probability that a positive outscores a negative.

    Computed from ranks (Mann-Whitney U / (n_pos * n_neg)); a positive and a negative with
    equal scores count half. This equals the trapezoidal area under the ROC curve (scikit-learn's
    `roc_auc_score`, used by the ISIC 2017 scorer).

    Returns:
        the AUC, or nan when only one class is present (the AUC is undefined).
    """
    y_true, scores, n_pos, n_neg = _binary_inputs(y_true_binary, scores)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u_statistic = ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def roc_curve(y_true_binary: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points of the ROC curve: one per distinct score, from (0, 0) to (1, 1).

    A case is called positive when its score is >= the threshold; tied scores move together, so
    the trapezoidal area under these points is exactly `roc_auc` (ties counted half).

    Returns:
        (false positive rates, true positive rates, thresholds), the thresholds descending with
        +inf first (nothing called positive); empty arrays when only one class is present.
    """
    y_true, scores, n_pos, n_neg = _binary_inputs(y_true_binary, scores)
    if n_pos == 0 or n_neg == 0:
        return np.empty(0), np.empty(0), np.empty(0)
    tp, fp = _counts_at_thresholds(y_true, scores)  # the curve only turns between scores
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr, np.r_[np.inf, np.unique(scores)[::-1]]


def _counts_at_thresholds(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) when every case scoring >= each distinct score is
    called positive, the scores taken from the highest down."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_true = scores[order], y_true[order]
    last_of_tie = np.r_[np.diff(sorted_scores) != 0, True]
    return np.cumsum(sorted_true)[last_of_tie], np.cumsum(~sorted_true)[last_of_tie]


def average_precision(y_true_binary: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, as the ISIC scorer computes it (scikit-learn's `average_precision_score`):
    the sum over distinct scores, highest first, of (recall gained) x (precision there); no
    interpolation. nan when there is no positive case."""
    y_true, scores, n_pos, _ = _binary_inputs(y_true_binary, scores)
    if n_pos == 0:
        return float("nan")
    tp, fp = _counts_at_thresholds(y_true, scores)
    recall_gained = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_gained * tp / (tp + fp)))


#: the sensitivities at which the ISIC 2017 challenge reported each class's specificity
CHALLENGE_SENSITIVITIES = (0.82, 0.89, 0.95)


def specificity_at_sensitivity(y_true_binary: np.ndarray, scores: np.ndarray, sensitivity: float) -> float:
    """Specificity at the first point of the ROC curve whose sensitivity reaches `sensitivity`,
    as the ISIC 2017 scorer found it: on scikit-learn's `roc_curve` with its default
    drop_intermediate, which leaves out a point lying on the straight line, in equal steps,
    between its neighbours; 0.0 when no point reaches it. nan when only one class is present."""
    y_true, scores, n_pos, n_neg = _binary_inputs(y_true_binary, scores)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tp, fp = _counts_at_thresholds(y_true, scores)
    if len(tp) > 2:
        kept = np.r_[True, (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), True]
        tp, fp = tp[kept], fp[kept]
    reached = np.flatnonzero(tp / n_pos >= sensitivity)
    return float(1.0 - fp[reached[0]] / n_neg) if reached.size else 0.0


#: Bins of the expected calibration error (equal width on [0, 1], as in Guo et al. 2017).
ECE_BINS = 15


def calibration_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """The rows of (N, C) probabilities in equal-width bins of their confidence.

    The confidence of a row is its highest probability, and the row is correct when that class
    (the argmax, ties to the earlier class) is the true one. Bin b (1-based) holds the rows with
    confidence in ((b - 1) / n_bins, b / n_bins], the first bin also 0.

    Returns:
        {"counts": rows per bin, "confidence": their mean confidence, "accuracy": the share
        correct} (both nan for an empty bin), each of length n_bins.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    if probs.shape[0] != y_true.size:
        raise ValueError(f"lengths differ: {probs.shape[0]} probability rows, {y_true.size} labels")
    confidence = probs.max(axis=1) if y_true.size else np.empty(0)
    correct = (to_labels(probs) == y_true) if y_true.size else np.empty(0, bool)
    # rounded first, so that a confidence on an edge (0.4 * 15 = 6.000000000000001) stays in its bin
    bins = np.clip(np.ceil(np.round(confidence * n_bins, 9)).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins) / counts
        accuracy_in_bin = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins) / counts
    return {"counts": counts, "confidence": mean_confidence, "accuracy": accuracy_in_bin}


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the argmax decision over equal-width confidence bins
    (`calibration_bins` defines the confidence, correctness and bins):

        ECE = sum over bins of (rows in bin / all rows) * |accuracy in bin - mean confidence in bin|

    Empty bins add nothing; no smoothing. Returns nan for no rows.
    """
    bins = calibration_bins(probs, y_true, n_bins)
    counts = bins["counts"]
    if counts.sum() == 0:
        return float("nan")
    used = counts > 0
    gaps = np.abs(bins["accuracy"][used] - bins["confidence"][used])
    return float(np.sum(counts[used] * gaps) / counts.sum())


def negative_log_likelihood(probs: np.ndarray, y_true: np.ndarray, floor: float = 0.0) -> float:
    """Mean of -log p[true class] over the rows of (N, C) probabilities (the log loss).

    A probability below `floor` counts as `floor` (0: none, and a zero on the true class gives
    inf). Returns nan for no rows.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    if y_true.size == 0:
        return float("nan")
    with np.errstate(divide="ignore"):
        return float(-np.mean(np.log(np.maximum(probs[np.arange(y_true.size), y_true], floor))))


#: resamples drawn at a time: memory stays at 1,000 x the images, however many are asked for
BOOTSTRAP_CHUNK = 1000


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n_items: int,
    n_resamples: int,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a statistic over resampled items (images).

    Args:
        statistic: maps an index array (items drawn with replacement) to a number, e.g.
            `lambda idx: jacs[idx].mean()`. Resamples where it is nan are skipped.
        n_items: how many items there are to draw from.
        n_resamples: how many bootstrap resamples to draw.
        seed: seed of the random generator; the same seed gives the same interval.
        level: coverage of the interval (0.95 -> the 2.5th and 97.5th percentiles).

    Returns:
        (low, high), or (nan, nan) when there is nothing to resample.
    """
    if n_items <= 0 or n_resamples <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, BOOTSTRAP_CHUNK):  # the same draws as one (n_resamples, n_items) array
        draws = rng.integers(0, n_items, size=(min(BOOTSTRAP_CHUNK, n_resamples - start), n_items))
        values[start:start + len(draws)] = [statistic(indices) for indices in draws]
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)
