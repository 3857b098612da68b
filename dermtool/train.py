"""One training loop for the seg, cls and joint variants.

`train(model_cfg, train_cfg, train_cache, val_cache, out_dir)` writes a run folder:

    config.json          model + train config (rebuilds the model for inference), with the caches
    best.weights.h5      the epoch chosen on validation (JAC / BACC / mean performance); without
                         a validation set, the last epoch
    last.weights.h5      the latest complete epoch
    history.csv          one row per epoch: losses, validation metrics, learning rate, seconds
    state.json           the last complete epoch and its checkpoint (see dermtool.checkpoint)
    checkpoints/         that epoch's weights, optimizer state and history, for --resume
    logs/                TensorBoard
    command.txt          the exact command line (one line per start or resume)
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from dermtool import _tf, checkpoint

_tf.load()
import keras  # noqa: E402

from dermtool.augment import augment_batch, augment_pairs, mixup, parse_groups
from dermtool.config import ModelConfig, TrainConfig, load_config, save_config
from dermtool.data import Cache, load_cache
from dermtool.dataset import targets
from dermtool.errors import InputError
from dermtool.io import open_append, read_json
from dermtool.modelio import load_model
from dermtool.validation import FALLBACK_METRICS, predict_cache, selection_metric, validation_metrics, validation_targets


def check_cache(cache: Cache, cfg: ModelConfig, log) -> bool:
    """Whether batches must be resized on the fly; raises when the cache's geometry cannot serve
    the model. (What the task needs of the data, masks or labels, is checked over all training
    caches together: `load_training_set`.)"""
    where = cache.folder
    chain = cache.meta.get("chain", "direct")
    if chain != cfg.input_chain:
        raise InputError(f"{where}: cache made with --chain {chain} but the model reads its input through "
                         f"--input-chain {cfg.input_chain}; run dermtool preprocess --chain {cfg.input_chain}.")
    if cache.fit != cfg.fit or int(cache.meta.get("margin", 0)) != cfg.margin:
        raise InputError(
            f"{where}: cache made with fit={cache.fit}, margin={cache.meta.get('margin', 0)} but the model needs "
            f"fit={cfg.fit}, margin={cfg.margin}; run dermtool preprocess --fit {cfg.fit} --size {cfg.size} "
            f"--margin {cfg.margin}.")
    if cache.size != cfg.size:
        if cfg.margin:
            raise InputError(f"{where}: cache size {cache.size} differs from the model's {cfg.size}; "
                             f"preprocess again with --size {cfg.size}.")
        log(f"note: {where} holds {cache.size} px images; resizing each batch to {cfg.size} px on the fly "
            f"(preprocess with --size {cfg.size} to skip this work)")
        return True
    return False


MIXUP_STREAM = 1  # the 4th word of the mixup generator's seed: the other draws stay as without mixup


class BatchSource:
    """Batch `step` of `epoch` as a pure function of (seed, epoch, step).

    Every epoch is shuffled (or sampled) and augmented differently, a seeded run repeats
    exactly, and a resumed run continues as if it had never stopped.
    """

    def __init__(self, data, cfg: ModelConfig, tcfg: TrainConfig, steps: int, replicas: int = 1):
        self.data, self.cfg, self.tcfg, self.steps, self.replicas = data, cfg, tcfg, steps, replicas
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        from dermtool.dataset import epoch_indices

        if self._epoch != epoch:  # one draw per epoch, not per batch
            self._order = epoch_indices(self.data, self.tcfg.sampler, self.tcfg.seed, epoch, self.steps,
                                        self.tcfg.batch_size)
            self._epoch = epoch
        return self._order

    def batch(self, epoch: int, step: int):
        bs = self.tcfg.batch_size
        # --consistency: half a batch of images, each in two resampling chains (rows 2i, 2i + 1)
        take = self.order(epoch)[step * bs:step * bs + (bs // 2 if self.tcfg.consistency else bs)]
        images, masks, labels = self.data.read(take, self.cfg)
        # input and target are centred squares, so one dihedral map aligns both (valid models too)
        rng = np.random.default_rng([self.tcfg.seed, epoch, step])
        soft = self.data.soft[take] if (self.tcfg.distill and self.data.soft is not None) else None
        if self.tcfg.consistency:
            x, aug_masks, _ = augment_pairs(images, masks, rng, self.tcfg.augment)
            labels = np.repeat(labels, 2, axis=0)
            soft = None if soft is None else np.repeat(soft, 2, axis=0)
        else:
            x, aug_masks, _ = augment_batch(images, masks, rng, self.tcfg.augment)
        side = phase_size(self.cfg, self.tcfg, epoch)
        if side != self.cfg.input_size:  # progressive resizing: this epoch trains on smaller squares
            x, aug_masks = shrink_batch(x, aug_masks, side)
        y = targets(self.cfg, aug_masks, labels, soft, self.tcfg.distill)
        if "cls" in y and "mixup" in parse_groups(self.tcfg.augment):  # its own stream: the rest repeats
            x, y["cls"] = mixup(x, y["cls"], np.random.default_rng([self.tcfg.seed, epoch, step, MIXUP_STREAM]),
                                2 if self.tcfg.consistency else 1)
        if "seg" in y and "cls" in y and 0 < self.tcfg.seg_batch < len(x):  # the decoder trains on these only
            # each of the strategy's replicas gets an equal slice of the batch and runs the decoder on
            # the first seg_batch / replicas images of its slice: their masks, slice by slice
            per, k = len(x) // self.replicas, self.tcfg.seg_batch // self.replicas
            y["seg"] = np.concatenate([y["seg"][r * per:r * per + k] for r in range(self.replicas)])
        return x, y


def progressive_phases(cfg: ModelConfig, tcfg: TrainConfig) -> list[tuple[int, int, int]]:
    """(side, first epoch, end epoch) of each training phase, 0-based epochs.

    Without --progressive, one phase at the model's size. With it, the epochs are shared equally
    between START, START + 32, ... and the model's size, the remainder going to the last,
    full-size phase, so the model ends on what it will see; with fewer epochs than sides, the
    smallest go. Validation is always at the model's size.
    """
    full = cfg.input_size
    if not tcfg.progressive:
        return [(full, 0, tcfg.epochs)]
    sides = (list(range(tcfg.progressive, full, PROGRESSIVE_STEP)) + [full])[-tcfg.epochs:]  # an epoch each, at least
    share = tcfg.epochs // len(sides)
    phases, start = [], 0
    for k, side in enumerate(sides):
        end = tcfg.epochs if k == len(sides) - 1 else start + share
        if end > start:
            phases.append((side, start, end))
        start = end
    return phases


PROGRESSIVE_STEP = 32  # Lite0's coarsest feature map is 1/32 of the input


def check_progressive(cfg: ModelConfig, tcfg: TrainConfig) -> None:
    """--progressive must name a smaller square the network can take: a multiple of 32 (of
    2**depth for the U-Net), same padding."""
    start = tcfg.progressive
    if not start:
        return
    unit = 32 if cfg.encoder != "unet" else 2**cfg.depth
    if cfg.margin:
        raise InputError("--progressive needs a same-padded model (the thesis's valid convolutions tie the "
                         "input to one size).")
    if not (unit <= start < cfg.input_size and start % unit == 0):
        raise InputError(f"--progressive must be a multiple of {unit} from {unit} to below the model's size "
                         f"{cfg.input_size}, not {start}.")


def phase_size(cfg: ModelConfig, tcfg: TrainConfig, epoch: int) -> int:
    """The side of the squares epoch `epoch` (0-based) trains on."""
    for side, first, end in progressive_phases(cfg, tcfg):
        if first <= epoch < end:
            return side
    return cfg.input_size


def shrink_batch(x: np.ndarray, masks: np.ndarray | None, side: int):
    """A training batch resized to `side` px as the caches resize (dataset._resize_batch); a
    missing mask stays missing."""
    from dermtool.augment import MISSING
    from dermtool.dataset import _resize_batch

    small = _resize_batch(np.clip(x, 0, 255).astype(np.uint8), side, False).astype(np.float32)
    if masks is None:
        return small, None
    out = np.full((len(masks), side, side), MISSING, np.uint8)
    known = np.array([m.min() != MISSING for m in masks], bool)
    if known.any():
        out[known] = _resize_batch(masks[known], side, True)
    return small, out


def training_batch(cache: Cache, cfg: ModelConfig, tcfg: TrainConfig, resize: bool, epoch: int, step: int):
    """Batch `step` of `epoch` from a single cache (see BatchSource)."""
    from dermtool.dataset import TrainingSet, steps_per_epoch

    data = TrainingSet([cache], [resize])
    return BatchSource(data, cfg, tcfg, steps_per_epoch(len(data), tcfg.batch_size, tcfg.steps_per_epoch)).batch(epoch, step)


def training_dataset(data, cfg: ModelConfig, tcfg: TrainConfig, first_epoch: int = 0, end_epoch: int | None = None,
                     workers: int | None = None, replicas: int = 1):
    """The stream of (epoch, step) -> batch for epochs first_epoch .. end_epoch - 1 (default: all
    remaining), and the steps per epoch. All these epochs must train at one side
    (`progressive_phases`). `replicas`: the devices a distribution strategy splits each batch across.

    One stream across epochs (fit with steps_per_epoch), so batches prepared ahead of time
    always belong to the epoch they are trained in. Under TensorFlow it is a tf.data pipeline
    with one worker, unless `workers` is given; then, and under any other Keras backend, it is a
    `BatchSequence` that `workers` processes fill (default: the CPU cores less one).
    """
    from dermtool.dataset import steps_per_epoch

    steps = steps_per_epoch(len(data), tcfg.batch_size, tcfg.steps_per_epoch)
    source = BatchSource(data, cfg, tcfg, steps, replicas)
    keys = [k for k in ("seg", "cls") if (k == "seg" and cfg.has_seg) or (k == "cls" and cfg.has_cls)]
    end_epoch = tcfg.epochs if end_epoch is None else end_epoch
    if workers is not None or _tf.backend() != "tensorflow":
        if workers is None:
            workers = max(1, (os.cpu_count() or 2) - 1)
        return BatchSequence(source, keys, first_epoch, end_epoch, steps, workers), steps
    import tensorflow as tf

    def load(epoch, step):
        x, y = source.batch(int(epoch), int(step))
        return (x, *[y[k] for k in keys])

    def shape(*arrays):
        x = arrays[0]
        x.set_shape((None, side, side, 3))
        y = dict(zip(keys, arrays[1:]))
        if "seg" in y:
            y["seg"].set_shape((None, side - 2 * cfg.margin, side - 2 * cfg.margin, 1))
        if "cls" in y:
            y["cls"].set_shape((None, len(cfg.class_names)))
        return x, y

    side = phase_size(cfg, tcfg, first_epoch)
    pairs = tf.data.Dataset.range(first_epoch, end_epoch).flat_map(
        lambda e: tf.data.Dataset.range(steps).map(lambda s: (e, s)))
    # one worker: BatchSource caches the epoch's order and is not shared across threads
    ds = pairs.map(lambda e, s: tf.numpy_function(load, [e, s], [tf.float32] * (1 + len(keys))),
                   num_parallel_calls=1, deterministic=True)
    return ds.map(shape).prefetch(4), steps


#: set while `fit` runs on a BatchSequence: a process forked then is one of its batch workers
_FORKING_BATCH_WORKERS = False


def _batch_worker_signals(now: bool = False) -> None:
    """In a batch worker (a process forked while `fit` runs, or `now`), from its first Python line
    on: Ctrl-C, sent to the whole process group, is the main process's to handle once (keeping
    the last whole epoch), not every worker's to print a traceback for; SIGTERM stops it at once.
    A Python handler inherited from the training process (the CLI's) runs only in the worker's
    main thread: when the kernel hands the signal to another of its threads while the main
    thread waits on a lock, or the main thread is blocked in C, the handler never runs and the
    worker lives on, and a pool joining it waits forever (the suite hung there once)."""
    if _FORKING_BATCH_WORKERS or now:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_batch_worker_signals)


@contextlib.contextmanager
def _forking_batch_workers(batches):
    """The block in which `fit` runs on `batches` and forks their workers (a BatchSequence;
    nothing else), which are stopped when it ends, however it ends."""
    global _FORKING_BATCH_WORKERS
    if not isinstance(batches, BatchSequence):
        yield
        return
    _FORKING_BATCH_WORKERS = True
    try:
        yield
    finally:
        _FORKING_BATCH_WORKERS = False
        batches.close()


#: a batch worker's sequence (set by `_start_batch_worker` in each worker process)
_WORKER_SEQUENCE = None


def _start_batch_worker(sequence) -> None:
    global _WORKER_SEQUENCE
    _batch_worker_signals(now=True)
    _WORKER_SEQUENCE = sequence


def _batch_of_worker(i: int):
    return _WORKER_SEQUENCE.item(i)


def _forks_safely() -> bool:
    """Whether batch workers are forked processes: on Linux. Windows cannot fork, and on macOS a
    process that has loaded TensorFlow or JAX (many threads) is not safe to fork; there, threads
    prepare the batches (numpy and Pillow let go of the interpreter for most of the work)."""
    import multiprocessing
    import sys

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


class BatchSequence(keras.utils.PyDataset):
    """Batches (epoch, step) of epochs first .. end - 1 in order, item i being step i % steps of
    epoch first + i // steps, `processes` processes preparing the next ones (none for one).

    `BatchSource.batch` is a pure function of (seed, epoch, step), so each process computes its
    items alone and the run is the same batch for batch as the tf.data stream's. Keras reads the
    items one after the other in one thread, across every epoch, and the sequence keeps the
    next 2 x `processes` of them in the making in its own pool of forked processes (threads where
    forking is not safe, `_forks_safely`): Keras's own
    pool (its workers option) starts its items again from 0 at every epoch, so each epoch after
    the first trained again on the first epoch's batches. `close` stops the pool.
    """

    def __init__(self, source: BatchSource, keys: list[str], first: int, end: int, steps: int, workers: int):
        super().__init__(workers=1, use_multiprocessing=False)  # no enqueuer of Keras's: see above
        self.source, self.keys, self.first, self.end, self.steps = source, keys, first, end, steps
        self.processes = workers
        self._owner = os.getpid()  # the training process; its workers are the other processes
        self._pool = None
        self._ahead: dict = {}  # item -> its future, in the making
        self._local = threading.local()  # a thread pool's: each thread its own BatchSource
        self._closed = False  # after close: an item still asked for (a generator's last look) is made here

    def __len__(self) -> int:
        return (self.end - self.first) * self.steps

    def item(self, i: int, source: BatchSource | None = None):
        """Item i, computed here (with `source`: that copy of the batch source)."""
        x, y = (source or self.source).batch(self.first + i // self.steps, i % self.steps)
        return x, {k: y[k] for k in self.keys}

    def _item_in_thread(self, i: int):
        # BatchSource keeps the order of its last epoch: one copy a thread (the data itself shared)
        if not hasattr(self._local, "source"):
            self._local.source = copy.copy(self.source)
        return self.item(i, self._local.source)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        if os.getpid() != self._owner:  # a process forked from the training one: a worker of its own
            _batch_worker_signals(now=True)
            return self.item(i)
        if self.processes < 2 or self._closed:
            return self.item(i)
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

            if _forks_safely():
                # forked: the workers share the caches' memory maps rather than receive a pickled copy
                self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("fork"),
                                                 initializer=_start_batch_worker, initargs=(self,))
                self._work = _batch_of_worker
            else:
                self._pool, self._work = ThreadPoolExecutor(self.processes), self._item_in_thread
        for j in [j for j in self._ahead if j < i]:  # asked again from the start (Keras's look at the first)
            self._ahead.pop(j).cancel()
        for j in range(i, min(i + 2 * self.processes, len(self))):
            if j not in self._ahead:
                self._ahead[j] = self._pool.submit(self._work, j)
        return self._ahead.pop(i).result()

    def close(self) -> None:
        """Stop the workers: those on a batch get a few seconds to finish it, then a forked one is
        stopped by SIGTERM (its default action, see _batch_worker_signals), so that one hung in
        its batch can never keep the run from ending."""
        pool, self._pool, self._ahead, self._closed = self._pool, None, {}, True
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
        if not processes:  # threads: each ends with its batch
            pool.shutdown(wait=True)




MULTIWORKER_REMOVED = (
    "--strategy multiworker was removed: Keras 3's fit cannot train under MultiWorkerMirroredStrategy "
    "(keras-team/keras#20585), so every worker crashed on its first step; --strategy mirrored trains on "
    "all GPUs of one machine.")


class _OneDevice:
    """The default strategy of a Keras backend without tf.distribute: one device, no scope."""

    num_replicas_in_sync = 1

    def scope(self):
        return contextlib.nullcontext()


def _strategy(name: str):
    if _tf.backend() != "tensorflow":
        if name != "default":
            raise InputError(f"--strategy {name} needs TensorFlow (KERAS_BACKEND is {_tf.backend()}); "
                             "train on one GPU with --strategy default.")
        return _OneDevice()
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        raise InputError(MULTIWORKER_REMOVED)
    if name == "default":
        return tf.distribute.get_strategy()
    raise InputError(f"unknown strategy {name!r}; choose default or mirrored.")


def transfer_weights(model, source_dir: Path, freeze: str, log) -> list[str]:
    """Copy layers with matching names and shapes from another run's best weights.

    Raises:
        InputError: no layer matches (a run of another preset or width): training would
            silently start from scratch.
    """
    source, src_cfg = load_model(source_dir)  # checks its config.json and weights like any model
    copied = []
    src_layers = {l.name: l for l in source.layers}
    for layer in model.layers:
        other = src_layers.get(layer.name)
        if other is None or not layer.weights:
            continue
        if [w.shape for w in layer.weights] != [w.shape for w in other.weights]:
            continue
        layer.set_weights(other.get_weights())
        copied.append(layer.name)
    if not copied:
        raise InputError(f"{source_dir}: no layer of this run matches the new model by name and shape (it is a "
                         f"{src_cfg.preset} {src_cfg.task} model, {src_cfg.size} px, {src_cfg.base_filters} base "
                         f"filters, depth {src_cfg.depth}), so --init-from would copy nothing.")
    from dermtool.models import encoder_layer_names

    encoder = [n for n in encoder_layer_names(model) if model.get_layer(n).weights]
    missed = [n for n in encoder if n not in copied]
    if encoder and len(missed) > len(encoder) // 2:  # the encoder is what every --init-from is for
        raise InputError(f"{source_dir}: only {len(encoder) - len(missed)} of the new model's {len(encoder)} encoder "
                         f"layers match it by name and shape (it is a {src_cfg.preset} {src_cfg.task} model, "
                         f"{src_cfg.size} px, {src_cfg.base_filters} base filters, depth {src_cfg.depth}), so "
                         "--init-from would start nearly from scratch; give the same architecture options.")
    if missed:
        log(f"note: init-from {source_dir}: {len(missed)} of the {len(encoder)} encoder layers did not match "
            f"(first: {missed[0]}) and start from scratch")
    log(f"init-from {source_dir}: copied {len(copied)} layers")
    return copied


#: how images reach the network (its weights learned them), and the option that sets each
INPUT_OPTIONS = {"color_constancy": "--color-constancy", "input_chain": "--input-chain", "fit": "--fit",
                 "normalization": "--preset"}


def check_init_inputs(cfg: ModelConfig, tcfg: TrainConfig, log) -> None:
    """Before anything is written: --init-from a model that learned from inputs prepared otherwise.

    A frozen encoder (`--freeze encoder` or `encoder+decoder`) would only ever see inputs it never
    learned from, so that is refused; a fine-tuned one is noted.
    """
    if not tcfg.init_from:
        return
    src_cfg, _, _ = load_config(Path(tcfg.init_from))
    if src_cfg.members > 1:
        raise InputError(f"{tcfg.init_from}: an ensemble of {src_cfg.members} networks (dermtool ensemble); "
                         "--init-from takes one network: give one of its members.")
    differ = [f"{option} {getattr(src_cfg, field)} there, {getattr(cfg, field)} here"
              for field, option in INPUT_OPTIONS.items() if getattr(src_cfg, field) != getattr(cfg, field)]
    if differ and tcfg.freeze in ("encoder", "encoder+decoder"):
        raise InputError(f"{tcfg.init_from}: its encoder learned from inputs prepared otherwise "
                         f"({'; '.join(differ)}), so --freeze {tcfg.freeze} would keep it on inputs it never "
                         "saw; give the same options.")
    if differ:
        log(f"note: {tcfg.init_from} learned from inputs prepared otherwise ({'; '.join(differ)}); "
            "give the same options unless the change is meant")


def apply_freeze(model, freeze: str) -> None:
    from dermtool.models import decoder_layer_names, early_layer_names, encoder_layer_names, stem_layer_names

    names = {"encoder": encoder_layer_names(model), "decoder": decoder_layer_names(model),
             "encoder+decoder": encoder_layer_names(model) + decoder_layer_names(model),
             "stem": stem_layer_names(model), "early": early_layer_names(model)}.get(freeze, [])
    for layer in model.layers:
        if layer.name in names:
            layer.trainable = False


def _as_list(paths) -> list[Path]:
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def load_training_set(paths: list[Path], cfg: ModelConfig, log):
    """Open the training caches as one TrainingSet; each must fit the model, together they must
    hold what the task trains on (masks for seg, labels of every class for cls)."""
    from dermtool.dataset import TrainingSet

    caches = [load_cache(p) for p in paths]
    resize = [check_cache(c, cfg, log) for c in caches]
    data = TrainingSet(caches, resize)
    names = ", ".join(str(p) for p in paths)
    if cfg.has_seg and not data.has_mask.any():
        raise InputError(f"{names}: no image has a mask, and task {cfg.task} trains a mask head; "
                         "preprocess with --masks.")
    if cfg.has_cls and not (data.labels >= 0).any():
        raise InputError(f"{names}: no image has a label, and task {cfg.task} trains a classifier; "
                         "preprocess with --labels.")
    if cfg.has_cls:
        absent = [n for n, count in zip(cfg.class_names, data.n_classes_present) if count == 0]
        if absent:  # its weight would be 0 and the classifier would never learn to predict it
            raise InputError(f"{names}: no training image of class {', '.join(absent)}; task {cfg.task} "
                             "cannot learn a class it never sees; add a cache that has it, or train --task seg.")
    if len(caches) > 1 or not data.has_mask.all() or not (data.labels >= 0).all():
        log(f"training data: {len(data)} images from {len(caches)} cache(s); "
            f"{int(data.has_mask.sum())} with a mask, {int((data.labels >= 0).sum())} with a label")
    return data


def _validation_prefixes(n: int) -> list[str]:
    """History column prefixes: val_ for the first validation set, val2_, val3_ ... for the others."""
    return ["val_"] + [f"val{k + 1}_" for k in range(1, n)]


def train(cfg: ModelConfig, tcfg: TrainConfig, train_cache, val_cache, out_dir: Path,
          resume: bool = False, log=print, progress: bool = True, workers: int | None = None) -> Path:
    """Train and validate every epoch; returns the run folder. See the module docstring.

    `workers`: processes that prepare batches (`training_dataset`); they change the speed, never
    the batches.

    `train_cache` and `val_cache` are one path or a list of paths (several caches train as one
    set; every validation set is scored every epoch and the epochs are chosen on their mean).
    """
    policy = keras.mixed_precision.global_policy()
    try:
        return _train(cfg, tcfg, train_cache, val_cache, out_dir, resume, log, progress, workers)
    finally:  # --mixed-precision sets Keras's global policy: models built later in this process stay float32
        keras.mixed_precision.set_global_policy(policy)


def _train(cfg: ModelConfig, tcfg: TrainConfig, train_cache, val_cache, out_dir: Path,
           resume: bool, log, progress: bool, workers: int | None) -> Path:
    out_dir = Path(out_dir)
    train_paths, val_paths = _as_list(train_cache), _as_list(val_cache)
    command = tcfg.command
    if resume:
        if checkpoint.read_state(out_dir) is None:
            raise InputError(f"{out_dir}: nothing to resume (no state.json: no epoch was completed); "
                             "start without --resume.")
        cfg, saved_tcfg, _ = load_config(out_dir)
        train_paths, val_paths = resume_caches(out_dir, saved_tcfg, train_paths, val_paths, log)
        done = checkpoint.read_state(out_dir)["epoch"]
        if tcfg.epochs and tcfg.epochs < done:
            raise InputError(f"{out_dir}: {done} epochs are done already, more than --epochs {tcfg.epochs}; "
                             f"--resume --epochs gives the new total to reach (more than {done}), and the run's "
                             "weights after an earlier epoch are its checkpoints' (or --keep-epochs') only.")
        # the run's own settings (config.json keeps the original command); only the epoch total
        # may change, and command.txt gets this resume command too
        tcfg = replace(saved_tcfg, epochs=tcfg.epochs or saved_tcfg.epochs, train_caches=_resolved(train_paths),
                       val_caches=_resolved(val_paths))
    elif checkpoint.read_state(out_dir) is not None:
        raise InputError(f"{out_dir}: already holds a run; use --resume to continue it or choose another --out.")
    else:
        if not train_paths:
            raise InputError("no training cache given.")
        check_fresh_out(out_dir)
        check_cache_overlap(train_paths, val_paths, log)
        tcfg = replace(tcfg, train_caches=_resolved(train_paths), val_caches=_resolved(val_paths))
    if tcfg.strategy == "multiworker":  # before anything is written
        raise InputError(MULTIWORKER_REMOVED)
    check_progressive(cfg, tcfg)
    if not resume:
        check_init_inputs(cfg, tcfg, log)
        if tcfg.freeze != "none" and not tcfg.init_from and not (cfg.pretrained and tcfg.freeze in ("stem", "early", "encoder")):
            # a note, not a refusal: timing a recipe (bench/train_bench.py) needs no trained weights
            log(f"note: --freeze {tcfg.freeze} keeps layers fixed that nothing has trained (no --init-from"
                f"{', no pretrained encoder' if tcfg.freeze in ('stem', 'early', 'encoder') else ''}): they stay "
                "random; give --init-from a run to freeze what it learned")

    keras.utils.set_random_seed(tcfg.seed)
    gpus = _tf.gpu_count()
    if tcfg.mixed_precision:
        if gpus:
            # float16 with loss scaling under TensorFlow, as ever; bfloat16 (no scaling) elsewhere
            keras.mixed_precision.set_global_policy(
                "mixed_float16" if _tf.backend() == "tensorflow" else "mixed_bfloat16")
        else:
            log("note: --mixed-precision needs a GPU; training in float32 on the CPU")
    backend = "" if _tf.backend() == "tensorflow" else f" (Keras backend {_tf.backend()})"
    log(f"devices: {gpus} GPU(s){backend}" if gpus else f"devices: CPU{backend}")

    data = load_training_set(train_paths, cfg, log)
    if tcfg.batch_size > len(data):  # a batch holds each image about batch / n times: say so
        log(f"note: --batch-size {tcfg.batch_size} is more than the {len(data)} training images, so each batch "
            f"repeats them (about {tcfg.batch_size / len(data):.0f} times each); one step is then several passes.")
    if tcfg.distill:
        if not cfg.has_cls:
            raise InputError(f"--teacher gives the classifier soft targets; task {cfg.task} has no classifier.")
        from dermtool.distill import attach_teacher

        tcfg = replace(tcfg, teacher_sha256=attach_teacher(data, tcfg, cfg.class_names, log, resume))
    vals = [load_cache(p) for p in val_paths]
    fingerprints = tuple(cache_fingerprint(c) for c in [*data.caches, *vals])
    if resume:
        check_cache_fingerprints(out_dir, tcfg, [*train_paths, *val_paths], fingerprints)
    else:
        tcfg = replace(tcfg, cache_fingerprints=fingerprints)
    for path, val in zip(val_paths, vals):
        scored = (cfg.has_seg and val.has_mask.any()) or (cfg.has_cls and (val.labels >= 0).any())  # a partial label counts
        if not scored:  # its loss would be 0 every epoch, and the first epoch would stay the best
            wanted = {"seg": "masks", "cls": "labels", "joint": "masks or labels"}[cfg.task]
            raise InputError(f"{path}: the --val cache has no {wanted}, so it cannot score a {cfg.task} model; "
                             "preprocess it with them, or leave it out.")
    resize_va = [check_cache(v, cfg, log) for v in vals]

    weights = tuple(tcfg.class_weights)
    if cfg.has_cls and not weights:
        from dermtool.losses import class_weights_from_labels

        if tcfg.sampler == "balanced":  # the sampler balances the classes already
            weights = (1.0,) * len(cfg.class_names)
        else:
            weights = tuple(round(float(w), 6) for w in class_weights_from_labels(data.labels, len(cfg.class_names)))
        tcfg = replace(tcfg, class_weights=weights)
    if cfg.has_cls:
        how = "balanced sampler, so uniform" if tcfg.sampler == "balanced" else "W_c = N / (3 n_c)"
        log(f"class weights ({how}): " + ", ".join(f"{n} {w:.3f}" for n, w in zip(cfg.class_names, weights)))

    strategy = _strategy(tcfg.strategy)
    if tcfg.consistency and tcfg.batch_size % (2 * strategy.num_replicas_in_sync):
        raise InputError(f"--consistency with {strategy.num_replicas_in_sync} GPUs needs a batch size that is a "
                         f"multiple of {2 * strategy.num_replicas_in_sync} (each GPU gets whole pairs), "
                         f"not {tcfg.batch_size}.")
    replicas = strategy.num_replicas_in_sync
    if cfg.task == "joint" and 0 < tcfg.seg_batch < tcfg.batch_size and replicas > 1 and (
            tcfg.batch_size % replicas or tcfg.seg_batch % replicas):
        raise InputError(f"--seg-batch with {replicas} GPUs needs a batch size and a --seg-batch that are "
                         f"multiples of {replicas} (each GPU runs the decoder on an equal share), not "
                         f"{tcfg.batch_size} and {tcfg.seg_batch}.")
    if not vals:
        log("note: no --val: best.weights.h5 is the last epoch (a training loss is no validation score)")
    from dermtool.losses import build_losses, with_consistency
    from dermtool.models import build_models, load_pretrained

    seg_batch = tcfg.seg_batch if cfg.task == "joint" and 0 < tcfg.seg_batch < tcfg.batch_size else 0
    decoder_frozen = tcfg.freeze in ("decoder", "encoder+decoder")
    if seg_batch and decoder_frozen:
        log(f"the decoder runs on {seg_batch} of each batch's {tcfg.batch_size} images (frozen: it does not learn)")
    elif seg_batch:
        log(f"the decoder trains on {seg_batch} of each batch's {tcfg.batch_size} images; "
            "the encoder and classifier on all")
    if cfg.task == "joint" and tcfg.alpha == 0 and not decoder_frozen:
        log("note: --alpha 0 gives the masks no loss, yet the decoder's batch-norm statistics still follow the "
            "training batches, so the masks change; --freeze encoder+decoder keeps them exactly")
    with strategy.scope():
        model, train_model = build_models(cfg, seg_batch // replicas)  # per replica
        if cfg.pretrained and not resume and not tcfg.init_from:
            load_pretrained(model, cfg, log=log)
        if tcfg.init_from and not resume:
            transfer_weights(model, Path(tcfg.init_from), tcfg.freeze, log)
        apply_freeze(model, tcfg.freeze)
        losses, loss_weights = build_losses(cfg.has_seg, cfg.has_cls, tcfg.alpha,
                                            tcfg.seg_loss == "bce+dice", weights or (1, 1, 1))
        fit_losses = with_consistency(losses, tcfg.consistency,  # validation scores the plain losses
                                      anchored="pair-anchor" in parse_groups(tcfg.augment))
        ema = {"use_ema": True, "ema_momentum": tcfg.ema} if tcfg.ema else {}
        optimizer = keras.optimizers.Adam(tcfg.learning_rate, **ema)
        model.compile(optimizer=optimizer, loss=fit_losses, loss_weights=loss_weights)
        if train_model is not model or tcfg.progressive:
            # the same optimizer (under mixed precision, the same loss-scale wrapper), its slots in
            # the saved model's variable order, as checkpoint.load builds them
            if train_model is not model:
                train_model.compile(optimizer=model.optimizer, loss=fit_losses, loss_weights=loss_weights)
            model.optimizer.build(model.trainable_variables)

    # written once the model is built and its --init-from copied: a start that fails before
    # leaves no run folder behind
    created, before = not out_dir.exists(), _folder_before(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if not resume:
            checkpoint.start_fresh(out_dir)  # what an interrupted first epoch left
        metric_name = selection_metric(cfg) if vals else None
        # the plateau schedule watches the validation loss, or without validation the training loss,
        # each under its own name
        state = {"epoch": 0, "lr": tcfg.learning_rate, "wait": 0, "best_val_loss": None, "best_train_loss": None,
                 "best_by": metric_name or "last epoch", "best_metric": None, "best_epoch": None}
        if resume:
            # model.optimizer: under mixed precision the loss-scale wrapper, whose variables (the
            # scale and its counter, then Adam's) are the ones each checkpoint saved
            # in the strategy's scope: the load builds the optimizer's slots, mirrored like the weights
            with strategy.scope():
                state = {**state, **checkpoint.load(out_dir, model, model.optimizer)}
                if tcfg.ema:  # the checkpoint holds the average in the model and the raw weights in the slots
                    swap_ema(model, model.optimizer)
            checkpoint.tidy(out_dir)  # links left stale by an interrupt
            log(f"resuming {out_dir} after epoch {state['epoch']} (lr {state['lr']:.3g})")
        if resume and state["epoch"] < tcfg.epochs and (cfg.temperature != 1.0 or cfg.melanoma_threshold is not None
                                                         or cfg.calibration):
            # fitted by dermtool calibrate to the weights this resume goes on to change
            cfg = replace(cfg, temperature=1.0, melanoma_threshold=None, calibration=None)
            log(f"note: {out_dir} was calibrated (temperature, melanoma threshold) for its weights after epoch "
                f"{state['epoch']}; training changes them, so the calibration is removed: run dermtool calibrate "
                "again on the new weights' validation predictions")
        # after the load: a resume refused for a missing or damaged checkpoint leaves the run's record
        # (its epochs, its commands) as it was
        save_config(out_dir / "config.json", cfg, tcfg)
        if command:
            with open_append(out_dir / "command.txt") as fh:
                fh.write(command + "\n")
        optimizer.learning_rate.assign(state["lr"])
        if state["epoch"] >= tcfg.epochs:
            log(f"{out_dir}: all {tcfg.epochs} epochs already done")
            return out_dir

        callback = EpochEnd(model, cfg, tcfg, list(zip(vals, resize_va)), losses, loss_weights, out_dir, state,
                            metric_name, log)
        callbacks = [callback]
        try:
            import tensorboard  # noqa: F401  (keras needs it to write summaries)

            if _tf.backend() != "tensorflow":  # Keras writes them through tf.summary
                raise ImportError
            if (out_dir / "logs").is_symlink():  # a run folder from elsewhere: never written through
                log(f"note: {out_dir / 'logs'} is a link, so no TensorBoard logs are written through it; "
                    "history.csv has every number")
            else:
                callbacks.append(keras.callbacks.TensorBoard(str(out_dir / "logs"), write_graph=False,
                                                             update_freq="epoch"))
        except ImportError:
            log("note: no TensorBoard logs (they need tensorboard and TensorFlow); history.csv has every number")
        for side, first, end in progressive_phases(cfg, tcfg):
            if end <= state["epoch"]:
                continue
            fit_model = train_model
            if side != cfg.input_size:  # the same layers on smaller squares
                log(f"epochs {max(first, state['epoch']) + 1}-{end}: {side} px squares (--progressive)")
                with strategy.scope():
                    fit_model = keras.models.clone_model(train_model, input_tensors=keras.Input((side, side, 3)),
                                                         clone_function=lambda layer: layer)
                    fit_model.compile(optimizer=model.optimizer, loss=fit_losses, loss_weights=loss_weights)
            elif len(progressive_phases(cfg, tcfg)) > 1:
                log(f"epochs {max(first, state['epoch']) + 1}-{end}: {side} px squares, the model's own")
            batches, steps = training_dataset(data, cfg, tcfg, first_epoch=max(first, state["epoch"]), end_epoch=end,
                                              workers=workers, replicas=replicas)
            with _forking_batch_workers(batches):
                fit_model.fit(batches, epochs=end, initial_epoch=max(first, state["epoch"]), steps_per_epoch=steps,
                              shuffle=False, verbose=1 if progress else 0, callbacks=callbacks)
    except BaseException:
        if not resume and not _committed(out_dir):
            undo_start(out_dir, created, before)  # no epoch was committed: nothing of this start is kept
        else:
            # a damaged state.json or a checkpoint gone is the error being raised: the tidy must not hide it
            with contextlib.suppress(InputError, OSError):
                checkpoint.tidy(out_dir)  # RUN's files show the last committed epoch, whatever the cut
        raise
    if metric_name and state["best_metric"] is not None:
        log(f"done: best epoch {state['best_epoch']} ({checkpoint.best_measure(state)}) "
            f"-> {out_dir / 'best.weights.h5'}")
    else:
        log(f"done: {state['epoch']} epochs; without --val the last epoch is kept -> {out_dir / 'best.weights.h5'}")
    return out_dir


#: what a run writes at the top of its folder and replaces (command.txt is appended to, and logs/
#: gets a train/ of TensorBoard's beside a scheduler's logs)
RUN_FILES = {checkpoint.CONFIG, checkpoint.HISTORY, checkpoint.FOLDER, checkpoint.EPOCHS, checkpoint.LAST,
             checkpoint.BEST, checkpoint.OPTIMIZER}


def check_fresh_out(out_dir: Path) -> None:
    """A new run may start in a new or empty folder, one with files of other names (a scheduler's
    log), or the folder of its own earlier start that committed no epoch (killed in epoch 1);
    never over a model folder or another tool's config.json or history.csv, which it would
    replace without a word.

    Raises:
        InputError: naming the folder and the files a run would overwrite.
    """
    if not out_dir.is_dir():
        return
    clash = sorted(name for name in os.listdir(out_dir) if name in RUN_FILES | {checkpoint.MODEL_WEIGHTS})
    if not clash:
        return
    if checkpoint.MODEL_WEIGHTS in clash:
        raise InputError(f"{out_dir}: holds model.weights.h5, a model folder; a run there would replace its "
                         "config.json and leave the weights under another model's settings. Choose a new --out "
                         "(--init-from the folder starts from its weights).")
    if not _own_start(out_dir):
        raise InputError(f"{out_dir}: holds {', '.join(clash)}, which a new run would overwrite, and is not a "
                         "dermtool run; choose a new or empty --out.")


def _own_start(out_dir: Path) -> bool:
    """Whether `out_dir` is what a start of `dermtool train` left: its command.txt and a config.json
    with the training settings."""
    if not (out_dir / "command.txt").is_file():
        return False
    try:
        raw = read_json(out_dir / checkpoint.CONFIG, "run configuration")
    except InputError:
        return False
    return isinstance(raw, dict) and isinstance(raw.get("train"), dict) and "train_caches" in raw["train"]


def _folder_before(out_dir: Path) -> dict:
    """What --out held before a start: its entries' names, and command.txt's length (a start
    appends one line to it)."""
    if not out_dir.is_dir():
        return {"names": set(), "command_bytes": 0, "logs": set()}
    command, logs = out_dir / "command.txt", out_dir / "logs"
    return {"names": {p.name for p in out_dir.iterdir()},
            "command_bytes": command.stat().st_size if command.is_file() and not command.is_symlink() else 0,
            "logs": {p.name for p in logs.iterdir()} if logs.is_dir() and not logs.is_symlink() else set()}


def _committed(out_dir: Path) -> bool:
    try:
        return checkpoint.read_state(out_dir) is not None
    except InputError:
        return True  # a state.json is there, damaged: not this start's to remove


def undo_start(out_dir: Path, created: bool, before: dict) -> None:
    """Remove what a start that committed no epoch wrote: the whole run folder when it made it;
    in a folder that was there, only what was not there before (`_folder_before`): a config.json,
    history.csv or logs/ of the user's stay, and command.txt goes back to its earlier length."""
    import shutil

    if created:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    checkpoint.start_fresh(out_dir)
    logs = out_dir / "logs"
    if "logs" in before["names"] and logs.is_dir() and not logs.is_symlink():  # TensorBoard's train/ in the user's logs/
        for path in logs.iterdir():
            if path.name in before["logs"]:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
    for name in ("config.json", "history.csv", "logs"):
        path = out_dir / name
        if name in before["names"]:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    command = out_dir / "command.txt"
    if "command.txt" not in before["names"]:
        command.unlink(missing_ok=True)
    elif command.is_file() and not command.is_symlink():
        with open(command, "r+b") as fh:
            fh.truncate(before["command_bytes"])


def swap_ema(model, optimizer) -> None:
    """Exchange the model's trainable weights with the optimizer's moving averages of them."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a mixed-precision loss-scale wrapper
    averages = optimizer._model_variables_moving_average  # Keras keeps them in the built variable order
    for var in model.trainable_variables:
        avg = averages[optimizer._get_variable_index(var)]
        raw = np.asarray(var.numpy()).copy()
        var.assign(avg)
        avg.assign(raw)


def _resolved(paths: list[Path]) -> tuple:
    return tuple(str(Path(p).resolve()) for p in paths)


def resume_caches(out_dir: Path, saved: TrainConfig, train_paths: list[Path], val_paths: list[Path], log):
    """The caches a resumed run goes on with: those config.json records, given again or omitted.

    Other caches would silently change what the run learns from or is chosen on, so they are
    refused. A run of an older dermtool records none: the caches given are used (and recorded).
    """
    config = Path(out_dir) / "config.json"
    result = []
    for option, given, recorded in (("the training caches", train_paths, saved.train_caches),
                                    ("--val", val_paths, saved.val_caches)):
        recorded = [str(p) for p in recorded]
        if option == "--val" and given and not recorded and saved.train_caches:
            raise InputError(
                f"{config}: this run trains without --val (its epochs are kept by the last, not chosen on a "
                "validation set); resume it without --val, or start a new run with another --out.")
        if given and recorded and list(_resolved(given)) != recorded:
            raise InputError(
                f"{config}: this run uses {option} {' '.join(recorded)}, not {' '.join(map(str, given))}; "
                "resume with the same caches or none (they are taken from config.json), "
                "or start a new run with another --out.")
        result.append(list(given) if given else [Path(p) for p in recorded])
    if not result[0]:
        raise InputError(f"{config} records no training caches (a run of an older dermtool); "
                         "give them again: dermtool train CACHE ... --out RUN --resume.")
    if not saved.train_caches and not result[1]:
        log(f"note: {config} records no caches (a run of an older dermtool); resuming without --val")
    return result[0], result[1]


#: cache.json settings that change what a cache holds
_CACHE_SETTINGS = ("size", "fit", "border", "margin", "chain", "mask_rule", "label_rule", "input_size")


def cache_fingerprint(cache: Cache) -> str:
    """What an opened cache holds for training: its settings and every image's id, class and mask
    flag. A fresh copy of the same data (new file times) gives the same; relabelled or other
    images do not."""
    import hashlib

    h = hashlib.sha1(json.dumps({k: cache.meta.get(k) for k in _CACHE_SETTINGS}, sort_keys=True).encode())
    for image_id, label, has_mask in zip(cache.ids, cache.labels, cache.has_mask):
        h.update(f"{image_id}|{int(label)}|{int(has_mask)}\n".encode())
    return h.hexdigest()


def check_cache_fingerprints(out_dir: Path, tcfg: TrainConfig, paths: list[Path], fingerprints: tuple) -> None:
    """A resumed run goes on with the data it started with: a cache rebuilt at the same path from
    other images or labels since then is refused (a run of an older dermtool recorded none)."""
    for path, recorded, now in zip(paths, tcfg.cache_fingerprints, fingerprints):
        if now != recorded:
            raise InputError(f"{path}: rebuilt from other data or settings since {out_dir} started (its images, "
                             "labels or settings changed, or a newer dermtool rebuilt it: its rules for reading masks "
                             "and images change the settings), and --resume continues the run on the data it began "
                             "with; resume with the cache as it was, or start a new run with another --out.")


def check_cache_overlap(train_paths: list[Path], val_paths: list[Path], log) -> None:
    """Note a cache given twice, or as both training and validation data: the images then count
    twice, or the epochs are chosen on images the model learns from. Caches at other paths are
    compared by their manifests too: validation images (image_id) or lesions (lesion_id, where
    recorded) that are also training's, as from two caches of one side of a split, or a split by
    image. A note, not a refusal: a user may mean it."""
    seen = {}
    for role, paths in (("training", train_paths), ("validation", val_paths)):
        for path in paths:
            key = str(Path(path).resolve())
            if key in seen:
                log(f"note: {path} is given as {seen[key]} and {role} data: "
                    + ("its images count twice in every epoch" if seen[key] == role == "training"
                       else "the run is validated on images it learns from" if role != seen[key]
                       else "it is scored twice"))
            seen.setdefault(key, role)
    train_keys = {str(Path(p).resolve()) for p in train_paths}
    trained = [_manifest_ids(p) for p in train_paths]
    train_images = {i for images, _ in trained for i in images}
    train_lesions = {lesion for _, lesions in trained for lesion in lesions if lesion}
    for path in val_paths:
        if str(Path(path).resolve()) in train_keys:
            continue  # noted above
        images, lesions = _manifest_ids(path)
        own_lesions = sorted({lesion for lesion in lesions if lesion})
        both = [i for i in images if i in train_images]
        both_lesions = [lesion for lesion in own_lesions if lesion in train_lesions]
        parts = [f"{len(both)} of its {len(images)} images (e.g. {both[0]})"] if both else []
        if both_lesions:
            parts.append(f"{len(both_lesions)} of its {len(own_lesions)} lesions (e.g. {both_lesions[0]})")
        if parts:
            log(f"note: validation cache {path}: {' and '.join(parts)} are also in the training data, so the run "
                "is validated on what it learns from")


def _manifest_ids(cache: Path) -> tuple[list[str], list[str]]:
    """(image ids, lesion ids) of a cache's manifest.csv, without opening its stacks; empty when it
    cannot be read (loading the cache names that problem)."""
    from dermtool.io import read_csv_rows

    try:
        table = read_csv_rows(Path(cache) / "manifest.csv", "cache manifest")
    except InputError:
        return [], []
    header = table[0] if table else []
    rows = [r for r in table[1:] if len(r) == len(header)]

    def column(name: str) -> list[str]:
        return [r[header.index(name)] for r in rows] if name in header else []

    return column("image_id"), column("lesion_id")


def check_resume_options(out_dir: Path, given: dict) -> None:
    """Refuse options that contradict the run being resumed (only --epochs may change).

    `given` maps each option given on the command line to (section, field, value as config.json
    stores it), section "model" or "train". Does nothing when there is no run to resume.
    """
    config = Path(out_dir) / "config.json"
    if not config.is_file():
        return
    cfg, tcfg, _ = load_config(config)
    differ = [(option, getattr(cfg if section == "model" else tcfg, field), value)
              for option, (section, field, value) in given.items()
              if getattr(cfg if section == "model" else tcfg, field) != value]
    if differ:
        # an on/off option reads "--dice off" for the run, and as it was typed ("--no-dice") for the command
        run = ", ".join(f"{o.replace('--no-', '--', 1) if isinstance(old, bool) else o} {_shown(old)}"
                        for o, old, _ in differ)
        asked = ", ".join(o if isinstance(new, bool) else f"{o} {_shown(new)}" for o, _, new in differ)
        raise InputError(
            f"{config}: this run has {run}, and --resume continues it as it is (only --epochs may change); "
            f"drop {asked}, or start a new run with another --out.")


def _shown(value) -> str:
    """A setting as a message shows it: on/off, "none" for an empty list or no path."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == "" or value == [] or value == ():
        return "none"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def cosine_lr(base: float, epoch: int, epochs: int, warmup: int = 1) -> float:
    """Learning rate of `epoch` (0-based): linear warm-up over `warmup` epochs, then a cosine from
    `base` that reaches 0 at epoch `epochs` (one past the last: the last epoch still learns)."""
    if epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    t = (epoch - warmup) / max(1, epochs - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * t))


