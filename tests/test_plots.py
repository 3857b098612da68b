"""`dermtool score --plots`: the figures' data equal the scorer's numbers (not pixels), and the
command writes the figures and score.html."""

from __future__ import annotations

import json
import shutil
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dermtool import CLASS_NAMES, metrics
from dermtool.cli import app
from dermtool.decision import label_names
from dermtool.plots import (jaccard_histogram_data, operating_point_data, plot_confusion, plot_roc, reliability_data,
                            roc_data, worst_data)
from dermtool.score import class_arrays, score
from dermtool.synthetic import make_lesion

runner = CliRunner()
N = 24


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """24 synthetic images with truth masks and labels, and predictions of varied quality:
    masks shifted by 0..23 px, probabilities that favour the true class more or less."""
    root = tmp_path_factory.mktemp("plots")
    folders = {name: root / name for name in ("images", "truth_masks", "pred_masks")}
    for folder in folders.values():
        folder.mkdir()
    rng = np.random.default_rng(3)
    truth_rows, pred_rows = [], []
    for i in range(N):
        image_id = f"SYN_{i:03d}"
        rgb, mask, cls = make_lesion(60, 80, np.random.default_rng(i), cls=i % 3)
        Image.fromarray(rgb).save(folders["images"] / f"{image_id}.jpg", quality=90)
        Image.fromarray(mask.astype(np.uint8) * 255).save(folders["truth_masks"] / f"{image_id}_segmentation.png")
        pred = np.roll(mask, i, axis=1)
        Image.fromarray(pred.astype(np.uint8) * 255).save(folders["pred_masks"] / f"{image_id}_segmentation.png")
        truth_rows.append(f"{image_id},{float(cls == 0)},{float(cls == 1)}")
        p = rng.dirichlet(np.ones(3))
        p[cls] += rng.uniform(0, 1.0)
        p = np.round(p / p.sum(), 1)  # rounded: ties between images, as real outputs have
        pred_rows.append(f"{image_id},{p[0]},{p[1]},{p[2]}")
    (root / "truth.csv").write_text("image_id,melanoma,seborrheic_keratosis\n" + "\n".join(truth_rows) + "\n")
    (root / "pred.csv").write_text("image_id,melanoma,seborrheic_keratosis,nevus\n" + "\n".join(pred_rows) + "\n")
    return {"truth": root / "truth.csv", "pred": root / "pred.csv", "root": root, **folders}


def test_roc_curve_of_a_hand_case():
    # scores 0.9 (pos), 0.8 (neg), 0.4 (pos), 0.1 (neg): up, right, up, right.
    fpr, tpr, thresholds = metrics.roc_curve([1, 0, 1, 0], [0.9, 0.8, 0.4, 0.1])
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1]
    assert tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert thresholds.tolist() == [np.inf, 0.9, 0.8, 0.4, 0.1]
    # a tie between a positive and a negative is one diagonal step: the half that roc_auc counts
    fpr, tpr, _ = metrics.roc_curve([1, 0], [0.5, 0.5])
    assert fpr.tolist() == [0, 1] and tpr.tolist() == [0, 1]
    assert metrics.roc_curve([1, 1], [0.2, 0.3])[0].size == 0  # one class only: no curve


def test_roc_points_are_the_scorers(case):
    result = score(case["pred"], case["truth"])
    _, y_true, probs = class_arrays(case["pred"], case["truth"])
    data = roc_data(y_true, probs)
    assert list(data) == list(CLASS_NAMES)
    for name, d in data.items():
        assert d["auc"] == result["classification"]["per_class"][name]["auc"]
        area = np.sum(np.diff(d["fpr"]) * (d["tpr"][1:] + d["tpr"][:-1]) / 2)  # trapezoids
        assert area == pytest.approx(d["auc"], abs=1e-12)
        assert (d["fpr"][0], d["tpr"][0], d["fpr"][-1], d["tpr"][-1]) == (0, 0, 1, 1)
        assert (np.diff(d["fpr"]) >= 0).all() and (np.diff(d["tpr"]) >= 0).all()


def test_jaccard_histogram_holds_every_image_and_the_scorers_share_below_065(case):
    seg = score(None, None, case["pred_masks"], case["truth_masks"])["segmentation"]
    data = jaccard_histogram_data(seg["per_image"])
    assert data["counts"].sum() == N
    assert data["mean"] == pytest.approx(seg["jac"])
    assert data["below"] == pytest.approx(seg["frac_below_065"])
    assert 0.65 in np.round(data["edges"], 10)  # the line falls on a bin edge


def test_worst_images_are_the_lowest_jaccard_first():
    per_image = {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.1}
    assert worst_data(per_image, 3) == [("b", 0.1), ("d", 0.1), ("c", 0.5)]


