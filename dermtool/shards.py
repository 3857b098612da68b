"""An infer run in shards and put back together: which shard an image belongs to, the check
that two runs used the same settings (shared by `infer --resume` and `merge`), and the merge.

`dermtool infer --shard K/N` (or `--shard auto`: K and N from a SLURM job array or a Kubernetes
Indexed Job, see `shard_from_env`) writes OUT/predictions.part-K-of-N.csv and
OUT/infer.shardKofN.json; `dermtool merge OUT` checks that the N parts are all there, agree, and hold every image id of
the folder exactly once, then writes OUT/predictions.csv.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from dermtool import CLASS_NAMES
from dermtool.data import find_images, image_id_of, unique_ids
from dermtool.errors import InputError
from dermtool.io import FORMULA_STARTS, first_few, read_csv_rows, read_json, write_csv_atomic

#: What must not differ between two runs writing one folder (keys of infer.json).
SETTINGS = ("model_sha1", "engine", "task", "tta", "postprocess", "probabilities", "overlay",
            "melanoma_threshold", "dicom_seg", "cls_views")
_PART = re.compile(r"predictions\.part-(\d+)-of-(\d+)\.csv")


def shard_of(image_id: str, n: int) -> int:
    """The shard (1..n) of an image id: a stable hash of the id, never its position in the folder,
    so adding or removing other images between shard runs moves no image to another shard."""
    digest = hashlib.sha1(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def shard_from_env(env: Mapping[str, str]) -> tuple[tuple[int, int], str]:
    """The shard (K, N) of this task of a scheduler's array, and where it came from.

    SLURM (`sbatch --array=A-B[:S]`): K = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / step + 1,
    N = SLURM_ARRAY_TASK_COUNT, so an array 0-3 and an array 1-4 both make parts 1..4.
    Kubernetes (an Indexed Job): K = JOB_COMPLETION_INDEX + 1, N = DERMTOOL_SHARDS, which the
    Job must set to its `completions` (Kubernetes does not export the count).

    Raises:
        InputError: neither is set, a value is not a whole number, or the task lies outside
            1..N (an array of listed ids, such as --array=1,5,9, has no K of N).
    """
    if env.get("SLURM_ARRAY_TASK_ID"):
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")
        task, low, n = (_env_int(env, name) for name in names)
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if env.get("SLURM_ARRAY_TASK_STEP") else 1
        on_step = step >= 1 and (task - low) % step == 0
        k = (task - low) // step + 1 if on_step else 0  # an id off the array's steps: refused below
        source = f"SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_MIN={low}, SLURM_ARRAY_TASK_COUNT={n}"
    elif env.get("JOB_COMPLETION_INDEX"):
        if not env.get("DERMTOOL_SHARDS"):
            raise InputError("--shard auto: JOB_COMPLETION_INDEX is set but DERMTOOL_SHARDS is not; set it in the "
                             "Job's env to its completions (Kubernetes does not export the count).")
        index, n = _env_int(env, "JOB_COMPLETION_INDEX"), _env_int(env, "DERMTOOL_SHARDS")
        k, source = index + 1, f"JOB_COMPLETION_INDEX={index} of DERMTOOL_SHARDS={n}"
    else:
        raise InputError("--shard auto: no scheduler array found (neither SLURM_ARRAY_TASK_ID nor "
                         "JOB_COMPLETION_INDEX is set); give --shard K/N.")
    if not 1 <= k <= n:
        raise InputError(f"--shard auto: {source} is not part 1..{n} of a range of tasks; run the array as a "
                         "range (sbatch --array=0-3, a Job with completionMode: Indexed) or give --shard K/N.")
    return (k, n), source


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, ""))
    except ValueError:
        raise InputError(f"--shard auto: {name}={env.get(name, '')!r} is not a whole number.") from None


def predictions_name(shard: tuple[int, int]) -> str:
    """predictions.csv, or predictions.part-K-of-N.csv for a shard (`dermtool merge` joins them)."""
    return "predictions.csv" if shard == (1, 1) else f"predictions.part-{shard[0]}-of-{shard[1]}.csv"


def record_name(shard: tuple[int, int]) -> str:
    """infer.json, or infer.shardKofN.json for a shard: the run's settings and counts."""
    return "infer.json" if shard == (1, 1) else f"infer.shard{shard[0]}of{shard[1]}.json"


