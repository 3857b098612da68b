"""`dermtool infer` through the real command on a folder of synthetic images of varied sizes and
formats, with untrained tiny models (no training needed: the files are what is tested).

Checked: the outputs of every good image (original size, binary masks, CSV rows), bad files
reported while the rest is done, --resume, --shard, seg-only and cls-only models,
--probabilities, --overlay, the run summary, `dermtool score` on the output, bad paths, and
that an interruption leaves whole files only.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from conftest import UNWRITABLE
from dermtool import CLASS_NAMES, io
from dermtool.cli import app
from dermtool.config import preset_config, save_config
from dermtool.errors import InputError
from dermtool.infer import InferOptions, predict_folder, select_images
from dermtool.shards import shard_of
from dermtool.models import build_model
from dermtool.synthetic import make_lesion

runner = CliRunner()

#: image file -> (height, width) of the original: aspect ratios from 1:2.1 to 1.7:1, odd sides,
#: a JPEG big enough to be decoded at reduced size, and every format with its odd cases.
GOOD = {
    "alpha.png": (90, 90),  # RGBA, partly transparent
    "bitmap.bmp": (50, 70),
    "deep.tif": (64, 80),  # 16-bit RGB
    "gray.png": (75, 131),  # 8-bit grayscale
    "large.jpg": (600, 800),  # decoded at 1/8 scale for a 32 px model
    "panorama.JPG": (200, 420),  # upper-case extension
    "tall.jpeg": (161, 97),
    "wide.jpg": (120, 160),
}
BAD = ("corrupt.jpg", "cut.jpg")  # random bytes; a JPEG truncated to half its bytes
IDS = sorted(Path(name).stem for name in GOOD)
HEADER = ["image_id", *CLASS_NAMES, "label"]


# --- fixtures -------------------------------------------------------------------------------


def _centre_seg_head(model, size: int) -> None:
    """Shift the untrained seg head's bias so that a quarter of a lesion image's pixels pass 0.5
    (a blob over part of the image after the closing); a bare random init may mark all or
    none, which would make the mask checks vacuous."""
    rgb = make_lesion(size, size, np.random.default_rng(0))[0]
    prob = np.clip(model.predict_on_batch(rgb[None].astype(np.float32))["seg"], 1e-6, 1 - 1e-6)
    kernel, bias = model.get_layer("seg").get_weights()
    model.get_layer("seg").set_weights([kernel, bias - np.percentile(np.log(prob / (1 - prob)), 75)])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Model folders (config.json + best.weights.h5) of tiny untrained joint, seg and cls nets."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for task in ("joint", "seg", "cls"):
        folder = root / task
        folder.mkdir()
        cfg = preset_config("compact", task, size=32, base_filters=4, depth=2)
        save_config(folder / "config.json", cfg)
        keras.utils.set_random_seed(7)  # the same nets every run: the mask checks need a lesion
        model = build_model(cfg)
        if cfg.has_seg:
            _centre_seg_head(model, cfg.size)
        model.save_weights(str(folder / "best.weights.h5"))
        folders[task] = folder
    return folders


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """The input folder (images/), truth masks (masks/) and truth classes of the good images."""
    root = tmp_path_factory.mktemp("infer_data")
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    classes = {}
    for k, (name, (h, w)) in enumerate(GOOD.items()):
        rgb, mask, cls = make_lesion(h, w, np.random.default_rng(k), cls=k % 3)
        path = images / name
        if name == "alpha.png":
            alpha = np.full((h, w), 255, np.uint8)
            alpha[: h // 6] = 0
            Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
        elif name == "gray.png":
            Image.fromarray(rgb).convert("L").save(path)
        elif name == "deep.tif":
            tifffile.imwrite(path, rgb.astype(np.uint16) * 257, photometric="rgb")
        elif path.suffix.lower() in (".jpg", ".jpeg"):
            Image.fromarray(rgb).save(path, format="JPEG", quality=90)
        else:
            Image.fromarray(rgb).save(path)
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"{path.stem}_segmentation.png")
        classes[path.stem] = cls
    (images / "corrupt.jpg").write_bytes(np.random.default_rng(99).bytes(3000))
    buf = _io.BytesIO()
    Image.fromarray(make_lesion(150, 200, np.random.default_rng(7))[0]).save(buf, "JPEG", quality=90)
    (images / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (images / "readme.txt").write_text("not an image: ignored, not failed")
    return {"images": images, "masks": masks, "classes": classes, "root": root}


def infer(*args):
    return runner.invoke(app, ["infer", *map(str, args)])


@pytest.fixture(scope="module")
def joint_run(models, dataset, tmp_path_factory):
    """One full run of the joint model, shared by the read-only checks below."""
    out = tmp_path_factory.mktemp("joint_run") / "out"
    result = infer(dataset["images"], "--out", out, "--model", models["joint"], "--batch-size", 3)
    return result, out


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def rows_by_id(path: Path) -> dict[str, list[str]]:
    return {row[0]: row for row in read_csv(path)[1:]}


def assert_no_temp_files(folder: Path) -> None:
    """Nothing half-written: the one hidden file kept is the record of the image files read."""
    leftovers = [p.name for p in folder.iterdir() if (p.name.startswith(".") or ".tmp" in p.name)
                 and not (p.name.startswith(".predictions") and p.name.endswith(".sources.csv"))]
    assert leftovers == []


def assert_whole_pngs(folder: Path) -> None:
    for path in folder.glob("*_segmentation.png"):
        with Image.open(path) as img:
            img.load()  # raises on a truncated file


# --- one full run -----------------------------------------------------------------------------


def test_bad_files_are_named_and_the_rest_is_done(joint_run):
    result, out = joint_run
    assert result.exit_code == 1, result.output
    for name in BAD:
        assert name in result.output
    assert "readme.txt" not in result.output
    assert f"{len(GOOD)} images" in result.output and f"{len(BAD)} failed" in result.output


def test_masks_are_binary_at_the_original_size(joint_run):
    _, out = joint_run
    masks = sorted(p.name for p in out.glob("*_segmentation.png"))
    assert masks == [f"{i}_segmentation.png" for i in IDS]
    values = set()
    for name, (h, w) in GOOD.items():
        with Image.open(out / f"{Path(name).stem}_segmentation.png") as img:
            assert img.mode == "L" and img.size == (w, h)
            arr = np.asarray(img)
        assert set(np.unique(arr)) <= {0, 255}
        values |= set(np.unique(arr).tolist())
    assert values == {0, 255}  # not vacuous: the untrained net does mark some lesion


def test_csv_rows_match_the_images(joint_run):
    _, out = joint_run
    rows = read_csv(out / "predictions.csv")
    assert rows[0] == HEADER
    assert [r[0] for r in rows[1:]] == IDS  # sorted by file name, bad files absent
    for row in rows[1:]:
        probs = np.array(row[1:4], dtype=float)
        assert ((probs >= 0) & (probs <= 1)).all()
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert row[4] == CLASS_NAMES[int(np.argmax(probs))]


def test_run_summary_records_counts_and_postprocessing(joint_run, models):
    _, out = joint_run
    summary = json.loads((out / "infer.json").read_text())
    assert summary["done"] == len(GOOD) and summary["skipped"] == 0
    assert sorted(Path(f).name for f in summary["failed"]) == sorted(BAD)
    assert summary["model"] == str(models["joint"].resolve()) and summary["task"] == "joint"
    assert summary["images_per_second"] > 0 and not summary["interrupted"]
    from dermtool.modelio import model_fingerprint  # calibrate compares the weights alone

    assert summary["weights_sha1"] == model_fingerprint(models["joint"], config=False) != summary["model_sha1"]
    assert summary["postprocess"] == {"threshold": 0.5, "closing_radius": 3,
                                      "largest_component": True, "fill_holes": True}


def test_no_temp_files_are_left(joint_run):
    assert_no_temp_files(joint_run[1])


def test_score_reads_the_output(joint_run, dataset, tmp_path):
    _, out = joint_run
    truth = tmp_path / "truth.csv"
    classes = dataset["classes"]
    truth.write_text("image_id,melanoma,seborrheic_keratosis\n" + "".join(
        f"{i},{float(classes[i] == 0)},{float(classes[i] == 1)}\n" for i in IDS))
    report = tmp_path / "score.json"
    result = runner.invoke(app, ["score", str(out / "predictions.csv"), str(truth), "--pred-masks", str(out),
                                 "--truth-masks", str(dataset["masks"]), "--json", str(report)])
    assert result.exit_code == 0, result.output
    scored = json.loads(report.read_text())
    assert scored["classification"]["n_images"] == len(IDS)
    assert scored["segmentation"]["n_images"] == len(IDS) and scored["segmentation"]["n_missing"] == 0
    labels = {r[0]: CLASS_NAMES.index(r[4]) for r in read_csv(out / "predictions.csv")[1:]}
    hits = sum(labels[i] == classes[i] for i in IDS)
    assert scored["classification"]["accuracy"] == pytest.approx(hits / len(IDS))


def test_default_model_is_used_without_model_option(models, dataset, tmp_path, monkeypatch):
    import dermtool.infer

    monkeypatch.setattr(dermtool.infer, "default_model_dir", lambda: models["seg"])
    result = infer(dataset["images"], "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert json.loads((tmp_path / "out" / "infer.json").read_text())["model"] == str(models["seg"])


# --- resume -----------------------------------------------------------------------------------


def test_resume_skips_complete_images_and_redoes_incomplete_ones(joint_run, models, dataset, tmp_path):
    out = Path(shutil.copytree(joint_run[1], tmp_path / "out"))  # copy2 keeps the mtimes
    before = rows_by_id(out / "predictions.csv")
    (out / "wide_segmentation.png").unlink()  # mask gone: redo
    rows = [r for r in read_csv(out / "predictions.csv") if r[0] != "gray"]  # row gone: redo
    with open(out / "predictions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    kept = [i for i in IDS if i not in ("wide", "gray")]
    mtimes = {i: (out / f"{i}_segmentation.png").stat().st_mtime_ns for i in kept}

    result = infer(dataset["images"], "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 1, result.output  # the bad files are tried again and fail again
    assert "2 images, 6 skipped" in result.output
    summary = json.loads((out / "infer.json").read_text())
    assert (summary["done"], summary["skipped"], len(summary["failed"])) == (2, 6, 2)
    assert {i: (out / f"{i}_segmentation.png").stat().st_mtime_ns for i in kept} == mtimes
    assert (out / "wide_segmentation.png").is_file()
    after = rows_by_id(out / "predictions.csv")
    assert sorted(after) == IDS
    for i in kept:
        assert after[i] == before[i]
    for i in ("wide", "gray"):
        np.testing.assert_allclose(np.array(after[i][1:4], float), np.array(before[i][1:4], float), atol=1e-5)
    assert_no_temp_files(out)


# --- shards -----------------------------------------------------------------------------------


def test_shards_are_disjoint_cover_the_folder_and_concatenate(joint_run, models, dataset, tmp_path):
    out = tmp_path / "out"
    names = sorted(p.name for p in dataset["images"].iterdir() if p.suffix != ".txt")
    for k in (1, 2):  # two processes sharing one output folder
        result = infer(dataset["images"], "--out", out, "--model", models["joint"], "--shard", f"{k}/2")
        bad = [n for n in BAD if shard_of(Path(n).stem, 2) == k]
        assert result.exit_code == (1 if bad else 0), result.output
        assert [n for n in BAD if n in result.output] == bad
    parts = [read_csv(out / f"predictions.part-{k}-of-2.csv") for k in (1, 2)]
    assert parts[0][0] == parts[1][0] == HEADER
    ids = [{r[0] for r in part[1:]} for part in parts]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(IDS)
    # stable by image id: shard 1 takes the ids that hash to it, wherever they sort
    assert ids[0] == {Path(n).stem for n in names if shard_of(Path(n).stem, 2) == 1} - {Path(n).stem for n in BAD}
    merged = {r[0]: r for part in parts for r in part[1:]}
    full = rows_by_id(joint_run[1] / "predictions.csv")
    assert sorted(merged) == sorted(full)
    for i, row in merged.items():  # other batches, same numbers up to float noise
        assert row[4] == full[i][4]
        np.testing.assert_allclose(np.array(row[1:4], float), np.array(full[i][1:4], float), atol=1e-5)
    assert sorted(p.name for p in out.glob("*_segmentation.png")) == [f"{i}_segmentation.png" for i in IDS]
    assert (out / "infer.shard1of2.json").is_file() and (out / "infer.shard2of2.json").is_file()
    assert not (out / "predictions.csv").exists()
    assert_no_temp_files(out)

    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 1, result.output  # the files that failed in their shard are named
    assert all(name in result.output for name in BAD) and "merged 2 parts" in result.output
    rows = read_csv(out / "predictions.csv")
    assert rows[0] == HEADER and [r[0] for r in rows[1:]] == IDS
    assert {r[0]: r for r in rows[1:]} == merged
    assert_no_temp_files(out)


@pytest.fixture
def sharded(models, dataset, tmp_path):
    """A folder of the good images inferred in two shards (not merged yet)."""
    images = tmp_path / "images"
    images.mkdir()
    for name in GOOD:
        shutil.copy(dataset["images"] / name, images / name)
    out = tmp_path / "out"
    for k in (1, 2):
        result = infer(images, "--out", out, "--model", models["seg"], "--shard", f"{k}/2")
        assert result.exit_code == 0, result.output
    return images, out


def merge(out):
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output
    assert not (out / "predictions.csv").exists()
    return lines[0]


def test_merge_refuses_a_missing_part(sharded):
    _, out = sharded
    (out / "predictions.part-2-of-2.csv").unlink()
    assert "predictions.part-2-of-2.csv" in merge(out) and "--shard 2/2" in merge(out)


def test_merge_refuses_an_id_in_two_parts(sharded):
    _, out = sharded
    first = read_csv(out / "predictions.part-1-of-2.csv")[1]
    with open(out / "predictions.part-2-of-2.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(first)
    message = merge(out)
    assert first[0] in message and "predictions.part-1-of-2.csv" in message and "predictions.part-2-of-2.csv" in message


@pytest.mark.parametrize("value", ["nan", "7.5", "x"])
def test_merge_refuses_a_value_that_is_not_a_probability(value, tmp_path):
    """nan or 7.5 once went into predictions.csv, and the report page's JSON then did not parse."""
    header = "image_id,melanoma,seborrheic_keratosis,nevus,label\n"
    (tmp_path / "predictions.part-1-of-2.csv").write_text(header + "a,0.2,0.3,0.5,nevus\n")
    (tmp_path / "predictions.part-2-of-2.csv").write_text(header + f"b,0.1,{value},0.5,nevus\n")
    assert f"row 2 (b) has seborrheic_keratosis = '{value}', not a probability in [0, 1]" in merge(tmp_path)


