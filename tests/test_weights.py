"""The bundled default model: it loads, predicts sane output, and is good on real data."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dermtool.config import load_config
from dermtool.infer import default_model_dir, load_model, predict_batch
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


#: issue 17: the bundled folder, its carried LiteRT export included, stays within 25 MB
BUNDLE_LIMIT_BYTES = 25_000_000


def test_the_bundled_folder_stays_small_and_says_how_its_weights_are_stored(bundled):
    import h5py

    folder = bundled[0]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= BUNDLE_LIMIT_BYTES
    dtypes = set()
    with h5py.File(folder / "model.weights.h5") as fh:
        fh.visititems(lambda n, o: dtypes.add(o.dtype.name) if isinstance(o, h5py.Dataset) else None)
    # config.json says what the file holds (float16: `dermtool export --format keras --quantize float16`)
    assert dtypes == {load_config(folder)[2].get("weights_dtype", "float32")}


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


def test_the_bundled_litert_export_is_of_these_weights(bundled):
    """`--engine litert` on the bundled model uses the mixed-int8 file it carries, not a copy
    converted on the user's machine: only while that file was written from these weights."""
    from dermtool.modelio import load_engine, shipped_export

    folder, _, cfg = bundled
    shipped = shipped_export(folder, "litert")
    assert shipped == folder / "litert"
    export_cfg, _, raw = load_config(shipped)
    assert raw["export"]["quantize"] == "mixed" and export_cfg == cfg
    pytest.importorskip("ai_edge_litert")
    engine = load_engine(folder, "litert")
    assert engine.name == "litert" and engine.path == shipped / "model.tflite"
    # and its classifier alone, for the lesion view's second look, agrees with the whole file
    from dermtool.export import synthetic_inputs

    x = synthetic_inputs(cfg, 4)
    np.testing.assert_allclose(engine.classify(x)["cls"], engine.predict_on_batch(x)["cls"], atol=0.05)


