"""Metrics against cases worked out by hand, plus properties checked against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dermtool import metrics

# --- Jaccard and Dice on literal masks -----------------------------------------------------

# 4 pixels each, 2 shared: |P ∩ T| = 2, |P ∪ T| = 6.
PRED_A = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
TRUTH_A = np.array([[0, 1, 1], [0, 1, 1], [0, 0, 0]], dtype=bool)

# Prediction covers the whole 3x3 frame, the truth is a 5-pixel plus inside it.
PRED_B = np.ones((3, 3), dtype=bool)
TRUTH_B = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)

# 4x4: a 2x2 prediction inside a 2x3 truth: 4 shared of 6.
PRED_C = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
TRUTH_C = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)

EMPTY = np.zeros((3, 3), dtype=bool)


@pytest.mark.parametrize(
    ("pred", "truth", "expected_jac", "expected_dice"),
    [
        (PRED_A, TRUTH_A, 1 / 3, 4 / 8),
        (PRED_B, TRUTH_B, 5 / 9, 10 / 14),
        (PRED_C, TRUTH_C, 4 / 6, 8 / 10),
        (TRUTH_B, TRUTH_B, 1.0, 1.0),
    ],
)
def test_jaccard_and_dice_on_literal_masks(pred, truth, expected_jac, expected_dice):
    assert metrics.jaccard(pred, truth) == pytest.approx(expected_jac, abs=1e-15)
    assert metrics.dice(pred, truth) == pytest.approx(expected_dice, abs=1e-15)
    # Both are symmetric in their arguments.
    assert metrics.jaccard(truth, pred) == metrics.jaccard(pred, truth)
    assert metrics.dice(truth, pred) == metrics.dice(pred, truth)


def test_both_masks_empty_score_one():
    assert metrics.jaccard(EMPTY, EMPTY) == 1.0
    assert metrics.dice(EMPTY, EMPTY) == 1.0


@pytest.mark.parametrize(("pred", "truth"), [(EMPTY, TRUTH_B), (TRUTH_B, EMPTY)])
def test_one_empty_mask_scores_zero(pred, truth):
    assert metrics.jaccard(pred, truth) == 0.0
    assert metrics.dice(pred, truth) == 0.0


def test_no_smoothing_on_a_single_pixel():
    # An epsilon in numerator or denominator would move these off the exact fractions.
    one = np.zeros((3, 3), dtype=bool)
    one[1, 1] = True
    two = one.copy()
    two[0, 0] = True
    assert metrics.jaccard(one, one) == 1.0
    assert metrics.jaccard(one, two) == 0.5
    assert metrics.dice(one, two) == 2 / 3


def test_masks_of_different_shapes_are_rejected():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.jaccard(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


def test_jaccard_batch_matches_pairwise():
    preds = np.stack([PRED_A, PRED_B, EMPTY, EMPTY])
    truths = np.stack([TRUTH_A, TRUTH_B, EMPTY, TRUTH_B])
    np.testing.assert_allclose(metrics.jaccard_batch(preds, truths), [1 / 3, 5 / 9, 1.0, 0.0])


@settings(max_examples=60, deadline=None)
@given(
    arrays(bool, (5, 6)),
    arrays(bool, (5, 6)),
)
def test_dice_is_a_function_of_jaccard(pred, truth):
    jac = metrics.jaccard(pred, truth)
    assert 0.0 <= jac <= 1.0
    assert metrics.dice(pred, truth) == pytest.approx(2 * jac / (1 + jac))


def test_thresholded_jaccard_zeroes_images_below_065():
    # 0.64 and 0.5 count 0; exactly 0.65 keeps its value.
    jacs = np.array([0.5, 0.65, 0.9, 0.64])
    assert metrics.thresholded_jaccard(jacs) == pytest.approx((0.65 + 0.9) / 4)
    assert math.isnan(metrics.thresholded_jaccard(np.array([])))


# --- Classification: one 3-class confusion matrix worked by hand ---------------------------

# melanoma = 0, seborrheic keratosis = 1, nevus = 2
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
Y_PRED = [0, 1, 2, 1, 1, 2, 2, 0, 2, 1]
# Rows true, columns predicted:
#            mel  sk  nev
CM_HAND = [[1, 1, 1],  # true melanoma: one right, one called SK, one called nevus
           [0, 2, 0],  # true SK: both right
           [1, 1, 3]]  # true nevus: three right, one called melanoma, one SK
# One-vs-all, N = 10:
#   melanoma  TP 1 FN 2 FP 1 TN 6 -> SE 1/3, SP 6/7, ACC 7/10
#   SK        TP 2 FN 0 FP 2 TN 6 -> SE 1,   SP 6/8, ACC 8/10
#   nevus     TP 3 FN 2 FP 1 TN 4 -> SE 3/5, SP 4/5, ACC 7/10
# BACC = (1/3 + 1 + 3/5) / 3 = 29/45; categorical accuracy = 6/10.
STATS_HAND = [
    dict(tp=1, fn=2, fp=1, tn=6, sensitivity=1 / 3, specificity=6 / 7, accuracy=7 / 10),
    dict(tp=2, fn=0, fp=2, tn=6, sensitivity=1.0, specificity=6 / 8, accuracy=8 / 10),
    dict(tp=3, fn=2, fp=1, tn=4, sensitivity=3 / 5, specificity=4 / 5, accuracy=7 / 10),
]


def test_confusion_matrix_by_hand():
    cm = metrics.confusion_matrix(Y_TRUE, Y_PRED, n_classes=3)
    assert cm.tolist() == CM_HAND
    assert np.issubdtype(cm.dtype, np.integer)


def test_per_class_stats_by_hand():
    stats = metrics.per_class_stats(np.array(CM_HAND))
    assert len(stats) == 3
    for got, expected in zip(stats, STATS_HAND):
        for key in ("tp", "fn", "fp", "tn"):
            assert got[key] == expected[key], key
        for key in ("sensitivity", "specificity", "accuracy"):
            assert got[key] == pytest.approx(expected[key], abs=1e-15), key


def test_balanced_and_categorical_accuracy_by_hand():
    assert metrics.balanced_accuracy(np.array(CM_HAND)) == pytest.approx(29 / 45, abs=1e-15)
    assert metrics.accuracy(np.array(CM_HAND)) == pytest.approx(0.6, abs=1e-15)


def test_class_absent_from_truth_has_no_sensitivity_and_leaves_bacc():
    # No true SK: its sensitivity is undefined (nan), and BACC averages the other two classes.
    cm = np.array([[2, 1, 1], [0, 0, 0], [0, 1, 3]])
    stats = metrics.per_class_stats(cm)
    assert math.isnan(stats[1]["sensitivity"])
    assert stats[1]["specificity"] == pytest.approx(6 / 8)
    assert metrics.balanced_accuracy(cm) == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert math.isnan(metrics.balanced_accuracy(np.zeros((3, 3), int)))


def test_labels_out_of_range_are_rejected():
    with pytest.raises(ValueError):
        metrics.confusion_matrix([0, 3], [0, 1], n_classes=3)


def test_to_labels_takes_argmax_and_breaks_ties_towards_the_earlier_class():
    probs = np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.5, 0.0], [0.3, 0.35, 0.35]])
    assert metrics.to_labels(probs).tolist() == [1, 2, 0, 1]


# --- ROC AUC ------------------------------------------------------------------------------


def test_auc_with_ties_by_hand():
    # Positives score 0.9, 0.5, 0.7; negatives 0.5, 0.1, 0.7. Of the 9 (positive, negative)
    # pairs: 0.9 beats all 3; 0.5 beats 0.1 and ties 0.5 (1.5); 0.7 beats 0.5 and 0.1 and
    # ties 0.7 (2.5). AUC = (3 + 1.5 + 2.5) / 9 = 7/9.
    y = np.array([1, 1, 0, 0, 1, 0])
    scores = np.array([0.9, 0.5, 0.5, 0.1, 0.7, 0.7])
    assert metrics.roc_auc(y, scores) == pytest.approx(7 / 9, abs=1e-15)


def test_auc_extremes():
    y = np.array([0, 0, 1, 1])
    assert metrics.roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert metrics.roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auc_is_nan_with_one_class():
    assert math.isnan(metrics.roc_auc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(metrics.roc_auc([0, 0], [0.1, 0.5]))


def _auc_by_pairs(y: np.ndarray, scores: np.ndarray) -> float:
    """Brute force over every (positive, negative) pair, ties half."""
    pos, neg = scores[y], scores[~y]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0])),
        min_size=2,
        max_size=30,
    )
)
def test_auc_matches_pairwise_count(pairs):
    y = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs])
    got = metrics.roc_auc(y, scores)
    if y.all() or not y.any():
        assert math.isnan(got)
    else:
        assert got == pytest.approx(_auc_by_pairs(y, scores), abs=1e-12)


# --- bootstrap ----------------------------------------------------------------------------


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = np.linspace(0.0, 1.0, 50)
    stat = lambda idx: values[idx].mean()  # noqa: E731
    first = metrics.bootstrap_ci(stat, values.size, 300, seed=7)
    assert first == metrics.bootstrap_ci(stat, values.size, 300, seed=7)
    assert first != metrics.bootstrap_ci(stat, values.size, 300, seed=8)
    low, high = first
    assert low < values.mean() < high
    # The standard error of the mean of 50 values spread over [0, 1] is about 0.041, so the
    # 95 % interval is about +-0.08 wide.
    assert 0.05 < high - values.mean() < 0.12


def test_bootstrap_edge_cases():
    assert metrics.bootstrap_ci(lambda idx: 3.0, 10, 20) == (3.0, 3.0)
    low, high = metrics.bootstrap_ci(lambda idx: 1.0, 0, 20)
    assert math.isnan(low) and math.isnan(high)
    low, high = metrics.bootstrap_ci(lambda idx: float("nan"), 5, 20)
    assert math.isnan(low) and math.isnan(high)


# --- calibration: ECE and NLL -------------------------------------------------------------------

# Five rows; top probability and whether the argmax is the truth:
#   0.90 correct  -> bin 14 (13/15, 14/15] = (0.867, 0.933]
#   0.95 wrong    -> bin 15 (0.933, 1]
#   0.60 correct  -> bin 9  (0.533, 0.6]: an edge, 0.6 * 15 = 9 (floating point: 9.000000000000002)
#   0.55 wrong    -> bin 9
#   0.40 correct  -> bin 6  (0.333, 0.4]: an edge too
# bin 14: |1 - 0.90| = 0.10, 1 row; bin 15: |0 - 0.95| = 0.95, 1 row;
# bin 9: accuracy 1/2, mean confidence 0.575 -> 0.075, 2 rows; bin 6: |1 - 0.4| = 0.6, 1 row.
# ECE = (0.10 + 0.95 + 2 * 0.075 + 0.6) / 5 = 1.8 / 5 = 0.36
ECE_PROBS = np.array([[0.90, 0.05, 0.05], [0.95, 0.03, 0.02], [0.2, 0.6, 0.2], [0.55, 0.25, 0.20],
                      [0.3, 0.3, 0.4]])
ECE_TRUE = np.array([0, 2, 1, 1, 2])


def test_expected_calibration_error_by_hand():
    assert metrics.expected_calibration_error(ECE_PROBS, ECE_TRUE) == pytest.approx(0.36)
    bins = metrics.calibration_bins(ECE_PROBS, ECE_TRUE)
    assert np.flatnonzero(bins["counts"]).tolist() == [5, 8, 13, 14]  # 0-based bins 6, 9, 14, 15
    assert bins["counts"][8] == 2 and bins["accuracy"][8] == 0.5 and bins["confidence"][8] == pytest.approx(0.575)


def test_expected_calibration_error_of_a_calibrated_and_an_empty_set():
    # in each bin the accuracy equals the confidence: 4 rows at 0.75, 3 right -> ECE 0
    probs = np.tile([0.75, 0.25, 0.0], (4, 1))
    assert metrics.expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    assert math.isnan(metrics.expected_calibration_error(np.empty((0, 3)), np.empty(0)))
    # one bin for all: |accuracy - confidence| of the whole set
    assert metrics.expected_calibration_error(ECE_PROBS, ECE_TRUE, n_bins=1) == pytest.approx(abs(0.6 - 0.68))


def test_negative_log_likelihood_by_hand():
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.0, 0.9]])
    assert metrics.negative_log_likelihood(probs, np.array([0, 2])) == pytest.approx(-(np.log(0.5) + np.log(0.9)) / 2)
    assert metrics.negative_log_likelihood(probs, np.array([0, 1])) == math.inf
    assert metrics.negative_log_likelihood(probs, np.array([0, 1]), floor=1e-4) == pytest.approx(
        -(np.log(0.5) + np.log(1e-4)) / 2)
