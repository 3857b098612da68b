"""Finding inputs in the two known layouts, the training cache, and the checks on the data."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermtool.data import build_cache, find_images, load_cache, resolve_layout
from dermtool.errors import InputError
from dermtool.io import read_mask
from dermtool.preprocess import fit_mask, plan_transform, prepare

from conftest import SYNTHETIC_SIZES

SIZE = 64


def _ids(n: int) -> list[str]:
    return [f"SYN_{i:07d}" for i in range(n)]


def cache_index(out: Path, image_id: str) -> int:
    return load_cache(out).ids.index(image_id)


def _file_state(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def _write_labels(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["image_id", "melanoma", "seborrheic_keratosis"], *rows])


# --------------------------------------------------------------------------- finding files


def test_find_images_any_case_sorted_without_side_files(tmp_path):
    for name in ["b.JPG", "a.jpeg", "c.Png", "d.tif", "e.TIFF", "f.bmp", "a_superpixels.png",
                 "a_segmentation.png", ".hidden.jpg", "notes.txt", "meta.csv"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.jpg").mkdir()
    assert [p.name for p in find_images(tmp_path)] == ["a.jpeg", "b.JPG", "c.Png", "d.tif", "e.TIFF", "f.bmp"]


def test_find_images_on_a_missing_folder(tmp_path):
    with pytest.raises(InputError, match="nowhere"):
        find_images(tmp_path / "nowhere")


def test_development_layout_from_the_parent_or_images_folder(synthetic_dataset):
    for start in (synthetic_dataset, synthetic_dataset / "images"):
        layout = resolve_layout(start)
        assert layout.images == synthetic_dataset / "images"
        assert layout.masks == synthetic_dataset / "masks"
        assert layout.labels == synthetic_dataset / "labels.csv"


def test_explicit_masks_and_labels_win(synthetic_dataset, tmp_path):
    _write_labels(tmp_path / "other.csv", [["SYN_0000000", 1, 0]])
    layout = resolve_layout(synthetic_dataset, masks=tmp_path, labels=tmp_path / "other.csv")
    assert (layout.masks, layout.labels) == (tmp_path, tmp_path / "other.csv")


def test_images_only_has_no_masks_or_labels(synthetic_dataset, tmp_path):
    shutil.copytree(synthetic_dataset / "images", tmp_path / "photos")
    layout = resolve_layout(tmp_path / "photos")
    assert (layout.masks, layout.labels) == (None, None)
    report = build_cache(layout, tmp_path / "cache", size=SIZE, progress=False)
    cache = load_cache(tmp_path / "cache")
    assert report.problems == 0 and cache.masks is None
    assert (cache.labels == -1).all() and not cache.has_mask.any()


@pytest.fixture
def isic_download(synthetic_dataset, tmp_path) -> Path:
    """The synthetic data arranged as the ISIC 2017 zips unpack, superpixel files included."""
    root = tmp_path / "isic"
    data, truth = root / "ISIC-2017_Training_Data", root / "ISIC-2017_Training_Part1_GroundTruth"
    data.mkdir(parents=True)
    truth.mkdir()
    rows = list(csv.reader(open(synthetic_dataset / "labels.csv")))
    renamed = []
    for i, image in enumerate(sorted((synthetic_dataset / "images").iterdir())):
        isic_id = f"ISIC_{i:07d}"
        shutil.copy(image, data / f"{isic_id}{image.suffix}")
        shutil.copy(synthetic_dataset / "masks" / f"{image.stem}_segmentation.png",
                    truth / f"{isic_id}_segmentation.png")
        Image.new("RGBA", (8, 8), (i, 0, 0, 255)).save(data / f"{isic_id}_superpixels.png")
        renamed.append([isic_id, *rows[i + 1][1:]])
    (data / "ISIC-2017_Training_Data_metadata.csv").write_text("image_id,age_approximate,sex\n")
    _write_labels(root / "ISIC-2017_Training_Part3_GroundTruth.csv", renamed)
    return root


@pytest.mark.parametrize("start", ["ISIC-2017_Training_Data", "."])
def test_isic_download_layout_is_recognised(isic_download, tmp_path, start):
    layout = resolve_layout(isic_download / start)
    assert layout.images == isic_download / "ISIC-2017_Training_Data"
    assert layout.masks == isic_download / "ISIC-2017_Training_Part1_GroundTruth"
    assert layout.labels == isic_download / "ISIC-2017_Training_Part3_GroundTruth.csv"
    report = build_cache(layout, tmp_path / "cache", size=SIZE, progress=False)
    cache = load_cache(tmp_path / "cache")
    assert report.problems == 0
    assert cache.ids == [f"ISIC_{i:07d}" for i in range(12)]  # no *_superpixels
    assert cache.has_mask.all() and list(cache.labels) == [i % 3 for i in range(12)]


def test_real_isic_development_copy(isic_dir, tmp_path):
    layout = resolve_layout(isic_dir / "val")
    assert layout.masks == isic_dir / "val" / "masks" and layout.labels == isic_dir / "val" / "labels.csv"
    report = build_cache(layout, tmp_path / "cache", size=SIZE, progress=False)
    cache = load_cache(tmp_path / "cache")
    assert report.problems == 0 and len(cache) == 150
    assert np.bincount(cache.labels, minlength=3).tolist() == [30, 42, 78]


# --------------------------------------------------------------------------- the cache


@pytest.fixture(scope="module")
def built(tmp_path_factory, synthetic_dataset):
    out = tmp_path_factory.mktemp("cache") / "c"
    report = build_cache(resolve_layout(synthetic_dataset), out, size=SIZE, fit="pad", border=0.05,
                         margin=6, workers=2, progress=False)
    return out, report


def test_cache_arrays_and_manifest(built, synthetic_dataset):
    out, report = built
    cache = load_cache(out)
    assert report.n_images == 12 and not report.reused and report.problems == 0
    assert cache.images.shape == (12, SIZE + 12, SIZE + 12, 3) and cache.images.dtype == np.uint8
    assert cache.masks.shape == (12, SIZE, SIZE) and set(np.unique(cache.masks)) == {0, 1}
    assert isinstance(cache.images, np.memmap)
    assert cache.ids == _ids(12)
    assert list(cache.labels) == [i % 3 for i in range(12)]
    assert cache.has_mask.all()
    assert (cache.size, cache.fit, cache.meta["margin"], cache.meta["input_size"]) == (SIZE, "pad", 6, SIZE + 12)
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [r["label"] for r in rows[:3]] == ["melanoma", "seborrheic_keratosis", "nevus"]
    assert Path(rows[1]["source"]).name == "SYN_0000001.png"


def test_cache_holds_what_the_geometry_module_computes(built, synthetic_dataset):
    """One preprocessing path: the cache must equal prepare()/fit_mask() image by image."""
    out, _ = built
    cache = load_cache(out)
    for i, image_id in enumerate(cache.ids):
        h, w = SYNTHETIC_SIZES[i % len(SYNTHETIC_SIZES)]
        t = plan_transform(h, w, SIZE, "pad", 0.05, 6)
        assert cache.transforms[i] == t
        path = next((synthetic_dataset / "images").glob(f"{image_id}.*"))
        x, _ = prepare(path, SIZE, "pad", 0.05, 6)
        assert np.array_equal(cache.images[i], x)
        mask = read_mask(synthetic_dataset / "masks" / f"{image_id}_segmentation.png")
        assert np.array_equal(cache.masks[i], fit_mask(mask, t))


def test_second_run_reuses_the_cache_untouched(synthetic_dataset, tmp_path):
    layout = resolve_layout(synthetic_dataset)
    build_cache(layout, tmp_path / "c", size=SIZE, progress=False)
    before = _file_state(tmp_path / "c")
    report = build_cache(layout, tmp_path / "c", size=SIZE, progress=False)
    assert report.reused and report.n_images == 12
    assert _file_state(tmp_path / "c") == before


def test_changed_input_or_setting_rebuilds(synthetic_copy, tmp_path):
    layout = resolve_layout(synthetic_copy)
    mask_path = synthetic_copy / "masks" / "SYN_0000003_segmentation.png"
    # uncompressed, so the edited mask has the same byte size; and the same mtime second
    Image.open(mask_path).save(mask_path, compress_level=0)
    build_cache(layout, tmp_path / "c", size=SIZE, progress=False)
    before = mask_path.stat()
    Image.fromarray(np.full((150, 225), 255, np.uint8)).save(mask_path, compress_level=0)
    os.utime(mask_path, ns=(before.st_atime_ns, before.st_mtime_ns // 10**9 * 10**9 + 999))
    assert mask_path.stat().st_size == before.st_size
    report = build_cache(layout, tmp_path / "c", size=SIZE, progress=False)
    assert not report.reused
    assert load_cache(tmp_path / "c").masks[3].all()
    report = build_cache(layout, tmp_path / "c", size=SIZE // 2, progress=False)
    assert not report.reused and load_cache(tmp_path / "c").images.shape[1] == SIZE // 2


# --------------------------------------------------------------------------- data checks


@pytest.fixture(scope="module")
def messy(tmp_path_factory, synthetic_dataset):
    """Every problem the data check knows, once each, in one folder; built once."""
    root = Path(shutil.copytree(synthetic_dataset, tmp_path_factory.mktemp("messy") / "data"))
    images, masks = root / "images", root / "masks"
    # 0: mask at another size than its image (120 x 160)
    Image.fromarray(np.asarray(Image.open(masks / "SYN_0000000_segmentation.png").resize((80, 60)))).save(
        masks / "SYN_0000000_segmentation.png")
    # 1: a mask with grey levels
    grey = np.asarray(Image.open(masks / "SYN_0000001_segmentation.png")).copy()
    grey[grey == 255] = 200
    grey[:5, :5] = 100
    Image.fromarray(grey).save(masks / "SYN_0000001_segmentation.png")
    # 6: a 0/1-valued mask, which binarising at > 128 empties
    one = (np.asarray(Image.open(masks / "SYN_0000006_segmentation.png")) > 128).astype(np.uint8)
    Image.fromarray(one).save(masks / "SYN_0000006_segmentation.png")
    # 7: a label map (classes 1 and 2 on 0), which binarising at > 128 would read as empty
    lesion = np.asarray(Image.open(masks / "SYN_0000007_segmentation.png")) > 128
    labels = lesion.astype(np.uint8) * 2
    labels[:, ::2][lesion[:, ::2]] = 1
    Image.fromarray(labels).save(masks / "SYN_0000007_segmentation.png")
    # 10: a 0/128 mask, which the ISIC scorer reads as 128 = lesion and > 128 would empty
    half = (np.asarray(Image.open(masks / "SYN_0000010_segmentation.png")) > 128).astype(np.uint8) * 128
    Image.fromarray(half).save(masks / "SYN_0000010_segmentation.png")
    # 2: no mask; 3: no label row; 5: melanoma and seborrheic keratosis both 1
    (masks / "SYN_0000002_segmentation.png").unlink()
    rows = [r for r in csv.reader(open(root / "labels.csv"))][1:]
    rows = [r for r in rows if r[0] != "SYN_0000003"]
    rows = [[r[0], 1.0, 1.0] if r[0] == "SYN_0000005" else r for r in rows]
    _write_labels(root / "labels.csv", rows + [["SYN_0000099", 0.0, 0.0]])  # 99: a label, no image
    # 4: a second file with the same id; 8: truncated JPEG; 9: not an image at all
    shutil.copy(images / "SYN_0000004.jpg", images / "SYN_0000004.png")
    jpg = images / "SYN_0000008.jpg"
    jpg.write_bytes(jpg.read_bytes()[:600])
    (images / "SYN_0000009.png").write_bytes(b"this is not a png")
    out = tmp_path_factory.mktemp("messy_cache") / "c"
    return root, out, build_cache(resolve_layout(root), out, size=SIZE, progress=False)


def test_check_mask_size_mismatch_is_rescaled(messy):
    root, out, report = messy
    cache = load_cache(out)
    assert report.mask_size_mismatch == ["SYN_0000000"]
    assert cache.has_mask[0] and cache.masks[0].sum() > 0.05 * SIZE * SIZE


def test_check_non_binary_mask_is_binarised_above_128(messy):
    root, out, report = messy
    assert report.mask_nonbinary == ["SYN_0000001"]
    grey = np.asarray(Image.open(root / "masks" / "SYN_0000001_segmentation.png")) > 128
    assert np.array_equal(load_cache(out).masks[1], fit_mask(grey, load_cache(out).transforms[1]))


def test_check_zero_one_mask_is_read_as_binary_and_reported(messy):
    """0/1 and 0/128 masks: two values, the other than 0 the lesion (the ISIC scorer's rule)."""
    root, out, report = messy
    assert report.mask_zero_one == ["SYN_0000006", "SYN_0000010"] and report.mask_empty == []
    assert report.mask_nonbinary == ["SYN_0000001"]
    cache = load_cache(out)
    for image_id, value in (("SYN_0000006", 1), ("SYN_0000010", 128)):
        lesion = np.asarray(Image.open(root / "masks" / f"{image_id}_segmentation.png")) == value
        i = cache_index(out, image_id)
        assert cache.masks[i].any() and np.array_equal(cache.masks[i], fit_mask(lesion, cache.transforms[i]))


def test_check_label_map_mask_keeps_its_image_without_a_mask(messy):
    root, out, report = messy
    assert report.mask_label_map == ["SYN_0000007"] and "SYN_0000007" not in report.no_mask
    assert report.mask_empty == [] and "SYN_0000007" not in report.mask_nonbinary
    cache = load_cache(out)
    i = cache_index(out, "SYN_0000007")
    assert not cache.has_mask[i] and not cache.masks[i].any()


def test_check_label_ids_without_an_image(messy):
    root, out, report = messy
    assert report.labels_without_image == ["SYN_0000099"]


def test_check_missing_mask_and_label(messy):
    root, out, report = messy
    cache = load_cache(out)
    assert report.no_mask == ["SYN_0000002"] and not cache.has_mask[2] and not cache.masks[2].any()
    assert report.no_label == ["SYN_0000003"] and cache.labels[3] == -1


def test_check_both_labels_row_counts_as_melanoma(messy):
    root, out, report = messy
    assert report.both_labels == ["SYN_0000005"]
    assert load_cache(out).labels[cache_index(out, "SYN_0000005")] == 0


def test_check_duplicate_id_keeps_the_first_file(messy):
    root, out, report = messy
    assert report.duplicate_ids == ["SYN_0000004.png and SYN_0000004.jpg"]
    rows = {r["image_id"]: r for r in csv.DictReader(open(out / "manifest.csv"))}
    assert Path(rows["SYN_0000004"]["source"]).name == "SYN_0000004.jpg"


def test_check_unreadable_files_are_skipped_and_the_rest_cached(messy):
    root, out, report = messy
    assert sorted(Path(f).name for f, _ in report.failed) == ["SYN_0000008.jpg", "SYN_0000009.png"]
    assert all(Path(f).name in message for f, message in report.failed)
    cache = load_cache(out)
    assert report.n_images == len(cache) == 10
    assert cache.ids == [i for i in _ids(12) if i not in ("SYN_0000008", "SYN_0000009")]
    assert cache.images.shape[0] == cache.masks.shape[0] == 10
    # 2 unreadable, 1 each of size, grey levels, no mask, no label, both labels, label ids without
    # an image, label map and duplicate id, and the two 0/v masks
    assert report.problems == 12


def test_entries_and_names_the_cache_cannot_take_are_named_not_passed_over(synthetic_copy, tmp_path):
    """preprocess passed a broken link, a folder and a FIFO named like images over in silence,
    and a name that is not UTF-8 stopped it with a traceback."""
    images = synthetic_copy / "images"
    (images / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (images / "folder.png").mkdir()
    os.mkfifo(images / "pipe.jpg")
    with open(os.fsencode(images) + b"/caf\xe9.jpg", "wb") as fh:
        fh.write((images / "SYN_0000000.jpg").read_bytes())
    shutil.copy(images / "SYN_0000000.jpg", images / "cr\rname.jpg")
    report = build_cache(resolve_layout(synthetic_copy), tmp_path / "c", size=SIZE, progress=False)
    why = {Path(f).name: message for f, message in report.failed}
    assert sorted(why) == ["caf\ufffd.jpg", "cr\rname.jpg", "dangling.jpg", "folder.png", "pipe.jpg"]
    assert "a link to nothing" in why["dangling.jpg"] and "a folder" in why["folder.png"]
    assert "not a regular file" in why["pipe.jpg"] and "not valid UTF-8" in why["caf\ufffd.jpg"]
    assert "line break" in why["cr\rname.jpg"]
    assert load_cache(tmp_path / "c").ids == _ids(12)


def test_reused_cache_reports_the_same_problems(messy):
    root, out, report = messy
    again = build_cache(resolve_layout(root), out, size=SIZE, progress=False)
    assert again.reused and again.checks() == report.checks()


def test_nothing_readable_is_an_input_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(InputError, match="none of the 1 images.*a.jpg"):
        build_cache(resolve_layout(tmp_path), tmp_path / "c", size=SIZE, progress=False)
    assert not (tmp_path / "c" / "cache.json").exists()



# --------------------------------------------------------------------------- files read (issue 18)


def test_metadata_saved_as_utf16_gives_the_same_lesions(tmp_path):
    from dermtool.data import read_lesion_ids

    text = "lesion_id,image_id,dx\r\nHAM_0001,ISIC_1,nv\r\nHAM_0001,ISIC_2,nv\r\n"
    (tmp_path / "utf8.csv").write_text(text, encoding="utf-8")
    (tmp_path / "utf16.csv").write_text(text, encoding="utf-16")
    assert read_lesion_ids(tmp_path / "utf16.csv") == read_lesion_ids(tmp_path / "utf8.csv") == {
        "ISIC_1": "HAM_0001", "ISIC_2": "HAM_0001"}
    (tmp_path / "latin1.csv").write_bytes("lesion_id,image_id\nHAM_é,ISIC_1\n".encode("latin-1"))
    with pytest.raises(InputError, match="latin1.csv: the metadata CSV is not UTF-8 text"):
        read_lesion_ids(tmp_path / "latin1.csv")


@pytest.mark.parametrize("damage", ["cache.json is a list", "manifest.csv is cut", "manifest.csv is empty"])
def test_a_damaged_cache_is_one_sentence_naming_the_file(synthetic_dataset, tmp_path, damage):
    out = tmp_path / "cache"
    build_cache(resolve_layout(synthetic_dataset), out, size=SIZE, progress=False)
    name = damage.split()[0]
    if damage == "cache.json is a list":
        (out / name).write_text("[]")
    elif damage == "manifest.csv is cut":
        (out / name).write_bytes((out / name).read_bytes()[:300])
    else:
        (out / name).write_bytes(b"")
    with pytest.raises(InputError) as err:
        load_cache(out)
    assert str(err.value).startswith(f"{out / name}: the cache")


def test_a_flat_folders_own_csvs_come_before_its_parents(synthetic_dataset, tmp_path):
    """A flat folder (images, labels.csv and metadata.csv side by side) was read from its parent."""
    flat = tmp_path / "flat"
    shutil.copytree(synthetic_dataset / "images", flat)
    _write_labels(flat / "labels.csv", [["SYN_0000000", 1, 0]])
    (flat / "metadata.csv").write_text("image_id,lesion_id\nSYN_0000000,L0\n")
    _write_labels(tmp_path / "labels.csv", [["SYN_0000001", 1, 0]])  # the folder around it: second
    layout = resolve_layout(flat)
    assert (layout.images, layout.labels, layout.metadata) == (flat, flat / "labels.csv", flat / "metadata.csv")
    assert layout.searched == (flat, tmp_path)
    (flat / "labels.csv").unlink()
    assert resolve_layout(flat).labels == tmp_path / "labels.csv"
    # the development layout given by its root reads the root's files only
    layout = resolve_layout(synthetic_dataset)
    assert layout.labels == synthetic_dataset / "labels.csv" and layout.searched == (synthetic_dataset,)


def test_an_isic_archive_download_is_read_by_isic_id_and_other_metadata_is_passed_over(synthetic_dataset, tmp_path):
    # an ISIC Archive download keeps a metadata.csv keyed by isic_id beside its images; once the
    # images' own folder was searched, a metadata.csv without image_id stopped preprocess (exit 2)
    from dermtool.data import read_benign_ids, read_lesion_ids

    flat = tmp_path / "archive"
    shutil.copytree(synthetic_dataset / "images", flat)
    (flat / "metadata.csv").write_text("isic_id,attribution,lesion_id,benign_malignant\n"
                                       "SYN_0000000,x,L0,benign\nSYN_0000001 ,x,L0,malignant\n")
    assert read_lesion_ids(flat / "metadata.csv") == {"SYN_0000000": "L0", "SYN_0000001": "L0"}
    assert read_benign_ids(flat / "metadata.csv") == {"SYN_0000000"}
    report = build_cache(resolve_layout(flat), tmp_path / "cache", size=32, progress=False)
    assert report.notes == []
    lesions = {r["image_id"]: r["lesion_id"] for r in csv.DictReader(open(tmp_path / "cache" / "manifest.csv"))}
    assert lesions["SYN_0000000"] == lesions["SYN_0000001"] == "L0"
    (flat / "metadata.csv").write_text("id,attribution\nSYN_0000000,x\n")  # another tool's file
    report = build_cache(resolve_layout(flat), tmp_path / "cache2", size=32, progress=False)
    assert report.notes == [f"{flat / 'metadata.csv'} has no image_id (or isic_id) and no lesion_id column: "
                            "manifest.csv leaves lesion_id blank"]
    with pytest.raises(InputError, match=r"needs an image_id \(or isic_id\) and a lesion_id column"):
        read_lesion_ids(flat / "metadata.csv")  # split, which groups by it, still refuses it


def test_benign_ids_are_read_stripped_as_lesion_ids_are(tmp_path):
    from dermtool.data import read_benign_ids

    (tmp_path / "metadata.csv").write_text("image_id,benign_malignant\nISIC_1 ,benign\n ISIC_2,malignant\n")
    assert read_benign_ids(tmp_path / "metadata.csv") == {"ISIC_1"}


def test_a_shortened_stack_is_copied_in_bounded_chunks(tmp_path, monkeypatch):
    """One unreadable file made preprocess load the whole images stack into memory to drop its slot."""
    import tracemalloc

    import tifffile

    import dermtool.data

    path = tmp_path / "images.tif.tmp"
    stack = tifffile.memmap(path, shape=(120, 96, 96, 3), dtype=np.uint8, photometric="rgb")  # 3.3 MB
    stack[:] = np.arange(120, dtype=np.uint8)[:, None, None, None]
    stack.flush()
    del stack
    monkeypatch.setattr(dermtool.data, "_COPY_BYTES", 96 * 96 * 3 * 4, raising=False)  # 4 images a copy
    tracemalloc.start()
    try:
        dermtool.data._truncate_stack(path, 100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # the 2.8 MB kept never held in memory at once
    kept = tifffile.memmap(path, mode="r")
    assert kept.shape == (100, 96, 96, 3) and (kept[:, 0, 0, 0] == np.arange(100)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.tif.tmp"]
