"""A UNETR-like multi-scale decoder for ViT tokens (2D).

With patch size p = 2^L the decoder has levels j = 0..L at resolution 1/2^j of the working image:
level L (the bottleneck) comes from the last tapped block, levels j = 1..L-1 from the tapped
blocks in order (shallow block -> fine level, lifted by L-j transposed convolutions as in UNETR),
and level 0 from the image itself. The up path fuses them from coarse to fine. Every level below
L has a 1x1 segmentation head, so the network can give nnU-Net a deep-supervision list.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn


class ConvNormAct(nn.Sequential):
    """3x3 conv, instance norm, leaky ReLU: nnU-Net's building block."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm2d(cout, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


def _lift(embed_dim: int, cout: int, times: int) -> nn.Sequential:
    """Token map (1/p) -> feature map ``times`` octaves finer."""
    layers: List[nn.Module] = [nn.Conv2d(embed_dim, cout, 1, bias=False)]
    for _ in range(times):
        layers += [nn.ConvTranspose2d(cout, cout, 2, stride=2, bias=False), ConvNormAct(cout, cout)]
    return nn.Sequential(*layers)


class UNETRDecoder(nn.Module):
    """``forward(image, token_maps)`` -> logits per level, finest first (only level 0 unless
    ``deep_supervision``). ``token_maps``: L maps of ``embed_dim`` channels at 1/2^L."""

    def __init__(self, embed_dim: int, num_levels: int, image_channels: int, num_classes: int,
                 base_channels: int = 32, max_channels: int = 320):
        super().__init__()
        self.num_levels = num_levels
        ch = [min(base_channels * 2 ** j, max_channels) for j in range(num_levels + 1)]
        self.channels = ch
        self.image_skip = nn.Sequential(ConvNormAct(image_channels, ch[0]), ConvNormAct(ch[0], ch[0]))
        self.token_skips = nn.ModuleList([_lift(embed_dim, ch[j], num_levels - j) for j in range(1, num_levels)])
        self.bottleneck = nn.Sequential(nn.Conv2d(embed_dim, ch[num_levels], 1, bias=False),
                                        ConvNormAct(ch[num_levels], ch[num_levels]))
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[j + 1], ch[j], 2, stride=2, bias=False)
                                 for j in range(num_levels)])
        self.fuse = nn.ModuleList([nn.Sequential(ConvNormAct(2 * ch[j], ch[j]), ConvNormAct(ch[j], ch[j]))
                                   for j in range(num_levels)])
        self.heads = nn.ModuleList([nn.Conv2d(ch[j], num_classes, 1) for j in range(num_levels)])
        self.deep_supervision = False  # nnU-Net toggles this (set_deep_supervision_enabled)

    def forward(self, image: torch.Tensor, token_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        L = self.num_levels
        if len(token_maps) != L:
            raise ValueError(f"decoder expects {L} token maps, got {len(token_maps)}")
        skips = [self.image_skip(image)] + [lift(t) for lift, t in zip(self.token_skips, token_maps[:L - 1])]
        x = self.bottleneck(token_maps[-1])
        logits: List[torch.Tensor] = []
        for j in reversed(range(L)):
            x = self.fuse[j](torch.cat([self.up[j](x), skips[j]], dim=1))
            if self.deep_supervision or j == 0:
                logits.append(self.heads[j](x))
        return logits[::-1]  # finest first


class PyramidDecoder(nn.Module):
    """The UNETR-style up path for encoders that already give maps at several strides (LiteMedSAM's
    TinyViT): ``forward(image, maps)`` with maps at strides 1, 2, 4, 4 (the two stride-4 maps are
    concatenated into the bottleneck); level 0 also takes the image, as UNETRDecoder does. Logits per
    level, finest first (only level 0 unless ``deep_supervision``)."""

    def __init__(self, feature_channels: List[int], strides: List[int], image_channels: int, num_classes: int,
                 base_channels: int = 32, max_channels: int = 320):
        super().__init__()
        levels = sorted(set(int(s) for s in strides))
        if [2 ** j for j in range(len(levels))] != levels:
            raise ValueError(f"feature strides must be consecutive powers of two from 1, got {strides}")
        self.strides = [int(s) for s in strides]
        self.num_levels = n = len(levels)
        ch = [min(base_channels * 2 ** j, max_channels) for j in range(n)]
        level_in = [sum(c for c, s in zip(feature_channels, strides) if s == 2 ** j) for j in range(n)]
        level_in[0] += image_channels
        self.bottleneck = ConvNormAct(level_in[-1], ch[-1])
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[j + 1], ch[j], 2, stride=2, bias=False) for j in range(n - 1)])
        self.fuse = nn.ModuleList([nn.Sequential(ConvNormAct(ch[j] + level_in[j], ch[j]), ConvNormAct(ch[j], ch[j]))
                                   for j in range(n - 1)])
        self.heads = nn.ModuleList([nn.Conv2d(ch[j], num_classes, 1) for j in range(n)])
        self.deep_supervision = False  # nnU-Net toggles this (set_deep_supervision_enabled)

    def forward(self, image: torch.Tensor, maps: List[torch.Tensor]) -> List[torch.Tensor]:
        by_level: List[List[torch.Tensor]] = [[] for _ in range(self.num_levels)]
        for m, s in zip(maps, self.strides):
            by_level[s.bit_length() - 1].append(m)
        by_level[0].insert(0, image)
        x = self.bottleneck(torch.cat(by_level[-1], 1))
        logits: List[torch.Tensor] = [self.heads[-1](x)] if self.deep_supervision else []
        for j in reversed(range(self.num_levels - 1)):
            x = self.fuse[j](torch.cat([self.up[j](x)] + by_level[j], 1))
            if self.deep_supervision or j == 0:
                logits.append(self.heads[j](x))
        return logits[::-1]  # finest first
