"""The review page of an infer run: OUT/report.html with a thumbnail gallery in triage order.

`write_report(out_dir)` reads what `dermtool infer` left in OUT (predictions.csv, infer.json,
the masks) and the original images, draws one thumbnail per image with the same drawing code
as `--overlay` (dermtool.overlay) into OUT/report_files/, and writes report.html: the run's
facts, then a gallery that JavaScript in the page renders a page at a time from a JSON blob, so
the page stays light for 10,000 images (thumbnails load lazily, only the page shown is in the
DOM). Nothing is fetched from a network; the folder can be zipped and opened anywhere.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dermtool import CLASS_NAMES
from dermtool.errors import InputError, unreadable
from dermtool.io import _decode, read_csv_rows, read_json, write_atomic
from dermtool.shards import check_prediction_row

REPORT = "report.html"
FILES = "report_files"
THUMB_SIDE = 256  # long side of a thumbnail: the gallery shows ~220 px; 1/4 of a 1024 px JPEG decodes fast
PAGE_SIZE = 60
MASK_SUFFIX = "_segmentation.png"


@dataclass
class ReportSummary:
    path: Path
    entries: int = 0
    thumbnails: int = 0  # drawn now (fresh ones from an earlier report are reused)
    missing_images: list = field(default_factory=list)  # ids whose original image was not found
    failed: list = field(default_factory=list)  # (image id, why): drawn without a thumbnail
    seconds: float = 0.0


def write_report(out_dir: Path, images_dir: Path | None = None, workers: int = 0,
                 thumb_side: int = THUMB_SIDE) -> ReportSummary:
    """Write OUT/report.html and its thumbnails for the infer output folder `out_dir`.

    Args:
        out_dir: a folder written by `dermtool infer` (predictions.csv or its shard parts).
        images_dir: where the original images are; default: the folder infer.json names.
        workers: thumbnail threads (0: one per core, at most 8).
        thumb_side: long side of the thumbnails in pixels.

    Raises:
        InputError: `out_dir` holds no predictions, or the images folder does not exist.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    run = read_run(out_dir)
    header, rows = read_predictions(out_dir)
    if images_dir is None and run.get("images"):
        images_dir = Path(run["images"])
    sources = _find_sources(images_dir)
    summary = ReportSummary(out_dir / REPORT, entries=len(rows))
    files = out_dir / FILES
    if files.is_symlink():
        raise InputError(f"{files}: a link, where the report keeps a folder of its own thumbnails; dermtool does "
                         "not write through it (remove the link and run again).")
    if files.exists() and not files.is_dir():
        raise InputError(f"{files}: a file is where the report's thumbnail folder goes; move it away and run again.")
    files.mkdir(exist_ok=True)
    class_cols = [c for c in CLASS_NAMES if c in header]
    jobs = []
    for row in rows:
        source = sources.get(row["image_id"])
        if source is None:
            summary.missing_images.append(row["image_id"])
        else:
            jobs.append((row, source))
    workers = workers or min(8, os.cpu_count() or 1)
    has_masks = run.get("task") in ("seg", "joint")  # every row of such a run has its mask file
    with ThreadPoolExecutor(workers) as pool:  # Pillow decodes and encodes without the GIL
        drawn = list(pool.map(lambda job: _thumbnail(job[0], job[1], out_dir, files, class_cols, thumb_side,
                                                     has_masks), jobs))
    summary.thumbnails = sum(1 for d, _ in drawn if d == "drawn")
    summary.failed = [(row["image_id"], problem) for (row, _), (_, problem) in zip(jobs, drawn) if problem]
    # the page's thumbnail flag: 1 drawn, 2 none because of a problem named in the notes, 0 (absent) no image
    thumbs = {row["image_id"]: 1 if d else 2 for (row, _), (d, problem) in zip(jobs, drawn) if d or problem}
    payload = _payload(rows, class_cols, thumbs, out_dir)
    from dermtool.pages import write_page

    # counted from the payload's class index, the one the gallery's filter shows (`_label_index`:
    # the label column, else the argmax), so a button's count is what its filter lists
    decided = [packed[1] for packed in payload["rows"]]
    write_page(summary.path, "report.html.j2", run=_facts(run, out_dir, summary, images_dir),
               payload=payload, rows=rows, has_classes=bool(class_cols),
               classes=[{"name": c, "display": _display(c), "count": decided.count(k)}
                        for k, c in enumerate(class_cols)])
    summary.seconds = time.perf_counter() - started
    return summary


