"""Geometry (fit and its exact inverse) and decoding of every input format to 8-bit RGB."""

from __future__ import annotations

import re
import struct
import zlib

import numpy as np
import pytest
import tifffile
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from dermtool.errors import InputError
from dermtool.io import find_masks, read_mask
from dermtool.metrics import jaccard
from dermtool.preprocess import (
    Transform,
    _pil_resize_mask,
    fit_image,
    fit_mask,
    load_image,
    plan_transform,
    prepare,
    restore,
    restore_mask,
    upscale_mask,
)

# --------------------------------------------------------------------------- plan_transform by hand


def test_pad_centres_the_short_side():
    t = plan_transform(100, 200, 200, "pad")
    assert (t.inner_h, t.inner_w, t.top, t.left) == (100, 200, 50, 0)


def test_pad_with_border_shrinks_the_long_side():
    # long side 200 * (1 + 2 * 0.1) = 240 -> scale 200/240: 200 -> 166.7 -> 167, 100 -> 83.3 -> 83
    t = plan_transform(100, 200, 200, "pad", border=0.1)
    assert (t.inner_h, t.inner_w, t.top, t.left) == (83, 167, 58, 16)


def test_squash_fills_the_square():
    t = plan_transform(480, 640, 256, "squash", margin=92)
    assert (t.inner_h, t.inner_w, t.top, t.left, t.margin) == (256, 256, 0, 0, 92)


def test_unknown_fit_mode_is_an_input_error():
    with pytest.raises(InputError, match="crop"):
        plan_transform(10, 10, 8, "crop")


def test_transform_dict_round_trip_from_csv_strings():
    t = plan_transform(333, 517, 388, "pad", 0.05, 92)
    as_csv = {k: str(v) for k, v in t.to_dict().items()}
    assert Transform.from_dict(as_csv) == t


# --------------------------------------------------------------------------- exact cases


def test_pad_without_scaling_places_pixels_exactly_and_restores_them():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (100, 200, 3), dtype=np.uint8)
    t = plan_transform(100, 200, 200, "pad")
    square = fit_image(img, t)
    assert np.array_equal(square[50:150], img)
    assert not square[:50].any() and not square[150:].any()
    for c in range(3):
        back = restore(square[..., c].astype(np.float32), t)
        assert np.array_equal(back, img[..., c].astype(np.float32))


