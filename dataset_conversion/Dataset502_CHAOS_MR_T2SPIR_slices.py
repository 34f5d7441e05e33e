"""CHAOS MR T2-SPIR in slice-PNG form → nnU-Net Dataset502_CHAOS_MR_T2SPIR (2D cases, one per slice).

    python -m dataset_conversion.Dataset502_CHAOS_MR_T2SPIR_slices --input ../shared/datasets/chaos_mr_t2spir

Input: ``images/chaos_t2_pXX_sYY.png`` (16-bit) and ``masks/chaos_t2_pXX_sYY.png`` with labels 0..4 (or the
original CHAOS grey levels 63/126/189/252, mapped to 1..4). Case id ``chaos_pXX_sYY``, patient ``chaos_pXX``:
the test split and label budgets keep all slices of a patient together. Spacing: 1.25 x 1.25 mm in-plane
(SOURCE.md of the staged data; ``--spacing`` overrides), written as ``.nii.gz`` 1 x H x W volumes with spacing
(999, sy, sx) since png cannot carry spacing.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from dataset_conversion.chaos_official import CHAOS_LICENCE, CHAOS_REFERENCE
from dataset_conversion.common import (CaseSource, ConversionError, add_common_args, check_spacing, converter_parser,
                                       read_2d_array, read_2d_mask, remap_labels, run_cli, slice_as_volume,
                                       write_dataset_from_args)

NAME_RE = re.compile(r"^chaos_t2_p(\d+)_s(\d+)$")
LABELS = {"background": 0, "liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
DIRECT = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}
GREY_LEVELS = {0: 0, 63: 1, 126: 2, 189: 3, 252: 4}


def build_cases(root: Path, spacing_yx: Sequence[float], only_with_organs: bool = False) -> List[CaseSource]:
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise ConversionError(f"{root} must contain images/ and masks/ (chaos_t2_pXX_sYY.png): pass the "
                              f"chaos_mr_t2spir folder with --input")
    cases = []
    for img in sorted(img_dir.glob("*.png")):
        m = NAME_RE.match(img.stem)
        if not m:
            raise ConversionError(f"unexpected file name {img}: expected chaos_t2_pXX_sYY.png")
        mask = mask_dir / img.name
        if not mask.is_file():
            raise ConversionError(f"missing mask {mask} for image {img}: add it or remove the image")
        pid, sl = int(m.group(1)), int(m.group(2))
        cases.append(CaseSource(f"chaos_p{pid:02d}_s{sl:02d}", f"chaos_p{pid:02d}", [str(img)], str(mask),
                                _loader(img, mask, tuple(spacing_yx))))
    for mask in sorted(mask_dir.glob("*.png")):
        if not (img_dir / mask.name).is_file():
            raise ConversionError(f"missing image {img_dir / mask.name} for mask {mask}")
    if only_with_organs:
        cases = [c for c in cases if np.any(read_2d_mask(Path(c.label_file)))]
    return cases


def _loader(img: Path, mask: Path, spacing_yx):
    def load():
        (arr,) = read_2d_array(img, "gray")
        m = read_2d_mask(mask)
        values = set(np.unique(m).tolist())
        mapping = DIRECT if values <= set(DIRECT) else GREY_LEVELS
        lab = remap_labels(m, mapping, mask, "expected 0..4 or the CHAOS grey levels 0/63/126/189/252")
        return [slice_as_volume(arr, spacing_yx)], slice_as_volume(lab, spacing_yx)
    return load


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = converter_parser("tskd_convert_chaos_slices", __doc__)
    p.add_argument("-i", "--input", required=True, type=Path, help="folder with images/ and masks/")
    add_common_args(p, 502, "CHAOS_MR_T2SPIR")
    p.add_argument("--spacing", type=float, nargs=2, default=(1.25, 1.25), metavar=("SY", "SX"),
                   help="in-plane pixel spacing in mm (default 1.25 1.25, from the staged data's SOURCE.md)")
    p.add_argument("--only-with-organs", action="store_true", help="drop slices whose mask is empty")
    a = p.parse_args(argv)
    check_spacing(a.spacing)
    write_dataset_from_args(a, lambda: build_cases(a.input, a.spacing, a.only_with_organs),
                            channel_names={0: "T2SPIR"}, labels=LABELS, file_ending=".nii.gz",
                            licence=CHAOS_LICENCE, reference=CHAOS_REFERENCE)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
