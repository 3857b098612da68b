"""DICOM input: `infer`, `preprocess` and `report` read *.dcm files the suite writes itself.

Checked: an uncompressed RGB file decodes to its exact pixels and a JPEG-baseline YBR_FULL_422
file to the colours of its source (converted from YCbCr); the results of infer and preprocess
on DICOM equal those on the same pixels as PNG; a CT slice (monochrome), a multi-frame file
and a file that is not DICOM are named and skipped while the rest is done; report draws the
DICOM images' thumbnails.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_infer import models  # noqa: F401  (the tiny joint/seg/cls model folders)
from typer.testing import CliRunner

from dermtool.cli import app
from dermtool.errors import InputError
from dermtool.synthetic import make_lesion

pydicom = pytest.importorskip("pydicom", minversion="3.0")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, JPEGBaseline8Bit,  # noqa: E402
                         SegmentationStorage, VLPhotographicImageStorage, generate_uid)

from dermtool.dicom import read_dicom_rgb, write_segmentation  # noqa: E402

runner = CliRunner()
STUDY = generate_uid()


def _dataset(sop_class, rows: int, cols: int, interpretation: str, samples: int, bits: int = 8) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "XC" if sop_class == VLPhotographicImageStorage else "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = interpretation
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    # the patient and study a DICOM SEG copies from its source
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "DERM-0001", "Test^Patient", "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, generate_uid()
    ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "20260101", "120000", "", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    return ds


def write_rgb_dicom(path: Path, rgb: np.ndarray, frames: int = 1) -> None:
    """An uncompressed VL Photographic image (RGB, 8 bits); `frames` > 1 repeats the frame."""
    ds = _dataset(VLPhotographicImageStorage, *rgb.shape[:2], "RGB", 3)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(np.stack([rgb] * frames)).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_jpeg_dicom(path: Path, rgb: np.ndarray) -> None:
    """A JPEG-baseline VL Photographic image, YBR_FULL_422 as its standard says (Pillow encodes
    YCbCr with 4:2:2 chroma subsampling; pydicom only wraps the bytes)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, subsampling=1)  # 1 = 4:2:2
    ds = _dataset(VLPhotographicImageStorage, *rgb.shape[:2], "YBR_FULL_422", 3)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds.save_as(path, enforce_file_format=True)


