"""Limits on untrusted input: the pixel limit at every decode of an image or mask, and the checks
on a model's config.json. Each file that breaks a limit is refused with one line naming it."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_cli_preprocess import one_line_error
from typer.testing import CliRunner

from dermtool import io
from dermtool.cli import app
from dermtool.errors import InputError
from dermtool.synthetic import make_lesion

runner = CliRunner()
#: 18000 x 18000 = 324 megapixels: over the 200-megapixel limit, under twice it (where Pillow
#: itself would refuse), as in the report of issue 18.
BOMB_SIDE = 18000


def bomb_png(path: Path, width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> Path:
    """A valid 1-bit PNG of zeros declaring width x height: a few kB on disk, gigabytes decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte "None", then the packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row * 1000) for _ in range(height // 1000)) + packer.compress(
        row * (height % 1000)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def bomb_tiff(path: Path) -> Path:
    """A 16 x 16 TIFF whose header is edited to declare BOMB_SIDE x BOMB_SIDE pixels."""
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), metadata=None)
    with tifffile.TiffFile(path) as tif:
        offsets = [tif.pages[0].tags[name].valueoffset for name in ("ImageWidth", "ImageLength")]
        kinds = [tif.pages[0].tags[name].dtype for name in ("ImageWidth", "ImageLength")]
    data = bytearray(path.read_bytes())
    for at, kind in zip(offsets, kinds):
        fmt = "<H" if int(kind) == 3 else "<I"
        struct.pack_into(fmt, data, at, BOMB_SIDE)
    path.write_bytes(bytes(data))
    return path


