"""The Python API (`dermtool.load_model`, `Model.predict`, `predict_folder`, `score`) against the
command line on the same synthetic images, with the tiny untrained models of test_infer.

Checked: the API's masks are the CLI's PNGs pixel for pixel and its probabilities the CSV's
(within 1e-4), with and without TTA; an array or a PIL image gives what its PNG file gives; one
image in gives one Prediction out, a list a list, a generator a lazy iterator that pulls one
batch at a time; seg-only and cls-only models; bad input raises InputError naming the problem;
`import dermtool` does not import TensorFlow.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_infer import models  # noqa: F401  (the tiny joint/seg/cls model folders)
from typer.testing import CliRunner

import dermtool
from dermtool.cli import app
from dermtool.errors import InputError
from dermtool.synthetic import make_lesion

runner = CliRunner()

#: file -> (height, width): a JPEG, PNGs of several aspect ratios, a BMP and a 16-bit TIFF
FILES = {"a_wide.jpg": (120, 160), "b_tall.png": (161, 97), "c_square.png": (96, 96),
         "d_panorama.bmp": (75, 131), "e_deep.tif": (64, 80)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("api") / "images"
    folder.mkdir()
    for k, (name, (h, w)) in enumerate(FILES.items()):
        rgb = make_lesion(h, w, np.random.default_rng(10 + k), cls=k % 3)[0]
        if name.endswith(".tif"):
            tifffile.imwrite(folder / name, rgb.astype(np.uint16) * 257, photometric="rgb")
        else:
            Image.fromarray(rgb).save(folder / name, **({"quality": 90} if name.endswith(".jpg") else {}))
    return folder


def _cli_run(images: Path, out: Path, model: Path, *options) -> dict[str, list[str]]:
    result = runner.invoke(app, ["infer", str(images), "--out", str(out), "--model", str(model), *options])
    assert result.exit_code == 0, result.output
    with open(out / "predictions.csv", newline="") as fh:
        return {row[0]: row for row in list(csv.reader(fh))[1:]}


def _read_png_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 128


@pytest.mark.parametrize("tta", [1, 4])
def test_predictions_equal_the_command_lines(models, images, tmp_path, tta):  # noqa: F811
    out = tmp_path / "out"
    rows = _cli_run(images, out, models["joint"], "--batch-size", "2", "--tta", str(tta), "--probabilities")
    paths = sorted(images.iterdir())
    preds = dermtool.load_model(models["joint"]).predict(paths, tta=tta, batch_size=2)
    assert isinstance(preds, list) and [p.image_id for p in preds] == [p.stem for p in paths] == sorted(rows)
    masks_with_lesion = 0
    for path, p in zip(paths, preds):
        cli_mask = _read_png_mask(out / f"{path.stem}_segmentation.png")
        assert p.mask.dtype == bool and p.mask.shape == cli_mask.shape == FILES[path.name]
        np.testing.assert_array_equal(p.mask, cli_mask)
        masks_with_lesion += bool(cli_mask.any()) and not cli_mask.all()
        row = rows[path.stem]
        assert list(p.probabilities) == list(dermtool.CLASS_NAMES)
        np.testing.assert_allclose(list(p.probabilities.values()), [float(v) for v in row[1:4]], atol=1e-4)
        assert p.label == row[4] == max(p.probabilities, key=p.probabilities.get)
        cli_map = tifffile.imread(out / f"{path.stem}_probability.tif")
        assert p.probability_map.dtype == np.float32
        np.testing.assert_allclose(p.probability_map, cli_map, atol=1e-4)
    assert masks_with_lesion >= 3  # the comparison is not of empty (or full) masks only


def test_an_array_or_a_pil_image_gives_what_its_file_gives(models, images):  # noqa: F811
    model = dermtool.load_model(models["joint"])
    png = images / "b_tall.png"
    from_file = model.predict(png)
    with Image.open(png) as img:
        from_pil = model.predict(img)
        from_array = model.predict(np.asarray(img.convert("RGB")))
    assert from_file.image_id == from_pil.image_id == "b_tall" and from_array.image_id is None
    for other in (from_pil, from_array):
        np.testing.assert_array_equal(other.mask, from_file.mask)
        assert other.probabilities == pytest.approx(from_file.probabilities, abs=1e-6)


def test_a_pil_image_of_a_large_jpeg_gives_what_its_path_gives(models, tmp_path):  # noqa: F811
    """The path decodes a large JPEG at reduced size (DCT scaling); Image.open(path) was decoded at
    full size, and the bundled model's probabilities moved by up to 0.1 on ISIC originals. An
    unread PIL JPEG of a file now goes the path's way; a decoded one, or one opened from bytes,
    has only its pixels (full size), which is what makes the comparison a real one."""
    import io

    model = dermtool.load_model(models["joint"])
    path = tmp_path / "large.jpg"
    Image.fromarray(make_lesion(900, 1200, np.random.default_rng(5))[0]).save(path, quality=90)
    from_path = model.predict(path)
    with Image.open(path) as img:
        from_pil = model.predict(img)
    with Image.open(path) as img:
        img.load()
        from_pixels = model.predict(img)
    from_bytes = model.predict(Image.open(io.BytesIO(path.read_bytes())))
    assert from_pil.image_id == from_path.image_id == "large" and from_pil.mask.shape == (900, 1200)
    np.testing.assert_array_equal(from_pil.mask, from_path.mask)
    assert from_pil.probabilities == pytest.approx(from_path.probabilities, abs=1e-6)
    # full-size pixels are another model input: not the path's answer, and the same for both
    assert from_pixels.probabilities != pytest.approx(from_path.probabilities, abs=1e-6)
    assert from_bytes.probabilities == pytest.approx(from_pixels.probabilities, abs=1e-6)


def test_one_image_in_one_prediction_out_and_a_generator_is_streamed(models, images):  # noqa: F811
    model = dermtool.load_model(models["seg"])
    rgb = make_lesion(50, 70, np.random.default_rng(3))[0]
    one = model.predict(rgb)
    assert isinstance(one, dermtool.Prediction) and one.mask.shape == (50, 70)
    assert one.probabilities is None and one.label is None  # a seg-only model
    as_list = model.predict([rgb, rgb, rgb])
    assert isinstance(as_list, list) and len(as_list) == 3
    batch4 = model.predict(np.stack([rgb] * 4))  # an N x H x W x 3 array is N images
    assert isinstance(batch4, list) and len(batch4) == 4

    pulled = []

    def stream(n):
        for k in range(n):
            pulled.append(k)
            yield make_lesion(40 + k, 60, np.random.default_rng(k))[0]

    it = model.predict(stream(7), batch_size=3)
    assert pulled == []  # nothing is read before the first prediction is asked for
    first = next(it)
    assert first.mask.shape == (40, 60) and len(pulled) == 3  # one batch, not the whole stream
    rest = list(it)
    assert [p.mask.shape[0] for p in rest] == list(range(41, 47)) and len(pulled) == 7


def test_generators_that_close_or_refill_what_they_yield_get_each_images_answer(models, images):  # noqa: F811
    """The stream took a whole batch from the generator before fitting any of it: images the
    generator had closed by then failed with Pillow's bare AssertionError, and a buffer it
    refilled gave every image of the batch the last one's answer."""
    model = dermtool.load_model(models["joint"])
    paths = sorted(p for p in images.iterdir() if p.suffix != ".tif")
    want = [p.probabilities for p in model.predict(paths, batch_size=4)]

    def opened():
        for path in paths:
            with Image.open(path) as im:
                yield im

    assert [p.probabilities for p in model.predict(opened(), batch_size=4)] == want
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    buffer = np.zeros((200, 200, 3), np.uint8)

    def refilled():
        for rgb in pixels:
            view = buffer[:rgb.shape[0], :rgb.shape[1]]
            view[:] = rgb
            yield view

    got = [p.probabilities for p in model.predict(refilled(), batch_size=4)]
    assert got == [p.probabilities for p in model.predict(pixels, batch_size=4)] and got[0] != got[-1]

    def pasted():  # one PIL image, each frame pasted into it (a reviewer's case: all got the first's answer)
        canvas = Image.new("RGB", (200, 200))
        for rgb in pixels:
            canvas.paste(Image.fromarray(np.pad(rgb, ((0, 200 - rgb.shape[0]), (0, 200 - rgb.shape[1]), (0, 0)))))
            yield canvas

    padded = [np.pad(rgb, ((0, 200 - rgb.shape[0]), (0, 200 - rgb.shape[1]), (0, 0))) for rgb in pixels]
    got = [p.probabilities for p in model.predict(pasted(), batch_size=4)]
    assert got == [p.probabilities for p in model.predict(padded, batch_size=4)] and got[0] != got[-1]


