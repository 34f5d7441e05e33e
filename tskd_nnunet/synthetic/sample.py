"""``tskd_sample_diffusion``: sample N images and write them as the fold's ``synthetic`` extension.

    tskd_sample_diffusion DATASET CONFIGURATION FOLD -n N [--sampler ddim|dpm] [--steps 50] [--seed 0]
                          [--batch-size 16] [--checkpoint final|latest|PATH]

Images are generated in model space, mapped back to nnU-Net's normalised intensities with the
checkpoint's intensity map and written at the configuration's patch size (the working resolution):
as sampled when the generator was trained at that size (the default), upsampled (bilinear) only
when it was trained at a lower ``--resolution``. They are written with
:class:`tskd_nnunet.data.extension.ExtensionWriter` as cases ``syn_s<seed>_<index>`` of shape
``(channels, 1, *patch_size)``.

Determinism and resume: image ``i`` of seed ``s`` comes from its own generator seeded by ``(s, i)``,
so the same seed gives the same images whatever the batch size, and a re-run after an interruption
generates only the missing cases. The manifest lists one entry per seed, with the generator's
training case ids.

Provenance: a generator whose training ids include a validation case of the fold or an imagesTs case
of the *current* ``splits_final.json`` is refused (the split may have changed after training).
"""
from __future__ import annotations

import argparse
import datetime
import os
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tskd_nnunet.data.extension import (ExtensionError, ExtensionWriter, dataset_name, list_extension_cases,
                                        read_manifest, write_manifest)
from tskd_nnunet.synthetic.model import (SAMPLERS, DiffusionCheckpointError, IntensityMap, load_checkpoint, sha256_of,
                                         unet_from_checkpoint)
from tskd_nnunet.synthetic.model import NormalisedImagePipeline, build_sampling_scheduler, image_generators
from tskd_nnunet.synthetic import cases as fold_cases
from tskd_nnunet.synthetic.train import CHECKPOINT_FINAL, CHECKPOINT_LATEST, default_device, diffusion_output_folder


def resolve_checkpoint(dataset_name_or_id: Union[int, str], plans: str, configuration: str, fold: int,
                       checkpoint: str = "final") -> str:
    """``final`` / ``latest`` (in the fold's diffusion folder) or an explicit path."""
    if checkpoint in ("final", "latest"):
        folder = diffusion_output_folder(dataset_name_or_id, plans, configuration, fold)
        path = os.path.join(folder, CHECKPOINT_FINAL if checkpoint == "final" else CHECKPOINT_LATEST)
        if checkpoint == "final" and not os.path.isfile(path) and os.path.isfile(os.path.join(folder, CHECKPOINT_LATEST)):
            raise DiffusionCheckpointError(f"{path} does not exist: training has not finished. Fix: finish it with "
                                           f"tskd_train_diffusion, or pass --checkpoint latest to sample from "
                                           f"{CHECKPOINT_LATEST}")
        return path
    return checkpoint


class SyntheticGenerator:
    """A loaded checkpoint that turns image indices of a seed into normalised-space arrays."""

    def __init__(self, checkpoint_path: str, sampler: str = "ddim", inference_steps: int = 50,
                 device: Union[str, torch.device] = "cpu"):
        if sampler not in SAMPLERS:
            raise ExtensionError(f"unknown sampler {sampler!r}. Fix: use one of {', '.join(SAMPLERS)}")
        self.path = checkpoint_path
        self.ckpt = load_checkpoint(checkpoint_path)
        self.device = torch.device(device)
        self.unet = unet_from_checkpoint(self.ckpt, use_ema=True).to(self.device)
        self.sampler, self.inference_steps = sampler, int(inference_steps)
        self.imap = IntensityMap(**self.ckpt["intensity_map"])
        self.patch_size = tuple(self.ckpt["patch_size"])
        self.model_shape = tuple(self.ckpt["sample_shape"])
        self.resize = resize_mode(self.model_shape, self.patch_size, float(self.ckpt.get("scale", 1.0)))
        self.channels_last: Optional[bool] = None  # sampling layout; None: channels-last on CPU

    def generate(self, seed: int, indices: Sequence[int]) -> np.ndarray:
        """``(len(indices), channels, *patch_size)`` float32 in nnU-Net's normalised space."""
        x = self._sample(seed, indices)
        x = self.imap.to_normalised(x.float().cpu())
        if self.resize == "crop":
            oy, ox = [(m - p) // 2 for m, p in zip(self.model_shape, self.patch_size)]
            x = x[:, :, oy:oy + self.patch_size[0], ox:ox + self.patch_size[1]]
        elif self.resize == "bilinear":
            x = F.interpolate(x, size=self.patch_size, mode="bilinear", align_corners=False)
        return np.ascontiguousarray(x.numpy(), dtype=np.float32)

    def _sample(self, seed: int, indices: Sequence[int]) -> torch.Tensor:
        pipe = NormalisedImagePipeline(unet=self.unet,
                                       scheduler=build_sampling_scheduler(self.sampler, self.ckpt["train_scheduler_config"]))
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=len(indices), generator=image_generators(seed, indices),
                    num_inference_steps=self.inference_steps, channels_last=self.channels_last)


