"""Pooled pretraining corpus: 2D images from one or more preprocessed nnU-Net datasets.

Which cases (per dataset):
- every case of the configuration's preprocessed folder (nnU-Net's training cases, labeled or in the
  unlabeled pool; their labels are never read), minus
  - the validation cases of ``fold`` when a fold is given (splits_final.json, or nnU-Net's own seeded
    5-fold split when that file does not exist yet): an honest benchmark pretrains the foundation of
    fold k on fold k's training cases only;
  - the unlabeled-pool cases (tskd_unlabeled_pool.json) when ``include_pool=False``;
- plus the extension cases (``tskd_extension/<plans>_<configuration>/fold_<k>/<source>/``, sources
  ``synthetic`` and/or ``unlabeled``) of that fold, or of every fold when no fold is given.
A case whose id is in the raw dataset's ``imagesTs`` (a test case) is a hard error: test cases must
never reach a pretraining corpus.

Resize/channel policy (documentation/pretraining.md):
- ``mode='resize'`` (ViTs, pooled modalities): pad the slice to a square with 0 (the z-score mean) and
  resize bilinearly to ``resolution`` x ``resolution``; every dataset lands on the same grid.
- ``mode='crop'`` (CNN student): a random crop of ``resolution`` at nnU-Net's own spacing (padded with 0
  when the slice is smaller), as nnU-Net's patches are.
- channels: C == in_chans as is; otherwise every channel is the mean of the C channels (1 -> repeated
  x3): exactly the initial map of the teacher's ViTInputAdapter, so the foundation sees at pretraining
  what the teacher feeds it at the start of fine-tuning.
- 3D configurations: a random slice along the first spatial axis (nnU-Net puts the out-of-plane
  axis first, so this is the axial slice for axial CT/MR).
Intensities are already normalised by nnU-Net (z-score or CT clipping + z-score).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from tskd_nnunet.atomic_io import read_json
from tskd_nnunet.data.preprocessed_files import dataset_class_for, read_unlabeled_pool
from tskd_nnunet.data.extension import (SOURCES, ExtensionError, extension_folder, extension_root,
                                        list_extension_cases, preprocessed_config_folder)
from tskd_nnunet.data.splits import fold_cases



class PretrainError(ValueError):
    """Pretraining cannot start or resume as asked (corpus, plans, run folder); the message names the dataset or
    file and the fix."""


@dataclass
class CorpusSource:
    """The cases of one folder of one dataset."""
    dataset: str
    folder: str
    kind: str  # 'preprocessed' or an extension source name
    identifiers: List[str]


def _env_root(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise PretrainError(f"{name} is not set. Fix: export {name}=/path/to/{name}")
    return value


def resolve_dataset_name(dataset: Union[int, str], preprocessed_root: str, raw_root: Optional[str] = None) -> str:
    """``501`` / ``"501"`` / ``"Dataset501_HC18"`` -> ``"Dataset501_HC18"``, looked up in the given roots
    (not in nnunetv2.paths, which is frozen at import time)."""
    text = str(dataset)
    if text.startswith("Dataset"):
        return text
    try:
        prefix = f"Dataset{int(text):03d}_"
    except ValueError:
        raise PretrainError(f"dataset {text!r} is neither an id nor a DatasetXXX_Name. Fix: e.g. -d 501") from None
    for root in (preprocessed_root, raw_root):
        if root and os.path.isdir(root):
            found = sorted(n for n in os.listdir(root) if n.startswith(prefix))
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise PretrainError(f"dataset id {text} is ambiguous in {root}: {found}. Fix: pass the full name")
    raise PretrainError(f"dataset {text} not found in {preprocessed_root}. Fix: nnUNetv2_plan_and_preprocess -d {text}")


def raw_test_ids(raw_dataset_folder: str, file_ending: str) -> List[str]:
    """Case ids in the raw dataset's ``imagesTs`` (channel suffix ``_XXXX`` and file ending removed)."""
    folder = os.path.join(raw_dataset_folder, "imagesTs")
    if not os.path.isdir(folder):
        return []
    pattern = re.compile(r"^(.*)_\d{4}" + re.escape(file_ending) + "$")
    return sorted({m.group(1) for m in (pattern.match(n) for n in os.listdir(folder)) if m})


def fold_validation_ids(preprocessed_base: str, all_ids: Sequence[str], fold: int) -> List[str]:
    """Validation ids of ``fold``: splits_final.json, or nnU-Net's own seeded split if the file is absent."""
    return fold_cases(preprocessed_base, fold, all_ids, PretrainError,
                      "pass a fold (-f / FOLD) of the split, or rewrite it with tskd_label_budget")[1]


