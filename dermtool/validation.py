"""Epoch-end validation: the model over a validation cache, scored with `dermtool score`'s metrics.

Used by the training loop (dermtool.train.EpochEnd) after every epoch. Melanoma AUC counts
partial labels (benign, class unknown: NOT_MELANOMA) as negatives; BACC uses full labels only.
"""

from __future__ import annotations

import numpy as np

from dermtool.config import ModelConfig
from dermtool.data import Cache
from dermtool.dataset import MISSING_MASK, _resize_batch, make_batches, targets


def predict_cache(model, cache: Cache, cfg: ModelConfig, resize: bool, batch_size: int = 16) -> dict:
    """Model outputs over a whole cache, in order: {"seg": (N, s, s), "cls": (N, 3)}."""
    segs, clss = [], []
    for start in range(0, len(cache), batch_size):
        idx = np.arange(start, min(start + batch_size, len(cache)))
        images, _, _ = make_batches(cache, cfg, idx, resize)
        out = model(images.astype(np.float32), training=False)
        if "seg" in out:
            segs.append(np.asarray(out["seg"])[..., 0])
        if "cls" in out:
            clss.append(np.asarray(out["cls"]))
    return {k: np.concatenate(v) for k, v in (("seg", segs), ("cls", clss)) if v}


def validation_targets(cache: Cache, cfg: ModelConfig, resize: bool) -> dict:
    """Truth of a validation cache at the model's output size, read once for the whole run.

    Images without a mask (or label) get the missing marker and are left out of JAC (or BACC).
    """
    labels = cache.labels if cfg.has_cls else None
    masks = None
    if cfg.has_seg:
        if cache.masks is None:
            masks = np.full((len(cache), cfg.size, cfg.size), MISSING_MASK, np.uint8)
        else:
            masks = np.asarray(cache.masks)
            if resize:
                masks = _resize_batch(masks, cfg.size, True)
            masks = np.where(cache.has_mask[:, None, None], masks, MISSING_MASK).astype(np.uint8)
    return targets(cfg, masks, labels)


def validation_metrics(pred: dict, truth: dict, cfg: ModelConfig, prefix: str = "val_") -> dict:
    """Per-image JAC, BACC and melanoma AUC with the same functions `dermtool score` uses.

    `truth` is `validation_targets(...)`: {"seg": (N, s, s, 1) {0, 1, -1 missing}, "cls": (N, 3)
    one-hot, all-zero when missing}. Images whose truth is missing are left out.
    """
    from dermtool.metrics import balanced_accuracy, confusion_matrix, jaccard, per_class_stats, roc_auc

    result = {}
    if "seg" in pred:
        jacs = [jaccard(p >= cfg.threshold, t[..., 0] >= 0.5) for p, t in zip(pred["seg"], truth["seg"])
                if t.min() >= 0]
        if jacs:
            result[prefix + "jac"] = float(np.mean(jacs))
    if "cls" in pred:
        known = truth["cls"].sum(axis=1) > 0
        partial = truth["cls"][:, 0] < 0  # benign, class unknown: a negative for melanoma only
        if known.any():
            true_cls = np.argmax(truth["cls"][known], axis=1)
            cm = confusion_matrix(true_cls, np.argmax(pred["cls"][known], axis=1), len(cfg.class_names))
            result[prefix + "bacc"] = float(balanced_accuracy(cm))
            result[prefix + "mel_sensitivity"] = float(per_class_stats(cm)[0]["sensitivity"])
        melanoma = truth["cls"][:, 0] > 0
        judged = known | partial
        if melanoma.any() and (judged & ~melanoma).any():
            result[prefix + "mel_auc"] = float(roc_auc(melanoma[judged], pred["cls"][judged][:, 0]))
    if prefix + "jac" in result and prefix + "bacc" in result:
        result[prefix + "mean_performance"] = (result[prefix + "jac"] + result[prefix + "bacc"]) / 2
    return result


#: what an epoch is chosen on, per task, on each validation set: the first of these the set gives
#: (a joint run's set of masks alone its JAC, of labels alone or without full labels its melanoma AUC)
FALLBACK_METRICS = {"seg": ("jac",), "cls": ("bacc", "mel_auc"), "joint": ("mean_performance", "jac", "mel_auc", "bacc")}


def selection_metric(cfg: ModelConfig) -> str:
    return "val_" + FALLBACK_METRICS[cfg.task][0]
