"""Masked image modelling for the nnU-Net CNN (SparK-style sparse masking), and the shared code that
builds the nnU-Net network exactly as ``nnUNetv2_train`` will, so the output loads with
``nnUNetv2_train ... -pretrained_weights``.

Masking that does not leak through convolutions: the mask is drawn on the grid of the coarsest
encoder stride (one masked cell = one bottleneck pixel = ``stride`` x ``stride`` input pixels), the
masked input is set to 0 (the z-score mean), and after *every* encoder stage the masked positions are
set to 0 again, so the encoder computes features of visible regions only (a dense stand-in for
sparse convolution, SparK's idea). What remains: inside a stage, a 3x3 conv at a visible pixel next
to a masked cell reads zeros (not content) from it, and InstanceNorm statistics include the zeroed
positions; neither carries information about the masked content. Before the decoder, masked
positions of each skip are filled with a learned per-stage mask token ("densify"); the nnU-Net
decoder then reconstructs at full resolution through its last ``seg_layers`` conv, built with one
output per input channel (nnU-Net skips ``.seg_layers.`` when loading, so that head never reaches
fine-tuning). The loss is the per-patch normalised MSE on masked cells only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tskd_nnunet.pretrain.mae import masked_patch_loss, patchify


@dataclass
class PlannedNetwork:
    network: nn.Module
    dataset_name: str
    configuration: str
    plans: str
    trainer: str
    num_input_channels: int
    patch_size: Tuple[int, ...]
    total_stride: Tuple[int, ...]


def build_planned_network(dataset: str, configuration: str, plans: str = "nnUNetPlans",
                          trainer: str = "nnUNetTrainer", num_output_channels: Optional[int] = None) -> PlannedNetwork:
    """The network ``nnUNetv2_train DATASET CONFIG FOLD -tr trainer -p plans`` builds (its own
    ``build_network_architecture``), without deep supervision; ``num_output_channels`` defaults to
    the number of input channels (a reconstruction head in place of the segmentation layer)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from tskd_nnunet.pretrain.corpus import PretrainError, resolve_dataset_name
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise PretrainError("nnUNet_preprocessed is not set. Fix: export nnUNet_preprocessed=/path/to/it")
    name = resolve_dataset_name(dataset, root)
    base = os.path.join(root, name)
    plans_file = os.path.join(base, plans + ".json")
    if not os.path.isfile(plans_file):
        raise PretrainError(f"{plans_file} not found. Fix: run nnUNetv2_plan_and_preprocess -d {dataset} or pass -p")
    pm = PlansManager(plans_file)
    if configuration not in pm.available_configurations:
        raise PretrainError(f"configuration {configuration!r} not in {plans_file}. Fix: use one of "
                              f"{', '.join(pm.available_configurations)}")
    cm = pm.get_configuration(configuration)
    if len(cm.patch_size) != 2:
        raise PretrainError(f"{name} {configuration} is {len(cm.patch_size)}D; CNN pretraining supports 2D "
                              f"configurations. Fix: pretrain and fine-tune with -c 2d")
    dataset_json = load_json(os.path.join(base, "dataset.json"))
    trainer_class = recursive_find_trainer_class_by_name(trainer)
    if trainer_class is None:
        raise PretrainError(f"trainer {trainer} not found by nnU-Net. Fix: pass the -tr you will fine-tune with")
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = n_in if num_output_channels is None else num_output_channels
    network = trainer_class.build_network_architecture(pm, cm, n_in, n_out, False)
    strides = np.prod(np.array(cm.pool_op_kernel_sizes), axis=0)
    return PlannedNetwork(network, str(name), configuration, plans, trainer, n_in, tuple(int(p) for p in cm.patch_size),
                          tuple(int(s) for s in strides))


def encoder_stage_outputs(encoder: nn.Module, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """The encoder's skips (as its forward returns them); with ``keep`` (B,1,h,w at the coarsest grid,
    1 = visible) masked positions are zeroed after the stem and every stage (sparse-conv stand-in)."""

    def remask(t: torch.Tensor) -> torch.Tensor:
        if keep is None:
            return t
        return t * F.interpolate(keep, size=t.shape[2:], mode="nearest").to(t.dtype)

    if getattr(encoder, "stem", None) is not None:
        x = remask(encoder.stem(x))
    skips = []
    for stage in encoder.stages:
        x = remask(stage(x))
        skips.append(x)
    return skips


def export_network(network: nn.Module, planned: PlannedNetwork, meta: Dict[str, Any]) -> Dict[str, Any]:
    """nnU-Net's ``-pretrained_weights`` format: a dict with 'network_weights' of the whole network."""
    sd = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    return {"network_weights": sd,
            "tskd": dict(meta, dataset=planned.dataset_name, configuration=planned.configuration, plans=planned.plans,
                         trainer=planned.trainer, num_input_channels=planned.num_input_channels)}


class CNNMIM(nn.Module):
    """Masked image modelling objective for a planned nnU-Net network."""

    def __init__(self, planned: PlannedNetwork, mask_ratio: float = 0.6, norm_pix: bool = True) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"--mask-ratio {mask_ratio} must be in (0, 1). Fix: e.g. --mask-ratio 0.6")
        self.planned, self.network = planned, planned.network
        self.mask_ratio, self.norm_pix = mask_ratio, norm_pix
        self.cell = planned.total_stride
        channels = self.network.encoder.output_channels
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in channels])
        for t in self.mask_tokens:
            nn.init.normal_(t, std=0.02)

    def set_progress(self, fraction: float) -> None:
        pass

    def random_keep(self, b: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(B, 1, h / cell, w / cell) with exactly round(ratio * cells) masked cells (0) per sample."""
        gh, gw = h // self.cell[0], w // self.cell[1]
        n = gh * gw
        n_mask = min(n - 1, max(1, int(round(n * self.mask_ratio))))
        order = torch.rand(b, n, device=device).argsort(dim=1)
        keep = torch.ones(b, n, device=device)
        keep.scatter_(1, order[:, :n_mask], 0.0)
        return keep.view(b, 1, gh, gw)

    def reconstruct(self, imgs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        full_keep = F.interpolate(keep, size=imgs.shape[2:], mode="nearest")
        skips = encoder_stage_outputs(self.network.encoder, imgs * full_keep, keep)
        dense = []
        for s, token in zip(skips, self.mask_tokens):
            k = F.interpolate(keep, size=s.shape[2:], mode="nearest").to(s.dtype)
            dense.append(s * k + token.to(s.dtype) * (1 - k))
        out = self.network.decoder(dense)
        return out[0] if isinstance(out, (list, tuple)) else out

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        h, w = imgs.shape[2:]
        if h % self.cell[0] or w % self.cell[1]:
            raise ValueError(f"input {h}x{w} is not a multiple of the encoder stride {self.cell}")
        if self.training:
            imgs = torch.where(torch.rand(imgs.shape[0], 1, 1, 1, device=imgs.device) < 0.5, imgs.flip(-1), imgs)
        keep = self.random_keep(imgs.shape[0], h, w, imgs.device)
        pred = self.reconstruct(imgs, keep)
        # one "patch" per mask cell: per-cell normalised target, loss on masked cells only
        p = self.cell
        masked = 1 - keep.flatten(1)
        return masked_patch_loss(patchify(pred, p), patchify(imgs, p), masked, self.norm_pix)

    def export(self, meta: Dict[str, Any]) -> Dict[str, Any]:
        return export_network(self.network, self.planned, dict(meta, objective="cnn_mim", mask_ratio=self.mask_ratio))
