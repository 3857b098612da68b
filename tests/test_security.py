"""What a model folder, a run folder or an output folder from someone else can make dermtool do.

Each test plants what a security review found to work (a crafted SavedModel, a run folder whose
checkpoints/ is a link, links under the names of temporary files, CSV cells that a spreadsheet
runs) and asserts that nothing outside the folder is read, written or removed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_model_folder
from dermtool.cli import app
from dermtool.errors import InputError

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("sec") / "model", 5)


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (40, 50, 3), np.uint8)).save(folder / f"img{k}.png")
    return folder


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside every folder dermtool is told about."""
    path = tmp_path / "victim.txt"
    path.write_text("the user's own file\n")
    return path


def test_a_savedmodel_from_elsewhere_runs_only_when_trusted(model, images, tmp_path, monkeypatch):
    """Its graph can read and write any file (tf.io.write_file ran from a crafted export)."""
    from dermtool import modelio

    out = tmp_path / "sm"
    assert cli("export", model, "--out", out, "--format", "savedmodel").exit_code == 0
    monkeypatch.setattr(modelio, "_WRITTEN_SAVEDMODELS", set())  # as in a later process
    monkeypatch.delenv(modelio.TRUST_SAVEDMODEL_ENV, raising=False)
    result = cli("infer", images, "--out", tmp_path / "o", "--model", out)
    assert result.exit_code == 2 and f"set {modelio.TRUST_SAVEDMODEL_ENV}=1 to run it" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv(modelio.TRUST_SAVEDMODEL_ENV, "1")
    assert cli("infer", images, "--out", tmp_path / "o", "--model", out).exit_code == 0


def _toy_run(tmp_path: Path) -> Path:
    from dermtool.config import TrainConfig, preset_config
    from dermtool.data import build_cache, resolve_layout
    from dermtool.synthetic import write_dataset
    from dermtool.train import train

    data = write_dataset(tmp_path / "data", 6, rng_seed=3, sizes=[(40, 48)], formats=("png",))
    build_cache(resolve_layout(data), tmp_path / "cache", size=32, fit="squash", progress=False)
    cfg = preset_config("compact", "seg", size=32, base_filters=4, depth=2)
    return train(cfg, TrainConfig(epochs=1, batch_size=4, augment="none"), tmp_path / "cache", [], tmp_path / "run",
                 log=lambda m: None, progress=False)


def test_resume_of_a_run_folder_whose_checkpoints_are_a_link_removes_nothing(tmp_path):
    """tidy removed everything in checkpoints/ but the committed folder, through a planted link."""
    run = _toy_run(tmp_path)
    (run / "checkpoints").rename(run / "ck")
    state = json.loads((run / "state.json").read_text())
    victim_dir = tmp_path / "victim_dir"
    (victim_dir / "sub").mkdir(parents=True)
    (victim_dir / "thesis.docx").write_text("years of work")
    (run / "checkpoints").symlink_to(victim_dir)
    for checkpoint in (state["checkpoint"], "ck/epoch-001"):
        (run / "state.json").write_text(json.dumps({**state, "checkpoint": checkpoint}))
        result = cli("train", "--out", run, "--resume", "--epochs", 2)
        assert result.exit_code == 2, result.output
        assert sorted(p.name for p in victim_dir.iterdir()) == ["sub", "thesis.docx"]
    assert "is not checkpoints/epoch-001" in " ".join(result.output.split())


def test_links_planted_under_temporary_names_are_never_written_through(model, images, tmp_path, victim):
    """infer's partial CSV, write_atomic's temporary files, train's command.txt and config.json.tmp,
    and preprocess's stacks were all written through a link to a file outside the folder."""
    from dermtool.io import write_atomic

    out = tmp_path / "out"
    out.mkdir()
    (out / ".predictions.partial.csv").symlink_to(victim)
    (out / f".predictions.csv.{os.getpid()}.tmp").symlink_to(victim)
    (out / f".img0_segmentation.png.{os.getpid()}.tmp").symlink_to(victim)
    result = cli("infer", images, "--out", out, "--model", model)
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "the user's own file\n"
    assert len(list(csv.reader(open(out / "predictions.csv")))) == 3
    write_atomic(out / "x.txt", lambda tmp: tmp.write_text("new"))  # a link left under its name
    assert victim.read_text() == "the user's own file\n"

    from dermtool.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", 4, rng_seed=3, sizes=[(40, 48)], formats=("png",))
    data_out = tmp_path / "cache"
    data_out.mkdir()
    for name in ("manifest.csv.tmp", "cache.json.tmp", "images.tif.tmp", "masks.tif.tmp"):
        (data_out / name).symlink_to(victim)
    assert cli("preprocess", data, "--out", data_out, "--size", 32).exit_code == 0
    assert victim.read_text() == "the user's own file\n"

    run = tmp_path / "run"
    run.mkdir()
    (run / "command.txt").symlink_to(victim)
    (run / "config.json.tmp").symlink_to(victim)
    result = cli("train", data_out, "--out", run, "--task", "seg", "--size", 32, "--base-filters", 4,
                 "--depth", 2, "--epochs", 1, "--batch-size", 2, "--augment", "none")
    assert result.exit_code == 2 and "command.txt: cannot write the run" in " ".join(result.output.split())
    assert victim.read_text() == "the user's own file\n"
    assert [p.name for p in run.iterdir()] == ["command.txt"] and (run / "command.txt").is_symlink()  # left as found


