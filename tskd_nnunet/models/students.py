"""Student networks for distillation: nnU-Net's planned U-Net, optionally slimmed.

A student preset only changes ``features_per_stage`` of the architecture nnU-Net planned for the
configuration (PlainConvUNet, ResEnc, ...); depth, kernels, strides and normalisation stay as
planned, so the student runs in nnU-Net's inference unchanged and is the same family as a plain
nnU-Net baseline.
"""
from __future__ import annotations

import copy
from typing import Dict

from torch import nn

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager


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
