"""Fit a model's decision on validation predictions: its temperature and its melanoma threshold.

`calibrate(model_dir, pairs, sensitivity)` reads predictions CSVs of `dermtool infer` with
their truth CSVs, pools them, and fits

- the temperature T that minimises the negative log-likelihood of the true classes
  (a bounded 1-D search over log T, T in [0.05, 20]; a fit within 2x of either end is refused:
  too few images, or ranked too perfectly for any temperature), then
- the melanoma threshold t that keeps the melanoma sensitivity at or above the target on the
  pooled, temperature-scaled probabilities (`decision.threshold_for_sensitivity` states the rule),

and writes both, with how they were fitted, into MODEL/config.json (and into the config.json of
the LiteRT export the folder carries, MODEL/litert/, so that engine makes the same decision).

Predictions made by a model that already has a temperature are put back to T = 1 first: the
temperature the run applied is read from the infer.json beside the CSV. Calibrating again on
the same images therefore gives the same T and t, whichever model version made the CSVs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dermtool import CLASS_NAMES, __version__, metrics
from dermtool.config import ModelConfig, load_config
from dermtool.decision import MELANOMA, PROB_FLOOR, apply_temperature, decide, describe, threshold_for_sensitivity
from dermtool.errors import InputError

#: Search range of the temperature: far beyond any fitted value (they are near 1 to 3).
TEMPERATURE_RANGE = (0.05, 20.0)
#: fewer validation images than this (or a class absent) is named in a note of the result
FEW_IMAGES = 100
#: How far a row of a predictions CSV may sum from 1 and still count as softmax probabilities:
#: six decimals leave 1.5e-6, but an int8 engine's softmax is quantised in steps of 1/256
#: (the bundled model's mixed-int8 LiteRT export: sums 0.996 to 1.004). Rows are rescaled to 1.
SUM_TOLERANCE = 0.02


@dataclass
class PredictionSet:
    """One validation set: uncalibrated (T = 1) probabilities and the true classes."""

    predictions: Path
    truth: Path
    ids: list  # the truth's image ids, in file order
    probs: np.ndarray  # (N, 3), T = 1
    y_true: np.ndarray  # (N,)
    input_temperature: float = 1.0  # the temperature the infer run had applied (undone here)
    note: str = ""
    records: list = field(default_factory=list)  # the infer records of the run that wrote it


@dataclass
class CalibrationResult:
    temperature: float
    melanoma_threshold: float
    sensitivity_target: float
    sets: list = field(default_factory=list)  # one dict of scores per set, then "pooled"
    written: list = field(default_factory=list)  # config.json files written
    notes: list = field(default_factory=list)

    @property
    def provenance(self) -> dict:
        """The "calibration" section of the model's config.json."""
        return {
            "target_sensitivity": self.sensitivity_target,
            "temperature_rule": "minimum negative log-likelihood of the true classes on the pooled sets, "
                                f"T searched in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}]",
            "threshold_rule": "melanoma when p_melanoma >= t; t in the middle of the gap below the k-th highest "
                              "melanoma probability, k = ceil(target * melanomas), on the pooled sets",
            "sets": self.sets,
            "dermtool_version": __version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def read_set(pred_csv: Path, truth_csv: Path) -> PredictionSet:
    """A predictions CSV with every class column, matched to its truth CSV, put back to T = 1.

    Raises:
        InputError: a class column missing, rows that are not probabilities summing to 1, ids
            of the truth without a prediction, or a bad file (see `io.read_class_csv`).
    """
    from dermtool.score import class_arrays

    pred_csv, truth_csv = Path(pred_csv), Path(truth_csv)
    missing = [c for c in CLASS_NAMES if c not in _header(pred_csv)]
    if missing:
        raise InputError(f"The predictions CSV {pred_csv} lacks the class column(s) {', '.join(missing)}; "
                         "calibration needs every class's probability, as dermtool infer writes them.")
    ids, y_true, probs = class_arrays(pred_csv, truth_csv)
    sums = probs.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > SUM_TOLERANCE)
    if bad.size:
        raise InputError(f"The predictions CSV {pred_csv} has rows whose probabilities sum to {sums[bad[0]]:.4f}, "
                         "not 1; calibration needs the softmax probabilities of dermtool infer.")
    probs = probs / sums[:, None]
    records = run_records(pred_csv)
    temperature, note = run_temperature(pred_csv, records)
    if temperature != 1.0:  # softmax(T0 * log q) undoes q = softmax(log p / T0)
        probs = apply_temperature(probs, 1.0 / temperature)
    return PredictionSet(pred_csv, truth_csv, ids, probs, y_true, temperature, note, [r for _, r in records])


