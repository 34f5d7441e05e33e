"""Does a shorter schedule rank the arms as the longer one does? (``tskd_report --compare-profiles``)

The real benchmarks use the ``cpu`` profile (50 epochs x 50 iterations) unless a shorter one (``cpu_short``,
20 x 15) is shown to rank the arms the same way (documentation/benchmarking.md). This compares two committed
folders of one benchmark, budget by budget, over the arms done in both and the test cases both evaluated:

* the order of the arms by mean case value (Kendall's tau; ``same_order`` = identical order), and
* each arm's verdict against the baseline (paired bootstrap 95% CI of the difference: ``better`` / ``worse``
  when it excludes 0, else ``n.s.``); ``same_verdicts`` = every arm gets the same verdict in both.

A budget *agrees* when both hold. Ties in the mean count as different orders only if the profiles break them
differently, which at 3 decimals practically never happens; that is why the verdicts are reported beside it.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from tskd_nnunet.atomic_io import atomic_write_csv, atomic_write_text
from tskd_nnunet.benchmark.committed import open_committed
from tskd_nnunet.benchmark.plots import sorted_budgets
from tskd_nnunet.benchmark.report import (BASELINE, LOWER_IS_BETTER, _fmt, _prepare, case_values, md_table)
from tskd_nnunet.evaluation.stats import bootstrap_ci


def _case_table(root: str, metric: str) -> pd.DataFrame:
    results, runs = open_committed(root).load()
    results, _, _ = _prepare(results, runs)
    return case_values(results, [metric])


def _verdict(diff: np.ndarray, lower_is_better: bool, n_resamples: int, seed: int
             ) -> Tuple[float, float, float, str]:
    """Mean paired difference (arm − baseline), its percentile-bootstrap 95% CI, and better / worse / n.s."""
    if diff.size == 0:
        return np.nan, np.nan, np.nan, "n.s."
    lo, hi = bootstrap_ci(diff, n_resamples=n_resamples, seed=seed)
    above, below = ("worse", "better") if lower_is_better else ("better", "worse")
    return float(diff.mean()), lo, hi, (above if lo > 0 else below if hi < 0 else "n.s.")


def compare_profiles(short_dir: str, long_dir: str, metric: str = "dice", baseline: str = BASELINE,
                     n_resamples: int = 10000, seed: int = 0) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(per_arm, per_budget) tables comparing the arms of two committed folders; see the module docstring.

    ``per_arm``: dataset, budget, method, n_cases, mean/rank in each profile, difference vs ``baseline`` with
    its CI and verdict in each. ``per_budget``: n_arms, kendall_tau, same_order, same_verdicts, agree.
    """
    cvs = {"short": _case_table(short_dir, metric), "long": _case_table(long_dir, metric)}
    lower_is_better = metric in LOWER_IS_BETTER
    arm_rows: List[Dict] = []
    budget_rows: List[Dict] = []
    keys = ["dataset", "budget"]
    both = cvs["short"][keys].drop_duplicates().merge(cvs["long"][keys].drop_duplicates())
    for ds in dict.fromkeys(both["dataset"]):
        for b in sorted_budgets(both.loc[both["dataset"] == ds, "budget"]):
            tabs = {p: cv[(cv["dataset"] == ds) & (cv["budget"] == b)].pivot_table(
                index="case", columns="method", values=metric) for p, cv in cvs.items()}
            methods = [m for m in tabs["short"].columns if m in tabs["long"].columns]
            cases = tabs["short"].index.intersection(tabs["long"].index)
            if len(methods) < 2 or len(cases) == 0:
                continue
            rows = []
            for m in methods:
                row = {"dataset": ds, "budget": b, "method": m, "n_cases": len(cases)}
                for p, t in tabs.items():
                    x = t.loc[cases, m].to_numpy(float)
                    row[f"mean_{p}"] = float(np.nanmean(x))
                    if m != baseline and baseline in methods:
                        d = x - t.loc[cases, baseline].to_numpy(float)
                        mean, lo, hi, v = _verdict(d[np.isfinite(d)], lower_is_better, n_resamples, seed)
                        row.update({f"diff_{p}": mean, f"ci_lo_{p}": lo, f"ci_hi_{p}": hi, f"verdict_{p}": v})
                rows.append(row)
            df = pd.DataFrame(rows)
            for p in cvs:
                df[f"rank_{p}"] = df[f"mean_{p}"].rank(method="min", ascending=lower_is_better).astype(int)
            arm_rows += df.to_dict("records")
            tau = float(kendalltau(df["mean_short"], df["mean_long"]).statistic)
            same_order = bool((df["rank_short"] == df["rank_long"]).all())
            if "verdict_short" in df:
                v = df.dropna(subset=["verdict_short"])
                same_verdicts = bool((v["verdict_short"] == v["verdict_long"]).all())
            else:
                same_verdicts = True
            budget_rows.append({"dataset": ds, "budget": b, "n_arms": len(df), "n_cases": len(cases),
                                "kendall_tau": tau, "same_order": same_order, "same_verdicts": same_verdicts,
                                "agree": same_order and same_verdicts})
    return pd.DataFrame(arm_rows), pd.DataFrame(budget_rows, columns=[
        "dataset", "budget", "n_arms", "n_cases", "kendall_tau", "same_order", "same_verdicts", "agree"])