def resize_mode(model_shape: Sequence[int], patch_size: Sequence[int], scale: float) -> str:
    """How a model sample becomes a patch-size case: ``none`` (trained at the working resolution),
    ``crop`` (working resolution, a side rounded up to the UNet's multiple) or ``bilinear`` (a generator
    trained at a lower ``--resolution``: upsampled)."""
    if tuple(model_shape) == tuple(patch_size):
        return "none"
    if abs(scale - 1.0) < 1e-9 and all(m >= p for m, p in zip(model_shape, patch_size)):
        return "crop"
    return "bilinear"


def check_generator_provenance(dataset_name_or_id: Union[int, str], fold: int, checkpoint_path: str,
                               generator_case_ids: Sequence[str]) -> None:
    """Refuse a generator whose training ids include a validation case of ``fold`` or an imagesTs case
    of the *current* split (e.g. a label budget set after the generator was trained)."""
    val_hits, test_hits, splits_file = fold_cases.held_out_training_ids(dataset_name_or_id, fold, generator_case_ids)
    if val_hits or test_hits:
        folder = os.path.dirname(os.path.abspath(checkpoint_path))
        raise DiffusionCheckpointError(fold_cases.provenance_message(
            f"checkpoint {checkpoint_path}", int(fold), val_hits, test_hits, splits_file,
            f"retrain the generator on the current split (delete {folder}, then tskd_train_diffusion), or restore "
            f"the split it was trained on"))


