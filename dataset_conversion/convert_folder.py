"""Generic converter: a folder of images + a folder of masks → nnU-Net v2 raw dataset.

    python -m dataset_conversion.convert_folder --images IMGS --masks MASKS -d 600 --name MyData \
        [--labels 0=background,255=lesion] [--channels gray|rgb] [--spacing SY SX | SZ SY SX] \
        [--patient-regex '^(p\\d+)_'] [--mask-suffix _mask]

Images and masks are matched by file name without extension (``a.png`` ↔ ``a.png`` or ``a_mask.tif`` with
``--mask-suffix _mask``). Formats: png, jpg, bmp, tif, gif, webp, ppm/pgm/pbm, nii, nii.gz, nrrd, mha.

Labels: ``--labels v0=name0,v1=name1,...`` maps mask value v_i to label i (the first is the background and
becomes 0; values that share a name share a label: ``0=background,1=lesion,255=lesion``); without it all mask
values found are sorted and mapped to 0..K-1, and the mapping is printed. Without ``--labels``, masks that
cannot be label maps are refused: more than MAX_AUTO_LABELS values, a lossy format (JPEG), negative values,
or one structure stored with two encodings (0/1 in some masks, 0/255 in others).
Output: 2D natural images without ``--spacing`` keep ``.png``; with spacing (or 3D/medical inputs) cases are
written as ``.nii.gz`` (2D images as 1 x H x W volumes with spacing 999 on the dummy axis), since png cannot
store spacing.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import SimpleITK as sitk

from dataset_conversion.common import (MEDICAL_IMAGE_ENDINGS, NATURAL_IMAGE_ENDINGS, SUPPORTED_ENDINGS,
                                       CaseSource, ConversionError, add_common_args, channels_from_array, check_spacing,
                                       converter_parser, note_alpha_dropped, read_image, remap_labels,
                                       resolve_raw_root, run_cli, sanitize_case_id, slice_as_volume, strip_ending,
                                       write_dataset)

# Without --labels every value found becomes a class, so more values than this are refused. Label maps of
# public datasets hold a few dozen labels at most (BTCV 13, AMOS 15, WORD 16, plus background), while what
# ends up in --masks by mistake holds many more: a copy of the images (200 grey values in issue #32) or
# JPEG-compressed masks (69). A label map with more classes (TotalSegmentator: 117) needs --labels anyway
# to name them.
MAX_AUTO_LABELS = 32


def parse_label_spec(spec: str) -> Tuple[Dict[int, int], Dict[str, int]]:
    """'0=background,255=tumour' → ({0: 0, 255: 1}, {'background': 0, 'tumour': 1})."""
    value_map: Dict[int, int] = {}
    names: Dict[str, int] = {}
    for item in (x for x in spec.split(",") if x.strip()):
        if "=" not in item:
            raise ConversionError(f"--labels item {item!r} is not VALUE=NAME (e.g. --labels 0=background,255=lesion)")
        v, name = item.split("=", 1)
        try:
            value = int(v)
        except ValueError:
            raise ConversionError(f"--labels value {v!r} is not an integer (e.g. --labels 0=background,255=lesion)")
        if value in value_map:
            raise ConversionError(f"--labels repeats {item!r}: each value may appear once (several values may "
                                  f"share a name, e.g. 0=background,1=lesion,255=lesion)")
        # a name seen before gives the same label: one structure stored with two values (0/1 and 0/255 masks)
        value_map[value] = names.setdefault(name.strip(), len(names))
    if len(names) < 2:
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
    if folder.is_file():
        raise ConversionError(f"--{what} {folder} is a file, not a folder: pass the folder that holds the {what}, "
                              f"e.g. --{what} {folder.parent}")
    if folder.is_symlink() and not folder.exists():
        raise ConversionError(f"--{what} {folder} is a broken symbolic link (-> {os.readlink(folder)}): restore "
                              f"its target or pass the folder itself")
    if not folder.is_dir():
        raise ConversionError(f"{what} folder {folder} does not exist: pass an existing folder")
    out: Dict[str, Path] = {}
    skipped: Dict[str, List[str]] = {}
    for p in sorted(folder.iterdir()):
        stem, ending = strip_ending(p.name)
        if p.is_symlink() and not p.exists() and ending and not p.name.startswith("."):
            # skipping it would report its case as "missing mask/image" although the file is listed
            raise ConversionError(f"{p} is a broken symbolic link (-> {os.readlink(p)}): restore its target or "
                                  f"remove the link")
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


def lossy_format(path: Path) -> Optional[str]:
    """'JPEG' / 'lossy WebP' / 'JPEG-compressed TIFF' when the file's compression is lossy (by content, so a
    JPEG named .png counts), else None. Lossy masks carry compression artefacts around every edge."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if head[:3] == b"\xff\xd8\xff":
                return "JPEG"
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                while True:  # RIFF chunks: the image chunk says lossy ('VP8 ') or lossless ('VP8L')
                    chunk = f.read(8)
                    if len(chunk) < 8:
                        return None
                    if chunk[:4] in (b"VP8 ", b"VP8L"):
                        return "lossy WebP" if chunk[:4] == b"VP8 " else None
                    size = int.from_bytes(chunk[4:], "little")
                    f.seek(size + size % 2, 1)
            if head[:4] in (b"II*\x00", b"MM\x00*"):
                from PIL import Image
                with Image.open(path) as im:
                    return "JPEG-compressed TIFF" if "jpeg" in str(im.info.get("compression", "")) else None
    except OSError:
        return None  # unreadable: read_image names the file with the reason
    return None


