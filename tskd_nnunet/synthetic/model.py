"""Diffusion model, noise schedulers and sampling pipeline, kept as separate objects (diffusers style).

* model: :class:`diffusers.UNet2DModel` predicting the noise (epsilon), all image channels jointly;
* training scheduler: :class:`diffusers.DDPMScheduler` (cosine betas, 1000 steps);
* sampling scheduler: DDIM, DPM-Solver++ or UniPC built from the training scheduler's config;
* pipeline: :class:`NormalisedImagePipeline`, a short DDIM-pipeline-like loop that accepts either
  scheduler and returns samples in *model space* ([-1, 1]).

Model space vs nnU-Net's normalised space: nnU-Net's preprocessed intensities are (mostly z-score)
normalised but unbounded, while DDPM clips predicted images to [-1, 1]. :class:`IntensityMap` maps
each channel's [0.5, 99.5] percentile range of the fold's training data linearly to [-1, 1]
(values beyond are clipped) and back.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DModel,
                       UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor
from tskd_nnunet.atomic_io import atomic_torch_save as save_atomic  # noqa: E402
from tskd_nnunet.atomic_io import sha256_of  # noqa: E402,F401  (re-exported: sample.py, tests)

DEFAULT_BLOCK_OUT_CHANNELS: Tuple[int, ...] = (32, 64, 64)
SAMPLERS = ("ddim", "dpm", "unipc")
NUM_TRAIN_TIMESTEPS = 1000


class DiffusionCheckpointError(ValueError):
    """A diffusion checkpoint is missing or unreadable; the message names the file and the fix."""


def build_unet(in_channels: int, sample_size: Tuple[int, int],
               block_out_channels: Sequence[int] = DEFAULT_BLOCK_OUT_CHANNELS,
               layers_per_block: int = 1, attention: bool = True) -> UNet2DModel:
    """Small unconditional UNet: ResNet blocks at every level, self-attention only at the lowest one
    (cheap on CPU). ``sample_size`` must be divisible by 2**(levels-1)."""
    n = len(block_out_channels)
    down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D" if attention else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attention else "UpBlock2D"] + ["UpBlock2D"] * (n - 1)
    groups = min(8, min(block_out_channels))
    return UNet2DModel(sample_size=tuple(int(s) for s in sample_size), in_channels=in_channels,
                       out_channels=in_channels, layers_per_block=layers_per_block,
                       block_out_channels=tuple(int(c) for c in block_out_channels),
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=groups,
                       attention_head_dim=min(32, block_out_channels[-1]))


def build_train_scheduler() -> DDPMScheduler:
    # cosine schedule: better than linear at small resolutions (Nichol & Dhariwal 2021)
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)


def build_sampling_scheduler(sampler: str, train_scheduler_config: dict):
    """DDIM (eta=0, deterministic), DPM-Solver++ (2nd order multistep) or UniPC (bh2, 2nd order: made for
    5-20 steps) from the training config.

    The cosine schedule's last timestep has alpha_bar ~ 0, so the first x0 prediction divides by ~0: DDIM survives
    it through the config's ``clip_sample``, which the multistep solvers ignore; they get the same clip as
    thresholding of x0 to the sample range (with ``sample_max_value`` 1 diffusers' dynamic threshold is exactly a
    clip to [-1, 1]). Without it every UniPC/DPM image saturates to +-1 noise."""
    if sampler == "ddim":
        return DDIMScheduler.from_config(train_scheduler_config)
    clip = {"thresholding": bool(train_scheduler_config.get("clip_sample", False)),
            "sample_max_value": float(train_scheduler_config.get("clip_sample_range", 1.0))}
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(train_scheduler_config, algorithm_type="dpmsolver++",
                                                       solver_order=2, **clip)
    if sampler == "unipc":
        return UniPCMultistepScheduler.from_config(train_scheduler_config, solver_order=2, solver_type="bh2", **clip)
    raise ValueError(f"unknown sampler {sampler!r}. Fix: use one of {', '.join(SAMPLERS)}")


class IntensityMap:
    """Per-channel linear map between nnU-Net's normalised space and the model's [-1, 1]."""

    def __init__(self, lo: Sequence[float], hi: Sequence[float]):
        self.lo = np.asarray(lo, dtype=np.float32)
        self.hi = np.maximum(np.asarray(hi, dtype=np.float32), self.lo + 1e-6)

    @classmethod
    def fit(cls, channel_values: Sequence[np.ndarray], low_pct: float = 0.5, high_pct: float = 99.5) -> "IntensityMap":
        lo = [float(np.percentile(v, low_pct)) for v in channel_values]
        hi = [float(np.percentile(v, high_pct)) for v in channel_values]
        return cls(lo, hi)

    def _shape(self, x: torch.Tensor, v: np.ndarray) -> torch.Tensor:
        # channels are dim 1 of a batch (N, C, H, W) or dim 0 of one image (C, H, W)
        shape = [1] * x.ndim
        shape[1 if x.ndim == 4 else 0] = len(v)
        return torch.as_tensor(v, dtype=x.dtype, device=x.device).view(shape)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._shape(x, self.lo), self._shape(x, self.hi)
        return (2 * (x - lo) / (hi - lo) - 1).clamp(-1, 1)

    def to_normalised(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._shape(x, self.lo), self._shape(x, self.hi)
        return (x.clamp(-1, 1) + 1) / 2 * (hi - lo) + lo

    def state_dict(self) -> Dict[str, List[float]]:
        return {"lo": self.lo.tolist(), "hi": self.hi.tolist()}


def image_generators(seed: int, indices: Sequence[int]) -> List[torch.Generator]:
    """One CPU generator per image, seeded from (seed, image index): image ``i`` of a run is the same
    whatever the batch size or which batches were already written (resume)."""
    gens = []
    for i in indices:
        state = np.random.SeedSequence([int(seed), int(i)]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator("cpu").manual_seed(int(state[0]) << 31 ^ int(state[1])))
    return gens


class NormalisedImagePipeline(DiffusionPipeline):
    """Unconditional sampling with any diffusers scheduler (DDIM, DPM-Solver, DDPM).

    Unlike diffusers' DDIMPipeline it keeps the scheduler it is given and returns a tensor in
    model space, so the caller can map it back to nnU-Net's normalised intensities."""

    def __init__(self, unet: UNet2DModel, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: Union[torch.Generator, List[torch.Generator], None] = None,
                 num_inference_steps: int = 50, channels_last: Optional[bool] = None) -> torch.Tensor:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        # noise from per-image CPU generators, then moved: identical on CPU and GPU runs
        image = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        image = image.to(self._execution_device, self.unet.dtype)
        if channels_last is None:  # oneDNN's channels-last convolutions: faster on CPU (bench_synthetic_options)
            channels_last = image.device.type == "cpu"
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            image = image.contiguous(memory_format=torch.channels_last)
        try:
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.progress_bar(self.scheduler.timesteps):
                eps = self.unet(image, t).sample
                image = self.scheduler.step(eps, t, image).prev_sample
        finally:  # a model still in training (progress grids) must keep its layout: exact resume depends on it
            if channels_last:
                self.unet.to(memory_format=torch.contiguous_format)
        return image.float().clamp(-1, 1)


# ----------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise DiffusionCheckpointError(f"diffusion checkpoint {path} not found. Fix: run tskd_train_diffusion for "
                                       f"this dataset/configuration/fold first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise DiffusionCheckpointError(f"cannot read diffusion checkpoint {path} ({type(e).__name__}: {e}). "
                                       f"Fix: delete it and re-run tskd_train_diffusion") from None
    if not isinstance(ckpt, dict) or "unet_config" not in ckpt or "ema" not in ckpt:
        raise DiffusionCheckpointError(f"{path} is not a tskd diffusion checkpoint. Fix: pass a checkpoint written "
                                       f"by tskd_train_diffusion")
    return ckpt


def unet_from_checkpoint(ckpt: dict, use_ema: bool = True) -> UNet2DModel:
    """Rebuild the UNet from a checkpoint; with ``use_ema`` its weights are the EMA weights."""
    unet = UNet2DModel.from_config(ckpt["unet_config"])
    unet.load_state_dict(ckpt["unet"])
    if use_ema:
        shadow = ckpt["ema"]["shadow_params"]
        with torch.no_grad():
            for p, s in zip(unet.parameters(), shadow):
                p.copy_(s)
    return unet.eval()
