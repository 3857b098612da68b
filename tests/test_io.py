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