def test_merge_refuses_a_part_beyond_n(sharded):
    _, out = sharded
    shutil.copy(out / "predictions.part-1-of-2.csv", out / "predictions.part-3-of-2.csv")
    assert "part 3 of 2 does not exist" in merge(out)


def test_merge_refuses_shards_of_different_image_folders_unless_given_one(sharded, models, tmp_path):
    """Shards run on two folders once merged without a word, an image of one in no part."""
    images, out = sharded
    other = Path(shutil.copytree(images, tmp_path / "other"))
    result = infer(other, "--out", out, "--model", models["seg"], "--shard", "2/2")
    assert result.exit_code == 0, result.output
    assert "name 2 images folders" in merge(out)
    result = runner.invoke(app, ["merge", str(out), "--images", str(images)])
    assert result.exit_code == 0, result.output
    assert sorted(rows_by_id(out / "predictions.csv")) == sorted(Path(n).stem for n in GOOD)


def test_merge_refuses_an_image_no_part_holds(sharded):
    """An image added after the shards ran is named, with the shard that must run again."""
    images, out = sharded
    shutil.copy(images / "wide.jpg", images / "added_later.jpg")
    message = merge(out)
    assert "added_later" in message and f"--shard {shard_of('added_later', 2)}/2 --resume" in message


def test_shard_of_an_image_does_not_change_when_others_are_added(tmp_path):
    for i in range(11):
        (tmp_path / f"img_{i:02d}.jpg").write_bytes(b"")
    before = {p.name: k for k in (1, 2, 3) for p in select_images(tmp_path, (k, 3))}
    (tmp_path / "img_00a.jpg").write_bytes(b"")  # sorts second: every later position moves
    after = {p.name: k for k in (1, 2, 3) for p in select_images(tmp_path, (k, 3))}
    assert {name: after[name] for name in before} == before


def test_select_images_shards_partition_any_folder(tmp_path):
    for i in range(11):
        (tmp_path / f"img_{i:02d}.jpg").write_bytes(b"")
    everything = select_images(tmp_path)
    for n in (1, 2, 3, 5, 11, 12):
        parts = [select_images(tmp_path, (k, n)) for k in range(1, n + 1)]
        assert sorted(p for part in parts for p in part) == everything
        assert sum(len(part) for part in parts) == len(everything)



def test_select_images_keeps_an_id_list_and_names_ids_without_an_image(tmp_path):
    for name in ("a.jpg", "b.png", "c.jpg", "d.tif"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in select_images(tmp_path, ids=["d", "a"])] == ["a.jpg", "d.tif"]
    for n in (2, 3):  # an id list and shards: the parts still partition the listed images
        parts = [select_images(tmp_path, (k, n), ids=["a", "c", "d"]) for k in range(1, n + 1)]
        assert sorted(p.name for part in parts for p in part) == ["a.jpg", "c.jpg", "d.tif"]
    with pytest.raises(InputError, match=r"2 id\(s\) of the id list \(--ids\) have no image in .*\(e.g. x, y\)"):
        select_images(tmp_path, (1, 2), ids=["a", "y", "x"])


def test_infer_ids_processes_only_the_listed_images(models, dataset, tmp_path):
    ids = tmp_path / "train.txt"
    ids.write_text("# one side of a split\nwide\n\ntall\n")
    out = tmp_path / "out"
    result = infer(dataset["images"], "--out", out, "--model", models["joint"], "--ids", ids)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert sorted(r["image_id"] for r in rows) == ["tall", "wide"]
    assert sorted(p.name for p in out.glob("*_segmentation.png")) == ["tall_segmentation.png",
                                                                      "wide_segmentation.png"]
    ids.write_text("wide\nnot_there\n")
    refused = infer(dataset["images"], "--out", tmp_path / "out2", "--model", models["joint"], "--ids", ids)
    assert refused.exit_code == 2
    assert "1 id(s) of the id list (--ids) have no image in" in " ".join(refused.output.split())
    assert not (tmp_path / "out2" / "predictions.csv").exists()
    missing = infer(dataset["images"], "--out", tmp_path / "out3", "--ids", tmp_path / "nope.txt")
    assert missing.exit_code == 2 and "nope.txt: id list not found." in " ".join(missing.output.split())

