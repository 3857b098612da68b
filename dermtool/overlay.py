"""Drawing on images: lesion contours and a class label sized to the image.

The one drawing path of dermtool: `infer --overlay` (full size), the thumbnails of the infer
report and the worst-segmented sheet of `score --plots` all call `draw_overlay`, so a contour
or a label looks the same wherever a person meets it. Pillow and scikit-image only: scoring
must not import TensorFlow.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dermtool import CLASS_NAMES

#: Contour colours: the prediction green (as before), the ground truth magenta, both of which
#: stand out from skin tones and from each other.
PRED_COLOUR = (0, 255, 0)
TRUTH_COLOUR = (255, 0, 255)
#: Label box colour per class, dark enough for white text: melanoma red, SK amber, nevus blue.
CLASS_COLOURS = {"melanoma": (160, 20, 30), "seborrheic_keratosis": (150, 95, 0), "nevus": (25, 70, 150)}
#: Readable class names for labels and pages, and short ones for narrow columns.
DISPLAY_NAMES = {"melanoma": "melanoma", "seborrheic_keratosis": "seborrheic keratosis", "nevus": "nevus"}
SHORT_NAMES = {"melanoma": "melanoma", "seborrheic_keratosis": "seb. keratosis", "nevus": "nevus"}


def label_text(class_name: str, probability: float | None = None) -> str:
    """"melanoma 0.83": the class as a person reads it, with its probability when known."""
    name = DISPLAY_NAMES.get(class_name, class_name)
    return name if probability is None else f"{name} {probability:.2f}"


def contour_width(shape: tuple[int, ...]) -> int:
    """Contour thickness in pixels: about 1/300 of the long side, at least 2 so a thumbnail shows it."""
    return max(2, round(max(shape[:2]) / 300))


def label_size(shape: tuple[int, ...]) -> int:
    """Font size in pixels: 4.5 % of the short side (a 4000 x 3000 image gets 135 px), at least 13."""
    return max(13, round(0.045 * min(shape[:2])))


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)-pixel square, as row and column shifts (outside counts as 0)."""
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        view_out, view_src = np.moveaxis(out, axis, 0), np.moveaxis(src, axis, 0)
        for k in range(1, radius + 1):
            view_out[k:] |= view_src[:-k]
            view_out[:-k] |= view_src[k:]
    return out


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    """A ring `width` pixels thick on the boundary of a boolean mask, half outside, half inside.

    Plain array shifts: several times cheaper than skimage's find_boundaries plus a dilation,
    which matters for the thousands of report thumbnails. The image frame is not a boundary (a
    lesion cut by the frame gets no line along it).
    """
    mask = np.asarray(mask, dtype=bool)
    return _grow(mask, (width + 1) // 2) & _grow(~mask, width // 2)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, OSError, ImportError):  # older Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def draw_overlay(pixels: np.ndarray, mask: np.ndarray | None = None, label: str = "",
                 colour: tuple[int, int, int] = (0, 0, 0), truth: np.ndarray | None = None) -> Image.Image:
    """The image with the lesion contour(s) and a label box in its top-left corner.

    Args:
        pixels: (H, W, 3) uint8 RGB.
        mask: predicted lesion mask (H, W), drawn in `PRED_COLOUR`; None draws none.
        label: text of the label box (see `label_text`); "" draws no box.
        colour: fill of the label box (white text on it).
        truth: ground-truth mask (H, W), drawn in `TRUTH_COLOUR` under the prediction.

    Returns:
        a new RGB PIL image; `pixels` is not changed.
    """
    out = np.array(pixels, dtype=np.uint8, copy=True)
    width = contour_width(out.shape)
    for m, rgb in ((truth, TRUTH_COLOUR), (mask, PRED_COLOUR)):
        if m is not None:
            out[_edge(m, width)] = rgb
    img = Image.fromarray(out)
    if label:
        size = label_size(out.shape)
        pad = max(2, size // 4)
        draw = ImageDraw.Draw(img)
        font = _font(size)
        left, top, right, bottom = draw.textbbox((pad, pad), label, font=font)
        draw.rectangle((0, 0, right + pad, bottom + pad), fill=colour)
        draw.text((pad, pad), label, fill=(255, 255, 255), font=font)
    return img


def class_label(probabilities, class_names=CLASS_NAMES, k: int | None = None) -> tuple[str, tuple[int, int, int]]:
    """(label text, box colour) of class `k` (default: the argmax) of a probability vector."""
    k = int(np.argmax(probabilities)) if k is None else int(k)
    name = class_names[k]
    return label_text(name, float(probabilities[k])), CLASS_COLOURS.get(name, (0, 0, 0))


def thumbnail_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) with the long side `side` (never enlarged), the aspect ratio kept."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def read_mask_at(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A mask image, read as the scorer reads it (`io.read_mask`), as a boolean mask of size (h, w).

    Resized by taking the nearest pixel: exact enough for a contour on a thumbnail, and nearly
    free beside the PNG decoding, which matters for thousands of report thumbnails.
    """
    from dermtool.io import read_mask

    mask = read_mask(path)
    if mask.shape != tuple(size):
        rows = np.arange(size[0]) * mask.shape[0] // size[0]
        cols = np.arange(size[1]) * mask.shape[1] // size[1]
        mask = mask[rows[:, None], cols]
    return mask
