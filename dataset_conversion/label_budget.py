"""Label-budget splits: N labeled training cases per fold plus the unlabeled pool.

    python -m dataset_conversion.label_budget -d 505 --n-labeled 80 --folds 5 --seed 0 [--val-fraction 0.2]

Reads the case ids of ``$nnUNet_raw/DatasetXXX_*/imagesTr`` (works before preprocessing) and the
``case_patient_map.json`` the converters write (without it every case is its own patient). Per fold:

1. validation = one fold of a seeded K-fold partition of the training PATIENTS (or, with ``--val-fraction f``,
   round(f * #patients) patients starting at that fold's offset in the same shuffled list);
2. labeled = whole patients drawn (seeded) from the other training patients until the case count is as close
   to N as possible without splitting a patient (greedy fill up to N, then at most one patient more if that
   gets closer); the exact count is printed;
3. unlabeled pool = the remaining training cases (never validation cases, never test cases).

With ``--spread`` (slice datasets such as CHAOS, where one patient holds ~35 slices), step 2 draws single cases
instead of whole patients, one per patient in a seeded patient order, round after round, so N labeled slices come
from min(N, #patients) distinct patients; the other slices of those patients join the unlabeled pool (same
patients, never validation). Validation stays patient-level either way.

Writes ``$nnUNet_preprocessed/DatasetXXX_*/splits_final.json`` (nnU-Net's format) and
``tskd_unlabeled_pool.json`` (list per fold of case ids), both atomically.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from dataset_conversion.common import (ConversionError, converter_parser, find_dataset_folder,
                                       resolve_preprocessed_root, resolve_raw_root, run_cli)
from tskd_nnunet.atomic_io import atomic_path, atomic_write_json, read_json
# the split logic lives in the library (the benchmark runner uses it too); re-exported for callers of this module
from tskd_nnunet.data.label_budget import LabelBudgetError, make_label_budget_splits, read_training_cases
from tskd_nnunet.data.preprocessed_files import POOL_FILE
from tskd_nnunet.data.splits import SPLITS_FILE


def write_label_budget(dataset_id: int, n_labeled: int, num_folds: int = 5, seed: int = 0,
                       val_fraction: Optional[float] = None, raw_root: Optional[str] = None,
                       preprocessed_root: Optional[str] = None, verbose: bool = True,
                       spread: bool = False) -> List[Dict[str, List[str]]]:
    """Write splits_final.json and tskd_unlabeled_pool.json for ``dataset_id``; return the splits."""
    raw_folder = find_dataset_folder(resolve_raw_root(raw_root, "--raw-root"), dataset_id)
    try:
        cases, patient_of = read_training_cases(raw_folder)
        splits, pools = make_label_budget_splits(cases, patient_of, n_labeled, num_folds, seed, val_fraction, spread)
    except LabelBudgetError as e:
        raise ConversionError(str(e)) from None
    out = resolve_preprocessed_root(preprocessed_root) / raw_folder.name
    out.mkdir(parents=True, exist_ok=True)
    replaced = _keep_previous(out, splits, pools, raw_folder.name)
    atomic_write_json(out / SPLITS_FILE, splits)
    atomic_write_json(out / POOL_FILE, pools)
    if replaced:
        print(replaced)
    if verbose:
        for k, (s, p) in enumerate(zip(splits, pools)):
            n_pat = len({patient_of[c] for c in s["train"]})
            print(f"fold {k}: {len(s['train'])} labeled cases ({n_pat} patients; asked {n_labeled}), "
                  f"{len(s['val'])} val, {len(p)} unlabeled pool")
        print(f"wrote {out / SPLITS_FILE} and {out / POOL_FILE}")
    return splits


def _labeled_per_fold(splits: Sequence) -> str:
    """'4' when every fold has 4 labeled cases, else '3-5'; '?' for a file that is not nnU-Net's format."""
    try:
        counts = [len(s["train"]) for s in splits]
    except (TypeError, KeyError):
        return "?"
    if not counts:
        return "0"
    return str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _keep_previous(out: Path, splits: List[Dict[str, List[str]]], pools: List[List[str]],
                   dataset_name: str) -> Optional[str]:
    """Before splits_final.json / the pool are replaced by different ones: copy both to ``*.previous.json``
    and return the line that says what was replaced (None when nothing is or the splits are the same).
    Models trained on the previous splits saw other labeled cases, so existing fold folders are counted."""
    target = out / SPLITS_FILE
    if not target.is_file():
        return None
    old = read_json(target, default=None)
    old_pools = read_json(out / POOL_FILE, default=None)
    if old == splits and old_pools == pools:
        print(f"unchanged: {target} already holds these splits")
        return None
    kept = out / "splits_final.previous.json"
    for src, dst in ((target, kept), (out / POOL_FILE, out / POOL_FILE.replace(".json", ".previous.json"))):
        if src.is_file():
            with atomic_path(dst) as tmp:  # a kill mid-copy leaves the earlier backup, never half a file
                shutil.copyfile(src, tmp)
    n_old_folds = len(old) if isinstance(old, list) else "?"
    line = (f"replaced {target}: {_labeled_per_fold(old) if old is not None else '? (unreadable)'} -> "
            f"{_labeled_per_fold(splits)} labeled cases per fold ({n_old_folds} -> {len(splits)} folds"
            f"{'' if old_pools is not None else '; no unlabeled pool before: nnU-Net own split?'})"
            f"; previous splits kept in {kept}")
    results = os.environ.get("nnUNet_results")
    folds = sorted(Path(results, dataset_name).glob("*/fold_*")) if results else []
    if folds:
        line += (f"; {len(folds)} fold folder(s) under {Path(results, dataset_name)} may have been "
                 f"trained on the previous splits: retrain them for this budget")
    return line


def _main(argv: Optional[Sequence[str]] = None) -> None:
    p = converter_parser("tskd_label_budget", __doc__)
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id")
    p.add_argument("--n-labeled", type=int, default=None, help="labeled training cases per fold (required)")
    p.add_deprecated_alias("-n", "n_labeled", "--n-labeled", type=int)
    p.require("n_labeled", "--n-labeled")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="validation patients as a fraction of all training patients (default: one fold, 1/folds)")
    p.add_argument("--spread", action="store_true",
                   help="draw single cases (slices) from as many distinct patients as possible instead of whole "
                        "patients; the rest of their slices join the unlabeled pool")
    p.add_argument("--raw-root", default=None, help="default: $nnUNet_raw")
    p.add_argument("--preprocessed-root", default=None, help="default: $nnUNet_preprocessed")
    a = p.parse_args(argv)
    write_label_budget(a.dataset_id, a.n_labeled, a.folds, a.seed, a.val_fraction, a.raw_root, a.preprocessed_root,
                       spread=a.spread)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
