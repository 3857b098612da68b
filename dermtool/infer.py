"""Batched inference over a folder: masks at the original size and a predictions CSV.

Decoding (reduced-size JPEG decode, fit to the model square) runs in a thread pool a few
batches ahead of the model, and post-processing plus writing run in another, so the cores stay
busy; memory holds only the batches in flight, whatever the folder size. Every file is written
under a temporary name and renamed, so an interrupted run leaves whole files or none.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import signal
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dermtool import CLASS_NAMES
from dermtool.augment import dihedral, undo_dihedral
from dermtool.config import CLS_VIEWS, ModelConfig, check_cls_views
from dermtool.data import find_images, id_key, image_id_of, keep_ids, not_files, unique_ids
from dermtool.decision import apply_temperature, check_threshold, decide
from dermtool.errors import InputError, disk_full, unreadable, write_failure
from dermtool.io import (claim, formula_name, encode_mask_png, first_few, open_append, read_csv_rows, read_json,
                         remove_stale_temps, write_atomic, write_csv_atomic)
from dermtool.modelio import default_model_dir, file_fingerprint, load_engine, load_model, model_fingerprint  # noqa: F401  (load_model: re-exported)
from dermtool.postprocess import PostprocessConfig, postprocess
from dermtool.preprocess import IMAGE_EXTENSIONS, Transform, prepare, restore, restore_mask
from dermtool.shards import (SHARDS_MAX, check_prediction_row, check_record, differing_settings, predictions_name,
                             record_name, shard_of)

MASK_SUFFIX = "_segmentation.png"
#: every file infer may write for one image, after its id
OUTPUT_SUFFIXES = (MASK_SUFFIX, "_overlay.jpg", "_probability.tif", "_segmentation.dcm")


@dataclass
class InferOptions:
    batch_size: int = 8
    tta: int = 1  # 1 (off), 4 (flips) or 8 (flips and transposes)
    post: PostprocessConfig = field(default_factory=PostprocessConfig)
    probabilities: bool = False
    overlay: bool = False
    resume: bool = False
    shard: tuple[int, int] = (1, 1)
    workers: int = 0
    engine: str | None = None  # None: the model's own runtime; see modelio.load_engine
    melanoma_threshold: float | None = None  # None: the model's own (config.json); see dermtool.decision
    dicom_seg: bool = False  # also a DICOM Segmentation for each DICOM source (dicom.write_segmentation)
    cls_views: str | None = None  # "frame" or "frame+lesion"; None: the model's own (config.json)
    ids: tuple | None = None  # only these image ids of the folder (e.g. one side of dermtool split); None: all

    def __post_init__(self):
        """The ranges `dermtool infer` checks, for the Python API too (tta=3 once failed after
        infer.json and an empty predictions.csv were written)."""
        def whole(value, low, high) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and low <= value <= high

        if not whole(self.batch_size, 1, 1024):
            raise InputError(f"batch_size must be a whole number from 1 to 1024, not {self.batch_size!r}.")
        if not whole(self.tta, 1, 8) or self.tta not in (1, 4, 8):
            raise InputError(f"tta must be 1, 4 or 8, not {self.tta!r}.")
        if not isinstance(self.post, PostprocessConfig):
            raise InputError(f"post must be a PostprocessConfig, not {type(self.post).__name__}.")
        if not whole(self.workers, 0, 64):
            raise InputError(f"workers must be a whole number from 0 (automatic) to 64, not {self.workers!r}.")
        if self.cls_views is not None and self.cls_views not in CLS_VIEWS:
            raise InputError(f"cls_views must be one of {', '.join(CLS_VIEWS)} (or None: the model's), "
                             f"not {self.cls_views!r}.")
        for name in ("probabilities", "overlay", "resume", "dicom_seg"):  # "false" would count as true
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"{name} must be True or False, not {getattr(self, name)!r}.")
        shard = self.shard
        if not (isinstance(shard, tuple) and len(shard) == 2 and whole(shard[1], 1, SHARDS_MAX)
                and whole(shard[0], 1, shard[1])):
            raise InputError(f"shard must be a tuple (K, N) of whole numbers with 1 <= K <= N (as --shard K/N; "
                             f"shards.parse_shard reads \"K/N\"), not {shard!r}.")
        if self.melanoma_threshold is not None:
            if isinstance(self.melanoma_threshold, (str, bytes, bool)):  # "0.5" once passed as 0.5
                raise InputError(f"melanoma_threshold must be a number between 0 and 1, not "
                                 f"{self.melanoma_threshold!r}.")
            self.melanoma_threshold = check_threshold(self.melanoma_threshold, "melanoma_threshold")
        if self.ids is not None:
            if isinstance(self.ids, Iterable) and not isinstance(self.ids, (str, bytes)):
                self.ids = tuple(self.ids)  # a generator is read once, here
            if not isinstance(self.ids, tuple) or not all(isinstance(i, str) for i in self.ids):
                raise InputError(f"ids must be a list or tuple of image ids (strings), not {self.ids!r:.60}.")


@dataclass
class InferSummary:
    done: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # (file, message)
    duplicates: list = field(default_factory=list)  # (skipped file, the file used for its id)
    seconds: float = 0.0
    load_seconds: float = 0.0
    model: str = ""
    engine: str = ""
    engine_file: str = ""  # what the engine runs: the weights, or the exported file
    device: str = ""
    interrupted: bool = False

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


def select_images(images_dir: Path, shard: tuple[int, int] = (1, 1), ids=None,
                  images: list[Path] | None = None) -> list[Path]:
    """Images of the folder, sorted by name; shard (k, n) keeps those whose id hashes to k
    (`shards.shard_of`), so a file's shard does not depend on the other files. `ids` keeps only
    those image ids; one without an image in the folder is an error, whatever the shard.
    `images`: the folder's `find_images`, when the caller has listed it already."""
    k, n = shard
    if not (1 <= k <= n):
        raise InputError(f"--shard {k}/{n}: K must be between 1 and N.")
    paths = find_images(images_dir) if images is None else images
    if not paths and not not_files(images_dir):
        raise InputError(f"{images_dir}: holds no images ({' '.join(IMAGE_EXTENSIONS)}); its subfolders are not "
                         "searched, and files named *_segmentation or *_superpixels (ISIC side files) or hidden ones are "
                         "not images.")
    if ids is not None:  # as preprocess --ids keeps them
        paths = keep_ids(paths, {}, list(ids), images_dir)[0]
    return [p for p in paths if shard_of(image_id_of(p), n) == k]


