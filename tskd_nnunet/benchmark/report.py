"""Benchmark report: Markdown + CSV + PNG from a long-format results table and a run-status table.

Inputs
* ``results``: one row per (dataset, method, budget, fold and/or seed, case, class) with dice, nsd,
  hd95 and optional numeric clinical columns (e.g. hc_abs_diff_mm, pred_volume_ml).
* ``runs``: one row per (dataset, method, budget, fold and/or seed) with status in
  {done, failed, missing}, params, latency_ms, error.

Statistics use the test case as the unit: each case's value is the mean over classes and over
the runs (folds/seeds) of a (dataset, method, budget). A (method, budget) whose runs failed is
reported as FAILED with its error, never dropped and never scored as zero; results rows of
failed runs are ignored because a crashed run's partial output is not trustworthy.

Also, when the data allow it:
* gap closed (:func:`gap_closed`): (method@b - baseline@b) / (baseline@all - baseline@b) per budget b,
  when the baseline has results at the reference budget ``"all"`` (every training label);
* paired contrasts (:func:`paired_contrasts`): mean paired difference with CI for fixed arm pairs (``CONTRASTS``:
  tskd_syn − tskd, tskd − task_agnostic, tskd − teacher: the method definitions' ``contrasts``) wherever both
  arms have results;
* organ volume error (:func:`volume_errors`): |predicted - reference| volume in ml per patient and class,
  from ``ref_volume_ml`` / ``pred_volume_ml`` summed over a patient's cases (``patient`` column; slices of one
  patient add up to the organ's volume), else per case.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from tskd_nnunet.benchmark.config import BASELINE_LABEL, lead_kept_arms, report_contrasts
from tskd_nnunet.benchmark.plots import (OverlayItem, plot_boxplots, plot_label_efficiency, plot_overlay_grid,
                                         select_worst_median_best, sorted_budgets)
from tskd_nnunet.atomic_io import atomic_write_csv, atomic_write_text
from tskd_nnunet.evaluation.stats import bootstrap_ci, holm_adjust, mean_sd, paired_wilcoxon

PathLike = Union[str, os.PathLike]

BASELINE = BASELINE_LABEL
METRICS = ("dice", "nsd", "hd95")
RUN_ID_COLUMNS = ("fold", "seed")
STATUSES = ("done", "failed", "missing")
# numeric result columns that are bookkeeping, not endpoints
_NOT_CLINICAL = {"ref_voxels", "pred_voxels", "fold", "seed", "budget", "ref_volume_ml", "pred_volume_ml",
                 "hc_pred_mm", "hc_ref_mm", "patient"}
REFERENCE_BUDGET = "all"  # the budget of "every training label", the top of the gap closed
# arm pairs worth a paired difference of their own, whenever both are in the report: (arm, minus arm, what it
# shows), from the method definitions
CONTRASTS = tuple(report_contrasts())
LOWER_IS_BETTER = {"hd95"}

OverlayLoader = Callable[[Dict[str, object]], Optional[OverlayItem]]


def _norm_budget(v):
    """5, 5.0 and '5' are the same budget; non-numeric budgets ('all') stay strings."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return int(f) if f.is_integer() else f


def _prepare(results: pd.DataFrame, runs: Optional[pd.DataFrame]):
    results = results.copy()
    missing_cols = {"method", "budget", "case", "class", *METRICS} - set(results.columns)
    if missing_cols:
        raise ValueError(f"results table lacks columns {sorted(missing_cols)}")
    if "dataset" not in results:
        results["dataset"] = "dataset"
    run_ids = [c for c in RUN_ID_COLUMNS if c in results.columns]
    if runs is None:
        # no status table: every run that produced results counts as done
        runs = results[["dataset", "method", "budget", *run_ids]].drop_duplicates().assign(status="done")
    runs = runs.copy()
    if "dataset" not in runs:
        runs["dataset"] = "dataset"
    run_ids_runs = [c for c in RUN_ID_COLUMNS if c in runs.columns]
    if len(results) and run_ids_runs != run_ids:
        raise ValueError(f"results identify runs by {run_ids}, the status table by {run_ids_runs}")
    run_ids = run_ids_runs
    for col, default in (("params", np.nan), ("latency_ms", np.nan), ("error", "")):
        if col not in runs:
            runs[col] = default
    runs["status"] = runs["status"].astype(str).str.strip().str.lower()
    bad = sorted(set(runs["status"]) - set(STATUSES))
    if bad:
        raise ValueError(f"unknown run status {bad}; expected one of {STATUSES}")
    runs["error"] = runs["error"].fillna("").astype(str)
    for df in (results, runs):
        df["budget"] = df["budget"].map(_norm_budget)
        for c in run_ids:
            df[c] = df[c].map(_norm_budget)
    keys = ["dataset", "method", "budget", *run_ids]
    # runs that produced results but are absent from the status table are done
    known = set(map(tuple, runs[keys].astype(str).to_numpy()))
    extra = results[keys].drop_duplicates()
    extra = extra[[tuple(r) not in known for r in extra.astype(str).to_numpy()]]
    if len(extra):
        runs = pd.concat([runs, extra.assign(status="done", error="")], ignore_index=True)
    failed = runs.loc[runs["status"] == "failed", keys].astype(str)
    failed_set = set(map(tuple, failed.to_numpy()))
    keep = pd.Series([tuple(r) not in failed_set for r in results[keys].astype(str).to_numpy()],
                     index=results.index, dtype=bool)  # a Series: an empty list would select no columns
    return results[keep], runs, run_ids


