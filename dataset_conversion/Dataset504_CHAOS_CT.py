"""CHAOS official CT training set (DICOM, liver only) → nnU-Net Dataset504_CHAOS_CT (3D volumes).

    python -m dataset_conversion.Dataset504_CHAOS_CT --input CHAOS_Train_Sets

Layout: ``Train_Sets/CT/<patient>/DICOM_anon/*.dcm`` + ``Train_Sets/CT/<patient>/Ground/*.png`` (liver 255).
Ground PNGs are paired with the DICOM slices by sorted file name (their names differ), then follow their DICOM
into the volume sorted by slice position. Intensities are Hounsfield units (DICOM rescale applied); channel
name ``CT`` selects nnU-Net's CT normalisation. Output ``.nii.gz`` with the DICOM geometry, one case per patient.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from dataset_conversion.chaos_official import (CHAOS_LICENCE, CHAOS_REFERENCE, CT_LABELS, CT_RANGES, case_id_for,
                                               load_series_with_ground, modality_dir, patient_dirs)
from dataset_conversion.common import CaseSource, add_common_args, converter_parser, run_cli, write_dataset_from_args


def build_cases(root: Path) -> List[CaseSource]:
    cases = []
    for pdir in patient_dirs(modality_dir(root, "CT")):
        dicom_dir, ground_dir = pdir / "DICOM_anon", pdir / "Ground"

        def load(d=dicom_dir, g=ground_dir):
            vol, lab = load_series_with_ground(d, g, CT_RANGES, "0 and 255")
            return [vol], lab
        cases.append(CaseSource(case_id_for("chaos_ct", pdir.name), f"chaos_ct_{pdir.name}", [str(dicom_dir)],
                                str(ground_dir), load))
    return cases


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = converter_parser("tskd_convert_chaos_ct", __doc__)
    p.add_argument("-i", "--input", required=True, type=Path, help="unpacked CHAOS_Train_Sets (holding Train_Sets/CT)")
    add_common_args(p, 504, "CHAOS_CT")
    a = p.parse_args(argv)
    write_dataset_from_args(a, lambda: build_cases(a.input), channel_names={0: "CT"}, labels=CT_LABELS,
                            file_ending=".nii.gz", licence=CHAOS_LICENCE, reference=CHAOS_REFERENCE)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
