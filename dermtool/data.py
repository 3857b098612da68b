"""Finding images, masks and labels on disk, and the preprocessed training cache.

A cache folder holds
    images.tif     uint8 (N, in, in, 3) stack, uncompressed, memory-mappable
    masks.tif      uint8 (N, size, size) stack of {0, 1} (only when masks were given)
    manifest.csv   image_id, label, class, orig_h, orig_w, has_mask, transform fields
    cache.json     size, fit, border, margin, and a fingerprint of the inputs for reuse
"""

from __future__ import annotations

import csv
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermtool import CLASS_NAMES
from dermtool.errors import InputError
from dermtool.io import FORMULA_STARTS, claim, formula_name, id_key, read_csv_rows, read_json
from dermtool.preprocess import IMAGE_EXTENSIONS, Transform

# Files the ISIC downloads keep beside the images that are not images to segment.
NOT_IMAGES = ("_superpixels", "_segmentation")
#: A cache's own stacks: never images to read when a cache record (manifest.csv, cache.json) is beside them,
#: as it is where a cache was written into a folder of inputs.
CACHE_STACKS = ("images.tif", "masks.tif")


def image_id_of(path: Path) -> str:
    return Path(path).stem


def unique_ids(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """Keep the first file of each image id (in the given order, i.e. by name when sorted).

    Returns:
        (kept paths, [(skipped path, the kept path with its id)]): `a.jpg` and `a.png` are
        one id, and two outputs named `a` would overwrite each other. So are two names that
        differ only in Unicode normal form (é as one character or as e + accent, as macOS
        writes it): they look alike in every CSV and would be told apart by bytes only.
    """
    by_id: dict[str, Path] = {}
    skipped = []
    for p in paths:
        first = by_id.setdefault(id_key(image_id_of(p)), p)
        if first is not p:
            skipped.append((p, first))
    return list(by_id.values()), skipped


def find_images(folder: Path) -> list[Path]:
    """Images in `folder` (not recursive), sorted by name; ISIC side files are skipped, and so are
    a cache's images.tif and masks.tif beside its manifest.csv or cache.json (`CACHE_STACKS`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of images.")
    stacks = _cache_stacks(folder)
    found = [
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        and not p.stem.endswith(NOT_IMAGES) and not p.name.startswith(".") and p.name not in stacks
    ]
    return sorted(found, key=lambda p: p.name)


def _cache_stacks(folder: Path) -> tuple[str, ...]:
    """CACHE_STACKS when `folder` holds a cache's record, so its stacks are no input images; else ()."""
    return CACHE_STACKS if any((folder / name).is_file() for name in ("manifest.csv", "cache.json")) else ()


def usable_images(folder: Path, csv_name: str = "manifest.csv"
                  ) -> tuple[list[Path], list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """The images of `folder` that `preprocess` caches and `split` lists, by one rule.

    Returns:
        (usable paths, duplicates as `unique_ids` gives them, [(entry, why)] of the entries named
        as images that cannot be run: a name `csv_name` cannot hold (`io.formula_name`), and a
        link to nothing, a folder or a FIFO (`not_files`)).
    """
    paths, duplicates = unique_ids(find_images(folder))
    unusable = [(p, why) for p in paths if (why := formula_name(p, csv_name))]
    unusable += not_files(folder)
    refused = {p for p, _ in unusable}
    return [p for p in paths if p not in refused], duplicates, unusable


def not_files(folder: Path) -> list[tuple[Path, str]]:
    """Entries of `folder` named as images that are not image files, each with why (find_images
    passes them over silently): a link to nothing, a folder or a FIFO named x.jpg."""
    found = []
    stacks = _cache_stacks(Path(folder))
    for p in sorted(Path(folder).iterdir(), key=lambda p: p.name):
        if (p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith(".") or p.stem.endswith(NOT_IMAGES)
                or p.name in stacks):
            continue
        if p.is_symlink() and not p.exists():
            found.append((p, f"{p}: a link to nothing ({os.readlink(p)}); skipped."))
        elif p.is_dir():
            found.append((p, f"{p}: a folder, not an image file; skipped."))
        elif not p.is_file():
            found.append((p, f"{p}: not a regular file (a FIFO, socket or device); skipped."))
    return found


@dataclass(frozen=True)
class Layout:
    images: Path
    masks: Path | None
    labels: Path | None
    metadata: Path | None = None  # HAM10000-style metadata.csv (image_id, lesion_id, ...)
    #: the folders searched for labels.csv and metadata.csv, first first (named by the notes on them)
    searched: tuple[Path, ...] = ()

    @property
    def searched_in(self) -> str:
        """Where labels.csv and metadata.csv were looked for, for a note: "A or B"."""
        return " or ".join(str(d) for d in (self.searched or (self.images.parent,)))


def resolve_layout(images: Path, masks: Path | None = None, labels: Path | None = None) -> Layout:
    """Fill in mask folder and label CSV for the layouts dermtool knows.

    - `DIR/images`, `DIR/masks`, `DIR/labels.csv` (the development copy); `images` may be DIR
      itself or DIR/images.
    - A flat folder: the images with `labels.csv` and `metadata.csv` beside them.
    - ISIC 2017 as downloaded: `ISIC-2017_Training_Data/`, `ISIC-2017_Training_Part1_GroundTruth/`,
      `ISIC-2017_Training_Part3_GroundTruth.csv` side by side.
    labels.csv and metadata.csv are looked for beside the images when the folder given holds
    them (a flat folder, or DIR/images given), then in the images folder's parent (DIR), the
    first found winning. Explicit `masks` / `labels` always win.
    """
    images = given = Path(images)
    if (images / "images").is_dir():
        images = images / "images"
    elif images.is_dir() and not _has_images(images):
        # the folder the ISIC zips were unpacked into: use its one *_Data folder
        data_dirs = [d for d in images.iterdir() if d.is_dir() and d.name.endswith("_Data")]
        if len(data_dirs) == 1:
            images = data_dirs[0]
    parent = images.parent
    isic = images.name.endswith("_Data")
    if masks is None:
        cands = [parent / "masks"]
        if isic:
            cands.append(parent / (images.name[:-len("_Data")] + "_Part1_GroundTruth"))
        masks = next((c for c in cands if c != images and c.is_dir()), None)
    # the folder given first: a flat folder's own labels.csv wins over one in the folder around it
    searched = tuple(dict.fromkeys([images, parent] if images == given else [parent]))
    if labels is None:
        cands = [d / "labels.csv" for d in searched]
        if isic:
            cands.append(parent / (images.name[:-len("_Data")] + "_Part3_GroundTruth.csv"))
        labels = next((c for c in cands if c.is_file()), None)
    metadata = next((d / "metadata.csv" for d in searched if (d / "metadata.csv").is_file()), None)
    return Layout(images, masks, labels, metadata, searched)


def read_lesion_ids(path: Path, column: str = "lesion_id", *, missing_ok: bool = False) -> dict[str, str]:
    """image_id -> lesion_id (or another `column`, e.g. patient_id) from a HAM10000-style
    metadata.csv (other columns are ignored). Values are read stripped, as labels.csv's ids are,
    so "ISIC_1 " is the image ISIC_1; an image listed twice with the same value is one row.

    Args:
        missing_ok: a CSV without `column` gives {} instead of an error (preprocess only copies
            lesion_id into its manifest, and ISIC 2020's metadata has patient_id only).

    Raises:
        InputError: naming the file: no image_id (or isic_id) column, or no `column`; a value a spreadsheet
            would run as a formula, or one image_id with two different values (which row to
            believe would be a guess).
    """
    header, rows = _metadata_rows(path)
    key = _id_column(header)
    if (key is None or column not in header) and not missing_ok:
        raise InputError(f"{path}: a metadata CSV needs an image_id (or isic_id) and a {column} column "
                         f"(found {', '.join(header) or 'none'}).")
    if key is None or column not in header:
        return {}
    i, j = header.index(key), header.index(column)
    found: dict[str, str] = {}
    row_of: dict[str, int] = {}
    for line, r in enumerate(rows, start=2):
        if len(r) > j and r[j].strip().startswith(FORMULA_STARTS):
            raise InputError(f"{path}: row {line} has the {column} {r[j][:40]!r}, which a spreadsheet would run as "
                             "a formula once copied into manifest.csv; fix the metadata.")
        if len(r) <= max(i, j) or not r[i].strip():
            continue
        image_id, value = r[i].strip(), r[j].strip()
        if found.setdefault(image_id, value) != value:
            raise InputError(f"{path}: {key} {image_id} has the {column} {found[image_id]!r} at row "
                             f"{row_of[image_id]} and {value!r} at row {line}; an image belongs to one, so fix "
                             "the metadata.")
        row_of.setdefault(image_id, line)
    return found


def read_benign_ids(path: Path) -> set[str]:
    """Image ids whose metadata.csv `benign_malignant` says benign (ISIC 2020 style); an empty set
    when the column is absent. Used for partial labels: benign means "not melanoma"."""
    header, rows = _metadata_rows(path)
    key = _id_column(header)
    if key is None or "benign_malignant" not in header:
        return set()
    i, j = header.index(key), header.index("benign_malignant")
    return {r[i].strip() for r in rows if len(r) > max(i, j) and r[j].strip().lower() == "benign"}


def _id_column(header: list[str]) -> str | None:
    """The column of a metadata.csv that holds the image ids: image_id (HAM10000, ISIC 2020's
    challenge files), else isic_id (an ISIC Archive download); None when it has neither."""
    return next((name for name in ("image_id", "isic_id") if name in header), None)


def _metadata_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    from dermtool.io import read_csv_rows

    rows = read_csv_rows(path, "metadata CSV")
    return [cell.strip() for cell in rows[0]], rows[1:]


def read_id_list(path: Path) -> list[str]:
    """Image ids, one per line (as written by dermtool split); blank lines and # comments skipped.

    Raises:
        InputError: the file cannot be read as text (see `io.read_text`), or lists no id.
    """
    from dermtool.io import read_text

    lines = read_text(path, "id list").splitlines()
    ids = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    if not ids:
        raise InputError(f"{path}: the id list lists no image id (only comments); one id a line is expected.")
    return ids


def _has_images(folder: Path) -> bool:
    stacks = _cache_stacks(folder)
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.name not in stacks for p in folder.iterdir() if p.is_file())


#: class_index of a partial label: benign per the metadata, so not a melanoma, class unknown.
#: The classifier learns from it with -log(1 - p_melanoma) (dermtool.losses).
NOT_MELANOMA = 3


def truth_class(row: np.ndarray) -> int:
    """Class index from a (melanoma, seborrheic_keratosis, nevus) row: argmax, ties to melanoma."""
    return int(np.argmax(row))


# --------------------------------------------------------------------------- the cache

MANIFEST_FIELDS = (["image_id", "label", "class_index", "has_mask", "source", "lesion_id"]
                   + list(Transform.__dataclass_fields__))


@dataclass
class Cache:
    """A loaded training cache; arrays are memory-mapped, not read into memory."""

    folder: Path
    images: np.ndarray
    masks: np.ndarray | None
    ids: list[str]
    labels: np.ndarray  # int class index, -1 where unknown
    has_mask: np.ndarray
    transforms: list[Transform]
    meta: dict
    lesion_ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    @property
    def fit(self) -> str:
        return self.meta["fit"]


def load_cache(folder: Path) -> Cache:
    """Open a cache written by `dermtool preprocess`."""
    import tifffile

    folder = Path(folder)
    meta_path = folder / "cache.json"
    if not meta_path.is_file():
        raise InputError(f"{folder}: not a dermtool cache (no cache.json); run dermtool preprocess first.")
    meta = read_json(meta_path, "cache record")
    table = read_csv_rows(folder / "manifest.csv", "cache manifest")
    rows = [dict(zip(table[0], r)) for r in table[1:] if r]
    if not {"image_id", "class_index", "has_mask"} <= set(table[0]) or any(len(r) != len(table[0]) for r in table[1:] if r):
        raise InputError(f"{folder / 'manifest.csv'}: the cache manifest is damaged (missing columns or short rows); "
                         "run dermtool preprocess again.")
    stacks = []
    for name in ("images.tif", "masks.tif"):
        path = folder / name
        if name == "masks.tif" and not path.is_file():
            stacks.append(None)
            continue
        try:
            stacks.append(tifffile.memmap(path, mode="r"))
        except FileNotFoundError:
            raise InputError(f"{path}: missing from the cache; run dermtool preprocess again to rebuild it.") from None
        except (ValueError, OSError) as exc:  # cut short: "mmap length is greater than file size"
            raise InputError(f"{path}: damaged ({' '.join(str(exc).split())[:100]}); run dermtool preprocess "
                             "again to rebuild the cache.") from None
    images, masks = stacks
    if images.shape[0] != len(rows):
        raise InputError(f"{folder}: images.tif holds {images.shape[0]} images but manifest.csv {len(rows)} rows.")
    # a cache edited or put together from two: its stacks must be of the sizes cache.json records
    damaged = "; the cache is damaged or was edited: run dermtool preprocess again to rebuild it."
    try:
        size, side = int(meta["size"]), int(meta.get("input_size", int(meta["size"]) + 2 * int(meta.get("margin", 0))))
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{meta_path}: no whole-number size{damaged}") from None
    if images.ndim != 4 or images.shape[1:] != (side, side, 3) or images.dtype != np.uint8:
        raise InputError(f"{folder / 'images.tif'}: a stack of {images.shape} {images.dtype}, not of {side} x {side} "
                         f"RGB images as cache.json says{damaged}")
    if masks is not None and (masks.ndim != 3 or masks.shape != (len(rows), size, size) or masks.dtype != np.uint8):
        raise InputError(f"{folder / 'masks.tif'}: a stack of {masks.shape} {masks.dtype}, not of {len(rows)} "
                         f"{size} x {size} masks as cache.json says{damaged}")
    try:
        labels = np.array([int(r["class_index"]) for r in rows], dtype=np.int64)
        transforms = [Transform.from_dict(r) for r in rows]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{folder / 'manifest.csv'}: a class_index or geometry value that is not a whole number "
                         f"({' '.join(str(exc).split())[:80]}){damaged}") from None
    if not np.isin(labels, [-1, 0, 1, 2, NOT_MELANOMA]).all():
        raise InputError(f"{folder / 'manifest.csv'}: a class_index outside -1 to {NOT_MELANOMA}{damaged}")
    if any(min(t.inner_h, t.inner_w, t.orig_h, t.orig_w) < 1 or t.top < 0 or t.left < 0
           or t.top + t.inner_h > t.size or t.left + t.inner_w > t.size for t in transforms):
        raise InputError(f"{folder / 'manifest.csv'}: an image's geometry does not fit its square{damaged}")
    return Cache(
        folder=folder,
        images=images,
        masks=masks,
        ids=[r["image_id"] for r in rows],
        labels=labels,
        has_mask=np.array([r["has_mask"] == "1" for r in rows]),
        transforms=transforms,
        meta=meta,
        lesion_ids=[r.get("lesion_id", "") for r in rows],
    )



