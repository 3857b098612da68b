"""Several caches as one training set, partial labels, the samplers, and the split by lesion."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from dermtool.config import TrainConfig, preset_config
from dermtool.data import Layout, build_cache, load_cache, resolve_layout
from dermtool.dataset import MISSING_MASK, TrainingSet, balanced_probabilities, epoch_indices
from dermtool.synthetic import write_dataset

SIZE = 32


def tiny(task="joint"):
    return preset_config("compact", task, size=SIZE, base_filters=4, depth=2)


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """Three caches: complete, masks without labels (like HAM's other diagnoses), labels without masks."""
    root = tmp_path_factory.mktemp("partial")
    full = write_dataset(root / "full", 6, rng_seed=1, sizes=[(40, 48)], formats=("png",))
    other = write_dataset(root / "other", 4, rng_seed=2, sizes=[(48, 40)], formats=("png",))
    build_cache(resolve_layout(full), root / "c_full", size=SIZE, progress=False)
    build_cache(Layout(other / "images", other / "masks", None), root / "c_masks_only", size=SIZE, progress=False)
    build_cache(Layout(other / "images", None, other / "labels.csv"), root / "c_labels_only", size=SIZE,
                progress=False)
    return root


def test_several_caches_read_as_one_with_missing_parts_marked(partial):
    caches = [load_cache(partial / n) for n in ("c_full", "c_masks_only", "c_labels_only")]
    data = TrainingSet(caches, [False] * 3)
    assert len(data) == 14
    np.testing.assert_array_equal(data.labels[6:10], -1)
    assert data.has_mask[:10].all() and not data.has_mask[10:].any()
    idx = np.array([12, 0, 7, 5])  # out of order, across all three caches
    images, masks, labels = data.read(idx, tiny())
    np.testing.assert_array_equal(images[1], caches[0].images[0])
    np.testing.assert_array_equal(images[2], caches[1].images[1])
    np.testing.assert_array_equal(images[0], caches[2].images[2])
    np.testing.assert_array_equal(masks[1], caches[0].masks[0])
    np.testing.assert_array_equal(masks[2], caches[1].masks[1])
    assert (masks[0] == MISSING_MASK).all()  # label-only image: no mask
    assert labels.tolist() == [caches[2].labels[2], caches[0].labels[0], -1, caches[0].labels[5]]


def _head_gradients(model, losses, loss_weights, x, y):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        out = model(x, training=False)
        total = sum(loss_weights[k] * losses[k](y[k], out[k]) for k in losses)
    seg_vars = model.get_layer("seg").trainable_variables
    cls_vars = model.get_layer("cls").trainable_variables
    grads = tape.gradient(total, seg_vars + cls_vars)
    norm = lambda gs: float(sum(np.abs(np.asarray(g)).sum() for g in gs if g is not None))  # noqa: E731
    return norm(grads[:len(seg_vars)]), norm(grads[len(seg_vars):]), float(total)


def test_a_missing_mask_or_label_trains_only_the_other_head(partial):
    from dermtool.losses import build_losses
    from dermtool.models import build_model
    from dermtool.dataset import targets as _targets

    cfg = tiny()
    model = build_model(cfg)
    losses, weights = build_losses(True, True, 0.5, True, (1.0, 2.0, 0.5))
    data = TrainingSet([load_cache(partial / n) for n in ("c_full", "c_masks_only", "c_labels_only")], [False] * 3)
    for idx, seg_moves, cls_moves in (([6, 7], True, False),    # masks, no labels
                                      ([10, 11], False, True),  # labels, no masks
                                      ([0, 1], True, True)):    # both
        images, masks, labels = data.read(np.array(idx), cfg)
        seg_g, cls_g, total = _head_gradients(model, losses, weights, images.astype(np.float32),
                                              _targets(cfg, masks, labels))
        assert (seg_g > 0) == seg_moves and (cls_g > 0) == cls_moves, (idx, seg_g, cls_g)
        assert np.isfinite(total)


def test_missing_samples_neither_add_to_nor_dilute_the_loss():
    from dermtool.losses import SegmentationLoss, WeightedCategoricalCrossentropy

    seg_true = np.zeros((2, 4, 4, 1), np.float32)
    seg_true[1] = -1.0  # the second image has no mask
    seg_pred = np.full((2, 4, 4, 1), 0.2, np.float32)
    assert float(SegmentationLoss()(seg_true, seg_pred)) == pytest.approx(-np.log(0.8), rel=1e-5)
    cls_true = np.array([[0, 1, 0], [0, 0, 0]], np.float32)  # the second has no label
    cls_pred = np.array([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]], np.float32)
    loss = WeightedCategoricalCrossentropy((1.0, 3.0, 1.0))(cls_true, cls_pred)
    assert float(loss) == pytest.approx(3.0 * -np.log(0.5), rel=1e-5)


