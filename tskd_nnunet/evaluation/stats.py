"""Statistics for the benchmark: mean ± sd, percentile bootstrap CI, paired Wilcoxon with effect size.

Unit of analysis is the test case (one value per case, e.g. the mean over classes and seeds);
cases, not voxels or seeds, are the independent samples the CI and test speak about.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import numpy as np
from scipy import stats as sps


def _clean(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def mean_sd(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of the finite values; sd is NaN for n < 2."""
    v = _clean(values)
    if v.size == 0:
        return float("nan"), float("nan")
    sd = float(np.std(v, ddof=1)) if v.size > 1 else float("nan")
    return float(np.mean(v)), sd


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0,
                 statistic: Callable[[np.ndarray], np.ndarray] = lambda x: np.mean(x, axis=-1),
                 chunk: int = 2000) -> Tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` (default: the mean) over resampled cases.

    Seeded (numpy default_rng) so a report is reproducible. ``statistic`` must reduce the last
    axis of a (resamples, n) array. Resamples are drawn in chunks to bound memory.
    """
    v = _clean(values)
    if v.size == 0:
        return float("nan"), float("nan")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    rng = np.random.default_rng(seed)
    boot = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, v.size, size=(stop - start, v.size))
        boot[start:stop] = statistic(v[idx])
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(boot, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


@dataclass(frozen=True)
class WilcoxonResult:
    n: int  # pairs with a non-zero difference (those the test uses)
    statistic: float  # scipy's statistic: min(T+, T-) for two-sided
    p_value: float
    rank_biserial: float  # (T+ - T-) / (T+ + T-), in [-1, 1]; > 0 means x > y
    median_diff: float  # median of x - y over all finite pairs


def rank_biserial(diff: Sequence[float]) -> float:
    """Matched-pairs rank-biserial correlation of paired differences (zeros dropped, mean ranks for ties)."""
    d = np.asarray(diff, dtype=float)
    d = d[np.isfinite(d) & (d != 0)]
    if d.size == 0:
        return 0.0
    ranks = sps.rankdata(np.abs(d))
    t_plus, t_minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((t_plus - t_minus) / (t_plus + t_minus))


def paired_wilcoxon(x: Sequence[float], y: Sequence[float]) -> WilcoxonResult:
    """Two-sided Wilcoxon signed-rank test of paired samples x vs y, with rank-biserial effect size.

    Pairs with a non-finite member are dropped; zero differences are dropped (Wilcoxon's
    convention, scipy zero_method='wilcox'); scipy picks the exact distribution for small n.
    All-zero differences give p = 1 and r = 0 (no evidence of a difference).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal shapes, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    med = float(np.median(d)) if d.size else float("nan")
    nz = d[d != 0]
    if d.size == 0:
        return WilcoxonResult(0, float("nan"), float("nan"), float("nan"), med)
    if nz.size == 0:
        return WilcoxonResult(0, 0.0, 1.0, 0.0, med)
    res = sps.wilcoxon(nz, zero_method="wilcox", alternative="two-sided")
    return WilcoxonResult(int(nz.size), float(res.statistic), float(res.pvalue), rank_biserial(nz), med)


def holm_adjust(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaNs are kept and not counted as tests)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.where(np.isfinite(p))[0]
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adj
    return out