def write_ct_dicom(path: Path) -> None:
    ds = _dataset(CTImageStorage, 32, 32, "MONOCHROME2", 1, bits=16)
    ds.PixelData = np.arange(32 * 32, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """dicom/: two colour photographs (uncompressed RGB, JPEG YBR_FULL_422), a CT slice, a
    multi-frame file and a file that is not DICOM; png/: the two photographs' decoded pixels as
    PNG under the same names."""
    root = tmp_path_factory.mktemp("dicom")
    dicom, png = root / "dicom", root / "png"
    dicom.mkdir()
    png.mkdir()
    sources = {}
    for name, (h, w), writer in (("ISIC_rgb", (120, 160), write_rgb_dicom), ("ISIC_ycc", (161, 97), write_jpeg_dicom)):
        rgb, _, _ = make_lesion(h, w, np.random.default_rng(len(sources)), cls=len(sources))
        writer(dicom / f"{name}.dcm", rgb)
        Image.fromarray(read_dicom_rgb(dicom / f"{name}.dcm")).save(png / f"{name}.png")
        sources[name] = rgb
    write_ct_dicom(dicom / "ct_slice.dcm")
    write_rgb_dicom(dicom / "multi.dcm", sources["ISIC_rgb"][:40, :40].copy(), frames=3)
    (dicom / "broken.dcm").write_bytes(b"not a DICOM file at all")
    return {"dicom": dicom, "png": png, "sources": sources}


def test_colour_photographs_decode_to_rgb(folders):
    rgb = read_dicom_rgb(folders["dicom"] / "ISIC_rgb.dcm")
    np.testing.assert_array_equal(rgb, folders["sources"]["ISIC_rgb"])  # uncompressed: exact
    ycc = read_dicom_rgb(folders["dicom"] / "ISIC_ycc.dcm").astype(int)
    source = folders["sources"]["ISIC_ycc"].astype(int)
    assert ycc.shape == source.shape
    # JPEG at quality 95 moves a colour by a few levels; unconverted YCbCr read as RGB would be
    # off by tens (Y, Cb, Cr of a skin tone are nothing like its R, G, B)
    assert np.abs(ycc - source).mean() < 4
    assert np.abs(ycc.mean(axis=(0, 1)) - source.mean(axis=(0, 1))).max() < 2


@pytest.mark.parametrize("name, words", [
    ("ct_slice.dcm", "CT Image Storage image (MONOCHROME2), not a colour photograph"),
    ("multi.dcm", "multi-frame VL Photographic Image Storage image (3 frames)"),
    ("broken.dcm", "not a readable DICOM file"),
])
def test_other_dicom_files_are_refused_by_name(folders, name, words):
    with pytest.raises(InputError, match=re.escape(words)) as caught:
        read_dicom_rgb(folders["dicom"] / name)
    assert str(folders["dicom"] / name) in str(caught.value)


def test_a_frame_declared_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    """A 3.5 MB file declaring 15000 x 15000 pixels was decoded (7.9 GB of memory) while the same
    JPEG as a .jpg was refused: the header's Rows x Columns are now checked first."""
    import pydicom.dataset

    rgb, _, _ = make_lesion(40, 60, np.random.default_rng(3))
    path = tmp_path / "bomb.dcm"
    write_jpeg_dicom(path, rgb)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 15000, 15000
    ds.save_as(path, enforce_file_format=True)

    def decoded(self):
        raise AssertionError("the pixels were decoded before the size was checked")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(decoded))
    with pytest.raises(InputError, match=re.escape("15000 x 15000 pixels (225 megapixels) is over the 200-megapixel limit")):
        read_dicom_rgb(path)