def test_joint_training_on_partial_caches_writes_both_validation_sets(partial, tmp_path):
    from dermtool.train import train

    tcfg = TrainConfig(epochs=2, batch_size=4, learning_rate=3e-3, seed=0, augment="flips",
                       sampler="balanced", steps_per_epoch=3, schedule="cosine")
    out = train(tiny(), tcfg, [partial / "c_full", partial / "c_masks_only", partial / "c_labels_only"],
                [partial / "c_full", partial / "c_masks_only"], tmp_path / "run", log=lambda m: None,
                progress=False)
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:
        assert 0 <= float(r["val_mean_performance"]) <= 1 and 0 <= float(r["val_mel_auc"]) <= 1
        assert 0 <= float(r["val2_jac"]) <= 1
        assert r["val2_bacc"] == ""  # the second set has no labels: no BACC, not a made-up one
    # cosine: warm-up epoch at half the peak, then the decay's first value
    assert float(rows[0]["lr"]) == pytest.approx(1.5e-3, rel=1e-4)
    state = json.loads((out / "state.json").read_text())
    best = max(rows, key=lambda r: (float(r["val_mean_performance"]) + float(r["val2_jac"])) / 2)
    assert state["best_epoch"] == int(best["epoch"])  # chosen on the mean over both sets' metrics


def test_balanced_sampler_draws_each_class_equally_and_keeps_unlabelled_share():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 65 + [-1] * 20)
    p = balanced_probabilities(labels)
    assert p.sum() == pytest.approx(1.0)
    for c in (0, 1, 2):
        assert p[labels == c].sum() == pytest.approx(0.8 / 3)
    assert p[labels == -1].sum() == pytest.approx(0.2)


def test_epoch_indices_are_seeded_and_proportional_covers_everything(partial):
    data = TrainingSet([load_cache(partial / "c_full")], [False])
    a = epoch_indices(data, "proportional", 0, 1, steps=3, batch_size=2)
    assert sorted(a.tolist()) == list(range(6))
    np.testing.assert_array_equal(a, epoch_indices(data, "proportional", 0, 1, 3, 2))
    assert not np.array_equal(a, epoch_indices(data, "proportional", 0, 2, 3, 2))
    longer = epoch_indices(data, "proportional", 0, 1, steps=5, batch_size=2)  # more steps than one pass
    assert len(longer) == 10 and set(longer.tolist()) == set(range(6))


def test_split_keeps_every_lesion_on_one_side_and_is_reproducible():
    from dermtool.split import split_by_group

    rng = np.random.default_rng(0)
    ids, groups, classes = [], [], []
    for lesion in range(200):
        cls = ["melanoma", "seborrheic_keratosis", "nevus", ""][lesion % 4]
        for k in range(int(rng.integers(1, 4))):
            ids.append(f"IMG_{lesion:03d}_{k}")
            groups.append(f"L{lesion:03d}")
            classes.append(cls)
    train, val = split_by_group(ids, groups, classes, 0.1, seed=0)
    assert sorted(train + val) == sorted(ids)
    lesion_of = dict(zip(ids, groups))
    assert not {lesion_of[i] for i in train} & {lesion_of[i] for i in val}
    val_lesions = {lesion_of[i] for i in val}
    assert len(val_lesions) == 4 * 5  # ceil(10 % of the 50 lesions of each class)
    assert (train, val) == split_by_group(ids, groups, classes, 0.1, seed=0)
    assert val != split_by_group(ids, groups, classes, 0.1, seed=1)[1]