def _header(path: Path) -> list[str]:
    from dermtool.io import read_csv_rows

    rows = read_csv_rows(path, "predictions CSV")
    return [c.strip() for c in rows[0]] if rows else []


def run_records(pred_csv: Path) -> list[tuple[Path, dict]]:
    """The records of the infer run that wrote `pred_csv`, read from beside it: infer.shardKofN.json
    for a part; else infer.json (a predictions CSV copied or renamed in its run's folder is still
    that run's), or after `dermtool merge` the shards' infer.shardKofN.json.

    Raises:
        InputError: a damaged record (guessing would miscalibrate silently).
    """
    from dermtool.io import read_json
    from dermtool.shards import _PART, check_record, record_name

    folder = Path(pred_csv).parent
    part = _PART.fullmatch(Path(pred_csv).name)
    if part:
        paths = [folder / record_name((int(part[1]), int(part[2])))]
    else:
        paths = [folder / "infer.json"] if (folder / "infer.json").is_file() else sorted(folder.glob("infer.shard*of*.json"))
    records = []
    for path in paths:
        records.append((path, check_record(path, read_json(path, "infer record"))))  # as merge and --resume read it
    return records


def run_temperature(pred_csv: Path, records: list[tuple[Path, dict]] | None = None) -> tuple[float, str]:
    """(the temperature the infer run that wrote `pred_csv` applied, a note when it is assumed).

    Read from the run's records (`run_records`). A record without a temperature was written
    before dermtool had one: T = 1.
    """
    from dermtool.decision import check_temperature

    records = run_records(pred_csv) if records is None else records
    values = set()
    for path, record in records:  # a damaged record is refused: guessing T = 1 would miscalibrate silently
        values.add(check_temperature(record.get("temperature", 1.0), f"{path}: temperature"))
    if len(values) > 1:
        raise InputError(f"{Path(pred_csv).parent}: its infer records applied different temperatures "
                         f"({sorted(values)}); run infer again into one folder with one model.")
    if not values:
        return 1.0, (f"{pred_csv}: no infer record (infer.json) beside it, so its probabilities are taken as "
                     "uncalibrated (made by a model with temperature 1)")
    return values.pop(), ""


def run_notes(s: PredictionSet, model_dir: Path, cfg: ModelConfig) -> list[str]:
    """What differs between the run that wrote a set's predictions and the model being calibrated:
    other weights, or classifier settings the model's own infer runs do not use."""
    from dermtool.modelio import model_fingerprint

    notes, weights = [], None
    for record in s.records:
        if record.get("weights_sha1") and weights is None:
            weights = model_fingerprint(model_dir, config=False)
        if record.get("weights_sha1") and record["weights_sha1"] != weights:
            notes.append(f"{s.predictions}: made by {record.get('model')}, whose weights are not {model_dir}'s; "
                         f"the decision is fitted to that model's probabilities")
        if record.get("cls_views") and record["cls_views"] != cfg.cls_views:
            notes.append(f"{s.predictions}: made with --cls-views {record['cls_views']}, while {model_dir} infers "
                         f"with {cfg.cls_views} unless told; infer with --cls-views {record['cls_views']} for this "
                         "decision to hold")
        if isinstance(record.get("tta"), int) and record["tta"] != 1:
            notes.append(f"{s.predictions}: made with --tta {record['tta']}; infer with --tta {record['tta']} for "
                         "this decision to hold")
    return list(dict.fromkeys(notes))  # the shards of one run say it once


def fit_temperature(probs: np.ndarray, y_true: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE minimising the mean NLL of softmax(log(p) / T), rounded to 1e-4."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        return metrics.negative_log_likelihood(apply_temperature(probs, math.exp(log_t)), y_true, PROB_FLOOR)

    low, high = (math.log(v) for v in TEMPERATURE_RANGE)
    found = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-7})
    return round(math.exp(found.x), 4)


def set_scores(probs: np.ndarray, y_true: np.ndarray, temperature: float, threshold: float) -> dict[str, Any]:
    """NLL and ECE before (T = 1) and after the temperature, and melanoma SE/SP at the decision."""
    scaled = apply_temperature(probs, temperature)
    labels = decide(scaled, threshold)
    m = CLASS_NAMES.index(MELANOMA)
    cm = metrics.confusion_matrix(y_true, labels, n_classes=len(CLASS_NAMES))
    mel = metrics.per_class_stats(cm)[m]
    return {
        "images": int(y_true.size), "melanomas": int(np.sum(y_true == m)),
        "nll_before": metrics.negative_log_likelihood(probs, y_true, PROB_FLOOR),
        "nll_after": metrics.negative_log_likelihood(scaled, y_true, PROB_FLOOR),
        "ece_before": metrics.expected_calibration_error(probs, y_true),
        "ece_after": metrics.expected_calibration_error(scaled, y_true),
        "sensitivity": mel["sensitivity"], "specificity": mel["specificity"],
        "bacc": metrics.balanced_accuracy(cm),
    }


