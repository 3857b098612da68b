"""Per-epoch checkpoints of a training run, each written as one unit, so a Ctrl-C never mixes epochs.

    RUN/state.json                  the commit: the last complete epoch and its checkpoint folder
    RUN/checkpoints/epoch-NNN/      last.weights.h5, best.weights.h5, optimizer.npz, history.csv
    RUN/last.weights.h5, best.weights.h5, history.csv
                                    links to the committed checkpoint's files (what `infer --model
                                    RUN` and people read)
    RUN/epochs/epoch-NNN/           with `train --keep-epochs`: every committed epoch as a model
                                    folder (config.json + model.weights.h5, a link to its weights)

Epoch N is written into `checkpoints/epoch-NNN.tmp/`, renamed to `checkpoints/epoch-NNN/`, and
committed by replacing `state.json` (one rename). Until that rename, `state.json` still names
epoch N-1's complete folder; after it, epoch N's. The links in RUN are refreshed after the
commit and again on resume or after an interrupt; older checkpoint folders are then removed
(best.weights.h5 is a hard link, so the best epoch's weights outlive their folder).

A kept epoch's folder is written as `epochs/epoch-NNN.tmp/` and renamed just before the commit;
`tidy` removes any kept folder of an epoch that was not committed, so after it `epochs/` holds
the committed epochs only.

Every file operation goes through one of the `WRITERS` below, so a test can interrupt each.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import zipfile
import warnings
from pathlib import Path

import numpy as np

from dermtool.errors import InputError, as_disk_full
from dermtool.io import claim, read_csv_rows, read_json

LAST, BEST, OPTIMIZER, HISTORY, STATE = "last.weights.h5", "best.weights.h5", "optimizer.npz", "history.csv", "state.json"
FOLDER = "checkpoints"
EPOCHS, MODEL_WEIGHTS, CONFIG = "epochs", "model.weights.h5", "config.json"
LOGS = "logs"  # TensorBoard's event files
WRITERS = ("_make_dir", "_save_weights", "_save_optimizer", "_link", "_write_text", "_rename", "_remove")


# -- the file operations (each one is a place where Ctrl-C can land) ---------------------------

def _make_dir(path: Path) -> None:
    path.mkdir(parents=True)


def _save_weights(model, path: Path) -> None:
    try:
        model.save_weights(str(path))
    except RuntimeError as exc:  # h5py's word for a full disk: no errno, no OSError
        raise as_disk_full(exc, path) from None


def _seed_states(model) -> list:
    """The model's random-stream states (each Dropout layer's SeedGenerator), which the weights
    file does not hold: every classifier head has dropout, whatever the preset's `dropout`."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _save_optimizer(model, path: Path) -> None:
    """Adam's slots and step count, and the dropout layers' random streams, so --resume continues
    the same optimizer with the same dropout masks (a resumed run equals an uninterrupted one)."""
    np.savez(path, **{f"v{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)},
             **{f"seed{i}": np.asarray(v) for i, v in enumerate(_seed_states(model))})


def _link(source: Path, target: Path) -> None:
    """A hard link (no copy, no extra space); a copy where the file system has none."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _write_text(path: Path, text: str) -> None:
    claim(path).write_text(text)


def _rename(source: Path, target: Path) -> None:
    os.replace(source, target)


def _remove(path: Path) -> None:
    if path.is_symlink():  # the link goes, never what it points to
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


# -- reading --------------------------------------------------------------------------------

#: a run's `best_by` when no validation set gave a metric: epochs kept by the lowest validation
#: loss (stored negated in `best_metric`, which is always the higher the better)
LOWEST_LOSS = "lowest val_loss"


def best_measure(state: dict) -> str:
    """What the kept epoch was chosen on, and its value, as a run's last line names them."""
    value = state["best_metric"]
    by = state.get("best_by", "score")
    return f"{by} {-value if by == LOWEST_LOSS else value:.4f}"


def read_state(run_dir: Path) -> dict | None:
    """The committed state (epoch, best epoch, learning rate ...), or None before the first epoch.

    Checked before anything acts on it, since tidy removes what is not the committed checkpoint:
    the checkpoint must be RUN/checkpoints/epoch-NNN of the state's own epoch, and neither
    checkpoints/ nor epochs/ may be a link (a run folder from elsewhere could point them at the
    user's files)."""
    run_dir = Path(run_dir)
    path = run_dir / STATE
    if not path.exists():
        return None
    state = read_json(path, "training state")
    epoch = state.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise InputError(f"{path}: epoch must be a whole number from 1, not {epoch!r}; the run's state is damaged.")
    if "checkpoint" in state and state["checkpoint"] != f"{FOLDER}/epoch-{epoch:03d}":
        raise InputError(f"{path}: checkpoint {str(state['checkpoint'])[:80]!r} is not {FOLDER}/epoch-{epoch:03d}, the "
                         "folder of its epoch inside the run; the run's state is damaged or was edited.")
    for name in (FOLDER, EPOCHS, LOGS):
        if (run_dir / name).is_symlink():
            raise InputError(f"{run_dir / name}: a link, where a run keeps a folder of its own; dermtool removes "
                             "old checkpoints and writes its logs there, so it does not follow a link out of the run.")
    return state


def committed_folder(run_dir: Path, state: dict) -> Path:
    """The folder holding the committed epoch's files (a run of an older dermtool: RUN itself)."""
    return Path(run_dir) / state.get("checkpoint", ".")


def history_text(folder: Path, fields: list[str], epochs: int) -> str:
    """history.csv of a checkpoint, cut to its first `epochs` rows (an older run's file may hold
    a row that its state.json never committed)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    path = folder / HISTORY
    if path.is_file() and epochs:
        table = read_csv_rows(path, "training history")
        rows = [dict(zip(table[0], r)) for r in table[1:] if r]
        try:
            writer.writerows(r for r in rows if int(r["epoch"]) <= epochs)
        except (KeyError, ValueError):
            raise InputError(f"{path}: the training history has no epoch column or a row without an epoch "
                             "number; it is damaged.") from None
    return out.getvalue()


def load(run_dir: Path, model, optimizer) -> dict:
    """Restore the model and optimizer of the committed epoch; returns its state."""
    state = read_state(run_dir)
    if state is None:
        raise InputError(f"{run_dir}: nothing to resume (no state.json: no epoch was completed); "
                         "start without --resume.")
    folder = committed_folder(run_dir, state)
    for name in (LAST, OPTIMIZER):  # a read, not a write: named as the checkpoint it is
        if not (folder / name).is_file():
            raise InputError(f"{folder / name}: the checkpoint of epoch {state['epoch']} is missing, so the run "
                             "cannot resume; start a new run with another --out.")
    try:
        with warnings.catch_warnings():
            # the optimizer's slots come from optimizer.npz below, so the weights file's are not needed
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(str(folder / LAST))
        if not optimizer.built:  # a mixed-precision loss-scale wrapper built twice adds its variables again
            optimizer.build(model.trainable_variables)
        saved = np.load(folder / OPTIMIZER)
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: the checkpoint of epoch {state['epoch']} is damaged "
                         f"({' '.join(str(exc).split())[:100]}); the run cannot resume.") from None
    if len([k for k in saved.files if k.startswith("v")]) != len(optimizer.variables):
        raise InputError(f"{folder / OPTIMIZER}: optimizer state does not match this model; cannot resume.")
    seeds = [(f"seed{i}", v) for i, v in enumerate(_seed_states(model)) if f"seed{i}" in saved.files]  # absent
    pairs = [(f"v{i}", v) for i, v in enumerate(optimizer.variables)] + seeds  # from an older dermtool's checkpoint
    try:
        for key, v in pairs:  # each array's header first: a declared shape is never allocated unchecked
            shape, dtype = _npz_header(saved, key)
            if shape != tuple(v.shape) or dtype.kind not in "fiub":
                raise ValueError(f"{key} is {shape} {dtype}, where this model's is {tuple(v.shape)}")
        for key, v in pairs:
            v.assign(saved[key])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise InputError(f"{folder / OPTIMIZER}: optimizer state does not match this model or is damaged "
                         f"({' '.join(str(exc).split())[:100]}); cannot resume.") from None
    return state


def _npz_header(saved, key: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of one array of an open .npz, from its .npy header alone."""
    with saved.zip.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    return tuple(shape), np.dtype(dtype)


# -- writing --------------------------------------------------------------------------------

def start_fresh(run_dir: Path) -> None:
    """Remove the checkpoint and kept-epoch folders an interrupted first epoch left (none was committed)."""
    for name in (FOLDER, EPOCHS):
        if (Path(run_dir) / name).exists():
            _remove(Path(run_dir) / name)


def commit(run_dir: Path, model, state: dict, row: dict, fields: list[str], improved: bool,
           keep: bool = False) -> None:
    """Write epoch `state["epoch"]` as one checkpoint folder and make it the run's state.

    `state` is the state after this epoch; `row` its history.csv row. `keep`: the epoch's weights
    also become the model folder `epochs/epoch-NNN` (the run's config.json and a link to the
    weights), which later epochs leave in place.
    """
    run_dir = Path(run_dir)
    previous = read_state(run_dir)
    name = f"epoch-{state['epoch']:03d}"
    tmp, final = run_dir / FOLDER / (name + ".tmp"), run_dir / FOLDER / name
    for stale in (tmp, final):  # an earlier, interrupted try at this epoch (never the committed one)
        if stale.exists():
            _remove(stale)
    _make_dir(tmp)
    _save_weights(model, tmp / LAST)
    _save_optimizer(model, tmp / OPTIMIZER)
    _link(tmp / LAST if improved or previous is None else committed_folder(run_dir, previous) / BEST, tmp / BEST)
    before = history_text(committed_folder(run_dir, previous), fields, previous["epoch"]) if previous else None
    _write_text(tmp / HISTORY, (before or _header(fields)) + _csv_row(row, fields))
    _rename(tmp, final)
    if keep:
        _keep_epoch(run_dir, final, name)
    _write_text(run_dir / (STATE + ".tmp"), json.dumps({**state, "checkpoint": f"{FOLDER}/{name}"}, indent=2))
    _rename(run_dir / (STATE + ".tmp"), run_dir / STATE)  # the commit
    tidy(run_dir)


def _keep_epoch(run_dir: Path, checkpoint: Path, name: str) -> None:
    tmp, final = run_dir / EPOCHS / (name + ".tmp"), run_dir / EPOCHS / name
    for stale in (tmp, final):  # an earlier, interrupted try at this epoch
        if stale.exists():
            _remove(stale)
    _make_dir(tmp)
    _link(checkpoint / LAST, tmp / MODEL_WEIGHTS)
    _write_text(tmp / CONFIG, (run_dir / CONFIG).read_text())
    _rename(tmp, final)


def tidy(run_dir: Path) -> None:
    """Point RUN's weights and history at the committed checkpoint and drop every other one.

    Run after each commit, on resume and after an interrupt; repeating it is harmless.
    """
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    if (run_dir / EPOCHS).is_dir():  # kept epochs never committed (an interrupt before the commit)
        committed = state["epoch"] if state else 0
        for path in sorted((run_dir / EPOCHS).iterdir()):
            number = path.name[6:] if path.name.startswith("epoch-") else ""
            if path.name.endswith(".tmp") or (number.isdigit() and int(number) > committed):
                _remove(path)
    if state is None or "checkpoint" not in state:
        return
    folder = committed_folder(run_dir, state)
    for name in (LAST, BEST, HISTORY):
        tmp = run_dir / (name + ".tmp")
        if tmp.exists():
            _remove(tmp)
        if (run_dir / name).exists() and os.path.samefile(folder / name, run_dir / name):
            # already the committed file (best.weights.h5 when the best epoch did not change):
            # renaming a second link of one file onto the first does nothing and would leave tmp
            continue
        _link(folder / name, tmp)
        _rename(tmp, run_dir / name)
    leftovers = [p for p in (run_dir / FOLDER).iterdir() if p != folder]
    leftovers += [p for p in (run_dir / OPTIMIZER, run_dir / (STATE + ".tmp")) if p.exists()]  # older layouts
    for path in sorted(leftovers):
        _remove(path)


def _header(fields: list[str]) -> str:
    return ",".join(fields) + "\n"


def _csv_row(row: dict, fields: list[str]) -> str:
    out = io.StringIO()
    csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n").writerow(
        {k: ("" if v is None else (round(v, 5) if isinstance(v, float) else v)) for k, v in row.items()})
    return out.getvalue()