def unusable_entries(images_dir: Path, shard: tuple[int, int] = (1, 1), ids=None,
                     images: list[Path] | None = None) -> list[tuple[Path, str]]:
    """Entries of the folder named as images that infer does not run, each with why, so the run
    names them (find_images passes them over): a link to nothing, a folder or a FIFO named
    x.jpg (`data.not_files`), and a file whose name predictions.csv cannot hold (`io.formula_name`:
    a formula, a control character, not UTF-8, too long). Only those of this shard (and of `ids`).
    `images`: the folder's `find_images`, when the caller has listed it already."""
    named = [(p, formula_name(p, "predictions.csv")) for p in (find_images(images_dir) if images is None else images)]
    found = not_files(images_dir) + [(p, why) for p, why in named if why]
    keys = None if ids is None else {id_key(i) for i in ids}
    return sorted(((p, why) for p, why in found
                   if (keys is None or id_key(p.stem) in keys) and shard_of(image_id_of(p), shard[1]) == shard[0]),
                  key=lambda entry: entry[0].name)


def _run_model(model, x: np.ndarray, tta: int = 1, batch_size: int | None = None, cls_only: bool = False) -> dict:
    """Model outputs for a batch, averaged over `tta` symmetries of the square (1, 4 or 8).

    4 = the flips, 8 = flips and transposes (the model trained on all 8); each mask is mapped
    back before averaging. A short last batch is padded to `batch_size` so the traced graph is
    reused, not rebuilt. `cls_only`: only the class probabilities are wanted, so an engine that
    can classify without the mask decoder (`classify`: Keras, and LiteRT with an export's
    classifier.tflite) runs only its encoder and classifier; any other runs whole, its mask dropped.
    """
    n = x.shape[0]
    if batch_size and n < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    codes = {1: [0], 4: [0, 1, 2, 3], 8: list(range(8))}[int(tta) or 1]
    run = model.predict_on_batch
    if cls_only:
        classify = getattr(model, "classify", None)
        run = classify or (lambda xi: {"cls": model.predict_on_batch(xi)["cls"]})
    acc: dict = {}
    for k in codes:
        xi = np.ascontiguousarray(np.stack([dihedral(img, k) for img in x])) if k else x
        out = run(xi)
        for key, val in out.items():
            val = np.asarray(val, dtype=np.float32)
            if key == "seg":
                val = np.stack([undo_dihedral(v, k) for v in val[..., 0]])
            acc[key] = acc.get(key, 0) + val / len(codes)
    return {k: v[:n] for k, v in acc.items()}


def _save_png(path: Path, mask: np.ndarray) -> None:
    write_atomic(path, lambda t: t.write_bytes(encode_mask_png(mask)))


def _save_tiff(path: Path, prob: np.ndarray) -> None:
    import tifffile

    write_atomic(path, lambda t: tifffile.imwrite(t, prob.astype(np.float32)))


def _save_overlay(path: Path, source: Path, mask: np.ndarray, cls, k: int | None = None) -> None:
    from dermtool.overlay import class_label, draw_overlay
    from dermtool.preprocess import load_image

    pixels, _ = load_image(source)
    if pixels.shape[:2] != mask.shape:
        return
    label, colour = class_label(cls, k=k) if cls is not None else ("", (0, 0, 0))
    img = draw_overlay(pixels, mask, label, colour)
    write_atomic(path, lambda t: img.save(t, format="JPEG", quality=90))


