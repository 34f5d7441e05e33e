"""``tskd_cache_targets``: compute a student's cached teacher targets ahead of training.

    tskd_cache_targets DATASET CONFIGURATION FOLD [-tr DistillTrainer] [-p nnUNetPlans] [-t TEACHER ...] [-device cpu]
                       [--from_predictions FOLDER]

Builds exactly the cache ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr DistillTrainer`` would build on its
first start (same transfer set, same key), e.g. on a GPU machine before CPU training, or with several
teachers (``-t LiteMedSAMTeacherTrainer TSKDPlainTrainer``: probabilities averaged, an ensemble). With
``--from_predictions FOLDER`` the cases the teacher already predicted (``nnUNetv2_predict -i imagesTr -o FOLDER -tr
TEACHER --save_probabilities``) are converted back to nnU-Net's preprocessed geometry instead of recomputed.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="tskd_cache_targets", description=__doc__.split("\n\n")[0],
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
    if a.from_predictions and not os.path.isdir(a.from_predictions):
        p.error(f"--from_predictions {a.from_predictions}: no such folder")
    if a.t:
        os.environ["TSKD_TEACHER_TRAINER"] = ",".join(a.t)
    os.environ["TSKD_KD_MODE"] = "cached"
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from tskd_nnunet.config import TSKDConfigError
    from tskd_nnunet.distill.teacher_io import TeacherError
    fold = a.fold if a.fold == "all" else int(a.fold)
    try:
        trainer = get_trainer_from_args(a.dataset_name_or_id, a.configuration, fold, a.tr, a.p,
                                        device=torch.device(a.device))
        if not hasattr(trainer, "build_target_cache"):
            raise TSKDConfigError(f"-tr {a.tr} is not a distillation trainer. Fix: -tr DistillTrainer (or a variant)")
        folder = trainer.build_target_cache(a.from_predictions)
    except (TSKDConfigError, TeacherError) as e:
        print(f"tskd_cache_targets: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"teacher targets ready: {folder}")


if __name__ == "__main__":
    main()
