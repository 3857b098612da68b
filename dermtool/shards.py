"""An infer run in shards and put back together: which shard an image belongs to, the check
that two runs used the same settings (shared by `infer --resume` and `merge`), and the merge.

`dermtool infer --shard K/N` (or `--shard auto`: K and N from a SLURM job array or a Kubernetes
Indexed Job, see `shard_from_env`) writes OUT/predictions.part-K-of-N.csv and
OUT/infer.shardKofN.json; `dermtool merge OUT` checks that the N parts are all there, agree, and hold every image id of
the folder (of the run's `--ids` list, when it had one) exactly once and no other, each row as infer wrote it,
then writes OUT/predictions.csv.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from dermtool import CLASS_NAMES
from dermtool.data import find_images, id_key, image_id_of, unique_ids
from dermtool.decision import check_threshold, decide
from dermtool.errors import InputError
from dermtool.io import FORMULA_STARTS, first_few, read_csv_rows, read_json, write_csv_atomic

#: What must not differ between two runs writing one folder (keys of infer.json).
SETTINGS = ("model_sha1", "engine", "engine_sha1", "task", "tta", "postprocess", "probabilities", "overlay",
            "melanoma_threshold", "dicom_seg", "cls_views")
_PART = re.compile(r"predictions\.part-([0-9]+)-of-([0-9]+)\.csv")  # ASCII digits: \d takes any script's
#: the most parts a run may be split into: more parts than images only adds empty ones, and merge
#: looks for every one of them
SHARDS_MAX = 100_000
#: a whole number as the shell and the schedulers write it: int() also takes "1_0", " 7" and
#: digits of other scripts ("٣"), which no scheduler writes, so they are refused, not read
_WHOLE = re.compile(r"[0-9]+")
#: how much of a refused value a message repeats: an environment variable can be megabytes long
_SHOWN = 40
#: how far from 1 the class probabilities of a row infer wrote may sum: each is written rounded
#: to six decimals (at most 5e-7 off) from float32 arithmetic (about 1e-7 off)
SUM_TOLERANCE = 1e-5
#: the same for a LiteRT run at temperature 1: an int8 or mixed-int8 export computes its softmax in
#: int8, so each probability is a multiple of 1/256 (the bundled model's export sums to 1 + 1/256
#: on some inputs), and nothing renormalises them afterwards (a temperature does)
QUANTISED_SUM_TOLERANCE = 4 / 256
#: how far two six-decimal probabilities (or p_melanoma and the threshold) may lie apart and still
#: have been the other way round before rounding: a label is checked with this much leeway
ROUNDING = 1e-6


def shard_of(image_id: str, n: int) -> int:
    """The shard (1..n) of an image id: a stable hash of the id, never its position in the folder,
    so adding or removing other images between shard runs moves no image to another shard."""
    # surrogateescape: a file name that is not UTF-8 (refused by infer, named by its shard) hashes
    # as its own bytes; every UTF-8 id hashes as before
    digest = hashlib.sha1(image_id.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def parse_shard(value: str) -> tuple[int, int]:
    """(K, N) of `--shard K/N`: K and N whole numbers in ASCII digits, 1 <= K <= N <= SHARDS_MAX.

    Raises:
        InputError: naming the value (its first characters, when long) and what is wrong.
    """
    k, _, n = value.partition("/")
    if not (_WHOLE.fullmatch(k) and _WHOLE.fullmatch(n)):
        raise InputError(f"--shard must look like K/N, two whole numbers in digits 0-9 (e.g. 2/4), "
                         f"not {_shown(value)}.")
    k, n = _whole(k), _whole(n)
    if not 1 <= n <= SHARDS_MAX:
        bound = "1 or more" if n < 1 else f"at most {SHARDS_MAX}"
        raise InputError(f"--shard {_shown(value, quote=False)}: N (the number of parts) must be {bound}.")
    if not 1 <= k <= n:
        raise InputError(f"--shard {_shown(value, quote=False)}: K must be between 1 and N.")
    return k, n


def shard_from_env(env: Mapping[str, str]) -> tuple[tuple[int, int], str]:
    """The shard (K, N) of this task of a scheduler's array, and where it came from.

    SLURM (`sbatch --array=A-B[:S]`): K = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / step + 1,
    N = SLURM_ARRAY_TASK_COUNT, so an array 0-3 and an array 1-4 both make parts 1..4.
    Kubernetes (an Indexed Job): K = JOB_COMPLETION_INDEX + 1, N = DERMTOOL_SHARDS, which the
    Job must set to its `completions` (Kubernetes does not export the count).
    Both set is refused: either reading could be the wrong part, and the parts would then not
    add up to the folder; the one who set the environment knows which it is.

    Raises:
        InputError: neither or both are set, a variable SLURM sets with every array task is not
            set, a value is not a whole number, N is over SHARDS_MAX, or the task lies outside
            1..N (an array of listed ids, such as --array=1,5,9, has no K of N).
    """
    slurm, kubernetes = env.get("SLURM_ARRAY_TASK_ID"), env.get("JOB_COMPLETION_INDEX")
    if slurm and kubernetes:
        raise InputError(f"--shard auto: both a SLURM array (SLURM_ARRAY_TASK_ID={_shown(slurm, quote=False)}) and a "
                         f"Kubernetes Indexed Job (JOB_COMPLETION_INDEX={_shown(kubernetes, quote=False)}) are set, so "
                         "which part this is is ambiguous; unset the variables of the one this run is not, or give "
                         "--shard K/N.")
    if slurm:
        for name in ("SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
            if not env.get(name):
                raise InputError(f"--shard auto: SLURM_ARRAY_TASK_ID is set but {name} is not; SLURM sets both "
                                 "in every task of a job array (sbatch --array=A-B), so this is not one: give "
                                 "--shard K/N.")
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")
        task, low, n = (_env_int(env, name) for name in names)
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if env.get("SLURM_ARRAY_TASK_STEP") else 1
        on_step = step >= 1 and (task - low) % step == 0
        k = (task - low) // step + 1 if on_step else 0  # an id off the array's steps: refused below
        source = ", ".join(f"{name}={_shown(env[name], quote=False)}" for name in names)
        count = "SLURM_ARRAY_TASK_COUNT"
    elif kubernetes:
        if not env.get("DERMTOOL_SHARDS"):
            raise InputError("--shard auto: JOB_COMPLETION_INDEX is set but DERMTOOL_SHARDS is not; set it in the "
                             "Job's env to its completions (Kubernetes does not export the count).")
        index, n = _env_int(env, "JOB_COMPLETION_INDEX"), _env_int(env, "DERMTOOL_SHARDS")
        source = (f"JOB_COMPLETION_INDEX={_shown(env['JOB_COMPLETION_INDEX'], quote=False)} of "
                  f"DERMTOOL_SHARDS={_shown(env['DERMTOOL_SHARDS'], quote=False)}")
        k, count = index + 1, "DERMTOOL_SHARDS"
    else:
        raise InputError("--shard auto: no scheduler array found (neither SLURM_ARRAY_TASK_ID nor "
                         "JOB_COMPLETION_INDEX is set); give --shard K/N.")
    if n > SHARDS_MAX:
        raise InputError(f"--shard auto: {count}={_shown(env[count], quote=False)} is more parts than the "
                         f"{SHARDS_MAX} a run may be split into.")
    if not 1 <= k <= n:
        raise InputError(f"--shard auto: {source} is not part 1..{n} of a range of tasks; run the array as a "
                         "range (sbatch --array=0-3, a Job with completionMode: Indexed) or give --shard K/N.")
    return (k, n), source


def _shown(value: str, quote: bool = True) -> str:
    """`value` as a message repeats it: its first _SHOWN characters, and its length when cut."""
    cut = value if len(value) <= _SHOWN else value[:_SHOWN]
    text = repr(cut) if quote else cut
    return text if cut == value else f"{text}... ({len(value)} characters)"


def _whole(digits: str) -> int:
    # any number past SHARDS_MAX is refused as such; int() of 5,000 digits would raise instead
    return int(digits) if len(digits.lstrip("0")) <= 12 else 10 ** 12


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    if not _WHOLE.fullmatch(value):
        raise InputError(f"--shard auto: {name}={_shown(value)} is not a whole number (digits 0-9).")
    if len(value.lstrip("0")) > 12:  # a task id and its array's first one would both be cut alike
        raise InputError(f"--shard auto: {name}={_shown(value, quote=False)} is larger than any job array's.")
    return int(value)


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
    ids: int | None = None  # the run's --ids list, this many ids, every one checked; None: no list
    stale_record: bool = False  # an earlier whole run's infer.json was removed: it described another CSV


def merge(out_dir: Path, images_dir: Path | None = None) -> MergeResult:
    """Join OUT's predictions.part-K-of-N.csv into OUT/predictions.csv (rows sorted by id).

    Args:
        out_dir: the folder the shards wrote to.
        images_dir: the images every id must come from; default: the folder the shards'
            infer records name (skipped when it no longer exists).

    Raises:
        InputError: no parts, parts of different N, a part missing, parts from different models,
            settings or --ids lists, a damaged record (a missing one is returned in `unchecked`),
            a part that is not readable text, different headers, a row infer would not have
            written (see `check_prediction_row`), an id in two rows, an image of the folder (of
            the --ids list, if the shards had one) that no part holds (failed images excepted:
            they are returned in `failed`), or a row of an image that is not there.
    """
    out_dir = Path(out_dir)
    parts = _find_parts(out_dir)
    n = len(parts)
    records, unchecked = _read_records(out_dir, n)
    # a shard without its record is checked as far as a row tells (see check_prediction_row)
    header, rows, source = _read_parts(parts, {k: records.get(out_dir / record_name((k, n)), {}) for k in parts})
    result = MergeResult(parts=n, rows=len(rows), unchecked=unchecked)
    folders = {r.get("images") for r in records.values()} - {None}
    if images_dir is None and len(folders) > 1:
        raise InputError(f"{out_dir}: the shards' records name {len(folders)} images folders ({', '.join(sorted(folders))}); "
                         "parts of different folders would merge into one CSV without a word. If they are one folder "
                         "seen from different machines, give it with --images to check every image has a row.")
    images_dir = Path(images_dir) if images_dir else (Path(folders.pop()) if len(folders) == 1 else None)
    listed = next((r["ids"] for r in records.values() if r.get("ids") is not None), None)
    if images_dir is not None and images_dir.is_dir():
        result.images = images_dir
    if result.images is not None or listed is not None:
        result.failed = _check_complete(result.images, listed, rows, source, records, out_dir, n)
        result.ids = None if listed is None else len(listed)
    write_csv_atomic(out_dir / predictions_name((1, 1)), header, [rows[i] for i in sorted(rows)])
    # an infer.json beside the parts is a whole run's, of the predictions.csv just replaced: left, it
    # would be read as this CSV's record (report's model, calibrate's temperature) instead of the shards'
    whole = out_dir / record_name((1, 1))
    if whole.is_file() or whole.is_symlink():  # a link goes, never what it points to
        whole.unlink()
        result.stale_record = True
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
            records[path] = _checked_record(path, read_json(path, "shard record"))
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
    _check_same_ids(records, out_dir)
    return records, missing


#: the kinds of value each key of an infer record holds, as infer writes them (a key an older
#: dermtool did not write may be absent)
_RECORD_KINDS = {
    **{key: "text" for key in ("model", "engine", "engine_file", "model_sha1", "weights_sha1", "engine_sha1", "task",
                               "images",
                               "shard", "cls_views", "device", "melanoma_threshold_source")},
    **{key: "flag" for key in ("probabilities", "overlay", "dicom_seg", "sources_kept", "running", "interrupted")},
    **{key: "count" for key in ("tta", "done", "skipped")},
    **{key: "seconds" for key in ("seconds", "model_load_seconds", "images_per_second")},
    "failed": "texts", "duplicates": "texts", "postprocess": "object", "earlier_sessions": "object",
}


def check_record(path: Path, record, what: str = "infer record") -> dict:
    """An infer record (infer.json, a shard's infer.shardKofN.json) whose values are of the kinds
    infer writes, or InputError naming the file and the first key that is not: an edited or
    damaged record is refused in one line here, not met as a TypeError in merge, --resume or
    the report. Also the melanoma threshold in (0, 1) or null and a positive temperature."""
    import math

    if not isinstance(record, dict):
        raise InputError(f"{path}: the {what} is not a JSON object.")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    fits = {"text": lambda v: v is None or isinstance(v, str), "flag": lambda v: isinstance(v, bool),
            "count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "seconds": lambda v: number(v) and v >= 0, "object": lambda v: isinstance(v, dict),
            "texts": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v)}
    for key, kind in _RECORD_KINDS.items():
        if key in record and not fits[kind](record[key]):  # (a text may be null: no threshold, no source)
            raise InputError(f"{path}: {key} is {str(record[key])[:40]!r}, not what infer writes there; the {what} "
                             "was edited or damaged.")
    ids = record.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise InputError(f"{path}: its ids are not a list of image ids (null or [\"ISIC_0000000\", ...]); the {what} "
                         "was edited or damaged.")
    for key, value in record.get("earlier_sessions", {}).items():
        if key in ("done", "seconds") and not (number(value) and value >= 0):
            raise InputError(f"{path}: earlier_sessions.{key} is {str(value)[:40]!r}, not a count; the {what} was "
                             "edited or damaged.")
    threshold = record.get("melanoma_threshold")
    if threshold is not None:  # a number, as infer writes it: check_threshold would read "0.5" too
        if not number(threshold):
            raise InputError(f"{path}: melanoma_threshold must be a number, not {str(threshold)[:40]!r}; the {what} "
                             "was edited or damaged.")
        check_threshold(threshold, f"{path}: melanoma_threshold")
    target = record.get("target_sensitivity")
    if target is not None and not (number(target) and 0 < target <= 1):
        raise InputError(f"{path}: target_sensitivity is {str(target)[:40]!r}, not a sensitivity in (0, 1]; the "
                         f"{what} was edited or damaged.")
    temperature = record.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise InputError(f"{path}: temperature must be a positive number, not {str(temperature)[:40]!r}.")
    return record


def _checked_record(path: Path, record) -> dict:
    """A shard record as infer writes it (`check_record`)."""
    return check_record(path, record, "shard record")


def _check_same_ids(records: dict[Path, dict], out_dir: Path) -> None:
    """The shards ran on one --ids list, or all without one: else their parts are of two
    selections, and no check could say which images the merged CSV should hold. A record of a
    dermtool that did not write `ids` is not compared."""
    known = [(path, r["ids"]) for path, r in records.items() if "ids" in r]
    for path, ids in known:
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise InputError(f"{path}: its ids are not a list of image ids (null or [\"ISIC_0000000\", ...]); the "
                             f"shard record was edited or damaged: rerun that shard whole (without --resume) into "
                             f"{out_dir}, then merge again.")
    if not known:
        return
    first, ids = known[0]

    def keys(listed):  # one id in either Unicode form, as infer --ids matches them
        return None if listed is None else [id_key(i) for i in listed]

    for path, other in known[1:]:
        if keys(other) != keys(ids):
            raise InputError(f"{path}: this shard ran on {_selection(other)}, {first.name} on {_selection(ids)}; "
                             f"rerun the shards with one --ids list (or none) into a fresh --out, then merge again.")


def _selection(ids: list | None) -> str:
    if ids is None:
        return "every image of the folder (no --ids)"
    digest = hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()[:10]  # tells two lists of one length apart
    return f"an --ids list of {len(ids)} id(s) ({first_few(ids)}; sha1 {digest})"


def _read_parts(parts: dict[int, Path], runs: dict[int, dict]) -> tuple[list[str], dict[str, list[str]], dict]:
    """The common header, the rows by id and the part of each id; an id in two rows (or two
    parts) is refused, and so is a row its shard's record `runs[k]` says infer did not write."""
    header, rows, source = None, {}, {}
    for k, path in parts.items():
        lines = read_csv_rows(path, "predictions part", empty_ok=True)
        if not lines or lines[0][:1] != ["image_id"]:
            raise InputError(f"{path}: not a predictions CSV (no image_id header).")
        classes = lines[0][1:-1]
        if lines[0] != ["image_id"] and not (lines[0][-1:] == ["label"] and classes and len(set(classes)) == len(classes)
                                             and set(classes) <= set(CLASS_NAMES)):
            raise InputError(f"{path}: its columns {','.join(lines[0])[:120]} are not the ones infer writes "
                             f"(image_id, {', '.join(CLASS_NAMES)}, label); the file was edited: rerun that shard "
                             "into a fresh --out.")
        if header is None:
            header = lines[0]
        elif lines[0] != header:
            raise InputError(f"{path}: its columns {','.join(lines[0])} differ from the other parts' "
                             f"{','.join(header)}; the shards ran different models.")
        for line, row in enumerate(lines[1:], start=2):
            if len(row) != len(header):
                raise InputError(f"{path}: the row of {row[0] if row else '(empty)'} has {len(row)} fields, "
                                 f"not {len(header)}; rerun this shard with --resume.")
            check_prediction_row(path, line, row, header, runs[k])
            if row[0] in rows:
                also = "twice" if source[row[0]] == path else f"in {source[row[0]]} too"
                raise InputError(f"{path}: image id {row[0]} is {also}; every id must be in exactly one "
                                 "part: remove the extra row, or rerun the shards into a fresh --out.")
            rows[row[0]], source[row[0]] = row, path
    return header, rows, source


def check_prediction_row(path: Path, line: int, row: list[str], header: list[str], run: dict | None = None) -> None:
    """A row as dermtool infer writes it, or InputError naming the file and row: an id that does
    not start a spreadsheet formula, probabilities in [0, 1] (nan fails), a label that is a class
    name. Merge and infer --resume copy rows into the CSV they write, so an edited or damaged
    part is refused rather than passed on.

    With `run`, the infer record of the run that wrote the row ({} when it is missing), also:
    the probabilities sum to 1 (see SUM_TOLERANCE), and the label is the decision
    (`decision.decide`) at the run's melanoma threshold, unless the record does not say it."""
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
    classes = [name for name in header if name in CLASS_NAMES]
    if run is None or not classes:
        return
    probs = np.array([float(row[header.index(name)]) for name in classes])
    # a temperature renormalises in float64; only a LiteRT run left as it is keeps int8's steps
    quantised = run.get("engine", "litert") == "litert" and run.get("temperature", 1.0) == 1.0
    tolerance = QUANTISED_SUM_TOLERANCE if quantised else SUM_TOLERANCE
    if abs(probs.sum() - 1.0) > tolerance:
        raise InputError(f"{path}: row {line} ({row[0]}) has probabilities that sum to {probs.sum():.6f}, not 1 "
                         f"(infer writes them summing to 1 within {tolerance:.2g}); {fix}")
    if "label" in header and "melanoma_threshold" in run:
        _check_label(path, line, row, header, classes, probs, run["melanoma_threshold"], fix)


def _check_label(path: Path, line: int, row: list[str], header: list[str], classes: list[str], probs: np.ndarray,
                 threshold: float | None, fix: str) -> None:
    """The row's label is `decide`'s at the run's threshold, on its probabilities as written or
    on any values they may have been before the six-decimal rounding (ROUNDING either way)."""
    label = row[header.index("label")]
    if label not in classes or threshold is not None and "melanoma" not in classes:
        return  # not a CSV of infer's: nothing to decide with
    nudged = probs - ROUNDING
    nudged[classes.index(label)] += 2 * ROUNDING  # every value rounded in the label's favour
    if classes[int(decide(nudged[None], threshold, classes)[0])] == label:
        return
    decided = classes[int(decide(probs[None], threshold, classes)[0])]
    rule = ("the argmax: the run had no melanoma threshold" if threshold is None
            else f"melanoma from p = {threshold:.6g}, the run's melanoma threshold")
    raise InputError(f"{path}: row {line} ({row[0]}) has the label {label}, but its probabilities make it {decided} "
                     f"({rule}); {fix}")


def _check_complete(images_dir: Path | None, listed: list | None, rows: dict, source: dict, records: dict,
                    out_dir: Path, n: int) -> list[str]:
    """Every image id the shards were to do has a row and no other id has: the ids of the folder
    (`images_dir`), of the run's --ids list (`listed`), or of both when both are known. Returns
    the files that failed in their shard (they have no row)."""
    # compared by id_key: an --ids list in the other Unicode form names the same images, as infer
    # matched them; the rows are named by their files' own ids
    failed = sorted({f for r in records.values() for f in r.get("failed", [])})
    excused = {id_key(image_id_of(Path(f))) for f in failed}
    row_of = {id_key(i): i for i in rows}
    wanted = None if listed is None else {id_key(i) for i in listed}
    # id_key -> the id as infer hashed it to choose its shard: the file's own, else the list's
    own = {id_key(i): i for i in listed or []}
    if images_dir is not None:
        kept, _ = unique_ids(find_images(images_dir))
        own = {id_key(image_id_of(p)): image_id_of(p) for p in kept}
        in_folder = set(own)
        extra = sorted(row_of[k] for k in set(row_of) - in_folder)
        if extra:
            raise InputError(f"{source[extra[0]]}: {len(extra)} row(s) are of images not in {images_dir} "
                             f"({first_few(extra)}): removed since the shards ran, or rows added to the part; remove "
                             f"those rows, or rerun the shards into a fresh --out, then merge again.")
        wanted = in_folder if wanted is None else wanted & in_folder
    extra = sorted(row_of[k] for k in set(row_of) - wanted)
    if extra:  # in the folder, but not on the run's list
        raise InputError(f"{source[extra[0]]}: {len(extra)} row(s) are of images not on the shards' --ids list "
                         f"({first_few(extra)}); remove those rows, or rerun the shards into a fresh --out, then merge "
                         "again.")
    missing = sorted(own.get(k, k) for k in wanted - set(row_of) - excused)
    if missing:
        where = images_dir if images_dir is not None else out_dir
        also = " --ids LIST (the shards' id list)" if listed is not None else ""
        rerun = " and ".join(f"--shard {k}/{n} --resume" for k in sorted({shard_of(i, n) for i in missing}))
        raise InputError(f"{where}: {len(missing)} image(s) are in no part ({first_few(missing)}): added "
                         f"after their shard ran, or the shard was cut short; run dermtool infer "
                         f"{images_dir or 'IMAGES'} --out {out_dir}{also} with {rerun}, then merge again.")
    return failed
