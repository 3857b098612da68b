"""Training-time augmentation: same geometry for image and mask, fresh randomness per sample and epoch."""

from __future__ import annotations

import numpy as np
import pytest

from dermtool.augment import augment_batch, augment_pairs, dihedral

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


# --- the groups that break acquisition cues (issue 17) and the resampling chain (issue 20) ---

from dermtool.augment import affine_matrix, parse_groups, random_affine, resampling_chain  # noqa: E402
from dermtool.augment import PAIR_NOISE_MAX, PAIR_SHIFT_MAX, pixel_jitter, shift_edge  # noqa: E402
from dermtool.augment import _warp  # noqa: E402


def test_groups_parse_in_canonical_order_and_refuse_unknown_names():
    assert parse_groups("none") == ()
    assert parse_groups("color-strong+flips+geometry") == ("flips", "color-strong", "geometry")
    assert parse_groups("flips+color") == ("flips", "color")
    with pytest.raises(ValueError, match="zoom"):
        parse_groups("flips+zoom")
    with pytest.raises(ValueError, match="not both"):
        parse_groups("color+color-strong")


def test_identity_and_quarter_turn_warps_are_exact():
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(_warp(img, affine_matrix(32, 1.0, 1.0, 0.0, 0.0, (0, 0)), Image.BILINEAR), img)
    turned = _warp(img, affine_matrix(32, 1.0, 1.0, 90.0, 0.0, (0, 0)), Image.NEAREST)
    assert any(np.array_equal(turned, np.rot90(img, k)) for k in (1, 3))


def test_a_window_of_half_the_area_magnifies_by_sqrt2():
    m = affine_matrix(64, 0.5, 1.0, 0.0, 0.0, (0, 0))
    assert np.allclose(m[:, :2], np.eye(2) * np.sqrt(0.5))
    centre = (64 - 1) / 2
    assert np.allclose(m @ np.array([centre, centre, 1.0]), [centre, centre])  # the centre stays


@pytest.mark.parametrize("mode", ["geometry", "flips+geometry+color-strong+chain"])
def test_geometry_moves_the_mask_with_its_image(mode):
    side = 64
    masks = np.zeros((16, side, side), np.uint8)  # an asymmetric L round the centre, as lesions are
    masks[:, 20:44, 26:34] = 1
    masks[:, 36:44, 26:46] = 1
    images = np.full((16, side, side, 3), 120, np.uint8)
    images[..., 0] = np.where(masks == 1, 190, 60)
    out, out_masks, _ = augment_batch(images, masks, batch_rng(3, 1, 2), mode)
    assert not np.array_equal(out_masks, masks)  # something moved
    for i in range(len(out)):
        red_minus_green = out[i, ..., 0] - out[i, ..., 1]
        lesion = out_masks[i] == 1
        assert lesion.any()
        # the lesion is the red part (60 vs 190 red before any colour change): at most the
        # interpolated edge pixels disagree
        agree = (red_minus_green > red_minus_green[lesion].min() - 1e-3) == lesion
        assert agree.mean() > 0.9


def test_a_missing_mask_stays_missing_under_geometry():
    images, masks = _batch(n=2, side=32)
    masks[1] = 255  # MISSING_MASK
    _, out_masks, _ = augment_batch(images, masks, batch_rng(0, 0, 0), "geometry")
    assert (out_masks[1] == 255).all() and set(np.unique(out_masks[0])) <= {0, 1}


def test_seeded_runs_repeat_and_the_chain_changes_only_the_image():
    images, masks = _batch(side=48)
    a = augment_batch(images, masks, batch_rng(5, 0, 0), "flips+geometry+color-strong+chain")
    b = augment_batch(images, masks, batch_rng(5, 0, 0), "flips+geometry+color-strong+chain")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    out, out_masks, _ = augment_batch(images, masks, batch_rng(1, 0, 0), "chain")
    assert np.array_equal(out_masks, masks)
    changed = [not np.array_equal(o.astype(np.uint8), im) for o, im in zip(out, images)]
    assert any(changed)
    assert images.dtype == np.uint8 and images[0, 0, 0, 0] == 60  # the caller's batch is untouched