def test_a_stream_gives_the_predictions_before_a_bad_image_then_raises(models, images, tmp_path):  # noqa: F811
    model = dermtool.load_model(models["joint"])
    paths = sorted(images.iterdir())
    got = []
    with pytest.raises(InputError, match="nope.jpg: file not found"):
        for p in model.predict(iter([paths[0], paths[1], tmp_path / "nope.jpg", paths[2]]), batch_size=4):
            got.append(p.image_id)
    assert got == [paths[0].stem, paths[1].stem]

    def broken():
        yield paths[0]
        raise RuntimeError("the source broke")

    got = []
    with pytest.raises(RuntimeError, match="the source broke"):
        for p in model.predict(broken(), batch_size=4):
            got.append(p.image_id)
    assert got == [paths[0].stem]


def test_one_pil_image_listed_twice_and_a_closed_one(models, tmp_path):  # noqa: F811
    """Two threads decoded one unread PIL image at once: Pillow's errors, or wrong pixels."""
    model = dermtool.load_model(models["joint"])
    path = tmp_path / "big.png"
    Image.fromarray(make_lesion(900, 1200, np.random.default_rng(5))[0]).save(path)
    want = model.predict(path).probabilities
    im = Image.open(path)
    assert [p.probabilities for p in model.predict([im, im], workers=4)] == [want, want]
    with Image.open(path) as closed:
        pass
    with pytest.raises(InputError, match="big.png: the PIL image was closed before dermtool read its pixels"):
        model.predict(closed)


