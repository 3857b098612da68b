"""Post-processing (thesis §IX) on hand-made literal arrays: each step alone, the edge rule of
the closing, and each step switched off through `PostprocessConfig`."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dermtool.postprocess import (
    PostprocessConfig,
    _reference_closing,
    _reference_largest_component,
    closing,
    fill_holes,
    largest_component,
    postprocess,
)

THRESHOLD_ONLY = PostprocessConfig(closing_radius=0, largest_component=False, fill_holes=False)


def b(rows: list[str]) -> np.ndarray:
    """A boolean mask from rows of '0'/'1' characters (readable literals)."""
    return np.array([[c == "1" for c in row] for row in rows], dtype=bool)


# Two blocks, 3 and 2 columns wide, separated by a 1-pixel column (column 4).
GAP = b([
    "000000000",
    "011101100",
    "011101100",
    "011101100",
    "000000000",
])
# A radius-1 closing (a 3x3 cross) fills the gap where it has lesion above and below it after
# the dilation: the middle row only. The outer corners stay as they were.
GAP_CLOSED = b([
    "000000000",
    "011101100",
    "011111100",
    "011101100",
    "000000000",
])

# A diagonal line of 4 pixels (one 8-connected component, four 4-connected ones) and a
# 3-pixel bar (one component either way).
DIAGONAL_VS_BAR = b([
    "1000111",
    "0100000",
    "0010000",
    "0001000",
])
DIAGONAL_ONLY = b([
    "1000000",
    "0100000",
    "0010000",
    "0001000",
])

# A ring around a 3x3 hole, and a C open to the top edge: its "hole" touches the image edge,
# so it is background, not a hole.
RING_AND_C = b([
    "00000000101",
    "01111100101",
    "01000100111",
    "01000100000",
    "01000100000",
    "01111100000",
])
RING_FILLED = b([
    "00000000101",
    "01111100101",
    "01111100111",
    "01111100000",
    "01111100000",
    "01111100000",
])

# A lesion filling the left part of the frame, its straight edge on the image border.
BORDER_LESION = b([
    "11110000",
    "11111000",
    "11111000",
    "11111000",
    "11111000",
    "11110000",
])


def test_threshold_is_inclusive_and_uses_the_configured_value():
    prob = np.array([[0.0, 0.49, 0.5], [0.51, 0.7, 1.0]], dtype=np.float32)
    assert np.array_equal(postprocess(prob, THRESHOLD_ONLY), b(["001", "111"]))
    high = PostprocessConfig(threshold=0.7, closing_radius=0, largest_component=False, fill_holes=False)
    assert np.array_equal(postprocess(prob, high), b(["000", "011"]))
    assert postprocess(prob, THRESHOLD_ONLY).dtype == bool


def test_closing_joins_a_one_pixel_gap():
    assert np.array_equal(closing(GAP, 1), GAP_CLOSED)
    assert np.array_equal(closing(GAP, 0), GAP)


def test_largest_component_uses_8_connectivity():
    assert np.array_equal(largest_component(DIAGONAL_VS_BAR), DIAGONAL_ONLY)
    # with 4-connectivity the bar (3 pixels) would have won over single diagonal pixels
    _, n4 = ndimage.label(DIAGONAL_VS_BAR)
    assert n4 == 5


def test_largest_component_keeps_the_bigger_blob_and_handles_empty():
    two = b(["1100000", "1100011", "0000000"])
    assert np.array_equal(largest_component(two), b(["1100000", "1100000", "0000000"]))
    empty = np.zeros((3, 4), bool)
    assert not largest_component(empty).any()


def test_hole_filling_fills_enclosed_holes_only():
    cfg = PostprocessConfig(closing_radius=0, largest_component=False, fill_holes=True)
    assert np.array_equal(postprocess(RING_AND_C.astype(np.float32), cfg), RING_FILLED)


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_closing_does_not_erode_a_lesion_touching_the_border(radius):
    assert np.array_equal(closing(BORDER_LESION, radius), BORDER_LESION)
    # the case is not vacuous: a plain closing treats the outside as background and erodes it
    plain = ndimage.binary_closing(BORDER_LESION, structure=ndimage.generate_binary_structure(2, 1),
                                   iterations=radius)
    assert not np.array_equal(plain, BORDER_LESION)


def test_full_chain_on_defaults_keeps_one_filled_lesion():
    """threshold -> closing (radius 3) -> largest component -> fill holes, all on (the CLI
    defaults): a 15x15 lesion with a 7x7 hole, whose centre is 4 px from the lesion and so
    out of the closing's reach, and a speck 11 px away, beyond the closing's 6 px bridge."""
    prob = np.full((19, 30), 0.1, dtype=np.float32)
    prob[2:17, 2:17] = 0.8
    prob[5:12, 5:12] = 0.2
    prob[9, 28] = 0.95
    expected = np.zeros(prob.shape, bool)
    expected[2:17, 2:17] = True
    assert np.array_equal(postprocess(prob, PostprocessConfig()), expected)
    # each later step did work: without the fill the hole's centre stays open, and without
    # the largest component the speck survives
    assert not postprocess(prob, PostprocessConfig(fill_holes=False))[8, 8]
    assert postprocess(prob, PostprocessConfig(largest_component=False))[9, 28]


# --- each step switchable ---------------------------------------------------------------------


def test_closing_switch():
    prob = GAP.astype(np.float32)
    on = postprocess(prob, PostprocessConfig(closing_radius=1, largest_component=True, fill_holes=True))
    off = postprocess(prob, PostprocessConfig(closing_radius=0, largest_component=True, fill_holes=True))
    assert np.array_equal(on, GAP_CLOSED)  # one joined component survives whole
    assert np.array_equal(off, b([       # without the closing, the smaller block is dropped
        "000000000",
        "011100000",
        "011100000",
        "011100000",
        "000000000",
    ]))


def test_largest_component_switch():
    prob = DIAGONAL_VS_BAR.astype(np.float32)
    on = postprocess(prob, PostprocessConfig(closing_radius=0, largest_component=True, fill_holes=True))
    off = postprocess(prob, PostprocessConfig(closing_radius=0, largest_component=False, fill_holes=True))
    assert np.array_equal(on, DIAGONAL_ONLY)
    assert np.array_equal(off, DIAGONAL_VS_BAR)


def test_fill_holes_switch():
    prob = RING_AND_C.astype(np.float32)
    on = postprocess(prob, PostprocessConfig(closing_radius=0, largest_component=False, fill_holes=True))
    off = postprocess(prob, PostprocessConfig(closing_radius=0, largest_component=False, fill_holes=False))
    assert np.array_equal(on, RING_FILLED)
    assert np.array_equal(off, RING_AND_C)


def test_config_records_every_step():
    cfg = PostprocessConfig(threshold=0.4, closing_radius=0, largest_component=False, fill_holes=True)
    assert cfg.to_dict() == {"threshold": 0.4, "closing_radius": 0, "largest_component": False,
                             "fill_holes": True}
    assert PostprocessConfig().to_dict() == {"threshold": 0.5, "closing_radius": 3,
                                             "largest_component": True, "fill_holes": True}


# --- the fast closing and hole filling against scipy -------------------------------------------


def _random_masks(seed: int, count: int):
    """Seeded masks of many shapes (1 px to 70 px sides): speckle of every density, and blobs
    with holes, bays and border contact like a thresholded lesion map."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (int(n) for n in rng.integers(1, 71, 2))
        if i % 2:
            yield rng.random((h, w)) < rng.random()
        else:
            seeds = rng.random((h, w)) < rng.uniform(0.002, 0.05)
            blob = ndimage.binary_dilation(seeds, iterations=int(rng.integers(1, 8)))
            yield blob ^ (rng.random((h, w)) < rng.uniform(0, 0.1))


