"""Console commands ``tskd_export`` and ``tskd_predict_onnx`` (nnU-Net-style flags).

    tskd_export -d 990 -c 2d -f 0 -tr DistillTrainer -o exported/ [--int8]
    tskd_predict_onnx -i imagesTs -o pred -m exported/ [--int8] [--disable_tta] [-npp 1 -nps 1]

Errors the user can fix are one line on stderr (``tskd_export: error: ...``) and exit status 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional


def _quiet_library_warnings() -> None:
    """Importing the trainers (timm, peft, diffusers) prints deprecation notices meant for developers."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _fail(prog: str, msg: str) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 1


def export_main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tskd_export", description=(
        "Write the network of a trained nnU-Net model folder to ONNX (dynamic batch, deep supervision off) "
        "beside copies of plans.json and dataset.json. See documentation/export.md."))
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration (e.g. 2d, 3d_fullres)")
    p.add_argument("-f", default="0", help="one fold (0-4 or all). Default: 0")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer class. Default: nnUNetTrainer")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name. Default: checkpoint_final.pth")
    p.add_argument("-o", required=True, help="output folder: created, or replaced as a whole once the new export is "
                                             "complete (missing, empty or an earlier export)")
    p.add_argument("--int8", action="store_true", help="also write model_int8.onnx (onnxruntime quantization)")
    p.add_argument("--int8_method", choices=("static", "dynamic"), default="static",
                   help="static: int8 weights and activations, calibrated on training cases from "
                        "nnUNet_preprocessed (default); dynamic: weights only, no data needed")
    p.add_argument("--calibration_cases", type=int, default=8, help="training cases for static calibration. Default: 8")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset. Default: 17")
    args = p.parse_args(argv)
    _quiet_library_warnings()
    if os.path.exists(args.o) and not os.path.isdir(args.o):  # before the slow imports
        return _fail(p.prog, f"-o {args.o} is a file, not a folder. Fix: pass a folder for the export (created if "
                             f"missing)")

    from tskd_nnunet.export.onnx_export import ExportError, export_model_folder

    try:
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        fold = args.f if args.f == "all" else int(args.f)
        try:
            model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
        except (RuntimeError, TypeError) as e:  # unknown dataset, nnUNet_results unset
            raise ExportError(f"{' '.join(str(e).split())}. Fix: check -d and nnUNet_raw/nnUNet_results") from None
        export_model_folder(model_folder, args.o, fold, args.chk, int8=args.int8, int8_method=args.int8_method,
                            calibration_cases=args.calibration_cases, opset=args.opset)
    except ExportError as e:
        return _fail(p.prog, str(e))
    except ValueError as e:
        return _fail(p.prog, " ".join(str(e).split()))
    print(f"exported to {os.path.abspath(args.o)}")
    return 0


def predict_main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tskd_predict_onnx", description=(
        "nnU-Net prediction (preprocessing, sliding window, Gaussian weighting, mirroring, export) with the "
        "ONNX network of a tskd_export folder, on CPU through onnxruntime. See documentation/export.md."))
    p.add_argument("-i", required=True, help="input folder (nnU-Net naming: CASE_0000.png ...)")
    p.add_argument("-o", required=True, help="output folder (created)")
    p.add_argument("-m", required=True, help="folder written by tskd_export")
    p.add_argument("--int8", action="store_true", help="use model_int8.onnx")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding window step. Default: 0.5")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring (faster, less accurate)")
    p.add_argument("--save_probabilities", action="store_true")
    p.add_argument("--continue_prediction", action="store_true", help="do not overwrite existing predictions")
    p.add_argument("-npp", type=int, default=3, help="preprocessing processes. Default: 3")
    p.add_argument("-nps", type=int, default=3, help="segmentation export processes. Default: 3")
    p.add_argument("-threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores). Default: 0")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--disable_progress_bar", action="store_true")
    args = p.parse_args(argv)
    _quiet_library_warnings()

    from tskd_nnunet.export.onnx_predictor import InputFolderError, OnnxModelError, OnnxPredictor, check_input_folder

    if not os.path.isdir(args.i):
        return _fail(p.prog, f"input folder {args.i} not found")
    if not 0 < args.step_size <= 1:  # nnU-Net asserts this in a worker, after writing into -o
        return _fail(p.prog, f"-step_size {args.step_size}: the sliding window moves by this fraction of the patch "
                             f"size, 0 < step_size <= 1. Fix: -step_size 0.5 (the default)")
    if os.path.exists(args.o) and not os.path.isdir(args.o):
        return _fail(p.prog, f"-o {args.o} is a file, not a folder. Fix: pass a folder for the segmentations")
    try:
        predictor = OnnxPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                  use_mirroring=not args.disable_tta, verbose=args.verbose,
                                  allow_tqdm=not args.disable_progress_bar, threads=args.threads)
        predictor.initialize_from_exported_folder(args.m, int8=args.int8)
        check_input_folder(args.i, predictor.dataset_json, args.m)
    except (OnnxModelError, InputFolderError) as e:
        return _fail(p.prog, str(e))
    os.makedirs(args.o, exist_ok=True)
    predictor.predict_from_files(args.i, args.o, save_probabilities=args.save_probabilities,
                                 overwrite=not args.continue_prediction,
                                 num_processes_preprocessing=args.npp, num_processes_segmentation_export=args.nps)
    return 0