def test_the_bomb_is_small_on_disk_and_declares_324_megapixels(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's own guard would stop this check
    path = bomb_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 100_000
    with Image.open(path) as img:
        assert img.size == (BOMB_SIDE, BOMB_SIDE)


@pytest.mark.parametrize("make", [bomb_png, bomb_tiff])
def test_every_decoder_refuses_an_image_over_the_limit_before_decoding(tmp_path, make):
    from dermtool.preprocess import load_image, prepare

    path = make(tmp_path / ("bomb.png" if make is bomb_png else "bomb.tif"))
    for read in (load_image, lambda p: prepare(p, 32, "squash")):
        with pytest.raises(InputError, match=f"{path.name}.*324 megapixels.*200-megapixel limit"):
            read(path)
    if make is bomb_png:
        from dermtool.overlay import read_mask_at

        for read in (io.read_mask_values, io.read_mask, lambda p: read_mask_at(p, (8, 8))):
            with pytest.raises(InputError, match=f"{path.name}.*200-megapixel limit"):
                read(path)


def test_the_limit_is_the_declared_pixel_count(tmp_path):
    """The limit counts pixels: 200 megapixels pass the check, one row more does not."""
    with Image.open(bomb_png(tmp_path / "at.png", 20000, 10000)) as img:
        io.check_pixel_limit(tmp_path / "at.png", *img.size)
    with pytest.raises(InputError, match="over.png"):
        io.check_pixel_limit(tmp_path / "over.png", 20000, 10001)


def test_a_file_under_the_limit_opens_whatever_pillows_own_default(tmp_path, monkeypatch):
    """Pillow's default guard (89 MP, refusing at 179 MP) must not refuse a file under ours."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    path = bomb_png(tmp_path / "under.png", 14000, 14000)  # 196 megapixels
    with io.open_image(path) as img:  # lazy: nothing is decoded here
        assert img.size == (14000, 14000)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import keras

    from dermtool.config import preset_config, save_config
    from dermtool.models import build_model

    folder = tmp_path_factory.mktemp("model")
    cfg = preset_config("compact", "joint", size=32, base_filters=4, depth=2)
    save_config(folder / "config.json", cfg)
    keras.utils.set_random_seed(1)
    build_model(cfg).save_weights(str(folder / "best.weights.h5"))
    return folder


def _folder_with_a_bomb(root: Path, masks: bool = False) -> Path:
    """root/images: two good lesion images and the bomb (with truth masks and labels if asked)."""
    images = root / "images"
    images.mkdir(parents=True)
    for k in range(2):
        rgb, mask, _ = make_lesion(40, 48, np.random.default_rng(k))
        Image.fromarray(rgb).save(images / f"good{k}.png")
        if masks:
            (root / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"good{k}_segmentation.png")
    bomb_png(images / "bomb.png")
    return root


def test_infer_names_and_skips_the_image_over_the_limit(tmp_path, tiny_model):
    data = _folder_with_a_bomb(tmp_path / "data")
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(data / "images"), "--out", str(out), "--model", str(tiny_model),
                                 "--probabilities"])
    assert result.exit_code == 1, result.output
    assert "bomb.png" in result.output and "200-megapixel limit" in result.output
    assert sorted(p.name for p in out.glob("*_segmentation.png")) == ["good0_segmentation.png",
                                                                      "good1_segmentation.png"]
    assert not (out / "bomb_prob.tif").exists()
    rows = (out / "predictions.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["good0", "good1"]


def test_preprocess_names_and_skips_an_image_or_mask_over_the_limit(tmp_path):
    data = _folder_with_a_bomb(tmp_path / "data", masks=True)
    bomb_png(data / "masks" / "good1_segmentation.png")  # a truth mask over the limit too
    out = tmp_path / "cache"
    result = runner.invoke(app, ["preprocess", str(data), "--out", str(out), "--size", "32"])
    assert result.exit_code == 1, result.output
    assert "bomb.png" in result.stderr and "good1_segmentation.png" in result.stderr
    assert "200-megapixel limit" in result.stderr
    assert json.loads((out / "cache.json").read_text())["n_images"] == 1  # good0 alone


def test_score_refuses_a_mask_over_the_limit_with_one_line(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    for folder in (truth, pred):
        folder.mkdir()
        Image.fromarray(np.full((4, 4), 255, np.uint8)).save(folder / "a_segmentation.png")
    bomb_png(pred / "b_segmentation.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(truth / "b_segmentation.png")
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("image_id,melanoma,seborrheic_keratosis\na,1,0\nb,0,0\n")
    result = runner.invoke(app, ["score", str(csv_file), str(csv_file), "--pred-masks", str(pred),
                                 "--truth-masks", str(truth)])
    line = one_line_error(result)
    assert result.exit_code == 2 and "b_segmentation.png" in line and "200-megapixel limit" in line


def test_export_calibration_names_and_skips_the_image_over_the_limit(tmp_path, tiny_model):
    from dermtool.config import load_config
    from dermtool.export import load_inputs

    data = _folder_with_a_bomb(tmp_path / "data")
    cfg, _, _ = load_config(tiny_model)
    said = []
    x = load_inputs(data / "images", cfg, 10, log=said.append)
    assert x.shape == (2, 32, 32, 3)
    assert len(said) == 1 and "bomb.png" in said[0] and "200-megapixel limit" in said[0]


# --- a model's config.json is input too ---------------------------------------------------------


def _edited_model(src: Path, dest: Path, edit) -> Path:
    """A copy of the model folder `src` whose config.json is changed by `edit(raw dict)`."""
    import shutil

    shutil.copytree(src, dest)
    raw = json.loads((dest / "config.json").read_text())
    edit(raw)
    (dest / "config.json").write_text(json.dumps(raw))
    return dest


def _set(key, value):
    def edit(raw):
        raw["model"][key] = value
    return edit


def _drop(key):
    def edit(raw):
        del raw["model"][key]
    return edit


BAD_CONFIGS = {
    "size too large": (_set("size", 100000), "model.size"),
    "base_filters too large": (_set("base_filters", 100000), "model.base_filters"),
    "size a float": (_set("size", 64.0), "model.size"),
    "depth negative": (_set("depth", -1), "model.depth"),
    "depth a bool": (_set("depth", True), "model.depth"),
    "threshold above 1": (_set("threshold", 5), "model.threshold"),
    "threshold 0": (_set("threshold", 0), "model.threshold"),
    "threshold a string": (_set("threshold", "0.5"), "model.threshold"),
    "classes reordered": (_set("class_names", ["nevus", "seborrheic_keratosis", "melanoma"]), "model.class_names"),
    "two classes": (_set("class_names", ["melanoma", "nevus"]), "model.class_names"),
    "a class repeated": (_set("class_names", ["melanoma", "melanoma", "nevus"]), "model.class_names"),
    "unknown task": (_set("task", "both"), "model.task"),
    "batch_norm a string": (_set("batch_norm", "yes"), "model.batch_norm"),
    "dropout of 1.5": (_set("dropout", 1.5), "model.dropout"),
    "size missing": (_drop("size"), "model.size"),
    "class_names missing": (_drop("class_names"), "model.class_names"),
    "an unknown key": (_set("heads", 2), "model.heads"),
    "model not an object": (lambda raw: raw.update(model=[1, 2]), "model"),
    # infer and the report read it as an object: "x" was an AttributeError in infer
    "calibration a string": (_set("calibration", "x"), "model.calibration"),
    "calibration a list": (_set("calibration", [1]), "model.calibration"),
    "calibration's target a string": (_set("calibration", {"target_sensitivity": "x"}), "model.calibration"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_config_json_out_of_range_or_of_the_wrong_type_is_refused_by_name(tmp_path, tiny_model, case):
    from dermtool.config import load_config

    edit, key = BAD_CONFIGS[case]
    folder = _edited_model(tiny_model, tmp_path / "model", edit)
    with pytest.raises(InputError) as err:
        load_config(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / 'config.json'}: ") and f"{key} " in message, message
    assert "\n" not in message


def test_a_config_json_that_is_not_an_object_is_refused(tmp_path):
    from dermtool.config import load_config

    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="config.json: .*JSON object"):
        load_config(tmp_path)


@pytest.mark.parametrize("case", ["size too large", "classes reordered", "threshold above 1", "calibration a string"])
def test_infer_refuses_a_model_whose_config_json_is_out_of_range_with_one_line(tmp_path, tiny_model, case):
    edit, key = BAD_CONFIGS[case]
    if case == "calibration a string":  # read for the target of the model's melanoma threshold
        edit = lambda raw: (_set("calibration", "x")(raw), _set("melanoma_threshold", 0.3)(raw))  # noqa: E731
    folder = _edited_model(tiny_model, tmp_path / "model", edit)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(make_lesion(40, 48, np.random.default_rng(0))[0]).save(images / "a.png")
    result = runner.invoke(app, ["infer", str(images), "--out", str(tmp_path / "out"), "--model", str(folder)])
    line = one_line_error(result)
    assert result.exit_code == 2 and "config.json" in line and key in line
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_an_export_folder_config_json_is_checked_the_same_way(tmp_path, tiny_model):
    """An export's config.json goes through the same check, and its export section is checked."""
    from dermtool.modelio import resolve_model

    export = tmp_path / "export"
    export.mkdir()
    raw = json.loads((tiny_model / "config.json").read_text())
    raw["export"] = {"format": "onnx", "file": "model.onnx"}
    raw["model"]["threshold"] = 5
    (export / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="model.threshold"):
        resolve_model(export)
    raw["model"]["threshold"] = 0.5
    raw["export"] = {"format": "onnx", "file": "../../elsewhere/model.onnx"}
    (export / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="export.file"):
        resolve_model(export)
    raw["export"] = "onnx"
    (export / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="config.json: export "):
        resolve_model(export)


def test_a_valid_config_json_still_loads(tiny_model):
    from dermtool.config import load_config, preset_config

    cfg, _, _ = load_config(tiny_model)
    assert cfg == preset_config("compact", "joint", size=32, base_filters=4, depth=2)


def test_a_config_json_with_a_calibration_of_dermtool_calibrate_still_loads(tmp_path, tiny_model):
    from dermtool.config import load_config

    for calibration in (None, {}, {"target_sensitivity": 0.85, "sets": [], "temperature_rule": "..."}):
        folder = _edited_model(tiny_model, tmp_path / f"model{len(str(calibration))}",
                               _set("calibration", calibration))
        assert load_config(folder)[0].calibration == calibration


# --- weights of another architecture ------------------------------------------------------------


def test_weights_of_another_architecture_are_refused_with_one_line_naming_layer_and_shapes(tmp_path, tiny_model):
    import keras

    from dermtool.config import preset_config
    from dermtool.models import build_model

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model / "config.json").read_text())  # base_filters 4
    keras.utils.set_random_seed(2)
    wider = build_model(preset_config("compact", "joint", size=32, base_filters=8, depth=2))
    wider.save_weights(str(folder / "best.weights.h5"))
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(make_lesion(40, 48, np.random.default_rng(0))[0]).save(images / "a.png")
    result = runner.invoke(app, ["infer", str(images), "--out", str(tmp_path / "out"), "--model", str(folder)])
    line = one_line_error(result)
    assert result.exit_code == 2
    assert "best.weights.h5" in line and "enc_block1_conv1" in line
    assert "(3, 3, 3, 8)" in line and "(3, 3, 3, 4)" in line  # the file's shape and the model's


def test_a_carried_export_with_a_damaged_export_section_is_not_used(tmp_path, tiny_model):
    import shutil

    from dermtool.modelio import shipped_export

    folder = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    (folder / "litert").mkdir()
    (folder / "litert" / "config.json").write_text(json.dumps({"export": "litert"}))
    assert shipped_export(folder, "litert") is None