def test_strong_colour_hue_rotation_keeps_grey_grey():
    from dermtool.augment import color_matrix

    grey = np.array([100.0, 100.0, 100.0])
    for hue, sat in ((10, 1.0), (-12, 1.3), (0, 0.7)):
        assert np.allclose(color_matrix(hue, sat) @ grey, grey)
    assert np.allclose(color_matrix(0, 0.0) @ np.array([200.0, 100.0, 50.0]),
                       np.full(3, 0.299 * 200 + 0.587 * 100 + 0.114 * 50))


def test_resampling_chain_keeps_shape_and_dtype():
    img = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    out = resampling_chain(img, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.uint8


from dermtool.augment import MISSING, crop_square, lesion_box  # noqa: E402


def test_lesion_box_is_the_square_around_the_lesion_with_its_margin():
    mask = np.zeros((100, 100), bool)
    mask[20:30, 30:50] = True  # 10 high, 20 wide, centre (40, 25)
    # side 20 * (1 + 2 * 0.15) = 26, centred: x0 = 40 - 13, y0 = 25 - 13
    assert lesion_box(mask) == pytest.approx((27.0, 12.0, 26.0))
    small = np.zeros((100, 100), bool)
    small[50:52, 50:52] = True  # 2.6 px would be a speck: a quarter of the frame at least
    assert lesion_box(small)[2] == pytest.approx(25.0)
    corner = np.zeros((100, 100), bool)
    corner[0:10, 0:10] = True  # kept inside the frame
    assert lesion_box(corner)[:2] == (0.0, 0.0)
    assert lesion_box(np.zeros((100, 100), bool)) is None
    assert lesion_box(np.ones((100, 100), bool)) is None  # the frame itself


def test_crop_square_enlarges_the_box_to_the_frame():
    image = np.zeros((100, 100, 3), np.uint8)
    image[:50, :50] = 200
    out = crop_square(image, (0.0, 0.0, 50.0))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[2:-2, 2:-2] == 200).all()


def test_lesion_crop_moves_masks_with_images_and_leaves_images_without_a_mask():
    rng = np.random.default_rng(0)
    images = np.zeros((8, 64, 64, 3), np.uint8)
    masks = np.zeros((8, 64, 64), np.uint8)
    for i in range(8):
        y, x = rng.integers(5, 35, 2)
        masks[i, y:y + 16, x:x + 20] = 1
        images[i][masks[i] == 1] = 255
    masks[7] = MISSING
    out, out_masks, _ = augment_batch(images, masks, np.random.default_rng(1), "lesion-crop")
    cropped = [i for i in range(7) if not np.array_equal(out[i], images[i])]
    assert 1 <= len(cropped) <= 6  # about half
    for i in cropped:
        bright, lesion = out[i][..., 0] > 127, out_masks[i] == 1
        assert lesion.sum() > masks[i].sum() * 2  # closer
        assert (bright & lesion).sum() / (bright | lesion).sum() > 0.9
    np.testing.assert_array_equal(out[7], images[7])
    again, _, _ = augment_batch(images, masks, np.random.default_rng(1), "lesion-crop")
    np.testing.assert_array_equal(out, again)


