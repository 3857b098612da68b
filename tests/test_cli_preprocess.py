"""`dermtool preprocess` run as a user runs it: files written and exit codes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dermtool.cli import app

SIZE = "48"


def run(*args: str):
    return CliRunner().invoke(app, ["preprocess", *map(str, args)])


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_writes_the_cache_then_reuses_it(synthetic_dataset, tmp_path):
    out = tmp_path / "cache"
    result = run(synthetic_dataset, "--out", out, "--size", SIZE, "--fit", "pad", "--margin", "4")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["cache.json", "images.tif", "manifest.csv", "masks.tif"]
    meta = json.loads((out / "cache.json").read_text())
    assert (meta["size"], meta["fit"], meta["margin"], meta["n_images"]) == (48, "pad", 4, 12)
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 12 and rows[0]["image_id"] == "SYN_0000000" and rows[0]["label"] == "melanoma"
    assert "12 images" in result.stderr
    again = run(synthetic_dataset, "--out", out, "--size", SIZE, "--fit", "pad", "--margin", "4")
    assert again.exit_code == 0 and "up to date" in again.stderr


def test_skipped_file_exits_1_and_names_it(synthetic_copy, tmp_path):
    broken = synthetic_copy / "images" / "SYN_0000004.jpg"
    broken.write_bytes(broken.read_bytes()[:500])
    result = run(synthetic_copy, "--out", tmp_path / "cache", "--size", SIZE)
    assert result.exit_code == 1
    assert "SYN_0000004.jpg" in result.stderr
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["n_images"] == 11
    # the same inputs give the same answer when the cache is reused
    again = run(synthetic_copy, "--out", tmp_path / "cache", "--size", SIZE)
    assert again.exit_code == 1 and "SYN_0000004.jpg" in again.stderr


def test_strict_fails_on_data_problems(synthetic_copy, tmp_path):
    (synthetic_copy / "masks" / "SYN_0000002_segmentation.png").unlink()
    assert run(synthetic_copy, "--out", tmp_path / "a", "--size", SIZE).exit_code == 0
    result = run(synthetic_copy, "--out", tmp_path / "b", "--size", SIZE, "--strict")
    assert result.exit_code == 1 and "SYN_0000002" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --strict") and "images without a mask (1)" in last, last


def test_label_ids_without_an_image_are_reported(synthetic_copy, tmp_path):
    with open(synthetic_copy / "labels.csv", "a") as fh:
        fh.write("ISIC_9999999,1.0,0.0\n")
    result = run(synthetic_copy, "--out", tmp_path / "c", "--size", SIZE, "--strict")
    assert result.exit_code == 1
    assert "ISIC_9999999" in result.stderr and "label ids without an image (1)" in result.stderr


@pytest.mark.parametrize("where", ["decoding", "writing"])
def test_interrupt_leaves_no_temp_files_and_says_how_to_continue(synthetic_dataset, tmp_path, monkeypatch, where):
    import dermtool.data

    if where == "decoding":  # Ctrl-C in the middle of the images
        real, calls = dermtool.data._process_one, []

        def process_then_interrupt(*args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(dermtool.data, "_process_one", process_then_interrupt)
    else:  # Ctrl-C while the finished stacks are being written out

        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(dermtool.data, "_write_manifest", interrupt)
    out = tmp_path / "cache"
    result = run(synthetic_dataset, "--out", out, "--size", SIZE, "--workers", "1")
    assert result.exit_code == 130, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert "interrupted" in message and str(out) in message and "run the same command again" in message
    assert sorted(p.name for p in out.iterdir()) == []  # no temp files, and nothing that looks like a cache


@pytest.mark.parametrize("case", ["images", "masks", "labels", "fit", "out_is_file", "bad_csv", "unreadable"])
def test_bad_input_exits_2_with_one_line(synthetic_dataset, tmp_path, case):
    args = [synthetic_dataset, "--out", tmp_path / "cache", "--size", SIZE]
    expect = str(tmp_path)
    if case == "images":
        args[0] = tmp_path / "no_such_folder"
    elif case == "masks":
        args += ["--masks", tmp_path / "no_masks"]
    elif case == "labels":
        args += ["--labels", tmp_path / "no.csv"]
    elif case == "fit":
        args += ["--fit", "crop"]
        expect = "crop"
    elif case == "out_is_file":
        (tmp_path / "cache").write_text("")
    elif case == "bad_csv":
        (tmp_path / "bad.csv").write_text("image_id,mel\nSYN_0000000,1\n")
        args += ["--labels", tmp_path / "bad.csv"]
        expect = "bad.csv"
    elif case == "unreadable":
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "x.jpg").write_bytes(b"nope")
        args[0] = tmp_path / "imgs"
        expect = "x.jpg"
    result = run(*args)
    assert result.exit_code == 2
    assert expect in one_line_error(result)


@pytest.mark.parametrize("content, fragment", [
    (b"", "the id list is empty"),
    (b"# only a comment\n\n", "lists no image id"),
    ("SYN_0000001\nSYN_\xe9\n".encode("latin-1"), "the id list is not UTF-8 text"),
])
def test_a_bad_id_list_is_one_line_naming_it(synthetic_dataset, tmp_path, content, fragment):
    """An empty --ids file gave a tifffile ValueError traceback; a Latin-1 one a UnicodeDecodeError."""
    ids = tmp_path / "ids.txt"
    ids.write_bytes(content)
    result = run(synthetic_dataset, "--out", tmp_path / "cache", "--size", SIZE, "--ids", ids)
    assert result.exit_code == 2, result.output
    message = one_line_error(result)
    assert str(ids) in message and fragment in message
    assert not (tmp_path / "cache").exists()


def test_an_id_list_and_labels_saved_as_utf16_by_windows_tools_are_read(synthetic_copy, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("SYN_0000001\r\nSYN_0000002\r\n", encoding="utf-16")  # Notepad's "Unicode"
    labels = synthetic_copy / "labels.csv"
    labels.write_bytes(labels.read_text().encode("utf-16"))
    out = tmp_path / "cache"
    result = run(synthetic_copy, "--out", out, "--size", SIZE, "--ids", ids)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [r["image_id"] for r in rows] == ["SYN_0000001", "SYN_0000002"] and all(r["label"] for r in rows)


def test_a_full_disk_is_said_so_not_a_byte_count(synthetic_dataset, tmp_path, monkeypatch):
    """numpy's and tifffile's short write says "786432 requested and 515004 written"."""
    import dermtool.data

    def short_write(*args, **kwargs):
        raise OSError("786432 requested and 515004 written")

    monkeypatch.setattr(dermtool.data, "_write_manifest", short_write)
    out = tmp_path / "cache"
    result = run(synthetic_dataset, "--out", out, "--size", SIZE)
    assert result.exit_code == 2, result.output
    assert one_line_error(result) == f"error: {out}: cannot write the cache (the disk is full)."
    assert sorted(p.name for p in out.iterdir()) == []


def test_python_dash_m_entry_point(synthetic_dataset, tmp_path):
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "dermtool", "preprocess", str(synthetic_dataset / "images"),
                           "--out", str(tmp_path / "c"), "--size", SIZE, "--workers", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c" / "cache.json").is_file() and "data check" in proc.stderr


@pytest.mark.skipif(shutil.which("dermtool") is None, reason="dermtool script not installed")
def test_bad_path_through_the_installed_script(tmp_path):
    proc = subprocess.run(["dermtool", "preprocess", str(tmp_path / "missing"), "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing" in proc.stderr


def test_a_label_row_of_zeros_beside_a_nevus_column_gets_no_class(synthetic_copy, tmp_path):
    """The argmax of three 0s made it a melanoma, while score refused the same row."""
    labels = synthetic_copy / "labels.csv"
    rows = list(csv.reader(open(labels)))
    header = rows[0]
    table = [["image_id", "melanoma", "seborrheic_keratosis", "nevus"]]
    for row in rows[1:]:
        mel, sk = float(row[header.index("melanoma")]), float(row[header.index("seborrheic_keratosis")])
        table.append([row[0], mel, sk, 0.0 if row[0] == "SYN_0000002" else 1.0 - mel - sk])
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows(table)
    result = run(synthetic_copy, "--out", tmp_path / "cache", "--size", SIZE, "--strict")
    assert result.exit_code == 1 and "every class 0 beside a nevus column" in " ".join(result.stderr.split())
    manifest = {r["image_id"]: r for r in csv.DictReader(open(tmp_path / "cache" / "manifest.csv"))}
    assert (manifest["SYN_0000002"]["label"], manifest["SYN_0000002"]["class_index"]) == ("", "-1")


def test_out_may_not_be_the_images_folder(synthetic_copy, tmp_path):
    """An images.tif of the user's was replaced by the cache stack."""
    images = synthetic_copy / "images"
    mine = images / "images.tif"
    shutil.copy(next(images.glob("*.png")), mine)
    before = mine.read_bytes()
    assert "is the images folder" in one_line_error(run(images, "--out", images, "--size", SIZE))
    assert mine.read_bytes() == before