def predict_batch(model, inputs: list[np.ndarray], tta: int = 1, batch_size: int | None = None,
                  temperature: float = 1.0, lesion_view: bool = False) -> list[tuple]:
    """The model on a batch of fitted inputs (`preprocess.prepare`): one (seg, cls) per input,
    seg the lesion probability of the model's square (None for a cls-only model), cls the class
    probabilities (None for a seg-only model), scaled by the model's `temperature` after the TTA
    average (calibrate fits T on these very probabilities). `dermtool infer` and the Python API
    both run this.

    `lesion_view` (a joint model whose config says cls_views "frame+lesion"): the classifier also
    sees the square around the lesion the model itself found (augment.lesion_box at the mask
    threshold 0.5), and the class probabilities are the mean of the two views. An image without
    a lesion (under LESION_MIN_AREA of the frame), or whose lesion fills it, keeps the whole frame's."""
    x = np.stack(inputs).astype(np.float32)
    out = _run_model(model, x, tta, batch_size)
    if lesion_view and "seg" in out and "cls" in out and out["seg"].shape[1:] == x.shape[1:3]:
        from PIL import Image

        from dermtool.augment import LESION_MIN_AREA, crop_square, lesion_box

        boxes = [lesion_box(s >= 0.5) if (s >= 0.5).mean() >= LESION_MIN_AREA else None for s in out["seg"]]
        near = [j for j, b in enumerate(boxes) if b is not None]
        if near:
            crops = np.stack([crop_square(np.clip(x[j], 0, 255).astype(np.uint8), boxes[j], Image.BILINEAR)
                              for j in near]).astype(np.float32)
            # the crops need only the classifier: the mask decoder is most of a joint pass
            out["cls"][near] = (out["cls"][near] + _run_model(model, crops, tta, batch_size, cls_only=True)["cls"]) / 2
    if "cls" in out:
        out["cls"] = apply_temperature(out["cls"], temperature)
    return [(out["seg"][j] if "seg" in out else None, out["cls"][j] if "cls" in out else None)
            for j in range(len(inputs))]


def finish_image(seg, cls, t: Transform, post: PostprocessConfig,
                 melanoma_threshold: float | None = None) -> tuple[np.ndarray | None, str]:
    """One image's model outputs -> (its mask at the original size, or None without a seg
    head; its label, or "" without a cls head): post-processing, then the inverse geometry.
    The label is the decision rule's (dermtool.decision.decide) at `melanoma_threshold`."""
    label = CLASS_NAMES[int(decide(cls[None], melanoma_threshold)[0])] if cls is not None else ""
    mask = restore_mask(postprocess(seg, post), t) if seg is not None else None
    return mask, label


def with_model_threshold(opts: InferOptions, cfg: ModelConfig, model_dir=None) -> InferOptions:
    """`opts` with the model's own mask threshold and melanoma threshold (config.json) where
    none was given; a melanoma threshold for a model without a classifier is refused."""
    if opts.post.threshold is None:
        opts = replace(opts, post=replace(opts.post, threshold=cfg.threshold))
    if opts.cls_views is None:
        opts = replace(opts, cls_views=cfg.cls_views)
    else:
        try:
            check_cls_views(opts.cls_views, cfg.task)
        except InputError as exc:
            raise InputError(f"{model_dir or 'the model'}: {exc}") from None
    if opts.melanoma_threshold is None:
        opts = replace(opts, melanoma_threshold=cfg.melanoma_threshold)
    elif not cfg.has_cls:
        raise InputError(f"{model_dir or 'the model'}: --melanoma-threshold needs a model with a classifier, "
                         f"not a {cfg.task} model.")
    return opts


def _finish_one(image_id: str, source: Path, t: Transform, seg, cls, cfg: ModelConfig,
                opts: InferOptions, out_dir: Path) -> list | None:
    """Post-process and write one image's files; returns its CSV row (or None for seg-only)."""
    mask, label = finish_image(seg, cls, t, opts.post, opts.melanoma_threshold)
    k = CLASS_NAMES.index(label) if cls is not None else None
    if seg is not None:
        written = []  # a failure part-way removes this image's files: all of its outputs or none
        try:
            if opts.probabilities:
                written.append(out_dir / f"{image_id}_probability.tif")
                _save_tiff(written[-1], restore(seg, t))
            if opts.overlay:
                written.append(out_dir / f"{image_id}_overlay.jpg")
                _save_overlay(written[-1], source, mask, cls, k)
            if opts.dicom_seg and source.suffix.lower() == ".dcm":
                from dermtool.dicom import write_segmentation

                written.append(out_dir / f"{image_id}_segmentation.dcm")
                write_atomic(written[-1], lambda tmp: write_segmentation(source, mask, tmp))
            _save_png(out_dir / f"{image_id}{MASK_SUFFIX}", mask)  # last: marks the image as done
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        # an earlier run's overlay or probability map of this image, which this run did not ask
        # for, would sit beside this run's mask showing another model's answer
        written.append(out_dir / f"{image_id}{MASK_SUFFIX}")
        for suffix in OUTPUT_SUFFIXES:
            stale = out_dir / f"{image_id}{suffix}"
            if stale not in written:
                stale.unlink(missing_ok=True)
    if cls is None:
        return [image_id]
    return [image_id] + [f"{p:.6f}" for p in cls] + [label]


def _csv_header(cfg: ModelConfig) -> list[str]:
    return ["image_id"] + list(cfg.class_names) + ["label"] if cfg.has_cls else ["image_id"]


def _read_rows(path: Path, header: list[str], partial: bool = False, run: dict | None = None) -> dict[str, list]:
    """Rows of an earlier (possibly interrupted) run, keyed by image id; broken lines dropped, and
    a row that is not one of dermtool's (an edited file) refused, as merge refuses it. In the
    partial file a kill may have cut the last line short: a row failing the check is dropped
    there (its image is done again), not refused. `run`: the earlier run's record, so that the
    probabilities must sum to 1 and the label be its decision, as merge checks them."""
    width = len(header)
    rows: dict[str, list] = {}
    if not path.exists():
        return rows
    for i, row in enumerate(read_csv_rows(path, "predictions CSV of the earlier run", empty_ok=True)):
        if i == 0 and row and row[0] == "image_id":
            continue
        if len(row) == width and row[0]:
            try:
                check_prediction_row(path, i + 1, row, header, run)
            except InputError:
                if not partial:
                    raise
                continue
            rows[row[0]] = row
    return rows


