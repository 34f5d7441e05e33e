"""Which preprocessed cases the diffusion model may see, and loading them as 2D training images.

Only training cases of the fold: ``splits_final.json[fold]['train']`` plus (by default) the fold's
``tskd_unlabeled_pool.json`` entry, whose cases are training cases whose labels are hidden. Never the
fold's ``val`` cases, never imagesTs (those are not in the preprocessed folder at all).

The split must exist (nothing here writes ``splits_final.json``), and :func:`held_out_training_ids`
compares a generator's recorded training ids with the *current* split (provenance check of sampling).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from tskd_nnunet.data.extension import ExtensionError, dataset_name, extension_dataset_class, preprocessed_config_folder
from tskd_nnunet.data.preprocessed_files import POOL_FILE, read_unlabeled_pool
from tskd_nnunet.data.splits import fold_cases, splits_path


def splits_file_of(dataset_name_or_id: Union[int, str]) -> str:
    return splits_path(os.path.join(os.environ["nnUNet_preprocessed"], dataset_name(dataset_name_or_id)))


def read_fold_split(dataset_name_or_id: Union[int, str], fold: int) -> Tuple[List[str], List[str], str]:
    """``(train, val, splits_file)`` of one fold of the dataset's existing ``splits_final.json``.

    Never writes a split: a missing file is an error naming the fix, so that no command silently
    fixes a split that a later label budget or ``nnUNetv2_train`` would replace."""
    name = dataset_name(dataset_name_or_id)
    if not isinstance(fold, int) and not str(fold).isdigit():
        raise ExtensionError(f"fold {fold!r}: the diffusion model is trained per cross-validation fold. "
                             f"Fix: pass an integer fold (0-4); 'all' has no held-out cases to protect")
    base = os.path.join(os.environ["nnUNet_preprocessed"], name)
    train, val = fold_cases(base, int(fold), None, ExtensionError,
                            f"run nnUNetv2_plan_and_preprocess then nnUNetv2_train once (it writes the split), or set "
                            f"a label budget with tskd_label_budget -d {name} --n-labeled N")
    return train, val, splits_path(base)


def fold_case_ids(dataset_name_or_id: Union[int, str], plans: str, configuration: str, fold: int,
                  include_unlabeled_pool: bool = True) -> Dict[str, List[str]]:
    """``{'train': [...], 'pool': [...], 'val': [...], 'used': sorted(train + pool)}`` for one fold.

    Reads the existing ``splits_final.json`` (and ``tskd_unlabeled_pool.json``); refuses when the split
    is missing instead of creating one (see :func:`read_fold_split`)."""
    name = dataset_name(dataset_name_or_id)
    base = os.path.join(os.environ["nnUNet_preprocessed"], name)
    train, val, splits_file = read_fold_split(name, fold)
    fold = int(fold)
    pool: List[str] = read_unlabeled_pool(base, fold) if include_unlabeled_pool else []
    pool_file = os.path.join(base, POOL_FILE)
    leaked = sorted(set(train + pool) & set(val))
    if leaked:
        raise ExtensionError(f"cases {leaked[:5]} are in both the training ids and the validation ids of fold {fold} "
                             f"({splits_file}, {pool_file}). Fix: correct the split files")
    return {"train": sorted(train), "pool": sorted(pool), "val": sorted(val), "used": sorted(set(train + pool))}


def imagests_case_ids(dataset_name_or_id: Union[int, str]) -> List[str]:
    """Case ids of the raw dataset's ``imagesTs`` (empty when nnUNet_raw or the folder is absent)."""
    from tskd_nnunet.data.transfer_set import raw_test_ids
    name = dataset_name(dataset_name_or_id)
    raw = os.environ.get("nnUNet_raw")
    dataset_json = os.path.join(os.environ["nnUNet_preprocessed"], name, "dataset.json")
    if not raw or not os.path.isfile(dataset_json):
        return []
    with open(dataset_json) as f:
        ending = json.load(f)["file_ending"]
    return sorted(raw_test_ids(os.path.join(raw, name), ending))


def held_out_training_ids(dataset_name_or_id: Union[int, str], fold: int,
                          generator_case_ids: Sequence[str]) -> Tuple[List[str], List[str], str]:
    """Which of a generator's training ids are validation cases of ``fold`` or test cases (imagesTs)
    of the *current* split: ``(val_hits, test_hits, splits_file)``; both empty = provenance ok."""
    _, val, splits_file = read_fold_split(dataset_name_or_id, fold)
    ids = set(generator_case_ids)
    return sorted(ids & set(val)), sorted(ids & set(imagests_case_ids(dataset_name_or_id))), splits_file


def provenance_message(what: str, fold: int, val_hits: Sequence[str], test_hits: Sequence[str],
                       splits_file: str, fix: str) -> str:
    """One line: ``what`` (a file) was trained on held-out cases of the current split, and the fix."""
    parts = []
    if val_hits:
        parts.append(f"{len(val_hits)} validation case(s) of fold {fold} in {splits_file} "
                     f"({', '.join(val_hits[:5])})")
    if test_hits:
        parts.append(f"{len(test_hits)} test case(s) in imagesTs ({', '.join(test_hits[:5])})")
    return (f"{what} comes from a generator trained on {' and '.join(parts)}: its images would leak held-out cases "
            f"into distillation (the split changed after the generator was trained). Fix: {fix}")


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
    each side rounded to a multiple of the UNet's down-sampling factor. Returns (shape, scale).
    ``resolution == max(patch_size)`` (the default) is the working resolution: scale 1, each side
    rounded up, so sampling only crops and never resamples."""
    if len(patch_size) != 2:
        raise ExtensionError(f"patch size {tuple(patch_size)} is not 2D. Fix: train the diffusion model on a 2d "
                             f"configuration (-c 2d)")
    scale = resolution / max(patch_size)
    if resolution == max(patch_size):
        # working resolution: no resampling; a side that is not a multiple is rounded *up* and the
        # sample is centre-cropped back to the patch size (pixels keep their size)
        return tuple(max(multiple, -(-int(p) // multiple) * multiple) for p in patch_size), 1.0  # type: ignore
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