def scan_mask_values(masks: Sequence[Path]) -> Dict[Path, Set[int]]:
    """{mask: its values}; a mask with non-integer values is refused."""
    found: Dict[Path, Set[int]] = {}
    for m in masks:
        arr, _ = _read_mask_array(m)
        u = np.unique(arr)
        if not np.all(np.mod(u, 1) == 0):
            raise ConversionError(f"mask {m} has non-integer values: masks must hold integer labels")
        found[m] = set(int(x) for x in u)
    return found


def _example_labels(values: Sequence[int], same: Optional[Dict[int, int]] = None) -> str:
    """A --labels value for ``values``: 0 first as the background; ``same`` maps a value to the value whose
    name it shares."""
    same = same or {}

    def name(v: int) -> str:
        return f"label_{v}" if v >= 0 else f"label_minus{-v}"

    items = ["0=background"] + [f"{v}={name(same.get(v, v))}" for v in sorted(values) if v != 0]
    return ",".join(items)


def check_auto_labels(found: Dict[Path, Set[int]]) -> None:
    """Refuse masks that cannot be label maps when every value found would become a label (no --labels)."""
    for m, vals in found.items():
        neg = sorted(v for v in vals if v < 0)
        if neg:
            raise ConversionError(
                f"mask {m} has negative value(s) {neg[:10]}: a label map holds values >= 0 (a 0/255 mask written "
                f"as signed int8 reads as 0/-1). Fix: save the masks with an unsigned integer type, or name every "
                f"value with --labels={_example_labels(sorted(set().union(*found.values())))} (write '--labels=' "
                f"so that a leading '-' is not read as an option)")
    union = sorted(set().union(*found.values()))
    if len(union) > MAX_AUTO_LABELS:
        m, vals = max(found.items(), key=lambda kv: len(kv[1]))
        shown = ", ".join(str(v) for v in union[:3]) + f", ..., {union[-1]}"
        raise ConversionError(
            f"masks in {m.parent} hold {len(union)} distinct values ({shown}; {m.name} alone has {len(vals)}): "
            f"more than {MAX_AUTO_LABELS} is not a label map but an intensity image or lossy-compressed masks. "
            f"Fix: point --masks at the label masks, or if these really are {len(union) - 1} classes, name every "
            f"value with --labels VALUE=NAME,...")
    _check_one_encoding(found)


