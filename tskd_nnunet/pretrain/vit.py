"""The ViT encoder of MAE / MoCo v3: a timm VisionTransformer created by name, so that its
``state_dict`` is the timm format the teacher (``TSKD_TEACHER_WEIGHTS``) and the ViT-Tiny student
(``TSKD_STUDENT_WEIGHTS``) load."""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

ARCHS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}


def timm_name(arch: str) -> str:
    """Short name (vit_tiny/small/base) or any timm ViT name -> the timm model name."""
    return ARCHS.get(arch, arch)


def parse_overrides(text: Optional[str]) -> Dict[str, Any]:
    """``'{"depth": 2, "embed_dim": 64, "num_heads": 2}'`` -> dict (same JSON as TSKD_TEACHER_ARCH_OVERRIDES)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--arch-overrides {text!r} is not JSON ({e}). Fix: e.g. '{{\"depth\": 2, \"embed_dim\": 64}}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"--arch-overrides {text!r} must be a JSON object. Fix: e.g. '{{\"depth\": 2}}'")
    return value


def create_vit(arch: str, img_size: int, in_chans: int = 3, overrides: Optional[Dict[str, Any]] = None) -> nn.Module:
    """A randomly initialised timm VisionTransformer without classifier (num_classes=0), position
    embedding initialised with fixed 2D sin-cos (as MAE / MoCo v3 do; it stays trainable)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer
    name = timm_name(arch)
    try:
        model = timm.create_model(name, pretrained=False, img_size=img_size, in_chans=in_chans, num_classes=0,
                                  **(overrides or {}))
    except RuntimeError as e:
        raise ValueError(f"unknown ViT architecture {arch!r} ({e}). Fix: use one of {', '.join(ARCHS)} or a timm "
                         f"vit_* name") from None
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{name} is a {type(model).__name__}, not a timm VisionTransformer (MAE drops tokens, which "
                         f"needs a plain ViT). Fix: use one of {', '.join(ARCHS)}")
    if img_size % model.patch_embed.patch_size[0]:
        raise ValueError(f"--resolution {img_size} is not a multiple of the patch size {model.patch_embed.patch_size[0]}. "
                         f"Fix: e.g. --resolution {img_size - img_size % model.patch_embed.patch_size[0]}")
    with torch.no_grad():
        grid = model.patch_embed.grid_size
        pe = sincos_2d(model.embed_dim, grid)
        n_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        model.pos_embed[0, n_prefix:] = pe.to(model.pos_embed.dtype)
        if n_prefix:
            model.pos_embed[0, :n_prefix] = 0
    return model


def sincos_2d(dim: int, grid: tuple) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding ``(grid_h * grid_w, dim)`` (row-major, as patch_embed's tokens)."""
    if dim % 4:
        raise ValueError(f"embed dim {dim} must be a multiple of 4 for the 2D sin-cos position embedding")
    gh, gw = grid
    ys, xs = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def emb(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([emb(ys), emb(xs)], axis=1)).float()


def vit_export(encoder: nn.Module, arch: str, img_size: int, in_chans: int, overrides: Dict[str, Any],
               meta: Dict[str, Any]) -> Dict[str, Any]:
    """The output file: the plain timm state_dict under 'state_dict' (timm's own loaders unwrap it) and
    our metadata under 'tskd'."""
    sd = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    return {"state_dict": sd, "tskd": dict(meta, format="timm", arch=arch, timm_name=timm_name(arch), img_size=img_size,
                                           in_chans=in_chans, arch_overrides=overrides)}
