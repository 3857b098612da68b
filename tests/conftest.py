"""Shared fixtures: synthetic dermoscopy data made on the fly, and the real ISIC copy when present."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dermtool.synthetic import make_lesion, write_dataset

#: Varied sizes (landscape, portrait, square, odd sides) and every input format. Five sizes
#: against four formats so that each format meets several sizes.
SYNTHETIC_SIZES = [(120, 160), (161, 97), (96, 96), (150, 225), (75, 131)]
SYNTHETIC_FORMATS = ("jpg", "png", "tif", "bmp")


#: `pytest -n auto` (pyproject.toml's addopts) starts one worker per core, at most this many:
#: each worker imports TensorFlow and builds its own models, so a large machine would spend more
#: memory than time. On the 2-core CI machine 2 workers took the suite from 800 s to 492 s.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_WORKERS))


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """12 synthetic images in the development layout (images/, masks/, labels.csv).

    Session-scoped and shared: tests that modify files must use `synthetic_copy`.
    """
    folder = tmp_path_factory.mktemp("synthetic") / "data"
    return write_dataset(folder, 12, rng_seed=2017, sizes=SYNTHETIC_SIZES, formats=SYNTHETIC_FORMATS)


@pytest.fixture
def synthetic_copy(synthetic_dataset, tmp_path) -> Path:
    """A private, writable copy of `synthetic_dataset`."""
    return Path(shutil.copytree(synthetic_dataset, tmp_path / "data"))


@pytest.fixture
def lesion():
    """Factory: `lesion(h, w, seed=0, cls=None)` -> (rgb uint8, mask bool, class index)."""

    def make(h: int, w: int, seed: int = 0, cls: int | None = None):
        return make_lesion(h, w, np.random.default_rng(seed), cls=cls)

    return make


#: What the one line of a failed write must say, per way an output cannot be written. Tests
#: run as root, whom chmod does not stop, so a read-only folder is not among them.
UNWRITABLE = {"out_under_a_file": "a file is where a folder should be", "disk_full": "the disk is full"}


@pytest.fixture
def under_a_file(tmp_path) -> Path:
    """An --out whose parent is a regular file: no folder can be made there."""
    (tmp_path / "file").write_text("a file")
    return tmp_path / "file" / "out"


@pytest.fixture
def no_space():
    """Factory: `no_space(path)` -> the OSError a write gets on a full disk."""
    return lambda path: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _shared_data(name: str, title: str) -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / name
    if not path.is_dir():
        pytest.skip(f"real {title} data not found at {path}")
    return path


@pytest.fixture(scope="session")
def isic_dir() -> Path:
    """The development copy of ISIC 2017 (`../shared/data/isic2017`); skips the test when absent."""
    return _shared_data("isic2017", "ISIC 2017")


@pytest.fixture(scope="session")
def ham_dir() -> Path:
    """The development copy of HAM10000 (`../shared/data/ham10000`); skips the test when absent."""
    return _shared_data("ham10000", "HAM10000")


def tiny_model_folder(folder: Path, seed: int, spread: tuple = (0.0, 0.1), **changes) -> Path:
    """A model folder of a tiny compact joint network (32 px) whose every weight, batch-norm
    statistics too, is moved by a seeded uniform draw from `spread`: two seeds give two models
    that differ everywhere. `changes` replace fields of its config."""
    import dataclasses

    import keras

    from dermtool.config import preset_config, save_config
    from dermtool.models import build_model

    folder.mkdir()
    cfg = dataclasses.replace(preset_config("compact", "joint", size=32, base_filters=4, depth=2), **changes)
    save_config(folder / "config.json", cfg)
    keras.utils.set_random_seed(seed)
    model = build_model(cfg)
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.uniform(*spread, w.shape).astype(w.dtype) for w in model.get_weights()])
    model.save_weights(str(folder / "model.weights.h5"))
    return folder
