"""``tskd_cache_targets``: compute a student's cached teacher targets ahead of training.

    tskd_cache_targets DATASET CONFIGURATION FOLD [-tr DistillTrainer] [-p nnUNetPlans] [-t TEACHER ...] [-device cpu]

Builds exactly the cache ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr DistillTrainer`` would build on its
first start (same transfer set, same key), e.g. on a GPU machine before CPU training, or with several
teachers (``-t LiteMedSAMTeacherTrainer TSKDPlainTrainer``: probabilities averaged, an ensemble).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="tskd_cache_targets", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration")
    p.add_argument("fold")
    p.add_argument("-tr", default="DistillTrainer", help="the student trainer whose cache to build (DistillTrainer)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (nnUNetPlans)")
    p.add_argument("-t", nargs="+", default=None, help="teacher trainer(s); default TSKD_TEACHER_TRAINER or the "
                                                        "student's default (LiteMedSAMTeacherTrainer)")
    p.add_argument("-device", default="cpu", choices=("cpu", "cuda", "mps"))
    a = p.parse_args(argv)
    if a.t:
        os.environ["TSKD_TEACHER_TRAINER"] = ",".join(a.t)
    os.environ["TSKD_KD_MODE"] = "cached"
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from tskd_nnunet.config import TSKDConfigError
    from tskd_nnunet.distill.target_cache import TargetCacheError
    from tskd_nnunet.distill.teacher_io import TeacherError
    fold = a.fold if a.fold == "all" else int(a.fold)
    try:
        trainer = get_trainer_from_args(a.dataset_name_or_id, a.configuration, fold, a.tr, a.p,
                                        device=torch.device(a.device))
        if not hasattr(trainer, "build_target_cache"):
            raise TSKDConfigError(f"-tr {a.tr} is not a distillation trainer. Fix: -tr DistillTrainer (or a variant)")
        folder = trainer.build_target_cache()
    except (TSKDConfigError, TargetCacheError, TeacherError) as e:
        print(f"tskd_cache_targets: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"teacher targets ready: {folder}")


if __name__ == "__main__":
    main()