def differing_settings(earlier: dict, now: dict) -> list[str]:
    """The settings (see SETTINGS) in which two infer.json records differ, each worded as
    "closing_radius 3 in the run, 5 now"; a setting an older record lacks is not compared."""
    diffs = []
    for key in SETTINGS:
        if key not in earlier or earlier[key] == now.get(key):
            continue
        if key == "model_sha1":
            diffs.append(f"model {earlier.get('model')} (sha1 {earlier[key][:10]}) in the run, "
                         f"{now.get('model')} (sha1 {now[key][:10]}) now")
        elif isinstance(earlier[key], dict):
            diffs += [f"{k} {v} in the run, {now[key].get(k)} now"
                      for k, v in earlier[key].items() if now[key].get(k) != v]
        else:
            diffs.append(f"{key} {earlier[key]} in the run, {now.get(key)} now")
    return diffs


@dataclass
class MergeResult:
    parts: int = 0
    rows: int = 0
    failed: list = field(default_factory=list)  # files that failed in their shard: no row
    images: Path | None = None  # the folder every id was checked against; None: not checked
    unchecked: list = field(default_factory=list)  # shard records missing: their settings were not compared


def merge(out_dir: Path, images_dir: Path | None = None) -> MergeResult:
    """Join OUT's predictions.part-K-of-N.csv into OUT/predictions.csv (rows sorted by id).

    Args:
        out_dir: the folder the shards wrote to.
        images_dir: the images every id must come from; default: the folder the shards'
            infer records name (skipped when it no longer exists).

    Raises:
        InputError: no parts, parts of different N, a part missing, parts from different models
            or settings, a damaged record (a missing one is returned in `unchecked`), a part
            that is not readable text, different headers, an id in two rows, or an image of the folder that
            no part holds (failed images excepted: they are returned in `failed`).
    """
    out_dir = Path(out_dir)
    parts = _find_parts(out_dir)
    n = len(parts)
    records, unchecked = _read_records(out_dir, n)
    header, rows = _read_parts(parts)
    result = MergeResult(parts=n, rows=len(rows), unchecked=unchecked)
    folders = {r.get("images") for r in records.values()} - {None}
    if images_dir is None and len(folders) > 1:
        raise InputError(f"{out_dir}: the shards' records name {len(folders)} images folders ({', '.join(sorted(folders))}); "
                         "parts of different folders would merge into one CSV without a word. If they are one folder "
                         "seen from different machines, give it with --images to check every image has a row.")
    images_dir = Path(images_dir) if images_dir else (Path(folders.pop()) if len(folders) == 1 else None)
    if images_dir is not None and images_dir.is_dir():
        result.failed = _check_complete(images_dir, rows, records, out_dir, n)
        result.images = images_dir
    write_csv_atomic(out_dir / predictions_name((1, 1)), header, [rows[i] for i in sorted(rows)])
    return result


def _find_parts(out_dir: Path) -> dict[int, Path]:
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file; give the --out folder of the shards." if out_dir.exists()
                         else f"{out_dir}: output folder not found.")
    found = {}
    for path in out_dir.iterdir():
        match = _PART.fullmatch(path.name)
        if match:
            found.setdefault(int(match[2]), {})[int(match[1])] = path
    if not found:
        raise InputError(f"{out_dir}: no predictions.part-K-of-N.csv to merge; run dermtool infer --shard K/N first.")
    if len(found) > 1:
        raise InputError(f"{out_dir}: holds parts of {' and of '.join(map(str, sorted(found)))} shards; "
                         "remove the parts of the other split and merge again.")
    (n, parts), = found.items()
    beyond = sorted(k for k in parts if not 1 <= k <= n)
    if beyond:
        raise InputError(f"{parts[beyond[0]]}: part {beyond[0]} of {n} does not exist (parts run 1 to {n}); "
                         "remove it and merge again.")
    for k in range(1, n + 1):
        if k not in parts:
            raise InputError(f"{out_dir / predictions_name((k, n))}: part {k} of {n} is missing; run "
                             f"dermtool infer IMAGES --out {out_dir} --shard {k}/{n}, then merge again.")
    return dict(sorted(parts.items()))