def _rows(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as fh:
        return {row[0]: row for row in list(csv.reader(fh))[1:]}


@pytest.fixture(scope="module")
def inferred(folders, models, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("dicom_infer")
    results = {}
    for kind in ("dicom", "png"):
        out = root / kind
        results[kind] = (runner.invoke(app, ["infer", str(folders[kind]), "--out", str(out), "--model",
                                             str(models["joint"]), "--report"]), out)
    return results


def test_infer_on_dicom_equals_infer_on_the_same_pixels_as_png(inferred):
    (dicom_result, dicom_out), (png_result, png_out) = inferred["dicom"], inferred["png"]
    assert png_result.exit_code == 0, png_result.output
    rows = _rows(dicom_out / "predictions.csv")
    assert sorted(rows) == ["ISIC_rgb", "ISIC_ycc"]  # the id is the file name without .dcm
    assert rows == _rows(png_out / "predictions.csv")
    for image_id in rows:
        dicom_mask = np.asarray(Image.open(dicom_out / f"{image_id}_segmentation.png"))
        np.testing.assert_array_equal(dicom_mask, np.asarray(Image.open(png_out / f"{image_id}_segmentation.png")))
        assert 0 < (dicom_mask > 128).sum() < dicom_mask.size  # a lesion, not an empty or full mask


def test_infer_names_and_skips_what_is_not_a_colour_photograph(inferred):
    result, out = inferred["dicom"]
    assert result.exit_code == 1, result.output  # as for any unreadable file: the rest is done
    text = " ".join(result.output.split())
    for name in ("ct_slice.dcm", "multi.dcm", "broken.dcm"):
        assert name in text
    assert "MONOCHROME2" in text and "3 frames" in text
    assert "done: 2 images" in text
    assert not (out / "ct_slice_segmentation.png").exists()


def test_report_draws_the_dicom_thumbnails(inferred):
    _, out = inferred["dicom"]
    for image_id in ("ISIC_rgb", "ISIC_ycc"):
        with Image.open(out / "report_files" / f"{image_id}.jpg") as thumb:
            assert max(thumb.size) > 32  # drawn from the decoded DICOM pixels


def test_preprocess_caches_dicom_as_it_caches_png(folders, tmp_path):
    caches = {}
    for kind in ("dicom", "png"):
        result = runner.invoke(app, ["preprocess", str(folders[kind]), "--out", str(tmp_path / kind), "--size", "32"])
        assert result.exit_code == (1 if kind == "dicom" else 0), result.output
        with open(tmp_path / kind / "manifest.csv", newline="") as fh:
            manifest = list(csv.DictReader(fh))
        caches[kind] = (tifffile.imread(tmp_path / kind / "images.tif"), manifest)
    (dicom_images, dicom_rows), (png_images, png_rows) = caches["dicom"], caches["png"]
    assert [r["image_id"] for r in dicom_rows] == ["ISIC_rgb", "ISIC_ycc"]
    np.testing.assert_array_equal(dicom_images, png_images)
    assert [(r["orig_h"], r["orig_w"]) for r in dicom_rows] == [("120", "160"), ("161", "97")]


def test_dicom_seg_is_the_mask_in_the_source_study_referencing_it(folders, models, tmp_path):  # noqa: F811
    pytest.importorskip("highdicom")
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(folders["dicom"]), "--out", str(out), "--model", str(models["seg"]),
                                 "--dicom-seg"])
    assert result.exit_code == 1 and "done: 2 images" in " ".join(result.output.split()), result.output
    for image_id in ("ISIC_rgb", "ISIC_ycc"):
        seg = pydicom.dcmread(out / f"{image_id}_segmentation.dcm")
        source = pydicom.dcmread(folders["dicom"] / f"{image_id}.dcm")
        assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
        assert (seg.StudyInstanceUID, seg.PatientID) == (STUDY, "DERM-0001")
        assert seg.SeriesInstanceUID != source.SeriesInstanceUID  # a new series in the same study
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert seg.SegmentSequence[0].SegmentLabel == "lesion"
        png = np.asarray(Image.open(out / f"{image_id}_segmentation.png")) > 128
        assert 0 < png.sum() < png.size
        np.testing.assert_array_equal(seg.pixel_array.astype(bool), png)
    assert not list(out.glob("ct_slice*")) and not list(out.glob(".*.tmp"))


def test_dicom_seg_of_a_source_without_its_study_is_refused_by_name(folders, tmp_path):
    pytest.importorskip("highdicom")
    source = tmp_path / "anonymous.dcm"
    ds = pydicom.dcmread(folders["dicom"] / "ISIC_rgb.dcm")
    del ds.StudyInstanceUID
    ds.save_as(source)
    with pytest.raises(InputError, match=re.escape(f"{source}: has no StudyInstanceUID, which its DICOM SEG must copy")):
        write_segmentation(source, np.ones((120, 160), bool), tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_an_empty_samples_per_pixel_is_named_not_a_crash(folders, tmp_path):
    """int(None) of an empty SamplesPerPixel stopped the whole run with a TypeError."""
    ds = pydicom.dcmread(folders["dicom"] / "ISIC_rgb.dcm")
    ds.SamplesPerPixel = None
    ds.save_as(tmp_path / "empty_spp.dcm")
    with pytest.raises(InputError, match="RGB with no samples per pixel, not 3"):
        read_dicom_rgb(tmp_path / "empty_spp.dcm")


def test_a_header_a_dicom_seg_cannot_copy_fails_that_image_only(folders, models, tmp_path):  # noqa: F811
    """highdicom's ValueError on PatientSex 'X' stopped the run; the images already written had no rows."""
    pytest.importorskip("highdicom")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(folders["dicom"] / "ISIC_rgb.dcm", images / "a_good.dcm")
    ds = pydicom.dcmread(folders["dicom"] / "ISIC_rgb.dcm")
    ds.PatientSex, ds.SOPInstanceUID = "X", generate_uid()
    ds.save_as(images / "b_sex_x.dcm")
    shutil.copy(folders["dicom"] / "ISIC_ycc.dcm", images / "c_good.dcm")
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(images), "--out", str(out), "--model", str(models["seg"]),
                                 "--dicom-seg", "--overlay"])
    assert result.exit_code == 1, result.output
    assert "b_sex_x.dcm: its header cannot be copied into a DICOM SEG" in " ".join(result.output.split())
    assert sorted(_rows(out / "predictions.csv")) == ["a_good", "c_good"]
    assert not list(out.glob("b_sex_x*"))  # neither its overlay nor a mask: all of an image's outputs or none
    assert len(list(out.glob("c_good*"))) == 3


