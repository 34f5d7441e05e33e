"""CHAOS official MR training set (DICOM) → nnU-Net Dataset503_CHAOS_MR_<sequence> (3D volumes).

    python -m dataset_conversion.Dataset503_CHAOS_MR --input CHAOS_Train_Sets [--sequence T2SPIR|T1DUAL]

Layout: ``Train_Sets/MR/<patient>/T2SPIR/DICOM_anon/*.dcm`` + ``T2SPIR/Ground/*.png`` or
``T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm`` + ``T1DUAL/Ground/*.png``. T1DUAL gives two channels (in, out
phase). Ground grey levels 63/126/189/252 (CHAOS ranges 55-70/110-135/175-200/240-255) become 1 liver,
2 right kidney, 3 left kidney, 4 spleen. Volumes keep the DICOM spacing, origin and direction and are written
as ``.nii.gz``, so both nnU-Net's 2d and 3d_fullres configurations can be planned. One case per patient.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from dataset_conversion.chaos_official import (CHAOS_LICENCE, CHAOS_REFERENCE, MR_LABELS, MR_RANGES, case_id_for,
                                               load_series_with_ground, load_t1dual, modality_dir, patient_dirs)
from dataset_conversion.common import (CaseSource, ConversionError, add_common_args, converter_parser, run_cli,
                                       write_dataset_from_args)


def build_cases(root: Path, sequence: str) -> List[CaseSource]:
    cases = []
    for pdir in patient_dirs(modality_dir(root, "MR")):
        seq_dir = pdir / sequence
        if not seq_dir.is_dir():
            raise ConversionError(f"missing folder {seq_dir}: every CHAOS MR patient has {sequence}/; restore it "
                                  f"or remove patient {pdir.name}")
        if sequence == "T2SPIR":
            dicom_dir, ground_dir = seq_dir / "DICOM_anon", seq_dir / "Ground"

            def load(d=dicom_dir, g=ground_dir):
                vol, lab = load_series_with_ground(d, g, MR_RANGES, "0, 63, 126, 189, 252")
                return [vol], lab
            images = [str(dicom_dir)]
        else:
            def load(s=seq_dir):
                chans, lab, _ = load_t1dual(s)
                return chans, lab
            images = [str(seq_dir / "DICOM_anon" / "InPhase"), str(seq_dir / "DICOM_anon" / "OutPhase")]
        cases.append(CaseSource(case_id_for("chaos_mr", pdir.name), f"chaos_mr_{pdir.name}", images,
                                str(seq_dir / "Ground"), load))
    return cases


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = converter_parser("tskd_convert_chaos_mr", __doc__)
    p.add_argument("-i", "--input", required=True, type=Path, help="unpacked CHAOS_Train_Sets (holding Train_Sets/MR)")
    p.add_argument("--sequence", choices=("T2SPIR", "T1DUAL"), default="T2SPIR")
    add_common_args(p, 503, None, name_help="dataset name (default CHAOS_MR_<sequence>)")
    a = p.parse_args(argv)
    channels = {0: "T2SPIR"} if a.sequence == "T2SPIR" else {0: "T1_InPhase", 1: "T1_OutPhase"}
    write_dataset_from_args(a, lambda: build_cases(a.input, a.sequence), channel_names=channels, labels=MR_LABELS,
                            file_ending=".nii.gz", licence=CHAOS_LICENCE, reference=CHAOS_REFERENCE,
                            dataset_name=a.name or f"CHAOS_MR_{a.sequence}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
