"""Quality check of a synthetic extension: a grid PNG a person can read, and KID + Fréchet distance.

* ``quality_grid.png`` in the extension folder: the upper rows are real training crops of the fold
  (the images the diffusion model learned from), the lower rows synthetic cases, both at the patch
  size and shown with the same intensity window (the checkpoint's intensity map).
* KID (kernel inception distance, Binkowski et al. 2018): unbiased MMD² with the polynomial kernel
  ``k(x, y) = (x·y / d + 1)³`` between features of real and synthetic images, averaged over random
  subsets; the Fréchet distance (FD, as in FID) between Gaussians fitted to the same features.
* Features (``--features``): ``litemedsam`` (default) = the packaged, pretrained LiteMedSAM encoder
  (MedSAM distilled; a real medical foundation model, the same file for every run, so numbers compare
  across folds, datasets and generators): per-image min-max to [0, 1], channels averaged and repeated
  to RGB, resized to 128², global average of the 256-channel neck map. ``teacher`` = the fold's
  fine-tuned teacher's encoder (found as DistillTrainer finds it; comparable only within one teacher).
  ``random`` = a fixed, seeded random-conv network (``random_conv_v1``), the fallback when neither is
  available, named as such in the manifest. Distances compare only within one extractor.
"""
from __future__ import annotations

import argparse
import datetime
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tskd_nnunet.data.extension import (ExtensionError, dataset_name, extension_dataset_class, extension_folder,
                                        list_extension_cases, read_manifest, write_manifest)
from tskd_nnunet.synthetic import cases as fold_cases
from tskd_nnunet.synthetic.model import DiffusionCheckpointError, IntensityMap, load_checkpoint

QUALITY_GRID = "quality_grid.png"
RANDOM_FEATURES = "random_conv_v1"
FEATURE_CHOICES = ("litemedsam", "teacher", "random")
LITEMEDSAM_FEATURE_SIZE = 128  # 4x fewer encoder FLOPs than its native 256²; a fixed size keeps FD comparable


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(a, b) = (a·b/d + 1)³ (diagonal terms excluded)."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(real: np.ndarray, fake: np.ndarray, num_subsets: int = 50, subset_size: int = 100,
        seed: int = 0) -> Tuple[float, float]:
    """KID mean and standard deviation over ``num_subsets`` random subsets of ``subset_size`` (capped
    at the smaller set)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ExtensionError(f"KID needs at least 2 real and 2 synthetic images, got {len(real)} and {len(fake)}. "
                             f"Fix: sample more images (-n)")
    rng = np.random.default_rng(seed)
    vals = [polynomial_mmd2_unbiased(real[rng.choice(len(real), m, replace=False)],
                                     fake[rng.choice(len(fake), m, replace=False)]) for _ in range(num_subsets)]
    return float(np.mean(vals)), float(np.std(vals))


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """||mu_r - mu_f||² + Tr(S_r + S_f - 2 (S_r S_f)^½) between Gaussians fitted to two feature sets."""
    from scipy import linalg
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) < 2:
        raise ExtensionError(f"the Fréchet distance needs at least 2 real and 2 synthetic images, got {len(real)} "
                             f"and {len(fake)}. Fix: sample more images (-n)")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_r @ cov_f, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product (fewer images than dimensions): regularise
        eps = 1e-6 * np.eye(len(mu_r))
        covmean = linalg.sqrtm((cov_r + eps) @ (cov_f + eps))
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r) + np.trace(cov_f) - 2 * np.trace(covmean.real))


class LiteMedSAMFeatures(nn.Module):
    """The packaged LiteMedSAM encoder as a fixed feature extractor: (B, C, H, W) normalised images -> (B, 256)."""

    def __init__(self, size: int = LITEMEDSAM_FEATURE_SIZE):
        super().__init__()
        from tskd_nnunet.models.litemedsam import pretrained_encoder
        self.size = int(size)
        self.encoder = pretrained_encoder(self.size)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from tskd_nnunet.models.teacher_net import LiteMedSAMInputAdapter
        x = LiteMedSAMInputAdapter.unit_range(x.float()).mean(1, keepdim=True).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.encoder(x)[-1].flatten(2).mean(2)


class RandomConvFeatures(nn.Module):
    """Fixed random conv features (seeded): mean and std of 3 conv stages -> 2*(16+32+64) numbers."""

    def __init__(self, in_channels: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        chans = [in_channels, 16, 32, 64]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans, chans[1:]))
        with torch.no_grad():
            for c in self.convs:
                c.weight.copy_(torch.randn(c.weight.shape, generator=g) * (2.0 / (c.in_channels * 9)) ** 0.5)
                c.bias.zero_()
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            feats += [x.mean((2, 3)), x.std((2, 3))]
        return torch.cat(feats, 1)


def _pool(out) -> torch.Tensor:
    last = out[-1] if isinstance(out, (list, tuple)) else out
    return last.float().flatten(2).mean(2) if last.ndim > 2 else last.float()


def teacher_features(dataset_name_or_id: Union[int, str], plans: str, configuration: str, fold: int,
                     device: torch.device) -> Tuple[Optional[Callable[[torch.Tensor], torch.Tensor]], str]:
    """(feature function, description) from the fold's fine-tuned teacher, or (None, why not)."""
    try:
        from tskd_nnunet.config import teacher_checkpoint_from_env, teacher_plans_from_env, teacher_trainer_from_env
        from tskd_nnunet.distill.teacher_io import TeacherError, load_teacher
    except ImportError as e:  # teacher support not installed in this tree
        return None, f"teacher loader unavailable ({e})"
    import json
    name = dataset_name(dataset_name_or_id)
    base = os.path.join(os.environ["nnUNet_preprocessed"], name)
    with open(os.path.join(base, plans + ".json")) as f:
        plans_dict = json.load(f)
    with open(os.path.join(base, "dataset.json")) as f:
        dataset_json = json.load(f)
    results = os.environ.get("nnUNet_results", "")
    trainer = teacher_trainer_from_env("ViTLoRATeacherTrainer")
    try:
        network, loc = load_teacher(results, plans_dict, configuration, dataset_json, fold, trainer,
                                    teacher_plans_from_env(plans), teacher_checkpoint_from_env())
    except TeacherError as e:
        return None, f"no teacher ({str(e).splitlines()[0]})"
    network = network.to(device).eval()
    if hasattr(network, "encode"):
        encode = network.encode
    elif hasattr(network, "encoder"):  # plain nnU-Net U-Net: the encoder returns its skips
        encode = network.encoder
    else:
        return None, f"teacher {type(network).__name__} has neither encode() nor encoder"

    @torch.no_grad()
    def fn(x: torch.Tensor) -> torch.Tensor:
        return _pool(encode(x.to(device)))
    return fn, f"teacher encoder: {loc.checkpoint}"


