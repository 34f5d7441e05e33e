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


class EvaluationInputError(ValueError):
    """A bad input (file, folder, dataset.json, option): one line naming it and the fix.

    ``tskd_evaluate`` prints the message (no traceback) and exits non-zero. A ``ValueError`` so that
    callers catching the old exceptions keep working.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingInputError(EvaluationInputError, FileNotFoundError):
    """A file or folder that is not there (also a ``FileNotFoundError``)."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _fmt_values(values: Sequence) -> str:
    vals = [int(v) if float(v).is_integer() else float(v) for v in values]
    shown = ", ".join(str(v) for v in vals[:20])
    return "{" + shown + (f", ... ({len(vals)} values)" if len(vals) > 20 else "") + "}"


def allowed_label_values(labels: Mapping[str, Union[int, Sequence[int]]]) -> List[int]:
    """Every label value dataset.json 'labels' names (background, classes, region members, ignore)."""
    out = set()
    for value in labels.values():
        for v in (value if isinstance(value, (list, tuple)) else (value,)):
            out.add(int(v))
    return sorted(out)


def check_label_values(seg: np.ndarray, allowed: Sequence[int], path: PathLike, role: str) -> None:
    """Refuse a segmentation carrying a value that dataset.json does not name (one-line error)."""
    found = np.unique(np.asarray(seg))
    bad = found[~np.isin(found, np.asarray(list(allowed)))]
    if bad.size:
        fix = ("write predictions with dataset.json's label values (e.g. 1, not 255, for the foreground)"
               if role == "prediction" else "fix the reference or add its label to dataset.json 'labels'")
        raise EvaluationInputError(
            f"{path}: {role} has label values {_fmt_values(found)}, dataset.json 'labels' allows "
            f"{_fmt_values(sorted(allowed))} (not allowed: {_fmt_values(bad)}); {fix}")


