"""Train / validation split by lesion, so no lesion is on both sides.

HAM10000 has several images of many lesions (its 1,113 melanoma images are 614 lesions); a
split by image would put near-copies of one lesion on both sides and flatter validation.
`split_by_group` assigns whole groups (lesion_id) to one side, stratified by class, and is a
pure function of its inputs and the seed, so anyone can rebuild the same split.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from dermtool import CLASS_NAMES
from dermtool.io import write_atomic


def split_by_group(ids: list[str], groups: list[str], classes: list[str], fraction: float,
                   seed: int = 0) -> tuple[list[str], list[str]]:
    """(train ids, val ids): about `fraction` of the groups of each class go to validation.

    Args:
        ids: image ids.
        groups: the group (lesion_id) of each image; an empty group means the image is its own.
        classes: the class name of each image ("" when unlabelled); a group takes the class of
            its first labelled image, so stratification counts lesions, not images.
        fraction: share of each class's groups for validation (rounded up), but never all of
            them: a class with two or more groups has at least one on each side, so training
            never lacks a class that validation scores; a class of one group stays in training.
        seed: the shuffle's seed.
    """
    members: dict[str, list[str]] = defaultdict(list)
    group_class: dict[str, str] = {}
    for image_id, group, cls in zip(ids, groups, classes):
        g = group or f"image:{image_id}"
        members[g].append(image_id)
        if cls and not group_class.get(g):
            group_class[g] = cls
    by_class: dict[str, list[str]] = defaultdict(list)
    for g in sorted(members):
        by_class[group_class.get(g, "")].append(g)
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for cls in sorted(by_class):
        gs = by_class[cls]
        n_val = min(math.ceil(fraction * len(gs)), len(gs) - 1)
        for i in rng.permutation(len(gs))[:n_val]:
            val_groups.add(gs[i])
    val = sorted(i for g in val_groups for i in members[g])
    val_set = set(val)
    train = sorted(i for i in ids if i not in val_set)
    return train, val


def split_folder(data: Path, fraction: float, seed: int = 0, group: str = "lesion_id",
                 log=None) -> tuple[list[str], list[str], dict[str, str]]:
    """(train ids, val ids, image_id -> group) of a labelled folder, split by lesion (or by
    another metadata.csv column: `group="patient_id"` keeps each patient on one side).

    The folder is read as `dermtool preprocess` reads it (images/, labels.csv, metadata.csv, or
    all three side by side), and its images are those preprocess caches: a file preprocess would
    skip (a name a spreadsheet would run as a formula, a link to nothing) is left out, and so is
    an id that starts with '#', which an id list reads as a comment. Without metadata.csv the
    group map is empty and each image is its own group. `log` gets a note on each of these and
    on what does not match: images without a metadata row, label rows without an image, images
    without a label, no labels at all (the split is then not stratified by class).

    Raises:
        InputError: no usable image; a metadata.csv none of whose image_ids is an image's id (a
            split by image that split.json would call one by lesion).
    """
    from dermtool.data import image_id_of, resolve_layout, usable_images
    from dermtool.errors import InputError
    from dermtool.io import both_classes, by_own_ids, first_few, id_key, read_class_csv

    log = log or (lambda message: None)
    layout = resolve_layout(data)
    paths, _, unusable = usable_images(layout.images)  # preprocess's rule and words
    for _, why in unusable:  # each reason ends "; skipped." or is a name preprocess refuses
        log(why if why.rstrip().endswith("skipped.") else f"skipped {why}")
    comments = sorted(image_id_of(p) for p in paths if image_id_of(p).startswith("#"))
    if comments:
        log(f"note: {len(comments)} image(s) whose id starts with '#' ({first_few(comments)}) left out: an id list "
            "(preprocess --ids, infer --ids) reads such a line as a comment; rename the file to split it")
    ids = sorted({image_id_of(p) for p in paths} - set(comments))
    if not ids:
        raise InputError(f"{layout.images}: no usable image in this folder"
                         + (f"; the first: {unusable[0][1]}" if unusable else "."))
    lesions = _read_groups(layout.metadata, group, ids, log) if layout.metadata else {}
    if not layout.metadata:
        log(f"note: no metadata.csv in {layout.searched_in}; each image counts as its own group")
    # read as preprocess reads training labels (a soft label, a row of 0s: the data check's
    # business, not a refusal); a row naming melanoma and keratosis both is still refused here
    rows = read_class_csv(layout.labels, role="labels") if layout.labels else {}
    for image_id, row in rows.items():
        if both_classes(row[0], row[1]):
            raise InputError(f"The labels CSV {layout.labels} names melanoma and seborrheic_keratosis for {image_id}; "
                             "a label row names one diagnosis, so set the other to 0.")
    labels = by_own_ids(rows, ids)  # a row names its image in either Unicode form, as in preprocess
    keys = {id_key(i) for i in ids}
    ghosts = sorted(i for i in rows if id_key(i) not in keys)
    unlabelled = [i for i in ids if i not in labels]
    if not labels:
        log(f"note: no labels.csv in {layout.searched_in}: the split keeps groups together but cannot balance "
            "the classes")
    elif unlabelled:
        log(f"note: {len(unlabelled)} image(s) without a label row ({first_few(unlabelled)}): split as a class of their own")
    if ghosts:
        log(f"note: {len(ghosts)} label row(s) without an image ({first_few(ghosts)}): left out")
    train, val = split_by_group(ids, [lesions.get(i, "") for i in ids], class_names_of(ids, labels), fraction, seed)
    return train, val, lesions


def _read_groups(metadata: Path, group: str, ids: list[str], log) -> dict[str, str]:
    """image_id -> group of metadata.csv, checked against the images: ids that match none of them
    (file names with their extension, another case) are refused, and images without a row noted."""
    from dermtool.data import read_lesion_ids
    from dermtool.errors import InputError
    from dermtool.io import by_own_ids, first_few

    rows = read_lesion_ids(metadata, group)
    if not rows:
        raise InputError(f"{metadata}: the metadata CSV has no row with an image_id; each image would be its "
                         f"own group, not one of its {group}.")
    # by the images' own ids: a row names its image in either Unicode form (NFC in the CSV, NFD
    # from macOS's files), and an image of a lesion missed here would be a group of its own
    wanted = set(ids)
    groups = {i: g for i, g in by_own_ids(rows, ids).items() if i in wanted}
    if not groups:
        raise InputError(f"{metadata}: none of its image_ids is the id of an image (e.g. {next(iter(rows))!r} in "
                         f"the CSV, {ids[0]!r} from the files: an image's id is its file name without the "
                         f"extension); the split would not keep a {group} together, so fix the image_id column.")
    missing = [i for i in ids if i not in groups]
    if missing:
        log(f"note: {len(missing)} image(s) have no row in {metadata} ({first_few(missing)}): each is its own group")
    return groups


def write_split(out: Path, train: list[str], val: list[str], info: dict) -> None:
    """OUT/train.txt and OUT/val.txt (one id a line) and OUT/split.json (how it was made)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train.txt", train), ("val.txt", val)):
        write_atomic(out / name, lambda tmp: tmp.write_text("".join(i + "\n" for i in ids), encoding="utf-8"))
    record = json.dumps({**info, "n_train": len(train), "n_val": len(val)}, indent=2) + "\n"
    write_atomic(out / "split.json", lambda tmp: tmp.write_text(record, encoding="utf-8"))


def class_names_of(ids: list[str], labels: dict) -> list[str]:
    """Class name per id from a read_class_csv dict ("" for ids without a row, or a row of 0s)."""
    from dermtool.data import truth_class

    return [CLASS_NAMES[truth_class(labels[i])] if i in labels and labels[i].any() else "" for i in ids]
