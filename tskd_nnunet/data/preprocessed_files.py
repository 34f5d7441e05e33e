"""Reading our files beside nnU-Net's preprocessed data, one implementation for every reader
(transfer set, pretraining corpus, diffusion training).

- ``tskd_unlabeled_pool.json`` (written by dataset_conversion/label_budget.py): one list of case
  ids per fold, the training cases whose labels distillation and pretraining may not use.
- ``tskd_targets/`` (tskd_nnunet/distill/target_cache.py): the teachers' cached probabilities per case.
- ``tskd_extension/`` (tskd_nnunet/data/extension.py): synthetic and extra unlabeled cases per plans, configuration
  and fold.
- the nnU-Net dataset class (Blosc2 or Numpy) of a folder, from the file endings it holds.
"""
from __future__ import annotations

import os
from typing import List, Optional, Type, Union

from tskd_nnunet.atomic_io import read_json

POOL_FILE = "tskd_unlabeled_pool.json"
TARGETS_DIR = "tskd_targets"
EXTENSION_DIR = "tskd_extension"
_REWRITE = "Fix: rewrite it with dataset_conversion/label_budget.py"


class PreprocessedFileError(ValueError):
    """A file beside the preprocessed data is missing parts or malformed; the message names it and the fix."""


def read_unlabeled_pool(preprocessed_base: str, fold: Optional[Union[int, str]]) -> List[str]:
    """Pool ids of ``fold``; of every fold when ``fold`` is None; [] for fold 'all' or without the file."""
    path = os.path.join(preprocessed_base, POOL_FILE)
    if not os.path.isfile(path) or fold == "all":
        return []
    pools = read_json(path, error=PreprocessedFileError, fix="rewrite it with dataset_conversion/label_budget.py")
    if not isinstance(pools, list) or not all(isinstance(p, list) for p in pools):
        raise PreprocessedFileError(f"{path} must be a list with one list of case ids per fold. {_REWRITE}")
    if fold is None:
        return sorted({str(i) for p in pools for i in p})
    if int(fold) >= len(pools):
        raise PreprocessedFileError(f"{path} has {len(pools)} folds, fold {fold} was requested. {_REWRITE} "
                                    f"for this fold")
    return [str(i) for i in pools[int(fold)]]


def dataset_class_for(folder: str, fix: str) -> Type:
    """nnU-Net's dataset class for ``folder`` by its file endings (manifest.json and the like ignored)."""
    from nnunetv2.training.dataloading.nnunet_dataset import file_ending_dataset_mapping

    endings = {name.rsplit(".", 1)[-1] for name in os.listdir(folder) if "." in name}
    found = [e for e in file_ending_dataset_mapping if e in endings]
    if len(found) != 1:
        raise PreprocessedFileError(f"{folder} holds {'no' if not found else 'mixed'} nnU-Net preprocessed files "
                                    f"({', '.join(sorted(endings)) or 'empty'}). Fix: {fix}")
    return file_ending_dataset_mapping[found[0]]
