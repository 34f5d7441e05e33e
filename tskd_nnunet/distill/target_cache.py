"""Cached teacher targets: the teacher's probabilities for every transfer-set case, computed once.

On CPU a foundation teacher costs seconds per image, so running it on every augmented batch (online
KD) makes distillation 10-50x a plain nnU-Net iteration. Instead the trained teacher (or an ensemble
of trained model folders, probabilities averaged) runs once per case over nnU-Net's preprocessed
data with nnU-Net's own sliding window, Gaussian weighting and mirroring (the predictor's code), and
its softmax (sigmoid for region training) is stored beside the preprocessed data:

    nnUNet_preprocessed/DatasetXXX/tskd_targets/<plans>_<configuration>/fold_<k>/<key>/<case>.npy  (fp16, C x spatial)
                                                                              .../<key>/manifest.json

``<key>`` hashes every teacher's checkpoint (sha256) and trainer, the configuration's plans entry, the
fold and the TTA setting, so another teacher, plans or fold can never read this cache: it gets a
folder of its own (built when missing). A target older than its case's preprocessed files is computed again
(the case was written anew under its old name). Files are written to a temporary name and renamed, so an
interrupted build resumes where it stopped and no reader sees half a file.

In training (``DistillTrainer`` in cached mode) :class:`CachedTargetDataset` appends the target and a
validity channel (ones) to each case's image channels; :func:`wrap_transforms` splits them off into
batchgeneratorsv2's ``regression_target`` before nnU-Net's augmentation (which moves it with the image
through crop, spatial transform and mirroring, and leaves it out of every intensity transform) and
joins them back afterwards, so the batch carries image + target + validity. Padding and rotated-in
corners have validity 0 and get no KD loss.

Non-finite values never reach a student (documentation/reliability.md, "Round two"): a teacher output (or a
probability file of ``--from_predictions``) holding NaN/Inf stops the build before its case is written, naming the
teacher checkpoint (or file) and the case; when training starts, :func:`verify_targets` reads every cached target
once and refuses an unreadable (truncated, empty) one or one holding NaN/Inf, naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from tskd_nnunet.atomic_io import atomic_path, atomic_write_text
from tskd_nnunet.data.preprocessed_files import TARGETS_DIR
from tskd_nnunet.distill.losses import class_probabilities
# TeacherError also for a cache that is missing, stale or does not fit
from tskd_nnunet.distill.teacher_io import TeacherError, TeacherForCache


def cache_key(teachers: Sequence[TeacherForCache], plans: dict, configuration: str, fold, use_mirroring: bool) -> str:
    """16 hex digits that change with any teacher checkpoint, the configuration's plans, the fold or TTA."""
    ident = {"teachers": sorted([t.trainer_name, t.checkpoint_sha256] for t in teachers),
             "plans_name": plans.get("plans_name"), "configuration": configuration,
             "configuration_plans": plans["configurations"][configuration], "fold": str(fold),
             "transpose_forward": plans.get("transpose_forward"), "mirroring": bool(use_mirroring)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_folder(preprocessed_base: str, plans_name: str, configuration: str, fold, key: str) -> str:
    return os.path.join(preprocessed_base, TARGETS_DIR, f"{plans_name}_{configuration}", f"fold_{fold}", key)


def target_file(folder: str, identifier: str) -> str:
    return os.path.join(folder, f"{identifier}.npy")


def missing_cases(folder: str, identifiers: Iterable[str],
                  case_file: Optional[Callable[[str], str]] = None) -> List[str]:
    """Cases without a target in ``folder``, and, given ``case_file`` (identifier -> a file its preprocessing
    writes), cases whose file is newer than their target: written again after the target was computed (synthetic
    cases re-sampled under the same names, a re-run preprocessing), so the target is stale."""
    out = []
    for i in identifiers:
        target = target_file(folder, i)
        if not os.path.isfile(target) or (case_file is not None and
                                          os.stat(case_file(i)).st_mtime_ns > os.stat(target).st_mtime_ns):
            out.append(i)
    return out


def probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return class_probabilities(logits, multilabel, dim=0)


def probabilities_from_prediction(npz_file: str, spatial_shape: Sequence[int], plans_manager,
                                  configuration_manager) -> np.ndarray:
    """What ``nnUNetv2_predict --save_probabilities`` wrote for a case (original geometry: ``<case>.npz`` and
    ``<case>.pkl``) brought back to nnU-Net's preprocessed geometry: the inverse of nnU-Net's export
    (transpose forward, crop to the preprocessing bounding box, resample to the preprocessed shape)."""
    import pickle
    pkl = npz_file[:-len(".npz")] + ".pkl"
    try:
        with np.load(npz_file) as f:
            probs = f["probabilities"].astype(np.float32)
        with open(pkl, "rb") as f:
            props = pickle.load(f)
    except (OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise TeacherError(f"{npz_file} (+ .pkl) is not a probability file of nnUNetv2_predict "
                               f"--save_probabilities ({type(e).__name__}). Fix: predict again with "
                               f"--save_probabilities, or leave the case out of the folder.") from None
    tf = list(plans_manager.transpose_forward)
    probs = probs.transpose([0] + [i + 1 for i in tf])
    probs = probs[(slice(None),) + tuple(slice(int(lo), int(hi)) for lo, hi in props["bbox_used_for_cropping"])]
    spacing = [props["spacing"][i] for i in tf]
    target = list(configuration_manager.spacing)
    if len(target) < len(spacing):  # 2d configuration of a 3d-shaped case: the first axis keeps its spacing
        target = [spacing[0], *target]
    if tuple(probs.shape[1:]) != tuple(spatial_shape):
        probs = np.asarray(configuration_manager.resampling_fn_probabilities(probs, list(spatial_shape), spacing,
                                                                            target))
    if not np.isfinite(probs).all():
        raise TeacherError(f"{npz_file} holds NaN/Inf probabilities: the teacher's predictions are not usable. Fix: "
                           f"check the teacher (retrain it if its weights diverged), predict again, or leave the case "
                           f"out of the folder.")
    probs = np.clip(probs, 0, None)
    return probs / np.clip(probs.sum(0, keepdims=True), 1e-8, None)


def _teacher_logits(predictor, teacher: "TeacherForCache", data: torch.Tensor, identifier: str) -> torch.Tensor:
    """The teacher's logits of one case by nnU-Net's sliding window; TeacherError naming the teacher checkpoint and
    the case when they hold NaN/Inf (nnU-Net's predictor itself stops on Inf with a RuntimeError, lets NaN pass)."""
    try:
        logits = predictor.predict_sliding_window_return_logits(data).cpu()
        finite = bool(torch.isfinite(logits).all())
    except RuntimeError as e:
        if "Encountered inf" not in str(e):
            raise
        finite = False
    if not finite:
        raise TeacherError(f"Teacher {teacher.checkpoint} gives NaN/Inf outputs on case {identifier}: its targets "
                           f"would train the student to NaN; nothing was cached for this case. Fix: retrain the "
                           f"teacher, or distil from another checkpoint of it (TSKD_TEACHER_CHECKPOINT).")
    return logits


def build_cache(folder: str, teachers: Sequence[TeacherForCache], load_case, identifiers: Sequence[str],
                device: torch.device, use_mirroring: bool = True, multilabel: bool = False,
                manifest_extra: Optional[dict] = None, log=print, predictions: Optional[str] = None,
                case_file: Optional[Callable[[str], str]] = None) -> int:
    """Write ``<case>.npy`` (fp16 probabilities, averaged over ``teachers``) for every identifier that has none
    (or a stale one: ``missing_cases``).
    ``load_case(identifier)`` returns nnU-Net's preprocessed (data, ...). With ``predictions`` (a folder that
    ``nnUNetv2_predict -tr <the one teacher> --save_probabilities`` wrote), cases found there are taken from it
    instead of running the teacher again. Returns the number of cases written."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from tqdm import tqdm

    os.makedirs(folder, exist_ok=True)
    manifest = {"teachers": [{"trainer": t.trainer_name, "checkpoint": t.checkpoint, "sha256": t.checkpoint_sha256}
                             for t in teachers], "mirroring": bool(use_mirroring), "dtype": "float16",
                "what": "softmax (sigmoid for regions) at nnU-Net's preprocessed resolution, averaged over teachers"}
    manifest.update(manifest_extra or {})
    atomic_write_text(os.path.join(folder, "manifest.json"), json.dumps(manifest, indent=1))
    todo = missing_cases(folder, identifiers, case_file)
    n_before = len(todo)
    if predictions is not None:
        if len(teachers) != 1:
            raise TeacherError(f"{predictions}: predictions can stand for one teacher, not an ensemble of "
                                   f"{len(teachers)}. Fix: name a single teacher.")
        t = teachers[0]
        found = [i for i in todo if os.path.isfile(os.path.join(predictions, f"{i}.npz"))]
        for identifier in found:
            shape = np.asarray(load_case(identifier)[0]).shape[1:]
            probs = probabilities_from_prediction(os.path.join(predictions, f"{identifier}.npz"), shape,
                                                  t.plans_manager, t.configuration_manager)
            with atomic_path(target_file(folder, identifier)) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, probs.astype(np.float16))
        log(f"Teacher targets: {len(found)} case(s) taken from the predictions in {predictions}")
        taken = set(found)
        todo = [i for i in todo if i not in taken]
    if not todo:
        return n_before
    predictors = []
    for t in teachers:
        p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                            perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                            allow_tqdm=False)
        p.manual_initialization(t.network, t.plans_manager, t.configuration_manager, None, t.dataset_json,
                                t.trainer_name, t.mirror_axes)
        predictors.append(p)
    log(f"Teacher targets: {len(todo)} of {len(identifiers)} cases to compute into {folder}")
    for identifier in tqdm(todo, desc="teacher targets", unit="case", mininterval=5):
        data = torch.from_numpy(np.asarray(load_case(identifier)[0], dtype=np.float32))
        with torch.no_grad():
            probs = sum(probabilities(_teacher_logits(p, t, data, identifier), multilabel)
                        for p, t in zip(predictors, teachers)) / len(predictors)
        with atomic_path(target_file(folder, identifier)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, probs.numpy().astype(np.float16))
    return n_before


def _load_target(path: str) -> np.ndarray:
    """``np.load`` of a cached target, memory-mapped; one-line TeacherError naming the file when it cannot be read
    (a 0-byte file raises EOFError, a truncated one ValueError, ...)."""
    try:
        return np.load(path, mmap_mode="r")
    except Exception as e:  # noqa: BLE001 - np.load raises EOFError, ValueError, OSError, UnpicklingError, ...
        why = " ".join(str(e).split())[:120]
        raise TeacherError(f"Cached teacher target {path} is unreadable ({type(e).__name__}{': ' + why if why else ''}"
                           f"; truncated or empty?). Fix: delete it; the next training run (or tskd_cache_targets) "
                           f"recomputes it.") from None


def verify_targets(folder: str, identifiers: Iterable[str]) -> None:
    """Read every case's cached target once: TeacherError naming the first file that is unreadable or holds NaN/Inf
    (e.g. written by a teacher whose weights had diverged, before this check existed). A training start pays one
    read of the cache for it."""
    for identifier in identifiers:
        path = target_file(folder, identifier)
        if not np.isfinite(_load_target(path)).all():
            raise TeacherError(f"Cached teacher target {path} holds NaN/Inf: a student would train on it to a NaN "
                               f"checkpoint. Fix: delete {folder}; the next training run (or tskd_cache_targets) "
                               f"rebuilds it, from a teacher whose outputs are checked.")


def read_target(folder: str, identifier: str, spatial_shape: Sequence[int]) -> np.ndarray:
    """The cached probabilities of one case, memory-mapped; checked against the case's shape."""
    path = target_file(folder, identifier)
    target = _load_target(path)
    if tuple(target.shape[1:]) != tuple(spatial_shape):
        raise TeacherError(f"Cached teacher target {path} has shape {tuple(target.shape[1:])}, the preprocessed "
                           f"case {tuple(spatial_shape)}. Fix: delete {os.path.dirname(path)}; it was built for other "
                           f"data.")
    return target


class CachedTargetDataset:
    """Wraps an nnU-Net dataset: ``load_case`` returns image channels + target channels + a validity channel."""

    def __init__(self, dataset, folder: str):
        self._dataset = dataset
        self.folder = folder
        self.identifiers = dataset.identifiers

    def __getattr__(self, name):  # everything else (source_folder, unlabeled, ...) as the wrapped dataset
        if name.startswith("__") or name == "_dataset":  # unpickling in a DA worker: no _dataset yet
            raise AttributeError(name)
        return getattr(self._dataset, name)

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self._dataset.load_case(identifier)
        target = read_target(self.folder, identifier, data.shape[1:])
        ones = np.ones((1, *data.shape[1:]), dtype=np.float32)
        return np.concatenate([np.asarray(data, dtype=np.float32), np.asarray(target, dtype=np.float32), ones]), \
            seg, seg_prev, properties


class SplitTarget:
    """First transform: image channels beyond ``num_image_channels`` become the regression target."""

    def __init__(self, num_image_channels: int):
        self.n = num_image_channels

    def __call__(self, **data_dict) -> dict:
        image = data_dict["image"]
        data_dict["image"], data_dict["regression_target"] = image[:self.n], image[self.n:]
        return data_dict


class JoinTarget:
    """Last transform: the (augmented) regression target goes back behind the image channels."""

    def __call__(self, **data_dict) -> dict:
        target = data_dict.pop("regression_target")
        data_dict["image"] = torch.cat([data_dict["image"], target.to(data_dict["image"].dtype)])
        return data_dict


def wrap_transforms(transforms, num_image_channels: int):
    """nnU-Net's training pipeline with the target riding along (see the module docstring)."""
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    return ComposeTransforms([SplitTarget(num_image_channels), transforms, JoinTarget()])


def split_batch(data: torch.Tensor, num_image_channels: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, target probabilities, validity) of a batch built from CachedTargetDataset."""
    return data[:, :num_image_channels], data[:, num_image_channels:-1], data[:, -1:]


def disk_bytes(folder: str) -> Dict[str, float]:
    sizes = [os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".npy")]
    return {"cases": len(sizes), "bytes_per_case": float(np.mean(sizes)) if sizes else 0.0}
