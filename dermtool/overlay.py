"""Drawing on images: lesion contours and a class label sized to the image.

The one drawing path of dermtool: `infer --overlay` (full size), the thumbnails of the infer
report and the worst-segmented sheet of `score --plots` all call `draw_overlay`, so a contour
or a label looks the same wherever a person meets it. Pillow and scikit-image only: scoring
must not import TensorFlow.
"""

from __future__ import annotations

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


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    """The outer boundary of a boolean mask, `width` pixels thick."""
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    edge = find_boundaries(np.asarray(mask, dtype=bool), mode="outer")
    if width > 1:
        edge = ndimage.binary_dilation(edge, iterations=width - 1)
    return edge


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


def class_label(probabilities, class_names=CLASS_NAMES) -> tuple[str, tuple[int, int, int]]:
    """(label text, box colour) of the predicted class of a probability vector."""
    k = int(np.argmax(probabilities))
    name = class_names[k]
    return label_text(name, float(probabilities[k])), CLASS_COLOURS.get(name, (0, 0, 0))


def thumbnail_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) with the long side `side` (never enlarged), the aspect ratio kept."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def read_mask_at(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A 0/255 mask PNG read as a boolean mask resized to (h, w) (area average, > 50 %)."""
    with Image.open(path) as img:
        gray = img.convert("L")
        if gray.size != (size[1], size[0]):
            # reducing_gap: integer box-reduce first, then a cheap bilinear step
            gray = gray.resize((size[1], size[0]), Image.BILINEAR, reducing_gap=2.0)
        return np.asarray(gray) > 127
