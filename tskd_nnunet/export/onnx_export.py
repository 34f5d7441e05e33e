"""Export the network of a trained nnU-Net model folder to ONNX (fp32, optionally int8).

The network is rebuilt exactly as ``nnUNetv2_predict`` does it, by nnU-Net's own
``nnUNetPredictor.initialize_from_trained_model_folder`` (trainer class named in the checkpoint ->
``build_network_architecture(plans, ..., enable_deep_supervision=False)`` -> ``load_state_dict``),
so every trainer nnU-Net can predict with exports the same way (our U-Net students, the ViT student).

The export folder is self-describing::

    EXPORT/model.onnx          fp32, input (batch, C, *patch_size), dynamic batch, output logits
    EXPORT/model_int8.onnx     with --int8
    EXPORT/plans.json          copied from the model folder
    EXPORT/dataset.json        copied from the model folder
    EXPORT/tskd_export.json    trainer, configuration, fold, checkpoint, mirroring axes, shapes, checks

The whole folder is written as one (``atomic_io.atomic_folder``): into a hidden folder beside it, which then
replaces the previous export (rename aside, rename in, delete). So a failed export or re-export leaves the
previous one untouched, and ``model.onnx``, ``model_int8.onnx`` and ``tskd_export.json`` always come from one
checkpoint; a re-export without ``--int8`` leaves no stale int8 model. ``-o`` must be missing, empty or an
earlier export (nothing else in it: it is replaced as a whole).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from tskd_nnunet.atomic_io import atomic_folder, atomic_path, atomic_write_text
from tskd_nnunet.data.splits import fold_cases

MODEL_FP32 = "model.onnx"
MODEL_INT8 = "model_int8.onnx"
META_FILE = "tskd_export.json"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_OPSET = 17
# the weight-bearing ops; norms and activations stay float (quantizing them too was slower, not more accurate)
INT8_OP_TYPES = ["Conv", "ConvTranspose", "MatMul", "Gemm"]
FP32_TOLERANCE = 1e-3  # max |logit difference| ONNX fp32 vs PyTorch accepted at export time


EXPORT_FILES = {MODEL_FP32, MODEL_INT8, META_FILE, "plans.json", "dataset.json"}


class ExportError(RuntimeError):
    """Export cannot proceed; the one-line message names the file and the fix."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception's text on one line, shortened (for one-line error messages)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def check_output_folder(output_folder: str) -> None:
    """``-o`` must be a folder that is missing, empty or an earlier export (it is replaced as a whole)."""
    path = os.path.abspath(output_folder)
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "" if probe == path else f": {probe} is a file"
        raise ExportError(f"-o {output_folder}{where or ' is a file'}, not a folder. Fix: pass a folder for the "
                          f"export (created if missing)")
    if probe == path:
        others = sorted(set(os.listdir(path)) - EXPORT_FILES)
        if others:
            raise ExportError(f"-o {output_folder} is not a tskd_export folder (it holds {', '.join(others[:5])}"
                              f"{' ...' if len(others) > 5 else ''}); an export replaces its folder as a whole. Fix: "
                              f"pass a new or empty folder, or move those files out")