def test_report_does_not_write_thumbnails_through_a_linked_folder(model, images, tmp_path):
    out = tmp_path / "out"
    assert cli("infer", images, "--out", out, "--model", model).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "report_files").symlink_to(elsewhere)
    result = cli("report", out)
    assert result.exit_code == 2 and "a link, where the report keeps a folder" in " ".join(result.output.split())
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("cell, words", [
    ("=HYPERLINK(1)", "which a spreadsheet would run as a formula"),
    ("@SUM(1)", "which a spreadsheet would run as a formula"),
])
def test_merge_and_resume_refuse_rows_a_spreadsheet_would_run(cell, words, model, images, tmp_path):
    header = "image_id,melanoma,seborrheic_keratosis,nevus,label\n"
    (tmp_path / "predictions.part-1-of-2.csv").write_text(header + f"{cell},0.2,0.3,0.5,nevus\n")
    (tmp_path / "predictions.part-2-of-2.csv").write_text(header + "b,0.2,0.3,0.5,=cmd|' /C calc'!A0\n")
    result = cli("merge", tmp_path)
    assert result.exit_code == 2 and words in " ".join(result.output.split())
    (tmp_path / "predictions.part-1-of-2.csv").write_text(header + "a,0.2,0.3,0.5,nevus\n")
    result = cli("merge", tmp_path)
    assert result.exit_code == 2 and "has the label \"=cmd|' /C calc'!A0\", not one of" in " ".join(result.output.split())
    assert not (tmp_path / "predictions.csv").exists()

    out = tmp_path / "out"
    assert cli("infer", images, "--out", out, "--model", model).exit_code == 0
    with open(out / "predictions.csv", "a") as fh:
        fh.write(f"{cell},0.2,0.3,0.5,nevus\n")
    result = cli("infer", images, "--out", out, "--model", model, "--resume")
    assert result.exit_code == 2 and words in " ".join(result.output.split())


def test_preprocess_names_images_and_metadata_a_spreadsheet_would_run(images, tmp_path):
    shutil.copy(images / "img0.png", images / "=HYPERLINK(1).png")
    result = cli("preprocess", images, "--out", tmp_path / "cache", "--size", 32)
    assert result.exit_code == 1 and "=HYPERLINK(1).png: its name starts with '='" in " ".join(result.stderr.split())
    ids = [r["image_id"] for r in csv.DictReader(open(tmp_path / "cache" / "manifest.csv"))]
    assert ids == ["img0", "img1"]
    from dermtool.data import read_lesion_ids

    (tmp_path / "metadata.csv").write_text("image_id,lesion_id\nimg0,HAM_1\nimg1,\"=cmd|' /C calc'!A0\"\n")
    with pytest.raises(InputError, match="row 3 has the lesion_id"):
        read_lesion_ids(tmp_path / "metadata.csv")


def test_a_tiff_of_thousands_of_samples_is_refused_before_decoding(tmp_path):
    """4 MP under the pixel limit, but 1000 samples a pixel: 3.9 GiB decoded (4.3 GB of memory)."""
    import tifffile

    from dermtool.preprocess import load_image

    path = tmp_path / "bomb.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 1000), np.uint8), planarconfig="contig", photometric="minisblack",
                     extrasamples=[0] * 999, compression="zlib")
    with pytest.raises(InputError, match="1000 samples per pixel; an image has 1 to 4"):
        load_image(path)


def test_a_config_json_that_nests_too_deeply_is_one_line(model, images, tmp_path):
    folder = Path(shutil.copytree(model, tmp_path / "m"))
    (folder / "config.json").write_text("[" * 200000)
    result = cli("infer", images, "--out", tmp_path / "o", "--model", folder)
    assert result.exit_code == 2 and "nests too deeply" in result.output and "Traceback" not in result.output