@pytest.mark.parametrize("fraction", [0.6, 0.9])
def test_split_keeps_at_least_one_lesion_of_each_class_for_training(fraction):
    """A class of two lesions at --fraction 0.6 (ceil(1.2) = 2) once sent both to validation."""
    from dermtool.split import split_by_group

    ids = ["m1", "m2", "k1", "k2", "k3", *(f"n{i}" for i in range(10))]
    classes = ["melanoma"] * 2 + ["seborrheic_keratosis"] * 3 + ["nevus"] * 10
    for seed in range(5):
        train, val = split_by_group(ids, ids, classes, fraction, seed=seed)
        for prefix, n in (("m", 2), ("k", 3), ("n", 10)):
            n_train = sum(i.startswith(prefix) for i in train)
            assert n_train >= 1 and sum(i.startswith(prefix) for i in val) == min(math.ceil(fraction * n), n - 1)


def test_split_and_preprocess_ids_from_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from dermtool.cli import app

    data = write_dataset(tmp_path / "ham", 12, rng_seed=3, sizes=[(30, 40)], formats=("jpg",))
    with open(data / "metadata.csv", "w", newline="") as fh:  # two images per lesion
        w = csv.writer(fh)
        w.writerow(["lesion_id", "image_id", "dx"])
        for i in range(12):
            w.writerow([f"HAM_{i // 2:04d}", f"SYN_{i:07d}", "nv"])
    runner = CliRunner()
    res = runner.invoke(app, ["split", str(data), "--out", str(tmp_path / "split"), "--fraction", "0.2"])
    assert res.exit_code == 0, res.output
    train = (tmp_path / "split" / "train.txt").read_text().split()
    val = (tmp_path / "split" / "val.txt").read_text().split()
    assert len(train) + len(val) == 12 and val and len(val) % 2 == 0
    res = runner.invoke(app, ["preprocess", str(data), "--out", str(tmp_path / "cv"), "--size", "32",
                              "--ids", str(tmp_path / "split" / "val.txt")])
    assert res.exit_code == 0, res.output
    cache = load_cache(tmp_path / "cv")
    assert sorted(cache.ids) == sorted(val)
    assert cache.lesion_ids == [f"HAM_{int(i[4:]) // 2:04d}" for i in cache.ids]
    (tmp_path / "bad.txt").write_text("SYN_0000000\nNOPE_1\n")
    res = runner.invoke(app, ["preprocess", str(data), "--out", str(tmp_path / "cx"), "--ids", str(tmp_path / "bad.txt")])
    assert res.exit_code == 2 and "NOPE_1" in res.output


# --- partial labels "not melanoma" (ISIC 2020's benign images without a diagnosis) ---

def test_a_not_melanoma_label_costs_minus_log_one_minus_p_melanoma():
    from dermtool.dataset import targets
    from dermtool.losses import WeightedCategoricalCrossentropy

    cfg = tiny("cls")
    y = targets(cfg, None, np.array([3, 2, -1]))["cls"]
    assert y.tolist() == [[-1, 0, 0], [0, 0, 1], [0, 0, 0]]
    pred = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]], np.float32)
    loss = WeightedCategoricalCrossentropy((1.0, 1.0, 1.0))
    # per sample -log(0.8), -log(0.8), 0 (no label); Keras averages over the batch of 3, and the
    # unlabelled sample neither adds nor dilutes: (2 * -log 0.8) * 3/2 / 3
    assert float(loss(y, pred)) == pytest.approx(-np.log(0.8), rel=1e-5)


