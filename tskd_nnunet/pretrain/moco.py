"""MoCo v3 (Chen, Xie, He 2021): base encoder + projection MLP + prediction MLP, a momentum copy of
encoder + projector updated only by EMA, and the symmetric InfoNCE loss between two views.

The encoder is any module mapping images to a feature vector: a timm ViT (its pooled class token) or
the nnU-Net CNN encoder with global average pooling (cnn_moco.py). Single process: the negatives are
the other images of the batch.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tskd_nnunet.pretrain.augment import moco_view
from tskd_nnunet.pretrain.vit import vit_export


def build_mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: Linear-BN-ReLU blocks, last Linear followed by a non-affine BN for the projector."""
    layers = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden
        d_out = out_dim if i == num_layers - 1 else hidden
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with the matching row as positive, scaled by 2T as in MoCo v3."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * (2 * temperature)


class MoCoV3(nn.Module):
    """MoCo v3 objective; ``forward(imgs)`` makes two views, updates the momentum branch by EMA and
    returns the symmetric loss."""

    def __init__(self, encoder: nn.Module, feat_dim: int, dim: int = 256, mlp_dim: int = 4096,
                 temperature: float = 0.2, momentum: float = 0.99,
                 view: Callable[[torch.Tensor, float], torch.Tensor] = moco_view) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"--momentum {momentum} must be in [0, 1). Fix: e.g. --momentum 0.99")
        self.base = nn.ModuleDict({"encoder": encoder, "projector": build_mlp(3, feat_dim, mlp_dim, dim)})
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=False)
        self.momentum_branch = copy.deepcopy(self.base)
        for p in self.momentum_branch.parameters():
            p.requires_grad = False
        self.temperature, self.base_momentum, self.momentum, self.view = temperature, momentum, momentum, view

    def set_progress(self, fraction: float) -> None:
        """Cosine schedule of the momentum from its base value to 1 (MoCo v3 / BYOL)."""
        self.momentum = 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * fraction) + 1) / 2

    @torch.no_grad()
    def momentum_update(self) -> None:
        for pb, pm in zip(self.base.parameters(), self.momentum_branch.parameters()):
            pm.mul_(self.momentum).add_(pb.detach(), alpha=1.0 - self.momentum)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.base["projector"](self.base["encoder"](x)))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.view(imgs, 1.0), self.view(imgs, 0.1)
        q1, q2 = self._query(x1), self._query(x2)
        with torch.no_grad():
            self.momentum_update()
            k1 = self.momentum_branch["projector"](self.momentum_branch["encoder"](x1))
            k2 = self.momentum_branch["projector"](self.momentum_branch["encoder"](x2))
        return contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)


class ViTMoCoV3(MoCoV3):
    """MoCo v3 with a timm ViT; optionally a frozen random patch projection (MoCo v3's stability trick)."""

    def __init__(self, encoder: nn.Module, arch: str, img_size: int, in_chans: int,
                 overrides: Optional[Dict[str, Any]] = None, freeze_patch_embed: bool = True, **kwargs: Any) -> None:
        if freeze_patch_embed:
            for p in encoder.patch_embed.parameters():
                p.requires_grad = False
        super().__init__(encoder, encoder.num_features, **kwargs)
        self.arch, self.img_size, self.in_chans = arch, img_size, in_chans
        self.overrides, self.freeze_patch_embed = dict(overrides or {}), freeze_patch_embed

    def export(self, meta: Dict[str, Any]) -> Dict[str, Any]:
        return vit_export(self.base["encoder"], self.arch, self.img_size, self.in_chans, self.overrides,
                          dict(meta, objective="moco_v3", freeze_patch_embed=self.freeze_patch_embed))
