"""`dermtool calibrate`: the fitted temperature recovers a known one, the threshold meets the
target by the stated rule, config.json (and a carried LiteRT export's) receive the decision, a
second calibration gives the same answer, and bad input is refused in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dermtool import CLASS_NAMES
from dermtool.calibrate import calibrate, fit_temperature
from dermtool.cli import app
from dermtool.config import load_config, preset_config, save_config
from dermtool.decision import apply_temperature, decide
from dermtool.modelio import model_fingerprint, shipped_export

runner = CliRunner()
#: The network's probabilities are softmax(TRUE_T * z) while the classes are drawn from
#: softmax(z): over-confident by exactly TRUE_T, which temperature scaling must recover.
TRUE_T = 2.0


def synthetic_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(over-confident probabilities rounded as a CSV holds them, true classes)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, 3))
    q = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in q])
    p = np.exp(TRUE_T * z) / np.exp(TRUE_T * z).sum(axis=1, keepdims=True)
    return np.round(p, 6), y


def write_pair(folder: Path, probs: np.ndarray, y: np.ndarray, temperature: float | None = None,
               columns=CLASS_NAMES) -> tuple[Path, Path]:
    """predictions.csv (as infer writes it; infer.json beside it when `temperature` is given) and truth.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"SYN_{i:05d}" for i in range(len(y))]
    pred_lines = [",".join(["image_id", *columns, "label"])]
    for image_id, row in zip(ids, probs):
        values = [f"{row[CLASS_NAMES.index(c)]:.6f}" for c in columns]
        pred_lines.append(",".join([image_id, *values, CLASS_NAMES[int(np.argmax(row))]]))
    (folder / "predictions.csv").write_text("\n".join(pred_lines) + "\n")
    truth = ["image_id,melanoma,seborrheic_keratosis"] + [f"{i},{float(c == 0)},{float(c == 1)}" for i, c in zip(ids, y)]
    (folder / "truth.csv").write_text("\n".join(truth) + "\n")
    if temperature is not None:
        (folder / "infer.json").write_text(json.dumps({"temperature": temperature}))
    return folder / "predictions.csv", folder / "truth.csv"


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("calibrate")
    a, b = synthetic_set(1500, 1), synthetic_set(1000, 2)
    return {"a": write_pair(root / "a", *a), "b": write_pair(root / "b", *b), "arrays": (a, b)}


@pytest.fixture
def model(tmp_path) -> Path:
    """A cls model folder as calibrate sees it: config.json and (stand-in) weights, with a
    carried LiteRT export written from them."""
    folder = tmp_path / "model"
    folder.mkdir()
    save_config(folder / "config.json", preset_config("compact", "cls", size=32, base_filters=4, depth=2))
    (folder / "best.weights.h5").write_bytes(b"stand-in weights: calibrate never loads them")
    litert = folder / "litert"
    litert.mkdir()
    (litert / "model.tflite").write_bytes(b"stand-in")
    cfg, _, _ = load_config(folder)
    save_config(litert / "config.json", cfg, export={"format": "tflite", "file": "model.tflite",
                                                      "source_sha1": model_fingerprint(folder)})
    return folder


def calibrate_cli(model: Path, *pairs, extra=()):
    args = ["calibrate", str(model)]
    for pred, truth in pairs:
        args += ["--preds", str(pred), "--truth", str(truth)]
    return runner.invoke(app, [*args, *map(str, extra)])


def test_fitted_temperature_recovers_the_known_one(sets):
    (pa, ya), (pb, yb) = sets["arrays"]
    t = fit_temperature(np.concatenate([pa, pb]), np.concatenate([ya, yb]))
    assert abs(t - TRUE_T) < 0.15, t
    # and it is the minimum: the likelihood is worse a little either side
    from dermtool import metrics

    probs, y = np.concatenate([pa, pb]), np.concatenate([ya, yb])
    nll = lambda temp: metrics.negative_log_likelihood(apply_temperature(probs, temp), y, 1e-7)  # noqa: E731
    assert nll(t) < nll(t * 0.97) and nll(t) < nll(t * 1.03)