def _clinical_columns(results: pd.DataFrame, run_ids: Sequence[str]) -> List[str]:
    fixed = {"dataset", "method", "budget", "case", "class", *METRICS, *run_ids, *_NOT_CLINICAL}
    return [c for c in results.columns if c not in fixed and pd.api.types.is_numeric_dtype(results[c])]


def _method_order(methods, baseline: str) -> List[str]:
    ms = list(dict.fromkeys(methods))
    return ([baseline] if baseline in ms else []) + [m for m in ms if m != baseline]


def case_values(results: pd.DataFrame, value_columns: Sequence[str]) -> pd.DataFrame:
    """One row per (dataset, method, budget, case): mean over classes and runs."""
    return (results.groupby(["dataset", "method", "budget", "case"], sort=False)[list(value_columns)]
            .mean().reset_index())


def _status_text(r: pd.DataFrame) -> str:
    n = len(r)
    nf, nm = int((r["status"] == "failed").sum()), int((r["status"] == "missing").sum())
    if n == 0:
        return "done"
    if nf == n:
        return "FAILED"
    if nf:
        return f"FAILED ({nf}/{n} runs)"
    if nm == n:
        return "MISSING"
    if nm:
        return f"done ({nm}/{n} runs missing)"
    return "done"


def summarize(results: pd.DataFrame, runs: pd.DataFrame, run_ids: Sequence[str], value_columns: Sequence[str],
              baseline: str = BASELINE, n_resamples: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Per (dataset, budget, method): status, runs, cases, mean/sd/95% CI of each value, params, latency."""
    cv = case_values(results, value_columns)
    keys = ["dataset", "method", "budget"]
    groups = pd.concat([runs[keys], cv[keys]]).drop_duplicates()
    rows = []
    for ds in dict.fromkeys(groups["dataset"]):
        g_ds = groups[groups["dataset"] == ds]
        for b in sorted_budgets(g_ds["budget"]):
            for m in _method_order(g_ds.loc[g_ds["budget"] == b, "method"], baseline):
                r = runs[(runs["dataset"] == ds) & (runs["method"] == m) & (runs["budget"] == b)]
                v = cv[(cv["dataset"] == ds) & (cv["method"] == m) & (cv["budget"] == b)]
                status = _status_text(r)
                if status == "done" and v.empty:
                    status = "done (no results)"
                row = {"dataset": ds, "budget": b, "method": m, "status": status,
                       "n_runs": len(r), "n_done": int((r["status"] == "done").sum()),
                       "n_failed": int((r["status"] == "failed").sum()), "n_cases": int(v["case"].nunique()),
                       "params": float(pd.to_numeric(r["params"], errors="coerce").median()) if len(r) else np.nan,
                       "latency_ms": float(pd.to_numeric(r["latency_ms"], errors="coerce").median()) if len(r) else np.nan,
                       "error": " | ".join(dict.fromkeys(e for e in r.loc[r["status"] == "failed", "error"] if e))}
                for c in value_columns:
                    row.update(_describe(v[c].to_numpy(float), c, n_resamples, seed))
                rows.append(row)
    return pd.DataFrame(rows)


def _describe(x: np.ndarray, name: str, n_resamples: int, seed: int) -> Dict[str, float]:
    """``name``_mean, _sd, _ci_lo, _ci_hi (95% bootstrap CI over cases) of one column's values."""
    mu, sd = mean_sd(x)
    lo, hi = bootstrap_ci(x, n_resamples=n_resamples, seed=seed)
    return {f"{name}_mean": mu, f"{name}_sd": sd, f"{name}_ci_lo": lo, f"{name}_ci_hi": hi}


def per_class_summary(results: pd.DataFrame, metrics: Sequence[str] = METRICS, n_resamples: int = 10000,
                      seed: int = 0) -> pd.DataFrame:
    """Per (dataset, budget, method, class): n cases, mean, sd and 95% bootstrap CI over cases (case value =
    mean over runs). With ``ref_voxels``/``pred_voxels`` also the Dice over the cases whose reference shows
    the class (``n_present``, ``dice_present_*``) and the false-positive rate over the others (``n_absent``,
    ``fp_rate``: share of absent cases the class is predicted in, mean over runs): both-empty cases count as
    Dice 1 (documentation/evaluation.md), so on slices where most organs are absent the plain mean rewards
    predicting nothing."""
    split = {"ref_voxels", "pred_voxels"} <= set(results.columns) and "dice" in metrics
    res = results.assign(_pred_pos=(results["pred_voxels"] > 0).astype(float)) if split else results
    cols = list(metrics) + (["ref_voxels", "_pred_pos"] if split else [])
    per_case = res.groupby(["dataset", "budget", "method", "class", "case"], sort=False)[cols].mean().reset_index()
    extra = ["n_present", "dice_present_mean", "dice_present_ci_lo", "dice_present_ci_hi", "n_absent", "fp_rate"]
    rows = []
    for (ds, b, m, cls), g in per_case.groupby(["dataset", "budget", "method", "class"], sort=False):
        row = {"dataset": ds, "budget": b, "method": m, "class": cls, "n_cases": int(g["case"].nunique())}
        for c in metrics:
            row.update(_describe(g[c].to_numpy(float), c, n_resamples, seed))
        if split:
            present = g["ref_voxels"].to_numpy(float) > 0
            row.update({"n_present": int(present.sum()), "n_absent": int((~present).sum()),
                        "fp_rate": float(g["_pred_pos"][~present].mean()) if (~present).any() else np.nan})
            if present.any():
                d = _describe(g["dice"][present].to_numpy(float), "dice_present", n_resamples, seed)
                row.update({k: v for k, v in d.items() if not k.endswith("_sd")})
        rows.append(row)
    return pd.DataFrame(rows, columns=["dataset", "budget", "method", "class", "n_cases"]
                        + [f"{c}_{k}" for c in metrics for k in ("mean", "sd", "ci_lo", "ci_hi")]
                        + (extra if split else []))


def gap_closed(cv: pd.DataFrame, summary: pd.DataFrame, metrics: Sequence[str] = ("dice", "nsd"),
               baseline: str = BASELINE, reference_budget=REFERENCE_BUDGET, n_resamples: int = 10000,
               seed: int = 0) -> pd.DataFrame:
    """Gap closed = (method@b - baseline@b) / (baseline@reference - baseline@b), per dataset, budget b, method.

    Means over the test cases all three share (case values: mean over classes and runs); the 95% CI is a
    percentile bootstrap resampling those cases jointly (paired). 1 = the method reaches the baseline
    trained on every label, 0 = no better than the baseline at b. Undefined (NaN, with a note) when the
    baseline at the reference budget is not better than at b.
    """
    cols = ["dataset", "budget", "method", "metric", "status", "n_cases", "method_mean", "baseline_mean",
            "reference_mean", "gap_closed", "ci_lo", "ci_hi", "note"]
    rows = []
    ref_key = _norm_budget(reference_budget)
    for ds in dict.fromkeys(summary["dataset"]):
        ref = cv[(cv["dataset"] == ds) & (cv["method"] == baseline) & (cv["budget"] == ref_key)].set_index("case")
        if ref.empty:
            continue
        s_ds = summary[summary["dataset"] == ds]
        for b in sorted_budgets(s_ds["budget"]):
            if b == ref_key:
                continue
            base = cv[(cv["dataset"] == ds) & (cv["method"] == baseline) & (cv["budget"] == b)].set_index("case")
            for _, srow in s_ds[s_ds["budget"] == b].iterrows():
                m = srow["method"]
                if m == baseline:
                    continue
                other = cv[(cv["dataset"] == ds) & (cv["method"] == m) & (cv["budget"] == b)].set_index("case")
                common = ref.index.intersection(base.index).intersection(other.index)
                for metric in metrics:
                    row = {"dataset": ds, "budget": b, "method": m, "metric": metric, "status": srow["status"],
                           "n_cases": len(common), "method_mean": np.nan, "baseline_mean": np.nan,
                           "reference_mean": np.nan, "gap_closed": np.nan, "ci_lo": np.nan, "ci_hi": np.nan,
                           "note": ""}
                    if base.empty:
                        row["note"] = f"no {baseline} results at {b}"
                    elif other.empty:
                        row["note"] = "no results (" + str(srow["status"]) + ")"
                    elif len(common) == 0:
                        row["note"] = "no shared test cases"
                    else:
                        x = np.stack([other.loc[common, metric].to_numpy(float), base.loc[common, metric].to_numpy(float),
                                      ref.loc[common, metric].to_numpy(float)])
                        x = x[:, np.isfinite(x).all(axis=0)]
                        mm, mb, mr = x.mean(axis=1)
                        row.update({"n_cases": x.shape[1], "method_mean": mm, "baseline_mean": mb, "reference_mean": mr})
                        if not mr > mb:
                            row["note"] = (f"undefined: {baseline} on all labels ({mr:.3f}) is not better than at "
                                           f"{b} ({mb:.3f})")
                        else:
                            row["gap_closed"] = (mm - mb) / (mr - mb)
                            rng = np.random.default_rng(seed)
                            idx = rng.integers(0, x.shape[1], size=(n_resamples, x.shape[1]))
                            bm, bb, br = (x[k][idx].mean(axis=1) for k in range(3))
                            denom = br - bb
                            ok = denom > 0
                            g = (bm[ok] - bb[ok]) / denom[ok]
                            if g.size:
                                row["ci_lo"], row["ci_hi"] = (float(v) for v in np.percentile(g, [2.5, 97.5]))
                            if ok.mean() < 0.95:
                                row["note"] = (f"in {100 * (1 - ok.mean()):.0f}% of resamples {baseline} on all labels "
                                               f"was not better than at {b}: CI unreliable")
                    rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def volume_errors(results: pd.DataFrame, run_ids: Sequence[str], n_resamples: int = 10000, seed: int = 0
                  ) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Organ volume error (ml): (per patient and class, summary per dataset/budget/method/class).

    A patient's volume = sum of ``ref_volume_ml`` / ``pred_volume_ml`` over its cases in one run (slices of a
    patient add up; without a ``patient`` column each case is a patient), then the mean over runs. Summary:
    mean absolute error with a 95% bootstrap CI over patients, and the mean signed error (prediction -
    reference). Empty tables when the results hold no volumes (2D data without a slice thickness)."""
    cols_p = ["dataset", "budget", "method", "patient", "class", "ref_volume_ml", "pred_volume_ml", "abs_err_ml",
              "signed_err_ml"]
    cols_s = ["dataset", "budget", "method", "class", "n_patients", "abs_err_ml_mean", "abs_err_ml_ci_lo",
              "abs_err_ml_ci_hi", "signed_err_ml_mean", "ref_volume_ml_mean"]
    if not {"ref_volume_ml", "pred_volume_ml"} <= set(results.columns):
        return pd.DataFrame(columns=cols_p), pd.DataFrame(columns=cols_s)
    r = results[np.isfinite(pd.to_numeric(results["ref_volume_ml"], errors="coerce"))
                & np.isfinite(pd.to_numeric(results["pred_volume_ml"], errors="coerce"))].copy()
    if r.empty:
        return pd.DataFrame(columns=cols_p), pd.DataFrame(columns=cols_s)
    if "patient" not in r.columns:
        r["patient"] = r["case"]
    r["patient"] = r["patient"].fillna(r["case"]).astype(str)
    keys = ["dataset", "budget", "method", "patient", "class"]
    per_run = r.groupby(keys + list(run_ids), sort=False)[["ref_volume_ml", "pred_volume_ml"]].sum().reset_index()
    per_patient = per_run.groupby(keys, sort=False)[["ref_volume_ml", "pred_volume_ml"]].mean().reset_index()
    per_patient["signed_err_ml"] = per_patient["pred_volume_ml"] - per_patient["ref_volume_ml"]
    per_patient["abs_err_ml"] = per_patient["signed_err_ml"].abs()
    rows = []
    for (ds, b, m, cls), g in per_patient.groupby(["dataset", "budget", "method", "class"], sort=False):
        x = g["abs_err_ml"].to_numpy(float)
        lo, hi = bootstrap_ci(x, n_resamples=n_resamples, seed=seed)
        rows.append({"dataset": ds, "budget": b, "method": m, "class": cls, "n_patients": len(g),
                     "abs_err_ml_mean": float(np.mean(x)), "abs_err_ml_ci_lo": lo, "abs_err_ml_ci_hi": hi,
                     "signed_err_ml_mean": float(g["signed_err_ml"].mean()),
                     "ref_volume_ml_mean": float(g["ref_volume_ml"].mean())})
    return per_patient[cols_p], pd.DataFrame(rows, columns=cols_s)


def wilcoxon_vs_baseline(cv: pd.DataFrame, summary: pd.DataFrame, metrics: Sequence[str] = METRICS,
                         baseline: str = BASELINE) -> pd.DataFrame:
    """Paired two-sided Wilcoxon of every method vs the baseline on shared test cases.

    Holm-adjusted over the methods within one (dataset, budget, metric). ``rank_biserial`` > 0
    means the method's values are larger than the baseline's (better for Dice/NSD, worse for HD95).
    """
    rows = []
    for (ds, b), s in summary.groupby(["dataset", "budget"], sort=False):
        base = cv[(cv["dataset"] == ds) & (cv["budget"] == b) & (cv["method"] == baseline)].set_index("case")
        for metric in metrics:
            block = []
            for _, srow in s.iterrows():
                m = srow["method"]
                if m == baseline:
                    continue
                row = {"dataset": ds, "budget": b, "method": m, "metric": metric, "status": srow["status"],
                       "n_pairs": 0, "median_diff": np.nan, "statistic": np.nan, "p_value": np.nan,
                       "rank_biserial": np.nan, "note": ""}
                other = cv[(cv["dataset"] == ds) & (cv["budget"] == b) & (cv["method"] == m)].set_index("case")
                common = base.index.intersection(other.index)
                if base.empty:
                    row["note"] = f"no {baseline} results"
                elif other.empty:
                    row["note"] = "no results (" + srow["status"] + ")"
                elif len(common) == 0:
                    row["note"] = "no shared test cases"
                else:
                    w = paired_wilcoxon(other.loc[common, metric].to_numpy(float), base.loc[common, metric].to_numpy(float))
                    row.update({"n_pairs": len(common), "median_diff": w.median_diff, "statistic": w.statistic,
                                "p_value": w.p_value, "rank_biserial": w.rank_biserial})
                block.append(row)
            adj = holm_adjust([r["p_value"] for r in block]) if block else []
            for r, p in zip(block, adj):
                r["p_holm"] = p
            rows.extend(block)
    cols = ["dataset", "budget", "method", "metric", "status", "n_pairs", "median_diff", "statistic", "p_value",
            "p_holm", "rank_biserial", "note"]
    return pd.DataFrame(rows, columns=cols)


LEAD_KEPT = lead_kept_arms()  # teacher arm -> its students (the method definitions' "student_of")
_LEAD_REFERENCE = "teacher@n"  # budget label the teacher's rows take inside the gap-closed arithmetic


def lead_kept(cv: pd.DataFrame, summary: pd.DataFrame, metrics: Sequence[str] = ("dice", "nsd"),
              baseline: str = BASELINE, arms: Mapping[str, Sequence[str]] = LEAD_KEPT,
              n_resamples: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Lead kept = (student@b - baseline@b) / (teacher@b - baseline@b): the share of its teacher's lead over plain
    nnU-Net that a student keeps, per dataset and budget b. The gap-closed arithmetic (shared cases, paired
    bootstrap CI) with the teacher at the same budget as the reference; undefined when the teacher does not lead."""
    parts = []
    for ds in dict.fromkeys(summary["dataset"]):
        for b in sorted_budgets(summary[summary["dataset"] == ds]["budget"]):
            at = cv[(cv["dataset"] == ds) & (cv["budget"] == b)]
            for teacher, students in arms.items():
                ref = at[at["method"] == teacher]
                if ref.empty:
                    continue
                arm_rows = at[at["method"].isin([baseline, *students])]
                s_b = summary[(summary["dataset"] == ds) & (summary["budget"] == b)
                              & summary["method"].isin([baseline, *students])]
                g = gap_closed(pd.concat([arm_rows, ref.assign(method=baseline, budget=_LEAD_REFERENCE)]), s_b,
                               metrics, baseline, _LEAD_REFERENCE, n_resamples, seed)
                g["note"] = g["note"].str.replace(f"{baseline} on all labels", f"the {teacher}", regex=False) \
                    .str.replace(f"than at {b} ", f"than {baseline}@{b} ", regex=False)
                parts.append(g)
    cols = ["dataset", "budget", "method", "metric", "status", "n_cases", "method_mean", "baseline_mean",
            "teacher_mean", "lead_kept", "ci_lo", "ci_hi", "note"]
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True).rename(columns={"reference_mean": "teacher_mean",
                                                               "gap_closed": "lead_kept"})
    return out[cols]