# --------------------------------------------------------------------------- building it


@dataclass
class ItemResult:
    image_id: str
    source: str
    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    transform: Transform | None = None
    error: str = ""
    mask_problem: str = ""  # "size", "zero_one", "nonbinary", "empty" or "label_map"


def _process_one(path: Path, mask_path: Path | None, size: int, fit: str, border: float,
                 margin: int, chain: str = "direct") -> ItemResult:
    from dermtool.io import binarise_mask, is_label_map, read_mask_values, two_valued_lesion
    from dermtool.preprocess import fit_mask, prepare

    # the manifest is UTF-8: a folder name that is not (a share from a Latin-1 system) is kept
    # with its odd bytes written as escapes (\xe9), as pages write it
    item = ItemResult(image_id_of(path), os.fsencode(path).decode("utf-8", "backslashreplace"))
    try:
        item.image, item.transform = prepare(path, size, fit, border, margin, chain)
        if mask_path is not None:
            raw = read_mask_values(mask_path)
            t = item.transform
            lesion = two_valued_lesion(raw)  # one scan of the mask for the three questions below
            if is_label_map(raw, lesion):  # class numbers, not a lesion: kept without a mask (score refuses it)
                item.mask_problem = "label_map"
                return item
            if raw.shape[:2] != (t.orig_h, t.orig_w):
                item.mask_problem = "size"
            elif lesion is not None:  # 0/1, 0/128 ...: the value is the lesion
                item.mask_problem = "zero_one"
            elif not np.isin(raw, (0, 255)).all():
                item.mask_problem = "nonbinary"
            mask = binarise_mask(raw, lesion)
            if raw.any() and not mask.any():  # e.g. grey levels all at 128 or below
                item.mask_problem = "empty"
            if mask.shape != (t.orig_h, t.orig_w):  # still usable: scale it onto the image's grid
                from dermtool.preprocess import _resize

                mask = _resize(mask.astype(np.float32), t.orig_h, t.orig_w) >= 0.5
            item.mask = fit_mask(mask, t)
    except InputError as exc:
        item.error = str(exc)
    except Exception as exc:  # one odd file must not stop the other 1999; it is listed instead
        item.error = f"{path}: could not be preprocessed ({type(exc).__name__}: {exc})."
    return item