def test_calibrate_writes_the_decision_and_meets_the_target(sets, model):
    result = calibrate_cli(model, sets["a"], sets["b"], extra=["--sensitivity", "0.85"])
    assert result.exit_code == 0, result.output
    cfg, train, raw = load_config(model)
    assert abs(cfg.temperature - TRUE_T) < 0.15
    (pa, ya), (pb, yb) = sets["arrays"]
    probs = apply_temperature(np.concatenate([pa, pb]), cfg.temperature)
    y = np.concatenate([ya, yb])
    mel = probs[y == 0, 0]
    caught = np.sum(mel >= cfg.melanoma_threshold)
    assert caught == math.ceil(0.85 * mel.size)  # the target, and no more: the largest such t
    # t lies in the gap below the last melanoma that must be caught
    needed = np.sort(mel)[::-1][caught - 1]
    below = probs[:, 0][probs[:, 0] < needed].max()
    assert cfg.melanoma_threshold == pytest.approx((needed + below) / 2)
    # the provenance: the target, both sets with their counts and SE/SP, and the pool
    cal = cfg.calibration
    assert cal["target_sensitivity"] == 0.85 and len(cal["sets"]) == 3
    assert [s["images"] for s in cal["sets"]] == [1500, 1000, 2500]
    assert cal["sets"][2]["melanomas"] == int(np.sum(y == 0))
    assert cal["sets"][2]["sensitivity"] == pytest.approx(caught / mel.size)
    labels = decide(probs, cfg.melanoma_threshold)
    negatives = y != 0
    assert cal["sets"][2]["specificity"] == pytest.approx(np.mean(labels[negatives] != 0))
    assert cal["sets"][2]["nll_after"] < cal["sets"][2]["nll_before"]
    assert cal["sets"][2]["ece_after"] < cal["sets"][2]["ece_before"]
    # the table printed
    for text in ("NLL", "ECE", "SE", "pooled", f"{cfg.temperature:.4f}",
                 f"{cal['sets'][2]['nll_before']:.3f}→{cal['sets'][2]['nll_after']:.3f}",
                 f"{cal['sets'][2]['sensitivity']:.3f}"):
        assert text in result.output, text
    # the carried LiteRT export has the same decision and still counts as this model's
    lite_cfg, _, lite_raw = load_config(model / "litert")
    assert (lite_cfg.temperature, lite_cfg.melanoma_threshold) == (cfg.temperature, cfg.melanoma_threshold)
    assert shipped_export(model, "litert") == model / "litert"
    assert lite_raw["export"]["format"] == "tflite"  # the rest of the file is kept
    assert lite_raw["export"]["decision"]["melanoma_threshold"] == cfg.melanoma_threshold
    assert not list(model.rglob(".*tmp"))


def test_calibrating_twice_gives_the_same_decision(sets, model, tmp_path):
    first = calibrate(model, [sets["a"], sets["b"]], 0.85)
    again = calibrate(model, [sets["a"], sets["b"]], 0.85)  # the same uncalibrated CSVs
    assert (again.temperature, again.melanoma_threshold) == (first.temperature, first.melanoma_threshold)
    # CSVs of the calibrated model: infer.json says which temperature it applied, and calibrate undoes it
    (pa, ya), (pb, yb) = sets["arrays"]
    rerun = [write_pair(tmp_path / name, np.round(apply_temperature(p, first.temperature), 6), y,
                     temperature=first.temperature) for name, p, y in (("a2", pa, ya), ("b2", pb, yb))]
    third = calibrate(model, rerun, 0.85)
    assert third.temperature == pytest.approx(first.temperature, abs=2e-4)
    assert third.melanoma_threshold == pytest.approx(first.melanoma_threshold, abs=1e-4)


def test_an_int8_engines_rows_that_miss_1_by_a_few_thousandths_are_rescaled(sets, model, tmp_path):
    (pa, ya), _ = sets["arrays"]
    factor = np.where((np.arange(len(ya)) % 2 == 1) & (pa.max(axis=1) < 0.99), 1.004, 0.996)
    off = write_pair(tmp_path / "int8", pa * factor[:, None], ya)
    assert calibrate(model, [off], write=False).temperature == pytest.approx(
        calibrate(model, [sets["a"]], write=False).temperature, abs=2e-3)


def test_a_set_given_twice_is_named(sets, model):
    result = calibrate_cli(model, sets["a"], sets["a"], extra=["--dry-run"])
    assert result.exit_code == 0 and "1500 image id(s) are in more than one set" in result.output, result.output


def test_dry_run_writes_nothing(sets, model):
    before = (model / "config.json").read_bytes()
    result = calibrate_cli(model, sets["a"], extra=["--dry-run"])
    assert result.exit_code == 0, result.output
    assert (model / "config.json").read_bytes() == before and "nothing (--dry-run)" in result.output


