"""`dermtool score`: the numbers on a case worked by hand, the JSON schema, and every bad input
through the real command (exit code 2, one sentence naming the file)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dermtool import CLASS_NAMES, io
from dermtool.errors import InputError
from dermtool.cli import app
from dermtool.score import score

REPO_ROOT = Path(__file__).resolve().parents[1]
ISIC_VAL = REPO_ROOT.parent / "shared" / "data" / "isic2017" / "val"

# --- the hand-worked case -----------------------------------------------------------------
# Classification: the confusion matrix of tests/test_metrics.py (BACC 29/45, accuracy 6/10).
TRUE_CLASSES = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
# (melanoma, seborrheic_keratosis, nevus); argmax per row = 0,1,2,1,1,2,2,0,2,1.
PRED_PROBS = [
    (0.7, 0.2, 0.1), (0.3, 0.6, 0.1), (0.3, 0.1, 0.6), (0.1, 0.8, 0.1), (0.2, 0.5, 0.3),
    (0.1, 0.1, 0.8), (0.3, 0.2, 0.5), (0.6, 0.1, 0.3), (0.2, 0.3, 0.5), (0.1, 0.6, 0.3),
]
# AUCs by pair counting (ties half): melanoma 18/21, SK 14/16, nevus 20/25.
AUC_HAND = {"melanoma": 6 / 7, "seborrheic_keratosis": 7 / 8, "nevus": 4 / 5}
IDS = [f"ISIC_{i:07d}" for i in range(len(TRUE_CLASSES))]

# Segmentation: four truth masks.
#   ISIC_0000000: the 1/3 pair of test_metrics        -> JAC 1/3, Dice 1/2
#   ISIC_0000001: both empty                          -> 1, 1
#   ISIC_0000002: truth lesion, no prediction file    -> 0, 0 (missing)
#   ISIC_0000003: truth lesion, empty prediction      -> 0, 0
# JAC = (1/3 + 1 + 0 + 0) / 4 = 1/3; Dice = 1.5 / 4; thresholded = 1/4; 3 of 4 below 0.65.
MASK_A_PRED = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
MASK_A_TRUTH = np.array([[0, 1, 1], [0, 1, 1], [0, 0, 0]], dtype=bool)
MASK_PLUS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
EMPTY = np.zeros((3, 3), dtype=bool)

runner = CliRunner()


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.write_text("\n".join(",".join(map(str, row)) for row in [header, *rows]) + "\n")
    return path


def write_mask(path: Path, mask: np.ndarray) -> Path:
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def hand_case(tmp_path: Path) -> dict[str, Path]:
    """The hand-worked case on disk: truth.csv (ISIC format), pred.csv (dermtool format with
    nevus and label columns), truth_masks/ and pred_masks/."""
    truth_rows = [[i, float(c == 0), float(c == 1)] for i, c in zip(IDS, TRUE_CLASSES)]
    pred_rows = [[i, *p, "x"] for i, p in zip(IDS, PRED_PROBS)]
    truth_dir, pred_dir = tmp_path / "truth_masks", tmp_path / "pred_masks"
    truth_dir.mkdir()
    pred_dir.mkdir()
    truth_masks = [MASK_A_TRUTH, EMPTY, MASK_PLUS, MASK_PLUS]
    pred_masks = {0: MASK_A_PRED, 1: EMPTY, 3: EMPTY, 9: MASK_PLUS}  # 9 has no truth: ignored
    for k, mask in enumerate(truth_masks):
        write_mask(truth_dir / f"{IDS[k]}_segmentation.png", mask)
    for k, mask in pred_masks.items():
        write_mask(pred_dir / f"{IDS[k]}_segmentation.png", mask)
    (truth_dir / "README.txt").write_text("not a mask, and not named like one")
    return {
        "truth": write_csv(tmp_path / "truth.csv", list(io.REQUIRED_COLUMNS), truth_rows),
        "pred": write_csv(
            tmp_path / "pred.csv",
            ["image_id", "melanoma", "seborrheic_keratosis", "nevus", "label"],
            pred_rows,
        ),
        "truth_masks": truth_dir,
        "pred_masks": pred_dir,
        "dir": tmp_path,
    }


def run_score(case: dict[str, Path], *extra: str, masks: bool = True):
    args = ["score", str(case["pred"]), str(case["truth"])]
    if masks:
        args += ["--pred-masks", str(case["pred_masks"]), "--truth-masks", str(case["truth_masks"])]
    return runner.invoke(app, [*args, *extra])


# --- numbers ------------------------------------------------------------------------------


def test_score_hand_case_through_cli_json(hand_case):
    json_path = hand_case["dir"] / "out" / "score.json"
    json_path.parent.mkdir()
    result = run_score(hand_case, "--json", str(json_path))
    assert result.exit_code == 0, result.output
    assert "Jaccard" in result.output and "BACC" in result.output
    report = json.loads(json_path.read_text())

    seg = report["segmentation"]
    assert seg["jac"] == pytest.approx(1 / 3)
    assert seg["dice"] == pytest.approx(1.5 / 4)
    assert seg["jac_thresholded"] == pytest.approx(1 / 4)
    assert seg["frac_below_065"] == pytest.approx(3 / 4)
    assert (seg["n_images"], seg["n_missing"], seg["n_empty_pred"]) == (4, 1, 1)
    assert seg["per_image"] == pytest.approx(dict(zip(IDS[:4], [1 / 3, 1.0, 0.0, 0.0])))

    cls = report["classification"]
    assert cls["bacc"] == pytest.approx(29 / 45)
    assert cls["accuracy"] == pytest.approx(0.6)
    assert cls["n_images"] == 10
    assert cls["confusion"] == [[1, 1, 1], [0, 2, 0], [1, 1, 3]]
    mel = cls["per_class"]["melanoma"]
    assert (mel["tp"], mel["fn"], mel["fp"], mel["tn"]) == (1, 2, 1, 6)
    assert mel["sensitivity"] == pytest.approx(1 / 3)
    assert mel["specificity"] == pytest.approx(6 / 7)
    assert mel["accuracy"] == pytest.approx(0.7)
    for name, auc in AUC_HAND.items():
        assert cls["per_class"][name]["auc"] == pytest.approx(auc), name
    assert cls["per_image"][IDS[7]] == {"true": "nevus", "pred": "melanoma"}
    assert report["mean_performance"] == pytest.approx((1 / 3 + 29 / 45) / 2)


def test_json_keys_are_the_documented_schema(hand_case):
    report = score(hand_case["pred"], hand_case["truth"], hand_case["pred_masks"],
                   hand_case["truth_masks"])
    assert {"segmentation", "classification", "mean_performance"} <= set(report)
    assert {"jac", "dice", "jac_thresholded", "frac_below_065", "n_images", "n_missing",
            "per_image"} <= set(report["segmentation"])
    assert {"bacc", "accuracy", "n_images", "confusion", "per_class",
            "per_image"} <= set(report["classification"])
    assert set(report["classification"]["per_class"]) == {
        "melanoma", "seborrheic_keratosis", "nevus"}
    for stats in report["classification"]["per_class"].values():
        assert set(stats) == {"sensitivity", "specificity", "accuracy", "auc",
                              "tp", "tn", "fp", "fn"}
    json.dumps(report, allow_nan=False)  # plain JSON: no nan, no numpy types


# The label column of a melanoma threshold t = 0.3 on PRED_PROBS (melanoma when p >= 0.3, else
# the likelier other class): rows 1, 2 and 6 change from the argmax to melanoma.
DECISION_LABELS = ["melanoma", "melanoma", "melanoma", "seborrheic_keratosis", "seborrheic_keratosis",
                   "nevus", "melanoma", "melanoma", "nevus", "seborrheic_keratosis"]


def test_score_reports_the_label_columns_decision_beside_the_argmax(hand_case, tmp_path):
    rows = [[i, *p, label] for i, p, label in zip(IDS, PRED_PROBS, DECISION_LABELS)]
    pred = write_csv(tmp_path / "decided.csv", ["image_id", "melanoma", "seborrheic_keratosis", "nevus", "label"], rows)
    json_path = tmp_path / "s.json"
    result = runner.invoke(app, ["score", str(pred), str(hand_case["truth"]), "--json", str(json_path)])
    assert result.exit_code == 0, result.output
    cls = json.loads(json_path.read_text())["classification"]
    assert cls["bacc"] == pytest.approx(29 / 45)  # the argmax figures are unchanged
    decision = cls["decision"]
    # truth 0,0,0,1,1,2,2,2,2,2 against labels 0,0,0,1,1,2,0,0,2,1
    assert decision["confusion"] == [[3, 0, 0], [0, 2, 0], [2, 1, 2]]
    mel = decision["per_class"]["melanoma"]
    assert (mel["tp"], mel["fn"], mel["fp"], mel["tn"]) == (3, 0, 2, 5)
    assert mel["sensitivity"] == 1.0 and mel["specificity"] == pytest.approx(5 / 7)
    assert decision["per_class"]["seborrheic_keratosis"]["specificity"] == pytest.approx(7 / 8)
    assert decision["per_class"]["nevus"]["sensitivity"] == pytest.approx(2 / 5)
    assert decision["bacc"] == pytest.approx((1 + 1 + 2 / 5) / 3)
    assert decision["accuracy"] == pytest.approx(0.7)
    assert decision["n_differ_from_argmax"] == 3
    assert "Decision of the label column" in result.output and "0.7143" in result.output


def test_expected_calibration_error_of_the_hand_case(hand_case):
    # top probability (correct?): 0.5 x3 (all right), 0.6 x4 (all wrong), 0.7 (right), 0.8 x2 (right)
    # ECE = (3 * 0.5 + 4 * 0.6 + 1 * 0.3 + 2 * 0.2) / 10 = 0.46
    cls = score(hand_case["pred"], hand_case["truth"])["classification"]
    assert cls["ece"] == pytest.approx(0.46) and cls["ece_bins"] == 15
    # the hand case's label column holds "x", another tool's column: not scored, and said so
    assert cls["decision"] is None and "'x'" in cls["decision_note"]


def test_rows_that_do_not_sum_to_one_get_no_calibration_error_and_say_why(hand_case):
    """ISIC accepts independent scores (0.5, 0.9, 0.5); an ECE of them was printed as if meaningful."""
    rows = [[i, *((0.5, 0.9, 0.5) if k == 4 else p)] for k, (i, p) in enumerate(zip(IDS, PRED_PROBS))]
    pred = write_csv(hand_case["dir"] / "scores.csv", ["image_id", *CLASS_NAMES], rows)
    cls = score(pred, hand_case["truth"])["classification"]
    assert cls["ece"] is None and "1 row(s) do not sum to 1 (ISIC_0000004)" in cls["ece_note"]
    assert cls["bacc"] == pytest.approx(29 / 45)  # argmax of row 4 is still SK: the scores stand
    result = runner.invoke(app, ["score", str(pred), str(hand_case["truth"])])
    assert result.exit_code == 0 and "ECE not computed" in result.output, result.output


def test_a_number_with_an_underscore_is_refused_not_read(hand_case):
    """float() reads "0.7_0" as 0.70."""
    rows = [[i, *(("0.7_0", 0.2, 0.1) if k == 0 else p)] for k, (i, p) in enumerate(zip(IDS, PRED_PROBS))]
    pred = write_csv(hand_case["dir"] / "typo.csv", ["image_id", *CLASS_NAMES], rows)
    with pytest.raises(InputError, match="non-numeric melanoma value '0.7_0' at row 2"):
        score(pred, hand_case["truth"])


def test_ids_with_spaces_around_them_are_one_image_in_both_halves(hand_case):
    """The CSV reader strips ids and the mask finder did not: ' a' was two images in one score."""
    folder = hand_case["dir"]
    for sub in ("truth_masks", "pred_masks"):
        masks = folder / sub
        for path in masks.glob(f"{IDS[0]}_segmentation.png"):
            path.rename(masks / f" {path.name}")  # " ISIC_0000000_segmentation.png"
    text = hand_case["pred"].read_text().replace(f"{IDS[0]},", f" {IDS[0]} ,")
    hand_case["pred"].write_text(text)
    result = score(hand_case["pred"], hand_case["truth"], hand_case["pred_masks"], hand_case["truth_masks"])
    assert result["segmentation"]["per_image"][IDS[0]] == pytest.approx(1 / 3)
    assert result["segmentation"]["jac"] == pytest.approx(1 / 3)
    assert result["classification"]["per_image"][IDS[0]] == {"true": "melanoma", "pred": "melanoma"}
    write_mask(folder / "pred_masks" / f"{IDS[0]}_segmentation.png", EMPTY)  # and "ISIC_0000000" beside it
    with pytest.raises(InputError, match="two masks of image 'ISIC_0000000'"):
        score(hand_case["pred"], hand_case["truth"], hand_case["pred_masks"], hand_case["truth_masks"])


def test_nevus_is_derived_when_the_column_is_absent(hand_case):
    # ISIC-format predictions: nevus = 1 - mel - sk gives the same argmax as the explicit column.
    rows = [[i, p[0], p[1]] for i, p in zip(IDS, PRED_PROBS)]
    write_csv(hand_case["pred"], list(io.REQUIRED_COLUMNS), rows)
    report = score(hand_case["pred"], hand_case["truth"])
    assert report["classification"]["confusion"] == [[1, 1, 1], [0, 2, 0], [1, 1, 3]]
    assert report["segmentation"] is None and report["mean_performance"] is None
    np.testing.assert_allclose(io.read_class_csv(hand_case["pred"], role="predictions")[IDS[4]], [0.2, 0.5, 0.3])


def test_undefined_numbers_are_null_in_json(hand_case):
    # Only melanoma and nevus in the truth: SK has no sensitivity and no AUC.
    write_csv(hand_case["truth"], list(io.REQUIRED_COLUMNS),
              [[i, float(k < 3), 0.0] for k, i in enumerate(IDS)])
    report = score(hand_case["pred"], hand_case["truth"])
    sk = report["classification"]["per_class"]["seborrheic_keratosis"]
    assert sk["sensitivity"] is None and sk["auc"] is None
    assert sk["specificity"] == pytest.approx(6 / 10)


def test_bootstrap_is_seeded(hand_case):
    kwargs = dict(pred_masks=hand_case["pred_masks"], truth_masks=hand_case["truth_masks"])
    first = score(hand_case["pred"], hand_case["truth"], bootstrap=200, seed=3, **kwargs)
    again = score(hand_case["pred"], hand_case["truth"], bootstrap=200, seed=3, **kwargs)
    assert first["segmentation"]["jac_ci95"] == again["segmentation"]["jac_ci95"]
    assert first["classification"]["bacc_ci95"] == again["classification"]["bacc_ci95"]
    low, high = first["segmentation"]["jac_ci95"]
    assert 0.0 <= low <= 1 / 3 <= high <= 1.0
    low, high = first["classification"]["bacc_ci95"]
    assert low <= 29 / 45 <= high
    assert score(hand_case["pred"], hand_case["truth"])["classification"]["bacc_ci95"] is None


def test_read_mask_binarises_above_128_in_the_brightest_colour_channel(tmp_path):
    grey = np.array([[0, 128, 129], [255, 200, 1]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    expected = [[False, False, True], [True, True, False]]
    assert io.read_mask(tmp_path / "grey.png").tolist() == expected
    for channel in range(3):  # a lesion drawn in red, green or blue on black
        rgb = np.zeros((2, 3, 3), dtype=np.uint8)
        rgb[..., channel] = grey
        rgb[..., (channel + 1) % 3] = grey // 2  # a dimmer other channel changes nothing
        Image.fromarray(rgb).save(tmp_path / "rgb.png")
        assert io.read_mask(tmp_path / "rgb.png").tolist() == expected, channel
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 1], rgba[..., 3] = grey, 255  # green, opaque: alpha is not a colour
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert io.read_mask(tmp_path / "rgba.png").tolist() == expected
    Image.fromarray(grey > 128).save(tmp_path / "bits.png")  # 1-bit PNG
    assert io.read_mask(tmp_path / "bits.png").tolist() == expected


def test_read_mask_reads_a_zero_one_mask_as_binary(tmp_path):
    ones = np.array([[0, 1, 1], [0, 0, 1]], dtype=np.uint8)
    Image.fromarray(ones).save(tmp_path / "ones.png")
    assert io.read_mask(tmp_path / "ones.png").tolist() == ones.astype(bool).tolist()


def test_zero_one_masks_score_as_their_lesions_not_as_empty(hand_case):
    """Truth stored as 0/1 (a common export) with empty predictions: JAC 0, not 1.0."""
    for path in hand_case["truth_masks"].glob("*_segmentation.png"):
        values = np.asarray(Image.open(path))
        Image.fromarray((values > 128).astype(np.uint8)).save(path)
    result = run_score(hand_case, "--json", str(hand_case["dir"] / "s.json"))
    assert result.exit_code == 0, result.output
    seg = json.loads((hand_case["dir"] / "s.json").read_text())["segmentation"]
    assert seg["jac"] == pytest.approx(1 / 3)  # the 0/255 hand case, unchanged
    assert seg["n_zero_one_masks"] == 3  # the empty truth mask is empty either way
    assert "0/1" in result.stdout
    for path in hand_case["pred_masks"].glob("*_segmentation.png"):
        Image.fromarray(np.zeros_like(np.asarray(Image.open(path)))).save(path)
    report = score(None, None, hand_case["pred_masks"], hand_case["truth_masks"])
    assert report["segmentation"]["jac"] == pytest.approx(1 / 4)  # only the both-empty image scores


def test_a_zero_one_mask_of_ones_only_is_a_lesion_filling_the_frame(tmp_path):
    """1s everywhere, stored 0/1: the lesion fills the frame; > 128 alone would read it empty."""
    for folder in ("truth", "pred"):
        (tmp_path / folder).mkdir()
    Image.fromarray(np.ones((5, 4), np.uint8)).save(tmp_path / "truth" / "X_segmentation.png")
    write_mask(tmp_path / "pred" / "X_segmentation.png", np.pad(np.ones((5, 2), bool), ((0, 0), (0, 2))))
    seg = score(None, None, tmp_path / "pred", tmp_path / "truth")["segmentation"]
    assert seg["per_image"] == {"X": 0.5} and seg["n_empty_truth"] == 0 and seg["n_zero_one_masks"] == 1


def test_score_cli_scores_masks_alone(hand_case):
    result = runner.invoke(app, ["score", "--pred-masks", str(hand_case["pred_masks"]),
                                 "--truth-masks", str(hand_case["truth_masks"]), "--json", str(hand_case["dir"] / "s.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((hand_case["dir"] / "s.json").read_text())
    assert report["classification"] is None
    assert report["segmentation"] == score(None, None, hand_case["pred_masks"], hand_case["truth_masks"])["segmentation"]


def test_score_json_never_overwrites_an_input_and_writes_through_a_link(hand_case):
    before = hand_case["pred"].read_bytes()
    result = run_score(hand_case, "--json", str(hand_case["pred"]), masks=False)
    assert result.exit_code == 2 and "is the input" in result.stderr
    assert hand_case["pred"].read_bytes() == before
    result = run_score(hand_case, "--json", str(hand_case["dir"]), masks=False)
    assert result.exit_code == 2 and "is a folder" in result.stderr
    target, link = hand_case["dir"] / "target.json", hand_case["dir"] / "link.json"
    target.write_text("old")
    link.symlink_to(target.name)
    result = run_score(hand_case, "--json", str(link), masks=False)
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and json.loads(target.read_text())["classification"]["n_images"] == len(IDS)


def test_write_csv_atomic_leaves_only_the_file(tmp_path):
    target = tmp_path / "sub" / "predictions.csv"
    io.write_csv_atomic(target, ["image_id", "melanoma"], [["a", 0.25]])
    io.write_csv_atomic(target, ["image_id", "melanoma"], [["b", 0.5]])
    assert target.read_text() == "image_id,melanoma\nb,0.5\n"
    assert [p.name for p in target.parent.iterdir()] == ["predictions.csv"]


# --- bad input: exit 2, one sentence naming the file ----------------------------------------


def _bad_truth_rows(case, rows, header=("image_id", "melanoma", "seborrheic_keratosis")):
    write_csv(case["truth"], list(header), rows)
    return case["truth"]


def _bad_pred_text(case, text):
    case["pred"].write_text(text)
    return case["pred"]


def _garbage_mask(case, folder):
    path = case[folder] / f"{IDS[0]}_segmentation.png"
    path.write_text("this is not a PNG")
    return path


def _label_map_mask(case):
    path = case["truth_masks"] / f"{IDS[0]}_segmentation.png"
    Image.fromarray(np.array([[0, 1], [2, 0]], dtype=np.uint8)).save(path)
    return path


def _big_pred_mask(case):
    return write_mask(case["pred_masks"] / f"{IDS[0]}_segmentation.png", np.zeros((4, 3), bool))


BAD_INPUTS = {
    "missing predictions CSV": (lambda c: c["pred"].unlink() or c["pred"], "does not exist"),
    "missing truth CSV": (lambda c: c["truth"].unlink() or c["truth"], "does not exist"),
    "missing column": (
        lambda c: _bad_pred_text(c, "image_id,melanoma\nISIC_0000000,0.5\n"),
        "lacks the column(s) seborrheic_keratosis",
    ),
    "duplicate id": (
        lambda c: _bad_truth_rows(c, [[IDS[0], 1.0, 0.0], [IDS[1], 0.0, 0.0], [IDS[0], 0, 1]]),
        "repeats image_id ISIC_0000000 at row 4",
    ),
    "one id in two Unicode forms": (  # both were scored, as two images of opposite classes
        lambda c: _bad_truth_rows(c, [["M\u00fcller", 1.0, 0.0], [IDS[1], 0.0, 0.0], ["Mu\u0308ller", 0, 0]]),
        "repeats image_id Mu\u0308ller at row 4, written in another Unicode form",
    ),
    "nan value": (
        lambda c: _bad_truth_rows(c, [[IDS[0], 1.0, 0.0], [IDS[1], "nan", 0.0]]),
        "melanoma = nan at row 3",
    ),
    "value above 1": (
        lambda c: _bad_pred_text(c, "image_id,melanoma,seborrheic_keratosis\nISIC_0000000,1.5,0\n"),
        "melanoma = 1.5 at row 2",
    ),
    "negative value": (
        lambda c: _bad_truth_rows(c, [[IDS[0], 0.0, -0.2]]),
        "seborrheic_keratosis = -0.2 at row 2",
    ),
    "non-numeric value": (
        lambda c: _bad_truth_rows(c, [[IDS[0], "yes", 0.0]]),
        "non-numeric melanoma value 'yes' at row 2",
    ),
    "empty file": (lambda c: _bad_pred_text(c, ""), "is empty"),
    "predictions CSV not in UTF-8": (
        lambda c: (c["pred"].write_bytes(c["pred"].read_bytes().replace(b"x\n", b"\xe9\n")), c["pred"])[1],
        "is not UTF-8 text",
    ),
    "truth CSV a folder": (lambda c: (c["truth"].unlink(), c["truth"].mkdir(), c["truth"])[2], "is a folder"),
    "header only": (
        lambda c: _bad_pred_text(c, "image_id,melanoma,seborrheic_keratosis\n"), "no rows"
    ),
    "truth id absent from predictions": (
        lambda c: _bad_pred_text(c, "image_id,melanoma,seborrheic_keratosis\nISIC_0000000,1,0\n"),
        "has no row for 9 image(s)",
    ),
    "truth row with both classes": (
        lambda c: _bad_truth_rows(c, [[IDS[0], 0.0, 0.0], [IDS[1], 1.0, 1.0]]),
        "names melanoma and seborrheic_keratosis at row 3 (ISIC_0000001)",
    ),
    "truth value neither 0 nor 1": (
        lambda c: _bad_truth_rows(c, [[IDS[0], 0.4, 0.0]]),
        "melanoma = 0.4 at row 2 (ISIC_0000000); a truth value is 0 or 1",
    ),
    "truth row naming melanoma and nevus": (
        lambda c: _bad_truth_rows(c, [[IDS[0], 1, 0, 1]], header=("image_id", *CLASS_NAMES)),
        "names melanoma and nevus at row 2",
    ),
    "truth row naming no class beside a nevus column": (
        lambda c: _bad_truth_rows(c, [[IDS[0], 0, 1, 0], [IDS[1], 0, 0, 0]], header=("image_id", *CLASS_NAMES)),
        "has every class 0 at row 3 (ISIC_0000001)",
    ),
    "repeated column": (
        lambda c: _bad_truth_rows(c, [[IDS[0], 1, 0, 0]], header=("image_id", "melanoma", "seborrheic_keratosis", "melanoma")),
        "has the column melanoma 2 times",
    ),
    "label-map truth mask": (_label_map_mask, "has the values 0, 1, 2: a label map"),
    "non-image prediction mask": (lambda c: _garbage_mask(c, "pred_masks"), "not a readable image"),
    "non-image truth mask": (lambda c: _garbage_mask(c, "truth_masks"), "not a readable image"),
    "prediction of another size": (_big_pred_mask, "is 3x4 pixels but its truth mask"),
    "missing mask folder": (
        lambda c: (c["pred_masks"].rename(c["dir"] / "elsewhere"), c["pred_masks"])[1],
        "predicted mask folder",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_sentence_naming_the_file(hand_case, problem):
    make_bad, fragment = BAD_INPUTS[problem]
    bad_path = make_bad(hand_case)
    result = run_score(hand_case)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error:"), message
    assert "\n" not in message and "Traceback" not in result.output
    assert str(bad_path) in message
    assert fragment in message
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_one_mask_folder_without_the_other_is_refused(hand_case):
    result = runner.invoke(
        app, ["score", str(hand_case["pred"]), str(hand_case["truth"]),
              "--pred-masks", str(hand_case["pred_masks"])]
    )
    assert result.exit_code == 2
    assert "--truth-masks" in result.stderr


def test_a_truth_folder_without_masks_is_refused(hand_case):
    empty = hand_case["dir"] / "empty"
    empty.mkdir()
    result = runner.invoke(
        app, ["score", str(hand_case["pred"]), str(hand_case["truth"]),
              "--pred-masks", str(hand_case["pred_masks"]), "--truth-masks", str(empty)]
    )
    assert result.exit_code == 2
    assert str(empty) in result.stderr and "_segmentation.png" in result.stderr


def test_paths_with_brackets_are_printed_literally(hand_case):
    odd = hand_case["dir"] / "[bold]run"
    odd.mkdir()
    result = runner.invoke(app, ["score", str(odd / "pred.csv"), str(hand_case["truth"])])
    assert result.exit_code == 2
    assert str(odd / "pred.csv") in result.stderr


def test_python_m_dermtool_score_subprocess(hand_case):
    command = [sys.executable, "-m", "dermtool", "score", str(hand_case["pred"]),
               str(hand_case["truth"])]
    ok = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "BACC 0.6444" in ok.stdout
    hand_case["pred"].unlink()
    bad = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and str(hand_case["pred"]) in bad.stderr


def test_scoring_does_not_import_tensorflow():
    # `dermtool score` must start fast and work without the deep-learning stack.
    code = "import sys, dermtool.cli, dermtool.score; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# --- real data: the validation masks against a perturbed copy ------------------------------


def _perturb(mask: np.ndarray, k: int) -> np.ndarray | None:
    """Erode, shift or drop a truth mask, depending on its index."""
    from scipy import ndimage

    if k % 10 == 9:
        return None  # no prediction at all
    if k % 2 == 0:
        return ndimage.binary_erosion(mask, iterations=1 + k % 7)
    dy, dx = 3 + k % 9, -(2 + k % 5)
    shifted = np.zeros_like(mask)
    shifted[dy:, : mask.shape[1] + dx] = mask[: mask.shape[0] - dy, -dx:]
    return shifted


def _jaccard_by_sets(pred_file: Path | None, truth_file: Path) -> float:
    """Independent Jaccard: skimage's reader and sets of flat pixel indices."""
    from skimage import io as skio

    truth = set(np.flatnonzero(skio.imread(truth_file) >= 129).tolist())
    if pred_file is None:
        return 0.0
    pred = set(np.flatnonzero(skio.imread(pred_file) >= 129).tolist())
    return 1.0 if not pred | truth else len(pred & truth) / len(pred | truth)


