"""Console entry point ``tskd_evaluate``: score a prediction folder against a reference folder."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from tskd_nnunet.atomic_io import atomic_write_csv
from tskd_nnunet.cli_args import NNUNetStyleParser


def build_parser() -> NNUNetStyleParser:
    p = NNUNetStyleParser(
        prog="tskd_evaluate",
        usage="tskd_evaluate GT_FOLDER PRED_FOLDER -djfile DATASET_JSON -o OUTPUT.csv [options]",
        description="Per case and per class Dice, NSD and HD95 (mm) of nnU-Net predictions vs references "
                    "(arguments as nnUNetv2_evaluate_folder).")
    # positional as in nnUNetv2_evaluate_folder; -ref / -pred are the deprecated spellings
    p.add_argument("ref", nargs="?", metavar="GT_FOLDER", help="folder of reference segmentations (e.g. labelsTs)")
    p.add_argument("pred", nargs="?", metavar="PRED_FOLDER", help="folder of predicted segmentations (same names)")
    p.add_deprecated_alias("-ref", "ref", "GT_FOLDER")
    p.add_deprecated_alias("-pred", "pred", "PRED_FOLDER")
    p.require("ref", "GT_FOLDER")
    p.require("pred", "PRED_FOLDER")
    p.add_argument("-djfile", required=True, help="dataset.json (labels, file_ending)")
    p.add_argument("-o", "--output", required=True, help="output CSV (written atomically)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    p.add_argument("--missing", choices=("error", "empty"), default="error",
                   help="reference case without prediction: fail (default) or score as empty prediction")
    p.add_argument("-np", "--num-processes", type=int, default=1)
    p.add_argument("--hc18-csv", default=None,
                   help="HC18 pixel_size_and_HC.csv: add head circumference columns (hc_pred_mm, "
                        "hc_ref_mm, hc_abs_diff_mm) per case")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Exit codes: 0 scored; 1 a bad input (one line on stderr naming it and the fix); 2 bad usage."""
    args = build_parser().parse_args(argv)
    from tskd_nnunet.evaluation.evaluate import EvaluationInputError

    try:
        return _run(args)
    except EvaluationInputError as e:
        print(f"tskd_evaluate: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from tskd_nnunet.evaluation.clinical import evaluate_test_folder
    from tskd_nnunet.evaluation.evaluate import EvaluationInputError, load_dataset_json, summarize

    dj = load_dataset_json(args.djfile)  # refuse a bad -djfile before reading any image
    if os.path.isdir(args.output):
        raise EvaluationInputError(f"output (-o) is a folder: {args.output}; pass a CSV file name")
    df = evaluate_test_folder(args.ref, args.pred, args.djfile, args.tolerance_mm, args.hc18_csv, args.missing,
                              args.num_processes)
    if args.hc18_csv:
        hc = df.drop_duplicates("case")["hc_abs_diff_mm"].dropna()
        print(f"HC18 mean absolute difference: {hc.mean():.2f} mm over {len(hc)} cases")
    try:
        atomic_write_csv(df, args.output)
    except OSError as e:
        raise EvaluationInputError(f"cannot write output (-o) {args.output}: {e.strerror or e}") from None
    for name, m in summarize(df).items():
        print(f"{name}: Dice {m['dice']:.4f}  NSD@{args.tolerance_mm:g}mm {m['nsd']:.4f}  HD95 {m['hd95']:.2f} mm")
    print(f"wrote {args.output} ({len(df)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