def feature_extractor(kind: str, name: str, plans: str, configuration: str, fold: int, in_channels: int,
                      device: torch.device) -> Tuple[Callable[[torch.Tensor], torch.Tensor], str, str]:
    """(feature function, extractor name, description) for ``kind`` in FEATURE_CHOICES; an unavailable choice
    falls back to the seeded random-conv features, and the description says why."""
    if kind not in FEATURE_CHOICES:
        raise ExtensionError(f"unknown feature extractor {kind!r}. Fix: use one of {', '.join(FEATURE_CHOICES)}")
    why = "random features chosen"
    if kind == "litemedsam":
        from tskd_nnunet.models.vit_backbones import TeacherCheckpointError
        try:
            net = LiteMedSAMFeatures().to(device)
            return net, "litemedsam_encoder", f"packaged LiteMedSAM encoder at {net.size}², neck map averaged"
        except TeacherCheckpointError as e:
            why = f"LiteMedSAM unavailable: {str(e).splitlines()[0]}"
    elif kind == "teacher":
        fn, why = teacher_features(name, plans, configuration, fold, device)
        if fn is not None:
            return fn, "teacher_encoder", why
    return (RandomConvFeatures(in_channels).to(device), RANDOM_FEATURES,
            f"fallback {RANDOM_FEATURES} (fixed seeded random conv features; {why})")