def _is_done(source: Path, cfg: ModelConfig, rows: dict, out_dir: Path, opts: InferOptions) -> bool:
    """Whether --resume may skip an image: its row and every file this run writes for it are there
    (a file deleted since is written again, as `_finish_one` writes them)."""
    image_id = image_id_of(source)
    if cfg.has_seg:
        wanted = [MASK_SUFFIX] + ["_probability.tif"] * opts.probabilities + ["_overlay.jpg"] * opts.overlay + (
            ["_segmentation.dcm"] if opts.dicom_seg and source.suffix.lower() == ".dcm" else [])
        if not all((out_dir / f"{image_id}{suffix}").is_file() for suffix in wanted):
            return False
    return image_id in rows


#: the columns of the hidden file that keeps, per image done, the size and time of the file read
SOURCE_FIELDS = ["image_id", "size", "mtime_ns"]


def _file_key(path: Path) -> tuple[str, str]:
    """What identifies the version of an image file read (as `preprocess` fingerprints its files):
    a file rewritten in place changes its modification time, a different one its size too."""
    try:
        st = Path(path).stat()
    except OSError:
        return ("", "")  # gone: never equal to a recorded key, so it is tried again and named
    return (str(st.st_size), str(st.st_mtime_ns))


def _read_sources(path: Path) -> dict[str, tuple[str, str]]:
    """image id -> file key of the image each earlier row was computed from (the last one wins).
    A folder written before this file existed has none: its rows are trusted, as before."""
    keys: dict[str, tuple[str, str]] = {}
    if not path.is_file() or path.is_symlink():
        return keys
    for row in read_csv_rows(path, "infer's record of the images read", empty_ok=True):
        if len(row) == len(SOURCE_FIELDS) and row[0] and row != SOURCE_FIELDS:
            keys[row[0]] = (row[1], row[2])
    return keys


def _device(engine: str) -> str:
    if engine in ("litert", "onnx"):  # their CPU builds: TensorFlow's GPUs are not theirs
        return "CPU"
    from dermtool import _tf

    gpus = _tf.gpu_count()
    return f"{gpus} GPU(s)" if gpus else "CPU"


def predict_folder(images_dir: Path, out_dir: Path, model_dir: Path | None = None,
                   opts: InferOptions = InferOptions(), progress: bool | float = True, log=print) -> InferSummary:
    """Run a model over a folder; see the module docstring. Returns a summary.

    `progress`: True, a bar; False, none; a number of seconds, a line through `log` that often.
    """
    held: list = []  # the run's locks on its folder (_lock_folder): let go when the run ends, however it ends
    try:
        return _predict_folder(images_dir, out_dir, model_dir, opts, progress, log, held)
    finally:
        for path, lock in reversed(held):
            _let_go(path, lock)


#: the lock of a whole folder: a run of all its images holds it alone, shard runs share it
FOLDER_LOCK = ".infer.lock"