def test_margin_reflects_around_the_content_square():
    """Thesis U-Net: input 572, output 388. The 388 output field must cover the whole original
    (the original code padded a fixed 184 px and never predicted near the image border)."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)
    t = plan_transform(300, 451, 388, "pad", margin=92)
    x = fit_image(img, t)
    assert x.shape == (572, 572, 3)
    assert np.array_equal(x[92:480, 92:480], fit_image(img, plan_transform(300, 451, 388, "pad")))
    assert np.array_equal(x[91], x[93]) and np.array_equal(x[:, 91], x[:, 93])  # reflected
    # the original's whole frame sits inside the output field
    assert 0 <= t.top and t.top + t.inner_h <= 388 and 0 <= t.left and t.left + t.inner_w <= 388
    assert t.inner_w == 388


def test_restore_accepts_a_same_padded_output_with_margin():
    t = plan_transform(50, 80, 64, "pad", margin=8)
    out = np.zeros((80, 80), np.float32)
    out[8:72, 8:72] = np.random.default_rng(2).random((64, 64))
    assert np.array_equal(restore(out, t), restore(out[8:72, 8:72], t))


# --------------------------------------------------------------------------- property tests

_sizes = st.integers(16, 1200)
_aspects = st.floats(1 / 3, 3)
_fits = st.sampled_from(["pad", "squash"])
_model_sizes = st.sampled_from([64, 128, 256, 388, 572])


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1


@settings(max_examples=40, deadline=None)
@given(h=_sizes, aspect=_aspects, size=_model_sizes, fit=_fits, border=st.floats(0, 0.25),
       margin=st.sampled_from([0, 8, 92]))
def test_shapes_of_forward_and_inverse(h, aspect, size, fit, border, margin):
    w = max(1, round(h * aspect))
    t = plan_transform(h, w, size, fit, border, margin)
    x = fit_image(np.zeros((h, w, 3), np.uint8), t)
    m = fit_mask(np.ones((h, w), bool), t)
    assert x.shape == (size + 2 * margin,) * 2 + (3,) and x.dtype == np.uint8
    assert m.shape == (size, size) and m.dtype == np.uint8
    assert restore(np.zeros((size, size), np.float32), t).shape == (h, w)
    assert restore(np.zeros((size + 2 * margin,) * 2, np.float32), t).shape == (h, w)
    assert t.top + t.inner_h <= size and t.left + t.inner_w <= size


@settings(max_examples=60, deadline=None)
@given(h=_sizes, aspect=_aspects, size=_model_sizes, fit=_fits, border=st.floats(0, 0.25),
       margin=st.sampled_from([0, 92]), data=st.data())
def test_mask_round_trip_keeps_jaccard_above_098(h, aspect, size, fit, border, margin, data):
    w = max(8, round(h * aspect))
    t = plan_transform(h, w, size, fit, border, margin)
    ry = data.draw(st.floats(0.15, 0.45)) * h
    rx = data.draw(st.floats(0.15, 0.45)) * w
    cy = h / 2 + data.draw(st.floats(-0.05, 0.05)) * h
    cx = w / 2 + data.draw(st.floats(-0.05, 0.05)) * w
    # Resolution, not geometry, bounds what can come back: even the ideal 64 px rendering of an
    # ellipse with a 20 px radius restores at JAC 0.980, and at a 30 px radius one lost row at
    # the flat apex costs 2 %. Require a 32 px radius on both grids (ISIC lesions are larger).
    assume(min(ry, rx, ry * t.inner_h / h, rx * t.inner_w / w) >= 32)
    mask = _ellipse(h, w, cy, cx, ry, rx)
    back = restore(fit_mask(mask, t).astype(np.float32), t) >= 0.5
    assert back.shape == mask.shape
    assert jaccard(back, mask) > 0.98
    # no systematic shift: the centroid comes back within a quarter of a model pixel
    drift = np.abs(np.argwhere(back).mean(0) - np.argwhere(mask).mean(0))
    assert (drift / (h / t.inner_h, w / t.inner_w)).max() < 0.25


# --------------------------------------------------------------------------- restoring a mask


def _bilinear_reference(mask: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """`upscale_mask`'s definition written out: the whole float64 image, then >= 0.5."""

    def coords(n_out, n_in):
        s = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(s).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), s - i0

    x0, x1, fx = coords(out_w, mask.shape[1])
    y0, y1, fy = coords(out_h, mask.shape[0])
    m = mask.astype(np.float64)
    r = m[:, x0] + (m[:, x1] - m[:, x0]) * fx
    return r[y0] + (r[y1] - r[y0]) * fy[:, None] >= 0.5


def test_upscale_mask_by_hand():
    # 1 x 2 -> 1 x 4: output centres fall at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    assert upscale_mask(np.array([[False, True]]), 1, 4).tolist() == [[False, False, True, True]]
    # 2 x 2 -> 3 x 3: the middle row and column fall halfway, where a diagonal averages to
    # exactly 0.5, which counts as lesion
    diagonal = np.array([[1, 0], [0, 1]], bool)
    assert upscale_mask(diagonal, 3, 3).astype(int).tolist() == [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    assert upscale_mask(~diagonal, 3, 3).astype(int).tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 0]]


