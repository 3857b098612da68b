"""Training on tiny synthetic caches: run folder, resume, transfer, class weights, strategy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

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

    tcfg = TrainConfig(epochs=epochs, batch_size=4, learning_rate=3e-3, seed=3, augment="none", **tover)
    return train(cfg or tiny(task), tcfg, caches, caches, out, resume=resume, log=lambda m: None, progress=False)


def history(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "history.csv")))


@pytest.mark.parametrize("task", ["seg", "cls", "joint"])
def test_each_task_trains_and_writes_a_complete_run_folder(caches, tmp_path, task):
    out = run(caches, tmp_path / task, task, epochs=3)
    for name in ("config.json", "best.weights.h5", "last.weights.h5", "optimizer.npz", "state.json", "history.csv"):
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
    from dermtool.models import build_model

    # without dropout the run is deterministic, so resume must reproduce it exactly: same data
    # order and augmentation for epoch 2, same Adam state, same learning rate
    cfg = tiny("seg", dropout=0.0)
    straight = run(caches, tmp_path / "straight", "seg", epochs=2, cfg=cfg)
    part = run(caches, tmp_path / "part", "seg", epochs=1, cfg=cfg)
    assert len(history(part)) == 1
    resumed = run(caches, tmp_path / "part", "seg", epochs=2, resume=True, cfg=cfg)
    assert [int(r["epoch"]) for r in history(resumed)] == [1, 2]
    a, b = build_model(cfg), build_model(cfg)
    a.load_weights(str(straight / "last.weights.h5"))
    b.load_weights(str(resumed / "last.weights.h5"))
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


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


def test_a_cache_of_another_size_is_resized_on_the_fly(caches, tmp_path):
    cfg = tiny("seg", size=16)
    out = run(caches, tmp_path / "small", "seg", epochs=1, cfg=cfg)
    assert len(history(out)) == 1


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
    from dermtool.train import export_model

    out = run(caches, tmp_path / "run", "joint", epochs=1)
    slim = export_model(out, tmp_path / "slim")
    assert (slim / "model.weights.h5").stat().st_size < (out / "best.weights.h5").stat().st_size
    a, _ = load_model(slim)
    b, cfg = load_model(out)
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    for key in ("seg", "cls"):
        np.testing.assert_array_equal(np.asarray(a.predict_on_batch(x)[key]), np.asarray(b.predict_on_batch(x)[key]))
    assert load_config(slim)[0] == cfg