def calibrate(model_dir: Path, pairs: list[tuple[Path, Path]], sensitivity: float = 0.85,
              write: bool = True) -> CalibrationResult:
    """Fit the temperature and the melanoma threshold on validation predictions; see the module docstring.

    Args:
        model_dir: the model folder (or export folder) whose config.json receives the decision.
        pairs: (predictions CSV, truth CSV) of each validation set, pooled for the fit.
        sensitivity: the melanoma sensitivity the threshold must reach on the pooled sets.
        write: False only reports what would be written.

    Raises:
        InputError: bad input (see `read_set`), no melanoma in the truth, a model without a
            classifier, or a target outside (0, 1].
    """
    from dermtool.modelio import shown_path

    model_dir = Path(model_dir)
    cfg, _, _ = load_config(model_dir)
    check_not_carried(model_dir)
    if not cfg.has_cls:
        raise InputError(f"{model_dir}: a {cfg.task} model has no classifier to calibrate.")
    if not pairs:
        raise InputError("calibration needs at least one --preds CSV with its --truth CSV.")
    if not 0.0 < sensitivity <= 1.0:
        raise InputError(f"--sensitivity must lie in (0, 1], not {sensitivity}.")
    sets = [read_set(p, t) for p, t in pairs]
    probs = np.concatenate([s.probs for s in sets])
    y_true = np.concatenate([s.y_true for s in sets])
    m = CLASS_NAMES.index(MELANOMA)
    if not np.any(y_true == m):
        raise InputError(f"no melanoma in the truth CSV(s) {', '.join(str(s.truth) for s in sets)}: "
                         "the threshold is chosen for a melanoma sensitivity, so the sets need melanomas.")
    temperature = fit_temperature(probs, y_true)
    if not TEMPERATURE_RANGE[0] * 2 < temperature < TEMPERATURE_RANGE[1] / 2:  # within 2x of an end: no fit
        sources = ", ".join(str(s.truth) for s in sets)
        raise InputError(f"the temperature ran to the edge of its search range ({temperature:g}, range "
                         f"{TEMPERATURE_RANGE[0]:g} to {TEMPERATURE_RANGE[1]:g}) on the {y_true.size} image(s) of {sources}: "
                         "too few, or ranked so perfectly (or so wrongly) that no temperature fits; "
                         "calibrate on a larger validation set of every class.")
    threshold = threshold_for_sensitivity(apply_temperature(probs, temperature)[:, m], y_true == m, sensitivity)
    result = CalibrationResult(temperature, threshold, sensitivity, notes=[s.note for s in sets if s.note])
    for s in sets:
        result.notes += run_notes(s, model_dir, cfg)
    missing = [name for k, name in enumerate(CLASS_NAMES) if not np.any(y_true == k)]
    if y_true.size < FEW_IMAGES or missing:
        lacking = f", with no {' and no '.join(missing)}" if missing else ""
        result.notes.append(f"fitted on {y_true.size} image(s){lacking}: the temperature and threshold are rough; "
                            f"a validation set of {FEW_IMAGES} or more of every class fits them better")
    shared = len([i for s in sets for i in s.ids]) - len({i for s in sets for i in s.ids})
    if shared:
        result.notes.append(f"{shared} image id(s) are in more than one set: they count once per set in the fit")
    for s in sets:
        scores = set_scores(s.probs, s.y_true, temperature, threshold)
        result.sets.append({"predictions": shown_path(s.predictions), "truth": shown_path(s.truth),
                            "input_temperature": s.input_temperature, **scores})
    if len(sets) > 1:
        result.sets.append({"predictions": "pooled", "truth": "pooled",
                            **set_scores(probs, y_true, temperature, threshold)})
    if write:
        result.written, skipped = write_decision(model_dir, temperature, threshold, result.provenance)
        result.notes += skipped
    return result


def check_not_carried(folder: Path) -> None:
    """Refuse to calibrate the export a model folder carries (MODEL/litert) on its own: the model
    and its export would then decide differently, by engine. Calibrating MODEL updates both."""
    from dermtool.modelio import shipped_export

    folder = Path(folder).resolve()
    parent = folder.parent
    if (parent / "config.json").is_file() and shipped_export(parent, folder.name) == folder:
        raise InputError(f"{folder}: is the {folder.name} export that the model folder {parent} carries; calibrate "
                         f"{parent} instead, which writes the same decision into both.")