@pytest.mark.skipif(not ISIC_VAL.is_dir(), reason="needs ../shared/data/isic2017/val")
def test_real_masks_against_perturbed_copy(tmp_path):
    truth_dir = ISIC_VAL / "masks"
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    independent = []
    for k, truth_file in enumerate(sorted(truth_dir.glob("*_segmentation.png"))):
        pred = _perturb(np.asarray(Image.open(truth_file)) > 128, k)
        pred_file = None
        if pred is not None:
            pred_file = write_mask(pred_dir / truth_file.name, pred)
        independent.append(_jaccard_by_sets(pred_file, truth_file))
    report = score(None, None, pred_dir, truth_dir, bootstrap=200, seed=0)
    seg = report["segmentation"]
    independent = np.array(independent)
    assert seg["n_images"] == len(independent) == 150
    assert seg["n_missing"] == 15
    assert seg["jac"] == pytest.approx(independent.mean(), abs=1e-12)
    assert seg["jac_thresholded"] == pytest.approx(
        np.mean([j if j >= 0.65 else 0.0 for j in independent]), abs=1e-12)
    assert seg["frac_below_065"] == pytest.approx(np.mean(independent < 0.65))
    # The perturbation is real but moderate: neither a perfect score nor nonsense.
    assert 0.4 < seg["jac"] < 0.95
    low, high = seg["jac_ci95"]
    assert low < seg["jac"] < high
    assert not any(math.isnan(v) for v in seg["per_image"].values())


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_csvs_saved_by_windows_tools_score_like_utf8(hand_case, encoding):
    """Excel and Notepad save with a byte-order mark, often as UTF-16: the same numbers."""
    want = score(hand_case["pred"], hand_case["truth"])["classification"]["bacc"]
    for key in ("pred", "truth"):
        hand_case[key].write_bytes(hand_case[key].read_text().encode(encoding))
    assert score(hand_case["pred"], hand_case["truth"])["classification"]["bacc"] == want