def write_profile_agreement(short_dir: str, long_dir: str, out_dir: Optional[str] = None, metric: str = "dice",
                            baseline: str = BASELINE, n_resamples: int = 10000, seed: int = 0) -> Dict[str, str]:
    """Write profile_agreement.md / _arms.csv / _budgets.csv into ``out_dir`` (default: ``short_dir``)."""
    arms, budgets = compare_profiles(short_dir, long_dir, metric, baseline, n_resamples, seed)
    out_dir = out_dir or short_dir
    os.makedirs(out_dir, exist_ok=True)
    names = {p: os.path.basename(os.path.normpath(d)) for p, d in (("short", short_dir), ("long", long_dir))}
    lines = [f"# Do `{names['short']}` and `{names['long']}` rank the arms the same way? ({metric})", "",
             f"Arms done in both folders, test cases evaluated in both; verdict vs `{baseline}`: paired bootstrap "
             f"95% CI of the difference ({n_resamples} resamples, seed {seed}) excludes 0 (better / worse) or not "
             f"(n.s.). A budget agrees when the order of the arms and every verdict are the same.", ""]
    if budgets.empty:
        lines.append("No budget has two or more arms done in both folders yet.")
    else:
        lines += [md_table(["dataset", "budget", "arms", "cases", "Kendall tau", "same order", "same verdicts",
                            "agree"],
                           [[str(r.dataset), str(r.budget), str(r.n_arms), str(r.n_cases), _fmt(r.kendall_tau, 2),
                             "yes" if r.same_order else "no", "yes" if r.same_verdicts else "no",
                             "**yes**" if r.agree else "**no**"] for r in budgets.itertuples()]), ""]
        rows = []
        for r in arms.to_dict("records"):
            cells = [str(r["budget"]), r["method"]]
            for p in ("short", "long"):
                diff = (f"{_fmt(r[f'diff_{p}'])} [{_fmt(r[f'ci_lo_{p}'])}, {_fmt(r[f'ci_hi_{p}'])}] "
                        f"{r[f'verdict_{p}']}" if isinstance(r.get(f"verdict_{p}"), str) else "")
                cells += [_fmt(r[f"mean_{p}"]), str(r[f"rank_{p}"]), diff]
            rows.append(cells)
        lines += [md_table(["budget", "method", f"{metric} {names['short']}", "rank", f"vs {baseline}",
                            f"{metric} {names['long']}", "rank", f"vs {baseline}"], rows), ""]
    written = {"profile_agreement.md": atomic_write_text(os.path.join(out_dir, "profile_agreement.md"),
                                                         "\n".join(lines)),
               "profile_agreement_arms.csv": atomic_write_csv(arms, os.path.join(out_dir, "profile_agreement_arms.csv")),
               "profile_agreement_budgets.csv": atomic_write_csv(
                   budgets, os.path.join(out_dir, "profile_agreement_budgets.csv"))}
    return {k: str(v) for k, v in written.items()}