def paired_contrasts(cv: pd.DataFrame, contrasts: Sequence[Tuple[str, str, str]] = CONTRASTS,
                     metrics: Sequence[str] = ("dice", "nsd"), n_resamples: int = 10000, seed: int = 0
                     ) -> pd.DataFrame:
    """Mean paired difference arm − other on shared test cases, 95% bootstrap CI and Wilcoxon p, for every
    (dataset, budget) where both arms have results."""
    rows = []
    for (ds, b), g in cv.groupby(["dataset", "budget"], sort=False):
        for arm, other, what in contrasts:
            x, y = (g[g["method"] == m].set_index("case") for m in (arm, other))
            common = x.index.intersection(y.index)
            if len(common) == 0:
                continue
            for metric in metrics:
                d = x.loc[common, metric].to_numpy(float) - y.loc[common, metric].to_numpy(float)
                d = d[np.isfinite(d)]
                lo, hi = bootstrap_ci(d, n_resamples=n_resamples, seed=seed)
                w = paired_wilcoxon(d, np.zeros_like(d))
                rows.append({"dataset": ds, "budget": b, "method": arm, "minus": other, "what": what,
                             "metric": metric, "n_pairs": int(d.size), "mean_diff": float(d.mean()) if d.size else np.nan,
                             "ci_lo": lo, "ci_hi": hi, "p_value": w.p_value})
    return pd.DataFrame(rows, columns=["dataset", "budget", "method", "minus", "what", "metric", "n_pairs",
                                       "mean_diff", "ci_lo", "ci_hi", "p_value"])