def test_a_cls_only_model_has_no_mask(models):  # noqa: F811
    p = dermtool.load_model(models["cls"]).predict(make_lesion(60, 60, np.random.default_rng(0))[0])
    assert p.mask is None and p.probability_map is None
    assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5) and p.label in dermtool.CLASS_NAMES


@pytest.mark.parametrize("bad, words", [
    (np.zeros((20, 20), np.uint8), "H x W x 3 uint8"),
    (np.zeros((20, 20, 3), np.float32), "H x W x 3 uint8"),
    ("missing.jpg", "missing.jpg: file not found"),
    (42, "not int"),
    ([[1, 2, 3]], "an image is a path, an H x W x 3 uint8 array or a PIL image, not list"),
])
def test_bad_input_raises_one_sentence(models, bad, words):  # noqa: F811
    model = dermtool.load_model(models["seg"])
    with pytest.raises(InputError, match=words):
        model.predict(bad)


@pytest.mark.parametrize("options, words", [
    ({"tta": 3}, "tta must be 1, 4 or 8"),
    ({"threshold": 2}, "threshold must be a lesion probability from 0 to 1"),  # all-empty masks once
    ({"threshold": float("nan")}, "threshold must be a lesion probability"),
    ({"threshold": "0.5"}, "threshold must be a lesion probability"),
    ({"closing_radius": -1}, "closing_radius must be a whole number of model pixels from 0"),
    ({"closing_radius": 1000}, "closing_radius must be"),
    ({"batch_size": "2"}, "batch_size must be a whole number from 1 to 1024"),
    ({"workers": -1}, "workers must be a whole number from 0"),
    ({"tta": 4.0}, "tta must be 1, 4 or 8"),  # each of these three was taken
    ({"melanoma_threshold": "0.5"}, "melanoma_threshold must be a number between 0 and 1"),
    ({"melanoma_threshold": 1.0}, "melanoma_threshold must lie strictly between 0 and 1"),
])
def test_bad_options_are_refused_as_the_cli_refuses_them(models, options, words):  # noqa: F811
    with pytest.raises(InputError, match=words):
        dermtool.load_model(models["seg"]).predict(np.zeros((8, 8, 3), np.uint8), **options)


@pytest.mark.parametrize("options, words", [
    ({"shard": "1/2"}, "shard must be a tuple \\(K, N\\)"),  # a ValueError traceback in select_images
    ({"shard": (3, 2)}, "shard must be a tuple"),
    ({"ids": "abc"}, "ids must be a list or tuple of image ids"),  # read as the ids a, b, c
    ({"resume": "false"}, "resume must be True or False, not 'false'"),  # counted as true
    ({"probabilities": 1}, "probabilities must be True or False"),
])
def test_infer_options_check_their_types(options, words):
    with pytest.raises(InputError, match=words):
        dermtool.InferOptions(**options)


def test_infer_options_read_an_id_generator_once():
    """The type check read a generator of ids to its end, and the run then did no image."""
    assert dermtool.InferOptions(ids=(i for i in ["a", "b"])).ids == ("a", "b")


