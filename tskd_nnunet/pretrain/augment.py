"""Batched augmentations on the device, for z-scored grayscale (or few-channel) medical images.

No colour jitter, grayscale conversion or solarisation (natural-image habits that mean nothing on
z-scored intensities); instead what nnU-Net's own augmentation uses: geometric crop/flip, contrast
and brightness in z-score space, Gaussian blur and Gaussian noise, the same for every channel.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def random_resized_crop(x: torch.Tensor, scale: Tuple[float, float] = (0.3, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5) -> torch.Tensor:
    """Per-sample random crop (area fraction in ``scale``, aspect in ``ratio``) resized back to the input
    size, and a horizontal flip with probability ``flip_p``; one affine grid_sample for the batch."""
    b, dev = x.shape[0], x.device
    area = torch.empty(b, device=dev).uniform_(*scale)
    log_r = torch.empty(b, device=dev).uniform_(torch.tensor(ratio[0]).log().item(), torch.tensor(ratio[1]).log().item())
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, device=dev) < flip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def intensity(x: torch.Tensor, contrast: Tuple[float, float] = (0.7, 1.3), brightness: float = 0.2,
              noise_p: float = 0.3, noise_sigma: float = 0.1) -> torch.Tensor:
    """Contrast (multiplicative) and brightness (additive) in z-score units, then Gaussian noise."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    a = torch.empty(shape, device=x.device, dtype=x.dtype).uniform_(*contrast)
    c = torch.empty(shape, device=x.device, dtype=x.dtype).uniform_(-brightness, brightness)
    x = x * a + c
    sigma = torch.empty(shape, device=x.device, dtype=x.dtype).uniform_(0, noise_sigma)
    sigma = sigma * (torch.rand(shape, device=x.device) < noise_p)
    return x + torch.randn_like(x) * sigma


def gaussian_blur(x: torch.Tensor, p: float = 0.5, sigma: Tuple[float, float] = (0.1, 1.5)) -> torch.Tensor:
    """Gaussian blur of a random subset of the batch (per-sample sigma, separable 2D kernel)."""
    out = x.clone()
    for i in torch.nonzero(torch.rand(x.shape[0]) < p).flatten().tolist():
        s = float(torch.empty(1).uniform_(*sigma))
        radius = max(1, int(3 * s + 0.5))
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = k / k.sum()
        c = x.shape[1]
        img = x[i:i + 1]
        img = F.conv2d(F.pad(img, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        img = F.conv2d(F.pad(img, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
        out[i:i + 1] = img
    return out


def moco_view(x: torch.Tensor, blur_p: float) -> torch.Tensor:
    """One MoCo v3 view: crop/flip, intensity, blur (the two views differ by ``blur_p``, as in BYOL/MoCo v3)."""
    return gaussian_blur(intensity(random_resized_crop(x, scale=(0.3, 1.0))), p=blur_p)
