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

# A prediction must lie on its reference's voxel grid: voxels are compared index by index, so a prediction
# whose header says "mirrored" or "shifted" used to score like a correct one. Tolerances, far above the
# rounding of float32 headers (NIfTI) and far below any real flip, rotation or shift:
ORIGIN_TOLERANCE_VOXELS = 0.01  # origin: within 1% of the voxel size, on each axis
DIRECTION_TOLERANCE = 1e-3  # direction cosines: within 1e-3 each (about 0.06 degrees)
# file endings a segmentation might be written in: nnU-Net's readers' plus JPEG
_EXTRA_ENDINGS = (".jpg", ".jpeg")


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
    seg, spacing, _ = _read_checked_with_props(rw, path, role, file_ending, allowed)
    return seg, spacing


def _read_checked_with_props(rw, path: PathLike, role: str, file_ending: str, allowed: Optional[Sequence[int]]
                             ) -> Tuple[np.ndarray, Tuple[float, ...], dict]:
    """(segmentation, spacing, nnU-Net reader properties); a file that cannot be read, has a spacing that is
    not a positive number, or label values dataset.json does not name is refused in one line."""
    try:
        seg, spacing, props = _read_seg(rw, path)
    except Exception as e:  # any reader failure is a bad file, named in one line
        if "Zero-valued spacing" in str(e):
            raise EvaluationInputError(f"{path}: the {role}'s header has a spacing of 0 or NaN, which ITK refuses "
                                       f"to read; fix the header (the voxel size in mm)") from None
        raise EvaluationInputError(f"{path}: cannot read this {role} ({_one_line(e)}); the file is truncated or "
                                   f"not a valid '{file_ending}' segmentation: re-export or remove it") from None
    if str(path).lower().endswith((".nii", ".nii.gz")):
        _check_nifti_spacing(path, role)
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise EvaluationInputError(f"{path}: the {role}'s spacing {tuple(spacing)} is not a positive voxel size; "
                                   f"fix the header (the voxel size in mm)")
    if allowed is not None:
        check_label_values(seg, allowed, path, role)
    return seg, spacing, props


def _check_nifti_spacing(path: PathLike, role: str) -> None:
    """A NIfTI pixdim of 0 or NaN is read by ITK (and so nnU-Net's SimpleITK reader) as 1 mm without a word,
    which would put NSD and HD95 in made-up millimetres: refuse it, reading the header itself."""
    import gzip

    import nibabel as nib

    header = None
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        try:  # the raw header: nib.load would "fix" pixdim 0 to 1 itself
            with (gzip.open if str(path).lower().endswith(".gz") else open)(path, "rb") as f:
                header = cls.from_fileobj(f, check=False)
            if int(header["sizeof_hdr"]) == cls.sizeof_hdr:
                break
            header = None
        except Exception:
            continue
    try:
        ndim = int(header["dim"][0])
        pixdim = [float(v) for v in header["pixdim"][1:1 + min(max(ndim, 1), 3)]]
    except Exception:  # not readable by nibabel: the reader above already accepted it, nothing to add
        return
    if not all(np.isfinite(v) and v > 0 for v in pixdim):
        raise EvaluationInputError(f"{path}: the {role}'s NIfTI header has spacing (pixdim) "
                                   f"{tuple(round(v, 6) for v in pixdim)}, which nnU-Net's reader (ITK) reads as "
                                   f"1 mm without a word; fix the header (the voxel size in mm, e.g. copy it from "
                                   f"the image)")


def _check_same_grid(ref_props: dict, pred_props: dict, ref_path: PathLike, pred_path: PathLike) -> None:
    """Refuse a prediction whose direction or origin differs from its reference's (beyond the tolerances
    above). Only readers that report them (SimpleITK: NIfTI, nrrd, mha) can be checked; PNG has neither."""
    a, b = ref_props.get("sitk_stuff"), pred_props.get("sitk_stuff")
    if not a or not b:
        return
    fix = ("write the prediction on the reference's grid (nnUNetv2_predict does), e.g. resample it with "
           "SimpleITK onto the reference image")
    d_ref, d_pred = np.asarray(a["direction"], float), np.asarray(b["direction"], float)
    if d_ref.shape != d_pred.shape or np.max(np.abs(d_ref - d_pred)) > DIRECTION_TOLERANCE:
        raise EvaluationInputError(
            f"{pred_path}: prediction direction {_fmt_vec(d_pred)} differs from the reference's {_fmt_vec(d_ref)} "
            f"({ref_path}; tolerance {DIRECTION_TOLERANCE:g} per element): the prediction is flipped or rotated "
            f"against the reference, so its voxels would be compared with the wrong ones; {fix}")
    o_ref, o_pred = np.asarray(a["origin"], float), np.asarray(b["origin"], float)
    tol = ORIGIN_TOLERANCE_VOXELS * np.asarray(a["spacing"], float)
    if o_ref.shape != o_pred.shape or np.any(np.abs(o_ref - o_pred) > tol):
        raise EvaluationInputError(
            f"{pred_path}: prediction origin {_fmt_vec(o_pred)} differs from the reference's {_fmt_vec(o_ref)} "
            f"({ref_path}; tolerance {ORIGIN_TOLERANCE_VOXELS:g} voxel per axis): the prediction is shifted "
            f"against the reference; {fix}")