# ---------------------------------------------------------------- Markdown

def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (float, np.floating)):
        return f"{x:.{digits}f}"
    return str(x)


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _metric_cell(row: Mapping, c: str) -> str:
    if not math.isfinite(row[f"{c}_mean"]):
        st = str(row["status"])
        return "FAILED" if st.startswith("FAILED") else ("MISSING" if st.startswith("MISSING") else "no results")
    digits = 2 if c == "hd95" or c.endswith("_mm") or c.endswith("_ml") else 3
    return (f"{row[f'{c}_mean']:.{digits}f} ± {_fmt(row[f'{c}_sd'], digits)} "
            f"[{row[f'{c}_ci_lo']:.{digits}f}, {row[f'{c}_ci_hi']:.{digits}f}]")


def _params_cell(p) -> str:
    return "–" if not (isinstance(p, (int, float)) and math.isfinite(p)) else f"{p / 1e6:.2f} M"


def _ci_cell(row: Mapping, c: str, digits: int = 3) -> str:
    mu = row.get(f"{c}_mean", np.nan)
    if not (isinstance(mu, (int, float, np.floating)) and math.isfinite(mu)):
        return "–"
    return f"{mu:.{digits}f} [{_fmt(row.get(f'{c}_ci_lo'), digits)}, {_fmt(row.get(f'{c}_ci_hi'), digits)}]"


