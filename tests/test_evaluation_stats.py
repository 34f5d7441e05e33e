"""Statistics against hand-computed values, an independent numpy reference and scipy."""
import numpy as np
import pytest
from scipy import stats as sps

from tskd_nnunet.evaluation.stats import bootstrap_ci, holm_adjust, mean_sd, paired_wilcoxon, rank_biserial

DATA = np.array([0.81, 0.77, 0.92, 0.64, 0.88, 0.71, 0.95, 0.69, 0.83, 0.79, 0.58, 0.90, 0.74, 0.86, 0.67])


def test_mean_sd():
    m, sd = mean_sd(list(DATA) + [np.nan])
    assert m == pytest.approx(DATA.mean())
    assert sd == pytest.approx(np.sqrt(((DATA - DATA.mean()) ** 2).sum() / (DATA.size - 1)))
    assert np.isnan(mean_sd([1.0])[1])


def _reference_bootstrap(x, n_resamples, seed, conf=0.95):
    # independent per-resample loop with its own RNG stream
    rng = np.random.default_rng(seed)
    means = np.array([x[rng.integers(0, x.size, x.size)].mean() for _ in range(n_resamples)])
    return np.percentile(means, [50 * (1 - conf), 100 - 50 * (1 - conf)])


def test_bootstrap_matches_reference_and_scipy():
    lo, hi = bootstrap_ci(DATA, n_resamples=20000, seed=1)
    width = hi - lo
    # different random streams: agree to a few percent of the CI width, far tighter than what a
    # wrong method (e.g. mean ± sd, or a 90% interval) would give
    ref = _reference_bootstrap(DATA, 20000, seed=7)
    assert lo == pytest.approx(ref[0], abs=0.05 * width) and hi == pytest.approx(ref[1], abs=0.05 * width)
    sc = sps.bootstrap((DATA,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95,
                       random_state=np.random.default_rng(3)).confidence_interval
    assert lo == pytest.approx(sc.low, abs=0.05 * width) and hi == pytest.approx(sc.high, abs=0.05 * width)
    assert lo < DATA.mean() < hi


def test_bootstrap_seeded_and_degenerate():
    assert bootstrap_ci(DATA, n_resamples=500, seed=5) == bootstrap_ci(DATA, n_resamples=500, seed=5)
    assert bootstrap_ci([0.5] * 8) == (0.5, 0.5)
    assert all(np.isnan(bootstrap_ci([])))


def test_wilcoxon_exact_hand_values():
    y = np.zeros(6)
    # all six differences positive: exact two-sided p = 2 / 2^6, r = 1
    r = paired_wilcoxon(np.arange(1.0, 7.0), y)
    assert r.p_value == pytest.approx(2 / 64) and r.rank_biserial == pytest.approx(1.0) and r.n == 6
    # signs + - + + - +: T+ = 14, T- = 7, r = 7/21; P(T <= 7) = 18/64: subsets of 1..6 with sum 0..7 number 1,1,1,2,2,3,4,4
    r = paired_wilcoxon(np.array([1.0, -2, 3, 4, -5, 6]), y)
    assert r.statistic == 7.0
    assert r.p_value == pytest.approx(2 * 18 / 64)
    assert r.rank_biserial == pytest.approx(1 / 3)


def test_wilcoxon_matches_scipy_and_drops_zeros():
    rng = np.random.default_rng(0)
    x = rng.normal(0.8, 0.05, 30)
    y = x - rng.normal(0.01, 0.02, 30)
    y[:3] = x[:3]  # zero differences are dropped
    r = paired_wilcoxon(x, y)
    d = (x - y)[3:]
    assert r.n == 27
    assert r.p_value == pytest.approx(sps.wilcoxon(d).pvalue)
    assert r.rank_biserial == pytest.approx(rank_biserial(d))
    # antisymmetric effect size
    assert paired_wilcoxon(y, x).rank_biserial == pytest.approx(-r.rank_biserial)


def test_wilcoxon_degenerate():
    r = paired_wilcoxon([0.5, 0.6], [0.5, 0.6])
    assert (r.p_value, r.rank_biserial, r.n) == (1.0, 0.0, 0)
    with pytest.raises(ValueError):
        paired_wilcoxon([1.0], [1.0, 2.0])


def test_holm():
    adj = holm_adjust([0.01, 0.04, 0.03, np.nan])
    # sorted 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    np.testing.assert_allclose(adj[:3], [0.03, 0.06, 0.06])
    assert np.isnan(adj[3])
