"""DICOM input: a dermoscopy photograph stored as DICOM, read as 8-bit RGB like any image file.

Hospital archives keep dermoscopy as VL Photographic or VL Microscopic images, and the ISIC
2020 challenge published its images as DICOM. Such a file holds one colour frame, RGB or YCbCr
(YBR_FULL, or YBR_FULL_422 as JPEG baseline stores it), uncompressed or compressed. pydicom
decodes it (with Pillow or pylibjpeg for the compressed transfer syntaxes) and converts YCbCr
to RGB. Anything else, a CT slice, a monochrome image, a multi-frame file, is refused with an
`InputError` naming the file and why, so a folder run names and skips it and goes on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dermtool.errors import InputError
from dermtool.io import check_pixel_limit

#: Photometric interpretations of a colour photograph; pydicom returns all of them as RGB.
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_INSTALL = "pip install 'dermtool[dicom]'"


def read_dicom_rgb(path: Path) -> np.ndarray:
    """The pixels of a single-frame colour DICOM file as an H x W x 3 uint8 RGB array.

    Raises:
        InputError: pydicom is missing, the file is not DICOM, it is not a colour photograph
            (monochrome, palette, multi-frame, no pixel data), or its pixels cannot be decoded
            (a compressed transfer syntax without its decoder, damaged data).
    """
    pydicom = _pydicom(path)
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if _deflated(path):
        raise InputError(f"{path}: a DICOM file of the Deflated Explicit VR Little Endian transfer syntax, whose whole "
                         "body is unpacked in memory before anything can be checked (a small file can hold gigabytes); "
                         "not read, so skipped. Re-save it uncompressed or with JPEG.")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable DICOM file ({_short(exc)}).") from None
    problem = not_a_colour_photograph(ds)
    if problem:
        raise InputError(f"{path}: {problem}, not a colour photograph (RGB or YBR, one frame); skipped.")
    try:  # the declared size, checked before any decoding: a small file may declare a huge frame
        check_pixel_limit(path, int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0))
    except (TypeError, ValueError):
        raise InputError(f"{path}: its Rows and Columns are not numbers; not a readable DICOM image.") from None
    excess = _excess_pixel_data(ds)
    if excess:
        raise InputError(f"{path}: {excess}; the Rows and Columns do not describe the pixel data, so the "
                         "image would be read scrambled or cut; skipped.")
    cut = _cut_jpeg_frame(ds)
    if cut:
        raise InputError(f"{path}: {cut}; skipped.")
    try:
        pixels = ds.pixel_array  # pydicom 3 converts YCbCr to RGB (its as_rgb default)
    except Exception as exc:  # a missing decoder plugin raises RuntimeError, damaged data anything
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        text = " ".join(str(exc).split()).lower()
        # the extra helps only where pydicom has decoders whose packages are missing; damaged data
        # ("raised by all available plugins") and a syntax nobody decodes (MPEG) it does not
        hint = f"; {_INSTALL} adds the JPEG decoders" if "missing dependencies" in text else ""
        raise InputError(f"{path}: its pixels ({name}) cannot be decoded ({_short(exc)}){hint}.") from None
    if pixels.dtype != np.uint8:  # 12- or 16-bit colour: keep the top 8 of the stored bits
        shift = max(0, int(ds.get("BitsStored", 8)) - 8)
        pixels = np.clip(pixels >> shift, 0, 255).astype(np.uint8)  # in its own dtype: no int64 copy
    return np.ascontiguousarray(pixels)


def _deflated(path: Path) -> bool:
    """Whether the file's meta header (group 0002, read alone: never deflated) names the
    Deflated Explicit VR Little Endian transfer syntax; False for a file without one."""
    from pydicom.filereader import read_file_meta_info

    try:
        meta = read_file_meta_info(path)
    except Exception:  # no meta header, or not DICOM: dcmread words it
        return False
    return str(meta.get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.1.99"


#: the transfer syntaxes whose frame is one JPEG-family stream, which ends with the marker FF D9
#: (EOI; JPEG 2000's EOC): baseline, extended, lossless, JPEG-LS and JPEG 2000
_JPEG_FAMILY = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
                "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")


def _cut_jpeg_frame(ds) -> str:
    """Why a JPEG-family frame is cut short ("" when it is whole or not JPEG): pylibjpeg decodes a
    truncated stream without a word, filling the rest with whatever it had, so a file cut in a
    transfer would be diagnosed from pixels it does not hold."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if str(uid) not in _JPEG_FAMILY or "PixelData" not in ds:
        return ""
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:  # a damaged encapsulation: the decoder names it below
        return f"its encapsulated pixel data cannot be read ({_short(exc)})"
    # a frame may be padded to an even length, or carry a few bytes of fill or a vendor's trailer;
    # in the coded data FF is always followed by 00 or a restart marker, so FF D9 is the end
    if b"\xff\xd9" not in frame[-16:]:
        return (f"its pixel data ({getattr(uid, 'name', 'JPEG')}) ends "
                "without the end-of-image marker: the file was cut short, and would be decoded with the rest "
                "of the image made up")
    return ""


