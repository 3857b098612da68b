"""dermtool ensemble: model folders joined into one, run by infer and export as one model."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_model_folder
from dermtool.cli import app
from dermtool.config import load_config
from dermtool.modelio import load_model

runner = CliRunner()
CLASSES = ("melanoma", "seborrheic_keratosis", "nevus")


def _model_folder(folder: Path, seed: int, **changes) -> Path:
    # the members differ in every weight, so their outputs differ
    return tiny_model_folder(folder, seed, spread=(-0.2, 0.2), **changes)


def ensemble(*args):
    return runner.invoke(app, ["ensemble", *map(str, args)])


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert message.startswith("error:") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in message, message


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("members")
    return {
        # the first carries an operating point fitted for it alone
        "a": _model_folder(root / "a", 1, temperature=0.5, melanoma_threshold=0.3),
        "b": _model_folder(root / "b", 2),
        "c": _model_folder(root / "c", 3),
        "wider": _model_folder(root / "wider", 4, base_filters=8),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from dermtool.synthetic import write_dataset

    root = tmp_path_factory.mktemp("ensemble_data") / "data"
    return write_dataset(root, 5, rng_seed=21, sizes=[(120, 160), (96, 96)], formats=("jpg", "png")) / "images"


def test_each_output_is_the_mean_of_the_members_outputs(models, tmp_path):
    out = tmp_path / "ens"
    result = ensemble(out, models["a"], models["b"], models["c"])
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    parts = [load_model(models[k])[0].predict_on_batch(x) for k in "abc"]
    net, cfg = load_model(out)
    got = net.predict_on_batch(x)
    for key in ("seg", "cls"):
        assert not np.allclose(parts[0][key], parts[1][key], atol=1e-3)
        np.testing.assert_allclose(got[key], np.mean([p[key] for p in parts], axis=0), rtol=0, atol=1e-6)
    assert cfg.members == 3
    # fitted for the first network alone: reset, and the command says to calibrate
    assert cfg.temperature == 1.0 and cfg.melanoma_threshold is None and cfg.calibration is None
    assert "calibrate" in result.output
    raw = json.loads((out / "config.json").read_text())
    assert raw["ensemble_of"] == [str(models[k].resolve()) for k in "abc"] and raw["weights_dtype"] == "float32"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.weights.h5"]


def test_float16_halves_the_file_and_rounds_little(models, tmp_path):
    assert ensemble(tmp_path / "f32", models["a"], models["b"]).exit_code == 0
    assert ensemble(tmp_path / "f16", models["a"], models["b"], "--float16").exit_code == 0
    import h5py

    def arrays(path: Path) -> dict:  # dataset name -> (dtype, bytes); a tiny model's file is mostly HDF5 overhead
        found = {}
        with h5py.File(path / "model.weights.h5") as fh:
            fh.visititems(lambda n, o: found.update({n: (o.dtype, o.nbytes)}) if isinstance(o, h5py.Dataset) else None)
        return found

    full, half = arrays(tmp_path / "f32"), arrays(tmp_path / "f16")
    assert full.keys() == half.keys() and {d for d, _ in full.values()} == {np.dtype("float32")}
    assert {d for d, _ in half.values()} == {np.dtype("float16")}
    assert sum(b for _, b in half.values()) * 2 == sum(b for _, b in full.values())
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    a, b = load_model(tmp_path / "f32")[0].predict_on_batch(x), load_model(tmp_path / "f16")[0].predict_on_batch(x)
    assert not np.array_equal(a["cls"], b["cls"])  # rounded, so not the same bits
    np.testing.assert_allclose(a["cls"], b["cls"], atol=0.01)
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["weights_dtype"] == "float16"


def _probs(csv_path: Path) -> dict:
    with open(csv_path, newline="") as fh:
        return {r["image_id"]: np.array([float(r[c]) for c in CLASSES]) for r in csv.DictReader(fh)}


def test_infer_runs_the_ensemble_as_one_model(models, images, tmp_path):
    assert ensemble(tmp_path / "ens", models["b"], models["c"]).exit_code == 0
    for name, model in (("b", models["b"]), ("c", models["c"]), ("ens", tmp_path / "ens")):
        result = runner.invoke(app, ["infer", str(images), "--out", str(tmp_path / f"out-{name}"),
                                     "--model", str(model)])
        assert result.exit_code == 0, result.output
    b, c, ens = (_probs(tmp_path / f"out-{n}" / "predictions.csv") for n in ("b", "c", "ens"))
    assert sorted(ens) == sorted(b) and len(ens) == 5
    for image_id in ens:  # temperature 1 and the frame view: the CSV holds the mean of the two
        np.testing.assert_allclose(ens[image_id], (b[image_id] + c[image_id]) / 2, atol=2e-4)
    assert len(list((tmp_path / "out-ens").glob("*_segmentation.png"))) == 5


def test_the_litert_export_of_an_ensemble_matches_keras(models, tmp_path):
    assert ensemble(tmp_path / "ens", models["a"], models["b"]).exit_code == 0
    result = runner.invoke(app, ["export", str(tmp_path / "ens"), "--out", str(tmp_path / "tfl"),
                                 "--format", "tflite"])
    assert result.exit_code == 0, result.output
    from dermtool.modelio import load_engine

    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    want = load_model(tmp_path / "ens")[0].predict_on_batch(x)
    got = load_engine(tmp_path / "tfl").predict_on_batch(x)
    for key in ("seg", "cls"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-4)


def test_models_of_another_architecture_are_refused(models, tmp_path):
    out = tmp_path / "ens"
    _one_line_error(ensemble(out, models["a"], models["wider"]), str(models["wider"]), "base_filters")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["one", "not_a_model", "not_empty", "nested"])
def test_what_cannot_be_joined_is_refused_in_one_line(models, tmp_path, case):
    out = tmp_path / "ens"
    if case == "one":
        args, words = [models["a"]], ["2 to 8", "not 1"]
    elif case == "not_a_model":
        args, words = [models["a"], tmp_path], [str(tmp_path), "no config.json"]
    elif case == "not_empty":
        out.mkdir()
        (out / "old.txt").write_text("keep")
        args, words = [models["a"], models["b"]], [str(out), "not an empty folder"]
    else:
        assert ensemble(tmp_path / "inner", models["a"], models["b"]).exit_code == 0
        args, words = [tmp_path / "inner", models["c"]], [str(tmp_path / "inner"), "already an ensemble"]
    _one_line_error(ensemble(out, *args), *words)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] if case == "not_empty" else not out.exists()


def test_members_of_other_mask_thresholds_are_joined_keeping_the_first(models, tmp_path):
    """The docs said the first member's mask threshold is kept, but a member of another was
    refused as "differs ... in threshold"."""
    other = _model_folder(tmp_path / "other", 5, threshold=0.3)
    for first, second, kept in ((models["b"], other, load_config(models["b"])[0].threshold), (other, models["b"], 0.3)):
        out = tmp_path / f"ens-{kept}"
        result = ensemble(out, first, second)
        assert result.exit_code == 0, result.output
        assert load_config(out)[0].threshold == kept and load_config(out)[0].members == 2
    assert load_config(models["b"])[0].threshold != 0.3


def test_ensemble_of_names_the_members_by_absolute_path(models, tmp_path, monkeypatch):
    """Given as relative paths, the members were recorded relative to the folder the command
    ran in, which says nothing to whoever reads the ensemble from elsewhere."""
    monkeypatch.chdir(models["b"].parent)
    assert ensemble(tmp_path / "ens", "b", "./c").exit_code == 0
    monkeypatch.chdir(tmp_path)
    recorded = json.loads((tmp_path / "ens" / "config.json").read_text())["ensemble_of"]
    assert recorded == [str(models["b"].resolve()), str(models["c"].resolve())]
    assert all(Path(m).is_absolute() and (Path(m) / "config.json").is_file() for m in recorded)


def test_a_folder_named_like_the_staging_one_is_never_touched(models, tmp_path, monkeypatch):
    """OUT.partial was once removed unasked, even when it was one of the members."""
    import shutil

    (tmp_path / "ens.partial").mkdir()
    (tmp_path / "ens.partial" / "notes.txt").write_text("mine")
    member = Path(shutil.copytree(models["b"], tmp_path / "b.partial"))
    monkeypatch.chdir(tmp_path)
    result = ensemble("ens", models["a"], member)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ens.partial" / "notes.txt").read_text() == "mine"
    assert load_model(member)[1] == load_config(models["b"])[0]
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    assert ensemble(".", models["a"], member).exit_code == 0  # "." an empty folder: it becomes the ensemble
    assert (tmp_path / "b" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.partial", "ens", "ens.partial"]


def test_members_of_one_architecture_are_joined_whatever_their_start_or_an_older_config(models, tmp_path):
    """An older config.json without keys that have defaults, and a member trained from another
    start (pretrained, dropout), were refused as "differs ... in border, pretrained"."""
    import shutil

    older = Path(shutil.copytree(models["b"], tmp_path / "older"))
    raw = json.loads((older / "config.json").read_text())
    for key in ("border", "cls_pool_size", "cls_dense_units"):
        raw["model"].pop(key, None)
    raw["model"]["dropout"] = 0.3
    (older / "config.json").write_text(json.dumps(raw))
    result = ensemble(tmp_path / "ens", models["c"], older)
    assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "ens")[0].members == 2


@pytest.mark.parametrize("name", ["ens", "run[1]"])
def test_an_ensemble_killed_in_an_empty_folder_can_be_made_there_again(models, tmp_path, name):
    """kill -9 left OUT/.OUT.partial-*, and every later run called OUT "not an empty folder"."""
    out = tmp_path / name
    (out / f".{name}.partial-0badc0de").mkdir(parents=True)
    (out / f".{name}.partial-0badc0de" / "model.weights.h5").write_bytes(b"half")
    result = ensemble(out, models["b"], models["c"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.weights.h5"]


def test_a_disk_without_room_is_named_before_any_write(models, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 4096))
    _one_line_error(ensemble(tmp_path / "ens", models["a"], models["b"]), str(tmp_path / "ens"), "the disk is full")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_ensemble_is_not_an_init_from(models, tmp_path):
    from dermtool.config import TrainConfig
    from dermtool.errors import InputError
    from dermtool.train import check_init_inputs

    assert ensemble(tmp_path / "ens", models["a"], models["b"]).exit_code == 0
    cfg, _, _ = load_config(models["a"])
    with pytest.raises(InputError, match="an ensemble of 2 networks.*one of its members"):
        check_init_inputs(cfg, TrainConfig(init_from=str(tmp_path / "ens")), log=lambda m: None)


def test_members_out_of_range_in_config_json_is_refused(models, tmp_path):
    from dermtool.errors import InputError

    raw = json.loads((models["a"] / "config.json").read_text())
    raw["model"]["members"] = 9
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="model.members must be an integer from 1 to 8"):
        load_config(tmp_path)


def test_weights_set_each_members_share_of_the_mean(models, tmp_path):
    out = tmp_path / "ens"
    assert ensemble(out, models["a"], models["b"], "--weights", "2,1").exit_code == 0
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    a, b = (load_model(models[k])[0].predict_on_batch(x) for k in "ab")
    net, cfg = load_model(out)
    got = net.predict_on_batch(x)
    for key in ("seg", "cls"):
        np.testing.assert_allclose(got[key], (2 * a[key] + b[key]) / 3, rtol=0, atol=1e-6)
    assert cfg.member_weights == (2.0, 1.0)


@pytest.mark.parametrize("weights, words", [("2", ["--weights must be 2 positive numbers", "(2.0,)"]),
                                            ("1,-1", ["--weights must be 2 positive numbers", "(1.0, -1.0)"]),
                                            ("2,x", ["--weights takes numbers joined by commas", "'2,x'"]),
                                            # each finite, their sum not: every share w / sum was 0, so every output
                                            ("1e308,1e308", ["--weights must add up to a finite number",
                                                             "(1e+308, 1e+308)"])])
def test_bad_weights_are_refused_in_one_line(models, tmp_path, weights, words):
    out = tmp_path / "ens"
    _one_line_error(ensemble(out, models["a"], models["b"], "--weights", weights), *words)
    assert not out.exists()


def test_member_weights_that_do_not_fit_the_members_in_config_json_are_refused(models, tmp_path):
    from dermtool.errors import InputError

    assert ensemble(tmp_path / "ens", models["a"], models["b"]).exit_code == 0
    raw = json.loads((tmp_path / "ens" / "config.json").read_text())
    for bad in ([1.0], [1.0, 0.0], [1.0, "x"]):
        raw["model"]["member_weights"] = bad
        (tmp_path / "ens" / "config.json").write_text(json.dumps(raw))
        with pytest.raises(InputError, match="member_weights must be 2 positive numbers"):
            load_config(tmp_path / "ens")
    raw["model"]["member_weights"] = [1e308, 1e308]  # a received folder: all outputs would be 0, silently
    (tmp_path / "ens" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="member_weights must add up to a finite number"):
        load_config(tmp_path / "ens")
