"""The bundled default model: it loads, predicts sane output, and is good on real data."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from dermtool.config import load_config
from dermtool.infer import default_model_dir, load_model
from dermtool.preprocess import prepare
from dermtool.synthetic import make_lesion


@pytest.fixture(scope="module")
def bundled():
    folder = default_model_dir()
    model, cfg = load_model(folder)
    return folder, model, cfg


def test_the_bundled_folder_describes_itself(bundled):
    folder, _, cfg = bundled
    assert (folder / "MODEL_CARD.md").is_file()
    model_cfg, train_cfg, raw = load_config(folder)
    assert model_cfg == cfg and train_cfg is not None
    assert train_cfg.command.startswith("dermtool train")
    assert cfg.class_names == ("melanoma", "seborrheic_keratosis", "nevus")


def test_the_bundled_model_predicts_a_mask_and_class_probabilities(bundled, tmp_path):
    folder, model, cfg = bundled
    rgb, _, _ = make_lesion(300, 400, np.random.default_rng(5))
    path = tmp_path / "lesion.png"
    Image.fromarray(rgb).save(path)
    x, t = prepare(path, cfg.size, cfg.fit, cfg.border, cfg.margin)
    out = model.predict_on_batch(x[None].astype(np.float32))
    if cfg.has_seg:
        seg = np.asarray(out["seg"])
        assert seg.shape == (1, cfg.size, cfg.size, 1)
        assert np.isfinite(seg).all() and seg.min() >= 0 and seg.max() <= 1
    if cfg.has_cls:
        probs = np.asarray(out["cls"])[0]
        assert probs.shape == (3,) and np.isfinite(probs).all()
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_the_bundled_model_reaches_its_validation_jaccard_on_isic_2017(isic_dir, tmp_path):
    from typer.testing import CliRunner

    from dermtool.cli import app
    from dermtool.score import score

    val = isic_dir / "val"
    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["infer", str(val / "images"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 150
    report = score(out / "predictions.csv", val / "labels.csv", pred_masks=out, truth_masks=val / "masks")
    assert report["segmentation"]["n_missing"] == 0
    # a floor under the measured 0.7405 (MODEL_CARD.md); the target is 0.75, not reached yet
    assert report["segmentation"]["jac"] >= 0.73