def test_upscale_mask_equals_the_float_reference_on_random_masks():
    """Sides 1 to 12, non-square, factors from 1 (same size) to 25, integer ones included."""
    rng = np.random.default_rng(0)
    for i in range(1500):
        h, w = (int(n) for n in rng.integers(1, 13, 2))
        if i % 4 == 0:
            out_h, out_w = h * int(rng.integers(1, 9)), w * int(rng.integers(1, 9))
        else:
            out_h, out_w = (max(n, int(n * rng.uniform(1, 25))) for n in (h, w))
        mask = rng.random((h, w)) < rng.random()
        assert np.array_equal(upscale_mask(mask, out_h, out_w), _bilinear_reference(mask, out_h, out_w)), \
            (h, w, out_h, out_w)


@pytest.mark.parametrize("out_hw", [(256, 256), (767, 1023), (1936, 2592)])
def test_upscale_mask_equals_the_float_reference_at_real_sizes(out_hw, lesion):
    """The model's 192 px square to real frame sizes, where exact ties (v == 0.5) occur."""
    _, mask, _ = lesion(192, 192, seed=3)
    mask[50:60, 20:30] = False  # a hole, and a speck: more edges than one smooth outline
    mask[150, 170] = True
    assert np.array_equal(upscale_mask(mask, *out_hw), _bilinear_reference(mask, *out_hw))


def _restored_both_ways(mask: np.ndarray, t: Transform) -> tuple[np.ndarray, np.ndarray]:
    square = fit_mask(mask, t).astype(bool)
    inner = square[t.top:t.top + t.inner_h, t.left:t.left + t.inner_w]
    return restore_mask(square, t), _pil_resize_mask(inner, t.orig_h, t.orig_w)


def _assert_close_to_pillow(masks) -> None:
    """restore_mask against its former Pillow path, squash and pad: < 0.05 % pixels per image."""
    for mask in masks:
        for fit in ("squash", "pad"):
            t = plan_transform(*mask.shape, 192, fit)
            new, old = _restored_both_ways(mask, t)
            assert new.dtype == bool and new.shape == mask.shape
            assert (new != old).mean() < 0.0005, (mask.shape, fit, (new != old).mean())


def test_restore_mask_is_pillows_but_for_rounding_on_real_masks(isic_dir):
    paths = sorted(find_masks(isic_dir / "val" / "masks").values())[::5]
    paths += sorted(find_masks(isic_dir / "val_fullres" / "masks").values())
    _assert_close_to_pillow(read_mask(p) for p in paths)


def test_restore_mask_is_pillows_but_for_rounding_on_synthetic_lesions(lesion):
    _assert_close_to_pillow(lesion(h, w, seed=i)[1] for i, (h, w) in enumerate([(256, 256), (450, 600), (2000, 3008)]))


def test_restore_mask_scales_up_exactly_and_down_through_pillow():
    rng = np.random.default_rng(4)
    square = rng.random((64, 64)) < 0.5
    up = plan_transform(300, 200, 64, "pad", margin=8)  # inner 64 x 43 -> 300 x 200
    padded = np.pad(square, 8)  # a same-padded model predicts its margin too
    assert np.array_equal(restore_mask(padded, up), _bilinear_reference(square[:, up.left:up.left + 43], 300, 200))
    for t in (plan_transform(30, 50, 64, "pad"), plan_transform(30, 90, 64, "squash")):  # down; down and up
        inner = square[t.top:t.top + t.inner_h, t.left:t.left + t.inner_w]
        assert np.array_equal(restore_mask(square, t), _pil_resize_mask(inner, 30, t.orig_w))


# --------------------------------------------------------------------------- decoding