def _lock_folder(out_dir: Path, shard: tuple[int, int]) -> list:
    """Locks on writing `out_dir` as this run, as [(path, open file)], each let go (and its file
    removed once no run holds it) when the run ends. A run of the whole folder holds FOLDER_LOCK
    alone; a shard run shares it with the other parts of its N and holds its own part's lock
    alone: so a second run of the same images at once is refused, where it once mixed its masks
    with the first's and deleted the first's partial CSV, while the N parts still write one
    folder together. The locks are the kernel's (flock): a killed run holds none. [] where the
    system or the file system has no such locks."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # Windows
        return []
    whole = shard == (1, 1)
    busy = (f"{out_dir}: another dermtool infer is writing this folder now; wait for it to end, or write to another "
            "--out.")
    folder = _take_lock(out_dir / FOLDER_LOCK, exclusive=whole, busy=busy)
    if folder is None:
        return []
    held = [folder]
    try:
        if not whole:
            for other in out_dir.glob(".infer.shard*of*.json.lock"):  # parts of another N cover the same images
                k, _, n = other.name[len(".infer.shard"):-len(".json.lock")].partition("of")
                if n != str(shard[1]) and _is_held(other):
                    raise InputError(f"{out_dir}: a run of other --shard parts (--shard {k}/{n}) is writing this "
                                     f"folder now; the parts of one run share an N ({shard[1]} here).")
            part = _take_lock(out_dir / f".{record_name(shard)}.lock", exclusive=True, busy=busy)
            if part is not None:
                held.append(part)
    except BaseException:
        for path, lock in reversed(held):
            _let_go(path, lock)
        raise
    return held


def _take_lock(path: Path, exclusive: bool, busy: str):
    """(path, open file) holding an flock on `path` (created if missing), or None where the file
    system has no locks; InputError `busy` when another run holds it in a way this one cannot
    share. The file is never replaced (a new file would be another lock); a file removed by its
    last holder as this run opened it is opened again."""
    import fcntl

    waits = 0 if exclusive else 10  # a part ending lets go through a brief exclusive hold (_let_go)
    for _ in range(3 + waits):
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise InputError(f"{path}: is a link, a folder or another special file where infer keeps its lock; remove "
                             "it, then run again.")
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        lock = os.fdopen(os.open(path, flags, 0o644), "r+")
        try:
            fcntl.flock(lock.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            if waits:
                waits -= 1
                time.sleep(0.1)
                continue
            raise InputError(busy) from None
        except OSError:  # a file system without locks (some network mounts): the run goes on unlocked
            lock.close()
            return None
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(lock.fileno()).st_ino:
                return path, lock
        except FileNotFoundError:
            pass
        lock.close()
    raise InputError(f"{path.parent}: could not take the lock {path.name}; other runs keep writing this folder.")


def _is_held(path: Path) -> bool:
    """Whether a run holds the lock file `path` alone now."""
    import fcntl

    try:  # never through a link, and a FIFO planted there is not waited on
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _let_go(path: Path, lock) -> None:
    """Let go of a lock from `_take_lock`, removing its file when no other run holds it (the file
    is removed while still held alone: a run that opened it meanwhile takes a new one)."""
    import fcntl

    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:  # BlockingIOError: another part still holds the folder's lock; it removes it
        pass
    finally:
        lock.close()


def _foreign_masks(out_dir: Path, paths: list[Path], shard: tuple[int, int]) -> list[str]:
    """Masks in `out_dir` named like this run's outputs that no dermtool infer wrote: a folder
    with no infer record and no predictions CSV of this run's part (a folder of truth masks,
    say), which the run would silently replace."""
    if not out_dir.is_dir() or any(os.path.lexists(out_dir / name) for name in
                                   (record_name(shard), "infer.json", predictions_name(shard), "predictions.csv")):
        return []
    if any(out_dir.glob("infer.shard*of*.json")):  # another part's: a folder shards write together
        return []
    there = set(os.listdir(out_dir))  # listed once: a run may hold 100,000 images
    return [name for name in (f"{image_id_of(p)}{MASK_SUFFIX}" for p in paths) if name in there]


def _predict_folder(images_dir: Path, out_dir: Path, model_dir: Path | None, opts: InferOptions,
                    progress: bool | float, log, held: list) -> InferSummary:
    started = time.perf_counter()
    if not isinstance(opts, InferOptions):
        raise InputError(f"opts must be an InferOptions, not {type(opts).__name__}.")
    for name, value in (("images_dir", images_dir), ("out_dir", out_dir), ("model_dir", model_dir)):
        if not isinstance(value, (str, os.PathLike)) and not (name == "model_dir" and value is None):
            raise InputError(f"{name} must be a path, not {type(value).__name__}.")
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise InputError(f"{images_dir}: is a file; give the folder of images." if images_dir.exists()
                         else f"{images_dir}: images folder not found.")
    if out_dir.is_symlink() and not out_dir.exists():  # mkdir would say only "File exists"
        raise InputError(f"{out_dir}: is a link to nothing (or a loop of links); give a folder, or where to make one.")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; out_dir is the folder infer writes.")
    if out_dir.exists() and out_dir.resolve() == images_dir.resolve():
        raise InputError(f"{out_dir}: is the images folder; the outputs go to a folder of their own, so the masks and "
                         "CSV never overwrite an input (a truth mask of the same name) and are never read as images "
                         "by the next run.")
    # one id, one output: of a.jpg and a.png only the first by name is used, so no two
    # images ever write (or race for) the same files
    listing = find_images(images_dir)  # listed once: a shared folder may hold 100,000 files
    paths, duplicates = unique_ids(select_images(images_dir, opts.shard, opts.ids, listing))
    unusable = unusable_entries(images_dir, opts.shard, None if opts.ids is None else set(opts.ids), listing)
    named = {p for p, _ in unusable}
    paths = [p for p in paths if p not in named]
    if opts.melanoma_threshold is not None:
        opts = replace(opts, melanoma_threshold=check_threshold(opts.melanoma_threshold))
    model = load_engine(model_dir, opts.engine, log=log)
    cfg = model.cfg
    foreign = _foreign_masks(out_dir, paths, opts.shard) if cfg.has_seg else []  # a classifier writes no mask
    if foreign:
        raise InputError(f"{out_dir}: holds {len(foreign)} mask(s) named as this run's outputs that no dermtool infer "
                         f"wrote ({first_few(foreign)}), truth masks perhaps; the run would replace them, so write to "
                         "another --out.")
    threshold_given = opts.melanoma_threshold is not None
    opts = with_model_threshold(opts, cfg, model_dir)
    # the model as an absolute path: the report and calibrate read it later, from anywhere
    summary = InferSummary(model=str(model_dir.resolve()),
                           engine=model.name, engine_file=str(model.path), duplicates=duplicates,
                           failed=[(str(p), why) for p, why in unusable])
    record = _run_record(images_dir, model_fingerprint(model_dir), summary, cfg, opts)
    record["weights_sha1"] = model_fingerprint(model_dir, config=False)  # what calibrate checks
    # the file the engine runs (an export: another file may carry the model's name), which merge
    # and --resume compare
    record["engine_sha1"] = (record["weights_sha1"] if model.name == "keras"  # the same file, hashed once
                             else file_fingerprint(Path(model.path)))
    # where the threshold came from, as it was then: the model may be recalibrated after the run
    record["melanoma_threshold_source"] = (None if opts.melanoma_threshold is None else
                                           "option" if threshold_given else "model")
    record["target_sensitivity"] = (None if threshold_given or opts.melanoma_threshold is None
                                    else (cfg.calibration or {}).get("target_sensitivity"))
    record["sources_kept"] = True  # this run keeps the file key of every image it does (see sources_path)
    if out_dir.is_dir():  # locked before anything of the folder is read or removed
        held.extend(_lock_folder(out_dir, opts.shard))
    earlier = _check_resume(out_dir / record_name(opts.shard), record, out_dir) if opts.resume else {}
    if earlier:  # this session's counts are its own; what the sessions before it did is kept beside them
        record["earlier_sessions"] = _earlier_sessions(earlier)
    header = _csv_header(cfg)
    csv_path = out_dir / predictions_name(opts.shard)
    partial_path = out_dir / f".{csv_path.stem}.partial.csv"  # appended per image: survives a kill
    # the size and time of each image read, so that --resume does again an image changed since
    sources_path = out_dir / f".{csv_path.stem}.sources.csv"
    for own in (partial_path, sources_path):  # before reading them: a FIFO there would block the read
        if os.path.lexists(own) and not own.is_symlink() and not own.is_file():
            raise InputError(f"{own}: is a folder or another special file where infer keeps its own file; remove "
                             "it, then run again.")
    rows = _read_rows(csv_path, header, run=earlier) if opts.resume else {}
    rows.update(_read_rows(partial_path, header, partial=True, run=earlier) if opts.resume else {})
    try:
        sources = _read_sources(sources_path) if opts.resume else {}
    except InputError as exc:  # damaged: no image's key can be trusted, so every one counts as changed
        log(f"note: {str(exc).rstrip('.')}; every image is checked as changed.")
        sources = {}
    # an image without a key in a folder whose run kept them (the file deleted or damaged since) counts
    # as changed; a folder of an older dermtool kept none, and its rows are trusted as before
    unknown = ("", "") if earlier.get("sources_kept") else None
    changed = [p for p in paths if opts.resume and image_id_of(p) in rows
               and sources.get(image_id_of(p), unknown or _file_key(p)) != _file_key(p)]
    redo = set(changed)
    todo = [p for p in paths if not (opts.resume and _is_done(p, cfg, rows, out_dir, opts))
            or p in redo]
    if changed:
        log(f"note: {len(changed)} image(s) changed since the earlier run ({first_few([p.name for p in changed])}); "
            "doing them again")
    if opts.resume:
        # the earlier outputs of an image done again go (changed, or an output deleted): a redo that
        # fails must not leave its old row, or any of its files, standing
        for p in [p for p in todo if image_id_of(p) in rows or p in redo]:
            rows.pop(image_id_of(p), None)
            sources.pop(image_id_of(p), None)
            for suffix in OUTPUT_SUFFIXES:
                output = out_dir / f"{image_id_of(p)}{suffix}"
                if output.is_symlink() or output.is_file():  # a folder there is not ours: its write fails, named
                    output.unlink()
    if not opts.resume:
        rows = {}
    # never pad beyond the images there are: memory follows the work, not --batch-size
    batch_size = max(1, min(opts.batch_size, len(todo)))
    if todo:  # one call on zeros traces the graph now, so the first real batch is not the slow one
        zeros = np.zeros((batch_size, cfg.input_size, cfg.input_size, 3), np.float32)
        _run_model(model, zeros)
        if opts.cls_views == "frame+lesion":  # and the lesion view's classifier-only graph
            _run_model(model, zeros, cls_only=True)
    summary.load_seconds = time.perf_counter() - started
    started = time.perf_counter()  # images/s counts the pipeline, not the one-off model load
    summary.device, summary.skipped = _device(model.name), len(paths) - len(todo)
    if out_dir.is_dir():  # masks score would take for this run's predictions
        this_run = {image_id_of(p) for p in paths}
        masks = [p.name[:-len(MASK_SUFFIX)] for p in out_dir.glob(f"*{MASK_SUFFIX}")]
        left = sorted(i for i in masks if i not in this_run) if opts.shard == (1, 1) else []  # parts share a folder
        if left:
            log(f"note: {out_dir} holds {len(left)} mask(s) of images not in this run ({first_few(left)}), left by an "
                "earlier run; predictions.csv lists only this run's images, so write to a fresh --out to keep them apart")
        own = sorted(i for i in masks if i in this_run) if not cfg.has_seg else []
        if own:
            log(f"note: {out_dir} holds {len(own)} mask(s) of this run's images ({first_few(own)}) from an earlier run; "
                "this model writes none, so score --pred-masks would take that run's masks for this one's: write to a "
                "fresh --out to keep them apart")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not held:  # a folder made just now
        held.extend(_lock_folder(out_dir, opts.shard))
    # temporary files a killed run left, of the outputs this run writes again
    remove_stale_temps(out_dir, {f"{image_id_of(p)}{suffix}" for p in todo for suffix in OUTPUT_SUFFIXES}
                       | {csv_path.name, sources_path.name, record_name(opts.shard)})
    if csv_path.is_dir():  # found now, not after every image is done
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(csv_path))
    # the settings are on disk before any output, so even a killed run can be checked on --resume
    _write_run_json(out_dir / record_name(opts.shard), record, summary, running=True)
    workers = opts.workers or min(8, max(2, os.cpu_count() or 1))
    if not opts.resume:
        claim(partial_path)  # a new, empty file of this run's (a link planted there is removed)
        claim(sources_path)
    partial = open_append(partial_path, newline="")
    partial_writer = csv.writer(partial)
    sources_file = open_append(sources_path, newline="")
    sources_writer = csv.writer(sources_file)
    read_keys: dict[Path, tuple[str, str]] = {}  # taken before decoding: the version the outputs are of

    def done(path: Path, row: list) -> None:  # a row is in: kept in the partial CSV and its source's key
        # Ctrl-C or SIGTERM (a KeyboardInterrupt) held off meanwhile: landing between these lines it left
        # a row on disk whose image was neither counted nor keyed, and --resume called it changed
        # the key before the row, in memory and on disk: a key without a row (a SIGKILL between the two
        # writes) only has the image done again
        with _signals_held():
            sources[row[0]] = read_keys.get(path, ("", ""))
            rows[row[0]] = row
            summary.done += 1
            sources_writer.writerow([row[0], *sources[row[0]]])
            sources_file.flush()
            partial_writer.writerow(row)
            partial.flush()
    bar = _Progress(len(todo), progress, log)

    def load(path: Path):
        read_keys[path] = _file_key(path)
        try:
            x, t = prepare(path, cfg.size, cfg.fit, cfg.border, cfg.margin, cfg.input_chain)
            return path, x, t, ""
        except InputError as exc:
            return path, None, None, str(exc)
        except MemoryError:  # one image too large for this machine: named, and the rest go on
            return path, None, None, f"{path}: not enough memory to decode it; skipped."
        except Exception as exc:  # a decoder's own error on a damaged file (zlib, a bad tag): that file only
            return path, None, None, unreadable(path, exc)

    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    writes: deque = deque()  # (path, future of its CSV row), in submission order
    try:
        with ThreadPoolExecutor(workers) as decode_pool, ThreadPoolExecutor(workers) as write_pool:
            ahead: deque = deque()
            it = iter(batches)
            for batch in it:
                ahead.append([decode_pool.submit(load, p) for p in batch])
                if len(ahead) >= 3:  # keep a few batches decoding while the model runs
                    break
            while ahead:
                loaded = [f.result() for f in ahead.popleft()]
                nxt = next(it, None)
                if nxt is not None:
                    ahead.append([decode_pool.submit(load, p) for p in nxt])
                good = [item for item in loaded if not item[3]]
                for path, _, _, err in loaded:
                    if err:
                        summary.failed.append((str(path), err))
                        bar.update(1)
                if not good:
                    continue
                outputs = predict_batch(model, [g[1] for g in good], opts.tta, batch_size, cfg.temperature,
                                        opts.cls_views == "frame+lesion")
                for (path, _, t, _), (seg, cls) in zip(good, outputs):
                    writes.append((path, write_pool.submit(_finish_one, image_id_of(path), path, t, seg, cls,
                                                           cfg, opts, out_dir)))
                while writes and (len(writes) > 4 * batch_size or writes[0][1].done()):
                    _collect(writes.popleft(), summary, done, bar)
            while writes:
                _collect(writes.popleft(), summary, done, bar)
    except KeyboardInterrupt:
        summary.interrupted = True
        # Leaving the pools waited for the writes already submitted: their files are on disk,
        # so their rows go into the CSV too, which then lists exactly the images written.
        for path, future in writes:
            if not isinstance(future.exception(), KeyboardInterrupt):
                _collect((path, future), summary, done, bar)
    finally:
        bar.close()
        partial.close()
        sources_file.close()
        ids = [image_id_of(p) for p in paths]
        in_folder = set(ids)
        ordered = [rows[i] for i in ids if i in rows]
        gone = sorted(k for k in rows if k not in in_folder)
        if gone:  # the CSV lists this run's images: an earlier run's row of an image gone since is dropped
            log(f"note: dropped {len(gone)} row(s) of the earlier run whose image is no longer in this run "
                f"({first_few(gone)})")
        write_csv_atomic(csv_path, header, ordered)
        partial_path.unlink(missing_ok=True)
        write_csv_atomic(sources_path, SOURCE_FIELDS, [[k, *sources[k]] for k in sorted(sources) if k in rows])
        summary.seconds = time.perf_counter() - started
        _write_run_json(out_dir / record_name(opts.shard), record, summary, running=False)
    return summary


def _collect(item, summary: InferSummary, done, bar) -> None:
    path, future = item
    try:
        row = future.result()
    except InputError as exc:
        summary.failed.append((str(path), str(exc)))
    except OSError as exc:
        if disk_full(exc):  # every image after it would fail too: stop with the one line
            raise
        summary.failed.append((str(path), write_failure(exc, f"the outputs of {path.name}")))
    except Exception as exc:  # one image's post-processing or writing: named, and the rest go on
        summary.failed.append((str(path), unreadable(path, exc, "could not be processed")))
    else:
        done(path, row)  # counts it
    bar.update(1)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait while a few bookkeeping lines run whole, then are delivered.

    Python runs a signal's handler in the main thread between two bytecodes, whichever thread the
    kernel gave the signal to (a thread mask would not do: the decode and write pools' threads
    take it); so for the block the handlers only note the signal, and on leaving the block the
    handlers are put back and the signal is sent again. Outside the main thread (the API run
    from a thread), where no handler can be set, and where a handler was set outside Python, the
    block runs as it is.
    """
    names = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in names}
    if threading.current_thread() is not threading.main_thread() or None in before.values():
        yield
        return
    caught = []
    for s in names:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if caught:
            os.kill(os.getpid(), caught[0])  # to the handler put back, as if it came now