def test_a_stale_carried_export_is_left_alone_and_named(sets, model):
    raw = json.loads((model / "litert" / "config.json").read_text())
    raw["export"]["source_sha1"] = "0" * 40
    (model / "litert" / "config.json").write_text(json.dumps(raw))
    result = calibrate_cli(model, sets["a"])
    assert result.exit_code == 0, result.output
    assert load_config(model / "litert")[0].melanoma_threshold is None
    assert "not updated" in result.output


def _no_melanoma(tmp_path, sets):
    probs, y = synthetic_set(50, 3)
    return write_pair(tmp_path / "nomel", probs, np.where(y == 0, 2, y))


def _missing_column(tmp_path, sets):
    probs, y = synthetic_set(50, 3)
    return write_pair(tmp_path / "cols", probs, y, columns=("melanoma", "seborrheic_keratosis"))


def _missing_id(tmp_path, sets):
    folder = Path(shutil.copytree(sets["a"][0].parent, tmp_path / "ids"))
    pred, truth = folder / "predictions.csv", folder / "truth.csv"
    lines = pred.read_text().splitlines()
    pred.write_text("\n".join(lines[:-1]) + "\n")
    return pred, truth


def _not_probabilities(tmp_path, sets):
    probs, y = synthetic_set(50, 3)
    return write_pair(tmp_path / "sum", probs * 0.5, y)


def _damaged_record(tmp_path, sets):
    """A damaged infer.json beside the CSV was once read as T = 1 without a word."""
    probs, y = synthetic_set(50, 3)
    pred, truth = write_pair(tmp_path / "record", probs, y, temperature=2.0)
    (pred.parent / "infer.json").write_text('{"temperature": ')
    return pred, truth


def _perfectly_ranked(tmp_path, sets):
    """Every image's true class far the likeliest: the likelihood falls all the way to T = 0.05,
    which was once written into config.json as if it were a fit."""
    y = np.array([0, 1, 2, 0, 2, 1])
    return write_pair(tmp_path / "perfect", np.where(np.eye(3)[y] == 1, 0.9, 0.05), y)


@pytest.mark.parametrize("make, words", [(_no_melanoma, "no melanoma"), (_missing_column, "nevus"),
                                         (_missing_id, "has no row"), (_not_probabilities, "sum to"),
                                         (_damaged_record, "infer.json"),
                                         (_perfectly_ranked, "ran to the edge of its search range (0.0")])
def test_bad_input_is_refused_in_one_line(make, words, sets, model, tmp_path):
    before = (model / "config.json").read_bytes()
    result = calibrate_cli(model, make(tmp_path, sets))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.output
    assert (model / "config.json").read_bytes() == before


def test_a_small_set_is_fitted_with_a_note_naming_its_size(model, tmp_path):
    probs, y = synthetic_set(60, 4)
    result = calibrate_cli(model, write_pair(tmp_path / "small", probs, y), extra=["--dry-run"])
    assert result.exit_code == 0, result.output
    assert "fitted on 60 image(s): the temperature and threshold are rough" in " ".join(result.output.split())


def test_unpaired_options_and_a_seg_model_are_refused(sets, model, tmp_path):
    result = runner.invoke(app, ["calibrate", str(model), "--preds", str(sets["a"][0])])
    assert result.exit_code == 2
    result = runner.invoke(app, ["calibrate", str(model), "--preds", str(sets["a"][0]), "--preds",
                                 str(sets["b"][0]), "--truth", str(sets["a"][1])])
    assert result.exit_code == 2 and "one --truth per --preds" in result.output
    seg = tmp_path / "seg"
    seg.mkdir()
    save_config(seg / "config.json", preset_config("compact", "seg", size=32, base_filters=4, depth=2))
    result = calibrate_cli(seg, sets["a"])
    assert result.exit_code == 2 and "no classifier" in result.output
    result = calibrate_cli(model, sets["a"], extra=["--sensitivity", "1.5"])
    assert result.exit_code == 2 and "--sensitivity" in result.output


def test_the_carried_export_is_calibrated_through_its_model_only(sets, model):
    # calibrated alone, the export and its model folder would decide differently by --engine
    result = calibrate_cli(model / "litert", sets["a"])
    assert result.exit_code == 2
    assert "litert export that the model folder" in result.output and f"calibrate {model.resolve()}" in result.output
    assert load_config(model / "litert")[0].temperature == load_config(model)[0].temperature