def read_run(out_dir: Path) -> dict:
    """infer.json of the folder ({} when absent); shard summaries are added up.

    Raises:
        InputError: a record is damaged (`read_record`).
    """
    runs = [read_record(p) for p in _records(out_dir)]
    if not runs:
        return {}
    run = dict(runs[0])
    for other in runs[1:]:
        for key in ("done", "skipped", "seconds"):
            run[key] = run.get(key, 0) + other.get(key, 0)
        run["failed"] = run.get("failed", []) + other.get("failed", [])
    if len(runs) > 1:  # shards ran one after another or side by side: no single rate is right
        run["images_per_second"] = None
        run["shards"] = len(runs)
    return run


def read_record(path: Path) -> dict:
    """One record of infer (infer.json or infer.shardKofN.json), its values of the kinds infer
    writes: the checks of merge and --resume (`shards.check_record`).

    The rule for the report: a damaged record is refused in one line naming the file and the
    field, never drawn from in part (a count or a speed left out would state the run wrongly).

    Raises:
        InputError: naming the file and the first value that is not what infer writes.
    """
    from dermtool.shards import check_record

    try:
        run = check_record(path, read_json(path, "infer record"))
    except InputError as exc:
        raise InputError(f"{str(exc).rstrip('.')}; restore it, or remove it to report without the run's "
                         "facts.") from None
    return run


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _records(out_dir: Path) -> list[Path]:
    """infer.json, or else the shard records infer.shardKofN.json."""
    single = out_dir / "infer.json"
    return [single] if single.is_file() else sorted(out_dir.glob("infer.shard*of*.json"))


def read_predictions(out_dir: Path) -> tuple[list[str], list[dict]]:
    """(header, rows as dicts with float probabilities) of predictions.csv or its shard parts."""
    single = out_dir / "predictions.csv"
    parts = [single] if single.is_file() else sorted(out_dir.glob("predictions.part-*-of-*.csv"))
    if not parts:
        raise InputError(f"{out_dir}: no predictions.csv; is it an output folder of dermtool infer?")
    header: list[str] = []
    rows: list[dict] = []
    for p in parts:
        table = read_csv_rows(p, "predictions CSV")
        header = header or [cell.strip() for cell in table[0]]
        for i, cells in enumerate(table[1:], start=2):
            if not cells:
                continue
            if len(cells) != len(header):
                raise InputError(f"{p}, row {i}: {len(cells)} fields where the header has {len(header)}.")
            check_prediction_row(p, i, cells, header)  # nan would leave the page's JSON unparsable
            row = dict(zip(header, cells))
            for c in CLASS_NAMES:
                if c in row:
                    row[c] = float(row[c])
            rows.append(row)
    if "image_id" not in header:
        raise InputError(f"{parts[0]}: no image_id column; is it a predictions.csv of dermtool infer?")
    return header, rows


def model_summary(model_dir: Path) -> str:
    """The model card's one-line summary: the first sentence of MODEL_CARD.md's first paragraph.

    "" when the folder has no card of its own: the card must be a regular file in the model
    folder, not a link (a downloaded folder's MODEL_CARD.md -> ~/.aws/credentials would put that
    file into the page), and only its first CARD_BYTES are read.
    """
    card = Path(model_dir) / "MODEL_CARD.md"
    data = _read_card(card)
    if data is None:
        return ""
    text = _decode(data, card, "model card")
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if para and not para.startswith(("#", "|", "-", "*", "```", ">")):
            first = re.split(r"(?<=[.!?])\s", para, maxsplit=1)[0]
            return first.replace("`", "")
    return ""


CARD_BYTES = 64 * 1024  # the summary is the card's first paragraph; a card is a few kB


