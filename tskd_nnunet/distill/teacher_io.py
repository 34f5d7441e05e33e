"""Find, validate and load a trained teacher for distillation.

A teacher is any trained nnU-Net model folder
``$nnUNet_results/DatasetXXX/<TeacherTrainer>__<plans>__<configuration>/fold_<k>/<checkpoint>``
with ``plans.json`` and ``dataset.json`` beside the fold folders. It is rebuilt exactly as
``nnUNetv2_predict`` rebuilds a model (nnunetv2/inference/predict_from_raw_data.py): the trainer
class named in the checkpoint builds the network from the folder's own plans with deep
supervision off, then the checkpoint's ``network_weights`` are loaded. So a plain nnU-Net teacher
and the ViT LoRA teacher (whose spec lives in its plans.json) load the same way.

A LoRA teacher's adapters are merged into the base weights when it is loaded (it is frozen, so the
result is the same network, and each forward pass does less work).

A checkpoint whose weights hold NaN/Inf (a diverged training) is refused, naming the file: every target it
gave would be NaN.

Only ``checkpoint_final.pth`` is used by default: silently falling back to ``checkpoint_latest``
would distil a half-trained teacher. ``TSKD_TEACHER_CHECKPOINT`` picks another file on purpose.
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import torch
from torch import nn


class TeacherError(RuntimeError):
    """The teacher, or its cached targets (target_cache.py), is missing or does not match the student.
    One line: what, where, and the fix."""


@dataclass(frozen=True)
class TeacherLocation:
    model_dir: str          # <results>/DatasetXXX/<trainer>__<plans>__<configuration>
    checkpoint: str         # model_dir/fold_<k>/<checkpoint name>
    trainer_name: str
    plans_name: str
    configuration: str
    fold: Union[int, str]

    def train_command(self, dataset_name: str) -> str:
        dataset_id = dataset_name.split("_")[0].replace("Dataset", "").lstrip("0") or "0"
        plans = "" if self.plans_name == "nnUNetPlans" else f" -p {self.plans_name}"
        return f"nnUNetv2_train {dataset_id} {self.configuration} {self.fold} -tr {self.trainer_name}{plans}"


@dataclass
class TeacherForCache:
    """One trained teacher as the cache needs it: a network and how nnU-Net's predictor must run it."""
    network: nn.Module
    trainer_name: str
    checkpoint: str
    checkpoint_sha256: str
    mirror_axes: Optional[Tuple[int, ...]]
    plans_manager: object
    configuration_manager: object
    dataset_json: dict


def locate_teacher(results_root: str, dataset_name: str, trainer_name: str, plans_name: str, configuration: str,
                   fold: Union[int, str], checkpoint_name: str = "checkpoint_final.pth") -> TeacherLocation:
    """Path of the teacher checkpoint by nnU-Net's folder convention; raises TeacherError if absent."""
    model_dir = os.path.join(results_root, dataset_name, f"{trainer_name}__{plans_name}__{configuration}")
    loc = TeacherLocation(model_dir, os.path.join(model_dir, f"fold_{fold}", checkpoint_name), trainer_name,
                          plans_name, configuration, fold)
    fix = (f"train it first: {loc.train_command(dataset_name)} "
           f"(or set TSKD_TEACHER_TRAINER / TSKD_TEACHER_PLANS to the teacher you trained)")
    if not os.path.isdir(model_dir):
        raise TeacherError(f"Teacher not found: {model_dir} does not exist; {fix}")
    for name in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise TeacherError(f"Teacher folder {model_dir} has no {name} (incomplete training?); {fix}")
    if not os.path.isfile(loc.checkpoint):
        fold_dir = os.path.dirname(loc.checkpoint)
        others = sorted(f for f in os.listdir(fold_dir) if f.endswith(".pth")) if os.path.isdir(fold_dir) else []
        if others:
            raise TeacherError(
                f"Teacher checkpoint {loc.checkpoint} is missing (found {', '.join(others)}: training not finished?); "
                f"finish it with `{loc.train_command(dataset_name)} --c` or export "
                f"TSKD_TEACHER_CHECKPOINT={others[0]} to use that file")
        raise TeacherError(f"Teacher checkpoint {loc.checkpoint} is missing (no fold_{fold} of this teacher); {fix}")
    return loc


def _load_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise TeacherError(f"Cannot read {path}: {e}; retrain the teacher or restore the file") from None


