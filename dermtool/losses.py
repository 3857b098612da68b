"""Losses: segmentation (BCE, optionally + Dice), class-weighted cross-entropy, and the joint mix."""

from __future__ import annotations

import numpy as np

from dermtool import _tf

_tf.load()
import keras  # noqa: E402
from keras import ops  # noqa: E402


def class_weights_from_labels(labels: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """W_c = N / (n_classes * n_c) (thesis eq. 12); a class absent from the labels gets weight 0."""
    labels = np.asarray(labels)
    labels = labels[(labels >= 0) & (labels < n_classes)]  # partial labels have no class
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, len(labels) / (n_classes * counts), 0.0)
    return weights


def _mean_over_valid(valid):
    """Per-sample factor that turns Keras's mean over the batch into a mean over valid samples.

    Keras divides the summed per-sample losses by the batch size; an image whose target is
    missing must neither add to the loss nor dilute it, so valid samples are scaled by
    batch / n_valid and missing ones by 0 (a batch with no valid sample gives 0).
    """
    n = ops.cast(ops.shape(valid)[0], valid.dtype)
    return valid * n / ops.maximum(ops.sum(valid), 1.0)


@keras.saving.register_keras_serializable(package="dermtool")
class SegmentationLoss(keras.losses.Loss):
    """Pixel binary cross-entropy, plus (1 - soft Dice) per image when `dice=True`."""

    def __init__(self, dice: bool = False, name: str = "seg_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.dice = dice

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        # an image without a mask has target -1 everywhere: it adds nothing to this loss
        valid = ops.cast(ops.min(y_true, axis=(1, 2, 3)) >= 0, y_pred.dtype)
        y_true = ops.maximum(y_true, 0.0)
        eps = keras.config.epsilon()
        p = ops.clip(y_pred, eps, 1.0 - eps)
        loss = -ops.mean(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p), axis=(1, 2, 3))
        if self.dice:
            inter = ops.sum(y_true * y_pred, axis=(1, 2, 3))
            total = ops.sum(y_true, axis=(1, 2, 3)) + ops.sum(y_pred, axis=(1, 2, 3))
            # +1 keeps the gradient defined on lesion-free images; a training loss, not a metric
            soft_dice = (2.0 * inter + 1.0) / (total + 1.0)
            loss = loss + (1.0 - soft_dice)
        return loss * _mean_over_valid(valid)

    def get_config(self):
        return {**super().get_config(), "dice": self.dice}


@keras.saving.register_keras_serializable(package="dermtool")
class WeightedCategoricalCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy where each sample is weighted by its true class's weight.

    A partial label "not melanoma" (target row with -1 in the melanoma column, see
    dermtool.dataset.PARTIAL_ROW) gets -log(1 - p_melanoma) with weight 1: it only says the
    image is not a melanoma, so it pushes probability away from melanoma, not to either benign
    class.
    """

    def __init__(self, class_weights=(1.0, 1.0, 1.0), name: str = "cls_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_weights = [float(w) for w in class_weights]

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        partial = ops.cast(y_true[:, 0] < 0, y_pred.dtype)
        full = ops.maximum(y_true, 0.0)
        # an image without a label has an all-zero target row: zero loss, and not counted
        valid = ops.maximum(ops.cast(ops.sum(full, axis=-1) > 0, y_pred.dtype), partial)
        eps = keras.config.epsilon()
        ce = -ops.sum(full * ops.log(ops.clip(y_pred, eps, 1.0)), axis=-1)
        w = ops.sum(full * ops.convert_to_tensor(self.class_weights, dtype=y_pred.dtype), axis=-1)
        not_melanoma = -ops.log(ops.clip(1.0 - y_pred[:, 0], eps, 1.0))
        return (ce * w + partial * not_melanoma) * _mean_over_valid(valid)

    def get_config(self):
        return {**super().get_config(), "class_weights": self.class_weights}


@keras.saving.register_keras_serializable(package="dermtool")
class PairConsistentCrossentropy(WeightedCategoricalCrossentropy):
    """WeightedCategoricalCrossentropy plus `consistency` x the symmetric Kullback-Leibler
    divergence between the predictions of rows 2i and 2i + 1, two copies of one image
    (dermtool.augment.augment_pairs).

    Every row carries its pair's divergence, labelled or not, so Keras's mean over the batch adds
    `consistency` x the mean divergence over the pairs. The batch must have an even number of rows.

    With `anchored` (`--augment ...+pair-anchor`: row 2i is the image itself, row 2i + 1 a copy),
    the divergence is KL(a || b) with row 2i's prediction a held fixed (no gradient): the copy's
    prediction b moves toward the image's, and the image's answer is left to the classification
    loss alone.
    """

    def __init__(self, class_weights=(1.0, 1.0, 1.0), consistency: float = 1.0, anchored: bool = False,
                 name: str = "cls_loss", **kwargs):
        super().__init__(class_weights=class_weights, name=name, **kwargs)
        self.consistency = float(consistency)
        self.anchored = bool(anchored)

    def call(self, y_true, y_pred):
        eps = keras.config.epsilon()
        log_p = ops.log(ops.clip(y_pred, eps, 1.0))
        n_classes = ops.shape(y_pred)[-1]
        p2, log_p2 = ops.reshape(y_pred, (-1, 2, n_classes)), ops.reshape(log_p, (-1, 2, n_classes))
        a, b = p2[:, 0], p2[:, 1]
        if self.anchored:  # KL(a || b), a a fixed target
            a, log_a = ops.stop_gradient(a), ops.stop_gradient(log_p2[:, 0])
            divergence = ops.sum(a * (log_a - log_p2[:, 1]), axis=-1)
        else:
            diff = log_p2[:, 0] - log_p2[:, 1]
            divergence = 0.5 * ops.sum((a - b) * diff, axis=-1)  # (KL(a||b) + KL(b||a)) / 2
        per_row = ops.reshape(ops.repeat(divergence[:, None], 2, axis=1), (-1,))
        return super().call(y_true, y_pred) + self.consistency * per_row

    def get_config(self):
        return {**super().get_config(), "consistency": self.consistency, "anchored": self.anchored}


def with_consistency(losses: dict, consistency: float, anchored: bool = False) -> dict:
    """The training losses under `train --consistency`: the classifier's becomes pair-consistent
    (validation keeps the plain one, as its images come one at a time); `anchored` under
    `--augment ...+pair-anchor`."""
    if not consistency or "cls" not in losses:
        return losses
    return {**losses, "cls": PairConsistentCrossentropy(losses["cls"].class_weights, consistency, anchored)}


def build_losses(has_seg: bool, has_cls: bool, alpha: float, dice: bool, class_weights) -> tuple[dict, dict]:
    """Loss and loss-weight dicts for `model.compile`: alpha * L_seg + (1 - alpha) * L_cls.

    The thesis writes the joint loss with (alpha - 1), a sign slip that would reward a worse
    classifier; (1 - alpha) is what is meant and what is used here.
    """
    losses, weights = {}, {}
    if has_seg:
        losses["seg"] = SegmentationLoss(dice=dice)
        weights["seg"] = alpha if has_cls else 1.0
    if has_cls:
        losses["cls"] = WeightedCategoricalCrossentropy(class_weights)
        weights["cls"] = (1.0 - alpha) if has_seg else 1.0
    return losses, weights