def _read_card(card: Path) -> bytes | None:
    """The first CARD_BYTES of `card` if it is a regular file, not a link (None otherwise), cut
    after its last whole line when longer (so no character is cut in two)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO does not block
    try:
        if card.is_symlink():  # also where O_NOFOLLOW is missing (Windows)
            return None
        fd = os.open(card, flags)  # O_NOFOLLOW: a link put in its place since is refused, not followed
    except (OSError, ValueError):  # none, a link, unreadable, a NUL in the path
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # a folder, a FIFO, a device
            return None
        data = fh.read(CARD_BYTES + 1)
    if len(data) > CARD_BYTES:
        data = data[:CARD_BYTES]
        data = data[:data.rfind(b"\n") + 1]
    return data


def _find_sources(images_dir: Path | None) -> dict[str, Path]:
    from dermtool.data import find_images, image_id_of, unique_ids

    if images_dir is None:
        return {}
    if not Path(images_dir).is_dir():
        raise InputError(f"{images_dir}: images folder not found; pass --images DIR for the thumbnails.")
    # of a.jpg and a.png the first by name, the one infer ran: the thumbnail shows that image
    return {image_id_of(p): p for p in unique_ids(find_images(Path(images_dir)))[0]}


def _thumbnail(row: dict, source: Path, out_dir: Path, files: Path, class_cols: list[str],
               side: int, has_masks: bool) -> tuple[str, str]:
    """Draw one thumbnail; returns ("drawn" | "kept" (already fresh) | "" (none), the problem
    to name, else ""): an image that cannot be decoded, a mask that cannot be read, or a mask
    missing from a run whose model segments (`has_masks`; drawn without a contour)."""
    from dermtool.overlay import class_label, draw_overlay, read_mask_at, thumbnail_size
    from dermtool.preprocess import load_image

    image_id = row["image_id"]
    target = files / f"{image_id}.jpg"
    mask_path = out_dir / f"{image_id}{MASK_SUFFIX}"
    has_mask = mask_path.is_file()
    missing = f"{mask_path}: the run's mask is missing (removed since?); drawn without a contour." if (
        has_masks and not has_mask) else ""
    label, colour = ("", (0, 0, 0))
    if class_cols:
        label, colour = class_label(np.array([row[c] for c in class_cols]), class_cols, _label_index(row, class_cols))
    signature = _signature(source, mask_path if has_mask else None, label, side)
    if _signature_of(target) == signature:
        return "kept", missing  # `infer --resume --report`: only the images redone get new thumbnails
    try:  # the size from the file's header, so any format load_image reads (DICOM too) works
        pixels, _ = load_image(source, resize_to=lambda height, width: thumbnail_size(height, width, side))
    except (OSError, InputError) as exc:  # load_image words a decompression bomb as an InputError
        return "", str(exc) if isinstance(exc, InputError) else unreadable(source, exc)
    try:
        mask = read_mask_at(mask_path, pixels.shape[:2]) if has_mask else None
    except InputError as exc:  # one damaged mask: the others are still drawn, this one is named
        return "", str(exc)
    img = draw_overlay(pixels, mask, label, colour)
    write_atomic(target, lambda tmp: img.save(tmp, format="JPEG", quality=85, comment=signature))
    return "drawn", missing


def _signature(source: Path, mask_path: Path | None, label: str, side: int) -> str:
    """What a thumbnail shows, as the JPEG comment it is saved with: the image (path, size, file
    time), the mask's (or none) and the label drawn on it. A thumbnail is reused only when all
    match, so another images folder, an edited CSV or a mask redone or removed redraws it."""
    import hashlib

    def state(path: Path) -> list:
        st = path.stat()
        return [os.fsencode(path.resolve()).hex(), st.st_size, st.st_mtime_ns]

    what = [state(source), state(mask_path) if mask_path else None, label, side]
    return "dermtool-thumbnail " + hashlib.sha1(json.dumps(what).encode()).hexdigest()


def _signature_of(thumbnail: Path) -> str:
    """The JPEG comment of an earlier thumbnail ("" when there is none or it cannot be read)."""
    from PIL import Image

    if not thumbnail.is_file() or thumbnail.is_symlink():
        return ""
    try:
        with Image.open(thumbnail) as im:
            comment = im.info.get("comment", b"")
    except Exception:  # a damaged or foreign file: drawn again
        return ""
    return comment.decode("ascii", "replace") if isinstance(comment, bytes) else str(comment)


def _payload(rows: list[dict], class_cols: list[str], thumbs: dict, out_dir: Path) -> dict:
    """The page's data: one short list per image, so 10,000 images stay about a megabyte."""
    overlays = _overlays_of_the_run(out_dir, [row["image_id"] for row in rows])
    packed = []
    for row in rows:
        probs = [row[c] for c in class_cols]  # as written in the CSV: rounding would reorder ties
        k = _label_index(row, class_cols) if probs else -1
        packed.append([row["image_id"], k, *probs, thumbs.get(row["image_id"], 0),
                       int(row["image_id"] in overlays)])
    from dermtool.overlay import SHORT_NAMES

    return {"classes": class_cols, "display": [_display(c) for c in class_cols],
            "short": [SHORT_NAMES.get(c, c) for c in class_cols], "rows": packed,
            "files": FILES, "page_size": PAGE_SIZE,
            "no_thumbnail": ["no thumbnail (image not found)", "", "no thumbnail (it could not be drawn: see the notes)"]}


