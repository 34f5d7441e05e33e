"""Metrics against hand-computed values (see documentation/evaluation.md for the conventions)."""
import math

import numpy as np
import pytest

from tskd_nnunet.evaluation.metrics import (compute_scores, evaluate_segmentation, fov_diagonal_mm,
                                            labels_from_dataset_json, surface_voxels)


def square(shape=(10, 10), rows=(2, 6), cols=(2, 6)):
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def test_surface_of_square_is_its_ring():
    s = surface_voxels(square())
    assert s.sum() == 12  # 4x4 square: 16 - 4 interior
    assert not s[3:5, 3:5].any()


def test_identical_masks_are_perfect():
    m = square()
    s = compute_scores(m, m, (0.5, 0.7), tolerance_mm=0.0)
    assert (s.dice, s.nsd, s.hd95) == (1.0, 1.0, 0.0)


def test_one_pixel_offset_isotropic():
    # ref cols 2..5, pred cols 3..6 (4x4 squares). Hand count: each surface has 12 voxels,
    # 6 at distance 0 (shared rows 2/5, cols 3..5) and 6 at distance 1.
    ref, pred = square(), square(cols=(3, 7))
    s = compute_scores(pred, ref, (1.0, 1.0), tolerance_mm=0.5)
    assert s.dice == pytest.approx(2 * 12 / 32)
    assert s.nsd == pytest.approx(12 / 24)
    assert s.hd95 == pytest.approx(1.0)
    assert compute_scores(pred, ref, (1.0, 1.0), tolerance_mm=1.0).nsd == pytest.approx(1.0)


def test_one_pixel_offset_anisotropic():
    # same masks, column spacing 2 mm: per direction 6 at 0 mm, 2 at 1 mm (interior-adjacent
    # voxels reach the other surface vertically), 4 at 2 mm -> NSD@1mm = 16/24, HD95 = 2 mm.
    ref, pred = square(), square(cols=(3, 7))
    s = compute_scores(pred, ref, (1.0, 2.0), tolerance_mm=1.0)
    assert s.dice == pytest.approx(0.75)  # Dice ignores spacing on a regular grid
    assert s.nsd == pytest.approx(16 / 24)
    assert s.hd95 == pytest.approx(2.0)
    # swapping the axes' spacing changes the result: spacing order must follow array axes
    s2 = compute_scores(pred, ref, (2.0, 1.0), tolerance_mm=1.0)
    assert s2.hd95 == pytest.approx(1.0)


def test_3d_cube_shift_along_thick_axis():
    # 3x3x3 cubes shifted one slice along z (3 mm). Per direction: 16 voxels at 0, the centre of
    # the overlapping face at 1 mm, the 9 voxels of the far face at 3 mm.
    ref = np.zeros((7, 7, 7), bool)
    ref[1:4, 2:5, 2:5] = True
    pred = np.roll(ref, 1, axis=0)
    s = compute_scores(pred, ref, (3.0, 1.0, 1.0), tolerance_mm=2.0)
    assert s.dice == pytest.approx(2 * 18 / 54)
    assert s.nsd == pytest.approx(34 / 52)
    assert s.hd95 == pytest.approx(3.0)


def test_empty_conventions():
    shape, sp = (10, 20), (1.0, 2.0)
    diag = math.hypot(10 * 1.0, 20 * 2.0)
    empty, full = np.zeros(shape, bool), square(shape)
    both = compute_scores(empty, empty, sp)
    assert (both.dice, both.nsd, both.hd95) == (1.0, 1.0, 0.0)
    for pred, ref in ((empty, full), (full, empty)):
        s = compute_scores(pred, ref, sp)
        assert (s.dice, s.nsd) == (0.0, 0.0)
        assert s.hd95 == pytest.approx(diag)
    assert fov_diagonal_mm(shape, sp) == pytest.approx(diag)


def test_spacing_shape_checked():
    with pytest.raises(ValueError):
        compute_scores(square(), square(), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        compute_scores(square(), square((11, 10)))


def test_dataset_json_labels_and_regions():
    classes, ignore = labels_from_dataset_json({"background": 0, "liver": 1, "kidney": [2, 3], "ignore": 9})
    assert classes == {"liver": 1, "kidney": (2, 3)} and ignore == 9
    ref = np.zeros((8, 8), np.uint8)
    ref[1:4, 1:4] = 2
    ref[5:7, 5:7] = 1
    ref[0, :] = 9
    pred = ref.copy()
    pred[1:4, 1:4] = 3  # other member of the region: region still perfect
    pred[0, :] = 1  # prediction inside the ignore area does not count
    out = evaluate_segmentation(pred, ref, classes, (1.0, 1.0), 1.0, ignore)
    assert out["kidney"].dice == 1.0
    assert out["liver"].dice == 1.0 and out["liver"].pred_voxels == 4