def test_reliability_bins_hold_every_image_and_give_the_scorers_ece(case):
    result = score(case["pred"], case["truth"])["classification"]
    _, y_true, probs = class_arrays(case["pred"], case["truth"])
    data = reliability_data(y_true, probs)
    assert data["counts"].sum() == N and len(data["edges"]) == metrics.ECE_BINS + 1
    assert data["ece"] == result["ece"]
    used = data["counts"] > 0
    gap = np.sum(data["counts"][used] * np.abs(data["accuracy"][used] - data["confidence"][used])) / N
    assert gap == pytest.approx(result["ece"])


def test_the_operating_point_of_a_thresholded_label_column_lies_on_the_melanoma_roc(case, tmp_path):
    _, y_true, probs = class_arrays(case["pred"], case["truth"])
    lines = case["pred"].read_text().splitlines()
    labels = label_names(probs, 0.3)
    pred = tmp_path / "pred.csv"
    pred.write_text("\n".join([lines[0] + ",label"] + [f"{line},{lab}" for line, lab in zip(lines[1:], labels)]) + "\n")
    cls = score(pred, case["truth"])["classification"]
    fpr, tpr = operating_point_data(cls)
    positive, called = y_true == 0, probs[:, 0] >= 0.3
    assert (tpr, fpr) == (pytest.approx(np.mean(called[positive])), pytest.approx(np.mean(called[~positive])))
    roc = roc_data(y_true, probs)["melanoma"]
    assert np.any(np.isclose(roc["fpr"], fpr) & np.isclose(roc["tpr"], tpr))  # a point of the curve
    assert operating_point_data(score(case["pred"], case["truth"])["classification"]) is None  # no label column
    out = tmp_path / "plots"
    assert runner.invoke(app, ["score", str(pred), str(case["truth"]), "--plots", str(out)]).exit_code == 0
    page = (out / "score.html").read_text()
    assert "Decision of the label column" in page and f"{1 - fpr:.3f}" in page


def test_bootstrap_gives_auc_intervals_around_the_auc(case):
    result = score(case["pred"], case["truth"], bootstrap=200, seed=1)["classification"]
    for name in CLASS_NAMES:
        low, high = result["auc_ci95"][name]
        assert low <= result["per_class"][name]["auc"] <= high
    assert score(case["pred"], case["truth"])["classification"]["auc_ci95"] is None


