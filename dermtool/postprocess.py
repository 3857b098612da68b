"""Post-processing of a lesion probability map (thesis section IX).

threshold -> morphological closing -> largest connected component -> hole filling, each step
switchable. Works at the model's resolution; `dermtool.preprocess.restore` then brings the
mask back to the original image size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import label
from skimage.morphology import disk


@dataclass(frozen=True)
class PostprocessConfig:
    threshold: float | None = 0.5  # None: the model's own (config.json), filled in by infer
    closing_radius: int = 3  # pixels at model resolution; 0 switches closing off
    largest_component: bool = True
    fill_holes: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with a disk; the image edge is not treated as background.

    (A plain closing erodes everything that touches the border back off, because the
    outside counts as background; replicating the edge avoids that.)
    """
    if radius <= 0:
        return mask
    padded = np.pad(mask, radius, mode="edge")
    closed = ndimage.binary_closing(padded, structure=disk(radius))
    return closed[radius:-radius, radius:-radius]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected component (ties: the first in label order)."""
    labels, n = label(mask, connectivity=2, return_num=True)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def postprocess(prob: np.ndarray, cfg: PostprocessConfig = PostprocessConfig()) -> np.ndarray:
    """Probability map (H, W) -> boolean lesion mask (H, W)."""
    mask = np.asarray(prob) >= cfg.threshold
    mask = closing(mask, cfg.closing_radius)
    if cfg.largest_component:
        mask = largest_component(mask)
    if cfg.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask
