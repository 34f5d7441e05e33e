"""Clinical endpoints: HC18 head circumference (mm) and organ volume (ml).

Head circumference: the challenge's reference HC is the perimeter of an ellipse fitted to the
expert's outline. We fit the ellipse from the second-order moments of the filled mask (largest
connected component, holes filled): for a filled ellipse with semi-axes a >= b the covariance of
its points has eigenvalues a^2/4 and b^2/4, so a = 2 sqrt(l1), b = 2 sqrt(l2). This needs only
numpy/scipy (no OpenCV/scikit-image), is exact for filled ellipses up to pixelisation and degrades
gracefully on ragged predictions. Moments are taken in physical coordinates (pixel index times
spacing), so anisotropic pixels are handled. Perimeter: Ramanujan's first approximation.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from tskd_nnunet.evaluation.evaluate import (EvaluationInputError, MissingInputError, _one_line, _read_checked,
                                             list_cases, reader_for)

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Ellipse:
    center: Tuple[float, float]  # (row, col) in mm
    semi_major: float  # mm
    semi_minor: float  # mm
    angle_rad: float  # angle of the major axis to the row axis

    @property
    def circumference(self) -> float:
        return ramanujan_perimeter(self.semi_major, self.semi_minor)


def ramanujan_perimeter(a: float, b: float) -> float:
    """Ellipse perimeter, Ramanujan's approximation pi [3(a+b) - sqrt((3a+b)(a+3b))]."""
    return float(np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b))))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest face-connected component of a binary mask (all False if empty)."""
    mask = np.asarray(mask, dtype=bool)
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def fit_ellipse_moments(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> Optional[Ellipse]:
    """Ellipse with the same centroid and second moments as the (cleaned) 2D mask; None if empty.

    Cleaning: largest connected component, then holes filled, because the head is one convex blob
    and speckle or a hollow prediction would otherwise bias the moments.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"head circumference needs a 2D mask, got shape {mask.shape}")
    mask = ndimage.binary_fill_holes(largest_component(mask))
    if mask.sum() < 3:
        return None
    pts = np.argwhere(mask).astype(float) * np.asarray(spacing, float)
    center = pts.mean(axis=0)
    cov = np.cov(pts - center, rowvar=False, bias=True)
    evals, evecs = np.linalg.eigh(cov)  # ascending
    evals = np.clip(evals, 0.0, None)
    a, b = 2.0 * np.sqrt(evals[1]), 2.0 * np.sqrt(evals[0])
    major = evecs[:, 1]
    angle = float(np.arctan2(major[1], major[0]))
    return Ellipse((float(center[0]), float(center[1])), float(a), float(b), angle)


