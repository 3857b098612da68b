"""The infer report (OUT/report.html): its entries, facts and thumbnails, through the real
commands, and rendered in headless Chromium (skipped, with the reason, where it is absent)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dermtool import CLASS_NAMES
from dermtool.cli import app
from dermtool.review import FILES, PAGE_SIZE, model_summary, write_report
from dermtool.synthetic import make_lesion

from conftest import tiny_model_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
CARD = "# Model card\n\nA tiny test model: it knows nothing. Second sentence.\n\n## Data\n"


def make_infer_folder(root: Path, n: int, images: bool = True, failed=("broken.jpg",)) -> Path:
    """An output folder as `dermtool infer` leaves it (predictions.csv, infer.json, masks), with
    probabilities drawn at random, and the original images in root/images when `images`."""
    out, image_dir, model = root / "out", root / "images", root / "model"
    for folder in (out, image_dir, model):
        folder.mkdir(parents=True)
    (model / "MODEL_CARD.md").write_text(CARD)
    rng = np.random.default_rng(n)
    rows = []
    for i in range(n):
        image_id = f"IMG_{i:05d}"
        probs = np.round(rng.dirichlet(np.ones(3)), 6)
        rows.append([image_id, *probs, CLASS_NAMES[int(np.argmax(probs))]])
        if images:
            rgb, mask, _ = make_lesion(45 + i % 3, 60, np.random.default_rng(i))
            Image.fromarray(rgb).save(image_dir / f"{image_id}.jpg", quality=90)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{image_id}_segmentation.png")
    with open(out / "predictions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["image_id", *CLASS_NAMES, "label"], *rows])
    run = {"model": str(model), "images": str(image_dir) if images else "", "task": "joint", "device": "CPU",
           "done": n, "skipped": 0, "failed": [str(image_dir / f) for f in failed], "seconds": 2.0,
           "model_load_seconds": 1.5, "images_per_second": 12.34, "interrupted": False, "tta": 1,
           "postprocess": {"threshold": 0.5, "closing_radius": 3, "largest_component": True, "fill_holes": True},
           "shard": "1/1"}
    (out / "infer.json").write_text(json.dumps(run))
    return out


def payload(out: Path) -> dict:
    """The JSON blob the page renders from."""
    html = (out / "report.html").read_text()
    blob = re.search(r'<script type="application/json" id="entries">(.*?)</script>', html, re.S).group(1)
    return json.loads(blob)


def triage_order(out: Path) -> list[str]:
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r["image_id"] for r in sorted(rows, key=lambda r: (-float(r["melanoma"]), r["image_id"]))]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """12 images, reported once; read-only for the tests below."""
    out = make_infer_folder(tmp_path_factory.mktemp("small"), 12)
    write_report(out)
    return out


# --- the page's content ---------------------------------------------------------------------


def test_report_has_one_entry_and_one_thumbnail_per_image(small):
    data = payload(small)
    ids = [row[0] for row in data["rows"]]
    with open(small / "predictions.csv", newline="") as fh:
        assert ids == [r["image_id"] for r in csv.DictReader(fh)]
    assert data["classes"] == list(CLASS_NAMES)
    assert all(row[-2] == 1 for row in data["rows"])  # every entry has its thumbnail
    for image_id in ids:
        with Image.open(small / FILES / f"{image_id}.jpg") as img:
            assert img.format == "JPEG" and max(img.size) == 60  # small images are never enlarged


def test_report_states_the_runs_facts_and_the_warning(small):
    html = (small / "report.html").read_text()
    assert "Research tool, not a medical device" in html
    assert "A tiny test model: it knows nothing." in html and "Second sentence" not in html
    assert "12.3 images/s on CPU" in html
    assert "broken.jpg" in html and "1 failed" in html
    assert "threshold 0.5 → closing radius 3 → largest component → holes filled" in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from a network


def _with_decision(out: Path, threshold: float, temperature: float, stored: float | None) -> None:
    """Give the run's record a decision, and its model folder a config.json calibrated to `stored`."""
    from dermtool.config import preset_config, save_config
    from dataclasses import replace

    run = json.loads((out / "infer.json").read_text())
    run.update(melanoma_threshold=threshold, temperature=temperature)
    (out / "infer.json").write_text(json.dumps(run))
    cfg = replace(preset_config("compact", "joint", size=32, base_filters=4, depth=2), temperature=temperature,
                  melanoma_threshold=stored, calibration={"target_sensitivity": 0.85} if stored else None)
    save_config(Path(run["model"]) / "config.json", cfg)