def _fingerprint(paths: list[Path], params: dict) -> str:
    import hashlib

    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode())
    for p in paths:
        st = p.stat()
        # nanoseconds: a file rewritten within the same second must still count as changed
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


_CHECKS = ("failed", "no_mask", "no_label", "labels_without_image", "mask_size_mismatch", "mask_zero_one",
           "mask_nonbinary", "mask_empty", "mask_label_map", "both_labels", "no_class_labels", "duplicate_ids")
#: Changes when the way a mask is read changes, so that caches built the old way are rebuilt.
_MASK_RULE = ("0 and one value v as v = lesion (the ISIC scorer's rule), label maps (more values, largest 2-8) "
              "kept without a mask, else > 128")
#: Likewise for the labels: a row of 0s (beside a nevus column) was once the argmax's melanoma.
_LABEL_RULE = "a row of 0s names no class"
#: Likewise for the pixels: a JPEG decoded at reduced size was once resized with its last part block.
_DECODE_RULE = "a reduced JPEG decode resized from the frame's box"


@dataclass
class CacheReport:
    """What `build_cache` did and what it found wrong with the data."""

    n_images: int = 0
    reused: bool = False
    failed: list = None  # (file, message)
    no_mask: list = None
    no_label: list = None
    labels_without_image: list = None
    mask_size_mismatch: list = None
    mask_zero_one: list = None
    mask_nonbinary: list = None
    mask_empty: list = None
    mask_label_map: list = None
    both_labels: list = None
    no_class_labels: list = None  # every class 0 beside a nevus column: no class, not a melanoma
    duplicate_ids: list = None
    seconds: float = 0.0
    notes: list = None  # sentences on how the inputs were read (not data-check problems)

    def __post_init__(self):
        for name in (*_CHECKS, "notes"):
            if getattr(self, name) is None:
                setattr(self, name, [])

    @property
    def problems(self) -> int:
        return sum(len(getattr(self, n)) for n in _CHECKS)

    def checks(self) -> dict:
        """The data-check lists, JSON-ready (kept in cache.json so a reused cache reports them too)."""
        return {n: [list(i) if isinstance(i, tuple) else i for i in getattr(self, n)] for n in _CHECKS}

    def restore_checks(self, checks: dict) -> None:
        for n in _CHECKS:
            items = checks.get(n, [])
            setattr(self, n, [tuple(i) if isinstance(i, list) else i for i in items])