def test_score_plots_writes_figures_and_page(case, tmp_path):
    out = tmp_path / "plots"
    args = ["score", str(case["pred"]), str(case["truth"]), "--pred-masks", str(case["pred_masks"]),
            "--truth-masks", str(case["truth_masks"]), "--bootstrap", "100", "--plots", str(out),
            "--images", str(case["images"]), "--json", str(tmp_path / "s.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("roc.png", "confusion.png", "jaccard.png", "worst.png", "reliability.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 200
    page = (out / "score.html").read_text()
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == ["confusion.png", "jaccard.png", "reliability.png",
                                                                "roc.png", "worst.png"]
    numbers = json.loads((tmp_path / "s.json").read_text())
    jac, ci = numbers["segmentation"]["jac"], numbers["segmentation"]["jac_ci95"]
    assert f"{jac:.3f}" in page and f"[{ci[0]:.3f}, {ci[1]:.3f}]" in page
    for name in CLASS_NAMES:
        low, high = numbers["classification"]["auc_ci95"][name]
        assert f"[{low:.3f}, {high:.3f}]" in page
    assert "not a medical device" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_plots_without_images_or_masks(case, tmp_path):
    out = tmp_path / "plots"
    result = runner.invoke(app, ["score", str(case["pred"]), str(case["truth"]), "--plots", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "reliability.png", "roc.png", "score.html"]


#: file names that matplotlib's mathtext reads as formulas: an unknown command, a number, and an
#: escaped dollar whose backslash it drops
DOLLAR_IDS = ["x$\\qq$y", "cost$5$", "a\\$b"]


@pytest.fixture
def drawn_text(monkeypatch) -> list[tuple[str, bool]]:
    """(text, drawn as mathtext?) of every text matplotlib's Agg canvas draws while the test runs."""
    from matplotlib.backends.backend_agg import RendererAgg

    drawn, draw_text = [], RendererAgg.draw_text

    def recording(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):
        drawn.append((s, bool(ismath)))
        return draw_text(self, gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)

    monkeypatch.setattr(RendererAgg, "draw_text", recording)
    return drawn


def test_image_ids_with_dollars_are_shown_as_written_on_the_worst_sheet(case, tmp_path, drawn_text):
    """`x$\\qq$y` failed the whole command (no plots, no JSON) and `cost$5$` showed as "cost5"."""
    folders = {name: tmp_path / name for name in ("images", "truth_masks", "pred_masks")}
    for name, folder in folders.items():
        folder.mkdir()
        source = case[name] / ("SYN_000.jpg" if name == "images" else "SYN_000_segmentation.png")
        for image_id in DOLLAR_IDS:
            shutil.copy(source, folder / source.name.replace("SYN_000", image_id))
    out = tmp_path / "plots"
    result = runner.invoke(app, ["score", "--pred-masks", str(folders["pred_masks"]), "--truth-masks",
                                 str(folders["truth_masks"]), "--plots", str(out), "--images",
                                 str(folders["images"]), "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert (out / "worst.png").is_file() and sorted(json.loads((tmp_path / "s.json").read_text())
                                                    ["segmentation"]["per_image"]) == sorted(DOLLAR_IDS)
    for image_id in DOLLAR_IDS:
        assert (image_id, False) in drawn_text  # its own line of the tile's title, as plain text


def test_class_names_with_dollars_are_shown_as_written_in_legends_and_ticks(tmp_path, drawn_text):
    y_true = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.7 + 0.1
    plot_roc(roc_data(y_true, probs, DOLLAR_IDS), None, tmp_path / "roc.png")
    plot_confusion([[1, 0, 1], [0, 2, 0], [0, 0, 1]], DOLLAR_IDS, tmp_path / "confusion.png")
    legend = [s for s, _ in drawn_text if ": AUC " in s]
    assert len(legend) == 3 and all(s.split(": AUC ")[0] in DOLLAR_IDS for s in legend)
    assert all(not math for s, math in drawn_text if s in legend or s in DOLLAR_IDS)
    assert sum(s in DOLLAR_IDS for s, _ in drawn_text) == 2 * len(DOLLAR_IDS)  # the x and the y ticks


def test_images_without_plots_or_missing_exit_2(case, tmp_path):
    base = ["score", str(case["pred"]), str(case["truth"])]
    result = runner.invoke(app, [*base, "--images", str(case["images"])])
    assert result.exit_code == 2 and "--plots" in result.stderr
    result = runner.invoke(app, [*base, "--plots", str(tmp_path / "p"), "--images", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "nope" in result.stderr
    assert not (tmp_path / "p").exists()


def test_an_unreadable_original_is_left_out_of_the_worst_sheet_not_fatal(case, tmp_path):
    images = Path(shutil.copytree(case["images"], tmp_path / "images"))
    worst = images / "SYN_023.jpg"  # shifted the most: on the sheet
    seg = score(None, None, case["pred_masks"], case["truth_masks"])["segmentation"]
    assert "SYN_023" in [image_id for image_id, _ in worst_data(seg["per_image"])]
    worst.write_bytes(worst.read_bytes()[:300])
    out = tmp_path / "plots"
    result = runner.invoke(app, ["score", "--pred-masks", str(case["pred_masks"]), "--truth-masks",
                                 str(case["truth_masks"]), "--plots", str(out), "--images", str(images)])
    assert result.exit_code == 0, result.output
    assert (out / "worst.png").is_file() and (out / "score.html").is_file()


def test_the_page_shows_the_notes_the_terminal_prints(case, tmp_path):
    """The page dropped "label column not scored" and the count of 0/1 masks."""
    rows = case["pred"].read_text().splitlines()
    pred = tmp_path / "pred.csv"
    pred.write_text("\n".join([rows[0] + ",label"] + [r + ",benign" for r in rows[1:]]) + "\n")
    masks = Path(shutil.copytree(case["pred_masks"], tmp_path / "masks"))
    one = masks / "SYN_000_segmentation.png"
    Image.fromarray((np.asarray(Image.open(one)) > 128).astype(np.uint8)).save(one)
    out = tmp_path / "plots"
    result = runner.invoke(app, ["score", str(pred), str(case["truth"]), "--pred-masks", str(masks),
                                 "--truth-masks", str(case["truth_masks"]), "--plots", str(out)])
    assert result.exit_code == 0, result.output
    page = " ".join((out / "score.html").read_text().split())
    assert "label column not scored" in page and "Decision of the label column" not in page
    assert "<td>masks stored as 0/v, e.g. 0/1 (read as v = lesion)</td><td>1</td>" in page


@pytest.mark.parametrize("how", ["plots_is_a_file", "drawing_fails"])
def test_a_failed_plots_leaves_no_json_and_no_folder(case, tmp_path, monkeypatch, how):
    """The JSON was written before the plots failed, and an empty plots folder was left."""
    from dermtool import plots

    out = tmp_path / "plots"
    if how == "plots_is_a_file":
        out.write_text("mine")
    else:
        def broken(*args, **kwargs):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(plots, "_draw", broken)
    result = runner.invoke(app, ["score", str(case["pred"]), str(case["truth"]), "--plots", str(out),
                                 "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and str(out) in " ".join(result.stderr.split()), result.output
    assert not (tmp_path / "s.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["plots"] if how == "plots_is_a_file" else [])
    assert how == "drawing_fails" or out.read_text() == "mine"


def test_plots_do_not_import_tensorflow(case, tmp_path):
    code = ("import sys; from dermtool.cli import app; from typer.testing import CliRunner; "
            f"r = CliRunner().invoke(app, ['score', {str(case['pred'])!r}, {str(case['truth'])!r}, "
            f"'--pred-masks', {str(case['pred_masks'])!r}, '--truth-masks', {str(case['truth_masks'])!r}, "
            f"'--plots', {str(tmp_path / 'p')!r}, '--images', {str(case['images'])!r}]); "
            "print(r.exit_code, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[-2:] == ["0", "False"], out.stderr
