"""The synthetic data generator the other tests rely on."""

from __future__ import annotations

import numpy as np
import pytest

from dermtool.io import find_masks, read_class_csv, read_mask
from dermtool.synthetic import make_lesion, write_dataset


def test_shapes_types_and_repeatability():
    rgb, mask, cls = make_lesion(90, 130, np.random.default_rng(4))
    assert rgb.shape == (90, 130, 3) and rgb.dtype == np.uint8
    assert mask.shape == (90, 130) and mask.dtype == bool and cls in (0, 1, 2)
    again = make_lesion(90, 130, np.random.default_rng(4))
    assert np.array_equal(rgb, again[0]) and np.array_equal(mask, again[1]) and cls == again[2]


@pytest.mark.parametrize("cls", [0, 1, 2])
def test_the_mask_covers_the_dark_blob(cls):
    rgb, mask, got = make_lesion(160, 200, np.random.default_rng(cls), cls=cls, hair_probability=0)
    assert got == cls and 0.02 < mask.mean() < 0.6
    luminance = rgb.astype(float).mean(axis=2)
    assert luminance[mask].mean() < luminance[~mask].mean() - 30


def test_classes_differ_in_size_and_darkness():
    stats = {c: [] for c in range(3)}
    for seed in range(8):
        for c in range(3):
            rgb, mask, _ = make_lesion(96, 96, np.random.default_rng([seed, c]), cls=c, hair_probability=0)
            stats[c].append((mask.mean(), rgb[mask].mean()))
    area = {c: np.mean([s[0] for s in v]) for c, v in stats.items()}
    brightness = {c: np.mean([s[1] for s in v]) for c, v in stats.items()}
    assert area[2] < area[1] < area[0]  # nevus small, melanoma large
    assert brightness[0] < brightness[2] < brightness[1]  # melanoma darkest, SK tan


def test_write_dataset_layout(tmp_path):
    root = write_dataset(tmp_path / "d", 5, rng_seed=1, sizes=[(40, 60), (50, 30)], formats=("png", "jpg"))
    names = sorted(p.name for p in (root / "images").iterdir())
    assert names == ["SYN_0000000.png", "SYN_0000001.jpg", "SYN_0000002.png", "SYN_0000003.jpg", "SYN_0000004.png"]
    masks = find_masks(root / "masks")
    assert sorted(masks) == [n.split(".")[0] for n in names]
    assert read_mask(masks["SYN_0000001"]).shape == (50, 30)
    labels = read_class_csv(root / "labels.csv")
    assert [int(np.argmax(v)) for v in labels.values()] == [0, 1, 2, 0, 1]
