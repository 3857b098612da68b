"""`dermtool split` run as a user runs it: which images it lists, how it reads metadata.csv, and
what split.json records; and train's note on validation images that are also training's."""

from __future__ import annotations

import csv
import json
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dermtool.cli import app
from dermtool.synthetic import write_dataset


def split(*args) -> object:
    return CliRunner().invoke(app, ["split", *map(str, args)])


def text_of(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def write_metadata(path: Path, rows: list[list[str]], header=("lesion_id", "image_id")) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([list(header), *rows])


def sides(out: Path) -> tuple[list[str], list[str]]:
    return (out / "train.txt").read_text().split(), (out / "val.txt").read_text().split()


@pytest.fixture
def data(tmp_path) -> Path:
    """12 labelled images (SYN_0000000 ...), no metadata.csv yet."""
    return write_dataset(tmp_path / "d", 12, rng_seed=3, sizes=[(30, 40)], formats=("jpg",))


def two_per_lesion(image_id: str) -> str:
    return f"HAM_{int(image_id[4:]) // 2:04d}"


IDS = [f"SYN_{i:07d}" for i in range(12)]


# --------------------------------------------------------------------------- metadata.csv


def test_metadata_ids_are_read_stripped_so_no_lesion_is_on_both_sides(data, tmp_path):
    """image_ids with a trailing space matched no file: the split went by image while split.json
    said lesion_id, and lesions landed on both sides."""
    from dermtool.data import read_lesion_ids

    write_metadata(data / "metadata.csv", [[two_per_lesion(i), f"{i} "] for i in IDS])
    assert read_lesion_ids(data / "metadata.csv") == {i: two_per_lesion(i) for i in IDS}
    for seed in range(4):
        out = tmp_path / f"s{seed}"
        result = split(data, "--out", out, "--fraction", "0.5", "--seed", seed)
        assert result.exit_code == 0, result.output
        train, val = sides(out)
        assert sorted(train + val) == IDS
        assert not {two_per_lesion(i) for i in train} & {two_per_lesion(i) for i in val}
        assert json.loads((out / "split.json").read_text())["group_by"] == "lesion_id"


@pytest.mark.parametrize("written", ["{}.jpg", "syn_{}"])
def test_metadata_whose_ids_match_no_image_is_refused_with_an_example_of_each(data, tmp_path, written):
    """File names ("ISIC_1.jpg") or another case in the image_id column matched nothing, silently."""
    write_metadata(data / "metadata.csv", [[two_per_lesion(i), written.format(i if "{}." in written else i[4:])]
                                           for i in IDS])
    result = split(data, "--out", tmp_path / "s")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    message = " ".join(result.output.split())
    assert lines[0].startswith("error:") and "Traceback" not in result.output
    example = written.format("SYN_0000000" if "{}." in written else "0000000")
    assert str(data / "metadata.csv") in message and f"'{example}' in the CSV" in message
    assert "'SYN_0000000' from the files" in message
    assert not (tmp_path / "s").exists()


def test_images_without_a_metadata_row_are_counted_in_a_note(data, tmp_path):
    write_metadata(data / "metadata.csv", [[two_per_lesion(i), i] for i in IDS[:8]])
    result = split(data, "--out", tmp_path / "s", "--fraction", "0.5")
    assert result.exit_code == 0, result.output
    assert (f"note: 4 image(s) have no row in {data / 'metadata.csv'} (SYN_0000008, SYN_0000009, SYN_0000010, ...): "
            "each is its own group") in text_of(result)
    train, val = sides(tmp_path / "s")
    assert not {two_per_lesion(i) for i in train if i in IDS[:8]} & {two_per_lesion(i) for i in val if i in IDS[:8]}


def test_one_image_under_two_lesions_is_refused_and_a_repeated_row_is_not(data, tmp_path):
    """The last row won, silently, and put the image's lesion on both sides."""
    from dermtool.data import read_lesion_ids

    rows = [[two_per_lesion(i), i] for i in IDS]
    write_metadata(data / "metadata.csv", rows + [rows[0]])  # the same row twice: one row
    assert read_lesion_ids(data / "metadata.csv") == {i: two_per_lesion(i) for i in IDS}
    write_metadata(data / "metadata.csv", rows + [["HAM_9999", IDS[0]]])
    result = split(data, "--out", tmp_path / "s")
    assert result.exit_code == 2, result.output
    assert (f"error: {data / 'metadata.csv'}: image_id SYN_0000000 has the lesion_id 'HAM_0000' at row 2 and "
            "'HAM_9999' at row 14;") in text_of(result)
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- a flat folder


def test_a_flat_folder_is_split_by_its_own_labels_and_metadata(data, tmp_path):
    """labels.csv and metadata.csv beside the images were looked for in the folder above, and the
    note said there was no labels.csv "in" the folder that held it."""
    flat = tmp_path / "flat"
    shutil.copytree(data / "images", flat)
    shutil.copy(data / "labels.csv", flat / "labels.csv")
    write_metadata(flat / "metadata.csv", [[two_per_lesion(i), i] for i in IDS])
    result = split(flat, "--out", tmp_path / "s", "--fraction", "0.5")
    assert result.exit_code == 0, result.output
    assert "no labels.csv" not in result.output and "groups by lesion_id" in text_of(result)
    train, val = sides(tmp_path / "s")
    assert not {two_per_lesion(i) for i in train} & {two_per_lesion(i) for i in val}
    # without them, the note names each folder searched
    (flat / "labels.csv").unlink()
    (flat / "metadata.csv").unlink()
    result = split(flat, "--out", tmp_path / "s2")
    assert result.exit_code == 0, result.output
    assert f"note: no labels.csv in {flat} or {tmp_path}:" in text_of(result)
    assert f"note: no metadata.csv in {flat} or {tmp_path};" in text_of(result)


# --------------------------------------------------------------------------- the ids listed


def test_split_lists_only_ids_preprocess_takes_and_the_lists_read_back_whole(data, tmp_path):
    """An id starting with '#' was listed but read back as a comment (the cache silently lacked it);
    '=1' and ' lead' were listed, and preprocess --ids then said they had no image."""
    images = data / "images"
    for name in ("#1.jpg", "=1.jpg", " lead.jpg"):
        shutil.copy(images / "SYN_0000000.jpg", images / name)
    result = split(data, "--out", tmp_path / "s", "--fraction", "0.5")
    assert result.exit_code == 0, result.output
    text = text_of(result)
    assert f"skipped {images / '=1.jpg'}: its name starts with '=', which a spreadsheet opening manifest.csv" in text
    assert f"skipped {str(images / ' lead.jpg')!r}: its name starts or ends with a space" in text
    assert "note: 1 image(s) whose id starts with '#' (#1) left out" in text
    train, val = sides(tmp_path / "s")
    assert sorted(train + val) == IDS
    for side, ids in (("train", train), ("val", val)):
        out = tmp_path / side
        done = CliRunner().invoke(app, ["preprocess", str(data), "--out", str(out), "--size", "32", "--strict",
                                        "--ids", str(tmp_path / "s" / f"{side}.txt")])
        assert done.exit_code == 0, done.output
        assert json.loads((out / "cache.json").read_text())["n_images"] == len(ids)


def test_split_json_command_runs_as_it_is_in_a_shell(data, tmp_path):
    """Paths with a space were written unquoted: the command did not run."""
    spaced = Path(shutil.copytree(data, tmp_path / "my data"))
    out = tmp_path / "split out"
    assert split(spaced, "--out", out, "--fraction", "0.3", "--seed", "7").exit_code == 0
    command = json.loads((out / "split.json").read_text())["command"]
    argv = shlex.split(command)
    assert argv[:2] == ["dermtool", "split"] and str(spaced) in argv and str(out) in argv
    again = tmp_path / "again"
    argv[argv.index(str(out))] = str(again)
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 0, result.output
    assert sides(again) == sides(out)


# --------------------------------------------------------------------------- train's note


def test_train_notes_validation_images_and_lesions_that_are_also_training_data(data, tmp_path):
    """Only a cache given twice by path was noted, not two caches that share images or lesions."""
    from dermtool.data import build_cache, resolve_layout
    from dermtool.train import check_cache_overlap

    write_metadata(data / "metadata.csv", [[two_per_lesion(i), i] for i in IDS])
    layout = resolve_layout(data)
    build_cache(layout, tmp_path / "train", size=16, progress=False, ids=IDS[:6])
    build_cache(layout, tmp_path / "val", size=16, progress=False, ids=IDS[5:])  # image 5; lesions 2 (4, 5)
    build_cache(layout, tmp_path / "apart", size=16, progress=False, ids=IDS[6:])
    notes = []
    check_cache_overlap([tmp_path / "train"], [tmp_path / "val", tmp_path / "apart"], notes.append)
    assert notes == [f"note: validation cache {tmp_path / 'val'}: 1 of its 7 images (e.g. SYN_0000005) and "
                     "1 of its 4 lesions (e.g. HAM_0002) are also in the training data, so the run is validated "
                     "on what it learns from"]


def _renamed_nfd(data: Path) -> list[str]:
    """The images (and masks) of `data` renamed 'lés_K', every odd one in NFD as macOS writes
    names, with labels.csv rewritten in NFC; returns the ids as the CSVs write them (NFC)."""
    import unicodedata

    nfc = []
    rows = list(csv.reader(open(data / "labels.csv")))
    for row in rows[1:]:
        k = int(row[0][4:])
        row[0] = f"l\u00e9s_{k:02d}"
        on_disk = unicodedata.normalize("NFD", row[0]) if k % 2 else row[0]
        (data / "images" / f"SYN_{k:07d}.jpg").rename(data / "images" / f"{on_disk}.jpg")
        (data / "masks" / f"SYN_{k:07d}_segmentation.png").rename(data / "masks" / f"{on_disk}_segmentation.png")
        nfc.append(row[0])
    with open(data / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return nfc


def test_a_lesion_whose_files_are_named_in_nfd_stays_on_one_side(data, tmp_path):
    """Files named in NFD (macOS) and metadata in NFC: split read the odd images as lesions of
    their own and without a label, and lesions landed on both sides."""
    import unicodedata

    ids = _renamed_nfd(data)
    lesion = {i: f"L{int(i[-2:]) // 2}" for i in ids}  # each lesion one NFC and one NFD file
    write_metadata(data / "metadata.csv", [[lesion[i], i] for i in ids])
    for seed in range(3):
        out = tmp_path / f"s{seed}"
        result = split(data, "--out", out, "--fraction", "0.5", "--seed", seed)
        assert result.exit_code == 0, result.output
        assert "without" not in text_of(result) and "no row" not in text_of(result), result.output
        train, val = (sorted(unicodedata.normalize("NFC", i) for i in side) for side in sides(out))
        assert sorted(train + val) == sorted(ids)
        assert not {lesion[i] for i in train} & {lesion[i] for i in val}
        assert f"({len({lesion[i] for i in val})} groups by lesion_id)" in text_of(result)


def test_preprocess_finds_the_label_mask_and_lesion_of_a_file_named_in_nfd(data, tmp_path):
    import numpy as np

    from dermtool.data import build_cache, load_cache, resolve_layout

    ids = _renamed_nfd(data)
    write_metadata(data / "metadata.csv", [[f"L{int(i[-2:]) // 2}", i] for i in ids])
    report = build_cache(resolve_layout(data), tmp_path / "cache", size=32, progress=False)
    assert not (report.no_label or report.no_mask or report.labels_without_image), report
    rows = list(csv.DictReader(open(tmp_path / "cache" / "manifest.csv", encoding="utf-8")))
    assert len(rows) == 12 and all(r["label"] and r["has_mask"] == "1" and r["lesion_id"] for r in rows)
    assert np.asarray(load_cache(tmp_path / "cache").masks).reshape(12, -1).any(axis=1).all()