def test_bad_models_paths_and_folder_options_are_refused(models, images, tmp_path):  # noqa: F811
    with pytest.raises(InputError, match="no config.json"):
        dermtool.load_model(tmp_path)
    with pytest.raises(InputError, match="exported/model.tflite: no such model folder or file"):
        dermtool.load_model(tmp_path / "exported" / "model.tflite")  # once "not a model folder (no config.json)"
    with pytest.raises(InputError, match="path must be a model folder or file path"):
        dermtool.load_model(5)
    with pytest.raises(InputError, match="images_dir must be a path, not int"):
        dermtool.predict_folder(5, tmp_path / "out")
    with pytest.raises(InputError, match="opts must be an InferOptions, not dict"):
        dermtool.predict_folder(images, tmp_path / "out", models["seg"], opts={"tta": 4})
    with pytest.raises(InputError, match="tta must be 1, 4 or 8"):
        dermtool.InferOptions(tta=3)
    with pytest.raises(InputError, match="threshold must be a lesion probability"):
        dermtool.InferOptions(post=dermtool.PostprocessConfig(threshold=5.0))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        dermtool.predict_folder(images, tmp_path / "afile", models["seg"])
    with pytest.raises(InputError, match="pred_csv must be a path, not int"):
        dermtool.score(5, "truth.csv")
    with pytest.raises(InputError, match="bootstrap must be a whole number"):
        dermtool.score("a.csv", "b.csv", bootstrap="5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing half-written


def test_predict_folder_and_score_are_the_commands(models, images, tmp_path):  # noqa: F811
    import importlib

    assert dermtool.predict_folder is importlib.import_module("dermtool.infer").predict_folder
    out = tmp_path / "out"
    summary = dermtool.predict_folder(images, out, models["joint"], progress=False)
    assert summary.done == len(FILES)
    truth, truth_csv = tmp_path / "truth", tmp_path / "truth.csv"
    truth.mkdir()
    rows = []
    for k, path in enumerate(sorted(images.iterdir())):  # the masks scored against themselves
        (truth / f"{path.stem}_segmentation.png").write_bytes((out / f"{path.stem}_segmentation.png").read_bytes())
        rows.append(f"{path.stem},{int(k % 3 == 0)},{int(k % 3 == 1)}")
    truth_csv.write_text("image_id,melanoma,seborrheic_keratosis\n" + "\n".join(rows) + "\n")
    result = dermtool.score(out / "predictions.csv", truth_csv, out, truth)
    assert result["segmentation"]["jac"] == 1.0
    cli = runner.invoke(app, ["score", str(out / "predictions.csv"), str(truth_csv), "--pred-masks", str(out),
                              "--truth-masks", str(truth), "--json", str(tmp_path / "score.json")])
    assert cli.exit_code == 0, cli.output
    assert json.loads((tmp_path / "score.json").read_text()) == json.loads(json.dumps(result))


def test_import_is_cheap_and_every_public_name_resolves():
    code = ("import sys, dermtool; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; "
            "[getattr(dermtool, n) for n in dermtool.__all__]; print(sorted(dermtool.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = json.loads(proc.stdout.replace("'", '"'))
    assert {"load_model", "Model", "Prediction", "predict_folder", "score"} <= set(names)
    for name in ("load_model", "Model", "Prediction", "predict_folder", "score"):
        assert getattr(dermtool, name).__doc__, name


def test_two_threads_on_one_litert_model_each_get_their_own_answers():
    # a LiteRT interpreter has one set of buffers: unlocked, two threads swapped answers (measured
    # on the bundled export: 10 of 20 melanoma probabilities wrong, by up to 0.79)
    import threading

    pytest.importorskip("ai_edge_litert")
    model = dermtool.load_model(engine="litert")  # the bundled model's carried export
    arrays = [make_lesion(150, 200, np.random.default_rng(seed), cls=cls)[0] for seed, cls in ((1, 0), (2, 2))]
    alone = [model.predict(a) for a in arrays]
    assert abs(alone[0].probabilities["melanoma"] - alone[1].probabilities["melanoma"]) > 1e-3  # tell them apart
    wrong = []

    def run(k: int) -> None:
        for _ in range(8):
            got = model.predict(arrays[k])
            if got.probabilities != alone[k].probabilities or not np.array_equal(got.mask, alone[k].mask):
                wrong.append(k)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
