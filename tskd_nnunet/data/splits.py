"""``splits_final.json``: nnU-Net's cross-validation split, read (and written) here for every caller.

nnU-Net's semantics (``nnUNetTrainer.do_split``): the file beside the preprocessed data is a list with one
``{"train": [...], "val": [...]}`` per fold; without it nnU-Net makes five folds of the sorted case ids (seed
12345); fold ``"all"`` trains and validates on every case. One difference, on purpose: a fold beyond the
file's is an error here, where nnU-Net would draw a random 80:20 split that ignores the label budget.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

from tskd_nnunet.atomic_io import atomic_write_json, read_json

SPLITS_FILE = "splits_final.json"
NNUNET_FOLDS, NNUNET_SEED = 5, 12345  # nnU-Net's split when there is no file
_FIX = "rewrite it with tskd_label_budget (or delete it: nnU-Net makes its own 5 folds)"

Splits = List[Dict[str, List[str]]]


class SplitsError(ValueError):
    """``splits_final.json`` is missing where it must exist, malformed, or lacks the fold; one line with the fix."""


def splits_path(preprocessed_base: str) -> str:
    """``splits_final.json`` of a dataset folder of nnUNet_preprocessed."""
    return os.path.join(preprocessed_base, SPLITS_FILE)


def read_splits(preprocessed_base: str, error: Type[Exception] = SplitsError, fix: str = _FIX) -> Optional[Splits]:
    """The folds of the dataset's ``splits_final.json``, None when there is none."""
    path = splits_path(preprocessed_base)
    if not os.path.isfile(path):
        return None
    splits = read_json(path, error=error, fix=fix)
    if not isinstance(splits, list) or not all(isinstance(s, dict) and isinstance(s.get("train"), list)
                                               and isinstance(s.get("val"), list) for s in splits):
        raise error(f"{path} is not nnU-Net's format (a list of {{\"train\": [...], \"val\": [...]}} per fold). "
                    f"Fix: {fix}")
    return [{"train": [str(i) for i in s["train"]], "val": [str(i) for i in s["val"]]} for s in splits]


def nnunet_default_splits(case_ids: Sequence[str]) -> Splits:
    """The five folds nnU-Net writes when a dataset has no ``splits_final.json``."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    return generate_crossval_split(sorted(case_ids), seed=NNUNET_SEED, n_splits=NNUNET_FOLDS)


def num_folds(preprocessed_base: str, error: Type[Exception] = SplitsError, fix: str = _FIX) -> int:
    """Folds of the file, or nnU-Net's five when there is none."""
    splits = read_splits(preprocessed_base, error, fix)
    return NNUNET_FOLDS if splits is None else len(splits)


def fold_cases(preprocessed_base: str, fold: Union[int, str], case_ids: Optional[Sequence[str]] = None,
               error: Type[Exception] = SplitsError, fix: str = _FIX) -> Tuple[List[str], List[str]]:
    """``(train, val)`` of ``fold`` as nnU-Net's trainer sees them. ``case_ids`` (every preprocessed case) stand in
    for a missing file (nnU-Net's own split) and make fold ``"all"``; without them both are errors naming ``fix``."""
    path = splits_path(preprocessed_base)
    if str(fold) == "all":
        if case_ids is None:
            raise error(f"fold 'all' has no held-out cases to name. Fix: pass an integer fold")
        return sorted(case_ids), sorted(case_ids)
    if not str(fold).isdigit():
        raise error(f"fold {fold!r} is not a fold number (0, 1, ...) or 'all'. Fix: name a fold of {path}")
    splits = read_splits(preprocessed_base, error, fix)
    if splits is None:
        if case_ids is None:
            raise error(f"{path} does not exist, so the fold's training/validation cases are unknown. Fix: {fix}")
        splits = nnunet_default_splits(case_ids)
    if int(fold) >= len(splits):
        raise error(f"fold {fold} does not exist in {path} ({len(splits)} folds). Fix: pass a fold in "
                    f"0..{len(splits) - 1}, or {fix}")
    return list(splits[int(fold)]["train"]), list(splits[int(fold)]["val"])


def write_splits(preprocessed_base: str, splits: Splits) -> bool:
    """Write ``splits_final.json`` atomically unless it holds these splits already; True when written."""
    path = splits_path(preprocessed_base)
    if read_json(path, None) == splits:
        return False
    atomic_write_json(path, splits)
    return True
