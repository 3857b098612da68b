"""The decision a model's class probabilities lead to: temperature, then the melanoma threshold.

One implementation, used by `dermtool infer` (the probabilities and the `label` column it
writes), `dermtool calibrate` (which fits both numbers) and `dermtool score` (which scores the
decision the `label` column made):

- **temperature** T: the network ends in a softmax, so its logits are log(p) up to a constant,
  and the calibrated probabilities are softmax(log(p) / T) = p^(1/T) renormalised. T > 1
  softens over-confident probabilities; T = 1 leaves them exactly as they are.
- **melanoma threshold** t: the label is melanoma when p_melanoma >= t, otherwise the more
  probable of the other classes (an exact tie goes to the earlier class in CLASS_NAMES order).
  Without a threshold the label is the plain argmax.
"""

from __future__ import annotations

import math

import numpy as np

from dermtool import CLASS_NAMES
from dermtool.errors import InputError

#: Probabilities below this count as this before the logarithm: a predictions CSV stores six
#: decimals, so a written 0 means "below 5e-7", and log(0) would make the likelihood infinite.
PROB_FLOOR = 1e-7
MELANOMA = "melanoma"


def check_temperature(value, what: str = "temperature") -> float:
    """`value` as a float if it is a finite number above 0, else InputError naming `what`."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number above 0, not {value!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{what} must be a finite number above 0, not {value}.")
    return value


def check_threshold(value, what: str = "--melanoma-threshold") -> float:
    """`value` as a float if 0 < value < 1 (at 0 or 1 every or no image would be melanoma)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number between 0 and 1, not {value!r}.") from None
    if not 0.0 < value < 1.0:
        raise InputError(f"{what} must lie strictly between 0 and 1 (a melanoma probability), not {value}.")
    return value


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) of each row of (N, C) probabilities; returned unchanged when T == 1.

    Probabilities below PROB_FLOOR count as PROB_FLOOR. The result has the input's dtype.
    """
    probs = np.asarray(probs)
    if temperature == 1.0:
        return probs
    logits = np.log(np.clip(probs.astype(np.float64), PROB_FLOOR, None)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(probs.dtype if probs.dtype.kind == "f" else np.float64)


def decide(probs: np.ndarray, melanoma_threshold: float | None = None,
           class_names=CLASS_NAMES) -> np.ndarray:
    """Class index of each row of (N, C) probabilities (see the module docstring for the rule).

    Args:
        probs: (N, C) probabilities in `class_names` order (already temperature-scaled).
        melanoma_threshold: t; None: the plain argmax.

    Returns:
        int64 array (N,).
    """
    probs = np.asarray(probs, dtype=np.float64)
    argmax = np.argmax(probs, axis=1)
    if melanoma_threshold is None:
        return argmax
    m = list(class_names).index(MELANOMA)
    others = probs.copy()
    others[:, m] = -np.inf  # the best of the other classes, ties to the earlier one as argmax does
    return np.where(probs[:, m] >= melanoma_threshold, m, np.argmax(others, axis=1))


def label_names(probs: np.ndarray, melanoma_threshold: float | None = None, class_names=CLASS_NAMES) -> list[str]:
    """The class names `decide` chooses, one per row."""
    return [class_names[k] for k in decide(probs, melanoma_threshold, class_names)]


def describe(temperature: float, melanoma_threshold: float | None) -> dict:
    """The decision as an export's config.json states it, for those who run the file without dermtool."""
    return {"temperature": temperature, "melanoma_threshold": melanoma_threshold,
            "how": "probabilities = softmax(log(cls) / temperature); label = melanoma when its probability >= "
                   "melanoma_threshold, else the likelier of the other classes (null threshold: the argmax)"}


def threshold_for_sensitivity(p_melanoma: np.ndarray, is_melanoma: np.ndarray, sensitivity: float) -> float:
    """The melanoma threshold that reaches `sensitivity` on these cases, chosen as follows.

    With n melanomas, k = ceil(sensitivity * n) of them must be called melanoma, so t may be at
    most s_k, the k-th highest melanoma score: any t in (s_below, s_k], where s_below is the
    highest score of any case below s_k, makes the same decisions here and is the largest such
    choice. We take the middle of that gap (s_k / 2 when no case lies below), so probabilities
    rounded to the six decimals of a CSV, or recomputed in float32, cannot flip a decision that
    sits exactly on t.

    Raises:
        InputError: no melanoma among the cases, `sensitivity` not in (0, 1], or a melanoma it
            needs scored below PROB_FLOOR (no threshold in (0, 1) reaches the target).
    """
    p = np.asarray(p_melanoma, dtype=np.float64).ravel()
    positive = np.asarray(is_melanoma, dtype=bool).ravel()
    if not 0.0 < sensitivity <= 1.0:
        raise InputError(f"the target sensitivity must lie in (0, 1], not {sensitivity}.")
    n = int(positive.sum())
    if n == 0:
        raise InputError("no melanoma in the truth: a melanoma threshold cannot be chosen for a sensitivity.")
    k = max(1, math.ceil(sensitivity * n - 1e-9))  # 0.85 * 20 is 17.000000000000004 in floating point
    s_k = float(np.sort(p[positive])[::-1][k - 1])
    if s_k < PROB_FLOOR:  # t would have to be ~0: every case melanoma, and still below the target
        raise InputError(f"a sensitivity of {sensitivity:g} needs {k} of the {n} melanomas called melanoma, but the "
                         f"{k}-th highest melanoma probability is {s_k:.1e}, below any threshold (the least is "
                         f"{PROB_FLOOR:g}); choose a lower --sensitivity.")
    below = p[p < s_k]
    t = (s_k + float(below.max())) / 2 if below.size else s_k / 2
    return min(max(t, PROB_FLOOR), 1.0 - PROB_FLOOR)  # a threshold lies strictly between 0 and 1
