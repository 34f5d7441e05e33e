"""Head circumference against analytically drawn ellipses; volume against a known cube."""
from pathlib import Path

import numpy as np
import pytest

from tskd_nnunet.evaluation.clinical import (default_hc18_filename, fit_ellipse_moments, hc18_case_to_filename,
                                             head_circumference_mm, ramanujan_perimeter, read_hc18_csv, volume_ml)

HC18 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hc18_fetal_head_us"


def draw_ellipse(shape, center, a, b, angle, spacing=(1.0, 1.0)):
    """Filled ellipse in mm coordinates (a along `angle` from the row axis)."""
    r, c = np.indices(shape, dtype=float)
    y = r * spacing[0] - center[0]
    x = c * spacing[1] - center[1]
    u = y * np.cos(angle) + x * np.sin(angle)
    v = -y * np.sin(angle) + x * np.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def test_ramanujan_circle_and_degenerate():
    assert ramanujan_perimeter(3.0, 3.0) == pytest.approx(2 * np.pi * 3.0)
    # flat ellipse (b=0): true perimeter 4a; Ramanujan gives pi(3 - sqrt 3) a = 3.983a, 0.42% low
    assert ramanujan_perimeter(1.0, 0.0) == pytest.approx(4.0, rel=5e-3)


@pytest.mark.parametrize("angle", [0.0, np.deg2rad(30), np.deg2rad(100)])
def test_head_circumference_of_drawn_ellipse(angle):
    px = 0.1  # mm, HC18-like
    a, b = 12.0, 8.0  # mm -> 120 x 80 px semi-axes
    mask = draw_ellipse((300, 300), (15.0, 15.0), a, b, angle, (px, px))
    e = fit_ellipse_moments(mask, (px, px))
    assert e.semi_major == pytest.approx(a, rel=5e-3)
    assert e.semi_minor == pytest.approx(b, rel=5e-3)
    assert head_circumference_mm(mask, (px, px)) == pytest.approx(ramanujan_perimeter(a, b), rel=5e-3)


def test_head_circumference_anisotropic_pixels_and_speckle():
    sp = (0.2, 0.1)
    mask = draw_ellipse((200, 300), (20.0, 15.0), 10.0, 6.0, np.deg2rad(20), sp)
    mask[2, 2] = True  # speckle far away: removed by the largest component
    mask[100, 150] = False  # hole: filled
    assert head_circumference_mm(mask, sp) == pytest.approx(ramanujan_perimeter(10.0, 6.0), rel=5e-3)


def test_empty_head_mask_gives_zero():
    assert head_circumference_mm(np.zeros((10, 10), bool)) == 0.0


def test_volume_of_known_cube():
    m = np.zeros((20, 20, 20), bool)
    m[2:12, 2:12, 2:12] = True  # 1000 voxels
    assert volume_ml(m, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert volume_ml(m, (2.5, 0.8, 0.5)) == pytest.approx(1.0)
    assert volume_ml(m, (3.0, 1.0, 1.0)) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        volume_ml(m, (1.0, 1.0))


def test_hc18_filename_mapping():
    assert default_hc18_filename("HC18_007") == "007_HC.png"
    assert default_hc18_filename("007_HC") == "007_HC.png"


@pytest.mark.parametrize("case, name", [
    ("hc18_007", "007_HC.png"), ("hc18_010_2", "010_2HC.png"), ("hc18_123_3", "123_3HC.png"),
    ("HC18_007", "007_HC.png"), ("007_HC", "007_HC.png"), ("010_2HC", "010_2HC.png")])
def test_hc18_repeat_exams_map_to_their_own_row(case, name):
    # issue #13: hc18_010_2 (Dataset501_HC18's name for 010_2HC.png) used to map to 002_HC.png
    assert hc18_case_to_filename(case) == name
    assert default_hc18_filename(case) == name


def test_benchmark_uses_the_same_hc18_mapper():
    # the runner scores through evaluate_test_folder (as tskd_evaluate does: its repeat-exam test in
    # test_evaluation_folder), which calls evaluate_hc18_folder with its default mapper
    import inspect

    from tskd_nnunet.benchmark import actions
    from tskd_nnunet.evaluation import clinical

    assert "evaluate_test_folder(" in inspect.getsource(actions.evaluate)
    assert "case_to_filename" not in inspect.getsource(clinical.evaluate_test_folder)
    from tskd_nnunet.evaluation.clinical import evaluate_hc18_folder
    assert inspect.signature(evaluate_hc18_folder).parameters["case_to_filename"].default is hc18_case_to_filename


def test_hc18_mapper_refuses_unknown_ids():
    with pytest.raises(ValueError, match="hc18_007"):
        hc18_case_to_filename("case_x")


@pytest.mark.skipif(not HC18.is_dir(), reason=f"HC18 data not found at {HC18}")
def test_real_hc18_masks_reproduce_expert_hc():
    from PIL import Image

    ref = read_hc18_csv(HC18 / "pixel_size_and_HC.csv")
    for name in ("000_HC.png", "001_HC.png", "002_HC.png"):
        px, hc = ref[name]
        mask = np.asarray(Image.open(HC18 / "masks" / name)) > 0
        assert head_circumference_mm(mask, (px, px)) == pytest.approx(hc, rel=0.02)
