"""Training on tiny synthetic caches: run folder, resume, transfer, class weights, strategy."""

from __future__ import annotations

import contextlib
import csv
from dataclasses import replace
import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from conftest import UNWRITABLE
from dermtool.config import TrainConfig, load_config, preset_config
from dermtool.data import Layout, build_cache, load_cache, resolve_layout
from dermtool.losses import class_weights_from_labels
from dermtool.synthetic import write_dataset

SIZE = 32


def tiny(task: str, **over):
    return preset_config("compact", task, **{"size": SIZE, "base_filters": 4, "depth": 2, **over})


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_dataset(root / "data", 12, rng_seed=7, sizes=[(48, 64), (64, 48)], formats=("png",))
    build_cache(resolve_layout(data), root / "cache", size=SIZE, fit="squash", progress=False)
    return root / "cache"


def run(caches, out: Path, task: str, epochs: int = 2, resume: bool = False, cfg=None, **tover):
    from dermtool.train import train

    tcfg = TrainConfig(**{"epochs": epochs, "batch_size": 4, "learning_rate": 3e-3, "seed": 3, "augment": "none", **tover})
    return train(cfg or tiny(task), tcfg, caches, caches, out, resume=resume, log=lambda m: None, progress=False)


def assert_same_weights(cfg, run_a: Path, run_b: Path) -> None:
    """The last epochs of two runs hold exactly the same weights."""
    from dermtool.models import build_model

    a, b = build_model(cfg), build_model(cfg)
    a.load_weights(str(run_a / "last.weights.h5"))
    b.load_weights(str(run_b / "last.weights.h5"))
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def history(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "history.csv")))