@pytest.mark.parametrize("colour", [(0, 255, 0), (255, 0, 0), (0, 0, 255), (255, 255, 255)])
def test_a_truth_mask_drawn_in_colour_is_read_as_its_lesion(hand_case, colour):
    """Green (or any colour) on black: read as the lesion, not as an empty mask from channel 0."""
    want = score(None, None, hand_case["pred_masks"], hand_case["truth_masks"])["segmentation"]
    for path in hand_case["truth_masks"].glob("*_segmentation.png"):
        grey = np.asarray(Image.open(path)) > 128
        Image.fromarray((grey[..., None] * np.array(colour)).astype(np.uint8), "RGB").save(path)
    got = score(None, None, hand_case["pred_masks"], hand_case["truth_masks"])["segmentation"]
    assert got["jac"] == pytest.approx(want["jac"]) == pytest.approx(1 / 3)
    assert got["n_empty_truth"] == want["n_empty_truth"] == 1


def test_empty_truth_masks_are_counted_and_shown(hand_case):
    json_path = hand_case["dir"] / "s.json"
    for k in (2, 3):  # two more truth masks without a lesion: 3 of 4
        write_mask(hand_case["truth_masks"] / f"{IDS[k]}_segmentation.png", EMPTY)
    result = run_score(hand_case, "--json", str(json_path))
    assert result.exit_code == 0, result.output
    assert json.loads(json_path.read_text())["segmentation"]["n_empty_truth"] == 3
    assert "empty truth masks (no lesion)" in result.stdout