def render_markdown(summary: pd.DataFrame, runs: pd.DataFrame, run_ids: Sequence[str], wilcoxon: pd.DataFrame,
                    per_class: pd.DataFrame, value_columns: Sequence[str], figures: Mapping[str, str],
                    baseline: str, title: str, n_resamples: int, seed: int,
                    gap: Optional[pd.DataFrame] = None, volumes: Optional[pd.DataFrame] = None,
                    notes: Sequence[str] = (), extra_sections: Sequence[str] = (),
                    contrasts: Optional[pd.DataFrame] = None, lead: Optional[pd.DataFrame] = None) -> str:
    out = [f"# {title}", ""]
    for n in notes:
        out += [f"- {n}"]
    if notes:
        out += [""]
    n_failed = int((runs["status"] == "failed").sum())
    out += [f"Runs: {len(runs)} ({int((runs['status'] == 'done').sum())} done, {n_failed} {'FAILED' if n_failed else 'failed'}, "
            f"{int((runs['status'] == 'missing').sum())} missing). Values are mean ± sd over test cases "
            f"[95% percentile bootstrap CI, {n_resamples} resamples, seed {seed}]; a case's value is the mean "
            f"over classes and runs. Metrics: Dice, NSD at the evaluation's tolerance, HD95 in mm "
            f"(conventions: documentation/evaluation.md).", ""]
    labels = {"dice": "Dice", "nsd": "NSD", "hd95": "HD95 (mm)"}
    for ds, sd in summary.groupby("dataset", sort=False):
        out += [f"## {ds}", ""]
        for b, sb in sd.groupby("budget", sort=False):
            out += [f"### {b} labelled cases", ""]
            header = ["method", "status", "runs", "cases"] + [labels.get(c, c) for c in value_columns] + \
                     ["params", "latency (ms)", "error"]
            rows = [[r["method"] + (" (baseline)" if r["method"] == baseline else ""), r["status"],
                     f"{r['n_done']}/{r['n_runs']}", str(r["n_cases"])]
                    + [_metric_cell(r, c) for c in value_columns]
                    + [_params_cell(r["params"]), _fmt(r["latency_ms"], 1), r["error"] or ""]
                    for _, r in sb.iterrows()]
            out += [md_table(header, rows), ""]
            w = wilcoxon[(wilcoxon["dataset"] == ds) & (wilcoxon["budget"] == b)]
            if len(w):
                out += [f"Paired Wilcoxon signed-rank vs `{baseline}` (two-sided, Holm over methods; "
                        "r = matched-pairs rank-biserial, > 0: method higher than baseline):", ""]
                out += [md_table(["method", "metric", "pairs", "median diff", "p", "p (Holm)", "r", "note"],
                                 [[r["method"], labels.get(r["metric"], r["metric"]), str(r["n_pairs"]),
                                   _fmt(r["median_diff"], 4), _fmt(r["p_value"], 4), _fmt(r["p_holm"], 4),
                                   _fmt(r["rank_biserial"], 3), r["note"] or ""] for _, r in w.iterrows()]), ""]
    if gap is not None and len(gap):
        out += ["## Gap closed", "",
                f"(method@n − {baseline}@n) / ({baseline}@all − {baseline}@n): 0 = no better than {baseline} with the "
                f"same labels, 1 = as good as {baseline} trained on every training label. Means over shared test "
                f"cases; 95% CI: paired percentile bootstrap over cases ({n_resamples} resamples, seed {seed}).", ""]
        out += [md_table(["dataset", "labels", "method", "metric", "value", f"{baseline}@n", f"{baseline}@all",
                          "gap closed [95% CI]", "note"],
                         [[str(r["dataset"]), str(r["budget"]), r["method"], labels.get(r["metric"], r["metric"]),
                           _fmt(r["method_mean"]), _fmt(r["baseline_mean"]), _fmt(r["reference_mean"]),
                           (f"{r['gap_closed']:.2f} [{_fmt(r['ci_lo'], 2)}, {_fmt(r['ci_hi'], 2)}]"
                            if math.isfinite(r["gap_closed"]) else "–"), r["note"] or ""]
                          for _, r in gap.iterrows()]), ""]
    if lead is not None and len(lead):
        out += ["## Lead kept", "",
                f"(student@n − {baseline}@n) / (teacher@n − {baseline}@n): the share of the teacher's lead over "
                f"{baseline} that a student keeps (1 = all of it, 0 = none, < 0 = below {baseline}); same budget, "
                f"shared test cases, 95% CI: paired percentile bootstrap.", ""]
        out += [md_table(["dataset", "labels", "student", "metric", "student", f"{baseline}@n", "teacher@n",
                          "lead kept [95% CI]", "note"],
                         [[str(r["dataset"]), str(r["budget"]), r["method"], labels.get(r["metric"], r["metric"]),
                           _fmt(r["method_mean"]), _fmt(r["baseline_mean"]), _fmt(r["teacher_mean"]),
                           (f"{r['lead_kept']:.2f} [{_fmt(r['ci_lo'], 2)}, {_fmt(r['ci_hi'], 2)}]"
                            if math.isfinite(r["lead_kept"]) else "–"), r["note"] or ""]
                          for _, r in lead.iterrows()]), ""]
    if contrasts is not None and len(contrasts):
        out += ["## Paired contrasts", "",
                f"Mean paired difference over shared test cases [95% percentile bootstrap CI, {n_resamples} "
                f"resamples, seed {seed}], two-sided Wilcoxon p (not adjusted).", ""]
        out += [md_table(["dataset", "labels", "contrast", "what it shows", "metric", "pairs", "difference [95% CI]",
                          "p"],
                         [[str(r["dataset"]), str(r["budget"]), f"{r['method']} − {r['minus']}", r["what"],
                           labels.get(r["metric"], r["metric"]), str(r["n_pairs"]),
                           f"{_fmt(r['mean_diff'])} [{_fmt(r['ci_lo'])}, {_fmt(r['ci_hi'])}]", _fmt(r["p_value"], 4)]
                          for _, r in contrasts.iterrows()]), ""]
    if volumes is not None and len(volumes):
        out += ["## Organ volume error (ml)", "",
                "Per patient: volume = sum over the patient's test cases (slices) of voxels × voxel volume; "
                "|predicted − reference| in ml, mean over patients [95% bootstrap CI over patients]; signed = "
                "mean of predicted − reference.", ""]
        out += [md_table(["dataset", "labels", "method", "class", "patients", "|error| ml [95% CI]", "signed ml",
                          "reference ml"],
                         [[str(r["dataset"]), str(r["budget"]), r["method"], str(r["class"]), str(r["n_patients"]),
                           f"{r['abs_err_ml_mean']:.1f} [{_fmt(r['abs_err_ml_ci_lo'], 1)}, {_fmt(r['abs_err_ml_ci_hi'], 1)}]",
                           _fmt(r["signed_err_ml_mean"], 1), _fmt(r["ref_volume_ml_mean"], 1)]
                          for _, r in volumes.iterrows()]), ""]
    if len(per_class):
        split = "fp_rate" in per_class.columns
        out += ["## Per class", "", "Mean [95% bootstrap CI over test cases]."
                + (" A case whose reference and prediction both lack the class scores Dice 1, so the next columns "
                   "split the cases: Dice over those whose reference shows the class (n), and the share of the "
                   "others in which the class is predicted anyway (false positives, n)." if split else ""), ""]
        head = ["dataset", "labels", "method", "class", "cases", "Dice", "NSD", "HD95 (mm)"]
        out += [md_table(head + (["Dice where present (n)", "false positives where absent (n)"] if split else []),
                         [[str(r["dataset"]), str(r["budget"]), r["method"], str(r["class"]), str(r["n_cases"]),
                           _ci_cell(r, "dice"), _ci_cell(r, "nsd"), _ci_cell(r, "hd95", 2)]
                          + ([f"{_ci_cell(r, 'dice_present')} ({r['n_present']})",
                              f"{_fmt(r['fp_rate'], 2)} ({r['n_absent']})"] if split else [])
                          for _, r in per_class.iterrows()]), ""]
    out += ["## Runs", ""]
    id_cols = ["dataset", "method", "budget", *run_ids]
    out += [md_table(id_cols + ["status", "params", "latency (ms)", "error"],
                     [[str(r[c]) for c in id_cols] + [r["status"].upper() if r["status"] != "done" else "done",
                                                      _params_cell(pd.to_numeric(r["params"], errors="coerce")),
                                                      _fmt(pd.to_numeric(r["latency_ms"], errors="coerce"), 1),
                                                      r["error"] or ""] for _, r in runs.iterrows()]), ""]
    if figures:
        out += ["## Figures", ""]
        for caption, name in figures.items():
            out += [f"![{caption}]({name})", ""]
    for section in extra_sections:
        out += [section, ""]
    return "\n".join(out)