@pytest.mark.parametrize("task", ["seg", "cls", "joint"])
def test_each_task_trains_and_writes_a_complete_run_folder(caches, tmp_path, task):
    out = run(caches, tmp_path / task, task, epochs=3)
    for name in ("config.json", "best.weights.h5", "last.weights.h5", "state.json", "history.csv",
                 "checkpoints/epoch-003/optimizer.npz"):
        assert (out / name).is_file(), name
    assert any((out / "logs").rglob("*")), "TensorBoard logs"
    rows = history(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    key = {"seg": "val_jac", "cls": "val_bacc", "joint": "val_mean_performance"}[task]
    assert all(0.0 <= float(r[key]) <= 1.0 for r in rows)
    cfg, tcfg, _ = load_config(out)
    assert cfg.task == task and tcfg.seed == 3
    state = json.loads((out / "state.json").read_text())
    best = max(rows, key=lambda r: float(r[key]))
    assert state["best_epoch"] == int(best["epoch"])


def test_resume_continues_from_the_saved_epoch_and_matches_an_uninterrupted_run(caches, tmp_path):
    # without dropout the run is deterministic, so resume must reproduce it exactly: same data
    # order and augmentation for epoch 2, same Adam state, same learning rate
    cfg = tiny("seg", dropout=0.0)
    straight = run(caches, tmp_path / "straight", "seg", epochs=2, cfg=cfg)
    part = run(caches, tmp_path / "part", "seg", epochs=1, cfg=cfg)
    assert len(history(part)) == 1
    resumed = run(caches, tmp_path / "part", "seg", epochs=2, resume=True, cfg=cfg)
    assert [int(r["epoch"]) for r in history(resumed)] == [1, 2]
    assert_same_weights(cfg, straight, resumed)


def test_resume_carries_the_dropout_streams_so_a_joint_run_matches_exactly(caches, tmp_path):
    # the classifier head has dropout whatever cfg.dropout says; its random stream (a SeedGenerator
    # state, not in the weights file) is checkpointed too, or epoch 2 redrew epoch 1's masks
    cfg = tiny("joint")
    straight = run(caches, tmp_path / "straight", "joint", epochs=2, cfg=cfg)
    run(caches, tmp_path / "part", "joint", epochs=1, cfg=cfg)
    resumed = run(caches, tmp_path / "part", "joint", epochs=2, resume=True, cfg=cfg)
    assert_same_weights(cfg, straight, resumed)


def test_resume_removes_a_calibration_fitted_to_the_earlier_weights(caches, tmp_path):
    """A run calibrated after epoch 1 and resumed kept its temperature and threshold, and infer
    applied them to the new weights without a word."""
    from dermtool.calibrate import write_decision

    out = run(caches, tmp_path / "r", "cls", epochs=1)
    write_decision(out, 2.5, 0.3, {"target_sensitivity": 0.85})
    assert load_config(out)[0].temperature == 2.5
    said = []
    from dermtool.train import train

    tcfg = TrainConfig(epochs=1, batch_size=4, learning_rate=3e-3, seed=3, augment="none")
    train(tiny("cls"), tcfg, caches, caches, out, resume=True, log=said.append, progress=False)  # nothing left to do
    assert load_config(out)[0].temperature == 2.5
    train(tiny("cls"), replace(tcfg, epochs=2), caches, caches, out, resume=True, log=said.append, progress=False)
    cfg = load_config(out)[0]
    assert (cfg.temperature, cfg.melanoma_threshold, cfg.calibration) == (1.0, None, None)
    assert any("the calibration is removed" in m for m in said)


def test_a_second_run_into_the_same_folder_needs_resume(caches, tmp_path):
    from dermtool.errors import InputError

    run(caches, tmp_path / "r", "seg", epochs=1)
    with pytest.raises(InputError, match="--resume"):
        run(caches, tmp_path / "r", "seg", epochs=1)


def test_init_from_copies_the_encoder_and_freeze_keeps_it(caches, tmp_path):
    from dermtool.models import build_model, encoder_layer_names
    from dermtool.train import transfer_weights

    seg = run(caches, tmp_path / "seg", "seg", epochs=1)
    source = build_model(tiny("seg"))
    source.load_weights(str(seg / "best.weights.h5"))
    target = build_model(tiny("cls"))
    copied = transfer_weights(target, seg, "none", log=lambda m: None)
    enc = encoder_layer_names(target)
    assert set(enc) <= set(copied) | {n for n in enc if not target.get_layer(n).weights}
    for name in enc:
        for w_t, w_s in zip(target.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(w_t, w_s)

    cls = run(caches, tmp_path / "cls", "cls", epochs=1, init_from=str(seg), freeze="encoder")
    trained = build_model(tiny("cls"))
    trained.load_weights(str(cls / "last.weights.h5"))
    conv = "enc_block1_conv1"
    np.testing.assert_array_equal(trained.get_layer(conv).get_weights()[0], source.get_layer(conv).get_weights()[0])
    assert not np.array_equal(trained.get_layer("cls").get_weights()[0], build_model(tiny("cls")).get_layer("cls").get_weights()[0])


def test_class_weights_follow_thesis_eq_12_on_the_isic_2017_counts():
    # class counts of the ISIC 2017 training split (374 melanoma, 254 SK, 1372 nevus)
    labels = np.repeat([0, 1, 2], [374, 254, 1372])
    w = class_weights_from_labels(labels)
    np.testing.assert_allclose(w, [2000 / (3 * 374), 2000 / (3 * 254), 2000 / (3 * 1372)])
    # the thesis prints them rounded: melanoma 1.783, SK 2.625, nevus 0.486
    assert [round(x, 3) for x in w] == [1.783, 2.625, 0.486]


def test_mirrored_strategy_runs_on_the_cpu(caches, tmp_path):
    out = run(caches, tmp_path / "mirrored", "joint", epochs=1, strategy="mirrored")
    assert len(history(out)) == 1


def test_training_batches_differ_between_epochs_but_repeat_under_the_seed(caches):
    from dermtool.train import training_batch

    cache = load_cache(caches)
    cfg = tiny("seg")
    tcfg = TrainConfig(batch_size=4, seed=1, augment="flips+color")
    x0, y0 = training_batch(cache, cfg, tcfg, False, epoch=0, step=0)
    x1, _ = training_batch(cache, cfg, tcfg, False, epoch=1, step=0)
    assert x0.shape == (4, SIZE, SIZE, 3) and y0["seg"].shape == (4, SIZE, SIZE, 1)
    assert not np.array_equal(x0, x1)
    np.testing.assert_array_equal(training_batch(cache, cfg, tcfg, False, epoch=0, step=0)[0], x0)
    other_seed = TrainConfig(batch_size=4, seed=2, augment="flips+color")
    assert not np.array_equal(training_batch(cache, cfg, other_seed, False, epoch=0, step=0)[0], x0)


@pytest.mark.parametrize("consistency", [0.0, 1.0])
def test_mixup_blends_on_top_of_the_same_batches_and_leaves_the_masks(caches, consistency):
    from dermtool.train import training_batch

    cache = load_cache(caches)
    cfg = tiny("joint")
    plain = TrainConfig(batch_size=8, seed=1, augment="flips+color", consistency=consistency, steps_per_epoch=3)
    mixed = TrainConfig(batch_size=8, seed=1, augment="flips+color+mixup", consistency=consistency,
                        steps_per_epoch=3)
    blended = 0
    for step in range(3):
        x0, y0 = training_batch(cache, cfg, plain, False, epoch=0, step=step)
        x1, y1 = training_batch(cache, cfg, mixed, False, epoch=0, step=step)
        np.testing.assert_array_equal(y1["seg"], y0["seg"])  # the dominant image's mask, as it was
        same = np.all(x1 == x0, axis=(1, 2, 3))
        np.testing.assert_array_equal(y1["cls"][same], y0["cls"][same])
        np.testing.assert_allclose(y1["cls"].sum(axis=1), y0["cls"].sum(axis=1), atol=1e-6)
        blended += int((~same).sum())
    assert blended > 0


def test_the_training_stream_serves_each_epoch_its_own_batches(caches):
    from dermtool.dataset import TrainingSet
    from dermtool.train import training_batch, training_dataset

    cache = load_cache(caches)
    cfg = tiny("seg")
    tcfg = TrainConfig(batch_size=4, seed=1, epochs=3, augment="flips")
    ds, steps = training_dataset(TrainingSet([cache], [False]), cfg, tcfg, first_epoch=1)
    got = [x.numpy() for x, _ in ds]
    assert len(got) == 2 * steps
    np.testing.assert_array_equal(got[steps], training_batch(cache, cfg, tcfg, False, epoch=2, step=0)[0])


def test_the_worker_stream_serves_the_tf_data_streams_batches(caches):
    """--workers (and any Keras backend but TensorFlow) feeds fit from processes: the same batches."""
    from dermtool.dataset import TrainingSet
    from dermtool.train import BatchSequence, training_dataset

    cache = load_cache(caches)
    cfg = tiny("joint")
    tcfg = TrainConfig(batch_size=4, seed=1, epochs=3, augment="flips+color", consistency=1.0)
    data = TrainingSet([cache], [False])
    ds, steps = training_dataset(data, cfg, tcfg, first_epoch=1)
    seq, seq_steps = training_dataset(data, cfg, tcfg, first_epoch=1, workers=2)
    assert isinstance(seq, BatchSequence) and seq_steps == steps and len(seq) == 2 * steps
    for i, (x, y) in enumerate(ds):
        sx, sy = seq[i]
        np.testing.assert_array_equal(sx, x.numpy())
        assert sorted(sy) == sorted(y) == ["cls", "seg"]
        for key in y:
            np.testing.assert_array_equal(sy[key], y[key].numpy())
    with pytest.raises(IndexError):
        seq[len(seq)]


def _sigint_in_a_worker(seq, queue):
    import signal

    seq[0]
    queue.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_batch_workers_leave_ctrl_c_to_the_main_process(caches):
    """Ctrl-C reaches the whole process group: only the main process may act on it (one line,
    the last whole epoch kept), not every worker with a traceback of its own."""
    import multiprocessing
    import signal

    from dermtool.dataset import TrainingSet
    from dermtool.train import training_dataset

    seq, _ = training_dataset(TrainingSet([load_cache(caches)], [False]), tiny("seg"),
                              TrainConfig(batch_size=4, epochs=1), workers=2)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    worker = ctx.Process(target=_sigint_in_a_worker, args=(seq, queue))
    worker.start()
    worker.join(60)
    assert queue.get(timeout=5) is True
    before = signal.getsignal(signal.SIGINT)
    seq[0]
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs fork and pthread_kill")
def test_a_batch_worker_stops_on_sigterm_whichever_of_its_threads_takes_it(caches):
    """A worker forked while fit runs dies on the pool's SIGTERM even when the kernel hands the
    signal to another of its threads while its main thread waits on a lock: a Python handler
    inherited from the training process (the CLI's) never runs then, and the pool's join waited
    for that worker forever (the suite hung there once)."""
    import multiprocessing

    from dermtool import train as train_module
    from dermtool.dataset import TrainingSet

    seq, _ = train_module.training_dataset(TrainingSet([load_cache(caches)], [False]), tiny("seg"),
                                           TrainConfig(batch_size=4, epochs=1), workers=2)
    ctx = multiprocessing.get_context("fork")
    lock = ctx.Lock()
    lock.acquire()  # held: the worker's main thread waits on it, as on the pool's task lock
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a handler in Python, as the CLI's
    try:
        with train_module._forking_batch_workers(seq):
            worker = ctx.Process(target=_sigterm_to_another_thread, args=(lock,))
            worker.start()
        worker.join(20)
        stopped = not worker.is_alive()
        if not stopped:
            worker.kill()
            worker.join()
        queue, seen = ctx.Queue(), []
        for inside in (True, False):  # only forks while fit runs are batch workers
            with train_module._forking_batch_workers(seq) if inside else contextlib.nullcontext():
                other = ctx.Process(target=_signals_of_a_fork, args=(queue,))
                other.start()
            other.join(20)
            seen.append(queue.get(timeout=5))
    finally:
        signal.signal(signal.SIGTERM, before)
        lock.release()
    assert stopped and worker.exitcode == -signal.SIGTERM
    assert not train_module._FORKING_BATCH_WORKERS
    assert seen == [(True, True), (False, False)]


def _sigterm_to_another_thread(lock):
    import threading

    threading.Thread(target=lambda: signal.pthread_kill(threading.get_ident(), signal.SIGTERM)).start()
    lock.acquire()


def _signals_of_a_fork(queue):
    import signal

    queue.put((signal.getsignal(signal.SIGINT) == signal.SIG_IGN, signal.getsignal(signal.SIGTERM) == signal.SIG_DFL))


def test_training_with_batch_workers_ends_on_the_same_weights(caches, tmp_path):
    """Keras's own worker pool began its items again at every epoch: from the second epoch on,
    --workers 2 trained on the first epoch's batches (the same over 2 epochs of 3 steps by chance,
    not over 3)."""
    from dermtool.train import train

    cfg = tiny("joint")
    tcfg = TrainConfig(epochs=3, batch_size=4, learning_rate=3e-3, seed=3, augment="flips")
    a = train(cfg, tcfg, caches, caches, tmp_path / "a", log=lambda m: None, progress=False)
    b = train(cfg, tcfg, caches, caches, tmp_path / "b", log=lambda m: None, progress=False, workers=2)
    assert_same_weights(cfg, a, b)
    assert history(a)[-1]["val_jac"] == history(b)[-1]["val_jac"]


def test_another_keras_backend_leaves_tensorflow_alone_and_refuses_what_needs_it(monkeypatch):
    import subprocess
    import sys

    code = ("import os, sys; from dermtool import _tf; "
            "assert _tf.backend() == 'jax' and _tf.load() is None and 'tensorflow' not in sys.modules; print('ok')")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
    from dermtool.errors import InputError
    from dermtool.train import _strategy

    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert _strategy("default").num_replicas_in_sync == 1
    with pytest.raises(InputError, match="--strategy mirrored needs TensorFlow"):
        _strategy("mirrored")
    from dermtool import modelio

    with pytest.raises(InputError, match="export and the SavedModel engine run under TensorFlow only"):
        modelio._tf()  # export's first step: one sentence, not an AttributeError on None


def test_a_cache_of_another_size_is_resized_on_the_fly(caches, tmp_path):
    cfg = tiny("seg", size=16)
    out = run(caches, tmp_path / "small", "seg", epochs=1, cfg=cfg)
    assert len(history(out)) == 1


def test_a_joint_run_chooses_on_what_each_validation_set_can_give(caches, tmp_path):
    """A validation set of masks without labels gave a joint run no metric: its epochs were chosen
    on minus the validation loss while the run's last line called that val_mean_performance."""
    from dermtool.checkpoint import best_measure, read_state
    from dermtool.train import train

    data = write_dataset(tmp_path / "d", 4, rng_seed=1, sizes=[(40, 40)], formats=("png",))
    masks_only = tmp_path / "masks_only"
    build_cache(Layout(data / "images", data / "masks", None), masks_only, size=SIZE, progress=False)
    lines = []
    tcfg = TrainConfig(epochs=2, batch_size=4, learning_rate=3e-3, seed=3, augment="none")
    out = train(tiny("joint"), tcfg, caches, masks_only, tmp_path / "r", log=lines.append, progress=False)
    state = read_state(out)
    kept = history(out)[state["best_epoch"] - 1]
    assert state["best_by"] == "val_jac" and state["best_metric"] == pytest.approx(float(kept["val_jac"]))
    assert f"(val_jac {float(kept['val_jac']):.4f})" in lines[-1]
    # a set that gives no metric at all: the lowest validation loss, named as such, with its value
    state["best_by"], state["best_metric"] = "lowest val_loss", -0.3098
    assert best_measure(state) == "lowest val_loss 0.3098"


def test_a_cache_without_masks_cannot_train_segmentation(tmp_path):
    from dermtool.errors import InputError

    data = write_dataset(tmp_path / "d", 4, rng_seed=1, sizes=[(40, 40)], formats=("png",))
    build_cache(Layout(data / "images", None, data / "labels.csv"), tmp_path / "c", size=SIZE, progress=False)
    with pytest.raises(InputError, match="mask"):
        run(tmp_path / "c", tmp_path / "r", "seg", epochs=1)


def test_train_cli_writes_a_run_and_rejects_bad_options(caches, tmp_path):
    from typer.testing import CliRunner

    from dermtool.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["train", str(caches), "--val", str(caches), "--task", "joint", "--out", str(out), "--size", str(SIZE),
            "--base-filters", "4", "--depth", "2", "--epochs", "1", "--batch-size", "4", "--augment", "none"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "best.weights.h5").is_file()
    command = (out / "command.txt").read_text()
    assert command.startswith("dermtool train ") and "--epochs 1" in command and "--task joint" in command
    # --resume without --epochs keeps the run's own total (here: 1, already done)
    again = runner.invoke(app, ["train", str(caches), "--out", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert len(history(out)) == 1 and load_config(out)[1].epochs == 1
    lines = (out / "command.txt").read_text().splitlines()
    assert len(lines) == 2 and "--resume" in lines[1].split() and "--resume" not in load_config(out)[1].command
    bad = runner.invoke(app, args[:4] + ["--task", "both", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--task" in bad.output
    missing = runner.invoke(app, ["train", str(tmp_path / "nope"), "--out", str(tmp_path / "y")])
    assert missing.exit_code == 2 and "nope" in missing.output


def test_train_config_records_the_class_weights(caches, tmp_path):
    out = run(caches, tmp_path / "w", "cls", epochs=1)
    _, tcfg, _ = load_config(out)
    labels = load_cache(caches).labels
    np.testing.assert_allclose(tcfg.class_weights, class_weights_from_labels(labels), atol=1e-6)


def test_export_keeps_the_network_and_drops_the_optimizer(caches, tmp_path):
    from dermtool.infer import load_model
    from dermtool.modelio import save_model_folder

    out = run(caches, tmp_path / "run", "joint", epochs=1)
    slim = save_model_folder(out, tmp_path / "slim")
    assert (slim / "model.weights.h5").stat().st_size < (out / "best.weights.h5").stat().st_size
    a, _ = load_model(slim)
    b, cfg = load_model(out)
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    for key in ("seg", "cls"):
        np.testing.assert_array_equal(np.asarray(a.predict_on_batch(x)[key]), np.asarray(b.predict_on_batch(x)[key]))
    assert load_config(slim)[0] == cfg


# --- issue 11: resume rules, interruptions, honest labels, option checks --------------------

def cli(*args):
    from typer.testing import CliRunner

    from dermtool.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


TINY_CLI = ("--size", SIZE, "--base-filters", 4, "--depth", 2, "--batch-size", 4, "--augment", "none")


def weights_of(path: Path, cfg) -> list[np.ndarray]:
    from dermtool.models import build_model

    model = build_model(cfg)
    model.load_weights(str(path))
    return model.get_weights()


def test_keep_epochs_keeps_each_epoch_as_a_model_folder_that_infer_runs(caches, tmp_path):
    """train --keep-epochs: epochs/epoch-NNN holds epoch N's weights (a one-epoch run of the same
    seed gives epoch 1's exactly, dropout off), and the folder is a model folder infer takes."""
    from dermtool.modelio import load_model

    cfg = tiny("joint", dropout=0.0)
    out = run(caches, tmp_path / "r", "joint", epochs=2, cfg=cfg, keep_epochs=True)
    assert load_config(out / "config.json")[1].keep_epochs is True
    first, second = out / "epochs" / "epoch-001", out / "epochs" / "epoch-002"
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "model.weights.h5"]
    assert (first / "config.json").read_text() == (out / "config.json").read_text()
    one = run(caches, tmp_path / "one", "joint", epochs=1, cfg=cfg)
    for a, b in zip(weights_of(first / "model.weights.h5", cfg), weights_of(one / "last.weights.h5", cfg)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(weights_of(second / "model.weights.h5", cfg), weights_of(out / "last.weights.h5", cfg)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(weights_of(first / "model.weights.h5", cfg),
                                                        weights_of(second / "model.weights.h5", cfg)))
    assert load_model(first)[1].task == "joint"
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted(resolve_layout(caches.parent / "data").images.iterdir())[:2]:
        shutil.copy(src, images / src.name)
    result = cli("infer", images, "--out", tmp_path / "pred", "--model", first)
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "pred" / "predictions.csv").read_text().splitlines()) == 3
    assert not (run(caches, tmp_path / "plain", "seg", epochs=1) / "epochs").exists()


def test_without_val_the_last_epoch_is_kept_and_no_training_figure_is_called_val(caches, tmp_path):
    from dermtool.train import train

    logs = []
    tcfg = TrainConfig(epochs=2, batch_size=4, learning_rate=3e-3, seed=3, augment="none")
    out = train(tiny("seg"), tcfg, caches, None, tmp_path / "r", log=logs.append, progress=False)
    state = json.loads((out / "state.json").read_text())
    assert state["best_epoch"] == 2  # the last epoch: nothing to choose on
    assert all(value is None for key, value in state.items() if "val" in key), state
    for row in history(out):
        assert all(row[c] == "" for c in row if c.startswith("val")), row
    text = "\n".join(logs).replace(str(tmp_path), "RUN")
    assert "val_" not in text and "last epoch" in text, text


def test_a_class_missing_from_the_training_data_is_refused_for_a_classifier(tmp_path):
    from dermtool.errors import InputError

    data = write_dataset(tmp_path / "d", 6, rng_seed=1, sizes=[(40, 40)], formats=("png",))
    rows = (data / "labels.csv").read_text().splitlines()
    # every keratosis becomes a nevus: the cache holds no seborrheic_keratosis at all
    (data / "labels.csv").write_text("\n".join([rows[0]] + [r.rsplit(",", 1)[0] + ",0.0" for r in rows[1:]]) + "\n")
    build_cache(resolve_layout(data), tmp_path / "c", size=SIZE, progress=False)
    for task in ("cls", "joint"):
        with pytest.raises(InputError) as err:
            run(tmp_path / "c", tmp_path / task, task, epochs=1)
        assert "seborrheic_keratosis" in str(err.value) and str(tmp_path / "c") in str(err.value)
        assert not (tmp_path / task / "state.json").exists()
    assert len(history(run(tmp_path / "c", tmp_path / "seg", "seg", epochs=1))) == 1  # masks are all there


def test_resume_refuses_options_that_contradict_the_run_and_takes_caches_from_config(caches, tmp_path):
    other = tmp_path / "other"
    data = write_dataset(tmp_path / "d", 6, rng_seed=2, sizes=[(40, 40)], formats=("png",))
    build_cache(resolve_layout(data), other, size=SIZE, progress=False)
    out = tmp_path / "run"
    first = cli("train", caches, "--val", caches, "--task", "seg", "--out", out, "--epochs", 1, *TINY_CLI)
    assert first.exit_code == 0, first.output
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["train_caches"] == [str(caches.resolve())]
    assert config["train"]["val_caches"] == [str(caches.resolve())]
    for bad, named in ((("--task", "joint"), "--task"), (("--batch-size", 8), "--batch-size"),
                       (("--learning-rate", 0.01), "--learning-rate"), (("--dice",), "--dice off"),
                       (("--keep-epochs",), "--keep-epochs off")):
        result = cli("train", caches, "--out", out, "--resume", "--epochs", 2, *bad)
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert "config.json" in text and named in text and "--epochs" in text
        assert f"drop {' '.join(map(str, bad))}," in text  # what was given, as it was typed
    for flag in ((other,), (caches, "--val", other)):
        result = cli("train", *flag, "--out", out, "--resume", "--epochs", 2)
        assert result.exit_code == 2 and "config.json" in result.output and "other" in result.output, result.output
    assert len(history(out)) == 1  # nothing was trained by the refused commands
    # the same values again are no contradiction; no caches at all: those of config.json
    same = cli("train", "--out", out, "--resume", "--epochs", 2, "--task", "seg", "--batch-size", 4)
    assert same.exit_code == 0, same.output
    rows = history(out)
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[1]["val_jac"] != ""  # still validated
    resumed_line = (out / "command.txt").read_text().splitlines()[-1]
    assert "--augment" not in resumed_line  # command.txt logs what was given, not defaults it did not use
    # an on/off option given off: the run's setting reads "--dice on", the command as it was typed
    with_dice = tmp_path / "dice"
    assert cli("train", caches, "--task", "seg", "--out", with_dice, "--epochs", 1, "--dice", *TINY_CLI).exit_code == 0
    refused = cli("train", "--out", with_dice, "--resume", "--epochs", 2, "--no-dice")
    text = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "this run has --dice on," in text and "drop --no-dice," in text, text
    assert cli("train", "--out", with_dice, "--resume", "--epochs", 2, "--dice").exit_code == 0  # the same: no contradiction
    # a run without --val was resumed with one, its epochs then chosen on a set never recorded or checked
    refused = cli("train", "--out", with_dice, "--resume", "--epochs", 3, "--val", caches)
    assert refused.exit_code == 2 and "this run trains without --val" in " ".join(refused.output.split())


class Trap:
    """Counts the checkpoint module's file operations and raises KeyboardInterrupt just before
    (or, with after=True, just after) operation number `at`."""

    def __init__(self, monkeypatch):
        from dermtool import checkpoint

        self.calls, self.at, self.after = 0, None, False
        for name in checkpoint.WRITERS:
            monkeypatch.setattr(checkpoint, name, self._wrap(getattr(checkpoint, name)))

    def _wrap(self, original):
        def call(*args, **kwargs):
            self.calls += 1
            hit = self.calls == self.at
            if hit and not self.after:
                raise KeyboardInterrupt
            result = original(*args, **kwargs)
            if hit:
                raise KeyboardInterrupt
            return result
        return call

    def arm(self, at, after=False):
        self.calls, self.at, self.after = 0, at, after


@pytest.mark.parametrize("improved, keep", [(True, False), (False, False), (True, True)])
def test_an_interrupt_at_any_checkpoint_write_leaves_one_whole_epoch(tmp_path, monkeypatch, improved, keep):
    """Ctrl-C before and after every file operation of epoch 2's checkpoint (and before epoch 1's
    first): after the tidy that train runs on an interrupt, RUN holds exactly epoch 1 or epoch 2,
    and committing the epoch again gives the uninterrupted run's files. With `keep` (train
    --keep-epochs), epochs/ holds a model folder for each committed epoch and for no other."""
    import keras

    from dermtool import checkpoint

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    fields = ["epoch", "loss"]

    def epoch(run_dir, e):
        model.set_weights([np.full_like(w, e) for w in model.get_weights()])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text('{"run": "%s"}' % run_dir.name)
        checkpoint.commit(run_dir, model, {"epoch": e, "lr": 0.1 / e}, {"epoch": e, "loss": 1.0 / e}, fields,
                          improved=improved or e == 1, keep=keep)

    def kept_ok(run_dir, epochs):
        names = sorted(p.name for p in (run_dir / "epochs").iterdir()) if (run_dir / "epochs").exists() else []
        assert names == ([f"epoch-{e:03d}" for e in range(1, epochs + 1)] if keep else [])  # no .tmp left
        for e in range(1, epochs + 1) if keep else ():
            assert weights(run_dir / "epochs" / f"epoch-{e:03d}" / "model.weights.h5") == {float(e)}
            assert (run_dir / "epochs" / f"epoch-{e:03d}" / "config.json").read_text() == '{"run": "%s"}' % run_dir.name

    def weights(path):
        model.load_weights(str(path))
        return {float(w.flat[0]) for w in model.get_weights()}

    trap = Trap(monkeypatch)
    epoch(tmp_path / "straight", 1)
    first = trap.calls
    epoch(tmp_path / "straight", 2)
    second = trap.calls - first
    assert first >= 8 and second >= 8
    cases = [(1, False)] + [(k, False) for k in range(1, second + 1)] + [(second, True)]
    for n, (at, after) in enumerate(cases):
        run_dir = tmp_path / f"cut{n}"
        trap.arm(None)
        if n:
            epoch(run_dir, 1)
        trap.arm(at, after)
        with pytest.raises(KeyboardInterrupt):
            epoch(run_dir, 2 if n else 1)
        trap.arm(None)
        checkpoint.tidy(run_dir)
        state = checkpoint.read_state(run_dir)
        kept = 0 if state is None else state["epoch"]
        assert kept in ((0,) if n == 0 else (1, 2)), (at, after)
        if kept:
            assert weights(run_dir / "last.weights.h5") == {float(kept)}, (at, after)
            assert weights(run_dir / "best.weights.h5") == {float(kept if improved else 1)}, (at, after)
            assert [int(r["epoch"]) for r in history(run_dir)] == list(range(1, kept + 1)), (at, after)
            assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"epoch-{kept:03d}"], (at, after)
        kept_ok(run_dir, kept)
        if not kept:
            checkpoint.start_fresh(run_dir)  # what train does when it starts over
            epoch(run_dir, 1)
        if kept < 2:
            epoch(run_dir, 2)  # the resumed run commits epoch 2
        for name in ("last.weights.h5", "best.weights.h5"):
            assert weights(run_dir / name) == weights(tmp_path / "straight" / name), (at, after, name)
        assert history(run_dir) == history(tmp_path / "straight"), (at, after)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-002"], (at, after)
        kept_ok(run_dir, 2)


def test_an_interrupt_in_an_epochs_checkpoint_resumes_to_the_uninterrupted_run(caches, tmp_path, monkeypatch):
    """The same, through train: Ctrl-C just before and just after the commit of epoch 2 (the state.json
    rename), then --resume, gives the uninterrupted run's weights and history."""
    from dermtool import checkpoint

    trap = Trap(monkeypatch)
    cfg = tiny("seg", dropout=0.0)
    straight = run(caches, tmp_path / "straight", "seg", epochs=2, cfg=cfg)
    writes = trap.calls
    want_last, want_best = weights_of(straight / "last.weights.h5", cfg), weights_of(straight / "best.weights.h5", cfg)
    want_rows = [{k: v for k, v in r.items() if k != "seconds"} for r in history(straight)]
    renames = []  # the operation numbers of the second epoch's state.json rename
    original = checkpoint._rename

    def spy(source, target):
        if Path(target).name == "state.json":
            renames.append(trap.calls + 1)  # the number this call gets
        return original(source, target)

    monkeypatch.setattr(checkpoint, "_rename", spy)
    trap.arm(None)
    run(caches, tmp_path / "count", "seg", epochs=2, cfg=cfg)
    assert trap.calls == writes and len(renames) == 2
    for at, after, kept in ((renames[1], False, 1), (renames[1], True, 2)):
        out = tmp_path / f"cut{at}{'a' if after else ''}"
        trap.arm(at, after)
        with pytest.raises(KeyboardInterrupt):
            run(caches, out, "seg", epochs=2, cfg=cfg)
        trap.arm(None)
        assert json.loads((out / "state.json").read_text())["epoch"] == kept
        resumed = run(caches, out, "seg", epochs=2, resume=True, cfg=cfg)
        assert [{k: v for k, v in r.items() if k != "seconds"} for r in history(resumed)] == want_rows
        for a, b in zip(weights_of(resumed / "last.weights.h5", cfg), want_last):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(weights_of(resumed / "best.weights.h5", cfg), want_best):
            np.testing.assert_array_equal(a, b)
        assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["epoch-002"]


def test_ctrl_c_in_train_says_what_was_kept_and_how_to_continue(caches, tmp_path, monkeypatch):
    import shlex

    from dermtool.train import EpochEnd

    begin = EpochEnd.on_epoch_begin

    def interrupt_epoch_2(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt
        return begin(self, epoch, logs)

    monkeypatch.setattr(EpochEnd, "on_epoch_begin", interrupt_epoch_2)
    out = tmp_path / "run"
    result = cli("train", caches, "--val", caches, "--task", "seg", "--out", out, "--epochs", 3, *TINY_CLI)
    assert result.exit_code == 130, result.output
    message = " ".join(result.output.split())
    assert "epoch 1 of 3" in message and "best epoch 1" in message, message
    command = f"dermtool train --out {shlex.quote(str(out))} --resume"
    assert command in message
    monkeypatch.setattr(EpochEnd, "on_epoch_begin", begin)
    again = cli(*shlex.split(command)[1:])
    assert again.exit_code == 0, again.output
    assert [r["epoch"] for r in history(out)] == ["1", "2", "3"]


def test_resume_loads_the_checkpoint_without_a_false_optimizer_warning(caches, tmp_path):
    import warnings

    cfg = tiny("seg", dropout=0.0)
    run(caches, tmp_path / "r", "seg", epochs=1, cfg=cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(caches, tmp_path / "r", "seg", epochs=2, resume=True, cfg=cfg)
    assert not [w for w in caught if "optimizer" in str(w.message)], [str(w.message) for w in caught]


def test_train_out_naming_a_file_is_one_sentence(caches, tmp_path):
    target = tmp_path / "run.txt"
    target.write_text("not a folder")
    result = cli("train", caches, "--out", target, *TINY_CLI)
    assert result.exit_code == 2 and "not a folder" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option, value", [
    ("--base-filters", 0), ("--learning-rate", -1), ("--learning-rate", 0), ("--size", 100000), ("--size", 8),
    ("--depth", 0), ("--batch-size", 0), ("--epochs", 0), ("--steps-per-epoch", -1), ("--alpha", 1.5)])
def test_train_checks_option_ranges_up_front_with_the_reason(caches, tmp_path, option, value):
    result = cli("train", caches, "--out", tmp_path / "r", *TINY_CLI, option, value)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"{option} must be" in message and "(" in message, message  # the range and why
    assert not (tmp_path / "r").exists()


def test_multiworker_strategy_is_refused_with_the_reason(caches, tmp_path):
    result = cli("train", caches, "--out", tmp_path / "r", *TINY_CLI, "--strategy", "multiworker")
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "multiworker" in message and "removed" in message and "mirrored" in message, message
    assert not (tmp_path / "r").exists()


def test_init_from_a_run_whose_layers_all_differ_is_refused(caches, tmp_path):
    """A run of another width shares layer names but no shape: 0 layers would be copied."""
    from dermtool.config import save_config
    from dermtool.errors import InputError
    from dermtool.models import build_model

    other = tmp_path / "wide"
    other.mkdir()
    wide = tiny("seg", base_filters=8)
    save_config(other / "config.json", wide)
    build_model(wide).save_weights(str(other / "best.weights.h5"))
    with pytest.raises(InputError, match=f"{other}.*no layer.*name and shape"):
        run(caches, tmp_path / "r", "seg", epochs=1, init_from=str(other))
    assert not (tmp_path / "r" / "best.weights.h5").exists()


# --- files of a run (issue 18) -------------------------------------------------------------------


def test_a_run_whose_last_epoch_was_not_its_best_leaves_no_temporary_file(tmp_path):
    """Renaming best.weights.h5.tmp onto best.weights.h5, two links to one file, does nothing:
    the .tmp stayed in the run folder."""
    import keras

    from dermtool import checkpoint

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    fields = ["epoch", "loss"]
    for epoch, improved in ((1, True), (2, False), (3, False)):
        checkpoint.commit(tmp_path, model, {"epoch": epoch, "best_epoch": 1}, {"epoch": epoch, "loss": 1.0 * epoch},
                          fields, improved=improved)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "best.weights.h5", "checkpoints", "history.csv", "last.weights.h5", "state.json"], epoch
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-003"]
    assert (tmp_path / "history.csv").read_text() == "epoch,loss\n1,1.0\n2,2.0\n3,3.0\n"
    assert os.path.samefile(tmp_path / "best.weights.h5", tmp_path / "checkpoints" / "epoch-003" / "best.weights.h5")


@pytest.mark.parametrize("case", ["out_under_a_file", "disk_full", "disk_full_h5py"])
def test_a_run_that_cannot_be_written_is_one_line(case, caches, tmp_path, monkeypatch, under_a_file, no_space):
    """All were tracebacks: OSError, and h5py's RuntimeError for a disk that fills while it writes."""
    import keras

    import dermtool.checkpoint

    def full(model, path):
        raise no_space(path)

    def h5py_full(self, path, *args, **kwargs):  # h5py's words, as a real full disk gave them
        raise RuntimeError("Disable slist on flush dest failure failed (file write failed: errno = 28, "
                           "error message = 'No space left on device')")

    if case == "disk_full":
        monkeypatch.setattr(dermtool.checkpoint, "_save_weights", full)
    if case == "disk_full_h5py":
        monkeypatch.setattr(keras.Model, "save_weights", h5py_full)
        case = "disk_full"
    out = under_a_file if case == "out_under_a_file" else tmp_path / "run"
    result = cli("train", caches, "--val", caches, "--out", out, "--task", "seg", "--epochs", 1, *TINY_CLI)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error:") and "Traceback" not in result.output, result.output
    assert "cannot write the run" in line and UNWRITABLE[case] in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_sigterm_ends_the_train_process_with_its_run_committed(caches, tmp_path, workers):
    """A scheduler's SIGTERM to `dermtool train`: exit 130 with the last whole epoch kept. The
    process leaves with os._exit once that is so (a tf.data teardown once hung after the line),
    after stopping its batch workers (--workers 2: orphans of os._exit held the output open)."""
    import signal
    import subprocess
    import sys
    import time

    from dermtool.checkpoint import read_state

    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "dermtool", "train", str(caches), "--out", str(out), "--task",
                             "seg", "--epochs", "100000", "--workers", workers, *map(str, TINY_CLI)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        limit = time.monotonic() + 300  # a safety limit, not a timing: the first epoch takes seconds
        while not (out / "state.json").exists() and proc.poll() is None and time.monotonic() < limit:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted:" in output and "--resume" in output and "Traceback" not in output, output
    assert read_state(out)["epoch"] >= 1


def test_seg_batch_runs_the_shared_decoder_on_the_first_images_only(caches, tmp_path):
    from dermtool.models import build_models

    cfg = tiny("joint")
    model, train_model = build_models(cfg, seg_batch=2)
    assert train_model is not model
    assert {l.name for l in model.layers if l.weights} == {l.name for l in train_model.layers if l.weights}
    x = np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    full, part = model(x, training=False), train_model(x, training=False)
    assert part["seg"].shape[0] == 2 and part["cls"].shape[0] == 4
    np.testing.assert_allclose(np.asarray(part["seg"]), np.asarray(full["seg"])[:2], atol=1e-6)
    np.testing.assert_allclose(np.asarray(part["cls"]), np.asarray(full["cls"]), atol=1e-6)
    seg_model, seg_train = build_models(tiny("seg"), seg_batch=2)
    assert seg_train is seg_model  # only a joint model has a decoder to spare

    out = run(caches, tmp_path / "r", "joint", epochs=1, seg_batch=2)
    trained = build_models(cfg)[0]
    trained.load_weights(str(out / "best.weights.h5"))  # the saved model is the plain one
    assert load_config(out)[1].seg_batch == 2
    resumed = run(caches, tmp_path / "r", "joint", epochs=2, resume=True)  # slots line up on resume
    assert [int(r["epoch"]) for r in history(resumed)] == [1, 2]


def test_seg_batch_trains_the_decoder_from_those_images_only(caches):
    from dermtool.train import BatchSource
    from dermtool.dataset import TrainingSet, steps_per_epoch

    cfg = tiny("joint")
    data = TrainingSet([load_cache(caches)], [False])
    tcfg = TrainConfig(batch_size=4, seg_batch=3, augment="none")
    x, y = BatchSource(data, cfg, tcfg, steps_per_epoch(len(data), 4, 0)).batch(0, 0)
    assert x.shape[0] == 4 and y["cls"].shape[0] == 4 and y["seg"].shape[0] == 3


def test_seg_batch_under_two_replicas_takes_the_first_images_of_each_replicas_slice(caches):
    # a strategy splits the batch into equal slices, one per device, and each device's decoder runs
    # on the first seg_batch / replicas images of its slice: the targets must be those images' masks
    from dermtool.train import BatchSource
    from dermtool.dataset import TrainingSet, steps_per_epoch

    cfg = tiny("joint")
    data = TrainingSet([load_cache(caches)], [False])
    tcfg = TrainConfig(batch_size=8, seg_batch=4, augment="none")
    steps = steps_per_epoch(len(data), 8, 0)
    _, whole = BatchSource(data, cfg, replace(tcfg, seg_batch=0), steps).batch(0, 0)
    _, split = BatchSource(data, cfg, tcfg, steps, replicas=2).batch(0, 0)
    np.testing.assert_array_equal(split["seg"], whole["seg"][[0, 1, 4, 5]])
    _, one = BatchSource(data, cfg, tcfg, steps).batch(0, 0)
    np.testing.assert_array_equal(one["seg"], whole["seg"][:4])


MIRRORED_ON_TWO_CPUS = """
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from dermtool.config import TrainConfig, preset_config
from dermtool.models import build_model
from dermtool.train import train

cache, out = Path(sys.argv[1]), Path(sys.argv[2])
mirrored = tf.distribute.MirroredStrategy
cfg = preset_config("compact", "joint", size=32, base_filters=4, depth=2, dropout=0.0)
tcfg = dict(batch_size=8, seg_batch=4, consistency=1.0, learning_rate=3e-3, seed=3, augment="flips",
            strategy="mirrored")
with mock.patch.object(tf.distribute, "MirroredStrategy", lambda: mirrored(["/cpu:0", "/cpu:1"])):
    for name, epochs, resume in (("straight", 2, False), ("part", 1, False), ("part", 2, True)):
        train(cfg, TrainConfig(epochs=epochs, **tcfg), cache, cache, out / name, resume=resume,
              log=print, progress=False)
a, b = build_model(cfg), build_model(cfg)
a.load_weights(str(out / "straight" / "last.weights.h5"))
b.load_weights(str(out / "part" / "last.weights.h5"))
assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights())), "resumed != straight"
print("replicas", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).num_replicas_in_sync)
"""


def test_mirrored_on_two_devices_splits_seg_batch_and_pairs_and_resumes_exactly(caches, tmp_path):
    # two logical CPUs stand in for two GPUs: each replica gets half of each batch (whole pairs
    # under --consistency) and the decoder's targets of its own images; the resume builds the
    # optimizer's mirrored slots inside the strategy's scope
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MIRRORED_ON_TWO_CPUS, str(caches), str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replicas 2" in done.stdout
    assert "the decoder trains on 4 of each batch's 8 images" in done.stdout
    assert [int(r["epoch"]) for r in history(tmp_path / "part")] == [1, 2]


def test_seg_batch_under_two_replicas_needs_an_even_share(caches, tmp_path, monkeypatch):
    import tensorflow as tf

    from dermtool.errors import InputError

    class TwoReplicas:
        num_replicas_in_sync = 2

        def scope(self):
            raise AssertionError("refused before any model is built")

    monkeypatch.setattr(tf.distribute, "MirroredStrategy", TwoReplicas)
    with pytest.raises(InputError, match="--seg-batch with 2 GPUs needs .* multiples of 2.*not 4 and 3"):
        run(caches, tmp_path / "r", "joint", epochs=1, strategy="mirrored", seg_batch=3)
    assert not (tmp_path / "r").exists()


def test_mixed_precision_trains_resumes_exactly_and_leaves_float32_behind(caches, tmp_path, monkeypatch):
    # the GPU path on the CPU: float16 compute under a loss-scale wrapper, whose variables (scale and
    # counter) each checkpoint holds; --seg-batch builds the optimizer before the resume loads it
    import keras

    from dermtool import _tf
    from dermtool.models import build_model

    monkeypatch.setattr(_tf, "gpu_count", lambda: 1)
    cfg = tiny("joint", dropout=0.0)
    over = {"cfg": cfg, "mixed_precision": True, "seg_batch": 2, "ema": 0.5}
    straight = run(caches, tmp_path / "straight", "joint", epochs=2, **over)
    run(caches, tmp_path / "part", "joint", epochs=1, **over)
    resumed = run(caches, tmp_path / "part", "joint", epochs=2, resume=True, **over)
    assert_same_weights(cfg, straight, resumed)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert build_model(cfg).compute_dtype == "float32"


def test_ema_validates_and_keeps_the_average_and_resumes_exactly(caches, tmp_path):
    from dermtool.models import build_model

    cfg = tiny("seg", dropout=0.0)
    plain = run(caches, tmp_path / "plain", "seg", epochs=2, cfg=cfg)
    straight = run(caches, tmp_path / "straight", "seg", epochs=2, cfg=cfg, ema=0.5)
    run(caches, tmp_path / "part", "seg", epochs=1, cfg=cfg, ema=0.5)
    resumed = run(caches, tmp_path / "part", "seg", epochs=2, resume=True, cfg=cfg)
    weights = {}
    for name, folder in (("plain", plain), ("straight", straight), ("resumed", resumed)):
        m = build_model(cfg)
        m.load_weights(str(folder / "last.weights.h5"))
        weights[name] = m.get_weights()
    for wa, wb in zip(weights["straight"], weights["resumed"]):
        np.testing.assert_array_equal(wa, wb)
    assert any(not np.array_equal(a, b) for a, b in zip(weights["plain"], weights["straight"]))


@pytest.mark.parametrize("freeze, depth, frozen, trained", [
    ("stem", 2, {"block1"}, "enc_block2_conv1"),
    ("early", 3, {"block1", "block2"}, "enc_block3_conv1"),
])
def test_freeze_stem_or_early_keeps_the_first_stages_and_trains_the_rest(caches, tmp_path, freeze, depth, frozen,
                                                                        trained):
    from dermtool.models import build_model, early_layer_names, stem_layer_names

    cfg = tiny("cls", depth=depth)
    init = run(caches, tmp_path / "init", "cls", epochs=1, cfg=cfg)
    out = run(caches, tmp_path / freeze, "cls", epochs=1, cfg=cfg, init_from=str(init), freeze=freeze)
    before, after = build_model(cfg), build_model(cfg)
    before.load_weights(str(init / "best.weights.h5"))
    after.load_weights(str(out / "last.weights.h5"))
    kept = (stem_layer_names if freeze == "stem" else early_layer_names)(after)
    assert set(stem_layer_names(after)) <= set(kept)
    assert {n.split("_")[1] for n in kept} == frozen
    for name in kept:
        for a, b in zip(before.get_layer(name).get_weights(), after.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(before.get_layer(trained).get_weights()[0], after.get_layer(trained).get_weights()[0])


def test_freeze_encoder_and_decoder_refits_only_the_classifier_head_and_keeps_the_masks(caches, tmp_path):
    # a joint model's diagnosis re-fitted on new data: every other weight, batch-norm moving
    # statistics included, stays as it was, so the masks do not move
    from dermtool.errors import InputError
    from dermtool.models import build_model

    cfg = tiny("joint")
    init = run(caches, tmp_path / "init", "joint", epochs=1, cfg=cfg)
    out = run(caches, tmp_path / "head", "joint", epochs=2, cfg=cfg, init_from=str(init),
              freeze="encoder+decoder", alpha=0.0)
    before, after = build_model(cfg), build_model(cfg)
    before.load_weights(str(init / "best.weights.h5"))
    after.load_weights(str(out / "last.weights.h5"))
    assert any(type(l).__name__ == "BatchNormalization" for l in after.layers)
    for layer in after.layers:
        if layer.name.startswith("cls"):  # the head: its dense layers and the softmax read-out
            continue
        for a, b in zip(before.get_layer(layer.name).get_weights(), layer.get_weights()):
            np.testing.assert_array_equal(a, b, err_msg=layer.name)
    assert not np.array_equal(before.get_layer("cls").get_weights()[0], after.get_layer("cls").get_weights()[0])
    x = np.random.default_rng(0).uniform(0, 1, (2, cfg.input_size, cfg.input_size, 3)).astype("float32")
    np.testing.assert_array_equal(before.predict(x, verbose=0)["seg"], after.predict(x, verbose=0)["seg"])
    # from the command line the source's lesion view comes along unless --cls-views is given;
    # its calibration does not (fitted to the old head)
    from typer.testing import CliRunner

    from dermtool.cli import app

    source_cfg = json.loads((init / "config.json").read_text())
    source_cfg["model"].update(cls_views="frame+lesion", temperature=0.5)
    (init / "config.json").write_text(json.dumps(source_cfg))
    shape = ["--task", "joint", "--preset", "compact", "--size", str(SIZE), "--base-filters", "4", "--depth", "2"]
    for name, views, expected in (("kept", [], "frame+lesion"), ("given", ["--cls-views", "frame"], "frame")):
        result = CliRunner().invoke(app, ["train", str(caches), "--out", str(tmp_path / name), *shape, *views,
                                          "--init-from", str(init), "--freeze", "encoder+decoder", "--alpha", "0",
                                          "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "4",
                                          "--augment", "none"])
        assert result.exit_code == 0, result.output
        model_cfg = load_config(tmp_path / name)[0]
        assert (model_cfg.cls_views, model_cfg.temperature) == (expected, 1.0)

    # an encoder kept frozen on inputs prepared otherwise than it learned from: refused, nothing written
    other = tiny("joint", color_constancy="shades-of-gray")
    with pytest.raises(InputError, match="--color-constancy none there, shades-of-gray here"):
        run(caches, tmp_path / "other", "joint", epochs=1, cfg=other, init_from=str(init), freeze="encoder+decoder")
    assert not (tmp_path / "other").exists()


def test_freeze_early_on_lite0_names_the_stages_at_half_and_quarter_size():
    from dermtool.models import build_model, early_layer_names

    model = build_model(preset_config("lite0", "cls", size=64, pretrained=False))
    early = early_layer_names(model)
    shapes = {model.get_layer(n).output.shape[1] for n in early}
    assert {n.split("_")[1] for n in early} == {"stem", "mb0", "mb1", "mb2"}
    assert min(shapes) == 64 // 4 and max(shapes) == 64 // 2


@pytest.mark.parametrize("args, words", [
    (["--ema", "1.5"], "--ema must be 0"),
    (["--task", "cls", "--seg-batch", "2"], "--seg-batch applies to --task joint"),
    (["--seg-batch", "20", "--batch-size", "4"], "--seg-batch must be from 1 to the batch size"),
    (["--freeze", "head"], "--freeze must be one of"),
    (["--task", "seg", "--freeze", "encoder+decoder"], "leaves --task seg nothing to train"),
    (["--task", "joint", "--freeze", "encoder+decoder", "--alpha", "1"], "nothing would learn; use --alpha 0"),
    (["--task", "cls", "--cls-views", "frame+lesion"], "--cls-views frame+lesion needs --task joint"),
    (["--cls-views", "lesion"], "--cls-views must be one of"),
    (["--consistency", "1", "--batch-size", "5"], "--consistency needs an even --batch-size"),
    (["--consistency", "1", "--task", "seg"], "--task seg has none"),
    (["--consistency", "-1"], "--consistency must be between 0.0 and 100.0"),
    (["--consistency", "nan"], "--consistency must be between"),
    (["--augment", "flips+pair-flips"], "--augment pair-flips turns the second image of each consistency pair"),
    (["--augment", "flips+pair-anchor"], "--augment pair-anchor makes the first image of each consistency pair"),
    (["--augment", "flips+mixup", "--task", "seg"], "--augment mixup blends the diagnosis targets of two images"),
])
def test_train_refuses_bad_seg_batch_ema_and_freeze(caches, tmp_path, args, words):
    from typer.testing import CliRunner

    from dermtool.cli import app

    result = CliRunner().invoke(app, ["train", str(caches), "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and words in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()


def test_progressive_phases_share_the_epochs_and_end_at_the_models_size():
    from dermtool.train import progressive_phases

    lite = preset_config("lite0", "joint")  # 192 px
    assert progressive_phases(lite, TrainConfig(epochs=7, progressive=128)) == [
        (128, 0, 2), (160, 2, 4), (192, 4, 7)]
    assert progressive_phases(lite, TrainConfig(epochs=7)) == [(192, 0, 7)]
    assert progressive_phases(lite, TrainConfig(epochs=2, progressive=128)) == [(160, 0, 1), (192, 1, 2)]


def test_shrink_batch_keeps_a_missing_mask_missing():
    from dermtool.augment import MISSING
    from dermtool.train import shrink_batch

    x = np.zeros((2, 8, 8, 3), np.float32)
    x[:, :4] = 200.0
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, :4] = 1
    masks[1] = MISSING
    small, small_masks = shrink_batch(x, masks, 4)
    assert small.shape == (2, 4, 4, 3) and (small[:, 0] == 200).all() and (small[:, 3] == 0).all()
    np.testing.assert_array_equal(small_masks[0], np.repeat([[1], [1], [0], [0]], 4, axis=1))
    assert (small_masks[1] == MISSING).all()


def test_progressive_training_resumes_across_phases_to_the_uninterrupted_run(caches, tmp_path, monkeypatch):
    from dermtool import train as train_module

    cfg = tiny("seg", dropout=0.0)  # 32 px, depth 2: it trains on 16 px squares first
    straight = run(caches, tmp_path / "straight", "seg", epochs=2, cfg=cfg, progressive=16)
    assert [int(r["epoch"]) for r in history(straight)] == [1, 2]
    committed = train_module.EpochEnd.on_epoch_end

    def stop_after_the_first(self, epoch, logs=None):  # Ctrl-C once epoch 1 is saved
        committed(self, epoch, logs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.EpochEnd, "on_epoch_end", stop_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        run(caches, tmp_path / "part", "seg", epochs=2, cfg=cfg, progressive=16)
    monkeypatch.undo()
    assert len(history(tmp_path / "part")) == 1
    resumed = run(caches, tmp_path / "part", "seg", epochs=2, resume=True, cfg=cfg)
    assert_same_weights(cfg, straight, resumed)


def test_progressive_refuses_a_side_the_network_cannot_take(caches, tmp_path):
    from dermtool.errors import InputError

    with pytest.raises(InputError, match="--progressive must be a multiple of 4 from 4 to below"):
        run(caches, tmp_path / "r", "seg", epochs=2, progressive=18)
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def one_epoch_seg_run(caches, tmp_path_factory):
    """A finished one-epoch seg run; tests that damage it work on a copy (training once, not per case)."""
    return run(caches, tmp_path_factory.mktemp("one-epoch") / "r", "seg", epochs=1)


@pytest.mark.parametrize("key, value, words", [
    ("ema", 1.5, "train.ema must be 0 (off) or a momentum from 0.5 to below 1"),
    ("seg_batch", -2, "train.seg_batch must be a whole number"),
    ("progressive", "big", "train.progressive must be a whole number"),
    ("freeze", "head", "train.freeze must be one of"),
    ("consistency", -1, "train.consistency must be a weight from 0 (off) to 100"),
    ("augment", "flips+pair-anchor", "train.augment: pair-anchor changes the consistency pairs"),
    ("keep_epochs", "yes", "train.keep_epochs must be true or false"),
])
def test_a_damaged_train_setting_in_config_json_is_refused_on_resume(one_epoch_seg_run, tmp_path, key, value, words):
    from typer.testing import CliRunner

    from dermtool.cli import app

    out = tmp_path / "r"
    shutil.copytree(one_epoch_seg_run, out)
    config = json.loads((out / "config.json").read_text())
    config["train"][key] = value
    (out / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--resume", "--epochs", "2"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and words in text and str(out / "config.json") in text
    assert len(history(out)) == 1


def test_consistency_batches_hold_each_image_twice_with_one_geometry(caches):
    from dermtool.dataset import TrainingSet, steps_per_epoch
    from dermtool.train import BatchSource

    cfg = tiny("joint")
    data = TrainingSet([load_cache(caches)], [False])
    tcfg = TrainConfig(batch_size=6, augment="flips+geometry+color", consistency=1.0, seed=4)
    source = BatchSource(data, cfg, tcfg, steps_per_epoch(len(data), 6, 0))
    x, y = source.batch(0, 1)
    assert x.shape[0] == 6 and y["cls"].shape[0] == 6 and y["seg"].shape[0] == 6
    order = source.order(0)
    images, masks, labels = data.read(order[6:9], cfg)  # step 1: the next half batch of images
    want = np.zeros((3, len(cfg.class_names)), np.float32)
    want[np.arange(3), labels] = 1
    np.testing.assert_array_equal(y["cls"], np.repeat(want, 2, axis=0))
    # one crop, rotation and flip per pair: away from the edges the two masks agree once one is moved
    # by the difference of the pixel jitter's two shifts
    from dermtool.augment import PAIR_SHIFT_MAX, shift_edge

    k = 2 * PAIR_SHIFT_MAX
    for a, b in zip(y["seg"][0::2], y["seg"][1::2]):
        assert any(np.array_equal(shift_edge(a, dy, dx)[k:-k, k:-k], b[k:-k, k:-k])
                   for dy in range(-k, k + 1) for dx in range(-k, k + 1))
    x2, _ = BatchSource(data, cfg, tcfg, steps_per_epoch(len(data), 6, 0)).batch(0, 1)
    np.testing.assert_array_equal(x, x2)  # seeded


def test_consistency_trains_records_its_weight_and_resumes_only_with_it(caches, tmp_path):
    out = run(caches, tmp_path / "r", "cls", epochs=1, consistency=2.0)
    assert load_config(out / "config.json")[1].consistency == 2.0
    assert np.isfinite(float(history(out)[0]["loss"]))
    result = cli("train", "--out", out, "--resume", "--epochs", 2, "--consistency", 1)
    assert result.exit_code == 2 and "--consistency 2.0" in " ".join(result.output.split())


@pytest.mark.parametrize("augment", ["flips+mixup", "flips+pair-anchor"])
def test_a_joint_run_trains_with_mixup_or_anchored_pairs_and_records_it(caches, tmp_path, augment, monkeypatch):
    import dermtool.losses

    built, real = [], dermtool.losses.with_consistency

    def spy(*args, **kwargs):
        losses = real(*args, **kwargs)
        built.append(losses["cls"])
        return losses

    monkeypatch.setattr(dermtool.losses, "with_consistency", spy)
    out = run(caches, tmp_path / "r", "joint", epochs=1, consistency=1.0, augment=augment)
    assert load_config(out / "config.json")[1].augment == augment
    assert [loss.anchored for loss in built] == ["pair-anchor" in augment]  # the pair loss the run trained with
    row = history(out)[0]
    assert np.isfinite(float(row["loss"])) and np.isfinite(float(row["val_loss"]))


# --- refusals found by a hostile test of train ----------------------------------------------------


def _cli(*args):
    from typer.testing import CliRunner

    from dermtool.cli import app

    return CliRunner().invoke(app, ["train", *map(str, args)])


@pytest.mark.parametrize("args, words", [
    (["--task", "seg", "--alpha", "0.2"], "--task seg has only the mask loss"),
    (["--task", "cls", "--dice"], "--task cls has no masks"),
    (["--task", "cls", "--alpha", "0.9"], "--task cls has only the class loss"),
    (["--task", "cls", "--freeze", "decoder"], "--task cls has no decoder"),
    (["--size", "48", "--depth", "5"], "--size 48 must be a multiple of 2**depth = 32 (--depth 5"),
    (["--progressive", "-32"], "--progressive must be 0 (off)"),
    (["--augment", ""], "--augment is empty; give none"),
    (["--seed", str(2**32)], "--seed"),
])
def test_train_refuses_options_that_mean_nothing_for_the_task(caches, tmp_path, args, words):
    result = _cli(caches, "--out", tmp_path / "r", *args)
    assert result.exit_code == 2 and words in " ".join(result.output.split()), result.output
    assert not (tmp_path / "r").exists()


def test_the_run_names_the_metric_its_epoch_was_chosen_on(caches, tmp_path):
    """A joint run whose --val has no masks chose on melanoma AUC and called it val_mean_performance."""
    from dermtool.checkpoint import read_state
    from dermtool.train import train

    data = write_dataset(tmp_path / "data", 6, rng_seed=8, sizes=[(48, 64)], formats=("png",))
    shutil.rmtree(data / "masks")
    build_cache(resolve_layout(data), tmp_path / "nomask", size=SIZE, fit="squash", progress=False)
    lines = []
    tcfg = TrainConfig(epochs=1, batch_size=4, augment="none", steps_per_epoch=1)
    train(tiny("joint"), tcfg, caches, tmp_path / "nomask", tmp_path / "r", log=lines.append, progress=False)
    state = read_state(tmp_path / "r")
    assert state["best_by"] == "val_mel_auc"
    assert f"(val_mel_auc {state['best_metric']:.4f})" in lines[-1]
    train(tiny("joint"), tcfg, caches, [caches, tmp_path / "nomask"], tmp_path / "r2", log=lambda m: None,
          progress=False)
    assert read_state(tmp_path / "r2")["best_by"] == "mean of val_mean_performance, val2_mel_auc"


def test_a_batch_larger_than_the_training_set_is_noted(caches, tmp_path):
    """--batch-size 1024 on 24 images trained 43 passes an epoch without a word."""
    from dermtool.train import train

    lines = []
    n = len(load_cache(caches))
    train(tiny("seg"), TrainConfig(epochs=1, batch_size=4 * n, augment="none"), caches, None, tmp_path / "r",
          log=lines.append, progress=False)
    assert f"note: --batch-size {4 * n} is more than the {n} training images" in " ".join(lines)
    assert "(about 4 times each)" in " ".join(lines)


def test_a_validation_cache_with_nothing_to_score_is_refused(caches, tmp_path):
    """Its loss was 0 every epoch and epoch 1 stayed the best."""
    from dermtool.errors import InputError
    from dermtool.train import train

    data = write_dataset(tmp_path / "data", 4, rng_seed=8, sizes=[(48, 64)], formats=("png",))
    shutil.rmtree(data / "masks")
    build_cache(resolve_layout(data), tmp_path / "nomask", size=SIZE, fit="squash", progress=False)
    tcfg = TrainConfig(epochs=1, batch_size=4, augment="none")
    with pytest.raises(InputError, match="the --val cache has no masks, so it cannot score a seg model"):
        train(tiny("seg"), tcfg, caches, tmp_path / "nomask", tmp_path / "r", log=lambda m: None, progress=False)
    assert not (tmp_path / "r").exists()


def test_resume_refuses_a_cache_rebuilt_from_other_data(caches, tmp_path):
    """The run went on, on relabelled images, without a word."""
    from dermtool.errors import InputError
    from dermtool.train import train

    cache = Path(shutil.copytree(caches, tmp_path / "cache"))
    tcfg = TrainConfig(epochs=1, batch_size=4, augment="none", seed=3)
    train(tiny("seg"), tcfg, cache, [], tmp_path / "r", log=lambda m: None, progress=False)
    meta = json.loads((cache / "cache.json").read_text())
    (cache / "cache.json").write_text(json.dumps({**meta, "fingerprint": "a fresh copy: new file times"}))
    train(None, TrainConfig(epochs=2), [], [], tmp_path / "r", resume=True, log=lambda m: None, progress=False)
    rows = list(csv.DictReader(open(cache / "manifest.csv")))
    rows[0]["class_index"] = str((int(rows[0]["class_index"]) + 1) % 3)  # relabelled
    with open(cache / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(InputError, match="rebuilt from other data or settings since"):
        train(None, TrainConfig(epochs=3), [], [], tmp_path / "r", resume=True, log=lambda m: None, progress=False)


def test_resume_refuses_fewer_epochs_than_done(caches, tmp_path):
    from dermtool.errors import InputError

    out = run(caches, tmp_path / "r", "seg", epochs=2)
    before = (out / "config.json").read_text()
    with pytest.raises(InputError, match="2 epochs are done already, more than --epochs 1"):
        run(caches, out, "seg", epochs=1, resume=True)
    assert (out / "config.json").read_text() == before


def test_init_from_a_model_of_another_width_is_refused(caches, tmp_path):
    """It copied 1 of 43 layers (the classifier) and trained from scratch."""
    from dermtool.errors import InputError

    source = run(caches, tmp_path / "src", "joint", epochs=1)
    with pytest.raises(InputError, match="encoder layers match it by name and shape"):
        run(caches, tmp_path / "r", "joint", epochs=1, cfg=tiny("joint", base_filters=3), init_from=str(source))
    assert not (tmp_path / "r").exists()  # a start that fails keeps nothing


def test_a_start_cut_before_its_first_epoch_keeps_nothing(caches, tmp_path, monkeypatch):
    import dermtool.checkpoint

    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dermtool.checkpoint, "commit", cut)
    with pytest.raises(KeyboardInterrupt):
        run(caches, tmp_path / "new", "seg", epochs=1)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(KeyboardInterrupt):
        run(caches, tmp_path / "mine", "seg", epochs=1)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("holds, words", [
    ({"config.json": '{"model": {}}', "model.weights.h5": "w"}, "holds model.weights.h5, a model folder"),
    ({"config.json": '{"tool": "another"}'}, "holds config.json, which a new run would overwrite"),
    ({"history.csv": "epoch,loss\n"}, "holds history.csv, which a new run would overwrite")])
def test_a_new_run_never_overwrites_a_model_folder_or_another_tools_files(caches, tmp_path, holds, words):
    """train --out on a model folder replaced its config.json (calibration gone) and left its
    weights under the new model's settings, exit 0."""
    from dermtool.errors import InputError

    out = tmp_path / "mine"
    out.mkdir()
    for name, text in holds.items():
        (out / name).write_text(text)
    with pytest.raises(InputError, match=re.escape(f"{out}: {words}")):
        run(caches, out, "seg", epochs=1)
    assert {p.name: p.read_text() for p in out.iterdir()} == holds


def test_a_start_killed_in_its_first_epoch_can_start_again_in_its_folder(caches, tmp_path):
    """Its own config.json and command.txt (no epoch committed: SIGKILL left them) are not another
    tool's files."""
    from dermtool.config import save_config

    out = tmp_path / "run"
    out.mkdir()
    save_config(out / "config.json", tiny("seg"), TrainConfig(epochs=1, train_caches=(str(caches),)))
    (out / "command.txt").write_text("dermtool train ...\n")
    run(caches, out, "seg", epochs=1)
    assert (out / "state.json").is_file()


def test_a_cut_start_in_a_folder_of_the_users_keeps_the_users_files(caches, tmp_path, monkeypatch):
    """undo_start once removed a logs/ and a command.txt that were there before the start."""
    import dermtool.checkpoint

    out = tmp_path / "mine"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "slurm-1.out").write_text("the scheduler's log")
    (out / "command.txt").write_text("an earlier line\n")

    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dermtool.checkpoint, "commit", cut)
    with pytest.raises(KeyboardInterrupt):
        run(caches, out, "seg", epochs=1, command="dermtool train ...")
    assert sorted(p.name for p in out.iterdir()) == ["command.txt", "logs"]
    assert (out / "command.txt").read_text() == "an earlier line\n"
    assert [p.name for p in (out / "logs").iterdir()] == ["slurm-1.out"]


def test_a_resume_refused_for_a_missing_checkpoint_says_so_and_changes_nothing(caches, tmp_path):
    """The cleanup after the refusal failed on the missing folder and hid the refusal behind
    "cannot write the run (No such file or directory)"; and the refused resume had already
    rewritten config.json (its epochs) and added its line to command.txt."""
    out = tmp_path / "run"
    assert cli("train", caches, "--task", "seg", "--out", out, "--epochs", 1, *TINY_CLI).exit_code == 0
    config, command = (out / "config.json").read_text(), (out / "command.txt").read_text()
    shutil.rmtree(out / "checkpoints" / "epoch-001")
    result = cli("train", "--out", out, "--resume", "--epochs", 3)
    assert result.exit_code == 2 and "the checkpoint of epoch 1 is missing" in " ".join(result.output.split())
    assert (out / "config.json").read_text() == config and (out / "command.txt").read_text() == command


def test_batch_workers_are_threads_where_forking_is_not_safe(caches, monkeypatch):
    """On Windows (no fork) --workers 2 stopped with "cannot find context for 'fork'", and macOS
    forked a process holding TensorFlow's threads; there the batches come from threads, the same
    batches, each thread with its own copy of the batch source."""
    from dermtool import train as train_module
    from dermtool.dataset import TrainingSet

    data = TrainingSet([load_cache(caches)], [False])
    cfg, tcfg = tiny("seg"), TrainConfig(batch_size=4, epochs=2, augment="flips")
    plain, _ = train_module.training_dataset(data, cfg, tcfg, workers=1)
    monkeypatch.setattr(train_module, "_forks_safely", lambda: False)
    threaded, _ = train_module.training_dataset(data, cfg, tcfg, workers=2)
    try:
        for i in range(len(plain)):
            (x, y), (tx, ty) = plain[i], threaded[i]
            np.testing.assert_array_equal(x, tx)
            np.testing.assert_array_equal(y["seg"], ty["seg"])
        assert not multiprocessing_children()
    finally:
        threaded.close()
    assert threaded[0][0].shape == plain[0][0].shape  # asked after close: made in the caller's thread


def multiprocessing_children():
    import multiprocessing

    return multiprocessing.active_children()