# ----------------------------------------------------------------------------- the network
def load_trained_predictor(model_folder: str, fold: Union[int, str], checkpoint_name: str = "checkpoint_final.pth"):
    """nnU-Net's predictor for one fold of ``model_folder`` (the trainer__plans__configuration folder), on CPU.

    The checkpoint is checked first so that a missing one is a one-line error naming the file."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    fold_dir = os.path.join(model_folder, f"fold_{fold}")
    ckpt = os.path.join(fold_dir, checkpoint_name)
    if not os.path.isfile(ckpt):
        found = sorted(f for f in os.listdir(fold_dir) if f.endswith(".pth")) if os.path.isdir(fold_dir) else []
        hint = (f"checkpoints there: {', '.join(found)}; pick one with -chk" if found
                else "train it first (nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER)")
        raise ExportError(f"checkpoint not found: {ckpt}. Fix: {hint}")
    for name in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(model_folder, name)):
            raise ExportError(f"{os.path.join(model_folder, name)} not found: {model_folder} is not a trained "
                              f"nnU-Net model folder. Fix: check -d/-tr/-p/-c and nnUNet_results")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, (fold,), checkpoint_name)
    net = predictor.network
    net.load_state_dict(predictor.list_of_parameters[0])
    net.eval()
    return predictor


def num_parameters(network: torch.nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


# ----------------------------------------------------------------------------- ONNX fp32
def export_network(network: torch.nn.Module, num_input_channels: int, patch_size: Sequence[int], path: str,
                   opset: int = DEFAULT_OPSET) -> None:
    """torch.onnx.export (the TorchScript exporter, ``dynamo=False``: fast, needs no onnxscript) with a
    dynamic batch axis; spatial size fixed to the patch size, which is all nnU-Net's sliding window feeds."""
    network = network.eval()
    dummy = torch.zeros((1, num_input_channels, *[int(s) for s in patch_size]), dtype=torch.float32)
    with atomic_path(path) as tmp, torch.no_grad():
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # instance_norm train=True notices, deprecation of the legacy exporter
            try:
                torch.onnx.export(network, (dummy,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                                  do_constant_folding=True)
            except Exception as e:  # noqa: BLE001 - the exporter raises RuntimeError, SymbolicValueError, ...
                raise ExportError(f"ONNX export at --opset {opset} failed ({first_line(e)}). Fix: "
                                  f"{_opset_fix(opset)}") from None


def _opset_fix(opset: int) -> str:
    return (f"--opset {DEFAULT_OPSET} (the default)" if opset != DEFAULT_OPSET
            else "report this network as not exportable")


def ort_session(path: str, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def compare_with_torch(network: torch.nn.Module, onnx_path: str, num_input_channels: int,
                       patch_size: Sequence[int], batch: int = 2, seed: int = 0) -> float:
    """max |logits| difference between PyTorch and onnxruntime on a random batch (also checks the dynamic batch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, num_input_channels, *[int(s) for s in patch_size]), generator=g)
    with torch.no_grad():
        ref = network.eval()(x).numpy()
    out = ort_session(onnx_path).run(None, {INPUT_NAME: x.numpy()})[0]
    if out.shape != ref.shape:
        raise ExportError(f"{onnx_path}: onnxruntime output shape {out.shape} != PyTorch {ref.shape}. Fix: report "
                          f"this network as not exportable")
    return float(np.abs(out - ref).max())


# ----------------------------------------------------------------------------- int8
def calibration_patches(preprocessed_dataset_folder: str, data_identifier: str, patch_size: Sequence[int],
                        fold: Union[int, str], num_cases: int = 8) -> List[np.ndarray]:
    """Up to ``num_cases`` patches (1, C, *patch_size) from the fold's training cases in nnUNet_preprocessed.

    One patch per case, centred (2d configurations: the middle slice), zero-padded as nnU-Net's sliding
    window pads. Cases are taken in sorted order, so calibration is deterministic."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = os.path.join(preprocessed_dataset_folder, data_identifier)
    if not os.path.isdir(folder):
        raise ExportError(f"int8 calibration needs the preprocessed training cases, {folder} not found. Fix: run "
                          f"nnUNetv2_plan_and_preprocess for this dataset and configuration, or use "
                          f"--int8_method dynamic")
    ds_class = infer_dataset_class(folder)
    ids = sorted(ds_class.get_identifiers(folder))
    train = set(fold_cases(preprocessed_dataset_folder, fold, ids, ExportError)[0])  # nnU-Net's split if no file
    ids = [i for i in ids if i in train] or ids
    if not ids:
        raise ExportError(f"no preprocessed cases in {folder} for int8 calibration. Fix: run "
                          f"nnUNetv2_plan_and_preprocess, or use --int8_method dynamic")
    ds = ds_class(folder, ids[:num_cases])
    patches = []
    for cid in ids[:num_cases]:
        data = np.asarray(ds.load_case(cid)[0][:], dtype=np.float32)  # (C, *spatial)
        if len(patch_size) == 2 and data.ndim == 4:
            data = data[:, data.shape[1] // 2]
        patches.append(_center_patch(data, patch_size)[None])
    return patches


def _center_patch(data: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
    out = np.zeros((data.shape[0], *[int(p) for p in patch_size]), dtype=np.float32)
    src, dst = [slice(None)], [slice(None)]
    for s, p in zip(data.shape[1:], patch_size):
        p = int(p)
        if s >= p:
            a = (s - p) // 2
            src.append(slice(a, a + p))
            dst.append(slice(0, p))
        else:
            a = (p - s) // 2
            src.append(slice(0, s))
            dst.append(slice(a, a + s))
    out[tuple(dst)] = data[tuple(src)]
    return out


class _PatchReader:
    """onnxruntime CalibrationDataReader over a list of patches."""

    def __init__(self, patches: List[np.ndarray]):
        self.patches = patches
        self._it: Optional[Iterator] = None
        self.rewind()

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter({INPUT_NAME: p} for p in self.patches)


def quantize_int8(fp32_path: str, int8_path: str, method: str = "static",
                  patches: Optional[List[np.ndarray]] = None) -> None:
    """onnxruntime quantization of ``fp32_path`` into ``int8_path`` (atomic).

    Only ``INT8_OP_TYPES`` are quantized. static (default): QDQ format, int8 weights per output channel,
    int8 activations with MinMax ranges calibrated on ``patches``; onnxruntime fuses QDQ pairs into
    QLinearConv & co. dynamic: uint8 weights (ConvInteger/MatMulInteger), activation ranges computed per
    call, no calibration data needed (measured barely faster than fp32 on CPU for the U-Net)."""
    import tempfile

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="tskd_quant_") as td:
        pre = os.path.join(td, "pre.onnx")
        try:  # onnxruntime's recommended pre-processing (shape inference + graph optimisation)
            quant_pre_process(fp32_path, pre, skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001 - fall back to the plain model; quantization still works
            shutil.copyfile(fp32_path, pre)
        with atomic_path(int8_path) as tmp:
            if method == "static":
                if not patches:
                    raise ExportError(f"static int8 quantization of {fp32_path} needs calibration patches")

                class Reader(_PatchReader, CalibrationDataReader):
                    pass

                with _quiet_root_logger():  # per-channel notices for every norm weight otherwise
                    quantize_static(pre, str(tmp), Reader(patches), quant_format=QuantFormat.QDQ, per_channel=True,
                                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                    op_types_to_quantize=INT8_OP_TYPES)
            elif method == "dynamic":
                # ConvInteger (what dynamic quantization makes of Conv) runs on CPU with uint8 weights only
                with _quiet_root_logger():
                    quantize_dynamic(pre, str(tmp), weight_type=QuantType.QUInt8, per_channel=False,
                                     op_types_to_quantize=INT8_OP_TYPES)
            else:
                raise ExportError(f"unknown int8 method {method!r}: use static or dynamic")


@contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ----------------------------------------------------------------------------- the whole export
def export_model_folder(model_folder: str, output_folder: str, fold: Union[int, str] = 0,
                        checkpoint_name: str = "checkpoint_final.pth", int8: bool = False,
                        int8_method: str = "static", calibration_cases: int = 8,
                        preprocessed_dataset_folder: Optional[str] = None, opset: int = DEFAULT_OPSET,
                        verbose: bool = True) -> dict:
    """Export fold ``fold`` of the trained ``model_folder`` into ``output_folder``; returns the metadata written."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    check_output_folder(output_folder)
    predictor = load_trained_predictor(model_folder, fold, checkpoint_name)
    pm, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    cin = determine_num_input_channels(pm, cm, dj)
    cout = predictor.label_manager.num_segmentation_heads
    patch = [int(p) for p in cm.patch_size]
    if cm.previous_stage_name is not None:
        raise ExportError(f"{model_folder} is a cascade stage (needs {cm.previous_stage_name}'s segmentations): "
                          f"not supported by tskd_export. Fix: export a 2d or 3d_fullres model")
    with atomic_folder(output_folder) as tmp:  # the previous export stays until this one is complete
        return _export_into(predictor, model_folder, str(tmp), fold, checkpoint_name, int8, int8_method,
                            calibration_cases, preprocessed_dataset_folder, opset, verbose, cin, cout, patch)


def _export_into(predictor, model_folder: str, output_folder: str, fold, checkpoint_name: str, int8: bool,
                 int8_method: str, calibration_cases: int, preprocessed_dataset_folder: Optional[str], opset: int,
                 verbose: bool, cin: int, cout: int, patch: List[int]) -> dict:
    """Every file of the export into ``output_folder`` (the temporary folder of ``export_model_folder``)."""
    network, pm, cm = predictor.network, predictor.plans_manager, predictor.configuration_manager
    fp32_path = os.path.join(output_folder, MODEL_FP32)
    export_network(network, cin, patch, fp32_path, opset)
    try:
        diff = compare_with_torch(network, fp32_path, cin, patch)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime: NotImplemented, InvalidGraph, Fail, ...
        raise ExportError(f"onnxruntime cannot run the model exported at --opset {opset} ({first_line(e)}). Fix: "
                          f"{_opset_fix(opset)}") from None
    if diff > FP32_TOLERANCE:
        raise ExportError(f"ONNX export of {predictor.trainer_name} differs from PyTorch by {diff:.2e} "
                          f"(> {FP32_TOLERANCE}); nothing written. Fix: report this network as not exportable")
    if verbose:
        print(f"{MODEL_FP32}: {predictor.trainer_name}, input (batch, {cin}, {', '.join(map(str, patch))}), "
              f"{cout} output channels, {num_parameters(network)} parameters, max |ONNX - PyTorch| = {diff:.1e}")
    meta = {
        "format": 1,
        "trainer_name": predictor.trainer_name,
        "configuration": _configuration_from_folder(model_folder),
        "plans_name": pm.plans_name,
        "fold": fold,
        "checkpoint": os.path.abspath(os.path.join(model_folder, f"fold_{fold}", checkpoint_name)),
        "inference_allowed_mirroring_axes": (list(predictor.allowed_mirroring_axes)
                                             if predictor.allowed_mirroring_axes is not None else None),
        "num_input_channels": cin,
        "num_output_channels": cout,
        "patch_size": patch,
        "opset": opset,
        "parameters": num_parameters(network),
        "models": {"fp32": MODEL_FP32},
        "max_abs_diff_fp32_vs_torch": diff,
        "torch": torch.__version__,
    }
    if int8:
        patches = None
        if int8_method == "static":
            base = preprocessed_dataset_folder or _preprocessed_dataset_folder(model_folder)
            patches = calibration_patches(base, cm.data_identifier, patch, fold, calibration_cases)
        int8_path = os.path.join(output_folder, MODEL_INT8)
        quantize_int8(fp32_path, int8_path, int8_method, patches)
        meta["models"]["int8"] = MODEL_INT8
        meta["int8"] = {"method": int8_method, "calibration_cases": len(patches) if patches else 0}
        if verbose:
            print(f"{MODEL_INT8}: int8 ({int8_method}"
                  f"{f', calibrated on {len(patches)} training patches' if patches else ''})")
    import onnxruntime

    meta["onnxruntime"] = onnxruntime.__version__
    shutil.copyfile(os.path.join(model_folder, "plans.json"), os.path.join(output_folder, "plans.json"))
    shutil.copyfile(os.path.join(model_folder, "dataset.json"), os.path.join(output_folder, "dataset.json"))
    atomic_write_text(os.path.join(output_folder, META_FILE), json.dumps(meta, indent=2) + "\n")
    return meta


def _configuration_from_folder(model_folder: str) -> Optional[str]:
    parts = os.path.basename(os.path.normpath(model_folder)).split("__")
    return parts[2] if len(parts) == 3 else None


def _preprocessed_dataset_folder(model_folder: str) -> str:
    """$nnUNet_preprocessed/DatasetXXX for $nnUNet_results/DatasetXXX/<trainer>__<plans>__<configuration>."""
    from nnunetv2.paths import nnUNet_preprocessed

    if not nnUNet_preprocessed:
        raise ExportError("nnUNet_preprocessed is not set: int8 calibration reads training cases from it. Fix: "
                          "set it, or use --int8_method dynamic")
    return os.path.join(nnUNet_preprocessed, os.path.basename(os.path.dirname(os.path.abspath(model_folder))))
