"""The mask PNG writer: files Pillow and the scorer read back pixel for pixel, in the ISIC format
(8-bit grayscale, 0 and 255), with a valid chunk structure."""

from __future__ import annotations

import io as _io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dermtool.io import encode_mask_png, read_mask

SHAPES = [(1, 1), (1, 7), (7, 1), (3, 5), (2, 1000), (64, 63), (101, 257)]


def _masks(shape: tuple[int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    return {
        "all zero": np.zeros(shape, bool),
        "all one": np.ones(shape, bool),
        "random": rng.random(shape) < 0.5,
        "blob": (yy - h / 2) ** 2 / max(h / 3, 1) ** 2 + (xx - w / 3) ** 2 / max(w / 3, 1) ** 2 <= 1,
    }


@pytest.mark.parametrize("shape", SHAPES)
def test_pillow_reads_back_the_exact_pixels(shape):
    for name, mask in _masks(shape, np.random.default_rng(sum(shape))).items():
        with Image.open(_io.BytesIO(encode_mask_png(mask))) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "L", (shape[1], shape[0])), name
            assert np.array_equal(np.asarray(img), mask.astype(np.uint8) * 255), name


def test_the_scorer_reads_back_the_mask(tmp_path):
    for name, mask in _masks((40, 57), np.random.default_rng(1)).items():
        path = tmp_path / f"{name.replace(' ', '_')}_segmentation.png"
        path.write_bytes(encode_mask_png(mask))
        assert np.array_equal(read_mask(path), mask), name


def test_chunks_crcs_and_scanlines_are_valid():
    mask = np.random.default_rng(2).random((9, 13)) < 0.5
    data = encode_mask_png(mask)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (13, 9, 8, 0, 0, 0, 0)  # 8-bit grey
    scanlines = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8).reshape(9, 14)
    assert (scanlines[:, 0] == 2).all()  # Up filter on every row
    assert np.array_equal(np.cumsum(scanlines[:, 1:], axis=0, dtype=np.uint8), mask.astype(np.uint8) * 255)


@pytest.mark.parametrize("bad", [np.zeros((0, 4), bool), np.zeros(5, bool), np.zeros((2, 2, 3), bool)])
def test_not_a_2d_mask_is_refused(bad):
    with pytest.raises(ValueError, match="2-D"):
        encode_mask_png(bad)


# --- reading: one checked reader for every text file (issue 18, item 12) ----------------------


TEXT = "image_id,melanoma\nISIC_ü,1\n"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_text_is_read_in_utf8_or_with_a_windows_byte_order_mark(tmp_path, encoding):
    """UTF-8, and UTF-8 or UTF-16 with a BOM (Notepad, Excel's "Unicode text"), read alike."""
    from dermtool.io import read_text

    path = tmp_path / "labels.csv"
    path.write_bytes(TEXT.encode(encoding))
    if encoding == "utf-16":
        assert path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")  # Python writes the BOM
    assert read_text(path, "label CSV") == TEXT


@pytest.mark.parametrize("content, words", [
    ("ISIC_1,0.5\nISIC_\xe9,1\n".encode("latin-1"), ["not UTF-8 text", "0xe9", "offset 16"]),
    ("ISIC_1\n".encode("utf-16-le"), ["NUL", "UTF-16 without a byte-order mark"]),
    (b"", ["is empty"]),
    (b" \n\n\t\n", ["is empty"]),
    (b"\xef\xbb\xbf", ["is empty"]),
    (b"x" * 2000, ["is 2000 bytes, more than the 1000 bytes"]),
])
def test_a_bad_text_file_is_one_sentence_naming_it(tmp_path, content, words):
    from dermtool.errors import InputError
    from dermtool.io import read_text

    path = tmp_path / "ids.txt"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        read_text(path, "id list", limit=1000)
    message = str(err.value)
    assert message.startswith(f"{path}: the id list") and "\n" not in message
    for word in words:
        assert word in message


def test_a_folder_or_a_missing_file_is_named(tmp_path):
    from dermtool.errors import InputError
    from dermtool.io import read_text

    with pytest.raises(InputError, match="is a folder"):
        read_text(tmp_path, "id list")
    with pytest.raises(InputError, match="does not exist"):
        read_text(tmp_path / "nothing.txt", "id list")


@pytest.mark.parametrize("content, words", [
    ("[1, 2]", ["holds a list where an object is expected"]),
    ('"text"', ["holds a str where an object is expected"]),
    ('{"a": 1', ["not valid JSON", "line 1"]),
    ("[" * 100000, ["nests too deeply"]),
])
def test_json_of_the_wrong_type_or_broken_is_one_sentence(tmp_path, content, words):
    from dermtool.errors import InputError
    from dermtool.io import read_json

    path = tmp_path / "infer.json"
    path.write_text(content)
    with pytest.raises(InputError) as err:
        read_json(path, "infer record")
    assert str(err.value).startswith(f"{path}: the infer record")
    for word in words:
        assert word in str(err.value)


# --- writing: one writer, one sentence for a failure (issue 18, item 11) ----------------------


@pytest.mark.parametrize("exc, reason", [
    (OSError(28, "No space left on device", "/out/a.png"), "the disk is full"),
    (OSError("786432 requested and 515004 written"), "the disk is full"),  # numpy's short write
    (OSError(122, "Disk quota exceeded", "/out/a.png"), "the disk is full"),
    (OSError(20, "Not a directory", "/out/a.png"), "Not a directory: a file is where a folder should be"),
    (OSError(21, "Is a directory", "/out/a.png"), "Is a directory: a folder is where the file should be"),
    (OSError(13, "Permission denied", "/out/a.png"), "Permission denied"),
])
def test_a_failed_write_is_worded_once_for_every_command(exc, reason):
    from dermtool.errors import write_failure

    message = write_failure(exc, "the masks", "/out")
    where = exc.filename or "/out"
    assert message == f"{where}: cannot write the masks ({reason})."


def test_write_atomic_names_the_file_asked_for_and_leaves_no_temporary_file(tmp_path):
    import errno

    from dermtool.io import write_atomic

    (tmp_path / "predictions.csv").mkdir()  # a folder where the file should go
    with pytest.raises(IsADirectoryError) as err:
        write_atomic(tmp_path / "predictions.csv", lambda tmp: tmp.write_text("image_id\n"))
    assert err.value.filename == str(tmp_path / "predictions.csv")

    def full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError) as err:
        write_atomic(tmp_path / "a.csv", full)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "a.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]
