"""nnU-Net's prediction pipeline with an onnxruntime session in place of the PyTorch network.

``OnnxPredictor`` is an ``nnUNetPredictor``: preprocessing, sliding window, Gaussian weighting,
mirroring (test-time augmentation), resampling and export of segmentations are nnU-Net's own code.
Only ``self.network`` differs: ``OnnxNetwork``, a parameter-free ``torch.nn.Module`` whose forward
runs the ONNX session. The predictor touches its network only through ``to(device)``, ``eval()``,
``load_state_dict(params)`` (once per fold; the export holds one fold, so ``list_of_parameters`` is
``[{}]`` and loading is a no-op) and ``__call__`` on a (batch, C, *patch_size) tile.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Optional

import numpy as np
import torch
from torch import nn

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from tskd_nnunet.export.onnx_export import META_FILE, first_line as _first_line, ort_session


class OnnxModelError(RuntimeError):
    """The exported folder or its ONNX file cannot be used; the one-line message names the file and the fix."""


class InputFolderError(ValueError):
    """The images to predict are not what the model takes; the one-line message names the file and the fix."""


def check_input_folder(folder: str, dataset_json: dict, model_folder: str = "") -> None:
    """Refuse, before any worker starts, what nnU-Net's prediction would crash on with a traceback: files without
    the channel suffix (``CASE_0000.png``) and cases with another number of channel files than the model takes."""
    ending = dataset_json["file_ending"]
    channels = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    expected = list(range(len(channels)))
    files = sorted(f for f in os.listdir(folder) if f.endswith(ending) and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise InputFolderError(f"-i {folder} holds no {ending} images. Fix: pass the folder of images named as nnU-Net "
                               f"reads them, CASE_0000{ending} (one file per channel: _0000, _0001, ...)")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    bad = [f for f in files if not pattern.match(f)]
    if bad:
        raise InputFolderError(f"{len(bad)} file(s) in -i {folder} lack nnU-Net's channel suffix _0000 (e.g. {bad[0]})."
                               f" Fix: name them CASE_0000{ending} (one file per channel: _0000, _0001, ...), e.g. "
                               f"{bad[0][:-len(ending)]}_0000{ending}")
    cases = defaultdict(list)
    for f in files:
        m = pattern.match(f)
        cases[m.group(1)].append(int(m.group(2)))
    wrong = sorted(c for c, found in cases.items() if sorted(found) != expected)
    if wrong:
        c = wrong[0]
        found = ", ".join(f"{c}_{i:04d}{ending}" for i in sorted(cases[c]))
        names = ", ".join(f"_{int(i):04d} {n}" for i, n in sorted(channels.items(), key=lambda kv: int(kv[0])))
        raise InputFolderError(f"case {c} in -i {folder} has {len(cases[c])} channel file(s) ({found}), the model "
                               f"takes {len(expected)} ({names}; {os.path.join(model_folder, 'dataset.json')}). Fix: "
                               f"give every case exactly these channel files ({len(wrong)} of {len(cases)} case(s) "
                               f"differ)")


def _reexport_fix(folder: str, meta: Optional[dict]) -> str:
    if meta:
        c = meta.get("configuration") or "CONFIGURATION"
        return (f"re-export it: tskd_export -d DATASET -c {c} -f {meta.get('fold', 0)} -tr {meta.get('trainer_name')} "
                f"-p {meta.get('plans_name', 'nnUNetPlans')} -o {folder}")
    return f"re-export it: tskd_export -d DATASET -c CONFIGURATION -f FOLD -tr TRAINER -o {folder}"


class OnnxNetwork(nn.Module):
    """A torch module that runs an onnxruntime session on CPU (float32 in, float32 logits out)."""

    def __init__(self, path: str, threads: int = 0):
        super().__init__()
        self.path = path
        self.session = ort_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {self.input_name: arr})[0]
        return torch.from_numpy(out).to(x.device)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nnU-Net loads each fold's weights before predicting; the weights live in the ONNX file."""
        if state_dict:
            raise OnnxModelError(f"{self.path}: an ONNX network takes no PyTorch weights")
        return nn.modules.module._IncompatibleKeys([], [])


