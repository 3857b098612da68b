"""Post-processing of a lesion probability map (thesis section IX).

threshold -> morphological closing -> largest connected component -> hole filling, each step
switchable. Works at the model's resolution; `dermtool.preprocess.restore` then brings the
mask back to the original image size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage
from skimage.measure import label
from skimage.morphology import disk


#: the widest closing infer takes: wider joins areas a third of the bundled model's square apart
CLOSING_RADIUS_MAX = 32


@dataclass(frozen=True)
class PostprocessConfig:
    threshold: float | None = 0.5  # None: the model's own (config.json), filled in by infer
    closing_radius: int = 3  # pixels at model resolution; 0 switches closing off
    largest_component: bool = True
    fill_holes: bool = True

    def __post_init__(self):
        """The ranges `dermtool infer` checks, for the Python API too: a threshold of 2 once gave
        empty masks without a word."""
        from dermtool.errors import InputError

        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating))
                              or not 0.0 <= t <= 1.0):
            raise InputError(f"threshold must be a lesion probability from 0 to 1 (or None: the model's), not {t!r}.")
        r = self.closing_radius
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= r <= CLOSING_RADIUS_MAX:
            raise InputError(f"closing_radius must be a whole number of model pixels from 0 (off) to "
                             f"{CLOSING_RADIUS_MAX}, not {r!r}.")
        for name in ("largest_component", "fill_holes"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"{name} must be True or False, not {getattr(self, name)!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


def closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with a disk; the image edge is not treated as background.

    (A plain closing erodes everything that touches the border back off, because the
    outside counts as background; replicating the edge avoids that.)

    The result is exactly `_reference_closing`'s (scipy on the edge-padded mask): a disk is a
    stack of centred horizontal runs, so dilating (eroding) by it is the OR (AND) over its rows
    of shifted 1-D run dilations (erosions), each a few slices: ~8x less CPU than scipy's
    pass at radius 3 (bench/pipeline_bench.py).
    """
    if radius <= 0:
        return mask
    r = radius
    # scipy dilates the edge-padded mask with zeros beyond it (border_value=0): pad r more
    # zeros so every neighbourhood is a plain slice
    outer = np.zeros((mask.shape[0] + 4 * r, mask.shape[1] + 4 * r), bool)
    outer[r:-r, r:-r] = np.pad(np.asarray(mask, dtype=bool), r, mode="edge")
    halves = _disk_half_widths(r)
    dilated = _disk_reduce(outer, halves, np.logical_or)  # the edge-padded frame
    return _disk_reduce(dilated, halves, np.logical_and)  # the original frame


@lru_cache(maxsize=None)
def _disk_half_widths(radius: int) -> tuple[int, ...]:
    """Half-width of each row of `disk(radius)`, top to bottom (its rows are centred runs)."""
    return tuple(radius - int(np.argmax(row)) for row in disk(radius))


def _disk_reduce(a: np.ndarray, halves: tuple[int, ...], op) -> np.ndarray:
    """`op` over the disk around each pixel of `a` that lies a radius r inside its edge:
    (H, W) -> (H - 2r, W - 2r)."""
    r = len(halves) // 2
    h, w = a.shape[0] - 2 * r, a.shape[1] - 2 * r
    runs = [a[:, r:r + w]]  # runs[k]: op over the 2k+1 pixels of a row centred on each pixel
    for k in range(1, max(halves) + 1):
        run = op(runs[-1], a[:, r - k:r - k + w])
        runs.append(op(run, a[:, r + k:r + k + w], out=run))
    out = runs[halves[0]][:h].copy()
    for dy in range(1, 2 * r + 1):
        op(out, runs[halves[dy]][dy:dy + h], out=out)
    return out


def _reference_closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """The definition `closing` reproduces, with scipy (for tests and bench/pipeline_bench.py)."""
    if radius <= 0:
        return mask
    padded = np.pad(mask, radius, mode="edge")
    closed = ndimage.binary_closing(padded, structure=disk(radius))
    return closed[radius:-radius, radius:-radius]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected component (ties: the first in label order)."""
    box = _foreground_box(mask)  # every component, in the same raster order: label only there
    if box is None:
        return mask
    labels, n = label(mask[box], connectivity=2, return_num=True)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    kept = np.zeros(mask.shape, bool)
    kept[box] = labels == int(np.argmax(sizes))
    return kept


def _reference_largest_component(mask: np.ndarray) -> np.ndarray:
    """`largest_component` labelling the whole frame (for tests and bench/pipeline_bench.py)."""
    labels, n = label(mask, connectivity=2, return_num=True)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the background areas that do not reach the image edge (4-connected).

    Exactly `scipy.ndimage.binary_fill_holes(mask)` for a 2-D mask, but with one labelling of
    the background instead of scipy's iterated dilation from the border, and only inside the
    lesion's bounding box: everything outside it is background joined to the edge, so there a
    background area reaches the image edge exactly when it reaches the box's.
    """
    mask = np.asarray(mask, dtype=bool)
    box = _foreground_box(mask)
    if box is None:
        return mask.copy()
    labels, n = ndimage.label(~mask[box])  # default structure: 4-connected, as binary_fill_holes
    outside = np.zeros(n + 1, bool)
    outside[labels[0]] = outside[labels[-1]] = outside[labels[:, 0]] = outside[labels[:, -1]] = True
    outside[0] = False  # label 0 is the lesion itself
    filled = mask.copy()
    filled[box] = ~outside[labels]
    return filled


def _foreground_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The smallest rectangle holding every foreground pixel; None when there is none. (On the
    ISIC validation images the bundled model's lesion boxes are a median 12 % of the frame.)"""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def postprocess(prob: np.ndarray, cfg: PostprocessConfig = PostprocessConfig()) -> np.ndarray:
    """Probability map (H, W) -> boolean lesion mask (H, W)."""
    mask = np.asarray(prob) >= cfg.threshold
    mask = closing(mask, cfg.closing_radius)
    if cfg.largest_component:
        mask = largest_component(mask)
    if cfg.fill_holes:
        mask = fill_holes(mask)
    return mask