def _excess_pixel_data(ds) -> str:
    """Why uncompressed pixel data is longer than its header says ("" when it is not): pydicom
    then only warns and drops the excess, reading a wider image as stripes of a narrower one. A
    shorter one pydicom refuses itself, as it does a compressed frame of another size."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_compressed or "PixelData" not in ds:
        return ""
    try:
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return ""  # pydicom's own reading names what is missing
    # YBR_FULL_422 keeps 2 samples a pixel (Y for each, Cb and Cr shared by two); others 3
    samples = 2 if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422" else _samples(ds)
    expected = rows * cols * samples * ((bits + 7) // 8)
    actual = len(ds.PixelData)
    if actual > expected + (expected % 2):  # an odd length is padded to an even one
        return (f"its pixel data holds {actual} bytes, {actual - expected} more than {rows} rows x {cols} "
                f"columns x {samples} samples of {bits} bits")
    return ""


def not_a_colour_photograph(ds) -> str:
    """Why a DICOM data set is not a single colour frame ("" when it is one), in a few words
    that name what it is: "a CT Image Storage image (MONOCHROME2)"."""
    kind = getattr(getattr(ds, "SOPClassUID", None), "name", "") or "DICOM"
    if "PixelData" not in ds:
        return f"a {kind} object without pixel data"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"a multi-frame {kind} image ({frames} frames)"
    interpretation = str(ds.get("PhotometricInterpretation", "")).strip()
    if interpretation not in COLOUR:
        return f"a {kind} image ({interpretation or 'no photometric interpretation'})"
    if _samples(ds) != 3:
        return f"a {kind} image ({interpretation} with {ds.get('SamplesPerPixel', '') or 'no'} samples per pixel, not 3)"
    return ""


def _samples(ds) -> int:
    """SamplesPerPixel, 0 when it is empty or not a number (a damaged header): not a colour frame."""
    try:
        return int(ds.get("SamplesPerPixel", 1))
    except (TypeError, ValueError):
        return 0


def _pydicom(path: Path):
    try:
        import pydicom
    except ImportError:
        raise InputError(f"{path}: reading DICOM needs pydicom: {_INSTALL}.") from None
    if int(pydicom.__version__.split(".")[0]) < 3:  # 2.x returns YCbCr as it is stored
        raise InputError(f"{path}: reading DICOM needs pydicom 3 (found {pydicom.__version__}): {_INSTALL}.")
    return pydicom


def _short(exc: Exception, limit: int = 160) -> str:
    """The error's text on one line, cut at a word (with an ellipsis) when longer than `limit`."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"


def write_segmentation(source: Path, mask: np.ndarray, dest: Path) -> None:
    """Write `mask` (bool, the source's rows x columns) as a binary DICOM Segmentation of the
    DICOM image `source`: one segment "lesion", made by an automatic algorithm (dermtool), in
    the source's study, referencing the source image by its SOP Instance UID (highdicom).

    Raises:
        InputError: highdicom is missing, or the source lacks what a Segmentation must copy
            (patient and study identification).
    """
    pydicom = _pydicom(source)
    try:
        import highdicom as hd
    except ImportError:
        raise InputError(f"{source}: writing DICOM SEG needs highdicom: pip install 'dermtool[dicomseg]'.") from None
    from pydicom.sr.codedict import codes

    from dermtool import __version__

    image = pydicom.dcmread(source, stop_before_pixels=True)
    algorithm = hd.AlgorithmIdentificationSequence(name="dermtool", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    lesion = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    try:
        seg = hd.seg.Segmentation(
            source_images=[image], pixel_array=np.asarray(mask, dtype=bool)[None],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[lesion],
            series_instance_uid=hd.UID(), series_number=9000, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="dermtool", manufacturer_model_name="dermtool", software_versions=__version__,
            device_serial_number="none", series_description="dermtool lesion segmentation",
            omit_empty_frames=False)  # an empty mask is an answer too: keep its frame
    except AttributeError as exc:  # pydicom names the attribute: "... has no attribute 'StudyInstanceUID'"
        missing = str(exc).rsplit(" ", 1)[-1].strip("'")
        raise InputError(f"{source}: has no {missing}, which its DICOM SEG must copy; no SEG written.") from None
    except (ValueError, TypeError) as exc:  # a value highdicom refuses to copy: PatientSex 'X', a dashed date
        raise InputError(f"{source}: its header cannot be copied into a DICOM SEG ({_short(exc)}); "
                         "no SEG written.") from None
    seg.save_as(dest)