def _png16(path, arr: np.ndarray) -> None:
    """Write a 16-bit RGB(A) PNG by hand (Pillow cannot)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if c == 3 else 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


_RGB = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]],
                 [[10, 20, 30], [128, 64, 32], [255, 255, 255]]], np.uint8)
_U16 = np.array([[0, 257, 65535], [1000, 30000, 65000]], np.uint16)  # 8-bit: round(v / 257)


def _check(path, expected, tol=0):
    pixels, (h, w) = load_image(path)
    assert pixels.dtype == np.uint8 and pixels.shape == expected.shape and pixels.shape[:2] == (h, w)
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= tol


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    Image.fromarray(_RGB[..., 1]).save(tmp_path / "g.png")
    _check(tmp_path / "g.png", np.repeat(_RGB[..., 1:2], 3, axis=2))


def test_rgba_is_composited_on_black(tmp_path):
    alpha = np.array([[255, 0, 128], [255, 255, 255]], np.uint8)
    Image.fromarray(np.dstack([_RGB, alpha])).save(tmp_path / "a.png")
    expected = np.round(_RGB * (alpha[..., None] / 255.0)).astype(np.uint8)
    _check(tmp_path / "a.png", expected, tol=1)


def test_palette_png_gives_its_colours(tmp_path):
    Image.fromarray(_RGB).quantize(colors=8, method=Image.Quantize.MAXCOVERAGE).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    _check(tmp_path / "p.png", _RGB, tol=0)


def test_palette_with_transparency(tmp_path):
    img = Image.fromarray(_RGB).quantize(colors=8, method=Image.Quantize.MAXCOVERAGE)
    index = img.getpixel((0, 0))
    img.info["transparency"] = index
    img.save(tmp_path / "pt.png", transparency=index)
    expected = _RGB.copy()
    expected[0, 0] = 0  # the transparent red pixel lies on black
    _check(tmp_path / "pt.png", expected)


def test_16bit_grayscale_png(tmp_path):
    Image.fromarray(_U16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    _check(tmp_path / "g16.png", np.repeat(np.round(_U16 / 257).astype(np.uint8)[..., None], 3, axis=2))


def test_16bit_rgb_png(tmp_path):
    rgb16 = np.dstack([_U16, _U16[::-1], _U16 // 2])
    _png16(tmp_path / "c16.png", rgb16)
    _check(tmp_path / "c16.png", np.round(rgb16 / 257).astype(np.uint8), tol=1)  # Pillow keeps the high byte


@pytest.mark.parametrize("planar", [False, True])
def test_16bit_rgb_tiff(tmp_path, planar):
    rgb16 = np.dstack([_U16, _U16[::-1], _U16 // 2])
    data = np.moveaxis(rgb16, -1, 0) if planar else rgb16
    tifffile.imwrite(tmp_path / "c16.tif", data, photometric="rgb", planarconfig="separate" if planar else "contig")
    _check(tmp_path / "c16.tif", np.round(rgb16 / 257).astype(np.uint8))


def test_16bit_grayscale_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "g16.tiff", _U16)
    _check(tmp_path / "g16.tiff", np.repeat(np.round(_U16 / 257).astype(np.uint8)[..., None], 3, axis=2))


def test_a_16bit_image_is_scaled_by_its_full_range_whatever_its_values(tmp_path):
    """The scale followed the image's largest value: one pixel at 256 instead of 255 turned a dark
    image (read as 0-255) into a black one (read as 0-65535)."""
    dark = np.full((4, 6), 200, np.uint16)
    Image.fromarray(dark).save(tmp_path / "a.png")
    dark[0, 0] = 256
    Image.fromarray(dark).save(tmp_path / "b.png")
    tifffile.imwrite(tmp_path / "c.tif", dark)
    expected = np.repeat(np.round(dark / 257).astype(np.uint8)[..., None], 3, axis=2)  # 200 -> 1
    for name in ("b.png", "c.tif"):
        _check(tmp_path / name, expected)
    _check(tmp_path / "a.png", np.full((4, 6, 3), 1, np.uint8))


def test_a_32bit_tiff_of_16bit_values_is_not_black(tmp_path):
    """Scaled by 2**32 - 1, a 32-bit grey TIFF of 16-bit data decoded as black."""
    tifffile.imwrite(tmp_path / "u32.tif", _U16.astype(np.uint32))
    _check(tmp_path / "u32.tif", np.repeat(np.round(_U16 / 257).astype(np.uint8)[..., None], 3, axis=2))


def test_palette_tiff_gives_its_colour_map(tmp_path):
    """A palette TIFF was read as its index numbers: grey, and a different diagnosis."""
    Image.fromarray(_RGB).quantize(colors=8, method=Image.Quantize.MAXCOVERAGE).save(tmp_path / "p.tif")
    assert Image.open(tmp_path / "p.tif").mode == "P"
    _check(tmp_path / "p.tif", _RGB)


def test_a_pil_image_of_a_32bit_or_palette_alpha_tiff_gives_what_its_path_gives(tmp_path):
    """A 32-bit grey TIFF opened with PIL (mode I) was scaled by 65535 (near black) where its path
    is read by its values; a palette TIFF with alpha (PA) lost its colours on the path route."""
    from dermtool.preprocess import _to_rgb_image
    from dermtool.synthetic import make_lesion

    rgb = make_lesion(40, 50, np.random.default_rng(1))[0]
    tifffile.imwrite(tmp_path / "i32.tif", rgb[..., 0].astype(np.int32))
    Image.fromarray(rgb).quantize(16).convert("PA").save(tmp_path / "pa.tif", format="TIFF")
    for name, mode in (("i32.tif", "I"), ("pa.tif", "PA")):
        with Image.open(tmp_path / name) as im:
            assert im.mode == mode
            via_pil = np.asarray(_to_rgb_image(im))
        np.testing.assert_array_equal(load_image(tmp_path / name)[0], via_pil)
    np.testing.assert_array_equal(load_image(tmp_path / "i32.tif")[0][..., 0], rgb[..., 0])
    assert len(np.unique(load_image(tmp_path / "pa.tif")[0].reshape(-1, 3), axis=0)) > 2  # colours, not grey


def test_white_is_zero_tiff_is_inverted(tmp_path):
    tifffile.imwrite(tmp_path / "w.tif", 255 - _RGB[..., 0], photometric="miniswhite")
    _check(tmp_path / "w.tif", np.repeat(_RGB[..., :1], 3, axis=2))


@pytest.mark.parametrize("kind", ["cmyk", "ycbcr", "lzw", "jpeg"])
def test_tiffs_tifffile_would_read_raw_or_not_at_all_go_through_pillow(tmp_path, kind):
    """CMYK and YCbCr pages came out as raw samples; LZW and JPEG compression needed imagecodecs."""
    big = np.kron(_RGB, np.ones((8, 8, 1), np.uint8))  # JPEG needs room: 16 x 24
    path = tmp_path / f"{kind}.tif"
    if kind == "cmyk":
        tifffile.imwrite(path, np.asarray(Image.fromarray(big).convert("CMYK")), photometric="separated")
    elif kind == "ycbcr":
        Image.fromarray(big).convert("YCbCr").save(path)
    else:
        Image.fromarray(big).save(path, compression="tiff_lzw" if kind == "lzw" else "jpeg")
    _check(path, np.asarray(Image.open(path).convert("RGB")))  # Pillow's own reading
    _check(path, big, tol={"cmyk": 0, "ycbcr": 3, "lzw": 0, "jpeg": 40}[kind])


def test_a_multi_page_tiff_is_read_as_its_first_page(tmp_path):
    """Pages of one size were refused ("unsupported TIFF layout (2, ...)"); of two sizes, page 1 was read."""
    with tifffile.TiffWriter(tmp_path / "m.tif") as tif:
        tif.write(_RGB, photometric="rgb")
        tif.write(_RGB[::-1].copy(), photometric="rgb")
    _check(tmp_path / "m.tif", _RGB)


def test_a_damaged_tiff_is_one_named_error(tmp_path):
    """zlib's error (and tifffile's IndexError, ZeroDivisionError) escaped load_image."""
    path = tmp_path / "d.tif"
    tifffile.imwrite(path, np.kron(_RGB, np.ones((32, 32, 1), np.uint8)), photometric="rgb", compression="zlib")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] + bytes(len(data) - len(data) // 2))  # the stream cut, the tags kept
    with pytest.raises(InputError, match=re.escape(str(path)) + ": not a readable image"):
        load_image(path)


def test_bmp_and_uppercase_extension(tmp_path):
    Image.fromarray(_RGB).save(tmp_path / "x.BMP", format="BMP")
    _check(tmp_path / "x.BMP", _RGB)


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    _check(tmp_path / "cmyk.jpg", np.broadcast_to(np.array([255, 0, 0], np.uint8), (8, 16, 3)), tol=6)


# --------------------------------------------------------------------------- broken files and JPEG draft


@pytest.mark.parametrize("min_size", [None, (64, 64)])
def test_truncated_jpeg_is_an_input_error_naming_the_file(tmp_path, lesion, min_size):
    rgb, _, _ = lesion(300, 400)
    path = tmp_path / "ISIC_broken.jpg"
    Image.fromarray(rgb).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="ISIC_broken.jpg"):
        load_image(path, min_size=min_size)


def test_not_an_image_and_missing_file(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(InputError, match="notes.png"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(InputError, match="absent.jpg.*not found"):
        load_image(tmp_path / "absent.jpg")


def test_jpeg_is_decoded_at_reduced_size_when_enough(tmp_path, lesion):
    rgb, _, _ = lesion(1200, 1600)
    path = tmp_path / "big.jpg"
    Image.fromarray(rgb).save(path, quality=92)
    # 1600 / 8 = 200 < 256, so the decoder stops at 1/4: 400 x 300
    pixels, orig = load_image(path, min_size=(192, 256))
    assert orig == (1200, 1600) and pixels.shape == (300, 400, 3)
    x, t = prepare(path, 256, "pad")
    assert x.shape == (256, 256, 3)
    assert (t.orig_h, t.orig_w, t.inner_h, t.inner_w, t.top) == (1200, 1600, 192, 256, 32)
    # and the result is what a full decode would give, up to JPEG rounding
    full, _ = load_image(path)
    reference = fit_image(full, t)
    assert np.abs(x.astype(int) - reference.astype(int)).mean() < 2.0


def test_prepare_opens_each_file_once(tmp_path, lesion, monkeypatch):
    """The inner size comes from the header of the same open file that is then decoded."""
    rgb, _, _ = lesion(300, 400)
    Image.fromarray(rgb).save(tmp_path / "one.jpg", quality=90)
    real_open, opened = Image.open, []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    x, t = prepare(tmp_path / "one.jpg", 64, "pad")
    assert len(opened) == 1
    assert (t.inner_h, t.inner_w) == (48, 64) and x.shape == (64, 64, 3)


# --- the "jpeg256" input chain (issue 20: one lesion, one answer) ---

def _original_and_copy(tmp_path, lesion):
    """A 1600 x 1200 'original' JPEG and its public-style copy: 256 x 256 bicubic, JPEG q75."""
    from PIL import Image

    rgb, _, _ = lesion(1200, 1600, seed=7)
    original = tmp_path / "original.jpg"
    Image.fromarray(rgb).save(original, quality=95)
    copy = tmp_path / "copy.jpg"
    Image.fromarray(rgb).resize((256, 256), Image.BICUBIC).save(copy, quality=75)
    return original, copy


def test_jpeg256_brings_an_original_to_its_copys_pixels(tmp_path, lesion):
    from dermtool.preprocess import prepare

    original, copy = _original_and_copy(tmp_path, lesion)
    gap = {}
    for chain in ("direct", "jpeg256"):
        a, t = prepare(original, 192, "squash", chain=chain)
        b, _ = prepare(copy, 192, "squash", chain=chain)
        gap[chain] = float(np.abs(a.astype(float) - b).mean())
        assert (t.orig_h, t.orig_w) == (1200, 1600)  # the transform still maps back to the original
    assert gap["jpeg256"] < 0.5 * gap["direct"]


@pytest.mark.parametrize("suffix", ["jpg", "png", "tif"])
def test_jpeg256_reports_the_original_size_for_every_format(tmp_path, lesion, suffix):
    """The chain's 256 px copy is internal: the size returned (and so the transform that
    restores masks) is the file's own, for the TIFF path as for Pillow's."""
    from dermtool.preprocess import load_image, prepare

    rgb, _, _ = lesion(300, 500, seed=2)
    path = tmp_path / f"image.{suffix}"
    if suffix == "tif":
        tifffile.imwrite(path, rgb, photometric="rgb")
    else:
        Image.fromarray(rgb).save(path)
    pixels, size = load_image(path, chain="jpeg256")
    assert size == (300, 500) and pixels.shape == (256, 256, 3)
    _, t = prepare(path, 64, "squash", chain="jpeg256")
    assert (t.orig_h, t.orig_w) == (300, 500)


def test_jpeg256_of_a_copy_changes_it_little_and_unknown_chains_are_refused(tmp_path, lesion):
    from PIL import Image

    from dermtool.preprocess import load_image

    _, copy = _original_and_copy(tmp_path, lesion)
    once, size = load_image(copy, chain="jpeg256")
    assert size == (256, 256)
    assert np.abs(once.astype(float) - np.asarray(Image.open(copy).convert("RGB"))).mean() < 1.0
    with pytest.raises(InputError, match="input chain"):
        load_image(copy, chain="jpeg90")


def test_a_cache_records_its_chain_and_train_refuses_another(tmp_path, synthetic_dataset):
    from dermtool.config import preset_config
    from dermtool.data import build_cache, load_cache, resolve_layout
    from dermtool.train import check_cache

    build_cache(resolve_layout(synthetic_dataset), tmp_path / "c", size=32, progress=False, chain="jpeg256")
    cache = load_cache(tmp_path / "c")
    assert cache.meta["chain"] == "jpeg256"
    ok = preset_config("compact", "joint", size=32, base_filters=4, depth=2, input_chain="jpeg256")
    assert check_cache(cache, ok, print) is False
    with pytest.raises(InputError, match="--chain jpeg256"):
        check_cache(cache, preset_config("compact", "joint", size=32, base_filters=4, depth=2), print)


@pytest.mark.parametrize("chain", ["direct", "jpeg256"])
@pytest.mark.parametrize("axis", [0, 1])
def test_a_jpeg_decoded_at_reduced_size_is_not_squeezed(tmp_path, chain, axis):
    """A JPEG decoded at 1/s whose side is no multiple of 8 s ends in a part block; the reduced
    decode was resized whole, as if it were the frame, and the image came out squeezed towards
    its top-left (0.6 model px at the far edge of a 1001 x 999 image, 8 original px at 3001)."""
    from dermtool.preprocess import load_image

    pixels = np.zeros((999, 1001, 3), np.uint8)
    if axis == 1:
        pixels[:, 800:] = 255  # a step edge at 0.8 of the width
    else:
        pixels[800:, :] = 255
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=100, subsampling=0)
    Image.fromarray(pixels).save(tmp_path / "a.png")  # decoded whole: the reference

    def edge(path):
        x, original = load_image(path, resize_to=(192, 192), chain=chain)
        assert original == (999, 1001)
        line = (x[96, :, 0] if axis == 1 else x[:, 96, 0]).astype(float)
        return np.interp(127.5, line, np.arange(192))  # where the step crosses half

    assert abs(edge(tmp_path / "a.jpg") - edge(tmp_path / "a.png")) < 0.05
