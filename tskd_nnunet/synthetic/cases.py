"""Which preprocessed cases the diffusion model may see, and loading them as 2D training images.

Only training cases of the fold: ``splits_final.json[fold]['train']`` plus (by default) the fold's
``tskd_unlabeled_pool.json`` entry, whose cases are training cases whose labels are hidden. Never the
fold's ``val`` cases, never imagesTs (those are not in the preprocessed folder at all).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from tskd_nnunet.data.preprocessed_files import POOL_FILE, read_unlabeled_pool
from tskd_nnunet.data.extension import ExtensionError, dataset_name, extension_dataset_class, preprocessed_config_folder



def _load_json(path: str, fix: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ExtensionError(f"{path} is not valid JSON ({e}). Fix: {fix}") from None


def fold_case_ids(dataset_name_or_id: Union[int, str], plans: str, configuration: str, fold: int,
                  include_unlabeled_pool: bool = True) -> Dict[str, List[str]]:
    """``{'train': [...], 'pool': [...], 'val': [...], 'used': sorted(train + pool)}`` for one fold.

    Creates ``splits_final.json`` exactly as nnU-Net's trainer would (5-fold, seed 12345) when absent,
    so that the diffusion model and every later ``nnUNetv2_train`` agree on the split."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    name = dataset_name(dataset_name_or_id)
    base = os.path.join(os.environ["nnUNet_preprocessed"], name)
    if not isinstance(fold, int) and not str(fold).isdigit():
        raise ExtensionError(f"fold {fold!r}: the diffusion model is trained per cross-validation fold. "
                             f"Fix: pass an integer fold (0-4); 'all' has no held-out cases to protect")
    fold = int(fold)
    splits_file = os.path.join(base, "splits_final.json")
    if not os.path.isfile(splits_file):
        folder = preprocessed_config_folder(name, plans, configuration)
        ids = sorted(extension_dataset_class(name, plans, configuration).get_identifiers(folder))
        splits = generate_crossval_split(ids, seed=12345, n_splits=5)
        from tskd_nnunet.data.extension import write_json_atomic
        write_json_atomic(splits_file, splits)
        print(f"Created {splits_file} (nnU-Net's default 5-fold split)")
    splits = _load_json(splits_file, "delete it to get nnU-Net's default split, or re-run the label budget script")
    if fold >= len(splits):
        raise ExtensionError(f"fold {fold} does not exist in {splits_file} ({len(splits)} folds). "
                             f"Fix: pass a fold in 0..{len(splits) - 1}")
    train, val = list(splits[fold]["train"]), list(splits[fold]["val"])
    pool: List[str] = read_unlabeled_pool(base, fold) if include_unlabeled_pool else []
    pool_file = os.path.join(base, POOL_FILE)
    leaked = sorted(set(train + pool) & set(val))
    if leaked:
        raise ExtensionError(f"cases {leaked[:5]} are in both the training ids and the validation ids of fold {fold} "
                             f"({splits_file}, {pool_file}). Fix: correct the split files")
    return {"train": sorted(train), "pool": sorted(pool), "val": sorted(val), "used": sorted(set(train + pool))}


def load_cases(dataset_name_or_id: Union[int, str], plans: str, configuration: str,
               case_ids: Sequence[str]) -> List[np.ndarray]:
    """Normalised image arrays ``(c, z, y, x)`` of exactly ``case_ids`` from the preprocessed folder."""
    name = dataset_name(dataset_name_or_id)
    folder = preprocessed_config_folder(name, plans, configuration)
    dataset = extension_dataset_class(name, plans, configuration)(folder, identifiers=list(case_ids))
    available = set(dataset.get_identifiers(folder))
    missing = [c for c in case_ids if c not in available]
    if missing:
        raise ExtensionError(f"cases {missing[:5]} of the split are not in {folder}. Fix: re-run "
                             f"nnUNetv2_plan_and_preprocess, or correct splits_final.json")
    return [np.asarray(dataset.load_case(c)[0][:], dtype=np.float32) for c in case_ids]


def scaled_shape(patch_size: Sequence[int], resolution: int, multiple: int) -> Tuple[Tuple[int, int], float]:
    """Model image shape for a 2D patch size: the patch scaled so its longer side is ``resolution``,
    each side rounded to a multiple of the UNet's down-sampling factor. Returns (shape, scale)."""
    if len(patch_size) != 2:
        raise ExtensionError(f"patch size {tuple(patch_size)} is not 2D. Fix: train the diffusion model on a 2d "
                             f"configuration (-c 2d)")
    scale = resolution / max(patch_size)
    shape = tuple(max(multiple, int(round(p * scale / multiple)) * multiple) for p in patch_size)
    return shape, scale  # type: ignore[return-value]


def to_slices(volumes: Sequence[np.ndarray], scale: float) -> List[torch.Tensor]:
    """Every z-slice ``(c, y, x)`` of every case, resized by ``scale`` (antialiased when shrinking)."""
    out = []
    for v in volumes:
        t = torch.from_numpy(np.ascontiguousarray(v)).permute(1, 0, 2, 3)  # (z, c, y, x)
        if abs(scale - 1) > 1e-6:
            size = [max(1, int(round(s * scale))) for s in t.shape[2:]]
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
        out.extend(t.unbind(0))
    return out


class SliceSampler:
    """Random crops of ``shape`` from the slices; a slice smaller than ``shape`` is centred and padded
    with ``pad_value`` (default -1, the lowest model-space intensity)."""

    def __init__(self, slices: Sequence[torch.Tensor], shape: Tuple[int, int], pad_value: float = -1.0):
        self.slices, self.shape, self.pad_value = list(slices), tuple(shape), float(pad_value)

    def batch(self, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
        out = torch.full((batch_size, self.slices[0].shape[0], *self.shape), self.pad_value)
        for b in range(batch_size):
            s = self.slices[int(rng.integers(len(self.slices)))]
            h, w = s.shape[1:]
            y = int(rng.integers(0, max(0, h - self.shape[0]) + 1))
            x = int(rng.integers(0, max(0, w - self.shape[1]) + 1))
            crop = s[:, y:y + self.shape[0], x:x + self.shape[1]]
            # centre a crop smaller than the target (image smaller than the patch)
            oy, ox = (self.shape[0] - crop.shape[1]) // 2, (self.shape[1] - crop.shape[2]) // 2
            out[b, :, oy:oy + crop.shape[1], ox:ox + crop.shape[2]] = crop
        return out
