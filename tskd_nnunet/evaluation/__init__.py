"""Evaluation: segmentation metrics (Dice, NSD, HD95), clinical endpoints and statistics.

One implementation of each metric, used by validation, the benchmark runner and the report.
"""
from tskd_nnunet.evaluation.clinical import (evaluate_test_folder, hc18_case_to_filename, head_circumference_mm,
                                             ramanujan_perimeter, volume_ml)
from tskd_nnunet.evaluation.evaluate import (EvaluationInputError, evaluate_folders,
                                             evaluate_folders_with_dataset_json)
from tskd_nnunet.evaluation.metrics import SegmentationScores, compute_scores, evaluate_segmentation
from tskd_nnunet.evaluation.stats import bootstrap_ci, holm_adjust, mean_sd, paired_wilcoxon

__all__ = [
    "SegmentationScores", "compute_scores", "evaluate_segmentation", "evaluate_folders",
    "evaluate_folders_with_dataset_json", "evaluate_test_folder", "EvaluationInputError", "hc18_case_to_filename",
    "head_circumference_mm",
    "ramanujan_perimeter", "volume_ml",
    "bootstrap_ci", "mean_sd", "paired_wilcoxon", "holm_adjust",
]