def _overlays_of_the_run(out_dir: Path, ids: list[str]) -> set[str]:
    """The ids whose full-size overlay (ID_overlay.jpg) the run drew: the ones the page links.

    infer without --resume rewrites the files of the images it does and leaves the others, so
    OUT may hold overlays of an earlier run, drawn with another model or threshold; a link to
    one would show another diagnosis beside this run's. The rule, from the run's record (of the
    image's shard, for a sharded run):
    - it must say "overlay": true; with false, or no record or an older one without the field,
      no overlay is linked (a missing link loses nothing: the file is still in OUT);
    - the overlay must not be older than the run's start, which the record gives: it is written
      last, so its time less its "seconds" and "model_load_seconds" is when the run began, and
      nothing this run wrote is older. File times are compared with a file time, never with this
      machine's clock, so a report made later gives the same links;
    - except for an image whose mask is older than that start too: `infer --resume` skipped it
      as done, and its overlay is of the earlier part of the same run (--resume refuses another
      overlay setting), so it is linked.
    Copied without its file times (cp without -p), a folder's times no longer tell runs apart.
    """
    from dermtool.shards import shard_of

    starts: dict[tuple[int, int], float] = {}  # shard (k, n) -> the start of its run
    for path in _records(out_dir):
        match = re.fullmatch(r"infer(?:\.shard([0-9]+)of([0-9]+))?\.json", path.name)
        run = read_record(path)
        times = [run.get("seconds", 0), run.get("model_load_seconds", 0)]
        if match is None or run.get("overlay") is not True or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) for t in times):
            continue
        shard = (int(match[1]), int(match[2])) if match[1] else (1, 1)
        starts[shard] = path.stat().st_mtime - sum(times)
    linked = set()
    for image_id in ids:
        start = next((t for (k, n), t in starts.items() if shard_of(image_id, n) == k), None)
        overlay, mask = out_dir / f"{image_id}_overlay.jpg", out_dir / f"{image_id}{MASK_SUFFIX}"
        if start is None or not overlay.is_file():
            continue
        skipped = mask.is_file() and mask.stat().st_mtime < start
        if skipped or overlay.stat().st_mtime >= start:
            linked.add(image_id)
    return linked


def _label_index(row: dict, class_cols: list[str]) -> int:
    """The class the run decided (its `label` column: a model's melanoma threshold may differ
    from the argmax), or the argmax of the probabilities for a CSV without labels."""
    if row.get("label") in class_cols:
        return class_cols.index(row["label"])
    return int(np.argmax([row[c] for c in class_cols]))


