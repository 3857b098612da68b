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
import math
from pathlib import Path

import numpy as np

from dermtool.errors import InputError
from dermtool.io import read_csv_rows

#: how far a teacher row's probabilities may sum from 1 (the CSV keeps 6 decimals)
SUM_TOLERANCE = 1e-3


def read_teacher(paths: list[Path], class_names: list[str] | tuple) -> dict[str, np.ndarray]:
    """image id -> the teacher's probabilities (float32, in `class_names` order), from one or
    more predictions CSVs.

    Raises:
        InputError: naming the file and the problem: a header without an image_id column or
            without one of the classes, a probability that is not a number in [0, 1], a row
            whose probabilities do not sum to 1, or an image id given twice.
    """
    table: dict[str, np.ndarray] = {}
    where: dict[str, Path] = {}
    for path in paths:
        path = Path(path)
        rows = read_csv_rows(path, "teacher predictions CSV")
        if not rows or not rows[0]:
            raise InputError(f"{path}: the teacher predictions CSV is empty; write it with dermtool infer.")
        header = [h.strip() for h in rows[0]]
        missing = [c for c in ("image_id", *class_names) if c not in header]
        if missing:
            raise InputError(f"{path}: the teacher predictions CSV has no {', '.join(missing)} column "
                             f"(dermtool infer writes image_id, {', '.join(class_names)}, label).")
        id_col, cols = header.index("image_id"), [header.index(c) for c in class_names]
        for line, row in enumerate(rows[1:], start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise InputError(f"{path}, line {line}: {len(row)} fields where the header has {len(header)}.")
            image_id = row[id_col].strip()
            if not image_id:
                raise InputError(f"{path}, line {line}: no image id.")
            if image_id in table:
                raise InputError(f"{path}, line {line}: image {image_id!r} has a teacher row already "
                                 f"(in {where[image_id]}); give each image once.")
            try:
                p = np.array([float(row[c]) for c in cols], np.float64)
            except ValueError:
                raise InputError(f"{path}, line {line}: the probabilities of {image_id!r} are not all numbers.") from None
            if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in p):
                raise InputError(f"{path}, line {line}: the probabilities of {image_id!r} must lie in [0, 1].")
            if abs(p.sum() - 1.0) > SUM_TOLERANCE:
                raise InputError(f"{path}, line {line}: the probabilities of {image_id!r} sum to {p.sum():.4f}, "
                                 "not 1.")
            table[image_id] = (p / p.sum()).astype(np.float32)
            where[image_id] = path
    if not table:
        raise InputError(f"{', '.join(str(p) for p in paths)}: no teacher rows (only a header).")
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
    table = read_teacher(paths, class_names)
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