def test_pairs_share_crop_geometry_flip_and_colour_and_differ_by_the_chain():
    images, masks = _batch(8, side=48)
    x, m, codes = augment_pairs(images, masks, batch_rng(1, 0, 0), "flips+geometry+color-strong")
    assert x.shape == (16, 48, 48, 3) and m.shape == (16, 48, 48) and x.dtype == np.float32
    # one mask per pair, each copy moved by at most PAIR_SHIFT_MAX pixels: away from the edges the
    # two agree once one is moved by the difference of the two shifts
    k = 2 * PAIR_SHIFT_MAX
    for a, b in zip(m[0::2], m[1::2]):
        assert any(np.array_equal(shift_edge(a, dy, dx)[k:-k, k:-k], b[k:-k, k:-k])
                   for dy in range(-k, k + 1) for dx in range(-k, k + 1))
    np.testing.assert_array_equal(codes[0::2], codes[1::2])
    within = np.abs(x[0::2] - x[1::2]).mean()
    between = np.abs(x[0:-2:2] - x[2::2]).mean()  # one image against the next one's copy
    assert within < between / 2
    assert np.any(x[0::2] != x[1::2])  # the chains were drawn independently
    again, _, _ = augment_pairs(images, masks, batch_rng(1, 0, 0), "flips+geometry+color-strong")
    np.testing.assert_array_equal(x, again)


def test_pixel_jitter_moves_image_and_mask_together_and_adds_noise():
    images, masks = _batch(1, side=24)
    img, mask = images[0].astype(np.float32), masks[0]
    seen_shift = seen_still = False
    for seed in range(12):
        out, out_mask = pixel_jitter(img, mask, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.float32 and out_mask.shape == mask.shape
        assert out.min() >= 0 and out.max() <= 255
        # the shift that moves the mask also moves the image, to within the noise
        moves = [(dy, dx) for dy in range(-PAIR_SHIFT_MAX, PAIR_SHIFT_MAX + 1)
                 for dx in range(-PAIR_SHIFT_MAX, PAIR_SHIFT_MAX + 1) if np.array_equal(shift_edge(mask, dy, dx), out_mask)]
        assert moves
        assert min(np.abs(out - shift_edge(img, *d)).max() for d in moves) < 6 * PAIR_NOISE_MAX + 1
        seen_shift |= (0, 0) not in moves
        seen_still |= (0, 0) in moves
    assert seen_shift and seen_still


def test_shift_edge_repeats_the_edge():
    a = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(shift_edge(a, 0, 1), [[0, 0, 1, 2], [4, 4, 5, 6], [8, 8, 9, 10]])
    np.testing.assert_array_equal(shift_edge(a, -1, 0), [[4, 5, 6, 7], [8, 9, 10, 11], [8, 9, 10, 11]])


@pytest.mark.parametrize("shape", [(5, 7, 3, 3), (2, 1, 1, 3), (4, 16, 9, 1)])
def test_the_colour_matrix_product_is_einsums_bit_for_bit(shape):
    """color-strong's per-image 3x3 product is written out for speed; seeded runs must repeat
    exactly as with numpy's einsum."""
    from dermtool.augment import _per_image_matrix

    rng = np.random.default_rng(11)
    x = rng.uniform(0, 255, shape).astype(np.float32)
    mats = rng.uniform(-1.5, 1.5, (shape[0], 3, shape[-1])).astype(np.float32)
    got = _per_image_matrix(x, mats)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.einsum("nhwc,ndc->nhwd", x, mats))


from dermtool.augment import compose_dihedral, undo_dihedral  # noqa: E402


def test_compose_dihedral_is_one_symmetry_then_another():
    x = np.arange(20).reshape(4, 5)
    for a in range(8):
        for b in range(8):
            np.testing.assert_array_equal(dihedral(x, compose_dihedral(a, b)), dihedral(dihedral(x, a), b))


