"""examples/soup.py: the mean of model folders' weights, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_model_folder
from dermtool.config import load_config
from dermtool.modelio import load_model

SOUP = Path(__file__).resolve().parent.parent / "examples" / "soup.py"


def _model_folder(folder: Path, seed: int, **changes) -> Path:
    return tiny_model_folder(folder, seed, **changes)


def _soup(*args):
    return subprocess.run([sys.executable, str(SOUP), *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("soup")
    return {
        # the first carries an operating point fitted for it alone, and the lesion view
        "a": _model_folder(root / "a", 1, temperature=0.5, melanoma_threshold=0.3, cls_views="frame+lesion"),
        "b": _model_folder(root / "b", 2),
        "c": _model_folder(root / "c", 3),
        "wider": _model_folder(root / "wider", 4, base_filters=8),
    }


def test_the_soup_is_the_mean_of_every_weight_and_drops_the_operating_point(models, tmp_path):
    out = tmp_path / "soup"
    done = _soup(out, models["a"], models["b"], models["c"])
    assert done.returncode == 0, done.stderr
    nets = [load_model(models[k])[0] for k in "abc"]
    soup, cfg = load_model(out)
    assert len(soup.weights) == len(nets[0].weights)
    for i, w in enumerate(soup.weights):  # batch-norm moving statistics included
        parts = [net.weights[i].numpy().astype(np.float64) for net in nets]
        assert not np.allclose(parts[0], parts[1])
        np.testing.assert_allclose(w.numpy(), np.mean(parts, axis=0), rtol=0, atol=1e-6)
    assert cfg.temperature == 1.0 and cfg.melanoma_threshold is None and cfg.calibration is None
    assert cfg.cls_views == "frame+lesion"  # the first model's config otherwise
    assert sorted(p.name for p in out.parent.iterdir()) == ["soup"]  # no staging folder left
    raw = json.loads((out / "config.json").read_text())
    assert raw["soup_of"] == [str(models[k]) for k in "abc"]


def test_models_of_another_architecture_are_refused_in_one_line(models, tmp_path):
    out = tmp_path / "soup"
    done = _soup(out, models["a"], models["wider"])
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [f"{models['wider']}: its config.json differs from {models['a']}'s in base_filters; "
                     "only models of one architecture can be averaged."]
    assert not out.exists()


def test_a_folder_without_a_model_is_named(models, tmp_path):
    done = _soup(tmp_path / "soup", models["a"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"{tmp_path / 'config.json'}: no config.json here; is this a model folder written by dermtool train?"]
    assert not (tmp_path / "soup").exists()
    assert load_config(models["a"])[0].temperature == 0.5  # the inputs are untouched


def test_an_existing_model_folder_is_not_overwritten(models):
    before = (models["b"] / "model.weights.h5").read_bytes()
    done = _soup(models["b"], models["a"], models["c"])
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"{models['b']}: already exists and is not an empty folder; name a new one for the soup."]
    assert (models["b"] / "model.weights.h5").read_bytes() == before