# ---------------------------------------------------------------- entry

def _overlays(cv: pd.DataFrame, results: pd.DataFrame, summary: pd.DataFrame, run_ids: Sequence[str],
              loader: OverlayLoader, out_dir: Path, baseline: str) -> Dict[str, str]:
    """Worst/median/best cases (by case Dice) of each method at each dataset's smallest budget."""
    figs = {}
    for ds in dict.fromkeys(summary["dataset"]):
        b = sorted_budgets(summary.loc[summary["dataset"] == ds, "budget"])[0]
        rows, labels = [], []
        for m in _method_order(summary.loc[(summary["dataset"] == ds) & (summary["budget"] == b), "method"], baseline):
            scores = cv[(cv["dataset"] == ds) & (cv["budget"] == b) & (cv["method"] == m)].set_index("case")["dice"]
            picks = select_worst_median_best(scores)
            if not picks:
                continue
            res = results[(results["dataset"] == ds) & (results["budget"] == b) & (results["method"] == m)]
            run = {c: res[c].iloc[0] for c in run_ids}  # the first run's prediction is shown
            items = []
            for label, case in picks:
                item = loader({"dataset": ds, "method": m, "budget": b, "case": case, **run})
                if item is not None and not item.title:
                    item.title = f"{label}: {case} (Dice {scores[case]:.3f})"
                items.append(item)
            if any(i is not None for i in items):
                rows.append(items)
                labels.append(m)
        if rows:
            name = f"overlays_{_safe(ds)}.png"
            plot_overlay_grid(rows, labels, out_dir / name)
            figs[f"{ds}: worst / median / best cases at {b} labels"] = name
    return figs