@pytest.mark.parametrize("case", ["json_a_folder", "disk_full"])
def test_a_json_file_that_cannot_be_written_is_one_line(hand_case, case, monkeypatch, no_space):
    json_path = hand_case["dir"] / "s.json"
    if case == "json_a_folder":
        json_path.mkdir()
    else:
        def full(self, *args, **kwargs):
            raise no_space(self)

        monkeypatch.setattr(Path, "write_text", full)
    result = run_score(hand_case, "--json", str(json_path))
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "\n" not in message
    if case == "disk_full":
        assert message.startswith(f"error: {json_path}: cannot write") and "the disk is full" in message
    else:  # refused before any scoring
        assert message.startswith(f"error: {json_path}: is a folder; --json names the file to write")
    assert [p.name for p in hand_case["dir"].iterdir() if p.name.startswith(".")] == []


# --- the ISIC 2017 scorer's own figures ------------------------------------------------------

#: six images: truth classes and (melanoma, seborrheic_keratosis) predictions, worked by hand below
CHALLENGE_TRUTH = ["melanoma", "melanoma", "seborrheic_keratosis", "nevus", "nevus", "nevus"]
CHALLENGE_PRED = [(0.6, 0.1), (0.4, 0.45), (0.55, 0.3), (0.2, 0.7), (0.5, 0.0), (0.1, 0.2)]


