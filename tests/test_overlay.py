"""dermtool.overlay: the one drawing of contours and labels (infer --overlay, report, score sheet)."""

from __future__ import annotations

import numpy as np
import pytest

from dermtool.overlay import (PRED_COLOUR, TRUTH_COLOUR, class_label, contour_width, draw_overlay,
                              label_size, label_text, read_mask_at, thumbnail_size)


def _square_mask(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
    return mask


def test_label_names_the_class_and_its_probability():
    assert label_text("seborrheic_keratosis", 0.8349) == "seborrheic keratosis 0.83"
    assert label_text("nevus") == "nevus"
    text, colour = class_label(np.array([0.1, 0.2, 0.7]))
    assert text == "nevus 0.70" and colour != (0, 0, 0)


@pytest.mark.parametrize("shape, font", [((3000, 4000), 135), ((450, 600), 20), ((96, 128), 13)])
def test_label_and_contour_scale_with_the_image(shape, font):
    assert label_size(shape) == font
    assert contour_width(shape) == max(2, round(max(shape) / 300))


def test_label_box_height_follows_the_font_size():
    # The box is the only black-filled area: its height is the text's plus padding, so the label
    # of a 4000 px original is about 135 px tall, not the few pixels of a fixed-size font.
    for h, w in ((150, 200), (3000, 4000)):
        img = np.asarray(draw_overlay(np.full((h, w, 3), 200, np.uint8), None, "melanoma 0.91"))
        box_height = np.flatnonzero((img[:, 0] == 0).all(axis=1)).max() + 1
        assert label_size((h, w)) <= box_height <= 1.8 * label_size((h, w))


def test_contours_are_drawn_on_the_boundary_only():
    pixels = np.full((60, 80, 3), 128, np.uint8)
    mask = _square_mask(60, 80)
    img = np.asarray(draw_overlay(pixels, mask, truth=np.roll(mask, 5, axis=1)))
    green = (img == PRED_COLOUR).all(axis=-1)
    magenta = (img == TRUTH_COLOUR).all(axis=-1)
    assert green.any() and magenta.any()
    assert not green[20:25, 25:50].any()  # inside the lesion: untouched
    assert (img[~(green | magenta)] == 128).all()
    assert (pixels == 128).all()  # the input is not drawn on


def test_thumbnail_size_keeps_the_aspect_and_never_enlarges():
    assert thumbnail_size(3000, 4000, 320) == (240, 320)
    assert thumbnail_size(4000, 3000, 320) == (320, 240)
    assert thumbnail_size(50, 70, 320) == (50, 70)


def test_read_mask_at_resizes_a_mask_png(tmp_path):
    from PIL import Image

    mask = _square_mask(300, 400)
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    small = read_mask_at(tmp_path / "m.png", (30, 40))
    assert small.shape == (30, 40) and small.dtype == bool
    assert small.sum() == pytest.approx(mask.sum() / 100, rel=0.1)


@pytest.mark.parametrize("width", [2, 3, 13])
def test_contour_ring_is_dilation_minus_erosion_and_ignores_the_frame(width):
    from scipy import ndimage

    from dermtool.overlay import _edge

    mask = np.zeros((60, 90), bool)
    mask[:40, 20:70] = True  # cut by the top of the frame
    square = np.ones((3, 3), bool)
    grown = ndimage.binary_dilation(mask, square, iterations=(width + 1) // 2)
    shrunk = ndimage.binary_erosion(mask, square, iterations=width // 2, border_value=1) if width > 1 else mask
    assert (_edge(mask, width) == (grown & ~shrunk)).all()
    assert not _edge(mask, width)[0, 30:60].any()  # no line along the frame
