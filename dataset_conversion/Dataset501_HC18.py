"""HC18 fetal head ultrasound → nnU-Net Dataset501_HC18 (labels: 0 background, 1 fetal head).

    python -m dataset_conversion.Dataset501_HC18 --input ../shared/datasets/hc18_fetal_head_us

Two input layouts are recognised:
- staged layout: ``images/NNN_HC.png``, ``masks/NNN_HC.png`` (filled, 0/255), ``pixel_size_and_HC.csv``;
- official Zenodo release: ``training_set/NNN[_2|_3]HC.png`` + ``NNN[_2|_3]HC_Annotation.png`` (ellipse
  outlines, filled here) and ``training_set_pixel_size_and_HC.csv``.
The CSV pixel size (mm) is the spacing of both axes. Cases are written as ``.nii.gz`` 1 x H x W volumes with
spacing (999, s, s), because nnU-Net's png reader cannot carry spacing. Repeat frames NNN_2HC/NNN_3HC are the
same exam as NNN_HC and share its patient id, so they never straddle the test split.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.ndimage import binary_fill_holes

from dataset_conversion.common import (CaseSource, ConversionError, add_common_args, converter_parser, read_2d_array,
                                       read_2d_mask, run_cli, slice_as_volume, write_dataset_from_args)

NAME_RE = re.compile(r"^(\d+)_(\d*)HC$")


def read_pixel_sizes(csv_path: Path) -> Dict[str, float]:
    if not csv_path.is_file():
        raise ConversionError(f"missing file {csv_path}: the HC18 CSV with the pixel size per image is required")
    out: Dict[str, float] = {}
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or "filename" not in header[0].lower():
            raise ConversionError(f"{csv_path} does not start with the HC18 header 'filename,pixel size(mm),...'")
        for row in reader:
            if not row:
                continue
            try:
                out[row[0].strip()] = float(row[1])
            except (IndexError, ValueError):
                raise ConversionError(f"{csv_path}: bad row {row!r}; expected 'NNN_HC.png,<pixel size mm>,...'")
    return out


def find_layout(root: Path) -> Tuple[List[Tuple[Path, Path]], Path, bool]:
    """Return ([(image, mask)], csv, masks_are_outlines)."""
    if (root / "images").is_dir() and (root / "masks").is_dir():
        csv_path = root / "pixel_size_and_HC.csv"
        pairs = []
        for img in sorted((root / "images").glob("*.png")):
            mask = root / "masks" / img.name
            if not mask.is_file():
                raise ConversionError(f"missing mask {mask} for image {img}: add it or remove the image")
            pairs.append((img, mask))
        for mask in sorted((root / "masks").glob("*.png")):
            if not (root / "images" / mask.name).is_file():
                raise ConversionError(f"missing image {root / 'images' / mask.name} for mask {mask}")
        return pairs, csv_path, False
    train = root / "training_set" if (root / "training_set").is_dir() else root
    csv_path = next((p for p in (root / "training_set_pixel_size_and_HC.csv",
                                 train / "training_set_pixel_size_and_HC.csv") if p.is_file()),
                    root / "training_set_pixel_size_and_HC.csv")
    pairs = []
    for img in sorted(train.glob("*HC.png")):
        mask = img.with_name(img.stem + "_Annotation.png")
        if not mask.is_file():
            raise ConversionError(f"missing annotation {mask} for image {img}: add it or remove the image")
        pairs.append((img, mask))
    if not pairs:
        raise ConversionError(f"no HC18 images in {root}: expected images/ + masks/ + pixel_size_and_HC.csv "
                              f"or training_set/NNN_HC.png + NNN_HC_Annotation.png")
    return pairs, csv_path, True


def build_cases(root: Path) -> List[CaseSource]:
    pairs, csv_path, outlines = find_layout(root)
    sizes = read_pixel_sizes(csv_path)
    cases = []
    for img, mask in pairs:
        m = NAME_RE.match(img.stem)
        if not m:
            raise ConversionError(f"unexpected HC18 file name {img}: expected NNN_HC.png or NNN_2HC.png")
        if img.name not in sizes:
            raise ConversionError(f"{img.name} has no row in {csv_path}: add its pixel size or remove the image")
        exam, repeat = m.group(1), m.group(2)
        case_id = f"hc18_{exam}" + (f"_{repeat}" if repeat else "")
        cases.append(CaseSource(case_id, f"hc18_{exam}", [str(img)], str(mask),
                                _loader(img, mask, sizes[img.name], outlines)))
    return cases


def _loader(img: Path, mask: Path, pixel_mm: float, outlines: bool):
    def load():
        (arr,) = read_2d_array(img, "gray")
        m = read_2d_mask(mask)
        values = set(np.unique(m).tolist())
        if not values <= {0, 1, 255}:
            raise ConversionError(f"mask {mask} has unknown label value(s) {sorted(values - {0, 1, 255})[:10]} "
                                  f"(expected 0 and 255): use the HC18 masks/annotations unchanged")
        fg = m > 0
        if outlines:  # the official annotations are 1-px ellipse outlines; the head is the filled ellipse
            fg = binary_fill_holes(fg)
        return [slice_as_volume(arr, (pixel_mm, pixel_mm))], slice_as_volume(fg.astype(np.uint8), (pixel_mm, pixel_mm))
    return load


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = converter_parser("tskd_convert_hc18", __doc__)
    p.add_argument("-i", "--input", required=True, type=Path, help="HC18 folder (staged or official layout)")
    add_common_args(p, 501, "HC18")
    a = p.parse_args(argv)

    def cases() -> List[CaseSource]:
        if not a.input.is_dir():
            raise ConversionError(f"input folder {a.input} does not exist: pass the HC18 folder with --input")
        return build_cases(a.input)

    write_dataset_from_args(a, cases, channel_names={0: "US"}, labels={"background": 0, "fetal_head": 1},
                            file_ending=".nii.gz", licence="CC BY 4.0",
                            reference="van den Heuvel et al., PLoS ONE 13(8):e0200412, 2018; "
                                      "doi:10.5281/zenodo.1327317")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
