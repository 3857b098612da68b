"""Distillation targets: another model's class probabilities as soft labels (`train --teacher`).

A teacher is a predictions CSV written by `dermtool infer` (image_id, one probability column per
class, label) run over the training images, typically by an ensemble (`dermtool ensemble`), so
that one network learns what several networks agree on (Hinton, Vinyals & Dean, "Distilling the
Knowledge in a Neural Network", 2015).

With `--distill w`, the classifier target of every training image that has a true class and a
teacher row becomes (1 - w) x its one-hot label + w x the teacher's probabilities. Images with a
partial label ("not melanoma") or none keep their targets: the teacher never invents a label.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from dermtool.calibrate import SUM_TOLERANCE
from dermtool.errors import InputError
from dermtool.io import read_class_csv


def read_teacher(paths: list[Path]) -> dict[str, np.ndarray]:
    """image id -> the teacher's probabilities (float32, CLASS_NAMES order, rescaled to sum 1),
    from one or more predictions CSVs, each read and checked as `dermtool score` reads one
    (`io.read_class_csv`).

    Raises:
        InputError: naming the file and the problem: what `read_class_csv` refuses (columns,
            numbers in [0, 1], empty ids, repeated ids), a row whose probabilities do not sum to 1
            (within calibrate's SUM_TOLERANCE: an int8 engine's softmax is quantised), or an
            image id given in two files.
    """
    table: dict[str, np.ndarray] = {}
    where: dict[str, Path] = {}
    for path in map(Path, paths):
        for image_id, p in read_class_csv(path, role="teacher predictions").items():
            if image_id in table:
                raise InputError(f"{path}: image {image_id!r} has a teacher row already (in {where[image_id]}); "
                                 "give each image once.")
            if abs(p.sum() - 1.0) > SUM_TOLERANCE:
                raise InputError(f"{path}: the probabilities of {image_id!r} sum to {p.sum():.4f}, not 1.")
            table[image_id] = (p / p.sum()).astype(np.float32)
            where[image_id] = path
    return table


def teacher_rows(ids: list[str], table: dict[str, np.ndarray], n_classes: int) -> np.ndarray:
    """(len(ids), n_classes) float32: each image's teacher probabilities, NaN where it has none."""
    out = np.full((len(ids), n_classes), np.nan, np.float32)
    for i, image_id in enumerate(ids):
        row = table.get(image_id)
        if row is not None:
            out[i] = row
    return out


def blend(onehot: np.ndarray, soft: np.ndarray, weight: float) -> np.ndarray:
    """Classifier targets with the teacher mixed in: rows with a true class (a one-hot row) and a
    teacher row become (1 - weight) x one-hot + weight x teacher; partial labels (a negative
    entry), missing labels (a zero row) and rows without a teacher (NaN) are returned unchanged."""
    out = np.array(onehot, np.float32, copy=True)
    if not weight:
        return out
    full = (out.min(axis=1) >= 0) & np.isclose(out.sum(axis=1), 1.0)
    use = full & ~np.isnan(soft).any(axis=1)
    out[use] = (1.0 - weight) * out[use] + weight * soft[use]
    return out


def fingerprint(paths: list[Path]) -> str:
    """SHA-256 over the teacher files' bytes, in order: a resumed run refuses changed teachers."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            digest.update(Path(path).read_bytes())
        except OSError as exc:
            raise InputError(f"{path}: cannot read the teacher predictions CSV ({exc.strerror or exc}).") from None
    return digest.hexdigest()


def attach_teacher(data, tcfg, class_names, log, resume: bool = False) -> str:
    """Read `tcfg.teacher` into `data.soft` (a dermtool.dataset.TrainingSet) and return the
    teachers' fingerprint; a resumed run must find the same bytes.

    Raises:
        InputError: for an unreadable or malformed teacher, a changed one under --resume, or a
            teacher that covers none of the labelled training images.
    """
    paths = [Path(p) for p in tcfg.teacher]
    digest = fingerprint(paths)
    if resume and tcfg.teacher_sha256 and digest != tcfg.teacher_sha256:
        raise InputError(f"{', '.join(map(str, paths))}: the teacher predictions changed since this run started; "
                         "a resumed run must learn from the same teacher (start a new run instead).")
    table = read_teacher(paths)
    ids = [image_id for cache in data.caches for image_id in cache.ids]
    data.soft = teacher_rows(ids, table, len(class_names))
    labelled = (data.labels >= 0) & (data.labels < len(class_names))
    covered = labelled & ~np.isnan(data.soft).any(axis=1)
    if not covered.any():
        raise InputError(f"{', '.join(map(str, paths))}: no labelled training image has a teacher row (the image "
                         "ids must be those of the training caches: run dermtool infer on their images).")
    log(f"distillation: teacher rows for {int(covered.sum())} of {int(labelled.sum())} labelled training images, "
        f"weight {tcfg.distill:g} (images without a row keep their labels)")
    return digest
