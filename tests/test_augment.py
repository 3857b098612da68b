"""Training-time augmentation: same geometry for image and mask, fresh randomness per sample and epoch."""

from __future__ import annotations

import numpy as np
import pytest

from dermtool.augment import augment_batch, dihedral

# The generator train.py builds for each batch: one stream per (seed, epoch, batch).


def batch_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, batch])


_A = np.array([[1, 2, 3],
               [4, 5, 6],
               [7, 8, 9]])


def test_dihedral_by_hand():
    assert dihedral(_A, 0).tolist() == _A.tolist()
    assert dihedral(_A, 1).tolist() == [[3, 2, 1], [6, 5, 4], [9, 8, 7]]  # left-right
    assert dihedral(_A, 2).tolist() == [[7, 8, 9], [4, 5, 6], [1, 2, 3]]  # up-down
    assert dihedral(_A, 4).tolist() == [[1, 4, 7], [2, 5, 8], [3, 6, 9]]  # transpose
    assert dihedral(_A, 6).tolist() == [[3, 6, 9], [2, 5, 8], [1, 4, 7]]  # transpose, up-down: rot90
    assert len({dihedral(_A, k).tobytes() for k in range(8)}) == 8  # all 8 symmetries


def _batch(n: int = 16, side: int = 24):
    """Images whose red channel is 60 or 190 exactly where the mask is 0 or 1 (an asymmetric L)."""
    masks = np.zeros((n, side, side), np.uint8)
    masks[:, 2:20, 3:7] = 1
    masks[:, 15:20, 3:15] = 1
    images = np.full((n, side, side, 3), 120, np.uint8)
    images[..., 0] = np.where(masks == 1, 190, 60)
    return images, masks


@pytest.mark.parametrize("mode", ["flips", "flips+color"])
def test_image_and_mask_get_the_same_transform(mode):
    images, masks = _batch()
    out, out_masks, codes = augment_batch(images, masks, batch_rng(0, 0, 0), mode)
    for i, k in enumerate(codes):
        assert np.array_equal(out_masks[i], dihedral(masks[i], int(k)))
        red = out[i, ..., 0]
        # colour jitter is monotone per channel: the lesion stays the brighter red everywhere
        assert red[out_masks[i] == 1].min() > red[out_masks[i] == 0].max()
    if mode == "flips":
        assert np.array_equal(out, np.stack([dihedral(im, int(k)) for im, k in zip(images, codes)]))


def test_samples_in_one_batch_differ():
    """The thesis code re-seeded per sample, so every image got the same flip."""
    codes = augment_batch(*_batch(), batch_rng(0, 0, 0), "flips")[2]
    assert len(set(codes.tolist())) > 1


def test_epochs_and_batches_see_different_transforms():
    images, masks = _batch()
    first = augment_batch(images, masks, batch_rng(7, 0, 0))
    assert not np.array_equal(first[2], augment_batch(images, masks, batch_rng(7, 1, 0))[2])
    assert not np.array_equal(first[2], augment_batch(images, masks, batch_rng(7, 0, 1))[2])
    assert not np.array_equal(first[0], augment_batch(images, masks, batch_rng(8, 0, 0))[0])
    # over 40 epochs one sample meets all 8 symmetries
    seen = {int(augment_batch(images, masks, batch_rng(7, e, 0))[2][0]) for e in range(40)}
    assert seen == set(range(8))


def test_same_seed_repeats_exactly():
    images, masks = _batch()
    a = augment_batch(images, masks, batch_rng(3, 2, 5))
    b = augment_batch(images, masks, batch_rng(3, 2, 5))
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_colour_jitter_is_mild_and_in_range():
    rng = np.random.default_rng(0)
    images = rng.integers(40, 216, (32, 16, 16, 3), dtype=np.uint8)
    out, _, codes = augment_batch(images, None, batch_rng(0, 0, 0), "flips+color")
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255
    plain = np.stack([dihedral(im, int(k)) for im, k in zip(images, codes)]).astype(np.float32)
    change = np.abs(out - plain).mean(axis=(1, 2, 3))
    assert change.max() < 40 and change.mean() > 1  # it does something, and not much


def test_none_leaves_the_batch_alone_and_unknown_mode_is_rejected():
    images, masks = _batch(4)
    out, out_masks, codes = augment_batch(images, masks, batch_rng(0, 0, 0), "none")
    assert np.array_equal(out, images) and out_masks is masks and not codes.any()
    with pytest.raises(ValueError, match="rotate"):
        augment_batch(images, masks, batch_rng(0, 0, 0), "rotate")


def test_undo_dihedral_inverts_every_symmetry():
    from dermtool.augment import dihedral, undo_dihedral

    x = np.arange(4 * 4 * 2).reshape(4, 4, 2)
    seen = set()
    for k in range(8):
        y = dihedral(x, k)
        seen.add(y.tobytes())
        np.testing.assert_array_equal(undo_dihedral(y, k), x)
    assert len(seen) == 8