@pytest.mark.parametrize("rows, cols", [(40, 50), (30, 60)])
def test_pixel_data_longer_than_rows_and_columns_say_is_refused_not_read_scrambled(tmp_path, rows, cols):
    # pydicom only warns and drops the excess: 40 x 60 pixels declared as 40 x 50 came out as stripes
    rgb = make_lesion(40, 60, np.random.default_rng(3))[0]
    path = tmp_path / "wrong_size.dcm"
    ds = _dataset(VLPhotographicImageStorage, rows, cols, "RGB", 3)
    ds.PixelData = rgb.tobytes()
    ds.save_as(path, enforce_file_format=True)
    excess = rgb.size - rows * cols * 3
    with pytest.raises(InputError, match=f"holds {rgb.size} bytes, {excess} more than {rows} rows x {cols} columns"):
        read_dicom_rgb(path)
    write_rgb_dicom(path, rgb)  # the same pixels, truly described
    np.testing.assert_array_equal(read_dicom_rgb(path), rgb)
    odd = make_lesion(41, 61, np.random.default_rng(4))[0]  # 7,503 bytes, stored padded to 7,504
    ds = _dataset(VLPhotographicImageStorage, 41, 61, "RGB", 3)
    ds.PixelData = odd.tobytes() + b"\0"
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(read_dicom_rgb(path), odd)


def test_damaged_jpeg_data_is_not_blamed_on_missing_decoders(tmp_path):
    rgb = make_lesion(48, 64, np.random.default_rng(5))[0]
    path = tmp_path / "damaged.dcm"
    write_jpeg_dicom(path, rgb)
    from pydicom import dcmread
    from pydicom.encaps import generate_frames

    ds = dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:200] + b"\xff\xd9"])  # cut short: damaged, not undecodable
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InputError, match="cannot be decoded") as caught:
        read_dicom_rgb(path)
    assert "pip install" not in str(caught.value)


def test_a_jpeg_frame_cut_short_is_refused_not_decoded_with_made_up_pixels(tmp_path):
    """pylibjpeg decoded a JPEG cut at a third of its length without a word: the file was
    diagnosed (p(keratosis) 0.40 against 0.013 whole) from pixels it does not hold."""
    rgb = make_lesion(96, 128, np.random.default_rng(6))[0]
    path = tmp_path / "cut.dcm"
    write_jpeg_dicom(path, rgb)
    from pydicom import dcmread
    from pydicom.encaps import generate_frames

    ds = dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert read_dicom_rgb(path).shape == (96, 128, 3)  # whole: read
    ds.PixelData = encapsulate([frame + b"\xff\xff"])  # fill after the end marker, as some writers leave
    ds.save_as(path, enforce_file_format=True)
    assert read_dicom_rgb(path).shape == (96, 128, 3)
    ds.PixelData = encapsulate([frame[:len(frame) // 3]])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InputError, match="ends without the end-of-image marker: the file was cut short"):
        read_dicom_rgb(path)


def test_a_deflated_dicom_is_refused_before_it_is_unpacked(tmp_path):
    """The deflated transfer syntax unpacks the whole body in memory first: a 1.5 MB file of
    zeros in a private element took 3.8 GB before any check."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    rgb = make_lesion(16, 16, np.random.default_rng(7))[0]
    ds = _dataset(VLPhotographicImageStorage, 16, 16, "RGB", 3)
    ds.PixelData = rgb.tobytes()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InputError, match="Deflated Explicit VR Little Endian transfer syntax.*not read"):
        read_dicom_rgb(path)