def test_challenge_figures_call_each_class_alone_above_one_half(tmp_path):
    """ISIC 2017 Part 3: each class on its own column, called at p > 0.5 (0.5 itself is not).

    melanoma: called A, C -> TP 1 FN 1 FP 1 TN 3: ACC 4/6, SE 1/2, SP 3/4. Ranked .6+ .55 .5 .4+
    .2 .1: AP = 1/2 * 1 + 1/2 * 2/4 = 3/4; SE >= 0.82 first at .4 (2 of 4 negatives above):
    SP 1/2 at 82, 89 and 95; AUC: .6 beats 4 negatives, .4 beats 2 -> 6/8.
    seborrheic keratosis: called D only -> TP 0 FN 1 FP 1 TN 4: ACC 4/6, SE 0, SP 4/5. C (.3)
    ranks third: AP 1/3, SP 3/5 at each sensitivity, AUC 3/5.
    """
    ids = [f"ISIC_{k:07d}" for k in range(6)]
    truth = write_csv(tmp_path / "truth.csv", list(io.REQUIRED_COLUMNS),
                      [[i, float(c == "melanoma"), float(c == "seborrheic_keratosis")] for i, c in zip(ids, CHALLENGE_TRUTH)])
    pred = write_csv(tmp_path / "pred.csv", list(io.REQUIRED_COLUMNS), [[i, *p] for i, p in zip(ids, CHALLENGE_PRED)])
    challenge = score(pred, truth)["classification"]["challenge"]
    melanoma = {"accuracy": 4 / 6, "sensitivity": 1 / 2, "specificity": 3 / 4, "average_precision": 3 / 4,
                "spec_at_sens_82": 1 / 2, "spec_at_sens_89": 1 / 2, "spec_at_sens_95": 1 / 2, "auc": 6 / 8}
    keratosis = {"accuracy": 4 / 6, "sensitivity": 0.0, "specificity": 4 / 5, "average_precision": 1 / 3,
                 "spec_at_sens_82": 3 / 5, "spec_at_sens_89": 3 / 5, "spec_at_sens_95": 3 / 5, "auc": 3 / 5}
    assert challenge["melanoma"] == pytest.approx(melanoma)
    assert challenge["seborrheic_keratosis"] == pytest.approx(keratosis)
    assert challenge["mean"] == pytest.approx({k: (melanoma[k] + keratosis[k]) / 2 for k in melanoma})
    shown = run_score({"pred": pred, "truth": truth}, "--plots", str(tmp_path / "plots"), masks=False)
    assert shown.exit_code == 0, shown.output
    assert "ISIC 2017 challenge figures" in shown.output
    # the terminal and the page: melanoma's row, ACC SE SP AP SP@82 SP@89 SP@95 AUC, three digits
    assert "│ melanoma │ 0.667 │ 0.500 │ 0.750 │ 0.750 │ 0.500 │ 0.500 │ 0.500 │ 0.750 │" in " ".join(shown.output.split())
    page = " ".join((tmp_path / "plots" / "score.html").read_text().split())
    assert ("<tr><td>melanoma</td><td>0.667</td><td>0.500</td><td>0.750</td><td>0.750</td><td>0.500</td>"
            "<td>0.500</td><td>0.500</td><td>0.750</td></tr>") in page


