"""Geometry: decode an image, fit it into the model's square, and map outputs back exactly.

One path serves training (the cache) and inference. The forward transform is

    original H x W  --(scale s, keep aspect: "pad" | stretch: "squash")-->  inner h x w
    inner h x w     --(centre in a size x size square, zeros around)-->       content square
    content square  --(reflect `margin` px on each side, valid-conv models)--> model input

and `restore` undoes it: crop the inner rectangle out of a size x size output and resize it
to H x W. Every image's `Transform` is recorded so the inverse needs nothing else.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageFile

from dermtool.errors import InputError, unreadable
from dermtool.io import check_decoded_size, check_pixel_limit, open_image

# A truncated JPEG must be reported, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".dcm")

#: How an image's pixels reach the model (ModelConfig.input_chain, a cache's `chain`):
#: - "direct": decoded (DCT-scaled for big JPEGs) and resized to the model's square;
#: - "jpeg256": first brought to the form of the public training copies (ISIC 2017, HAM10000):
#:   the frame resized to 256 px on its long side (256 x 256 for squash), Pillow bicubic with
#:   antialiasing, and saved as JPEG at quality 75, then resized to the model's square. So a
#:   12-megapixel original and its 256 px copy reach the network as nearly the same pixels.
#:   (The copies in ../shared/data/isic2017/val are exactly that: re-made from the originals
#:   this way, they differ by RMSE 0.4 grey levels.)
CHAINS = ("direct", "jpeg256")
#: jpeg256 decodes a JPEG with DCT scaling to no less than this many times the copy's size. 1 is
#: enough: on the 17 ISIC 2017 validation originals, x2 came closer to the public copies' pixels
#: (RMSE 1.13 against 1.43 grey levels) but not to their answers (bundled model, mean |dp(mel)|
#: 0.031 at x2, 0.030 at x1, every label the same), and x1 decodes up to 4 times fewer pixels.
CHAIN_DRAFT = 1
CHAIN_SIDE, CHAIN_QUALITY = 256, 75


@dataclass(frozen=True)
class Transform:
    """How one image was fitted into the model's square; enough to invert it."""

    orig_h: int
    orig_w: int
    size: int  # side of the content square the model predicts
    margin: int  # reflected border added on each side for valid-convolution models
    top: int  # offset of the inner rectangle inside the content square
    left: int
    inner_h: int
    inner_w: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Transform":
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__})


def plan_transform(orig_h: int, orig_w: int, size: int, fit: str, border: float = 0.0,
                   margin: int = 0) -> Transform:
    """The transform that fits an `orig_h` x `orig_w` image into a `size` square.

    Args:
        fit: "pad" keeps the aspect ratio (the long side fills the square minus `border`);
            "squash" stretches the whole frame to the square.
        border: for "pad", extra zero border on each side as a fraction of the long side.
        margin: reflected pixels on each side for valid-convolution models.
    """
    if fit == "squash":
        return Transform(orig_h, orig_w, size, margin, 0, 0, size, size)
    if fit != "pad":
        raise InputError(f"unknown fit mode {fit!r}; choose pad or squash.")
    long_side = max(orig_h, orig_w) * (1.0 + 2.0 * border)
    scale = size / long_side
    inner_h = max(1, min(size, round(orig_h * scale)))
    inner_w = max(1, min(size, round(orig_w * scale)))
    return Transform(orig_h, orig_w, size, margin, (size - inner_h) // 2, (size - inner_w) // 2,
                     inner_h, inner_w)


