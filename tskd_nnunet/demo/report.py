"""The demo's short report: Dice/NSD/HD95 per method on the held-out cases, sizes, an overlay PNG."""
from __future__ import annotations

import glob
import os
from typing import Dict, Optional

import pandas as pd

from tskd_nnunet.benchmark.plots import OverlayItem, plot_overlay_grid, select_worst_median_best
from tskd_nnunet.atomic_io import atomic_write_text
from tskd_nnunet.evaluation.evaluate import evaluate_folders_with_dataset_json


def checkpoint_info(results_root: str, trainer: str) -> Dict[str, float]:
    """Size on disk and number of stored network parameters of a trained fold-0 checkpoint."""
    import torch

    pattern = os.path.join(results_root, "*", f"{trainer}__*", "fold_0", "checkpoint_final.pth")
    files = glob.glob(pattern)
    if not files:
        return {"checkpoint_mb": float("nan"), "stored_params_m": float("nan")}
    ckpt = torch.load(files[0], map_location="cpu", weights_only=False)
    # nnU-Net's UNets hold the encoder twice (decoder.encoder is the encoder): count each storage once
    unique = {v.untyped_storage().data_ptr(): v.numel() for v in ckpt["network_weights"].values()
              if isinstance(v, torch.Tensor)}
    n = sum(unique.values())
    return {"checkpoint_mb": os.path.getsize(files[0]) / 2 ** 20, "stored_params_m": n / 1e6}


def write_demo_report(raw_folder: str, predictions: Dict[str, str], results_root: str, out_md: str,
                      roles: Optional[Dict[str, str]] = None, elapsed_s: float = 0.0) -> str:
    """Evaluate each prediction folder against ``labelsTs``; write Markdown + CSV + PNG; print the table."""
    roles = roles or {}
    refs = os.path.join(raw_folder, "labelsTs")
    dj = os.path.join(raw_folder, "dataset.json")
    out_dir = os.path.dirname(os.path.abspath(out_md))
    rows, per_case = [], []
    for trainer, folder in predictions.items():
        df = evaluate_folders_with_dataset_json(refs, folder, dj, tolerance_mm=2.0)
        df.insert(0, "trainer", trainer)
        per_case.append(df)
        info = checkpoint_info(results_root, trainer)
        rows.append({"trainer": trainer, "role": roles.get(trainer, ""), "cases": df["case"].nunique(),
                     "dice": df["dice"].mean(), "dice_sd": df["dice"].std(ddof=0), "nsd_2mm": df["nsd"].mean(),
                     "hd95": df["hd95"].mean(), **info})
    table = pd.DataFrame(rows)
    cases = pd.concat(per_case, ignore_index=True)
    cases_csv = os.path.join(out_dir, "report_cases.csv")
    atomic_write_text(cases_csv, cases.to_csv(index=False))

    # worst / median / best test case of each method, as overlays on the image
    grid, labels = [], []
    file_ending = os.path.splitext(glob.glob(os.path.join(refs, "*"))[0])[1]
    for trainer, folder in predictions.items():
        scores = cases[cases.trainer == trainer].groupby("case")["dice"].mean()
        grid.append([OverlayItem(os.path.join(raw_folder, "imagesTs", f"{case}_0000{file_ending}"),
                                 os.path.join(refs, case + file_ending), os.path.join(folder, case + file_ending),
                                 f"{which}: {case} (Dice {scores[case]:.3f})")
                     for which, case in select_worst_median_best(scores)])
        labels.append(trainer)
    png = plot_overlay_grid(grid, labels, os.path.join(out_dir, "report_overlays.png"))

    fmt = table.copy()
    for c in ("dice", "dice_sd", "nsd_2mm"):
        fmt[c] = fmt[c].map(lambda v: f"{v:.3f}")
    for c in ("hd95", "checkpoint_mb", "stored_params_m"):
        fmt[c] = fmt[c].map(lambda v: f"{v:.2f}")
    md = ["# tskd-nnunet demo report", "",
          f"Built-in phantom dataset, held-out test cases (`imagesTs`), fold 0; total time {elapsed_s / 60:.1f} min.",
          "Metrics from `tskd_nnunet.evaluation` (Dice, NSD at 2 mm, HD95 in mm; see documentation/evaluation.md).",
          "`stored_params_m` counts the parameters inside the checkpoint (the LoRA teacher stores only its adapters "
          "and decoder; its frozen foundation stays in its own file).", "",
          fmt.to_markdown(index=False), "", f"Per-case values: `{os.path.basename(cases_csv)}`", "",
          f"![worst/median/best test cases]({os.path.basename(str(png))})", ""]
    atomic_write_text(out_md, "\n".join(md))
    print(fmt.to_string(index=False))
    return out_md