class PretrainCorpus(torch.utils.data.IterableDataset):
    """An endless stream of ``(in_chans, H, W)`` float32 slices drawn uniformly over all cases
    (``balance='case'``) or first uniformly over datasets (``balance='dataset'``)."""

    def __init__(self, datasets: Sequence[Union[int, str]], configuration: str = "2d", plans: str = "nnUNetPlans",
                 fold: Optional[int] = None, include_pool: bool = True,
                 extensions: Sequence[str] = ("synthetic", "unlabeled"),
                 resolution: Union[int, Tuple[int, int]] = 128, mode: str = "resize", in_chans: int = 3,
                 balance: str = "case", seed: int = 0, raw_root: Optional[str] = None,
                 preprocessed_root: Optional[str] = None) -> None:
        super().__init__()
        if not datasets:
            raise PretrainError("no dataset given. Fix: pass at least one dataset id, e.g. -d 501")
        if mode not in ("resize", "crop"):
            raise PretrainError(f"mode {mode!r} unknown. Fix: use 'resize' or 'crop'")
        if balance not in ("case", "dataset"):
            raise PretrainError(f"balance {balance!r} unknown. Fix: use 'case' or 'dataset'")
        bad = [e for e in extensions if e not in SOURCES]
        if bad:
            raise PretrainError(f"unknown extension source(s) {bad}. Fix: use any of {', '.join(SOURCES)}")
        self.resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(int(r) for r in resolution)
        self.mode, self.in_chans, self.balance, self.seed = mode, int(in_chans), balance, int(seed)
        self.configuration, self.plans, self.fold = configuration, plans, fold
        self.raw_root = raw_root or _env_root("nnUNet_raw")
        self.preprocessed_root = preprocessed_root or _env_root("nnUNet_preprocessed")
        self.sources: List[CorpusSource] = []
        for d in datasets:
            self.sources.extend(self._collect(d, include_pool, extensions))
        self.cases: List[Tuple[int, str]] = [(si, i) for si, s in enumerate(self.sources) for i in s.identifiers]
        if not self.cases:
            raise PretrainError(f"the corpus of datasets {list(datasets)} ({configuration}, fold {fold}) is empty. "
                                      f"Fix: run nnUNetv2_plan_and_preprocess -c {configuration} for them")
        self._datasets = sorted({s.dataset for s in self.sources})
        self._loaders: Dict[int, object] = {}
        self._handles: Dict[Tuple[int, str], object] = {}

    # ------------------------------------------------------------------ listing
    def _collect(self, dataset: Union[int, str], include_pool: bool, extensions: Sequence[str]) -> List[CorpusSource]:
        old = os.environ.get("nnUNet_preprocessed")
        os.environ["nnUNet_preprocessed"] = self.preprocessed_root  # the extension helpers read it
        try:
            name = resolve_dataset_name(dataset, self.preprocessed_root, self.raw_root)
            folder = preprocessed_config_folder(name, self.plans, self.configuration)
            ext_root = extension_root(name, self.plans, self.configuration)
            ext_folders = []
            for source in extensions:
                folds = [self.fold] if self.fold is not None else sorted(
                    n[5:] for n in (os.listdir(ext_root) if os.path.isdir(ext_root) else []) if n.startswith("fold_"))
                ext_folders += [(source, extension_folder(name, self.plans, self.configuration, f, source)) for f in folds]
        except ExtensionError as e:
            raise PretrainError(str(e)) from None
        finally:
            if old is None:
                os.environ.pop("nnUNet_preprocessed", None)
            else:
                os.environ["nnUNet_preprocessed"] = old
        base = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise PretrainError(f"{folder} does not exist. Fix: nnUNetv2_plan_and_preprocess -d {dataset} "
                                      f"-c {self.configuration}")
        ids = sorted(dataset_class_for(folder, "rerun nnUNetv2_plan_and_preprocess for it").get_identifiers(folder))
        excluded = set()
        if self.fold is not None:
            excluded |= set(fold_validation_ids(base, ids, self.fold))
        if not include_pool:
            excluded |= set(read_unlabeled_pool(base, self.fold))
        sources = [CorpusSource(name, folder, "preprocessed", [i for i in ids if i not in excluded])]
        for source, f in ext_folders:
            ext_ids = list_extension_cases(f)
            if ext_ids:
                sources.append(CorpusSource(name, f, source, ext_ids))
        self._check_no_test_cases(name, base, sources)
        return sources

    def _check_no_test_cases(self, name: str, preprocessed_base: str, sources: List[CorpusSource]) -> None:
        raw_folder = os.path.join(self.raw_root, name)
        if not os.path.isdir(raw_folder):
            raise PretrainError(f"raw dataset {raw_folder} not found, so its test cases (imagesTs) cannot be "
                                      f"kept out of the corpus. Fix: set nnUNet_raw to the folder holding {name}")
        ending = read_json(os.path.join(preprocessed_base, "dataset.json"), error=PretrainError,
                           fix="rerun nnUNetv2_plan_and_preprocess")["file_ending"]
        test = set(raw_test_ids(raw_folder, ending))
        for s in sources:
            leaked = [i for i in s.identifiers if i in test]
            if leaked:
                raise PretrainError(
                    f"{name}: case {leaked[0]!r} (in {s.folder}) is a test case (in {raw_folder}/imagesTs); test cases "
                    f"must never be in a pretraining corpus. Fix: remove it from the training data and re-preprocess")

    # ------------------------------------------------------------------ reading
    def summary(self) -> Dict[str, Dict[str, int]]:
        """{dataset: {source kind: number of cases}} for the checkpoint metadata and the log."""
        out: Dict[str, Dict[str, int]] = {}
        for s in self.sources:
            out.setdefault(s.dataset, {})
            out[s.dataset][s.kind] = out[s.dataset].get(s.kind, 0) + len(s.identifiers)
        return out

    def __len__(self) -> int:
        return len(self.cases)

    def _load(self, si: int, identifier: str) -> np.ndarray:
        loader = self._loaders.get(si)
        if loader is None:
            src = self.sources[si]
            loader = self._loaders[si] = dataset_class_for(src.folder, "rerun nnUNetv2_plan_and_preprocess for it")(src.folder, identifiers=list(src.identifiers))
        key = (si, identifier)
        data = self._handles.get(key)
        if data is None:
            data = loader.load_case(identifier)[0]
            # blosc2 handles and memory-maps read lazily: keep them (reopening costs more than a slice);
            # arrays fully loaded from .npz are not kept, so memory stays bounded on big datasets
            if not isinstance(data, np.ndarray) or isinstance(data, np.memmap):
                self._handles[key] = data
        return data

    def _pick(self, rng: np.random.Generator) -> Tuple[int, str]:
        if self.balance == "dataset":
            d = self._datasets[rng.integers(len(self._datasets))]
            candidates = [c for c in self.cases if self.sources[c[0]].dataset == d]
            return candidates[rng.integers(len(candidates))]
        return self.cases[rng.integers(len(self.cases))]

    def sample(self, rng: np.random.Generator) -> torch.Tensor:
        """One slice, ``(in_chans, H, W)`` float32, following the resize/channel policy."""
        si, identifier = self._pick(rng)
        data = self._load(si, identifier)  # (C, Z, Y, X); Z == 1 for 2D images
        z = int(rng.integers(data.shape[1]))
        if self.mode == "crop":
            h, w = self.resolution
            y0 = int(rng.integers(max(1, data.shape[2] - h + 1)))
            x0 = int(rng.integers(max(1, data.shape[3] - w + 1)))
            img = torch.from_numpy(np.ascontiguousarray(data[:, z, y0:y0 + h, x0:x0 + w], dtype=np.float32))
            img = F.pad(img, (0, w - img.shape[2], 0, h - img.shape[1]))
        else:
            img = torch.from_numpy(np.ascontiguousarray(data[:, z], dtype=np.float32))
            side = max(img.shape[1:])
            py, px = side - img.shape[1], side - img.shape[2]
            img = F.pad(img, (px // 2, px - px // 2, py // 2, py - py // 2))
            if (side, side) != self.resolution:
                img = F.interpolate(img[None], size=self.resolution, mode="bilinear", align_corners=False,
                                    antialias=side > min(self.resolution))[0]
        return map_channels(img, self.in_chans)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info is not None else 0])
        while True:
            yield self.sample(rng)

    def batch(self, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
        """``(B, in_chans, H, W)`` drawn in this process (the pretraining loop's default reader)."""
        return torch.stack([self.sample(rng) for _ in range(batch_size)])


def map_channels(img: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Channel policy, the same map the teacher's ViTInputAdapter starts from: C == in_chans kept as is;
    otherwise every output channel is the mean of the C input channels (1 channel -> repeated x3)."""
    if img.shape[0] == in_chans:
        return img
    return img.mean(dim=0, keepdim=True).expand(in_chans, -1, -1).contiguous()
