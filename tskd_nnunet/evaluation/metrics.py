"""Segmentation metrics in physical space: Dice, NSD (normalised surface distance) and HD95.

This is the project's one implementation of these metrics; validation, the benchmark and the
report all call it. Conventions (see documentation/evaluation.md):

* Surface = voxels of the mask that have at least one face-neighbour (connectivity 1) outside the
  mask; voxels on the array border count as surface (the outside of the array is background).
* Distances are Euclidean between voxel centres, in mm, using the voxel spacing (anisotropic
  spacing supported), computed with ``scipy.ndimage.distance_transform_edt(sampling=spacing)``.
* NSD(tau) = (#pred-surface voxels within tau of the reference surface + #ref-surface voxels
  within tau of the predicted surface) / (#pred-surface + #ref-surface), counted in voxels.
* HD95 = max of the two directed 95th percentiles (pred->ref and ref->pred), numpy's linear
  percentile.
* Empty masks: both empty -> Dice 1, NSD 1, HD95 0 (perfect agreement on absence, so a case is
  never silently dropped from a mean). Exactly one empty -> Dice 0, NSD 0, HD95 = diagonal of the
  image's field of view (shape * spacing) in mm, the largest distance the image allows, so a missed
  or hallucinated structure is penalised instead of becoming NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

LabelOrRegion = Union[int, Tuple[int, ...]]


@dataclass(frozen=True)
class SegmentationScores:
    dice: float
    nsd: float
    hd95: float
    ref_voxels: int
    pred_voxels: int

    def as_dict(self) -> Dict[str, float]:
        return {"dice": self.dice, "nsd": self.nsd, "hd95": self.hd95,
                "ref_voxels": self.ref_voxels, "pred_voxels": self.pred_voxels}


def _check(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    if spacing is None:
        spacing = (1.0,) * ref.ndim
    sp = np.asarray(spacing, dtype=float)
    if sp.shape != (ref.ndim,):
        raise ValueError(f"spacing {tuple(spacing)} does not match a {ref.ndim}D mask")
    if np.any(sp <= 0):
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    return pred, ref, sp


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient of two binary masks; 1.0 when both are empty."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    denom = int(pred.sum()) + int(ref.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / denom


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boolean map of the mask's surface voxels (face-connected to background or the array edge)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred surface -> ref surface, ref surface -> pred surface).

    Both masks must be non-empty.
    """
    pred, ref, sp = _check(pred, ref, spacing)
    if not pred.any() or not ref.any():
        raise ValueError("surface distances need two non-empty masks")
    s_pred = surface_voxels(pred)
    s_ref = surface_voxels(ref)
    # EDT of the complement gives, at each voxel, the distance to the nearest surface voxel
    dt_ref = ndimage.distance_transform_edt(~s_ref, sampling=sp)
    dt_pred = ndimage.distance_transform_edt(~s_pred, sampling=sp)
    return dt_ref[s_pred], dt_pred[s_ref]


def fov_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the field of view (shape * spacing), the HD95 given when exactly one mask is empty."""
    return float(np.sqrt(np.sum((np.asarray(shape, float) * np.asarray(spacing, float)) ** 2)))


def compute_scores(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None,
                   tolerance_mm: float = 2.0) -> SegmentationScores:
    """Dice, NSD at ``tolerance_mm`` and HD95 (mm) of one binary prediction against one reference.

    ``spacing`` is per array axis in the same order as the array (nnU-Net's (z, y, x) order), mm.
    """
    pred, ref, sp = _check(pred, ref, spacing)
    if tolerance_mm < 0:
        raise ValueError("tolerance_mm must be >= 0")
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    d = dice(pred, ref)
    if n_pred == 0 and n_ref == 0:
        return SegmentationScores(1.0, 1.0, 0.0, 0, 0)
    if n_pred == 0 or n_ref == 0:
        return SegmentationScores(0.0, 0.0, fov_diagonal_mm(ref.shape, sp), n_ref, n_pred)
    d_pr, d_rp = surface_distances(pred, ref, sp)
    nsd = (np.count_nonzero(d_pr <= tolerance_mm) + np.count_nonzero(d_rp <= tolerance_mm)) / (d_pr.size + d_rp.size)
    hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    return SegmentationScores(float(d), float(nsd), float(hd95), n_ref, n_pred)


def region_mask(seg: np.ndarray, label_or_region: LabelOrRegion) -> np.ndarray:
    """Binary mask of one label (int) or region (tuple of labels, nnU-Net region-based training)."""
    if np.isscalar(label_or_region):
        return seg == label_or_region
    return np.isin(seg, np.asarray(tuple(label_or_region)))


def labels_from_dataset_json(labels: Mapping[str, Union[int, Iterable[int]]]) -> Tuple[Dict[str, LabelOrRegion], Optional[int]]:
    """Foreground classes ``{name: label or region}`` and the ignore label from dataset.json 'labels'.

    Background (value 0 / name 'background') is skipped; 'ignore' is returned separately.
    """
    classes: Dict[str, LabelOrRegion] = {}
    ignore: Optional[int] = None
    for name, value in labels.items():
        if name == "ignore":
            ignore = int(value)
            continue
        if isinstance(value, (list, tuple)):
            region = tuple(int(v) for v in value)
            if region == (0,):
                continue
            classes[name] = region if len(region) > 1 else region[0]
        else:
            if int(value) == 0:
                continue
            classes[name] = int(value)
    return classes, ignore


def evaluate_segmentation(pred_seg: np.ndarray, ref_seg: np.ndarray, classes: Mapping[str, LabelOrRegion],
                          spacing: Optional[Sequence[float]] = None, tolerance_mm: float = 2.0,
                          ignore_label: Optional[int] = None) -> Dict[str, SegmentationScores]:
    """Scores per class of a label map against a reference label map.

    Voxels carrying ``ignore_label`` in the reference are removed from both masks before scoring
    (nnU-Net's convention: those voxels have no ground truth).
    """
    pred_seg = np.asarray(pred_seg)
    ref_seg = np.asarray(ref_seg)
    keep = None if ignore_label is None else ref_seg != ignore_label
    out: Dict[str, SegmentationScores] = {}
    for name, lr in classes.items():
        p = region_mask(pred_seg, lr)
        r = region_mask(ref_seg, lr)
        if keep is not None:
            p &= keep
            r &= keep
        out[name] = compute_scores(p, r, spacing, tolerance_mm)
    return out