def _to_rgb_image(img: Image.Image) -> Image.Image:
    """8-bit RGB from grayscale, RGBA, palette, CMYK or 16-bit images."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)
        # Pillow's I modes are 16-bit files (a PNG's "I" too), but a TIFF in mode "I" is 32-bit
        # grey, which the path reads (tifffile) by its values, as floats: the same rule here
        wide = img.mode == "F" or img.mode == "I" and getattr(img, "format", None) == "TIFF"
        top = _full_scale(arr) if wide else 65535.0
        return Image.fromarray(np.repeat(_scaled_to_uint8(arr, top)[..., None], 3, axis=2))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _full_scale(arr: np.ndarray) -> float:
    """The value that is white in `arr`: an 8- or 16-bit unsigned type's full range (a 16-bit
    image is scaled by 65535 whatever its values, so one pixel never rescales the whole image);
    for floats, signed and 32-bit types, which carry no range a camera fills, 1 for values
    within [0, 1], else 255 for values within 8 bits, else 65535 (as Pillow's 32-bit mode I)."""
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        return float(np.iinfo(arr.dtype).max)
    top = float(arr.max()) if arr.size else 0.0  # wider types (32-bit grey) hold 16-bit data at most
    return 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0


def _scaled_to_uint8(arr: np.ndarray, top: float) -> np.ndarray:
    """`arr` / top as 8 bits (rounded), a block of rows at a time in float32: a 16-bit image of
    200 megapixels never becomes one float64 array of 1.6 GB (and its temporaries)."""
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, (1 << 22) // max(1, math.prod(arr.shape[1:])))
    for start in range(0, arr.shape[0], rows):
        block = arr[start:start + rows].astype(np.float32)
        out[start:start + rows] = np.clip(block / np.float32(top) * 255.0 + 0.5, 0, 255)
    return out


class _ViaPillow(Exception):
    """A TIFF that tifffile would return as raw numbers (CMYK, YCbCr, Lab) or cannot decode
    without the imagecodecs package (LZW, JPEG): Pillow converts it instead."""


#: tifffile's photometric interpretations this reader converts itself (the rest go to Pillow)
_TIFF_OWN = ("MINISBLACK", "MINISWHITE", "RGB", "PALETTE")


def _tiff_to_rgb(path: Path) -> np.ndarray:
    """A TIFF's first page as 8-bit RGB (a multi-page file is read as its first image, as Pillow
    reads one). Grey, RGB, palette (through its colour map) and white-is-zero pages are
    converted here; any other colour space, or a compression tifffile needs imagecodecs for,
    raises _ViaPillow."""
    import logging

    import tifffile

    quiet = logging.getLogger("tifffile")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a damaged file's warnings are not the one line it gets
    try:
        with tifffile.TiffFile(path) as tif:
            if not len(tif.pages):
                raise InputError(f"{path}: a TIFF without an image.")
            page = tif.pages[0]
            photometric = getattr(page.photometric, "name", str(page.photometric))
            if photometric not in _TIFF_OWN:
                raise _ViaPillow(photometric)
            shape, axes = page.shape, page.axes
            # every plane of the page counts (depth), not its colour samples
            planes = [n for n, axis in zip(shape, axes) if axis != "S"] or [1]
            check_pixel_limit(path, planes[-1], math.prod(planes[:-1]))
            samples = math.prod(n for n, axis in zip(shape, axes) if axis == "S")
            if samples > 4:  # a colour image has 1 to 4; thousands would decode to gigabytes
                raise InputError(f"{path}: {samples} samples per pixel; an image has 1 to 4 (grey, RGB, RGBA).")
            check_decoded_size(path, math.prod(shape) * np.dtype(page.dtype).itemsize)
            try:
                arr = page.asarray()
            except ValueError as exc:
                if "imagecodecs" in str(exc):
                    raise _ViaPillow(str(exc)) from None
                raise
            colormap = page.colormap if photometric == "PALETTE" else None
    finally:
        quiet.setLevel(level)
    if axes.endswith("SYX"):  # planar (C, H, W) storage; the tags say so, the shape cannot
        arr = np.moveaxis(arr, -3, -1)
    alpha = None
    if colormap is not None and arr.ndim == 3 and arr.shape[-1] == 2:  # palette + alpha: indices, then alpha
        arr, alpha = arr[..., 0], arr[..., 1]
    if colormap is not None and arr.ndim == 2:  # indices into a colour map of 16-bit (3, N) entries
        cmap = np.asarray(colormap).astype(np.uint16)
        if int(arr.max(initial=0)) >= cmap.shape[-1]:
            raise InputError(f"{path}: a palette index beyond its colour map of {cmap.shape[-1]} colours.")
        # the high byte, as libtiff reads it (a map with no value above 255 was written with 8-bit values)
        cmap = (cmap >> 8 if int(cmap.max()) > 255 else cmap).astype(np.uint8)
        rgb = np.ascontiguousarray(np.moveaxis(cmap[:, arr], 0, -1))
        if alpha is None:
            return rgb
        rgba = np.concatenate([rgb, _scaled_to_uint8(alpha, _full_scale(alpha))[..., None]
                               if alpha.dtype != np.uint8 else alpha[..., None]], axis=-1)
        return np.asarray(_to_rgb_image(Image.fromarray(rgba, "RGBA")))  # on black, as a PIL image is
    if arr.dtype != np.uint8:
        arr = _scaled_to_uint8(arr, 1.0 if arr.dtype == bool else _full_scale(arr))
    if photometric == "MINISWHITE":
        arr = 255 - arr
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise InputError(f"{path}: unsupported TIFF layout {arr.shape}.")
    if arr.shape[-1] in (1, 2):
        arr = np.repeat(arr[..., :1], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def chain_size(orig_h: int, orig_w: int, fit: str) -> tuple[int, int]:
    """(height, width) of the "jpeg256" chain's intermediate copy."""
    if fit == "squash":
        return CHAIN_SIDE, CHAIN_SIDE
    scale = CHAIN_SIDE / max(orig_h, orig_w)
    return max(1, round(orig_h * scale)), max(1, round(orig_w * scale))


def archive_copy(img: Image.Image, fit: str, original: tuple[int, int] | None = None,
                 box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """The "jpeg256" chain: bicubic (antialiased) to `chain_size`, then a JPEG q75 round trip.

    `original` (height, width) and `box`: an image decoded at reduced size (`load_image`), the
    copy sized for the original and resized from the part of it that is the original frame.
    """
    import io

    h, w = chain_size(*(original or (img.height, img.width)), fit)
    if img.size != (w, h) or box is not None:
        img = img.resize((w, h), Image.BICUBIC, box=box)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=CHAIN_QUALITY)
    buf.seek(0)
    with Image.open(buf) as copy:
        return copy.convert("RGB")


def _dicom_to_rgb(path: Path) -> np.ndarray:
    from dermtool.dicom import read_dicom_rgb  # deferred: pydicom is the optional [dicom] extra

    return read_dicom_rgb(path)


def load_image(path: Path, min_size: tuple[int, int] | None = None,
               resize_to: tuple[int, int] | Callable[[int, int], tuple[int, int]] | None = None,
               chain: str = "direct", fit: str = "squash") -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image as 8-bit RGB, at reduced size when that is enough.

    Args:
        min_size: (height, width) the caller will resize to; JPEGs are then decoded with DCT
            scaling (1/2, 1/4, 1/8) to the smallest size still at least this large, which is
            what makes 30-megapixel files cheap.
        resize_to: (height, width) to resize to (bilinear, anti-aliased) before the pixels
            become an array, or a function of the original (height, width) that gives it;
            also implies `min_size`.
        chain: "direct" or "jpeg256" (see CHAINS): with jpeg256 the pixels pass through the
            archive copy (`archive_copy`, shaped by `fit`) before `resize_to`; a JPEG is then
            DCT-decoded at no less than the copy's size (CHAIN_DRAFT).
    Returns:
        (pixels, (original height, original width)).
    Raises:
        InputError naming the file when it is missing, truncated or not an image.
    """
    path = Path(path)
    try:
        if chain not in CHAINS:
            raise InputError(f"unknown input chain {chain!r}; choose one of {', '.join(CHAINS)}.")
        arr = None
        if path.suffix.lower() in (".tif", ".tiff", ".dcm"):  # decoded whole, then resized
            try:
                arr = _tiff_to_rgb(path) if path.suffix.lower() != ".dcm" else _dicom_to_rgb(path)
            except _ViaPillow:
                arr = None  # Pillow's reading, below
        if arr is not None:
            original = arr.shape[:2]  # the transform maps back to this, whatever the chain did
            target = resize_to(*original) if callable(resize_to) else resize_to
            if chain == "jpeg256":
                arr = np.asarray(archive_copy(Image.fromarray(arr), fit))
            return (arr if target is None else _resize(arr, *target)), original
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette/EXIF chatter; real failures raise below
            with open_image(path) as img:
                orig_w, orig_h = img.size
                target = resize_to(orig_h, orig_w) if callable(resize_to) else resize_to
                draft = min_size or target
                if chain == "jpeg256":
                    ch, cw = chain_size(orig_h, orig_w, fit)
                    draft = (CHAIN_DRAFT * ch, CHAIN_DRAFT * cw)
                box = None  # the original frame in a reduced decode, when that is not all of it
                if draft is not None and img.format == "JPEG":
                    drafted = img.draft("RGB", (max(1, draft[1]), max(1, draft[0])))
                    # decoded at 1/s: a side that is no multiple of 8 s ends in a part block, so the
                    # decode is a little more than the frame (3001 px at 1/8: 376 px for 375.125);
                    # resized whole, the image came out squeezed by up to 8 original pixels
                    if drafted and drafted[1] and tuple(drafted[1][2:]) != img.size:
                        box = tuple(float(v) for v in drafted[1])
                img.load()
                rgb = _to_rgb_image(img)
                if chain == "jpeg256":
                    rgb, box = archive_copy(rgb, fit, (orig_h, orig_w), box), None
                if target is not None and (rgb.size != (target[1], target[0]) or box is not None):
                    # resized as a PIL image: skips two full-size array copies per file
                    rgb = rgb.resize((target[1], target[0]), Image.BILINEAR, box=box)
                elif box is not None:  # kept at the reduced size: the frame's whole pixels
                    rgb = rgb.crop((0, 0, max(1, math.floor(box[2])), max(1, math.floor(box[3]))))
                return np.asarray(rgb), (orig_h, orig_w)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: file not found.")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: not a readable image ({_short(exc)}).")
    except MemoryError:
        raise
    except Exception as exc:  # a decoder's own error on a damaged file (zlib, a bad tag's IndexError)
        raise InputError(unreadable(path, exc)) from None


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]


def _resize(arr: np.ndarray, h: int, w: int, resample=Image.BILINEAR) -> np.ndarray:
    if arr.shape[0] == h and arr.shape[1] == w:
        return arr
    mode = "F" if arr.dtype == np.float32 else None
    if arr.ndim == 3:
        return np.asarray(Image.fromarray(arr).resize((w, h), resample))
    return np.asarray(Image.fromarray(arr, mode=mode).resize((w, h), resample))


def fit_image(pixels: np.ndarray, t: Transform) -> np.ndarray:
    """Pixels (any size with the original aspect) -> model input, uint8 (in, in, 3)."""
    inner = _resize(pixels, t.inner_h, t.inner_w)
    square = np.zeros((t.size, t.size, 3), np.uint8)
    square[t.top:t.top + t.inner_h, t.left:t.left + t.inner_w] = inner
    if t.margin:
        square = np.pad(square, ((t.margin, t.margin), (t.margin, t.margin), (0, 0)), mode="reflect")
    return square


def fit_mask(mask: np.ndarray, t: Transform) -> np.ndarray:
    """Boolean mask at the original size -> uint8 {0, 1} mask of the content square."""
    soft = _resize(mask.astype(np.float32), t.inner_h, t.inner_w)
    square = np.zeros((t.size, t.size), np.uint8)
    square[t.top:t.top + t.inner_h, t.left:t.left + t.inner_w] = soft >= 0.5
    return square


def _crop_inner(output: np.ndarray, t: Transform) -> np.ndarray:
    if output.shape[0] != t.size:  # a same-padded model predicts its margin too: drop it
        m = (output.shape[0] - t.size) // 2
        output = output[m:m + t.size, m:m + t.size]
    return output[t.top:t.top + t.inner_h, t.left:t.left + t.inner_w]


def restore_mask(mask: np.ndarray, t: Transform) -> np.ndarray:
    """A boolean content-square mask -> boolean mask at the original size.

    Interpolated bilinearly and cut at 0.5, so edges come out smooth rather than blocky at any
    scale-up. Scaling up (both sides at least the inner rectangle's, the usual case) follows
    `upscale_mask`'s exact definition, which costs little even for 30-megapixel frames; an image
    smaller than the model's square in either direction goes through `_pil_resize_mask`.
    """
    inner = _crop_inner(mask, t)
    if t.orig_h >= t.inner_h and t.orig_w >= t.inner_w:
        return upscale_mask(inner, t.orig_h, t.orig_w)
    return _pil_resize_mask(inner, t.orig_h, t.orig_w)


def _pil_resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pillow's bilinear resize (anti-aliased when shrinking) of the mask as 8-bit 0/255, cut at
    128. Up-scaling went this way too before `upscale_mask`; tests and bench compare the two."""
    inner = np.ascontiguousarray(mask, dtype=np.uint8) * np.uint8(255)
    return _resize(inner, h, w) >= 128


class _Axis(NamedTuple):
    """How one axis of `upscale_mask`'s output maps onto the source, for one pair of sizes."""

    i0: np.ndarray  # per output pixel: the source pixels around its centre and the second's weight
    i1: np.ndarray
    frac: np.ndarray
    count: np.ndarray  # per source pixel: how many output pixels have it as i0, and the first
    first: np.ndarray
    run_start: np.ndarray  # runs of output pixels that share the source pixel nearer them
    run_len: np.ndarray
    run_source: np.ndarray
    tie_runs: np.ndarray  # the runs (of one pixel) exactly halfway: frac == 0.5


@lru_cache(maxsize=64)
def _axis(n_out: int, n_in: int) -> _Axis:
    """Pixel centres aligned, clamped at the edges. Cached: a folder has few distinct sizes."""
    s = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = s.astype(np.intp)  # floor: s >= 0
    frac = s - i0
    count = np.bincount(i0, minlength=n_in)
    # r >= 0.5 is the value of the source pixel nearer the output pixel, or at a tie of either
    first_near, second_near = 1 - frac >= 0.5, frac >= 0.5
    tie = first_near & second_near
    nearest = np.where(first_near, i0, np.minimum(i0 + 1, n_in - 1))
    run_start = np.flatnonzero(np.r_[True, (nearest[1:] != nearest[:-1]) | tie[1:] | tie[:-1]])
    axis = _Axis(i0, np.minimum(i0 + 1, n_in - 1), frac, count, np.cumsum(count) - count, run_start,
                 np.diff(np.r_[run_start, n_out]), nearest[run_start], np.flatnonzero(tie[run_start]))
    for array in axis:
        array.flags.writeable = False  # shared by every call with these sizes
    return axis


def upscale_mask(mask: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """A boolean mask scaled up to (out_h, out_w): bilinear interpolation of its 0/1 values,
    then >= 0.5. (Meant for scaling up: shrinking this way would skip pixels, not average them.)

    Precisely, in float64, with output pixel centres mapped onto the source and clamped,
    s = clip((i + 0.5) * n_in / n_out - 0.5, 0, n_in - 1), i0 = floor(s), i1 = min(i0 + 1,
    n_in - 1), f = s - i0 per axis: each source row is first interpolated along x,
    r = m[y, x0] + (m[y, x1] - m[y, x0]) * fx, then v = r[y0] + (r[y1] - r[y0]) * fy, and the
    result is v >= 0.5. (Pillow's bilinear resize of the mask as 0/255 differs only where v is
    within its 8-bit rounding of 0.5.)

    Computed without the float image: r takes only the values 0, 1, fx and 1 - fx, and in this
    form v >= 0.5 exactly when both r[y0] and r[y1] are (rounding cannot cross 0.5 between two
    values on one side of it). So the output is two source rows' agreement repeated over the
    block of output rows between them, and v is computed only where they straddle 0.5: a band
    along the lesion's edge, a few percent of a 30-megapixel frame.
    """
    mask = np.asarray(mask, dtype=bool)
    h = mask.shape[0]
    rows, cols = _axis(out_h, h), _axis(out_w, mask.shape[1])
    upper = mask[:, cols.run_source]  # (h, runs): r >= 0.5 of every source row, per column run
    if cols.tie_runs.size:
        tied = cols.run_start[cols.tie_runs]
        upper[:, cols.tie_runs] = mask[:, cols.i0[tied]] | mask[:, cols.i1[tied]]
    lower = np.vstack([upper[1:], upper[-1:]])  # the rows y1 = y0 + 1 (clamped) below them
    out = np.repeat(np.repeat(upper & lower, cols.run_len, axis=1), rows.count, axis=0)
    ys, ks = np.divmod(np.flatnonzero(upper ^ lower), upper.shape[1])  # straddling (row, run) pairs
    lens = cols.run_len[ks]
    ys = np.repeat(ys, lens)  # one entry per output column of each straddling run
    xs = np.arange(ys.size) + np.repeat(cols.run_start[ks] - np.cumsum(lens) + lens, lens)
    step = np.arange(rows.count.max())
    for lo in range(0, ys.size, _BAND_CHUNK):  # bounded memory even for a speckled mask
        y, x = ys[lo:lo + _BAND_CHUNK], xs[lo:lo + _BAND_CHUNK]
        top = _interpolate_x(mask, y, cols, x)
        bottom = _interpolate_x(mask, np.minimum(y + 1, h - 1), cols, x)
        inside = step < rows.count[y, None]
        band_rows = np.where(inside, rows.first[y, None] + step, 0)
        hit = inside & (top[:, None] + (bottom - top)[:, None] * rows.frac[band_rows] >= 0.5)
        out[band_rows[hit], np.broadcast_to(x[:, None], hit.shape)[hit]] = True
    return out


_BAND_CHUNK = 1 << 16


def _interpolate_x(mask: np.ndarray, y: np.ndarray, cols: _Axis, x: np.ndarray) -> np.ndarray:
    """`upscale_mask`'s r = a + (b - a) * fx at the points (y, x)."""
    a = mask[y, cols.i0[x]].astype(np.float64)
    return a + (mask[y, cols.i1[x]] - a) * cols.frac[x]


def restore(output: np.ndarray, t: Transform) -> np.ndarray:
    """A content-square output (size x size, float) -> float32 map at the original size.

    Bilinear, so a probability map stays a probability map and a binary mask restored as
    float and thresholded at 0.5 gets smooth edges instead of blocky ones.
    """
    inner = np.ascontiguousarray(_crop_inner(output, t), dtype=np.float32)
    return _resize(inner, t.orig_h, t.orig_w).astype(np.float32, copy=False)


def prepare(path: Path, size: int, fit: str, border: float = 0.0,
            margin: int = 0, chain: str = "direct") -> tuple[np.ndarray, Transform]:
    """Read one image file and return (model input uint8, its transform); `chain`: see CHAINS."""

    def inner_size(h: int, w: int) -> tuple[int, int]:  # from the header: the file is opened once
        t = plan_transform(h, w, size, fit, border)
        return t.inner_h, t.inner_w

    pixels, (orig_h, orig_w) = load_image(path, resize_to=inner_size, chain=chain, fit=fit)
    t = plan_transform(orig_h, orig_w, size, fit, border, margin)
    return fit_image(pixels, t), t


def prepare_pixels(pixels: np.ndarray, size: int, fit: str, border: float = 0.0,
                   margin: int = 0, chain: str = "direct") -> tuple[np.ndarray, Transform]:
    """`prepare` for an image already in memory (H x W x 3 uint8): the same geometry, the same
    input chain and the same resize, so a PNG file and its pixels give the same model input."""
    if chain not in CHAINS:
        raise InputError(f"unknown input chain {chain!r}; choose one of {', '.join(CHAINS)}.")
    t = plan_transform(pixels.shape[0], pixels.shape[1], size, fit, border, margin)
    if chain == "jpeg256":
        pixels = np.asarray(archive_copy(Image.fromarray(pixels), fit))
    return fit_image(pixels, t), t