def keep_ids(paths: list[Path], labels: dict, ids: list[str], folder: Path) -> tuple[list[Path], dict]:
    """Only the images (and label rows) of an id list, matched by `id_key`; an id with no image
    is an error."""
    keep = {id_key(i) for i in ids}
    missing = sorted(keep - {id_key(image_id_of(p)) for p in paths})
    if missing:
        raise InputError(f"{len(missing)} id(s) of the id list (--ids) have no image in {folder} "
                         f"(e.g. {', '.join(missing[:3])}).")
    return ([p for p in paths if id_key(image_id_of(p)) in keep],
            {k: v for k, v in labels.items() if id_key(k) in keep})


def build_cache(layout: Layout, out: Path, size: int = 256, fit: str = "squash", border: float = 0.0,
                margin: int = 0, workers: int = 0, progress: bool = True, ids: list[str] | None = None,
                chain: str = "direct") -> CacheReport:
    """Preprocess a folder into a cache (see the module docstring). Reuses a matching cache.

    Unreadable images are skipped and listed in the report; everything else is still done.
    `ids` keeps only those image ids (e.g. one side of `dermtool split`).
    """
    import time

    from dermtool.io import by_own_ids, find_masks, read_class_csv

    started = time.perf_counter()
    out = Path(out)
    report = CacheReport()
    # named, not cached: a name the manifest cannot hold, and a link to nothing, a folder or a FIFO named as an image
    paths, duplicates, unusable = usable_images(layout.images)
    if not paths and not unusable:
        raise InputError(f"{layout.images}: no images (*.jpg, *.png, *.tif, *.bmp) in this folder.")
    labels = read_class_csv(layout.labels, role="labels") if layout.labels else {}
    if ids is not None:
        # the id list first, then the data check: one side of a split is not failed by the other side's
        # files, and a listed file that cannot be cached is named with why, not as "no image"
        listed, labels = keep_ids(paths + [p for p, _ in unusable], labels, ids, layout.images)
        listed = set(listed)
        paths = [p for p in paths if p in listed]
        unusable = [(p, why) for p, why in unusable if p in listed]
        duplicates = [(p, first) for p, first in duplicates if first in listed]
    if not paths:
        raise InputError(f"{layout.images}: no usable image; the first: {unusable[0][1]}")
    report.duplicate_ids = [f"{p.name} and {first.name}" for p, first in duplicates]
    lesions = read_lesion_ids(layout.metadata, missing_ok=True) if layout.metadata else {}
    if layout.metadata and not lesions:
        header = _metadata_rows(layout.metadata)[0]
        lacking = [name for name, there in (("image_id (or isic_id)", _id_column(header)),
                                            ("lesion_id", "lesion_id" in header)) if not there]
        if lacking:
            report.notes.append(f"{layout.metadata} has no {' and no '.join(lacking)} column: manifest.csv leaves "
                                "lesion_id blank")
    # a CSV row or a mask names its image in either Unicode form (NFC in a CSV, NFD in names
    # macOS wrote): all are looked up by the images' own ids
    own = [image_id_of(p) for p in paths]
    keys = {id_key(i) for i in own}
    report.labels_without_image = [i for i in labels if id_key(i) not in keys]
    labels, lesions = by_own_ids(labels, own), by_own_ids(lesions, own)
    benign = {id_key(i) for i in read_benign_ids(layout.metadata)} if layout.metadata else set()
    benign = {i for i in own if id_key(i) in benign}
    masks = by_own_ids(find_masks(layout.masks), own) if layout.masks else {}
    params = dict(size=size, fit=fit, border=border, margin=margin, chain=chain,
                  masks=str(layout.masks), labels=str(layout.labels), mask_rule=_MASK_RULE, label_rule=_LABEL_RULE,
                  decode_rule=_DECODE_RULE,
                  metadata=str(layout.metadata), ids=len(ids) if ids is not None else None)
    fingerprint = _fingerprint(paths + sorted(set(masks.values())) + [p for p in (layout.labels, layout.metadata) if p],
                               params)
    meta_path = out / "cache.json"
    try:
        old_meta = read_json(meta_path, "cache record") if meta_path.exists() else {}
    except InputError:  # a damaged cache.json: rebuild rather than fail
        old_meta = {}
    if old_meta.get("fingerprint") == fingerprint:
        try:
            report.n_images = len(load_cache(out))
        except InputError:  # its record matches but a stack is damaged or gone: build it again
            pass
        else:
            report.reused = True
            report.restore_checks(old_meta.get("check", {}))
            report.seconds = time.perf_counter() - started
            return report

    out.mkdir(parents=True, exist_ok=True)
    for name in _CACHE_FILES:
        (out / name).unlink(missing_ok=True)  # a stale cache must never look valid
    try:
        rows = _fill_stacks(layout, out, paths, masks, labels, report, size, fit, border, margin, workers, progress,
                            benign, chain)
        report.failed += [(os.fsencode(p).decode("utf-8", "replace"), why) for p, why in unusable]
        for row in rows:
            row["lesion_id"] = lesions.get(row["image_id"], "")
        _write_manifest(out, rows)
        meta = dict(params, n_images=len(rows), fingerprint=fingerprint, input_size=size + 2 * margin,
                    check=report.checks())
        claim(out / "cache.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
        (out / "cache.json.tmp").replace(meta_path)  # written last: its presence marks a complete cache
    except BaseException:
        # Ctrl-C or a failure: no temp file stays behind, nor a cache that is not whole
        for name in _CACHE_FILES[1:] + _TMP_FILES:
            (out / name).unlink(missing_ok=True)
        raise
    report.n_images = len(rows)
    report.seconds = time.perf_counter() - started
    return report


#: cache.json first: written last, it marks the others as complete.
_CACHE_FILES = ("cache.json", "manifest.csv", "images.tif", "masks.tif")
_TMP_FILES = ("images.tif.tmp", "masks.tif.tmp", "manifest.csv.tmp", "cache.json.tmp",
              "images.tif.compact.tmp", "masks.tif.compact.tmp")
#: how many bytes of a stack `_truncate_stack` copies at a time: its memory, whatever the stack's size
_COPY_BYTES = 64 * 2**20


def _reserve(path: Path) -> None:
    """Give the file tifffile.memmap just made at `path` its disk blocks now. The file is sparse:
    a page of the memory map written later on a full disk kills the process with SIGBUS (no
    message, temporary files left behind), while this fails with ENOSPC, an OSError the command
    words as "the disk is full" after removing its temporary files. A file system that cannot
    reserve (EINVAL, EOPNOTSUPP) is left as it was."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def _fill_stacks(layout: Layout, out: Path, paths: list[Path], masks: dict, labels: dict, report: CacheReport,
                 size: int, fit: str, border: float, margin: int, workers: int, progress: bool,
                 benign: set | frozenset = frozenset(), chain: str = "direct") -> list[dict]:
    """Decode every image (and mask) on `workers` threads into OUT/images.tif and masks.tif,
    filling in the data check; returns the manifest rows of the images that were read.

    An image without a class label that metadata.csv calls benign gets the partial label
    NOT_MELANOMA: it is not a melanoma, but not known to be a nevus or a keratosis either."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import tifffile
    from tqdm import tqdm

    from dermtool.io import both_classes

    n, in_size = len(paths), size + 2 * margin
    tmp_images, tmp_masks = claim(out / "images.tif.tmp"), out / "masks.tif.tmp"
    if masks:
        claim(tmp_masks)
    img_stack = tifffile.memmap(tmp_images, shape=(n, in_size, in_size, 3), dtype=np.uint8, photometric="rgb")
    _reserve(tmp_images)
    mask_stack = tifffile.memmap(tmp_masks, shape=(n, size, size), dtype=np.uint8,
                                  photometric="minisblack") if masks else None
    if masks:
        _reserve(tmp_masks)
    rows = []
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        jobs = pool.map(lambda p: _process_one(p, masks.get(image_id_of(p)), size, fit, border, margin, chain),
                        paths)
        try:
            for item in tqdm(jobs, total=n, unit="img", desc="preprocess", disable=not progress, leave=False):
                if item.error:
                    report.failed.append((item.source, item.error))
                    continue
                k = len(rows)
                img_stack[k] = item.image
                has_mask = item.mask is not None
                if mask_stack is not None and has_mask:
                    mask_stack[k] = item.mask
                if layout.masks and not has_mask and item.mask_problem != "label_map":
                    report.no_mask.append(item.image_id)
                if item.mask_problem:
                    problem = "mask_size_mismatch" if item.mask_problem == "size" else f"mask_{item.mask_problem}"
                    getattr(report, problem).append(item.image_id)
                cls, label = -1, ""
                if item.image_id in labels and not labels[item.image_id].any():
                    report.no_class_labels.append(item.image_id)  # argmax of zeros would make it a melanoma
                elif item.image_id in labels:
                    row = labels[item.image_id]
                    if both_classes(row[0], row[1]):
                        report.both_labels.append(item.image_id)
                    cls = truth_class(row)
                    label = CLASS_NAMES[cls]
                elif item.image_id in benign:
                    cls, label = NOT_MELANOMA, "not_melanoma"
                elif layout.labels:
                    report.no_label.append(item.image_id)
                rows.append({"image_id": item.image_id, "label": label, "class_index": cls,
                             "has_mask": int(has_mask), "source": item.source, **item.transform.to_dict()})
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C stops now, not after every image
            raise
    img_stack.flush()
    del img_stack
    if mask_stack is not None:
        mask_stack.flush()
        del mask_stack
    if not rows:
        raise InputError(f"{layout.images}: none of the {n} images could be read "
                         f"(first: {report.failed[0][1].rstrip('.')}).")
    if len(rows) < n:  # failures left unused slots at the end: rewrite compactly
        _truncate_stack(tmp_images, len(rows))
        if masks:
            _truncate_stack(tmp_masks, len(rows))
    tmp_images.replace(out / "images.tif")
    if masks:
        tmp_masks.replace(out / "masks.tif")
    return rows


def _write_manifest(out: Path, rows: list[dict]) -> None:
    with open(claim(out / "manifest.csv.tmp"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "manifest.csv.tmp").replace(out / "manifest.csv")


def _truncate_stack(path: Path, k: int) -> None:
    """Keep the first `k` images of the stack at `path` (failed files left unused slots at its end):
    copied into a new stack `_COPY_BYTES` at a time, so memory stays bounded whatever its size."""
    import tifffile

    old = tifffile.memmap(path, mode="r")
    part = claim(path.with_suffix(".compact.tmp"))  # images.tif.tmp -> images.tif.compact.tmp
    new = tifffile.memmap(part, shape=(k, *old.shape[1:]), dtype=old.dtype,
                          photometric="rgb" if old.ndim == 4 else "minisblack")
    _reserve(part)
    step = max(1, _COPY_BYTES // max(1, old[0].nbytes))
    for start in range(0, k, step):
        new[start:start + step] = old[start:min(k, start + step)]
    new.flush()
    del new, old
    part.replace(path)
