"""bench/paired.py: the paired bootstrap the model card's comparisons come from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("paired", ROOT / "bench" / "paired.py")
paired = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired)

IDS = [f"ISIC_{i:07d}" for i in range(6)]
TRUTH = [0, 0, 2, 2, 1, 2]  # two melanomas, one keratosis, three nevi


def write_model(work: Path, name: str, melanoma: list[float], jac: list[float]) -> Path:
    folder = work / f"{name}-tta1-isic"
    (folder / "masks").mkdir(parents=True)
    rows = ["image_id,melanoma,seborrheic_keratosis,nevus"]
    for i, m in zip(IDS, melanoma):
        rows.append(f"{i},{m},{(1 - m) / 4},{3 * (1 - m) / 4}")
    (folder / "masks" / "predictions.csv").write_text("\n".join(rows) + "\n")
    per_image = {f"{i}_segmentation.png": j for i, j in zip(IDS, jac)}
    (folder / "score.json").write_text(json.dumps({"segmentation": {"per_image": per_image}}))
    return folder


@pytest.fixture
def work(tmp_path):
    truth = ["image_id,melanoma,seborrheic_keratosis"]
    truth += [f"{i},{int(c == 0)},{int(c == 1)}" for i, c in zip(IDS, TRUTH)]
    (tmp_path / "labels.csv").write_text("\n".join(truth) + "\n")
    # melanoma AUC by hand: A ranks one melanoma (0.2) above one of four benign images: 5 of 8 pairs
    a = [0.9, 0.2, 0.5, 0.1, 0.3, 0.4]
    b = [0.9, 0.6, 0.5, 0.1, 0.3, 0.4]  # B ranks both above all four: 8 of 8
    write_model(tmp_path, "A1", a, [0.5] * 6)
    write_model(tmp_path, "B1", b, [0.6] * 6)
    write_model(tmp_path, "A2", a, [0.5] * 6)
    write_model(tmp_path, "B2", a, [0.5] * 6)  # the second seed: no change at all
    return tmp_path


def test_one_pair_gives_the_difference_of_its_two_models(work):
    got = paired.compare(work / "A1-tta1-isic", work / "B1-tta1-isic", work / "labels.csv", None, 200, 0)
    a, b, ci = got["mel AUC"]
    assert (a, b) == (5 / 8, 1.0)
    assert ci[0] <= b - a <= ci[1]
    assert got["JAC"][:2] == pytest.approx((0.5, 0.6))


def test_pairs_average_the_differences_on_the_same_resamples(work):
    pairs = [(work / "A1-tta1-isic", work / "B1-tta1-isic"), (work / "A2-tta1-isic", work / "B2-tta1-isic")]
    got = paired.compare_pairs(pairs, work / "labels.csv", None, 300, 0)
    a, b, ci = got["mel AUC"]
    assert (a, b) == ((5 / 8 + 5 / 8) / 2, (1.0 + 5 / 8) / 2)  # mean difference 0.1875
    single = paired.compare(*pairs[0], work / "labels.csv", None, 300, 0)["mel AUC"][2]
    # the second pair adds exactly 0 on every resample, so the interval is the first's halved
    np.testing.assert_allclose(ci, np.asarray(single) / 2)
    assert got["JAC"][2] == pytest.approx([0.05, 0.05])
