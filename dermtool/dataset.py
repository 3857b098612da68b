"""Training data drawn from one or several caches, with partial labels and a sampler.

Caches from different sources (ISIC 2017, HAM10000, ...) are used side by side without
copying: a global index i refers to image `i - offset[k]` of cache k. An image may lack a mask
or a label; `read` then returns a mask of -1 everywhere or a label of -1, which the losses
treat as "missing" (see dermtool.losses): nothing is guessed.

Samplers (`--sampler`):
- proportional: every image once per epoch, shuffled (an epoch is the whole data set unless
  `--steps-per-epoch` cuts it short or repeats it);
- balanced: images drawn with replacement so that melanoma, keratosis and nevus are equally
  likely among the labelled draws; images without a label keep their share of the draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dermtool.augment import MISSING as MISSING_MASK  # uint8 "no mask" in a batch; -1 in the target
from dermtool.data import NOT_MELANOMA, Cache

SAMPLERS = ("proportional", "balanced")
#: the classifier target row of a NOT_MELANOMA partial label: -1 in the melanoma column
#: (dermtool.losses reads it as "not melanoma", loss -log(1 - p_melanoma))
PARTIAL_ROW = (-1.0, 0.0, 0.0)


@dataclass
class TrainingSet:
    """Several caches seen as one; `resize[k]` says whether cache k must be resized on the fly."""

    caches: list[Cache]
    resize: list[bool]
    #: (N, classes) teacher probabilities per image, NaN where none (train --teacher; dermtool.distill)
    soft: np.ndarray | None = None

    def __post_init__(self):
        sizes = [len(c) for c in self.caches]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.labels = np.concatenate([c.labels for c in self.caches])
        self.has_mask = np.concatenate([
            c.has_mask & (c.masks is not None) for c in self.caches])
        self.sources = np.repeat(np.arange(len(self.caches)), sizes)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_classes_present(self) -> np.ndarray:
        known = (self.labels >= 0) & (self.labels < NOT_MELANOMA)
        return np.bincount(self.labels[known], minlength=3)

    def read(self, indices: np.ndarray, cfg):
        """uint8 images (B, in, in, 3), uint8 masks (B, s, s) with MISSING_MASK where none, labels.

        Rows come back in the order of `indices`.
        """
        indices = np.asarray(indices, dtype=np.int64)
        input_size, size, with_masks = cfg.input_size, cfg.size, cfg.has_seg
        images = np.empty((len(indices), input_size, input_size, 3), np.uint8)
        masks = np.full((len(indices), size, size), MISSING_MASK, np.uint8) if with_masks else None
        labels = np.empty(len(indices), np.int64)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        for k in np.unique(which):
            rows = np.flatnonzero(which == k)
            local = indices[rows] - self.offsets[k]
            order = np.argsort(local, kind="stable")  # make_batches reads in sorted order
            img, msk, lab = make_batches(self.caches[k], cfg, local[order], self.resize[k])
            images[rows[order]] = img
            labels[rows[order]] = lab
            if with_masks and msk is not None:
                ok = self.caches[k].has_mask[np.sort(local)]
                masks[rows[order][ok]] = msk[ok]
        return images, masks, labels


def steps_per_epoch(n: int, batch_size: int, requested: int | None) -> int:
    return int(requested) if requested else math.ceil(n / batch_size)


def epoch_indices(data: TrainingSet, sampler: str, seed: int, epoch: int, steps: int, batch_size: int) -> np.ndarray:
    """The image indices of one epoch, in training order (a pure function of seed and epoch)."""
    rng = np.random.default_rng([seed, epoch])
    n, want = len(data), steps * batch_size
    if sampler == "proportional":
        reps = math.ceil(want / n)
        order = np.concatenate([rng.permutation(n) for _ in range(reps)])
        return order[:want]
    if sampler == "balanced":
        return rng.choice(n, size=want, replace=True, p=balanced_probabilities(data.labels, sources=data.sources))
    raise ValueError(f"unknown sampler {sampler!r}")


def balanced_probabilities(labels: np.ndarray, n_classes: int = 3, sources: np.ndarray | None = None) -> np.ndarray:
    """Draw probability per image: labelled mass split equally over the classes present.

    Partial labels (NOT_MELANOMA) are balanced within their own source (`sources`, the cache of
    each image): together they are drawn as often as that source's melanomas, less its
    keratoses and nevi (never below their share as unlabelled images). So a source of mostly
    melanomas, like the ISIC 2020 selection, is not "this source means melanoma".
    """
    labels = np.asarray(labels)
    n = len(labels)
    sources = np.zeros(n, np.int64) if sources is None else np.asarray(sources)
    full = (labels >= 0) & (labels < n_classes)
    partial = labels == NOT_MELANOMA
    counts = np.bincount(labels[full], minlength=n_classes)
    present = counts > 0
    p = np.where(full, 0.0, 1.0 / n)
    mass = full.sum() / n
    for c in np.flatnonzero(present):
        p[labels == c] = mass / present.sum() / counts[c]
    for k in np.unique(sources[partial]):
        here = sources == k
        melanoma = p[here & (labels == 0)].sum()
        benign = p[here & full & (labels != 0)].sum()
        rows = here & partial
        p[rows] = max(melanoma - benign, rows.sum() / n) / rows.sum()
    return p / p.sum()


def _resize_batch(arr: np.ndarray, size: int, is_mask: bool) -> np.ndarray:
    from dermtool.preprocess import _resize

    if is_mask:
        return np.stack([_resize(m.astype(np.float32), size, size) >= 0.5 for m in arr]).astype(np.uint8)
    return np.stack([_resize(np.ascontiguousarray(a), size, size) for a in arr])


def make_batches(cache: Cache, cfg, indices: np.ndarray, resize: bool):
    """Raw batch (uint8 images, {0,1} masks or None, int labels) for the given indices."""
    idx = np.sort(indices)  # sorted reads are sequential on the memory map
    images = np.asarray(cache.images[idx])
    masks = np.asarray(cache.masks[idx]) if (cfg.has_seg and cache.masks is not None) else None
    if resize:
        images = _resize_batch(images, cfg.input_size, False)
        masks = None if masks is None else _resize_batch(masks, cfg.size, True)
    return images, masks, cache.labels[idx]


def targets(cfg, masks, labels, soft: np.ndarray | None = None, distill: float = 0.0) -> dict:
    """Model targets; a missing mask (MISSING_MASK) becomes -1 and a missing label (-1) a zero row,
    which the losses skip, and a NOT_MELANOMA partial label the row PARTIAL_ROW (dermtool.losses).

    `soft` (teacher probabilities per row, NaN where none) and `distill` (its weight) mix a
    teacher into the rows with a true class (dermtool.distill.blend)."""
    y = {}
    if cfg.has_seg:
        seg = masks[..., None].astype(np.float32)
        seg[masks[..., None] == MISSING_MASK] = -1.0
        y["seg"] = seg
    if cfg.has_cls:
        labels = np.asarray(labels)
        onehot = np.zeros((len(labels), len(cfg.class_names)), np.float32)
        known = (labels >= 0) & (labels < len(cfg.class_names))
        onehot[np.flatnonzero(known), labels[known]] = 1.0
        onehot[labels == NOT_MELANOMA] = PARTIAL_ROW
        if soft is not None and distill:
            from dermtool.distill import blend

            onehot = blend(onehot, soft, distill)
        y["cls"] = onehot
    return y