def _check_one_encoding(found: Dict[Path, Set[int]]) -> None:
    """Refuse one structure stored two ways: groups of foreground values that never share a mask, one group
    of small indices (<= MAX_AUTO_LABELS: 1, 2, ...) and one of scaled values (255, or 63/126/189/252 as in
    CHAOS). Classes that merely appear in different cases (1 here, 2 there) are both small: not refused."""
    parent: Dict[int, int] = {}

    def root(v: int) -> int:
        while parent.setdefault(v, v) != v:
            v = parent[v]
        return v

    for vals in found.values():  # union-find: values that appear together in one mask form a group
        fg = sorted(v for v in vals if v != 0)
        for v in fg[1:]:
            parent[root(v)] = root(fg[0])
        if fg:
            root(fg[0])
    groups: Dict[int, Set[int]] = {}
    for v in parent:
        groups.setdefault(root(v), set()).add(v)
    small = [g for g in groups.values() if max(g) <= MAX_AUTO_LABELS]
    scaled = [g for g in groups.values() if min(g) > MAX_AUTO_LABELS]
    if not small or not scaled:
        return
    s_vals, l_vals = sorted(set().union(*small)), sorted(set().union(*scaled))

    def holders(group: Set[int]) -> List[Path]:
        return [m for m, vals in found.items() if vals & group]

    hs, hl = holders(set(s_vals)), holders(set(l_vals))
    same = dict(zip(l_vals, s_vals)) if len(s_vals) == len(l_vals) else {}
    one = _example_labels(sorted(set().union(*found.values())), same)
    each = _example_labels(s_vals + l_vals)
    raise ConversionError(
        f"masks mix two encodings: {len(hs)} mask(s) hold {s_vals} (e.g. {hs[0]}) and {len(hl)} hold {l_vals} "
        f"(e.g. {hl[0]}), never together in one mask; without --labels they would become {len(s_vals + l_vals)} "
        f"labels. Fix: if they are the same structure(s) stored two ways, give the values of one structure "
        f"one name: --labels {one}; if they differ, name each value (--labels {each}); or re-save the masks "
        f"with one encoding")


def collect_label_values(masks: Sequence[Path]) -> List[int]:
    """Every value of ``masks``, sorted, after :func:`check_auto_labels` (used when --labels is not given)."""
    found = scan_mask_values(masks)
    check_auto_labels(found)
    return sorted(set().union(*found.values()))


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
    dims = _OneDimensionality()
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
                                _loader(img_p, mask_p, value_map, channels, spacing, out_ending, dims)))
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


class _OneDimensionality:
    """Every case of a dataset is 2D or every case is 3D: nnU-Net plans one dataset one way, and a volume
    among 2D images (or the reverse) used to be converted without a word. A one-slice volume counts as 2D."""

    def __init__(self) -> None:
        self.first: Optional[Tuple[Path, int]] = None

    def check(self, path: Path, n_slices: int) -> None:
        if self.first is None:
            self.first = (path, n_slices)
            return
        first, first_n = self.first
        if (first_n > 1) != (n_slices > 1):
            vol, vol_n, flat = (path, n_slices, first) if n_slices > 1 else (first, first_n, path)
            raise ConversionError(f"{vol} is a 3D volume ({vol_n} slices) but {flat} is a 2D image: nnU-Net plans "
                                  f"a dataset as 2D or as 3D. Fix: convert the 2D images and the 3D volumes as "
                                  f"separate datasets (another -d), or remove the odd one out")