def test_pair_flips_turn_the_second_copy_and_its_mask_and_report_the_turn():
    images, masks = _batch(8, side=48)
    plain, plain_m, plain_codes = augment_pairs(images, masks, batch_rng(3, 0, 0), "flips+color")
    x, m, codes = augment_pairs(images, masks, batch_rng(3, 0, 0), "flips+color+pair-flips")
    # the turn is drawn last, so everything before it is the plain pipeline's
    np.testing.assert_array_equal(x[0::2], plain[0::2])
    np.testing.assert_array_equal(m[0::2], plain_m[0::2])
    np.testing.assert_array_equal(codes[0::2], plain_codes[0::2])
    turns = []
    for i in range(1, 16, 2):
        found = [k for k in range(8) if np.array_equal(dihedral(plain[i], k), x[i])]
        assert found and 0 not in found  # the second copy is turned, never left as it was
        k = found[0]
        np.testing.assert_array_equal(dihedral(plain_m[i], k), m[i])  # its mask with it
        assert codes[i] == compose_dihedral(int(plain_codes[i]), k)  # and the code says where it points
        turns.append(k)
    assert len(set(turns)) > 1  # each pair draws its own turn
    again, _, _ = augment_pairs(images, masks, batch_rng(3, 0, 0), "flips+color+pair-flips")
    np.testing.assert_array_equal(x, again)


def test_pair_anchor_keeps_the_first_image_as_it_was_and_the_second_as_the_plain_pairs():
    images, masks = _batch(8, side=48)
    plain, plain_m, plain_codes = augment_pairs(images, masks, batch_rng(4, 0, 0), "flips+color+lesion-crop")
    x, m, codes = augment_pairs(images, masks, batch_rng(4, 0, 0), "flips+color+lesion-crop+pair-anchor")
    # the same draws: the copies are the plain pairs' second images exactly
    np.testing.assert_array_equal(x[1::2], plain[1::2])
    np.testing.assert_array_equal(m[1::2], plain_m[1::2])
    np.testing.assert_array_equal(codes, plain_codes)
    # the first of each pair is the crop, flip and colour alone, rounded to 8 bits, with its mask unmoved
    base, base_m, base_codes = augment_batch(images, masks, batch_rng(4, 0, 0), "flips+color+lesion-crop")
    np.testing.assert_array_equal(x[0::2], np.clip(np.rint(base), 0, 255))
    np.testing.assert_array_equal(m[0::2], base_m)
    np.testing.assert_array_equal(codes[0::2], base_codes)
    assert np.any(plain[0::2] != x[0::2])  # where the plain pairs had a chain and noise
    again, _, _ = augment_pairs(images, masks, batch_rng(4, 0, 0), "flips+color+lesion-crop+pair-anchor")
    np.testing.assert_array_equal(x, again)


def test_pair_flips_change_nothing_outside_the_pairs():
    images, masks = _batch(8, side=48)
    a = augment_batch(images, masks, batch_rng(3, 0, 0), "flips+color")
    b = augment_batch(images, masks, batch_rng(3, 0, 0), "flips+color+pair-flips")
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


from dermtool.augment import CUTOUT_SIDE, cutout  # noqa: E402


def test_cutout_hides_one_square_in_half_of_the_images_and_leaves_the_masks():
    images, masks = _batch(16, side=48)
    plain, plain_m, _ = augment_batch(images, masks, batch_rng(4, 0, 0), "flips")
    x, m, _ = augment_batch(images, masks, batch_rng(4, 0, 0), "flips+cutout")
    np.testing.assert_array_equal(m, plain_m)  # the lesion is still there, only hidden
    hidden = 0
    for before, after in zip(plain, x):
        changed = np.any(before != after, axis=-1)
        if not changed.any():
            continue
        hidden += 1
        ys, xs = np.nonzero(changed)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        patch = after[y0:y1, x0:x1].reshape(-1, 3)
        np.testing.assert_array_equal(patch, np.broadcast_to(np.rint(before.reshape(-1, 3).mean(0)), patch.shape))
        inside = y1 - y0 == x1 - x0 or 0 in (y0, x0) or 48 in (y1, x1)  # a square, or cut by the frame
        assert inside and max(y1 - y0, x1 - x0) <= round(CUTOUT_SIDE[1] * 48)
    assert 3 <= hidden <= 13  # half of 16, give or take the draws


