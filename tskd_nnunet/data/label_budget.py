"""Label-budget splits of a raw nnU-Net dataset: N labeled training cases per fold plus the unlabeled pool.

The split logic itself (pure: case ids in, splits out), shared by ``tskd_label_budget`` (dataset_conversion/
label_budget.py, which writes the files; its docstring tells the rules) and the benchmark runner, which plans every
budget of a config from one partition. Files: ``splits_final.json`` through tskd_nnunet.data.splits.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tskd_nnunet.atomic_io import read_json

CASE_PATIENT_MAP = "case_patient_map.json"  # {case: patient}, written by the converters beside dataset.json


class LabelBudgetError(ValueError):
    """The dataset or the budget does not allow the split; one line with the fix."""


def read_training_cases(raw_folder: Path) -> Tuple[List[str], Dict[str, str]]:
    """Case ids in imagesTr and their patient ids (from case_patient_map.json, else the case itself)."""
    ds_json = raw_folder / "dataset.json"
    if not ds_json.is_file():
        raise LabelBudgetError(f"missing file {ds_json}: convert the dataset first")
    ending = read_json(ds_json, error=LabelBudgetError, fix="convert the dataset again")["file_ending"]
    suffix = "_0000" + ending
    cases = sorted(p.name[: -len(suffix)] for p in (raw_folder / "imagesTr").iterdir() if p.name.endswith(suffix))
    if not cases:
        raise LabelBudgetError(f"no *{suffix} files in {raw_folder / 'imagesTr'}: convert the dataset first")
    map_file = raw_folder / CASE_PATIENT_MAP
    if map_file.is_file():
        mapping = read_json(map_file, error=LabelBudgetError, fix="convert the dataset again, or delete the file "
                                                                     "to treat every case as its own patient")
        missing = [c for c in cases if c not in mapping]
        if missing:
            raise LabelBudgetError(f"case {missing[0]} is not in {map_file}: add it ({{case: patient}}) or "
                                  f"delete the file to treat every case as its own patient")
        patient_of = {c: str(mapping[c]) for c in cases}
    else:
        patient_of = {c: c for c in cases}
    return cases, patient_of


def _draw_labeled(patients: List[str], cases_of: Dict[str, List[str]], n: int, rng: random.Random) -> List[str]:
    order = list(patients)
    rng.shuffle(order)
    chosen, count = [], 0
    for p in order:  # greedy fill without passing n
        if count + len(cases_of[p]) <= n:
            chosen.append(p)
            count += len(cases_of[p])
        if count == n:
            break
    if count < n:  # one more patient if overshooting gets closer to n than stopping short
        rest = [p for p in order if p not in chosen]
        if rest:
            best = min(rest, key=lambda p: len(cases_of[p]))
            if not chosen or count + len(cases_of[best]) - n < n - count:  # never zero labeled cases
                chosen.append(best)
    return chosen


def _draw_spread(patients: List[str], cases_of: Dict[str, List[str]], n: int, rng: random.Random) -> List[str]:
    """n single cases, one per patient per round (seeded patient and case order): as many patients as possible."""
    order = list(patients)
    rng.shuffle(order)
    queues = {p: rng.sample(cases_of[p], len(cases_of[p])) for p in order}
    chosen: List[str] = []
    while len(chosen) < n:
        for p in order:
            if queues[p] and len(chosen) < n:
                chosen.append(queues[p].pop())
    return chosen


def make_label_budget_splits(cases: Sequence[str], patient_of: Dict[str, str], n_labeled: int, num_folds: int,
                             seed: int, val_fraction: Optional[float] = None, spread: bool = False
                             ) -> Tuple[List[Dict[str, List[str]]], List[List[str]]]:
    """Pure split logic: returns (splits [{'train', 'val'}] per fold, unlabeled pool per fold)."""
    if n_labeled < 1:
        raise LabelBudgetError(f"--n-labeled {n_labeled}: the label budget must be at least 1 case")
    if num_folds < 1:
        raise LabelBudgetError(f"--folds {num_folds} must be at least 1")
    if num_folds == 1 and val_fraction is None:
        val_fraction = 0.2
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise LabelBudgetError(f"--val-fraction {val_fraction} must be in (0, 1)")
    cases_of: Dict[str, List[str]] = {}
    for c in cases:
        cases_of.setdefault(patient_of[c], []).append(c)
    patients = sorted(cases_of)
    if len(patients) < max(2, num_folds):
        raise LabelBudgetError(f"only {len(patients)} training patient(s): need at least {max(2, num_folds)} "
                              f"for {num_folds} fold(s) with a validation set")
    rng = random.Random(seed)
    shuffled = list(patients)
    rng.shuffle(shuffled)
    n_pat = len(shuffled)
    bounds = [round(k * n_pat / num_folds) for k in range(num_folds + 1)]
    splits, pools = [], []
    for k in range(num_folds):
        if val_fraction is None:
            val_p = shuffled[bounds[k]:bounds[k + 1]]
        else:
            n_val = min(max(1, round(val_fraction * n_pat)), n_pat - 1)
            val_p = [shuffled[(bounds[k] + i) % n_pat] for i in range(n_val)]
        val_set = set(val_p)
        train_p = [p for p in patients if p not in val_set]
        available = sum(len(cases_of[p]) for p in train_p)
        if n_labeled > available:
            raise LabelBudgetError(f"label budget {n_labeled} exceeds the {available} training cases outside "
                                  f"validation in fold {k}: choose a smaller --n-labeled or fewer --folds")
        fold_rng = random.Random(f"{seed}-{k}")
        if spread:
            train = sorted(_draw_spread(train_p, cases_of, n_labeled, fold_rng))
        else:
            train = sorted(c for p in _draw_labeled(train_p, cases_of, n_labeled, fold_rng) for c in cases_of[p])
        labeled = set(train)
        val = sorted(c for p in val_p for c in cases_of[p])
        pool = sorted(c for p in train_p for c in cases_of[p] if c not in labeled)
        splits.append({"train": train, "val": val})
        pools.append(pool)
    return splits, pools