def _header_spacing_2d(img: sitk.Image, img_p: Path, m_img: sitk.Image, mask_p: Path
                       ) -> Optional[Tuple[float, float]]:
    """(sy, sx) of a 2D medical file (NIfTI, nrrd, mha): its header's pixel size, which the 1 x H x W volume
    keeps. Natural images (png, tif, ...) give None (1 x 1): their 'spacing' is a print resolution at best."""
    if img.GetDimension() != 2 or strip_ending(img_p.name)[1] not in MEDICAL_IMAGE_ENDINGS:
        return None
    if m_img.GetDimension() == 2 and not np.allclose(m_img.GetSpacing(), img.GetSpacing(), rtol=1e-3):
        raise ConversionError(f"spacing mismatch: mask {mask_p} has {m_img.GetSpacing()}, image {img_p} has "
                              f"{img.GetSpacing()}; fix the mask header")
    sx, sy = img.GetSpacing()
    return float(sy), float(sx)


def _loader(img_p: Path, mask_p: Path, value_map: Dict[int, int], channels: str,
            spacing: Optional[Sequence[float]], out_ending: str, dims: Optional[_OneDimensionality] = None):
    dims = dims or _OneDimensionality()

    def load() -> Tuple[List[sitk.Image], sitk.Image]:
        img = read_image(img_p)
        m_arr, m_img = _read_mask_array(mask_p)
        lossy = lossy_format(mask_p)
        fix = "pass every value in --labels or fix the mask" + (
            f" ({lossy} is lossy: its edges hold compression artefacts; export the masks as PNG)" if lossy else "")
        lab = remap_labels(m_arr, value_map, mask_p, fix)
        arr = sitk.GetArrayFromImage(img)
        vector = img.GetNumberOfComponentsPerPixel() > 1
        spatial_ndim = arr.ndim - (1 if vector else 0)
        if spatial_ndim == 3 and arr.shape[0] == 1 and img.GetDimension() == 3 and strip_ending(img_p.name)[1] in NATURAL_IMAGE_ENDINGS:
            arr, spatial_ndim = arr[0], 2
        dims.check(img_p, arr.shape[0] if spatial_ndim == 3 else 1)
        if spatial_ndim == 2:
            chans = channels_from_array(arr, channels, img_p)
            lab2 = lab[0] if lab.ndim == 3 and lab.shape[0] == 1 else lab
            if out_ending == ".png":
                return [sitk.GetImageFromArray(c) for c in chans], sitk.GetImageFromArray(lab2)
            if spacing and len(spacing) != 2:
                raise ConversionError(f"{img_p} is 2D: --spacing needs two values SY SX, got {len(spacing)} "
                                      f"({' '.join(f'{v:g}' for v in spacing)}). Fix: --spacing "
                                      f"{' '.join(f'{v:g}' for v in spacing[-2:])}")
            sp = tuple(spacing) if spacing else _header_spacing_2d(img, img_p, m_img, mask_p)
            return [slice_as_volume(c, sp) for c in chans], slice_as_volume(lab2, sp)
        # 3D volume: keep the image geometry unless --spacing overrides it
        if vector:
            n_comp = img.GetNumberOfComponentsPerPixel()
            if n_comp in (2, 4):  # grey + alpha, RGBA
                note_alpha_dropped(img_p)
                n_comp -= 1
            chans = [sitk.VectorIndexSelectionCast(img, i) for i in range(min(3, n_comp))]
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
    if not a.mask_suffix and a.masks.is_dir() and a.masks.resolve() == a.images.resolve():
        raise ConversionError(f"--masks {a.masks} is the same folder as --images: each image would be its own "
                              f"mask. Fix: point --masks at the folder of label masks")
    mask_files = sorted(_index(a.masks, a.mask_suffix, "masks").values())
    if not a.labels:
        lossy = [(m, kind) for m in mask_files for kind in [lossy_format(m)] if kind]
        if lossy:
            raise ConversionError(f"mask {lossy[0][0]} is {lossy[0][1]}, a lossy format ({len(lossy)} of "
                                  f"{len(mask_files)} masks): its edges hold compression artefacts that would "
                                  f"become labels. Fix: export the masks as PNG (lossless), or pass --labels "
                                  f"mapping every value the masks hold")
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
