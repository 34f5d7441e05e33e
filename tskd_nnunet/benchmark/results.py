"""The report of a benchmark: from the committed folder alone when there is one (into that folder), else from the
work directory's runs (into WORKDIR/report). Format and endpoints: report.py, documentation/evaluation.md."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from tskd_nnunet.benchmark.commands import BenchmarkError
from tskd_nnunet.benchmark.config import baseline_method

if TYPE_CHECKING:
    import pandas as pd

    from tskd_nnunet.benchmark.plots import OverlayItem
    from tskd_nnunet.benchmark.runner import BenchmarkRunner


def collect(r: "BenchmarkRunner") -> Tuple["pd.DataFrame", "pd.DataFrame"]:
    """(results_df, runs_df) in the report's format, from the work directory's state files and scores CSVs."""
    import pandas as pd

    results, runs = [], []
    for b, f, m in r.matrix():
        st = r.run_state(b, m, f)
        if r.run_complete(b, m, f):
            status = "done"
            df = pd.read_csv(os.path.join(r.run_dir(b, m, f), "scores.csv"))
            results.append(df.assign(dataset=r.dataset_name, method=m, budget=b, fold=f))
        else:
            status = "failed" if st.get("status") == "failed" else "missing"  # missing: never started, or killed
        runs.append({"dataset": r.dataset_name, "method": m, "budget": b, "fold": f, "status": status,
                     "params": st.get("params") if status == "done" else None,
                     "latency_ms": st.get("latency_ms") if status == "done" else None,
                     "error": st.get("error", "") if status == "failed" else "",
                     "trainer": r.trainer(m), "n_labeled": st.get("n_labeled"),
                     "attempts": st.get("attempts"), "device": r.device})
    res = pd.concat(results, ignore_index=True) if results else pd.DataFrame(
        columns=["dataset", "method", "budget", "fold", "case", "class", "dice", "nsd", "hd95"])
    # bookkeeping and all-empty columns (2D volumes) are not endpoints
    drop = [c for c in res.columns if c in ("ref_voxels", "pred_voxels", "hc_pred_mm", "hc_ref_mm")
            or (len(res) and c not in ("dice", "nsd", "hd95") and res[c].isna().all())]
    return res.drop(columns=drop), pd.DataFrame(runs)


def overlay_loader(r: "BenchmarkRunner", key: Dict[str, Any]) -> Optional["OverlayItem"]:
    from tskd_nnunet.benchmark.plots import OverlayItem

    fe = r.file_ending()
    budget = next((b for b in r.cfg.budgets if str(b) == str(key["budget"])), key["budget"])
    pred = os.path.join(r.run_dir(budget, str(key["method"]), int(key["fold"])), "predictions", f"{key['case']}{fe}")
    if not os.path.isfile(pred):
        return None
    return OverlayItem(os.path.join(r.raw_dataset, "imagesTs", f"{key['case']}_0000{fe}"),
                       os.path.join(r.raw_dataset, "labelsTs", f"{key['case']}{fe}"), pred)


def write_benchmark_report(r: "BenchmarkRunner") -> str:
    """Write the report of every run of the config; returns the path of report.md."""
    if r.store is not None:
        from tskd_nnunet.benchmark.committed import write_committed_report

        if os.path.isdir(r.raw_dataset):
            r.store.write_matrix(r.matrix_record())
        elif r.store.read_matrix() is None:
            raise BenchmarkError(f"nothing to report: {r.store.root} holds no committed results yet and the "
                                 f"dataset is not converted in {r.raw_root}. Fix: run the benchmark first")
        return str(write_committed_report(r.store.root)["report.md"])
    from tskd_nnunet.benchmark.report import write_report

    results, runs = collect(r)
    written = write_report(results, runs, os.path.join(r.workdir, "report"),
                           baseline=baseline_method(r.cfg.method_defs), overlay_loader=lambda k: overlay_loader(r, k),
                           title=f"Benchmark {r.cfg.name} (profile {r.profile_name}, device {r.device})",
                           notes=r.matrix_record()["notes"])
    return str(written["report.md"])
