"""The decision rule (dermtool.decision): temperature scaling and the melanoma threshold, on
cases worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from dermtool.config import ModelConfig, load_config, save_config
from dermtool.decision import (PROB_FLOOR, apply_temperature, check_threshold, decide, label_names,
                               threshold_for_sensitivity)
from dermtool.errors import InputError

# (melanoma, seborrheic_keratosis, nevus)
PROBS = np.array([
    [0.50, 0.30, 0.20],  # argmax melanoma
    [0.35, 0.40, 0.25],  # argmax SK; melanoma at t <= 0.35
    [0.20, 0.30, 0.50],  # argmax nevus; melanoma at t <= 0.20
    [0.10, 0.45, 0.45],  # SK and nevus tie: the earlier class, SK
    [0.30, 0.10, 0.60],  # exactly at t = 0.3: melanoma (p >= t)
])


def test_without_a_threshold_the_label_is_the_argmax():
    assert decide(PROBS).tolist() == [0, 1, 2, 1, 2]


def test_melanoma_when_p_reaches_the_threshold_else_the_likelier_other_class():
    assert decide(PROBS, 0.3).tolist() == [0, 0, 2, 1, 0]
    assert label_names(PROBS, 0.3) == ["melanoma", "melanoma", "nevus", "seborrheic_keratosis", "melanoma"]


def test_a_high_threshold_can_overrule_a_melanoma_argmax():
    # 0.5 < 0.6: not melanoma, although it is the largest; the likelier of the other two is SK
    assert decide(PROBS, 0.6).tolist() == [1, 1, 2, 1, 2]


def test_temperature_one_leaves_the_probabilities_untouched():
    p = PROBS.astype(np.float32)
    assert apply_temperature(p, 1.0) is p


def test_temperature_is_softmax_of_the_logits_divided_by_t():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(axis=1, keepdims=True)
    assert apply_temperature(p, 2.0) == pytest.approx(expected, abs=1e-12)
    # p^(1/T) renormalised, by hand for the first row at T = 2: sqrt of each, then / their sum
    root = np.sqrt(p[0])
    assert apply_temperature(p, 2.0)[0] == pytest.approx(root / root.sum())
    # undone exactly by 1/T
    assert apply_temperature(apply_temperature(p, 2.0), 0.5) == pytest.approx(p, abs=1e-12)


def test_a_zero_probability_counts_as_the_floor():
    out = apply_temperature(np.array([[1.0, 0.0, 0.0]]), 2.0)
    assert np.all(np.isfinite(out)) and out.sum() == pytest.approx(1.0)
    assert out[0, 1] == pytest.approx(np.sqrt(PROB_FLOOR) / (1 + 2 * np.sqrt(PROB_FLOOR)))


def test_a_sensitivity_no_threshold_reaches_is_refused_not_missed():
    """A melanoma at p = 1e-11 needs t below the least threshold: the floor used to miss the target silently."""
    p = np.array([0.9, 0.5, 1e-11, 0.3, 0.2])
    mel = np.array([1, 1, 1, 0, 0], bool)
    with pytest.raises(InputError, match="needs 3 of the 3 melanomas .* 1.0e-11, below any threshold"):
        threshold_for_sensitivity(p, mel, 1.0)
    assert threshold_for_sensitivity(p, mel, 0.6) == pytest.approx(0.4)  # 2 of 3: between 0.5 and 0.3


def test_threshold_for_sensitivity_by_hand():
    # melanoma scores 0.9, 0.7, 0.4, 0.2; others 0.8, 0.5, 0.3, 0.1
    p = np.array([0.9, 0.7, 0.4, 0.2, 0.8, 0.5, 0.3, 0.1])
    mel = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    # 0.75 of 4 melanomas = 3 must be caught: t <= 0.4; the next lower score is 0.3 -> t = 0.35
    assert threshold_for_sensitivity(p, mel, 0.75) == pytest.approx(0.35)
    # 0.85 * 4 = 3.4 -> 4 must be caught: t <= 0.2; next lower 0.1 -> 0.15
    assert threshold_for_sensitivity(p, mel, 0.85) == pytest.approx(0.15)
    # 0.5: 2 -> t <= 0.7, next lower 0.5 -> 0.6
    assert threshold_for_sensitivity(p, mel, 0.5) == pytest.approx(0.6)
    # nothing below the lowest melanoma: half of it
    assert threshold_for_sensitivity(np.array([0.2, 0.6]), np.array([1, 0], bool), 1.0) == pytest.approx(0.1)


def test_the_target_is_met_exactly_when_it_is_a_whole_count():
    # 0.85 * 20 = 17.000000000000004 in floating point: 17 melanomas must be caught, not 18
    p = np.linspace(0.05, 0.95, 20)
    t = threshold_for_sensitivity(p, np.ones(20, bool), 0.85)
    assert np.sum(p >= t) == 17


def test_threshold_needs_a_melanoma_and_a_target_in_range():
    with pytest.raises(InputError, match="no melanoma"):
        threshold_for_sensitivity(np.array([0.5]), np.array([False]), 0.85)
    with pytest.raises(InputError, match="sensitivity"):
        threshold_for_sensitivity(np.array([0.5]), np.array([True]), 0.0)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "x", float("nan")])
def test_a_threshold_lies_strictly_between_0_and_1(value):
    with pytest.raises(InputError, match="--melanoma-threshold"):
        check_threshold(value)


def test_the_decision_round_trips_through_config_json(tmp_path):
    cfg = ModelConfig(task="cls", temperature=1.7, melanoma_threshold=0.21,
                      calibration={"target_sensitivity": 0.85, "sets": [{"images": 3, "sensitivity": None}]})
    save_config(tmp_path / "config.json", cfg)
    assert load_config(tmp_path)[0] == cfg
    old = ModelConfig(task="cls")  # a folder written before the decision existed reads as before
    assert (old.temperature, old.melanoma_threshold, old.calibration) == (1.0, None, None)


@pytest.mark.parametrize("fields, message", [({"temperature": 0}, "temperature"),
                                             ({"melanoma_threshold": 1.0}, "melanoma_threshold"),
                                             ({"task": "seg", "melanoma_threshold": 0.3}, "classifier")])
def test_config_refuses_a_bad_decision(fields, message):
    with pytest.raises(InputError, match=message):
        ModelConfig(**{"task": "cls", **fields})
