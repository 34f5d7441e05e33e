"""NSD and HD95 cross-checked against MONAI (issue #14), on random masks with anisotropic spacing.

Relations tested here are the ones documented in documentation/evaluation.md ("Cross-check"):

* NSD equals MONAI's ``compute_surface_dice(use_subvoxels=False)`` within 1e-6 (same surface: face
  erosion with the array edge as background; same exact Euclidean distances in mm).
* The directed surface distances are the same multiset as MONAI's (float32 there, so rel 2^-24).
* HD95 equals MONAI's ``compute_hausdorff_distance(percentile=95)`` up to MONAI's float32
  arithmetic: within rel 2e-7 of the same linear percentile taken of MONAI's distances in float64,
  and within rel 1e-5 of MONAI's own float32 ``torch.quantile`` result.
* Empty masks: MONAI gives NaN where we give a finite worst value (see the decision table).
"""
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from tskd_nnunet.evaluation.metrics import compute_scores, fov_diagonal_mm, surface_distances

REPO = Path(__file__).resolve().parents[1]

CASES = [(2, (48, 56), (0.7, 1.3)), (3, (16, 22, 20), (2.5, 0.8, 0.6))]


def random_pair(seed, shape):
    rng = np.random.default_rng(seed)
    while True:
        sigma = rng.uniform(1.0, 3.0)
        p = ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > rng.uniform(-0.05, 0.1) / sigma
        r = ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > rng.uniform(-0.05, 0.1) / sigma
        if p.any() and r.any() and (~p).any() and (~r).any():
            return p, r, float(rng.uniform(0.5, 4.0))


@pytest.fixture(scope="module")
def monai():
    m = pytest.importorskip("monai.metrics", reason="pip install -c constraints.txt '.[test]' for the cross-check")
    import torch

    torch.set_num_threads(1)
    return m


def onehot(mask):
    import torch

    m = torch.as_tensor(np.asarray(mask, bool))
    return torch.stack([~m, m])[None].float()  # (batch 1, background + class, *spatial)


def monai_scores(m, pred, ref, spacing, tau):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks
        nsd = m.compute_surface_dice(onehot(pred), onehot(ref), [tau], spacing=list(spacing)).item()
        hd95 = m.compute_hausdorff_distance(onehot(pred), onehot(ref), percentile=95, spacing=list(spacing)).item()
    return nsd, hd95


@pytest.mark.parametrize("dims, shape, spacing", CASES, ids=["2d", "3d"])
@pytest.mark.parametrize("seed", range(4))
def test_nsd_and_hd95_agree_with_monai(monai, dims, shape, spacing, seed):
    pred, ref, tau = random_pair(seed + 10 * dims, shape)
    ours = compute_scores(pred, ref, spacing, tau)
    nsd, hd95 = monai_scores(monai, pred, ref, spacing, tau)
    assert 0.0 < ours.nsd < 1.0  # a non-trivial case
    assert ours.nsd == pytest.approx(nsd, abs=1e-6)
    assert ours.hd95 == pytest.approx(hd95, rel=1e-5)


@pytest.mark.parametrize("dims, shape, spacing", CASES, ids=["2d", "3d"])
def test_surface_distances_are_monais(monai, dims, shape, spacing):
    from monai.metrics.utils import get_edge_surface_distance
    import torch

    pred, ref, _ = random_pair(99 + dims, shape)
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    _, (m_pr, m_rp), _ = get_edge_surface_distance(torch.as_tensor(pred), torch.as_tensor(ref),
                                                   spacing=list(spacing), symmetric=True)
    for ours, theirs in ((d_pr, m_pr), (d_rp, m_rp)):
        theirs = np.sort(theirs.numpy().astype(np.float64))
        assert ours.size == theirs.size  # same surface voxels
        np.testing.assert_allclose(np.sort(ours), theirs, rtol=2 ** -23, atol=0)  # MONAI returns float32
        # HD95's directed percentile: same numpy/torch linear rule; only float32 rounding differs
        assert np.percentile(ours, 95) == pytest.approx(np.percentile(theirs, 95), rel=2e-7)


def test_empty_masks_ours_finite_monai_nan(monai):
    spacing = (0.7, 1.3)
    ref = np.zeros((20, 30), bool)
    ref[5:10, 5:15] = True
    empty = np.zeros_like(ref)
    fov = fov_diagonal_mm(ref.shape, spacing)
    for pred, gt in ((empty, ref), (ref, empty)):  # missed structure, hallucinated structure
        ours = compute_scores(pred, gt, spacing, 1.0)
        nsd, hd95 = monai_scores(monai, pred, gt, spacing, 1.0)
        assert (ours.dice, ours.nsd, ours.hd95) == (0.0, 0.0, pytest.approx(fov))
        assert nsd == 0.0 and np.isnan(hd95)  # MONAI: NSD 0, HD95 NaN (drops out of a nanmean)
    ours = compute_scores(empty, empty, spacing, 1.0)
    nsd, hd95 = monai_scores(monai, empty, empty, spacing, 1.0)
    assert (ours.dice, ours.nsd, ours.hd95) == (1.0, 1.0, 0.0)
    assert np.isnan(nsd) and np.isnan(hd95)


def test_monai_is_in_the_test_extra_and_pinned():
    setup_py = (REPO / "setup.py").read_text()
    extra = re.search(r'extras_require=\{"test": \[(.*?)\]\}', setup_py, re.S)
    assert extra and re.search(r'"monai[=<>!~]', extra.group(1)), "monai missing from the test extra"
    pins = [ln for ln in (REPO / "constraints.txt").read_text().splitlines() if ln.startswith("monai==")]
    assert len(pins) == 1, "constraints.txt must pin monai exactly once"