class EpochEnd(keras.callbacks.Callback):
    """Validation with the scorer's metrics, LR schedule, checkpoints and history, every epoch."""

    def __init__(self, model, cfg, tcfg, vals, losses, loss_weights, out_dir, state, metric_name, log):
        super().__init__()
        self.m, self.cfg, self.tcfg, self.vals = model, cfg, tcfg, vals
        self.losses, self.loss_weights = losses, loss_weights
        self.out_dir, self.state, self.metric_name, self.log = out_dir, state, metric_name, log
        self.started = time.perf_counter()
        self.truths = [validation_targets(v, cfg, r) for v, r in vals]
        self.prefixes = _validation_prefixes(len(vals))

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        if self.tcfg.schedule == "cosine":
            self.state["lr"] = cosine_lr(self.tcfg.learning_rate, epoch, self.tcfg.epochs)
            self.m.optimizer.learning_rate.assign(self.state["lr"])

    def _val_loss(self, pred: dict, truth: dict) -> float:
        total = 0.0
        for key, fn in self.losses.items():
            p = pred[key][..., None] if key == "seg" else pred[key]
            total += self.loss_weights[key] * float(fn(truth[key], p))
        return total

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        row = {"epoch": epoch + 1, "loss": logs.get("loss"), "seg_loss": logs.get("seg_loss"),
               "cls_loss": logs.get("cls_loss"), "lr": float(np.asarray(self.m.optimizer.learning_rate))}
        st = self.state
        improved = True  # without validation, every epoch becomes the kept one
        if self.tcfg.ema:  # validate and keep the moving average; train on from the raw weights
            swap_ema(self.m, self.m.optimizer)
        if self.vals:
            scores, val_losses, used = [], [], []
            for (val, resize), truth, prefix in zip(self.vals, self.truths, self.prefixes):
                pred = predict_cache(self.m, val, self.cfg, resize)
                row.update(validation_metrics(pred, truth, self.cfg, prefix))
                row[prefix + "loss"] = self._val_loss(pred, truth)
                val_losses.append(row[prefix + "loss"])
                # the task's metric; a set that cannot give it has its say with what it can give: a
                # joint run's set of masks alone its JAC, one of labels alone (or without full labels,
                # as ISIC 2020's melanoma vs benign) its melanoma AUC
                for name in FALLBACK_METRICS[self.cfg.task]:
                    if row.get(prefix + name) is not None:
                        scores.append(row[prefix + name])
                        used.append(prefix + name)
                        break
            # what the kept epoch was chosen on, as the run's last line names it
            st["best_by"] = (used[0] if len(used) == 1 else f"mean of {', '.join(used)}") if used else checkpoint.LOWEST_LOSS
            monitored = float(np.mean(val_losses))
            # several validation sets: epochs are chosen on the mean of their selection metrics
            score = float(np.mean(scores)) if scores else -monitored
            improved = st["best_metric"] is None or score > st["best_metric"]
            if improved:
                st["best_metric"] = float(score)
        else:
            monitored = row["loss"]
        if self.tcfg.schedule == "plateau":
            self._plateau(monitored, "best_val_loss" if self.vals else "best_train_loss")
        if improved:
            st["best_epoch"] = epoch + 1
        row["best"] = int(improved)
        row["seconds"] = round(time.perf_counter() - self.started, 1)
        st["epoch"] = epoch + 1
        prefixes = self.prefixes if self.vals else []
        checkpoint.commit(self.out_dir, self.m, st, row, history_fields(prefixes), improved,
                          keep=self.tcfg.keep_epochs)
        if self.tcfg.ema:
            swap_ema(self.m, self.m.optimizer)
            # fit ends by putting the average into the model (Keras' finalize_variable_values); the
            # next --progressive phase trains on from the raw weights (on_train_end)
            self._raw = [np.array(v.numpy()) for v in self.m.trainable_variables]
        self.log(_summary(row, prefixes))

    def on_train_end(self, logs=None):
        if self.tcfg.ema and getattr(self, "_raw", None) is not None:
            for var, raw in zip(self.m.trainable_variables, self._raw):
                var.assign(raw)

    def _plateau(self, monitored: float, key: str) -> None:
        """Learning rate x lr_factor after lr_patience epochs without a better loss (`key` in the state)."""
        st = self.state
        if st[key] is None or monitored < st[key]:
            st[key], st["wait"] = monitored, 0
            return
        st["wait"] += 1
        if st["wait"] >= self.tcfg.lr_patience:
            st["lr"] = st["lr"] * self.tcfg.lr_factor
            self.m.optimizer.learning_rate.assign(st["lr"])
            st["wait"] = 0
            self.log(f"learning rate reduced to {st['lr']:.3g}")


VAL_FIELDS = ["loss", "jac", "bacc", "mean_performance", "mel_sensitivity", "mel_auc"]


def history_fields(prefixes: list[str]) -> list[str]:
    fields = ["epoch", "loss", "seg_loss", "cls_loss"]
    for p in prefixes or ["val_"]:
        fields += [p + f for f in VAL_FIELDS]
    return fields + ["lr", "seconds", "best"]


def _summary(row: dict, prefixes: list[str]) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['loss']:.4f}"]
    for p in prefixes:
        tag = "" if p == "val_" else p[:-1] + " "
        for key, label in (("loss", "val_loss"), ("jac", "JAC"), ("bacc", "BACC"), ("mean_performance", "mean"),
                           ("mel_sensitivity", "mel SE"), ("mel_auc", "mel AUC")):
            if row.get(p + key) is not None:
                parts.append(f"{tag}{label} {row[p + key]:.4f}")
    parts += [f"lr {row['lr']:.3g}", f"{row['seconds']:.0f}s", "*best*" if row["best"] else ""]
    return "  ".join(p for p in parts if p)