def _read_records(out_dir: Path, n: int) -> tuple[dict[Path, dict], list[Path]]:
    """The shards' infer records, checked to agree on the model and the settings, and the
    records that are missing (their shards' settings cannot be compared: the caller says so).

    A record that is there but damaged is refused: merging without its check would be silent.
    """
    records, missing = {}, []
    for k in range(1, n + 1):
        path = out_dir / record_name((k, n))
        if not path.exists():
            missing.append(path)  # a record is a check, not the data: merge, but say so
            continue
        try:
            records[path] = read_json(path, "shard record")
        except InputError as exc:
            raise InputError(f"{str(exc).rstrip('.')}; so this shard's model and settings cannot be checked: "
                             f"rerun that shard whole (dermtool infer IMAGES --out {out_dir} --shard {k}/{n}, without --resume), "
                             "then merge again.") from None
    first = next(iter(records), None)
    for path, record in records.items():
        diffs = differing_settings(records[first], record)
        if diffs:
            raise InputError(f"{path}: this shard ran with other settings than {first.name}, "
                             f"{'; '.join(diffs).replace('in the run', 'there')}; rerun it with the same ones.")
    return records, missing


def _read_parts(parts: dict[int, Path]) -> tuple[list[str], dict[str, list[str]]]:
    """The common header and the rows by id; an id in two rows (or two parts) is refused."""
    header, rows, source = None, {}, {}
    for path in parts.values():
        lines = read_csv_rows(path, "predictions part", empty_ok=True)
        if not lines or lines[0][:1] != ["image_id"]:
            raise InputError(f"{path}: not a predictions CSV (no image_id header).")
        if header is None:
            header = lines[0]
        elif lines[0] != header:
            raise InputError(f"{path}: its columns {','.join(lines[0])} differ from the other parts' "
                             f"{','.join(header)}; the shards ran different models.")
        for line, row in enumerate(lines[1:], start=2):
            if len(row) != len(header):
                raise InputError(f"{path}: the row of {row[0] if row else '(empty)'} has {len(row)} fields, "
                                 f"not {len(header)}; rerun this shard with --resume.")
            check_prediction_row(path, line, row, header)
            if row[0] in rows:
                also = "twice" if source[row[0]] == path else f"in {source[row[0]]} too"
                raise InputError(f"{path}: image id {row[0]} is {also}; every id must be in exactly one "
                                 "part: remove the extra row, or rerun the shards into a fresh --out.")
            rows[row[0]], source[row[0]] = row, path
    return header, rows


def check_prediction_row(path: Path, line: int, row: list[str], header: list[str]) -> None:
    """A row as dermtool infer writes it, or InputError naming the file and row: an id that does
    not start a spreadsheet formula, probabilities in [0, 1] (nan fails), a label that is a class
    name. Merge and infer --resume copy rows into the CSV they write, so an edited or damaged
    part is refused rather than passed on."""
    fix = "the file was edited or damaged: rerun that run or shard into a fresh --out."
    if row[0].startswith(FORMULA_STARTS):
        raise InputError(f"{path}: row {line} has the image id {row[0][:40]!r}, which a spreadsheet would run as a "
                         f"formula; {fix}")
    for i, name in enumerate(header):
        if name in CLASS_NAMES:
            try:
                ok = 0.0 <= float(row[i]) <= 1.0
            except ValueError:
                ok = False
            if not ok:
                raise InputError(f"{path}: row {line} ({row[0]}) has {name} = {row[i]!r}, not a probability in [0, 1]; "
                                 f"{fix}")
        elif name == "label" and row[i] not in CLASS_NAMES:
            raise InputError(f"{path}: row {line} ({row[0]}) has the label {row[i][:40]!r}, not one of "
                             f"{', '.join(CLASS_NAMES)}; {fix}")


def _check_complete(images_dir: Path, rows: dict, records: dict, out_dir: Path, n: int) -> list[str]:
    """Every image id of the folder has a row; returns the files that failed in their shard."""
    failed = sorted({f for r in records.values() for f in r.get("failed", [])})
    excused = {image_id_of(Path(f)) for f in failed}
    kept, _ = unique_ids(find_images(images_dir))
    missing = [image_id_of(p) for p in kept if image_id_of(p) not in rows and image_id_of(p) not in excused]
    if missing:
        rerun = " and ".join(f"--shard {k}/{n} --resume" for k in sorted({shard_of(i, n) for i in missing}))
        raise InputError(f"{images_dir}: {len(missing)} image(s) are in no part ({first_few(missing)}): added "
                         f"after their shard ran, or the shard was cut short; run dermtool infer {images_dir} --out {out_dir} with {rerun}, "
                         "then merge again.")
    return failed