def test_balanced_sampler_weighs_a_sources_partial_labels_against_its_melanomas():
    # source 0: a nevus and a keratosis; source 1: three melanomas and one partial label
    labels = np.array([2, 1, 0, 0, 0, 3])
    sources = np.array([0, 0, 1, 1, 1, 1])
    p = balanced_probabilities(labels, sources=sources)
    # 5 full labels of 6: each class gets 5/6 / 3 = 5/18; a melanoma image 5/54. Source 1's
    # melanomas weigh 5/18 and it has no benign full label, so its partial image gets 5/18 too;
    # then all is renormalised by the total 5/6 + 5/18 = 10/9.
    assert p.tolist() == pytest.approx([x * 9 / 10 for x in (5 / 18, 5 / 18, 5 / 54, 5 / 54, 5 / 54, 5 / 18)])
    # never below an unlabelled image's share: one melanoma against two partial labels
    p = balanced_probabilities(np.array([0, 2, 3, 3]), sources=np.array([1, 0, 1, 1]))
    # full 2 of 4: melanoma 1/4, nevus 1/4; partial: max(1/4, 2/4) / 2 = 1/4 each; total 1
    assert p.tolist() == pytest.approx([0.25] * 4)


def test_preprocess_gives_benign_images_without_a_diagnosis_the_partial_label(tmp_path):
    from dermtool.data import NOT_MELANOMA

    data = write_dataset(tmp_path / "d", 6, rng_seed=4, sizes=[(40, 48)], formats=("png",))
    rows = list(csv.DictReader(open(data / "labels.csv")))
    ids = [r["image_id"] for r in rows]
    kept = rows[:3]  # the last three lose their diagnosis; two of them are benign in the metadata
    with open(data / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    with open(data / "metadata.csv", "w", newline="") as fh:
        fh.write("image_id,patient_id,lesion_id,benign_malignant\n")
        for k, i in enumerate(ids):
            fh.write(f"{i},P{k // 2},L{k},{'malignant' if k == 5 else 'benign'}\n")
    build_cache(resolve_layout(data), tmp_path / "c", size=SIZE, progress=False)
    cache = load_cache(tmp_path / "c")
    by_id = dict(zip(cache.ids, cache.labels.tolist()))
    assert [by_id[i] for i in ids[3:]] == [NOT_MELANOMA, NOT_MELANOMA, -1]
    assert all(by_id[i] in (0, 1, 2) for i in ids[:3])


def test_split_by_patient_keeps_each_patient_on_one_side(tmp_path):
    from dermtool.split import split_folder

    data = write_dataset(tmp_path / "d", 12, rng_seed=5, sizes=[(40, 48)], formats=("png",))
    ids = sorted(r["image_id"] for r in csv.DictReader(open(data / "labels.csv")))
    patient = {i: f"P{k // 3}" for k, i in enumerate(ids)}  # four patients of three images
    with open(data / "metadata.csv", "w", newline="") as fh:
        fh.write("image_id,patient_id,lesion_id\n")
        fh.writelines(f"{i},{patient[i]},L{k}\n" for k, i in enumerate(ids))
    train, val, groups = split_folder(data, 0.5, seed=0, group="patient_id")
    assert groups == patient
    assert set(train) | set(val) == set(ids) and val
    assert not {patient[i] for i in train} & {patient[i] for i in val}
    by_lesion = split_folder(data, 0.5, seed=0)[2]
    assert len(set(by_lesion.values())) == 12  # the default groups by lesion_id


def test_the_consistency_loss_adds_the_weighted_symmetric_kl_of_each_pair():
    from dermtool.losses import PairConsistentCrossentropy, WeightedCategoricalCrossentropy

    y = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], np.float32)  # pair 2 has no label
    pred = np.array([[0.6, 0.2, 0.2], [0.4, 0.3, 0.3], [0.1, 0.1, 0.8], [0.1, 0.1, 0.8]], np.float32)
    plain = float(WeightedCategoricalCrossentropy()(y, pred))
    assert plain == pytest.approx(-(np.log(0.6) + np.log(0.4)) / 2, rel=1e-5)
    a, b = pred[0].astype(np.float64), pred[1].astype(np.float64)
    sym_kl = 0.5 * (np.sum(a * np.log(a / b)) + np.sum(b * np.log(b / a)))
    # pair 1 differs, pair 2 agrees exactly; the mean over the two pairs, times the weight 3
    got = float(PairConsistentCrossentropy((1.0, 1.0, 1.0), 3.0)(y, pred))
    assert got == pytest.approx(plain + 3.0 * sym_kl / 2, rel=1e-5)
    same = np.repeat(pred[0::2], 2, axis=0)
    assert float(PairConsistentCrossentropy((1.0, 1.0, 1.0), 3.0)(y, same)) == pytest.approx(
        float(WeightedCategoricalCrossentropy()(y, same)), rel=1e-6)