EDGE_CASES = {
    "empty": np.zeros((9, 11), bool),
    "full": np.ones((9, 11), bool),
    "one pixel, set": np.ones((1, 1), bool),
    "one pixel, clear": np.zeros((1, 1), bool),
    "single pixel in the middle": np.pad(np.ones((1, 1), bool), 5),
    "single row": b(["0110100111"]),
    "single column": b(["0", "1", "1", "0", "1"]),
    "touching every border": BORDER_LESION | BORDER_LESION[::-1, ::-1],
    "ring and C": RING_AND_C,
}


@pytest.mark.parametrize("radius", range(7))
def test_closing_equals_scipy_on_random_masks(radius):
    for mask in _random_masks(seed=radius, count=120):
        assert np.array_equal(closing(mask, radius), _reference_closing(mask, radius)), mask.shape


@pytest.mark.parametrize("name", EDGE_CASES)
@pytest.mark.parametrize("radius", range(7))
def test_closing_equals_scipy_on_edge_cases(name, radius):
    mask = EDGE_CASES[name]
    assert np.array_equal(closing(mask, radius), _reference_closing(mask, radius))


def test_closing_with_a_large_radius_equals_scipy():
    """The CLI allows radii up to 32, wider than the mask itself here."""
    for radius in (12, 32):
        for mask in _random_masks(seed=100 + radius, count=10):
            assert np.array_equal(closing(mask, radius), _reference_closing(mask, radius))


def test_largest_component_equals_labelling_the_whole_frame():
    """Labelled inside the foreground's box only: same component, ties (many equal specks in
    the speckle masks) included."""
    for mask in _random_masks(seed=11, count=400):
        assert np.array_equal(largest_component(mask), _reference_largest_component(mask)), mask.shape
    for name, mask in EDGE_CASES.items():
        assert np.array_equal(largest_component(mask), _reference_largest_component(mask)), name


def test_largest_component_tie_keeps_the_first_in_raster_order():
    two = b(["000000", "000011", "110011", "110000"])  # equal squares; the right one starts higher
    assert np.array_equal(largest_component(two), b(["000000", "000011", "000011", "000000"]))


def test_fill_holes_equals_scipy_on_random_masks():
    for mask in _random_masks(seed=7, count=400):
        assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask)), mask.shape


@pytest.mark.parametrize("name", EDGE_CASES)
def test_fill_holes_equals_scipy_on_edge_cases(name):
    mask = EDGE_CASES[name]
    filled = fill_holes(mask)
    assert filled.dtype == bool and np.array_equal(filled, ndimage.binary_fill_holes(mask))


def test_fill_holes_fills_an_island_in_a_hole_and_its_own_hole():
    nested = b([
        "1111111",
        "1000001",
        "1011101",
        "1010101",
        "1011101",
        "1000001",
        "1111111",
    ])
    assert fill_holes(nested).all()
    # an 8-connected gap in the ring is not an opening: the background is 4-connected
    diagonal_gap = b([
        "01110",
        "10001",
        "10001",
        "01110",
    ])
    assert fill_holes(diagonal_gap)[1:3, 1:4].all()
