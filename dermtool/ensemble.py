"""Join trained model folders into one ensemble folder (`dermtool ensemble`).

Networks trained apart (from other starts or seeds) err on different images, so the mean of
their probabilities ranks and labels better than each alone; fine-tunes of one network err
alike and gain little (the model card's "Ensembles"). The ensemble folder is an ordinary model
folder: its config.json says `members: N`, and `dermtool.models.build_ensemble` rebuilds the N
networks on one input with each output the mean of theirs, so infer, calibrate, export, the
LiteRT engine and the Python API run it as one model, at N forward passes of the work.

The members must share the architecture and the input preparation: their config.json model
sections may differ only in what is fitted per network (temperature, operating point, mask
threshold), the lesion view, and how the network was trained (`pretrained`, `dropout`); keys
an older config.json leaves out count as their defaults. The ensemble keeps the first member's
lesion view and mask threshold; its temperature is reset to 1 and its melanoma threshold
removed, since those were fitted for one network: run `dermtool calibrate` on its validation predictions before using its
labels. config.json's `ensemble_of` names the members by absolute path.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import shutil
from pathlib import Path

from dermtool.config import ENSEMBLE_MAX, load_config, save_config
from dermtool.errors import InputError, as_disk_full
from dermtool.io import publish, staging_folder

#: fitted per network, or an inference setting (infer --cls-views, the mask threshold that infer
#: --threshold overrides): not the architecture. The ensemble keeps the first member's.
NOT_ARCHITECTURE = {"temperature", "melanoma_threshold", "calibration", "cls_views", "threshold",
                    # how a network was trained, not what it computes: its start, and dropout (off in inference)
                    "pretrained", "dropout"}
#: room beyond the weights for config.json and the file system's own blocks
DISK_MARGIN = 1 << 20


def check_members(models: list[Path]) -> None:
    """InputError unless `models` can be joined: 2 to ENSEMBLE_MAX single networks of one architecture."""
    if not 2 <= len(models) <= ENSEMBLE_MAX:
        raise InputError(f"an ensemble joins 2 to {ENSEMBLE_MAX} model folders, not {len(models)}.")
    configs = [load_config(m) for m in models]
    for model, (cfg, _, raw) in zip(models, configs):
        if raw.get("export"):
            raise InputError(f"{model}: an export folder; give the Keras model folder it was exported from.")
        if cfg.members > 1:
            raise InputError(f"{model}: already an ensemble of {cfg.members} networks; give its members instead.")
    # the loaded configs, with the defaults an older config.json leaves out filled in
    sections = [{k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_ARCHITECTURE | {"members", "member_weights"}}
                for cfg, _, _ in configs]
    for model, section in zip(models[1:], sections[1:]):
        if section != sections[0]:
            keys = sorted(k for k in section.keys() | sections[0].keys() if section.get(k) != sections[0].get(k))
            raise InputError(f"{model}: its config.json differs from {models[0]}'s in {', '.join(keys)}; an ensemble "
                             "joins networks of one architecture and input preparation.")


def make_ensemble(out: Path, models: list[Path], float16: bool = False, weights=None) -> Path:
    """Write the ensemble of `models` to the new folder `out` (whole or not at all).

    Args:
        out: a folder that does not exist yet, or is empty.
        models: 2 to ENSEMBLE_MAX model folders of one architecture (`check_members`).
        float16: store the weights as float16, half the size (they compute in float32).
        weights: the members' shares of the mean, one positive number each (None: equal).
    """
    given, models = Path(out), [Path(m) for m in models]
    out = Path(os.path.abspath(given))  # "." has a name once absolute
    if out.is_dir() and not out.is_symlink():
        for stale in out.glob(f".{glob.escape(out.name)}.partial-*"):  # of an ensemble into it that was killed (-9)
            shutil.rmtree(stale, ignore_errors=True)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # an old weights file or litert/ export there would be taken for the ensemble's
        raise InputError(f"{given}: already exists and is not an empty folder; name a new one for the ensemble.")
    check_members(models)
    first, tcfg, _ = load_config(models[0])
    # ModelConfig checks the weights as it checks a config.json's: one positive number per member
    cfg = dataclasses.replace(first, members=len(models), temperature=1.0, melanoma_threshold=None,
                              calibration=None, member_weights=None if weights is None else tuple(weights))
    from dermtool.modelio import weights_file

    out.parent.mkdir(parents=True, exist_ok=True)
    # the weights file is about the members' together: a disk without room for it is named now,
    # before h5py meets the full disk halfway through a write (its errors are pages long)
    out_bytes = 2 if float16 else 4  # per weight; a member stored as float16 has 2
    need = sum(weights_file(m).stat().st_size * out_bytes // (2 if load_config(m)[2].get("weights_dtype") == "float16" else 4)
               for m in models)
    if shutil.disk_usage(out.parent).free < need + DISK_MARGIN:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(given))
    from dermtool.modelio import halve_weights, load_model  # TensorFlow loads only once the folders and weights agree
    from dermtool.models import build_model, ensemble_members

    ensemble = build_model(cfg)
    for member, folder in zip(ensemble_members(ensemble), models):
        member.set_weights(load_model(folder)[0].get_weights())
    # a fresh name of its own: a folder already there (a model, the user's files) is never touched
    staging = staging_folder(out)
    try:
        try:
            ensemble.save_weights(str(staging / "model.weights.h5"))
        except RuntimeError as exc:  # h5py's word for a full disk
            raise as_disk_full(exc, out) from None
        if float16:
            halve_weights(staging / "model.weights.h5")
        # absolute: the folder is read from anywhere, and a path relative to where it was made says nothing there
        save_config(staging / "config.json", cfg, tcfg, ensemble_of=[str(m.resolve()) for m in models],
                    weights_dtype="float16" if float16 else "float32")
        publish(staging, out)  # into an empty folder, config.json last
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return given
