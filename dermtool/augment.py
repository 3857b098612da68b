"""Training-time augmentation, in numpy on whole batches.

Every sample draws its own transform from one `numpy.random.Generator` that lives for the whole
run, so two epochs (and two samples) see different transforms while a seeded run repeats
exactly. (The thesis code re-seeded per sample, so every image got the same flip.)
"""

from __future__ import annotations

import numpy as np

MODES = ("none", "flips", "flips+color")


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square (k in 0..7) on an (H, W, ...) array."""
    if k & 4:
        x = np.swapaxes(x, 0, 1)
    if k & 2:
        x = x[::-1]
    if k & 1:
        x = x[:, ::-1]
    return x


def undo_dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """The inverse of `dihedral(., k)`: undo the flips, then the transpose."""
    if k & 1:
        x = x[:, ::-1]
    if k & 2:
        x = x[::-1]
    if k & 4:
        x = np.swapaxes(x, 0, 1)
    return x


def augment_batch(images: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator,
                  mode: str = "flips+color") -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Augment a batch; image and mask of a sample get the same geometric transform.

    Args:
        images: uint8 (N, H, W, 3), square.
        masks: (N, H, W) or None.
    Returns:
        (float32 images in 0..255, masks, the dihedral code drawn for each sample).
    """
    n = images.shape[0]
    if mode == "none":
        return images.astype(np.float32), masks, np.zeros(n, np.int64)
    if mode not in MODES:
        raise ValueError(f"unknown augmentation {mode!r}; choose one of {', '.join(MODES)}")
    codes = rng.integers(0, 8, size=n)
    out = np.empty(images.shape, np.float32)
    out_masks = None if masks is None else np.empty_like(masks)
    for i, k in enumerate(codes):
        out[i] = dihedral(images[i], int(k))
        if masks is not None:
            out_masks[i] = dihedral(masks[i], int(k))
    if mode == "flips+color":
        # mild jitter: brightness, contrast and per-channel gain, as dermoscopes differ
        brightness = rng.uniform(-20, 20, size=(n, 1, 1, 1))
        contrast = rng.uniform(0.85, 1.15, size=(n, 1, 1, 1))
        gain = rng.uniform(0.93, 1.07, size=(n, 1, 1, 3))
        mean = out.mean(axis=(1, 2, 3), keepdims=True)
        out = (out - mean) * contrast + mean + brightness
        out *= gain
        np.clip(out, 0, 255, out=out)
    return out.astype(np.float32, copy=False), out_masks, codes
