"""Generic converter: a folder of images + a folder of masks → nnU-Net v2 raw dataset.

    python -m dataset_conversion.convert_folder --images IMGS --masks MASKS -d 600 --name MyData \
        [--labels 0=background,255=lesion] [--channels gray|rgb] [--spacing SY SX | SZ SY SX] \
        [--patient-regex '^(p\\d+)_'] [--mask-suffix _mask]

Images and masks are matched by file name without extension (``a.png`` ↔ ``a.png`` or ``a_mask.tif`` with
``--mask-suffix _mask``). Formats: png, jpg, bmp, tif, gif, webp, ppm/pgm/pbm, nii, nii.gz, nrrd, mha.

Labels: ``--labels v0=name0,v1=name1,...`` maps mask value v_i to label i (the first is the background and
becomes 0); without it all mask values found are sorted and mapped to 0..K-1, and the mapping is printed.
Output: 2D natural images without ``--spacing`` keep ``.png``; with spacing (or 3D/medical inputs) cases are
written as ``.nii.gz`` (2D images as 1 x H x W volumes with spacing 999 on the dummy axis), since png cannot
store spacing.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from dataset_conversion.common import (MEDICAL_IMAGE_ENDINGS, NATURAL_IMAGE_ENDINGS, SUPPORTED_ENDINGS,
                                       CaseSource, ConversionError, add_common_args, channels_from_array, check_spacing,
                                       converter_parser, read_image, remap_labels, resolve_raw_root, run_cli,
                                       sanitize_case_id, slice_as_volume, strip_ending, write_dataset)


def parse_label_spec(spec: str) -> Tuple[Dict[int, int], Dict[str, int]]:
    """'0=background,255=tumour' → ({0: 0, 255: 1}, {'background': 0, 'tumour': 1})."""
    value_map: Dict[int, int] = {}
    names: Dict[str, int] = {}
    for i, item in enumerate(x for x in spec.split(",") if x.strip()):
        if "=" not in item:
            raise ConversionError(f"--labels item {item!r} is not VALUE=NAME (e.g. --labels 0=background,255=lesion)")
        v, name = item.split("=", 1)
        try:
            value = int(v)
        except ValueError:
            raise ConversionError(f"--labels value {v!r} is not an integer (e.g. --labels 0=background,255=lesion)")
        if value in value_map or name.strip() in names:
            raise ConversionError(f"--labels repeats {item!r}: each value and name may appear once")
        value_map[value] = i
        names[name.strip()] = i
    if len(value_map) < 2:
        raise ConversionError("--labels needs the background and at least one class (e.g. 0=background,1=organ)")
    # the first item becomes label 0: a background listed later would silently invert the masks
    first_value, first_name = next(iter(value_map)), next(iter(names))
    late_bg = [n for n in names if n.lower() in ("background", "bg", "bckg", "back")][:1]
    if (0 in value_map and first_value != 0) or (late_bg and late_bg[0] != first_name):
        ordered = sorted(value_map, key=lambda v: (v != 0, list(value_map).index(v)))
        inv = {i: n for n, i in names.items()}
        fixed = ",".join(f"{v}={inv[value_map[v]]}" for v in ordered)
        raise ConversionError(f"--labels {spec!r}: the first item becomes the background (label 0), but "
                              f"{'value 0' if 0 in value_map and first_value != 0 else repr(late_bg[0])} is "
                              f"listed later, which would invert the masks. Fix: list the background first, "
                              f"e.g. --labels {fixed}")
    return value_map, names


def _index(folder: Path, suffix: str, what: str) -> Dict[str, Path]:
    """{case stem: file}. An empty result is an error that lists what the folder holds and why none of it
    matched (unsupported format, hidden file, missing --mask-suffix)."""
    if not folder.is_dir():
        raise ConversionError(f"{what} folder {folder} does not exist: pass an existing folder")
    out: Dict[str, Path] = {}
    skipped: Dict[str, List[str]] = {}
    for p in sorted(folder.iterdir()):
        stem, ending = strip_ending(p.name)
        if not p.is_file():
            skipped.setdefault("not a file", []).append(p.name)
            continue
        if p.name.startswith("."):
            skipped.setdefault("hidden", []).append(p.name)
            continue
        if not ending:
            skipped.setdefault(f"unsupported format (readable: {', '.join(SUPPORTED_ENDINGS)})", []).append(p.name)
            continue
        if suffix:
            if not stem.endswith(suffix):
                skipped.setdefault(f"name does not end with --mask-suffix {suffix!r}", []).append(p.name)
                continue
            stem = stem[: -len(suffix)]
        if stem in out:
            raise ConversionError(f"duplicate case id {stem!r}: {out[stem]} and {p}; keep one of them")
        out[stem] = p
    if not out:
        if not skipped:
            raise ConversionError(f"{what} folder {folder} is empty: pass the folder that holds the {what}")
        why = "; ".join(f"{len(v)} {reason} (e.g. {', '.join(v[:3])})" for reason, v in skipped.items())
        raise ConversionError(f"no usable {what} in {folder}: {why}. Fix: point --{what} at the right folder"
                              + (", or correct --mask-suffix" if suffix else "")
                              + (" or convert the files to png/nii.gz" if any("unsupported" in r for r in skipped)
                                 else ""))
    return out


def _suggest_suffix(images: Dict[str, Path], masks: Dict[str, Path]) -> Optional[str]:
    """If mask names are image names plus a common suffix ('a' ↔ 'a_mask'), that suffix."""
    suffixes = set()
    for m in list(masks)[:20]:
        base = max((i for i in images if m.startswith(i) and m != i), key=len, default=None)
        if base is None:
            return None
        suffixes.add(m[len(base):])
    return suffixes.pop() if len(suffixes) == 1 else None


def _read_mask_array(path: Path) -> Tuple[np.ndarray, sitk.Image]:
    img = read_image(path)
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = sitk.GetArrayFromImage(img)
        ch = arr[..., : min(3, arr.shape[-1])]
        if not all(np.array_equal(ch[..., 0], ch[..., i]) for i in range(ch.shape[-1])):
            raise ConversionError(f"mask {path} has colour channels that differ: save masks as single-channel "
                                  f"label images")
        plain = sitk.GetImageFromArray(ch[..., 0])
        plain.CopyInformation(img)
        img = plain
    return sitk.GetArrayFromImage(img), img


def collect_label_values(masks: Sequence[Path]) -> List[int]:
    values: set = set()
    for m in masks:
        arr, _ = _read_mask_array(m)
        u = np.unique(arr)
        if not np.all(np.mod(u, 1) == 0):
            raise ConversionError(f"mask {m} has non-integer values: masks must hold integer labels")
        values |= set(int(x) for x in u)
    return sorted(values)


def build_cases(images_dir: Path, masks_dir: Path, value_map: Dict[int, int], channels: str,
                spacing: Optional[Sequence[float]], out_ending: str, patient_regex: Optional[str],
                mask_suffix: str = "") -> List[CaseSource]:
    images = _index(images_dir, "", "images")
    masks = _index(masks_dir, mask_suffix, "masks")
    if not set(images) & set(masks):
        hint = _suggest_suffix(images, masks)
        raise ConversionError(
            f"no image has a mask: images are named like {next(iter(images))!r}, masks like "
            f"{next(iter(masks))!r}{f' (after removing --mask-suffix {mask_suffix!r})' if mask_suffix else ''}. "
            + (f"Fix: pass --mask-suffix {(mask_suffix or '') + hint}" if hint else
               "Fix: name each mask like its image (optionally plus --mask-suffix)"))
    for stem, p in images.items():
        if stem not in masks:
            raise ConversionError(f"missing mask for image {p}: expected {masks_dir / (stem + mask_suffix)}.<ext>; "
                                  f"add it or remove the image")
    for stem, p in masks.items():
        if stem not in images:
            raise ConversionError(f"missing image for mask {p}: expected {images_dir / stem}.<ext>; "
                                  f"add it or remove the mask")
    rx = compile_patient_regex(patient_regex) if patient_regex else None
    cases = []
    for stem in sorted(images):
        case_id = sanitize_case_id(stem)
        patient = case_id
        if rx is not None:
            m = rx.search(stem)
            if not m:
                raise ConversionError(f"--patient-regex {patient_regex!r} does not match {images[stem].name}: "
                                      f"fix the expression (first group or whole match = patient id)")
            patient = m.group(1) if m.groups() else m.group(0)
        img_p, mask_p = images[stem], masks[stem]
        cases.append(CaseSource(case_id, patient, [str(img_p)], str(mask_p),
                                _loader(img_p, mask_p, value_map, channels, spacing, out_ending)))
    if rx is not None:
        report_patients(cases, patient_regex)
    return cases


def compile_patient_regex(patient_regex: str) -> "re.Pattern":
    try:
        rx = re.compile(patient_regex)
    except re.error as e:
        raise ConversionError(f"--patient-regex {patient_regex!r} is not a valid regular expression ({e}). "
                              f"Fix: e.g. --patient-regex '^(p\\d+)_'") from None
    if rx.groups == 0:
        print(f"note: --patient-regex {patient_regex!r} has no group: the whole match is the patient id")
    return rx


def report_patients(cases: Sequence[CaseSource], patient_regex: str) -> None:
    """Print how the regex grouped the cases; one patient for many cases is an error (no test split)."""
    patients: Dict[str, List[str]] = {}
    for c in cases:
        patients.setdefault(c.patient_id, []).append(c.case_id)
    if len(patients) == 1 and len(cases) > 1:
        pid = next(iter(patients))
        raise ConversionError(f"--patient-regex {patient_regex!r} gives the same patient id {pid!r} for all "
                              f"{len(cases)} cases, so there can be no patient-level test split. Fix: capture "
                              f"the part of the name that differs between patients in a group, e.g. "
                              f"'^(p\\d+)_'")
    examples = ", ".join(f"{ids[0]} -> {pid}" for pid, ids in list(patients.items())[:3])
    print(f"patients from --patient-regex: {len(patients)} patients for {len(cases)} cases (e.g. {examples})")


def _loader(img_p: Path, mask_p: Path, value_map: Dict[int, int], channels: str,
            spacing: Optional[Sequence[float]], out_ending: str):
    def load() -> Tuple[List[sitk.Image], sitk.Image]:
        img = read_image(img_p)
        m_arr, m_img = _read_mask_array(mask_p)
        lab = remap_labels(m_arr, value_map, mask_p, "pass every value in --labels or fix the mask")
        arr = sitk.GetArrayFromImage(img)
        vector = img.GetNumberOfComponentsPerPixel() > 1
        spatial_ndim = arr.ndim - (1 if vector else 0)
        if spatial_ndim == 3 and arr.shape[0] == 1 and img.GetDimension() == 3 and strip_ending(img_p.name)[1] in NATURAL_IMAGE_ENDINGS:
            arr, spatial_ndim = arr[0], 2
        if spatial_ndim == 2:
            chans = channels_from_array(arr, channels, img_p)
            lab2 = lab[0] if lab.ndim == 3 and lab.shape[0] == 1 else lab
            if out_ending == ".png":
                return [sitk.GetImageFromArray(c) for c in chans], sitk.GetImageFromArray(lab2)
            if spacing and len(spacing) != 2:
                raise ConversionError(f"{img_p} is 2D: --spacing needs two values SY SX, got {len(spacing)} "
                                      f"({' '.join(f'{v:g}' for v in spacing)}). Fix: --spacing "
                                      f"{' '.join(f'{v:g}' for v in spacing[-2:])}")
            sp = tuple(spacing) if spacing else None
            return [slice_as_volume(c, sp) for c in chans], slice_as_volume(lab2, sp)
        # 3D volume: keep the image geometry unless --spacing overrides it
        if vector:
            chans = [sitk.VectorIndexSelectionCast(img, i) for i in range(min(3, img.GetNumberOfComponentsPerPixel()))]
            chans = chans if channels == "rgb" else chans[:1]
        else:
            chans = [img] * (3 if channels == "rgb" else 1)
        if spacing:
            if len(spacing) != 3:
                raise ConversionError(f"{img_p} is 3D: --spacing needs three values SZ SY SX")
            chans = [sitk.Image(c) for c in chans]
            for c in chans:
                c.SetSpacing((spacing[2], spacing[1], spacing[0]))
        lab_img = sitk.GetImageFromArray(lab)
        if lab_img.GetSize() == chans[0].GetSize():
            if not spacing and not np.allclose(m_img.GetSpacing(), chans[0].GetSpacing(), rtol=1e-3):
                raise ConversionError(f"spacing mismatch: mask {mask_p} has {m_img.GetSpacing()}, image {img_p} "
                                      f"has {chans[0].GetSpacing()}; fix the mask header")
            lab_img.CopyInformation(chans[0])
        return chans, lab_img

    return load


def choose_ending(images: Sequence[Path], spacing: Optional[Sequence[float]], requested: str) -> str:
    if requested != "auto":
        return requested
    natural = all(strip_ending(p.name)[1] in NATURAL_IMAGE_ENDINGS for p in images)
    return ".png" if natural and not spacing else ".nii.gz"


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = converter_parser("tskd_convert_folder", __doc__)
    p.add_argument("--images", required=True, type=Path, help="folder of images")
    p.add_argument("--masks", required=True, type=Path, help="folder of masks (same names as the images)")
    add_common_args(p, None, None)
    p.add_argument("--labels", default=None, help="VALUE=NAME,... in label order, background first "
                                                  "(default: all values found, sorted, mapping printed)")
    p.add_argument("--channels", choices=("gray", "rgb"), default="gray",
                   help="gray: one channel (R=G=B kept losslessly, colour → luminance); rgb: three channels")
    p.add_argument("--spacing", type=float, nargs="+", default=None,
                   help="pixel spacing SY SX (2D) or SZ SY SX (3D) in mm, same for all cases")
    p.add_argument("--channel-name", default=None,
                   help="name of the (single) channel for nnU-Net normalization, e.g. CT (default: image, or R,G,B)")
    p.add_argument("--file-ending", choices=("auto", ".png", ".nii.gz"), default="auto",
                   help="output format (auto: .png for 2D natural images without --spacing, else .nii.gz)")
    p.add_argument("--patient-regex", default=None,
                   help="regular expression on the file name whose first group is the patient id "
                        "(default: each case is its own patient)")
    p.add_argument("--mask-suffix", default="", help="mask names are image name + this suffix, e.g. _mask")
    a = p.parse_args(argv)
    if a.spacing is not None and len(a.spacing) not in (2, 3):
        raise ConversionError("--spacing takes SY SX (2D) or SZ SY SX (3D)")
    check_spacing(a.spacing)
    raw_root = resolve_raw_root(a.output_root)
    mask_files = sorted(_index(a.masks, a.mask_suffix, "masks").values())
    if a.labels:
        value_map, names = parse_label_spec(a.labels)
        inv = {i: n for n, i in names.items()}
        print("label mapping (mask value -> nnU-Net label): "
              + ", ".join(f"{v}->{i} ({inv[i]})" for v, i in value_map.items()))
    else:
        values = collect_label_values(mask_files)
        if len(values) < 2:
            raise ConversionError(f"masks in {a.masks} hold only the value(s) {values}: nothing to segment. Fix: "
                                  f"point --masks at the label masks (a non-zero value per structure)")
        value_map = {v: i for i, v in enumerate(values)}
        names = {"background": 0, **{f"label_{v}": i for v, i in value_map.items() if i > 0}}
        print("label mapping (mask value -> nnU-Net label): "
              + ", ".join(f"{v}->{i}" for v, i in value_map.items()))
    image_files = sorted(_index(a.images, "", "images").values())
    ending = choose_ending(image_files, a.spacing, a.file_ending)
    if ending == ".png" and any(strip_ending(f.name)[1] in MEDICAL_IMAGE_ENDINGS for f in image_files):
        raise ConversionError(f"--file-ending .png cannot hold the medical images in {a.images}; use .nii.gz")
    if a.channels == "rgb":
        channel_names = {0: "R", 1: "G", 2: "B"}
    else:
        channel_names = {0: a.channel_name or "image"}
    cases = build_cases(a.images, a.masks, value_map, a.channels, a.spacing, ending, a.patient_regex,
                        a.mask_suffix)
    write_dataset(cases, raw_root=raw_root, dataset_id=a.dataset_id, dataset_name=a.name,
                  channel_names=channel_names, labels=names, file_ending=ending,
                  test_fraction=a.test_fraction, seed=a.seed, overwrite=a.overwrite,
                  extra_json={"description": f"converted from {a.images} and {a.masks}",
                              "tskd_label_value_map": {str(k): v for k, v in value_map.items()}})


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