class _Progress:
    """The progress of a run: a tqdm bar on a terminal (`progress` True), nothing (False), or a
    line through `log` every `progress` seconds (a number: a log file or a scheduler's output,
    where a bar would be one line rewritten thousands of times)."""

    def __init__(self, total: int, progress, log):
        from tqdm import tqdm

        self.total, self.log, self.count = total, log, 0
        self.every = None if isinstance(progress, bool) or not progress else float(progress)
        self.started = self.last = time.perf_counter()
        self.bar = tqdm(total=total, unit="img", desc="infer", disable=progress is not True, leave=False)

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.count += n
        now = time.perf_counter()
        if self.every and now - self.last >= self.every and self.count < self.total:
            self.last = now
            rate = self.count / (now - self.started)
            left = (self.total - self.count) / rate if rate else 0
            self.log(f"infer: {self.count} of {self.total} images ({100 * self.count / self.total:.0f} %), "
                     f"{rate:.1f} images/s, about {_duration(left)} left")

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _run_record(images_dir: Path, model_sha1: str, summary: InferSummary, cfg: ModelConfig,
                opts: InferOptions) -> dict:
    """The settings of a run, as infer.json records them (the counts are added when written)."""
    return {
        "model": summary.model, "engine": summary.engine, "engine_file": summary.engine_file,
        "model_sha1": model_sha1, "task": cfg.task, "images": str(Path(images_dir).resolve()),
        "tta": opts.tta, "postprocess": opts.post.to_dict(), "probabilities": opts.probabilities,
        "overlay": opts.overlay, "dicom_seg": opts.dicom_seg, "shard": f"{opts.shard[0]}/{opts.shard[1]}",
        "temperature": cfg.temperature, "melanoma_threshold": opts.melanoma_threshold,
        "cls_views": opts.cls_views,
        # the ids themselves, not a path or a hash: merge checks every one has a row, wherever it
        # runs and whatever became of the list file (10,000 ids are about 170 KB)
        "ids": None if opts.ids is None else sorted(set(opts.ids)),
    }


