"""``tskd_cache_targets``: compute a student's cached teacher targets ahead of training.

    tskd_cache_targets DATASET CONFIGURATION FOLD [-tr DistillTrainer] [-p nnUNetPlans] [-t TEACHER ...] [-device cpu]
                       [--from_predictions FOLDER]

Builds exactly the cache ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr DistillTrainer`` would build on its
first start (same transfer set, same key), e.g. on a GPU machine before CPU training, or with several
teachers (``-t LiteMedSAMTeacherTrainer TSKDPlainTrainer``: probabilities averaged, an ensemble). With
``--from_predictions FOLDER`` the cases the teacher already predicted (``nnUNetv2_predict -i imagesTr -o FOLDER -tr
TEACHER --save_probabilities``) are converted back to nnU-Net's preprocessed geometry instead of recomputed.

Errors are one line on stderr (``tskd_cache_targets: error: ...``, exit 2), and a failed call leaves nothing in
the student's results folder (nnU-Net's trainer writes its fold folder and a log when it is created: removed
again).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import List, Optional, Union

PROG = "tskd_cache_targets"


class CacheCommandError(Exception):
    """Bad command-line input; the message names it and the fix."""


def parse_fold(value: str) -> Union[int, str]:
    if value == "all":
        return value
    try:
        fold = int(value)
    except ValueError:
        fold = -1
    if fold < 0:
        raise CacheCommandError(f"fold {value!r} is not a fold number (0, 1, 2, ...) or 'all'. Fix: name a fold of "
                                f"splits_final.json, e.g. {PROG} DATASET CONFIGURATION 0")
    return fold


def check_fold_exists(preprocessed_base: str, fold: Union[int, str]) -> None:
    """The fold must be one of splits_final.json (nnU-Net makes 5 when there is none): for another one nnU-Net
    would draw a random 80:20 split, which ignores the label budget."""
    from tskd_nnunet.data.splits import num_folds, splits_path

    if fold == "all":
        return
    n = num_folds(preprocessed_base, CacheCommandError, "rewrite it with tskd_label_budget")
    if int(fold) >= n:
        where = (f"{splits_path(preprocessed_base)} has" if os.path.isfile(splits_path(preprocessed_base)) else
                 f"there is no {splits_path(preprocessed_base)} yet, so nnU-Net will make")
        raise CacheCommandError(f"fold {fold} does not exist: {where} {n} fold(s) (0-{n - 1}). Fix: name one of "
                                f"them (or make the splits first: tskd_label_budget)")


def _new_results_paths(fold_dir: str) -> List[str]:
    """The folders that creating a trainer for ``fold_dir`` would add (missing now; outermost first)."""
    chain, d = [], fold_dir
    for _ in range(3):  # <results>/DatasetXXX/<trainer>__<plans>__<configuration>/fold_<k>
        if not os.path.isdir(d):
            chain.insert(0, d)
        d = os.path.dirname(d)
    return chain


def _remove_what_we_added(fold_dir: str, missing_before: List[str], logs_before: set) -> None:
    """Undo the student trainer's start: its new training logs, then the folders it created, if empty."""
    for log in set(glob.glob(os.path.join(fold_dir, "training_log_*.txt"))) - logs_before:
        os.remove(log)
    for d in reversed(missing_before):
        try:
            os.rmdir(d)
        except OSError:  # not empty (something else was written there) or already gone: leave it
            pass


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration")
    p.add_argument("fold")
    p.add_argument("-tr", default="DistillTrainer", help="the student trainer whose cache to build (DistillTrainer)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (nnUNetPlans)")
    p.add_argument("-t", nargs="+", default=None, help="teacher trainer(s); default TSKD_TEACHER_TRAINER or the "
                                                        "student's default (LiteMedSAMTeacherTrainer)")
    p.add_argument("-device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--from_predictions", default=None, metavar="FOLDER",
                   help="take cases from the teacher's own `nnUNetv2_predict ... --save_probabilities` output "
                        "(predict imagesTr with the one teacher named by -t, mirroring on unless TSKD_TEACHER_TTA=0); "
                        "cases not found there are computed")
    a = p.parse_args(argv)
    try:
        fold = parse_fold(a.fold)
        if a.from_predictions and not os.path.isdir(a.from_predictions):
            raise CacheCommandError(f"--from_predictions {a.from_predictions}: no such folder. Fix: pass the -o "
                                    f"folder of the teacher's nnUNetv2_predict ... --save_probabilities")
    except CacheCommandError as e:
        _fail(e)
    if a.t:
        os.environ["TSKD_TEACHER_TRAINER"] = ",".join(a.t)
    os.environ["TSKD_KD_MODE"] = "cached"
    import torch
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from tskd_nnunet.trainers.base import is_one_line_error

    try:
        try:
            dataset_name = maybe_convert_to_dataset_name(a.dataset_name_or_id)
            fold_dir = get_output_folder(dataset_name, a.tr, a.p, a.configuration, fold)
            preprocessed_base = os.path.join(os.fspath(nnUNet_preprocessed), dataset_name)
        except (RuntimeError, TypeError, ValueError) as e:  # unknown dataset, nnUNet_* unset
            raise CacheCommandError(f"{' '.join(str(e).split())}. Fix: check DATASET and nnUNet_raw / "
                                    f"nnUNet_preprocessed / nnUNet_results") from None
        check_fold_exists(preprocessed_base, fold)
    except CacheCommandError as e:
        _fail(e)
    missing_before = _new_results_paths(fold_dir)
    logs_before = set(glob.glob(os.path.join(fold_dir, "training_log_*.txt")))
    try:
        trainer = get_trainer_from_args(a.dataset_name_or_id, a.configuration, fold, a.tr, a.p,
                                        device=torch.device(a.device))
        if not hasattr(trainer, "build_target_cache"):
            raise CacheCommandError(f"-tr {a.tr} is not a distillation trainer. Fix: -tr DistillTrainer (or a variant)")
        folder = trainer.build_target_cache(a.from_predictions)
    except BaseException as e:  # a failed call leaves nothing in the student's results folder
        _remove_what_we_added(fold_dir, missing_before, logs_before)
        if isinstance(e, CacheCommandError) or is_one_line_error(e):
            _fail(e)
        raise
    print(f"teacher targets ready: {folder}")


def _fail(e: BaseException) -> None:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