def features(fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int = 32,
             device: torch.device = torch.device("cpu")) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch_size):
        out.append(fn(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def real_crops(dataset_name_or_id: Union[int, str], plans: str, configuration: str, case_ids: Sequence[str],
               patch_size: Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """``n`` random patch-size crops (normalised space) of the given preprocessed cases."""
    volumes = fold_cases.load_cases(dataset_name_or_id, plans, configuration, case_ids)
    pad = float(min(v.min() for v in volumes))  # images smaller than the patch: pad with the darkest value
    sampler = fold_cases.SliceSampler(fold_cases.to_slices(volumes, 1.0), tuple(patch_size), pad_value=pad)
    return sampler.batch(n, np.random.default_rng(seed)).numpy()


def load_extension_images(folder: str, dataset_class, limit: Optional[int] = None) -> Tuple[List[str], np.ndarray]:
    """Read extension cases with nnU-Net's own dataset class; returns ids and ``(n, c, y, x)`` (slice 0)."""
    ids = list_extension_cases(folder)[:limit]
    if not ids:
        raise ExtensionError(f"{folder} holds no cases. Fix: run tskd_sample_diffusion first")
    ds = dataset_class(folder, identifiers=list(ids))
    return ids, np.stack([np.asarray(ds.load_case(i)[0][:, 0]) for i in ids]).astype(np.float32)


def assess_extension(dataset_name_or_id: Union[int, str], configuration: str, fold: int,
                     plans: str = "nnUNetPlans", device: Union[str, torch.device] = "cpu", max_images: int = 256,
                     grid_images: int = 16, features_from: str = "litemedsam") -> dict:
    """Write ``quality_grid.png`` and ``manifest['quality']`` for the fold's synthetic extension."""
    from tskd_nnunet.synthetic.train import save_grid_png
    device = torch.device(device)
    name = dataset_name(dataset_name_or_id)
    folder = extension_folder(name, plans, configuration, fold, "synthetic")
    manifest = read_manifest(folder)
    if not manifest.get("runs"):
        raise ExtensionError(f"{folder} has no manifest with sampling runs. Fix: run tskd_sample_diffusion first")
    run = manifest["runs"][-1]
    ckpt = load_checkpoint(run["checkpoint"]) if os.path.isfile(run["checkpoint"]) else None
    ids, fake = load_extension_images(folder, extension_dataset_class(name, plans, configuration), max_images)
    patch = fake.shape[2:]
    real = real_crops(name, plans, configuration, run["training_case_ids"], patch, min(max_images, max(len(fake), 16)))

    fn, extractor, desc = feature_extractor(features_from, name, plans, configuration, fold, fake.shape[1], device)
    real_f, fake_f = features(fn, real, device=device), features(fn, fake, device=device)
    kid_mean, kid_std = kid(real_f, fake_f)
    fd = frechet_distance(real_f, fake_f)

    imap = IntensityMap(**ckpt["intensity_map"]) if ckpt else IntensityMap.fit([real[:, c].ravel() for c in
                                                                                range(real.shape[1])])
    k = min(grid_images, len(fake), len(real))
    cols = min(8, k)
    grid = torch.cat([imap.to_model(torch.from_numpy(real[:k])), imap.to_model(torch.from_numpy(fake[:k]))])
    save_grid_png(grid, os.path.join(folder, QUALITY_GRID), columns=cols)
    quality = {"kid_mean": kid_mean, "kid_std": kid_std, "fd": fd, "feature_extractor": extractor, "feature_source": desc,
               "num_real": int(len(real)), "num_synthetic": int(len(fake)), "grid_png": QUALITY_GRID,
               "grid_layout": f"top {(k + cols - 1) // cols} row(s): real training crops; bottom: synthetic",
               "created": datetime.datetime.now().isoformat(timespec="seconds")}
    manifest = read_manifest(folder)
    manifest["quality"] = quality
    write_manifest(folder, manifest)
    print(f"KID ({extractor}) = {kid_mean:.5f} ± {kid_std:.5f}, FD = {fd:.4f}; grid: {os.path.join(folder, QUALITY_GRID)}")
    return quality


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="tskd_synthetic_quality",
                                description="Grid PNG and KID of a fold's synthetic extension (written to its manifest)")
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration")
    p.add_argument("fold", type=int)
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--max-images", type=int, default=256)
    p.add_argument("--features", choices=FEATURE_CHOICES, default="litemedsam",
                   help="feature space of KID/FD (default: the packaged LiteMedSAM encoder)")
    p.add_argument("--random-features", action="store_const", const="random", dest="features",
                   help="deprecated: --features random")
    p.add_argument("-device", "--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cpu", "cuda", "mps"))
    a = p.parse_args(argv)
    try:
        assess_extension(a.dataset_name_or_id, a.configuration, a.fold, a.plans, a.device, a.max_images,
                         features_from=a.features)
    except (ExtensionError, DiffusionCheckpointError) as e:
        raise SystemExit(f"tskd_synthetic_quality: {e}") from None


if __name__ == "__main__":
    main()