def _safe(x) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(x))


def write_report(results: pd.DataFrame, runs: Optional[pd.DataFrame], out_dir: PathLike, baseline: str = BASELINE,
                 overlay_loader: Optional[OverlayLoader] = None, clinical_columns: Optional[Sequence[str]] = None,
                 n_resamples: int = 10000, seed: int = 0, title: str = "Benchmark report",
                 notes: Sequence[str] = (), extra_sections: Sequence[str] = ()) -> Dict[str, Path]:
    """Write report.md, summary/per_class/wilcoxon/case_values/runs (+ gap_closed, organ_volume_error) CSVs and
    PNGs into ``out_dir``. ``notes``: bullet lines under the title; ``extra_sections``: Markdown appended.

    ``overlay_loader`` receives {dataset, method, budget, case, fold/seed} and returns an
    :class:`~tskd_nnunet.benchmark.plots.OverlayItem` (arrays or nnU-Net-readable paths) or None.
    Returns the written paths by name. Every file is written atomically.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, runs, run_ids = _prepare(results, runs)
    clinical = list(clinical_columns) if clinical_columns is not None else _clinical_columns(results, run_ids)
    value_columns = [*METRICS, *clinical]
    summary = summarize(results, runs, run_ids, value_columns, baseline, n_resamples, seed)
    cv = case_values(results, value_columns)
    wil = wilcoxon_vs_baseline(cv, summary, value_columns, baseline)
    per_class = (per_class_summary(results, METRICS, n_resamples, seed) if len(results)
                 else pd.DataFrame(columns=["class"]))
    gap = gap_closed(cv, summary, ("dice", "nsd"), baseline, REFERENCE_BUDGET, n_resamples, seed)
    lead = lead_kept(cv, summary, ("dice", "nsd"), baseline, n_resamples=n_resamples, seed=seed)
    vol_patients, vol_summary = volume_errors(results, run_ids, n_resamples, seed)
    contrasts = paired_contrasts(cv, CONTRASTS, ("dice", "nsd"), n_resamples, seed)
    written: Dict[str, Path] = {}
    tables = [("summary", summary), ("wilcoxon", wil), ("per_class", per_class), ("case_values", cv), ("runs", runs)]
    if len(gap):
        tables.append(("gap_closed", gap))
    if len(contrasts):
        tables.append(("contrasts", contrasts))
    if len(lead):
        tables.append(("lead_kept", lead))
    if len(vol_summary):
        tables += [("organ_volume_error", vol_summary), ("organ_volume_per_patient", vol_patients)]
    for name, df in tables:
        written[f"{name}.csv"] = atomic_write_csv(df, out_dir / f"{name}.csv")
    figures: Dict[str, str] = {}
    if len(summary):
        for metric in ("dice", "nsd"):
            name = f"label_efficiency_{metric}.png"
            plot_label_efficiency(summary, out_dir / name, metric)
            figures[f"label efficiency ({metric})"] = name
        for metric in METRICS:
            name = f"boxplot_{metric}.png"
            plot_boxplots(cv, summary, out_dir / name, metric)
            figures[f"per-case {metric}"] = name
    if overlay_loader is not None and len(cv):
        figures.update(_overlays(cv, results, summary, run_ids, overlay_loader, out_dir, baseline))
    for name in figures.values():
        written[name] = out_dir / name
    md = render_markdown(summary, runs, run_ids, wil, per_class, value_columns, figures, baseline, title,
                         n_resamples, seed, gap=gap, volumes=vol_summary, notes=notes, extra_sections=extra_sections,
                         contrasts=contrasts, lead=lead)
    written["report.md"] = atomic_write_text(out_dir / "report.md", md)
    return written
