"""Student networks for distillation: nnU-Net's planned U-Net, optionally slimmed, or a ViT.

A student preset only changes ``features_per_stage`` of the architecture nnU-Net planned for the
configuration (PlainConvUNet, ResEnc, ...); depth, kernels, strides and normalisation stay as
planned, so the student runs in nnU-Net's inference unchanged and is the same family as a plain
nnU-Net baseline.

The ViT student (the paper's ViT-Tiny) reuses the teacher's network classes
(tskd_nnunet.models.teacher_net: input adapter, backbone, UNETR decoder) with every weight trained
and no LoRA. Its spec is a :class:`TeacherSpec` with ``lora=None``, recorded in the plans; the
network is always *built* with random weights (so inference needs only plans.json and the
checkpoint, which holds the whole student) and the pretrained backbone weights, if any, are
copied in by :func:`load_vit_student_weights` at the start of training.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from typing import Dict, List, Optional, Sequence

from torch import nn

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from tskd_nnunet.models.teacher_net import TeacherSpec, ViTSegNet, build_teacher_network, resolve_teacher_spec
from tskd_nnunet.models.vit_backbones import RandomTeacherWarning, TeacherCheckpointError, create_backbone


def scaled_arch_kwargs(arch_kwargs: Dict, width: float, min_features: int = 4) -> Dict:
    """Copy of nnU-Net's architecture kwargs with ``features_per_stage`` multiplied by ``width``."""
    if width <= 0:
        raise ValueError(f"student width must be positive, got {width}")
    kwargs = copy.deepcopy(dict(arch_kwargs))
    if width != 1.0:
        if "features_per_stage" not in kwargs:
            raise ValueError("the planned architecture has no features_per_stage to scale; use width 1.0")
        kwargs["features_per_stage"] = [max(min_features, int(round(f * width))) for f in kwargs["features_per_stage"]]
    return kwargs


def build_plans_student(configuration_manager: ConfigurationManager, num_input_channels: int,
                        num_output_channels: int, enable_deep_supervision: bool = True, width: float = 1.0) -> nn.Module:
    """nnU-Net's planned network for the configuration, with features scaled by ``width``."""
    return get_network_from_plans(
        configuration_manager.network_arch_class_name,
        scaled_arch_kwargs(configuration_manager.network_arch_init_kwargs, width),
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels, num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------------------ ViT student
def resolve_vit_student_spec(backbone: str, weights: Optional[str], arch_overrides: Optional[dict],
                             patch_size: Sequence[int], decoder_channels: int) -> TeacherSpec:
    """Spec of a fully trainable ViT student: random init unless ``weights`` (timm-format state dict)."""
    try:
        return resolve_teacher_spec(backbone, weights, True, arch_overrides, None, patch_size, None, decoder_channels)
    except TeacherCheckpointError as e:  # the shared messages name the teacher's variables
        raise TeacherCheckpointError(f"ViT student (TSKD_STUDENT_WEIGHTS / TSKD_STUDENT_ARCH_OVERRIDES): {e}") from None


def build_vit_student(spec: TeacherSpec, num_input_channels: int, num_output_channels: int,
                      ds_scales: Optional[List[List[float]]], enable_deep_supervision: bool) -> ViTSegNet:
    """The student's structure from its spec, randomly initialised (no weights file is read)."""
    if spec.lora is not None:
        raise ValueError("a ViT student is fully trained; its spec must have lora=None")
    structure = dataclasses.replace(spec, checkpoint=None, checkpoint_sha256=None, random_init=True,
                                    arch_overrides={**spec.arch_overrides, "in_chans": spec.in_chans})
    with warnings.catch_warnings():  # random init is the student's normal start, not a smoke-test teacher
        warnings.simplefilter("ignore", RandomTeacherWarning)
        return build_teacher_network(structure, num_input_channels, num_output_channels, ds_scales,
                                     enable_deep_supervision)


def load_vit_student_weights(network: ViTSegNet, spec: TeacherSpec) -> bool:
    """Copy the pretrained backbone weights named by ``spec`` into ``network``; False if it has none."""
    if spec.checkpoint is None:
        return False
    if not os.path.isfile(spec.checkpoint):
        raise TeacherCheckpointError(
            f"ViT student weights {spec.checkpoint} (recorded in plans.json under 'tskd_student') are missing. "
            f"Fix: put the file back, or set TSKD_STUDENT_WEIGHTS to train into a new nnUNet_results folder.")
    pretrained = create_backbone(spec.backbone, spec.checkpoint, spec.img_size, overrides=spec.arch_overrides)
    network.backbone.load_state_dict(pretrained.state_dict())
    return True