def read_export_folder(folder: str) -> dict:
    """plans.json, dataset.json and tskd_export.json of an export folder (one-line error when one is missing)."""
    out = {}
    for key, name in (("plans", "plans.json"), ("dataset_json", "dataset.json"), ("meta", META_FILE)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise OnnxModelError(f"{path} not found: {folder} is not a tskd_export folder. Fix: "
                                 f"{_reexport_fix(folder, None)}")
        try:
            with open(path) as f:
                out[key] = json.load(f)
        except ValueError as e:
            raise OnnxModelError(f"cannot read {path} ({_first_line(e)}). Fix: {_reexport_fix(folder, None)}") from None
    return out


class OnnxPredictor(nnUNetPredictor):
    """nnUNetPredictor on an exported folder (tskd_export): ``initialize_from_exported_folder``."""

    def __init__(self, tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True,
                 verbose: bool = False, verbose_preprocessing: bool = False, allow_tqdm: bool = True,
                 threads: int = 0):
        super().__init__(tile_step_size=tile_step_size, use_gaussian=use_gaussian, use_mirroring=use_mirroring,
                         perform_everything_on_device=False, device=torch.device("cpu"), verbose=verbose,
                         verbose_preprocessing=verbose_preprocessing, allow_tqdm=allow_tqdm)
        self.threads = threads
        self.onnx_path: Optional[str] = None

    def initialize_from_exported_folder(self, folder: str, int8: bool = False,
                                        model_file: Optional[str] = None) -> None:
        d = read_export_folder(folder)
        meta, plans, dataset_json = d["meta"], d["plans"], d["dataset_json"]
        fix = _reexport_fix(folder, meta)
        if model_file is None:
            key = "int8" if int8 else "fp32"
            name = meta.get("models", {}).get(key)
            if name is None:
                extra = " with --int8" if int8 else ""
                raise OnnxModelError(f"{folder} holds no {key} model ({META_FILE} lists "
                                     f"{sorted(meta.get('models', {}))}). Fix: {fix}{extra}")
            model_file = os.path.join(folder, name)
        if not os.path.isfile(model_file):
            raise OnnxModelError(f"{model_file} not found. Fix: {fix}")

        pm = PlansManager(plans)
        configuration = meta.get("configuration")
        if configuration not in pm.available_configurations:
            raise OnnxModelError(f"{os.path.join(folder, META_FILE)} names configuration {configuration!r}, "
                                 f"not in {os.path.join(folder, 'plans.json')}. Fix: {fix}")
        cm = pm.get_configuration(configuration)
        lm = pm.get_label_manager(dataset_json)
        try:
            network = OnnxNetwork(model_file, self.threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own (Fail, InvalidProtobuf, ...)
            raise OnnxModelError(f"{model_file} is not a valid ONNX model ({type(e).__name__}: "
                                 f"{_first_line(e)}). Fix: {fix}") from None
        self._check_shapes(network, model_file, folder, determine_num_input_channels(pm, cm, dataset_json),
                           lm.num_segmentation_heads, cm.patch_size, fix)
        axes = meta.get("inference_allowed_mirroring_axes")
        # nnUNetPredictor.manual_initialization would torch.compile the wrapper under nnUNet_compile: set directly
        self.plans_manager, self.configuration_manager = pm, cm
        self.list_of_parameters = [{}]
        self.network = network
        self.dataset_json = dataset_json
        self.trainer_name = meta.get("trainer_name")
        self.allowed_mirroring_axes = tuple(axes) if axes is not None else None
        self.label_manager = lm
        self.onnx_path = model_file

    @staticmethod
    def _check_shapes(network: OnnxNetwork, model_file: str, folder: str, cin: int, cout: int, patch, fix):
        shape = network.session.get_inputs()[0].shape
        ds = os.path.join(folder, "dataset.json")
        if len(shape) != 2 + len(patch):
            raise OnnxModelError(f"{model_file} takes {len(shape)}-d input, the configuration needs "
                                 f"{2 + len(patch)}-d (batch, channels, {len(patch)} spatial). Fix: {fix}")
        if isinstance(shape[1], int) and shape[1] != cin:
            raise OnnxModelError(f"{model_file} expects {shape[1]} input channel(s) but {ds} has {cin}. Fix: {fix}")
        if all(isinstance(s, int) for s in shape[2:]) and list(shape[2:]) != [int(p) for p in patch]:
            raise OnnxModelError(f"{model_file} takes tiles of {list(shape[2:])}, the plans' patch size is "
                                 f"{[int(p) for p in patch]}. Fix: {fix}")
        dummy = np.zeros((1, cin, *[int(p) for p in patch]), dtype=np.float32)
        try:
            out = network.session.run(None, {network.input_name: dummy})[0]
        except Exception as e:  # noqa: BLE001
            raise OnnxModelError(f"{model_file} fails on a ({', '.join(map(str, dummy.shape))}) tile "
                                 f"({_first_line(e)}). Fix: {fix}") from None
        if out.shape[1] != cout:
            raise OnnxModelError(f"{model_file} outputs {out.shape[1]} class channel(s) but {ds} needs {cout}. "
                                 f"Fix: {fix}")
        if list(out.shape[2:]) != [int(p) for p in patch]:
            raise OnnxModelError(f"{model_file} outputs tiles of {list(out.shape[2:])}, expected "
                                 f"{[int(p) for p in patch]} (deep supervision left on?). Fix: {fix}")