def write_decision(model_dir: Path, temperature: float, threshold: float, provenance: dict) -> tuple[list, list]:
    """Put the decision into MODEL/config.json and the carried MODEL/litert/config.json.

    Both files change or neither: each new text is written beside its file first, and only when
    both are written are they renamed into place (a full disk leaves the model as it was). The
    carried export runs the same network, so its record of the weights it came from
    (`export.source_sha1`) is moved to the rewritten config.json; an export already stale (other
    weights) is left alone and named. An export folder calibrated on its own also gets its
    `export.decision`, the description for those who run the file without dermtool.

    Returns:
        (files written, notes on what was left alone).
    """
    import os

    from dermtool.io import claim, temp_prefix, write_atomic
    from dermtool.modelio import model_fingerprint, shipped_export

    model_dir = Path(model_dir)
    carried = shipped_export(model_dir, "litert")  # checked before the model's config.json changes
    stale = model_dir / "litert" / "config.json"
    own = _decided_config(model_dir / "config.json", temperature, threshold, provenance)
    texts, notes = {model_dir / "config.json": own}, []
    if carried is not None:
        texts[carried / "config.json"] = _decided_config(
            carried / "config.json", temperature, threshold, provenance,
            source_sha1=model_fingerprint(model_dir, config_text=own))  # the model's once rewritten
    elif stale.is_file():
        notes.append(f"{stale}: not updated, it was exported from another state of {model_dir} (its weights or "
                     "config.json changed since)")
    temps = {path: path.with_name(f"{temp_prefix(path.name)}{os.getpid()}.tmp") for path in texts}
    before = {path: (path.read_bytes(), path.stat().st_mode & 0o7777) for path in texts}
    done = []
    try:
        for path, text in texts.items():
            try:
                claim(temps[path]).write_bytes(text.encode())  # "\n" on every system: the sha1 is of these bytes
                os.chmod(temps[path], before[path][1])  # a private config.json stays private
            except OSError as exc:  # named as the file of the user's model, not the temporary one
                raise type(exc)(exc.errno, exc.strerror, str(path)) from None
        for path in texts:
            try:
                os.replace(temps[path], path)
            except OSError as exc:
                raise type(exc)(exc.errno, exc.strerror, str(path)) from None
            done.append(path)
    except BaseException:
        # the second rename failed (or Ctrl-C between them): the first file gets its old text back,
        # so the model and its carried export never hold two decisions
        for path in done:
            try:
                old, mode = before[path]
                write_atomic(path, lambda tmp: (tmp.write_bytes(old), os.chmod(tmp, mode)))
            except OSError:
                pass
        raise
    finally:
        for tmp in temps.values():
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # a read-only folder: the error above, naming config.json, is the one to tell
                pass
    return list(texts), notes


def _decided_config(path: Path, temperature: float, threshold: float, provenance: dict,
                    source_sha1: str | None = None) -> str:
    """The text of one config.json with the decision; every other key is kept as it was."""
    raw = json.loads(path.read_text())
    from dermtool.score import _plain  # nan (an undefined rate) -> null: config.json stays strict JSON

    raw["model"].update(temperature=temperature, melanoma_threshold=threshold, calibration=_plain(provenance))
    ModelConfig(**raw["model"])  # still a valid model description
    if isinstance(raw.get("export"), dict):  # an export folder, carried or on its own
        raw["export"]["decision"] = describe(temperature, threshold)
    if source_sha1 is not None:
        raw["export"]["source_sha1"] = source_sha1
    return json.dumps(raw, indent=2) + "\n"


def render(result: CalibrationResult, console) -> None:
    """Print the fit: one row per set (and pooled), NLL and ECE before -> after, SE/SP at t."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    title = (f"Calibration: temperature {result.temperature:.4f}, melanoma threshold {result.melanoma_threshold:.4f} "
             f"(target sensitivity {result.sensitivity_target:g} on the pooled sets)")
    table = Table(title=title, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD,
                  caption="NLL, ECE: before → after the temperature; SE, SP: of melanoma, BACC: of the labels, "
                          "at t; mel.: melanomas")
    for column in ("set", "images", "mel.", "NLL", "ECE", "SE", "SP", "BACC"):
        table.add_column(column, justify="left" if column == "set" else "right", no_wrap=True)
    for k, s in enumerate(result.sets, start=1):
        name = "pooled" if s["predictions"] == "pooled" else f"set {k}"
        table.add_row(name, str(s["images"]), str(s["melanomas"]),
                      f"{_fmt(s['nll_before'])}→{_fmt(s['nll_after'])}",
                      f"{_fmt(s['ece_before'])}→{_fmt(s['ece_after'])}",
                      *(_fmt(s[key]) for key in ("sensitivity", "specificity", "bacc")))
    console.print(table)
    for k, s in enumerate(result.sets, start=1):
        if s["predictions"] != "pooled":
            console.print(escape(f"set {k}: {s['predictions']} against {s['truth']}"), highlight=False, soft_wrap=True)


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