def load_dataset_json(path: PathLike) -> dict:
    """dataset.json as a dict, refusing a missing file, invalid JSON, or no usable 'labels'/'file_ending'."""
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"dataset.json not found: {path} (-djfile must be the dataset's dataset.json)")
    try:
        dj = json.loads(p.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EvaluationInputError(f"{path}: not valid JSON ({_one_line(e)}); -djfile must be the dataset's "
                                   f"dataset.json") from None
    labels = dj.get("labels") if isinstance(dj, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise EvaluationInputError(f"{path}: no 'labels' in this dataset.json; add e.g. "
                                   f"\"labels\": {{\"background\": 0, \"organ\": 1}}")
    try:
        classes, _ = labels_from_dataset_json(labels)
        allowed_label_values(labels)
    except (TypeError, ValueError):
        raise EvaluationInputError(f"{path}: 'labels' values must be integers or lists of integers, got "
                                   f"{json.dumps(labels)[:200]}") from None
    if not classes:
        raise EvaluationInputError(f"{path}: 'labels' has no foreground label (only background/ignore); "
                                   f"add the classes to score")
    if not isinstance(dj.get("file_ending"), str) or not dj["file_ending"]:
        raise EvaluationInputError(f"{path}: no 'file_ending' in this dataset.json; add e.g. "
                                   f"\"file_ending\": \".nii.gz\"")
    return dj


def _read_checked(rw, path: PathLike, role: str, file_ending: str,
                  allowed: Optional[Sequence[int]]) -> Tuple[np.ndarray, Tuple[float, ...]]:
    try:
        seg, spacing = read_seg_2d_or_3d(rw, path)
    except Exception as e:  # any reader failure is a bad file, named in one line
        raise EvaluationInputError(f"{path}: cannot read this {role} ({_one_line(e)}); the file is truncated or "
                                   f"not a valid '{file_ending}' segmentation: re-export or remove it") from None
    if allowed is not None:
        check_label_values(seg, allowed, path, role)
    return seg, spacing


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
    (case, ref_path, pred_path, file_ending, classes, ignore_label, tolerance_mm, spacing_override,
     allowed) = args
    rw = reader_for(file_ending)
    ref, spacing = _read_checked(rw, ref_path, "reference", file_ending, allowed)
    file_spacing = spacing
    if spacing_override is not None:
        spacing = tuple(float(s) for s in spacing_override)
        if len(spacing) != ref.ndim:
            raise EvaluationInputError(f"{case}: spacing override {spacing} does not match a {ref.ndim}D "
                                       f"segmentation")
    if pred_path is None:
        pred = np.zeros_like(ref)
    else:
        pred, pred_spacing = _read_checked(rw, pred_path, "prediction", file_ending, allowed)
        if pred.shape != ref.shape:
            raise EvaluationInputError(f"{pred_path}: prediction shape {pred.shape} != reference shape {ref.shape} "
                                       f"({ref_path}); predict at the reference's resolution")
        if not np.allclose(pred_spacing, file_spacing, rtol=1e-3):
            raise EvaluationInputError(f"{pred_path}: prediction spacing {pred_spacing} != reference spacing "
                                       f"{file_spacing} ({ref_path}); predict at the reference's spacing")
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
                     spacing_override: Optional[Mapping[str, Sequence[float]]] = None,
                     allowed_labels: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """Per case and per class Dice, NSD and HD95 of every reference case.

    ``spacing_override`` maps case ids to the spacing (mm, array axis order) to use instead of the
    files': formats without spacing (PNG, read as 1 x 1) would otherwise give distances in pixels,
    e.g. HC18 stored as PNG with its pixel size in the challenge CSV.

    ``missing``: what to do with a reference case that has no prediction: 'error' (default) or
    'empty' (score it as an empty prediction, i.e. the worst score). Predictions without a
    reference are an error: they would mean the folders do not belong together. The table is
    written atomically to ``output_csv`` when given.

    ``allowed_labels``: the label values a file may contain (dataset.json's, see
    :func:`allowed_label_values`); a reference or prediction with any other value is refused
    (e.g. a mask saved as 0/255 would otherwise score Dice 0 on every case). None: no check.
    Bad inputs raise :class:`EvaluationInputError` (one line naming the file or option and the fix).
    """
    if missing not in ("error", "empty"):
        raise EvaluationInputError(f"missing must be 'error' or 'empty', got {missing!r}")
    try:
        tol = float(tolerance_mm)
    except (TypeError, ValueError):
        tol = float("nan")
    if not np.isfinite(tol) or tol < 0:
        raise EvaluationInputError(f"NSD tolerance must be a number >= 0 mm, got {tolerance_mm!r} "
                                   f"(--tolerance-mm)")
    if num_processes < 1:
        raise EvaluationInputError(f"number of processes must be >= 1, got {num_processes} (-np)")
    for folder, what, fix in ((ref_folder, "reference folder (-ref)", "the dataset's labelsTs or labelsTr"),
                              (pred_folder, "prediction folder (-pred)", "the output folder of nnUNetv2_predict")):
        if not Path(folder).exists():
            raise MissingInputError(f"{what} not found: {folder}; pass {fix}")
        if not Path(folder).is_dir():
            raise EvaluationInputError(f"{what} is not a folder: {folder}")
    try:
        reader_for(file_ending)
    except Exception as e:
        raise EvaluationInputError(f"no nnU-Net reader for file ending {file_ending!r} (dataset.json "
                                   f"'file_ending'): {_one_line(e)}") from None
    ref_cases = list_cases(ref_folder, file_ending)
    pred_cases = set(list_cases(pred_folder, file_ending))
    if not ref_cases:
        raise MissingInputError(f"reference folder (-ref) has no '*{file_ending}' files: {ref_folder}")
    extra = sorted(pred_cases - set(ref_cases))
    if extra:
        raise EvaluationInputError(f"{len(extra)} prediction(s) in {pred_folder} without a reference in {ref_folder}: "
                                   f"{extra[:10]}{' ...' if len(extra) > 10 else ''}; are these the right folders?")
    absent = [c for c in ref_cases if c not in pred_cases]
    if absent and missing == "error":
        raise MissingInputError(f"{len(absent)} reference case(s) lack a prediction in {pred_folder}: {absent[:10]}"
                                f"{' ...' if len(absent) > 10 else ''}; predict them or pass --missing empty")
    allowed = None if allowed_labels is None else [int(v) for v in allowed_labels]
    jobs = [(c, Path(ref_folder) / f"{c}{file_ending}",
             Path(pred_folder) / f"{c}{file_ending}" if c in pred_cases else None,
             file_ending, dict(classes), ignore_label, tol,
             None if spacing_override is None else spacing_override.get(c), allowed) for c in ref_cases]
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
    """:func:`evaluate_folders` with classes, ignore label, file ending and the allowed label values
    taken from dataset.json (a file with a label value dataset.json does not name is refused)."""
    dj = load_dataset_json(dataset_json)
    classes, ignore = labels_from_dataset_json(dj["labels"])
    return evaluate_folders(ref_folder, pred_folder, dj["file_ending"], classes, tolerance_mm, ignore,
                            output_csv, missing, num_processes,
                            allowed_labels=allowed_label_values(dj["labels"]))


def summarize(df: pd.DataFrame, metrics: Sequence[str] = ("dice", "nsd", "hd95")) -> Dict[str, Dict[str, float]]:
    """Mean of each metric per class and over classes (per-case class means first)."""
    out: Dict[str, Dict[str, float]] = {}
    for name, g in df.groupby("class", sort=False):
        out[str(name)] = {m: float(g[m].mean()) for m in metrics}
    per_case = df.groupby("case")[list(metrics)].mean()
    out["mean"] = {m: float(per_case[m].mean()) for m in metrics}
    return out
