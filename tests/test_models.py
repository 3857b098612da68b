"""Networks on tiny configs (32-64 px, 4 base filters): input/output geometry of both presets,
outputs that are probabilities, layer names, config and weights round trips; and the
parameter count of the full thesis U-Net."""

from __future__ import annotations

import numpy as np
import pytest

from dermtool import CLASS_NAMES
from dermtool.config import ModelConfig, TrainConfig, load_config, preset_config, save_config
from dermtool.models import build_model, decoder_layer_names, encoder_layer_names

TASKS = ("seg", "cls", "joint")
# Output side of the tiny thesis (valid-convolution) models: 36 -> input 36 + 2 * 20 = 76.
TINY_THESIS_SIZE = 36


def tiny_config(preset: str, task: str) -> ModelConfig:
    if preset == "thesis":
        return preset_config("thesis", task, size=TINY_THESIS_SIZE, base_filters=4, depth=2)
    return preset_config("compact", task, size=32, base_filters=4, depth=2)


@pytest.fixture(scope="module")
def built():
    """Factory with a cache: each (preset, task) model is built once for the module."""
    cache: dict = {}

    def get(preset: str, task: str):
        if (preset, task) not in cache:
            cfg = tiny_config(preset, task)
            cache[preset, task] = (cfg, build_model(cfg))
        return cache[preset, task]

    return get


