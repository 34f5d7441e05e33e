"""Evaluate a folder of predictions against a folder of references (nnU-Net layout and readers).

Files are read with nnU-Net's own reader/writer for the dataset's file ending, so spacing and
axis order are exactly what nnU-Net trained and predicted with.
"""
from __future__ import annotations

import json
import os
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from tskd_nnunet.atomic_io import atomic_write_csv
from tskd_nnunet.evaluation.metrics import LabelOrRegion, evaluate_segmentation, labels_from_dataset_json

PathLike = Union[str, os.PathLike]

RESULT_COLUMNS = ["case", "class", "dice", "nsd", "hd95", "ref_voxels", "pred_voxels",
                  "ref_volume_ml", "pred_volume_ml"]


def reader_for(file_ending: str):
    """nnU-Net reader/writer instance for a file ending (e.g. '.nii.gz', '.png')."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    return determine_reader_writer_from_file_ending(file_ending, verbose=False)()


def read_seg_2d_or_3d(rw, path: PathLike) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """Read a segmentation with an nnU-Net reader; return (array, spacing) as 2D or 3D.

    nnU-Net returns (1, z, y, x) with a dummy z spacing (999 x ...) for 2D files; a single-slice
    array is returned as 2D with its in-plane spacing, because eroding it in 3D would make every
    voxel a surface voxel.
    """
    seg, props = rw.read_seg(str(path))
    seg = np.asarray(seg)[0]
    spacing = tuple(float(s) for s in props["spacing"])
    if seg.ndim == 3 and seg.shape[0] == 1:
        return seg[0], spacing[1:]
    return seg, spacing


def list_cases(folder: PathLike, file_ending: str) -> List[str]:
    """Sorted case ids of the files ending in ``file_ending`` in a folder (hidden files skipped)."""
    return sorted(f.name[: -len(file_ending)] for f in Path(folder).iterdir()
                  if f.is_file() and f.name.endswith(file_ending) and not f.name.startswith("."))


def _evaluate_case(args) -> List[dict]:
    case, ref_path, pred_path, file_ending, classes, ignore_label, tolerance_mm, spacing_override = args
    rw = reader_for(file_ending)
    ref, spacing = read_seg_2d_or_3d(rw, ref_path)
    file_spacing = spacing
    if spacing_override is not None:
        spacing = tuple(float(s) for s in spacing_override)
        if len(spacing) != ref.ndim:
            raise ValueError(f"{case}: spacing override {spacing} does not match a {ref.ndim}D segmentation")
    if pred_path is None:
        pred = np.zeros_like(ref)
    else:
        pred, pred_spacing = read_seg_2d_or_3d(rw, pred_path)
        if pred.shape != ref.shape:
            raise ValueError(f"{case}: prediction shape {pred.shape} != reference shape {ref.shape}")
        if not np.allclose(pred_spacing, file_spacing, rtol=1e-3):
            raise ValueError(f"{case}: prediction spacing {pred_spacing} != reference spacing {file_spacing}")
    scores = evaluate_segmentation(pred, ref, classes, spacing, tolerance_mm, ignore_label)
    rows = []
    for name, s in scores.items():
        row = {"case": case, "class": name, **s.as_dict(),
               "ref_volume_ml": np.nan, "pred_volume_ml": np.nan}
        if ref.ndim == 3:
            voxel_ml = float(np.prod(spacing)) / 1000.0  # same rule as clinical.volume_ml
            row["ref_volume_ml"] = s.ref_voxels * voxel_ml
            row["pred_volume_ml"] = s.pred_voxels * voxel_ml
        rows.append(row)
    return rows


def evaluate_folders(ref_folder: PathLike, pred_folder: PathLike, file_ending: str,
                     classes: Mapping[str, LabelOrRegion], tolerance_mm: float = 2.0,
                     ignore_label: Optional[int] = None, output_csv: Optional[PathLike] = None,
                     missing: str = "error", num_processes: int = 1,
                     spacing_override: Optional[Mapping[str, Sequence[float]]] = None) -> pd.DataFrame:
    """Per case and per class Dice, NSD and HD95 of every reference case.

    ``spacing_override`` maps case ids to the spacing (mm, array axis order) to use instead of the
    files': formats without spacing (PNG, read as 1 x 1) would otherwise give distances in pixels,
    e.g. HC18 stored as PNG with its pixel size in the challenge CSV.

    ``missing``: what to do with a reference case that has no prediction: 'error' (default) or
    'empty' (score it as an empty prediction, i.e. the worst score). Predictions without a
    reference are an error: they would mean the folders do not belong together. The table is
    written atomically to ``output_csv`` when given.
    """
    if missing not in ("error", "empty"):
        raise ValueError("missing must be 'error' or 'empty'")
    ref_cases = list_cases(ref_folder, file_ending)
    pred_cases = set(list_cases(pred_folder, file_ending))
    if not ref_cases:
        raise FileNotFoundError(f"no '*{file_ending}' files in {ref_folder}")
    extra = sorted(pred_cases - set(ref_cases))
    if extra:
        raise ValueError(f"predictions without a reference: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    absent = [c for c in ref_cases if c not in pred_cases]
    if absent and missing == "error":
        raise FileNotFoundError(f"{len(absent)} reference case(s) lack a prediction in {pred_folder}: {absent[:10]}")
    jobs = [(c, Path(ref_folder) / f"{c}{file_ending}",
             Path(pred_folder) / f"{c}{file_ending}" if c in pred_cases else None,
             file_ending, dict(classes), ignore_label, tolerance_mm,
             None if spacing_override is None else spacing_override.get(c)) for c in ref_cases]
    if num_processes > 1:
        with get_context("spawn").Pool(num_processes) as pool:
            per_case = pool.map(_evaluate_case, jobs)
    else:
        per_case = [_evaluate_case(j) for j in jobs]
    df = pd.DataFrame([r for rows in per_case for r in rows], columns=RESULT_COLUMNS)
    if output_csv is not None:
        atomic_write_csv(df, output_csv)
    return df


def evaluate_folders_with_dataset_json(ref_folder: PathLike, pred_folder: PathLike, dataset_json: PathLike,
                                       tolerance_mm: float = 2.0, output_csv: Optional[PathLike] = None,
                                       missing: str = "error", num_processes: int = 1) -> pd.DataFrame:
    """:func:`evaluate_folders` with classes, ignore label and file ending taken from dataset.json."""
    with open(dataset_json) as f:
        dj = json.load(f)
    classes, ignore = labels_from_dataset_json(dj["labels"])
    return evaluate_folders(ref_folder, pred_folder, dj["file_ending"], classes, tolerance_mm, ignore,
                            output_csv, missing, num_processes)


def summarize(df: pd.DataFrame, metrics: Sequence[str] = ("dice", "nsd", "hd95")) -> Dict[str, Dict[str, float]]:
    """Mean of each metric per class and over classes (per-case class means first)."""
    out: Dict[str, Dict[str, float]] = {}
    for name, g in df.groupby("class", sort=False):
        out[str(name)] = {m: float(g[m].mean()) for m in metrics}
    per_case = df.groupby("case")[list(metrics)].mean()
    out["mean"] = {m: float(per_case[m].mean()) for m in metrics}
    return out