def _batches(items: List[int], size: int) -> Iterable[List[int]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def case_id(seed: int, index: int) -> str:
    return f"syn_s{seed}_{index:05d}"


def sample_to_extension(dataset_name_or_id: Union[int, str], configuration: str, fold: int, num_images: int,
                        plans: str = "nnUNetPlans", sampler: str = "ddim", inference_steps: int = 50, seed: int = 0,
                        batch_size: int = 16, checkpoint: str = "final", device: Union[str, torch.device] = "cpu",
                        progress: bool = True) -> str:
    """Generate the missing cases ``syn_s<seed>_00000 .. num_images-1`` of the fold's synthetic extension;
    returns the extension folder."""
    name = dataset_name(dataset_name_or_id)
    path = resolve_checkpoint(name, plans, configuration, fold, checkpoint)
    gen = SyntheticGenerator(path, sampler, inference_steps, device)
    ck = gen.ckpt
    for key, want in (("dataset", name), ("plans", plans), ("configuration", configuration), ("fold", int(fold))):
        if ck[key] != want:
            raise DiffusionCheckpointError(f"{path} was trained for {key}={ck[key]!r}, not {want!r}. Fix: sample with a "
                                           f"checkpoint of this dataset/configuration/fold (the extension is per fold)")
    if "case_ids" not in ck:
        raise DiffusionCheckpointError(f"{path} records no training case ids, so its provenance cannot be checked. "
                                       f"Fix: retrain it with this version of tskd_train_diffusion")
    check_generator_provenance(name, fold, path, ck["case_ids"])
    writer = ExtensionWriter(name, plans, configuration, fold, "synthetic")
    sha = sha256_of(path)
    run = {"seed": int(seed), "checkpoint": os.path.abspath(path), "checkpoint_sha256": sha, "step": int(ck["step"]),
           "sampler": sampler, "inference_steps": int(inference_steps), "resolution": list(ck["sample_shape"]),
           "working_resolution": list(gen.patch_size), "resize": gen.resize,
           "upsampled_to": list(gen.patch_size) if gen.resize == "bilinear" else None,
           "training_case_ids": list(ck["case_ids"])}
    manifest = read_manifest(writer.folder)
    for r in manifest.get("runs", []):  # earlier runs in this folder must pass the same check
        if r["seed"] != seed:
            val_hits, test_hits, splits_file = fold_cases.held_out_training_ids(name, fold,
                                                                                r.get("training_case_ids", []))
            if val_hits or test_hits:
                raise ExtensionError(fold_cases.provenance_message(
                    f"seed {r['seed']} in {os.path.join(writer.folder, 'manifest.json')}", int(fold), val_hits,
                    test_hits, splits_file, f"delete {writer.folder} and sample again from a generator trained on "
                                            f"the current split"))
    runs = [r for r in manifest.get("runs", []) if r["seed"] != seed]
    old = next((r for r in manifest.get("runs", []) if r["seed"] == seed), None)
    if old is not None:
        differs = [k for k in ("checkpoint_sha256", "sampler", "inference_steps", "resolution") if old[k] != run[k]]
        if differs:
            raise ExtensionError(f"{writer.folder} already holds seed {seed} made with other {', '.join(differs)}. "
                                 f"Fix: pass another --seed, or delete {writer.folder} to regenerate")
        num_images = max(num_images, int(old["count"]))
    existing = set(list_extension_cases(writer.folder))
    todo = [i for i in range(num_images) if case_id(seed, i) not in existing]
    print(f"Sampling {len(todo)} of {num_images} images ({sampler}, {inference_steps} steps, seed {seed}) from {path} "
          f"-> {writer.folder}")

    def save_manifest(count_written: int) -> None:
        entry = dict(run, count=num_images, written=count_written,
                     created=old["created"] if old else datetime.datetime.now().isoformat(timespec="seconds"),
                     updated=datetime.datetime.now().isoformat(timespec="seconds"))
        m = read_manifest(writer.folder)
        m.update({"source": "synthetic", "dataset": name, "plans": plans, "configuration": configuration,
                  "fold": int(fold), "runs": runs + [entry]})
        m["num_cases"] = len(list_extension_cases(writer.folder))
        write_manifest(writer.folder, m)

    done = num_images - len(todo)
    save_manifest(done)
    bar = tqdm(total=num_images, initial=done, desc="sampling", unit="img", disable=not progress, dynamic_ncols=True)
    spacing = writer.synthetic_spacing()
    for batch in _batches(todo, max(1, batch_size)):
        images = gen.generate(seed, batch)
        for i, img in zip(batch, images):
            writer.write_case(case_id(seed, i), img[:, None], writer.case_properties((1, *img.shape[1:]), spacing))
        done += len(batch)
        save_manifest(done)
        bar.update(len(batch))
    bar.close()
    return writer.folder


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="tskd_sample_diffusion", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration")
    p.add_argument("fold", type=int)
    p.add_argument("-n", "--num-images", type=int, required=True)
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--checkpoint", default="final", help="final, latest or a path to a diffusion checkpoint")
    p.add_argument("--no-quality", action="store_true", help="skip the quality check (grid PNG, KID, FD in the manifest)")
    p.add_argument("--features", default="litemedsam", choices=("litemedsam", "teacher", "random"),
                   help="feature space of the quality check's KID/FD")
    p.add_argument("-device", "--device", default=default_device(), choices=("cpu", "cuda", "mps"))
    a = p.parse_args(argv)
    for k in ("num_images", "steps", "batch_size"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    try:
        folder = sample_to_extension(a.dataset_name_or_id, a.configuration, a.fold, a.num_images, a.plans, a.sampler,
                                     a.steps, a.seed, a.batch_size, a.checkpoint, a.device)
        if not a.no_quality:
            from tskd_nnunet.synthetic.quality import assess_extension
            assess_extension(a.dataset_name_or_id, a.configuration, a.fold, a.plans, device=a.device,
                             features_from=a.features)
    except (ExtensionError, DiffusionCheckpointError) as e:
        raise SystemExit(f"tskd_sample_diffusion: {e}") from None
    print(f"Synthetic extension: {folder}")


if __name__ == "__main__":
    main()