def _fmt_vec(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(x):g}" for x in np.ravel(v)) + ")"


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
    seg, spacing, _ = _read_seg(rw, path)
    return seg, spacing


def _read_seg(rw, path: PathLike) -> Tuple[np.ndarray, Tuple[float, ...], dict]:
    """:func:`read_seg_2d_or_3d` plus the reader's properties (origin and direction for SimpleITK files)."""
    seg, props = rw.read_seg(str(path))
    seg = np.asarray(seg)[0]
    spacing = tuple(float(s) for s in props["spacing"])
    if seg.ndim == 3 and seg.shape[0] == 1:
        return seg[0], spacing[1:], props
    return seg, spacing, props


def list_cases(folder: PathLike, file_ending: str) -> List[str]:
    """Sorted case ids of the files ending in ``file_ending`` in a folder (hidden files skipped)."""
    return sorted(f.name[: -len(file_ending)] for f in Path(folder).iterdir()
                  if f.is_file() and f.name.endswith(file_ending) and not f.name.startswith("."))


def other_format_files(folder: PathLike, cases: Sequence[str], file_ending: str) -> List[Path]:
    """Files in ``folder`` named ``<case><ending>`` for one of ``cases`` with an image ending other than
    ``file_ending`` (e.g. ``a.png`` where dataset.json says '.nii.gz')."""
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    endings = {e.lower() for io in LIST_OF_IO_CLASSES for e in io.supported_file_endings}
    endings = sorted((endings | set(_EXTRA_ENDINGS)) - {file_ending.lower()}, key=len, reverse=True)
    wanted, out = set(cases), []
    if not wanted:
        return out
    for f in sorted(Path(folder).iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        ending = next((e for e in endings if f.name.lower().endswith(e)), None)
        if ending and f.name[: -len(ending)] in wanted and not f.name.lower().endswith(file_ending.lower()):
            out.append(f)
    return out


def _evaluate_case(args) -> List[dict]:
    (case, ref_path, pred_path, file_ending, classes, ignore_label, tolerance_mm, spacing_override,
     allowed) = args
    rw = reader_for(file_ending)
    ref, spacing, ref_props = _read_checked_with_props(rw, ref_path, "reference", file_ending, allowed)
    file_spacing = spacing
    if spacing_override is not None:
        spacing = tuple(float(s) for s in spacing_override)
        if len(spacing) != ref.ndim:
            raise EvaluationInputError(f"{case}: spacing override {spacing} does not match a {ref.ndim}D "
                                       f"segmentation")
        if not all(np.isfinite(s) and s > 0 for s in spacing):
            raise EvaluationInputError(f"{case}: spacing override {spacing} must be positive voxel sizes in mm "
                                       f"(e.g. a pixel size missing from a CSV gives NaN)")
    if pred_path is None:
        pred = np.zeros_like(ref)
    else:
        pred, pred_spacing, pred_props = _read_checked_with_props(rw, pred_path, "prediction", file_ending, allowed)
        if pred.shape != ref.shape:
            raise EvaluationInputError(f"{pred_path}: prediction shape {pred.shape} != reference shape {ref.shape} "
                                       f"({ref_path}); predict at the reference's resolution")
        if not np.allclose(pred_spacing, file_spacing, rtol=1e-3):
            raise EvaluationInputError(f"{pred_path}: prediction spacing {pred_spacing} != reference spacing "
                                       f"{file_spacing} ({ref_path}); predict at the reference's spacing")
        _check_same_grid(ref_props, pred_props, ref_path, pred_path)
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
    other = other_format_files(pred_folder, absent, file_ending)
    if other:  # would be "missing", i.e. an error, or with --missing empty a case scored as empty
        raise EvaluationInputError(
            f"{len(other)} prediction(s) in another format than dataset.json's file_ending {file_ending!r}: "
            f"{', '.join(str(p) for p in other[:3])}{' ...' if len(other) > 3 else ''}; write the predictions as "
            f"'{file_ending}' (nnUNetv2_predict does) or pass the -djfile of the dataset they belong to")
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