def test_a_damaged_cache_is_rebuilt_and_named_where_it_is_read(synthetic_dataset, tmp_path):
    """A cut images.tif gave a traceback (mmap length is greater than file size) and was never rebuilt."""
    from dermtool.data import load_cache
    from dermtool.errors import InputError

    out = tmp_path / "cache"
    assert run(synthetic_dataset, "--out", out, "--size", SIZE).exit_code == 0
    whole = (out / "images.tif").read_bytes()
    os.truncate(out / "images.tif", 20000)
    with pytest.raises(InputError, match="images.tif: damaged"):
        load_cache(out)
    result = run(synthetic_dataset, "--out", out, "--size", SIZE)
    assert result.exit_code == 0 and "up to date" not in result.stderr
    assert (out / "images.tif").read_bytes() == whole
    (out / "images.tif").unlink()
    with pytest.raises(InputError, match="images.tif: missing from the cache"):
        load_cache(out)


@pytest.mark.parametrize("args, words", [
    (["--fit", "squash", "--border", "0.5"], "--fit squash fills the square"),
    (["--margin", "100000"], "--margin"),
    (["--size", "100000"], "--size"),
])
def test_options_that_do_nothing_or_too_much_are_refused(synthetic_dataset, tmp_path, args, words):
    result = run(synthetic_dataset, "--out", tmp_path / "cache", *args)
    assert result.exit_code == 2 and words in result.output, result.output
    assert not (tmp_path / "cache").exists()