def _norm(value: Any) -> Any:
    """JSON-comparable form (tuples → lists, numbers as floats) so plans compare by value."""
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _norm(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return round(float(value), 6)
    return value


# what must agree for the teacher to see the same input as the student; the architecture entry is
# deliberately not compared (the ViT teacher replaces it)
CONFIGURATION_KEYS = ("spacing", "patch_size", "normalization_schemes", "use_mask_for_norm")
PLANS_KEYS = ("transpose_forward", "transpose_backward")


def check_teacher_matches(loc: TeacherLocation, student_plans: dict, student_configuration: str,
                          student_dataset_json: dict, student_fold: Union[int, str],
                          checkpoint: Optional[dict] = None) -> None:
    """Raise TeacherError when the teacher was trained on other labels, channels, plans or fold."""
    t_dataset = _load_json(os.path.join(loc.model_dir, "dataset.json"))
    t_plans = _load_json(os.path.join(loc.model_dir, "plans.json"))
    ds_file = os.path.join(loc.model_dir, "dataset.json")
    for key, what in (("labels", "labels"), ("channel_names", "channels")):
        mine, theirs = _norm(student_dataset_json.get(key)), _norm(t_dataset.get(key))
        if mine != theirs:
            raise TeacherError(f"Teacher was trained on other {what}: {ds_file} has {key}={t_dataset.get(key)} but the "
                               f"student's dataset.json has {student_dataset_json.get(key)}; retrain the teacher on "
                               f"this dataset")

    plans_file = os.path.join(loc.model_dir, "plans.json")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    if t_plans.get("dataset_name") != student_plans.get("dataset_name"):
        raise TeacherError(f"Teacher plans {plans_file} are for {t_plans.get('dataset_name')}, the student trains on "
                           f"{student_plans.get('dataset_name')}; train a teacher on this dataset")
    try:
        t_conf = PlansManager(t_plans).get_configuration(student_configuration)
    except Exception:
        raise TeacherError(f"Teacher plans {plans_file} have no configuration {student_configuration!r}; train the "
                           f"teacher with configuration {student_configuration}") from None
    s_conf = PlansManager(student_plans).get_configuration(student_configuration)
    keys = list(CONFIGURATION_KEYS)
    if t_plans.get("plans_name") == student_plans.get("plans_name"):
        keys.append("data_identifier")  # same plans name ⇒ same preprocessed folder
    for key in keys:
        mine, theirs = getattr(s_conf, key), getattr(t_conf, key)
        if _norm(mine) != _norm(theirs):
            raise TeacherError(f"Teacher was trained on other plans: {plans_file} has {student_configuration}.{key}="
                               f"{theirs}, the student's plans have {mine}; retrain the teacher with the student's "
                               f"plans (-p {student_plans.get('plans_name')})")
    for key in PLANS_KEYS:
        if _norm(t_plans.get(key)) != _norm(student_plans.get(key)):
            raise TeacherError(f"Teacher was trained on other plans: {plans_file} has {key}={t_plans.get(key)}, the "
                               f"student's plans have {student_plans.get(key)}; retrain the teacher with the student's "
                               f"plans")

    ckpt = checkpoint if checkpoint is not None else read_checkpoint(loc.checkpoint)
    init_args = ckpt.get("init_args") or {}
    if str(init_args.get("fold")) != str(student_fold):
        raise TeacherError(f"Teacher checkpoint {loc.checkpoint} was trained on fold {init_args.get('fold')}, the "
                           f"student trains fold {student_fold}; distil each fold from its own teacher "
                           f"(nnUNetv2_train ... {student_fold} -tr {loc.trainer_name})")
    if init_args.get("configuration") not in (None, student_configuration):
        raise TeacherError(f"Teacher checkpoint {loc.checkpoint} was trained with configuration "
                           f"{init_args.get('configuration')}, the student uses {student_configuration}")


def read_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location=torch.device("cpu"), weights_only=False)
    except Exception as e:  # truncated file, not a torch file, ...
        raise TeacherError(f"Cannot read teacher checkpoint {path} ({type(e).__name__}); retrain the teacher") from None
    for key in ("network_weights", "trainer_name", "init_args"):
        if key not in ckpt:
            raise TeacherError(f"Teacher checkpoint {path} has no {key!r}: not an nnU-Net checkpoint")
    return ckpt