def head_circumference_mm(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> float:
    """Head circumference in mm of a 2D head mask.

    An empty mask gives 0.0 (no head found), so a missed head counts as an error of the full
    expert HC instead of vanishing from a mean as NaN would.
    """
    e = fit_ellipse_moments(mask, spacing)
    return 0.0 if e is None else e.circumference


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of a binary 3D mask in ml: voxel count x voxel volume (mm^3) / 1000."""
    mask = np.asarray(mask, dtype=bool)
    if len(spacing) != mask.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match mask of shape {mask.shape}")
    return float(mask.sum()) * float(np.prod(np.asarray(spacing, float))) / 1000.0


def read_hc18_csv(csv_path: PathLike) -> Dict[str, Tuple[float, float]]:
    """HC18 CSV -> ``{filename: (pixel_size_mm, head_circumference_mm)}``."""
    out: Dict[str, Tuple[float, float]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if len(header) < 3:
            raise ValueError(f"{csv_path}: expected filename, pixel size, HC columns, got {header}")
        for row in reader:
            if row:
                out[row[0].strip()] = (float(row[1]), float(row[2]))
    return out


_HC18_CASE_RE = re.compile(r"(?:.*_)?(\d{3})(?:_(\d+))?", re.IGNORECASE)  # hc18_007, hc18_007_2, HC18_007
_HC18_NAME_RE = re.compile(r"(\d{3})_(\d*)HC(?:\.png)?", re.IGNORECASE)  # 007_HC, 007_2HC(.png)


def hc18_case_to_filename(case_id: str) -> str:
    """The one map from an nnU-Net case id to its row in the HC18 CSV (``NNN_HC.png`` / ``NNN_kHC.png``).

    The exam number is the three-digit group; a repeat scan of the same exam carries its repeat
    number after it, as Dataset501_HC18 names them: ``hc18_007`` -> ``007_HC.png``,
    ``hc18_010_2`` -> ``010_2HC.png``, ``HC18_007`` -> ``007_HC.png``. The challenge's own stems are
    accepted too: ``007_HC`` -> ``007_HC.png``, ``010_2HC`` -> ``010_2HC.png``. Used by
    ``tskd_evaluate --hc18-csv`` and the benchmark runner alike; pass your own mapper to
    :func:`evaluate_hc18_folder` if a converter names cases differently.
    """
    m = _HC18_NAME_RE.fullmatch(case_id) or _HC18_CASE_RE.fullmatch(case_id)
    if not m:
        raise ValueError(f"cannot map case id {case_id!r} to an HC18 file name (expected e.g. hc18_007 or "
                         f"hc18_007_2)")
    exam, repeat = m.group(1), m.group(2)
    return f"{exam}_{repeat}HC.png" if repeat else f"{exam}_HC.png"


# old name, kept for callers that imported it
default_hc18_filename = hc18_case_to_filename


class HC18CaseError(EvaluationInputError, KeyError):
    """A case whose HC18 file name has no row in the CSV (also a KeyError, as before)."""


def evaluate_hc18_folder(pred_folder: PathLike, hc18_csv: PathLike, file_ending: str,
                         head_label: Optional[int] = None,
                         case_to_filename: Callable[[str], str] = hc18_case_to_filename,
                         use_file_spacing: bool = False):
    """Head circumference of each predicted mask vs the expert HC in the HC18 CSV.

    Returns a DataFrame (case, hc_pred_mm, hc_ref_mm, hc_abs_diff_mm). The pixel size comes from
    the CSV (the challenge's authority) unless ``use_file_spacing``; the head is ``seg == head_label``
    or any foreground when ``head_label`` is None. Mean absolute difference = ``df.hc_abs_diff_mm.mean()``.
    """
    import pandas as pd


    if not Path(hc18_csv).is_file():
        raise MissingInputError(f"HC18 CSV not found: {hc18_csv} (--hc18-csv must be the challenge's "
                                f"pixel_size_and_HC.csv)")
    try:
        ref = read_hc18_csv(hc18_csv)
    except (ValueError, IndexError, StopIteration, UnicodeDecodeError) as e:
        raise EvaluationInputError(f"{hc18_csv}: not an HC18 CSV ({_one_line(e)}); expected rows "
                                   f"'NNN_HC.png,<pixel size mm>,<HC mm>' after a header") from None
    rw = reader_for(file_ending)
    rows = []
    for case in list_cases(pred_folder, file_ending):
        try:
            fname = case_to_filename(case)
        except ValueError as e:
            raise EvaluationInputError(f"{Path(pred_folder) / (case + file_ending)}: {e}") from None
        if fname not in ref:
            raise HC18CaseError(f"case {case!r} -> {fname!r} not in {hc18_csv}; is this the CSV of this "
                                f"dataset's images?")
        px, hc_ref = ref[fname]
        seg, spacing = _read_checked(rw, Path(pred_folder) / f"{case}{file_ending}", "prediction", file_ending, None)
        if seg.ndim != 2:
            raise EvaluationInputError(f"{case}: HC18 predictions must be 2D, got shape {seg.shape}")
        mask = seg > 0 if head_label is None else seg == head_label
        sp = tuple(spacing) if use_file_spacing else (px, px)
        hc = head_circumference_mm(mask, sp)
        rows.append({"case": case, "hc_pred_mm": hc, "hc_ref_mm": hc_ref, "hc_abs_diff_mm": abs(hc - hc_ref)})
    return pd.DataFrame(rows, columns=["case", "hc_pred_mm", "hc_ref_mm", "hc_abs_diff_mm"])


def evaluate_test_folder(ref_folder: PathLike, pred_folder: PathLike, dataset_json: PathLike,
                         tolerance_mm: float = 2.0, hc18_csv: Optional[PathLike] = None,
                         missing: str = "error", num_processes: int = 1):
    """Dice/NSD/HD95 per case and class (classes and file ending from dataset.json), with the HC18 head
    circumference columns of :func:`evaluate_hc18_folder` merged on ``case`` when ``hc18_csv`` is given.
    The one scoring of a test folder used by ``tskd_evaluate``, the benchmark runner and benchmarks/fed_hc18.py."""
    from tskd_nnunet.evaluation.evaluate import evaluate_folders_with_dataset_json, load_dataset_json

    df = evaluate_folders_with_dataset_json(ref_folder, pred_folder, dataset_json, tolerance_mm, None, missing,
                                            num_processes)
    if hc18_csv is None:
        return df
    hc = evaluate_hc18_folder(pred_folder, hc18_csv, load_dataset_json(dataset_json)["file_ending"])
    return df.merge(hc, on="case", how="left")