def test_report_shows_the_operating_point_and_the_decided_classes(tmp_path):
    out = make_infer_folder(tmp_path, 6, images=False)
    rows = list(csv.reader(open(out / "predictions.csv", newline="")))
    argmax_not_melanoma = next(i for i, r in enumerate(rows[1:], 1) if r[4] != "melanoma")
    rows[argmax_not_melanoma][4] = "melanoma"  # the threshold called it melanoma
    with open(out / "predictions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    _with_decision(out, 0.2, 1.8, stored=0.2)
    write_report(out)
    html = (out / "report.html").read_text()
    assert "operating point" in html
    assert "melanoma when p ≥ 0.2000 (chosen on validation for melanoma sensitivity ≥ 0.85)" in html
    assert "temperature 1.800" in html
    assert payload(out)["rows"][argmax_not_melanoma - 1][1] == 0  # the card shows the label, not the argmax
    # an older record (no source kept) whose model now holds another threshold: no source claimed
    _with_decision(out, 0.35, 1.8, stored=0.2)
    write_report(out)
    assert "melanoma when p ≥ 0.3500, else" in (out / "report.html").read_text()


@pytest.mark.parametrize("source, target, says", [
    ("option", None, "(given with --melanoma-threshold)"),
    ("model", 0.9, "(chosen on validation for melanoma sensitivity ≥ 0.9)"),
    ("model", None, "(stored with the model)")])
def test_report_names_the_threshold_source_the_run_recorded_not_the_models_current_one(tmp_path, source, target,
                                                                                     says):
    """After a recalibration the model holds another threshold and target than the run used."""
    out = make_infer_folder(tmp_path, 4, images=False)
    _with_decision(out, 0.35, 1.8, stored=0.2)  # the model now: 0.2 for 0.85
    run = json.loads((out / "infer.json").read_text())
    run.update(melanoma_threshold_source=source, target_sensitivity=target)
    (out / "infer.json").write_text(json.dumps(run))
    write_report(out)
    assert f"melanoma when p ≥ 0.3500 {says}" in (out / "report.html").read_text()


def test_the_thumbnail_of_a_duplicate_id_is_of_the_image_infer_ran(tmp_path):
    """Of IMG_00000.jpg and IMG_00000.png infer runs the first by name; the report drew the other."""
    out = make_infer_folder(tmp_path, 1)
    images = tmp_path / "images"
    Image.new("RGB", (60, 45), (250, 250, 250)).save(images / "IMG_00000.png")  # white: not the lesion
    write_report(out)
    thumb = np.asarray(Image.open(out / FILES / "IMG_00000.jpg").convert("RGB")).astype(int)
    ran = np.asarray(Image.open(images / "IMG_00000.jpg").convert("RGB").resize(thumb.shape[1::-1])).astype(int)
    assert np.abs(thumb - ran).mean() < np.abs(thumb - 250).mean()


def test_report_of_an_argmax_run_has_no_operating_point(small):
    assert "operating point" not in (small / "report.html").read_text()


def test_class_counts_are_of_the_class_the_gallery_shows_for_a_csv_without_labels(tmp_path):
    """Without a label column the buttons counted no image of any class, while the gallery's
    filter (the argmax) listed them."""
    out = make_infer_folder(tmp_path, 24, images=False)
    with open(out / "predictions.csv", newline="") as fh:
        rows = [r[:-1] for r in csv.reader(fh)]  # the label column dropped
    with open(out / "predictions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    write_report(out)
    argmax = [int(np.argmax([float(p) for p in r[1:]])) for r in rows[1:]]
    assert [row[1] for row in payload(out)["rows"]] == argmax  # what the filter shows
    html = (out / "report.html").read_text()
    for k, name in enumerate(CLASS_NAMES):
        button = re.search(rf'data-class="{name}"[^>]*>[^<]*\((\d+)\)</button>', html)
        assert int(button.group(1)) == argmax.count(k)
    assert sum(argmax.count(k) for k in range(3)) == 24 and max(argmax.count(k) for k in range(3)) > 0


def _set_mtime(path: Path, when: float) -> None:
    os.utime(path, (when, when))


def test_only_overlays_the_run_drew_are_linked(tmp_path):
    """An earlier run's overlay, left in OUT, was linked beside this run's other diagnosis."""
    out = make_infer_folder(tmp_path, 4)
    for i in range(4):
        Image.new("RGB", (8, 8)).save(out / f"IMG_{i:05d}_overlay.jpg")
    record = out / "infer.json"
    assert "overlay" not in json.loads(record.read_text())  # an older record: it cannot tell whose they are
    write_report(out)
    assert [row[-1] for row in payload(out)["rows"]] == [0] * 4
    run = json.loads(record.read_text())
    run.update(overlay=True, seconds=20.0, model_load_seconds=5.0)
    record.write_text(json.dumps(run))
    end = record.stat().st_mtime
    start = end - run["seconds"] - run["model_load_seconds"]
    overlay, mask = "IMG_{:05d}_overlay.jpg", "IMG_{:05d}_segmentation.png"
    _set_mtime(out / overlay.format(1), start - 60)  # left by an earlier run: its mask is this run's
    for name in (overlay, mask):  # skipped as done by --resume: drawn by the earlier part of the run
        _set_mtime(out / name.format(2), start - 60)
    _set_mtime(out / overlay.format(3), start + 1)  # drawn during the run
    write_report(out)
    drawn_by_the_run = [int(i != 1) for i in range(4)]
    assert [row[-1] for row in payload(out)["rows"]] == drawn_by_the_run
    run["overlay"] = False  # this run drew none: its overlays, whatever their time, are another run's
    record.write_text(json.dumps(run))
    write_report(out)
    assert [row[-1] for row in payload(out)["rows"]] == [0] * 4


def test_model_summary_of_the_bundled_model_is_its_cards_first_sentence():
    bundled = next((REPO_ROOT / "weights").glob("*/MODEL_CARD.md")).parent
    summary = model_summary(bundled)
    assert summary.startswith("The default model of dermtool infer") and summary.endswith(".")
    assert "\n" not in summary and "`" not in summary
    assert model_summary(REPO_ROOT / "no-such-model") == ""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs links and FIFOs (POSIX)")
def test_model_summary_reads_only_a_regular_card_of_the_folder_and_only_its_start(tmp_path):
    """A downloaded model folder's MODEL_CARD.md -> ~/.aws/credentials put that file into the page."""
    secret = tmp_path / "home" / "credentials"
    secret.parent.mkdir()
    secret.write_text("aws_secret_access_key = SECRET. More.\n")
    out = make_infer_folder(tmp_path, 2, images=False)
    card = tmp_path / "model" / "MODEL_CARD.md"
    card.unlink()
    card.symlink_to(secret)
    assert model_summary(card.parent) == ""
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert "SECRET" not in (out / "report.html").read_text()
    card.unlink()
    os.mkfifo(card)  # not a regular file either: not read (nor waited on)
    assert model_summary(card.parent) == ""
    card.unlink()
    card.write_text("# Model card\n\n" * 10000 + "Beyond the part read.\n")  # 140 kB: only the start is read
    assert model_summary(card.parent) == ""
    card.write_text(CARD + "x" * 1_000_000)  # a long card: its first sentence is in the part read
    assert model_summary(card.parent) == "A tiny test model: it knows nothing."


DAMAGED_RECORDS = [  # (record, key, value): values infer never writes, each once a traceback of `report`
    ("infer.json", "seconds", "x"), ("infer.json", "images_per_second", "x"),
    ("infer.json", "model_load_seconds", "x"), ("infer.json", "temperature", "x"),
    ("infer.json", "melanoma_threshold", "x"), ("infer.json", "melanoma_threshold", "0.5"),
    ("infer.json", "target_sensitivity", "x"), ("infer.json", "failed", 5), ("infer.json", "failed", [1]),
    ("infer.json", "postprocess", "x"), ("infer.json", "tta", "x"), ("infer.json", "model", 5),
    ("infer.json", "images", 5), ("infer.json", "earlier_sessions", [1]),
    ("infer.json", "earlier_sessions", {"done": "x"}),
    ("infer.shard2of2.json", "done", "x"), ("infer.shard1of2.json", "failed", "abc"),
]


@pytest.mark.parametrize("record, key, value", DAMAGED_RECORDS)
def test_report_refuses_a_damaged_record_in_one_line_naming_it_and_the_field(tmp_path, record, key, value):
    """The report's rule, as merge's and --resume's: a record with a value infer does not write
    is refused, naming the file and the field; none of its facts is shown in part."""
    out = make_infer_folder(tmp_path, 2, images=False)
    run = json.loads((out / "infer.json").read_text())
    run.update(melanoma_threshold=0.3, melanoma_threshold_source="model", target_sensitivity=0.85)
    if record != "infer.json":  # a sharded run: its records are added up
        (out / "infer.json").unlink()
        for k in (1, 2):
            (out / f"infer.shard{k}of2.json").write_text(json.dumps(dict(run, shard=f"{k}/2")))
        result = runner.invoke(app, ["report", str(out)])
        assert result.exit_code == 0 and "2 shards" in (out / "report.html").read_text(), result.output
        (out / "report.html").unlink()
    run = json.loads((out / record).read_text()) if record != "infer.json" else run
    run[key] = value
    (out / record).write_text(json.dumps(run))
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output, result.output
    message = " ".join(result.stderr.split())
    assert f"{out / record}: {key}" in message and "error" in message, message
    assert not (out / "report.html").exists()


def test_report_without_images_or_classes_still_lists_every_image(tmp_path):
    out = make_infer_folder(tmp_path, 5, images=False)
    made = write_report(out)
    assert made.entries == 5 and made.thumbnails == 0
    assert [row[-2] for row in payload(out)["rows"]] == [0] * 5
    # a seg-only model's CSV has no class columns: entries without probabilities
    (out / "predictions.csv").write_text("image_id\n" + "\n".join(f"X{i}" for i in range(3)) + "\n")
    write_report(out)
    data = payload(out)
    assert data["classes"] == [] and [row[:2] for row in data["rows"]] == [["X0", -1], ["X1", -1], ["X2", -1]]


def test_report_command_redraws_only_changed_thumbnails(tmp_path):
    out = make_infer_folder(tmp_path, 4)
    first = runner.invoke(app, ["report", str(out)])
    assert first.exit_code == 0, first.output
    assert "4 thumbnails drawn" in first.stderr
    second = runner.invoke(app, ["report", str(out), "--images", str(tmp_path / "images")])
    assert "0 thumbnails drawn" in second.stderr
    mask = out / "IMG_00002_segmentation.png"
    os.utime(mask, (mask.stat().st_mtime + 10, mask.stat().st_mtime + 10))  # as infer --resume redoing it
    assert "1 thumbnails drawn" in runner.invoke(app, ["report", str(out)]).stderr


def test_a_thumbnail_is_redrawn_when_what_it_shows_changed(tmp_path):
    """A thumbnail newer than its image and mask was kept: one of another --images folder, or one
    labelled by a since-edited CSV, showed what the page no longer says."""
    out = make_infer_folder(tmp_path, 3)
    assert "3 thumbnails drawn" in runner.invoke(app, ["report", str(out)]).stderr
    other = Path(shutil.copytree(tmp_path / "images", tmp_path / "other"))
    for path in other.iterdir():  # older than the thumbnails, as an archive unpacked with its times
        os.utime(path, (0, 0))
    before = (out / FILES / "IMG_00000.jpg").read_bytes()
    assert "3 thumbnails drawn" in runner.invoke(app, ["report", str(out), "--images", str(other)]).stderr
    rows = list(csv.reader(open(out / "predictions.csv")))
    rows[1][1:] = ["0.920000", "0.030000", "0.050000", "melanoma"]
    with open(out / "predictions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    assert "1 thumbnails drawn" in runner.invoke(app, ["report", str(out), "--images", str(other)]).stderr
    assert (out / FILES / "IMG_00000.jpg").read_bytes() != before
    assert "0 thumbnails drawn" in runner.invoke(app, ["report", str(out), "--images", str(other)]).stderr


def test_an_unreadable_image_and_a_removed_mask_are_named_on_the_command_line_and_the_page(tmp_path):
    """A truncated image left the card saying "image not found" and the command silent; a
    mask removed from a joint run's folder was drawn without a contour, unsaid."""
    out = make_infer_folder(tmp_path, 3)
    image = tmp_path / "images" / "IMG_00001.jpg"
    image.write_bytes(image.read_bytes()[:300])
    (out / "IMG_00002_segmentation.png").unlink()
    result = runner.invoke(app, ["report", str(out)])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 1, result.output
    assert f"failed IMG_00001: {image}: not a readable image" in said
    assert f"failed IMG_00002: {out / 'IMG_00002_segmentation.png'}: the run's mask is missing" in said
    data = payload(out)
    nc = len(data["classes"])
    assert {row[0]: row[2 + nc] for row in data["rows"]} == {"IMG_00000": 1, "IMG_00001": 2, "IMG_00002": 1}
    assert data["no_thumbnail"][2].startswith("no thumbnail (it could not be drawn")
    html = " ".join((out / "report.html").read_text().split())
    assert "2 thumbnail(s) with a problem" in html


def test_the_page_names_the_engine_that_ran(tmp_path):
    """A LiteRT run's page looked like a Keras run's: infer.json said litert, the page did not."""
    out = make_infer_folder(tmp_path, 2)
    run = json.loads((out / "infer.json").read_text())
    (out / "infer.json").write_text(json.dumps({**run, "engine": "litert", "engine_file": "/m/litert/model.tflite"}))
    write_report(out)
    assert "<th>engine</th><td>litert (model.tflite)</td>" in (out / "report.html").read_text()


def test_a_classifier_run_states_no_mask_steps_and_keeps_its_thumbnails(tmp_path):
    out = make_infer_folder(tmp_path, 3)
    for mask in out.glob("*_segmentation.png"):
        mask.unlink()
    run = json.loads((out / "infer.json").read_text())
    (out / "infer.json").write_text(json.dumps({**run, "task": "cls"}))
    first = runner.invoke(app, ["report", str(out)])
    assert first.exit_code == 0 and "3 thumbnails drawn" in first.stderr, first.output
    assert "0 thumbnails drawn" in runner.invoke(app, ["report", str(out)]).stderr
    html = " ".join((out / "report.html").read_text().split())
    assert "none: the model makes no mask" in html and "closing radius" not in html


def test_a_damaged_mask_is_named_and_the_other_thumbnails_are_drawn(tmp_path):
    """One unreadable mask once stopped the whole report."""
    out = make_infer_folder(tmp_path, 3)
    (out / "IMG_00001_segmentation.png").write_text("not a PNG")
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 1, result.output
    assert "failed IMG_00001:" in result.stderr and "not a readable image" in result.stderr
    assert sorted(p.name for p in (out / FILES).iterdir()) == ["IMG_00000.jpg", "IMG_00002.jpg"]
    assert [row[0] for row in payload(out)["rows"]] == ["IMG_00000", "IMG_00001", "IMG_00002"]


@pytest.mark.parametrize("case", ["not a folder", "no predictions", "images missing", "infer.json a list",
                                  "predictions not UTF-8", "a short row", "report.html a folder",
                                  "a probability of nan", "a probability above 1", "report_files a file"])
def test_report_of_a_bad_folder_exits_2_with_one_line(case, tmp_path):
    out = make_infer_folder(tmp_path, 2)
    args = ["report", str(out)]
    if case == "not a folder":
        args = ["report", str(tmp_path / "nothing")]
    elif case == "no predictions":
        (out / "predictions.csv").unlink()
    elif case == "infer.json a list":
        (out / "infer.json").write_text("[]")
    elif case == "predictions not UTF-8":
        (out / "predictions.csv").write_bytes((out / "predictions.csv").read_bytes() + b"IMG_\xe9,0.1\n")
    elif case == "a short row":
        (out / "predictions.csv").write_bytes((out / "predictions.csv").read_bytes() + b"IMG_00009,0.1\n")
    elif case == "report.html a folder":
        (out / "report.html").mkdir()
    elif case in ("a probability of nan", "a probability above 1"):
        value = "nan" if "nan" in case else "7.5"
        (out / "predictions.csv").write_text((out / "predictions.csv").read_text() + f"IMG_00009,{value},0,0,nevus\n")
    elif case == "report_files a file":
        (out / FILES).write_text("mine")
    else:
        args += ["--images", str(tmp_path / "gone")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "error" in result.stderr and "Traceback" not in result.output
    words = {"a probability of nan": "row 4 (IMG_00009) has melanoma = 'nan', not a probability in [0, 1]",
             "a probability above 1": "row 4 (IMG_00009) has melanoma = '7.5', not a probability in [0, 1]",
             "report_files a file": "a file is where the report's thumbnail folder goes"}
    assert words.get(case, "") in " ".join(result.stderr.split())


def test_infer_report_through_the_command(tmp_path):
    from dermtool.config import preset_config, save_config
    from dermtool.models import build_model

    model = tmp_path / "model"
    model.mkdir()
    cfg = preset_config("compact", "joint", size=32, base_filters=4, depth=2)
    save_config(model / "config.json", cfg)
    build_model(cfg).save_weights(str(model / "best.weights.h5"))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.fromarray(make_lesion(60, 80, np.random.default_rng(i))[0]).save(images / f"S{i}.jpg")
    (images / "corrupt.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(images), "--out", str(out), "--model", str(model), "--report"])
    assert result.exit_code == 1, result.output  # the corrupt file is named and fails the run
    assert json.loads((out / "infer.json").read_text())["images"] == str(images.resolve())
    assert [row[0] for row in payload(out)["rows"]] == [f"S{i}" for i in range(5)]
    assert len(list((out / FILES).glob("*.jpg"))) == 5
    assert "corrupt.jpg" in (out / "report.html").read_text()


def test_a_run_without_overlays_into_the_folder_of_one_with_them_links_none(tmp_path):
    """`infer --overlay --report`, then `infer --melanoma-threshold 0.01 --report` into the same
    OUT: the page linked the first run's overlays, which show its diagnosis, not the second's."""
    model = tiny_model_folder(tmp_path / "model", seed=0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(make_lesion(60, 80, np.random.default_rng(i))[0]).save(images / f"S{i}.jpg")
    out = tmp_path / "out"
    base = ["infer", str(images), "--out", str(out), "--model", str(model), "--report"]
    result = runner.invoke(app, [*base, "--overlay"])
    assert result.exit_code == 0, result.output
    assert [row[-1] for row in payload(out)["rows"]] == [1, 1, 1]
    result = runner.invoke(app, [*base, "--melanoma-threshold", "0.01"])
    assert result.exit_code == 0, result.output
    assert not list(out.glob("*_overlay.jpg"))  # the first run's are removed with the images redone
    assert json.loads((out / "infer.json").read_text())["overlay"] is False
    assert [row[-1] for row in payload(out)["rows"]] == [0, 0, 0]
    # what the page's rule for a skipped image rests on: a resumed run draws overlays as the run did
    result = runner.invoke(app, [*base, "--overlay", "--resume"])
    assert result.exit_code == 2 and "overlay False in the run, True now" in " ".join(result.output.split())


# --- in a real browser ----------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def render(page: Path, profile: Path, fragment: str = "") -> tuple[str, list[str]]:
    """(DOM after the page's scripts ran, console messages) of a page in headless Chromium.

    Console messages of every level are written to stderr as "...:CONSOLE..." lines with
    --enable-logging=stderr; a page of ours logs nothing, so any such line is an error.
    """
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--dump-dom", page.resolve().as_uri() + fragment]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def entries(dom: str) -> list[str]:
    return re.findall(r'<figure class="entry[^"]*" data-id="([^"]+)"', dom)


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Path:
    """A Chromium profile folder, once Chromium has shown that it renders and reports errors here."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    profile = tmp_path_factory.mktemp("chromium")
    probe = profile / "probe.html"
    probe.write_text('<html><body><p id="x"></p><script>document.getElementById("x").textContent = "ran";'
                     'console.error("probe error");</script></body></html>')
    try:
        dom, console = render(probe, profile / "profile")
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"Chromium at {CHROMIUM} did not start here: {exc}")
    if '<p id="x">ran</p>' not in dom:
        pytest.skip(f"Chromium at {CHROMIUM} cannot render a page here (no script output)")
    # the harness must see a page's console errors, or "no console errors" below proves nothing
    assert any("probe error" in line for line in console), console
    return profile / "profile"


def test_report_renders_every_entry_in_triage_order_without_console_errors(small, browser):
    dom, console = render(small / "report.html", browser)
    assert console == []
    assert entries(dom) == triage_order(small)
    assert "showing 1–12 of 12 images" in dom
    for image_id in entries(dom):
        assert f'src="{FILES}/{image_id}.jpg"' in dom and (small / FILES / f"{image_id}.jpg").is_file()


def test_report_of_many_images_pages_filters_and_sorts(tmp_path, browser):
    n = 2 * PAGE_SIZE + 30
    out = make_infer_folder(tmp_path, n, images=False)
    write_report(out)
    order = triage_order(out)
    dom, console = render(out / "report.html", browser)
    assert console == [] and entries(dom) == order[:PAGE_SIZE]
    dom, console = render(out / "report.html", browser, "#page=3")
    assert console == [] and entries(dom) == order[2 * PAGE_SIZE:]
    nevi = [i for i, row in zip(order, sorted(payload(out)["rows"], key=lambda r: order.index(r[0])))
            if row[1] == CLASS_NAMES.index("nevus")]
    dom, console = render(out / "report.html", browser, "#class=nevus")
    assert console == [] and entries(dom) == nevi[:PAGE_SIZE]
    dom, _ = render(out / "report.html", browser, "#sort=id")
    assert entries(dom) == sorted(order)[:PAGE_SIZE]