def _infer_and_score(images, labels, masks, out, *options):
    from typer.testing import CliRunner

    from dermtool.cli import app
    from dermtool.score import score

    result = CliRunner().invoke(app, ["infer", str(images), "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    report = score(out / "predictions.csv", labels, pred_masks=out, truth_masks=masks)
    assert report["segmentation"]["n_missing"] == 0
    return report["segmentation"], report["classification"]


# Floors a little under the figures measured with `python bench/validation.py` (MODEL_CARD.md).
# Measured (weights/isic-ham-lite0-joint-192, its lesion view on): ISIC 2017 val JAC 0.761, BACC
# (argmax) 0.736, melanoma AUC 0.854, melanoma sensitivity at the stored operating point 0.833;
# HAM10000 holdout JAC 0.881, BACC 0.758, melanoma AUC 0.901, sensitivity at the operating point 0.963.
ISIC_FLOORS = {"jac": 0.745, "bacc": 0.72, "mel_auc": 0.84, "decision_mel_se": 0.8}
HAM_FLOORS = {"jac": 0.87, "bacc": 0.745, "mel_auc": 0.89, "decision_mel_se": 0.9}


def _check_floors(seg, cls, floors):
    assert seg["jac"] >= floors["jac"], seg["jac"]
    assert cls["bacc"] >= floors["bacc"], cls["bacc"]
    assert cls["per_class"]["melanoma"]["auc"] >= floors["mel_auc"], cls["per_class"]["melanoma"]["auc"]
    # the label column applies the calibrated operating point (model.melanoma_threshold)
    decided = cls["decision"]["per_class"]["melanoma"]["sensitivity"]
    assert decided >= floors["decision_mel_se"], decided


@pytest.fixture(scope="module")
def isic_val_scores(isic_dir, tmp_path_factory):
    val = isic_dir / "val"
    return _infer_and_score(val / "images", val / "labels.csv", val / "masks", tmp_path_factory.mktemp("pred"))


def test_the_bundled_model_holds_its_floors_on_isic_2017_validation(isic_val_scores):
    seg, cls = isic_val_scores
    assert cls["n_images"] == 150
    _check_floors(seg, cls, ISIC_FLOORS)


def test_the_litert_engine_keeps_the_bundled_models_figures(isic_dir, isic_val_scores, tmp_path):
    """Issue 13's accuracy bar for the fast CPU path: JAC within 0.005 and BACC within 0.01 of
    the Keras model on the ISIC 2017 validation split (measured: -0.0002 and -0.0043 on the
    earlier weights). With the lesion view the export's slightly different masks also move some
    second views: measured BACC 0.786 against Keras 0.767 (+0.020, about two of the 72
    non-nevus images) on the previous weights, so the BACC bar is 0.025 now; JAC keeps 0.005.
    On these weights (bench/export_bench.py): JAC -0.0010, BACC +0.0000."""
    pytest.importorskip("ai_edge_litert")
    val = isic_dir / "val"
    seg, cls = _infer_and_score(val / "images", val / "labels.csv", val / "masks", tmp_path / "pred",
                                "--engine", "litert")
    keras_seg, keras_cls = isic_val_scores
    assert abs(seg["jac"] - keras_seg["jac"]) <= 0.005, (seg["jac"], keras_seg["jac"])
    assert abs(cls["bacc"] - keras_cls["bacc"]) <= 0.025, (cls["bacc"], keras_cls["bacc"])


def test_the_bundled_model_holds_its_floors_on_the_ham10000_holdout(ham_dir, tmp_path):
    """The lesion-wise holdout of `dermtool split --fraction 0.1 --seed 0`, rebuilt here."""
    import csv as _csv

    from dermtool.io import read_class_csv
    from dermtool.split import split_folder

    _, val, _ = split_folder(ham_dir, 0.1, seed=0)
    labels = read_class_csv(ham_dir / "labels.csv", role="truth")
    data = tmp_path / "ham-val"
    for sub, name in (("images", "{}.jpg"), ("masks", "{}_segmentation.png")):
        (data / sub).mkdir(parents=True)
        for i in val:
            (data / sub / name.format(i)).symlink_to(ham_dir / sub / name.format(i))
    with open(data / "labels.csv", "w", newline="") as fh:
        w = _csv.writer(fh)
        w.writerow(["image_id", "melanoma", "seborrheic_keratosis"])
        w.writerows([i, *labels[i][:2]] for i in val if i in labels)
    seg, cls = _infer_and_score(data / "images", data / "labels.csv", data / "masks", tmp_path / "pred")
    assert len(val) == 1005 and cls["n_images"] == 903  # the split the model card reports
    _check_floors(seg, cls, HAM_FLOORS)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_one_lesion_gives_one_answer_at_full_half_and_quarter_size(bundled, tmp_path, seed):
    """Issue 20: a lesion rendered at 1600 x 1200 and copies at 1/2 and 1/4 (Lanczos, JPEG q90)
    through the bundled model's own input chain and its lesion view, as infer runs them. Measured
    on these four synthetic lesions: class probabilities within 0.024 of the full-size image's,
    the same label, and mask IoU at least 0.986 (the model finds a lesion of 4-8 % of the frame
    on each; the previous weights found one only on seed 1, so the mask check is conditional).
    The bounds leave a margin."""
    _, model, cfg = bundled
    rgb, _, _ = make_lesion(1200, 1600, np.random.default_rng(seed))
    paths = [tmp_path / f"{name}.jpg" for name in ("full", "half", "quarter")]
    Image.fromarray(rgb).save(paths[0], quality=95)
    Image.fromarray(rgb).resize((800, 600), Image.LANCZOS).save(paths[1], quality=90)
    Image.fromarray(rgb).resize((400, 300), Image.LANCZOS).save(paths[2], quality=90)
    x = [prepare(p, cfg.size, cfg.fit, cfg.border, cfg.margin, cfg.input_chain)[0] for p in paths]
    out = predict_batch(model, x, temperature=cfg.temperature, lesion_view=cfg.cls_views == "frame+lesion")
    probs, masks = np.stack([c for _, c in out]), np.stack([s for s, _ in out]) >= cfg.threshold
    assert np.abs(probs - probs[0]).max() <= 0.06
    assert len(set(probs.argmax(axis=1).tolist())) == 1
    if masks[0].mean() > 0.01:  # the model found a lesion at full size
        for k in (1, 2):
            assert (masks[0] & masks[k]).sum() / (masks[0] | masks[k]).sum() >= 0.9