def test_specificity_at_sensitivity_skips_points_in_equal_steps_as_the_isic_scorer():
    """Each score holds one positive and one negative: (1,1), (2,2), (3,3) lie in equal steps, and
    the scorer's ROC curve (drop_intermediate) keeps only the ends. Sensitivity 1/2 is first
    reached at (3,3) there: specificity 0, where the middle point would have given 1/3."""
    from dermtool import metrics

    truth, scores = [1, 0, 1, 0, 1, 0], [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    assert metrics.specificity_at_sensitivity(truth, scores, 0.5) == 0.0
    assert metrics.specificity_at_sensitivity(truth, scores, 0.3) == pytest.approx(2 / 3)
    assert metrics.specificity_at_sensitivity([0, 0, 1], [0.1, 0.2, 0.3], 0.95) == 1.0
    assert math.isnan(metrics.specificity_at_sensitivity([1, 1], [0.1, 0.2], 0.5))
    # precision 1/2 at recall 1/3, 2/4 at 2/3, 3/6 at 1: AP 1/2
    assert metrics.average_precision(truth, scores) == pytest.approx(1 / 2)


def test_a_two_column_tie_goes_to_the_earlier_class_whatever_the_float_subtraction(tmp_path):
    """Without a nevus column nevus = 1 - m - s: 1 - 0.45 - 0.10 is 0.45000000000000007 in floating
    point, which once made the melanoma tie a nevus (and 1 - 0.18 - 0.41 beat keratosis)."""
    ids = ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    truth = write_csv(tmp_path / "truth.csv", list(io.REQUIRED_COLUMNS),
                      [[ids[0], 1.0, 0.0], [ids[1], 0.0, 1.0], [ids[2], 0.0, 0.0]])
    pred = write_csv(tmp_path / "pred.csv", list(io.REQUIRED_COLUMNS),
                     [[ids[0], "0.45", "0.10"], [ids[1], "0.18", "0.41"], [ids[2], "0.2", "0.3"]])
    per_image = score(pred, truth)["classification"]["per_image"]
    assert [per_image[i]["pred"] for i in ids] == ["melanoma", "seborrheic_keratosis", "nevus"]


@pytest.mark.parametrize("value", [1, 2, 100, 128])
def test_a_mask_of_zero_and_one_other_value_is_that_value_as_lesion(tmp_path, value):
    """The ISIC scorer reads a "binary image with a high value other than 255" as that value =
    lesion; > 128 once read 0/100 and 0/128 as empty (JAC 0, exit 0) and refused 0/2."""
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    truth = np.zeros((4, 4), bool)
    truth[:2] = True  # 8 pixels
    pred = np.zeros((4, 4), np.uint8)
    pred[1:3] = value  # 8 pixels, 4 shared: JAC 4 / 12
    write_mask(truth_dir / "X_segmentation.png", truth)
    Image.fromarray(pred).save(pred_dir / "X_segmentation.png")
    seg = score(None, None, pred_dir, truth_dir)["segmentation"]
    assert seg["per_image"] == {"X": pytest.approx(4 / 12)} and seg["n_zero_one_masks"] == 1
    assert io.is_label_map(np.array([[0, 1], [2, 0]], np.uint8)) and not io.is_label_map(pred)


def test_a_prediction_folder_naming_no_truth_image_is_refused(hand_case):
    """An empty folder, or one of other names (the ISIC submission's _segmentation_prediction.png),
    once scored JAC 0.0000 with exit 0: almost always the wrong folder."""
    for mask in hand_case["pred_masks"].iterdir():
        mask.rename(mask.with_name(mask.name.replace("_segmentation", "_segmentation_prediction")))
    result = run_score(hand_case)
    assert result.exit_code == 2 and "has no files named <image_id>_segmentation.png" in result.output
    for mask in hand_case["pred_masks"].iterdir():
        mask.rename(mask.with_name("OTHER" + mask.name.replace("_segmentation_prediction", "_segmentation")))
    result = run_score(hand_case)
    assert result.exit_code == 2 and "None of the 4 predicted masks" in result.output


def test_mean_performance_needs_images_in_common_and_names_differing_sets(hand_case, tmp_path):
    both = score(hand_case["pred"], hand_case["truth"], hand_case["pred_masks"], hand_case["truth_masks"])
    seg, cls = both["segmentation"], both["classification"]
    assert both["mean_performance"] == pytest.approx((seg["jac"] + cls["bacc"]) / 2)
    assert both["mean_performance_note"] == (
        f"the mean performance joins two image sets: JAC of 4 images (truth masks), BACC of {len(IDS)} "
        "(truth CSV), 4 of them in both")
    other = tmp_path / "other_truth_masks"
    other.mkdir()
    for name in ("pred_masks", "truth_masks"):  # masks of images the CSVs do not name
        for mask in hand_case[name].glob("*_segmentation.png"):
            mask.rename(mask.with_name("OTHER_" + mask.name))
    apart = score(hand_case["pred"], hand_case["truth"], hand_case["pred_masks"], hand_case["truth_masks"])
    assert apart["mean_performance"] is None and "name no image in common" in apart["mean_performance_note"]
    result = run_score(hand_case)
    assert result.exit_code == 0 and "mean performance (JAC" not in result.output
    assert "name no image in common" in result.output


def test_a_bad_row_after_blank_lines_is_named_by_its_row_in_the_file(tmp_path):
    """Blank lines were dropped before the rows were numbered: a bad value on row 6 was "row 4"."""
    truth = tmp_path / "truth.csv"
    truth.write_text("image_id,melanoma,seborrheic_keratosis\nISIC_0000000,1,0\n\n\nISIC_0000001,0,0\nISIC_0000002,x,0\n")
    with pytest.raises(InputError, match="non-numeric melanoma value 'x' at row 6"):
        io.read_class_csv(truth, role="truth")


def test_a_bad_label_after_blank_lines_is_named_by_its_row_in_the_file(tmp_path):
    pred = tmp_path / "pred.csv"
    pred.write_text("image_id,melanoma,seborrheic_keratosis,label\nA,0.6,0.1,melanoma\n\n\nB,0.2,0.1,nevus\n"
                    "C,0.1,0.1,nevusX\n")
    with pytest.raises(InputError, match="label 'nevusX' at row 6"):
        io.read_label_column(pred)


def test_ids_in_the_other_unicode_form_are_the_same_image(tmp_path):
    """A truth CSV written on macOS (é as e + accent) did not score against dermtool's own output
    (é as one character): "has no row for 1 image(s) ... café"."""
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    truth = write_csv(tmp_path / "truth.csv", list(io.REQUIRED_COLUMNS), [[nfd, 1.0, 0.0], ["b", 0.0, 0.0]])
    pred = write_csv(tmp_path / "pred.csv", [*io.REQUIRED_COLUMNS, "label"],
                     [[nfc, 0.8, 0.1, "melanoma"], ["b", 0.1, 0.1, "nevus"]])
    truth_dir, pred_dir = tmp_path / "tm", tmp_path / "pm"
    truth_dir.mkdir()
    pred_dir.mkdir()
    write_mask(truth_dir / f"{nfd}_segmentation.png", np.ones((4, 4), bool))
    write_mask(pred_dir / f"{nfc}_segmentation.png", np.ones((4, 4), bool))
    result = score(pred, truth, pred_dir, truth_dir)
    assert result["classification"]["per_image"][nfd] == {"true": "melanoma", "pred": "melanoma"}
    assert result["classification"]["decision"]["bacc"] == 1.0
    assert result["segmentation"]["per_image"] == {nfd: 1.0}
    assert result["mean_performance_note"].endswith("1 of them in both")  # café in both, by either form
