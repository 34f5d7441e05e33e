"""MAE (He et al. 2022) for a timm ViT: random patch masking, a light Transformer decoder, and the
normalised-pixel MSE on the masked patches only.

The encoder sees only the visible patches (plus the class token), which is both the method and what
makes it cheap; the decoder is thrown away, and the encoder's state_dict is written in timm format.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from tskd_nnunet.pretrain.augment import random_resized_crop
from tskd_nnunet.pretrain.vit import sincos_2d, vit_export


def patchify(imgs: torch.Tensor, p: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, ph*pw*C)`` in patch_embed's row-major token order."""
    ph, pw = (p, p) if isinstance(p, int) else p
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def random_masking(n: int, batch: int, ratio: float, device: torch.device,
                   noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random subset of patches: (ids_keep (B, n_keep), mask (B, N) 1 = masked, ids_restore)."""
    n_keep = max(1, int(round(n * (1 - ratio))))
    noise = torch.rand(batch, n, device=device) if noise is None else noise
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, n, device=device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :n_keep], mask, ids_restore


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error per patch, averaged over masked patches only (mask 1 = masked).

    With ``norm_pix`` every target patch is normalised by its own mean and variance (MAE's
    normalised-pixel loss), so flat regions do not dominate."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


class MAEDecoder(nn.Module):
    """Light decoder: embed -> mask tokens -> fixed sin-cos positions -> Transformer blocks -> pixels."""

    def __init__(self, embed_dim: int, grid: Tuple[int, int], patch_pixels: int, num_prefix: int,
                 dim: int = 256, depth: int = 4, heads: int = 8) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block
        self.num_prefix = num_prefix
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        pos = torch.cat([torch.zeros(num_prefix, dim), sincos_2d(dim, grid)], dim=0)
        self.register_buffer("pos_embed", pos[None], persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        prefix, visible = x[:, :self.num_prefix], x[:, self.num_prefix:]
        n = ids_restore.shape[1]
        tokens = torch.cat([visible, self.mask_token.expand(x.shape[0], n - visible.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([prefix, tokens], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.num_prefix:])


class MAE(nn.Module):
    """MAE objective around a timm VisionTransformer ``encoder``; ``forward(imgs)`` returns the loss."""

    def __init__(self, encoder: nn.Module, arch: str, img_size: int, in_chans: int,
                 overrides: Optional[Dict[str, Any]] = None, mask_ratio: float = 0.75, norm_pix: bool = True,
                 decoder_dim: int = 256, decoder_depth: int = 4, decoder_heads: int = 8,
                 crop_scale: Tuple[float, float] = (0.5, 1.0)) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"--mask-ratio {mask_ratio} must be in (0, 1). Fix: e.g. --mask-ratio 0.75")
        self.encoder, self.arch, self.img_size, self.in_chans = encoder, arch, img_size, in_chans
        self.overrides = dict(overrides or {})
        self.mask_ratio, self.norm_pix, self.crop_scale = mask_ratio, norm_pix, crop_scale
        self.patch = encoder.patch_embed.patch_size[0]
        self.decoder = MAEDecoder(encoder.embed_dim, encoder.patch_embed.grid_size, self.patch ** 2 * in_chans,
                                  encoder.num_prefix_tokens, decoder_dim, decoder_depth, decoder_heads)

    def set_progress(self, fraction: float) -> None:
        pass

    def encode_visible(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None):
        enc = self.encoder
        x = enc.patch_embed(imgs)
        x = enc._pos_embed(x)  # class token + position embedding, exactly as timm's forward
        npt = enc.num_prefix_tokens
        prefix, patches = x[:, :npt], x[:, npt:]
        ids_keep, mask, ids_restore = random_masking(patches.shape[1], patches.shape[0], self.mask_ratio,
                                                     imgs.device, noise)
        visible = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, patches.shape[-1]))
        x = enc.norm_pre(torch.cat([prefix, visible], dim=1))
        x = enc.norm(enc.blocks(x))
        return x, mask, ids_restore

    def predict(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """(pixel predictions (B, N, p*p*C), mask (B, N)) for ``imgs`` without augmentation."""
        latent, mask, ids_restore = self.encode_visible(imgs, noise)
        return self.decoder(latent, ids_restore), mask

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        if self.training:
            imgs = random_resized_crop(imgs, scale=self.crop_scale)
        pred, mask = self.predict(imgs)
        return masked_patch_loss(pred, patchify(imgs, self.patch), mask, self.norm_pix)

    def export(self, meta: Dict[str, Any]) -> Dict[str, Any]:
        return vit_export(self.encoder, self.arch, self.img_size, self.in_chans, self.overrides,
                          dict(meta, objective="mae", mask_ratio=self.mask_ratio))