# --- model variants and optional outputs ----------------------------------------------------


def test_seg_only_model_writes_no_class_columns(models, dataset, tmp_path):
    out = tmp_path / "out"
    result = infer(dataset["images"], "--out", out, "--model", models["seg"])
    assert result.exit_code == 1, result.output
    rows = read_csv(out / "predictions.csv")
    assert rows[0] == ["image_id"] and [r for r in rows[1:]] == [[i] for i in IDS]
    assert len(list(out.glob("*_segmentation.png"))) == len(GOOD)


def test_cls_only_model_writes_no_masks(models, dataset, tmp_path):
    out = tmp_path / "out"
    result = infer(dataset["images"], "--out", out, "--model", models["cls"])
    assert result.exit_code == 1, result.output
    rows = read_csv(out / "predictions.csv")
    assert rows[0] == HEADER and [r[0] for r in rows[1:]] == IDS
    assert not list(out.glob("*.png"))
    assert json.loads((out / "infer.json").read_text())["done"] == len(GOOD)


def test_probabilities_and_overlays(models, dataset, tmp_path):
    out = tmp_path / "out"
    result = infer(dataset["images"], "--out", out, "--model", models["joint"], "--probabilities", "--overlay")
    assert result.exit_code == 1, result.output
    for name, (h, w) in GOOD.items():
        stem = Path(name).stem
        prob = tifffile.imread(out / f"{stem}_probability.tif")
        assert prob.dtype == np.float32 and prob.shape == (h, w)
        assert prob.min() >= 0.0 and prob.max() <= 1.0
        with Image.open(out / f"{stem}_overlay.jpg") as img:
            assert img.format == "JPEG" and img.size == (w, h) and img.mode == "RGB"
    assert len(list(out.glob("*_probability.tif"))) == len(list(out.glob("*_overlay.jpg"))) == len(GOOD)
    assert_no_temp_files(out)


def test_postprocessing_switches_are_recorded(models, dataset, tmp_path):
    out = tmp_path / "out"
    result = infer(dataset["images"], "--out", out, "--model", models["seg"], "--threshold", 0.4,
                   "--closing-radius", 0, "--all-components", "--no-fill-holes")
    assert result.exit_code == 1, result.output
    assert json.loads((out / "infer.json").read_text())["postprocess"] == {
        "threshold": 0.4, "closing_radius": 0, "largest_component": False, "fill_holes": False}


# --- bad paths: exit 2 and one line --------------------------------------------------------------


@pytest.mark.parametrize("case", ["no_images", "empty_folder", "images_a_file", "out_is_images", "shard_of_0",
                                  "no_model", "model_without_weights", "bad_shard", "shard_range",
                                  "bad_tta", "out_is_file", "closing_radius_33", "closing_radius_200",
                                  "threshold_above_1", "threshold_below_0", "batch_size_0", "batch_size_huge",
                                  "workers_huge", "melanoma_threshold_0", "melanoma_threshold_1",
                                  "melanoma_threshold_above_1"])