def test_the_anchored_consistency_loss_pulls_only_the_copy_toward_the_image():
    import tensorflow as tf

    from dermtool.losses import PairConsistentCrossentropy, WeightedCategoricalCrossentropy

    y = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], np.float32)  # pair 2 has no label
    pred = np.array([[0.6, 0.2, 0.2], [0.4, 0.3, 0.3], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]], np.float32)
    a, b = pred[0::2].astype(np.float64), pred[1::2].astype(np.float64)
    kl = np.sum(a * np.log(a / b), axis=1)  # KL(image || copy), each pair
    plain = float(WeightedCategoricalCrossentropy()(y, pred))
    loss = PairConsistentCrossentropy((1.0, 1.0, 1.0), 3.0, anchored=True)
    assert float(loss(y, pred)) == pytest.approx(plain + 3.0 * kl.mean(), rel=1e-5)
    # the gradient: the image's rows only through their own cross-entropy, the copies' also through the KL
    x = tf.Variable(pred)
    with tf.GradientTape() as tape:
        total = loss(y, x)
    grad = tape.gradient(total, x).numpy()
    with tf.GradientTape() as tape:
        ce = WeightedCategoricalCrossentropy()(y, x)
    grad_ce = tape.gradient(ce, x).numpy()
    np.testing.assert_allclose(grad[0::2], grad_ce[0::2], rtol=1e-5, atol=1e-7)
    # d KL(a || b) / d b = -a / b, times the weight 3, carried by both rows of its pair in the mean over 4
    np.testing.assert_allclose(grad[1::2], grad_ce[1::2] - 3.0 * a / b * 2 / 4, rtol=1e-4, atol=1e-6)
    assert PairConsistentCrossentropy.from_config(loss.get_config()).anchored


def test_split_prints_a_folder_name_with_brackets_as_it_is(tmp_path):
    from typer.testing import CliRunner

    from dermtool.cli import app

    data = write_dataset(tmp_path / "d", 6, rng_seed=3, sizes=[(30, 40)], formats=("jpg",))
    out = tmp_path / "a[bold]" / "x[" / "b]"
    res = CliRunner().invoke(app, ["split", str(data), "--out", str(out), "--fraction", "0.5"])
    assert res.exit_code == 0, res.output
    assert str(out / "train.txt") in "".join(res.output.split())


def test_split_reads_labels_as_preprocess_does_and_notes_what_does_not_match(tmp_path):
    """A row of 0s beside a nevus column, which preprocess takes (as no class), was refused by split."""
    from typer.testing import CliRunner

    from dermtool.cli import app

    data = write_dataset(tmp_path / "d", 6, rng_seed=4, sizes=[(30, 40)], formats=("jpg",))
    rows = list(csv.DictReader(open(data / "labels.csv")))
    with open(data / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "melanoma", "seborrheic_keratosis", "nevus"])
        for k, r in enumerate(rows):
            mel, sk = float(r["melanoma"]), float(r["seborrheic_keratosis"])
            w.writerow([r["image_id"], mel, sk, 0.0 if k == 0 else 1.0 - mel - sk])
        w.writerow(["GHOST_1", 1, 0, 0])
    res = CliRunner().invoke(app, ["split", str(data), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "1 label row(s) without an image (GHOST_1)" in text and "groups by image_id" in text
    ids = (tmp_path / "s" / "train.txt").read_text().split() + (tmp_path / "s" / "val.txt").read_text().split()
    assert sorted(ids) == sorted(r["image_id"] for r in rows)