def build_teacher_network(loc: TeacherLocation, checkpoint: dict) -> nn.Module:
    """Rebuild the network as nnUNetv2_predict does, load weights, freeze (on CPU)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(_load_json(os.path.join(loc.model_dir, "plans.json")))
    dataset_json = _load_json(os.path.join(loc.model_dir, "dataset.json"))
    configuration_manager = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
    try:
        trainer_class = recursive_find_trainer_class_by_name(checkpoint["trainer_name"])
    except RuntimeError:
        raise TeacherError(f"Teacher checkpoint {loc.checkpoint} was written by trainer "
                           f"{checkpoint['trainer_name']!r}, which nnU-Net cannot find; install the package that "
                           f"defines it") from None
    bad = [k for k, v in checkpoint["network_weights"].items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # every target of such a teacher is NaN; a student distilled from it trains to a NaN checkpoint
        raise TeacherError(f"Teacher checkpoint {loc.checkpoint} holds NaN/Inf weights ({len(bad)} tensor(s), e.g. "
                           f"{bad[0]}): its training diverged. Fix: retrain the teacher, or distil from a finite "
                           f"checkpoint of it (export TSKD_TEACHER_CHECKPOINT=checkpoint_best.pth)")
    in_ch = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    out_ch = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    build = trainer_class.build_network_architecture
    if "plans_manager" in inspect.signature(build).parameters:
        network = build(plans_manager, configuration_manager, in_ch, out_ch, enable_deep_supervision=False)
    else:  # nnU-Net's older signature
        network = build(configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
                        configuration_manager.network_arch_init_kwargs_req_import, in_ch, out_ch,
                        enable_deep_supervision=False)
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise TeacherError(f"Teacher weights in {loc.checkpoint} do not fit the network its plans describe "
                           f"({first}); retrain the teacher") from None
    return freeze_teacher(network)


def freeze_teacher(network: nn.Module) -> nn.Module:
    """Eval mode, no gradients, LoRA adapters merged into their base weights (models/lora.py: same outputs)."""
    from tskd_nnunet.models.lora import lora_layers, merge_lora_

    network.eval()
    if lora_layers(network):
        merge_lora_(network)
    network.requires_grad_(False)
    return network


def load_teacher(results_root: str, student_plans: dict, configuration: str, dataset_json: dict,
                 fold: Union[int, str], trainer_name: str, plans_name: Optional[str] = None,
                 checkpoint_name: str = "checkpoint_final.pth") -> tuple:
    """Locate, validate and rebuild the teacher. Returns (network, TeacherLocation)."""
    loc = locate_teacher(results_root, student_plans["dataset_name"], trainer_name,
                         plans_name or student_plans["plans_name"], configuration, fold, checkpoint_name)
    checkpoint = read_checkpoint(loc.checkpoint)
    check_teacher_matches(loc, student_plans, configuration, dataset_json, fold, checkpoint)
    return build_teacher_network(loc, checkpoint), loc



def load_teacher_for_cache(results_root: str, student_plans: dict, configuration: str, dataset_json: dict,
                           fold: Union[int, str], trainer_name: str, plans_name: Optional[str] = None,
                           checkpoint_name: str = "checkpoint_final.pth"):
    """Locate, validate and rebuild a teacher with what nnU-Net's predictor needs to run it over whole cases
    (its own plans, mirroring axes) and the checkpoint's sha256 for the target cache's key."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tskd_nnunet.models.vit_backbones import sha256_of

    loc = locate_teacher(results_root, student_plans["dataset_name"], trainer_name,
                         plans_name or student_plans["plans_name"], configuration, fold, checkpoint_name)
    checkpoint = read_checkpoint(loc.checkpoint)
    check_teacher_matches(loc, student_plans, configuration, dataset_json, fold, checkpoint)
    plans_manager = PlansManager(_load_json(os.path.join(loc.model_dir, "plans.json")))
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return TeacherForCache(network=build_teacher_network(loc, checkpoint), trainer_name=trainer_name,
                           checkpoint=loc.checkpoint, checkpoint_sha256=sha256_of(loc.checkpoint),
                           mirror_axes=tuple(axes) if axes is not None else None, plans_manager=plans_manager,
                           configuration_manager=plans_manager.get_configuration(configuration),
                           dataset_json=_load_json(os.path.join(loc.model_dir, "dataset.json")))