def operating_point(run: dict) -> str:
    """The decision the run's labels follow, as a sentence: its melanoma threshold and where it
    came from (the model's calibration: temperature, target sensitivity), or "" for the argmax."""
    from dermtool.config import load_config

    threshold, temperature = run.get("melanoma_threshold"), run.get("temperature", 1.0)
    if threshold is None and temperature == 1.0:
        return ""
    try:
        model_cfg = load_config(Path(run["model"]))[0] if run.get("model") else None
    except InputError:  # the model folder moved or changed: the run's own record still says what it did
        model_cfg = None
    parts = []
    if threshold is not None:
        given = run.get("melanoma_threshold_source")
        if given is not None:  # the run recorded where its threshold came from
            target = run.get("target_sensitivity")
        else:  # an older record: only the model as it is now can say, and only if it still holds that threshold
            stored = model_cfg is not None and model_cfg.melanoma_threshold == threshold
            given = "model" if stored else ""
            calibration = model_cfg.calibration if stored and isinstance(model_cfg.calibration, dict) else {}
            target = calibration.get("target_sensitivity")
            target = target if _is_number(target) else None  # formatted below: a number or nothing
        source = (" (given with --melanoma-threshold)" if given == "option" else
                  f" (chosen on validation for melanoma sensitivity ≥ {target:g})" if given == "model" and target else
                  " (stored with the model)" if given == "model" else "")
        parts.append(f"melanoma when p ≥ {threshold:.4f}{source}, else the likelier other class")
    else:
        parts.append("class = argmax of the probabilities")
    if temperature != 1.0:
        parts.append(f"probabilities calibrated with temperature {temperature:.3f}")
    return "; ".join(parts)


def _engine(run: dict) -> str:
    """The engine that ran, and the file it ran when that was not the model's own weights."""
    engine, file = run.get("engine") or "", run.get("engine_file") or ""
    if not engine:
        return ""
    return f"{engine} ({Path(file).name})" if file and engine != "keras" else engine


def _display(name: str) -> str:
    from dermtool.overlay import DISPLAY_NAMES

    return DISPLAY_NAMES.get(name, name)


def _facts(run: dict, out_dir: Path, summary: ReportSummary, images_dir: Path | None) -> dict:
    """The run's facts at the top of the page, as short sentences."""
    model = run.get("model", "")
    post = run.get("postprocess") or {}
    if run.get("task") == "cls":  # infer records its settings, but a classifier makes no mask
        post, steps = {}, ["none: the model makes no mask"]
    else:
        steps = [f"threshold {post.get('threshold')}" if post else "unknown (no infer.json)"]
    if post:
        steps.append(f"closing radius {post['closing_radius']}" if post.get("closing_radius") else "no closing")
        steps.append("largest component" if post.get("largest_component") else "all components")
        steps.append("holes filled" if post.get("fill_holes") else "holes kept")
    tta = run.get("tta", 1)
    rate = run.get("images_per_second")
    before = run.get("earlier_sessions", {})  # of the kinds infer writes (read_record)
    earlier_rate = before.get("done", 0) / before["seconds"] if before.get("seconds", 0) > 0 else 0
    speed = (f"{rate:.1f} images/s on {run.get('device', '?')} ({run.get('seconds', 0):.1f} s after a "
             f"{run.get('model_load_seconds', 0):.1f} s model load)") if rate else (
        f"{run.get('shards')} shards, {run.get('seconds', 0):.1f} s in all" if run.get("shards") else
        f"{earlier_rate:.1f} images/s in the sessions before this --resume ({before.get('done', 0)} images)"
        if earlier_rate else "not recorded")
    notes = []
    if summary.missing_images:
        notes.append(f"{len(summary.missing_images)} image(s) not found in {images_dir or 'the images folder'}: "
                     "shown without a thumbnail")
    if summary.failed:
        shown = "; ".join(problem for _, problem in summary.failed[:3])
        notes.append(f"{len(summary.failed)} thumbnail(s) with a problem: {shown}"
                     + ("; ..." if len(summary.failed) > 3 else ""))
    if run.get("interrupted"):
        notes.append("the run was interrupted: only the images finished are listed")
    return {
        "out_name": out_dir.resolve().name, "model_name": Path(model).name or "?", "task": run.get("task", "?"),
        "model_summary": model_summary(Path(model)) if model else "",
        "done": run.get("done", summary.entries), "skipped": run.get("skipped", 0),
        "failed": [Path(f).name for f in run.get("failed", [])], "images": str(images_dir or ""),
        "postprocess": " → ".join(steps) + (f"; test-time augmentation over {tta} views" if tta and tta > 1 else ""),
        "speed": speed, "note": "; ".join(notes), "operating_point": operating_point(run),
        "engine": _engine(run),
    }