def test_control_characters_from_a_csv_reach_the_terminal_as_escapes(tmp_path):
    """An id holding escape sequences (clear the screen, retitle the window) and a bidi override
    is named in the error as visible escapes, not sent to the terminal to obey."""
    from dermtool.terminal import printable

    bad = "ba\x1b]0;title\x07d\x1b[2J\u202ex\x9b2J"
    (tmp_path / "p.csv").write_text(f"image_id,melanoma,seborrheic_keratosis\nok,0.1,0.2\n{bad},0.1,0.2\n{bad},0.1,0.2\n")
    (tmp_path / "t.csv").write_text("image_id,melanoma,seborrheic_keratosis\nok,0,0\n")
    result = cli("score", tmp_path / "p.csv", tmp_path / "t.csv")
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "repeats image_id ba\\x1b]0;title\\x07d\\x1b[2J\\u202ex\\x9b2J at row 4" in said
    assert not any(c in result.output for c in "\x1b\x07\x9b\u202e")
    assert printable("a\tb\nc\u2028\x7f") == "a\tb\nc\\u2028\\x7f"


def test_control_characters_in_the_data_check_table_reach_the_terminal_as_escapes(images, tmp_path):
    """The preprocess table of label rows without an image printed a CSV's id raw: the escape
    escaped only whole messages, not a table's cells."""
    (images.parent / "labels.csv").write_text("image_id,melanoma,seborrheic_keratosis\nimg0,1,0\n"
                                              "\x1b[2Jevil\u202e,0,0\n", encoding="utf-8")
    result = cli("preprocess", images.parent, "--out", tmp_path / "cache", "--size", 32)
    assert result.exit_code in (0, 1), result.output
    assert "\\x1b[2Jevil\\u202e" in result.output and not any(c in result.output for c in "\x1b\u202e")


def test_a_run_folder_from_elsewhere_cannot_make_resume_write_or_allocate_outside_it(tmp_path):
    """A logs/ link took TensorBoard's event files out of the run; a command.txt hard-linked to
    a file elsewhere was appended to; an optimizer.npz declaring a huge array was allocated,
    and one of the wrong shape ended in a Keras traceback."""
    import zipfile

    run = _toy_run(tmp_path)
    state = json.loads((run / "state.json").read_text())
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    shutil.rmtree(run / "logs", ignore_errors=True)
    (run / "logs").symlink_to(victim_dir)
    result = cli("train", "--out", run, "--resume", "--epochs", 2)
    assert result.exit_code == 2 and "logs: a link" in " ".join(result.output.split()), result.output
    assert not any(victim_dir.iterdir())
    (run / "logs").unlink()

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    (run / "command.txt").unlink(missing_ok=True)
    os.link(victim, run / "command.txt")
    result = cli("train", "--out", run, "--resume", "--epochs", 2)
    assert result.exit_code == 2 and "a hard link" in " ".join(result.output.split()), result.output
    assert victim.read_text() == "the user's own file\n"
    (run / "command.txt").unlink()

    npz = run / state["checkpoint"] / "optimizer.npz"
    with np.load(npz) as saved:
        arrays = {k: saved[k] for k in saved.files}
    for bad in ("wrong_shape", "huge"):
        with zipfile.ZipFile(npz, "w") as zf:
            for key, value in arrays.items():
                if key == "v1":
                    header = {"descr": "<f4", "fortran_order": False,
                              "shape": (3_000_000_000,) if bad == "huge" else (7, 7)}
                    buf = io.BytesIO()
                    np.lib.format.write_array_header_1_0(buf, header)
                    if bad == "wrong_shape":
                        buf.write(np.zeros((7, 7), "<f4").tobytes())
                    zf.writestr(f"{key}.npy", buf.getvalue())
                else:
                    buf = io.BytesIO()
                    np.save(buf, value)
                    zf.writestr(f"{key}.npy", buf.getvalue())
        result = cli("train", "--out", run, "--resume", "--epochs", 2)
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and "optimizer state does not match this model or is damaged" in said, said
        assert "Traceback" not in result.output


@pytest.mark.parametrize("edit, words", [
    ("class_index=x", "a class_index or geometry value that is not a whole number"),  # a ValueError traceback
    ("class_index=9", "a class_index outside -1 to 3"),  # taken silently
    ("inner_h=-5", "an image's geometry does not fit its square"),  # taken silently
    ("stack", "not of 32 x 32 RGB images as cache.json says"),  # a traceback mid-training
])
def test_a_tampered_cache_is_one_line_before_training(tmp_path, edit, words):
    import tifffile

    from dermtool.data import build_cache, load_cache, resolve_layout
    from dermtool.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", 4, rng_seed=3, sizes=[(40, 48)], formats=("png",))
    cache = tmp_path / "cache"
    build_cache(resolve_layout(data), cache, size=32, fit="squash", progress=False)
    if edit == "stack":
        tifffile.imwrite(cache / "images.tif", np.zeros((4, 8, 8, 3), np.uint8), photometric="rgb")
    else:
        column, value = edit.split("=")
        rows = list(csv.DictReader(open(cache / "manifest.csv")))
        rows[1][column] = value
        with open(cache / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with pytest.raises(InputError, match=words):
        load_cache(cache)
