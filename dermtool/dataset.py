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

from dermtool.data import Cache

SAMPLERS = ("proportional", "balanced")
MISSING_MASK = 255  # uint8 marker for "no mask" in a batch; becomes -1 in the target


@dataclass
class TrainingSet:
    """Several caches seen as one; `resize[k]` says whether cache k must be resized on the fly."""

    caches: list[Cache]
    resize: list[bool]

    def __post_init__(self):
        sizes = [len(c) for c in self.caches]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.labels = np.concatenate([c.labels for c in self.caches])
        self.has_mask = np.concatenate([
            c.has_mask & (c.masks is not None) for c in self.caches])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_classes_present(self) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=3)

    def read(self, indices: np.ndarray, cfg):
        """uint8 images (B, in, in, 3), uint8 masks (B, s, s) with MISSING_MASK where none, labels.

        Rows come back in the order of `indices`.
        """
        from dermtool.train import make_batches

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
        return rng.choice(n, size=want, replace=True, p=balanced_probabilities(data.labels))
    raise ValueError(f"unknown sampler {sampler!r}")


def balanced_probabilities(labels: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Draw probability per image: labelled mass split equally over the classes present."""
    labels = np.asarray(labels)
    n = len(labels)
    labelled = labels >= 0
    counts = np.bincount(labels[labelled], minlength=n_classes)
    present = counts > 0
    p = np.where(labelled, 0.0, 1.0 / n)
    mass = labelled.sum() / n
    for c in np.flatnonzero(present):
        p[labels == c] = mass / present.sum() / counts[c]
    return p / p.sum()