def test_a_disk_too_full_for_the_stacks_is_said_so_and_leaves_no_temp_files(synthetic_dataset, tmp_path,
                                                                              monkeypatch, no_space):
    """The stacks were sparse memory maps: a full disk killed preprocess with SIGBUS (exit 135, no
    message) and left images.tif.tmp and masks.tif.tmp filling it."""
    calls = []

    def full(fd, offset, length):
        calls.append(length)
        raise no_space("")

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "cache"
    result = run(synthetic_dataset, "--out", out, "--size", SIZE)
    assert result.exit_code == 2, result.output
    assert one_line_error(result) == f"error: {out}: cannot write the cache (the disk is full)."
    assert calls and calls[0] >= 12 * 48 * 48 * 3  # the whole images stack is reserved
    assert sorted(p.name for p in out.iterdir()) == []


def _isic_root(synthetic_dataset, tmp_path):
    root = tmp_path / "isic"
    shutil.copytree(synthetic_dataset / "images", root / "ISIC-2017_Training_Data")
    shutil.copytree(synthetic_dataset / "masks", root / "ISIC-2017_Training_Part1_GroundTruth")
    shutil.copy(synthetic_dataset / "labels.csv", root / "ISIC-2017_Training_Part3_GroundTruth.csv")
    return root