def test_bad_paths_and_options_exit_2_with_one_line(case, models, dataset, tmp_path):
    out = tmp_path / "out"
    empty_model = tmp_path / "empty_model"
    empty_model.mkdir()
    shutil.copy(models["joint"] / "config.json", empty_model)
    args = {
        "no_images": [tmp_path / "missing", "--out", out, "--model", models["joint"]],
        "no_model": [dataset["images"], "--out", out, "--model", tmp_path / "no_such_model"],
        "model_without_weights": [dataset["images"], "--out", out, "--model", empty_model],
        "bad_shard": [dataset["images"], "--out", out, "--model", models["joint"], "--shard", "two"],
        "shard_range": [dataset["images"], "--out", out, "--model", models["joint"], "--shard", "3/2"],
        "bad_tta": [dataset["images"], "--out", out, "--model", models["joint"], "--tta", "3"],
        "out_is_file": [dataset["images"], "--out", tmp_path / "file.csv", "--model", models["joint"]],
        "empty_folder": [tmp_path / "empty", "--out", out, "--model", models["joint"]],
        "images_a_file": [tmp_path / "file.csv", "--out", out, "--model", models["joint"]],
        "out_is_images": [tmp_path / "empty", "--out", tmp_path / "empty", "--model", models["joint"]],
        "shard_of_0": [dataset["images"], "--out", out, "--model", models["joint"], "--shard", "1/0"],
    }.get(case)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x_segmentation.png").write_bytes(b"a truth mask")
    out_of_range = {
        "closing_radius_33": ("--closing-radius", "33"), "closing_radius_200": ("--closing-radius", "200"),
        "threshold_above_1": ("--threshold", "1.5"), "threshold_below_0": ("--threshold", "-0.1"),
        "batch_size_0": ("--batch-size", "0"), "batch_size_huge": ("--batch-size", "100000"),
        "workers_huge": ("--workers", "100000"), "melanoma_threshold_0": ("--melanoma-threshold", "0"),
        "melanoma_threshold_1": ("--melanoma-threshold", "1"),
        "melanoma_threshold_above_1": ("--melanoma-threshold", "1.5"),
    }.get(case)
    if out_of_range:
        args = [dataset["images"], "--out", out, "--model", models["joint"], *out_of_range]
    (tmp_path / "file.csv").write_text("not a folder")
    result = infer(*args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    if out_of_range:  # the message names the option, the value given and the reason for the range
        option, value = out_of_range
        assert option in lines[0] and value in lines[0] and "(" in lines[0], lines[0]
    if case == "out_is_file":
        assert str(tmp_path / "file.csv") in lines[0] and "not a folder" in lines[0]
    words = {"empty_folder": "holds no images", "images_a_file": "is a file; give the folder of images",
             "out_is_images": "is the images folder", "shard_of_0": "N (the number of parts) must be 1 or more"}
    assert words.get(case, "") in lines[0]
    assert not out.exists() and [p.name for p in (tmp_path / "empty").iterdir()] == ["x_segmentation.png"]


def test_tta_averages_the_views_with_each_mask_mapped_back(models):
    import dermtool.infer

    class Echo:
        """A 'model' whose mask is its input's red channel: TTA must give the identity back."""

        def predict_on_batch(self, x):
            return {"seg": x[..., :1] / 255.0, "cls": np.tile([0.2, 0.3, 0.5], (len(x), 1))}

    x = np.random.default_rng(0).uniform(0, 255, (3, 8, 8, 3)).astype(np.float32)
    for views in (1, 4, 8):
        out = dermtool.infer._run_model(Echo(), x, views, batch_size=4)
        np.testing.assert_allclose(out["seg"], x[..., 0] / 255.0, rtol=1e-6)
        assert out["cls"].shape == (3, 3)


def test_missing_folder_through_the_installed_entry_point(tmp_path):
    """The real process: one line on stderr, nothing on stdout, exit code 2."""
    proc = subprocess.run([sys.executable, "-m", "dermtool", "infer", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "missing") in proc.stderr
    assert not (tmp_path / "out").exists()


# --- interruption -----------------------------------------------------------------------------


def _check_whole_outputs(out: Path) -> dict[str, list[str]]:
    """The CSV parses (also with the scorer's reader), matches the masks, and nothing is partial."""
    rows = read_csv(out / "predictions.csv")
    assert rows[0] == HEADER and all(len(r) == len(HEADER) for r in rows)
    written = {r[0] for r in rows[1:]}
    if written:
        assert set(io.read_class_csv(out / "predictions.csv", role="predictions")) == written
    assert {p.name[: -len("_segmentation.png")] for p in out.glob("*_segmentation.png")} == written
    assert_whole_pngs(out)
    assert_no_temp_files(out)
    return rows_by_id(out / "predictions.csv")


def test_interrupt_between_batches_leaves_whole_files_and_resumes(models, dataset, tmp_path, monkeypatch):
    import dermtool.infer

    real_run = dermtool.infer._run_model
    calls = []

    def run_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # call 1 is the warm-up on zeros, call 2 the first batch
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(dermtool.infer, "_run_model", run_then_interrupt)
    out = tmp_path / "out"
    opts = InferOptions(batch_size=2)
    summary = predict_folder(dataset["images"], out, models["joint"], opts, progress=False)
    assert summary.interrupted
    assert json.loads((out / "infer.json").read_text())["interrupted"] is True
    done = _check_whole_outputs(out)
    assert sorted(done) == ["alpha", "bitmap"]  # the first batch, written before the interrupt

    monkeypatch.setattr(dermtool.infer, "_run_model", real_run)
    summary = predict_folder(dataset["images"], out, models["joint"], InferOptions(resume=True), progress=False)
    assert (summary.skipped, summary.done, summary.interrupted) == (2, len(GOOD) - 2, False)
    assert sorted(_check_whole_outputs(out)) == IDS


def test_interrupt_inside_a_png_write_leaves_no_partial_file(models, dataset, tmp_path, monkeypatch):
    """Ctrl-C while a mask's bytes are half on disk: that mask does not appear at all."""
    real_write = Path.write_bytes
    saves = []

    def write_half_then_interrupt(self, data):
        if "_segmentation.png" in self.name:
            saves.append(self)
            if len(saves) == 3:
                real_write(self, data[: len(data) // 2])
                raise KeyboardInterrupt
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_half_then_interrupt)
    out = tmp_path / "out"
    summary = predict_folder(dataset["images"], out, models["joint"], InferOptions(batch_size=2, workers=1),
                             progress=False)
    assert summary.interrupted and len(saves) >= 3
    done = _check_whole_outputs(out)
    assert len(done) < len(GOOD)


def test_interrupt_through_the_cli_exits_130(models, dataset, tmp_path, monkeypatch):
    import dermtool.infer

    real_run = dermtool.infer._run_model
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the warm-up call, at the first batch
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(dermtool.infer, "_run_model", interrupt)
    result = infer(dataset["images"], "--out", tmp_path / "out", "--model", models["joint"])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output
    assert read_csv(tmp_path / "out" / "predictions.csv") == [HEADER]


# --- two files with one id --------------------------------------------------------------------


def test_entries_named_like_images_that_are_not_run_are_named_and_the_rest_done(models, few_images, tmp_path):
    """A broken link, a folder, a FIFO named x.jpg, and a name a spreadsheet would run as a
    formula, were passed over in silence (or the name went into predictions.csv as it was)."""
    import os

    (few_images / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (few_images / "folder.png").mkdir()
    os.mkfifo(few_images / "pipe.jpg")
    shutil.copy(few_images / "wide.jpg", few_images / "=HYPERLINK(1).jpg")
    out = tmp_path / "out"
    assert_named_and_rest_done(infer(few_images, "--out", out, "--model", models["seg"]), out,
                               ("dangling.jpg: a link to nothing", "folder.png: a folder, not an image file",
                                "pipe.jpg: not a regular file", "=HYPERLINK(1).jpg: its name starts with '='"))


def assert_named_and_rest_done(result, out: Path, named: tuple) -> None:
    """Exit 1, each entry named in its words, and the three good images of few_images done."""
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    for words in named:
        assert words in text, text
    assert sorted(rows_by_id(out / "predictions.csv")) == ["gray", "tall", "wide"]
    assert len(json.loads((out / "infer.json").read_text())["failed"]) == len(named)


def test_names_predictions_csv_cannot_hold_are_named_and_the_rest_done(models, few_images, tmp_path):
    """A name that is not UTF-8 stopped infer with a traceback before anything ran; a carriage
    return in a name broke its CSV row; a 240-byte name failed on its mask's temporary name and
    then stopped every --resume (File name too long)."""
    latin1 = os.fsencode(few_images) + b"/caf\xe9.jpg"
    with open(latin1, "wb") as fh:
        fh.write((few_images / "wide.jpg").read_bytes())
    shutil.copy(few_images / "wide.jpg", few_images / "cr\rname.jpg")
    shutil.copy(few_images / "wide.jpg", few_images / ("a" * 240 + ".jpg"))
    shutil.copy(few_images / "wide.jpg", few_images / " wide.jpg")  # " wide" and "wide": one id to a CSV reader
    out = tmp_path / "out"
    for resume in ((), ("--resume",)):
        assert_named_and_rest_done(infer(few_images, "--out", out, "--model", models["joint"], *resume), out,
                                   ("caf\\xe9.jpg': its name is not valid UTF-8", "its name holds a line break",
                                    "its name without the extension is 240 bytes long", "its name starts or ends with a space"))
    assert_no_temp_files(out)


def test_names_that_differ_only_in_unicode_form_are_one_id(models, few_images, tmp_path):
    """'mélanome' written NFC and NFD were two ids that look the same in the CSV and the report."""
    import unicodedata

    for form in ("NFC", "NFD"):
        shutil.copy(few_images / "wide.jpg", few_images / (unicodedata.normalize(form, "mélanome") + ".jpg"))
    out = tmp_path / "out"
    result = infer(few_images, "--out", out, "--model", models["joint"])
    assert result.exit_code == 1, result.output  # the second is named, as a.jpg beside a.png is
    ids = [unicodedata.normalize("NFC", i) for i in rows_by_id(out / "predictions.csv")]
    assert sorted(ids) == ["gray", "mélanome", "tall", "wide"]


def test_line_breaks_beyond_ascii_are_refused_as_control_characters_are(models, few_images, tmp_path):
    """NEL (U+0085), U+2029 and a C1 control passed the check of codes below 32: the CSV held them,
    and --ids (read by splitlines) could not select them, so the tool could not read its own ids."""
    for name in ("a\x85b", "c\u2029d", "e\x9bf"):
        shutil.copy(few_images / "wide.jpg", few_images / f"{name}.jpg")
    out = tmp_path / "out"
    result = infer(few_images, "--out", out, "--model", models["joint"])
    assert_named_and_rest_done(result, out, ("its name holds a line break",) * 3)


def test_ids_select_a_name_written_in_the_other_unicode_form(models, few_images, tmp_path):
    """An id list in NFD (as macOS writes names) matched no NFC file: "no image ... (e.g. Müller_1)"
    about a name that looks the same as the file beside it."""
    import unicodedata

    shutil.copy(few_images / "wide.jpg", few_images / (unicodedata.normalize("NFC", "Müller_1") + ".jpg"))
    ids = tmp_path / "ids.txt"
    ids.write_text(unicodedata.normalize("NFD", "Müller_1") + "\ngray\n", encoding="utf-8")
    out = tmp_path / "out"
    result = infer(few_images, "--out", out, "--model", models["joint"], "--ids", ids)
    assert result.exit_code == 0, result.output
    assert sorted(unicodedata.normalize("NFC", i) for i in rows_by_id(out / "predictions.csv")) == ["Müller_1", "gray"]


def test_a_report_of_folders_whose_names_are_not_utf8_is_written(models, few_images, tmp_path):
    """A Latin-1 folder name (surrogates to Python) stopped --report with a UnicodeEncodeError."""
    images = Path(os.fsdecode(os.fsencode(tmp_path) + b"/img\xe9"))
    shutil.copytree(few_images, images)
    out = Path(os.fsdecode(os.fsencode(tmp_path) + b"/out\xe9"))
    result = infer(images, "--out", out, "--model", models["joint"], "--report")
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "img\\udce9" in page and "Traceback" not in result.output


def test_a_decoder_error_fails_its_image_only(models, few_images, tmp_path):
    """zlib's error on a damaged TIFF escaped infer's decode: a traceback, the batch lost, and
    every --resume the same."""
    path = few_images / "damaged.tif"
    pixels = np.kron(np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 10, np.ones((32, 32, 1), np.uint8))
    tifffile.imwrite(path, pixels, photometric="rgb", compression="zlib")  # the stream cut below, the tags kept
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] + bytes(len(data) - len(data) // 2))
    out = tmp_path / "out"
    result = infer(few_images, "--out", out, "--model", models["joint"], "--batch-size", "4")
    assert result.exit_code == 1, result.output
    assert "damaged.tif: not a readable image (error: Error" in " ".join(result.output.split())
    assert sorted(rows_by_id(out / "predictions.csv")) == ["gray", "tall", "wide"]
    assert sorted(p.name for p in out.glob(f"*{io.MASK_SUFFIX}")) == [f"{i}{io.MASK_SUFFIX}" for i in
                                                                     ("gray", "tall", "wide")]


def test_a_failure_while_writing_removes_that_images_other_outputs(models, few_images, tmp_path, monkeypatch):
    """An overlay written before its mask failed stayed behind without a mask or row."""
    from dermtool import infer as infer_module

    real = infer_module._save_png

    def failing(path, mask):
        if path.name.startswith("tall"):
            raise ValueError("a writer's own error")
        real(path, mask)

    monkeypatch.setattr(infer_module, "_save_png", failing)
    out = tmp_path / "out"
    result = infer(few_images, "--out", out, "--model", models["joint"], "--overlay", "--probabilities")
    assert result.exit_code == 1, result.output
    assert "tall.jpeg: could not be processed (ValueError: a writer's own error)" in " ".join(result.output.split())
    assert sorted(rows_by_id(out / "predictions.csv")) == ["gray", "wide"]
    assert not list(out.glob("tall*")) and len(list(out.glob("wide*"))) == 3


def test_a_run_into_an_earlier_runs_folder_leaves_no_overlay_or_map_of_the_earlier_model(models, few_images, tmp_path):
    """A second run without --overlay --probabilities left the first run's overlays (another
    model's label drawn on them) and probability maps beside its own masks."""
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"], "--overlay", "--probabilities").exit_code == 0
    assert len(list(out.glob("*_overlay.jpg"))) == len(list(out.glob("*_probability.tif"))) == 3
    result = infer(few_images, "--out", out, "--model", models["seg"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        ["infer.json", "predictions.csv"] + [f"{i}{io.MASK_SUFFIX}" for i in ("gray", "tall", "wide")])


def test_temporary_files_a_killed_run_left_are_removed_when_their_image_is_done_again(models, few_images,
                                                                                   tmp_path):
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    (out / f"wide{io.MASK_SUFFIX}").unlink()  # killed while writing it: its temporary file is left
    (out / f".wide{io.MASK_SUFFIX}.99999.tmp").write_bytes(b"")
    (out / f".other{io.MASK_SUFFIX}.99999.tmp").write_bytes(b"")  # not this run's image: not touched
    result = infer(few_images, "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == [f".other{io.MASK_SUFFIX}.99999.tmp"]


def test_masks_left_by_an_earlier_run_of_other_images_are_named(models, few_images, tmp_path):
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["seg"]).exit_code == 0
    (few_images / "wide.jpg").unlink()
    result = infer(few_images, "--out", out, "--model", models["seg"])
    assert result.exit_code == 0, result.output
    assert "holds 1 mask(s) of images not in this run (wide)" in " ".join(result.output.split())


def test_resume_redoes_an_image_whose_overlay_or_probability_map_is_gone(models, few_images, tmp_path):
    out = tmp_path / "out"
    options = ["--model", models["joint"], "--overlay", "--probabilities"]
    assert infer(few_images, "--out", out, *options).exit_code == 0
    ids = sorted(r[0] for r in read_csv(out / "predictions.csv")[1:])
    (out / f"{ids[0]}_overlay.jpg").unlink()
    (out / f"{ids[1]}_probability.tif").unlink()
    result = infer(few_images, "--out", out, *options, "--resume")
    assert result.exit_code == 0, result.output
    assert f"2 images, {len(ids) - 2} skipped" in result.output
    assert (out / f"{ids[0]}_overlay.jpg").is_file() and (out / f"{ids[1]}_probability.tif").is_file()


def test_resume_drops_a_partial_line_a_kill_cut_short(models, few_images, tmp_path):
    """A last line cut mid-write (still the right number of fields) made --resume refuse the folder."""
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    done = read_csv(out / "predictions.csv")
    (out / "predictions.csv").write_text("\n".join(",".join(r) for r in done[:2]) + "\n")  # the run was cut
    cut = done[2][:4] + [done[2][4][:3]]  # the label cut to 'nev' or 'mel'
    (out / ".predictions.partial.csv").write_text(",".join(cut))
    result = infer(few_images, "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 0, result.output
    assert read_csv(out / "predictions.csv") == done


def test_resume_does_again_an_image_changed_since_the_earlier_run(models, few_images, tmp_path):
    """An image replaced under the same name was skipped as done, its old outputs kept."""
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    before = rows_by_id(out / "predictions.csv")
    mtimes = {i: (out / f"{i}_segmentation.png").stat().st_mtime_ns for i in before}
    Image.open(few_images / "gray.png").convert("RGB").save(few_images / "wide.jpg")  # new content, same name

    result = infer(few_images, "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 0, result.output
    assert "1 image(s) changed since the earlier run (wide.jpg)" in " ".join(result.output.split())
    after = rows_by_id(out / "predictions.csv")
    assert (out / "wide_segmentation.png").stat().st_mtime_ns != mtimes["wide"]
    assert {i: (out / f"{i}_segmentation.png").stat().st_mtime_ns for i in ("gray", "tall")} == \
        {i: mtimes[i] for i in ("gray", "tall")}
    assert infer(few_images, "--out", tmp_path / "fresh", "--model", models["joint"]).exit_code == 0
    fresh = rows_by_id(tmp_path / "fresh" / "predictions.csv")
    assert after["wide"] == fresh["wide"] and fresh["wide"] != before["wide"]  # the new image's outputs
    assert (out / "wide_segmentation.png").read_bytes() == (tmp_path / "fresh" / "wide_segmentation.png").read_bytes()
    assert after["tall"] == before["tall"]
    # the record of the files read deleted since: every image counts as changed, none is trusted
    (out / ".predictions.sources.csv").unlink()
    result = infer(few_images, "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 0, result.output
    assert "3 image(s) changed since the earlier run" in " ".join(result.output.split())
    assert rows_by_id(out / "predictions.csv") == after
    # a folder of an older dermtool (no such record, and an infer.json that does not say it kept
    # one) resumes as before: its rows are trusted
    (out / ".predictions.sources.csv").unlink()
    record = json.loads((out / "infer.json").read_text())
    del record["sources_kept"]
    (out / "infer.json").write_text(json.dumps(record))
    os.utime(few_images / "tall.jpeg")
    result = infer(few_images, "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 0 and "changed since" not in result.output, result.output
    assert rows_by_id(out / "predictions.csv") == after
    assert_no_temp_files(out)


def test_resume_drops_the_rows_of_images_gone_since(models, few_images, tmp_path):
    """A resumed run kept an earlier run's row of an image deleted since: merge then refused the part."""
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    (few_images / "wide.jpg").unlink()
    result = infer(few_images, "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 0, result.output
    assert "dropped 1 row(s) of the earlier run whose image is no longer in this run (wide)" in \
        " ".join(result.output.split())
    assert sorted(rows_by_id(out / "predictions.csv")) == ["gray", "tall"]


def test_resume_with_another_id_list_is_refused(models, few_images, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("wide\ngray\n")
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"], "--ids", ids).exit_code == 0
    ids.write_text("wide\n")
    result = infer(few_images, "--out", out, "--model", models["joint"], "--ids", ids, "--resume")
    assert result.exit_code == 2, result.output
    assert "an --ids list of 2 id(s) in the run, an --ids list of 1 id(s) now" in " ".join(result.output.split())


@pytest.mark.parametrize("what", ["fifo", "folder"])
def test_a_special_file_at_infers_own_file_is_one_line_and_the_record_is_kept(models, few_images, tmp_path, what):
    """A FIFO there hung --resume for ever; a folder there left infer.json saying 'running'."""
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    record = (out / "infer.json").read_text()
    own = out / ".predictions.sources.csv"
    own.unlink()
    os.mkfifo(own) if what == "fifo" else own.mkdir()
    result = infer(few_images, "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 2, result.output
    assert "is a folder or another special file where infer keeps its own file" in " ".join(result.output.split())
    assert (out / "infer.json").read_text() == record


def test_a_damaged_record_of_the_files_read_checks_every_image_again(models, few_images, tmp_path):
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    (out / ".predictions.sources.csv").write_bytes(b"\xff\xfe\x00")  # not UTF-16 text: an odd byte
    result = infer(few_images, "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "every image is checked as changed" in text and "3 image(s) changed since" in text


def test_a_changed_image_that_now_fails_keeps_no_old_outputs(models, few_images, tmp_path):
    """The old file's row and mask stayed while the run named the new file as failed."""
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"], "--overlay").exit_code == 0
    (few_images / "wide.jpg").write_bytes((few_images / "wide.jpg").read_bytes()[:300])
    result = infer(few_images, "--out", out, "--model", models["joint"], "--overlay", "--resume")
    assert result.exit_code == 1, result.output
    assert sorted(rows_by_id(out / "predictions.csv")) == ["gray", "tall"]
    assert not list(out.glob("wide*"))


def test_an_id_list_naming_a_refused_file_names_it_and_does_the_rest(models, few_images, tmp_path):
    """select_images dropped the refused name before the id list was read: 'no image' for it, exit 2."""
    shutil.copy(few_images / "wide.jpg", few_images / ("a" * 240 + ".jpg"))
    ids = tmp_path / "ids.txt"
    ids.write_text("a" * 240 + "\nwide\n")
    out = tmp_path / "out"
    result = infer(few_images, "--out", out, "--model", models["joint"], "--ids", ids)
    assert result.exit_code == 1, result.output
    assert "its name without the extension is 240 bytes long" in " ".join(result.output.split())
    assert sorted(rows_by_id(out / "predictions.csv")) == ["wide"]


def test_resume_with_another_images_folder_is_refused(models, few_images, tmp_path):
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["seg"]).exit_code == 0
    other = Path(shutil.copytree(few_images, tmp_path / "other"))
    _one_line(infer(other, "--out", out, "--model", models["seg"], "--resume"), "images folder", str(other.resolve()))


def test_two_files_with_one_id_use_the_first_by_name_and_exit_1(models, dataset, tmp_path):
    images, alone = tmp_path / "images", tmp_path / "alone"
    images.mkdir()
    alone.mkdir()
    shutil.copy(dataset["images"] / "wide.jpg", images / "a.jpg")
    shutil.copy(dataset["images"] / "alpha.png", images / "a.png")  # another picture, same id "a"
    shutil.copy(dataset["images"] / "bitmap.bmp", images / "b.bmp")
    shutil.copy(dataset["images"] / "wide.jpg", alone / "a.jpg")
    result = infer(images, "--out", tmp_path / "out", "--model", models["joint"], "--probabilities")
    assert result.exit_code == 1, result.output
    assert "a.png" in result.output and "a.jpg" in result.output and "same image id" in result.output
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert [r[0] for r in rows[1:]] == ["a", "b"]
    summary = json.loads((tmp_path / "out" / "infer.json").read_text())
    assert summary["done"] == 2 and [Path(f).name for f in summary["duplicates"]] == ["a.png"]
    assert infer(alone, "--out", tmp_path / "ref", "--model", models["joint"], "--probabilities").exit_code == 0
    # a.jpg's outputs, never a.png's. The mask is byte for byte the same; the float probabilities
    # may differ in the last bits, because the reference ran in a batch of 1 and oneDNN's kernels
    # differ by batch size on some CPUs (seen on an AMD EPYC box). a.png's would differ by far more.
    name = "a_segmentation.png"
    assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    prob, ref = (tifffile.imread(tmp_path / d / "a_probability.tif") for d in ("out", "ref"))
    assert prob.shape == ref.shape
    np.testing.assert_allclose(prob, ref, rtol=0, atol=1e-5)
    assert_no_temp_files(tmp_path / "out")


# --- resume with other settings ---------------------------------------------------------------


@pytest.mark.parametrize("setting, extra", [("model", ["--model", "other"]), ("closing_radius", ["--closing-radius", "5"]),
                                            ("tta", ["--tta", "4"]), ("threshold", ["--threshold", "0.3"]),
                                            ("engine", ["--engine", "savedmodel"]),
                                            ("melanoma_threshold", ["--melanoma-threshold", "0.3"])])
def test_resume_with_other_settings_is_refused(joint_run, models, dataset, tmp_path, monkeypatch, setting, extra):
    monkeypatch.setenv("DERMTOOL_CACHE_DIR", str(tmp_path / "cache"))
    if setting == "engine":  # converted beforehand, so the refusal is all that infer prints
        from dermtool.modelio import load_engine

        load_engine(models["joint"], "savedmodel")
    out = Path(shutil.copytree(joint_run[1], tmp_path / "out"))
    (out / "wide_segmentation.png").unlink()  # something left to do
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = Path(shutil.copytree(models["joint"], tmp_path / "other"))
    model = build_model(preset_config("compact", "joint", size=32, base_filters=4, depth=2))
    model.save_weights(str(other / "best.weights.h5"))  # same architecture, other weights
    args = ["--model", models["joint"], *extra]
    if setting == "model":
        args = ["--model", other]
    result = infer(dataset["images"], "--out", out, "--resume", *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert str(out / "infer.json") in lines[0] and setting in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


def test_resume_accepts_the_same_model_from_another_folder(joint_run, models, dataset, tmp_path):
    out = Path(shutil.copytree(joint_run[1], tmp_path / "out"))
    same = Path(shutil.copytree(models["joint"], tmp_path / "same"))
    result = infer(dataset["images"], "--out", out, "--resume", "--model", same)
    assert result.exit_code == 1 and f"0 images, {len(GOOD)} skipped" in result.output, result.output


# --- batch size beyond the work -----------------------------------------------------------------


def test_batch_size_beyond_the_images_is_never_padded(models, dataset, tmp_path, monkeypatch):
    import dermtool.infer

    images = tmp_path / "images"
    images.mkdir()
    for name in ("wide.jpg", "tall.jpeg"):
        shutil.copy(dataset["images"] / name, images / name)
    real_load, seen = dermtool.infer.load_engine, []

    class Recorder:
        def __init__(self, engine):
            self.engine, self.cfg, self.name, self.path = engine, engine.cfg, engine.name, engine.path

        def predict_on_batch(self, x):
            seen.append(len(x))
            return self.engine.predict_on_batch(x)

    def load_recording(model_dir, engine=None, log=None):
        return Recorder(real_load(model_dir, engine, log=log))

    monkeypatch.setattr(dermtool.infer, "load_engine", load_recording)
    summary = predict_folder(images, tmp_path / "out", models["joint"], InferOptions(batch_size=1024), progress=False)
    assert summary.done == 2
    assert seen and max(seen) == 2  # warm-up included


# --- the decision: temperature and melanoma threshold ---------------------------------------------


def _decided(model: Path, folder: Path, temperature: float, threshold: float | None) -> Path:
    """A copy of `model` whose config.json holds a temperature and a melanoma threshold."""
    folder = Path(shutil.copytree(model, folder))
    raw = json.loads((folder / "config.json").read_text())
    raw["model"].update(temperature=temperature, melanoma_threshold=threshold)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def _probs_and_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    rows = read_csv(path)[1:]
    return np.array([r[1:4] for r in rows], dtype=float), [r[4] for r in rows]


def test_a_stored_decision_scales_the_probabilities_and_sets_the_labels(joint_run, models, dataset, tmp_path):
    from dermtool.decision import apply_temperature, label_names

    plain, _ = _probs_and_labels(joint_run[1] / "predictions.csv")  # the same model at T = 1, no threshold
    scaled = apply_temperature(plain, 3.0)
    # a threshold between the middle two melanoma probabilities: some images on either side
    t = float(np.mean(np.sort(scaled[:, 0])[len(IDS) // 2 - 1:len(IDS) // 2 + 1]))
    model = _decided(models["joint"], tmp_path / "decided", 3.0, t)
    out = tmp_path / "out"
    result = infer(dataset["images"], "--out", out, "--model", model)
    assert result.exit_code == 1, result.output  # the two bad files
    probs, labels = _probs_and_labels(out / "predictions.csv")
    np.testing.assert_allclose(probs, scaled, atol=2e-6)  # softmax(log p / T) of the plain run
    assert labels == label_names(probs, t)
    assert 0 < labels.count("melanoma") < len(IDS)
    record = json.loads((out / "infer.json").read_text())
    assert (record["temperature"], record["melanoma_threshold"]) == (3.0, t)
    assert record["melanoma_threshold_source"] == "model"  # as it was then: the report reads it


def test_melanoma_threshold_overrides_the_stored_one_and_is_recorded(models, dataset, tmp_path):
    from dermtool.decision import label_names

    model = _decided(models["cls"], tmp_path / "decided", 1.0, 0.9)
    out = tmp_path / "out"
    first = infer(dataset["images"], "--out", out, "--model", model)
    assert first.exit_code == 1, first.output
    probs, stored = _probs_and_labels(out / "predictions.csv")
    assert stored == label_names(probs, 0.9)
    low = float(probs[:, 0].min()) - 1e-3  # every image reaches it: all melanoma
    again = tmp_path / "again"
    result = infer(dataset["images"], "--out", again, "--model", model, "--melanoma-threshold", low)
    assert result.exit_code == 1, result.output
    probs2, labels = _probs_and_labels(again / "predictions.csv")
    assert labels == ["melanoma"] * len(IDS) and labels != stored
    np.testing.assert_array_equal(probs2, probs)  # the threshold decides labels, never probabilities
    record = json.loads((again / "infer.json").read_text())
    assert (record["melanoma_threshold"], record["melanoma_threshold_source"], record["target_sensitivity"]) == \
        (low, "option", None)


def test_melanoma_threshold_needs_a_classifier(models, dataset, tmp_path):
    result = infer(dataset["images"], "--out", tmp_path / "out", "--model", models["seg"], "--melanoma-threshold", 0.3)
    assert result.exit_code == 2 and "classifier" in result.output, result.output


# --- outputs that cannot be written, records that cannot be read (issue 18) --------------------


def _one_line(result, *words) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    for word in words:
        assert str(word) in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def few_images(dataset, tmp_path) -> Path:
    """Three good images: enough to write, quick to run."""
    images = tmp_path / "few"
    images.mkdir()
    for name in ("wide.jpg", "gray.png", "tall.jpeg"):
        shutil.copy(dataset["images"] / name, images / name)
    return images


@pytest.mark.parametrize("case", ["predictions_csv_a_folder", "infer_json_a_folder", "out_under_a_file"])
def test_an_output_that_cannot_be_written_is_one_line_naming_it(case, models, few_images, tmp_path, under_a_file):
    """These were OSError tracebacks (IsADirectoryError, NotADirectoryError)."""
    out = tmp_path / "out"
    if case == "out_under_a_file":
        out = named = under_a_file
    else:
        named = out / ("predictions.csv" if case == "predictions_csv_a_folder" else "infer.json")
        named.mkdir(parents=True)
    line = _one_line(infer(few_images, "--out", out, "--model", models["joint"]), named, "cannot write")
    if case != "out_under_a_file":
        assert not list(out.glob("*.png"))  # refused before any image was done
    assert (UNWRITABLE[case] if case == "out_under_a_file" else "a folder is where the file should be") in line


def test_a_full_disk_stops_infer_with_one_line_saying_so(models, few_images, tmp_path, monkeypatch, no_space):
    real_write = Path.write_bytes

    def full(self, data):
        if "_segmentation.png" in self.name:
            raise no_space(self)
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / "out"
    line = _one_line(infer(few_images, "--out", out, "--model", models["seg"], "--workers", 1))
    assert "_segmentation.png: cannot write infer's output (the disk is full)." in line
    assert not list(out.glob("*.png")) and not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("damage", [b"", b"[1, 2]", b"{\"model\": ", b"\xff\xfe\x00\xd8"])
def test_resume_with_a_damaged_record_is_refused_not_unchecked(damage, models, few_images, tmp_path):
    """A damaged infer.json used to skip the --resume check silently."""
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["seg"]).exit_code == 0
    (out / "infer.json").write_bytes(damage)
    _one_line(infer(few_images, "--out", out, "--model", models["seg"], "--resume"),
              out / "infer.json", "--resume cannot check")


def test_merge_refuses_a_part_that_is_not_utf8_naming_it(sharded):
    """A Latin-1 byte in a part gave a UnicodeDecodeError traceback."""
    _, out = sharded
    part = out / "predictions.part-1-of-2.csv"
    part.write_bytes(part.read_bytes().replace(b"gray", b"gr\xe4y"))
    assert f"{part}: the predictions part is not UTF-8 text" in merge(out)


def test_merge_accepts_a_part_saved_with_a_byte_order_mark(sharded):
    _, out = sharded
    part = out / "predictions.part-1-of-2.csv"
    part.write_bytes(part.read_text().encode("utf-16"))
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(r[0] for r in read_csv(out / "predictions.csv")[1:]) == IDS


@pytest.mark.parametrize("damage", [b"", b"[]", b"{\"model\": "])
def test_merge_refuses_a_damaged_shard_record(sharded, damage):
    """A damaged record used to skip that shard's model check without a word."""
    _, out = sharded
    (out / "infer.shard2of2.json").write_bytes(damage)
    message = merge(out)
    assert str(out / "infer.shard2of2.json") in message and "--shard 2/2" in message


def test_merge_says_so_when_a_shard_record_is_missing(sharded):
    _, out = sharded
    (out / "infer.shard1of2.json").unlink()
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"not checked: {out / 'infer.shard1of2.json'} is missing" in text
    assert (out / "predictions.csv").is_file()


@pytest.mark.parametrize("case", ["predictions_csv_a_folder", "disk_full"])
def test_merge_that_cannot_write_is_one_line(sharded, case, monkeypatch, no_space):
    _, out = sharded
    if case == "predictions_csv_a_folder":
        (out / "predictions.csv").mkdir()
    else:
        real_open = Path.open

        def full(self, mode="r", *args, **kwargs):
            if "w" in mode:
                raise no_space(self)
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(Path, "open", full)
    result = runner.invoke(app, ["merge", str(out)])
    line = _one_line(result, f"{out / 'predictions.csv'}: cannot write the merged predictions")
    assert (UNWRITABLE[case] if case == "disk_full" else "a folder is where the file should be") in line
    assert not list(out.glob(".*.tmp"))


def test_the_lesion_view_averages_the_frame_with_the_square_around_the_models_own_mask():
    from dermtool.infer import predict_batch

    class Fake:  # seg: the bright pixels; cls: melanoma = mean brightness of what it was shown
        def predict_on_batch(self, x):
            m = x.mean(axis=(1, 2, 3)) / 255.0
            return {"seg": (x[..., :1] > 127).astype(np.float32),
                    "cls": np.stack([m, (1 - m) / 2, (1 - m) / 2], axis=1)}

    frame = np.zeros((96, 96, 3), np.float32)
    frame[28:68, 28:68] = 255.0  # a 40 px lesion: its view is 40 * 1.3 = 52 px wide
    empty = np.zeros((96, 96, 3), np.float32)
    (_, plain), _ = predict_batch(Fake(), [frame, empty])
    (_, both), (_, none) = predict_batch(Fake(), [frame, empty], lesion_view=True)
    whole, close = 40 * 40 / 96**2, 40 * 40 / 52**2
    assert plain[0] == pytest.approx(whole, abs=1e-6)
    assert both[0] == pytest.approx((whole + close) / 2, abs=0.01)
    assert none[0] == pytest.approx(0.0)  # no lesion found: the frame's answer alone


def test_the_lesion_views_second_look_runs_the_classifier_alone_with_the_same_answer(models):
    """The crops need only class probabilities: the Keras engine classifies them without the mask
    decoder (models.classifier_model), and the result is the same as the whole network's."""
    from dermtool.infer import predict_batch
    from dermtool.modelio import load_engine
    from dermtool.models import classifier_model

    engine = load_engine(models["joint"])
    alone = classifier_model(engine.model)
    assert list(alone.output) == ["cls"] and "seg" not in {layer.name for layer in alone.layers}
    assert len(alone.weights) < len(engine.model.weights)  # the decoder's are not in it
    assert classifier_model(load_engine(models["cls"]).model) is None  # no decoder to leave out
    rng = np.random.default_rng(3)
    x = []
    for side in (10, 14, 18, 22, 26):  # bright squares on noise: the lesions the fake mask finds
        img = rng.uniform(0, 90, (32, 32, 3)).astype(np.float32)
        top, left = rng.integers(0, 32 - side, 2)
        img[top:top + side, left:left + side] += 150
        x.append(img)
    np.testing.assert_allclose(engine.classify(np.stack(x))["cls"], engine.predict_on_batch(np.stack(x))["cls"], atol=1e-6)
    calls = []

    def whole(self, batch):  # the real net's classes; the mask: its bright pixels (the tiny net's is scattered)
        calls.append("whole")
        return {"seg": (batch.mean(axis=-1, keepdims=True) > 127).astype(np.float32),
                "cls": engine.predict_on_batch(batch)["cls"]}

    class Spy:  # the engine, counting which of its two entry points ran
        cfg = engine.cfg
        predict_on_batch = whole

        def classify(self, batch):
            calls.append("classify")
            return engine.classify(batch)

    class WholeOnly:  # an engine without classify (ONNX, SavedModel): the crops run the whole net
        cfg = engine.cfg
        predict_on_batch = whole

    with_view = predict_batch(Spy(), x, tta=4, batch_size=8, lesion_view=True)
    assert calls == ["whole"] * 4 + ["classify"] * 4  # 4 views of the frames, then of the crops
    calls.clear()
    fallback = predict_batch(WholeOnly(), x, tta=4, batch_size=8, lesion_view=True)
    assert calls == ["whole"] * 8
    frame_only = predict_batch(WholeOnly(), x, tta=4, batch_size=8)
    for (sa, ca), (sb, cb) in zip(with_view, fallback):
        np.testing.assert_allclose(ca, cb, atol=1e-6)
        np.testing.assert_array_equal(sa, sb)
    moved = [float(np.abs(a[1] - f[1]).max()) for a, f in zip(with_view, frame_only)]
    assert max(moved) > 1e-4, moved  # the crops were looked at: the mean moved


def test_a_model_with_the_lesion_view_uses_it_in_infer_and_the_api(models, few_images, tmp_path, monkeypatch):
    """The view itself is checked above with a model whose mask is known; here, that the
    config's cls_views reaches it from both entry points (the tiny net's mask is scattered)."""
    import dermtool
    from dermtool import api as api_module
    from dermtool import infer as infer_module

    folder = tmp_path / "lesion-view"
    shutil.copytree(models["joint"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["cls_views"] = "frame+lesion"
    (folder / "config.json").write_text(json.dumps(config))
    asked = []
    real = infer_module.predict_batch

    def spy(*args, **kwargs):
        asked.append(args[5] if len(args) > 5 else kwargs.get("lesion_view", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(infer_module, "predict_batch", spy)
    monkeypatch.setattr(api_module, "predict_batch", spy)
    for name, model in (("frame", models["joint"]), ("both", folder)):
        assert infer(few_images, "--out", tmp_path / name, "--model", model).exit_code == 0
        assert asked and set(asked) == {name == "both"}
        asked.clear()
    list(dermtool.load_model(folder).predict(sorted(few_images.iterdir())))
    assert asked and set(asked) == {True}
    asked.clear()
    # --cls-views overrides the model's; infer.json records it, so --resume refuses another
    assert infer(few_images, "--out", tmp_path / "frame-only", "--model", folder, "--cls-views", "frame").exit_code == 0
    assert set(asked) == {False}
    assert json.loads((tmp_path / "frame-only" / "infer.json").read_text())["cls_views"] == "frame"
    again = infer(few_images, "--out", tmp_path / "frame-only", "--model", folder, "--resume")
    assert again.exit_code == 2 and "cls_views frame in the run, frame+lesion now" in " ".join(again.output.split())
    wrong = infer(few_images, "--out", tmp_path / "seg", "--model", models["seg"], "--cls-views", "frame+lesion")
    assert wrong.exit_code == 2 and "needs a joint model" in " ".join(wrong.output.split())
    bad = infer(few_images, "--out", tmp_path / "bad", "--model", folder, "--cls-views", "lesion")
    assert bad.exit_code == 2 and "--cls-views must be frame or frame+lesion" in " ".join(bad.output.split())
    assert not (tmp_path / "bad").exists()
    (folder / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "task": "cls"}}))
    damaged = infer(few_images, "--out", tmp_path / "damaged", "--model", folder)
    assert damaged.exit_code == 2 and "the lesion view (frame+lesion) needs a joint model" in " ".join(
        damaged.output.split())


def test_folder_names_with_brackets_are_printed_as_they_are(models, dataset, tmp_path):
    # rich reads "[red]" as a style and "[/b]" as a closing tag it cannot match (a traceback)
    out = tmp_path / "run[red]" / "x[" / "b]" / "out"
    result = infer(dataset["images"], "--out", out, "--model", models["joint"], "--batch-size", 3)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output  # 1: the bad files
    assert f"outputsin{out}" in "".join(result.output.split())
    assert (out / "predictions.csv").is_file()


def test_signals_wait_until_the_bookkeeping_of_an_image_is_whole():
    # a KeyboardInterrupt between "row written" and "image counted and keyed" left a row that
    # --resume then called changed (measured: 2 of 11 SIGTERM runs of 1,000 images). With other
    # threads alive, as infer's pools are, the kernel may hand the signal to any of them.
    import os
    import signal
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from dermtool.infer import _signals_held

    int_handler = signal.getsignal(signal.SIGINT)  # Python's, or the CLI's that notes a stop was asked
    for signum in (signal.SIGINT, signal.SIGTERM):
        steps, stop = [], threading.Event()
        before = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # as the CLI turns SIGTERM into Ctrl-C
        try:
            with ThreadPoolExecutor(2) as pool:
                pool.submit(stop.wait, 10)
                with pytest.raises(KeyboardInterrupt):
                    with _signals_held():
                        os.kill(os.getpid(), signum)
                        for step in ("row", "key", "counted"):
                            begun = time.perf_counter()
                            while time.perf_counter() - begun < 0.1:  # where an unheld signal would land
                                pass
                            steps.append(step)
                    for _ in range(10**6):  # delivered as the block ends: never runs to its end
                        pass
                    steps.append("after")
                stop.set()
        finally:
            signal.signal(signal.SIGTERM, before)
        assert steps == ["row", "key", "counted"]
        assert signal.getsignal(signal.SIGINT) is int_handler  # the handlers are back


def test_without_a_terminal_progress_is_a_line_now_and_then(models, few_images, tmp_path):
    from dermtool.infer import InferOptions, predict_folder

    lines = []
    summary = predict_folder(few_images, tmp_path / "out", models["joint"], InferOptions(batch_size=1),
                             progress=1e-9, log=lines.append)
    said = [line for line in lines if line.startswith("infer: ")]
    assert summary.done == 3 and [line.split(" images")[0] for line in said] == ["infer: 1 of 3", "infer: 2 of 3"]
    assert "images/s, about" in said[0] and said[0].endswith(" left")
    lines.clear()
    predict_folder(few_images, tmp_path / "quiet", models["joint"], progress=False, log=lines.append)
    assert not [line for line in lines if line.startswith("infer: ")]


def test_a_resume_with_nothing_left_keeps_what_the_earlier_session_did(models, few_images, tmp_path):
    from dermtool.review import write_report

    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    first = json.loads((out / "infer.json").read_text())
    assert infer(few_images, "--out", out, "--model", models["joint"], "--resume").exit_code == 0
    again = json.loads((out / "infer.json").read_text())
    assert (again["done"], again["skipped"]) == (0, 3)
    assert again["earlier_sessions"] == {"done": 3, "seconds": first["seconds"]}
    assert infer(few_images, "--out", out, "--model", models["joint"], "--resume").exit_code == 0
    before = json.loads((out / "infer.json").read_text())["earlier_sessions"]
    assert before["done"] == 3  # not counted twice
    assert before["seconds"] == pytest.approx(first["seconds"] + again["seconds"], abs=0.011)
    write_report(out, few_images)
    page = (out / "report.html").read_text()
    assert f"{3 / before['seconds']:.1f} images/s in the sessions before this --resume (3 images)" in page


@pytest.mark.parametrize("edit, words", [('"model_sha1": 5', "model_sha1 is '5'"), ('"ids": 5', "its ids are not a list"),
                                         ('"done": 1e400', "done is 'inf'")])
def test_resume_refuses_a_record_edited_to_values_infer_never_writes(models, few_images, tmp_path, edit, words):
    # each was a TypeError or OverflowError traceback
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    text = (out / "infer.json").read_text()
    key = edit.split(":")[0]
    (out / "infer.json").write_text(re.sub(rf'{key}: [^,\n]*', edit, text, count=1))
    result = infer(few_images, "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert words in " ".join(result.output.split())


def test_resume_refuses_a_row_whose_label_is_not_the_runs_decision(models, few_images, tmp_path):
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    rows = read_csv(out / "predictions.csv")
    rows[1][1:] = ["0.9", "0.9", "0.9", "seborrheic_keratosis"]  # sums to 2.7: merge refused it, resume kept it
    with open(out / "predictions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    result = infer(few_images, "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 2 and "sum to" in " ".join(result.output.split()), result.output


def test_a_fifo_where_infer_reads_a_record_or_a_model_file_is_one_line(models, few_images, tmp_path):
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    (out / "infer.json").unlink()
    os.mkfifo(out / "infer.json")
    result = infer(few_images, "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 2 and "infer.json" in result.output and "is empty" in result.output, result.output
    from dermtool.config import load_config

    export = tmp_path / "export"  # an export folder whose model file is a FIFO: LiteRT's open waited forever
    export.mkdir()
    cfg, _, _ = load_config(models["joint"])
    save_config(export / "config.json", cfg, export={"format": "tflite", "file": "model.tflite"})
    os.mkfifo(export / "model.tflite")
    result = infer(few_images, "--out", tmp_path / "b", "--model", export)
    assert result.exit_code == 2 and "not a regular file" in result.output, result.output


def test_out_holding_masks_no_run_wrote_is_refused_and_they_are_kept(models, few_images, tmp_path):
    """`infer DIR/images --out DIR/masks` on the layout preprocess reads replaced the truth masks
    with predictions, without a word and with exit 0 (a later score compared them with themselves)."""
    truth = tmp_path / "masks"
    truth.mkdir()
    for image in few_images.iterdir():
        Image.fromarray(np.full((4, 4), 255, np.uint8)).save(truth / f"{image.stem}_segmentation.png")
    before = {p.name: p.read_bytes() for p in truth.iterdir()}
    result = infer(few_images, "--out", truth, "--model", models["joint"])
    assert result.exit_code == 2, result.output
    assert "holds 3 mask(s) named as this run's outputs that no dermtool infer wrote" in " ".join(result.output.split())
    assert {p.name: p.read_bytes() for p in truth.iterdir()} == before
    out = tmp_path / "out"  # a folder infer wrote is its own to write again
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    assert_no_temp_files(out)


def test_a_second_run_into_a_folder_being_written_is_refused(models, few_images, tmp_path):
    """Two runs into one --out at once mixed their masks (one run's settings in infer.json, the
    other's masks on disk) and both exited 0. The parts of one sharded run still share a folder;
    a whole run, or parts of another N, cover the same images and wait."""
    from dermtool.infer import _let_go, _lock_folder

    out = tmp_path / "out"
    out.mkdir()

    def run(*extra):
        result = infer(few_images, "--out", out, "--model", models["joint"], *extra)
        return result.exit_code, " ".join(result.output.split())

    held = _lock_folder(out, (1, 1))  # as a run of the whole folder holds it
    try:
        for extra in ((), ("--shard", "1/2")):
            code, text = run(*extra)
            assert code == 2 and "another dermtool infer is writing this folder now" in text, text
        assert not (out / "predictions.csv").exists()
    finally:
        for path, lock in held:
            _let_go(path, lock)
    held = _lock_folder(out, (1, 2))  # as part 1 of 2 holds them
    try:
        code, text = run("--shard", "2/2")  # the other part of the same run
        assert code == 0, text
        code, text = run()
        assert code == 2 and "another dermtool infer is writing this folder now" in text, text
        code, text = run("--shard", "1/3")
        assert code == 2 and "a run of other --shard parts (--shard 1/2) is writing this folder now" in text, text
        code, text = run("--shard", "1/2")
        assert code == 2 and "another dermtool infer is writing this folder now" in text, text
    finally:
        for path, lock in held:
            _let_go(path, lock)
    assert run()[0] == 0
    assert not [p.name for p in out.iterdir() if p.name.endswith(".lock")]  # the last holder removes each


def test_resume_drops_the_row_of_an_image_whose_redo_failed(models, few_images, tmp_path):
    """An image done again for a deleted mask whose redo failed kept its old row: predictions.csv
    listed an image with no mask, against "none of its outputs is kept"."""
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    (out / "wide_segmentation.png").unlink()
    image = few_images / "wide.jpg"
    stat = image.stat()
    image.write_bytes(b"\0" * stat.st_size)  # unreadable now, same size and time: not "changed"
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = infer(few_images, "--out", out, "--model", models["joint"], "--resume")
    assert result.exit_code == 1 and "wide.jpg" in result.output
    assert sorted(rows_by_id(out / "predictions.csv")) == ["gray", "tall"]


@pytest.mark.parametrize("target", ["nowhere", "loop"])
def test_an_out_that_is_a_link_to_nothing_says_so(models, few_images, tmp_path, target):
    """A dangling or looping --out link said only "cannot write infer's output (File exists)"."""
    out = tmp_path / "out"
    if target == "loop":
        (tmp_path / "other").symlink_to(out)
        out.symlink_to(tmp_path / "other")
    else:
        out.symlink_to(tmp_path / "missing" / "x")
    result = infer(few_images, "--out", out, "--model", models["joint"])
    assert result.exit_code == 2 and "is a link to nothing (or a loop of links)" in " ".join(result.output.split())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_planted_as_a_lock_is_never_waited_on(models, few_images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / ".infer.shard1of3.json.lock")  # another N's part lock: looked at, not opened to wait
    result = infer(few_images, "--out", out, "--model", models["joint"], "--shard", "1/2")
    assert result.exit_code == 0, result.output
    os.mkfifo(out / ".infer.lock")
    result = infer(few_images, "--out", out, "--model", models["joint"])
    assert result.exit_code == 2 and "another special file where infer keeps its lock" in " ".join(result.output.split())


def test_merge_takes_shards_of_an_ids_list_in_the_other_unicode_form(models, few_images, tmp_path):
    """infer --ids matched an NFD list to NFC files, and merge then refused its own parts: "rows
    of images not on the shards' --ids list (café)"."""
    import unicodedata

    shutil.copy(few_images / "wide.jpg", few_images / (unicodedata.normalize("NFC", "café") + ".jpg"))
    ids = tmp_path / "ids.txt"
    ids.write_text(unicodedata.normalize("NFD", "café") + "\ngray\n", encoding="utf-8")
    out = tmp_path / "out"
    for k in (1, 2):
        assert infer(few_images, "--out", out, "--model", models["joint"], "--ids", ids, "--shard", f"{k}/2").exit_code == 0
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(unicodedata.normalize("NFC", i) for i in rows_by_id(out / "predictions.csv")) == ["café", "gray"]


def test_a_classifier_into_a_folder_of_earlier_masks_says_score_would_mix_them(models, few_images, tmp_path):
    """A cls model run after a joint one into the same --out left the joint run's masks, and
    score then joined that run's JAC with this one's BACC, without a word."""
    out = tmp_path / "out"
    assert infer(few_images, "--out", out, "--model", models["joint"]).exit_code == 0
    result = infer(few_images, "--out", out, "--model", models["cls"])
    assert result.exit_code == 0, result.output
    assert "holds 3 mask(s) of this run's images (gray, tall, wide) from an earlier run" in " ".join(result.output.split())
