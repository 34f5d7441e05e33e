"""Reading the official CHAOS release (DICOM slices + Ground PNGs) into 3D volumes.

Shared by Dataset503_CHAOS_MR and Dataset504_CHAOS_CT. The anonymised CHAOS DICOMs carry a different
series UID per file, so series readers do not group them; every file is read on its own with SimpleITK and
the slices are ordered by their position along the slice normal (ImagePositionPatient · normal). Each Ground
PNG is paired with the DICOM of the same file stem when all stems match (MR: IMG-xxxx-yyyyy.dcm ↔ .png),
otherwise by sorted file-name order (CT: i0000,0000b.dcm ↔ liver_GT_000.png); the mask then follows its
DICOM into the sorted volume. PNG rows/columns are taken as the DICOM rows/columns (no flip).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from dataset_conversion.common import ConversionError, read_2d_mask, read_image, sanitize_case_id

# the dataset.json licence and reference of every CHAOS conversion (Dataset502/503/504)
CHAOS_LICENCE = "CC BY-NC-SA 4.0"
CHAOS_REFERENCE = "Kavur et al., Medical Image Analysis 69:101950, 2021; doi:10.5281/zenodo.3362844"

# CHAOS grey-level ranges of the MR ground truth (challenge data description): liver 63 (55-70), right kidney
# 126 (110-135), left kidney 189 (175-200), spleen 252 (240-255).
MR_RANGES = ((0, 0, 0), (55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))
MR_LABELS = {"background": 0, "liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
CT_RANGES = ((0, 0, 0), (1, 1, 1), (255, 255, 1))
CT_LABELS = {"background": 0, "liver": 1}


def modality_dir(root: Path, modality: str) -> Path:
    """Accept the folder holding Train_Sets, Train_Sets itself, or Train_Sets/<modality>."""
    for c in (root / "Train_Sets" / modality, root / modality):
        if c.is_dir():
            return c
    if root.name == modality and root.is_dir():
        return root
    raise ConversionError(f"no Train_Sets/{modality} under {root}: pass the unpacked CHAOS_Train_Sets folder "
                          f"with --input")


def patient_dirs(mod_dir: Path) -> List[Path]:
    pats = sorted((p for p in mod_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))
    if not pats:
        raise ConversionError(f"no patient folders in {mod_dir}")
    return pats


def case_id_for(prefix: str, patient: str) -> str:
    return sanitize_case_id(f"{prefix}_{int(patient):02d}" if patient.isdigit() else f"{prefix}_{patient}")


def list_files(folder: Path, pattern: str, what: str) -> List[Path]:
    if not folder.is_dir():
        raise ConversionError(f"missing folder {folder}: the CHAOS layout needs {what} there")
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise ConversionError(f"no {pattern} files in {folder}: the CHAOS layout needs {what} there")
    return files


def _slice_geometry(img: sitk.Image, f: Path) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float]]:
    if img.GetDimension() != 3 or img.GetSize()[2] != 1:
        raise ConversionError(f"{f} is not a single 2D DICOM slice (size {img.GetSize()})")
    direction = np.array(img.GetDirection()).reshape(3, 3)
    return np.array(img.GetOrigin()), direction, img.GetSpacing()[:2]


def read_dicom_stack(files: Sequence[Path]) -> Tuple[sitk.Image, List[int]]:
    """Read DICOM slice files into one volume sorted along the slice normal; also return the order used."""
    slices = []
    for f in files:
        img = read_image(f)
        origin, direction, sp = _slice_geometry(img, f)
        slices.append((f, sitk.GetArrayFromImage(img)[0], origin, direction, sp))
    f0, a0, _, d0, sp0 = slices[0]
    normal = d0[:, 2]
    for f, a, _, d, sp in slices[1:]:
        if a.shape != a0.shape:
            raise ConversionError(f"{f} is {a.shape[::-1]} pixels but {f0} is {a0.shape[::-1]}: all slices of a "
                                  f"series must have the same size; remove the stray file")
        if not np.allclose(d, d0, atol=1e-3) or not np.allclose(sp, sp0, rtol=1e-3):
            raise ConversionError(f"{f} has another orientation or pixel spacing than {f0}: remove the stray file")
    pos = np.array([float(np.dot(s[2], normal)) for s in slices])
    order = [int(i) for i in np.argsort(pos, kind="stable")]
    sorted_pos = pos[order]
    gaps = np.diff(sorted_pos)
    if len(gaps) and np.min(gaps) < 1e-3:
        k = int(np.argmin(gaps))
        raise ConversionError(f"{files[order[k]]} and {files[order[k + 1]]} are at the same slice position: "
                              f"remove the duplicate slice")
    dz = float(np.median(gaps)) if len(gaps) else 1.0
    if len(gaps) and np.max(np.abs(gaps - dz)) > 0.1 * dz:
        print(f"warning: uneven slice spacing in {files[0].parent} ({gaps.min():.3g}..{gaps.max():.3g} mm); "
              f"using the median {dz:.4g} mm")
    vol = sitk.GetImageFromArray(np.stack([slices[i][1] for i in order]))
    vol.SetSpacing((float(sp0[0]), float(sp0[1]), dz))
    vol.SetOrigin(tuple(float(x) for x in slices[order[0]][2]))
    vol.SetDirection(tuple(float(x) for x in d0.flatten()))
    return vol, order


def pair_ground(dicoms: Sequence[Path], ground: Sequence[Path]) -> Optional[List[Path]]:
    """Ground PNG for each DICOM: by equal stems if they all match, else None (caller decides)."""
    by_stem = {p.stem: p for p in ground}
    if len(dicoms) == len(ground) and all(d.stem in by_stem for d in dicoms):
        return [by_stem[d.stem] for d in dicoms]
    return None


def pair_ground_by_order(dicoms: Sequence[Path], ground: Sequence[Path], ground_dir: Path) -> List[Path]:
    if len(dicoms) != len(ground):
        raise ConversionError(f"{len(ground)} masks in {ground_dir} but {len(dicoms)} DICOM slices in "
                              f"{dicoms[0].parent}: each slice needs one Ground PNG; restore the missing files")
    return list(ground)


def remap_ranges(arr: np.ndarray, ranges, path: Path, expected: str) -> np.ndarray:
    lut = np.full(256, 255, dtype=np.uint8)  # 255 marks "unknown"
    for lo, hi, lab in ranges:
        lut[lo:hi + 1] = lab
    if arr.min() < 0 or arr.max() > 255 or np.any(lut[arr.astype(np.int64).clip(0, 255)] == 255):
        vals = np.unique(arr)
        bad = [int(v) for v in vals if v < 0 or v > 255 or lut[int(v)] == 255]
        raise ConversionError(f"mask {path} has unknown label value(s) {bad[:10]} (expected {expected}); "
                              f"use the CHAOS Ground PNGs unchanged")
    return lut[arr.astype(np.int64)]


def stack_masks(masks: Sequence[Path], order: Sequence[int], ranges, expected: str,
                shape_yx: Tuple[int, int], dicoms: Sequence[Path]) -> np.ndarray:
    out = []
    for i in order:
        m = read_2d_mask(masks[i])
        if m.shape != tuple(shape_yx):
            raise ConversionError(f"size mismatch: mask {masks[i]} is {m.shape[::-1]} but DICOM {dicoms[i]} is "
                                  f"{tuple(shape_yx)[::-1]} (width, height); use the Ground PNG of this series")
        out.append(remap_ranges(m, ranges, masks[i], expected))
    return np.stack(out)


def label_volume(lab: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(lab.astype(np.uint8))
    img.CopyInformation(ref)
    return img


def load_series_with_ground(dicom_dir: Path, ground_dir: Path, ranges, expected: str
                            ) -> Tuple[sitk.Image, sitk.Image]:
    dicoms = list_files(dicom_dir, "*.dcm", "the DICOM slices (*.dcm)")
    ground = list_files(ground_dir, "*.png", "the Ground masks (*.png)")
    masks = pair_ground(dicoms, ground) or pair_ground_by_order(dicoms, ground, ground_dir)
    vol, order = read_dicom_stack(dicoms)
    size = vol.GetSize()
    lab = stack_masks(masks, order, ranges, expected, (size[1], size[0]), dicoms)
    return vol, label_volume(lab, vol)


def load_t1dual(t1_dir: Path) -> Tuple[List[sitk.Image], sitk.Image, List[str]]:
    """T1DUAL: InPhase and OutPhase as two channels on the InPhase grid, Ground paired to either phase."""
    in_files = list_files(t1_dir / "DICOM_anon" / "InPhase", "*.dcm", "the InPhase DICOM slices")
    out_files = list_files(t1_dir / "DICOM_anon" / "OutPhase", "*.dcm", "the OutPhase DICOM slices")
    ground_dir = t1_dir / "Ground"
    ground = list_files(ground_dir, "*.png", "the Ground masks (*.png)")
    vin, order_in = read_dicom_stack(in_files)
    vout, order_out = read_dicom_stack(out_files)
    if vin.GetSize() != vout.GetSize() or not np.allclose(vin.GetSpacing(), vout.GetSpacing(), rtol=1e-3):
        raise ConversionError(f"InPhase {t1_dir / 'DICOM_anon' / 'InPhase'} is {vin.GetSize()} "
                              f"{vin.GetSpacing()} but OutPhase is {vout.GetSize()} {vout.GetSpacing()}: the two "
                              f"echoes must cover the same slices; restore missing files")
    if not np.allclose(vin.GetOrigin(), vout.GetOrigin(), atol=1.0):
        raise ConversionError(f"InPhase and OutPhase in {t1_dir / 'DICOM_anon'} start at different positions "
                              f"({vin.GetOrigin()} vs {vout.GetOrigin()}): they cannot be stacked as channels")
    vout.CopyInformation(vin)  # dual-echo: same slices, so the out-phase takes the in-phase header
    size = vin.GetSize()
    masks = pair_ground(in_files, ground)
    files, order = in_files, order_in
    if masks is None:
        masks = pair_ground(out_files, ground)
        files, order = (out_files, order_out) if masks is not None else (in_files, order_in)
    if masks is None:
        masks = pair_ground_by_order(in_files, ground, ground_dir)
    lab = stack_masks(masks, order, MR_RANGES, "0, 63, 126, 189, 252", (size[1], size[0]), files)
    return [vin, vout], label_volume(lab, vin), [str(in_files[0].parent), str(out_files[0].parent)]