def test_out_may_not_be_the_folder_given_and_a_caches_stacks_are_never_input(synthetic_dataset, tmp_path):
    """preprocess ROOT --out ROOT was taken; every later run of ROOT then read images.tif and
    masks.tif as its only two images."""
    root = _isic_root(synthetic_dataset, tmp_path)
    message = one_line_error(run(root, "--out", root, "--size", SIZE))
    assert f"error: {root}: is the folder given as input" in message
    assert not (root / "cache.json").exists() and not (root / "images.tif").exists()
    # a cache an older dermtool wrote there: its stacks are not images, the layout is still found
    assert run(root, "--out", tmp_path / "c1", "--size", SIZE).exit_code == 0
    for name in ("images.tif", "masks.tif", "manifest.csv", "cache.json"):
        shutil.copy(tmp_path / "c1" / name, root / name)
    result = run(root, "--out", tmp_path / "c2", "--size", SIZE, "--strict")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "c2" / "manifest.csv")))
    assert [r["image_id"] for r in rows] == [f"SYN_{i:07d}" for i in range(12)]


def test_metadata_without_lesion_id_is_read_and_said(synthetic_copy, tmp_path):
    """ISIC 2020's metadata (patient_id, no lesion_id) made preprocess refuse the folder."""
    with open(synthetic_copy / "metadata.csv", "w", newline="") as fh:
        fh.write("image_id,patient_id,benign_malignant\n")
        fh.writelines(f"SYN_{i:07d},P{i // 3},benign\n" for i in range(12))
    out = tmp_path / "cache"
    result = run(synthetic_copy, "--out", out, "--size", SIZE)
    assert result.exit_code == 0, result.output
    assert (f"note: {synthetic_copy / 'metadata.csv'} has no lesion_id column: manifest.csv leaves lesion_id "
            "blank") in " ".join(result.stderr.split())
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 12 and all(r["lesion_id"] == "" for r in rows)


def test_an_id_list_is_checked_alone(synthetic_copy, tmp_path):
    """Files outside the id list failed its data check (and --strict); a listed file preprocess
    cannot take was said to have "no image"."""
    images = synthetic_copy / "images"
    shutil.copy(images / "SYN_0000001.png", images / "SYN_0000001.jpg")  # a duplicate id, not listed
    (images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # a link to nothing, not listed
    shutil.copy(images / "SYN_0000000.jpg", images / "=1.jpg")  # a name the manifest cannot hold
    ids = tmp_path / "ids.txt"
    ids.write_text("SYN_0000003\nSYN_0000004\n")
    result = run(synthetic_copy, "--out", tmp_path / "a", "--size", SIZE, "--ids", ids, "--strict")
    assert result.exit_code == 0, result.output
    assert "gone.jpg" not in result.stderr and "=1.jpg" not in result.stderr
    ids.write_text("SYN_0000003\n=1\n")
    result = run(synthetic_copy, "--out", tmp_path / "b", "--size", SIZE, "--ids", ids)
    assert result.exit_code == 1, result.output
    assert "no image" not in result.stderr
    assert f"skipped {images / '=1.jpg'}: its name starts with '='" in " ".join(result.stderr.split())
    ids.write_text("=1\n")
    message = one_line_error(run(synthetic_copy, "--out", tmp_path / "c", "--size", SIZE, "--ids", ids))
    assert f"no usable image; the first: {images / '=1.jpg'}: its name starts with '='" in message


def test_a_folder_whose_name_is_not_utf8_is_cached_and_its_manifest_reads_back(synthetic_dataset, tmp_path):
    """A Latin-1 folder name (a share from another system) stopped preprocess with a
    UnicodeEncodeError traceback while writing manifest.csv."""
    from pathlib import Path

    from dermtool.data import load_cache

    data = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    shutil.copytree(synthetic_dataset, data)
    out = tmp_path / "cache"
    result = run(data, "--out", out, "--size", SIZE)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    rows = list(csv.DictReader(open(out / "manifest.csv", encoding="utf-8")))
    assert len(rows) == 12 and rows[0]["source"].endswith("caf\\xe9/images/SYN_0000000.jpg")
    assert len(load_cache(out)) == 12