def _check_resume(record_path: Path, record: dict, out_dir: Path) -> dict:
    """--resume only continues the same run: another model, other settings or another --ids list
    would fill the rest of the folder with different outputs under one infer.json. Returns the
    earlier record ({} when there is none)."""
    if not record_path.exists():
        parts = sorted(out_dir.glob("infer.shard*of*.json")) if record_path.name == record_name((1, 1)) else []
        if parts:  # a sharded run's folder, merged or not: its rows would be trusted unchecked
            raise InputError(f"{out_dir}: holds the records of a sharded run ({parts[0].name}"
                             f"{', ...' if len(parts) > 1 else ''}), which a whole-run --resume cannot check its rows "
                             "against: resume each part with --shard K/N --resume and merge again, or run into a "
                             "fresh --out.")
        return {}  # no record (a run of an older dermtool): nothing to compare with
    try:
        earlier = check_record(record_path, read_json(record_path, "record of the earlier run"),
                               "record of the earlier run")
    except InputError as exc:  # damaged: resuming unchecked could mix two runs without a word
        raise InputError(f"{str(exc).rstrip('.')}; --resume cannot check that it continues the same run: "
                         "run without --resume to redo the folder, or delete the record to resume unchecked.") from None
    diffs = differing_settings(earlier, record)
    if "ids" in earlier and earlier["ids"] != record.get("ids"):  # the rows would be of two selections
        count = lambda ids: "no --ids list" if ids is None else f"an --ids list of {len(ids)} id(s)"  # noqa: E731
        diffs.append(f"{count(earlier['ids'])} in the run, {count(record.get('ids'))} now")
    if earlier.get("images") and earlier["images"] != record["images"]:
        # the rows of the other folder's images would stay, and an id in both would be skipped as done
        diffs.insert(0, f"images folder {earlier['images']} in the run, {record['images']} now")
    if diffs:
        raise InputError(f"{record_path}: --resume would mix two runs in {out_dir}, {'; '.join(diffs)}; "
                         "resume with the run's settings, or write to another --out.")
    return earlier if isinstance(earlier, dict) else {}


def _earlier_sessions(earlier: dict) -> dict:
    """The images done and seconds spent by the sessions before a --resume, summed over every
    session, from their record (checked by `shards.check_record`)."""
    before = earlier.get("earlier_sessions", {})
    return {"done": int(earlier.get("done", 0) + before.get("done", 0)),
            "seconds": round(earlier.get("seconds", 0) + before.get("seconds", 0), 2)}


def _write_run_json(path: Path, record: dict, summary: InferSummary, running: bool) -> None:
    record = dict(
        record, device=summary.device, running=running,
        done=summary.done, skipped=summary.skipped, failed=[f for f, _ in summary.failed],
        duplicates=[str(p) for p, _ in summary.duplicates],
        seconds=round(summary.seconds, 2), model_load_seconds=round(summary.load_seconds, 2),
        images_per_second=round(summary.images_per_second, 2), interrupted=summary.interrupted,
    )
    write_atomic(path, lambda t: t.write_text(json.dumps(record, indent=2) + "\n"))
