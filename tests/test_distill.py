"""train --teacher / --distill: a teacher's probabilities mixed into the classifier targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dermtool.config import TrainConfig, load_config, preset_config
from dermtool.data import build_cache, load_cache, resolve_layout
from dermtool.distill import blend, read_teacher, teacher_rows
from dermtool.errors import InputError

SIZE = 32
CLASSES = ("melanoma", "seborrheic_keratosis", "nevus")


@pytest.fixture(scope="module")
def cache(synthetic_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "cache"
    build_cache(resolve_layout(synthetic_dataset), out, size=SIZE, fit="squash", progress=False)
    return out


def write_teacher(path: Path, rows: dict[str, tuple], header=("image_id", *CLASSES, "label")) -> Path:
    lines = [",".join(header)]
    for image_id, p in rows.items():
        lines.append(",".join([image_id, *(f"{v:.6f}" for v in p), "nevus"]))
    path.write_text("\n".join(lines) + "\n")
    return path


def teacher_for(ids, seed=0) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    out = {}
    for image_id in ids:
        p = rng.dirichlet((1.0, 1.0, 1.0))
        p = np.round(p, 6)
        p[2] = round(1.0 - p[0] - p[1], 6)
        out[image_id] = tuple(p)
    return out


def test_read_teacher_takes_the_class_columns_by_name(tmp_path):
    path = tmp_path / "t.csv"
    # c: an int8 engine's quantised softmax (sums 0.996 to 1.004 on the bundled LiteRT file), rescaled
    path.write_text("label,nevus,image_id,melanoma,seborrheic_keratosis\nnevus,0.7,a,0.1,0.2\n\nmelanoma,0,b,1,0\n"
                    "nevus,0.496,c,0.3,0.2\n")
    table = read_teacher([path])
    np.testing.assert_allclose(table["a"], [0.1, 0.2, 0.7], atol=1e-7)
    np.testing.assert_allclose(table["b"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(table["c"], np.array([0.3, 0.2, 0.496]) / 0.996, atol=1e-7)
    rows = teacher_rows(["b", "zzz", "a"], table, 3)
    np.testing.assert_allclose(rows[0], [1, 0, 0])
    assert np.isnan(rows[1]).all()
    np.testing.assert_allclose(rows[2], [0.1, 0.2, 0.7], atol=1e-7)


@pytest.mark.parametrize("text, words", [
    ("image_id,melanoma,nevus,label\na,0.5,0.5,nevus\n", "lacks the column(s) seborrheic_keratosis"),
    ("image_id,melanoma,seborrheic_keratosis,nevus,label\na,0.5,x,0.5,nevus\n", "non-numeric seborrheic_keratosis value 'x' at row 2"),
    ("image_id,melanoma,seborrheic_keratosis,nevus,label\na,1.5,-0.5,0,nevus\n", "values must be numbers in [0, 1]"),
    ("image_id,melanoma,seborrheic_keratosis,nevus,label\na,0.5,0.5,0.5,nevus\n", "sum to 1.5000, not 1"),
    ("image_id,melanoma,seborrheic_keratosis,nevus,label\na,nan,0.5,0.5,nevus\n", "values must be numbers in [0, 1]"),
    ("image_id,melanoma,seborrheic_keratosis,nevus,label\na,0.5,0.5\n", "too few fields at row 2"),
    ("image_id,melanoma,seborrheic_keratosis,nevus,label\n , 0.2, 0.3, 0.5, nevus\n", "empty image_id at row 2"),
    ("image_id,melanoma,seborrheic_keratosis,nevus,label\na,0.2,0.3,0.5,nevus\na,0.2,0.3,0.5,nevus\n", "repeats image_id a at row 3"),
    ("image_id,melanoma,seborrheic_keratosis,nevus,label\n", "has a header but no rows"),
    ("", "is empty"),
])
def test_read_teacher_names_the_file_line_and_problem(tmp_path, text, words):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        read_teacher([path])
    assert words in str(err.value)
    assert str(path) in str(err.value)


def test_an_image_in_two_teacher_files_is_refused_naming_both(tmp_path):
    a = write_teacher(tmp_path / "a.csv", {"x": (0.2, 0.3, 0.5)})
    b = write_teacher(tmp_path / "b.csv", {"y": (0.2, 0.3, 0.5), "x": (0.1, 0.1, 0.8)})
    with pytest.raises(InputError, match="image 'x' has a teacher row already") as err:
        read_teacher([a, b])
    assert str(a) in str(err.value) and str(b) in str(err.value)


def test_blend_mixes_only_rows_with_a_true_class_and_a_teacher():
    onehot = np.array([[0, 0, 1], [1, 0, 0], [-1, 0, 0], [0, 0, 0]], np.float32)
    soft = np.array([[0.2, 0.3, 0.5], [np.nan] * 3, [0.6, 0.2, 0.2], [0.3, 0.3, 0.4]], np.float32)
    out = blend(onehot, soft, 0.5)
    np.testing.assert_allclose(out[0], [0.1, 0.15, 0.75])  # 0.5 x (0, 0, 1) + 0.5 x (0.2, 0.3, 0.5)
    np.testing.assert_array_equal(out[1:], onehot[1:])  # no teacher, partial label, no label
    np.testing.assert_array_equal(blend(onehot, soft, 0.0), onehot)
    np.testing.assert_allclose(blend(onehot, soft, 1.0)[0], soft[0])


@pytest.mark.parametrize("consistency", [0.0, 1.0])
def test_training_batches_carry_each_images_blended_target(cache, consistency):
    from dermtool.dataset import TrainingSet, steps_per_epoch
    from dermtool.train import BatchSource

    c = load_cache(cache)
    data = TrainingSet([c], [False])
    table = {k: np.asarray(v, np.float32) for k, v in teacher_for(c.ids[::2]).items()}  # half the images
    data.soft = teacher_rows(c.ids, table, 3)
    cfg = preset_config("compact", "joint", size=SIZE, base_filters=4, depth=2)
    tcfg = TrainConfig(batch_size=6, seed=2, augment="flips", consistency=consistency, teacher=("t.csv",),
                       distill=0.25)
    source = BatchSource(data, cfg, tcfg, steps_per_epoch(len(data), 6, 0))
    taught = 0
    for step in range(2):
        _, y = source.batch(0, step)
        take = source.order(0)[step * 6:step * 6 + (3 if consistency else 6)]
        if consistency:
            take = np.repeat(take, 2)
        for row, i in zip(y["cls"], take):
            label = int(data.labels[i])
            want = np.eye(3, dtype=np.float32)[label] if 0 <= label < 3 else np.zeros(3, np.float32)
            if 0 <= label < 3 and not np.isnan(data.soft[i]).any():
                want = 0.75 * want + 0.25 * data.soft[i]
                taught += 1
            np.testing.assert_allclose(row, want, atol=1e-6)
    assert taught > 0
    plain = BatchSource(data, cfg, TrainConfig(batch_size=6, seed=2, augment="flips", consistency=consistency),
                        steps_per_epoch(len(data), 6, 0))
    np.testing.assert_array_equal(plain.batch(0, 0)[0], source.batch(0, 0)[0])  # the same images


def cli(*args):
    from typer.testing import CliRunner

    from dermtool.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


TINY = ("--size", SIZE, "--base-filters", 4, "--depth", 2, "--batch-size", 4, "--augment", "none",
        "--epochs", 1, "--task", "cls")


def test_train_with_a_teacher_records_it_and_resumes_only_with_the_same_one(cache, tmp_path):
    ids = load_cache(cache).ids
    teacher = write_teacher(tmp_path / "teacher.csv", teacher_for(ids))
    out = tmp_path / "run"
    result = cli("train", cache, "--val", cache, "--out", out, *TINY, "--teacher", teacher, "--distill", 0.5)
    assert result.exit_code == 0, result.output
    labelled = int((load_cache(cache).labels >= 0).sum())
    assert f"distillation: teacher rows for {labelled} of {labelled} labelled training images" in \
        " ".join(result.output.split())
    tcfg = load_config(out / "config.json")[1]
    assert tcfg.distill == 0.5 and list(tcfg.teacher) == [str(teacher.resolve())]
    import hashlib

    assert tcfg.teacher_sha256 == hashlib.sha256(teacher.read_bytes()).hexdigest()
    refused = cli("train", "--out", out, "--resume", "--epochs", 2, "--distill", 0.3)
    assert refused.exit_code == 2 and "--distill 0.5" in " ".join(refused.output.split())
    write_teacher(teacher, teacher_for(ids, seed=1))  # another teacher under the same name
    changed = cli("train", "--out", out, "--resume", "--epochs", 2)
    assert changed.exit_code == 2 and "the teacher predictions changed since this run started" in \
        " ".join(changed.output.split())
    assert json.loads((out / "state.json").read_text())["epoch"] == 1


def test_a_teacher_for_other_images_is_refused(cache, tmp_path):
    teacher = write_teacher(tmp_path / "teacher.csv", {"not_a_training_image": (0.2, 0.3, 0.5)})
    result = cli("train", cache, "--out", tmp_path / "r", *TINY, "--teacher", teacher, "--distill", 0.5)
    assert result.exit_code == 2
    assert "no labelled training image has a teacher row" in " ".join(result.output.split())


@pytest.mark.parametrize("args, words", [
    (["--distill", "0.5"], "give the teacher with --teacher"),
    (["--teacher", "TEACHER"], "--teacher needs --distill"),
    (["--teacher", "TEACHER", "--distill", "1.5"], "--distill must be between 0.0 and 1.0"),
    (["--teacher", "TEACHER", "--distill", "nan"], "--distill must be between"),
    (["--teacher", "TEACHER", "--distill", "0.5", "--task", "seg"], "--task seg has none"),
    (["--teacher", "missing.csv", "--distill", "0.5"], "missing.csv: teacher predictions CSV not found"),
])
def test_train_refuses_bad_teacher_options_before_writing(cache, tmp_path, args, words):
    teacher = write_teacher(tmp_path / "teacher.csv", teacher_for(load_cache(cache).ids))
    args = [str(teacher) if a == "TEACHER" else a for a in args]
    result = cli("train", cache, "--out", tmp_path / "r", "--size", SIZE, *args)
    assert result.exit_code == 2 and words in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("changes, words", [
    ({"distill": 0.5}, "train.distill and train.teacher go together"),
    ({"teacher": ("t.csv",)}, "train.distill and train.teacher go together"),
    ({"teacher": ("t.csv",), "distill": 2.0}, "train.distill must be the teacher's share"),
])
def test_train_config_checks_the_teacher_settings(changes, words):
    with pytest.raises(InputError, match=words):
        TrainConfig(**changes)