def images(cfg: ModelConfig, n: int = 2, seed: int = 0) -> np.ndarray:
    """A batch of raw 0-255 RGB inputs (the model normalises inside)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, cfg.input_size, cfg.input_size, 3)).astype(np.float32)


def predict(model, x: np.ndarray) -> dict:
    return {k: np.asarray(v) for k, v in model(x, training=False).items()}


@pytest.mark.parametrize("preset", ["compact", "thesis"])
@pytest.mark.parametrize("task", TASKS)
def test_outputs_have_the_config_geometry_and_are_probabilities(built, preset, task):
    cfg, model = built(preset, task)
    assert model.input_shape == (None, cfg.input_size, cfg.input_size, 3)
    out = predict(model, images(cfg, n=3))
    assert set(out) == {"seg": {"seg"}, "cls": {"cls"}, "joint": {"seg", "cls"}}[task]
    if cfg.has_seg:
        seg = out["seg"]
        assert seg.shape == (3, cfg.size, cfg.size, 1)
        assert np.isfinite(seg).all() and seg.min() >= 0.0 and seg.max() <= 1.0
    if cfg.has_cls:
        cls = out["cls"]
        assert cls.shape == (3, len(CLASS_NAMES))
        assert np.isfinite(cls).all() and (cls >= 0).all()
        np.testing.assert_allclose(cls.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("task", TASKS)
def test_thesis_preset_uses_valid_convolutions(built, task):
    """Valid padding: the input is the output plus a reflected margin on each side."""
    cfg, model = built("thesis", task)
    assert cfg.padding == "valid" and cfg.margin == 20
    assert cfg.input_size == TINY_THESIS_SIZE + 2 * 20 == model.input_shape[1]
    names = {layer.name for layer in model.layers}
    assert not any("_bn" in n for n in names)  # the thesis net has no batch norm
    if cfg.has_seg:
        assert model.get_layer("seg").output.shape[1:3] == (cfg.size, cfg.size)
        assert any(n.endswith("_crop") for n in names)  # skips are centre-cropped
    if cfg.has_cls:
        assert "cls_flatten" in names  # the thesis dense head


def test_compact_preset_input_is_its_output(built):
    cfg, model = built("compact", "seg")
    assert cfg.padding == "same" and cfg.margin == 0
    assert model.input_shape[1] == model.get_layer("seg").output.shape[1] == cfg.size == 32


@pytest.mark.parametrize("preset", ["compact", "thesis"])
def test_layer_names(built, preset):
    seg_names = {layer.name for layer in built(preset, "seg")[1].layers}
    cls_names = {layer.name for layer in built(preset, "cls")[1].layers}
    joint_names = {layer.name for layer in built(preset, "joint")[1].layers}
    for names in (seg_names, cls_names, joint_names):
        assert {"enc_block1_conv1", "enc_block2_conv2", "bottleneck_conv1"} <= names
    assert "seg" in seg_names and "cls" not in seg_names
    assert "cls" in cls_names and "seg" not in cls_names
    assert not any(n.startswith("dec_") for n in cls_names)
    assert {"seg", "cls", "dec_block1_up", "cls_dense"} <= joint_names


@pytest.mark.parametrize("preset", ["compact", "thesis"])
def test_encoder_is_shared_by_name_and_shape_across_tasks(built, preset):
    """The same encoder under every head, so --init-from can move it by layer name."""
    shapes = {}
    for task in TASKS:
        model = built(preset, task)[1]
        names = encoder_layer_names(model)
        shapes[task] = {n: [w.shape for w in model.get_layer(n).weights] for n in names}
    assert shapes["seg"] == shapes["cls"] == shapes["joint"]
    assert decoder_layer_names(built(preset, "seg")[1]) == decoder_layer_names(built(preset, "joint")[1])


@pytest.mark.parametrize("preset", ["compact", "thesis"])
def test_config_round_trip(tmp_path, preset):
    cfg = tiny_config(preset, "joint")
    tcfg = TrainConfig(epochs=3, seed=7, class_weights=(1.0, 2.0, 0.5), command="dermtool train x")
    save_config(tmp_path / "config.json", cfg, tcfg, note="round trip")
    loaded, loaded_train, raw = load_config(tmp_path)
    assert loaded == cfg and loaded.input_size == cfg.input_size
    assert loaded_train.seed == 7 and loaded_train.epochs == 3 and loaded_train.command == tcfg.command
    assert tuple(loaded_train.class_weights) == (1.0, 2.0, 0.5)
    assert raw["note"] == "round trip"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("preset,task", [("compact", "joint"), ("thesis", "joint"), ("compact", "seg")])
def test_weights_round_trip_gives_identical_predictions(tmp_path, preset, task):
    cfg = tiny_config(preset, task)
    model = build_model(cfg)
    x = images(cfg, n=2, seed=1)
    before = predict(model, x)
    path = tmp_path / "best.weights.h5"
    model.save_weights(str(path))
    save_config(tmp_path / "config.json", cfg)

    rebuilt_cfg, _, _ = load_config(tmp_path)
    rebuilt = build_model(rebuilt_cfg)
    fresh = predict(rebuilt, x)
    # fresh random weights differ, so the equality below is the load's doing
    assert any(not np.allclose(fresh[k], before[k]) for k in before)
    rebuilt.load_weights(str(path))
    after = predict(rebuilt, x)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_thesis_seg_preset_has_the_thesis_parameter_count():
    """The full thesis U-Net: 572 -> 388 with valid convolutions, 7,760,097 parameters."""
    cfg = preset_config("thesis", "seg")
    model = build_model(cfg)
    assert model.input_shape == (None, 572, 572, 3)
    assert model.get_layer("seg").output.shape[1:] == (388, 388, 1)
    assert model.count_params() == 7_760_097


@pytest.mark.parametrize("preset", ["compact", "thesis", "lite0"])
def test_mixed_float_layers_name_layers_of_every_encoder(built, preset):
    """`export --quantize mixed` finds its float32 layers by these prefixes: each encoder has an
    entry, and each prefix names a layer of the built network."""
    from dermtool.config import ENCODERS
    from dermtool.models import MIXED_FLOAT_LAYERS

    assert set(MIXED_FLOAT_LAYERS) == set(ENCODERS)
    if preset == "lite0":
        cfg = preset_config("lite0", "joint", size=64, pretrained=False)
        model = build_model(cfg)
    else:
        cfg, model = built(preset, "joint")
    names = [layer.name for layer in model.layers]
    for prefix in MIXED_FLOAT_LAYERS[cfg.encoder]:
        assert any(n.startswith(prefix) for n in names), prefix


def test_shades_of_gray_makes_a_uniform_colour_cast_grey_by_hand():
    from dermtool.models import ShadesOfGray

    # one colour everywhere: each channel's p-norm mean is the colour itself, e = (200, 100, 50)/255,
    # every channel is scaled to mean(e) = 350/3/255, so each pixel becomes 350/3 grey
    x = np.empty((1, 4, 4, 3), np.float32)
    x[...] = (200.0, 100.0, 50.0)
    out = np.asarray(ShadesOfGray(6.0)(x))
    np.testing.assert_allclose(out, 350.0 / 3.0, rtol=1e-5)
    # a grey image is left alone, and the correction is per image
    grey = np.full((1, 4, 4, 3), 90.0, np.float32)
    both = np.asarray(ShadesOfGray(6.0)(np.concatenate([x, grey])))
    np.testing.assert_allclose(both[1], 90.0, rtol=1e-5)


def test_colour_constancy_removes_a_channel_gain_up_to_brightness_and_builds_into_the_model():
    from dermtool.config import preset_config as pc
    from dermtool.models import ShadesOfGray

    x = np.random.default_rng(3).uniform(20, 170, (1, 16, 16, 3)).astype(np.float32)
    cast = x * np.array([1.25, 1.0, 0.8], np.float32)  # a warmer white balance, nothing clipped
    ratio = np.asarray(ShadesOfGray(6.0)(cast)) / np.asarray(ShadesOfGray(6.0)(x))
    # the p-norm mean scales with the gain, so only one brightness factor is left, the same for
    # every pixel and channel: mean(e * gain) / mean(e)
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)
    cfg = pc("compact", "joint", size=32, base_filters=4, depth=2, color_constancy="shades-of-gray")
    assert build_model(cfg).get_layer("color_constancy") is not None
    with pytest.raises(Exception, match="colour constancy"):
        pc("compact", "joint", color_constancy="grey-world")