def test_an_export_on_its_own_gets_its_decision_description_too(sets, model, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(model / "litert", alone)
    assert calibrate_cli(alone, sets["a"]).exit_code == 0
    cfg, _, raw = load_config(alone)
    assert raw["export"]["decision"]["melanoma_threshold"] == cfg.melanoma_threshold is not None
    assert raw["export"]["decision"]["temperature"] == cfg.temperature


def test_a_failed_second_write_leaves_the_model_and_its_export_as_they_were(sets, model, monkeypatch):
    import dermtool.io

    before = {p: p.read_bytes() for p in (model / "config.json", model / "litert" / "config.json")}
    real = dermtool.io.claim
    def full_for_the_export(path):  # noqa: E306
        if path.parent.name == "litert":
            raise OSError(28, "No space left on device", str(path))
        return real(path)
    monkeypatch.setattr(dermtool.io, "claim", full_for_the_export)
    result = calibrate_cli(model, sets["a"])
    assert result.exit_code == 2 and "litert/config.json" in result.output, result.output
    assert {p: p.read_bytes() for p in before} == before
    assert shipped_export(model, "litert") == model / "litert"
    assert not [p for p in model.rglob("*") if p.name.startswith(".")]


def test_a_failed_second_rename_restores_the_first_and_names_config_json(sets, model, monkeypatch):
    """The second rename failing (a busy or read-only file) left config.json calibrated and the
    carried export not: two decisions in one model folder. A private config.json came out 0644."""
    import os

    (model / "config.json").chmod(0o640)
    before = {p: p.read_bytes() for p in (model / "config.json", model / "litert" / "config.json")}
    real = os.replace

    def busy_export(src, dst):
        if Path(dst).parent.name == "litert":
            raise OSError(16, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", busy_export)
    result = calibrate_cli(model, sets["a"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"{model / 'litert' / 'config.json'}: cannot write" in said and ".tmp" not in said, said
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in model.rglob("*") if p.name.startswith(".")]
    monkeypatch.setattr(os, "replace", real)
    assert calibrate_cli(model, sets["a"]).exit_code == 0
    assert (model / "config.json").stat().st_mode & 0o777 == 0o640


def test_predictions_of_other_weights_or_settings_are_named(sets, model, tmp_path):
    pred, truth = sets["a"]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(pred, run / "val17.csv")  # renamed in its run's folder: still that run's
    views = "frame" if load_config(model)[0].cls_views != "frame" else "frame+lesion"
    record = {"temperature": 1.0, "model": "/elsewhere/other", "weights_sha1": "f" * 40,
              "cls_views": views, "tta": 8}
    (run / "infer.json").write_text(json.dumps(record))
    notes = calibrate(model, [(run / "val17.csv", truth)], write=False).notes
    text = " ".join(notes)
    assert "made by /elsewhere/other, whose weights are not" in text
    assert f"--cls-views {views}" in text and "--tta 8" in text
    assert "no infer record" not in text
    record.update(weights_sha1=model_fingerprint(model, config=False), cls_views=load_config(model)[0].cls_views,
                  tta=1, temperature=2.0)
    (run / "infer.json").write_text(json.dumps(record))
    own = calibrate(model, [(run / "val17.csv", truth)], write=False)
    assert own.notes == [] or all("fitted on" in n for n in own.notes)
    # the renamed CSV's temperature is read from infer.json and undone
    plain = calibrate(model, [sets["a"]], write=False)
    assert own.temperature == pytest.approx(plain.temperature * 2.0, rel=0.03)  # not plain: T = 2 was read


def test_a_carried_export_describing_another_decision_is_not_used_in_the_models_name(model):
    # an export claiming the model's sha1 ran with its own temperature and threshold in the
    # model's name; the two config.json must describe the same network and decision
    assert shipped_export(model, "litert") == model / "litert"
    raw = json.loads((model / "litert" / "config.json").read_text())
    raw["model"]["temperature"] = 8.71
    (model / "litert" / "config.json").write_text(json.dumps(raw))
    assert shipped_export(model, "litert") is None


def test_a_record_edited_to_values_infer_never_writes_is_refused_in_one_line(sets, model, tmp_path):
    # calibrate read infer.json's tta, cls_views and weights_sha1 unchecked, as merge once did
    pred, truth = sets["a"]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(pred, run / "predictions.csv")
    (run / "infer.json").write_text(json.dumps({"temperature": 1.0, "tta": "8"}))
    result = calibrate_cli(model, (run / "predictions.csv", truth), extra=["--dry-run"])
    assert result.exit_code == 2 and "tta is '8', not what infer writes there" in " ".join(result.output.split())