def test_cutout_fills_with_the_mean_colour_by_hand():
    image = np.zeros((10, 10, 3), np.uint8)
    image[:, :5] = (200, 100, 0)  # mean colour (100, 50, 0)
    rng = np.random.default_rng(0)
    outs = [cutout(image, rng) for _ in range(40)]
    cut = [o for o in outs if not np.array_equal(o, image)]
    assert cut and len(cut) < 40
    for o in cut:
        diff = np.any(o != image, axis=-1)
        assert {tuple(v) for v in o[diff]} <= {(100, 50, 0)}


from dermtool.augment import MIXUP_RATE, mixup  # noqa: E402


def _marked_batch(n: int, copies: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Image u (of n // copies) is black but for pixel u, 100 in channel c for copy c: a blend
    shows who mixed with whom and by how much. One-hot labels cycle over the 3 classes."""
    units, side = n // copies, int(np.ceil(np.sqrt(n // copies)))
    x = np.zeros((n, side, side, 3), np.float32)
    for u in range(units):
        for c in range(copies):
            x[u * copies + c].reshape(-1, 3)[u, c] = 100.0
    return x, np.repeat(np.eye(3, dtype=np.float32)[np.arange(units) % 3], copies, axis=0)


def _blend_of(image: np.ndarray, channel: int = 0) -> dict[int, float]:
    """{unit: weight} of the units blended into a marked image."""
    flat = image.reshape(-1, 3)[:, channel]
    return {int(k): float(flat[k]) / 100.0 for k in np.flatnonzero(flat)}


def test_mixup_blends_images_and_targets_by_one_dominant_weight():
    x, y = _marked_batch(400)
    mx, my = mixup(x, y, np.random.default_rng(0))
    mixed = 0
    for i in range(400):
        blend = _blend_of(mx[i])
        if blend == {i: 1.0}:
            np.testing.assert_array_equal(my[i], y[i])
            continue
        mixed += 1
        (j, partner_share), = [(k, w) for k, w in blend.items() if k != i]
        lam = blend[i]
        assert 0.5 <= lam <= 1.0 and np.isclose(lam + partner_share, 1.0)
        np.testing.assert_allclose(my[i], lam * y[i] + (1 - lam) * y[j], atol=1e-6)
    assert 0.8 * MIXUP_RATE * 400 <= mixed <= 1.1 * MIXUP_RATE * 400  # about MIXUP_RATE of the images
    np.testing.assert_array_equal(mixup(x, y, np.random.default_rng(0))[0], mx)  # seeded: repeats
    np.testing.assert_array_equal(x, _marked_batch(400)[0])  # the input batch is left as it was


def test_mixup_leaves_unlabelled_and_partial_rows_out_on_both_sides():
    x, y = _marked_batch(60)
    y[::4] = 0.0  # no label
    y[1::4] = [-1.0, 0.0, 0.0]  # not melanoma, a partial label
    mx, my = mixup(x, y, np.random.default_rng(5))
    out = np.zeros(60, bool)
    out[::4] = out[1::4] = True
    np.testing.assert_array_equal(mx[out], x[out])
    np.testing.assert_array_equal(my[out], y[out])
    partners = [k for i in np.flatnonzero(~out) for k in _blend_of(mx[i]) if k != i]
    assert partners  # some labelled rows did mix
    assert not out[partners].any()  # and only with labelled ones


def test_mixup_blends_consistency_pairs_as_pairs():
    x, y = _marked_batch(80, copies=2)
    mx, my = mixup(x, y, np.random.default_rng(2), pair_size=2)
    n_mixed = 0
    for u in range(40):
        first, second = _blend_of(mx[2 * u], 0), _blend_of(mx[2 * u + 1], 1)
        assert first == second  # one partner pair and one weight for both copies
        assert not _blend_of(mx[2 * u], 1) and not _blend_of(mx[2 * u + 1], 0)  # copy with copy
        np.testing.assert_array_equal(my[2 * u], my[2 * u + 1])
        n_mixed += first != {u: 1.0}
    assert n_mixed > 5
    with pytest.raises(ValueError, match="units of 2"):
        mixup(x[:3], y[:3], np.random.default_rng(0), pair_size=2)
